"""LibriSpeech: manifests, WAVs, transcripts, augmentation, batching."""

from __future__ import annotations

import json
import math
import os
import wave

import numpy as np
import pytest

from jaxperf.data import librispeech as ls
from jaxperf.errors import DataError

SR = ls.SAMPLE_RATE
SP_TEXT = [
    'he hoped there would be stew for dinner',
    'turnips and carrots and bruised potatoes and fat mutton pieces',
    "it's a quick brown fox that jumps over the lazy dog",
    'speech recognition with a transducer',
    'abcdefghijklmnopqrstuvwxyz',
]


def _tone(freq, seconds, amplitude=0.5, sample_rate=SR):
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  return amplitude * np.sin(2 * np.pi * freq * t)


def _peak_hz(x, sample_rate=SR):
  spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.fft.rfftfreq(len(x), 1 / sample_rate)[spectrum.argmax()]


@pytest.fixture
def tiny(tmp_path):
  """A train manifest of 3 utterances (0.5, 1.0, 1.5 s) and its directory."""
  entries = [
      ('train-clean-100-wav/1/2/1-2-0000.wav', 'he hoped there would be stew',
       _tone(440, 0.5)),
      ('train-clean-100-wav/1/2/1-2-0001.wav', "it's stew", _tone(880, 1.0)),
      ('train-clean-100-wav/3/4/3-4-0000.wav', 'for dinner', _tone(220, 1.5)),
  ]
  ls.write_manifest(str(tmp_path), 'librispeech-train-clean-100-wav.json',
                    entries)
  return tmp_path, entries


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  """A tiny sentencepiece model trained as the reference trains its
  tokenizer (scripts/create_sentencepieces.sh's options)."""
  path = str(tmp_path_factory.mktemp('sp') / 'tiny.model')
  tok = ls.train_tokenizer(SP_TEXT * 20, path, vocab_size=48)
  assert tok.num_labels == 48
  return path


# ---------------------------------------------------------------- manifests


def test_manifest_format_and_round_trip(tiny):
  path, entries = tiny
  with open(path / 'librispeech-train-clean-100-wav.json') as f:
    raw = json.load(f)
  assert list(raw[0]) == ['transcript', 'files', 'original_duration',
                          'original_num_samples']
  assert raw[0]['files'][0]['fname'] == entries[0][0]
  assert raw[0]['files'][0]['speed'] == 1
  assert set(raw[0]['files'][0]) >= {'channels', 'sample_rate', 'bitdepth',
                                     'duration', 'num_samples', 'fname'}

  utts = ls.read_manifests(str(path), ['librispeech-train-clean-100-wav.json'])
  assert [u.transcript for u in utts] == [e[1] for e in entries]
  assert [u.num_samples for u in utts] == [len(e[2]) for e in entries]
  assert [u.duration for u in utts] == [0.5, 1.0, 1.5]
  for u, (fname, _, audio) in zip(utts, entries):
    assert os.path.isabs(u.path)
    assert u.path == os.path.abspath(os.path.join(path, fname))
    np.testing.assert_allclose(ls.read_wav(u.path), audio, atol=1 / 32768)


def test_duration_filter_is_inclusive(tiny):
  path, _ = tiny
  name = ['librispeech-train-clean-100-wav.json']
  assert [u.duration for u in ls.read_manifests(str(path), name,
                                                max_duration=1.0)] == [0.5, 1.0]
  assert len(ls.read_manifests(str(path), name, max_duration=0.99)) == 1
  with pytest.raises(DataError, match=r'no utterances of at most 0\.1 s'):
    ls.read_manifests(str(path), name, max_duration=0.1)


def test_multiple_manifests_and_absolute_names(tiny):
  path, _ = tiny
  ls.write_manifest(str(path), 'dev.json',
                    [('dev-clean-wav/5/6/5-6-0000.wav', 'x', _tone(100, 0.25))])
  utts = ls.read_manifests(str(path), ['librispeech-train-clean-100-wav.json',
                                       str(path / 'dev.json')])
  assert [u.duration for u in utts] == [0.5, 1.0, 1.5, 0.25]


def test_missing_manifest(tmp_path):
  with pytest.raises(DataError,
                     match=r'manifest .*nope\.json does not exist'):
    ls.read_manifests(str(tmp_path), ['nope.json'])


def test_manifest_not_json(tmp_path):
  (tmp_path / 'bad.json').write_text('[{"transcript": ')
  with pytest.raises(DataError,
                     match=r'manifest .*bad\.json is not valid JSON'):
    ls.read_manifests(str(tmp_path), ['bad.json'])


