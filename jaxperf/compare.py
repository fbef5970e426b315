"""python -m jaxperf.compare: JAX vs the PyTorch references, same weights.

Builds the PyTorch reference model, copies its weights into the jaxperf model
(jaxperf.interop), runs both on the same batch in float32 and reports:
the error of the outputs in eval and in train mode, of the loss (label
smoothing 0.1) and of the gradient of every parameter; and the time of one
training step (forward, backward, SGD with momentum) in each framework, the
median of repeats after warm-up, with JAX's compile time apart.

In float32 the gradients differ by more than the outputs: a ReLU or max-pool
decision that float32 rounding tips the other way in one framework changes
that position's gradient outright, and batch-norm statistics spread it over
the channel. `--precision f64` runs both in double precision, where those
decisions agree and so do the gradients.

--model unet3d compares models/unet3d.py with jaxperf.torch_models.unet3d
(the MLPerf reference's Unet3D, same tensor names and default init) on a
random volume (`--image-size` S for an S^3 cube, or D,H,W; every side a
multiple of 32, and more than one voxel at the bottleneck, which is 1/32 of
each side: PyTorch's instance norm rejects a single voxel, so 64 is the
smallest cube and 64,32,32 the smallest volume; the reference trains on 128^3
patches). The loss is the reference's DiceCELoss: jaxperf.losses.dice_ce_loss
against torch_dice_ce_loss below. Instance norm uses each sample's own
statistics in training and evaluation alike and there is no dropout, so the
outputs are compared once ('outputs'). The timed step is SGD with Nesterov
momentum 0.9, the reference's optimizer. `--filters` narrows the network
(e.g. 8,16,32,64,80) for quick checks; `--activation leaky_relu` and
`--upsample conv_transpose` select the other variants. At full width on
64,32,32 the float32 logits agree to ~1e-6 (max_rel) and the gradients to a
few 1e-3 (norm_rel, median; ~1e-2 for the worst tensor, an instance-norm
bias): the reference's own float32 gradients are as far from its float64
ones. In float64 outputs agree to ~1e-14 and gradients to ~1e-12 or better.

--model bert compares models/bert.py with HF transformers'
BertForPreTraining (hidden_act='gelu_new', the reference's tanh GELU), with
dropout off in both, on a random batch of `--batch` rows of `--seq-len`
tokens whose odd rows are padded (see bert_batch): MLM logits at every real
token, NSP logits, the reference's pretraining loss (masked-LM
cross-entropy weighted by masked_lm_weights plus mean NSP cross-entropy)
and every parameter's gradient; the timed step is AdamW in both. Defaults:
full BERT-large (--layers 24, --hidden-size 1024, --num-heads 16,
--intermediate-size 4096, --vocab-size 30522), batch 2, --seq-len 128, which
a small CPU runs in about three minutes. HF transformers is an optional
dependency too. In float32 the logits agree to ~2e-6 (max_rel) and the
gradients to ~1e-5 or better (norm_rel); see BertPair and
tests/test_parity_bert.py. bert compares in f32 only: the model computes its
logits in float32 whatever its dtype.

--model dlrm compares models/dlrm.py (DenseArch, with the tables as
arrays looked up by jnp.take) with jaxperf.torch_models.dlrm (the MLPerf
reference's DLRM_Net: EmbeddingBag tables with sparse gradients, BCELoss on
the sigmoid output) on a random batch of `--batch` rows (default 2048, the
reference's): dense features log(1 + count) of random counts, one uniform
row index per table, random clicks (see dlrm_batch). Compared: click
probabilities and logits, the loss, the gradient of every MLP tensor and,
per table, of the rows the batch touches. The timed step is plain SGD at
the reference's learning rate 1.0: torch.optim.SGD with the sparse table
gradients, and in JAX the MLP update plus a scatter-add of the looked-up
rows' gradients into the tables. `--tables N` caps the 26 Criteo 1TB tables
at N rows each, as the reference's --max-ind-range does (default 100000:
921,165 rows, 0.47 GB of float32 per framework); `--tables a,b,...` gives
the row counts; `--tables criteo` the full tables (187,767,399 rows, 96 GB
per framework, and more for the gradients: not for a small machine).
`--embed-dim` (default 128) is also the bottom MLP's output width; the MLPs
are the reference's. At the defaults on a 2-core CPU (float32; other work
was sharing the machine, so the times are rough): probabilities agree to
1.5e-7 and the loss to 1.4e-7 (max_rel); gradients to 2.0e-4 (norm_rel,
median; 2.8e-4 worst) for the MLP tensors and 1.8e-3 (median; 3.9e-3
worst) for the tables' touched rows. That is not rounding accumulating:
two ReLU inputs lie within float32 rounding of zero, and PyTorch's float32
forward puts them on the other side than a float64 one does, which changes
those samples' gradients outright; against PyTorch in float64, the JAX
float32 gradients agree to 6e-7 (worst) and PyTorch's own float32 ones are
off by the numbers above. With `--precision f64` (batch 256, --tables 1000)
the gradients agree to ~3e-8, the float32 logits that DenseArch returns
being the limit. One step took ~150-180 ms in JAX (compile ~1.2 s) and
~210-220 ms in PyTorch (2 threads). tests/test_parity_dlrm.py checks float32
parity on batches without such inputs (gradients to ~1e-6).

--model retinanet compares models/retinanet.py with torchvision's RetinaNet
as the MLPerf reference builds it (torch_retinanet: ResNeXt50-32x4d with
frozen batch norms, FPN on layers 2-4 with P6/P7, conv1 and layer1 frozen,
the default anchor generator, head and losses), its frozen batch norms given
random statistics, on `--batch` random normalised images of `--image-size`
(a side or H,W, at least 32; default 800, the reference's training size)
with 1-5 random ground-truth boxes each (see retinanet_batch), over
`--num-classes` classes (default 264). torchvision's transform (resize,
normalise) is bypassed: model.backbone and model.head run on the images as
they are and model.compute_loss on torchvision's anchors for that size.
Compared: the head's cls_logits and bbox_regression, the anchors
(layers.retinanet_anchors against torchvision's), the classification and
box losses (losses.retinanet_losses, ground truth padded to 5 boxes) and the
gradients of the trainable parameters; the timed step is Adam (lr 1e-4) on
those in both. Batch 2, 256x256, 264 classes, float32: the logits agree to
6e-7 and the box codes to 1.3e-6 (max_rel), the anchors exactly, the losses
to 1e-7; the gradients to 1.2e-6 (norm_rel, median) and 2.5e-3 for the
worst tensor (backbone/stage2_unit3/conv1/kernel; the stage-2 kernels are
all ~1e-3 apart): a ReLU input within float32 rounding of zero that the two
put on different sides changes the gradient of every layer below it. With
--precision f64 that tensor agrees to 2.3e-8 and the median to 2.6e-8, the
JAX model's float32 head outputs being the limit (logits 5e-8; P6/P7's tiny
gradients 1e-5). One Adam step took 2.6 s in JAX (compile 12 s) and 5.8 s in
PyTorch (2 threads, channels-last), on a 2-core CPU another job was sharing.

--model maskrcnn compares models/maskrcnn.py (built in torchvision's layout:
stride on the 3x3 convolution, frozen batch norms with epsilon 1e-5) with
torchvision's Mask R-CNN as built on a pretrained backbone (torch_maskrcnn:
ResNet-50 with frozen batch norms, FPN on C2..C5 with P6, conv1 and layer1
frozen, the default RPN head, anchor generator, RoI poolers and box and mask
heads), its frozen batch norms given random statistics, on `--batch` random
normalised images of `--image-size` (a side or H,W, multiples of 32, as
both references pad their batches; default 800,1344) with 16 random
proposals each, spread over P2..P5 (see maskrcnn_proposals), over
`--num-classes` classes (default 91, torchvision's). The network parts run directly on both sides
(no resizing transform, proposal selection, sampling or losses; see
MaskRCNNPair). Compared: the FPN levels P2..P6, the RPN's objectness and
box deltas, the anchors (layers.rpn_anchors(..., style='torchvision')
against AnchorGenerator's), the proposals' 7x7 and 14x14 features
(layers.multilevel_roi_align against MultiScaleRoIAlign), the box head's
class logits and box regression and the mask logits, and the gradients of
the trainable parameters of a scalar function of all of them (sum of
mean(w * output), w fixed random weights); the timed step is SGD with
momentum 0.9 (lr 0.02) on that function. Batch 2, 128x128 (proposals on
P2 and P3), 8 classes, float32, seeds 0-2: every output agrees to ~2e-6
(max_rel), the anchors exactly; the gradients of the output layers to ~3e-6
(norm_rel), the others to 4e-4 to 8e-4 (median) and 2e-3 to 7e-3 (worst
tensor). That is float32 rounding tipping ReLU decisions, which matters at
every output position here, the function weighing them all alike:
PyTorch's own float32 gradients are as far from its float64 ones (seed 0:
median 5e-4, worst 1e-2; JAX's 7e-4 and 9e-3). At the defaults (800x1344,
91 classes, 8 proposals on each of the four levels) the outputs agree to
~4e-6 and the gradients to 1.3e-3 (median) and 4e-3 (worst). With --precision f64 the
gradients agree to ~5e-8 and the outputs to ~5e-8, the JAX model's float32
head outputs being the limit (~5e-15 for the features and pooled
features). One step at batch 2, 256x256, 91 classes took 2.2 s in JAX
(compile 9 s) and 9.7 s in PyTorch (2 threads, channels-last), on a 2-core
CPU other jobs were sharing: rough times.

Errors: max_abs = max |jax - torch|; max_rel = max_abs / max |torch|;
norm_rel = ||jax - torch|| / ||torch||.

PyTorch is an optional dependency (pip install 'jaxperf[compare]').
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxperf import interop, losses
from jaxperf.errors import UserError

LABEL_SMOOTHING = 0.1


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'jaxperf.compare needs PyTorch and torchvision ({e}); '
                    f"install them with: pip install -e '.[compare]'") from None
  return torch, torchvision


def _torch_only():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'jaxperf.compare needs PyTorch ({e}); install it with: '
                    f"pip install -e '.[compare]'") from None
  return torch


def errors(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  diff = np.abs(got - want)
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  norm = float(np.linalg.norm(want))
  return {'max_abs': float(diff.max()) if diff.size else 0.0,
          'max_rel': float(diff.max() / scale) if scale else float(diff.max()),
          'norm_rel': float(np.linalg.norm(got - want) / norm) if norm else 0.0}


def _timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _time_jax_step(step: Callable, state: Any, *args: Any, warmup: int,
                   repeats: int) -> tuple[float, list[float]]:
  """(compile seconds, per-step seconds) of `step(state, *args) -> (state,
  loss)`, jitted with the state donated and run from a copy of `state`."""
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, *args).compile()
  compile_s = time.perf_counter() - t0
  holder = [jax.tree.map(jnp.copy, state)]

  def run():
    holder[0], loss = compiled(holder[0], *args)
    jax.block_until_ready(loss)
  return compile_s, _timed(run, warmup, repeats)


def _time_torch_step(loss_fn: Callable[[], Any], opt: Any, warmup: int,
                     repeats: int) -> list[float]:
  """Per-step seconds of a PyTorch training step: zero_grad, loss_fn()
  backward, opt.step()."""
  def step():
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.step()
  return _timed(step, warmup, repeats)


def machine() -> dict[str, Any]:
  """bench's machine description plus the devices, XLA flags and PyTorch."""
  from jaxperf.bench import machine_info  # pylint: disable=g-import-not-at-top
  info = {**machine_info(),
          'devices': f'{jax.device_count()}x{jax.devices()[0].device_kind}',
          'xla_flags': os.environ.get('XLA_FLAGS', '')}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info['torch'] = torch.__version__
    info['torch_threads'] = torch.get_num_threads()
  except ImportError:
    pass
  return info


# ---------------------------------------------------------------- resnet50


