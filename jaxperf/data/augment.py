"""Image decoding, MLPerf ResNet-50 preprocessing and the readers' batching.

Preprocessing follows the MLPerf reference (`imagenet_preprocessing.py`):

* train: `tf.image.sample_distorted_bounding_box` with the whole image as the
  object box (min_object_covered 0.1, aspect ratio range [0.75, 1.33], area
  range [0.05, 1.0], 100 attempts, else the whole image), reimplemented in
  `sample_crop`; the crop is resized (bilinear) to image_size x image_size and
  flipped left-right with probability 1/2.
* eval: an aspect-preserving bilinear resize of the shorter side to
  round(image_size * 256 / 224) (256 for 224), then the central
  image_size x image_size crop.

Images come out as uint8 HWC RGB; mean subtraction happens on device.

`ImageDataset` turns a source of encoded examples into the batch streams the
trainer consumes. The training order is a pure function of (seed, step): slot
s = step * global_batch + i holds example permutation(seed, s // n)[s % n], and
each example's augmentation draws from its own generator seeded by
(seed, epoch, example), so the stream is the same whatever the number of
workers and wherever it is resumed.
"""

from __future__ import annotations

import abc
import io
import math
from collections.abc import Iterator

import numpy as np
from PIL import Image

from jaxperf.data import prefetch
from jaxperf.data.prefetch import PrefetchedStreams
from jaxperf.errors import ConfigError, DataError

AREA_RANGE = (0.05, 1.0)
ASPECT_RANGE = (0.75, 1.33)
MIN_OBJECT_COVERED = 0.1
MAX_ATTEMPTS = 100

# Batches whose decoding is submitted to the pool ahead of the one being
# assembled, so workers do not idle at batch boundaries.
_IN_FLIGHT = 2

# ---------------------------------------------------------------- images


def decode_image(data: bytes, where: str) -> Image.Image:
  """Decodes JPEG/PNG bytes to an RGB image; DataError naming `where` if not."""
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == 'RGB' else img.convert('RGB')
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f'corrupt image {where}: cannot be decoded (expected JPEG or PNG '
        f'data; {type(e).__name__}: {e})') from None


def _round(x: float) -> int:
  """Round half to even, like the reference's lrintf."""
  return int(round(x))


def _try_crop(width: int, height: int, aspect: float, min_area: float,
              max_area: float, rng: np.random.Generator
              ) -> tuple[int, int, int, int] | None:
  """One attempt of the reference's GenerateRandomCrop, or None if it fails.

  The crop height is uniform over the integers that give an area in
  [min_area, max_area] at this aspect ratio; width = round(height * aspect).
  """
  h = _round(math.sqrt(min_area / aspect))
  max_h = _round(math.sqrt(max_area / aspect))
  if _round(max_h * aspect) > width:
    max_h = int((width + 0.5 - 1e-7) / aspect)
    if _round(max_h * aspect) > width:
      max_h -= 1
  max_h = min(max_h, height)
  h = min(h, max_h)
  if h < max_h:
    h += int(rng.integers(0, max_h - h + 1))
  w = _round(h * aspect)
  # Absorb rounding: first one row taller, then one row shorter.
  if w * h < min_area:
    h += 1
    w = _round(h * aspect)
  if w * h > max_area:
    h -= 1
    w = _round(h * aspect)
  if not (min_area <= w * h <= max_area and 0 < w <= width
          and 0 < h <= height):
    return None
  # The reference draws offsets from [0, W - w) (the last offset is never
  # drawn unless the crop spans the image); kept for fidelity.
  y = int(rng.integers(0, height - h)) if h < height else 0
  x = int(rng.integers(0, width - w)) if w < width else 0
  return x, y, w, h


