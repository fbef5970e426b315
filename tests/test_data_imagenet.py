"""ImageNet readers: formats, determinism, resumption, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from jaxperf.data import imagenet, tfrecord
from jaxperf.errors import DataError
from tests import imagenet_fixtures as fx


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return fx.write_jpeg_folder(tmp_path_factory.mktemp('jpeg'))


def _open(path, **kw):
  kw = {'image_size': 24, 'seed': 3, 'num_workers': 2, **kw}
  return imagenet.open_imagenet(str(path), **kw)


def test_folder_shapes_labels_and_classes(folder):
  train, evals = _open(folder)
  assert (train.num_examples, evals.num_examples) == (24, 8)
  assert train.num_classes == evals.num_classes == 4
  b = _take(train.train_batches(0, 8), 1)[0]
  assert b['image'].shape == (8, 24, 24, 3) and b['image'].dtype == np.uint8
  assert b['label'].dtype == np.int32
  # Labels are the sorted wnid order; each class has its own colour.
  colours = fx._colours(4)
  for img, label in zip(b['image'], b['label']):
    mean = img.reshape(-1, 3).mean(0)
    assert np.argmin(((colours - mean) ** 2).sum(1)) == label
  train.close()
  evals.close()


def test_train_stream_is_deterministic_and_worker_independent(folder):
  a, _ = _open(folder, num_workers=1)
  b, _ = _open(folder, num_workers=4)
  for x, y in zip(_take(a.train_batches(0, 8), 4), _take(b.train_batches(0, 8), 4)):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_resume_mid_stream_across_an_epoch_boundary(folder):
  train, _ = _open(folder)
  full = _take(train.train_batches(0, 10), 6)    # 60 slots = 2.5 epochs of 24
  tail = _take(train.train_batches(2, 10), 4)    # step 2 spans epochs 0 and 1
  for x, y in zip(full[2:], tail):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_each_example_once_per_epoch(folder):
  train, _ = _open(folder)
  records = train.records
  # With augmentation off the table, check the index stream via labels:
  # 24 examples, 6 per class: one epoch (3 batches of 8) has 6 of each.
  labels = np.concatenate([b['label'] for b in _take(train.train_batches(0, 8), 3)])
  assert np.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
  assert len(records) == 24


def test_process_slices_make_up_the_global_batch(folder):
  train, _ = _open(folder)
  whole = _take(train.train_batches(1, 8), 1)[0]
  parts = [_take(train.train_batches(1, 8, process_index=i, process_count=2), 1)[0]
           for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([p['image'] for p in parts]), whole['image'])
  with pytest.raises(DataError, match='does not split'):
    next(train.train_batches(0, 7, process_index=0, process_count=2))


def test_eval_covers_each_example_once_center_cropped(folder):
  _, evals = _open(folder)
  batches = list(evals.eval_batches(3))
  mask = np.concatenate([b['mask'] for b in batches])
  assert len(batches) == 3 and mask.sum() == 8 and not mask[8:].any()
  labels = np.concatenate([b['label'] for b in batches])[:8]
  assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  # Deterministic: a second pass gives the same pixels.
  again = list(evals.eval_batches(3))
  for x, y in zip(batches, again):
    np.testing.assert_array_equal(x['image'], y['image'])


def test_eval_crop_matches_the_reference_recipe():
  img = Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (300, 400, 3), dtype=np.uint8))
  out = imagenet.center_crop(img, 224)
  assert out.size == (224, 224)
  # Shorter side 300 -> 256, longer 400 -> 341; the crop is centered.
  ref = img.resize((341, 256), Image.BILINEAR).crop((58, 16, 282, 240))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_random_crop_respects_area_and_aspect_bounds():
  img = Image.new('RGB', (200, 100))
  rng = np.random.default_rng(0)
  for _ in range(50):
    out = imagenet.random_resized_crop(img, 32, rng)
    assert out.size == (32, 32)


def test_corrupt_jpeg_names_the_file(tmp_path):
  root = fx.write_jpeg_folder(tmp_path / 'bad', train_per_class=2)
  victim = sorted((root / 'train' / fx.wnid(1)).iterdir())[0]
  victim.write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
  train, _ = _open(root)
  with pytest.raises(DataError, match=f'corrupt image {victim}'):
    _take(train.train_batches(0, 8), 1)


@pytest.mark.parametrize('make, expect', [
    (lambda p: None, 'no such directory'),
    (lambda p: p.mkdir(), 'the directory is empty'),
    (lambda p: (p / 'train').mkdir(parents=True), 'has train/ but no val/'),
    (lambda p: ((p / 'train').mkdir(parents=True), (p / 'val').mkdir()),
     'no class directories'),
    (lambda p: ((p / 'train' / 'n1').mkdir(parents=True), (p / 'val').mkdir()),
     'no images'),
    (lambda p: (p.mkdir(), (p / 'readme.txt').write_text('x')),
     'no ImageNet found'),
])
def test_bad_directories(tmp_path, make, expect):
  path = tmp_path / 'data'
  make(path)
  with pytest.raises(DataError, match=expect):
    _open(path)


def test_val_class_not_in_train(tmp_path):
  root = fx.write_jpeg_folder(tmp_path / 'd', num_classes=2, train_per_class=1)
  extra = root / 'val' / 'n99999999'
  extra.mkdir()
  (extra / 'x.JPEG').write_bytes(fx.make_jpeg(0, 0, 2))
  with pytest.raises(DataError, match='not in the training classes'):
    _open(root)


# ---------------------------------------------------------------- TFRecords


def test_tfrecord_roundtrip_and_example_parsing(tmp_path):
  path = str(tmp_path / 'r')
  tfrecord.write_examples(path, [
      {'image/encoded': b'\x00\x01jpeg', 'image/class/label': 7,
       'image/object/bbox/xmin': [0.25, 0.5], 'neg': [-5, 1 << 40]},
      {'image': b'x' * 1000, 'label': 0}])
  got = [tfrecord.parse_example(r) for r in tfrecord.iter_records(path)]
  assert got[0] == {'image/encoded': [b'\x00\x01jpeg'], 'image/class/label': [7],
                    'image/object/bbox/xmin': [0.25, 0.5], 'neg': [-5, 1 << 40]}
  assert got[1] == {'image': [b'x' * 1000], 'label': [0]}


def test_tfrecord_corruption_is_detected(tmp_path):
  path = tmp_path / 'r'
  tfrecord.write_examples(str(path), [{'a': b'y' * 100}, {'a': b'z' * 100}])
  data = bytearray(path.read_bytes())
  data[40] ^= 0xFF                        # inside the first record's data
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match='bad data checksum'):
    list(tfrecord.iter_records(str(path)))
  path.write_bytes(bytes(data[:-10]))     # and a truncated file
  with pytest.raises(DataError, match='truncated'):
    tfrecord.index_records(str(path))


@pytest.mark.parametrize('writer', [fx.write_mlperf_tfrecords,
                                    fx.write_tfds_tfrecords])
def test_tfrecord_layouts_read_like_the_folder(tmp_path, folder, writer):
  root = writer(tmp_path / 'tfr')
  train, evals = _open(root)
  ftrain, fevals = _open(folder)
  assert (train.num_examples, evals.num_examples) == (24, 8)
  # Same images, same labels (the MLPerf files store labels 1-based).
  tr = sorted(train.records.read(i)[1] for i in range(24))
  assert tr == sorted(ftrain.records.labels.tolist())
  want = {fevals.records.read(i)[0]: fevals.records.read(i)[1] for i in range(8)}
  got = {evals.records.read(i)[0]: evals.records.read(i)[1] for i in range(8)}
  assert got == want
  b = _take(train.train_batches(0, 8), 1)[0]
  assert b['image'].shape == (8, 24, 24, 3)


def test_tfrecord_label_out_of_range_names_the_record(tmp_path):
  root = tmp_path / 'm'
  root.mkdir()
  data = fx.make_jpeg(0, 0, 2)
  for split in ('train', 'validation'):
    tfrecord.write_examples(str(root / f'{split}-00000-of-00001'),
                            [{'image/encoded': data, 'image/class/label': 0}])
  train, _ = _open(root)
  with pytest.raises(DataError, match=r'train-00000-of-00001 \(record at byte 0\)'
                     r': stored label 0 gives class -1, outside \[0, 1000\)'):
    train.records.read(0)
