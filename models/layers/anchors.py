"""RetinaNet anchors, the box coder and the anchor-to-ground-truth matcher.

These follow torchvision's detection utilities as its RetinaNet configures
them (AnchorGenerator, BoxCoder with unit weights, Matcher(0.5, 0.4) with
low-quality matches), which is also what the MLPerf RetinaNet reference uses.

* `retinanet_anchors` builds the anchors of one (padded) image size once, on
  the host, in numpy: the same float32 values and the same order as
  torchvision's AnchorGenerator (levels P3..P7; within a level, locations row
  by row; within a location, aspect ratios outer and sizes inner).
* `encode_boxes` / `decode_boxes` are BoxCoder.encode_single / decode_single
  in jnp, for boxes in (x1, y1, x2, y2) in their last axis.
* `match_anchors` is Matcher.__call__ on a [G, A] IoU matrix whose padding
  rows (ground truths that are not there) are masked out; shapes are static,
  so it runs under jax.jit and jax.vmap over a batch of images.

As in torchvision, the anchor step of a level is the image size divided
(rounded down) by the level's feature-map size, not the nominal stride: for an
800x800 image P6 has 13x13 locations 61 pixels apart and P7 7x7 locations 114
pixels apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

RETINANET_STRIDES = (8, 16, 32, 64, 128)
# Three sizes an octave apart by thirds per level, truncated to integers.
RETINANET_ANCHOR_SIZES = tuple(
    (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3)))
    for x in (32, 64, 128, 256, 512))
RETINANET_ASPECT_RATIOS = (0.5, 1.0, 2.0)
# The largest log size ratio `decode_boxes` lets through.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def feature_sizes(image_size: Sequence[int],
                  strides: Sequence[int] = RETINANET_STRIDES
                  ) -> tuple[tuple[int, int], ...]:
  """The (height, width) of each pyramid level for an image of `image_size`.

  Every stride-2 layer of the ResNet(-Xt) stem and stages and of the extra
  P6/P7 convolutions (3x3 or 1x1 with "same" padding) maps a side of n to
  ceil(n / 2), so a level of stride s has ceil(n / s) locations along a side.
  """
  h, w = (int(v) for v in image_size)
  return tuple((-(-h // s), -(-w // s)) for s in strides)


def _per_level(aspect_ratios, levels: int) -> tuple[tuple[float, ...], ...]:
  if not isinstance(aspect_ratios[0], (list, tuple)):
    return (tuple(aspect_ratios),) * levels
  if len(aspect_ratios) != levels:
    raise ValueError(f'{len(aspect_ratios)} sets of aspect ratios for '
                     f'{levels} levels')
  return tuple(tuple(r) for r in aspect_ratios)


def cell_anchors(sizes: Sequence[float],
                 aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred anchors [len(aspect_ratios) * len(sizes), 4], float32.

  An aspect ratio is height / width; the anchor of ratio r and size s has
  width s / sqrt(r) and height s * sqrt(r). Corners are rounded to integers
  (half to even), in float32 arithmetic as torchvision does it.
  """
  scales = np.asarray(sizes, np.float32)
  h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
  return np.round(base).astype(np.float32)


def anchors_per_level(image_size: Sequence[int] = (800, 800),
                      strides: Sequence[int] = RETINANET_STRIDES,
                      sizes: Sequence[Sequence[float]] = RETINANET_ANCHOR_SIZES,
                      aspect_ratios=RETINANET_ASPECT_RATIOS
                      ) -> tuple[int, ...]:
  """How many of `retinanet_anchors`' rows belong to each level."""
  ratios = _per_level(aspect_ratios, len(strides))
  return tuple(h * w * len(s) * len(r) for (h, w), s, r in
               zip(feature_sizes(image_size, strides), sizes, ratios))


def retinanet_anchors(image_size: Sequence[int] = (800, 800),
                      strides: Sequence[int] = RETINANET_STRIDES,
                      sizes: Sequence[Sequence[float]] = RETINANET_ANCHOR_SIZES,
                      aspect_ratios=RETINANET_ASPECT_RATIOS) -> np.ndarray:
  """All anchors of an image, [A, 4] float32 (x1, y1, x2, y2).

  Args:
    image_size: (height, width) of the batched (padded) image tensor.
    strides: the nominal stride of each level; it sets the level's feature
      size (`feature_sizes`), while the anchor step is image size // feature
      size, as in torchvision.
    sizes: anchor sizes of each level.
    aspect_ratios: height / width ratios, one tuple for all levels or one per
      level.

  Returns:
    The anchors of all levels, concatenated in level order; within a level,
    locations row-major and at each location the cell anchors in
    `cell_anchors` order. An 800x800 image has 120,087 of them.
  """
  if len(sizes) != len(strides):
    raise ValueError(f'{len(sizes)} sets of sizes for {len(strides)} levels')
  ratios = _per_level(aspect_ratios, len(strides))
  height, width = (int(v) for v in image_size)
  levels = []
  for (gh, gw), level_sizes, level_ratios in zip(
      feature_sizes(image_size, strides), sizes, ratios):
    base = cell_anchors(level_sizes, level_ratios)
    step_y, step_x = height // gh, width // gw
    shift_y, shift_x = np.meshgrid(np.arange(gh) * step_y,
                                   np.arange(gw) * step_x, indexing='ij')
    shift_x = shift_x.reshape(-1).astype(np.float32)
    shift_y = shift_y.reshape(-1).astype(np.float32)
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
  return np.concatenate(levels, axis=0)


