"""BERT-large: parameter count, logical axes, and sharded steps on 8 devices.

The same tiny BERT step (loss, gradients, and the LAMB update) runs on one
device and under data=8, fsdp=8 and data=2,tensor=4; all must agree to f32
tolerance, and the parameters must really be split the way the mesh says.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf import config as config_lib
from jaxperf import optim
from jaxperf.errors import ConfigError
from jaxperf.models import bert
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads.bert import Bert, mlperf_eval_interval

TINY = {'vocab_size': 128, 'hidden_size': 32, 'num_layers': 2, 'num_heads': 4,
        'intermediate_size': 64, 'max_position': 16, 'max_seq_length': 16,
        'max_predictions_per_seq': 4, 'packed': True,
        'max_sequences_per_row': 2, 'global_batch_size': 8,
        'hidden_dropout': 0.0, 'attention_dropout': 0.0, 'dtype': 'float32',
        'base_learning_rate': 0.01, 'warmup_steps': 0, 'max_steps': 10,
        'weight_decay': 0.01}


def _inputs(cfg, b, s, p, k):
  z = lambda n: jnp.zeros((b, n), jnp.int32)
  return (z(s), z(s), z(s), z(s), z(p), z(k))


def test_large_parameter_count_matches_hf():
  model = bert.BertForPreTraining(bert.LARGE)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          *_inputs(bert.LARGE, 1, 512, 76, 1))
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  # HF transformers' BertForPreTraining(BertConfig()) counts 336,226,108
  # (decoder weight tied to the word embeddings, counted once).
  assert n == 336_226_108
  assert bert.param_count(bert.LARGE) == n


def test_every_parameter_has_logical_names():
  model = bert.BertForPreTraining(bert.BertConfig(
      vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
      intermediate_size=32, max_position=8))
  boxed = jax.eval_shape(model.init, jax.random.key(0),
                         *_inputs(None, 1, 8, 2, 1))['params']
  leaves = jax.tree.leaves(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape)


def test_init_statistics_match_reference():
  cfg = bert.BertConfig(vocab_size=512, hidden_size=256, num_layers=1,
                        num_heads=4, intermediate_size=512, max_position=64)
  params = nn.unbox(bert.BertForPreTraining(cfg).init(
      jax.random.key(1), *_inputs(cfg, 1, 8, 2, 1)))['params']
  emb = np.asarray(params['bert']['embeddings']['word_embeddings']['embedding'])
  # Truncated normal, stddev 0.02 before truncation at 2 sigma.
  assert np.abs(emb).max() <= 0.04 + 1e-6
  assert 0.85 * 0.02 < emb.std() < 0.02
  layer = params['bert']['encoder_layer_0']
  assert not np.any(np.asarray(layer['intermediate']['bias']))
  assert np.all(np.asarray(layer['output_layer_norm']['scale']) == 1)


def test_packed_rows_isolate_sequences():
  """A sequence's outputs do not depend on what else shares its row."""
  cfg = bert.BertConfig(vocab_size=50, hidden_size=16, num_layers=2,
                        num_heads=2, intermediate_size=32, max_position=16)
  model = bert.BertForPreTraining(cfg)
  rng = np.random.default_rng(0)
  a = rng.integers(1, 50, 6)
  b1, b2 = rng.integers(1, 50, 5), rng.integers(1, 50, 7)

  def row(first, second):
    ids = np.zeros(16, np.int32)
    seq = np.zeros(16, np.int32)
    pos = np.zeros(16, np.int32)
    ids[:6], seq[:6], pos[:6] = a, 1, np.arange(6)
    n = len(second)
    ids[6:6 + n], seq[6:6 + n], pos[6:6 + n] = second, 2, np.arange(n)
    return ids, seq, pos

  params = model.init(jax.random.key(0), *_inputs(cfg, 1, 16, 3, 2))
  outs = []
  for second in (b1, b2):
    ids, seq, pos = row(a, second)
    mlm, nsp = model.apply(params, ids[None], np.zeros((1, 16), np.int32),
                           seq[None], pos[None],
                           np.array([[0, 2, 5]], np.int32),
                           np.array([[0, 6]], np.int32))
    outs.append((np.asarray(mlm), np.asarray(nsp)))
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outs[0][1][:, 0], outs[1][1][:, 0], rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(outs[0][1][:, 1], outs[1][1][:, 1])


