"""End-to-end runs of `python -m jaxperf.train`, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import cli

CHECKER = [sys.executable, '-m', 'mlperf_logging.compliance_checker',
           '--usage', 'training', '--ruleset', '2.1.0']


def check_log(log: str, tmp_path) -> subprocess.CompletedProcess:
  out = os.path.join(tmp_path, f'checker-{os.path.basename(log)}.log')
  return subprocess.run(CHECKER + ['--log_output', out, log],
                        capture_output=True, text=True, timeout=120)


def checker_errors(proc: subprocess.CompletedProcess) -> list[str]:
  """The checker's complaints: failed checks and errors, less its verdict."""
  text = proc.stdout + proc.stderr
  return [line for line in text.splitlines()
          if ('Failed' in line or 'ERROR' in line)
          and line.strip() != 'ERROR - FAILED']


# --------------------------------------------------------------------------
# The default smoke run and the compliance checker.


def test_default_smoke_run_reaches_target_and_passes_checker(tmp_path):
  """Exactly what a new user runs: nothing but --model (and a workdir)."""
  workdir = tmp_path / 'run'
  proc = cli.run_train('--model', 'resnet50', '--workdir', str(workdir))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' in proc.stdout
  assert 'run_stop: success' in proc.stdout
  # Progress lines people can read.
  assert re.search(r'step \d+/\d+ \| epoch [\d.]+ \| loss [\d.]+ .* ex/s '
                   r'\| ETA', proc.stdout)
  records = cli.read_metrics(workdir)
  evals = [r for r in records if r['kind'] == 'eval']
  assert evals and evals[-1]['top1_accuracy'] >= 0.759
  train = [r for r in records if r['kind'] == 'train']
  assert [r['step'] for r in train] == list(range(1, len(train) + 1))
  assert all({'loss', 'learning_rate', 'throughput', 'epoch',
              'tflops_per_device'} <= set(r) for r in train[1:])
  assert records[-1]['kind'] == 'run_stop'
  assert records[-1]['status'] == 'success'

  log = str(workdir / 'mlperf_log.txt')
  with open(log) as f:
    text = f.read()
  assert '"submission_division", "value": "open"' in text
  proc = check_log(log, tmp_path)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'SUCCESS' in proc.stdout + proc.stderr

  # Running the finished run again does not train it further.
  again = cli.run_train('--model', 'resnet50', '--workdir', str(workdir))
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'already reached the target' in again.stdout
  assert cli.read_metrics(workdir) == records


OPTIMIZER_KEYS = {
    'lars': {'lars_opt_base_learning_rate', 'lars_opt_end_learning_rate',
             'lars_opt_learning_rate_decay_poly_power', 'lars_epsilon',
             'lars_opt_learning_rate_decay_steps', 'lars_opt_momentum',
             'lars_opt_learning_rate_warmup_epochs', 'lars_opt_weight_decay'},
    'sgd': {'sgd_opt_base_learning_rate', 'sgd_opt_end_learning_rate',
            'sgd_opt_learning_rate_decay_poly_power',
            'sgd_opt_learning_rate_decay_steps', 'sgd_opt_weight_decay',
            'sgd_opt_momentum', 'model_bn_span',
            'opt_learning_rate_warmup_epochs'},
}


@pytest.mark.parametrize('optimizer, lr', [('lars', '2.0'), ('sgd', '0.25')])
def test_closed_division_log_fails_only_on_accuracy(tmp_path, optimizer, lr):
  """A closed-division log of a run that stops short of 0.759 top-1: the
  checker's only complaint is the accuracy target."""
  workdir = tmp_path / 'closed'
  proc = cli.run_train('--model', 'resnet50', '--workdir', str(workdir),
                       *cli.FAST, '--set', 'division=closed',
                       '--set', f'optimizer={optimizer}',
                       '--set', f'base_learning_rate={lr}',
                       '--set', 'train_epochs=1')
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'run_stop: aborted' in proc.stdout
  log = str(workdir / 'mlperf_log.txt')
  with open(log) as f:
    lines = [json.loads(l.split(':::MLLOG ', 1)[1]) for l in f if ':::MLLOG' in l]
  tensors = {l['metadata']['tensor'] for l in lines
             if l['key'] == 'weights_initialization'}
  assert len(tensors) == 161
  keys = {l['key'] for l in lines}
  assert OPTIMIZER_KEYS[optimizer] | {
      'global_batch_size', 'gradient_accumulation_steps', 'opt_name',
      'train_samples', 'eval_samples', 'seed', 'cache_clear'} <= keys
  assert [l['value'] for l in lines if l['key'] == 'opt_name'] == [optimizer]
  stop = [l for l in lines if l['key'] == 'run_stop']
  assert stop[0]['metadata']['status'] == 'aborted'

  proc = check_log(log, tmp_path)
  assert proc.returncode != 0
  errors = checker_errors(proc)
  assert errors, proc.stdout + proc.stderr
  for line in errors:
    assert 'eval_accuracy' in line or '0.759' in line, (
        f'unexpected checker failure: {line}\n{proc.stdout}{proc.stderr}')


# --------------------------------------------------------------------------
# Kill and resume.

RESUME_ARGS = [*cli.FAST, '--set', 'train_epochs=4',
               '--set', 'target_accuracy=1.01',
               '--set', 'checkpoint_every_steps=4']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  proc = cli.run_train('--model', 'resnet50', '--workdir', str(workdir),
                       *RESUME_ARGS)
  # The target is out of reach on purpose: the run goes to the end of its
  # schedule (aborted, exit 1), checkpointing as it goes.
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'run_stop: aborted' in proc.stdout
  return workdir


