"""RoIAlign and FPN multi-level pooling against torchvision.ops and the
MLPerf Mask R-CNN reference's level formula."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from jaxperf.models.layers import multilevel_roi_align
from jaxperf.models.layers import roi_align
from jaxperf.models.layers import roi_level

BATCH, HEIGHT, WIDTH, CHANNELS = 3, 13, 17, 5
OUTPUT_SIZE = (3, 4)
SCALES = (1.0, 0.25, 1 / 16)

jit_roi_align = jax.jit(
    roi_align, static_argnames=('output_size', 'sampling_ratio', 'aligned'))
jit_multilevel_roi_align = jax.jit(
    multilevel_roi_align,
    static_argnames=('output_size', 'scales', 'sampling_ratio', 'aligned',
                     'legacy_plus_one'))


def feature_boxes(rng):
  """[K, 4] boxes in feature pixels: inside, on and past the border, wholly
  outside, tiny, empty, inverted and larger than the map."""
  h, w = HEIGHT, WIDTH
  fixed = [
      [0, 0, w, h], [0, 0, w - 1, h - 1], [-5, -4, w + 5, h + 3],
      [2, 3, 9, 11], [1.5, 2.25, 4.75, 3.5],
      [w - 2.5, h - 3, w + 4, h + 2], [-3, -2.5, 4, 5], [-1.2, -0.8, 2, 3],
      [w - 0.5, 2, w + 0.7, 6], [w + 2, 1, w + 9, 8], [-12, 2, -2.5, 9],
      [3, -9, 8, -1.5], [3, h + 1.2, 8, h + 6],
      [5.3, 6.1, 5.6, 6.3], [7.0, 2.0, 7.0, 2.0], [9.9, 11.9, 10.05, 12.3],
      [6, 7, 3, 4], [-0.5, -0.5, 0.5, 0.5],
  ]
  n = 30
  xy = rng.uniform(-2, [w, h], (n, 2))
  wh = rng.exponential(4.0, (n, 2)) + 0.05
  random = np.concatenate([xy, xy + wh], 1)
  return np.concatenate([np.asarray(fixed), random]).astype(np.float32)


def rois_for(boxes, scale, rng):
  """[K, 5] rois in image coordinates, spread over the batch."""
  index = rng.integers(0, BATCH, len(boxes)).astype(np.float32)
  return np.concatenate([index[:, None], boxes / np.float32(scale)], 1)


def torch_roi_align(features, rois, scale, sampling_ratio, aligned,
                    cotangent):
  """torchvision's output [K, oh, ow, C] and gradient of <output, cotangent>
  w.r.t. NHWC features."""
  x = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))
  x.requires_grad_(True)
  out = torchvision.ops.roi_align(x, torch.from_numpy(rois), OUTPUT_SIZE,
                                  scale, sampling_ratio, aligned)
  out = out.permute(0, 2, 3, 1)
  (out * torch.from_numpy(cotangent)).sum().backward()
  return out.detach().numpy(), x.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('aligned', [False, True])
@pytest.mark.parametrize('sampling_ratio', [2, 1, 0, -1])
def test_roi_align_matches_torchvision(aligned, sampling_ratio):
  rng = np.random.default_rng([sampling_ratio + 1, aligned])
  features = rng.normal(size=(BATCH, HEIGHT, WIDTH, CHANNELS)).astype(
      np.float32)
  boxes = feature_boxes(rng)
  cotangent = rng.normal(size=(len(boxes),) + OUTPUT_SIZE + (CHANNELS,)
                         ).astype(np.float32)
  traces = collections.Counter()
  # Large enough for every box here, including those bigger than the map.
  grid = 12 if sampling_ratio <= 0 else None

  def pooled(feats, rois, scale):
    traces['forward'] += 1
    return roi_align(feats, rois, OUTPUT_SIZE, scale, sampling_ratio, aligned,
                     max_sampling_grid=grid)

  forward = jax.jit(pooled)

  @jax.jit
  def gradient(feats, rois, scale):
    traces['gradient'] += 1
    return jax.grad(lambda f: jnp.sum(pooled(f, rois, scale) * cotangent))(
        feats)

  for scale in SCALES:
    rois = rois_for(boxes, scale, rng)
    want, want_grad = torch_roi_align(features, rois, scale, sampling_ratio,
                                      aligned, cotangent)
    got = forward(features, rois, scale)
    assert got.shape == (len(boxes),) + OUTPUT_SIZE + (CHANNELS,)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gradient(features, rois, scale), want_grad,
                               atol=1e-5, rtol=1e-5)
  # One trace for each function, whatever the scale: it is a traced value.
  assert traces == {'forward': 2, 'gradient': 1}


def test_adaptive_default_grid_and_box_formats():
  rng = np.random.default_rng(5)
  features = rng.normal(size=(BATCH, 40, 36, 8)).astype(np.float32)
  # Up to the whole map: within the default bound (40 // 7 + 1, 36 // 7 + 1).
  xy = rng.uniform(0, 30, (40, 2))
  boxes = np.concatenate([xy, np.minimum(xy + rng.uniform(0.5, 36, (40, 2)),
                                         [36, 40])], 1)
  boxes = np.concatenate([boxes, [[0, 0, 36, 40]]]).astype(np.float32)
  index = rng.integers(0, BATCH, len(boxes))
  rois = np.concatenate([index[:, None], boxes], 1).astype(np.float32)
  x = torch.from_numpy(features.transpose(0, 3, 1, 2).copy())
  for aligned in (False, True):
    want = torchvision.ops.roi_align(x, torch.from_numpy(rois), 7, 1.0, 0,
                                     aligned).permute(0, 2, 3, 1).numpy()
    got = jit_roi_align(features, rois, output_size=7, sampling_ratio=0,
                        aligned=aligned)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  split = jit_roi_align(features, boxes, output_size=7, sampling_ratio=0,
                        aligned=True, batch_indices=index)
  np.testing.assert_array_equal(split, got)
  single = jit_roi_align(features[1:2], boxes, output_size=(5, 6),
                         spatial_scale=0.5, sampling_ratio=2)
  np.testing.assert_array_equal(single, jit_roi_align(
      features, boxes, output_size=(5, 6), spatial_scale=0.5,
      sampling_ratio=2, batch_indices=np.ones(len(boxes), np.int32)))


def test_bfloat16_features():
  rng = np.random.default_rng(6)
  features = rng.normal(size=(1, 12, 12, 4)).astype(np.float32)
  rois = np.array([[0, 1.3, 2.2, 9.5, 7.1], [0, -2, 3, 5, 14]], np.float32)
  got = jit_roi_align(jnp.asarray(features, jnp.bfloat16), rois,
                      output_size=7, sampling_ratio=2)
  assert got.dtype == jnp.bfloat16
  want = jit_roi_align(features.astype(jnp.bfloat16).astype(np.float32),
                       rois, output_size=7, sampling_ratio=2)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


def test_errors():
  features = np.zeros((2, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match='batch_indices'):
    roi_align(features, np.zeros((4, 4), np.float32), 2)
  with pytest.raises(ValueError, match=r'\[K, 5\]'):
    roi_align(features, np.zeros((4, 6), np.float32), 2)
  with pytest.raises(ValueError, match='NHWC|B, H, W, C'):
    roi_align(features[0], np.zeros((4, 5), np.float32), 2)
  with pytest.raises(ValueError, match='halve'):
    multilevel_roi_align([features, features], np.zeros((4, 5), np.float32),
                         2, (1 / 4, 1 / 16), 2)


IMAGE_SHAPE = (384, 512)
LEVEL_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
# Compiled, sample coordinates are computed with fused multiply-adds, so they
# can differ from the kernel's by one float32 ulp: up to 7.6e-6 pixels on
# these maps of up to 128 pixels, times bilinear slopes of a few units.
PYRAMID_ATOL = 4e-5


def pyramid(rng, channels=6):
  return [rng.normal(size=(2, round(IMAGE_SHAPE[0] * s),
                           round(IMAGE_SHAPE[1] * s), channels)
                     ).astype(np.float32) for s in LEVEL_SCALES]


def pyramid_boxes(rng, n):
  """[n, 4] boxes of square roots of areas from 8 to 500 pixels, spanning
  P2..P5 (boundaries at 112, 224 and 448)."""
  size = np.exp(rng.uniform(np.log(8), np.log(500), n))
  aspect = np.exp(rng.uniform(-0.5, 0.5, n))
  wh = np.stack([size * aspect, size / aspect], 1)
  xy = rng.uniform(-20, np.asarray(IMAGE_SHAPE[::-1]) - wh / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def test_multilevel_matches_multiscale_roi_align():
  rng = np.random.default_rng(7)
  features = pyramid(rng)
  per_image = [pyramid_boxes(rng, 40), pyramid_boxes(rng, 33)]
  boxes = np.concatenate(per_image)
  rois = np.concatenate(
      [np.concatenate([np.full((len(b), 1), i, np.float32), b], 1)
       for i, b in enumerate(per_image)])
  names = ['p2', 'p3', 'p4', 'p5']
  x = collections.OrderedDict(
      (n, torch.from_numpy(f.transpose(0, 3, 1, 2).copy()).requires_grad_())
      for n, f in zip(names, features))
  pooler = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
  want = pooler(x, [torch.from_numpy(b) for b in per_image],
                [IMAGE_SHAPE] * 2)
  assert pooler.scales == list(LEVEL_SCALES)
  cotangent = rng.normal(size=want.shape).astype(np.float32)
  (want * torch.from_numpy(cotangent)).sum().backward()
  cotangent = cotangent.transpose(0, 2, 3, 1)

  levels = np.asarray(roi_level(boxes, 2, 5))
  want_levels = pooler.map_levels([torch.from_numpy(b) for b in per_image])
  np.testing.assert_array_equal(levels, want_levels.numpy())
  assert set(levels.tolist()) == {0, 1, 2, 3}

  traces = []

  @jax.jit
  def pooled(feats, rois):
    traces.append(1)
    return multilevel_roi_align(feats, rois, 7, LEVEL_SCALES, 2)

  got = pooled(features, rois)
  pooled(features, rois + np.float32(0.5))
  assert len(traces) == 1
  np.testing.assert_allclose(got, want.detach().numpy().transpose(0, 2, 3, 1),
                             atol=PYRAMID_ATOL, rtol=1e-5)
  grads = jax.grad(lambda f: jnp.sum(pooled(f, rois) * cotangent))(features)
  for g, n in zip(grads, names):
    np.testing.assert_allclose(g, x[n].grad.numpy().transpose(0, 2, 3, 1),
                               atol=PYRAMID_ATOL, rtol=1e-5)
  split = jit_multilevel_roi_align(
      features, boxes, output_size=7, scales=LEVEL_SCALES, sampling_ratio=2,
      batch_indices=rois[:, 0].astype(np.int32))
  np.testing.assert_array_equal(split, got)


def reference_levels(boxes, k_min=2, k_max=5):
  """maskrcnn-benchmark's LevelMapper on BoxList.area(), in float32."""
  boxes = np.asarray(boxes, np.float32)
  area = ((boxes[:, 2] - boxes[:, 0] + np.float32(1))
          * (boxes[:, 3] - boxes[:, 1] + np.float32(1)))
  s = np.sqrt(area)
  target = np.floor(np.float32(4) + np.log2(s / np.float32(224)
                                            + np.float32(1e-6)))
  return (np.clip(target, k_min, k_max) - k_min).astype(np.int64)


