"""KiTS19 for the MLPerf 3D U-Net: the reference's cases, a synthetic stand-in.

On disk (the reference's image_segmentation/pytorch/preprocess_dataset.py)
every case is a pair of .npy files in one directory:

* `<case>_x.npy`: float32 [1, D, H, W], the CT resampled to 1.6 x 1.2 x 1.2 mm,
  clipped to [-79, 304] HU and normalized as (x - 101) / 76.9;
* `<case>_y.npy`: uint8 [1, D, H, W], 0 background, 1 kidney, 2 tumor.

Preprocessing edge-pads every side to at least 128 voxels. The case id is the
file name before `_x.npy`, e.g. `case_00000`.

Split: a directory holding exactly the 210 reference cases case_00000 ...
case_00209 is split as the reference splits it (`REFERENCE_EVAL_CASES`, its
evaluation_cases.txt): 168 train, 42 eval. Any other set of cases needs an
`evaluation_cases.txt` in the data directory listing the evaluation cases, one
per line, by id (case_00000) or by the reference's number (00000); blank lines
and `#` comments are skipped. That file, when present, always wins. Every other
case is a training case: none is dropped.

Training samples follow data_loading/pytorch_loader.py, in this order:

1. Crop a patch (128^3): with probability `oversampling` (0.4) around
   foreground, else anywhere. The foreground crop picks a class uniformly among
   the foreground classes present, takes the bounding boxes of the two largest
   (by box volume) connected components of that class (6-connectivity), picks
   one of them uniformly, and on each axis grows the box to the patch by a
   random split of the difference (or shrinks it by a random cut when it is
   larger), shifting it back inside the volume. A case with no foreground
   gets a random crop. Random offsets are drawn from [0, size - patch), so the
   last offset is never drawn unless size == patch, as in the reference.
2. Flip each spatial axis with probability 1/3, image and label together.
3. Cast: image float32, label uint8 (int32 in the batches).
4. Brightness with probability 0.1: factor ~ U(0.7, 1.3), image *= 1 + factor
   (sic: the reference scales by 1.7 to 2.3).
5. Gaussian noise with probability 0.1: std ~ U(0, 0.1), image += N(0, std).

Order and randomness: global slot s = step * global_batch + i holds training
case permutation(seed, s // n)[s % n] (epochs are concatenated, as in
`jaxperf.data.augment.ImageDataset`; the reference's loader instead drops
each epoch's last partial batch), and its augmentation draws from a generator
seeded by (seed, s). So the stream depends on nothing but the seed
and the step: not on the workers, the process count or where it is resumed.
Samples are augmented on `num_workers` threads and batches assembled
`prefetch` ahead in a background thread.

Evaluation goes by whole cases, without augmentation: `cases()` yields
(case id, float32 [D, H, W] image, uint8 [D, H, W] label) in case id order.

API:
  open_kits19(data_dir, *, patch_shape, oversampling, seed, num_workers,
              prefetch, in_memory) -> (train, eval), both `Kits19`.
  Kits19(data_dir, *, split='train'|'eval', ...): one split of a directory.
  synthetic_kits19(num_train, num_eval, *, max_shape, min_shape, patch_shape,
                   ...) -> (train, eval), both `SyntheticKits19`.
  write_case(directory, case_id, image, label) and make_tiny_dataset(
      directory, n_train, n_eval, shape, seed) write the reference format.
  random_crop_box, foreground_boxes, foreground_crop_box and augment are the
  augmentation steps.
Training sources yield {'image': float32 [b, D, H, W, 1],
'label': int32 [b, D, H, W]}, b = global_batch // process_count.

Memory: training cases are loaded whole on first use and kept (in_memory=True):
5 bytes per voxel, 90 MB for a 200 x 300 x 300 case, so plan for 10-20 GB for
the 168 reference training cases. in_memory=False keeps them as read-only
memory maps instead (the OS page cache holds what fits). Evaluation cases are
memory-mapped and copied out when read; nothing of them is kept. Per case, the
foreground boxes are computed once and kept (a few numbers).
"""

from __future__ import annotations

import abc
import collections
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage

from jaxperf.data.augment import epoch_order, local_batch_size
from jaxperf.data.prefetch import PrefetchedStreams
from jaxperf.errors import ConfigError, DataError

Shape3 = tuple[int, int, int]
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

NUM_CLASSES = 3          # 0 background, 1 kidney, 2 tumor
PATCH_SHAPE = (128, 128, 128)
OVERSAMPLING = 0.4
FLIP_PROB = 1 / 3
BRIGHTNESS_FACTOR = 0.3
BRIGHTNESS_PROB = 0.1
NOISE_STD = 0.1
NOISE_PROB = 0.1
REFERENCE_NUM_CASES = 210
SPLIT_FILE = 'evaluation_cases.txt'

