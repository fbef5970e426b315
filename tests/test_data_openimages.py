"""OpenImages for RetinaNet: resize, on-disk format, transforms, order,
errors and the synthetic shapes."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from jaxperf.data import openimages as oi
from jaxperf.errors import ConfigError, DataError
from tests.batches import assert_batches_equal, take

SIZE = (40, 56)          # (H, W) the tiny images are resized to
CATEGORIES = [{'id': 11, 'name': 'c'}, {'id': 3, 'name': 'a'},
              {'id': 7, 'name': 'b'}]
CLASS_OF = {3: 0, 7: 1, 11: 2}
SEED = 3


def _pixels(rng, h, w):
  """A smooth random RGB image (JPEG keeps it well)."""
  yy, xx = np.mgrid[0:h, 0:w]
  base = rng.uniform(40, 200, 3)
  ramp = rng.uniform(-1, 1, (2, 3))
  image = (base + xx[..., None] * ramp[0] + yy[..., None] * ramp[1]
           + rng.normal(0, 6, (h, w, 3)))
  return np.clip(image, 0, 255).astype(np.uint8)


def _split_spec(n, seed, first_id, sizes=None):
  """(images, annotations) of n images with 0-3 random boxes each."""
  rng = np.random.default_rng(seed)
  images, anns = [], []
  for k in range(n):
    h, w = sizes[k] if sizes else (int(rng.integers(40, 56)),
                                   int(rng.integers(50, 70)))
    image_id = first_id + (k * (n - 1)) % n   # not in id order
    images.append({'id': image_id, 'file_name': f'img_{image_id}.jpg',
                   'image': _pixels(rng, h, w)})
    for _ in range(int(rng.integers(0, 4)) if k else 2):
      bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
      x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      anns.append({'id': 1000 * seed + len(anns) + 1, 'image_id': image_id,
                   'bbox': [round(float(v), 2) for v in (x, y, bw, bh)],
                   'category_id': [3, 7, 11][int(rng.integers(3))],
                   'area': float(bw * bh), 'iscrowd': int(rng.random() < .2)})
  return images, anns


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """8 train + 5 validation images of about 48x60, categories 3, 7, 11;
  train image 100 has a degenerate box and one clamped within 1 pixel."""
  root = tmp_path_factory.mktemp('openimages')
  images, anns = _split_spec(8, 1, 100)
  h, w = images[0]['image'].shape[:2]
  assert images[0]['id'] == 100
  anns += [
      {'id': 91, 'image_id': 100, 'bbox': [5.0, 6.0, 0.0, 8.0],
       'category_id': 3, 'area': 0.0, 'iscrowd': 0},
      {'id': 92, 'image_id': 100, 'bbox': [-0.75, 1.5, w + 1.5, h - 1.0],
       'category_id': 11, 'area': 1.0, 'iscrowd': 0}]
  oi.write_coco_split(root, 'train', images, anns, CATEGORIES)
  oi.write_coco_split(root, 'validation', *_split_spec(5, 2, 500),
                      CATEGORIES)
  return root


@pytest.fixture
def opened():
  """opened(root, **kw) -> (train, eval), closed after the test."""
  datasets = []

  def open_(root, **kw):
    kw = {'image_size': SIZE, 'seed': SEED, 'num_workers': 2,
          'max_boxes': 6, **kw}
    pair = oi.open_openimages(root, **kw)
    datasets.extend(pair)
    return pair

  yield open_
  for ds in datasets:
    ds.close()


def _json(root, split):
  path = os.path.join(root, split, 'labels', oi.LABELS_FILE)
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _reference(root, split, entry, anns, flip, size):
  """The reference's transforms in torch: (image [H, W, 3], boxes, labels)."""
  img = Image.open(os.path.join(root, split, 'data', entry['file_name']))
  w, h = img.size
  boxes = torch.as_tensor([a['bbox'] for a in anns],
                          dtype=torch.float32).reshape(-1, 4)
  boxes[:, 2:] += boxes[:, :2]
  boxes[:, 0::2].clamp_(min=0, max=w)
  boxes[:, 1::2].clamp_(min=0, max=h)
  keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
  boxes = boxes[keep]
  labels = [CLASS_OF[a['category_id']] for a, k in zip(anns, keep) if k]
  image = torch.from_numpy(np.array(img.convert('RGB'))).permute(
      2, 0, 1).contiguous().float().div(255)
  if flip:
    image = image.flip(-1)
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
  image = torch.nn.functional.interpolate(
      image[None], size=size, mode='bilinear', align_corners=False)[0]
  rh, rw = (torch.tensor(s, dtype=torch.float32)
            / torch.tensor(o, dtype=torch.float32)
            for s, o in zip(size, (h, w)))
  x1, y1, x2, y2 = boxes.unbind(1)
  boxes = torch.stack((x1 * rw, y1 * rh, x2 * rw, y2 * rh), dim=1)
  return image.permute(1, 2, 0).numpy(), boxes.numpy(), np.asarray(labels)


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize('in_hw,out_hw', [
    ((48, 64), (80, 100)), ((37, 53), (16, 23)), ((20, 7), (9, 30)),
    ((5, 7), (5, 7)), ((10, 10), (1, 1)), ((1, 1), (4, 3)),
    ((31, 17), (31, 40))])