def test_manifest_entry_missing_field(tiny):
  path, _ = tiny
  name = path / 'librispeech-train-clean-100-wav.json'
  raw = json.loads(name.read_text())
  del raw[1]['original_duration']
  name.write_text(json.dumps(raw))
  with pytest.raises(DataError, match=r"train-clean-100-wav\.json: entry 1 has "
                     r"no 'original_duration' field"):
    ls.read_manifests(str(path), [name.name])


def test_manifest_missing_wav(tiny):
  path, entries = tiny
  os.remove(path / entries[2][0])
  with pytest.raises(DataError, match=r'train-clean-100-wav\.json: entry 2 '
                     r'refers to .*3-4-0000\.wav, which does not exist'):
    ls.read_manifests(str(path), ['librispeech-train-clean-100-wav.json'])
  # A filtered-out utterance is not looked at.
  assert len(ls.read_manifests(str(path),
                               ['librispeech-train-clean-100-wav.json'],
                               max_duration=1.0)) == 2


# ---------------------------------------------------------------- WAV files


def test_wav_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  audio = np.concatenate([rng.uniform(-1, 1, 1000), [-1.0, 1.0, 0.0]])
  ls.write_wav(str(tmp_path / 'a' / 'x.wav'), audio)
  back = ls.read_wav(str(tmp_path / 'a' / 'x.wav'))
  assert back.dtype == np.float32 and back.shape == audio.shape
  assert np.max(np.abs(back - audio)) <= 1 / 32768
  assert back.min() >= -1 and back.max() < 1


def test_wav_wrong_sample_rate(tmp_path):
  ls.write_wav(str(tmp_path / 'x.wav'), _tone(440, 0.1, sample_rate=8000),
               8000)
  with pytest.raises(DataError, match=r'x\.wav has sample rate 8000 Hz; '
                     r'expected 16000'):
    ls.read_wav(str(tmp_path / 'x.wav'))


def test_wav_stereo(tmp_path):
  with wave.open(str(tmp_path / 's.wav'), 'wb') as w:
    w.setnchannels(2)
    w.setsampwidth(2)
    w.setframerate(SR)
    w.writeframes(np.zeros(200, '<i2').tobytes())
  with pytest.raises(DataError, match=r's\.wav has 2 channels; expected 1'):
    ls.read_wav(str(tmp_path / 's.wav'))


def test_wav_not_16_bit(tmp_path):
  with wave.open(str(tmp_path / 'b.wav'), 'wb') as w:
    w.setnchannels(1)
    w.setsampwidth(1)
    w.setframerate(SR)
    w.writeframes(bytes(100))
  with pytest.raises(DataError, match=r'b\.wav has 8-bit samples; '
                     'expected 16-bit PCM'):
    ls.read_wav(str(tmp_path / 'b.wav'))


def test_wav_missing_or_garbage(tmp_path):
  with pytest.raises(DataError, match=r'WAV file .*none\.wav does not exist'):
    ls.read_wav(str(tmp_path / 'none.wav'))
  (tmp_path / 'g.wav').write_bytes(b'not a wav at all')
  with pytest.raises(DataError, match=r'g\.wav is not a WAV file'):
    ls.read_wav(str(tmp_path / 'g.wav'))


# -------------------------------------------------------------- transcripts


def test_normalize_transcript():
  assert ls.normalize_transcript('  HE Hoped\tthere\n  would ') == \
      'he hoped there would'
  assert ls.normalize_transcript("IT'S") == "it's"
  with pytest.raises(ValueError, match=r"characters outside the tokenizer's "
                     r"labels: 'é'"):
    ls.normalize_transcript('héllo')
  with pytest.raises(ValueError, match=r"labels: '9'"):
    ls.normalize_transcript('room 9')
  with pytest.raises(ValueError, match=r"labels: ',\.'"):
    ls.normalize_transcript('yes, sir.')


def test_tokenizer_round_trip(sp_model):
  tok = ls.Tokenizer(sp_model)
  assert tok.num_labels == 48
  for text in SP_TEXT:
    ids = tok.encode(text.upper())
    assert ids and all(0 < i < tok.num_labels for i in ids)
    assert tok.decode(ids) == text
  assert tok.decode(tok.encode('  Stew   FOR dinner ')) == 'stew for dinner'
  with pytest.raises(ValueError, match=r"outside the tokenizer's labels: '9'"):
    tok.encode('stew 9')


