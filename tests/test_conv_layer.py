"""The matmul kernel-gradient convolution equals XLA's convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf.models.layers.conv import Conv, kernel_grad


@pytest.mark.parametrize('k, s, pad', [(3, 1, ((1, 1), (1, 1))),
                                       (3, 2, ((1, 1), (1, 1))),
                                       (1, 2, 'VALID'), (1, 1, 'VALID'),
                                       (7, 2, ((3, 3), (3, 3)))])
def test_forward_and_gradients_match_xla(k, s, pad):
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 5))
  fast = Conv(6, (k, k), (s, s), padding=pad, wgrad='matmul')
  ref = Conv(6, (k, k), (s, s), padding=pad, wgrad='xla')
  params = ref.init(jax.random.key(1), x)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  np.testing.assert_allclose(fast.apply(params, x), ref.apply(params, x),
                             rtol=1e-6, atol=1e-6)
  gf = jax.grad(loss(fast), argnums=(0, 1))(params, x)
  gr = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_grad_is_the_transposed_convolution():
  x = jax.random.normal(jax.random.key(2), (3, 9, 9, 4))
  w = jax.random.normal(jax.random.key(3), (3, 3, 4, 5))
  conv = lambda w: jax.lax.conv_general_dilated(
      x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  gy = jax.random.normal(jax.random.key(4), conv(w).shape)
  want = jax.vjp(conv, w)[1](gy)[0]
  got = kernel_grad(x, gy, (3, 3), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_wgrad_is_an_error():
  with pytest.raises(ValueError, match="wgrad must be 'xla' or 'matmul'"):
    Conv(2, (1, 1), wgrad='fft').init(jax.random.key(0), jnp.ones((1, 2, 2, 1)))


@pytest.mark.parametrize('groups, s', [(4, 1), (4, 2), (8, 2)])
def test_grouped_convolution_matches_flax_grouped_conv(groups, s):
  """Grouped (ResNeXt) convolutions: same parameter shape as nn.Conv's, same
  forward, and the per-group kernel gradient equals XLA's."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(5), (2, 9, 11, 16))
  pad = ((1, 1), (1, 1))
  ours = Conv(24, (3, 3), (s, s), padding=pad, wgrad='matmul',
              feature_group_count=groups)
  ref = nn.Conv(24, (3, 3), (s, s), padding=pad, use_bias=False,
                feature_group_count=groups)
  params = ref.init(jax.random.key(6), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(6), x)) == \
      jax.tree.map(jnp.shape, params)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x),
                             rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_groups_must_divide_the_channels():
  with pytest.raises(ValueError, match='3 groups must divide'):
    Conv(6, (3, 3), feature_group_count=3).init(jax.random.key(0),
                                                 jnp.ones((1, 4, 4, 4)))
