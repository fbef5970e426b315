"""python -m jaxperf.bench --model M [--config C] [--set k=v]... [--batch N]
                          [--mesh a=n,...] [--precision f32|bf16] [--steps N]
                          [--warmup N] [--peak-tflops X] [--json PATH]

Measures one workload's train step: compile time, step time (median, mean,
p10, p90 of individually timed steps), throughput, FLOPs per step as XLA
counts them, achieved FLOP/s and MFU against a peak that is either given or
measured on the spot with a large matmul of the same dtype.

The state is created sharded exactly as the trainer creates it, and one
synthetic batch is generated on the devices and reused for every step, so no
host input pipeline is timed. Prints a summary; `--json PATH` writes every
number together with a description of the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any

from jaxperf.errors import UserError

_PRECISIONS = {'f32': 'float32', 'bf16': 'bfloat16', 'f16': 'float16'}
_PRECISION_NAMES = {v: k for k, v in _PRECISIONS.items()}
# Without --config on a CPU-only machine: the full-size model at a batch and
# dtype a CPU can step through in seconds.
_CPU_DEFAULTS = {'global_batch_size': 16, 'dtype': 'float32'}
# Default matmul side for the measured peak, per device.
_PEAK_MATMUL = {'cpu': 4096, 'default': 8192}
_PEAK_REPS = 5


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m jaxperf.bench',
      description='Benchmark the train step of an MLPerf Training workload.',
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='examples:\n'
             '  python -m jaxperf.bench --model resnet50\n'
             '  python -m jaxperf.bench --model resnet50 --batch 16 --set '
             'image_size=128 --precision f32 --json out.json\n'
             '  python -m jaxperf.bench --model resnet50 --config 8gpu '
             '--precision bf16 --mesh data=8\n')
  p.add_argument('--model', help='workload to benchmark (e.g. resnet50)')
  p.add_argument('--config', default=None,
                 help='a named scale of the workload or a YAML file of '
                      'overrides. Default: the full-size base config at batch '
                      '16 in float32 on CPU; <n>gpu (else 1gpu) on GPUs')
  p.add_argument('--set', dest='overrides', action='append', default=[],
                 metavar='KEY=VALUE', help='override a config key (repeatable)')
  p.add_argument('--batch', type=int, default=None,
                 help='global batch size (overrides global_batch_size)')
  p.add_argument('--precision', choices=sorted(_PRECISIONS), default=None,
                 help='compute dtype (the config key dtype); parameters stay '
                      'float32')
  p.add_argument('--image-size', type=int, default=None,
                 help='input resolution (overrides image_size)')
  p.add_argument('--mesh', default=None,
                 help='device mesh, e.g. data=8 (default: all devices on data)')
  p.add_argument('--steps', type=int, default=20,
                 help='timed steps (default 20)')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed steps after compilation (default 3)')
  p.add_argument('--peak-tflops', type=float, default=None,
                 help='peak TFLOP/s of one device for MFU; default: measured '
                      'with a matmul in the run dtype')
  p.add_argument('--peak-matmul-size', type=int, default=None,
                 help='side of the matmul that measures the peak, per device '
                      '(default 8192 on GPU; on CPU 4096 divided by the cube '
                      'root of the device count, as simulated CPU devices '
                      'share the cores)')
  p.add_argument('--seed', type=int, default=0,
                 help='seed of the initial state and the synthetic batch')
  p.add_argument('--json', default=None, metavar='PATH',
                 help='write all results to this JSON file')
  return p


# ----------------------------------------------------------------- config
def resolve_config(args: argparse.Namespace, platform_name: str,
                   device_count: int):
  """The workload class and its config, resolved as the trainer does."""
  from jaxperf import config as config_lib, workloads
  cls = workloads.get(args.model)
  overrides: dict[str, Any] = dict(cls.bench_overrides)
  default_scale = None
  if args.config is None:
    if platform_name == 'cpu':
      overrides.update(_CPU_DEFAULTS)
      overrides.update(cls.bench_cpu_overrides)
    else:
      scales = config_lib.scale_names(cls.name)
      for guess in (f'{device_count}gpu', '1gpu'):
        if guess in scales:
          default_scale = guess
          break
  overrides.update(config_lib.parse_set(args.overrides))
  if args.batch is not None:
    overrides['global_batch_size'] = args.batch
  if args.precision is not None:
    overrides['dtype'] = _PRECISIONS[args.precision]
  if args.image_size is not None:
    base = config_lib.workload_file(cls.name)['base']
    if 'image_size' in base:                # a side, or (height, width)
      overrides['image_size'] = ([args.image_size] * 2 if isinstance(
          base['image_size'], list) else args.image_size)
    elif 'input_shape' in base:             # volumes: a cube of that side
      overrides['input_shape'] = [args.image_size] * 3
      overrides['val_input_shape'] = [args.image_size] * 3
    elif 'min_size' in base:                # resized and bucketed images
      side = -(-args.image_size // 32) * 32
      overrides.update(min_size=args.image_size, max_size=args.image_size,
                       buckets=[[side, side]])
    else:
      raise UserError(f'--image-size: {cls.name} has no image size to set')
  cfg = config_lib.load_config(cls.name, args.config, overrides,
                               default_scale=default_scale)
  return cls, cfg


def _check_args(args: argparse.Namespace) -> None:
  if not args.model:
    raise UserError('--model is required (e.g. --model resnet50)')
  if args.steps < 1:
    raise UserError(f'--steps {args.steps}: must be at least 1')
  if args.warmup < 0:
    raise UserError(f'--warmup {args.warmup}: must be at least 0')
  if args.batch is not None and args.batch < 1:
    raise UserError(f'--batch {args.batch}: must be at least 1')
  if args.peak_tflops is not None and not args.peak_tflops > 0:
    raise UserError(f'--peak-tflops {args.peak_tflops}: must be positive')
  if args.peak_matmul_size is not None and args.peak_matmul_size < 1:
    raise UserError(f'--peak-matmul-size {args.peak_matmul_size}: must be '
                    f'at least 1')


# ----------------------------------------------------------------- measuring
def step_stats(times: list[float]) -> dict[str, float]:
  """Median, mean, p10 and p90 (linear interpolation) of step times."""
  xs = sorted(times)

  def pct(q: float) -> float:
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
  return {'median': statistics.median(xs), 'mean': statistics.fmean(xs),
          'p10': pct(0.1), 'p90': pct(0.9), 'min': xs[0], 'max': xs[-1]}


def _synthetic_batch(spec, shardings, num_classes: int, seed: int):
  """Random arrays of the batch spec, created on the devices with the
  sharding given per array."""
  import jax
  import jax.numpy as jnp

  def make(key):
    out = {}
    for i, (name, s) in enumerate(sorted(spec.items())):
      k = jax.random.fold_in(key, i)
      if s.dtype == jnp.bool_:
        out[name] = jnp.ones(s.shape, s.dtype)
      elif s.dtype == jnp.uint8:
        out[name] = jax.random.randint(k, s.shape, 0, 256, jnp.int32
                                       ).astype(s.dtype)
      elif jnp.issubdtype(s.dtype, jnp.integer):
        out[name] = jax.random.randint(k, s.shape, 0, num_classes, s.dtype)
      else:
        out[name] = jax.random.normal(k, s.shape, s.dtype)
    return out
  return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


def _flops_from(cost) -> float | None:
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def measure_peak(mesh, dtype_name: str, n: int, reps: int = _PEAK_REPS
                 ) -> dict[str, Any]:
  """Matmul FLOP/s per device: one n x n x n matmul on every mesh device at
  once, so devices that share hardware (simulated CPU devices) share it here
  as they do in the train step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devices = mesh.devices.flatten()
  k = len(devices)
  flat = Mesh(np.asarray(devices), ('d',))
  sharding = NamedSharding(flat, P('d'))
  dtype = jnp.dtype(dtype_name)
  gen = jax.jit(lambda key: jax.random.normal(key, (k, n, n), dtype),
                out_shardings=sharding)
  a, b = gen(jax.random.key(1)), gen(jax.random.key(2))
  matmul = jax.jit(
      lambda a, b: jnp.einsum('kij,kjl->kil', a, b,
                              preferred_element_type=dtype),
      out_shardings=sharding)
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  return {'n': n, 'dtype': dtype_name, 'devices': k, 'reps': reps,
          'median_s': median,
          'tflops_per_device': 2 * n**3 / median / 1e12}


