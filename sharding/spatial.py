"""Spatial partitioning of volumes: which activations stay split.

A 3D network's activations are [batch, depth, height, width, channels].
Under a mesh with a `spatial` axis, `volume_constraint` returns a function
that pins every activation to: batch over the data-parallel axes, depth over
`spatial` while each shard keeps at least `min_per_shard` slices, else depth
unsplit. XLA's SPMD partitioner then exchanges convolution halos between
neighbouring shards (collective-permute) and reduces norm statistics and
kernel gradients with all-reduces; the deep, small levels of a U-Net run
replicated over `spatial` after one all-gather.

The pinning is needed for correctness, not only speed. Left to itself, the
partitioner (jax/jaxlib 0.10) splits deep levels whose depth is smaller than
the shard count over a subgroup of the spatial devices, replicating them over
the rest, and a convolution whose input is split along a spatial dimension
while replicated over another mesh axis gets its kernel gradient multiplied
by the size of that axis. A split input feeding a replicated output with a
single slice per shard was also wrong. With the rule above every convolution
sees either a volume split over all of `spatial` with at least two slices per
shard, or an unsplit one; tests/test_unet3d_spatial.py checks the
partitioned gradients against the single-device ones.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import mesh as mesh_lib

SPATIAL_AXIS = 'spatial'


def spatial_size(mesh: Mesh) -> int:
  return int(mesh.shape.get(SPATIAL_AXIS, 1))


def volume_spec(mesh: Mesh, depth: int, min_per_shard: int = 2) -> P:
  """The partition spec of a [B, D, H, W, C] activation of this depth."""
  n = spatial_size(mesh)
  batch = mesh_lib.batch_axes(mesh) or None
  split = n > 1 and depth % n == 0 and depth >= min_per_shard * n
  return P(batch, SPATIAL_AXIS if split else None)


def volume_constraint(mesh: Mesh, min_per_shard: int = 2
                      ) -> Callable[[jax.Array], jax.Array] | None:
  """A sharding constraint for NDHWC activations; None without a spatial
  axis (plain data parallelism needs none)."""
  if spatial_size(mesh) == 1:
    return None

  def constrain(x: jax.Array) -> jax.Array:
    spec = volume_spec(mesh, x.shape[1], min_per_shard)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return constrain
