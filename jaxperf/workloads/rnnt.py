"""RNN-T speech recognition on LibriSpeech (MLPerf benchmark "rnnt"): word
error rate 0.058 on dev-clean.

As the reference (rnn_speech_recognition/pytorch, train.py and
scripts/train.sh):

* data: train-clean-100 + train-clean-360 + train-other-500 (utterances of
  at most 16.7 s), dev-clean for evaluation, WAVs + JSON manifests as its
  preprocessing writes them, the librispeech1023 sentencepiece tokenizer
  (1023 labels, blank last); speed perturbation 0.85-1.15, SpecAugment,
  log-mel features and frame splicing on host workers (jaxperf.data.speech);
* loss: the transducer loss (jaxperf.losses.rnnt_loss), the mean over the
  batch's utterances, micro-batches averaged under gradient accumulation;
* optimizer: LAMB (gradients clipped to global norm 1 inside, weight decay
  1e-3 and the trust ratio on every tensor, epsilon 1e-9, betas 0.9 /
  0.999), learning rate 0.004 for a global batch of 1024 with the
  reference's warmup (6 epochs) / hold (40) / exponential decay (0.935 an
  epoch, floor 1e-5), `optim.rnnt_lr_schedule`;
* evaluation: an exponential moving average of the weights (0.999, updated
  after every step) decodes greedily (jaxperf.decoding.greedy_decode,
  300 symbols per utterance at most); WER by jaxperf.metrics.wer over the
  detokenized transcripts.

Batches come in a few static shapes (shape buckets, see
jaxperf.data.speech); one program is compiled per shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxperf import decoding, losses, optim
from jaxperf.config import Config
from jaxperf.errors import ConfigError, DataError
from jaxperf.models import rnnt as rnnt_model
from jaxperf.workloads.base import (ReplicatedEval, Schedule, TrainState,
                                    Workload, accumulated_grads,
                                    accumulation_steps)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}
FEATURES = rnnt_model.IN_FEATURES


class RNNT(Workload):
  name = 'rnnt'
  benchmark = 'rnnt'
  metric = 'wer'
  higher_is_better = False
  description = 'RNN-T speech recognition, LibriSpeech, word error rate'
  # On a CPU: 4-second utterances with 30 labels in one micro-batch (the
  # full 15 s batch of 16 takes minutes a step there).
  bench_cpu_overrides = {'bench_seconds': 4.0, 'bench_labels': 30,
                         'gradient_accumulation_steps': 1}

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    if c.dtype not in _DTYPES:
      raise ConfigError(f'dtype={c.dtype!r}: expected one of {list(_DTYPES)}')
    for key in ('num_classes', 'enc_hidden', 'enc_pre_layers',
                'enc_post_layers', 'stack_time_factor', 'pred_hidden',
                'pred_layers', 'joint_hidden', 'global_batch_size',
                'eval_batch_size', 'shape_buckets'):
      if int(c[key]) < 1:
        raise ConfigError(f'{key}={c[key]}: expected >= 1')
    if int(c.num_classes) < 2:
      raise ConfigError(f'num_classes={c.num_classes}: expected >= 2 (labels '
                        f'and the blank)')
    self.accumulation = accumulation_steps(c)
    if not 0.0 <= float(c.ema) < 1.0:
      raise ConfigError(f'ema={c.ema}: expected a decay in [0, 1)')
    speed = c.speed_perturbation
    if speed is not None:
      if (not isinstance(speed, (list, tuple)) or len(speed) != 2
          or not 0 < float(speed[0]) <= float(speed[1])):
        raise ConfigError(f'speed_perturbation={speed}: expected [min, max] '
                          f'rates with 0 < min <= max, or null')
    self.model = rnnt_model.RNNT(
        num_classes=int(c.num_classes), in_features=FEATURES,
        enc_hidden=int(c.enc_hidden), enc_pre_layers=int(c.enc_pre_layers),
        enc_post_layers=int(c.enc_post_layers),
        stack_time_factor=int(c.stack_time_factor),
        pred_hidden=int(c.pred_hidden), pred_layers=int(c.pred_layers),
        joint_hidden=int(c.joint_hidden), enc_dropout=float(c.enc_dropout),
        pred_dropout=float(c.pred_dropout),
        joint_dropout=float(c.joint_dropout),
        forget_gate_bias=float(c.forget_gate_bias),
        hidden_hidden_bias_scale=float(c.hidden_hidden_bias_scale),
        weights_init_scale=float(c.weights_init_scale),
        dtype=_DTYPES[c.dtype])
    self.tokenizer = None
    self.mesh = None
    self.shapes: dict[bool, list[tuple[int, int]]] = {}
    self._tx = None
    self._lr = None

  @property
  def blank(self) -> int:
    return int(self.config.num_classes) - 1

  # --- data --------------------------------------------------------------------
  def augmentation(self):
    from jaxperf.data import speech  # pylint: disable=g-import-not-at-top
    c = self.config
    spec = None
    if int(c.spec_augment_freq_masks) or int(c.spec_augment_time_masks):
      spec = dict(freq_masks=int(c.spec_augment_freq_masks),
                  min_freq=int(c.spec_augment_min_freq),
                  max_freq=int(c.spec_augment_max_freq),
                  time_masks=int(c.spec_augment_time_masks),
                  min_time=c.spec_augment_min_time,
                  max_time=c.spec_augment_max_time)
    speed = c.speed_perturbation
    return speech.Augmentation(
        speed=None if speed is None else (float(speed[0]), float(speed[1])),
        spec_augment=spec, trim_silence=bool(c.trim_silence),
        dither=float(c.dither))

  def datasets(self, data_dir, seed):
    from jaxperf.data import librispeech, speech  # pylint: disable=g-import-not-at-top
    c = self.config
    if data_dir is None:
      self.tokenizer = librispeech.CharTokenizer()
      train = speech.SyntheticClips(int(c.synthetic_train_samples),
                                    self.tokenizer, seed=seed)
      evals = speech.SyntheticClips(int(c.synthetic_eval_samples),
                                    self.tokenizer, seed=seed,
                                    first=int(c.synthetic_train_samples))
    else:
      data_dir = os.path.expanduser(str(data_dir))
      if not os.path.isdir(data_dir):
        raise DataError(f'--data-dir {data_dir}: not a directory')
      self.tokenizer = librispeech.Tokenizer(
          os.path.join(data_dir, str(c.tokenizer_model)))
      train = speech.LibriSpeechClips(
          data_dir, list(c.train_manifests), self.tokenizer,
          max_duration=c.max_duration)
      evals = speech.LibriSpeechClips(data_dir, list(c.eval_manifests),
                                      self.tokenizer)
    if self.tokenizer.num_labels + 1 != int(c.num_classes):
      raise ConfigError(
          f'num_classes={c.num_classes}: the tokenizer has '
          f'{self.tokenizer.num_labels} labels, so the model needs '
          f'{self.tokenizer.num_labels + 1} classes (labels and the blank)')
    workers = int(c.data_workers)
    train_ds = speech.SpeechData(
        train, train=True, augment=self.augmentation(),
        num_buckets=int(c.num_buckets),
        shape_bucket_count=int(c.shape_buckets),
        accumulation=self.accumulation, seed=seed,
        num_workers=workers)
    eval_ds = speech.SpeechData(
        evals, train=False, augment=self.augmentation(),
        shape_bucket_count=int(c.eval_shape_buckets), seed=seed,
        num_workers=workers)
    self.shapes = {True: train_ds.shapes, False: eval_ds.shapes}
    return train_ds, eval_ds

  def _bench_shape(self) -> tuple[int, int]:
    """(frames, labels) of a batch when no data is open (benchmarks):
    utterances of bench_seconds with bench_labels labels."""
    from jaxperf.data import speech  # pylint: disable=g-import-not-at-top
    c = self.config
    frames = int(speech.spliced_frames(
        round(float(c.bench_seconds) * 16000)))
    return frames, int(c.bench_labels)

  def batch_specs(self, global_batch, train):
    shapes = self.shapes.get(train) or [self._bench_shape()]
    return [self._spec(global_batch, train, f, u) for f, u in shapes]

  def batch_spec(self, global_batch, train):
    return self.batch_specs(global_batch, train)[-1]

  def _spec(self, b, train, frames, labels):
    i32 = jnp.int32
    spec = {'features': jax.ShapeDtypeStruct((b, frames, FEATURES),
                                             jnp.float32),
            'feature_lengths': jax.ShapeDtypeStruct((b,), i32),
            'labels': jax.ShapeDtypeStruct((b, labels), i32),
            'label_lengths': jax.ShapeDtypeStruct((b,), i32)}
    if not train:
      spec['index'] = jax.ShapeDtypeStruct((b,), i32)
      spec['mask'] = jax.ShapeDtypeStruct((b,), jnp.bool_)
    return spec

  def check_mesh(self, mesh) -> None:
    from jaxperf.sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    other = [a for a in mesh.axis_names
             if a not in mesh_lib.batch_axes(mesh) and mesh.shape[a] > 1]
    if other:
      raise ConfigError(f'--mesh {mesh_lib.describe(mesh)}: rnnt is data '
                        f'parallel only; axes {other} would split the model')
    mesh_lib.check_micro_batch_divides(self.config, self.accumulation, mesh)
    self.mesh = mesh

  def _dp_axes(self) -> tuple[str, ...]:
    """The mesh axes batches are split over; () on one device."""
    from jaxperf.sharding import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    if self.mesh is None or self.mesh.devices.size == 1:
      return ()
    return mesh_lib.batch_axes(self.mesh)

  def setup(self, train_examples):
    """An epoch is floor(N / global batch) steps (the sampler drops the
    rest; see SpeechData.steps_per_epoch), which the learning-rate schedule
    counts in."""
    c = self.config
    gbs = int(c.global_batch_size)
    steps = train_examples // gbs
    if steps < 1:
      raise ConfigError(f'global_batch_size={gbs} is larger than the '
                        f'training set ({train_examples} utterances)')
    self.schedule = Schedule(steps * gbs, gbs)
    self._lr = optim.rnnt_lr_schedule(
        float(c.base_learning_rate), steps, int(c.warmup_epochs),
        int(c.hold_epochs), float(c.lr_exp_gamma), float(c.min_learning_rate))
    self._tx = optim.lamb(
        self._lr, b1=float(c.lamb_beta_1), b2=float(c.lamb_beta_2),
        eps=float(c.lamb_epsilon), weight_decay=float(c.weight_decay),
        decay_mask=None,
        clip_norm=None if c.clip_norm is None else float(c.clip_norm))
    return self.schedule

  # --- state -------------------------------------------------------------------
  def init_params(self, key):
    f = jnp.zeros((1, 4, FEATURES), jnp.float32)
    return self.model.init(key, f, jnp.asarray([4]),
                           jnp.zeros((1, 2), jnp.int32))['params']

  def init_state(self, rng):
    key = jax.random.wrap_key_data(rng)
    params = self.init_params(key)
    # The EMA starts as a copy of the initial weights (the reference's
    # deepcopy of the model).
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      model_state={'ema': jax.tree.map(jnp.copy, params)},
                      opt_state=self._tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  def count_params(self, params):
    return sum(int(x.size) for x in jax.tree.leaves(params))

  # --- steps -------------------------------------------------------------------
  def loss(self, params, batch, *, rng=None):
    """The mean over the batch's utterances of their transducer loss."""
    train = rng is not None
    logits, lengths = self.model.apply(
        {'params': params}, batch['features'], batch['feature_lengths'],
        batch['labels'], deterministic=not train,
        rngs={'dropout': rng} if train else None)
    per = losses.rnnt_loss(logits, batch['labels'], lengths,
                           batch['label_lengths'], blank=self.blank)
    return jnp.mean(per)

  def train_step(self, state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def grads_of(params, micro, key):
      loss, grads = jax.value_and_grad(
          lambda p: self.loss(p, micro, rng=key))(params)
      return (loss, {}), grads

    (loss, _), grads = accumulated_grads(grads_of, state.params, batch,
                                         self.accumulation, rng)
    updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = float(self.config.ema)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                       state.model_state['ema'], params)
    metrics = {'loss': loss, 'learning_rate': self._lr(state.step),
               'grad_norm': jnp.sqrt(sum(jnp.sum(jnp.square(g))
                                         for g in jax.tree.leaves(grads)))}
    return state.replace(step=state.step + 1, params=params,
                         model_state={'ema': ema}, opt_state=opt_state), \
        metrics

  def eval_step(self, state, batch):
    """Greedy decoding with the EMA weights: label ids per utterance.
    Each device decodes its own rows in its own loop (inside shard_map),
    so the loop's steps need no collectives."""
    c = self.config

    def decode(params, features, lengths):
      return decoding.greedy_decode(
          self.model, {'params': params}, features, lengths,
          max_symbols_per_step=int(c.max_symbols_per_step),
          max_symbols_per_sample=int(c.max_symbols_per_sample))

    axes = self._dp_axes()
    if axes:
      decode = jax.shard_map(decode, mesh=self.mesh,
                             in_specs=(P(), P(axes), P(axes)),
                             out_specs=(P(axes), P(axes)), check_vma=False)
    labels, counts = decode(state.model_state['ema'], batch['features'],
                            batch['feature_lengths'])
    return {'labels': labels, 'counts': counts, 'index': batch['index'],
            'mask': batch['mask']}

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    return dict(sums)

  def make_evaluator(self, mesh, abstract_state):
    return WerEvaluator(self, mesh, abstract_state)

  # --- benchmarking --------------------------------------------------------------
  def bench_batch(self, global_batch, seed):
    """Random features of full length and random labels of full length
    (the cost of the LSTMs and the joint depends only on the shapes)."""
    rng = np.random.default_rng(seed)
    frames, labels = self._bench_shape()
    b = global_batch
    return {'features': rng.standard_normal((b, frames, FEATURES),
                                            np.float32),
            'feature_lengths': np.full((b,), frames, np.int32),
            'labels': rng.integers(0, self.blank, (b, labels), np.int32),
            'label_lengths': np.full((b,), labels, np.int32)}

  def bench_info(self):
    frames, labels = self._bench_shape()
    return {'feature_steps': frames, 'label_length': labels,
            'audio_seconds': float(self.config.bench_seconds)}

  def flops_per_example(self):
    """Matmul FLOPs of one training utterance of the bench shape (forward
    x 3): 8H(I + H) per LSTM layer and step, the joint 2(He + Hp)J per
    frame / label step and 2JC per lattice node."""
    c = self.config
    frames, labels = self._bench_shape()
    t2 = -(-frames // int(c.stack_time_factor))
    he, hp, j = int(c.enc_hidden), int(c.pred_hidden), int(c.joint_hidden)
    lstm = lambda i, h: 8 * h * (i + h)
    enc = frames * (lstm(FEATURES, he) + (int(c.enc_pre_layers) - 1)
                    * lstm(he, he))
    enc += t2 * (lstm(int(c.stack_time_factor) * he, he)
                 + (int(c.enc_post_layers) - 1) * lstm(he, he))
    pred = (labels + 1) * (lstm(hp, hp) * int(c.pred_layers))
    joint = (2 * he * j * t2 + 2 * hp * j * (labels + 1)
             + 2 * j * int(c.num_classes) * t2 * (labels + 1))
    return 3.0 * (enc + pred + joint)

  # --- MLPerf logging ----------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    speed = c.speed_perturbation or [1.0, 1.0]
    return {
        'global_batch_size': int(c.global_batch_size),
        'gradient_accumulation_steps': self.accumulation,
        'model_weights_initialization_scale': float(c.weights_init_scale),
        'opt_name': 'lamb',
        'opt_base_learning_rate': float(c.base_learning_rate),
        'opt_lamb_epsilon': float(c.lamb_epsilon),
        # The reference logs its exponential decay's gamma under this key.
        'opt_lamb_learning_rate_decay_poly_power': float(c.lr_exp_gamma),
        'opt_learning_rate_warmup_epochs': int(c.warmup_epochs),
        'opt_lamb_learning_rate_hold_epochs': int(c.hold_epochs),
        'opt_lamb_beta_1': float(c.lamb_beta_1),
        'opt_lamb_beta_2': float(c.lamb_beta_2),
        'opt_gradient_clip_norm': (float('inf') if c.clip_norm is None
                                   else float(c.clip_norm)),
        'opt_learning_rate_alt_decay_func': True,
        'opt_learning_rate_alt_warmup_func': True,
        'opt_lamb_learning_rate_min': float(c.min_learning_rate),
        'opt_weight_decay': float(c.weight_decay),
        'data_train_max_duration': (None if c.max_duration is None
                                    else float(c.max_duration)),
        'data_train_num_buckets': int(c.num_buckets),
        # The checker's spelling.
        'data_speed_perturbaton_min': float(speed[0]),
        'data_speed_perturbaton_max': float(speed[1]),
        'data_spec_augment_freq_n': int(c.spec_augment_freq_masks),
        'data_spec_augment_freq_min': int(c.spec_augment_min_freq),
        'data_spec_augment_freq_max': int(c.spec_augment_max_freq),
        'data_spec_augment_time_n': int(c.spec_augment_time_masks),
        'data_spec_augment_time_min': c.spec_augment_min_time,
        'data_spec_augment_time_max': c.spec_augment_max_time,
        'model_eval_ema_factor': float(c.ema),
        'eval_max_prediction_symbols': int(c.max_symbols_per_sample),
    }

  def initialized_tensors(self, state: TrainState) -> list[str]:
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    del state
    return interop.rnnt_checker_tensor_names()


class WerEvaluator:
  """Greedy decoding of every evaluation utterance on the devices (EMA
  weights), then WER on the host against the detokenized transcripts."""

  def __init__(self, workload: RNNT, mesh, abstract_state):
    self.w = workload
    self.loop = ReplicatedEval(workload, mesh, workload.eval_step,
                               abstract_state, slice_key='index')

  def __call__(self, state, eval_ds) -> dict[str, float]:
    from jaxperf import metrics  # pylint: disable=g-import-not-at-top
    decoded = {}
    for out in self.loop.outputs(state, eval_ds, lambda out: out):
      keep = np.asarray(out['mask'])
      for i, ids, n in zip(np.asarray(out['index'])[keep],
                           np.asarray(out['labels'])[keep],
                           np.asarray(out['counts'])[keep]):
        decoded[int(i)] = self.w.tokenizer.decode(ids[:int(n)].tolist())
    texts = eval_ds.clips.texts
    if len(decoded) != len(texts):
      raise RuntimeError(f'evaluation decoded {len(decoded)} of '
                         f'{len(texts)} utterances')
    hyps = [decoded[i] for i in range(len(texts))]
    return {self.w.metric: float(metrics.wer(texts, hyps)),
            'eval_utterances': len(texts)}
