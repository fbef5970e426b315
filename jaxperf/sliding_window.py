"""Sliding-window inference over whole volumes (3D U-Net, KiTS19), host side.

Follows the reference's runtime/inference.py (image_segmentation/pytorch),
channels-last. For a case image [D, H, W], on every spatial axis
independently:

1. stride = int(roi * (1 - overlap)).
2. Crop: r = size % stride; if r < stride // 2 the image (and its label) loses
   r // 2 voxels at the start and r - r // 2 at the end, else nothing.
3. Pad (image only, constant pad_value, -2.2 in the reference's evaluation):
   p = (stride - size % stride) % stride, plus one more stride if the padded
   size would still be below roi; p // 2 before, p - p // 2 after.
4. Windows start at 0, stride, ..., (n - 1) * stride with
   n = (padded - roi) // stride + 1.
5. The model's logits of every window are weighted by the Gaussian importance
   map (`gaussian_importance`) and summed; the sum of the maps normalizes.
6. The result is cut back as [p // 2 : size + p // 2] with size the axis
   length *before* the crop of step 2.

The reference's quirks are kept: step 6 uses the uncropped size, so when an
axis was cropped and then padded (an axis shorter than roi) the returned
logits can be longer on that axis than the returned label; with an overlap
whose stride does not divide the padded size evenly the last voxels are not
covered by any window and come out NaN (0 / 0), as in the reference.

The model is not called here: `sliding_window_inference` hands fixed-shape
batches of windows to a caller's function, so a jitted model compiles once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

Shape3 = tuple[int, int, int]


def _gaussian_1d(n: int, std: float) -> np.ndarray:
  """exp(-k^2 / (2 std^2)) at k = i - (n - 1) / 2 for i in 0..n-1, float64."""
  k = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
  return np.exp(-k**2 / (2.0 * std * std))


def gaussian_importance(roi_shape: Sequence[int],
                        sigma_scale: float = 0.125) -> np.ndarray:
  """The weight of every voxel of a window when windows are stitched.

  As the reference's gaussian_kernel(roi, 0.125 * roi): the product of 1D
  Gaussians of std sigma_scale * roi along each axis, its cube root, divided
  by its maximum (computed in float64). The reference builds only cubic maps
  (it takes roi_shape[0] for every axis); for a non-cubic roi each axis here
  uses its own length.

  Returns:
    float32 array of shape roi_shape, maximum 1.
  """
  roi = _shape3(roi_shape, 'roi_shape')
  g = [_gaussian_1d(n, sigma_scale * n) for n in roi]
  kernel = (g[0][:, None, None] * g[1][None, :, None]) * g[2][None, None, :]
  kernel = np.cbrt(kernel)
  kernel /= kernel.max()
  return kernel.astype(np.float32)


class WindowPlan(NamedTuple):
  """Where the windows of one case go, and how to cut the result back.

  Attributes:
    image: float32 [Dp, Hp, Wp], the cropped and padded image.
    label: the label cropped as the image (not padded), or None.
    origins: start (d, h, w) of every window in `image`, in the reference's
      order (d outermost, w innermost).
    roi_shape: window shape.
    strides: window step per axis.
    crop: (start, end) voxels cut from the input image on each axis.
    padding: (before, after) voxels of pad_value added after the crop.
    output_slices: the slices of the padded grid (stitched logits
      [Dp, Hp, Wp, C]) that are returned.
  """
  image: np.ndarray
  label: np.ndarray | None
  origins: list[Shape3]
  roi_shape: Shape3
  strides: Shape3
  crop: tuple[tuple[int, int], ...]
  padding: tuple[tuple[int, int], ...]
  output_slices: tuple[slice, slice, slice]

  def window(self, origin: Shape3) -> tuple[slice, slice, slice]:
    """The slices of `image` (or of the stitched grid) of one window."""
    return tuple(slice(o, o + r) for o, r in zip(origin, self.roi_shape))


def _shape3(shape: Sequence[int], name: str) -> Shape3:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f'{name} must be 3 positive sizes, got {shape}')
  return shape


def _volume(x: Any, name: str) -> np.ndarray:
  """[D, H, W] from [D, H, W], [1, D, H, W] or [D, H, W, 1]."""
  x = np.asarray(x)
  if x.ndim == 4 and x.shape[0] == 1:
    x = x[0]
  elif x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3:
    raise ValueError(f'{name} must be one case [D, H, W] (optionally with a '
                     f'channel axis of 1), got shape {x.shape}')
  return x


def plan_windows(image: Any, label: Any = None, *, roi_shape: Sequence[int],
                 overlap: float = 0.5, pad_value: float = -2.2) -> WindowPlan:
  """Crops and pads one case as the reference does and lists its windows.

  Args:
    image: one case [D, H, W] (a channel axis of 1, first or last, is
      dropped); converted to float32.
    label: its labels, same spatial shape, or None.
    roi_shape: window shape (3 sizes).
    overlap: fraction of a window shared with the next; strides are
      int(roi * (1 - overlap)).
    pad_value: constant the image is padded with.

  Returns:
    A WindowPlan.
  """
  roi = _shape3(roi_shape, 'roi_shape')
  image = _volume(image, 'image').astype(np.float32, copy=False)
  if label is not None:
    label = _volume(label, 'label')
    if label.shape != image.shape:
      raise ValueError(f'label shape {label.shape} does not match image '
                       f'shape {image.shape}')
  strides = tuple(int(r * (1 - overlap)) for r in roi)
  if min(strides) < 1:
    raise ValueError(f'overlap {overlap} leaves a stride below 1 for roi '
                     f'{roi}')

  crop, padding, out_slices, sizes = [], [], [], []
  for size, r, s in zip(image.shape, roi, strides):
    rest = size % s
    cut = rest if rest < s // 2 else 0
    crop.append((cut // 2, cut - cut // 2))
    cropped = size - cut
    pad = (s - cropped % s) % s
    if cropped + pad < r:
      pad += s
    padding.append((pad // 2, pad - pad // 2))
    out_slices.append(slice(pad // 2, size + pad // 2))
    sizes.append((cropped + pad - r) // s + 1)

  keep = tuple(slice(a, n - b) for (a, b), n in zip(crop, image.shape))
  image = np.pad(image[keep], padding, mode='constant',
                 constant_values=pad_value)
  if label is not None:
    label = label[keep]
  origins = list(itertools.product(
      *(range(0, s * n, s) for s, n in zip(strides, sizes))))
  return WindowPlan(image=image, label=label, origins=origins, roi_shape=roi,
                    strides=strides, crop=tuple(crop), padding=tuple(padding),
                    output_slices=tuple(out_slices))


def sliding_window_inference(
    image: Any, label: Any, apply_fn: Callable[[np.ndarray], Any], *,
    roi_shape: Sequence[int], overlap: float = 0.5, batch_size: int,
    pad_value: float = -2.2, num_classes: int = 3
) -> tuple[np.ndarray, np.ndarray | None]:
  """Gaussian-weighted logits of a whole case from windows of the model.

  Args:
    image: one case [D, H, W] (a channel axis of 1, first or last, is
      dropped).
    label: its integer labels [D, H, W], or None.
    apply_fn: maps float32 windows [batch_size, *roi_shape, 1] to logits
      [batch_size, *roi_shape, num_classes] (numpy or jax). It is always
      called with batch_size windows; the last batch is filled up with zeros
      and the outputs of the filler are dropped.
    roi_shape: window shape.
    overlap: window overlap; strides are int(roi * (1 - overlap)).
    batch_size: windows per apply_fn call.
    pad_value: constant the image is padded with (-2.2 in the reference's
      evaluation).
    num_classes: logits per voxel.

  Returns:
    (logits, label): float32 [D', H', W', num_classes], the weighted mean of
    the windows' logits, and the label cropped as the reference crops it
    [D', H', W'] (see the module docstring for when the two differ).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  plan = plan_windows(image, label, roi_shape=roi_shape, overlap=overlap,
                      pad_value=pad_value)
  roi = plan.roi_shape
  weight = gaussian_importance(roi)
  weight_c = weight[..., None]
  logits = np.zeros((*plan.image.shape, num_classes), np.float32)
  norm = np.zeros(plan.image.shape, np.float32)
  want = (batch_size, *roi, num_classes)

  def accumulate(out, origins):
    out = np.asarray(out)
    if out.shape != want:
      raise ValueError(f'apply_fn returned shape {out.shape}, expected '
                       f'{want}')
    out = out.astype(np.float32, copy=False)
    for b, origin in enumerate(origins):
      where = plan.window(origin)
      logits[where] += out[b] * weight_c
      norm[where] += weight

  # One batch in flight: the next is dispatched before the previous result
  # is read back, so an asynchronous apply_fn overlaps with the stitching.
  pending = None
  for start in range(0, len(plan.origins), batch_size):
    origins = plan.origins[start:start + batch_size]
    windows = np.zeros((batch_size, *roi, 1), np.float32)
    for b, origin in enumerate(origins):
      windows[b, ..., 0] = plan.image[plan.window(origin)]
    out = apply_fn(windows)
    if pending is not None:
      accumulate(*pending)
    pending = (out, origins)
  if pending is not None:
    accumulate(*pending)

  with np.errstate(divide='ignore', invalid='ignore'):
    logits /= norm[..., None]
  del norm
  return np.ascontiguousarray(logits[plan.output_slices]), plan.label
