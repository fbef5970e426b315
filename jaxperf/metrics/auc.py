"""Exact area under the ROC curve (DLRM, MLPerf target AUC 0.8025).

The value is that of sklearn.metrics.roc_auc_score for binary labels: the
trapezoid rule over the ROC points of the distinct score thresholds, so a
positive and a negative with the same score count 1/2. Equivalently, with the
samples sorted by ascending score and grouped by equal score, every group g
with positive weight tp_g and negative weight fp_g contributes

    tp_g * (negatives strictly below g + fp_g / 2)

and the sum over the groups is divided by (total positive weight) x (total
negative weight). Unweighted, the sum is kept exact in int64, so the one
rounding is in the final division.

It runs on the host in numpy over the whole evaluation set (about 90 million
scores for Criteo 1TB): one argsort, gathers of the scores and labels into that
order, and per-group sums; no Python loop over the samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_1d(x: Any, name: str) -> np.ndarray:
  """The elements of x as a flat numpy array, without a copy where possible."""
  x = np.ravel(np.asarray(x))
  if x.size == 0:
    raise ValueError(f'AUC needs at least one sample, got an empty {name}')
  return x


def _scores_array(scores: Any) -> np.ndarray:
  """Scores as a numpy array of a dtype numpy sorts natively."""
  scores = _as_1d(scores, 'scores')
  kind = scores.dtype.kind
  if kind in 'fiub':
    return scores
  if kind == 'V':
    # bfloat16 and other extension floats: float32 holds their values
    # exactly, so the order and the ties stay as they are.
    try:
      return scores.astype(np.float32)
    except (TypeError, ValueError):
      pass
  raise ValueError(f'scores must be real numbers, got dtype {scores.dtype}')


def _positive_mask(labels: np.ndarray) -> np.ndarray:
  """Bool mask of the positive labels; refuses labels other than 0 and 1."""
  if labels.dtype == np.bool_:
    return labels
  kind = labels.dtype.kind
  if kind in 'iu':
    if labels.min() >= 0 and labels.max() <= 1:
      return labels == 1
  elif kind == 'f':
    positive = labels == 1
    negative = np.count_nonzero(labels == 0)
    if np.count_nonzero(positive) + negative == labels.size:
      return positive
  else:
    raise ValueError(f'labels must be 0/1 numbers or bools, got dtype '
                     f'{labels.dtype}')
  bad = labels[(labels != 0) & (labels != 1)]
  shown = ', '.join(repr(v.item()) for v in np.unique(bad)[:5])
  raise ValueError(f'labels must be 0 or 1, got {bad.size} other values '
                   f'(e.g. {shown})')


def _check_weights(weights: np.ndarray) -> None:
  """Refuses negative, NaN or infinite sample weights."""
  if weights.dtype.kind not in 'fiub':
    raise ValueError(f'sample_weight must be real numbers, got dtype '
                     f'{weights.dtype}')
  lo, hi = weights.min(), weights.max()
  # A NaN makes both comparisons false.
  if lo >= 0 and np.isfinite(hi):
    return
  non_finite = weights.size - np.count_nonzero(np.isfinite(weights))
  negative = np.count_nonzero(weights < 0)
  raise ValueError(f'sample_weight must be finite and >= 0, got {negative} '
                   f'negative and {non_finite} non-finite (NaN or inf) weights')


def auc(scores: Any, labels: Any, sample_weight: Any = None) -> float:
  """Area under the ROC curve, with scikit-learn's handling of tied scores.

  Equal in value to sklearn.metrics.roc_auc_score(labels, scores,
  sample_weight=sample_weight) for binary labels, up to float rounding.

  Args:
    scores: numpy or jax array of any shape, higher meaning more likely
      positive: probabilities or logits, any real dtype. Ties are taken in the
      given dtype, as scikit-learn takes them: equal float32 scores tie even
      where the values they were rounded from differ.
    labels: array with as many elements as scores, of 0/1 numbers or bools.
    sample_weight: optional array of non-negative finite weights, one per
      sample.

  Returns:
    The AUC as a Python float in [0, 1].

  Raises:
    ValueError: if the inputs are empty or differ in size, if a label is not
      0 or 1, if only one class is present (or one class has zero total
      weight), if a score is NaN or infinite, or if a weight is negative or
      not finite.
  """
  scores = _scores_array(scores)
  labels = _as_1d(labels, 'labels')
  n = scores.size
  if labels.size != n:
    raise ValueError(f'scores and labels must have the same number of '
                     f'elements, got {n} scores and {labels.size} labels')
  weights = None
  if sample_weight is not None:
    weights = _as_1d(sample_weight, 'sample_weight')
    if weights.size != n:
      raise ValueError(f'sample_weight must have one weight per score, got '
                       f'{weights.size} weights for {n} scores')
    _check_weights(weights)

  positive = _positive_mask(labels)
  num_positive = int(np.count_nonzero(positive))
  if num_positive in (0, n):
    raise ValueError(f'AUC is undefined when all labels are '
                     f'{int(num_positive == n)}: got {n} samples of one class')

  # Any sort kind will do: the samples of one tie are summed as a group, so
  # their order among themselves does not matter.
  order = np.argsort(scores)
  sorted_scores = scores[order]
  # NaN sorts last and -inf/+inf to the ends, so checking the ends covers all.
  if not (np.isfinite(sorted_scores[0]) and np.isfinite(sorted_scores[-1])):
    non_finite = n - np.count_nonzero(np.isfinite(scores))
    raise ValueError(f'scores must be finite, got {non_finite} NaN or '
                     f'infinite scores out of {n}')
  sorted_positive = positive[order]
  sorted_weights = None if weights is None else weights[order]
  del order

  # The first index of every group of equal scores: where np.diff is not 0,
  # found without the float temporary.
  is_start = np.empty(n, np.bool_)
  is_start[0] = True
  np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=is_start[1:])
  del sorted_scores
  starts = np.flatnonzero(is_start)
  del is_start

  if sorted_weights is None:
    tp = np.add.reduceat(sorted_positive, starts, dtype=np.int64)
    del sorted_positive
    fp = np.empty_like(starts)  # The group sizes, then less the positives.
    np.subtract(starts[1:], starts[:-1], out=fp[:-1])
    fp[-1] = n - starts[-1]
    del starts
    fp -= tp
    # 2 * (negatives strictly below each group) + the group's negatives.
    below = np.cumsum(fp)
    below -= fp
    below *= 2
    below += fp
    del fp
    # At most 2 * num_positive * num_negative <= n^2 / 2: exact in int64.
    twice_area = int(np.dot(tp, below))
    return twice_area / (2 * num_positive * (n - num_positive))

  weights = sorted_weights.astype(np.float64, copy=False)
  del sorted_weights
  positive_weights = np.where(sorted_positive, weights, 0.0)
  del sorted_positive
  tp = np.add.reduceat(positive_weights, starts)
  # The weight of the negatives, exactly: w - w or w - 0.
  negative_weights = np.subtract(weights, positive_weights,
                                 out=positive_weights)
  del weights
  fp = np.add.reduceat(negative_weights, starts)
  del negative_weights, starts
  total_positive = float(np.sum(tp))
  # The negatives' weight strictly below each group, then plus half the
  # group's own.
  below = np.empty_like(fp)
  below[0] = 0.0
  np.cumsum(fp[:-1], out=below[1:])
  total_negative = float(below[-1] + fp[-1])
  if total_positive == 0 or total_negative == 0:
    which = 'positive' if total_positive == 0 else 'negative'
    raise ValueError(f'AUC is undefined when the {which} samples have zero '
                     f'total weight')
  fp *= 0.5
  below += fp
  del fp
  # Numerator and denominator summed alike (elementwise products, then
  # numpy's pairwise sum), so that a perfect ranking, where every positive
  # group sees the whole negative weight below it, gives exactly 1.
  area = float(np.sum(np.multiply(tp, below, out=below)))
  return area / float(np.sum(np.multiply(tp, total_negative, out=tp)))
