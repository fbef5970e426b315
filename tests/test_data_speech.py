"""RNN-T speech batches through the workload: a tiny LibriSpeech on disk
(the reference's manifests, WAVs and a sentencepiece model) and the
synthetic tone source."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxperf.config import load_config
from jaxperf.data import audio
from jaxperf.data import librispeech as ls
from jaxperf.data import speech
from jaxperf.errors import ConfigError, DataError
from jaxperf.workloads.rnnt import RNNT
from tests.batches import assert_batches_equal, take
from tests.test_data_librispeech import SP_TEXT

SR = ls.SAMPLE_RATE
SEED = 3
GBS = 4
EBS = 4
MAX_DURATION = 1.2
TRAIN_MANIFESTS = ['librispeech-train-clean-100-wav.json',
                   'librispeech-train-other-500-wav.json']
DEV_MANIFEST = 'librispeech-dev-clean-wav.json'
TOKENIZER = 'sentencepieces/tiny48.model'
VOCAB = 48
WORDS = ('he hoped there would be stew for dinner turnips and carrots '
         'bruised potatoes fat mutton pieces quick brown fox that jumps over '
         'the lazy dog speech recognition with a transducer').split()


def _utterance(rng, seconds, kind):
  """Noise everywhere (the silence trim keeps all of it) or a tone between
  silent stretches (the trim cuts them)."""
  n = int(round(seconds * SR))
  if kind == 'noise':
    return rng.uniform(-0.3, 0.3, n)
  lead = int(rng.integers(1000, 3000))
  tail = int(rng.integers(1000, 3000))
  t = np.arange(n - lead - tail) / SR
  tone = 0.4 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)
  return np.concatenate([np.zeros(lead), tone, np.zeros(tail)])


def _transcripts(rng, count, taken):
  out = []
  while len(out) < count:
    text = ' '.join(rng.choice(WORDS, int(rng.integers(1, 5))))
    if text not in taken:
      taken.add(text)
      out.append(text)
  return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """Two train manifests (15 + 13 utterances of 0.2-1.15 s, and one of
  1.4-1.5 s over max_duration in each), a dev manifest of 10 and a
  sentencepiece model trained with the reference's options. Transcripts are
  distinct, so a label row tells its utterance."""
  path = tmp_path_factory.mktemp('librispeech')
  ls.train_tokenizer(SP_TEXT * 20, str(path / TOKENIZER), vocab_size=VOCAB)
  rng = np.random.default_rng(0)
  taken = set()
  manifests = {}
  for m, (name, count) in enumerate(zip(TRAIN_MANIFESTS + [DEV_MANIFEST],
                                        (15, 13, 10))):
    split = name[len('librispeech-'):-len('-wav.json')]
    seconds = list(rng.uniform(0.2, 1.15, count))
    if m < 2:
      seconds[count // 2] = 1.4 + 0.1 * m          # over max_duration
    seconds[0] = 1.15                              # the longest kept: noise
    entries = []
    for i, (s, t) in enumerate(zip(seconds, _transcripts(rng, count, taken))):
      kind = 'noise' if i % 2 == 0 else 'tone'
      entries.append((f'{split}-wav/{m}/{i}/{m}-{i}-0000.wav', t,
                      _utterance(rng, s, kind)))
    ls.write_manifest(str(path), name, entries)
    manifests[name] = entries
  return path, manifests


@pytest.fixture
def opened():
  """opened(data_dir, seed=SEED, **overrides) -> (workload, train, eval),
  the datasets closed after the test."""
  datasets = []

  def open_(data_dir, seed=SEED, **overrides):
    overrides = {
        'num_classes': VOCAB + 1, 'train_manifests': TRAIN_MANIFESTS,
        'eval_manifests': [DEV_MANIFEST], 'tokenizer_model': TOKENIZER,
        'max_duration': MAX_DURATION, 'global_batch_size': GBS,
        'eval_batch_size': EBS, 'data_workers': 2, 'shape_buckets': 2,
        'eval_shape_buckets': 2, 'num_buckets': 2,
        'speed_perturbation': [0.85, 1.15], 'dither': 1e-5,
        'spec_augment_freq_masks': 0, 'spec_augment_time_masks': 0,
        **overrides}
    w = RNNT(load_config('rnnt', 'smoke', overrides=overrides))
    train, evals = w.datasets(None if data_dir is None else str(data_dir),
                              seed)
    datasets.extend([train, evals])
    return w, train, evals

  yield open_
  for ds in datasets:
    ds.close()


def _kept(manifests):
  """(transcript, audio as read back) of the training utterances kept, in
  manifest order."""
  out = []
  for name in TRAIN_MANIFESTS:
    for _, t, x in manifests[name]:
      if len(x) / SR <= MAX_DURATION:
        out.append((t, x))
  return out


def _check_specs(batch, specs):
  """The batch's arrays match one of `specs` (shape past the batch axis,
  dtype)."""
  for spec in specs:
    if batch.keys() == spec.keys() and all(
        batch[k].shape[1:] == spec[k].shape[1:]
        and batch[k].dtype == np.dtype(spec[k].dtype) for k in spec):
      return spec
  raise AssertionError(
      f'batch {({k: (v.shape, v.dtype) for k, v in batch.items()})} matches '
      f'none of the specs')


def _check_rows(batch, tokenizer):
  """Label rows are the encoded transcripts, zero-padded; features zero past
  each length. Returns the utterances' transcripts (decoded)."""
  texts = []
  frames = batch['features'].shape[1]
  for row in range(batch['labels'].shape[0]):
    n = int(batch['label_lengths'][row])
    labels = batch['labels'][row]
    assert n > 0 and not labels[n:].any()
    text = tokenizer.decode(labels[:n].tolist())
    assert tokenizer.encode(text) == labels[:n].tolist()
    length = int(batch['feature_lengths'][row])
    assert 0 < length <= frames
    assert not batch['features'][row, length:].any()
    texts.append(text)
  return texts


