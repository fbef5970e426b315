"""Weights between jaxperf's Flax variables and reference checkpoints.

    variables = from_torch('resnet50', torchvision_model.state_dict())
    state_dict = to_torch('resnet50', variables)
    variables = from_tf_checkpoint('bert', 'phase1/model.ckpt-28252')

Models: 'resnet50' (torchvision's ResNet-50 <-> models/resnet.py),
'unet3d' (the MLPerf reference 3D U-Net, jaxperf.torch_models.unet3d <->
models/unet3d.py, any `filters` widths: see unet3d_tensors), 'bert' (HF
transformers' BertForPreTraining, or the MLPerf reference's TF1 checkpoint,
<-> models/bert.py, any size: see bert_tensors), 'dlrm' (the MLPerf
reference's DLRM_Net, jaxperf.torch_models.dlrm <-> models/dlrm.py, any
number of tables and MLP widths: see dlrm_tensors) and 'retinanet'
(torchvision's RetinaNet with the MLPerf reference's ResNeXt50-32x4d FPN
backbone <-> models/retinanet.py, any number of classes and anchors: see
retinanet_tensors; its frozen batch norms' four tensors are Flax
'batch_stats') and 'minigo' (the MLPerf reference's TF1 network, as a
checkpoint such as its target model's or as jaxperf.torch_models.minigo,
<-> models/minigo.py, any depth and width: see minigo_tensors).

`variables` is the Flax dict {'params': ..., 'batch_stats': ...} ({'params':
...} alone for unet3d, whose instance norms keep no statistics, and for
bert; for dlrm {'params': DenseArch's params, 'tables': [one [rows, D]
array per table, in feature order]}, the tables being kept outside Flax).
Every tensor is accounted for: a missing, unexpected or misshapen
tensor is an error that names it, never a partial load. from_torch accepts
torch tensors or numpy arrays; to_torch returns torch tensors (torch is
imported only there).

Layouts: Flax convolution kernels are HWIO and PyTorch's OIHW (3D: DHWIO and
OIDHW); PyTorch's transposed 3D convolution weight is (in, out, D, H, W), its
Flax kernel DHWIO; Flax dense kernels are (in, out) and PyTorch's (out, in).
BERT's attention projections are Flax DenseGeneral kernels (hidden, heads,
head_dim) and (heads, head_dim, hidden), PyTorch (heads * head_dim, hidden)
and (hidden, heads * head_dim); TF1 dense kernels are (in, out).

TF1 checkpoints (the tensor bundle of a .index and .data-?????-of-?????
files) are read with numpy alone (read_tf_checkpoint); TensorFlow is needed
only for what that reader does not handle (compressed index blocks,
partitioned variables), and then only if installed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxperf.data import tfrecord
from jaxperf.errors import UserError


class InteropError(UserError):
  """A state_dict, checkpoint or variables tree does not match the model."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One reference tensor: where it lives in the Flax tree and its layout."""
  torch_name: str
  flax_path: tuple[str, ...]      # ('params', 'conv0', 'kernel')
  # conv | conv3d | deconv3d | dense | vector | embed | heads_in | heads_bias
  # | heads_out
  kind: str
  # The PyTorch shape the model implies, where the mapping knows it.
  shape: tuple[int, ...] | None = None
  # The name in a TF1 checkpoint, for models that have one, and whether the
  # TF tensor is the transpose of the PyTorch one (dense kernels: in, out).
  tf_name: str | None = None
  tf_transpose: bool = False
  # Attention heads, for the heads_* kinds (from the PyTorch layout).
  num_heads: int | None = None


# PyTorch layout -> Flax layout, and back, per kind.
_TO_FLAX = {'conv': (2, 3, 1, 0),          # OIHW -> HWIO
            'conv3d': (2, 3, 4, 1, 0),     # OIDHW -> DHWIO
            'deconv3d': (2, 3, 4, 0, 1),   # IODHW -> DHWIO
            'dense': (1, 0)}
_TO_TORCH = {'conv': (3, 2, 0, 1),
             'conv3d': (4, 3, 0, 1, 2),
             'deconv3d': (3, 4, 0, 1, 2),
             'dense': (1, 0)}
# PyTorch ranks. heads_in: (heads * head_dim, hidden) <-> Flax (hidden,
# heads, head_dim); heads_out: (hidden, heads * head_dim) <-> (heads,
# head_dim, hidden); heads_bias: (heads * head_dim,) <-> (heads, head_dim).
_RANK = {'conv': 4, 'conv3d': 5, 'deconv3d': 5, 'dense': 2, 'vector': 1,
         'embed': 2, 'heads_in': 2, 'heads_bias': 1, 'heads_out': 2}


