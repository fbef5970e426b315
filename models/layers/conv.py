"""A convolution (2D or 3D) whose kernel gradient is computed as matrix products.

XLA's CPU backend runs the kernel-gradient ("weight gradient") convolution of
a training step several times slower than the forward convolution. The same
gradient is a sum over the kernel taps of (input patch)^T @ (output gradient),
one matrix product per tap that XLA's CPU matmul runs at full speed; `Conv`
with `wgrad='matmul'` uses that, and is otherwise a bias-free
flax.linen.Conv (same parameter name, shape, init and forward). Results agree
with XLA's to float rounding. The number of spatial dimensions follows
`kernel_size` (2: NHWC/HWIO, 3: NDHWC/DHWIO).

Grouped convolutions (`feature_group_count` > 1, e.g. ResNeXt's) suffer
most: on CPU XLA's kernel gradient of a 32-group 3x3 convolution is 20-60
times slower than its forward pass; per tap it is one batched matrix product
over the groups.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], ...]
_DIMS = {2: ('NHWC', 'HWIO', 'NHWC'), 3: ('NDHWC', 'DHWIO', 'NDHWC')}


def _conv(x, w, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=_DIMS[len(strides)],
                                      feature_group_count=groups)


def kernel_grad(x: jax.Array, gy: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Padding,
                groups: int = 1) -> jax.Array:
  """d(sum(conv(x, w) * gy))/dw as one matrix product per kernel tap (per
  tap and group for a grouped convolution: [*kernel_shape, ci / groups,
  co], output channels group-major as XLA orders them)."""
  ci, co = x.shape[-1], gy.shape[-1]
  acc = jnp.promote_types(x.dtype, jnp.float32)
  out_sp = gy.shape[1:-1]
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  g = gy.reshape(-1, co)
  taps = []
  for tap in itertools.product(*(range(k) for k in kernel_shape)):
    start = (0, *tap, 0)
    limit = (x.shape[0],
             *(t + (o - 1) * s + 1 for t, o, s in zip(tap, out_sp, strides)),
             ci)
    xs = jax.lax.slice(xp, start, limit, (1, *strides, 1))
    if groups == 1:
      taps.append(jnp.dot(xs.reshape(-1, ci).T, g,
                          preferred_element_type=acc))
    else:
      xg = xs.reshape(-1, groups, ci // groups)
      gg = g.reshape(-1, groups, co // groups)
      # [ci / groups, groups, co / groups]: output channel = group-major.
      taps.append(jnp.einsum('ngi,ngo->igo', xg, gg,
                             preferred_element_type=acc
                             ).reshape(ci // groups, co))
  return jnp.stack(taps).reshape(*kernel_shape, ci // groups, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_matmul_wgrad(x, w, strides, padding, groups=1):
  return _conv(x, w, strides, padding, groups)


def _fwd(x, w, strides, padding, groups):
  return _conv(x, w, strides, padding, groups), (x, w)


def _bwd(strides, padding, groups, res, gy):
  x, w = res
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding, groups), x)
  dx = input_vjp(gy)[0]
  dw = kernel_grad(x, gy, w.shape[:-2], strides, padding,
                   groups).astype(w.dtype)
  return dx, dw


conv_matmul_wgrad.defvjp(_fwd, _bwd)


class Conv(nn.Module):
  """Channels-last 2D or 3D convolution without bias; `wgrad` picks the
  kernel gradient: 'xla' (XLA's own) or 'matmul' (per-tap matrix products)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: Padding | str = 'VALID'
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.he_normal()
  wgrad: str = 'xla'
  feature_group_count: int = 1

  @nn.compact
  def __call__(self, x):
    ks = tuple(self.kernel_size)
    nd = len(ks)
    if nd not in _DIMS:
      raise ValueError(f'Conv supports 2 or 3 spatial dims, got kernel {ks}')
    groups = int(self.feature_group_count)
    if x.shape[-1] % groups or self.features % groups:
      raise ValueError(f'{groups} groups must divide the input channels '
                       f'({x.shape[-1]}) and features ({self.features})')
    kernel = self.param('kernel', self.kernel_init,
                        (*ks, x.shape[-1] // groups, self.features),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = ((0, 0),) * nd if self.padding == 'VALID' else tuple(
        tuple(p) for p in self.padding)
    strides = tuple(self.strides) if self.strides is not None else (1,) * nd
    if self.wgrad == 'matmul':
      return conv_matmul_wgrad(x, kernel, strides, padding, groups)
    if self.wgrad != 'xla':
      raise ValueError(f"wgrad must be 'xla' or 'matmul', got {self.wgrad!r}")
    return _conv(x, kernel, strides, padding, groups)
