"""BERT pretraining data (MLPerf Wikipedia TFRecords), packed rows, synthetic.

On disk: the MLPerf reference's pre-masked TFRecords, as its
create_pretraining_data.py writes them (max_seq_length S = 512,
max_predictions_per_seq P = 76). Every record is a tf.train.Example with

    input_ids             int64 [S]  token ids, zero padded
    input_mask            int64 [S]  1 for real tokens, then 0
    segment_ids           int64 [S]  token type 0 / 1
    masked_lm_positions   int64 [P]  zero padded
    masked_lm_ids         int64 [P]  zero padded
    masked_lm_weights     float [P]  1.0 per real prediction, then 0.0
    next_sentence_labels  int64 [1]  0: B follows A, 1: B is random

Training data is many files (part-00000-of-00500, ...), the evaluation set
one file of 10,000 records (eval_10k). Token ids: [PAD] 0, [CLS] 101,
[SEP] 102, [MASK] 103, vocabulary 30522.

Batches are in the general "packed" form (models/bert.py): a row holds up to
K sequences. Per row (int32 unless noted):

    input_ids               [S]
    segment_ids             [S]  token type 0 / 1
    sequence_ids            [S]  0 padding, i for tokens of the i-th sequence
    position_ids            [S]  a token's offset from the start of its
                                 sequence (0 at its [CLS]); padding after the
                                 last sequence continues that sequence's count
    masked_lm_positions     [P'] row offsets of the predictions
    masked_lm_ids           [P']
    masked_lm_weights       [P'] float32, 1 real, 0 padding
    next_sentence_positions [K]  row offset of each sequence's [CLS]
    next_sentence_labels    [K]
    next_sentence_weights   [K]  float32, 1 real sequence, 0 empty slot

An unpacked record is the K = 1 row: sequence_ids = input_mask, position_ids =
0..S-1 (the padding rule above makes that hold for padding too),
next_sentence_positions = [0]. Rows have room for P' = `row_predictions(P, K)`
= P + K - 1 predictions: P for K = 1, 78 for the reference's 76 and K = 3.
That is the most K sequences of 512 tokens in all can carry when masked as
create_pretraining_data masks (min(76, max(1, round(0.15 * length))) each);
`jaxperf.tools.pack_bert` moves a sequence to a row of its own in the rare
row that would need more. Eval batches add 'mask' bool [b], False on padding
rows (all zero, weights 0).

Packed files (written by `python -m jaxperf.tools.pack_bert`) hold one row per
record with exactly the batch features above (int64 lists, the weights float
lists), [P'] and [K] long. `BertRecords` tells the two kinds apart by the
feature names of the first record (packed files have 'sequence_ids') unless
`packed` is given. An unpacked file read with max_sequences K > 1 gives K-slot
rows with one sequence each, so packed training data and the unpacked eval
set batch to the same shapes.

Every record is checked when read: missing features (unknown extra features are
ignored), the wrong kind or number of values, token ids outside
[0, vocab_size), positions outside the row, flags other than 0 / 1, a mask
that is not ones then zeros, a prediction in padding; each is a DataError
naming the file, the record and the feature. Records are parsed with a
protobuf walker that decodes the packed number lists with numpy.

Order: global slot s = step * global_batch + i holds record
permutation(seed, s // n)[s % n], so the stream is a function of (seed, step):
it can start at any step, and each process takes its contiguous slice of every
global batch. Evaluation goes through the records in file order. Memory: the
record index takes 16 bytes per record and an epoch's permutation 4 more.

`SyntheticBert` is a learnable stand-in with the same interface, formats and
masking (see its docstring). Helpers: `examples_to_batch`, `batch_to_examples`,
`to_batch`, `split_rows`, `pack_batch`, `write_examples`, `write_rows`,
`read_file`; `jaxperf.tools.pack_bert.pack_examples` packs samples in memory.
"""

from __future__ import annotations

import abc
import concurrent.futures
import glob as glob_lib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxperf.data import tfrecord
from jaxperf.data.augment import epoch_order, local_batch_size
from jaxperf.data.prefetch import PrefetchedStreams
from jaxperf.errors import ConfigError, DataError

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 101, 102, 103
VOCAB_SIZE = 30522
SEQ_LEN = 512
MAX_PREDICTIONS = 76
MASKED_LM_PROB = 0.15

# Feature name -> (kind, length): 'i' int64_list, 'f' float_list; lengths
# S (sequence), P (predictions), K (sequences per row) or 1.
UNPACKED_FEATURES = {
    'input_ids': ('i', 'S'), 'input_mask': ('i', 'S'),
    'segment_ids': ('i', 'S'), 'masked_lm_positions': ('i', 'P'),
    'masked_lm_ids': ('i', 'P'), 'masked_lm_weights': ('f', 'P'),
    'next_sentence_labels': ('i', '1'),
}
PACKED_FEATURES = {
    'input_ids': ('i', 'S'), 'segment_ids': ('i', 'S'),
    'sequence_ids': ('i', 'S'), 'position_ids': ('i', 'S'),
    'masked_lm_positions': ('i', 'P'), 'masked_lm_ids': ('i', 'P'),
    'masked_lm_weights': ('f', 'P'), 'next_sentence_positions': ('i', 'K'),
    'next_sentence_labels': ('i', 'K'), 'next_sentence_weights': ('f', 'K'),
}
# The keys of a batch (packed rows are stored under the same names).
BATCH_KEYS = tuple(PACKED_FEATURES)
_FLOAT_KEYS = ('masked_lm_weights', 'next_sentence_weights')


def row_predictions(max_predictions: int, max_sequences: int) -> int:
  """Prediction slots in a row of `max_sequences`: P + K - 1 (see above)."""
  return int(max_predictions) + int(max_sequences) - 1


def num_to_predict(length: np.ndarray | int, max_predictions: int,
                   masked_lm_prob: float = MASKED_LM_PROB) -> np.ndarray:
  """Predictions create_pretraining_data makes for sequences of `length`."""
  n = np.rint(np.asarray(length) * masked_lm_prob).astype(np.int64)
  return np.minimum(max_predictions, np.maximum(1, n))


