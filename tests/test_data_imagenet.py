"""ImageNet readers: layouts, preprocessing, order, resumption and errors."""

from __future__ import annotations

import io
import struct
import threading
import time

import numpy as np
import pytest
from PIL import Image

from jaxperf.data import augment, imagenet, prefetch, tfrecord
from jaxperf.errors import ConfigError, DataError
from tests import imagenet_fixtures as fx
from tests.batches import assert_batches_equal, take

S = 24          # image size used throughout: small keeps the tests fast
SEED = 3


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return fx.write_jpeg_folder(tmp_path_factory.mktemp('jpeg'))


@pytest.fixture
def opened(request):
  """opened(path, **kw) -> (train, eval), closed after the test."""
  datasets = []

  def open_(path, **kw):
    kw = {'image_size': S, 'seed': SEED, 'num_workers': 2, **kw}
    pair = imagenet.open_imagenet(path, **kw)
    datasets.extend(pair)
    return pair

  yield open_
  for ds in datasets:
    ds.close()


def _nearest_class(image: np.ndarray, num_classes: int) -> int:
  colours = np.stack([fx.class_colour(c, num_classes)
                      for c in range(num_classes)])
  mean = image.reshape(-1, 3).mean(0)
  return int(np.argmin(((colours - mean) ** 2).sum(1)))


# ---------------------------------------------------------------- streams


def test_shapes_dtypes_and_labels_per_class(folder, opened):
  train, evals = opened(folder)
  assert (train.num_examples, evals.num_examples) == (24, 8)
  assert train.num_classes == evals.num_classes == 4
  assert train.classes == [fx.wnid(c) for c in range(4)]
  b = take(train.train_batches(0, 8), 1)[0]
  assert set(b) == {'image', 'label'}
  assert b['image'].shape == (8, S, S, 3) and b['image'].dtype == np.uint8
  assert b['label'].shape == (8,) and b['label'].dtype == np.int32
  e = next(iter(evals.eval_batches(8)))
  assert set(e) == {'image', 'label', 'mask'}
  assert e['image'].shape == (8, S, S, 3) and e['mask'].dtype == bool
  # Each class has its own colour, and the label is that class's id.
  for batch in (b, e):
    for img, label in zip(batch['image'], batch['label']):
      assert _nearest_class(img, 4) == label


def test_same_seed_same_stream_whatever_the_workers(folder, opened):
  one, _ = opened(folder, num_workers=1, prefetch=0)
  four, _ = opened(folder, num_workers=4, prefetch=3)
  again, _ = opened(folder, num_workers=4)
  a = take(one.train_batches(0, 8), 4)
  assert_batches_equal(a, take(four.train_batches(0, 8), 4))
  assert_batches_equal(a, take(again.train_batches(0, 8), 4))
  other, _ = opened(folder, seed=SEED + 1)
  b = take(other.train_batches(0, 8), 1)[0]
  assert not np.array_equal(a[0]['image'], b['image'])


def test_resume_equals_the_uninterrupted_stream(folder, opened):
  train, _ = opened(folder)
  full = take(train.train_batches(0, 10), 7)    # 70 slots: ~3 epochs of 24
  for k in (2, 5):                               # step 2 spans epochs 0 and 1
    assert_batches_equal(full[k:], take(train.train_batches(k, 10), 7 - k))


