"""ResNet-50 against torchvision: weight interop and numerical parity."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    'torch', reason="the parity tests need the 'compare' extra (PyTorch); "
    "pip install -e '.[test]' installs it")
torchvision = pytest.importorskip('torchvision')

from jaxperf import compare, interop  # noqa: E402
from jaxperf.models import resnet  # noqa: E402


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  return torchvision.models.resnet50(num_classes=1000)


def test_round_trip_through_flax_restores_every_tensor(reference):
  sd = reference.state_dict()
  variables = interop.from_torch('resnet50', sd)
  n = sum(np.size(x) for x in jax.tree.leaves(variables['params']))
  assert n == 25_557_032
  back = interop.to_torch('resnet50', variables)
  assert set(back) == set(sd)
  for k, v in sd.items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  fresh = torchvision.models.resnet50(num_classes=1000)
  fresh.load_state_dict(back, strict=True)


def test_flax_variables_fit_our_model(reference):
  model = resnet.ResNet(num_classes=1000)
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  variables = interop.from_torch('resnet50', reference.state_dict(),
                                 expected=expected)
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.tree.map(lambda x: 0, dict(expected)))


def test_missing_unexpected_and_misshapen_tensors_are_named(reference):
  sd = dict(reference.state_dict())
  missing = {k: v for k, v in sd.items() if k != 'layer3.2.bn2.running_var'}
  with pytest.raises(interop.InteropError,
                     match=r'missing 1 tensor\(s\): layer3.2.bn2.running_var'):
    interop.from_torch('resnet50', missing)
  with pytest.raises(interop.InteropError,
                     match=r'unexpected 1 tensor\(s\): head.extra'):
    interop.from_torch('resnet50', {**sd, 'head.extra': sd['fc.bias']})
  ten_class = torchvision.models.resnet50(num_classes=10).state_dict()
  expected = jax.eval_shape(lambda: resnet.ResNet(num_classes=1000).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  with pytest.raises(interop.InteropError,
                     match=r'tensor fc.weight has shape \(10, 2048\) but the '
                     r'model expects \(1000, 2048\)'):
    interop.from_torch('resnet50', ten_class, expected=expected)
  with pytest.raises(interop.InteropError, match='no weight mapping'):
    interop.from_torch('resnet51', sd)


def test_float32_outputs_loss_and_gradients_match_torchvision():
  r = compare.compare('resnet50', batch=8, image_size=64, num_classes=1000,
                      timing=False)
  assert r['outputs_eval']['max_rel'] < 1e-4, r['outputs_eval']
  assert r['outputs_train']['max_rel'] < 1e-4, r['outputs_train']
  assert r['loss']['max_rel'] < 1e-5, r['loss']
  # float32 gradients: ReLU/max-pool decisions tipped by rounding make them
  # differ more than the outputs (a few 1e-3 here); the f64 test below shows
  # the two backward passes are otherwise the same computation.
  assert r['grads']['median_norm_rel'] < 5e-2, r['grads']['median_norm_rel']
  g = r['grads']['per_param']
  assert g['fc1/bias']['norm_rel'] < 1e-5
  assert len(g) == 161


def test_float64_gradients_match_torchvision_exactly(tmp_path):
  out = tmp_path / 'parity.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxperf.compare', '--model', 'resnet50',
       '--batch', '4', '--image-size', '64', '--precision', 'f64',
       '--no-timing', '--json', str(out)],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r['precision'] == 'f64'
  assert r['outputs_eval']['max_rel'] < 1e-12
  assert r['outputs_train']['max_rel'] < 1e-10
  assert r['grads']['worst_norm_rel'] < 1e-9, r['grads']['worst_param']
  assert 'outputs_eval' in proc.stdout


def test_compare_cli_rejects_unknown_model():
  proc = subprocess.run([sys.executable, '-m', 'jaxperf.compare', '--model',
                         'gpt3', '--no-timing'], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  assert "--model 'gpt3': no PyTorch reference" in proc.stderr
