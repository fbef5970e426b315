"""DLRM against the MLPerf reference's structure: weights, init and parity.

The reference is jaxperf.torch_models.dlrm (DLRM_Net's modules, tensor
names and initialisation; EmbeddingBag tables with sparse gradients, BCELoss
on the sigmoid output). Its weights go into models/dlrm.py through
jaxperf.interop; the JAX side looks rows up with jnp.take and takes the same
binary cross-entropy from the logits.

In float32 a pre-activation within rounding of zero can fall on the other
side of a ReLU in one framework, which changes that sample's gradient
outright (python -m jaxperf.compare --model dlrm shows it at batch 2048).
The float32 tests therefore first check that the two frameworks' ReLU
inputs have the same signs on their batch; then probabilities agree to
~2e-7 (max_rel) and every gradient to ~1e-6 (norm_rel). In float64 the gradients
agree to ~3e-8, the float32 logits that DenseArch returns being the limit.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip(
    'torch', reason="the parity tests need the 'compare' extra (PyTorch); "
    "pip install -e '.[test]' installs it")

from jaxperf import compare, interop  # noqa: E402
from jaxperf.models import dlrm  # noqa: E402
from jaxperf.torch_models import dlrm as torch_dlrm  # noqa: E402

# 26 tables of 3..203 rows: the small ones repeat rows within a batch.
SMALL_TABLES = tuple(3 + 8 * i for i in range(26))
SMALL = dict(embed_dim=16, bottom=(64, 32, 16), top=(64, 32, 1))
# The MLPerf MLP widths, with tiny tables.
FULL_TABLES = tuple(2 + i for i in range(26))
FULL = dict(embed_dim=128, bottom=(512, 256, 128),
            top=(1024, 1024, 512, 256, 1))


def x64():
  """float64 in JAX for the duration of a with-block."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def config(table_sizes, embed_dim, bottom, top) -> dlrm.DLRMConfig:
  return dlrm.DLRMConfig(table_sizes=tuple(table_sizes), embed_dim=embed_dim,
                         bottom_mlp=tuple(bottom), top_mlp=tuple(top))


def reference_model(table_sizes, seed=0, **sizes) -> torch.nn.Module:
  torch.manual_seed(seed)
  return torch_dlrm.DLRM(table_sizes, **sizes)


def jax_shapes(cfg: dlrm.DLRMConfig):
  """jax.eval_shape of the variables from_torch returns for `cfg`."""
  def init():
    params = dlrm.DenseArch(cfg).init(
        jax.random.key(0), jnp.zeros((1, cfg.num_dense)),
        jnp.zeros((1, cfg.num_tables, cfg.embed_dim)))['params']
    return {'params': params, 'tables': dlrm.init_tables(jax.random.key(1),
                                                         cfg)}
  return jax.eval_shape(init)


def relu_inputs(model) -> tuple[list[str], list[torch.nn.Module]]:
  """The Linear layers that a ReLU follows, bottom MLP first, with the
  Flax names of their Dense modules."""
  names, layers = [], []
  for prefix, mlp in (('bottom_mlp', model.bot_l), ('top_mlp', model.top_l)):
    for k, (layer, act) in enumerate(zip(mlp[::2], mlp[1::2])):
      if isinstance(act, torch.nn.ReLU):
        names.append(f'{prefix}/dense_{k}')
        layers.append(layer)
  return names, layers


