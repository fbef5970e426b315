"""RNN-T as MLPerf Training uses it (the "rnnt" benchmark, v2.1).

The MLPerf reference is rnn_speech_recognition/pytorch (rnnt/model.py,
common/rnn.py, configs/baseline_v3-1023sp.yaml):

* Input: log-mel features, 80 filters, 3 frames stacked and subsampled by
  3 (240 features a step) by the data pipeline.
* Encoder: `pre_rnn`, a 2-layer LSTM of 1024; `stack_time`, which
  concatenates each frame with the next (factor 2; zeros past the end) and
  keeps every second one, so lengths become ceil(T / 2); `post_rnn`, a
  3-layer LSTM of 1024 (input 2048). Dropout 0.1 after every LSTM layer.
* Prediction network: an embedding of the 1023 labels (the blank, the last
  of 1024 classes, has none) to 512, a zero "start" vector prepended, a
  2-layer LSTM of 512 with dropout 0.3.
* Joint: joint_enc (1024 -> 512) of the encoder output and joint_pred
  (512 -> 512) of the prediction, added over the (T, U + 1) lattice, ReLU,
  dropout 0.3, joint_net (512 -> 1024 classes).

LSTMs are PyTorch's (gates in the order input, forget, cell, output; two
bias vectors, bias_ih and bias_hh), run over the padded sequence without
masking, as the reference runs them (outputs past a sequence's length are
ignored by the loss). Each layer projects all its inputs at once (one
[B * T, I] x [I, 4H] matmul) and scans over time with one fused [B, H] x
[H, 4H] matmul a step.

Initialisation, as the reference: PyTorch's defaults (LSTM weights and
biases U(+-1/sqrt(H)); Linear weights and biases U(+-1/sqrt(fan_in));
Embedding N(0, 1)), then each LSTM's forget-gate input bias set to
`forget_gate_bias` (1.0) and its hidden bias scaled by
`hidden_hidden_bias_scale` (0.0), then every LSTM weight and bias
multiplied by `weights_init_scale` (0.5 in the reference's train.sh; the
embedding and the linear layers are not scaled).

With the reference's sizes the network has 49,006,080 parameters. Layout is
batch-major: features [B, T, F], outputs [B, T', U + 1, classes].
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

NUM_CLASSES = 1024          # 1023 sentencepiece labels + blank (the last)
IN_FEATURES = 240           # 80 mel filters x 3 stacked frames
ENC_HIDDEN = 1024
ENC_PRE_LAYERS = 2
ENC_POST_LAYERS = 3
STACK_TIME_FACTOR = 2
PRED_HIDDEN = 512
PRED_LAYERS = 2
JOINT_HIDDEN = 512
FORGET_GATE_BIAS = 1.0
WEIGHTS_INIT_SCALE = 0.5


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _lstm_bias_init(hidden: int, scale: float, forget: float | None,
                    kind: str):
  """PyTorch's U(+-1/sqrt(H)) bias, its forget-gate slice [H, 2H) set to
  `forget` (input bias) or scaled by `forget` (hidden bias), times
  `scale`."""
  def init(key, shape, dtype=jnp.float32):
    b = _uniform(1 / math.sqrt(hidden))(key, shape, dtype)
    if forget is not None:
      gate = b[hidden:2 * hidden]
      b = b.at[hidden:2 * hidden].set(
          jnp.full_like(gate, forget) if kind == 'ih' else gate * forget)
    return b * scale
  return init


class LSTMLayer(nn.Module):
  """One PyTorch-style LSTM layer over [B, T, I] -> ([B, T, H], (h, c))."""
  hidden: int
  weights_init_scale: float = 1.0
  forget_gate_bias: float | None = FORGET_GATE_BIAS
  hidden_hidden_bias_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, carry=None):
    h4 = 4 * self.hidden
    bound = 1 / math.sqrt(self.hidden)
    scaled = lambda init: (lambda *a: init(*a) * self.weights_init_scale)
    # Kernels are stored (in, 4H): PyTorch's weight_ih / weight_hh
    # transposed, gate blocks in its order (i, f, g, o).
    w_ih = self.param('kernel_ih', scaled(_uniform(bound)),
                      (x.shape[-1], h4))
    w_hh = self.param('kernel_hh', scaled(_uniform(bound)),
                      (self.hidden, h4))
    b_ih = self.param('bias_ih', _lstm_bias_init(
        self.hidden, self.weights_init_scale, self.forget_gate_bias, 'ih'),
                      (h4,))
    b_hh = self.param('bias_hh', _lstm_bias_init(
        self.hidden, self.weights_init_scale,
        None if self.forget_gate_bias is None
        else self.hidden_hidden_bias_scale, 'hh'), (h4,))
    batch = x.shape[0]
    acc = jnp.promote_types(self.dtype, jnp.float32)
    # All time steps' input projections in one matmul.
    xp = jnp.einsum('bti,ig->tbg', x.astype(self.dtype),
                    w_ih.astype(self.dtype),
                    preferred_element_type=acc) + (b_ih + b_hh).astype(acc)
    if carry is None:
      zeros = jnp.zeros((batch, self.hidden), acc)
      carry = (zeros, zeros)
    w_hh_c = w_hh.astype(self.dtype)

    def step(carry, xp_t):
      h, c = carry
      gates = xp_t + jnp.dot(h.astype(self.dtype), w_hh_c,
                             preferred_element_type=acc)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    carry, hs = jax.lax.scan(step, carry, xp)
    return jnp.swapaxes(hs, 0, 1).astype(self.dtype), carry


class LSTM(nn.Module):
  """A stack of LSTMLayers with dropout after each (the reference's
  common/rnn.LSTM: torch.nn.LSTM's dropout between layers and one more on
  its output)."""
  hidden: int
  num_layers: int
  dropout: float = 0.0
  weights_init_scale: float = 1.0
  forget_gate_bias: float | None = FORGET_GATE_BIAS
  hidden_hidden_bias_scale: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, carry=None, *, deterministic: bool = True):
    out_carry = []
    for k in range(self.num_layers):
      x, c = LSTMLayer(self.hidden, self.weights_init_scale,
                       self.forget_gate_bias, self.hidden_hidden_bias_scale,
                       self.dtype, name=f'layer{k}')(
                           x, None if carry is None else carry[k])
      out_carry.append(c)
      x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return x, tuple(out_carry)


def stack_time(x: jax.Array, lengths: jax.Array, factor: int
               ) -> tuple[jax.Array, jax.Array]:
  """The reference's StackTime on [B, T, F]: frame t concatenated with
  frames t + 1 .. t + factor - 1 (zeros past the end), every factor-th
  kept: [B, ceil(T / factor), factor * F]; lengths ceil(len / factor)."""
  parts = [x] + [jnp.pad(x[:, i:], ((0, 0), (0, i), (0, 0)))
                 for i in range(1, factor)]
  stacked = jnp.concatenate(parts, axis=-1)[:, ::factor]
  return stacked, (lengths + factor - 1) // factor


def _torch_linear(features: int, fan_in: int, name: str,
                  dtype: Dtype) -> nn.Dense:
  bound = 1 / math.sqrt(fan_in)
  return nn.Dense(features, dtype=dtype, kernel_init=_uniform(bound),
                  bias_init=_uniform(bound), name=name)


class RNNT(nn.Module):
  """The MLPerf RNN-T. Methods (each usable with apply(..., method=)):
    encode(features [B, T, F], lengths [B]) -> ([B, T', H_enc], lengths)
    predict(labels [B, U]) -> [B, U + 1, H_pred] (a start step first)
    predict_step(labels [B], carry) -> ([B, H_pred], carry), one step
    joint(f [B, T', H_enc], g [B, U + 1, H_pred]) -> [B, T', U + 1, C]
    __call__(features, lengths, labels) -> (logits, output lengths).
  """
  num_classes: int = NUM_CLASSES
  in_features: int = IN_FEATURES
  enc_hidden: int = ENC_HIDDEN
  enc_pre_layers: int = ENC_PRE_LAYERS
  enc_post_layers: int = ENC_POST_LAYERS
  stack_time_factor: int = STACK_TIME_FACTOR
  pred_hidden: int = PRED_HIDDEN
  pred_layers: int = PRED_LAYERS
  joint_hidden: int = JOINT_HIDDEN
  enc_dropout: float = 0.1
  pred_dropout: float = 0.3
  joint_dropout: float = 0.3
  forget_gate_bias: float | None = FORGET_GATE_BIAS
  hidden_hidden_bias_scale: float = 0.0
  weights_init_scale: float = WEIGHTS_INIT_SCALE
  dtype: Dtype = jnp.float32

  def setup(self):
    lstm = lambda hidden, layers, dropout, name: LSTM(
        hidden, layers, dropout, self.weights_init_scale,
        self.forget_gate_bias, self.hidden_hidden_bias_scale, self.dtype,
        name=name)
    self.pre_rnn = lstm(self.enc_hidden, self.enc_pre_layers,
                        self.enc_dropout, 'pre_rnn')
    self.post_rnn = lstm(self.enc_hidden, self.enc_post_layers,
                         self.enc_dropout, 'post_rnn')
    self.pred_embed = nn.Embed(self.num_classes - 1, self.pred_hidden,
                               embedding_init=nn.initializers.normal(1.0),
                               name='pred_embed')
    self.dec_rnn = lstm(self.pred_hidden, self.pred_layers,
                        self.pred_dropout, 'dec_rnn')
    self.joint_pred = _torch_linear(self.joint_hidden, self.pred_hidden,
                                    'joint_pred', self.dtype)
    self.joint_enc = _torch_linear(self.joint_hidden, self.enc_hidden,
                                   'joint_enc', self.dtype)
    self.joint_net = _torch_linear(self.num_classes, self.joint_hidden,
                                   'joint_net', self.dtype)
    self.joint_drop = nn.Dropout(self.joint_dropout)

  @property
  def blank(self) -> int:
    return self.num_classes - 1

  def encode(self, features, lengths, *, deterministic: bool = True):
    x, _ = self.pre_rnn(features, deterministic=deterministic)
    x, lengths = stack_time(x, lengths, self.stack_time_factor)
    x, _ = self.post_rnn(x, deterministic=deterministic)
    return x, lengths

  def predict(self, labels, *, deterministic: bool = True):
    y = self.pred_embed(labels).astype(self.dtype)
    y = jnp.pad(y, ((0, 0), (1, 0), (0, 0)))          # the start step
    g, _ = self.dec_rnn(y, deterministic=deterministic)
    return g

  def predict_step(self, labels, carry, *, start=None):
    """One prediction step for greedy decoding: `labels` [B] (the last
    emitted symbol; rows where `start` is True feed the zero start
    vector instead) -> ([B, H_pred], carry)."""
    y = self.pred_embed(jnp.clip(labels, 0, self.num_classes - 2)).astype(
        self.dtype)
    if start is not None:
      y = jnp.where(start[:, None], 0, y)
    g, carry = self.dec_rnn(y[:, None], carry)
    return g[:, 0], carry

  def joint(self, f, g, *, deterministic: bool = True):
    h = (self.joint_enc(f)[:, :, None, :] + self.joint_pred(g)[:, None])
    h = self.joint_drop(jax.nn.relu(h), deterministic=deterministic)
    return self.joint_net(h).astype(jnp.promote_types(self.dtype,
                                                      jnp.float32))

  def __call__(self, features, lengths, labels, *,
               deterministic: bool = True):
    f, lengths = self.encode(features, lengths, deterministic=deterministic)
    g = self.predict(labels, deterministic=deterministic)
    return self.joint(f, g, deterministic=deterministic), lengths


def reference_param_count() -> int:
  """The parameter count of the reference configuration, by formula
  (PyTorch LSTMs: 4H(I + H) + 8H a layer)."""
  lstm = lambda i, h: 4 * h * (i + h) + 8 * h
  enc = (lstm(IN_FEATURES, ENC_HIDDEN) + lstm(ENC_HIDDEN, ENC_HIDDEN)
         + lstm(STACK_TIME_FACTOR * ENC_HIDDEN, ENC_HIDDEN)
         + 2 * lstm(ENC_HIDDEN, ENC_HIDDEN))
  pred = (NUM_CLASSES - 1) * PRED_HIDDEN + 2 * lstm(PRED_HIDDEN, PRED_HIDDEN)
  joint = ((PRED_HIDDEN + 1) * JOINT_HIDDEN + (ENC_HIDDEN + 1) * JOINT_HIDDEN
           + (JOINT_HIDDEN + 1) * NUM_CLASSES)
  return enc + pred + joint
