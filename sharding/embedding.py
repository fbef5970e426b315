"""Embedding tables sharded over devices: lookups, sparse updates, hot rows.

A recommender's embedding tables (up to hundreds of millions of rows) cannot be
replicated, so they live in one stacked [rows, dim] array whose rows are split
into equal blocks over every device of the mesh (device d owns global rows
[d * R, (d + 1) * R)), while the batch, and the dense part of the model, are
split over the same devices (data parallel). Where each table sits in the
stack is the layout:

* 'row': the tables one after the other, the stack cut into equal blocks.
  Big tables span several devices, small ones sit on one; memory is
  balanced to a row. A lookup is an all-gather of the batch's indices (small),
  a gather of the rows each device owns (the others read as zeros: nothing is
  read for them) and a reduce-scatter that hands every device the rows of its
  own samples: [B, T, D] partial blocks, summed in transit.
* 'table': each table whole on one device (largest first onto the least
  loaded device with fewer than ceil(T / n) tables), each device's block
  padded to the largest. A lookup is the
  classic recommender all-to-all: every device sends each owner the indices of the
  owner's tables for its samples, owners gather, and a second all-to-all
  returns the rows. It moves 1/n of the row mode's data but balances memory
  only as well as the table sizes allow.

Both are written with shard_map, so what moves between devices is explicit.
The backward pass does not build a table-sized gradient: the loss is
differentiated with respect to the gathered rows (in the owners' layout:
the transposed collectives bring the gradients back to the owners), and each
owner scatter-adds -lr * gradient into its block (`sgd_update`). Repeated
indices add up, as in a dense SGD step; no collective ever carries a table.

Hybrid (hot rows replicated): the most frequent rows, chosen from a
frequency count of the training data, are also kept replicated on every
device ('hot' [H, dim]). A hot index is looked up locally and its gradient
summed across devices with an all-reduce of [H, dim]; tables whose every row
is hot (typically the many small tables) leave the exchange altogether, which is
where the communication saving is; the price is the all-reduce of the
[H, dim] gradient every step, so the hot set must be small beside what it
takes out of the exchange (bytes_per_sample counts both). Slots of hot rows
in partly hot tables still travel (as zeros): the exchange has static
shapes. The stacked array
keeps stale copies of hot rows; `merged` overlays the replicated values.
The hybrid model computes the same function, with the same updates, as the
plain sharded one (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MODES = ('row', 'table')
ROW_QUANTUM = 1024


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where every table's rows live in the stacked array.

  offsets[t]: the stacked row of table t's row 0; rows_per_shard: the block
  each device owns; owners/slots (table mode): which device holds table t and
  at which of its `tables_per_shard` positions.
  """
  table_sizes: tuple[int, ...]
  num_shards: int
  mode: str
  offsets: tuple[int, ...]
  rows_per_shard: int
  owners: tuple[int, ...] = ()
  slots: tuple[int, ...] = ()
  tables_per_shard: int = 0

  @property
  def total_rows(self) -> int:
    return self.rows_per_shard * self.num_shards

  @property
  def padding_rows(self) -> int:
    return self.total_rows - sum(self.table_sizes)


