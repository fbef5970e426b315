"""Mask R-CNN (ResNet-50 FPN): size, weight interop and parity with
torchvision's maskrcnn_resnet50_fpn, and the reference's own variants
(stride on the 1x1 convolution, frozen batch norms without epsilon)."""

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

from torchvision.models import resnet as tv_resnet  # noqa: E402
from torchvision.models.detection import backbone_utils  # noqa: E402
from torchvision.models.detection import rpn as tv_rpn  # noqa: E402
from torchvision.ops import misc as tv_misc  # noqa: E402

from jaxperf import interop  # noqa: E402
from jaxperf.models import maskrcnn  # noqa: E402

# torchvision's maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
# num_classes=91): its untrained backbone has BatchNorm2d layers, whose
# 53,120 weights and biases count as parameters.
TORCHVISION_PARAMS = 44_454_513
# The same with frozen batch norms (buffers), as with a pretrained backbone
# and in the MLPerf reference: backbone convolutions 23,454,912, FPN
# 3,344,384, RPN head 593,935, box head 13,895,680 + predictor 466,375,
# mask head 2,359,296 + predictor 286,811.
FROZEN_BN_PARAMS = 44_401_393
# The reference's 81 classes: 10 classes fewer in cls_score (1025 each),
# bbox_pred (4 x 1025) and mask_fcn_logits (257).
REFERENCE_PARAMS = 44_347_573
# conv1 and layer1 (frozen with trainable_backbone_layers=3).
FROZEN_PARAMS = 222_400


@pytest.fixture(scope='module')
def built():
  """torchvision's maskrcnn_resnet50_fpn(weights=None, weights_backbone=None,
  num_classes=91) and its parameter count; then its backbone rebuilt as a
  pretrained backbone makes it (frozen batch norms, trainable_layers=3,
  C2..C5 and LastLevelMaxPool), in eval mode, the frozen batch norms given
  non-trivial statistics."""
  torch.manual_seed(0)
  model = torchvision.models.detection.maskrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91)
  count = sum(p.numel() for p in model.parameters())
  model.backbone = backbone_utils.resnet_fpn_backbone(
      backbone_name='resnet50', weights=None, trainable_layers=3)
  _randomize_frozen_norms(model)
  return model.eval(), count


def _randomize_frozen_norms(module):
  with torch.no_grad():
    for name, buf in module.named_buffers():
      if name.endswith(('.weight', 'running_var')):
        buf.uniform_(0.5, 1.5)
      elif name.endswith(('.bias', 'running_mean')):
        buf.normal_(0.0, 0.1)


@pytest.fixture(scope='module')
def reference(built):
  return built[0]


@pytest.fixture(scope='module')
def variables(reference):
  return interop.from_torch('maskrcnn', reference.state_dict())


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, 64, 64, 3))))


def test_parameter_count_matches_torchvision(built):
  reference, torchvision_count = built
  assert torchvision_count == TORCHVISION_PARAMS
  assert sum(p.numel() for p in reference.parameters()) == FROZEN_BN_PARAMS
  shapes = _shapes(maskrcnn.MaskRCNN(num_classes=91))
  affine = _count([v for p, v in jax.tree_util.tree_leaves_with_path(
      shapes['batch_stats']) if p[-1].key in ('scale', 'bias')])
  assert _count(shapes['params']) == FROZEN_BN_PARAMS
  assert _count(shapes['params']) + affine == TORCHVISION_PARAMS
  assert _count(shapes['batch_stats']) == sum(
      b.numel() for b in reference.buffers())
  assert _count(_shapes(maskrcnn.MaskRCNN())['params']) == REFERENCE_PARAMS

  model = maskrcnn.MaskRCNN()
  out = jax.eval_shape(lambda v: model.apply(
      v, jnp.zeros((2, 128, 160, 3)), jnp.zeros((5, 7, 7, 256)),
      jnp.zeros((4, 14, 14, 256))), _shapes(model))
  assert [f.shape for f in out['features']] == [
      (2, 32, 40, 256), (2, 16, 20, 256), (2, 8, 10, 256), (2, 4, 5, 256),
      (2, 2, 3, 256)]
  # (32 * 40 + 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3) locations, 3 anchors each.
  assert out['objectness'].shape == (2, 5118)
  assert out['rpn_deltas'].shape == (2, 5118, 4)
  assert out['class_logits'].shape == (5, 81)
  assert out['box_regression'].shape == (5, 324)
  assert out['mask_logits'].shape == (4, 28, 28, 81)


