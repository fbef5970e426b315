"""jaxperf.data.audio against the reference's FilterbankFeatures and
FrameSplicing (common/data/features.py: torch.stft, librosa's mel filters,
log, per-feature normalisation, stacking and subsampling), rebuilt here
from torch.stft and torchaudio's Slaney mel filters."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from jaxperf.data import audio

torch = pytest.importorskip('torch')
torchaudio = pytest.importorskip('torchaudio')


def test_mel_filters_are_librosas():
  """librosa.filters.mel(16000, 512, n_mels=80) = torchaudio's
  melscale_fbanks with Slaney's scale and normalisation."""
  want = torchaudio.functional.melscale_fbanks(
      257, 0.0, 8000.0, 80, 16000, norm='slaney', mel_scale='slaney').T
  np.testing.assert_allclose(audio.mel_filterbank(), want.numpy(),
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
      audio.hann_window()[96:416],
      torch.hann_window(320, periodic=False).numpy(), atol=3e-7)
  assert not audio.hann_window()[:96].any()


def _reference(x, lens):
  """FilterbankFeatures (no dither) then FrameSplicing, padding zeroed."""
  x = torch.tensor(x, dtype=torch.float64)
  lens = torch.tensor(lens)
  x = torch.cat((x[:, :1], x[:, 1:] - 0.97 * x[:, :-1]), dim=1)
  spec = torch.stft(x, n_fft=512, hop_length=160, win_length=320,
                    window=torch.hann_window(320, periodic=False,
                                             dtype=torch.float64),
                    center=True, pad_mode='reflect', return_complex=True)
  frames = torch.ceil(lens.double() / 160).int()
  power = spec.abs() ** 2
  fb = torchaudio.functional.melscale_fbanks(
      257, 0.0, 8000.0, 80, 16000, norm='slaney', mel_scale='slaney').T
  mel = torch.log(fb.double() @ power + 1e-20)
  out = torch.zeros_like(mel)
  for i in range(mel.shape[0]):
    m = mel[i, :, :frames[i]]
    out[i, :, :frames[i]] = ((m - m.mean(dim=1, keepdim=True))
                             / (m.std(dim=1, keepdim=True) + 1e-5))
  seq = [out]
  for n in range(1, 3):
    tmp = torch.zeros_like(out)
    tmp[:, :, :-n] = out[:, :, n:]
    seq.append(tmp)
  spliced = torch.cat(seq, dim=1)[:, :, ::3]
  steps = torch.ceil(frames.double() / 3).int()
  for i in range(spliced.shape[0]):
    spliced[i, :, steps[i]:] = 0
  return spliced.permute(0, 2, 1).numpy(), steps.numpy()


def test_features_match_the_reference():
  rng = np.random.default_rng(0)
  lens = np.asarray([16000, 9731, 4000], np.int32)
  t = np.arange(16000) / 16000
  x = np.zeros((3, 16000), np.float32)
  for i, n in enumerate(lens):
    tone = np.sin(2 * np.pi * (300 + 500 * i) * t[:n] * (1 + t[:n]))
    x[i, :n] = 0.3 * tone + 0.01 * rng.normal(size=n)
  want, want_steps = _reference(x.astype(np.float64), lens)
  # jax.numpy (on a device) and numpy (on the host, data workers).
  for inputs in ((jnp.asarray(x), jnp.asarray(lens)), (x, lens)):
    got, steps = audio.features(*inputs)
    assert isinstance(got, np.ndarray) == isinstance(inputs[0], np.ndarray)
    np.testing.assert_array_equal(steps, want_steps)
    assert got.shape == want.shape == (3, 34, 240)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-3)
    # Most values agree far more closely than the worst (log of tiny mel
    # energies in float32).
    assert np.median(np.abs(np.asarray(got) - want)) < 1e-4


def test_dither_is_random_and_small():
  import jax  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 3200))
  a, _ = audio.log_mel(x + 0.1, jnp.asarray([3200]), key=jax.random.key(0))
  b, _ = audio.log_mel(x + 0.1, jnp.asarray([3200]), key=jax.random.key(1))
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)
  rng = np.random.default_rng
  x = np.full((1, 3200), 0.1, np.float32)
  c, _ = audio.log_mel(x, np.asarray([3200]), key=rng(0))
  d, _ = audio.log_mel(x, np.asarray([3200]), key=rng(1))
  assert np.all(np.isfinite(c)) and not np.allclose(c, d)
