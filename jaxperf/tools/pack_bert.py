"""Packs BERT pretraining records into rows of several sequences.

    python -m jaxperf.tools.pack_bert --input 'data/part-*' --output-dir packed
        [--seq-len 512] [--max-predictions 76] [--max-sequences-per-row 3]
        [--algorithm nnlshp|spfhp] [--num-output-files N] [--seed 0]
        [--workers N]
    python -m jaxperf.tools.pack_bert --histogram wikipedia-like|FILE ...

reads the MLPerf reference's unpacked TFRecords (jaxperf.data.bert), packs
the variable-length samples into rows of `seq_len` tokens, at most K
(`--max-sequences-per-row`) per row, and writes packed TFRecords
(part-00000-of-000NN, ...) whose records are rows in the batch format of
jaxperf.data.bert: per-sequence position ids and sequence ids, masked-LM
positions shifted to the row, one NSP position / label / weight per
sequence, P + K - 1 prediction slots. Every input sample lands in exactly one
row (checked); the rows are shuffled (seeded). Statistics go to stdout and
to packing_stats.json in the output directory: samples in, rows out, packing
efficiency (real tokens / (rows * seq_len)), padding before and after, and
the speed-up (samples / rows: rows of the same size cost the same).
With --histogram the tool only packs a length histogram and prints the same
statistics; FILE holds the counts of lengths 1..S (.npy or whitespace /
comma separated text).

Algorithms (Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination", arXiv:2107.02027), both on the histogram of lengths, so
the cost depends on seq_len and K, not on the number of samples; samples are
then dealt to the resulting strategies (a strategy: a multiset of lengths and
how many rows use it) by length, in a seeded random order:

* spfhp, shortest-pack-first histogram packing: go through the lengths from
  longest to shortest; put all samples of a length, as far as they go, into
  the open rows with the least space left that still fits them (best fit;
  rows with the same lengths move as one group, split when only part of the
  group is needed), and open new rows for the rest. A row is closed when it
  has K sequences or no space.
* nnlshp, non-negative least-squares histogram packing: enumerate the
  strategies of up to K lengths present in the data that fill a row exactly
  (or up to `slack` tokens short, 0 by default), solve min ||A x - h||, x >= 0, for the
  number of rows x per strategy (A: sequences of each length per strategy,
  h: the histogram), round x down, lower it where it would use more samples
  of a length than there are, and pack what is left with spfhp.

Realistic lengths: the published Wikipedia histogram at 512 (Graphcore's
packedBERT histograms.py; 16,279,552 samples, 23.4% of them 512 tokens long,
mean 255.8, so 50.0% padding and a 2.00x ideal speed-up; the short samples
come from documents that end early, not only from short_seq_prob) is matched
by `wikipedia_like_histogram`: 23.43% of the samples at exactly 512, the rest
over lengths 5..511 in proportion to x^2.66 / (1 + x^3.68), x = length / 38.7
(a fit to the published counts, 9% rms error in log; mode at 50, tail
~1/length; other seq_len scale the 38.7 by seq_len / 512). Efficiency
(speed-up) at 512, wikipedia-like / published:

    nnlshp, K = 3     0.9999 (1.997x) / 0.9988 (1.999x)   10-14 s
    spfhp,  K = 3     0.897  (1.792x) / 0.894  (1.790x)   < 0.1 s
    spfhp,  K = 12    0.9974 (1.992x) / 0.9968 (1.995x)   < 0.1 s

The paper's code reports 0.9975 for nnlshp at K = 3 and 0.9960 for spfhp at
K = 12 on the published histogram. With only 3 sequences per row the greedy
spfhp leaves the many short samples in rows of three short ones; nnlshp
pairs them with long ones, so it is the default.

Memory: about 60 bytes per sample at the peak (the record index, lengths
and prediction counts, the rows); reading and writing go `chunk` (2048) rows
at a time. --workers N runs both passes in N forked processes.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxperf.data import bert, tfrecord
from jaxperf.errors import ConfigError, DataError, UserError

Strategy = tuple[tuple[int, ...], int]   # (lengths, number of rows)

# The fit to the published Wikipedia histogram at 512 (see the docstring).
WIKI_FULL_FRACTION = 0.2343
WIKI_SCALE, WIKI_RISE, WIKI_FALL = 38.7, 2.66, 1.03
WIKI_MIN_LENGTH = 5
WIKI_SAMPLES = 16_279_552
# nnlshp's dense matrix: lengths x strategies, 8 bytes each.
MAX_MATRIX = 64 * 2**20


def wikipedia_like_histogram(seq_len: int = 512,
                             num_samples: int = WIKI_SAMPLES) -> np.ndarray:
  """Counts of lengths 0..seq_len resembling MLPerf's Wikipedia samples."""
  if seq_len <= WIKI_MIN_LENGTH:
    raise ValueError(f'seq_len must be > {WIKI_MIN_LENGTH}')
  hist = np.zeros(seq_len + 1, np.int64)
  full = int(round(num_samples * WIKI_FULL_FRACTION))
  hist[seq_len] = full
  lengths = np.arange(WIKI_MIN_LENGTH, seq_len)
  x = lengths / (WIKI_SCALE * seq_len / 512)
  shape = x**WIKI_RISE / (1 + x**(WIKI_RISE + WIKI_FALL))
  share = shape / shape.sum() * (num_samples - full)
  counts = np.floor(share).astype(np.int64)
  # Largest remainders take the rounding, so the total is exact.
  rest = num_samples - full - counts.sum()
  counts[np.argsort(counts - share)[:rest]] += 1
  hist[WIKI_MIN_LENGTH:seq_len] = counts
  return hist


