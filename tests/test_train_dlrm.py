"""End-to-end DLRM runs of `python -m jaxperf.train`: the synthetic smoke run
to target, the reference's binary Criteo files under a closed-division log
on 8 devices with hot rows, resuming on another mesh, and bad input."""

from __future__ import annotations

import json

import numpy as np

from jaxperf.data import criteo
from tests import cli
from tests.test_train_cli import check_log, checker_errors

ONE_DEVICE = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
EIGHT = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
# Row counts of a tiny dataset (the counts file); tables take them as sizes.
COUNTS = [300, 50, 20, 7, 120, 3, 60, 150, 7, 250, 90, 70, 10, 200, 100, 155,
          4, 97, 14, 280, 170, 260, 85, 130, 108, 36]


def _log_lines(path):
  with open(path) as f:
    return [json.loads(l.split(':::MLLOG ', 1)[1]) for l in f
            if ':::MLLOG' in l]


def _write_dataset(root, n_train=4096, n_eval=1000, seed=0):
  """The reference's files: <name>_train.bin, <name>_test.bin and the
  counts file, with rows of the synthetic click model."""
  root.mkdir(parents=True, exist_ok=True)
  model = criteo.ClickModel(COUNTS, seed=seed)
  for name, n, salt in (('train', n_train, 1), ('test', n_eval, 2)):
    rows, _ = model.rows(n, salt)
    criteo.write_criteo_bin(root / f'terabyte_processed_{name}.bin',
                            rows[:, 0], rows[:, 1:14], rows[:, 14:])
  criteo.write_counts(root / 'day_fea_count.npz', COUNTS)
  return root


def test_default_smoke_run_reaches_target_and_passes_checker(tmp_path):
  """What a new user runs: nothing but --model (and a workdir)."""
  workdir = tmp_path / 'run'
  proc = cli.run_train('--model', 'dlrm', '--workdir', str(workdir),
                       timeout=900, **ONE_DEVICE)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' in proc.stdout and 'run_stop: success' in proc.stdout
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert evals[-1]['auc'] >= 0.8025
  assert evals[-1]['eval_examples'] == 65536
  assert [e['epoch'] for e in evals] == [0.25 * (i + 1)
                                         for i in range(len(evals))]
  log = str(workdir / 'mlperf_log.txt')
  lines = _log_lines(log)
  accuracy = [l for l in lines if l['key'] == 'eval_accuracy']
  # The reference's epoch_num: 1 + epochs done.
  assert [a['metadata']['epoch_num'] for a in accuracy] == [
      1 + e['epoch'] for e in evals]
  values = {l['key']: l['value'] for l in lines}
  assert values['sgd_opt_learning_rate_decay_poly_power'] == 2
  assert values['train_samples'] == 1048576
  checked = check_log(log, tmp_path)
  assert checked.returncode == 0, checked.stdout + checked.stderr


def test_reference_files_closed_log_on_8_devices_fails_only_on_accuracy(
    tmp_path):
  """The .bin files at tiny size, tables sized by the counts file and
  sharded over 8 devices with hot rows: the closed log has every key and
  tensor name the checker wants and misses only the target."""
  data = _write_dataset(tmp_path / 'criteo')
  workdir = tmp_path / 'closed'
  proc = cli.run_train(
      '--model', 'dlrm', '--data-dir', str(data), '--workdir', str(workdir),
      '--set', 'division=closed', '--set', 'seed=3', '--set', 'hot_rows=500',
      '--set', 'global_batch_size=512', '--set', 'eval_batch_size=256',
      '--set', 'train_epochs=1.0', '--set', 'eval_every_epochs=0.5',
      '--set', 'warmup_steps=2', '--set', 'decay_start_step=4',
      '--set', 'decay_steps=4', timeout=900, **EIGHT)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' not in proc.stdout and 'run_stop: aborted' in proc.stdout
  assert 'data=8 over 8' in proc.stdout
  log = str(workdir / 'mlperf_log.txt')
  lines = _log_lines(log)
  values = {l['key']: l['value'] for l in lines}
  assert values['train_samples'] == 4096 and values['eval_samples'] == 1000
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert [e['eval_examples'] for e in evals] == [1000, 1000]
  assert [e['step'] for e in evals] == [4, 8]
  tensors = sorted(l['metadata']['tensor'] for l in lines
                   if l['key'] == 'weights_initialization')
  assert len(tensors) == 9 and tensors[0] == 'bottom_mlp_dense1'
  accuracy = [l for l in lines if l['key'] == 'eval_accuracy']
  assert [a['metadata']['epoch_num'] for a in accuracy] == [1.5, 2.0]
  checked = check_log(log, tmp_path)
  errors = checker_errors(checked)
  assert checked.returncode != 0
  assert errors and all('eval_accuracy' in e for e in errors), errors


def test_resumes_on_another_mesh_and_refuses_another_layout(tmp_path):
  """Row-layout checkpoints from 8 devices resume on 2; a table-layout
  checkpoint does not silently load into another layout."""
  common = ['--model', 'dlrm', '--set', 'seed=5', '--set',
            'synthetic_train_samples=16384', '--set',
            'synthetic_eval_samples=2048', '--set', 'eval_batch_size=2048',
            '--set', 'global_batch_size=512', '--set', 'eval_every_epochs=0.5',
            '--set', 'steps_per_dispatch=4']
  workdir = tmp_path / 'run'
  proc = cli.run_train(*common, '--workdir', str(workdir), '--set',
                       'train_epochs=1.0', timeout=600, **EIGHT)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  proc = cli.run_train(*common, '--workdir', str(workdir), '--mesh', 'data=2',
                       '--set', 'train_epochs=2.0', timeout=600,
                       XLA_FLAGS='--xla_force_host_platform_device_count=2')
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'resumed from' in proc.stdout and '(step 32, epoch 1.00)' \
      in proc.stdout
  steps = [r['step'] for r in cli.read_metrics(workdir) if r['kind'] == 'train']
  assert steps == list(range(1, 65))
  # The same run with whole tables per device cannot read it.
  proc = cli.run_train(*common, '--workdir', str(workdir), '--set',
                       'embedding_layout=table', '--set', 'train_epochs=3.0',
                       timeout=600, **EIGHT)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'layout: row' in proc.stderr and 'layout: table' in proc.stderr
  assert 'Traceback' not in proc.stderr


def _bad_run(tmp_path, data, *extra):
  return cli.run_train('--model', 'dlrm', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'),
                       '--set', 'global_batch_size=512',
                       '--set', 'eval_batch_size=256',
                       '--set', 'train_epochs=1.0', *extra,
                       timeout=600, **ONE_DEVICE)


def test_truncated_binary_file(tmp_path):
  data = _write_dataset(tmp_path / 'criteo', n_train=1024, n_eval=256)
  path = data / 'terabyte_processed_train.bin'
  size = path.stat().st_size
  with open(path, 'r+b') as f:
    f.truncate(size - 100)
  proc = _bad_run(tmp_path, data)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert str(path) in proc.stderr and '160' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_category_index_beyond_its_table(tmp_path):
  data = _write_dataset(tmp_path / 'criteo', n_train=1024, n_eval=256)
  path = data / 'terabyte_processed_train.bin'
  rows = np.fromfile(path, '<i4').reshape(-1, 40)
  rows[700, 14 + 3] = COUNTS[3] + 5          # C4 has 7 rows
  rows.tofile(path)
  proc = _bad_run(tmp_path, data)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert str(path) in proc.stderr and 'C4' in proc.stderr
  assert '700' in proc.stderr and 'Traceback' not in proc.stderr
