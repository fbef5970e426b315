"""models/rnnt.py: the reference's parameter count, its initialisation, and
parity with the reference's PyTorch structure (jaxperf.torch_models.rnnt)
with the same weights (interop.from_torch / to_torch): encoder, prediction
network, joint and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf import decoding, interop
from jaxperf.models import rnnt

torch = pytest.importorskip('torch')
from jaxperf.torch_models import rnnt as torch_rnnt  # noqa: E402

# Reduced widths, the reference's depths (2 + 3 encoder layers, 2
# prediction layers) and stacking.
SMALL = dict(num_classes=29, in_features=24, enc_hidden=32, pred_hidden=16,
             joint_hidden=16)


def test_parameter_count_is_the_references():
  model = rnnt.RNNT()
  shapes = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 8, 240)),
      jnp.ones((1,), jnp.int32), jnp.zeros((1, 3), jnp.int32))
  count = sum(x.size for x in jax.tree.leaves(shapes['params']))
  assert count == 49_006_080 == rnnt.reference_param_count()
  reference = torch_rnnt.RNNT()
  assert sum(p.numel() for p in reference.parameters()) == 49_006_080
  names = {t.torch_name for t in interop.rnnt_tensors()}
  assert names == set(reference.state_dict())


def test_initialisation_follows_the_reference():
  """LSTM tensors U(+-1/sqrt(H)) x 0.5, the forget input bias 1 x 0.5 and
  the forget hidden bias 0; linear layers U(+-1/sqrt(fan_in)); the
  embedding N(0, 1)."""
  model = rnnt.RNNT()
  params = jax.jit(model.init)(
      jax.random.key(1), jnp.zeros((1, 4, 240)), jnp.ones((1,), jnp.int32),
      jnp.zeros((1, 2), jnp.int32))['params']
  h = 1024
  layer = params['post_rnn']['layer1']
  bound = 0.5 / np.sqrt(h)
  for name in ('kernel_ih', 'kernel_hh'):
    w = np.asarray(layer[name])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.std() - bound / np.sqrt(3)) < 0.01 * bound
  b_ih, b_hh = np.asarray(layer['bias_ih']), np.asarray(layer['bias_hh'])
  np.testing.assert_array_equal(b_ih[h:2 * h], 0.5)
  np.testing.assert_array_equal(b_hh[h:2 * h], 0.0)
  assert np.abs(np.delete(b_ih, np.s_[h:2 * h])).max() <= bound
  w = np.asarray(params['joint_enc']['kernel'])
  assert np.abs(w).max() <= 1 / np.sqrt(1024)
  assert np.abs(w).max() > 0.99 / np.sqrt(1024)
  e = np.asarray(params['pred_embed']['embedding'])
  assert e.shape == (1023, 512) and abs(e.std() - 1) < 0.01


def _pair(seed=0):
  torch.manual_seed(seed)
  reference = torch_rnnt.RNNT(
      n_classes=SMALL['num_classes'], in_feats=SMALL['in_features'],
      enc_n_hid=SMALL['enc_hidden'], pred_n_hid=SMALL['pred_hidden'],
      joint_n_hid=SMALL['joint_hidden']).eval()
  variables = interop.from_torch('rnnt', reference.state_dict())
  return reference, rnnt.RNNT(**SMALL), variables


def test_outputs_and_gradients_match_the_reference():
  reference, model, variables = _pair()
  rng = np.random.default_rng(0)
  b, t, u = 3, 11, 5
  x = rng.normal(size=(b, t, SMALL['in_features'])).astype(np.float32)
  lens = np.asarray([11, 8, 5], np.int32)
  y = rng.integers(0, SMALL['num_classes'] - 1, (b, u)).astype(np.int64)
  w = rng.normal(size=(b, 6, u + 1, SMALL['num_classes'])).astype(np.float32)

  tx = torch.tensor(x.transpose(1, 0, 2), requires_grad=True)
  t_logits, t_lens = reference(tx, torch.tensor(lens), torch.tensor(y))
  (t_logits * torch.tensor(w)).sum().backward()

  def objective(params, x):
    logits, out_lens = model.apply({'params': params}, x, lens, y)
    return jnp.sum(logits * w), (logits, out_lens)
  (_, (logits, out_lens)), (grads, x_grad) = jax.value_and_grad(
      objective, argnums=(0, 1), has_aux=True)(variables['params'],
                                               jnp.asarray(x))
  assert logits.shape == (b, 6, u + 1, SMALL['num_classes'])
  np.testing.assert_array_equal(out_lens, t_lens.numpy())
  np.testing.assert_allclose(logits, t_logits.detach().numpy(), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(x_grad, tx.grad.numpy().transpose(1, 0, 2),
                             rtol=1e-4, atol=1e-5)
  want = interop.from_torch(
      'rnnt', {k: p.grad for k, p in reference.named_parameters()})
  for (path, g), ref in zip(
      jax.tree_util.tree_flatten_with_path(grads)[0],
      jax.tree.leaves(want['params'])):
    np.testing.assert_allclose(
        g, ref, rtol=1e-4, atol=1e-5,
        err_msg=jax.tree_util.keystr(path))


def test_prediction_steps_equal_the_whole_sequence():
  """Greedy decoding's one-step prediction (start vector, then labels)
  reproduces predict() over a label sequence."""
  _, model, variables = _pair(1)
  y = jnp.asarray([[3, 7, 1, 0], [5, 5, 2, 9]], jnp.int32)
  whole = model.apply(variables, y, method='predict')
  carry = decoding.zero_carry(model, 2)
  prev = jnp.zeros((2,), jnp.int32)
  for k in range(5):
    g, carry = model.apply(variables, prev, carry, start=jnp.full(
        (2,), k == 0), method='predict_step')
    np.testing.assert_allclose(g, whole[:, k], rtol=1e-5, atol=1e-6)
    if k < 4:
      prev = y[:, k]


def test_round_trip_and_bad_state_dicts():
  reference, _, variables = _pair(2)
  back = interop.to_torch('rnnt', variables)
  for k, v in reference.state_dict().items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy())
  sd = dict(reference.state_dict())
  del sd['joint_enc.bias']
  with pytest.raises(interop.InteropError, match='joint_enc.bias'):
    interop.from_torch('rnnt', sd)


def _reference_greedy(reference, x, out_len, blank, max_symbols,
                      max_per_sample):
  """The reference's RNNTGreedyDecoder._greedy_decode, on the PyTorch
  model: x is one utterance's encoder output (T, 1, H)."""
  hidden, label = None, []
  for t in range(out_len):
    if len(label) > max_per_sample:
      break
    f = x[t].unsqueeze(0)
    not_blank, added = True, 0
    while not_blank and added < max_symbols:
      if label:
        y = reference.prediction['embed'](torch.tensor([[label[-1]]]))
      else:
        y = torch.zeros((1, 1, reference.pred_n_hid))
      g, hidden_prime = reference.prediction['dec_rnn'](y.transpose(0, 1),
                                                        hidden)
      logp = reference.joint(f, g.transpose(0, 1))[0, 0, 0]
      k = int(logp.argmax())
      if k == blank:
        not_blank = False
      else:
        label.append(k)
        hidden = hidden_prime
      added += 1
  return label


