"""Mask R-CNN's workload: the smoke run to both targets, a closed-division
log on COCO's on-disk layout (polygon and RLE masks, 8 devices), bucketed
batch shapes, bad input, the reference's learning-rate schedule and
parameter groups, data-parallel gradients, and the evaluator's
box and mask scoring."""

from __future__ import annotations

import bisect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from pycocotools import mask as mask_util

from jaxperf.config import load_config
from jaxperf.data import coco
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads import maskrcnn as maskrcnn_lib
from tests import cli
from tests.test_train_cli import check_log, checker_errors

ONE_DEVICE = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
EIGHT = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
# A tiny model on 64-pixel images for the unit tests and the closed run.
TINY = {'base_width': 8, 'fpn_channels': 16, 'representation_size': 32,
        'mask_channels': 16, 'min_size': 64, 'max_size': 96,
        'mask_resolution': 28}


def test_default_smoke_run_reaches_targets_and_passes_checker(tmp_path):
  """What a new user runs: nothing but --model (and a workdir)."""
  cfg = load_config('maskrcnn', 'smoke')
  workdir = tmp_path / 'run'
  proc = cli.run_train('--model', 'maskrcnn', '--workdir', str(workdir),
                       timeout=1500, **ONE_DEVICE)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' in proc.stdout and 'run_stop: success' in proc.stdout
  # Landscape and portrait images: one compiled program per bucket.
  assert '2 train batch shapes compiled' in proc.stdout
  assert 'BBOX ≥ 0.377 and SEGM ≥ 0.339' in proc.stdout
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert evals[-1]['BBOX'] >= cfg.target_accuracy
  assert evals[-1]['SEGM'] >= cfg.target_mask_accuracy
  assert not any(e['BBOX'] >= cfg.target_accuracy and
                 e['SEGM'] >= cfg.target_mask_accuracy for e in evals[:-1])
  assert all(e['eval_images'] == cfg.synthetic_eval_samples for e in evals)
  log = str(workdir / 'mlperf_log.txt')
  lines = cli.mllog_lines(log)
  values = {l['key']: l['value'] for l in lines}
  assert values['submission_benchmark'] == 'maskrcnn'
  assert values['opt_name'] == 'sgd_with_momentum'
  assert values['min_image_size'] == cfg.min_size
  assert values['opt_learning_rate_decay_steps'] == list(cfg.decay_steps)
  accuracy = [l['value'] for l in lines if l['key'] == 'eval_accuracy']
  assert accuracy[-1] == {'BBOX': evals[-1]['BBOX'],
                          'SEGM': evals[-1]['SEGM']}
  checked = check_log(log, tmp_path)
  assert checked.returncode == 0, checked.stdout + checked.stderr


def _write_dataset(root, num_train=24, num_eval=8, rle=True):
  """Synthetic COCO in the reference's layout; with `rle`, every other
  training annotation's polygons become an RLE (compressed counts)."""
  coco.write_synthetic_coco(root, num_train, num_eval, num_classes=3,
                            image_size=64, seed=1, min_objects=1,
                            max_objects=3)
  if rle:
    path = root / 'annotations' / 'instances_train2017.json'
    js = json.loads(path.read_text())
    images = {im['id']: im for im in js['images']}
    for ann in js['annotations'][::2]:
      im = images[ann['image_id']]
      rles = mask_util.frPyObjects(ann['segmentation'], im['height'],
                                   im['width'])
      merged = mask_util.merge(rles)
      merged['counts'] = merged['counts'].decode('ascii')
      ann['segmentation'] = merged
    path.write_text(json.dumps(js))
  return root


def test_reference_files_closed_log_on_8_devices_fails_only_on_accuracy(
    tmp_path):
  """JPEGs and instances JSON (polygons and RLE) in COCO's layout, batches
  split over 8 devices: the closed log has every key and the 21 tensor
  names the checker wants, and misses only the targets."""
  data = _write_dataset(tmp_path / 'coco')
  workdir = tmp_path / 'closed'
  proc = cli.run_train(
      '--model', 'maskrcnn', '--config', 'smoke', '--data-dir', str(data),
      '--workdir', str(workdir), '--set', 'division=closed',
      '--set', 'seed=3', *cli.set_args(TINY),
      '--set', 'num_image_candidates=1000', '--set', 'global_batch_size=8',
      '--set', 'eval_batch_size=8', '--set', 'train_epochs=1',
      '--set', 'eval_every_epochs=1', timeout=900, **EIGHT)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' not in proc.stdout and 'run_stop: aborted' in proc.stdout
  assert 'data=8 over 8' in proc.stdout
  log = str(workdir / 'mlperf_log.txt')
  lines = cli.mllog_lines(log)
  values = {l['key']: l['value'] for l in lines}
  assert values['eval_samples'] == 8
  assert values['num_image_candidates'] == 1000
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert len(evals) == 1 and evals[0]['eval_images'] == 8
  tensors = sorted(l['metadata']['tensor'] for l in lines
                   if l['key'] == 'weights_initialization')
  assert len(tensors) == 21 and 'ROI_MASK_PREDICTOR_fcn_logits' in tensors
  accuracy = [l for l in lines if l['key'] == 'eval_accuracy']
  assert set(accuracy[0]['value']) == {'BBOX', 'SEGM'}
  checked = check_log(log, tmp_path)
  errors = checker_errors(checked)
  assert checked.returncode != 0
  assert errors and all('eval_accuracy' in e for e in errors), errors


