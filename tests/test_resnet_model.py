"""ResNet-50 v1.5: size, structure, MLPerf tensor names and mixed precision.

Shapes come from jax.eval_shape, so nothing here runs the full network.
"""

from __future__ import annotations

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import mlperf_logging
import pytest
import yaml

from jaxperf.models import resnet as resnet_model
from jaxperf.workloads.resnet import mxnet_names

F32 = jnp.dtype(jnp.float32)


def _abstract_init(model, size=224, batch=1):
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((batch, size, size, 3), jnp.uint8),
      train=False))


def _abstract_apply(model, variables, size=224, batch=2, **kw):
  return jax.eval_shape(lambda v: model.apply(
      v, jnp.zeros((batch, size, size, 3), jnp.uint8), **kw), variables)


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def r50():
  model = resnet_model.resnet50(num_classes=1000)
  return model, _abstract_init(model)


def test_parameter_count(r50):
  _, variables = r50
  assert set(variables) == {'params', 'batch_stats'}
  assert _count(variables['params']) == 25_557_032
  # Mean and variance per BN channel: stem 64, then per stage of width f and
  # n blocks, n * (f + f + 4f) plus the 4f shortcut BN.
  bn_channels = 64 + sum(n * 6 * f + 4 * f for f, n in
                         zip((64, 128, 256, 512), (3, 4, 6, 3)))
  assert bn_channels == 26_560
  assert _count(variables['batch_stats']) == 2 * bn_channels
  assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * 53
  assert len(jax.tree.leaves(variables['params'])) == 161


def test_key_param_shapes(r50):
  _, variables = r50
  p = variables['params']
  assert p['conv0']['kernel'].shape == (7, 7, 3, 64)
  assert p['bn0']['scale'].shape == (64,)
  u = p['stage2_unit1']
  assert u['conv1']['kernel'].shape == (1, 1, 256, 128)
  assert u['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert u['conv3']['kernel'].shape == (1, 1, 128, 512)
  assert u['conv1sc']['kernel'].shape == (1, 1, 256, 512)
  assert 'conv1sc' not in p['stage2_unit2']
  assert 'bias' not in u['conv1']  # convolutions have no bias
  assert p['stage4_unit3']['conv3']['kernel'].shape == (1, 1, 512, 2048)
  assert p['fc1']['kernel'].shape == (2048, 1000)
  assert p['fc1']['bias'].shape == (1000,)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {F32}


def test_output_shapes_and_v15_stride(r50):
  model, variables = r50
  logits, state = _abstract_apply(model, variables, train=False,
                                  capture_intermediates=True,
                                  mutable=['intermediates'])
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  inter = state['intermediates']
  out = lambda *path: _get(inter, path)['__call__'][0].shape
  assert out('conv0') == (2, 112, 112, 64)
  assert out('stage1_unit1') == (2, 56, 56, 256)
  assert out('stage4_unit3') == (2, 7, 7, 2048)  # before global pooling
  # v1.5: a downsampling block keeps the size through its 1x1 conv1 and
  # halves it in the 3x3 conv2 (v1 would halve it in conv1).
  for stage, size in (('stage2', 56), ('stage3', 28), ('stage4', 14)):
    unit = f'{stage}_unit1'
    assert out(unit, 'conv1')[1:3] == (size, size), unit
    assert out(unit, 'conv2')[1:3] == (size // 2, size // 2), unit
    assert out(unit, 'conv1sc')[1:3] == (size // 2, size // 2), unit


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _checker_names():
  root = pathlib.Path(mlperf_logging.__file__).parent
  path = root / 'compliance_checker' / 'training_2.1.0' / 'closed_resnet.yaml'
  rules = yaml.safe_load(path.read_text())
  checks = [r['END']['CHECK'] for r in rules
            if isinstance(r, dict) and 'END' in r and 'CHECK' in r['END']]
  names = [n for c in checks for n in re.findall(r'"([A-Za-z0-9_]+)"', c)]
  assert len(names) == 161
  return names


def test_mxnet_names_match_checker(r50):
  _, variables = r50
  names = mxnet_names(variables['params'])
  assert len(names) == len(set(names)) == 161
  assert set(names) == set(_checker_names())


def test_mxnet_names_independent_of_width():
  small = resnet_model.resnet50(num_classes=10, width=8)
  names = mxnet_names(_abstract_init(small, size=32)['params'])
  assert set(names) == set(_checker_names())


def test_bf16_compute_keeps_float32_params_and_logits():
  model = resnet_model.resnet50(num_classes=10, width=8, dtype=jnp.bfloat16)
  variables = _abstract_init(model, size=32)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {F32}
  logits, state = _abstract_apply(
      model, variables, size=32, train=True,
      capture_intermediates=True, mutable=['batch_stats', 'intermediates'])
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  assert {x.dtype for x in jax.tree.leaves(state['batch_stats'])} == {F32}
  inter = state['intermediates']
  # The convolutions do compute in bfloat16.
  assert inter['conv0']['__call__'][0].dtype == jnp.bfloat16
  assert inter['stage3_unit2']['conv2']['__call__'][0].dtype == jnp.bfloat16
