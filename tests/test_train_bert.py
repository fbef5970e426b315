"""End-to-end BERT runs of `python -m jaxperf.train`: the synthetic smoke run
to target, the reference TFRecord format under a closed-division log, and
bad input (records, files, starting checkpoints)."""

from __future__ import annotations

import json

import numpy as np

from jaxperf.data import bert as bert_data
from jaxperf.data import tfrecord
from tests import cli
from tests.test_train_cli import check_log, checker_errors

ONE_DEVICE = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
SEQ, PRED, VOCAB = 64, 10, 256   # the smoke scale's shapes


def _log_lines(path):
  with open(path) as f:
    return [json.loads(l.split(':::MLLOG ', 1)[1]) for l in f
            if ':::MLLOG' in l]


def _write_dataset(root, n_train=64, n_eval=32, seed=0):
  """Tiny MLPerf-format TFRecords: two training shards and the eval file."""
  root.mkdir(parents=True, exist_ok=True)
  src = bert_data.SyntheticBert(n_train + n_eval, seq_len=SEQ,
                                max_predictions=PRED, vocab_size=VOCAB,
                                seed=seed, prefetch=0)
  examples = src.examples(np.arange(n_train + n_eval))
  half = n_train // 2
  bert_data.write_examples(root / 'part-00000-of-00002', examples[:half])
  bert_data.write_examples(root / 'part-00001-of-00002',
                           examples[half:n_train])
  bert_data.write_examples(root / 'eval_10k', examples[n_train:])
  return examples


def test_default_smoke_run_reaches_target_and_passes_checker(tmp_path):
  """What a new user runs: nothing but --model (and a workdir)."""
  workdir = tmp_path / 'run'
  proc = cli.run_train('--model', 'bert', '--workdir', str(workdir),
                       timeout=900, **ONE_DEVICE)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' in proc.stdout and 'run_stop: success' in proc.stdout
  assert 'step 50/1500 | 1,600 samples | loss' in proc.stdout
  evals = [r for r in cli.read_metrics(workdir) if r['kind'] == 'eval']
  assert evals[-1]['masked_lm_accuracy'] >= 0.72
  assert evals[-1]['eval_examples'] == 1024
  assert all(r['epoch'] % 6400 == 0 for r in evals)   # samples, every 6400
  log = str(workdir / 'mlperf_log.txt')
  values = {l['key']: l['value'] for l in _log_lines(log)}
  assert values['opt_lamb_epsilon'] == values['opt_epsilon'] == 1e-6
  assert values['opt_learning_rate_training_steps'] == 1500
  checked = check_log(log, tmp_path)
  assert checked.returncode == 0, checked.stdout + checked.stderr


def test_reference_format_closed_log_fails_only_on_accuracy(tmp_path):
  """The reference's TFRecords at tiny size and a 24-layer model of small
  width: the closed log has every key and tensor name the checker wants
  and misses only the target."""
  data = tmp_path / 'wiki'
  _write_dataset(data)
  workdir = tmp_path / 'closed'
  proc = cli.run_train(
      '--model', 'bert', '--data-dir', str(data), '--workdir', str(workdir),
      '--set', 'division=closed', '--set', 'seed=3', '--set', 'num_layers=24',
      '--set', 'hidden_size=32', '--set', 'intermediate_size=64',
      '--set', 'global_batch_size=8', '--set', 'max_steps=4',
      '--set', 'eval_interval_samples=16', '--set', 'eval_batch_size=16',
      '--set', 'steps_per_dispatch=2', timeout=900, **ONE_DEVICE)
  assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'SYNTHETIC' not in proc.stdout and 'run_stop: aborted' in proc.stdout
  log = str(workdir / 'mlperf_log.txt')
  lines = _log_lines(log)
  values = {l['key']: l['value'] for l in lines}
  assert values['train_samples'] == 64 and values['eval_samples'] == 32
  assert values['global_batch_size'] == 8
  tensors = [l['metadata']['tensor'] for l in lines
             if l['key'] == 'weights_initialization']
  assert len(tensors) == 398 and 'cls/seq_relationship/output_bias' in tensors
  evals = [l for l in lines if l['key'] == 'eval_accuracy']
  assert [e['metadata']['epoch_num'] for e in evals] == [16, 32]
  checked = check_log(log, tmp_path)
  errors = checker_errors(checked)
  assert checked.returncode != 0
  assert errors and all('eval_accuracy' in e for e in errors), errors


