"""COCO-style box and mask mAP (RetinaNet: box mAP 0.34 on OpenImages;
Mask R-CNN: box 0.377 and mask 0.339 on COCO val2017).

The evaluation is pycocotools' COCOeval with iouType 'bbox' and its default
parameters, as in the MLPerf reference: mAP averaged over IoU thresholds
0.50:0.05:0.95 and over the categories, with at most 100 detections per image
and category counted (maxDets 1, 10, 100), while the model hands over up to
300 detections per image. The ground truth is a COCO-format dict (images,
annotations with xywh boxes, categories) held in memory, and detections are
the rows (image_id, x, y, w, h, score, category_id) that
`detections_to_coco` builds from the padded per-image arrays of the
post-processing, in the original images' pixels. Mask mAP (`coco_segm_map`)
is COCOeval with iouType 'segm' on RLE results of masks pasted into the
original images (`paste_masks`).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# The names of COCOeval.stats, in its order.
STAT_NAMES = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
              'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


def detections_to_coco(image_ids: Any, boxes_xyxy: Any, scores: Any,
                       labels: Any, valid: Any,
                       category_ids: Sequence[int]) -> np.ndarray:
  """Padded per-image detections as COCO result rows, [K, 7] float64.

  Args:
    image_ids: [B] COCO image ids of the images.
    boxes_xyxy: [B, D, 4] boxes (x1, y1, x2, y2) in the original images'
      pixels.
    scores: [B, D] scores.
    labels: [B, D] contiguous class indices into `category_ids`.
    valid: [B, D] bool, False for padding slots, which are dropped.
    category_ids: the COCO category id of each contiguous class index.

  Returns:
    One row (image_id, x, y, w, h, score, category_id) per valid detection,
    image by image and slot by slot, with w = x2 - x1 and h = y2 - y1
    computed in float64. The input to `coco_box_map`.
  """
  boxes = np.asarray(boxes_xyxy, np.float64)
  if boxes.ndim != 3 or boxes.shape[-1] != 4:
    raise ValueError(f'boxes_xyxy must be [B, D, 4], got {boxes.shape}')
  shape = boxes.shape[:2]
  image_ids = np.asarray(image_ids)
  if image_ids.shape != shape[:1]:
    raise ValueError(f'image_ids must be [{shape[0]}], got {image_ids.shape}')
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  valid = np.asarray(valid, bool)
  for name, x in (('scores', scores), ('labels', labels), ('valid', valid)):
    if x.shape != shape:
      raise ValueError(f'{name} must be {list(shape)} to match boxes_xyxy, '
                       f'got {x.shape}')
  category_ids = np.asarray(category_ids, np.int64)
  labels = labels[valid].astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= len(category_ids)):
    raise ValueError(f'labels must lie in [0, {len(category_ids)}), the '
                     f'indices of category_ids; got {labels.min()} to '
                     f'{labels.max()}')
  boxes = boxes[valid]
  return np.stack([
      np.broadcast_to(image_ids[:, None], shape)[valid].astype(np.float64),
      boxes[:, 0], boxes[:, 1],
      boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1],
      scores[valid], category_ids[labels].astype(np.float64)], axis=1)


def _ground_truth(coco_gt: Mapping[str, Any] | COCO) -> COCO:
  """A COCO object of the ground truth, which COCOeval may modify."""
  if isinstance(coco_gt, COCO):
    dataset = coco_gt.dataset
  else:
    dataset = coco_gt
  # COCOeval writes an 'ignore' field into the annotations it evaluates.
  dataset = dict(dataset)
  dataset['annotations'] = [dict(a) for a in dataset.get('annotations', [])]
  gt = COCO()
  gt.dataset = dataset
  gt.createIndex()
  return gt


def _results(gt: COCO, detections: Any) -> COCO:
  """A COCO object of the detections, as gt.loadRes makes it."""
  if not (isinstance(detections, (list, tuple)) and
          all(isinstance(a, Mapping) for a in detections)):
    rows = np.asarray(detections, np.float64)
    if rows.size == 0:
      rows = rows.reshape(0, 7)
    if rows.ndim != 2 or rows.shape[1] != 7:
      raise ValueError('detections must be [K, 7] rows (image_id, x, y, w, h, '
                       f'score, category_id), got shape {rows.shape}')
    anns = [{'image_id': int(r[0]), 'bbox': r[1:5], 'score': r[5],
             'category_id': int(r[6])} for r in rows.tolist()]
  else:
    # loadRes adds fields to the dicts it is given.
    anns = [dict(a) for a in detections]
  if anns:
    return gt.loadRes(anns)
  # loadRes cannot take an empty list; an empty result set evaluates as
  # COCOeval does any image without detections.
  res = COCO()
  res.dataset = {'images': list(gt.dataset.get('images', [])),
                 'categories': list(gt.dataset.get('categories', [])),
                 'annotations': []}
  res.createIndex()
  return res


def coco_box_map(coco_gt: Mapping[str, Any] | COCO, detections: Any, *,
                 image_ids: Sequence[int] | None = None,
                 verbose: bool = False) -> dict[str, float]:
  """COCO box AP and AR of detections, as pycocotools' COCOeval computes them.

  Args:
    coco_gt: the ground truth as a COCO-format dict ('images', 'annotations'
      with 'bbox' [x, y, w, h], 'area', 'iscrowd', 'category_id',
      'image_id', 'id', and 'categories'), or a pycocotools COCO object. It
      is not modified.
    detections: [K, 7] rows (image_id, x, y, w, h, score, category_id), as
      `detections_to_coco` returns them, or a list of COCO result dicts
      ('image_id', 'category_id', 'bbox' [x, y, w, h], 'score'). Image ids
      must be ids of `coco_gt`'s images.
    image_ids: the images evaluated; all of `coco_gt`'s images when None.
      Images without detections count as such.
    verbose: print pycocotools' progress and summary (otherwise silenced).

  Returns:
    The 12 COCOeval.stats as floats, keyed by `STAT_NAMES`: 'mAP'
    (AP at IoU 0.50:0.95), 'AP50', 'AP75', 'APs', 'APm', 'APl' (small,
    medium, large objects) and 'AR1', 'AR10', 'AR100' (recall with at most
    1, 10, 100 detections per image), 'ARs', 'ARm', 'ARl'. As in COCOeval, a
    value without any ground truth to average over (an area range without
    objects, or no annotations at all) is -1.0. With no detections every
    value with ground truth is 0.0 (pycocotools' loadRes rejects an empty
    result list, so an empty result set is evaluated instead), and -1.0
    stays -1.0.
  """
  return _coco_eval(coco_gt, detections, 'bbox', image_ids, verbose)


def coco_segm_map(coco_gt: Mapping[str, Any] | COCO,
                  results: Sequence[Mapping[str, Any]], *,
                  image_ids: Sequence[int] | None = None,
                  verbose: bool = False) -> dict[str, float]:
  """COCO mask AP and AR of instance masks, as pycocotools' COCOeval
  computes them with iouType='segm'.

  Args:
    coco_gt: the ground truth, as for `coco_box_map`, with each
      annotation's 'segmentation' (polygons or RLE).
    results: COCO result dicts ('image_id', 'category_id', 'segmentation'
      as RLE with str or bytes 'counts', 'score'), e.g. from
      jaxperf.data.coco.CocoDataset.to_coco_segm_results.
    image_ids: the images evaluated; all of `coco_gt`'s images when None.
    verbose: print pycocotools' progress and summary.

  Returns:
    The 12 COCOeval.stats keyed by `STAT_NAMES`, as `coco_box_map`.
  """
  if not (isinstance(results, (list, tuple)) and
          all(isinstance(a, Mapping) and 'segmentation' in a
              for a in results)):
    raise ValueError('results must be a list of COCO result dicts with a '
                     "'segmentation' each")
  return _coco_eval(coco_gt, results, 'segm', image_ids, verbose)


def _coco_eval(coco_gt, detections, iou_type: str,
               image_ids: Sequence[int] | None, verbose: bool
               ) -> dict[str, float]:
  out = io.StringIO()
  with contextlib.ExitStack() as stack:
    if not verbose:
      stack.enter_context(contextlib.redirect_stdout(out))
    gt = _ground_truth(coco_gt)
    res = _results(gt, detections)
    evaluator = COCOeval(gt, res, iouType=iou_type)
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}


# ---------------------------------------------------------------------------
# Masks for segm evaluation: pasting into images and RLE encoding.


def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32 weights of PyTorch's bilinear resize along an axis
  (align_corners=False)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5))
  src = np.maximum(src - np.float32(0.5), np.float32(0))
  low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  frac = (src - low.astype(np.float32)).astype(np.float32)
  high = low + (low < in_size - 1)
  weights = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, low), np.float32(1) - frac)
  np.add.at(weights, (rows, high), frac)
  return weights


def paste_masks(masks, boxes, image_size: Sequence[int], *,
                threshold: float | None = 0.5, padding: int = 1
                ) -> np.ndarray:
  """Masks [D, M, M] pasted into images, as the reference's Masker.

  For each detection, its mask is padded by `padding` empty pixels, its box
  scaled about its centre by (M + 2 padding) / M and truncated to integer
  pixels, the padded mask resized (bilinear, PyTorch's align_corners=False)
  to the box's x2 - x1 + 1 by y2 - y1 + 1 pixels, binarised (> threshold)
  and written into an empty image where it overlaps it
  (paste_mask_in_image; torchvision's paste_masks_in_image does the same
  without the threshold). Runs on the host, in numpy, on the output of
  jaxperf.models.layers.mask_probabilities.

  Args:
    masks: [D, M, M] mask probabilities.
    boxes: [D, 4] the detections' boxes in the target image's pixels (the
      reference pastes into the original image, with boxes mapped back by
      jaxperf.models.layers.rescale_boxes).
    image_size: (height, width) of the target image.
    threshold: MODEL.ROI_MASK_HEAD.POSTPROCESS_MASKS_THRESHOLD; None
      returns the resized probabilities.
    padding: the Masker's padding.

  Returns:
    [D, height, width]: bool masks, or float32 probabilities when
    `threshold` is None.
  """
  masks = np.asarray(masks, np.float32)
  boxes = np.asarray(boxes, np.float32)
  if masks.ndim != 3 or boxes.shape != (masks.shape[0], 4):
    raise ValueError(f'masks must be [D, M, M] and boxes [D, 4], got '
                     f'{masks.shape} and {boxes.shape}')
  im_h, im_w = (int(v) for v in image_size)
  d, mh, mw = masks.shape
  out = np.zeros((d, im_h, im_w),
                 np.float32 if threshold is None else bool)
  if d == 0:
    return out
  padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
  scale = np.float32(float(mw + 2 * padding) / mw)
  w_half = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
  h_half = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
  x_c = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
  y_c = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
  expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half,
                       y_c + h_half], axis=1)
  expanded = np.trunc(expanded).astype(np.int64)
  for n in range(d):
    x0, y0, x1, y1 = (int(v) for v in expanded[n])
    w = max(x1 - x0 + 1, 1)
    h = max(y1 - y0 + 1, 1)
    left, right = max(x0, 0), min(x1 + 1, im_w)
    top, bottom = max(y0, 0), min(y1 + 1, im_h)
    if left >= right or top >= bottom:
      continue
    wy = _resize_weights(padded.shape[1], h)[top - y0:bottom - y0]
    wx = _resize_weights(padded.shape[2], w)[left - x0:right - x0]
    resized = wy @ padded[n] @ wx.T
    if threshold is not None:
      resized = resized > threshold
    out[n, top:bottom, left:right] = resized
  return out


def masks_to_rle(masks) -> list[dict]:
  """COCO run-length encodings of binary masks [D, H, W] (pycocotools),
  with 'counts' as str, ready for a results JSON and COCOeval 'segm'."""
  masks = np.asarray(masks)
  if masks.ndim != 3:
    raise ValueError(f'masks must be [D, H, W], got {masks.shape}')
  rles = []
  for mask in masks:
    rle = mask_util.encode(np.asfortranarray(mask[:, :, None],
                                             dtype=np.uint8))[0]
    rle['counts'] = rle['counts'].decode('utf-8')
    rles.append(rle)
  return rles
