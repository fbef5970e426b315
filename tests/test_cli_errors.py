"""Bad input gets one clear error line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os

import pytest

from tests import cli


def _fails(*args, expect: str, rc: int = 2):
  proc = cli.run_train(*args, timeout=300)
  assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert expect in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-4000:]
  return proc


def test_unknown_model():
  _fails('--model', 'resnet99', expect="--model 'resnet99': unknown workload")


def test_missing_model():
  _fails(expect='--model is required')


def test_unknown_set_key(tmp_path):
  proc = _fails('--model', 'resnet50', '--workdir', str(tmp_path),
                '--set', 'widht=8', expect="unknown config key 'widht'")
  assert 'did you mean width' in proc.stderr


def test_set_value_of_wrong_type(tmp_path):
  _fails('--model', 'resnet50', '--workdir', str(tmp_path),
         '--set', 'global_batch_size=big',
         expect="global_batch_size='big' has the wrong type")


def test_set_without_equals(tmp_path):
  _fails('--model', 'resnet50', '--workdir', str(tmp_path),
         '--set', 'width', expect="--set 'width': expected key=value")


def test_unknown_scale(tmp_path):
  _fails('--model', 'resnet50', '--workdir', str(tmp_path),
         '--config', 'tpu-pod', expect="--config 'tpu-pod': not a scale")


@pytest.mark.parametrize('mesh', ['data=3', 'data=16', 'data=2,tensor=3'])
def test_mesh_that_does_not_match_the_devices(tmp_path, mesh):
  _fails('--model', 'resnet50', '--workdir', str(tmp_path), '--mesh', mesh,
         expect='the product must equal the device count')


def test_malformed_mesh(tmp_path):
  _fails('--model', 'resnet50', '--workdir', str(tmp_path),
         '--mesh', 'data:8', expect='expected name=size')


def test_batch_that_does_not_split_over_the_mesh(tmp_path):
  _fails('--model', 'resnet50', '--workdir', str(tmp_path),
         '--set', 'global_batch_size=60',
         expect='global_batch_size=60 does not divide evenly over the 8')


def test_missing_data_dir(tmp_path):
  missing = tmp_path / 'nope'
  _fails('--model', 'resnet50', '--workdir', str(tmp_path / 'w'),
         '--data-dir', str(missing), expect=f'--data-dir {missing}: no such directory')


def test_empty_data_dir(tmp_path):
  empty = tmp_path / 'empty'
  os.makedirs(empty)
  _fails('--model', 'resnet50', '--workdir', str(tmp_path / 'w'),
         '--data-dir', str(empty), expect=f'--data-dir {empty}: the directory is empty')


def test_list_shows_workloads_with_metric_and_target():
  proc = cli.run_train('--list')
  assert proc.returncode == 0, proc.stderr
  line = [l for l in proc.stdout.splitlines() if l.startswith('resnet50')]
  assert line and 'top1_accuracy' in line[0] and '0.759' in line[0]
  assert 'smoke' in line[0] and 'resnet' in line[0]