# ---------------------------------------------------------------- protobuf
#
# The same wire format as jaxperf.data.tfrecord, with numbers decoded and
# encoded a whole list at a time with numpy (that module decodes value by
# value in Python, ~10x slower on these records).


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    b = buf[pos]  # IndexError when truncated
    pos += 1
    result |= (b & 0x7F) << shift
    if b < 0x80:
      return result, pos
    shift += 7
    if shift >= 70:
      raise ValueError('varint longer than 10 bytes')


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, Any]]:
  """(field, wire type, value) of buf[pos:end]; spans (start, stop) for
  length-delimited and fixed fields, ints for varints."""
  while pos < end:
    key, pos = _uvarint(buf, pos)
    wire = key & 7
    if wire == 0:
      value, pos = _uvarint(buf, pos)
    elif wire == 2:
      n, pos = _uvarint(buf, pos)
      value, pos = (pos, pos + n), pos + n
    elif wire in (1, 5):
      n = 8 if wire == 1 else 4
      value, pos = (pos, pos + n), pos + n
    else:
      raise ValueError(f'unsupported wire type {wire} (field {key >> 3})')
    if pos > end:
      raise ValueError(f'field {key >> 3} runs past the end of its message')
    yield key >> 3, wire, value


class _Unpacked(Exception):
  """A number list is not in packed encoding: use the general parser."""