def _check_histogram(histogram, seq_len: int) -> np.ndarray:
  hist = np.asarray(histogram, np.int64)
  if hist.shape != (seq_len + 1,):
    raise ValueError(f'histogram must hold the counts of lengths 0..{seq_len}'
                     f', got shape {hist.shape}')
  if (hist < 0).any() or hist[0]:
    raise ValueError('histogram counts must be >= 0, none of length 0')
  return hist


def _merge(strategies) -> list[Strategy]:
  total: collections.Counter = collections.Counter()
  for lengths, count in strategies:
    if count:
      total[tuple(sorted(lengths, reverse=True))] += int(count)
  return sorted(total.items(), key=lambda s: (-sum(s[0]), s[0]))


def spfhp(histogram: np.ndarray, seq_len: int, max_per_row: int
          ) -> list[Strategy]:
  """Shortest-pack-first histogram packing (see the module docstring)."""
  hist = _check_histogram(histogram, seq_len)
  if max_per_row < 1:
    raise ValueError(f'max_per_row must be >= 1, got {max_per_row}')
  open_rows: list[list[Strategy]] = [[] for _ in range(seq_len + 1)]
  done: list[Strategy] = []

  def place(lengths, count):
    space = seq_len - sum(lengths)
    if len(lengths) >= max_per_row or space == 0:
      done.append((lengths, count))
    else:
      open_rows[space].append((lengths, count))

  for length in range(seq_len, 0, -1):
    left = int(hist[length])
    while left:
      space = next((r for r in range(length, seq_len + 1) if open_rows[r]),
                   None)
      if space is None:
        place((length,), left)
        break
      lengths, count = open_rows[space].pop()
      take = min(count, left)
      if count > take:
        open_rows[space].append((lengths, count - take))
      place(lengths + (length,), take)
      left -= take
  for bucket in open_rows:
    done.extend(bucket)
  return _merge(done)


def _exact_strategies(present: Sequence[int], seq_len: int, max_per_row: int,
                      slack: int, limit: int) -> list[tuple[int, ...]]:
  """Multisets of up to K present lengths summing to [S - slack, S]."""
  present = sorted(present)
  out = []

  def extend(prefix, total, lowest, depth):
    lo, hi = max(lowest, seq_len - slack - total), seq_len - total
    i, j = bisect.bisect_left(present, lo), bisect.bisect_right(present, hi)
    out.extend(prefix + (x,) for x in present[i:j])
    if len(out) > limit:
      raise ConfigError(
          f'nnlshp: more than {limit} strategies of up to {max_per_row} '
          f'sequences for seq_len {seq_len}; use fewer sequences per row or '
          f'--algorithm spfhp')
    if depth > 1:
      for x in present[bisect.bisect_left(present, lowest):]:
        if total + 2 * x > seq_len:
          break
        extend(prefix + (x,), total + x, x, depth - 1)

  extend((), 0, present[0] if present else 1, max_per_row)
  return out


