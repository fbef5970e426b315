"""The two-stage detection logic of Mask R-CNN, on static shapes.

Everything between the network's outputs (models/maskrcnn.py) and its
losses or detections: RPN anchors, RPN training targets and sampling, the
RPN's proposals, the sampling of ROIs for the box and mask heads with their
targets, and the evaluation post-processing. The losses themselves are in
jaxperf/losses.py (`rpn_losses`, `fastrcnn_losses`, `maskrcnn_mask_loss`).

The MLPerf reference is maskrcnn-benchmark (e2e_mask_rcnn_R_50_FPN_1x);
torchvision's detection models implement the same algorithm. Where the two
differ, the defaults here are the reference's and an argument gives
torchvision's behaviour:

* The "+1" pixel convention (`legacy_plus_one`). The reference measures a
  box (x1, y1, x2, y2) as x2 - x1 + 1 wide in its IoU, its box coder
  (decoded boxes end at centre + w / 2 - 1), its NMS, its small-box filter
  and its clipping to [0, width - 1] x [0, height - 1]; torchvision has no
  +1 and clips to [0, width] x [0, height]. NMS keeps torchvision's strict
  "IoU > threshold" (the reference's CUDA kernel; its CPU kernel suppresses
  at >=).
* Anchors (`rpn_anchors(style=...)`). The reference's generate_anchors
  starts from a stride x stride window, rounds its width and height for
  each aspect ratio to integers and scales them (so a size-32 anchor of
  ratio 0.5 at stride 4 is 48 x 24, centred on (stride - 1) / 2); its grid
  steps by the nominal stride. torchvision's AnchorGenerator rounds the
  corners of a zero-centred size / sqrt(r) x size * sqrt(r) box and steps
  by (padded image size) // (feature size).
* Anchors crossing the image border (`straddle_thresh`). The reference
  ignores (label -1) every anchor that is not inside its image
  (STRADDLE_THRESH 0: x1 >= 0, y1 >= 0, x2 < width, y2 < height, for each
  image's own size); they still take part in the matching. torchvision
  uses all anchors (`straddle_thresh=None`).
* Post-NMS top-n of the proposals in training (`rpn_proposals(per_image=
  ...)`). The reference keeps FPN_POST_NMS_TOP_N_TRAIN = 2000 proposals
  per *batch* in training (the best over all images of a GPU's batch; a
  TODO in its select_over_all_levels says it should be per image) and 1000
  per image at test; torchvision keeps its post_nms_top_n per image in
  both. Both are static here: each image has post_nms_top_n slots, of
  which the batch variant marks the image's share of the batch's best
  valid.
* Small proposals (`min_size`): the reference's MIN_SIZE is 0 (with +1
  widths: nothing is removed), torchvision's RPN uses 1e-3 and its box
  post-processing removes boxes under 1e-2 (`roi_detections(min_size=)`),
  which the reference does not.
* The box head's smooth L1 (`fastrcnn_losses(beta=)`): beta 1 in the
  reference, 1/9 in torchvision.
* Mask targets (`mask_targets`). The reference rasterises the gt polygons
  cropped to the proposal into binary 28 x 28 targets; torchvision
  RoIAligns the full-image binary mask over the proposal (aligned=False,
  adaptive sampling) into soft targets. Here a per-gt crop of the mask is
  sampled over the proposal with RoIAlign: `aligned=True, sampling_ratio=
  1, threshold=0.5` (the default) samples each target pixel's centre and
  binarises, as rasterising does; `aligned=False, sampling_ratio=-1,
  threshold=None` is torchvision's (exactly, when the crop holds the mask's
  own pixels).
* The detections per image: the reference keeps every detection scoring
  at least the 100th best (more than 100 on ties), torchvision exactly the
  100 best; here the 100 best.

Everything else is the same in both: RPN matching (0.7 / 0.3 with
low-quality matches), 256 anchors per image with half positives, BCE and
smooth L1 (beta 1/9) both divided by the batch's number of sampled
anchors; per-level top 2000 (train) / 1000 (test) by objectness, NMS 0.7
within each level; gt boxes appended to the proposals, matching 0.5 / 0.5
without low-quality matches, 512 ROIs per image with a quarter positives,
box coder weights (10, 10, 5, 5); cross-entropy and class-specific smooth
L1 divided by the number of sampled ROIs; mask BCE averaged over the
positive ROIs' pixels; softmax scores > 0.05, NMS 0.5 per class.

Shapes are static. Ground truths come padded to G per image with a `valid`
mask; proposals and samples are fixed-size slot arrays with `valid` masks;
the random samplers take a PRNG key (uniformly random subsets, as
torch.randperm draws them, but not the same ones). All functions run under
jax.jit, with their configuration static; pasting masks into images and
their RLE encoding for segm evaluation are host-side, in jaxperf.metrics.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .anchors import BBOX_XFORM_CLIP
from .anchors import BELOW_LOW_THRESHOLD
from .anchors import anchors_per_level
from .anchors import decode_boxes
from .anchors import encode_boxes
from .anchors import feature_sizes
from .anchors import match_anchors
from .anchors import retinanet_anchors
from .boxes import batched_nms
from .boxes import box_iou
from .roi_align import roi_align

RPN_STRIDES = (4, 8, 16, 32, 64)              # P2..P6
RPN_ANCHOR_SIZES = (32, 64, 128, 256, 512)    # one per level
RPN_ASPECT_RATIOS = (0.5, 1.0, 2.0)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)      # ROI_HEADS.BBOX_REG_WEIGHTS
MASK_RESOLUTION = 28                          # ROI_MASK_HEAD.RESOLUTION


def _check_count(value, name: str) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or
      value < 1):
    raise ValueError(f'{name} must be an int >= 1, got {value!r}')
  return int(value)


def _float(x) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype not in (jnp.float32, jnp.float64):
    x = x.astype(jnp.float32)
  return x


def _image_sizes(image_sizes, batch: int) -> jax.Array:
  """Image sizes as a float32 [B, 2] (height, width) array."""
  sizes = jnp.asarray(image_sizes)
  if sizes.shape == (2,):
    sizes = jnp.broadcast_to(sizes, (batch, 2))
  if sizes.shape != (batch, 2):
    raise ValueError('image_sizes must be (height, width) or a [B, 2] array '
                     f'for a batch of {batch}, got shape {sizes.shape}')
  return sizes.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Anchors.


def reference_cell_anchors(stride: int, sizes: Sequence[float],
                           aspect_ratios: Sequence[float]) -> np.ndarray:
  """The reference's cell anchors of one level, [R * S, 4] float32.

  maskrcnn-benchmark's generate_anchors(stride, sizes, aspect_ratios), the
  Faster R-CNN anchors: the window (0, 0, stride - 1, stride - 1) with
  centre c = (stride - 1) / 2 is given, for each aspect ratio r (height /
  width), the integer width ws = round(sqrt(stride^2 / r)) and height
  hs = round(ws * r) (half to even), which are then scaled by size / stride
  for each size; an anchor of width w and height h spans c +- (w - 1) / 2
  and c +- (h - 1) / 2. Computed in float64 and rounded to float32, ratios
  outer and sizes inner.
  """
  stride = float(stride)
  centre = 0.5 * (stride - 1)
  ratios = np.asarray(aspect_ratios, np.float64)
  scales = np.asarray(sizes, np.float64) / stride
  ws = np.round(np.sqrt(stride * stride / ratios))
  hs = np.round(ws * ratios)
  ws = (ws[:, None] * scales[None, :]).reshape(-1)
  hs = (hs[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([centre - 0.5 * (ws - 1), centre - 0.5 * (hs - 1),
                   centre + 0.5 * (ws - 1), centre + 0.5 * (hs - 1)], axis=1)
  return base.astype(np.float32)


def _sizes_per_level(sizes, levels: int) -> tuple[tuple[float, ...], ...]:
  sizes = tuple(s if isinstance(s, (list, tuple)) else (s,) for s in sizes)
  if len(sizes) != levels:
    raise ValueError(f'{len(sizes)} anchor sizes for {levels} levels')
  return sizes


def rpn_anchors_per_level(image_size: Sequence[int],
                          strides: Sequence[int] = RPN_STRIDES,
                          sizes: Sequence = RPN_ANCHOR_SIZES,
                          aspect_ratios: Sequence[float] = RPN_ASPECT_RATIOS
                          ) -> tuple[int, ...]:
  """How many of `rpn_anchors`' rows belong to each level (P2..P6)."""
  return anchors_per_level(image_size, strides,
                           _sizes_per_level(sizes, len(strides)),
                           aspect_ratios)