def _batch(w, b, seed=0):
  rng = np.random.default_rng(seed)
  s, p = w.seq_len, w.max_predictions
  ids = rng.integers(1, w.model_cfg.vocab_size, (b, s)).astype(np.int32)
  seq = np.zeros((b, s), np.int32)
  pos = np.zeros((b, s), np.int32)
  seg = np.zeros((b, s), np.int32)
  nsp_pos = np.zeros((b, 2), np.int32)
  nsp_w = np.zeros((b, 2), np.float32)
  for i in range(b):
    n1 = rng.integers(3, s // 2)
    n2 = rng.integers(0, s - n1)
    seq[i, :n1], pos[i, :n1] = 1, np.arange(n1)
    seg[i, n1 // 2:n1] = 1
    nsp_w[i, 0] = 1
    if n2 >= 2:
      seq[i, n1:n1 + n2], pos[i, n1:n1 + n2] = 2, np.arange(n2)
      nsp_pos[i, 1], nsp_w[i, 1] = n1, 1
  ids = np.where(seq > 0, ids, 0)
  mpos = rng.integers(0, s // 2, (b, p)).astype(np.int32)
  return {'input_ids': ids, 'segment_ids': seg, 'sequence_ids': seq,
          'position_ids': pos, 'masked_lm_positions': mpos,
          'masked_lm_ids': rng.integers(0, w.model_cfg.vocab_size,
                                        (b, p)).astype(np.int32),
          'masked_lm_weights': (rng.random((b, p)) < 0.8).astype(np.float32),
          'next_sentence_positions': nsp_pos,
          'next_sentence_labels': rng.integers(0, 2, (b, 2)).astype(np.int32),
          'next_sentence_weights': nsp_w}


def _step(mesh_spec):
  """(loss, grads, params after one LAMB step, state shardings) on a mesh."""
  cfg = config_lib.load_config('bert', 'smoke', dict(TINY))
  w = Bert(cfg)
  devices = jax.devices()[:1] if mesh_spec is None else jax.devices()
  mesh = mesh_lib.make_mesh(mesh_spec, devices)
  w.check_mesh(mesh)
  w.setup(1000)
  rng = jax.random.key_data(jax.random.key(0))
  abstract = jax.eval_shape(w.init_state, rng)
  state_sh = w.state_sharding(abstract, mesh)
  state = jax.jit(w.init_state, out_shardings=state_sh)(rng)
  part = w.batch_partition(mesh, train=True)
  batch = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, part[k]))
           for k, v in _batch(w, 8).items()}

  def loss_and_grads(params, batch):
    return jax.value_and_grad(lambda p: w.losses(p, batch, train=True)[0])(
        params)

  loss, grads = jax.jit(loss_and_grads, out_shardings=(
      mesh_lib.replicated(mesh), state_sh.params))(state.params, batch)
  new_state, _ = jax.jit(w.train_step, out_shardings=(
      state_sh, mesh_lib.replicated(mesh)))(state, batch)
  return (float(loss), jax.device_get(grads), jax.device_get(new_state.params),
          state_sh)


@pytest.fixture(scope='module')
def single():
  return _step(None)


