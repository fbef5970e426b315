"""End-to-end 3D U-Net runs of `python -m jaxperf.train`: synthetic smoke,
spatial partitioning, the reference .npy format and the compliance checker."""

from __future__ import annotations

import json
import os
import re

import pytest

from jaxperf.data import kits19
from tests import cli
from tests.test_train_cli import check_log, checker_errors

ONE_DEVICE = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
# Shorter than the smoke scale's defaults, same model and data shapes.
FAST = ['--set', 'seed=11', '--set', 'synthetic_train_samples=16',
        '--set', 'synthetic_eval_samples=2', '--set', 'eval_batch_size=8',
        '--set', 'steps_per_dispatch=2', '--set', 'log_every_steps=4']


def _log_lines(path):
  with open(path) as f:
    return [json.loads(l.split(':::MLLOG ', 1)[1]) for l in f
            if ':::MLLOG' in l]


def test_default_smoke_run_reaches_target_and_passes_checker(tmp_path):
  """What a new user runs: nothing but --model (and a workdir)."""
  workdir = tmp_path / 'run'
  # The seed is drawn from the clock, as a new user's is, so the steps to
  # the target vary from run to run, and on 2 shared cores (pytest -n 2) a
  # run has taken over 15 minutes.
  proc = cli.run_train('--model', 'unet3d', '--workdir', str(workdir),
                       timeout=1800, **ONE_DEVICE)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' in proc.stdout
  assert 'run_stop: success' in proc.stdout
  assert re.search(r'step \d+/\d+ \| epoch [\d.]+ \| loss [\d.]+ .* ex/s '
                   r'\| ETA', proc.stdout)
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert evals[-1]['mean_dice'] >= 0.908
  assert evals[-1]['eval_cases'] == 8
  log = str(workdir / 'mlperf_log.txt')
  tensors = {l['metadata']['tensor'] for l in _log_lines(log)
             if l['key'] == 'weights_initialization'}
  assert len(tensors) == 50 and 'up4_deconv' in tensors
  checked = check_log(log, tmp_path)
  assert checked.returncode == 0, checked.stdout + checked.stderr


def test_spatial_mesh_trains_like_data_parallel(tmp_path):
  """One volume split over 8 devices: the same losses as one device."""
  runs = {}
  for mesh, devices in (('data=1', 1), ('data=1,spatial=8', 8)):
    workdir = tmp_path / mesh.replace(',', '_').replace('=', '')
    proc = cli.run_train('--model', 'unet3d', '--workdir', str(workdir),
                         '--mesh', mesh, *FAST, '--set', 'train_epochs=2',
                         '--set', 'start_eval_at=2', '--set',
                         'conv_wgrad=xla', timeout=900, XLA_FLAGS=
                         f'--xla_force_host_platform_device_count={devices}')
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    runs[mesh] = cli.read_metrics(workdir)
  losses = {m: [r['loss'] for r in recs if r['kind'] == 'train']
            for m, recs in runs.items()}
  assert len(losses['data=1']) == 16
  assert losses['data=1'] == pytest.approx(losses['data=1,spatial=8'],
                                           rel=2e-3)
  dice = {m: [r['mean_dice'] for r in recs if r['kind'] == 'eval']
          for m, recs in runs.items()}
  assert dice['data=1'] == pytest.approx(dice['data=1,spatial=8'], abs=2e-3)


def test_reference_format_closed_log_fails_only_on_accuracy(tmp_path):
  """168 + 42 tiny cases in the reference's .npy format stand in for KiTS19:
  the closed-division log has every key the checker wants (train_samples
  168, eval_samples 42, the input shapes) and misses only the target."""
  data = tmp_path / 'kits19'
  kits19.make_tiny_dataset(data, 168, 42, shape=(32, 32, 32), seed=0,
                           write_split=False)
  workdir = tmp_path / 'closed'
  proc = cli.run_train('--model', 'unet3d', '--data-dir', str(data),
                       '--workdir', str(workdir), '--set', 'division=closed',
                       '--set', 'seed=5', '--set', 'train_epochs=1',
                       '--set', 'global_batch_size=8',
                       '--set', 'steps_per_dispatch=3', timeout=900,
                       **ONE_DEVICE)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' not in proc.stdout
  assert 'run_stop: aborted' in proc.stdout
  log = str(workdir / 'mlperf_log.txt')
  values = {l['key']: l['value'] for l in _log_lines(log)}
  assert values['train_samples'] == 168
  assert values['eval_samples'] == 42
  assert values['training_input_shape'] == [32, 32, 32]
  assert values['validation_input_shape'] == [32, 32, 32]
  assert values['validation_overlap'] == 0.5
  assert values['oversampling'] == 0.4
  assert values['opt_learning_rate_decay_boundary_epochs'] == []
  checked = check_log(log, tmp_path)
  errors = checker_errors(checked)
  assert checked.returncode != 0
  assert errors and all('eval_accuracy' in e for e in errors), errors


def test_missing_label_file_is_a_clear_error(tmp_path):
  data = tmp_path / 'kits19'
  kits19.make_tiny_dataset(data, 4, 2, shape=(32, 32, 32), seed=0)
  victim = sorted(p for p in os.listdir(data) if p.endswith('_y.npy'))[1]
  os.remove(data / victim)
  proc = cli.run_train('--model', 'unet3d', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'), *FAST, **ONE_DEVICE)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert victim in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_mismatched_shapes_are_a_clear_error(tmp_path):
  import numpy as np
  data = tmp_path / 'kits19'
  kits19.make_tiny_dataset(data, 4, 2, shape=(32, 32, 32), seed=0)
  victim = sorted(p for p in os.listdir(data) if p.endswith('_y.npy'))[0]
  np.save(data / victim, np.zeros((1, 32, 32, 40), np.uint8))
  proc = cli.run_train('--model', 'unet3d', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'), *FAST, **ONE_DEVICE)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert victim in proc.stderr and 'Traceback' not in proc.stderr


def test_mesh_that_does_not_divide_the_volume(tmp_path):
  proc = cli.run_train('--model', 'unet3d', '--workdir', str(tmp_path / 'r'),
                       '--mesh', 'data=1,spatial=6', *FAST,
                       XLA_FLAGS='--xla_force_host_platform_device_count=6')
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'spatial axis (6) must divide the depth of input_shape=[32, 32, 32]' \
      in proc.stderr
