"""Optimizers and schedules against independent numpy implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxperf.models import resnet as resnet_model
from jaxperf.optim import (decay_steps, mlperf_lars, poly_warmup_schedule,
                           sgd_momentum, weight_decay_mask)

MOM, WD, EETA = 0.9, 0.05, 0.02


def _params(rng):
  return {
      'dense': {'kernel': rng.normal(size=(5, 3)), 'bias': rng.normal(size=3)},
      'bn': {'scale': 1.0 + 0.1 * rng.normal(size=3),
             'bias': rng.normal(size=3)},
      'zero': {'kernel': np.zeros((2, 4))},  # |w| = 0: trust 1 on step 0
  }


def _grads(rng, params, step):
  g = jax.tree.map(lambda w: rng.normal(size=w.shape), params)
  if step == 2:  # |g| = 0: trust 1
    g['dense']['kernel'] = np.zeros_like(g['dense']['kernel'])
  return g


def _np_lars_leaf(w, g, v, lr, use_lars, eps=0.0):
  """The MLPerf reference LARS update of one variable."""
  if use_lars:
    w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
    trust = (EETA * w_norm / (g_norm + WD * w_norm + eps)
             if w_norm > 0 and g_norm > 0 else 1.0)
    v = MOM * v + lr * trust * (g + WD * w)
  else:
    v = MOM * v + lr * g
  return w - v, v


def _run(tx, params, grads_fn, steps):
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for step in range(steps):
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads_fn(step))
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  return p, state


def _assert_tree_close(actual, expected, rtol=1e-6):
  """Elementwise to rtol, with entries near 0 judged against the leaf's scale
  (float32 against float64)."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    atol = rtol * float(np.max(np.abs(e), initial=0.0))
    np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol)


@pytest.mark.parametrize('mask_as_fn', [False, True])
def test_mlperf_lars_matches_reference(mask_as_fn):
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = [_grads(rng, params, s) for s in range(6)]
  sched = poly_warmup_schedule(0.5, 2, 6, end_lr=1e-3)
  mask = {'dense': {'kernel': True, 'bias': False},
          'bn': {'scale': False, 'bias': False}, 'zero': {'kernel': True}}
  tx = mlperf_lars(sched, momentum=MOM, weight_decay=WD, eeta=EETA,
                   lars_mask=weight_decay_mask if mask_as_fn else mask)
  got, state = _run(tx, params, lambda s: grads[s], 6)

  w = jax.tree.map(np.asarray, params)
  v = jax.tree.map(np.zeros_like, w)
  flat_mask = jax.tree.leaves(mask)
  for step in range(6):
    lr = float(sched(step))
    out = [_np_lars_leaf(wi, gi, vi, lr, m) for wi, gi, vi, m in zip(
        jax.tree.leaves(w), jax.tree.leaves(grads[step]), jax.tree.leaves(v),
        flat_mask)]
    treedef = jax.tree.structure(w)
    w = treedef.unflatten([o[0] for o in out])
    v = treedef.unflatten([o[1] for o in out])
  _assert_tree_close(got, w)
  _assert_tree_close(state.momentum, v)
  assert int(state.count) == 6


def test_mlperf_lars_zero_weights_trust_one():
  w = {'kernel': jnp.zeros((3, 3))}
  g = {'kernel': jnp.full((3, 3), 2.0)}
  tx = mlperf_lars(0.1, momentum=MOM, weight_decay=WD, eeta=EETA)
  updates, state = tx.update(g, tx.init(w), w)
  np.testing.assert_allclose(updates['kernel'], -0.1 * 2.0 * np.ones((3, 3)),
                             rtol=1e-6)
  np.testing.assert_allclose(state.momentum['kernel'], 0.2 * np.ones((3, 3)),
                             rtol=1e-6)


def test_mlperf_lars_needs_params():
  tx = mlperf_lars(0.1)
  w = {'kernel': jnp.ones(2)}
  with pytest.raises(ValueError, match='params'):
    tx.update(w, tx.init(w))