def test_each_example_once_per_epoch(folder, opened):
  train, _ = opened(folder)
  n, gb = train.num_examples, 10                 # batches straddle epochs
  order = [train.train_order(s, gb) for s in range(12)]   # 120 slots = 5 epochs
  index = np.concatenate([i for i, _ in order])
  epochs = np.concatenate([e for _, e in order])
  np.testing.assert_array_equal(epochs, np.arange(120) // n)
  for e in range(5):
    epoch_index = index[epochs == e]
    assert sorted(epoch_index.tolist()) == list(range(n))
    np.testing.assert_array_equal(epoch_index, train.permutation(e))
  assert not np.array_equal(train.permutation(0), train.permutation(1))
  # The stream serves exactly those examples.
  labels = np.concatenate([b['label'] for b in
                           take(train.train_batches(0, gb), 12)])
  np.testing.assert_array_equal(labels, train.labels[index])


def test_process_slices_make_up_the_global_batch(folder, opened):
  train, evals = opened(folder)
  whole = take(train.train_batches(2, 8), 2)
  parts = [take(train.train_batches(2, 8, process_index=p, process_count=2),
                 2) for p in range(2)]
  for t in range(2):
    for k in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][t][k], parts[1][t][k]]), whole[t][k])
  whole = list(evals.eval_batches(6))
  parts = [list(evals.eval_batches(6, process_index=p, process_count=3))
           for p in range(3)]
  for t, w in enumerate(whole):
    for k in w:
      np.testing.assert_array_equal(
          np.concatenate([parts[p][t][k] for p in range(3)]), w[k])
  with pytest.raises(ConfigError, match='global batch 7 does not split over 2'):
    train.train_batches(0, 7, process_index=0, process_count=2)
  with pytest.raises(ConfigError, match='global batch 7 does not split over 2'):
    evals.eval_batches(7, process_index=1, process_count=2)


def test_eval_covers_each_example_once_with_padding(folder, opened):
  _, evals = opened(folder)
  batches = list(evals.eval_batches(3))
  assert len(batches) == 3
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])
  assert mask.tolist() == [True] * 8 + [False]
  assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]
  assert not images[8].any()
  # Sorted order: the i-th real example is the i-th file, center-cropped.
  for i in range(8):
    data, label, _ = evals.read(i)
    np.testing.assert_array_equal(images[i], augment.eval_image(data, '', S))
    assert label == labels[i]
  # A batch bigger than the split; deterministic across passes.
  (big,) = list(evals.eval_batches(16))
  assert big['mask'].sum() == 8 and not big['mask'][8:].any()
  np.testing.assert_array_equal(big['image'][:8], images[:8])


def test_close_stops_the_threads(folder):
  train, evals = imagenet.open_imagenet(folder, image_size=S, seed=0,
                                        num_workers=3, prefetch=2)
  it = train.train_batches(0, 4)
  next(it)
  assert it.running
  train.close()
  evals.close()
  assert not it.running
  assert list(it) == []
  with pytest.raises(RuntimeError, match='closed'):
    train.train_batches(0, 4)
  deadline = time.monotonic() + 5
  while any(t.name.startswith('ImageFolderDataset')
            for t in threading.enumerate()) and time.monotonic() < deadline:
    time.sleep(0.02)
  assert not [t.name for t in threading.enumerate()
              if t.name.startswith('ImageFolderDataset')]


# ---------------------------------------------------------------- preprocessing


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_decode_makes_rgb_of_any_mode():
  rgb = Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (30, 40, 3), dtype=np.uint8))
  for data in (_encode(rgb, 'JPEG'), _encode(rgb.convert('L'), 'JPEG'),
               _encode(rgb.convert('CMYK'), 'JPEG'), _encode(rgb, 'PNG'),
               _encode(rgb.convert('RGBA'), 'PNG'),
               _encode(rgb.convert('P'), 'PNG')):
    img = augment.decode_image(data, 'x.JPEG')
    assert img.mode == 'RGB' and img.size == (40, 30)
    out = augment.train_image(data, 'x', S, np.random.default_rng(0))
    assert out.shape == (S, S, 3)
    assert augment.eval_image(data, 'x', S).shape == (S, S, 3)


def test_eval_resize_and_center_crop_follow_the_reference():
  assert augment.eval_resize_shape(400, 300, 224) == (341, 256)
  assert augment.eval_resize_shape(300, 400, 224) == (256, 341)
  assert augment.eval_resize_shape(500, 500, 224) == (256, 256)
  assert augment.eval_resize_shape(400, 300, 128) == (194, 146)
  img = Image.fromarray(np.random.default_rng(0).integers(
      0, 256, (300, 400, 3), dtype=np.uint8))
  out = augment.eval_image(_encode(img, 'PNG'), 'x', 224)
  ref = img.resize((341, 256), Image.BILINEAR).crop((58, 16, 282, 240))
  np.testing.assert_array_equal(out, np.asarray(ref))


