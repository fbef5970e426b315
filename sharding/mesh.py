"""Device meshes and the shardings the trainer uses.

A mesh is described by a spec like "data=8" or "data=2,tensor=4": named axes
and their sizes, whose product must equal the number of devices. The batch is
split over the data-parallel axes (`data`, `fsdp`); everything a model does not
annotate is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxperf.errors import ConfigError

# Mesh axes the global batch is split over, in this order.
BATCH_AXES = ('data', 'fsdp')
KNOWN_AXES = ('data', 'fsdp', 'tensor', 'spatial', 'expert', 'pipeline')


def parse_mesh_spec(spec: str | None) -> dict[str, int]:
  """Parses "data=2,tensor=4" into {'data': 2, 'tensor': 4}."""
  if spec is None or not spec.strip():
    return {}
  axes: dict[str, int] = {}
  for part in spec.split(','):
    name, sep, size = part.strip().partition('=')
    name = name.strip()
    if not sep or not name:
      raise ConfigError(f'--mesh {spec!r}: expected name=size[,name=size...], '
                        f'e.g. data=8 or data=2,tensor=4')
    if name not in KNOWN_AXES:
      raise ConfigError(f'--mesh {spec!r}: unknown axis {name!r}; known axes: '
                        f'{", ".join(KNOWN_AXES)}')
    if name in axes:
      raise ConfigError(f'--mesh {spec!r}: axis {name!r} given twice')
    try:
      n = int(size)
    except ValueError:
      raise ConfigError(f'--mesh {spec!r}: size of {name!r} must be a '
                        f'positive integer, got {size!r}') from None
    if n < 1:
      raise ConfigError(f'--mesh {spec!r}: size of {name!r} must be >= 1')
    axes[name] = n
  return axes


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a mesh over `devices` (default: all). Default spec: data=<all>."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ConfigError('cannot build a mesh over an empty list of devices')
  if isinstance(spec, Mapping):
    spec = ','.join(f'{k}={v}' for k, v in spec.items())
  axes = parse_mesh_spec(spec)
  if not axes:
    axes = {'data': len(devices)}
  total = math.prod(axes.values())
  if total != len(devices):
    shape = ','.join(f'{k}={v}' for k, v in axes.items())
    raise ConfigError(
        f'--mesh {shape}: the axis sizes multiply to {total}, but there are '
        f'{len(devices)} devices ({devices[0].platform}); the product must '
        f'equal the device count')
  try:
    dev_array = jax.experimental.mesh_utils.create_device_mesh(
        tuple(axes.values()), devices=devices)
  except Exception:  # pylint: disable=broad-except
    dev_array = np.asarray(devices).reshape(tuple(axes.values()))
  return Mesh(dev_array, tuple(axes))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
  """Shards axis `leading` of an array over the batch axes of the mesh."""
  axes = batch_axes(mesh)
  spec = [None] * leading + [axes if axes else None]
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(mesh: Mesh) -> str:
  shape = ','.join(f'{k}={v}' for k, v in mesh.shape.items())
  return f'{shape} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices'


import jax.experimental.mesh_utils  # noqa: E402  (registers the submodule)


def check_batches_divide(config, n: int, mesh: Mesh, how: str) -> None:
  """ConfigError unless global_batch_size and eval_batch_size are multiples
  of n, the devices a batch is split over (`how` says over which)."""
  from jaxperf.errors import ConfigError  # pylint: disable=g-import-not-at-top
  for key in ('global_batch_size', 'eval_batch_size'):
    value = int(config[key])
    if value % n:
      raise ConfigError(
          f'{key}={value}: the batch is split over {how} {n} devices of '
          f'--mesh {describe(mesh)}; it must be a multiple of {n}')


def check_micro_batch_divides(config, accumulation: int, mesh: Mesh) -> None:
  """ConfigError unless a micro-batch (global_batch_size / accumulation)
  splits over the mesh's data-parallel devices."""
  from jaxperf.errors import ConfigError  # pylint: disable=g-import-not-at-top
  micro = int(config.global_batch_size) // accumulation
  n_data = data_parallel_size(mesh)
  if micro % n_data:
    raise ConfigError(
        f'--mesh {describe(mesh)}: a micro-batch of {micro} '
        f'(global_batch_size / gradient_accumulation_steps) does not split '
        f'over the {n_data} data-parallel devices')