def run_both(model, cfg, batch, dtype=np.float32):
  """Probabilities, loss and gradients in both frameworks.

  Returns (jax, torch) dicts: probs [B], loss, params (Flax tree of MLP
  gradients), tables (dense [rows, D] gradient per table: JAX's of the
  table arrays, PyTorch's sparse gradient made dense) and relu_inputs (the
  input of every ReLU, in relu_inputs' order).
  """
  variables = interop.from_torch('dlrm', model.state_dict(),
                                 expected=jax_shapes(cfg))
  variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
  jmodel = dlrm.DenseArch(cfg, dtype=dtype)
  dense = jnp.asarray(batch['dense'], dtype)
  sparse = jnp.asarray(batch['sparse'])
  labels = jnp.asarray(batch['labels'], dtype)

  def loss_fn(params, tables):
    emb = jnp.stack([jnp.take(t, sparse[:, i], axis=0)
                     for i, t in enumerate(tables)], axis=1)
    logits, state = jmodel.apply({'params': params}, dense, emb,
                                 capture_intermediates=True)
    logits = logits.astype(dtype)
    loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    return loss, (logits, state['intermediates'])

  (loss, (logits, inter)), (g_params, g_tables) = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(variables['params'],
                                              variables['tables'])
  names, layers = relu_inputs(model)
  ours = {'probs': np.asarray(jax.nn.sigmoid(logits)), 'loss': float(loss),
          'params': g_params, 'tables': [np.asarray(g) for g in g_tables],
          'relu_inputs': [np.asarray(inter[m][d]['__call__'][0]) for m, d in
                          (n.split('/') for n in names)]}

  tm = copy.deepcopy(model)
  if dtype == np.float64:
    tm = tm.double()
  found = []
  hooks = [layer.register_forward_hook(
      lambda mod, inp, out: found.append(out.detach().numpy().copy()))
           for layer in relu_inputs(tm)[1]]
  probs = tm(torch.from_numpy(np.asarray(batch['dense'], dtype)),
             torch.from_numpy(batch['sparse'].astype(np.int64)))
  for h in hooks:
    h.remove()
  t_loss = torch_dlrm.bce_loss(probs, torch.from_numpy(
      np.asarray(batch['labels'], dtype)))
  t_loss.backward()
  grads = {k: (v.grad if k.startswith(('bot_l', 'top_l')) else v.detach())
           for k, v in tm.named_parameters()}
  tables = []
  for emb in tm.emb_l:
    assert emb.weight.grad.is_sparse == emb.sparse
    tables.append(emb.weight.grad.to_dense().numpy())
  theirs = {'probs': probs.detach().numpy(), 'loss': float(t_loss.detach()),
            'params': interop.from_torch('dlrm', grads)['params'],
            'tables': tables, 'relu_inputs': found}
  return ours, theirs


def rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def relu_flips(ours, theirs) -> int:
  """ReLU inputs that the two forwards put on either side of zero (each
  changes that sample's gradient outright)."""
  assert [a.shape for a in ours['relu_inputs']] == [
      a.shape for a in theirs['relu_inputs']]
  return sum(int(np.sum((a > 0) != (b > 0))) for a, b in
             zip(ours['relu_inputs'], theirs['relu_inputs']))


def assert_agree(ours, theirs, batch, *, num_tensors, probs_tol, grad_tol):
  """Probabilities and loss to probs_tol (relative), the gradient of each
  of the num_tensors MLP tensors and of each table's touched rows to
  grad_tol (norm_rel); untouched rows have no gradient in either."""
  err = np.abs(ours['probs'] - theirs['probs']).max()
  assert err / np.abs(theirs['probs']).max() < probs_tol, err
  assert abs(ours['loss'] - theirs['loss']) < probs_tol * theirs['loss']
  names = []
  assert len(jax.tree.leaves(theirs['params'])) == num_tensors
  for (path, g), t in zip(
      jax.tree_util.tree_flatten_with_path(ours['params'])[0],
      jax.tree.leaves(theirs['params'])):
    name = '/'.join(k.key for k in path)
    names.append(name)
    assert rel(g, t) < grad_tol, (name, rel(g, t))
  assert len(names) == num_tensors
  for i, (g, t) in enumerate(zip(ours['tables'], theirs['tables'])):
    touched = np.unique(batch['sparse'][:, i])
    assert rel(g[touched], t[touched]) < grad_tol, (i, rel(g, t))
    untouched = np.setdiff1d(np.arange(g.shape[0]), touched)
    assert not g[untouched].any() and not t[untouched].any(), i


# ---------------------------------------------------------------- structure


