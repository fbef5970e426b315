"""RetinaNet focal and box losses against torchvision's RetinaNet.

torchvision's RetinaNet is the MLPerf reference: its RetinaNetHead.compute_loss
is fed the anchor matches that RetinaNet.compute_loss makes (IoU, then
Matcher(0.5, 0.4, allow_low_quality_matches=True), all -1 for an image without
boxes), and ours gets the same boxes padded to a fixed number with a mask.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import box_iou as torch_box_iou
from torchvision.ops import sigmoid_focal_loss as torch_focal_loss

from jaxperf import losses
from jaxperf.models.layers import retinanet_anchors

IMAGE = (64, 64)
NUM_CLASSES = 7
MAX_BOXES = 6
# Ground-truth boxes per image: none, one, several, and as many as the padding.
BOXES_PER_IMAGE = (0, 1, 4, MAX_BOXES)


def random_boxes(rng, n, image=IMAGE):
  """n boxes of sides 6..56 inside the image, float32 [n, 4]."""
  h, w = image
  size = rng.uniform(6, 56, size=(n, 2))
  x1 = rng.uniform(0, w - size[:, 0])
  y1 = rng.uniform(0, h - size[:, 1])
  return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]],
                  axis=1).astype(np.float32)


def make_batch(seed, counts=BOXES_PER_IMAGE, anchors=None):
  """Head outputs and padded ground truth, as numpy arrays."""
  rng = np.random.default_rng(seed)
  if anchors is None:
    anchors = retinanet_anchors(IMAGE)
  b, a = len(counts), anchors.shape[0]
  gt_boxes = np.zeros((b, MAX_BOXES, 4), np.float32)
  gt_labels = np.zeros((b, MAX_BOXES), np.int32)
  gt_valid = np.zeros((b, MAX_BOXES), bool)
  for i, n in enumerate(counts):
    gt_boxes[i, :n] = random_boxes(rng, n)
    gt_labels[i, :n] = rng.integers(0, NUM_CLASSES, size=n)
    gt_valid[i, :n] = True
  # Padding filled with junk that must not matter.
  gt_boxes[~gt_valid] = rng.uniform(0, 64, size=(int((~gt_valid).sum()), 4))
  gt_labels[~gt_valid] = NUM_CLASSES + 3
  cls_logits = rng.normal(0, 2, size=(b, a, NUM_CLASSES)).astype(np.float32)
  bbox_regression = rng.normal(0, 0.5, size=(b, a, 4)).astype(np.float32)
  return dict(cls_logits=cls_logits, bbox_regression=bbox_regression,
              anchors=anchors, gt_boxes=gt_boxes, gt_labels=gt_labels,
              gt_valid=gt_valid)


def torch_losses(batch, loss_type='l1'):
  """torchvision's losses and their gradients w.r.t. the head outputs."""
  cls_logits = torch.tensor(batch['cls_logits'], requires_grad=True)
  bbox_regression = torch.tensor(batch['bbox_regression'], requires_grad=True)
  anchors = torch.tensor(batch['anchors'])
  matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
  targets, matched_idxs = [], []
  for boxes, labels, valid in zip(batch['gt_boxes'], batch['gt_labels'],
                                  batch['gt_valid']):
    boxes = torch.tensor(boxes[valid])
    targets.append({'boxes': boxes,
                    'labels': torch.tensor(labels[valid]).long()})
    if boxes.numel() == 0:
      matched_idxs.append(torch.full((anchors.shape[0],), -1,
                                     dtype=torch.int64))
    else:
      matched_idxs.append(matcher(torch_box_iou(boxes, anchors)))
  head = RetinaNetHead(8, num_anchors=9, num_classes=NUM_CLASSES)
  # RetinaNet (v1, the reference's) regresses boxes with the L1 loss.
  regression_head = head.regression_head
  assert regression_head._loss_type == 'l1'  # pylint: disable=protected-access
  regression_head._loss_type = loss_type  # pylint: disable=protected-access
  out = head.compute_loss(
      targets, {'cls_logits': cls_logits, 'bbox_regression': bbox_regression},
      [anchors] * len(targets), matched_idxs)
  total = out['classification'] + out['bbox_regression']
  total.backward()
  return ({k: v.item() for k, v in out.items()}, total.item(),
          cls_logits.grad.numpy(), bbox_regression.grad.numpy(),
          torch.stack(matched_idxs).numpy())


