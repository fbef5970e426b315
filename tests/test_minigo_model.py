"""MiniGo dual network: size, TF names, and parity with the PyTorch version."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason="the parity tests need the 'compare' extra (PyTorch); "
    "pip install -e '.[test]' installs it")

from jaxperf import losses  # noqa: E402
from jaxperf.models import minigo  # noqa: E402
from jaxperf.torch_models import minigo as torch_minigo  # noqa: E402

SMALL = dict(board_size=9, input_planes=13, conv_width=32, fc_width=16,
             trunk_layers=3)
BATCH = 4


def _count(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def test_param_count_at_mlperf_19x19_matches_formula_and_torch():
  model = minigo.MiniGo()
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 19, 19, 13), bool)))
  n = _count(shapes['params'])
  assert n == minigo.reference_param_count() == 736_671
  ref = torch_minigo.MiniGo()
  assert sum(p.numel() for p in ref.parameters()) == n
  # 15 BNs with running statistics: 13 trunk (64) and the heads' (2, 1).
  assert _count(shapes['batch_stats']) == 2 * (13 * 64 + 2 + 1)


@pytest.mark.parametrize('kw', [SMALL, dict(board_size=9, trunk_layers=9),
                                dict(conv_width=256, fc_width=256,
                                     trunk_layers=19)])
def test_param_count_formula_other_sizes(kw):
  model = minigo.MiniGo(**kw)
  n = kw.get('board_size', 19)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, n, n, 13))))
  assert _count(shapes['params']) == minigo.reference_param_count(**kw)


def _yaml_tensor_names():
  mlperf_logging = pytest.importorskip('mlperf_logging')
  path = os.path.join(os.path.dirname(mlperf_logging.__file__),
                      'compliance_checker', 'training_2.1.0',
                      'closed_minigo.yaml')
  if not os.path.exists(path):
    pytest.skip('closed_minigo.yaml is not in this mlperf_logging')
  names = []
  with open(path) as f:
    for line in f:
      s = line.strip().lstrip('#').strip()
      if s.startswith('"') and s.rstrip(',').endswith('"'):
        names.append(s.rstrip(',').strip('"'))
  return names


def test_checker_tensor_names_are_the_compliance_list():
  names = minigo.checker_tensor_names(6)
  assert names == _yaml_tensor_names()
  # 13 trunk convs with a BN (gamma, beta), 2 head convs, 3 denses.
  assert len(names) == 13 * 3 + 2 + 3 * 2 + 1
  assert len(set(names)) == len(names)


def test_checker_names_cover_every_trainable_variable():
  model = minigo.MiniGo()
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 19, 19, 13))))
  tf_names = minigo.tf_variable_names(shapes)
  trainable = sorted(v for k, v in tf_names.items() if k[0] == 'params')
  assert trainable == sorted(minigo.checker_tensor_names(6)[:-1])
  n_conv = sum(1 for k in shapes['params'] if k.endswith(('conv', 'conv1',
                                                          'conv2')))
  assert n_conv == 2 * 6 + 3
  # The torch module is registered under the same TF layer names.
  ref_layers = {k.rsplit('.', 1)[0] for k in torch_minigo.MiniGo().state_dict()}
  assert ref_layers == {v.rsplit('/', 1)[0] for v in tf_names.values()}


def _setup(seed: int = 0):
  """Flax model and variables (non-trivial running stats), torch copy."""
  model = minigo.MiniGo(**SMALL)
  n, c = SMALL['board_size'], SMALL['input_planes']
  variables = model.init(jax.random.key(seed), jnp.zeros((1, n, n, c)))
  rng = np.random.default_rng(seed)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
                       if path[-1].key in ('var', 'scale')
                       else jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
                       if path[-1].key in ('mean', 'bias') else x),
      variables)
  ref = torch_minigo.MiniGo(**SMALL)
  torch_minigo.load_flax_variables(ref, variables)
  x = rng.random((BATCH, n, n, c)) < 0.4
  logits_pi = rng.normal(size=(BATCH, n * n + 1))
  pi = np.exp(logits_pi) / np.exp(logits_pi).sum(-1, keepdims=True)
  z = rng.choice([-1.0, 1.0], size=BATCH)
  return (model, variables, ref, x, pi.astype(np.float32),
          z.astype(np.float32))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def test_weight_round_trip_through_torch():
  _, variables, ref, *_ = _setup()
  back = torch_minigo.flax_variables(ref)
  assert jax.tree.structure(back) == jax.tree.structure(
      jax.tree.map(np.asarray, dict(variables)))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(dict(variables))):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_eval_mode_outputs_match_torch():
  model, variables, ref, x, *_ = _setup()
  logits, value = model.apply(variables, jnp.asarray(x), train=False)
  ref.eval()
  with torch.no_grad():
    t_logits, t_value = ref(_nchw(x))
  assert logits.shape == (BATCH, 82) and value.shape == (BATCH,)
  np.testing.assert_allclose(logits, t_logits.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(value, t_value.numpy(), rtol=1e-4, atol=1e-5)


def test_train_mode_outputs_and_running_stats_match_torch():
  model, variables, ref, x, *_ = _setup(1)
  (logits, value), updates = model.apply(
      variables, jnp.asarray(x), train=True, mutable=['batch_stats'])
  ref.train()
  with torch.no_grad():
    t_logits, t_value = ref(_nchw(x))
  np.testing.assert_allclose(logits, t_logits.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(value, t_value.numpy(), rtol=1e-4, atol=1e-5)
  # Running statistics move toward the batch's, with the unbiased variance.
  got = torch_minigo.flax_variables(ref)['batch_stats']
  for layer, stats in updates['batch_stats'].items():
    for leaf in ('mean', 'var'):
      np.testing.assert_allclose(stats[leaf], got[layer][leaf], rtol=1e-4,
                                 atol=1e-5, err_msg=f'{layer}/{leaf}')
      assert not np.allclose(stats[leaf], variables['batch_stats'][layer][leaf])


def test_loss_gradients_match_torch():
  model, variables, ref, x, pi, z = _setup(2)

  def loss_fn(params):
    (logits, value), _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        jnp.asarray(x), train=True, mutable=['batch_stats'])
    return losses.minigo_losses(params, logits, value, jnp.asarray(pi),
                       jnp.asarray(z))['combined_cost']

  loss, grads = jax.value_and_grad(loss_fn)(variables['params'])
  ref.train()
  t_logits, t_value = ref(_nchw(x))
  t_loss = torch_minigo.reference_loss(
      ref, t_logits, t_value, torch.from_numpy(pi), torch.from_numpy(z))
  t_loss.backward()
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5)
  names = dict(minigo.tf_layer_names(SMALL['trunk_layers']))
  leaf_map = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
  t_params = dict(ref.named_parameters())
  checked = 0
  for layer, leaves in grads.items():
    for leaf, g in leaves.items():
      tg = t_params[f'{names[layer]}.{leaf_map[leaf]}'].grad.numpy()
      g = np.asarray(g)
      if g.ndim == 4:
        tg = tg.transpose(2, 3, 1, 0)
      elif g.ndim == 2:
        tg = tg.T
      rel = np.linalg.norm(g - tg) / max(np.linalg.norm(tg), 1e-12)
      assert rel < 1e-4, (layer, leaf, rel)
      checked += 1
  assert checked == len(t_params) == 7 + 2 * 7 + 2 + 6


def test_l2_term_skips_biases_and_bn_offsets():
  _, variables, *_ = _setup()
  params = variables['params']
  expected = sum(0.5 * float(jnp.sum(jnp.square(v)))
                 for layer in params.values() for k, v in layer.items()
                 if k != 'bias')
  np.testing.assert_allclose(float(losses.minigo_l2_penalty(params)), expected,
                             rtol=1e-6)


def test_bool_input_and_shape_check():
  model = minigo.MiniGo(**SMALL)
  x = jnp.ones((2, 9, 9, 13), bool)
  variables = model.init(jax.random.key(0), x)
  a = model.apply(variables, x)
  b = model.apply(variables, x.astype(jnp.float32))
  np.testing.assert_array_equal(a[0], b[0])
  with pytest.raises(ValueError, match=r'\[B, 9, 9, 13\]'):
    model.apply(variables, jnp.ones((2, 9, 9, 17)))
