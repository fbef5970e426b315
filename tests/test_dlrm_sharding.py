"""DLRM: model structure, and tables sharded over 8 simulated devices.

The sharded step (row and table layouts, with and without replicated hot
rows) must give the single-device step's loss and updated tables, the lookup
must equal a plain gather, and the compiled step must not move a table-sized
array through any collective.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf import config as config_lib
from jaxperf import optim
from jaxperf.errors import ConfigError
from jaxperf.models import dlrm as dlrm_model
from jaxperf.sharding import embedding as emb_lib
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads.base import new_rng
from jaxperf.workloads.dlrm import DLRM

# 26 tables: big ones (split over devices), small ones (wholly hot with
# hot rows on), one of 3 rows.
SIZES = [9000, 300, 120, 40, 2500, 3, 60, 150, 7, 8000, 900, 700, 10, 200,
         1200, 155, 4, 976, 14, 7000, 5000, 6000, 585, 130, 108, 36]


def _workload(mesh, **overrides):
  values = {'table_sizes': SIZES, 'max_ind_range': 0, 'embed_dim': 8,
            'bottom_mlp': [16, 8], 'top_mlp': [16, 1],
            'global_batch_size': 64, 'eval_batch_size': 64,
            'base_learning_rate': 0.5, 'warmup_steps': 0,
            'decay_start_step': 0, 'decay_steps': 0}
  values.update(overrides)
  cfg = config_lib.load_config('dlrm', 'smoke', overrides=values)
  w = DLRM(cfg)
  w.check_mesh(mesh)
  w.setup(10_000)
  return w


def _mesh(n):
  return mesh_lib.make_mesh(f'data={n}', jax.devices()[:n])


def _state(w, mesh, seed=0):
  rng = new_rng(seed)
  abstract = jax.eval_shape(w.init_state, rng)
  sh = w.state_sharding(abstract, mesh)
  return jax.jit(w.init_state, out_shardings=sh)(rng), sh


def _put(w, mesh, batch):
  part = w.batch_partition(mesh, train=True)
  return {k: jax.device_put(v, jax.NamedSharding(mesh, part[k]))
          for k, v in batch.items()}


def _step(w, mesh, tables, dense, batch):
  """One train step from the given host tables and dense params."""
  state, sh = _state(w, mesh)
  host = w.emb.from_tables(tables)
  emb = {k: jax.device_put(v, sh.params['embedding'][k])
         for k, v in host.items()}
  state = state.replace(params={'dense': dense, 'embedding': emb})
  new, metrics = jax.jit(w.train_step)(state, _put(w, mesh, batch))
  return float(metrics['loss']), w.tables(new), new.params['dense']


def test_parameter_count_of_the_full_model_from_eval_shape():
  """The reference model: 24,034,227,072 embedding and 2,368,897 MLP
  parameters, from jax.eval_shape of the workload's state (nothing is
  allocated)."""
  cfg = config_lib.load_config('dlrm')
  w = DLRM(cfg)
  w.check_mesh(_mesh(8))
  w.setup(4_195_197_692)
  abstract = jax.eval_shape(w.init_state, new_rng(0))
  dense = sum(int(np.prod(x.shape))
              for x in jax.tree.leaves(abstract.params['dense']))
  tables = abstract.params['embedding']['tables']
  assert dense == 2_368_897 == dlrm_model.mlp_param_count(w.model_cfg)
  stored = tables.shape[0] - w.emb.layout.padding_rows
  assert stored == 187_767_399 and tables.shape[1] == 128
  assert stored * 128 + dense == 24_036_595_969 == dlrm_model.param_count(
      dlrm_model.MLPERF)
  assert 'hot' not in abstract.params['embedding']
  # Bottom 13-512-256-128; top 479-1024-1024-512-256-1.
  kernels = {f'{m}/{k}': v['kernel'].shape
             for m in ('bottom_mlp', 'top_mlp')
             for k, v in abstract.params['dense'][m].items()}
  assert kernels == {
      'bottom_mlp/dense_0': (13, 512), 'bottom_mlp/dense_1': (512, 256),
      'bottom_mlp/dense_2': (256, 128), 'top_mlp/dense_0': (479, 1024),
      'top_mlp/dense_1': (1024, 1024), 'top_mlp/dense_2': (1024, 512),
      'top_mlp/dense_3': (512, 256), 'top_mlp/dense_4': (256, 1)}
  assert w.initialized_tensors(None) == [
      'embeddings', 'bottom_mlp_dense1', 'bottom_mlp_dense2',
      'bottom_mlp_dense3', 'top_mlp_dense1', 'top_mlp_dense2',
      'top_mlp_dense3', 'top_mlp_dense4', 'top_mlp_dense5']


def test_interaction_pairs_are_the_references():
  """The reference's order: for i in range(n) for j in range(i)."""
  i, j = dlrm_model.interaction_indices(27)
  want = [(a, b) for a in range(27) for b in range(a)]
  assert list(zip(i.tolist(), j.tolist())) == want
  x = jax.random.normal(jax.random.key(0), (3, 4))
  e = jax.random.normal(jax.random.key(1), (3, 2, 4))
  r = dlrm_model.dot_interaction(x, e)
  t = np.concatenate([np.asarray(x)[:, None], np.asarray(e)], 1)
  np.testing.assert_allclose(
      r, np.concatenate([x, np.stack([t[:, 1] @ t[:, 0].T, t[:, 2] @ t[:, 0].T,
                                      t[:, 2] @ t[:, 1].T], -1).diagonal(
                                          axis1=0, axis2=1).T], 1), rtol=1e-6)


