"""A convolution (2D or 3D) whose kernel gradient is computed as matrix products.

XLA's CPU backend runs the kernel-gradient ("weight gradient") convolution of
a training step several times slower than the forward convolution. The same
gradient is a sum over the kernel taps of (input patch)^T @ (output gradient),
one matrix product per tap that XLA's CPU matmul runs at full speed; `Conv`
with `wgrad='matmul'` uses that, and is otherwise a bias-free
flax.linen.Conv (same parameter name, shape, init and forward). Results agree
with XLA's to float rounding. The number of spatial dimensions follows
`kernel_size` (2: NHWC/HWIO, 3: NDHWC/DHWIO).
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


def _conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=_DIMS[len(strides)])


def kernel_grad(x: jax.Array, gy: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Padding) -> jax.Array:
  """d(sum(conv(x, w) * gy))/dw as one matrix product per kernel tap."""
  nd = len(kernel_shape)
  ci, co = x.shape[-1], gy.shape[-1]
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
    taps.append(jnp.dot(xs.reshape(-1, ci).T, g,
                        preferred_element_type=jnp.promote_types(
                            x.dtype, jnp.float32)))
  return jnp.stack(taps).reshape(*kernel_shape, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_wgrad(x, w, strides, padding):
  return _conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, res, gy):
  x, w = res
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
  dx = input_vjp(gy)[0]
  dw = kernel_grad(x, gy, w.shape[:-2], strides, padding).astype(w.dtype)
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

  @nn.compact
  def __call__(self, x):
    ks = tuple(self.kernel_size)
    nd = len(ks)
    if nd not in _DIMS:
      raise ValueError(f'Conv supports 2 or 3 spatial dims, got kernel {ks}')
    kernel = self.param('kernel', self.kernel_init,
                        (*ks, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = ((0, 0),) * nd if self.padding == 'VALID' else tuple(
        tuple(p) for p in self.padding)
    strides = tuple(self.strides) if self.strides is not None else (1,) * nd
    if self.wgrad == 'matmul':
      return conv_matmul_wgrad(x, kernel, strides, padding)
    if self.wgrad != 'xla':
      raise ValueError(f"wgrad must be 'xla' or 'matmul', got {self.wgrad!r}")
    return _conv(x, kernel, strides, padding)
