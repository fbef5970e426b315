"""jaxperf.losses.rnnt_loss: against brute-force enumeration of the
alignments of tiny lattices, against torchaudio.functional.rnnt_loss on
random lattices of several shapes and length mixes (losses and gradients),
at extreme logits, and in memory (no [B, T, U + 1, V] array besides the
logits and their gradient)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf import losses


def _brute_force(logits, labels, t_len, u_len, blank=0):
  """-log of the summed probability of every alignment of labels[:u_len]
  to t_len frames: each path takes T - 1 blank steps and U label steps in
  some order through the lattice, then the final blank at (T - 1, U)."""
  lp = jax.nn.log_softmax(logits, axis=-1)
  paths = []
  for where in itertools.combinations(range(t_len - 1 + u_len), u_len):
    t = u = 0
    terms = []
    for k in range(t_len - 1 + u_len):
      if k in where:
        terms.append(lp[t, u, labels[u]])
        u += 1
      else:
        terms.append(lp[t, u, blank])
        t += 1
    terms.append(lp[t_len - 1, u_len, blank])
    paths.append(sum(terms))
  return -jax.nn.logsumexp(jnp.stack(paths))


@pytest.mark.parametrize('shape,blank', [((3, 4, 3, 5), 0), ((2, 5, 2, 4), 3),
                                         ((4, 1, 2, 3), 0)])
def test_equals_brute_force_enumeration(shape, blank):
  """Every (T_b, U_b) of the batch, padding included: losses and
  gradients, in float64."""
  jax.config.update('jax_enable_x64', True)
  try:
    b, t, u, v = shape
    rng = np.random.default_rng(sum(shape))
    logits = jnp.asarray(rng.normal(size=(b, t, u + 1, v)) * 2)
    labels = np.asarray([[c for c in rng.permutation(
        [x for x in range(v) if x != blank] * u)[:u]] for _ in range(b)])
    t_lens = rng.integers(1, t + 1, b)
    u_lens = rng.integers(0, u + 1, b)
    t_lens[0], u_lens[0], u_lens[-1] = t, u, 0
    got = losses.rnnt_loss(logits, labels, t_lens, u_lens, blank=blank)
    grads = jax.grad(lambda x: losses.rnnt_loss(
        x, labels, t_lens, u_lens, blank=blank).sum())(logits)
    assert got.dtype == jnp.float64
    for i in range(b):
      f = lambda x, i=i: _brute_force(x, labels[i], int(t_lens[i]),
                                      int(u_lens[i]), blank)
      np.testing.assert_allclose(got[i], f(logits[i]), rtol=1e-12)
      np.testing.assert_allclose(grads[i], jax.grad(f)(logits[i]),
                                 rtol=1e-9, atol=1e-12)
  finally:
    jax.config.update('jax_enable_x64', False)


def _torchaudio(logits, labels, t_lens, u_lens, blank=0, clamp=-1.0):
  torch = pytest.importorskip('torch')
  torchaudio = pytest.importorskip('torchaudio')
  x = torch.tensor(np.asarray(logits), requires_grad=True)
  loss = torchaudio.functional.rnnt_loss(
      x, torch.tensor(labels, dtype=torch.int32),
      torch.tensor(t_lens, dtype=torch.int32),
      torch.tensor(u_lens, dtype=torch.int32), blank=blank,
      reduction='none', clamp=clamp)
  loss.sum().backward()
  return loss.detach().numpy(), x.grad.numpy()


@pytest.mark.filterwarnings('ignore::UserWarning')
@pytest.mark.parametrize('shape,lengths', [
    ((3, 6, 4, 7), 'full'), ((4, 20, 10, 30), 'ragged'),
    ((2, 50, 20, 29), 'ragged'), ((5, 3, 1, 2), 'ragged'),
    ((3, 16, 0, 5), 'full'), ((2, 8, 12, 9), 'more_labels_than_frames')])
def test_matches_torchaudio(shape, lengths):
  b, t, u, v = shape
  rng = np.random.default_rng(t * 100 + u)
  logits = (rng.normal(size=(b, t, u + 1, v)) * 3).astype(np.float32)
  labels = rng.integers(1, v, (b, u)).astype(np.int32)
  t_lens = np.full(b, t, np.int32)
  u_lens = np.full(b, u, np.int32)
  if lengths == 'ragged':
    t_lens = rng.integers(1, t + 1, b).astype(np.int32)
    u_lens = rng.integers(0, u + 1, b).astype(np.int32)
    t_lens[0], u_lens[0] = t, u
  want, want_grad = _torchaudio(logits, labels, t_lens, u_lens)
  got = losses.rnnt_loss(jnp.asarray(logits), labels, t_lens, u_lens)
  grad = jax.grad(lambda x: losses.rnnt_loss(
      x, labels, t_lens, u_lens).sum())(jnp.asarray(logits))
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-5)
  # Both float32; each about 5e-5 from the float64 gradient at most here.
  np.testing.assert_allclose(grad, want_grad, atol=1e-4)
  # Padding gets no gradient.
  for i in range(b):
    assert not np.any(np.asarray(grad)[i, t_lens[i]:])
    assert not np.any(np.asarray(grad)[i, :, u_lens[i] + 1:])


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_reductions_clamp_and_blank_id():
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(3, 10, 5, 6)) * 4).astype(np.float32)
  labels = rng.integers(0, 5, (3, 4)).astype(np.int32)     # blank is 5
  t_lens = np.asarray([10, 7, 3], np.int32)
  u_lens = np.asarray([4, 2, 1], np.int32)
  want, want_grad = _torchaudio(logits, labels, t_lens, u_lens, blank=5,
                                clamp=0.05)
  x = jnp.asarray(logits)
  f = lambda x, r: losses.rnnt_loss(x, labels, t_lens, u_lens, blank=5,
                                    reduction=r, clamp=0.05)
  np.testing.assert_allclose(f(x, 'none'), want, rtol=2e-6)
  np.testing.assert_allclose(f(x, 'mean'), want.mean(), rtol=2e-6)
  np.testing.assert_allclose(f(x, 'sum'), want.sum(), rtol=2e-6)
  grad = jax.grad(lambda x: f(x, 'sum'))(x)
  assert float(jnp.max(jnp.abs(grad))) <= 0.05 + 1e-7
  np.testing.assert_allclose(grad, want_grad, atol=2e-6)
  with pytest.raises(ValueError, match='reduction'):
    f(x, 'max')
  with pytest.raises(ValueError, match=r'labels must be \(3, 4\)'):
    losses.rnnt_loss(x, labels[:, :3], t_lens, u_lens)


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_stable_at_extreme_logits_and_long_lattices():
  """Logits of +-100 and a 400 x 80 lattice: finite in float32, the loss
  equal to torchaudio's, and the gradient as close to the float64 one as
  torchaudio's float32 gradient is (log-likelihoods of thousands leave
  float32 about 1e-3 of relative precision in the posteriors)."""
  rng = np.random.default_rng(4)
  b, t, u, v = 2, 400, 80, 12
  logits = (rng.normal(size=(b, t, u + 1, v)) * 30).clip(-100, 100).astype(
      np.float32)
  labels = rng.integers(1, v, (b, u)).astype(np.int32)
  t_lens = np.asarray([400, 250], np.int32)
  u_lens = np.asarray([80, 33], np.int32)
  want, want_grad = _torchaudio(logits, labels, t_lens, u_lens)
  f = lambda x: losses.rnnt_loss(x, labels, t_lens, u_lens)
  got = f(jnp.asarray(logits))
  grad = jax.grad(lambda x: f(x).sum())(jnp.asarray(logits))
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))
  assert float(jnp.min(got)) > 1000
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.config.update('jax_enable_x64', True)
  try:
    exact = np.asarray(jax.grad(lambda x: f(x).sum())(
        jnp.asarray(logits, jnp.float64)))
  finally:
    jax.config.update('jax_enable_x64', False)
  ours = np.abs(np.asarray(grad) - exact).max()
  theirs = np.abs(want_grad - exact).max()
  assert ours <= 1.5 * theirs + 1e-6, (ours, theirs)


def test_memory_holds_one_lattice_of_logits():
  """Compiled loss and gradient (float32): the only [B, T, U + 1, V]
  arrays are the logits and their gradient; the temporaries are a small
  fraction of one."""
  b, t, u, v = 4, 100, 30, 256
  labels = jnp.ones((b, u), jnp.int32)
  t_lens = jnp.full((b,), t)
  u_lens = jnp.full((b,), u)
  spec = jax.ShapeDtypeStruct((b, t, u + 1, v), jnp.float32)
  lattice = b * t * (u + 1) * v * 4
  step = jax.jit(jax.value_and_grad(
      lambda x: losses.rnnt_loss(x, labels, t_lens, u_lens).sum()))
  memory = step.lower(spec).compile().memory_analysis()
  if memory is None:
    pytest.fail('the backend reports no memory analysis')
  assert memory.temp_size_in_bytes < 0.25 * lattice
  assert memory.output_size_in_bytes < 1.01 * lattice
