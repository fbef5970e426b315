"""The workload contract: everything the trainer needs to know about a benchmark.

A workload module gives the trainer its model, optimizer, steps, data and the
MLPerf identity and hyperparameters; the trainer knows no workload by name.
Steps are pure functions; losses are sums and counts so padding can be masked.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from jaxperf.config import Config
from jaxperf.sharding import mesh as mesh_lib


class TrainState(struct.PyTreeNode):
  """Everything a step changes: saved and restored whole by checkpoints."""
  step: jax.Array
  params: Any
  model_state: Any     # mutable model collections, e.g. batch statistics
  opt_state: Any
  rng: jax.Array       # raw uint32 key data, so it checkpoints as an array


class Dataset(Protocol):
  """What the trainer asks of a training or evaluation source."""
  num_examples: int

  def train_batches(self, start_step: int, global_batch: int, *,
                    process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, Any]]: ...

  def eval_batches(self, global_batch: int, *, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, Any]]: ...

  def close(self) -> None: ...


class Evaluator(Protocol):
  """A workload's own evaluation: the state and the eval source in, the
  eval_result-style metrics (including the workload's metric) out."""

  def __call__(self, state: 'TrainState', eval_ds: Dataset
               ) -> dict[str, float]: ...


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How a run's steps map onto MLPerf epochs.

  An "epoch" is `train_examples` samples; a workload whose MLPerf progress is
  counted in samples (BERT) uses train_examples=1 and unit='samples'.
  """
  train_examples: int
  global_batch: int
  unit: str = 'epochs'
  # Whether every block's steps are known from the start (the step total
  # and ETA of the progress lines mean something).
  steps_known = True

  def steps_for(self, epochs: float) -> int:
    """Steps until `epochs` epochs of data have been seen (rounded up: the
    batch that crosses an epoch boundary belongs to the earlier epoch)."""
    return -(-round(epochs * self.train_examples) // self.global_batch)

  @property
  def steps_per_epoch(self) -> float:
    return self.train_examples / self.global_batch

  def epoch_of(self, step: int) -> float:
    return step * self.global_batch / self.train_examples


class Workload(abc.ABC):
  """One MLPerf benchmark."""

  name: str                 # CLI name, e.g. resnet50
  benchmark: str            # MLPerf name as the checker spells it, e.g. resnet
  metric: str               # the quality metric's key in eval results
  higher_is_better: bool = True
  description: str = ''
  # Config overrides jaxperf.bench applies on a CPU when no --config is
  # given (after its own: batch 16, float32), for workloads whose full size
  # cannot run there.
  bench_cpu_overrides: dict[str, Any] = {}
  # Config overrides jaxperf.bench always applies (before --set): what the
  # timed steps need to stay finite from random weights.
  bench_overrides: dict[str, Any] = {}
  # False for a workload that makes its own training data (self-play) and
  # reads no dataset.
  uses_data_dir: bool = True

  def __init__(self, config: Config):
    self.config = config
    self.schedule: Schedule | None = None

  # --- identity and target -------------------------------------------------
  @property
  def target(self) -> float:
    return float(self.config.target_accuracy)

  def reached(self, value: float) -> bool:
    return value >= self.target if self.higher_is_better else value <= self.target

  def reached_result(self, result: Mapping[str, Any]) -> bool:
    """Whether an evaluation's results meet the quality target (a
    workload with several targets checks them all)."""
    return self.reached(result[self.metric])

  def logged_accuracy(self, result: Mapping[str, Any]) -> Any:
    """The eval_accuracy value of the MLPerf log for an evaluation's
    results: the metric, or what the benchmark's checker rules want."""
    return result[self.metric]

  def describe_target(self) -> str:
    """The quality target, for the console."""
    return f'{self.metric} {"≥" if self.higher_is_better else "≤"} {self.target}'

  def describe_result(self, result: Mapping[str, Any]) -> str:
    """An evaluation's outcome against the target, for the console."""
    return (f'{self.metric} = {result[self.metric]:.4f} '
            f'(target {self.target})')

  # --- data ----------------------------------------------------------------
  def set_workdir(self, workdir: str) -> None:
    """The run's workdir, given before `datasets`: a workload that keeps
    run data beside the checkpoints (MiniGo: its self-play games) keeps
    it under here."""
    del workdir

  def prepare_block(self, state: TrainState, epoch: float
                    ) -> dict[str, Any]:
    """Called at the start of each block of training, before its steps,
    with the state it starts from and the epoch it ends at: a workload
    whose training data comes from its own weights (self-play) makes the
    block's data here; the schedule may then count the block's steps.
    Returns MLPerf events to log for the block ({key: value}, with the
    block's epoch_num); by default nothing."""
    del state, epoch
    return {}

  @abc.abstractmethod
  def datasets(self, data_dir: str | None, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval) sources: the reference format under data_dir, or the
    synthetic learnable source when data_dir is None."""

  @abc.abstractmethod
  def batch_spec(self, global_batch: int, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes and dtypes of one batch, for ahead-of-time compilation."""

  def batch_specs(self, global_batch: int, train: bool
                  ) -> list[dict[str, jax.ShapeDtypeStruct]]:
    """Every batch shape the data can take, each compiled ahead of time
    (e.g. one per image bucket); by default the one of `batch_spec`. The
    specs must have the same keys and differ in more than the batch size."""
    return [self.batch_spec(global_batch, train)]

  def setup(self, train_examples: int) -> Schedule:
    """Called once the training set size is known, before init."""
    self.schedule = Schedule(train_examples, int(self.config.global_batch_size))
    return self.schedule

  def train_length(self) -> int:
    """How many epochs (in the Schedule's unit) a run lasts at most."""
    return int(self.config.train_epochs)

  # --- state -----------------------------------------------------------------
  @abc.abstractmethod
  def init_state(self, rng: jax.Array) -> TrainState:
    """A fresh state (traced under jit with out_shardings by the trainer)."""

  def state_sharding(self, abstract_state: TrainState, mesh: Mesh) -> Any:
    """Shardings for the state; the default replicates everything."""
    rep = mesh_lib.replicated(mesh)
    return jax.tree.map(lambda _: rep, abstract_state)

  def load_initial_weights(self, state: TrainState, shardings: Any
                           ) -> TrainState:
    """A fresh run's state after loading any starting checkpoint the config
    names (e.g. BERT's phase-1 checkpoint); by default the state unchanged."""
    del shardings
    return state

  def state_layout(self) -> dict[str, Any] | None:
    """What the state's shapes depend on beyond the config (e.g. how
    tables are stacked for this mesh), saved with checkpoints: a resume whose
    layout differs is refused with a message instead of failing to load.
    None: nothing beyond the config."""
    return None

  def check_mesh(self, mesh: Mesh) -> None:
    """Called with the run's mesh before the state is built: reject a mesh
    the workload cannot use (ConfigError) or adapt to it."""
    del mesh

  def batch_partition(self, mesh: Mesh, train: bool) -> dict[str, P]:
    """How each batch array is split over the mesh: by default the leading
    (batch) axis over the data-parallel axes, the rest replicated."""
    axes = mesh_lib.batch_axes(mesh) or None
    return {k: P(axes) for k in self.batch_spec(0, train)}

  # --- steps -----------------------------------------------------------------
  @abc.abstractmethod
  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; metrics must include 'loss'."""

  # eval_step and eval_result: every workload whose make_evaluator returns
  # None (the default) defines both; one with its own evaluation (MiniGo
  # plays games) needs neither.
  def eval_step(self, state: TrainState, batch: Mapping[str, jax.Array]
                ) -> dict[str, jax.Array]:
    """Sums over the valid (mask=True) examples of the batch."""
    raise TypeError(f'{type(self).__name__} defines no eval_step: its '
                    f'make_evaluator must return its evaluation')

  def eval_result(self, sums: Mapping[str, float]) -> dict[str, float]:
    """Final metrics from summed eval_step outputs; includes self.metric."""
    raise TypeError(f'{type(self).__name__} defines no eval_result: its '
                    f'make_evaluator must return its evaluation')

  def make_evaluator(self, mesh: Mesh, abstract_state: Any
                     ) -> 'Evaluator | None':
    """An evaluation that does not fit batches of eval_step sums (e.g.
    sliding-window inference over whole volumes), compiled ahead of time
    here; None (the default) uses eval_step over eval_batches."""
    del mesh, abstract_state
    return None

  # --- benchmarking -------------------------------------------------------------
  def bench_batch(self, global_batch: int, seed: int
                  ) -> 'dict[str, Any] | None':
    """A host batch (numpy) for jaxperf.bench when random arrays of
    batch_spec would not be a valid input; None: random arrays."""
    del global_batch, seed
    return None

  def bench_info(self) -> dict[str, Any]:
    """Workload-specific numbers jaxperf.bench records with its results
    (e.g. DLRM's embedding bytes per sample); by default none."""
    return {}

  def bench_phases(self, state: TrainState, seed: int, log
                   ) -> dict[str, dict[str, Any]]:
    """Timed phases of the workload beyond the train step, for
    jaxperf.bench: {name: {'summary': one line for the table, numbers...}}
    (MiniGo: self-play); by default none."""
    del state, seed, log
    return {}

  def count_params(self, params: Any) -> int:
    """The model's parameter count from the state's parameters (a
    workload whose state pads or duplicates parameters says so here)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))

  def flops_per_example(self) -> float | None:
    """Training FLOPs per example by formula (forward + backward matmuls),
    where the workload knows it; None otherwise."""
    return None

  # --- MLPerf logging ----------------------------------------------------------
  @abc.abstractmethod
  def mlperf_hyperparameters(self) -> dict[str, Any]:
    """Hyperparameters with the exact keys the checker wants."""

  @abc.abstractmethod
  def initialized_tensors(self, state: TrainState) -> list[str]:
    """The tensor names the weights_initialization events carry."""

  def logged_epoch(self, epoch: float) -> float:
    """The epoch_num the MLPerf log gives an evaluation after `epoch`
    epochs (in the Schedule's unit)."""
    return epoch

  def block_epochs(self, prev_epoch: float, epoch_end: float,
                   epoch_at_step: float) -> tuple[float, float]:
    """(first_epoch_num, epoch_count) of the block that trains from
    the evaluation at prev_epoch (or a resume at epoch_at_step) to
    epoch_end: by default whole epochs numbered from 1."""
    first = max(prev_epoch + 1, int(epoch_at_step) + 1)
    return first, epoch_end - first + 1

  def eval_epochs(self, train_epochs: int) -> list[int]:
    """Epoch numbers (from 1) after which to evaluate."""
    every = int(self.config.eval_every_epochs)
    offset = int(self.config.eval_offset_epochs) % every
    first = offset if offset > 0 else every
    epochs = list(range(first, train_epochs + 1, every))
    if not epochs or epochs[-1] != train_epochs:
      epochs.append(train_epochs)
    return epochs


class ReplicatedEval:
  """An evaluation that reads per-batch outputs back to the host.

  `fn(arg, batch)` is compiled for eval batches split over the mesh like
  the workload's (batch_partition) with replicated outputs, so every process
  sees the outputs of the whole global batch. `outputs` runs it over the
  eval source, reading each batch's result after the next one is
  dispatched, and returns `collect(result)` per batch. This process's rows
  of a batch are those of `slice_key`'s sharding.
  """

  def __init__(self, workload: Workload, mesh: Mesh, fn, abstract_arg: Any,
               slice_key: str):
    from jaxperf.trainer import _batch_slice  # pylint: disable=g-import-not-at-top
    self.batch = int(workload.config.eval_batch_size)
    specs = workload.batch_specs(self.batch, train=False)
    part = workload.batch_partition(mesh, train=False)
    self.shardings = {k: jax.sharding.NamedSharding(mesh, part[k])
                      for k in specs[0]}
    self.slice = _batch_slice(self.shardings[slice_key],
                              specs[0][slice_key].shape, 0)
    jitted = jax.jit(fn, out_shardings=mesh_lib.replicated(mesh))
    # One program per batch shape: {shape key: (spec, compiled)}.
    self.fns = {batch_shape_key(spec): (spec, jitted.lower(
        abstract_arg,
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.shardings[k])
         for k, v in spec.items()}).compile()) for spec in specs}

  def outputs(self, arg: Any, eval_ds: Dataset, collect) -> list[Any]:
    index, count = self.slice
    results, pending = [], None
    for batch in eval_ds.eval_batches(self.batch, process_index=index,
                                      process_count=count):
      key = batch_shape_key(batch, self.shardings)
      if key not in self.fns:
        raise ValueError(
            f'an eval batch of shapes {dict(key)} matches none of the '
            f'{len(self.fns)} compiled ones ({[dict(k) for k in self.fns]}); '
            f'the workload\'s batch_specs must list every eval shape')
      spec, fn = self.fns[key]
      arrays = {k: jax.make_array_from_process_local_data(
          self.shardings[k], np.asarray(batch[k], spec[k].dtype),
          spec[k].shape) for k in spec}
      out = fn(arg, arrays)
      if pending is not None:
        results.append(collect(jax.device_get(pending)))
      pending = out
    if pending is not None:
      results.append(collect(jax.device_get(pending)))
    return results