def sample_crop(width: int, height: int, rng: np.random.Generator, *,
                area_range: tuple[float, float] = AREA_RANGE,
                aspect_range: tuple[float, float] = ASPECT_RANGE,
                min_object_covered: float = MIN_OBJECT_COVERED,
                max_attempts: int = MAX_ATTEMPTS
                ) -> tuple[int, int, int, int]:
  """A random crop (x, y, w, h) of a width x height image.

  `sample_distorted_bounding_box` with the whole image as the only object box.
  Each attempt draws the aspect ratio uniformly from `aspect_range`, then the
  crop height uniformly from the integer heights whose area at that aspect
  lies in `area_range` (not area-uniform); the crop must also cover at least
  `min_object_covered` of the box, i.e. here of the image, so with the
  reference's 0.1 the smallest crop is 10% of the image, not 5%. After
  `max_attempts` failures the whole image is used (later squashed to a square;
  no center crop), as the reference does.
  """
  image_area = width * height
  min_area = area_range[0] * image_area
  max_area = area_range[1] * image_area
  min_covered_area = min_object_covered * image_area
  for _ in range(max_attempts):
    lo, hi = aspect_range
    aspect = lo + rng.random() * (hi - lo)
    crop = _try_crop(width, height, aspect, min_area, max_area, rng)
    if crop is not None and crop[2] * crop[3] >= min_covered_area:
      return crop
  return 0, 0, width, height


def eval_resize_shape(width: int, height: int, image_size: int
                      ) -> tuple[int, int]:
  """(width, height) after the eval resize: shorter side to the resize target.

  The longer side is truncated, as the reference's int cast does.
  """
  short = _round(image_size * 256 / 224)
  if width <= height:
    return short, max(int(height * (short / width)), short)
  return max(int(width * (short / height)), short), short


def train_image(data: bytes, where: str, image_size: int,
                rng: np.random.Generator) -> np.ndarray:
  """Decoded, randomly cropped, resized and flipped: uint8 [S, S, 3]."""
  img = decode_image(data, where)
  x, y, w, h = sample_crop(img.width, img.height, rng)
  img = img.resize((image_size, image_size), Image.BILINEAR,
                   box=(x, y, x + w, y + h))
  out = np.asarray(img, np.uint8)
  return out[:, ::-1] if rng.random() < 0.5 else out


def eval_image(data: bytes, where: str, image_size: int) -> np.ndarray:
  """Decoded, resized (shorter side) and center-cropped: uint8 [S, S, 3]."""
  img = decode_image(data, where)
  nw, nh = eval_resize_shape(img.width, img.height, image_size)
  left, top = (nw - image_size) // 2, (nh - image_size) // 2
  img = img.resize((nw, nh), Image.BILINEAR).crop(
      (left, top, left + image_size, top + image_size))
  return np.asarray(img, np.uint8)


# ---------------------------------------------------------------- batching


def local_batch_size(global_batch: int, process_count: int,
                     process_index: int) -> int:
  """This process's share of `global_batch`; ConfigError if it won't split."""
  if global_batch < 1:
    raise ConfigError(f'global batch must be >= 1, got {global_batch}')
  if not 0 <= process_index < process_count:
    raise ConfigError(f'process_index {process_index} is outside '
                      f'[0, {process_count})')
  if global_batch % process_count:
    raise ConfigError(f'global batch {global_batch} does not split over '
                      f'{process_count} processes')
  return global_batch // process_count