def test_frozen_mask_is_torchvisions_frozen_parameters(reference, variables):
  mask = maskrcnn.MaskRCNN().frozen_mask(variables['params'])
  frozen = _count([x for x, f in zip(jax.tree.leaves(variables['params']),
                                     jax.tree.leaves(mask)) if f])
  assert frozen == FROZEN_PARAMS
  requires_grad = dict(reference.named_parameters())
  for t in interop.maskrcnn_tensors():
    if t.flax_path[0] != 'params':
      continue
    node = mask
    for key in t.flax_path[1:]:
      node = node[key]
    assert node == (not requires_grad[t.torch_name].requires_grad), (
        t.torch_name)
  none = maskrcnn.MaskRCNN(frozen_stages=0).frozen_mask(variables['params'])
  assert not any(jax.tree.leaves(none))


def test_checker_names_are_closed_maskrcnn_yamls(variables):
  import mlperf_logging  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(mlperf_logging.__file__),
                      'compliance_checker', 'training_2.1.0',
                      'closed_maskrcnn.yaml')
  with open(path) as f:
    text = f.read()
  required = re.findall(r'"((?:FPN|RPNHead|ROI)_\w+)"', text)
  assert len(required) == 21
  names = interop.maskrcnn_checker_tensor_names()
  assert sorted(names) == sorted(required)
  # Each names a layer (kernel and bias) of the model.
  for name, module in interop.maskrcnn_checker_tensors().items():
    node = variables['params']
    for key in module:
      node = node[key]
    assert set(node) == {'kernel', 'bias'}, name


def _check(name, got, want, rtol=1e-5):
  got = np.asarray(got, np.float64)
  want = want.double().numpy() if hasattr(want, 'numpy') else want
  assert got.shape == want.shape, (name, got.shape, want.shape)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < rtol, f'{name}: max error {err:.2e} of the largest value'


