"""Criteo 1TB click logs for DLRM (MLPerf Training v2.1), and a synthetic set.

On disk: the MLPerf reference's binary files (facebookresearch/dlrm, branch
mlperf, --mlperf-bin-loader), in one directory:

    terabyte_processed_train.bin  days 0-22
    terabyte_processed_test.bin   the first half (ceil(n / 2) rows) of day 23
    day_fea_count.npz             'counts': int [26], the rows of each
                                  categorical feature before capping

A .bin file is a flat sequence of rows of 40 little-endian int32 (160 bytes):
[label, 13 integer ("dense") features I1..I13, 26 categorical indices
C1..C26]. Preprocessing clips negative dense values to 0, so a negative one
is bad data. Table sizes are min(counts, max_ind_range) (max_ind_range =
40,000,000 in the MLPerf run; <= 0 or None: no cap) and must match the
config's `table_sizes`.

Batches, as the reference transforms rows when it loads them:

    'dense'   float32 [b, 13]  log(x + 1)
    'sparse'  int32 [b, 26]    x % max_ind_range, a row of its table
    'label'   float32 [b]      0 or 1 (the click)
    'mask'    bool [b]         eval only: False on padding rows

Files are memory-mapped; a batch is one slice of contiguous rows, checked
as it is read (vectorized): a label other than 0 / 1, a negative dense value
or a categorical index outside its table is a DataError naming the file, the
row, the feature, the value and the table size.

Training order (the reference's --mlperf-bin-shuffle, which shuffles
batch-sized blocks, not samples): the file is cut into floor(N /
global_batch) contiguous blocks of global_batch rows, and each epoch visits
the blocks in a random permutation that depends only on (seed, epoch), so
every process agrees on it and the stream can start at any step. Process p
of P takes rows [p * b, (p + 1) * b) of each block, b = global_batch / P.
The last N mod global_batch rows of the file are never trained on
(`CriteoDataset.dropped_train_rows`). Evaluation reads every row once, in
file order, the last batch padded (zeros, index 0, mask False).

`synthetic_criteo` builds the same datasets over in-memory rows with
learnable clicks drawn from a hidden `ClickModel`: Zipf-like indices, per-row
weights, dense terms and a pairwise table interaction; about 27% clicks and
a Bayes-optimal AUC of about 0.88 (`SyntheticCriteo.bayes_auc`, the ceiling
of a model's eval AUC). Helpers: `write_criteo_bin`, `write_counts`,
`read_counts`, `load_rows`, `capped_table_sizes`.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxperf.data.augment import local_batch_size
from jaxperf.data.prefetch import PrefetchedStreams
from jaxperf.errors import ConfigError, DataError

NUM_DENSE = 13
NUM_SPARSE = 26
ROW_INTS = 1 + NUM_DENSE + NUM_SPARSE   # 40
ROW_BYTES = 4 * ROW_INTS                # 160
MAX_IND_RANGE = 40_000_000
TRAIN_FILE = 'terabyte_processed_train.bin'
EVAL_FILE = 'terabyte_processed_test.bin'
COUNTS_FILE = 'day_fea_count.npz'
DENSE_NAMES = tuple(f'I{i + 1}' for i in range(NUM_DENSE))
SPARSE_NAMES = tuple(f'C{i + 1}' for i in range(NUM_SPARSE))
# Rows per chunk of `category_counts` (about 100 MB of indices).
COUNT_CHUNK_ROWS = 1 << 22
# Directories with at most this many entries are listed in errors.
_LIST_LIMIT = 20

# ---------------------------------------------------------------- files


def write_criteo_bin(path: str | os.PathLike, labels: Any, dense: Any,
                     sparse: Any) -> None:
  """Writes rows in the reference's .bin layout.

  labels [n], dense [n, 13], sparse [n, 26]: integers that fit in int32,
  written unchanged (no checks on their meaning, so tests can write bad
  files).
  """
  labels = np.asarray(labels)
  dense = np.asarray(dense)
  sparse = np.asarray(sparse)
  n = labels.shape[0] if labels.ndim == 1 else -1
  if (n < 0 or dense.shape != (n, NUM_DENSE)
      or sparse.shape != (n, NUM_SPARSE)):
    raise ValueError(f'expected labels [n], dense [n, {NUM_DENSE}] and sparse '
                     f'[n, {NUM_SPARSE}]; got {labels.shape}, {dense.shape} '
                     f'and {sparse.shape}')
  rows = np.concatenate([labels[:, None], dense, sparse], axis=1)
  if rows.size and not np.issubdtype(rows.dtype, np.integer):
    if not np.array_equal(rows, np.round(rows)):
      raise ValueError('the .bin format holds integers only')
  info = np.iinfo(np.int32)
  if rows.size and (rows.min() < info.min or rows.max() > info.max):
    raise ValueError('values must fit in int32')
  rows.astype('<i4').tofile(os.fspath(path))


def write_counts(path: str | os.PathLike, counts: Any) -> None:
  """Writes a counts file: an .npz with the array `counts` (as given)."""
  with open(os.fspath(path), 'wb') as f:
    np.savez(f, counts=np.asarray(counts))


def read_counts(path: str | os.PathLike) -> np.ndarray:
  """The 26 per-feature row counts of a counts file (int64); DataError if
  it cannot be read, lacks `counts`, or holds anything but 26 counts >= 1."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      names = list(f.files)
      counts = f['counts'] if 'counts' in names else None
  except (OSError, ValueError) as e:
    raise DataError(f'{path}: cannot be read as an .npz file ({e})') from None
  if counts is None:
    raise DataError(f'{path}: no array "counts" (it holds {names}); expected '
                    f'the {NUM_SPARSE} row counts of the categorical features')
  if counts.shape != (NUM_SPARSE,) or not (
      np.issubdtype(counts.dtype, np.integer) or
      (np.issubdtype(counts.dtype, np.floating)
       and np.array_equal(counts, np.round(counts)))):
    raise DataError(f'{path}: "counts" is {counts.dtype} {list(counts.shape)};'
                    f' expected {NUM_SPARSE} integers (one per categorical '
                    f'feature C1..C{NUM_SPARSE})')
  counts = counts.astype(np.int64)
  if (counts < 1).any():
    j = int(np.argmax(counts < 1))
    raise DataError(f'{path}: "counts" of {SPARSE_NAMES[j]} is {counts[j]}; '
                    f'expected >= 1')
  return counts