class ResNet50Pair:
  """torchvision.models.resnet50 and models/resnet.py with the same weights."""

  name = 'resnet50'

  def __init__(self, *, batch: int, image_size: int, num_classes: int = 1000,
               seed: int = 0, channels_last: bool = True,
               precision: str = 'f32', wgrad: str = 'auto'):
    torch, torchvision = _torch()
    from jaxperf.models import resnet  # pylint: disable=g-import-not-at-top
    self.torch = torch
    f64 = precision == 'f64'
    if f64 and not jax.config.jax_enable_x64:
      raise UserError('f64 comparison needs jax_enable_x64 (set by '
                      '`python -m jaxperf.compare --precision f64`)')
    dtype = np.float64 if f64 else np.float32
    torch.manual_seed(seed)
    self.tmodel = torchvision.models.resnet50(num_classes=num_classes)
    if f64:
      self.tmodel = self.tmodel.double()
    from jaxperf.workloads.resnet import conv_wgrad  # pylint: disable=g-import-not-at-top
    self.wgrad = conv_wgrad(wgrad)
    self.jmodel = resnet.ResNet(num_classes=num_classes, dtype=dtype,
                                wgrad=self.wgrad)
    expected = jax.eval_shape(
        lambda: self.jmodel.init(jax.random.key(0), jnp.zeros(
            (1, image_size, image_size, 3)), train=False))
    self.variables = jax.tree.map(
        lambda a: jnp.asarray(a, dtype),
        interop.from_torch(self.name, self.tmodel.state_dict(),
                           expected=expected))
    rng = np.random.default_rng(seed)
    self.images = rng.uniform(0, 255, (batch, image_size, image_size, 3)
                              ).astype(dtype)
    self.labels = rng.integers(0, num_classes, batch).astype(np.int32)
    means = np.asarray(resnet.CHANNEL_MEANS, dtype)
    # The reference takes normalised NCHW input; ours subtracts the means.
    self.timages = torch.from_numpy(
        np.ascontiguousarray((self.images - means).transpose(0, 3, 1, 2)))
    self.tlabels = torch.from_numpy(self.labels.astype(np.int64))
    self.channels_last = channels_last
    self.num_classes = num_classes

  # --- the JAX side ---
  def jax_loss(self, params, batch_stats, images, labels, train: bool):
    variables = {'params': params, 'batch_stats': batch_stats}
    if train:
      logits, _ = self.jmodel.apply(variables, images, train=True,
                                    mutable=['batch_stats'])
    else:
      logits = self.jmodel.apply(variables, images, train=False)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, self.num_classes),
                                  LABEL_SMOOTHING)
    return optax.softmax_cross_entropy(logits, targets).mean(), logits

  def parity(self) -> dict[str, Any]:
    torch = self.torch
    p, bs = self.variables['params'], self.variables['batch_stats']
    images, labels = jnp.asarray(self.images), jnp.asarray(self.labels)
    # Eval mode.
    _, j_eval = self.jax_loss(p, bs, images, labels, train=False)
    tm = copy.deepcopy(self.tmodel).eval()
    with torch.no_grad():
      t_eval = tm(self.timages).numpy()
    # Train mode: outputs, loss and gradients.
    (j_loss, j_train), j_grads = jax.value_and_grad(
        self.jax_loss, has_aux=True)(p, bs, images, labels, True)
    tm = copy.deepcopy(self.tmodel).train()
    t_train = tm(self.timages)
    t_loss = torch.nn.functional.cross_entropy(
        t_train, self.tlabels, label_smoothing=LABEL_SMOOTHING)
    t_loss.backward()
    grads_sd = {k: v.grad for k, v in tm.named_parameters()}
    for k, v in tm.state_dict().items():      # buffers: any value will do
      grads_sd.setdefault(k, v)
    t_grads = interop.from_torch(self.name, grads_sd)['params']
    per_param = {}
    for (path, g), tg in zip(jax.tree_util.tree_flatten_with_path(j_grads)[0],
                             jax.tree.leaves(t_grads)):
      per_param['/'.join(k.key for k in path)] = errors(np.asarray(g), tg)
    worst = max(per_param, key=lambda k: per_param[k]['norm_rel'])
    rels = sorted(e['norm_rel'] for e in per_param.values())
    return {
        'outputs_eval': errors(np.asarray(j_eval), t_eval),
        'outputs_train': errors(np.asarray(j_train), t_train.detach().numpy()),
        'loss': {'jax': float(j_loss), 'torch': float(t_loss.detach()),
                 **errors(np.asarray(j_loss), t_loss.detach().numpy())},
        'grads': {'worst_norm_rel': per_param[worst]['norm_rel'],
                  'worst_param': worst,
                  'median_norm_rel': rels[len(rels) // 2],
                  'max_abs': max(e['max_abs'] for e in per_param.values()),
                  'per_param': per_param},
    }

  def timing(self, warmup: int, repeats: int, lr: float = 0.01
             ) -> dict[str, Any]:
    torch = self.torch
    tx = optax.sgd(lr, momentum=0.9)

    def step(state, images, labels):
      params, batch_stats, opt_state = state

      def loss_fn(params):
        logits, upd = self.jmodel.apply(
            {'params': params, 'batch_stats': batch_stats}, images, train=True,
            mutable=['batch_stats'])
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, self.num_classes), LABEL_SMOOTHING)
        return optax.softmax_cross_entropy(logits, targets).mean(), upd
      (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), upd['batch_stats'],
              opt_state), loss

    images, labels = jnp.asarray(self.images), jnp.asarray(self.labels)
    params = self.variables['params']
    state = (params, self.variables['batch_stats'], tx.init(params))
    compile_s, j_times = _time_jax_step(step, state, images, labels,
                                        warmup=warmup, repeats=repeats)

    tm = copy.deepcopy(self.tmodel).train()
    x = self.timages
    if self.channels_last:
      tm = tm.to(memory_format=torch.channels_last)
      x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9)
    t_times = _time_torch_step(
        lambda: torch.nn.functional.cross_entropy(
            tm(x), self.tlabels, label_smoothing=LABEL_SMOOTHING),
        opt, warmup, repeats)
    jt, tt = statistics.median(j_times), statistics.median(t_times)
    return {'jax': {'compile_s': compile_s, 'step_time_s': jt,
                    'step_times_s': j_times},
            'torch': {'step_time_s': tt, 'step_times_s': t_times,
                      'channels_last': self.channels_last,
                      'threads': torch.get_num_threads()},
            'speed_ratio_jax_over_torch': tt / jt}


# ---------------------------------------------------------------- unet3d

UNET3D_FILTERS = (32, 64, 128, 256, 320)
# Five stride-2 levels: the bottleneck is 1/32 of every side.
_UNET3D_REDUCTION = 32