def test_mlperf_lars_differs_from_optax_lars():
  """MLPerf's trust ratio divides by |g| + wd|w|, optax's by |g + wd w|."""
  w = np.array([3.0, 0.0, 4.0])
  g = np.array([0.0, 2.0, -1.0])
  lr = 0.5
  mlperf_trust = EETA * 5.0 / (np.linalg.norm(g) + WD * 5.0)
  optax_trust = EETA * 5.0 / np.linalg.norm(g + WD * w)
  assert abs(mlperf_trust / optax_trust - 1) > 1e-2

  kw = dict(momentum=MOM)
  ours = mlperf_lars(lr, weight_decay=WD, eeta=EETA, **kw)
  theirs = optax.lars(lr, weight_decay=WD, trust_coefficient=EETA, **kw)
  wj, gj = jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32)
  u_ours, _ = ours.update(gj, ours.init(wj), wj)
  u_theirs, _ = theirs.update(gj, theirs.init(wj), wj)
  np.testing.assert_allclose(u_ours, -lr * mlperf_trust * (g + WD * w),
                             rtol=1e-6)
  np.testing.assert_allclose(u_theirs, -lr * optax_trust * (g + WD * w),
                             rtol=1e-6)
  assert not np.allclose(u_ours, u_theirs, rtol=1e-3)


def test_poly_warmup_schedule_values():
  base, end, warmup, total = 2.0, 1e-4, 4, 10
  sched = poly_warmup_schedule(base, warmup, total, end_lr=end, power=2.0)
  decay = total - warmup + 1
  assert decay_steps(warmup, total) == decay == 7

  def poly(s):
    return (base - end) * (1 - (s - warmup) / decay) ** 2 + end

  expected = {0: 0.0, 1: 0.5, 3: 1.5, 4: base, 5: poly(5), 7: poly(7),
              9: poly(9), 10: poly(10), 11: end, 20: end}
  assert expected[5] == pytest.approx((base - end) * (6 / 7) ** 2 + end)
  for step, value in expected.items():
    assert float(sched(step)) == pytest.approx(value, rel=1e-6, abs=1e-9), step
  # Monotone: rising through warmup, falling after.
  vals = [float(sched(s)) for s in range(13)]
  assert vals[:5] == sorted(vals[:5])
  assert vals[4:] == sorted(vals[4:], reverse=True)


def test_poly_warmup_schedule_without_warmup():
  sched = poly_warmup_schedule(1.0, 0, 4, end_lr=0.0)
  for s, v in {0: 1.0, 1: (4 / 5) ** 2, 4: (1 / 5) ** 2, 5: 0.0}.items():
    assert float(sched(s)) == pytest.approx(v, rel=1e-6)


@pytest.fixture(scope='module')
def resnet50_params():
  model = resnet_model.resnet50(num_classes=1000)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  return variables['params']


def test_weight_decay_mask_resnet50(resnet50_params):
  mask = weight_decay_mask(resnet50_params)
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert len(flat) == 161
  on = ['/'.join(p.key for p in path) for path, m in flat if m]
  off = ['/'.join(p.key for p in path) for path, m in flat if not m]
  assert len(on) == 54
  assert all(n.endswith('/kernel') for n in on)
  convs = [n for n in on if n.split('/')[-2].startswith('conv')]
  assert len(convs) == 53 and 'fc1/kernel' in on
  assert 'fc1/bias' in off
  assert len(off) == 107
  assert all(n == 'fc1/bias' or (n.split('/')[-2].startswith('bn')
                                 and n.split('/')[-1] in ('scale', 'bias'))
             for n in off)


def test_sgd_momentum_matches_numpy():
  rng = np.random.default_rng(1)
  params = _params(rng)
  grads = [_grads(rng, params, s) for s in range(5)]
  sched = poly_warmup_schedule(0.3, 1, 5, end_lr=1e-3)
  tx = sgd_momentum(sched, momentum=MOM, weight_decay=WD,
                    decay_mask=weight_decay_mask)
  got, _ = _run(tx, params, lambda s: grads[s], 5)

  w = jax.tree.map(np.asarray, params)
  v = jax.tree.map(np.zeros_like, w)
  mask = jax.tree.leaves(weight_decay_mask(w))
  treedef = jax.tree.structure(w)
  for step in range(5):
    lr = float(sched(step))
    new_w, new_v = [], []
    for wi, gi, vi, m in zip(jax.tree.leaves(w), jax.tree.leaves(grads[step]),
                             jax.tree.leaves(v), mask):
      vi = MOM * vi + gi + (WD * wi if m else 0.0)
      new_w.append(wi - lr * vi)
      new_v.append(vi)
    w, v = treedef.unflatten(new_w), treedef.unflatten(new_v)
  _assert_tree_close(got, w)
