"""Mask R-CNN on COCO 2017 (MLPerf Training benchmark "maskrcnn", v2.1).

Quality: COCO box mAP@[.5:.95] >= 0.377 *and* mask mAP >= 0.339 on val2017,
after every epoch; the MLPerf log's eval_accuracy is {"BBOX": x, "SEGM": y}.
The model is the reference's e2e_mask_rcnn_R_50_FPN_1x (models/maskrcnn.py:
ResNet-50 FPN with frozen batch norms and the stem and first stage frozen,
RPN, 7x7 box head, 14x14 mask head, 81 classes); images are resized to a
shorter side of 800 (longer at most 1333), flipped with probability 0.5 in
training and padded to one of a few bucket shapes (jaxperf/data/coco.py), so
XLA compiles one training and one evaluation program per bucket.

Training step, per device (the reference's per-GPU semantics), all on static
shapes (models/layers/two_stage.py):

* RPN: anchors of the bucket (levels P2..P6, sizes 32..512, 3 ratios) are
  matched to the gts (0.7 / 0.3, low-quality matches, anchors crossing the
  border ignored), 256 sampled per image with at most half positives;
  objectness BCE and smooth L1 (beta 1/9) over the sampled anchors.
* Proposals: per level the 2000 best anchors by objectness, decoded,
  clipped, NMS 0.7 per level, then the 2000 best of the device's batch
  (`num_image_candidates`, the reference's FPN_POST_NMS_TOP_N_TRAIN).
* ROIs: gts appended, matched at 0.5, 512 sampled per image with at most a
  quarter positives; the box head on 7x7 RoIAlign (sampling 2, the FPN
  level rule with the +1 convention) with cross-entropy and smooth L1
  (beta 1); the mask head on the (at most 128) positives at 14x14, BCE
  against 28x28 targets sampled from each gt's mask crop.

The loss is the sum of the five terms; gradients are averaged over the
data-parallel devices once (ShardMapDataParallel). SGD with momentum 0.9 and
weight decay 1e-4 (biases: twice the learning rate, no weight decay); the
reference's WarmupMultiStepLR: linear warmup from 1/3 over 500 iterations,
x0.1 at 60k and 80k iterations (for batch 16), stepped before each
iteration's update (so step s uses the factor of iteration s + 1).

Evaluation: 1000 proposals per image, the box head on all, softmax scores
> 0.05, per-class NMS 0.5, 100 detections; the mask head on the detections'
boxes, each mask the sigmoid of its class's logits, pasted into the
original image (threshold 0.5); bbox and segm mAP by pycocotools against
the instances JSON.

Data parallelism: as RetinaNet, the loss runs inside shard_map over the
batch axes; the mesh must be purely data parallel.
"""

from __future__ import annotations

import functools
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
from jaxperf.models import maskrcnn as maskrcnn_model
from jaxperf.workloads.base import (ReplicatedEval, Schedule,
                                    ShardMapDataParallel, TrainState, Workload,
                                    random_boxes, replace_backbone)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}
# The box and mask poolers' levels (P2..P5) and sampling.
POOLER_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
POOLER_SAMPLING_RATIO = 2


def lr_factor(step, *, warmup_steps: int, warmup_factor: float,
              decay_steps, decay_factor: float = 0.1):
  """The reference's WarmupMultiStepLR multiplier for the update of a
  0-based step: that of iteration it = step + 1 (the reference steps its
  scheduler before each update), warmup_factor * (1 - a) + a with a =
  it / warmup_steps while it < warmup_steps, times decay_factor ** (the
  number of decay steps <= it). Works on numpy and traced steps."""
  it = jnp.asarray(step, jnp.int32) + 1
  if warmup_steps > 0:
    a = it.astype(jnp.float32) / warmup_steps
    warm = jnp.where(it < warmup_steps, warmup_factor * (1 - a) + a, 1.0)
  else:
    warm = jnp.ones([], jnp.float32)
  passed = sum((it >= int(s)).astype(jnp.int32) for s in decay_steps)
  return warm * jnp.power(jnp.float32(decay_factor), passed)