def _max_rel(a, b):
  """Worst error relative to the tensor's largest entry; the floor keeps
  gradients that are exactly zero in theory (the attention key bias: softmax
  ignores a constant shift) from turning rounding noise into large ratios."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / max(np.abs(b).max(), 1e-7)


@pytest.mark.parametrize('mesh_spec', ['data=8', 'fsdp=8', 'data=2,tensor=4'])
def test_sharded_step_equals_single_device(single, mesh_spec):
  loss1, grads1, params1, _ = single
  loss, grads, params, sh = _step(mesh_spec)
  assert abs(loss - loss1) <= 1e-6 * abs(loss1)
  worst = max(jax.tree.leaves(jax.tree.map(_max_rel, grads, grads1)))
  assert worst < 1e-5, worst
  # After the LAMB step: agreement to 1e-3 of the learning rate (0.01), the
  # scale of an update; Adam's normalisation amplifies relative gradient
  # differences where |g| is near epsilon, so relative errors mean little.
  worst = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(), params,
      params1)))
  assert worst < 1e-5, worst

  # The parameters are split as the mesh asks.
  inter = sh.params['bert']['encoder_layer_0']['intermediate']['kernel'].spec
  query = sh.params['bert']['encoder_layer_0']['attention']['query'][
      'kernel'].spec
  word = sh.params['bert']['embeddings']['word_embeddings']['embedding'].spec
  if mesh_spec == 'data=8':
    assert all(s is None for s in tuple(inter) + tuple(query))
  elif mesh_spec == 'fsdp=8':
    assert tuple(inter)[0] == 'fsdp' and tuple(query)[0] == 'fsdp'
    assert tuple(word) == (None, 'fsdp')
  else:
    assert tuple(inter) == (None, 'tensor')
    assert tuple(query) == (None, 'tensor', None)
    assert tuple(word) == ('tensor', None)


def test_tensor_axis_must_divide_heads():
  cfg = config_lib.load_config('bert', 'smoke', dict(TINY, num_heads=2))
  w = Bert(cfg)
  with pytest.raises(ConfigError, match='tensor=4 does not divide num_heads=2'):
    w.check_mesh(mesh_lib.make_mesh('data=2,tensor=4'))


def test_lamb_matches_reference_update():
  """One LAMB step by hand, as the reference's LAMBOptimizer computes it."""
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
                      'bias': rng.normal(size=3).astype(np.float32)},
            'layer_norm': {'scale': np.ones(3, np.float32)}}
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                       params)
  lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-6, 0.01
  tx = optim.lamb(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd,
                  decay_mask=optim.bert_decay_mask, clip_norm=1.0)
  state = tx.init(params)
  new = params
  for _ in range(2):
    updates, state = tx.update(grads, state, new)
    new = jax.tree.map(lambda p, u: p + u, new, updates)
  # By hand, two steps with the same gradient.
  gnorm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2)
                      for g in jax.tree.leaves(grads)))
  clip = min(1.0, 1.0 / gnorm)
  want = {}
  for path, p in [(('dense', 'kernel'), params['dense']['kernel']),
                  (('dense', 'bias'), params['dense']['bias']),
                  (('layer_norm', 'scale'), params['layer_norm']['scale'])]:
    g = grads[path[0]][path[1]].astype(np.float64) * clip
    m = v = 0
    w = p.astype(np.float64)
    for t in (1, 2):
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
      if path[1] == 'kernel':   # decayed and trust-ratio scaled
        u = u + wd * w
        r = np.linalg.norm(w) / np.linalg.norm(u)
      else:                     # bias, layer norm: excluded
        r = 1.0
      w = w - r * lr * u
    want[path] = w
  got = {('dense', 'kernel'): new['dense']['kernel'],
         ('dense', 'bias'): new['dense']['bias'],
         ('layer_norm', 'scale'): new['layer_norm']['scale']}
  # rtol: 1 - beta2 in float32 is 1.3e-5 off 0.001 (0.999 is not exact).
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_lr_schedule_and_eval_interval():
  s = optim.bert_lr_schedule(1.0, warmup_steps=10, total_steps=100)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(0.9)
  assert float(s(100)) == 0.0 and float(s(150)) == 0.0
  s = optim.bert_lr_schedule(1.0, warmup_steps=10, total_steps=100,
                             start_warmup_step=-5)
  assert float(s(0)) == pytest.approx(0.5)
  assert float(s(5)) == pytest.approx(0.95)
  # The rules' examples: batch -> samples between evaluations.
  for gbs, every in [(256, 150_000), (1536, 150_000), (2048, 150_000),
                     (3072, 175_000), (4096, 175_000), (8192, 225_000)]:
    assert mlperf_eval_interval(gbs) == every