def _widths_and_centres(boxes: jax.Array):
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  return (widths, heights, boxes[..., 0] + 0.5 * widths,
          boxes[..., 1] + 0.5 * heights)


def encode_boxes(reference_boxes: jax.Array, proposals: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                 ) -> jax.Array:
  """Regression targets (dx, dy, dw, dh) of `reference_boxes` from `proposals`.

  `reference_boxes` are the ground truths and `proposals` the anchors (the
  argument order of torchvision's BoxCoder.encode_single); both are
  (x1, y1, x2, y2) in their last axis and broadcast against each other.
  Widths are x2 - x1 (no +1); dx = wx * (gt centre x - anchor centre x) /
  anchor width and dw = ww * log(gt width / anchor width), likewise for y / h.
  """
  reference_boxes = jnp.asarray(reference_boxes)
  proposals = jnp.asarray(proposals)
  wx, wy, ww, wh = (float(w) for w in weights)
  ex_w, ex_h, ex_x, ex_y = _widths_and_centres(proposals)
  gt_w, gt_h, gt_x, gt_y = _widths_and_centres(reference_boxes)
  return jnp.stack([wx * (gt_x - ex_x) / ex_w,
                    wy * (gt_y - ex_y) / ex_h,
                    ww * jnp.log(gt_w / ex_w),
                    wh * jnp.log(gt_h / ex_h)], axis=-1)


def decode_boxes(rel_codes: jax.Array, boxes: jax.Array,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = BBOX_XFORM_CLIP) -> jax.Array:
  """Boxes (x1, y1, x2, y2) from regression codes relative to `boxes`.

  The inverse of `encode_boxes` (torchvision's BoxCoder.decode_single): dw and
  dh are first clamped from above at `clamp` so that exp() cannot overflow.
  `boxes` are cast to the codes' dtype; the two broadcast against each other.
  """
  rel_codes = jnp.asarray(rel_codes)
  boxes = jnp.asarray(boxes).astype(rel_codes.dtype)
  wx, wy, ww, wh = (float(w) for w in weights)
  widths, heights, ctr_x, ctr_y = _widths_and_centres(boxes)
  dx = rel_codes[..., 0] / wx
  dy = rel_codes[..., 1] / wy
  dw = jnp.minimum(rel_codes[..., 2] / ww, clamp)
  dh = jnp.minimum(rel_codes[..., 3] / wh, clamp)
  pred_x = dx * widths + ctr_x
  pred_y = dy * heights + ctr_y
  half_w = 0.5 * (jnp.exp(dw) * widths)
  half_h = 0.5 * (jnp.exp(dh) * heights)
  return jnp.stack([pred_x - half_w, pred_y - half_h,
                    pred_x + half_w, pred_y + half_h], axis=-1)


def match_anchors(iou: jax.Array, gt_valid: jax.Array | None = None,
                  high: float = 0.5, low: float = 0.4,
                  allow_low_quality_matches: bool = True) -> jax.Array:
  """The ground truth each anchor is assigned to, [A] int32.

  Args:
    iou: [G, A] quality matrix (IoU of ground truth g with anchor a).
    gt_valid: [G] bool, False for padding rows, which never match; all valid
      when None.
    high: IoUs of at least this are matches.
    low: IoUs below this are background (BELOW_LOW_THRESHOLD, -1); those in
      [low, high) are ignored (BETWEEN_THRESHOLDS, -2).
    allow_low_quality_matches: also match, for every ground truth, each anchor
      whose IoU with it equals its highest IoU (ties included), even below
      `low`. Such an anchor takes its own best ground truth (the first one on
      ties), which is not necessarily the one it was best for.

  Returns:
    For each anchor the index of its ground truth, or -1 / -2. An image with
    no valid ground truth gets -1 everywhere.
  """
  iou = jnp.asarray(iou)
  if iou.ndim != 2:
    raise ValueError(f'iou must be [G, A], got shape {iou.shape}')
  if gt_valid is None:
    gt_valid = jnp.ones(iou.shape[:1], bool)
  gt_valid = jnp.asarray(gt_valid, bool)
  if not jnp.issubdtype(iou.dtype, jnp.floating):
    iou = iou.astype(jnp.float32)
  masked = jnp.where(gt_valid[:, None], iou, -jnp.inf)
  best_iou = jnp.max(masked, axis=0)
  best_gt = jnp.argmax(masked, axis=0).astype(jnp.int32)
  matches = jnp.where(best_iou < low, BELOW_LOW_THRESHOLD,
                      jnp.where(best_iou < high, BETWEEN_THRESHOLDS, best_gt))
  if allow_low_quality_matches:
    best_per_gt = jnp.max(masked, axis=1, keepdims=True)
    is_best = (masked == best_per_gt) & gt_valid[:, None]
    matches = jnp.where(jnp.any(is_best, axis=0), best_gt, matches)
  return matches.astype(jnp.int32)
