"""RetinaNet as MLPerf Training uses it (the "ssd" benchmark since v2.0).

The MLPerf reference is torchvision's RetinaNet (v1 heads, without norm
layers) on a ResNeXt50-32x4d FPN backbone, 264 classes (OpenImages MLPerf
subset), 800x800 inputs and 9 anchors per location. Structure:

* Backbone: ResNeXt50-32x4d (stem 7x7/2 conv -> BN -> ReLU -> 3x3/2 max
  pool; [3, 4, 6, 3] bottlenecks whose 3x3 convolution has 32 groups of 4
  channels per 64 of stage width, i.e. widths 128/256/512/1024 with outputs
  256/512/1024/2048; stride on the 3x3 convolution). Its batch norms are
  frozen (torchvision's FrozenBatchNorm2d: y = (x - mean) * weight /
  sqrt(var + 1e-5) + bias from fixed tensors), so they hold no parameters;
  their four tensors live in the 'batch_stats' collection (scale, bias,
  mean, var) and are never updated. The outputs of stages 2, 3 and 4 (C3,
  C4, C5, strides 8, 16, 32) feed the FPN.
* FPN (256 channels): a 1x1 lateral ("inner") convolution per level, the
  coarser level upsampled by nearest-neighbour interpolation and added, then
  a 3x3 output ("layer") convolution; P6 is a 3x3 stride-2 convolution of P5
  (torchvision's LastLevelP6P7(256, 256) takes P5 because its input and
  output widths are equal), P7 one of ReLU(P6). Convolutions have biases,
  Kaiming-uniform (a=1) kernels and zero biases.
* Heads, shared over the five levels: classification 4 x (3x3 conv 256 +
  ReLU) then a 3x3 conv to anchors * classes; regression the same with
  anchors * 4 outputs. Kernels N(0, 0.01), biases 0 except the
  classification logits' bias, -log((1 - 0.01) / 0.01).

Outputs are ordered as torchvision's RetinaNetHead returns them: level P3
to P7, then location row by row, then anchor. With 264 classes the network
has 37,060,652 parameters (the frozen batch norms' tensors not counted).

Trainable stages: the reference trains the last three backbone stages
(trainable_backbone_layers=3, the MLPerf reference's and torchvision's
retinanet_resnet50_fpn default for a pretrained backbone); the stem and
stage 1 stay frozen. `frozen_stages` counts frozen stages with the stem as
stage 0 (so 5 - trainable_backbone_layers, default 2), and
`RetinaNet.frozen_mask` tells the optimizer which parameters these are.

Input: NHWC images already normalized as torchvision's
GeneralizedRCNNTransform does ((x / 255 - IMAGE_MEAN) / IMAGE_STD).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .layers.conv import Conv

Dtype = Any

NUM_CLASSES = 264
NUM_ANCHORS = 9
FPN_CHANNELS = 256
# torchvision's GeneralizedRCNNTransform normalization (on [0, 1] images).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
PRIOR_PROBABILITY = 0.01
# The classification logits' initial bias: sigmoid(PRIOR_BIAS) = 0.01.
PRIOR_BIAS = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
FROZEN_BN_EPSILON = 1e-5

# torchvision's ResNet init: Kaiming normal, fan out, ReLU gain.
_BACKBONE_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torchvision's FPN init: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)).
_FPN_INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
_HEAD_INIT = nn.initializers.normal(0.01)
_PAD1 = ((1, 1), (1, 1))


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine (no parameters)."""
  epsilon: float = FROZEN_BN_EPSILON
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    stat = lambda name, init: self.variable(
        'batch_stats', name, lambda: init((c,), jnp.float32)).value
    weight = stat('scale', jnp.ones)
    bias = stat('bias', jnp.zeros)
    mean = stat('mean', jnp.zeros)
    var = stat('var', jnp.ones)
    # Folded into one multiply-add, as torchvision's FrozenBatchNorm2d does.
    scale = weight * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * scale
    return x * scale.astype(self.dtype) + shift.astype(self.dtype)


