"""Training on ImageNet in its real on-disk layouts (tiny datasets)."""

from __future__ import annotations

import pytest

from tests import cli
from tests import imagenet_fixtures as fx

ARGS = ['--set', 'seed=3', '--set', 'num_classes=4', '--set', 'image_size=32',
        '--set', 'width=8', '--set', 'global_batch_size=16',
        '--set', 'eval_batch_size=16', '--set', 'steps_per_dispatch=2',
        '--set', 'log_every_steps=4', '--set', 'warmup_epochs=1',
        '--set', 'data_workers=4']


@pytest.mark.parametrize('writer', [fx.write_jpeg_folder,
                                    fx.write_mlperf_tfrecords])
def test_trains_to_target_on_real_format(tmp_path, writer):
  data = writer(tmp_path / 'imagenet', num_classes=4, train_per_class=32,
                val_per_class=8)
  workdir = tmp_path / 'run'
  proc = cli.run_train('--model', 'resnet50', '--data-dir', str(data),
                       '--workdir', str(workdir), *ARGS)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' not in proc.stdout
  assert 'run_stop: success' in proc.stdout
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert evals[-1]['top1_accuracy'] >= 0.759
  assert evals[-1]['eval_examples'] == 32
  log = (workdir / 'mlperf_log.txt').read_text()
  assert '"key": "train_samples", "value": 128' in log
  assert '"key": "eval_samples", "value": 32' in log


def test_corrupt_jpeg_stops_the_run_naming_the_file(tmp_path):
  data = fx.write_jpeg_folder(tmp_path / 'imagenet', num_classes=4,
                              train_per_class=4, val_per_class=1)
  victim = sorted((data / 'train' / fx.wnid(2)).iterdir())[1]
  victim.write_bytes(b'\xff\xd8\xff\xe0 truncated')
  proc = cli.run_train('--model', 'resnet50', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'), *ARGS)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert f'corrupt image {victim}: cannot be decoded' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_wrong_class_count_is_a_clear_error(tmp_path):
  data = fx.write_jpeg_folder(tmp_path / 'imagenet', num_classes=3,
                              train_per_class=1, val_per_class=1)
  proc = cli.run_train('--model', 'resnet50', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'), *ARGS)
  assert proc.returncode == 2
  assert 'the dataset has 3 classes but num_classes=4' in proc.stderr
