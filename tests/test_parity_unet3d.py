"""3D U-Net against the MLPerf reference's structure: weights and parity.

The reference is jaxperf.torch_models.unet3d (the MLPerf Unet3D's modules,
tensor names and default init). Its instance norm rejects a single voxel,
and the bottleneck is 1/32 of every side, so the smallest volume it runs is
64x32x32 (bottleneck 2x1x1); the parity tests use that, batch 1.

Measured on a 2-core CPU (full width, 64x32x32, float32): logits max_rel
~1.3e-6, loss ~7e-8, gradients norm_rel median ~3e-3, worst ~1.2e-2 (an
instance-norm bias, a sum with cancellation). The reference's own float32
gradients are as far from its float64 ones (median ~3e-3), so this is float32
rounding. In float64 (narrow widths, to keep the test short) outputs agree to
~1e-14 and gradients to ~3e-14 (median), ~3e-12 (worst); at full width
(python -m jaxperf.compare --model unet3d --image-size 64,32,32 --precision
f64, about 2 minutes on CPU) 1.3e-14, 7.7e-14 and 1.4e-12.
"""

from __future__ import annotations

import contextlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason="the parity tests need the 'compare' extra (PyTorch); "
    "pip install -e '.[test]' installs it")

from jaxperf import compare, interop  # noqa: E402
from jaxperf.models import unet3d  # noqa: E402
from jaxperf.torch_models import unet3d as torch_unet3d  # noqa: E402

FULL = (32, 64, 128, 256, 320)
NARROW = (4, 8, 16, 32, 40)
SMALLEST = (64, 32, 32)          # the smallest volume the reference accepts


