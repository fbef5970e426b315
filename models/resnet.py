"""ResNet v1.5 as MLPerf Training uses it (image classification, ImageNet).

v1.5 differs from v1 in putting the stride of a downsampling bottleneck on its
3x3 convolution instead of the first 1x1. Structure, per the MLPerf reference:
stem 7x7/2 conv (64) -> BN -> ReLU -> 3x3/2 max pool; bottleneck stages of
[3, 4, 6, 3] blocks with widths 64/128/256/512 (x4 at the output); a projection
shortcut (1x1 conv + BN) on the first block of every stage; global average
pool; a dense classifier. Convolutions have no bias and He-normal init; BN has
momentum 0.9 and epsilon 1e-5 (variance computed in two passes, as the
reference frameworks do: E[x^2] - E[x]^2 loses precision when few values
share a channel); the classifier is N(0, 0.01) with zero bias.
With 1000 classes the network has 25,557,032 parameters.

Padding is symmetric (1 pixel for the 3x3 convs and the max pool, 3 for the
stem), which is the MXNet/PyTorch convention and gives the same output sizes as
the TensorFlow reference.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .layers.conv import Conv

Dtype = Any

# Per-channel RGB means subtracted from the 0..255 input, as the reference does
# (it subtracts means only, no division by a standard deviation).
CHANNEL_MEANS = (123.68, 116.78, 103.94)


def _batch_norm(train: bool, momentum: float, epsilon: float, dtype: Dtype,
                name: str, scale_init=nn.initializers.ones) -> nn.BatchNorm:
  # Two-pass variance: E[x^2] - E[x]^2 cancels when few values share a channel.
  return nn.BatchNorm(use_running_average=not train, momentum=momentum,
                      epsilon=epsilon, dtype=dtype, scale_init=scale_init,
                      use_fast_variance=False, name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4 channels), with a projection shortcut."""
  filters: int
  strides: int = 1
  project: bool = False
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_last_bn: bool = False
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s, pad, name: Conv(
        f, (k, k), (s, s), padding=pad, dtype=self.dtype, wgrad=self.wgrad,
        name=name)
    norm = lambda name, scale_init=nn.initializers.ones: _batch_norm(
        train, self.bn_momentum, self.bn_epsilon, self.dtype, name, scale_init)

    residual = x
    y = conv(self.filters, 1, 1, 'VALID', 'conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = conv(self.filters, 3, self.strides, ((1, 1), (1, 1)), 'conv2')(y)
    y = nn.relu(norm('bn2')(y))
    y = conv(self.filters * 4, 1, 1, 'VALID', 'conv3')(y)
    last_init = (nn.initializers.zeros if self.zero_init_last_bn
                 else nn.initializers.ones)
    y = norm('bn3', last_init)(y)
    if self.project:
      residual = conv(self.filters * 4, 1, self.strides, 'VALID', 'conv1sc')(x)
      residual = norm('bnsc')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """Bottleneck ResNet. Input: uint8 or float images in [0, 255], NHWC."""
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  dtype: Dtype = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  zero_init_last_bn: bool = False
  # Kernel-gradient algorithm of the convolutions (see layers/conv.py):
  # 'matmul' is much faster on XLA's CPU backend, 'xla' elsewhere.
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, images, train: bool = True):
    # Mean subtraction and the classifier run in at least float32.
    wide = jnp.promote_types(self.dtype, jnp.float32)
    x = images.astype(wide) - jnp.asarray(CHANNEL_MEANS, wide)
    x = x.astype(self.dtype)
    x = Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
             dtype=self.dtype, wgrad=self.wgrad, name='conv0')(x)
    x = _batch_norm(train, self.bn_momentum, self.bn_epsilon, self.dtype,
                    'bn0')(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for unit in range(blocks):
        x = Bottleneck(
            filters=self.width * 2**stage,
            strides=2 if (unit == 0 and stage > 0) else 1,
            project=unit == 0, dtype=self.dtype,
            bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
            zero_init_last_bn=self.zero_init_last_bn, wgrad=self.wgrad,
            name=f'stage{stage + 1}_unit{unit + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=wide,
                 kernel_init=nn.initializers.normal(0.01),
                 bias_init=nn.initializers.zeros, name='fc1')(x.astype(wide))
    return x


def resnet50(**kwargs) -> ResNet:
  return ResNet(stage_sizes=(3, 4, 6, 3), **kwargs)