@pytest.mark.parametrize('case', ['missing_image', 'class_count',
                                  'no_bucket', 'dispatch', 'backbone'])
def test_bad_input_is_a_clear_error(tmp_path, case):
  """The run stops before compiling with exit code 2, naming what is
  wrong and what was expected."""
  data = _write_dataset(tmp_path / 'coco', num_train=4, num_eval=2,
                        rle=False)
  args = ['--set', 'num_classes=4', *cli.set_args(TINY)]
  if case == 'missing_image':
    js = json.loads((data / 'annotations' /
                     'instances_train2017.json').read_text())
    name = js['images'][0]['file_name']
    (data / 'train2017' / name).unlink()
    want = [name]
  elif case == 'class_count':
    args = ['--set', 'num_classes=3', *cli.set_args(TINY)]
    want = ['num_classes=3', '3 categories', 'num_classes=4']
  elif case == 'no_bucket':
    args += ['--set', 'buckets=[[64, 64]]']
    want = ['fits none of the buckets', 'train2017', '.jpg']
  elif case == 'dispatch':
    args += ['--set', 'steps_per_dispatch=2']
    want = ['steps_per_dispatch=2', 'steps_per_dispatch=1']
  else:
    args += ['--set', f'backbone_checkpoint={tmp_path / "R-50.pkl"}']
    want = [str(tmp_path / 'R-50.pkl'), 'no such file', 'R-50.pkl']
  proc = cli.run_train('--model', 'maskrcnn', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'),
                       '--set', 'global_batch_size=2',
                       '--set', 'eval_batch_size=2', *args, timeout=300,
                       **ONE_DEVICE)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  for text in want:
    assert text in proc.stderr, (text, proc.stderr)


def _reference_factor(iteration, warmup_steps, warmup_factor, decay_steps,
                      gamma=0.1):
  """maskrcnn-benchmark's WarmupMultiStepLR.get_lr ('linear')."""
  warm = 1.0
  if iteration < warmup_steps:
    alpha = iteration / warmup_steps
    warm = warmup_factor * (1 - alpha) + alpha
  return warm * gamma ** bisect.bisect_right(list(decay_steps), iteration)


def test_learning_rate_is_the_references():
  """The reference steps its scheduler before each update (train loop:
  scheduler.step(); ...; optimizer.step()), so update s runs at the
  scheduler's iteration s + 1, here checked with torch's LambdaLR stepped
  the same way."""
  torch = pytest.importorskip('torch')
  base, warm, factor, steps = 0.02, 10, 1 / 3, (25, 40)
  cfg = load_config('maskrcnn', overrides={
      'base_learning_rate': base, 'warmup_steps': warm,
      'warmup_factor': factor, 'decay_steps': list(steps)})
  w = maskrcnn_lib.MaskRCNN(cfg)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=base, momentum=0.9)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda it: _reference_factor(it, warm, factor, steps))
  for step in range(50):
    sched.step()
    np.testing.assert_allclose(float(w.learning_rate(step)),
                               opt.param_groups[0]['lr'], rtol=1e-6)
    opt.step()
  # The full-size schedule at its milestones.
  full = maskrcnn_lib.MaskRCNN(load_config('maskrcnn'))
  for it in (1, 250, 499, 500, 59999, 60000, 79999, 80000, 90000):
    want = 0.02 * _reference_factor(it, 500, 1 / 3, (60000, 80000))
    np.testing.assert_allclose(float(full.learning_rate(it - 1)), want,
                               rtol=1e-6)


def _tiny_workload(mesh=None, **extra):
  cfg = load_config('maskrcnn', 'smoke', overrides={
      **TINY, 'num_classes': 4, **extra})
  w = maskrcnn_lib.MaskRCNN(cfg)
  if mesh is not None:
    w.check_mesh(mesh)
  w.setup(64)
  return w