def _row_of(batch, row):
  return {k: v[row] for k, v in batch.items()}


# ----------------------------------------------------------------- training


def test_train_batches(tiny, opened):
  path, manifests = tiny
  w, train, _ = opened(path)
  kept = _kept(manifests)
  assert train.num_examples == len(kept) == 26
  assert train.steps_per_epoch(GBS) == 26 // GBS == 6
  specs = w.batch_specs(GBS, train=True)
  assert len(specs) == 2
  lo, hi = 0.85, 1.15
  by_text = {t: x for t, x in kept}
  over = {t for name in TRAIN_MANIFESTS for _, t, x in manifests[name]
          if len(x) / SR > MAX_DURATION}
  assert len(over) == 2
  batches = take(train.train_batches(0, GBS), 12)
  used = set()
  for step, batch in enumerate(batches):
    _check_specs(batch, specs)
    texts = _check_rows(batch, w.tokenizer)
    assert not set(texts) & over
    for row, text in enumerate(texts):
      n = len(by_text[text])
      length = int(batch['feature_lengths'][row])
      assert length <= speech.spliced_frames(
          ls.speed_perturbed_length(n, hi))
      # SpecAugment is off: no zero in the valid frames' own 80 features.
      assert np.all(batch['features'][row, :length, :audio.N_MELS] != 0)
      if by_text[text][0] != 0:          # noise: the trim keeps it all
        assert length >= speech.spliced_frames(
            ls.speed_perturbed_length(n, lo))
    if step % 6 == 0:
      used = set()
    assert not used & set(texts), 'an utterance twice in an epoch'
    used |= set(texts)
    if step % 6 == 5:
      assert len(used) == 24
  # The rows are the sampler's batches.
  index = {tuple(l.tolist()): u for u, l in enumerate(train.clips.labels)}
  for step, batch in enumerate(batches):
    epoch, i = divmod(step, 6)
    rows = [index[tuple(batch['labels'][r, :batch['label_lengths'][r]]
                        .tolist())] for r in range(GBS)]
    assert rows == train.epoch_batches(epoch, GBS)[i].tolist()


