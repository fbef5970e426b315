"""COCO 2017 for Mask R-CNN: resize, targets, buckets, order, errors, masks
and the synthetic source."""

from __future__ import annotations

import contextlib
import io
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.transforms import functional as F

from jaxperf.data import coco
from jaxperf.errors import ConfigError, DataError
from tests.batches import assert_batches_equal, take

MIN_SIZE, MAX_SIZE = 32, 53          # buckets 32x64 and 64x32
M = 16                               # mask crops of the tiny set
# Listed out of id order: labels follow this order (11 -> 1, 3 -> 2, 7 -> 3).
CATEGORIES = [{'id': 11, 'name': 'c'}, {'id': 3, 'name': 'a'},
              {'id': 7, 'name': 'b'}]
LABEL_OF = {11: 1, 3: 2, 7: 3}
SEED = 5

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation.
pytestmark = pytest.mark.filterwarnings(
    'ignore:__array__ implementation:DeprecationWarning')


# ---------------------------------------------------------------- reference


def reference_get_size(image_size, min_size, max_size):
  """maskrcnn-benchmark's Resize.get_size, transcribed."""
  w, h = image_size
  size = min_size
  if max_size is not None:
    min_original_size = float(min((w, h)))
    max_original_size = float(max((w, h)))
    if max_original_size / min_original_size * size > max_size:
      size = int(round(max_size * min_original_size / max_original_size))
  if (w <= h and w == size) or (h <= w and h == size):
    return (h, w)
  if w < h:
    ow = size
    oh = int(size * h / w)
  else:
    oh = size
    ow = int(size * w / h)
  return (oh, ow)


def reference_has_valid_annotation(anno):
  """maskrcnn-benchmark's has_valid_annotation, transcribed."""
  if len(anno) == 0:
    return False
  if all(any(o <= 1 for o in obj['bbox'][2:]) for obj in anno):
    return False
  if 'keypoints' not in anno[0]:
    return True
  return sum(sum(1 for v in ann['keypoints'][2::3] if v > 0)
             for ann in anno) >= 10


def reference_targets(anno, image_size, new_size, flip):
  """BoxList: xywh -> xyxy, clip_to_image(remove_empty), resize, transpose
  (torch, transcribed); returns (boxes, kept annotations)."""
  anno = [obj for obj in anno if obj['iscrowd'] == 0]
  w, h = image_size
  bbox = torch.as_tensor([obj['bbox'] for obj in anno],
                         dtype=torch.float32).reshape(-1, 4)
  xmin, ymin, bw, bh = bbox.split(1, dim=-1)
  bbox = torch.cat((xmin, ymin, xmin + (bw - 1).clamp(min=0),
                    ymin + (bh - 1).clamp(min=0)), dim=-1)
  bbox[:, 0].clamp_(min=0, max=w - 1)
  bbox[:, 1].clamp_(min=0, max=h - 1)
  bbox[:, 2].clamp_(min=0, max=w - 1)
  bbox[:, 3].clamp_(min=0, max=h - 1)
  keep = (bbox[:, 3] > bbox[:, 1]) & (bbox[:, 2] > bbox[:, 0])
  bbox = bbox[keep]
  anno = [a for a, k in zip(anno, keep.tolist()) if k]
  ratios = tuple(float(s) / float(s0) for s, s0 in zip(new_size, (w, h)))
  xmin, ymin, xmax, ymax = bbox.split(1, dim=-1)
  bbox = torch.cat((xmin * ratios[0], ymin * ratios[1], xmax * ratios[0],
                    ymax * ratios[1]), dim=-1)
  if flip:
    xmin, ymin, xmax, ymax = bbox.split(1, dim=-1)
    bbox = torch.cat((new_size[0] - xmax - 1, ymin, new_size[0] - xmin - 1,
                      ymax), dim=-1)
  return bbox.numpy(), anno


# ---------------------------------------------------------------- fixtures


def _pixels(rng, h, w):
  yy, xx = np.mgrid[0:h, 0:w]
  base = rng.uniform(40, 200, 3)
  ramp = rng.uniform(-1, 1, (2, 3))
  image = (base + xx[..., None] * ramp[0] + yy[..., None] * ramp[1]
           + rng.normal(0, 4, (h, w, 3)))
  return np.clip(image, 0, 255).astype(np.uint8)