def jax_losses(batch, **kwargs):
  def loss_fn(cls_logits, bbox_regression):
    out = losses.retinanet_losses(
        cls_logits, bbox_regression, batch['anchors'], batch['gt_boxes'],
        batch['gt_labels'], batch['gt_valid'], **kwargs)
    return out['loss'], out
  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1),
                                       has_aux=True))
  (total, out), (g_cls, g_box) = grad_fn(batch['cls_logits'],
                                         batch['bbox_regression'])
  return out, total, np.asarray(g_cls), np.asarray(g_box)


def x64():
  """float64 in JAX for the duration of a with-block."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def focal_inputs(dtype):
  rng = np.random.default_rng(0)
  logits = np.concatenate([
      rng.normal(0, 3, size=4000),
      rng.uniform(-60, 60, size=1000),
      np.array([0.0, 1e-4, -1e-4, 17.0, -17.0, 30.0, -30.0, 100.0, -100.0]),
  ]).astype(dtype)
  targets = (rng.uniform(size=logits.shape) < 0.3).astype(dtype)
  targets[-9:] = [0, 1, 0, 1, 1, 0, 1, 0, 1]
  return logits, targets


FOCAL_PARAMS = ((0.25, 2.0), (0.5, 1.5), (-1, 2.0))


def test_sigmoid_focal_loss_matches_torchvision_float32():
  logits, targets = focal_inputs(np.float32)
  for alpha, gamma in FOCAL_PARAMS:
    ours = np.asarray(losses.sigmoid_focal_loss(
        jnp.asarray(logits), jnp.asarray(targets), alpha=alpha, gamma=gamma))
    ref = torch_focal_loss(torch.tensor(logits), torch.tensor(targets),
                           alpha=alpha, gamma=gamma, reduction='none').numpy()
    assert ours.dtype == np.float32
    assert np.all(np.isfinite(ours))
    # x = 100 with target 0: p = 1, so the loss is (1 - alpha) * 100.
    assert ours[-2] == pytest.approx((1 - alpha if alpha >= 0 else 1) * 100.0,
                                     rel=1e-6)
    # The cross-entropy (1 - t) x - log_sigmoid(x) cancels for negative x and
    # t = 0, where a last-bit difference between XLA's and torch's
    # log_sigmoid shows up as a few 1e-6 relative; elsewhere 1e-6 holds.
    rel = np.abs(ours - ref) / np.maximum(np.abs(ref), 1e-30)
    assert np.mean(rel <= 1e-6) > 0.999
    np.testing.assert_allclose(ours, ref, rtol=5e-6, atol=1e-30)


def test_sigmoid_focal_loss_matches_torchvision_float64():
  logits, targets = focal_inputs(np.float64)
  with x64():
    for alpha, gamma in FOCAL_PARAMS:
      ours = np.asarray(losses.sigmoid_focal_loss(
          jnp.asarray(logits), jnp.asarray(targets), alpha=alpha,
          gamma=gamma))
      ref = torch_focal_loss(torch.tensor(logits), torch.tensor(targets),
                             alpha=alpha, gamma=gamma,
                             reduction='none').numpy()
      assert ours.dtype == np.float64
      np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-300)


def test_sigmoid_focal_loss_gradient_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 4, size=(64, 5)).astype(np.float32)
  targets = (rng.uniform(size=logits.shape) < 0.5).astype(np.float32)
  x = torch.tensor(logits, requires_grad=True)
  torch_focal_loss(x, torch.tensor(targets), reduction='sum').backward()
  ours = jax.grad(lambda l: jnp.sum(losses.sigmoid_focal_loss(l, targets)))(
      jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(ours), x.grad.numpy(), rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('loss_type', ['l1', 'smooth_l1'])
def test_retinanet_losses_match_torchvision(loss_type):
  batch = make_batch(2)
  ref, ref_total, ref_g_cls, ref_g_box, matches = torch_losses(batch,
                                                              loss_type)
  # The batch exercises every case: foreground, background and ignored
  # anchors, and an image with no boxes (all background).
  assert (matches >= 0).sum() > 10
  assert (matches == -2).sum() > 10
  assert np.all(matches[0] == -1)
  out, total, g_cls, g_box = jax_losses(batch, bbox_reg_loss=loss_type)
  assert ref['classification'] > 0 and ref['bbox_regression'] > 0
  np.testing.assert_allclose(float(out['classification']),
                             ref['classification'], rtol=2e-6)
  np.testing.assert_allclose(float(out['bbox_regression']),
                             ref['bbox_regression'], rtol=2e-6)
  np.testing.assert_allclose(float(total), ref_total, rtol=2e-6)
  scale = np.abs(ref_g_cls).max()
  np.testing.assert_allclose(g_cls, ref_g_cls, rtol=1e-5, atol=1e-6 * scale)
  # L1 gradients are +-1 / (B * foreground) exactly; smooth L1 ones are
  # differences with the encoded targets, which may differ in the last bit.
  np.testing.assert_allclose(g_box, ref_g_box, rtol=1e-6,
                             atol=1e-6 * np.abs(ref_g_box).max())
  # Ignored anchors get no gradient, background ones no box gradient.
  assert np.all(g_cls[matches == -2] == 0)
  assert np.all(g_box[matches < 0] == 0)


def test_retinanet_losses_random_anchors_and_permuted_padding():
  rng = np.random.default_rng(3)
  anchors = random_boxes(rng, 300)
  batch = make_batch(4, counts=(3, 0, 5, 2, 1), anchors=anchors)
  ref, ref_total, ref_g_cls, ref_g_box, _ = torch_losses(batch)
  out, total, g_cls, g_box = jax_losses(batch)
  np.testing.assert_allclose(float(total), ref_total, rtol=2e-6)
  np.testing.assert_allclose(float(out['classification']),
                             ref['classification'], rtol=2e-6)
  np.testing.assert_allclose(g_cls, ref_g_cls, rtol=1e-5,
                             atol=1e-6 * np.abs(ref_g_cls).max())
  np.testing.assert_allclose(g_box, ref_g_box, rtol=1e-6, atol=0)
  # Where the padding sits in G does not matter.
  perm = rng.permutation(MAX_BOXES)
  shuffled = dict(batch, gt_boxes=batch['gt_boxes'][:, perm],
                  gt_labels=batch['gt_labels'][:, perm],
                  gt_valid=batch['gt_valid'][:, perm])
  out2, total2, _, _ = jax_losses(shuffled)
  np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)
  np.testing.assert_allclose(float(out2['bbox_regression']),
                             float(out['bbox_regression']), rtol=1e-6)


def test_retinanet_losses_no_boxes_is_pure_background():
  batch = make_batch(5, counts=(0, 0))
  out, _, _, g_box = jax_losses(batch)
  focal = losses.sigmoid_focal_loss(batch['cls_logits'],
                                    np.zeros_like(batch['cls_logits']))
  expected = np.asarray(jnp.sum(focal, axis=(1, 2))).mean()
  np.testing.assert_allclose(float(out['classification']), expected,
                             rtol=1e-6)
  assert float(out['bbox_regression']) == 0.0
  assert np.all(g_box == 0)


def test_retinanet_losses_vmap_matches_per_image_calls():
  batch = make_batch(6)
  out = losses.retinanet_losses(
      batch['cls_logits'], batch['bbox_regression'], batch['anchors'],
      batch['gt_boxes'], batch['gt_labels'], batch['gt_valid'])
  # Per-image losses (batches of one) vmapped over the batch average to the
  # batch loss.
  def one(c, r, b, l, v):
    return losses.retinanet_losses(c[None], r[None], batch['anchors'],
                                   b[None], l[None], v[None])['loss']
  per_image = jax.jit(jax.vmap(one))(
      batch['cls_logits'], batch['bbox_regression'], batch['gt_boxes'],
      batch['gt_labels'], batch['gt_valid'])
  assert per_image.shape == (len(BOXES_PER_IMAGE),)
  assert len(set(np.asarray(per_image).tolist())) == len(BOXES_PER_IMAGE)
  np.testing.assert_allclose(float(jnp.mean(per_image)), float(out['loss']),
                             rtol=1e-6)


def test_retinanet_losses_rejects_bad_arguments():
  batch = make_batch(7, counts=(1,))
  args = (batch['cls_logits'], batch['bbox_regression'], batch['anchors'],
          batch['gt_boxes'], batch['gt_labels'], batch['gt_valid'])
  with pytest.raises(ValueError, match='bbox_reg_loss'):
    losses.retinanet_losses(*args, bbox_reg_loss='giou')
  with pytest.raises(ValueError, match='anchors'):
    losses.retinanet_losses(args[0], args[1], args[2][:-1], *args[3:])
  with pytest.raises(ValueError, match='alpha'):
    losses.sigmoid_focal_loss(args[0], args[0], alpha=2.0)