def test_packed_batch_gives_the_unpacked_per_sequence_losses():
  """The same sequences, packed three to a row or one per row: every
  sequence's masked-LM and NSP losses agree."""
  from jaxperf.data import bert as bert_data
  from jaxperf.tools import pack_bert
  from jaxperf.workloads.bert import pretraining_losses

  src = bert_data.SyntheticBert(12, seq_len=32, max_predictions=5,
                                vocab_size=160, seed=3, full_fraction=0.0,
                                min_length=6, prefetch=0)
  unpacked = src.rows(np.arange(12))
  rows, groups = pack_bert.pack_examples(unpacked, max_per_row=3,
                                         return_groups=True)
  packed = bert_data.to_batch(rows)
  assert len(rows) < 12 and (groups >= 0).sum() == 12

  cfg = bert.BertConfig(vocab_size=160, hidden_size=32, num_layers=2,
                        num_heads=4, intermediate_size=64, max_position=32)
  model = bert.BertForPreTraining(cfg)
  params = model.init(jax.random.key(0), *_inputs(cfg, 1, 32, 5, 1))

  def run(b):
    mlm, nsp = model.apply(params, b['input_ids'], b['segment_ids'],
                           b['sequence_ids'], b['position_ids'],
                           b['masked_lm_positions'],
                           b['next_sentence_positions'])
    out = pretraining_losses(mlm, nsp, b)
    return np.asarray(out['mlm_nll']), np.asarray(out['nsp_nll'])

  u_mlm, u_nsp = run(unpacked)
  p_mlm, p_nsp = run(packed)
  for r in range(groups.shape[0]):
    seq_of_pred = np.take_along_axis(packed['sequence_ids'][r],
                                     packed['masked_lm_positions'][r], 0)
    for j, i in enumerate(groups[r]):
      if i < 0:
        continue
      w_u = unpacked['masked_lm_weights'][i] > 0
      w_p = (packed['masked_lm_weights'][r] > 0) & (seq_of_pred == j + 1)
      assert w_u.sum() == w_p.sum() > 0
      np.testing.assert_allclose(np.sort(p_mlm[r][w_p]),
                                 np.sort(u_mlm[i][w_u]), rtol=2e-5, atol=2e-6)
      np.testing.assert_allclose(p_nsp[r, j], u_nsp[i, 0], rtol=2e-5,
                                 atol=2e-6)


def test_gradient_accumulation_averages_micro_batches():
  """n micro-batches: loss and update from the mean of their losses and
  gradients; micro-batch i holds rows i, i + n, ... (so each device keeps
  its own rows), here on a data=2,tensor=4 mesh."""
  cfg = config_lib.load_config('bert', 'smoke', dict(
      TINY, gradient_accumulation_steps=2))
  w = Bert(cfg)
  mesh = mesh_lib.make_mesh('data=2,tensor=4')
  w.check_mesh(mesh)
  w.setup(1000)
  rng = jax.random.key_data(jax.random.key(0))
  state = w.init_state(rng)
  batch = _batch(w, 8, seed=1)
  batch['masked_lm_weights'][:, 0] = 1.0
  batch['masked_lm_weights'][1::2, 1:] = 0.0   # micro-batches weigh unlike
  _, metrics = jax.jit(w.train_step)(state, batch)
  halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
  want = np.mean([float(w.losses(state.params, h, train=True)[0])
                  for h in halves])
  assert float(metrics['loss']) == pytest.approx(want, rel=1e-5)
  whole = float(w.losses(state.params, batch, train=True)[0])
  assert abs(whole - want) > 2e-4 * want   # the split matters

  cfg = config_lib.load_config('bert', 'smoke', dict(
      TINY, gradient_accumulation_steps=4))
  with pytest.raises(ConfigError, match='micro-batch of 2'):
    Bert(cfg).check_mesh(mesh_lib.make_mesh('data=8'))
  with pytest.raises(ConfigError, match='gradient_accumulation_steps=3'):
    Bert(config_lib.load_config('bert', 'smoke', dict(
        TINY, gradient_accumulation_steps=3)))