def test_train_features_exact_without_augmentation(tiny, opened):
  """Without speed perturbation, SpecAugment and dither, a row is the
  utterance's trimmed audio's features."""
  path, _ = tiny
  w, train, _ = opened(path, speed_perturbation=None, dither=0.0)
  aug = speech.Augmentation(speed=None, dither=0.0)
  for step, batch in enumerate(take(train.train_batches(0, GBS), 6)):
    _check_specs(batch, w.batch_specs(GBS, train=True))
    for row, u in enumerate(train.epoch_batches(0, GBS)[step]):
      x = ls.read_wav(train.clips.utterances[u].path)
      assert x.size == train.clips.num_samples[u]
      length = int(batch['feature_lengths'][row])
      assert length == speech.spliced_frames(ls.trim_silence(x).size)
      want = speech.utterance_features(x, np.random.default_rng(0),
                                       augment=aug, train=True)
      np.testing.assert_allclose(batch['features'][row, :length], want,
                                 rtol=1e-6, atol=1e-6)
      n = int(batch['label_lengths'][row])
      assert n == len(train.clips.labels[u])
      assert batch['labels'][row, :n].tolist() == w.tokenizer.encode(
          train.clips.utterances[u].transcript)


@pytest.mark.parametrize('rates', [(1.25, 1.3), (0.7, 0.75)])
def test_frame_ceilings_hold_every_rate(tiny, opened, rates):
  """The shape buckets hold every utterance at either end of the speed
  range (faster rates give longer audio)."""
  path, _ = tiny
  w, train, _ = opened(path, speed_perturbation=list(rates))
  hi = max(rates)
  need = speech.spliced_frames(
      [ls.speed_perturbed_length(int(n), hi) for n in train.clips.num_samples])
  assert np.all(train.frame_bounds >= need)
  for batch in take(train.train_batches(0, GBS), 6):
    _check_specs(batch, w.batch_specs(GBS, train=True))
    assert np.all(batch['feature_lengths'] <= batch['features'].shape[1])


def test_resume_from_any_step(tiny, opened):
  path, _ = tiny
  _, train, _ = opened(path)
  stream = take(train.train_batches(0, GBS), 9)
  for k in (1, 5, 6, 8):
    assert_batches_equal(take(train.train_batches(k, GBS), 1), stream[k:k + 1])
  # Across the epoch boundary, and from a fresh dataset of the same seed.
  _, again, _ = opened(path)
  assert_batches_equal(take(again.train_batches(4, GBS), 4), stream[4:8])
  _, other, _ = opened(path, seed=SEED + 1)
  different = take(other.train_batches(0, GBS), 1)[0]
  assert not (different['features'].shape == stream[0]['features'].shape
              and np.array_equal(different['features'], stream[0]['features']))


