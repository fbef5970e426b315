"""Mask R-CNN as MLPerf Training uses it (the "maskrcnn" benchmark, v2.1).

The MLPerf reference is maskrcnn-benchmark's e2e_mask_rcnn_R_50_FPN_1x: a
ResNet-50 FPN backbone, an RPN, a two-layer MLP box head and a four-conv mask
head, 81 classes (COCO's 80 and background). torchvision's
maskrcnn_resnet50_fpn has the same layers and tensor shapes; it differs only
in where a downsampling bottleneck strides (`stride_in_1x1`), in the frozen
batch norms' epsilon (`bn_epsilon`) and in the class count (91). Structure:

* Backbone: ResNet-50 (stem 7x7/2 conv -> BN -> ReLU -> 3x3/2 max pool;
  [3, 4, 6, 3] bottlenecks of widths 64/128/256/512, outputs x4; a
  projection shortcut on each stage's first block). The reference
  (RESNETS.STRIDE_IN_1X1=True, the MSRA/Caffe2 layout of its ImageNet
  weights) puts the stride of a downsampling bottleneck on its first 1x1
  convolution, torchvision on the 3x3 one (`stride_in_1x1=False`). All batch
  norms are frozen: y = (x - mean) * weight / sqrt(var + eps) + bias from
  fixed tensors kept in the 'batch_stats' collection (scale, bias, mean,
  var); maskrcnn-benchmark's FrozenBatchNorm2d has no epsilon (eps = 0, the
  default here), torchvision's 1e-5. The four stage outputs C2..C5 (strides
  4, 8, 16, 32) feed the FPN.
* FPN (256 channels): a 1x1 lateral ("inner") convolution per level, the
  coarser level upsampled by nearest-neighbour interpolation and added, then
  a 3x3 output ("layer") convolution, all with biases; P6 is P5 subsampled
  by 2 (max pool with kernel 1, stride 2: LastLevelMaxPool). The reference
  upsamples by scale_factor=2 and torchvision to the lateral's size; they
  agree whenever the sizes double exactly, as they do for the reference's
  inputs (padded to a multiple of 32), and this module follows torchvision
  (any size). Kernels Kaiming-uniform (a=1), biases 0.
* RPN head, shared over P2..P6: 3x3 conv 256 + ReLU, then 1x1 convolutions
  to `num_anchors` objectness logits and `num_anchors` * 4 box deltas;
  kernels N(0, 0.01), biases 0. Outputs are ordered as torchvision's
  concat_box_prediction_layers orders them: level P2 to P6, then location
  row by row, then anchor.
* Box head on [K, 7, 7, 256] pooled features: flatten, fc6 (12544 -> 1024)
  + ReLU, fc7 (1024 -> 1024) + ReLU (Kaiming-uniform a=1, biases 0), then the
  predictor's cls_score (1024 -> num_classes, N(0, 0.01)) and bbox_pred
  (1024 -> num_classes * 4, N(0, 0.001)), biases 0. The flatten is
  PyTorch's x.flatten(1) of the NCHW tensor (channel-major): the pooled NHWC
  features are transposed to NCHW first, so that fc6's PyTorch weight loads
  as its plain transpose.
* Mask head on [K, 14, 14, 256] pooled features: mask_fcn1..4, each a 3x3
  conv 256 + ReLU; the predictor's conv5_mask, a 2x2 stride-2 transposed
  convolution 256 + ReLU (28x28), and mask_fcn_logits, a 1x1 conv to
  num_classes. Kaiming-normal (fan out, ReLU gain) kernels, biases 0.

With 91 classes the network has 44,401,393 parameters, as torchvision's
maskrcnn_resnet50_fpn with frozen batch norms (a pretrained backbone); built
with weights_backbone=None torchvision uses trainable BatchNorm2d and counts
their 53,120 weights and biases too (44,454,513), which live here in
'batch_stats'. With the reference's 81 classes: 44,347,573.

Trainable stages: the reference freezes the stem and stage 1
(FREEZE_CONV_BODY_AT=2, torchvision's trainable_backbone_layers=3);
`frozen_stages` counts frozen stages with the stem as stage 0 and
`MaskRCNN.frozen_mask` tells the optimizer which parameters these are.

Layout is channels-last throughout: images [B, H, W, 3], already normalized
(the reference: BGR 0..255 minus PIXEL_MEAN; torchvision: RGB
(x / 255 - mean) / std). The ROI pooling between the FPN and the heads is
not part of this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from .layers.conv import Conv
from .retinanet import FrozenBatchNorm
from .retinanet import FrozenStages
from .retinanet import _upsample_nearest  # pylint: disable=protected-access

Dtype = Any

NUM_CLASSES = 81                 # the reference: 80 COCO classes + background
NUM_ANCHORS = 3                  # aspect ratios (0.5, 1, 2), one size a level
FPN_CHANNELS = 256
REPRESENTATION_SIZE = 1024       # ROI_BOX_HEAD.MLP_HEAD_DIM
MASK_CHANNELS = 256              # ROI_MASK_HEAD.CONV_LAYERS
NUM_MASK_CONVS = 4
BOX_POOL_SIZE = 7                # ROI_BOX_HEAD.POOLER_RESOLUTION
MASK_POOL_SIZE = 14              # ROI_MASK_HEAD.POOLER_RESOLUTION
MASK_RESOLUTION = 28             # ROI_MASK_HEAD.RESOLUTION
# maskrcnn-benchmark's FrozenBatchNorm2d: weight * running_var.rsqrt().
REFERENCE_BN_EPSILON = 0.0
# torchvision's FrozenBatchNorm2d (and BatchNorm2d in eval mode).
TORCHVISION_BN_EPSILON = 1e-5
# The reference's input normalization (BGR, 0..255, std 1).
PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)

# kaiming_uniform_(a=1): U(+-sqrt(3 / fan_in)), the reference's backbone,
# FPN (conv_with_kaiming_uniform) and fc6/fc7 (make_fc) init.
_KAIMING_UNIFORM_A1 = nn.initializers.variance_scaling(1.0, 'fan_in',
                                                       'uniform')
# kaiming_normal_(mode='fan_out', nonlinearity='relu') (an untruncated normal,
# as jax's 'normal'): the mask head (make_conv3x3, MaskRCNNC4Predictor).
_KAIMING_NORMAL_FAN_OUT = nn.initializers.variance_scaling(
    2.0, 'fan_out', 'normal')
# The same for conv5_mask's (kh, kw, out, in) kernel: PyTorch's weight is
# (in, out, kh, kw), whose "fan out" is in * kh * kw.
_DECONV_INIT = nn.initializers.variance_scaling(
    2.0, 'fan_out', 'normal', in_axis=-2, out_axis=-1)
_PAD1 = ((1, 1), (1, 1))


def _acc(dtype: Dtype) -> Dtype:
  """Matmul accumulation type: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> 1x1 (x4) with frozen BN and an optional projection; the
  stride on the first 1x1 (`stride_in_1x1`) or on the 3x3 convolution."""
  filters: int
  strides: int = 1
  project: bool = False
  stride_in_1x1: bool = True
  bn_epsilon: float = REFERENCE_BN_EPSILON
  dtype: Dtype = jnp.float32
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, name: Conv(
        f, (k, k), (s, s), padding=_PAD1 if k == 3 else 'VALID',
        dtype=self.dtype, kernel_init=_KAIMING_UNIFORM_A1, wgrad=self.wgrad,
        name=name)
    norm = lambda name: FrozenBatchNorm(self.bn_epsilon, self.dtype,
                                        name=name)
    s1, s3 = ((self.strides, 1) if self.stride_in_1x1
              else (1, self.strides))
    y = nn.relu(norm('bn1')(conv(self.filters, 1, s1, 'conv1')(x)))
    y = nn.relu(norm('bn2')(conv(self.filters, 3, s3, 'conv2')(y)))
    y = norm('bn3')(conv(self.filters * 4, 1, 1, 'conv3')(y))
    residual = x
    if self.project:
      residual = norm('bnsc')(
          conv(self.filters * 4, 1, self.strides, 'conv1sc')(x))
    return nn.relu(y + residual)


class ResNetBackbone(nn.Module):
  """ResNet with frozen batch norms; returns C2, C3, C4, C5."""
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  # Stem channels; stage s (from 0) has base_width * 2^s bottleneck filters.
  base_width: int = 64
  stride_in_1x1: bool = True
  bn_epsilon: float = REFERENCE_BN_EPSILON
  dtype: Dtype = jnp.float32
  wgrad: str = 'xla'

  @nn.compact
  def __call__(self, x):
    x = Conv(self.base_width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
             dtype=self.dtype, kernel_init=_KAIMING_UNIFORM_A1,
             wgrad=self.wgrad, name='conv0')(x)
    x = nn.relu(FrozenBatchNorm(self.bn_epsilon, self.dtype, name='bn0')(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=_PAD1)
    outputs = []
    for stage, blocks in enumerate(self.stage_sizes):
      for unit in range(blocks):
        x = Bottleneck(
            filters=self.base_width * 2**stage,
            strides=2 if (unit == 0 and stage > 0) else 1,
            project=unit == 0, stride_in_1x1=self.stride_in_1x1,
            bn_epsilon=self.bn_epsilon, dtype=self.dtype, wgrad=self.wgrad,
            name=f'stage{stage + 1}_unit{unit + 1}')(x)
      outputs.append(x)
    return outputs


class FPN(nn.Module):
  """Feature pyramid on C2..C5 plus P6 = P5[::2, ::2]; returns P2..P6."""
  channels: int = FPN_CHANNELS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    conv = lambda k, name: nn.Conv(
        self.channels, (k, k), padding=_PAD1 if k == 3 else 'VALID',
        dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_KAIMING_UNIFORM_A1, bias_init=nn.initializers.zeros,
        name=name)
    n = len(features)
    last = conv(1, f'inner{n - 1}')(features[-1])
    results = [conv(3, f'layer{n - 1}')(last)]
    for i in range(n - 2, -1, -1):
      lateral = conv(1, f'inner{i}')(features[i])
      last = lateral + _upsample_nearest(last, lateral.shape[1:3])
      results.insert(0, conv(3, f'layer{i}')(last))
    # LastLevelMaxPool: max_pool2d(kernel 1, stride 2) keeps every other
    # row and column.
    return [*results, results[-1][:, ::2, ::2]]


class RPNHead(nn.Module):
  """3x3 conv + ReLU, then 1x1 objectness and box-delta convolutions, shared
  over the levels; returns objectness [B, N] and deltas [B, N, 4] in
  float32, N the anchors of all levels (level, row, column, anchor)."""
  num_anchors: int = NUM_ANCHORS
  channels: int = FPN_CHANNELS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    conv = lambda f, k, name: nn.Conv(
        f, (k, k), padding=_PAD1 if k == 3 else 'VALID', dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.01),
        bias_init=nn.initializers.zeros, name=name)
    hidden = conv(self.channels, 3, 'conv')
    cls_logits = conv(self.num_anchors, 1, 'cls_logits')
    bbox_pred = conv(self.num_anchors * 4, 1, 'bbox_pred')
    objectness, deltas = [], []
    for x in features:
      t = nn.relu(hidden(x))
      b, h, w, _ = t.shape
      objectness.append(cls_logits(t).reshape(b, h * w * self.num_anchors))
      # Channel a * 4 + k is delta k of anchor a, as PyTorch's view(N, A,
      # 4, H, W) reads it.
      deltas.append(bbox_pred(t).reshape(b, h * w * self.num_anchors, 4))
    return (jnp.concatenate(objectness, axis=1).astype(jnp.float32),
            jnp.concatenate(deltas, axis=1).astype(jnp.float32))


class BoxFeatureExtractor(nn.Module):
  """FPN2MLPFeatureExtractor: flatten (channel-major) -> fc6 -> ReLU -> fc7
  -> ReLU, on pooled NHWC features [K, P, P, C]."""
  representation_size: int = REPRESENTATION_SIZE
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled):
    fc = lambda name: nn.Dense(
        self.representation_size, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_KAIMING_UNIFORM_A1, bias_init=nn.initializers.zeros,
        name=name)
    k = pooled.shape[0]
    # PyTorch's x.flatten(1) of [K, C, P, P]: index c * P * P + y * P + x.
    x = jnp.transpose(pooled.astype(self.dtype), (0, 3, 1, 2)).reshape(k, -1)
    x = nn.relu(fc('fc6')(x))
    return nn.relu(fc('fc7')(x))


class BoxPredictor(nn.Module):
  """FPNPredictor: class logits [K, C] and per-class boxes [K, C * 4]."""
  num_classes: int = NUM_CLASSES
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda f, std, name: nn.Dense(
        f, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(std),
        bias_init=nn.initializers.zeros, name=name)
    scores = dense(self.num_classes, 0.01, 'cls_score')(x)
    deltas = dense(self.num_classes * 4, 0.001, 'bbox_pred')(x)
    return scores.astype(jnp.float32), deltas.astype(jnp.float32)


class MaskFeatureExtractor(nn.Module):
  """MaskRCNNFPNFeatureExtractor: mask_fcn1..N, each 3x3 conv + ReLU."""
  channels: int = MASK_CHANNELS
  num_convs: int = NUM_MASK_CONVS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled):
    x = pooled.astype(self.dtype)
    for i in range(self.num_convs):
      x = nn.relu(nn.Conv(self.channels, (3, 3), padding=_PAD1,
                          dtype=self.dtype, param_dtype=jnp.float32,
                          kernel_init=_KAIMING_NORMAL_FAN_OUT,
                          bias_init=nn.initializers.zeros,
                          name=f'mask_fcn{i + 1}')(x))
    return x


class ConvTranspose2x2(nn.Module):
  """PyTorch's ConvTranspose2d(kernel_size=2, stride=2, padding=0), NHWC.

  Each input pixel writes its own 2x2 output cell: out[2i + p, 2j + q, o] =
  sum_c x[i, j, c] * kernel[p, q, o, c] + bias[o]. The kernel is (kh, kw,
  out, in), PyTorch's (in, out, kh, kw) weight permuted as a convolution's
  OIHW -> HWIO (and the layout of flax's ConvTranspose with
  transpose_kernel=True).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, cin = x.shape
    kernel = self.param('kernel', _DECONV_INIT, (2, 2, self.features, cin),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,),
                      jnp.float32)
    y = jnp.einsum('nhwc,pqoc->nhpwqo', x.astype(self.dtype),
                   kernel.astype(self.dtype),
                   preferred_element_type=_acc(self.dtype)).astype(self.dtype)
    return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class MaskPredictor(nn.Module):
  """MaskRCNNC4Predictor: conv5_mask (2x2/2 transposed conv) + ReLU, then
  mask_fcn_logits (1x1 conv); returns [K, 2P, 2P, num_classes] float32."""
  num_classes: int = NUM_CLASSES
  channels: int = MASK_CHANNELS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(ConvTranspose2x2(self.channels, self.dtype,
                                 name='conv5_mask')(x))
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=_KAIMING_NORMAL_FAN_OUT,
                bias_init=nn.initializers.zeros, name='mask_fcn_logits')(x)
    return x.astype(jnp.float32)