def test_random_crop_bounds_and_fallback():
  rng = np.random.default_rng(0)
  for w, h in ((500, 375), (375, 500), (64, 48)):
    crops = np.array([augment.sample_crop(w, h, rng) for _ in range(500)])
    x, y, cw, ch = crops.T
    assert (x >= 0).all() and (y >= 0).all()
    assert (x + cw <= w).all() and (y + ch <= h).all()
    area = cw * ch / (w * h)
    # min_object_covered=0.1 against the whole image raises the 0.05 floor.
    assert area.min() >= 0.1 and area.max() <= 1.0 and area.mean() < 0.6
    aspect = cw / ch
    slack = 1.5 / ch.min()                      # width is rounded to a pixel
    assert aspect.min() >= 0.75 - slack and aspect.max() <= 1.33 + slack
  # No crop of a 50:1 strip fits the aspect range: the whole image is used.
  assert augment.sample_crop(1000, 20, rng) == (0, 0, 1000, 20)
  assert augment.sample_crop(1, 1, rng) == (0, 0, 1, 1)


def test_train_image_is_a_function_of_its_rng(monkeypatch):
  img = Image.fromarray(np.random.default_rng(1).integers(
      0, 256, (50, 70, 3), dtype=np.uint8))
  data = _encode(img, 'PNG')
  outs = [augment.train_image(data, 'x', S, np.random.default_rng([0, 0, i, 1]))
          for i in range(20)]
  again = augment.train_image(data, 'x', S, np.random.default_rng([0, 0, 0, 1]))
  np.testing.assert_array_equal(outs[0], again)
  assert len({o.tobytes() for o in outs}) == 20
  # With the crop pinned to the whole image, what is left is the flip.
  monkeypatch.setattr(augment, 'sample_crop', lambda w, h, rng: (0, 0, w, h))
  plain = np.asarray(img.resize((S, S), Image.BILINEAR))
  flips = []
  for i in range(200):
    out = augment.train_image(data, 'x', S, np.random.default_rng(i))
    flipped = np.array_equal(out, plain[:, ::-1])
    assert flipped or np.array_equal(out, plain)
    flips.append(flipped)
  assert 70 < sum(flips) < 130


# ---------------------------------------------------------------- errors


def test_corrupt_jpeg_names_the_file(tmp_path, opened):
  root = fx.write_jpeg_folder(tmp_path / 'bad', train_per_class=2)
  victim = sorted((root / 'train' / fx.wnid(1)).iterdir())[0]
  victim.write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
  train, _ = opened(root)
  with pytest.raises(DataError, match=f'corrupt image {victim}: cannot be '
                     'decoded'):
    take(train.train_batches(0, 8), 1)
  train, _ = opened(root, prefetch=0)
  with pytest.raises(DataError, match=f'corrupt image {victim}'):
    take(train.train_batches(0, 8), 1)
  truncated = sorted((root / 'val' / fx.wnid(2)).iterdir())[0]
  truncated.write_bytes(truncated.read_bytes()[:200])
  _, evals = opened(root)
  with pytest.raises(DataError, match=f'corrupt image {truncated}'):
    list(evals.eval_batches(8))


def _mk(path, *dirs, files=()):
  for d in dirs:
    (path / d).mkdir(parents=True, exist_ok=True)
  for f in files:
    (path / f).parent.mkdir(parents=True, exist_ok=True)
    (path / f).write_bytes(b'x')