class ShardMapDataParallel:
  """Pure data parallelism for a Workload whose loss runs inside shard_map.

  The mesh's axes must all be batch axes. The per-device loss and its
  gradients are computed on each device's share of the batch, with one
  mean of the gradients over the data-parallel devices (for the detectors:
  the SPMD partitioner would all-gather the activations of grouped
  convolutions, and their per-device sampling is the reference's anyway).
  Parameters `frozen_mask(params)` marks True are not differentiated.
  Needs `self.config`, `self.name` and a `self.mesh = None` default.
  """

  def check_mesh(self, mesh) -> None:
    """Pure data parallelism: every mesh axis must be a batch axis."""
    other = [a for a in mesh.axis_names
             if a not in mesh_lib.batch_axes(mesh) and mesh.shape[a] > 1]
    if other:
      from jaxperf.errors import ConfigError  # pylint: disable=g-import-not-at-top
      raise ConfigError(
          f'--mesh {mesh_lib.describe(mesh)}: {self.name} is data parallel '
          f'only; axes {other} would split the model')
    mesh_lib.check_batches_divide(self.config,
                                  mesh_lib.data_parallel_size(mesh), mesh,
                                  'the data-parallel')
    self.mesh = mesh

  def _dp_axes(self) -> tuple[str, ...]:
    """The mesh axes the batch is split over; () on one device."""
    if self.mesh is None or self.mesh.devices.size == 1:
      return ()
    return mesh_lib.batch_axes(self.mesh)

  def _data_parallel(self, fn, in_specs, out_specs):
    """fn under shard_map over the data-parallel axes (as is on one)."""
    if not self._dp_axes():
      return fn
    # check_vma=False: gradients of the replicated parameters stay per
    # device inside (the matmul kernel gradient's custom VJP yields them
    # so), and the step reduces them itself, once.
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)

  def _local_key(self, key: jax.Array) -> jax.Array:
    """Inside `_data_parallel`: a key of this device's own."""
    axes = self._dp_axes()
    if not axes:
      return key
    return jax.random.fold_in(key, jax.lax.axis_index(axes))

  def _trainable_grads(self, loss_terms, state: TrainState,
                       batch: Mapping[str, jax.Array], frozen: Any,
                       *extra: Any) -> tuple[Any, dict[str, jax.Array]]:
    """(gradients, loss terms) of `loss_terms(params, model_state, batch,
    *extra)` (a dict with 'loss', the mean over the device's examples),
    both averaged over the data-parallel devices. Frozen parameters enter
    as constants and get zero gradients. `extra` is replicated."""
    trainable = jax.tree.map(lambda p, f: None if f else p, state.params,
                             frozen)
    fixed = jax.tree.map(lambda p, f: p if f else None, state.params, frozen)
    axes = self._dp_axes()

    def local(trainable, fixed, model_state, batch, extra):
      def loss_fn(tp):
        params = jax.tree.map(lambda t, f: f if t is None else t, tp, fixed,
                              is_leaf=lambda x: x is None)
        out = loss_terms(params, model_state, batch, *extra)
        return out['loss'], out
      grads, out = jax.grad(loss_fn, has_aux=True)(trainable)
      if axes:
        # Every device holds the same number of examples, so the mean of
        # the per-device means is the global batch's mean.
        grads, out = jax.lax.pmean((grads, out), axes)
      return grads, out

    batch_spec = {k: P(axes or None) for k in batch}
    grads, out = self._data_parallel(
        local, in_specs=(P(), P(), P(), batch_spec, P()),
        out_specs=(P(), P()))(trainable, fixed, state.model_state, batch,
                              extra)
    grads = jax.tree.map(lambda g, p: jnp.zeros_like(p) if g is None else g,
                         grads, state.params, is_leaf=lambda x: x is None)
    return grads, out


