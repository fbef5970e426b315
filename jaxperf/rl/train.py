"""MiniGo's network training on self-play positions, as the reference's
train.py does it.

* Optimizer: momentum SGD (TF MomentumOptimizer: v = 0.9 v + g, w -= lr v)
  on a piecewise-constant learning rate (`piecewise_lr`, TF's
  piecewise_constant: rates[0] up to and including boundaries[0], rates[1]
  up to boundaries[1], ...).
* Loss: losses.minigo_losses (policy cross-entropy against the search's visit
  distribution, 0.5 x the value MSE against the game's result, 1e-4 x L2).
* Augmentation: each example is transformed by one of the board's 8
  symmetries, drawn at random (the reference's random rotations), features
  and policy alike (`symmetry`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxperf import losses
from jaxperf.models import minigo as minigo_model

NUM_SYMMETRIES = 8


def piecewise_lr(boundaries: Sequence[int], rates: Sequence[float]):
  """TF's piecewise_constant of the (0-based) global step."""
  if len(rates) != len(boundaries) + 1:
    raise ValueError(f'{len(rates)} rates for {len(boundaries)} boundaries: '
                     f'expected one more rate than boundaries')
  b = jnp.asarray(list(boundaries), jnp.int32)
  r = jnp.asarray(list(rates), jnp.float32)

  def schedule(step):
    return r[jnp.searchsorted(b, jnp.asarray(step, jnp.int32), side='left')]

  return schedule


def symmetry(planes: jax.Array, policy: jax.Array, k: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
  """Board symmetry k (0..7: k % 4 quarter turns, then a transpose if
  k >= 4) applied to features [N, N, C] and a policy [N * N + 1] (the pass
  stays last)."""
  n = planes.shape[0]
  board = policy[:-1].reshape(n, n)

  def apply(x, k):
    branches = [lambda x, t=t: jnp.rot90(x, t, axes=(0, 1)) for t in range(4)]
    x = jax.lax.switch(k % 4, branches, x)
    return jax.lax.cond(k >= 4, lambda x: jnp.swapaxes(x, 0, 1), lambda x: x,
                        x)

  return apply(planes, k), jnp.concatenate([apply(board, k).reshape(-1),
                                            policy[-1:]])


class TrainState(struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def optimizer(boundaries, rates, momentum: float = 0.9):
  return optax.sgd(piecewise_lr(boundaries, rates), momentum=momentum)


def init(model: minigo_model.MiniGo, tx, key: jax.Array) -> TrainState:
  n = model.board_size
  variables = model.init(key, jnp.zeros((1, n, n, model.input_planes)),
                         train=False)
  return TrainState(step=jnp.zeros([], jnp.int32),
                    params=variables['params'],
                    batch_stats=variables['batch_stats'],
                    opt_state=tx.init(variables['params']))


def train_step(model: minigo_model.MiniGo, tx, state: TrainState,
               batch: dict[str, jax.Array], key: jax.Array, *,
               l2_strength: float = 1e-4,
               value_cost_weight: float = 0.5,
               augment: bool = True) -> tuple[TrainState, dict[str, Any]]:
  """One update on `batch` ({'features' [B, N, N, C], 'policy' [B, A],
  'result' [B] (black's)}), each example under a random symmetry."""
  feats, pi = batch['features'], batch['policy']
  if augment:
    ks = jax.random.randint(key, (feats.shape[0],), 0, NUM_SYMMETRIES)
    feats, pi = jax.vmap(symmetry)(feats, pi, ks)

  def loss_fn(params):
    (logits, value), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, feats,
        train=True, mutable=['batch_stats'])
    parts = losses.minigo_losses(params, logits, value, pi,
                              batch['result'].astype(jnp.float32),
                              l2_strength=l2_strength,
                              value_cost_weight=value_cost_weight)
    return parts['combined_cost'], (parts, updates['batch_stats'])

  grads, (parts, stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, batch_stats=stats,
                       opt_state=opt_state), parts


def inverse_symmetry(policy: jax.Array, k: jax.Array) -> jax.Array:
  """Undoes `symmetry` k on a policy [N * N + 1] (the pass stays last)."""
  n = math.isqrt(policy.shape[0] - 1)
  board = policy[:-1].reshape(n, n)
  board = jax.lax.cond(k >= 4, lambda x: jnp.swapaxes(x, 0, 1),
                       lambda x: x, board)
  branches = [lambda x, t=t: jnp.rot90(x, -t, axes=(0, 1)) for t in range(4)]
  board = jax.lax.switch(k % 4, branches, board)
  return jnp.concatenate([board.reshape(-1), policy[-1:]])


def inference_symmetry(state, mix: jax.Array) -> jax.Array:
  """The reference's GetInferenceSymmetry: one of the 8 symmetries, a
  pseudo-random but fixed function of the position's stones and the
  player's `mix`, so one player sees a position the same way every time
  and two players (or games) see it differently."""
  key = jax.random.fold_in(jax.random.key(0), mix)
  key = jax.random.fold_in(jax.random.fold_in(key, state.hash[0]),
                           state.hash[1])
  return jax.random.randint(key, (), 0, NUM_SYMMETRIES)


def evaluator(model: minigo_model.MiniGo, variables: dict[str, Any], *,
              random_symmetry: bool = True):
  """The network as the search wants it: `evaluate(state, mix)` -> (move
  probabilities, value for black), in inference mode. With
  `random_symmetry` (the reference's default) the input is transformed by
  `inference_symmetry(state, mix)` and the policy transformed back."""
  from jaxperf.rl import go  # pylint: disable=g-import-not-at-top

  def evaluate(state, mix=0):
    x = go.features(state)
    a = x.shape[0] * x.shape[1] + 1
    k = inference_symmetry(state, mix) if random_symmetry else 0
    if random_symmetry:
      x, _ = symmetry(x, jnp.zeros((a,), x.dtype), k)
    logits, value = model.apply(variables, x[None], train=False)
    probs = jax.nn.softmax(logits[0].astype(jnp.float32))
    if random_symmetry:
      probs = inverse_symmetry(probs, k)
    return probs, value[0]

  evaluate.takes_mix = True
  return evaluate


def random_evaluator(seed: int, policy_stddev: float = 0.4,
                     value_stddev: float = 0.4):
  """The reference's random model (cc/dual_net/random_dual_net.cc) as an
  evaluator: move probabilities softmax(normal(0.5, policy_stddev)), a
  value drawn from normal(0, value_stddev) inside [-1, 1]. Its noise is a
  function of `seed` and the position's hash, so a search stays a pure
  function of its inputs (a position reached twice gets the same output)
  and of the player's `mix`."""
  base = jax.random.key(seed)

  def evaluate(state, mix=0):
    key = jax.random.fold_in(jax.random.fold_in(base, mix), state.hash[0])
    key = jax.random.fold_in(key, state.hash[1])
    key = jax.random.fold_in(key, state.move_number)
    k_policy, k_value = jax.random.split(key)
    a = state.board.shape[0] + 1
    logits = 0.5 + policy_stddev * jax.random.normal(k_policy, (a,))
    value = value_stddev * jax.random.truncated_normal(
        k_value, -1.0 / value_stddev, 1.0 / value_stddev)
    return jax.nn.softmax(logits), value

  evaluate.takes_mix = True
  return evaluate
