"""DLRM as MLPerf Training v2.1 trains it on the Criteo 1TB click logs.

Structure, per the MLPerf reference (facebookresearch/dlrm, branch mlperf,
bench/run_and_time.sh): 13 dense features through the bottom MLP 13-512-256-128
(ReLU after every layer); 26 categorical features, each through its own
embedding table of dimension 128 (one index per sample and table, so the
reference's sum-pooled EmbeddingBag is a plain row lookup); the dot
interaction: the bottom MLP's output and the 26 embeddings form 27 vectors,
their pairwise dot products below the diagonal (i > j, in the order (1,0),
(2,0), (2,1), (3,0), ...) are concatenated after the bottom MLP's output
(128 + 351 = 479 features); the top MLP 479-1024-1024-512-256-1, ReLU after
every layer but the last, whose output is the click logit (the reference
applies a sigmoid there; here the sigmoid is part of the loss and of the
predicted probability).

Table sizes come from the config: the MLPerf run caps each table at
max_ind_range = 40,000,000 rows (CRITEO_1TB_TABLE_SIZES, 187,767,399 rows in
all: 24,034,227,072 embedding parameters in float32, ~96 GB); the MLPs hold
2,368,897 more.

Initialisation as the reference: a linear layer n -> m has weights
N(0, sqrt(2 / (m + n))) and bias N(0, sqrt(1 / m)); a table of n rows is
uniform in [-sqrt(1 / n), sqrt(1 / n)).

The model is split the way it is trained: `DenseArch` (this Flax module: MLPs
and interaction, data parallel) takes the dense features and the already
looked-up embeddings [B, 26, D]; the tables themselves live outside Flax as
one stacked array, sharded over the devices by
`jaxperf.sharding.embedding`, which also does the lookups and the sparse
updates. `init_tables` gives each table's reference initialisation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Rows per table of the Criteo 1TB dataset as the MLPerf reference builds
# them (day_fea_count.npz capped at 40,000,000), in feature order C1..C26.
CRITEO_1TB_TABLE_SIZES = (
    39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951,
    2953546, 403346, 10, 2208, 11938, 155, 4, 976, 14, 39979771, 25641295,
    39664984, 585935, 12972, 108, 36)


@dataclasses.dataclass(frozen=True)
class DLRMConfig:
  table_sizes: tuple[int, ...] = CRITEO_1TB_TABLE_SIZES
  num_dense: int = 13
  embed_dim: int = 128
  bottom_mlp: tuple[int, ...] = (512, 256, 128)
  top_mlp: tuple[int, ...] = (1024, 1024, 512, 256, 1)

  def __post_init__(self):
    if not self.table_sizes or min(self.table_sizes) < 1:
      raise ValueError(f'table_sizes {self.table_sizes}: expected one or '
                       f'more positive row counts')
    if not self.bottom_mlp or not self.top_mlp:
      raise ValueError('bottom_mlp and top_mlp need at least one layer each')
    if self.bottom_mlp[-1] != self.embed_dim:
      raise ValueError(
          f'the dot interaction needs the bottom MLP to end in embed_dim '
          f'({self.embed_dim}); bottom_mlp is {self.bottom_mlp}')
    if self.top_mlp[-1] != 1:
      raise ValueError(f'top_mlp must end in 1 (the click logit), got '
                       f'{self.top_mlp}')

  @property
  def num_tables(self) -> int:
    return len(self.table_sizes)

  @property
  def interaction_dim(self) -> int:
    """Width of the top MLP's input: bottom output + pairwise products."""
    n = self.num_tables + 1
    return self.bottom_mlp[-1] + n * (n - 1) // 2


MLPERF = DLRMConfig()


def mlp_param_count(cfg: DLRMConfig) -> int:
  total = 0
  for widths in ((cfg.num_dense,) + cfg.bottom_mlp,
                 (cfg.interaction_dim,) + cfg.top_mlp):
    for n, m in zip(widths[:-1], widths[1:]):
      total += n * m + m
  return total


def param_count(cfg: DLRMConfig) -> int:
  """Parameters of the whole model: tables plus MLPs."""
  return sum(cfg.table_sizes) * cfg.embed_dim + mlp_param_count(cfg)


def _kernel_init(key, shape, dtype=jnp.float32):
  n, m = shape
  return jax.random.normal(key, shape, dtype) * np.sqrt(2.0 / (m + n))


def _bias_init(key, shape, dtype=jnp.float32):
  return jax.random.normal(key, shape, dtype) * np.sqrt(1.0 / shape[0])


class MLP(nn.Module):
  """Linear layers with the reference initialisation and ReLU after each;
  `last_activation=False` leaves the final layer linear."""
  features: Sequence[int]
  last_activation: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.features):
      x = nn.Dense(width, dtype=self.dtype, kernel_init=_kernel_init,
                   bias_init=_bias_init, name=f'dense_{i}')(x)
      if i < len(self.features) - 1 or self.last_activation:
        x = nn.relu(x)
    return x


def interaction_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
  """(i, j) of the pairs below the diagonal of an n x n matrix, row by row."""
  i, j = np.tril_indices(n, k=-1)
  return i.astype(np.int32), j.astype(np.int32)


def dot_interaction(x: jax.Array, emb: jax.Array) -> jax.Array:
  """[B, D] bottom output and [B, T, D] embeddings -> [B, D + (T+1)T/2]."""
  t = jnp.concatenate([x[:, None, :], emb], axis=1)
  z = jnp.einsum('bid,bjd->bij', t, t)
  i, j = interaction_indices(t.shape[1])
  return jnp.concatenate([x, z[:, i, j]], axis=1)


class DenseArch(nn.Module):
  """Everything but the tables: dense [B, 13] and embeddings [B, T, D] in,
  click logits [B] out."""
  cfg: DLRMConfig
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, dense, emb):
    cfg = self.cfg
    x = MLP(cfg.bottom_mlp, dtype=self.dtype, name='bottom_mlp')(
        dense.astype(self.dtype))
    r = dot_interaction(x, emb.astype(self.dtype))
    logits = MLP(cfg.top_mlp, last_activation=False, dtype=self.dtype,
                 name='top_mlp')(r)
    return logits[:, 0].astype(jnp.promote_types(self.dtype, jnp.float32))


def init_table(key: jax.Array, rows: int, dim: int,
               dtype=jnp.float32) -> jax.Array:
  """One table, uniform in [-sqrt(1/rows), sqrt(1/rows))."""
  bound = float(np.sqrt(1.0 / rows))
  return jax.random.uniform(key, (rows, dim), dtype, -bound, bound)


def init_tables(key: jax.Array, cfg: DLRMConfig) -> list[jax.Array]:
  keys = jax.random.split(key, cfg.num_tables)
  return [init_table(k, n, cfg.embed_dim)
          for k, n in zip(keys, cfg.table_sizes)]


def checker_tensor_names() -> list[str]:
  """The tensor names the v2.1 checker expects in weights_initialization."""
  return (['embeddings'] + [f'bottom_mlp_dense{i}' for i in range(1, 4)]
          + [f'top_mlp_dense{i}' for i in range(1, 6)])