def x64():
  """float64 in JAX for the duration of a with-block."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def expected_num_params(filters, in_channels=1, n_class=3) -> int:
  """The parameter count, block by block, from the widths."""
  f = filters
  block = lambda cin, cout: 27 * cin * cout + 2 * cout   # conv + norm affine
  n = block(in_channels, f[0]) + block(f[0], f[0])
  for cin, cout in zip(f[:-1], f[1:]):                   # downsample.0..3
    n += block(cin, cout) + block(cout, cout)
  n += 2 * block(f[4], f[4])                             # bottleneck
  for cin, cout in [(f[4], f[4]), (f[4], f[3]), (f[3], f[2]), (f[2], f[1]),
                    (f[1], f[0])]:
    n += 8 * cin * cout + cout                           # transposed conv
    n += block(2 * cout, cout) + block(cout, cout)
  return n + f[0] * n_class + n_class                    # output conv


def eval_shape_params(filters):
  model = unet3d.UNet3D(filters=filters)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 32, 1))))


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  return torch_unet3d.Unet3D()


def test_parameter_count_is_the_references(reference):
  ours = sum(math.prod(x.shape) for x in
             jax.tree.leaves(eval_shape_params(FULL)))
  theirs = sum(p.numel() for p in reference.parameters())
  assert ours == theirs == expected_num_params(FULL) == 31_190_243
  narrow = sum(math.prod(x.shape) for x in
               jax.tree.leaves(eval_shape_params(NARROW)))
  assert narrow == expected_num_params(NARROW) == sum(
      p.numel() for p in torch_unet3d.Unet3D(filters=NARROW).parameters())


def test_state_dict_names_follow_the_reference(reference):
  sd = reference.state_dict()
  assert len(sd) == 78
  for name, shape in [
      ('input_block.conv1.0.weight', (32, 1, 3, 3, 3)),
      ('input_block.conv1.1.weight', (32,)),
      ('downsample.3.conv2.1.bias', (320,)),
      ('bottleneck.conv1.0.weight', (320, 320, 3, 3, 3)),
      ('upsample.0.upsample_conv.0.weight', (320, 320, 2, 2, 2)),
      ('upsample.1.upsample_conv.0.weight', (320, 256, 2, 2, 2)),
      ('upsample.4.conv1.0.weight', (32, 64, 3, 3, 3)),
      ('output.conv.0.weight', (3, 32, 1, 1, 1)),
      ('output.conv.0.bias', (3,))]:
    assert tuple(sd[name].shape) == shape, name
  # Only the transposed and the output convolutions have biases.
  conv_biases = [k for k in sd if k.endswith('.0.bias')]
  assert len(conv_biases) == 6
  with pytest.raises(ValueError, match='activation'):
    torch_unet3d.Unet3D(activation='gelu')


@pytest.mark.parametrize('filters', [FULL, NARROW])
def test_round_trip_through_flax_restores_every_tensor(filters):
  torch.manual_seed(1)
  module = torch_unet3d.Unet3D(filters=filters)
  sd = module.state_dict()
  variables = interop.from_torch('unet3d', sd,
                                 expected=eval_shape_params(filters))
  assert set(variables) == {'params'}
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.tree.map(lambda x: 0, dict(eval_shape_params(filters))))
  # Layouts: DHWIO kernels from OIDHW and (for the transposed conv) IODHW.
  p = variables['params']
  np.testing.assert_array_equal(
      p['down1_block_0']['conv']['kernel'][2, 0, 1],
      sd['downsample.1.conv1.0.weight'][:, :, 2, 0, 1].numpy().T)
  np.testing.assert_array_equal(
      p['up1_deconv']['kernel'][1, 0, 1],
      sd['upsample.1.upsample_conv.0.weight'][:, :, 1, 0, 1].numpy())
  np.testing.assert_array_equal(p['up3_block_1']['instancenorm']['scale'],
                                sd['upsample.3.conv2.1.weight'].numpy())
  back = interop.to_torch('unet3d', variables)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  torch_unet3d.Unet3D(filters=filters).load_state_dict(back, strict=True)


def test_missing_unexpected_and_misshapen_tensors_are_named(reference):
  sd = dict(reference.state_dict())
  missing = {k: v for k, v in sd.items() if k != 'upsample.2.conv1.1.bias'}
  with pytest.raises(interop.InteropError,
                     match=r'missing 1 tensor\(s\): upsample.2.conv1.1.bias'):
    interop.from_torch('unet3d', missing)
  with pytest.raises(
      interop.InteropError,
      match=r'unexpected 1 tensor\(s\): upsample.5.conv1.0.weight'):
    interop.from_torch('unet3d', {**sd, 'upsample.5.conv1.0.weight':
                                  sd['upsample.4.conv1.0.weight']})
  # Inconsistent with the widths the other tensors imply.
  bad = {**sd, 'upsample.2.conv1.0.weight': torch.zeros(128, 255, 3, 3, 3)}
  with pytest.raises(interop.InteropError,
                     match=r'tensor upsample.2.conv1.0.weight has shape '
                     r'\(128, 255, 3, 3, 3\) but the other tensors imply '
                     r'\(128, 256, 3, 3, 3\) \(filters=\[32, 64, 128, 256, '
                     r'320\]'):
    interop.from_torch('unet3d', bad)
  with pytest.raises(interop.InteropError,
                     match=r'tensor upsample.0.upsample_conv.0.weight has '
                     r'rank 4, expected 5'):
    interop.from_torch('unet3d', {**sd, 'upsample.0.upsample_conv.0.weight':
                                  torch.zeros(320, 320, 2, 2)})
  # Consistent, but not the model we load into.
  narrow = torch_unet3d.Unet3D(filters=NARROW).state_dict()
  with pytest.raises(interop.InteropError,
                     match=r'tensor input_block.conv1.0.weight has shape '
                     r'\(4, 1, 3, 3, 3\) but the model expects '
                     r'\(32, 1, 3, 3, 3\)'):
    interop.from_torch('unet3d', narrow, expected=eval_shape_params(FULL))
  variables = interop.from_torch('unet3d', sd)
  with pytest.raises(interop.InteropError,
                     match='variables not in the reference model: '
                     'params/up5_deconv/kernel'):
    interop.to_torch('unet3d', {'params': {
        **variables['params'], 'up5_deconv': {'kernel': np.zeros(3)}}})
  del variables['params']['output_conv']['bias']
  with pytest.raises(interop.InteropError,
                     match='the variables have no params/output_conv/bias'):
    interop.to_torch('unet3d', variables)


def test_default_init_matches_torch_per_tensor(reference):
  """PyTorch's default init: U(+-1/sqrt(fan_in)), norm scale 1 and bias 0.

  Our init is drawn with the 'rbg' generator: the distribution is what is
  tested, and XLA compiles threefry for 31M draws slowly on CPU.
  """
  model = unet3d.UNet3D()
  ours = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 32, 1))))(
      jax.random.key(0, impl='rbg'))
  ours = {k: v.numpy() for k, v in interop.to_torch('unet3d', ours).items()}
  theirs = {k: v.numpy() for k, v in reference.state_dict().items()}
  checked = 0
  for name, w in theirs.items():
    a = ours[name]
    assert a.shape == w.shape, name
    if name.endswith(('.1.weight', '.1.bias')):     # instance-norm affine
      want = 1.0 if name.endswith('weight') else 0.0
      assert np.all(a == want) and np.all(w == want), name
      continue
    # fan_in of the layer the tensor belongs to (PyTorch's convention).
    weight = theirs[name.replace('.bias', '.weight')]
    if 'upsample_conv' in name:                     # (in, out, k, k, k)
      fan_in = weight.shape[1] * math.prod(weight.shape[2:])
    else:                                           # (out, in, k, k, k)
      fan_in = math.prod(weight.shape[1:])
    bound = 1 / math.sqrt(fan_in)
    for label, x in (('ours', a), ('torch', w)):
      assert np.abs(x).max() <= bound * (1 + 1e-6), (label, name)
      if x.size >= 1000:
        assert np.abs(x).max() > 0.99 * bound, (label, name)
        assert abs(x.mean()) < 0.1 * bound, (label, name)
      if x.size >= 20_000:
        assert abs(x.std() / (bound / math.sqrt(3)) - 1) < 0.03, (label, name)
    if a.size >= 20_000:
      assert abs(a.std() / w.std() - 1) < 0.03, name
      checked += 1
  assert checked == 25     # every weight but input_block.conv1 and up4_deconv


def test_float32_outputs_loss_and_gradients_match_the_reference():
  r = compare.compare('unet3d', batch=1, image_size=SMALLEST, num_classes=3,
                      timing=False, wgrad='xla', upsample='projection')
  assert r['num_params'] == 31_190_243
  print('f32 outputs', r['outputs'], 'loss', r['loss'], 'grads median',
        r['grads']['median_norm_rel'], 'worst', r['grads']['worst_norm_rel'],
        r['grads']['worst_param'])
  assert r['outputs']['max_rel'] < 2e-5, r['outputs']
  assert r['loss']['max_rel'] < 1e-6, r['loss']
  assert len(r['grads']['per_param']) == 78
  # Float32 rounding (see the module docstring): a few 1e-3 per tensor.
  assert r['grads']['median_norm_rel'] < 1.5e-2, r['grads']['median_norm_rel']
  assert r['grads']['worst_norm_rel'] < 6e-2, r['grads']['worst_param']
  g = r['grads']['per_param']
  assert g['output_conv/bias']['norm_rel'] < 1e-5
  assert g['output_conv/kernel']['norm_rel'] < 1e-4


@pytest.mark.parametrize('upsample,wgrad', [('projection', 'xla'),
                                            ('conv_transpose', 'matmul')])
def test_float64_is_the_same_function(upsample, wgrad):
  """In float64 every JAX variant computes the reference's function.

  The two cases cover both transposed-conv methods and both kernel-gradient
  algorithms (the latter changes only the backward pass).
  """
  with x64():
    r = compare.compare('unet3d', batch=1, image_size=SMALLEST, num_classes=3,
                        timing=False, precision='f64', wgrad=wgrad,
                        upsample=upsample, filters=NARROW)
  print(f'f64 {upsample}/{wgrad} outputs', r['outputs']['max_rel'], 'loss',
        r['loss']['max_rel'], 'grads median', r['grads']['median_norm_rel'],
        'worst', r['grads']['worst_norm_rel'])
  assert r['outputs']['max_rel'] < 1e-11, r['outputs']
  assert r['loss']['max_rel'] < 1e-12, r['loss']
  assert r['grads']['worst_norm_rel'] < 1e-10, r['grads']['worst_param']
  assert r['grads']['median_norm_rel'] < 1e-11


def test_upsample_methods_give_the_same_outputs():
  """projection and conv_transpose on one set of weights, in float32.

  (In float64 both match the reference: test_float64_is_the_same_function.)
  """
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 32, 32, 32, 1)),
                  jnp.float32)
  torch.manual_seed(2)
  variables = interop.from_torch(
      'unet3d', torch_unet3d.Unet3D(filters=NARROW).state_dict())
  outs = [jax.jit(unet3d.UNet3D(filters=NARROW, upsample=up).apply)(
      variables, x) for up in ('projection', 'conv_transpose')]
  scale = float(jnp.abs(outs[1]).max())
  assert scale > 0
  assert float(jnp.abs(outs[0] - outs[1]).max()) < 1e-5 * scale


def test_compare_cli_writes_finite_json(tmp_path):
  out = tmp_path / 'unet3d.json'
  rc = compare.main(['--model', 'unet3d', '--image-size', '64,32,32',
                     '--batch', '1', '--filters', ','.join(map(str, NARROW)),
                     '--activation', 'leaky_relu', '--wgrad', 'xla',
                     '--warmup', '0', '--repeats', '1', '--json', str(out)])
  assert rc == 0
  r = json.loads(out.read_text())
  assert r['model'] == 'unet3d' and r['volume'] == [64, 32, 32]
  assert r['filters'] == list(NARROW) and r['activation'] == 'leaky_relu'
  values = [r['outputs']['max_rel'], r['loss']['max_rel'],
            r['grads']['worst_norm_rel'], r['jax']['step_time_s'],
            r['torch']['step_time_s']]
  assert all(np.isfinite(v) for v in values), values
  assert r['outputs']['max_rel'] < 2e-5 and r['loss']['max_rel'] < 1e-6
  assert r['grads']['median_norm_rel'] < 1e-2


def test_compare_cli_rejects_volumes_the_reference_cannot_run(capsys):
  assert compare.main(['--model', 'unet3d', '--image-size', '32',
                       '--no-timing']) == 2
  assert 'bottleneck would be a single voxel' in capsys.readouterr().err
  assert compare.main(['--model', 'unet3d', '--image-size', '16',
                       '--no-timing']) == 2
  assert 'multiple of 32' in capsys.readouterr().err
  assert compare.main(['--model', 'resnet50', '--filters', '8,16,32,64,80',
                       '--no-timing']) == 2
  assert '--filters: only for --model unet3d' in capsys.readouterr().err
