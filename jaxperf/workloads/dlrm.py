"""DLRM on Criteo 1TB (MLPerf benchmark "dlrm", v2.1): ROC AUC 0.8025.

The model is models/dlrm.py; its tables are one stacked array sharded over
every device of the mesh (jaxperf.sharding.embedding: 'row' or 'table'
layout, optional replicated hot rows), and the MLPs run data parallel over
the same devices, so `--mesh data=8` is the usual choice (any mesh works: all
its axes together split the batch and the tables).

Training as the reference (dlrm_s_pytorch.py, branch mlperf): plain SGD on
every parameter (sparse on the tables: each step updates only the rows it
read), binary cross-entropy on the click probability, the reference's
warmup / hold / polynomial (power 2) decay (optim.dlrm_lr_schedule).
Evaluation: ROC AUC of the predicted probabilities over the whole test split
(jaxperf.metrics.auc, scikit-learn's tie handling) every 0.05 epoch and at
the end, as the reference does (its test_freq at its batch size). The log's
epoch_num is the reference's: 1 + the epochs done (1.05, 1.10, ...), which
is what the RCP checker reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxperf import optim
from jaxperf.config import Config
from jaxperf.errors import ConfigError
from jaxperf.models import dlrm as dlrm_model
from jaxperf.sharding import embedding as emb_lib
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads.base import (ReplicatedEval, Schedule, TrainState,
                                    Workload)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
NUM_DENSE = 13


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example binary cross-entropy of sigmoid(logits), each log term
  clamped at -100 as torch.nn.BCELoss does (computed from the logits, so it
  stays exact where the probability rounds to 0 or 1)."""
  labels = labels.astype(jnp.float32)
  pos = jnp.minimum(jax.nn.softplus(-logits), 100.0)
  neg = jnp.minimum(jax.nn.softplus(logits), 100.0)
  return labels * pos + (1.0 - labels) * neg


def _ints(flag: str, value: Any) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f'{flag}={value!r}: expected a list of integers'
                      ) from None
  if not out or min(out) < 1:
    raise ConfigError(f'{flag}={value!r}: expected positive integers')
  return out


