"""COCO 2017 for Mask R-CNN, and a synthetic stand-in.

On disk, as the MLPerf reference (maskrcnn-benchmark's paths_catalog) reads
it, under a root directory:

    train2017/<file_name>                     JPEG images
    val2017/<file_name>
    annotations/instances_train2017.json      COCO instances JSON
    annotations/instances_val2017.json

The JSON holds `images` [{id, file_name, width, height}], `annotations`
[{id, image_id, category_id, bbox [x, y, w, h], area, iscrowd,
segmentation}] (segmentation: a list of polygons [x1, y1, x2, y2, ...] in
pixels, or run-length encoding {size: [h, w], counts}) and `categories`
[{id, name}].

Reading follows the reference (COCODataset, BoxList, SegmentationMask and
its transforms):

* Images are taken in the order of their ids. The training split drops the
  images without usable annotations (the reference's
  `remove_images_without_annotations`, rule `has_valid_annotation`): those
  with no annotation at all, or whose every box has a side <= 1 pixel
  (crowd annotations count here). The eval split keeps every image.
* Crowd annotations (iscrowd=1) are no targets. Category ids map to labels
  1..C in the order of `categories` in the JSON (pycocotools' getCatIds; the
  COCO files list them sorted by id); 0 is the background.
  `category_ids[label - 1]` maps back.
* Boxes follow the reference's legacy "+1" convention (TO_REMOVE): (x, y, w,
  h) -> (x, y, x + max(w - 1, 0), y + max(h - 1, 0)) in float32, then
  clip_to_image(remove_empty=True): x clamped to [0, width - 1], y to
  [0, height - 1], and boxes with x2 <= x1 or y2 <= y1 dropped with their
  masks (counted in `dropped_boxes`).
* Resize (Resize.get_size): the shorter side to `min_size` (800) unless the
  longer would then exceed `max_size` (1333), in which case the shorter side
  becomes round(max_size * short / long); the other side is
  int(size * long / short). Pixels go through PIL's bilinear resize (as
  torchvision's F.resize on a PIL image), boxes and polygons are scaled by
  (new_w / w, new_h / h) in float32.
* Training flips horizontally with probability `hflip_prob` (0.5), after
  the resize, in the reference's convention: box x1' = W - x2 - 1, x2' = W -
  x1 - 1, polygon x' = W - x - 1 (W the resized width).
* Pixels: ToTensor (uint8 / 255 in float32), then to BGR, times 255, minus
  PIXEL_MEAN [102.9801, 115.9465, 122.7717] (std 1): float32 NHWC here.
  Padding is 0 in that space, as the reference's zero-filled ImageList.

Batches have static shapes. The reference pads each batch to its largest
image rounded up to SIZE_DIVISIBILITY (32) and batches landscape (h < w) and
portrait images (h >= w) apart (GroupedBatchSampler over aspect-ratio
groups). Here each image goes to a bucket, a fixed padded (H, W), and a batch
holds images of one bucket. With min 800, max 1333 and divisibility 32 a
resized landscape image is at most 800 x 1344 (height x width) and a
portrait one 1344 x 800 (`default_buckets`); only images more elongated than
about 22:1 resize to a longer side above 1344. `bucket_grid(step)` gives finer
buckets and `padding_cost` the fraction of padded pixels a choice costs. An
image goes to the smallest bucket it fits (ties: the one of its orientation,
then the first listed); one that fits none is a DataError.

Mask targets: the reference crops each gt polygon to a proposal box and
rasterises it at 28 x 28 (project_masks_on_boxes), on the host. For static
shapes, each gt's mask is rasterised here once, at `mask_resolution` (M, 112)
squared over its own extent ('mask_boxes': the polygons' bounding box, which
is the COCO bbox, one pixel wider than the legacy box); a proposal's target
is then sampled from that crop on device (see `crop_mask_target`, the numpy
version). The two agree to a mean IoU of about 0.987 on random polygons and
proposals with IoU >= 0.5 (about 0.99 with M = 224, the bound set by the
28 x 28 rasterisation itself; 0.981 with M = 56).

Training order: epoch e takes the images in permutation(seed, e); each
bucket's images, in that order, are cut into global batches, the bucket's
last incomplete batch left out (the reference keeps it, as a smaller batch),
and the batches are ordered by the position of their first image in the
permutation (as GroupedBatchSampler orders them). Process p of P takes rows
[p * b, (p + 1) * b) of each global batch, b = global_batch / P, so all of a
global batch shares one bucket. Whether an image is flipped depends on
(seed, epoch, image) only: the stream depends on nothing but the seed and
the step. (The reference shuffles per GPU, each GPU grouping its own share.)
Evaluation reads every image once: bucket by bucket, each bucket's images in
dataset order, each bucket's last batch padded.

Batches (numpy; b rows for this process, (H, W) the batch's bucket, G =
max_boxes, M = mask_resolution):

    train: 'image'       float32 [b, H, W, 3]  BGR minus PIXEL_MEAN, zero
                                               padding right and below
           'image_size'  int32 [b, 2]          resized (h, w) before padding
           'boxes'       float32 [b, G, 4]     (x1, y1, x2, y2), legacy
                                               convention, resized pixels
           'labels'      int32 [b, G]          1..C, 0 padding
           'valid'       bool [b, G]           False on padding
           'mask_crops'  uint8 [b, G, M, M]    each gt's mask (0/1) over
                                               its mask box
           'mask_boxes'  float32 [b, G, 4]     (x1, y1, x2, y2) the crop
                                               covers, resized pixels
    eval:  'image', 'image_size' as above, and
           'index'       int32 [b]             position in the dataset
           'mask'        bool [b]              False on padding rows (all
                                               zero, index 0)

`CocoDataset.to_coco_results` and `to_coco_segm_results` turn predictions
into COCO results to score against `coco_gt` with pycocotools.

API:
  open_coco(data_dir, ...) -> (train, eval) `CocoDataset`s.
  synthetic_coco(num_train, num_eval, ...) -> (train, eval): learnable
      images of coloured polygons with exact masks; write_synthetic_coco
      writes one in the on-disk layout, write_coco_split any split.
  get_size, default_buckets, bucket_grid, parse_buckets, assign_buckets,
  padding_cost,
  has_valid_annotation, legacy_boxes, transform_image, mask_crop,
  polygon_mask_target, crop_mask_target.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from jaxperf.data import coco_format, prefetch
from jaxperf.data.augment import decode_image, local_batch_size
from jaxperf.data.openimages import (
    BOX_TOLERANCE, _SyntheticImage, class_colour, class_shape)
from jaxperf.data.prefetch import PrefetchedStreams
from jaxperf.errors import ConfigError, DataError

MIN_SIZE = 800                  # INPUT.MIN_SIZE_TRAIN / _TEST
MAX_SIZE = 1333                 # INPUT.MAX_SIZE_TRAIN / _TEST
SIZE_DIVISIBILITY = 32          # DATALOADER.SIZE_DIVISIBILITY
PIXEL_MEAN = (102.9801, 115.9465, 122.7717)   # BGR, 0..255
HFLIP_PROB = 0.5
# Ground-truth slots of a batch row; an image with more gts is an error
# naming it.
MAX_BOXES = 100
# Side of each gt's mask crop; 4x the reference's 28x28 targets, so that a
# proposal half the gt's size still samples it finely enough.
MASK_RESOLUTION = 112
TARGET_RESOLUTION = 28          # MODEL.ROI_MASK_HEAD.RESOLUTION
MIN_KEYPOINTS = 10              # the reference's min_keypoints_per_image
TRAIN_SPLIT, EVAL_SPLIT = 'train2017', 'val2017'
ANNOTATIONS_DIR = 'annotations'

_LAYOUT = ('train2017/ and val2017/ (JPEG images) and '
           'annotations/instances_train2017.json, '
           'annotations/instances_val2017.json (COCO instances JSON)')
_ANN_KEYS = ('id', 'image_id', 'category_id', 'bbox', 'area', 'iscrowd',
             'segmentation')
# Seed-sequence tags: keep the streams of different purposes apart.
_ORDER, _FLIP, _SYNTH = 11, 12, 13
_IN_FLIGHT = 2
# Smallest side (pixels) of a mask box, so the crop's scale stays finite.
_MIN_EXTENT = 1e-2
_ELLIPSE_VERTICES = 32

# ---------------------------------------------------------------- sizes


def get_size(width: int, height: int, min_size: int = MIN_SIZE,
             max_size: int | None = MAX_SIZE) -> tuple[int, int]:
  """The reference's Resize.get_size: the resized (height, width)."""
  size = min_size
  if max_size is not None:
    short, long = float(min(width, height)), float(max(width, height))
    if long / short * size > max_size:
      size = int(round(max_size * short / long))
  if (width <= height and width == size) or (height <= width and
                                             height == size):
    return int(height), int(width)
  if width < height:
    return int(size * height / width), int(size)
  return int(size), int(size * width / height)