def unet3d_volume(image_size: int | Sequence[int]) -> tuple[int, int, int]:
  """(D, H, W) from a cube side or three sides; UserError if unusable."""
  sides = ((image_size,) * 3 if isinstance(image_size, (int, np.integer))
           else tuple(image_size))
  if len(sides) != 3 or any(int(v) < 1 or int(v) % _UNET3D_REDUCTION
                            for v in sides):
    raise UserError(f'--image-size {image_size}: the 3D U-Net needs a cube '
                    f'side or D,H,W, each a positive multiple of '
                    f'{_UNET3D_REDUCTION}')
  if np.prod([v // _UNET3D_REDUCTION for v in sides]) < 2:
    raise UserError(
        f'--image-size {image_size}: the bottleneck would be a single voxel, '
        f'which PyTorch\'s instance norm rejects; the smallest volumes are '
        f'64 (a 64^3 cube) and 64,32,32')
  return tuple(int(v) for v in sides)


def torch_dice_ce_loss(logits, labels, *, num_classes: int = 3,
                       include_background: bool = False,
                       smooth: float = 1e-6):
  """The reference's DiceCELoss(to_onehot_y, use_softmax, NCDHW) in torch.

  As image_segmentation/pytorch/model/losses.py computes it: cross-entropy
  averaged over every voxel, plus 1 - soft Dice of softmax(logits) per
  sample and (foreground) class, averaged; the sum halved.

  Args:
    logits: [B, C, D, H, W].
    labels: integer class ids [B, D, H, W] or [B, 1, D, H, W].
    num_classes: C.
    include_background: keep class 0 in the Dice term.
    smooth: added to the Dice numerator and denominator.
  """
  torch = _torch_only()
  f = torch.nn.functional
  if labels.dim() == logits.dim():
    labels = labels[:, 0]
  labels = labels.long()
  cross_entropy = f.cross_entropy(logits, labels)
  probs = torch.softmax(logits, dim=1)
  target = f.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3).to(probs.dtype)
  if not include_background:
    probs, target = probs[:, 1:], target[:, 1:]
  axes = tuple(range(2, logits.dim()))
  intersection = torch.sum(target * probs, dim=axes)
  dice = (2.0 * intersection + smooth) / (
      torch.sum(target, dim=axes) + torch.sum(probs, dim=axes) + smooth)
  return (torch.mean(1.0 - dice) + cross_entropy) / 2


def _grad_errors(j_grads: Any, t_grads: Any,
                 zero: Callable[[str], bool] | None = None) -> dict[str, Any]:
  """Per-parameter errors of two gradient trees of the same structure.

  Parameters for which `zero(name)` holds have a zero gradient in exact
  arithmetic, so both frameworks return rounding noise there and a relative
  error means nothing: they are listed (per_param, zero_grad_max_abs) but
  left out of the worst and median.
  """
  want = {'/'.join(k.key for k in path): g for path, g in
          jax.tree_util.tree_flatten_with_path(t_grads)[0]}
  per_param = {}
  for path, g in jax.tree_util.tree_flatten_with_path(j_grads)[0]:
    name = '/'.join(k.key for k in path)
    per_param[name] = errors(np.asarray(g), want[name])
  zeros = [k for k in per_param if zero is not None and zero(k)]
  ranked = [k for k in per_param if k not in zeros]
  worst = max(ranked, key=lambda k: per_param[k]['norm_rel'])
  rels = sorted(per_param[k]['norm_rel'] for k in ranked)
  out = {'worst_norm_rel': per_param[worst]['norm_rel'],
         'worst_param': worst,
         'median_norm_rel': rels[len(rels) // 2],
         'max_abs': max(e['max_abs'] for e in per_param.values()),
         'per_param': per_param}
  if zeros:
    out['zero_grad_params'] = zeros
    out['zero_grad_max_abs'] = max(per_param[k]['max_abs'] for k in zeros)
  return out


class Unet3DPair:
  """jaxperf.torch_models.unet3d.Unet3D and models/unet3d.py, same weights.

  `image_size` is a cube side or (D, H, W); see unet3d_volume.
  """

  name = 'unet3d'

  def __init__(self, *, batch: int, image_size: int | Sequence[int],
               num_classes: int = 3, seed: int = 0,
               channels_last: bool = True, precision: str = 'f32',
               wgrad: str = 'auto', filters: Sequence[int] = UNET3D_FILTERS,
               activation: str = 'relu', upsample: str = 'projection'):
    torch = _torch_only()
    from jaxperf.models import unet3d  # pylint: disable=g-import-not-at-top
    from jaxperf.torch_models import unet3d as torch_unet3d  # pylint: disable=g-import-not-at-top
    from jaxperf.workloads.resnet import conv_wgrad  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.volume = unet3d_volume(image_size)
    filters = tuple(int(v) for v in filters)
    if len(filters) != 5 or min(filters) < 1:
      raise UserError(f'--filters {list(filters)}: expected 5 positive widths '
                      f'(the reference: {list(UNET3D_FILTERS)})')
    if activation not in unet3d.ACTIVATIONS:
      raise UserError(f'--activation {activation!r}: expected one of '
                      f'{list(unet3d.ACTIVATIONS)}')
    if upsample not in ('projection', 'conv_transpose'):
      raise UserError(f'--upsample {upsample!r}: expected projection or '
                      f'conv_transpose')
    if num_classes < 2:
      raise UserError('the Dice term excludes the background: --num-classes '
                      'must be >= 2')
    f64 = precision == 'f64'
    if f64 and not jax.config.jax_enable_x64:
      raise UserError('f64 comparison needs jax_enable_x64 (set by '
                      '`python -m jaxperf.compare --precision f64`)')
    dtype = np.float64 if f64 else np.float32
    torch.manual_seed(seed)
    self.tmodel = torch_unet3d.Unet3D(in_channels=1, n_class=num_classes,
                                      activation=activation, filters=filters)
    if f64:
      self.tmodel = self.tmodel.double()
    self.wgrad = conv_wgrad(wgrad)
    self.jmodel = unet3d.UNet3D(n_class=num_classes, filters=filters,
                                activation=activation, dtype=dtype,
                                wgrad=self.wgrad, upsample=upsample)
    expected = jax.eval_shape(lambda: self.jmodel.init(
        jax.random.key(0), jnp.zeros((1, *self.volume, 1), dtype)))
    self.variables = jax.tree.map(
        lambda a: jnp.asarray(a, dtype),
        interop.from_torch(self.name, self.tmodel.state_dict(),
                           expected=expected))
    rng = np.random.default_rng(seed)
    # Normalised CT intensities: zero mean, unit variance.
    self.images = rng.standard_normal((batch, *self.volume, 1)).astype(dtype)
    self.labels = rng.integers(0, num_classes, (batch, *self.volume)
                               ).astype(np.int32)
    self.timages = torch.from_numpy(
        np.ascontiguousarray(self.images.transpose(0, 4, 1, 2, 3)))
    self.tlabels = torch.from_numpy(self.labels.astype(np.int64))
    self.channels_last = channels_last
    self.num_classes = num_classes
    self.settings = {'volume': list(self.volume), 'filters': list(filters),
                     'activation': activation, 'upsample': upsample,
                     'num_params': int(sum(p.numel() for p in
                                           self.tmodel.parameters()))}

  # --- the JAX side ---
  def jax_loss(self, params, images, labels):
    logits = self.jmodel.apply({'params': params}, images)
    return losses.dice_ce_loss(logits, labels,
                               num_classes=self.num_classes), logits

  def torch_loss(self, logits):
    return torch_dice_ce_loss(logits, self.tlabels,
                              num_classes=self.num_classes)

  def parity(self) -> dict[str, Any]:
    images, labels = jnp.asarray(self.images), jnp.asarray(self.labels)
    (j_loss, j_logits), j_grads = jax.jit(jax.value_and_grad(
        self.jax_loss, has_aux=True))(self.variables['params'], images, labels)
    tm = copy.deepcopy(self.tmodel).train()
    t_logits = tm(self.timages)
    t_loss = self.torch_loss(t_logits)
    t_loss.backward()
    t_grads = interop.from_torch(
        self.name, {k: v.grad for k, v in tm.named_parameters()})['params']
    t_out = t_logits.detach().numpy().transpose(0, 2, 3, 4, 1)
    return {
        'outputs': errors(np.asarray(j_logits), t_out),
        'outputs_note': 'training and evaluation mode compute the same '
                        'function (instance norm, no running statistics, no '
                        'dropout): compared once',
        'loss': {'jax': float(j_loss), 'torch': float(t_loss.detach()),
                 **errors(np.asarray(j_loss), t_loss.detach().numpy())},
        'grads': _grad_errors(j_grads, t_grads),
    }

  def timing(self, warmup: int, repeats: int, lr: float = 0.01
             ) -> dict[str, Any]:
    torch = self.torch
    tx = optax.sgd(lr, momentum=0.9, nesterov=True)

    def step(state, images, labels):
      params, opt_state = state
      (loss, _), grads = jax.value_and_grad(self.jax_loss, has_aux=True)(
          params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    images, labels = jnp.asarray(self.images), jnp.asarray(self.labels)
    params = self.variables['params']
    state = (params, tx.init(params))
    compile_s, j_times = _time_jax_step(step, state, images, labels,
                                        warmup=warmup, repeats=repeats)

    tm = copy.deepcopy(self.tmodel).train()
    x = self.timages
    if self.channels_last:
      tm = tm.to(memory_format=torch.channels_last_3d)
      x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9, nesterov=True)
    t_times = _time_torch_step(lambda: self.torch_loss(tm(x)), opt, warmup,
                               repeats)
    jt, tt = statistics.median(j_times), statistics.median(t_times)
    return {'jax': {'compile_s': compile_s, 'step_time_s': jt,
                    'step_times_s': j_times},
            'torch': {'step_time_s': tt, 'step_times_s': t_times,
                      'channels_last': self.channels_last,
                      'threads': torch.get_num_threads()},
            'speed_ratio_jax_over_torch': tt / jt}


# ---------------------------------------------------------------- bert

# BERT masks 15% of the tokens; max_predictions_per_seq is 76 at 512 tokens
# (MLPerf) and 20 at 128 (the original BERT's phase 1).
_BERT_MASKED_FRACTION = 0.15
_BERT_MAX_PREDICTIONS = {128: 20, 512: 76}


def _transformers():
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'--model bert compares with HF transformers ({e}); '
                    f"install it with: pip install -e '.[compare]'") from None
  return transformers


def bert_batch(*, batch: int, seq_len: int, vocab_size: int,
               max_predictions: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A random unpacked pretraining batch, padded the way BERT pads.

  Even rows fill all `seq_len` tokens, odd rows 5/8 of them (the rest is
  padding: input mask 0). Token ids are 1.. for real tokens and 0 ([PAD])
  for padding. Segment ids mark two sentences. Each row masks
  round(0.15 * its length) tokens (at most `max_predictions`, at least 1)
  other than [CLS]; the remaining prediction slots are position 0 with
  weight 0, as the reference's data has them. Keys: the model's inputs
  (input_ids, segment_ids, sequence_ids = input mask, position_ids,
  masked_lm_positions, next_sentence_positions = 0) and the labels
  (masked_lm_ids, masked_lm_weights, next_sentence_labels,
  next_sentence_weights).
  """
  rng = np.random.default_rng(seed)
  b, s, p = batch, seq_len, max_predictions
  lengths = np.where(np.arange(b) % 2 == 0, s, max(2, (5 * s) // 8))
  pos = np.arange(s)
  mask = (pos[None, :] < lengths[:, None]).astype(np.int32)
  segment = ((pos[None, :] >= (lengths[:, None] + 1) // 2) & (mask > 0))
  positions = np.zeros((b, p), np.int32)
  weights = np.zeros((b, p), np.float32)
  for i, n_tok in enumerate(lengths):
    n = int(min(p, n_tok - 1, max(1, round(_BERT_MASKED_FRACTION * n_tok))))
    positions[i, :n] = np.sort(rng.choice(np.arange(1, n_tok), n,
                                          replace=False))
    weights[i, :n] = 1.0
  return {
      # Token 0 is [PAD], only where the mask is 0: HF's word embedding has
      # padding_idx 0 and drops its gradient, the reference's does not.
      'input_ids': (rng.integers(1, vocab_size, (b, s)) * mask
                    ).astype(np.int32),
      'segment_ids': segment.astype(np.int32),
      'sequence_ids': mask,
      'position_ids': np.broadcast_to(pos, (b, s)).astype(np.int32).copy(),
      'masked_lm_positions': positions,
      'next_sentence_positions': np.zeros((b, 1), np.int32),
      'masked_lm_ids': (rng.integers(1, vocab_size, (b, p)) * (weights > 0)
                        ).astype(np.int32),
      'masked_lm_weights': weights,
      'next_sentence_labels': rng.integers(0, 2, (b, 1)).astype(np.int32),
      'next_sentence_weights': np.ones((b, 1), np.float32),
  }


def torch_pretraining_loss(mlm_logits, nsp_logits, masked_lm_ids,
                           masked_lm_weights, next_sentence_labels):
  """The MLPerf reference's pretraining loss, in torch.

  As run_pretraining.py computes it: the masked-LM cross-entropy summed over
  the predictions with their weights, divided by (sum of weights + 1e-5),
  plus the mean next-sentence cross-entropy. mlm_logits [B, P, V],
  nsp_logits [B, 2] or [B, 1, 2].
  """
  torch = _torch_only()
  f = torch.nn.functional
  logp = f.log_softmax(mlm_logits, dim=-1)
  nll = -torch.gather(logp, -1, masked_lm_ids.long()[..., None])[..., 0]
  w = masked_lm_weights.to(logp.dtype)
  mlm = torch.sum(nll * w) / (torch.sum(w) + 1e-5)
  nsp = f.cross_entropy(nsp_logits.reshape(-1, 2),
                        next_sentence_labels.reshape(-1).long())
  return mlm + nsp


class BertPair:
  """HF transformers' BertForPreTraining and models/bert.py, same weights.

  HF's BertConfig(hidden_act='gelu_new') is the reference's tanh GELU;
  both run with dropout off (HF in eval mode, JAX deterministic). The JAX
  model sees the batch in its unpacked form (bert_batch). Compared: the
  MLM logits at every real (unpadded) token (HF's prediction_logits; the
  JAX head run at all positions), the NSP logits, the pretraining loss
  (jaxperf.workloads.bert.pretraining_losses against
  torch_pretraining_loss) and the gradient of every parameter. For the loss,
  the gradients and the timed step the HF side runs its heads (the same
  modules: cls.predictions, cls.seq_relationship) on the masked positions
  only, as the reference and the JAX model do. The timed step is AdamW in
  both (optax.adamw, torch.optim.AdamW); the reference's LAMB is not in
  PyTorch, and the update is the same elementwise work either way.
  """

  name = 'bert'

  def __init__(self, *, batch: int, seq_len: int = 128, num_layers: int = 24,
               hidden_size: int = 1024, num_heads: int = 16,
               intermediate_size: int = 4096, vocab_size: int = 30522,
               max_predictions: int | None = None, seed: int = 0,
               precision: str = 'f32'):
    torch = _torch_only()
    transformers = _transformers()
    from jaxperf.models import bert  # pylint: disable=g-import-not-at-top
    self.torch = torch
    if min(batch, num_layers, hidden_size, num_heads, intermediate_size,
           vocab_size) < 1:
      raise UserError('--batch, --layers, --hidden-size, --num-heads, '
                      '--intermediate-size and --vocab-size must be >= 1')
    if hidden_size % num_heads:
      raise UserError(f'--hidden-size {hidden_size} is not a multiple of '
                      f'--num-heads {num_heads}')
    max_position = bert.LARGE.max_position
    if not 2 <= seq_len <= max_position:
      raise UserError(f'--seq-len {seq_len}: expected 2..{max_position} '
                      f'(BERT has {max_position} positions)')
    if max_predictions is None:
      max_predictions = _BERT_MAX_PREDICTIONS.get(
          seq_len, max(1, round(_BERT_MASKED_FRACTION * seq_len)))
    if not 1 <= max_predictions <= seq_len:
      raise UserError(f'--max-predictions {max_predictions}: expected '
                      f'1..{seq_len}')
    if precision != 'f32':
      raise UserError(
          f'--precision {precision}: bert compares in f32 only; '
          f'models/bert.py computes its MLM and NSP logits in float32 by '
          f'design (preferred_element_type), so a float64 run would still '
          f'round there (~5e-8) and show nothing more')
    dtype = np.float32
    self.cfg = bert.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
        num_heads=num_heads, intermediate_size=intermediate_size,
        max_position=max_position)
    hf_cfg = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, hidden_act='gelu_new',
        max_position_embeddings=max_position,
        type_vocab_size=self.cfg.type_vocab_size,
        layer_norm_eps=self.cfg.layer_norm_eps,
        initializer_range=self.cfg.initializer_range)
    torch.manual_seed(seed)
    self.tmodel = transformers.BertForPreTraining(hf_cfg).eval()
    self.jmodel = bert.BertForPreTraining(self.cfg, dtype=dtype)
    self.variables = jax.tree.map(
        lambda a: jnp.asarray(a, dtype),
        interop.from_torch(self.name, self.tmodel.state_dict(),
                           num_heads=num_heads))
    self.batch = bert_batch(batch=batch, seq_len=seq_len,
                            vocab_size=vocab_size,
                            max_predictions=max_predictions, seed=seed)
    self.tbatch = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == 'i'
                                       else v.astype(dtype))
                   for k, v in self.batch.items()}
    self.settings = {
        'seq_len': seq_len, 'num_layers': num_layers,
        'hidden_size': hidden_size, 'num_heads': num_heads,
        'intermediate_size': intermediate_size, 'vocab_size': vocab_size,
        'max_predictions': max_predictions,
        'padded_rows': int(np.sum(self.batch['sequence_ids'].min(axis=1) == 0)),
        'masked_predictions': int(self.batch['masked_lm_weights'].sum()),
        'num_params': int(sum(p.numel() for p in self.tmodel.parameters())),
        'transformers': transformers.__version__,
        'hf_attention': getattr(self.tmodel.config, '_attn_implementation',
                                None)}

  # --- the JAX side ---
  def _inputs(self, masked_lm_positions=None):
    b = self.batch
    return tuple(jnp.asarray(b[k]) for k in (
        'input_ids', 'segment_ids', 'sequence_ids', 'position_ids')) + (
            jnp.asarray(b['masked_lm_positions'] if masked_lm_positions is None
                        else masked_lm_positions),
            jnp.asarray(b['next_sentence_positions']))

  def jax_loss(self, params, inputs, labels):
    from jaxperf.workloads.bert import pretraining_losses  # pylint: disable=g-import-not-at-top
    mlm, nsp = self.jmodel.apply({'params': params}, *inputs,
                                 deterministic=True)
    return pretraining_losses(mlm, nsp, labels)['loss'], (mlm, nsp)

  def _labels(self):
    return {k: jnp.asarray(self.batch[k]) for k in (
        'masked_lm_ids', 'masked_lm_weights', 'next_sentence_labels',
        'next_sentence_weights')}

  # --- the PyTorch side ---
  def torch_heads(self, model):
    """(MLM logits at the masked positions [B, P, V], NSP logits [B, 2])."""
    torch, t = self.torch, self.tbatch
    seq, pooled = model.bert(input_ids=t['input_ids'],
                             attention_mask=t['sequence_ids'],
                             token_type_ids=t['segment_ids'],
                             position_ids=t['position_ids'])[:2]
    index = t['masked_lm_positions'][..., None].expand(-1, -1, seq.shape[-1])
    mlm = model.cls.predictions(torch.gather(seq, 1, index))
    return mlm, model.cls.seq_relationship(pooled)

  def torch_loss(self, model):
    mlm, nsp = self.torch_heads(model)
    t = self.tbatch
    return torch_pretraining_loss(mlm, nsp, t['masked_lm_ids'],
                                  t['masked_lm_weights'],
                                  t['next_sentence_labels'])

  def parity(self) -> dict[str, Any]:
    torch, t = self.torch, self.tbatch
    params = self.variables['params']
    s = self.batch['input_ids'].shape[1]
    all_positions = np.broadcast_to(np.arange(s, dtype=np.int32),
                                    self.batch['input_ids'].shape)
    j_mlm, j_nsp = jax.jit(self.jmodel.apply)(
        {'params': params}, *self._inputs(all_positions))
    with torch.no_grad():
      out = self.tmodel(input_ids=t['input_ids'],
                        attention_mask=t['sequence_ids'],
                        token_type_ids=t['segment_ids'],
                        position_ids=t['position_ids'])
    real = self.batch['sequence_ids'].astype(bool)
    t_mlm = out.prediction_logits.numpy()
    padded = [i for i in range(real.shape[0]) if not real[i].all()]
    (j_loss, _), j_grads = jax.jit(jax.value_and_grad(
        self.jax_loss, has_aux=True))(params, self._inputs(), self._labels())
    tm = copy.deepcopy(self.tmodel).eval()
    t_loss = self.torch_loss(tm)
    t_loss.backward()
    t_grads = interop.from_torch(
        self.name, {k: v.grad for k, v in tm.named_parameters()},
        num_heads=self.cfg.num_heads)['params']
    result = {
        'mlm_logits': errors(np.asarray(j_mlm)[real], t_mlm[real]),
        'nsp_logits': errors(np.asarray(j_nsp)[:, 0],
                             out.seq_relationship_logits.numpy()),
        'loss': {'jax': float(j_loss), 'torch': float(t_loss.detach()),
                 **errors(np.asarray(j_loss), t_loss.detach().numpy())},
        # Softmax ignores a shift shared by all keys, and q . b_k is one:
        # the key biases' gradient is zero in exact arithmetic.
        'grads': _grad_errors(j_grads, t_grads,
                              zero=lambda k: k.endswith('attention/key/bias')),
        'outputs_note': 'dropout off (HF eval mode, JAX deterministic); MLM '
                        'logits at every real token, padding excluded',
    }
    if padded:
      i = padded[0]
      result['mlm_logits_padded_row'] = errors(np.asarray(j_mlm)[i][real[i]],
                                               t_mlm[i][real[i]])
    return result

  def timing(self, warmup: int, repeats: int, lr: float = 1e-4
             ) -> dict[str, Any]:
    torch = self.torch
    tx = optax.adamw(lr, weight_decay=0.01)

    def step(state, inputs, labels):
      params, opt_state = state
      (loss, _), grads = jax.value_and_grad(self.jax_loss, has_aux=True)(
          params, inputs, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    inputs, labels = self._inputs(), self._labels()
    params = self.variables['params']
    state = (params, tx.init(params))
    compile_s, j_times = _time_jax_step(step, state, inputs, labels,
                                        warmup=warmup, repeats=repeats)
    del state

    tm = copy.deepcopy(self.tmodel).eval()    # eval: dropout off, as in JAX
    opt = torch.optim.AdamW(tm.parameters(), lr=lr, weight_decay=0.01)
    t_times = _time_torch_step(lambda: self.torch_loss(tm), opt, warmup,
                               repeats)
    jt, tt = statistics.median(j_times), statistics.median(t_times)
    return {'jax': {'compile_s': compile_s, 'step_time_s': jt,
                    'step_times_s': j_times},
            'torch': {'step_time_s': tt, 'step_times_s': t_times,
                      'threads': torch.get_num_threads()},
            'speed_ratio_jax_over_torch': tt / jt}


# ---------------------------------------------------------------- dlrm

# The reference's MLPerf run: batch 2048, plain SGD at learning rate 1.0
# (bench/run_and_time.sh; the warm-up and decay schedule aside).
DLRM_BATCH = 2048
DLRM_LR = 1.0
# Rows per table by default: the Criteo 1TB tables capped at this many, as
# the reference's --max-ind-range caps them (at 40,000,000 in MLPerf).
DLRM_TABLE_CAP = 100_000


def dlrm_table_sizes(tables: int | str | Sequence[int] = DLRM_TABLE_CAP
                     ) -> tuple[int, ...]:
  """Row counts from --tables: N caps the 26 Criteo 1TB tables at N rows
  each, 'criteo' keeps them whole, a sequence gives the counts as is."""
  from jaxperf.models import dlrm  # pylint: disable=g-import-not-at-top
  if isinstance(tables, str):
    if tables.strip().lower() == 'criteo':
      return tuple(dlrm.CRITEO_1TB_TABLE_SIZES)
    values = _ints('--tables', tables)
    tables = values[0] if len(values) == 1 else values
  if isinstance(tables, (int, np.integer)):
    if tables < 1:
      raise UserError(f'--tables {tables}: the row cap must be >= 1')
    return tuple(min(int(n), int(tables))
                 for n in dlrm.CRITEO_1TB_TABLE_SIZES)
  sizes = tuple(int(n) for n in tables)
  if not sizes or min(sizes) < 1:
    raise UserError(f'--tables {",".join(map(str, sizes))}: expected '
                    f'positive row counts')
  return sizes


def dlrm_batch(*, batch: int, table_sizes: Sequence[int], num_dense: int = 13,
               seed: int = 0) -> dict[str, np.ndarray]:
  """A random Criteo-like batch: dense [B, 13] float32, the log(1 + count)
  of random counts as the reference's loader transforms them; sparse
  [B, T] int32, one row index per table, uniform over its rows; labels [B]
  float32 clicks."""
  rng = np.random.default_rng(seed)
  counts = rng.geometric(0.02, (batch, num_dense)) - 1
  return {'dense': np.log1p(counts).astype(np.float32),
          'sparse': np.stack([rng.integers(0, n, batch) for n in table_sizes],
                             axis=1).astype(np.int32),
          'labels': rng.integers(0, 2, batch).astype(np.float32)}


def dlrm_lookup(tables: Sequence[jax.Array], sparse: jax.Array) -> jax.Array:
  """[B, T] indices -> [B, T, D]: row sparse[:, t] of each table t."""
  return jnp.stack([jnp.take(table, sparse[:, t], axis=0)
                    for t, table in enumerate(tables)], axis=1)


class DLRMPair:
  """jaxperf.torch_models.dlrm.DLRM and models/dlrm.py, same weights.

  `tables` is a row cap for the Criteo tables, 'criteo' or row counts (see
  dlrm_table_sizes); the MLPs are the reference's, the bottom one ending in
  `embed_dim`. precision 'f64' runs both in float64 (needs
  jax_enable_x64), except the float32 logits that DenseArch returns.

  The PyTorch side is the reference's DLRM_Net (EmbeddingBag tables with
  sparse gradients, BCELoss on the sigmoid output); the JAX side is
  DenseArch on rows looked up with jnp.take, the loss the same binary
  cross-entropy computed from the logits. Compared: probabilities and
  logits, the loss, the gradient of every MLP tensor and, per table, of the
  rows the batch touches (PyTorch's coalesced sparse gradient against those
  rows of JAX's gradient of the whole table). The timed step is plain SGD
  (the reference's) in both: PyTorch's torch.optim.SGD with the sparse
  table gradients, JAX's a scatter-add of the looked-up rows' gradients
  into the tables.
  """

  name = 'dlrm'

  def __init__(self, *, batch: int = DLRM_BATCH,
               tables: int | str | Sequence[int] = DLRM_TABLE_CAP,
               embed_dim: int = 128, seed: int = 0, precision: str = 'f32'):
    torch = _torch_only()
    from jaxperf.models import dlrm  # pylint: disable=g-import-not-at-top
    from jaxperf.torch_models import dlrm as torch_dlrm  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.torch_dlrm = torch_dlrm
    if batch < 1 or embed_dim < 1:
      raise UserError('--batch and --embed-dim must be >= 1')
    f64 = precision == 'f64'
    if f64 and not jax.config.jax_enable_x64:
      raise UserError('f64 comparison needs jax_enable_x64 (set by '
                      '`python -m jaxperf.compare --precision f64`)')
    dtype = np.float64 if f64 else np.float32
    table_sizes = dlrm_table_sizes(tables)
    bottom = dlrm.MLPERF.bottom_mlp[:-1] + (embed_dim,)
    self.cfg = dlrm.DLRMConfig(table_sizes=table_sizes, embed_dim=embed_dim,
                               bottom_mlp=bottom)
    torch.manual_seed(seed)
    self.tmodel = torch_dlrm.DLRM(table_sizes, embed_dim=embed_dim,
                                  bottom=bottom, top=self.cfg.top_mlp,
                                  num_dense=self.cfg.num_dense, sparse=True)
    if f64:
      self.tmodel = self.tmodel.double()
    self.jmodel = dlrm.DenseArch(self.cfg, dtype=dtype)
    variables = interop.from_torch(self.name, self.tmodel.state_dict())
    self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype),
                               variables['params'])
    self.tables = [jnp.asarray(t, dtype) for t in variables['tables']]
    self.batch = dlrm_batch(batch=batch, table_sizes=table_sizes,
                            num_dense=self.cfg.num_dense, seed=seed)
    for key in ('dense', 'labels'):
      self.batch[key] = self.batch[key].astype(dtype)
    self.tbatch = {'dense': torch.from_numpy(self.batch['dense']),
                   'sparse': torch.from_numpy(
                       self.batch['sparse'].astype(np.int64)),
                   'labels': torch.from_numpy(self.batch['labels'])}
    rows = int(sum(table_sizes))
    self.settings = {
        'num_tables': len(table_sizes), 'table_rows': rows,
        'table_sizes': list(table_sizes), 'embed_dim': embed_dim,
        'bottom_mlp': list(bottom), 'top_mlp': list(self.cfg.top_mlp),
        'tables_gb': rows * embed_dim * np.dtype(dtype).itemsize / 1e9,
        'num_params': dlrm.param_count(self.cfg),
        'mlp_params': dlrm.mlp_param_count(self.cfg),
        'touched_rows': int(sum(len(np.unique(self.batch['sparse'][:, t]))
                                for t in range(len(table_sizes))))}

  # --- the JAX side ---
  def jax_loss(self, params, tables, dense, sparse, labels):
    # DenseArch returns float32 logits; f64 runs take the loss in float64.
    logits = self.jmodel.apply({'params': params}, dense,
                               dlrm_lookup(tables, sparse)).astype(labels.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), logits

  def _inputs(self):
    return tuple(jnp.asarray(self.batch[k])
                 for k in ('dense', 'sparse', 'labels'))

  def torch_loss(self, model):
    t = self.tbatch
    return self.torch_dlrm.bce_loss(model(t['dense'], t['sparse']),
                                    t['labels'])

  def parity(self) -> dict[str, Any]:
    torch, t = self.torch, self.tbatch
    (j_loss, j_logits), (j_gparams, j_gtables) = jax.jit(jax.value_and_grad(
        self.jax_loss, argnums=(0, 1), has_aux=True))(
            self.params, self.tables, *self._inputs())
    tm = copy.deepcopy(self.tmodel).train()
    t_logits = tm.logits(t['dense'], t['sparse'])
    t_probs = torch.sigmoid(t_logits)
    t_loss = self.torch_dlrm.bce_loss(t_probs, t['labels'])
    t_loss.backward()
    # The tables' values stand in for their (sparse) gradients: only the
    # MLP gradients are read from this tree.
    grads_sd = {k: (v.grad if k.startswith(('bot_l', 'top_l')) else v)
                for k, v in tm.named_parameters()}
    t_gparams = interop.from_torch(self.name, grads_sd)['params']
    j_rows, t_rows = {}, {}
    for i, emb in enumerate(tm.emb_l):
      g = emb.weight.grad
      if g.is_sparse:
        g = g.coalesce()
        rows, values = g.indices()[0].numpy(), g.values().numpy()
      else:
        rows = np.unique(self.batch['sparse'][:, i])
        values = g.numpy()[rows]
      t_rows[str(i)] = values
      j_rows[str(i)] = np.asarray(j_gtables[i])[rows]
    grads = _grad_errors({**j_gparams, 'tables': j_rows},
                         {**t_gparams, 'tables': t_rows})
    tables = [e['norm_rel'] for k, e in grads['per_param'].items()
              if k.startswith('tables/')]
    mlp = [e['norm_rel'] for k, e in grads['per_param'].items()
           if not k.startswith('tables/')]
    grads.update(tables_worst_norm_rel=max(tables),
                 tables_median_norm_rel=float(np.median(tables)),
                 mlp_worst_norm_rel=max(mlp),
                 mlp_median_norm_rel=float(np.median(mlp)))
    return {
        'probabilities': errors(np.asarray(jax.nn.sigmoid(j_logits)),
                                t_probs.detach().numpy()),
        'logits': errors(np.asarray(j_logits), t_logits.detach().numpy()),
        'loss': {'jax': float(j_loss), 'torch': float(t_loss.detach()),
                 **errors(np.asarray(j_loss), t_loss.detach().numpy())},
        'grads': grads,
        'outputs_note': 'no dropout or batch statistics: training and '
                        'evaluation compute the same function; table '
                        'gradients compared on the rows the batch touches',
    }

  def timing(self, warmup: int, repeats: int, lr: float = DLRM_LR
             ) -> dict[str, Any]:
    torch = self.torch
    tx = optax.sgd(lr)

    def step(state, dense, sparse, labels):
      params, tables = state

      def loss_fn(params, emb):
        logits = self.jmodel.apply({'params': params}, dense, emb)
        return optax.sigmoid_binary_cross_entropy(
            logits.astype(labels.dtype), labels).mean()
      loss, (g_params, g_emb) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
          params, dlrm_lookup(tables, sparse))
      updates, _ = tx.update(g_params, tx.init(params), params)
      # Sparse SGD: only the looked-up rows change (repeated rows add up).
      tables = [table.at[sparse[:, t]].add(-lr * g_emb[:, t])
                for t, table in enumerate(tables)]
      return (optax.apply_updates(params, updates), tables), loss

    state = (self.params, self.tables)
    compile_s, j_times = _time_jax_step(step, state, *self._inputs(),
                                        warmup=warmup, repeats=repeats)
    del state

    tm = copy.deepcopy(self.tmodel).train()
    opt = torch.optim.SGD(tm.parameters(), lr=lr)
    t_times = _time_torch_step(lambda: self.torch_loss(tm), opt, warmup,
                               repeats)
    jt, tt = statistics.median(j_times), statistics.median(t_times)
    return {'jax': {'compile_s': compile_s, 'step_time_s': jt,
                    'step_times_s': j_times},
            'torch': {'step_time_s': tt, 'step_times_s': t_times,
                      'sparse_grads': True,
                      'threads': torch.get_num_threads()},
            'lr': lr,
            'speed_ratio_jax_over_torch': tt / jt}


# ---------------------------------------------------------------- retinanet

# The MLPerf reference's classes (OpenImages-v6 MLPerf subset) and image size.
RETINANET_NUM_CLASSES = 264
RETINANET_IMAGE_SIZE = 800
# Ground-truth boxes per random image: 1..RETINANET_MAX_BOXES, padded to it.
RETINANET_MAX_BOXES = 5
# Adam's learning rate in the timed step (the reference's base rate).
RETINANET_LR = 1e-4


def retinanet_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
  """(H, W) from a side or two sides; UserError if too small.

  Every side must be at least 32 pixels, the smallest for which the
  reference runs; P7, 1/128 of each side rounded up, then has one location.
  """
  sides = ((image_size,) * 2 if isinstance(image_size, (int, np.integer))
           else tuple(image_size))
  if len(sides) != 2 or any(int(v) < 32 for v in sides):
    raise UserError(f'--image-size {image_size}: RetinaNet needs a side or '
                    f'H,W, each at least 32 pixels')
  return tuple(int(v) for v in sides)


def retinanet_batch(*, batch: int, image_size: Sequence[int],
                    num_classes: int, max_boxes: int = RETINANET_MAX_BOXES,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A random detection batch at the model's input size, float32.

  Keys: 'image' [B, H, W, 3], uniform [0, 1) pixels normalised by the
  ImageNet mean and standard deviation as the reference's transform does;
  'boxes' [B, G, 4] (x1, y1, x2, y2), G = `max_boxes`, 1..G boxes per image
  whose sides are 5-60% of the image's, all inside it; 'labels' [B, G]
  int32 class ids in [0, num_classes); 'valid' [B, G] bool, False for the
  padding (zero boxes, label 0).
  """
  from jaxperf.models import retinanet  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  h, w = image_size
  pixels = rng.uniform(0, 1, (batch, h, w, 3))
  images = ((pixels - np.asarray(retinanet.IMAGE_MEAN))
            / np.asarray(retinanet.IMAGE_STD)).astype(np.float32)
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  labels = np.zeros((batch, max_boxes), np.int32)
  valid = np.zeros((batch, max_boxes), bool)
  for i in range(batch):
    n = int(rng.integers(1, max_boxes + 1))
    size = rng.uniform(0.05, 0.6, (n, 2)) * (w, h)
    x1 = rng.uniform(0, w - size[:, 0])
    y1 = rng.uniform(0, h - size[:, 1])
    boxes[i, :n] = np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], 1)
    labels[i, :n] = rng.integers(0, num_classes, n)
    valid[i, :n] = True
  return {'image': images, 'boxes': boxes, 'labels': labels, 'valid': valid}


def torch_retinanet(num_classes: int = RETINANET_NUM_CLASSES):
  """torchvision's RetinaNet as the MLPerf reference builds it.

  The ResNeXt50-32x4d body with FrozenBatchNorm2d, an FPN on layers 2-4
  with P6/P7 from P5 (LastLevelP6P7(256, 256)), three trainable backbone
  layers (conv1 and layer1 frozen), torchvision's default anchor generator,
  head and loss. Randomly initialised from torch's global generator.
  """
  _, torchvision = _torch()
  from torchvision.models.detection import backbone_utils  # pylint: disable=g-import-not-at-top
  from torchvision.ops import feature_pyramid_network, misc  # pylint: disable=g-import-not-at-top
  body = torchvision.models.resnext50_32x4d(
      norm_layer=misc.FrozenBatchNorm2d)
  backbone = backbone_utils._resnet_fpn_extractor(  # pylint: disable=protected-access
      body, trainable_layers=3, returned_layers=[2, 3, 4],
      extra_blocks=feature_pyramid_network.LastLevelP6P7(256, 256))
  return torchvision.models.detection.RetinaNet(backbone, num_classes)


class RetinaNetPair:
  """torchvision's RetinaNet (the MLPerf reference's) and models/retinanet.py.

  The PyTorch model is torch_retinanet(num_classes), randomly initialised
  from `seed`, its frozen batch norms given random statistics and affine
  parameters (weight and variance uniform in [0.5, 1.5], bias and mean
  normal with deviation 0.1) so that they matter; interop.from_torch copies
  everything into models/retinanet.RetinaNet, the frozen batch norms into
  'batch_stats'. Both see the same random batch (retinanet_batch) already at
  the model's size and normalised: torchvision's GeneralizedRCNNTransform
  (resize and normalise) is bypassed by calling model.backbone and
  model.head directly, its anchors come from model.anchor_generator on the
  batch's size, and its losses from model.compute_loss (Matcher, focal and
  L1 box losses). The JAX side uses layers.retinanet_anchors and
  losses.retinanet_losses with the ground truth padded to a fixed count.

  Compared: the head's cls_logits and bbox_regression ([B, N, C] and
  [B, N, 4], the same anchor order), the anchors, the two losses and their
  sum, and the gradient of the loss with respect to every trainable
  parameter (those with requires_grad in torch; the frozen stem and first
  stage, RetinaNet.frozen_mask in JAX, are not differentiated). There is no
  dropout or batch statistic: training and evaluation compute the same
  function, compared once. The timed step is Adam (lr 1e-4) on the
  trainable parameters in both.
  """

  name = 'retinanet'

  def __init__(self, *, batch: int,
               image_size: int | Sequence[int] = RETINANET_IMAGE_SIZE,
               num_classes: int = RETINANET_NUM_CLASSES, seed: int = 0,
               channels_last: bool = True, precision: str = 'f32',
               wgrad: str = 'auto', max_boxes: int = RETINANET_MAX_BOXES):
    torch, _ = _torch()
    from torchvision.models.detection.image_list import ImageList  # pylint: disable=g-import-not-at-top
    from jaxperf.models import layers, retinanet  # pylint: disable=g-import-not-at-top
    from jaxperf.workloads.resnet import conv_wgrad  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.image_list = ImageList
    self.size = retinanet_image_size(image_size)
    if batch < 1 or num_classes < 1 or max_boxes < 1:
      raise UserError('--batch and --num-classes must be >= 1')
    f64 = precision == 'f64'
    if f64 and not jax.config.jax_enable_x64:
      raise UserError('f64 comparison needs jax_enable_x64 (set by '
                      '`python -m jaxperf.compare --precision f64`)')
    dtype = np.float64 if f64 else np.float32
    torch.manual_seed(seed)
    self.tmodel = torch_retinanet(num_classes)
    with torch.no_grad():
      for name, buf in self.tmodel.named_buffers():
        if name.endswith(('.weight', '.running_var')):
          buf.uniform_(0.5, 1.5)
        elif name.endswith(('.bias', '.running_mean')):
          buf.normal_(0.0, 0.1)
    if f64:
      self.tmodel = self.tmodel.double()
    self.wgrad = conv_wgrad(wgrad)
    self.jmodel = retinanet.RetinaNet(num_classes=num_classes, dtype=dtype,
                                      wgrad=self.wgrad)
    expected = jax.eval_shape(lambda: self.jmodel.init(
        jax.random.key(0), jnp.zeros((1, *self.size, 3), dtype)))
    variables = jax.tree.map(
        lambda a: jnp.asarray(a, dtype),
        interop.from_torch(self.name, self.tmodel.state_dict(),
                           expected=expected))
    self.frozen = self.jmodel.frozen_mask(variables['params'])
    self.trainable, self.fixed = _split_frozen(variables['params'],
                                               self.frozen)
    self.batch_stats = variables['batch_stats']
    self.anchors = np.asarray(layers.retinanet_anchors(self.size), dtype)
    self.batch = retinanet_batch(batch=batch, image_size=self.size,
                                 num_classes=num_classes,
                                 max_boxes=max_boxes, seed=seed)
    self.batch['image'] = self.batch['image'].astype(dtype)
    self.batch['boxes'] = self.batch['boxes'].astype(dtype)
    b = self.batch
    self.timages = torch.from_numpy(
        np.ascontiguousarray(b['image'].transpose(0, 3, 1, 2)))
    self.targets = [
        {'boxes': torch.from_numpy(b['boxes'][i][b['valid'][i]]),
         'labels': torch.from_numpy(
             b['labels'][i][b['valid'][i]].astype(np.int64))}
        for i in range(batch)]
    self.channels_last = channels_last
    self.num_classes = num_classes
    trainable = [p for p in self.tmodel.parameters() if p.requires_grad]
    self.settings = {
        'image_hw': list(self.size), 'max_boxes': max_boxes,
        'num_boxes': int(b['valid'].sum()),
        'num_anchors': int(self.anchors.shape[0]),
        'num_params': int(sum(p.numel() for p in self.tmodel.parameters())),
        'trainable_params': int(sum(p.numel() for p in trainable)),
        'trainable_tensors': len(trainable),
    }

  # --- the JAX side ---
  def _inputs(self):
    return tuple(jnp.asarray(self.batch[k])
                 for k in ('image', 'boxes', 'labels', 'valid'))

  def jax_loss(self, trainable, fixed, batch_stats, images, boxes, labels,
               valid):
    params = _merge_frozen(trainable, fixed)
    out = self.jmodel.apply({'params': params, 'batch_stats': batch_stats},
                            images)
    terms = losses.retinanet_losses(
        out['cls_logits'], out['bbox_regression'], self.anchors, boxes,
        labels, valid)
    return terms['loss'], (terms, out)

  # --- the PyTorch side ---
  def torch_forward(self, model, images):
    """(head outputs, anchors, loss dict) of torchvision's RetinaNet on
    `images`, normalised NCHW at the model's size."""
    features = list(model.backbone(images).values())
    head = model.head(features)
    image_list = self.image_list(images, [self.size] * images.shape[0])
    anchors = model.anchor_generator(image_list, features)
    return head, anchors, model.compute_loss(self.targets, head, anchors)

  def torch_loss(self, model, images):
    terms = self.torch_forward(model, images)[2]
    return terms['classification'] + terms['bbox_regression']

  def parity(self) -> dict[str, Any]:
    (j_loss, (j_terms, j_out)), j_grads = jax.jit(jax.value_and_grad(
        self.jax_loss, has_aux=True))(self.trainable, self.fixed,
                                      self.batch_stats, *self._inputs())
    tm = copy.deepcopy(self.tmodel).train()
    head, anchors, t_terms = self.torch_forward(tm, self.timages)
    t_loss = t_terms['classification'] + t_terms['bbox_regression']
    t_loss.backward()
    grads_sd = dict(tm.state_dict())      # frozen tensors: any value will do
    grads_sd.update({k: v.grad for k, v in tm.named_parameters()
                     if v.requires_grad})
    t_grads = _split_frozen(
        interop.from_torch(self.name, grads_sd)['params'], self.frozen)[0]
    t_anchors = anchors[0].detach().numpy()

    def loss_errors(j, t):
      t = t.detach().numpy()
      return {'jax': float(j), 'torch': float(t), **errors(np.asarray(j), t)}
    return {
        'cls_logits': errors(np.asarray(j_out['cls_logits']),
                             head['cls_logits'].detach().numpy()),
        'bbox_regression': errors(np.asarray(j_out['bbox_regression']),
                                  head['bbox_regression'].detach().numpy()),
        'anchors': errors(self.anchors, t_anchors),
        'loss_classification': loss_errors(j_terms['classification'],
                                           t_terms['classification']),
        'loss_bbox_regression': loss_errors(j_terms['bbox_regression'],
                                            t_terms['bbox_regression']),
        'loss': loss_errors(j_loss, t_loss),
        'grads': _grad_errors(j_grads, t_grads),
        'outputs_note': 'frozen batch norms and no dropout: training and '
                        'evaluation compute the same function; gradients '
                        'of the trainable parameters only',
    }

  def timing(self, warmup: int, repeats: int, lr: float = RETINANET_LR
             ) -> dict[str, Any]:
    out = _detector_timing(
        self, optax.adam(lr), self.jax_loss,
        lambda tm, x: self.torch_loss(tm, x),
        lambda params: self.torch.optim.Adam(params, lr=lr), warmup, repeats)
    return {**out, 'lr': lr}


# ---------------------------------------------------------------- maskrcnn

# torchvision's class count (COCO's 91 ids); the MLPerf reference has 81.
MASKRCNN_NUM_CLASSES = 91
# The reference's largest padded batch: MIN_SIZE_TRAIN 800 and
# MAX_SIZE_TRAIN 1333, padded to a multiple of SIZE_DIVISIBILITY 32.
MASKRCNN_IMAGE_SIZE = (800, 1344)
MASKRCNN_SIZE_DIVISIBILITY = 32
# Proposals per image given to the box and mask heads.
MASKRCNN_ROIS_PER_IMAGE = 16
# The FPN levels the heads pool from (P2..P5) and RoIAlign's settings, those
# of torchvision's MultiScaleRoIAlign and the reference's Pooler.
MASKRCNN_ROI_SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
MASKRCNN_SAMPLING_RATIO = 2
# SGD with momentum in the timed step: the reference's base learning rate
# (for 16 images) and momentum.
MASKRCNN_LR = 0.02
MASKRCNN_MOMENTUM = 0.9


def maskrcnn_image_size(image_size: int | Sequence[int]) -> tuple[int, int]:
  """(H, W) from a side or two sides; UserError unless each is a positive
  multiple of 32.

  Both references pad every batch to a multiple of 32 (SIZE_DIVISIBILITY,
  GeneralizedRCNNTransform's size_divisible), and torchvision's
  MultiScaleRoIAlign infers each level's scale from the ratio of its size to
  the image's, which other sizes can round to the wrong power of 2.
  """
  sides = ((image_size,) * 2 if isinstance(image_size, (int, np.integer))
           else tuple(image_size))
  if (len(sides) != 2 or any(int(v) < MASKRCNN_SIZE_DIVISIBILITY
                             or int(v) % MASKRCNN_SIZE_DIVISIBILITY
                             for v in sides)):
    raise UserError(f'--image-size {image_size}: Mask R-CNN needs a side or '
                    f'H,W, each a positive multiple of '
                    f'{MASKRCNN_SIZE_DIVISIBILITY}')
  return tuple(int(v) for v in sides)


def maskrcnn_proposals(*, batch: int, image_size: Sequence[int],
                       rois_per_image: int = MASKRCNN_ROIS_PER_IMAGE,
                       seed: int = 0) -> np.ndarray:
  """Random proposals [batch, rois_per_image, 4] (x1, y1, x2, y2), float32.

  Inside the image, as the RPN's clipped proposals are, and spread over the
  FPN levels that such boxes reach. MultiScaleRoIAlign pools a box of scale
  s = sqrt(area) from P2 below 112 pixels, P3 below 224, P4 below 448 and
  P5 above; box i of an image is meant for the (i mod L)-th of the L levels
  reachable with s <= sqrt(H * W), its scale log-uniform in that level's
  range (from 2 pixels, below one P2 pixel, which RoIAlign stretches to
  one), its aspect ratio h / w log-uniform in [1/2, 2] as far as the box
  still fits in the image (the image's own otherwise), its position uniform.
  At 128x128, half the boxes are P2's and half P3's.
  """
  rng = np.random.default_rng(seed)
  height, width = image_size
  top = float(np.sqrt(height * width))
  bounds = (2.0, 112.0, 224.0, 448.0, np.inf)
  ranges = [(lo, min(hi, top)) for lo, hi in zip(bounds[:-1], bounds[1:])
            if lo < top]
  boxes = np.zeros((batch, rois_per_image, 4))
  for b in range(batch):
    for i in range(rois_per_image):
      lo, hi = ranges[i % len(ranges)]
      scale = np.exp(rng.uniform(np.log(lo), np.log(hi)))
      # w = scale / sqrt(r) <= width and h = scale * sqrt(r) <= height.
      r_lo = max(0.5, (scale / width)**2)
      r_hi = min(2.0, (height / scale)**2)
      ratio = (np.exp(rng.uniform(np.log(r_lo), np.log(r_hi)))
               if r_lo <= r_hi else height / width)
      w = min(scale / np.sqrt(ratio), width)
      h = min(scale * np.sqrt(ratio), height)
      x1 = rng.uniform(0, width - w)
      y1 = rng.uniform(0, height - h)
      boxes[b, i] = (x1, y1, x1 + w, y1 + h)
  return boxes.astype(np.float32)


def torch_maskrcnn(num_classes: int = MASKRCNN_NUM_CLASSES):
  """torchvision's maskrcnn_resnet50_fpn as built on a pretrained backbone.

  resnet50 with FrozenBatchNorm2d, _resnet_fpn_extractor with three
  trainable layers (conv1 and layer1 frozen), C2..C5 and LastLevelMaxPool
  (P6), and MaskRCNN's default RPN, box and mask heads and
  MultiScaleRoIAlign poolers. maskrcnn_resnet50_fpn(weights=None,
  weights_backbone=None) itself would build trainable BatchNorm2d layers and
  train all five stages. Randomly initialised from torch's global generator.
  """
  _, torchvision = _torch()
  from torchvision.models.detection import backbone_utils  # pylint: disable=g-import-not-at-top
  from torchvision.ops import misc  # pylint: disable=g-import-not-at-top
  body = torchvision.models.resnet50(norm_layer=misc.FrozenBatchNorm2d)
  backbone = backbone_utils._resnet_fpn_extractor(  # pylint: disable=protected-access
      body, trainable_layers=3)
  return torchvision.models.detection.MaskRCNN(backbone, num_classes)


def _nchw(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(a, -1, 1))


class MaskRCNNPair:
  """torchvision's Mask R-CNN (ResNet-50 FPN) and models/maskrcnn.py.

  The PyTorch model is torch_maskrcnn(num_classes), randomly initialised
  from `seed`, its frozen batch norms given random statistics and affine
  parameters (weight and variance uniform in [0.5, 1.5], bias and mean
  normal with deviation 0.1) so that they matter; interop.from_torch copies
  everything into models/maskrcnn.MaskRCNN built in torchvision's layout
  (stride_in_1x1=False, bn_epsilon=1e-5), the frozen batch norms into
  'batch_stats'. Both see the same random images (retinanet_batch's:
  normalised, at the model's size; torchvision's GeneralizedRCNNTransform is
  bypassed) and the same random proposals (maskrcnn_proposals), which stand
  in for the RPN's: proposal selection (NMS, top-k), sampling and the losses
  are left out, torchvision's being random (randperm) and not comparable
  sample by sample.

  Compared, each network part called directly on both sides: the FPN levels
  P2..P6 (model.backbone; MaskRCNN.features), the RPN head's objectness and
  box deltas in torchvision's concat_box_prediction_layers order, the RPN
  anchors (model.rpn.anchor_generator against layers.rpn_anchors(...,
  style='torchvision')), the proposals' features pooled at 7x7 and 14x14
  (model.roi_heads.box_roi_pool / mask_roi_pool, MultiScaleRoIAlign,
  against layers.multilevel_roi_align with sampling_ratio=2, aligned=False,
  legacy_plus_one=False), the box head's class logits and box regression,
  the mask head's logits, and the gradient with respect to every trainable
  parameter (conv1 and layer1 frozen) of a scalar function of all these
  outputs: the sum over outputs of mean(w * output), w fixed standard
  normal weights (the 'objective'). Its gradient reaches the backbone
  through the features directly, through the RPN head and back through
  RoIAlign. Frozen batch norms and no dropout: training and evaluation
  compute the same function, compared once. The timed step is SGD with
  momentum on the same objective and parameters.
  """

  name = 'maskrcnn'

  def __init__(self, *, batch: int,
               image_size: int | Sequence[int] = MASKRCNN_IMAGE_SIZE,
               num_classes: int = MASKRCNN_NUM_CLASSES, seed: int = 0,
               channels_last: bool = True, precision: str = 'f32',
               wgrad: str = 'auto',
               rois_per_image: int = MASKRCNN_ROIS_PER_IMAGE):
    torch, _ = _torch()
    from torchvision.models.detection.image_list import ImageList  # pylint: disable=g-import-not-at-top
    from torchvision.models.detection.rpn import concat_box_prediction_layers  # pylint: disable=g-import-not-at-top
    from jaxperf.models import layers, maskrcnn  # pylint: disable=g-import-not-at-top
    from jaxperf.workloads.resnet import conv_wgrad  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.image_list = ImageList
    self.concat_box_prediction_layers = concat_box_prediction_layers
    self.layers = layers
    self.pool_sizes = (maskrcnn.BOX_POOL_SIZE, maskrcnn.MASK_POOL_SIZE)
    self.size = maskrcnn_image_size(image_size)
    if batch < 1 or num_classes < 1 or rois_per_image < 1:
      raise UserError('--batch, --num-classes and rois_per_image must be '
                      '>= 1')
    f64 = precision == 'f64'
    if f64 and not jax.config.jax_enable_x64:
      raise UserError('f64 comparison needs jax_enable_x64 (set by '
                      '`python -m jaxperf.compare --precision f64`)')
    dtype = np.float64 if f64 else np.float32
    torch.manual_seed(seed)
    self.tmodel = torch_maskrcnn(num_classes)
    with torch.no_grad():
      for name, buf in self.tmodel.named_buffers():
        if name.endswith(('.weight', '.running_var')):
          buf.uniform_(0.5, 1.5)
        elif name.endswith(('.bias', '.running_mean')):
          buf.normal_(0.0, 0.1)
    if f64:
      self.tmodel = self.tmodel.double()
    self.wgrad = conv_wgrad(wgrad)
    self.jmodel = maskrcnn.MaskRCNN(
        num_classes=num_classes, stride_in_1x1=False,
        bn_epsilon=maskrcnn.TORCHVISION_BN_EPSILON, frozen_stages=2,
        dtype=dtype, wgrad=self.wgrad)
    expected = jax.eval_shape(lambda: self.jmodel.init(
        jax.random.key(0), jnp.zeros((1, *self.size, 3), dtype)))
    variables = jax.tree.map(
        lambda a: jnp.asarray(a, dtype),
        interop.from_torch(self.name, self.tmodel.state_dict(),
                           expected=expected))
    self.frozen = self.jmodel.frozen_mask(variables['params'])
    self.trainable, self.fixed = _split_frozen(variables['params'],
                                               self.frozen)
    self.batch_stats = variables['batch_stats']
    self.anchors = np.asarray(layers.rpn_anchors(self.size,
                                                 style='torchvision'), dtype)

    images = retinanet_batch(batch=batch, image_size=self.size,
                             num_classes=1, seed=seed)['image']
    self.images = images.astype(dtype)
    proposals = maskrcnn_proposals(batch=batch, image_size=self.size,
                                   rois_per_image=rois_per_image, seed=seed)
    self.boxes = proposals.reshape(-1, 4).astype(dtype)
    self.box_batch = np.repeat(np.arange(batch, dtype=np.int32),
                               rois_per_image)
    self.timages = torch.from_numpy(_nchw(self.images))
    self.tproposals = [torch.from_numpy(p.astype(dtype)) for p in proposals]
    # The objective's weights, in the JAX layout (NHWC), and in torch's.
    shapes = jax.eval_shape(self.jax_outputs, self.trainable, self.fixed,
                            self.batch_stats, self.images, self.boxes,
                            self.box_batch)
    rng = np.random.default_rng(seed + 1)
    self.weights = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(dtype), shapes)
    self.tweights = self._torch_layout(jax.tree.map(torch.from_numpy,
                                                    self.weights))
    self.channels_last = channels_last
    self.num_classes = num_classes
    trainable = [p for p in self.tmodel.parameters() if p.requires_grad]
    self.settings = {
        'image_hw': list(self.size), 'rois_per_image': rois_per_image,
        'num_rois': int(self.boxes.shape[0]),
        'rois_per_level': np.bincount(
            np.asarray(layers.roi_level(self.boxes, 2, 5)),
            minlength=4).tolist(),
        'num_anchors': int(self.anchors.shape[0]),
        'num_params': int(sum(p.numel() for p in self.tmodel.parameters())),
        'trainable_params': int(sum(p.numel() for p in trainable)),
        'trainable_tensors': len(trainable),
    }

  # --- the JAX side ---
  def _inputs(self):
    return (jnp.asarray(self.images), jnp.asarray(self.boxes),
            jnp.asarray(self.box_batch), self.weights)

  def jax_outputs(self, trainable, fixed, batch_stats, images, boxes,
                  box_batch):
    """The outputs compared, NHWC: 'features' (P2..P6), 'objectness',
    'rpn_deltas', 'box_pooled', 'class_logits', 'box_regression',
    'mask_pooled' and 'mask_logits'."""
    layers = self.layers

    def forward(model, images):
      features = model.features(images)
      objectness, rpn_deltas = model.rpn(features)
      pool = lambda size: layers.multilevel_roi_align(
          features[:len(MASKRCNN_ROI_SCALES)], boxes, size,
          MASKRCNN_ROI_SCALES, MASKRCNN_SAMPLING_RATIO, aligned=False,
          legacy_plus_one=False, batch_indices=box_batch)
      box_pooled, mask_pooled = (pool(size) for size in self.pool_sizes)
      class_logits, box_regression = model.box_head(box_pooled)
      return {'features': features, 'objectness': objectness,
              'rpn_deltas': rpn_deltas, 'box_pooled': box_pooled,
              'class_logits': class_logits, 'box_regression': box_regression,
              'mask_pooled': mask_pooled,
              'mask_logits': model.mask_head(mask_pooled)}
    params = _merge_frozen(trainable, fixed)
    return self.jmodel.apply({'params': params, 'batch_stats': batch_stats},
                             images, method=forward)

  def jax_objective(self, trainable, fixed, batch_stats, images, boxes,
                    box_batch, weights):
    out = self.jax_outputs(trainable, fixed, batch_stats, images, boxes,
                           box_batch)
    terms = jax.tree.map(lambda o, w: jnp.mean(o * w), out, weights)
    return sum(jax.tree.leaves(terms)), out

  # --- the PyTorch side ---
  def _torch_layout(self, out: dict[str, Any]) -> dict[str, Any]:
    """NHWC image-like outputs as NCHW (torch tensors or numpy arrays)."""
    move = lambda a: (a.permute(0, 3, 1, 2) if hasattr(a, 'permute')
                      else _nchw(a))
    return {k: ([move(a) for a in v] if k == 'features'
                else move(v) if k in ('box_pooled', 'mask_pooled',
                                      'mask_logits')
                else v) for k, v in out.items()}

  def torch_outputs(self, model, images):
    """jax_outputs' dict from torchvision's model, NCHW."""
    features = model.backbone(images)
    levels = list(features.values())
    logits, deltas = model.rpn.head(levels)
    objectness, rpn_deltas = self.concat_box_prediction_layers(logits, deltas)
    b = images.shape[0]
    heads = model.roi_heads
    shapes = [self.size] * b
    box_pooled = heads.box_roi_pool(features, self.tproposals, shapes)
    class_logits, box_regression = heads.box_predictor(
        heads.box_head(box_pooled))
    mask_pooled = heads.mask_roi_pool(features, self.tproposals, shapes)
    return {'features': levels, 'objectness': objectness.reshape(b, -1),
            'rpn_deltas': rpn_deltas.reshape(b, -1, 4),
            'box_pooled': box_pooled, 'class_logits': class_logits,
            'box_regression': box_regression, 'mask_pooled': mask_pooled,
            'mask_logits': heads.mask_predictor(heads.mask_head(mask_pooled))}

  def torch_objective(self, model, images):
    out = self.torch_outputs(model, images)
    flat = lambda t: [*t['features'], *(t[k] for k in sorted(t)
                                        if k != 'features')]
    total = sum((o * w).mean() for o, w in zip(flat(out),
                                                flat(self.tweights)))
    return total, out

  def parity(self) -> dict[str, Any]:
    (j_obj, j_out), j_grads = jax.jit(jax.value_and_grad(
        self.jax_objective, has_aux=True))(self.trainable, self.fixed,
                                           self.batch_stats, *self._inputs())
    tm = copy.deepcopy(self.tmodel).train()
    t_obj, t_out = self.torch_objective(tm, self.timages)
    t_obj.backward()
    grads_sd = dict(tm.state_dict())      # frozen tensors: any value will do
    grads_sd.update({k: v.grad for k, v in tm.named_parameters()
                     if v.requires_grad})
    t_grads = _split_frozen(
        interop.from_torch(self.name, grads_sd)['params'], self.frozen)[0]
    with self.torch.no_grad():
      t_anchors = tm.rpn.anchor_generator(
          self.image_list(self.timages, [self.size] * len(self.images)),
          t_out['features'])
    j_out = self._torch_layout(jax.tree.map(np.asarray, j_out))
    t_out = jax.tree.map(lambda t: t.detach().numpy(), t_out)
    out = {}
    for i, (j, t) in enumerate(zip(j_out['features'], t_out['features'])):
      out[f'features_P{i + 2}'] = errors(j, t)
    for key in ('objectness', 'rpn_deltas'):
      out[key] = errors(j_out[key], t_out[key])
    out['anchors'] = errors(self.anchors, t_anchors[0].numpy())
    for key in ('box_pooled', 'class_logits', 'box_regression',
                'mask_pooled', 'mask_logits'):
      out[key] = errors(j_out[key], t_out[key])
    t_obj = t_obj.detach().numpy()
    out['objective'] = {'jax': float(j_obj), 'torch': float(t_obj),
                        **errors(np.asarray(j_obj), t_obj)}
    out['grads'] = _grad_errors(j_grads, t_grads)
    out['outputs_note'] = (
        'frozen batch norms and no dropout: training and evaluation compute '
        'the same function; the heads on the same random proposals; '
        'gradients of sum(mean(w * output)) w.r.t. the trainable parameters')
    return out

  def timing(self, warmup: int, repeats: int, lr: float = MASKRCNN_LR
             ) -> dict[str, Any]:
    out = _detector_timing(
        self, optax.sgd(lr, momentum=MASKRCNN_MOMENTUM), self.jax_objective,
        lambda tm, x: self.torch_objective(tm, x)[0],
        lambda params: self.torch.optim.SGD(params, lr=lr,
                                            momentum=MASKRCNN_MOMENTUM),
        warmup, repeats)
    return {**out, 'lr': lr, 'momentum': MASKRCNN_MOMENTUM}


