"""BERT against HF transformers' BertForPreTraining: outputs, loss, gradients.

HF's BertConfig(hidden_act='gelu_new') is the MLPerf reference's GELU (the
tanh form of its modeling.py); weights go from HF into models/bert.py with
jaxperf.interop.from_torch, and both run in float32 with dropout off (HF
eval mode, JAX deterministic) on a batch with a padded row.

Measured on a 2-core CPU, float32, transformers 5.23 (sdpa attention):
- tiny (2 layers, hidden 64, 4 heads, ffn 128, vocab 100, batch 3 of 32):
  MLM logits max_rel ~3e-7, NSP ~6e-7, loss ~1e-7, gradients norm_rel
  median ~3e-7, worst ~5e-7;
- BERT-large (python -m jaxperf.compare --model bert: batch 2 of 128, one
  row padded, 31 masked predictions): MLM logits max_rel 1.7e-6, NSP 1.0e-6,
  loss 8.7e-8, gradients norm_rel median 1.5e-6, worst 9.8e-6 (layer 23's
  query kernel).
The attention key biases get a zero gradient in exact arithmetic (softmax
ignores a shift shared by all keys), so both frameworks return rounding
noise for them (~1e-12 tiny, ~2e-9 large): they are checked by absolute
size, not relative error. There is no float64 comparison: the model
computes its MLM and NSP logits in float32 whatever its dtype.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason="the parity tests need the 'test' extra (PyTorch)")
transformers = pytest.importorskip(
    'transformers', reason="the BERT parity tests need HF transformers (the "
    "'test' extra)")

from jaxperf import compare, interop  # noqa: E402
from jaxperf.models import bert  # noqa: E402
from jaxperf.workloads.bert import pretraining_losses  # noqa: E402

TINY = {'num_layers': 2, 'hidden_size': 64, 'num_heads': 4,
        'intermediate_size': 128, 'vocab_size': 100}
BATCH, SEQ = 3, 32


def test_gelu_new_is_the_models_gelu():
  """HF's 'gelu_new' is the tanh GELU that BertConfig uses by default; the
  exact (erf) 'gelu' differs by up to ~5e-4, more than the parity below."""
  x = np.linspace(-6, 6, 1001).astype(np.float32)
  ours = np.asarray(bert.gelu(jnp.asarray(x), bert.LARGE.gelu_approximate))
  gelu_new = transformers.activations.ACT2FN['gelu_new'](torch.from_numpy(x))
  gelu = transformers.activations.ACT2FN['gelu'](torch.from_numpy(x))
  assert bert.BertConfig().gelu_approximate
  np.testing.assert_allclose(ours, gelu_new.numpy(), rtol=1e-6, atol=1e-6)
  assert np.abs(ours - gelu.numpy()).max() > 1e-4


@pytest.fixture(scope='module')
def pair():
  return compare.BertPair(batch=BATCH, seq_len=SEQ, **TINY)


def test_batch_has_padding_masks_and_weights(pair):
  b = pair.batch
  mask = b['sequence_ids']
  assert mask.shape == (BATCH, SEQ) and mask[0].all() and not mask[1].all()
  assert (b['input_ids'][mask == 0] == 0).all()
  assert (b['input_ids'][mask == 1] > 0).all()          # [PAD] only in padding
  w = b['masked_lm_weights']
  # 15% of each row's real tokens, never [CLS] nor padding.
  assert w.sum(axis=1).tolist() == [5, 3, 5]
  pos = b['masked_lm_positions']
  assert (pos[w > 0] >= 1).all()
  assert all(mask[i, pos[i][w[i] > 0]].all() for i in range(BATCH))
  assert (pos[w == 0] == 0).all() and (b['masked_lm_ids'][w == 0] == 0).all()


def test_outputs_loss_and_gradients_match_hf_directly(pair):
  """Written out without BertPair's helpers, against HF's own forward."""
  b, hf = pair.batch, pair.tmodel
  params = interop.from_torch('bert', hf.state_dict(), num_heads=4)['params']
  model = bert.BertForPreTraining(bert.BertConfig(max_position=512, **TINY))
  inputs = [jnp.asarray(b[k]) for k in ('input_ids', 'segment_ids',
                                        'sequence_ids', 'position_ids')]
  all_positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
  mlm, nsp = model.apply({'params': params}, *inputs, all_positions,
                         jnp.zeros((BATCH, 1), jnp.int32))
  t = {k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()
       if v.dtype.kind == 'i'}
  with torch.no_grad():
    out = hf(input_ids=t['input_ids'], attention_mask=t['sequence_ids'],
             token_type_ids=t['segment_ids'])       # HF's default positions
  real = b['sequence_ids'].astype(bool)
  want = out.prediction_logits.numpy()
  scale = np.abs(want[real]).max()
  assert np.abs(np.asarray(mlm)[real] - want[real]).max() < 2e-6 * scale
  row = 1                                            # the padded row
  assert np.abs(np.asarray(mlm)[row][real[row]]
                - want[row][real[row]]).max() < 2e-6 * scale
  want_nsp = out.seq_relationship_logits.numpy()
  assert np.abs(np.asarray(nsp)[:, 0] - want_nsp).max() < (
      2e-6 * np.abs(want_nsp).max())

  # The reference's loss, in numpy from HF's logits at the masked positions.
  logits = np.take_along_axis(
      want.astype(np.float64), b['masked_lm_positions'][..., None], axis=1)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, b['masked_lm_ids'][..., None], -1)[..., 0]
  w = b['masked_lm_weights']
  nlogp = want_nsp - np.log(np.exp(want_nsp.astype(np.float64)).sum(
      -1, keepdims=True))
  want_loss = ((nll * w).sum() / (w.sum() + 1e-5)
               - np.take_along_axis(nlogp, b['next_sentence_labels'],
                                    -1).mean())
  labels = {k: jnp.asarray(b[k]) for k in (
      'masked_lm_ids', 'masked_lm_weights', 'next_sentence_labels',
      'next_sentence_weights')}

  def loss_fn(p):
    mlm, nsp = model.apply({'params': p}, *inputs,
                           jnp.asarray(b['masked_lm_positions']),
                           jnp.asarray(b['next_sentence_positions']))
    return pretraining_losses(mlm, nsp, labels)['loss']
  loss, grads = jax.value_and_grad(loss_fn)(params)
  assert abs(float(loss) - want_loss) < 1e-6 * want_loss

  # HF's gradients, through the full forward and HF's own logits.
  hf = pair.tmodel
  hf.zero_grad()
  out = hf(input_ids=t['input_ids'], attention_mask=t['sequence_ids'],
           token_type_ids=t['segment_ids'])
  t_loss = compare.torch_pretraining_loss(
      torch.gather(out.prediction_logits, 1,
                   t['masked_lm_positions'][..., None].expand(-1, -1, 100)),
      out.seq_relationship_logits, t['masked_lm_ids'],
      torch.from_numpy(w), t['next_sentence_labels'])
  t_loss.backward()
  assert abs(t_loss.item() - want_loss) < 1e-6 * want_loss
  t_grads = interop.from_torch(
      'bert', {k: v.grad for k, v in hf.named_parameters()},
      num_heads=4)['params']
  hf.zero_grad()
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree.leaves(t_grads)) == 5 + 2 * 16 + 9
  for path, g in flat:
    name = '/'.join(k.key for k in path)
    tg = t_grads
    for k in path:
      tg = tg[k.key]
    g = np.asarray(g)
    if name.endswith('attention/key/bias'):      # zero in exact arithmetic
      assert np.abs(g).max() < 1e-9 and np.abs(tg).max() < 1e-9, name
      continue
    rel = np.linalg.norm(g - tg) / np.linalg.norm(tg)
    assert rel < 5e-6, (name, rel)


def test_pair_parity_float32(pair):
  r = pair.parity()
  print({k: r[k]['max_rel'] for k in ('mlm_logits', 'mlm_logits_padded_row',
                                      'nsp_logits', 'loss')},
        'grads median', r['grads']['median_norm_rel'], 'worst',
        r['grads']['worst_norm_rel'], r['grads']['worst_param'])
  assert r['mlm_logits']['max_rel'] < 2e-6
  assert r['mlm_logits_padded_row']['max_rel'] < 2e-6
  assert r['nsp_logits']['max_rel'] < 2e-6
  assert r['loss']['max_rel'] < 1e-6
  assert r['grads']['worst_norm_rel'] < 5e-6, r['grads']['worst_param']
  assert r['grads']['median_norm_rel'] < 1e-6
  assert r['grads']['zero_grad_params'] == [
      f'bert/encoder_layer_{i}/attention/key/bias' for i in range(2)]
  assert r['grads']['zero_grad_max_abs'] < 1e-9
  assert len(r['grads']['per_param']) == 5 + 2 * 16 + 9


def test_compare_cli_writes_finite_json(tmp_path, capsys):
  out = tmp_path / 'bert.json'
  rc = compare.main(['--model', 'bert', '--layers', '1', '--hidden-size', '32',
                     '--num-heads', '2', '--intermediate-size', '64',
                     '--vocab-size', '50', '--seq-len', '16', '--batch', '2',
                     '--warmup', '0', '--repeats', '1', '--json', str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert 'mlm_logits_padded_row' in text and 'step time' in text
  r = json.loads(out.read_text())
  assert r['model'] == 'bert' and r['seq_len'] == 16 and r['num_layers'] == 1
  assert r['max_predictions'] == 2 and r['padded_rows'] == 1
  assert r['transformers'] == transformers.__version__
  values = [r['mlm_logits']['max_rel'], r['nsp_logits']['max_rel'],
            r['loss']['max_rel'], r['grads']['worst_norm_rel'],
            r['jax']['step_time_s'], r['jax']['compile_s'],
            r['torch']['step_time_s']]
  assert all(np.isfinite(v) for v in values), values
  assert r['mlm_logits']['max_rel'] < 2e-6 and r['loss']['max_rel'] < 1e-6


@pytest.mark.parametrize('argv, message', [
    (['--image-size', '64'], '--image-size: not for --model bert'),
    (['--torch-contiguous'], '--torch-contiguous: not for --model bert'),
    (['--hidden-size', '30', '--num-heads', '4'],
     '--hidden-size 30 is not a multiple of --num-heads 4'),
    (['--seq-len', '600'], '--seq-len 600: expected 2..512'),
    (['--seq-len', '16', '--max-predictions', '17'],
     '--max-predictions 17: expected 1..16'),
    (['--layers', '1', '--hidden-size', '8', '--num-heads', '2',
      '--intermediate-size', '8', '--vocab-size', '10', '--precision', 'f64'],
     'bert compares in f32 only'),
])
def test_compare_cli_rejects_bad_bert_flags(argv, message, capsys):
  assert compare.main(['--model', 'bert', '--no-timing', *argv]) == 2
  assert message in capsys.readouterr().err


def test_compare_cli_keeps_bert_flags_to_bert(capsys):
  assert compare.main(['--model', 'resnet50', '--seq-len', '128',
                       '--layers', '2', '--no-timing']) == 2
  assert '--seq-len, --layers: only for --model bert' in (
      capsys.readouterr().err)
