"""RetinaNet post-processing against torchvision's postprocess_detections."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import transform as tv_transform
from torchvision.models.detection.retinanet import RetinaNet

from jaxperf.models.layers import anchors as A
from jaxperf.models.layers import detection as D

IMAGE_SIZE = (128, 96)
NUM_CLASSES = 4


def torch_detections(logits, regression, anchors, level_sizes, image_shapes,
                     **config):
  """torchvision's RetinaNet.postprocess_detections on numpy inputs."""
  model = types.SimpleNamespace(
      box_coder=det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)), **config)
  splits = np.cumsum(level_sizes)[:-1]
  head = {
      'cls_logits': [torch.from_numpy(x) for x in
                     np.split(logits, splits, axis=1)],
      'bbox_regression': [torch.from_numpy(x) for x in
                          np.split(regression, splits, axis=1)],
  }
  per_level = [torch.from_numpy(x) for x in np.split(anchors, splits)]
  with torch.no_grad():
    return RetinaNet.postprocess_detections(
        model, head, [per_level] * logits.shape[0],
        [tuple(s) for s in image_shapes])


def head_outputs(seed, batch, num_anchors, num_classes):
  """Logits where most scores pass 0.05; codes with a few clamped ones."""
  rng = np.random.default_rng(seed)
  logits = (rng.normal(0, 1.5, (batch, num_anchors, num_classes)) - 2.0)
  regression = rng.normal(0, 0.3, (batch, num_anchors, 4))
  big = rng.random((batch, num_anchors)) < 0.01
  regression[..., 2:][big] = 6.0
  return logits.astype(np.float32), regression.astype(np.float32)


def assert_same_detections(ours, theirs, image):
  valid = np.asarray(ours['valid'][image])
  num = len(theirs['scores'])
  assert valid.sum() == num and valid[:num].all()
  np.testing.assert_array_equal(np.asarray(ours['labels'][image][:num]),
                                theirs['labels'].numpy())
  np.testing.assert_allclose(np.asarray(ours['scores'][image][:num]),
                             theirs['scores'].numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(np.asarray(ours['boxes'][image][:num]),
                             theirs['boxes'].numpy(), rtol=1e-6, atol=1e-5)
  for key in ('boxes', 'scores', 'labels'):
    assert not np.asarray(ours[key][image][num:]).any()


@pytest.fixture(scope='module')
def anchors():
  return (A.retinanet_anchors(IMAGE_SIZE),
          A.anchors_per_level(IMAGE_SIZE))


def test_matches_torchvision_with_small_topk(anchors):
  anchors, level_sizes = anchors
  # P7 has 9 anchors x 4 classes = 36 scores, fewer than topk_candidates.
  assert min(level_sizes) * NUM_CLASSES < 50 < max(level_sizes) * NUM_CLASSES
  logits, regression = head_outputs(0, 4, len(anchors), NUM_CLASSES)
  # Few scores pass in the third image, none in the last.
  logits[2] = logits[2] * 2.0 - 8.0
  # nan scores fail the threshold in torchvision; here they must not take
  # the candidate slots of P3 either.
  logits[2, :200] = np.nan
  logits[3] = -8.0
  # Unpadded sizes differ per image, as for images of other aspect ratios.
  sizes = np.array([IMAGE_SIZE, (120, 90), IMAGE_SIZE, IMAGE_SIZE])
  config = dict(score_thresh=0.05, nms_thresh=0.5, detections_per_img=40,
                topk_candidates=50)
  run = jax.jit(functools.partial(D.retinanet_postprocess,
                                  level_sizes=level_sizes, **config))
  ours = run(logits, regression, anchors, image_size=sizes)
  theirs = torch_detections(logits, regression, anchors, level_sizes, sizes,
                            **config)
  assert ours['boxes'].shape == (4, 40, 4)
  assert ours['labels'].dtype == jnp.int32 and ours['valid'].dtype == bool
  # More than 40 survive NMS in the first two images, fewer in the third.
  counts = [len(t['scores']) for t in theirs]
  assert counts[:2] == [40, 40] and 0 < counts[2] < 40 and counts[3] == 0
  for image in range(4):
    assert_same_detections(ours, theirs[image], image)
  assert not np.asarray(ours['valid'][3]).any()


def test_matches_torchvision_with_defaults(anchors):
  anchors, level_sizes = anchors
  logits, regression = head_outputs(1, 1, len(anchors), NUM_CLASSES)
  # More than the 1000 candidates of P3 pass the threshold.
  scores = 1 / (1 + np.exp(-logits[0, :level_sizes[0]]))
  assert (scores > 0.05).sum() > 1000
  ours = D.retinanet_postprocess(logits, regression, anchors, level_sizes,
                                 IMAGE_SIZE)
  theirs = torch_detections(
      logits, regression, anchors, level_sizes, [IMAGE_SIZE],
      score_thresh=0.05, nms_thresh=0.5, detections_per_img=300,
      topk_candidates=1000)
  assert len(theirs[0]['scores']) == 300
  assert ours['scores'].shape == (1, 300)
  assert_same_detections(ours, theirs[0], 0)


def test_rejects_mismatched_inputs(anchors):
  anchors, level_sizes = anchors
  logits, regression = head_outputs(2, 1, len(anchors), NUM_CLASSES)
  with pytest.raises(ValueError, match='add up'):
    D.retinanet_postprocess(logits, regression, anchors, level_sizes[:-1],
                            IMAGE_SIZE)
  with pytest.raises(ValueError, match='bbox_regression'):
    D.retinanet_postprocess(logits, regression[:, :-1], anchors, level_sizes,
                            IMAGE_SIZE)


def test_rescale_boxes_matches_torchvision():
  rng = np.random.default_rng(3)
  boxes = rng.uniform(0, 800, (2, 5, 4)).astype(np.float32)
  resized = np.array([(800, 800), (800, 800)])
  original = np.array([(375, 500), (1024, 683)])
  ours = D.rescale_boxes(boxes, resized, original)
  for i in range(2):
    want = tv_transform.resize_boxes(torch.from_numpy(boxes[i]),
                                     list(resized[i]), list(original[i]))
    np.testing.assert_array_equal(np.asarray(ours[i]), want.numpy())
  # One size for all images; zero padding stays zero.
  boxes[1, 3:] = 0
  ours = D.rescale_boxes(boxes, (800, 800), (375, 500))
  want = tv_transform.resize_boxes(torch.from_numpy(boxes.reshape(-1, 4)),
                                   [800, 800], [375, 500])
  np.testing.assert_array_equal(np.asarray(ours).reshape(-1, 4), want.numpy())
  assert not np.asarray(ours[1, 3:]).any()