def nnlshp(histogram: np.ndarray, seq_len: int, max_per_row: int, *,
           slack: int = 0, max_matrix: int = MAX_MATRIX) -> list[Strategy]:
  """Non-negative least-squares histogram packing (module docstring).

  The least-squares problem is solved by an active-set method (Lawson and
  Hanson, scipy.optimize.nnls), whose solution uses at most one strategy per
  length, so rounding down leaves few samples. ConfigError if the matrix
  would exceed `max_matrix` entries (K = 3 at 512 needs 11M).
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  hist = _check_histogram(histogram, seq_len)
  present = np.flatnonzero(hist).tolist()
  strategies = _exact_strategies(present, seq_len, max_per_row, slack,
                                 max_matrix // max(1, len(present)))
  chosen: list[Strategy] = []
  residual = hist.copy()
  if strategies:
    row_of = {length: i for i, length in enumerate(present)}
    a = np.zeros((len(present), len(strategies)))
    for j, lengths in enumerate(strategies):
      for x in lengths:
        a[row_of[x], j] += 1
    b = hist[present].astype(np.float64)
    x, _ = optimize.nnls(a, b)
    x = np.floor(x + 1e-6).astype(np.int64)
    a = a.astype(np.int64)
    used = a @ x
    # Least squares may use more samples of a length than there are: take
    # rows away from the strategies that use it most until it fits.
    for i in np.flatnonzero(used > b).tolist():
      while used[i] > b[i]:
        candidates = np.flatnonzero((a[i] > 0) & (x > 0))
        s = candidates[np.argmax(x[candidates])]
        drop = min(int(x[s]), -(-int(used[i] - b[i]) // int(a[i, s])))
        x[s] -= drop
        used -= a[:, s] * drop
    chosen = [(strategies[s], int(x[s])) for s in np.flatnonzero(x)]
    residual[present] -= used
  return _merge(chosen + spfhp(residual, seq_len, max_per_row))


ALGORITHMS = {'spfhp': spfhp, 'nnlshp': nnlshp}


def strategy_stats(histogram: np.ndarray, strategies: Sequence[Strategy],
                   seq_len: int) -> dict[str, Any]:
  """Efficiency, padding and speed-up of packing `histogram` as given."""
  hist = np.asarray(histogram, np.int64)
  samples = int(hist.sum())
  tokens = int((hist * np.arange(len(hist))).sum())
  rows = sum(c for _, c in strategies)
  return _stats(samples, tokens, rows, seq_len)


def _stats(samples: int, tokens: int, rows: int, seq_len: int
           ) -> dict[str, Any]:
  efficiency = tokens / (rows * seq_len) if rows else 1.0
  before = tokens / (samples * seq_len) if samples else 1.0
  return {
      'samples': samples, 'rows': rows, 'tokens': tokens, 'seq_len': seq_len,
      'efficiency': efficiency,
      'padding_before': 1 - before, 'padding_after': 1 - efficiency,
      'speedup': samples / rows if rows else 1.0,
      'ideal_speedup': 1 / before if before else 1.0,
  }


def assign(lengths: np.ndarray, strategies: Sequence[Strategy],
           max_per_row: int, *, seed: int = 0) -> np.ndarray:
  """Deals samples to strategies: int [rows, K] sample indices, -1 empty.

  Samples of each length are taken in a seeded random order.
  """
  lengths = np.asarray(lengths, np.int64)
  order = np.random.default_rng([seed, 0xA551]).permutation(len(lengths))
  by_length = order[np.argsort(lengths[order], kind='stable')]
  size = max(int(lengths.max(initial=0)), max(
      (max(s) for s, _ in strategies), default=0)) + 1
  counts = np.bincount(lengths, minlength=size)
  need = np.zeros(size, np.int64)
  for lens, count in strategies:
    if len(lens) > max_per_row:
      raise ValueError(f'strategy {lens} has more than {max_per_row} '
                       f'sequences')
    for x in lens:
      need[x] += count
  if not np.array_equal(need, counts):
    bad = int(np.argmax(need != counts))
    raise ValueError(f'the strategies hold {need[bad]} sequences of length '
                     f'{bad}, the data {counts[bad]}')
  cursor = np.concatenate([[0], np.cumsum(counts)[:-1]])
  blocks = []
  for lens, count in strategies:
    block = np.full((count, max_per_row), -1, np.int64)
    for j, x in enumerate(lens):
      block[:, j] = by_length[cursor[x]:cursor[x] + count]
      cursor[x] += count
    blocks.append(block)
  if not blocks:
    return np.zeros((0, max_per_row), np.int64)
  return np.concatenate(blocks)


def split_overflow(groups: np.ndarray, predictions: np.ndarray,
                   capacity: int) -> tuple[np.ndarray, int]:
  """Moves sequences out of rows with more than `capacity` predictions.

  Returns (groups, number of sequences moved to rows of their own).
  """
  valid = groups >= 0
  total = np.where(valid, predictions[np.where(valid, groups, 0)], 0).sum(1)
  bad = np.flatnonzero(total > capacity)
  if not len(bad):
    return groups, 0
  groups = groups.copy()
  moved = []
  for r in bad.tolist():
    kept = 0
    for j in range(groups.shape[1]):
      i = groups[r, j]
      if i < 0:
        continue
      if kept + predictions[i] > capacity:
        moved.append(i)
        groups[r, j] = -1
      else:
        kept += predictions[i]
  extra = np.full((len(moved), groups.shape[1]), -1, np.int64)
  extra[:, 0] = moved
  return np.concatenate([groups, extra]), len(moved)


def pack_groups(lengths: np.ndarray, seq_len: int, max_per_row: int = 3, *,
                algorithm: str = 'nnlshp', seed: int = 0,
                predictions: np.ndarray | None = None,
                max_predictions: int | None = None
                ) -> tuple[np.ndarray, list[Strategy], int]:
  """(groups [rows, K] sample indices or -1, strategies, sequences moved).

  With `predictions` (per sample) and `max_predictions` (per row), rows that
  would hold more predictions are split. Rows come in a seeded random order.
  """
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and (lengths.min() < 1 or lengths.max() > seq_len):
    raise ValueError(f'sample lengths must be in [1, {seq_len}]')
  if algorithm not in ALGORITHMS:
    raise ValueError(f'algorithm {algorithm!r}: expected one of '
                     f'{sorted(ALGORITHMS)}')
  hist = np.bincount(lengths, minlength=seq_len + 1)
  strategies = ALGORITHMS[algorithm](hist, seq_len, max_per_row)
  groups = assign(lengths, strategies, max_per_row, seed=seed)
  moved = 0
  if predictions is not None and max_predictions is not None:
    groups, moved = split_overflow(groups, np.asarray(predictions),
                                   int(max_predictions))
  perm = np.random.default_rng([seed, 0x5B0F]).permutation(len(groups))
  return groups[perm], strategies, moved


def pack_examples(examples, seq_len: int | None = None, max_per_row: int = 3,
                  *, algorithm: str = 'nnlshp',
                  max_predictions: int | None = None, seed: int = 0,
                  return_groups: bool = False):
  """Packs unpacked samples in memory; returns a list of packed rows.

  examples: on-disk records (dicts with input_mask, ...), one-sequence rows
  in the batch format, or either stacked into one dict of arrays. Rows have
  `max_per_row` NSP slots and `max_predictions` prediction slots (default
  row_predictions(P, K) from the samples' P). With return_groups, returns
  (rows, groups): groups[r, j] is the index of the sample in slot j of row r
  (-1: empty).
  """
  if isinstance(examples, Mapping):
    batch = (bert.examples_to_batch(examples) if 'input_mask' in examples
             else dict(examples))
  else:
    examples = list(examples)
    if not examples:
      raise ValueError('no examples to pack')
    batch = (bert.examples_to_batch(examples) if 'input_mask' in examples[0]
             else bert.to_batch(examples))
  s = batch['input_ids'].shape[1]
  if seq_len is not None and seq_len != s:
    raise ValueError(f'the samples have {s} tokens, not seq_len {seq_len}')
  p_in = batch['masked_lm_positions'].shape[1]
  cap = (bert.row_predictions(p_in, max_per_row) if max_predictions is None
         else int(max_predictions))
  groups, _, _ = pack_groups(
      bert.sequence_lengths(batch), s, max_per_row, algorithm=algorithm,
      seed=seed, predictions=(batch['masked_lm_weights'] > 0).sum(1),
      max_predictions=cap)
  rows = bert.split_rows(bert.pack_batch(batch, groups, max_predictions=cap))
  return (rows, groups) if return_groups else rows


# ---------------------------------------------------------------- files

_READER: bert.BertRecords | None = None   # shared with forked workers


def _lengths_chunk(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  batch = _READER.rows(index)
  return (bert.sequence_lengths(batch).astype(np.int32),
          (batch['masked_lm_weights'] > 0).sum(1).astype(np.int32))


def _write_file(path: str, groups: np.ndarray, capacity: int,
                chunk: int) -> int:
  def records():
    for start in range(0, len(groups), chunk):
      g = groups[start:start + chunk]
      members = np.unique(g[g >= 0])
      batch = _READER.rows(members)      # in file order: sequential reads
      local = np.where(g >= 0, np.searchsorted(members, g), -1)
      packed = bert.pack_batch(batch, local, max_predictions=capacity)
      for row in bert.split_rows(packed):
        yield bert.encode_example({
            k: row[k].astype(np.float32 if row[k].dtype == np.float32
                             else np.int64) for k in bert.BATCH_KEYS})
  tmp = path + '.tmp'
  tfrecord.write_records(tmp, records())
  os.replace(tmp, path)
  return len(groups)


def _map(fn, jobs, workers: int):
  if workers <= 1:
    return [fn(*job) for job in jobs]
  ctx = multiprocessing.get_context('fork')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
    return list(pool.map(fn, *zip(*jobs)))


def pack_files(inputs: str | Sequence[str], output_dir: str | os.PathLike, *,
               seq_len: int = bert.SEQ_LEN,
               max_predictions: int = bert.MAX_PREDICTIONS,
               max_per_row: int = 3, max_predictions_per_row: int | None = None,
               algorithm: str = 'nnlshp', num_output_files: int | None = None,
               vocab_size: int = bert.VOCAB_SIZE, seed: int = 0,
               workers: int = 1, chunk: int = 2048) -> dict[str, Any]:
  """Packs unpacked TFRecords into `output_dir`; returns the statistics."""
  global _READER
  start_time = time.time()
  if max_per_row < 1:
    raise ConfigError(f'--max-sequences-per-row must be >= 1, got '
                      f'{max_per_row}')
  reader = bert.BertRecords(inputs, seq_len=seq_len,
                            max_predictions=max_predictions,
                            vocab_size=vocab_size, packed=False, prefetch=0)
  capacity = (bert.row_predictions(max_predictions, max_per_row)
              if max_predictions_per_row is None
              else int(max_predictions_per_row))
  if capacity < max_predictions:
    raise ConfigError(f'--max-predictions-per-row {capacity} is less than '
                      f'--max-predictions {max_predictions}')
  n = reader.num_examples
  _READER = reader
  try:
    bounds = list(range(0, n, chunk))
    parts = _map(_lengths_chunk,
                 [(np.arange(b, min(b + chunk, n)),) for b in bounds],
                 workers)
    lengths = np.concatenate([p[0] for p in parts])
    predictions = np.concatenate([p[1] for p in parts])
    groups, strategies, moved = pack_groups(
        lengths, seq_len, max_per_row, algorithm=algorithm, seed=seed,
        predictions=predictions, max_predictions=capacity)
    pack_s = time.time() - start_time
    used = np.sort(groups[groups >= 0])
    if not np.array_equal(used, np.arange(n)):
      raise RuntimeError('packing lost or repeated samples')
    n_out = num_output_files or len(reader.files)
    n_out = max(1, min(n_out, len(groups)))
    os.makedirs(output_dir, exist_ok=True)
    names = [os.path.join(os.fspath(output_dir),
                          f'part-{i:05d}-of-{n_out:05d}')
             for i in range(n_out)]
    _map(_write_file, [(name, g, capacity, chunk) for name, g in
                       zip(names, np.array_split(groups, n_out))], workers)
  finally:
    _READER = None
  stats = _stats(n, int(lengths.sum()), len(groups), seq_len)
  stats.update(
      algorithm=algorithm, max_sequences_per_row=max_per_row,
      max_predictions_per_row=capacity, strategies=len(strategies),
      moved_for_predictions=moved, input_files=len(reader.files),
      output_files=names, pack_seconds=pack_s,
      seconds=time.time() - start_time)
  with open(os.path.join(os.fspath(output_dir), 'packing_stats.json'),
            'w') as f:
    json.dump(stats, f, indent=1)
  return stats


def load_histogram(spec: str, seq_len: int) -> np.ndarray:
  """Counts of lengths 0..S from 'wikipedia-like' or a file of 1..S counts."""
  if spec == 'wikipedia-like':
    return wikipedia_like_histogram(seq_len)
  try:
    if spec.endswith('.npy'):
      counts = np.load(spec)
    else:
      with open(spec) as f:
        counts = np.asarray(f.read().replace(',', ' ').split(), np.float64)
  except (OSError, ValueError) as e:
    raise DataError(f'{spec}: cannot read a histogram ({e})') from None
  counts = np.asarray(counts).ravel()
  if len(counts) != seq_len or (counts < 0).any() or (
      counts != np.round(counts)).any():
    raise DataError(f'{spec}: expected {seq_len} non-negative integer counts '
                    f'(lengths 1..{seq_len}), got {len(counts)} values')
  return np.concatenate([[0], counts]).astype(np.int64)


def _print(stats: Mapping[str, Any]) -> None:
  for key in ('algorithm', 'samples', 'rows', 'tokens', 'seq_len',
              'max_sequences_per_row', 'max_predictions_per_row',
              'strategies', 'moved_for_predictions'):
    if key in stats:
      print(f'{key}: {stats[key]}')
  print(f'efficiency: {stats["efficiency"]:.4f}')
  print(f'padding: {stats["padding_before"]:.2%} unpacked -> '
        f'{stats["padding_after"]:.2%} packed')
  print(f'speed-up: {stats["speedup"]:.3f}x (ideal '
        f'{stats["ideal_speedup"]:.3f}x)')
  if 'seconds' in stats:
    print(f'seconds: {stats["seconds"]:.1f}')


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """The command line; returns the statistics."""
  p = argparse.ArgumentParser(
      prog='python -m jaxperf.tools.pack_bert',
      description='Pack BERT pretraining TFRecords into rows of several '
                  'sequences.')
  p.add_argument('--input', nargs='+', help='unpacked TFRecord files or glob '
                 'patterns (quote them)')
  p.add_argument('--output-dir', help='where the packed files go')
  p.add_argument('--histogram', help="only pack a length histogram: "
                 "'wikipedia-like' or a file of the counts of lengths 1..S")
  p.add_argument('--seq-len', type=int, default=bert.SEQ_LEN)
  p.add_argument('--max-predictions', type=int, default=bert.MAX_PREDICTIONS,
                 help='per sequence, as in the input files')
  p.add_argument('--max-sequences-per-row', type=int, default=3)
  p.add_argument('--max-predictions-per-row', type=int, default=None,
                 help='default: max predictions + K - 1')
  p.add_argument('--algorithm', choices=sorted(ALGORITHMS), default='nnlshp')
  p.add_argument('--num-output-files', type=int, default=None,
                 help='default: as many as input files')
  p.add_argument('--vocab-size', type=int, default=bert.VOCAB_SIZE)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--workers', type=int, default=1)
  args = p.parse_args(argv)
  try:
    if args.histogram:
      hist = load_histogram(args.histogram, args.seq_len)
      t = time.time()
      strategies = ALGORITHMS[args.algorithm](hist, args.seq_len,
                                              args.max_sequences_per_row)
      stats = strategy_stats(hist, strategies, args.seq_len)
      stats.update(algorithm=args.algorithm, strategies=len(strategies),
                   max_sequences_per_row=args.max_sequences_per_row,
                   seconds=time.time() - t)
    else:
      if not args.input or not args.output_dir:
        p.error('--input and --output-dir are required (or --histogram)')
      stats = pack_files(
          args.input, args.output_dir, seq_len=args.seq_len,
          max_predictions=args.max_predictions,
          max_per_row=args.max_sequences_per_row,
          max_predictions_per_row=args.max_predictions_per_row,
          algorithm=args.algorithm, num_output_files=args.num_output_files,
          vocab_size=args.vocab_size, seed=args.seed, workers=args.workers)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(2) from None
  _print(stats)
  return stats


if __name__ == '__main__':
  main()
