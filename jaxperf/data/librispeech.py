"""LibriSpeech for the MLPerf RNN-T: manifests, WAVs, transcripts, augmentation.

Host-side, numpy-only building blocks of the input pipeline of the MLPerf
reference (mlcommons/training, retired_benchmarks/rnnt/pytorch, which trains
through its DALI pipeline, common/data/dali/). File names below are the
reference's.

On disk (utils/convert_librispeech.py, utils/preprocessing_utils.py,
scripts/preprocess_librispeech.sh): every split's FLACs are converted to
16 kHz 16-bit mono WAVs under `<data_dir>/<split>-wav/<speaker>/<chapter>/
<id>.wav`, and `<data_dir>/librispeech-<split>-wav.json` lists them. A
manifest is a JSON list with one object per utterance::

  {"transcript": "he hoped there would be stew for dinner",
   "files": [{"channels": 1, "sample_rate": 16000.0, "bitdepth": 16,
              "bitrate": 256000.0, "duration": 10.435, "num_samples": 166960,
              "encoding": "Signed Integer PCM", "silent": false,
              "fname": "dev-clean-wav/1272/128104/1272-128104-0000.wav",
              "speed": 1}],
   "original_duration": 10.435, "original_num_samples": 166960}

`files` holds one entry per offline speed (the MLPerf preparation uses none,
so only speed 1); `fname` is relative to the data directory. The transcript
is LibriSpeech's, lower-cased and stripped by the converter.

The training pipeline, in the reference's order (common/data/dali/
pipeline.py): decode, resampling to `rate * 16000` Hz with `rate ~ U(0.85,
1.15)` (`speed_perturb`), silence trim at -60 dB (`trim_silence`), then the
features of `jaxperf.data.audio`, then SpecAugment on the log-mel features
(`spec_augment`) and frame splicing. Utterances longer than 16.7 s are dropped
(`read_manifests`); batches come from `bucketing_batches`; transcripts are
sentencepiece pieces (`Tokenizer`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import unicodedata
import wave
from typing import Sequence

import numpy as np

from jaxperf.errors import DataError

SAMPLE_RATE = 16000
LABELS = " abcdefghijklmnopqrstuvwxyz'"

# sox's file_info.info() of a converted WAV, as the converter stores it.
_ENCODING = 'Signed Integer PCM'
# DALI's nonsilent_region defaults (window_length; the cutoff is the
# pipeline's -60 dB).
SILENCE_WINDOW = 2048
# Lobes of the windowed-sinc resampler (DALI's default resampling quality 50
# gives 16).
RESAMPLE_LOBES = 16

_WHITESPACE = re.compile(r'\s+')
_WAVE_FORMAT_PCM = 1
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One manifest entry.

  Attributes:
    path: absolute path of the WAV file (the speed-1 entry of `files`).
    duration: seconds, the manifest's `original_duration`.
    num_samples: the manifest's `original_num_samples`.
    transcript: the manifest's `transcript`, not normalised.
  """
  path: str
  duration: float
  num_samples: int
  transcript: str


# ---------------------------------------------------------------- manifests


def _field(entry, key, manifest, index):
  if not isinstance(entry, dict) or key not in entry:
    raise DataError(f'{manifest}: entry {index} has no {key!r} field '
                    '(expected the format of utils/convert_librispeech.py)')
  return entry[key]


def _number(entry, key, manifest, index):
  value = _field(entry, key, manifest, index)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DataError(f'{manifest}: entry {index} has {key!r} = {value!r}; '
                    'expected a number')
  return value


def _speed_one_file(entry, manifest, index):
  """The `files` entry at speed 1 (the reference's DALI reader takes
  `files[-1]`, which is that entry when the data has no offline speeds)."""
  files = _field(entry, 'files', manifest, index)
  if not isinstance(files, list) or not files:
    raise DataError(f"{manifest}: entry {index} has 'files' = {files!r}; "
                    'expected a non-empty list')
  for f in files:
    speed = f.get('speed', 1) if isinstance(f, dict) else None
    if isinstance(speed, (int, float)) and speed == 1:
      if not isinstance(f.get('fname'), str):
        raise DataError(f"{manifest}: entry {index} has a 'files' entry "
                        "without an 'fname' string")
      return f['fname']
  raise DataError(f"{manifest}: entry {index} has no 'files' entry with "
                  'speed 1')