def test_tokenizer_bad_model(tmp_path):
  with pytest.raises(DataError, match=r'sentencepiece model .*x\.model does '
                     'not exist'):
    ls.Tokenizer(str(tmp_path / 'x.model'))
  (tmp_path / 'y.model').write_bytes(b'garbage')
  with pytest.raises(DataError, match=r'y\.model is not a sentencepiece model'):
    ls.Tokenizer(str(tmp_path / 'y.model'))


def test_char_tokenizer():
  tok = ls.CharTokenizer()
  assert tok.num_labels == 28
  ids = tok.encode("It's  A dog")
  assert ids == [ls.LABELS.index(c) for c in "it's a dog"]
  assert tok.decode(ids) == "it's a dog"
  with pytest.raises(ValueError, match=r"labels: 'é'"):
    tok.encode('café')


def test_manifest_transcript_outside_labels(tmp_path):
  """The caller's wrapping of the ValueError names the manifest."""
  ls.write_manifest(str(tmp_path), 'm.json',
                    [('w/a.wav', 'héllo', _tone(440, 0.1))])
  utt, = ls.read_manifests(str(tmp_path), ['m.json'])
  with pytest.raises(ValueError, match=r"outside the tokenizer's labels: 'é'"):
    ls.CharTokenizer().encode(utt.transcript)


# ------------------------------------------------------------- augmentation


@pytest.mark.parametrize('rate', [0.85, 0.9, 1.1, 1.15])
def test_speed_perturb_length_and_pitch(rate):
  x = _tone(1000, 1.0)
  y = ls.speed_perturb(x, rate)
  # DALI resamples to rate * 16 kHz and keeps treating it as 16 kHz.
  assert len(y) == math.ceil(len(x) * rate - 1e-6)
  assert abs(_peak_hz(y) - 1000 / rate) < 2.0
  inner = slice(100, -100)
  assert np.sqrt(np.mean(y[inner] ** 2)) == pytest.approx(0.5 / np.sqrt(2),
                                                          rel=0.01)


def test_speed_perturb_identity_and_band_limit():
  x = np.random.default_rng(1).uniform(-0.5, 0.5, 4000)
  np.testing.assert_allclose(ls.speed_perturb(x, 1.0), x, atol=1e-7)
  # A 7.5 kHz tone would land at 8.8 kHz, past Nyquist: it is removed, not
  # aliased.
  y = ls.speed_perturb(_tone(7500, 0.5), 0.85)
  assert np.sqrt(np.mean(y[200:-200] ** 2)) < 0.01


def test_trim_silence_to_tone():
  rng = np.random.default_rng(2)
  lead, body, tail = 5000, 8000, 7000
  x = np.concatenate([np.zeros(lead), _tone(300, body / SR), np.zeros(tail)])
  x = x + rng.normal(0, 1e-5, x.shape)          # about -90 dB below the tone
  begin, length = ls.nonsilent_region(x)
  end = begin + length
  assert lead - ls.SILENCE_WINDOW <= begin <= lead
  assert lead + body <= end <= lead + body + ls.SILENCE_WINDOW
  y = ls.trim_silence(x)
  np.testing.assert_array_equal(y, x[begin:end])
  # All zeros (and empty) come back unchanged.
  np.testing.assert_array_equal(ls.trim_silence(np.zeros(3000)),
                                np.zeros(3000))
  assert ls.trim_silence(np.zeros(0)).shape == (0,)
  # Shorter than a window: one window, all of it.
  short = _tone(300, 0.05)
  np.testing.assert_array_equal(ls.trim_silence(short), short)


def test_spec_augment_masks():
  num_t, num_f = 300, 80
  features = np.random.default_rng(3).normal(size=(num_t, num_f)) + 5.0
  max_time = int(round(250 * 0.03))              # 8
  for seed in range(30):
    out = ls.spec_augment(features, 250, np.random.default_rng(seed))
    assert out.shape == features.shape and out is not features
    changed = out != features
    assert np.all(out[changed] == 0)              # masked -> 0, rest unchanged
    cols = changed.all(axis=0)                     # masked frequency bands
    rows = changed.all(axis=1)                     # masked frames
    np.testing.assert_array_equal(changed, cols[None, :] | rows[:, None])
    assert cols.sum() <= 2 * 20 and rows.sum() <= 10 * max_time
  # One mask of each kind: its width is in bounds, and the bounds are reached.
  freq_widths, time_widths = set(), set()
  for seed in range(200):
    out = ls.spec_augment(features, 250, np.random.default_rng(seed),
                          freq_masks=1, time_masks=1)
    changed = out != features
    freq_widths.add(int(changed.all(axis=0).sum()))
    time_widths.add(int(changed.all(axis=1).sum()))
  assert freq_widths == set(range(21))
  assert time_widths == set(range(max_time + 1))
  # The width bound is adaptive: int(round(0.03 * valid frames)).
  for frames, bound in ((40, 1), (50, 2), (250, 8), (300, 9)):
    widths = set()
    for seed in range(40):
      out = ls.spec_augment(features, frames, np.random.default_rng(seed),
                            freq_masks=0, time_masks=1)
      widths.add(int((out != features).all(axis=1).sum()))
    assert widths == set(range(bound + 1)), frames