def rpn_anchors(image_size: Sequence[int],
                strides: Sequence[int] = RPN_STRIDES,
                sizes: Sequence = RPN_ANCHOR_SIZES,
                aspect_ratios: Sequence[float] = RPN_ASPECT_RATIOS,
                style: str = 'reference') -> np.ndarray:
  """The FPN RPN's anchors of a (padded) image size, [A, 4] float32.

  Levels P2..P6 of `strides`, each of ceil(side / stride) locations along a
  side (`feature_sizes`, the shapes of MaskRCNN.features), with one size
  and three aspect ratios per level. Ordered as MaskRCNN.rpn orders its
  outputs: level, then location row by row, then aspect ratio.

  Args:
    image_size: (height, width) of the padded image batch.
    strides: the levels' strides.
    sizes: the anchor size of each level (or a sequence of sizes per level).
    aspect_ratios: height / width ratios, shared by the levels.
    style: 'reference' for maskrcnn-benchmark's anchors
      (`reference_cell_anchors`, shifted by multiples of the nominal
      stride) or 'torchvision' for AnchorGenerator's (rounded zero-centred
      cell anchors shifted by multiples of image size // feature size).

  Returns:
    numpy float32 [A, 4] (x1, y1, x2, y2).
  """
  sizes = _sizes_per_level(sizes, len(strides))
  if style == 'torchvision':
    return retinanet_anchors(image_size, strides, sizes, aspect_ratios)
  if style != 'reference':
    raise ValueError(f"style must be 'reference' or 'torchvision', got "
                     f'{style!r}')
  levels = []
  for (gh, gw), stride, level_sizes in zip(
      feature_sizes(image_size, strides), strides, sizes):
    base = reference_cell_anchors(stride, level_sizes, aspect_ratios)
    shift_y, shift_x = np.meshgrid(
        np.arange(gh, dtype=np.float32) * np.float32(stride),
        np.arange(gw, dtype=np.float32) * np.float32(stride), indexing='ij')
    shift_x = shift_x.reshape(-1)
    shift_y = shift_y.reshape(-1)
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
  return np.concatenate(levels, axis=0)


# ---------------------------------------------------------------------------
# Box arithmetic in either pixel convention.


def rcnn_box_iou(boxes1: jax.Array, boxes2: jax.Array,
                 legacy_plus_one: bool = True) -> jax.Array:
  """IoU [..., N, M] of boxes1 [..., N, 4] with boxes2 [..., M, 4].

  With `legacy_plus_one`, the reference's boxlist_iou: widths and heights
  of boxes and intersections are x2 - x1 + 1 (intersections clamped at 0);
  otherwise torchvision's box_iou.
  """
  if not legacy_plus_one:
    return box_iou(boxes1, boxes2)
  boxes1 = _float(boxes1)
  boxes2 = _float(boxes2)
  area1 = ((boxes1[..., 2] - boxes1[..., 0] + 1)
           * (boxes1[..., 3] - boxes1[..., 1] + 1))
  area2 = ((boxes2[..., 2] - boxes2[..., 0] + 1)
           * (boxes2[..., 3] - boxes2[..., 1] + 1))
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt + 1, 0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def rcnn_encode_boxes(reference_boxes: jax.Array, proposals: jax.Array,
                      weights: Sequence[float], legacy_plus_one: bool = True
                      ) -> jax.Array:
  """Regression targets of `reference_boxes` (gt) from `proposals`.

  torchvision's BoxCoder.encode (`encode_boxes`), or with
  `legacy_plus_one` the reference's, whose widths are x2 - x1 + 1.
  """
  if not legacy_plus_one:
    return encode_boxes(reference_boxes, proposals, weights)
  ref = _float(reference_boxes)
  prop = _float(proposals)
  wx, wy, ww, wh = (float(w) for w in weights)
  ex_w = prop[..., 2] - prop[..., 0] + 1
  ex_h = prop[..., 3] - prop[..., 1] + 1
  ex_x = prop[..., 0] + 0.5 * ex_w
  ex_y = prop[..., 1] + 0.5 * ex_h
  gt_w = ref[..., 2] - ref[..., 0] + 1
  gt_h = ref[..., 3] - ref[..., 1] + 1
  gt_x = ref[..., 0] + 0.5 * gt_w
  gt_y = ref[..., 1] + 0.5 * gt_h
  return jnp.stack([wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                    ww * jnp.log(gt_w / ex_w), wh * jnp.log(gt_h / ex_h)],
                   axis=-1)


