"""metrics.auc against sklearn.metrics.roc_auc_score, and its input errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jaxperf import metrics

TOL = 1e-12


def assert_matches_sklearn(scores, labels, sample_weight=None):
  """Asserts auc equals scikit-learn's value; returns it."""
  got = metrics.auc(scores, labels, sample_weight=sample_weight)
  want = roc_auc_score(np.asarray(labels), np.asarray(scores),
                       sample_weight=sample_weight)
  assert isinstance(got, float)
  assert abs(got - want) <= TOL, (got, want)
  return got


def noisy_labels(rng, scores, positive_rate=0.5):
  """Labels correlated with the scores, so the AUC is away from 0.5."""
  logits = (scores - scores.mean()) / (scores.std() + 1e-12)
  p = 1 / (1 + np.exp(-(logits + np.log(positive_rate / (1 - positive_rate)))))
  labels = (rng.random(scores.size) < p).astype(np.int64)
  labels[:2] = [0, 1]  # Both classes present.
  return labels


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_random_continuous(seed, dtype):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=5000).astype(dtype)
  labels = noisy_labels(rng, scores)
  value = assert_matches_sklearn(scores, labels)
  assert 0.6 < value < 0.9


@pytest.mark.parametrize('levels', [1, 2, 3, 7, 50])
def test_heavy_ties(levels):
  rng = np.random.default_rng(levels)
  raw = rng.random(4000)
  scores = np.floor(raw * levels) / levels
  assert np.unique(scores).size == levels
  labels = noisy_labels(rng, raw)
  value = assert_matches_sklearn(scores, labels)
  if levels == 1:
    assert value == 0.5


def test_all_equal_scores_give_one_half():
  labels = np.array([0, 1, 1, 0, 1, 0, 0])
  assert metrics.auc(np.full(7, 0.3, np.float32), labels) == 0.5
  assert metrics.auc(np.full(7, 0.3), labels, np.arange(1.0, 8.0)) == 0.5


def test_tie_between_positive_and_negative_counts_half():
  # Pairs (positive, negative): (0.8, 0.2) wins, (0.8, 0.8) ties, (0.2, 0.2)
  # ties, (0.2, 0.8) loses: (1 + 1/2 + 1/2 + 0) / 4.
  scores = np.array([0.8, 0.2, 0.8, 0.2])
  labels = np.array([1, 1, 0, 0])
  assert metrics.auc(scores, labels) == 0.5
  assert metrics.auc(np.array([0.8, 0.5, 0.8, 0.2]), labels) == 0.625
  assert_matches_sklearn(np.array([0.8, 0.5, 0.8, 0.2]), labels)


def test_float32_saturated_sigmoid():
  rng = np.random.default_rng(7)
  logits = rng.normal(scale=30.0, size=20000).astype(np.float32)
  with np.errstate(over='ignore'):
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32)
  assert np.count_nonzero(scores == 1.0) > 1000  # Many exact ties at 1.0.
  assert np.count_nonzero(scores < 1e-30) > 100
  labels = noisy_labels(rng, logits.astype(np.float64))
  value = assert_matches_sklearn(scores, labels)
  # Saturation merges ranks, so the value differs from the logits' AUC.
  assert value != metrics.auc(logits, labels)
  assert_matches_sklearn(logits, labels)


def test_float32_ties_are_taken_in_float32():
  # Distinct in float64, equal after rounding to float32.
  scores64 = np.array([1.0, 1.0 + 1e-12, 0.0, 0.5])
  labels = np.array([0, 1, 0, 1])
  # Pairs (positive, negative): in float64 3 of 4 are won; in float32 the
  # pair at 1.0 ties.
  assert metrics.auc(scores64, labels) == 0.75
  scores32 = scores64.astype(np.float32)
  assert metrics.auc(scores32, labels) == 0.625
  assert_matches_sklearn(scores32, labels)