def make_layout(table_sizes: Sequence[int], num_shards: int,
                mode: str = 'row', replicated: Sequence[int] = ()) -> Layout:
  """Where each table goes. In the table layout, the `replicated` tables
  (looked up from the hot rows, never exchanged) do not count towards a
  device's share of tables."""
  sizes = tuple(int(s) for s in table_sizes)
  if mode not in MODES:
    raise ValueError(f'embedding layout {mode!r}: expected one of {MODES}')
  if num_shards < 1:
    raise ValueError(f'num_shards={num_shards}: expected >= 1')
  if mode == 'row':
    offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    # The stack is padded to a multiple of ROW_QUANTUM rows (and of the
    # device count), so any device count dividing it sees the same stack and
    # a checkpoint resumes on another mesh.
    quantum = math.lcm(ROW_QUANTUM, num_shards)
    total = max(1, -(-sum(sizes) // quantum)) * quantum
    return Layout(sizes, num_shards, mode, offsets, total // num_shards)
  # Largest first onto the least loaded device that holds fewer than
  # ceil(T / n) exchanged tables: the cap keeps the all-to-all's slots per
  # device (the most exchanged tables any device holds) at their minimum.
  # Replicated tables then fill the least loaded devices.
  load = [0] * num_shards
  members: list[list[int]] = [[] for _ in range(num_shards)]
  counted = [0] * num_shards
  rep = set(int(t) for t in replicated)
  cap = max(1, -(-(len(sizes) - len(rep)) // num_shards))
  for t in sorted(range(len(sizes)), key=lambda t: (t in rep, -sizes[t], t)):
    allowed = [d for d in range(num_shards) if t in rep or counted[d] < cap]
    d = min(allowed, key=lambda d: (load[d], len(members[d]), d))
    members[d].append(t)
    load[d] += sizes[t]
    counted[d] += t not in rep
  rows = max(1, max(load))
  offsets = [0] * len(sizes)
  owners = [0] * len(sizes)
  slots = [0] * len(sizes)
  for d, ts in enumerate(members):
    pos = d * rows
    for k, t in enumerate(sorted(ts)):
      offsets[t], owners[t], slots[t] = pos, d, k
      pos += sizes[t]
  return Layout(sizes, num_shards, mode, tuple(offsets), rows, tuple(owners),
                tuple(slots), max(1, max(len(m) for m in members)))


def hot_rows_from_counts(counts: Sequence[np.ndarray], num_hot: int
                         ) -> list[np.ndarray]:
  """The `num_hot` most frequent rows over all tables, from per-table
  occurrence counts: for each table, the sorted indices of its hot rows.
  Rows never seen are not hot."""
  empty = [np.zeros([0], np.int64) for _ in counts]
  if num_hot <= 0:
    return empty
  flat = np.concatenate([np.asarray(c, np.int64) for c in counts])
  num_hot = min(num_hot, int(np.count_nonzero(flat)))
  if not num_hot:
    return empty
  top = np.sort(np.argpartition(-flat, num_hot - 1)[:num_hot])
  starts = np.concatenate([[0], np.cumsum([len(c) for c in counts])])
  return [top[(top >= a) & (top < b)] - a
          for a, b in zip(starts[:-1], starts[1:])]


class ShardedEmbedding:
  """The tables of one model over one mesh: see the module docstring.

  Parameters are a dict {'tables': [total_rows, dim] split by rows over all
  mesh axes} plus, with hot rows, {'hot': [H, dim] replicated}.
  `hot_rows`: for each table, the indices of its hot rows (or None).
  """

  def __init__(self, table_sizes: Sequence[int], dim: int, mesh: Mesh, *,
               mode: str = 'row',
               hot_rows: Sequence[np.ndarray] | None = None,
               dtype=jnp.float32):
    self.mesh = mesh
    self.axes = tuple(mesh.axis_names)
    self.num_shards = int(mesh.devices.size)
    sizes = np.asarray(table_sizes, np.int64)
    if hot_rows is None:
      hot_rows = [np.zeros([0], np.int64) for _ in sizes]
    if len(hot_rows) != len(sizes):
      raise ValueError(f'hot rows given for {len(hot_rows)} tables, the model '
                       f'has {len(sizes)}')
    hot_rows = [np.unique(np.asarray(h, np.int64)) for h in hot_rows]
    for t, (h, n) in enumerate(zip(hot_rows, sizes)):
      if h.size and (h[0] < 0 or h[-1] >= n):
        raise ValueError(f'hot rows of table {t} must lie in [0, {n}); got '
                         f'{h[0]}..{h[-1]}')
    self.replicated_tables = tuple(
        t for t, (h, n) in enumerate(zip(hot_rows, sizes)) if h.size == n)
    self.routed_tables = tuple(t for t in range(len(sizes))
                               if t not in self.replicated_tables)
    self.layout = make_layout(sizes, self.num_shards, mode,
                              replicated=self.replicated_tables)
    self.dim = int(dim)
    self.dtype = dtype
    self._offsets = np.asarray(self.layout.offsets, np.int64)
    # Tables in stacking order (the table layout does not stack them in
    # feature order), to map a stacked row to its table.
    self._order = np.argsort(self._offsets, kind='stable').astype(np.int32)
    self.hot_ids = np.sort(np.concatenate(
        [h + o for h, o in zip(hot_rows, self._offsets)]).astype(np.int64))
    # Table layout: each routed table's position among its owner's routed
    # tables, and the most any owner has (the all-to-all's K).
    seen: dict[int, int] = {}
    self._slots = []
    for t in self.routed_tables:
      owner = self.layout.owners[t] if self.layout.mode == 'table' else 0
      self._slots.append(seen.get(owner, 0))
      seen[owner] = self._slots[-1] + 1
    self._k = max(seen.values(), default=0)

  # --- parameters ---------------------------------------------------------------
  @property
  def num_tables(self) -> int:
    return len(self.layout.table_sizes)

  def shardings(self) -> dict[str, NamedSharding]:
    out = {'tables': NamedSharding(self.mesh, P(self.axes, None))}
    if self.hot_ids.size:
      out['hot'] = NamedSharding(self.mesh, P())
    return out

  def _row_table(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(table index, valid) of stacked rows (padding rows are not valid)."""
    offsets = jnp.asarray(self._offsets, jnp.int32)
    sizes = jnp.asarray(self.layout.table_sizes, jnp.int32)
    k = jnp.searchsorted(offsets[self._order], rows, side='right') - 1
    t = jnp.asarray(self._order)[jnp.clip(k, 0, self.num_tables - 1)]
    return t, (rows >= offsets[t]) & (rows < offsets[t] + sizes[t])

  def init(self, key: jax.Array) -> dict[str, jax.Array]:
    """Every table uniform in +-sqrt(1/rows) (the reference's init), padding
    rows zero. Elementwise over the stacked array, so under jit with the
    shardings above each device draws only its own block (the counter-based
    RNG makes the values independent of the mesh)."""
    rows = jnp.arange(self.layout.total_rows, dtype=jnp.int32)
    t, valid = self._row_table(rows)
    bound = jnp.asarray(np.sqrt(1.0 / np.asarray(self.layout.table_sizes,
                                                 np.float64)), self.dtype)[t]
    u = jax.random.uniform(key, (self.layout.total_rows, self.dim), self.dtype,
                           -1.0, 1.0)
    tables = jnp.where(valid[:, None], u * bound[:, None], 0).astype(self.dtype)
    if not self.hot_ids.size:
      return {'tables': tables}
    return {'tables': tables,
            'hot': jnp.take(tables, jnp.asarray(self.hot_ids, jnp.int32),
                            axis=0)}

  def from_tables(self, tables: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Host parameters from per-table arrays (e.g. interop.from_torch)."""
    if len(tables) != self.num_tables:
      raise ValueError(f'{len(tables)} tables given, the model has '
                       f'{self.num_tables}')
    stacked = np.zeros((self.layout.total_rows, self.dim), np.float32)
    for t, (table, off) in enumerate(zip(tables, self.layout.offsets)):
      table = np.asarray(table)
      want = (self.layout.table_sizes[t], self.dim)
      if table.shape != want:
        raise ValueError(f'table {t}: shape {table.shape}, expected {want}')
      stacked[off:off + want[0]] = table
    if not self.hot_ids.size:
      return {'tables': stacked}
    return {'tables': stacked, 'hot': stacked[self.hot_ids]}

  def merged(self, params: dict[str, jax.Array]) -> jax.Array:
    """The stacked tables with the replicated hot rows written in."""
    if not self.hot_ids.size:
      return params['tables']
    return params['tables'].at[jnp.asarray(self.hot_ids, jnp.int32)].set(
        params['hot'])

  def to_tables(self, params: dict[str, Any]) -> list[np.ndarray]:
    """Per-table host arrays (hot rows merged in)."""
    stacked = np.asarray(jax.device_get(self.merged(params)))
    return [stacked[o:o + n] for o, n in zip(self.layout.offsets,
                                             self.layout.table_sizes)]

  def signature(self) -> dict[str, Any]:
    """What a checkpoint of these parameters depends on: the stack's shape
    and order, and the hot set."""
    sig = {'layout': self.layout.mode, 'stacked_rows': self.layout.total_rows,
           'hot_rows': int(self.hot_ids.size),
           'hot_ids_checksum': int(np.sum(self.hot_ids * 2654435761
                                          % 1000003) % 1000003)}
    if self.layout.mode == 'table':
      sig['devices'] = self.num_shards
    return sig

  # --- lookups ------------------------------------------------------------------
  def route(self, sparse: jax.Array) -> dict[str, jax.Array]:
    """Per-sample bookkeeping of a batch of indices [B, T] (data parallel, no
    communication): stacked ids of the routed tables, and where hot."""
    offsets = jnp.asarray(self._offsets, jnp.int32)
    gids = sparse.astype(jnp.int32) + offsets[None, :]
    out = {}
    if self.hot_ids.size:
      hot_ids = jnp.asarray(self.hot_ids, jnp.int32)
      pos = jnp.clip(jnp.searchsorted(hot_ids, gids), 0, hot_ids.shape[0] - 1)
      is_hot = hot_ids[pos] == gids
      out['hot_pos'], out['is_hot'] = pos, is_hot
      routed = jnp.where(is_hot, -1, gids)
    else:
      routed = gids
    out['ids'] = routed[:, list(self.routed_tables)]
    return out

  def _owner_ids(self, ids: jax.Array) -> jax.Array:
    """Inside shard_map: this device's rows of the routed ids [B, T] ->
    the ids, in the owners' layout, that this device must gather (local row
    numbers; -1 where it owns nothing)."""
    lay = self.layout
    r = lay.rows_per_shard
    me = jax.lax.axis_index(self.axes)
    if lay.mode == 'row':
      everyone = jax.lax.all_gather(ids, self.axes, tiled=True)   # [B, Tr]
      local = everyone - me * r
      return jnp.where((everyone >= 0) & (local >= 0) & (local < r), local, -1)
    # table mode: send each owner the ids of its tables. [b, Tr] ->
    # [n, b, K] -> all_to_all -> [n (source), b, K].
    send_map, send_ok = self._table_maps()
    send = jnp.where(send_ok[:, None, :], ids[:, send_map].transpose(1, 0, 2),
                     -1)
    got = jax.lax.all_to_all(send, self.axes, 0, 0, tiled=True)
    local = got - me * r
    return jnp.where((got >= 0) & (local >= 0) & (local < r), local, -1)

  def _table_maps(self) -> tuple[np.ndarray, np.ndarray]:
    """[n, K] positions (among the routed tables) of each owner's routed
    tables, and which of the K slots are used."""
    lay = self.layout
    send_map = np.zeros((lay.num_shards, self._k), np.int32)
    send_ok = np.zeros((lay.num_shards, self._k), bool)
    for i, t in enumerate(self.routed_tables):
      send_map[lay.owners[t], self._slots[i]] = i
      send_ok[lay.owners[t], self._slots[i]] = True
    return send_map, send_ok

  def _spec(self, ndim: int) -> P:
    return P(self.axes, *([None] * (ndim - 1)))

  def gather(self, tables: jax.Array, route: dict[str, jax.Array]
             ) -> tuple[jax.Array, jax.Array]:
    """(owner ids, rows): what each device gathers from its own block, in the
    owners' layout (global arrays split over all devices)."""
    ids = route['ids']
    k = 2 if self.layout.mode == 'row' else 3

    def body(block, ids):
      own = self._owner_ids(ids)
      r = self.layout.rows_per_shard
      rows = jnp.take(block, jnp.where(own >= 0, own, r), axis=0, mode='fill',
                      fill_value=0)
      return own, rows

    if not self.routed_tables:
      return (jnp.zeros((0,), jnp.int32), jnp.zeros((0, self.dim), self.dtype))
    return jax.shard_map(
        body, mesh=self.mesh,
        in_specs=(self._spec(2), self._spec(2)),
        out_specs=(self._spec(k), self._spec(k + 1)),
        check_vma=False)(tables, ids)

  def combine(self, rows: jax.Array, hot: jax.Array | None,
              route: dict[str, jax.Array]) -> jax.Array:
    """Rows in the owners' layout (+ the hot table, None without hot rows)
    -> embeddings [B, T, D]
    of each device's own samples. Linear in rows and hot, so its transpose
    takes the embeddings' gradients back to the owners."""
    lay = self.layout

    def back(rows):
      if lay.mode == 'row':
        return jax.lax.psum_scatter(rows, self.axes, scatter_dimension=0,
                                    tiled=True)
      got = jax.lax.all_to_all(rows, self.axes, 0, 0, tiled=True)
      # [n (owner), b, K, D] -> [b, Tr, D]
      owners = np.asarray([lay.owners[t] for t in self.routed_tables])
      return got[owners, :, np.asarray(self._slots)].transpose(1, 0, 2)

    parts = []
    if self.routed_tables:
      k = 3 if lay.mode == 'row' else 4
      routed = jax.shard_map(back, mesh=self.mesh, in_specs=self._spec(k),
                             out_specs=self._spec(3), check_vma=False)(rows)
      parts.append(routed)
    b = route['ids'].shape[0]
    emb = jnp.zeros((b, self.num_tables, self.dim), self.dtype)
    if self.routed_tables:
      emb = emb.at[:, list(self.routed_tables)].set(parts[0])
    if self.hot_ids.size:
      hot_rows = jnp.take(hot, route['hot_pos'], axis=0)
      emb = jnp.where(route['is_hot'][..., None], hot_rows, emb)
    return emb

  def lookup(self, params: dict[str, jax.Array], sparse: jax.Array
             ) -> jax.Array:
    route = self.route(sparse)
    _, rows = self.gather(params['tables'], route)
    return self.combine(rows, params.get('hot'), route)

  def sgd_update(self, tables: jax.Array, owner_ids: jax.Array,
                 row_grads: jax.Array, lr: jax.Array) -> jax.Array:
    """Each owner adds -lr * gradient to the rows it served (no
    communication, no table-sized temporary)."""
    if not self.routed_tables:
      return tables
    k = 2 if self.layout.mode == 'row' else 3
    r = self.layout.rows_per_shard

    def body(block, own, grads):
      flat = own.reshape(-1)
      upd = (-lr * grads.reshape(-1, self.dim)).astype(block.dtype)
      return block.at[jnp.where(flat >= 0, flat, r)].add(upd, mode='drop')

    return jax.shard_map(
        body, mesh=self.mesh,
        in_specs=(self._spec(2), self._spec(k), self._spec(k + 1)),
        out_specs=self._spec(2), check_vma=False)(tables, owner_ids, row_grads)

  # --- accounting -----------------------------------------------------------------
  def bytes_per_sample(self, global_batch: int) -> dict[str, float]:
    """Embedding bytes one training sample costs, summed over devices: rows
    read from the tables (forward) and updated (read + write of each
    touched row); the rows' share of the exchange between devices (forward
    and backward); and the all-reduce of the hot rows' gradient ([H, dim]
    once a step, a ring moving 2 (n - 1) / n of it per device), per sample
    of a global batch of `global_batch`."""
    d = self.dim * jnp.dtype(self.dtype).itemsize
    t_all = self.num_tables
    n = self.num_shards
    if n == 1:
      moved = hot = 0.0
    else:
      if self.layout.mode == 'row':
        # reduce-scatter forward and all-gather backward of [B, Tr, D]:
        # (n - 1)/n of every device's [B, Tr, D] leaves it.
        moved = 2 * len(self.routed_tables) * d * (n - 1)
      else:
        # all-to-all of [n, b, K, D] both ways (K: the most exchanged
        # tables on one device); (n - 1)/n of it leaves each device.
        moved = 2 * self._k * d * (n - 1)
      hot = 2 * (n - 1) * self.hot_ids.size * d / max(global_batch, 1)
    return {'rows_read': float(t_all * d), 'rows_updated': float(2 * t_all * d),
            'exchanged': float(moved), 'hot_allreduce': float(hot)}


def is_table_sized(shape: Sequence[int], layout: Layout, dim: int) -> bool:
  """Whether an array of `shape` is as big as a device's block of rows."""
  return math.prod(shape) >= layout.rows_per_shard * dim
