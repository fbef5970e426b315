"""The synthetic learnable source: deterministic, resumable, learnable."""

import numpy as np

from jaxperf.data.synthetic import SyntheticImages


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_shapes_and_determinism():
  a = SyntheticImages(100, 10, 32, seed=3)
  b = SyntheticImages(100, 10, 32, seed=3)
  for x, y in zip(_take(a.train_batches(0, 16), 3), _take(b.train_batches(0, 16), 3)):
    assert x['image'].shape == (16, 32, 32, 3) and x['image'].dtype == np.uint8
    assert x['label'].shape == (16,) and x['label'].dtype == np.int32
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_resume_continues_the_same_stream_across_epochs():
  ds = SyntheticImages(50, 10, 16, seed=0)
  full = _take(ds.train_batches(0, 16), 10)     # 160 slots: 3+ epochs
  tail = _take(ds.train_batches(4, 16), 6)
  for x, y in zip(full[4:], tail):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_every_example_once_per_epoch_and_process_slices():
  ds = SyntheticImages(64, 10, 8, seed=1, shuffle_seed=5)
  labels = np.concatenate([b['label'] for b in _take(ds.train_batches(0, 16), 4)])
  assert sorted(labels) == sorted(ds._labels)            # one epoch, a permutation
  whole = next(ds.train_batches(2, 16))
  parts = [next(ds.train_batches(2, 16, process_index=i, process_count=2))
           for i in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([p['image'] for p in parts]), whole['image'])


def test_eval_covers_each_example_once_with_mask():
  ds = SyntheticImages(50, 10, 8, seed=0, split='eval')
  batches = list(ds.eval_batches(16))
  assert len(batches) == 4
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 50 and not mask[50:].any()


def test_label_is_a_function_of_the_image():
  """A nearest-prototype classifier on train data labels eval data well."""
  train = SyntheticImages(400, 5, 16, seed=0, noise=40.0)
  evals = SyntheticImages(200, 5, 16, seed=0, noise=40.0, split='eval')
  x = next(train.train_batches(0, 400))
  centroids = np.stack([x['image'][x['label'] == c].mean(0) for c in range(5)])
  e = next(evals.eval_batches(200))
  d = ((e['image'][:, None].astype(np.float32) - centroids[None]) ** 2).sum(
      axis=(2, 3, 4))
  assert (d.argmin(1) == e['label']).mean() > 0.95


def test_label_noise_caps_accuracy():
  ds = SyntheticImages(5000, 10, 8, seed=0, label_noise=0.2)
  agree = (ds._labels == ds._classes).mean()
  assert 0.78 < agree < 0.86    # 1 - 0.2 * 0.9 = 0.82
