"""Speech batches for RNN-T: utterances -> features on host workers -> padded,
bucketed batches.

A source of utterances (`Clips`: LibriSpeech WAVs from the reference's
manifests, or the synthetic tone source) is turned into batches as the
MLPerf reference's input pipeline does it, per utterance in a pool of host
threads:

  training:   speed perturbation (a rate uniform in [min, max], resampled),
              silence trim (-60 dB), log-mel features with dither,
              SpecAugment, frame splicing (3 x 3);
  evaluation: silence trim, log-mel features with dither, frame splicing.

Batches have static shapes, so XLA compiles one program per shape:
`[b, frames, 240]` features and `[b, labels]` label ids, where (frames,
labels) is one of a few *shape buckets*. Each utterance belongs to the
smallest bucket whose frame ceiling holds it at the slowest speed
perturbation (trimming only shortens), and a batch takes the largest bucket
of its utterances; each bucket's label ceiling is the longest transcript of
the utterances it holds, so every batch fits. Training batches come from the
reference's bucketing sampler (utterances of similar duration together),
which forms micro-batches (global batch / gradient accumulation steps); a
step takes the next `accumulation` of them, and an epoch has
floor(floor(N / micro-batch) / accumulation) steps.

Every batch holds `features` float32 [b, F, 240], `feature_lengths` int32
[b], `labels` int32 [b, U] (padded with 0), `label_lengths` int32 [b];
evaluation batches also `index` int32 [b] (the utterance, -1 for padding)
and `mask` bool [b].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from jaxperf.data import audio
from jaxperf.data import librispeech
from jaxperf.data.prefetch import PrefetchedStreams, completed_in_order
from jaxperf.errors import ConfigError, DataError

_ORDER, _AUGMENT, _DITHER = range(3)


class Clips(Protocol):
  """Utterances: audio on demand, transcripts and sizes up front."""
  num_samples: np.ndarray         # int64 [N] samples of each utterance
  labels: list[np.ndarray]        # int32 label ids of each transcript
  texts: list[str]                # normalised transcripts (for WER)

  def audio(self, index: int) -> np.ndarray:
    """float32 [num_samples[index]] samples at 16 kHz."""


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The training augmentation (None fields: off)."""
  speed: tuple[float, float] | None = (0.85, 1.15)
  spec_augment: dict[str, Any] | None = None
  trim_silence: bool = True
  dither: float = audio.DITHER