def test_state_dict_names_and_shapes_follow_the_reference():
  model = reference_model(FULL_TABLES, **FULL)
  sd = model.state_dict()
  names = ([f'emb_l.{t}.weight' for t in range(26)]
           + [f'bot_l.{i}.{w}' for i in (0, 2, 4) for w in ('weight', 'bias')]
           + [f'top_l.{i}.{w}' for i in (0, 2, 4, 6, 8)
              for w in ('weight', 'bias')])
  assert list(sd) == names
  assert tuple(sd['emb_l.7.weight'].shape) == (9, 128)
  assert tuple(sd['bot_l.0.weight'].shape) == (512, 13)
  assert tuple(sd['top_l.0.weight'].shape) == (1024, 479)
  assert tuple(sd['top_l.8.weight'].shape) == (1, 256)
  assert [type(m).__name__ for m in model.top_l][1::2] == ['ReLU'] * 4 + [
      'Sigmoid']
  assert all(isinstance(m, torch.nn.ReLU) for m in model.bot_l[1::2])
  assert all(e.mode == 'sum' and e.sparse for e in model.emb_l)
  mlp = sum(v.numel() for k, v in sd.items() if not k.startswith('emb_l'))
  assert mlp == dlrm.mlp_param_count(dlrm.MLPERF) == 2_368_897
  assert mlp == sum(np.prod(a.shape) for a in jax.tree.leaves(
      jax_shapes(config(FULL_TABLES, **FULL))['params']))
  with pytest.raises(ValueError, match='must end in embed_dim'):
    torch_dlrm.DLRM(FULL_TABLES, embed_dim=64)


def test_interaction_pairs_are_the_lower_triangle_row_by_row():
  li, lj = torch_dlrm.interaction_pairs(27)
  i, j = dlrm.interaction_indices(27)
  assert li == list(i) and lj == list(j) and len(li) == 351
  assert list(zip(li, lj))[:4] == [(1, 0), (2, 0), (2, 1), (3, 0)]


def test_from_torch_builds_the_dense_arch_tree_and_round_trips_exactly():
  model = reference_model(SMALL_TABLES, seed=1, **SMALL)
  sd = model.state_dict()
  cfg = config(SMALL_TABLES, **SMALL)
  variables = interop.from_torch('dlrm', sd, expected=jax_shapes(cfg))
  assert set(variables) == {'params', 'tables'}
  assert jax.tree.structure(variables['params']) == jax.tree.structure(
      jax.tree.map(lambda x: 0, dict(jax_shapes(cfg)['params'])))
  assert isinstance(variables['tables'], list)
  assert [t.shape for t in variables['tables']] == [
      (n, 16) for n in SMALL_TABLES]
  assert all(isinstance(t, np.ndarray) for t in variables['tables'])
  # Linear (out, in) -> Flax kernel (in, out).
  np.testing.assert_array_equal(
      variables['params']['top_mlp']['dense_1']['kernel'],
      sd['top_l.2.weight'].numpy().T)
  np.testing.assert_array_equal(variables['tables'][25],
                                sd['emb_l.25.weight'].numpy())
  back = interop.to_torch('dlrm', variables)
  assert list(back) == list(sd)
  for k, v in sd.items():
    assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
  fresh = torch_dlrm.DLRM(SMALL_TABLES, **SMALL)
  fresh.load_state_dict(back, strict=True)
  # jax arrays (read-only) convert as well.
  again = interop.to_torch('dlrm', jax.tree.map(jnp.asarray, variables))
  assert all(torch.equal(again[k], v) for k, v in sd.items())


def _without(sd, name):
  return {k: v for k, v in sd.items() if k != name}