def test_network_matches_torchvision(reference, variables):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 3, 128, 160)).astype(np.float32)
  box_pooled = rng.standard_normal((6, 256, 7, 7)).astype(np.float32)
  mask_pooled = rng.standard_normal((5, 256, 14, 14)).astype(np.float32)
  with torch.no_grad():
    feats = list(reference.backbone(torch.from_numpy(images)).values())
    logits, deltas = reference.rpn.head(feats)
    objectness, rpn_deltas = tv_rpn.concat_box_prediction_layers(logits,
                                                                 deltas)
    box = reference.roi_heads.box_head(torch.from_numpy(box_pooled))
    class_logits, box_regression = reference.roi_heads.box_predictor(box)
    masks = reference.roi_heads.mask_predictor(
        reference.roi_heads.mask_head(torch.from_numpy(mask_pooled)))
  model = maskrcnn.MaskRCNN(
      num_classes=91, stride_in_1x1=False,
      bn_epsilon=maskrcnn.TORCHVISION_BN_EPSILON)
  nhwc = lambda a: a.transpose(0, 2, 3, 1)
  out = jax.jit(model.apply)(variables, nhwc(images), nhwc(box_pooled),
                             nhwc(mask_pooled))

  assert len(feats) == len(out['features']) == 5
  for i, (got, want) in enumerate(zip(out['features'], feats)):
    _check(f'P{i + 2}', got, want.permute(0, 2, 3, 1))
  start = 0
  for i, (lg, dl) in enumerate(zip(logits, deltas)):
    n = lg.shape[1] * lg.shape[2] * lg.shape[3]
    _check(f'objectness P{i + 2}', out['objectness'][:, start:start + n],
           lg.permute(0, 2, 3, 1).reshape(2, n))
    _check(f'deltas P{i + 2}', out['rpn_deltas'][:, start:start + n],
           dl.view(2, 3, 4, *dl.shape[2:]).permute(0, 3, 4, 1, 2)
           .reshape(2, n, 4))
    start += n
  assert start == out['objectness'].shape[1]
  _check('objectness', out['objectness'], objectness.reshape(2, -1))
  _check('rpn_deltas', out['rpn_deltas'], rpn_deltas.reshape(2, -1, 4))
  _check('class_logits', out['class_logits'], class_logits)
  _check('box_regression', out['box_regression'], box_regression)
  _check('mask_logits', out['mask_logits'], masks.permute(0, 2, 3, 1))

  # The parts on their own, through apply(method=...).
  part = lambda method: jax.jit(lambda v, x: model.apply(v, x, method=method))
  got = part('box_head')(variables, nhwc(box_pooled))
  np.testing.assert_allclose(got[0], out['class_logits'], rtol=1e-5,
                             atol=1e-6)
  got = part('mask_head')(variables, nhwc(mask_pooled))
  np.testing.assert_allclose(got, out['mask_logits'], rtol=1e-5, atol=1e-6)


def _bottleneck_variables(block):
  """Flax variables of maskrcnn.Bottleneck from a torchvision Bottleneck."""
  def kernel(conv):
    return conv.weight.detach().numpy().transpose(2, 3, 1, 0)

  def stats(bn):
    return {'scale': bn.weight.numpy(), 'bias': bn.bias.numpy(),
            'mean': bn.running_mean.numpy(), 'var': bn.running_var.numpy()}
  params = {f'conv{k}': {'kernel': kernel(getattr(block, f'conv{k}'))}
            for k in (1, 2, 3)}
  params['conv1sc'] = {'kernel': kernel(block.downsample[0])}
  batch_stats = {f'bn{k}': stats(getattr(block, f'bn{k}')) for k in (1, 2, 3)}
  batch_stats['bnsc'] = stats(block.downsample[1])
  return {'params': params, 'batch_stats': batch_stats}


def test_reference_bottleneck_strides_on_the_1x1():
  # maskrcnn-benchmark's BottleneckWithFixedBatchNorm (STRIDE_IN_1X1=True,
  # FrozenBatchNorm2d without epsilon) is torchvision's Bottleneck with the
  # stride moved to conv1.
  torch.manual_seed(0)
  norm = lambda c: tv_misc.FrozenBatchNorm2d(c, eps=0.0)
  down = torch.nn.Sequential(torch.nn.Conv2d(256, 512, 1, 2, bias=False),
                             norm(512))
  block = tv_resnet.Bottleneck(256, 128, stride=2, downsample=down,
                               norm_layer=norm)
  block.conv1.stride, block.conv2.stride = (2, 2), (1, 1)
  _randomize_frozen_norms(block)
  x = np.random.default_rng(1).standard_normal((1, 256, 10, 12)).astype(
      np.float32)
  with torch.no_grad():
    want = block.eval()(torch.from_numpy(x))
  v = _bottleneck_variables(block)
  got = maskrcnn.Bottleneck(128, strides=2, project=True).apply(
      v, x.transpose(0, 2, 3, 1))
  _check('stride_in_1x1', got, want.permute(0, 2, 3, 1))
  other = maskrcnn.Bottleneck(128, strides=2, project=True,
                              stride_in_1x1=False).apply(
                                  v, x.transpose(0, 2, 3, 1))
  assert np.max(np.abs(np.asarray(other) - np.asarray(got))) > 1e-2