def _detector_timing(pair, tx: optax.GradientTransformation, jax_objective,
                     torch_objective, torch_optimizer, warmup: int,
                     repeats: int) -> dict[str, Any]:
  """One training step timed in each framework for a detector pair (with
  `trainable`, `fixed`, `batch_stats`, `_inputs()`, `tmodel`, `timages`,
  `channels_last` and `torch`): JAX's `jax_objective(trainable, fixed,
  batch_stats, *inputs)` -> (loss, aux) with `tx`, PyTorch's
  `torch_objective(model, images)` -> loss with `torch_optimizer(params)`
  over a copy of the module's trainable parameters."""
  torch = pair.torch

  def step(state, fixed, batch_stats, *inputs):
    trainable, opt_state = state
    (loss, _), grads = jax.value_and_grad(jax_objective, has_aux=True)(
        trainable, fixed, batch_stats, *inputs)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return (optax.apply_updates(trainable, updates), opt_state), loss

  state = (pair.trainable, tx.init(pair.trainable))
  compile_s, j_times = _time_jax_step(
      step, state, pair.fixed, pair.batch_stats, *pair._inputs(),  # pylint: disable=protected-access
      warmup=warmup, repeats=repeats)
  del state

  tm = copy.deepcopy(pair.tmodel).train()
  x = pair.timages
  if pair.channels_last:
    tm = tm.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch_optimizer([p for p in tm.parameters() if p.requires_grad])
  t_times = _time_torch_step(lambda: torch_objective(tm, x), opt, warmup,
                             repeats)
  jt, tt = statistics.median(j_times), statistics.median(t_times)
  return {'jax': {'compile_s': compile_s, 'step_time_s': jt,
                  'step_times_s': j_times},
          'torch': {'step_time_s': tt, 'step_times_s': t_times,
                    'channels_last': pair.channels_last,
                    'threads': torch.get_num_threads()},
          'speed_ratio_jax_over_torch': tt / jt}