def _rect(x, y, w, h):
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _ann(ann_id, image_id, bbox, category=3, crowd=0, segmentation=None):
  x, y, w, h = bbox
  return {'id': ann_id, 'image_id': image_id, 'category_id': category,
          'bbox': list(bbox), 'area': float(w * h), 'iscrowd': crowd,
          'segmentation': segmentation if segmentation is not None else
                          _rect(x, y, w, h)}


def _train_spec():
  """(images, annotations) of the training split: sizes in both
  orientations; image 9 has no annotations, 8 only boxes <= 1 pixel wide,
  7 only a crowd annotation (kept, no targets); crowd and empty boxes
  elsewhere."""
  rng = np.random.default_rng(0)
  sizes = {1: (30, 40), 2: (40, 30), 3: (36, 36), 4: (25, 60), 5: (33, 47),
           6: (45, 28), 7: (30, 40), 8: (30, 40), 9: (30, 40), 10: (28, 50),
           11: (50, 34), 12: (31, 41)}
  images = [{'id': i, 'file_name': f'{i:012d}.jpg',
             'image': _pixels(rng, *sizes[i])} for i in (3, 1, 12, 2, 5, 4,
                                                          11, 10, 6, 9, 8, 7)]
  anns = []

  def add(*a, **k):
    anns.append(_ann(100 + len(anns), *a, **k))

  add(1, (4.5, 3.25, 20.0, 12.5), 11)
  add(1, (0.0, 0.0, 40.0, 30.0), 7, crowd=1,
      segmentation={'size': [30, 40], 'counts': [0, 1200]})
  add(1, (30.0, 20.0, 1.0, 5.0), 3)                     # empty once legacy
  add(2, (2.0, 5.0, 25.0, 30.0), 3)
  add(2, (10.0, 10.0, 8.0, 8.0), 7,
      segmentation=[[10, 10, 18, 10, 14, 18], [1, 1, 2, 2]])  # + a short one
  add(3, (0.0, 0.0, 36.0, 36.0), 7)
  add(3, (5.5, 6.0, 10.0, 3.0), 11)
  add(4, (40.0, 2.0, 20.0, 20.0), 3)
  add(4, (1.0, 1.0, 10.0, 5.0), 3,
      segmentation={'size': [25, 60], 'counts': _rle_counts(25, 60, 1, 1,
                                                            10, 5)})
  add(5, (3.0, 4.0, 40.0, 25.0), 11)
  add(6, (2.0, 2.0, 20.0, 40.0), 7)
  add(7, (2.0, 2.0, 20.0, 20.0), 3, crowd=1,
      segmentation={'size': [30, 40], 'counts': [0, 1200]})
  add(8, (2.0, 2.0, 1.0, 20.0), 3)
  add(8, (5.0, 2.0, 20.0, 0.5), 7)
  add(10, (5.0, 5.0, 30.0, 15.0), 11)
  add(10, (6.0, 6.0, 3.0, 3.0), 3)
  add(11, (3.0, 3.0, 20.0, 30.0), 7)
  add(12, (40.5, 0.0, 0.5, 30.0), 3)     # reaches the edge: legacy x2 < x1?
  add(12, (1.0, 1.0, 30.0, 20.0), 11)
  return images, anns


def _rle_counts(h, w, x, y, bw, bh):
  """Uncompressed RLE (column-major) of the rectangle [x, x+bw) x [y, y+bh)."""
  m = np.zeros((h, w), np.uint8)
  m[y:y + bh, x:x + bw] = 1
  flat = m.T.ravel()
  counts, value, run = [], 0, 0
  for v in flat:
    if v != value:
      counts.append(run)
      value, run = v, 0
    run += 1
  counts.append(run)
  return counts


def _eval_spec():
  rng = np.random.default_rng(1)
  sizes = {21: (30, 40), 22: (44, 30), 23: (30, 42), 24: (40, 30),
           25: (32, 48)}
  images = [{'id': i, 'file_name': f'{i:012d}.jpg',
             'image': _pixels(rng, *sizes[i])} for i in (24, 21, 23, 25, 22)]
  anns = [_ann(1, 21, (3.0, 4.0, 20.0, 15.0), 3),
          _ann(2, 22, (4.0, 5.0, 12.0, 20.0), 11),
          _ann(3, 22, (1.0, 1.0, 5.0, 5.0), 7, crowd=1),
          _ann(4, 23, (10.0, 10.0, 8.0, 9.0), 7),
          _ann(5, 25, (0.0, 0.0, 48.0, 32.0), 3)]
  return images, anns


