"""Criteo 1TB data for DLRM: binary format, block order, eval, counts,
synthetic clicks and errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxperf.data import criteo
from jaxperf.errors import DataError
from jaxperf.metrics.auc import auc
from tests.batches import assert_batches_equal, take

GB = 8                      # global batch
N_TRAIN = 10 * GB + 3       # ten blocks and 3 rows that are never trained on
N_EVAL = 21
M = 100                     # max_ind_range of the tiny files
# Raw feature counts: some above M, so their tables are capped at M.
COUNTS = [3, 250, 7, 100, 1000, 12] + [5 + 9 * j for j in range(20)]
SIZES = [min(c, M) for c in COUNTS]


def _random_rows(n, seed):
  """(labels, dense, raw sparse) with raw indices in [0, count)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  dense = rng.integers(0, 5000, (n, criteo.NUM_DENSE))
  dense[rng.random(dense.shape) < 0.3] = 0
  sparse = np.stack([rng.integers(0, c, n) for c in COUNTS], axis=1)
  return labels, dense, sparse


def _write_dir(path, n_train=N_TRAIN, n_eval=N_EVAL, counts=COUNTS):
  path.mkdir(parents=True, exist_ok=True)
  train = _random_rows(n_train, 1)
  evaluation = _random_rows(n_eval, 2)
  criteo.write_criteo_bin(path / criteo.TRAIN_FILE, *train)
  criteo.write_criteo_bin(path / criteo.EVAL_FILE, *evaluation)
  criteo.write_counts(path / criteo.COUNTS_FILE, counts)
  return train, evaluation


def _open(path, **kw):
  kw = {'table_sizes': SIZES, 'max_ind_range': M, 'seed': 3, 'prefetch': 0,
        **kw}
  return criteo.open_criteo(path, **kw)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp('criteo')
  train_rows, eval_rows = _write_dir(path)
  train, evaluation = _open(path)
  return path, train, evaluation, train_rows, eval_rows


def _expected(rows, lo, hi):
  labels, dense, sparse = rows
  return {'dense': np.log1p(dense[lo:hi].astype(np.float32)),
          'sparse': (sparse[lo:hi] % M).astype(np.int32),
          'label': labels[lo:hi].astype(np.float32)}


# ---------------------------------------------------------------- format


def test_round_trip_values_dtypes_and_layout(tiny):
  path, train, evaluation, train_rows, _ = tiny
  assert os.path.getsize(path / criteo.TRAIN_FILE) == N_TRAIN * 160
  raw = np.fromfile(path / criteo.TRAIN_FILE, '<i4').reshape(-1, 40)
  np.testing.assert_array_equal(raw[:, 0], train_rows[0])
  np.testing.assert_array_equal(raw[:, 1:14], train_rows[1])
  np.testing.assert_array_equal(raw[:, 14:], train_rows[2])
  assert (train.num_examples, evaluation.num_examples) == (N_TRAIN, N_EVAL)
  assert train.table_sizes == tuple(SIZES)
  batch = train.read(5, 20)
  want = _expected(train_rows, 5, 25)
  assert batch.keys() == want.keys()
  for k in want:
    assert batch[k].dtype == want[k].dtype, k
    np.testing.assert_allclose(batch[k], want[k], rtol=1e-6, err_msg=k)
  # Indices at or above max_ind_range are folded into the capped tables.
  assert (train_rows[2] >= M).any()
  assert (batch['sparse'] < np.asarray(SIZES)).all()
  np.testing.assert_array_equal(criteo.read_counts(path / criteo.COUNTS_FILE),
                                COUNTS)


def test_table_sizes_default_to_the_counts_file(tiny):
  path = tiny[0]
  train, _ = criteo.open_criteo(path, max_ind_range=M, prefetch=0)
  assert list(train.table_sizes) == SIZES
  train, _ = criteo.open_criteo(path, max_ind_range=None, table_sizes=None,
                                prefetch=0)
  assert list(train.table_sizes) == COUNTS   # uncapped
  assert train.read(0, 4)['sparse'].max() >= M


# ---------------------------------------------------------------- training