def read_manifests(data_dir: str, manifests: Sequence[str], *,
                   max_duration: float | None = None) -> list[Utterance]:
  """The utterances of the reference's JSON manifests, in manifest order.

  Manifest names are relative to `data_dir` (absolute ones are taken as
  they are), as are the WAV paths inside them. As the reference's
  common/data/dali/data_loader.py, an utterance is kept when its
  `original_duration` is <= `max_duration` (None keeps all); there is no
  minimum duration (the non-DALI dataset's 0.1 s is not used in training).
  Every entry must have `transcript`, `files` (with a speed-1 `fname`),
  `original_duration` and `original_num_samples`.

  Args:
    data_dir: the dataset directory (the reference's --dataset_dir).
    manifests: manifest file names, e.g.
      'librispeech-train-clean-100-wav.json'.
    max_duration: longest utterance kept, seconds (16.7 for training).

  Returns:
    The kept utterances of all manifests, concatenated.

  Raises:
    DataError: a manifest is missing or not valid JSON, an entry lacks a
      field, a kept utterance's WAV does not exist, or nothing is kept.
  """
  utterances = []
  for name in manifests:
    manifest = os.path.join(data_dir, name)
    try:
      with open(manifest, encoding='utf-8') as f:
        entries = json.load(f)
    except FileNotFoundError:
      raise DataError(f'manifest {manifest} does not exist') from None
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f'cannot read manifest {manifest}: {e}') from None
    except json.JSONDecodeError as e:
      raise DataError(f'manifest {manifest} is not valid JSON: {e}') from None
    if not isinstance(entries, list):
      raise DataError(f'manifest {manifest} holds a {type(entries).__name__}; '
                      'expected a JSON list of utterances')
    for i, entry in enumerate(entries):
      duration = float(_number(entry, 'original_duration', manifest, i))
      num_samples = _number(entry, 'original_num_samples', manifest, i)
      transcript = _field(entry, 'transcript', manifest, i)
      if not isinstance(transcript, str):
        raise DataError(f"{manifest}: entry {i} has 'transcript' = "
                        f'{transcript!r}; expected a string')
      fname = _speed_one_file(entry, manifest, i)
      if max_duration is not None and not duration <= max_duration:
        continue
      path = os.path.abspath(os.path.join(data_dir, fname))
      if not os.path.isfile(path):
        raise DataError(f'{manifest}: entry {i} refers to {path}, '
                        'which does not exist')
      utterances.append(Utterance(path=path, duration=duration,
                                  num_samples=int(num_samples),
                                  transcript=transcript))
  if not utterances:
    limit = '' if max_duration is None else f' of at most {max_duration} s'
    raise DataError(f'no utterances{limit} in {", ".join(manifests)} '
                    f'(data directory {data_dir})')
  return utterances


def write_manifest(data_dir: str, manifest_name: str,
                   entries: Sequence[tuple[str, str, np.ndarray]], *,
                   sample_rate: int = SAMPLE_RATE) -> str:
  """Writes WAVs and a manifest in the reference's format (tiny datasets).

  Args:
    data_dir: the dataset directory.
    manifest_name: the manifest's file name inside `data_dir`.
    entries: (WAV path relative to `data_dir`, e.g.
      'train-clean-100-wav/1/2/1-2-0000.wav', transcript, float audio in
      [-1, 1]). The transcript is written as given (the reference's
      converter writes LibriSpeech's lower-cased and stripped).
    sample_rate: of the audio.

  Returns:
    The manifest's path.
  """
  records = []
  for fname, transcript, audio in entries:
    audio = np.asarray(audio)
    write_wav(os.path.join(data_dir, fname), audio, sample_rate)
    num_samples = int(audio.shape[0])
    duration = num_samples / sample_rate
    records.append({
        'transcript': transcript,
        'files': [{
            'channels': 1,
            'sample_rate': float(sample_rate),
            'bitdepth': 16,
            'bitrate': float(sample_rate * 16),
            'duration': duration,
            'num_samples': num_samples,
            'encoding': _ENCODING,
            'silent': not np.any(audio),
            'fname': fname,
            'speed': 1,
        }],
        'original_duration': duration,
        'original_num_samples': num_samples,
    })
  path = os.path.join(data_dir, manifest_name)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(records, f, indent=2)
  return path


