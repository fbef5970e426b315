"""`python -m jaxperf.train --model minigo`: generations as blocks, the
MLPerf log, resuming on the same games, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxperf.config import load_config
from jaxperf.rl import train as mtrain
from jaxperf.workloads.minigo import GenerationSchedule
from tests import cli
from tests.test_train_cli import check_log

# 5x5 at tiny sizes: a generation in seconds.
TINY = {'seed': 3, 'board_size': 5, 'komi': 0.5, 'max_moves': 20,
        'conv_width': 8, 'fc_width': 8, 'trunk_layers': 1,
        'games_per_generation': 16, 'parallel_games': 16,
        'selfplay_readouts': 4, 'bootstrap_readouts': 4, 'eval_games': 8,
        'eval_readouts': 4, 'global_batch_size': 16, 'window_generations': 2,
        'train_filter': 0.5, 'log_every_steps': 5,
        # Out of reach, so every generation runs.
        'target_accuracy': 1.01}


def test_default_smoke_run_reaches_target_and_passes_checker(tmp_path):
  """What a new user runs: nothing but --model (and a workdir; the seed
  fixed here). 9x9, 64 games a generation, against the random model."""
  cfg = load_config('minigo', 'smoke')
  workdir = tmp_path / 'run'
  proc = cli.run_train('--model', 'minigo', '--workdir', str(workdir),
                       '--set', 'seed=1', timeout=1500, JAX_PLATFORMS='cpu',
                       XLA_FLAGS='--xla_force_host_platform_device_count=1')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'run_stop: success' in proc.stdout, proc.stdout[-3000:]
  evals = [r for r in cli.read_metrics(workdir) if r.get('kind') == 'eval']
  assert evals[-1]['win_rate'] >= cfg.target_accuracy == 0.5
  assert all(e['win_rate'] < 0.5 for e in evals[:-1])
  assert all(e['eval_games'] == cfg.eval_games == 64 for e in evals)
  lines = cli.mllog_lines(workdir / 'mlperf_log.txt')
  accuracy = [l['value'] for l in lines if l['key'] == 'eval_accuracy']
  assert accuracy == [e['win_rate'] for e in evals]
  assert [l['metadata']['status'] for l in lines
          if l['key'] == 'run_stop'] == ['success']
  games = json.loads((workdir / 'selfplay' / 'gen-0001.json').read_text())
  assert games['bootstrap'] and games['games'] == cfg.games_per_generation
  checked = check_log(str(workdir / 'mlperf_log.txt'), tmp_path)
  assert checked.returncode == 0, checked.stdout + checked.stderr


def _run(workdir, epochs: int, *extra: str) -> subprocess.CompletedProcess:
  return cli.run_train('--model', 'minigo', '--workdir', str(workdir),
                       *cli.set_args({**TINY, 'train_epochs': epochs}),
                       *extra, JAX_PLATFORMS='cpu',
                       XLA_FLAGS='--xla_force_host_platform_device_count=1')


def test_generations_log_and_resume(tmp_path):
  workdir = tmp_path / 'run'
  proc = _run(workdir, 2)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'run_stop: aborted' in proc.stdout, proc.stdout[-2000:]
  games = workdir / 'selfplay'
  first = {p: os.path.getmtime(games / p) for p in
           ('gen-0001.npz', 'gen-0002.npz')}
  summaries = [json.loads((games / f'gen-000{g}.json').read_text())
               for g in (1, 2)]
  assert [s['games'] for s in summaries] == [16, 16]
  assert summaries[0]['bootstrap'] and not summaries[1]['bootstrap']

  recs = cli.mllog_lines(workdir / 'mlperf_log.txt')
  keys = [r['key'] for r in recs]
  assert keys.count('block_start') == keys.count('block_stop') == 2
  actual = [r for r in recs if r['key'] == 'actual_selfplay_games_per_generation']
  assert [(r['value'], r['metadata']['epoch_num']) for r in actual] == [
      (16, 1), (16, 2)]
  hyper = {r['key']: r['value'] for r in recs}
  assert hyper['min_selfplay_games_per_generation'] == 16
  assert hyper['train_batch_size'] == 16
  assert hyper['lr_rates'] == [0.05, 0.005]   # the smoke scale's
  accs = [r for r in recs if r['key'] == 'eval_accuracy']
  assert [r['metadata']['epoch_num'] for r in accs] == [1, 2]
  assert all(0.0 <= r['value'] <= 1.0 for r in accs)
  # Steps per generation: one pass over the window's 0.5 sample.
  positions = [s['positions'] for s in summaries]
  steps = [round(0.5 * positions[0]) // 16,
           round(0.5 * (positions[0] + positions[1])) // 16]
  evals = [r for r in cli.read_metrics(workdir) if r.get('kind') == 'eval']
  assert [e['step'] for e in evals] == [steps[0], steps[0] + steps[1]]
  # The window: the sample of generation 2 draws on both generations.
  assert max(cli.train_losses(workdir)) == sum(steps)

  # Resume: a third generation, the first two's games kept as they were.
  proc = _run(workdir, 3)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'resumed from' in proc.stdout
  for p, t in first.items():
    assert os.path.getmtime(games / p) == t
  assert (games / 'gen-0003.json').exists()
  evals = [r for r in cli.read_metrics(workdir) if r.get('kind') == 'eval']
  assert [e['epoch'] for e in evals] == [1, 2, 3]
  resumed = cli.mllog_lines(workdir / 'mlperf_log.resume1.txt')
  assert [r['metadata']['first_epoch_num'] for r in resumed
          if r['key'] == 'block_start'] == [3]
  for log in ('mlperf_log.txt', 'mlperf_log.resume1.txt'):
    check = subprocess.run(
        [sys.executable, '-m', 'mlperf_logging.compliance_checker',
         '--usage', 'training', '--ruleset', '2.1.0', str(workdir / log)],
        capture_output=True, text=True, timeout=120)
    # A win rate of exactly 1.0 in every evaluation is the one thing the
    # open rules refuse; these tiny runs cannot reach it against 8 games.
    if all(r['value'] < 1.0 for r in accs):
      assert 'SUCCESS' in check.stdout + check.stderr, check.stdout[-2000:]


@pytest.mark.parametrize('case', ['data_dir', 'no_target', 'missing_target',
                                  'board', 'odd_eval', 'lr', 'batch'])
def test_bad_input_is_a_clear_error(tmp_path, case):
  extra: list[str] = []
  if case == 'data_dir':
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'x').write_text('x')
    extra = ['--data-dir', str(tmp_path / 'd')]
    want = ['--data-dir', 'self-play']
  elif case == 'no_target':
    extra = ['--set', 'target_model=null']
    want = ['target_model', 'random']
  elif case == 'missing_target':
    extra = ['--set', f'target_model={tmp_path / "nowhere"}']
    want = ['target_model', 'nowhere', 'no such directory']
  elif case == 'board':
    extra = ['--set', 'board_size=1']
    want = ['board_size=1', '2..25']
  elif case == 'odd_eval':
    extra = ['--set', 'eval_games=7']
    want = ['eval_games=7', 'even']
  elif case == 'lr':
    extra = ['--set', 'lr_rates=[0.1]']
    want = ['lr_rates', 'lr_boundaries']
  else:
    extra = ['--set', 'global_batch_size=100000']
    want = ['generation 1', 'global_batch_size=100000']
  proc = _run(tmp_path / 'w', 1, *extra)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  for w in want:
    assert w in proc.stderr, proc.stderr[-2000:]


def test_a_finished_run_is_the_target_of_another(tmp_path):
  """target_model=PATH plays the latest weights of another run."""
  first = tmp_path / 'first'
  assert _run(first, 1).returncode == 1
  proc = _run(tmp_path / 'second', 1, '--set', f'target_model={first}')
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'vs the target' in proc.stdout
  proc = _run(tmp_path / 'third', 1, '--set', f'target_model={first}',
              '--set', 'conv_width=4')
  assert proc.returncode == 2
  assert 'does not fit this network' in proc.stderr, proc.stderr[-2000:]


def test_the_references_tf_checkpoint_is_a_target(tmp_path):
  """target_model=PREFIX: the reference's TF1 checkpoint (as its target
  model is shipped) plays, imported through jaxperf.interop."""
  prefix = os.path.join(os.path.dirname(__file__), 'data', 'minigo_tf1',
                        'target')
  net = ['--set', 'board_size=9', '--set', 'conv_width=8', '--set',
         'fc_width=4', '--set', 'trunk_layers=2']
  proc = _run(tmp_path / 'a', 1, *net, '--set', f'target_model={prefix}')
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'vs the target' in proc.stdout
  proc = _run(tmp_path / 'b', 1, *net, '--set', 'fc_width=6', '--set',
              f'target_model={prefix}.index')
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  for want in (f'target_model={prefix}.index', 'dense_1/kernel',
               'fc_width=6'):
    assert want in proc.stderr, proc.stderr[-2000:]


def test_generation_schedule():
  s = GenerationSchedule(global_batch=16)
  assert s.steps_for(3) == 3                # nothing known: 1 per generation
  s.set_steps(1, 5)
  s.set_steps(2, 7)
  assert [s.steps_for(g) for g in (1, 2, 3)] == [5, 12, 19]
  assert s.generation_of(0) == (1, 0) and s.generation_of(4) == (1, 0)
  assert s.generation_of(5) == (2, 5) and s.generation_of(11) == (2, 5)
  assert s.epoch_of(5) == 1.0 and s.epoch_of(12) == 2.0
  with pytest.raises(ValueError, match='past the 2 generations'):
    s.generation_of(12)
  s.set_steps(2, 3)                         # a replayed generation
  assert s.steps_for(2) == 8


def test_inverse_symmetry_undoes_each_symmetry():
  n = 5
  x = np.arange(n * n * 2, dtype=np.float32).reshape(n, n, 2)
  p = np.arange(n * n + 1, dtype=np.float32)
  seen = set()
  for k in range(8):
    planes, q = mtrain.symmetry(x, p, k)
    # Features and policy move together: plane 0 is the policy's board.
    np.testing.assert_array_equal(np.asarray(planes)[..., 0],
                                  np.asarray(mtrain.symmetry(
                                      x[..., :1], p, k)[0])[..., 0])
    np.testing.assert_array_equal(mtrain.inverse_symmetry(q, k), p)
    seen.add(tuple(np.asarray(q)))
  assert len(seen) == 8
  assert jax.numpy.asarray(q)[-1] == p[-1]


def test_bench_times_self_play(tmp_path):
  """jaxperf.bench reports self-play games/s and positions/s (full games
  here) beside the train step."""
  out = tmp_path / 'bench.json'
  args = [a for k, v in TINY.items() if k not in ('seed', 'log_every_steps',
                                                   'target_accuracy')
          for a in ('--set', f'{k}={json.dumps(v)}')]
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxperf.bench', '--model', 'minigo', '--config',
       'smoke', *args, '--set', 'bench_games=4', '--set', 'bench_moves=null',
       '--steps', '2', '--warmup', '1', '--peak-matmul-size', '128',
       '--json', str(out)], env=cli.env(JAX_PLATFORMS='cpu', XLA_FLAGS=''),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  r = json.loads(out.read_text())
  sp = r['phases']['selfplay']
  assert sp['games'] == 4 and sp['readouts'] == 4 and sp['moves_cap'] is None
  # Every game is played to its end: at most the 20-move cap each.
  assert 4 <= sp['positions'] <= 4 * 20
  assert sp['games_per_s'] == pytest.approx(4 / sp['seconds'])
  assert sp['positions_per_s'] == pytest.approx(sp['positions'] / sp['seconds'])
  assert 'games/s' in proc.stdout and 'positions/s' in proc.stdout
