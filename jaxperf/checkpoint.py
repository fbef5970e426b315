"""Checkpoints: orbax, asynchronous and atomic, with a fingerprint check.

Each checkpoint holds the whole train state (params, optimizer, step, rng) and
a JSON record of the run (seed, data position, evaluations so far, and a
fingerprint of every state leaf). Orbax writes into a temporary directory and
renames it when complete, so an interrupted save never looks like a
checkpoint; the fingerprint, checked on restore, catches files damaged after
the fact. Either way a bad latest checkpoint is reported, never loaded.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxperf.errors import TrainingError


class CheckpointError(TrainingError):
  """A checkpoint could not be written or read back intact."""


@jax.jit
def _fingerprint(tree):
  def one(x):
    x = x.astype(jnp.float32)
    return jnp.stack([jnp.sum(x), jnp.sum(x * x)])
  return [one(x) for x in jax.tree.leaves(tree)]


def fingerprint(tree: Any) -> list[list[float]]:
  """Two float32 sums per leaf: cheap to compute on device, and changed by
  any damage to the stored values that matters."""
  return [list(map(float, f)) for f in jax.device_get(_fingerprint(tree))]


class Checkpointer:
  """Saves and restores (state, record) pairs under `directory`."""

  def __init__(self, directory: str, *, keep: int = 2, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async,
            create=True))

  def incomplete(self) -> list[str]:
    """Temporary directories left by saves that never finished."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(os.path.join(self.directory, d)
                  for d in os.listdir(self.directory) if 'tmp' in d)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  @contextlib.contextmanager
  def _failing(self, what: str):
    """Turns any error of orbax's into a CheckpointError that says `what`."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{what} in {self.directory} failed: '
                            f'{type(e).__name__}: {e}') from e

  def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
    """Starts an asynchronous save; errors of earlier saves are raised."""
    self.check()
    record = dict(record, step=int(step), fingerprint=fingerprint(state))
    with self._failing(f'saving the checkpoint of step {step}'):
      self._manager.save(
          int(step), args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              record=ocp.args.JsonSave(record)), force=True)

  def check(self) -> None:
    """Raises if a background save has failed."""
    with self._failing('a checkpoint save'):
      self._manager.check_for_errors()

  def wait(self) -> None:
    with self._failing('a checkpoint save'):
      self._manager.wait_until_finished()
    self.check()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` into the shardings of `abstract_state` and verifies it."""
    where = os.path.join(self.directory, str(step))
    try:
      out = self._manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              record=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f'checkpoint {where} is corrupt or incomplete and was not loaded '
          f'({type(e).__name__}: {str(e)[:500]}). Move it aside to resume '
          f'from an earlier one ({self._earlier(step)}), or use a new '
          f'--workdir.') from e
    state, record = out['state'], dict(out['record'])
    saved = np.asarray(record.get('fingerprint', []), np.float64)
    now = np.asarray(fingerprint(state), np.float64)
    if saved.shape != now.shape or not np.allclose(now, saved, rtol=1e-5,
                                                   atol=1e-6):
      bad = (np.nonzero(~np.isclose(now, saved, rtol=1e-5, atol=1e-6)
                        .all(axis=-1))[0] if saved.shape == now.shape else [])
      raise CheckpointError(
          f'checkpoint {where} is corrupt: its contents do not match the '
          f'fingerprint recorded when it was saved (leaves {list(bad)[:8]}). '
          f'It was not loaded. Move it aside to resume from an earlier one '
          f'({self._earlier(step)}), or use a new --workdir.')
    return state, record

  def _earlier(self, step: int) -> str:
    earlier = [s for s in self.all_steps() if s < step]
    return f'step {earlier[-1]}' if earlier else 'none is left'

  def close(self) -> None:
    self.wait()
    self._manager.close()