def _split_frozen(params: Any, frozen: Any) -> tuple[Any, Any]:
  """(trainable, fixed): `params` with None in place of the frozen
  parameters, and with None in place of the others."""
  trainable = jax.tree.map(lambda p, f: None if f else p, params, frozen)
  fixed = jax.tree.map(lambda p, f: p if f else None, params, frozen)
  return trainable, fixed


def _merge_frozen(trainable: Any, fixed: Any) -> Any:
  """The inverse of _split_frozen."""
  return jax.tree.map(lambda t, f: f if t is None else t, trainable, fixed,
                      is_leaf=lambda x: x is None)


PAIRS = {'resnet50': ResNet50Pair, 'unet3d': Unet3DPair, 'bert': BertPair,
         'dlrm': DLRMPair, 'retinanet': RetinaNetPair,
         'maskrcnn': MaskRCNNPair}
# Command-line defaults per image model: batch, image size, classes.
_DEFAULTS = {'resnet50': (16, 128, 1000), 'unet3d': (1, 64, 3),
             'retinanet': (2, RETINANET_IMAGE_SIZE, RETINANET_NUM_CLASSES),
             'maskrcnn': (2, MASKRCNN_IMAGE_SIZE, MASKRCNN_NUM_CLASSES)}
# bert's: batch, sequence length.
_BERT_DEFAULTS = (2, 128)
# The options of BertPair that the command line sets.
_BERT_OPTIONS = ('seq_len', 'num_layers', 'hidden_size', 'num_heads',
                 'intermediate_size', 'vocab_size', 'max_predictions')


