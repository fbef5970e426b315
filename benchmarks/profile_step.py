"""Where a train step's time goes, per kind of XLA operation.

    python benchmarks/profile_step.py --model resnet50 --batch 16 \
        --set image_size=128 --set dtype=float32 [--steps 2] [--json out.json]

Compiles the workload's train step (as `jaxperf.bench` does, on one device),
runs it under `jax.profiler.trace`, and sums the executed operations' times
by kind: convolution fusions, dots, reductions, element-wise fusions, copies,
... (a fusion counts as the heaviest operation it contains). Also lists the
element-wise fusions by name, which is where layout changes, batch-norm
arithmetic and slicing show up. Times are per step; the total is the sum of
operation times, which can exceed the wall time when operations overlap.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time


def _computations(hlo: str) -> tuple[dict[str, list[str]], dict[str, str]]:
  """HLO text -> (computation -> lines, instruction -> its line)."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    if not line.startswith(' ') and line.rstrip().endswith('{'):
      m = re.match(r'^(?:ENTRY )?%?([\w.\-]+) ', line)
      current = m.group(1) if m else None
      if current:
        comps[current] = []
      continue
    if current:
      comps[current].append(line)
  inst = {}
  for lines in comps.values():
    for line in lines:
      m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = ', line)
      if m:
        inst[m.group(1)] = line
  return comps, inst


def _opcode(line: str) -> str | None:
  m = re.match(r'\s*(?:ROOT )?%[\w.\-]+ = .*? ([a-z][\w\-]*)\(', line)
  return m.group(1) if m else None


def classify(hlo: str):
  """A function from executed op name to its kind."""
  comps, inst = _computations(hlo)

  def contained(comp: str, depth: int = 0) -> set[str]:
    ops = set()
    for line in comps.get(comp, []):
      op = _opcode(line)
      if op:
        ops.add(op)
      if depth < 4:
        for sub in re.findall(r'(?:calls|to_apply)=%([\w.\-]+)', line):
          ops |= contained(sub, depth + 1)
    return ops

  def kind(name: str) -> str:
    line = inst.get(name)
    if line is None:
      return 'runtime'
    op = _opcode(line) or 'unknown'
    if op not in ('fusion', 'custom-call'):
      return op
    m = re.search(r'calls=%([\w.\-]+)', line)
    ops = contained(m.group(1)) if m else set()
    for heavy in ('convolution', 'dot', 'reduce-window', 'select-and-scatter',
                  'scatter', 'reduce'):
      if heavy in ops:
        return f'fusion({heavy})'
    return 'fusion(elementwise)'
  return kind


def profile(args) -> dict:
  import jax
  import numpy as np
  from jaxperf import bench
  from jaxperf.sharding import mesh as mesh_lib
  from jaxperf.workloads.base import new_rng

  cls, cfg = bench.resolve_config(args, jax.devices()[0].platform, 1)
  w = cls(cfg)
  mesh = mesh_lib.make_mesh('data=1', devices=jax.devices()[:1])
  w.check_mesh(mesh)
  w.setup(int(cfg.synthetic_train_samples))
  state = jax.jit(w.init_state)(new_rng(0))
  spec = w.batch_spec(int(cfg.global_batch_size), train=True)
  rng = np.random.default_rng(0)
  batch = {}
  for k, s in spec.items():
    if np.issubdtype(s.dtype, np.integer):
      hi = 256 if s.dtype == np.uint8 else int(cfg.get('num_classes', 2))
      batch[k] = rng.integers(0, hi, s.shape).astype(s.dtype)
    else:
      batch[k] = rng.normal(size=s.shape).astype(s.dtype)
  batch = jax.device_put(batch)
  step = jax.jit(w.train_step, donate_argnums=0)
  hlo = step.lower(state, batch).compile().as_text()
  for _ in range(2):
    state, m = step(state, batch)
    jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, batch)
    jax.block_until_ready(m)
  wall = (time.perf_counter() - t0) / args.steps

  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.steps):
        state, m = step(state, batch)
        jax.block_until_ready(m)
    files = glob.glob(os.path.join(tmp, '**', '*.trace.json.gz'),
                      recursive=True)
    if not files:
      raise SystemExit('error: the profiler wrote no trace')
    with gzip.open(files[0]) as f:
      events = json.load(f)['traceEvents']

  kind = classify(hlo)
  by_kind = collections.Counter()
  count = collections.Counter()
  by_fusion = collections.Counter()
  for e in events:
    name = e.get('name', '')
    if e.get('ph') != 'X' or name.startswith('$') or kind(name) == 'runtime':
      continue
    k = kind(name)
    by_kind[k] += e['dur'] / 1e3 / args.steps
    count[k] += 1
    if k == 'fusion(elementwise)':
      by_fusion[re.sub(r'[.\d]+$', '', name)] += e['dur'] / 1e3 / args.steps
  return {'model': w.name, 'config': cfg.to_dict(),
          'machine': bench.machine_info(),
          'wall_step_ms': wall * 1e3,
          'ops_ms_per_step': dict(by_kind.most_common()),
          'ops_per_step': {k: v // args.steps for k, v in count.items()},
          'elementwise_fusions_ms_per_step': dict(by_fusion.most_common(15))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', required=True)
  p.add_argument('--config', default=None)
  p.add_argument('--set', dest='overrides', action='append', default=[])
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--json', default=None)
  args = p.parse_args(argv)
  args.precision = None
  args.image_size = None
  r = profile(args)
  print(f'{r["model"]}: {r["wall_step_ms"]:.0f} ms per step (wall)')
  for k, v in r['ops_ms_per_step'].items():
    print(f'  {v:8.1f} ms  {r["ops_per_step"][k]:5d} ops  {k}')
  print('  element-wise fusions by name:')
  for k, v in r['elementwise_fusions_ms_per_step'].items():
    print(f'    {v:8.1f} ms  {k}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