@pytest.mark.parametrize('make, expect', [
    (lambda p: None, r'--data-dir \S+/data: no such directory'),
    (lambda p: p.mkdir(), r'/data: the directory is empty'),
    (lambda p: _mk(p, 'train'), r'/data: has train/ but no val/'),
    (lambda p: _mk(p, 'val/n1', files=['val/n1/a.JPEG']),
     r'/data: has val/ but no train/'),
    (lambda p: _mk(p, 'train', 'val'), r'/data/train: no class directories'),
    (lambda p: _mk(p, 'train/n1', 'train/n2', 'val', files=['train/n1/a.JPEG']),
     r'/data/train/n2: no images \(expected \S+/train/n2/\*\.JPEG\)'),
    (lambda p: _mk(p, 'train/n1', 'val', files=['train/n1/a.JPEG',
                                                 'val/ILSVRC2012_val_1.JPEG']),
     r'/data/val: holds image files directly'),
    (lambda p: _mk(p, 'train/n1', 'val/n1', files=['train/n1/a.JPEG',
                                                    'train/n1/notes.txt']),
     r'/data/train/n1/notes.txt: not an image file'),
    (lambda p: _mk(p, 'train/n1', 'val/n1', 'val/n7',
                   files=['train/n1/a.jpg', 'val/n1/b.png', 'val/n7/c.jpeg']),
     r'/data/val: class directories not among the 1 training classes: n7'),
    (lambda p: _mk(p, files=['readme.txt']), r'/data: no ImageNet found'),
    (lambda p: _mk(p, files=['train-00000-of-00002', 'train-00001-of-00002']),
     r'MLPerf reference TFRecord training shards but no validation shards'),
    (lambda p: _mk(p, files=['train-00000-of-00003', 'train-00002-of-00003',
                             'validation-00000-of-00001']),
     r'/data: incomplete shard set like train-00000-of-00003: missing shard '
     r'numbers \[1\]'),
    (lambda p: _mk(p, files=['train-00000-of-00002', 'train-00000-of-00003']),
     r'/data: shards of different sets \(-of-00002, -of-00003\)'),
    (lambda p: _mk(p, files=['imagenet2012/5.1.0/imagenet2012-validation.'
                             'tfrecord-00000-of-00001']),
     r'/data/imagenet2012/5.1.0: TFDS imagenet2012 validation shards but no '
     r'training shards'),
])
def test_bad_directories(tmp_path, opened, make, expect):
  path = tmp_path / 'data'
  make(path)
  with pytest.raises(DataError, match=expect):
    opened(path)


def test_folder_dataset_splits_and_classes(folder):
  with imagenet.ImageFolderDataset(folder, 'validation', image_size=S) as val:
    assert val.split_dir == str(folder / 'val')
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
  names = ['n99999999'] + [fx.wnid(c) for c in range(4)]
  with imagenet.ImageFolderDataset(folder, 'train', image_size=S,
                                   classes=names) as train:
    assert train.num_classes == 5
    assert sorted(set(train.labels.tolist())) == [1, 2, 3, 4]
  with pytest.raises(DataError, match='not among the 2 training classes'):
    imagenet.ImageFolderDataset(folder, 'train', image_size=S,
                                classes=[fx.wnid(0), fx.wnid(1)])
  with pytest.raises(ValueError, match="split must be one of"):
    imagenet.ImageFolderDataset(folder, 'test', image_size=S)


def test_folder_dataset_missing_split(tmp_path):
  fx.write_jpeg_folder(tmp_path, num_classes=2, train_per_class=1,
                      val_per_class=1)
  (tmp_path / 'val' / fx.wnid(0) / f'ILSVRC2012_val_{1:08d}.JPEG').unlink()
  with pytest.raises(DataError,
                     match=rf'{tmp_path}/val/{fx.wnid(0)}: no images'):
    imagenet.ImageFolderDataset(tmp_path, 'val', image_size=S)
  for d in (tmp_path / 'val').iterdir():
    for f in d.iterdir():
      f.unlink()
    d.rmdir()
  (tmp_path / 'val').rmdir()
  with pytest.raises(DataError, match=rf'{tmp_path}: no val/ or validation/ '
                     r'directory \(expected the ImageNet folder layout'):
    imagenet.ImageFolderDataset(tmp_path, 'val', image_size=S)


# ---------------------------------------------------------------- TFRecords


def test_masked_crc_matches_the_crc32c_check_value():
  crc = 0xE3069283                       # crc32c(b'123456789'), the standard
  masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
  assert tfrecord.masked_crc32c(b'123456789') == masked