def test_train_batches_are_shuffled_blocks_of_the_file(tiny):
  _, train, _, train_rows, _ = tiny
  blocks = train.steps_per_epoch(GB)
  assert blocks == 10 and train.dropped_train_rows(GB) == 3
  batches = take(train.train_batches(0, GB), 3 * blocks)
  starts = []
  for step, b in enumerate(batches):
    first = train.train_order(step, GB)
    assert first % GB == 0
    starts.append(first // GB)
    want = _expected(train_rows, first, first + GB)
    for k in want:
      np.testing.assert_allclose(b[k], want[k], rtol=1e-6, err_msg=k)
  epochs = [starts[e * blocks:(e + 1) * blocks] for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(blocks))   # every block once
  assert epochs[0] != epochs[1] != epochs[2]
  assert epochs[0] != list(range(blocks))         # not the file order
  # The order is a function of (seed, epoch).
  assert list(train.block_permutation(1, blocks)) == epochs[1]


def test_dropped_rows_are_never_trained_on(tiny):
  _, train, _, train_rows, _ = tiny
  seen = np.concatenate([b['sparse'] for b in
                         take(train.train_batches(0, GB), 2 * 10)])
  tail = (train_rows[2][-3:] % M).astype(np.int32)
  covered = {r.tobytes() for r in seen}
  assert len(covered) == 10 * GB
  assert not {r.tobytes() for r in tail} & covered
  assert train.dropped_train_rows(N_TRAIN) == 0
  assert train.dropped_train_rows(N_TRAIN + 1) == N_TRAIN


def test_resume_matches_the_uninterrupted_stream(tiny):
  train = tiny[1]
  whole = take(train.train_batches(0, GB), 25)
  for start in (7, 10, 13):   # inside an epoch, at and after its end
    assert_batches_equal(take(train.train_batches(start, GB), 25 - start),
                          whole[start:])


def test_processes_split_each_batch(tiny):
  train, evaluation = tiny[1], tiny[2]
  one = take(train.train_batches(4, GB), 12)
  parts = [take(train.train_batches(4, GB, process_index=p,
                                     process_count=2), 12) for p in range(2)]
  assert parts[0][0]['label'].shape == (GB // 2,)
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a}
            for a, b in zip(*parts)]
  assert_batches_equal(joined, one)
  one = list(evaluation.eval_batches(GB))
  parts = [list(evaluation.eval_batches(GB, process_index=p, process_count=2))
           for p in range(2)]
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a}
            for a, b in zip(*parts)]
  assert_batches_equal(joined, one)


def test_prefetched_stream_matches_and_closes(tiny):
  path, train = tiny[0], tiny[1]
  plain = take(train.train_batches(3, GB), 6)
  fetched, _ = _open(path, prefetch=2)
  assert_batches_equal(take(fetched.train_batches(3, GB), 6), plain)
  fetched.close()
  with pytest.raises(RuntimeError, match='closed'):
    fetched.train_batches(0, GB)


