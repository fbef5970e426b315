"""MiniGo (MLPerf Training v2.1 "minigo"): reinforcement learning of Go by
self-play, as the reference's ml_perf/train_loop.py.

An "epoch" of the trainer is one generation:

  block_start -> self-play `games_per_generation` games with the current
  weights (generation 1: the reference's bootstrap games of its random
  model) -> train one pass over a `train_filter` sample of the last
  `window_generations` generations' positions -> play `eval_games` against
  the target model -> eval_accuracy = the win rate -> block_stop

until the win rate reaches target_accuracy (0.5). Games are written to
<workdir>/selfplay/gen-NNNN.npz as they are played (with a JSON summary
beside each), so a resumed run trains on the same window; a generation's
steps are known once its games exist (`prepare_block`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxperf.config import Config
from jaxperf.errors import ConfigError
from jaxperf.models import minigo as minigo_model
from jaxperf.rl import loop, train as mtrain
from jaxperf.workloads.base import TrainState, Workload, rng_key


def _is_tf_checkpoint(path: str) -> bool:
  """A TF1 checkpoint's prefix or .index file, or a folder of one (and not
  a jaxperf workdir)."""
  if path.endswith('.index') or os.path.isfile(path + '.index'):
    return True
  return (os.path.isdir(path)
          and not os.path.isdir(os.path.join(path, 'checkpoints'))
          and any(n.endswith('.index') for n in os.listdir(path)))


class GenerationSchedule:
  """Steps per generation, as the generations' games come in.

  Generation g trains floor(sample / global_batch) steps, known once its
  games are played; `steps_for` a later generation extrapolates the last
  known count (for progress messages; blocks ask only after their games
  exist).
  """

  unit = 'generations'
  steps_known = False       # in advance: a generation's, once it is played

  def __init__(self, global_batch: int):
    self.global_batch = global_batch
    self.steps: list[int] = []          # steps[g - 1]: generation g's

  def set_steps(self, generation: int, steps: int) -> None:
    if generation > len(self.steps) + 1:
      raise ValueError(f'generation {generation} before {len(self.steps) + 1}')
    self.steps[generation - 1:] = [steps]

  def steps_for(self, epochs: float) -> int:
    g = int(round(epochs))
    known = self.steps[:g]
    guess = self.steps[-1] if self.steps else 1
    return sum(known) + max(g - len(self.steps), 0) * guess

  def generation_of(self, step: int) -> tuple[int, int]:
    """(generation, its first step) of the step that starts at `step`."""
    first = 0
    for g, n in enumerate(self.steps, start=1):
      if step < first + n:
        return g, first
      first += n
    raise ValueError(f'step {step}: past the {len(self.steps)} generations '
                     f'played so far ({first} steps)')

  def epoch_of(self, step: int) -> float:
    first = 0
    for g, n in enumerate(self.steps, start=1):
      if step <= first + n:
        return g - 1 + (step - first) / max(n, 1)
      first += n
    return len(self.steps) + (step - first) / max(
        self.steps[-1] if self.steps else 1, 1)

  @property
  def steps_per_epoch(self) -> float:
    return sum(self.steps) / max(len(self.steps), 1)


class _SelfPlayData:
  """The training batches: generation g's sample, in order, a global
  batch per step (this process's rows of it)."""

  def __init__(self, workload: 'MiniGo'):
    self.w = workload
    self.num_examples = int(workload.config.games_per_generation)

  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, Any]]:
    step = start_step
    per = global_batch // process_count
    while True:
      g, first = self.w.schedule.generation_of(step)
      sample = self.w.sample(g)
      lo = (step - first) * global_batch + process_index * per
      yield {k: v[lo:lo + per] for k, v in sample.items()}
      step += 1

  def close(self) -> None:
    pass


class _Matches:
  """The evaluation: `eval_games` games against the target."""

  def __init__(self, games: int):
    self.num_examples = games

  def close(self) -> None:
    pass


