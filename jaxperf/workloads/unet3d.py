"""3D U-Net on KiTS19 (MLPerf benchmark "unet3d").

Quality: mean DICE over kidney and tumor >= 0.908 on the 42 evaluation cases,
by sliding-window inference over whole volumes (128^3 windows, overlap 0.5,
Gaussian importance weighting), evaluated every `evaluate_every` epochs from
`start_eval_at`. Loss: the reference's (soft Dice over the foreground classes
+ cross-entropy) / 2. SGD with Nesterov momentum 0.9, a linear warmup per
epoch from `init_learning_rate` to `base_learning_rate`, then constant (or
multiplied by `lr_decay_factor` at each of `lr_decay_epochs`).

An epoch is floor(train_cases / global_batch) steps: the reference's loader
drops the last partial batch, so at batch 32 an epoch is 160 of the 168
cases, which is how its evaluation schedule (from 1050, every 21) arises.

Spatial partitioning: with a `spatial` mesh axis every volume's depth is
split over it, for training and for the sliding-window evaluation. XLA's SPMD
partitioner exchanges the convolution halos; instance norm, the loss and the
Dice sums reduce across the shards (tests/test_unet3d_spatial.py checks the
step against the unpartitioned one and reads the collectives in the HLO).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from jaxperf import losses, metrics, sliding_window
from jaxperf.config import Config
from jaxperf.errors import ConfigError
from jaxperf.models import unet3d as unet3d_model
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.sharding import spatial as spatial_lib
from jaxperf.workloads.base import Schedule, TrainState, Workload

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}
# Five stride-2 levels: every patch side must divide by 2^5.
_DOWNSAMPLING = 32


class UNet3D(Workload):
  name = 'unet3d'
  benchmark = 'unet3d'
  metric = 'mean_dice'
  higher_is_better = True
  description = '3D U-Net, KiTS19, mean DICE (kidney, tumor)'

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    if c.optimizer != 'sgd':
      raise ConfigError(f'optimizer={c.optimizer!r}: the reference uses sgd '
                        f'(with Nesterov momentum)')
    if c.dtype not in _DTYPES:
      raise ConfigError(f'dtype={c.dtype!r}: expected one of {list(_DTYPES)}')
    if c.activation not in unet3d_model.ACTIVATIONS:
      raise ConfigError(f'activation={c.activation!r}: expected one of '
                        f'{list(unet3d_model.ACTIVATIONS)}')
    if c.upsample not in ('projection', 'conv_transpose'):
      raise ConfigError(f'upsample={c.upsample!r}: expected projection or '
                        f'conv_transpose')
    if c.conv_wgrad not in ('auto', 'xla', 'matmul'):
      raise ConfigError(f'conv_wgrad={c.conv_wgrad!r}: expected auto, xla or '
                        f'matmul')
    if len(c.filters) != 5 or any(int(f) < 1 for f in c.filters):
      raise ConfigError(f'filters={list(c.filters)}: expected 5 positive '
                        f'widths (the reference: [32, 64, 128, 256, 320])')
    for key in ('input_shape', 'val_input_shape'):
      shape = tuple(c[key])
      if len(shape) != 3 or any(int(s) % _DOWNSAMPLING or int(s) < 1
                                for s in shape):
        raise ConfigError(
            f'{key}={list(shape)}: expected 3 sides (D, H, W), each a '
            f'positive multiple of {_DOWNSAMPLING} (the network halves them '
            f'five times)')
    if not 0.0 <= float(c.overlap) < 1.0:
      raise ConfigError(f'overlap={c.overlap}: expected 0 <= overlap < 1')
    if not 0.0 <= float(c.oversampling) <= 1.0:
      raise ConfigError(f'oversampling={c.oversampling}: expected a '
                        f'probability in [0, 1]')
    self.input_shape = tuple(int(s) for s in c.input_shape)
    self.roi_shape = tuple(int(s) for s in c.val_input_shape)
    self.model = self._build_model(None)
    self._tx = None

  def _build_model(self, mesh) -> unet3d_model.UNet3D:
    c = self.config
    spatial = 1 if mesh is None else spatial_lib.spatial_size(mesh)
    wgrad = (c.conv_wgrad if c.conv_wgrad != 'auto' else
             'matmul' if jax.default_backend() == 'cpu' and spatial == 1
             else 'xla')
    return unet3d_model.UNet3D(
        n_class=int(c.num_classes), filters=tuple(int(f) for f in c.filters),
        activation=c.activation, dtype=_DTYPES[c.dtype], wgrad=wgrad,
        upsample=c.upsample,
        constrain=None if mesh is None else
        spatial_lib.volume_constraint(mesh))

  # --- data --------------------------------------------------------------------
  def datasets(self, data_dir, seed):
    from jaxperf.data import kits19  # pylint: disable=g-import-not-at-top
    c = self.config
    if data_dir is None:
      return kits19.synthetic_kits19(
          int(c.synthetic_train_samples), int(c.synthetic_eval_samples),
          max_shape=tuple(c.synthetic_case_shape),
          patch_shape=self.input_shape, oversampling=float(c.oversampling),
          seed=seed, num_workers=int(c.data_workers))
    return kits19.open_kits19(
        data_dir, patch_shape=self.input_shape,
        oversampling=float(c.oversampling), seed=seed,
        num_workers=int(c.data_workers))

  def batch_spec(self, global_batch, train):
    shape = self.input_shape if train else self.roi_shape
    spec = {'image': jax.ShapeDtypeStruct((global_batch, *shape, 1),
                                          jnp.float32)}
    if train:
      spec['label'] = jax.ShapeDtypeStruct((global_batch, *shape), jnp.int32)
    return spec

  def batch_partition(self, mesh, train):
    """Batch over the data-parallel axes, depth over `spatial`."""
    depth = (self.input_shape if train else self.roi_shape)[0]
    spec = spatial_lib.volume_spec(mesh, depth)
    return {k: spec for k in self.batch_spec(0, train)}

  def check_mesh(self, mesh) -> None:
    """Bad --mesh for this volume: a clear error before anything compiles."""
    n = spatial_lib.spatial_size(mesh)
    for key, shape in (('input_shape', self.input_shape),
                       ('val_input_shape', self.roi_shape)):
      if shape[0] % n:
        raise ConfigError(
            f'--mesh {mesh_lib.describe(mesh)}: the spatial axis ({n}) must '
            f'divide the depth of {key}={list(shape)} ({shape[0]})')
    self.model = self._build_model(mesh)

  def setup(self, train_examples):
    c = self.config
    gbs = int(c.global_batch_size)
    if train_examples < gbs:
      raise ConfigError(f'global_batch_size={gbs} is larger than the '
                        f'{train_examples} training cases')
    # The reference drops the last partial batch of every epoch.
    self.samples_per_epoch = train_examples // gbs * gbs
    self.schedule = Schedule(self.samples_per_epoch, gbs)
    self.steps_per_epoch = train_examples // gbs
    self._tx = optax.chain(
        optax.add_decayed_weights(float(c.weight_decay)),
        optax.sgd(self.learning_rate, momentum=float(c.momentum),
                  nesterov=True))
    return self.schedule

  def learning_rate(self, step):
    """The reference's per-epoch schedule, as a function of the step."""
    c = self.config
    epoch = step // self.steps_per_epoch + 1                  # 1-based
    warmup = int(c.warmup_epochs)
    base = float(c.base_learning_rate)
    init = float(c.init_learning_rate)
    lr = jnp.asarray(base, jnp.float32)
    for boundary in c.lr_decay_epochs:
      lr = jnp.where(epoch > int(boundary), lr * float(c.lr_decay_factor), lr)
    if warmup > 0:
      ramp = init + (base - init) * jnp.minimum(epoch, warmup) / warmup
      lr = jnp.where(epoch <= warmup, ramp, lr)
    return lr

  def eval_epochs(self, train_epochs):
    c = self.config
    every, start = int(c.evaluate_every), int(c.start_eval_at)
    if every < 1:
      raise ConfigError(f'evaluate_every={every}: must be at least 1')
    epochs = [e for e in range(every, train_epochs + 1, every) if e >= start]
    if not epochs or epochs[-1] != train_epochs:
      epochs.append(train_epochs)
    return epochs

  # --- state -------------------------------------------------------------------
  def init_state(self, rng):
    key = jax.random.wrap_key_data(rng)
    x = jnp.zeros((1, *self.input_shape, 1), jnp.float32)
    params = self.model.init(key, x)['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      model_state={}, opt_state=self._tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  # --- steps -------------------------------------------------------------------
  def train_step(self, state, batch):
    def loss_fn(params):
      logits = self.model.apply({'params': params}, batch['image'])
      return losses.dice_ce_loss(logits, batch['label'],
                                 num_classes=int(self.config.num_classes))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics_ = {'loss': loss, 'learning_rate': self.learning_rate(state.step)}
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics_

  def eval_step(self, state, batch):
    """Logits of a batch of sliding windows (float32)."""
    return self.model.apply({'params': state.params}, batch['image'])

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    n = max(float(sums['cases']), 1.0)
    kidney = float(sums['kidney_dice']) / n
    tumor = float(sums['tumor_dice']) / n
    return {self.metric: (kidney + tumor) / 2, 'kidney_dice': kidney,
            'tumor_dice': tumor, 'eval_cases': int(sums['cases'])}

  def make_evaluator(self, mesh, abstract_state):
    return SlidingWindowEvaluator(self, mesh, abstract_state)

  # --- MLPerf logging ----------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    return {
        'global_batch_size': int(c.global_batch_size),
        'gradient_accumulation_steps': 1,
        'opt_name': c.optimizer,
        'opt_base_learning_rate': float(c.base_learning_rate),
        'opt_initial_learning_rate': float(c.init_learning_rate),
        'opt_learning_rate_warmup_epochs': int(c.warmup_epochs),
        'opt_learning_rate_decay_boundary_epochs': [
            int(e) for e in c.lr_decay_epochs],
        'opt_learning_rate_decay_factor': float(c.lr_decay_factor),
        'opt_weight_decay': float(c.weight_decay),
        'opt_momentum': float(c.momentum),
        'oversampling': float(c.oversampling),
        'training_input_shape': list(self.input_shape),
        'validation_input_shape': list(self.roi_shape),
        'validation_overlap': float(c.overlap),
    }

  def initialized_tensors(self, state: TrainState) -> list[str]:
    return tensor_names(state.params)


