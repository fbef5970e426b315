"""RoIAlign and FPN multi-level RoI pooling on NHWC feature maps.

`roi_align` computes exactly what torchvision.ops.roi_align computes (its CPU
and CUDA kernels, which come from Caffe2): every output bin averages
`sampling_ratio x sampling_ratio` bilinearly interpolated points laid out on a
regular grid inside the bin; a point above -1 and below the map size is
clamped into it, a point further out contributes zero but still counts in the
average. `aligned=True` shifts the box by half a pixel (Detectron2); the
legacy `aligned=False`, used by the MLPerf Mask R-CNN reference and by
torchvision's MultiScaleRoIAlign, stretches boxes smaller than one feature
pixel to one pixel instead.

`roi_level` assigns boxes to FPN levels by eq. (1) of the FPN paper, either as
torchvision's LevelMapper or as the reference's (maskrcnn-benchmark), and
`multilevel_roi_align` pools every box from its level, like torchvision's
MultiScaleRoIAlign and the reference's Pooler, in one gather for all levels.

Everything works on static shapes under jax.jit: the bilinear neighbours of
all sample points are gathered from the feature map flattened to
[B * H * W, C], with all channels of a pixel in one row. Boxes get no
gradient (torchvision's roi_align has none for them either); features get the
exact gradient of the interpolation through the gather (a scatter-add).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _pair(size, name: str) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    size = (size, size)
  size = tuple(int(s) for s in size)
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f'{name} must be a positive int or a pair of them, '
                     f'got {size}')
  return size


def _split_rois(boxes, batch_indices, batch_size: int
                ) -> tuple[jax.Array, jax.Array]:
  """(batch index [K] int32, boxes [K, 4] float) from either box format."""
  boxes = jnp.asarray(boxes)
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  if boxes.ndim != 2 or boxes.shape[1] not in (4, 5):
    raise ValueError('boxes must be [K, 5] (batch_index, x1, y1, x2, y2) or '
                     f'[K, 4] with batch_indices, got shape {boxes.shape}')
  if boxes.shape[1] == 5:
    if batch_indices is not None:
      raise ValueError('batch_indices is only for [K, 4] boxes; [K, 5] boxes '
                       'carry the batch index in their first column')
    index, coords = boxes[:, 0].astype(jnp.int32), boxes[:, 1:]
  elif batch_indices is None:
    if batch_size != 1:
      raise ValueError('[K, 4] boxes need batch_indices when the batch holds '
                       f'{batch_size} images')
    index, coords = jnp.zeros(boxes.shape[:1], jnp.int32), boxes
  else:
    index = jnp.asarray(batch_indices).astype(jnp.int32)
    if index.shape != boxes.shape[:1]:
      raise ValueError(f'batch_indices must have shape {boxes.shape[:1]}, got '
                       f'{index.shape}')
    coords = boxes
  # Clipped only so that a bad index cannot read another image's rows.
  index = jnp.clip(index, 0, batch_size - 1)
  coords = jax.lax.stop_gradient(coords)
  if coords.dtype not in (jnp.float32, jnp.float64):
    coords = coords.astype(jnp.float32)
  return index, coords


def _axis_samples(start: jax.Array, length: jax.Array, bins: int,
                  sampling_ratio: int, max_grid: int, extent: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Rows (or columns) and weights of the sample points along one axis.

  Bilinear interpolation and the average over the grid factor into one
  weight per axis: the sample (iy, ix) of a bin is
  sum_{a, b} wy[a] * wx[b] * f[y_a, x_b] with a, b over the low and high
  neighbours, and the out-of-map rule (zero if either coordinate is out) is
  the product of one indicator per axis.

  Args:
    start: [K] first coordinate of the box, in feature pixels.
    length: [K] its length.
    bins: number of output bins along the axis.
    sampling_ratio: grid points per bin; <= 0 for the adaptive
      ceil(length / bins), with at most `max_grid` points.
    max_grid: static number of grid points of the adaptive case.
    extent: [K] or scalar size of the feature map along the axis.

  Returns:
    index [K, bins, 2 * grid] int32 neighbour rows, low and high alternating,
    and weight [K, bins, 2 * grid], zero for points off the map and for
    adaptive grid points past the box's own grid, and including 1 / grid.
  """
  dtype = length.dtype
  bin_size = length / bins
  if sampling_ratio > 0:
    grid = jnp.asarray(sampling_ratio, dtype)
    points = jnp.arange(sampling_ratio, dtype=dtype)
    used = None
  else:
    grid = jnp.clip(jnp.ceil(bin_size), 0, max_grid)
    points = jnp.arange(max_grid, dtype=dtype)
    used = points < grid[:, None, None]
    grid = jnp.maximum(grid, 1)[:, None, None]
  # The kernel's order of operations:
  # start + p * bin_size + (i + 0.5) * bin_size / grid.
  bin_size = bin_size[:, None, None]
  pos = (start[:, None, None]
         + jnp.arange(bins, dtype=dtype)[None, :, None] * bin_size
         + (points + 0.5) * bin_size / grid)  # [K, bins, grid]
  extent = jnp.asarray(extent, dtype)
  if extent.ndim:
    extent = extent[:, None, None]
  inside = (pos >= -1) & (pos <= extent)
  if used is not None:
    inside &= used
  # Clamping into [0, size - 1] reproduces the kernel's rules: below zero
  # reads row 0, and at or past the last row reads the last row alone.
  pos = jnp.clip(pos, 0, extent - 1)
  low = jnp.floor(pos)
  frac = pos - low
  low = low.astype(jnp.int32)
  high = jnp.minimum(low + 1, (extent - 1).astype(jnp.int32))
  scale = jnp.where(inside, 1 / grid, 0).astype(dtype)
  weight = jnp.stack([(1 - frac) * scale, frac * scale], -1)
  index = jnp.stack([low, high], -1)
  shape = pos.shape[:2] + (-1,)
  return index.reshape(shape), weight.reshape(shape)