# ---------------------------------------------------------------- WAV files


def _wav_format(path, data):
  """(format tag, channels, sample rate, bits, PCM bytes) of a RIFF WAVE."""
  if len(data) < 12 or data[:4] != b'RIFF' or data[8:12] != b'WAVE':
    raise DataError(f'{path} is not a WAV file (no RIFF/WAVE header)')
  fmt = pcm = None
  pos = 12
  while pos + 8 <= len(data):
    chunk = data[pos:pos + 4]
    size = struct.unpack('<I', data[pos + 4:pos + 8])[0]
    body = data[pos + 8:pos + 8 + size]
    if chunk == b'fmt ':
      if len(body) < 16:
        raise DataError(f'{path} has a truncated fmt chunk')
      tag, channels, rate, _, _, bits = struct.unpack('<HHIIHH', body[:16])
      if tag == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
        tag = struct.unpack('<H', body[24:26])[0]     # the sub-format GUID
      fmt = tag, channels, rate, bits
    elif chunk == b'data':
      pcm = body
      if fmt is not None:
        break
    pos += 8 + size + (size & 1)
  if fmt is None or pcm is None:
    missing = 'fmt' if fmt is None else 'data'
    raise DataError(f'{path} is not a valid WAV file (no {missing} chunk)')
  return (*fmt, pcm)