def test_transposed_convolution_is_pytorchs():
  # in != out, so a swapped layout cannot pass.
  torch.manual_seed(0)
  deconv = torch.nn.ConvTranspose2d(3, 5, 2, 2)
  x = np.random.default_rng(2).standard_normal((2, 3, 4, 6)).astype(
      np.float32)
  with torch.no_grad():
    want = deconv(torch.from_numpy(x))
  # interop maps the weight as a convolution's (OIHW -> HWIO): (in, out,
  # kh, kw) -> (kh, kw, out, in).
  (conv5,) = [t for t in interop.maskrcnn_tensors()
              if t.torch_name.endswith('conv5_mask.weight')]
  assert conv5.kind == 'conv'
  kernel = deconv.weight.detach().numpy().transpose(2, 3, 1, 0)
  assert kernel.shape == (2, 2, 5, 3)
  got = maskrcnn.ConvTranspose2x2(5).apply(
      {'params': {'kernel': kernel, 'bias': deconv.bias.detach().numpy()}},
      x.transpose(0, 2, 3, 1))
  _check('conv5_mask', got, want.permute(0, 2, 3, 1))


def test_init_follows_the_reference():
  # The parts at their real widths (the statistics depend on the fans),
  # on inputs of one pixel where the size does not matter; one compilation.
  z = jnp.zeros
  parts = {
      'box': (maskrcnn.BoxFeatureExtractor(), z((1, 7, 7, 256))),
      'box_predictor': (maskrcnn.BoxPredictor(), z((1, 1024))),
      'mask': (maskrcnn.MaskFeatureExtractor(), z((1, 1, 1, 256))),
      'mask_predictor': (maskrcnn.MaskPredictor(), z((1, 1, 1, 256))),
      'rpn': (maskrcnn.RPNHead(), [z((1, 1, 1, 256))]),
      'fpn': (maskrcnn.FPN(), [z((1, 2, 2, 256)), z((1, 1, 1, 512))])}
  p = jax.jit(lambda key: {k: m.init(key, x)['params']
                           for k, (m, x) in parts.items()})(
                               jax.random.key(0))
  p = jax.tree.map(np.asarray, p)
  ratio = lambda a, want: float(np.std(a)) / want
  # make_fc's kaiming_uniform(a=1): U(+-sqrt(3 / fan_in)), std
  # 1 / sqrt(fan_in).
  fc6 = p['box']['fc6']['kernel']
  assert fc6.shape == (12544, 1024)
  assert abs(ratio(fc6, 1 / np.sqrt(12544)) - 1) < 0.01
  assert np.max(np.abs(fc6)) <= np.sqrt(3 / 12544) * (1 + 1e-6)
  assert abs(ratio(p['box']['fc7']['kernel'], 1 / np.sqrt(1024)) - 1) < 0.01
  # FastRCNN predictor: N(0, 0.01) and N(0, 0.001).
  assert p['box_predictor']['cls_score']['kernel'].shape == (1024, 81)
  assert abs(ratio(p['box_predictor']['cls_score']['kernel'], 0.01) - 1
             ) < 0.03
  assert abs(ratio(p['box_predictor']['bbox_pred']['kernel'], 0.001) - 1
             ) < 0.02
  # Mask head: kaiming_normal(fan_out, relu), std sqrt(2 / fan_out) with
  # PyTorch's fans: out * k * k, for conv5_mask's (in, out, 2, 2) weight
  # in * 2 * 2.
  for i in range(1, 5):
    assert abs(ratio(p['mask'][f'mask_fcn{i}']['kernel'], np.sqrt(2 / 2304))
               - 1) < 0.02
  mp = p['mask_predictor']
  assert abs(ratio(mp['conv5_mask']['kernel'], np.sqrt(2 / 1024)) - 1) < 0.02
  assert abs(ratio(mp['mask_fcn_logits']['kernel'], np.sqrt(2 / 81)) - 1
             ) < 0.03
  # RPN N(0, 0.01); FPN kaiming_uniform(a=1).
  for k in ('conv', 'cls_logits', 'bbox_pred'):
    assert abs(ratio(p['rpn'][k]['kernel'], 0.01) - 1) < 0.1, k
  assert abs(ratio(p['fpn']['inner1']['kernel'], 1 / np.sqrt(512)) - 1
             ) < 0.02
  assert abs(ratio(p['fpn']['layer0']['kernel'], 1 / np.sqrt(2304)) - 1
             ) < 0.02
  biases = [(path, leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(p)
            if path[-1].key == 'bias']
  assert len(biases) == 2 + 2 + 4 + 2 + 3 + 4
  for path, leaf in biases:
    assert not np.any(leaf), path


def test_bfloat16_compute_keeps_float32_parameters():
  model = maskrcnn.MaskRCNN(dtype=jnp.bfloat16)
  shapes = _shapes(model)
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {np.dtype('float32')}
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3))),
                       shapes)
  assert {f.dtype for f in out['features']} == {jnp.dtype('bfloat16')}
  assert {out[k].dtype for k in ('objectness', 'rpn_deltas', 'class_logits',
                                 'box_regression', 'mask_logits')} == {
                                     jnp.dtype('float32')}