_REFERENCE_EVAL_NUMBERS = (
    0, 3, 5, 6, 12, 24, 34, 41, 44, 49, 52, 56, 61, 65, 66, 70, 76, 78, 80,
    84, 86, 87, 92, 111, 112, 125, 128, 138, 157, 160, 161, 162, 169, 171,
    176, 185, 187, 189, 198, 203, 206, 207)
# The reference's evaluation_cases.txt: the 42 evaluation cases of KiTS19.
REFERENCE_EVAL_CASES = tuple(f'case_{i:05d}' for i in _REFERENCE_EVAL_NUMBERS)

_CASE_FILE = re.compile(r'^(?P<case>.+)_(?P<kind>[xy])\.npy$')
_REFERENCE_LAYOUT = ('<case>_x.npy (float32 [1, D, H, W]) and <case>_y.npy '
                     '(uint8 [1, D, H, W]) as the reference preprocess_dataset'
                     '.py writes them')
_PAD_NOTE = ("the reference's preprocess_dataset.py pads every side to at "
             "least 128")

# Seed-sequence tags: keep the streams of different purposes apart.
_ORDER, _AUGMENT, _SYNTH, _TINY = 1, 2, 3, 4
# Training batches submitted to the pool ahead of the one being assembled.
_IN_FLIGHT = 2

# ---------------------------------------------------------------- augmentation


def _randrange(rng: np.random.Generator, n: int) -> int:
  """Uniform in [0, n), 0 when n is 0 (the reference's randrange)."""
  return int(rng.integers(n)) if n > 0 else 0


def random_crop_box(shape: Sequence[int], patch: Sequence[int],
                    rng: np.random.Generator) -> Box:
  """A uniformly placed patch; start offsets from [0, size - patch)."""
  starts = [_randrange(rng, size - p) for size, p in zip(shape, patch)]
  return tuple((s, s + p) for s, p in zip(starts, patch))


def foreground_boxes(label: np.ndarray) -> dict[int, list[Box]]:
  """For each foreground class (1, 2) present, the bounding boxes of its two
  largest 6-connected components (largest last), as ((start, stop),) * 3."""
  out = {}
  for cl in range(1, NUM_CLASSES):
    mask = label == cl
    if not mask.any():
      continue
    components, _ = ndimage.label(mask)
    boxes = [tuple((s.start, s.stop) for s in sl)
             for sl in ndimage.find_objects(components) if sl is not None]
    volumes = [math.prod(b - a for a, b in box) for box in boxes]
    order = np.argsort(volumes, kind='stable')[-2:]
    out[cl] = [boxes[i] for i in order]
  return out


def _fit_axis(start: int, stop: int, size: int, patch: int,
              rng: np.random.Generator) -> tuple[int, int]:
  """One axis of the foreground crop: [start, stop) made `patch` long."""
  diff = patch - (stop - start)
  if diff >= 0:                     # grow around the box
    before = _randrange(rng, diff)
    low, high = max(0, start - before), min(size, stop + diff - before)
  else:                             # cut the box down to the patch
    before = _randrange(rng, -diff)
    low, high = start + before, stop + diff + before
  short = patch - (high - low)
  if short > 0:                     # clipped at an edge: shift back inside
    if low == 0:
      high += short
    else:
      low -= short
  return low, high


def foreground_crop_box(boxes: dict[int, list[Box]], shape: Sequence[int],
                        patch: Sequence[int], rng: np.random.Generator
                        ) -> Box | None:
  """A patch around a random foreground component; None without foreground."""
  if not boxes:
    return None
  classes = sorted(boxes)
  candidates = boxes[classes[_randrange(rng, len(classes))]]
  box = candidates[_randrange(rng, len(candidates))]
  return tuple(_fit_axis(a, b, size, p, rng)
               for (a, b), size, p in zip(box, shape, patch))


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
  """Flips, cast, brightness and noise of a cropped patch (steps 2-5)."""
  for axis in range(3):
    if rng.random() < FLIP_PROB:
      image, label = np.flip(image, axis), np.flip(label, axis)
  image = image.astype(np.float32, copy=False)
  label = label.astype(np.uint8, copy=False)
  if rng.random() < BRIGHTNESS_PROB:
    factor = rng.uniform(1.0 - BRIGHTNESS_FACTOR, 1.0 + BRIGHTNESS_FACTOR)
    image = image * np.float32(1.0 + factor)
  if rng.random() < NOISE_PROB:
    std = rng.uniform(0.0, NOISE_STD)
    image = image + rng.standard_normal(image.shape, np.float32) * np.float32(
        std)
  return image, label


