"""python -m jaxperf.bench: what it measures, its errors, and the chart script."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from jaxperf import bench
from jaxperf import config as config_lib
from jaxperf.workloads.base import new_rng
from jaxperf.workloads.resnet import ResNet50
from tests import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ResNet-50 with one block per stage at width 8 on 32x32 images: seconds.
TINY_SET = {'width': 8, 'stage_sizes': [1, 1, 1, 1]}
TINY = ['--model', 'resnet50', '--config', 'smoke', '--set', 'width=8',
        '--set', 'stage_sizes=[1,1,1,1]', '--steps', '2', '--warmup', '1']


def _bench(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'jaxperf.bench', *args],
                        env=cli.env(), capture_output=True, text=True,
                        timeout=300)


def _bench_json(tmp_path, *args: str) -> dict:
  out = tmp_path / 'bench.json'
  proc = _bench(*TINY, '--json', str(out), *args)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert 'samples/s' in proc.stdout and 'MFU' in proc.stdout, proc.stdout
  with open(out) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def data8(tmp_path_factory):
  """A measured-peak run on --mesh data=8 (the 8 simulated devices)."""
  return _bench_json(tmp_path_factory.mktemp('bench'), '--batch', '8',
                     '--mesh', 'data=8', '--peak-matmul-size', '256')


def _tiny_param_count() -> int:
  cfg = config_lib.load_config('resnet50', 'smoke',
                               {**TINY_SET, 'global_batch_size': 8})
  w = ResNet50(cfg)
  w.setup(int(cfg.synthetic_train_samples))
  abstract = jax.eval_shape(w.init_state, new_rng(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))


def test_run_on_data8_reports_sane_numbers(data8):
  r = data8
  assert (r['model'], r['scale'], r['dtype'], r['precision']) == (
      'resnet50', 'smoke', 'float32', 'f32')
  assert r['config']['width'] == 8 and r['config']['global_batch_size'] == 8
  assert (r['platform'], r['device_count'], r['mesh']) == ('cpu', 8, 'data=8')
  assert r['data_parallel'] == 8 and r['per_device_batch'] == 1
  assert (r['warmup_steps'], r['steps'], len(r['step_times_s'])) == (1, 2, 2)
  assert r['compile_s'] > 0
  times = r['step_times_s']
  assert all(t > 0 for t in times)
  assert min(times) <= r['step_time_p10_s'] <= r['step_time_s']
  assert r['step_time_s'] <= r['step_time_p90_s'] <= max(times)
  assert r['step_time_mean_s'] == pytest.approx(sum(times) / len(times))
  assert r['samples_per_s'] == pytest.approx(8 / r['step_time_s'])
  assert math.isfinite(r['final_loss'])


def test_flops_peak_and_mfu_are_consistent(data8):
  r = data8
  assert r['flops_source'] == 'xla_cost_analysis'
  assert r['flops_per_step'] > 0
  assert r['flops_per_sample'] == pytest.approx(r['flops_per_step'] / 8)
  assert r['achieved_flops_per_s'] == pytest.approx(
      r['flops_per_step'] / r['step_time_s'])
  assert r['peak_source'] == 'measured_matmul'
  assert r['peak_matmul']['n'] == 256 and r['peak_matmul']['devices'] == 8
  assert r['peak_tflops_per_device'] > 0
  assert 0 < r['mfu'] <= 1
  assert r['mfu'] == pytest.approx(
      r['achieved_flops_per_s'] / (r['peak_tflops_per_device'] * 1e12 * 8))


def test_params_memory_and_machine(data8):
  r = data8
  assert r['param_count'] == _tiny_param_count()
  # The CPU backend reports no memory statistics: recorded as null.
  assert r['peak_memory_bytes_per_device'] is None or (
      r['peak_memory_bytes_per_device'] > 0)
  assert r['compiled_memory_bytes']['argument_bytes'] > 0
  m = r['machine']
  assert m['cpu_cores'] == os.cpu_count() and m['memory_bytes'] > 0
  assert m['jax'] == jax.__version__ and m['flax'] and m['jaxlib']
  assert m['gpu'] is None
  assert r['timestamp_utc'].endswith('Z')


def test_given_peak_and_a_mesh_with_a_model_axis(tmp_path):
  r = _bench_json(tmp_path, '--batch', '4', '--mesh', 'data=2,tensor=4',
                  '--peak-tflops', '0.5')
  assert r['mesh'] == 'data=2,tensor=4' and r['data_parallel'] == 2
  assert r['per_device_batch'] == 2 and r['global_batch'] == 4
  assert r['peak_source'] == 'given' and r['peak_matmul'] is None
  assert r['peak_tflops_per_device'] == 0.5
  assert r['mfu'] == pytest.approx(r['achieved_flops_per_s'] / (0.5e12 * 8))


@pytest.mark.parametrize('args, expect', [
    (['--model', 'resnet99'], "--model 'resnet99': unknown workload"),
    ([*TINY, '--batch', '12'],
     'global_batch_size=12 does not divide evenly over the 8 data-parallel'),
    ([*TINY, '--batch', '8', '--mesh', 'data=3'],
     'the product must equal the device count'),
    ([*TINY, '--set', 'widht=8'], "unknown config key 'widht'"),
    ([*TINY, '--steps', '0'], '--steps 0: must be at least 1'),
])
def test_bad_input_is_one_error_line(args, expect):
  proc = _bench(*args)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'error: ' in proc.stderr and expect in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr[-4000:]


def test_default_config_on_cpu_is_full_size_at_batch_16_in_f32():
  parse = bench._parser().parse_args
  _, cfg = bench.resolve_config(parse(['--model', 'resnet50']), 'cpu', 8)
  assert (cfg.scale, cfg.global_batch_size, cfg.dtype) == ('base', 16, 'float32')
  assert (cfg.width, cfg.image_size) == (64, 224)
  _, cfg = bench.resolve_config(
      parse(['--model', 'resnet', '--config', 'smoke', '--precision', 'bf16',
             '--image-size', '64', '--set', 'global_batch_size=32']), 'cpu', 8)
  assert (cfg.scale, cfg.global_batch_size, cfg.dtype, cfg.image_size) == (
      'smoke', 32, 'bfloat16', 64)
  _, cfg = bench.resolve_config(parse(['--model', 'resnet50']), 'gpu', 8)
  assert (cfg.scale, cfg.global_batch_size, cfg.dtype) == ('8gpu', 1632,
                                                           'bfloat16')
  _, cfg = bench.resolve_config(parse(['--model', 'resnet50', '--batch', '64']),
                                'gpu', 2)
  assert (cfg.scale, cfg.global_batch_size) == ('1gpu', 64)


def test_dlrm_reports_embedding_traffic(tmp_path):
  """DLRM on 8 devices, whole tables per device with hot rows: the
  parameter count leaves out the stack's padding and the hot copies, and
  the embedding traffic per sample is reported."""
  out = tmp_path / 'dlrm.json'
  proc = _bench('--model', 'dlrm', '--config', 'smoke', '--steps', '2',
                '--warmup', '1', '--peak-tflops', '0.02', '--set',
                'embedding_layout=table', '--set', 'hot_rows=300', '--json',
                str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert 'embedding traffic' in proc.stdout
  with open(out) as f:
    r = json.load(f)
  cfg = config_lib.load_config('dlrm', 'smoke')
  from jaxperf.models import dlrm
  sizes = [min(n, cfg.max_ind_range) for n in dlrm.CRITEO_1TB_TABLE_SIZES]
  mlp = dlrm.mlp_param_count(dlrm.DLRMConfig(
      table_sizes=tuple(sizes), embed_dim=16, bottom_mlp=(64, 32, 16),
      top_mlp=(64, 64, 32, 16, 1)))
  assert r['param_count'] == sum(sizes) * 16 + mlp
  info = r['workload_info']
  assert info['embedding_layout'] == 'table' and info['hot_rows'] == 300
  # 16 floats per row: 26 rows read, 26 read and written per sample.
  assert info['embedding_bytes_rows_read'] == 26 * 64
  assert info['embedding_bytes_rows_updated'] == 2 * 26 * 64
  # The all-to-all's K slots: at most ceil(T/8) = 4 exchanged tables per
  # device; the hot rows' gradient: 2 * 7/8 of [300, 16] per device a step.
  assert 0 < info['embedding_bytes_exchanged'] <= 2 * 7 * 4 * 64
  assert info['embedding_bytes_hot_allreduce'] == pytest.approx(
      2 * 7 * 300 * 64 / 1024)


def test_retinanet_at_a_given_side_on_8_devices(tmp_path):
  """--image-size S sets RetinaNet's (height, width) to (S, S); the batch of
  boxes is valid and the step runs data parallel on 8 devices."""
  out = tmp_path / 'retinanet.json'
  proc = _bench('--model', 'retinanet', '--config', 'smoke', '--image-size',
                '64', '--batch', '8', '--steps', '1', '--warmup', '0',
                '--peak-tflops', '0.02', '--json', str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with open(out) as f:
    r = json.load(f)
  assert r['model'] == 'retinanet' and r['config']['image_size'] == [64, 64]
  assert r['mesh'] == 'data=8' and r['step_time_s'] > 0
  assert 0 < r['final_loss'] < 10


def test_maskrcnn_at_a_given_side_on_8_devices(tmp_path):
  """--image-size S gives Mask R-CNN one S x S bucket; the batch of boxes
  and masks is valid and the step runs data parallel on 8 devices."""
  out = tmp_path / 'maskrcnn.json'
  proc = _bench('--model', 'maskrcnn', '--config', 'smoke', '--image-size',
                '64', '--batch', '8', '--steps', '1', '--warmup', '0',
                '--peak-tflops', '0.02', '--json', str(out))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with open(out) as f:
    r = json.load(f)
  assert r['model'] == 'maskrcnn' and r['config']['buckets'] == [[64, 64]]
  assert r['mesh'] == 'data=8' and r['step_time_s'] > 0
  # Untrained, on random images: large but finite (the mask logits start
  # far from 0 without a pretrained backbone).
  assert 0 < r['final_loss'] < float('inf')


def test_step_stats():
  s = bench.step_stats([4.0, 1.0, 3.0, 2.0, 5.0])
  assert (s['median'], s['mean'], s['min'], s['max']) == (3.0, 3.0, 1.0, 5.0)
  assert s['p10'] == pytest.approx(1.4) and s['p90'] == pytest.approx(4.6)


def test_committed_results_are_complete():
  for path in glob.glob(os.path.join(ROOT, 'benchmarks', 'results', '*.json')):
    with open(path) as f:
      r = json.load(f)
    if r.get('flops_source') != 'xla_cost_analysis':
      continue  # not a bench file
    # Full-size ResNet-50 and BERT-large; the 3D U-Net files are its smoke width.
    # DLRM's files: every layer at full width, tables capped at 100k rows.
    # RetinaNet's and Mask R-CNN's: full size (small images on CPU); RNN-T's
    # full size on 4-second utterances; MiniGo's the 19x19 network.
    want = {'resnet50': 25_557_032, 'unet3d': 1_951_163, 'bert': 336_226_108,
            'dlrm': 120_278_017, 'retinanet': 37_060_652,
            'maskrcnn': 44_347_573, 'rnnt': 49_006_080, 'minigo': 736_671}
    assert r['param_count'] == want[r['model']], path
    assert r['step_time_s'] > 0 and r['flops_per_step'] > 0, path
    assert 0 < r['mfu'] <= 1, path


# ---------------------------------------------------------------- plot.py
PLOT = os.path.join(ROOT, 'benchmarks', 'plot.py')


def _plot_module():
  spec = importlib.util.spec_from_file_location('bench_plot', PLOT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write_results(d) -> None:
  (d / 'bench.json').write_text(json.dumps(
      {'model': 'resnet50', 'step_time_s': 1.8, 'mfu': 0.43,
       'flops_source': 'xla_cost_analysis'}))
  (d / 'compare.json').write_text(json.dumps(
      {'model': 'resnet50', 'jax': {'step_time_s': 1.5, 'mfu': 0.4},
       'torch': {'step_time_s': 2.1}}))
  (d / 'other.json').write_text(json.dumps({'model': 'resnet50'}))
  (d / 'broken.json').write_text('{')


def test_plot_reads_bench_and_compare_files(tmp_path):
  _write_results(tmp_path)
  rows, skipped = _plot_module().load_results(str(tmp_path))
  assert sorted(skipped) == ['broken.json', 'other.json']
  by = {r['label']: r for r in rows}
  assert by['bench']['jax_step_s'] == 1.8 and by['bench']['torch_step_s'] is None
  assert by['bench']['mfu'] == 0.43
  assert by['compare']['jax_step_s'] == 1.5
  assert by['compare']['torch_step_s'] == 2.1


def test_plot_without_matplotlib_says_how_to_install(tmp_path):
  if importlib.util.find_spec('matplotlib') is not None:
    pytest.skip('matplotlib is installed; the rendering test covers plot.py')
  proc = subprocess.run([sys.executable, PLOT, '--results', str(tmp_path)],
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2
  assert 'pip install matplotlib' in proc.stderr


def test_plot_renders_png(tmp_path):
  pytest.importorskip(
      'matplotlib', reason='matplotlib is an optional dependency of '
      'benchmarks/plot.py and is not installed')
  _write_results(tmp_path)
  out = tmp_path / 'chart.png'
  proc = subprocess.run([sys.executable, PLOT, '--results', str(tmp_path),
                         '--out', str(out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert 'skipped other.json' in proc.stdout
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