def spliced_frames(num_samples) -> np.ndarray:
  """Feature steps of utterances of `num_samples` samples: ceil(ceil(n /
  hop) / 3)."""
  frames = -(-np.asarray(num_samples, np.int64) // audio.HOP_LENGTH)
  return -(-frames // audio.FRAME_SUBSAMPLING)


def utterance_features(samples: np.ndarray, rng: np.random.Generator, *,
                       augment: Augmentation | None, train: bool
                       ) -> np.ndarray:
  """One utterance's features [steps, 240] float32 (the reference's
  pipeline; `train` adds speed perturbation and SpecAugment)."""
  x = np.asarray(samples, np.float32)
  aug = augment or Augmentation(speed=None)
  if train and aug.speed is not None:
    x = librispeech.speed_perturb(x, float(rng.uniform(*aug.speed)))
  if aug.trim_silence:
    x = librispeech.trim_silence(x)
  if x.size == 0:
    x = np.zeros(1, np.float32)
  feats, frames = audio.log_mel(x[None], np.asarray([x.size]),
                                key=rng if aug.dither > 0 else None,
                                dither=aug.dither)
  feats = feats[0]
  if train and aug.spec_augment is not None:
    feats = librispeech.spec_augment(feats, int(frames[0]), rng,
                                     **aug.spec_augment)
  spliced, steps = audio.splice_frames(feats[None], frames)
  return spliced[0, :int(steps[0])]


def shape_buckets(frame_bounds: np.ndarray, label_counts: np.ndarray,
                  num_buckets: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """(bucket of each utterance, [(frame ceiling, label ceiling)]): frame
  ceilings at equal-count quantiles of `frame_bounds` (rounded up to a
  multiple of 8, the last the maximum), each label ceiling the longest
  transcript among the utterances of its bucket and the smaller ones."""
  if num_buckets < 1:
    raise ConfigError(f'shape_buckets={num_buckets}: expected >= 1')
  qs = np.quantile(frame_bounds, np.arange(1, num_buckets + 1) / num_buckets,
                   method='higher')
  ceilings = sorted({int(-(-q // 8) * 8) for q in qs})
  ceilings[-1] = max(ceilings[-1], int(frame_bounds.max()))
  which = np.searchsorted(np.asarray(ceilings), frame_bounds, side='left')
  shapes = []
  longest = 1
  for k, ceiling in enumerate(ceilings):
    held = label_counts[which == k]
    if held.size:
      longest = max(longest, int(held.max()))
    shapes.append((ceiling, longest))
  return which, shapes


class SpeechData(PrefetchedStreams):
  """Training or evaluation batches of a `Clips` source (see the module
  docstring). `num_examples` is the number of utterances."""

  def __init__(self, clips: Clips, *, train: bool,
               augment: Augmentation | None = None, num_buckets: int = 1,
               shape_bucket_count: int = 1, accumulation: int = 1,
               seed: int = 0, num_workers: int = 4, prefetch: int = 2):
    self.clips = clips
    self.accumulation = int(accumulation)
    self.train = train
    self.augment = augment
    self.num_buckets = int(num_buckets)
    self.seed = int(seed)
    self.num_examples = len(clips.labels)
    if self.num_examples == 0:
      raise DataError('the speech source holds no utterances')
    self.label_counts = np.asarray([len(l) for l in clips.labels], np.int64)
    slowest = (max(augment.speed) if train and augment is not None
               and augment.speed is not None else 1.0)
    # Resampling at rate r gives ceil(n * r) samples (librispeech.
    # speed_perturb: a higher rate is slower and longer; +1 for rounding).
    self.frame_bounds = spliced_frames(
        np.ceil(np.asarray(clips.num_samples) * slowest).astype(np.int64) + 1)
    self.bucket_of, self.shapes = shape_buckets(
        self.frame_bounds, self.label_counts, shape_bucket_count)
    self._init_streams(prefetch, num_workers, pool_name='features')

  # --- batches -------------------------------------------------------------
  def epoch_batches(self, epoch: int, batch: int) -> list[np.ndarray]:
    """Training epoch `epoch`'s sampler batches of `batch` utterances
    (indices): the reference's bucketing sampler, floor(N / batch) of
    them."""
    rng = np.random.default_rng([self.seed, _ORDER, epoch])
    durations = np.asarray(self.clips.num_samples) / audio.SAMPLE_RATE
    batches = librispeech.bucketing_batches(durations, batch,
                                            self.num_buckets, rng)
    return batches[:self.num_examples // batch]

  def steps_per_epoch(self, global_batch: int) -> int:
    """Optimizer steps an epoch: floor(N / micro-batch) sampler batches,
    `accumulation` of them a step (the reference's len(train_loader) //
    grad_accumulation_steps)."""
    micro = global_batch // self.accumulation
    return self.num_examples // micro // self.accumulation

  def _shape_of(self, indices: np.ndarray) -> tuple[int, int]:
    valid = indices[indices >= 0]
    return self.shapes[int(self.bucket_of[valid].max())]

  def _fill(self, batch: dict[str, np.ndarray], row: int, index: int,
            key: Sequence[int]) -> None:
    rng = np.random.default_rng(key)
    feats = utterance_features(self.clips.audio(index), rng,
                               augment=self.augment, train=self.train)
    frames = batch['features'].shape[1]
    if feats.shape[0] > frames:
      raise DataError(
          f'utterance {index} gave {feats.shape[0]} feature steps, more than '
          f'its shape bucket\'s {frames} (its {self.clips.num_samples[index]} '
          f'samples allow {self.frame_bounds[index]})')
    batch['features'][row, :feats.shape[0]] = feats
    batch['feature_lengths'][row] = feats.shape[0]

  def _job(self, indices: np.ndarray, keys: list[Sequence[int]],
           shape: tuple[int, int]) -> tuple[dict[str, np.ndarray], list]:
    """A batch of `indices` (-1: an empty row) padded to `shape` (the
    global batch's), and the futures filling its features."""
    frames, labels = shape
    b = len(indices)
    batch = {
        'features': np.zeros((b, frames, audio.N_MELS
                              * audio.FRAME_STACKING), np.float32),
        'feature_lengths': np.zeros((b,), np.int32),
        'labels': np.zeros((b, labels), np.int32),
        'label_lengths': np.zeros((b,), np.int32),
    }
    for row, index in enumerate(indices):
      if index < 0:
        continue
      lab = self.clips.labels[index]
      batch['labels'][row, :len(lab)] = lab
      batch['label_lengths'][row] = len(lab)
    pool = self._executor()
    futures = [pool.submit(self._fill, batch, row, int(index), keys[row])
               for row, index in enumerate(indices) if index >= 0]
    return batch, futures

  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the global batches from step `start_step`
    on, forever (epoch after epoch)."""
    if global_batch % process_count:
      raise ConfigError(f'global batch {global_batch} does not split over '
                        f'{process_count} processes')
    per_epoch = self.steps_per_epoch(global_batch)
    if per_epoch < 1:
      raise ConfigError(
          f'global_batch_size={global_batch} is larger than the training '
          f'set ({self.num_examples} utterances)')
    acc = self.accumulation
    if global_batch % acc:
      raise ConfigError(f'global batch {global_batch} does not split into '
                        f'{acc} micro-batches')
    micro = global_batch // acc
    local = global_batch // process_count
    lo = process_index * local

    def jobs():
      step = start_step
      while True:
        epoch, first = divmod(step, per_epoch)
        batches = self.epoch_batches(epoch, micro)
        for i in range(first, per_epoch):
          # The step's `accumulation` sampler batches, interleaved so that
          # row r holds sampler batch r % n (the micro-batch the step's
          # accumulation gives it; see workloads.base.accumulated_grads).
          group = np.stack(batches[i * acc:(i + 1) * acc])
          glob = group.T.reshape(-1)
          mine = glob[lo:lo + local]
          keys = [(self.seed, _AUGMENT, epoch, int(u)) for u in mine]
          yield self._job(mine, keys, self._shape_of(glob))
        step = (epoch + 1) * per_epoch

    return self._prefetched(completed_in_order(
        jobs(), max(2 * self.num_workers, 2)))

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Every utterance once, ordered by length (less padding), the last
    batch padded with index -1 / mask False rows."""
    if global_batch % process_count:
      raise ConfigError(f'eval batch {global_batch} does not split over '
                        f'{process_count} processes')
    order = np.argsort(self.frame_bounds, kind='stable')
    count = math.ceil(self.num_examples / global_batch)
    order = np.concatenate([order, -np.ones(count * global_batch - order.size,
                                            np.int64)])
    local = global_batch // process_count
    lo = process_index * local

    def jobs():
      for i in range(count):
        glob = order[i * global_batch:(i + 1) * global_batch]
        mine = glob[lo:lo + local]
        keys = [(self.seed, _DITHER, int(u)) for u in mine]
        batch, futures = self._job(mine, keys, self._shape_of(glob))
        batch['index'] = mine.astype(np.int32)
        batch['mask'] = mine >= 0
        yield batch, futures

    return self._prefetched(completed_in_order(
        jobs(), max(2 * self.num_workers, 2)))


# ----------------------------------------------------------------- sources


class LibriSpeechClips:
  """LibriSpeech as the reference preprocesses it: 16 kHz 16-bit mono WAVs
  listed by JSON manifests under `data_dir`, transcripts tokenized with
  `tokenizer` (every transcript up front, so one outside the tokenizer's
  characters fails here, naming its manifest)."""

  def __init__(self, data_dir: str, manifests: Sequence[str], tokenizer, *,
               max_duration: float | None = None):
    self.utterances: list[librispeech.Utterance] = []
    self.labels, self.texts = [], []
    for name in manifests:
      try:
        entries = librispeech.read_manifests(data_dir, [name],
                                             max_duration=max_duration)
      except DataError as e:
        # Only read_manifests' "nothing kept" (its message starts so; a
        # path in another error may hold any words).
        if str(e).startswith('no utterances'):
          entries = []      # all over the cap; judged over every manifest
        else:
          raise
      for u in entries:
        try:
          ids = tokenizer.encode(u.transcript)
        except ValueError as e:
          raise DataError(f'{name}: {u.path}: {e}') from None
        self.utterances.append(u)
        self.labels.append(np.asarray(ids, np.int32))
        self.texts.append(tokenizer.decode(ids))
    if not self.utterances:
      raise DataError(
          f'{data_dir}: the manifests {list(manifests)} hold no utterances'
          + (f' of at most {max_duration} s' if max_duration else ''))
    self.num_samples = np.asarray([u.num_samples for u in self.utterances],
                                  np.int64)

  def audio(self, index: int) -> np.ndarray:
    u = self.utterances[index]
    x = librispeech.read_wav(u.path)
    if x.size > u.num_samples:
      raise DataError(f'{u.path}: {x.size} samples; its manifest says '
                      f'{u.num_samples}')
    return x


SYNTHETIC_LETTERS = 'abcdefghilmnorst'     # one tone each


class SyntheticClips:
  """Learnable speech: each letter of a transcript is a tone of its own
  pitch (300 Hz to 5 kHz, a fifth of an octave apart) with 5-15 ms pauses
  between letters, words are separated by 50-100 ms of silence, and
  transcripts are 1..max_words words of a fixed random
  lexicon. Utterance i of a seed is always the same; the training and
  evaluation sets take disjoint index ranges of one seed (`first`)."""

  def __init__(self, count: int, tokenizer, *, seed: int, first: int = 0,
               lexicon_size: int = 40, max_words: int = 3,
               letter_seconds: float = 0.09, noise: float = 0.01):
    lex_rng = np.random.default_rng([seed, 7])
    letters = np.asarray(list(SYNTHETIC_LETTERS))
    self.lexicon = []
    while len(self.lexicon) < lexicon_size:
      word = ''.join(lex_rng.choice(letters, lex_rng.integers(2, 5)))
      # No letter twice in a row (two equal tones would blur into one).
      if all(a != b for a, b in zip(word, word[1:])):
        self.lexicon.append(word)
    self.pitch = dict(zip(SYNTHETIC_LETTERS, 300.0 * (5000 / 300) ** (
        np.arange(len(SYNTHETIC_LETTERS)) / (len(SYNTHETIC_LETTERS) - 1))))
    self.seed, self.first = seed, first
    self.letter_seconds, self.noise = letter_seconds, noise
    self.texts, self.labels, self.plans = [], [], []
    sizes = []
    for i in range(count):
      rng = np.random.default_rng([seed, 11, first + i])
      words = [self.lexicon[k] for k in rng.integers(0, lexicon_size,
                                                     rng.integers(1, max_words + 1))]
      text = ' '.join(words)
      # (pitch or 0 for a gap, samples) segments; lead and tail silence.
      plan = [(0.0, int(rng.integers(800, 2400)))]
      for w, word in enumerate(words):
        if w:
          plan.append((0.0, int(rng.integers(800, 1600))))
        for k, ch in enumerate(word):
          if k:
            plan.append((0.0, int(rng.integers(80, 240))))
          n = int(letter_seconds * audio.SAMPLE_RATE * rng.uniform(0.8, 1.25))
          plan.append((self.pitch[ch], n))
      plan.append((0.0, int(rng.integers(800, 2400))))
      self.texts.append(text)
      self.labels.append(np.asarray(tokenizer.encode(text), np.int32))
      self.plans.append(plan)
      sizes.append(sum(n for _, n in plan))
    self.num_samples = np.asarray(sizes, np.int64)

  def audio(self, index: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, 13, self.first + index])
    parts = []
    for pitch, n in self.plans[index]:
      if pitch:
        t = np.arange(n) / audio.SAMPLE_RATE
        ramp = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.005)
        phase = rng.uniform(0, 2 * np.pi)
        parts.append(rng.uniform(0.3, 0.8) * ramp
                     * np.sin(2 * np.pi * pitch * t + phase))
      else:
        parts.append(np.zeros(n))
    x = np.concatenate(parts)
    x += self.noise * rng.standard_normal(x.size)
    return x.astype(np.float32)