def test_spec_augment_draws():
  """Inclusive width bounds: every width in [min, max] is drawn."""
  features = np.ones((1000, 80))
  widths = set()
  for seed in range(40):
    out = ls.spec_augment(features, 1000, np.random.default_rng(seed),
                          freq_masks=1, min_freq=3, max_freq=5, time_masks=0)
    widths.add(int((out == 0).all(axis=0).sum()))
  assert widths == {3, 4, 5}
  out = ls.spec_augment(features, 1000, np.random.default_rng(0),
                        freq_masks=0, time_masks=0)
  np.testing.assert_array_equal(out, features)


# ----------------------------------------------------------------- batching


def _reference_one_epoch(durations, batch_size, num_buckets, rng):
  """common/data/dali/sampler.py's BucketingSampler for one epoch and one
  worker, restated."""
  order = np.argsort(durations, kind='stable')
  epoch = np.array([i for b in np.array_split(order, num_buckets)
                    for i in rng.permutation(b)])
  drop = len(epoch) % batch_size
  idx = rng.choice(len(epoch), drop, replace=False)
  epoch[idx] = -1
  batches = epoch[epoch != -1].reshape(-1, batch_size)
  rng.shuffle(batches, axis=0)
  return batches


def test_bucketing_batches():
  rng = np.random.default_rng(0)
  durations = rng.uniform(1, 17, 1003)
  batches = ls.bucketing_batches(durations, 16, 8, np.random.default_rng(7))
  assert len(batches) == 1003 // 16
  assert all(b.shape == (16,) for b in batches)
  flat = np.concatenate(batches)
  assert len(set(flat.tolist())) == len(flat) == 1003 // 16 * 16
  # Bucketed: a batch spans about one bucket (16 s / 8), not the whole range.
  spread = [np.ptp(durations[b]) for b in batches]
  assert np.mean(spread) < 2.5
  unbucketed = ls.bucketing_batches(durations, 16, 1,
                                    np.random.default_rng(7))
  assert np.mean([np.ptp(durations[b]) for b in unbucketed]) > 10
  # Deterministic for a seed, different for another.
  again = ls.bucketing_batches(durations, 16, 8, np.random.default_rng(7))
  assert all(np.array_equal(a, b) for a, b in zip(batches, again))
  other = ls.bucketing_batches(durations, 16, 8, np.random.default_rng(8))
  assert not all(np.array_equal(a, b) for a, b in zip(batches, other))
  # The reference's draws: same batches for the same generator state.
  ref = _reference_one_epoch(durations, 16, 8, np.random.default_rng(7))
  np.testing.assert_array_equal(np.stack(batches), ref)


def test_bucketing_remainder_and_edge_cases():
  durations = np.arange(10, dtype=float)
  # The 10 % 4 = 2 dropped utterances are random, not always the longest.
  dropped = set()
  for seed in range(20):
    batches = ls.bucketing_batches(durations, 4, 2, np.random.default_rng(seed))
    assert len(batches) == 2
    dropped |= set(range(10)) - set(np.concatenate(batches).tolist())
  assert len(dropped) > 4
  kept = ls.bucketing_batches(durations, 4, 2, np.random.default_rng(0),
                              drop_last=False)
  assert [len(b) for b in kept] == [4, 4, 2]
  assert sorted(np.concatenate(kept).tolist()) == list(range(10))
  # 0 buckets is one bucket; fewer utterances than a batch is no batch.
  zero = ls.bucketing_batches(durations, 5, 0, np.random.default_rng(3))
  one = ls.bucketing_batches(durations, 5, 1, np.random.default_rng(3))
  assert all(np.array_equal(a, b) for a, b in zip(zero, one))
  assert ls.bucketing_batches(durations, 11, 1, np.random.default_rng(0)) == []
  with pytest.raises(ValueError):
    ls.bucketing_batches(durations, 0, 1, np.random.default_rng(0))