def test_processes_split_the_global_batch(tiny, opened):
  path, _ = tiny
  w, train, _ = opened(path)
  whole = take(train.train_batches(2, GBS), 6)
  parts = [take(train.train_batches(2, GBS, process_index=p, process_count=2),
                6) for p in range(2)]
  for step, batch in enumerate(whole):
    for p in range(2):
      _check_specs(parts[p][step], w.batch_specs(GBS // 2, train=True))
    joined = {k: np.concatenate([parts[0][step][k], parts[1][step][k]])
              for k in batch}
    assert_batches_equal([joined], [batch])
  with pytest.raises(ConfigError, match='does not split over 3 processes'):
    train.train_batches(0, GBS, process_index=0, process_count=3)


def test_gradient_accumulation_micro_batches(tiny, opened):
  """Row r of a step is in its micro-batch r % n, and micro-batch j is the
  sampler's batch of (global batch / n) utterances."""
  path, _ = tiny
  n = 2
  w, train, _ = opened(path, gradient_accumulation_steps=n)
  micro = GBS // n
  assert train.accumulation == n
  assert train.steps_per_epoch(GBS) == 26 // micro // n == 6
  index = {tuple(l.tolist()): u for u, l in enumerate(train.clips.labels)}
  for step, batch in enumerate(take(train.train_batches(0, GBS), 8)):
    _check_specs(batch, w.batch_specs(GBS, train=True))
    epoch, i = divmod(step, 6)
    sampler = train.epoch_batches(epoch, micro)
    assert len(sampler) == 26 // micro
    rows = [index[tuple(batch['labels'][r, :batch['label_lengths'][r]]
                        .tolist())] for r in range(GBS)]
    for j in range(n):
      assert rows[j::n] == sampler[i * n + j].tolist()


# --------------------------------------------------------------- evaluation


def test_eval_batches(tiny, opened):
  path, manifests = tiny
  w, _, evals = opened(path)
  dev = manifests[DEV_MANIFEST]
  assert evals.num_examples == len(dev) == 10
  specs = w.batch_specs(EBS, train=False)
  batches = list(evals.eval_batches(EBS))
  assert len(batches) == 3
  seen = []
  for batch in batches:
    _check_specs(batch, specs)
    for row in range(EBS):
      u = int(batch['index'][row])
      assert bool(batch['mask'][row]) == (u >= 0)
      if u < 0:
        assert not batch['features'][row].any()
        assert not batch['labels'][row].any()
        assert batch['feature_lengths'][row] == batch['label_lengths'][row] == 0
        continue
      seen.append(u)
      length = int(batch['feature_lengths'][row])
      _check_rows({k: batch[k][row:row + 1] for k in batch}, w.tokenizer)
      # No speed perturbation: the trimmed audio's length.
      x = ls.read_wav(evals.clips.utterances[u].path)
      assert length == speech.spliced_frames(ls.trim_silence(x).size)
      # No SpecAugment: no zero in the valid frames' own 80 features.
      assert np.all(batch['features'][row, :length, :audio.N_MELS] != 0)
      n = int(batch['label_lengths'][row])
      assert batch['labels'][row, :n].tolist() == w.tokenizer.encode(dev[u][1])
  assert sorted(seen) == list(range(10))
  assert [int(b['mask'].sum()) for b in batches] == [4, 4, 2]
  # Ordered by length.
  assert np.all(np.diff(evals.frame_bounds[seen]) >= 0)
  # Deterministic: again, and from a fresh dataset of the same seed.
  assert_batches_equal(list(evals.eval_batches(EBS)), batches)
  _, _, again = opened(path)
  assert_batches_equal(list(again.eval_batches(EBS)), batches)
  # Two processes: halves of the same batches.
  parts = [list(evals.eval_batches(EBS, process_index=p, process_count=2))
           for p in range(2)]
  for i, batch in enumerate(batches):
    assert_batches_equal(
        [{k: np.concatenate([parts[0][i][k], parts[1][i][k]]) for k in batch}],
        [batch])


# ------------------------------------------------------------- augmentation


def test_speed_perturbation_varies_by_epoch(tiny, opened):
  path, _ = tiny
  _, train, _ = opened(path)
  index = {tuple(l.tolist()): u for u, l in enumerate(train.clips.labels)}
  lengths = [{}, {}]
  for step, batch in enumerate(take(train.train_batches(0, GBS), 12)):
    for r in range(GBS):
      u = index[tuple(batch['labels'][r, :batch['label_lengths'][r]].tolist())]
      lengths[step // 6][u] = int(batch['feature_lengths'][r])
  both = set(lengths[0]) & set(lengths[1])
  assert both
  assert any(lengths[0][u] != lengths[1][u] for u in both)


def test_spec_augment_masks_training_features(tiny, opened):
  path, _ = tiny
  _, train, evals = opened(path, spec_augment_freq_masks=2,
                           spec_augment_time_masks=10)
  masked = 0
  for batch in take(train.train_batches(0, GBS), 6):
    for r in range(GBS):
      length = int(batch['feature_lengths'][r])
      own = batch['features'][r, :length, :audio.N_MELS]   # frames 3t
      if (own == 0).all(axis=0).any() or (own == 0).all(axis=1).any():
        masked += 1
  assert masked > 0
  # Evaluation has none.
  for batch in evals.eval_batches(EBS):
    for r in np.flatnonzero(batch['mask']):
      length = int(batch['feature_lengths'][r])
      assert np.all(batch['features'][r, :length, :audio.N_MELS] != 0)


# ---------------------------------------------------------------- bad input


def test_missing_wav(tiny, opened):
  path, _ = tiny
  # 'empty' in the name: the message must still come through.
  name = 'librispeech-empty-wav.json'
  ls.write_manifest(str(path), name, [
      ('empty-wav/1/1/1-1-0000.wav', 'stew for dinner', np.zeros(4000)),
      ('empty-wav/1/1/1-1-0001.wav', 'the lazy dog', np.zeros(4000))])
  os.remove(path / 'empty-wav/1/1/1-1-0001.wav')
  with pytest.raises(DataError, match=r'librispeech-empty-wav\.json: entry 1 '
                     r'refers to .*1-1-0001\.wav, which does not exist'):
    opened(path, train_manifests=TRAIN_MANIFESTS + [name])


def test_wrong_sample_rate(tiny, opened):
  path, _ = tiny
  rng = np.random.default_rng(5)
  name = 'librispeech-dev-8k-wav.json'
  ls.write_manifest(str(path), name, [
      (f'dev-8k-wav/2/2/2-2-{i:04d}.wav', t, _utterance(rng, 0.5, 'noise'))
      for i, t in enumerate(['stew', 'fat mutton', 'brown fox'])])
  ls.write_wav(str(path / 'dev-8k-wav/2/2/2-2-0001.wav'),
               rng.uniform(-0.3, 0.3, 4000), 8000)
  _, _, evals = opened(path, eval_manifests=[name])
  with pytest.raises(DataError, match=r'2-2-0001\.wav has sample rate 8000 '
                     r'Hz; expected 16000'):
    list(evals.eval_batches(EBS))


@pytest.mark.parametrize('text, bad', [('caf\u00e9 au lait', "'\u00e9'"),
                                       ('room 42', "'24'")])
def test_transcript_outside_tokenizer(tiny, opened, text, bad):
  path, _ = tiny
  name = f'librispeech-bad-{len(text)}-wav.json'
  ls.write_manifest(str(path), name, [
      (f'bad-{len(text)}-wav/3/3/3-3-0000.wav', 'stew', np.zeros(4000)),
      (f'bad-{len(text)}-wav/3/3/3-3-0001.wav', text, np.zeros(4000))])
  with pytest.raises(DataError, match=(
      rf"{name.replace('.', r'[.]')}: .*3-3-0001\.wav: transcript .* has "
      rf"characters outside the tokenizer's labels: {bad}")):
    opened(path, eval_manifests=[name])


def test_missing_tokenizer(tiny, opened):
  path, _ = tiny
  with pytest.raises(DataError, match=r'sentencepiece model .*sentencepieces/'
                     r'nope\.model does not exist'):
    opened(path, tokenizer_model='sentencepieces/nope.model')


def test_num_classes_must_match_tokenizer(tiny, opened):
  path, _ = tiny
  with pytest.raises(ConfigError, match=(
      rf'num_classes=29: the tokenizer has {VOCAB} labels, so the model '
      rf'needs {VOCAB + 1} classes')):
    opened(path, num_classes=29)


def test_missing_data_dir(tmp_path, opened):
  with pytest.raises(DataError, match=r'--data-dir .*nowhere: not a '
                     'directory'):
    opened(tmp_path / 'nowhere')


# ---------------------------------------------------------------- synthetic


def test_synthetic_source(opened):
  w, train, evals = opened(None, num_classes=29, synthetic_train_samples=12,
                           synthetic_eval_samples=6,
                           speed_perturbation=None)
  tok = ls.CharTokenizer()
  assert isinstance(w.tokenizer, ls.CharTokenizer)
  clips, eclips = train.clips, evals.clips
  assert isinstance(clips, speech.SyntheticClips)
  assert len(clips.texts) == 12 and len(eclips.texts) == 6
  for c in (clips, eclips):
    for i, text in enumerate(c.texts):
      words = text.split(' ')
      assert all(word in c.lexicon for word in words)
      assert all(a != b for word in words for a, b in zip(word, word[1:]))
      assert set(text) <= set(speech.SYNTHETIC_LETTERS + ' ')
      assert c.labels[i].dtype == np.int32
      assert c.labels[i].tolist() == tok.encode(text)
      x = c.audio(i)
      assert x.dtype == np.float32 and x.shape == (c.num_samples[i],)
      np.testing.assert_array_equal(c.audio(i), x)
  # The same index of a seed is the same utterance; evaluation takes the
  # indices after training's.
  longer = speech.SyntheticClips(18, tok, seed=SEED)
  np.testing.assert_array_equal(longer.audio(3), clips.audio(3))
  assert longer.texts[:12] == clips.texts and longer.texts[12:] == eclips.texts
  np.testing.assert_array_equal(longer.audio(12), eclips.audio(0))
  assert eclips.texts != clips.texts[:6]
  assert not np.array_equal(eclips.audio(0)[:1000], clips.audio(0)[:1000])
  other = speech.SyntheticClips(12, tok, seed=SEED + 1)
  assert other.texts != clips.texts
  # Batches of it.
  for batch in take(train.train_batches(0, GBS), 3):
    _check_specs(batch, w.batch_specs(GBS, train=True))
    _check_rows(batch, tok)
  for batch in evals.eval_batches(EBS):
    _check_specs(batch, w.batch_specs(EBS, train=False))