def test_tfrecord_roundtrip(tmp_path):
  path = tmp_path / 'r.tfrecord'
  examples = [
      {'image/encoded': b'\x00\x01jpeg', 'image/class/label': 7,
       'image/object/bbox/xmin': [0.25, 0.5], 'neg': [-5, 1 << 40, 0],
       'names': [b'a', 'b'], 'text': 'caf\u00e9'},
      {'image': b'x' * 100_000, 'label': [0]},
  ]
  tfrecord.write_tfrecord(path, examples)
  got = [tfrecord.parse_example(r) for r in tfrecord.read_records(path)]
  assert got == [
      {'image/encoded': [b'\x00\x01jpeg'], 'image/class/label': [7],
       'image/object/bbox/xmin': [0.25, 0.5], 'neg': [-5, 1 << 40, 0],
       'names': [b'a', b'b'], 'text': ['caf\u00e9'.encode()]},
      {'image': [b'x' * 100_000], 'label': [0]}]
  offsets, lengths = tfrecord.index_records(path)
  assert offsets[0] == 0 and offsets[1] == 12 + lengths[0] + 4
  assert path.stat().st_size == offsets[1] + 12 + lengths[1] + 4
  only = tfrecord.parse_example(tfrecord.serialize_example(examples[0]),
                                keys=['neg'])
  assert only == {'neg': [-5, 1 << 40, 0]}
  with pytest.raises(ValueError, match="feature 'e': an empty list"):
    tfrecord.serialize_example({'e': []})


def test_example_parser_accepts_unpacked_numbers_and_skips_unknown_fields():
  def delim(n, payload):
    return bytes([n << 3 | 2, len(payload)]) + payload
  ints = delim(3, bytes([1 << 3 | 0, 5, 1 << 3 | 0, 3]))         # unpacked
  floats = delim(2, bytes([1 << 3 | 5]) + struct.pack('<f', 1.5))
  entry = lambda k, f: delim(1, delim(1, k) + delim(2, f) + b'\x18\x01')
  data = delim(1, entry(b'i', ints) + entry(b'f', floats)) + b'\x10\x07'
  assert tfrecord.parse_example(data) == {'i': [5, 3], 'f': [1.5]}


def test_example_wire_format_matches_protobuf():
  descriptor_pb2 = pytest.importorskip('google.protobuf.descriptor_pb2')
  # pylint: disable-next=g-import-not-at-top
  from google.protobuf import descriptor_pool, message_factory
  f = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(
      name='jaxperf_test_example.proto', package='jaxperf_test',
      syntax='proto3')

  def message(name, *fields, nested=(), oneof=None):
    m = proto.message_type.add(name=name)
    if oneof:
      m.oneof_decl.add(name=oneof)
    for fname, number, ftype, label, type_name in fields:
      fd = m.field.add(name=fname, number=number, type=ftype, label=label)
      if type_name:
        fd.type_name = type_name
      if oneof:
        fd.oneof_index = 0
    for n in nested:
      m.nested_type.add().CopyFrom(n)
    return m

  rep, opt = f.LABEL_REPEATED, f.LABEL_OPTIONAL
  message('BytesList', ('value', 1, f.TYPE_BYTES, rep, None))
  message('FloatList', ('value', 1, f.TYPE_FLOAT, rep, None))
  message('Int64List', ('value', 1, f.TYPE_INT64, rep, None))
  lists = ((1, 'bytes_list', 'BytesList'), (2, 'float_list', 'FloatList'),
           (3, 'int64_list', 'Int64List'))
  message('Feature', *[(name, n, f.TYPE_MESSAGE, opt, f'.jaxperf_test.{t}')
                       for n, name, t in lists], oneof='kind')
  entry = descriptor_pb2.DescriptorProto(name='FeatureEntry')
  entry.options.map_entry = True
  entry.field.add(name='key', number=1, type=f.TYPE_STRING, label=opt)
  entry.field.add(name='value', number=2, type=f.TYPE_MESSAGE, label=opt,
                  type_name='.jaxperf_test.Feature')
  message('Features', ('feature', 1, f.TYPE_MESSAGE, rep,
                       '.jaxperf_test.Features.FeatureEntry'), nested=[entry])
  message('Example', ('features', 1, f.TYPE_MESSAGE, opt,
                      '.jaxperf_test.Features'))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  example_cls = message_factory.GetMessageClass(
      pool.FindMessageTypeByName('jaxperf_test.Example'))

  ex = example_cls()
  feats = ex.features.feature
  feats['image'].bytes_list.value.extend([b'\xff\xd8jpeg', b''])
  feats['label'].int64_list.value.extend([999, -1, 1 << 62])
  feats['box'].float_list.value.extend([0.125, -2.0])
  expect = {'image': [b'\xff\xd8jpeg', b''], 'label': [999, -1, 1 << 62],
            'box': [0.125, -2.0]}
  assert tfrecord.parse_example(ex.SerializeToString()) == expect
  back = example_cls.FromString(tfrecord.serialize_example(expect))
  assert back == ex


