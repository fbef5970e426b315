"""Speech features for RNN-T, as the MLPerf reference computes them.

The reference (rnn_speech_recognition/pytorch/common/data/features.py,
configs/baseline_v3-1023sp.yaml) turns 16 kHz audio into 240 features a
step:

1. dither: + 1e-5 * N(0, 1) noise (training and evaluation alike);
2. pre-emphasis: y[0] = x[0], y[n] = x[n] - 0.97 x[n - 1];
3. STFT: n_fft 512, a 320-sample (20 ms) symmetric Hann window centred in
   the 512 frame, hop 160 (10 ms), frames centred on multiples of the hop
   with the signal reflect-padded by 256 at both ends (torch.stft's
   center=True); frames = 1 + samples // 160, valid ones ceil(len / 160);
4. power spectrum |X|^2, then 80 mel filters (librosa's filters.mel:
   Slaney's mel scale and area normalisation, 0 to 8 kHz), then
   log(x + 1e-20);
5. per-feature normalisation over each utterance's valid frames: minus the
   mean, divided by the (unbiased) standard deviation + 1e-5;
6. frame splicing: each frame concatenated with the next two (zeros past
   the end), every third kept: ceil(frames / 3) steps of 240; padding
   steps zero.

The functions take a padded batch [B, samples] with per-utterance
lengths and compute with numpy on numpy arrays (host data workers) and with
jax.numpy on anything else (jitted on a device).

This is FilterbankFeatures + FrameSplicing of features.py (tests/
test_audio_features.py rebuilds them from torch.stft and torchaudio's mel
filters). The reference's training script computes the same steps with
DALI operators (Spectrogram, MelFilterBank(normalize=True),
ToDecibels(ln 10, cutoff ln 1e-20), Normalize over time), whose details
may differ slightly (a log floor instead of + 1e-20, the population
instead of the unbiased standard deviation, no epsilon); those are not
checked here, as DALI is not available.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 512
WIN_LENGTH = 320               # 0.02 s
HOP_LENGTH = 160               # 0.01 s
N_MELS = 80
PREEMPH = 0.97
DITHER = 1e-5
FRAME_STACKING = 3
FRAME_SUBSAMPLING = 3
LOG_ZERO_GUARD = 1e-20
NORM_EPS = 1e-5


def _hz_to_mel(f):
  """Slaney's mel scale (librosa's default, htk=False): linear below
  1 kHz, logarithmic above."""
  f = np.asarray(f, np.float64)
  f_sp = 200.0 / 3
  mel = f / f_sp
  min_log_hz = 1000.0
  min_log_mel = min_log_hz / f_sp
  logstep = math.log(6.4) / 27.0
  return np.where(f >= min_log_hz,
                  min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz)
                  / logstep, mel)


def _mel_to_hz(m):
  m = np.asarray(m, np.float64)
  f_sp = 200.0 / 3
  min_log_hz = 1000.0
  min_log_mel = min_log_hz / f_sp
  logstep = math.log(6.4) / 27.0
  return np.where(m >= min_log_mel,
                  min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                   n_mels: int = N_MELS, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
  """[n_mels, n_fft // 2 + 1] float32 triangular filters on Slaney's mel
  scale with Slaney's area normalisation (librosa.filters.mel's defaults,
  which the reference uses)."""
  fmax = sample_rate / 2 if fmax is None else fmax
  freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax),
                                 n_mels + 2))
  fdiff = np.diff(mel_f)
  ramps = mel_f[:, None] - freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
  return weights.astype(np.float32)


def hann_window(length: int = WIN_LENGTH, n_fft: int = N_FFT) -> np.ndarray:
  """torch.hann_window(length, periodic=False), zero-padded on both sides
  to n_fft (as torch.stft centres a shorter window)."""
  n = np.arange(length, dtype=np.float64)
  w = 0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1))
  left = (n_fft - length) // 2
  return np.pad(w, (left, n_fft - length - left)).astype(np.float32)


def num_frames(lengths, hop: int = HOP_LENGTH):
  """Valid STFT frames of utterances of `lengths` samples: ceil(len / hop)
  (the reference's count)."""
  return (_array_module(lengths).asarray(lengths) + hop - 1) // hop


def _array_module(x):
  """numpy for numpy inputs (host workers), jax.numpy otherwise."""
  return np if isinstance(x, np.ndarray) else jnp


def log_mel(audio: jax.Array, lengths: jax.Array, *,
            key: jax.Array | np.random.Generator | None = None,
            dither: float = DITHER, preemph: float = PREEMPH,
            n_fft: int = N_FFT, win_length: int = WIN_LENGTH,
            hop: int = HOP_LENGTH, n_mels: int = N_MELS,
            sample_rate: int = SAMPLE_RATE
            ) -> tuple[jax.Array, jax.Array]:
  """Normalised log-mel features of a padded batch of audio.

  Numpy inputs are computed with numpy (on the host, e.g. in data
  workers), anything else with jax.numpy.

  Args:
    audio: [B, S] float samples (zeros past each length).
    lengths: [B] int samples per utterance.
    key: the dither noise's source, a PRNG key (jax) or a
      np.random.Generator (numpy); None: no dither.

  Returns:
    (features [B, 1 + S // hop, n_mels] float32, frames [B] int32), the
    frames past each utterance's count set to 0.
  """
  xp = _array_module(audio)
  x = xp.asarray(audio, np.float32)
  lengths = xp.asarray(lengths, np.int32)
  if key is not None and dither > 0:
    if isinstance(key, np.random.Generator):
      noise = key.standard_normal(x.shape, np.float32)
    else:
      noise = jax.random.normal(key, x.shape, x.dtype)
    x = x + dither * noise
  if preemph:
    x = xp.concatenate([x[:, :1], x[:, 1:] - preemph * x[:, :-1]], axis=1)
  pad = n_fft // 2
  x = xp.pad(x, ((0, 0), (pad, pad)), mode='reflect')
  count = 1 + (x.shape[1] - n_fft) // hop
  index = (np.arange(count)[:, None] * hop + np.arange(n_fft)[None, :])
  frames = x[:, index] * xp.asarray(hann_window(win_length, n_fft))
  spectrum = xp.fft.rfft(frames, n=n_fft, axis=-1)
  power = (xp.real(spectrum) ** 2 + xp.imag(spectrum) ** 2).astype(
      np.float32)
  fb = xp.asarray(mel_filterbank(sample_rate, n_fft, n_mels))
  if xp is np:
    mel = np.einsum('btf,mf->btm', power, fb)
  else:
    mel = jnp.einsum('btf,mf->btm', power, fb,
                     precision=jax.lax.Precision.HIGHEST)
  feats = xp.log(mel + LOG_ZERO_GUARD)
  valid_frames = num_frames(lengths, hop).astype(np.int32)
  valid = xp.arange(count)[None, :] < valid_frames[:, None]         # [B, T]
  n = xp.maximum(valid_frames, 1)[:, None].astype(np.float32)
  mean = xp.sum(xp.where(valid[..., None], feats, 0), axis=1) / n
  var = xp.sum(xp.where(valid[..., None], (feats - mean[:, None]) ** 2, 0),
               axis=1) / xp.maximum(n - 1, 1)
  feats = (feats - mean[:, None]) / (xp.sqrt(var)[:, None] + NORM_EPS)
  return (xp.where(valid[..., None], feats, 0).astype(np.float32),
          valid_frames)


def splice_frames(features: jax.Array, frames: jax.Array, *,
                  stacking: int = FRAME_STACKING,
                  subsampling: int = FRAME_SUBSAMPLING
                  ) -> tuple[jax.Array, jax.Array]:
  """The reference's stack_subsample_frames (and FillPadding): frame t
  with frames t + 1 .. t + stacking - 1 (zeros past the end) on the
  feature axis, every `subsampling`-th kept; frames ceil(n / subsampling),
  steps past them zero. [B, T, F] -> [B, ceil(T / s), stacking * F]."""
  xp = _array_module(features)
  parts = [features] + [
      xp.pad(features[:, n:], ((0, 0), (0, n), (0, 0)))
      for n in range(1, stacking)]
  x = xp.concatenate(parts, axis=-1)[:, ::subsampling]
  frames = (xp.asarray(frames) + subsampling - 1) // subsampling
  valid = xp.arange(x.shape[1])[None, :] < frames[:, None]
  return xp.where(valid[..., None], x, 0), frames.astype(np.int32)


def features(audio: jax.Array, lengths: jax.Array, *,
             key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The reference's full pipeline: `log_mel` then `splice_frames`:
  [B, S] audio -> ([B, T', 240], [B] steps)."""
  x, frames = log_mel(audio, lengths, key=key)
  return splice_frames(x, frames)