def _round_up(x: int, d: int) -> int:
  return -(-int(x) // d) * d


def _check_sizes(min_size: int, max_size: int, size_divisibility: int
                 ) -> None:
  if min_size < 1 or max_size < min_size:
    raise ConfigError(f'min_size={min_size}, max_size={max_size}: expected '
                      f'1 <= min_size <= max_size')
  if size_divisibility < 1:
    raise ConfigError(f'size_divisibility must be >= 1, got '
                      f'{size_divisibility}')


def default_buckets(min_size: int = MIN_SIZE, max_size: int = MAX_SIZE,
                    size_divisibility: int = SIZE_DIVISIBILITY
                    ) -> tuple[tuple[int, int], ...]:
  """The two buckets (height, width) that hold every resized image of
  aspect ratio up to about 20: landscape (S, L) and portrait (L, S), S =
  min_size and L = max_size rounded up to size_divisibility."""
  _check_sizes(min_size, max_size, size_divisibility)
  s = _round_up(min_size, size_divisibility)
  l = _round_up(max_size, size_divisibility)
  return ((s, l), (l, s))


def bucket_grid(step: int, min_size: int = MIN_SIZE,
                max_size: int = MAX_SIZE,
                size_divisibility: int = SIZE_DIVISIBILITY
                ) -> tuple[tuple[int, int], ...]:
  """Finer buckets, in steps of `step` pixels (a multiple of
  size_divisibility).

  A resized image has its shorter side at min_size, or its longer side at
  about max_size; so buckets are (S, S), (S, w) for w = step multiples in
  (S, L) and L itself, (h, L) for h = step multiples below S, and their
  transposes, with S, L as in `default_buckets`. Landscape first.
  """
  _check_sizes(min_size, max_size, size_divisibility)
  if step < 1 or step % size_divisibility:
    raise ConfigError(f'bucket step {step}: expected a positive multiple of '
                      f'size_divisibility={size_divisibility}')
  s = _round_up(min_size, size_divisibility)
  l = _round_up(max_size, size_divisibility)
  longs = [w for w in range(step, l, step) if w > s] + ([l] if l > s else [])
  shorts = [h for h in range(step, s, step)]
  landscape = [(s, s)] + [(s, w) for w in longs] + [(h, l) for h in shorts]
  portrait = [(w, h) for h, w in landscape[1:]]
  return tuple(landscape + portrait)


def parse_buckets(buckets: Any, min_size: int, max_size: int,
                   size_divisibility: int) -> tuple[tuple[int, int], ...]:
  """None: default_buckets; an int: bucket_grid(step); else (H, W) pairs."""
  if buckets is None:
    return default_buckets(min_size, max_size, size_divisibility)
  if isinstance(buckets, (int, np.integer)):
    return bucket_grid(int(buckets), min_size, max_size, size_divisibility)
  try:
    out = tuple((int(h), int(w)) for h, w in buckets)
  except (TypeError, ValueError):
    raise ConfigError(f'buckets={buckets!r}: expected None, a step in pixels '
                      f'or a list of (height, width)') from None
  if not out:
    raise ConfigError('buckets: expected at least one (height, width)')
  for h, w in out:
    if h < 1 or w < 1 or h % size_divisibility or w % size_divisibility:
      raise ConfigError(f'bucket {h}x{w}: expected positive multiples of '
                        f'size_divisibility={size_divisibility}')
  if len(set(out)) != len(out):
    raise ConfigError(f'buckets {list(out)}: listed more than once')
  return out


def assign_buckets(resized: Any, buckets: Sequence[Sequence[int]]
                   ) -> np.ndarray:
  """Each resized (h, w)'s bucket: the smallest that holds it (ties: one of
  its orientation, h >= w portrait, then the first listed); -1 if none."""
  resized = np.asarray(resized, np.int64).reshape(-1, 2)
  b = np.asarray(buckets, np.int64).reshape(-1, 2)
  fits = ((resized[:, None, 0] <= b[None, :, 0]) &
          (resized[:, None, 1] <= b[None, :, 1]))
  area = (b[:, 0] * b[:, 1]).astype(np.float64)
  other = ((resized[:, None, 0] >= resized[:, None, 1]) !=
           (b[None, :, 0] >= b[None, :, 1]))
  # Lexicographic (area, orientation, position) as one key.
  rank = np.unique(area, return_inverse=True)[1].reshape(-1)
  key = (rank[None, :] * 2 + other) * len(b) + np.arange(len(b))[None, :]
  key = np.where(fits, key, np.iinfo(np.int64).max)
  out = np.argmin(key, axis=1)
  return np.where(fits.any(axis=1), out, -1)


def padding_cost(sizes: Any, buckets: Any = None, *,
                 min_size: int = MIN_SIZE, max_size: int = MAX_SIZE,
                 size_divisibility: int = SIZE_DIVISIBILITY) -> float:
  """The fraction of padded pixels when images of original `sizes` (int
  [N, 2], (height, width)) are resized and padded to `buckets` (None, a
  step or (H, W) pairs, as CocoDataset takes them)."""
  _check_sizes(min_size, max_size, size_divisibility)
  buckets = parse_buckets(buckets, min_size, max_size, size_divisibility)
  sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
  resized = np.asarray([get_size(w, h, min_size, max_size)
                        for h, w in sizes.tolist()], np.int64).reshape(-1, 2)
  which = assign_buckets(resized, buckets)
  if (which < 0).any():
    h, w = resized[int(np.argmax(which < 0))]
    raise ConfigError(f'an image resized to {h}x{w} fits none of the '
                      f'buckets {list(buckets)}')
  b = np.asarray(buckets, np.int64)[which]
  return float(1 - resized.prod(axis=1).sum() / max(b.prod(axis=1).sum(), 1))


# ---------------------------------------------------------------- targets


def has_valid_annotation(anns: Sequence[Mapping[str, Any]]) -> bool:
  """The reference's rule for keeping a training image, on all its
  annotations (crowd ones too): some box has both sides > 1 pixel (and, for
  keypoint annotations, at least MIN_KEYPOINTS are visible)."""
  if not anns:
    return False
  if all(any(o <= 1 for o in a['bbox'][2:]) for a in anns):
    return False
  if 'keypoints' not in anns[0]:
    return True
  return sum(sum(1 for v in a['keypoints'][2::3] if v > 0)
             for a in anns) >= MIN_KEYPOINTS


def legacy_boxes(xywh: Any, width: Any, height: Any
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [n, 4] boxes, bool [n] kept): COCO (x, y, w, h) to the
  reference's xyxy, x2 = x + max(w - 1, 0), clamped to [0, width - 1] x
  [0, height - 1]; kept where x2 > x1 and y2 > y1 (clip_to_image with
  remove_empty). width/height: scalars or one per box."""
  b = np.asarray(xywh, np.float32).reshape(-1, 4)
  one = np.float32(1)
  x1, y1 = b[:, 0], b[:, 1]
  x2 = x1 + np.maximum(b[:, 2] - one, np.float32(0))
  y2 = y1 + np.maximum(b[:, 3] - one, np.float32(0))
  wmax = np.broadcast_to(np.asarray(width, np.float32) - one, x1.shape)
  hmax = np.broadcast_to(np.asarray(height, np.float32) - one, y1.shape)
  out = np.stack([np.clip(x1, 0, wmax), np.clip(y1, 0, hmax),
                  np.clip(x2, 0, wmax), np.clip(y2, 0, hmax)], axis=1)
  keep = (out[:, 3] > out[:, 1]) & (out[:, 2] > out[:, 0])
  return out.astype(np.float32), keep


def transform_image(pixels: np.ndarray | Image.Image, size: Sequence[int],
                    flip: bool = False, out: np.ndarray | None = None
                    ) -> np.ndarray:
  """uint8 RGB [h, w, 3] -> float32 [H, W, 3] BGR minus PIXEL_MEAN: PIL
  bilinear resize to size = (H, W), optional horizontal flip, ToTensor,
  to BGR x 255 and normalisation as the reference. Writes into `out` (a
  float32 [H, W, 3] view) if given."""
  img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(
      np.asarray(pixels, np.uint8))
  oh, ow = (int(s) for s in size)
  if img.size != (ow, oh):
    img = img.resize((ow, oh), Image.BILINEAR)
  rgb = np.asarray(img, np.uint8)
  bgr = rgb[:, ::-1, ::-1] if flip else rgb[:, :, ::-1]
  if out is None:
    out = np.empty((oh, ow, 3), np.float32)
  np.divide(bgr, np.float32(255), out=out, dtype=np.float32)
  out *= np.float32(255)
  out -= np.asarray(PIXEL_MEAN, np.float32)
  return out


def _polygons(segmentation: list) -> list[list[float]]:
  """The polygons of a polygon segmentation that have an area (3+ points)."""
  return [p for p in segmentation if len(p) >= 6]


def _segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
  if isinstance(segmentation, list):
    polys = _polygons(segmentation)
    if not polys:
      return mask_util.encode(np.zeros((height, width, 1), np.uint8,
                                       order='F'))[0]
    return mask_util.merge(mask_util.frPyObjects(
        [[float(v) for v in p] for p in polys], height, width))
  if isinstance(segmentation['counts'], list):
    return mask_util.frPyObjects(segmentation, height, width)
  return segmentation


def segmentation_mask(segmentation: Any, height: int, width: int
                      ) -> np.ndarray:
  """uint8 [height, width]: a segmentation (polygons or RLE) rasterised as
  pycocotools does (a pixel is in where its centre is)."""
  return mask_util.decode(_segmentation_rle(segmentation, height, width))


def mask_crop(segmentation: Any, height: int, width: int,
              resolution: int = MASK_RESOLUTION, fallback: Any = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [M, M] crop, float32 [4] mask box) of one gt in its image's
  original pixels.

  Polygons are rasterised over their bounding box (x1, y1, x2, y2) scaled to
  M x M; an RLE mask is sampled at the crop pixels' centres over the box of
  its pixels. The crop is invariant to resizing the image, and mirrored by a
  horizontal flip, so it is made once from the original annotation. A mask
  with no area gives a zero crop over `fallback` ((x1, y1, x2, y2); else a
  point at the origin).
  """
  m = int(resolution)
  crop = np.zeros((m, m), np.uint8)
  if isinstance(segmentation, list):
    polys = _polygons(segmentation)
    if polys:
      pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2)
                            for p in polys])
      lo, hi = pts.min(axis=0), pts.max(axis=0)
      ext = np.maximum(hi - lo, _MIN_EXTENT)
      scaled = [((np.asarray(p, np.float64).reshape(-1, 2) - lo) * (m / ext))
                .ravel().tolist() for p in polys]
      crop = mask_util.decode(mask_util.merge(
          mask_util.frPyObjects(scaled, m, m)))
      return crop, np.asarray([*lo, *(lo + ext)], np.float32)
  else:
    full = segmentation_mask(segmentation, height, width)
    ys, xs = np.nonzero(full)
    if len(xs):
      lo = np.asarray([xs.min(), ys.min()], np.float64)
      ext = np.asarray([xs.max() + 1, ys.max() + 1], np.float64) - lo
      centres = (np.arange(m) + 0.5) / m
      cx = np.floor(lo[0] + centres * ext[0]).astype(np.int64)
      cy = np.floor(lo[1] + centres * ext[1]).astype(np.int64)
      crop = np.ascontiguousarray(full[cy[:, None], cx[None, :]])
      return crop, np.asarray([*lo, *(lo + ext)], np.float32)
  box = np.zeros(4, np.float32) if fallback is None else np.asarray(
      fallback, np.float32).reshape(4)
  box[2:] = np.maximum(box[2:], box[:2] + np.float32(_MIN_EXTENT))
  return crop, box