@pytest.mark.parametrize('edit, message', [
    (lambda sd: _without(sd, 'emb_l.3.weight'),
     r'missing 1 tensor\(s\): emb_l.3.weight'),
    (lambda sd: _without(sd, 'top_l.2.bias'),
     r'missing 1 tensor\(s\): top_l.2.bias'),
    (lambda sd: {**sd, 'bot_l.1.weight': torch.zeros(3)},
     r'unexpected 1 tensor\(s\): bot_l.1.weight'),
    (lambda sd: {**sd, 'bot_l.2.weight': torch.zeros(31, 64)},
     r'tensor bot_l.2.weight has shape \(31, 64\) but the other tensors '
     r'imply \(32, 64\)'),
    (lambda sd: {**sd, 'bot_l.2.bias': torch.zeros(31)},
     r'tensor bot_l.2.bias has shape \(31,\) .* imply \(32,\)'),
    (lambda sd: {**sd, 'emb_l.5.weight': torch.zeros(43, 8)},
     r'tensor emb_l.5.weight has shape \(43, 8\) .* imply \(43, 16\)'),
    (lambda sd: {**sd, 'top_l.0.weight': torch.zeros(64, 300)},
     r'tensor top_l.0.weight has shape \(64, 300\) .* imply \(64, 367\)'),
    (lambda sd: {**sd, 'bot_l.4.weight': torch.zeros(8, 32),
                 'bot_l.4.bias': torch.zeros(8)},
     r'tensor bot_l.4.weight has shape \(8, 32\) .* imply \(16, 32\)'),
    (lambda sd: {**sd, 'emb_l.0.weight': torch.zeros(3)},
     r'tensor emb_l.0.weight has rank 1, expected 2'),
])
def test_bad_state_dicts_are_errors_that_name_the_tensor(edit, message):
  sd = dict(reference_model(SMALL_TABLES, **SMALL).state_dict())
  with pytest.raises(interop.InteropError, match=message):
    interop.from_torch('dlrm', edit(sd))


def test_shapes_are_checked_against_the_model_and_to_torch_checks_itself():
  sd = reference_model(SMALL_TABLES, **SMALL).state_dict()
  bigger = config(tuple(n + 1 for n in SMALL_TABLES), **SMALL)
  with pytest.raises(interop.InteropError,
                     match=r'tensor emb_l.0.weight has shape \(3, 16\) but '
                           r'the model expects \(4, 16\)'):
    interop.from_torch('dlrm', sd, expected=jax_shapes(bigger))
  with pytest.raises(interop.InteropError, match='unknown option'):
    interop.from_torch('dlrm', sd, num_heads=2)
  variables = interop.from_torch('dlrm', sd)
  # A table too few: the top MLP's input no longer fits the interaction.
  with pytest.raises(interop.InteropError,
                     match=r'tensor top_l.0.weight of shape \(64, 367\) but '
                           r'the other variables imply \(64, 341\)'):
    interop.to_torch('dlrm', {**variables,
                              'tables': variables['tables'][:-1]})
  with pytest.raises(interop.InteropError, match='have no tables/0'):
    interop.to_torch('dlrm', {'params': variables['params']})
  extra = {**variables, 'params': {**variables['params'], 'head': {
      'kernel': np.zeros((2, 2))}}}
  with pytest.raises(interop.InteropError, match='params/head/kernel'):
    interop.to_torch('dlrm', extra)


# ---------------------------------------------------------------- init


def _check_linear(w, n, m, tol=0.03):
  """A kernel [n, m] (or weight [m, n]) of N(0, sqrt(2 / (m + n)))."""
  w = np.asarray(w, np.float64)
  std = np.sqrt(2.0 / (m + n))
  assert abs(w.std() / std - 1) < tol, (w.shape, w.std(), std)
  assert abs(w.mean()) < 5 * std / np.sqrt(w.size), (w.shape, w.mean())


