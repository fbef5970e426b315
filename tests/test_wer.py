"""jaxperf.metrics.wer against jiwer: random transcripts and edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from jaxperf import metrics

jiwer = pytest.importorskip('jiwer')


def test_random_corpora_match_jiwer():
  rng = np.random.default_rng(0)
  vocab = ['a', 'b', 'c', 'the', 'cat', "it's", 'sat']
  for _ in range(300):
    n = int(rng.integers(1, 6))
    refs = [' '.join(rng.choice(vocab, rng.integers(1, 12)))
            for _ in range(n)]
    hyps = [' '.join(rng.choice(vocab, rng.integers(0, 12)))
            for _ in range(n)]
    assert metrics.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps),
                                                    abs=1e-12)


def test_edits_and_edge_cases():
  assert metrics.word_edits('the cat sat', 'the cat sat') == 0
  assert metrics.word_edits('the cat sat', 'the sat') == 1          # deletion
  assert metrics.word_edits('the cat sat', 'the cat sat down') == 1  # insertion
  assert metrics.word_edits('the cat sat', 'a cat sit') == 2        # 2 subs
  assert metrics.word_edits('a b c d', '') == 4
  assert metrics.word_edits('', 'a b') == 2
  assert metrics.word_edits(['a', 'b'], ['b', 'a']) == 2
  # Whitespace of any kind separates words.
  assert metrics.wer(['the  cat\tsat '], ['the cat sat']) == 0.0
  # Corpus-level: summed edits over summed words, not a mean of rates.
  refs, hyps = ['a b c d', 'e'], ['a b c d', 'f']
  assert metrics.wer(refs, hyps) == pytest.approx(1 / 5)
  assert metrics.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
  with pytest.raises(ValueError, match='2 references but 1 hypotheses'):
    metrics.wer(refs, hyps[:1])
  with pytest.raises(ValueError, match='no words'):
    metrics.wer([''], ['a'])


def test_long_transcripts():
  """LibriSpeech-length utterances (up to ~100 words): the vectorised rows
  agree with jiwer."""
  rng = np.random.default_rng(1)
  vocab = [f'w{i}' for i in range(40)]
  refs = [' '.join(rng.choice(vocab, 100)) for _ in range(20)]
  hyps = []
  for r in refs:
    words = r.split()
    for _ in range(15):
      k = int(rng.integers(len(words)))
      op = rng.integers(3)
      if op == 0:
        words[k] = str(rng.choice(vocab))
      elif op == 1 and len(words) > 1:
        del words[k]
      else:
        words.insert(k, str(rng.choice(vocab)))
    hyps.append(' '.join(words))
  assert metrics.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps),
                                                  abs=1e-12)