class ResNeXtBottleneck(nn.Module):
  """1x1 -> grouped 3x3 (strided) -> 1x1 (x4), frozen BN, projection."""
  filters: int                 # output channels / 4
  width: int                   # channels of the grouped 3x3 convolution
  groups: int = 32
  strides: int = 1
  project: bool = False
  dtype: Dtype = jnp.float32
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, pad, name: Conv(
        f, (k, k), (s, s), padding=pad, dtype=self.dtype,
        kernel_init=_BACKBONE_INIT, wgrad=self.wgrad, name=name)
    norm = lambda name: FrozenBatchNorm(dtype=self.dtype, name=name)
    residual = x
    y = nn.relu(norm('bn1')(conv(self.width, 1, 1, 'VALID', 'conv1')(x)))
    y = Conv(self.width, (3, 3), (self.strides, self.strides),
             padding=_PAD1, dtype=self.dtype, kernel_init=_BACKBONE_INIT,
             wgrad=self.wgrad, feature_group_count=self.groups,
             name='conv2')(y)
    y = nn.relu(norm('bn2')(y))
    y = norm('bn3')(conv(self.filters * 4, 1, 1, 'VALID', 'conv3')(y))
    if self.project:
      residual = norm('bnsc')(
          conv(self.filters * 4, 1, self.strides, 'VALID', 'conv1sc')(x))
    return nn.relu(y + residual)


