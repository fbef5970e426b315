"""RetinaNet anchors, box coder and matcher equal torchvision's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.image_list import ImageList

from jaxperf.models.layers import anchors as A


def _torchvision_anchors(image_size, grid_sizes):
  gen = tv_retinanet._default_anchorgen()
  images = ImageList(torch.zeros(1, 3, *image_size), [tuple(image_size)])
  feats = [torch.zeros(1, 1, h, w) for h, w in grid_sizes]
  return gen(images, feats)[0].numpy()


def test_sizes_are_torchvision_retinanet_defaults():
  gen = tv_retinanet._default_anchorgen()
  assert A.RETINANET_ANCHOR_SIZES == tuple(tuple(s) for s in gen.sizes)
  assert A.RETINANET_ANCHOR_SIZES[0] == (32, 40, 50)
  assert gen.aspect_ratios == (A.RETINANET_ASPECT_RATIOS,) * 5
  for mine, theirs in zip(
      (A.cell_anchors(s, A.RETINANET_ASPECT_RATIOS)
       for s in A.RETINANET_ANCHOR_SIZES), gen.cell_anchors):
    np.testing.assert_array_equal(mine, theirs.numpy())


def test_feature_sizes_match_the_torchvision_backbone():
  """ResNet + FPN + P6/P7 of torchvision's RetinaNet on odd image sizes."""
  torch.manual_seed(0)
  model = tv_retinanet.retinanet_resnet50_fpn(weights=None,
                                              weights_backbone=None).eval()
  for hw in ((97, 61), (45, 130)):
    with torch.no_grad():
      feats = model.backbone(torch.zeros(1, 3, *hw))
    got = tuple(tuple(f.shape[-2:]) for f in feats.values())
    assert A.feature_sizes(hw) == got, hw
  assert A.feature_sizes((800, 800)) == ((100, 100), (50, 50), (25, 25),
                                         (13, 13), (7, 7))
  assert A.feature_sizes((800, 1066))[-1] == (7, 9)


@pytest.mark.parametrize('image_size', [(800, 800), (800, 1088), (600, 1000),
                                        (512, 512)])
def test_anchors_equal_torchvision(image_size):
  mine = A.retinanet_anchors(image_size)
  want = _torchvision_anchors(image_size, A.feature_sizes(image_size))
  assert mine.dtype == np.float32
  assert mine.shape == want.shape
  np.testing.assert_array_equal(mine, want)
  assert sum(A.anchors_per_level(image_size)) == len(mine)


def test_800_anchor_count_and_layout():
  anchors = A.retinanet_anchors((800, 800))
  locations = 100 * 100 + 50 * 50 + 25 * 25 + 13 * 13 + 7 * 7
  assert anchors.shape == (locations * 9, 4) == (120087, 4)
  assert A.anchors_per_level() == (90000, 22500, 5625, 1521, 441)
  # First location of P3: ratio 0.5 (wide) of size 32, then sizes 40, 50.
  np.testing.assert_array_equal(anchors[0], [-23, -11, 23, 11])
  np.testing.assert_array_equal(anchors[4], [-20, -20, 20, 20])
  # Second location of P3 is 8 pixels to the right of the first.
  np.testing.assert_array_equal(anchors[9:18] - anchors[0:9],
                                np.tile([8, 0, 8, 0], (9, 1)))
  # P6 and P7 steps are 800 // 13 = 61 and 800 // 7 = 114, as in torchvision.
  p6 = anchors[90000 + 22500 + 5625:][:1521]
  p7 = anchors[-441:]
  assert p6[9, 0] - p6[0, 0] == 61
  assert p7[9, 0] - p7[0, 0] == 114


def _random_boxes(rng, n, scale=500.0):
  xy = rng.uniform(0, scale, (n, 2))
  wh = rng.uniform(1, scale / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


@pytest.mark.parametrize('weights', [(1.0, 1.0, 1.0, 1.0),
                                     (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_equal_torchvision(weights):
  rng = np.random.default_rng(0)
  gt, anchors = _random_boxes(rng, 1000), _random_boxes(rng, 1000)
  coder = det_utils.BoxCoder(weights)
  want = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors))
  got = jax.jit(A.encode_boxes, static_argnums=2)(gt, anchors, weights)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)

  codes = rng.normal(0, 1, (1000, 4)).astype(np.float32)
  codes[:10, 2:] = 8.0  # beyond the clamp
  want = coder.decode_single(torch.from_numpy(codes),
                             torch.from_numpy(anchors))
  got = jax.jit(A.decode_boxes, static_argnums=2)(codes, anchors, weights)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-3)

  # Round trip, for size ratios inside the clamp.
  near = anchors + rng.uniform(-0.3, 0.3, (1000, 4)).astype(np.float32) * (
      np.tile(anchors[:, 2:] - anchors[:, :2], 2))
  near = np.concatenate([np.minimum(near[:, :2], near[:, 2:] - 0.5),
                         near[:, 2:]], axis=1)
  codes = A.encode_boxes(near, anchors, weights)
  assert float(jnp.max(jnp.abs(codes[:, 2:] / np.array(weights[2:])))) < (
      A.BBOX_XFORM_CLIP)
  back = A.decode_boxes(codes, anchors, weights)
  np.testing.assert_allclose(back, near, rtol=1e-5, atol=1e-3)
  # Beyond the clamp, the decoded size stops at exp(clamp) times the anchor's.
  far = A.decode_boxes(np.array([[0, 0, 9, 9]], np.float32) * np.array(
      weights, np.float32), anchors[:1], weights)
  np.testing.assert_allclose(far[0, 2] - far[0, 0],
                             1000 / 16 * (anchors[0, 2] - anchors[0, 0]),
                             rtol=1e-5)