class SlidingWindowEvaluator:
  """Whole-case evaluation: windows through the compiled model on the mesh,
  stitched on the host with Gaussian weights, DICE per case, mean over cases.

  Every process walks all cases in the same order (a window batch is one
  global array, split over data-parallel and spatial axes like training
  batches), so the result is the same on every process.
  """

  def __init__(self, workload: UNet3D, mesh, abstract_state):
    self.w = workload
    c = workload.config
    self.batch = int(c.eval_batch_size)
    self.overlap = float(c.overlap)
    self.num_classes = int(c.num_classes)
    spec = workload.batch_spec(self.batch, train=False)['image']
    part = workload.batch_partition(mesh, train=False)['image']
    self.sharding = NamedSharding(mesh, part)
    self.shape = spec.shape
    apply = lambda params, x: workload.model.apply({'params': params}, x)
    self.fn = jax.jit(apply, out_shardings=mesh_lib.replicated(mesh)).lower(
        abstract_state.params,
        jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=self.sharding)
    ).compile()

  def _apply(self, params, windows: np.ndarray) -> np.ndarray:
    arr = jax.make_array_from_callback(self.shape, self.sharding,
                                       lambda idx: windows[idx])
    return np.asarray(self.fn(params, arr))

  def __call__(self, state, eval_ds) -> dict[str, float]:
    sums = {'kidney_dice': 0.0, 'tumor_dice': 0.0, 'cases': 0}
    for _, image, label in eval_ds.cases():
      logits, cropped = sliding_window.sliding_window_inference(
          image, label, lambda x: self._apply(state.params, x),
          roi_shape=self.w.roi_shape, overlap=self.overlap,
          batch_size=self.batch, num_classes=self.num_classes)
      scores = np.asarray(metrics.dice(logits, cropped,
                                       num_classes=self.num_classes))
      sums['kidney_dice'] += float(scores[0])
      sums['tumor_dice'] += float(scores[1])
      sums['cases'] += 1
    return self.w.eval_result(sums)


def tensor_names(params: Any) -> list[str]:
  """The checker's tensor names: one per conv, instance norm and deconv."""
  names = []
  for name in params:
    sub = params[name]
    if 'kernel' in sub:                 # up{i}_deconv, output_conv
      names.append(name)
    else:                               # {block}: conv + instancenorm
      names.extend(f'{name}_{part}' for part in sub)
  return sorted(names)

