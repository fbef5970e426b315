"""Greedy decoding of the RNN-T (the MLPerf reference's RNNTGreedyDecoder),
batched and jittable."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxperf.models.rnnt import RNNT


def zero_carry(model: RNNT, batch: int) -> tuple:
  """The prediction network's initial (h, c) per layer."""
  z = jnp.zeros((batch, model.pred_hidden),
                jnp.promote_types(model.dtype, jnp.float32))
  return tuple((z, z) for _ in range(model.pred_layers))


def greedy_decode(model: RNNT, variables: Any, features: jax.Array,
                  lengths: jax.Array, *, max_symbols_per_step: int = 30,
                  max_symbols_per_sample: int = 300
                  ) -> tuple[jax.Array, jax.Array]:
  """The reference's RNNTGreedyDecoder, batched and jittable.

  Per utterance, frame by frame over the encoder's output: the joint of
  the frame and the prediction for the labels so far; its argmax, if not
  the blank, is appended and fed to the prediction network, and the frame
  is tried again, at most `max_symbols_per_step` times (blanks included);
  a blank moves to the next frame. Decoding of an utterance stops at the
  start of a frame once it holds more than `max_symbols_per_sample`
  labels (the reference's check). All utterances advance together, one
  joint (and one prediction step) per iteration of a while_loop, each on
  its own frame.

  Args:
    model: the RNNT module; variables: its variables.
    features: [B, T, F] input features; lengths: [B] frames.
    max_symbols_per_step: the cap per frame (the reference's 30).
    max_symbols_per_sample: the cap per utterance (eval_max_prediction_
      symbols, 300).

  Returns:
    (labels int32 [B, L] padded with -1, counts int32 [B]), L =
    max_symbols_per_sample + max_symbols_per_step.
  """
  f, f_lens = model.apply(variables, features, lengths, method='encode')
  batch, t_len = f.shape[:2]
  blank = model.num_classes - 1
  cap = max_symbols_per_sample + max_symbols_per_step
  # The joint's encoder half, once for all frames.
  enc = model.apply(variables, f, method=lambda m, f: m.joint_enc(f))

  def predict(prev, carry, start):
    return model.apply(variables, prev, carry, start=start,
                       method='predict_step')

  g, carry = predict(jnp.zeros((batch,), jnp.int32), zero_carry(model, batch),
                     jnp.ones((batch,), bool))
  rows = jnp.arange(batch)

  def joint_step(t, g):
    e = enc[rows, jnp.minimum(t, t_len - 1)]
    return model.apply(
        variables, e, g,
        method=lambda m, e, g: m.joint_net(jax.nn.relu(e + m.joint_pred(g))))

  state = dict(t=jnp.zeros((batch,), jnp.int32),
               added=jnp.zeros((batch,), jnp.int32),
               count=jnp.zeros((batch,), jnp.int32),
               labels=jnp.full((batch, cap), -1, jnp.int32),
               g=g, carry=carry)

  def active(s):
    return (s['t'] < f_lens) & ~((s['added'] == 0)
                                 & (s['count'] > max_symbols_per_sample))

  def body(s):
    live = active(s)
    k = jnp.argmax(joint_step(s['t'], s['g']), axis=-1).astype(jnp.int32)
    emit = live & (k != blank)
    labels = s['labels'].at[rows, jnp.where(emit, s['count'], cap)].set(
        k, mode='drop')
    g_new, carry_new = predict(k, s['carry'], jnp.zeros((batch,), bool))
    pick = lambda new, old: jnp.where(
        emit.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    added = jnp.where(live, s['added'] + 1, s['added'])
    next_frame = live & ((k == blank) | (added >= max_symbols_per_step))
    return dict(t=jnp.where(next_frame, s['t'] + 1, s['t']),
                added=jnp.where(next_frame, 0, added),
                count=s['count'] + emit.astype(jnp.int32),
                labels=labels, g=pick(g_new, s['g']),
                carry=jax.tree.map(pick, carry_new, s['carry']))

  out = jax.lax.while_loop(lambda s: jnp.any(active(s)), body, state)
  return out['labels'], out['count']
