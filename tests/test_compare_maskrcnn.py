"""python -m jaxperf.compare --model maskrcnn: torchvision's Mask R-CNN
(ResNet-50 FPN, frozen batch norms) against models/maskrcnn.py with the same
weights, network part by network part on the same images and proposals.

Measured on a 2-core CPU (batch 2, 128x128, 8 classes, float32, seeds 0-2):
the FPN levels, RPN outputs, pooled features and head outputs agree to
~2e-6 (max_rel), the anchors exactly, the objective to ~2e-6. Gradients of
the trainable parameters: ~3e-6 (norm_rel) for the output layers, 4e-4 to
8e-4 median and 2e-3 to 7e-3 for the worst tensor. That is float32
rounding: the objective weighs every output position alike, so every ReLU
input that rounding puts on the other side of zero changes its gradient
outright, and the gradients of the layers below it. PyTorch's own float32
gradients are as far from its float64 ones (seed 0: median 5e-4, worst
1e-2), and in float64 the two agree to ~5e-8
(test_float64_is_the_same_function), the JAX model's float32 head outputs
being the limit.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

pytest.importorskip(
    'torch', reason="the parity tests need the 'compare' extra (PyTorch); "
    "pip install -e '.[test]' installs it")
pytest.importorskip('torchvision')

from jaxperf import compare  # noqa: E402

# Parameters with 8 classes: torchvision's 44,401,393 for 91 classes (see
# tests/test_maskrcnn_model.py) less 83 classes of cls_score (1025),
# bbox_pred (4 x 1025) and mask_fcn_logits (257) weights and biases.
NUM_PARAMS_8_CLASSES = 43_954_687
# conv1 and layer1 (frozen with trainable_backbone_layers=3).
FROZEN_PARAMS = 222_400
# The layers that produce the outputs: their gradients see no ReLU
# decision of the layers above them, only their inputs' rounding.
OUTPUT_LAYERS = ('rpn_head/cls_logits/', 'rpn_head/bbox_pred/',
                 'box_predictor/', 'mask_predictor/mask_fcn_logits/')
OUTPUTS = ('features_P2', 'features_P3', 'features_P4', 'features_P5',
           'features_P6', 'objectness', 'rpn_deltas', 'box_pooled',
           'class_logits', 'box_regression', 'mask_pooled', 'mask_logits',
           'objective')


def x64():
  """float64 in JAX for the duration of a with-block."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def test_compare_cli_float32_parity(tmp_path, capsys):
  out = tmp_path / 'maskrcnn.json'
  rc = compare.main(['--model', 'maskrcnn', '--batch', '2', '--image-size',
                     '128', '--num-classes', '8', '--no-timing', '--json',
                     str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert 'features_P2' in text and 'mask_logits' in text
  r = json.loads(out.read_text())
  assert r['model'] == 'maskrcnn' and r['batch'] == 2
  assert r['image_hw'] == [128, 128] and r['num_classes'] == 8
  assert r['precision'] == 'f32'
  assert 'jax' not in r and 'torch' not in r           # --no-timing
  # 32^2 + 16^2 + 8^2 + 4^2 + 2^2 locations, 3 anchors each.
  assert r['num_anchors'] == 3 * 1364
  assert r['num_rois'] == 2 * compare.MASKRCNN_ROIS_PER_IMAGE
  # Boxes inside a 128x128 image reach P2 and P3 only (P4 from 224 pixels).
  assert r['rois_per_level'] == [16, 16, 0, 0]
  assert r['num_params'] == NUM_PARAMS_8_CLASSES
  assert r['num_params'] - r['trainable_params'] == FROZEN_PARAMS
  print({k: r[k]['max_rel'] for k in OUTPUTS}, 'grads median',
        r['grads']['median_norm_rel'], 'worst', r['grads']['worst_norm_rel'],
        r['grads']['worst_param'])
  for key in OUTPUTS:
    assert r[key]['max_rel'] < 2e-5, (key, r[key])
  assert r['anchors']['max_abs'] == 0.0
  assert r['objective']['torch'] != 0
  g = r['grads']
  # The trainable tensors only (requires_grad in torch): 84 of the 95,
  # conv1 and layer1's 11 kernels being frozen.
  assert len(g['per_param']) == r['trainable_tensors'] == 84
  assert not any(k.startswith(('backbone/conv0', 'backbone/stage1_'))
                 for k in g['per_param'])
  assert all(np.isfinite(e['norm_rel']) for e in g['per_param'].values())
  outputs = [k for k in g['per_param'] if k.startswith(OUTPUT_LAYERS)]
  assert len(outputs) == 10
  for k in outputs:
    assert g['per_param'][k]['norm_rel'] < 1e-4, (k, g['per_param'][k])
  # Float32 rounding tipping ReLU decisions (see the module docstring):
  # ~5e-4 median and up to ~1e-2 for the worst tensor, as far as PyTorch's
  # own float32 gradients are from its float64 ones. Which inputs flip
  # depends on the BLAS and XLA versions, hence the margins; a wrong weight
  # or pooling would be off by O(1).
  assert g['median_norm_rel'] < 5e-3, g['median_norm_rel']
  assert g['worst_norm_rel'] < 5e-2, g['worst_param']


def test_float64_is_the_same_function():
  """In float64 the gradients agree too: the float32 differences above are
  rounding. Batch 2 keeps RoIAlign's batch indices and the scatter of its
  gradient into two images in play."""
  with x64():
    r = compare.compare('maskrcnn', batch=2, image_size=32, num_classes=8,
                        timing=False, precision='f64', rois_per_image=2)
  print({k: r[k]['max_rel'] for k in OUTPUTS}, 'grads median',
        r['grads']['median_norm_rel'], 'worst', r['grads']['worst_norm_rel'],
        r['grads']['worst_param'])
  for key in ('features_P2', 'features_P6', 'box_pooled', 'mask_pooled'):
    assert r[key]['max_rel'] < 1e-12, (key, r[key])
  # The heads return float32 (MaskRCNN casts their outputs).
  for key in ('objectness', 'rpn_deltas', 'class_logits', 'box_regression',
              'mask_logits', 'objective'):
    assert r[key]['max_rel'] < 1e-6, (key, r[key])
  assert r['grads']['worst_norm_rel'] < 1e-6, r['grads']['worst_param']


@pytest.mark.parametrize('argv, message', [
    (['--image-size', '100'], 'each a positive multiple of 32'),
    (['--image-size', '0'], 'each a positive multiple of 32'),
    (['--image-size', '64,64,64'], 'a side or H,W'),
    (['--filters', '8,16,32,64,80'], '--filters: only for --model unet3d'),
    (['--seq-len', '16'], '--seq-len: only for --model bert'),
    (['--tables', '100'], '--tables: only for --model dlrm'),
    (['--batch', '0'], '--batch must be >= 1'),
])
def test_compare_cli_rejects_bad_maskrcnn_flags(argv, message, capsys):
  assert compare.main(['--model', 'maskrcnn', *argv, '--no-timing']) == 2
  assert message in capsys.readouterr().err
