"""Mesh specs, meshes over the 8 simulated devices, and batch shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf.errors import ConfigError
from jaxperf.sharding import mesh as mesh_lib


def test_eight_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize('spec, expected', [
    (None, {}), ('', {}), ('  ', {}),
    ('data=8', {'data': 8}),
    ('data=2,tensor=4', {'data': 2, 'tensor': 4}),
    (' data = 2 , fsdp=2,tensor=2 ', {'data': 2, 'fsdp': 2, 'tensor': 2}),
])
def test_parse_mesh_spec(spec, expected):
  got = mesh_lib.parse_mesh_spec(spec)
  assert got == expected
  assert list(got) == list(expected)  # order kept: it is the mesh's order


@pytest.mark.parametrize('spec, match', [
    ('data', 'expected name=size'),
    ('=4', 'expected name=size'),
    ('data=2,', 'expected name=size'),
    ('batch=8', "unknown axis 'batch'"),
    ('data=0', '>= 1'),
    ('data=-2', '>= 1'),
    ('data=x', 'positive integer'),
    ('data=2.5', 'positive integer'),
    ('data=2,data=4', "'data' given twice"),
])
def test_parse_mesh_spec_errors(spec, match):
  with pytest.raises(ConfigError, match=match):
    mesh_lib.parse_mesh_spec(spec)


def test_default_mesh_is_data_over_all_devices():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == ('data',)
  assert dict(mesh.shape) == {'data': 8}
  assert set(mesh.devices.flat) == set(jax.devices())
  assert mesh_lib.data_parallel_size(mesh) == 8
  assert 'data=8 over 8 cpu devices' == mesh_lib.describe(mesh)


def test_two_axis_mesh():
  for spec in ('data=2,tensor=4', {'data': 2, 'tensor': 4}):
    mesh = mesh_lib.make_mesh(spec)
    assert mesh.axis_names == ('data', 'tensor')
    assert mesh.devices.shape == (2, 4)
    assert len(set(mesh.devices.flat)) == 8
    assert mesh_lib.batch_axes(mesh) == ('data',)
    assert mesh_lib.data_parallel_size(mesh) == 2


def test_mesh_over_a_subset_of_devices():
  mesh = mesh_lib.make_mesh('data=4', devices=jax.devices()[:4])
  assert mesh.devices.size == 4


@pytest.mark.parametrize('spec, total', [('data=3', 3), ('data=16', 16),
                                         ('data=2,tensor=2', 4)])
def test_mesh_size_must_match_device_count(spec, total):
  with pytest.raises(ConfigError, match='8 devices') as e:
    mesh_lib.make_mesh(spec)
  assert f'multiply to {total}' in str(e.value)


def _shard_shapes(x):
  return {tuple(s.data.shape) for s in x.addressable_shards}


def _distinct_slices(x):
  return len({tuple((i.start, i.stop) for i in s.index)
              for s in x.addressable_shards})


def test_batch_sharding_over_data():
  mesh = mesh_lib.make_mesh()
  x = jax.device_put(jnp.arange(16 * 3).reshape(16, 3),
                     mesh_lib.batch_sharding(mesh))
  assert _shard_shapes(x) == {(2, 3)}
  rows = sorted(int(s.data[0, 0]) // 3 for s in x.addressable_shards)
  assert rows == list(range(0, 16, 2))  # each device a distinct slice
  np.testing.assert_array_equal(np.asarray(x), np.arange(48).reshape(16, 3))


def test_batch_sharding_leading_axis():
  mesh = mesh_lib.make_mesh()
  x = jax.device_put(jnp.zeros((3, 16)), mesh_lib.batch_sharding(mesh, 1))
  assert _shard_shapes(x) == {(3, 2)}


def test_batch_sharding_over_data_and_fsdp():
  mesh = mesh_lib.make_mesh('fsdp=4,data=2')
  assert mesh_lib.batch_axes(mesh) == ('data', 'fsdp')
  assert mesh_lib.data_parallel_size(mesh) == 8
  sh = mesh_lib.batch_sharding(mesh)
  assert sh.spec[0] == ('data', 'fsdp')
  x = jax.device_put(jnp.zeros((16, 2)), sh)
  assert _shard_shapes(x) == {(2, 2)}
  assert _distinct_slices(x) == 8


def test_batch_sharding_replicates_over_tensor():
  mesh = mesh_lib.make_mesh('data=2,tensor=4')
  x = jax.device_put(jnp.zeros((16, 2)), mesh_lib.batch_sharding(mesh))
  assert _shard_shapes(x) == {(8, 2)}
  assert _distinct_slices(x) == 2


def test_batch_sharding_without_batch_axes_replicates():
  mesh = mesh_lib.make_mesh('tensor=8')
  assert mesh_lib.batch_axes(mesh) == ()
  x = jax.device_put(jnp.zeros((16, 2)), mesh_lib.batch_sharding(mesh))
  assert _shard_shapes(x) == {(16, 2)}


def test_replicated():
  mesh = mesh_lib.make_mesh('data=2,tensor=4')
  x = jax.device_put(jnp.ones((4, 4)), mesh_lib.replicated(mesh))
  assert _shard_shapes(x) == {(4, 4)}
  assert x.sharding.is_fully_replicated
