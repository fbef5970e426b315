"""A 2D convolution whose kernel gradient is computed as matrix products.

XLA's CPU backend runs the kernel-gradient ("weight gradient") convolution of
a training step several times slower than the forward convolution. The same
gradient is a sum over the kernel taps of (input patch)^T @ (output gradient),
k*k matrix products that XLA's CPU matmul runs at full speed; `Conv` with
`wgrad='matmul'` uses that, and is otherwise flax.linen.Conv (same parameter
name, shape, init and forward). Results agree with XLA's to float rounding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=_DIMS)


def kernel_grad(x: jax.Array, gy: jax.Array, kernel_hw: tuple[int, int],
                strides: tuple[int, int], padding: Padding) -> jax.Array:
  """d(sum(conv(x, w) * gy))/dw as one matrix product per kernel tap."""
  n, _, _, ci = x.shape
  _, ho, wo, co = gy.shape
  kh, kw = kernel_hw
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  g = gy.reshape(-1, co)
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = jax.lax.slice(xp, (0, i, j, 0),
                         (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci),
                         (1, sh, sw, 1))
      taps.append(jnp.dot(xs.reshape(-1, ci).T, g,
                          preferred_element_type=jnp.promote_types(
                              x.dtype, jnp.float32)))
  return jnp.stack(taps).reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_matmul_wgrad(x, w, strides, padding):
  return _conv(x, w, strides, padding)


def _fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _bwd(strides, padding, res, gy):
  x, w = res
  _, input_vjp = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)
  dx = input_vjp(gy)[0]
  dw = kernel_grad(x, gy, w.shape[:2], strides, padding).astype(w.dtype)
  return dx, dw


conv_matmul_wgrad.defvjp(_fwd, _bwd)


class Conv(nn.Module):
  """NHWC 2D convolution without bias; `wgrad` picks the kernel gradient:
  'xla' (XLA's own) or 'matmul' (per-tap matrix products)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Padding | str = 'VALID'
  dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.he_normal()
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    padding = ((0, 0), (0, 0)) if self.padding == 'VALID' else tuple(
        tuple(p) for p in self.padding)
    strides = tuple(self.strides)
    if self.wgrad == 'matmul':
      return conv_matmul_wgrad(x, kernel, strides, padding)
    if self.wgrad != 'xla':
      raise ValueError(f"wgrad must be 'xla' or 'matmul', got {self.wgrad!r}")
    return _conv(x, kernel, strides, padding)