# ---------------------------------------------------------------- eval


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_every_row_once_with_padding_masked(tiny, process_count):
  _, _, evaluation, _, eval_rows = tiny
  local = GB // process_count
  got = {k: [] for k in ('dense', 'sparse', 'label')}
  n_batches = []
  for p in range(process_count):
    batches = list(evaluation.eval_batches(GB, process_index=p,
                                           process_count=process_count))
    n_batches.append(len(batches))
    for i, b in enumerate(batches):
      assert b['mask'].dtype == bool and b['label'].shape == (local,)
      pad = ~b['mask']
      assert not b['dense'][pad].any() and not b['sparse'][pad].any()
      assert not b['label'][pad].any()
      for k in got:
        got[k].append((i, p, b[k][b['mask']]))
  assert n_batches == [-(-N_EVAL // GB)] * process_count
  assert sum(len(a) for _, _, a in got['label']) == N_EVAL
  want = _expected(eval_rows, 0, N_EVAL)
  for k, parts in got.items():
    ordered = np.concatenate([a for _, _, a in sorted(
        parts, key=lambda t: t[:2])])
    np.testing.assert_allclose(ordered, want[k], rtol=1e-6, err_msg=k)
  assert evaluation.num_examples == N_EVAL


# ---------------------------------------------------------------- counts


def test_category_counts_match_bincount(tiny):
  _, train, _, train_rows, _ = tiny
  sparse = train_rows[2] % M
  full = train.category_counts()
  chunked = train.category_counts(chunk_rows=7)
  first = train.category_counts(max_rows=30, chunk_rows=4)
  assert len(full) == criteo.NUM_SPARSE
  for j, size in enumerate(SIZES):
    want = np.bincount(sparse[:, j], minlength=size)
    assert full[j].dtype == np.int64 and full[j].shape == (size,)
    np.testing.assert_array_equal(full[j], want)
    np.testing.assert_array_equal(chunked[j], want)
    np.testing.assert_array_equal(
        first[j], np.bincount(sparse[:30, j], minlength=size))
  assert sum(int(c.sum()) for c in full) == N_TRAIN * criteo.NUM_SPARSE


# ---------------------------------------------------------------- synthetic

SYN_SIZES = [3, 4, 10, 14, 36, 63, 108, 155, 976, 1543] + [
    20 + 37 * j for j in range(16)]


def _logistic_auc(train, evaluation, steps=300):
  """AUC of a logistic regression on one-hot indices and log1p dense,
  fitted by gradient descent (the one-hot product as a gather)."""
  offsets = np.cumsum([0] + SYN_SIZES[:-1])

  def features(ds):
    b = ds.read(0, ds.num_examples)
    return b['sparse'] + offsets, b['dense'] / 5.0, b['label']

  hot, dense, y = features(train)
  w = np.zeros(sum(SYN_SIZES))
  v, bias = np.zeros(criteo.NUM_DENSE), 0.0
  for _ in range(steps):
    g = 1.0 / (1.0 + np.exp(-(w[hot].sum(1) + dense @ v + bias))) - y
    w -= 2.0 * (np.bincount(hot.ravel(), np.repeat(g, hot.shape[1]),
                            minlength=len(w)) / len(y) + 1e-3 * w)
    v -= 2.0 * dense.T @ g / len(y)
    bias -= 2.0 * g.mean()
  hot, dense, y = features(evaluation)
  return auc(w[hot].sum(1) + dense @ v + bias, y)


def test_synthetic_clicks_are_learnable():
  train, evaluation = criteo.synthetic_criteo(
      2000, 20000, table_sizes=SYN_SIZES, seed=4, prefetch=0)
  assert 0.86 <= evaluation.bayes_auc <= 0.90
  assert 0.25 <= evaluation.click_rate <= 0.30
  assert 0.25 <= train.click_rate <= 0.30
  assert evaluation.bayes_auc == auc(evaluation.logits, evaluation.rows[:, 0])
  assert evaluation.bayes_auc != train.bayes_auc   # each set's own
  # An additive model fitted on 2000 rows learns much of it (not all: it
  # misses the interaction and the rare rows).
  small_eval = criteo.SyntheticCriteo(train.model, 2000, split='check',
                                      prefetch=0)
  fitted = _logistic_auc(train, small_eval)
  assert 0.65 < fitted < small_eval.bayes_auc
  # The interaction is real: the logits are not additive in its two tables.
  model = train.model
  p, q = model.interaction
  index, dense = (np.repeat(a, 4, axis=0) for a in
                  model.sample(1, np.random.default_rng(0)))
  index[:, p] = [0, 0, 1, 1]
  index[:, q] = [0, 1, 0, 1]
  z = model.logits(index, dense)
  assert abs(z[3] - z[2] - z[1] + z[0]) > 1e-3


def test_synthetic_rows_are_zipf_like_and_valid():
  train, evaluation = criteo.synthetic_criteo(
      5000, 100, table_sizes=SYN_SIZES, seed=1, prefetch=0)
  counts = train.category_counts()
  big = counts[9]                        # 1543 rows
  top = np.sort(big)[::-1]
  assert top[:10].sum() > 0.25 * big.sum()       # a few hot rows dominate
  assert np.argmax(big) != 0                    # scattered, not row 0
  b = take(train.train_batches(0, 1000), 1)[0]
  assert b['sparse'].dtype == np.int32 and b['dense'].dtype == np.float32
  assert (b['sparse'] < np.asarray(SYN_SIZES)).all()
  assert (b['dense'] >= 0).all() and b['dense'].max() > 2.0
  assert set(np.unique(b['label'])) == {0.0, 1.0}
  assert train.dropped_train_rows(1000) == 0


def test_synthetic_is_deterministic_in_the_seed():
  a = criteo.synthetic_criteo(300, 200, table_sizes=SYN_SIZES, seed=7,
                              prefetch=0)
  b = criteo.synthetic_criteo(300, 200, table_sizes=SYN_SIZES, seed=7,
                              prefetch=0)
  c = criteo.synthetic_criteo(300, 200, table_sizes=SYN_SIZES, seed=8,
                              prefetch=0)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.rows, y.rows)
    np.testing.assert_array_equal(x.logits, y.logits)
  assert not np.array_equal(a[0].rows, c[0].rows)
  # Train and eval share the model, not the rows.
  assert not np.array_equal(a[0].rows[:200], a[1].rows)
  assert a[0].model is a[1].model
  assert_batches_equal(take(a[0].train_batches(2, 100), 4),
                        take(b[0].train_batches(2, 100), 4))


# ---------------------------------------------------------------- errors


def _raises(match, fn, *args, **kw):
  with pytest.raises(DataError) as e:
    fn(*args, **kw)
  assert match in str(e.value), str(e.value)
  return str(e.value)


def _patch(path, row, column, value):
  raw = np.fromfile(path, '<i4').reshape(-1, 40)
  raw[row, column] = value
  raw.tofile(path)


def test_truncated_and_empty_files(tmp_path):
  _write_dir(tmp_path)
  train_path = tmp_path / criteo.TRAIN_FILE
  with open(train_path, 'r+b') as f:
    f.truncate(N_TRAIN * 160 - 12)
  msg = _raises(str(train_path), _open, tmp_path)
  assert f'{N_TRAIN - 1} whole rows' in msg and 'not a multiple of' in msg
  open(train_path, 'wb').close()
  _raises('empty', _open, tmp_path)


def test_bad_values_name_file_row_feature_and_table(tmp_path):
  _write_dir(tmp_path)
  path = tmp_path / criteo.TRAIN_FILE
  cases = [
      (0, 2, ('label 2', 'expected 0 or 1')),
      (1 + 4, -3, ('dense feature I5 is -3', 'expected >= 0')),
      (14 + 2, 7, ('feature C3 is 7', 'table of 7 rows')),
      (14 + 0, -1, ('feature C1 is -1', '[0, 3)')),
  ]
  for column, value, needles in cases:
    _write_dir(tmp_path)
    _patch(path, 37, column, value)
    train, _ = _open(tmp_path)
    it = train.train_batches(0, N_TRAIN - 3)
    msg = _raises(str(path), next, it)
    assert 'row 37' in msg
    for n in needles:
      assert n in msg, msg
  # A raw index beyond the feature's count that folds into the capped table
  # is what the reference reads too (index % max_ind_range).
  _write_dir(tmp_path)
  _patch(path, 37, 14 + 1, 5 * M)
  train, _ = _open(tmp_path)
  assert train.read(37, 1)['sparse'][0, 1] == 0
  _patch(path, 37, 14 + 1, 5 * M + SIZES[1])
  train, _ = _open(tmp_path)
  assert train.read(37, 1)['sparse'][0, 1] == 0
  # Indices beyond a table are found by category_counts too.
  _write_dir(tmp_path)
  _patch(path, 50, 14 + 15, SIZES[15])
  train, _ = _open(tmp_path)
  msg = _raises('row 50', train.category_counts, chunk_rows=16)
  assert str(path) in msg and 'C16' in msg


def test_eval_file_errors_name_the_eval_file(tmp_path):
  _write_dir(tmp_path)
  path = tmp_path / criteo.EVAL_FILE
  _patch(path, N_EVAL - 1, 14 + 5, 12)
  _, evaluation = _open(tmp_path)
  msg = _raises(str(path), list, evaluation.eval_batches(GB))
  assert f'row {N_EVAL - 1}' in msg and 'C6' in msg and '12 rows' in msg


def test_counts_file_errors(tmp_path):
  _write_dir(tmp_path)
  counts_path = tmp_path / criteo.COUNTS_FILE
  sizes = list(SIZES)
  sizes[4] = 50
  msg = _raises(str(counts_path), _open, tmp_path, table_sizes=sizes)
  assert 'C5: config 50, file 100' in msg and 'C1' not in msg
  msg = _raises(str(counts_path), _open, tmp_path, max_ind_range=200)
  assert 'C2: config 100, file 200' in msg and 'C5: config 100, file 200' in msg
  criteo.write_counts(counts_path, COUNTS[:25])
  _raises('expected 26 integers', _open, tmp_path)
  with open(counts_path, 'wb') as f:
    np.savez(f, sizes=np.asarray(COUNTS))
  msg = _raises(str(counts_path), _open, tmp_path)
  assert 'no array "counts"' in msg and 'sizes' in msg
  counts_path.write_bytes(b'not a zip')
  _raises('cannot be read', _open, tmp_path)


def test_missing_files_and_too_few_rows(tmp_path):
  _write_dir(tmp_path)
  os.remove(tmp_path / criteo.EVAL_FILE)
  msg = _raises(str(tmp_path / criteo.EVAL_FILE), _open, tmp_path)
  assert 'no such file' in msg and criteo.TRAIN_FILE in msg
  os.remove(tmp_path / criteo.COUNTS_FILE)
  msg = _raises('no such file', _open, tmp_path)
  assert criteo.COUNTS_FILE in msg
  _raises('no such directory', _open, tmp_path / 'nowhere')
  small = tmp_path / 'small'
  _write_dir(small, n_train=5)
  train, _ = _open(small)
  msg = _raises('fewer than one global batch', train.train_batches, 0, GB)
  assert str(small / criteo.TRAIN_FILE) in msg and '5 rows' in msg