def rcnn_decode_boxes(rel_codes: jax.Array, boxes: jax.Array,
                      weights: Sequence[float],
                      legacy_plus_one: bool = True) -> jax.Array:
  """Boxes from regression codes relative to `boxes` (broadcasting).

  torchvision's BoxCoder.decode (`decode_boxes`), or with
  `legacy_plus_one` the reference's: widths x2 - x1 + 1 and boxes
  (cx - w / 2, cy - h / 2, cx + w / 2 - 1, cy + h / 2 - 1). dw and dh are
  clamped at log(1000 / 16) in both.
  """
  if not legacy_plus_one:
    return decode_boxes(rel_codes, boxes, weights)
  rel_codes = _float(rel_codes)
  boxes = jnp.asarray(boxes).astype(rel_codes.dtype)
  wx, wy, ww, wh = (float(w) for w in weights)
  widths = boxes[..., 2] - boxes[..., 0] + 1
  heights = boxes[..., 3] - boxes[..., 1] + 1
  ctr_x = boxes[..., 0] + 0.5 * widths
  ctr_y = boxes[..., 1] + 0.5 * heights
  dx = rel_codes[..., 0] / wx
  dy = rel_codes[..., 1] / wy
  dw = jnp.minimum(rel_codes[..., 2] / ww, BBOX_XFORM_CLIP)
  dh = jnp.minimum(rel_codes[..., 3] / wh, BBOX_XFORM_CLIP)
  pred_x = dx * widths + ctr_x
  pred_y = dy * heights + ctr_y
  pred_w = jnp.exp(dw) * widths
  pred_h = jnp.exp(dh) * heights
  return jnp.stack([pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h,
                    pred_x + 0.5 * pred_w - 1, pred_y + 0.5 * pred_h - 1],
                   axis=-1)


def _clip(boxes: jax.Array, size: jax.Array, legacy: bool) -> jax.Array:
  """Boxes [..., 4] clipped to an image of size (height, width)."""
  height = size[0].astype(boxes.dtype) - (1 if legacy else 0)
  width = size[1].astype(boxes.dtype) - (1 if legacy else 0)
  return jnp.stack([jnp.clip(boxes[..., 0], 0, width),
                    jnp.clip(boxes[..., 1], 0, height),
                    jnp.clip(boxes[..., 2], 0, width),
                    jnp.clip(boxes[..., 3], 0, height)], axis=-1)


def _large_enough(boxes: jax.Array, min_size, legacy: bool) -> jax.Array:
  """remove_small_boxes' keep mask: both sides >= min_size."""
  plus = 1 if legacy else 0
  ws = boxes[..., 2] - boxes[..., 0] + plus
  hs = boxes[..., 3] - boxes[..., 1] + plus
  return (ws >= min_size) & (hs >= min_size)


def _nms_boxes(boxes: jax.Array, legacy: bool) -> jax.Array:
  """Boxes whose plain IoUs are the legacy (+1) IoUs of `boxes`.

  Moving x2 and y2 out by one pixel makes every width, height and
  intersection side one larger, so torchvision's NMS on them is the
  reference's NMS (up to the rounding of x2 + 1).
  """
  if not legacy:
    return boxes
  return boxes + jnp.asarray([0, 0, 1, 1], boxes.dtype)


# ---------------------------------------------------------------------------
# Balanced sampling.


