"""COCO-style box mAP (RetinaNet; MLPerf target mAP 0.34 on OpenImages).

The evaluation is pycocotools' COCOeval with iouType 'bbox' and its default
parameters, as in the MLPerf reference: mAP averaged over IoU thresholds
0.50:0.05:0.95 and over the categories, with at most 100 detections per image
and category counted (maxDets 1, 10, 100), while the model hands over up to
300 detections per image. The ground truth is a COCO-format dict (images,
annotations with xywh boxes, categories) held in memory, and detections are
the rows (image_id, x, y, w, h, score, category_id) that
`detections_to_coco` builds from the padded per-image arrays of the
post-processing, in the original images' pixels.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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
  out = io.StringIO()
  with contextlib.ExitStack() as stack:
    if not verbose:
      stack.enter_context(contextlib.redirect_stdout(out))
    gt = _ground_truth(coco_gt)
    res = _results(gt, detections)
    evaluator = COCOeval(gt, res, iouType='bbox')
    if image_ids is not None:
      evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats)}