def _write(root, train=None, evaluation=None, categories=CATEGORIES):
  train = train or _train_spec()
  evaluation = evaluation or _eval_spec()
  coco.write_coco_split(root, coco.TRAIN_SPLIT, *train, categories)
  coco.write_coco_split(root, coco.EVAL_SPLIT, *evaluation, categories)
  return str(root)


def _open(root, **kw):
  kw = {'min_size': MIN_SIZE, 'max_size': MAX_SIZE, 'mask_resolution': M,
        'max_boxes': 4, 'seed': SEED, 'num_workers': 2, 'prefetch': 0, **kw}
  return coco.open_coco(root, **kw)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = _write(tmp_path_factory.mktemp('coco'))
  train, evaluation = _open(root)
  yield root, train, evaluation
  train.close()
  evaluation.close()


# ---------------------------------------------------------------- sizes


def test_get_size_matches_the_reference():
  sizes = [(640, 480), (480, 640), (640, 427), (427, 640), (500, 375),
           (612, 612), (640, 200), (200, 640), (1, 1), (640, 30), (333, 500),
           (1333, 800), (2000, 1000), (799, 800)]
  rng = np.random.default_rng(0)
  sizes += [tuple(int(v) for v in rng.integers(1, 1500, 2))
            for _ in range(300)]
  for w, h in sizes:
    for lo, hi in ((800, 1333), (MIN_SIZE, MAX_SIZE), (600, 1000)):
      assert coco.get_size(w, h, lo, hi) == reference_get_size((w, h), lo, hi)
  assert coco.get_size(640, 480) == (800, 1066)
  # Every image of aspect ratio up to 20 fits the two default buckets.
  assert coco.default_buckets() == ((800, 1344), (1344, 800))
  for w in range(1, 700, 3):
    for h in range(max(1, w // 20), w + 1, 2):
      oh, ow = coco.get_size(w, h)
      assert oh <= 800 and ow <= 1344


def test_buckets_and_padding_cost():
  grid = coco.bucket_grid(128)
  assert grid[:6] == ((800, 800), (800, 896), (800, 1024), (800, 1152),
                      (800, 1280), (800, 1344))
  assert (128, 1344) in grid and (1344, 768) in grid and len(grid) == 23
  assert all(h % 32 == 0 and w % 32 == 0 for h, w in grid)
  buckets = coco.default_buckets()
  # A square goes with the portrait images, as the reference groups them.
  np.testing.assert_array_equal(
      coco.assign_buckets([(800, 1066), (1066, 800), (800, 800),
                           (800, 1400)], buckets), [0, 1, 1, -1])
  assert coco.assign_buckets([(800, 1066)], grid)[0] == grid.index(
      (800, 1152))
  cost = coco.padding_cost([(480, 640), (640, 480)])
  assert cost == pytest.approx(1 - 1066 / 1344)
  assert coco.padding_cost([(480, 640)], 128) == pytest.approx(
      1 - 1066 / 1152)
  assert coco.padding_cost([(480, 640)], [(800, 1088)]) == pytest.approx(
      1 - 1066 / 1088)
  with pytest.raises(ConfigError, match='fits none'):
    coco.padding_cost([(480, 640)], [(800, 800)])
  with pytest.raises(ConfigError, match='multiples'):
    coco.padding_cost([(480, 640)], [(800, 1000)])


# ---------------------------------------------------------------- transforms


def test_transform_image_matches_torchvision():
  rng = np.random.default_rng(2)
  pixels = _pixels(rng, 37, 53)
  size = coco.get_size(53, 37, MIN_SIZE, MAX_SIZE)
  for flip in (False, True):
    img = F.resize(Image.fromarray(pixels), list(size))
    if flip:
      img = F.hflip(img)
    t = F.to_tensor(img)[[2, 1, 0]] * 255
    t = F.normalize(t, mean=list(coco.PIXEL_MEAN), std=[1.0, 1.0, 1.0])
    np.testing.assert_array_equal(coco.transform_image(pixels, size, flip),
                                  t.permute(1, 2, 0).numpy())
  # BGR, 0..255, minus the mean.
  flat = np.broadcast_to(np.asarray([10, 20, 30], np.uint8), (4, 6, 3))
  out = coco.transform_image(flat, (4, 6))
  np.testing.assert_allclose(out[0, 0], np.asarray([30, 20, 10]) -
                             np.asarray(coco.PIXEL_MEAN), atol=1e-4)


def test_boxes_match_boxlist(tiny):
  _, train, _ = tiny
  js = train.coco_gt
  for i in range(train.num_examples):
    image_id = int(train.image_ids[i])
    anno = [a for a in js['annotations'] if a['image_id'] == image_id]
    h, w = train.sizes[i]
    oh, ow = train.resized_sizes[i]
    assert (oh, ow) == reference_get_size((w, h), MIN_SIZE, MAX_SIZE)
    for flip in (False, True):
      want, kept = reference_targets(anno, (w, h), (ow, oh), flip)
      t = train.targets(i, flip)
      np.testing.assert_array_equal(t['boxes'], want.reshape(-1, 4))
      np.testing.assert_array_equal(
          t['labels'], [LABEL_OF[a['category_id']] for a in kept])


# ---------------------------------------------------------------- the split


def test_training_filter_crowd_and_categories(tiny):
  _, train, evaluation = tiny
  images, anns = _train_spec()
  by_image = {}
  for a in anns:
    by_image.setdefault(a['image_id'], []).append(a)
  want = [e['id'] for e in sorted(images, key=lambda e: e['id'])
          if reference_has_valid_annotation(by_image.get(e['id'], []))]
  assert train.image_ids.tolist() == want
  assert 8 not in want and 9 not in want and 7 in want
  assert train.removed_images == 2
  assert train.category_ids == (11, 3, 7)
  assert train.num_classes == 3
  for i, image_id in enumerate(train.image_ids.tolist()):
    real = [a for a in by_image[image_id] if not a['iscrowd']]
    kept = [a for a in real if a['id'] != 102 and a['id'] != 117]
    assert train.labels(i).tolist() == [LABEL_OF[a['category_id']]
                                        for a in kept]
  assert len(train.labels(train.image_ids.tolist().index(7))) == 0
  assert train.dropped_boxes == 2            # annotations 102 and 117
  # Evaluation keeps every image, and the whole JSON as coco_gt.
  assert evaluation.image_ids.tolist() == [21, 22, 23, 24, 25]
  assert len(evaluation.labels(1)) == 1      # the crowd box is no target
  assert len(evaluation.coco_gt['annotations']) == 5
  assert re.match(r'coco2017-train: 10 images \(2 without annotations '
                  r'removed\), 13 boxes of 3 classes \(2 empty',
                  train.describe())


def test_masks_and_flips(tiny):
  _, train, _ = tiny
  i = train.image_ids.tolist().index(1)
  h, w = train.sizes[i]
  oh, ow = train.resized_sizes[i]
  rw, rh = np.float32(ow / w), np.float32(oh / h)
  plain, flipped = train.targets(i, False), train.targets(i, True)
  # A rectangle's crop is all ones over the rectangle (the COCO bbox,
  # one pixel wider than the legacy box).
  assert plain['mask_crops'].shape == (1, M, M)
  assert plain['mask_crops'][0].all()
  np.testing.assert_allclose(
      plain['mask_boxes'][0],
      np.asarray([4.5, 3.25, 24.5, 15.75], np.float32) * [rw, rh, rw, rh],
      rtol=1e-6)
  np.testing.assert_allclose(plain['mask_boxes'][0, 2] -
                             plain['boxes'][0, 2], rw, rtol=1e-5)
  # Flipping: x -> W - x - 1 for boxes and mask boxes, crops mirrored.
  for key in ('boxes', 'mask_boxes'):
    np.testing.assert_allclose(flipped[key][:, [0, 2]],
                               ow - plain[key][:, [2, 0]] - 1, atol=1e-5)
    np.testing.assert_array_equal(flipped[key][:, [1, 3]],
                                  plain[key][:, [1, 3]])
  # A triangle: the crop is the polygon rasterised over its box, and
  # mirrored when flipped; the short polygon adds nothing.
  i = train.image_ids.tolist().index(2)
  t, tf = train.targets(i, False), train.targets(i, True)
  tri = np.asarray([10, 10, 18, 10, 14, 18], np.float64)
  want = coco.polygon_mask_target([tri], [10, 10, 18, 18], M)
  np.testing.assert_array_equal(t['mask_crops'][1], want)
  np.testing.assert_array_equal(tf['mask_crops'][1], want[:, ::-1])
  # An RLE mask: its pixels' box, the crop all ones.
  i = train.image_ids.tolist().index(4)
  t = train.targets(i, False)
  assert t['mask_crops'][1].all()
  oh, ow = train.resized_sizes[i]
  np.testing.assert_allclose(
      t['mask_boxes'][1],
      np.asarray([1, 1, 11, 6]) * np.asarray([ow / 60, oh / 25] * 2),
      rtol=1e-6)


def test_crop_targets_approximate_the_reference():
  """The mask target sampled from a gt's 112x112 crop against the
  reference's (the polygon cropped to the proposal and rasterised at
  28x28), for proposals with IoU >= 0.5 with the gt box."""
  rng = np.random.default_rng(0)
  ious = []
  for _ in range(12):
    n = int(rng.integers(5, 14))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.4, 1.0, n)
    cx, cy = rng.uniform(100, 300, 2)
    sx, sy = rng.uniform(20, 150, 2)
    poly = np.stack([cx + sx * radius * np.cos(angles),
                     cy + sy * radius * np.sin(angles)], 1).ravel().tolist()
    crop, mask_box = coco.mask_crop([poly], 500, 500, 112)
    g = mask_box.astype(np.float64)
    side = np.asarray([g[2] - g[0], g[3] - g[1]] * 2)
    found = 0
    while found < 10:
      b = g + rng.normal(0, 0.15, 4) * side
      iw = min(b[2], g[2]) - max(b[0], g[0])
      ih = min(b[3], g[3]) - max(b[1], g[1])
      if b[2] - b[0] < 2 or b[3] - b[1] < 2 or iw <= 0 or ih <= 0:
        continue
      inter = iw * ih
      union = np.prod(b[2:] - b[:2]) + np.prod(g[2:] - g[:2]) - inter
      if inter / union < 0.5:
        continue
      found += 1
      ref = coco.polygon_mask_target([poly], b).astype(bool)
      ours = coco.crop_mask_target(crop, mask_box, b).astype(bool)
      ious.append((ref & ours).sum() / max((ref | ours).sum(), 1))
  mean = float(np.mean(ious))
  print(f'mean IoU crop vs polygon targets: {mean:.4f}, min '
        f'{min(ious):.4f}')
  assert mean > 0.98 and min(ious) > 0.9
  # Exact where there is nothing to interpolate: a proposal equal to a
  # rectangle's box.
  crop, mask_box = coco.mask_crop(_rect(10, 20, 30, 40), 100, 100, 112)
  assert crop.all()
  np.testing.assert_array_equal(mask_box, [10, 20, 40, 60])
  assert coco.crop_mask_target(crop, mask_box, [10, 20, 40, 60]).all()
  assert coco.polygon_mask_target(_rect(10, 20, 30, 40),
                                  [10, 20, 40, 60]).all()


# ---------------------------------------------------------------- batches


def test_batches_buckets_and_padding(tiny):
  _, train, _ = tiny
  batches = take(train.train_batches(0, 2), train.steps_per_epoch(2))
  seen = []
  for b in batches:
    n, hh, ww, _ = b['image'].shape
    assert (hh, ww) in train.buckets and n == 2
    assert b['mask_crops'].shape == (2, 4, M, M)
    assert b['mask_crops'].dtype == np.uint8
    assert b['labels'].dtype == np.int32 and b['valid'].dtype == bool
    for j in range(n):
      oh, ow = b['image_size'][j]
      assert not b['image'][j, oh:].any() and not b['image'][j, :, ow:].any()
      assert (oh > ow) == (hh > ww) or oh == ow
      k = int(b['valid'][j].sum())
      assert not b['labels'][j, k:].any() and b['labels'][j, :k].all()
      assert not b['mask_crops'][j, k:].any()
    seen.append(b)
  # Every bucket's leftover is left out; each image at most once an epoch.
  counts = train.bucket_counts()
  assert train.steps_per_epoch(2) == int((counts // 2).sum())
  order = np.concatenate([c for _, c in train.epoch_batches(0, 2)])
  assert len(set(order.tolist())) == len(order) == int((counts // 2).sum()) * 2
  # A batch row is the example, padded.
  index, bucket, epoch = train.train_order(1, 2)
  assert (epoch, bucket) == (0, train.epoch_batches(0, 2)[1][0])
  for j, i in enumerate(index.tolist()):
    ex = train.example(i, train.flipped(0, i))
    oh, ow = ex['image_size']
    np.testing.assert_array_equal(seen[1]['image'][j, :oh, :ow], ex['image'])
    k = len(ex['boxes'])
    np.testing.assert_array_equal(seen[1]['boxes'][j, :k], ex['boxes'])
    np.testing.assert_array_equal(seen[1]['mask_crops'][j, :k],
                                  ex['mask_crops'])


def test_order_is_deterministic_and_resumable(tiny):
  root, train, _ = tiny
  steps = train.steps_per_epoch(2)
  full = take(train.train_batches(0, 2), steps + 2)
  assert_batches_equal(full[3:], take(train.train_batches(3, 2), steps - 1))
  again, _ = _open(root, num_workers=1, prefetch=2)
  try:
    assert_batches_equal(full[:3], take(again.train_batches(0, 2), 3))
  finally:
    again.close()
  other, _ = _open(root, seed=SEED + 1)
  try:
    assert [c.tolist() for _, c in other.epoch_batches(0, 2)] != [
        c.tolist() for _, c in train.epoch_batches(0, 2)]
  finally:
    other.close()
  # Epochs differ, and batches follow the permutation's order.
  assert [c.tolist() for _, c in train.epoch_batches(0, 2)] != [
      c.tolist() for _, c in train.epoch_batches(1, 2)]
  perm = train.permutation(0).tolist()
  firsts = [perm.index(c[0]) for _, c in train.epoch_batches(0, 2)]
  assert firsts == sorted(firsts)


def test_process_slices(tiny):
  _, train, evaluation = tiny
  whole = take(train.train_batches(1, 4), 2)
  parts = [take(train.train_batches(1, 4, process_index=p, process_count=2),
                2) for p in range(2)]
  for k in range(2):
    for key in whole[k]:
      np.testing.assert_array_equal(
          whole[k][key], np.concatenate([parts[0][k][key], parts[1][k][key]]))
  whole = list(evaluation.eval_batches(4))
  parts = [list(evaluation.eval_batches(4, process_index=p, process_count=2))
           for p in range(2)]
  for k in range(len(whole)):
    for key in whole[k]:
      np.testing.assert_array_equal(
          whole[k][key], np.concatenate([parts[0][k][key], parts[1][k][key]]))
  with pytest.raises(ConfigError, match='split'):
    train.train_batches(0, 3, process_count=2)


def test_eval_covers_every_image_once(tiny):
  _, _, evaluation = tiny
  batches = list(evaluation.eval_batches(2))
  assert len(batches) == evaluation.eval_steps(2)
  index = np.concatenate([b['index'][b['mask']] for b in batches])
  assert sorted(index.tolist()) == list(range(evaluation.num_examples))
  for b in batches:
    assert b['image'].shape[1:3] in [tuple(s) for s in evaluation.buckets]
    assert not b['image'][~b['mask']].any()
    assert not b['image_size'][~b['mask']].any()
    assert set(b) == {'image', 'image_size', 'index', 'mask'}
    for j in np.flatnonzero(b['mask']):
      i = b['index'][j]
      np.testing.assert_array_equal(b['image_size'][j],
                                    evaluation.resized_sizes[i])
      assert evaluation.flipped(0, i) is False
  # Within a bucket, dataset order.
  for bucket, idx in evaluation.eval_order(2):
    assert (evaluation.bucket_of[idx] == bucket).all()
    assert idx.tolist() == sorted(idx.tolist())
  np.testing.assert_array_equal(evaluation.sizes[1], [44, 30])


# ---------------------------------------------------------------- errors


def _expect(root, pattern, **kw):
  with pytest.raises(DataError, match=pattern):
    datasets = _open(root, **kw)
    for ds in datasets:
      ds.close()


def _broken(tmp_path, name, change):
  images, anns = _train_spec()
  change(images, anns)
  return _write(tmp_path / name, train=(images, anns))


def test_layout_errors(tmp_path):
  _expect(tmp_path / 'nothing', re.escape(str(tmp_path / 'nothing')))
  root = _write(tmp_path / 'ok')
  path = os.path.join(root, 'annotations', 'instances_val2017.json')
  os.remove(path)
  _expect(root, re.escape(path) + '.*no such file')
  root = _write(tmp_path / 'ok2')
  path = os.path.join(root, 'annotations', 'instances_train2017.json')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{"images": [')
  _expect(root, re.escape(path) + '.*malformed JSON')
  root = _write(tmp_path / 'ok3')
  os.rename(os.path.join(root, 'train2017'), os.path.join(root, 'other'))
  _expect(root, re.escape(os.path.join(root, 'train2017')) +
          '.*no such directory')


@pytest.mark.parametrize('case, change, pattern', [
    ('unknown image', lambda im, an: an[0].update(image_id=77),
     r'instances_train2017.json: annotation 100 refers to image_id 77'),
    ('missing file', lambda im, an: im[1].update(image=None, width=40,
                                                  height=30),
     r'train2017: 1 of the 10 images .* missing: 000000000001.jpg'),
    ('unknown category', lambda im, an: an[3].update(category_id=5),
     r'instances_train2017.json: annotation 103 \(image .*000000000002.jpg\)'
     r' has category_id 5'),
    ('box outside', lambda im, an: an[0].update(bbox=[30.0, 3.0, 12.0, 5.0]),
     r'instances_train2017.json: annotation 100 of image '
     r'.*000000000001.jpg: bbox .* reaches outside the 40x30'),
    ('odd polygon', lambda im, an: an[3].update(segmentation=[[1, 2, 3]]),
     r'instances_train2017.json: annotation 103 \(image .*000000000002.jpg\):'
     r' malformed segmentation: polygon #0 has an odd number'),
    ('string segmentation', lambda im, an: an[5].update(segmentation='x'),
     r'annotation 105 .* malformed segmentation: a str'),
    ('string coordinate', lambda im, an: an[6].update(
        segmentation=[[1, 2, 3, 4, 5, 6], [1, 2, 'a', 4, 5, 6]]),
     r'annotation 106 .* malformed segmentation: polygon #1 holds something '
     r'other than finite numbers'),
    ('RLE counts', lambda im, an: an[1].update(
        segmentation={'size': [30, 40], 'counts': {}}),
     r'annotation 101 .* malformed segmentation: RLE counts are a dict'),
    ('bad RLE', lambda im, an: an[1].update(
        segmentation={'size': [30, 41], 'counts': [0, 1230]}),
     r'annotation 101 .* malformed segmentation: RLE size \[30, 41\]'),
    ('bad crowd', lambda im, an: an[1].update(iscrowd=2),
     r'annotation 101 .* iscrowd 2'),
    ('no segmentation', lambda im, an: an[2].pop('segmentation'),
     r'annotation #2 \(id 102\) lacks segmentation'),
])
def test_annotation_errors(tmp_path, case, change, pattern):
  root = _broken(tmp_path, case.replace(' ', '_'), change)
  _expect(root, pattern)


def test_too_many_boxes_and_corrupt_jpeg(tmp_path):
  root = _write(tmp_path / 'many')
  _expect(root, r'000000000002.jpg: 2 boxes, more than max_boxes=1.*'
                r'instances_train2017.json', max_boxes=1)
  images, anns = _train_spec()
  images[0]['image'] = b'not a jpeg'          # image 3
  images[0]['width'], images[0]['height'] = 36, 36
  root = _write(tmp_path / 'corrupt', train=(images, anns))
  train, evaluation = _open(root)
  try:
    i = train.image_ids.tolist().index(3)
    with pytest.raises(DataError, match=r'corrupt image .*000000000003.jpg'):
      train.example(i)
    step = next(s for s in range(train.steps_per_epoch(2))
                if i in train.train_order(s, 2)[0])
    with pytest.raises(DataError, match=r'000000000003.jpg'):
      take(train.train_batches(step, 2), 1)
  finally:
    train.close()
    evaluation.close()


def test_config_errors(tiny):
  root = tiny[0]
  with pytest.raises(ConfigError, match='multiples'):
    _open(root, buckets=[(30, 60)])
  with pytest.raises(ConfigError, match='step'):
    _open(root, buckets=48)
  with pytest.raises(DataError, match='fits none of the buckets'):
    _open(root, buckets=[(32, 64)])     # no room for portrait images


# ---------------------------------------------------------------- synthetic


def _evaluate(gt, results, iou_type):
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = gt
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[0]


def test_synthetic_source():
  train, evaluation = coco.synthetic_coco(12, 6, num_classes=4, seed=1,
                                          mask_resolution=32, prefetch=0,
                                          max_objects=4)
  again, _ = coco.synthetic_coco(12, 6, num_classes=4, seed=1,
                                 mask_resolution=32, prefetch=2, max_objects=4)
  try:
    assert_batches_equal(take(train.train_batches(0, 2), 3),
                         take(again.train_batches(0, 2), 3))
    counts = train.bucket_counts()
    assert counts.min() > 0                # both orientations
    b = next(train.train_batches(0, 2))
    assert b['mask_crops'].shape[1:] == (4, 32, 32)
    # The pixels under a mask are the class colour (exact masks).
    pixels = evaluation.read_image(0)
    seg = evaluation.segmentations(0)[-1]   # painted last
    mask = coco.segmentation_mask(seg, *evaluation.sizes[0]).astype(bool)
    assert mask.any() and (pixels[mask] == pixels[mask][0]).all()
    # coco_gt loads in pycocotools; perfect detections score AP 1.
    gt = evaluation.coco_gt
    index = np.arange(evaluation.num_examples)
    g = max(len(evaluation.boxes(i)) for i in index)
    boxes = np.zeros((len(index), g, 4), np.float32)
    labels = np.zeros((len(index), g), np.int64)
    valid = np.zeros((len(index), g), bool)
    masks = []
    for i in index:
      t = evaluation.targets(i)
      k = len(t['boxes'])
      boxes[i, :k], labels[i, :k], valid[i, :k] = t['boxes'], t['labels'], 1
      h, w = evaluation.sizes[i]
      masks.append(np.stack(
          [coco.segmentation_mask(s, h, w) for s in
           evaluation.segmentations(i)] +
          [np.zeros((h, w), np.uint8)] * (g - k)))
    scores = valid.astype(np.float32)
    results = evaluation.to_coco_results(index, boxes, scores, labels, valid)
    assert {r['category_id'] for r in results} <= {1, 3, 5, 7}
    assert _evaluate(gt, results, 'bbox') > 0.99
    segm = evaluation.to_coco_segm_results(index, masks, scores, labels, valid)
    assert _evaluate(gt, segm, 'segm') > 0.99
  finally:
    for ds in (train, evaluation, again):
      ds.close()


def test_synthetic_on_disk_round_trip(tmp_path):
  root = coco.write_synthetic_coco(tmp_path / 'syn', 5, 3, num_classes=3,
                                   seed=2)
  assert os.path.isfile(os.path.join(root, 'annotations',
                                     'instances_val2017.json'))
  disk = coco.open_coco(root, min_size=128, max_size=213, mask_resolution=16,
                        max_boxes=3, prefetch=0)
  mem = coco.synthetic_coco(5, 3, num_classes=3, seed=2, mask_resolution=16,
                            prefetch=0)
  try:
    for a, b in zip(disk, mem):
      assert a.image_ids.tolist() == b.image_ids.tolist()
      assert a.coco_gt['annotations'] == b.coco_gt['annotations']
      for i in range(a.num_examples):
        for key, value in a.targets(i, True).items():
          np.testing.assert_array_equal(value, b.targets(i, True)[key])
        # JPEG keeps the pixels close.
        diff = np.abs(a.read_image(i).astype(int) - b.read_image(i))
        assert diff.mean() < 3
  finally:
    for ds in (*disk, *mem):
      ds.close()
