"""COCO-format annotation files, as the detection data layers read them.

OpenImages (RetinaNet, `jaxperf.data.openimages`) and COCO 2017 (Mask R-CNN,
`jaxperf.data.coco`) both come as a JSON object holding `images` [{id,
file_name, width, height}], `annotations` [{id, image_id, category_id, bbox
[x, y, w, h] in pixels, ...}] and `categories` [{id, ...}], with the image
files under a directory. This module holds what the two readers check alike,
each failure a DataError naming the file and what was expected:

* `load_json`: the file is a JSON object.
* `parse_split`: `images`, `annotations` and `categories` are lists of
  objects with the keys asked for; there are images and categories; category
  ids are distinct integers; images have distinct integer ids, a file name
  and positive integer sizes. Images come out in the order of their ids.
* `CocoSplit`'s methods: each annotation's image is known (`positions`), its
  category is known (`category_indices`, with the reader's own category ->
  index map) and its bbox is 4 finite numbers (`bboxes`); `check_inside`
  reports the first box a reader's own rule finds outside its image.
* `check_files`: the images are files under the images directory.

What a reader makes of a split stays with it: the order and numbering of
categories, the box convention and tolerance, which images it keeps.

`write_split` writes a split (the image files and the JSON) and
`encode_jpeg` the JPEGs it writes from pixels.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxperf.errors import DataError

IMAGE_KEYS = ('id', 'file_name', 'width', 'height')
JPEG_QUALITY = 95

# Missing files named in an error at most.
_NAME_LIMIT = 5


def fail(path: str, message: str) -> DataError:
  """A DataError about the file at `path`."""
  return DataError(f'{path}: {message}')


def is_int(x: Any) -> bool:
  """Whether `x` is a Python integer (bools excluded)."""
  return isinstance(x, int) and not isinstance(x, bool)


def lookup(table: Mapping[Any, int], key: Any) -> int:
  """table[key], or -1 if it is not there (or not a valid key)."""
  try:
    return table.get(key, -1)
  except TypeError:
    return -1


def load_json(path: str) -> dict[str, Any]:
  """The JSON object at `path`; DataError if it cannot be read or is not
  one."""
  try:
    with open(path, encoding='utf-8') as f:
      js = json.load(f)
  except json.JSONDecodeError as e:
    raise fail(path, f'malformed JSON at line {e.lineno} column {e.colno} '
                     f'({e.msg}); expected COCO-format annotations') from None
  except (OSError, UnicodeDecodeError) as e:
    raise fail(path, f'cannot be read ({e})') from None
  if not isinstance(js, dict):
    raise fail(path, f'holds a JSON {type(js).__name__}; expected an object '
                     f'with images, annotations and categories')
  return js


def _list_field(js: Mapping[str, Any], key: str, path: str) -> list:
  value = js.get(key)
  if not isinstance(value, list):
    what = 'missing' if value is None else f'a {type(value).__name__}'
    raise fail(path, f'"{key}" is {what}; expected a list (COCO format: '
                     f'images, annotations and categories)')
  return value


def _check_entries(entries: list, keys: Sequence[str], what: str,
                   path: str) -> None:
  """Every entry a dict holding `keys`; DataError naming the first not."""
  for k, e in enumerate(entries):
    if not isinstance(e, dict) or any(key not in e for key in keys):
      if isinstance(e, dict):
        ident = f' (id {e["id"]})' if 'id' in e else ''
        detail = f'lacks {", ".join(k for k in keys if k not in e)}'
      else:
        ident, detail = '', f'is a {type(e).__name__}'
      raise fail(path, f'{what} #{k}{ident} {detail}; expected objects with '
                       f'{", ".join(keys)}')


@dataclasses.dataclass(frozen=True)
class CocoSplit:
  """A COCO-format split whose structure, categories and images are checked.

  Attributes:
    path: the JSON's path, named in errors.
    images_dir: the directory the images' file names are relative to.
    annotations: the JSON's annotations as listed, each a dict with the keys
      `parse_split` was given (their values unchecked).
    category_ids: the categories' ids in the JSON's order: distinct
      integers.
    image_ids: the images' ids, ascending: distinct integers.
    files: the images' file names, in the order of `image_ids`.
    widths: int64 [n], the images' widths, in that order.
    heights: int64 [n], their heights.
  """
  path: str
  images_dir: str
  annotations: list
  category_ids: list[int]
  image_ids: list[int]
  files: list[str]
  widths: np.ndarray
  heights: np.ndarray

  def positions(self) -> np.ndarray:
    """int64 [m]: each annotation's image, its position in `image_ids`;
    DataError naming the first annotation of an unknown image."""
    anns = self.annotations
    position = {i: k for k, i in enumerate(self.image_ids)}
    pos = np.asarray([lookup(position, a['image_id']) for a in anns],
                     np.int64)
    if len(anns) and pos.min() < 0:
      a = anns[int(np.argmax(pos < 0))]
      raise fail(self.path, f'annotation {a["id"]} refers to image_id '
                            f'{a["image_id"]!r}, which is not in "images"')
    return pos

  def category_indices(self, index_of: Mapping[int, int],
                       image: Callable[[int], str]) -> np.ndarray:
    """int64 [m]: index_of[category_id] of each annotation; DataError
    naming the first of an unknown category and its image, `image(k)` for
    annotation k."""
    anns = self.annotations
    out = np.asarray([lookup(index_of, a['category_id']) for a in anns],
                     np.int64)
    if len(anns) and out.min() < 0:
      k = int(np.argmax(out < 0))
      ids = self.category_ids
      shown = ids if len(ids) <= 10 else f'{ids[:10]} ...'
      raise fail(self.path, f'annotation {anns[k]["id"]} (image {image(k)}) '
                            f'has category_id {anns[k]["category_id"]!r}, '
                            f'which is not in "categories" (ids {shown})')
    return out

  def bboxes(self, pos: np.ndarray) -> np.ndarray:
    """The annotations' bboxes, float64 [m, 4] (x, y, w, h); DataError
    naming the first that is not 4 finite numbers. pos: `positions()`."""
    anns = self.annotations
    m = len(anns)
    try:
      xywh = np.array([a['bbox'] for a in anns])
    except ValueError:          # ragged
      xywh = None
    if (xywh is not None and xywh.shape == (m, 4) and xywh.dtype.kind in 'iuf'
        and np.isfinite(xywh).all()):
      return xywh.astype(np.float64)
    if m == 0:
      return np.zeros((0, 4), np.float64)
    for k, a in enumerate(anns):
      b = a['bbox']
      if (not isinstance(b, list) or len(b) != 4 or not all(
          isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v) for v in b)):
        raise fail(self.path, f'annotation {a["id"]} (image '
                              f'{self.files[pos[k]]}): bbox {b!r}; expected '
                              f'[x, y, width, height], 4 finite numbers in '
                              f'pixels')
    # Every bbox is 4 finite numbers (e.g. huge integers numpy kept as
    # objects).
    return np.asarray([a['bbox'] for a in anns], np.float64)

  def check_inside(self, outside: np.ndarray, pos: np.ndarray,
                   tolerance: float) -> None:
    """DataError naming the first annotation whose box is `outside` its
    image (by the reader's rule, within `tolerance` pixels)."""
    if not outside.any():
      return
    k = int(np.argmax(outside))
    a, i = self.annotations[k], pos[k]
    raise fail(
        self.path, f'annotation {a["id"]} of image '
                   f'{os.path.join(self.images_dir, self.files[i])}: bbox '
                   f'{a["bbox"]} ([x, y, w, h]) reaches outside the '
                   f'{int(self.widths[i])}x{int(self.heights[i])} (width x '
                   f'height) image; expected it inside, give or take '
                   f'{tolerance:g} pixel')


def parse_split(js: Mapping[str, Any], path: str, images_dir: str,
                annotation_keys: Sequence[str]) -> CocoSplit:
  """Checks a COCO-format dict's structure, categories and images.

  Args:
    js: the JSON object (`load_json`).
    path: the JSON's path, named in errors.
    images_dir: the directory of the images, named in errors.
    annotation_keys: the keys every annotation must hold.

  Returns:
    The split, its images in the order of their ids.

  Raises:
    DataError: naming the first problem (see the module docstring).
  """
  images = _list_field(js, 'images', path)
  anns = _list_field(js, 'annotations', path)
  cats = _list_field(js, 'categories', path)
  _check_entries(images, IMAGE_KEYS, 'image', path)
  _check_entries(anns, annotation_keys, 'annotation', path)
  _check_entries(cats, ('id',), 'category', path)
  if not images:
    raise fail(path, 'no images')
  if not cats:
    raise fail(path, 'no categories')

  category_ids = []
  seen = set()
  for c in cats:
    if not is_int(c['id']):
      raise fail(path, f'category id {c["id"]!r}; expected an integer')
    category_ids.append(c['id'])
  for c in category_ids:
    if c in seen:
      raise fail(path, f'category id {c} appears more than once')
    seen.add(c)

  for e in images:
    if not is_int(e['id']):
      raise fail(path, f'image id {e["id"]!r}; expected an integer')
    name, w, h = e['file_name'], e['width'], e['height']
    if not isinstance(name, str) or not name:
      raise fail(path, f'image {e["id"]}: file_name {name!r}; expected a '
                       f'file name under {images_dir}')
    if not (is_int(w) and is_int(h) and w > 0 and h > 0):
      raise fail(path, f'image {e["id"]} ({name}): width {w!r} and height '
                       f'{h!r}; expected positive integers')
  images = sorted(images, key=lambda e: e['id'])
  image_ids = [e['id'] for e in images]
  for a, b in zip(image_ids, image_ids[1:]):
    if a == b:
      raise fail(path, f'image id {a} appears more than once')
  return CocoSplit(
      path=path, images_dir=images_dir, annotations=anns,
      category_ids=category_ids, image_ids=image_ids,
      files=[e['file_name'] for e in images],
      widths=np.asarray([e['width'] for e in images], np.int64),
      heights=np.asarray([e['height'] for e in images], np.int64))


def check_files(images: Sequence[str], images_dir: str, path: str,
                which: str) -> None:
  """Every one of `images` (paths under images_dir) must be a file.

  Args:
    images: the image paths, images_dir joined with the file names.
    images_dir: their directory, listed once.
    path: the JSON's path, named in the error.
    which: how the images relate to the JSON, in the error: e.g. 'listed in'
      ('N of the M images listed in <path> are missing').

  Raises:
    DataError: naming images_dir, how many are missing and the first few.
  """
  try:
    listed = set(os.listdir(images_dir))
  except OSError as e:
    raise DataError(f'{images_dir}: cannot be listed ({e})') from None
  top = images_dir.rstrip(os.sep)
  missing = [p for p in images if not (
      os.path.basename(p) in listed if os.path.dirname(p) == top else
      os.path.isfile(p))]
  if missing:
    shown = ', '.join(os.path.relpath(p, images_dir)
                      for p in missing[:_NAME_LIMIT])
    more = ' ...' if len(missing) > _NAME_LIMIT else ''
    raise DataError(
        f'{images_dir}: {len(missing)} of the {len(images)} images {which} '
        f'{path} are missing: {shown}{more} (expected each image at '
        f'{images_dir}/<file_name>)')


# ---------------------------------------------------------------- writing


def encode_jpeg(pixels: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
  """uint8 [h, w, 3] pixels as JPEG bytes (no chroma subsampling, which
  would smear the edges of small saturated objects)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(
      buf, format='JPEG', quality=quality, subsampling=0)
  return buf.getvalue()


def write_split(images_dir: str, path: str,
                images: Sequence[Mapping[str, Any]],
                annotations: Sequence[Mapping[str, Any]],
                categories: Sequence[Mapping[str, Any]]) -> str:
  """Writes the images under images_dir and the JSON to path; returns path.

  Args:
    images_dir: where the image files go (created if need be).
    path: the JSON's path (its directory created if need be).
    images: dicts with 'id', 'file_name' and 'image': uint8 [h, w, 3] pixels
      (written by `encode_jpeg`: JPEG, quality 95), raw bytes (written as
      they are) or None (no file written). 'width' and 'height' default to
      the pixels' size (required for bytes or None); give them to write a
      mismatched JSON.
    annotations: written to the JSON as given.
    categories: written to the JSON as given.
  """
  os.makedirs(images_dir, exist_ok=True)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  entries = []
  for e in images:
    pixels = e.get('image')
    entry = {'id': e['id'], 'file_name': e['file_name']}
    target = os.path.join(images_dir, e['file_name'])
    if isinstance(pixels, np.ndarray):
      if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f'image {e["id"]}: expected uint8 [h, w, 3], got '
                         f'{pixels.dtype} {pixels.shape}')
      entry['width'] = int(e.get('width', pixels.shape[1]))
      entry['height'] = int(e.get('height', pixels.shape[0]))
      with open(target, 'wb') as f:
        f.write(encode_jpeg(pixels))
    else:
      entry['width'], entry['height'] = e['width'], e['height']
      if pixels is not None:
        with open(target, 'wb') as f:
          f.write(bytes(pixels))
    entries.append(entry)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'images': entries, 'annotations': list(annotations),
               'categories': list(categories)}, f)
  return path