def polygon_mask_target(polygons: Sequence[Any], box: Sequence[float],
                        resolution: int = TARGET_RESOLUTION) -> np.ndarray:
  """The reference's mask target (project_masks_on_boxes) of one gt for one
  proposal: uint8 [R, R], the polygons (image pixels) shifted to the box's
  corner, scaled by R / max(x2 - x1, 1) and R / max(y2 - y1, 1) in float32
  and rasterised by pycocotools."""
  r = int(resolution)
  x1, y1, x2, y2 = (float(v) for v in box)
  w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
  scaled = []
  for p in _polygons(list(polygons)):
    p = np.asarray(p, np.float32).copy()
    p[0::2] = (p[0::2] - np.float32(x1)) * np.float32(r / w)
    p[1::2] = (p[1::2] - np.float32(y1)) * np.float32(r / h)
    scaled.append(p.astype(np.float64).tolist())
  if not scaled:
    return np.zeros((r, r), np.uint8)
  return mask_util.decode(mask_util.merge(mask_util.frPyObjects(scaled, r,
                                                                r)))


def crop_mask_target(crop: np.ndarray, mask_box: Sequence[float],
                     box: Sequence[float],
                     resolution: int = TARGET_RESOLUTION,
                     threshold: float | None = 0.5) -> np.ndarray:
  """A proposal's mask target sampled from a gt's crop (numpy reference of
  the on-device version).

  Output pixel (i, j) is the crop bilinearly interpolated at the centre of
  the proposal's bin, (x1 + (j + 0.5) * w / R, y1 + (i + 0.5) * h / R) with
  w = max(x2 - x1, 1), h = max(y2 - y1, 1) as the reference crops, mapped
  into the crop (pixel k of M covering [k, k + 1] / M of the mask box);
  outside the crop the mask is 0. This is roi_align(aligned=True,
  sampling_ratio=1) on the crop padded with one ring of zeros. float32 in
  [0, 1], or uint8 0/1 (value >= threshold) unless threshold is None.
  """
  crop = np.asarray(crop, np.float32)
  mh, mw = crop.shape
  r = int(resolution)
  x1, y1, x2, y2 = (float(v) for v in box)
  mx1, my1, mx2, my2 = (float(v) for v in mask_box)
  w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
  centres = np.arange(r, dtype=np.float64) + 0.5
  u = (x1 + centres * w / r - mx1) * mw / (mx2 - mx1) + 0.5  # padded index
  v = (y1 + centres * h / r - my1) * mh / (my2 - my1) + 0.5
  padded = np.pad(crop, 1)
  u = np.clip(u, 0, mw + 1)
  v = np.clip(v, 0, mh + 1)
  u0 = np.minimum(np.floor(u).astype(np.int64), mw)
  v0 = np.minimum(np.floor(v).astype(np.int64), mh)
  fu = (u - u0).astype(np.float32)[None, :]
  fv = (v - v0).astype(np.float32)[:, None]
  top = padded[v0[:, None], u0[None, :]] * (1 - fu) + padded[
      v0[:, None], u0[None, :] + 1] * fu
  bottom = padded[v0[:, None] + 1, u0[None, :]] * (1 - fu) + padded[
      v0[:, None] + 1, u0[None, :] + 1] * fu
  value = top * (1 - fv) + bottom * fv
  if threshold is None:
    return value.astype(np.float32)
  return (value >= threshold).astype(np.uint8)


# ---------------------------------------------------------------- dataset


