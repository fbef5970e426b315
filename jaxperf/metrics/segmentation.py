"""DICE of segmentations (3D U-Net, KiTS19).

As the reference's DiceScore (image_segmentation/pytorch/model/losses.py):
the prediction is the argmax over the classes, prediction and label are
one-hot encoded, and for every class c

    dice_c = (2 |pred == c and label == c| + smooth)
             / (|label == c| + |pred == c| + smooth)

counted over the spatial axes of one case, smooth = 1e-6. A class absent from
both prediction and label scores 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def dice(pred: Any, labels: Any, *, num_classes: int = 3,
         include_background: bool = False, smooth: float = 1e-6) -> Any:
  """DICE per class of one case, or of each case of a batch.

  The MLPerf quality metric, mean DICE, is the mean over classes 1 (kidney)
  and 2 (tumor) of these per-case scores averaged over all evaluation cases:
  `scores.mean(axis=0)` over the cases, then the mean of its two entries.

  Args:
    pred: integer class ids shaped like labels, or logits (or probabilities)
      with one more, last, axis of size num_classes, reduced by argmax.
    labels: integer class ids, [D, H, W] for one case or [B, D, H, W] for a
      batch; the last three axes are the spatial ones that are counted over.
    num_classes: number of classes.
    include_background: keep class 0 in the result.
    smooth: added to numerator and denominator.

  Returns:
    float32 [..., C] (C - 1 without the background), the leading axes those
    of labels before the last three. A numpy array for numpy inputs, a jax
    array (usable under jit) if pred or labels is one.
  """
  use_jax = isinstance(pred, jax.Array) or isinstance(labels, jax.Array)
  xp = jnp if use_jax else np
  pred = xp.asarray(pred)
  labels = xp.asarray(labels)
  if labels.ndim < 3:
    raise ValueError(f'labels need 3 spatial axes, got shape {labels.shape}')
  if pred.ndim == labels.ndim + 1:
    if pred.shape[-1] != num_classes:
      raise ValueError(f'logits have {pred.shape[-1]} classes on the last '
                       f'axis, expected num_classes={num_classes}')
    pred = xp.argmax(pred, axis=-1)
  if pred.shape != labels.shape:
    raise ValueError(f'prediction shape {pred.shape} does not match labels '
                     f'shape {labels.shape}')
  if not include_background and num_classes < 2:
    raise ValueError('excluding the background needs at least 2 classes, '
                     f'got {num_classes}')

  axes = (-3, -2, -1)
  # Integer counts: exact at any volume size (a float32 sum of ones is not
  # past 2^24 voxels).
  count = jnp.int32 if use_jax else np.int64
  ftype = jnp.float32 if use_jax else np.float64
  scores = []
  for c in range(0 if include_background else 1, num_classes):
    p, t = pred == c, labels == c
    inter = xp.sum(p & t, axis=axes, dtype=count).astype(ftype)
    p_sum = xp.sum(p, axis=axes, dtype=count).astype(ftype)
    t_sum = xp.sum(t, axis=axes, dtype=count).astype(ftype)
    scores.append((2.0 * inter + smooth) / (t_sum + p_sum + smooth))
  return xp.stack(scores, axis=-1).astype(xp.float32)
