"""Box IoU and NMS against torchvision.ops, with padding masks, jit and vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from jaxperf.models.layers import boxes as B

THRESHOLDS = (0.3, 0.5, 0.7)


def clustered_boxes(rng, n, clusters=None, extent=200.0):
  """[n, 4] float32 boxes around a few centres, so that many overlap."""
  clusters = clusters or max(1, n // 20)
  centres = rng.uniform(0, extent, (clusters, 2))
  c = centres[rng.integers(0, clusters, n)] + rng.normal(0, 4, (n, 2))
  wh = rng.uniform(4, 40, (n, 2))
  return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(np.float32)


def tied_scores(rng, n, levels=12):
  """Scores on a few levels, so that many are equal."""
  return (rng.integers(0, levels, n) / levels).astype(np.float32)


def torch_nms(boxes, scores, thr):
  return torchvision.ops.nms(torch.from_numpy(np.asarray(boxes)),
                             torch.from_numpy(np.asarray(scores)), thr).numpy()


def torch_batched_nms(boxes, scores, classes, thr):
  return torchvision.ops.batched_nms(
      torch.from_numpy(np.asarray(boxes)), torch.from_numpy(np.asarray(scores)),
      torch.from_numpy(np.asarray(classes)), thr).numpy()


def assert_kept(result, want, max_outputs):
  """`result` is (indices, num_valid) holding want[:max_outputs], -1 after."""
  idx, num = (np.asarray(x) for x in result)
  want = np.asarray(want)[:max_outputs]
  assert idx.shape == (max_outputs,) and idx.dtype == np.int32
  assert int(num) == len(want)
  np.testing.assert_array_equal(idx[:len(want)], want)
  assert (idx[len(want):] == -1).all()


# Compiled once per shape; the threshold is a traced argument.
jit_nms = jax.jit(B.nms, static_argnames='max_outputs')
jit_batched_nms = jax.jit(B.batched_nms, static_argnames='max_outputs')


def test_area_and_iou_match_torchvision():
  rng = np.random.default_rng(0)
  b1 = clustered_boxes(rng, 40, clusters=3)
  b2 = clustered_boxes(rng, 30, clusters=3)
  # Degenerate (zero width, zero area, inverted), touching and equal boxes.
  b1[:6] = [[0, 0, 0, 0], [5, 5, 5, 9], [10, 10, 4, 4], [0, 0, 10, 10],
            [10, 0, 20, 10], [1, 1, 1, 1]]
  b2[:4] = [[0, 0, 0, 0], [10, 0, 20, 10], [0, 0, 10, 10], [5, 5, 5, 9]]
  t1, t2 = torch.from_numpy(b1), torch.from_numpy(b2)
  np.testing.assert_array_equal(B.box_area(b1),
                                torchvision.ops.box_area(t1).numpy())
  got = np.asarray(B.box_iou(b1, b2))
  want = torchvision.ops.box_iou(t1, t2).numpy()
  assert got.shape == (40, 30)
  np.testing.assert_array_equal(got, want)  # Bitwise, nan where torch's is.
  assert np.isnan(got[0, 0]) and got[3, 1] == 0 and got[3, 2] == 1
  assert (got[6:, 4:] > 0).any()  # The random boxes do overlap.


def test_iou_integer_and_batched_boxes():
  rng = np.random.default_rng(1)
  ints = rng.integers(0, 20, (2, 7, 4)).astype(np.int16)
  ints[..., 2:] += ints[..., :2]
  got = B.box_iou(ints, ints[:, :5])
  assert got.dtype == jnp.float32 and got.shape == (2, 7, 5)
  assert B.box_area(ints).dtype == jnp.int32
  for k in range(2):
    t = torch.from_numpy(ints[k])
    np.testing.assert_array_equal(got[k],
                                  torchvision.ops.box_iou(t, t[:5]).numpy())
  np.testing.assert_array_equal(
      B.box_area(ints), torchvision.ops.box_area(torch.from_numpy(ints)))


@pytest.mark.parametrize('thr', THRESHOLDS)
@pytest.mark.parametrize('n, seed', [(60, 0), (60, 1), (500, 2), (2000, 3)])
def test_nms_matches_torchvision(n, seed, thr):
  rng = np.random.default_rng(seed)
  boxes = clustered_boxes(rng, n)
  scores = tied_scores(rng, n) if seed % 2 else rng.random(n, np.float32)
  want = torch_nms(boxes, scores, thr)
  assert 0 < len(want) < n  # Suppression happened.
  assert_kept(jit_nms(boxes, scores, thr, max_outputs=n), want, n)


def test_nms_all_scores_equal_and_duplicates():
  rng = np.random.default_rng(4)
  boxes = clustered_boxes(rng, 300, clusters=4)
  boxes[100:150] = boxes[:50]  # Exact duplicates: IoU 1.
  scores = np.ones(300, np.float32)
  for thr in THRESHOLDS:
    want = torch_nms(boxes, scores, thr)
    assert_kept(jit_nms(boxes, scores, thr, max_outputs=300), want, 300)


def test_nms_degenerate_touching_and_threshold_rounding():
  boxes = np.array([
      [0, 0, 10, 10], [10, 0, 20, 10],  # Touching: IoU 0, both kept.
      [0, 0, 0, 0], [0, 0, 0, 0],  # Zero area: IoU nan, both kept.
      [30, 30, 25, 35],  # Inverted.
      [40, 40, 41, 43], [40, 40, 41, 50],  # IoU float32(0.3) > 0.3.
      [60, 60, 70, 70], [60, 60, 70, 75],  # IoU 2/3.
  ], np.float32)
  scores = np.array([9, 8, 7, 7, 6, 5, 4, 3, 2], np.float32)
  for thr in (0.0, 0.3, 0.5, 2 / 3, 0.7, 1.0):
    want = torch_nms(boxes, scores, thr)
    assert_kept(B.nms(boxes, scores, thr, 12), want, 12)
  # The rounding case: float32(0.3) is above the double 0.3, so torchvision
  # drops box 6 at 0.3 (and box 8 at float32(2/3), above the double 2/3).
  assert 6 not in torch_nms(boxes, scores, 0.3)
  assert 6 in torch_nms(boxes, scores, 0.31)
  got = np.asarray(B.nms(boxes, scores, 0.0, 12)[0])
  assert {0, 1, 2, 3}.issubset(got)


@pytest.mark.parametrize('max_outputs', [1, 7, 40])
def test_nms_truncates_at_max_outputs(max_outputs):
  rng = np.random.default_rng(5)
  boxes = clustered_boxes(rng, 200)
  scores = tied_scores(rng, 200)
  want = torch_nms(boxes, scores, 0.5)
  assert len(want) > 40
  assert_kept(B.nms(boxes, scores, 0.5, max_outputs), want, max_outputs)


@pytest.mark.parametrize('thr', THRESHOLDS)
def test_nms_valid_mask_equals_nms_of_the_valid_boxes(thr):
  rng = np.random.default_rng(6)
  boxes = clustered_boxes(rng, 400)
  scores = tied_scores(rng, 400)
  valid = rng.random(400) < 0.6
  valid[:5] = False
  scores[:5] = 2.0  # Padding with the top scores must still be ignored.
  (sub,) = np.nonzero(valid)
  want = sub[torch_nms(boxes[sub], scores[sub], thr)]
  got = jit_nms(boxes, scores, thr, max_outputs=400, valid=valid)
  assert_kept(got, want, 400)
  assert not np.isin(np.arange(5), np.asarray(got[0])).any()


def test_nms_without_valid_boxes_or_any_boxes():
  boxes = np.zeros((3, 4), np.float32)
  idx, num = B.nms(boxes, np.ones(3), 0.5, 4, valid=np.zeros(3, bool))
  assert int(num) == 0 and (np.asarray(idx) == -1).all()
  idx, num = B.nms(np.zeros((0, 4), np.float32), np.zeros(0), 0.5, 2)
  assert int(num) == 0 and np.asarray(idx).tolist() == [-1, -1]


def test_nms_traced_threshold_under_jit():
  rng = np.random.default_rng(7)
  boxes = clustered_boxes(rng, 300)
  scores = rng.random(300, np.float32)
  f = jax.jit(lambda b, s, t: B.nms(b, s, t, 300))
  for thr in THRESHOLDS:
    assert_kept(f(boxes, scores, jnp.float32(thr)),
                torch_nms(boxes, scores, thr), 300)


@pytest.mark.parametrize('thr', THRESHOLDS)
@pytest.mark.parametrize('n, num_classes, seed', [(300, 3, 0), (1000, 8, 1)])
def test_batched_nms_matches_torchvision(n, num_classes, seed, thr):
  rng = np.random.default_rng(10 + seed)
  boxes = clustered_boxes(rng, n)
  scores = tied_scores(rng, n) if seed else rng.random(n, np.float32)
  classes = rng.integers(0, num_classes, n)
  want = torch_batched_nms(boxes, scores, classes, thr)
  assert len(want) > len(torch_nms(boxes, scores, thr))  # Classes matter.
  assert_kept(jit_batched_nms(boxes, scores, classes, thr, max_outputs=n),
              want, n)


def test_batched_nms_many_boxes_per_class_results():
  # Above 1000 boxes torchvision's CPU path loops over classes and orders the
  # result with an unstable sort: equal kept sets, equal-score order may
  # differ. Ours is descending score, ties in index order.
  rng = np.random.default_rng(12)
  n = 2000
  boxes = clustered_boxes(rng, n)
  scores = tied_scores(rng, n)
  classes = rng.integers(0, 5, n)
  idx, num = jit_batched_nms(boxes, scores, classes, 0.5, max_outputs=n)
  got = np.asarray(idx)[:int(num)]
  want = torch_batched_nms(boxes, scores, classes, 0.5)
  assert sorted(got) == sorted(want)
  np.testing.assert_array_equal(got, want[np.lexsort((want, -scores[want]))])
  for c in range(5):  # And each class equals that class's own NMS.
    (sub,) = np.nonzero(classes == c)
    np.testing.assert_array_equal(got[classes[got] == c],
                                  sub[torch_nms(boxes[sub], scores[sub], 0.5)])


def test_batched_nms_keeps_classes_apart_with_negative_coordinates():
  # All coordinates <= -1: torchvision's class offset (max + 1) is 0, so its
  # classes collide; here the two classes stay apart.
  boxes = np.array([[-3, -3, -1, -1], [-3, -3, -1, -1]], np.float32)
  scores = np.array([0.9, 0.8], np.float32)
  classes = np.array([0, 1])
  assert torch_batched_nms(boxes, scores, classes, 0.5).tolist() == [0]
  assert_kept(B.batched_nms(boxes, scores, classes, 0.5, 2), [0, 1], 2)


def test_vmap_over_images():
  rng = np.random.default_rng(13)
  images, n, max_outputs = 3, 250, 60
  boxes = np.stack([clustered_boxes(rng, n) for _ in range(images)])
  scores = np.stack([tied_scores(rng, n) for _ in range(images)])
  classes = rng.integers(0, 4, (images, n))
  valid = rng.random((images, n)) < np.array([[1.0], [0.7], [0.2]])
  f = jax.jit(jax.vmap(functools.partial(B.nms, iou_threshold=0.5,
                                         max_outputs=max_outputs)))
  g = jax.jit(jax.vmap(functools.partial(B.batched_nms, iou_threshold=0.5,
                                         max_outputs=max_outputs)))
  idx, num = f(boxes, scores, valid=valid)
  cidx, cnum = g(boxes, scores, classes, valid=valid)
  assert idx.shape == cidx.shape == (images, max_outputs)
  assert num.shape == (images,)
  for k in range(images):
    (sub,) = np.nonzero(valid[k])
    want = sub[torch_nms(boxes[k, sub], scores[k, sub], 0.5)]
    assert_kept((idx[k], num[k]), want, max_outputs)
    want = sub[torch_batched_nms(boxes[k, sub], scores[k, sub],
                                 classes[k, sub], 0.5)]
    assert_kept((cidx[k], cnum[k]), want, max_outputs)
  assert int(num[2]) < max_outputs  # One image with fewer boxes than slots.


@pytest.mark.parametrize('call, match', [
    (lambda: B.box_area(np.zeros((3, 5))), '4 coordinates'),
    (lambda: B.box_iou(np.zeros((3, 4)), np.zeros((3, 3))), '4 coordinates'),
    (lambda: B.box_iou(np.zeros(4), np.zeros((3, 4))), r'\[\.\.\., N, 4\]'),
    (lambda: B.nms(np.zeros((2, 3, 4)), np.zeros(2), 0.5, 1), r'\[N, 4\]'),
    (lambda: B.nms(np.zeros((3, 4)), np.zeros(2), 0.5, 1), 'scores'),
    (lambda: B.nms(np.zeros((3, 4)), np.zeros((3, 1)), 0.5, 1), 'scores'),
    (lambda: B.nms(np.zeros((3, 4)), np.zeros(3), 0.5, 0), 'max_outputs'),
    (lambda: B.nms(np.zeros((3, 4)), np.zeros(3), 0.5, 2.0), 'max_outputs'),
    (lambda: B.nms(np.zeros((3, 4)), np.zeros(3), [0.5], 1), 'iou_threshold'),
    (lambda: B.nms(np.zeros((3, 4)), np.zeros(3), 0.5, 1,
                   valid=np.ones(4, bool)), 'valid'),
    (lambda: B.batched_nms(np.zeros((3, 4)), np.zeros(3), np.zeros(2), 0.5,
                           1), 'classes'),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