def accumulation_steps(config: Config) -> int:
  """gradient_accumulation_steps, checked: a positive divisor of
  global_batch_size (ConfigError otherwise)."""
  from jaxperf.errors import ConfigError  # pylint: disable=g-import-not-at-top
  n = int(config.gradient_accumulation_steps)
  if n < 1 or int(config.global_batch_size) % n:
    raise ConfigError(
        f'gradient_accumulation_steps={config.gradient_accumulation_steps}: '
        f'expected a positive divisor of global_batch_size='
        f'{config.global_batch_size}')
  return n


def accumulated_grads(grads_of, params: Any, batch: Mapping[str, jax.Array],
                      num_micro: int, key: jax.Array | None = None):
  """((loss, aux), grads) of a batch as the mean over `num_micro` micro-
  batches (the reference's gradient accumulation), so a global batch
  larger than the devices hold still takes one optimizer step.

  `grads_of(params, micro_batch, key)` returns ((loss, aux dict), grads)
  like jax.value_and_grad(..., has_aux=True); micro-batch i gets
  fold_in(key, i). The batch's leading axis [B] is viewed as [B/n, n] so
  each device keeps its own rows, and a scan runs over the second axis.
  """
  if num_micro == 1:
    return grads_of(params, batch, key)
  micro = jax.tree.map(
      lambda x: jnp.swapaxes(
          x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1),
      dict(batch))

  def body(total, xs):
    i, mb = xs
    out = grads_of(params, mb,
                   None if key is None else jax.random.fold_in(key, i))
    return jax.tree.map(jnp.add, total, out), None

  first = jax.eval_shape(grads_of, params,
                         jax.tree.map(lambda x: x[0], micro), key)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
  return jax.tree.map(lambda x: x / num_micro, total)