def _slices(box: Box | None, shape: Sequence[int]) -> tuple[slice, ...]:
  """The slices of `box` in a volume of `shape` (all of it for None)."""
  if box is None:
    return (slice(None),) * 3
  if len(box) != 3 or any(not 0 <= a < b <= s for (a, b), s in zip(box, shape)):
    raise ValueError(f'box {box} is not inside a volume of shape {shape}')
  return tuple(slice(a, b) for a, b in box)


def _shape3(value, name: str) -> Shape3:
  shape = tuple(int(s) for s in value)
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(f'{name}={list(shape)}: expected 3 positive sides '
                      f'(D, H, W)')
  return shape


# ---------------------------------------------------------------- sources


class Kits19Source(PrefetchedStreams, abc.ABC):
  """One split of KiTS19-like cases: training batches and whole cases.

  Subclasses give each case's shape and its voxels in a box (`read`); this
  class crops, augments, orders and batches them.
  """

  def __init__(self, case_ids: Sequence[str], *, split: str,
               patch_shape: Sequence[int] = PATCH_SHAPE,
               oversampling: float = OVERSAMPLING, seed: int = 0,
               num_workers: int = 8, prefetch: int = 2):
    if split not in ('train', 'eval'):
      raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0.0 <= oversampling <= 1.0:
      raise ConfigError(f'oversampling={oversampling}: expected a probability '
                        f'in [0, 1]')
    if seed < 0:
      raise ConfigError(f'the data seed must be >= 0, got {seed}')
    if num_workers < 1:
      raise ConfigError(f'num_workers must be >= 1, got {num_workers}')
    if prefetch < 0:
      raise ConfigError(f'prefetch must be >= 0, got {prefetch}')
    self.case_ids = list(case_ids)
    self.num_examples = len(self.case_ids)
    self.split = split
    self.patch_shape = _shape3(patch_shape, 'patch_shape')
    self.oversampling = float(oversampling)
    self.seed = int(seed)
    self._init_streams(prefetch, num_workers, pool_name='aug')
    self._foreground: list[dict[int, list[Box]] | None] = (
        [None] * self.num_examples)
    self._locks = [threading.RLock() for _ in range(self.num_examples)]

  # --- cases -----------------------------------------------------------------
  @abc.abstractmethod
  def case_shape(self, index: int) -> Shape3:
    """(D, H, W) of case `index`."""

  @abc.abstractmethod
  def read(self, index: int, box: Box | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Case `index` inside `box` (all of it if None): float32 image and uint8
    label, both [d, h, w], fresh arrays."""

  def read_label(self, index: int) -> np.ndarray:
    """The whole label [D, H, W] of case `index` (may be a read-only view)."""
    return self.read(index)[1]

  def foreground(self, index: int) -> dict[int, list[Box]]:
    """`foreground_boxes` of case `index`, computed once."""
    boxes = self._foreground[index]
    if boxes is None:
      with self._locks[index]:
        boxes = self._foreground[index]
        if boxes is None:
          boxes = foreground_boxes(self.read_label(index))
          self._foreground[index] = boxes
    return boxes

  def cases(self, process_index: int = 0, process_count: int = 1
            ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(case id, float32 image [D, H, W], uint8 label [D, H, W]) of this
    process's cases: every process_count-th from process_index, in id order."""
    if not 0 <= process_index < process_count:
      raise ConfigError(f'process_index {process_index} is outside '
                        f'[0, {process_count})')
    if self._closed:
      raise RuntimeError('the dataset is closed')
    for i in range(process_index, self.num_examples, process_count):
      image, label = self.read(i)
      yield self.case_ids[i], image, label

  # --- training order --------------------------------------------------------
  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the cases in training epoch `epoch`."""
    return np.random.default_rng([self.seed, _ORDER, epoch]).permutation(
        self.num_examples)

  def train_order(self, step: int, global_batch: int, *,
                  process_index: int = 0, process_count: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(case indices, epochs) of this process's slice of batch `step`."""
    index, epochs, _ = self._order(step, global_batch, process_index,
                                   process_count, {})
    return index, epochs

  def _order(self, step, global_batch, process_index, process_count, cache):
    return epoch_order(step, global_batch, process_index, process_count,
                       self.num_examples, self.permutation, cache)

  def sample(self, index: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """The augmented patch of case `index` at global slot `slot`: float32 and
    uint8 [D, H, W] of patch_shape (views may be flipped, not contiguous)."""
    rng = np.random.default_rng([self.seed, _AUGMENT, slot])
    shape = self.case_shape(index)
    box = None
    if rng.random() < self.oversampling:
      box = foreground_crop_box(self.foreground(index), shape,
                                self.patch_shape, rng)
    if box is None:
      box = random_crop_box(shape, self.patch_shape, rng)
    image, label = self.read(index, box)
    return augment(image, label, rng)

  # --- streams ---------------------------------------------------------------
  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from batch `start_step` on: this process's
    slice {'image': float32 [b, D, H, W, 1], 'label': int32 [b, D, H, W]}."""
    if self.split != 'train':
      raise ValueError(f'train_batches of the {self.split} split: evaluation '
                       f'goes by whole cases (cases())')
    if start_step < 0:
      raise ConfigError(f'start_step must be >= 0, got {start_step}')
    local_batch_size(global_batch, process_count, process_index)
    if self.num_examples == 0:
      raise DataError('no training cases')
    return self._stream(self._jobs(start_step, global_batch, process_index,
                                   process_count))

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    del global_batch, process_index, process_count
    raise DataError(
        'KiTS19 evaluation goes by whole cases, not batches: iterate cases() '
        '(the unet3d workload evaluates by sliding windows over them)')

  def _jobs(self, start_step, global_batch, process_index, process_count):
    cache: dict[int, np.ndarray] = {}
    step = start_step
    while True:
      index, _, slots = self._order(step, global_batch, process_index,
                                    process_count, cache)
      yield self._submit(index.tolist(), slots.tolist())
      step += 1

  def _submit(self, index: list[int], slots: list[int]):
    n = len(index)
    batch = {'image': np.empty((n, *self.patch_shape, 1), np.float32),
             'label': np.empty((n, *self.patch_shape), np.int32)}
    pool = self._executor()
    futures = [pool.submit(self._fill, batch, j, i, s)
               for j, (i, s) in enumerate(zip(index, slots))]
    return batch, futures

  def _fill(self, batch, j: int, index: int, slot: int) -> None:
    image, label = self.sample(index, slot)
    batch['image'][j, ..., 0] = image
    batch['label'][j] = label

  def _stream(self, jobs: Iterator) -> Iterator[dict[str, np.ndarray]]:
    return self._prefetched(self._assemble(jobs))

  def _assemble(self, jobs: Iterator) -> Iterator[dict[str, np.ndarray]]:
    """Keeps `_IN_FLIGHT` batches submitted; yields them in order, complete."""
    pending: collections.deque = collections.deque()
    try:
      while True:
        while len(pending) < _IN_FLIGHT:
          pending.append(next(jobs))
        batch, futures = pending.popleft()
        for f in futures:
          f.result()
        yield batch
    finally:
      for _, futures in pending:
        for f in futures:
          f.cancel()



# ---------------------------------------------------------------- files


def find_cases(data_dir: str | os.PathLike) -> dict[str, tuple[str, str]]:
  """{case id: (x path, y path)} of a directory, sorted by id; DataError if
  it is missing, holds no cases or holds an x without its y (or vice versa)."""
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: no such directory (expected KiTS19 cases '
                    f'{_REFERENCE_LAYOUT})')
  found: dict[str, dict[str, str]] = {}
  with os.scandir(data_dir) as it:
    for e in it:
      m = _CASE_FILE.match(e.name)
      if m and not e.name.startswith('.') and e.is_file():
        found.setdefault(m['case'], {})[m['kind']] = e.path
  if not found:
    raise DataError(f'{data_dir}: no KiTS19 cases (expected '
                    f'{_REFERENCE_LAYOUT})')
  cases = {}
  for case in sorted(found):
    files = found[case]
    for have, lack in (('x', 'y'), ('y', 'x')):
      if lack not in files:
        raise DataError(
            f'{files[have]}: no matching {case}_{lack}.npy in {data_dir} '
            f'(every case needs both {case}_x.npy and {case}_y.npy)')
    cases[case] = (files['x'], files['y'])
  return cases


def _read_split_file(path: str, case_ids: Sequence[str]) -> set[str]:
  ids = set(case_ids)
  chosen = set()
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: cannot be read ({e})') from None
  for n, line in enumerate(lines, 1):
    entry = line.split('#', 1)[0].strip()
    if not entry:
      continue
    case = entry if entry in ids else f'case_{entry}'
    if case not in ids:
      raise DataError(f'{path}:{n}: evaluation case {entry!r} is not in '
                      f'{os.path.dirname(path)} (expected a case id such as '
                      f'{case_ids[0]} or its number, one per line)')
    chosen.add(case)
  return chosen


def split_cases(data_dir: str | os.PathLike, case_ids: Sequence[str]
                ) -> tuple[list[str], list[str]]:
  """(train ids, eval ids): by data_dir/evaluation_cases.txt if present, else
  the reference's split of exactly its 210 cases; DataError otherwise."""
  data_dir = os.fspath(data_dir)
  path = os.path.join(data_dir, SPLIT_FILE)
  if os.path.exists(path):
    evals = _read_split_file(path, case_ids)
  else:
    reference = [f'case_{i:05d}' for i in range(REFERENCE_NUM_CASES)]
    if sorted(case_ids) != reference:
      extra = sorted(set(case_ids) - set(reference))
      missing = sorted(set(reference) - set(case_ids))
      detail = '; '.join(
          f'{what} {", ".join(ids[:3])}{" ..." if len(ids) > 3 else ""}'
          for what, ids in (('not reference cases:', extra),
                            ('missing', missing)) if ids)
      raise DataError(
          f"{data_dir}: {len(case_ids)} cases that are not the reference's "
          f'{REFERENCE_NUM_CASES} (case_00000 ... case_00209; {detail}) and '
          f'no {SPLIT_FILE}: to choose the evaluation cases, list their ids, '
          f'one per line, in {path}')
    evals = set(REFERENCE_EVAL_CASES)
  train = [c for c in case_ids if c not in evals]
  evaluation = [c for c in case_ids if c in evals]
  if not train or not evaluation:
    raise DataError(f'{path}: leaves no {"training" if not train else "eval"}'
                    f' cases among the {len(case_ids)} of {data_dir}')
  return train, evaluation


def _open_npy(path: str, mmap: bool) -> np.ndarray:
  try:
    return np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot be read as a .npy array '
                    f'({type(e).__name__}: {e}); expected '
                    f'{_REFERENCE_LAYOUT}') from None


def _check_pair(x_path: str, y_path: str, x: np.ndarray, y: np.ndarray
                ) -> Shape3:
  """Checks the headers of a case (ndim, channel, dtypes, shapes)."""
  for path, a, want in ((x_path, x, 'float32'), (y_path, y, 'uint8')):
    if a.ndim != 4 or a.shape[0] != 1:
      raise DataError(f'{path}: shape {a.shape}; expected [1, D, H, W] (one '
                      f'leading channel, as preprocess_dataset.py writes)')
    kind = 'f' if want == 'float32' else 'ui'
    if a.dtype.kind not in kind:
      raise DataError(f'{path}: dtype {a.dtype}; expected {want} (as '
                      f'preprocess_dataset.py writes)')
  if x.shape != y.shape:
    raise DataError(f'{y_path}: shape {y.shape} does not match {x_path} '
                    f'{x.shape}; expected the label to have the image shape')
  return tuple(int(s) for s in x.shape[1:])


def _check_values(x_path: str, y_path: str, x: np.ndarray, y: np.ndarray
                  ) -> None:
  lo, hi = int(y.min()), int(y.max())
  if lo < 0 or hi >= NUM_CLASSES:
    raise DataError(f'{y_path}: label values from {lo} to {hi}; expected only '
                    f'0 (background), 1 (kidney) and 2 (tumor)')
  if not np.isfinite(x.min()) or not np.isfinite(x.max()):
    raise DataError(f'{x_path}: the image holds NaN or infinite values')


class Kits19(Kits19Source):
  """One split ('train' or 'eval') of the reference's preprocessed cases.

  Headers are checked when opened (all cases of the split); label values and
  finite images when a case is first read. Training cases must be at least
  the patch on every side.
  """

  def __init__(self, data_dir: str | os.PathLike, *, split: str,
               patch_shape: Sequence[int] = PATCH_SHAPE,
               oversampling: float = OVERSAMPLING, seed: int = 0,
               num_workers: int = 8, prefetch: int = 2,
               in_memory: bool = True):
    self.data_dir = os.fspath(data_dir)
    files = find_cases(self.data_dir)
    train, evaluation = split_cases(self.data_dir, list(files))
    ids = train if split == 'train' else evaluation
    super().__init__(ids, split=split, patch_shape=patch_shape,
                     oversampling=oversampling, seed=seed,
                     num_workers=num_workers, prefetch=prefetch)
    self.paths = [files[c] for c in ids]
    self.in_memory = bool(in_memory)
    self._shapes = []
    for x_path, y_path in self.paths:
      x, y = _open_npy(x_path, True), _open_npy(y_path, True)
      shape = _check_pair(x_path, y_path, x, y)
      del x, y
      if split == 'train':
        small = [f'{"DHW"[a]} ({shape[a]} < {self.patch_shape[a]})'
                 for a in range(3) if shape[a] < self.patch_shape[a]]
        if small:
          raise DataError(
              f'{x_path}: volume {"x".join(map(str, shape))} is smaller than '
              f'the {"x".join(map(str, self.patch_shape))} training patch in '
              f'{", ".join(small)}; expected every side at least the patch '
              f'({_PAD_NOTE})')
      self._shapes.append(shape)
    self._volumes: list[tuple[np.ndarray, np.ndarray] | None] = (
        [None] * self.num_examples)

  def case_shape(self, index: int) -> Shape3:
    return self._shapes[index]

  def _load(self, index: int, mmap: bool) -> tuple[np.ndarray, np.ndarray]:
    x_path, y_path = self.paths[index]
    x, y = _open_npy(x_path, mmap), _open_npy(y_path, mmap)
    _check_pair(x_path, y_path, x, y)
    _check_values(x_path, y_path, x, y)
    return x[0], y[0]

  def _arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The case's [D, H, W] arrays: kept for training cases, else mapped."""
    if self.split != 'train':
      return self._load(index, mmap=True)
    arrays = self._volumes[index]
    if arrays is None:
      with self._locks[index]:
        arrays = self._volumes[index]
        if arrays is None:
          arrays = self._load(index, mmap=not self.in_memory)
          self._volumes[index] = arrays
    return arrays

  def read(self, index, box=None):
    x, y = self._arrays(index)
    sl = _slices(box, x.shape)
    return (np.array(x[sl], dtype=np.float32),
            np.array(y[sl], dtype=np.uint8))

  def read_label(self, index):
    return self._arrays(index)[1]

  def close(self) -> None:
    super().close()
    self._volumes = [None] * self.num_examples


def open_kits19(data_dir: str | os.PathLike, *,
                patch_shape: Sequence[int] = PATCH_SHAPE,
                oversampling: float = OVERSAMPLING, seed: int = 0,
                num_workers: int = 8, prefetch: int = 2,
                in_memory: bool = True) -> tuple[Kits19, Kits19]:
  """(train, eval) splits of the preprocessed KiTS19 cases in `data_dir`."""
  kw = dict(patch_shape=patch_shape, oversampling=oversampling, seed=seed,
            num_workers=num_workers, prefetch=prefetch, in_memory=in_memory)
  train = Kits19(data_dir, split='train', **kw)
  try:
    return train, Kits19(data_dir, split='eval', **kw)
  except BaseException:
    train.close()
    raise


# ---------------------------------------------------------------- synthetic

# Mean intensity of background, kidney and tumor (noise std 1 * `noise`).
# The background sits near the -2.2 the sliding-window evaluation pads with,
# as air does in the normalised CT.
_CLASS_MEANS = np.asarray([-1.5, 0.0, 1.5], np.float32)
_MIN_SIDE = 8


class _Ellipsoid:
  """An axis-aligned ellipsoid: centre and radii in voxels, (D, H, W)."""

  def __init__(self, centre, radii):
    self.centre = np.asarray(centre, np.float64)
    self.radii = np.asarray(radii, np.float64)

  def mask(self, box: Box) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """(slices of `box`, boolean mask there) where the ellipsoid may lie."""
    lo = np.maximum(np.floor(self.centre - self.radii).astype(int),
                    [a for a, _ in box])
    hi = np.minimum(np.ceil(self.centre + self.radii).astype(int) + 1,
                    [b for _, b in box])
    if np.any(hi <= lo):
      return None
    axes = [((np.arange(lo[k], hi[k]) - self.centre[k]) / self.radii[k]) ** 2
            for k in range(3)]
    inside = (axes[0][:, None, None] + axes[1][None, :, None]
              + axes[2][None, None, :]) <= 1.0
    where = tuple(slice(lo[k] - box[k][0], hi[k] - box[k][0])
                  for k in range(3))
    return where, inside


class _SyntheticCase:
  """Shape, structures and noise key of one synthetic case."""

  def __init__(self, rng: np.random.Generator, min_shape: Shape3,
               max_shape: Shape3):
    shape = np.asarray([int(rng.integers(lo, hi + 1))
                        for lo, hi in zip(min_shape, max_shape)])
    self.shape = tuple(int(s) for s in shape)
    self.gradient = rng.uniform(-0.4, 0.4, 3)
    self.key = np.uint32(rng.integers(2**32, dtype=np.uint32))
    self.kidneys, self.tumors = [], []
    sides = [0.3, 0.7]
    rng.shuffle(sides)
    for k in range(1 + int(rng.random() < 0.5)):
      radii = np.clip(rng.uniform(0.12, 0.22, 3) * shape, 2.5, shape / 2 - 1)
      centre = np.empty(3)
      for a in range(2):
        centre[a] = rng.uniform(radii[a], shape[a] - 1 - radii[a])
      centre[2] = np.clip(shape[2] * (sides[k] + rng.uniform(-0.08, 0.08)),
                          radii[2], shape[2] - 1 - radii[2])
      self.kidneys.append(_Ellipsoid(centre, radii))
      if k == 0 or rng.random() < 0.5:
        t_radii = np.maximum(radii * rng.uniform(0.3, 0.55, 3), 1.5)
        offset = rng.uniform(-0.6, 0.6, 3) * np.maximum(radii - t_radii, 0)
        self.tumors.append(_Ellipsoid(centre + offset, t_radii))

  def label(self, box: Box) -> np.ndarray:
    out = np.zeros([b - a for a, b in box], np.uint8)
    for cl, parts in ((1, self.kidneys), (2, self.tumors)):
      for e in parts:
        m = e.mask(box)
        if m is not None:
          where, inside = m
          out[where][inside] = cl
    return out

  def image(self, box: Box, label: np.ndarray, noise: float) -> np.ndarray:
    d, h, w = (np.arange(a, b) for a, b in box)
    _, hs, ws = self.shape
    # Noise is a hash of the voxel's position: the same voxel has the same
    # value whatever box it is read in. Two 16-bit uniforms make a triangular
    # variable of std 1.
    idx = ((d.astype(np.uint32)[:, None, None] * np.uint32(hs * ws))
           + h.astype(np.uint32)[None, :, None] * np.uint32(ws)
           + w.astype(np.uint32)[None, None, :])
    x = idx * np.uint32(0x9E3779B1) ^ self.key
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    u = ((x & np.uint32(0xFFFF)).astype(np.float32)
         + (x >> np.uint32(16)).astype(np.float32)) * np.float32(1 / 65535)
    image = (u - np.float32(1.0)) * np.float32(math.sqrt(6.0) * noise)
    image += _CLASS_MEANS[label]
    for a, coords in enumerate((d, h, w)):
      ramp = (self.gradient[a] * (coords / self.shape[a] - 0.5)).astype(
          np.float32)
      image += ramp.reshape([-1 if k == a else 1 for k in range(3)])
    return image


class SyntheticKits19(Kits19Source):
  """Learnable KiTS19-like cases, generated on demand from the seed.

  A case is a box of shape uniform in [min_shape, max_shape] per side: a
  noisy background with a gentle random intensity ramp, one or two ellipsoid
  kidneys (label 1, brighter) near the left and right, the first always and
  the second half the time holding a smaller ellipsoid tumor (label 2,
  brighter still), so every case has all three classes. Positions, radii and
  shapes are random per case. Voxels are computed for the box read (a training
  patch or a whole case); only each case's parameters and foreground boxes
  are kept.
  """

  def __init__(self, num_cases: int, *, split: str = 'train',
               max_shape: Sequence[int] = (160, 160, 160),
               min_shape: Sequence[int] | None = None,
               patch_shape: Sequence[int] = PATCH_SHAPE,
               oversampling: float = OVERSAMPLING, seed: int = 0,
               noise: float = 0.5, num_workers: int = 8, prefetch: int = 2):
    if num_cases < 1:
      raise ConfigError(f'synthetic KiTS19 needs at least one case, got '
                        f'{num_cases}')
    patch = _shape3(patch_shape, 'patch_shape')
    self.max_shape = _shape3(max_shape, 'max_shape')
    self.min_shape = (patch if min_shape is None else
                      _shape3(min_shape, 'min_shape'))
    for lo, hi, p in zip(self.min_shape, self.max_shape, patch):
      if not max(p, _MIN_SIDE) <= lo <= hi:
        raise ConfigError(
            f'synthetic case shapes {list(self.min_shape)} to '
            f'{list(self.max_shape)}: expected every side at least the patch '
            f'{list(patch)} and {_MIN_SIDE}, and min <= max')
    prefix = 'case' if split == 'train' else 'eval'
    super().__init__([f'synthetic_{prefix}_{i:05d}' for i in range(num_cases)],
                     split=split, patch_shape=patch, oversampling=oversampling,
                     seed=seed, num_workers=num_workers, prefetch=prefetch)
    self.noise = float(noise)
    self._split_id = 1 if split == 'train' else 2
    self._cases: list[_SyntheticCase | None] = [None] * self.num_examples

  def _case(self, index: int) -> _SyntheticCase:
    case = self._cases[index]
    if case is None:
      rng = np.random.default_rng([self.seed, _SYNTH, self._split_id, index])
      case = _SyntheticCase(rng, self.min_shape, self.max_shape)
      self._cases[index] = case
    return case

  def case_shape(self, index):
    return self._case(index).shape

  def read(self, index, box=None):
    case = self._case(index)
    if box is None:
      box = tuple((0, s) for s in case.shape)
    _slices(box, case.shape)
    label = case.label(box)
    return case.image(box, label, self.noise), label

  def read_label(self, index):
    case = self._case(index)
    return case.label(tuple((0, s) for s in case.shape))


def synthetic_kits19(num_train: int, num_eval: int, *,
                     max_shape: Sequence[int] = (160, 160, 160),
                     min_shape: Sequence[int] | None = None,
                     patch_shape: Sequence[int] = PATCH_SHAPE,
                     oversampling: float = OVERSAMPLING, seed: int = 0,
                     noise: float = 0.5, num_workers: int = 8,
                     prefetch: int = 2
                     ) -> tuple[SyntheticKits19, SyntheticKits19]:
  """(train, eval) synthetic sources with different cases."""
  kw = dict(max_shape=max_shape, min_shape=min_shape, patch_shape=patch_shape,
            oversampling=oversampling, seed=seed, noise=noise,
            num_workers=num_workers, prefetch=prefetch)
  return (SyntheticKits19(num_train, split='train', **kw),
          SyntheticKits19(num_eval, split='eval', **kw))


# ---------------------------------------------------------------- writing


def write_case(directory: str | os.PathLike, case_id: str, image, label
               ) -> tuple[str, str]:
  """Writes one case in the reference format; returns the (x, y) paths.

  `image` and `label` are [D, H, W] or [1, D, H, W]; the image is stored as
  float32, the label (values 0, 1, 2) as uint8.
  """
  directory = os.fspath(directory)
  if not case_id or os.sep in case_id or case_id.startswith('.'):
    raise ValueError(f'bad case id {case_id!r}')
  image, label = np.asarray(image), np.asarray(label)
  if image.ndim == 3:
    image = image[None]
  if label.ndim == 3:
    label = label[None]
  if image.ndim != 4 or image.shape[0] != 1 or image.shape != label.shape:
    raise ValueError(f'image {image.shape} and label {label.shape}: expected '
                     f'the same shape, [D, H, W] or [1, D, H, W]')
  if label.size and (label.min() < 0 or label.max() >= NUM_CLASSES):
    raise ValueError('label values must be 0, 1 or 2')
  os.makedirs(directory, exist_ok=True)
  x_path = os.path.join(directory, f'{case_id}_x.npy')
  y_path = os.path.join(directory, f'{case_id}_y.npy')
  np.save(x_path, image.astype(np.float32), allow_pickle=False)
  np.save(y_path, label.astype(np.uint8), allow_pickle=False)
  return x_path, y_path


def make_tiny_dataset(directory: str | os.PathLike, n_train: int, n_eval: int,
                      shape: Sequence[int] = (16, 16, 16), seed: int = 0, *,
                      write_split: bool = True) -> tuple[list[str], list[str]]:
  """Writes n_train + n_eval synthetic cases case_00000, ... of `shape` in the
  reference format; returns (train ids, eval ids).

  With 168 + 42 cases the evaluation cases are the reference's; otherwise
  they are drawn from the seed. `write_split` writes them to
  evaluation_cases.txt (without it, only the reference's 210 cases open).
  """
  shape = _shape3(shape, 'shape')
  total = n_train + n_eval
  source = SyntheticKits19(total, min_shape=shape, max_shape=shape,
                           patch_shape=shape, seed=seed, num_workers=1,
                           prefetch=0)
  ids = [f'case_{i:05d}' for i in range(total)]
  if (n_train, n_eval) == (REFERENCE_NUM_CASES - 42, 42):
    evals = set(REFERENCE_EVAL_CASES)
  else:
    rng = np.random.default_rng([seed, _TINY])
    evals = {ids[i] for i in rng.choice(total, n_eval, replace=False)}
  for i, case in enumerate(ids):
    write_case(directory, case, *source.read(i))
  source.close()
  if write_split:
    with open(os.path.join(os.fspath(directory), SPLIT_FILE), 'w',
              encoding='utf-8') as f:
      f.writelines(f'{c}\n' for c in ids if c in evals)
  return [c for c in ids if c not in evals], [c for c in ids if c in evals]
