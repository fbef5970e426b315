"""RetinaNet detection post-processing with static shapes.

`retinanet_postprocess` is torchvision's RetinaNet.postprocess_detections
(which the MLPerf RetinaNet reference uses unchanged) for a batch of head
outputs. Per image and per pyramid level: the scores are the sigmoids of the
logits flattened over (anchor, class); those above `score_thresh` are kept,
at most the `topk_candidates` best of them; their boxes are decoded from the
anchors (BoxCoder with unit weights) and clipped to the image. The
candidates of all levels then go through class-wise NMS, and the first
`detections_per_img` survivors, in descending score order, are the
detections.

Shapes are static: each level contributes exactly min(topk_candidates,
anchors x classes) candidates, those at or below the threshold marked
invalid, and the output has `detections_per_img` slots per image with a
validity mask. The level's top-k is taken over the raw logits (the sigmoid
is monotonic, so a logit ranks where its score does, and the candidates
above the threshold are the same) and the sigmoid is applied to the selected
ones only, so no score array of the level's size is materialised. Scores
that are equal in float32 (sigmoids saturating at 1) rank by logit, then by
index; torchvision leaves the order of such ties unspecified. nan logits,
whose scores fail the threshold in torchvision, never take a candidate slot.

`rescale_boxes` maps boxes from the resized image back to the original image,
as torchvision's GeneralizedRCNNTransform.postprocess (resize_boxes) does.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .anchors import decode_boxes
from .boxes import batched_nms


def _check_count(value, name: str) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or
      value < 1):
    raise ValueError(f'{name} must be an int >= 1, got {value!r}')
  return int(value)


def _image_sizes(image_size, batch: int) -> jax.Array:
  """Image sizes as a float32 [B, 2] (height, width) array."""
  sizes = jnp.asarray(image_size)
  if sizes.shape == (2,):
    sizes = jnp.broadcast_to(sizes, (batch, 2))
  if sizes.shape != (batch, 2):
    raise ValueError('image_size must be (height, width) or a [B, 2] array '
                     f'for a batch of {batch}, got shape {sizes.shape}')
  return sizes.astype(jnp.float32)


def _level_candidates(logits, regression, anchors, size, *, start: int,
                      count: int, score_thresh, topk: int):
  """One level's candidates of one image: boxes, scores, labels, valid."""
  num_classes = logits.shape[-1]
  flat = jax.lax.slice_in_dim(logits, start, start + count).reshape(-1)
  # A nan logit (whose score fails the threshold in torchvision) must not
  # take the place of a real candidate.
  flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat)
  k = min(topk, count * num_classes)
  top_logits, idx = jax.lax.top_k(flat, k)
  scores = jax.nn.sigmoid(top_logits)
  valid = scores > jnp.asarray(score_thresh, scores.dtype)
  anchor_idx = start + idx // num_classes
  labels = (idx % num_classes).astype(jnp.int32)
  boxes = decode_boxes(regression[anchor_idx], anchors[anchor_idx])
  height, width = size[0].astype(boxes.dtype), size[1].astype(boxes.dtype)
  boxes = jnp.stack([jnp.clip(boxes[:, 0], 0, width),
                     jnp.clip(boxes[:, 1], 0, height),
                     jnp.clip(boxes[:, 2], 0, width),
                     jnp.clip(boxes[:, 3], 0, height)], axis=-1)
  return boxes, scores, labels, valid


@functools.partial(
    jax.jit, static_argnames=('level_sizes', 'score_thresh', 'nms_thresh',
                              'detections_per_img', 'topk_candidates'))
def _postprocess(cls_logits, bbox_regression, anchors, sizes, *, level_sizes,
                 score_thresh, nms_thresh, detections_per_img,
                 topk_candidates):
  """`retinanet_postprocess` on checked inputs."""

  def one_image(args):
    logits, regression, size = args
    parts = []
    start = 0
    for count in level_sizes:
      parts.append(_level_candidates(
          logits, regression, anchors, size, start=start, count=count,
          score_thresh=score_thresh, topk=topk_candidates))
      start += count
    boxes, scores, labels, valid = (
        jnp.concatenate(x, axis=0) for x in zip(*parts))
    keep, num = batched_nms(boxes, scores, labels, nms_thresh,
                            detections_per_img, valid=valid)
    kept = jnp.arange(detections_per_img) < num
    keep = jnp.maximum(keep, 0)
    return {
        'boxes': jnp.where(kept[:, None], boxes[keep], 0),
        'scores': jnp.where(kept, scores[keep], 0),
        'labels': jnp.where(kept, labels[keep], 0),
        'valid': kept,
    }

  return jax.lax.map(one_image, (cls_logits, bbox_regression, sizes))


