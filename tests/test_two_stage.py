"""Mask R-CNN's two-stage logic against torchvision's detection functions
(torchvision options) and transcriptions of the MLPerf reference's
(maskrcnn-benchmark's) formulas where the two differ."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead

from jaxperf import losses
from jaxperf import metrics
from jaxperf.models import layers
from jaxperf.models.layers import two_stage
from jaxperf.models.layers.anchors import feature_sizes

PADDED = (96, 128)
IMAGE_SIZES = np.array([[96, 128], [90, 117]])
NUM_CLASSES = 6

jit_balanced_sample = jax.jit(
    layers.balanced_sample, static_argnames=('num_samples',
                                             'positive_fraction'))


def t(x, dtype=torch.float32):
  return torch.as_tensor(np.array(x)).to(dtype)


def gt_batch(rng, g=5, counts=(5, 3)):
  """Padded [B, G, 4] gt boxes in the images, [B, G] labels and valid."""
  xy = rng.uniform(0, [100, 70], (2, g, 2))
  wh = rng.uniform(10, 60, (2, g, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [127, 95])], -1)
  boxes[0, 0] = [2, 3, 40, 30]          # touching the border region
  valid = np.arange(g)[None, :] < np.asarray(counts)[:, None]
  labels = rng.integers(1, NUM_CLASSES, (2, g)) * valid
  boxes = np.where(valid[..., None], boxes, 0)
  return boxes.astype(np.float32), labels.astype(np.int32), valid


def jitter(rng, boxes, n, scale=0.15):
  """n boxes near `boxes` [G, 4] (random ones of them, moved and scaled)."""
  pick = boxes[rng.integers(0, len(boxes), n)]
  wh = pick[:, 2:] - pick[:, :2]
  shift = rng.normal(0, scale, (n, 4)) * np.concatenate([wh, wh], 1)
  out = pick + shift
  out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
  return out.astype(np.float32)


def torch_rpn(pre_nms_top_n=300, post_nms_top_n=100):
  gen = AnchorGenerator(sizes=tuple((s,) for s in two_stage.RPN_ANCHOR_SIZES),
                        aspect_ratios=(two_stage.RPN_ASPECT_RATIOS,) * 5)
  rpn = RegionProposalNetwork(
      gen, RPNHead(4, 3), fg_iou_thresh=0.7, bg_iou_thresh=0.3,
      batch_size_per_image=256, positive_fraction=0.5,
      pre_nms_top_n={'training': pre_nms_top_n, 'testing': pre_nms_top_n},
      post_nms_top_n={'training': post_nms_top_n,
                      'testing': post_nms_top_n},
      nms_thresh=0.7)
  return rpn.eval()


# --- Transcriptions of the reference (maskrcnn-benchmark) formulas --------


def ref_generate_anchors(stride, sizes, aspect_ratios):
  """modeling/rpn/anchor_generator.py: generate_anchors, in float64."""

  def whctrs(anchor):
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)

  def mkanchors(ws, hs, x_ctr, y_ctr):
    ws = ws[:, np.newaxis]
    hs = hs[:, np.newaxis]
    return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                      x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))

  def ratio_enum(anchor, ratios):
    w, h, x_ctr, y_ctr = whctrs(anchor)
    size_ratios = w * h / ratios
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * ratios)
    return mkanchors(ws, hs, x_ctr, y_ctr)

  def scale_enum(anchor, scales):
    w, h, x_ctr, y_ctr = whctrs(anchor)
    return mkanchors(w * scales, h * scales, x_ctr, y_ctr)

  scales = np.array(sizes, dtype=np.float64) / stride
  anchor = np.array([1, 1, stride, stride], dtype=np.float64) - 1
  anchors = ratio_enum(anchor, np.array(aspect_ratios, dtype=np.float64))
  return np.vstack([scale_enum(anchors[i, :], scales)
                    for i in range(anchors.shape[0])]).astype(np.float32)


def ref_grid_anchors(image_size):
  """AnchorGenerator.grid_anchors over P2..P6 of the padded image."""
  out = []
  for (gh, gw), stride, size in zip(
      feature_sizes(image_size, two_stage.RPN_STRIDES),
      two_stage.RPN_STRIDES, two_stage.RPN_ANCHOR_SIZES):
    base = torch.from_numpy(ref_generate_anchors(stride, (size,),
                                                 (0.5, 1.0, 2.0)))
    shifts_x = torch.arange(0, gw * stride, step=stride, dtype=torch.float32)
    shifts_y = torch.arange(0, gh * stride, step=stride, dtype=torch.float32)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing='ij')
    shift_x = shift_x.reshape(-1)
    shift_y = shift_y.reshape(-1)
    shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
    out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
  return torch.cat(out).numpy()


def ref_boxlist_iou(box1, box2):
  """structures/boxlist_ops.py: boxlist_iou (TO_REMOVE = 1)."""
  area1 = (box1[:, 2] - box1[:, 0] + 1) * (box1[:, 3] - box1[:, 1] + 1)
  area2 = (box2[:, 2] - box2[:, 0] + 1) * (box2[:, 3] - box2[:, 1] + 1)
  lt = torch.max(box1[:, None, :2], box2[:, :2])
  rb = torch.min(box1[:, None, 2:], box2[:, 2:])
  wh = (rb - lt + 1).clamp(min=0)
  inter = wh[:, :, 0] * wh[:, :, 1]
  return inter / (area1[:, None] + area2 - inter)


def ref_encode(reference_boxes, proposals, weights):
  """modeling/box_coder.py: BoxCoder.encode."""
  ex_widths = proposals[:, 2] - proposals[:, 0] + 1
  ex_heights = proposals[:, 3] - proposals[:, 1] + 1
  ex_ctr_x = proposals[:, 0] + 0.5 * ex_widths
  ex_ctr_y = proposals[:, 1] + 0.5 * ex_heights
  gt_widths = reference_boxes[:, 2] - reference_boxes[:, 0] + 1
  gt_heights = reference_boxes[:, 3] - reference_boxes[:, 1] + 1
  gt_ctr_x = reference_boxes[:, 0] + 0.5 * gt_widths
  gt_ctr_y = reference_boxes[:, 1] + 0.5 * gt_heights
  wx, wy, ww, wh = weights
  return torch.stack((wx * (gt_ctr_x - ex_ctr_x) / ex_widths,
                      wy * (gt_ctr_y - ex_ctr_y) / ex_heights,
                      ww * torch.log(gt_widths / ex_widths),
                      wh * torch.log(gt_heights / ex_heights)), dim=1)


def ref_decode(rel_codes, boxes, weights):
  """modeling/box_coder.py: BoxCoder.decode."""
  widths = boxes[:, 2] - boxes[:, 0] + 1
  heights = boxes[:, 3] - boxes[:, 1] + 1
  ctr_x = boxes[:, 0] + 0.5 * widths
  ctr_y = boxes[:, 1] + 0.5 * heights
  wx, wy, ww, wh = weights
  dx = rel_codes[:, 0::4] / wx
  dy = rel_codes[:, 1::4] / wy
  dw = torch.clamp(rel_codes[:, 2::4] / ww, max=math.log(1000. / 16))
  dh = torch.clamp(rel_codes[:, 3::4] / wh, max=math.log(1000. / 16))
  pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
  pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
  pred_w = torch.exp(dw) * widths[:, None]
  pred_h = torch.exp(dh) * heights[:, None]
  pred = torch.zeros_like(rel_codes)
  pred[:, 0::4] = pred_ctr_x - 0.5 * pred_w
  pred[:, 1::4] = pred_ctr_y - 0.5 * pred_h
  pred[:, 2::4] = pred_ctr_x + 0.5 * pred_w - 1
  pred[:, 3::4] = pred_ctr_y + 0.5 * pred_h - 1
  return pred


def ref_clip(boxes, height, width):
  """BoxList.clip_to_image(remove_empty=False)."""
  boxes = boxes.clone()
  boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width - 1)
  boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height - 1)
  return boxes


def ref_nms(boxes, scores, thresh):
  """The reference's CUDA NMS kernel (+1 areas, suppress at IoU > thresh),
  greedily: kept indices in descending score order."""
  order = torch.argsort(scores, descending=True).tolist()
  iou = ref_boxlist_iou(boxes, boxes)
  suppressed = set()
  keep = []
  for i in order:
    if i in suppressed:
      continue
    keep.append(i)
    suppressed.update(torch.where(iou[i] > thresh)[0].tolist())
  return torch.as_tensor(keep, dtype=torch.int64)


# --- Anchors --------------------------------------------------------------


@pytest.mark.parametrize('image_size', [(96, 128), (100, 150)])
def test_anchors_match_torchvision_anchor_generator(image_size):
  rpn = torch_rpn()
  images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
  feats = [torch.zeros(1, 1, h, w)
           for h, w in feature_sizes(image_size, two_stage.RPN_STRIDES)]
  expected = rpn.anchor_generator(images, feats)[0].numpy()
  got = layers.rpn_anchors(image_size, style='torchvision')
  np.testing.assert_array_equal(got, expected)
  assert sum(layers.rpn_anchors_per_level(image_size)) == len(got)


def test_anchors_match_reference_generate_anchors():
  np.testing.assert_array_equal(layers.rpn_anchors((100, 150)),
                                ref_grid_anchors((100, 150)))
  for stride, size in zip(two_stage.RPN_STRIDES, two_stage.RPN_ANCHOR_SIZES):
    np.testing.assert_array_equal(
        layers.reference_cell_anchors(stride, (size,), (0.5, 1, 2)),
        ref_generate_anchors(stride, (size,), (0.5, 1, 2)))
  # The Faster R-CNN MATLAB anchors quoted in the reference's comments,
  # which count pixels from 1.
  np.testing.assert_array_equal(
      layers.reference_cell_anchors(16, (128, 256, 512), (0.5, 1, 2)) + 1,
      [[-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
       [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
       [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360]])
  # P2's size-32 anchors at (0, 0): 48 x 24, 32 x 32 and 24 x 48 pixels.
  np.testing.assert_array_equal(
      layers.rpn_anchors(PADDED)[:3],
      [[-22, -10, 25, 13], [-14, -14, 17, 17], [-10, -22, 13, 25]])


# --- RPN targets, sampling and loss ---------------------------------------


def test_rpn_targets_match_torchvision():
  rng = np.random.default_rng(0)
  boxes, _, valid = gt_batch(rng)
  anchors = layers.rpn_anchors(PADDED, style='torchvision')
  out = layers.rpn_targets(jax.random.key(0), anchors, boxes, valid,
                           IMAGE_SIZES, straddle_thresh=None,
                           legacy_plus_one=False)
  rpn = torch_rpn()
  tv_anchors = [t(anchors)] * 2
  targets = [{'boxes': t(b[v])} for b, v in zip(boxes, valid)]
  labels, matched = rpn.assign_targets_to_anchors(tv_anchors, targets)
  reg = rpn.box_coder.encode(matched, tv_anchors)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(out['labels'][i]),
                                  labels[i].numpy())
    pos = labels[i].numpy() == 1
    assert 0 < pos.sum() < 200
    np.testing.assert_allclose(np.asarray(out['regression_targets'][i])[pos],
                               reg[i].numpy()[pos], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out['regression_targets'][i])[
        ~pos], 0)


def test_rpn_targets_match_reference():
  rng = np.random.default_rng(1)
  boxes, _, valid = gt_batch(rng)
  anchors = layers.rpn_anchors(PADDED)
  out = layers.rpn_targets(jax.random.key(0), anchors, boxes, valid,
                           IMAGE_SIZES)
  matcher = det_utils.Matcher(0.7, 0.3, allow_low_quality_matches=True)
  a = t(anchors)
  for i, (h, w) in enumerate(IMAGE_SIZES):
    gt = t(boxes[i][valid[i]])
    matched_idxs = matcher(ref_boxlist_iou(gt, a))
    labels = (matched_idxs >= 0).to(torch.float32)
    labels[matched_idxs == -1] = 0
    visibility = ((a[:, 0] >= 0) & (a[:, 1] >= 0) & (a[:, 2] < w)
                  & (a[:, 3] < h))
    labels[~visibility] = -1
    labels[matched_idxs == -2] = -1
    reg = ref_encode(gt[matched_idxs.clamp(min=0)], a, (1., 1., 1., 1.))
    np.testing.assert_array_equal(np.asarray(out['labels'][i]),
                                  labels.numpy())
    np.testing.assert_array_equal(np.asarray(out['matched_idxs'][i]),
                                  matched_idxs.numpy())
    pos = labels.numpy() == 1
    assert pos.sum() > 0 and (~visibility).sum() > 0
    np.testing.assert_allclose(np.asarray(out['regression_targets'][i])[pos],
                               reg.numpy()[pos], rtol=1e-5, atol=1e-5)


def test_rpn_sampling_sizes_fractions_and_determinism():
  rng = np.random.default_rng(2)
  boxes, _, valid = gt_batch(rng)
  anchors = layers.rpn_anchors(PADDED)
  targets = jax.jit(lambda key, boxes: layers.rpn_targets(
      key, anchors, boxes, valid, IMAGE_SIZES))
  a = targets(jax.random.key(5), boxes)
  b = targets(jax.random.key(5), boxes)
  c = targets(jax.random.key(6), boxes)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
  assert not np.array_equal(np.asarray(a['sampled_negative']),
                            np.asarray(c['sampled_negative']))
  labels = np.asarray(a['labels'])
  pos = np.asarray(a['sampled_positive'])
  neg = np.asarray(a['sampled_negative'])
  assert np.all(labels[pos] == 1) and np.all(labels[neg] == 0)
  npos = np.minimum((labels == 1).sum(1), 128)
  np.testing.assert_array_equal(pos.sum(1), npos)
  np.testing.assert_array_equal(
      neg.sum(1), np.minimum((labels == 0).sum(1), 256 - npos))
  # Padding ground truths are never matched.
  matched = np.asarray(a['matched_idxs'])
  assert np.all(matched < valid.sum(1)[:, None])


def test_balanced_sample():
  labels = np.full(2000, -1, np.int32)
  labels[:10] = 1
  labels[100:1100] = 0
  idx, ok = jit_balanced_sample(jax.random.key(0), labels, 256, 0.5)
  idx, ok = np.asarray(idx), np.asarray(ok)
  assert ok.all() and len(set(idx.tolist())) == 256
  assert np.all(labels[idx[:10]] == 1) and np.all(labels[idx[10:]] == 0)
  # Not enough negatives: 128 positives, all 20 negatives, padding.
  labels = np.full(500, -1, np.int32)
  labels[:300] = 2
  labels[400:420] = 0
  idx, ok = jit_balanced_sample(jax.random.key(1), labels, 256, 0.5)
  idx, ok = np.asarray(idx), np.asarray(ok)
  assert ok.sum() == 148 and np.all(idx[~ok] == -1)
  assert np.all(labels[idx[:128]] == 2)
  assert sorted(idx[128:148].tolist()) == list(range(400, 420))
  # Each of 50 positives is drawn about as often (10 of 50, 400 draws).
  labels = np.zeros(60, np.int32)
  labels[:50] = 1
  draws = jax.vmap(lambda k: jit_balanced_sample(k, labels, 20, 0.5)[0])(
      jax.random.split(jax.random.key(2), 400))
  counts = np.bincount(np.asarray(draws)[:, :10].reshape(-1), minlength=60)
  assert counts[50:].sum() == 0 and 40 < counts[:50].min()
  assert counts[:50].max() < 125


def test_rpn_loss_matches_torchvision_compute_loss():
  rng = np.random.default_rng(3)
  boxes, _, valid = gt_batch(rng)
  anchors = layers.rpn_anchors(PADDED, style='torchvision')
  out = layers.rpn_targets(jax.random.key(1), anchors, boxes, valid,
                           IMAGE_SIZES, straddle_thresh=None,
                           legacy_plus_one=False)
  n = len(anchors)
  objectness = rng.normal(0, 2, (2, n)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (2, n, 4)).astype(np.float32)
  got = losses.rpn_losses(objectness, deltas, out['regression_targets'],
                          out['sampled_positive'], out['sampled_negative'])
  rpn = torch_rpn()
  tv_anchors = [t(anchors)] * 2
  labels, matched = rpn.assign_targets_to_anchors(
      tv_anchors, [{'boxes': t(b[v])} for b, v in zip(boxes, valid)])
  reg = rpn.box_coder.encode(matched, tv_anchors)
  masks = (list(t(out['sampled_positive'], torch.uint8)),
           list(t(out['sampled_negative'], torch.uint8)))
  rpn.fg_bg_sampler = lambda _: masks
  obj_loss, box_loss = rpn.compute_loss(t(objectness).reshape(-1, 1),
                                        t(deltas).reshape(-1, 4), labels, reg)
  np.testing.assert_allclose(got['objectness'], obj_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(got['rpn_box_reg'], box_loss.item(), rtol=1e-5)
  grads = jax.grad(lambda x, y: sum(losses.rpn_losses(
      x, y, out['regression_targets'], out['sampled_positive'],
      out['sampled_negative']).values()), argnums=(0, 1))(objectness, deltas)
  sampled = np.asarray(out['sampled_positive'] | out['sampled_negative'])
  assert np.all(np.isfinite(grads[0])) and np.all(grads[0][~sampled] == 0)


# --- Proposals ------------------------------------------------------------


def rpn_inputs(rng, anchors):
  n = len(anchors)
  objectness = rng.normal(0, 2, (2, n)).astype(np.float32)
  deltas = rng.normal(0, 0.2, (2, n, 4)).astype(np.float32)
  return objectness, deltas


def test_proposals_match_torchvision_filter_proposals():
  rng = np.random.default_rng(4)
  anchors = layers.rpn_anchors(PADDED, style='torchvision')
  level_sizes = layers.rpn_anchors_per_level(PADDED)
  objectness, deltas = rpn_inputs(rng, anchors)
  got = layers.rpn_proposals(objectness, deltas, anchors, level_sizes,
                             IMAGE_SIZES, pre_nms_top_n=300,
                             post_nms_top_n=100, per_image=True,
                             min_size=1e-3, legacy_plus_one=False)
  rpn = torch_rpn(300, 100)
  proposals = rpn.box_coder.decode(t(deltas).reshape(-1, 4),
                                   [t(anchors)] * 2).view(2, -1, 4)
  boxes, scores = rpn.filter_proposals(
      proposals, t(objectness), [tuple(s) for s in IMAGE_SIZES.tolist()],
      list(level_sizes))
  for i in range(2):
    k = len(boxes[i])
    assert 40 < k <= 100 and int(np.asarray(got['valid'][i]).sum()) == k
    np.testing.assert_allclose(np.asarray(got['boxes'][i, :k]),
                               boxes[i].numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got['scores'][i, :k]),
                               scores[i].numpy(), rtol=1e-6, atol=1e-7)


def test_proposals_match_reference_per_batch_training():
  rng = np.random.default_rng(5)
  anchors = layers.rpn_anchors(PADDED)
  level_sizes = layers.rpn_anchors_per_level(PADDED)
  objectness, deltas = rpn_inputs(rng, anchors)
  pre, post = 150, 120
  got = layers.rpn_proposals(objectness, deltas, anchors, level_sizes,
                             IMAGE_SIZES, pre_nms_top_n=pre,
                             post_nms_top_n=post)
  # RPNPostProcessor.forward_for_single_feature_map and, in training,
  # select_over_all_levels over the batch.
  per_image = [[], []]
  start = 0
  for count in level_sizes:
    obj = t(objectness[:, start:start + count]).sigmoid()
    obj, idx = obj.topk(min(pre, count), dim=1, sorted=True)
    for i, (h, w) in enumerate(IMAGE_SIZES):
      a = t(anchors[start:start + count])[idx[i]]
      d = t(deltas[i, start:start + count])[idx[i]]
      b = ref_clip(ref_decode(d, a, (1., 1., 1., 1.)), h, w)
      ws, hs = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1
      keep = torch.where((ws >= 0) & (hs >= 0))[0]
      b, s = b[keep], obj[i][keep]
      keep = ref_nms(b, s, 0.7)
      per_image[i].append((b[keep], s[keep]))
    start += count
  boxes = [torch.cat([b for b, _ in p]) for p in per_image]
  scores = [torch.cat([s for _, s in p]) for p in per_image]
  flat = torch.cat(scores)
  chosen = torch.zeros_like(flat, dtype=torch.bool)
  chosen[torch.topk(flat, post, sorted=True)[1]] = True
  chosen = chosen.split([len(s) for s in scores])
  kept = [int(np.asarray(got['valid'][i]).sum()) for i in range(2)]
  assert sum(kept) == post and min(kept) > 0
  for i in range(2):
    b, s = boxes[i][chosen[i]], scores[i][chosen[i]]
    order = torch.argsort(s, descending=True)
    assert len(order) == kept[i]
    np.testing.assert_allclose(np.asarray(got['boxes'][i, :kept[i]]),
                               b[order].numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got['scores'][i, :kept[i]]),
                               s[order].numpy(), rtol=1e-6)


# --- ROI sampling and the box head loss -----------------------------------


def roi_inputs(rng, boxes, valid, p=80):
  proposals = np.zeros((2, p, 4), np.float32)
  proposal_valid = np.zeros((2, p), bool)
  for i, n in enumerate((80, 64)):
    near = jitter(rng, boxes[i][valid[i]], n // 2)
    xy = rng.uniform(0, 90, (n - n // 2, 2))
    far = np.concatenate([xy, xy + rng.uniform(4, 40, xy.shape)], 1)
    proposals[i, :n] = np.concatenate([near, far])
    proposal_valid[i, :n] = True
  return proposals, proposal_valid


@pytest.mark.parametrize('legacy', [False, True])
def test_roi_sampling_matches_torchvision_and_reference(legacy):
  rng = np.random.default_rng(6)
  boxes, labels, valid = gt_batch(rng)
  proposals, proposal_valid = roi_inputs(rng, boxes, valid)
  s = 64
  out = layers.sample_rois(jax.random.key(0), proposals, proposal_valid,
                           boxes, labels, valid, batch_size_per_image=s,
                           legacy_plus_one=legacy)
  heads = RoIHeads(None, None, None, 0.5, 0.5, s, 0.25, None, 0.05, 0.5, 100)
  for i in range(2):
    p = t(proposals[i][proposal_valid[i]])
    gt = t(boxes[i][valid[i]])
    cand = torch.cat([p, gt])
    if legacy:
      matched = heads.proposal_matcher(ref_boxlist_iou(gt, cand))
      ref_labels = t(labels[i][valid[i]], torch.int64)[matched.clamp(min=0)]
      ref_labels[matched == -1] = 0
      ref_labels[matched == -2] = -1
    else:
      matched, ref_labels = heads.assign_targets_to_proposals(
          [cand], [gt], [t(labels[i][valid[i]], torch.int64)])
      matched, ref_labels = matched[0], ref_labels[0]
    # Our candidates: all P proposal slots (padding included), then G gts.
    ours = np.concatenate([np.flatnonzero(proposal_valid[i]),
                           len(proposal_valid[i])
                           + np.flatnonzero(valid[i])])
    lab, _ = layers.label_proposals(
        np.concatenate([proposals[i], boxes[i]]),
        np.concatenate([proposal_valid[i], valid[i]]), boxes[i], labels[i],
        valid[i], legacy_plus_one=legacy)
    np.testing.assert_array_equal(np.asarray(lab)[ours], ref_labels.numpy())
    assert np.all(np.asarray(lab)[np.setdiff1d(np.arange(len(lab)), ours)]
                  == -1)

    ok = np.asarray(out['valid'][i])
    idx = np.asarray(out['indices'][i])[ok]
    rank = {v: k for k, v in enumerate(ours.tolist())}
    sel = torch.as_tensor([rank[v] for v in idx.tolist()])
    roi_labels = np.asarray(out['labels'][i])[ok]
    np.testing.assert_array_equal(roi_labels, ref_labels[sel].numpy())
    np.testing.assert_array_equal(np.asarray(out['boxes'][i])[ok],
                                  cand[sel].numpy())
    npos = int((ref_labels > 0).sum())
    assert (roi_labels > 0).sum() == min(npos, 16) and npos > 0
    assert ok.sum() == min(16, npos) + min(int((ref_labels == 0).sum()),
                                           s - min(16, npos))
    assert np.all(roi_labels[:min(16, npos)] > 0)
    pos = roi_labels > 0
    np.testing.assert_array_equal(np.asarray(out['matched_idxs'][i])[ok][pos],
                                  matched[sel][pos].numpy())
    if legacy:
      reg = ref_encode(gt[matched[sel].clamp(min=0)], cand[sel],
                       (10., 10., 5., 5.))
    else:
      reg = heads.box_coder.encode([gt[matched[sel].clamp(min=0)]],
                                   [cand[sel]])[0]
    np.testing.assert_allclose(
        np.asarray(out['regression_targets'][i])[ok][pos], reg.numpy()[pos],
        rtol=1e-5, atol=1e-5)
  again = layers.sample_rois(jax.random.key(0), proposals, proposal_valid,
                             boxes, labels, valid, batch_size_per_image=s,
                             legacy_plus_one=legacy)
  np.testing.assert_array_equal(np.asarray(again['indices']),
                                np.asarray(out['indices']))


def sampled_rois(rng, s=64):
  boxes, labels, valid = gt_batch(rng)
  proposals, proposal_valid = roi_inputs(rng, boxes, valid)
  out = layers.sample_rois(jax.random.key(3), proposals, proposal_valid,
                           boxes, labels, valid, batch_size_per_image=s,
                           legacy_plus_one=False)
  return boxes, labels, valid, out


@pytest.mark.parametrize('beta', [1.0 / 9, 1.0])
def test_fastrcnn_loss_matches_torchvision(beta):
  rng = np.random.default_rng(7)
  _, _, _, out = sampled_rois(rng)
  s = out['labels'].shape[1]
  logits = rng.normal(0, 2, (2, s, NUM_CLASSES)).astype(np.float32)
  regression = rng.normal(0, 0.5, (2, s, NUM_CLASSES * 4)).astype(np.float32)
  got = losses.fastrcnn_losses(logits, regression, out['labels'],
                               out['regression_targets'], out['valid'],
                               beta=beta)
  ok = np.asarray(out['valid'])
  lab = [t(np.asarray(out['labels'])[i][ok[i]], torch.int64)
         for i in range(2)]
  reg = [t(np.asarray(out['regression_targets'])[i][ok[i]])
         for i in range(2)]
  logits_t, regression_t = t(logits[ok]), t(regression[ok])
  if beta == 1.0 / 9:
    cls_loss, box_loss = tv_roi_heads.fastrcnn_loss(logits_t, regression_t,
                                                    lab, reg)
  else:
    # The reference's FastRCNNLossComputation.__call__ (smooth L1 beta 1).
    labels, targets = torch.cat(lab), torch.cat(reg)
    cls_loss = F.cross_entropy(logits_t, labels)
    pos = torch.nonzero(labels > 0).squeeze(1)
    map_inds = 4 * labels[pos][:, None] + torch.tensor([0, 1, 2, 3])
    n = torch.abs(regression_t[pos[:, None], map_inds] - targets[pos])
    box_loss = torch.where(n < 1, 0.5 * n ** 2, n - 0.5).sum() / labels.numel()
  np.testing.assert_allclose(got['classifier'], cls_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(got['box_reg'], box_loss.item(), rtol=1e-5)
  grads = jax.grad(lambda x, y: sum(losses.fastrcnn_losses(
      x, y, out['labels'], out['regression_targets'], out['valid'],
      beta=beta).values()), argnums=(0, 1))(logits, regression)
  for g in grads:
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[~ok] == 0)


# --- Mask targets and loss ------------------------------------------------


def test_mask_targets_and_loss_match_torchvision():
  rng = np.random.default_rng(8)
  m, k, h, w = 16, 12, 64, 80
  gt = np.array([[[4, 5, 20, 21], [30, 10, 46, 26], [50, 40, 66, 56]],
                 [[10, 30, 26, 46], [40, 6, 56, 22], [0, 0, 0, 0]]],
                np.float32)
  gt_valid = np.array([[1, 1, 1], [1, 1, 0]], bool)
  gt_labels = np.array([[2, 5, 1], [3, 3, 0]], np.int32)
  crops = (rng.uniform(size=(2, 3, m, m)) < 0.6).astype(np.float32)
  full = np.zeros((2, 3, h, w), np.float32)
  for i, j in zip(*np.nonzero(gt_valid)):
    x1, y1 = gt[i, j, :2].astype(int)
    full[i, j, y1:y1 + m, x1:x1 + m] = crops[i, j]
  matched = np.stack([rng.integers(0, 3, k), rng.integers(0, 2, k)])
  rois = np.stack([gt[i][matched[i]] + rng.normal(0, 3, (k, 4))
                   for i in range(2)]).astype(np.float32)
  roi_valid = np.ones((2, k), bool)
  roi_valid[1, 9:] = False
  got = layers.mask_targets(crops, gt, rois, matched, aligned=False,
                            sampling_ratio=-1, max_sampling_grid=4,
                            threshold=None)
  for i in range(2):
    expected = tv_roi_heads.project_masks_on_boxes(
        t(full[i]), t(rois[i]), t(matched[i], torch.int64), 28)
    np.testing.assert_allclose(np.asarray(got[i]), expected.numpy(),
                               atol=1e-5)
  logits = rng.normal(0, 2, (2, k, 28, 28, NUM_CLASSES)).astype(np.float32)
  roi_labels = np.take_along_axis(gt_labels, matched, 1)
  loss = losses.maskrcnn_mask_loss(logits, roi_labels, got, roi_valid)
  expected = tv_roi_heads.maskrcnn_loss(
      t(np.concatenate([logits[0], logits[1, :9]]).transpose(0, 3, 1, 2)),
      [t(rois[0]), t(rois[1, :9])], [t(full[0]), t(full[1])],
      [t(gt_labels[0], torch.int64), t(gt_labels[1], torch.int64)],
      [t(matched[0], torch.int64), t(matched[1, :9], torch.int64)])
  np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
  grad = jax.grad(losses.maskrcnn_mask_loss)(logits, roi_labels, got,
                                            roi_valid)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[1, 9:] == 0)
  assert float(losses.maskrcnn_mask_loss(
      logits, roi_labels, got, np.zeros((2, k), bool))) == 0.0


def test_mask_targets_default_samples_pixel_centres():
  rng = np.random.default_rng(9)
  crops = (rng.uniform(size=(1, 2, 28, 28)) < 0.5).astype(np.uint8)
  gt = np.array([[[3.3, 7.1, 40.6, 30.2], [10, 10, 60.5, 90]]], np.float32)
  # Over its own box a crop samples itself; over its left half, each
  # crop column twice.
  left = gt[:, 1:].copy()
  left[..., 2] = (left[..., 0] + left[..., 2]) / 2
  rois = np.concatenate([gt, left], 1)
  got = np.asarray(layers.mask_targets(crops, gt, rois,
                                       np.array([[0, 1, 1]])))
  np.testing.assert_array_equal(got[0, :2], crops[0])
  np.testing.assert_array_equal(got[0, 2, :, 1::2], crops[0, 1, :, :14])


# --- Evaluation -----------------------------------------------------------


def detection_inputs(rng, r=60):
  boxes, _, valid = gt_batch(rng)
  proposals = np.stack([jitter(rng, boxes[i][valid[i]], r, 0.2)
                        for i in range(2)])
  proposal_valid = np.ones((2, r), bool)
  proposal_valid[1, 45:] = False
  logits = rng.normal(0, 2, (2, r, NUM_CLASSES)).astype(np.float32)
  regression = rng.normal(0, 0.5, (2, r, NUM_CLASSES * 4)).astype(np.float32)
  return logits, regression, proposals, proposal_valid


def test_detections_match_torchvision_postprocess_detections():
  rng = np.random.default_rng(10)
  logits, regression, proposals, proposal_valid = detection_inputs(rng)
  got = layers.roi_detections(logits, regression, proposals, proposal_valid,
                              IMAGE_SIZES, detections_per_img=30,
                              min_size=1e-2, legacy_plus_one=False)
  heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5,
                   30)
  n = proposal_valid.sum(1)
  boxes, scores, labels = heads.postprocess_detections(
      t(np.concatenate([logits[0], logits[1, :n[1]]])),
      t(np.concatenate([regression[0], regression[1, :n[1]]])),
      [t(proposals[0]), t(proposals[1, :n[1]])],
      [tuple(s) for s in IMAGE_SIZES.tolist()])
  for i in range(2):
    k = len(boxes[i])
    assert 10 < k <= 30 and int(np.asarray(got['valid'][i]).sum()) == k
    np.testing.assert_allclose(np.asarray(got['boxes'][i, :k]),
                               boxes[i].numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got['scores'][i, :k]),
                               scores[i].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got['labels'][i, :k]),
                                  labels[i].numpy())


def test_detections_match_reference_post_processor():
  rng = np.random.default_rng(11)
  logits, regression, proposals, proposal_valid = detection_inputs(rng)
  d = 30
  got = layers.roi_detections(logits, regression, proposals, proposal_valid,
                              IMAGE_SIZES, detections_per_img=d)
  for i, (h, w) in enumerate(IMAGE_SIZES):
    ok = proposal_valid[i]
    prob = F.softmax(t(logits[i][ok]), -1)
    boxes = ref_clip(ref_decode(t(regression[i][ok]), t(proposals[i][ok]),
                                (10., 10., 5., 5.)).reshape(-1, 4), h, w)
    boxes = boxes.reshape(-1, NUM_CLASSES * 4)
    result = []
    for j in range(1, NUM_CLASSES):        # PostProcessor.filter_results
      inds = torch.where(prob[:, j] > 0.05)[0]
      b, s = boxes[inds, j * 4:(j + 1) * 4], prob[inds, j]
      keep = ref_nms(b, s, 0.5)
      result += [(s[q].item(), j, b[q].numpy()) for q in keep.tolist()]
    result.sort(key=lambda x: -x[0])
    result = result[:d]
    k = int(np.asarray(got['valid'][i]).sum())
    assert k == len(result) and k > 10
    np.testing.assert_allclose(np.asarray(got['scores'][i, :k]),
                               [x[0] for x in result], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got['labels'][i, :k]),
                                  [x[1] for x in result])
    np.testing.assert_allclose(np.asarray(got['boxes'][i, :k]),
                               np.stack([x[2] for x in result]), rtol=1e-5,
                               atol=1e-4)


def test_mask_probabilities_match_maskrcnn_inference():
  rng = np.random.default_rng(12)
  logits = rng.normal(0, 2, (7, 28, 28, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(1, NUM_CLASSES, 7)
  expected = tv_roi_heads.maskrcnn_inference(
      t(logits.transpose(0, 3, 1, 2)), [t(labels, torch.int64)])[0]
  np.testing.assert_allclose(layers.mask_probabilities(logits, labels),
                             expected[:, 0].numpy(), rtol=1e-6, atol=1e-7)


def test_paste_masks_match_torchvision_and_rle():
  rng = np.random.default_rng(13)
  h, w = 70, 90
  masks = rng.uniform(size=(8, 28, 28)).astype(np.float32)
  boxes = np.array([[10.3, 5.7, 50.2, 40.9], [-8, -5, 20.5, 30],
                    [60, 50, 120, 95], [30, 30, 30.4, 30.2],
                    [0, 0, 89, 69], [44.9, 12.1, 47.2, 60.8],
                    [100, 80, 130, 99], [5, 60, 25, 69.9]], np.float32)
  soft = metrics.paste_masks(masks, boxes, (h, w), threshold=None)
  # torchvision (and the reference) cannot paste the box outside the image.
  inside = np.arange(8) != 6
  expected = tv_roi_heads.paste_masks_in_image(
      t(masks[inside, None]), t(boxes[inside]), (h, w))[:, 0].numpy()
  np.testing.assert_allclose(soft[inside], expected, atol=2e-6)
  assert not soft[6].any()
  hard = metrics.paste_masks(masks, boxes, (h, w))
  assert hard.dtype == bool
  np.testing.assert_array_equal(hard, soft > 0.5)
  rles = metrics.masks_to_rle(hard)
  assert all(isinstance(r['counts'], str) for r in rles)
  decoded = mask_util.decode([{'size': r['size'],
                               'counts': r['counts'].encode()} for r in rles])
  np.testing.assert_array_equal(decoded.transpose(2, 0, 1), hard)