class DLRM(Workload):
  name = 'dlrm'
  benchmark = 'dlrm'
  metric = 'auc'
  higher_is_better = True
  description = 'DLRM, Criteo 1TB click logs, ROC AUC'
  # On a CPU: every layer at full width and the reference batch, tables
  # capped at 100,000 rows (1.9M rows, ~1 GB) instead of 96 GB.
  bench_cpu_overrides = {'max_ind_range': 100_000, 'global_batch_size': 2048}

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    if c.optimizer != 'sgd':
      raise ConfigError(f'optimizer={c.optimizer!r}: the reference uses sgd')
    if c.dtype not in _DTYPES:
      raise ConfigError(f'dtype={c.dtype!r}: expected one of {list(_DTYPES)}')
    if c.embedding_layout not in emb_lib.MODES:
      raise ConfigError(f'embedding_layout={c.embedding_layout!r}: expected '
                        f'one of {list(emb_lib.MODES)}')
    self.max_ind_range = int(c.max_ind_range)
    if c.table_sizes is None:
      sizes = dlrm_model.CRITEO_1TB_TABLE_SIZES
    else:
      sizes = _ints('table_sizes', c.table_sizes)
    if self.max_ind_range > 0:
      sizes = tuple(min(s, self.max_ind_range) for s in sizes)
    if float(c.poly_power) != 2:
      raise ConfigError(f'poly_power={c.poly_power}: the rules fix the decay '
                        f'power at 2')
    self._set_table_sizes(sizes)
    self.mesh = None
    self.emb: emb_lib.ShardedEmbedding | None = None
    self._train_ds = None
    self._lr = None

  def _set_table_sizes(self, sizes) -> None:
    c = self.config
    try:
      self.model_cfg = dlrm_model.DLRMConfig(
          table_sizes=tuple(int(n) for n in sizes), num_dense=NUM_DENSE,
          embed_dim=int(c.embed_dim),
          bottom_mlp=_ints('bottom_mlp', c.bottom_mlp),
          top_mlp=_ints('top_mlp', c.top_mlp))
    except ValueError as e:
      raise ConfigError(f'model config: {e}') from None
    self.model = dlrm_model.DenseArch(self.model_cfg, dtype=_DTYPES[c.dtype])

  # --- data --------------------------------------------------------------------
  def datasets(self, data_dir, seed):
    from jaxperf.data import criteo  # pylint: disable=g-import-not-at-top
    c = self.config
    sizes = self.model_cfg.table_sizes
    if data_dir is None:
      train, eval_ = criteo.synthetic_criteo(
          int(c.synthetic_train_samples), int(c.synthetic_eval_samples),
          table_sizes=sizes, seed=seed)
    else:
      if c.table_sizes is None:
        # As the reference: the tables take the row counts of the data's
        # counts file (capped at max_ind_range).
        counts = criteo.read_counts(os.path.join(data_dir, c.counts_file))
        sizes = tuple(criteo.capped_table_sizes(counts, self.max_ind_range))
        self._set_table_sizes(sizes)
      train, eval_ = criteo.open_criteo(
          data_dir, table_sizes=sizes, max_ind_range=self.max_ind_range,
          seed=seed, train_file=c.train_file, eval_file=c.eval_file,
          counts_file=c.counts_file)
    self._train_ds = train
    return train, eval_

  def batch_spec(self, global_batch, train):
    b = global_batch
    spec = {'dense': jax.ShapeDtypeStruct((b, NUM_DENSE), jnp.float32),
            'sparse': jax.ShapeDtypeStruct((b, self.model_cfg.num_tables),
                                           jnp.int32),
            'label': jax.ShapeDtypeStruct((b,), jnp.float32)}
    if not train:
      spec['mask'] = jax.ShapeDtypeStruct((b,), jnp.bool_)
    return spec

  def batch_partition(self, mesh, train):
    """The batch is split over every mesh axis (the MLPs are data parallel
    over all devices, the tables model parallel over the same devices)."""
    axes = tuple(mesh.axis_names)
    return {k: P(axes) for k in self.batch_spec(0, train)}

  def check_mesh(self, mesh) -> None:
    mesh_lib.check_batches_divide(self.config, int(mesh.devices.size), mesh,
                                  'all')
    self.mesh = mesh

  def setup(self, train_examples):
    c = self.config
    self.schedule = Schedule(train_examples, int(c.global_batch_size))
    self._lr = optim.dlrm_lr_schedule(
        float(c.base_learning_rate), int(c.warmup_steps),
        int(c.decay_start_step), int(c.decay_steps),
        power=float(c.poly_power))
    if self.mesh is None:
      self.mesh = mesh_lib.make_mesh(None)
    self.emb = self._build_embedding(self.mesh)
    return self.schedule

  def _build_embedding(self, mesh) -> emb_lib.ShardedEmbedding:
    c = self.config
    cfg = self.model_cfg
    hot_rows = None
    num_hot = int(c.hot_rows)
    if num_hot > 0:
      hot_rows = emb_lib.hot_rows_from_counts(self._row_counts(), num_hot)
    return emb_lib.ShardedEmbedding(
        cfg.table_sizes, cfg.embed_dim, mesh, mode=c.embedding_layout,
        hot_rows=hot_rows)

  def _row_counts(self) -> list[np.ndarray]:
    """How often each row occurs: counted over the training data (its first
    hot_rows_sample rows; 0: all), or, with no training source (jaxperf.bench),
    over the benchmark's batches."""
    c = self.config
    limit = int(c.hot_rows_sample) or None
    if self._train_ds is not None:
      return self._train_ds.category_counts(max_rows=limit)
    sparse = self.bench_batch(int(c.global_batch_size), 0)['sparse']
    return [np.bincount(sparse[:, t], minlength=n)
            for t, n in enumerate(self.model_cfg.table_sizes)]

  def state_layout(self):
    return self.emb.signature()

  def train_length(self):
    return float(self.config.train_epochs)

  def eval_epochs(self, train_epochs):
    """Every eval_every_epochs (0.05: the reference's test_freq of 102400
    iterations at its batch of 2048) and at the end."""
    every = float(self.config.eval_every_epochs)
    if every <= 0:
      raise ConfigError(f'eval_every_epochs={every}: expected > 0')
    n = int(round(train_epochs / every, 6))
    points = [round(every * i, 6) for i in range(1, n + 1)]
    if not points or points[-1] < train_epochs:
      points.append(round(float(train_epochs), 6))
    return points

  def logged_epoch(self, epoch):
    return round(1.0 + epoch, 6)

  def block_epochs(self, prev_epoch, epoch_end, epoch_at_step):
    first = max(prev_epoch, epoch_at_step)
    return round(1.0 + first, 6), round(epoch_end - first, 6)

  # --- state -------------------------------------------------------------------
  def _dense_init(self, key):
    cfg = self.model_cfg
    return self.model.init(
        key, jnp.zeros((1, NUM_DENSE), jnp.float32),
        jnp.zeros((1, cfg.num_tables, cfg.embed_dim), jnp.float32))['params']

  def init_state(self, rng):
    key = jax.random.wrap_key_data(rng)
    k_dense, k_emb, k_rng = jax.random.split(key, 3)
    params = {'dense': self._dense_init(k_dense),
              'embedding': self.emb.init(k_emb)}
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      model_state={}, opt_state={},
                      rng=jax.random.key_data(k_rng))

  def state_sharding(self, abstract_state, mesh):
    rep = mesh_lib.replicated(mesh)
    sh = jax.tree.map(lambda _: rep, abstract_state)
    params = dict(sh.params)
    params['embedding'] = self.emb.shardings()
    return sh.replace(params=params)

  # --- steps -------------------------------------------------------------------
  def logits(self, params, batch):
    emb = self.emb.lookup(params['embedding'], batch['sparse'])
    return self.model.apply({'params': params['dense']}, batch['dense'], emb)

  def train_step(self, state, batch):
    """One SGD step: dense parameters and the replicated hot rows by their
    (all-reduced) gradients, table rows by scatter-adds at their owners."""
    lr = self._lr(state.step)
    emb_params = state.params['embedding']
    route = self.emb.route(batch['sparse'])
    owner_ids, rows = self.emb.gather(emb_params['tables'], route)

    def loss_fn(dense, rows, hot):
      emb = self.emb.combine(rows, hot, route)
      logits = self.model.apply({'params': dense}, batch['dense'], emb)
      return jnp.mean(bce_with_logits(logits, batch['label']))

    loss, (g_dense, g_rows, g_hot) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2))(state.params['dense'], rows,
                                    emb_params.get('hot'))
    dense = jax.tree.map(lambda p, g: p - lr * g, state.params['dense'],
                         g_dense)
    new_emb = {'tables': self.emb.sgd_update(emb_params['tables'], owner_ids,
                                             g_rows, lr)}
    if 'hot' in emb_params:
      new_emb['hot'] = emb_params['hot'] - lr * g_hot
    params = {'dense': dense, 'embedding': new_emb}
    metrics = {'loss': loss, 'learning_rate': lr}
    return state.replace(step=state.step + 1, params=params), metrics

  def eval_step(self, state, batch):
    logits = self.logits(state.params, batch)
    valid = batch['mask'].astype(jnp.float32)
    return {'loss_sum': jnp.sum(bce_with_logits(logits, batch['label'])
                                * valid),
            'examples': jnp.sum(valid)}

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    n = max(float(sums['examples']), 1.0)
    out = {'eval_loss': float(sums['loss_sum']) / n,
           'eval_examples': int(sums['examples'])}
    if 'auc' in sums:
      out[self.metric] = float(sums['auc'])
    return out

  def make_evaluator(self, mesh, abstract_state):
    return AUCEvaluator(self, mesh, abstract_state)

  # --- benchmarking -------------------------------------------------------------
  def bench_batch(self, global_batch, seed):
    """Indices drawn with Criteo's skew (a power law over each table's
    rows), so the hot-row option sees a realistic hit rate."""
    rng = np.random.default_rng(seed)
    sizes = np.asarray(self.model_cfg.table_sizes, np.float64)
    u = rng.random((global_batch, len(sizes)))
    sparse = np.minimum((sizes * u ** 4).astype(np.int64),
                        sizes.astype(np.int64) - 1)
    return {'dense': np.log1p(rng.poisson(3.0, (global_batch, NUM_DENSE))
                              ).astype(np.float32),
            'sparse': sparse.astype(np.int32),
            'label': (rng.random(global_batch) < 0.25).astype(np.float32)}

  def flops_per_example(self):
    """Matmul FLOPs of one training example (x3 for forward and backward):
    2 per MLP weight, and the interaction's 2 * (T+1)^2 * D products."""
    cfg = self.model_cfg
    mlp = dlrm_model.mlp_param_count(cfg)
    n = cfg.num_tables + 1
    return 3.0 * (2 * mlp + 2 * n * n * cfg.embed_dim)

  def count_params(self, params) -> int:
    """MLP parameters plus the tables' rows (not the stack's padding nor
    the replicated copies of hot rows)."""
    dense = sum(int(x.size) for x in jax.tree.leaves(params['dense']))
    return dense + sum(self.model_cfg.table_sizes) * self.model_cfg.embed_dim

  def bench_info(self) -> dict[str, Any]:
    """Embedding traffic per training example, for jaxperf.bench."""
    info = {f'embedding_bytes_{k}': v
            for k, v in self.emb.bytes_per_sample(
                int(self.config.global_batch_size)).items()}
    info.update(embedding_layout=self.emb.layout.mode,
                hot_rows=int(self.emb.hot_ids.size),
                replicated_tables=len(self.emb.replicated_tables),
                embedding_rows_per_device=self.emb.layout.rows_per_shard)
    return info

  # --- MLPerf logging ----------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    lr = float(c.base_learning_rate)
    return {
        'global_batch_size': int(c.global_batch_size),
        'gradient_accumulation_steps': 1,
        'opt_base_learning_rate': lr,
        'sgd_opt_base_learning_rate': lr,
        'opt_learning_rate_warmup_steps': int(c.warmup_steps),
        'lr_decay_start_steps': int(c.decay_start_step),
        'sgd_opt_learning_rate_decay_steps': int(c.decay_steps),
        'sgd_opt_learning_rate_decay_poly_power': int(c.poly_power),
    }

  def initialized_tensors(self, state: TrainState) -> list[str]:
    cfg = self.model_cfg
    return (['embeddings']
            + [f'bottom_mlp_dense{i + 1}' for i in range(len(cfg.bottom_mlp))]
            + [f'top_mlp_dense{i + 1}' for i in range(len(cfg.top_mlp))])

  # --- weights in and out ---------------------------------------------------------
  def tables(self, state: TrainState) -> list[np.ndarray]:
    """The current tables on the host, one array per feature."""
    return self.emb.to_tables(state.params['embedding'])