def _to_flax(t: _Tensor, a: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax layout (shapes already checked against t)."""
  if t.kind in _TO_FLAX:
    return np.transpose(a, _TO_FLAX[t.kind])
  if t.kind == 'heads_in':
    return a.T.reshape(a.shape[1], t.num_heads, -1)
  if t.kind == 'heads_out':
    return a.T.reshape(t.num_heads, -1, a.shape[0])
  if t.kind == 'heads_bias':
    return a.reshape(t.num_heads, -1)
  return a


def _to_torch_layout(t: _Tensor, a: np.ndarray) -> np.ndarray:
  """Flax layout -> PyTorch layout."""
  if t.kind in _TO_TORCH:
    return np.transpose(a, _TO_TORCH[t.kind])
  if t.kind == 'heads_in':
    return a.reshape(a.shape[0], -1).T
  if t.kind == 'heads_out':
    return a.reshape(-1, a.shape[-1]).T
  if t.kind == 'heads_bias':
    return a.reshape(-1)
  return a


def _torch_shape(t: _Tensor, flax_shape: Sequence[int]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax shape (as is where the rank is off)."""
  s = tuple(int(v) for v in flax_shape)
  if t.kind in _TO_TORCH and len(s) == len(_TO_TORCH[t.kind]):
    return tuple(s[i] for i in _TO_TORCH[t.kind])
  if t.kind == 'heads_in' and len(s) == 3:
    return (s[1] * s[2], s[0])
  if t.kind == 'heads_out' and len(s) == 3:
    return (s[2], s[0] * s[1])
  if t.kind == 'heads_bias' and len(s) == 2:
    return (s[0] * s[1],)
  return s


# ------------------------------------------------------------------ resnet50


def _bn(torch_prefix: str, flax_module: tuple[str, ...]) -> list[_Tensor]:
  return [_Tensor(f'{torch_prefix}.weight', ('params', *flax_module, 'scale'), 'vector'),
          _Tensor(f'{torch_prefix}.bias', ('params', *flax_module, 'bias'), 'vector'),
          _Tensor(f'{torch_prefix}.running_mean',
                  ('batch_stats', *flax_module, 'mean'), 'vector'),
          _Tensor(f'{torch_prefix}.running_var',
                  ('batch_stats', *flax_module, 'var'), 'vector')]


def resnet_tensors(stage_sizes=(3, 4, 6, 3)) -> list[_Tensor]:
  """torchvision ResNet (bottleneck) <-> models/resnet.py, tensor by tensor."""
  out = [_Tensor('conv1.weight', ('params', 'conv0', 'kernel'), 'conv'),
         *_bn('bn1', ('bn0',))]
  for s, blocks in enumerate(stage_sizes):
    for u in range(blocks):
      tp, fm = f'layer{s + 1}.{u}', f'stage{s + 1}_unit{u + 1}'
      for k in (1, 2, 3):
        out.append(_Tensor(f'{tp}.conv{k}.weight', ('params', fm, f'conv{k}', 'kernel'),
                           'conv'))
        out += _bn(f'{tp}.bn{k}', (fm, f'bn{k}'))
      if u == 0:
        out.append(_Tensor(f'{tp}.downsample.0.weight',
                           ('params', fm, 'conv1sc', 'kernel'), 'conv'))
        out += _bn(f'{tp}.downsample.1', (fm, 'bnsc'))
  out += [_Tensor('fc.weight', ('params', 'fc1', 'kernel'), 'dense'),
          _Tensor('fc.bias', ('params', 'fc1', 'bias'), 'vector')]
  return out


# ------------------------------------------------------------------ unet3d

def _unet3d_block(torch_prefix: str, flax_module: str,
                  io: tuple[int, int] | None) -> list[_Tensor]:
  """conv (no bias) `prefix.0` -> InstanceNorm3d(affine) `prefix.1`."""
  cin, cout = io or (None, None)
  return [
      _Tensor(f'{torch_prefix}.0.weight',
              ('params', flax_module, 'conv', 'kernel'), 'conv3d',
              (cout, cin, 3, 3, 3) if io else None),
      _Tensor(f'{torch_prefix}.1.weight',
              ('params', flax_module, 'instancenorm', 'scale'), 'vector',
              (cout,) if io else None),
      _Tensor(f'{torch_prefix}.1.bias',
              ('params', flax_module, 'instancenorm', 'bias'), 'vector',
              (cout,) if io else None)]


def unet3d_tensors(filters: Sequence[int] | None = None, in_channels: int = 1,
                   n_class: int = 3) -> list[_Tensor]:
  """The MLPerf 3D U-Net <-> models/unet3d.py, tensor by tensor.

  The names depend only on the depth (five widths, as in the reference), not
  on the widths. Given `filters`, each tensor also carries the PyTorch shape
  that these widths, `in_channels` and `n_class` imply. from_torch('unet3d')
  infers all three from the state_dict itself (unet3d_dims), so a U-Net of
  any widths (e.g. filters=(8, 16, 32, 64, 80)) loads, and a tensor that
  disagrees with the inferred widths is named.

  Mapping: input_block.conv{1,2} <-> input_block_{0,1};
  downsample.{i}.conv{1,2} <-> down{i}_block_{0,1}; bottleneck.conv{1,2} <->
  down4_block_{0,1}; upsample.{i}.upsample_conv.0 <-> up{i}_deconv;
  upsample.{i}.conv{1,2} <-> up{i}_block_{0,1}; output.conv.0 <->
  output_conv. Conv `.0.weight` <-> conv/kernel, norm `.1.weight` <->
  instancenorm/scale, `.1.bias` <-> instancenorm/bias.
  """
  known = filters is not None
  f = tuple(int(x) for x in filters) if known else (None,) * 5
  if len(f) != 5:
    raise InteropError(f'unet3d: filters must have 5 widths, got {list(f)}')
  io = lambda cin, cout: (cin, cout) if known else None
  w = lambda i: f[i]
  out = [*_unet3d_block('input_block.conv1', 'input_block_0',
                        io(in_channels, w(0))),
         *_unet3d_block('input_block.conv2', 'input_block_1', io(w(0), w(0)))]
  downs = [(f'downsample.{i}', w(i), w(i + 1)) for i in range(4)]
  downs.append(('bottleneck', w(4), w(4)))
  for i, (tp, cin, cout) in enumerate(downs):
    out += _unet3d_block(f'{tp}.conv1', f'down{i}_block_0', io(cin, cout))
    out += _unet3d_block(f'{tp}.conv2', f'down{i}_block_1', io(cout, cout))
  ups = [(w(4), w(4))] + [(w(i + 1), w(i)) for i in reversed(range(4))]
  for i, (cin, cout) in enumerate(ups):
    tp, fm = f'upsample.{i}', f'up{i}'
    out += [_Tensor(f'{tp}.upsample_conv.0.weight',
                    ('params', f'{fm}_deconv', 'kernel'), 'deconv3d',
                    (cin, cout, 2, 2, 2) if known else None),
            _Tensor(f'{tp}.upsample_conv.0.bias',
                    ('params', f'{fm}_deconv', 'bias'), 'vector',
                    (cout,) if known else None)]
    out += _unet3d_block(f'{tp}.conv1', f'{fm}_block_0',
                         io(2 * cout, cout) if known else None)
    out += _unet3d_block(f'{tp}.conv2', f'{fm}_block_1', io(cout, cout))
  out += [_Tensor('output.conv.0.weight', ('params', 'output_conv', 'kernel'),
                  'conv3d', (n_class, w(0), 1, 1, 1) if known else None),
          _Tensor('output.conv.0.bias', ('params', 'output_conv', 'bias'),
                  'vector', (n_class,) if known else None)]
  return out


def unet3d_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """filters, in_channels and n_class of a U-Net from its PyTorch shapes.

  Read from the 3D conv weights (out, in, ...) of input_block.conv1,
  downsample.{0..3}.conv1 and output.conv; the other tensors are then
  checked against what these widths imply.
  """
  def dim(name, axis):
    shape = tuple(shapes[name])
    if len(shape) != 5:
      raise InteropError(f'unet3d: tensor {name} has rank {len(shape)}, '
                         f'expected 5')
    return int(shape[axis])
  filters = (dim('input_block.conv1.0.weight', 0),
             *(dim(f'downsample.{i}.conv1.0.weight', 0) for i in range(4)))
  return {'filters': filters,
          'in_channels': dim('input_block.conv1.0.weight', 1),
          'n_class': dim('output.conv.0.weight', 0)}


# ------------------------------------------------------------------ bert

BERT_LARGE_NUM_HEADS = 16

# The names of BERT's encoder layers in PyTorch (bert.encoder.layer.3.) and
# TF1 (bert/encoder/layer_3/) checkpoints.
_BERT_LAYER = re.compile(
    r'^bert(?:\.encoder\.layer\.|/encoder/layer_)(\d+)[./]')


def bert_tensors(num_layers: int = 24,
                 dims: Mapping[str, int] | None = None) -> list[_Tensor]:
  """HF BertForPreTraining / the MLPerf TF1 reference <-> models/bert.py.

  One entry per tensor, in the order of HF's state_dict (and of the MLPerf
  checker's list of TF names). Given `dims` (vocab_size, hidden_size,
  intermediate_size, max_position, type_vocab_size, num_heads: see
  bert_dims) each entry also carries the PyTorch shape they imply.

  Mapping (PyTorch <-> Flax <-> TF1):
  bert.embeddings.{word,position,token_type}_embeddings.weight <->
  bert/embeddings/*/embedding <-> bert/embeddings/*; LayerNorm.{weight,bias}
  <-> layer_norm/{scale,bias} <-> LayerNorm/{gamma,beta};
  bert.encoder.layer.{i}.attention.self.{query,key,value} <->
  bert/encoder_layer_{i}/attention/{query,key,value} (kernels [H, N, D]) <->
  bert/encoder/layer_{i}/attention/self/*; attention.output.dense <->
  attention/out (kernel [N, D, H]); attention.output.LayerNorm <->
  attention_layer_norm; intermediate.dense <-> intermediate; output.dense
  <-> output; output.LayerNorm <-> output_layer_norm; bert.pooler.dense <->
  pooler; cls.predictions.bias <-> mlm_output_bias <->
  cls/predictions/output_bias; cls.predictions.transform.dense <->
  mlm_transform; cls.predictions.transform.LayerNorm <-> mlm_layer_norm;
  cls.seq_relationship <-> nsp <-> cls/seq_relationship/output_weights
  ([2, H], the PyTorch layout) and output_bias. The MLM decoder is tied to
  the word embeddings (cls.predictions.decoder.weight and .bias repeat
  bert.embeddings.word_embeddings.weight and cls.predictions.bias; see
  _TIED).
  """
  d = dict(dims) if dims is not None else None
  g = (lambda k: d[k]) if d is not None else (lambda k: None)
  v, h, f = g('vocab_size'), g('hidden_size'), g('intermediate_size')
  heads = g('num_heads')
  out: list[_Tensor] = []

  def add(torch_name, flax_path, kind, shape, tf_name, tf_transpose=False):
    known = d is not None and None not in shape
    out.append(_Tensor(torch_name, ('params', *flax_path), kind,
                       tuple(shape) if known else None, tf_name, tf_transpose,
                       heads if kind.startswith('heads') else None))

  def layer_norm(torch_prefix, flax_path, tf_prefix):
    add(f'{torch_prefix}.weight', (*flax_path, 'scale'), 'vector', (h,),
        f'{tf_prefix}/gamma')
    add(f'{torch_prefix}.bias', (*flax_path, 'bias'), 'vector', (h,),
        f'{tf_prefix}/beta')

  def dense(torch_prefix, flax_path, tf_prefix, out_dim, in_dim,
            kind='dense', bias_kind='vector'):
    add(f'{torch_prefix}.weight', (*flax_path, 'kernel'), kind,
        (out_dim, in_dim), f'{tf_prefix}/kernel', True)
    add(f'{torch_prefix}.bias', (*flax_path, 'bias'), bias_kind, (out_dim,),
        f'{tf_prefix}/bias')

  emb = ('bert', 'embeddings')
  for name, rows in (('word_embeddings', v),
                     ('position_embeddings', g('max_position')),
                     ('token_type_embeddings', g('type_vocab_size'))):
    add(f'bert.embeddings.{name}.weight', (*emb, name, 'embedding'), 'embed',
        (rows, h), f'bert/embeddings/{name}')
  layer_norm('bert.embeddings.LayerNorm', (*emb, 'layer_norm'),
             'bert/embeddings/LayerNorm')
  for i in range(num_layers):
    tp, fp, tfp = (f'bert.encoder.layer.{i}', ('bert', f'encoder_layer_{i}'),
                   f'bert/encoder/layer_{i}')
    for proj in ('query', 'key', 'value'):
      dense(f'{tp}.attention.self.{proj}', (*fp, 'attention', proj),
            f'{tfp}/attention/self/{proj}', h, h, 'heads_in', 'heads_bias')
    dense(f'{tp}.attention.output.dense', (*fp, 'attention', 'out'),
          f'{tfp}/attention/output/dense', h, h, 'heads_out')
    layer_norm(f'{tp}.attention.output.LayerNorm',
               (*fp, 'attention_layer_norm'),
               f'{tfp}/attention/output/LayerNorm')
    dense(f'{tp}.intermediate.dense', (*fp, 'intermediate'),
          f'{tfp}/intermediate/dense', f, h)
    dense(f'{tp}.output.dense', (*fp, 'output'), f'{tfp}/output/dense', h, f)
    layer_norm(f'{tp}.output.LayerNorm', (*fp, 'output_layer_norm'),
               f'{tfp}/output/LayerNorm')
  dense('bert.pooler.dense', ('pooler',), 'bert/pooler/dense', h, h)
  add('cls.predictions.bias', ('mlm_output_bias',), 'vector', (v,),
      'cls/predictions/output_bias')
  dense('cls.predictions.transform.dense', ('mlm_transform',),
        'cls/predictions/transform/dense', h, h)
  layer_norm('cls.predictions.transform.LayerNorm', ('mlm_layer_norm',),
             'cls/predictions/transform/LayerNorm')
  add('cls.seq_relationship.weight', ('nsp', 'kernel'), 'dense', (2, h),
      'cls/seq_relationship/output_weights')
  add('cls.seq_relationship.bias', ('nsp', 'bias'), 'vector', (2,),
      'cls/seq_relationship/output_bias')
  return out


def bert_checker_tensor_names(num_layers: int = 24) -> list[str]:
  """The TF names of BERT's weights, as the MLPerf checker wants them.

  These are the `tensor` values of the weights_initialization events that
  closed_bert.yaml (MLPerf Training 2.1.0 and later) requires: the 398
  weights of BERT-large in the reference's (TF1) names, in its order.
  """
  return [t.tf_name for t in bert_tensors(num_layers)]


def bert_num_layers(names: Iterable[str]) -> int:
  """Encoder depth from PyTorch or TF names: 1 + the largest layer index."""
  found = [int(m.group(1)) for m in map(_BERT_LAYER.match, names) if m]
  return max(found) + 1 if found else 0


def bert_dims(shapes: Mapping[str, tuple[int, ...]], *,
              num_heads: int = BERT_LARGE_NUM_HEADS,
              num_layers: int | None = None) -> dict[str, int]:
  """BERT's sizes from the PyTorch shapes of its tensors.

  vocab_size and hidden_size come from bert.embeddings.word_embeddings
  (vocab, hidden), max_position and type_vocab_size from the position and
  token-type embeddings, intermediate_size from layer 0's
  intermediate.dense (ffn, hidden). The number of heads is not in any shape
  (the projections are hidden x hidden whatever it is): it is `num_heads`.
  """
  def shape(name, rank=2):
    s = tuple(int(x) for x in shapes[name])
    if len(s) != rank:
      raise InteropError(f'bert: tensor {name} has rank {len(s)}, expected '
                         f'{rank}')
    return s
  vocab, hidden = shape('bert.embeddings.word_embeddings.weight')
  if num_layers is None:
    num_layers = bert_num_layers(shapes)
  ffn = (shape('bert.encoder.layer.0.intermediate.dense.weight')[0]
         if num_layers else None)
  num_heads = int(num_heads)
  if num_heads < 1 or hidden % num_heads:
    raise InteropError(
        f'bert: hidden size {hidden} (from bert.embeddings.word_embeddings) '
        f'is not a multiple of num_heads={num_heads}; pass the num_heads of '
        f'the checkpoint\'s model')
  return {'vocab_size': vocab, 'hidden_size': hidden,
          'intermediate_size': ffn,
          'max_position':
              shape('bert.embeddings.position_embeddings.weight')[0],
          'type_vocab_size':
              shape('bert.embeddings.token_type_embeddings.weight')[0],
          'num_heads': num_heads, 'num_layers': num_layers}


def _bert(names: Iterable[str] | None,
          shapes: Mapping[str, tuple[int, ...]] | None, *,
          num_heads: int | None = None,
          num_layers: int | None = None) -> list[_Tensor]:
  if num_layers is None:
    num_layers = bert_num_layers(shapes if names is None else names)
  if shapes is None:
    return bert_tensors(num_layers)
  return bert_tensors(num_layers, bert_dims(
      shapes, num_layers=num_layers,
      num_heads=BERT_LARGE_NUM_HEADS if num_heads is None else num_heads))


def _bert_options(options: dict[str, Any], expected: Mapping | None):
  """num_heads from `expected` (its query kernel [H, N, D]) if not given."""
  if options.get('num_heads') is None and expected is not None:
    try:
      kernel = _leaf(_get(expected, ('params', 'bert', 'encoder_layer_0',
                                     'attention', 'query', 'kernel'), 'bert'))
      options['num_heads'] = int(kernel.shape[1])
    except (InteropError, AttributeError, IndexError):
      pass
  return options


# ------------------------------------------------------------------ dlrm

_DLRM_TABLE = re.compile(r'^emb_l\.(\d+)\.weight$')
_DLRM_LINEAR = re.compile(r'^(bot_l|top_l)\.(\d+)\.(?:weight|bias)$')


def dlrm_tensors(num_tables: int, num_bottom: int, num_top: int,
                 dims: Mapping[str, Any] | None = None) -> list[_Tensor]:
  """The MLPerf DLRM_Net (jaxperf.torch_models.dlrm) <-> models/dlrm.py.

  Mapping: emb_l.{t}.weight [rows_t, D] <-> tables[t] (the tables live
  outside Flax: the variables are {'params': DenseArch's params, 'tables':
  [one array per table]}); bot_l.{2k}.{weight,bias} <->
  params/bottom_mlp/dense_{k}/{kernel,bias}; top_l.{2k}.* <->
  params/top_mlp/dense_{k}/* (the odd indices are the activations, which
  hold no tensors). Linear weights are (out, in), Flax kernels (in, out).

  Given `dims` (dlrm_dims) each tensor also carries the PyTorch shape they
  imply: the bottom MLP ends in the embedding width, the top MLP takes the
  interaction (D + (T + 1) T / 2 features) and ends in 1, every layer takes
  the previous one's width; a table's row count is its own.
  """
  d = dict(dims) if dims is not None else None
  out = []
  for t in range(num_tables):
    shape = (d['table_sizes'][t], d['embed_dim']) if d else None
    out.append(_Tensor(f'emb_l.{t}.weight', ('tables', str(t)), 'embed',
                       shape))
  for prefix, module, count in (('bot_l', 'bottom_mlp', num_bottom),
                                ('top_l', 'top_mlp', num_top)):
    if d:      # the input width, then each layer's output width
      widths = (d['num_dense'] if module == 'bottom_mlp'
                else d['interaction_dim'],) + tuple(d[module])
    for k in range(count):
      path = ('params', module, f'dense_{k}')
      out += [_Tensor(f'{prefix}.{2 * k}.weight', (*path, 'kernel'), 'dense',
                      (widths[k + 1], widths[k]) if d else None),
              _Tensor(f'{prefix}.{2 * k}.bias', (*path, 'bias'), 'vector',
                      (widths[k + 1],) if d else None)]
  return out


def dlrm_counts(names: Iterable[str]) -> dict[str, int]:
  """num_tables, num_bottom and num_top (Linear layers) from tensor names:
  1 + the largest table index, 1 + the largest Linear index / 2."""
  tables, layers = [-1], {'bot_l': [-1], 'top_l': [-1]}
  for name in names:
    if m := _DLRM_TABLE.match(name):
      tables.append(int(m.group(1)))
    elif m := _DLRM_LINEAR.match(name):
      layers[m.group(1)].append(int(m.group(2)) // 2)
  return {'num_tables': max(tables) + 1,
          'num_bottom': max(layers['bot_l']) + 1,
          'num_top': max(layers['top_l']) + 1}


def dlrm_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """DLRM's sizes from the PyTorch shapes of its tensors.

  table_sizes from each emb_l.{t}.weight's rows; embed_dim the tables'
  width (the most common one); num_dense from bot_l.0.weight's input. Each
  hidden MLP width is told three times, by its Linear weight's output, its
  bias and the next weight's input: the most common value is taken, so that
  the tensor that disagrees is the one named. The model fixes the rest: the
  bottom MLP ends in embed_dim (the dot interaction needs it), the top MLP
  in 1 (the click logit), and the top MLP takes embed_dim + (T + 1) T / 2
  features for T tables.
  """
  counts = dlrm_counts(shapes)
  if not counts['num_tables'] or not counts['num_bottom'] or not (
      counts['num_top']):
    raise InteropError('dlrm: the state_dict needs emb_l.0.weight, '
                       'bot_l.0.weight and top_l.0.weight at least')

  def shape(name, rank=2):
    s = tuple(int(x) for x in shapes[name])
    if len(s) != rank:
      raise InteropError(f'dlrm: tensor {name} has rank {len(s)}, expected '
                         f'{rank}')
    return s

  def most_common(values):
    return max(values, key=values.count)     # ties: the first one

  tables = [shape(f'emb_l.{t}.weight') for t in range(counts['num_tables'])]
  embed_dim = most_common([s[1] for s in tables])

  def widths(prefix, count, last):
    out = []
    for k in range(count - 1):
      out.append(most_common([shape(f'{prefix}.{2 * k}.weight')[0],
                              shape(f'{prefix}.{2 * k}.bias', 1)[0],
                              shape(f'{prefix}.{2 * k + 2}.weight')[1]]))
    return tuple(out) + (last,)
  n = counts['num_tables'] + 1
  return {'table_sizes': tuple(s[0] for s in tables), 'embed_dim': embed_dim,
          'num_dense': shape('bot_l.0.weight')[1],
          'bottom_mlp': widths('bot_l', counts['num_bottom'], embed_dim),
          'top_mlp': widths('top_l', counts['num_top'], 1),
          'interaction_dim': embed_dim + n * (n - 1) // 2}


def _dlrm(names: Iterable[str] | None,
          shapes: Mapping[str, tuple[int, ...]] | None, *,
          num_tables: int | None = None, num_bottom: int | None = None,
          num_top: int | None = None) -> list[_Tensor]:
  counts = dlrm_counts((shapes if names is None else names) or ())
  for key, value in (('num_tables', num_tables), ('num_bottom', num_bottom),
                     ('num_top', num_top)):
    # At least one of each: a state_dict or variables tree without any is
    # told the first one is missing.
    counts[key] = max(1, counts[key] if value is None else value)
  return dlrm_tensors(**counts,
                      dims=None if shapes is None else dlrm_dims(shapes))


# ------------------------------------------------------------------ retinanet

RETINANET_NUM_CLASSES = 264
RETINANET_NUM_ANCHORS = 9
# The conv layers of each RetinaNet head (torchvision: conv.0..3, each a
# Conv2dNormActivation whose convolution is `.0`).
_RETINANET_HEAD_CONVS = 4
# Names of the MLPerf reference's own copy of RetinaNet (and of torchvision
# before its Conv2dNormActivation blocks): the FPN's convolutions without the
# `.0`, the heads' as the even entries of a Sequential of conv and ReLU.
_RETINANET_LEGACY_FPN = re.compile(
    r'^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$')
_RETINANET_LEGACY_HEAD = re.compile(
    r'^(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)$')


def _frozen_bn(torch_prefix: str, flax_module: tuple[str, ...],
               c: int | None) -> list[_Tensor]:
  """torchvision FrozenBatchNorm2d <-> models/retinanet.FrozenBatchNorm."""
  return [_Tensor(f'{torch_prefix}.{name}',
                  ('batch_stats', *flax_module, flax_name), 'vector',
                  None if c is None else (c,))
          for name, flax_name in (('weight', 'scale'), ('bias', 'bias'),
                                  ('running_mean', 'mean'),
                                  ('running_var', 'var'))]


def retinanet_tensors(num_classes: int | None = None,
                      num_anchors: int | None = None,
                      stage_sizes: Sequence[int] = (3, 4, 6, 3),
                      groups: int = 32, width_per_group: int = 4,
                      fpn_channels: int = 256) -> list[_Tensor]:
  """torchvision's RetinaNet (ResNeXt FPN backbone) <-> models/retinanet.py.

  One entry per tensor, in the order of torchvision's state_dict. Given
  num_classes and num_anchors each entry carries its PyTorch shape.

  Mapping: backbone.body.conv1 <-> backbone/conv0; backbone.body.bn1 <->
  backbone/bn0; backbone.body.layer{s}.{u}.conv{k} / bn{k} <->
  backbone/stage{s}_unit{u + 1}/conv{k} / bn{k}; .downsample.0 / .1 <->
  conv1sc / bnsc. Frozen batch norms' weight, bias, running_mean and
  running_var <-> batch_stats .../scale, bias, mean, var.
  backbone.fpn.inner_blocks.{i}.0 / layer_blocks.{i}.0 <-> fpn/inner{i} /
  layer{i}; backbone.fpn.extra_blocks.p6 / p7 <-> fpn/p6 / p7;
  head.{classification,regression}_head.conv.{i}.0 <->
  {classification,regression}_head/conv{i}; cls_logits and bbox_reg keep
  their names. Convolution weights <-> kernel, biases <-> bias.
  """
  known = num_classes is not None and num_anchors is not None
  shape = lambda *s: tuple(s) if known else None
  out = [_Tensor('backbone.body.conv1.weight',
                 ('params', 'backbone', 'conv0', 'kernel'), 'conv',
                 shape(64, 3, 7, 7)),
         *_frozen_bn('backbone.body.bn1', ('backbone', 'bn0'),
                     64 if known else None)]
  cin = 64
  for s, blocks in enumerate(stage_sizes):
    filters = 64 * 2**s
    width = filters * width_per_group * groups // 64
    for u in range(blocks):
      tp, fm = f'backbone.body.layer{s + 1}.{u}', f'stage{s + 1}_unit{u + 1}'
      convs = ((1, width, cin, 1), (2, width, width // groups, 3),
               (3, 4 * filters, width, 1))
      for k, co, ci, ks in convs:
        out.append(_Tensor(f'{tp}.conv{k}.weight',
                           ('params', 'backbone', fm, f'conv{k}', 'kernel'),
                           'conv', shape(co, ci, ks, ks)))
        out += _frozen_bn(f'{tp}.bn{k}', ('backbone', fm, f'bn{k}'),
                          co if known else None)
      if u == 0:
        out.append(_Tensor(f'{tp}.downsample.0.weight',
                           ('params', 'backbone', fm, 'conv1sc', 'kernel'),
                           'conv', shape(4 * filters, cin, 1, 1)))
        out += _frozen_bn(f'{tp}.downsample.1', ('backbone', fm, 'bnsc'),
                          4 * filters if known else None)
      cin = 4 * filters
  f = fpn_channels

  def conv(torch_prefix, flax_module, cout, cin, k):
    return [_Tensor(f'{torch_prefix}.weight',
                    ('params', *flax_module, 'kernel'), 'conv',
                    shape(cout, cin, k, k)),
            _Tensor(f'{torch_prefix}.bias', ('params', *flax_module, 'bias'),
                    'vector', shape(cout))]
  levels = range(1, len(stage_sizes))
  for i, s in enumerate(levels):
    out += conv(f'backbone.fpn.inner_blocks.{i}.0', ('fpn', f'inner{i}'), f,
                64 * 2**s * 4, 1)
  for i, _ in enumerate(levels):
    out += conv(f'backbone.fpn.layer_blocks.{i}.0', ('fpn', f'layer{i}'), f,
                f, 3)
  for p in ('p6', 'p7'):
    out += conv(f'backbone.fpn.extra_blocks.{p}', ('fpn', p), f, f, 3)
  for head, final, per_anchor in (
      ('classification_head', 'cls_logits', num_classes),
      ('regression_head', 'bbox_reg', 4)):
    for i in range(_RETINANET_HEAD_CONVS):
      out += conv(f'head.{head}.conv.{i}.0', (head, f'conv{i}'), f, f, 3)
    out += conv(f'head.{head}.{final}', (head, final),
                (num_anchors * per_anchor) if known else None, f, 3)
  return out


def retinanet_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
  """num_classes and num_anchors of a RetinaNet from its PyTorch shapes.

  Read from the biases of bbox_reg (anchors * 4) and cls_logits (anchors *
  classes); the other tensors are then checked against them.
  """
  def length(name):
    s = tuple(shapes[name])
    if len(s) != 1 or s[0] <= 0:
      raise InteropError(f'retinanet: tensor {name} has shape {s}, expected '
                         f'one positive length')
    return int(s[0])
  reg = length('head.regression_head.bbox_reg.bias')
  cls = length('head.classification_head.cls_logits.bias')
  if reg % 4 or cls % (reg // 4):
    raise InteropError(
        f'retinanet: tensor head.regression_head.bbox_reg.bias has length '
        f'{reg} and head.classification_head.cls_logits.bias {cls}: they '
        f'must be anchors * 4 and anchors * classes')
  return {'num_anchors': reg // 4, 'num_classes': cls // (reg // 4)}


def _retinanet(names: Iterable[str] | None,
               shapes: Mapping[str, tuple[int, ...]] | None
               ) -> list[_Tensor]:
  del names
  return retinanet_tensors(**(retinanet_dims(shapes) if shapes else {}))


def retinanet_current_name(name: str) -> str:
  """torchvision's current name of a RetinaNet tensor given in the MLPerf
  reference's (older torchvision's) naming; other names are unchanged."""
  if m := _RETINANET_LEGACY_FPN.match(name):
    return f'{m.group(1)}.0.{m.group(2)}'
  if (m := _RETINANET_LEGACY_HEAD.match(name)) and int(m.group(2)) % 2 == 0:
    return f'{m.group(1)}.{int(m.group(2)) // 2}.0.{m.group(3)}'
  return name


def retinanet_checker_tensor_names() -> list[str]:
  """The tensor names the MLPerf checker wants for RetinaNet.

  These are the `tensor` values of the weights_initialization events that
  closed_ssd.yaml (MLPerf Training 2.1.0 and later) requires: the 89
  parameters of the reference model (its batch norms are frozen buffers, not
  parameters) in the reference's naming (older torchvision's: FPN
  inner_blocks.{i}.weight, heads conv.{0,2,4,6}.weight) behind the
  "module." of its DistributedDataParallel wrapper, sorted.
  """
  legacy = {}
  for i in range(3):
    for kind in ('inner', 'layer'):
      for w in ('weight', 'bias'):
        legacy[f'backbone.fpn.{kind}_blocks.{i}.0.{w}'] = (
            f'backbone.fpn.{kind}_blocks.{i}.{w}')
  for head in ('classification_head', 'regression_head'):
    for i in range(_RETINANET_HEAD_CONVS):
      for w in ('weight', 'bias'):
        legacy[f'head.{head}.conv.{i}.0.{w}'] = f'head.{head}.conv.{2 * i}.{w}'
  return sorted('module.' + legacy.get(t.torch_name, t.torch_name)
                for t in retinanet_tensors() if t.flax_path[0] == 'params')


def retinanet_backbone_from_torch(state_dict: Mapping[str, Any],
                                  expected: Mapping | None = None, *,
                                  source: str = 'state_dict'
                                  ) -> dict[str, Any]:
  """RetinaNet's backbone from a torchvision resnext50_32x4d state_dict.

  The classifier's tensors (conv1, bn1, layer1..4; the fc layer is not
  used) go to params/backbone and the frozen batch norms' batch_stats/
  backbone, as the reference starts from ImageNet weights
  (resnext50_32x4d-7cdf4587.pth). Returns {'params': {'backbone': ...},
  'batch_stats': {'backbone': ...}}; `expected` (the same structure, arrays
  or shapes) is checked tensor by tensor. `source` names the file in errors.
  """
  # (The class and anchor counts only shape the heads, not used here.)
  tensors = [t for t in retinanet_tensors(num_classes=1, num_anchors=1)
             if t.flax_path[1] == 'backbone']
  given = {k: v for k, v in state_dict.items()
           if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith('fc.')}
  return _backbone_from_torch(given, tensors, expected, source, 'retinanet',
                              'a torchvision resnext50_32x4d state_dict')


def _backbone_from_torch(state_dict: Mapping[str, Any], tensors: list[_Tensor],
                         expected: Mapping | None, source: str,
                         model_name: str, what: str) -> dict[str, Any]:
  """The backbone `tensors` (torch names under backbone.body.) from a
  classifier's state_dict without that prefix, checked name by name and
  shape by shape; {'params': {'backbone'}, 'batch_stats': {'backbone'}}."""
  prefix = 'backbone.body.'
  names = {t.torch_name[len(prefix):]: t for t in tensors}
  given = set(state_dict)
  missing = sorted(set(names) - given)
  unexpected = sorted(given - set(names))
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f'missing {len(missing)} tensor(s): '
                   f'{", ".join(missing[:6])}' + (' ...' if len(missing) > 6
                                                  else ''))
    if unexpected:
      parts.append(f'unexpected {len(unexpected)} tensor(s): '
                   f'{", ".join(unexpected[:6])}'
                   + (' ...' if len(unexpected) > 6 else ''))
    raise InteropError(f'{source}: not {what}: {"; ".join(parts)}')
  out: dict[str, Any] = {}
  for name, t in names.items():
    a = _numpy(state_dict[name])
    if t.shape is not None and tuple(a.shape) != t.shape:
      raise InteropError(f'{source}: tensor {name} has shape {tuple(a.shape)}'
                         f', expected {t.shape}')
    a = _to_flax(t, a)
    if expected is not None:
      want = tuple(_get(expected, t.flax_path, model_name).shape)
      if want != tuple(a.shape):
        raise InteropError(
            f'{source}: tensor {name} has shape '
            f'{_torch_shape(t, a.shape)}, the model expects '
            f'{_torch_shape(t, want)}')
    node = out
    for key in t.flax_path[:-1]:
      node = node.setdefault(key, {})
    node[t.flax_path[-1]] = a
  return out


# ------------------------------------------------------------------ maskrcnn

# maskrcnn-benchmark (the MLPerf reference) -> torchvision names.
_MASKRCNN_REFERENCE_NAMES = (
    (re.compile(r'^backbone\.body\.stem\.'), lambda m: 'backbone.body.'),
    (re.compile(r'^backbone\.fpn\.fpn_(inner|layer)(\d+)\.'),
     lambda m: f'backbone.fpn.{m.group(1)}_blocks.{int(m.group(2)) - 1}.0.'),
    (re.compile(r'^rpn\.head\.conv\.(?=weight$|bias$)'),
     lambda m: 'rpn.head.conv.0.0.'),
    (re.compile(r'^roi_heads\.box\.feature_extractor\.'),
     lambda m: 'roi_heads.box_head.'),
    (re.compile(r'^roi_heads\.box\.predictor\.'),
     lambda m: 'roi_heads.box_predictor.'),
    (re.compile(r'^roi_heads\.mask\.feature_extractor\.mask_fcn(\d+)\.'),
     lambda m: f'roi_heads.mask_head.{int(m.group(1)) - 1}.0.'),
    (re.compile(r'^roi_heads\.mask\.predictor\.'),
     lambda m: 'roi_heads.mask_predictor.'),
)
# The reference's RPN anchor generator keeps its cell anchors (one per FPN
# level) as buffers in the state_dict.
_MASKRCNN_ANCHOR_BUFFERS = tuple(f'rpn.anchor_generator.cell_anchors.{i}'
                                 for i in range(5))


def maskrcnn_tensors(num_classes: int | None = None,
                     num_anchors: int | None = None) -> list[_Tensor]:
  """torchvision's maskrcnn_resnet50_fpn <-> models/maskrcnn.py.

  One entry per tensor, in the order of torchvision's state_dict (ResNet-50
  widths, 256 FPN channels, a 1024-wide box MLP on 7x7 pooled features, a
  256-wide mask head); given num_classes and num_anchors each entry carries
  its PyTorch shape.

  Mapping: the backbone as retinanet_tensors maps it (backbone.body.conv1 /
  bn1 <-> backbone/conv0 / bn0; layer{s}.{u}.conv{k} / bn{k} <->
  backbone/stage{s}_unit{u + 1}/conv{k} / bn{k}; downsample.0 / .1 <->
  conv1sc / bnsc; frozen batch norms' weight, bias, running_mean and
  running_var <-> batch_stats .../scale, bias, mean, var).
  backbone.fpn.inner_blocks.{i}.0 / layer_blocks.{i}.0 <-> fpn/inner{i} /
  layer{i}; rpn.head.conv.0.0 / cls_logits / bbox_pred <-> rpn_head/conv /
  cls_logits / bbox_pred; roi_heads.box_head.fc6 / fc7 <->
  box_feature_extractor/fc6 / fc7; roi_heads.box_predictor.cls_score /
  bbox_pred <-> box_predictor/cls_score / bbox_pred;
  roi_heads.mask_head.{i}.0 <-> mask_feature_extractor/mask_fcn{i + 1};
  roi_heads.mask_predictor.conv5_mask / mask_fcn_logits <->
  mask_predictor/conv5_mask / mask_fcn_logits.

  Layouts: fc6's (1024, 256 * 7 * 7) weight is the transpose of the Flax
  kernel as is (the box head flattens its pooled features channel-major, as
  PyTorch's NCHW flatten does). conv5_mask's ConvTranspose2d weight (in,
  out, 2, 2) becomes the Flax kernel (2, 2, out, in), the permutation of a
  convolution's OIHW -> HWIO.
  """
  known = num_classes is not None and num_anchors is not None
  shape = lambda *s: tuple(s) if known else None
  backbone = retinanet_tensors(num_classes, num_anchors, groups=1,
                               width_per_group=64)
  out = [t for t in backbone if t.flax_path[1] == 'backbone']

  def layer(torch_prefix, flax_module, kind, weight_shape):
    return [_Tensor(f'{torch_prefix}.weight',
                    ('params', *flax_module, 'kernel'), kind,
                    shape(*weight_shape)),
            _Tensor(f'{torch_prefix}.bias', ('params', *flax_module, 'bias'),
                    'vector', shape(weight_shape[0]))]
  f = 256
  for i in range(4):
    out += layer(f'backbone.fpn.inner_blocks.{i}.0', ('fpn', f'inner{i}'),
                 'conv', (f, 256 * 2**i, 1, 1))
  for i in range(4):
    out += layer(f'backbone.fpn.layer_blocks.{i}.0', ('fpn', f'layer{i}'),
                 'conv', (f, f, 3, 3))
  a, c = num_anchors or 0, num_classes or 0
  out += layer('rpn.head.conv.0.0', ('rpn_head', 'conv'), 'conv',
               (f, f, 3, 3))
  out += layer('rpn.head.cls_logits', ('rpn_head', 'cls_logits'), 'conv',
               (a, f, 1, 1))
  out += layer('rpn.head.bbox_pred', ('rpn_head', 'bbox_pred'), 'conv',
               (4 * a, f, 1, 1))
  out += layer('roi_heads.box_head.fc6', ('box_feature_extractor', 'fc6'),
               'dense', (1024, f * 7 * 7))
  out += layer('roi_heads.box_head.fc7', ('box_feature_extractor', 'fc7'),
               'dense', (1024, 1024))
  out += layer('roi_heads.box_predictor.cls_score',
               ('box_predictor', 'cls_score'), 'dense', (c, 1024))
  out += layer('roi_heads.box_predictor.bbox_pred',
               ('box_predictor', 'bbox_pred'), 'dense', (4 * c, 1024))
  for i in range(4):
    out += layer(f'roi_heads.mask_head.{i}.0',
                 ('mask_feature_extractor', f'mask_fcn{i + 1}'), 'conv',
                 (f, f, 3, 3))
  # ConvTranspose2d: (in, out, kh, kw); its bias has `out` entries (equal
  # here).
  out += layer('roi_heads.mask_predictor.conv5_mask',
               ('mask_predictor', 'conv5_mask'), 'conv', (f, f, 2, 2))
  out += layer('roi_heads.mask_predictor.mask_fcn_logits',
               ('mask_predictor', 'mask_fcn_logits'), 'conv', (c, f, 1, 1))
  return out


def maskrcnn_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
  """num_classes and num_anchors of a Mask R-CNN from its PyTorch shapes.

  Read from the biases of roi_heads.box_predictor.cls_score (classes) and
  rpn.head.cls_logits (anchors); the other tensors are then checked against
  them.
  """
  def length(name):
    s = tuple(shapes[name])
    if len(s) != 1 or s[0] <= 0:
      raise InteropError(f'maskrcnn: tensor {name} has shape {s}, expected '
                         f'one positive length')
    return int(s[0])
  return {'num_classes': length('roi_heads.box_predictor.cls_score.bias'),
          'num_anchors': length('rpn.head.cls_logits.bias')}


def _maskrcnn(names: Iterable[str] | None,
              shapes: Mapping[str, tuple[int, ...]] | None) -> list[_Tensor]:
  del names
  return maskrcnn_tensors(**(maskrcnn_dims(shapes) if shapes else {}))


def maskrcnn_current_name(name: str) -> str:
  """torchvision's name of a Mask R-CNN tensor given in maskrcnn-benchmark's
  (the MLPerf reference's) naming: backbone.body.stem.conv1 ->
  backbone.body.conv1, backbone.fpn.fpn_inner{i} ->
  backbone.fpn.inner_blocks.{i - 1}.0, rpn.head.conv -> rpn.head.conv.0.0,
  roi_heads.box.feature_extractor -> roi_heads.box_head,
  roi_heads.box.predictor -> roi_heads.box_predictor,
  roi_heads.mask.feature_extractor.mask_fcn{i} ->
  roi_heads.mask_head.{i - 1}.0, roi_heads.mask.predictor ->
  roi_heads.mask_predictor. Other names are unchanged."""
  for pattern, replace in _MASKRCNN_REFERENCE_NAMES:
    if m := pattern.match(name):
      return replace(m) + name[m.end():]
  return name


def maskrcnn_checker_tensors() -> dict[str, tuple[str, ...]]:
  """The tensor names the MLPerf checker wants for Mask R-CNN, each with
  the Flax module (under 'params') it names.

  These are the `tensor` values of the weights_initialization events that
  closed_maskrcnn.yaml (MLPerf Training 2.1.0) requires, in its order: the
  layers initialized from scratch (the backbone starts from ImageNet
  weights).
  """
  out = {}
  for i in range(4):
    out[f'FPN_inner_block{i + 1}'] = ('fpn', f'inner{i}')
    out[f'FPN_layer_block{i + 1}'] = ('fpn', f'layer{i}')
  out.update({
      'RPNHead_conv': ('rpn_head', 'conv'),
      'RPNHead_cls': ('rpn_head', 'cls_logits'),
      'RPNHead_bbox': ('rpn_head', 'bbox_pred'),
      'ROI_BOX_FEATURE_EXTRACTOR_fc6': ('box_feature_extractor', 'fc6'),
      'ROI_BOX_FEATURE_EXTRACTOR_fc7': ('box_feature_extractor', 'fc7'),
      'ROI_BOX_PREDICTOR_cls': ('box_predictor', 'cls_score'),
      'ROI_BOX_PREDICTOR_bbox': ('box_predictor', 'bbox_pred')})
  for i in range(4):
    out[f'ROI_MASK_FEATURE_EXTRACTOR_fcn{i + 1}'] = (
        'mask_feature_extractor', f'mask_fcn{i + 1}')
  out['ROI_MASK_PREDICTOR_fcn5'] = ('mask_predictor', 'conv5_mask')
  out['ROI_MASK_PREDICTOR_fcn_logits'] = ('mask_predictor', 'mask_fcn_logits')
  return out


def maskrcnn_checker_tensor_names() -> list[str]:
  """The 21 tensor names closed_maskrcnn.yaml requires (see
  maskrcnn_checker_tensors)."""
  return list(maskrcnn_checker_tensors())


# Detectron (Caffe2) ResNet blob names -> torchvision's ResNet names.
_C2_RESNET_NAMES = (
    (re.compile(r'^conv1_w$'), lambda m: 'conv1.weight'),
    (re.compile(r'^res_conv1_bn_([sb])$'),
     lambda m: f'bn1.{_C2_AFFINE[m.group(1)]}'),
    (re.compile(r'^res([2-5])_(\d+)_branch2([abc])_w$'),
     lambda m: (f'layer{int(m.group(1)) - 1}.{m.group(2)}.'
                f'conv{"abc".index(m.group(3)) + 1}.weight')),
    (re.compile(r'^res([2-5])_(\d+)_branch2([abc])_bn_([sb])$'),
     lambda m: (f'layer{int(m.group(1)) - 1}.{m.group(2)}.'
                f'bn{"abc".index(m.group(3)) + 1}.'
                f'{_C2_AFFINE[m.group(4)]}')),
    (re.compile(r'^res([2-5])_0_branch1_w$'),
     lambda m: f'layer{int(m.group(1)) - 1}.0.downsample.0.weight'),
    (re.compile(r'^res([2-5])_0_branch1_bn_([sb])$'),
     lambda m: (f'layer{int(m.group(1)) - 1}.0.downsample.1.'
                f'{_C2_AFFINE[m.group(2)]}')),
)
_C2_AFFINE = {'s': 'weight', 'b': 'bias'}
# The ImageNet classifier and the solver's momentum blobs are not used.
_C2_IGNORED = re.compile(r'^(pred_[wb]|fc1000_[wb])$|_momentum$')


def read_c2_pickle(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The blobs of a Detectron (Caffe2) weights file such as the reference's
  ImageNet backbone, R-50.pkl: a pickle of {name: array}, or of
  {'blobs': {name: array}, ...}, written by Python 2 (read as latin1)."""
  import pickle  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InteropError(f'{path}: no such file; expected a Detectron weights '
                       f'pickle (R-50.pkl)')
  try:
    with open(path, 'rb') as f:
      data = pickle.load(f, encoding='latin1')
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, ImportError, IndexError) as e:
    raise InteropError(f'{path}: not a readable pickle ({e}); expected a '
                       f'Detectron weights pickle (R-50.pkl)') from None
  if isinstance(data, Mapping) and 'blobs' in data:
    data = data['blobs']
  if not isinstance(data, Mapping) or not all(
      isinstance(k, str) for k in data):
    raise InteropError(f'{path}: expected a dict of named arrays (or one '
                       f"under 'blobs'), got {type(data).__name__}")
  return {k: np.asarray(v) for k, v in data.items()}


def maskrcnn_backbone_from_c2(blobs: Mapping[str, Any],
                              expected: Mapping | None = None, *,
                              source: str = 'R-50.pkl') -> dict[str, Any]:
  """Mask R-CNN's ResNet-50 backbone from Detectron's ImageNet weights (the
  reference's catalog://ImageNetPretrained/MSRA/R-50, read by
  `read_c2_pickle`), renamed as maskrcnn-benchmark's c2_model_loading
  renames them: conv1_w -> conv1, res_conv1_bn_{s,b} -> bn1 weight / bias,
  res{k}_{i}_branch2{a,b,c} -> layer{k-1}.{i}.conv{1,2,3} (and _bn ->
  bn{1,2,3}), res{k}_0_branch1 -> downsample.0 (and _bn -> downsample.1).

  The file's batch norms are affine channels (scale s, bias b); the frozen
  batch norms get them as weight and bias with mean 0 and variance 1, which
  with the reference's epsilon 0 is the same affine map. The weights are
  Caffe2's OIHW, for BGR 0..255 inputs minus the pixel mean (the
  reference's input) and with the stride on the first 1x1 of a
  downsampling block (`stride_in_1x1=True`). Returns {'params':
  {'backbone'}, 'batch_stats': {'backbone'}}; `expected` (the same
  structure, arrays or shapes) is checked tensor by tensor.
  """
  state_dict: dict[str, Any] = {}
  unknown = []
  for name, value in blobs.items():
    if _C2_IGNORED.search(name):
      continue
    for pattern, rename in _C2_RESNET_NAMES:
      if m := pattern.match(name):
        state_dict[rename(m)] = np.asarray(value)
        break
    else:
      unknown.append(name)
  if unknown:
    raise InteropError(f'{source}: not a Detectron ResNet-50 weights file: '
                       f'unexpected blob(s) {", ".join(sorted(unknown)[:6])}'
                       + (' ...' if len(unknown) > 6 else ''))
  for name in list(state_dict):
    if name.endswith('.bias') and not name.startswith('conv'):
      module = name[:-len('.bias')]
      if f'{module}.weight' in state_dict:
        c = np.asarray(state_dict[name]).shape
        state_dict[f'{module}.running_mean'] = np.zeros(c, np.float32)
        state_dict[f'{module}.running_var'] = np.ones(c, np.float32)
  tensors = [t for t in maskrcnn_tensors(num_classes=1, num_anchors=1)
             if t.flax_path[1] == 'backbone']
  return _backbone_from_torch(state_dict, tensors, expected, source,
                              'maskrcnn', 'a Detectron ResNet-50 (R-50.pkl)')


# ------------------------------------------------------------------ rnnt


def rnnt_tensors(num_classes: int = 1024, in_features: int = 240,
                 enc_hidden: int = 1024, enc_pre_layers: int = 2,
                 enc_post_layers: int = 3, stack_time_factor: int = 2,
                 pred_hidden: int = 512, pred_layers: int = 2,
                 joint_hidden: int = 512) -> list[_Tensor]:
  """The MLPerf reference RNN-T (jaxperf.torch_models.rnnt) <->
  models/rnnt.py.

  encoder.pre_rnn.lstm / encoder.post_rnn.lstm / prediction.dec_rnn.lstm
  weight_ih_l{k}, weight_hh_l{k} (4H, I) <-> pre_rnn / post_rnn /
  dec_rnn/layer{k}/kernel_ih, kernel_hh (I, 4H), and bias_ih_l{k},
  bias_hh_l{k} as they are (gates i, f, g, o in both);
  prediction.embed.weight <-> pred_embed/embedding; joint_pred, joint_enc
  and joint_net.2 weight / bias <-> joint_pred, joint_enc, joint_net
  kernel / bias.
  """
  out = []

  def lstm(prefix, module, in_size, hidden, layers):
    for k in range(layers):
      i = in_size if k == 0 else hidden
      for w, flax_name, shape in (('weight_ih', 'kernel_ih', (4 * hidden, i)),
                                  ('weight_hh', 'kernel_hh',
                                   (4 * hidden, hidden))):
        out.append(_Tensor(f'{prefix}.lstm.{w}_l{k}',
                           ('params', module, f'layer{k}', flax_name),
                           'dense', shape))
      for b in ('bias_ih', 'bias_hh'):
        out.append(_Tensor(f'{prefix}.lstm.{b}_l{k}',
                           ('params', module, f'layer{k}', b), 'vector',
                           (4 * hidden,)))

  def linear(torch_prefix, module, n_in, n_out):
    out.append(_Tensor(f'{torch_prefix}.weight', ('params', module, 'kernel'),
                       'dense', (n_out, n_in)))
    out.append(_Tensor(f'{torch_prefix}.bias', ('params', module, 'bias'),
                       'vector', (n_out,)))

  lstm('encoder.pre_rnn', 'pre_rnn', in_features, enc_hidden, enc_pre_layers)
  lstm('encoder.post_rnn', 'post_rnn', stack_time_factor * enc_hidden,
       enc_hidden, enc_post_layers)
  out.append(_Tensor('prediction.embed.weight',
                     ('params', 'pred_embed', 'embedding'), 'embed',
                     (num_classes - 1, pred_hidden)))
  lstm('prediction.dec_rnn', 'dec_rnn', pred_hidden, pred_hidden, pred_layers)
  linear('joint_pred', 'joint_pred', pred_hidden, joint_hidden)
  linear('joint_enc', 'joint_enc', enc_hidden, joint_hidden)
  linear('joint_net.2', 'joint_net', joint_hidden, num_classes)
  return out


def rnnt_dims(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
  """The sizes of an RNN-T from its state_dict's shapes and names."""
  def need(name):
    if name not in shapes:
      raise InteropError(f'rnnt: tensor {name} is missing')
    return tuple(int(v) for v in shapes[name])

  def layers(prefix):
    return sum(1 for k in shapes
               if re.fullmatch(rf'{re.escape(prefix)}\.lstm\.weight_ih_l\d+',
                               k))
  pre_ih = need('encoder.pre_rnn.lstm.weight_ih_l0')
  post_ih = need('encoder.post_rnn.lstm.weight_ih_l0')
  embed = need('prediction.embed.weight')
  joint = need('joint_net.2.weight')
  enc_hidden = pre_ih[0] // 4
  return {'num_classes': joint[0], 'in_features': pre_ih[1],
          'enc_hidden': enc_hidden,
          'enc_pre_layers': layers('encoder.pre_rnn'),
          'enc_post_layers': layers('encoder.post_rnn'),
          'stack_time_factor': post_ih[1] // enc_hidden,
          'pred_hidden': embed[1], 'pred_layers': layers('prediction.dec_rnn'),
          'joint_hidden': joint[1]}


def rnnt_checker_tensor_names() -> list[str]:
  """The 7 names closed_rnnt.yaml (2.1.0) wants in weights_initialization
  events: the reference's modules."""
  return ['pre_rnn', 'post_rnn', 'pred_embed', 'dec_rnn', 'joint_pred',
          'joint_enc', 'joint_net']


# ------------------------------------------------------------------ minigo


def minigo_tensors(trunk_layers: int = 6) -> list[_Tensor]:
  """The MLPerf MiniGo reference (dual_net.py's TF1 layers, named by TF in
  creation order: conv2d, batch_normalization, dense, each _1, _2, ...;
  jaxperf.torch_models.minigo registers its modules under the same names)
  <-> models/minigo.py. The heads' batch norms have no scale or offset,
  only their moving statistics."""
  from jaxperf.models import minigo  # pylint: disable=g-import-not-at-top
  out = []
  for layer, tf in minigo.tf_layer_names(trunk_layers):
    if tf.startswith('conv2d'):
      out.append(_Tensor(f'{tf}.weight', ('params', layer, 'kernel'), 'conv',
                         tf_name=f'{tf}/kernel'))
    elif tf.startswith('dense'):
      out += [_Tensor(f'{tf}.weight', ('params', layer, 'kernel'), 'dense',
                      tf_name=f'{tf}/kernel', tf_transpose=True),
              _Tensor(f'{tf}.bias', ('params', layer, 'bias'), 'vector',
                      tf_name=f'{tf}/bias')]
    else:
      if layer not in ('policy_bn', 'value_bn'):
        out += [_Tensor(f'{tf}.weight', ('params', layer, 'scale'), 'vector',
                        tf_name=f'{tf}/gamma'),
                _Tensor(f'{tf}.bias', ('params', layer, 'bias'), 'vector',
                        tf_name=f'{tf}/beta')]
      out += [_Tensor(f'{tf}.running_mean', ('batch_stats', layer, 'mean'),
                      'vector', tf_name=f'{tf}/moving_mean'),
              _Tensor(f'{tf}.running_var', ('batch_stats', layer, 'var'),
                      'vector', tf_name=f'{tf}/moving_variance')]
  return out


def minigo_trunk_layers(names: Iterable[str]) -> int:
  """Residual blocks from PyTorch or TF names: the convolutions are the
  initial one, two a block and one a head."""
  convs = sum(1 for n in names
              if re.fullmatch(r'conv2d(_\d+)?[./](weight|kernel)', n))
  return max((convs - 3) // 2, 0)


def _minigo(names: Iterable[str] | None,
            shapes: Mapping[str, tuple[int, ...]] | None,
            trunk_layers: int | None = None) -> list[_Tensor]:
  del shapes
  if trunk_layers is None:
    trunk_layers = 6 if names is None else minigo_trunk_layers(names)
  return minigo_tensors(trunk_layers)


# ------------------------------------------------------------------ TF1 reader

class UnsupportedCheckpoint(InteropError):
  """A TF checkpoint uses a feature that the numpy reader does not handle."""


# TensorFlow's DataType enum (types.proto) -> numpy, for the numeric types.
_TF_DTYPES = {1: 'float32', 2: 'float64', 3: 'int32', 4: 'uint8', 5: 'int16',
              6: 'int8', 9: 'int64', 10: 'bool', 14: 'bfloat16',
              17: 'uint16', 19: 'float16', 22: 'uint32', 23: 'uint64'}
_TF_DTYPE_NAMES = {7: 'string', 8: 'complex64', 18: 'complex128',
                   20: 'resource', 21: 'variant'}
# leveldb's table magic number, which ends every .index file.
_TABLE_MAGIC = 0xdb4775248b80fb57


def _np_dtype(name: str) -> np.dtype:
  if name == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


_varint = tfrecord._read_varint  # pylint: disable=protected-access


def _proto_fields(buf: bytes) -> list[tuple[int, Any]]:
  """(field number, value) of a serialized protocol buffer message."""
  out, pos = [], 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = int.from_bytes(buf[pos:pos + 8], 'little'), pos + 8
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = bytes(buf[pos:pos + n]), pos + n
    elif wire == 5:
      value, pos = int.from_bytes(buf[pos:pos + 4], 'little'), pos + 4
    else:
      raise ValueError(f'wire type {wire}')
    if pos > len(buf):
      raise ValueError('truncated message')
    out.append((field, value))
  return out


def _int64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _crc32c_masked(data: bytes) -> int:
  import google_crc32c  # pylint: disable=g-import-not-at-top
  crc = google_crc32c.value(data)
  return ((((crc >> 15) | (crc << 17)) & 0xffffffff) + 0xa282ead8) & 0xffffffff


@dataclasses.dataclass(frozen=True)
class _BundleEntry:
  """A BundleEntryProto: where one tensor's bytes are."""
  dtype: int
  shape: tuple[int, ...]
  shard_id: int
  offset: int
  size: int
  crc32c: int | None
  sliced: bool


def _bundle_entry(value: bytes) -> _BundleEntry:
  f = {'dtype': 0, 'shape': (), 'shard_id': 0, 'offset': 0, 'size': 0,
       'crc32c': None, 'sliced': False}
  for field, v in _proto_fields(value):
    if field == 1:
      f['dtype'] = v
    elif field == 2:
      dims = []
      for sf, sv in _proto_fields(v):
        if sf == 2:
          dims.append(_int64(dict(_proto_fields(sv)).get(1, 0)))
        elif sf == 3 and sv:
          raise UnsupportedCheckpoint('a tensor of unknown rank')
      f['shape'] = tuple(dims)
    elif field in (3, 4, 5):
      f[{3: 'shard_id', 4: 'offset', 5: 'size'}[field]] = v
    elif field == 6:
      f['crc32c'] = v
    elif field == 7:
      f['sliced'] = True
  return _BundleEntry(**f)


class TFCheckpoint:
  """A TF checkpoint (tensor bundle, format V2) read with numpy alone.

  The .index file is a leveldb table (sorted keys, prefix-compressed blocks,
  a block index and a footer) mapping each tensor name to a
  BundleEntryProto (dtype, shape, data shard, offset, size, masked CRC32C);
  the empty key holds the BundleHeaderProto (number of shards,
  endianness). The tensors' bytes lie raw in .data-{shard}-of-{shards}.
  Every block and tensor is checked against its CRC32C. Uncompressed
  tables (TensorFlow writes them so) of whole (not partitioned) numeric
  tensors are read; anything else raises UnsupportedCheckpoint.
  """

  def __init__(self, prefix: str):
    self.prefix = prefix
    path = prefix + '.index'
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise InteropError(f'cannot read the TF checkpoint index {path}: '
                         f'{e.strerror or e}') from None
    try:
      entries = self._table(data)
    except (ValueError, IndexError) as e:
      raise InteropError(f'{path}: not a readable TF checkpoint index '
                         f'({e})') from None
    header = entries.pop(b'', None)
    if header is None:
      raise InteropError(f'{path}: no bundle header (not a TF checkpoint '
                         f'index?)')
    h = dict(_proto_fields(header))
    self.num_shards = int(h.get(1, 1))
    if h.get(2, 0) != 0:
      raise UnsupportedCheckpoint(f'{path}: a big-endian checkpoint')
    self.entries: dict[str, _BundleEntry] = {}
    for key, value in entries.items():
      try:
        self.entries[key.decode('utf-8')] = _bundle_entry(value)
      except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise InteropError(f'{path}: unreadable entry {key!r} ({e})') from None

  def _table(self, data: bytes) -> dict[bytes, bytes]:
    if len(data) < 48 or int.from_bytes(data[-8:], 'little') != _TABLE_MAGIC:
      raise ValueError('no table footer')
    footer = data[-48:-8]
    _, pos = _varint(footer, 0)              # metaindex block offset
    _, pos = _varint(footer, pos)            # ... and size
    index_offset, pos = _varint(footer, pos)
    index_size, _ = _varint(footer, pos)
    out = {}
    for _, handle in self._block(data, index_offset, index_size):
      offset, pos = _varint(handle, 0)
      size, _ = _varint(handle, pos)
      out.update(self._block(data, offset, size))
    return out

  def _block(self, data: bytes, offset: int, size: int
             ) -> list[tuple[bytes, bytes]]:
    if offset + size + 5 > len(data):
      raise ValueError(f'block at {offset} past the end of the file')
    block = data[offset:offset + size]
    kind = data[offset + size]
    crc = int.from_bytes(data[offset + size + 1:offset + size + 5], 'little')
    if _crc32c_masked(block + bytes([kind])) != crc:
      raise ValueError(f'CRC32C mismatch in the block at {offset}')
    if kind != 0:
      raise UnsupportedCheckpoint(
          f'{self.prefix}.index: compressed table blocks (type {kind})')
    restarts = int.from_bytes(block[-4:], 'little')
    limit = len(block) - 4 * (restarts + 1)
    out, pos, key = [], 0, b''
    while pos < limit:
      shared, pos = _varint(block, pos)
      unshared, pos = _varint(block, pos)
      length, pos = _varint(block, pos)
      key = key[:shared] + block[pos:pos + unshared]
      pos += unshared
      out.append((key, block[pos:pos + length]))
      pos += length
    return out

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {k: e.shape for k, e in self.entries.items()}

  def read(self, name: str) -> np.ndarray:
    """One tensor, checked against its CRC32C."""
    e = self.entries[name]
    if e.sliced:
      raise UnsupportedCheckpoint(f'tensor {name} is saved in slices (a '
                                  f'partitioned variable)')
    if e.dtype not in _TF_DTYPES:
      raise UnsupportedCheckpoint(
          f'tensor {name} has dtype '
          f'{_TF_DTYPE_NAMES.get(e.dtype, f"enum {e.dtype}")}')
    dtype = _np_dtype(_TF_DTYPES[e.dtype])
    count = int(np.prod(e.shape, dtype=np.int64))
    if count * dtype.itemsize != e.size:
      raise InteropError(f'{self.prefix}: tensor {name} has {e.size} bytes, '
                         f'but its shape {e.shape} and dtype {dtype} need '
                         f'{count * dtype.itemsize}')
    path = (f'{self.prefix}.data-{e.shard_id:05d}-of-'
            f'{self.num_shards:05d}')
    try:
      with open(path, 'rb') as f:
        f.seek(e.offset)
        buf = f.read(e.size)
    except OSError as err:
      raise InteropError(f'cannot read {path}: {err.strerror or err}'
                         ) from None
    if len(buf) != e.size:
      raise InteropError(f'{path}: truncated (tensor {name} needs bytes '
                         f'{e.offset}..{e.offset + e.size})')
    if e.crc32c is not None and _crc32c_masked(buf) != e.crc32c:
      raise InteropError(f'{path}: tensor {name} fails its CRC32C check '
                         f'(corrupt data file)')
    return np.frombuffer(buf, dtype).reshape(e.shape).copy()


def tf_checkpoint_prefix(path: str) -> str:
  """The prefix of a TF checkpoint given as a prefix, .index file or folder.

  A folder holds a `checkpoint` state file naming the latest checkpoint (as
  TensorFlow writes it) or exactly one .index file.
  """
  path = os.path.expanduser(str(path))
  if path.endswith('.index'):
    path = path[:-len('.index')]
  if os.path.isdir(path):
    state = os.path.join(path, 'checkpoint')
    prefix = None
    if os.path.isfile(state):
      with open(state, encoding='utf-8') as f:
        m = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', f.read(), re.M)
      if m:
        prefix = m.group(1)
        if not os.path.isabs(prefix):
          prefix = os.path.join(path, prefix)
    if prefix is None:
      indexes = sorted(n for n in os.listdir(path) if n.endswith('.index'))
      if len(indexes) != 1:
        raise InteropError(
            f'{path}: a folder with {len(indexes)} .index files and no '
            f'`checkpoint` state file naming one; give the checkpoint prefix '
            f'(e.g. {os.path.join(path, "model.ckpt-28252")})')
      prefix = os.path.join(path, indexes[0][:-len('.index')])
    path = prefix
  if not os.path.isfile(path + '.index'):
    raise InteropError(f'no TF checkpoint at {path} (expected '
                       f'{path}.index and {path}.data-00000-of-000NN)')
  return path


def _tensorflow_reader(prefix: str, why: str = ''):
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InteropError(
        f'{prefix}: {why + "; " if why else ""}reading it needs TensorFlow, '
        f"which is not installed: pip install 'jaxperf[tf]' (or pip install "
        f'tensorflow-cpu)') from None
  try:
    reader = tf.train.load_checkpoint(prefix)
  except Exception as e:  # pylint: disable=broad-except
    raise InteropError(f'TensorFlow cannot read the checkpoint {prefix}: '
                       f'{e}') from None
  shapes = {k: tuple(int(x) for x in v)
            for k, v in reader.get_variable_to_shape_map().items()}
  return shapes, lambda name: np.asarray(reader.get_tensor(name))


def _open_tf_checkpoint(path: str, reader: str):
  """(name -> shape, read(name)) of a TF checkpoint."""
  if reader not in ('auto', 'numpy', 'tensorflow'):
    raise InteropError(f'reader={reader!r}: expected auto, numpy or '
                       f'tensorflow')
  prefix = tf_checkpoint_prefix(path)
  if reader == 'tensorflow':
    return _tensorflow_reader(prefix)
  try:
    bundle = TFCheckpoint(prefix)
  except UnsupportedCheckpoint as e:
    if reader == 'numpy':
      raise
    return _tensorflow_reader(prefix, str(e))

  fallback = []                 # TensorFlow's reader, once it is needed

  def read(name):
    try:
      return bundle.read(name)
    except UnsupportedCheckpoint as e:
      if reader == 'numpy':
        raise
      if not fallback:
        fallback.append(_tensorflow_reader(prefix, str(e))[1])
      return fallback[0](name)
  return bundle.shapes(), read


def read_tf_checkpoint(path: str, names: Iterable[str] | None = None, *,
                       reader: str = 'auto') -> dict[str, np.ndarray]:
  """Tensors of a TF checkpoint by name (all of them, or `names`).

  Args:
    path: the checkpoint prefix (model.ckpt-28252), its .index file, or its
      folder (see tf_checkpoint_prefix).
    names: the tensors to read; default all.
    reader: 'numpy' (TFCheckpoint), 'tensorflow' (tf.train.load_checkpoint)
      or 'auto': numpy, and TensorFlow for what numpy does not handle.
  """
  shapes, read = _open_tf_checkpoint(path, reader)
  names = list(shapes) if names is None else list(names)
  unknown = [n for n in names if n not in shapes]
  if unknown:
    raise InteropError(f'the TF checkpoint {path} has no tensor(s) '
                       f'{", ".join(unknown[:6])}')
  return {n: read(n) for n in names}


# ------------------------------------------------------------------ registry

# Bookkeeping entries of a state_dict that carry no weights.
_IGNORED_SUFFIXES = ('num_batches_tracked',)
# Per model: buffers that some versions of the reference keep in the
# state_dict (HF transformers before 4.31 saved position_ids).
_IGNORED_NAMES = {'bert': ('bert.embeddings.position_ids',
                           'bert.embeddings.token_type_ids'),
                  'maskrcnn': _MASKRCNN_ANCHOR_BUFFERS}
# Per model: tensors tied to another one (the same Parameter in the
# reference). Optional when loading (a state_dict saved without duplicates
# lacks them); if present they must equal their source. to_torch writes them,
# after the tensor named in _TIED_AFTER (where the reference's state_dict
# has them).
_TIED = {'bert': {
    'cls.predictions.decoder.weight': 'bert.embeddings.word_embeddings.weight',
    'cls.predictions.decoder.bias': 'cls.predictions.bias'}}
_TIED_AFTER = {'bert': 'cls.predictions.transform.LayerNorm.bias'}
# TF checkpoints: what the optimizer and training loop save beside the
# weights. Slots (name/adam_m, ...) are skipped only for a weight of the
# model; anything else unexpected is an error.
_TF_SLOT = re.compile(r'^(.+)/(adam_m|adam_v|lamb_m|lamb_v|LAMB(?:_\d+)?|'
                      r'Adam(?:_\d+)?|AdamWeightDecayOptimizer(?:_\d+)?|'
                      r'Momentum)$')
_TF_BOOKKEEPING = ('global_step', 'beta1_power', 'beta2_power',
                   '_CHECKPOINTABLE_OBJECT_GRAPH')

# Per model: the tensor list, given the names of the tensors at hand (the
# depth of a BERT is read from them), their PyTorch shapes once the names
# are known to match (None: names only) and the model's options.
_MODELS: dict[str, Callable[..., list[_Tensor]]] = {
    'resnet50': lambda names, shapes: resnet_tensors((3, 4, 6, 3)),
    'unet3d': lambda names, shapes: (unet3d_tensors() if shapes is None else
                                     unet3d_tensors(**unet3d_dims(shapes))),
    'bert': _bert,
    'dlrm': _dlrm,
    'retinanet': _retinanet,
    'maskrcnn': _maskrcnn,
    'rnnt': lambda names, shapes, **layers: rnnt_tensors(
        **(rnnt_dims(shapes) if shapes is not None else layers)),
    'minigo': _minigo,
}
# Per model: entries of the variables that are a list of arrays (dlrm's
# tables) rather than a dict; internally they are dicts keyed '0', '1', ...
_LISTS = {'dlrm': ('tables',)}
# Models whose to_torch output is checked against the sizes it implies (a
# tree with a table too many or a layer of the wrong width is an error).
_TO_TORCH_CHECKED = ('dlrm', 'retinanet', 'maskrcnn')
# Models whose tensors have TF1 checkpoint names (from_tf_checkpoint).
_TF_MODELS = ('bert', 'minigo')
# Per model: the keyword options of from_torch / from_tf_checkpoint.
_OPTIONS = {'resnet50': (), 'unet3d': (), 'bert': ('num_heads',),
            'dlrm': (), 'retinanet': (), 'maskrcnn': (), 'rnnt': (),
            'minigo': ()}
# Models whose batch norms keep no num_batches_tracked (frozen batch norms):
# to_torch writes none for them.
_NO_BATCH_COUNT = ('retinanet', 'maskrcnn')
# Per model: the current name of a tensor given under an older name (the
# MLPerf RetinaNet reference names its tensors as older torchvision did).
_RENAMES: dict[str, Callable[[str], str]] = {
    'retinanet': retinanet_current_name,
    'maskrcnn': maskrcnn_current_name}


def _tensors(model_name: str, names: Iterable[str] | None = None,
             shapes: Mapping[str, tuple[int, ...]] | None = None,
             **options: Any) -> list[_Tensor]:
  if model_name not in _MODELS:
    raise InteropError(f'no weight mapping for model {model_name!r}; known: '
                       f'{", ".join(_MODELS)}')
  return _MODELS[model_name](names, shapes, **options)


def _check_options(model_name: str, options: Mapping[str, Any],
                   expected: Mapping | None) -> dict[str, Any]:
  if model_name not in _MODELS:
    _tensors(model_name)
  bad = sorted(set(options) - set(_OPTIONS[model_name]))
  if bad:
    raise InteropError(f'{model_name}: unknown option(s) {", ".join(bad)}; '
                       f'it takes {", ".join(_OPTIONS[model_name]) or "none"}')
  options = dict(options)
  if model_name == 'bert':
    options = _bert_options(options, expected)
  if model_name == 'minigo' and expected is not None:
    # The depth is the model's: tensors of another depth are then named
    # as missing or unexpected.
    options.update(_options_from_variables(model_name, expected))
  return options


def _numpy(x: Any) -> np.ndarray:
  if hasattr(x, 'detach'):                 # a torch tensor
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _leaf(x: Any) -> Any:
  """The value of a boxed leaf (flax's nn.Partitioned and kin)."""
  if not hasattr(x, 'shape') and hasattr(x, 'unbox') and hasattr(x, 'value'):
    return x.value
  return x


def _get(tree: Mapping, path: tuple[str, ...], model_name: str) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise InteropError(f'{model_name}: the variables have no '
                         f'{"/".join(path)}')
    node = node[key]
  return _leaf(node)


def _source_name(t: _Tensor, source: str) -> str:
  return t.tf_name if source == 'tf' else t.torch_name


def _source_shape(t: _Tensor, torch_shape: Sequence[int], source: str
                  ) -> tuple[int, ...]:
  s = tuple(int(v) for v in torch_shape)
  return s[::-1] if source == 'tf' and t.tf_transpose and len(s) == 2 else s


def _check_shapes(model_name: str, tensors: list[_Tensor],
                  expected: Mapping | None, got: Mapping[str, np.ndarray],
                  source: str = 'torch'):
  """Compares Flax-layout arrays with the shapes of `expected` variables."""
  if expected is None:
    return
  for t in tensors:
    want = tuple(_get(expected, t.flax_path, model_name).shape)
    have = tuple(got[t.torch_name].shape)
    if want == have:
      continue
    got_shape = _source_shape(t, _torch_shape(t, have), source)
    want_shape = _source_shape(t, _torch_shape(t, want), source)
    if got_shape == want_shape:               # split into other heads
      raise InteropError(
          f'{model_name}: tensor {_source_name(t, source)} becomes Flax '
          f'{"/".join(t.flax_path)} {have} but the model expects {want}: '
          f'num_heads={t.num_heads} is not the model\'s')
    raise InteropError(
        f'{model_name}: tensor {_source_name(t, source)} has shape '
        f'{got_shape} but the model expects {want_shape} '
        f'(Flax {"/".join(t.flax_path)} {want})')


def _describe_dims(model_name: str, raw: Mapping[str, np.ndarray],
                   options: Mapping[str, Any]) -> str:
  shapes = {k: a.shape for k, a in raw.items()}
  if model_name == 'unet3d':
    d = unet3d_dims(shapes)
    return (f'filters={list(d["filters"])}, in_channels={d["in_channels"]}, '
            f'n_class={d["n_class"]}, read from the weights of '
            f'input_block.conv1, downsample.{{0..3}}.conv1 and output.conv')
  if model_name == 'bert':
    heads = options.get('num_heads') or BERT_LARGE_NUM_HEADS
    d = bert_dims(shapes, num_heads=heads)
    return (', '.join(f'{k}={v}' for k, v in d.items()) + ', read from the '
            'word, position and token-type embeddings, layer 0\'s '
            'intermediate dense and the layer names (num_heads as given)')
  if model_name == 'retinanet':
    d = retinanet_dims(shapes)
    return (f'num_classes={d["num_classes"]}, num_anchors='
            f'{d["num_anchors"]}, read from the biases of bbox_reg and '
            f'cls_logits')
  if model_name == 'dlrm':
    d = dlrm_dims(shapes)
    return (f'{len(d["table_sizes"])} tables of width {d["embed_dim"]}, '
            f'num_dense={d["num_dense"]}, bottom MLP '
            f'{list(d["bottom_mlp"])}, top MLP {list(d["top_mlp"])} taking '
            f'{d["interaction_dim"]} features: read from the tables, '
            f'bot_l.0.weight and each Linear layer\'s weight, bias and next '
            f'weight (see dlrm_dims)')
  return 'as read from the state_dict'


def _lists_as_dicts(model_name: str, tree: Any) -> Any:
  """`tree` with each list of _LISTS as a dict keyed '0', '1', ..."""
  keys = _LISTS.get(model_name, ())
  if not keys or not isinstance(tree, Mapping):
    return tree
  out = dict(tree)
  for key in keys:
    if isinstance(out.get(key), (list, tuple)):
      out[key] = {str(i): a for i, a in enumerate(out[key])}
  return out


def _dicts_as_lists(model_name: str, tree: dict[str, Any]) -> dict[str, Any]:
  """The inverse of _lists_as_dicts, for what from_torch returns."""
  for key in _LISTS.get(model_name, ()):
    if key in tree:
      tree[key] = [tree[key][str(i)] for i in range(len(tree[key]))]
  return tree


def _check_names(model_name: str, what: str, names: set[str],
                 given: set[str]) -> None:
  missing = sorted(names - given)
  unexpected = sorted(given - names)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f'missing {len(missing)} tensor(s): {", ".join(missing[:6])}'
                   + (' ...' if len(missing) > 6 else ''))
    if unexpected:
      parts.append(f'unexpected {len(unexpected)} tensor(s): '
                   f'{", ".join(unexpected[:6])}'
                   + (' ...' if len(unexpected) > 6 else ''))
    raise InteropError(f'{model_name} {what} does not match the model: '
                       + '; '.join(parts))


def _assemble(model_name: str, raw: Mapping[str, np.ndarray],
              expected: Mapping | None, options: Mapping[str, Any],
              source: str = 'torch') -> dict[str, Any]:
  """Flax variables from arrays in PyTorch layout, keyed by PyTorch name.

  Checks the ranks, the shapes the tensors imply among themselves and, given
  `expected`, the shapes of the target model; errors name the tensor as the
  source (`torch` or `tf`) does.
  """
  tensors = _tensors(model_name, raw, None, **options)
  for t in tensors:
    a = raw[t.torch_name]
    if a.ndim != _RANK[t.kind]:
      raise InteropError(f'{model_name}: tensor {_source_name(t, source)} has '
                         f'rank {a.ndim}, expected {_RANK[t.kind]}')
  tensors = _tensors(model_name, raw, {k: a.shape for k, a in raw.items()},
                     **options)
  for t in tensors:
    if t.shape is not None and tuple(raw[t.torch_name].shape) != t.shape:
      raise InteropError(
          f'{model_name}: tensor {_source_name(t, source)} has shape '
          f'{_source_shape(t, raw[t.torch_name].shape, source)} but the other '
          f'tensors imply {_source_shape(t, t.shape, source)} '
          f'({_describe_dims(model_name, raw, options)})')
  arrays = {t.torch_name: _to_flax(t, raw[t.torch_name]) for t in tensors}
  _check_shapes(model_name, tensors, expected, arrays, source)
  out: dict[str, Any] = {}
  for t in tensors:
    node = out
    for key in t.flax_path[:-1]:
      node = node.setdefault(key, {})
    node[t.flax_path[-1]] = arrays[t.torch_name]
  return out


def _renamed(model_name: str, state_dict: Mapping[str, Any]
             ) -> Mapping[str, Any]:
  """`state_dict` with older names of _RENAMES replaced by current ones."""
  rename = _RENAMES.get(model_name)
  if rename is None:
    return state_dict
  out, source = {}, {}
  for k, v in state_dict.items():
    new = rename(k)
    if new in out:
      raise InteropError(f'{model_name}: tensors {source[new]} and {k} are '
                         f'both {new}')
    out[new], source[new] = v, k
  return out


def from_torch(model_name: str, state_dict: Mapping[str, Any],
               expected: Mapping | None = None, **options: Any
               ) -> dict[str, Any]:
  """Flax variables from a PyTorch reference state_dict.

  Args:
    model_name: 'resnet50', 'unet3d', 'bert', 'dlrm', 'retinanet',
      'maskrcnn' or 'rnnt'.
    state_dict: the reference module's state_dict (tensors or arrays).
      retinanet and maskrcnn also take the MLPerf reference's names (see
      retinanet_current_name and maskrcnn_current_name).
    expected: optional variables (or jax.eval_shape of them, boxed or not)
      of the target model; shapes are checked against them, tensor by
      tensor. (unet3d, bert, dlrm, retinanet and maskrcnn tensors are also
      checked against the sizes the state_dict implies.)
    **options: bert: num_heads, which no shape tells (default: read from
      `expected` if given, else BERT-large's 16). The depth and every other
      size of a BERT are read from the state_dict (bert_dims), and so are
      the tables and MLP widths of a DLRM (dlrm_dims).
  """
  options = _check_options(model_name, options, expected)
  expected = _lists_as_dicts(model_name, expected)
  state_dict = _renamed(model_name, state_dict)
  ignored = _IGNORED_NAMES.get(model_name, ())
  tied = _TIED.get(model_name, {})
  given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)
           and k not in ignored and k not in tied}
  tensors = _tensors(model_name, given, None, **options)
  _check_names(model_name, 'state_dict', {t.torch_name for t in tensors},
               given)
  raw = {t.torch_name: _numpy(state_dict[t.torch_name]) for t in tensors}
  for name, source in tied.items():
    if name not in state_dict:
      continue
    a, b = _numpy(state_dict[name]), raw[source]
    if a.shape != b.shape or not np.array_equal(a, b):
      what = (f'has shape {a.shape}, {source} {b.shape}' if a.shape != b.shape
              else f'differs from it by up to '
                   f'{float(np.max(np.abs(a.astype(np.float64) - b))):.3g}')
      raise InteropError(f'{model_name}: tensor {name} is tied to {source} '
                         f'(the same parameter in the reference) but {what}')
  return _dicts_as_lists(model_name,
                         _assemble(model_name, raw, expected, options))


def from_tf_checkpoint(model_name: str, path: str,
                       expected: Mapping | None = None, *,
                       reader: str = 'auto', **options: Any) -> dict[str, Any]:
  """Flax variables from a TF1 checkpoint of the reference (bert, minigo).

  The MLPerf BERT reference's checkpoints (e.g. the phase-1 model.ckpt-28252)
  name the weights as bert_checker_tensor_names lists them; the MiniGo
  reference's (e.g. its target model, ml_perf/target/target.*) as TF names
  its layers (minigo_tensors), with the batch norms' moving statistics.
  Optimizer slots of those weights (…/adam_m, …/adam_v, LAMB's, Adam's and
  Momentum's slots) and global_step are skipped; any other tensor that is
  not a weight of the model is an error, as is a missing or misshapen one.

  Args:
    model_name: 'bert' or 'minigo'.
    path: the checkpoint prefix, its .index file or its folder
      (tf_checkpoint_prefix).
    expected: as for from_torch.
    reader: 'auto' (numpy, with TensorFlow for what numpy cannot read),
      'numpy' or 'tensorflow' (see read_tf_checkpoint).
    **options: as for from_torch (bert: num_heads).
  """
  options = _check_options(model_name, options, expected)
  if model_name not in _TF_MODELS:
    raise InteropError(f'{model_name}: no TF checkpoint mapping; TF '
                       f'checkpoints load for {", ".join(_TF_MODELS)}')
  shapes, read = _open_tf_checkpoint(path, reader)
  weights = {k for k in shapes if k not in _TF_BOOKKEEPING
             and not _TF_SLOT.match(k)}
  tensors = _tensors(model_name, weights, None, **options)
  names = {t.tf_name for t in tensors}
  given = {k for k in shapes if k not in _TF_BOOKKEEPING and not (
      (m := _TF_SLOT.match(k)) and m.group(1) in names)}
  _check_names(model_name, f'TF checkpoint {path}', names, given)
  raw = {}
  for t in tensors:
    a = read(t.tf_name)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.name != 'bfloat16':
      raise InteropError(f'{model_name}: tensor {t.tf_name} has dtype '
                         f'{a.dtype}, expected floating point')
    if t.tf_transpose and a.ndim == 2:
      a = a.T
    elif t.kind == 'conv' and a.ndim == 4:      # TF HWIO -> PyTorch OIHW
      a = np.transpose(a, _TO_TORCH['conv'])
    raw[t.torch_name] = a
  return _assemble(model_name, raw, expected, options, source='tf')


def _options_from_variables(model_name: str, variables: Mapping[str, Any]
                            ) -> dict[str, Any]:
  if model_name == 'dlrm':
    params = variables.get('params', {})
    params = params if isinstance(params, Mapping) else {}

    def layers(module):
      node = params.get(module, {})
      found = [int(m.group(1)) for k in (node if isinstance(node, Mapping)
                                         else ())
               if (m := re.fullmatch(r'dense_(\d+)', k))]
      return max(found) + 1 if found else 0
    tables = variables.get('tables', {})
    return {'num_tables': len(tables) if isinstance(tables, Mapping) else 0,
            'num_bottom': layers('bottom_mlp'), 'num_top': layers('top_mlp')}
  if model_name == 'rnnt':
    params = variables.get('params', {})
    params = params if isinstance(params, Mapping) else {}

    def depth(module):
      node = params.get(module, {})
      return sum(1 for k in (node if isinstance(node, Mapping) else ())
                 if re.fullmatch(r'layer\d+', k))
    return {'enc_pre_layers': depth('pre_rnn'),
            'enc_post_layers': depth('post_rnn'),
            'pred_layers': depth('dec_rnn')}
  if model_name == 'minigo':
    params = variables.get('params', {})
    params = params if isinstance(params, Mapping) else {}
    return {'trunk_layers': sum(1 for k in params
                                if re.fullmatch(r'res\d+_conv1', k))}
  if model_name != 'bert':
    return {}
  bert = variables.get('params', {}).get('bert', {}) if isinstance(
      variables.get('params'), Mapping) else {}
  layers = [int(m.group(1)) for k in bert
            if (m := re.fullmatch(r'encoder_layer_(\d+)', k))]
  return {'num_layers': max(layers) + 1 if layers else 0}


def to_torch(model_name: str, variables: Mapping[str, Any]) -> dict[str, Any]:
  """A PyTorch state_dict (torch tensors) from Flax variables.

  For bert the state_dict of HF transformers' BertForPreTraining, ready for
  load_state_dict(strict=True), tied decoder tensors included; the depth is
  read from the variables. For dlrm that of the reference's DLRM_Net
  (emb_l, bot_l, top_l), the number of tables and of layers read from the
  variables.
  """
  import torch  # pylint: disable=g-import-not-at-top
  variables = _lists_as_dicts(model_name, variables)
  tensors = _tensors(model_name, None, None,
                     **_options_from_variables(model_name, variables))
  used = {t.flax_path for t in tensors}
  extra = []

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, prefix + (k,))
    elif prefix not in used:
      extra.append('/'.join(prefix))
  walk(variables, ())
  if extra:
    raise InteropError(f'{model_name}: variables not in the reference model: '
                       f'{", ".join(extra[:6])}')
  out = {}
  for t in tensors:
    # A copy: arrays from JAX are read-only, torch tensors writable.
    a = np.array(_get(variables, t.flax_path, model_name), np.float32)
    out[t.torch_name] = torch.from_numpy(
        np.ascontiguousarray(_to_torch_layout(t, a)))
    if (t.torch_name.endswith('running_var')
        and model_name not in _NO_BATCH_COUNT):
      out[t.torch_name[:-len('running_var')] + 'num_batches_tracked'] = (
          torch.tensor(0, dtype=torch.long))
  if model_name in _TO_TORCH_CHECKED:
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    for t in _tensors(model_name, None, shapes,
                      **_options_from_variables(model_name, variables)):
      if t.shape is not None and shapes[t.torch_name] != t.shape:
        raise InteropError(
            f'{model_name}: variables {"/".join(t.flax_path)} make tensor '
            f'{t.torch_name} of shape {shapes[t.torch_name]} but the other '
            f'variables imply {t.shape} '
            f'({_describe_dims(model_name, out, {})})')
  tied = _TIED.get(model_name)
  if tied:
    ordered = {}
    for k, v in out.items():
      ordered[k] = v
      if k == _TIED_AFTER[model_name]:
        ordered.update({name: out[source].clone()
                        for name, source in tied.items()})
    out = ordered
  return out


def model_names() -> list[str]:
  return list(_MODELS)
