"""ResNet-50 v1.5 on ImageNet (MLPerf benchmark "resnet").

Quality: top-1 accuracy >= 0.759 on the 50,000 validation images, evaluated
every 4 epochs. LARS (or SGD with momentum) with linear warmup and polynomial
decay of power 2 to 1e-4; batch-norm parameters and biases are excluded from
LARS scaling and weight decay; label smoothing 0.1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxperf.config import Config
from jaxperf.data.synthetic import SyntheticImages
from jaxperf.errors import ConfigError
from jaxperf.models import resnet as resnet_model
from jaxperf.optim import (decay_steps, mlperf_lars, poly_warmup_schedule,
                           sgd_momentum, weight_decay_mask)
from jaxperf.workloads.base import TrainState, Workload

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}
# Flax leaf names -> the MXNet suffixes the MLPerf checker expects.
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'gamma'}


class ResNet50(Workload):
  name = 'resnet50'
  benchmark = 'resnet'
  metric = 'top1_accuracy'
  higher_is_better = True
  description = 'ResNet-50 v1.5, ImageNet, top-1 accuracy'

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    if c.optimizer not in ('lars', 'sgd'):
      raise ConfigError(f'optimizer={c.optimizer!r}: expected lars or sgd')
    if c.dtype not in _DTYPES:
      raise ConfigError(f'dtype={c.dtype!r}: expected one of {list(_DTYPES)}')
    self.model = resnet_model.ResNet(
        num_classes=c.num_classes, stage_sizes=tuple(c.stage_sizes),
        width=c.width, dtype=_DTYPES[c.dtype],
        zero_init_last_bn=c.zero_init_last_bn, wgrad=conv_wgrad(c.conv_wgrad))
    self._tx = None
    self._lr = None

  # --- data --------------------------------------------------------------------
  def datasets(self, data_dir, seed):
    c = self.config
    if data_dir is None:
      train = SyntheticImages(c.synthetic_train_samples, c.num_classes,
                              c.image_size, seed=0, shuffle_seed=seed,
                              noise=c.synthetic_noise,
                              label_noise=c.synthetic_label_noise,
                              split='train')
      evals = SyntheticImages(c.synthetic_eval_samples, c.num_classes,
                              c.image_size, seed=0, noise=c.synthetic_noise,
                              label_noise=c.synthetic_label_noise,
                              split='eval')
      return train, evals
    from jaxperf.data.imagenet import open_imagenet  # pylint: disable=g-import-not-at-top
    train, evals = open_imagenet(data_dir, image_size=c.image_size, seed=seed,
                                 num_workers=c.data_workers,
                                 num_classes=c.num_classes)
    for ds in (train, evals):
      if ds.num_classes != c.num_classes:
        raise ConfigError(
            f'--data-dir {data_dir}: the dataset has {ds.num_classes} classes '
            f'but num_classes={c.num_classes}; pass --set '
            f'num_classes={ds.num_classes}')
    return train, evals

  def batch_spec(self, global_batch, train):
    s = self.config.image_size
    spec = {'image': jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.uint8),
            'label': jax.ShapeDtypeStruct((global_batch,), jnp.int32)}
    if not train:
      spec['mask'] = jax.ShapeDtypeStruct((global_batch,), jnp.bool_)
    return spec

  # --- optimizer ---------------------------------------------------------------
  def setup(self, train_examples):
    sched = super().setup(train_examples)
    c = self.config
    self.warmup_steps = sched.steps_for(c.warmup_epochs)
    self.total_steps = sched.steps_for(c.train_epochs)
    self._lr = poly_warmup_schedule(
        c.base_learning_rate, self.warmup_steps, self.total_steps,
        end_lr=c.end_learning_rate, power=c.decay_poly_power)
    if c.optimizer == 'lars':
      self._tx = mlperf_lars(self._lr, momentum=c.momentum,
                             weight_decay=c.weight_decay, eeta=c.lars_eeta,
                             epsilon=c.lars_epsilon, lars_mask=weight_decay_mask)
    else:
      self._tx = sgd_momentum(self._lr, momentum=c.momentum,
                              weight_decay=c.weight_decay,
                              decay_mask=weight_decay_mask)
    return sched

  def learning_rate(self, step):
    return self._lr(step)

  # --- state -------------------------------------------------------------------
  def init_state(self, rng):
    s = self.config.image_size
    variables = self.model.init(jax.random.wrap_key_data(rng),
                                jnp.zeros((1, s, s, 3), jnp.uint8), train=False)
    params = variables['params']
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      model_state=model_state,
                      opt_state=self._tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(
                          jax.random.wrap_key_data(rng), 1)))

  # --- steps -------------------------------------------------------------------
  def train_step(self, state, batch):
    c = self.config
    labels = batch['label']

    def loss_fn(params):
      logits, updates = self.model.apply(
          {'params': params, **state.model_state}, batch['image'], train=True,
          mutable=list(state.model_state))
      targets = optax.smooth_labels(
          jax.nn.one_hot(labels, c.num_classes), c.label_smoothing)
      losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
      return jnp.sum(losses) / labels.shape[0], (updates, logits)

    (loss, (model_state, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    metrics = {'loss': loss, 'learning_rate': self._lr(state.step),
               'train_accuracy': accuracy}
    return state.replace(step=state.step + 1, params=params,
                         model_state=model_state, opt_state=opt_state), metrics

  def eval_step(self, state, batch):
    logits = self.model.apply({'params': state.params, **state.model_state},
                              batch['image'], train=False)
    mask = batch['mask']
    labels = batch['label']
    correct = (jnp.argmax(logits, -1) == labels) & mask
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    return {'correct': jnp.sum(correct),
            'count': jnp.sum(mask),
            'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0))}

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    count = max(float(sums['count']), 1.0)
    return {self.metric: float(sums['correct']) / count,
            'eval_loss': float(sums['loss_sum']) / count,
            'eval_examples': int(sums['count'])}

  # --- MLPerf logging ----------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    steps = decay_steps(self.warmup_steps, self.total_steps)
    common = {'global_batch_size': c.global_batch_size,
              'gradient_accumulation_steps': 1,
              'opt_name': c.optimizer}
    if c.optimizer == 'lars':
      return {**common,
              'lars_opt_base_learning_rate': c.base_learning_rate,
              'lars_opt_end_learning_rate': c.end_learning_rate,
              'lars_opt_learning_rate_decay_poly_power': c.decay_poly_power,
              'lars_opt_learning_rate_decay_steps': steps,
              'lars_epsilon': c.lars_epsilon,
              'lars_opt_learning_rate_warmup_epochs': c.warmup_epochs,
              'lars_opt_momentum': c.momentum,
              'lars_opt_weight_decay': c.weight_decay,
              'model_bn_span': c.global_batch_size}
    return {**common,
            'sgd_opt_base_learning_rate': c.base_learning_rate,
            'sgd_opt_end_learning_rate': c.end_learning_rate,
            'sgd_opt_learning_rate_decay_poly_power': c.decay_poly_power,
            'sgd_opt_learning_rate_decay_steps': steps,
            'sgd_opt_weight_decay': c.weight_decay,
            'sgd_opt_momentum': c.momentum,
            'model_bn_span': c.global_batch_size,
            'opt_learning_rate_warmup_epochs': c.warmup_epochs}

  def initialized_tensors(self, state: TrainState) -> list[str]:
    return mxnet_names(state.params)


def conv_wgrad(setting: str) -> str:
  """The convolution kernel-gradient algorithm for this backend."""
  if setting == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'xla'
  if setting not in ('xla', 'matmul'):
    raise ConfigError(f'conv_wgrad={setting!r}: expected auto, xla or matmul')
  return setting


def mxnet_names(params: Any) -> list[str]:
  """Flax parameter paths as the MXNet names the MLPerf checker lists.

  conv0/kernel -> conv0_weight, bn0/scale -> bn0_gamma, bn0/bias -> bn0_beta,
  fc1/bias -> fc1_bias, stage1_unit1/conv1sc/kernel -> stage1_unit1_conv1sc_weight.
  """
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [p.key for p in path]
    leaf = keys[-1]
    module = keys[-2]
    if leaf == 'bias' and module.startswith('bn'):
      suffix = 'beta'
    else:
      suffix = _LEAF_NAMES.get(leaf, leaf)
    names.append('_'.join(keys[:-1] + [suffix]))
  return names