def capped_table_sizes(counts: Sequence[int], max_ind_range: int | None
                       ) -> list[int]:
  """Embedding table sizes: min(counts, max_ind_range), as the reference."""
  if max_ind_range is None or max_ind_range <= 0:
    return [int(c) for c in counts]
  return [min(int(c), int(max_ind_range)) for c in counts]


def _describe_dir(directory: str) -> str:
  try:
    names = sorted(os.listdir(directory))
  except OSError:
    return f'{directory} cannot be listed'
  if not names:
    return f'{directory} is empty'
  if len(names) > _LIST_LIMIT:
    return f'{directory} holds {len(names)} entries'
  return f'{directory} holds: {", ".join(names)}'


def load_rows(path: str | os.PathLike) -> np.ndarray:
  """A .bin file memory-mapped as int32 rows [N, 40]; DataError if it is
  missing, empty or not a whole number of rows."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file (expected rows of {ROW_INTS} '
                    f'int32); {_describe_dir(os.path.dirname(path) or ".")}')
  size = os.path.getsize(path)
  if size == 0:
    raise DataError(f'{path}: empty file (expected rows of {ROW_INTS} int32)')
  if size % ROW_BYTES:
    raise DataError(f'{path}: {size} bytes is not a multiple of the '
                    f'{ROW_BYTES}-byte row ({ROW_INTS} int32): truncated? It '
                    f'holds {size // ROW_BYTES} whole rows and '
                    f'{size % ROW_BYTES} bytes more')
  return np.memmap(path, dtype='<i4', mode='r',
                   shape=(size // ROW_BYTES, ROW_INTS))


# ---------------------------------------------------------------- datasets


class CriteoDataset(PrefetchedStreams):
  """Train and eval batch streams over rows in the reference layout.

  rows: an int32 array-like [N, 40] (a memmap of a .bin file, or memory);
  name: what error messages call it (the file's path). table_sizes: the 26
  embedding table sizes the indices are checked against.

  `num_examples` is N, every row. A training epoch is
  `steps_per_epoch(global_batch)` = floor(N / global_batch) steps; the last
  `dropped_train_rows(global_batch)` = N mod global_batch rows of the file
  are never trained on (the blocks are shuffled, not the rows).
  """

  def __init__(self, rows: Any, *, name: str, table_sizes: Sequence[int],
               max_ind_range: int | None = MAX_IND_RANGE, seed: int = 0,
               prefetch: int = 2):
    shape = np.shape(rows)
    if len(shape) != 2 or shape[1] != ROW_INTS:
      raise DataError(f'{name}: rows of shape {list(shape)}; expected '
                      f'[N, {ROW_INTS}]')
    if shape[0] == 0:
      raise DataError(f'{name}: no rows')
    table_sizes = [int(s) for s in table_sizes]
    if len(table_sizes) != NUM_SPARSE or min(table_sizes) < 1:
      raise ConfigError(f'table_sizes must be {NUM_SPARSE} sizes >= 1, got '
                        f'{table_sizes}')
    if seed < 0:
      raise ConfigError(f'the data seed must be >= 0, got {seed}')
    if prefetch < 0:
      raise ConfigError(f'prefetch must be >= 0, got {prefetch}')
    self.rows = rows
    self.name = name
    self.num_examples = int(shape[0])
    self.table_sizes = tuple(table_sizes)
    self.max_ind_range = (int(max_ind_range) if max_ind_range is not None
                          and max_ind_range > 0 else None)
    self.seed = int(seed)
    self._init_streams(prefetch)
    self._sizes = np.asarray(table_sizes, np.int64)

  # --- rows ------------------------------------------------------------------
  def _fail_at(self, bad: np.ndarray, first: int) -> tuple[int, int]:
    """(file row, column) of the first True of a [rows, columns] mask."""
    i, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
    return first + int(i), int(j)

  def _indices(self, raw: np.ndarray, first: int) -> np.ndarray:
    """Checked table indices [n, 26] int32 of raw categorical columns.

    Checked with per-column minima and maxima, and reduced modulo
    max_ind_range only in the columns that reach it (in the MLPerf data
    none do), so a batch costs a couple of passes over it.
    """
    raw = raw.astype(np.int32, copy=False)
    if not len(raw):
      return raw
    if (raw.min(axis=0) < 0).any():
      row, j = self._fail_at(raw < 0, first)
      raise DataError(
          f'{self.name}: row {row}: categorical feature {SPARSE_NAMES[j]} is '
          f'{raw[row - first, j]}; expected an index in [0, '
          f'{self.table_sizes[j]}) (its table size)')
    m = self.max_ind_range
    index = raw
    top = raw.max(axis=0)
    if m is not None and (top >= m).any():
      wrap = np.flatnonzero(top >= m)
      index = raw.copy()
      index[:, wrap] %= m
      top = index.max(axis=0)
    if (top >= self._sizes).any():
      row, j = self._fail_at(index >= self._sizes, first)
      value = raw[row - first, j]
      cap = (f' (% {m} = {index[row - first, j]})'
             if m is not None and value >= m else '')
      raise DataError(
          f'{self.name}: row {row}: categorical feature {SPARSE_NAMES[j]} is '
          f'{value}{cap}, outside its table of {self.table_sizes[j]} rows '
          f'(expected an index in [0, {self.table_sizes[j]}))')
    return index

  def convert(self, raw: np.ndarray, first: int = 0) -> dict[str, np.ndarray]:
    """Raw int rows [n, 40] (file rows first, first + 1, ...) -> a checked
    batch of 'dense', 'sparse' and 'label'."""
    label = raw[:, 0]
    bad = (label != 0) & (label != 1)
    if bad.any():
      i = int(np.argmax(bad))
      raise DataError(f'{self.name}: row {first + i}: label {label[i]}; '
                      f'expected 0 or 1')
    dense = raw[:, 1:1 + NUM_DENSE]
    if (dense < 0).any():
      row, j = self._fail_at(dense < 0, first)
      raise DataError(
          f'{self.name}: row {row}: dense feature {DENSE_NAMES[j]} is '
          f'{dense[row - first, j]}; expected >= 0 (preprocessing clips '
          f'negative values to 0)')
    return {
        'dense': np.log1p(dense.astype(np.float32)),
        'sparse': self._indices(raw[:, 1 + NUM_DENSE:], first),
        'label': label.astype(np.float32),
    }

  def read(self, first: int, count: int) -> dict[str, np.ndarray]:
    """File rows [first, first + count) as a checked batch."""
    raw = np.array(self.rows[first:first + count], dtype=np.int32)
    return self.convert(raw, first)

  # --- order -----------------------------------------------------------------
  def steps_per_epoch(self, global_batch: int) -> int:
    """Training blocks (steps) per epoch: floor(N / global_batch)."""
    return self.num_examples // int(global_batch)

  def dropped_train_rows(self, global_batch: int) -> int:
    """Rows at the end of the file no training epoch visits: N mod
    global_batch (all N when the file is smaller than one batch)."""
    return self.num_examples - self.steps_per_epoch(global_batch) * int(
        global_batch)

  def block_permutation(self, epoch: int, num_blocks: int) -> np.ndarray:
    """The order of the blocks in training epoch `epoch`."""
    return np.random.default_rng([self.seed, 0xB10C, epoch]).permutation(
        num_blocks)

  def _blocks(self, global_batch: int) -> int:
    blocks = self.steps_per_epoch(global_batch)
    if not blocks:
      raise DataError(f'{self.name}: {self.num_examples} rows, fewer than one '
                      f'global batch of {global_batch}')
    return blocks

  def train_order(self, step: int, global_batch: int, *,
                  process_index: int = 0, process_count: int = 1) -> int:
    """The first file row of this process's slice of training batch `step`."""
    local = local_batch_size(global_batch, process_count, process_index)
    blocks = self._blocks(global_batch)
    epoch, k = divmod(int(step), blocks)
    block = int(self.block_permutation(epoch, blocks)[k])
    return block * global_batch + process_index * local

  # --- streams ---------------------------------------------------------------
  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from batch `start_step` on.

    Yields this process's slice of each global batch: {'dense' float32
    [b, 13], 'sparse' int32 [b, 26], 'label' float32 [b]}.
    """
    if start_step < 0:
      raise ConfigError(f'start_step must be >= 0, got {start_step}')
    local = local_batch_size(global_batch, process_count, process_index)
    blocks = self._blocks(global_batch)

    def batches():
      step, epoch, order = int(start_step), None, None
      while True:
        e, k = divmod(step, blocks)
        if e != epoch:
          epoch, order = e, self.block_permutation(e, blocks)
        first = int(order[k]) * global_batch + process_index * local
        yield self.read(first, local)
        step += 1
    return self._stream(batches())

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in file order, the last batch padded.

    Yields this process's contiguous share of each global batch, the
    training keys plus 'mask' bool [b]; padding rows are zero (index 0) with
    mask False.
    """
    local = local_batch_size(global_batch, process_count, process_index)

    def batches():
      for start in range(0, self.num_examples, global_batch):
        first = start + process_index * local
        real = max(0, min(local, self.num_examples - first))
        if real:
          batch = self.read(first, real)
        else:
          batch = self.convert(np.zeros((0, ROW_INTS), np.int32), first)
        if real < local:
          batch = {k: np.concatenate(
              [v, np.zeros((local - real,) + v.shape[1:], v.dtype)])
                   for k, v in batch.items()}
        batch['mask'] = np.arange(local) < real
        yield batch
    return self._stream(batches())

  def category_counts(self, max_rows: int | None = None, *,
                      chunk_rows: int = COUNT_CHUNK_ROWS) -> list[np.ndarray]:
    """How often each row of each table occurs: int64 [table size] per table.

    Counts the first `max_rows` rows (all if None), `chunk_rows` at a time,
    so it runs over a memmap of billions of rows in bounded memory. Indices
    are checked as in training.
    """
    n = self.num_examples if max_rows is None else min(int(max_rows),
                                                       self.num_examples)
    if n < 0 or chunk_rows < 1:
      raise ConfigError(f'max_rows must be >= 0 and chunk_rows >= 1, got '
                        f'{max_rows} and {chunk_rows}')
    counts = [np.zeros(size, np.int64) for size in self.table_sizes]
    for start in range(0, n, int(chunk_rows)):
      stop = min(n, start + int(chunk_rows))
      raw = np.array(self.rows[start:stop, 1 + NUM_DENSE:], dtype=np.int32)
      index = self._indices(raw, start)
      for j in range(NUM_SPARSE):
        _add_counts(counts[j], index[:, j])
    return counts

  def _stream(self, batches: Iterator) -> Iterator[dict[str, np.ndarray]]:
    return self._prefetched(batches)