def test_table_init_follows_the_reference_bounds():
  mesh = _mesh(8)
  w = _workload(mesh)
  state, _ = _state(w, mesh)
  tables = w.tables(state)
  for n, t in zip(SIZES, tables):
    bound = np.sqrt(1.0 / n)
    assert t.shape == (n, 8)
    assert np.all(np.abs(t) <= bound)
    if n >= 1000:   # uniform: std = bound / sqrt(3)
      assert abs(t.std() - bound / np.sqrt(3)) < 0.05 * bound
  # Padding rows stay zero and the values do not depend on the mesh.
  state1, _ = _state(_workload(_mesh(1)), _mesh(1))
  for a, b in zip(tables, _workload(_mesh(1)).tables(state1)):
    np.testing.assert_array_equal(a, b)


def test_layouts():
  row = emb_lib.make_layout([10, 7, 3], 4, 'row')
  assert row.offsets == (0, 10, 17) and row.rows_per_shard == 256
  assert row.padding_rows == 1004           # the stack is 1024 rows
  assert emb_lib.make_layout([10, 7, 3], 1, 'row').total_rows == 1024
  assert emb_lib.make_layout([10, 7, 3], 6, 'row').total_rows == 3072
  table = emb_lib.make_layout([10, 7, 3, 2, 9], 2, 'table')
  # Largest first onto the least loaded device: 10 -> 0, 9 -> 1, 7 -> 1,
  # 3 -> 0, 2 -> 0; each block padded to the larger load (16).
  assert table.owners == (0, 1, 0, 0, 1) and table.rows_per_shard == 16
  assert table.offsets == (0, 16, 10, 13, 23)
  with pytest.raises(ValueError, match='layout'):
    emb_lib.make_layout([3], 2, 'column')
  crit = emb_lib.make_layout(dlrm_model.CRITEO_1TB_TABLE_SIZES, 8, 'row')
  assert crit.rows_per_shard == 23_470_976   # 187,767,399 -> x1024


@pytest.mark.parametrize('n', [1, 8])
@pytest.mark.parametrize('mode', ['row', 'table'])
@pytest.mark.parametrize('hot', [0, 400])
def test_lookup_equals_a_gather(n, mode, hot):
  mesh = _mesh(n)
  w = _workload(mesh, embedding_layout=mode, hot_rows=hot)
  state, _ = _state(w, mesh)
  batch = w.bench_batch(64, 3)
  got = jax.jit(lambda p, s: w.emb.lookup(p, s))(
      state.params['embedding'], _put(w, mesh, batch)['sparse'])
  tables = w.tables(state)
  want = np.stack([tables[t][batch['sparse'][:, t]]
                   for t in range(len(SIZES))], 1)
  np.testing.assert_array_equal(np.asarray(got), want)
  if hot:
    assert w.emb.hot_ids.size == 400
    assert 5 in w.emb.replicated_tables       # the 3-row table is all hot


