"""BERT data: reference TFRecords, packed rows, order, errors, synthetic."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxperf.data import bert, tfrecord
from jaxperf.errors import DataError
from tests.batches import assert_batches_equal, take

S, P, V = 32, 5, 512    # tiny sequence length, predictions and vocabulary
N = 20                  # records per file


def _source(n=N, **kw):
  kw = {'seq_len': S, 'max_predictions': P, 'vocab_size': V, 'seed': 5,
        'full_fraction': 0.3, 'min_length': 5, 'prefetch': 0, **kw}
  return bert.SyntheticBert(n, **kw)


def _write(path, examples):
  bert.write_examples(path, examples)
  return os.fspath(path)


def _reader(files, **kw):
  kw = {'seq_len': S, 'max_predictions': P, 'vocab_size': V, 'seed': 1,
        'prefetch': 0, **kw}
  return bert.BertRecords(files, **kw)


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """Two unpacked files of N records each, and the source that made them."""
  d = tmp_path_factory.mktemp('bert')
  src = _source(2 * N)
  for i in range(2):
    _write(d / f'part-{i:05d}-of-00002',
           src.examples(np.arange(i * N, (i + 1) * N)))
  return d, src


# ---------------------------------------------------------------- format


def test_on_disk_format_round_trip(shards):
  d, src = shards
  path = d / 'part-00000-of-00002'
  # The exact features, kinds and lengths of the reference's records.
  data = next(tfrecord.read_records(path))
  ex = tfrecord.parse_example(data)
  assert sorted(ex) == sorted(bert.UNPACKED_FEATURES)
  for name, (kind, length) in bert.UNPACKED_FEATURES.items():
    assert len(ex[name]) == {'S': S, 'P': P, '1': 1}[length], name
    want = float if kind == 'f' else int
    assert all(type(v) is want for v in ex[name]), name
  # Values read back equal what was written.
  ds = _reader(str(d / 'part-*'))
  assert ds.num_examples == 2 * N and not ds.packed
  assert (ds.seq_len, ds.max_predictions, ds.max_sequences) == (S, P, 1)
  written = src.examples(np.arange(2 * N))
  got = ds.features(np.arange(2 * N))
  for name in bert.UNPACKED_FEATURES:
    np.testing.assert_array_equal(got[name],
                                  np.stack([e[name] for e in written]), name)
  assert_batches_equal([ds.rows(np.arange(2 * N))],
                        [src.rows(np.arange(2 * N))])
  assert_batches_equal([bert.read_file(path, seq_len=S, max_predictions=P,
                                        vocab_size=V)],
                        [src.rows(np.arange(N))])


def test_reads_the_generic_serializer_and_unpacked_lists(tmp_path):
  src = _source(3)
  examples = src.examples(np.arange(3))
  path = tmp_path / 'generic'
  tfrecord.write_tfrecord(path, ({k: [float(x) if k == 'masked_lm_weights'
                                      else int(x) for x in v]
                                  for k, v in e.items()} for e in examples))
  assert_batches_equal([_reader(path).rows(np.arange(3))],
                        [src.rows(np.arange(3))])
  # A list in unpacked encoding (one varint field per value) is read too;
  # a second Features message merges into the first, as in protobuf.
  e = examples[0]
  data = bert.encode_example({k: v for k, v in e.items()
                              if k != 'next_sentence_labels'})
  label = int(e['next_sentence_labels'][0])
  lst = bytes([0x08, label])                      # value (1): varint
  feature = bytes([0x1A, len(lst)]) + lst         # int64_list (3)
  name = b'next_sentence_labels'
  entry = (bytes([0x0A, len(name)]) + name        # key (1)
           + bytes([0x12, len(feature)]) + feature)   # value (2)
  entry = bytes([0x0A, len(entry)]) + entry       # Features.feature (1)
  data += bytes([0x0A, len(entry)]) + entry       # Example.features (1)
  decoded = bert.decode_example(data)
  np.testing.assert_array_equal(decoded['next_sentence_labels'], [label])
  np.testing.assert_array_equal(decoded['input_ids'], e['input_ids'])
  np.testing.assert_array_equal(decoded['masked_lm_weights'],
                                e['masked_lm_weights'])


def test_varints_round_trip():
  values = np.array([0, 1, 127, 128, 300, 30521, 2**31, 2**40, 2**62])
  data = bert.encode_example({'x': values, 'w': np.float32([0.5, 1.0])})
  assert tfrecord.parse_example(data) == {'x': values.tolist(),
                                          'w': [0.5, 1.0]}
  out = bert.decode_example(data)
  np.testing.assert_array_equal(out['x'], values)
  np.testing.assert_array_equal(out['w'], [0.5, 1.0])


def test_unpacked_rows_are_the_one_sequence_case(shards):
  _, src = shards
  batch = src.rows(np.arange(N))
  real = batch['sequence_ids'] > 0
  # sequence_ids = input_mask: a prefix of ones; positions 0..S-1.
  assert (real[:, 1:] <= real[:, :-1]).all() and real[:, 0].all()
  np.testing.assert_array_equal(batch['position_ids'],
                                np.tile(np.arange(S), (N, 1)))
  np.testing.assert_array_equal(batch['next_sentence_positions'], 0)
  np.testing.assert_array_equal(batch['next_sentence_weights'], 1)
  back = bert.examples_to_batch(bert.batch_to_examples(batch))
  assert_batches_equal([back], [batch])


# ---------------------------------------------------------------- order


def test_train_stream_is_deterministic_and_resumable(shards):
  d, _ = shards
  files = str(d / 'part-*')
  # 5 records a batch over 40 records: 8 steps an epoch; 12 cross into the
  # second epoch.
  full = take(_reader(files).train_batches(0, 5), 12)
  again = take(_reader(files, prefetch=2).train_batches(0, 5), 12)
  assert_batches_equal(full, again)
  resumed = take(_reader(files).train_batches(7, 5), 5)
  assert_batches_equal(resumed, full[7:])
  other_seed = take(_reader(files, seed=2).train_batches(0, 5), 1)
  assert not np.array_equal(other_seed[0]['input_ids'], full[0]['input_ids'])


def test_each_epoch_sees_every_record_once(shards):
  d, _ = shards
  ds = _reader(str(d / 'part-*'))
  for epoch in range(2):
    order = np.concatenate([ds.train_order(step, 8) for step in
                            range(epoch * 5, epoch * 5 + 5)])
    assert sorted(order.tolist()) == list(range(2 * N))
  assert not np.array_equal(ds.permutation(0), ds.permutation(1))


def test_process_slices_make_the_global_batch(shards):
  d, _ = shards
  files = str(d / 'part-*')
  whole = take(_reader(files).train_batches(3, 8), 2)
  parts = [take(_reader(files).train_batches(3, 8, process_index=i,
                                               process_count=4), 2)
           for i in range(4)]
  for step in range(2):
    for k in whole[step]:
      np.testing.assert_array_equal(
          np.concatenate([p[step][k] for p in parts]), whole[step][k], k)


def test_eval_in_file_order_with_padding(shards):
  d, src = shards
  ds = _reader(str(d / 'part-*'))
  batches = list(ds.eval_batches(16))
  assert len(batches) == 3
  assert [int(b['mask'].sum()) for b in batches] == [16, 16, 8]
  ref = src.rows(np.arange(2 * N))
  for k in bert.BATCH_KEYS:
    got = np.concatenate([b[k][b['mask']] for b in batches])
    np.testing.assert_array_equal(got, ref[k], k)
  pad = batches[-1]
  assert pad['mask'].dtype == bool
  for k in ('masked_lm_weights', 'next_sentence_weights', 'sequence_ids',
            'input_ids'):
    assert not pad[k][8:].any(), k
  # Two processes: each pads its own slice; together they cover it all.
  halves = [list(ds.eval_batches(16, process_index=i, process_count=2))
            for i in range(2)]
  got = np.concatenate([h[j]['input_ids'][h[j]['mask']] for j in range(3)
                        for h in halves])
  np.testing.assert_array_equal(got, ref['input_ids'])


# ---------------------------------------------------------------- errors


def _bad_file(tmp_path, index=2, **changes):
  """A file of 4 good records, record `index` changed as given."""
  examples = _source(4).examples(np.arange(4))
  e = dict(examples[index])
  for k, v in changes.items():
    if v is None:
      del e[k]
    else:
      e[k] = v
  examples[index] = e
  path = tmp_path / 'part-00000-of-00001'
  tfrecord.write_records(path, [bert.encode_example(x) for x in examples])
  return os.fspath(path)


def _error(path, **kw):
  with pytest.raises(DataError) as e:
    ds = _reader(path, **kw)
    ds.rows(np.arange(ds.num_examples))
  return str(e.value)


def test_wrong_feature_name(tmp_path):
  ex = _source(4).examples([2])[0]
  path = _bad_file(tmp_path, input_ids=None, input_id=ex['input_ids'])
  msg = _error(path)
  assert path in msg and 'record 2' in msg
  assert "missing feature(s) ['input_ids']" in msg and "'input_id'" in msg


def test_wrong_length(tmp_path):
  path = _bad_file(tmp_path, masked_lm_ids=np.arange(4))
  msg = _error(path)
  assert path in msg and 'record 2' in msg and "'masked_lm_ids'" in msg
  assert 'has 4 values, expected 5' in msg
  path = _bad_file(tmp_path, index=1, input_ids=np.ones(S + 1, np.int64))
  msg = _error(path)
  assert 'record 1' in msg and "'input_ids' has 33 values, expected 32" in msg
  assert 'seq_len' in msg


def test_wrong_kind(tmp_path):
  path = _bad_file(tmp_path, masked_lm_weights=np.ones(P, np.int64))
  msg = _error(path)
  assert "'masked_lm_weights' is an int64_list, expected a float_list" in msg


def test_truncated_file(tmp_path):
  path = _bad_file(tmp_path)
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.truncate(size - 10)
  with pytest.raises(DataError) as e:
    _reader(path)
  assert path in str(e.value) and 'truncated' in str(e.value)
  assert 'record 3' in str(e.value)


def test_not_an_example(tmp_path):
  path = tmp_path / 'junk'
  tfrecord.write_records(path, [b'\xff\xff\xff'])
  msg = _error(os.fspath(path))
  assert os.fspath(path) in msg and 'not a valid tf.train.Example' in msg


@pytest.mark.parametrize('change, words', [
    ({'input_ids': np.full(S, V)}, ["'input_ids'", '512', 'vocab_size']),
    ({'masked_lm_ids': np.full(P, V + 3)}, ["'masked_lm_ids'", '515']),
    ({'masked_lm_positions': np.full(P, S)}, ["'masked_lm_positions'",
                                             'seq_len']),
    ({'segment_ids': np.full(S, 2)}, ["'segment_ids'", '0 or 1']),
    ({'next_sentence_labels': [3]}, ["'next_sentence_labels'"]),
    ({'input_mask': np.r_[np.ones(5), 0, np.ones(S - 6)].astype(np.int64)},
     ["'input_mask'", 'ones then zeros']),
    ({'masked_lm_weights': np.full(P, 0.5, np.float32)},
     ["'masked_lm_weights'", '0.5']),
])
def test_values_out_of_range(tmp_path, change, words):
  path = _bad_file(tmp_path, **change)
  msg = _error(path)
  assert path in msg and 'record 2' in msg
  for w in words:
    assert w in msg


def test_prediction_in_padding(tmp_path):
  examples = _source(4).examples(np.arange(4))
  index = next(i for i, e in enumerate(examples) if e['input_mask'][-1] == 0)
  ex = examples[index]
  pos = ex['masked_lm_positions'].copy()
  pos[0] = int(ex['input_mask'].sum())
  msg = _error(_bad_file(tmp_path, index=index, masked_lm_positions=pos))
  assert f'record {index}' in msg and "'masked_lm_positions'" in msg
  assert 'real token' in msg


def test_no_files(tmp_path):
  with pytest.raises(DataError, match='no files match'):
    _reader(str(tmp_path / 'part-*'))
  with pytest.raises(DataError, match='no such directory'):
    bert.open_bert(tmp_path / 'missing')
  with pytest.raises(DataError, match='no train files match'):
    bert.open_bert(tmp_path)


# ---------------------------------------------------------------- packed


def test_packed_files_and_shapes(tmp_path, shards):
  from jaxperf.tools import pack_bert  # pylint: disable=g-import-not-at-top
  d, src = shards
  rows = pack_bert.pack_examples(src.examples(np.arange(2 * N)), S, 3)
  bert.write_rows(tmp_path / 'part-00000-of-00001', rows)
  _write(tmp_path / 'eval_10k', src.examples(np.arange(8)))
  train, evaluation = bert.open_bert(
      tmp_path, seq_len=S, max_predictions=P, vocab_size=V, packed=True,
      max_sequences_per_row=3, prefetch=0)
  assert train.packed and not evaluation.packed
  assert_batches_equal([train.rows(np.arange(len(rows)))],
                        [bert.to_batch(rows)])
  tb = take(train.train_batches(0, 4), 1)[0]
  eb = next(evaluation.eval_batches(4))
  for k in bert.BATCH_KEYS:
    assert tb[k].shape == eb[k].shape and tb[k].dtype == eb[k].dtype, k
  assert tb['masked_lm_positions'].shape == (4, P + 2)
  assert tb['next_sentence_positions'].shape == (4, 3)
  # The unpacked eval rows use slot 0 only.
  np.testing.assert_array_equal(eb['next_sentence_weights'][:, 1:], 0)
  np.testing.assert_array_equal(
      eb['masked_lm_ids'][:, :P], src.rows(np.arange(4))['masked_lm_ids'])
  # A packed file is told apart by its features; a K mismatch is an error.
  assert _reader(tmp_path / 'part-00000-of-00001',
                 max_sequences=None).packed
  msg = _error(os.fspath(tmp_path / 'part-00000-of-00001'), max_sequences=2)
  assert "'masked_lm_positions' has 7 values, expected 6" in msg


def test_packed_record_checks(tmp_path, shards):
  from jaxperf.tools import pack_bert  # pylint: disable=g-import-not-at-top
  _, src = shards
  rows = pack_bert.pack_examples(src.examples(np.arange(12)), S, 3)
  bad = dict(rows[1])
  nsp = bad['next_sentence_positions'].copy()
  nsp[0] += 1
  bad['next_sentence_positions'] = nsp
  path = tmp_path / 'packed'
  bert.write_rows(path, [rows[0], bad])
  msg = _error(os.fspath(path), max_sequences=3)
  assert 'record 1' in msg and "'next_sentence_positions'" in msg
  assert 'position_ids 0' in msg


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic():
  a, b = _source(64), _source(64)
  assert_batches_equal([a.rows(np.arange(64))], [b.rows(np.arange(64))])
  # A row depends on its index only, not on the batch it comes in.
  x = a.rows(np.array([7, 3, 50]))
  y = a.rows(np.arange(64))
  for k in x:
    np.testing.assert_array_equal(x[k], y[k][[7, 3, 50]], k)
  c = _source(64, seed=6).rows(np.arange(4))
  assert not np.array_equal(c['input_ids'], y['input_ids'][:4])
  train, evaluation = bert.synthetic_bert(32, 32, vocab_size=V, seq_len=S,
                                          max_predictions=P, prefetch=0)
  assert not np.array_equal(train.rows(np.arange(4))['input_ids'],
                            evaluation.rows(np.arange(4))['input_ids'])
  x = np.arange(bert.MASK_ID + 1, V)
  np.testing.assert_array_equal(train.successor(x), evaluation.successor(x))


def _check_rows(batch, k, p):
  """Structure every batch row must have, K sequences / P predictions."""
  n, s = batch['input_ids'].shape
  assert batch['masked_lm_positions'].shape == (n, p)
  assert batch['next_sentence_positions'].shape == (n, k)
  for key in bert.BATCH_KEYS:
    want = np.float32 if key in ('masked_lm_weights',
                                 'next_sentence_weights') else np.int32
    assert batch[key].dtype == want, key
  for r in range(n):
    seq, pos = batch['sequence_ids'][r], batch['position_ids'][r]
    ids = batch['input_ids'][r]
    count = int(batch['next_sentence_weights'][r].sum())
    assert batch['next_sentence_weights'][r, :count].all()
    starts = batch['next_sentence_positions'][r, :count]
    assert (ids[starts] == bert.CLS_ID).all() and (pos[starts] == 0).all()
    for j in range(count):
      idx = np.flatnonzero(seq == j + 1)
      assert idx[0] == starts[j] and (np.diff(idx) == 1).all()
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      assert ids[idx[-1]] == bert.SEP_ID
      assert (batch['segment_ids'][r][idx][:2] == 0).all()
    real = seq > 0
    assert (real[:-1] >= real[1:]).all()           # padding at the end
    tail = np.flatnonzero(~real)
    if len(tail) and count:
      np.testing.assert_array_equal(np.diff(pos[tail[0] - 1:]), 1)
    assert not ids[~real].any()
    w = batch['masked_lm_weights'][r]
    m = int(w.sum())
    assert (w[:m] == 1).all() and not w[m:].any()
    mp = batch['masked_lm_positions'][r, :m]
    assert (np.diff(mp) > 0).all() and real[mp].all()
    assert not np.isin(batch['masked_lm_ids'][r, :m],
                       [bert.CLS_ID, bert.SEP_ID, bert.PAD_ID]).any()


def test_synthetic_formats_and_masking():
  ds = _source(400, seq_len=64, max_predictions=10)
  batch = ds.rows(np.arange(400))
  _check_rows(batch, 1, 10)
  lengths = bert.sequence_lengths(batch)
  assert 0.2 < (lengths == 64).mean() < 0.4 and lengths.min() < 20
  w = batch['masked_lm_weights'] > 0
  expected = bert.num_to_predict(lengths, 10)
  np.testing.assert_array_equal(w.sum(1), expected)
  assert 0.13 < w.sum() / lengths.sum() < 0.17
  rows = np.broadcast_to(np.arange(400)[:, None], w.shape)[w]
  shown = batch['input_ids'][rows, batch['masked_lm_positions'][w]]
  truth = batch['masked_lm_ids'][w]
  assert 0.75 < (shown == bert.MASK_ID).mean() < 0.85
  assert 0.06 < (shown == truth).mean() < 0.14
  assert 0.4 < batch['next_sentence_labels'].mean() < 0.6
  # Unmasked neighbours follow the grammar unless the chain restarted (10%).
  content = (batch['input_ids'] > bert.MASK_ID) & (
      batch['segment_ids'] == 0)
  pair = content[:, :-1] & content[:, 1:]
  follows = ds.successor(batch['input_ids'][:, :-1][pair]) == batch[
      'input_ids'][:, 1:][pair]
  assert 0.8 < follows.mean() < 0.95


def test_synthetic_packed_rows():
  ds = _source(200, seq_len=64, max_predictions=10, packed=True,
               max_sequences=3)
  assert ds.max_predictions == 12
  batch = ds.rows(np.arange(200))
  _check_rows(batch, 3, 12)
  per_row = batch['next_sentence_weights'].sum(1)
  assert set(per_row.tolist()) == {1.0, 2.0, 3.0}
  assert (bert.sequence_lengths(batch) >= 0.95 * 64 - 1).all()
  stream = ds.train_batches(0, 8)
  assert next(stream)['input_ids'].shape == (8, 64)


def _bigram_accuracy(train, evaluation, vocab):
  """Masked-LM accuracy of bigram counts: predict from the left neighbour,
  else the right one, else the most common token; and a unigram model's."""
  b = train.rows(np.arange(train.num_examples))
  orig = b['input_ids'].copy()
  w = b['masked_lm_weights'] > 0
  rows = np.broadcast_to(np.arange(len(orig))[:, None], w.shape)
  orig[rows[w], b['masked_lm_positions'][w]] = b['masked_lm_ids'][w]
  content = orig > bert.MASK_ID
  pair = content[:, :-1] & content[:, 1:]
  counts = np.zeros((vocab, vocab))
  np.add.at(counts, (orig[:, :-1][pair], orig[:, 1:][pair]), 1)
  unigram = np.bincount(orig[content], minlength=vocab).argmax()
  e = evaluation.rows(np.arange(evaluation.num_examples))
  x, pos = e['input_ids'], e['masked_lm_positions']
  ids, real = e['masked_lm_ids'], e['masked_lm_weights'] > 0
  s = x.shape[1]
  left = np.take_along_axis(x, np.clip(pos - 1, 0, s - 1), axis=1)
  right = np.take_along_axis(x, np.clip(pos + 1, 0, s - 1), axis=1)
  guess = np.where(left > bert.MASK_ID, counts.argmax(1)[left],
                   np.where(right > bert.MASK_ID, counts.argmax(0)[right],
                            unigram))
  return (guess == ids)[real].mean(), (ids == unigram)[real].mean()


@pytest.mark.parametrize('vocab, packed', [(256, False), (512, True)])
def test_synthetic_is_learnable(vocab, packed):
  train, evaluation = bert.synthetic_bert(
      3000, 500, vocab_size=vocab, seq_len=64, max_predictions=10,
      packed=packed, seed=3, prefetch=0)
  acc, base = _bigram_accuracy(train, evaluation, vocab)
  assert 0.8 < acc < 0.95
  assert base < 0.05


def test_synthetic_streams_and_close():
  train, evaluation = bert.synthetic_bert(50, 10, vocab_size=V, seq_len=S,
                                          max_predictions=P, prefetch=2)
  a = take(train.train_batches(4, 6), 3)
  b = take(train.train_batches(5, 6), 2)
  assert_batches_equal(a[1:], b)
  batches = list(evaluation.eval_batches(4))
  assert [int(x['mask'].sum()) for x in batches] == [4, 4, 2]
  stream = train.train_batches(0, 2)
  next(stream)
  train.close()
  with pytest.raises(RuntimeError, match='closed'):
    train.train_batches(0, 2)