def boundary_boxes():
  """Square boxes whose legacy side (w + 1) sits at and just around the level
  boundaries 112, 224 and 448, and some whose w and w + 1 straddle them."""
  sides = []
  for boundary in (56.0, 112.0, 224.0, 448.0, 896.0):
    for rel in (-1e-3, -1e-4, -2e-6, -5e-7, 0.0, 5e-7, 2e-6, 1e-4, 1e-3):
      sides.append(boundary * (1 + rel) - 1)
    sides += [boundary - 0.5, boundary - 1.5, boundary + 0.5]
  sides = np.asarray(sides, np.float32)
  x0 = np.float32(3.0)
  return np.stack([np.full_like(sides, x0), np.full_like(sides, x0),
                   x0 + sides, x0 + sides], 1).astype(np.float32)


def test_legacy_level_mapping_matches_reference_formula():
  boxes = boundary_boxes()
  got = np.asarray(jax.jit(lambda b: roi_level(b, 2, 5, legacy_plus_one=True)
                           )(boxes))
  want = reference_levels(boxes)
  np.testing.assert_array_equal(got, want)
  # The "+1" moves boxes of side boundary - 0.5 up a level.
  torchvision_levels = np.asarray(roi_level(boxes, 2, 5))
  mapper = torchvision.ops.poolers.LevelMapper(2, 5)
  np.testing.assert_array_equal(
      torchvision_levels, mapper([torch.from_numpy(boxes)]).numpy())
  assert (got != torchvision_levels).any()