def _decode_varints(data: bytes, counts_at: Sequence[int]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Packed varints of consecutive lists -> (int64 values, count per list).

  `counts_at` holds each list's starting byte offset in `data`.
  """
  b = np.frombuffer(data, np.uint8)
  if not len(b):
    return np.zeros(0, np.int64), np.zeros(len(counts_at), np.int64)
  ends = b < 0x80
  starts = np.asarray(counts_at, np.int64)
  stops = np.append(starts[1:], len(b))
  nonempty = stops > starts
  if not ends[stops[nonempty] - 1].all():
    raise ValueError('a packed number list ends inside a varint')
  counts = np.zeros(len(starts), np.int64)
  counts[nonempty] = np.add.reduceat(ends, starts[nonempty])
  if ends.all():
    return b.astype(np.int64), counts
  first = np.flatnonzero(np.concatenate(([True], ends[:-1])))
  group = np.cumsum(np.concatenate(([0], ends[:-1])))
  shift = np.arange(len(b)) - first[group]
  if shift.max() >= 10:
    raise ValueError('varint longer than 10 bytes')
  parts = (b & 0x7F).astype(np.uint64) << (7 * shift).astype(np.uint64)
  return np.add.reduceat(parts, first).view(np.int64), counts


def decode_example(data: bytes) -> dict[str, np.ndarray]:
  """A serialized tf.train.Example -> {name: int64 or float32 array}.

  Bytes features are left out. Raises ValueError if `data` is not a valid
  Example.
  """
  try:
    return _decode_fast(data)
  except _Unpacked:
    out = {}
    for name, values in tfrecord.parse_example(data).items():
      if values and isinstance(values[0], bytes):
        continue
      is_float = any(isinstance(v, float) for v in values)
      out[name] = np.asarray(values, np.float32 if is_float else np.int64)
    return out
  except IndexError:
    raise ValueError('truncated message') from None


def _decode_fast(data: bytes) -> dict[str, np.ndarray]:
  ints: dict[str, list[tuple[int, int]]] = {}
  floats: dict[str, list[tuple[int, int]]] = {}
  for number, wire, features in _fields(data, 0, len(data)):
    if number != 1 or wire != 2:
      continue
    for entry_number, entry_wire, entry in _fields(data, *features):
      if entry_number != 1 or entry_wire != 2:
        continue
      name, feature = '', None
      for f, w, v in _fields(data, *entry):
        if f == 1 and w == 2:
          name = data[v[0]:v[1]].decode('utf-8')
        elif f == 2 and w == 2:
          feature = v
      kind, spans = 0, []
      if feature is not None:
        for number2, wire2, lst in _fields(data, *feature):
          if number2 not in (1, 2, 3) or wire2 != 2:
            continue
          if number2 != kind:
            kind, spans = number2, []
          for f, w, v in _fields(data, *lst):
            if f != 1:
              continue
            if w != 2:
              raise _Unpacked()
            spans.append(v)
      ints.pop(name, None)
      floats.pop(name, None)
      if kind == 3:
        ints[name] = spans
      elif kind == 2:
        floats[name] = spans
      elif kind == 0:
        ints[name] = []
  out: dict[str, np.ndarray] = {}
  if ints:
    names = list(ints)
    pieces, offsets, pos = [], [], 0
    for name in names:
      offsets.append(pos)
      for s, e in ints[name]:
        pieces.append(data[s:e])
        pos += e - s
    values, counts = _decode_varints(b''.join(pieces), offsets)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    for i, name in enumerate(names):
      out[name] = values[bounds[i]:bounds[i + 1]]
  for name, spans in floats.items():
    raw = b''.join(data[s:e] for s, e in spans)
    if len(raw) % 4:
      raise ValueError(f'feature {name!r}: packed floats not a multiple of 4 '
                       f'bytes')
    out[name] = np.frombuffer(raw, '<f4').astype(np.float32)
  return out


_delimited = tfrecord._delimited  # pylint: disable=protected-access


def _encode_varints(values: np.ndarray) -> bytes:
  """Packed varint encoding of non-negative integers."""
  v = np.asarray(values, np.int64).astype(np.uint64).ravel()
  if not len(v) or v.max() < 0x80:
    return v.astype(np.uint8).tobytes()
  nbytes = np.ones(len(v), np.int64)
  for k in range(1, 10):
    nbytes += v >= (np.uint64(1) << np.uint64(7 * k))
  width = int(nbytes.max())
  k = np.arange(width, dtype=np.uint64)
  groups = (v[:, None] >> (np.uint64(7) * k)) & np.uint64(0x7F)
  more = np.arange(width)[None, :] < nbytes[:, None] - 1
  groups |= np.where(more, np.uint64(0x80), np.uint64(0))
  keep = np.arange(width)[None, :] < nbytes[:, None]
  return groups[keep].astype(np.uint8).tobytes()


def encode_example(features: Mapping[str, np.ndarray]) -> bytes:
  """A tf.train.Example of int64 / float32 lists, e.g. one packed row.

  Integer arrays (non-negative) become Int64Lists, floating ones FloatLists.
  """
  entries = []
  for name, value in features.items():
    a = np.asarray(value)
    if np.issubdtype(a.dtype, np.floating):
      lst = _delimited(2, _delimited(1, a.astype('<f4').tobytes()))
    else:
      if a.size and a.min() < 0:
        raise ValueError(f'feature {name!r}: negative values are not '
                         f'supported')
      lst = _delimited(3, _delimited(1, _encode_varints(a)))
    entries.append(_delimited(1, _delimited(1, name.encode()) +
                              _delimited(2, lst)))
  return _delimited(1, b''.join(entries))


# ---------------------------------------------------------------- formats


def examples_to_batch(examples: Mapping[str, np.ndarray] |
                      Sequence[Mapping[str, Any]], *,
                      max_sequences: int = 1,
                      max_predictions: int | None = None
                      ) -> dict[str, np.ndarray]:
  """Unpacked records (on-disk features) -> a batch of one-sequence rows.

  `examples`: a sequence of dicts of the on-disk features, or one dict of
  stacked [N, ...] arrays. Rows get `max_sequences` NSP slots (slot 0 used)
  and `max_predictions` prediction slots (default: the records' own P).
  """
  if not isinstance(examples, Mapping):
    examples = {k: np.stack([np.asarray(e[k]) for e in examples])
                for k in UNPACKED_FEATURES}
  ids = np.asarray(examples['input_ids'], np.int32)
  n, s = ids.shape
  p = np.shape(examples['masked_lm_positions'])[1]
  width = p if max_predictions is None else int(max_predictions)
  if width < p:
    raise ValueError(f'{p} prediction slots do not fit in {width}')
  k = int(max_sequences)

  def pad(a, size, dtype):
    out = np.zeros((n, size), dtype)
    out[:, :a.shape[1]] = a
    return out

  labels = np.asarray(examples['next_sentence_labels']).reshape(n, -1)[:, :1]
  return {
      'input_ids': ids,
      'segment_ids': np.asarray(examples['segment_ids'], np.int32),
      'sequence_ids': np.asarray(examples['input_mask'], np.int32),
      'position_ids': np.broadcast_to(np.arange(s, dtype=np.int32),
                                      (n, s)).copy(),
      'masked_lm_positions': pad(np.asarray(examples['masked_lm_positions']),
                                 width, np.int32),
      'masked_lm_ids': pad(np.asarray(examples['masked_lm_ids']), width,
                           np.int32),
      'masked_lm_weights': pad(np.asarray(examples['masked_lm_weights']),
                               width, np.float32),
      'next_sentence_positions': np.zeros((n, k), np.int32),
      'next_sentence_labels': pad(labels, k, np.int32),
      'next_sentence_weights': pad(np.ones((n, 1)), k, np.float32),
  }


def batch_to_examples(batch: Mapping[str, np.ndarray], *,
                      max_predictions: int | None = None
                      ) -> list[dict[str, np.ndarray]]:
  """One-sequence rows -> on-disk records (dicts of the unpacked features).

  `max_predictions` trims the prediction lists (default: keep the row's).
  """
  seq = np.asarray(batch['sequence_ids'])
  if seq.max(initial=0) > 1 or (
      np.asarray(batch['next_sentence_weights'])[:, 1:] > 0).any():
    raise ValueError('rows with more than one sequence have no unpacked form')
  p = np.shape(batch['masked_lm_positions'])[1]
  width = p if max_predictions is None else int(max_predictions)
  if (np.asarray(batch['masked_lm_weights'])[:, width:] > 0).any():
    raise ValueError(f'a row has more than {width} predictions')
  out = []
  for i in range(len(seq)):
    out.append({
        'input_ids': np.asarray(batch['input_ids'][i], np.int64),
        'input_mask': (seq[i] > 0).astype(np.int64),
        'segment_ids': np.asarray(batch['segment_ids'][i], np.int64),
        'masked_lm_positions': np.asarray(
            batch['masked_lm_positions'][i, :width], np.int64),
        'masked_lm_ids': np.asarray(batch['masked_lm_ids'][i, :width],
                                    np.int64),
        'masked_lm_weights': np.asarray(
            batch['masked_lm_weights'][i, :width], np.float32),
        'next_sentence_labels': np.asarray(
            batch['next_sentence_labels'][i, :1], np.int64),
    })
  return out


def to_batch(rows: Sequence[Mapping[str, np.ndarray]]
             ) -> dict[str, np.ndarray]:
  """Rows (dicts of the batch keys) stacked into one batch."""
  if not rows:
    raise ValueError('no rows to stack')
  return {k: np.stack([np.asarray(r[k]) for r in rows]).astype(
      np.float32 if k in _FLOAT_KEYS else np.int32) for k in BATCH_KEYS}


def split_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
  """A batch -> its rows, each a dict of the batch keys."""
  n = len(batch['input_ids'])
  return [{k: np.asarray(batch[k][i]) for k in BATCH_KEYS} for i in range(n)]


def sequence_lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Real tokens per row."""
  return (np.asarray(batch['sequence_ids']) > 0).sum(axis=1)


def pack_batch(batch: Mapping[str, np.ndarray], groups: np.ndarray, *,
               max_predictions: int | None = None) -> dict[str, np.ndarray]:
  """Packs one-sequence rows of `batch` into rows of several sequences.

  groups: int [R, K], each output row's input rows in order, -1 for empty
  slots. Sequences are laid end to end; positions restart at each [CLS];
  predictions and NSP positions move with their sequence. Output rows have
  K NSP slots and `max_predictions` prediction slots (default
  `row_predictions(P, K)` from the input's P). ValueError if a row's
  sequences are longer than the row or carry more predictions than it holds.
  """
  groups = np.asarray(groups, np.int64)
  if groups.ndim != 2:
    raise ValueError(f'groups must be [rows, K], got shape {groups.shape}')
  seq_ids = np.asarray(batch['sequence_ids'])
  if seq_ids.max(initial=0) > 1:
    raise ValueError('pack_batch packs one-sequence rows; these rows are '
                     'already packed')
  r, k = groups.shape
  s = seq_ids.shape[1]
  p_in = np.shape(batch['masked_lm_positions'])[1]
  p_out = (row_predictions(p_in, k) if max_predictions is None
           else int(max_predictions))
  # Empty slots last.
  groups = np.take_along_axis(groups, np.argsort(groups < 0, axis=1,
                                                 kind='stable'), axis=1)
  valid = groups >= 0
  src = np.where(valid, groups, 0)
  length = np.where(valid, (seq_ids > 0).sum(axis=1)[src], 0)
  ends = np.cumsum(length, axis=1)
  starts = ends - length
  if (ends[:, -1] > s).any():
    bad = int(np.argmax(ends[:, -1] > s))
    raise ValueError(f'row {bad}: sequences of {length[bad].tolist()} tokens '
                     f'do not fit in {s}')
  t = np.arange(s)
  member = (t[None, :, None] >= ends[:, None, :]).sum(axis=2)  # [R, S]
  count = valid.sum(axis=1)
  real = member < count[:, None]
  slot = np.minimum(member, np.maximum(count - 1, 0)[:, None])
  rows = np.arange(r)[:, None]
  start = starts[rows, slot]
  source = src[rows, slot]
  offset = np.where(real, t[None] - start, 0)
  out = {
      'input_ids': np.where(real, np.asarray(batch['input_ids'])[
          source, offset], 0),
      'segment_ids': np.where(real, np.asarray(batch['segment_ids'])[
          source, offset], 0),
      'sequence_ids': np.where(real, member + 1, 0),
      'position_ids': t[None] - start,
  }
  weights = np.asarray(batch['masked_lm_weights'])[src] * valid[..., None]
  positions = np.asarray(batch['masked_lm_positions'])[src] + starts[..., None]
  ids = np.asarray(batch['masked_lm_ids'])[src]
  weights, positions, ids = (a.reshape(r, k * p_in)
                             for a in (weights, positions, ids))
  n_pred = (weights > 0).sum(axis=1)
  if (n_pred > p_out).any():
    bad = int(np.argmax(n_pred > p_out))
    raise ValueError(f'row {bad}: {n_pred[bad]} predictions do not fit in '
                     f'{p_out} slots')
  order = np.argsort(weights <= 0, axis=1, kind='stable')
  keep = np.arange(k * p_in)[None] < n_pred[:, None]
  take = lambda a: np.where(keep, np.take_along_axis(a, order, axis=1), 0)
  width = min(p_out, k * p_in)
  labels = np.asarray(batch['next_sentence_labels'])[src, 0]

  def fit(a, size):
    a = a[:, :size]
    return np.pad(a, ((0, 0), (0, size - a.shape[1])))

  out.update(
      masked_lm_positions=fit(take(positions)[:, :width], p_out),
      masked_lm_ids=fit(take(ids)[:, :width], p_out),
      masked_lm_weights=fit(take(weights)[:, :width], p_out),
      next_sentence_positions=np.where(valid, starts, 0),
      next_sentence_labels=np.where(valid, labels, 0),
      next_sentence_weights=valid.astype(np.float32))
  return {key: out[key].astype(np.float32 if key in _FLOAT_KEYS else np.int32)
          for key in BATCH_KEYS}


def empty_rows(n: int, seq_len: int, max_predictions: int,
               max_sequences: int) -> dict[str, np.ndarray]:
  """`n` padding rows: all zero, position ids 0..S-1, weights 0."""
  out = {k: np.zeros((n, seq_len), np.int32)
         for k in ('input_ids', 'segment_ids', 'sequence_ids')}
  out['position_ids'] = np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                        (n, seq_len)).copy()
  for k in ('masked_lm_positions', 'masked_lm_ids'):
    out[k] = np.zeros((n, max_predictions), np.int32)
  out['masked_lm_weights'] = np.zeros((n, max_predictions), np.float32)
  for k in ('next_sentence_positions', 'next_sentence_labels'):
    out[k] = np.zeros((n, max_sequences), np.int32)
  out['next_sentence_weights'] = np.zeros((n, max_sequences), np.float32)
  return {k: out[k] for k in BATCH_KEYS}


def write_examples(path: str | os.PathLike,
                   examples: Iterable[Mapping[str, Any]]) -> None:
  """Writes unpacked records in the reference's on-disk format.

  Each example: a dict of the seven features (arrays or lists);
  masked_lm_weights is written as floats, the rest as int64.
  """
  def encode(e):
    missing = set(UNPACKED_FEATURES) - set(e)
    if missing:
      raise ValueError(f'example lacks {sorted(missing)}')
    return encode_example({
        k: np.asarray(e[k], np.float32 if kind == 'f' else np.int64)
        for k, (kind, _) in UNPACKED_FEATURES.items()})
  tfrecord.write_records(path, (encode(e) for e in examples))


def write_rows(path: str | os.PathLike,
               rows: Mapping[str, np.ndarray] | Iterable[Mapping[str, Any]]
               ) -> None:
  """Writes packed rows (a batch or an iterable of rows) as TFRecords."""
  if isinstance(rows, Mapping):
    rows = split_rows(rows)
  tfrecord.write_records(path, (encode_example({
      k: np.asarray(r[k], np.float32 if k in _FLOAT_KEYS else np.int64)
      for k in BATCH_KEYS}) for r in rows))


# ---------------------------------------------------------------- sources


class BertSource(PrefetchedStreams, abc.ABC):
  """Train and eval streams over `num_examples` rows; subclasses make rows.

  Subclasses set seq_len, max_sequences, max_predictions (the batches' P')
  and implement `rows(index) -> batch dict` for an int array of row indices.
  """

  num_examples: int
  seq_len: int
  max_predictions: int
  max_sequences: int

  def __init__(self, num_examples: int, *, seed: int, prefetch: int):
    if seed < 0:
      raise ConfigError(f'the data seed must be >= 0, got {seed}')
    if prefetch < 0:
      raise ConfigError(f'prefetch must be >= 0, got {prefetch}')
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self._init_streams(prefetch)

  @abc.abstractmethod
  def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """The rows at `index`, as numpy arrays keyed by feature."""

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the rows in training epoch `epoch`."""
    dtype = np.int32 if self.num_examples < 2**31 else np.int64
    return np.random.default_rng([self.seed, 0xBE27, epoch]).permutation(
        self.num_examples).astype(dtype)

  def train_order(self, step: int, global_batch: int, *,
                  process_index: int = 0, process_count: int = 1
                  ) -> np.ndarray:
    """Row indices of this process's slice of batch `step`."""
    return self._order(step, global_batch, process_index, process_count, {})

  def _order(self, step, global_batch, process_index, process_count, cache):
    return epoch_order(step, global_batch, process_index, process_count,
                       self.num_examples, self.permutation, cache)[0]

  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from batch `start_step` on.

    Yields this process's slice of each global batch (the keys above).
    """
    if start_step < 0:
      raise ConfigError(f'start_step must be >= 0, got {start_step}')
    local_batch_size(global_batch, process_count, process_index)

    def batches():
      cache: dict[int, np.ndarray] = {}
      step = start_step
      while True:
        yield self.rows(self._order(step, global_batch, process_index,
                                    process_count, cache))
        step += 1
    return self._stream(batches())

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order, the last batch padded.

    Padding rows are all zero with weights 0 and 'mask' False.
    """
    local = local_batch_size(global_batch, process_count, process_index)

    def batches():
      for start in range(0, self.num_examples, global_batch):
        first = start + process_index * local
        index = np.arange(first, min(first + local, self.num_examples))
        pad = local - len(index)
        parts = []
        if len(index):
          parts.append(self.rows(index))
        if pad:
          parts.append(empty_rows(pad, self.seq_len, self.max_predictions,
                                  self.max_sequences))
        batch = (parts[0] if len(parts) == 1 else
                 {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
        batch['mask'] = np.arange(local) < len(index)
        yield batch
    return self._stream(batches())

  def _stream(self, batches: Iterator) -> Iterator[dict[str, np.ndarray]]:
    return self._prefetched(batches)


def _expand(files: str | os.PathLike | Sequence[str | os.PathLike]
            ) -> list[str]:
  """Paths from a glob pattern, a path or a list of either, sorted."""
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  out = []
  for f in files:
    f = os.fspath(f)
    matches = sorted(glob_lib.glob(f)) if glob_lib.has_magic(f) else [f]
    if not matches:
      raise DataError(f'no files match {f!r}')
    out.extend(matches)
  return sorted(set(out))


class BertRecords(BertSource):
  """BERT pretraining TFRecords: the reference's unpacked ones, or packed.

  files: a glob pattern, a path or a list of either (sorted by name).
  seq_len, max_predictions (per sequence, the reference's 76),
  max_sequences (K of the batches: a packed file's own K, or > 1 to widen
  unpacked records): None takes them from the first record. packed: None
  detects the kind from the first record's feature names. Batches have
  `self.max_predictions` = row_predictions(max_predictions, K) prediction
  slots.
  """

  def __init__(self, files: str | os.PathLike | Sequence[str | os.PathLike],
               *, seq_len: int | None = SEQ_LEN,
               max_predictions: int | None = MAX_PREDICTIONS,
               max_sequences: int | None = None,
               vocab_size: int = VOCAB_SIZE, packed: bool | None = None,
               seed: int = 0, prefetch: int = 2, num_workers: int = 8):
    files = _expand(files)
    if not files:
      raise DataError('no TFRecord files given')
    self.files = files
    self.vocab_size = int(vocab_size)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
      indexes = list(pool.map(tfrecord.index_records, files))
    counts = [len(o) for o, _ in indexes]
    if not sum(counts):
      raise DataError(f'the {len(files)} TFRecord file(s) {files[0]}, ... '
                      f'hold no records')
    self._file = np.repeat(np.arange(len(files), dtype=np.int32), counts)
    self._offset = np.concatenate([o for o, _ in indexes])
    self._length = np.concatenate([n for _, n in indexes]).astype(np.int32)
    self._first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(
        np.int64)
    first_index = int(self._first[int(np.argmax(np.asarray(counts) > 0))])
    first = self._decode(first_index)
    if packed is None:
      if 'sequence_ids' in first:
        packed = True
      elif 'input_mask' in first:
        packed = False
      else:
        raise DataError(
            f'{self.where(first_index)}: neither unpacked BERT features (with '
            f'input_mask: {sorted(UNPACKED_FEATURES)}) nor packed ones (with '
            f'sequence_ids: {sorted(PACKED_FEATURES)}); it has '
            f'{sorted(first)}')
    self.packed = bool(packed)
    self.spec = PACKED_FEATURES if self.packed else UNPACKED_FEATURES
    size = lambda name: len(first.get(name, ()))
    self.seq_len = int(seq_len) if seq_len is not None else size('input_ids')
    if self.packed:
      k = (int(max_sequences) if max_sequences is not None
           else size('next_sentence_positions'))
      self.max_predictions = (
          row_predictions(max_predictions, k) if max_predictions is not None
          else size('masked_lm_positions'))
      self.disk_lengths = {'S': self.seq_len, 'P': self.max_predictions,
                           'K': k, '1': 1}
    else:
      k = 1 if max_sequences is None else int(max_sequences)
      p = (int(max_predictions) if max_predictions is not None
           else size('masked_lm_positions'))
      self.max_predictions = row_predictions(p, k)
      self.disk_lengths = {'S': self.seq_len, 'P': p, 'K': 1, '1': 1}
    self.max_sequences = k
    if self.seq_len < 1 or k < 1 or self.disk_lengths['P'] < 1:
      raise ConfigError(f'seq_len {self.seq_len}, max_sequences {k} and '
                        f'max_predictions {self.disk_lengths["P"]} must be '
                        f'>= 1')
    super().__init__(sum(counts), seed=seed, prefetch=prefetch)

  def where(self, index: int) -> str:
    """The file, record number and byte offset of record `index`."""
    f = int(self._file[index])
    return (f'{self.files[f]} record {index - int(self._first[f])} '
            f'(byte offset {int(self._offset[index])})')

  def _decode(self, index: int) -> dict[str, np.ndarray]:
    f = int(self._file[index])
    data = tfrecord.read_record(self.files[f], int(self._offset[index]),
                                int(self._length[index]),
                                index - int(self._first[f]))
    try:
      return decode_example(data)
    except (ValueError, UnicodeDecodeError) as e:
      raise DataError(f'{self.where(index)}: not a valid tf.train.Example '
                      f'({e})') from None

  def features(self, index: np.ndarray | Sequence[int]
               ) -> dict[str, np.ndarray]:
    """The checked on-disk features of records `index`, stacked [n, ...]."""
    index = np.asarray(index, np.int64)
    n = len(index)
    kinds = {'i': np.int64, 'f': np.float32}
    out = {name: np.zeros((n, self.disk_lengths[length]), kinds[kind])
           for name, (kind, length) in self.spec.items()}
    for j, i in enumerate(index.tolist()):
      ex = self._decode(i)
      missing = [k for k in self.spec if k not in ex]
      if missing:
        extra = sorted(set(ex) - set(self.spec))
        raise DataError(
            f'{self.where(i)}: missing feature(s) {missing}; '
            f'{"packed" if self.packed else "unpacked"} BERT records have '
            f'{list(self.spec)}'
            + (f' (unexpected: {extra})' if extra else ''))
      for name, (kind, length) in self.spec.items():
        v = ex[name]
        want = self.disk_lengths[length]
        if (v.dtype == np.float32) != (kind == 'f'):
          kinds = ('a float_list', 'an int64_list')
          raise DataError(
              f'{self.where(i)}: feature {name!r} is '
              f'{kinds[v.dtype != np.float32]}, expected '
              f'{kinds[kind != "f"]}')
        if len(v) != want:
          what = {'S': 'seq_len', 'P': self._p_meaning(),
                  'K': 'max sequences per row', '1': 'one value'}[length]
          raise DataError(
              f'{self.where(i)}: feature {name!r} has {len(v)} values, '
              f'expected {want} ({what})')
        out[name][j] = v
    self._check(index, out)
    return out

  def _p_meaning(self) -> str:
    if not self.packed:
      return 'max_predictions'
    k = self.max_sequences
    return (f'prediction slots of a row of {k}: max_predictions '
            f'{self.max_predictions - k + 1} + {k} - 1')

  def _fail(self, index, ok: np.ndarray, name: str, values: np.ndarray,
            expected: str) -> None:
    if ok.all():
      return
    row, col = np.unravel_index(int(np.argmin(ok.reshape(-1))), ok.shape) \
        if ok.ndim == 2 else (int(np.argmin(ok)), None)
    at = f'[{col}]' if col is not None else ''
    value = values[row, col] if col is not None else values[row]
    raise DataError(f'{self.where(int(index[row]))}: feature {name!r}{at} is '
                    f'{value}, expected {expected}')

  def _check(self, index: np.ndarray, f: dict[str, np.ndarray]) -> None:
    s, v = self.seq_len, self.vocab_size
    in_range = lambda a, hi: (a >= 0) & (a < hi)
    flag = lambda a: (a == 0) | (a == 1)
    for name in ('input_ids', 'masked_lm_ids'):
      self._fail(index, in_range(f[name], v), name, f[name],
                 f'a token id in [0, {v}) (vocab_size)')
    self._fail(index, flag(f['segment_ids']), 'segment_ids',
               f['segment_ids'], '0 or 1')
    self._fail(index, flag(f['next_sentence_labels']), 'next_sentence_labels',
               f['next_sentence_labels'], '0 or 1')
    self._fail(index, in_range(f['masked_lm_positions'], s),
               'masked_lm_positions', f['masked_lm_positions'],
               f'a position in [0, {s}) (seq_len)')
    w = f['masked_lm_weights']
    self._fail(index, (w == 0) | (w == 1), 'masked_lm_weights', w,
               '0.0 or 1.0')
    if not self.packed:
      mask = f['input_mask']
      self._fail(index, flag(mask), 'input_mask', mask, '0 or 1')
      self._fail(index, mask[:, 0] == 1, 'input_mask', mask[:, 0],
                 '1 at [0] (the [CLS] token)')
      self._fail(index, mask[:, 1:] <= mask[:, :-1], 'input_mask',
                 mask[:, 1:], 'ones then zeros')
      length = mask.sum(axis=1, keepdims=True)
      self._fail(index, (w == 0) | (f['masked_lm_positions'] < length),
                 'masked_lm_positions', f['masked_lm_positions'],
                 'a real token (input_mask 1) where masked_lm_weights is 1')
      return
    k = self.max_sequences
    seq = f['sequence_ids']
    self._fail(index, in_range(seq, k + 1), 'sequence_ids', seq,
               f'a sequence number in [0, {k}]')
    self._fail(index, in_range(f['position_ids'], s), 'position_ids',
               f['position_ids'], f'a position in [0, {s}) (seq_len)')
    nsp_pos = f['next_sentence_positions']
    self._fail(index, in_range(nsp_pos, s), 'next_sentence_positions',
               nsp_pos, f'a position in [0, {s})')
    nsp_w = f['next_sentence_weights']
    self._fail(index, flag(nsp_w), 'next_sentence_weights', nsp_w,
               '0.0 or 1.0')
    at = np.take_along_axis(seq, np.clip(f['masked_lm_positions'], 0, s - 1),
                            axis=1)
    self._fail(index, (w == 0) | (at > 0), 'masked_lm_positions',
               f['masked_lm_positions'],
               'a real token (sequence_ids > 0) where masked_lm_weights is 1')
    at = np.take_along_axis(seq, np.clip(nsp_pos, 0, s - 1), axis=1)
    first = np.take_along_axis(f['position_ids'], np.clip(nsp_pos, 0, s - 1),
                               axis=1)
    ok = (nsp_w == 0) | ((at == np.arange(1, k + 1)) & (first == 0))
    self._fail(index, ok, 'next_sentence_positions', nsp_pos,
               'the first token (position_ids 0) of sequence i+1 where '
               'next_sentence_weights is 1')

  def rows(self, index: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Records `index` as a batch (checked)."""
    f = self.features(index)
    if self.packed:
      return {k: f[k].astype(np.float32 if k in _FLOAT_KEYS else np.int32)
              for k in BATCH_KEYS}
    return examples_to_batch(f, max_sequences=self.max_sequences,
                             max_predictions=self.max_predictions)


def read_file(path: str | os.PathLike, **kwargs) -> dict[str, np.ndarray]:
  """Every record of one file as a batch (checked); kwargs as BertRecords."""
  ds = BertRecords([path], prefetch=0, num_workers=1, **kwargs)
  return ds.rows(np.arange(ds.num_examples))


def open_bert(data_dir: str | os.PathLike, *, seq_len: int = SEQ_LEN,
              max_predictions: int = MAX_PREDICTIONS,
              max_sequences_per_row: int = 3, packed: bool = False,
              vocab_size: int = VOCAB_SIZE, seed: int = 0,
              train_glob: str = 'part-*', eval_glob: str = 'eval_10k*',
              prefetch: int = 2) -> tuple[BertRecords, BertRecords]:
  """(train, eval) from `data_dir`/`train_glob` and `data_dir`/`eval_glob`.

  packed: the training files are packed rows of up to
  `max_sequences_per_row` sequences; the eval files may be either kind and
  are batched to the same shapes. Unpacked: one sequence per row.
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: no such directory (expected the BERT '
                    f'TFRecords: {train_glob} and {eval_glob})')
  k = int(max_sequences_per_row) if packed else 1
  found = {}
  for name, pattern in (('train', train_glob), ('eval', eval_glob)):
    files = sorted(glob_lib.glob(os.path.join(data_dir, pattern)))
    if not files:
      raise DataError(f'{data_dir}: no {name} files match {pattern!r}')
    found[name] = files
  common = dict(seq_len=seq_len, max_predictions=max_predictions,
                max_sequences=k, vocab_size=vocab_size, seed=seed,
                prefetch=prefetch)
  train = BertRecords(found['train'], packed=bool(packed), **common)
  evaluation = BertRecords(found['eval'], packed=None, **common)
  return train, evaluation


# ---------------------------------------------------------------- synthetic

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FIRST_CONTENT = MASK_ID + 1


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer: a bijective scramble of uint64s."""
  x = x + _GOLDEN
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _uniform(*keys) -> np.ndarray:
  """Uniform [0, 1) floats, a pure function of the broadcast integer keys."""
  with np.errstate(over='ignore'):
    h = np.uint64(0x5EED)
    for k in keys:
      h = _mix(h ^ np.asarray(k).astype(np.uint64))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SyntheticBert(BertSource):
  """Learnable synthetic pretraining rows in the batch format.

  Content tokens are ids [104, vocab_size); a fixed random cyclic
  permutation `next` of them (drawn from `seed`) is the grammar. A sequence
  is [CLS] A [SEP] B [SEP]; the tokens of A then B follow the chain
  x' = next(x), except that each content token restarts the chain at a
  uniformly random token with probability `noise` (always at A's first
  token). NSP: with probability 1/2 B continues A's chain (label 0), else B
  restarts at a random token (label 1, "random next"). So a masked token is
  predictable from an unmasked neighbour unless a restart falls next to it:
  a bigram count model reaches about 0.87 masked-LM accuracy at noise 0.1
  (a unigram one 1 / #content tokens), a model that also uses the right
  neighbour a little more; never 1.0.

  Lengths: unpacked rows hold one sequence, the full `seq_len` with
  probability `full_fraction`, else uniform in [min_length, seq_len].
  Packed rows (packed=True) hold 1..max_sequences sequences (uniform), at
  least `min_length` tokens each, filling the row up to 0-5% padding.
  Masking as create_pretraining_data: min(P, max(1, round(0.15 * length)))
  content tokens of each sequence (rows have room for row_predictions(P, K);
  with P about 0.15 * seq_len, as in the reference, that is always enough,
  else the last sequences of a row get fewer), 80% replaced by [MASK], 10%
  by a random content token, 10% kept.

  Everything is a pure function of (seed, split, row index): no state, any
  batch of any rows in O(batch) numpy work. Train and eval share the grammar
  and differ by `split`.
  """

  def __init__(self, num_examples: int, *, seq_len: int = 128,
               max_predictions: int = 20, vocab_size: int = 512,
               max_sequences: int = 1, packed: bool = False,
               seed: int = 0, split: str = 'train', noise: float = 0.1,
               full_fraction: float = 0.5, min_length: int = 8,
               prefetch: int = 2):
    if num_examples < 1:
      raise ConfigError(f'num_examples must be >= 1, got {num_examples}')
    if vocab_size < _FIRST_CONTENT + 8:
      raise ConfigError(f'vocab_size {vocab_size}: the synthetic grammar '
                        f'needs ids above [MASK] ({MASK_ID}); use >= '
                        f'{_FIRST_CONTENT + 8}')
    if min_length < 5:
      raise ConfigError(f'min_length {min_length}: a sequence needs >= 5 '
                        f'tokens ([CLS] a [SEP] b [SEP])')
    k = int(max_sequences)
    if k < 1 or (packed and seq_len < k * min_length) or seq_len < min_length:
      raise ConfigError(f'seq_len {seq_len} cannot hold {k} sequence(s) of '
                        f'min_length {min_length}')
    if max_predictions < 1:
      raise ConfigError(f'max_predictions must be >= 1, got '
                        f'{max_predictions}')
    if not 0 <= noise <= 1 or not 0 <= full_fraction <= 1:
      raise ConfigError('noise and full_fraction must be in [0, 1]')
    super().__init__(num_examples, seed=seed, prefetch=prefetch)
    self.seq_len = int(seq_len)
    self.vocab_size = int(vocab_size)
    self.max_sequences = k
    self.per_sequence_predictions = int(max_predictions)
    self.max_predictions = row_predictions(max_predictions, k)
    self.packed = bool(packed)
    self.split = split
    self.noise = float(noise)
    self.full_fraction = float(full_fraction)
    self.min_length = int(min_length)
    self.num_content = self.vocab_size - _FIRST_CONTENT
    # The chain: content index q -> token perm[q]; next(perm[q]) =
    # perm[(q + 1) % n], so a run of c steps from q is perm[(q + c) % n].
    self._perm = np.random.default_rng([self.seed, 0x6AA]).permutation(
        self.num_content).astype(np.int64) + _FIRST_CONTENT
    self._salt = {'train': 1, 'eval': 2}.get(split, 3 + sum(split.encode()))

  def successor(self, token: np.ndarray) -> np.ndarray:
    """The grammar's next token after content token(s) `token`."""
    inverse = np.empty(self.num_content, np.int64)
    inverse[self._perm - _FIRST_CONTENT] = np.arange(self.num_content)
    q = inverse[np.asarray(token) - _FIRST_CONTENT]
    return self._perm[(q + 1) % self.num_content]

  def _u(self, stream: int, index: np.ndarray, *more) -> np.ndarray:
    return _uniform(self.seed, self._salt, stream, index, *more)

  def _layout(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(length [B, K], A length [B, K]) of each row's sequences (0: none)."""
    b, k, s, m = len(index), self.max_sequences, self.seq_len, self.min_length
    length = np.zeros((b, k), np.int64)
    if not self.packed:
      full = self._u(1, index) < self.full_fraction
      short = m + np.floor(self._u(2, index) * (s - m + 1)).astype(np.int64)
      length[:, 0] = np.where(full, s, short)
    else:
      n = 1 + np.floor(self._u(3, index) * k).astype(np.int64)
      fill = s - np.floor(self._u(4, index) * 0.05 * s).astype(np.int64)
      fill = np.maximum(fill, n * m)
      free = fill - n * m
      cuts = self._u(5, index[:, None], np.arange(k - 1)[None])
      cuts = np.where(np.arange(k - 1)[None] < (n - 1)[:, None], cuts, 1.0)
      bounds = np.concatenate(
          [np.zeros((b, 1), np.int64),
           np.floor(np.sort(cuts, axis=1) * free[:, None]).astype(np.int64),
           free[:, None]], axis=1)
      used = np.arange(k)[None] < n[:, None]
      length = np.where(used, np.diff(bounds, axis=1) + m, 0)
    content = np.maximum(length - 3, 2)
    a_len = 1 + np.floor(self._u(6, index[:, None], np.arange(k)[None])
                         * (content - 1)).astype(np.int64)
    return length, np.where(length > 0, a_len, 0)

  def rows(self, index: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Rows `index` (any order, repeats allowed) as a batch."""
    index = np.asarray(index, np.int64)
    b, k, s = len(index), self.max_sequences, self.seq_len
    length, a_len = self._layout(index)
    ends = np.cumsum(length, axis=1)
    starts = ends - length
    count = (length > 0).sum(axis=1)
    t = np.arange(s)[None]
    member = (t[:, :, None] >= ends[:, None, :]).sum(axis=2)
    real = member < count[:, None]
    slot = np.minimum(member, np.maximum(count - 1, 0)[:, None])
    rows_ = np.arange(b)[:, None]
    p = t - starts[rows_, slot]                   # position in its sequence
    la, lj = a_len[rows_, slot], length[rows_, slot]
    is_a = real & (p >= 1) & (p <= la)
    is_b = real & (p >= la + 2) & (p <= lj - 2)
    content = is_a | is_b
    is_sep = real & ((p == la + 1) | (p == lj - 1))
    is_cls = real & (p == 0)
    # NSP: B follows A (0) or restarts at random (1).
    nsp = (self._u(7, index[:, None], np.arange(k)[None]) < 0.5).astype(
        np.int64)
    key = (index[:, None], t)
    restart = content & ((is_a & (p == 1))
                         | (is_b & (p == la + 2) & (nsp[rows_, slot] == 1))
                         | (self._u(8, *key) < self.noise))
    chain = np.where(is_a, p - 1, p - 2)
    n = self.num_content
    start_q = np.floor(self._u(9, *key) * n).astype(np.int64)
    last = np.maximum.accumulate(np.where(restart, t, -1), axis=1)
    last = np.maximum(last, 0)
    q = (np.take_along_axis(start_q, last, axis=1)
         + chain - np.take_along_axis(chain, last, axis=1)) % n
    tokens = np.where(content, self._perm[q],
                      np.where(is_cls, CLS_ID, np.where(is_sep, SEP_ID, 0)))
    segment = (real & (p >= la + 2)).astype(np.int64)
    # Masking: per sequence, the content tokens with the smallest keys.
    per_seq = np.where(length > 0, num_to_predict(
        length, self.per_sequence_predictions), 0)
    per_seq = np.minimum(per_seq, np.maximum(length - 3, 0))
    room = self.max_predictions - (np.cumsum(per_seq, axis=1) - per_seq)
    per_seq = np.clip(per_seq, 0, np.maximum(room, 0))
    sort_key = np.where(content, member + self._u(10, *key), np.inf)
    order = np.argsort(sort_key, axis=1, kind='stable')
    sorted_member = np.take_along_axis(np.where(content, member, k), order,
                                       axis=1)
    # Rank of each sorted entry inside its sequence's group.
    first_of_group = np.concatenate(
        [np.ones((b, 1), bool), sorted_member[:, 1:] != sorted_member[:, :-1]],
        axis=1)
    group_first = np.maximum.accumulate(np.where(first_of_group, t, 0),
                                        axis=1)
    rank = t - group_first
    cap = np.take_along_axis(
        np.concatenate([per_seq, np.zeros((b, 1), np.int64)], axis=1),
        sorted_member, axis=1)
    chosen_sorted = rank < cap
    chosen = np.zeros((b, s), bool)
    np.put_along_axis(chosen, order, chosen_sorted, axis=1)
    n_pred = chosen.sum(axis=1)
    pred_pos = np.argsort(~chosen, axis=1,
                          kind='stable')[:, :self.max_predictions]
    pad = self.max_predictions - pred_pos.shape[1]
    if pad > 0:
      pred_pos = np.pad(pred_pos, ((0, 0), (0, pad)))
    weights = np.arange(self.max_predictions)[None] < n_pred[:, None]
    pred_pos = np.where(weights, pred_pos, 0)
    pred_ids = np.where(weights, np.take_along_axis(tokens, pred_pos, axis=1),
                        0)
    kind = self._u(11, *key)
    random_token = _FIRST_CONTENT + np.floor(self._u(12, *key) * n).astype(
        np.int64)
    replaced = np.where(kind < 0.8, MASK_ID,
                        np.where(kind < 0.9, tokens, random_token))
    input_ids = np.where(chosen, replaced, tokens)
    used = length > 0
    out = {
        'input_ids': input_ids,
        'segment_ids': segment,
        'sequence_ids': np.where(real, member + 1, 0),
        'position_ids': p,
        'masked_lm_positions': pred_pos,
        'masked_lm_ids': pred_ids,
        'masked_lm_weights': weights,
        'next_sentence_positions': np.where(used, starts, 0),
        'next_sentence_labels': np.where(used, nsp, 0),
        'next_sentence_weights': used,
    }
    return {key: out[key].astype(np.float32 if key in _FLOAT_KEYS
                                 else np.int32) for key in BATCH_KEYS}

  def examples(self, index: np.ndarray | Sequence[int]
               ) -> list[dict[str, np.ndarray]]:
    """Unpacked rows `index` as on-disk records (for writing test files)."""
    if self.packed:
      raise ValueError('packed synthetic rows have no unpacked form')
    return batch_to_examples(self.rows(index),
                             max_predictions=self.per_sequence_predictions)


def synthetic_bert(num_train: int, num_eval: int, *, vocab_size: int = 512,
                   seq_len: int = 128, max_predictions: int = 20,
                   max_sequences_per_row: int = 3, packed: bool = False,
                   seed: int = 0, **kwargs
                   ) -> tuple[SyntheticBert, SyntheticBert]:
  """(train, eval) synthetic sources sharing a grammar.

  packed: training rows hold up to `max_sequences_per_row` sequences; eval
  rows hold one each (as the reference's eval set), batched to the same
  shapes. kwargs go to both (noise, full_fraction, min_length, prefetch).
  """
  k = int(max_sequences_per_row) if packed else 1
  common = dict(seq_len=seq_len, max_predictions=max_predictions,
                vocab_size=vocab_size, max_sequences=k, seed=seed, **kwargs)
  return (SyntheticBert(num_train, packed=bool(packed), split='train',
                        **common),
          SyntheticBert(num_eval, packed=False, split='eval', **common))