def test_jax_and_reference_initialisation_follow_the_reference_statistics():
  cfg = config(FULL_TABLES, **FULL)
  params = jax.jit(dlrm.DenseArch(cfg).init)(
      jax.random.key(3), jnp.zeros((1, 13)), jnp.zeros((1, 26, 128)))['params']
  assert sum(a.size for a in jax.tree.leaves(params)) == (
      dlrm.mlp_param_count(cfg))
  sd = reference_model(FULL_TABLES, seed=3, **FULL).state_dict()
  widths = {'bottom_mlp': (13, 512, 256, 128),
            'top_mlp': (479, 1024, 1024, 512, 256, 1)}
  prefixes = {'bottom_mlp': 'bot_l', 'top_mlp': 'top_l'}
  biases = {'jax': [], 'torch': []}
  for mlp, w in widths.items():
    for k, (n, m) in enumerate(zip(w[:-1], w[1:])):
      if n * m >= 100_000:
        _check_linear(params[mlp][f'dense_{k}']['kernel'], n, m)
        _check_linear(sd[f'{prefixes[mlp]}.{2 * k}.weight'].numpy(), n, m)
      # Each bias in units of its std sqrt(1 / m), pooled.
      biases['jax'].append(np.asarray(params[mlp][f'dense_{k}']['bias'])
                           * np.sqrt(m))
      biases['torch'].append(sd[f'{prefixes[mlp]}.{2 * k}.bias'].numpy()
                             * np.sqrt(m))
  for side, b in biases.items():
    b = np.concatenate(b)
    assert b.size == 3713 and abs(b.std() - 1) < 0.05, (side, b.std())
  # Tables: uniform in [-sqrt(1 / n), sqrt(1 / n)), std bound / sqrt(3).
  rows = (1000, 3, 40)
  jtables = dlrm.init_tables(jax.random.key(4), config(rows, **SMALL))
  ttables = [e.weight.detach().numpy() for e in
             reference_model(rows, seed=4, **SMALL).emb_l]
  for side, tables in (('jax', jtables), ('torch', ttables)):
    for n, t in zip(rows, tables):
      bound = np.sqrt(1.0 / n)
      t = np.asarray(t, np.float64)
      assert t.shape == (n, 16)
      assert t.min() >= -bound and t.max() < bound, (side, n)
    big = np.asarray(tables[0], np.float64)
    assert abs(big.std() * np.sqrt(3) / np.sqrt(1e-3) - 1) < 0.02, side
    assert big.max() > 0.99 * np.sqrt(1e-3), side


def test_numpy_generator_draws_in_the_reference_order():
  rows = (5, 7)
  sizes = dict(embed_dim=4, bottom=(6, 4), top=(3, 1))
  model = torch_dlrm.DLRM(rows, init_rng=np.random.RandomState(123), **sizes)
  rng = np.random.RandomState(123)
  want = {}
  for t, n in enumerate(rows):       # create_emb, then create_mlp twice
    b = np.sqrt(1 / n)
    want[f'emb_l.{t}.weight'] = rng.uniform(-b, b, (n, 4))
  for prefix, w in (('bot_l', (13, 6, 4)), ('top_l', (4 + 3, 3, 1))):
    for k, (n, m) in enumerate(zip(w[:-1], w[1:])):
      want[f'{prefix}.{2 * k}.weight'] = rng.normal(0, np.sqrt(2 / (m + n)),
                                                    (m, n))
      want[f'{prefix}.{2 * k}.bias'] = rng.normal(0, np.sqrt(1 / m), m)
  sd = model.state_dict()
  assert list(sd) == list(want)
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k].numpy(), v.astype(np.float32),
                                  err_msg=k)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize('tables, sizes, batch_size', [
    (SMALL_TABLES, SMALL, 64), (FULL_TABLES, FULL, 24)])
def test_float32_outputs_loss_and_gradients_agree(tables, sizes, batch_size):
  model = reference_model(tables, **sizes)
  batch = compare.dlrm_batch(batch=batch_size, table_sizes=tables, seed=1)
  ours, theirs = run_both(model, config(tables, **sizes), batch)
  flips = relu_flips(ours, theirs)
  assert flips == 0, (
      f'{flips} ReLU input(s) so close to zero that float32 rounding puts '
      f'them on either side in the two frameworks: pick another seed')
  assert_agree(ours, theirs, batch, probs_tol=1e-6, grad_tol=1e-5,
               num_tensors=2 * (len(sizes['bottom']) + len(sizes['top'])))
  # Repeated rows in one batch: their gradients add up in both.
  assert len(np.unique(batch['sparse'][:, 0])) < batch_size


def test_float64_outputs_loss_and_gradients_agree():
  tables = SMALL_TABLES[:6]      # fewer tables: a shorter compile
  model = reference_model(tables, seed=2, **SMALL)
  batch = compare.dlrm_batch(batch=256, table_sizes=tables, seed=2)
  with x64():
    ours, theirs = run_both(model, config(tables, **SMALL), batch,
                            np.float64)
  # DenseArch returns float32 logits: that rounding (~3e-8) is the limit.
  assert_agree(ours, theirs, batch, probs_tol=2e-7, grad_tol=2e-7,
               num_tensors=12)