def compare(model: str, *, batch: int,
            image_size: int | Sequence[int] | None = None,
            num_classes: int | None = None, seed: int = 0, warmup: int = 2,
            repeats: int = 5, channels_last: bool = True, timing: bool = True,
            precision: str = 'f32', wgrad: str = 'auto',
            **model_options: Any) -> dict[str, Any]:
  """Parity (and timing) of one model; `model_options` go to its pair.

  unet3d's options: filters, activation, upsample (see Unet3DPair);
  `image_size` may be (D, H, W) for it. bert takes no image_size,
  num_classes, channels_last or wgrad; its options are BertPair's
  (seq_len, num_layers, hidden_size, num_heads, intermediate_size,
  vocab_size, max_predictions). Nor does dlrm; its options are DLRMPair's
  (tables, embed_dim). retinanet's `image_size` is a side or (H, W); its
  option is max_boxes (see RetinaNetPair). So is maskrcnn's, each side a
  multiple of 32; its option is rois_per_image (see MaskRCNNPair).
  """
  if model not in PAIRS:
    raise UserError(f'--model {model!r}: no PyTorch reference to compare with; '
                    f'available: {", ".join(PAIRS)}')
  if model in ('bert', 'dlrm'):
    pair = PAIRS[model](batch=batch, seed=seed, precision=precision,
                        **model_options)
    out = {'model': model, 'batch': batch, 'precision': precision,
           **pair.settings, 'machine': machine(), **pair.parity()}
  else:
    if image_size is None or num_classes is None:
      raise UserError(f'{model}: image_size and num_classes are required')
    pair = PAIRS[model](batch=batch, image_size=image_size,
                        num_classes=num_classes, seed=seed,
                        channels_last=channels_last, precision=precision,
                        wgrad=wgrad, **model_options)
    if not isinstance(image_size, int):
      image_size = list(image_size)
    out = {'model': model, 'batch': batch, 'image_size': image_size,
           'num_classes': num_classes, 'precision': precision,
           'jax_conv_wgrad': pair.wgrad, **getattr(pair, 'settings', {}),
           'machine': machine(), **pair.parity()}
  if timing:
    out.update(pair.timing(warmup, repeats))
  return out


