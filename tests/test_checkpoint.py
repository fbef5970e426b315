"""Checkpointer: round trip, damage detection, failing saves."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf.checkpoint import Checkpointer, CheckpointError


def _state():
  return {'w': jnp.arange(12.0).reshape(3, 4), 'step': jnp.int32(5),
          'rng': jax.random.key_data(jax.random.key(1))}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding), state)


def test_round_trip(tmp_path):
  ck = Checkpointer(str(tmp_path / 'c'))
  state = _state()
  ck.save(5, state, {'seed': 3, 'evals': [{'epoch': 1}]})
  ck.wait()
  assert ck.latest_step() == 5
  got, record = ck.restore(5, _abstract(state))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert record['seed'] == 3 and record['step'] == 5
  ck.close()


def test_changed_values_fail_the_fingerprint(tmp_path):
  ck = Checkpointer(str(tmp_path / 'c'))
  state = _state()
  ck.save(1, state, {})
  ck.wait()
  meta = tmp_path / 'c' / '1' / 'record' / 'metadata'
  record = json.loads(meta.read_text())
  record['fingerprint'][0][0] += 1.0        # as if a value had changed on disk
  meta.write_text(json.dumps(record))
  with pytest.raises(CheckpointError, match=r'c/1 is corrupt: its contents do '
                     r'not match the fingerprint'):
    ck.restore(1, _abstract(state))
  ck.close()


def test_a_failing_save_is_raised_not_ignored(tmp_path):
  ck = Checkpointer(str(tmp_path / 'c'))

  def broken(*args, **kwargs):
    raise OSError('disk full')
  ck._manager.save = broken
  with pytest.raises(CheckpointError, match='saving the checkpoint of step 2 '
                     r'in .* failed: OSError: disk full'):
    ck.save(2, _state(), {})


def test_a_failing_background_save_is_raised(tmp_path):
  ck = Checkpointer(str(tmp_path / 'c'))

  def broken():
    raise RuntimeError('async write failed')
  ck._manager.check_for_errors = broken
  with pytest.raises(CheckpointError, match='async write failed'):
    ck.wait()