def test_multilevel_legacy_matches_reference_pooler():
  """The reference Pooler: its level formula, then the legacy (aligned=False)
  RoIAlign of each level's boxes, which is torchvision's aligned=False."""
  rng = np.random.default_rng(8)
  features = pyramid(rng, channels=3)
  boxes = np.concatenate([pyramid_boxes(rng, 30), boundary_boxes()[::3]])
  index = rng.integers(0, 2, len(boxes))
  rois = np.concatenate([index[:, None], boxes], 1).astype(np.float32)
  levels = reference_levels(boxes)
  want = np.zeros((len(boxes), 14, 14, 3), np.float32)
  for level, (f, scale) in enumerate(zip(features, LEVEL_SCALES)):
    pick = levels == level
    x = torch.from_numpy(f.transpose(0, 3, 1, 2).copy())
    want[pick] = torchvision.ops.roi_align(
        x, torch.from_numpy(rois[pick]), 14, scale, 2).permute(0, 2, 3,
                                                               1).numpy()
  got = jit_multilevel_roi_align(features, rois, output_size=14,
                                 scales=LEVEL_SCALES, sampling_ratio=2,
                                 legacy_plus_one=True)
  np.testing.assert_allclose(got, want, atol=PYRAMID_ATOL, rtol=1e-5)
