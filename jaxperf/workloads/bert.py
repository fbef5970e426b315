"""BERT-large pretraining (MLPerf benchmark "bert"): masked-LM accuracy 0.720.

MLPerf counts BERT's progress in training samples, not epochs: `epoch_num` in
the log is the number of samples seen, evaluation runs every
`eval_interval_samples` (the rules' formula
floor(0.05 * (230.23 * batch + 3e6) / 25000) * 25000 unless the config sets
it) and a run lasts at most `max_steps` steps (the learning-rate schedule's
opt_learning_rate_training_steps). The Schedule here therefore has one sample
as its "epoch".

The loss is the reference's: the masked-LM cross-entropy averaged over the
masked predictions with masked_lm_weights (denominator + 1e-5) plus the
next-sentence cross-entropy averaged over sequences. Batches are in the packed
form (see models/bert.py); unpacked data is the one-sequence-per-row case, so
packed and unpacked data train the same model with the same step.

Sharding: parameters and activations carry logical axis names and
`sharding.logical.TRANSFORMER_RULES` (with the config's `logical_axis_rules`
overriding entries) maps them onto the mesh, so `--mesh
data=8`, `fsdp=8` or `data=2,tensor=4` choose data, fully sharded or tensor
parallelism for the same program.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxperf import optim
from jaxperf.config import Config
from jaxperf.errors import ConfigError
from jaxperf.models import bert as bert_model
from jaxperf.sharding import logical
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads.base import (Schedule, TrainState, Workload,
                                    accumulated_grads, accumulation_steps)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}
BATCH_KEYS_INT = ('input_ids', 'segment_ids', 'sequence_ids', 'position_ids')


def mlperf_eval_interval(global_batch: int) -> int:
  """Samples between evaluations, as the MLPerf rules define them."""
  return int(0.05 * (230.23 * global_batch + 3_000_000) // 25_000) * 25_000


class Bert(Workload):
  name = 'bert'
  benchmark = 'bert'
  metric = 'masked_lm_accuracy'
  higher_is_better = True
  description = 'BERT-large pretraining, Wikipedia, masked-LM accuracy'

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    if c.optimizer != 'lamb':
      raise ConfigError(f'optimizer={c.optimizer!r}: the reference uses lamb')
    if c.dtype not in _DTYPES:
      raise ConfigError(f'dtype={c.dtype!r}: expected one of {list(_DTYPES)}')
    if c.attention not in ('auto', 'xla', 'cudnn'):
      raise ConfigError(f'attention={c.attention!r}: expected auto, xla or '
                        f'cudnn')
    try:
      self.model_cfg = bert_model.BertConfig(
          vocab_size=int(c.vocab_size), hidden_size=int(c.hidden_size),
          num_layers=int(c.num_layers), num_heads=int(c.num_heads),
          intermediate_size=int(c.intermediate_size),
          max_position=int(c.max_position),
          hidden_dropout=float(c.hidden_dropout),
          attention_dropout=float(c.attention_dropout))
    except ValueError as e:
      raise ConfigError(f'model config: {e}') from None
    self.seq_len = int(c.max_seq_length)
    if not 0 < self.seq_len <= self.model_cfg.max_position:
      raise ConfigError(f'max_seq_length={self.seq_len}: expected 1..'
                        f'max_position ({self.model_cfg.max_position})')
    self.max_sequences = int(c.max_sequences_per_row) if c.packed else 1
    if self.max_sequences < 1:
      raise ConfigError(f'max_sequences_per_row={c.max_sequences_per_row}: '
                        f'expected >= 1')
    # Prediction slots per row: a packed row of K sequences may need up to
    # K - 1 more than one sequence (see jaxperf.data.bert.row_predictions).
    from jaxperf.data import bert as bert_data  # pylint: disable=g-import-not-at-top
    self.max_predictions = bert_data.row_predictions(
        int(c.max_predictions_per_seq), self.max_sequences)
    if int(c.max_steps) < 1:
      raise ConfigError(f'max_steps={c.max_steps}: expected >= 1')
    self.accumulation = accumulation_steps(c)
    self.rules = logical.merge_rules(logical.TRANSFORMER_RULES,
                                     c.logical_axis_rules,
                                     flag='logical_axis_rules')
    self.mesh = None
    self.model = self._build_model(None)
    self._tx = None
    self._lr = None

  def _build_model(self, mesh) -> bert_model.BertForPreTraining:
    c = self.config
    impl = c.attention
    if impl == 'auto':
      impl = ('cudnn' if jax.default_backend() == 'gpu'
              and c.dtype in ('bfloat16', 'float16') else 'xla')
    return bert_model.BertForPreTraining(
        cfg=self.model_cfg, dtype=_DTYPES[c.dtype],
        attention_impl=None if impl == 'xla' else impl,
        shard=logical.activation_constraint(mesh, self.rules))

  # --- data --------------------------------------------------------------------
  def datasets(self, data_dir, seed):
    from jaxperf.data import bert as bert_data  # pylint: disable=g-import-not-at-top
    c = self.config
    if data_dir is None:
      return bert_data.synthetic_bert(
          int(c.synthetic_train_samples), int(c.synthetic_eval_samples),
          vocab_size=self.model_cfg.vocab_size, seq_len=self.seq_len,
          max_predictions=int(c.max_predictions_per_seq),
          max_sequences_per_row=self.max_sequences,
          packed=bool(c.packed), seed=seed)
    return bert_data.open_bert(
        data_dir, seq_len=self.seq_len,
        max_predictions=int(c.max_predictions_per_seq),
        max_sequences_per_row=self.max_sequences, packed=bool(c.packed),
        vocab_size=self.model_cfg.vocab_size, seed=seed,
        train_glob=c.train_files, eval_glob=c.eval_files)

  def batch_spec(self, global_batch, train):
    b, s = global_batch, self.seq_len
    p = self.max_predictions
    k = self.max_sequences
    i32, f32 = jnp.int32, jnp.float32
    spec = {key: jax.ShapeDtypeStruct((b, s), i32) for key in BATCH_KEYS_INT}
    spec.update(
        masked_lm_positions=jax.ShapeDtypeStruct((b, p), i32),
        masked_lm_ids=jax.ShapeDtypeStruct((b, p), i32),
        masked_lm_weights=jax.ShapeDtypeStruct((b, p), f32),
        next_sentence_positions=jax.ShapeDtypeStruct((b, k), i32),
        next_sentence_labels=jax.ShapeDtypeStruct((b, k), i32),
        next_sentence_weights=jax.ShapeDtypeStruct((b, k), f32))
    if not train:
      spec['mask'] = jax.ShapeDtypeStruct((b,), jnp.bool_)
    return spec

  def check_mesh(self, mesh) -> None:
    bad = [a for a in mesh.axis_names if a not in ('data', 'fsdp', 'tensor')
           and mesh.shape[a] > 1]
    if bad:
      raise ConfigError(f'--mesh {mesh_lib.describe(mesh)}: bert uses the '
                        f'data, fsdp and tensor axes; {bad} would replicate '
                        f'the work')
    tensor = mesh.shape.get('tensor', 1)
    if self.model_cfg.num_heads % tensor:
      raise ConfigError(f'--mesh {mesh_lib.describe(mesh)}: tensor={tensor} '
                        f'does not divide num_heads={self.model_cfg.num_heads}')
    mesh_lib.check_micro_batch_divides(self.config, self.accumulation, mesh)
    self.mesh = mesh
    self.model = self._build_model(mesh)

  def setup(self, train_examples):
    del train_examples  # BERT's schedule is in samples, whatever the set size
    c = self.config
    gbs = int(c.global_batch_size)
    self.schedule = Schedule(1, gbs, unit='samples')
    self._lr = optim.bert_lr_schedule(
        float(c.base_learning_rate), int(c.warmup_steps), int(c.max_steps),
        start_warmup_step=int(c.start_warmup_step), power=float(c.poly_power))
    self._tx = optim.lamb(
        self._lr, b1=float(c.lamb_beta_1), b2=float(c.lamb_beta_2),
        eps=float(c.lamb_epsilon), weight_decay=float(c.weight_decay),
        decay_mask=optim.bert_decay_mask, clip_norm=float(c.clip_norm))
    return self.schedule

  def train_length(self) -> int:
    return int(self.config.max_steps) * int(self.config.global_batch_size)

  def eval_interval(self) -> int:
    every = self.config.eval_interval_samples
    return (mlperf_eval_interval(int(self.config.global_batch_size))
            if every is None else int(every))

  def eval_epochs(self, train_epochs):
    """Sample counts after which to evaluate: every eval_interval from 0 (the
    evaluation at 0 skipped), and at the end."""
    every = self.eval_interval()
    if every < 1:
      raise ConfigError(f'eval_interval_samples={every}: expected >= 1')
    # Evaluate when the first step at or past each multiple has run.
    gbs = int(self.config.global_batch_size)
    points = []
    for s in range(every, train_epochs + 1, every):
      done = -(-s // gbs) * gbs
      if not points or done > points[-1]:
        points.append(done)
    if not points or points[-1] != train_epochs:
      points.append(train_epochs)
    return points

  # --- state -------------------------------------------------------------------
  def _dummy_inputs(self):
    s, p, k = self.seq_len, self.max_predictions, self.max_sequences
    z = lambda n: jnp.zeros((1, n), jnp.int32)
    return (z(s), z(s), z(s), z(s), z(p), z(k))

  def boxed_params(self, rng):
    """Parameters with their logical axis names (nn.LogicallyPartitioned)."""
    return self.model.init(rng, *self._dummy_inputs())['params']

  def init_state(self, rng):
    key = jax.random.wrap_key_data(rng)
    params = nn.unbox(self.boxed_params(key))
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      model_state={}, opt_state=self._tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  def state_sharding(self, abstract_state, mesh):
    """Parameters and their optimizer moments sharded by their logical names;
    step, counters and rng replicated."""
    boxed = jax.eval_shape(self.boxed_params, jax.random.key(0))
    param_sh = logical.tree_shardings(boxed, mesh, self.rules)
    opt_boxed = jax.eval_shape(self._tx.init, boxed)
    opt_sh = logical.tree_shardings(opt_boxed, mesh, self.rules)
    rep = mesh_lib.replicated(mesh)
    sh = TrainState(step=rep, params=param_sh, model_state={},
                    opt_state=opt_sh, rng=rep)
    # Same structure as the unboxed state (boxes are pytree nodes).
    return jax.tree.unflatten(jax.tree.structure(abstract_state),
                              jax.tree.leaves(sh))

  def load_initial_weights(self, state, shardings):
    """Parameters from `init_checkpoint` (the MLPerf phase-1 checkpoint): a
    TF1 checkpoint prefix (model.ckpt-28252, read with numpy) or a
    PyTorch state_dict file of HF BertForPreTraining. The optimizer moments
    start at zero, as the reference does not load them."""
    path = self.config.init_checkpoint
    if not path:
      return state
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    path = os.path.expanduser(str(path))
    kwargs = {'num_heads': self.model_cfg.num_heads}
    if os.path.exists(path + '.index'):
      variables = interop.from_tf_checkpoint('bert', path, **kwargs)
    elif os.path.isfile(path):
      import torch  # pylint: disable=g-import-not-at-top
      sd = torch.load(path, map_location='cpu', weights_only=True)
      if isinstance(sd, dict) and 'model' in sd and isinstance(sd['model'],
                                                              dict):
        sd = sd['model']
      variables = interop.from_torch('bert', sd, **kwargs)
    else:
      raise ConfigError(
          f'init_checkpoint={path!r}: expected a TF checkpoint prefix (with '
          f'{path}.index next to it) or a PyTorch state_dict file')
    params = variables['params']
    want = jax.tree.map(lambda x: (x.shape, x.dtype), state.params)
    got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
    if jax.tree.structure(want) != jax.tree.structure(got) or any(
        w[0] != g[0] for w, g in zip(jax.tree.leaves(want, is_leaf=_is_pair),
                                     jax.tree.leaves(got, is_leaf=_is_pair))):
      raise ConfigError(
          f'init_checkpoint={path!r}: its tensors do not match the configured '
          f'model (num_layers={self.model_cfg.num_layers}, hidden_size='
          f'{self.model_cfg.hidden_size}, vocab_size='
          f'{self.model_cfg.vocab_size})')
    params = jax.tree.map(
        lambda x, s, ref: jax.device_put(np.asarray(x, ref.dtype), s),
        params, shardings.params, state.params)
    return state.replace(params=params)

  # --- steps -------------------------------------------------------------------
  def _apply(self, params, batch, *, train: bool, rng=None):
    return self.model.apply(
        {'params': params}, batch['input_ids'], batch['segment_ids'],
        batch['sequence_ids'], batch['position_ids'],
        batch['masked_lm_positions'], batch['next_sentence_positions'],
        deterministic=not train,
        rngs={'dropout': rng} if rng is not None else None)

  def losses(self, params, batch, *, train: bool, rng=None):
    """(total loss, aux): the reference's MLM + NSP pretraining loss."""
    mlm_logits, nsp_logits = self._apply(params, batch, train=train, rng=rng)
    out = pretraining_losses(mlm_logits, nsp_logits, batch)
    return out['loss'], out

  def train_step(self, state, batch):
    """One LAMB step. With gradient_accumulation_steps = n > 1 the batch is
    split into n micro-batches whose losses and gradients are averaged (the
    reference's steps_per_update), so a global batch larger than the devices
    hold still takes one optimizer step."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    has_dropout = (self.model_cfg.hidden_dropout > 0
                   or self.model_cfg.attention_dropout > 0)
    n_acc = self.accumulation

    def grads_of(params, micro, key):
      def loss_fn(p):
        return self.losses(p, micro, train=True,
                           rng=key if has_dropout else None)
      return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, aux), grads = accumulated_grads(grads_of, state.params, batch,
                                           n_acc, rng)
    mlm_loss, nsp_loss = aux['mlm_loss'], aux['nsp_loss']
    updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'mlm_loss': mlm_loss, 'nsp_loss': nsp_loss,
               'learning_rate': self._lr(state.step),
               'grad_norm': jnp.sqrt(sum(jnp.sum(jnp.square(g))
                                         for g in jax.tree.leaves(grads)))}
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  def eval_step(self, state, batch):
    mlm_logits, nsp_logits = self._apply(state.params, batch, train=False)
    valid = batch['mask'].astype(jnp.float32)[:, None]
    w = batch['masked_lm_weights'] * valid
    pred = jnp.argmax(mlm_logits, axis=-1)
    correct = (pred == batch['masked_lm_ids']).astype(jnp.float32)
    logp = jax.nn.log_softmax(mlm_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch['masked_lm_ids'][..., None],
                               axis=-1)[..., 0]
    nw = batch['next_sentence_weights'] * valid
    nsp_correct = (jnp.argmax(nsp_logits, -1) == batch['next_sentence_labels'])
    return {'mlm_correct': jnp.sum(correct * w), 'mlm_weight': jnp.sum(w),
            'mlm_nll': jnp.sum(nll * w),
            'nsp_correct': jnp.sum(nsp_correct.astype(jnp.float32) * nw),
            'nsp_weight': jnp.sum(nw),
            'examples': jnp.sum(batch['mask'].astype(jnp.float32))}

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    w = max(float(sums['mlm_weight']), 1e-9)
    nw = max(float(sums['nsp_weight']), 1e-9)
    return {self.metric: float(sums['mlm_correct']) / w,
            'mlm_loss': float(sums['mlm_nll']) / w,
            'nsp_accuracy': float(sums['nsp_correct']) / nw,
            'eval_examples': int(sums['examples'])}

  # --- benchmarking -------------------------------------------------------------
  def bench_batch(self, global_batch, seed):
    """Rows of real tokens for timing: unpacked, one full-length sequence
    per row; packed, max_sequences_per_row equal sequences filling the row.
    (Attention and the dense layers cost the same whatever the tokens, so
    only the layout matters.)"""
    rng = np.random.default_rng(seed)
    b, s, p, k = (global_batch, self.seq_len, self.max_predictions,
                  self.max_sequences)
    n = s // k
    seq = np.minimum(np.arange(s) // n, k - 1) + 1
    pos = np.arange(s) - (seq - 1) * n
    return {
        'input_ids': rng.integers(1, self.model_cfg.vocab_size, (b, s)),
        'segment_ids': np.broadcast_to((pos >= n // 2).astype(np.int32),
                                       (b, s)),
        'sequence_ids': np.broadcast_to(seq, (b, s)),
        'position_ids': np.broadcast_to(pos, (b, s)),
        'masked_lm_positions': np.sort(rng.integers(0, s, (b, p)), axis=1),
        'masked_lm_ids': rng.integers(1, self.model_cfg.vocab_size, (b, p)),
        'masked_lm_weights': np.ones((b, p), np.float32),
        'next_sentence_positions': np.broadcast_to(np.arange(k) * n, (b, k)),
        'next_sentence_labels': rng.integers(0, 2, (b, k)),
        'next_sentence_weights': np.ones((b, k), np.float32),
    }

  def flops_per_example(self):
    """Matmul FLOPs of one training row (forward x 3 for forward and
    backward): per layer and token 8H^2 (Q, K, V, output projections) + 4HF
    (feed-forward) + 4SH (scores and context over the S keys); the MLM head
    2H^2 + 2HV per prediction; pooler and NSP 2H^2 + 4H per sequence."""
    c = self.model_cfg
    h, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    s, p, k = self.seq_len, self.max_predictions, self.max_sequences
    per_token = c.num_layers * (8 * h * h + 4 * h * f + 4 * s * h)
    forward = s * per_token + p * (2 * h * h + 2 * h * v) + k * (2 * h * h
                                                                 + 4 * h)
    return 3.0 * forward

  # --- MLPerf logging ----------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    eps = float(c.lamb_epsilon)
    return {
        'global_batch_size': int(c.global_batch_size),
        'gradient_accumulation_steps': self.accumulation,
        'opt_name': 'lamb',
        'opt_base_learning_rate': float(c.base_learning_rate),
        'opt_learning_rate_training_steps': int(c.max_steps),
        'opt_learning_rate_warmup_steps': int(c.warmup_steps),
        'num_warmup_steps': int(c.warmup_steps),
        'start_warmup_step': int(c.start_warmup_step),
        'opt_lamb_beta_1': float(c.lamb_beta_1),
        'opt_lamb_beta_2': float(c.lamb_beta_2),
        'opt_lamb_weight_decay_rate': float(c.weight_decay),
        'opt_lamb_learning_rate_decay_poly_power': float(c.poly_power),
        # Tag 2.1.0 of the checker wants opt_epsilon, its later revisions
        # opt_lamb_epsilon: both are logged.
        'opt_epsilon': eps,
        'opt_lamb_epsilon': eps,
        'max_sequence_length': self.seq_len,
        'eval_interval_samples': self.eval_interval(),
    }

  def initialized_tensors(self, state: TrainState) -> list[str]:
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    return interop.bert_checker_tensor_names(self.model_cfg.num_layers)


def _is_pair(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def pretraining_losses(mlm_logits, nsp_logits, batch) -> dict[str, jax.Array]:
  """The reference's pretraining loss and its parts.

  mlm = sum(w * nll) / (sum(w) + 1e-5) over masked predictions;
  nsp = weighted mean of the next-sentence cross-entropy over sequences.
  """
  logp = jax.nn.log_softmax(mlm_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, batch['masked_lm_ids'][..., None],
                             axis=-1)[..., 0]
  w = batch['masked_lm_weights'].astype(jnp.float32)
  mlm = jnp.sum(nll * w) / (jnp.sum(w) + 1e-5)
  nlogp = jax.nn.log_softmax(nsp_logits.astype(jnp.float32), axis=-1)
  nsp_nll = -jnp.take_along_axis(
      nlogp, batch['next_sentence_labels'][..., None], axis=-1)[..., 0]
  nw = batch['next_sentence_weights'].astype(jnp.float32)
  nsp = jnp.sum(nsp_nll * nw) / jnp.maximum(jnp.sum(nw), 1.0)
  return {'loss': mlm + nsp, 'mlm_loss': mlm, 'nsp_loss': nsp,
          'mlm_nll': nll, 'nsp_nll': nsp_nll}
