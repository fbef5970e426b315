"""ImageNet readers: JPEG folders, the MLPerf reference TFRecords, TFDS shards.

Every reader yields the same batches: uint8 images of image_size^2 x 3 and
int32 labels. Training order and augmentation are a deterministic function of
(seed, step), so a run resumed at step k sees exactly the batches it would
have seen; decoding runs in a thread pool (Pillow releases the GIL) and
batches are prepared ahead of the consumer by a background thread.

Preprocessing follows the MLPerf ResNet-50 reference: for training, a random
crop covering 5%-100% of the image with aspect ratio in [3/4, 4/3] (up to 100
attempts, else the whole image), resized to image_size, then a horizontal flip
with probability 1/2; for evaluation, the shorter side resized to
image_size * 256/224 and a central image_size crop. Mean subtraction happens on
device, in the model.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import os
import queue
import re
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from jaxperf.data import tfrecord
from jaxperf.errors import DataError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')

# ---------------------------------------------------------------- preprocessing


def decode(data: bytes, where: str) -> Image.Image:
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert('RGB')
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'corrupt image {where}: cannot be decoded '
                    f'({type(e).__name__}: {e})') from None


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        area=(0.05, 1.0), ratio=(0.75, 4 / 3),
                        attempts: int = 100) -> Image.Image:
  """The reference's distorted bounding box crop with the whole image as box:
  area fraction uniform in `area`, aspect ratio log-uniform in `ratio`."""
  w, h = img.size
  for _ in range(attempts):
    target = rng.uniform(*area) * w * h
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x = int(rng.integers(0, w - cw + 1))
      y = int(rng.integers(0, h - ch + 1))
      return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
  return img.resize((size, size), Image.BILINEAR)


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """Shorter side to round(size * 256 / 224), then the central size x size."""
  short = int(round(size * 256 / 224))
  w, h = img.size
  scale = short / min(w, h)
  nw, nh = max(int(round(w * scale)), size), max(int(round(h * scale)), size)
  img = img.resize((nw, nh), Image.BILINEAR)
  x, y = (nw - size) // 2, (nh - size) // 2
  return img.crop((x, y, x + size, y + size))


def train_image(data: bytes, where: str, size: int,
                rng: np.random.Generator) -> np.ndarray:
  img = random_resized_crop(decode(data, where), size, rng)
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(img, np.uint8)


def eval_image(data: bytes, where: str, size: int) -> np.ndarray:
  return np.asarray(center_crop(decode(data, where), size), np.uint8)


# ---------------------------------------------------------------- record sources


class FolderRecords:
  """split/<class>/<image> files; class ids from the sorted class names."""

  def __init__(self, split_dir: str, classes: Sequence[str] | None = None):
    if not os.path.isdir(split_dir):
      raise DataError(f'{split_dir}: no such directory (expected ImageNet '
                      f'folder layout <split>/<wnid>/*.JPEG)')
    found = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)))
    if not found:
      raise DataError(f'{split_dir}: no class directories (expected '
                      f'<wnid>/*.JPEG inside)')
    self.classes = list(classes) if classes is not None else found
    index = {c: i for i, c in enumerate(self.classes)}
    unknown = [c for c in found if c not in index]
    if unknown:
      raise DataError(f'{split_dir}: class directories not in the training '
                      f'classes: {unknown[:5]}')
    paths, labels = [], []
    for c in found:
      files = sorted(f for f in os.listdir(os.path.join(split_dir, c))
                     if f.lower().endswith(IMAGE_EXTENSIONS))
      if not files:
        raise DataError(f'{os.path.join(split_dir, c)}: no images (expected '
                        f'*.JPEG files)')
      paths += [os.path.join(split_dir, c, f) for f in files]
      labels += [index[c]] * len(files)
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)
    self.num_classes = len(self.classes)

  def __len__(self):
    return len(self.paths)

  def read(self, i: int) -> tuple[bytes, int, str]:
    path = self.paths[i]
    try:
      with open(path, 'rb') as f:
        return f.read(), int(self.labels[i]), path
    except OSError as e:
      raise DataError(f'{path}: cannot be read ({e})') from None


class TFRecordRecords:
  """Examples in TFRecord shards: the MLPerf reference's or TFDS's."""

  def __init__(self, files: Sequence[str], *, image_key: str, label_key: str,
               label_offset: int, num_classes: int = 1000):
    if not files:
      raise DataError('no TFRecord files given')
    self.files = list(files)
    self.image_key, self.label_key = image_key, label_key
    self.label_offset = label_offset
    self.num_classes = num_classes
    idx = [(i, off, n) for i, path in enumerate(self.files)
           for off, n in tfrecord.index_records(path)]
    if not idx:
      raise DataError(f'{os.path.dirname(self.files[0])}: the TFRecord files '
                      f'hold no records')
    self.index = np.asarray(idx, np.int64)
    self._local = threading.local()

  def __len__(self):
    return len(self.index)

  def _handle(self, file_id: int):
    handles = getattr(self._local, 'handles', None)
    if handles is None:
      handles = self._local.handles = {}
    if file_id not in handles:
      handles[file_id] = open(self.files[file_id], 'rb')
    return handles[file_id]

  def read(self, i: int) -> tuple[bytes, int, str]:
    file_id, offset, length = (int(v) for v in self.index[i])
    path = self.files[file_id]
    where = f'{path} (record at byte {offset})'
    data = tfrecord.read_record(self._handle(file_id), path, offset, length)
    try:
      ex = tfrecord.parse_example(data)
    except ValueError as e:
      raise DataError(f'{where}: not a tf.train.Example ({e})') from None
    if self.image_key not in ex or self.label_key not in ex:
      raise DataError(f'{where}: expected features {self.image_key!r} and '
                      f'{self.label_key!r}, found {sorted(ex)}')
    label = int(ex[self.label_key][0]) + self.label_offset
    if not 0 <= label < self.num_classes:
      raise DataError(
          f'{where}: stored label {label - self.label_offset} gives class '
          f'{label}, outside [0, {self.num_classes}) (this layout stores '
          f'labels {"1-based" if self.label_offset == -1 else "0-based"})')
    return ex[self.image_key][0], label, where


# ---------------------------------------------------------------- datasets


def _background(gen: Iterator, depth: int, stop: threading.Event) -> Iterator:
  """Runs `gen` in a thread, `depth` items ahead; re-raises its errors."""
  q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
  done = object()

  def work():
    try:
      for item in gen:
        while not stop.is_set():
          try:
            q.put((True, item), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      q.put((True, done))
    except BaseException as e:  # pylint: disable=broad-except
      q.put((False, e))

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  while True:
    ok, item = q.get()
    if not ok:
      raise item
    if item is done:
      return
    yield item


class ImageDataset:
  """Batches of decoded, preprocessed images from a record source."""

  def __init__(self, records, *, image_size: int, seed: int = 0,
               num_workers: int = 8, prefetch: int = 2):
    self.records = records
    self.num_examples = len(records)
    self.num_classes = records.num_classes
    self.image_size = image_size
    self.seed = seed
    self.prefetch = prefetch
    self._pool = concurrent.futures.ThreadPoolExecutor(max(num_workers, 1))
    self._stop = threading.Event()

  def _train_gen(self, start_step, global_batch, process_index, process_count):
    local = _local_size(global_batch, process_count)
    n = self.num_examples
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while not self._stop.is_set():
      slots = step * global_batch + process_index * local + np.arange(local)
      epochs, pos = slots // n, slots % n
      index = np.empty_like(slots)
      for e in np.unique(epochs):
        e = int(e)
        if e not in perms:
          for old in [k for k in perms if k < e]:
            del perms[old]
          perms[e] = np.random.default_rng([self.seed, e]).permutation(n)
        sel = epochs == e
        index[sel] = perms[e][pos[sel]]
      images = []
      labels = []
      futures = [self._pool.submit(self._read_train, int(index[j]),
                                   int(epochs[j])) for j in range(local)]
      for fut in futures:
        img, label = fut.result()
        images.append(img)
        labels.append(label)
      yield {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}
      step += 1

  def _read_train(self, i: int, epoch: int):
    data, label, where = self.records.read(i)
    rng = np.random.default_rng([self.seed, epoch, i, 1])
    return train_image(data, where, self.image_size, rng), label

  def _read_eval(self, i: int):
    data, label, where = self.records.read(i)
    return eval_image(data, where, self.image_size), label

  def _eval_gen(self, global_batch, process_index, process_count):
    local = _local_size(global_batch, process_count)
    for start in range(0, self.num_examples, global_batch):
      slots = start + process_index * local + np.arange(local)
      mask = slots < self.num_examples
      futures = [self._pool.submit(self._read_eval, int(s) if m else 0)
                 for s, m in zip(slots, mask)]
      images, labels = zip(*(f.result() for f in futures))
      yield {'image': np.stack(images),
             'label': np.asarray(labels, np.int32) * mask,
             'mask': mask}

  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    return _background(self._train_gen(start_step, global_batch, process_index,
                                       process_count), self.prefetch, self._stop)

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    return _background(self._eval_gen(global_batch, process_index,
                                      process_count), self.prefetch, self._stop)

  def close(self) -> None:
    self._stop.set()
    self._pool.shutdown(wait=False, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _local_size(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise DataError(f'global batch {global_batch} does not split over '
                    f'{process_count} processes')
  return global_batch // process_count


# ---------------------------------------------------------------- detection

_MLPERF_TRAIN = re.compile(r'^train-\d{5}-of-\d{5}$')
_MLPERF_VAL = re.compile(r'^validation-\d{5}-of-\d{5}$')
_TFDS_TRAIN = re.compile(r'^imagenet2012-train\.tfrecord-\d{5}-of-\d{5}$')
_TFDS_VAL = re.compile(r'^imagenet2012-validation\.tfrecord-\d{5}-of-\d{5}$')


def _matching(directory: str, pattern: re.Pattern) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if pattern.match(f))


def open_imagenet(data_dir: str, *, image_size: int, seed: int,
                  num_workers: int = 8, prefetch: int = 2,
                  num_classes: int = 1000) -> tuple[ImageDataset, ImageDataset]:
  """(train, eval) datasets from whichever ImageNet layout `data_dir` holds.

  Folders define their classes; TFRecord labels are checked against
  `num_classes`.
  """
  if not os.path.isdir(data_dir):
    raise DataError(f'--data-dir {data_dir}: no such directory')
  entries = os.listdir(data_dir)
  if not entries:
    raise DataError(f'--data-dir {data_dir}: the directory is empty')
  kw = dict(image_size=image_size, seed=seed, num_workers=num_workers,
            prefetch=prefetch)
  if os.path.isdir(os.path.join(data_dir, 'train')):
    val = next((os.path.join(data_dir, v) for v in ('val', 'validation')
                if os.path.isdir(os.path.join(data_dir, v))), None)
    if val is None:
      raise DataError(f'--data-dir {data_dir}: has train/ but no val/ '
                      f'(expected val/<wnid>/*.JPEG)')
    train = FolderRecords(os.path.join(data_dir, 'train'))
    evals = FolderRecords(val, classes=train.classes)
    return ImageDataset(train, **kw), ImageDataset(evals, **kw)
  # TFDS keeps shards in a version subdirectory (imagenet2012/5.1.0/).
  candidates = [data_dir] + sorted(
      (os.path.join(root, d) for root, dirs, _ in os.walk(data_dir)
       for d in dirs), reverse=True)
  for directory in candidates:
    for tr, va, spec in ((_MLPERF_TRAIN, _MLPERF_VAL,
                          dict(image_key='image/encoded',
                               label_key='image/class/label', label_offset=-1)),
                         (_TFDS_TRAIN, _TFDS_VAL,
                          dict(image_key='image', label_key='label',
                               label_offset=0))):
      train_files = _matching(directory, tr)
      if train_files:
        val_files = _matching(directory, va)
        if not val_files:
          raise DataError(f'{directory}: training TFRecords but no validation '
                          f'shards ({va.pattern})')
        return (ImageDataset(TFRecordRecords(train_files, **spec,
                                             num_classes=num_classes), **kw),
                ImageDataset(TFRecordRecords(val_files, **spec,
                                             num_classes=num_classes), **kw))
  raise DataError(
      f'--data-dir {data_dir}: no ImageNet found. Expected one of: '
      f'train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; MLPerf TFRecords '
      f'train-00000-of-01024 ... and validation-00000-of-00128 ...; or TFDS '
      f'imagenet2012-train.tfrecord-00000-of-01024 ... (e.g. in '
      f'imagenet2012/5.1.0/)')