def test_sharded_hybrid_and_single_device_steps_agree():
  """Same tables and dense weights in; same loss, tables and weights out,
  for 1 device, 8 devices row-wise and table-wise, each with and without hot
  rows (repeated indices in the batch included)."""
  rng = np.random.default_rng(0)
  tables = [rng.uniform(-0.3, 0.3, (n, 8)).astype(np.float32) for n in SIZES]
  w1 = _workload(_mesh(1))
  batch = w1.bench_batch(64, 5)
  batch['sparse'][:8, 0] = 17                    # the same row 8 times
  dense = w1._dense_init(jax.random.key(7))
  ref_loss, ref_tables, ref_dense = _step(w1, _mesh(1), tables, dense, batch)
  touched = [np.unique(batch['sparse'][:, t]) for t in range(len(SIZES))]
  changed = sum(int(np.any(a[r] != b[r])) for a, b, r in
                zip(ref_tables, tables, touched))
  assert changed == len(SIZES)                   # every table was updated
  for t, (a, b) in enumerate(zip(ref_tables, tables)):
    keep = np.setdiff1d(np.arange(SIZES[t]), touched[t])
    np.testing.assert_array_equal(a[keep], b[keep])   # and nothing else
  for mode in ('row', 'table'):
    for hot in (0, 400):
      mesh = _mesh(8)
      w = _workload(mesh, embedding_layout=mode, hot_rows=hot)
      loss, new_tables, new_dense = _step(w, mesh, tables, dense, batch)
      assert loss == pytest.approx(ref_loss, rel=1e-6), (mode, hot)
      for a, b in zip(new_tables, ref_tables):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      for a, b in zip(jax.tree.leaves(new_dense), jax.tree.leaves(ref_dense)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sparse_update_equals_dense_sgd():
  """The scatter-add update is SGD with the dense gradient of the tables."""
  rng = np.random.default_rng(1)
  tables = [rng.uniform(-0.3, 0.3, (n, 8)).astype(np.float32) for n in SIZES]
  mesh = _mesh(8)
  w = _workload(mesh)
  batch = w.bench_batch(64, 2)
  dense = w._dense_init(jax.random.key(3))
  _, new_tables, _ = _step(w, mesh, tables, dense, batch)
  from jaxperf.workloads.dlrm import bce_with_logits

  def loss(ts):
    e = jnp.stack([t[batch['sparse'][:, i]] for i, t in enumerate(ts)], 1)
    z = w.model.apply({'params': dense}, batch['dense'], e)
    return jnp.mean(bce_with_logits(z, batch['label']))
  grads = jax.grad(loss)([jnp.asarray(t) for t in tables])
  for new, old, g in zip(new_tables, tables, grads):
    np.testing.assert_allclose(new, old - 0.5 * np.asarray(g), rtol=1e-5,
                               atol=1e-7)


_COLLECTIVE = re.compile(
    r'=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|'
    r'collective-permute)(?:-start)?\(')
_SHAPE = re.compile(r'[a-z]+[0-9]*\[([0-9,]*)\]')


def _collectives(hlo: str) -> dict[str, int]:
  """Collective kind -> the most elements one of its results holds."""
  out: dict[str, int] = {}
  for line in hlo.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    sizes = [int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
             for dims in _SHAPE.findall(m.group(1))]
    out[m.group(2)] = max(out.get(m.group(2), 0), max(sizes, default=0))
  return out


@pytest.mark.parametrize('mode,hot', [('row', 0), ('table', 0), ('row', 400)])
def test_no_collective_moves_a_table(mode, hot):
  """Compiled train step on 8 devices: the collectives carry indices, rows
  of the batch, dense gradients and the hot rows; none is as large as a
  device's block of table rows."""
  mesh = _mesh(8)
  w = _workload(mesh, embedding_layout=mode, hot_rows=hot, embed_dim=16,
                bottom_mlp=[16, 16],
                table_sizes=[s * 4 for s in SIZES])
  rng = new_rng(0)
  abstract = jax.eval_shape(w.init_state, rng)
  sh = w.state_sharding(abstract, mesh)
  astate = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=s), abstract, sh)
  spec = w.batch_spec(64, train=True)
  part = w.batch_partition(mesh, train=True)
  abatch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.NamedSharding(
      mesh, part[k])) for k, v in spec.items()}
  hlo = jax.jit(w.train_step, donate_argnums=0).lower(
      astate, abatch).compile().as_text()
  sizes = _collectives(hlo)
  kinds = set(sizes)
  assert kinds, 'no collectives found: the step is not partitioned'
  block = w.emb.layout.rows_per_shard * 16
  assert max(sizes.values()) < block / 4, (sizes, block)
  if mode == 'row':
    assert 'reduce-scatter' in kinds or 'all-reduce' in kinds
  else:
    assert 'all-to-all' in kinds


def test_learning_rate_schedule_is_the_references():
  """optim.dlrm_lr_schedule against the reference's LRPolicyScheduler logic,
  step by step (its step count starts at 1 and rates freeze between phases)."""
  def reference(base, warm, start, n, steps):
    out, last, count = [], None, 1
    for _ in range(steps):
      if count < warm:
        last = base * (1.0 - (warm - count) / warm)
        lr = last
      elif start <= count < start + n:
        last = max(1e-7, base * ((n - (count - start)) / n) ** 2)
        lr = last
      else:
        lr = last if n > 0 else base
      out.append(lr)
      count += 1
    return np.asarray(out)

  for args in ((24.0, 10, 25, 12), (1.0, 0, 0, 0), (3.0, 5, 5, 4)):
    sched = optim.dlrm_lr_schedule(*args)
    got = np.asarray([float(sched(t)) for t in range(45)])
    np.testing.assert_allclose(got, reference(*args, 45), rtol=1e-6)
  with pytest.raises(ValueError, match='after the warmup'):
    optim.dlrm_lr_schedule(1.0, 10, 5, 3)


def test_bad_config_and_mesh():
  with pytest.raises(ConfigError, match='multiple of 8'):
    _workload(_mesh(8), global_batch_size=60)
  with pytest.raises(ConfigError, match='embedding_layout'):
    _workload(_mesh(1), embedding_layout='column')
  with pytest.raises(ConfigError, match='poly_power'):
    _workload(_mesh(1), poly_power=1)
  with pytest.raises(ConfigError, match='embed_dim'):
    _workload(_mesh(1), bottom_mlp=[16, 4])