def test_dense_table_gradients_equal_the_sparse_ones():
  batch = compare.dlrm_batch(batch=32, table_sizes=SMALL_TABLES, seed=3)
  grads = []
  for sparse in (True, False):
    model = reference_model(SMALL_TABLES, seed=3, sparse=sparse, **SMALL)
    torch_dlrm.bce_loss(
        model(torch.from_numpy(batch['dense']),
              torch.from_numpy(batch['sparse'].astype(np.int64))),
        torch.from_numpy(batch['labels'])).backward()
    grads.append([e.weight.grad for e in model.emb_l])
  assert grads[0][0].is_sparse and not grads[1][0].is_sparse
  for s, d in zip(*grads):
    np.testing.assert_allclose(s.to_dense().numpy(), d.numpy(), rtol=1e-6,
                               atol=1e-9)
  assert any(d.abs().sum() > 0 for d in grads[1])


# ---------------------------------------------------------------- compare


def test_compare_cli_reports_parity_and_timing(tmp_path, capsys):
  out = tmp_path / 'dlrm.json'
  tables = (3, 11, 19)
  rc = compare.main(['--model', 'dlrm', '--batch', '64',
                     '--tables', ','.join(map(str, tables)),
                     '--embed-dim', '16', '--warmup', '0', '--repeats', '1',
                     '--json', str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert 'probabilities' in text and 'tables (touched rows)' in text
  r = json.loads(out.read_text())
  assert r['model'] == 'dlrm' and r['batch'] == 64
  assert r['table_sizes'] == list(tables) and r['embed_dim'] == 16
  assert r['bottom_mlp'] == [512, 256, 16]
  assert r['top_mlp'] == [1024, 1024, 512, 256, 1]
  assert r['num_params'] == dlrm.param_count(config(
      tables, 16, (512, 256, 16), (1024, 1024, 512, 256, 1)))
  batch = compare.dlrm_batch(batch=64, table_sizes=tables)
  assert r['touched_rows'] == sum(len(np.unique(batch['sparse'][:, t]))
                                  for t in range(3))
  per_param = r['grads']['per_param']
  assert len(per_param) == 3 + 16 and 'tables/2' in per_param
  assert r['probabilities']['max_rel'] < 1e-5
  assert r['loss']['max_rel'] < 1e-5
  assert r['grads']['mlp_median_norm_rel'] < 1e-2
  assert r['grads']['tables_median_norm_rel'] < 1e-2
  assert r['jax']['step_time_s'] > 0 and r['torch']['step_time_s'] > 0
  assert r['lr'] == compare.DLRM_LR


def test_compare_table_flag():
  capped = compare.dlrm_table_sizes(1000)
  assert len(capped) == 26 and max(capped) == 1000
  assert capped == tuple(min(n, 1000) for n in dlrm.CRITEO_1TB_TABLE_SIZES)
  assert compare.dlrm_table_sizes('1000') == capped
  assert compare.dlrm_table_sizes('criteo') == dlrm.CRITEO_1TB_TABLE_SIZES
  assert compare.dlrm_table_sizes('5,6,7') == (5, 6, 7)
  assert sum(compare.dlrm_table_sizes()) == 921_165


@pytest.mark.parametrize('argv, message', [
    (['--model', 'resnet50', '--tables', '100'],
     '--tables: only for --model dlrm'),
    (['--model', 'bert', '--embed-dim', '16'],
     '--embed-dim: only for --model dlrm'),
    (['--model', 'dlrm', '--image-size', '64'],
     '--image-size: not for --model dlrm'),
    (['--model', 'dlrm', '--tables', '0'], 'the row cap must be >= 1'),
    (['--model', 'dlrm', '--tables', '4,x'], 'comma-separated integers'),
    (['--model', 'dlrm', '--seq-len', '16'], '--seq-len: only for --model '
     'bert'),
])
def test_compare_cli_rejects_bad_dlrm_flags(argv, message, capsys):
  assert compare.main([*argv, '--no-timing']) == 2
  assert message in capsys.readouterr().err
