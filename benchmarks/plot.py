"""python benchmarks/plot.py [--results DIR] [--out PNG]

Charts every result file in DIR (default benchmarks/results) in one PNG: the
train step time of each result, JAX next to PyTorch where the file carries a
PyTorch time, and the MFU of each result that has one.

Two file shapes are read: `python -m jaxperf.bench --json` files (top-level
`step_time_s`, `mfu`) and comparison files shaped like
{"model": ..., "jax": {"step_time_s": ..., "mfu": ...},
 "torch": {"step_time_s": ...}}. Other JSON files are skipped.

Needs matplotlib, an optional dependency: pip install matplotlib.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))


def _number(x: Any) -> float | None:
  if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0:
    return float(x)
  return None


def parse_result(data: Any, label: str) -> dict[str, Any] | None:
  """One chart row from a result file's contents; None if it has no step
  time."""
  if not isinstance(data, dict):
    return None
  jax_part = data.get('jax')
  if isinstance(jax_part, dict) and _number(jax_part.get('step_time_s')):
    torch_part = data.get('torch')
    torch_part = torch_part if isinstance(torch_part, dict) else {}
    return {'label': label, 'model': data.get('model'),
            'jax_step_s': _number(jax_part['step_time_s']),
            'torch_step_s': _number(torch_part.get('step_time_s')),
            'mfu': _number(jax_part.get('mfu'))}
  if _number(data.get('step_time_s')):
    return {'label': label, 'model': data.get('model'),
            'jax_step_s': _number(data['step_time_s']),
            'torch_step_s': None,
            'mfu': _number(data.get('mfu'))}
  return None


def load_results(directory: str) -> tuple[list[dict[str, Any]], list[str]]:
  """(chart rows, skipped file names) of the JSON files in `directory`."""
  rows, skipped = [], []
  for path in sorted(glob.glob(os.path.join(directory, '*.json'))):
    label = os.path.splitext(os.path.basename(path))[0]
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError):
      data = None
    row = parse_result(data, label)
    if row is None:
      skipped.append(os.path.basename(path))
    else:
      rows.append(row)
  return rows, skipped


def plot(rows: list[dict[str, Any]], out: str, plt) -> None:
  """Writes the step-time and MFU bar charts of `rows` to `out`."""
  labels = [r['label'] for r in rows]
  x = range(len(rows))
  has_torch = any(r['torch_step_s'] for r in rows)
  width = 0.4 if has_torch else 0.6
  fig, (ax_t, ax_m) = plt.subplots(
      2, 1, figsize=(max(6.0, 1.6 * len(rows) + 2), 8), sharex=True)

  # A result with a PyTorch time gets two bars side by side, else one.
  jax_ms = [r['jax_step_s'] * 1e3 for r in rows]
  jax_x = [i - width / 2 if r['torch_step_s'] else i for i, r in zip(x, rows)]
  bars = ax_t.bar(jax_x, jax_ms, width, label='JAX')
  ax_t.bar_label(bars, fmt='%.0f', fontsize=8)
  if has_torch:
    torch_rows = [(i, r) for i, r in zip(x, rows) if r['torch_step_s']]
    torch_ms = [r['torch_step_s'] * 1e3 for _, r in torch_rows]
    bars = ax_t.bar([i + width / 2 for i, _ in torch_rows], torch_ms, width,
                    label='PyTorch')
    ax_t.bar_label(bars, fmt='%.0f', fontsize=8)
  ax_t.set_ylabel('train step time (ms, median)')
  ax_t.set_title('Train step time')
  ax_t.legend()

  mfu = [100 * r['mfu'] if r['mfu'] else 0.0 for r in rows]
  bars = ax_m.bar(list(x), mfu, 0.6, color='tab:green')
  ax_m.bar_label(bars, labels=[f'{v:.1f}%' if v else 'n/a' for v in mfu],
                 fontsize=8)
  ax_m.set_ylabel('MFU (%)')
  ax_m.set_title('Model FLOPs utilization (JAX)')
  ax_m.set_ylim(0, max(mfu + [1.0]) * 1.2)
  ax_m.set_xticks(list(x))
  ax_m.set_xticklabels(labels, rotation=20, ha='right', fontsize=8)

  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog='python benchmarks/plot.py',
      description='Bar charts of benchmark result files (needs matplotlib).')
  p.add_argument('--results', default=os.path.join(_HERE, 'results'),
                 help='directory of result JSON files '
                      '(default: benchmarks/results)')
  p.add_argument('--out', default=None,
                 help='PNG to write (default: <results>/summary.png)')
  args = p.parse_args(argv)
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('error: plotting needs matplotlib, an optional dependency: '
          'pip install matplotlib', file=sys.stderr)
    return 2
  if not os.path.isdir(args.results):
    print(f'error: --results {args.results}: no such directory',
          file=sys.stderr)
    return 2
  rows, skipped = load_results(args.results)
  for name in skipped:
    print(f'skipped {name}: no step time in it')
  if not rows:
    print(f'error: no result file with a step time in {args.results}',
          file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.results, 'summary.png')
  plot(rows, out, plt)
  print(f'{len(rows)} result(s) charted in {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
