"""Multi-process runs through JAX's own distributed runtime.

`initialize()` starts jax.distributed when more than one process is
configured, from (first match wins):

1. explicit arguments (the CLI's --coordinator HOST:PORT --num-processes N
   --process-id I),
2. the environment variables JAXPERF_COORDINATOR, JAXPERF_NUM_PROCESSES and
   JAXPERF_PROCESS_ID (what `python -m jaxperf.launch` sets),
3. a SLURM job step with more than one task (SLURM_NTASKS > 1) or an Open MPI
   launch (OMPI_COMM_WORLD_SIZE > 1): JAX's own cluster detection reads the
   coordinator, process count and id from the scheduler.

Otherwise it does nothing: a single-process run needs no coordinator.

Timeouts (seconds; environment overrides in brackets):
- connecting to the coordinator: `init_timeout_s` (JAXPERF_INIT_TIMEOUT,
  default 120). A coordinator nobody listens on fails after it with a message
  naming the address.
- a process that stops sending heartbeats is declared dead after
  `heartbeat_timeout_s` (JAXPERF_HEARTBEAT_TIMEOUT, default 30); the
  coordination service then fails every other process, so a killed process
  makes the rest exit with an error within about that long instead of
  hanging in a collective.

On CPU the cross-process collectives are gloo's.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping

from jaxperf.errors import ConfigError, UserError

ENV_COORDINATOR = 'JAXPERF_COORDINATOR'
ENV_NUM_PROCESSES = 'JAXPERF_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAXPERF_PROCESS_ID'
ENV_INIT_TIMEOUT = 'JAXPERF_INIT_TIMEOUT'
ENV_HEARTBEAT_TIMEOUT = 'JAXPERF_HEARTBEAT_TIMEOUT'
DEFAULT_INIT_TIMEOUT_S = 120
DEFAULT_HEARTBEAT_TIMEOUT_S = 30


class DistributedError(UserError):
  """The processes of a multi-process run could not be brought together."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """How this process joins a run; coordinator None means cluster detection."""
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  source: str                      # flags | env | slurm | openmpi


def _int(value, what: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ConfigError(f'{what}: expected an integer, got {value!r}') from None


def detect(coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None,
           environ: Mapping[str, str] | None = None) -> ProcessSpec | None:
  """The multi-process configuration, or None for a single-process run."""
  env = os.environ if environ is None else environ
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    source = 'flags'
  elif env.get(ENV_COORDINATOR) or env.get(ENV_NUM_PROCESSES):
    source = 'env'
    coordinator = env.get(ENV_COORDINATOR)
    num_processes = env.get(ENV_NUM_PROCESSES)
    process_id = env.get(ENV_PROCESS_ID)
  elif _int(env.get('SLURM_NTASKS', '1'), 'SLURM_NTASKS') > 1 and \
      env.get('SLURM_JOB_ID'):
    return ProcessSpec(None, None, None, 'slurm')
  elif _int(env.get('OMPI_COMM_WORLD_SIZE', '1'),
            'OMPI_COMM_WORLD_SIZE') > 1:
    return ProcessSpec(None, None, None, 'openmpi')
  else:
    return None

  names = (('--coordinator', ENV_COORDINATOR),
           ('--num-processes', ENV_NUM_PROCESSES),
           ('--process-id', ENV_PROCESS_ID))
  flag = (lambda i: names[i][0]) if source == 'flags' else (
      lambda i: names[i][1])
  missing = [flag(i) for i, v in enumerate((coordinator, num_processes,
                                            process_id)) if v is None
             or v == '']
  if missing:
    raise ConfigError(f'a multi-process run needs all of '
                      f'{", ".join(flag(i) for i in range(3))}; missing '
                      f'{", ".join(missing)}')
  n = _int(num_processes, flag(1))
  i = _int(process_id, flag(2))
  host, sep, port = str(coordinator).rpartition(':')
  if not sep or not host or not port.isdigit():
    raise ConfigError(f'{flag(0)} {coordinator!r}: expected HOST:PORT')
  if n < 1:
    raise ConfigError(f'{flag(1)} {n}: expected >= 1')
  if not 0 <= i < n:
    raise ConfigError(f'{flag(2)} {i}: expected 0 <= id < {n}')
  if n == 1:
    return None
  return ProcessSpec(str(coordinator), n, i, source)


def initialize(coordinator: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *,
               init_timeout_s: int | None = None,
               heartbeat_timeout_s: int | None = None,
               environ: Mapping[str, str] | None = None) -> ProcessSpec | None:
  """Joins the multi-process run this process belongs to, if any.

  Must run before anything touches a JAX backend. Returns the spec used, or
  None for a single-process run.
  """
  spec = detect(coordinator, num_processes, process_id, environ)
  if spec is None:
    return None
  env = os.environ if environ is None else environ
  init_timeout = int(init_timeout_s or env.get(ENV_INIT_TIMEOUT)
                     or DEFAULT_INIT_TIMEOUT_S)
  heartbeat = int(heartbeat_timeout_s or env.get(ENV_HEARTBEAT_TIMEOUT)
                  or DEFAULT_HEARTBEAT_TIMEOUT_S)
  import jax  # pylint: disable=g-import-not-at-top
  platforms = (env.get('JAX_PLATFORMS') or '').split(',')
  if 'cpu' in platforms or not platforms[0]:
    # Cross-process collectives on CPU devices (no effect on GPU runs).
    try:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    except AttributeError:   # a jax without the option
      pass
  kwargs = dict(initialization_timeout=init_timeout,
                heartbeat_timeout_seconds=heartbeat)
  where = (f'coordinator {spec.coordinator} as process {spec.process_id} of '
           f'{spec.num_processes}' if spec.coordinator else
           f'the {spec.source} job\'s coordinator')
  if spec.coordinator:
    # JAX's client aborts the process when the coordinator never answers;
    # check the address first, so the failure is a message, not a crash.
    host, _, port = spec.coordinator.rpartition(':')
    if spec.process_id == 0:
      _check_bindable(host, int(port), spec.coordinator)
    else:
      _wait_for_coordinator(host, int(port), init_timeout, where)
  try:
    if spec.coordinator:
      jax.distributed.initialize(spec.coordinator, spec.num_processes,
                                 spec.process_id, **kwargs)
    else:
      jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise DistributedError(
        f'could not join {where} within {init_timeout}s: {text}. Is process 0 '
        f'running and reachable at that address (and the port free on its '
        f'host)? The timeout is {ENV_INIT_TIMEOUT} / --init-timeout.') from None
  return spec


def _wait_for_coordinator(host: str, port: int, timeout_s: float,
                          where: str) -> None:
  """Retries a TCP connection to the coordinator until `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  last = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=2.0):
        return
    except OSError as e:
      last = e
    if time.monotonic() >= deadline:
      raise DistributedError(
          f'could not join {where}: nothing accepted a connection at '
          f'{host}:{port} within {timeout_s:g}s ({last}). Is process 0 '
          f'running with the same --coordinator? The timeout is '
          f'{ENV_INIT_TIMEOUT} / --init-timeout.')
    time.sleep(0.25)


def _check_bindable(host: str, port: int, address: str) -> None:
  """Process 0 serves the coordinator: its port must be free here."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(('', port))
    except OSError as e:
      raise DistributedError(
          f'process 0 hosts the coordinator {address}, but port {port} '
          f'cannot be bound on this machine ({e}); choose a free port') \
          from None
