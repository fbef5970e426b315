"""Helpers for tests of batch streams."""

from __future__ import annotations

import numpy as np


def take(it, n):
  """The first n batches of a stream, which is then closed."""
  out = [next(it) for _ in range(n)]
  close = getattr(it, 'close', None)
  if close:
    close()
  return out


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