class CocoDataset(PrefetchedStreams):
  """Train and eval batch streams over images with boxes and masks.

  Args:
    images: the images, in dataset order: file paths (JPEG/PNG), or a
      function index -> uint8 [h, w, 3] (an in-memory renderer).
    sizes: int [N, 2], each image's original (height, width).
    boxes: per image, float32 [n_i, 4] legacy (x1, y1, x2, y2) in its
      original pixels (`legacy_boxes`, empty ones dropped).
    labels: per image, int [n_i] labels in 1..len(category_ids).
    segmentations: per image, the n_i gts' segmentations (polygon lists or
      RLE dicts, as in the JSON).
    category_ids: label - 1 -> category id of `coco_gt`.
    image_ids: the `coco_gt` image id of each image.
    coco_gt: the COCO instances dict predictions are scored against.
    min_size, max_size: the resize (`get_size`).
    size_divisibility: what bucket sides must be multiples of.
    buckets: None (`default_buckets`), a step (`bucket_grid`) or (H, W)
      pairs.
    max_boxes: G, the gt slots of a training batch row.
    mask_resolution: M, the side of the gts' mask crops.
    seed: the order and flips derive from it.
    hflip_prob: probability of a horizontal flip in training.
    num_workers: threads that decode and resize.
    prefetch: batches assembled ahead (0: in the caller's thread).
    name: what error messages and `describe` call the dataset.
    labels_file: the annotation file, named in error messages.
    dropped_boxes: boxes dropped as empty (for `describe`).
    removed_images: images dropped for lack of annotations (`describe`).

  Attributes (besides the arguments): `sizes` int [N, 2] original (height,
  width), `resized_sizes` int [N, 2] after the resize, `buckets` ((H, W),
  ...) and `bucket_of` int [N] each image's bucket, `num_classes` C.
  """

  def __init__(self, images: Sequence[str] | Callable[[int], np.ndarray], *,
               sizes: Any, boxes: Sequence[np.ndarray],
               labels: Sequence[np.ndarray], segmentations: Sequence[list],
               category_ids: Sequence[int], image_ids: Sequence[Any],
               coco_gt: dict[str, Any], min_size: int = MIN_SIZE,
               max_size: int = MAX_SIZE,
               size_divisibility: int = SIZE_DIVISIBILITY,
               buckets: Any = None, max_boxes: int = MAX_BOXES,
               mask_resolution: int = MASK_RESOLUTION, seed: int = 0,
               hflip_prob: float = HFLIP_PROB, num_workers: int = 4,
               prefetch: int = 2, name: str = 'coco',
               labels_file: str | None = None, dropped_boxes: int = 0,
               removed_images: int = 0):
    _check_args(max_boxes=max_boxes, mask_resolution=mask_resolution,
                seed=seed, hflip_prob=hflip_prob, num_workers=num_workers,
                prefetch=prefetch)
    _check_sizes(min_size, max_size, size_divisibility)
    self.min_size, self.max_size = int(min_size), int(max_size)
    self.size_divisibility = int(size_divisibility)
    self.buckets = parse_buckets(buckets, self.min_size, self.max_size,
                                  self.size_divisibility)
    self.sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    n = len(self.sizes)
    if callable(images):
      self._render, self.paths = images, None
    else:
      self._render, self.paths = None, [os.fspath(p) for p in images]
      if len(self.paths) != n:
        raise ValueError(f'{len(self.paths)} images and {n} sizes')
    if not (len(boxes) == len(labels) == len(segmentations) ==
            len(image_ids) == n):
      raise ValueError(f'{n} images but {len(boxes)} box arrays, '
                       f'{len(labels)} label arrays, {len(segmentations)} '
                       f'segmentation lists and {len(image_ids)} ids')
    self.name = name
    self.labels_file = labels_file
    self.num_examples = n
    self.category_ids = tuple(int(c) for c in category_ids)
    self.num_classes = len(self.category_ids)
    self.image_ids = np.asarray(image_ids)
    self.coco_gt = coco_gt
    self.max_boxes = int(max_boxes)
    self.mask_resolution = int(mask_resolution)
    self.seed = int(seed)
    self.hflip_prob = float(hflip_prob)
    self.dropped_boxes = int(dropped_boxes)
    self.removed_images = int(removed_images)
    self._boxes = [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes]
    self._labels = [np.asarray(c, np.int32).reshape(-1) for c in labels]
    self._segmentations = [list(s) for s in segmentations]
    for i in range(n):
      k = len(self._boxes[i])
      if len(self._labels[i]) != k or len(self._segmentations[i]) != k:
        raise ValueError(f'image {i}: {k} boxes, {len(self._labels[i])} '
                         f'labels, {len(self._segmentations[i])} masks')
      if k and (self._labels[i].min() < 1 or
                self._labels[i].max() > self.num_classes):
        raise ValueError(f'labels must lie in [1, {self.num_classes}]')
    counts = np.asarray([len(b) for b in self._boxes], np.int64)
    if n and counts.max() > self.max_boxes:
      i = int(np.argmax(counts > self.max_boxes))
      raise DataError(
          f'{self.where(i)}: {counts[i]} boxes, more than max_boxes='
          f'{self.max_boxes} (the gt slots of a batch row); raise max_boxes '
          f'to at least {counts.max()}, the most boxes of an image in '
          f'{self.labels_file or self.name}')
    self.resized_sizes = np.asarray(
        [get_size(w, h, self.min_size, self.max_size)
         for h, w in self.sizes.tolist()], np.int64).reshape(-1, 2)
    self.bucket_of = assign_buckets(self.resized_sizes, self.buckets)
    if n and (self.bucket_of < 0).any():
      i = int(np.argmax(self.bucket_of < 0))
      h, w = self.resized_sizes[i]
      raise DataError(
          f'{self.where(i)}: {self.sizes[i][1]}x{self.sizes[i][0]} (width x '
          f'height) resizes to {w}x{h}, which fits none of the buckets '
          f'{[f"{bw}x{bh}" for bh, bw in self.buckets]} (width x height); '
          f'add a bucket of at least {_round_up(h, self.size_divisibility)} '
          f'x {_round_up(w, self.size_divisibility)} (height x width)')
    self._init_streams(prefetch, num_workers, pool_name='io')

  # --- examples --------------------------------------------------------------
  @property
  def num_boxes(self) -> int:
    """Ground-truth boxes over all images."""
    return int(sum(len(b) for b in self._boxes))

  def bucket_counts(self) -> np.ndarray:
    """int [len(buckets)]: images per bucket."""
    return np.bincount(self.bucket_of, minlength=len(self.buckets))

  def describe(self) -> str:
    """One line: images, boxes, classes, what was dropped, buckets."""
    counts = self.bucket_counts()
    buckets = ', '.join(f'{h}x{w}: {c}' for (h, w), c in
                        zip(self.buckets, counts.tolist()) if c)
    cost = padding_cost(self.sizes, self.buckets, min_size=self.min_size,
                        max_size=self.max_size,
                        size_divisibility=self.size_divisibility)
    return (f'{self.name}: {self.num_examples} images ({self.removed_images} '
            f'without annotations removed), {self.num_boxes} boxes of '
            f'{self.num_classes} classes ({self.dropped_boxes} empty boxes '
            f'dropped), resized to min {self.min_size} max {self.max_size}, '
            f'buckets (h x w: images) {buckets}, {cost:.1%} padding')

  def where(self, index: int) -> str:
    """What error messages call image `index`: its file, or its id."""
    if self.paths is not None:
      return self.paths[index]
    return f'{self.name} image {self.image_ids[index]}'

  def boxes(self, index: int) -> np.ndarray:
    """Image `index`'s boxes, float32 [n, 4], legacy xyxy, original pixels."""
    return self._boxes[index].copy()

  def labels(self, index: int) -> np.ndarray:
    """Image `index`'s labels (1..C), int32 [n]."""
    return self._labels[index].copy()

  def segmentations(self, index: int) -> list:
    """Image `index`'s gt segmentations, as in the JSON."""
    return list(self._segmentations[index])

  def read_image(self, index: int) -> np.ndarray:
    """Image `index` decoded: uint8 [height, width, 3]; DataError if the file
    does not decode or has another size than its annotations say."""
    return np.asarray(self._read(index), np.uint8)

  def _read(self, index: int) -> Image.Image | np.ndarray:
    if self._render is not None:
      return self._render(index)
    height, width = (int(s) for s in self.sizes[index])
    path = self.paths[index]
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise DataError(f'{path}: cannot be read ({e})') from None
    img = decode_image(data, path)
    if img.size != (width, height):
      raise DataError(
          f'{path}: decodes to {img.size[0]}x{img.size[1]} (width x height); '
          f'{self.labels_file or self.name} says {width}x{height}')
    return img

  def targets(self, index: int, flip: bool = False) -> dict[str, np.ndarray]:
    """Image `index`'s targets in its resized (and flipped) pixels:
    'boxes' float32 [n, 4], 'labels' int32 [n], 'mask_crops' uint8
    [n, M, M], 'mask_boxes' float32 [n, 4]."""
    height, width = (int(s) for s in self.sizes[index])
    oh, ow = (int(s) for s in self.resized_sizes[index])
    m = self.mask_resolution
    boxes = self.boxes(index)
    k = len(boxes)
    crops = np.zeros((k, m, m), np.uint8)
    mask_boxes = np.zeros((k, 4), np.float32)
    fallback = self._fallback_boxes(index)
    for j, seg in enumerate(self._segmentations[index]):
      crops[j], mask_boxes[j] = mask_crop(seg, height, width, m, fallback[j])
    ratio = np.asarray([ow / width, oh / height] * 2, np.float64).astype(
        np.float32)
    boxes *= ratio
    mask_boxes *= ratio
    if flip:
      edge = np.float32(ow)
      for b in (boxes, mask_boxes):
        x1 = b[:, 0].copy()
        b[:, 0] = (edge - b[:, 2]) - np.float32(1)
        b[:, 2] = (edge - x1) - np.float32(1)
      crops = crops[:, :, ::-1]
    return {'boxes': boxes, 'labels': self.labels(index),
            'mask_crops': np.ascontiguousarray(crops), 'mask_boxes': mask_boxes}

  def _fallback_boxes(self, index: int) -> np.ndarray:
    """Continuous (x1, y1, x2, y2) of the legacy boxes (x2 + 1), the mask box
    of a gt whose mask is empty."""
    b = self._boxes[index].copy()
    b[:, 2:] += np.float32(1)
    return b

  def example(self, index: int, flip: bool = False
              ) -> dict[str, np.ndarray]:
    """Image `index` transformed: 'image' float32 [h, w, 3] (resized, not
    padded), 'image_size' int32 [2] and the `targets`."""
    out = self.targets(index, flip)
    out['image'] = transform_image(self._read(index),
                                   self.resized_sizes[index], flip)
    out['image_size'] = self.resized_sizes[index].astype(np.int32)
    return out

  # --- order -----------------------------------------------------------------
  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the images in training epoch `epoch`."""
    return np.random.default_rng([self.seed, _ORDER, epoch]).permutation(
        self.num_examples)

  def flipped(self, epoch: int, index: int) -> bool:
    """Whether image `index` is flipped in training epoch `epoch`."""
    if self.hflip_prob <= 0.0:
      return False
    rng = np.random.default_rng([self.seed, _FLIP, epoch, index])
    return bool(rng.random() < self.hflip_prob)

  def steps_per_epoch(self, global_batch: int) -> int:
    """Training steps per epoch: the sum over buckets of images //
    global_batch."""
    if global_batch < 1:
      raise ConfigError(f'global batch must be >= 1, got {global_batch}')
    return int((self.bucket_counts() // int(global_batch)).sum())

  def _steps(self, global_batch: int) -> int:
    steps = self.steps_per_epoch(global_batch)
    if not steps:
      raise DataError(
          f'{self.name}: no bucket holds a global batch of {global_batch} '
          f'images (images per bucket: {self.bucket_counts().tolist()})')
    return steps

  def epoch_batches(self, epoch: int, global_batch: int
                    ) -> list[tuple[int, np.ndarray]]:
    """Training epoch `epoch`: [(bucket, int64 [global_batch] image
    indices)] per step."""
    gb = int(global_batch)
    order = self.permutation(epoch)
    position = np.empty(self.num_examples, np.int64)
    position[order] = np.arange(self.num_examples)
    chunks = []
    for b in range(len(self.buckets)):
      members = order[self.bucket_of[order] == b]
      for start in range(0, len(members) // gb * gb, gb):
        chunk = members[start:start + gb]
        chunks.append((int(position[chunk[0]]), b, chunk))
    chunks.sort(key=lambda c: c[0])
    return [(b, chunk) for _, b, chunk in chunks]

  def train_order(self, step: int, global_batch: int, *,
                  process_index: int = 0, process_count: int = 1
                  ) -> tuple[np.ndarray, int, int]:
    """(image indices, bucket, epoch) of this process's slice of batch
    `step`."""
    local = local_batch_size(global_batch, process_count, process_index)
    epoch, k = divmod(int(step), self._steps(global_batch))
    bucket, index = self.epoch_batches(epoch, global_batch)[k]
    first = process_index * local
    return index[first:first + local], bucket, epoch

  def eval_order(self, global_batch: int) -> list[tuple[int, np.ndarray]]:
    """Evaluation: [(bucket, int64 image indices)] per step, at most
    global_batch each (the last of each bucket may be short)."""
    if global_batch < 1:
      raise ConfigError(f'global batch must be >= 1, got {global_batch}')
    out = []
    for b in range(len(self.buckets)):
      members = np.flatnonzero(self.bucket_of == b)
      for start in range(0, len(members), global_batch):
        out.append((b, members[start:start + global_batch]))
    return out

  def eval_steps(self, global_batch: int) -> int:
    """Batches of `eval_batches`."""
    return len(self.eval_order(global_batch))

  # --- streams ---------------------------------------------------------------
  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from batch `start_step` on: this
    process's slice of each global batch (keys in the module docstring)."""
    if start_step < 0:
      raise ConfigError(f'start_step must be >= 0, got {start_step}')
    local = local_batch_size(global_batch, process_count, process_index)
    steps = self._steps(global_batch)

    def jobs():
      step, epoch, batches = int(start_step), None, None
      while True:
        e, k = divmod(step, steps)
        if e != epoch:
          epoch, batches = e, self.epoch_batches(e, global_batch)
        bucket, index = batches[k]
        index = index[process_index * local:(process_index + 1) * local]
        index = index.tolist()
        yield self._submit(bucket, index, [self.flipped(e, i) for i in index])
        step += 1
    return self._prefetched(self._assemble(jobs()))

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every image once (`eval_order`), unflipped, each bucket's last batch
    padded: this process's contiguous share of each global batch."""
    local = local_batch_size(global_batch, process_count, process_index)
    order = self.eval_order(global_batch)

    def jobs():
      for bucket, index in order:
        index = index[process_index * local:(process_index + 1) * local]
        yield self._submit(bucket, index.tolist(), None, pad_to=local)
    return self._prefetched(self._assemble(jobs()))

  def _assemble(self, jobs: Iterator) -> Iterator[dict[str, np.ndarray]]:
    return prefetch.completed_in_order(jobs, _IN_FLIGHT)

  def _submit(self, bucket: int, index: list[int],
              flips: list[bool] | None, *, pad_to: int | None = None):
    """Starts filling a batch: (arrays being filled, their futures)."""
    real = len(index)
    n = real if pad_to is None else pad_to
    h, w = self.buckets[bucket]
    batch = {'image': np.zeros((n, h, w, 3), np.float32),
             'image_size': np.zeros((n, 2), np.int32)}
    if flips is None:
      batch['index'] = np.zeros((n,), np.int32)
      batch['index'][:real] = index
      batch['mask'] = np.arange(n) < real
    else:
      g, m = self.max_boxes, self.mask_resolution
      batch['boxes'] = np.zeros((n, g, 4), np.float32)
      batch['labels'] = np.zeros((n, g), np.int32)
      batch['valid'] = np.zeros((n, g), bool)
      batch['mask_crops'] = np.zeros((n, g, m, m), np.uint8)
      batch['mask_boxes'] = np.zeros((n, g, 4), np.float32)
    pool = self._executor()
    futures = [pool.submit(self._fill, batch, j, i,
                           None if flips is None else flips[j])
               for j, i in enumerate(index)]
    return batch, futures

  def _fill(self, batch, j: int, index: int, flip: bool | None) -> None:
    oh, ow = (int(s) for s in self.resized_sizes[index])
    transform_image(self._read(index), (oh, ow), bool(flip),
                    out=batch['image'][j, :oh, :ow])
    batch['image_size'][j] = (oh, ow)
    if flip is not None:
      t = self.targets(index, flip)
      k = len(t['boxes'])
      batch['boxes'][j, :k] = t['boxes']
      batch['labels'][j, :k] = t['labels']
      batch['valid'][j, :k] = True
      batch['mask_crops'][j, :k] = t['mask_crops']
      batch['mask_boxes'][j, :k] = t['mask_boxes']

  # --- predictions -----------------------------------------------------------
  def to_coco_results(self, index: Any, boxes: Any, scores: Any, labels: Any,
                      valid: Any = None) -> list[dict[str, Any]]:
    """Detections as COCO 'bbox' results, to score against `coco_gt`.

    Args:
      index: int [n], the images' positions (an eval batch's 'index', rows
        with mask True only).
      boxes: float [n, K, 4] legacy (x1, y1, x2, y2) in resized pixels.
      scores: float [n, K].
      labels: int [n, K] labels 1..C.
      valid: bool [n, K], which detections are real (None: all).

    Returns:
      [{'image_id', 'category_id', 'bbox' [x, y, w, h], 'score'}]: boxes
      scaled to the original image (BoxList.resize) and converted with the
      reference's w = x2 - x1 + 1.
    """
    index = np.asarray(index, np.int64).reshape(-1)
    boxes = np.asarray(boxes, np.float32).reshape(len(index), -1, 4)
    scores = np.asarray(scores, np.float32).reshape(len(index), -1)
    labels = np.asarray(labels, np.int64).reshape(scores.shape)
    valid = (np.ones(scores.shape, bool) if valid is None else
             np.asarray(valid, bool).reshape(scores.shape))
    categories = np.asarray((0,) + self.category_ids, np.int64)
    results = []
    for row, i in enumerate(index.tolist()):
      keep = valid[row]
      if not keep.any():
        continue
      height, width = self.sizes[i]
      oh, ow = self.resized_sizes[i]
      ratio = np.asarray([width / ow, height / oh] * 2, np.float64).astype(
          np.float32)
      b = boxes[row][keep] * ratio
      xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2] + np.float32(1)],
                            axis=1)
      image_id = self.image_ids[i].item()
      for box, score, c in zip(xywh.tolist(), scores[row][keep].tolist(),
                               categories[labels[row][keep]].tolist()):
        results.append({'image_id': image_id, 'category_id': c,
                        'bbox': box, 'score': score})
    return results

  def to_coco_segm_results(self, index: Any, masks: Sequence[Any],
                           scores: Any, labels: Any, valid: Any = None
                           ) -> list[dict[str, Any]]:
    """Masks as COCO 'segm' results (RLE), to score against `coco_gt`.

    Args:
      index: int [n], the images' positions.
      masks: per row, uint8/bool [K, height, width], binary masks already
        pasted into the original image (its `sizes`).
      scores: float [n, K].
      labels: int [n, K] labels 1..C.
      valid: bool [n, K], which detections are real (None: all).
    """
    index = np.asarray(index, np.int64).reshape(-1)
    scores = np.asarray(scores, np.float32).reshape(len(index), -1)
    labels = np.asarray(labels, np.int64).reshape(scores.shape)
    valid = (np.ones(scores.shape, bool) if valid is None else
             np.asarray(valid, bool).reshape(scores.shape))
    categories = np.asarray((0,) + self.category_ids, np.int64)
    results = []
    for row, i in enumerate(index.tolist()):
      keep = valid[row]
      if not keep.any():
        continue
      m = np.asarray(masks[row])[keep].astype(np.uint8)
      height, width = (int(s) for s in self.sizes[i])
      if m.shape[1:] != (height, width):
        raise ValueError(f'masks of image {i}: shape {m.shape[1:]}, expected '
                         f'its original size {(height, width)}')
      rles = mask_util.encode(np.asfortranarray(m.transpose(1, 2, 0)))
      image_id = self.image_ids[i].item()
      for rle, score, c in zip(rles, scores[row][keep].tolist(),
                               categories[labels[row][keep]].tolist()):
        rle['counts'] = rle['counts'].decode('ascii')
        results.append({'image_id': image_id, 'category_id': c,
                        'segmentation': rle, 'score': score})
    return results


