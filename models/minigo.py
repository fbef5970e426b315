"""MiniGo's dual-head residual network as MLPerf Training uses it (Go, RL).

Structure, per the MLPerf reference (minigo dual_net.py, model_inference_fn,
with the flags of ml_perf/flags/19/architecture.flags): the input is a
[B, N, N, C] stack of feature planes (C = 13 for the 'mlperf07' features, fed
as booleans and cast to float); an initial 3x3 conv -> BN -> ReLU of
`conv_width` filters; `trunk_layers` residual blocks, each
conv -> BN -> ReLU -> conv -> BN, added to the block input, then ReLU; a
policy head, 1x1 conv to 2 filters -> BN -> ReLU -> dense to N*N + 1 logits;
a value head, 1x1 conv to 1 filter -> BN -> ReLU -> dense to `fc_width` ->
ReLU -> dense to 1 -> tanh. The MLPerf 19x19 values are conv_width 64,
fc_width 64, trunk_layers 6 (the 9x9 flags: 9 blocks); squeeze-excitation and
swish are off in both. With them the network has 736,671 trainable
parameters (19x19).

Layer settings are TensorFlow's tf.layers defaults as the reference uses
them: every conv is 'same'-padded without bias; conv and dense kernels are
Glorot-uniform, dense biases zero. BN has momentum 0.95 (running = 0.95 *
running + 0.05 * batch), epsilon 1e-5; the trunk's BNs have a scale (gamma,
init 1) and an offset (beta, init 0), the two heads' BNs neither
(center=False, scale=False). BN is TensorFlow's fused kernel: training
normalises with the biased batch variance but moves the running variance
toward the unbiased one (times n / (n - 1), n = B * N * N), as PyTorch does;
`BatchNorm` below does the same.

The heads flatten [B, N, N, c] in (row, column, channel) order, the
reference's order with input_layout=nhwc; a checkpoint trained with
input_layout=nchw (the 19x19 flags' choice, a tunable that changes no math)
has its head dense kernels' rows in (channel, row, column) order instead.

The loss is jaxperf.losses.minigo_losses.

TensorFlow names layers in creation order (conv2d, conv2d_1, ...;
batch_normalization, batch_normalization_1, ...; dense, dense_1, dense_2);
`tf_layer_names` maps this module's layers to those names, and
`checker_tensor_names` lists the tensors the MLPerf MiniGo compliance
checker expects in weights_initialization events.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

BOARD_SIZE = 19
# 'mlperf07' features (features.py, MLPERF07_FEATURES), in order:
#   0-7   stone_features_4: the player to move's stones then the opponent's,
#         for the current position and the 3 before it (own_0, opp_0, own_1,
#         opp_1, ...);
#   8     color_to_play_feature: 1 where black is to play;
#   9-11  few_liberties_feature: one-hot, the stone's group has 1, 2, 3
#         liberties;
#   12    would_capture_feature: playing here captures an opponent group.
INPUT_PLANES = 13
CONV_WIDTH = 64
FC_WIDTH = 64
TRUNK_LAYERS = 6
POLICY_CONV_WIDTH = 2
VALUE_CONV_WIDTH = 1
BN_MOMENTUM = 0.95
BN_EPSILON = 1e-5

glorot_uniform = nn.initializers.glorot_uniform()


class BatchNorm(nn.Module):
  """TensorFlow's fused batch normalisation over the last axis.

  Attributes:
    use_running_average: normalise with the running statistics (inference).
    center: learn an offset ('bias', TF's beta).
    scale: learn a scale ('scale', TF's gamma).
    momentum: running = momentum * running + (1 - momentum) * batch.
    epsilon: added to the variance.
    dtype: computation dtype (statistics are float32 or wider).
  """
  use_running_average: bool = False
  center: bool = True
  scale: bool = True
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,),
                            stat_dtype)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,),
                           stat_dtype)
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(stat_dtype)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = jnp.mean(xf, axis=axes)
      # Two passes: E[x^2] - E[x]^2 cancels when few values share a channel.
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if not self.is_initializing():
        n = xf.size // features
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean
        ra_var.value = m * ra_var.value + (1 - m) * unbiased
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.scale:
      y = y * self.param('scale', nn.initializers.ones, (features,),
                         jnp.float32)
    if self.center:
      y = y + self.param('bias', nn.initializers.zeros, (features,),
                         jnp.float32)
    return y.astype(self.dtype)


class MiniGo(nn.Module):
  """The dual-head residual network.

  Attributes:
    board_size: N; the input is [B, N, N, input_planes].
    input_planes: feature planes per point (13: 'mlperf07').
    conv_width: trunk filters.
    fc_width: hidden units of the value head.
    trunk_layers: residual blocks.
    policy_conv_width: filters of the policy head's 1x1 conv.
    value_conv_width: filters of the value head's 1x1 conv.
    bn_momentum: BN running-statistics momentum (TF convention).
    bn_epsilon: BN epsilon.
    dtype: computation dtype; parameters are float32.

  Returns (logits [B, N*N + 1], value [B]) from __call__; the policy is
  softmax(logits), the last entry being pass.
  """
  board_size: int = BOARD_SIZE
  input_planes: int = INPUT_PLANES
  conv_width: int = CONV_WIDTH
  fc_width: int = FC_WIDTH
  trunk_layers: int = TRUNK_LAYERS
  policy_conv_width: int = POLICY_CONV_WIDTH
  value_conv_width: int = VALUE_CONV_WIDTH
  bn_momentum: float = BN_MOMENTUM
  bn_epsilon: float = BN_EPSILON
  dtype: Dtype = jnp.float32

  def _conv(self, features: int, kernel: int, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding='SAME', use_bias=False,
                   kernel_init=glorot_uniform, dtype=self.dtype, name=name)

  def _bn(self, train: bool, name: str, affine: bool = True) -> BatchNorm:
    return BatchNorm(use_running_average=not train, center=affine,
                     scale=affine, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name=name)

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=glorot_uniform,
                    bias_init=nn.initializers.zeros, dtype=self.dtype,
                    name=name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    n = self.board_size
    expected = (n, n, self.input_planes)
    if tuple(x.shape[1:]) != expected:
      raise ValueError(f'input must be [B, {n}, {n}, {self.input_planes}], '
                       f'got {tuple(x.shape)}')
    x = x.astype(self.dtype)   # bool features become 0/1
    w = self.conv_width
    x = nn.relu(self._bn(train, 'init_bn')(self._conv(w, 3, 'init_conv')(x)))
    for i in range(self.trunk_layers):
      y = nn.relu(self._bn(train, f'res{i}_bn1')(
          self._conv(w, 3, f'res{i}_conv1')(x)))
      y = self._bn(train, f'res{i}_bn2')(self._conv(w, 3, f'res{i}_conv2')(y))
      x = nn.relu(x + y)
    batch = x.shape[0]

    p = self._conv(self.policy_conv_width, 1, 'policy_conv')(x)
    p = nn.relu(self._bn(train, 'policy_bn', affine=False)(p))
    logits = self._dense(n * n + 1, 'policy_dense')(p.reshape(batch, -1))

    v = self._conv(self.value_conv_width, 1, 'value_conv')(x)
    v = nn.relu(self._bn(train, 'value_bn', affine=False)(v))
    v = self._dense(self.fc_width, 'value_dense1')(v.reshape(batch, -1))
    v = nn.relu(v)
    value = jnp.tanh(self._dense(1, 'value_dense2')(v)[:, 0])
    return logits, value


def reference_param_count(board_size: int = BOARD_SIZE,
                          input_planes: int = INPUT_PLANES,
                          conv_width: int = CONV_WIDTH,
                          fc_width: int = FC_WIDTH,
                          trunk_layers: int = TRUNK_LAYERS,
                          policy_conv_width: int = POLICY_CONV_WIDTH,
                          value_conv_width: int = VALUE_CONV_WIDTH) -> int:
  """Trainable parameters of the reference network (no BN running stats)."""
  points = board_size * board_size
  w = conv_width
  initial = 9 * input_planes * w + 2 * w
  trunk = trunk_layers * 2 * (9 * w * w + 2 * w)
  policy = w * policy_conv_width + (policy_conv_width * points + 1) * (
      points + 1)
  value = (w * value_conv_width + (value_conv_width * points + 1) * fc_width
           + fc_width + 1)
  return initial + trunk + policy + value


def tf_layer_names(trunk_layers: int = TRUNK_LAYERS
                   ) -> list[tuple[str, str]]:
  """(this module's layer name, the reference's TF layer name), in TF order.

  TensorFlow numbers each layer type in creation order: the initial conv and
  BN, each block's two convs and BNs, the policy conv, BN and dense, the value
  conv, BN and two denses. With 6 blocks the policy conv is conv2d_13 and the
  value conv conv2d_14.
  """
  order = ['init_conv', 'init_bn']
  for i in range(trunk_layers):
    order += [f'res{i}_conv1', f'res{i}_bn1', f'res{i}_conv2', f'res{i}_bn2']
  order += ['policy_conv', 'policy_bn', 'policy_dense',
            'value_conv', 'value_bn', 'value_dense1', 'value_dense2']
  counts = {}
  names = []
  for layer in order:
    kind = ('conv2d' if 'conv' in layer else
            'dense' if 'dense' in layer else 'batch_normalization')
    k = counts.get(kind, 0)
    counts[kind] = k + 1
    names.append((layer, kind if k == 0 else f'{kind}_{k}'))
  return names


# Flax variable -> TF variable suffix.
TF_VARIABLE = {('params', 'kernel'): 'kernel', ('params', 'bias'): 'bias',
               ('params', 'scale'): 'gamma',
               ('batch_stats', 'mean'): 'moving_mean',
               ('batch_stats', 'var'): 'moving_variance'}
_BN_OFFSET = 'beta'


def tf_variable_names(variables) -> dict[tuple[str, str, str], str]:
  """{(collection, layer, leaf): TF variable name} for a MiniGo's variables."""
  layers = dict(tf_layer_names(_trunk_layers(variables['params'])))
  out = {}
  for collection in ('params', 'batch_stats'):
    for layer, leaves in variables.get(collection, {}).items():
      for leaf in leaves:
        suffix = TF_VARIABLE[(collection, leaf)]
        if leaf == 'bias' and layer.endswith(('_bn', '_bn1', '_bn2')):
          suffix = _BN_OFFSET
        out[(collection, layer, leaf)] = f'{layers[layer]}/{suffix}'
  return out


def _trunk_layers(params) -> int:
  return sum(1 for k in params if k.startswith('res') and k.endswith('_conv1'))


def checker_tensor_names(trunk_layers: int = TRUNK_LAYERS) -> list[str]:
  """Trainable TF tensors, then global_step, as closed_minigo.yaml lists them.

  The heads' BNs have neither gamma nor beta, so they add no names.
  """
  names = []
  for layer, tf_name in tf_layer_names(trunk_layers):
    if tf_name.startswith('conv2d'):
      names.append(f'{tf_name}/kernel')
    elif tf_name.startswith('batch_normalization'):
      if layer not in ('policy_bn', 'value_bn'):
        names += [f'{tf_name}/gamma', f'{tf_name}/beta']
    else:
      names += [f'{tf_name}/kernel', f'{tf_name}/bias']
  return names + ['global_step']