def test_resize_matches_torch_interpolate(in_hw, out_hw):
  x = np.random.default_rng(0).random((*in_hw, 3), np.float32)
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(2, 0, 1)[None], size=out_hw,
      mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
  got = oi.resize_bilinear(x, out_hw)
  assert got.dtype == np.float32 and got.shape == (*out_hw, 3)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


# ---------------------------------------------------------------- format


def test_open_reads_the_reference_layout(tiny, opened):
  train, evaluation = opened(tiny)
  js = _json(tiny, 'train')
  assert train.coco_gt == js and evaluation.coco_gt == _json(tiny,
                                                             'validation')
  assert (train.num_examples, evaluation.num_examples) == (8, 5)
  assert train.category_ids == (3, 7, 11) and train.num_classes == 3
  assert list(train.image_ids) == list(range(100, 108))      # sorted ids
  assert list(evaluation.image_ids) == list(range(500, 505))
  assert train.max_boxes == 6 and train.image_size == SIZE
  entries = {e['id']: e for e in js['images']}
  for i, image_id in enumerate(train.image_ids.tolist()):
    e = entries[image_id]
    assert tuple(train.sizes[i]) == (e['height'], e['width'])
    assert train.where(i).endswith(os.path.join('train', 'data',
                                                e['file_name']))
    anns = [a for a in js['annotations'] if a['image_id'] == image_id]
    _, boxes, labels = _reference(tiny, 'train', e, anns, False,
                                  (e['height'], e['width']))
    np.testing.assert_array_equal(train.boxes(i), boxes)
    np.testing.assert_array_equal(train.labels(i), labels)
  # Image 100: the zero-width box is dropped and counted, the one reaching
  # 0.75 pixel outside is clamped to the image.
  h, w = train.sizes[0]
  assert train.dropped_boxes == 1 and evaluation.dropped_boxes == 0
  assert '1 degenerate' in train.describe()
  np.testing.assert_array_equal(train.boxes(0)[-1], [0, 1.5, w, h])
  assert train.labels(0)[-1] == CLASS_OF[11]
  assert train.num_boxes == len(js['annotations']) - 1