def _check_args(*, max_boxes: int, mask_resolution: int, seed: int,
                hflip_prob: float, num_workers: int, prefetch: int) -> None:
  if max_boxes < 1:
    raise ConfigError(f'max_boxes must be >= 1, got {max_boxes}')
  if mask_resolution < 1:
    raise ConfigError(f'mask_resolution must be >= 1, got {mask_resolution}')
  if seed < 0:
    raise ConfigError(f'the data seed must be >= 0, got {seed}')
  if not 0.0 <= hflip_prob <= 1.0:
    raise ConfigError(f'hflip_prob={hflip_prob}: expected a probability in '
                      f'[0, 1]')
  if num_workers < 1:
    raise ConfigError(f'num_workers must be >= 1, got {num_workers}')
  if prefetch < 0:
    raise ConfigError(f'prefetch must be >= 0, got {prefetch}')


# ---------------------------------------------------------------- reading


def _numbers(values: list) -> bool:
  """Whether `values` is a flat list of finite numbers."""
  try:
    arr = np.array(values)
  except (TypeError, ValueError):       # ragged
    return False
  return (arr.ndim == 1 and arr.dtype.kind in 'iuf' and
          bool(np.isfinite(arr).all()))


def _segmentation_problem(seg: Any, height: int, width: int,
                          coordinates: bool = True) -> str | None:
  """What is wrong with a segmentation, or None. coordinates: check that
  polygons hold finite numbers (else only their structure)."""
  if isinstance(seg, list):
    for k, poly in enumerate(seg):
      if not isinstance(poly, list):
        return f'polygon #{k} is a {type(poly).__name__}'
      if len(poly) % 2:
        return f'polygon #{k} has an odd number ({len(poly)}) of coordinates'
      if coordinates and poly and not _numbers(poly):
        return f'polygon #{k} holds something other than finite numbers'
    return None
  if isinstance(seg, dict):
    size, counts = seg.get('size'), seg.get('counts')
    if size != [height, width]:
      return f'RLE size {size!r}, not the image\'s [{height}, {width}]'
    if isinstance(counts, list):
      arr = np.array(counts) if counts else np.zeros(0, np.int64)
      if arr.ndim != 1 or arr.dtype.kind not in 'iu' or (
          len(arr) and arr.min() < 0):
        return 'RLE counts hold something other than non-negative integers'
      if int(arr.sum()) != height * width:
        return (f'RLE counts sum to {int(arr.sum())}, not {height} * {width} '
                f'pixels')
      return None
    if isinstance(counts, str):
      try:
        mask_util.area({'size': size, 'counts': counts.encode('ascii')})
      except Exception as e:  # pylint: disable=broad-except
        return f'RLE counts do not decode ({e})'
      return None
    return f'RLE counts are a {type(counts).__name__}'
  return f'a {type(seg).__name__}'