def _bad_run(tmp_path, data, *extra):
  return cli.run_train('--model', 'bert', '--data-dir', str(data),
                       '--workdir', str(tmp_path / 'run'),
                       '--set', 'max_steps=4', '--set', 'global_batch_size=8',
                       '--set', 'eval_interval_samples=16', *extra,
                       timeout=600, **ONE_DEVICE)


def test_wrong_feature_name_in_a_record(tmp_path):
  data = tmp_path / 'wiki'
  examples = _write_dataset(data, n_train=16, n_eval=8)
  bad = [dict(e) for e in examples[:8]]
  bad[5]['input_id'] = bad[5].pop('input_ids')
  path = data / 'part-00001-of-00002'
  tfrecord.write_records(path, [bert_data.encode_example(e) for e in bad])
  proc = _bad_run(tmp_path, data)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert str(path) in proc.stderr and 'input_ids' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_truncated_tfrecord(tmp_path):
  data = tmp_path / 'wiki'
  _write_dataset(data, n_train=16, n_eval=8)
  path = data / 'part-00000-of-00002'
  size = path.stat().st_size
  with open(path, 'r+b') as f:
    f.truncate(size - 100)
  proc = _bad_run(tmp_path, data)
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert str(path) in proc.stderr and 'truncated' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_checkpoint_with_missing_or_misshapen_tensor(tmp_path):
  import torch
  from jaxperf import interop
  from jaxperf.models import bert
  import flax.linen as nn
  import jax
  cfg = bert.BertConfig(vocab_size=VOCAB, hidden_size=128, num_layers=2,
                        num_heads=2, intermediate_size=512, max_position=64)
  z = lambda n: np.zeros((1, n), np.int32)
  variables = nn.unbox(bert.BertForPreTraining(cfg).init(
      jax.random.key(0), z(SEQ), z(SEQ), z(SEQ), z(SEQ), z(PRED), z(1)))
  sd = interop.to_torch('bert', variables)
  for name, change in (
      ('bert.encoder.layer.1.output.dense.bias', None),
      ('bert.pooler.dense.weight', torch.zeros(128, 64))):
    bad = dict(sd)
    if change is None:
      del bad[name]
    else:
      bad[name] = change
    path = tmp_path / f'ckpt-{len(bad)}.pt'
    torch.save(bad, path)
    proc = cli.run_train('--model', 'bert', '--workdir',
                         str(tmp_path / f'run{len(bad)}'), '--set',
                         f'init_checkpoint={path}', '--set', 'max_steps=2',
                         timeout=600, **ONE_DEVICE)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert name in proc.stderr and 'Traceback' not in proc.stderr


def test_sharded_run_resumes_on_another_mesh(tmp_path):
  """Tensor-parallel training checkpoints; the run resumes fully sharded."""
  workdir = tmp_path / 'run'
  common = ['--model', 'bert', '--workdir', str(workdir), '--set',
            'eval_interval_samples=640', '--set', 'checkpoint_every_steps=20',
            '--set', 'seed=4']
  eight = {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  proc = cli.run_train(*common, '--mesh', 'data=4,tensor=2', '--set',
                       'max_steps=40', timeout=600, **eight)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  proc = cli.run_train(*common, '--mesh', 'fsdp=8', '--set', 'max_steps=60',
                       timeout=600, **eight)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert 'resumed from' in proc.stdout and '(step 40, 1,280 samples)' \
      in proc.stdout
  steps = [r['step'] for r in cli.read_metrics(workdir) if r['kind'] == 'train']
  assert steps == list(range(1, 61))
