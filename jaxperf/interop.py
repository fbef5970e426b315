"""Weights between jaxperf's Flax variables and PyTorch reference state_dicts.

    variables = from_torch('resnet50', torchvision_model.state_dict())
    state_dict = to_torch('resnet50', variables)

Models: 'resnet50' (torchvision's ResNet-50 <-> models/resnet.py) and
'unet3d' (the MLPerf reference 3D U-Net, jaxperf.torch_models.unet3d <->
models/unet3d.py, any `filters` widths: see unet3d_tensors).

`variables` is the Flax dict {'params': ..., 'batch_stats': ...} ({'params':
...} alone for unet3d, whose instance norms keep no statistics). Every tensor
is accounted for: a missing, unexpected or misshapen tensor is an error that
names it, never a partial load. from_torch accepts torch tensors or numpy
arrays; to_torch returns torch tensors (torch is imported only there).

Layouts: Flax convolution kernels are HWIO and PyTorch's OIHW (3D: DHWIO and
OIDHW); PyTorch's transposed 3D convolution weight is (in, out, D, H, W), its
Flax kernel DHWIO; Flax dense kernels are (in, out) and PyTorch's (out, in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxperf.errors import UserError


class InteropError(UserError):
  """A state_dict or variables tree does not match the model."""


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One reference tensor: where it lives in the Flax tree and its layout."""
  torch_name: str
  flax_path: tuple[str, ...]      # ('params', 'conv0', 'kernel')
  kind: str                       # conv | conv3d | deconv3d | dense | vector
  # The PyTorch shape the model implies, where the mapping knows it.
  shape: tuple[int, ...] | None = None


# PyTorch layout -> Flax layout, and back, per kind.
_TO_FLAX = {'conv': (2, 3, 1, 0),          # OIHW -> HWIO
            'conv3d': (2, 3, 4, 1, 0),     # OIDHW -> DHWIO
            'deconv3d': (2, 3, 4, 0, 1),   # IODHW -> DHWIO
            'dense': (1, 0)}
_TO_TORCH = {'conv': (3, 2, 0, 1),
             'conv3d': (4, 3, 0, 1, 2),
             'deconv3d': (3, 4, 0, 1, 2),
             'dense': (1, 0)}
_RANK = {'conv': 4, 'conv3d': 5, 'deconv3d': 5, 'dense': 2, 'vector': 1}


def _to_flax(kind: str, a: np.ndarray) -> np.ndarray:
  return np.transpose(a, _TO_FLAX[kind]) if kind in _TO_FLAX else a


def _to_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
  return np.transpose(a, _TO_TORCH[kind]) if kind in _TO_TORCH else a


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


# Bookkeeping entries of a state_dict that carry no weights.
_IGNORED_SUFFIXES = ('num_batches_tracked',)

# Per model: the tensor list, given the PyTorch shapes of a state_dict whose
# names are already known to match (None: names only).
_MODELS: dict[str, Callable[[Mapping[str, tuple[int, ...]] | None],
                            list[_Tensor]]] = {
    'resnet50': lambda shapes: resnet_tensors((3, 4, 6, 3)),
    'unet3d': lambda shapes: (unet3d_tensors() if shapes is None else
                              unet3d_tensors(**unet3d_dims(shapes))),
}


def _tensors(model_name: str,
             shapes: Mapping[str, tuple[int, ...]] | None = None
             ) -> list[_Tensor]:
  if model_name not in _MODELS:
    raise InteropError(f'no weight mapping for model {model_name!r}; known: '
                       f'{", ".join(_MODELS)}')
  return _MODELS[model_name](shapes)


def _numpy(x: Any) -> np.ndarray:
  if hasattr(x, 'detach'):                 # a torch tensor
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _get(tree: Mapping, path: tuple[str, ...], model_name: str) -> Any:
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise InteropError(f'{model_name}: the variables have no '
                         f'{"/".join(path)}')
    node = node[key]
  return node


def _check_shapes(model_name: str, tensors: list[_Tensor],
                  expected: Mapping | None, got: Mapping[str, np.ndarray]):
  """Compares Flax-layout arrays with the shapes of `expected` variables."""
  if expected is None:
    return
  for t in tensors:
    want = tuple(_get(expected, t.flax_path, model_name).shape)
    have = tuple(got[t.torch_name].shape)
    if want != have:
      raise InteropError(
          f'{model_name}: tensor {t.torch_name} has shape '
          f'{tuple(_to_torch_layout(t.kind, np.empty(have)).shape)} but the '
          f'model expects {tuple(_to_torch_layout(t.kind, np.empty(want)).shape)} '
          f'(Flax {"/".join(t.flax_path)} {want})')


def _describe_dims(model_name: str, raw: Mapping[str, np.ndarray]) -> str:
  if model_name == 'unet3d':
    d = unet3d_dims({k: a.shape for k, a in raw.items()})
    return (f'filters={list(d["filters"])}, in_channels={d["in_channels"]}, '
            f'n_class={d["n_class"]}, read from the weights of '
            f'input_block.conv1, downsample.{{0..3}}.conv1 and output.conv')
  return 'as read from the state_dict'


def from_torch(model_name: str, state_dict: Mapping[str, Any],
               expected: Mapping | None = None) -> dict[str, Any]:
  """Flax variables from a PyTorch reference state_dict.

  Args:
    model_name: 'resnet50' or 'unet3d'.
    state_dict: the reference module's state_dict (tensors or arrays).
    expected: optional variables (or jax.eval_shape of them) of the target
      model; shapes are checked against them, tensor by tensor. (unet3d
      tensors are also checked against the widths the state_dict implies.)
  """
  tensors = _tensors(model_name)
  names = {t.torch_name for t in tensors}
  given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
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
    raise InteropError(f'{model_name} state_dict does not match the model: '
                       + '; '.join(parts))
  raw = {t.torch_name: _numpy(state_dict[t.torch_name]) for t in tensors}
  for t in tensors:
    if raw[t.torch_name].ndim != _RANK[t.kind]:
      raise InteropError(f'{model_name}: tensor {t.torch_name} has rank '
                         f'{raw[t.torch_name].ndim}, expected {_RANK[t.kind]}')
  tensors = _tensors(model_name, {k: a.shape for k, a in raw.items()})
  for t in tensors:
    if t.shape is not None and tuple(raw[t.torch_name].shape) != t.shape:
      raise InteropError(
          f'{model_name}: tensor {t.torch_name} has shape '
          f'{tuple(raw[t.torch_name].shape)} but the other tensors imply '
          f'{t.shape} ({_describe_dims(model_name, raw)})')
  arrays = {t.torch_name: _to_flax(t.kind, raw[t.torch_name])
            for t in tensors}
  _check_shapes(model_name, tensors, expected, arrays)
  out: dict[str, Any] = {}
  for t in tensors:
    node = out
    for key in t.flax_path[:-1]:
      node = node.setdefault(key, {})
    node[t.flax_path[-1]] = arrays[t.torch_name]
  return out


def to_torch(model_name: str, variables: Mapping[str, Any]) -> dict[str, Any]:
  """A PyTorch state_dict (torch tensors) from Flax variables."""
  import torch  # pylint: disable=g-import-not-at-top
  tensors = _tensors(model_name)
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
        np.ascontiguousarray(_to_torch_layout(t.kind, a)))
    if t.torch_name.endswith('running_var'):
      out[t.torch_name[:-len('running_var')] + 'num_batches_tracked'] = (
          torch.tensor(0, dtype=torch.long))
  return out


def model_names() -> list[str]:
  return list(_MODELS)