class AUCEvaluator:
  """Probabilities for the whole eval split, then one exact AUC on the host.

  Each eval batch is a global array split over all devices; the compiled
  function returns the batch's probabilities, labels and mask replicated, so
  every process computes the same AUC from the same scores.
  """

  def __init__(self, workload: DLRM, mesh, abstract_state):
    self.w = workload

    def fn(params, batch):
      logits = workload.logits(params, batch)
      loss = bce_with_logits(logits, batch['label'])
      return jax.nn.sigmoid(logits), batch['label'], batch['mask'], loss

    self.loop = ReplicatedEval(workload, mesh, fn, abstract_state.params,
                               slice_key='label')

  def __call__(self, state, eval_ds) -> dict[str, float]:
    from jaxperf import metrics  # pylint: disable=g-import-not-at-top
    parts = self.loop.outputs(state.params, eval_ds, self._collect)
    if parts:
      s, y, loss = (np.concatenate(c) for c in zip(*parts))
    else:
      s = y = loss = np.zeros([0], np.float32)
    return self.w.eval_result({'auc': metrics.auc(s, y),
                               'loss_sum': float(np.sum(loss, dtype=np.float64)),
                               'examples': int(s.size)})

  @staticmethod
  def _collect(out):
    p, y, m, loss = (np.asarray(x) for x in out)
    return p[m], y[m], loss[m]
