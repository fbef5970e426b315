"""Logical axis names -> mesh shardings.

Models name the axes of their parameters and key activations ('vocab',
'embed', 'heads', 'mlp', 'batch', 'act_embed', ...); a table of rules maps
each name to mesh axes. The same model then runs data parallel (batch over
`data`), fully sharded (parameters' `embed` axis and the batch over `fsdp`)
or tensor parallel (heads, feed-forward and vocabulary over `tensor`) by
choosing the mesh alone.

A rule only applies where it can: mesh axes missing from the mesh (or of size
1) are dropped, a mesh axis is used at most once per array, and a dimension
whose size the mesh axes do not divide stays unsplit (BERT's 30522-word
vocabulary over tensor=4, say), so every mesh gives a valid sharding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Mapping[str, tuple[str, ...]]

# Transformer rules: parameters, then activations.
TRANSFORMER_RULES: Rules = {
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'embed_out': (),
    'heads': ('tensor',),
    'kv': (),
    'mlp': ('tensor',),
    'norm': (),
    'batch': ('data', 'fsdp'),
    'length': (),
    'act_embed': (),
    'act_heads': ('tensor',),
    'act_mlp': ('tensor',),
    'act_vocab': ('tensor',),
}


def merge_rules(base: Rules, overrides: Mapping[str, Any] | None, *,
                flag: str = 'rules') -> dict[str, tuple[str, ...]]:
  """`base` with entries replaced by `overrides` ({name: axis, [axes] or
  null}); unknown logical names or mesh axes are ConfigErrors."""
  from jaxperf.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from jaxperf.sharding.mesh import KNOWN_AXES  # pylint: disable=g-import-not-at-top
  rules = {k: tuple(v) for k, v in base.items()}
  for name, axes in dict(overrides or {}).items():
    if name not in rules:
      raise ConfigError(f'{flag}: unknown logical axis {name!r}; known: '
                        f'{sorted(rules)}')
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(
        axes)
    bad = [a for a in axes if a not in KNOWN_AXES]
    if bad:
      raise ConfigError(f'{flag}: {name!r} -> {bad}: unknown mesh axes; '
                        f'known: {list(KNOWN_AXES)}')
    rules[name] = axes
  return rules


def spec_for(names: Sequence[str | None], shape: Sequence[int] | None,
             mesh: Mesh, rules: Rules) -> P:
  """The PartitionSpec of an array with logical axis `names`."""
  used: set[str] = set()
  out = []
  for i, name in enumerate(names):
    axes = []
    if name is not None:
      if name not in rules:
        raise KeyError(f'no sharding rule for logical axis {name!r}; known: '
                       f'{sorted(rules)}')
      for ax in rules[name]:
        if ax in mesh.shape and mesh.shape[ax] > 1 and ax not in used:
          axes.append(ax)
      if shape is not None and axes:
        # Keep the longest prefix of axes whose product divides the size.
        while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
          axes.pop()
    used.update(axes)
    out.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*out)


def tree_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned
  (abstract or concrete); unannotated leaves are replicated."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh,
                                          rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def activation_constraint(mesh: Mesh | None, rules: Rules
                          ) -> Callable[[jax.Array, Sequence[str | None]], jax.Array]:
  """shard(x, names): pins an activation to the sharding its names map to
  (identity without a mesh or on a single device)."""
  if mesh is None or mesh.devices.size == 1:
    return lambda x, names: x

  def shard(x, names):
    spec = spec_for(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return shard