def test_round_trip_through_flax_is_exact(reference, variables):
  sd = reference.state_dict()
  back = interop.to_torch('maskrcnn', variables)
  assert list(back) == list(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  reference.load_state_dict(back, strict=True)
  # The expected tree's shapes agree, and so do those of the 91-class model.
  expected = _shapes(maskrcnn.MaskRCNN(num_classes=91))
  again = interop.from_torch('maskrcnn', back, expected)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_reference_names_load_the_same_weights(variables):
  back = interop.to_torch('maskrcnn', variables)
  renames = (
      (r'^backbone\.body\.(conv1|bn1)\.', r'backbone.body.stem.\1.'),
      (r'^backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.',
       lambda m: f'backbone.fpn.fpn_{m.group(1)}{int(m.group(2)) + 1}.'),
      (r'^rpn\.head\.conv\.0\.0\.', 'rpn.head.conv.'),
      (r'^roi_heads\.box_head\.', 'roi_heads.box.feature_extractor.'),
      (r'^roi_heads\.box_predictor\.', 'roi_heads.box.predictor.'),
      (r'^roi_heads\.mask_head\.(\d)\.0\.',
       lambda m: f'roi_heads.mask.feature_extractor.mask_fcn'
                 f'{int(m.group(1)) + 1}.'),
      (r'^roi_heads\.mask_predictor\.', 'roi_heads.mask.predictor.'))
  legacy = {}
  for k, v in back.items():
    for pattern, repl in renames:
      k = re.sub(pattern, repl, k)
    legacy[k] = v
  assert 'roi_heads.mask.feature_extractor.mask_fcn4.weight' in legacy
  assert 'backbone.fpn.fpn_inner1.bias' in legacy
  for i in range(5):
    legacy[f'rpn.anchor_generator.cell_anchors.{i}'] = torch.zeros(3, 4)
  again = interop.from_torch('maskrcnn', legacy)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_bad_state_dicts_name_the_tensor(reference):
  sd = dict(reference.state_dict())
  missing = dict(sd)
  del missing['roi_heads.mask_head.2.0.weight']
  with pytest.raises(interop.InteropError,
                     match=r'missing 1 tensor.*mask_head\.2\.0\.weight'):
    interop.from_torch('maskrcnn', missing)
  extra = dict(sd, **{'roi_heads.extra.weight': torch.zeros(1)})
  with pytest.raises(interop.InteropError, match='unexpected.*roi_heads.extra'):
    interop.from_torch('maskrcnn', extra)
  bad = dict(sd)
  bad['roi_heads.box_head.fc6.weight'] = torch.zeros(1024, 12543)
  with pytest.raises(interop.InteropError,
                     match=r'box_head\.fc6\.weight has shape'):
    interop.from_torch('maskrcnn', bad)
  bad = dict(sd)
  bad['roi_heads.mask_predictor.mask_fcn_logits.bias'] = torch.zeros(80)
  with pytest.raises(interop.InteropError,
                     match=r'mask_fcn_logits\.bias has shape'):
    interop.from_torch('maskrcnn', bad)
  bad = dict(sd)
  bad['backbone.body.layer2.0.bn2.running_var'] = torch.ones(7)
  with pytest.raises(interop.InteropError,
                     match=r'layer2\.0\.bn2\.running_var'):
    interop.from_torch('maskrcnn', bad)
  # The reference's 81 classes against a 91-class state_dict.
  with pytest.raises(interop.InteropError, match='cls_score.weight'):
    interop.from_torch('maskrcnn', sd, _shapes(maskrcnn.MaskRCNN()))


def test_detectron_backbone_pickle_loads_as_the_reference_renames_it(
    tmp_path):
  """R-50.pkl ({'blobs': ...}, a latin1 pickle) -> the backbone: each blob
  lands where maskrcnn-benchmark's c2_model_loading puts it (conv1_w ->
  conv1, res{k}_{i}_branch2{a,b,c} -> layer{k-1}.{i}.conv{1,2,3},
  branch1 -> downsample, _bn_s/_bn_b -> frozen BN weight/bias with mean 0,
  var 1); the classifier and momentum blobs are skipped; a foreign blob
  or a wrong shape is an error naming it."""
  import pickle  # pylint: disable=g-import-not-at-top
  model = maskrcnn.MaskRCNN(num_classes=81)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))
  from tests.test_train_maskrcnn import c2_blobs  # pylint: disable=g-import-not-at-top
  blobs = c2_blobs(np.random.default_rng(0))
  path = tmp_path / 'R-50.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'blobs': blobs}, f, protocol=2)
  expected = {'params': {'backbone': shapes['params']['backbone']},
              'batch_stats': shapes['batch_stats']}
  got = interop.maskrcnn_backbone_from_c2(interop.read_c2_pickle(path),
                                          expected, source=str(path))
  p, s = got['params']['backbone'], got['batch_stats']['backbone']
  np.testing.assert_array_equal(p['conv0']['kernel'],
                                blobs['conv1_w'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(s['bn0']['scale'], blobs['res_conv1_bn_s'])
  np.testing.assert_array_equal(s['bn0']['mean'], np.zeros(64))
  np.testing.assert_array_equal(s['bn0']['var'], np.ones(64))
  unit = p['stage3_unit5']
  np.testing.assert_array_equal(
      unit['conv2']['kernel'], blobs['res4_4_branch2b_w'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      s['stage4_unit1']['bnsc']['bias'], blobs['res5_0_branch1_bn_b'])
  np.testing.assert_array_equal(
      p['stage2_unit1']['conv1sc']['kernel'],
      blobs['res3_0_branch1_w'].transpose(2, 3, 1, 0))
  n_loaded = sum(x.size for x in jax.tree.leaves(got))
  n_backbone = sum(x.size for x in jax.tree.leaves(expected))
  assert n_loaded == n_backbone
  with pytest.raises(interop.InteropError, match='res6_0_branch2a_w'):
    interop.maskrcnn_backbone_from_c2(
        {**blobs, 'res6_0_branch2a_w': blobs['conv1_w']}, expected)
  bad = dict(blobs, res2_1_branch2b_w=np.zeros((64, 64, 1, 1), np.float32))
  with pytest.raises(interop.InteropError, match=r'layer1\.1\.conv2\.weight'):
    interop.maskrcnn_backbone_from_c2(bad, expected)
  (tmp_path / 'not.pkl').write_bytes(b'not a pickle')
  with pytest.raises(interop.InteropError, match='not.pkl'):
    interop.read_c2_pickle(tmp_path / 'not.pkl')