def _summary(r: dict[str, Any]) -> str:
  if r['model'] == 'bert':
    lines = [f'{r["model"]}: batch {r["batch"]} ({r["padded_rows"]} padded) '
             f'of {r["seq_len"]} tokens, {r["num_layers"]} layers, hidden '
             f'{r["hidden_size"]}, {r["num_heads"]} heads, ffn '
             f'{r["intermediate_size"]}, vocab {r["vocab_size"]} '
             f'({r["num_params"]:,} parameters), {r["masked_predictions"]} '
             f'masked predictions, {r["precision"]}, HF transformers '
             f'{r["transformers"]} ({r["hf_attention"]} attention), '
             f'{r["machine"]["devices"]}']
  elif r['model'] == 'dlrm':
    lines = [f'{r["model"]}: batch {r["batch"]}, {r["num_tables"]} tables of '
             f'{r["table_rows"]:,} rows in all ({r["tables_gb"]:.2f} GB in '
             f'{r["precision"]}), width {r["embed_dim"]}, bottom MLP '
             f'{"-".join(map(str, r["bottom_mlp"]))}, top MLP '
             f'{"-".join(map(str, r["top_mlp"]))} ({r["num_params"]:,} '
             f'parameters, {r["mlp_params"]:,} in the MLPs), '
             f'{r["touched_rows"]:,} rows touched, {r["precision"]}, '
             f'{r["machine"]["devices"]}']
  elif r['model'] == 'retinanet':
    lines = [f'{r["model"]}: batch {r["batch"]} at '
             f'{"x".join(map(str, r["image_hw"]))}px, {r["num_classes"]} '
             f'classes, {r["num_anchors"]:,} anchors, {r["num_boxes"]} '
             f'ground-truth boxes, ResNeXt50-32x4d FPN '
             f'({r["num_params"]:,} parameters, {r["trainable_params"]:,} '
             f'trainable), {r["precision"]}, JAX kernel gradients '
             f'{r["jax_conv_wgrad"]}, {r["machine"]["devices"]}']
  elif r['model'] == 'maskrcnn':
    lines = [f'{r["model"]}: batch {r["batch"]} at '
             f'{"x".join(map(str, r["image_hw"]))}px, {r["num_classes"]} '
             f'classes, {r["num_anchors"]:,} anchors, {r["num_rois"]} '
             f'proposals (P2-P5: '
             f'{"/".join(map(str, r["rois_per_level"]))}), ResNet-50 FPN ({r["num_params"]:,} parameters, '
             f'{r["trainable_params"]:,} trainable), {r["precision"]}, JAX '
             f'kernel gradients {r["jax_conv_wgrad"]}, '
             f'{r["machine"]["devices"]}']
  elif 'volume' in r:
    lines = [f'{r["model"]}: batch {r["batch"]} of '
             f'{"x".join(map(str, r["volume"]))} voxels, filters '
             f'{",".join(map(str, r["filters"]))} ({r["num_params"]:,} '
             f'parameters), {r["activation"]}, upsample {r["upsample"]}, '
             f'{r["precision"]}, JAX kernel gradients {r["jax_conv_wgrad"]}, '
             f'{r["machine"]["devices"]}']
  else:
    lines = [f'{r["model"]}: batch {r["batch"]} at {r["image_size"]}px, '
             f'{r["precision"]}, JAX kernel gradients {r["jax_conv_wgrad"]}, '
             f'{r["machine"]["devices"]}']
  keys = [k for k in ('outputs_eval', 'outputs_train', 'outputs',
                      'probabilities', 'logits', 'mlm_logits',
                      'mlm_logits_padded_row', 'nsp_logits', 'cls_logits',
                      'bbox_regression', 'features_P2', 'features_P3',
                      'features_P4', 'features_P5', 'features_P6',
                      'objectness', 'rpn_deltas', 'anchors', 'box_pooled',
                      'class_logits', 'box_regression', 'mask_pooled',
                      'mask_logits', 'loss_classification',
                      'loss_bbox_regression', 'loss', 'objective')
          if k in r]
  width = max([14] + [len(k) for k in keys])
  for key in keys:
    e = r[key]
    lines.append(f'  {key:<{width}} max_abs {e["max_abs"]:.3e}  max_rel '
                 f'{e["max_rel"]:.3e}  norm_rel {e["norm_rel"]:.3e}')
  if 'outputs_note' in r:
    lines.append(f'  ({r["outputs_note"]})')
  g = r['grads']
  lines.append(f'  {"grads":<{width}} worst norm_rel '
               f'{g["worst_norm_rel"]:.3e} ({g["worst_param"]}), median '
               f'{g["median_norm_rel"]:.3e}')
  if 'tables_worst_norm_rel' in g:
    lines.append(f'  {"":<{width}} MLPs: worst {g["mlp_worst_norm_rel"]:.3e}, '
                 f'median {g["mlp_median_norm_rel"]:.3e}; tables (touched '
                 f'rows): worst {g["tables_worst_norm_rel"]:.3e}, median '
                 f'{g["tables_median_norm_rel"]:.3e}')
  if 'zero_grad_params' in g:
    lines.append(f'  {"":<{width}} zero in exact arithmetic: '
                 f'{len(g["zero_grad_params"])} tensors (attention key '
                 f'biases) left out, max_abs {g["zero_grad_max_abs"]:.1e}')
  if 'jax' in r:
    lines.append(f'  {"step time":<{width}} jax '
                 f'{r["jax"]["step_time_s"] * 1e3:.1f} ms '
                 f'(compile {r["jax"]["compile_s"]:.1f} s)  torch '
                 f'{r["torch"]["step_time_s"] * 1e3:.1f} ms  -> JAX speed / '
                 f'PyTorch speed = {r["speed_ratio_jax_over_torch"]:.2f}')
  return '\n'.join(lines)


