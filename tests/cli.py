"""Helpers to run `python -m jaxperf.train` as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# One compilation cache for the whole test session, so repeated runs of the
# same configuration compile once.
CACHE_DIR = os.environ.setdefault(
    'JAXPERF_TEST_CACHE', os.path.join(tempfile.gettempdir(),
                                       'jaxperf-test-xla-cache'))

# A smoke run shrunk further for tests: 8 steps an epoch.
FAST = ['--set', 'seed=7', '--set', 'synthetic_train_samples=512',
        '--set', 'synthetic_eval_samples=128', '--set', 'eval_batch_size=64',
        '--set', 'width=8', '--set', 'steps_per_dispatch=2',
        '--set', 'log_every_steps=4']


def env(**extra) -> dict[str, str]:
  e = dict(os.environ)
  e.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  e['JAX_PLATFORMS'] = 'cpu'
  e['JAXPERF_CACHE_DIR'] = CACHE_DIR
  e['PYTHONUNBUFFERED'] = '1'
  e.update(extra)
  return e


def train_cmd(*args: str) -> list[str]:
  return [sys.executable, '-m', 'jaxperf.train', *args]


def run_train(*args: str, timeout: float = 600, **env_extra
              ) -> subprocess.CompletedProcess:
  return subprocess.run(train_cmd(*args), env=env(**env_extra),
                        capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(workdir) -> dict[int, float]:
  return {r['step']: r['loss'] for r in read_metrics(workdir)
          if r.get('kind') == 'train'}


def mllog_lines(path) -> list[dict]:
  """The MLLOG records of an MLPerf log file."""
  with open(path) as f:
    return [json.loads(l.split(':::MLLOG ', 1)[1]) for l in f
            if ':::MLLOG' in l]


def set_args(overrides: dict) -> list[str]:
  """--set k=v arguments (values as JSON) for a dict of config overrides."""
  return [a for k, v in overrides.items()
          for a in ('--set', f'{k}={json.dumps(v)}')]
