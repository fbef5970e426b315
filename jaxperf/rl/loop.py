"""MiniGo's generations: self-play -> training window -> training ->
evaluation against the target model, as the reference's train_loop.py
orders them.

A generation plays `games_per_generation` self-play games with the current
network (in chunks of `parallel_games`, one compiled program; the first
generation's are the reference's bootstrap games: its random model, no
passes, `bootstrap_readouts` readouts), keeps their
positions, trains on a random `train_filter` share of the positions of the
last `window_generations` generations (floor(samples / batch) steps, each
example under a random board symmetry), then plays `eval_games` against the
target network (half with each colour) and reports the win rate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxperf.models import minigo as minigo_model
from jaxperf.rl import go, mcts, selfplay
from jaxperf.rl import train as mtrain


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  board_size: int = 19
  komi: float = go.KOMI
  max_moves: int | None = None          # None: 2 N^2
  games_per_generation: int = 8192
  parallel_games: int = 256
  selfplay_readouts: int = 800
  soft_pick_moves: int | None = None    # None: the reference's (N^2/12)/2*2
  resign_range: tuple[float, float] = (-1.0, -0.9)   # per game, uniform
  disable_resign_pct: float = 0.0
  dirichlet_alpha: float | None = None  # None: 0.03 * 361 / N^2
  noise_mix: float = 0.3
  value_init_penalty: float = 0.2
  window_generations: int = 5
  train_filter: float = 0.3
  train_batch_size: int = 4096
  eval_games: int = 256
  eval_readouts: int = 100
  bootstrap_readouts: int = 80
  bootstrap_resign_range: tuple[float, float] = (-1.0, -0.99)
  random_model_stddev: tuple[float, float] = (0.4, 0.4)  # policy, value

  @property
  def moves_cap(self) -> int:
    n = self.board_size
    return 2 * n * n if self.max_moves is None else self.max_moves

  @property
  def soft_pick(self) -> int:
    n = self.board_size
    return ((n * n // 12) // 2 * 2 if self.soft_pick_moves is None
            else self.soft_pick_moves)

  @property
  def alpha(self) -> float:
    n = self.board_size
    return (0.03 * 361 / (n * n) if self.dirichlet_alpha is None
            else self.dirichlet_alpha)


class Window:
  """The positions of the last `size` generations, on the host."""

  def __init__(self, size: int):
    self.size = size
    self.generations: list[dict[str, np.ndarray]] = []

  def add(self, positions: dict[str, np.ndarray]) -> None:
    self.generations = (self.generations + [positions])[-self.size:]

  def sample(self, rng: np.random.Generator, fraction: float
             ) -> dict[str, np.ndarray]:
    """A random `fraction` of the window's positions, shuffled."""
    every = {k: np.concatenate([g[k] for g in self.generations])
             for k in self.generations[0]}
    n = len(every['result'])
    keep = rng.permutation(n)[:max(1, int(round(fraction * n)))]
    return {k: v[keep] for k, v in every.items()}


def positions_of(out: dict[str, Any]) -> dict[str, np.ndarray]:
  """The recorded positions of a `selfplay.play` result (valid rows
  only), each with its game's result for black."""
  valid = np.asarray(out['valid'])
  result = np.broadcast_to(np.asarray(out['result'])[None], valid.shape)
  return {'features': np.asarray(out['features'])[valid].astype(bool),
          'policy': np.asarray(out['policy'])[valid],
          'result': result[valid].astype(np.float32)}


class Generations:
  """Self-play, training and evaluation programs for one configuration."""

  def __init__(self, model: minigo_model.MiniGo, cfg: LoopConfig):
    self.model, self.cfg = model, cfg
    self.game, self.initial = go.game(cfg.board_size, komi=cfg.komi,
                                      max_moves=cfg.moves_cap)
    search = mcts.SearchConfig(num_readouts=cfg.selfplay_readouts,
                               value_init_penalty=cfg.value_init_penalty,
                               dirichlet_alpha=cfg.alpha,
                               noise_mix=cfg.noise_mix)
    self.selfplay_cfg = selfplay.PlayConfig(
        max_moves=cfg.moves_cap, soft_pick_moves=cfg.soft_pick, search=search)
    self.eval_cfg = selfplay.PlayConfig(
        max_moves=cfg.moves_cap, soft_pick_moves=0,
        search=mcts.SearchConfig(num_readouts=cfg.eval_readouts,
                                 value_init_penalty=cfg.value_init_penalty,
                                 inject_noise=False))
    self.bootstrap_cfg = dataclasses.replace(
        self.selfplay_cfg, search=dataclasses.replace(
            search, num_readouts=cfg.bootstrap_readouts, allow_pass=False))
    self._selfplay = jax.jit(self._selfplay_fn, static_argnums=(0,))
    self._match = jax.jit(self._match_fn, static_argnums=(0,))

  def random_model(self, seed: int):
    """The reference's random model (cc/model/loader.cc's stddevs)."""
    p, v = self.cfg.random_model_stddev
    return mtrain.random_evaluator(seed, p, v)

  def _selfplay_fn(self, bootstrap, variables, key, thresholds):
    if bootstrap:
      evaluate, config = self.random_model(variables), self.bootstrap_cfg
    else:
      evaluate = mtrain.evaluator(self.model, variables)
      config = self.selfplay_cfg
    return selfplay.play(self.game, [evaluate], go.features, self.initial,
                         key, self.cfg.parallel_games, config,
                         resign_threshold=thresholds)

  def _match_fn(self, target, variables, target_variables, key, black):
    players = [mtrain.evaluator(self.model, variables),
               target(target_variables)]
    return selfplay.play(self.game, players, go.features, self.initial, key,
                         black.shape[0], self.eval_cfg, black=black,
                         record=False)

  def selfplay(self, variables, key: jax.Array, rng: np.random.Generator, *,
               bootstrap: bool = False
               ) -> tuple[dict[str, np.ndarray], int]:
    """(positions, games played): at least games_per_generation games.
    With `bootstrap`, the random model plays (`variables`: its seed)."""
    cfg = self.cfg
    chunks = math.ceil(cfg.games_per_generation / cfg.parallel_games)
    lo, hi = cfg.bootstrap_resign_range if bootstrap else cfg.resign_range
    parts = []
    for i in range(chunks):
      thr = rng.uniform(lo, hi, cfg.parallel_games)
      off = rng.uniform(size=cfg.parallel_games) < cfg.disable_resign_pct
      thr = np.where(off, -2.0, thr).astype(np.float32)
      out = self._selfplay(bootstrap, variables, jax.random.fold_in(key, i),
                           jnp.asarray(thr))
      parts.append(positions_of(out))
    positions = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return positions, chunks * cfg.parallel_games

  def win_rate(self, variables, target, target_variables,
               key: jax.Array) -> float:
    """The current network's share of wins over `eval_games` games against
    the target (`target(target_variables)` -> its evaluator; a hashable
    callable), playing black in half of them."""
    games = self.cfg.eval_games
    black = jnp.asarray(np.arange(games) % 2, jnp.int32)   # 0: ours black
    out = self._match(target, variables, target_variables, key, black)
    result = np.asarray(out['result'])
    ours = np.where(np.asarray(black) == 0, 1, -1)
    return float(np.mean(result == ours))
