"""Box areas, pairwise IoU and greedy non-maximum suppression.

Boxes are (x1, y1, x2, y2) arrays in their last axis, as in torchvision. The
functions follow torchvision.ops (box_area, box_iou, nms, batched_nms) down to
the floating-point arithmetic, so that kept indices are identical, but work on
static shapes: NMS returns a fixed number of indices padded with -1 and the
number of valid ones, can ignore padding boxes through a `valid` mask, and runs
under jax.jit and jax.vmap (one call per image, vmapped over a batch).

Zero-area boxes keep torchvision's arithmetic: the IoU of two of them is
0 / 0 = nan, and NMS never suppresses on a nan IoU (nan > t is false).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def _upcast(x: jax.Array) -> jax.Array:
  """Floats narrower than float32 to float32, small integers to int32."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    if x.dtype in (jnp.float32, jnp.float64):
      return x
    return x.astype(jnp.float32)
  if x.dtype in (jnp.int32, jnp.int64):
    return x
  return x.astype(jnp.int32)


def _check_boxes(boxes, name: str, ndim: int | None = None) -> jax.Array:
  boxes = jnp.asarray(boxes)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f'{name} must have 4 coordinates (x1, y1, x2, y2) in its '
                     f'last axis, got shape {boxes.shape}')
  if ndim is not None and boxes.ndim != ndim:
    raise ValueError(f'{name} must have shape [N, 4], got {boxes.shape}')
  return boxes


