"""Tiny ImageNet-like datasets in the real on-disk formats, for tests.

Each class has its own mean colour (plus noise), so a model can learn the
label from the image. Images have varied sizes, like ImageNet's.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from jaxperf.data import tfrecord


def wnid(c: int) -> str:
  return f'n{c:08d}'


def _colours(num_classes: int) -> np.ndarray:
  return np.random.default_rng(1234).uniform(30, 225, (num_classes, 3))


def make_jpeg(c: int, i: int, num_classes: int, size=(40, 48), seed=0) -> bytes:
  rng = np.random.default_rng([seed, c, i])
  h, w = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
  img = _colours(num_classes)[c] + rng.normal(0, 20, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
      buf, 'JPEG', quality=95)
  return buf.getvalue()


def _examples(num_classes, per_class, size, seed):
  for c in range(num_classes):
    for i in range(per_class):
      yield c, i, make_jpeg(c, i, num_classes, size, seed)


def write_jpeg_folder(root, num_classes=4, train_per_class=6, val_per_class=2,
                      size=(40, 48), seed=0) -> Path:
  root = Path(root)
  for split, per, s in (('train', train_per_class, seed),
                        ('val', val_per_class, seed + 1)):
    for c, i, data in _examples(num_classes, per, size, s):
      d = root / split / wnid(c)
      d.mkdir(parents=True, exist_ok=True)
      (d / f'{wnid(c)}_{i}.JPEG').write_bytes(data)
  return root


def write_mlperf_tfrecords(root, num_classes=4, train_per_class=6,
                           val_per_class=2, size=(40, 48), seed=0,
                           shards=2) -> Path:
  """The reference's layout: train-%05d-of-N, labels stored 1-based."""
  root = Path(root)
  root.mkdir(parents=True, exist_ok=True)
  for split, per, s in (('train', train_per_class, seed),
                        ('validation', val_per_class, seed + 1)):
    ex = [{'image/encoded': data, 'image/class/label': c + 1,
           'image/class/synset': wnid(c), 'image/format': 'JPEG'}
          for c, i, data in _examples(num_classes, per, size, s)]
    for k in range(shards):
      tfrecord.write_examples(str(root / f'{split}-{k:05d}-of-{shards:05d}'),
                              ex[k::shards])
  return root


def write_tfds_tfrecords(root, num_classes=4, train_per_class=6,
                         val_per_class=2, size=(40, 48), seed=0,
                         shards=2) -> Path:
  """TFDS imagenet2012 prepared shards, in a version subdirectory."""
  d = Path(root) / 'imagenet2012' / '5.1.0'
  d.mkdir(parents=True, exist_ok=True)
  for split, per, s in (('train', train_per_class, seed),
                        ('validation', val_per_class, seed + 1)):
    ex = [{'image': data, 'label': c, 'file_name': f'{wnid(c)}_{i}.JPEG'}
          for c, i, data in _examples(num_classes, per, size, s)]
    for k in range(shards):
      tfrecord.write_examples(
          str(d / f'imagenet2012-{split}.tfrecord-{k:05d}-of-{shards:05d}'),
          ex[k::shards])
  return Path(root)
