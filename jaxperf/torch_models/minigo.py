"""MiniGo's dual-head residual network in PyTorch, with the reference's names.

Follows the MLPerf MiniGo reference (minigo dual_net.py, model_inference_fn),
written in TensorFlow: the same layers with tf.layers semantics, each
registered under the name TensorFlow gives it (conv2d, conv2d_1, ...,
batch_normalization, ..., dense, dense_1, dense_2), so that a state_dict key
is the TF variable name with '/' for '.' and PyTorch's leaf names:

    conv2d_k.weight                        TF conv2d_k/kernel (OIHW here)
    batch_normalization_k.weight / .bias   TF gamma / beta (trunk BNs only)
    batch_normalization_k.running_mean     TF moving_mean
    batch_normalization_k.running_var      TF moving_variance
    dense_k.weight / .bias                 TF dense_k/kernel (transposed)

Convs are 'same'-padded without bias; conv and dense weights are
Glorot-uniform, dense biases zero. BatchNorm2d with momentum 0.05 is TF's
momentum 0.95, and like TF's fused batch norm it normalises training batches
with the biased variance and moves the running variance toward the unbiased
one; the heads' BNs are affine=False (TF center=False, scale=False).

Input NCHW [B, C, N, N] (float or bool); outputs (logits [B, N*N + 1],
value [B]). The heads flatten in (row, column, channel) order, the
reference's order with input_layout=nhwc and models/minigo.py's order;
`load_flax_variables` and `flax_variables` copy weights between this module
and models/minigo.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _tf_name(kind: str, k: int) -> str:
  return kind if k == 0 else f'{kind}_{k}'


def _conv(cin: int, cout: int, kernel: int) -> nn.Conv2d:
  conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
  nn.init.xavier_uniform_(conv.weight)
  return conv


def _dense(fin: int, fout: int) -> nn.Linear:
  dense = nn.Linear(fin, fout)
  nn.init.xavier_uniform_(dense.weight)
  nn.init.zeros_(dense.bias)
  return dense


def _bn(width: int, affine: bool = True) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(width, eps=1e-5, momentum=0.05, affine=affine)


class MiniGo(nn.Module):
  """The reference network (no squeeze-excitation, ReLU).

  Args:
    board_size: N.
    input_planes: feature planes (13 for 'mlperf07').
    conv_width: trunk filters (64 in MLPerf).
    fc_width: value head hidden units (64 in MLPerf).
    trunk_layers: residual blocks (6 for 19x19, 9 for 9x9 in MLPerf).
    policy_conv_width: policy 1x1 conv filters (2).
    value_conv_width: value 1x1 conv filters (1).
  """

  def __init__(self, board_size: int = 19, input_planes: int = 13,
               conv_width: int = 64, fc_width: int = 64,
               trunk_layers: int = 6, policy_conv_width: int = 2,
               value_conv_width: int = 1):
    super().__init__()
    self.board_size = board_size
    self.trunk_layers = trunk_layers
    points = board_size * board_size
    convs = [_conv(input_planes, conv_width, 3)]
    bns = [_bn(conv_width)]
    for _ in range(2 * trunk_layers):
      convs.append(_conv(conv_width, conv_width, 3))
      bns.append(_bn(conv_width))
    convs += [_conv(conv_width, policy_conv_width, 1),
              _conv(conv_width, value_conv_width, 1)]
    bns += [_bn(policy_conv_width, affine=False),
            _bn(value_conv_width, affine=False)]
    denses = [_dense(policy_conv_width * points, points + 1),
              _dense(value_conv_width * points, fc_width),
              _dense(fc_width, 1)]
    # Register in TF creation order so the state_dict reads like the graph.
    order = [(convs[0], 'conv2d', 0), (bns[0], 'batch_normalization', 0)]
    for k in range(1, 2 * trunk_layers + 1):
      order += [(convs[k], 'conv2d', k), (bns[k], 'batch_normalization', k)]
    t = 2 * trunk_layers
    order += [(convs[t + 1], 'conv2d', t + 1),
              (bns[t + 1], 'batch_normalization', t + 1),
              (denses[0], 'dense', 0),
              (convs[t + 2], 'conv2d', t + 2),
              (bns[t + 2], 'batch_normalization', t + 2),
              (denses[1], 'dense', 1), (denses[2], 'dense', 2)]
    for module, kind, k in order:
      self.add_module(_tf_name(kind, k), module)

  def layer(self, kind: str, k: int) -> nn.Module:
    return getattr(self, _tf_name(kind, k))

  def forward(self, x):
    x = x.float()
    conv = lambda k: self.layer('conv2d', k)
    bn = lambda k: self.layer('batch_normalization', k)
    x = F.relu(bn(0)(conv(0)(x)))
    for i in range(self.trunk_layers):
      a, b = 2 * i + 1, 2 * i + 2
      y = F.relu(bn(a)(conv(a)(x)))
      y = bn(b)(conv(b)(y))
      x = F.relu(x + y)
    t = 2 * self.trunk_layers
    p = F.relu(bn(t + 1)(conv(t + 1)(x)))
    logits = self.dense(p.permute(0, 2, 3, 1).flatten(1))
    v = F.relu(bn(t + 2)(conv(t + 2)(x)))
    v = F.relu(self.dense_1(v.permute(0, 2, 3, 1).flatten(1)))
    value = torch.tanh(self.dense_2(v)[:, 0])
    return logits, value


def _flax_to_tf(trunk_layers: int) -> dict[str, str]:
  from jaxperf.models import minigo as flax_minigo
  return dict(flax_minigo.tf_layer_names(trunk_layers))


def load_flax_variables(model: MiniGo, variables) -> None:
  """Copies models/minigo.py variables (params, batch_stats) into `model`."""
  names = _flax_to_tf(model.trunk_layers)
  sd = model.state_dict()
  new = {}
  leaf_map = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
              'mean': 'running_mean', 'var': 'running_var'}
  for collection in ('params', 'batch_stats'):
    for layer, leaves in variables[collection].items():
      for leaf, value in leaves.items():
        key = f'{names[layer]}.{leaf_map[leaf]}'
        a = np.asarray(value)
        if leaf == 'kernel' and a.ndim == 4:
          a = a.transpose(3, 2, 0, 1)     # HWIO -> OIHW
        elif leaf == 'kernel':
          a = a.T                         # (in, out) -> (out, in)
        if key not in sd or tuple(sd[key].shape) != a.shape:
          raise ValueError(f'{collection}/{layer}/{leaf} {a.shape} does not '
                           f'fit {key}')
        new[key] = torch.from_numpy(np.array(a)).to(
            sd[key].dtype)
  missing = [k for k in sd if k not in new
             and not k.endswith('num_batches_tracked')]
  if missing:
    raise ValueError(f'no Flax variable for {missing}')
  model.load_state_dict(new, strict=False)


def flax_variables(model: MiniGo) -> dict:
  """models/minigo.py variables ({'params', 'batch_stats'}) from `model`."""
  tf_to_flax = {v: k for k, v in _flax_to_tf(model.trunk_layers).items()}
  out = {'params': {}, 'batch_stats': {}}
  for key, t in model.state_dict().items():
    module, leaf = key.rsplit('.', 1)
    if leaf == 'num_batches_tracked':
      continue
    layer = tf_to_flax[module]
    a = t.detach().cpu().numpy()
    if leaf in ('running_mean', 'running_var'):
      out['batch_stats'].setdefault(layer, {})[
          'mean' if leaf == 'running_mean' else 'var'] = a
      continue
    if module.startswith('conv2d'):
      a, leaf = a.transpose(2, 3, 1, 0), 'kernel'
    elif module.startswith('dense'):
      a, leaf = (a.T, 'kernel') if leaf == 'weight' else (a, 'bias')
    else:
      leaf = 'scale' if leaf == 'weight' else 'bias'
    out['params'].setdefault(layer, {})[leaf] = np.ascontiguousarray(a)
  return out


def reference_loss(model: MiniGo, logits, value, pi, z, *,
                   l2_strength: float = 1e-4,
                   value_cost_weight: float = 0.5) -> torch.Tensor:
  """The reference's combined cost (dual_net.py model_fn).

  Policy softmax cross-entropy (mean) + value_cost_weight * value MSE +
  l2_strength * sum(w^2) / 2 over every weight but biases and BN betas.
  """
  policy_cost = torch.mean(-torch.sum(pi * F.log_softmax(logits, -1), -1))
  value_cost = value_cost_weight * torch.mean((value - z) ** 2)
  l2 = sum(0.5 * torch.sum(p ** 2) for name, p in model.named_parameters()
           if not name.endswith('.bias'))
  return policy_cost + value_cost + l2_strength * l2