def test_decode_clamps_log_size_ratio():
  anchor = np.array([[0, 0, 16, 16]], np.float32)
  codes = np.array([[0, 0, 20.0, 100.0]], np.float32)
  box = np.asarray(A.decode_boxes(codes, anchor))
  # exp(log(1000 / 16)) * 16 = 1000 wide and tall, centred on (8, 8).
  np.testing.assert_allclose(box, [[-492, -492, 508, 508]], rtol=1e-5)
  assert np.isfinite(box).all()
  assert A.BBOX_XFORM_CLIP == math.log(1000.0 / 16)


def _torchvision_match(iou):
  matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
  return matcher(torch.from_numpy(np.array(iou))).numpy()


def test_matcher_random_iou():
  rng = np.random.default_rng(1)
  for g, a in ((1, 50), (5, 300), (20, 1000)):
    iou = (rng.uniform(0, 0.8, (g, a)) ** 2).astype(np.float32)
    got = np.asarray(jax.jit(A.match_anchors)(iou))
    want = _torchvision_match(iou)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
    assert {-1, -2} <= set(got.tolist()) or g == 1


def test_matcher_ties():
  """Ties between anchors of one gt and between gts on one anchor."""
  rng = np.random.default_rng(2)
  match = jax.jit(A.match_anchors)
  saw_cross_gt = False
  for _ in range(20):
    iou = rng.integers(0, 7, (6, 40)).astype(np.float32) / 10
    got = np.asarray(match(iou))
    np.testing.assert_array_equal(got, _torchvision_match(iou))
    # Low-quality matches that went to a gt other than the one they were the
    # best anchor for.
    best = iou == iou.max(axis=1, keepdims=True)
    saw_cross_gt |= bool(np.any(best & (np.arange(6)[:, None] != got)))
  assert saw_cross_gt
  iou = np.array([[0.3, 0.3, 0.1], [0.3, 0.2, 0.3]], np.float32)
  # Anchor 0 is the best of both gts and goes to gt 0 (the first maximum).
  np.testing.assert_array_equal(A.match_anchors(iou), [0, 0, 1])
  np.testing.assert_array_equal(_torchvision_match(iou), [0, 0, 1])


def test_matcher_ignores_padding_gts():
  rng = np.random.default_rng(3)
  iou = (rng.uniform(0, 0.8, (8, 200)) ** 2).astype(np.float32)
  valid = np.array([1, 0, 1, 1, 0, 1, 0, 0], bool)
  # Padding rows that would otherwise win everything.
  padded = np.where(valid[:, None], iou, 0.99).astype(np.float32)
  got = np.asarray(A.match_anchors(padded, valid))
  idx = np.flatnonzero(valid)
  want = _torchvision_match(iou[idx])
  want = np.where(want >= 0, idx[np.maximum(want, 0)], want)
  np.testing.assert_array_equal(got, want)
  assert not np.isin(got, np.flatnonzero(~valid)).any()
  none = np.asarray(A.match_anchors(padded, np.zeros(8, bool)))
  np.testing.assert_array_equal(none, -1)


def test_matcher_without_low_quality_matches():
  rng = np.random.default_rng(4)
  iou = (rng.uniform(0, 0.8, (4, 300)) ** 2).astype(np.float32)
  # gt 3's best candidate (anchor 0) is below the low threshold.
  iou[3] *= 0.4
  iou[:, 0] = [0.1, 0.1, 0.1, 0.3]
  matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=False)
  want = matcher(torch.from_numpy(iou)).numpy()
  got = A.match_anchors(iou, allow_low_quality_matches=False)
  np.testing.assert_array_equal(got, want)
  assert got[0] == -1 and not np.isin(3, got)
  assert A.match_anchors(iou)[0] == 3


def test_vmap_over_images():
  rng = np.random.default_rng(5)
  anchors = A.retinanet_anchors((64, 64))
  batch, g = 3, 5
  gt = np.stack([_random_boxes(rng, g, scale=48.0) for _ in range(batch)])
  valid = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)

  def iou_fn(boxes):
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = jnp.maximum(boxes[:, None, :2], anchors[None, :, :2])
    rb = jnp.minimum(boxes[:, None, 2:], anchors[None, :, 2:])
    inter = jnp.prod(jnp.clip(rb - lt, 0), axis=-1)
    return inter / (area(boxes)[:, None] + area(anchors)[None] - inter)

  def step(boxes, ok):
    matches = A.match_anchors(iou_fn(boxes), ok)
    targets = A.encode_boxes(boxes[jnp.maximum(matches, 0)], anchors)
    return matches, targets

  matches, targets = jax.jit(jax.vmap(step))(gt, valid)
  assert matches.shape == (batch, len(anchors))
  assert targets.shape == (batch, len(anchors), 4)
  for i in range(batch):
    idx = np.flatnonzero(valid[i])
    iou = np.asarray(iou_fn(gt[i][idx]))
    want = _torchvision_match(iou)
    want = np.where(want >= 0, idx[np.maximum(want, 0)], want)
    np.testing.assert_array_equal(matches[i], want)
    fg = want >= 0
    assert fg.any()
    np.testing.assert_allclose(
        targets[i][fg],
        det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(
            torch.from_numpy(gt[i][want[fg]]),
            torch.from_numpy(anchors[fg])).numpy(), rtol=1e-5, atol=1e-5)
