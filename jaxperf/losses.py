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

RetinaNet (OpenImages): `retinanet_losses` is torchvision's RetinaNet loss
(the MLPerf reference's), with each image's ground truth padded to a fixed
number of boxes and marked by a validity mask, so that shapes are static:
anchors are matched to ground truths by IoU (Matcher(0.5, 0.4) with
low-quality matches), the classification loss is the sigmoid focal loss
summed over all but the ignored anchors and the box loss the L1 distance to
the encoded matched boxes summed over the foreground anchors, both divided by
the image's number of foreground anchors (at least 1) and averaged over the
batch.

RNN-T (LibriSpeech): `rnnt_loss` is the transducer loss as
torchaudio.functional.rnnt_loss computes it (the reference trains with
Apex's equivalent kernel), a forward (alpha) recursion over the T x (U + 1)
lattice in log space, one anti-diagonal per step of a lax.scan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxperf.models import layers
from jaxperf.models.layers.anchors import BETWEEN_THRESHOLDS


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


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array,
                       alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
  """Elementwise sigmoid focal loss, as torchvision.ops.sigmoid_focal_loss.

  With p = sigmoid(x) and ce the binary cross-entropy of the logits x:

      p_t  = p * t + (1 - p) * (1 - t)
      loss = alpha_t * ce * (1 - p_t) ** gamma,
      alpha_t = alpha * t + (1 - alpha) * (1 - t)

  and no alpha weighting when alpha is negative (torchvision's -1).

  Args:
    logits: float array of any shape; half precision is computed in float32.
    targets: same shape, 1 for positives and 0 for negatives (soft targets
      are allowed).
    alpha: weight of the positives, in [0, 1], or -1 for none.
    gamma: focusing exponent.

  Returns:
    The unreduced loss, logits' shape, float32 (float64 for float64 logits).
  """
  if not 0 <= alpha <= 1 and alpha != -1:
    raise ValueError(f'alpha must be in [0, 1] or -1, got {alpha}')
  dt = _compute_dtype(logits)
  x = logits.astype(dt)
  t = jnp.asarray(targets).astype(dt)
  p = jax.nn.sigmoid(x)
  # binary_cross_entropy_with_logits: (1 - t) x - log(sigmoid(x)).
  ce = (1 - t) * x - jax.nn.log_sigmoid(x)
  p_t = p * t + (1 - p) * (1 - t)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
  return loss


def _box_regression_loss(pred: jax.Array, target: jax.Array, kind: str,
                         beta: float) -> jax.Array:
  """Unreduced L1 or smooth L1 (torch's F.smooth_l1_loss) of pred - target."""
  diff = jnp.abs(pred - target)
  if kind == 'l1' or beta == 0:
    return diff
  return jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def _retinanet_image_losses(cls_logits, bbox_regression, anchors, gt_boxes,
                            gt_labels, gt_valid, bbox_reg_loss, beta, alpha,
                            gamma, fg_iou_thresh, bg_iou_thresh):
  """One image's (classification, box regression) losses, each / max(1, fg)."""
  dt = _compute_dtype(cls_logits)
  anchors = anchors.astype(dt)
  gt_boxes = gt_boxes.astype(dt)
  num_classes = cls_logits.shape[-1]
  iou = layers.box_iou(gt_boxes, anchors)                     # [G, A]
  matches = layers.match_anchors(iou, gt_valid, high=fg_iou_thresh,
                                 low=bg_iou_thresh,
                                 allow_low_quality_matches=True)
  foreground = matches >= 0
  counted = matches != BETWEEN_THRESHOLDS
  num_foreground = jnp.sum(foreground)
  normalizer = jnp.maximum(num_foreground, 1).astype(dt)
  gt_index = jnp.maximum(matches, 0)

  # Classification: one-hot targets on the foreground, all-zero targets on
  # the background, nothing from anchors between the thresholds.
  anchor_labels = jnp.where(foreground, gt_labels.astype(jnp.int32)[gt_index],
                            -1)
  targets = (anchor_labels[:, None] ==
             jnp.arange(num_classes, dtype=anchor_labels.dtype)[None, :])
  focal = sigmoid_focal_loss(cls_logits, targets, alpha=alpha, gamma=gamma)
  cls_loss = jnp.sum(jnp.where(counted[:, None], focal, 0)) / normalizer

  # Box regression on the foreground. Other anchors are given themselves as
  # the matched box, whose code is exactly 0, so no inf or nan can reach the
  # gradient through the masked-out branch.
  matched_boxes = jnp.where(foreground[:, None], gt_boxes[gt_index], anchors)
  target_codes = layers.encode_boxes(matched_boxes, anchors)
  box = _box_regression_loss(bbox_regression.astype(dt), target_codes,
                             bbox_reg_loss, beta)
  box_loss = jnp.sum(jnp.where(foreground[:, None], box, 0)) / normalizer
  return cls_loss, box_loss


def retinanet_losses(cls_logits: jax.Array, bbox_regression: jax.Array,
                     anchors: jax.Array, gt_boxes: jax.Array,
                     gt_labels: jax.Array, gt_valid: jax.Array, *,
                     bbox_reg_loss: str = 'l1', beta: float = 1.0,
                     alpha: float = 0.25, gamma: float = 2.0,
                     fg_iou_thresh: float = 0.5,
                     bg_iou_thresh: float = 0.4) -> dict[str, jax.Array]:
  """The RetinaNet training losses, as torchvision's RetinaNet computes them.

  For each image the IoU of every ground truth with every anchor is matched
  as torchvision's Matcher(fg_iou_thresh, bg_iou_thresh,
  allow_low_quality_matches=True) does (`jaxperf.models.layers.match_anchors`);
  padding ground truths (gt_valid False) never match, and an image without
  any valid ground truth has all its anchors in the background. Then

  * classification: the sigmoid focal loss of the logits against one-hot
    targets of the matched labels on foreground anchors and all-zero targets
    on background anchors, summed over both (anchors between the thresholds
    are ignored);
  * bbox_regression: the L1 (or smooth L1) distance between the predicted
    codes and the matched boxes encoded against their anchors (BoxCoder with
    unit weights), summed over the foreground anchors;

  each divided by max(1, number of foreground anchors) of the image, then
  averaged over the batch. `loss` is their sum, what the reference trains on.

  Memory: the IoU is [B, G, A] and the focal loss one [B, A, C] tensor; the
  function is jittable and every shape is static.

  Args:
    cls_logits: [B, A, C] class logits of the head.
    bbox_regression: [B, A, 4] predicted box codes (dx, dy, dw, dh).
    anchors: [A, 4] anchors (x1, y1, x2, y2), shared by the batch.
    gt_boxes: [B, G, 4] ground-truth boxes (x1, y1, x2, y2), padded to G.
    gt_labels: [B, G] integer class ids in [0, C).
    gt_valid: [B, G] bool, False for padding.
    bbox_reg_loss: 'l1' (torchvision RetinaNet's) or 'smooth_l1'.
    beta: the smooth L1 threshold (torchvision's default 1.0).
    alpha: focal loss weight of the positives.
    gamma: focal loss exponent.
    fg_iou_thresh: IoU from which an anchor is foreground.
    bg_iou_thresh: IoU below which an anchor is background.

  Returns:
    dict with float32 (float64 for float64 logits) scalars 'classification',
    'bbox_regression' and 'loss'.
  """
  if bbox_reg_loss not in ('l1', 'smooth_l1'):
    raise ValueError(f"bbox_reg_loss must be 'l1' or 'smooth_l1', got "
                     f'{bbox_reg_loss!r}')
  if cls_logits.ndim != 3 or bbox_regression.shape != cls_logits.shape[:2] + (
      4,):
    raise ValueError('expected cls_logits [B, A, C] and bbox_regression '
                     f'[B, A, 4], got {cls_logits.shape} and '
                     f'{bbox_regression.shape}')
  anchors = jnp.asarray(anchors)
  if anchors.shape != (cls_logits.shape[1], 4):
    raise ValueError(f'anchors must be [{cls_logits.shape[1]}, 4], got '
                     f'{anchors.shape}')
  per_image = jax.vmap(
      lambda c, r, b, l, v: _retinanet_image_losses(
          c, r, anchors, b, l, v, bbox_reg_loss, beta, alpha, gamma,
          fg_iou_thresh, bg_iou_thresh))
  cls_loss, box_loss = per_image(cls_logits, bbox_regression,
                                 jnp.asarray(gt_boxes), jnp.asarray(gt_labels),
                                 jnp.asarray(gt_valid, bool))
  classification = jnp.mean(cls_loss)
  regression = jnp.mean(box_loss)
  return {'classification': classification, 'bbox_regression': regression,
          'loss': classification + regression}


# ---------------------------------------------------------------------------
# Mask R-CNN (COCO): the losses of the RPN, the box head and the mask head,
# as the MLPerf reference (maskrcnn-benchmark) computes them, on the static
# targets and samples of jaxperf.models.layers.two_stage (`rpn_targets`,
# `sample_rois`, `mask_targets`). Each is normalised over the whole batch
# given, as the reference normalises over one GPU's batch.


def _bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of logits (F.binary_cross_entropy_
  with_logits): (1 - t) x - log(sigmoid(x))."""
  return (1 - targets) * logits - jax.nn.log_sigmoid(logits)


def rpn_losses(objectness: jax.Array, rpn_deltas: jax.Array,
               regression_targets: jax.Array, sampled_positive: jax.Array,
               sampled_negative: jax.Array, *,
               beta: float = 1.0 / 9) -> dict[str, jax.Array]:
  """The RPN losses (RPNLossComputation; torchvision's compute_loss).

  * objectness: the binary cross-entropy of the objectness logits against
    1 for the sampled positive and 0 for the sampled negative anchors,
    averaged over the sampled anchors of the batch;
  * rpn_box_reg: the smooth L1 (beta 1/9) of the box deltas against the
    regression targets, summed over the sampled positives and divided by
    the number of sampled anchors of the batch (positives and negatives).

  Args:
    objectness: [B, A] logits.
    rpn_deltas: [B, A, 4] predicted deltas.
    regression_targets: [B, A, 4] (`rpn_targets`).
    sampled_positive: [B, A] bool (`rpn_targets`).
    sampled_negative: [B, A] bool.
    beta: the smooth L1 threshold.

  Returns:
    dict of float32 scalars 'objectness' and 'rpn_box_reg'.
  """
  dt = _compute_dtype(objectness)
  positive = jnp.asarray(sampled_positive, bool)
  sampled = positive | jnp.asarray(sampled_negative, bool)
  count = jnp.maximum(jnp.sum(sampled), 1).astype(dt)
  bce = _bce_with_logits(objectness.astype(dt), positive.astype(dt))
  box = _box_regression_loss(rpn_deltas.astype(dt),
                             jnp.asarray(regression_targets).astype(dt),
                             'smooth_l1', beta)
  return {
      'objectness': jnp.sum(jnp.where(sampled, bce, 0)) / count,
      'rpn_box_reg': jnp.sum(jnp.where(positive[..., None], box, 0)) / count,
  }


def fastrcnn_losses(class_logits: jax.Array, box_regression: jax.Array,
                    labels: jax.Array, regression_targets: jax.Array,
                    valid: jax.Array, *,
                    beta: float = 1.0) -> dict[str, jax.Array]:
  """The box head's losses (FastRCNNLossComputation; torchvision's
  fastrcnn_loss).

  * classifier: softmax cross-entropy of the class logits against the ROI
    labels (0 = background), averaged over the sampled ROIs of the batch;
  * box_reg: the smooth L1 of the deltas of each positive ROI's own class
    against its regression targets, summed over the positives and divided
    by the number of sampled ROIs of the batch.

  The reference's smooth L1 has beta 1; torchvision's fastrcnn_loss 1/9.

  Args:
    class_logits: [..., C] for the sampled ROIs (any leading shape, e.g.
      [B, S] or [B * S]).
    box_regression: [..., C * 4].
    labels: [...] integer classes (`sample_rois`).
    regression_targets: [..., 4].
    valid: [...] bool, False for padding slots.
    beta: the smooth L1 threshold.

  Returns:
    dict of float32 scalars 'classifier' and 'box_reg'.
  """
  dt = _compute_dtype(class_logits)
  num_classes = class_logits.shape[-1]
  logits = class_logits.reshape(-1, num_classes).astype(dt)
  labels = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
  valid = jnp.asarray(valid, bool).reshape(-1)
  count = jnp.maximum(jnp.sum(valid), 1).astype(dt)
  logp = jax.nn.log_softmax(logits, axis=-1)
  index = jnp.clip(labels, 0, num_classes - 1)
  ce = -jnp.take_along_axis(logp, index[:, None], axis=-1)[:, 0]
  deltas = box_regression.reshape(-1, num_classes, 4).astype(dt)
  deltas = jnp.take_along_axis(deltas, index[:, None, None], axis=1)[:, 0]
  box = _box_regression_loss(
      deltas, jnp.asarray(regression_targets).reshape(-1, 4).astype(dt),
      'smooth_l1', beta)
  positive = valid & (labels > 0)
  return {
      'classifier': jnp.sum(jnp.where(valid, ce, 0)) / count,
      'box_reg': jnp.sum(jnp.where(positive[:, None], box, 0)) / count,
  }


def maskrcnn_mask_loss(mask_logits: jax.Array, labels: jax.Array,
                       targets: jax.Array, valid: jax.Array) -> jax.Array:
  """The mask head's loss (MaskRCNNLossComputation; torchvision's
  maskrcnn_loss).

  The binary cross-entropy of each positive ROI's mask logits for its own
  class against its target, averaged over all pixels of all positive ROIs
  of the batch; 0 when there are none.

  Args:
    mask_logits: [..., M, M, C] (MaskRCNN.mask_head, NHWC).
    labels: [...] the ROIs' classes.
    targets: [..., M, M] (`mask_targets`).
    valid: [...] bool: the positive ROIs (e.g. labels > 0 & valid).

  Returns:
    float32 scalar.
  """
  dt = _compute_dtype(mask_logits)
  labels = jnp.asarray(labels).astype(jnp.int32)
  valid = jnp.asarray(valid, bool)
  index = jnp.broadcast_to(
      jnp.clip(labels, 0, mask_logits.shape[-1] - 1)[..., None, None, None],
      mask_logits.shape[:-1] + (1,))
  logits = jnp.take_along_axis(mask_logits, index, axis=-1)[..., 0].astype(dt)
  bce = _bce_with_logits(logits, jnp.asarray(targets).astype(dt))
  pixels = logits.shape[-2] * logits.shape[-1]
  count = jnp.maximum(jnp.sum(valid) * pixels, 1).astype(dt)
  return jnp.sum(jnp.where(valid[..., None, None], bce, 0)) / count


# ---------------------------------------------------------------------------
# The transducer (RNN-T) loss.

# Log-probability of what cannot happen. Finite, so that the gradients of
# logaddexp at two impossible terms stay finite (and zero).
_LOG_ZERO = -1e30


def _skew(x: jax.Array, steps: int) -> jax.Array:
  """[B, T, U1] -> [B, steps, U1], row n holding x[:, n - u, u] at u
  (_LOG_ZERO where n - u is outside [0, T))."""
  t_len = x.shape[1]
  n = jnp.arange(steps)[:, None]
  u = jnp.arange(x.shape[2])[None, :]
  t = n - u
  inside = (t >= 0) & (t < t_len)
  gathered = jnp.take_along_axis(
      x, jnp.broadcast_to(jnp.clip(t, 0, t_len - 1)[None], (x.shape[0],) +
                          t.shape), axis=1)
  return jnp.where(inside[None], gathered, _LOG_ZERO)


def rnnt_loss(logits: jax.Array, labels: jax.Array, logit_lengths: jax.Array,
              label_lengths: jax.Array, blank: int = 0,
              reduction: str = 'none', clamp: float | None = None
              ) -> jax.Array:
  """The RNN-T loss: each utterance's negative log-likelihood of its
  labels under the transducer, as torchaudio.functional.rnnt_loss.

  With lp = log_softmax(logits) over the vocabulary, the forward variables
  of utterance b over t < T_b, u <= U_b are

      alpha[0, 0] = 0
      alpha[t, u] = logaddexp(alpha[t - 1, u] + lp[t - 1, u, blank],
                              alpha[t, u - 1] + lp[t, u - 1, labels[u - 1]])

  and its loss is -(alpha[T_b - 1, U_b] + lp[T_b - 1, U_b, blank]), with
  T_b = logit_lengths[b] and U_b = label_lengths[b]; frames and labels
  beyond those lengths are padding and do not count. The recursion runs
  over the lattice's anti-diagonals (t + u constant), each one vectorised
  over the batch and u, in float32 or wider. The gradient is each move's
  posterior probability from the forward and backward (beta) variables,
  as torchaudio computes it, rather than autodiff through the scan, whose
  rounding accumulates along the lattice. Apart from `logits` (and its gradient) no
  [B, T, U + 1, V] array is made: the log-softmax enters through its
  normaliser logsumexp(logits) and the two gathered log-probabilities.

  Args:
    logits: [B, T, U + 1, V] joint network outputs (unnormalised).
    labels: [B, U] int label ids (not `blank`), padded.
    logit_lengths: [B] int frames per utterance, 1 <= T_b <= T.
    label_lengths: [B] int labels per utterance, 0 <= U_b <= U.
    blank: the blank id.
    reduction: 'none' ([B] losses), 'mean' or 'sum' over the batch.
    clamp: if given, the gradient reaching the logits is clamped to
      [-clamp, clamp] (torchaudio's `clamp`); None or <= 0: not clamped.

  Returns:
    float32 (or float64) losses [B], or their mean or sum.
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 4:
    raise ValueError(f'logits must be [B, T, U + 1, V], got {logits.shape}')
  batch, t_len, u1, vocab = logits.shape
  labels = jnp.asarray(labels).astype(jnp.int32)
  if labels.shape != (batch, u1 - 1):
    raise ValueError(f'labels must be {(batch, u1 - 1)} for logits '
                     f'{logits.shape}, got {labels.shape}')
  logit_lengths = jnp.asarray(logit_lengths).astype(jnp.int32)
  label_lengths = jnp.asarray(label_lengths).astype(jnp.int32)
  if logit_lengths.shape != (batch,) or label_lengths.shape != (batch,):
    raise ValueError(f'logit_lengths and label_lengths must be [{batch}], '
                     f'got {logit_lengths.shape} and {label_lengths.shape}')
  if not 0 <= blank < vocab:
    raise ValueError(f'blank={blank} is not a vocabulary id (V={vocab})')
  if reduction not in ('none', 'mean', 'sum'):
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got "
                     f'{reduction!r}')
  x = logits
  if clamp is not None and clamp > 0:
    x = _clamp_gradient(x, float(clamp))
  # In float32 (or wider) from here; the logits themselves are not copied.
  blank_lp, label_lp = _lattice_log_probs(x, labels, blank)
  final = _log_likelihood(blank_lp, label_lp, logit_lengths, label_lengths)
  loss = -final
  if reduction == 'mean':
    return jnp.mean(loss)
  if reduction == 'sum':
    return jnp.sum(loss)
  return loss


def _diagonals(blank_lp: jax.Array, label_lp: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """The lattice's log-probabilities by anti-diagonal, [B, T + U + 1, U1]
  each: row n holds node (n - u, u) at u. Moves out of (t, u) go to
  diagonal n + 1: a blank to (t + 1, u), a label to (t, u + 1)."""
  t_len, u1 = blank_lp.shape[1:]
  steps = t_len + u1
  label_lp = jnp.pad(label_lp, ((0, 0), (0, 0), (0, 1)),
                     constant_values=_LOG_ZERO)
  return _skew(blank_lp, steps), _skew(label_lp, steps)


def _alphas(blank_diag: jax.Array, label_diag: jax.Array) -> jax.Array:
  """Forward variables by diagonal, [T + U + 1, B, U1]: alpha[t, u] =
  logaddexp(alpha[t - 1, u] + blank[t - 1, u], alpha[t, u - 1] +
  label[t, u - 1]), alpha[0, 0] = 0."""
  batch, steps, u1 = blank_diag.shape

  def step(alpha, n):
    from_blank = alpha + blank_diag[:, n - 1]
    from_label = jnp.pad(alpha[:, :-1] + label_diag[:, n - 1, :-1],
                         ((0, 0), (1, 0)), constant_values=_LOG_ZERO)
    new = jnp.logaddexp(from_blank, from_label)
    return new, new

  alpha0 = jnp.full((batch, u1), _LOG_ZERO, blank_diag.dtype).at[:, 0].set(0)
  _, alphas = jax.lax.scan(step, alpha0, jnp.arange(1, steps))
  return jnp.concatenate([alpha0[None], alphas], axis=0)


def _node_masks(steps: int, u1: int, t_lens: jax.Array, u_lens: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """(valid, terminal) bool [N, B, U1] by diagonal: node (t, u) is in
  utterance b's lattice (t < T_b, u <= U_b), or is its end (T_b, U_b),
  reached by the last blank."""
  n = jnp.arange(steps)[:, None, None]
  u = jnp.arange(u1)[None, None, :]
  t = n - u
  valid = (t >= 0) & (t < t_lens[None, :, None]) & (u <= u_lens[None, :, None])
  terminal = (t == t_lens[None, :, None]) & (u == u_lens[None, :, None])
  return valid, terminal


def _betas(blank_diag, label_diag, valid, terminal) -> jax.Array:
  """Backward variables by diagonal, [N, B, U1]: beta[t, u] = log p(the
  rest of the labels and frames | at (t, u)), 0 at the end node and
  log 0 outside the utterance's lattice."""
  steps = blank_diag.shape[1]
  dt = blank_diag.dtype
  last = jnp.where(terminal[-1], 0.0, _LOG_ZERO).astype(dt)

  def step(beta_next, n):
    via_blank = blank_diag[:, n] + beta_next
    via_label = label_diag[:, n] + jnp.pad(
        beta_next[:, 1:], ((0, 0), (0, 1)), constant_values=_LOG_ZERO)
    beta = jnp.logaddexp(via_blank, via_label)
    beta = jnp.where(terminal[n], 0.0, jnp.where(valid[n], beta, _LOG_ZERO))
    return beta, beta

  _, betas = jax.lax.scan(step, last, jnp.arange(steps - 2, -1, -1))
  return jnp.concatenate([betas[::-1], last[None]], axis=0)


def _unskew(diag: jax.Array, t_len: int) -> jax.Array:
  """[N, B, U1] by diagonal -> [B, T, U1] by (t, u)."""
  u1 = diag.shape[2]
  n = jnp.arange(t_len)[:, None] + jnp.arange(u1)[None, :]     # [T, U1]
  by_node = jnp.take_along_axis(
      jnp.moveaxis(diag, 1, 0),
      jnp.broadcast_to(n[None], (diag.shape[1], t_len, u1)), axis=1)
  return by_node


@jax.custom_vjp
def _log_likelihood(blank_lp, label_lp, t_lens, u_lens):
  """log p(labels | frames) of each utterance, [B], from the lattice's
  log-probabilities (blank_lp [B, T, U1], label_lp [B, T, U])."""
  alphas = _alphas(*_diagonals(blank_lp, label_lp))
  return _final(alphas, blank_lp, t_lens, u_lens)


def _final(alphas, blank_lp, t_lens, u_lens):
  b = jnp.arange(blank_lp.shape[0])
  last_t = t_lens - 1
  return alphas[last_t + u_lens, b, u_lens] + blank_lp[b, last_t, u_lens]


def _log_likelihood_fwd(blank_lp, label_lp, t_lens, u_lens):
  blank_diag, label_diag = _diagonals(blank_lp, label_lp)
  alphas = _alphas(blank_diag, label_diag)
  return (_final(alphas, blank_lp, t_lens, u_lens),
          (blank_diag, label_diag, alphas, blank_lp.shape[1], t_lens, u_lens))


def _log_likelihood_bwd(res, g):
  # The gradient of log p with respect to a move's log-probability is the
  # posterior probability of the move: exp(alpha(from) + lp(move) +
  # beta(to) - log p), from both recursions (more accurate in float32
  # than differentiating through the forward one alone).
  blank_diag, label_diag, alphas, t_len, t_lens, u_lens = res
  steps, batch, u1 = alphas.shape
  valid, terminal = _node_masks(steps, u1, t_lens, u_lens)
  betas = _betas(blank_diag, label_diag, valid, terminal)
  total = _final_from(alphas, blank_diag, t_lens, u_lens)       # [B]
  beta_next = jnp.concatenate(
      [betas[1:], jnp.full((1, batch, u1), _LOG_ZERO, betas.dtype)], axis=0)
  beta_right = jnp.pad(beta_next[:, :, 1:], ((0, 0), (0, 0), (0, 1)),
                       constant_values=_LOG_ZERO)
  base = alphas - total[None, :, None]
  weight = g[None, :, None]
  d_blank = jnp.where(valid, jnp.exp(
      base + jnp.moveaxis(blank_diag, 1, 0) + beta_next), 0) * weight
  d_label = jnp.where(valid, jnp.exp(
      base + jnp.moveaxis(label_diag, 1, 0) + beta_right), 0) * weight
  zero_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)
  return (_unskew(d_blank, t_len), _unskew(d_label, t_len)[:, :, :-1],
          zero_int(t_lens), zero_int(u_lens))


def _final_from(alphas, blank_diag, t_lens, u_lens):
  """_final with the blank log-probability read from its diagonal."""
  b = jnp.arange(alphas.shape[1])
  n = t_lens - 1 + u_lens
  return alphas[n, b, u_lens] + blank_diag[b, n, u_lens]


_log_likelihood.defvjp(_log_likelihood_fwd, _log_likelihood_bwd)


def _targets(labels: jax.Array, u1: int) -> jax.Array:
  """[B, U] labels -> [B, 1, U + 1, 1] with -1 (no label) at u = U."""
  padded = jnp.pad(labels, ((0, 0), (0, 1)), constant_values=-1)
  return padded[:, None, :, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _lattice_log_probs(x: jax.Array, labels: jax.Array, blank: int
                       ) -> tuple[jax.Array, jax.Array]:
  """(log p(blank) [B, T, U1], log p(labels[u]) [B, T, U]) at every lattice
  node, from logits x [B, T, U1, V], without a log-softmax array; float32
  or wider."""
  dt = jnp.promote_types(x.dtype, jnp.float32)
  norm = _log_normalizer(x)
  index = jnp.maximum(_targets(labels, x.shape[2]), 0)
  picked = jnp.take_along_axis(x, jnp.broadcast_to(
      index, x.shape[:3] + (1,)), axis=-1)[..., 0].astype(dt)
  return x[..., blank].astype(dt) - norm, (picked - norm)[:, :, :-1]


def _log_normalizer(x: jax.Array) -> jax.Array:
  """logsumexp over the last axis, accumulated in float32 or wider. The
  max is taken in x's own dtype (exact), so that each of the two
  reductions reads x once, without a converted copy of it."""
  dt = jnp.promote_types(x.dtype, jnp.float32)
  top = jax.lax.stop_gradient(jnp.max(x, axis=-1)).astype(dt)
  top = jnp.where(jnp.isfinite(top), top, 0)
  total = jnp.sum(jnp.exp(x.astype(dt) - top[..., None]), axis=-1)
  return top + jnp.log(total)


def _lattice_fwd(x, labels, blank):
  out = _lattice_log_probs(x, labels, blank)
  return out, (x, labels, _log_normalizer(x))


def _lattice_bwd(blank, res, g):
  # d/dx of x[v] - logsumexp(x) is onehot(v) - softmax(x): one elementwise
  # expression over the vocabulary (no scatter), so XLA writes the
  # gradient in one pass without another [B, T, U1, V] array.
  x, labels, norm = res
  g_blank, g_label = g
  g_label = jnp.pad(g_label, ((0, 0), (0, 0), (0, 1)))
  vocab = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, x.shape[-1]), 3)
  target = _targets(labels, x.shape[2])
  grad = (jnp.where(vocab == blank, g_blank[..., None], 0)
          + jnp.where(vocab == target, g_label[..., None], 0)
          - jnp.exp(x.astype(norm.dtype) - norm[..., None])
          * (g_blank + g_label)[..., None])
  return grad.astype(x.dtype), None


_lattice_log_probs.defvjp(_lattice_fwd, _lattice_bwd)


@jax.custom_vjp
def _clamp_gradient_impl(x, clamp):
  return x


def _clamp_fwd(x, clamp):
  return x, clamp


def _clamp_bwd(clamp, g):
  return jnp.clip(g, -clamp, clamp), None


_clamp_gradient_impl.defvjp(_clamp_fwd, _clamp_bwd)


def _clamp_gradient(x: jax.Array, clamp: float) -> jax.Array:
  """x, with its gradient clamped to [-clamp, clamp]."""
  return _clamp_gradient_impl(x, jnp.asarray(clamp, x.dtype))


# ------------------------------------------------------------------ MiniGo


def minigo_l2_penalty(params) -> jax.Array:
  """sum(w^2) / 2 over the reference's regularised tensors.

  Every trainable tensor but biases and BN offsets (TF: names without 'bias'
  or 'beta'): conv and dense kernels and BN scales.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total = jnp.zeros((), jnp.float32)
  for path, leaf in flat:
    if path[-1].key != 'bias':
      total = total + 0.5 * jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return total


def minigo_losses(params, logits, value, pi, z, *,
         l2_strength: float = 1e-4,
         value_cost_weight: float = 0.5) -> dict[str, jax.Array]:
  """MiniGo's cost (dual_net.py model_fn) and its parts: policy cross-
  entropy + value_cost_weight (0.5 in MLPerf) x value MSE + l2_strength
  (1e-4) x minigo_l2_penalty.

  Args:
    params: the model's 'params' collection (for the L2 term).
    logits: [B, N*N + 1] policy logits.
    value: [B] value output (after tanh).
    pi: [B, N*N + 1] target policy (search visit distribution).
    z: [B] the game's result from black's point of view, +-1 (the
      reference's 'outcome', the same for every position of a game; the
      value, like the search's, is black's).
    l2_strength: the L2 coefficient.
    value_cost_weight: weight of the value MSE.

  Returns:
    {'policy_cost', 'value_cost', 'l2_cost', 'combined_cost'}.
  """
  logits = logits.astype(jnp.float32)
  policy_cost = jnp.mean(-jnp.sum(
      jax.lax.stop_gradient(pi) * jax.nn.log_softmax(logits), axis=-1))
  value_cost = value_cost_weight * jnp.mean(
      jnp.square(value.astype(jnp.float32) - z))
  l2_cost = l2_strength * minigo_l2_penalty(params)
  return {'policy_cost': policy_cost, 'value_cost': value_cost,
          'l2_cost': l2_cost,
          'combined_cost': policy_cost + value_cost + l2_cost}