def _default_matmul_size(platform_name: str, device_count: int) -> int:
  if platform_name == 'cpu':
    n = _PEAK_MATMUL['cpu'] / device_count ** (1 / 3)
    return max(256, int(round(n / 256)) * 256)
  return _PEAK_MATMUL['default']


def _memory(devices) -> dict[str, Any]:
  """Peak bytes in use, as far as the backend reports them."""
  peaks, limits = [], []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats:
      if 'peak_bytes_in_use' in stats:
        peaks.append(int(stats['peak_bytes_in_use']))
      if 'bytes_limit' in stats:
        limits.append(int(stats['bytes_limit']))
  return {'peak_bytes_per_device': max(peaks) if peaks else None,
          'bytes_limit_per_device': min(limits) if limits else None}


def _compiled_memory(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'alias_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes')
  return {f.replace('_size_in_bytes', '_bytes'): int(getattr(m, f))
          for f in fields if hasattr(m, f)}


def machine_info() -> dict[str, Any]:
  """The host, the accelerator and the software versions."""
  import flax
  import jax
  import jaxlib
  cpu_model = None
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          cpu_model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  cpu_model = cpu_model or platform.processor() or None
  mem = None
  try:
    mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    pass
  dev = jax.devices()[0]
  try:
    load = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    load = None
  return {
      'cpu_model': cpu_model,
      'cpu_cores': os.cpu_count(),
      'memory_bytes': mem,
      'gpu': dev.device_kind if dev.platform == 'gpu' else None,
      'hostname': platform.node(),
      'os': platform.platform(),
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'load_average': load,  # 1, 5, 15 min, when the run started
  }