class MaskRCNN(FrozenStages, nn.Module):
  """Mask R-CNN (ResNet-50 FPN) without its ROI pooling and box logic.

  Parts, each usable through `apply(variables, ..., method=...)`:
    features(images): [P2, ..., P6], NHWC in the compute dtype.
    rpn(features): objectness [B, N] and box deltas [B, N, 4], float32.
    box_head(pooled): pooled [K, 7, 7, C] -> class logits [K, num_classes]
      and box regression [K, num_classes * 4], float32.
    mask_head(pooled): pooled [K, 14, 14, C] -> mask logits [K, 28, 28,
      num_classes] (NHWC), float32.
  `__call__` runs them all (on zero pooled features unless given), so
  `init` creates every variable.
  """
  num_classes: int = NUM_CLASSES
  num_anchors: int = NUM_ANCHORS
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  # Stem channels (64 in the reference; smaller for scaled-down runs).
  base_width: int = 64
  fpn_channels: int = FPN_CHANNELS
  representation_size: int = REPRESENTATION_SIZE
  mask_channels: int = MASK_CHANNELS
  num_mask_convs: int = NUM_MASK_CONVS
  # The reference's stride placement (MSRA weights); False: torchvision's.
  stride_in_1x1: bool = True
  # Frozen batch norms' epsilon: 0 in the reference, 1e-5 in torchvision.
  bn_epsilon: float = REFERENCE_BN_EPSILON
  # Leading backbone stages kept frozen, the stem being stage 0: the
  # reference's FREEZE_CONV_BODY_AT (5 minus torchvision's
  # trainable_backbone_layers).
  frozen_stages: int = 2
  dtype: Dtype = jnp.float32
  # Kernel-gradient algorithm of the backbone's convolutions (see
  # layers/conv.py; 'matmul' is much faster on CPU).
  wgrad: str = 'xla'

  def setup(self):
    self.backbone = ResNetBackbone(self.stage_sizes, self.base_width,
                                   self.stride_in_1x1, self.bn_epsilon,
                                   self.dtype, self.wgrad)
    self.fpn = FPN(self.fpn_channels, self.dtype)
    self.rpn_head = RPNHead(self.num_anchors, self.fpn_channels, self.dtype)
    self.box_feature_extractor = BoxFeatureExtractor(
        self.representation_size, self.dtype)
    self.box_predictor = BoxPredictor(self.num_classes, self.dtype)
    self.mask_feature_extractor = MaskFeatureExtractor(
        self.mask_channels, self.num_mask_convs, self.dtype)
    self.mask_predictor = MaskPredictor(self.num_classes, self.mask_channels,
                                        self.dtype)

  def features(self, images):
    """FPN levels P2..P6 (strides 4..64) of NHWC images."""
    return self.fpn(self.backbone(images.astype(self.dtype)))

  def rpn(self, features):
    """(objectness [B, N], deltas [B, N, 4]) over the levels `features`."""
    return self.rpn_head(features)

  def box_head(self, pooled):
    """(class_logits [K, num_classes], box_regression [K, num_classes * 4])
    of pooled NHWC features [K, 7, 7, fpn_channels]."""
    return self.box_predictor(self.box_feature_extractor(pooled))

  def mask_head(self, pooled):
    """Mask logits [K, 28, 28, num_classes] (NHWC) of pooled NHWC features
    [K, 14, 14, fpn_channels]."""
    return self.mask_predictor(self.mask_feature_extractor(pooled))

  def __call__(self, images, box_pooled=None, mask_pooled=None):
    """All parts: a dict of 'features', 'objectness', 'rpn_deltas',
    'class_logits', 'box_regression' and 'mask_logits'. Pooled features
    not given are zeros for one ROI (to create the heads' parameters)."""
    features = self.features(images)
    objectness, deltas = self.rpn(features)
    c = self.fpn_channels
    if box_pooled is None:
      box_pooled = jnp.zeros((1, BOX_POOL_SIZE, BOX_POOL_SIZE, c), self.dtype)
    if mask_pooled is None:
      mask_pooled = jnp.zeros((1, MASK_POOL_SIZE, MASK_POOL_SIZE, c),
                              self.dtype)
    class_logits, box_regression = self.box_head(box_pooled)
    return {'features': features, 'objectness': objectness,
            'rpn_deltas': deltas, 'class_logits': class_logits,
            'box_regression': box_regression,
            'mask_logits': self.mask_head(mask_pooled)}


def maskrcnn_resnet50_fpn(**kwargs) -> MaskRCNN:
  return MaskRCNN(**kwargs)
