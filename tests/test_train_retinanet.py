"""RetinaNet's workload: the smoke run to target, a closed-division log on
the reference's on-disk format (8 devices), bad input, the reference's
warmup, data-parallel gradients, and the compiled HLO of the 8-device step
(no all-gather of grouped-convolution activations)."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxperf.config import load_config
from jaxperf.data import openimages
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads import retinanet as retinanet_lib
from tests import cli
from tests.test_train_cli import check_log, checker_errors

ONE_DEVICE = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
EIGHT = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
# A tiny model for the unit tests below (the smoke depth, fewer channels).
TINY = {'image_size': [64, 64], 'base_width': 8, 'groups': 4,
        'width_per_group': 8, 'fpn_channels': 16, 'max_boxes': 4}


def _log_lines(path):
  with open(path) as f:
    return [json.loads(l.split(':::MLLOG ', 1)[1]) for l in f
            if ':::MLLOG' in l]


def test_default_smoke_run_reaches_target_and_passes_checker(tmp_path):
  """What a new user runs: nothing but --model (and a workdir)."""
  workdir = tmp_path / 'run'
  proc = cli.run_train('--model', 'retinanet', '--workdir', str(workdir),
                       timeout=1200, **ONE_DEVICE)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' in proc.stdout and 'run_stop: success' in proc.stdout
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert evals[-1]['mAP'] >= 0.34
  assert all(e['eval_images'] == 64 for e in evals)
  assert [e['epoch'] for e in evals] == list(range(1, len(evals) + 1))
  log = str(workdir / 'mlperf_log.txt')
  values = {l['key']: l['value'] for l in _log_lines(log)}
  assert values['submission_benchmark'] == 'ssd'
  assert values['opt_name'] == 'adam'
  assert values['opt_learning_rate_warmup_factor'] == 0.001
  checked = check_log(log, tmp_path)
  assert checked.returncode == 0, checked.stdout + checked.stderr


def _write_dataset(root, num_train=16, num_eval=8):
  openimages.write_synthetic_openimages(
      root, num_train, num_eval, image_size=(64, 64), num_classes=3, seed=1,
      min_objects=1, max_objects=3)
  return root


def test_reference_files_closed_log_on_8_devices_fails_only_on_accuracy(
    tmp_path):
  """JPEGs and COCO-format JSON in the reference's layout, batch split over
  8 devices: the closed log has every key and the 89 tensor names the
  checker wants, and misses only the target."""
  data = _write_dataset(tmp_path / 'openimages')
  workdir = tmp_path / 'closed'
  proc = cli.run_train(
      '--model', 'retinanet', '--config', 'smoke', '--data-dir', str(data),
      '--workdir', str(workdir), '--set', 'division=closed',
      '--set', 'seed=3', '--set', 'num_classes=3',
      *[a for k, v in TINY.items() if k != 'max_boxes'
        for a in ('--set', f'{k}={json.dumps(v)}')],
      '--set', 'global_batch_size=8', '--set', 'eval_batch_size=8',
      '--set', 'train_epochs=2', timeout=900, **EIGHT)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' not in proc.stdout and 'run_stop: aborted' in proc.stdout
  assert 'data=8 over 8' in proc.stdout
  log = str(workdir / 'mlperf_log.txt')
  lines = _log_lines(log)
  values = {l['key']: l['value'] for l in lines}
  assert values['train_samples'] == 16 and values['eval_samples'] == 8
  assert values['global_batch_size'] == 8
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert [e['step'] for e in evals] == [2, 4]
  assert all(e['eval_images'] == 8 for e in evals)
  tensors = sorted(l['metadata']['tensor'] for l in lines
                   if l['key'] == 'weights_initialization')
  assert len(tensors) == 89
  assert tensors[0] == 'module.backbone.body.conv1.weight'
  accuracy = [l for l in lines if l['key'] == 'eval_accuracy']
  assert [a['metadata']['epoch_num'] for a in accuracy] == [1, 2]
  checked = check_log(log, tmp_path)
  errors = checker_errors(checked)
  assert checked.returncode != 0
  assert errors and all('eval_accuracy' in e for e in errors), errors


@pytest.mark.parametrize('case', ['missing_image', 'box_outside',
                                  'unknown_class'])
def test_bad_annotations_are_clear_errors(tmp_path, case):
  """The run stops before compiling, naming the file and the annotation."""
  data = _write_dataset(tmp_path / 'openimages', num_train=4, num_eval=2)
  labels = data / 'train' / 'labels' / 'openimages-mlperf.json'
  coco = json.loads(labels.read_text())
  ann = coco['annotations'][0]
  image = next(i for i in coco['images'] if i['id'] == ann['image_id'])
  if case == 'missing_image':
    (data / 'train' / 'data' / image['file_name']).unlink()
    want = image['file_name']
  elif case == 'box_outside':
    ann['bbox'] = [image['width'] - 5, 2, 40, 10]
    want = f'annotation {ann["id"]}'
  else:
    ann['category_id'] = 99
    want = '99'
  labels.write_text(json.dumps(coco))
  proc = cli.run_train('--model', 'retinanet', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'),
                       '--set', 'num_classes=3', '--set', 'global_batch_size=2',
                       '--set', 'eval_batch_size=2', timeout=300,
                       **ONE_DEVICE)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert str(labels) in proc.stderr or 'openimages-mlperf.json' in proc.stderr
  assert want in proc.stderr, proc.stderr


def test_class_count_must_match_the_annotations(tmp_path):
  data = _write_dataset(tmp_path / 'openimages', num_train=4, num_eval=2)
  proc = cli.run_train('--model', 'retinanet', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'), timeout=300,
                       **ONE_DEVICE)
  assert proc.returncode == 2
  assert 'num_classes=4' in proc.stderr and '3 categories' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_warmup_is_the_references():
  """lr = base * (factor * (1 - a) + a), a = step / (epochs * steps per
  epoch), stepped per iteration, then the base rate (torch's LambdaLR as
  the reference sets it up, evaluated here step by step)."""
  torch = pytest.importorskip('torch')
  cfg = load_config('retinanet', overrides={'base_learning_rate': 2e-4,
                                            'warmup_epochs': 2,
                                            'global_batch_size': 4})
  w = retinanet_lib.RetinaNet(cfg)
  w.setup(18)                             # 4 steps per epoch, drop last
  assert w.steps_per_epoch == 4 and w.warmup_steps == 8
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.Adam([param], lr=2e-4)
  warm = 8

  def factor(x):
    if x >= warm:
      return 1
    alpha = float(x) / warm
    return 0.001 * (1 - alpha) + alpha
  sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
  for step in range(12):
    want = opt.param_groups[0]['lr']
    np.testing.assert_allclose(float(w.learning_rate(step)), want, rtol=1e-6)
    opt.step()
    sched.step()


def _tiny_workload(mesh=None, **extra):
  cfg = load_config('retinanet', 'smoke', overrides={**TINY, **extra})
  w = retinanet_lib.RetinaNet(cfg)
  if mesh is not None:
    w.check_mesh(mesh)
  w.setup(64)
  return w


def test_data_parallel_step_equals_one_device_step():
  """8 devices (shard_map, one gradient mean) = the same step on one."""
  mesh = mesh_lib.make_mesh(None)
  assert mesh.devices.size == 8
  w1, w8 = _tiny_workload(), _tiny_workload(mesh)
  state = w1.init_state(jax.random.key_data(jax.random.key(0)))
  batch = w1.bench_batch(8, seed=0)
  s1, m1 = jax.jit(w1.train_step)(state, batch)
  sharded = {k: jax.device_put(v, NamedSharding(mesh, P('data')))
             for k, v in batch.items()}
  s8, m8 = jax.jit(w8.train_step)(state, sharded)
  for k in ('loss', 'classification', 'bbox_regression'):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The frozen parameters stay as they were (trainable_backbone_layers=3).
  w3 = _tiny_workload(trainable_backbone_layers=3)
  state = w3.init_state(jax.random.key_data(jax.random.key(0)))
  s3, _ = jax.jit(w3.train_step)(state, batch)
  frozen = w3.model.frozen_mask(state.params)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), s3.params,
                       state.params)
  pairs = list(zip(jax.tree.leaves(moved), jax.tree.leaves(frozen)))
  assert not any(m for m, f in pairs if f)
  assert any(f for _, f in pairs)
  # (At 64x64 the P6/P7 kernels' gradients are too small for one Adam step
  # to change a float32 weight; nearly all the others move.)
  trained = [m for m, f in pairs if not f]
  assert sum(trained) >= len(trained) - 2


def test_compiled_8_device_step_gathers_no_activations():
  """The step of the 8-device mesh reduces gradients and nothing else;
  the same loss left to the SPMD partitioner (negative control) all-gathers
  the whole batch of grouped-convolution activations."""
  mesh = mesh_lib.make_mesh(None)
  rep = NamedSharding(mesh, P())
  w = _tiny_workload(mesh, conv_wgrad='xla')
  abstract = jax.eval_shape(w.init_state,
                            jax.random.key_data(jax.random.key(0)))
  state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
      abstract)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                   sharding=NamedSharding(mesh, P('data')))
           for k, v in w.batch_spec(16, train=True).items()}

  def collectives(workload):
    hlo = jax.jit(workload.train_step).lower(state, batch).compile().as_text()
    gathers = re.findall(r' all-gather(?:-start)?\(', hlo)
    reduces = re.findall(r' all-reduce(?:-start)?\(', hlo)
    return gathers, reduces, hlo
  gathers, reduces, _ = collectives(w)
  assert not gathers and reduces
  naive = _tiny_workload(None, conv_wgrad='xla')     # no shard_map
  gathers, _, _ = collectives(naive)
  assert len(gathers) >= 8