def _roi_align_flat(table: jax.Array, base: jax.Array, coords: jax.Array,
                    spatial_scale, height, width,
                    output_size: tuple[int, int], sampling_ratio: int,
                    aligned: bool, max_grid: tuple[int, int]) -> jax.Array:
  """RoIAlign from rows of `table` [N, C] with per-box map geometry.

  The box k reads the map of `height[k] x width[k]` rows that starts at row
  `base[k]` of `table`, scaled by `spatial_scale[k]` (scalars broadcast).
  """
  out_h, out_w = output_size
  offset = 0.5 if aligned else 0.0
  scale = jnp.asarray(spatial_scale, coords.dtype)
  x1 = coords[:, 0] * scale - offset
  y1 = coords[:, 1] * scale - offset
  x2 = coords[:, 2] * scale - offset
  y2 = coords[:, 3] * scale - offset
  roi_w = x2 - x1
  roi_h = y2 - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1)
    roi_h = jnp.maximum(roi_h, 1)
  rows, wy = _axis_samples(y1, roi_h, out_h, sampling_ratio, max_grid[0],
                           height)
  cols, wx = _axis_samples(x1, roi_w, out_w, sampling_ratio, max_grid[1],
                           width)
  width = jnp.asarray(width, jnp.int32)
  if width.ndim:
    width = width[:, None, None, None, None]
  # [K, out_h, 2 * grid_h, out_w, 2 * grid_w]: the four neighbours of every
  # sample point, for all channels at once.
  index = (base[:, None, None, None, None]
           + rows[:, :, :, None, None] * width + cols[:, None, None, :, :])
  weight = wy[:, :, :, None, None] * wx[:, None, None, :, :]
  values = table.at[index].get(mode='promise_in_bounds')
  # An elementwise product and a sum (not an einsum), so that the compiler
  # may fuse the gather into the reduction.
  out = jnp.sum(values * weight[..., None], axis=(2, 4))
  return out.astype(table.dtype)