def _ints(flag: str, text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(','))
  except ValueError:
    raise UserError(f'{flag} {text}: expected comma-separated '
                    f'integers') from None


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m jaxperf.compare',
                              description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True, help=', '.join(PAIRS))
  p.add_argument('--batch', type=int, default=None,
                 help='default: 16 for resnet50, 1 for unet3d, 2 for '
                      'retinanet and maskrcnn, '
                      f'{_BERT_DEFAULTS[0]} for bert (full BERT-large at '
                      f'--seq-len {_BERT_DEFAULTS[1]}: a few seconds a step on '
                      f'a small CPU), {DLRM_BATCH} for dlrm (the '
                      f'reference\'s)')
  p.add_argument('--image-size', default=None,
                 help='image side (default 128) for resnet50; for unet3d a '
                      'cube side or D,H,W, multiples of 32 (default 64, the '
                      'smallest cube; the reference trains on 128); for '
                      f'retinanet a side or H,W, at least 32 (default '
                      f'{RETINANET_IMAGE_SIZE}, the reference\'s); for '
                      f'maskrcnn a side or H,W, multiples of 32 (default '
                      f'{",".join(map(str, MASKRCNN_IMAGE_SIZE))}, the '
                      f'reference\'s largest padded batch)')
  p.add_argument('--num-classes', type=int, default=None,
                 help='default: 1000 for resnet50, 3 for unet3d, '
                      f'{RETINANET_NUM_CLASSES} for retinanet (the '
                      f'reference\'s OpenImages classes), '
                      f'{MASKRCNN_NUM_CLASSES} for maskrcnn (torchvision\'s '
                      f'COCO ids; the reference has 81)')
  p.add_argument('--filters', default=None,
                 help='unet3d: five comma-separated widths (default '
                      f'{",".join(map(str, UNET3D_FILTERS))}, the '
                      'reference\'s)')
  p.add_argument('--activation', choices=('relu', 'leaky_relu'), default=None,
                 help='unet3d: relu (the reference\'s default) or leaky_relu')
  p.add_argument('--upsample', choices=('projection', 'conv_transpose'),
                 default=None,
                 help='unet3d: how the JAX model computes the transposed '
                      'convolution (default projection)')
  p.add_argument('--seq-len', type=int, default=None,
                 help=f'bert: tokens per row (default {_BERT_DEFAULTS[1]}; '
                      f'MLPerf trains on 512)')
  p.add_argument('--layers', type=int, default=None,
                 help='bert: encoder layers (default 24, BERT-large)')
  p.add_argument('--hidden-size', type=int, default=None,
                 help='bert: hidden width (default 1024)')
  p.add_argument('--num-heads', type=int, default=None,
                 help='bert: attention heads (default 16)')
  p.add_argument('--intermediate-size', type=int, default=None,
                 help='bert: feed-forward width (default 4096)')
  p.add_argument('--vocab-size', type=int, default=None,
                 help='bert: vocabulary (default 30522)')
  p.add_argument('--max-predictions', type=int, default=None,
                 help='bert: masked-LM slots per row (default 20 for '
                      '--seq-len 128, 76 for 512 as MLPerf, else 15%%)')
  p.add_argument('--tables', default=None,
                 help=f'dlrm: the rows of each embedding table: N caps the '
                      f'26 Criteo 1TB tables at N rows each, as the '
                      f'reference\'s --max-ind-range does (default '
                      f'{DLRM_TABLE_CAP}: ~0.92M rows, 0.47 GB per framework); '
                      f'a comma list gives the row counts; "criteo" keeps '
                      f'the full tables (188M rows, 96 GB per framework: '
                      f'not for a small machine)')
  p.add_argument('--embed-dim', type=int, default=None,
                 help='dlrm: embedding width, also the bottom MLP\'s output '
                      '(default 128, the reference\'s)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--precision', choices=('f32', 'f64'), default='f32',
                 help='f64 (both frameworks in double precision) shows that '
                      'the remaining f32 gradient differences are rounding')
  p.add_argument('--wgrad', choices=('auto', 'xla', 'matmul'), default='auto',
                 help='JAX convolution kernel-gradient algorithm (auto: '
                      'matmul on CPU, where it is faster; xla elsewhere)')
  p.add_argument('--no-timing', action='store_true',
                 help='only the numerical comparison')
  p.add_argument('--torch-contiguous', action='store_true',
                 help='run PyTorch in NCHW (NCDHW) instead of channels-last')
  p.add_argument('--json', default=None, help='write all results here')
  args = p.parse_args(argv)
  if args.precision == 'f64' and args.model != 'bert':   # bert: f32 only
    jax.config.update('jax_enable_x64', True)
  bert_flags = {'seq_len': args.seq_len, 'num_layers': args.layers,
                'hidden_size': args.hidden_size, 'num_heads': args.num_heads,
                'intermediate_size': args.intermediate_size,
                'vocab_size': args.vocab_size,
                'max_predictions': args.max_predictions}
  try:
    given = [f for f, v in (('--tables', args.tables),
                            ('--embed-dim', args.embed_dim)) if v is not None]
    if given and args.model != 'dlrm':
      raise UserError(f'{", ".join(given)}: only for --model dlrm')
    if args.model == 'bert':
      return _main_bert(args, bert_flags)
    given = [f'--{k.replace("_", "-")}'.replace('num-layers', 'layers')
             for k, v in bert_flags.items() if v is not None]
    if given:
      raise UserError(f'{", ".join(given)}: only for --model bert')
    if args.model == 'dlrm':
      return _main_dlrm(args)
    batch, image_size, num_classes = _DEFAULTS.get(args.model,
                                                   _DEFAULTS['resnet50'])
    batch = batch if args.batch is None else args.batch
    num_classes = num_classes if args.num_classes is None else args.num_classes
    options = {}
    if args.model == 'unet3d':
      if args.image_size is not None:
        image_size = _ints('--image-size', args.image_size)
        image_size = image_size[0] if len(image_size) == 1 else image_size
      if args.filters is not None:
        options['filters'] = _ints('--filters', args.filters)
      for key in ('activation', 'upsample'):
        if getattr(args, key) is not None:
          options[key] = getattr(args, key)
      if batch < 1:
        raise UserError('--batch must be >= 1')
    else:
      given = [f'--{k}' for k in ('filters', 'activation', 'upsample')
               if getattr(args, k) is not None]
      if given:
        raise UserError(f'{", ".join(given)}: only for --model unet3d')
      if args.image_size is not None:
        image_size = _ints('--image-size', args.image_size)
        if len(image_size) == 1:
          image_size = image_size[0]
        elif args.model not in ('retinanet', 'maskrcnn'):
          raise UserError(f'--image-size {args.image_size}: one side for '
                          f'{args.model}')
      if args.model in ('retinanet', 'maskrcnn'):
        if batch < 1:
          raise UserError('--batch must be >= 1')
        # Sizes: see retinanet_image_size and maskrcnn_image_size.
        (retinanet_image_size if args.model == 'retinanet'
         else maskrcnn_image_size)(image_size)
      elif batch < 1 or image_size < 32:
        raise UserError('--batch must be >= 1 and --image-size >= 32')
    result = compare(args.model, batch=batch, image_size=image_size,
                     num_classes=num_classes, seed=args.seed,
                     warmup=args.warmup, repeats=args.repeats,
                     channels_last=not args.torch_contiguous,
                     timing=not args.no_timing, precision=args.precision,
                     wgrad=args.wgrad, **options)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return _report(result, args.json)


def _report(result: dict[str, Any], json_path: str | None) -> int:
  print(_summary(result))
  if json_path:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, 'w') as f:
      json.dump(result, f, indent=1)
  return 0


def _reject_image_flags(args: argparse.Namespace, model: str,
                        sizes: str) -> None:
  """UserError if flags of the convolutional models were given for
  `model`, whose own size flags are `sizes`."""
  given = [f for f, bad in (
      ('--image-size', args.image_size is not None),
      ('--num-classes', args.num_classes is not None),
      ('--filters', args.filters is not None),
      ('--activation', args.activation is not None),
      ('--upsample', args.upsample is not None),
      ('--wgrad', args.wgrad != 'auto'),
      ('--torch-contiguous', args.torch_contiguous)) if bad]
  if given:
    raise UserError(f'{", ".join(given)}: not for --model {model} (its sizes '
                    f'are {sizes})')


def _main_bert(args: argparse.Namespace, flags: dict[str, int | None]
               ) -> int:
  """--model bert: HF BertForPreTraining against models/bert.py."""
  try:
    _reject_image_flags(args, 'bert', '--seq-len, --layers, --hidden-size, '
                        '--num-heads, --intermediate-size, --vocab-size')
    batch = _BERT_DEFAULTS[0] if args.batch is None else args.batch
    options = {k: v for k, v in flags.items() if v is not None}
    options.setdefault('seq_len', _BERT_DEFAULTS[1])
    result = compare('bert', batch=batch, seed=args.seed, warmup=args.warmup,
                     repeats=args.repeats, timing=not args.no_timing,
                     precision=args.precision, **options)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return _report(result, args.json)


def _main_dlrm(args: argparse.Namespace) -> int:
  """--model dlrm: jaxperf.torch_models.dlrm against models/dlrm.py."""
  try:
    _reject_image_flags(args, 'dlrm', '--batch, --tables, --embed-dim')
    options = {'tables': (DLRM_TABLE_CAP if args.tables is None
                          else args.tables)}
    if args.embed_dim is not None:
      options['embed_dim'] = args.embed_dim
    batch = DLRM_BATCH if args.batch is None else args.batch
    result = compare('dlrm', batch=batch, seed=args.seed, warmup=args.warmup,
                     repeats=args.repeats, timing=not args.no_timing,
                     precision=args.precision, **options)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return _report(result, args.json)


if __name__ == '__main__':
  sys.exit(main())
