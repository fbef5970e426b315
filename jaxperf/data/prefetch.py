"""Run an iterator in a background thread, a bounded number of items ahead.

`Prefetcher(source, depth)` pulls items from `source` in a daemon thread and
hands them to the consumer through a queue of at most `depth` items, so the
producer works while the consumer is busy, but never runs away with memory.
An exception raised by the source is re-raised, with its traceback, by the
consumer's next `next()`. `close()` (or dropping the prefetcher) stops the
thread at its next hand-off and closes the source in that thread, so a
generator's `finally` blocks run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar('T')

_ITEM, _END, _ERROR = range(3)
_POLL_S = 0.05  # how often blocked hand-offs look for a stop request


def _put(q: queue.Queue, stop: threading.Event, message: Any) -> bool:
  """Puts `message` on `q` unless `stop` is set first; False if stopped."""
  while not stop.is_set():
    try:
      q.put(message, timeout=_POLL_S)
      return True
    except queue.Full:
      continue
  return False


def _produce(source: Iterator, q: queue.Queue, stop: threading.Event) -> None:
  """The worker thread: `source` into `q` until exhausted, failed or stopped.

  It holds no reference to the Prefetcher, so dropping that stops the thread.
  """
  try:
    for item in source:
      if not _put(q, stop, (_ITEM, item)):
        return
    _put(q, stop, (_END, None))
  except BaseException as e:  # pylint: disable=broad-except
    _put(q, stop, (_ERROR, e))
  finally:
    close = getattr(source, 'close', None)
    if close is not None:
      try:
        close()
      except Exception:  # pylint: disable=broad-except
        pass  # The source already failed or was stopped; nothing to report.


class Prefetcher(Iterator[T], Generic[T]):
  """Iterates over `source` from a background thread, `depth` items ahead."""

  def __init__(self, source: Iterable[T], depth: int, *,
               name: str = 'jaxperf-prefetch'):
    if depth < 1:
      raise ValueError(f'prefetch depth must be >= 1, got {depth}')
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(
        target=_produce, args=(iter(source), self._queue, self._stop),
        name=name, daemon=True)
    # A prefetcher dropped without close() still stops its thread.
    self._finalizer = weakref.finalize(self, self._stop.set)
    self._thread.start()

  def __iter__(self) -> Prefetcher[T]:
    return self

  def __next__(self) -> T:
    while not self._done:
      try:
        kind, value = self._queue.get(timeout=_POLL_S)
      except queue.Empty:
        if self._stop.is_set():
          self._done = True
        elif not self._thread.is_alive() and self._queue.empty():
          self._done = True
          raise RuntimeError(
              f'prefetch thread {self._thread.name} ended without a result')
        continue
      if kind == _ITEM:
        return value
      self._done = True
      self._stop.set()
      if kind == _ERROR:
        raise value
    raise StopIteration

  def close(self, timeout: float | None = 10.0) -> None:
    """Stops the thread (waiting up to `timeout` s for it); idempotent."""
    self._done = True
    self._stop.set()
    # Free the queue so a producer blocked on a hand-off sees the stop.
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if self._thread is not threading.current_thread():
      self._thread.join(timeout)

  @property
  def running(self) -> bool:
    """Whether the background thread is still alive."""
    return self._thread.is_alive()

  def __enter__(self) -> Prefetcher[T]:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class PrefetchedStreams:
  """What a dataset needs to hand out batch streams: each stream runs
  `prefetch` batches ahead in a Prefetcher thread (0: in the caller's
  thread), an optional pool of `num_workers` threads fills batches, and
  `close()` stops every stream and the pool. Usable as a context manager.

  A dataset calls `_init_streams(prefetch, num_workers)` from its
  constructor, wraps its batch iterators with `_prefetched`, and takes the
  pool from `_executor()`.
  """

  def _init_streams(self, prefetch: int, num_workers: int = 0,
                    pool_name: str = 'io') -> None:
    self.prefetch = int(prefetch)
    self.num_workers = int(num_workers)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pool_name = pool_name
    self._pool_lock = threading.Lock()
    self._streams: weakref.WeakSet = weakref.WeakSet()
    self._closed = False

  def _prefetched(self, batches: Iterator[Any]) -> Iterator[Any]:
    if self._closed:
      raise RuntimeError('the dataset is closed')
    if not self.prefetch:
      return batches
    stream = Prefetcher(batches, self.prefetch,
                        name=f'{type(self).__name__}-prefetch')
    self._streams.add(stream)
    return stream

  def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
    with self._pool_lock:
      if self._closed:
        raise RuntimeError('the dataset is closed')
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(self.num_workers, 1),
            thread_name_prefix=f'{type(self).__name__}-{self._pool_name}')
      return self._pool

  def close(self) -> None:
    """Stops the streams and worker threads; idempotent."""
    with self._pool_lock:
      self._closed = True
      pool, self._pool = self._pool, None
    streams = list(self._streams)
    for s in streams:
      s.close(timeout=0)
    if pool is not None:
      pool.shutdown(wait=False, cancel_futures=True)
    for s in streams:
      s.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def completed_in_order(jobs: Iterator[tuple[Any, list]], in_flight: int
                       ) -> Iterator[Any]:
  """Batches filled by worker threads, in submission order.

  `jobs` yields (batch, futures): a batch whose arrays the futures are
  filling. Up to `in_flight` jobs are kept submitted; each batch is yielded
  once all its futures are done (a worker's exception is raised here).
  Closing the generator cancels the futures still pending.
  """
  pending: collections.deque = collections.deque()
  try:
    while True:
      while len(pending) < in_flight:
        job = next(jobs, None)
        if job is None:
          break
        pending.append(job)
      if not pending:
        return
      batch, futures = pending.popleft()
      for f in futures:
        f.result()
      yield batch
  finally:
    for _, futures in pending:
      for f in futures:
        f.cancel()
