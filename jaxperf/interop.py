"""Weights between jaxperf's Flax variables and PyTorch reference state_dicts.

    variables = from_torch('resnet50', torchvision_model.state_dict())
    state_dict = to_torch('resnet50', variables)

`variables` is the Flax dict {'params': ..., 'batch_stats': ...}. Every tensor
is accounted for: a missing, unexpected or misshapen tensor is an error that
names it, never a partial load. from_torch accepts torch tensors or numpy
arrays; to_torch returns torch tensors (torch is imported only there).

Layouts: Flax convolution kernels are HWIO and PyTorch's OIHW; Flax dense
kernels are (in, out) and PyTorch's (out, in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
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
  kind: str                       # conv | dense | vector


def _to_flax(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return np.transpose(a, (2, 3, 1, 0))
  if kind == 'dense':
    return np.transpose(a, (1, 0))
  return a


def _to_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return np.transpose(a, (3, 2, 0, 1))
  if kind == 'dense':
    return np.transpose(a, (1, 0))
  return a


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


# Bookkeeping entries of a state_dict that carry no weights.
_IGNORED_SUFFIXES = ('num_batches_tracked',)

_MODELS: dict[str, Callable[[], list[_Tensor]]] = {
    'resnet50': lambda: resnet_tensors((3, 4, 6, 3)),
}


def _tensors(model_name: str) -> list[_Tensor]:
  if model_name not in _MODELS:
    raise InteropError(f'no weight mapping for model {model_name!r}; known: '
                       f'{", ".join(_MODELS)}')
  return _MODELS[model_name]()


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


def from_torch(model_name: str, state_dict: Mapping[str, Any],
               expected: Mapping | None = None) -> dict[str, Any]:
  """Flax variables from a PyTorch reference state_dict.

  Args:
    model_name: e.g. 'resnet50'.
    state_dict: the reference module's state_dict (tensors or arrays).
    expected: optional variables (or jax.eval_shape of them) of the target
      model; shapes are checked against them, tensor by tensor.
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
  arrays = {t.torch_name: _to_flax(t.kind, _numpy(state_dict[t.torch_name]))
            for t in tensors}
  for t in tensors:
    want_rank = {'conv': 4, 'dense': 2, 'vector': 1}[t.kind]
    if arrays[t.torch_name].ndim != want_rank:
      raise InteropError(f'{model_name}: tensor {t.torch_name} has rank '
                         f'{arrays[t.torch_name].ndim}, expected {want_rank}')
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
    a = np.asarray(_get(variables, t.flax_path, model_name), np.float32)
    out[t.torch_name] = torch.from_numpy(
        np.ascontiguousarray(_to_torch_layout(t.kind, a)))
    if t.torch_name.endswith('running_var'):
      out[t.torch_name[:-len('running_var')] + 'num_batches_tracked'] = (
          torch.tensor(0, dtype=torch.long))
  return out


def model_names() -> list[str]:
  return list(_MODELS)