def _add_counts(counts: np.ndarray, index: np.ndarray) -> None:
  """counts[i] += occurrences of i in `index` (valid indices)."""
  if len(counts) <= 4 * len(index):
    # bincount is ~10x faster on intp than on int32.
    c = np.bincount(index.astype(np.intp))
    counts[:len(c)] += c
  else:
    # Tables much longer than the chunk: sort instead of allocating (and
    # faulting in) a table-sized bincount per chunk.
    index = np.sort(index)
    starts = np.flatnonzero(np.diff(index, prepend=-1))
    counts[index[starts]] += np.diff(starts, append=len(index))


def open_criteo(data_dir: str | os.PathLike, *,
                table_sizes: Sequence[int] | None = None,
                max_ind_range: int | None = MAX_IND_RANGE, seed: int = 0,
                train_file: str = TRAIN_FILE, eval_file: str = EVAL_FILE,
                counts_file: str = COUNTS_FILE, prefetch: int = 2
                ) -> tuple[CriteoDataset, CriteoDataset]:
  """(train, eval) from the reference's files in `data_dir`.

  table_sizes: the config's; must equal min(counts, max_ind_range) of the
  counts file (None: taken from it).
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: no such directory (expected the Criteo '
                    f'files {train_file}, {eval_file} and {counts_file})')
  counts_path = os.path.join(data_dir, counts_file)
  if not os.path.isfile(counts_path):
    raise DataError(f'{counts_path}: no such file (expected the .npz of '
                    f'{NUM_SPARSE} feature counts); {_describe_dir(data_dir)}')
  expected = capped_table_sizes(read_counts(counts_path), max_ind_range)
  if table_sizes is None:
    table_sizes = expected
  table_sizes = [int(s) for s in table_sizes]
  if table_sizes != expected:
    if len(table_sizes) != NUM_SPARSE:
      diff = f'the config has {len(table_sizes)} tables'
    else:
      diff = ', '.join(f'{SPARSE_NAMES[j]}: config {a}, file {b}'
                       for j, (a, b) in enumerate(zip(table_sizes, expected))
                       if a != b)
    cap = (f'min(counts, {max_ind_range})' if max_ind_range is not None
           and max_ind_range > 0 else 'counts')
    raise DataError(f'{counts_path}: table sizes ({cap}) differ from the '
                    f'config\'s table_sizes ({diff})')
  common = dict(table_sizes=table_sizes, max_ind_range=max_ind_range,
                seed=seed, prefetch=prefetch)
  paths = [os.path.join(data_dir, f) for f in (train_file, eval_file)]
  train, evaluation = (CriteoDataset(load_rows(p), name=p, **common)
                       for p in paths)
  return train, evaluation


# ---------------------------------------------------------------- synthetic

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Fixed logit standard deviation and variance shares (tables, dense,
# interaction) of the synthetic clicks: a Bayes AUC of about 0.88.
_LOGIT_STD = 2.2
_SHARES = (0.5, 0.2, 0.3)
_RANK = 4                  # the interaction's hidden dimension
_CALIBRATION_ROWS = 1 << 16
_GEN_CHUNK_ROWS = 1 << 18
# Tables up to this size keep their hidden values in memory (8 MB each).
_CACHE_ROWS = 1 << 20


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer: a bijective scramble of uint64s."""
  with np.errstate(over='ignore'):
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _hash_normal(key: int, values: np.ndarray) -> np.ndarray:
  """Standard normals, a pure function of (key, each value): Box-Muller on
  the two 32-bit halves of a hash."""
  h = _mix(np.uint64(key) ^ np.asarray(values).astype(np.uint64))
  u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * 2.0**-32
  u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * 2.0**-32
  return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _key(*parts: int) -> int:
  h = np.uint64(0x5EED)
  for p in parts:
    h = _mix(h ^ np.uint64(p))
  return int(h)


