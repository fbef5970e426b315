"""One MiniGo generation end to end on a small board: self-play positions
into the window, training on a sample of them, a match against a target."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxperf.models import minigo as minigo_model
from jaxperf.rl import loop
from jaxperf.rl import train as mtrain


def test_one_generation_on_a_small_board():
  cfg = loop.LoopConfig(board_size=5, komi=0.5, max_moves=30,
                        games_per_generation=6, parallel_games=4,
                        selfplay_readouts=4, window_generations=2,
                        train_filter=0.5, train_batch_size=8, eval_games=4,
                        eval_readouts=4)
  model = minigo_model.MiniGo(board_size=5, conv_width=8, fc_width=8,
                              trunk_layers=1)
  tx = mtrain.optimizer([100], [0.02, 0.002])
  state = mtrain.init(model, tx, jax.random.key(0))
  gens = loop.Generations(model, cfg)
  rng = np.random.default_rng(0)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  positions, games = gens.selfplay(variables, jax.random.key(1), rng)
  assert games == 8                       # two chunks of 4
  n = len(positions['result'])
  assert 0 < n <= games * 30
  assert positions['features'].shape == (n, 5, 5, 13)
  assert positions['features'].dtype == bool
  np.testing.assert_allclose(positions['policy'].sum(-1), 1.0, rtol=1e-5)
  assert set(np.unique(positions['result'])) <= {-1.0, 1.0}
  window = loop.Window(cfg.window_generations)
  for _ in range(3):
    window.add(positions)
  assert len(window.generations) == 2
  sample = window.sample(rng, cfg.train_filter)
  assert len(sample['result']) == round(0.5 * 2 * n)
  step = jax.jit(lambda s, b, k: mtrain.train_step(model, tx, s, b, k))
  for i in range(len(sample['result']) // cfg.train_batch_size):
    batch = {k: v[i * 8:(i + 1) * 8] for k, v in sample.items()}
    state, parts = step(state, batch, jax.random.key(10 + i))
    assert np.isfinite(float(parts['combined_cost']))
  target = minigo_model.MiniGo(board_size=5, conv_width=4, fc_width=4,
                               trunk_layers=1)
  tvars = target.init(jax.random.key(5), np.zeros((1, 5, 5, 13)))
  rate = gens.win_rate({'params': state.params,
                        'batch_stats': state.batch_stats},
                       functools.partial(mtrain.evaluator, target), tvars,
                       jax.random.key(6))
  assert rate in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_bootstrap_games_are_the_random_models_without_passes():
  cfg = loop.LoopConfig(board_size=5, komi=0.5, max_moves=30,
                        games_per_generation=4, parallel_games=4,
                        bootstrap_readouts=6, soft_pick_moves=2)
  model = minigo_model.MiniGo(board_size=5, conv_width=8, fc_width=8,
                              trunk_layers=1)
  gens = loop.Generations(model, cfg)
  rng = np.random.default_rng(0)
  a, _ = gens.selfplay(3, jax.random.key(1), rng, bootstrap=True)
  b, _ = gens.selfplay(3, jax.random.key(1), np.random.default_rng(0),
                       bootstrap=True)
  np.testing.assert_array_equal(a['policy'], b['policy'])   # deterministic
  c, _ = gens.selfplay(4, jax.random.key(1), np.random.default_rng(0),
                       bootstrap=True)
  assert not np.array_equal(a['policy'], c['policy'])       # seeded model
  # No pass is read while another move is legal: positions whose visits
  # include the pass are those where every point is illegal.
  passes = a['policy'][:, -1] > 0
  assert passes.sum() <= 2, passes.sum()
  # The 6 readouts' visits: 5 below the root, spread over the points.
  np.testing.assert_allclose(a['policy'].sum(-1), 1.0, rtol=1e-5)
