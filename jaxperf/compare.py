"""python -m jaxperf.compare --model resnet50: JAX vs the PyTorch reference.

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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxperf import interop
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
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, images, labels).compile()
    compile_s = time.perf_counter() - t0
    holder = [jax.tree.map(jnp.copy, state)]

    def jax_step():
      holder[0], loss = compiled(holder[0], images, labels)
      jax.block_until_ready(loss)
    j_times = _timed(jax_step, warmup, repeats)

    tm = copy.deepcopy(self.tmodel).train()
    x = self.timages
    if self.channels_last:
      tm = tm.to(memory_format=torch.channels_last)
      x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(tm.parameters(), lr=lr, momentum=0.9)

    def torch_step():
      opt.zero_grad(set_to_none=True)
      loss = torch.nn.functional.cross_entropy(
          tm(x), self.tlabels, label_smoothing=LABEL_SMOOTHING)
      loss.backward()
      opt.step()
    t_times = _timed(torch_step, warmup, repeats)
    jt, tt = statistics.median(j_times), statistics.median(t_times)
    return {'jax': {'compile_s': compile_s, 'step_time_s': jt,
                    'step_times_s': j_times},
            'torch': {'step_time_s': tt, 'step_times_s': t_times,
                      'channels_last': self.channels_last,
                      'threads': torch.get_num_threads()},
            'speed_ratio_jax_over_torch': tt / jt}


PAIRS = {'resnet50': ResNet50Pair}


def compare(model: str, *, batch: int, image_size: int, num_classes: int,
            seed: int = 0, warmup: int = 2, repeats: int = 5,
            channels_last: bool = True, timing: bool = True,
            precision: str = 'f32', wgrad: str = 'auto') -> dict[str, Any]:
  if model not in PAIRS:
    raise UserError(f'--model {model!r}: no PyTorch reference to compare with; '
                    f'available: {", ".join(PAIRS)}')
  pair = PAIRS[model](batch=batch, image_size=image_size,
                      num_classes=num_classes, seed=seed,
                      channels_last=channels_last, precision=precision,
                      wgrad=wgrad)
  out = {'model': model, 'batch': batch, 'image_size': image_size,
         'num_classes': num_classes, 'precision': precision,
         'jax_conv_wgrad': pair.wgrad,
         'machine': machine(), **pair.parity()}
  if timing:
    out.update(pair.timing(warmup, repeats))
  return out


def _summary(r: dict[str, Any]) -> str:
  lines = [f'{r["model"]}: batch {r["batch"]} at {r["image_size"]}px, '
           f'{r["precision"]}, JAX kernel gradients {r["jax_conv_wgrad"]}, '
           f'{r["machine"]["devices"]}']
  for key in ('outputs_eval', 'outputs_train', 'loss'):
    e = r[key]
    lines.append(f'  {key:<14} max_abs {e["max_abs"]:.3e}  max_rel '
                 f'{e["max_rel"]:.3e}  norm_rel {e["norm_rel"]:.3e}')
  g = r['grads']
  lines.append(f'  grads          worst norm_rel {g["worst_norm_rel"]:.3e} '
               f'({g["worst_param"]}), median {g["median_norm_rel"]:.3e}')
  if 'jax' in r:
    lines.append(f'  step time      jax {r["jax"]["step_time_s"] * 1e3:.1f} ms '
                 f'(compile {r["jax"]["compile_s"]:.1f} s)  torch '
                 f'{r["torch"]["step_time_s"] * 1e3:.1f} ms  -> JAX speed / '
                 f'PyTorch speed = {r["speed_ratio_jax_over_torch"]:.2f}')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m jaxperf.compare',
                              description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--image-size', type=int, default=128)
  p.add_argument('--num-classes', type=int, default=1000)
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
                 help='run PyTorch in NCHW instead of channels-last')
  p.add_argument('--json', default=None, help='write all results here')
  args = p.parse_args(argv)
  if args.precision == 'f64':
    jax.config.update('jax_enable_x64', True)
  try:
    if args.batch < 1 or args.image_size < 32:
      raise UserError('--batch must be >= 1 and --image-size >= 32')
    result = compare(args.model, batch=args.batch, image_size=args.image_size,
                     num_classes=args.num_classes, seed=args.seed,
                     warmup=args.warmup, repeats=args.repeats,
                     channels_last=not args.torch_contiguous,
                     timing=not args.no_timing, precision=args.precision,
                     wgrad=args.wgrad)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(_summary(result))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