def test_parameter_groups_are_the_references():
  """One SGD update from rest: weights get lr * (g + 1e-4 p), biases
  2 lr * g (no decay), frozen parameters nothing."""
  w = _tiny_workload(trainable_backbone_layers=3, warmup_steps=0,
                     clip_grad_norm=None)
  state = w.init_state(jax.random.key_data(jax.random.key(0)))
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, _ = w._tx.update(grads, state.opt_state, state.params)  # pylint: disable=protected-access
  lr = float(w.learning_rate(0))
  assert lr == pytest.approx(0.02)
  frozen = w.model.frozen_mask(state.params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  seen = set()
  for (path, u), f, p in zip(flat, jax.tree.leaves(frozen),
                             jax.tree.leaves(state.params)):
    name = path[-1].key
    if f:
      want, kind = np.zeros_like(p), 'frozen'
    elif name == 'bias':
      want, kind = -2 * lr * np.ones_like(p), 'bias'
    else:
      want, kind = -lr * (1 + 1e-4 * np.asarray(p)), 'weight'
    np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-9)
    seen.add(kind)
  assert seen == {'frozen', 'bias', 'weight'}


def test_data_parallel_gradients_are_the_mean_of_per_device_ones():
  """8 devices (shard_map: each device samples its own anchors and ROIs
  with the run's key folded with its index, one gradient mean) = the mean
  over the images of the same computation on one device."""
  mesh = mesh_lib.make_mesh(None)
  assert mesh.devices.size == 8
  w1, w8 = _tiny_workload(), _tiny_workload(mesh)
  state = w1.init_state(jax.random.key_data(jax.random.key(0)))
  batch = w1.bench_batch(8, seed=0)
  key = jax.random.key(5)
  frozen = w1.model.frozen_mask(state.params)
  grads_fn = jax.jit(lambda s, b, k: w1._trainable_grads(  # pylint: disable=protected-access
      w1.loss_terms, s, b, frozen, jax.random.key_data(k)))
  per_image = [grads_fn(state, {k: v[i:i + 1] for k, v in batch.items()},
                        jax.random.fold_in(key, i)) for i in range(8)]
  want = jax.tree.map(lambda *x: np.mean(np.stack(x), axis=0),
                      *[g for g, _ in per_image])
  want_loss = np.mean([float(o['loss']) for _, o in per_image])
  sharded = {k: jax.device_put(v, NamedSharding(mesh, P('data')))
             for k, v in batch.items()}
  grads, out = jax.jit(lambda s, b: w8._trainable_grads(  # pylint: disable=protected-access
      w8.loss_terms, s, b, frozen, jax.random.key_data(key)))(state, sharded)
  np.testing.assert_allclose(float(out['loss']), want_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert all(np.isfinite(float(out[k])) for k in
             ('objectness', 'rpn_box_reg', 'classifier', 'box_reg', 'mask'))
  assert float(out['mask']) > 0 and float(out['box_reg']) > 0


def test_one_batch_shape_per_bucket():
  w = _tiny_workload()
  assert w.buckets == ((64, 96), (96, 64))
  train = w.batch_specs(4, train=True)
  assert [s['image'].shape for s in train] == [(4, 64, 96, 3),
                                               (4, 96, 64, 3)]
  assert train[0]['mask_crops'].shape == (4, 3, 28, 28)
  evals = w.batch_specs(4, train=False)
  assert [sorted(s) for s in evals] == [['image', 'image_size', 'index',
                                         'mask']] * 2
  grid = _tiny_workload(buckets=32)
  assert len(grid.batch_specs(2, train=True)) == len(grid.buckets) > 2


def test_evaluator_scores_the_ground_truth_as_perfect():
  """The host side of evaluation: boxes scaled back to the original
  images, masks pasted and RLE-encoded, both mAPs by pycocotools. The
  ground truth itself (its boxes and its 28x28 masks over its boxes)
  scores near 1."""
  _, ev = coco.synthetic_coco(2, 12, num_classes=3, image_size=64,
                              min_size=64, max_size=96, mask_resolution=28,
                              num_workers=1)
  try:
    d = 4
    out = {k: [] for k in ('boxes', 'scores', 'labels', 'valid', 'masks',
                           'index', 'mask')}
    for i in range(ev.num_examples):
      t = ev.targets(i)
      n = len(t['boxes'])
      pad = lambda x, n=n: np.concatenate(
          [x, np.zeros((d - n,) + x.shape[1:], x.dtype)])
      out['boxes'].append(pad(t['boxes']))
      out['scores'].append(pad(np.linspace(0.9, 0.5, n, dtype=np.float32)))
      out['labels'].append(pad(t['labels']))
      out['valid'].append(np.arange(d) < n)
      # The crop over the mask box, as probabilities over the box.
      out['masks'].append(pad(t['mask_crops'].astype(np.float32)))
      out['index'].append(i)
      out['mask'].append(True)
    host = {k: np.stack(v) for k, v in out.items()}
    box_results, segm_results = maskrcnn_lib.CocoMaskEvaluator._collect(  # pylint: disable=protected-access
        host, ev)
    from jaxperf import metrics  # pylint: disable=g-import-not-at-top
    box = metrics.coco_box_map(ev.coco_gt, box_results)
    segm = metrics.coco_segm_map(ev.coco_gt, segm_results)
    assert box['mAP'] > 0.95, box
    assert segm['mAP'] > 0.8, segm
    # Worse masks score lower: every mask shifted by a quarter box.
    host['masks'] = np.roll(host['masks'], 7, axis=-1)
    _, shifted = maskrcnn_lib.CocoMaskEvaluator._collect(host, ev)  # pylint: disable=protected-access
    assert metrics.coco_segm_map(ev.coco_gt, shifted)['mAP'] < segm['mAP']
  finally:
    ev.close()


def test_full_size_parameter_count():
  """The workload's model at full size: the reference's 81 classes,
  44,347,573 parameters (torchvision's 91-class model less the 10 classes'
  predictor rows), of which the frozen stem (7x7x3x64) and stage 1 hold
  9,408 + 212,992."""
  w = maskrcnn_lib.MaskRCNN(load_config('maskrcnn'))
  w.setup(16)
  state = jax.eval_shape(w.init_state,
                         jax.random.key_data(jax.random.key(0)))
  assert w.count_params(state.params) == 44_347_573
  frozen = w.model.frozen_mask(state.params)
  assert sum(p.size for p, f in zip(jax.tree.leaves(state.params),
                                    jax.tree.leaves(frozen)) if f) == 9_408 + 212_992


def test_backbone_checkpoint_loads_into_the_full_size_state(tmp_path):
  """backbone_checkpoint=R-50.pkl: Detectron's ImageNet weights replace the
  backbone's kernels and frozen batch norms; the FPN and heads keep their
  initialization."""
  import pickle  # pylint: disable=g-import-not-at-top
  blobs = c2_blobs(np.random.default_rng(1))
  path = tmp_path / 'R-50.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'blobs': blobs}, f, protocol=2)
  w = maskrcnn_lib.MaskRCNN(load_config('maskrcnn', overrides={
      'backbone_checkpoint': str(path)}))
  w.setup(16)
  mesh = mesh_lib.make_mesh(None)
  state = w.init_state(jax.random.key_data(jax.random.key(0)))
  shardings = w.state_sharding(state, mesh)
  loaded = w.load_initial_weights(state, shardings)
  np.testing.assert_array_equal(
      loaded.params['backbone']['conv0']['kernel'],
      blobs['conv1_w'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      loaded.model_state['batch_stats']['backbone']['stage4_unit3']['bn3'][
          'scale'], blobs['res5_2_branch2c_bn_s'])
  np.testing.assert_array_equal(loaded.params['fpn']['inner0']['kernel'],
                                state.params['fpn']['inner0']['kernel'])


def c2_blobs(rng):
  """A Detectron R-50.pkl's blobs (random values, the real names and
  OIHW shapes), with the classifier and momentum blobs it also holds."""
  blobs = {'conv1_w': rng.normal(size=(64, 3, 7, 7)),
           'res_conv1_bn_s': rng.random(64) + 0.5,
           'res_conv1_bn_b': rng.normal(size=64),
           'pred_w': rng.normal(size=(1000, 2048)),
           'pred_b': rng.normal(size=1000),
           'conv1_w_momentum': np.zeros((64, 3, 7, 7))}
  cin = 64
  for k, n in zip(range(2, 6), (3, 4, 6, 3)):
    width = 64 * 2**(k - 2)
    for i in range(n):
      p = f'res{k}_{i}_branch'
      shapes = {'2a': (width, cin if i == 0 else 4 * width, 1, 1),
                '2b': (width, width, 3, 3), '2c': (4 * width, width, 1, 1)}
      if i == 0:
        shapes['1'] = (4 * width, cin, 1, 1)
      for b, shape in shapes.items():
        blobs[f'{p}{b}_w'] = rng.normal(size=shape)
        blobs[f'{p}{b}_bn_s'] = rng.random(shape[0]) + 0.5
        blobs[f'{p}{b}_bn_b'] = rng.normal(size=shape[0])
    cin = 4 * width
  return {k: v.astype(np.float32) for k, v in blobs.items()}