def batch_shape_key(batch: Mapping[str, Any], keys=None) -> tuple:
  """What tells a batch's compiled program apart: each array's shape
  without the leading (batch) axis, by key (of `keys`, default all). Takes
  arrays or specs."""
  keys = batch.keys() if keys is None else keys
  return tuple(sorted((k, tuple(batch[k].shape[1:])) for k in keys))


def random_boxes(rng: np.random.Generator, batch: int, max_boxes: int,
                 height: int, width: int, max_per_image: int = 8
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Padded ground truth for benchmarking detectors: 1..max_per_image
  boxes per image, 10-40% of the image's sides, inside it. Returns
  (float32 [batch, max_boxes, 4] (x1, y1, x2, y2), bool valid [batch,
  max_boxes])."""
  n = rng.integers(1, min(max_per_image, max_boxes) + 1, batch)
  xy = rng.uniform(0, 0.6, (batch, max_boxes, 2)) * [width, height]
  wh = rng.uniform(0.1, 0.4, (batch, max_boxes, 2)) * [width, height]
  valid = np.arange(max_boxes)[None, :] < n[:, None]
  boxes = np.where(valid[..., None], np.concatenate([xy, xy + wh], -1), 0)
  return boxes.astype(np.float32), valid


def replace_backbone(state: TrainState, shardings: Any,
                     loaded: Mapping[str, Any]) -> TrainState:
  """The state with the parameters and batch statistics under 'backbone'
  replaced by `loaded` ({'params': {'backbone': ...}, 'batch_stats':
  {'backbone': ...}}, e.g. from jaxperf.interop), placed as `shardings`
  place the state's and cast to its dtypes."""
  put = lambda x, s, ref: jax.device_put(np.asarray(x, ref.dtype), s)
  params = dict(state.params)
  params['backbone'] = jax.tree.map(put, loaded['params']['backbone'],
                                    shardings.params['backbone'],
                                    state.params['backbone'])
  stats = dict(state.model_state['batch_stats'])
  stats['backbone'] = jax.tree.map(
      put, loaded['batch_stats']['backbone'],
      shardings.model_state['batch_stats']['backbone'],
      state.model_state['batch_stats']['backbone'])
  return state.replace(params=params,
                       model_state={**state.model_state, 'batch_stats': stats})


def rng_key(state: TrainState) -> jax.Array:
  return jax.random.wrap_key_data(state.rng)


def new_rng(seed: int) -> jax.Array:
  return jax.random.key_data(jax.random.key(seed))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1)