def _max_grid(sampling_ratio: int, max_sampling_grid, heights, widths,
              output_size: tuple[int, int]) -> tuple[int, int]:
  if sampling_ratio > 0:
    return sampling_ratio, sampling_ratio
  if max_sampling_grid is not None:
    return _pair(max_sampling_grid, 'max_sampling_grid')
  # ceil(length / bins) for any length below bins * (size // bins + 1) > size.
  return (max(h // output_size[0] + 1 for h in heights),
          max(w // output_size[1] + 1 for w in widths))


def roi_align(features: jax.Array, boxes: jax.Array,
              output_size: int | Sequence[int], spatial_scale=1.0,
              sampling_ratio: int = -1, aligned: bool = False, *,
              batch_indices: jax.Array | None = None,
              max_sampling_grid: int | Sequence[int] | None = None
              ) -> jax.Array:
  """RoIAlign of NHWC features, as torchvision.ops.roi_align.

  Every sample point of every box is interpolated from its four neighbouring
  feature pixels, gathered from the features flattened to [B * H * W, C] in
  one gather of [K, oh, 2 * gh, ow, 2 * gw] rows (the two neighbour rows of
  the gh grid rows times the two neighbour columns of the gw grid columns),
  all channels per row. Weighting and averaging is a product and a sum over
  the sample axes, which the compiler can fuse with the gather; where it does
  not, the gathered values take K * oh * ow * 4 * gh * gw * C elements (e.g.
  512 boxes x 14 x 14 bins x 4 neighbours x 2 x 2 points x 256 channels =
  411M float32 = 1.6 GB; 205 MB for 64 boxes), and so does the product
  scattered back into the [B * H * W, C] gradient of the features.

  Args:
    features: [B, H, W, C] feature maps.
    boxes: [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates, as
      torchvision takes them, or [K, 4] rows (x1, y1, x2, y2) with
      `batch_indices` (which may be left out when B == 1). Batch indices are
      clipped into [0, B - 1]. The boxes get no gradient.
    output_size: (oh, ow) bins, or an int for both.
    spatial_scale: factor from image to feature coordinates (e.g. 1/4 for a
      stride-4 map); a Python float or a traced scalar.
    sampling_ratio: grid points per bin along each axis. Static. If <= 0,
      each box uses ceil(roi_height / oh) x ceil(roi_width / ow) points, as
      torchvision does; with static shapes this samples a grid of
      `max_sampling_grid` points per bin and masks the unused ones, which
      costs a factor of about (max grid / 2)^2 over `sampling_ratio=2` (the
      MLPerf Mask R-CNN setting and the efficient path).
    aligned: shift boxes by -0.5 pixel (Detectron2); if False (legacy, the
      MLPerf reference), boxes are instead stretched to at least one pixel.
    batch_indices: [K] image index of each box, for [K, 4] boxes only.
    max_sampling_grid: static (gh, gw) bound, or an int for both, of the
      adaptive grid. Defaults to (H // oh + 1, W // ow + 1), enough for
      every box that fits in the feature map; a box that needs more points
      samples this many, evenly spread over each bin, which is no longer
      torchvision's value.

  Under jit, the compiler may fuse the multiply-adds of the sample
  coordinates, which then differ from the kernel's by a float32 rounding
  (an ulp of the coordinate in feature pixels) and move outputs by that
  times the bilinear slope: about 1e-5 for unit-variance features on maps
  of about 100 pixels.

  Returns:
    [K, oh, ow, C] pooled features in the features' dtype (accumulated in
    float32 or wider).
  """
  features = jnp.asarray(features)
  if features.ndim != 4:
    raise ValueError(f'features must be [B, H, W, C], got {features.shape}')
  output_size = _pair(output_size, 'output_size')
  sampling_ratio = int(sampling_ratio)
  batch, height, width, channels = features.shape
  index, coords = _split_rois(boxes, batch_indices, batch)
  grid = _max_grid(sampling_ratio, max_sampling_grid, [height], [width],
                   output_size)
  table = features.reshape(batch * height * width, channels)
  return _roi_align_flat(table, index * (height * width), coords,
                         spatial_scale, height, width, output_size,
                         sampling_ratio, aligned, grid)


def roi_level(boxes: jax.Array, k_min: int, k_max: int,
              canonical_scale: float = 224, canonical_level: int = 4,
              eps: float = 1e-6, legacy_plus_one: bool = False) -> jax.Array:
  """FPN level index of boxes, by eq. (1) of the FPN paper.

  With `legacy_plus_one=False`, torchvision's LevelMapper:
  floor(k0 + log2(sqrt(area) / s0) + eps) with area (x2 - x1) * (y2 - y1).
  With `legacy_plus_one=True`, the MLPerf reference's (maskrcnn-benchmark's
  LevelMapper on BoxList.area()): floor(k0 + log2(sqrt(area) / s0 + eps))
  with area (x2 - x1 + 1) * (y2 - y1 + 1): the "+1" pixel convention and
  eps inside the logarithm. Both clip to [k_min, k_max] and are computed in
  the boxes' float dtype (float32), in the references' order of operations.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2) in image coordinates.
    k_min: finest level (2 for P2 at stride 4).
    k_max: coarsest level (5 for P5 at stride 32).
    canonical_scale: s0, the size of a box that maps to `canonical_level`.
    canonical_level: k0.
    eps: the references' guard against rounding at exact level boundaries.
    legacy_plus_one: the MLPerf reference's formula, as described above.

  Returns:
    [...] int32 level index k - k_min, in [0, k_max - k_min]: the position
    of the box's level in the list of levels.
  """
  boxes = jnp.asarray(boxes)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f'boxes must be [..., 4], got shape {boxes.shape}')
  if boxes.dtype not in (jnp.float32, jnp.float64):
    boxes = boxes.astype(jnp.float32)
  boxes = jax.lax.stop_gradient(boxes)
  dtype = boxes.dtype
  plus = 1 if legacy_plus_one else 0
  area = ((boxes[..., 2] - boxes[..., 0] + plus)
          * (boxes[..., 3] - boxes[..., 1] + plus))
  ratio = jnp.sqrt(area) / jnp.asarray(canonical_scale, dtype)
  eps = jnp.asarray(eps, dtype)
  if legacy_plus_one:
    level = jnp.floor(canonical_level + jnp.log2(ratio + eps))
  else:
    level = jnp.floor(canonical_level + jnp.log2(ratio) + eps)
  level = jnp.clip(level, k_min, k_max)
  return (level - k_min).astype(jnp.int32)


def _level_of_scale(scale: float) -> int:
  level = -math.log2(scale)
  if abs(level - round(level)) > 1e-6:
    raise ValueError(f'scales must be powers of 2, got {scale}')
  return round(level)


def multilevel_roi_align(features_list: Sequence[jax.Array], boxes: jax.Array,
                         output_size: int | Sequence[int],
                         scales: Sequence[float], sampling_ratio: int,
                         aligned: bool = False, legacy_plus_one: bool = False,
                         *, batch_indices: jax.Array | None = None,
                         canonical_scale: float = 224,
                         canonical_level: int = 4,
                         max_sampling_grid: int | Sequence[int] | None = None
                         ) -> jax.Array:
  """Pools every box from its FPN level, as MultiScaleRoIAlign and Pooler.

  Levels k_min..k_max come from the scales (1/4 .. 1/32 for P2..P5, which
  must be consecutive powers of 2) and each box's level from `roi_level`.
  With one level, every box is pooled from it. torchvision's
  MultiScaleRoIAlign is `legacy_plus_one=False, aligned=False`; the MLPerf
  reference Pooler is `legacy_plus_one=True, aligned=False`.

  All levels are flattened and concatenated into one [sum_l B * H_l * W_l, C]
  table, and each box computes its sample rows from its own level's scale,
  size and offset in that table: one roi_align-sized gather over K boxes in
  all, whatever the number of levels. That costs one copy of the feature
  maps (about 1.33x the P2 map: 0.7 GB for 8 images of 800x1344 with 256
  float32 channels), far less than the alternatives on static shapes:
  pooling every box from every level and selecting, or one masked gather of
  all boxes per level, both L times the gather, whose footprint is
  K * oh * ow * 16 * C for sampling_ratio=2 (3.3 GB for the box head's
  K = 8 x 512 boxes at 7x7 with 256 float32 channels, if materialized).

  Args:
    features_list: L maps [B, H_l, W_l, C], finest first, with the same B, C
      and dtype.
    boxes: [K, 5] (batch_index, x1, y1, x2, y2) in image coordinates, or
      [K, 4] with `batch_indices`; see `roi_align`.
    output_size: (oh, ow) bins, or an int for both.
    scales: L spatial scales, e.g. (1/4, 1/8, 1/16, 1/32).
    sampling_ratio: grid points per bin; see `roi_align`. The adaptive grid
      (<= 0) is bounded by the finest level's default, or by
      `max_sampling_grid`.
    aligned: half-pixel offset; see `roi_align`.
    legacy_plus_one: the reference's level formula; see `roi_level`.
    batch_indices: [K] image index of each box, for [K, 4] boxes only.
    canonical_scale: s0 of the level formula.
    canonical_level: k0 of the level formula.
    max_sampling_grid: see `roi_align`.

  Returns:
    [K, oh, ow, C] pooled features.
  """
  features_list = [jnp.asarray(f) for f in features_list]
  scales = [float(s) for s in scales]
  if not features_list or len(features_list) != len(scales):
    raise ValueError(f'need one scale per feature map, got '
                     f'{len(features_list)} maps and {len(scales)} scales')
  first = features_list[0]
  for f in features_list:
    if (f.ndim != 4 or f.shape[0] != first.shape[0]
        or f.shape[3] != first.shape[3] or f.dtype != first.dtype):
      got = [(x.shape, str(x.dtype)) for x in features_list]
      raise ValueError('features must be [B, H_l, W_l, C] with one B, C and '
                       f'dtype, got {got}')
  output_size = _pair(output_size, 'output_size')
  sampling_ratio = int(sampling_ratio)
  batch, _, _, channels = features_list[0].shape
  levels = [_level_of_scale(s) for s in scales]
  if levels != list(range(levels[0], levels[0] + len(levels))):
    raise ValueError(f'scales must halve from one level to the next, got '
                     f'{scales}')
  index, coords = _split_rois(boxes, batch_indices, batch)
  heights = [f.shape[1] for f in features_list]
  widths = [f.shape[2] for f in features_list]
  grid = _max_grid(sampling_ratio, max_sampling_grid, heights, widths,
                   output_size)
  table = jnp.concatenate([f.reshape(-1, channels) for f in features_list])
  if len(features_list) == 1:
    level = jnp.zeros(index.shape, jnp.int32)
  else:
    level = roi_level(coords, levels[0], levels[-1], canonical_scale,
                      canonical_level, legacy_plus_one=legacy_plus_one)
  starts = np.cumsum([0] + [batch * h * w for h, w in zip(heights, widths)])
  height = jnp.asarray(heights, jnp.int32)[level]
  width = jnp.asarray(widths, jnp.int32)[level]
  base = jnp.asarray(starts[:-1], jnp.int32)[level] + index * height * width
  scale = jnp.asarray(scales, coords.dtype)[level]
  return _roi_align_flat(table, base, coords, scale, height, width,
                         output_size, sampling_ratio, aligned, grid)