def read_wav(path: str, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """A mono 16-bit PCM WAV as float32 in [-1, 1) (int16 / 32768).

  Args:
    path: the WAV file.
    sample_rate: the sample rate it must have.

  Returns:
    float32 [num_samples].

  Raises:
    DataError: naming the file, when it is missing, unreadable or not a
      WAV, or not 16-bit PCM mono at `sample_rate`.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise DataError(f'WAV file {path} does not exist') from None
  except OSError as e:
    raise DataError(f'cannot read WAV file {path}: {e}') from None
  tag, channels, rate, bits, pcm = _wav_format(path, data)
  if tag != _WAVE_FORMAT_PCM:
    raise DataError(f'{path} has WAV format tag {tag}; expected 1 '
                    '(integer PCM)')
  if rate != sample_rate:
    raise DataError(f'{path} has sample rate {rate} Hz; expected '
                    f'{sample_rate}')
  if channels != 1:
    raise DataError(f'{path} has {channels} channels; expected 1 (mono)')
  if bits != 16:
    raise DataError(f'{path} has {bits}-bit samples; expected 16-bit PCM')
  pcm = pcm[:len(pcm) // 2 * 2]
  return np.frombuffer(pcm, dtype='<i2').astype(np.float32) / np.float32(32768)


def write_wav(path: str, audio: np.ndarray,
              sample_rate: int = SAMPLE_RATE) -> None:
  """Writes float audio in [-1, 1] as a 16-bit mono PCM WAV.

  Samples are rounded to the nearest multiple of 1/32768 and clipped to the
  int16 range, so `read_wav` returns them to within 1/32768.

  Args:
    path: the file; missing directories are created.
    audio: [num_samples] float.
    sample_rate: written in the header.
  """
  audio = np.asarray(audio, dtype=np.float64)
  if audio.ndim != 1:
    raise ValueError(f'audio must be 1-D (mono); got shape {audio.shape}')
  pcm = np.clip(np.round(audio * 32768), -32768, 32767).astype('<i2')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with wave.open(path, 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(int(sample_rate))
    w.writeframes(pcm.tobytes())


# -------------------------------------------------------------- transcripts


def normalize_transcript(text: str, labels: str = LABELS) -> str:
  """A transcript as the reference's training tokenizes it.

  The reference's converter stores LibriSpeech's transcript lower-cased and
  stripped; its DALI training iterator (common/data/dali/iterator.py) passes
  it to sentencepiece as it is (DaliRnntIterator's normalize_transcripts
  defaults to False, and the loader does not set it), whose model normalises
  with NFKC and collapses whitespace. So: NFKC, lower case, runs of
  whitespace collapsed to one space, stripped. Every remaining character
  must be one of `labels`. The reference's other path (english_cleaners in
  common/text: unidecode, number and abbreviation expansion, punctuation to
  spaces, then silently dropping characters outside the labels) is not
  applied: LibriSpeech never needs it, and a character outside the labels
  is an error here, not dropped.

  Args:
    text: a transcript.
    labels: the tokenizer's characters.

  Returns:
    The normalised transcript.

  Raises:
    ValueError: characters outside `labels` remain (listed).
  """
  text = unicodedata.normalize('NFKC', text).lower()
  text = _WHITESPACE.sub(' ', text).strip()
  bad = sorted(set(text) - set(labels))
  if bad:
    raise ValueError(f"transcript {text!r} has characters outside the "
                     f"tokenizer's labels: {''.join(bad)!r}")
  return text


class Tokenizer:
  """The reference's sentencepiece tokenizer (common/data/text.py).

  The labels are the sentencepiece model's pieces (1023 for
  librispeech1023.model, trained by scripts/create_sentencepieces.sh:
  unigram, character_coverage 1.0, no BOS/EOS, `<unk>` id 0). The RNN-T
  blank is not one of them: the model puts it last, at index `num_labels`.

  Attributes:
    labels: the characters a normalised transcript may hold.
    num_labels: the number of pieces.
  """

  def __init__(self, model_path: str, labels: str = LABELS):
    import sentencepiece as spm   # pylint: disable=import-outside-toplevel
    if not os.path.isfile(model_path):
      raise DataError(f'sentencepiece model {model_path} does not exist')
    try:
      self._sp = spm.SentencePieceProcessor(model_file=model_path)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{model_path} is not a sentencepiece model: '
                      f'{e}') from None
    self.labels = labels
    self.num_labels = int(self._sp.get_piece_size())
    self._unk = int(self._sp.unk_id())

  def encode(self, transcript: str) -> list[int]:
    """Piece ids of the normalised transcript (`normalize_transcript`).

    Raises:
      ValueError: characters outside the labels, or a piece the model does
        not know (the reference asserts no `<unk>`).
    """
    text = normalize_transcript(transcript, self.labels)
    ids = [int(i) for i in self._sp.encode(text, out_type=int)]
    if self._unk in ids:
      raise ValueError(f'transcript {text!r} has characters the '
                       'sentencepiece model does not know (<unk>)')
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of piece ids (sentencepiece's decode, as the reference)."""
    return self._sp.decode([int(i) for i in ids])