@pytest.mark.parametrize('ties', [False, True])
def test_imbalanced_labels(ties):
  rng = np.random.default_rng(11)
  scores = rng.normal(size=50000)
  if ties:
    scores = np.round(scores, 1)
  labels = noisy_labels(rng, scores, positive_rate=0.01)
  assert 0.003 < labels.mean() < 0.03
  assert_matches_sklearn(scores, labels)


@pytest.mark.parametrize('ties', [False, True])
def test_sample_weights(ties):
  rng = np.random.default_rng(3)
  scores = rng.normal(size=6000)
  if ties:
    scores = np.round(scores, 1)
  labels = noisy_labels(rng, scores)
  weights = rng.exponential(size=scores.size)
  weights[::10] = 0.0
  weighted = assert_matches_sklearn(scores, labels, weights)
  assert weighted != metrics.auc(scores, labels)
  assert_matches_sklearn(scores, labels, weights.astype(np.float32))


def test_integer_weights_equal_repeated_samples():
  rng = np.random.default_rng(5)
  scores = np.round(rng.normal(size=500), 1).astype(np.float32)
  labels = noisy_labels(rng, scores.astype(np.float64))
  counts = rng.integers(0, 4, size=scores.size)
  counts[:2] = 1
  weighted = metrics.auc(scores, labels, counts)
  repeated = metrics.auc(np.repeat(scores, counts), np.repeat(labels, counts))
  assert abs(weighted - repeated) <= TOL
  assert_matches_sklearn(scores, labels, counts)


def test_perfect_and_inverted_ranking():
  rng = np.random.default_rng(0)
  scores = rng.random(1000)
  labels = scores > 0.7
  assert metrics.auc(scores, labels) == 1.0
  assert metrics.auc(-scores, labels) == 0.0
  assert metrics.auc(scores, labels, rng.random(1000) + 0.1) == 1.0
  assert_matches_sklearn(-scores, labels)


def test_label_dtypes_agree():
  rng = np.random.default_rng(2)
  scores = np.round(rng.normal(size=3000), 2)
  labels = noisy_labels(rng, scores)
  want = assert_matches_sklearn(scores, labels)
  for dtype in (np.bool_, np.int8, np.uint8, np.int32, np.int64, np.float16,
                np.float32, np.float64):
    assert metrics.auc(scores, labels.astype(dtype)) == want, dtype
  assert metrics.auc(scores.tolist(), labels.tolist()) == want


def test_jax_arrays():
  rng = np.random.default_rng(4)
  scores = rng.normal(size=4000).astype(np.float32)
  labels = noisy_labels(rng, scores.astype(np.float64))
  weights = rng.random(4000).astype(np.float32)
  want = roc_auc_score(labels, scores)
  got = metrics.auc(jnp.asarray(scores), jnp.asarray(labels, jnp.int32))
  assert abs(got - want) <= TOL
  got = metrics.auc(jnp.asarray(scores), jnp.asarray(labels, bool),
                    jnp.asarray(weights))
  assert abs(got - roc_auc_score(labels, scores, sample_weight=weights)) <= TOL


def test_bfloat16_and_column_scores():
  rng = np.random.default_rng(6)
  scores = jnp.asarray(rng.normal(size=3000), jnp.bfloat16)
  as_float32 = np.asarray(scores.astype(jnp.float32))
  labels = noisy_labels(rng, as_float32.astype(np.float64))
  want = roc_auc_score(labels, as_float32)
  assert abs(metrics.auc(scores, labels) - want) <= TOL
  # Model outputs shaped [batch, 1].
  assert abs(metrics.auc(as_float32[:, None], labels) - want) <= TOL


def test_inputs_are_not_modified():
  rng = np.random.default_rng(8)
  scores = rng.normal(size=1000).astype(np.float32)
  labels = noisy_labels(rng, scores.astype(np.float64))
  weights = rng.random(1000)
  copies = scores.copy(), labels.copy(), weights.copy()
  metrics.auc(scores, labels, weights)
  metrics.auc(scores, labels)
  for after, before in zip((scores, labels, weights), copies):
    np.testing.assert_array_equal(after, before)


