"""BERT weights: HF BertForPreTraining both ways and TF1 checkpoints.

The TF1 checkpoint in tests/data/bert_tf1 was written by TensorFlow 2.21's
tf.compat.v1.train.Saver (tests/data/make_bert_tf1_checkpoint.py, which
also recomputes its random values without TensorFlow); jaxperf reads it with
numpy alone, so these tests need no TensorFlow.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import mlperf_logging
import numpy as np
import pytest
import yaml

from jaxperf import interop
from jaxperf.models import bert
from tests import data_scripts

DATA = pathlib.Path(__file__).parent / 'data'
TF_DIR = DATA / 'bert_tf1'

# A tiny BERT for the PyTorch round trips.
SIZES = {'vocab_size': 30, 'hidden_size': 16, 'num_layers': 2, 'num_heads': 2,
         'intermediate_size': 32, 'max_position': 64}


MAKER = data_scripts.load('make_bert_tf1_checkpoint')


def expected_variables(**sizes):
  model = bert.BertForPreTraining(bert.BertConfig(**sizes))
  z = lambda n: jnp.zeros((1, n), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), z(8), z(8), z(8),
                        z(8), z(2), z(1))


def hf_model(**sizes):
  transformers = pytest.importorskip(
      'transformers', reason="HF transformers comes with the 'test' extra")
  return transformers.BertForPreTraining(transformers.BertConfig(
      vocab_size=sizes['vocab_size'], hidden_size=sizes['hidden_size'],
      num_hidden_layers=sizes['num_layers'],
      num_attention_heads=sizes['num_heads'],
      intermediate_size=sizes['intermediate_size'],
      max_position_embeddings=sizes['max_position'], hidden_act='gelu_new'))


@pytest.fixture(scope='module')
def torch():
  return pytest.importorskip('torch', reason="PyTorch comes with the 'test' "
                             "extra")


@pytest.fixture(scope='module')
def hf(torch):
  torch.manual_seed(0)
  model = hf_model(**SIZES)
  # Non-zero biases and norms, so that a swapped tensor cannot pass.
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


# ------------------------------------------------------------ PyTorch


def test_round_trip_restores_every_tensor_and_loads_strictly(hf, torch):
  sd = hf.state_dict()
  expected = expected_variables(**SIZES)
  variables = interop.from_torch('bert', sd, expected=expected)
  assert set(variables) == {'params'}
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.tree.map(lambda x: 0, nn.unbox(expected)))
  for got, want in zip(jax.tree.leaves(variables),
                       jax.tree.leaves(nn.unbox(expected))):
    assert got.shape == want.shape
  back = interop.to_torch('bert', variables)
  assert list(back) == list(sd)            # every name, in HF's order
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  fresh = hf_model(**SIZES)
  fresh.load_state_dict(back, strict=True)
  for (k, a), b in zip(fresh.state_dict().items(), sd.values()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
  # Boxed variables (nn.LogicallyPartitioned) convert the same way.
  model = bert.BertForPreTraining(bert.BertConfig(**SIZES))
  z = lambda n: jnp.zeros((1, n), jnp.int32)
  boxed = model.init(jax.random.key(1), z(8), z(8), z(8), z(8), z(2), z(1))
  sd_boxed = interop.to_torch('bert', boxed)
  sd_plain = interop.to_torch('bert', nn.unbox(boxed))
  assert all(np.array_equal(sd_boxed[k].numpy(), sd_plain[k].numpy())
             for k in sd_plain)


def test_layouts(hf):
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  p = interop.from_torch('bert', sd, num_heads=2)['params']
  n, d, h = 2, 8, 16
  layer = p['bert']['encoder_layer_1']
  attention = layer['attention']
  torch_layer = lambda name: sd[f'bert.encoder.layer.1.{name}']
  q = torch_layer('attention.self.query.weight')                  # (n*d, h)
  for head in range(n):
    for j in range(d):
      np.testing.assert_array_equal(attention['query']['kernel'][:, head, j],
                                    q[head * d + j])
  np.testing.assert_array_equal(attention['key']['bias'].reshape(-1),
                                torch_layer('attention.self.key.bias'))
  out = torch_layer('attention.output.dense.weight')               # (h, n*d)
  np.testing.assert_array_equal(attention['out']['kernel'],
                                out.T.reshape(n, d, h))
  np.testing.assert_array_equal(layer['intermediate']['kernel'],
                                torch_layer('intermediate.dense.weight').T)
  np.testing.assert_array_equal(p['nsp']['kernel'],
                                sd['cls.seq_relationship.weight'].T)
  np.testing.assert_array_equal(p['mlm_output_bias'],
                                sd['cls.predictions.bias'])
  np.testing.assert_array_equal(
      p['bert']['embeddings']['word_embeddings']['embedding'],
      sd['bert.embeddings.word_embeddings.weight'])
  np.testing.assert_array_equal(
      p['mlm_layer_norm']['scale'],
      sd['cls.predictions.transform.LayerNorm.weight'])


def test_num_heads_comes_from_the_option_or_expected(hf):
  sd = hf.state_dict()
  from_expected = interop.from_torch('bert', sd,
                                     expected=expected_variables(**SIZES))
  given = interop.from_torch('bert', sd, num_heads=2)
  assert jax.tree.all(jax.tree.map(np.array_equal, from_expected, given))
  kernel = lambda v: v['params']['bert']['encoder_layer_0']['attention'][
      'query']['kernel']
  assert kernel(given).shape == (16, 2, 8)
  # Without either: BERT-large's 16 heads (of 1 here).
  assert kernel(interop.from_torch('bert', sd)).shape == (16, 16, 1)
  with pytest.raises(interop.InteropError,
                     match=r'hidden size 16 .* not a multiple of num_heads=3'):
    interop.from_torch('bert', sd, num_heads=3)
  # A head count the target model does not have.
  with pytest.raises(interop.InteropError,
                     match=r'tensor bert.encoder.layer.0.attention.self.query.'
                     r'weight becomes Flax params/bert/encoder_layer_0/'
                     r'attention/query/kernel \(16, 4, 4\) but the model '
                     r'expects \(16, 2, 8\): num_heads=4 is not the model'):
    interop.from_torch('bert', sd, num_heads=4,
                       expected=expected_variables(**SIZES))
  with pytest.raises(interop.InteropError, match='unknown option.*heads'):
    interop.from_torch('bert', sd, heads=2)
  with pytest.raises(interop.InteropError, match='unknown option'):
    interop.from_torch('resnet50', sd, num_heads=2)


def test_missing_unexpected_and_misshapen_tensors_are_named(hf, torch):
  sd = dict(hf.state_dict())
  name = 'bert.encoder.layer.1.output.LayerNorm.bias'
  with pytest.raises(interop.InteropError,
                     match=rf'bert state_dict does not match the model: '
                     rf'missing 1 tensor\(s\): {re.escape(name)}$'):
    interop.from_torch('bert', {k: v for k, v in sd.items() if k != name},
                       num_heads=2)
  with pytest.raises(interop.InteropError,
                     match=r'unexpected 1 tensor\(s\): cls.extra.weight'):
    interop.from_torch('bert', {**sd, 'cls.extra.weight':
                                sd['cls.predictions.bias']}, num_heads=2)
  # A third layer's worth of one tensor: the other 15 are missing.
  extra_layer = {**sd, 'bert.encoder.layer.2.output.dense.bias':
                 sd['bert.encoder.layer.1.output.dense.bias']}
  with pytest.raises(interop.InteropError,
                     match=r'missing 15 tensor\(s\): bert.encoder.layer.2.'):
    interop.from_torch('bert', extra_layer, num_heads=2)
  bad = {**sd, 'bert.encoder.layer.1.intermediate.dense.weight':
         torch.zeros(33, 16)}
  with pytest.raises(interop.InteropError,
                     match=r'tensor bert.encoder.layer.1.intermediate.dense.'
                     r'weight has shape \(33, 16\) but the other tensors '
                     r'imply \(32, 16\) \(vocab_size=30, hidden_size=16, '
                     r'intermediate_size=32, max_position=64'):
    interop.from_torch('bert', bad, num_heads=2)
  with pytest.raises(interop.InteropError,
                     match=r'tensor bert.pooler.dense.bias has rank 2, '
                     r'expected 1'):
    interop.from_torch('bert', {**sd, 'bert.pooler.dense.bias':
                                torch.zeros(16, 1)}, num_heads=2)
  # Consistent, but not the model we load into.
  bigger = expected_variables(**{**SIZES, 'vocab_size': 31})
  with pytest.raises(interop.InteropError,
                     match=r'tensor bert.embeddings.word_embeddings.weight has '
                     r'shape \(30, 16\) but the model expects \(31, 16\)'):
    interop.from_torch('bert', sd, expected=bigger)


def test_tied_decoder_and_buffers(hf, torch):
  sd = dict(hf.state_dict())
  ref = interop.from_torch('bert', sd, num_heads=2)
  same = lambda v: jax.tree.all(jax.tree.map(np.array_equal, ref, v))
  # Saved without the tied duplicates (as safetensors files are).
  untied = {k: v for k, v in sd.items()
            if not k.startswith('cls.predictions.decoder')}
  assert same(interop.from_torch('bert', untied, num_heads=2))
  # Older transformers kept position_ids (and token_type_ids) buffers.
  buffers = {**sd, 'bert.embeddings.position_ids': torch.arange(64)[None],
             'bert.embeddings.token_type_ids':
                 torch.zeros(1, 64, dtype=torch.long)}
  assert same(interop.from_torch('bert', buffers, num_heads=2))
  changed = sd['cls.predictions.decoder.weight'].clone()
  changed[3, 4] += 0.5
  with pytest.raises(interop.InteropError,
                     match=r'tensor cls.predictions.decoder.weight is tied to '
                     r'bert.embeddings.word_embeddings.weight .* but differs '
                     r'from it by up to 0.5'):
    interop.from_torch('bert', {**sd,
                                'cls.predictions.decoder.weight': changed},
                       num_heads=2)
  with pytest.raises(interop.InteropError,
                     match=r'tensor cls.predictions.decoder.bias is tied to '
                     r'cls.predictions.bias .* but has shape \(31,\)'):
    interop.from_torch('bert', {**sd, 'cls.predictions.decoder.bias':
                                torch.zeros(31)}, num_heads=2)


def test_to_torch_names_what_does_not_fit(hf):
  variables = interop.from_torch('bert', hf.state_dict(), num_heads=2)
  with pytest.raises(interop.InteropError,
                     match='variables not in the reference model: '
                     'params/bert/extra/kernel'):
    interop.to_torch('bert', {'params': {
        **variables['params'],
        'bert': {**variables['params']['bert'],
                 'extra': {'kernel': np.zeros(2)}}}})
  del variables['params']['bert']['encoder_layer_1']['output']['bias']
  with pytest.raises(interop.InteropError,
                     match='the variables have no '
                     'params/bert/encoder_layer_1/output/bias'):
    interop.to_torch('bert', variables)


def test_full_size_names_and_shapes_are_hf_bert_large(torch):
  transformers = pytest.importorskip('transformers')
  with torch.device('meta'):
    large = transformers.BertForPreTraining(transformers.BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, hidden_act='gelu_new'))
  shapes = {k: tuple(v.shape) for k, v in large.state_dict().items()}
  assert sum(p.numel() for p in large.parameters()) == 336_226_108
  tensors = interop.bert_tensors(24, interop.bert_dims(shapes, num_heads=16))
  tied = {'cls.predictions.decoder.weight', 'cls.predictions.decoder.bias'}
  assert [t.torch_name for t in tensors] == [k for k in shapes if k not in tied]
  assert all(t.shape == shapes[t.torch_name] for t in tensors)
  flax_sizes = {'/'.join(path.key for path in p): x.size for p, x in
                jax.tree_util.tree_flatten_with_path(
                    nn.unbox(expected_variables(**{
                        f: getattr(bert.LARGE, f) for f in SIZES})))[0]}
  assert sum(flax_sizes.values()) == 336_226_108
  assert sorted(flax_sizes) == sorted('/'.join(t.flax_path) for t in tensors)


# ------------------------------------------------------------ MLPerf names


def _checker_names() -> list[str]:
  root = pathlib.Path(mlperf_logging.__file__).parent
  path = root / 'compliance_checker' / 'training_2.1.0' / 'closed_bert.yaml'
  rules = yaml.safe_load(path.read_text())
  checks = [r['END']['CHECK'] for r in rules
            if isinstance(r, dict) and 'END' in r and 'CHECK' in r['END']]
  return [n for c in checks for n in re.findall(r'"([A-Za-z0-9_/]+)"', c)]


def test_checker_tensor_names_are_the_yaml_list():
  want = _checker_names()
  assert len(want) == 398
  assert interop.bert_checker_tensor_names() == want        # same order too
  assert interop.bert_checker_tensor_names(24) == want
  assert len(interop.bert_checker_tensor_names(2)) == 5 + 2 * 16 + 9
  # The fixture's weights are the same names, as TensorFlow saved them.
  assert sorted(interop.bert_checker_tensor_names(MAKER.NUM_LAYERS)) == sorted(
      n for n, _ in MAKER.variable_shapes())


# ------------------------------------------------------------ TF1 checkpoints


def _tiny_tf_sizes():
  return {'vocab_size': MAKER.VOCAB_SIZE, 'hidden_size': MAKER.HIDDEN_SIZE,
          'num_layers': MAKER.NUM_LAYERS, 'num_heads': MAKER.NUM_HEADS,
          'intermediate_size': MAKER.INTERMEDIATE_SIZE,
          'max_position': MAKER.MAX_POSITION}


def test_numpy_reader_reads_what_tensorflow_wrote():
  want = MAKER.reference_tensors()
  for path in (TF_DIR, TF_DIR / MAKER.PREFIX, f'{TF_DIR / MAKER.PREFIX}.index'):
    got = interop.read_tf_checkpoint(str(path), reader='numpy')
    assert set(got) == set(want)                 # weights, slots, global_step
    for k, v in want.items():
      assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert interop.read_tf_checkpoint(str(TF_DIR), ['global_step'])[
      'global_step'] == MAKER.GLOBAL_STEP


def test_from_tf_checkpoint_maps_the_reference_names():
  sizes = _tiny_tf_sizes()
  want = MAKER.reference_tensors()
  expected = expected_variables(**sizes)
  variables = interop.from_tf_checkpoint('bert', str(TF_DIR), expected=expected)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.tree.map(lambda x: 0, nn.unbox(expected)))
  p = variables['params']
  h, n = MAKER.HIDDEN_SIZE, MAKER.NUM_HEADS
  layer = p['bert']['encoder_layer_1']
  tf_layer = lambda name: want[f'bert/encoder/layer_1/{name}']
  np.testing.assert_array_equal(
      layer['attention']['query']['kernel'],
      tf_layer('attention/self/query/kernel').reshape(h, n, -1))
  np.testing.assert_array_equal(
      layer['attention']['value']['bias'],
      tf_layer('attention/self/value/bias').reshape(n, -1))
  np.testing.assert_array_equal(
      layer['attention']['out']['kernel'],
      tf_layer('attention/output/dense/kernel').reshape(n, -1, h))
  np.testing.assert_array_equal(layer['output']['kernel'],
                                tf_layer('output/dense/kernel'))
  np.testing.assert_array_equal(layer['attention_layer_norm']['scale'],
                                tf_layer('attention/output/LayerNorm/gamma'))
  np.testing.assert_array_equal(p['nsp']['kernel'],
                                want['cls/seq_relationship/output_weights'].T)
  np.testing.assert_array_equal(p['mlm_output_bias'],
                                want['cls/predictions/output_bias'])
  np.testing.assert_array_equal(
      p['bert']['embeddings']['token_type_embeddings']['embedding'],
      want['bert/embeddings/token_type_embeddings'])
  # The same weights through PyTorch's names: TF -> Flax -> HF -> Flax.
  assert jax.tree.all(jax.tree.map(
      np.array_equal, variables,
      interop.from_torch('bert', interop.to_torch('bert', variables),
                         expected=expected)))
  # And the model runs on them.
  model = bert.BertForPreTraining(bert.BertConfig(**sizes))
  ids = jnp.arange(8)[None] % MAKER.VOCAB_SIZE
  mlm, nsp = model.apply(variables, ids, ids % 2, jnp.ones_like(ids),
                         jnp.arange(8)[None], jnp.arange(2)[None],
                         jnp.zeros((1, 1), jnp.int32))
  assert mlm.shape == (1, 2, MAKER.VOCAB_SIZE) and nsp.shape == (1, 1, 2)
  assert np.isfinite(np.asarray(mlm)).all()


def _patched_checkpoint(monkeypatch, *, drop=(), add=None, replace=None):
  """from_tf_checkpoint sees the fixture with tensors dropped, added or
  replaced."""
  real = interop._open_tf_checkpoint
  add, replace = add or {}, replace or {}

  def fake(path, reader):
    shapes, read = real(path, reader)
    shapes = {k: v for k, v in shapes.items() if k not in drop}
    extra = {**add, **replace}
    shapes.update({k: v.shape for k, v in extra.items()})
    return shapes, lambda name: extra[name] if name in extra else read(name)
  monkeypatch.setattr(interop, '_open_tf_checkpoint', fake)


def test_tf_missing_unexpected_and_misshapen_tensors_are_named(monkeypatch):
  path = str(TF_DIR)
  name = 'bert/encoder/layer_0/attention/output/LayerNorm/beta'
  with monkeypatch.context() as m:
    _patched_checkpoint(m, drop=[name])
    with pytest.raises(interop.InteropError,
                       match=rf'bert TF checkpoint .* does not match the '
                       rf'model: missing 1 tensor\(s\): {name}$'):
      interop.from_tf_checkpoint('bert', path, num_heads=2)
  with monkeypatch.context() as m:
    _patched_checkpoint(m, add={'bert/encoder/extra': np.zeros(4, np.float32),
                                'unknown/adam_m': np.zeros(4, np.float32)})
    with pytest.raises(interop.InteropError,
                       match=r'unexpected 2 tensor\(s\): bert/encoder/extra, '
                       r'unknown/adam_m'):
      interop.from_tf_checkpoint('bert', path, num_heads=2)
  with monkeypatch.context() as m:
    # TF kernels are [in, out]: the message shows the TF shape.
    _patched_checkpoint(m, replace={
        'bert/encoder/layer_1/intermediate/dense/kernel':
            np.zeros((4, 9), np.float32)})
    with pytest.raises(interop.InteropError,
                       match=r'tensor bert/encoder/layer_1/intermediate/dense/'
                       r'kernel has shape \(4, 9\) but the other tensors '
                       r'imply \(4, 8\)'):
      interop.from_tf_checkpoint('bert', path, num_heads=2)
  with monkeypatch.context() as m:
    _patched_checkpoint(m, replace={'cls/seq_relationship/output_bias':
                                    np.zeros((2,), np.int32)})
    with pytest.raises(interop.InteropError,
                       match=r'tensor cls/seq_relationship/output_bias has '
                       r'dtype int32, expected floating point'):
      interop.from_tf_checkpoint('bert', path, num_heads=2)
  bigger = expected_variables(**{**_tiny_tf_sizes(), 'vocab_size': 17})
  with pytest.raises(interop.InteropError,
                     match=r'tensor bert/embeddings/word_embeddings has shape '
                     r'\(16, 4\) but the model expects \(17, 4\)'):
    interop.from_tf_checkpoint('bert', path, expected=bigger)
  with pytest.raises(interop.InteropError,
                     match='TF checkpoints load for bert'):
    interop.from_tf_checkpoint('resnet50', path)
  with pytest.raises(interop.InteropError, match='no TF checkpoint at'):
    interop.from_tf_checkpoint('bert', str(TF_DIR / 'model.ckpt-8'))


def _copy_fixture(tmp_path) -> pathlib.Path:
  out = tmp_path / 'ckpt'
  shutil.copytree(TF_DIR, out)
  return out


def test_corrupt_files_fail_their_checksums(tmp_path):
  d = _copy_fixture(tmp_path)
  data = d / f'{MAKER.PREFIX}.data-00000-of-00001'
  raw = bytearray(data.read_bytes())
  raw[0] ^= 0xff                     # the first tensor saved
  data.write_bytes(bytes(raw))
  first = min(MAKER.reference_tensors())       # TF saves in sorted order
  with pytest.raises(interop.InteropError,
                     match=rf'tensor {re.escape(first)} fails its CRC32C'):
    interop.read_tf_checkpoint(str(d), [first])
  index = d / f'{MAKER.PREFIX}.index'
  raw = bytearray(index.read_bytes())
  raw[40] ^= 0xff
  index.write_bytes(bytes(raw))
  with pytest.raises(interop.InteropError, match='CRC32C mismatch'):
    interop.read_tf_checkpoint(str(d))
  index.write_bytes(b'not an index')
  with pytest.raises(interop.InteropError,
                     match='not a readable TF checkpoint index'):
    interop.read_tf_checkpoint(str(d))


def _compress_first_block(prefix: pathlib.Path):
  """Marks the index's first data block as snappy-compressed (valid CRC)."""
  index = pathlib.Path(f'{prefix}.index')
  data = bytearray(index.read_bytes())
  footer = bytes(data[-48:-8])
  _, pos = interop._varint(footer, 0)
  _, pos = interop._varint(footer, pos)
  index_offset, pos = interop._varint(footer, pos)
  index_size, _ = interop._varint(footer, pos)
  ck = interop.TFCheckpoint.__new__(interop.TFCheckpoint)
  ck.prefix = str(prefix)
  _, handle = ck._block(bytes(data), index_offset, index_size)[0]
  offset, pos = interop._varint(handle, 0)
  size, _ = interop._varint(handle, pos)
  data[offset + size] = 1
  crc = interop._crc32c_masked(bytes(data[offset:offset + size]) + b'\x01')
  data[offset + size + 1:offset + size + 5] = crc.to_bytes(4, 'little')
  index.write_bytes(bytes(data))