class MiniGo(Workload):
  name = 'minigo'
  benchmark = 'minigo'
  metric = 'win_rate'
  uses_data_dir = False
  # On a CPU, 16 games for 2 moves each at the full size (800 readouts).
  bench_cpu_overrides = {'bench_games': 16, 'bench_moves': 2}
  description = ('Go by self-play RL: residual policy/value network, MCTS, '
                 'win rate vs a target model')

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    self.model = minigo_model.MiniGo(
        board_size=int(c.board_size), conv_width=int(c.conv_width),
        fc_width=int(c.fc_width), trunk_layers=int(c.trunk_layers),
        dtype=jnp.dtype(c.dtype))
    self.loop_cfg = loop.LoopConfig(
        board_size=int(c.board_size), komi=float(c.komi),
        max_moves=None if c.max_moves is None else int(c.max_moves),
        games_per_generation=int(c.games_per_generation),
        parallel_games=int(c.parallel_games),
        selfplay_readouts=int(c.selfplay_readouts),
        soft_pick_moves=(None if c.soft_pick_moves is None
                         else int(c.soft_pick_moves)),
        resign_range=tuple(float(x) for x in c.resign_range),
        disable_resign_pct=float(c.disable_resign_pct),
        dirichlet_alpha=(None if c.dirichlet_alpha is None
                         else float(c.dirichlet_alpha)),
        noise_mix=float(c.noise_mix),
        value_init_penalty=float(c.value_init_penalty),
        window_generations=int(c.window_generations),
        train_filter=float(c.train_filter),
        train_batch_size=int(c.global_batch_size),
        eval_games=int(c.eval_games), eval_readouts=int(c.eval_readouts),
        bootstrap_readouts=int(c.bootstrap_readouts),
        bootstrap_resign_range=tuple(float(x)
                                     for x in c.bootstrap_resign_range))
    self._check()
    self.tx = mtrain.optimizer(list(c.lr_boundaries), list(c.lr_rates),
                               momentum=float(c.momentum))
    self.gens = loop.Generations(self.model, self.loop_cfg)
    self.workdir: str | None = None
    self.seed = 0
    self._samples: dict[int, dict[str, np.ndarray]] = {}
    self._loaded: dict[int, dict[str, np.ndarray]] = {}
    self._target = None

  def _check(self) -> None:
    c = self.config
    n = int(c.board_size)
    if not 2 <= n <= 25:
      raise ConfigError(f'board_size={n}: expected 2..25 (19 for MLPerf)')
    if len(c.lr_rates) != len(c.lr_boundaries) + 1:
      raise ConfigError(
          f'lr_rates has {len(c.lr_rates)} values and lr_boundaries '
          f'{len(c.lr_boundaries)}: expected one more rate than boundaries')
    for key in ('games_per_generation', 'parallel_games', 'selfplay_readouts',
                'eval_games', 'eval_readouts', 'bootstrap_readouts',
                'window_generations', 'global_batch_size'):
      if int(getattr(c, key)) < 1:
        raise ConfigError(f'{key}={getattr(c, key)}: expected a positive integer')
    if int(c.eval_games) % 2:
      raise ConfigError(f'eval_games={c.eval_games}: expected an even number '
                        f'(half the games with each colour)')
    if not 0.0 < float(c.train_filter) <= 1.0:
      raise ConfigError(f'train_filter={c.train_filter}: expected a fraction '
                        f'in (0, 1]')

  # --- data ------------------------------------------------------------------
  def set_workdir(self, workdir: str) -> None:
    self.workdir = workdir

  @property
  def games_dir(self) -> str:
    return os.path.join(self.workdir or '.', 'selfplay')

  def _path(self, g: int, ext: str) -> str:
    return os.path.join(self.games_dir, f'gen-{g:04d}.{ext}')

  def datasets(self, data_dir: str | None, seed: int):
    if data_dir is not None:
      raise ConfigError(
          f'--data-dir {data_dir}: MiniGo makes its training data by '
          f'self-play and reads no dataset; a target network is given with '
          f'--set target_model=PATH')
    self.seed = seed
    self._load_target()
    return _SelfPlayData(self), _Matches(int(self.config.eval_games))

  def setup(self, train_examples: int) -> GenerationSchedule:
    del train_examples
    sched = GenerationSchedule(int(self.config.global_batch_size))
    g = 1
    while os.path.exists(self._path(g, 'json')):
      sched.set_steps(g, self._steps_of(g))
      g += 1
    self.schedule = sched
    return sched

  def train_length(self) -> int:
    return int(self.config.train_epochs)

  def _summary(self, g: int) -> dict[str, Any]:
    with open(self._path(g, 'json')) as f:
      return json.load(f)

  def _window(self, g: int) -> list[int]:
    return list(range(max(1, g - self.loop_cfg.window_generations + 1), g + 1))

  def _steps_of(self, g: int) -> int:
    total = sum(self._summary(h)['positions'] for h in self._window(g))
    sampled = max(1, int(round(self.loop_cfg.train_filter * total)))
    steps = sampled // int(self.config.global_batch_size)
    if steps < 1:
      raise ConfigError(
          f'generation {g}: {sampled} positions sampled for training, fewer '
          f'than global_batch_size={self.config.global_batch_size}; raise '
          f'games_per_generation or train_filter, or lower the batch')
    return steps

  def prepare_block(self, state: TrainState, epoch: float) -> dict[str, Any]:
    """Plays generation `epoch`'s games (unless a previous attempt of this
    run already wrote them) and fixes its training sample and steps."""
    g = int(round(epoch))
    if not os.path.exists(self._path(g, 'json')):
      self._play(state, g)
    self.schedule.set_steps(g, self._steps_of(g))
    self.sample(g)
    return {'actual_selfplay_games_per_generation': self._summary(g)['games']}

  def _play(self, state: TrainState, g: int) -> None:
    key = jax.random.fold_in(jax.random.key(self.seed), g)
    rng = np.random.default_rng([self.seed, g])
    if g == 1:    # the bootstrap games: the random model, no passes
      positions, games = self.gens.selfplay(
          self.seed % (2**31), key, rng, bootstrap=True)
    else:
      positions, games = self.gens.selfplay(self._variables(state), key, rng)
    os.makedirs(self.games_dir, exist_ok=True)
    tmp = self._path(g, 'tmp.npz')
    np.savez_compressed(tmp, features=np.packbits(positions['features'],
                                                  axis=-1),
                        policy=positions['policy'].astype(np.float32),
                        result=positions['result'].astype(np.int8))
    os.replace(tmp, self._path(g, 'npz'))
    summary = {'generation': g, 'games': int(games),
               'positions': int(len(positions['result'])),
               'bootstrap': g == 1}
    with open(self._path(g, 'tmp.json'), 'w') as f:
      json.dump(summary, f)
    os.replace(self._path(g, 'tmp.json'), self._path(g, 'json'))

  def _positions(self, g: int) -> dict[str, np.ndarray]:
    """Generation g's positions (read once; `sample` drops those that
    have left the window)."""
    if g not in self._loaded:
      planes = self.model.input_planes
      with np.load(self._path(g, 'npz')) as f:
        self._loaded[g] = {
            'features': np.unpackbits(f['features'], axis=-1,
                                      count=planes).astype(bool),
            'policy': f['policy'],
            'result': f['result'].astype(np.float32)}
    return self._loaded[g]

  def sample(self, g: int) -> dict[str, np.ndarray]:
    """Generation g's training examples: a `train_filter` share of its
    window's positions, shuffled (a function of the seed and g)."""
    if g not in self._samples:
      window = loop.Window(self.loop_cfg.window_generations)
      for h in self._window(g):
        window.add(self._positions(h))
      self._loaded = {h: self._loaded[h] for h in self._window(g)}
      self._samples = {g: window.sample(
          np.random.default_rng([self.seed, g, 1]),
          self.loop_cfg.train_filter)}
    return self._samples[g]

  def batch_spec(self, global_batch: int, train: bool
                 ) -> dict[str, jax.ShapeDtypeStruct]:
    del train
    n = int(self.config.board_size)
    return {'features': jax.ShapeDtypeStruct(
                (global_batch, n, n, self.model.input_planes), jnp.bool_),
            'policy': jax.ShapeDtypeStruct((global_batch, n * n + 1),
                                           jnp.float32),
            'result': jax.ShapeDtypeStruct((global_batch,), jnp.float32)}

  def check_mesh(self, mesh) -> None:
    if jax.process_count() > 1:
      raise ConfigError(
          f'minigo runs in one process ({jax.process_count()} started): '
          f'self-play and its games files are not split over processes')
    del mesh

  # --- state and steps ---------------------------------------------------------
  def init_state(self, rng: jax.Array) -> TrainState:
    s = mtrain.init(self.model, self.tx, jax.random.wrap_key_data(rng))
    return TrainState(step=s.step, params=s.params,
                      model_state={'batch_stats': s.batch_stats},
                      opt_state=s.opt_state, rng=rng)

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    key = jax.random.fold_in(rng_key(state), state.step)
    inner = mtrain.TrainState(step=state.step, params=state.params,
                              batch_stats=state.model_state['batch_stats'],
                              opt_state=state.opt_state)
    new, parts = mtrain.train_step(
        self.model, self.tx, inner, dict(batch), key,
        l2_strength=float(self.config.l2_strength),
        value_cost_weight=float(self.config.value_cost_weight))
    lr = mtrain.piecewise_lr(list(self.config.lr_boundaries),
                             list(self.config.lr_rates))(state.step)
    metrics = {'loss': parts['combined_cost'], 'learning_rate': lr,
               **{k: v for k, v in parts.items() if k != 'combined_cost'}}
    return state.replace(step=new.step, params=new.params,
                         model_state={'batch_stats': new.batch_stats},
                         opt_state=new.opt_state), metrics

  @staticmethod
  def _variables(state: TrainState) -> dict[str, Any]:
    return {'params': state.params,
            'batch_stats': state.model_state['batch_stats']}

  # --- the target ----------------------------------------------------------------
  def _load_target(self) -> None:
    """target_model: 'random' (the reference's random model, seeded by
    target_seed), the reference's TF1 checkpoint of the target network
    (ml_perf/target/target: its prefix, .index file or folder) or the
    workdir (or its checkpoints directory) of a minigo run; either network
    of this config's shape."""
    spec = self.config.target_model
    if spec is None:
      raise ConfigError(
          'target_model is not set: give the target network with --set '
          'target_model=PATH (the reference\'s TF checkpoint, e.g. '
          'ml_perf/target/target, or a minigo workdir) or --set '
          'target_model=random')
    if str(spec) == 'random':
      self._target = (self.gens.random_model,
                      jnp.int32(int(self.config.target_seed)))
      return
    path = os.path.expanduser(str(spec))
    if _is_tf_checkpoint(path):
      self._target = (functools.partial(mtrain.evaluator, self.model),
                      self._tf_target(path))
      return
    from jaxperf.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(path):
      raise ConfigError(f'target_model={path}: no such directory or TF '
                        f'checkpoint (expected the reference\'s TF '
                        f'checkpoint prefix, a minigo workdir, or "random")')
    ckdir = os.path.join(path, 'checkpoints')
    ckdir = ckdir if os.path.isdir(ckdir) else path
    ckpt = Checkpointer(ckdir, use_async=False)
    step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f'target_model={path}: no checkpoint in {ckdir}')
    abstract = jax.eval_shape(self.init_state,
                              jax.random.key_data(jax.random.key(0)))
    try:
      state, _ = ckpt.restore(step, abstract)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(
          f'target_model={path}: its checkpoint (step {step}) does not fit '
          f'this network (board_size={self.config.board_size}, conv_width='
          f'{self.config.conv_width}, trunk_layers={self.config.trunk_layers}'
          f'): {str(e)[:300]}') from e
    finally:
      ckpt.close()
    self._target = (functools.partial(mtrain.evaluator, self.model),
                    self._variables(state))

  def _tf_target(self, path: str) -> dict[str, Any]:
    """The target network's variables from the reference's TF1 checkpoint
    (its weights and batch norm statistics; Momentum slots skipped)."""
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    abstract = self._variables(jax.eval_shape(
        self.init_state, jax.random.key_data(jax.random.key(0))))
    try:
      variables = interop.from_tf_checkpoint('minigo', path,
                                             expected=abstract)
    except interop.InteropError as e:
      c = self.config
      raise ConfigError(
          f'target_model={path}: {e} (this config: board_size='
          f'{c.board_size}, conv_width={c.conv_width}, fc_width='
          f'{c.fc_width}, trunk_layers={c.trunk_layers})') from e
    return jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), variables,
                        abstract)

  def make_evaluator(self, mesh, abstract_state):
    del mesh, abstract_state

    def evaluate(state, eval_ds):
      del eval_ds
      target, target_variables = self._target
      step = int(jax.device_get(state.step))
      key = jax.random.fold_in(jax.random.key(self.seed), 1_000_000 + step)
      rate = self.gens.win_rate(self._variables(state), target,
                                target_variables, key)
      return {'win_rate': rate, 'eval_games': self.loop_cfg.eval_games}
    return evaluate

  def describe_result(self, result: Mapping[str, Any]) -> str:
    return (f'win rate {result["win_rate"]:.3f} over {result["eval_games"]} '
            f'games vs the target (target {self.target})')

  # --- MLPerf ----------------------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    return {'train_batch_size': int(c.global_batch_size),
            'lr_boundaries': [int(b) for b in c.lr_boundaries],
            'lr_rates': [float(r) for r in c.lr_rates],
            'min_selfplay_games_per_generation': int(c.games_per_generation)}

  def initialized_tensors(self, state: TrainState) -> list[str]:
    return minigo_model.checker_tensor_names(int(self.config.trunk_layers))

  def bench_batch(self, global_batch: int, seed: int) -> dict[str, Any]:
    """Valid training examples: 0/1 planes, visit distributions, +-1."""
    rng = np.random.default_rng(seed)
    spec = self.batch_spec(global_batch, train=True)
    policy = rng.random(spec['policy'].shape).astype(np.float32)
    return {'features': rng.random(spec['features'].shape) < 0.3,
            'policy': policy / policy.sum(-1, keepdims=True),
            'result': rng.choice([-1.0, 1.0], global_batch).astype(
                np.float32)}

  def bench_info(self) -> dict[str, Any]:
    return {'board_size': int(self.config.board_size)}

  def bench_phases(self, state: TrainState, seed: int, log
                   ) -> dict[str, dict[str, Any]]:
    """Self-play at the config's network and readouts: `bench_games`
    games side by side, played to the end (games/s and positions/s) or,
    with `bench_moves`, for that many moves each (positions/s only: no
    game finishes). The first call compiles; the second is timed."""
    c = self.config
    games = int(c.bench_games)
    moves = None if c.bench_moves is None else int(c.bench_moves)
    cfg = dataclasses.replace(self.loop_cfg, parallel_games=games,
                              games_per_generation=games)
    gens = loop.Generations(self.model, cfg)
    if moves is not None:
      gens.selfplay_cfg = dataclasses.replace(gens.selfplay_cfg,
                                              max_moves=moves)
    variables = self._variables(state)
    thr = jnp.full((games,), -2.0, jnp.float32)      # no resignation
    run = lambda k: gens._selfplay(False, variables, k, thr)  # pylint: disable=protected-access
    log(f'{self.name}: self-play of {games} games at {cfg.selfplay_readouts} '
        f'readouts on {c.board_size}x{c.board_size}'
        + (f', {moves} moves each' if moves else ', to the end')
        + ': compiling')
    t0 = time.perf_counter()
    jax.block_until_ready(run(jax.random.key(seed)))
    compile_and_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(run(jax.random.key(seed + 1)))
    seconds = time.perf_counter() - t0
    positions = int(np.sum(np.asarray(out['valid'])))
    pos_s = positions / seconds
    games_s = games / seconds if moves is None else None
    readouts_s = pos_s * cfg.selfplay_readouts
    line = (f'{games} games x ' + (f'{moves} moves' if moves else
                                     f'{positions / games:.1f} moves') +
            f' in {seconds:.2f} s: {pos_s:,.1f} positions/s, '
            + (f'{games_s:.3f} games/s, ' if games_s is not None else
               'games/s n/a (games cut at bench_moves), ')
            + f'{readouts_s:,.0f} readouts/s ({cfg.selfplay_readouts} '
            f'readouts a move)')
    return {'selfplay': {
        'summary': line, 'games': games, 'moves_cap': moves,
        'readouts': cfg.selfplay_readouts, 'positions': positions,
        'seconds': seconds, 'first_call_s': compile_and_first,
        'positions_per_s': pos_s, 'games_per_s': games_s,
        'readouts_per_s': readouts_s}}