# Polygon coordinates checked at once (the culprit is then looked for).
_COORDINATE_CHUNK = 1 << 20


def _check_segmentations(anns: list, heights: np.ndarray, widths: np.ndarray,
                         path: str, image_of: Callable[[int], str]) -> None:
  """DataError naming the first annotation with a malformed segmentation.
  Structure is checked one by one, polygon coordinates a chunk at once."""

  def fail(k: int, problem: str) -> DataError:
    return coco_format.fail(
        path, f'annotation {anns[k]["id"]} (image {image_of(k)}): malformed '
              f'segmentation: {problem}; expected a list of polygons [x1, '
              f'y1, x2, y2, ...] or an RLE {{"size": [h, w], "counts": ...}}')

  def check_chunk(first: int, last: int, coords: list) -> None:
    if not coords or _numbers(coords):
      return
    for k in range(first, last):
      problem = _segmentation_problem(anns[k]['segmentation'],
                                      int(heights[k]), int(widths[k]))
      if problem:
        raise fail(k, problem)

  coords: list = []
  first = 0
  for k, a in enumerate(anns):
    seg = a['segmentation']
    problem = _segmentation_problem(seg, int(heights[k]), int(widths[k]),
                                    coordinates=False)
    if problem:
      check_chunk(first, k, coords)      # an earlier one comes first
      raise fail(k, problem)
    if isinstance(seg, list):
      for poly in seg:
        coords.extend(poly)
    if len(coords) >= _COORDINATE_CHUNK:
      check_chunk(first, k + 1, coords)
      coords, first = [], k + 1
  check_chunk(first, len(anns), coords)