class ClickModel:
  """The hidden model of the synthetic clicks, a function of the seed.

  Rows: categorical indices are drawn per table from a power law over ranks
  (P(rank r) ~ (r + 1) ** -zipf_exponent, so a few hot rows dominate, as in
  Criteo), scattered over the table by a fixed affine bijection; dense
  counts are geometric, each feature with its own mean in [0.5, 100].

  Click logit = bias + std * (a * T + b * D + c * I), each part standardized
  on a calibration sample: T = the sum over tables of a hidden N(0, s_j)
  weight of the row (a hash of (seed, table, row): no table-sized arrays
  for large tables), D = a hidden linear function of the log1p dense features,
  I = <u(row of table p), v(row of table q)>, a rank-4 interaction between
  two tables (by default the two largest). Variance shares a^2 : b^2 : c^2
  = 0.5 : 0.2 : 0.3; std = 2.2 gives a Bayes-optimal AUC of about 0.88.
  The bias sets the mean click probability to `click_rate`.
  """

  def __init__(self, table_sizes: Sequence[int], *, seed: int = 0,
               click_rate: float = 0.27, zipf_exponent: float = 1.2,
               logit_std: float = _LOGIT_STD,
               interaction: tuple[int, int] | None = None):
    sizes = [int(s) for s in table_sizes]
    if len(sizes) != NUM_SPARSE or min(sizes) < 1:
      raise ConfigError(f'table_sizes must be {NUM_SPARSE} sizes >= 1, got '
                        f'{sizes}')
    if not 0 < click_rate < 1:
      raise ConfigError(f'click_rate must be in (0, 1), got {click_rate}')
    if zipf_exponent <= 0 or logit_std < 0:
      raise ConfigError('zipf_exponent must be > 0 and logit_std >= 0')
    if interaction is None:
      by_size = sorted(range(NUM_SPARSE), key=lambda j: (-sizes[j], j))
      interaction = (by_size[0], by_size[1])
    p, q = (int(t) for t in interaction)
    if p == q or not (0 <= p < NUM_SPARSE and 0 <= q < NUM_SPARSE):
      raise ConfigError(f'interaction must name two different tables of '
                        f'{NUM_SPARSE}, got {interaction}')
    self.table_sizes = tuple(sizes)
    self.seed = int(seed)
    self.zipf_exponent = float(zipf_exponent)
    self.logit_std = float(logit_std)
    self.interaction = (p, q)
    rng = np.random.default_rng([self.seed, 0xC1C4])
    self._sizes = np.asarray(sizes, np.int64)
    self._scale = rng.uniform(0.3, 1.0, NUM_SPARSE)
    self._offset = rng.integers(0, 1 << 62, NUM_SPARSE) % self._sizes
    mult = []
    for s in sizes:
      m = int(rng.integers(1, 1 << 30)) | 1
      while math.gcd(m, s) != 1:
        m += 2
      mult.append(m % s if s > 1 else 0)
    self._mult = np.asarray(mult, np.int64)
    self._dense_mean = np.exp(rng.uniform(np.log(0.5), np.log(100.0),
                                          NUM_DENSE))
    self._dense_weight = rng.normal(size=NUM_DENSE)
    self._keys = [_key(self.seed, 1, j) for j in range(NUM_SPARSE)]
    self._u_keys = [_key(self.seed, 2, c) for c in range(_RANK)]
    self._v_keys = [_key(self.seed, 3, c) for c in range(_RANK)]
    self._cache: dict[int, np.ndarray] = {}
    # Standardize the parts on a calibration sample, then fit the bias.
    self._center = np.zeros(3)
    self._spread = np.ones(3)
    self.bias = 0.0
    index, dense = self.sample(_CALIBRATION_ROWS, np.random.default_rng(
        [self.seed, 0xCA11]))
    parts = self._parts(index, dense)
    self._center = parts.mean(axis=0)
    spread = parts.std(axis=0)
    self._spread = np.where(spread > 0, spread, 1.0)
    z = self._combine(parts)
    lo, hi = -30.0, 30.0
    for _ in range(60):
      mid = (lo + hi) / 2
      if _sigmoid(z + mid).mean() < click_rate:
        lo = mid
      else:
        hi = mid
    self.bias = (lo + hi) / 2

  def sample(self, n: int, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """n rows of features: (indices int64 [n, 26], dense int64 [n, 13])."""
    u = rng.random((n, NUM_SPARSE))
    top = self._sizes.astype(np.float64) + 1.0
    a = self.zipf_exponent
    if abs(a - 1.0) < 1e-9:
      x = top ** u
    else:
      x = (1.0 - u * (1.0 - top ** (1.0 - a))) ** (1.0 / (1.0 - a))
    rank = np.clip(np.floor(x).astype(np.int64) - 1, 0, self._sizes - 1)
    index = (rank * self._mult + self._offset) % self._sizes
    p = 1.0 / (1.0 + self._dense_mean)
    dense = np.minimum(rng.geometric(p, (n, NUM_DENSE)) - 1,
                       np.iinfo(np.int32).max)
    return index, dense

  def _hidden(self, key: int, table: int, index: np.ndarray) -> np.ndarray:
    """The hidden normal value `key` of rows `index` of table `table`:
    looked up in a precomputed vector for tables of up to _CACHE_ROWS
    rows, else hashed (the same values either way)."""
    size = self.table_sizes[table]
    if size > _CACHE_ROWS:
      return _hash_normal(key, index)
    values = self._cache.get(key)
    if values is None:
      values = self._cache.setdefault(key, _hash_normal(key, np.arange(size)))
    return values[index]

  def _parts(self, index: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """(T, D, I) [n, 3] before standardization."""
    t = np.zeros(len(index))
    for j in range(NUM_SPARSE):
      t += self._scale[j] * self._hidden(self._keys[j], j, index[:, j])
    d = np.log1p(dense.astype(np.float64)) @ self._dense_weight
    p, q = self.interaction
    i = sum(self._hidden(self._u_keys[c], p, index[:, p])
            * self._hidden(self._v_keys[c], q, index[:, q])
            for c in range(_RANK))
    return np.stack([t, d, i], axis=1)

  def _combine(self, parts: np.ndarray) -> np.ndarray:
    z = (parts - self._center) / self._spread
    return self.logit_std * (z @ np.sqrt(np.asarray(_SHARES)))

  def logits(self, index: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """True click logits (float64 [n]) of rows' indices and dense counts."""
    return self.bias + self._combine(self._parts(np.asarray(index, np.int64),
                                                 np.asarray(dense)))

  def rows(self, n: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """n labelled rows (int32 [n, 40]) and their true logits (float32 [n]).

    Generated in chunks of fixed size, each from its own generator seeded
    by (seed, salt, chunk), in a few threads: the result does not depend on
    the threading.
    """
    rows = np.empty((n, ROW_INTS), np.int32)
    logits = np.empty(n, np.float32)

    def fill(c: int) -> None:
      start = c * _GEN_CHUNK_ROWS
      m = min(n - start, _GEN_CHUNK_ROWS)
      rng = np.random.default_rng([self.seed, salt, c])
      index, dense = self.sample(m, rng)
      z = self.logits(index, dense)
      label = rng.random(m) < _sigmoid(z)
      rows[start:start + m, 0] = label
      rows[start:start + m, 1:1 + NUM_DENSE] = dense
      rows[start:start + m, 1 + NUM_DENSE:] = index
      logits[start:start + m] = z

    chunks = -(-n // _GEN_CHUNK_ROWS)
    workers = min(chunks, 8, os.cpu_count() or 1)
    if workers <= 1:
      for c in range(chunks):
        fill(c)
    else:
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(chunks)))
    return rows, logits


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))


class SyntheticCriteo(CriteoDataset):
  """In-memory rows of learnable synthetic clicks (see `ClickModel`).

  Besides the dataset's attributes: `logits` (float32 [N], the true click
  logits), `click_rate` (the fraction of clicks) and `bayes_auc` (the AUC of
  the true logits on these rows: what a perfect model scores here, the
  ceiling of the eval AUC; NaN if the rows hold a single class).
  """

  def __init__(self, model: ClickModel, num_examples: int, *, split: str,
               max_ind_range: int | None = MAX_IND_RANGE, prefetch: int = 2):
    from jaxperf.metrics.auc import auc  # pylint: disable=g-import-not-at-top
    if num_examples < 1:
      raise ConfigError(f'num_examples must be >= 1, got {num_examples}')
    if max_ind_range is not None and 0 < max_ind_range < max(
        model.table_sizes):
      raise ConfigError(f'table sizes up to {max(model.table_sizes)} exceed '
                        f'max_ind_range {max_ind_range}')
    salt = {'train': 1, 'eval': 2}.get(split, 3 + sum(split.encode()))
    rows, self.logits = model.rows(int(num_examples), salt)
    super().__init__(rows, name=f'synthetic Criteo {split} rows',
                     table_sizes=model.table_sizes,
                     max_ind_range=max_ind_range, seed=model.seed,
                     prefetch=prefetch)
    self.model = model
    self.split = split
    self.click_rate = float(rows[:, 0].mean())
    one_class = self.click_rate in (0.0, 1.0)
    self.bayes_auc = (float('nan') if one_class
                      else auc(self.logits, rows[:, 0]))


def synthetic_criteo(num_train: int, num_eval: int, *,
                     table_sizes: Sequence[int], seed: int = 0,
                     click_rate: float = 0.27, zipf_exponent: float = 1.2,
                     logit_std: float = _LOGIT_STD,
                     interaction: tuple[int, int] | None = None,
                     max_ind_range: int | None = MAX_IND_RANGE,
                     prefetch: int = 2
                     ) -> tuple[SyntheticCriteo, SyntheticCriteo]:
  """(train, eval) synthetic sources sharing one hidden click model.

  The model depends on (table_sizes, seed and the model knobs) only; train
  and eval draw different rows from it. With the defaults about 27% of the
  rows are clicks and the true logits reach an AUC of about 0.88 (the eval
  set's `bayes_auc`); a model trained on few rows scores less, as it cannot
  learn the weights of rows it rarely sees. Memory: 164 bytes per row.
  """
  model = ClickModel(table_sizes, seed=seed, click_rate=click_rate,
                     zipf_exponent=zipf_exponent, logit_std=logit_std,
                     interaction=interaction)
  common = dict(max_ind_range=max_ind_range, prefetch=prefetch)
  return (SyntheticCriteo(model, num_train, split='train', **common),
          SyntheticCriteo(model, num_eval, split='eval', **common))