def train_tokenizer(transcripts: Sequence[str], model_path: str, *,
                    vocab_size: int = 1023) -> Tokenizer:
  """Trains the reference's tokenizer on `transcripts` (its
  create_sentencepieces.sh: a unigram sentencepiece model of 1023 pieces over
  the training manifests' transcripts, full character coverage, no BOS/EOS)
  and writes `model_path` (ending in .model) and its .vocab beside it."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  if not model_path.endswith('.model'):
    raise ValueError(f'{model_path}: expected a path ending in .model')
  folder = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(folder, exist_ok=True)
  text = model_path[:-len('.model')] + '.txt'
  with open(text, 'w', encoding='utf-8') as f:
    f.write('\n'.join(transcripts) + '\n')
  try:
    spm.SentencePieceTrainer.train(
        input=text, model_prefix=model_path[:-len('.model')],
        vocab_size=vocab_size, character_coverage=1.0, bos_id=-1, eos_id=-1,
        model_type='unigram', minloglevel=2)
  finally:
    os.remove(text)
  return Tokenizer(model_path)


class CharTokenizer:
  """One label per character of `labels` (for synthetic data).

  Attributes:
    labels: the characters; label i is labels[i].
    num_labels: len(labels); the blank is index num_labels.
  """

  def __init__(self, labels: str = LABELS):
    if len(set(labels)) != len(labels) or not labels:
      raise ValueError(f'labels {labels!r} must be distinct characters')
    self.labels = labels
    self.num_labels = len(labels)
    self._index = {c: i for i, c in enumerate(labels)}

  def encode(self, transcript: str) -> list[int]:
    """Label ids of the normalised transcript (ValueError on characters
    outside the labels)."""
    return [self._index[c]
            for c in normalize_transcript(transcript, self.labels)]

  def decode(self, ids: Sequence[int]) -> str:
    return ''.join(self.labels[int(i)] for i in ids)


# ------------------------------------------------------------- augmentation


def speed_perturbed_length(num_samples: int, rate: float) -> int:
  """Samples of `speed_perturb`'s output: ceil(num_samples * rate) (DALI's
  resampled length; products within 1e-6 of an integer are not rounded up,
  so float noise in `rate` does not add a sample)."""
  return int(math.ceil(num_samples * rate - 1e-6))


def speed_perturb(audio: np.ndarray, rate: float, *,
                  lobes: int = RESAMPLE_LOBES) -> np.ndarray:
  """Speed perturbation as the reference's DALI training pipeline does it.

  common/data/dali/pipeline.py draws `rate ~ U(min_rate, max_rate)` ([0.85,
  1.15]) and decodes the 16 kHz file resampled to `rate * 16000` Hz, then
  treats the result as 16 kHz audio. So the output has ceil(n * rate)
  samples: rate > 1 gives a LONGER, slower signal whose frequencies are
  divided by `rate` (a 1 kHz tone becomes 1 / 1.15 kHz). (The reference's
  non-DALI path, common/audio.py, uses sox's speed effect in the opposite
  direction; training uses DALI.)

  The resampler is DALI's kind: output sample k is the input at position
  k / rate, interpolated with a Hann-windowed sinc of `lobes` zero crossings
  on each side, the signal zero outside its ends. Unlike DALI, which does not
  low-pass when it decimates, the sinc's cutoff is lowered to rate * Nyquist
  for rate < 1, so content that would alias is removed.

  Args:
    audio: [n] float.
    rate: the perturbation rate (> 0).
    lobes: zero crossings of the sinc on each side.

  Returns:
    float32 [ceil(n * rate)].
  """
  if not rate > 0:
    raise ValueError(f'speed perturbation rate must be > 0; got {rate}')
  x = np.asarray(audio, dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f'audio must be 1-D; got shape {x.shape}')
  n = x.shape[0]
  if rate == 1.0 or n == 0:
    return x.astype(np.float32)
  out_len = speed_perturbed_length(n, rate)
  cutoff = min(1.0, rate)             # of the input's Nyquist frequency
  support = lobes / cutoff            # half-width of the kernel, samples
  pos = np.arange(out_len, dtype=np.float64) / rate
  base = np.floor(pos).astype(np.int64)
  frac = pos - base
  out = np.zeros(out_len, dtype=np.float64)
  half = int(math.ceil(support))
  for j in range(-half + 1, half + 1):
    idx = base + j
    offset = j - frac                 # input index minus position
    weight = (cutoff * np.sinc(cutoff * offset)
              * (0.5 + 0.5 * np.cos(np.pi * np.clip(offset / support, -1, 1))))
    valid = (idx >= 0) & (idx < n)
    out += np.where(valid, x[np.clip(idx, 0, n - 1)], 0.0) * weight
  return out.astype(np.float32)


def nonsilent_region(audio: np.ndarray, *, threshold_db: float = -60.0,
                     window_length: int = SILENCE_WINDOW) -> tuple[int, int]:
  """(begin, length) of the non-silent region, as DALI's nonsilent_region.

  The short-term power is the mean square over every window of
  `window_length` samples (hop 1; the whole signal when it is shorter); a
  window is non-silent when 10 log10(power / max power) >= threshold_db.
  The region runs from the first sample of the first non-silent window to
  the last sample of the last one. An all-zero signal has no silent window
  (every power equals the maximum, 0), so the region is all of it.
  """
  x = np.asarray(audio, dtype=np.float64)
  n = x.shape[0]
  if n == 0:
    return 0, 0
  w = min(window_length, n)
  csum = np.concatenate([[0.0], np.cumsum(x * x)])
  power = (csum[w:] - csum[:-w]) / w
  power = np.maximum(power, 0.0)      # cumsum rounding
  cutoff = power.max() * 10.0 ** (threshold_db / 10.0)
  loud = np.flatnonzero(power >= cutoff)
  first, last = int(loud[0]), int(loud[-1])
  return first, last - first + w


def trim_silence(audio: np.ndarray, *, threshold_db: float = -60.0,
                 window_length: int = SILENCE_WINDOW) -> np.ndarray:
  """The reference's silence trim (trim_silence: true).

  The DALI training pipeline (common/data/dali/pipeline.py) slices the audio
  to `nonsilent_region` with cutoff -60 dB and DALI's defaults: 2048-sample
  windows, the maximum window power as reference. (The non-DALI dataset's
  librosa.effects.trim(top_db=60) uses frames of 2048 with hop 512 and
  peak-amplitude reference; it is not the training path.) A signal that is
  all silent relative to its own maximum cannot occur; an all-zero or empty
  signal is returned unchanged.

  Args:
    audio: [n] float.
    threshold_db: the cutoff, dB relative to the loudest window.
    window_length: samples per window.

  Returns:
    The non-silent part of `audio` (a slice of it).
  """
  begin, length = nonsilent_region(audio, threshold_db=threshold_db,
                                   window_length=window_length)
  if length == 0:
    return audio
  return audio[begin:begin + length]


def spec_augment(features: np.ndarray, num_frames: int,
                 rng: np.random.Generator, *, freq_masks: int = 2,
                 min_freq: int = 0, max_freq: int = 20,
                 time_masks: int | float = 10, min_time: int = 0,
                 max_time: int | float = 0.03) -> np.ndarray:
  """The reference's SpecAugment (common/data/features.py) on one utterance.

  As SpecAugment.calculate_features, per mask in this order of draws:

  * frequency masks: width w uniform in [min_freq, max_freq] (both
    inclusive), start uniform in [0, F - w];
  * time masks: a float 0 < max_time < 1 is adaptive: the maximum width is
    int(round(num_frames * max_time)) (Python's round, half to even), so 0.03
    of the valid frames; likewise a float 0 < time_masks < 1 gives
    int(round(num_frames * time_masks)) masks. Width w uniform in [min_time,
    max width] (inclusive), start uniform in [0, T - w] where T is
    `features.shape[0]`: as the reference, whose T is the padded batch
    length, masks may start in padding frames.

  Masked values are set to 0 (noise_magnitude 0). Draws use `rng.integers`,
  mirroring the reference's torch.randint calls.

  Args:
    features: [T, F] log-mel features (F = 80, before frame splicing).
    num_frames: valid frames (<= T).
    rng: the random generator.
    freq_masks, min_freq, max_freq: frequency masks (config: 2, 0, 20).
    time_masks, min_time, max_time: time masks (config: 10, 0, 0.03).

  Returns:
    A new array, `features` with the masked entries zero.
  """
  x = np.array(features, copy=True)
  if x.ndim != 2:
    raise ValueError(f'features must be [T, F]; got shape {x.shape}')
  num_t, num_f = x.shape
  if not 0 <= num_frames <= num_t:
    raise ValueError(f'num_frames {num_frames} is not in [0, {num_t}]')
  mask_f = np.zeros(num_f, dtype=bool)
  for _ in range(freq_masks):
    w = int(rng.integers(min_freq, max_freq + 1))
    f0 = int(rng.integers(0, max(1, num_f - w + 1)))
    mask_f[f0:f0 + w] = True
  if 0 < time_masks < 1.0:
    time_masks = int(round(num_frames * time_masks))
  if 0 < max_time < 1.0:
    max_time = int(round(num_frames * max_time))
  mask_t = np.zeros(num_t, dtype=bool)
  for _ in range(int(time_masks)):
    w = int(rng.integers(min_time, int(max_time) + 1))
    t0 = int(rng.integers(0, max(1, num_t - w + 1)))
    mask_t[t0:t0 + w] = True
  x[:, mask_f] = 0
  x[mask_t, :] = 0
  return x


# ----------------------------------------------------------------- batching


def bucketing_batches(durations: Sequence[float], batch_size: int,
                      num_buckets: int, rng: np.random.Generator, *,
                      drop_last: bool = True) -> list[np.ndarray]:
  """One epoch's batches, as the reference's DALI BucketingSampler.

  common/data/dali/sampler.py, which train.py uses whenever --num_buckets
  is given (scripts/train.sh passes NUM_BUCKETS=1; train.py's default is
  6):

  1. sort the utterances by duration and split them into `num_buckets`
     buckets of nearly equal size (np.array_split);
  2. shuffle within each bucket and concatenate the buckets;
  3. drop `n % batch_size` utterances chosen uniformly at random from the
     whole epoch (not the tail), keeping the order of the rest;
  4. cut into batches of `batch_size` consecutive utterances and shuffle
     the order of the batches.

  So num_buckets=1 is a plain random shuffle; 0 is taken as 1 (the
  reference's data loaders treat a missing or zero bucket count as
  unbucketed random order). `batch_size` is the batch the reference's
  sampler forms: all workers' utterances of one step (per-GPU batch /
  grad_accumulation_steps * world_size); within it the reference gives
  worker w the utterances w, w + W, ... For equal durations, order is by
  index (a stable sort; the reference's np.argsort is not stable).

  The random draws are the reference's (rng.permutation per bucket,
  rng.choice, rng.shuffle of the batch rows), so for a one-epoch schedule
  the batches equal the reference's for the same generator state; the
  reference draws all epochs' permutations before any drop, so its later
  epochs differ.

  Args:
    durations: [n] utterance durations (seconds).
    batch_size: utterances per batch (>= 1).
    num_buckets: duration buckets (>= 0).
    rng: the random generator (the reference seeds one with --seed, the
      same on every worker).
    drop_last: True as the reference. False keeps every utterance: the
      `n % batch_size` last ones of step 2 (from the longest bucket) form a
      smaller final batch after the shuffled full ones.

  Returns:
    int64 index arrays, each of `batch_size` (but the last when drop_last
    is False), every index at most once.
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1; got {batch_size}')
  if num_buckets < 0:
    raise ValueError(f'num_buckets must be >= 0; got {num_buckets}')
  num_buckets = max(1, int(num_buckets))
  lengths = np.asarray(durations, dtype=np.float64)
  n = lengths.shape[0]
  order = np.argsort(lengths, kind='stable')
  buckets = np.array_split(order, num_buckets)
  epoch = np.concatenate([rng.permutation(b) for b in buckets]
                         ).astype(np.int64)
  rest = np.zeros(0, dtype=np.int64)
  if drop_last:
    dropped = rng.choice(n, n % batch_size, replace=False)
    keep = np.ones(n, dtype=bool)
    keep[dropped] = False
    epoch = epoch[keep]
  else:
    full = n // batch_size * batch_size
    epoch, rest = epoch[:full], epoch[full:]
  batches = epoch.reshape(-1, batch_size)
  rng.shuffle(batches, axis=0)
  out = list(batches)
  if rest.size:
    out.append(rest)
  return out