def retinanet_postprocess(cls_logits: jax.Array, bbox_regression: jax.Array,
                          anchors: jax.Array, level_sizes: Sequence[int],
                          image_size, *, score_thresh: float = 0.05,
                          nms_thresh: float = 0.5,
                          detections_per_img: int = 300,
                          topk_candidates: int = 1000) -> dict[str, jax.Array]:
  """Detections from RetinaNet head outputs, as torchvision's RetinaNet.

  Runs under jax.jit (with `level_sizes`, the thresholds and the counts
  static); images are processed one after another (lax.map), each level
  selecting its candidates with one top-k over its logits.

  Args:
    cls_logits: [B, N, C] classification logits, ordered as the head returns
      them (levels P3..P7, then locations row-major, then anchors).
    bbox_regression: [B, N, 4] box regression codes (dx, dy, dw, dh).
    anchors: [N, 4] anchors (x1, y1, x2, y2) in the same order, shared by the
      images (`retinanet_anchors` of the padded batch size).
    level_sizes: number of anchors of each level (`anchors_per_level`);
      they must add up to N.
    image_size: (height, width) the boxes are clipped to, for all images, or
      a [B, 2] array of one per image (torchvision clips to each image's
      size after resizing, before batch padding).
    score_thresh: scores (sigmoids of the logits) must be strictly above
      this, compared in the logits' float precision as torchvision does.
    nms_thresh: IoU above which NMS drops a box overlapping a better-scoring
      one of the same class.
    detections_per_img: D, detections kept per image.
    topk_candidates: at most this many candidates per level, the best-scoring
      ones above the threshold.

  Returns:
    A dict of 'boxes' [B, D, 4] (x1, y1, x2, y2, in the pixels of
    `image_size`), 'scores' [B, D], 'labels' int32 [B, D] (class indices into
    C) and 'valid' bool [B, D]. Each image's valid detections come first, in
    descending score order (the order torchvision returns them in); the
    slots after them are zero and not valid.
  """
  cls_logits = jnp.asarray(cls_logits)
  bbox_regression = jnp.asarray(bbox_regression)
  anchors = jnp.asarray(anchors)
  if cls_logits.ndim != 3:
    raise ValueError(f'cls_logits must be [B, N, C], got {cls_logits.shape}')
  batch, num_anchors, _ = cls_logits.shape
  if bbox_regression.shape != (batch, num_anchors, 4):
    raise ValueError(f'bbox_regression must be [{batch}, {num_anchors}, 4] to '
                     f'match cls_logits {cls_logits.shape}, got '
                     f'{bbox_regression.shape}')
  if anchors.shape != (num_anchors, 4):
    raise ValueError(f'anchors must be [{num_anchors}, 4], got '
                     f'{anchors.shape}')
  level_sizes = tuple(_check_count(n, 'each level size') for n in level_sizes)
  if sum(level_sizes) != num_anchors:
    raise ValueError(f'level sizes {level_sizes} add up to {sum(level_sizes)}, '
                     f'not to the {num_anchors} anchors')
  if not jnp.issubdtype(cls_logits.dtype, jnp.floating):
    raise ValueError(f'cls_logits must be floats, got {cls_logits.dtype}')
  if cls_logits.dtype not in (jnp.float32, jnp.float64):
    cls_logits = cls_logits.astype(jnp.float32)
  if bbox_regression.dtype not in (jnp.float32, jnp.float64):
    bbox_regression = bbox_regression.astype(jnp.float32)
  return _postprocess(
      cls_logits, bbox_regression, anchors, _image_sizes(image_size, batch),
      level_sizes=level_sizes, score_thresh=float(score_thresh),
      nms_thresh=float(nms_thresh),
      detections_per_img=_check_count(detections_per_img,
                                      'detections_per_img'),
      topk_candidates=_check_count(topk_candidates, 'topk_candidates'))


def rescale_boxes(boxes: jax.Array, resized_size, original_size) -> jax.Array:
  """Boxes in a resized image's pixels mapped to the original image's pixels.

  As torchvision's transform.resize_boxes(boxes, resized_size,
  original_size): x coordinates are multiplied by original width / resized
  width and y coordinates by original height / resized height, the ratios
  computed in float32.

  Args:
    boxes: [..., D, 4] boxes (x1, y1, x2, y2); zero padding stays zero.
    resized_size: (height, width) of the image the boxes are in, or a
      [..., 2] array of one per image (the leading axes of `boxes` but the
      last two).
    original_size: (height, width) to map to, likewise.

  Returns:
    The rescaled boxes, with the shape of `boxes`, float32 or wider.
  """
  boxes = jnp.asarray(boxes)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f'boxes must be [..., 4], got shape {boxes.shape}')
  if boxes.dtype not in (jnp.float32, jnp.float64):
    boxes = boxes.astype(jnp.float32)
  resized = jnp.asarray(resized_size, jnp.float32)
  original = jnp.asarray(original_size, jnp.float32)
  for name, size in (('resized_size', resized), ('original_size', original)):
    if size.ndim < 1 or size.shape[-1] != 2:
      raise ValueError(f'{name} must be (height, width) or [..., 2], got '
                       f'shape {size.shape}')
  ratio = original / resized
  ratio_h = ratio[..., 0, None].astype(boxes.dtype)
  ratio_w = ratio[..., 1, None].astype(boxes.dtype)
  return jnp.stack([boxes[..., 0] * ratio_w, boxes[..., 1] * ratio_h,
                    boxes[..., 2] * ratio_w, boxes[..., 3] * ratio_h], axis=-1)
