"""COCO box mAP against pycocotools used through its JSON files."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from jaxperf.metrics import coco as M

CATEGORY_IDS = (3, 7, 11)
IMAGE_IDS = (10, 20, 30, 40)


def ground_truth():
  """4 images, 3 categories (non-contiguous ids), objects of all areas."""
  rng = np.random.default_rng(0)
  images = [{'id': i, 'width': 640, 'height': 480} for i in IMAGE_IDS]
  annotations = []
  for image in IMAGE_IDS:
    for _ in range(rng.integers(2, 6)):
      w, h = rng.choice([12.0, 50.0, 150.0]) * rng.uniform(0.7, 1.3, 2)
      x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image,
          'category_id': int(rng.choice(CATEGORY_IDS)),
          'bbox': [float(x), float(y), float(w), float(h)],
          'area': float(w * h), 'iscrowd': 0})
  annotations[-1]['iscrowd'] = 1  # A crowd region, which COCOeval ignores.
  categories = [{'id': c, 'name': f'c{c}'} for c in CATEGORY_IDS]
  return {'images': images, 'annotations': annotations,
          'categories': categories}


def padded_detections(gt, slots=8, seed=1):
  """Per-image padded arrays: jittered hits, wrong classes, false positives.

  Some ground truths are missed, boxes overlap their objects by varying IoUs
  and the padding slots hold garbage, which must be dropped.
  """
  rng = np.random.default_rng(seed)
  index = {c: i for i, c in enumerate(CATEGORY_IDS)}
  boxes = rng.uniform(-50, 700, (len(IMAGE_IDS), slots, 4)).astype(np.float32)
  scores = rng.random((len(IMAGE_IDS), slots)).astype(np.float32)
  labels = rng.integers(-5, 50, (len(IMAGE_IDS), slots)).astype(np.int32)
  valid = np.zeros((len(IMAGE_IDS), slots), bool)
  count = [0] * len(IMAGE_IDS)

  def add(image, box, label):
    i = IMAGE_IDS.index(image)
    s = count[i]
    boxes[i, s], labels[i, s], valid[i, s] = box, label, True
    count[i] += 1

  for ann in gt['annotations']:
    if rng.random() < 0.2:
      continue  # Missed.
    x, y, w, h = ann['bbox']
    jitter = rng.normal(0, rng.choice([0.02, 0.1, 0.25]), 4) * [w, h, w, h]
    box = np.array([x, y, x + w, y + h]) + jitter
    label = index[ann['category_id']]
    if rng.random() < 0.15:
      label = (label + 1) % len(CATEGORY_IDS)
    add(ann['image_id'], box, label)
  for image in IMAGE_IDS:  # False positives.
    for _ in range(rng.integers(0, 3)):
      x, y = rng.uniform(0, 500), rng.uniform(0, 400)
      add(image, (x, y, x + rng.uniform(5, 100), y + rng.uniform(5, 80)),
          rng.integers(0, len(CATEGORY_IDS)))
  assert max(count) <= slots
  return IMAGE_IDS, boxes, scores, labels, valid


def pycocotools_stats(tmp_path, gt, results, image_ids=None):
  """COCOeval.stats with ground truth and results read from JSON files."""
  gt_file, res_file = tmp_path / 'gt.json', tmp_path / 'res.json'
  gt_file.write_text(json.dumps(gt))
  res_file.write_text(json.dumps(results))
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(str(gt_file))
    evaluator = COCOeval(coco, coco.loadRes(str(res_file)), iouType='bbox')
    if image_ids is not None:
      evaluator.params.imgIds = list(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return evaluator.stats


def results_json(image_ids, boxes, scores, labels, valid):
  """The detections as COCO result dicts, written out one by one."""
  results = []
  for i, image in enumerate(image_ids):
    for s in range(boxes.shape[1]):
      if valid[i, s]:
        x1, y1, x2, y2 = (float(v) for v in boxes[i, s])
        results.append({'image_id': image,
                        'category_id': CATEGORY_IDS[labels[i, s]],
                        'bbox': [x1, y1, x2 - x1, y2 - y1],
                        'score': float(scores[i, s])})
  return results


def test_perfect_detections_score_one():
  gt = ground_truth()
  rows = [(a['image_id'], *a['bbox'], 1.0, a['category_id'])
          for a in gt['annotations']]
  stats = M.coco_box_map(gt, np.array(rows))
  assert stats['mAP'] == 1.0 and stats['AP50'] == 1.0
  assert stats['AR100'] == 1.0
  assert list(stats) == list(M.STAT_NAMES)


def test_matches_pycocotools_json_path(tmp_path):
  gt = ground_truth()
  original = json.dumps(gt)
  image_ids, boxes, scores, labels, valid = padded_detections(gt)
  rows = M.detections_to_coco(image_ids, boxes, scores, labels, valid,
                              CATEGORY_IDS)
  ours = M.coco_box_map(gt, rows)
  want = pycocotools_stats(
      tmp_path, gt, results_json(image_ids, boxes, scores, labels, valid))
  assert [ours[k] for k in M.STAT_NAMES] == list(want)
  assert 0.2 < ours['mAP'] < 0.9 and ours['APs'] >= 0
  assert json.dumps(gt) == original  # The ground truth is left as it was.
  # The same results as dicts, and on a subset of the images.
  dicts = results_json(image_ids, boxes, scores, labels, valid)
  assert M.coco_box_map(gt, dicts) == ours
  subset = M.coco_box_map(gt, rows, image_ids=[20, 10])
  want = pycocotools_stats(tmp_path, gt, dicts, image_ids=[10, 20])
  assert [subset[k] for k in M.STAT_NAMES] == list(want)


def test_no_detections(tmp_path):
  gt = ground_truth()
  for empty in (np.zeros((0, 7)), []):
    stats = M.coco_box_map(gt, empty)
    assert stats['mAP'] == 0.0 and stats['AR100'] == 0.0
  # What COCOeval gives for an empty result set (no area range lacks
  # objects here, so nothing is -1).
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = json.loads(json.dumps(gt))
    coco.createIndex()
    evaluator = COCOeval(coco, COCO(), iouType='bbox')
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  assert [stats[k] for k in M.STAT_NAMES] == list(evaluator.stats) == [0.0] * 12


def test_detections_to_coco_drops_padding_and_maps_categories():
  boxes = np.array([[[1, 2, 11, 22], [0, 0, 0, 0], [5, 5, 6, 7]],
                    [[9, 9, 9, 9], [3, 4, 8, 8], [0, 0, 0, 0]]], np.float32)
  scores = np.array([[0.9, 0.0, 0.5], [0.7, 0.6, 0.0]], np.float32)
  labels = np.array([[2, 0, 0], [1, 1, 0]])
  valid = np.array([[True, False, True], [False, True, False]])
  rows = M.detections_to_coco([5, 6], boxes, scores, labels, valid,
                              CATEGORY_IDS)
  assert rows.dtype == np.float64
  np.testing.assert_allclose(rows, [
      [5, 1, 2, 10, 20, 0.9, 11],
      [5, 5, 5, 1, 2, 0.5, 3],
      [6, 3, 4, 5, 4, 0.6, 7]], rtol=1e-7)
  empty = M.detections_to_coco([5, 6], boxes, scores, labels,
                               np.zeros_like(valid), CATEGORY_IDS)
  assert empty.shape == (0, 7)
  with pytest.raises(ValueError, match='labels'):
    M.detections_to_coco([5, 6], boxes, scores, labels + 2, valid,
                         CATEGORY_IDS)