def test_two_million_scores():
  rng = np.random.default_rng(9)
  n = 2_000_000
  logits = rng.normal(size=n).astype(np.float32)
  labels = rng.random(n) < 1 / (1 + np.exp(-2.0 * logits))
  # Probabilities in float32, as a model emits them: many ties.
  scores = (1 / (1 + np.exp(-logits))).astype(np.float32)
  value = assert_matches_sklearn(scores, labels)
  assert 0.8 < value < 0.9


# --- errors -------------------------------------------------------------------
def test_different_lengths():
  with pytest.raises(ValueError, match='got 5 scores and 4 labels'):
    metrics.auc(np.zeros(5), np.array([0, 1, 0, 1]))


@pytest.mark.parametrize('scores,labels,name', [
    (np.zeros(0), np.zeros(0), 'scores'),
    (np.zeros(3), np.zeros(0), 'labels'),
])
def test_empty(scores, labels, name):
  with pytest.raises(ValueError, match=f'at least one sample, got an empty '
                     f'{name}'):
    metrics.auc(scores, labels)


@pytest.mark.parametrize('labels,shown', [
    (np.array([0, 1, 2, 1]), '2'),
    (np.array([0, 1, -1, 1]), '-1'),
    (np.array([0.0, 1.0, 0.5, 1.0]), '0.5'),
    (np.array([0.0, 1.0, np.nan, 1.0]), 'nan'),
])
def test_labels_not_binary(labels, shown):
  with pytest.raises(ValueError,
                     match=rf'labels must be 0 or 1, got 1 other values '
                     rf'\(e.g. {shown}\)'):
    metrics.auc(np.arange(4.0), labels)


def test_labels_not_numbers():
  with pytest.raises(ValueError, match='labels must be 0/1 numbers or bools'):
    metrics.auc(np.arange(2.0), np.array(['a', 'b']))


@pytest.mark.parametrize('label', [0, 1])
def test_one_class(label):
  with pytest.raises(ValueError,
                     match=f'AUC is undefined when all labels are {label}: '
                     'got 3 samples'):
    metrics.auc(np.array([0.1, 0.5, 0.9]), np.full(3, label))


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_scores(bad):
  scores = np.array([0.1, 0.5, 0.9, 0.3, 0.2], np.float32)
  scores[[1, 3]] = bad
  with pytest.raises(ValueError,
                     match='scores must be finite, got 2 NaN or infinite '
                     'scores out of 5'):
    metrics.auc(scores, np.array([0, 1, 0, 1, 1]))


def test_complex_scores():
  with pytest.raises(ValueError, match='scores must be real numbers'):
    metrics.auc(np.array([1j, 2j]), np.array([0, 1]))


def test_negative_weights():
  with pytest.raises(ValueError,
                     match='sample_weight must be finite and >= 0, got 1 '
                     'negative and 0 non-finite'):
    metrics.auc(np.arange(4.0), np.array([0, 1, 0, 1]), [1.0, -0.5, 1.0, 1.0])


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_weights(bad):
  with pytest.raises(ValueError,
                     match='sample_weight must be finite and >= 0, got 0 '
                     r'negative and 2 non-finite \(NaN or inf\)'):
    metrics.auc(np.arange(4.0), np.array([0, 1, 0, 1]), [bad, 1.0, bad, 1.0])


def test_weights_length():
  with pytest.raises(ValueError, match='got 3 weights for 4 scores'):
    metrics.auc(np.arange(4.0), np.array([0, 1, 0, 1]), np.ones(3))


@pytest.mark.parametrize('zeroed,which', [(1, 'positive'), (0, 'negative')])
def test_class_with_zero_weight(zeroed, which):
  labels = np.array([0, 1, 0, 1])
  weights = np.where(labels == zeroed, 0.0, 1.0)
  with pytest.raises(ValueError, match=f'AUC is undefined when the {which} '
                     'samples have zero total weight'):
    metrics.auc(np.arange(4.0), labels, weights)
