"""RetinaNet (ResNeXt50-32x4d FPN): size, weight interop and parity with
torchvision's RetinaNet built as the MLPerf reference builds it."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason="the parity tests need the 'compare' extra (PyTorch); "
    "pip install -e '.[test]' installs it")
torchvision = pytest.importorskip('torchvision')

from torchvision.models.detection import backbone_utils  # noqa: E402
from torchvision.ops import feature_pyramid_network  # noqa: E402

from jaxperf import interop  # noqa: E402
from jaxperf.models import retinanet  # noqa: E402

# torchvision's RetinaNet with num_classes=264 and the ResNeXt50-32x4d FPN
# backbone, counting its parameters (the FrozenBatchNorm2d tensors are
# buffers): backbone convolutions 22,979,904, FPN 3,344,384 (inner 1x1 convs
# on 512/1024/2048 channels, three 3x3 output convs, P6 and P7), heads
# 10,736,364 (8 shared 3x3 256->256 convs, cls_logits 256->9*264 and
# bbox_reg 256->9*4, with biases).
TORCHVISION_PARAMS = 37_060_652
# conv1 and layer1 (frozen with trainable_backbone_layers=3).
TORCHVISION_FROZEN_PARAMS = 211_648


@pytest.fixture(scope='module')
def reference():
  """The MLPerf reference's model: torchvision's retinanet_resnet50_fpn with
  its backbone replaced by resnet_fpn_backbone('resnext50_32x4d') (frozen
  batch norms, layers 2-4 returned, P6/P7 from P5, 3 trainable layers), in
  eval mode, its frozen batch norms given non-trivial statistics."""
  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=264)
  model.backbone = backbone_utils.resnet_fpn_backbone(
      backbone_name='resnext50_32x4d', weights=None, trainable_layers=3,
      returned_layers=[2, 3, 4],
      extra_blocks=feature_pyramid_network.LastLevelP6P7(256, 256))
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith(('.weight', 'running_var')):
        buf.uniform_(0.5, 1.5)
      elif name.endswith(('.bias', 'running_mean')):
        buf.normal_(0.0, 0.1)
  return model.eval()


@pytest.fixture(scope='module')
def variables(reference):
  return interop.from_torch('retinanet', reference.state_dict())


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_count_at_800_matches_torchvision(reference):
  shapes = jax.eval_shape(
      lambda: retinanet.RetinaNet().init(jax.random.key(0),
                                         jnp.zeros((1, 800, 800, 3))))
  torch_count = sum(p.numel() for p in reference.parameters())
  assert torch_count == TORCHVISION_PARAMS
  assert _count(shapes['params']) == TORCHVISION_PARAMS
  # The frozen batch norms: 4 tensors of the width of each of 53 norms.
  assert _count(shapes['batch_stats']) == sum(
      b.numel() for b in reference.buffers())
  out = jax.eval_shape(lambda v: retinanet.RetinaNet().apply(
      v, jnp.zeros((2, 800, 800, 3))), shapes)
  # 100^2 + 50^2 + 25^2 + 13^2 + 7^2 locations, 9 anchors each.
  assert out['cls_logits'].shape == (2, 120_087, 264)
  assert out['bbox_regression'].shape == (2, 120_087, 4)


def test_frozen_mask_is_the_references_frozen_parameters(reference,
                                                         variables):
  model = retinanet.RetinaNet()
  mask = model.frozen_mask(variables['params'])
  frozen = _count([x for x, f in zip(jax.tree.leaves(variables['params']),
                                     jax.tree.leaves(mask)) if f])
  assert frozen == TORCHVISION_FROZEN_PARAMS
  requires_grad = dict(reference.named_parameters())
  for t in interop.retinanet_tensors():
    if t.flax_path[0] != 'params':
      continue
    node = mask
    for key in t.flax_path[1:]:
      node = node[key]
    assert node == (not requires_grad[t.torch_name].requires_grad), (
        t.torch_name)
  none = retinanet.RetinaNet(frozen_stages=0).frozen_mask(variables['params'])
  assert not any(jax.tree.leaves(none))


def test_checker_names_are_closed_ssd_yamls(reference):
  import mlperf_logging  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(mlperf_logging.__file__),
                      'compliance_checker', 'training_2.1.0',
                      'closed_ssd.yaml')
  with open(path) as f:
    text = f.read()
  required = re.findall(r'"(module\.[^"]+)"', text)
  assert len(required) == 89
  names = interop.retinanet_checker_tensor_names()
  assert names == sorted(required)
  # They are the reference's parameters, in its older naming.
  assert {interop.retinanet_current_name(n[len('module.'):])
          for n in names} == {n for n, _ in reference.named_parameters()}


def test_features_and_heads_match_torchvision(reference, variables):
  # 136x152: C3 17x19, C4 9x10, C5 5x5, so the FPN's nearest upsampling is
  # not always by exactly 2; P6 3x3 and P7 2x2.
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 3, 136, 152)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images)
    feats = list(reference.backbone(x).values())
    head = reference.head(feats)
  out = jax.jit(lambda v, x: retinanet.RetinaNet().apply(
      v, x, return_features=True))(variables, images.transpose(0, 2, 3, 1))

  def check(name, got, want, rtol):
    got, want = np.asarray(got, np.float64), want.double().numpy()
    assert got.shape == want.shape, name
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < rtol, f'{name}: max error {err:.2e} of the largest value'

  assert len(feats) == len(out['features']) == 5
  for i, (got, want) in enumerate(zip(out['features'], feats)):
    check(f'P{i + 3}', got, want.permute(0, 2, 3, 1), 1e-5)
  check('cls_logits', out['cls_logits'], head['cls_logits'], 1e-5)
  check('bbox_regression', out['bbox_regression'], head['bbox_regression'],
        1e-5)


def test_bfloat16_compute_keeps_float32_parameters():
  model = retinanet.RetinaNet(dtype=jnp.bfloat16)
  x = jnp.zeros((1, 128, 128, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {np.dtype('float32')}
  out = jax.eval_shape(lambda v: model.apply(v, x, return_features=True),
                       shapes)
  assert {f.dtype for f in out['features']} == {jnp.dtype('bfloat16')}
  assert out['cls_logits'].dtype == jnp.float32


def test_init_follows_the_reference():
  # The modules as RetinaNet builds them, narrow: the initializers do not
  # depend on the widths.
  head = retinanet.RetinaNetHead(3, channels=32,
                                 final_bias=retinanet.PRIOR_BIAS,
                                 final_name='cls_logits')
  v = head.init(jax.random.key(0), [jnp.zeros((1, 2, 2, 32))])['params']
  assert v['cls_logits']['bias'].shape == (27,)
  np.testing.assert_allclose(np.asarray(v['cls_logits']['bias']),
                             -np.log(99.0), rtol=1e-6)
  assert not np.any(np.asarray(v['conv0']['bias']))
  assert abs(float(np.std(np.asarray(v['conv0']['kernel']))) - 0.01) < 1e-3
  bn = retinanet.FrozenBatchNorm().init(jax.random.key(0), jnp.zeros((1, 5)))
  assert set(bn) == {'batch_stats'}
  np.testing.assert_array_equal(bn['batch_stats']['scale'], np.ones(5))
  np.testing.assert_array_equal(bn['batch_stats']['mean'], np.zeros(5))


def test_round_trip_through_flax_is_exact(reference, variables):
  sd = reference.state_dict()
  back = interop.to_torch('retinanet', variables)
  assert list(back) == list(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  reference.load_state_dict(back, strict=True)


def test_older_names_load_the_same_weights(variables):
  back = interop.to_torch('retinanet', variables)
  legacy = {}
  for k, v in back.items():
    k = re.sub(r'^(backbone\.fpn\.\w+_blocks\.\d+)\.0\.', r'\1.', k)
    k = re.sub(r'(_head\.conv)\.(\d+)\.0\.',
               lambda m: f'{m.group(1)}.{2 * int(m.group(2))}.', k)
    legacy[k] = v
  assert 'head.classification_head.conv.6.weight' in legacy
  again = interop.from_torch('retinanet', legacy)
  jax.tree.map(np.testing.assert_array_equal, again, variables)
  legacy['head.classification_head.conv.3.0.weight'] = legacy[
      'head.classification_head.conv.6.weight']
  with pytest.raises(interop.InteropError, match='conv.6.weight'):
    interop.from_torch('retinanet', legacy)


def test_bad_state_dicts_name_the_tensor(reference):
  sd = dict(reference.state_dict())
  missing = dict(sd)
  del missing['backbone.body.layer3.2.conv2.weight']
  with pytest.raises(interop.InteropError,
                     match=r'missing 1 tensor.*layer3\.2\.conv2\.weight'):
    interop.from_torch('retinanet', missing)
  extra = dict(sd, **{'head.extra.weight': torch.zeros(1)})
  with pytest.raises(interop.InteropError, match='unexpected.*head.extra'):
    interop.from_torch('retinanet', extra)
  bad = dict(sd)
  bad['backbone.fpn.layer_blocks.1.0.weight'] = torch.zeros(256, 256, 1, 1)
  with pytest.raises(interop.InteropError,
                     match=r'layer_blocks\.1\.0\.weight has shape'):
    interop.from_torch('retinanet', bad)
  bad = dict(sd)
  bad['backbone.body.layer2.0.bn2.running_var'] = torch.ones(7)
  with pytest.raises(interop.InteropError,
                     match=r'layer2\.0\.bn2\.running_var'):
    interop.from_torch('retinanet', bad)
  # Against a model of another number of classes.
  expected = jax.eval_shape(lambda: retinanet.RetinaNet(num_classes=91).init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  with pytest.raises(interop.InteropError, match='cls_logits.weight'):
    interop.from_torch('retinanet', sd, expected)