def test_without_tensorflow_the_error_says_how_to_get_it(tmp_path,
                                                         monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)   # import fails
  with pytest.raises(interop.InteropError,
                     match=r"needs TensorFlow, which is not installed: pip "
                     r"install 'jaxperf\[tf\]'"):
    interop.from_tf_checkpoint('bert', str(TF_DIR), reader='tensorflow',
                               num_heads=2)
  # What the numpy reader does not handle goes to TensorFlow, if there.
  d = _copy_fixture(tmp_path)
  _compress_first_block(d / MAKER.PREFIX)
  with pytest.raises(interop.UnsupportedCheckpoint,
                     match='compressed table blocks'):
    interop.read_tf_checkpoint(str(d), reader='numpy')
  with pytest.raises(interop.InteropError,
                     match=r"compressed table blocks \(type 1\); reading it "
                     r"needs TensorFlow, which is not installed"):
    interop.from_tf_checkpoint('bert', str(d), num_heads=2)
  with pytest.raises(interop.InteropError, match='reader=.tf.: expected'):
    interop.read_tf_checkpoint(str(TF_DIR), reader='tf')


def test_tensorflow_reader_agrees_with_numpy():
  pytest.importorskip('tensorflow')
  a = interop.read_tf_checkpoint(str(TF_DIR), reader='numpy')
  b = interop.read_tf_checkpoint(str(TF_DIR), reader='tensorflow')
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
