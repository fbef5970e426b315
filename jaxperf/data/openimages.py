"""OpenImages (MLPerf subset) for RetinaNet, and a synthetic stand-in.

On disk, as the MLPerf reference (single_stage_detector) reads it, under a
root directory:

    train/data/<file_name>                      JPEG images
    train/labels/openimages-mlperf.json         COCO-format annotations
    validation/data/<file_name>
    validation/labels/openimages-mlperf.json

The JSON holds `images` [{id, file_name, width, height}], `annotations`
[{id, image_id, bbox [x, y, w, h] in pixels, category_id, area, iscrowd}] and
`categories` [{id, name}] (264 categories in the MLPerf subset).

Reading follows the reference (torchvision's CocoDetection and its
transforms):

* Every image of the JSON is used, in the order of its image id; none is
  dropped for having no boxes.
* Boxes go from (x, y, w, h) to (x1, y1, x2, y2) in float32, x is clamped to
  [0, width] and y to [0, height], and boxes with x2 <= x1 or y2 <= y1 are
  dropped (counted in `dropped_boxes`). iscrowd is not looked at: every box
  trains.
* Category ids become class indices 0..C-1 in the order of the sorted ids of
  `categories` (identical to the ids when they are 0..C-1, as in the
  reference's JSON); `category_ids` maps them back.
* The image is decoded to RGB and scaled to float32 in [0, 1] (uint8 / 255),
  flipped horizontally with probability `hflip_prob` in training (boxes: x1'
  = W - x2, x2' = W - x1), and resized to exactly `image_size` (aspect not
  kept) by `resize_bilinear`, torch's interpolate(mode='bilinear',
  align_corners=False) without antialiasing; boxes are scaled by
  (new_w / W, new_h / H). The flip is applied to the resized image, which is
  the same as resizing the flipped one (the resize is mirror symmetric).

Checks when a split is opened (each a DataError naming the file and what was
expected): the layout, the JSON's structure, annotations of unknown images or
categories, boxes outside their image by more than 1 pixel (within that they
are clamped, as the reference does), images with more boxes than
`max_boxes`, and image files missing from data/. When an image is read: a
file that does not decode, or decodes to another size than the JSON's.

Training order (the reference's RandomSampler with drop_last): epoch e visits
the images in permutation(seed, e), cut into N // global_batch batches (the
last N mod global_batch of each permutation are left out); process p of P
takes rows [p * b, (p + 1) * b) of each global batch, b = global_batch / P.
Whether an image is flipped depends on (seed, epoch, image) only. So the
stream depends on nothing but the seed and the step. Evaluation reads every
image once, in order, the last batch padded.

Batches (numpy; b rows for this process, G = max_boxes, (H, W) = image_size):

    train: 'image'  float32 [b, H, W, 3] in [0, 1]
           'boxes'  float32 [b, G, 4]    (x1, y1, x2, y2), resized pixels,
                                         zero padding
           'labels' int32 [b, G]         class index, 0 padding
           'valid'  bool [b, G]          False on padding
    eval:  'image'  float32 [b, H, W, 3]
           'index'  int32 [b]            position in the dataset, 0 padding
           'mask'   bool [b]             False on padding rows

Predictions map back to the JSON's coordinates and ids with
`DetectionDataset.to_coco_results`, to score against `coco_gt` with
pycocotools.

API:
  open_openimages(data_dir, ...) -> (train, eval) `DetectionDataset`s.
  synthetic_shapes(num_train, num_eval, ...) -> (train, eval): learnable
      images of coloured shapes, the class given by shape and colour.
  write_coco_split(root, split, images, annotations, categories) writes a
      split in the reference layout; write_synthetic_openimages writes a
      synthetic set.
  resize_bilinear(image, size): the reference's resize, in numpy.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxperf.data.augment import decode_image, local_batch_size
from jaxperf.data import coco_format, prefetch
from jaxperf.data.prefetch import PrefetchedStreams
from jaxperf.errors import ConfigError, DataError

IMAGE_SIZE = (800, 800)
# Ground-truth boxes per image the batches hold; an image with more is an
# error (raise max_boxes).
MAX_BOXES = 256
HFLIP_PROB = 0.5
LABELS_FILE = 'openimages-mlperf.json'
TRAIN_SPLIT, EVAL_SPLIT = 'train', 'validation'
# How far (pixels) a box may reach outside its image and still be clamped.
BOX_TOLERANCE = 1.0
JPEG_QUALITY = coco_format.JPEG_QUALITY
encode_jpeg = coco_format.encode_jpeg

_LAYOUT = ('{split}/data/<file_name> (JPEG images) and '
           f'{{split}}/labels/{LABELS_FILE} (COCO-format JSON with images, '
           'annotations and categories)')
# Seed-sequence tags: keep the streams of different purposes apart.
_ORDER, _FLIP, _SYNTH, _NOISE = 1, 2, 3, 4
# Training batches submitted to the pool ahead of the one being assembled.
_IN_FLIGHT = 2
# The keys every annotation must hold.
_ANN_KEYS = ('id', 'image_id', 'bbox', 'category_id')

# ---------------------------------------------------------------- resize


def _linear_taps(in_size: int, out_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(lower index, upper index, lower weight, upper weight) per output pixel,
  as torch computes them for bilinear, align_corners=False."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5))
  src = np.maximum(src - np.float32(0.5), np.float32(0))
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - lower.astype(np.float32), 0, 1).astype(np.float32)
  upper = np.minimum(lower + 1, in_size - 1)
  return lower, upper, np.float32(1) - lam, lam


def resize_bilinear(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Resizes an [h, w, C] float image to size = (H, W), float32.

  torch.nn.functional.interpolate(mode='bilinear', align_corners=False,
  antialias=False) on the image as [1, C, h, w]: output pixel i samples the
  source at max((i + 0.5) * in / out - 0.5, 0) between its floor and the next
  pixel (the last pixel repeats past the edge). Separable: along the width,
  then the height, which is torch's order of summation.
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise ValueError(f'expected an [h, w, C] image, got shape {image.shape}')
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1:
    raise ValueError(f'output size must be positive, got {tuple(size)}')
  in_h, in_w = image.shape[:2]
  if in_w != out_w:
    lo, hi, w0, w1 = _linear_taps(in_w, out_w)
    image = (np.take(image, lo, axis=1) * w0[None, :, None]
             + np.take(image, hi, axis=1) * w1[None, :, None])
  if in_h != out_h:
    lo, hi, w0, w1 = _linear_taps(in_h, out_h)
    image = (np.take(image, lo, axis=0) * w0[:, None, None]
             + np.take(image, hi, axis=0) * w1[:, None, None])
  return image


def _size2(value: Any, name: str) -> tuple[int, int]:
  if isinstance(value, (int, np.integer)):
    value = (value, value)
  size = tuple(int(s) for s in value)
  if len(size) != 2 or min(size) < 1:
    raise ConfigError(f'{name}={list(size)}: expected two positive sides '
                      f'(height, width)')
  return size


# ---------------------------------------------------------------- dataset


class DetectionDataset(PrefetchedStreams):
  """Train and eval batch streams over images with boxes.

  Args:
    images: the images, in dataset order: file paths (JPEG/PNG), or a
      function index -> uint8 [h, w, 3] (an in-memory renderer).
    sizes: int [N, 2], each image's (height, width).
    boxes: per image, float32 [n_i, 4] (x1, y1, x2, y2) in the image's pixels,
      clamped to the image, x2 > x1 and y2 > y1.
    labels: per image, int [n_i] class indices in [0, len(category_ids)).
    category_ids: class index -> category id of `coco_gt`.
    image_ids: the `coco_gt` image id of each image.
    coco_gt: the COCO-format ground truth (images, annotations, categories)
      that predictions are scored against.
    image_size: (H, W) the images are resized to.
    max_boxes: G, the box slots of a training batch row.
    seed: the order and flips derive from it.
    hflip_prob: probability of a horizontal flip in training.
    num_workers: threads that decode and resize.
    prefetch: batches assembled ahead (0: in the caller's thread).
    name: what error messages and `describe` call the dataset.
    dropped_boxes: degenerate boxes left out of `boxes` (for `describe`).
    labels_file: the annotation file, named in error messages.
  """

  def __init__(self, images: Sequence[str] | Callable[[int], np.ndarray], *,
               sizes: Any, boxes: Sequence[np.ndarray],
               labels: Sequence[np.ndarray], category_ids: Sequence[int],
               image_ids: Sequence[Any], coco_gt: dict[str, Any],
               image_size: Sequence[int] | int = IMAGE_SIZE,
               max_boxes: int = MAX_BOXES, seed: int = 0,
               hflip_prob: float = HFLIP_PROB, num_workers: int = 4,
               prefetch: int = 2, name: str = 'detection',
               dropped_boxes: int = 0, labels_file: str | None = None):
    if max_boxes < 1:
      raise ConfigError(f'max_boxes must be >= 1, got {max_boxes}')
    if seed < 0:
      raise ConfigError(f'the data seed must be >= 0, got {seed}')
    if not 0.0 <= hflip_prob <= 1.0:
      raise ConfigError(f'hflip_prob={hflip_prob}: expected a probability in '
                        f'[0, 1]')
    if num_workers < 1:
      raise ConfigError(f'num_workers must be >= 1, got {num_workers}')
    if prefetch < 0:
      raise ConfigError(f'prefetch must be >= 0, got {prefetch}')
    self.image_size = _size2(image_size, 'image_size')
    self.sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    n = len(self.sizes)
    if callable(images):
      self._render, self.paths = images, None
    else:
      self._render, self.paths = None, [os.fspath(p) for p in images]
      if len(self.paths) != n:
        raise ValueError(f'{len(self.paths)} images and {n} sizes')
    if len(boxes) != n or len(labels) != n or len(image_ids) != n:
      raise ValueError(f'{n} images but {len(boxes)} box arrays, '
                       f'{len(labels)} label arrays and {len(image_ids)} ids')
    self.name = name
    self.labels_file = labels_file
    self.num_examples = n
    self.category_ids = tuple(int(c) for c in category_ids)
    self.num_classes = len(self.category_ids)
    self.image_ids = np.asarray(image_ids)
    self.coco_gt = coco_gt
    self.max_boxes = int(max_boxes)
    self.seed = int(seed)
    self.hflip_prob = float(hflip_prob)
    self.dropped_boxes = int(dropped_boxes)
    counts = np.asarray([len(b) for b in boxes], np.int64)
    self._offsets = np.concatenate([[0], np.cumsum(counts)])
    self._boxes = (np.concatenate([np.asarray(b, np.float32).reshape(-1, 4)
                                   for b in boxes]) if n else
                   np.zeros((0, 4), np.float32))
    self._labels = (np.concatenate([np.asarray(c, np.int32).reshape(-1)
                                    for c in labels]) if n else
                    np.zeros((0,), np.int32))
    if len(self._labels) != len(self._boxes):
      raise ValueError('every image needs one label per box')
    if len(self._labels) and (self._labels.min() < 0 or
                              self._labels.max() >= self.num_classes):
      raise ValueError(f'labels must lie in [0, {self.num_classes})')
    if n and counts.max() > self.max_boxes:
      i = int(np.argmax(counts > self.max_boxes))
      raise DataError(
          f'{self.where(i)}: {counts[i]} boxes, more than max_boxes='
          f'{self.max_boxes} (the box slots of a batch row); raise max_boxes '
          f'to at least {counts.max()}, the most boxes of an image in '
          f'{self.labels_file or self.name}')
    self._init_streams(prefetch, num_workers, pool_name='io')

  # --- examples --------------------------------------------------------------
  @property
  def num_boxes(self) -> int:
    """Boxes over all images (after dropping degenerate ones)."""
    return len(self._boxes)

  def describe(self) -> str:
    """One line: images, boxes, classes, dropped boxes, output size."""
    h, w = self.image_size
    return (f'{self.name}: {self.num_examples} images, {self.num_boxes} '
            f'boxes of {self.num_classes} classes ({self.dropped_boxes} '
            f'degenerate boxes dropped), resized to {h}x{w}')

  def where(self, index: int) -> str:
    """What error messages call image `index`: its file, or its id."""
    if self.paths is not None:
      return self.paths[index]
    return f'{self.name} image {self.image_ids[index]}'

  def boxes(self, index: int) -> np.ndarray:
    """Image `index`'s boxes, float32 [n, 4] (x1, y1, x2, y2), its pixels."""
    return self._boxes[self._offsets[index]:self._offsets[index + 1]].copy()

  def labels(self, index: int) -> np.ndarray:
    """Image `index`'s class indices, int32 [n]."""
    return self._labels[self._offsets[index]:self._offsets[index + 1]].copy()

  def read_image(self, index: int) -> np.ndarray:
    """Image `index` decoded: uint8 [height, width, 3]; DataError if the file
    does not decode or has another size than its annotations say."""
    height, width = (int(s) for s in self.sizes[index])
    if self._render is not None:
      return self._render(index)
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
    return np.asarray(img, np.uint8)

  def example(self, index: int, flip: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 [H, W, 3] image, float32 [n, 4] boxes, int32 [n] labels) of
    image `index`, resized to image_size (boxes in its pixels), flipped
    horizontally if `flip`."""
    pixels = self.read_image(index)
    height, width = (int(s) for s in self.sizes[index])
    image = resize_bilinear(pixels.astype(np.float32) / np.float32(255),
                            self.image_size)
    boxes = self.boxes(index)
    if flip:
      image = image[:, ::-1]
      boxes[:, [0, 2]] = np.float32(width) - boxes[:, [2, 0]]
    out_h, out_w = self.image_size
    ratio_w = np.float32(out_w) / np.float32(width)
    ratio_h = np.float32(out_h) / np.float32(height)
    boxes *= np.asarray([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
    return image, boxes, self.labels(index)

  # --- order -----------------------------------------------------------------
  def steps_per_epoch(self, global_batch: int) -> int:
    """Training steps per epoch: N // global_batch (drop_last)."""
    return self.num_examples // int(global_batch)

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

  def _steps(self, global_batch: int) -> int:
    steps = self.steps_per_epoch(global_batch)
    if not steps:
      raise DataError(f'{self.name}: {self.num_examples} images, fewer than '
                      f'one global batch of {global_batch}')
    return steps

  def train_order(self, step: int, global_batch: int, *,
                  process_index: int = 0, process_count: int = 1
                  ) -> tuple[np.ndarray, int]:
    """(image indices, epoch) of this process's slice of batch `step`."""
    local = local_batch_size(global_batch, process_count, process_index)
    epoch, k = divmod(int(step), self._steps(global_batch))
    first = k * global_batch + process_index * local
    return self.permutation(epoch)[first:first + local], epoch

  # --- streams ---------------------------------------------------------------
  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """The endless training stream from batch `start_step` on.

    Yields this process's slice of each global batch: {'image' float32
    [b, H, W, 3], 'boxes' float32 [b, G, 4], 'labels' int32 [b, G], 'valid'
    bool [b, G]}.
    """
    if start_step < 0:
      raise ConfigError(f'start_step must be >= 0, got {start_step}')
    local = local_batch_size(global_batch, process_count, process_index)
    steps = self._steps(global_batch)

    def jobs():
      step, epoch, order = int(start_step), None, None
      while True:
        e, k = divmod(step, steps)
        if e != epoch:
          epoch, order = e, self.permutation(e)
        first = k * global_batch + process_index * local
        index = order[first:first + local].tolist()
        yield self._submit(index, [self.flipped(e, i) for i in index])
        step += 1
    return self._prefetched(self._assemble(jobs()))

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every image once, in order, unflipped, the last batch padded.

    Yields this process's contiguous share of each global batch: {'image'
    float32 [b, H, W, 3], 'index' int32 [b], 'mask' bool [b]}; padding rows
    are black, index 0, mask False.
    """
    local = local_batch_size(global_batch, process_count, process_index)

    def jobs():
      for start in range(0, self.num_examples, global_batch):
        first = start + process_index * local
        index = list(range(first, min(first + local, self.num_examples)))
        yield self._submit(index, None, pad_to=local)
    return self._prefetched(self._assemble(jobs()))

  def _assemble(self, jobs: Iterator) -> Iterator[dict[str, np.ndarray]]:
    """Keeps `_IN_FLIGHT` batches submitted; yields them in order, complete."""
    return prefetch.completed_in_order(jobs, _IN_FLIGHT)

  def _submit(self, index: list[int], flips: list[bool] | None, *,
              pad_to: int | None = None):
    """Starts filling a batch: (arrays being filled, their futures)."""
    real = len(index)
    n = real if pad_to is None else pad_to
    h, w = self.image_size
    batch = {'image': np.empty((n, h, w, 3), np.float32)}
    batch['image'][real:] = 0
    if flips is None:
      batch['index'] = np.zeros((n,), np.int32)
      batch['index'][:real] = index
      batch['mask'] = np.arange(n) < real
    else:
      g = self.max_boxes
      batch['boxes'] = np.zeros((n, g, 4), np.float32)
      batch['labels'] = np.zeros((n, g), np.int32)
      batch['valid'] = np.zeros((n, g), bool)
    pool = self._executor()
    futures = [pool.submit(self._fill, batch, j, i,
                           None if flips is None else flips[j])
               for j, i in enumerate(index)]
    return batch, futures

  def _fill(self, batch, j: int, index: int, flip: bool | None) -> None:
    image, boxes, labels = self.example(index, bool(flip))
    batch['image'][j] = image
    if flip is not None:
      k = len(boxes)
      batch['boxes'][j, :k] = boxes
      batch['labels'][j, :k] = labels
      batch['valid'][j, :k] = True

  # --- predictions -----------------------------------------------------------
  def to_coco_results(self, index: Any, boxes: Any, scores: Any, classes: Any,
                      valid: Any = None) -> list[dict[str, Any]]:
    """Detections in COCO result format, to score against `coco_gt`.

    Args:
      index: int [n], the images' positions (an eval batch's 'index', rows
        with mask True only).
      boxes: float [n, K, 4] (x1, y1, x2, y2) in resized (image_size) pixels.
      scores: float [n, K].
      classes: int [n, K] class indices.
      valid: bool [n, K], which detections are real (None: all).

    Returns:
      [{'image_id', 'category_id', 'bbox' [x, y, w, h] in the original
      image's pixels, 'score'}], boxes scaled back by (W / new_w, H / new_h)
      as torchvision's postprocess does.
    """
    index = np.asarray(index, np.int64).reshape(-1)
    boxes = np.asarray(boxes, np.float32).reshape(len(index), -1, 4)
    scores = np.asarray(scores, np.float32).reshape(len(index), -1)
    classes = np.asarray(classes, np.int64).reshape(len(index), -1)
    if valid is None:
      valid = np.ones(scores.shape, bool)
    valid = np.asarray(valid, bool).reshape(scores.shape)
    out_h, out_w = self.image_size
    categories = np.asarray(self.category_ids, np.int64)
    results = []
    for row, i in enumerate(index.tolist()):
      keep = valid[row]
      if not keep.any():
        continue
      height, width = self.sizes[i]
      rw = np.float32(width) / np.float32(out_w)
      rh = np.float32(height) / np.float32(out_h)
      b = boxes[row][keep] * np.asarray([rw, rh, rw, rh], np.float32)
      xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
      image_id = self.image_ids[i].item()
      for box, score, cl in zip(xywh.tolist(), scores[row][keep].tolist(),
                                categories[classes[row][keep]].tolist()):
        results.append({'image_id': image_id, 'category_id': cl,
                        'bbox': box, 'score': score})
    return results


# ---------------------------------------------------------------- reading


def _read_split(data_dir: str, split: str) -> dict[str, Any]:
  """Reads and checks one split: the DetectionDataset's arguments."""
  split_dir = os.path.join(data_dir, split)
  images_dir = os.path.join(split_dir, 'data')
  path = os.path.join(split_dir, 'labels', LABELS_FILE)
  layout = _LAYOUT.format(split=os.path.join(data_dir, split))
  for d in (split_dir, images_dir):
    if not os.path.isdir(d):
      raise DataError(f'{d}: no such directory (expected the OpenImages '
                      f'layout: {layout})')
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file (expected the OpenImages '
                    f'layout: {layout})')
  js = coco_format.load_json(path)
  parsed = coco_format.parse_split(js, path, images_dir, _ANN_KEYS)
  # Every image of the JSON, in the order of its id (torchvision's
  # CocoDetection order), must be there.
  files = parsed.files
  images = [os.path.join(images_dir, f) for f in files]
  coco_format.check_files(images, images_dir, path, 'listed in')

  # Annotations: image, category (sorted ids -> contiguous class indices),
  # box.
  category_ids = sorted(parsed.category_ids)
  pos = parsed.positions()
  cls = parsed.category_indices({c: k for k, c in enumerate(category_ids)},
                               lambda k: files[pos[k]])
  xywh = parsed.bboxes(pos)
  w_img = parsed.widths[pos].astype(np.float64)
  h_img = parsed.heights[pos].astype(np.float64)
  xs = np.stack([xywh[:, 0], xywh[:, 0] + xywh[:, 2]], axis=1)
  ys = np.stack([xywh[:, 1], xywh[:, 1] + xywh[:, 3]], axis=1)
  parsed.check_inside((xs.min(axis=1) < -BOX_TOLERANCE) |
                     (ys.min(axis=1) < -BOX_TOLERANCE) |
                     (xs.max(axis=1) > w_img + BOX_TOLERANCE) |
                     (ys.max(axis=1) > h_img + BOX_TOLERANCE),
                     pos, BOX_TOLERANCE)
  # As the reference: float32 corners, clamped, degenerate boxes dropped.
  b32 = xywh.astype(np.float32)
  corners = np.concatenate([b32[:, :2], b32[:, :2] + b32[:, 2:]], axis=1)
  wh = np.stack([w_img, h_img], axis=1).astype(np.float32)
  corners = np.clip(corners, 0, np.concatenate([wh, wh], axis=1))
  keep = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
  dropped = int(len(keep) - keep.sum())
  pos, cls, corners = pos[keep], cls[keep], corners[keep]
  order = np.argsort(pos, kind='stable')
  pos, cls, corners = pos[order], cls[order], corners[order]
  splits = np.cumsum(np.bincount(pos, minlength=len(files)))[:-1]
  return dict(
      images=images,
      sizes=np.stack([parsed.heights, parsed.widths], axis=1),
      boxes=np.split(corners, splits), labels=np.split(cls, splits),
      category_ids=category_ids, image_ids=parsed.image_ids, coco_gt=js,
      dropped_boxes=dropped, labels_file=path)


def open_openimages(data_dir: str | os.PathLike, *,
                    image_size: Sequence[int] | int = IMAGE_SIZE,
                    max_boxes: int = MAX_BOXES, seed: int = 0,
                    hflip_prob: float = HFLIP_PROB, num_workers: int = 4,
                    prefetch: int = 2, name: str = 'openimages-mlperf'
                    ) -> tuple[DetectionDataset, DetectionDataset]:
  """(train, eval) from `data_dir`/train and `data_dir`/validation.

  Both are checked when opened (see the module docstring); the eval split's
  categories must be the training split's.
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: no such directory (expected the OpenImages '
                    f'layout: {_LAYOUT.format(split="<train|validation>")})')
  if max_boxes < 1:
    raise ConfigError(f'max_boxes must be >= 1, got {max_boxes}')
  kw = dict(image_size=image_size, max_boxes=max_boxes, seed=seed,
            num_workers=num_workers, prefetch=prefetch)
  train_split = _read_split(data_dir, TRAIN_SPLIT)
  eval_split = _read_split(data_dir, EVAL_SPLIT)
  if eval_split['category_ids'] != train_split['category_ids']:
    raise DataError(
        f'{eval_split["labels_file"]}: categories differ from those of '
        f'{train_split["labels_file"]} ({len(eval_split["category_ids"])} vs '
        f'{len(train_split["category_ids"])} ids); expected the same '
        f'categories in both splits')
  train = DetectionDataset(**train_split, hflip_prob=hflip_prob,
                           name=f'{name}-{TRAIN_SPLIT}', **kw)
  try:
    evaluation = DetectionDataset(**eval_split, hflip_prob=0.0,
                                  name=f'{name}-{EVAL_SPLIT}', **kw)
  except BaseException:
    train.close()
    raise
  return train, evaluation


# ---------------------------------------------------------------- writing


def write_coco_split(root: str | os.PathLike, split: str,
                     images: Sequence[Mapping[str, Any]],
                     annotations: Sequence[Mapping[str, Any]],
                     categories: Sequence[Mapping[str, Any]]) -> str:
  """Writes one split in the reference layout; returns the JSON's path.

  Args:
    root: the dataset root; the split goes to root/split/data and
      root/split/labels/openimages-mlperf.json.
    split: 'train' or 'validation' (any name is written).
    images: the images, as `coco_format.write_split` takes them (pixels
      are written as JPEG, quality 95).
    annotations: written to the JSON as given.
    categories: written to the JSON as given.
  """
  split_dir = os.path.join(os.fspath(root), split)
  return coco_format.write_split(
      os.path.join(split_dir, 'data'),
      os.path.join(split_dir, 'labels', LABELS_FILE), images, annotations,
      categories)


# ---------------------------------------------------------------- synthetic

SHAPES = ('rectangle', 'ellipse', 'triangle', 'diamond', 'cross')
# Object box sides as fractions of the image's side.
_OBJECT_SIDE = (0.25, 0.6)
# Original image sides as fractions of image_size.
_IMAGE_SCALE = (0.75, 1.5)
# Most of the smaller box another object may cover.
_MAX_OVERLAP = 0.25
_PLACEMENT_TRIES = 30
_NOISE_STD = 0.02


def class_shape(c: int) -> str:
  """The shape of class `c`'s objects."""
  return SHAPES[c % len(SHAPES)]


def class_colour(c: int, num_classes: int) -> np.ndarray:
  """The RGB colour (float32 in [0, 1]) of class `c`'s objects: a saturated
  hue of its own, evenly spaced around the colour wheel."""
  return np.asarray(colorsys.hsv_to_rgb(c / num_classes, 0.85, 0.95),
                    np.float32)


def _shape_mask(kind: str, h: int, w: int) -> np.ndarray:
  """bool [h, w]: the pixels (by centre) inside a shape filling an h x w box."""
  u = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1   # -1..1
  v = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
  u, v = np.abs(u)[None, :], v[:, None]
  if kind == 'rectangle':
    return np.ones((h, w), bool)
  if kind == 'ellipse':
    return u * u + v * v <= 1
  if kind == 'triangle':     # apex at the top centre, base along the bottom
    return u <= (v + 1) / 2 + 0.5 / w
  if kind == 'diamond':
    return u + np.abs(v) <= 1 + 0.5 / min(h, w)
  if kind == 'cross':
    return (u <= 1 / 3) | (np.abs(v) <= 1 / 3)
  raise ValueError(f'unknown shape {kind!r}')


class _SyntheticImage:
  """One synthetic image's parameters; `render` draws it."""

  def __init__(self, rng: np.random.Generator, image_size: tuple[int, int],
               num_classes: int, min_objects: int, max_objects: int):
    lo, hi = _IMAGE_SCALE
    self.height, self.width = (max(8, int(round(s * rng.uniform(lo, hi))))
                               for s in image_size)
    self.base = (rng.uniform(0.35, 0.65)
                 + rng.uniform(-0.05, 0.05, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    self.gradient = (rng.uniform(0.05, 0.15) * np.asarray(
        [np.cos(angle), np.sin(angle)])).astype(np.float32)
    self.noise_key = int(rng.integers(2**63))
    count = int(rng.integers(min_objects, max_objects + 1))
    self.objects: list[tuple[int, int, int, int, int, float]] = []
    for _ in range(count):
      self.objects.append(self._place(rng, num_classes))

  def _place(self, rng, num_classes):
    """(class, x0, y0, w, h, brightness) of a new object overlapping the
    others little (the least overlapping of a few tries)."""
    lo, hi = _OBJECT_SIDE
    best, best_overlap = None, None
    for _ in range(_PLACEMENT_TRIES):
      w = max(2, int(round(self.width * rng.uniform(lo, hi))))
      h = max(2, int(round(self.height * rng.uniform(lo, hi))))
      x0 = int(rng.integers(0, self.width - w + 1))
      y0 = int(rng.integers(0, self.height - h + 1))
      overlap = 0.0
      for _, ox, oy, ow, oh, _ in self.objects:
        iw = min(x0 + w, ox + ow) - max(x0, ox)
        ih = min(y0 + h, oy + oh) - max(y0, oy)
        if iw > 0 and ih > 0:
          overlap = max(overlap, iw * ih / min(w * h, ow * oh))
      if best is None or overlap < best_overlap:
        best, best_overlap = (x0, y0, w, h), overlap
      if overlap <= _MAX_OVERLAP:
        break
    c = int(rng.integers(num_classes))
    return (c, *best, float(rng.uniform(0.9, 1.0)))

  def boxes(self) -> np.ndarray:
    return np.asarray([[x, y, x + w, y + h]
                       for _, x, y, w, h, _ in self.objects],
                      np.float32).reshape(-1, 4)

  def labels(self) -> np.ndarray:
    return np.asarray([o[0] for o in self.objects], np.int32)

  def render(self, num_classes: int) -> np.ndarray:
    h, w = self.height, self.width
    yy = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]
    xx = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
    ramp = self.gradient[0] * xx + self.gradient[1] * yy       # [h, w]
    # Uniform noise of std _NOISE_STD (cheaper to draw than normal).
    noise = np.random.default_rng(self.noise_key).random((h, w, 3),
                                                         np.float32)
    image = ((noise - np.float32(0.5)) * np.float32(_NOISE_STD * 12**0.5)
             + ramp[:, :, None] + self.base)
    for c, x0, y0, ow, oh, bright in self.objects:
      mask = _shape_mask(class_shape(c), oh, ow)
      region = image[y0:y0 + oh, x0:x0 + ow]
      region[mask] = class_colour(c, num_classes) * np.float32(bright)
    image *= np.float32(255)
    image += np.float32(0.5)
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _synthetic_split(num_images: int, split: int, name: str, *,
                     image_size: tuple[int, int], num_classes: int,
                     max_boxes: int, seed: int, hflip_prob: float,
                     num_workers: int, prefetch: int, min_objects: int,
                     max_objects: int) -> DetectionDataset:
  params = [_SyntheticImage(np.random.default_rng([seed, _SYNTH, split, i]),
                            image_size, num_classes, min_objects, max_objects)
            for i in range(num_images)]
  image_ids = list(range(1, num_images + 1))
  categories = [{'id': c, 'name': f'{class_shape(c)}-{c}'}
                for c in range(num_classes)]
  annotations = []
  for p, image_id in zip(params, image_ids):
    for c, x, y, w, h, _ in p.objects:
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id,
          'bbox': [float(x), float(y), float(w), float(h)],
          'category_id': c, 'area': float(w * h), 'iscrowd': 0})
  coco_gt = {
      'images': [{'id': i, 'file_name': f'{i:08d}.jpg', 'width': p.width,
                  'height': p.height} for p, i in zip(params, image_ids)],
      'annotations': annotations, 'categories': categories}
  return DetectionDataset(
      lambda i: params[i].render(num_classes),
      sizes=[(p.height, p.width) for p in params],
      boxes=[p.boxes() for p in params], labels=[p.labels() for p in params],
      category_ids=range(num_classes), image_ids=image_ids, coco_gt=coco_gt,
      image_size=image_size, max_boxes=max_boxes, seed=seed,
      hflip_prob=hflip_prob, num_workers=num_workers, prefetch=prefetch,
      name=name)


def synthetic_shapes(num_train: int, num_eval: int, *,
                     image_size: Sequence[int] | int = (128, 128),
                     num_classes: int = 8, max_boxes: int | None = None,
                     seed: int = 0, hflip_prob: float = HFLIP_PROB,
                     num_workers: int = 2, prefetch: int = 2,
                     min_objects: int = 1, max_objects: int = 3
                     ) -> tuple[DetectionDataset, DetectionDataset]:
  """(train, eval) datasets of learnable synthetic detection images.

  Each image is 0.75x to 1.5x `image_size` per side (so batches go through
  the resize), a low-contrast gradient with mild noise, holding
  min_objects..max_objects filled shapes whose box sides are 25% to 60% of
  the image's, overlapping little. Class c's objects all have the shape
  `class_shape(c)` and the colour `class_colour(c, num_classes)` (a little
  darker at random), so shape and colour identify the class. Everything is
  a function of the seed; train and eval images differ. Category ids are
  0..num_classes-1 and image ids 1..N, as in `coco_gt`.

  max_boxes: the batches' box slots (None: max_objects).
  """
  size = _size2(image_size, 'image_size')
  if num_train < 1 or num_eval < 1:
    raise ConfigError(f'synthetic shapes need at least one train and one eval '
                      f'image, got {num_train} and {num_eval}')
  if num_classes < 1:
    raise ConfigError(f'num_classes must be >= 1, got {num_classes}')
  if not 0 <= min_objects <= max_objects:
    raise ConfigError(f'objects per image from {min_objects} to '
                      f'{max_objects}: expected 0 <= min <= max')
  max_boxes = max_objects if max_boxes is None else int(max_boxes)
  if max_boxes < max_objects:
    raise ConfigError(f'max_boxes={max_boxes} is below max_objects='
                      f'{max_objects}, the most boxes of a synthetic image')
  kw = dict(image_size=size, num_classes=num_classes, max_boxes=max_boxes,
            seed=seed, hflip_prob=hflip_prob, num_workers=num_workers,
            prefetch=prefetch, min_objects=min_objects,
            max_objects=max_objects)
  train = _synthetic_split(num_train, 1, 'synthetic-shapes-train', **kw)
  evaluation = _synthetic_split(num_eval, 2, 'synthetic-shapes-eval',
                                **{**kw, 'hflip_prob': 0.0})
  return train, evaluation


def write_synthetic_openimages(root: str | os.PathLike, num_train: int,
                               num_eval: int, *,
                               image_size: Sequence[int] | int = (128, 128),
                               num_classes: int = 8, seed: int = 0,
                               min_objects: int = 1, max_objects: int = 3
                               ) -> str:
  """Renders `synthetic_shapes` images and writes them as an on-disk dataset
  in the reference layout under `root` (JPEG quality 95); returns root."""
  root = os.fspath(root)
  datasets = synthetic_shapes(
      num_train, num_eval, image_size=image_size, num_classes=num_classes,
      seed=seed, num_workers=1, prefetch=0, min_objects=min_objects,
      max_objects=max_objects)
  for split, ds in zip((TRAIN_SPLIT, EVAL_SPLIT), datasets):
    gt = ds.coco_gt
    images = [{**e, 'image': ds.read_image(i)}
              for i, e in enumerate(gt['images'])]
    write_coco_split(root, split, images, gt['annotations'],
                     gt['categories'])
    ds.close()
  return root