def test_tfrecord_corruption_and_truncation_name_the_record(tmp_path):
  path = tmp_path / 'train-00000-of-00001'
  tfrecord.write_tfrecord(path, [{'a': b'y' * 100}, {'a': b'z' * 100}])
  good = path.read_bytes()
  first = len(good) // 2
  data = bytearray(good)
  data[first + 40] ^= 0xFF               # inside the second record's data
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match=rf'corrupt TFRecord {path} record 1 '
                     rf'\(byte offset {first}\): the data fails its crc32c'):
    list(tfrecord.read_records(path))
  data = bytearray(good)
  data[first + 2] ^= 0x01                # the second record's length
  path.write_bytes(bytes(data))
  with pytest.raises(DataError, match=rf'{path} record 1 \(byte offset '
                     rf'{first}\): the length field fails its crc32c'):
    tfrecord.index_records(path)
  path.write_bytes(good[:-10])
  with pytest.raises(DataError, match=rf'truncated TFRecord {path} record 1'):
    tfrecord.index_records(path)
  path.write_bytes(good + b'\x00' * 5)
  with pytest.raises(DataError, match=r'record 2 .*expected a 12-byte record '
                     r'header'):
    tfrecord.index_records(path)


@pytest.mark.parametrize('writer', [fx.write_mlperf_tfrecords,
                                    fx.write_tfds_tfrecords])
def test_tfrecord_layouts_give_the_folder_batches(tmp_path, folder, opened,
                                                  writer):
  train, evals = opened(writer(tmp_path / 'tfr'))
  ftrain, fevals = opened(folder)
  assert isinstance(train, tfrecord.TFRecordImageNet)
  assert (train.num_examples, evals.num_examples) == (24, 8)
  assert train.num_classes == 1000
  for i in range(24):
    assert train.read(i)[:2] == ftrain.read(i)[:2]
  assert_batches_equal(take(train.train_batches(1, 10), 3),
                        take(ftrain.train_batches(1, 10), 3))
  assert_batches_equal(list(evals.eval_batches(5)),
                        list(fevals.eval_batches(5)))


