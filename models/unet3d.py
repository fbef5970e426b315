"""3D U-Net as MLPerf Training uses it (medical image segmentation, KiTS19).

Structure, per the MLPerf reference (image_segmentation/pytorch, model/):
an input block of two [3x3x3 conv -> instance norm -> ReLU] at 32 channels;
four downsampling blocks and a bottleneck, each a stride-2 3x3x3 conv block
then a stride-1 one, widening 32 -> 64 -> 128 -> 256 -> 320 -> 320; five
upsampling blocks, each a 2x2x2 stride-2 transposed convolution (with bias, no
norm), the skip connection concatenated after the upsampled tensor, then two
conv blocks, narrowing 320 -> 320 -> 256 -> 128 -> 64 -> 32; a 1x1x1 output
conv (with bias) to 3 classes. Convs followed by a norm have no bias; instance
norm is affine, epsilon 1e-5, statistics of each sample and channel over the
volume (biased variance, two passes), the same in training and evaluation.
With 1 input channel and 3 classes the network has 31,190,243 parameters.

Initialisation is PyTorch's default, as the reference keeps it: weights and
biases uniform in +-1/sqrt(fan_in), where a transposed convolution's fan_in is
its output channels times 8; instance-norm scale 1 and bias 0.

Layout is channels-last (NDHWC). Module names are the tensor names the MLPerf
checker expects (input_block_0_conv, down0_block_1_instancenorm, up2_deconv,
output_conv, ...); down4 is the bottleneck.

The transposed convolution with kernel 2 and stride 2 writes every input
voxel to its own 2x2x2 output cell, so it is a 1x1x1 projection to 8x the
channels followed by a depth-to-space rearrangement. `upsample='projection'`
computes it that way (the default: under spatial partitioning its kernel
gradient is a local matmul plus a small all-reduce, where XLA's transposed
convolution gradient gathers whole activations); `upsample='conv_transpose'`
uses lax.conv_transpose. Both use the same (2, 2, 2, in, out) kernel.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers.conv import Conv

Dtype = Any
FILTERS = (32, 64, 128, 256, 320)
ACTIVATIONS = {'relu': jax.nn.relu,
               'leaky_relu': lambda x: jax.nn.leaky_relu(x, 0.01)}

# PyTorch's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1 / 3, 'fan_in',
                                                      'uniform')
# A transposed conv's PyTorch weight is (in, out, k, k, k): fan_in = out * k^3.
_deconv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform',
                                                in_axis=-1, out_axis=-2)


def _acc(dtype):
  """Matmul accumulation: float32, or float64 for float64 checks."""
  return jnp.promote_types(dtype, jnp.float32)


def _uniform_bias(fan_in: int):
  bound = 1.0 / fan_in ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


class InstanceNorm(nn.Module):
  """Affine instance norm over the spatial axes of NDHWC; statistics in
  float32 (float64 when the input is)."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    stat = jnp.promote_types(x.dtype, jnp.float32)   # f32, or f64 for checks
    xs = x.astype(stat)
    mean = jnp.mean(xs, axes, keepdims=True)
    centred = xs - mean
    var = jnp.mean(jnp.square(centred), axes, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.epsilon) * scale.astype(stat) \
        + bias.astype(stat)
    return y.astype(self.dtype)


class ConvBlock(nn.Module):
  """3x3x3 conv (no bias) -> instance norm -> activation."""
  features: int
  strides: int = 1
  activation: str = 'relu'
  dtype: Dtype = jnp.float32
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, x):
    x = Conv(self.features, (3, 3, 3), (self.strides,) * 3,
             padding=((1, 1),) * 3, dtype=self.dtype,
             kernel_init=torch_default_init, wgrad=self.wgrad, name='conv')(x)
    x = InstanceNorm(dtype=self.dtype, name='instancenorm')(x)
    return ACTIVATIONS[self.activation](x)