def _parse_instances(js: dict[str, Any], path: str, images_dir: str,
                     train: bool) -> dict[str, Any]:
  """Checks a COCO instances dict; the CocoDataset's arguments (image
  paths under images_dir)."""
  parsed = coco_format.parse_split(js, path, images_dir, _ANN_KEYS)
  anns, files = parsed.annotations, parsed.files
  widths, heights = parsed.widths, parsed.heights
  n = len(files)
  # Categories: labels 1..C in the JSON's order (pycocotools getCatIds).
  category_ids = parsed.category_ids

  def image_of(k: int) -> str:
    return os.path.join(images_dir, files[pos[k]])

  # Annotations: image, category, crowd flag, box, segmentation.
  pos = parsed.positions()
  labels = parsed.category_indices(
      {c: k + 1 for k, c in enumerate(category_ids)}, image_of)
  crowd = np.zeros(len(anns), bool)
  for k, a in enumerate(anns):
    if a['iscrowd'] not in (0, 1):
      raise coco_format.fail(path, f'annotation {a["id"]} (image '
                                   f'{image_of(k)}): iscrowd '
                                   f'{a["iscrowd"]!r}; expected 0 or 1')
    crowd[k] = a['iscrowd'] == 1
  xywh = parsed.bboxes(pos)
  w_img = widths[pos].astype(np.float64)
  h_img = heights[pos].astype(np.float64)
  parsed.check_inside(
      (xywh[:, 0] < -BOX_TOLERANCE) | (xywh[:, 1] < -BOX_TOLERANCE) |
      (xywh[:, 2] < 0) | (xywh[:, 3] < 0) |
      (xywh[:, 0] + xywh[:, 2] > w_img + BOX_TOLERANCE) |
      (xywh[:, 1] + xywh[:, 3] > h_img + BOX_TOLERANCE), pos, BOX_TOLERANCE)
  _check_segmentations(anns, heights[pos], widths[pos], path, image_of)

  # Per image, in JSON order: the training split keeps images with usable
  # annotations; targets are the non-crowd, non-empty boxes.
  order = np.argsort(pos, kind='stable')
  per_image = np.split(order, np.cumsum(np.bincount(pos, minlength=n))[:-1])
  keep_image = np.ones(n, bool)
  if train:
    for i, ks in enumerate(per_image):
      keep_image[i] = has_valid_annotation([anns[k] for k in ks.tolist()])
  boxes, keep_box = legacy_boxes(xywh, w_img, h_img)
  target = keep_box & ~crowd
  kept = np.flatnonzero(keep_image)
  dropped = int((~keep_box & ~crowd)[np.isin(pos, kept)].sum())
  out_boxes, out_labels, out_segs = [], [], []
  for i in kept.tolist():
    ks = per_image[i][target[per_image[i]]]
    out_boxes.append(boxes[ks])
    out_labels.append(labels[ks].astype(np.int32))
    out_segs.append([anns[k]['segmentation'] for k in ks.tolist()])
  return dict(
      images=[os.path.join(images_dir, files[i]) for i in kept.tolist()],
      sizes=np.stack([heights, widths], axis=1)[kept],
      boxes=out_boxes, labels=out_labels, segmentations=out_segs,
      category_ids=category_ids,
      image_ids=[parsed.image_ids[i] for i in kept.tolist()], coco_gt=js,
      labels_file=path, dropped_boxes=dropped,
      removed_images=int(n - len(kept)))


def _read_split(data_dir: str, split: str, train: bool) -> dict[str, Any]:
  images_dir = os.path.join(data_dir, split)
  path = os.path.join(data_dir, ANNOTATIONS_DIR, f'instances_{split}.json')
  if not os.path.isdir(images_dir):
    raise DataError(f'{images_dir}: no such directory (expected the COCO '
                    f'layout under {data_dir}: {_LAYOUT})')
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file (expected the COCO layout under '
                    f'{data_dir}: {_LAYOUT})')
  args = _parse_instances(coco_format.load_json(path), path, images_dir, train)
  # Only the images kept need to be there.
  coco_format.check_files(args['images'], images_dir, path,
                          'with annotations in')
  return args