@pytest.mark.parametrize('caps', [(30, 300), (2, 6)])
def test_greedy_decoding_is_the_references(caps):
  """Batched, jitted greedy decoding = the reference's per-utterance loop,
  label for label, including its caps per frame and per utterance. The
  joint's output bias is tilted away from the blank so that labels are
  emitted often and the caps bind."""
  reference, model, variables = _pair(3)
  with torch.no_grad():
    reference.joint_net[2].bias[-1] -= 3.0
  variables = interop.from_torch('rnnt', reference.state_dict())
  rng = np.random.default_rng(4)
  b, t = 4, 16
  x = rng.normal(size=(b, t, SMALL['in_features'])).astype(np.float32)
  lens = np.asarray([16, 11, 3, 1], np.int32)
  per_step, per_sample = caps
  labels, counts = jax.jit(lambda v, x, l: decoding.greedy_decode(
      model, v, x, l, max_symbols_per_step=per_step,
      max_symbols_per_sample=per_sample))(variables, jnp.asarray(x), lens)
  with torch.no_grad():
    enc, enc_lens = reference.encode(torch.tensor(x.transpose(1, 0, 2)),
                                     torch.tensor(lens))
    for i in range(b):
      want = _reference_greedy(reference, enc[i].unsqueeze(1),
                               int(enc_lens[i]), SMALL['num_classes'] - 1,
                               per_step, per_sample)
      got = np.asarray(labels[i, :counts[i]]).tolist()
      assert got == want, (i, got, want)
      assert np.all(np.asarray(labels[i, counts[i]:]) == -1)
  assert int(counts.max()) > 0