def box_area(boxes: jax.Array) -> jax.Array:
  """Areas (x2 - x1) * (y2 - y1) of boxes [..., 4], shape [...].

  Inverted boxes (x2 < x1 or y2 < y1) get a negative or zero area, as in
  torchvision; floats narrower than float32 are computed in float32 and
  small integers in int32.
  """
  boxes = _upcast(_check_boxes(boxes, 'boxes'))
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """Pairwise intersection over union of boxes1 [..., N, 4], boxes2 [..., M, 4].

  Returns [..., N, M] (leading axes broadcast). The union is
  area1 + area2 - intersection without any guard, so two zero-area boxes give
  nan, like torchvision.ops.box_iou. Integer boxes give float32 IoUs.
  """
  boxes1 = _check_boxes(boxes1, 'boxes1')
  boxes2 = _check_boxes(boxes2, 'boxes2')
  if boxes1.ndim < 2 or boxes2.ndim < 2:
    raise ValueError('boxes1 and boxes2 must have shape [..., N, 4], got '
                     f'{boxes1.shape} and {boxes2.shape}')
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(_upcast(rb - lt), 0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1[..., :, None] + area2[..., None, :] - inter
  if not jnp.issubdtype(inter.dtype, jnp.floating):
    inter = inter.astype(jnp.float32)
    union = union.astype(jnp.float32)
  return inter / union


def _threshold(iou_threshold, dtype) -> jax.Array:
  """The threshold t' in `dtype` with iou > t' exactly when iou > t.

  torchvision compares float IoUs with the threshold as a double. For a
  concrete threshold that is the same as comparing with the largest value of
  `dtype` not above it (0.3 rounds up in float32, so it is taken one step
  down). A traced threshold is simply cast to `dtype`.
  """
  if isinstance(iou_threshold, jax.core.Tracer):
    return jnp.asarray(iou_threshold).astype(dtype)
  t = np.asarray(iou_threshold)
  if t.shape:
    raise ValueError(f'iou_threshold must be a scalar, got shape {t.shape}')
  t = float(t)
  low = np.asarray(t, dtype=dtype)
  if float(low) > t:
    low = np.nextafter(low, np.asarray(-np.inf, dtype=dtype))
  return jnp.asarray(low, dtype=dtype)


def _check_max_outputs(max_outputs) -> int:
  if (isinstance(max_outputs, bool) or
      not isinstance(max_outputs, numbers.Integral) or max_outputs < 1):
    raise ValueError(f'max_outputs must be an int >= 1, got {max_outputs!r}')
  return int(max_outputs)


def _check_per_box(x, name: str, n: int, boxes_shape) -> jax.Array:
  x = jnp.asarray(x)
  if x.shape != (n,):
    raise ValueError(f'{name} must have shape [{n}] to match boxes of shape '
                     f'{tuple(boxes_shape)}, got {x.shape}')
  return x


@functools.partial(jax.jit, static_argnames=('max_outputs',))
def _greedy_nms(boxes, scores, classes, valid, threshold, max_outputs):
  """Greedy NMS on checked inputs; classes and valid may be None."""
  order = jnp.argsort(scores, descending=True, stable=True)
  x1, y1, x2, y2 = (boxes[order, k] for k in range(4))
  area = (x2 - x1) * (y2 - y1)
  cls = None if classes is None else classes[order]
  alive = (jnp.ones(order.shape, bool) if valid is None
           else valid.astype(bool)[order])

  # Each step keeps the first candidate still alive in score order and
  # suppresses every later one whose IoU with it exceeds the threshold; the
  # loop ends when none is alive or max_outputs are kept.
  def body(state):
    count, i, _, alive, keep = state
    w = jnp.maximum(0, jnp.minimum(x2[i], x2) - jnp.maximum(x1[i], x1))
    h = jnp.maximum(0, jnp.minimum(y2[i], y2) - jnp.maximum(y1[i], y1))
    inter = w * h
    hit = inter / (area[i] + area - inter) > threshold
    if cls is not None:
      hit &= cls == cls[i]
    alive = alive & ~hit
    alive = alive.at[i].set(False)
    keep = keep.at[count].set(order[i].astype(jnp.int32))
    nxt = jnp.argmax(alive)
    return count + 1, nxt, alive[nxt], alive, keep

  def cond(state):
    count, _, has_next, _, _ = state
    return has_next & (count < max_outputs)

  first = jnp.argmax(alive)
  keep = jnp.full((max_outputs,), -1, jnp.int32)
  state = (jnp.int32(0), first, alive[first], alive, keep)
  count, _, _, _, keep = jax.lax.while_loop(cond, body, state)
  return keep, count


def _nms(boxes, scores, classes, iou_threshold, max_outputs, valid):
  boxes = _check_boxes(boxes, 'boxes', ndim=2)
  n = boxes.shape[0]
  scores = _check_per_box(scores, 'scores', n, boxes.shape)
  if classes is not None:
    classes = _check_per_box(classes, 'classes', n, boxes.shape)
  if valid is not None:
    valid = _check_per_box(valid, 'valid', n, boxes.shape)
  max_outputs = _check_max_outputs(max_outputs)
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  boxes = _upcast(boxes)
  threshold = _threshold(iou_threshold, boxes.dtype)
  if n == 0:
    return jnp.full((max_outputs,), -1, jnp.int32), jnp.int32(0)
  return _greedy_nms(boxes, scores, classes, valid, threshold, max_outputs)


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float,
        max_outputs: int, *,
        valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Greedy non-maximum suppression, as torchvision.ops.nms.

  Boxes are visited in descending score order (a stable sort: equal scores
  in index order); a box is kept unless its IoU with an already kept box is
  strictly greater than `iou_threshold`.

  Args:
    boxes: [N, 4] boxes (x1, y1, x2, y2).
    scores: [N] scores.
    iou_threshold: boxes overlapping a kept box by more than this are dropped.
    max_outputs: static number of indices returned; at most this many boxes
      are kept (the first ones torchvision would return).
    valid: optional [N] bool mask; boxes where it is False are never kept and
      suppress nothing (padding).

  Returns:
    (indices, num_valid): int32 [max_outputs] indices into `boxes` of the kept
    boxes in descending score order, padded with -1 after the first
    `num_valid` (an int32 scalar).
  """
  return _nms(boxes, scores, None, iou_threshold, max_outputs, valid)


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array,
                iou_threshold: float, max_outputs: int, *,
                valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Non-maximum suppression within each class, as torchvision's batched_nms.

  Like `nms`, except that a box only suppresses boxes of its own class
  (`classes`, [N]). The result is each class's NMS merged in descending score
  order (equal scores in index order), truncated at `max_outputs`.

  Boxes of different classes are kept apart exactly, by comparing classes.
  torchvision instead shifts each class's boxes by class * (max coordinate +
  1) for up to 1000 boxes on CPU (25000 on GPU); the two agree except where
  the shift changes an IoU's float rounding across the threshold, or where
  coordinates below -1 let shifted classes overlap (torchvision then
  suppresses across classes; this function does not). For more boxes
  torchvision runs NMS class by class, as here, but orders the result with an
  unstable sort, so boxes of equal score may come in another order.

  Returns:
    (indices, num_valid) as for `nms`.
  """
  if classes is None:
    raise ValueError('classes must be an [N] array, got None')
  return _nms(boxes, scores, classes, iou_threshold, max_outputs, valid)