class Upsample(nn.Module):
  """2x2x2 stride-2 transposed convolution with bias."""
  features: int
  dtype: Dtype = jnp.float32
  method: str = 'projection'

  @nn.compact
  def __call__(self, x):
    cin, cout = x.shape[-1], self.features
    kernel = self.param('kernel', _deconv_init, (2, 2, 2, cin, cout),
                        jnp.float32)
    bias = self.param('bias', _uniform_bias(cout * 8), (cout,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.method == 'projection':
      n, d, h, w, _ = x.shape
      proj = jnp.transpose(kernel, (3, 0, 1, 2, 4)).reshape(cin, 8 * cout)
      y = jnp.dot(x, proj, preferred_element_type=_acc(self.dtype))
      y = y.astype(self.dtype).reshape(n, d, h, w, 2, 2, 2, cout)
      y = jnp.transpose(y, (0, 1, 4, 2, 5, 3, 6, 7))
      y = y.reshape(n, 2 * d, 2 * h, 2 * w, cout)
    elif self.method == 'conv_transpose':
      # lax.conv_transpose correlates: flip the taps to scatter like PyTorch.
      y = jax.lax.conv_transpose(x, kernel[::-1, ::-1, ::-1], (2, 2, 2), 'VALID',
                                 dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    else:
      raise ValueError(f"upsample must be 'projection' or 'conv_transpose', "
                       f'got {self.method!r}')
    return y + bias.astype(self.dtype)


class UNet3D(nn.Module):
  """The MLPerf 3D U-Net; input [N, D, H, W, in_channels], logits NDHWC."""
  n_class: int = 3
  filters: Sequence[int] = FILTERS
  activation: str = 'relu'
  dtype: Dtype = jnp.float32
  wgrad: str = 'xla'
  upsample: str = 'projection'
  # Applied to the input and every block's output, e.g. a sharding
  # constraint that keeps volumes split over a spatial mesh axis.
  constrain: Callable[[jax.Array], jax.Array] | None = None

  @nn.compact
  def __call__(self, x):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'activation must be one of {list(ACTIVATIONS)}, got '
                       f'{self.activation!r}')
    f = tuple(self.filters)
    keep = self.constrain or (lambda t: t)
    block = lambda feat, s, name: lambda t: keep(ConvBlock(
        feat, s, self.activation, self.dtype, self.wgrad, name=name)(t))

    x = keep(x.astype(self.dtype))
    x = block(f[0], 1, 'input_block_0')(x)
    x = block(f[0], 1, 'input_block_1')(x)
    skips = [x]
    widths = list(f[1:]) + [f[-1]]            # down0..3, then the bottleneck
    for i, width in enumerate(widths):
      x = block(width, 2, f'down{i}_block_0')(x)
      x = block(width, 1, f'down{i}_block_1')(x)
      if i < len(widths) - 1:
        skips.append(x)
    ups = [f[-1]] + list(reversed(f[:-1]))   # 320, 256, 128, 64, 32
    for i, (width, skip) in enumerate(zip(ups, reversed(skips))):
      x = keep(Upsample(width, self.dtype, self.upsample,
                        name=f'up{i}_deconv')(x))
      x = jnp.concatenate([x, skip], axis=-1)
      x = block(width, 1, f'up{i}_block_0')(x)
      x = block(width, 1, f'up{i}_block_1')(x)
    return OutputConv(self.n_class, self.dtype, name='output_conv')(x)


class OutputConv(nn.Module):
  """1x1x1 conv with bias; logits in float32 (float64 for float64)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    kernel = self.param('kernel', torch_default_init,
                        (1, 1, 1, cin, self.features), jnp.float32)
    bias = self.param('bias', _uniform_bias(cin), (self.features,),
                      jnp.float32)
    y = jnp.dot(x, kernel.reshape(cin, self.features).astype(self.dtype),
                preferred_element_type=_acc(self.dtype))
    return y + bias.astype(y.dtype)