class MaskRCNN(ShardMapDataParallel, Workload):
  name = 'maskrcnn'
  benchmark = 'maskrcnn'
  metric = 'BBOX'
  higher_is_better = True
  description = 'Mask R-CNN ResNet-50 FPN, COCO 2017, box and mask mAP'
  bench_cpu_overrides = {'min_size': 256, 'max_size': 320,
                         'global_batch_size': 2}
  # From random weights at the reference's learning rate the loss is NaN
  # within a few steps (the reference starts from an ImageNet backbone),
  # and NaNs change the step time (15.7 s against 8.7 s on CPU); the clip
  # keeps the timed steps finite at the cost of one global norm.
  bench_overrides = {'clip_grad_norm': 1.0}

  def __init__(self, config: Config):
    super().__init__(config)
    c = config
    if c.optimizer != 'sgd':
      raise ConfigError(f'optimizer={c.optimizer!r}: the reference uses sgd '
                        f'(with momentum)')
    if c.dtype not in _DTYPES:
      raise ConfigError(f'dtype={c.dtype!r}: expected one of {list(_DTYPES)}')
    if c.conv_wgrad not in ('auto', 'xla', 'matmul'):
      raise ConfigError(f'conv_wgrad={c.conv_wgrad!r}: expected auto, xla or '
                        f'matmul')
    if not 0 <= int(c.trainable_backbone_layers) <= 5:
      raise ConfigError(f'trainable_backbone_layers='
                        f'{c.trainable_backbone_layers}: expected 0..5')
    if int(c.num_classes) < 2:
      raise ConfigError(f'num_classes={c.num_classes}: expected >= 2 (the '
                        f'background and at least one class)')
    for key in ('max_boxes', 'mask_resolution', 'num_image_candidates',
                'rpn_pre_nms_top_n_train', 'rpn_pre_nms_top_n_test',
                'rpn_post_nms_top_n_test', 'rpn_batch_size_per_image',
                'roi_batch_size_per_image', 'detections_per_img',
                'steps_per_dispatch'):
      if int(c[key]) < 1:
        raise ConfigError(f'{key}={c[key]}: expected >= 1')
    if int(c.steps_per_dispatch) != 1:
      raise ConfigError(f'steps_per_dispatch={c.steps_per_dispatch}: '
                        f'maskrcnn batches come in several bucket shapes, '
                        f'one step per dispatch; set steps_per_dispatch=1')
    for key in ('score_thresh', 'nms_thresh', 'rpn_nms_thresh',
                'rpn_positive_fraction', 'roi_positive_fraction',
                'hflip_prob'):
      if not 0 <= float(c[key]) <= 1:
        raise ConfigError(f'{key}={c[key]}: expected a value in [0, 1]')
    steps = [int(s) for s in c.decay_steps]
    if steps != sorted(steps):
      raise ConfigError(f'decay_steps={list(c.decay_steps)}: expected '
                        f'increasing iterations')
    from jaxperf.data import coco  # pylint: disable=g-import-not-at-top
    self.buckets = coco.parse_buckets(c.buckets, int(c.min_size),
                                      int(c.max_size),
                                      coco.SIZE_DIVISIBILITY)
    self.num_classes = int(c.num_classes)
    self.max_boxes = int(c.max_boxes)
    self.mask_resolution = int(c.mask_resolution)
    self.model = maskrcnn_model.MaskRCNN(
        num_classes=self.num_classes,
        stage_sizes=tuple(int(s) for s in c.stage_sizes),
        base_width=int(c.base_width), fpn_channels=int(c.fpn_channels),
        representation_size=int(c.representation_size),
        mask_channels=int(c.mask_channels),
        stride_in_1x1=bool(c.stride_in_1x1),
        bn_epsilon=float(c.bn_epsilon),
        frozen_stages=5 - int(c.trainable_backbone_layers),
        dtype=_DTYPES[c.dtype],
        wgrad=(c.conv_wgrad if c.conv_wgrad != 'auto' else
               'matmul' if jax.default_backend() == 'cpu' else 'xla'))
    self.mesh = None
    self._tx = None
    self._train_ds = None
    self.steps_per_epoch = None

  # --- targets ---------------------------------------------------------------
  def reached_result(self, result: Mapping[str, Any]) -> bool:
    return (result['BBOX'] >= self.target and
            result['SEGM'] >= float(self.config.target_mask_accuracy))

  def logged_accuracy(self, result: Mapping[str, Any]) -> dict[str, float]:
    return {'BBOX': float(result['BBOX']), 'SEGM': float(result['SEGM'])}

  def describe_target(self) -> str:
    return (f'BBOX ≥ {self.target} and SEGM ≥ '
            f'{float(self.config.target_mask_accuracy)}')

  def describe_result(self, result: Mapping[str, Any]) -> str:
    return (f'BBOX = {result["BBOX"]:.4f}, SEGM = {result["SEGM"]:.4f} '
            f'(targets {self.target}, '
            f'{float(self.config.target_mask_accuracy)})')

  # --- data --------------------------------------------------------------------
  def datasets(self, data_dir, seed):
    from jaxperf.data import coco  # pylint: disable=g-import-not-at-top
    c = self.config
    kw = dict(min_size=int(c.min_size), max_size=int(c.max_size),
              buckets=c.buckets, max_boxes=self.max_boxes,
              mask_resolution=self.mask_resolution, seed=seed,
              hflip_prob=float(c.hflip_prob),
              num_workers=int(c.data_workers))
    if data_dir is None:
      train, evals = coco.synthetic_coco(
          int(c.synthetic_train_samples), int(c.synthetic_eval_samples),
          num_classes=self.num_classes - 1,
          image_size=int(c.synthetic_image_size),
          max_objects=min(int(c.synthetic_max_objects), self.max_boxes), **kw)
    else:
      train, evals = coco.open_coco(data_dir, **kw)
    if train.num_classes + 1 != self.num_classes:
      train.close()
      evals.close()
      where = data_dir or 'the synthetic data'
      raise ConfigError(
          f'num_classes={self.num_classes} (with the background), but '
          f'{where} lists {train.num_classes} categories (COCO has 80); set '
          f'--set num_classes={train.num_classes + 1}')
    self._train_ds = train
    return train, evals

  def _spec(self, global_batch, train, size):
    h, w = size
    b = global_batch
    spec = {'image': jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32),
            'image_size': jax.ShapeDtypeStruct((b, 2), jnp.int32)}
    if train:
      g, m = self.max_boxes, self.mask_resolution
      spec.update(
          boxes=jax.ShapeDtypeStruct((b, g, 4), jnp.float32),
          labels=jax.ShapeDtypeStruct((b, g), jnp.int32),
          valid=jax.ShapeDtypeStruct((b, g), jnp.bool_),
          mask_crops=jax.ShapeDtypeStruct((b, g, m, m), jnp.uint8),
          mask_boxes=jax.ShapeDtypeStruct((b, g, 4), jnp.float32))
    else:
      spec.update(index=jax.ShapeDtypeStruct((b,), jnp.int32),
                  mask=jax.ShapeDtypeStruct((b,), jnp.bool_))
    return spec

  def batch_spec(self, global_batch, train):
    """The first bucket's batch (the landscape one by default)."""
    return self._spec(global_batch, train, self.buckets[0])

  def batch_specs(self, global_batch, train):
    """One batch shape per bucket."""
    return [self._spec(global_batch, train, size) for size in self.buckets]

  def setup(self, train_examples):
    c = self.config
    gbs = int(c.global_batch_size)
    if train_examples < gbs:
      raise ConfigError(f'global_batch_size={gbs} is larger than the '
                        f'{train_examples} training images')
    # An epoch leaves out each bucket's last partial batch (the data
    # layer's steps_per_epoch); without a dataset (bench), one bucket.
    if self._train_ds is not None:
      self.steps_per_epoch = self._train_ds.steps_per_epoch(gbs)
      if not self.steps_per_epoch:
        raise ConfigError(
            f'global_batch_size={gbs}: no image bucket holds that many '
            f'training images (images per bucket: '
            f'{self._train_ds.bucket_counts().tolist()})')
    else:
      self.steps_per_epoch = train_examples // gbs
    self.schedule = Schedule(self.steps_per_epoch * gbs, gbs)
    self._tx = self._optimizer(self.learning_rate)
    return self.schedule

  def learning_rate(self, step):
    c = self.config
    return float(c.base_learning_rate) * lr_factor(
        step, warmup_steps=int(c.warmup_steps),
        warmup_factor=float(c.warmup_factor),
        decay_steps=tuple(int(s) for s in c.decay_steps),
        decay_factor=float(c.decay_factor))

  def _optimizer(self, lr) -> optax.GradientTransformation:
    """SGD with momentum 0.9 as torch.optim.SGD (velocity of the gradient
    plus weight decay, scaled by the learning rate); biases at
    bias_lr_factor times the rate without weight decay; frozen parameters
    get no momentum and no updates."""
    c = self.config
    momentum = float(c.momentum)
    factor = float(c.bias_lr_factor)
    weights = optax.chain(optax.add_decayed_weights(float(c.weight_decay)),
                          optax.sgd(lr, momentum=momentum))
    biases = optax.chain(
        optax.add_decayed_weights(float(c.weight_decay_bias)),
        optax.sgd(lambda step: lr(step) * factor, momentum=momentum))

    def labels(params):
      def label(path, frozen):
        if frozen:
          return 'frozen'
        return 'bias' if getattr(path[-1], 'key', None) == 'bias' else 'weight'
      return jax.tree_util.tree_map_with_path(label,
                                              self.model.frozen_mask(params))
    tx = optax.multi_transform({'weight': weights, 'bias': biases,
                                'frozen': optax.set_to_zero()}, labels)
    if c.clip_grad_norm is not None:
      # Not in the reference (its pretrained backbone keeps the first
      # steps tame); for runs from scratch.
      tx = optax.chain(optax.clip_by_global_norm(float(c.clip_grad_norm)),
                       tx)
    return tx

  # --- state -------------------------------------------------------------------
  def init_state(self, rng):
    if self._tx is None:
      raise RuntimeError('setup() must run before init_state()')
    key = jax.random.wrap_key_data(rng)
    # The parameters do not depend on the image size.
    variables = self.model.init(key, jnp.zeros((1, 64, 64, 3), jnp.float32))
    params = variables['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      model_state={'batch_stats': variables['batch_stats']},
                      opt_state=self._tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  def load_initial_weights(self, state, shardings):
    """The ImageNet backbone from `backbone_checkpoint`: Detectron's
    R-50.pkl, as the reference starts from it (MODEL.WEIGHT
    catalog://ImageNetPretrained/MSRA/R-50), into the backbone's kernels
    and frozen batch norms."""
    path = self.config.backbone_checkpoint
    if not path:
      return state
    import os  # pylint: disable=g-import-not-at-top
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
      raise ConfigError(f'backbone_checkpoint={path!r}: no such file; '
                        f'expected Detectron\'s ImageNet weights (R-50.pkl)')
    got = interop.maskrcnn_backbone_from_c2(
        interop.read_c2_pickle(path),
        expected={'params': {'backbone': state.params['backbone']},
                  'batch_stats': state.model_state['batch_stats']},
        source=path)
    return replace_backbone(state, shardings, got)

  # --- steps -------------------------------------------------------------------
  def _pool(self, features, boxes, size):
    """RoIAlign of [b, K, 4] boxes from P2..P5 (the reference's Pooler)
    -> [b * K, size, size, C]."""
    b, k = boxes.shape[:2]
    return layers.multilevel_roi_align(
        features[:4], boxes.reshape(-1, 4), size, POOLER_SCALES,
        POOLER_SAMPLING_RATIO, aligned=False, legacy_plus_one=True,
        batch_indices=jnp.repeat(jnp.arange(b, dtype=jnp.int32), k))

  def loss_terms(self, params, model_state, batch, key_data
                 ) -> dict[str, jax.Array]:
    """The reference's five losses (and their sum, 'loss') for one
    device's share of a batch."""
    c = self.config
    key = self._local_key(jax.random.wrap_key_data(key_data))
    k_rpn, k_roi = jax.random.split(key)
    apply = functools.partial(self.model.apply,
                              {'params': params, **model_state})
    images = batch['image']
    b, h, w = images.shape[:3]
    sizes = batch['image_size']
    features = apply(images, method='features')
    objectness, deltas = apply(features, method='rpn')
    anchors = jnp.asarray(layers.rpn_anchors((h, w)))
    t = layers.rpn_targets(
        k_rpn, anchors, batch['boxes'], batch['valid'], sizes,
        batch_size_per_image=int(c.rpn_batch_size_per_image),
        positive_fraction=float(c.rpn_positive_fraction))
    out = losses.rpn_losses(objectness, deltas, t['regression_targets'],
                            t['sampled_positive'], t['sampled_negative'])
    proposals = layers.rpn_proposals(
        objectness, deltas, anchors, layers.rpn_anchors_per_level((h, w)),
        sizes, training=True, pre_nms_top_n=int(c.rpn_pre_nms_top_n_train),
        post_nms_top_n=int(c.num_image_candidates), per_image=False,
        nms_thresh=float(c.rpn_nms_thresh))
    rois = layers.sample_rois(
        k_roi, proposals['boxes'], proposals['valid'], batch['boxes'],
        batch['labels'], batch['valid'],
        batch_size_per_image=int(c.roi_batch_size_per_image),
        positive_fraction=float(c.roi_positive_fraction))
    class_logits, box_regression = apply(
        self._pool(features, rois['boxes'], maskrcnn_model.BOX_POOL_SIZE),
        method='box_head')
    out.update(losses.fastrcnn_losses(
        class_logits, box_regression, rois['labels'].reshape(-1),
        rois['regression_targets'].reshape(-1, 4),
        rois['valid'].reshape(-1), beta=1.0))
    # The positives come first: at most int(S * fraction) of them.
    m = int(int(c.roi_batch_size_per_image) * float(c.roi_positive_fraction))
    m = max(m, 1)
    mask_rois = rois['boxes'][:, :m]
    labels = rois['labels'][:, :m]
    mask_logits = apply(
        self._pool(features, mask_rois, maskrcnn_model.MASK_POOL_SIZE),
        method='mask_head')
    res = mask_logits.shape[1]
    targets = layers.mask_targets(batch['mask_crops'], batch['mask_boxes'],
                                  mask_rois, rois['matched_idxs'][:, :m],
                                  resolution=res)
    out['mask'] = losses.maskrcnn_mask_loss(
        mask_logits.reshape(b, m, res, res, -1), labels, targets,
        (labels > 0) & rois['valid'][:, :m])
    out['loss'] = sum(out.values())
    return out

  def train_step(self, state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    grads, out = self._trainable_grads(
        self.loss_terms, state, batch, self.model.frozen_mask(state.params),
        jax.random.key_data(key))
    updates, opt_state = self._tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics_ = {**out, 'learning_rate': self.learning_rate(state.step)}
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics_

  def detect(self, params, model_state, images, sizes
             ) -> dict[str, jax.Array]:
    """Detections (in resized-image pixels) and their 28x28 mask
    probabilities for a batch."""
    c = self.config
    axes = self._dp_axes()

    def local(params, model_state, images, sizes):
      apply = functools.partial(self.model.apply,
                                {'params': params, **model_state})
      b, h, w = images.shape[:3]
      features = apply(images, method='features')
      objectness, deltas = apply(features, method='rpn')
      proposals = layers.rpn_proposals(
          objectness, deltas, jnp.asarray(layers.rpn_anchors((h, w))),
          layers.rpn_anchors_per_level((h, w)), sizes, training=False,
          pre_nms_top_n=int(c.rpn_pre_nms_top_n_test),
          post_nms_top_n=int(c.rpn_post_nms_top_n_test), per_image=True,
          nms_thresh=float(c.rpn_nms_thresh))
      r = proposals['boxes'].shape[1]
      class_logits, box_regression = apply(
          self._pool(features, proposals['boxes'],
                     maskrcnn_model.BOX_POOL_SIZE), method='box_head')
      dets = layers.roi_detections(
          class_logits.reshape(b, r, -1), box_regression.reshape(b, r, -1),
          proposals['boxes'], proposals['valid'], sizes,
          score_thresh=float(c.score_thresh), nms_thresh=float(c.nms_thresh),
          detections_per_img=int(c.detections_per_img))
      d = dets['boxes'].shape[1]
      mask_logits = apply(
          self._pool(features, dets['boxes'], maskrcnn_model.MASK_POOL_SIZE),
          method='mask_head')
      res = mask_logits.shape[1]
      dets['masks'] = layers.mask_probabilities(
          mask_logits.reshape(b, d, res, res, -1), dets['labels'])
      return dets
    spec = P(axes or None)
    return self._data_parallel(local, in_specs=(P(), P(), spec, spec),
                               out_specs=spec)(params, model_state, images,
                                               sizes)

  def eval_step(self, state, batch):
    out = self.detect(state.params, state.model_state, batch['image'],
                      batch['image_size'])
    return {**out, 'index': batch['index'], 'mask': batch['mask']}

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    return dict(sums)

  def make_evaluator(self, mesh, abstract_state):
    return CocoMaskEvaluator(self, mesh, abstract_state)

  # --- benchmarking --------------------------------------------------------------
  def bench_batch(self, global_batch, seed):
    """Random images of the first bucket with 1-8 random boxes each and
    elliptic masks, so every stage sees positives."""
    rng = np.random.default_rng(seed)
    h, w = self.buckets[0]
    g, m = self.max_boxes, self.mask_resolution
    boxes, valid = random_boxes(rng, global_batch, g, h, w)
    yy, xx = np.mgrid[:m, :m]
    ellipse = (((yy + 0.5) / m - 0.5) ** 2 + ((xx + 0.5) / m - 0.5) ** 2
               <= 0.25).astype(np.uint8)
    return {'image': rng.normal(0, 50, (global_batch, h, w, 3)).astype(
                np.float32),
            'image_size': np.tile(np.asarray([h, w], np.int32),
                                  (global_batch, 1)),
            'boxes': boxes,
            'labels': np.where(valid, rng.integers(
                1, self.num_classes, (global_batch, g)), 0).astype(np.int32),
            'valid': valid,
            'mask_crops': np.where(valid[..., None, None], ellipse, 0).astype(
                np.uint8),
            'mask_boxes': boxes}

  # --- MLPerf logging ----------------------------------------------------------
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    c = self.config
    return {
        'global_batch_size': int(c.global_batch_size),
        'gradient_accumulation_steps': 1,
        'opt_name': 'sgd_with_momentum',
        'opt_base_learning_rate': float(c.base_learning_rate),
        'opt_learning_rate_warmup_steps': int(c.warmup_steps),
        'opt_learning_rate_warmup_factor': float(c.warmup_factor),
        'opt_learning_rate_decay_factor': float(c.decay_factor),
        'opt_learning_rate_decay_steps': [int(s) for s in c.decay_steps],
        'opt_weight_decay': float(c.weight_decay),
        'num_image_candidates': int(c.num_image_candidates),
        'min_image_size': int(c.min_size),
        'max_image_size': int(c.max_size),
    }

  def initialized_tensors(self, state: TrainState) -> list[str]:
    """The checker's 21 names of the reference's FPN and heads."""
    from jaxperf import interop  # pylint: disable=g-import-not-at-top
    del state
    return interop.maskrcnn_checker_tensor_names()


class CocoMaskEvaluator:
  """Detections and masks for every validation image on the devices, then
  bbox and segm mAP by pycocotools on the host (one compiled program per
  bucket shape; every process scores all images)."""

  def __init__(self, workload: MaskRCNN, mesh, abstract_state):
    self.w = workload
    self.loop = ReplicatedEval(workload, mesh, workload.eval_step,
                               abstract_state, slice_key='index')

  def __call__(self, state, eval_ds) -> dict[str, float]:
    from jaxperf import metrics  # pylint: disable=g-import-not-at-top
    boxes, segms = [], []
    for b, s in self.loop.outputs(state, eval_ds,
                                  lambda out: self._collect(out, eval_ds)):
      boxes += b
      segms += s
    box_stats = metrics.coco_box_map(eval_ds.coco_gt, boxes)
    segm_stats = metrics.coco_segm_map(eval_ds.coco_gt, segms)
    return {'BBOX': float(box_stats['mAP']), 'SEGM': float(segm_stats['mAP']),
            **{f'bbox_{k}': float(v) for k, v in box_stats.items()
               if k != 'mAP'},
            **{f'segm_{k}': float(v) for k, v in segm_stats.items()
               if k != 'mAP'},
            'detections': len(boxes),
            'eval_images': int(eval_ds.num_examples)}

  @staticmethod
  def _collect(out, eval_ds) -> tuple[list, list]:
    """One batch's COCO bbox and segm results, in original pixels."""
    from jaxperf import metrics  # pylint: disable=g-import-not-at-top
    host = {k: np.asarray(v) for k, v in out.items()}
    rows = np.flatnonzero(host['mask'])
    index = host['index'][rows]
    boxes = eval_ds.to_coco_results(index, host['boxes'][rows],
                                    host['scores'][rows],
                                    host['labels'][rows], host['valid'][rows])
    segms = []
    for row, i in zip(rows.tolist(), index.tolist()):
      keep = host['valid'][row]
      if not keep.any():
        continue
      height, width = (int(s) for s in eval_ds.sizes[i])
      oh, ow = (int(s) for s in eval_ds.resized_sizes[i])
      ratio = np.asarray([width / ow, height / oh] * 2, np.float32)
      pasted = metrics.paste_masks(host['masks'][row][keep],
                                   host['boxes'][row][keep] * ratio,
                                   (height, width))
      segms += eval_ds.to_coco_segm_results(
          [i], [pasted], host['scores'][row][keep][None],
          host['labels'][row][keep][None])
    return boxes, segms
