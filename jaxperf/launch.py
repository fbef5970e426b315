"""python -m jaxperf.launch: several processes of one run on this machine.

    python -m jaxperf.launch --local-processes 2 [--devices-per-process 4] \
        [--port P] [--fail-grace S] -- python -m jaxperf.train --model resnet50 ...

Starts the command N times with JAXPERF_COORDINATOR=127.0.0.1:P,
JAXPERF_NUM_PROCESSES=N and JAXPERF_PROCESS_ID=i (i = 0..N-1), which
`jaxperf.distributed.initialize` turns into a jax.distributed run: process 0
hosts the coordinator, all meet there, and from then on JAX's runtime (not
this launcher) carries the run. `--devices-per-process K` gives each process K
simulated CPU devices (XLA_FLAGS), for testing multi-host code on one machine;
on GPUs leave it out (and set CUDA_VISIBLE_DEVICES per process if you want one
GPU each).

Process 0's output passes through unchanged; other processes' lines are
prefixed with [i]. SIGTERM or SIGINT to the launcher is forwarded to every
process (a scheduler's preemption: the trainer saves a checkpoint and exits
0). If a process fails, the others get `--fail-grace` seconds to notice and
exit on their own (JAX's heartbeat does that), then are killed. The exit code
is 0 if every process exited 0, else the first failing process's code
(128 + signal number for a process killed by a signal).

This is a convenience for one machine; on clusters use the scheduler's own
launcher (srun, mpirun), whose environment jaxperf.distributed detects.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxperf import distributed


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pump(stream, out, prefix: str) -> None:
  for line in iter(stream.readline, ''):
    out.write(prefix + line if prefix else line)
    out.flush()
  stream.close()


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m jaxperf.launch',
      description='Run a command as N processes of one jax.distributed run '
                  'on this machine.')
  p.add_argument('--local-processes', type=int, required=True,
                 help='number of processes')
  p.add_argument('--devices-per-process', type=int, default=None,
                 help='simulated CPU devices per process (sets XLA_FLAGS)')
  p.add_argument('--port', type=int, default=None,
                 help='coordinator port on 127.0.0.1 (default: a free one)')
  p.add_argument('--fail-grace', type=float, default=60.0,
                 help='seconds the others get to exit after one fails '
                      '(default 60)')
  p.add_argument('command', nargs=argparse.REMAINDER,
                 help='-- then the command to run in every process')
  return p


def launch(command: list[str], n: int, *, devices_per_process: int | None,
           port: int | None = None, fail_grace: float = 60.0,
           env: dict[str, str] | None = None) -> int:
  """Runs `command` as `n` processes; returns the launcher's exit code."""
  base = dict(os.environ if env is None else env)
  port = port or free_port()
  procs = []
  for i in range(n):
    e = dict(base)
    e[distributed.ENV_COORDINATOR] = f'127.0.0.1:{port}'
    e[distributed.ENV_NUM_PROCESSES] = str(n)
    e[distributed.ENV_PROCESS_ID] = str(i)
    if devices_per_process:
      flags = [f for f in e.get('XLA_FLAGS', '').split()
               if not f.startswith('--xla_force_host_platform_device_count')]
      flags.append(f'--xla_force_host_platform_device_count='
                   f'{devices_per_process}')
      e['XLA_FLAGS'] = ' '.join(flags)
      e.setdefault('JAX_PLATFORMS', 'cpu')
    procs.append(subprocess.Popen(command, env=e, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, bufsize=1))
  pumps = []
  for i, p in enumerate(procs):
    prefix = '' if i == 0 else f'[{i}] '
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      t = threading.Thread(target=_pump, args=(stream, out, prefix),
                           daemon=True)
      t.start()
      pumps.append(t)

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward)
              for s in (signal.SIGTERM, signal.SIGINT)}
  first_failure = None
  deadline = None
  try:
    while True:
      codes = [p.poll() for p in procs]
      for i, c in enumerate(codes):
        if c not in (None, 0) and first_failure is None:
          first_failure = (i, c)
          deadline = time.monotonic() + fail_grace
          sys.stderr.write(f'launch: process {i} exited with '
                           f'{_describe(c)}; waiting up to {fail_grace:g}s '
                           f'for the others\n')
      if all(c is not None for c in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        for i, p in enumerate(procs):
          if p.poll() is None:
            sys.stderr.write(f'launch: killing process {i} (still running '
                             f'{fail_grace:g}s after process '
                             f'{first_failure[0]} failed)\n')
            p.kill()
        deadline = None
      time.sleep(0.2)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    for t in pumps:
      t.join(timeout=5)
  if first_failure is None:
    return 0
  code = first_failure[1]
  return 128 - code if code < 0 else code


def _describe(code: int) -> str:
  if code < 0:
    try:
      return f'signal {signal.Signals(-code).name}'
    except ValueError:
      return f'signal {-code}'
  return f'exit code {code}'


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  command = list(args.command)
  if command and command[0] == '--':
    command = command[1:]
  if not command:
    print('error: give the command after --, e.g. python -m jaxperf.launch '
          '--local-processes 2 -- python -m jaxperf.train --model resnet50',
          file=sys.stderr)
    return 2
  if args.local_processes < 1:
    print(f'error: --local-processes {args.local_processes}: expected >= 1',
          file=sys.stderr)
    return 2
  return launch(command, args.local_processes,
                devices_per_process=args.devices_per_process, port=args.port,
                fail_grace=args.fail_grace)


if __name__ == '__main__':
  sys.exit(main())