def epoch_order(step: int, global_batch: int, process_index: int,
                process_count: int, num_examples: int, permutation,
                cache: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(example indices, epochs, global slots) of this process's slice of
  training batch `step`.

  The stream is epochs back to back, each in the order `permutation(epoch)`
  gives; slot t of the stream is example permutation(t // N)[t % N]. `cache`
  keeps the permutations in use between calls (older epochs are dropped).
  """
  local = local_batch_size(global_batch, process_count, process_index)
  slots = (step * global_batch + process_index * local
           + np.arange(local, dtype=np.int64))
  epochs, positions = np.divmod(slots, num_examples)
  index = np.empty_like(slots)
  for e in np.unique(epochs).tolist():
    if e not in cache:
      for old in [k for k in cache if k < e]:
        del cache[old]
      cache[e] = permutation(e)
    sel = epochs == e
    index[sel] = cache[e][positions[sel]]
  return index, epochs, slots


class ImageDataset(PrefetchedStreams, abc.ABC):
  """Train and eval batch streams over `num_examples` encoded images.

  Subclasses implement `read(index) -> (encoded image, label, where)`; `where`
  names the file (and record) in error messages. Reads, decoding and
  augmentation run in a pool of `num_workers` threads, and batches are
  assembled `prefetch` ahead by a background thread (0: in the caller).
  """

  num_examples: int
  num_classes: int

  def __init__(self, num_examples: int, num_classes: int, *, image_size: int,
               seed: int = 0, num_workers: int = 8, prefetch: int = 2):
    if image_size < 1:
      raise ConfigError(f'image_size must be >= 1, got {image_size}')
    if seed < 0:
      raise ConfigError(f'the data seed must be >= 0, got {seed}')
    if num_workers < 1:
      raise ConfigError(f'num_workers must be >= 1, got {num_workers}')
    if prefetch < 0:
      raise ConfigError(f'prefetch must be >= 0, got {prefetch}')
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self._init_streams(prefetch, num_workers, pool_name='io')

  @abc.abstractmethod
  def read(self, index: int) -> tuple[bytes, int, str]:
    """The encoded image, class id and a description of where it lives."""

  # --- order -----------------------------------------------------------------
  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the examples in training epoch `epoch`."""
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)

  def train_order(self, step: int, global_batch: int, *,
                  process_index: int = 0, process_count: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(example indices, epochs) of this process's slice of batch `step`."""
    return self._order(step, global_batch, process_index, process_count, {})

  def _order(self, step, global_batch, process_index, process_count, cache):
    index, epochs, _ = epoch_order(step, global_batch, process_index,
                                   process_count, self.num_examples,
                                   self.permutation, cache)
    return index, epochs

  # --- streams ---------------------------------------------------------------
  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from batch `start_step` on.

    Yields this process's slice of each global batch:
    {'image': uint8 [b, S, S, 3], 'label': int32 [b]}.
    """
    if start_step < 0:
      raise ConfigError(f'start_step must be >= 0, got {start_step}')
    local_batch_size(global_batch, process_count, process_index)
    return self._stream(self._train_jobs(start_step, global_batch,
                                         process_index, process_count))

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in index order, the last batch padded.

    Yields {'image': uint8 [b, S, S, 3], 'label': int32 [b], 'mask': bool [b]};
    padding has mask False, label 0 and a black image.
    """
    local_batch_size(global_batch, process_count, process_index)
    return self._stream(self._eval_jobs(global_batch, process_index,
                                        process_count))

  def _train_jobs(self, start_step, global_batch, process_index,
                  process_count):
    cache: dict[int, np.ndarray] = {}
    step = start_step
    while True:
      index, epochs = self._order(step, global_batch, process_index,
                                  process_count, cache)
      yield self._submit(index.tolist(), epochs.tolist())
      step += 1

  def _eval_jobs(self, global_batch, process_index, process_count):
    local = local_batch_size(global_batch, process_count, process_index)
    for start in range(0, self.num_examples, global_batch):
      first = start + process_index * local
      index = list(range(first, min(first + local, self.num_examples)))
      yield self._submit(index, None, pad_to=local)

  def _stream(self, jobs: Iterator) -> Iterator[dict[str, np.ndarray]]:
    return self._prefetched(self._assemble(jobs))

  def _assemble(self, jobs: Iterator) -> Iterator[dict[str, np.ndarray]]:
    """Keeps `_IN_FLIGHT` batches submitted; yields them in order, complete."""
    return prefetch.completed_in_order(jobs, _IN_FLIGHT)

  def _submit(self, index: list[int], epochs: list[int] | None, *,
              pad_to: int | None = None):
    """Starts decoding a batch: (arrays being filled, their futures)."""
    size, real = self.image_size, len(index)
    n = real if pad_to is None else pad_to
    batch = {'image': np.empty((n, size, size, 3), np.uint8),
             'label': np.empty((n,), np.int32)}
    batch['image'][real:] = 0
    batch['label'][real:] = 0
    if epochs is None:
      batch['mask'] = np.arange(n) < real
    pool = self._executor()
    futures = [pool.submit(self._fill, batch, j, i,
                           None if epochs is None else epochs[j])
               for j, i in enumerate(index)]
    return batch, futures

  def _fill(self, batch, j: int, index: int, epoch: int | None) -> None:
    data, label, where = self.read(index)
    if epoch is None:
      batch['image'][j] = eval_image(data, where, self.image_size)
    else:
      rng = np.random.default_rng([self.seed, epoch, index, 1])
      batch['image'][j] = train_image(data, where, self.image_size, rng)
    batch['label'][j] = label

