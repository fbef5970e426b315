"""Sliding-window inference against a PyTorch version of the reference's.

torch_sliding_window restates runtime/inference.py of the reference
(image_segmentation/pytorch): crop, pad_input, gaussian_kernel, the window
loops and the final cut, in NCDHW, calling a model window by window. Ours is
channels-last and batches windows; both run the same toy model.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxperf import losses, metrics, sliding_window

PAD = -2.2


# --- PyTorch version of the reference (NCDHW) ---------------------------------
def torch_gaussian(roi, sigma_scale=0.125):
  """Cube root of the outer product of 1D Gaussians, divided by its max.

  The reference takes roi[0] for all axes (cubic windows only); here each axis
  has its own length, which is the same for cubic windows.
  """
  gs = []
  for n in roi:
    k = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    gs.append(torch.exp(-0.5 * (k / (sigma_scale * n))**2))
  g = (gs[0].reshape(-1, 1, 1) * gs[1].reshape(1, -1, 1)
       * gs[2].reshape(1, 1, -1))
  g = torch.pow(g, 1.0 / 3.0)
  return g / g.max()


def torch_pad(volume, roi, strides, value):
  extra = []
  for size, r, s in zip(volume.shape[2:], roi, strides):
    e = -size % s
    extra.append(e if size + e >= r else e + s)
  pads = []
  for e in reversed(extra):          # F.pad lists the last axis first
    pads += [e // 2, e - e // 2]
  return F.pad(volume, pads, mode='constant', value=value), pads


def torch_sliding_window(inputs, labels, roi, model, overlap=0.5, value=PAD):
  """inputs [1, 1, D, H, W], labels [1, 1, D, H, W] -> ([1, 3, ...], labels)."""
  shape = list(inputs.shape[2:])
  strides = [int(r * (1 - overlap)) for r in roi]
  cut = []
  for size, s in zip(shape, strides):
    rest = size % s
    cut.append(rest if rest < s // 2 else 0)
  keep = tuple(slice(c // 2, n - (c - c // 2)) for c, n in zip(cut, shape))
  inputs = inputs[(Ellipsis, *keep)]
  labels = labels[(Ellipsis, *keep)]
  inputs, pads = torch_pad(inputs, roi, strides, value)
  padded = inputs.shape[2:]
  counts = [(p - r) // s + 1 for p, r, s in zip(padded, roi, strides)]
  result = torch.zeros((1, 3, *padded), dtype=inputs.dtype)
  norm = torch.zeros_like(result)
  patch = torch_gaussian(roi).to(norm.dtype)
  for i in range(counts[0]):
    for j in range(counts[1]):
      for k in range(counts[2]):
        o = (i * strides[0], j * strides[1], k * strides[2])
        win = (Ellipsis, *(slice(a, a + r) for a, r in zip(o, roi)))
        result[win] += model(inputs[win]) * patch
        norm[win] += patch
  result /= norm
  before = [pads[4], pads[2], pads[0]]
  out = (Ellipsis, *(slice(b, n + b) for b, n in zip(before, shape)))
  return result[out], labels


# --- a deterministic toy model, in both layouts -------------------------------
class ToyModel:
  """logits_c = w_c * x + b_c + pos_c(position in the window)."""

  def __init__(self, roi, seed=0):
    rng = np.random.default_rng(seed)
    self.w = rng.standard_normal(3).astype(np.float32)
    self.b = rng.standard_normal(3).astype(np.float32)
    self.pos = rng.standard_normal((3, *roi)).astype(np.float32)
    self.calls = []

  def torch(self, x):                       # [1, 1, *roi] -> [1, 3, *roi]
    w = torch.from_numpy(self.w).reshape(1, 3, 1, 1, 1)
    b = torch.from_numpy(self.b).reshape(1, 3, 1, 1, 1)
    return w * x + b + torch.from_numpy(self.pos)[None]

  def numpy(self, x):                       # [n, *roi, 1] -> [n, *roi, 3]
    self.calls.append((x.shape, x.dtype))
    return self.w * x + self.b + np.moveaxis(self.pos, 0, -1)[None]


def random_image(shape, seed=1):
  rng = np.random.default_rng(seed)
  image = rng.standard_normal(shape).astype(np.float32)
  label = rng.integers(0, 3, shape).astype(np.uint8)
  return image, label


def run_both(shape, roi, overlap=0.5, batch_size=3, seed=1):
  image, label = random_image(shape, seed)
  model = ToyModel(roi, seed)
  ours, our_label = sliding_window.sliding_window_inference(
      image, label, model.numpy, roi_shape=roi, overlap=overlap,
      batch_size=batch_size)
  t_out, t_label = torch_sliding_window(
      torch.from_numpy(image)[None, None],
      torch.from_numpy(label.astype(np.int64))[None, None], roi, model.torch,
      overlap)
  ref = np.moveaxis(t_out[0].numpy(), 0, -1)
  return ours, our_label, ref, t_label[0, 0].numpy(), model


# --- tests --------------------------------------------------------------------
@pytest.mark.parametrize('n', [8, 16, 128])
def test_gaussian_matches_scipy_and_torch(n):
  ours = sliding_window.gaussian_importance((n, n, n))
  assert ours.shape == (n, n, n) and ours.dtype == np.float32
  assert ours.max() == 1.0
  np.testing.assert_allclose(ours, torch_gaussian((n, n, n)).float().numpy(),
                             rtol=1e-6)
  signal = pytest.importorskip('scipy.signal')
  g = signal.windows.gaussian(n, 0.125 * n)
  g3 = np.outer(np.outer(g, g), g).reshape(n, n, n)
  g3 = np.cbrt(g3)
  g3 /= g3.max()
  np.testing.assert_array_equal(ours, g3.astype(np.float32))


def test_gaussian_non_cubic_is_separable():
  ours = sliding_window.gaussian_importance((8, 16, 12))
  assert ours.shape == (8, 16, 12) and ours.max() == 1.0
  np.testing.assert_allclose(ours, torch_gaussian((8, 16, 12)).float().numpy(),
                             rtol=1e-6)
  # Along each axis the cube root of a Gaussian of std 0.125 * its length.
  for axis, n in enumerate(ours.shape):
    profile = np.moveaxis(ours, axis, 0)[:, 2, 3]
    k = np.arange(n) - (n - 1) / 2
    want = np.cbrt(np.exp(-0.5 * (k / (0.125 * n))**2))
    np.testing.assert_allclose(profile / profile.max(), want / want.max(),
                               rtol=1e-6)


def test_plan_crop_and_pad():
  image, label = random_image((18, 21, 20))
  plan = sliding_window.plan_windows(image, label, roi_shape=(16, 16, 16))
  assert plan.strides == (8, 8, 8)
  # 18 % 8 = 2 < 4: crop 1 + 1; 21 % 8 = 5: pad 3; 20 % 8 = 4: pad 4.
  assert plan.crop == ((1, 1), (0, 0), (0, 0))
  assert plan.padding == ((0, 0), (1, 2), (2, 2))
  assert plan.image.shape == (16, 24, 24)
  assert plan.label.shape == (16, 21, 20)
  np.testing.assert_array_equal(plan.label, label[1:17])
  np.testing.assert_array_equal(plan.image[:, 1:22, 2:22], image[1:17])
  assert np.all(plan.image[:, 0] == np.float32(PAD))
  assert np.all(plan.image[:, :, -2:] == np.float32(PAD))
  assert plan.origins == [(0, j, k) for j in (0, 8) for k in (0, 8)]
  assert plan.output_slices == (slice(0, 18), slice(1, 22), slice(2, 22))
  # Shorter than the window: padded by one more stride.
  small = sliding_window.plan_windows(np.zeros((5, 16, 16)),
                                      roi_shape=(16, 16, 16))
  assert small.padding[0] == (5, 6) and small.image.shape == (16, 16, 16)
  assert small.origins == [(0, 0, 0)] and small.label is None


@pytest.mark.parametrize('shape,roi', [
    ((16, 16, 16), (16, 16, 16)),      # equal to the window
    ((18, 27, 33), (16, 16, 16)),      # crop on every axis
    ((21, 20, 13), (16, 16, 16)),      # pad on every axis
    ((5, 16, 30), (16, 16, 16)),       # shorter than the window, mixed
    ((10, 20, 35), (8, 16, 16)),       # non-cubic window and case
    ((9, 16, 16), (16, 16, 16)),       # crop then pad: logits longer (quirk)
])
def test_matches_torch_reference(shape, roi):
  ours, our_label, ref, ref_label, model = run_both(shape, roi)
  assert ours.dtype == np.float32
  assert ours.shape == ref.shape and our_label.shape == ref_label.shape
  np.testing.assert_array_equal(our_label, ref_label)
  assert np.all(np.isfinite(ours))
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
  # apply_fn always saw full float32 batches of single-channel windows.
  assert model.calls and all(
      c == ((3, *roi, 1), np.float32) for c in model.calls)


def test_crop_then_pad_quirk_shapes():
  ours, our_label, ref, ref_label, _ = run_both((9, 16, 16), (16, 16, 16))
  # 9 % 8 = 1: the label is cropped to 8, the logits cut back with 9.
  assert our_label.shape == (8, 16, 16) and ours.shape == (9, 16, 16, 3)
  assert ref.shape == ours.shape and ref_label.shape == our_label.shape


@pytest.mark.parametrize('overlap', [0.25, 0.75])
def test_other_overlaps_match_torch(overlap):
  # Overlap 0.25 (stride 12 for a 16 window) leaves voxels no window covers:
  # NaN in both, as in the reference.
  ours, our_label, ref, ref_label, _ = run_both((30, 26, 20), (16, 16, 16),
                                                overlap=overlap)
  assert ours.shape == ref.shape
  np.testing.assert_array_equal(our_label, ref_label)
  np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
  assert np.isnan(ours).any() == (overlap == 0.25)
  np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('batch_size', [1, 4, 7, 64])
def test_batch_size_does_not_change_result(batch_size):
  image, label = random_image((21, 26, 19), 2)
  model = ToyModel((8, 8, 8), 2)
  base, _ = sliding_window.sliding_window_inference(
      image, label, model.numpy, roi_shape=(8, 8, 8), batch_size=1)
  n_windows = len(model.calls)
  model.calls.clear()
  out, _ = sliding_window.sliding_window_inference(
      image, label, model.numpy, roi_shape=(8, 8, 8), batch_size=batch_size)
  np.testing.assert_array_equal(out, base)
  assert len(model.calls) == math.ceil(n_windows / batch_size)
  assert all(c[0][0] == batch_size for c in model.calls)


def test_jitted_apply_fn_and_eval_metrics():
  """A jax apply_fn (compiled once), then the reference's eval loss and DICE
  on the stitched logits."""
  roi = (8, 8, 8)
  image, label = random_image((19, 22, 12), 3)
  model = ToyModel(roi, 3)
  w, b = jnp.asarray(model.w), jnp.asarray(model.b)
  pos = jnp.asarray(np.moveaxis(model.pos, 0, -1))
  traces = []

  @jax.jit
  def apply(x):
    traces.append(x.shape)
    return w * x + b + pos[None]

  ours, our_label = sliding_window.sliding_window_inference(
      image, label, apply, roi_shape=roi, batch_size=5)
  assert len(traces) == 1
  t_out, t_label = torch_sliding_window(
      torch.from_numpy(image)[None, None],
      torch.from_numpy(label.astype(np.int64))[None, None], roi, model.torch)
  np.testing.assert_allclose(ours, np.moveaxis(t_out[0].numpy(), 0, -1),
                             rtol=1e-5, atol=1e-5)
  # Loss and DICE of the case, as the reference's evaluate computes them.
  probs = torch.softmax(t_out, 1)
  onehot = F.one_hot(t_label[:, 0], 3).permute(0, 4, 1, 2, 3).float()
  soft = ((2 * (probs * onehot).sum((2, 3, 4)) + 1e-6)
          / (onehot.sum((2, 3, 4)) + probs.sum((2, 3, 4)) + 1e-6))[:, 1:]
  ref_loss = ((1 - soft).mean() + F.cross_entropy(t_out, t_label[:, 0])) / 2
  loss = losses.dice_ce_loss(jnp.asarray(ours)[None], our_label[None])
  np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
  hard = F.one_hot(t_out.argmax(1), 3).permute(0, 4, 1, 2, 3).float()
  ref_dice = ((2 * (hard * onehot).sum((2, 3, 4)) + 1e-6)
              / (onehot.sum((2, 3, 4)) + hard.sum((2, 3, 4)) + 1e-6))[0, 1:]
  np.testing.assert_allclose(metrics.dice(ours, our_label), ref_dice.numpy(),
                             rtol=1e-6)


def test_channel_axis_and_bad_output():
  image, label = random_image((16, 16, 16))
  model = ToyModel((16, 16, 16))
  a, la = sliding_window.sliding_window_inference(
      image[None], label[None], model.numpy, roi_shape=(16, 16, 16),
      batch_size=2)
  b, lb = sliding_window.sliding_window_inference(
      image[..., None], label, model.numpy, roi_shape=(16, 16, 16),
      batch_size=2)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  with pytest.raises(ValueError, match='apply_fn returned'):
    sliding_window.sliding_window_inference(
        image, label, lambda x: x, roi_shape=(16, 16, 16), batch_size=2)
