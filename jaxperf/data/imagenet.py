"""ImageNet (ILSVRC-2012) in its three common on-disk layouts.

* JPEG folders: root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG
  (`ImageFolderDataset`); class ids are the sorted wnids of train/.
* The MLPerf reference's TFRecords: root/train-00000-of-01024 ... and
  root/validation-00000-of-00128 ... (any shard counts).
* TFDS imagenet2012 prepared shards: imagenet2012-train.tfrecord-00000-of-01024
  ... and imagenet2012-validation.tfrecord-..., in the given directory or its
  version subdirectory (imagenet2012/5.1.0/).

`open_imagenet` finds which one a directory holds and returns the training
and evaluation datasets; all share the batch streams of
`jaxperf.data.augment.ImageDataset`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import numpy as np

from jaxperf.data.augment import ImageDataset
from jaxperf.data.tfrecord import MLPERF_LAYOUT, TFDS_LAYOUT, TFRecordImageNet
from jaxperf.errors import DataError

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png')
_SPLIT_DIRS = {'train': ('train',), 'val': ('val', 'validation'),
               'validation': ('val', 'validation')}
_FOLDER_LAYOUT = 'train/<wnid>/*.JPEG and val/<wnid>/*.JPEG'


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  with os.scandir(path) as it:
    return sorted(e.name for e in it
                  if e.is_dir() and not e.name.startswith('.'))


class ImageFolderDataset(ImageDataset):
  """Images in root/<split>/<wnid>/ folders (.JPEG/.jpg/.jpeg/.png, any case).

  Examples are ordered by class folder name, then file name. Class ids index
  `classes` if given, else the sorted class folders of root/train (or of the
  split itself when there is no train/).
  """

  def __init__(self, root: str | os.PathLike, split: str, *, image_size: int,
               seed: int = 0, num_workers: int = 8, prefetch: int = 2,
               classes: Sequence[str] | None = None):
    root = os.fspath(root)
    if split not in _SPLIT_DIRS:
      raise ValueError(f'split must be one of {sorted(_SPLIT_DIRS)}, got '
                       f'{split!r}')
    if not os.path.isdir(root):
      raise DataError(f'{root}: no such directory (expected the ImageNet '
                      f'folder layout {_FOLDER_LAYOUT})')
    names = _SPLIT_DIRS[split]
    split_dir = next((os.path.join(root, n) for n in names
                      if os.path.isdir(os.path.join(root, n))), None)
    if split_dir is None:
      raise DataError(f'{root}: no {" or ".join(n + "/" for n in names)} '
                      f'directory (expected the ImageNet folder layout '
                      f'{_FOLDER_LAYOUT})')
    self.root, self.split_dir = root, split_dir
    found = _subdirs(split_dir)
    with os.scandir(split_dir) as it:
      loose = sorted(e.name for e in it if e.is_file() and _is_image(e.name))
    if loose:
      raise DataError(
          f'{split_dir}: holds image files directly ({loose[0]}, ... '
          f'{len(loose)} in all); expected them sorted into class folders '
          f'{split_dir}/<wnid>/')
    if not found:
      raise DataError(f'{split_dir}: no class directories (expected '
                      f'{split_dir}/<wnid>/*.JPEG)')
    if classes is None:
      train_dir = os.path.join(root, 'train')
      classes = _subdirs(train_dir) if os.path.isdir(train_dir) else found
    self.classes = list(classes)
    ids = {c: i for i, c in enumerate(self.classes)}
    unknown = [c for c in found if c not in ids]
    if unknown:
      raise DataError(
          f'{split_dir}: class directories not among the {len(self.classes)} '
          f'training classes: {", ".join(unknown[:5])}'
          f'{" ..." if len(unknown) > 5 else ""} (expected the wnid folders '
          f'of train/)')
    paths: list[str] = []
    labels: list[int] = []
    for c in found:
      class_dir = os.path.join(split_dir, c)
      with os.scandir(class_dir) as it:
        entries = sorted((e.name, e.is_file()) for e in it
                         if not e.name.startswith('.'))
      others = [n for n, is_file in entries if not (is_file and _is_image(n))]
      if others:
        raise DataError(
            f'{os.path.join(class_dir, others[0])}: not an image file '
            f'(expected only {"/".join(IMAGE_EXTENSIONS)} files in '
            f'{class_dir})')
      if not entries:
        raise DataError(f'{class_dir}: no images (expected '
                        f'{class_dir}/*.JPEG)')
      paths += [os.path.join(class_dir, n) for n, _ in entries]
      labels += [ids[c]] * len(entries)
    self.paths = paths
    self.labels = np.asarray(labels, np.int32)
    super().__init__(len(paths), len(self.classes), image_size=image_size,
                     seed=seed, num_workers=num_workers, prefetch=prefetch)

  def read(self, index: int) -> tuple[bytes, int, str]:
    path = self.paths[index]
    try:
      with open(path, 'rb') as f:
        return f.read(), int(self.labels[index]), path
    except OSError as e:
      raise DataError(f'{path}: cannot be read ({e})') from None


# ---------------------------------------------------------------- detection

_MLPERF = (re.compile(r'^train-(\d+)-of-(\d+)$'),
           re.compile(r'^validation-(\d+)-of-(\d+)$'))
_TFDS = (re.compile(r'^imagenet2012-train\.tfrecord-(\d+)-of-(\d+)$'),
         re.compile(r'^imagenet2012-validation\.tfrecord-(\d+)-of-(\d+)$'))
_VERSION = re.compile(r'^\d+\.\d+\.\d+$')

_EXPECTED = (
    'expected one of: JPEG folders train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; '
    'the MLPerf reference TFRecords train-00000-of-01024 ... and '
    'validation-00000-of-00128 ...; or TFDS imagenet2012 shards '
    'imagenet2012-train.tfrecord-00000-of-01024 ... and '
    'imagenet2012-validation.tfrecord-... (in the directory itself, in a '
    'version subdirectory such as 5.1.0/, or in imagenet2012/<version>/)')


def _shards(directory: str, pattern: re.Pattern) -> list[str]:
  """The files of `directory` matching `pattern`, checked to be a full set."""
  with os.scandir(directory) as it:
    matches = sorted((e.name, pattern.match(e.name)) for e in it
                     if e.is_file() and pattern.match(e.name))
  if not matches:
    return []
  totals = sorted({int(m.group(2)) for _, m in matches})
  if len(totals) > 1:
    raise DataError(f'{directory}: shards of different sets ('
                    f'{", ".join(f"-of-{t:05d}" for t in totals)}); expected '
                    f'one complete set')
  total = totals[0]
  have = {int(m.group(1)) for _, m in matches}
  missing = sorted(set(range(total)) - have)
  extra = sorted(i for i in have if i >= total)
  if missing or extra:
    example = matches[0][0]
    detail = (f'missing shard numbers {missing[:5]}'
              f'{" ..." if len(missing) > 5 else ""}' if missing
              else f'shard numbers {extra[:5]} out of range')
    raise DataError(f'{directory}: incomplete shard set like {example}: '
                    f'{detail} (expected {total} shards numbered 0 to '
                    f'{total - 1})')
  return [os.path.join(directory, name) for name, _ in matches]


def _tfds_candidates(data_dir: str) -> list[str]:
  """data_dir, its version subdirectories, then imagenet2012/<version>/, newest
  version first."""
  def versions(d: str) -> list[str]:
    if not os.path.isdir(d):
      return []
    vs = [v for v in _subdirs(d) if _VERSION.match(v)]
    vs.sort(key=lambda v: tuple(int(x) for x in v.split('.')), reverse=True)
    return [os.path.join(d, v) for v in vs]
  return ([data_dir] + versions(data_dir)
          + versions(os.path.join(data_dir, 'imagenet2012')))


def _tfrecord_pair(directory: str, patterns, what: str
                   ) -> tuple[list[str], list[str]] | None:
  train = _shards(directory, patterns[0])
  val = _shards(directory, patterns[1])
  if not train and not val:
    return None
  if not train or not val:
    have, lack = ('training', 'validation') if train else ('validation',
                                                          'training')
    raise DataError(f'{directory}: {what} {have} shards but no {lack} '
                    f'shards (expected {patterns[1 if train else 0].pattern})')
  return train, val


def find_imagenet(data_dir: str | os.PathLike
                  ) -> tuple[str, str | list[str], str | list[str]]:
  """(layout, train, val): 'folder' with the root twice, or 'mlperf'/'tfds'
  with the train and validation shard lists. DataError if none is found."""
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'--data-dir {data_dir}: no such directory ({_EXPECTED})')
  with os.scandir(data_dir) as it:
    if next(it, None) is None:
      raise DataError(f'--data-dir {data_dir}: the directory is empty '
                      f'({_EXPECTED})')
  if os.path.isdir(os.path.join(data_dir, 'train')):
    if not any(os.path.isdir(os.path.join(data_dir, v))
               for v in _SPLIT_DIRS['val']):
      raise DataError(f'--data-dir {data_dir}: has train/ but no val/ '
                      f'(expected the ImageNet folder layout {_FOLDER_LAYOUT})')
    return 'folder', data_dir, data_dir
  val_dir = next((v for v in _SPLIT_DIRS['val']
                  if os.path.isdir(os.path.join(data_dir, v))), None)
  if val_dir is not None:
    raise DataError(f'--data-dir {data_dir}: has {val_dir}/ but no train/ '
                    f'(expected the ImageNet folder layout {_FOLDER_LAYOUT})')
  pair = _tfrecord_pair(data_dir, _MLPERF, 'MLPerf reference TFRecord')
  if pair:
    return 'mlperf', *pair
  for directory in _tfds_candidates(data_dir):
    pair = _tfrecord_pair(directory, _TFDS, 'TFDS imagenet2012')
    if pair:
      return 'tfds', *pair
  raise DataError(f'--data-dir {data_dir}: no ImageNet found; {_EXPECTED}')


def open_imagenet(data_dir: str | os.PathLike, *, image_size: int,
                  seed: int = 0, num_workers: int = 8, prefetch: int = 2,
                  num_classes: int = 1000
                  ) -> tuple[ImageDataset, ImageDataset]:
  """(train, eval) datasets from whichever ImageNet layout `data_dir` holds.

  Folder layouts define their classes (train/'s wnids); TFRecord labels are
  checked against `num_classes` as examples are read.
  """
  layout, train, val = find_imagenet(data_dir)
  kw = dict(image_size=image_size, seed=seed, num_workers=num_workers,
            prefetch=prefetch)
  if layout == 'folder':
    train_ds = ImageFolderDataset(train, 'train', **kw)
    try:
      return train_ds, ImageFolderDataset(val, 'val', classes=train_ds.classes,
                                          **kw)
    except BaseException:
      train_ds.close()
      raise
  keys = MLPERF_LAYOUT if layout == 'mlperf' else TFDS_LAYOUT
  train_ds = TFRecordImageNet(train, num_classes=num_classes, **keys, **kw)
  try:
    return train_ds, TFRecordImageNet(val, num_classes=num_classes, **keys,
                                      **kw)
  except BaseException:
    train_ds.close()
    raise