class ResNeXtBackbone(nn.Module):
  """ResNeXt with frozen batch norms; returns C3, C4, C5."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  groups: int = 32
  width_per_group: int = 4
  # Stem channels; stage s (from 0) has base_width * 2^s bottleneck filters.
  base_width: int = 64
  dtype: Dtype = jnp.float32
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, x):
    x = Conv(self.base_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), dtype=self.dtype,
             kernel_init=_BACKBONE_INIT, wgrad=self.wgrad, name='conv0')(x)
    x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name='bn0')(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=_PAD1)
    outputs = []
    for stage, blocks in enumerate(self.stage_sizes):
      filters = self.base_width * 2**stage
      for unit in range(blocks):
        x = ResNeXtBottleneck(
            filters=filters,
            width=filters * self.width_per_group * self.groups // 64,
            groups=self.groups,
            strides=2 if (unit == 0 and stage > 0) else 1,
            project=unit == 0, dtype=self.dtype, wgrad=self.wgrad,
            name=f'stage{stage + 1}_unit{unit + 1}')(x)
      if stage > 0:
        outputs.append(x)
    return outputs


def _upsample_nearest(x, size: tuple[int, int]):
  """torch.nn.functional.interpolate(mode='nearest', size=size), NHWC."""
  for axis, out in zip((1, 2), size):
    n = x.shape[axis]
    if n != out:
      # PyTorch's legacy nearest: source index floor(i * in / out).
      idx = (jnp.arange(out) * n) // out
      x = jnp.take(x, idx, axis=axis)
  return x


class FPN(nn.Module):
  """Feature pyramid on C3..C5 with P6/P7 from P5; returns P3..P7."""
  channels: int = FPN_CHANNELS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    conv = lambda k, s, name: nn.Conv(
        self.channels, (k, k), (s, s), padding=_PAD1 if k == 3 else 'VALID',
        dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_FPN_INIT,
        bias_init=nn.initializers.zeros, name=name)
    n = len(features)
    last = conv(1, 1, f'inner{n - 1}')(features[-1])
    results = [conv(3, 1, f'layer{n - 1}')(last)]
    for i in range(n - 2, -1, -1):
      lateral = conv(1, 1, f'inner{i}')(features[i])
      last = lateral + _upsample_nearest(last, lateral.shape[1:3])
      results.insert(0, conv(3, 1, f'layer{i}')(last))
    p6 = conv(3, 2, 'p6')(results[-1])
    p7 = conv(3, 2, 'p7')(nn.relu(p6))
    return [*results, p6, p7]


class RetinaNetHead(nn.Module):
  """4 x (3x3 conv + ReLU) then a 3x3 conv to anchors * outputs_per_anchor;
  applied to each level, outputs [B, H * W * anchors, outputs_per_anchor]
  concatenated over the levels."""
  outputs_per_anchor: int
  num_anchors: int = NUM_ANCHORS
  channels: int = FPN_CHANNELS
  num_convs: int = 4
  final_bias: float = 0.0
  final_name: str = 'out'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    conv = lambda f, name, bias_init=nn.initializers.zeros: nn.Conv(
        f, (3, 3), padding=_PAD1, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_HEAD_INIT, bias_init=bias_init, name=name)
    convs = [conv(self.channels, f'conv{i}') for i in range(self.num_convs)]
    final = conv(self.num_anchors * self.outputs_per_anchor, self.final_name,
                 nn.initializers.constant(self.final_bias))
    outputs = []
    for x in features:
      for c in convs:
        x = nn.relu(c(x))
      y = final(x)
      b, h, w, _ = y.shape
      outputs.append(y.reshape(b, h * w * self.num_anchors,
                               self.outputs_per_anchor))
    return jnp.concatenate(outputs, axis=1)


class FrozenStages:
  """For a detector whose 'backbone' freezes its stem and first stages:
  frozen_module_names and frozen_mask, from the module's `stage_sizes` and
  `frozen_stages` (the stem being stage 0)."""

  def frozen_module_names(self) -> list[str]:
    """Names of the backbone modules (under params/backbone) kept frozen."""
    if not 0 <= self.frozen_stages <= len(self.stage_sizes) + 1:
      raise ValueError(f'frozen_stages must be in 0..'
                       f'{len(self.stage_sizes) + 1}, got {self.frozen_stages}')
    names = ['conv0', 'bn0'] if self.frozen_stages >= 1 else []
    for stage in range(1, self.frozen_stages):
      names += [f'stage{stage}_unit{u + 1}'
                for u in range(self.stage_sizes[stage - 1])]
    return names

  def frozen_mask(self, params: Mapping[str, Any]) -> Any:
    """A pytree like `params` (the 'params' collection): True for each
    parameter that stays frozen (the stem and the first frozen_stages - 1
    backbone stages), False for the trained ones."""
    frozen = set(self.frozen_module_names())

    def mark(path, _):
      keys = [getattr(k, 'key', k) for k in path]
      return len(keys) > 1 and keys[0] == 'backbone' and keys[1] in frozen
    return jax.tree_util.tree_map_with_path(mark, params)


class RetinaNet(FrozenStages, nn.Module):
  """RetinaNet (ResNeXt50-32x4d FPN). Input: normalized NHWC images.

  Returns {'cls_logits': [B, N, num_classes], 'bbox_regression': [B, N, 4]}
  in float32, N the anchors of all levels in torchvision's order; with
  return_features=True also 'features': [P3, ..., P7] (NHWC, compute dtype).
  """
  num_classes: int = NUM_CLASSES
  num_anchors: int = NUM_ANCHORS
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  groups: int = 32
  width_per_group: int = 4
  # Stem channels (64 in the reference; smaller for scaled-down runs).
  base_width: int = 64
  fpn_channels: int = FPN_CHANNELS
  # Leading backbone stages kept frozen, the stem being stage 0: 5 minus
  # torchvision's trainable_backbone_layers (3 in the MLPerf reference).
  frozen_stages: int = 2
  dtype: Dtype = jnp.float32
  # Kernel-gradient algorithm of the backbone's convolutions (see
  # layers/conv.py; 'matmul' is much faster on CPU, above all for the
  # grouped ones).
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, images, return_features: bool = False):
    x = images.astype(self.dtype)
    c345 = ResNeXtBackbone(self.stage_sizes, self.groups,
                           self.width_per_group, self.base_width, self.dtype,
                           self.wgrad, name='backbone')(x)
    features = FPN(self.fpn_channels, self.dtype, name='fpn')(c345)
    cls_logits = RetinaNetHead(
        self.num_classes, self.num_anchors, self.fpn_channels,
        final_bias=PRIOR_BIAS, final_name='cls_logits', dtype=self.dtype,
        name='classification_head')(features)
    bbox = RetinaNetHead(4, self.num_anchors, self.fpn_channels,
                         final_name='bbox_reg', dtype=self.dtype,
                         name='regression_head')(features)
    out = {'cls_logits': cls_logits.astype(jnp.float32),
           'bbox_regression': bbox.astype(jnp.float32)}
    if return_features:
      out['features'] = features
    return out


def retinanet_resnext50_32x4d_fpn(**kwargs) -> RetinaNet:
  return RetinaNet(**kwargs)
