"""RetinaNet on the OpenImages MLPerf subset (MLPerf benchmark "ssd", v2.0+).

Quality: COCO box mAP@[.5:.95] >= 0.34 over the validation images, after
every epoch. The model is torchvision's RetinaNet on a ResNeXt50-32x4d FPN
(models/retinanet.py), trained from the ImageNet backbone with frozen batch
norms and the stem and first stage frozen; images are resized to 800x800
(aspect not kept) and flipped horizontally with probability 0.5.

Loss: the focal loss (alpha 0.25, gamma 2) over foreground and background
anchors plus the L1 box loss over foreground anchors, each divided by the
image's foreground count and averaged over images (jaxperf.losses.
retinanet_losses), ground truth padded to `max_boxes` per image.

Optimizer: Adam (lr 1e-4 at the reference batch of 256, no weight decay) on
the trainable parameters. The reference's warmup multiplies the learning rate
by warmup_factor * (1 - a) + a with a = step / (warmup_epochs * steps per
epoch), stepped every iteration, then holds it at the base rate; an epoch is
floor(images / global batch) steps (the reference's loader drops the last
partial batch).

Evaluation: the reference's post-processing (per level the top 1000 scores
above 0.05, boxes decoded and clipped, per-class NMS at 0.5, 300 detections
per image), boxes scaled back to each image's original size, mAP by
pycocotools on the COCO-format annotations.

Data parallelism: the loss and gradients are computed inside shard_map with
one mean of the gradients over the data-parallel devices. Left to the SPMD
partitioner, a batch-sharded grouped convolution (every ResNeXt 3x3) is
compiled with all-gathers of the whole batch's activations, forward and
backward (tests/test_train_retinanet.py reads the compiled HLO).
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

from jaxperf import losses
from jaxperf.config import Config
from jaxperf.errors import ConfigError
from jaxperf.models import layers
from jaxperf.models import retinanet as retinanet_model
from jaxperf.workloads.base import (ReplicatedEval, Schedule,
                                    ShardMapDataParallel, TrainState, Workload,
                                    random_boxes, replace_backbone)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}


def warmup_factor_at(step, warmup_steps: int, warmup_factor: float):
  """The reference's learning-rate multiplier at a (0-based) step:
  warmup_factor * (1 - a) + a with a = step / warmup_steps, then 1."""
  if warmup_steps <= 0:
    return jnp.ones_like(jnp.asarray(step, jnp.float32))
  a = jnp.asarray(step, jnp.float32) / warmup_steps
  return jnp.where(a >= 1, 1.0, warmup_factor * (1 - a) + a)


class RetinaNet(ShardMapDataParallel, Workload):
  name = 'retinanet'
  benchmark = 'ssd'
  metric = 'mAP'
  higher_is_better = True
  description = 'RetinaNet ResNeXt50-32x4d FPN, OpenImages subset, box mAP'
  bench_cpu_overrides = {'image_size': [256, 256], 'global_batch_size': 8}

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    if c.optimizer != 'adam':
      raise ConfigError(f'optimizer={c.optimizer!r}: the reference uses adam')
    if c.dtype not in _DTYPES:
      raise ConfigError(f'dtype={c.dtype!r}: expected one of {list(_DTYPES)}')
    size = tuple(c.image_size)
    if len(size) != 2 or any(int(s) < 1 for s in size):
      raise ConfigError(f'image_size={list(size)}: expected [height, width], '
                        f'positive')
    if c.conv_wgrad not in ('auto', 'xla', 'matmul'):
      raise ConfigError(f'conv_wgrad={c.conv_wgrad!r}: expected auto, xla or '
                        f'matmul')
    if not 0 <= int(c.trainable_backbone_layers) <= 5:
      raise ConfigError(f'trainable_backbone_layers='
                        f'{c.trainable_backbone_layers}: expected 0..5')
    if int(c.max_boxes) < 1:
      raise ConfigError(f'max_boxes={c.max_boxes}: expected >= 1')
    if float(c.weight_decay) != 0:
      raise ConfigError(f'weight_decay={c.weight_decay}: the reference (and '
                        f'the closed division) train without weight decay')
    for key in ('score_thresh', 'nms_thresh', 'fg_iou_thresh',
                'bg_iou_thresh'):
      if not 0 <= float(c[key]) <= 1:
        raise ConfigError(f'{key}={c[key]}: expected a value in [0, 1]')
    if float(c.bg_iou_thresh) > float(c.fg_iou_thresh):
      raise ConfigError(f'bg_iou_thresh={c.bg_iou_thresh} is above '
                        f'fg_iou_thresh={c.fg_iou_thresh}')
    self.image_size = tuple(int(s) for s in size)
    self.max_boxes = int(c.max_boxes)
    self.num_classes = int(c.num_classes)
    self.model = retinanet_model.RetinaNet(
        num_classes=self.num_classes,
        stage_sizes=tuple(int(s) for s in c.stage_sizes),
        groups=int(c.groups), width_per_group=int(c.width_per_group),
        base_width=int(c.base_width), fpn_channels=int(c.fpn_channels),
        frozen_stages=5 - int(c.trainable_backbone_layers),
        dtype=_DTYPES[c.dtype],
        wgrad=(c.conv_wgrad if c.conv_wgrad != 'auto' else
               'matmul' if jax.default_backend() == 'cpu' else 'xla'))
    self.anchors = layers.retinanet_anchors(self.image_size)
    self.level_sizes = layers.anchors_per_level(self.image_size)
    self.mesh = None
    self._tx = None
    self.steps_per_epoch = None
    self.warmup_steps = 0

  # --- data --------------------------------------------------------------------
  def datasets(self, data_dir, seed):
    from jaxperf.data import openimages  # pylint: disable=g-import-not-at-top
    c = self.config
    if data_dir is None:
      train, evals = openimages.synthetic_shapes(
          int(c.synthetic_train_samples), int(c.synthetic_eval_samples),
          image_size=self.image_size, num_classes=self.num_classes,
          max_boxes=self.max_boxes, seed=seed,
          num_workers=int(c.data_workers))
    else:
      train, evals = openimages.open_openimages(
          data_dir, image_size=self.image_size, max_boxes=self.max_boxes,
          seed=seed, num_workers=int(c.data_workers),
          hflip_prob=float(c.hflip_prob))
      if train.num_classes != self.num_classes:
        train.close()
        evals.close()
        raise ConfigError(
            f'num_classes={self.num_classes}, but {data_dir} lists '
            f'{train.num_classes} categories (the MLPerf subset has 264); '
            f'set --set num_classes={train.num_classes}')
    return train, evals

  def batch_spec(self, global_batch, train):
    h, w = self.image_size
    spec = {'image': jax.ShapeDtypeStruct((global_batch, h, w, 3),
                                          jnp.float32)}
    if train:
      g = self.max_boxes
      spec.update(
          boxes=jax.ShapeDtypeStruct((global_batch, g, 4), jnp.float32),
          labels=jax.ShapeDtypeStruct((global_batch, g), jnp.int32),
          valid=jax.ShapeDtypeStruct((global_batch, g), jnp.bool_))
    else:
      spec.update(index=jax.ShapeDtypeStruct((global_batch,), jnp.int32),
                  mask=jax.ShapeDtypeStruct((global_batch,), jnp.bool_))
    return spec

  def setup(self, train_examples):
    c = self.config
    gbs = int(c.global_batch_size)
    if train_examples < gbs:
      raise ConfigError(f'global_batch_size={gbs} is larger than the '
                        f'{train_examples} training images')
    # The reference's loader drops the last partial batch of every epoch.
    self.steps_per_epoch = train_examples // gbs
    self.schedule = Schedule(self.steps_per_epoch * gbs, gbs)
    self.warmup_steps = int(c.warmup_epochs) * self.steps_per_epoch
    base = float(c.base_learning_rate)
    factor = float(c.warmup_factor)
    self._tx = self._optimizer(
        lambda step: base * warmup_factor_at(step, self.warmup_steps, factor))
    return self.schedule

  def _optimizer(self, lr) -> optax.GradientTransformation:
    """Adam (torch.optim.Adam's defaults) on the trainable parameters;
    the frozen ones get no moments and no updates."""
    adam = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    labels = lambda params: jax.tree.map(
        lambda frozen: 'frozen' if frozen else 'train',
        self.model.frozen_mask(params))
    return optax.multi_transform({'train': adam,
                                  'frozen': optax.set_to_zero()}, labels)

  def learning_rate(self, step):
    c = self.config
    return float(c.base_learning_rate) * warmup_factor_at(
        step, self.warmup_steps, float(c.warmup_factor))

  # --- state -------------------------------------------------------------------
  def init_state(self, rng):
    if self._tx is None:
      raise RuntimeError('setup() must run before init_state()')
    key = jax.random.wrap_key_data(rng)
    x = jnp.zeros((1, *self.image_size, 3), jnp.float32)
    variables = self.model.init(key, x)
    params = variables['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      model_state={'batch_stats': variables['batch_stats']},
                      opt_state=self._tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  def load_initial_weights(self, state, shardings):
    """The ImageNet backbone from `backbone_checkpoint`: a torchvision
    resnext50_32x4d state_dict (the reference's resnext50_32x4d-7cdf4587.pth),
    into the backbone's kernels and frozen batch norms."""
    path = self.config.backbone_checkpoint
    if not path:
      return state
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
      raise ConfigError(f'backbone_checkpoint={path!r}: no such file; expected '
                        f'a torchvision resnext50_32x4d state_dict (.pth)')
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    sd = torch.load(path, map_location='cpu', weights_only=True)
    got = interop.retinanet_backbone_from_torch(
        sd, expected={'params': {'backbone': state.params['backbone']},
                      'batch_stats': state.model_state['batch_stats']},
        source=path)
    return replace_backbone(state, shardings, got)

  # --- steps -------------------------------------------------------------------
  def _normalize(self, images):
    mean = jnp.asarray(retinanet_model.IMAGE_MEAN, jnp.float32)
    std = jnp.asarray(retinanet_model.IMAGE_STD, jnp.float32)
    return (images - mean) / std

  def loss_terms(self, params, model_state, batch) -> dict[str, jax.Array]:
    """The reference's loss dict for a batch (mean over its images)."""
    c = self.config
    out = self.model.apply({'params': params, **model_state},
                           self._normalize(batch['image']))
    return losses.retinanet_losses(
        out['cls_logits'], out['bbox_regression'], self.anchors,
        batch['boxes'], batch['labels'], batch['valid'],
        alpha=float(c.focal_alpha), gamma=float(c.focal_gamma),
        fg_iou_thresh=float(c.fg_iou_thresh),
        bg_iou_thresh=float(c.bg_iou_thresh))

  def train_step(self, state, batch):
    grads, out = self._trainable_grads(
        self.loss_terms, state, batch, self.model.frozen_mask(state.params))
    updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics_ = {'loss': out['loss'], 'classification': out['classification'],
                'bbox_regression': out['bbox_regression'],
                'learning_rate': self.learning_rate(state.step)}
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics_

  def detect(self, params, model_state, images) -> dict[str, jax.Array]:
    """Post-processed detections of a batch, in resized-image pixels."""
    c = self.config
    axes = self._dp_axes()

    def local(params, model_state, images):
      out = self.model.apply({'params': params, **model_state},
                             self._normalize(images))
      return layers.retinanet_postprocess(
          out['cls_logits'], out['bbox_regression'], self.anchors,
          self.level_sizes, self.image_size,
          score_thresh=float(c.score_thresh), nms_thresh=float(c.nms_thresh),
          detections_per_img=int(c.detections_per_img),
          topk_candidates=int(c.topk_candidates))
    spec = P(axes or None)
    return self._data_parallel(local, in_specs=(P(), P(), spec),
                               out_specs=spec)(params, model_state, images)

  def eval_step(self, state, batch):
    out = self.detect(state.params, state.model_state, batch['image'])
    return {**out, 'index': batch['index'], 'mask': batch['mask']}

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    return dict(sums)

  def make_evaluator(self, mesh, abstract_state):
    return CocoEvaluator(self, mesh, abstract_state)

  # --- benchmarking --------------------------------------------------------------
  def bench_batch(self, global_batch, seed):
    """Random images with 1-8 random boxes each, so the matcher sees
    foreground anchors."""
    rng = np.random.default_rng(seed)
    h, w = self.image_size
    g = self.max_boxes
    boxes, valid = random_boxes(rng, global_batch, g, h, w)
    return {'image': rng.random((global_batch, h, w, 3), np.float32),
            'boxes': boxes,
            'labels': np.where(valid, rng.integers(
                0, self.num_classes, (global_batch, g)), 0).astype(np.int32),
            'valid': valid}

  # --- MLPerf logging ----------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    return {
        'global_batch_size': int(c.global_batch_size),
        'gradient_accumulation_steps': 1,
        'opt_name': 'adam',
        'opt_base_learning_rate': float(c.base_learning_rate),
        'opt_weight_decay': float(c.weight_decay),
        'opt_learning_rate_warmup_epochs': int(c.warmup_epochs),
        'opt_learning_rate_warmup_factor': float(c.warmup_factor),
    }

  def initialized_tensors(self, state: TrainState) -> list[str]:
    """The reference's parameter names (the checker's list at full size)."""
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    del state
    return interop.retinanet_checker_tensor_names()


class CocoEvaluator:
  """Detections for every validation image on the devices, then box mAP by
  pycocotools on the host.

  Each eval batch is one global array split over the data-parallel devices;
  the compiled function returns the detections replicated with each image's
  position in the dataset, so every process scores the same detections
  against the same annotations.
  """

  def __init__(self, workload: RetinaNet, mesh, abstract_state):
    self.w = workload
    self.loop = ReplicatedEval(workload, mesh, workload.eval_step,
                               abstract_state, slice_key='index')

  def __call__(self, state, eval_ds) -> dict[str, float]:
    from jaxperf import metrics  # pylint: disable=g-import-not-at-top
    results = self.loop.outputs(state, eval_ds,
                                lambda out: self._collect(out, eval_ds))
    dets = (np.concatenate(results) if results
            else np.zeros((0, 7), np.float64))
    stats = metrics.coco_box_map(eval_ds.coco_gt, dets)
    return {self.w.metric: float(stats['mAP']),
            **{k: float(v) for k, v in stats.items() if k != 'mAP'},
            'detections': int(dets.shape[0]),
            'eval_images': int(eval_ds.num_examples)}

  def _collect(self, out, eval_ds) -> np.ndarray:
    """One batch's detections as pycocotools rows, in original pixels."""
    from jaxperf import metrics  # pylint: disable=g-import-not-at-top
    host = {k: np.asarray(v) for k, v in out.items()}
    keep = host['mask']
    idx = host['index'][keep]
    sizes = np.asarray(eval_ds.sizes)[idx].astype(np.float64)   # (h, w)
    h, w = self.w.image_size
    scale = np.stack([sizes[:, 1] / w, sizes[:, 0] / h,
                      sizes[:, 1] / w, sizes[:, 0] / h], axis=1)
    boxes = host['boxes'][keep].astype(np.float64) * scale[:, None, :]
    return metrics.detections_to_coco(
        np.asarray(eval_ds.image_ids)[idx], boxes, host['scores'][keep],
        host['labels'][keep], host['valid'][keep], eval_ds.category_ids)