@pytest.mark.parametrize('flip', [False, True])
def test_example_matches_the_reference_transforms(tiny, opened, flip):
  train, _ = opened(tiny)
  js = _json(tiny, 'train')
  entries = {e['id']: e for e in js['images']}
  for i in (0, 3, 6):
    e = entries[int(train.image_ids[i])]
    anns = [a for a in js['annotations'] if a['image_id'] == e['id']]
    want_image, want_boxes, want_labels = _reference(tiny, 'train', e, anns,
                                                     flip, SIZE)
    image, boxes, labels = train.example(i, flip)
    assert image.dtype == np.float32 and image.shape == (*SIZE, 3)
    np.testing.assert_allclose(image, want_image, rtol=0, atol=2e-6)
    np.testing.assert_allclose(boxes, want_boxes, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(labels, want_labels)


def test_flip_mirrors_image_and_boxes(tiny, opened):
  train, _ = opened(tiny)
  for i in range(train.num_examples):
    image, boxes, labels = train.example(i, False)
    f_image, f_boxes, f_labels = train.example(i, True)
    np.testing.assert_array_equal(f_image, np.flip(image, 1))
    np.testing.assert_allclose(f_boxes[:, [0, 2]], SIZE[1] - boxes[:, [2, 0]],
                               atol=1e-4)
    np.testing.assert_array_equal(f_boxes[:, [1, 3]], boxes[:, [1, 3]])
    np.testing.assert_array_equal(f_labels, labels)
    assert (f_boxes[:, 2] > f_boxes[:, 0]).all()


# ---------------------------------------------------------------- batches


def test_train_batches_hold_the_transformed_examples(tiny, opened):
  train, _ = opened(tiny)
  batches = take(train.train_batches(0, 4), 4)
  flips = []
  for step, batch in enumerate(batches):
    assert batch['image'].shape == (4, *SIZE, 3)
    assert batch['image'].dtype == np.float32
    assert batch['boxes'].shape == (4, 6, 4)
    assert batch['boxes'].dtype == np.float32
    assert batch['labels'].shape == (4, 6)
    assert batch['labels'].dtype == np.int32
    assert batch['valid'].shape == (4, 6) and batch['valid'].dtype == bool
    index, epoch = train.train_order(step, 4)
    assert epoch == step // 2
    for j, i in enumerate(index.tolist()):
      flip = train.flipped(epoch, i)
      flips.append(flip)
      image, boxes, labels = train.example(i, flip)
      k = len(boxes)
      np.testing.assert_array_equal(batch['image'][j], image)
      np.testing.assert_array_equal(batch['boxes'][j, :k], boxes)
      np.testing.assert_array_equal(batch['labels'][j, :k], labels)
      assert batch['valid'][j].tolist() == [True] * k + [False] * (6 - k)
      assert not batch['boxes'][j, k:].any()
      assert not batch['labels'][j, k:].any()
  assert any(flips) and not all(flips)


def test_train_order_is_deterministic_and_resumable(tiny, opened):
  a, _ = opened(tiny)
  b, _ = opened(tiny)
  c, _ = opened(tiny, seed=SEED + 1)
  full = take(a.train_batches(0, 4), 6)
  assert_batches_equal(take(b.train_batches(0, 4), 6), full)
  assert_batches_equal(take(b.train_batches(3, 4), 3), full[3:])
  other = take(c.train_batches(0, 4), 2)
  assert any(not np.array_equal(x['image'], y['image'])
             for x, y in zip(other, full))


def test_every_image_once_per_epoch(tiny, opened):
  train, _ = opened(tiny)
  assert train.steps_per_epoch(4) == 2
  for epoch in range(3):
    seen = np.concatenate([train.train_order(epoch * 2 + k, 4)[0]
                           for k in range(2)])
    assert sorted(seen.tolist()) == list(range(8))
  assert not np.array_equal(train.permutation(0), train.permutation(1))
  # drop_last: 8 // 3 = 2 steps of distinct images, two left out per epoch.
  assert train.steps_per_epoch(3) == 2
  for epoch in range(3):
    seen = np.concatenate([train.train_order(epoch * 2 + k, 3)[0]
                           for k in range(2)])
    assert len(set(seen.tolist())) == 6
    np.testing.assert_array_equal(seen, train.permutation(epoch)[:6])
  with pytest.raises(DataError, match='fewer than one global batch'):
    train.train_batches(0, 16)


def test_process_slices_concatenate_to_the_global_batch(tiny, opened):
  train, evaluation = opened(tiny)
  whole = take(train.train_batches(1, 4), 3)
  parts = [take(train.train_batches(1, 4, process_index=p, process_count=2),
                3) for p in range(2)]
  for step in range(3):
    joined = {k: np.concatenate([parts[p][step][k] for p in range(2)])
              for k in whole[step]}
    assert_batches_equal([joined], [whole[step]])
  whole = list(evaluation.eval_batches(4))
  parts = [list(evaluation.eval_batches(4, process_index=p, process_count=2))
           for p in range(2)]
  for step in range(len(whole)):
    joined = {k: np.concatenate([parts[p][step][k] for p in range(2)])
              for k in whole[step]}
    assert_batches_equal([joined], [whole[step]])
  with pytest.raises(ConfigError, match='does not split'):
    train.train_batches(0, 4, process_count=3)


def test_eval_batches_cover_every_image_once(tiny, opened):
  _, evaluation = opened(tiny)
  batches = list(evaluation.eval_batches(4))
  assert len(batches) == 2
  for b in batches:
    assert set(b) == {'image', 'index', 'mask'}
    assert b['image'].shape == (4, *SIZE, 3)
    assert b['image'].dtype == np.float32
    assert b['index'].dtype == np.int32 and b['mask'].dtype == bool
  index = np.concatenate([b['index'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert index[mask].tolist() == list(range(5))
  assert mask.tolist() == [True] * 5 + [False] * 3
  assert not index[~mask].any()
  assert not batches[1]['image'][1:].any()
  for b in batches:
    for j in np.flatnonzero(b['mask']):
      image, _, _ = evaluation.example(int(b['index'][j]), False)
      np.testing.assert_array_equal(b['image'][j], image)


def test_to_coco_results_maps_back_to_the_json(tiny, opened):
  train, _ = opened(tiny)
  index = [0, 2]
  rows = [train.example(i, False) for i in index]
  k = max(len(r[1]) for r in rows)
  boxes = np.zeros((2, k, 4), np.float32)
  classes = np.zeros((2, k), np.int64)
  valid = np.zeros((2, k), bool)
  for j, (_, b, c) in enumerate(rows):
    boxes[j, :len(b)], classes[j, :len(c)], valid[j, :len(b)] = b, c, True
  results = train.to_coco_results(index, boxes, np.ones((2, k)), classes,
                                  valid)
  assert len(results) == valid.sum()
  want = [(int(train.image_ids[i]), train.category_ids[c], box)
          for i in index
          for box, c in zip(train.boxes(i), train.labels(i).tolist())]
  for r, (image_id, category, box) in zip(results, want):
    assert r['image_id'] == image_id and r['category_id'] == category
    x1, y1, x2, y2 = box
    np.testing.assert_allclose(r['bbox'], [x1, y1, x2 - x1, y2 - y1],
                               atol=1e-4)


# ---------------------------------------------------------------- errors


def _write(root, mutate=None, split='train'):
  """A small valid dataset; `mutate(images, annotations, categories)` edits
  the `split` spec first."""
  for name, seed, first in (('train', 11, 1), ('validation', 12, 50)):
    images, anns = _split_spec(3, seed, first, sizes=[(16, 24)] * 3)
    cats = [dict(c) for c in CATEGORIES]
    if mutate is not None and name == split:
      mutate(images, anns, cats)
    oi.write_coco_split(root, name, images, anns, cats)
  return root


def _open(root, **kw):
  kw = {'image_size': (8, 8), 'num_workers': 1, 'max_boxes': 4, **kw}
  train, evaluation = oi.open_openimages(root, **kw)
  train.close()
  evaluation.close()


def _drop_file(images, anns, cats):
  del anns, cats
  images[1].update(image=None, width=24, height=16)


def _unknown_image(images, anns, cats):
  del images, cats
  anns[0]['image_id'] = 999


def _box_outside(images, anns, cats):
  del images, cats
  anns[0]['bbox'] = [10.0, 2.0, 15.5, 5.0]   # x2 = 25.5 > 24 + 1


def _unknown_category(images, anns, cats):
  del images, cats
  anns[0]['category_id'] = 5


def _too_many_boxes(images, anns, cats):
  del cats
  for k in range(5):
    anns.append({'id': 700 + k, 'image_id': images[2]['id'],
                 'bbox': [1.0, 1.0, 5.0, 5.0], 'category_id': 7})


def _missing_bbox(images, anns, cats):
  del images, cats
  del anns[0]['bbox']


def _bad_bbox(images, anns, cats):
  del images, cats
  anns[0]['bbox'] = [1.0, 2.0, 3.0]


def _duplicate_image(images, anns, cats):
  del anns, cats
  images[1]['id'] = images[0]['id']


def _different_categories(images, anns, cats):
  del images, anns
  cats.append({'id': 99, 'name': 'z'})


@pytest.mark.parametrize('mutate,split,patterns', [
    (_drop_file, 'validation',
     [r'1 of the 3 images listed in .*validation.*openimages-mlperf.json are '
      r'missing: img_5\d\.jpg']),
    (_unknown_image, 'train',
     [r'openimages-mlperf.json', r'annotation 11001 refers to image_id 999']),
    (_box_outside, 'train',
     [r'annotation 11001 of image .*img_\d+\.jpg', r'\[10\.0, 2\.0, 15\.5, '
      r'5\.0\]', r'24x16']),
    (_unknown_category, 'train',
     [r'annotation 11001 .*category_id 5.*not in "categories"']),
    (_too_many_boxes, 'train',
     [r'img_\d+\.jpg: \d+ boxes, more than max_boxes=4', r'raise max_boxes']),
    (_missing_bbox, 'train', [r'annotation #0 \(id 11001\) lacks bbox']),
    (_bad_bbox, 'train', [r'annotation 11001 .*bbox \[1\.0, 2\.0, 3\.0\]']),
    (_duplicate_image, 'train', [r'image id \d+ appears more than once']),
    (_different_categories, 'validation', [r'categories differ']),
], ids=lambda v: getattr(v, '__name__', None))
def test_bad_annotations_are_named(tmp_path, mutate, split, patterns):
  _write(tmp_path, mutate, split)
  with pytest.raises(DataError) as e:
    _open(tmp_path)
  for pattern in patterns:
    assert e.match(pattern)


def test_bad_layout_is_named(tmp_path):
  with pytest.raises(DataError, match='nope: no such directory .*train'):
    _open(tmp_path / 'nope')
  _write(tmp_path)
  path = tmp_path / 'validation' / 'labels' / oi.LABELS_FILE
  text = path.read_text()
  path.unlink()
  with pytest.raises(DataError, match=r'openimages-mlperf\.json: no such '
                                      r'file .*validation/data/<file_name>'):
    _open(tmp_path)
  path.write_text(text[:-20])
  with pytest.raises(DataError, match='malformed JSON at line 1'):
    _open(tmp_path)
  path.write_text(json.dumps({'images': [], 'categories': []}))
  with pytest.raises(DataError, match='"annotations" is missing; expected a '
                                      'list'):
    _open(tmp_path)


@pytest.mark.parametrize('kind', ['corrupt', 'size'])
def test_bad_image_files_fail_when_read(tmp_path, kind):
  def mutate(images, anns, cats):
    del anns, cats
    if kind == 'corrupt':
      images[1].update(image=b'\xff\xd8not really a jpeg', width=24,
                       height=16)
    else:
      images[1]['width'] = 26      # the pixels are 24 wide
  _write(tmp_path, mutate, 'validation')
  bad = _json(tmp_path, 'validation')['images'][1]['file_name']
  train, evaluation = oi.open_openimages(tmp_path, image_size=(8, 8),
                                         num_workers=1, max_boxes=4)
  want = ('cannot be decoded' if kind == 'corrupt' else
          r'decodes to 24x16 \(width x height\); .*openimages-mlperf\.json '
          r'says 26x16')
  try:
    with pytest.raises(DataError, match=want) as e:
      list(evaluation.eval_batches(2))
    assert e.match(re.escape(os.path.join('validation', 'data', bad)))
  finally:
    train.close()
    evaluation.close()


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope='module')
def shapes():
  train, evaluation = oi.synthetic_shapes(
      12, 6, image_size=(48, 64), num_classes=6, seed=7, num_workers=2)
  yield train, evaluation
  train.close()
  evaluation.close()


def test_synthetic_shapes_are_deterministic(shapes):
  train, evaluation = shapes
  again, again_eval = oi.synthetic_shapes(
      12, 6, image_size=(48, 64), num_classes=6, seed=7, num_workers=1,
      prefetch=0)
  assert_batches_equal(take(again.train_batches(2, 4), 2),
                       take(train.train_batches(2, 4), 2))
  assert_batches_equal(list(again_eval.eval_batches(4)),
                       list(evaluation.eval_batches(4)))
  assert again.coco_gt == train.coco_gt
  other, _ = oi.synthetic_shapes(12, 6, image_size=(48, 64), num_classes=6,
                                 seed=8, num_workers=1, prefetch=0)
  assert not np.array_equal(other.read_image(0)[:8, :8],
                            train.read_image(0)[:8, :8])
  # Train and eval images differ.
  assert not any(np.array_equal(train.read_image(i)[:8, :8],
                                evaluation.read_image(j)[:8, :8])
                 for i in range(4) for j in range(4))
  for ds in (again, again_eval, other):
    ds.close()


def test_synthetic_shapes_boxes_and_classes(shapes):
  for ds in shapes:
    assert ds.num_classes == 6 and ds.max_boxes == 3
    sizes = set()
    for i in range(ds.num_examples):
      h, w = ds.sizes[i]
      sizes.add((int(h), int(w)))
      assert 0.75 * 48 - 1 <= h <= 1.5 * 48 + 1
      assert 0.75 * 64 - 1 <= w <= 1.5 * 64 + 1
      assert ds.read_image(i).shape == (h, w, 3)
      boxes, labels = ds.boxes(i), ds.labels(i)
      assert 1 <= len(boxes) <= 3
      assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all()
      assert (boxes[:, 3] <= h).all()
      sides = boxes[:, 2:] - boxes[:, :2]
      assert (sides >= 0.25 * np.asarray([w, h]) - 1).all()
      assert (sides <= 0.6 * np.asarray([w, h]) + 1).all()
      assert ((labels >= 0) & (labels < 6)).all()
    assert len(sizes) > 1
  batch = next(iter(shapes[0].train_batches(0, 4)))
  valid = batch['valid']
  assert (batch['boxes'][valid][:, 2:] <= [64, 48]).all()
  assert (batch['boxes'][valid] >= 0).all()


def test_synthetic_class_is_shape_and_colour(shapes):
  train, _ = shapes
  checked = 0
  for i in range(train.num_examples):
    image = train.read_image(i).astype(np.float32) / 255
    # The last object drawn is on top: its centre has its class's colour.
    (x1, y1, x2, y2), c = train.boxes(i)[-1], int(train.labels(i)[-1])
    centre = image[int((y1 + y2) / 2), int((x1 + x2) / 2)]
    colour = oi.class_colour(c, train.num_classes)
    assert np.abs(centre - colour).max() < 0.12, (i, c, centre, colour)
    checked += 1
  assert checked == train.num_examples
  assert len({oi.class_shape(c) for c in range(5)}) == 5
  colours = np.stack([oi.class_colour(c, 6) for c in range(6)])
  assert np.abs(colours[:, None] - colours[None]).max(-1)[
      ~np.eye(6, dtype=bool)].min() > 0.3


def test_synthetic_coco_gt_scores_perfectly_with_pycocotools(shapes):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  _, evaluation = shapes
  gt = COCO()
  gt.dataset = evaluation.coco_gt
  gt.createIndex()
  assert sorted(gt.getCatIds()) == list(evaluation.category_ids)
  assert sorted(gt.getImgIds()) == sorted(evaluation.image_ids.tolist())
  results = []
  for b in evaluation.eval_batches(4):
    rows = [int(i) for i, m in zip(b['index'], b['mask']) if m]
    examples = [evaluation.example(i) for i in rows]
    boxes = np.zeros((len(rows), 3, 4), np.float32)
    classes = np.zeros((len(rows), 3), np.int64)
    valid = np.zeros((len(rows), 3), bool)
    for j, (_, bx, c) in enumerate(examples):
      boxes[j, :len(bx)], classes[j, :len(c)], valid[j, :len(c)] = bx, c, True
    results += evaluation.to_coco_results(rows, boxes, np.ones((len(rows), 3)),
                                          classes, valid)
  dt = gt.loadRes(results)
  ev = COCOeval(gt, dt, iouType='bbox')
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  assert ev.stats[0] > 0.99


def test_write_synthetic_openimages_round_trip(tmp_path, opened):
  oi.write_synthetic_openimages(tmp_path, 6, 4, image_size=(32, 40),
                                num_classes=5, seed=2)
  train, evaluation = opened(tmp_path, image_size=(32, 40), max_boxes=3)
  synth = oi.synthetic_shapes(6, 4, image_size=(32, 40), num_classes=5,
                              seed=2, num_workers=1, prefetch=0)
  for disk, mem in zip((train, evaluation), synth):
    assert disk.num_examples == mem.num_examples
    assert disk.category_ids == mem.category_ids
    assert disk.dropped_boxes == 0
    np.testing.assert_array_equal(disk.sizes, mem.sizes)
    for i in range(mem.num_examples):
      np.testing.assert_array_equal(disk.boxes(i), mem.boxes(i))
      np.testing.assert_array_equal(disk.labels(i), mem.labels(i))
      diff = np.abs(disk.read_image(i).astype(int) - mem.read_image(i))
      assert diff.mean() < 5       # JPEG quality 95
    mem.close()


def test_bad_config_is_refused(tiny):
  with pytest.raises(ConfigError, match='max_objects'):
    oi.synthetic_shapes(2, 2, max_boxes=2, max_objects=3)
  with pytest.raises(ConfigError, match='image_size'):
    oi.synthetic_shapes(2, 2, image_size=(0, 8))
  with pytest.raises(ConfigError, match='hflip_prob'):
    oi.open_openimages(tiny, hflip_prob=1.5)
