"""python -m jaxperf.train --model M [--config C] [--data-dir D] [--set k=v]...
                          [--mesh a=n,...] [--workdir W]

Trains one MLPerf workload to its quality target. With nothing but --model,
on a CPU-only machine, it runs the workload's smoke scale on synthetic data.
The workdir receives the MLPerf log (mlperf_log.txt), metrics.jsonl, the
resolved config and orbax checkpoints; rerunning with the same --workdir
resumes from the latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxperf.errors import TrainingError, UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m jaxperf.train',
      description='Train an MLPerf Training workload with JAX.',
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='examples:\n'
             '  python -m jaxperf.train --model resnet50\n'
             '  python -m jaxperf.train --model resnet50 --config 8gpu '
             '--data-dir /data/imagenet --workdir /ckpt/rn50\n'
             '  python -m jaxperf.train --model resnet50 --set '
             'global_batch_size=128 --mesh data=8\n')
  p.add_argument('--model', help='workload to train (see --list)')
  p.add_argument('--list', action='store_true',
                 help='list the workloads with their metric and target')
  p.add_argument('--config', default=None,
                 help='a named scale of the workload (smoke, 1gpu, 8gpu, ...) '
                      'or a YAML file of config overrides. Default: smoke on '
                      'CPU, else <n>gpu for n devices if the workload has it')
  p.add_argument('--data-dir', default=None,
                 help='dataset in the MLPerf reference on-disk format; '
                      'without it, a synthetic learnable source is used')
  p.add_argument('--set', dest='overrides', action='append', default=[],
                 metavar='KEY=VALUE', help='override a config key (repeatable)')
  p.add_argument('--mesh', default=None,
                 help='device mesh, e.g. data=8 or data=2,tensor=4 '
                      '(default: all devices on data)')
  p.add_argument('--workdir', default=None,
                 help='where the MLPerf log, metrics.jsonl and checkpoints go '
                      '(default: ./runs/<model>-<scale>)')
  p.add_argument('--compile-cache', default=None,
                 help='persistent XLA compilation cache directory '
                      '(default: $JAXPERF_CACHE_DIR or ~/.cache/jaxperf/xla; '
                      '"none" disables it)')
  p.add_argument('--compile-only', action='store_true',
                 help='build the state, compile the steps, report the compile '
                      'time and exit without training')
  p.add_argument('--coordinator', default=None, metavar='HOST:PORT',
                 help='multi-process run: process 0\'s address (also '
                      'JAXPERF_COORDINATOR; SLURM and Open MPI are detected)')
  p.add_argument('--num-processes', type=int, default=None,
                 help='multi-process run: number of processes')
  p.add_argument('--process-id', type=int, default=None,
                 help='multi-process run: this process\'s id, 0..N-1')
  p.add_argument('--init-timeout', type=int, default=None, metavar='S',
                 help='seconds to wait for all processes to meet (default '
                      '120)')
  p.add_argument('--print-config', action='store_true',
                 help='print the resolved config and exit')
  return p


def _list(out) -> None:
  from jaxperf import config as config_lib, workloads
  print(f'{"model":<12} {"MLPerf name":<12} {"metric":<19} {"target":<9} '
        f'scales', file=out)
  for name in workloads.names():
    cls = workloads.get(name)
    cfg = config_lib.load_config(name)
    w = cls(cfg)
    op = '>=' if w.higher_is_better else '<='
    print(f'{name:<12} {w.benchmark:<12} {w.metric:<19} {op}{w.target:<7} '
          f'{", ".join(config_lib.scale_names(name))}', file=out)


def _default_scale(model: str) -> str:
  import jax
  from jaxperf import config as config_lib
  scales = config_lib.scale_names(model)
  platform = jax.devices()[0].platform
  if platform == 'cpu':
    return 'smoke'
  guess = f'{jax.device_count()}gpu'
  if guess in scales:
    return guess
  raise UserError(f'no scale of {model} for {jax.device_count()} '
                  f'{platform} devices; pick one with --config '
                  f'({", ".join(scales)})')


def _setup_compile_cache(flag: str | None) -> None:
  import jax
  path = flag or os.environ.get('JAXPERF_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'jaxperf', 'xla')
  if path.lower() == 'none':
    return
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  for option, value in (('jax_persistent_cache_min_compile_time_secs', 1.0),
                        ('jax_persistent_cache_min_entry_size_bytes', 0)):
    try:
      jax.config.update(option, value)
    except AttributeError:  # an option this jax version does not have
      pass


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.list:
      _list(sys.stdout)
      return 0
    if not args.model:
      raise UserError('--model is required (see --list for the workloads)')
    from jaxperf import distributed
    distributed.initialize(args.coordinator, args.num_processes,
                           args.process_id, init_timeout_s=args.init_timeout)
    from jaxperf import config as config_lib, workloads
    from jaxperf.trainer import RunOptions, Trainer
    cls = workloads.get(args.model)
    name = cls.name
    overrides = config_lib.parse_set(args.overrides)
    default_scale = None if args.config else _default_scale(name)
    cfg = config_lib.load_config(name, args.config, overrides,
                                 default_scale=default_scale)
    if args.print_config:
      print(config_lib.dump(cfg), end='')
      return 0
    if args.data_dir is not None:
      if not os.path.isdir(args.data_dir):
        raise UserError(f'--data-dir {args.data_dir}: no such directory')
      if not os.listdir(args.data_dir):
        raise UserError(f'--data-dir {args.data_dir}: the directory is empty')
    _setup_compile_cache(args.compile_cache)
    workdir = args.workdir or os.path.join('runs', f'{name}-{cfg.scale}')
    workload = cls(cfg)
    result = Trainer(workload, RunOptions(
        workdir=workdir, data_dir=args.data_dir, mesh=args.mesh,
        compile_only=args.compile_only)).run()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except TrainingError as e:
    print(f'training stopped: {e}', file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  return 0 if result.status in ('success', 'preempted', 'compiled') else 1


if __name__ == '__main__':
  sys.exit(main())