def balanced_sample(key: jax.Array, labels: jax.Array, num_samples: int,
                    positive_fraction: float) -> tuple[jax.Array, jax.Array]:
  """BalancedPositiveNegativeSampler for one image, on static shapes.

  Draws min(#positives, int(num_samples * positive_fraction)) positives
  (labels >= 1) and then min(#negatives, num_samples - drawn positives)
  negatives (labels == 0), each a uniformly random subset: the elements
  with the largest of independent random 31-bit keys, taken with top-k.
  Elements labelled -1 (or below) are never drawn.

  Args:
    key: a PRNG key.
    labels: [N] integer labels: >= 1 positive, 0 negative, < 0 ignored.
    num_samples: S, the static sample size per image.
    positive_fraction: the largest share of positives.

  Returns:
    (indices, valid): int32 [S] indices into `labels`, the drawn positives
    first, then the drawn negatives, then -1 padding; and bool [S], True
    for the drawn ones. The positives are always within the first
    int(S * positive_fraction) slots.
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be [N], got shape {labels.shape}')
  num_samples = _check_count(num_samples, 'num_samples')
  n = labels.shape[0]
  max_pos = int(num_samples * positive_fraction)
  bits = jax.random.bits(key, (n,), jnp.uint32)
  keys = (bits >> 1).astype(jnp.int32)
  positive = labels >= 1
  negative = labels == 0
  slots = jnp.arange(num_samples, dtype=jnp.int32)
  num_pos = jnp.minimum(jnp.sum(positive, dtype=jnp.int32), max_pos)
  num_neg = jnp.minimum(jnp.sum(negative, dtype=jnp.int32),
                        num_samples - num_pos)
  kn = min(num_samples, n)
  _, neg_idx = jax.lax.top_k(jnp.where(negative, keys, -1), kn)
  neg_pick = neg_idx[jnp.clip(slots - num_pos, 0, kn - 1)]
  if max_pos > 0:
    kp = min(max_pos, n)
    _, pos_idx = jax.lax.top_k(jnp.where(positive, keys, -1), kp)
    pos_pick = pos_idx[jnp.clip(slots, 0, kp - 1)]
    indices = jnp.where(slots < num_pos, pos_pick, neg_pick)
  else:
    indices = neg_pick
  valid = slots < num_pos + num_neg
  return jnp.where(valid, indices, -1).astype(jnp.int32), valid


# ---------------------------------------------------------------------------
# RPN targets.


@functools.partial(
    jax.jit, static_argnames=('fg_iou_thresh', 'bg_iou_thresh',
                              'batch_size_per_image', 'positive_fraction',
                              'straddle_thresh', 'weights',
                              'legacy_plus_one'))
def _rpn_targets(key, anchors, gt_boxes, gt_valid, sizes, *, fg_iou_thresh,
                 bg_iou_thresh, batch_size_per_image, positive_fraction,
                 straddle_thresh, weights, legacy_plus_one):
  num_anchors = anchors.shape[0]

  def one_image(key, boxes, valid, size):
    iou = rcnn_box_iou(boxes, anchors, legacy_plus_one)        # [G, A]
    matches = match_anchors(iou, valid, high=fg_iou_thresh,
                            low=bg_iou_thresh,
                            allow_low_quality_matches=True)
    labels = jnp.where(matches >= 0, 1,
                       jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
    if straddle_thresh is not None:
      t = straddle_thresh
      inside = ((anchors[:, 0] >= -t) & (anchors[:, 1] >= -t)
                & (anchors[:, 2] < size[1] + t)
                & (anchors[:, 3] < size[0] + t))
      labels = jnp.where(inside, labels, -1)
    labels = labels.astype(jnp.int32)
    positive = matches >= 0
    matched = jnp.where(positive[:, None],
                        boxes[jnp.maximum(matches, 0)], anchors)
    targets = rcnn_encode_boxes(matched, anchors, weights,
                                legacy_plus_one)
    idx, drawn = balanced_sample(key, labels, batch_size_per_image,
                                 positive_fraction)
    pos = drawn & (labels[jnp.maximum(idx, 0)] >= 1)
    where_pos = jnp.where(pos, idx, num_anchors)
    where_neg = jnp.where(drawn & ~pos, idx, num_anchors)
    none = jnp.zeros((num_anchors,), bool)
    return {
        'labels': labels,
        'matched_idxs': matches,
        'regression_targets': targets,
        'sampled_positive': none.at[where_pos].set(True, mode='drop'),
        'sampled_negative': none.at[where_neg].set(True, mode='drop'),
    }

  keys = jax.random.split(key, gt_boxes.shape[0])
  return jax.vmap(one_image)(keys, gt_boxes, gt_valid, sizes)


def rpn_targets(key: jax.Array, anchors: jax.Array, gt_boxes: jax.Array,
                gt_valid: jax.Array, image_sizes, *,
                fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3,
                batch_size_per_image: int = 256,
                positive_fraction: float = 0.5,
                straddle_thresh: float | None = 0.0,
                weights: Sequence[float] = RPN_BOX_WEIGHTS,
                legacy_plus_one: bool = True) -> dict[str, jax.Array]:
  """RPN training targets and the sampled anchors of a batch.

  Per image, as the reference's RPNLossComputation.prepare_targets and
  its sampler: every anchor is matched to the ground truths by IoU
  (Matcher(0.7, 0.3) with low-quality matches: each gt's best anchors,
  ties included, match it too); matched anchors are positive (1), those
  below 0.3 negative (0), those in between ignored (-1), and so are the
  anchors crossing their image's border by more than `straddle_thresh`
  (after matching, so they still count as a gt's best anchors). Then
  `balanced_sample` draws 256 anchors with at most half positives.

  Args:
    key: PRNG key (split over the images).
    anchors: [A, 4] (`rpn_anchors`), shared by the batch.
    gt_boxes: [B, G, 4] ground-truth boxes, padded.
    gt_valid: [B, G] bool, False for padding. An image without valid
      ground truths has only negatives and ignored anchors.
    image_sizes: [B, 2] (height, width) of each image before padding, or
      one (height, width) for all.
    fg_iou_thresh: RPN.FG_IOU_THRESHOLD.
    bg_iou_thresh: RPN.BG_IOU_THRESHOLD.
    batch_size_per_image: RPN.BATCH_SIZE_PER_IMAGE.
    positive_fraction: RPN.POSITIVE_FRACTION.
    straddle_thresh: RPN.STRADDLE_THRESH (an anchor is kept if x1, y1 >=
      -t and x2 < width + t, y2 < height + t); None keeps all anchors
      (torchvision).
    weights: the RPN box coder's weights.
    legacy_plus_one: the reference's +1 IoU and box coder.

  Returns:
    A dict of 'labels' int32 [B, A] (1, 0, -1), 'matched_idxs' int32
    [B, A] (the matcher's gt index, or -1 below / -2 between the
    thresholds), 'regression_targets' [B, A, 4] (the matched gt encoded
    against the anchor; 0 for anchors that are not positive),
    'sampled_positive' and 'sampled_negative' bool [B, A].
  """
  anchors = _float(anchors)
  gt_boxes = _float(gt_boxes)
  if anchors.ndim != 2 or anchors.shape[1] != 4:
    raise ValueError(f'anchors must be [A, 4], got {anchors.shape}')
  if gt_boxes.ndim != 3 or gt_boxes.shape[2] != 4:
    raise ValueError(f'gt_boxes must be [B, G, 4], got {gt_boxes.shape}')
  gt_valid = jnp.asarray(gt_valid, bool)
  if gt_valid.shape != gt_boxes.shape[:2]:
    raise ValueError(f'gt_valid must be {gt_boxes.shape[:2]}, got '
                     f'{gt_valid.shape}')
  return _rpn_targets(
      key, anchors, gt_boxes.astype(anchors.dtype), gt_valid,
      _image_sizes(image_sizes, gt_boxes.shape[0]),
      fg_iou_thresh=float(fg_iou_thresh), bg_iou_thresh=float(bg_iou_thresh),
      batch_size_per_image=_check_count(batch_size_per_image,
                                        'batch_size_per_image'),
      positive_fraction=float(positive_fraction),
      straddle_thresh=(None if straddle_thresh is None
                       else float(straddle_thresh)),
      weights=tuple(float(w) for w in weights),
      legacy_plus_one=bool(legacy_plus_one))


# ---------------------------------------------------------------------------
# Proposals.


@functools.partial(
    jax.jit, static_argnames=('level_sizes', 'pre_nms_top_n',
                              'post_nms_top_n', 'nms_thresh', 'min_size',
                              'per_image', 'weights', 'legacy_plus_one'))
def _rpn_proposals(objectness, deltas, anchors, sizes, *, level_sizes,
                   pre_nms_top_n, post_nms_top_n, nms_thresh, min_size,
                   per_image, weights, legacy_plus_one):

  def one_image(logits, codes, size):
    boxes, scores, levels, valid = [], [], [], []
    start = 0
    for level, count in enumerate(level_sizes):
      level_logits = jax.lax.slice_in_dim(logits, start, start + count)
      level_logits = jnp.where(jnp.isnan(level_logits), -jnp.inf,
                               level_logits)
      top, idx = jax.lax.top_k(level_logits, min(pre_nms_top_n, count))
      idx = idx + start
      b = rcnn_decode_boxes(codes[idx], anchors[idx], weights,
                            legacy_plus_one)
      b = _clip(b, size, legacy_plus_one)
      boxes.append(b)
      scores.append(jax.nn.sigmoid(top))
      levels.append(jnp.full(idx.shape, level, jnp.int32))
      valid.append(_large_enough(b, min_size, legacy_plus_one)
                   & (top > -jnp.inf))
      start += count
    boxes, scores, levels, valid = (
        jnp.concatenate(x) for x in (boxes, scores, levels, valid))
    keep, num = batched_nms(_nms_boxes(boxes, legacy_plus_one), scores,
                            levels, nms_thresh, post_nms_top_n, valid=valid)
    kept = jnp.arange(post_nms_top_n) < num
    keep = jnp.maximum(keep, 0)
    return (jnp.where(kept[:, None], boxes[keep], 0),
            jnp.where(kept, scores[keep], 0), kept)

  boxes, scores, valid = jax.vmap(one_image)(objectness, deltas, sizes)
  if not per_image:
    # The batch's post_nms_top_n best; each image's share is a prefix of
    # its own list, which is in descending score order.
    batch = boxes.shape[0]
    flat = jnp.where(valid, scores, -jnp.inf).reshape(-1)
    _, best = jax.lax.top_k(flat, min(post_nms_top_n, flat.shape[0]))
    chosen = jnp.zeros(flat.shape, bool).at[best].set(True)
    chosen = chosen.reshape(batch, -1) & valid
    count = jnp.sum(chosen, axis=1, keepdims=True)
    valid = jnp.arange(post_nms_top_n)[None, :] < count
    boxes = jnp.where(valid[..., None], boxes, 0)
    scores = jnp.where(valid, scores, 0)
  return {'boxes': boxes, 'scores': scores, 'valid': valid}


def rpn_proposals(objectness: jax.Array, rpn_deltas: jax.Array,
                  anchors: jax.Array, level_sizes: Sequence[int],
                  image_sizes, *, training: bool = True,
                  pre_nms_top_n: int | None = None,
                  post_nms_top_n: int | None = None,
                  per_image: bool | None = None, nms_thresh: float = 0.7,
                  min_size: float = 0.0,
                  weights: Sequence[float] = RPN_BOX_WEIGHTS,
                  legacy_plus_one: bool = True) -> dict[str, jax.Array]:
  """The RPN's proposals for a batch (RPNPostProcessor / filter_proposals).

  Per image and level, the pre_nms_top_n anchors of highest objectness are
  decoded, clipped to the image's own size and filtered by size; NMS at
  `nms_thresh` runs within each level, and the proposals of all levels are
  merged in descending objectness. Of these, the first post_nms_top_n of
  each image are kept (`per_image`), or the post_nms_top_n best of the
  whole batch (the reference's training behaviour). No gradient flows
  back into the inputs.

  The reference also caps each level's NMS output at POST_NMS_TOP_N
  (2000 train / 1000 test), which is never below its PRE_NMS_TOP_N and so
  changes nothing; that cap is not applied.

  Under `per_image=False` the ranking spans the leading axis of the inputs:
  the reference ranks each GPU's images together, so pass one device's
  images (or vmap over groups of them) to reproduce it.

  Args:
    objectness: [B, A] logits (MaskRCNN.rpn).
    rpn_deltas: [B, A, 4] box deltas.
    anchors: [A, 4] (`rpn_anchors`).
    level_sizes: anchors of each level (`rpn_anchors_per_level`).
    image_sizes: [B, 2] (height, width) of each image before padding, or
      one (height, width) for all.
    training: picks the defaults of the next three arguments: the
      reference's training setting (2000, 2000, per batch) or its test
      setting (1000, 1000, per image).
    pre_nms_top_n: candidates per level and image.
    post_nms_top_n: P, proposal slots per image.
    per_image: keep P per image (torchvision, and the reference at test),
      or P over the batch (the reference in training).
    nms_thresh: RPN.NMS_THRESH.
    min_size: proposals with a side below this are dropped (the
      reference's 0; torchvision's RPN uses 1e-3).
    weights: the RPN box coder's weights.
    legacy_plus_one: the reference's +1 box coder, clipping, size filter
      and NMS.

  Returns:
    A dict of 'boxes' [B, P, 4], 'scores' [B, P] (objectness
    probabilities) and 'valid' bool [B, P]; each image's valid proposals
    come first, in descending score order, and the rest are zero.
  """
  objectness = jax.lax.stop_gradient(_float(objectness))
  rpn_deltas = jax.lax.stop_gradient(_float(rpn_deltas))
  anchors = _float(anchors)
  if objectness.ndim != 2:
    raise ValueError(f'objectness must be [B, A], got {objectness.shape}')
  batch, num_anchors = objectness.shape
  if rpn_deltas.shape != (batch, num_anchors, 4):
    raise ValueError(f'rpn_deltas must be [{batch}, {num_anchors}, 4], got '
                     f'{rpn_deltas.shape}')
  if anchors.shape != (num_anchors, 4):
    raise ValueError(f'anchors must be [{num_anchors}, 4], got '
                     f'{anchors.shape}')
  level_sizes = tuple(_check_count(n, 'each level size') for n in level_sizes)
  if sum(level_sizes) != num_anchors:
    raise ValueError(f'level sizes {level_sizes} add up to '
                     f'{sum(level_sizes)}, not to the {num_anchors} anchors')
  if pre_nms_top_n is None:
    pre_nms_top_n = 2000 if training else 1000
  if post_nms_top_n is None:
    post_nms_top_n = 2000 if training else 1000
  if per_image is None:
    per_image = not training
  return _rpn_proposals(
      objectness, rpn_deltas.astype(objectness.dtype),
      anchors.astype(objectness.dtype), _image_sizes(image_sizes, batch),
      level_sizes=level_sizes,
      pre_nms_top_n=_check_count(pre_nms_top_n, 'pre_nms_top_n'),
      post_nms_top_n=_check_count(post_nms_top_n, 'post_nms_top_n'),
      nms_thresh=float(nms_thresh), min_size=float(min_size),
      per_image=bool(per_image), weights=tuple(float(w) for w in weights),
      legacy_plus_one=bool(legacy_plus_one))


# ---------------------------------------------------------------------------
# ROI sampling.


def label_proposals(proposals: jax.Array, proposal_valid: jax.Array,
                    gt_boxes: jax.Array, gt_labels: jax.Array,
                    gt_valid: jax.Array, *, fg_iou_thresh: float = 0.5,
                    bg_iou_thresh: float = 0.5,
                    legacy_plus_one: bool = True
                    ) -> tuple[jax.Array, jax.Array]:
  """Class labels and matched gts of one image's candidate ROIs.

  The reference's FastRCNNLossComputation.prepare_targets (torchvision's
  assign_targets_to_proposals): Matcher(0.5, 0.5) without low-quality
  matches; a matched ROI takes its gt's class, one below the low threshold
  is background (0), one in between is ignored (-1), and so is every
  invalid ROI.

  Args:
    proposals: [N, 4] candidate ROIs.
    proposal_valid: [N] bool.
    gt_boxes: [G, 4]; gt_labels: [G] integer classes (>= 1);
    gt_valid: [G] bool.
    fg_iou_thresh, bg_iou_thresh: ROI_HEADS.FG_IOU_THRESHOLD /
      BG_IOU_THRESHOLD.
    legacy_plus_one: the reference's +1 IoU.

  Returns:
    (labels int32 [N], matched_idxs int32 [N]: the matcher's gt index, or
    -1 below / -2 between the thresholds).
  """
  iou = rcnn_box_iou(gt_boxes, proposals, legacy_plus_one)
  matches = match_anchors(iou, gt_valid, high=fg_iou_thresh,
                          low=bg_iou_thresh, allow_low_quality_matches=False)
  labels = jnp.where(
      matches >= 0, jnp.asarray(gt_labels).astype(jnp.int32)[
          jnp.maximum(matches, 0)],
      jnp.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
  labels = jnp.where(jnp.asarray(proposal_valid, bool), labels, -1)
  return labels.astype(jnp.int32), matches


@functools.partial(
    jax.jit, static_argnames=('fg_iou_thresh', 'bg_iou_thresh',
                              'batch_size_per_image', 'positive_fraction',
                              'weights', 'legacy_plus_one', 'add_gt_boxes'))
def _sample_rois(key, proposals, proposal_valid, gt_boxes, gt_labels,
                 gt_valid, *, fg_iou_thresh, bg_iou_thresh,
                 batch_size_per_image, positive_fraction, weights,
                 legacy_plus_one, add_gt_boxes):

  def one_image(key, props, pvalid, boxes, classes, gvalid):
    if add_gt_boxes:
      props = jnp.concatenate([props, boxes])
      pvalid = jnp.concatenate([pvalid, gvalid])
    labels, matches = label_proposals(
        props, pvalid, boxes, classes, gvalid, fg_iou_thresh=fg_iou_thresh,
        bg_iou_thresh=bg_iou_thresh, legacy_plus_one=legacy_plus_one)
    idx, valid = balanced_sample(key, labels, batch_size_per_image,
                                 positive_fraction)
    i = jnp.maximum(idx, 0)
    rois = jnp.where(valid[:, None], props[i], 0)
    roi_labels = jnp.where(valid, labels[i], 0)
    positive = roi_labels > 0
    matched = jnp.where(positive, matches[i], -1)
    gt = jnp.where(positive[:, None], boxes[jnp.maximum(matched, 0)], rois)
    targets = jnp.where(positive[:, None],
                        rcnn_encode_boxes(gt, rois, weights,
                                          legacy_plus_one), 0)
    return {'boxes': rois, 'labels': roi_labels,
            'regression_targets': targets, 'matched_idxs': matched,
            'indices': idx, 'valid': valid}

  keys = jax.random.split(key, proposals.shape[0])
  return jax.vmap(one_image)(keys, proposals, proposal_valid, gt_boxes,
                             gt_labels, gt_valid)


def sample_rois(key: jax.Array, proposals: jax.Array,
                proposal_valid: jax.Array, gt_boxes: jax.Array,
                gt_labels: jax.Array, gt_valid: jax.Array, *,
                fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                batch_size_per_image: int = 512,
                positive_fraction: float = 0.25,
                weights: Sequence[float] = ROI_BOX_WEIGHTS,
                legacy_plus_one: bool = True,
                add_gt_boxes: bool = True) -> dict[str, jax.Array]:
  """The ROIs of a training batch for the box and mask heads.

  Per image, as the reference's FastRCNNLossComputation.subsample
  (torchvision's select_training_samples): the valid ground truths are
  appended to the proposals, the candidates are labelled by
  `label_proposals`, and `balanced_sample` draws 512 of them with at most
  a quarter positives, whose regression targets are their gt boxes
  encoded against them (weights 10, 10, 5, 5). The positives come first,
  so the mask head's ROIs are the first int(512 * 0.25) = 128 slots (with
  `labels > 0` as their mask).

  Args:
    key: PRNG key (split over the images).
    proposals: [B, P, 4] (`rpn_proposals`); no gradient flows into them.
    proposal_valid: [B, P] bool.
    gt_boxes: [B, G, 4]; gt_labels: [B, G] integer classes in [1, C);
    gt_valid: [B, G] bool.
    fg_iou_thresh, bg_iou_thresh: ROI_HEADS.FG_IOU_THRESHOLD /
      BG_IOU_THRESHOLD.
    batch_size_per_image: S, ROI_HEADS.BATCH_SIZE_PER_IMAGE.
    positive_fraction: ROI_HEADS.POSITIVE_FRACTION.
    weights: ROI_HEADS.BBOX_REG_WEIGHTS.
    legacy_plus_one: the reference's +1 IoU and box coder.
    add_gt_boxes: append the ground truths to the proposals.

  Returns:
    A dict of, per image and slot: 'boxes' [B, S, 4] (the ROIs), 'labels'
    int32 [B, S] (the class, 0 for background), 'regression_targets'
    [B, S, 4] (0 where not positive), 'matched_idxs' int32 [B, S] (the
    gt index of positive ROIs, -1 elsewhere), 'indices' int32 [B, S] (each
    ROI's index among the candidates: the P proposals, then the G ground
    truths if appended; -1 for padding) and 'valid' bool [B, S].
  """
  proposals = jax.lax.stop_gradient(_float(proposals))
  gt_boxes = _float(gt_boxes).astype(proposals.dtype)
  if proposals.ndim != 3 or proposals.shape[2] != 4:
    raise ValueError(f'proposals must be [B, P, 4], got {proposals.shape}')
  if gt_boxes.ndim != 3 or gt_boxes.shape[::2] != (proposals.shape[0], 4):
    raise ValueError(f'gt_boxes must be [{proposals.shape[0]}, G, 4], got '
                     f'{gt_boxes.shape}')
  proposal_valid = jnp.asarray(proposal_valid, bool)
  gt_valid = jnp.asarray(gt_valid, bool)
  gt_labels = jnp.asarray(gt_labels)
  if proposal_valid.shape != proposals.shape[:2]:
    raise ValueError(f'proposal_valid must be {proposals.shape[:2]}, got '
                     f'{proposal_valid.shape}')
  if gt_valid.shape != gt_boxes.shape[:2] or (
      gt_labels.shape != gt_boxes.shape[:2]):
    raise ValueError(f'gt_labels and gt_valid must be {gt_boxes.shape[:2]}, '
                     f'got {gt_labels.shape} and {gt_valid.shape}')
  return _sample_rois(
      key, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid,
      fg_iou_thresh=float(fg_iou_thresh), bg_iou_thresh=float(bg_iou_thresh),
      batch_size_per_image=_check_count(batch_size_per_image,
                                        'batch_size_per_image'),
      positive_fraction=float(positive_fraction),
      weights=tuple(float(w) for w in weights),
      legacy_plus_one=bool(legacy_plus_one), add_gt_boxes=bool(add_gt_boxes))


# ---------------------------------------------------------------------------
# Mask targets.


@functools.partial(
    jax.jit, static_argnames=('resolution', 'aligned', 'sampling_ratio',
                              'max_sampling_grid', 'threshold'))
def _mask_targets(crops, mask_boxes, rois, matched_idxs, *, resolution,
                  aligned, sampling_ratio, max_sampling_grid, threshold):
  batch, num_gt, mh, mw = crops.shape
  k = rois.shape[1]
  # One zero pixel around each crop: outside its box a mask is empty.
  table = jnp.pad(crops.reshape(batch * num_gt, mh, mw),
                  ((0, 0), (1, 1), (1, 1)))[..., None]
  g = jnp.clip(matched_idxs, 0, num_gt - 1)
  box = jnp.take_along_axis(mask_boxes, g[..., None], axis=1)   # [B, K, 4]
  # Only guards against empty crop boxes (padding).
  sx = mw / jnp.maximum(box[..., 2] - box[..., 0], 1e-6)
  sy = mh / jnp.maximum(box[..., 3] - box[..., 1], 1e-6)
  # The reference crops the masks to the ROI with sides of at least 1.
  x1, y1 = rois[..., 0], rois[..., 1]
  x2 = x1 + jnp.maximum(rois[..., 2] - x1, 1)
  y2 = y1 + jnp.maximum(rois[..., 3] - y1, 1)
  frame = jnp.stack([(x1 - box[..., 0]) * sx + 1, (y1 - box[..., 1]) * sy + 1,
                     (x2 - box[..., 0]) * sx + 1, (y2 - box[..., 1]) * sy + 1],
                    axis=-1)
  index = jnp.arange(batch, dtype=jnp.int32)[:, None] * num_gt + g
  out = roi_align(table, frame.reshape(-1, 4), resolution, 1.0,
                  sampling_ratio, aligned, batch_indices=index.reshape(-1),
                  max_sampling_grid=max_sampling_grid)
  out = out[..., 0].reshape(batch, k, resolution, resolution)
  if threshold is not None:
    out = (out >= threshold).astype(out.dtype)
  return out


def mask_targets(mask_crops: jax.Array, mask_boxes: jax.Array,
                 rois: jax.Array, matched_idxs: jax.Array, *,
                 resolution: int = MASK_RESOLUTION, aligned: bool = True,
                 sampling_ratio: int = 1,
                 max_sampling_grid: int | None = None,
                 threshold: float | None = 0.5) -> jax.Array:
  """The mask head's targets: each ROI's matched gt mask over the ROI.

  The gt masks come as crops: mask_crops[b, g] is gt g's mask over the box
  mask_boxes[b, g] (its own extent, e.g. the gt box) at Mh x Mw pixels,
  pixel (i, j) covering [x1 + j * w / Mw, x1 + (j + 1) * w / Mw] x
  [y1 + i * h / Mh, y1 + (i + 1) * h / Mh] with w = x2 - x1 and
  h = y2 - y1. Each ROI, its sides widened to at least one pixel (as the
  reference crops masks to it), is mapped into its gt's crop frame, and the
  crop, padded with one empty pixel, is RoIAligned over it to resolution x
  resolution and binarised at `threshold` (>=).

  The default samples each target pixel's centre (`aligned=True`, one
  sample per bin), the counterpart of the reference rasterising the gt's
  polygons cropped to the ROI. With `aligned=False, sampling_ratio=-1,
  threshold=None` this is torchvision's project_masks_on_boxes when the
  crop holds the full-image mask's own pixels (a mask box of integer
  corners, Mw x Mh pixels large).

  Args:
    mask_crops: [B, G, Mh, Mw] gt mask crops (bool, uint8 or float).
    mask_boxes: [B, G, 4] the boxes the crops cover.
    rois: [B, K, 4] ROIs (e.g. `sample_rois`' first 128 slots).
    matched_idxs: [B, K] gt index of each ROI (values < 0 read gt 0; mask
      those ROIs out of the loss).
    resolution: ROI_MASK_HEAD.RESOLUTION.
    aligned: half-pixel aligned sampling; see `roi_align`.
    sampling_ratio: samples per bin and axis (<= 0: adaptive, bounded by
      `max_sampling_grid`); see `roi_align`.
    max_sampling_grid: static bound of the adaptive grid.
    threshold: targets are value >= threshold; None keeps the sampled
      values (soft targets).

  Returns:
    float32 [B, K, resolution, resolution] targets.
  """
  crops = _float(mask_crops)
  mask_boxes = _float(mask_boxes).astype(crops.dtype)
  rois = jax.lax.stop_gradient(_float(rois)).astype(crops.dtype)
  if crops.ndim != 4:
    raise ValueError(f'mask_crops must be [B, G, Mh, Mw], got {crops.shape}')
  if mask_boxes.shape != crops.shape[:2] + (4,):
    raise ValueError(f'mask_boxes must be {crops.shape[:2] + (4,)}, got '
                     f'{mask_boxes.shape}')
  if rois.ndim != 3 or rois.shape[::2] != (crops.shape[0], 4):
    raise ValueError(f'rois must be [{crops.shape[0]}, K, 4], got '
                     f'{rois.shape}')
  matched_idxs = jnp.asarray(matched_idxs).astype(jnp.int32)
  if matched_idxs.shape != rois.shape[:2]:
    raise ValueError(f'matched_idxs must be {rois.shape[:2]}, got '
                     f'{matched_idxs.shape}')
  return _mask_targets(
      crops, mask_boxes, rois, matched_idxs,
      resolution=_check_count(resolution, 'resolution'),
      aligned=bool(aligned), sampling_ratio=int(sampling_ratio),
      max_sampling_grid=(None if max_sampling_grid is None
                         else int(max_sampling_grid)),
      threshold=None if threshold is None else float(threshold))


# ---------------------------------------------------------------------------
# Evaluation.


@functools.partial(
    jax.jit, static_argnames=('score_thresh', 'nms_thresh',
                              'detections_per_img', 'min_size', 'weights',
                              'legacy_plus_one'))
def _roi_detections(class_logits, box_regression, proposals, proposal_valid,
                    sizes, *, score_thresh, nms_thresh, detections_per_img,
                    min_size, weights, legacy_plus_one):
  num_classes = class_logits.shape[-1]

  def one_image(args):
    logits, codes, props, pvalid, size = args
    r = props.shape[0]
    scores = jax.nn.softmax(logits, axis=-1)[:, 1:]
    codes = codes.reshape(r, num_classes, 4)[:, 1:]
    boxes = rcnn_decode_boxes(codes, props[:, None, :], weights,
                              legacy_plus_one)
    boxes = _clip(boxes, size, legacy_plus_one)
    labels = jnp.broadcast_to(
        jnp.arange(1, num_classes, dtype=jnp.int32)[None], scores.shape)
    valid = pvalid[:, None] & (scores > score_thresh)
    if min_size is not None:
      valid &= _large_enough(boxes, min_size, legacy_plus_one)
    boxes, scores, labels, valid = (
        x.reshape((-1,) + x.shape[2:]) for x in (boxes, scores, labels,
                                                 valid))
    keep, num = batched_nms(_nms_boxes(boxes, legacy_plus_one), scores,
                            labels, nms_thresh, detections_per_img,
                            valid=valid)
    kept = jnp.arange(detections_per_img) < num
    keep = jnp.maximum(keep, 0)
    return {'boxes': jnp.where(kept[:, None], boxes[keep], 0),
            'scores': jnp.where(kept, scores[keep], 0),
            'labels': jnp.where(kept, labels[keep], 0),
            'valid': kept}

  return jax.lax.map(one_image, (class_logits, box_regression, proposals,
                                 proposal_valid, sizes))


def roi_detections(class_logits: jax.Array, box_regression: jax.Array,
                   proposals: jax.Array, proposal_valid: jax.Array,
                   image_sizes, *, score_thresh: float = 0.05,
                   nms_thresh: float = 0.5, detections_per_img: int = 100,
                   min_size: float | None = None,
                   weights: Sequence[float] = ROI_BOX_WEIGHTS,
                   legacy_plus_one: bool = True) -> dict[str, jax.Array]:
  """Detections from the box head (the reference's PostProcessor).

  Per image: softmax class scores; each proposal's box decoded for every
  class from its class-specific deltas and clipped to the image; every
  (proposal, class) pair but the background's with a score above
  `score_thresh` is a candidate; NMS within each class; the
  `detections_per_img` best survivors in descending score order.
  torchvision's postprocess_detections is `min_size=1e-2,
  legacy_plus_one=False`.

  Args:
    class_logits: [B, R, C] (MaskRCNN.box_head, reshaped per image).
    box_regression: [B, R, C * 4].
    proposals: [B, R, 4] (`rpn_proposals(training=False)`).
    proposal_valid: [B, R] bool.
    image_sizes: [B, 2] (height, width) of each image before padding, or
      one (height, width) for all.
    score_thresh: ROI_HEADS.SCORE_THRESH (strictly above).
    nms_thresh: ROI_HEADS.NMS.
    detections_per_img: D, ROI_HEADS.DETECTIONS_PER_IMG.
    min_size: drop boxes with a side below this (torchvision's 1e-2); None
      (the reference) keeps all.
    weights: ROI_HEADS.BBOX_REG_WEIGHTS.
    legacy_plus_one: the reference's +1 box coder, clipping and NMS.

  Returns:
    A dict of 'boxes' [B, D, 4] (in the resized image's pixels; see
    `rescale_boxes`), 'scores' [B, D], 'labels' int32 [B, D] (1..C-1) and
    'valid' bool [B, D]; valid detections first, the rest zero.
  """
  class_logits = _float(class_logits)
  box_regression = _float(box_regression).astype(class_logits.dtype)
  proposals = _float(proposals).astype(class_logits.dtype)
  if class_logits.ndim != 3:
    raise ValueError(f'class_logits must be [B, R, C], got '
                     f'{class_logits.shape}')
  batch, r, c = class_logits.shape
  if box_regression.shape != (batch, r, c * 4):
    raise ValueError(f'box_regression must be {(batch, r, c * 4)}, got '
                     f'{box_regression.shape}')
  if proposals.shape != (batch, r, 4):
    raise ValueError(f'proposals must be {(batch, r, 4)}, got '
                     f'{proposals.shape}')
  proposal_valid = jnp.asarray(proposal_valid, bool)
  if proposal_valid.shape != (batch, r):
    raise ValueError(f'proposal_valid must be {(batch, r)}, got '
                     f'{proposal_valid.shape}')
  return _roi_detections(
      class_logits, box_regression, proposals, proposal_valid,
      _image_sizes(image_sizes, batch), score_thresh=float(score_thresh),
      nms_thresh=float(nms_thresh),
      detections_per_img=_check_count(detections_per_img,
                                      'detections_per_img'),
      min_size=None if min_size is None else float(min_size),
      weights=tuple(float(w) for w in weights),
      legacy_plus_one=bool(legacy_plus_one))


def mask_probabilities(mask_logits: jax.Array, labels: jax.Array
                       ) -> jax.Array:
  """Sigmoid of each ROI's mask logits for its class (MaskPostProcessor).

  Args:
    mask_logits: [..., M, M, C] (MaskRCNN.mask_head, reshaped).
    labels: [...] integer classes, e.g. `roi_detections`' labels.

  Returns:
    [..., M, M] mask probabilities, float32 or wider.
  """
  mask_logits = _float(mask_logits)
  labels = jnp.asarray(labels).astype(jnp.int32)
  if mask_logits.shape[:-3] != labels.shape:
    raise ValueError(f'mask_logits {mask_logits.shape} and labels '
                     f'{labels.shape} disagree')
  index = jnp.broadcast_to(labels[..., None, None, None],
                           mask_logits.shape[:-1] + (1,))
  return jax.nn.sigmoid(
      jnp.take_along_axis(mask_logits, index, axis=-1)[..., 0])
