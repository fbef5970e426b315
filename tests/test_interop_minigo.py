"""jaxperf.interop for MiniGo: the reference's TF1 checkpoint (as its target
model is shipped) and the PyTorch reference module, against models/minigo.py.

tests/data/minigo_tf1 was written by TensorFlow from the reference's layers
(tests/data/make_minigo_tf1_checkpoint.py), with the outputs TensorFlow
computed on its weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf import interop
from jaxperf.models import minigo
from tests import data_scripts

TF_DIR = data_scripts.DATA / 'minigo_tf1'


MAKER = data_scripts.load('make_minigo_tf1_checkpoint')


def _model(**over) -> minigo.MiniGo:
  kw = dict(board_size=MAKER.BOARD_SIZE, conv_width=MAKER.CONV_WIDTH,
            fc_width=MAKER.FC_WIDTH, trunk_layers=MAKER.TRUNK_LAYERS)
  kw.update(over)
  return minigo.MiniGo(**kw)


def _expected(model: minigo.MiniGo):
  n = model.board_size
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, n, n, model.input_planes)),
      train=False))


def test_tf_checkpoint_gives_the_references_outputs():
  model = _model()
  variables = interop.from_tf_checkpoint('minigo', str(TF_DIR),
                                         expected=_expected(model))
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.tree.map(lambda x: 0, _expected(model)))
  out = np.load(TF_DIR / 'outputs.npz')
  logits, value = model.apply(variables, jnp.asarray(out['planes']),
                              train=False)
  scale = np.abs(out['logits']).max()
  np.testing.assert_allclose(np.asarray(logits), out['logits'],
                             atol=1e-5 * scale)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)),
                             out['policy'], atol=1e-5)
  np.testing.assert_allclose(np.asarray(value), out['value'], atol=1e-6)
  # The prefix and the .index file name the same checkpoint.
  for path in (TF_DIR / MAKER.PREFIX, f'{TF_DIR / MAKER.PREFIX}.index'):
    again = interop.from_tf_checkpoint('minigo', str(path))
    assert jax.tree.all(jax.tree.map(np.array_equal, again, variables))


def test_tf_names_are_the_references_and_slots_are_skipped():
  raw = interop.read_tf_checkpoint(str(TF_DIR), reader='numpy')
  slots = {k for k in raw if k.endswith('/Momentum')}
  weights = set(raw) - slots - {'global_step'}
  tensors = interop.minigo_tensors(MAKER.TRUNK_LAYERS)
  assert {t.tf_name for t in tensors} == weights
  assert {s[:-len('/Momentum')] for s in slots} == {
      k for k in weights if 'moving_' not in k}
  # The trainable ones are the compliance checker's names.
  trainable = {t.tf_name for t in tensors if t.flax_path[0] == 'params'}
  assert trainable == set(minigo.checker_tensor_names(MAKER.TRUNK_LAYERS)[:-1])
  assert interop.minigo_trunk_layers(weights) == MAKER.TRUNK_LAYERS
  variables = interop.from_tf_checkpoint('minigo', str(TF_DIR))
  p, s = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(p['res1_conv2']['kernel'],
                                raw['conv2d_4/kernel'])          # HWIO both
  np.testing.assert_array_equal(p['policy_dense']['kernel'],
                                raw['dense/kernel'])             # (in, out)
  np.testing.assert_array_equal(p['res0_bn1']['bias'],
                                raw['batch_normalization_1/beta'])
  np.testing.assert_array_equal(s['value_bn']['var'],
                                raw['batch_normalization_6/moving_variance'])
  assert 'policy_bn' not in p and 'value_bn' not in p


def _patched(monkeypatch, *, drop=(), add=None):
  real = interop._open_tf_checkpoint
  add = add or {}

  def fake(path, reader):
    shapes, read = real(path, reader)
    shapes = {k: v for k, v in shapes.items() if k not in drop}
    shapes.update({k: v.shape for k, v in add.items()})
    return shapes, lambda name: add[name] if name in add else read(name)
  monkeypatch.setattr(interop, '_open_tf_checkpoint', fake)


def test_tf_missing_unexpected_and_misshapen_tensors_are_named(monkeypatch):
  with monkeypatch.context() as m:
    _patched(m, drop=('dense_1/bias',))
    with pytest.raises(interop.InteropError,
                       match=r'missing 1 tensor\(s\): dense_1/bias'):
      interop.from_tf_checkpoint('minigo', str(TF_DIR))
  with monkeypatch.context() as m:
    _patched(m, add={'dense_3/kernel': np.zeros((4, 1), np.float32)})
    with pytest.raises(interop.InteropError,
                       match=r'unexpected 1 tensor\(s\): dense_3/kernel'):
      interop.from_tf_checkpoint('minigo', str(TF_DIR))
  # A network of another width: the first tensor that does not fit is named.
  with pytest.raises(interop.InteropError,
                     match=r'conv2d/kernel has shape .*expects'):
    interop.from_tf_checkpoint('minigo', str(TF_DIR),
                               expected=_expected(_model(conv_width=16)))
  # Another depth: tensors missing.
  with pytest.raises(interop.InteropError, match='unexpected|missing'):
    interop.from_tf_checkpoint('minigo', str(TF_DIR),
                               expected=_expected(_model(trunk_layers=3)))


def test_torch_round_trip_and_outputs():
  torch = pytest.importorskip(
      'torch', reason="needs the 'compare' extra (PyTorch)")
  from jaxperf.torch_models import minigo as torch_minigo  # pylint: disable=g-import-not-at-top
  model = _model()
  variables = interop.from_tf_checkpoint('minigo', str(TF_DIR))
  state_dict = interop.to_torch('minigo', variables)
  ref = torch_minigo.MiniGo(board_size=MAKER.BOARD_SIZE,
                            conv_width=MAKER.CONV_WIDTH,
                            fc_width=MAKER.FC_WIDTH,
                            trunk_layers=MAKER.TRUNK_LAYERS)
  ref.load_state_dict(state_dict, strict=True)
  ref.eval()
  out = np.load(TF_DIR / 'outputs.npz')
  x = torch.from_numpy(np.ascontiguousarray(
      out['planes'].transpose(0, 3, 1, 2))).float()
  with torch.no_grad():
    logits, value = ref(x)
  scale = np.abs(out['logits']).max()
  np.testing.assert_allclose(logits.numpy(), out['logits'], atol=1e-5 * scale)
  np.testing.assert_allclose(value.numpy(), out['value'], atol=1e-6)
  back = interop.from_torch('minigo', state_dict, expected=_expected(model))
  assert jax.tree.all(jax.tree.map(np.array_equal, back, variables))
