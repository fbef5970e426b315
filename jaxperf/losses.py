"""Training losses of the MLPerf workloads, in jax.numpy.

3D U-Net (KiTS19): `dice_ce_loss` is the reference's DiceCELoss
(image_segmentation/pytorch/model/losses.py) for channels-last tensors,
logits [B, D, H, W, C] and integer labels [B, D, H, W]:

    p        = softmax(logits) over the classes
    dice     = (2 sum(p * y) + smooth) / (sum(y) + sum(p) + smooth)
               per sample and per class (background excluded), the sums over
               the spatial axes, y the one-hot labels
    loss     = (mean(1 - dice) + mean cross-entropy over all voxels) / 2

with smooth = 1e-6 in numerator and denominator. Only jnp reductions over
named axes are used, so the spatial axes may be sharded across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _compute_dtype(logits: jax.Array):
  """float32 for half-precision and float32 logits, float64 for float64."""
  return jnp.promote_types(logits.dtype, jnp.float32)


def _check_classes(logits: jax.Array, num_classes: int,
                   include_background: bool) -> None:
  if logits.shape[-1] != num_classes:
    raise ValueError(f'logits have {logits.shape[-1]} classes on the last '
                     f'axis, expected num_classes={num_classes}')
  if not include_background and num_classes < 2:
    raise ValueError('excluding the background needs at least 2 classes, '
                     f'got {num_classes}')


def dice_scores(logits: jax.Array, labels: jax.Array, *, num_classes: int = 3,
                include_background: bool = False,
                smooth: float = 1e-6) -> jax.Array:
  """Soft Dice of softmax(logits) per sample and class, as the loss uses it.

  This is the differentiable score (the reference's Dice with use_softmax);
  the DICE metric of argmax predictions is `jaxperf.metrics.dice`.

  Args:
    logits: [B, *spatial, C], any float dtype; the softmax is taken in
      float32.
    labels: integer class ids [B, *spatial].
    num_classes: C.
    include_background: keep class 0 in the result.
    smooth: added to numerator and denominator.

  Returns:
    float32 (float64 for float64 logits) [B, C] (or [B, C - 1] without the background).
  """
  _check_classes(logits, num_classes, include_background)
  dt = _compute_dtype(logits)
  probs = jax.nn.softmax(logits.astype(dt), axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=dt)
  if not include_background:
    probs, onehot = probs[..., 1:], onehot[..., 1:]
  axes = tuple(range(1, logits.ndim - 1))
  intersection = jnp.sum(probs * onehot, axis=axes)
  label_sum = jnp.sum(onehot, axis=axes)
  pred_sum = jnp.sum(probs, axis=axes)
  return (2.0 * intersection + smooth) / (label_sum + pred_sum + smooth)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over all voxels (float32 scalar).

  Args:
    logits: [B, *spatial, C]; the log-softmax is taken in float32.
    labels: integer class ids [B, *spatial].
  """
  dt = _compute_dtype(logits)
  logp = jax.nn.log_softmax(logits.astype(dt), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=dt)
  return -jnp.mean(jnp.sum(onehot * logp, axis=-1))


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, num_classes: int = 3,
                 include_background: bool = False,
                 smooth: float = 1e-6) -> jax.Array:
  """The 3D U-Net loss: (mean(1 - soft Dice) + cross-entropy) / 2.

  As the reference's DiceCELoss(to_onehot_y=True, use_softmax=True,
  include_background=False): the Dice term is averaged over the batch and the
  foreground classes, the cross-entropy over every voxel of the batch.

  Args:
    logits: [B, D, H, W, C] (any float dtype; computed in float32).
    labels: integer class ids [B, D, H, W].
    num_classes: C (3 for KiTS19: background, kidney, tumor).
    include_background: count class 0 in the Dice term too.
    smooth: Dice smoothing, in numerator and denominator.

  Returns:
    float32 scalar.
  """
  dice = dice_scores(logits, labels, num_classes=num_classes,
                     include_background=include_background, smooth=smooth)
  return (jnp.mean(1.0 - dice) + cross_entropy(logits, labels)) / 2
