"""Tiny ImageNet-like datasets in the real on-disk layouts, for tests.

Every image is a real JPEG whose mean colour is its class's (`class_colour`)
plus per-pixel noise, so a model can learn the label; sizes vary around
`size` (height, width) like ImageNet's. The three writers store the same
examples (same bytes, same labels) in the same order: the JPEG folders'
sorted order, which the TFRecord writers split into consecutive shards. So the
three layouts yield identical batches for the same seed.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxperf.data import tfrecord


class Example(NamedTuple):
  label: int        # 0-based class id
  wnid: str
  filename: str
  jpeg: bytes


def wnid(c: int) -> str:
  """The fixture's class folder name of class `c`: n00000000, n00000001, ..."""
  return f'n{c:08d}'


def class_colour(c: int, num_classes: int) -> np.ndarray:
  """Class `c`'s mean RGB colour: hues evenly spaced around the wheel."""
  rgb = colorsys.hsv_to_rgb(c / num_classes, 0.75, 0.85)
  return np.asarray(rgb) * 200 + 25


def make_jpeg(c: int, num_classes: int, rng: np.random.Generator,
              size: tuple[int, int] = (40, 48)) -> bytes:
  """A JPEG of class `c`: its colour plus noise, up to 8 pixels over `size`."""
  h = size[0] + int(rng.integers(0, 9))
  w = size[1] + int(rng.integers(0, 9))
  pixels = class_colour(c, num_classes) + rng.normal(0, 20, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
      buf, 'JPEG', quality=90)
  return buf.getvalue()


def examples(split: str, num_classes: int = 4, per_class: int = 6,
             size: tuple[int, int] = (40, 48), seed: int = 0
             ) -> list[Example]:
  """The examples of a split ('train' or 'val'), in sorted folder order."""
  out = []
  k = 0
  for c in range(num_classes):
    for i in range(per_class):
      rng = np.random.default_rng([seed, split == 'train', c, i])
      if split == 'train':
        name = f'{wnid(c)}_{i}.JPEG'
      else:
        k += 1
        name = f'ILSVRC2012_val_{k:08d}.JPEG'
      out.append(Example(c, wnid(c), name, make_jpeg(c, num_classes, rng,
                                                     size)))
  return sorted(out, key=lambda e: (e.wnid, e.filename))


def write_jpeg_folder(root, num_classes: int = 4, train_per_class: int = 6,
                      val_per_class: int = 2, size: tuple[int, int] = (40, 48),
                      seed: int = 0) -> Path:
  """Writes root/train/<wnid>/<wnid>_<i>.JPEG and
  root/val/<wnid>/ILSVRC2012_val_<k>.JPEG; returns root."""
  root = Path(root)
  for split, per_class in (('train', train_per_class), ('val', val_per_class)):
    for e in examples(split, num_classes, per_class, size, seed):
      d = root / split / e.wnid
      d.mkdir(parents=True, exist_ok=True)
      (d / e.filename).write_bytes(e.jpeg)
  return root


def _write_shards(directory: Path, name, records: list[dict], shards: int
                  ) -> None:
  """`records` split into `shards` consecutive files named name(k, shards)."""
  bounds = np.linspace(0, len(records), shards + 1).round().astype(int)
  for k in range(shards):
    tfrecord.write_tfrecord(directory / name(k, shards),
                            records[bounds[k]:bounds[k + 1]])


def write_mlperf_tfrecords(root, num_classes: int = 4,
                           train_per_class: int = 6, val_per_class: int = 2,
                           size: tuple[int, int] = (40, 48), seed: int = 0,
                           train_shards: int = 3, val_shards: int = 2) -> Path:
  """The MLPerf reference layout: root/train-%05d-of-%05d and
  root/validation-%05d-of-%05d, labels stored 1-based."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  for split, prefix, per_class, shards in (
      ('train', 'train', train_per_class, train_shards),
      ('val', 'validation', val_per_class, val_shards)):
    records = []
    for e in examples(split, num_classes, per_class, size, seed):
      img = Image.open(io.BytesIO(e.jpeg))
      records.append({
          'image/height': img.height, 'image/width': img.width,
          'image/colorspace': 'RGB', 'image/channels': 3,
          'image/class/label': e.label + 1, 'image/class/synset': e.wnid,
          'image/class/text': f'class {e.label}', 'image/format': 'JPEG',
          'image/filename': e.filename, 'image/encoded': e.jpeg})
    _write_shards(root, lambda k, n, p=prefix: f'{p}-{k:05d}-of-{n:05d}',
                  records, shards)
  return root


def write_tfds_tfrecords(root, num_classes: int = 4, train_per_class: int = 6,
                         val_per_class: int = 2,
                         size: tuple[int, int] = (40, 48), seed: int = 0,
                         train_shards: int = 3, val_shards: int = 2,
                         version: str = '5.1.0') -> Path:
  """TFDS imagenet2012 prepared shards in root/imagenet2012/<version>/.

  Returns root/imagenet2012 (the dataset directory, as under
  ~/tensorflow_datasets/).
  """
  d = Path(root) / 'imagenet2012' / version
  d.mkdir(parents=True, exist_ok=True)
  for split, tfds_split, per_class, shards in (
      ('train', 'train', train_per_class, train_shards),
      ('val', 'validation', val_per_class, val_shards)):
    records = [{'file_name': e.filename, 'image': e.jpeg, 'label': e.label}
               for e in examples(split, num_classes, per_class, size, seed)]
    _write_shards(
        d, lambda k, n, s=tfds_split:
        f'imagenet2012-{s}.tfrecord-{k:05d}-of-{n:05d}', records, shards)
  (d / 'dataset_info.json').write_text('{"name": "imagenet2012"}\n')
  return d.parent
