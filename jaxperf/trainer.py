"""The one training loop all workloads share.

init (state created sharded, steps compiled ahead of time) -> run_start ->
blocks of training between evaluations at the workload's cadence -> stop at
the quality target (success) or the end of the schedule (aborted).

Inside a block, `steps_per_dispatch` steps run per call (a lax.scan on
device); the host prepares the next call's batches while the device works and
reads the previous call's metrics only after dispatching the next one, so it
never waits on the device between steps. Checkpoints restore everything a
resumed run needs to continue exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxperf import config as config_lib
from jaxperf.checkpoint import Checkpointer
from jaxperf.errors import ConfigError, TrainingError
from jaxperf.mlperf_log import C, MLPerfLogger
from jaxperf.sharding import mesh as mesh_lib
from jaxperf.workloads.base import Workload, batch_shape_key, new_rng


@dataclasses.dataclass
class RunOptions:
  workdir: str
  data_dir: str | None = None
  mesh: str | None = None
  compile_only: bool = False   # stop after ahead-of-time compilation
  out: TextIO = sys.stdout


@dataclasses.dataclass
class RunResult:
  status: str                 # success | aborted | preempted | compiled
  step: int
  epoch: float
  evals: list[dict[str, Any]]
  run_seconds: float | None   # run_start -> run_stop (None if preempted)
  compile_seconds: float
  log_path: str | None


class _Preempted(Exception):
  pass


def _batch_slice(sharding, global_shape, axis: int) -> tuple[int, int]:
  """(index, count): this process holds batch rows [index * n / count,
  (index + 1) * n / count) of an array of `global_shape` with `sharding`.

  Usually index = process_index and count = process_count; when the batch is
  not split over processes (say a spatial axis spans them instead) every
  process reads the whole batch (0, 1).
  """
  n = global_shape[axis]
  rows = set()
  for index in sharding.addressable_devices_indices_map(
      tuple(global_shape)).values():
    sl = index[axis]
    rows.update(range(*sl.indices(n)))
  lo, hi = min(rows), max(rows) + 1
  size = hi - lo
  if len(rows) != size or n % size or lo % size:
    raise ValueError(f'this process holds batch rows {sorted(rows)} of {n}: '
                     f'not one contiguous, evenly sized slice')
  return lo // size, n // size


def _short_list(values: list, head: int = 6) -> str:
  if len(values) <= 2 * head:
    return str(values)
  return (', '.join(map(str, values[:head])) + f', ... ({len(values)} in all)'
          ', ' + ', '.join(map(str, values[-2:])))


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class _Metrics:
  """metrics.jsonl: one JSON object per line, step records and evaluations."""

  def __init__(self, path: str, keep_until_step: int | None,
               enabled: bool = True):
    self.path = path
    self.enabled = enabled
    if not enabled:  # only process 0 writes
      return
    kept = []
    if keep_until_step is not None and os.path.exists(path):
      # A resumed run drops what the interrupted run wrote past its
      # checkpoint, so the file reads as if the run had never stopped.
      with open(path) as f:
        for line in f:
          line = line.strip()
          if not line:
            continue
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut short by the kill
          if rec.get('step', 0) <= keep_until_step:
            kept.append(rec)
    self._f = open(path, 'w')
    for rec in kept:
      self.write(rec)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._f.write(json.dumps(record) + '\n')
    self._f.flush()

  def close(self):
    if self.enabled:
      self._f.close()


class Trainer:
  """Runs one workload to its target. See the module docstring."""

  def __init__(self, workload: Workload, options: RunOptions):
    self.w = workload
    self.cfg = workload.config
    self.opts = options
    self.out = options.out
    self._stop_requested = False

  # ---------------------------------------------------------------- helpers
  def say(self, msg: str) -> None:
    if jax.process_index() == 0:
      print(msg, file=self.out, flush=True)

  def _install_sigterm(self):
    if threading.current_thread() is not threading.main_thread():
      return None

    def handler(signum, frame):  # pylint: disable=unused-argument
      self._stop_requested = True
    return signal.signal(signal.SIGTERM, handler)

  def _stop_agreed(self) -> bool:
    """Whether any process was asked to stop. With several processes the
    flags are gathered (a small collective every process runs at the same
    point of the loop), so all stop, and checkpoint, at the same step."""
    if jax.process_count() == 1:
      return self._stop_requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(
        np.array([self._stop_requested], np.int32))
    return bool(np.any(flags))

  # ---------------------------------------------------------------- run
  def run(self) -> RunResult:
    previous = self._install_sigterm()
    try:
      return self._run()
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)

  def _run(self) -> RunResult:
    w, cfg, opts = self.w, self.cfg, self.opts
    os.makedirs(opts.workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(opts.workdir, 'checkpoints'),
                        keep=int(cfg.checkpoints_to_keep))
    for path in ckpt.incomplete():
      self.say(f'warning: ignoring {path}: an interrupted checkpoint save')
    resume_step = ckpt.latest_step()

    mesh = mesh_lib.make_mesh(opts.mesh)
    w.check_mesh(mesh)
    n_data = mesh_lib.data_parallel_size(mesh)
    gbs = int(cfg.global_batch_size)
    ebs = int(cfg.eval_batch_size)
    for name, value in (('global_batch_size', gbs), ('eval_batch_size', ebs)):
      if value % n_data or value % jax.process_count():
        raise ConfigError(
            f'{name}={value} does not divide evenly over the {n_data} '
            f'data-parallel devices of --mesh {mesh_lib.describe(mesh)}')

    record: dict[str, Any] = {}
    seed = cfg.seed
    if resume_step is not None:
      # The seed (hence data order) of a resumed run is the original one.
      record = dict(_peek_record(ckpt, resume_step))
      seed = record.get('seed', seed)
      done = record.get('evals') or []
      if done and w.reached_result(done[-1]):
        self.say(f'{opts.workdir}: this run already reached the target '
                 f'({w.metric} {done[-1][w.metric]:.4f} at epoch '
                 f'{done[-1]["epoch"]}); nothing to do. Use a new --workdir '
                 f'to train again.')
        return RunResult('success', resume_step, record.get('epoch', 0.0),
                         done, None, 0.0, None)
    if seed is None:
      seed = int(time.time_ns() % (2**31 - 1))
    seed = int(seed)

    w.set_workdir(opts.workdir)
    train_ds, eval_ds = w.datasets(opts.data_dir, seed)
    # One MLPerf log per attempt: mllog appends, and the checker wants one
    # run per file.
    attempt = 0
    log_path = os.path.join(opts.workdir, 'mlperf_log.txt')
    while os.path.exists(log_path):
      attempt += 1
      log_path = os.path.join(opts.workdir, f'mlperf_log.resume{attempt}.txt')
    ml = MLPerfLogger(log_path)
    ml.event(C.CACHE_CLEAR, True)
    ml.start(C.INIT_START)

    platform = f'{jax.device_count()}x{jax.devices()[0].device_kind}'
    ml.event(C.SUBMISSION_ORG, cfg.submission_org)
    ml.event(C.SUBMISSION_PLATFORM, cfg.submission_platform or platform)
    ml.event(C.SUBMISSION_DIVISION, cfg.division)
    ml.event(C.SUBMISSION_STATUS, cfg.submission_status)
    ml.event(C.SUBMISSION_BENCHMARK, w.benchmark)
    ml.event(C.SEED, seed)

    if opts.data_dir is None and w.uses_data_dir:
      self.say('=' * 78)
      self.say(f'NOTE: no --data-dir given: training {w.name} on SYNTHETIC '
               f'learnable data ({train_ds.num_examples} train / '
               f'{eval_ds.num_examples} eval examples). The accuracy reached '
               f'says nothing about the real benchmark.')
      self.say('=' * 78)
    try:
      return self._train(ml, log_path, mesh, ckpt, resume_step, record, seed,
                         train_ds, eval_ds)
    finally:
      train_ds.close()
      eval_ds.close()
      ml.close()

  def _train(self, ml, log_path, mesh, ckpt, resume_step, record, seed,
             train_ds, eval_ds) -> RunResult:
    w, cfg, opts = self.w, self.cfg, self.opts
    gbs = int(cfg.global_batch_size)
    ebs = int(cfg.eval_batch_size)
    sched = w.setup(train_ds.num_examples)
    steps_known = sched.steps_known
    train_epochs = w.train_length()
    total_steps = sched.steps_for(train_epochs)
    eval_epochs = w.eval_epochs(train_epochs)
    k = max(int(cfg.steps_per_dispatch), 1)

    # ---- state, created sharded ----
    rng = new_rng(seed)
    abstract = jax.eval_shape(w.init_state, rng)
    state_sh = w.state_sharding(abstract, mesh)
    rep = mesh_lib.replicated(mesh)
    state = jax.jit(w.init_state, out_shardings=state_sh)(rng)
    if resume_step is None:
      state = w.load_initial_weights(state, state_sh)
    for name in w.initialized_tensors(state):
      ml.event(C.WEIGHTS_INITIALIZATION, metadata={'tensor': name})
    for key, value in w.mlperf_hyperparameters().items():
      ml.event(key, value)
    ml.event(C.TRAIN_SAMPLES, train_ds.num_examples)
    ml.event(C.EVAL_SAMPLES, eval_ds.num_examples)

    evals: list[dict[str, Any]] = []
    layout = w.state_layout()
    if resume_step is not None:
      saved = record.get('state_layout')
      if layout is not None and saved is not None and saved != layout:
        differ = sorted(k for k in set(saved) | set(layout)
                        if saved.get(k) != layout.get(k))
        raise ConfigError(
            f'{ckpt.directory}/{resume_step}: the checkpoint was written for '
            f'another state layout ({", ".join(f"{k}: {saved.get(k)}" for k in differ)}'
            f'; this run: {", ".join(f"{k}: {layout.get(k)}" for k in differ)}). '
            f'Resume with the --mesh and options it was written with, or '
            f'use a new --workdir.')
      abstract_sh = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract, state_sh)
      state, record = ckpt.restore(resume_step, abstract_sh)
      evals = list(record.get('evals', []))
      self.say(f'resumed from {ckpt.directory}/{resume_step} '
               f'(step {resume_step}, '
               + (f'epoch {sched.epoch_of(resume_step):.2f})'
                  if sched.unit == 'epochs' else
                  f'{sched.epoch_of(resume_step):,.0f} {sched.unit})'))
    start_step = int(jax.device_get(state.step))

    # ---- compile ahead of time ----
    # One program per batch shape (most workloads have one; bucketed inputs
    # one per bucket), chosen per call by the batch's shapes.
    specs_train = w.batch_specs(gbs, train=True)
    specs_eval = w.batch_specs(ebs, train=False)
    if len(specs_train) > 1 and k > 1:
      raise ConfigError(
          f'steps_per_dispatch={k}: {w.name} batches come in '
          f'{len(specs_train)} shapes, and the steps of one call share a '
          f'shape; set --set steps_per_dispatch=1')
    spec_train, spec_eval = specs_train[0], specs_eval[0]
    part_train = w.batch_partition(mesh, train=True)
    part_eval = w.batch_partition(mesh, train=False)
    block_sh = {k_: NamedSharding(mesh, P(None, *part_train[k_]))
                for k_ in spec_train}
    eval_sh = {k_: NamedSharding(mesh, part_eval[k_]) for k_ in spec_eval}

    def block(state, batches, n_valid):
      """`k` steps of which the first n_valid are real (the rest no-ops)."""
      if k == 1:
        # One step needs no loop. (XLA's CPU backend runs the backward
        # convolutions of a loop body many times slower than outside one.)
        del n_valid                     # always 1
        new_st, metrics = w.train_step(
            state, jax.tree.map(lambda x: x[0], batches))
        return new_st, jax.tree.map(lambda x: x[None], metrics)

      def body(st, xs):
        i, batch = xs
        new_st, metrics = jax.lax.cond(
            i < n_valid, w.train_step,
            lambda s, b: (s, jax.tree.map(
                lambda x: jnp.zeros(x.shape, x.dtype),
                jax.eval_shape(w.train_step, s, b)[1])),
            st, batch)
        return new_st, metrics
      return jax.lax.scan(body, state, (jnp.arange(k), batches))

    def stacked_spec(spec):
      return {k_: jax.ShapeDtypeStruct((k,) + v.shape, v.dtype,
                                       sharding=block_sh[k_])
              for k_, v in spec.items()}
    stacked = stacked_spec(spec_train)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, state_sh)
    t0 = time.perf_counter()
    jit_block = jax.jit(block, donate_argnums=0,
                        out_shardings=(state_sh, rep))
    train_fns = {batch_shape_key(spec): jit_block.lower(
        abstract_state, stacked_spec(spec),
        jax.ShapeDtypeStruct((), jnp.int32)).compile()
                 for spec in specs_train}
    evaluator = w.make_evaluator(mesh, abstract_state)
    if evaluator is None:
      jit_eval = jax.jit(w.eval_step, out_shardings=rep)
      eval_fns = {batch_shape_key(spec): jit_eval.lower(
          abstract_state, {k_: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                                    sharding=eval_sh[k_])
                           for k_, v in spec.items()}).compile()
                  for spec in specs_eval}
    compile_s = time.perf_counter() - t0
    flops_per_step = _step_flops(w, abstract_state, stacked)
    peak = _peak_flops(jax.devices()[0])
    self.say(f'{w.name}: {mesh_lib.describe(mesh)}; global batch {gbs}; '
             + (f'{total_steps} steps ({train_epochs} epochs of '
                f'{train_ds.num_examples}); evals after epochs '
                f'{_short_list(eval_epochs)}; '
                if sched.unit == 'epochs' else
                (f'{total_steps} steps ({train_epochs} {sched.unit}); '
                 if steps_known else
                 f'up to {train_epochs} {sched.unit} (their steps known as '
                 f'their data is made); ')
                + f'evals after {_short_list(eval_epochs)} {sched.unit}; ')
             + f'target {w.describe_target()}; '
             + (f'{len(train_fns)} train batch shapes ' if len(train_fns) > 1
                else '')
             + f'compiled in {compile_s:.1f}s')
    if opts.compile_only:
      self.say(f'compile only: train step ({k} steps per call'
               + (f'; {len(train_fns)} batch shapes' if len(train_fns) > 1
                  else '')
               + f') and eval step compiled in {compile_s:.1f}s; not training')
      return RunResult('compiled', start_step, sched.epoch_of(start_step), evals,
                       None, compile_s, log_path)

    metrics_log = _Metrics(os.path.join(opts.workdir, 'metrics.jsonl'),
                           keep_until_step=start_step if resume_step is not None
                           else None, enabled=jax.process_index() == 0)
    metrics_log.write({'kind': 'compile', 'step': start_step,
                       'seconds': round(compile_s, 3)})
    if jax.process_index() == 0:
      with open(os.path.join(opts.workdir, 'config.yaml'), 'w') as f:
        f.write(config_lib.dump(cfg))

    if jax.process_count() > 1:
      # Start together: compile times differ between processes, and the
      # first cross-process collective gives its peers only so long (gloo:
      # 30 s) to show up.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('jaxperf: compiled')
    ml.end(C.INIT_STOP)
    ml.start(C.RUN_START)
    run_t0 = time.perf_counter()

    # ---- blocks between evaluations ----
    step = start_step
    first_key = next(iter(spec_train))
    pidx, pcount = _batch_slice(block_sh[first_key],
                                (k,) + spec_train[first_key].shape, axis=1)
    batches = train_ds.train_batches(step, gbs, process_index=pidx,
                                     process_count=pcount)
    pending = None        # (first_step, n, device metrics) of the last call
    last_fetch = (time.perf_counter(), step)
    last_print_step = step
    last_ckpt_step = step
    status = 'aborted'
    rate = None

    specs_by_key = {batch_shape_key(spec): spec for spec in specs_train}

    def make_call(n: int):
      """(compiled block for the batches' shape, global block arrays)."""
      host = [next(batches) for _ in range(n)]
      shape_key = batch_shape_key(host[0], spec_train)
      if shape_key not in specs_by_key:
        raise TrainingError(
            f'{w.name}: a training batch of shapes '
            f'{dict((k_, v.shape) for k_, v in host[0].items())} matches '
            f'none of the {len(specs_by_key)} compiled batch shapes')
      spec = specs_by_key[shape_key]
      pad = k - n
      local = {}
      for key_ in spec:
        arr = np.stack([b[key_] for b in host])
        if pad:
          arr = np.concatenate([arr, np.zeros((pad,) + arr.shape[1:],
                                              arr.dtype)])
        local[key_] = arr
      return train_fns[shape_key], {
          key_: jax.make_array_from_process_local_data(
              block_sh[key_], local[key_], (k,) + spec[key_].shape)
          for key_ in spec}

    def flush():
      """Reads the last call's metrics (a host sync) and logs them."""
      nonlocal pending, last_fetch, last_print_step, rate
      if pending is None:
        return
      first, n, dev = pending
      pending = None
      host = jax.device_get(dev)
      now = time.perf_counter()
      t_prev, s_prev = last_fetch
      done = first + n
      if done > s_prev and now > t_prev:
        rate = (done - s_prev) * gbs / (now - t_prev)
      last_fetch = (now, done)
      for i in range(n):
        s = first + i + 1
        rec = {'kind': 'train', 'step': s, 'epoch': round(sched.epoch_of(s), 4)}
        for key_, arr in host.items():
          rec[key_] = float(arr[i])
        if rate is not None:
          rec['throughput'] = round(rate, 2)
          if flops_per_step:
            achieved = flops_per_step * rate / gbs / jax.device_count()
            rec['tflops_per_device'] = round(achieved / 1e12, 4)
            if peak:
              rec['mfu'] = round(achieved / peak, 4)
        if not math.isfinite(rec['loss']):
          kept = ckpt.all_steps()
          raise TrainingError(
              f'non-finite loss ({rec["loss"]}) at step {s}: stopping. '
              + (f'The last good checkpoint, step {kept[-1]}, is kept in '
                 f'{ckpt.directory}.' if kept else
                 'No checkpoint had been written yet.'))
        metrics_log.write(rec)
      if done - last_print_step >= int(cfg.log_every_steps) or done == total_steps:
        last_print_step = done
        rec_loss = float(host['loss'][n - 1])
        if sched.unit == 'epochs':
          where = f'epoch {sched.epoch_of(done):.2f}'
        elif steps_known:
          where = f'{sched.epoch_of(done):,.0f} {sched.unit}'
        else:     # the block in training, 1-based
          where = (f'{sched.unit.rstrip("s")} '
                   f'{max(math.ceil(sched.epoch_of(done) - 1e-9), 1)}')
        parts = [f'step {done}/{total_steps}' if steps_known
                 else f'step {done}',
                 where, f'loss {rec_loss:.4f}']
        if 'learning_rate' in host:
          parts.append(f'lr {float(host["learning_rate"][n - 1]):.4g}')
        if rate:
          parts.append(f'{rate:,.0f} ex/s')
          if flops_per_step and peak:
            parts.append(f'MFU {flops_per_step * rate / gbs / jax.device_count() / peak:.1%}')
          if steps_known:   # else later blocks' steps are not known yet
            parts.append(
                f'ETA {_fmt_time((total_steps - done) * gbs / rate)}')
        if evals:
          e = evals[-1]
          parts.append(f'last eval {w.metric} {e[w.metric]:.4f} '
                       + (f'@ epoch {e["epoch"]}' if sched.unit == 'epochs'
                          else f'@ {e["epoch"]:,} {sched.unit}'))
        self.say(' | '.join(parts))

    def save(step_: int):
      nonlocal last_ckpt_step
      ckpt.save(step_, state, {'seed': seed, 'evals': evals,
                               'state_layout': layout,
                               'epoch': sched.epoch_of(step_),
                               'workload': w.name,
                               'config': cfg.to_dict()})
      last_ckpt_step = step_

    try:
      prev_epoch = 0
      for epoch_end in eval_epochs:
        block_end = sched.steps_for(epoch_end)
        if block_end <= step:
          prev_epoch = epoch_end
          continue
        first_epoch, epoch_count = w.block_epochs(prev_epoch, epoch_end,
                                                  sched.epoch_of(step))
        ml.start(C.BLOCK_START, metadata={
            C.FIRST_EPOCH_NUM: first_epoch, C.EPOCH_COUNT: epoch_count})
        for key_, value_ in w.prepare_block(state, epoch_end).items():
          ml.event(key_, value_, metadata={C.EPOCH_NUM: epoch_end})
        # A schedule that counts a block's steps once its data exists
        # (self-play) knows them now.
        block_end = sched.steps_for(epoch_end)
        total_steps = sched.steps_for(train_epochs)
        while step < block_end:
          n = min(k, block_end - step)
          train_fn, call = make_call(n)
          state, dev_metrics = train_fn(state, call, jnp.int32(n))
          first = step
          step += n
          flush()                      # the previous call's metrics
          pending = (first, n, dev_metrics)
          every = int(cfg.checkpoint_every_steps)
          if every > 0 and step // every > last_ckpt_step // every \
              and step < block_end:
            flush()
            save(step)
          if self._stop_agreed():
            flush()
            save(step)
            ckpt.wait()
            raise _Preempted()
        flush()

        # ---- evaluation ----
        logged = w.logged_epoch(epoch_end)
        ml.start(C.EVAL_START, metadata={C.EPOCH_NUM: logged})
        if evaluator is not None:
          result = evaluator(state, eval_ds)
        else:
          sums = None
          first_eval = next(iter(spec_eval))
          eidx, ecount = _batch_slice(eval_sh[first_eval],
                                      spec_eval[first_eval].shape, axis=0)
          eval_specs = {batch_shape_key(sp): sp for sp in specs_eval}
          for batch in eval_ds.eval_batches(ebs, process_index=eidx,
                                            process_count=ecount):
            shape_key = batch_shape_key(batch, spec_eval)
            sp = eval_specs[shape_key]
            arrays = {key_: jax.make_array_from_process_local_data(
                eval_sh[key_], np.asarray(batch[key_]), sp[key_].shape)
                      for key_ in sp}
            out = eval_fns[shape_key](state, arrays)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
          result = w.eval_result(jax.device_get(sums))
        value = result[w.metric]
        ml.end(C.EVAL_STOP, metadata={C.EPOCH_NUM: logged})
        ml.event(C.EVAL_ACCURACY, w.logged_accuracy(result),
                 metadata={C.EPOCH_NUM: logged})
        ml.end(C.BLOCK_STOP, metadata={C.FIRST_EPOCH_NUM: first_epoch})
        ev = {'kind': 'eval', 'step': step, 'epoch': epoch_end, **result}
        evals.append(ev)
        metrics_log.write(ev)
        reached = w.reached_result(result)
        where = (f'epoch {epoch_end}' if sched.unit == 'epochs'
                 else f'{epoch_end:,} {sched.unit}')
        self.say(f'eval @ {where} (step {step}): {w.describe_result(result)}'
                 + ('  -> target reached' if reached else ''))
        prev_epoch = epoch_end
        save(step)
        if reached:
          status = 'success'
          break
        if self._stop_agreed():
          ckpt.wait()
          raise _Preempted()
    except _Preempted:
      metrics_log.close()
      self.say(f'SIGTERM: stopped at step {step}; checkpoint saved in '
               f'{ckpt.directory}. Run the same command to resume.')
      ckpt.close()
      return RunResult('preempted', step, sched.epoch_of(step), evals, None,
                       compile_s, log_path)
    except BaseException:
      metrics_log.close()
      ckpt.wait()
      raise

    run_s = time.perf_counter() - run_t0
    ml.end(C.RUN_STOP, metadata={C.STATUS: status})
    ckpt.close()
    metrics_log.write({'kind': 'run_stop', 'step': step, 'status': status,
                       'run_seconds': round(run_s, 3)})
    metrics_log.close()
    self.say(f'run_stop: {status} after {step} steps '
             + (f'({sched.epoch_of(step):.2f} epochs) ' if sched.unit == 'epochs'
                else f'({sched.epoch_of(step):,.0f} {sched.unit}) ')
             + f'in {_fmt_time(run_s)} '
             f'(run_start to run_stop); MLPerf log: {log_path}')
    return RunResult(status, step, sched.epoch_of(step), evals, run_s,
                     compile_s, log_path)


# Dense bfloat16 peak FLOP/s per device, by jax device_kind prefix.
_PEAK_FLOPS = {
    'NVIDIA H100': 989.4e12, 'NVIDIA H200': 989.4e12, 'NVIDIA H20': 148e12,
    'NVIDIA A100': 312e12, 'NVIDIA B200': 2250e12, 'NVIDIA L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
}


def _peak_flops(device) -> float | None:
  kind = getattr(device, 'device_kind', '')
  for prefix in sorted(_PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return _PEAK_FLOPS[prefix]
  return None


def _step_flops(w: Workload, abstract_state, stacked) -> float | None:
  """FLOPs of one train step as XLA counts them (None if it cannot say)."""
  one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in stacked.items()}
  try:
    cost = jax.jit(w.train_step).lower(abstract_state, one).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def _peek_record(ckpt: Checkpointer, step: int) -> dict:
  """The JSON record of a checkpoint, read without the state."""
  path = os.path.join(ckpt.directory, str(step), 'record', 'metadata')
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return {}
