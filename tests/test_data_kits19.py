"""KiTS19: format, split, order, augmentation, synthetic cases, errors."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from jaxperf.data import kits19
from jaxperf.errors import DataError
from tests.batches import assert_batches_equal, take

P = (8, 8, 8)       # training patch used throughout: small keeps tests fast
SEED = 5
FLIPS = ([], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2])


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """12 train + 4 eval synthetic cases of 12^3 in the reference format."""
  path = tmp_path_factory.mktemp('kits19')
  train_ids, eval_ids = kits19.make_tiny_dataset(path, 12, 4, (12, 12, 12),
                                                 seed=1)
  return path, train_ids, eval_ids


@pytest.fixture
def opened():
  """opened(path, **kw) -> (train, eval), closed after the test."""
  datasets = []

  def open_(path, **kw):
    kw = {'patch_shape': P, 'seed': SEED, 'num_workers': 2, **kw}
    pair = kits19.open_kits19(path, **kw)
    datasets.extend(pair)
    return pair

  yield open_
  for ds in datasets:
    ds.close()


def _write_split(path, eval_ids):
  (path / kits19.SPLIT_FILE).write_text(''.join(f'{c}\n' for c in eval_ids))


# ---------------------------------------------------------------- format


def test_write_case_round_trip(tmp_path, opened):
  rng = np.random.default_rng(0)
  cases = {}
  for i, shape in enumerate([(9, 10, 11), (8, 12, 8), (10, 8, 9)]):
    image = rng.standard_normal(shape).astype(np.float32)
    label = rng.integers(0, 3, shape)
    # [1, D, H, W] is accepted as well as [D, H, W].
    args = (image[None], label[None]) if i == 1 else (image, label)
    x_path, y_path = kits19.write_case(tmp_path, f'case_{i:05d}', *args)
    cases[f'case_{i:05d}'] = (image, label)
    x, y = np.load(x_path), np.load(y_path)
    assert x.dtype == np.float32 and x.shape == (1, *shape)
    assert y.dtype == np.uint8 and y.shape == (1, *shape)
  _write_split(tmp_path, ['case_00001', 'case_00002'])
  train, evals = opened(tmp_path)
  assert train.case_ids == ['case_00000']
  assert evals.case_ids == ['case_00001', 'case_00002']
  for ds in (train, evals):
    for case_id, image, label in ds.cases():
      assert image.dtype == np.float32 and label.dtype == np.uint8
      np.testing.assert_array_equal(image, cases[case_id][0])
      np.testing.assert_array_equal(label, cases[case_id][1])
  with pytest.raises(ValueError, match='label values'):
    kits19.write_case(tmp_path, 'bad', np.zeros(P), np.full(P, 3))
  with pytest.raises(ValueError, match='same shape'):
    kits19.write_case(tmp_path, 'bad', np.zeros(P), np.zeros((8, 8, 9)))


def test_shapes_and_dtypes(tiny, opened):
  path, train_ids, eval_ids = tiny
  train, evals = opened(path)
  assert (train.num_examples, evals.num_examples) == (12, 4)
  assert train.case_ids == train_ids and evals.case_ids == eval_ids
  b = take(train.train_batches(0, 4), 1)[0]
  assert set(b) == {'image', 'label'}
  assert b['image'].shape == (4, *P, 1) and b['image'].dtype == np.float32
  assert b['label'].shape == (4, *P) and b['label'].dtype == np.int32
  assert set(np.unique(b['label'])) <= {0, 1, 2}
  got = list(evals.cases())
  assert [c for c, _, _ in got] == eval_ids
  for _, image, label in got:
    assert image.shape == label.shape == (12, 12, 12)
    assert image.dtype == np.float32 and label.dtype == np.uint8
  with pytest.raises(DataError, match='whole cases'):
    evals.eval_batches(2)
  with pytest.raises(ValueError, match='cases()'):
    evals.train_batches(0, 2)


# ---------------------------------------------------------------- order


def test_same_seed_same_stream_whatever_the_workers(tiny, opened):
  one, _ = opened(tiny[0], num_workers=1, prefetch=0)
  three, _ = opened(tiny[0], num_workers=3, prefetch=3)
  a = take(one.train_batches(0, 6), 4)
  assert_batches_equal(a, take(three.train_batches(0, 6), 4))
  other, _ = opened(tiny[0], seed=SEED + 1)
  b = take(other.train_batches(0, 6), 1)[0]
  assert not np.array_equal(a[0]['image'], b['image'])


def test_resume_equals_the_uninterrupted_stream(tiny, opened):
  train, _ = opened(tiny[0])
  full = take(train.train_batches(0, 5), 8)     # 40 slots: 3+ epochs of 12
  for k in (2, 5):                               # step 2 spans epochs 0 and 1
    assert_batches_equal(full[k:], take(train.train_batches(k, 5), 8 - k))


def test_each_case_once_per_epoch(tiny, opened):
  train, _ = opened(tiny[0])
  n, gb = train.num_examples, 5
  order = [train.train_order(s, gb) for s in range(12)]   # 60 slots, 5 epochs
  index = np.concatenate([i for i, _ in order])
  epochs = np.concatenate([e for _, e in order])
  np.testing.assert_array_equal(epochs, np.arange(60) // n)
  for e in range(5):
    np.testing.assert_array_equal(index[epochs == e], train.permutation(e))
    assert sorted(index[epochs == e].tolist()) == list(range(n))
  assert not np.array_equal(train.permutation(0), train.permutation(1))


def test_process_slices_make_up_the_global_batch(tiny, opened):
  train, evals = opened(tiny[0])
  whole = take(train.train_batches(3, 6), 2)
  parts = [take(train.train_batches(3, 6, process_index=p, process_count=2),
                 2) for p in range(2)]
  for t in range(2):
    assert parts[0][t]['image'].shape[0] == 3
    for k in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][t][k], parts[1][t][k]]), whole[t][k])
  ids = [[c for c, _, _ in evals.cases(p, 3)] for p in range(3)]
  assert ids == [evals.case_ids[p::3] for p in range(3)]
  assert sorted(sum(ids, [])) == evals.case_ids


# ---------------------------------------------------------------- augmentation


def _blob_dataset(path, *, width=40):
  """4 train cases of 8x8xwidth whose only foreground (kidney) is the last
  W column: no random crop reaches it (offsets stop at width - 9)."""
  label = np.zeros((8, 8, width), np.uint8)
  label[2:5, 3:6, -1] = 1
  for i in range(5):
    kits19.write_case(path, f'case_{i:05d}', label * 10.0, label)
  _write_split(path, ['case_00004'])


@pytest.mark.parametrize('oversampling', [0.0, 0.4, 1.0])
def test_foreground_crops_at_the_oversampling_rate(tmp_path, opened,
                                                   oversampling):
  _blob_dataset(tmp_path)
  train, _ = opened(tmp_path, oversampling=oversampling)
  n = 600
  labels = np.concatenate([b['label'] for b in
                           take(train.train_batches(0, 60), n // 60)])
  hit = labels.reshape(n, -1).max(1) > 0
  if oversampling in (0.0, 1.0):
    assert hit.mean() == oversampling
  else:    # binomial std ~0.02
    assert abs(hit.mean() - oversampling) < 0.06
  # A foreground crop holds the whole 3x3 component.
  assert all(labels[i].sum() == 9 for i in np.flatnonzero(hit))


def test_foreground_boxes_keep_the_two_largest_components():
  label = np.zeros((10, 10, 10), np.uint8)
  label[0:2, 0:2, 0:2] = 1             # 8 voxels
  label[5:9, 0:3, 0:3] = 1             # 36
  label[0:1, 7:10, 7:9] = 1            # 6
  label[6, 6, 6] = 2
  label[8:10, 8:10, 8] = 2
  label[4, 4, 5] = 1                   # touches only diagonally: own component
  label[5, 5, 6] = 1
  boxes = kits19.foreground_boxes(label)
  assert boxes == {1: [((0, 2), (0, 2), (0, 2)), ((5, 9), (0, 3), (0, 3))],
                   2: [((6, 7), (6, 7), (6, 7)), ((8, 10), (8, 10), (8, 9))]}
  assert kits19.foreground_boxes(np.zeros((4, 4, 4), np.uint8)) == {}


def test_foreground_crop_contains_or_lies_in_the_box():
  rng = np.random.default_rng(0)
  picked = {1: 0, 2: 0}
  for _ in range(500):
    shape = tuple(int(s) for s in rng.integers(8, 30, 3))
    boxes = {}
    for cl in (1, 2):
      lo = [int(rng.integers(0, s)) for s in shape]
      boxes[cl] = [tuple((a, int(rng.integers(a + 1, s + 1)))
                         for a, s in zip(lo, shape))]
    crop = kits19.foreground_crop_box(boxes, shape, P, rng)
    for (lo, hi), s, p in zip(crop, shape, P):
      assert hi - lo == p and 0 <= lo and hi <= s
    # The crop holds the box on axes where it fits, else lies inside it.
    fits = [c for c in (1, 2) if all(
        (lo <= a and b <= hi) if b - a <= p else (a <= lo and hi <= b)
        for (lo, hi), (a, b), p in zip(crop, boxes[c][0], P))]
    assert fits
    picked[fits[0]] += 1
  # The class is chosen uniformly.
  assert abs(picked[1] / 500 - 0.5) < 0.1
  assert kits19.foreground_crop_box({}, (8, 8, 8), P, rng) is None
  # A random crop never starts at size - patch (the reference's randrange).
  starts = {kits19.random_crop_box((8, 8, 11), P, rng)[2][0]
            for _ in range(200)}
  assert starts == {0, 1, 2}


def test_flips_keep_image_and_label_aligned():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 3, P).astype(np.uint8)
  flips = [0, 0, 0]
  combos, bright, noisy, n = set(), [], 0, 900
  for i in range(n):
    image, out = kits19.augment(label * np.float32(10), label,
                                np.random.default_rng([SEED, i]))
    assert image.dtype == np.float32 and out.dtype == np.uint8
    combo = next(c for c, axes in enumerate(FLIPS)
                 if np.array_equal(out, np.flip(label, axes)))
    combos.add(combo)
    for a in FLIPS[combo]:
      flips[a] += 1
    scale = image[out == 2].mean() / 20
    # Image and label flipped together: the image is still 10 * scale * label.
    assert np.abs(image - 10 * scale * out).max() < 1.0
    if abs(scale - 1) > 0.1:
      bright.append(scale)
    noisy += not np.allclose(image, 10 * scale * out, atol=1e-4)
  assert len(combos) == 8
  for a in range(3):
    assert abs(flips[a] / n - 1 / 3) < 0.06
  assert abs(len(bright) / n - 0.1) < 0.04
  # The reference scales by 1 + U(0.7, 1.3).
  assert 1.7 - 1e-3 < min(bright) and max(bright) < 2.3 + 1e-3
  assert abs(noisy / n - 0.1) < 0.04


def test_pipeline_patches_are_aligned_crops(tmp_path, opened):
  # Cases as large as the patch: every sample is its case, flipped.
  rng = np.random.default_rng(1)
  labels = [rng.integers(0, 3, P).astype(np.uint8) for _ in range(3)]
  for i, label in enumerate(labels):
    kits19.write_case(tmp_path, f'case_{i:05d}', label * 10.0, label)
  _write_split(tmp_path, ['case_00002'])
  train, _ = opened(tmp_path)
  (b,) = take(train.train_batches(0, 30), 1)
  index, _ = train.train_order(0, 30)
  for image, label, i in zip(b['image'][..., 0], b['label'], index):
    assert any(np.array_equal(label, np.flip(labels[i], axes))
               for axes in FLIPS)
    scale = image[label == 2].mean() / 20
    assert np.abs(image - 10 * scale * label).max() < 1.0


# ---------------------------------------------------------------- split


def test_reference_split_of_210_cases(tmp_path, opened):
  train_ids, eval_ids = kits19.make_tiny_dataset(tmp_path, 168, 42, P,
                                                 write_split=False)
  assert eval_ids == list(kits19.REFERENCE_EVAL_CASES)
  assert not (tmp_path / kits19.SPLIT_FILE).exists()
  train, evals = opened(tmp_path)
  assert (train.num_examples, evals.num_examples) == (168, 42)
  assert evals.case_ids == list(kits19.REFERENCE_EVAL_CASES)
  assert train.case_ids == train_ids
  assert not set(train.case_ids) & set(evals.case_ids)
  assert len(set(kits19.REFERENCE_EVAL_CASES)) == 42


def test_split_file_decides_and_takes_reference_numbers(tmp_path, opened):
  train_ids, eval_ids = kits19.make_tiny_dataset(tmp_path, 7, 3, P, seed=2)
  train, evals = opened(tmp_path)
  assert train.case_ids == train_ids and evals.case_ids == eval_ids
  # The reference's format (numbers), comments and blank lines.
  (tmp_path / kits19.SPLIT_FILE).write_text('# eval\n00001\n\ncase_00004\n')
  train, evals = opened(tmp_path)
  assert evals.case_ids == ['case_00001', 'case_00004']
  assert train.num_examples == 8


def test_synthetic_cases_have_all_classes_and_vary():
  kw = dict(max_shape=(20, 22, 24), patch_shape=(12, 12, 16), seed=3)
  train, evals = kits19.synthetic_kits19(6, 5, num_workers=1, prefetch=0,
                                         **kw)
  again, _ = kits19.synthetic_kits19(6, 5, **kw)
  shapes = set()
  for ds in (train, evals):
    for case_id, image, label in ds.cases():
      assert set(np.unique(label)) == {0, 1, 2}, case_id
      assert all(s >= p for s, p in zip(image.shape, (12, 12, 16)))
      assert all(s <= m for s, m in zip(image.shape, (20, 22, 24)))
      # Classes differ in intensity.
      means = [image[label == c].mean() for c in range(3)]
      assert means[0] + 0.5 < means[1] < means[2] - 0.5
      shapes.add(image.shape)
  assert len(shapes) > 5
  assert train.case_ids[0] != evals.case_ids[0]
  # Deterministic for the seed; a box reads the same voxels as the whole case.
  for (_, x, y), (_, x2, y2) in zip(train.cases(), again.cases()):
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
  image, label = train.read(0)
  d, h, w = image.shape
  part = train.read(0, ((1, d), (2, h - 1), (3, w)))
  np.testing.assert_array_equal(part[0], image[1:, 2:-1, 3:])
  np.testing.assert_array_equal(part[1], label[1:, 2:-1, 3:])
  b = take(train.train_batches(0, 4), 1)[0]
  assert b['image'].shape == (4, 12, 12, 16, 1)
  assert b['label'].shape == (4, 12, 12, 16) and b['label'].dtype == np.int32
  other, _ = kits19.synthetic_kits19(6, 1, **{**kw, 'seed': 4})
  assert not np.array_equal(other.read(0)[1], label)
  for ds in (train, evals, again, other):
    ds.close()


def test_close_stops_the_threads(tiny):
  train, evals = kits19.open_kits19(tiny[0], patch_shape=P, num_workers=3)
  it = train.train_batches(0, 4)
  next(it)
  assert it.running
  train.close()
  evals.close()
  assert not it.running
  with pytest.raises(RuntimeError, match='closed'):
    train.train_batches(0, 4)
  deadline = time.monotonic() + 5
  while any(t.name.startswith('Kits19') for t in threading.enumerate()) and (
      time.monotonic() < deadline):
    time.sleep(0.02)
  assert not [t.name for t in threading.enumerate()
              if t.name.startswith('Kits19')]


# ---------------------------------------------------------------- errors


def _good(path, n=3, shape=(10, 10, 10)):
  """n small valid cases, the last one the eval case."""
  label = np.zeros(shape, np.uint8)
  label[2:5, 2:5, 2:5] = 1
  label[3, 3, 3] = 2
  for i in range(n):
    kits19.write_case(path, f'case_{i:05d}', label * 1.0, label)
  _write_split(path, [f'case_{n - 1:05d}'])


def _npy(path, name, array):
  np.save(path / name, array, allow_pickle=False)


def _make_missing(p):
  return p / 'nowhere', 'nowhere'


def _make_empty(p):
  (p / 'README').write_text('hello')
  return p, str(p)


def _make_x_only(p):
  _good(p)
  os.remove(p / 'case_00001_y.npy')
  return p, 'case_00001_x.npy'


def _make_y_only(p):
  _good(p)
  _npy(p, 'case_00007_y.npy', np.zeros((1, 10, 10, 10), np.uint8))
  return p, 'case_00007_y.npy'


def _make_mismatch(p):
  _good(p)
  _npy(p, 'case_00001_y.npy', np.zeros((1, 10, 10, 11), np.uint8))
  return p, 'case_00001_y.npy'


def _make_ndim(p):
  _good(p)
  _npy(p, 'case_00000_x.npy', np.zeros((10, 10, 10), np.float32))
  return p, 'case_00000_x.npy'


def _make_channels(p):
  _good(p)
  _npy(p, 'case_00001_y.npy', np.zeros((2, 10, 10, 10), np.uint8))
  return p, 'case_00001_y.npy'


def _make_image_dtype(p):
  _good(p)
  _npy(p, 'case_00000_x.npy', np.zeros((1, 10, 10, 10), np.int16))
  return p, 'case_00000_x.npy'


def _make_corrupt(p):
  _good(p)
  (p / 'case_00001_x.npy').write_bytes(b'not numpy at all')
  return p, 'case_00001_x.npy'


def _make_small(p):
  _good(p)
  kits19.write_case(p, 'case_00001', np.zeros((10, 7, 10)),
                    np.zeros((10, 7, 10)))
  return p, 'case_00001_x.npy'


def _make_other_ids(p):
  _good(p)
  os.remove(p / kits19.SPLIT_FILE)
  return p, kits19.SPLIT_FILE


def _make_subset_of_reference(p):
  kits19.make_tiny_dataset(p, 168, 42, P, write_split=False)
  for suffix in ('x', 'y'):
    os.remove(p / f'case_00005_{suffix}.npy')
  return p, 'missing case_00005'


def _make_unknown_eval_case(p):
  _good(p)
  _write_split(p, ['case_00002', 'case_00099'])
  return p, f'{kits19.SPLIT_FILE}:2'


def _make_all_eval(p):
  _good(p)
  _write_split(p, ['case_00000', 'case_00001', 'case_00002'])
  return p, 'no training cases'


@pytest.mark.parametrize('make', [
    _make_missing, _make_empty, _make_x_only, _make_y_only, _make_mismatch,
    _make_ndim, _make_channels, _make_image_dtype, _make_corrupt, _make_small,
    _make_other_ids, _make_subset_of_reference, _make_unknown_eval_case,
    _make_all_eval])
def test_bad_data_is_a_data_error_naming_the_file(tmp_path, opened, make):
  path, name = make(tmp_path)
  with pytest.raises(DataError) as info:
    opened(path)
  assert name in str(info.value)


def test_small_case_message_and_values_checked_on_read(tmp_path, opened):
  _good(tmp_path, n=4)
  kits19.write_case(tmp_path, 'case_00001', np.zeros((10, 7, 10)),
                    np.zeros((10, 7, 10)))
  with pytest.raises(DataError, match=r'smaller than the 8x8x8 training patch'
                     r' in H \(7 < 8\).*pads every side to at least 128'):
    opened(tmp_path)
  _good(tmp_path, n=4)
  label = np.zeros((1, 10, 10, 10), np.uint8)
  label[0, 1, 2, 3] = 5
  _npy(tmp_path, 'case_00003_y.npy', label)            # the eval case
  _npy(tmp_path, 'case_00001_y.npy', label)            # a training case
  train, evals = opened(tmp_path)     # headers are fine: values come on read
  with pytest.raises(DataError, match=r'case_00003_y\.npy: label values from '
                     r'0 to 5; expected only 0'):
    list(evals.cases())
  with pytest.raises(DataError, match=r'case_00001_y\.npy: label values'):
    take(train.train_batches(0, 3), 1)
  _good(tmp_path, n=4)
  image = np.zeros((1, 10, 10, 10), np.float32)
  image[0, 4, 4, 4] = np.nan
  _npy(tmp_path, 'case_00002_x.npy', image)
  for in_memory in (True, False):
    train, _ = opened(tmp_path, in_memory=in_memory)
    with pytest.raises(DataError, match=r'case_00002_x\.npy: .*NaN'):
      take(train.train_batches(0, 3), 1)