def test_tfrecord_bad_records_name_file_and_record(tmp_path, opened):
  root = tmp_path / 'm'
  root.mkdir()
  jpeg = fx.make_jpeg(0, 2, np.random.default_rng(0))
  examples = [{'image/encoded': jpeg, 'image/class/label': 1},
              {'image/encoded': jpeg, 'image/class/label': 0},
              {'image/encoded': jpeg, 'image/class/label': 1001},
              {'image/class/label': 3}]
  # The last record is intact as a record, but its Example is cut short.
  tfrecord.write_records(
      root / 'train-00000-of-00001',
      [tfrecord.serialize_example(e) for e in examples] + [b'\x0a\x09\x0a'])
  tfrecord.write_tfrecord(root / 'validation-00000-of-00001',
                          [{'image/encoded': jpeg, 'image/class/label': 1}])
  train, _ = opened(root)
  offsets, _ = tfrecord.index_records(root / 'train-00000-of-00001')
  assert train.read(0)[1] == 0
  where = lambda i: (rf'train-00000-of-00001 record {i} '
                     rf'\(byte offset {offsets[i]}\)')
  with pytest.raises(DataError, match=where(1) + r": label 0 in "
                     r"'image/class/label' gives class -1 \(offset -1\), "
                     r'outside \[0, 1000\)'):
    train.read(1)
  with pytest.raises(DataError, match=where(2) + ': label 1001'):
    train.read(2)
  with pytest.raises(DataError, match=where(3) + r": expected one encoded "
                     r"image in 'image/encoded'"):
    train.read(3)
  with pytest.raises(DataError, match=where(4) + ': not a valid '
                     r'tf.train.Example \(field 1 runs past the end'):
    train.read(4)
  # A record whose image does not decode stops the stream, naming it.
  tfrecord.write_tfrecord(root / 'train-00000-of-00001', [
      {'image/encoded': jpeg, 'image/class/label': 1},
      {'image/encoded': b'not a jpeg', 'image/class/label': 2}])
  offsets, _ = tfrecord.index_records(root / 'train-00000-of-00001')
  train, _ = opened(root)
  with pytest.raises(DataError, match='corrupt image .*' + where(1) +
                     ': cannot be decoded'):
    take(train.train_batches(0, 2), 1)


def test_open_imagenet_detects_all_layouts(tmp_path, folder, opened):
  mlperf = fx.write_mlperf_tfrecords(tmp_path / 'mlperf', train_shards=5,
                                     val_shards=1)
  tfds = fx.write_tfds_tfrecords(tmp_path / 'tfds')
  assert imagenet.find_imagenet(folder)[0] == 'folder'
  layout, train, val = imagenet.find_imagenet(mlperf)
  assert layout == 'mlperf' and len(train) == 5 and len(val) == 1
  assert train[0].endswith('train-00000-of-00005')
  fx.write_tfds_tfrecords(tmp_path / 'tfds', version='4.0.0', train_shards=1)
  for path in (tmp_path / 'tfds', tfds, tfds / '5.1.0'):
    layout, train, _ = imagenet.find_imagenet(path)
    assert layout == 'tfds' and len(train) == 3       # the newest version
    assert '/5.1.0/imagenet2012-train.tfrecord-00000-of-00003' in train[0]
  for path, kind, keys in ((folder, imagenet.ImageFolderDataset, None),
                           (mlperf, tfrecord.TFRecordImageNet,
                            ('image/encoded', 'image/class/label', -1)),
                           (tfds, tfrecord.TFRecordImageNet,
                            ('image', 'label', 0))):
    train, evals = opened(path)
    assert type(train) is kind and type(evals) is kind
    if keys:
      assert (train.image_key, train.label_key, train.label_offset) == keys


# ---------------------------------------------------------------- prefetch


def test_prefetcher_orders_bounds_and_propagates_errors():
  produced = []

  def source():
    for i in range(100):
      produced.append(i)
      yield i

  with prefetch.Prefetcher(source(), 3) as p:
    assert next(p) == 0
    time.sleep(0.2)
    assert len(produced) <= 5             # 1 taken + 3 queued + 1 waiting
    assert list(p) == list(range(1, 100))

  def failing():
    yield 1
    raise DataError('bad file /x/y.JPEG')

  p = prefetch.Prefetcher(failing(), 2)
  assert next(p) == 1
  with pytest.raises(DataError, match='/x/y.JPEG'):
    next(p)
  assert list(p) == []


def test_prefetcher_close_runs_the_source_cleanup():
  cleaned = threading.Event()

  def endless():
    try:
      while True:
        yield np.zeros(3)
    finally:
      cleaned.set()

  p = prefetch.Prefetcher(endless(), 2)
  next(p)
  p.close()
  assert cleaned.wait(5) and not p.running
  with pytest.raises(StopIteration):
    next(p)
  cleaned.clear()
  p = prefetch.Prefetcher(endless(), 2)
  next(p)
  del p                                   # dropped without close()
  assert cleaned.wait(5)