def open_coco(data_dir: str | os.PathLike, *, min_size: int = MIN_SIZE,
              max_size: int = MAX_SIZE,
              size_divisibility: int = SIZE_DIVISIBILITY, buckets: Any = None,
              max_boxes: int = MAX_BOXES,
              mask_resolution: int = MASK_RESOLUTION, seed: int = 0,
              hflip_prob: float = HFLIP_PROB, num_workers: int = 4,
              prefetch: int = 2, name: str = 'coco2017'
              ) -> tuple[CocoDataset, CocoDataset]:
  """(train, eval) from `data_dir`/{train2017,val2017,annotations}.

  Both are checked when opened (see the module docstring); the eval split's
  categories must be the training split's.
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: no such directory (expected the COCO '
                    f'layout: {_LAYOUT})')
  _check_args(max_boxes=max_boxes, mask_resolution=mask_resolution,
              seed=seed, hflip_prob=hflip_prob, num_workers=num_workers,
              prefetch=prefetch)
  parse_buckets(buckets, min_size, max_size, size_divisibility)
  kw = dict(min_size=min_size, max_size=max_size,
            size_divisibility=size_divisibility, buckets=buckets,
            max_boxes=max_boxes, mask_resolution=mask_resolution, seed=seed,
            num_workers=num_workers, prefetch=prefetch)
  train_split = _read_split(data_dir, TRAIN_SPLIT, train=True)
  eval_split = _read_split(data_dir, EVAL_SPLIT, train=False)
  _same_categories(train_split, eval_split)
  train = CocoDataset(**train_split, hflip_prob=hflip_prob,
                      name=f'{name}-train', **kw)
  try:
    evaluation = CocoDataset(**eval_split, hflip_prob=0.0,
                             name=f'{name}-val', **kw)
  except BaseException:
    train.close()
    raise
  return train, evaluation


def _same_categories(train: dict[str, Any], evaluation: dict[str, Any]
                     ) -> None:
  if evaluation['category_ids'] != train['category_ids']:
    raise DataError(
        f'{evaluation["labels_file"]}: categories differ from those of '
        f'{train["labels_file"]} ({len(evaluation["category_ids"])} vs '
        f'{len(train["category_ids"])} ids, or another order); expected the '
        f'same categories in both splits')


# ---------------------------------------------------------------- writing


def write_coco_split(root: str | os.PathLike, split: str,
                     images: Sequence[Mapping[str, Any]],
                     annotations: Sequence[Mapping[str, Any]],
                     categories: Sequence[Mapping[str, Any]]) -> str:
  """Writes one split in the COCO layout; returns the JSON's path.

  Args:
    root: the dataset root; images go to root/split/ and the JSON to
      root/annotations/instances_<split>.json.
    split: 'train2017' or 'val2017' (any name is written).
    images: the images, as `coco_format.write_split` takes them (pixels
      are written as JPEG, quality 95).
    annotations: written to the JSON as given.
    categories: written to the JSON as given.
  """
  root = os.fspath(root)
  return coco_format.write_split(
      os.path.join(root, split),
      os.path.join(root, ANNOTATIONS_DIR, f'instances_{split}.json'), images,
      annotations, categories)


# ---------------------------------------------------------------- synthetic


def shape_polygon(kind: str, x: float, y: float, w: float, h: float
                  ) -> list[float]:
  """The polygon [x1, y1, ...] of a shape filling the box (x, y, w, h)."""
  if kind == 'rectangle':
    pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
  elif kind == 'triangle':   # apex at the top centre, base along the bottom
    pts = [(0.5, 0), (1, 1), (0, 1)]
  elif kind == 'diamond':
    pts = [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
  elif kind == 'cross':
    a, b = 1 / 3, 2 / 3
    pts = [(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1),
           (a, b), (0, b), (0, a), (a, a)]
  elif kind == 'ellipse':
    t = 2 * np.pi * np.arange(_ELLIPSE_VERTICES) / _ELLIPSE_VERTICES
    pts = list(zip(0.5 + 0.5 * np.cos(t), 0.5 + 0.5 * np.sin(t)))
  else:
    raise ValueError(f'unknown shape {kind!r}')
  return [float(v) for px, py in pts for v in (x + px * w, y + py * h)]


class _PolygonImage(_SyntheticImage):
  """A synthetic image whose objects are polygons, painted where
  pycocotools rasterises them (so the masks are exact)."""

  def polygons(self) -> list[list[float]]:
    return [shape_polygon(class_shape(c), x, y, w, h)
            for c, x, y, w, h, _ in self.objects]

  def render(self, num_classes: int) -> np.ndarray:
    objects, self.objects = self.objects, []
    try:
      image = super().render(num_classes)      # the background
    finally:
      self.objects = objects
    for poly, (c, *_, bright) in zip(self.polygons(), self.objects):
      mask = segmentation_mask([poly], self.height, self.width).astype(bool)
      colour = class_colour(c, num_classes) * np.float32(bright)
      image[mask] = np.clip(colour * np.float32(255) + np.float32(0.5), 0,
                            255).astype(np.uint8)
    return image


def _synthetic_instances(params: list[_PolygonImage], num_classes: int
                         ) -> dict[str, Any]:
  image_ids = list(range(1, len(params) + 1))
  annotations = []
  for p, image_id in zip(params, image_ids):
    for poly, (c, x, y, w, h, _) in zip(p.polygons(), p.objects):
      rle = _segmentation_rle([poly], p.height, p.width)
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id,
          'category_id': synthetic_category_id(c),
          'bbox': [float(x), float(y), float(w), float(h)],
          'area': float(mask_util.area(rle)), 'iscrowd': 0,
          'segmentation': [poly]})
  return {
      'images': [{'id': i, 'file_name': f'{i:012d}.jpg', 'width': p.width,
                  'height': p.height} for p, i in zip(params, image_ids)],
      'annotations': annotations,
      'categories': [{'id': synthetic_category_id(c),
                      'name': f'{class_shape(c)}-{c}'}
                     for c in range(num_classes)]}


def synthetic_category_id(c: int) -> int:
  """The category id of synthetic class c: odd ids 1, 3, 5, ... (so that
  ids and labels 1..C differ)."""
  return 2 * int(c) + 1


def synthetic_coco(num_train: int, num_eval: int, *, num_classes: int = 8,
                   image_size: Sequence[int] | int = 128,
                   min_size: int = 128, max_size: int = 213,
                   size_divisibility: int = SIZE_DIVISIBILITY,
                   buckets: Any = None, max_boxes: int | None = None,
                   mask_resolution: int = MASK_RESOLUTION, seed: int = 0,
                   hflip_prob: float = HFLIP_PROB, num_workers: int = 2,
                   prefetch: int = 2, min_objects: int = 1,
                   max_objects: int = 3
                   ) -> tuple[CocoDataset, CocoDataset]:
  """(train, eval) datasets of learnable synthetic instance segmentation.

  Each image's height and width are drawn apart, 0.75x to 1.5x
  `image_size` (so both orientations occur), a low-contrast gradient with
  mild noise holding min_objects..max_objects filled polygons (box sides 25%
  to 60% of the image's, overlapping little). Class c's objects have the
  shape `class_shape(c)` and the colour `class_colour(c, num_classes)`, and
  its category id is `synthetic_category_id(c)`. Each object's segmentation
  is its polygon, and its pixels are exactly pycocotools' rasterisation of
  it. Everything is a function of the seed; train and eval images differ.
  The images and annotations go through the same checks and rules as a
  JSON on disk (`coco_gt` is that JSON); min_size and max_size default to a
  small resize (buckets 128x224 and 224x128).

  max_boxes: the batches' gt slots (None: max_objects).
  """
  if isinstance(image_size, (int, np.integer)):
    image_size = (image_size, image_size)
  size = tuple(int(s) for s in image_size)
  if len(size) != 2 or min(size) < 8:
    raise ConfigError(f'image_size={list(size)}: expected sides >= 8')
  if num_train < 1 or num_eval < 1:
    raise ConfigError(f'synthetic COCO needs at least one train and one eval '
                      f'image, got {num_train} and {num_eval}')
  if num_classes < 1:
    raise ConfigError(f'num_classes must be >= 1, got {num_classes}')
  if not 0 <= min_objects <= max_objects:
    raise ConfigError(f'objects per image from {min_objects} to '
                      f'{max_objects}: expected 0 <= min <= max')
  max_boxes = max(max_objects, 1) if max_boxes is None else int(max_boxes)
  if max_boxes < max_objects:
    raise ConfigError(f'max_boxes={max_boxes} is below max_objects='
                      f'{max_objects}, the most boxes of a synthetic image')
  kw = dict(min_size=min_size, max_size=max_size,
            size_divisibility=size_divisibility, buckets=buckets,
            max_boxes=max_boxes, mask_resolution=mask_resolution, seed=seed,
            num_workers=num_workers, prefetch=prefetch)
  out = []
  for split, (params, js) in zip((TRAIN_SPLIT, EVAL_SPLIT), _synthetic_splits(
      num_train, num_eval, size, num_classes, seed, min_objects,
      max_objects)):
    train = split == TRAIN_SPLIT
    where = f'synthetic-coco-{split}'
    args = _parse_instances(js, where, where, train)
    kept = [params[i - 1] for i in args['image_ids']]
    args['images'] = lambda i, kept=kept: kept[i].render(num_classes)
    try:
      out.append(CocoDataset(**args, name=where,
                             hflip_prob=hflip_prob if train else 0.0, **kw))
    except BaseException:
      for ds in out:
        ds.close()
      raise
  return out[0], out[1]


def _synthetic_splits(num_train: int, num_eval: int, size: tuple[int, int],
                      num_classes: int, seed: int, min_objects: int,
                      max_objects: int
                      ) -> list[tuple[list[_PolygonImage], dict[str, Any]]]:
  """[(images, instances dict)] of the train and eval splits; image ids
  1..N in order."""
  out = []
  for split, n in ((1, num_train), (2, num_eval)):
    params = [_PolygonImage(np.random.default_rng([seed, _SYNTH, split, i]),
                            size, num_classes, min_objects, max_objects)
              for i in range(n)]
    out.append((params, _synthetic_instances(params, num_classes)))
  return out


def write_synthetic_coco(root: str | os.PathLike, num_train: int,
                         num_eval: int, *, num_classes: int = 8,
                         image_size: Sequence[int] | int = 128, seed: int = 0,
                         min_objects: int = 1, max_objects: int = 3) -> str:
  """Renders `synthetic_coco` images and writes them in the COCO layout under
  `root` (JPEG quality 95, the full instances JSON); returns root."""
  root = os.fspath(root)
  if isinstance(image_size, (int, np.integer)):
    image_size = (image_size, image_size)
  size = tuple(int(s) for s in image_size)
  splits = _synthetic_splits(num_train, num_eval, size, num_classes, seed,
                             min_objects, max_objects)
  for split, (params, js) in zip((TRAIN_SPLIT, EVAL_SPLIT), splits):
    images = [{**e, 'image': p.render(num_classes)}
              for p, e in zip(params, js['images'])]
    write_coco_split(root, split, images, js['annotations'],
                     js['categories'])
  return root
