"""MiniGo's training pieces: the learning-rate schedule, board symmetries
(features and policies transform together), and the update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxperf.models import minigo as minigo_model
from jaxperf.rl import go
from jaxperf.rl import train as mtrain


def test_piecewise_lr_is_tf_piecewise_constant():
  """rates[i] for boundaries[i-1] < step <= boundaries[i] (the 19x19
  flags' schedule)."""
  lr = mtrain.piecewise_lr([128, 10000, 20000], [0.016, 0.16, 0.016, 0.0016])
  for step, want in [(0, 0.016), (128, 0.016), (129, 0.16), (10000, 0.16),
                     (10001, 0.016), (20000, 0.016), (20001, 0.0016),
                     (10**6, 0.0016)]:
    np.testing.assert_allclose(float(lr(step)), want, rtol=1e-6)


def test_symmetries_commute_with_the_rules():
  """Playing a game's moves transformed by a symmetry gives the transformed
  features at every move, for all 8 symmetries; the 8 are distinct."""
  n = 5
  rng = np.random.default_rng(0)
  moves = []
  state = go.init(n)
  for _ in range(12):
    legal = np.nonzero(np.asarray(go.legal_moves(state))[:-1])[0]
    m = int(rng.choice(legal))
    moves.append(m)
    state = go.step(state, m)
  sym = jax.jit(mtrain.symmetry)
  seen = set()
  for k in range(8):
    s, t = go.init(n), go.init(n)
    for m in moves:
      onehot = jnp.zeros((n * n + 1,)).at[m].set(1.0)
      planes, moved = sym(go.features(s), onehot, k)
      np.testing.assert_array_equal(planes, go.features(t))
      s = go.step(s, m)
      t = go.step(t, int(jnp.argmax(moved)))
    assert not bool(t.illegal)
    seen.add(tuple(np.asarray(t.board).tolist()))
    # The pass stays the pass.
    _, p = sym(go.features(s), jnp.zeros((n * n + 1,)).at[n * n].set(1.0), k)
    assert int(jnp.argmax(p)) == n * n
  assert len(seen) == 8


def test_updates_fit_a_fixed_batch():
  model = minigo_model.MiniGo(board_size=5, conv_width=8, fc_width=8,
                              trunk_layers=1)
  tx = mtrain.optimizer([1000], [0.05, 0.005])
  state = mtrain.init(model, tx, jax.random.key(0))
  rng = np.random.default_rng(1)
  batch = {'features': jnp.asarray(rng.integers(0, 2, (16, 5, 5, 13)), bool),
           'policy': jax.nn.softmax(jnp.asarray(rng.normal(size=(16, 26)) * 3,
                                                jnp.float32)),
           'result': jnp.asarray(rng.choice([-1, 1], 16), jnp.float32)}
  step = jax.jit(lambda s, k: mtrain.train_step(model, tx, s, batch, k,
                                                augment=False))
  costs = []
  for i in range(60):
    state, parts = step(state, jax.random.key(i))
    costs.append(float(parts['combined_cost']))
  assert costs[-1] < 0.7 * costs[0], costs[::10]
  assert int(state.step) == 60
  # The evaluator gives the search a distribution and a value in [-1, 1].
  evaluate = mtrain.evaluator(model, {'params': state.params,
                                      'batch_stats': state.batch_stats})
  probs, value = jax.jit(evaluate)(go.init(5))
  assert probs.shape == (26,) and abs(float(probs.sum()) - 1) < 1e-5
  assert -1 <= float(value) <= 1
