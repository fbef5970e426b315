"""Word error rate (RNN-T, LibriSpeech; MLPerf target WER 0.058).

As the reference scores its transcripts (word-level Levenshtein distance,
as jiwer's `wer` over a corpus): each reference and hypothesis is split
into words on whitespace, and

    WER = (substitutions + deletions + insertions) / reference words

summed over all utterances before dividing (not a mean of per-utterance
rates), with the fewest edits that turn each reference into its
hypothesis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def word_edits(reference: str | Sequence[str], hypothesis: str | Sequence[str]
               ) -> int:
  """Levenshtein distance between two word sequences (strings are split on
  whitespace): the fewest substitutions, deletions and insertions."""
  ref = reference.split() if isinstance(reference, str) else list(reference)
  hyp = (hypothesis.split() if isinstance(hypothesis, str)
         else list(hypothesis))
  if not ref or not hyp:
    return max(len(ref), len(hyp))
  # One row of the edit-distance table at a time, vectorised over the
  # hypothesis; the insertions within a row are a running minimum.
  hyp_ids = {w: i for i, w in enumerate(dict.fromkeys(hyp))}
  hyp_arr = np.asarray([hyp_ids[w] for w in hyp])
  prev = np.arange(len(hyp) + 1)
  offsets = np.arange(len(hyp) + 1)
  for i, word in enumerate(ref, start=1):
    same = hyp_arr == hyp_ids.get(word, -1)
    diag = prev[:-1] + ~same                    # substitution or match
    up = prev[1:] + 1                           # deletion
    cur = np.empty_like(prev)
    cur[0] = i
    cur[1:] = np.minimum(diag, up)
    # Insertions: cur[j] = min(cur[j], cur[j - 1] + 1), as a running
    # minimum of cur[k] - k, plus j.
    cur = np.minimum.accumulate(cur - offsets) + offsets
    prev = cur
  return int(prev[-1])


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
  """Corpus word error rate of transcripts: the summed word edits over the
  summed reference words.

  Raises:
    ValueError: the lists differ in length, or the references hold no
      words at all (the rate is undefined).
  """
  references, hypotheses = list(references), list(hypotheses)
  if len(references) != len(hypotheses):
    raise ValueError(f'{len(references)} references but {len(hypotheses)} '
                     f'hypotheses')
  words = sum(len(r.split()) for r in references)
  if words == 0:
    raise ValueError('the references hold no words: WER is undefined')
  edits = sum(word_edits(r, h) for r, h in zip(references, hypotheses))
  return edits / words
