"""Optimizers and learning-rate schedules as MLPerf specifies them.

`mlperf_lars` follows the update of the MLPerf reference LARS (TensorFlow
`MLPERF_LARSOptimizer`, MXNet `SGDwFASTLARS`): for every variable not excluded
(batch-norm parameters and biases are),

    trust  = eeta * |w| / (|g| + wd * |w| + eps)   (1 where |w| or |g| is 0)
    v      = momentum * v + lr * trust * (g + wd * w)
    w      = w - v

and for excluded variables plain momentum SGD without weight decay:
v = momentum * v + lr * g. Note the denominator |g| + wd|w|, which is not the
|g + wd w| of optax.lars.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]


def poly_warmup_schedule(base_lr: float, warmup_steps: int, total_steps: int,
                         end_lr: float = 1e-4, power: float = 2.0) -> Schedule:
  """Linear warmup to base_lr, then polynomial decay to end_lr.

  As the reference's PolynomialDecayWithWarmup: decay runs over
  decay_steps = total_steps - warmup_steps + 1 steps (see `decay_steps`).
  """
  decay = decay_steps(warmup_steps, total_steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base_lr * step / max(warmup_steps, 1)
    frac = jnp.clip((step - warmup_steps) / decay, 0.0, 1.0)
    poly = (base_lr - end_lr) * (1.0 - frac) ** power + end_lr
    return jnp.where(step < warmup_steps, warm, poly)

  return schedule


def decay_steps(warmup_steps: int, total_steps: int) -> int:
  return max(total_steps - warmup_steps + 1, 1)


class LarsState(NamedTuple):
  count: jax.Array
  momentum: Any


def mlperf_lars(learning_rate: Schedule | float, *, momentum: float = 0.9,
                weight_decay: float = 1e-4, eeta: float = 1e-3,
                epsilon: float = 0.0,
                lars_mask: Any | Callable[[Any], Any] = None
                ) -> optax.GradientTransformation:
  """LARS with the MLPerf reference's trust ratio and exclusions.

  Args:
    learning_rate: a float or a schedule of the step count.
    lars_mask: a pytree of bools like the params (or a function of params to
      one): True where LARS scaling and weight decay apply, False for the
      excluded (batch-norm and bias) variables. None applies LARS everywhere.
  """
  lr_fn = learning_rate if callable(learning_rate) else (
      lambda _: jnp.asarray(learning_rate, jnp.float32))

  def init(params):
    return LarsState(jnp.zeros([], jnp.int32),
                     jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                                  params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError('mlperf_lars needs params to compute trust ratios')
    mask = lars_mask(params) if callable(lars_mask) else lars_mask
    if mask is None:
      mask = jax.tree.map(lambda _: True, params)
    lr = lr_fn(state.count)

    def one(g, w, v, use_lars):
      g32 = g.astype(jnp.float32)
      w32 = w.astype(jnp.float32)
      if use_lars:
        w_norm = jnp.linalg.norm(w32)
        g_norm = jnp.linalg.norm(g32)
        trust = jnp.where(
            (w_norm > 0) & (g_norm > 0),
            eeta * w_norm / (g_norm + weight_decay * w_norm + epsilon), 1.0)
        step = lr * trust * (g32 + weight_decay * w32)
      else:
        step = lr * g32
      v_new = momentum * v + step
      return -v_new.astype(w.dtype), v_new

    out = jax.tree.map(one, grads, params, state.momentum, mask)
    treedef = jax.tree.structure(grads)
    leaves = treedef.flatten_up_to(out)
    updates = treedef.unflatten([u for u, _ in leaves])
    new_mom = treedef.unflatten([v for _, v in leaves])
    return updates, LarsState(state.count + 1, new_mom)

  return optax.GradientTransformation(init, update)


def sgd_momentum(learning_rate: Schedule | float, *, momentum: float = 0.9,
                 weight_decay: float = 1e-4,
                 decay_mask: Any = None) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay added to the gradient."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.sgd(learning_rate, momentum=momentum))


def weight_decay_mask(params: Any) -> Any:
  """True for conv/dense kernels; False for biases and batch-norm params."""
  def keep(path, _):
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', str(last)))
    return name == 'kernel'
  return jax.tree_util.tree_map_with_path(keep, params)


# ------------------------------------------------------------------- BERT


def bert_lr_schedule(base_lr: float, warmup_steps: int, total_steps: int,
                     start_warmup_step: int = 0,
                     power: float = 1.0) -> Schedule:
  """The MLPerf BERT reference's learning rate at (0-based) step t.

  Polynomial decay of base_lr to 0 at `total_steps`, counted from step 0:
      base_lr * (1 - min(t, total_steps) / total_steps) ** power
  replaced while t - start_warmup_step < warmup_steps by the linear warmup
      base_lr * (t - start_warmup_step) / warmup_steps.
  (start_warmup_step may be negative: warmup then starts part-way up.)
  """
  total = max(int(total_steps), 1)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    decayed = base_lr * (1.0 - jnp.minimum(t, total) / total) ** power
    if not warmup_steps:
      return decayed
    warm_t = t - start_warmup_step
    warm = base_lr * warm_t / warmup_steps
    return jnp.where(warm_t < warmup_steps, warm, decayed)

  return schedule


def lamb(learning_rate: Schedule | float, *, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.01,
         decay_mask: Any = None, clip_norm: float | None = 1.0
         ) -> optax.GradientTransformation:
  """LAMB as the MLPerf BERT reference applies it.

  Gradients are clipped to global norm `clip_norm`; then per tensor
      m, v   = Adam moments;  u = m_hat / (sqrt(v_hat) + eps)   (bias-corrected)
      u     += weight_decay * w                   (decayed tensors only)
      w     -= lr * r * u,  r = |w| / |u|  (1 if either norm is 0;
                                            r = 1 for excluded tensors)
  Layer-norm parameters and biases are excluded from both the weight decay
  and the trust ratio (`decay_mask` False): the reference's
  exclude_from_weight_decay = ["LayerNorm", "layer_norm", "bias"], which its
  LAMB also uses as exclude_from_layer_adaptation.
  """
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts += [
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.masked(optax.scale_by_trust_ratio(), decay_mask)
      if decay_mask is not None else optax.scale_by_trust_ratio(),
      optax.scale_by_learning_rate(learning_rate),
  ]
  return optax.chain(*parts)


def bert_decay_mask(params: Any) -> Any:
  """False for layer-norm parameters and biases (the reference's exclusions:
  any tensor whose name contains LayerNorm, layer_norm or bias)."""
  def keep(path, _):
    names = [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]
    return not any('layer_norm' in n or 'bias' in n for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def dlrm_lr_schedule(base_lr: float, warmup_steps: int, decay_start_step: int,
                     decay_steps: int, power: float = 2.0,
                     min_lr: float = 1e-7) -> Schedule:
  """The MLPerf DLRM reference's learning rate (its LRPolicyScheduler) at the
  0-based optimizer step t.

  The reference reads its scheduler's step count, s = t + 1, and gives
      base_lr * s / warmup_steps                        while s < warmup_steps,
      max(min_lr, base_lr * ((N - (s - D)) / N) ** power)  for D <= s < D + N,
  with D = decay_start_step and N = decay_steps; any other step keeps the
  last rate set, so between warmup and decay the rate stays at
  base_lr * (warmup_steps - 1) / warmup_steps, and after the decay at
  base_lr / N ** power. With no decay (N = 0) the rate outside warmup is
  base_lr.
  """
  if decay_steps and decay_start_step < warmup_steps:
    raise ValueError(f'the learning-rate decay (from step {decay_start_step})'
                     f' must start after the warmup ({warmup_steps} steps)')
  w, d, n = int(warmup_steps), int(decay_start_step), int(decay_steps)

  def warm(s):
    return base_lr * s / w if w else jnp.full_like(s, base_lr)

  def decayed(s):
    return jnp.maximum(min_lr, base_lr * ((n - (s - d)) / n) ** power)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32) + 1.0
    if not n:
      return jnp.where(s < w, warm(s), base_lr) if w else jnp.full_like(
          s, base_lr)
    hold = warm(jnp.float32(max(w - 1, 0))) if w > 1 else jnp.float32(
        base_lr if w == 0 else base_lr / w)
    lr = jnp.where(s < w, warm(s), hold)
    lr = jnp.where((s >= d) & (s < d + n), decayed(s), lr)
    return jnp.where(s >= d + n, decayed(jnp.float32(d + n - 1)), lr)

  return schedule


# ------------------------------------------------------------------ RNN-T


def rnnt_lr_schedule(base_lr: float, steps_per_epoch: int,
                     warmup_epochs: int, hold_epochs: int, exp_gamma: float,
                     min_lr: float = 1e-5) -> Schedule:
  """The MLPerf RNN-T reference's learning rate (its lr_policy) for the
  0-based optimizer step t.

  The reference sets the rate before each update from its 1-based step
  s = t + 1 and 1-based epoch e = t // steps_per_epoch + 1:
      a = (s + 1) / (W + 1)                     while s < W,
      a = 1                                     while s < W + H,
      a = exp_gamma ** (e - warmup_epochs - hold_epochs)   after,
      lr = max(a * base_lr, min_lr),
  with W = warmup_epochs * steps_per_epoch and H = hold_epochs *
  steps_per_epoch.
  """
  if steps_per_epoch < 1:
    raise ValueError(f'steps_per_epoch={steps_per_epoch}: expected >= 1')
  warm = warmup_epochs * steps_per_epoch
  hold = hold_epochs * steps_per_epoch

  def schedule(step):
    t = jnp.asarray(step, jnp.int32)
    s = (t + 1).astype(jnp.float32)
    epoch = (t // steps_per_epoch + 1).astype(jnp.float32)
    decay = jnp.power(jnp.float32(exp_gamma),
                      epoch - warmup_epochs - hold_epochs)
    a = jnp.where(s < warm, (s + 1) / (warm + 1),
                  jnp.where(s < warm + hold, 1.0, decay))
    return jnp.maximum(a * base_lr, min_lr)

  return schedule