# ----------------------------------------------------------------- the run
def run_bench(workload, mesh, *, steps: int, warmup: int,
              peak_tflops: float | None = None,
              peak_matmul_size: int | None = None, seed: int = 0,
              log=print) -> dict[str, Any]:
  """Benchmarks `workload`'s train step on `mesh`; returns the results."""
  import jax
  import numpy as np
  from jaxperf.errors import ConfigError
  from jax.sharding import NamedSharding
  from jaxperf.sharding import mesh as mesh_lib
  from jaxperf.trainer import _peak_flops
  from jaxperf.workloads.base import new_rng

  machine = machine_info()
  cfg = workload.config
  gbs = int(cfg.global_batch_size)
  n_data = mesh_lib.data_parallel_size(mesh)
  if gbs % n_data:
    raise ConfigError(
        f'global_batch_size={gbs} does not divide evenly over the {n_data} '
        f'data-parallel devices of --mesh {mesh_lib.describe(mesh)}')
  workload.check_mesh(mesh)
  workload.setup(int(cfg.get('synthetic_train_samples', gbs)))
  devices = list(mesh.devices.flatten())
  n_dev = len(devices)
  plat = devices[0].platform

  # State, created sharded as the trainer creates it.
  t0 = time.perf_counter()
  rng = new_rng(seed)
  abstract = jax.eval_shape(workload.init_state, rng)
  state_sh = workload.state_sharding(abstract, mesh)
  state = jax.jit(workload.init_state, out_shardings=state_sh)(rng)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  params = workload.count_params(state.params)

  # One batch, generated on the devices.
  spec = workload.batch_spec(gbs, train=True)
  part = workload.batch_partition(mesh, train=True)
  batch_shs = {k: NamedSharding(mesh, part[k]) for k in spec}
  host_batch = workload.bench_batch(gbs, seed)
  if host_batch is None:
    batch = _synthetic_batch(spec, batch_shs, int(cfg.get('num_classes', 2)),
                             seed)
  else:
    batch = {k: jax.device_put(np.asarray(host_batch[k], spec[k].dtype),
                               batch_shs[k]) for k in spec}

  # Compile ahead of time; FLOPs from the step before it is partitioned.
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, state_sh)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                            sharding=batch_shs[k])
                    for k, v in spec.items()}
  step_fn = jax.jit(workload.train_step, donate_argnums=0,
                    out_shardings=(state_sh, mesh_lib.replicated(mesh)))
  t0 = time.perf_counter()
  lowered = step_fn.lower(abstract_state, abstract_batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = _flops_from(lowered.cost_analysis())
  try:
    device_flops = _flops_from(compiled.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    device_flops = None
  log(f'{workload.name}: compiled in {compile_s:.1f}s; {warmup} warmup + '
      f'{steps} timed steps at global batch {gbs} on '
      f'{mesh_lib.describe(mesh)}')

  # Steps, each timed to completion.
  metrics = None
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  loss = float(jax.device_get(metrics['loss']))
  memory = _memory(devices)
  phases = workload.bench_phases(state, seed, log)
  del state

  stats = step_stats(times)
  median = stats['median']
  achieved = flops / median if flops else None

  # Peak FLOP/s of one device: given, or a matmul in the run's dtype.
  dtype_name = str(cfg.get('dtype', 'float32'))
  matmul = None
  if peak_tflops is not None:
    peak = peak_tflops * 1e12
    peak_source = 'given'
  else:
    n = peak_matmul_size or _default_matmul_size(plat, n_dev)
    log(f'measuring peak: {n}x{n} {dtype_name} matmul on {n_dev} device(s)')
    matmul = measure_peak(mesh, dtype_name, n)
    peak = matmul['tflops_per_device'] * 1e12
    peak_source = 'measured_matmul'
  mfu = achieved / (peak * n_dev) if achieved and peak else None
  spec_peak = _peak_flops(devices[0])

  return {
      'model': workload.name,
      'benchmark': workload.benchmark,
      'scale': cfg.scale,
      'config': cfg.to_dict(),
      'dtype': dtype_name,
      'precision': _PRECISION_NAMES.get(dtype_name, dtype_name),
      'global_batch': gbs,
      'per_device_batch': gbs // n_data,
      'platform': plat,
      'device_kind': devices[0].device_kind,
      'device_count': n_dev,
      'mesh': ','.join(f'{k}={v}' for k, v in mesh.shape.items()),
      'data_parallel': n_data,
      'param_count': params,
      'init_s': init_s,
      'compile_s': compile_s,
      'compile_cache_dir': jax.config.jax_compilation_cache_dir or None,
      'warmup_steps': warmup,
      'steps': steps,
      'step_time_s': median,
      'step_time_mean_s': stats['mean'],
      'step_time_p10_s': stats['p10'],
      'step_time_p90_s': stats['p90'],
      'step_time_min_s': stats['min'],
      'step_time_max_s': stats['max'],
      'step_times_s': times,
      'samples_per_s': gbs / median,
      'final_loss': loss,
      'flops_per_step': flops,
      'flops_per_sample': flops / gbs if flops else None,
      'flops_source': 'xla_cost_analysis',
      'flops_per_sample_formula': workload.flops_per_example(),
      'compiled_flops_per_device': device_flops,
      'achieved_flops_per_s': achieved,
      'achieved_tflops_per_device': achieved / n_dev / 1e12 if achieved else None,
      'peak_tflops_per_device': peak / 1e12,
      'peak_source': peak_source,
      'peak_matmul': matmul,
      'spec_peak_tflops_per_device': spec_peak / 1e12 if spec_peak else None,
      'mfu': mfu,
      'peak_memory_bytes_per_device': memory['peak_bytes_per_device'],
      'memory_limit_bytes_per_device': memory['bytes_limit_per_device'],
      'compiled_memory_bytes': _compiled_memory(compiled),
      'workload_info': workload.bench_info(),
      'phases': phases,
      'machine': machine,
      'timestamp_utc': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%dT%H:%M:%SZ'),
  }


# ----------------------------------------------------------------- output
def _si(x: float | None, unit: str) -> str:
  if x is None:
    return 'n/a'
  for factor, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'),
                         (1e3, 'k')):
    if abs(x) >= factor:
      return f'{x / factor:.3g} {prefix}{unit}'
  return f'{x:.3g} {unit}'


def _bytes(x: int | None) -> str:
  if x is None:
    return 'n/a (not reported by the backend)'
  for shift, unit in ((30, 'GiB'), (20, 'MiB'), (10, 'KiB')):
    if x >= 2**shift:
      return f'{x / 2**shift:.2f} {unit}'
  return f'{x} B'


def summary(r: dict[str, Any]) -> str:
  """A human-readable table of the results."""
  m = r['machine']
  peak = f'{r["peak_tflops_per_device"]:.3g} TFLOP/s per device ({r["peak_source"]}'
  if r['peak_matmul']:
    pm = r['peak_matmul']
    peak += f': {pm["n"]}^3 {pm["dtype"]} matmul'
  peak += ')'
  mfu = f'{r["mfu"]:.1%}' if r['mfu'] is not None else 'n/a'
  cm = r['compiled_memory_bytes'] or {}
  rows = [
      ('model', f'{r["model"]} ({r["scale"]} config, {r["dtype"]})'),
      ('batch', f'{r["global_batch"]} global, {r["per_device_batch"]} per '
                f'data-parallel device'),
      ('devices', f'{r["device_count"]} x {r["device_kind"]} '
                  f'({r["platform"]}), mesh {r["mesh"]}'),
      ('host', f'{m["cpu_model"]}, {m["cpu_cores"]} cores, '
               f'{_bytes(m["memory_bytes"])}'),
      ('software', f'jax {m["jax"]}, jaxlib {m["jaxlib"]}, flax {m["flax"]}, '
                   f'python {m["python"]}'),
      ('parameters', f'{r["param_count"]:,}'),
      ('compile', f'{r["compile_s"]:.2f} s'),
      ('step time', f'median {r["step_time_s"] * 1e3:.1f} ms, mean '
                    f'{r["step_time_mean_s"] * 1e3:.1f} ms, p10 '
                    f'{r["step_time_p10_s"] * 1e3:.1f} ms, p90 '
                    f'{r["step_time_p90_s"] * 1e3:.1f} ms '
                    f'({r["steps"]} steps after {r["warmup_steps"]} warmup)'),
      ('throughput', f'{r["samples_per_s"]:.2f} samples/s'),
      ('FLOPs', f'{_si(r["flops_per_step"], "FLOP")} per step, '
                f'{_si(r["flops_per_sample"], "FLOP")} per sample '
                f'(XLA cost analysis)'
                + (f'; by formula {_si(r["flops_per_sample_formula"], "FLOP")}'
                   f' per sample' if r.get('flops_per_sample_formula')
                   else '')),
      ('achieved', f'{_si(r["achieved_flops_per_s"], "FLOP/s")} in total'),
      ('peak', peak),
      ('MFU', mfu),
      ('peak memory', _bytes(r['peak_memory_bytes_per_device'])),
      ('XLA buffers', f'{_bytes(cm.get("temp_bytes"))} temporaries, '
                      f'{_bytes(cm.get("argument_bytes"))} arguments'
       if cm else 'n/a'),
      ('final loss', f'{r["final_loss"]:.4f}'),
  ]
  info = r.get('workload_info') or {}
  if 'embedding_bytes_rows_read' in info:
    per = (info['embedding_bytes_rows_read']
           + info['embedding_bytes_rows_updated'])
    moved = (info['embedding_bytes_exchanged']
             + info.get('embedding_bytes_hot_allreduce', 0.0))
    rate = r['samples_per_s']
    rows.append(('embeddings', (
        f'{info["embedding_layout"]} layout, {info["hot_rows"]:,} hot rows '
        f'({info["replicated_tables"]} tables wholly replicated), '
        f'{info["embedding_rows_per_device"]:,} stacked rows per device')))
    rows.append(('embedding traffic', (
        f'{_bytes(int(per))} per sample read+written in tables, '
        f'{_bytes(int(moved))} per sample between devices (rows '
        f'{_bytes(int(info["embedding_bytes_exchanged"]))}, hot-row '
        f'gradients {_bytes(int(info.get("embedding_bytes_hot_allreduce", 0)))}'
        f'); at '
        f'{rate:,.0f} samples/s: {_si(per * rate, "B/s")} table traffic, '
        f'{_si(moved * rate, "B/s")} exchanged')))
  for name, phase in (r.get('phases') or {}).items():
    rows.append((name, phase['summary']))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    _check_args(args)
    from jaxperf import workloads
    workloads.get(args.model)  # an unknown name fails before jax starts
    import jax
    from jaxperf.sharding import mesh as mesh_lib
    devices = jax.devices()
    cls, cfg = resolve_config(args, devices[0].platform, len(devices))
    mesh = mesh_lib.make_mesh(args.mesh)
    workload = cls(cfg)
    result = run_bench(workload, mesh, steps=args.steps, warmup=args.warmup,
                       peak_tflops=args.peak_tflops,
                       peak_matmul_size=args.peak_matmul_size, seed=args.seed)
    if not math.isfinite(result['final_loss']):
      print(f'warning: the loss is {result["final_loss"]} after '
            f'{args.warmup + args.steps} steps', file=sys.stderr)
    print(summary(result), flush=True)
    if args.json:
      parent = os.path.dirname(os.path.abspath(args.json))
      os.makedirs(parent, exist_ok=True)
      with open(args.json, 'w') as f:
        json.dump(result, f, indent=2)
        f.write('\n')
      print(f'results written to {args.json}')
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