def _wait_for_checkpoint(workdir, min_step: int, proc, timeout=300) -> int:
  ckdir = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'run ended (rc {proc.returncode}) before a '
                           f'checkpoint at step >= {min_step}')
    if os.path.isdir(ckdir):
      done = [int(d) for d in os.listdir(ckdir) if d.isdigit() and
              os.path.exists(os.path.join(ckdir, d, 'commit_success.txt'))]
      if done and max(done) >= min_step:
        return max(done)
    time.sleep(0.05)
  raise AssertionError('no checkpoint appeared')


def test_killed_and_resumed_run_matches_uninterrupted(uninterrupted, tmp_path):
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(
      cli.train_cmd('--model', 'resnet50', '--workdir', str(workdir),
                    *RESUME_ARGS),
      env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    step = _wait_for_checkpoint(workdir, 8, proc)
    proc.send_signal(signal.SIGKILL)   # a real, unannounced kill
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(cli.train_losses(workdir))
  assert killed_at < 32, 'the run finished before it was killed'

  resumed = cli.run_train('--model', 'resnet50', '--workdir', str(workdir),
                          *RESUME_ARGS)
  assert resumed.returncode == 1, resumed.stdout[-3000:] + resumed.stderr[-3000:]
  assert re.search(r'resumed from .*checkpoints/\d+', resumed.stdout)
  assert os.path.exists(workdir / 'mlperf_log.resume1.txt')

  want = cli.train_losses(uninterrupted)
  got = cli.train_losses(workdir)
  assert sorted(got) == sorted(want) == list(range(1, 33))
  assert step >= 8
  mismatched = {s: (want[s], got[s]) for s in want if want[s] != got[s]}
  assert not mismatched, mismatched
  evals = lambda w: [(r['step'], r['top1_accuracy']) for r in
                     cli.read_metrics(w) if r['kind'] == 'eval']
  assert evals(workdir) == evals(uninterrupted)


def test_corrupt_latest_checkpoint_is_reported_not_loaded(uninterrupted,
                                                          tmp_path):
  workdir = tmp_path / 'corrupt'
  shutil.copytree(uninterrupted, workdir)
  ckdir = workdir / 'checkpoints'
  latest = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
  # Damage every array data file of the latest checkpoint.
  damaged = 0
  for root, _, files in os.walk(ckdir / str(latest) / 'state'):
    for name in files:
      path = os.path.join(root, name)
      if os.path.basename(root) == 'd' and os.path.getsize(path) > 64:
        with open(path, 'r+b') as f:
          f.seek(os.path.getsize(path) // 2)
          f.write(b'\x00\xff' * 16)
        damaged += 1
  assert damaged
  proc = cli.run_train('--model', 'resnet50', '--workdir', str(workdir),
                       *RESUME_ARGS)
  assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f'checkpoints/{latest} is corrupt' in proc.stderr
  assert 'resumed from' not in proc.stdout


def test_interrupted_save_is_ignored_with_a_warning(uninterrupted, tmp_path):
  workdir = tmp_path / 'partial'
  shutil.copytree(uninterrupted, workdir)
  ckdir = workdir / 'checkpoints'
  latest = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
  # What a save killed half-way leaves: orbax's temporary directory.
  shutil.copytree(ckdir / str(latest),
                  ckdir / f'{latest + 4}.orbax-checkpoint-tmp-1234')
  proc = cli.run_train('--model', 'resnet50', '--workdir', str(workdir),
                       *RESUME_ARGS)
  assert 'interrupted checkpoint save' in proc.stdout, proc.stdout[-2000:]
  assert f'resumed from {ckdir}/{latest}' in proc.stdout


def test_sigterm_saves_then_resume_finishes(tmp_path):
  workdir = tmp_path / 'term'
  args = [*cli.FAST, '--set', 'train_epochs=2', '--set',
          'target_accuracy=1.01', '--set', 'log_every_steps=2']
  proc = subprocess.Popen(
      cli.train_cmd('--model', 'resnet50', '--workdir', str(workdir), *args),
      env=cli.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if line.startswith('step 4/'):
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  out = ''.join(seen) + out
  assert proc.returncode == 0, out[-3000:]
  assert 'SIGTERM: stopped at step' in out
  stopped = int(re.search(r'SIGTERM: stopped at step (\d+)', out).group(1))
  assert stopped < 16
  assert os.path.isdir(workdir / 'checkpoints' / str(stopped))
  again = cli.run_train('--model', 'resnet50', '--workdir', str(workdir), *args)
  assert f'(step {stopped},' in again.stdout
  assert 'run_stop: aborted after 16 steps' in again.stdout
  assert sorted(cli.train_losses(workdir)) == list(range(1, 17))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = tmp_path / 'nan'
  proc = cli.run_train('--model', 'resnet50', '--workdir', str(workdir),
                       *cli.FAST, '--set', 'base_learning_rate=1e9',
                       '--set', 'warmup_epochs=4',
                       '--set', 'checkpoint_every_steps=2')
  assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
  m = re.search(r'non-finite loss \((nan|inf|-inf)\) at step (\d+)', proc.stderr)
  assert m, proc.stderr
  bad_step = int(m.group(2))
  kept = sorted(int(d) for d in os.listdir(workdir / 'checkpoints')
                if d.isdigit())
  assert kept and max(kept) < bad_step
  assert f'step {max(kept)}, is kept' in proc.stderr
  losses = cli.train_losses(workdir)
  assert max(losses) < bad_step
  assert all(v == v and abs(v) != float('inf') for v in losses.values())
