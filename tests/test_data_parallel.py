"""Data parallelism over 8 simulated devices equals the single-device step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxperf.config import load_config
from jaxperf.data.synthetic import SyntheticImages
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads.base import new_rng
from jaxperf.workloads.resnet import ResNet50


def _workload(optimizer):
  cfg = load_config('resnet50', 'smoke', {
      'width': 8, 'stage_sizes': [1, 1, 1, 1], 'seed': 0,
      'global_batch_size': 32, 'warmup_epochs': 0,
      'optimizer': optimizer,
      'base_learning_rate': 2.0 if optimizer == 'lars' else 0.05})
  w = ResNet50(cfg)
  w.setup(256)
  return w


@pytest.fixture(scope='module')
def batches():
  ds = SyntheticImages(256, 10, 32, seed=0)
  it = ds.train_batches(0, 32)
  return [next(it) for _ in range(2)]


def _train(w, batches, mesh):
  """Steps on `mesh`; returns losses, states after each step, and the HLO."""
  rng = new_rng(0)
  sh = w.state_sharding(jax.eval_shape(w.init_state, rng), mesh)
  state = jax.jit(w.init_state, out_shardings=sh)(rng)
  states = [jax.device_get(state)]
  bsh = mesh_lib.batch_sharding(mesh)
  step = jax.jit(w.train_step, out_shardings=(sh, None))
  hlo = None
  losses = []
  for batch in batches:
    batch = {k: jax.device_put(v, bsh) for k, v in batch.items()}
    if hlo is None:
      hlo = step.lower(state, batch).compile().as_text()
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    states.append(jax.device_get(state))
  return losses, states, hlo


def _rel(a, b):
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize('optimizer', ['lars', 'sgd'])
def test_data_parallel_matches_single_device(batches, optimizer):
  w = _workload(optimizer)
  assert jax.device_count() == 8
  one = mesh_lib.make_mesh('data=1', devices=jax.devices()[:1])
  eight = mesh_lib.make_mesh('data=8')
  losses1, states1, hlo1 = _train(w, batches, one)
  losses8, states8, hlo8 = _train(w, batches, eight)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-4)
  # The first update (lr * gradient direction) of every parameter agrees to
  # float32 reduction-order noise. (Only two steps: at these learning rates
  # float32 rounding differences grow step by step in a deep network.)
  before = jax.tree.leaves(states1[0].params)
  upd1 = [a - b for a, b in zip(jax.tree.leaves(states1[1].params), before)]
  upd8 = [a - b for a, b in zip(jax.tree.leaves(states8[1].params), before)]
  worst = max(_rel(u8, u1) for u8, u1 in zip(upd8, upd1))
  assert worst < 5e-4, worst
  # Batch-norm statistics are computed over the global batch, across devices,
  # not per device: the running averages match the single-device ones.
  for a, b in zip(jax.tree.leaves(states1[1].model_state),
                  jax.tree.leaves(states8[1].model_state)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  # The 8-way program reduces across devices; the 1-device one cannot.
  assert 'all-reduce' in hlo8
  assert 'all-reduce' not in hlo1