@pytest.mark.parametrize('kind', ['tf1', 'torch'])
def test_init_checkpoint_loads_into_the_sharded_state(tmp_path, kind):
  """init_checkpoint: the TF1 fixture (written by TensorFlow) or a PyTorch
  state_dict lands in the parameters, sharded as the mesh says; the LAMB
  moments stay zero."""
  import os
  from jaxperf import interop
  prefix = os.path.join(os.path.dirname(__file__), 'data', 'bert_tf1',
                        'model.ckpt-7')
  want = interop.from_tf_checkpoint('bert', prefix, num_heads=2)['params']
  path = prefix
  if kind == 'torch':
    import torch
    path = str(tmp_path / 'phase1.pt')
    torch.save(interop.to_torch('bert', {'params': want}), path)
  cfg = config_lib.load_config('bert', 'smoke', {
      'vocab_size': 16, 'hidden_size': 4, 'num_layers': 2, 'num_heads': 2,
      'intermediate_size': 8, 'max_position': 8, 'max_seq_length': 8,
      'max_predictions_per_seq': 2, 'global_batch_size': 8,
      'init_checkpoint': path})
  w = Bert(cfg)
  mesh = mesh_lib.make_mesh('data=2,tensor=2,fsdp=2')
  w.check_mesh(mesh)
  w.setup(100)
  rng = jax.random.key_data(jax.random.key(0))
  sh = w.state_sharding(jax.eval_shape(w.init_state, rng), mesh)
  state = jax.jit(w.init_state, out_shardings=sh)(rng)
  state = w.load_initial_weights(state, sh)
  got = jax.device_get(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)
  kernel = state.params['bert']['encoder_layer_0']['intermediate']['kernel']
  assert kernel.sharding == sh.params['bert']['encoder_layer_0'][
      'intermediate']['kernel']
  assert not any(np.any(np.asarray(x))
                 for x in jax.tree.leaves(state.opt_state)
                 if np.ndim(x) > 0)

  bad = config_lib.load_config('bert', 'smoke', dict(
      cfg.to_dict(), init_checkpoint=str(tmp_path / 'nothing')))
  with pytest.raises(ConfigError, match='expected a TF checkpoint prefix'):
    Bert(bad).load_initial_weights(state, sh)


def test_config_overrides_logical_axis_rules():
  cfg = config_lib.load_config('bert', 'smoke', dict(
      TINY, logical_axis_rules={'mlp': None, 'embed': ['fsdp', 'tensor']}))
  w = Bert(cfg)
  assert w.rules['mlp'] == () and w.rules['embed'] == ('fsdp', 'tensor')
  mesh = mesh_lib.make_mesh('fsdp=4,tensor=2')
  w.check_mesh(mesh)
  w.setup(100)
  sh = w.state_sharding(jax.eval_shape(
      w.init_state, jax.random.key_data(jax.random.key(0))), mesh)
  inter = sh.params['bert']['encoder_layer_0']['intermediate']['kernel'].spec
  assert tuple(inter) == (('fsdp', 'tensor'), None)
  for bad, msg in (({'mlpp': None}, "unknown logical axis 'mlpp'"),
                   ({'mlp': 'model'}, 'unknown mesh axes')):
    with pytest.raises(ConfigError, match=msg):
      Bert(config_lib.load_config('bert', 'smoke',
                                  dict(TINY, logical_axis_rules=bad)))
