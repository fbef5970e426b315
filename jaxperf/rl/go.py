"""The rules of Go as MLPerf's MiniGo plays them, as jittable JAX functions.

Every function takes and returns ONE game's state; `jax.vmap` runs many
games side by side. The board size N is static (the shape of the arrays).

Conventions (as the reference's go.py / coords.py):
  * board: int8 [N * N], row-major (point = row * N + col, row 0 at the
    top), 0 empty, 1 black, -1 white; `to_play` is 1 (black) or -1 (white).
  * moves: int in [0, N * N]; N * N is the pass.

Rules, as the reference's C++ engine (cc/position.{h,cc}, cc/mcts_tree.cc)
that MLPerf's self-play runs:
  * suicide is illegal (`ClassifyMoveIgnoringSuperko`: a move needs an empty
    neighbour, a capture, or a connection to a friendly chain with more than
    one liberty);
  * simple ko: after a move that captured exactly one stone with a stone
    whose neighbours were all the opponent's, the captured point is illegal
    for the next move (`AddStoneToBoard`, `IsKoish`); a pass clears it;
  * positional superko: a move is illegal if the stones it leaves on the
    board (after its captures; whoever is to move does not count) are those
    of any earlier position of the game (`UpdateLegalMoves` with the tree's
    `ZobristHistory`). Positions are identified by a 64-bit Zobrist-style
    hash (two uint32 lanes, the sum modulo 2^32 of a random key per
    point and colour; a sum rather than an XOR so a chain's key can be
    taken by a scatter-add), and the hash of every position of the game is
    kept (`State.hashes`);
  * the pass is always legal; two consecutive passes end the game, as does
    reaching the move cap (default 2 * N * N moves, passes included: the
    reference's `max_game_length`, mcts.py);
  * the score is Tromp-Taylor area from black's point of view: stones plus
    empty regions that reach only one colour, minus komi (7.5,
    cc/constants.h `kDefaultKomi`).

Illegal moves: `step` never plays one. Given a move that `legal_moves` does
not allow, it leaves the board as it was and sets `illegal` and `game_over`;
`to_play` stays the offending player, and `winner` gives the game to the
other. Stepping a finished game returns it unchanged, so a vmapped loop can
keep stepping games that have ended.

Chains are tracked incrementally: `State.chain` holds, at each stone, the
index of one stone of its chain (the same for the whole chain); a move
merges the chains it touches and removes the ones it captures, so `step`
needs no flood fill. `from_board` labels an arbitrary position with a
`lax.while_loop` of neighbour-minimum propagation and pointer jumping, and
`score` floods the empty regions with a `lax.while_loop` of dilations, both
until nothing changes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KOMI = 7.5
BLACK = 1
WHITE = -1
EMPTY = 0
HISTORY = 8             # positions kept for the input features
FEATURE_PLANES = {'mlperf07': 13, 'agz': 17}
_OFF_BOARD = 2          # board value of the neighbour sentinel
_HASH_SEED = 20180101


class State(NamedTuple):
  """One game's position and history (all fields arrays; P = N * N).

  Attributes:
    board: int8 [P]; 0 empty, 1 black, -1 white.
    to_play: int8 []; 1 black, -1 white.
    move_number: int32 []; moves played, passes included.
    passes: int32 []; consecutive passes just played.
    ko: int32 []; the point barred by simple ko, -1 if none.
    captures: int32 [2]; stones captured by black, by white.
    chain: int32 [P]; at a stone, the index of a stone of its chain (one per
      chain); P where empty.
    liberties: int32 [P]; at a stone, its chain's liberties; 0 where empty.
    history: int8 [8, P]; history[k] is the board k moves ago (history[0]
      the current one); empty boards before the game's start.
    hash: uint32 [2]; the current position's stone hash.
    hashes: uint32 [max_moves + 1, 2]; hashes[k] the stone hash after move
      k (hashes[0]: the start); entries past `move_number` are unused.
    game_over: bool [].
    illegal: bool []; an illegal move was given to `step` (game over; the
      player to move made it).
  """
  board: jax.Array
  to_play: jax.Array
  move_number: jax.Array
  passes: jax.Array
  ko: jax.Array
  captures: jax.Array
  chain: jax.Array
  liberties: jax.Array
  history: jax.Array
  hash: jax.Array
  hashes: jax.Array
  game_over: jax.Array
  illegal: jax.Array


def board_size(state: State) -> int:
  """N, from the (static) shape of one game's board."""
  n = math.isqrt(state.board.shape[-1])
  assert n * n == state.board.shape[-1], state.board.shape
  return n


def max_moves(state: State) -> int:
  """The move cap (static, from the hash history's length)."""
  return state.hashes.shape[-2] - 1


@functools.lru_cache(maxsize=None)
def _neighbors(n: int) -> np.ndarray:
  """int32 [P, 4]: the up/down/left/right neighbours, P off the board."""
  p = n * n
  out = np.full((p, 4), p, np.int32)
  for r in range(n):
    for c in range(n):
      for k, (dr, dc) in enumerate(((-1, 0), (1, 0), (0, -1), (0, 1))):
        rr, cc = r + dr, c + dc
        if 0 <= rr < n and 0 <= cc < n:
          out[r * n + c, k] = rr * n + cc
  return out


@functools.lru_cache(maxsize=None)
def _keys(n: int) -> np.ndarray:
  """uint32 [P, 2 colours (black, white), 2 lanes]: the hash keys."""
  rng = np.random.RandomState(_HASH_SEED + n)
  return rng.randint(0, 2**32, size=(n * n, 2, 2), dtype=np.uint64).astype(
      np.uint32)


def _pad(x: jax.Array, value) -> jax.Array:
  """x [P, ...] with one more entry, `value`, for the off-board sentinel."""
  return jnp.concatenate([x, jnp.full((1,) + x.shape[1:], value, x.dtype)])


def _distinct(labels: jax.Array, none: int) -> jax.Array:
  """labels [P, 4] with repeats within a row replaced by `none`."""
  cols = [labels[:, 0]]
  for k in range(1, labels.shape[1]):
    dup = functools.reduce(jnp.logical_or,
                           [labels[:, k] == labels[:, j] for j in range(k)])
    cols.append(jnp.where(dup, none, labels[:, k]))
  return jnp.stack(cols, axis=1)


def _stone_keys(board: jax.Array) -> jax.Array:
  """uint32 [P, 2]: each stone's hash key, zero where empty."""
  n = math.isqrt(board.shape[0])
  keys = jnp.asarray(_keys(n))
  k = jnp.where((board == BLACK)[:, None], keys[:, 0], keys[:, 1])
  return jnp.where((board != EMPTY)[:, None], k, jnp.uint32(0))


def _hash(board: jax.Array) -> jax.Array:
  return jnp.sum(_stone_keys(board), axis=0, dtype=jnp.uint32)


def _chain_liberties(board: jax.Array, chain: jax.Array) -> jax.Array:
  """int32 [P]: the liberties of each stone's chain (0 where empty)."""
  p = board.shape[0]
  nbr = jnp.asarray(_neighbors(math.isqrt(p)))
  labels = _distinct(_pad(chain, p)[nbr], p)               # [P, 4]
  labels = jnp.where((board == EMPTY)[:, None], labels, p)
  counts = jnp.zeros(p + 1, jnp.int32).at[labels.reshape(-1)].add(1)
  return jnp.where(board != EMPTY, counts[jnp.minimum(chain, p)], 0)


def label_chains(board: jax.Array) -> jax.Array:
  """int32 [P]: each stone's chain as its lowest point index; P if empty.

  Neighbour-minimum propagation with pointer jumping in a `lax.while_loop`
  until no label changes.
  """
  p = board.shape[0]
  nbr = jnp.asarray(_neighbors(math.isqrt(p)))
  stone = board != EMPTY
  same = (_pad(board, _OFF_BOARD)[nbr] == board[:, None]) & stone[:, None]

  def body(carry):
    lab, _ = carry
    m = jnp.minimum(lab, jnp.min(jnp.where(same, _pad(lab, p)[nbr], p),
                                 axis=1))
    m = _pad(m, p)[m]                                     # pointer jump
    return m, jnp.any(m != lab)

  lab0 = jnp.where(stone, jnp.arange(p, dtype=jnp.int32), p)
  lab, _ = jax.lax.while_loop(lambda c: c[1], body, (lab0, jnp.array(True)))
  return lab


def from_board(board, to_play=BLACK, ko: int = -1,
               max_moves: int | None = None) -> State:
  """A state for an arbitrary position (move number 0, no history).

  Args:
    board: int [N, N] or [N * N]; 1 black, -1 white, 0 empty.
    to_play: 1 (black) or -1 (white).
    ko: the point barred by simple ko, -1 if none.
    max_moves: the move cap; default 2 * N * N.
  """
  board = jnp.asarray(board, jnp.int8).reshape(-1)
  n = math.isqrt(board.shape[0])
  length = 2 * n * n if max_moves is None else max_moves
  chain = label_chains(board)
  h = _hash(board)
  return State(
      board=board,
      to_play=jnp.asarray(to_play, jnp.int8),
      move_number=jnp.int32(0),
      passes=jnp.int32(0),
      ko=jnp.int32(ko),
      captures=jnp.zeros(2, jnp.int32),
      chain=chain,
      liberties=_chain_liberties(board, chain),
      history=jnp.zeros((HISTORY, n * n), jnp.int8).at[0].set(board),
      hash=h,
      hashes=jnp.zeros((length + 1, 2), jnp.uint32).at[0].set(h),
      game_over=jnp.array(False),
      illegal=jnp.array(False))


def init(board_size: int, max_moves: int | None = None) -> State:  # pylint: disable=redefined-outer-name
  """The empty board, black to play; the move cap defaults to 2 * N * N."""
  return from_board(np.zeros(board_size * board_size, np.int8), BLACK,
                    max_moves=max_moves)


def _analyse(state: State):
  """Per point, for the player to move: (basic legality ignoring superko,
  the labels [P, 4] of the distinct opponent chains a move there captures
  (P for none), and the stone hash after it)."""
  board, c = state.board, state.to_play
  p = board.shape[0]
  nbr = jnp.asarray(_neighbors(math.isqrt(p)))
  nb = _pad(board, _OFF_BOARD)[nbr]                       # [P, 4]
  nlib = _pad(state.liberties, 0)[nbr]
  nchain = _pad(state.chain, p)[nbr]
  captures = (nb == -c) & (nlib == 1)
  ok = (jnp.any(nb == EMPTY, axis=1) | jnp.any(captures, axis=1)
        | jnp.any((nb == c) & (nlib > 1), axis=1))
  basic = ((board == EMPTY) & (jnp.arange(p) != state.ko) & ok)
  cap_labels = _distinct(jnp.where(captures, nchain, p), p)
  chain_hash = jnp.zeros((p + 1, 2), jnp.uint32).at[state.chain].add(
      _stone_keys(board))
  chain_hash = chain_hash.at[p].set(jnp.uint32(0))
  cap_hash = jnp.sum(chain_hash[cap_labels], axis=1, dtype=jnp.uint32)
  keys = jnp.asarray(_keys(math.isqrt(p)))
  own = jnp.where(c == BLACK, keys[:, 0], keys[:, 1])     # [P, 2]
  new_hash = state.hash[None, :] + own - cap_hash
  return basic, cap_labels, new_hash


def legal_moves(state: State) -> jax.Array:
  """bool [N * N + 1]: the legal moves of the player to move (last: pass).

  Occupied points, suicides, the simple-ko point and moves that repeat an
  earlier position of the game (positional superko) are illegal; the pass
  always is legal. Whether the game is over is not considered.
  """
  basic, _, new_hash = _analyse(state)
  length = state.hashes.shape[0]
  seen = jnp.arange(length) <= state.move_number
  repeat = jnp.any((new_hash[:, None, 0] == state.hashes[None, :, 0])
                   & (new_hash[:, None, 1] == state.hashes[None, :, 1])
                   & seen[None, :], axis=1)
  return jnp.concatenate([basic & ~repeat, jnp.ones(1, bool)])


def step(state: State, move) -> State:
  """Plays `move` (a point, or N * N to pass) for the player to move.

  A legal move places the stone, removes the opponent chains it leaves
  without liberties, and updates ko, captures, the histories and the game's
  end (two passes in a row, or the move cap). An illegal move leaves the
  position unchanged and sets `illegal` and `game_over`; a finished game is
  returned unchanged.
  """
  board, c = state.board, state.to_play
  p = board.shape[0]
  n = math.isqrt(p)
  nbr = jnp.asarray(_neighbors(n))
  move = jnp.asarray(move, jnp.int32)
  legal = legal_moves(state)[move]
  is_pass = move == p
  pt = jnp.minimum(move, p - 1)

  # Placing a stone at pt (used when the move is not a pass).
  _, cap_labels, new_hash = _analyse(state)
  caps = cap_labels[pt]                                   # [4]
  captured = (board == -c) & jnp.any(state.chain[:, None] == caps[None, :],
                                     axis=1)
  num_captured = jnp.sum(captured, dtype=jnp.int32)
  placed = jnp.where(captured, EMPTY, board.at[pt].set(c)).astype(jnp.int8)
  nb = _pad(board, _OFF_BOARD)[nbr[pt]]
  koish = jnp.all((nb == -c) | (nb == _OFF_BOARD))
  first_captured = jnp.argmax(captured).astype(jnp.int32)
  placed_ko = jnp.where(koish & (num_captured == 1), first_captured, -1)
  own = jnp.where(nb == c, _pad(state.chain, p)[nbr[pt]], p)
  root = jnp.minimum(pt, jnp.min(own))
  merge = ((board == c) & jnp.any(state.chain[:, None] == own[None, :], axis=1)
           | (jnp.arange(p) == pt))
  chain = jnp.where(merge, root, state.chain)
  chain = jnp.where(captured, p, chain).astype(jnp.int32)
  cap_index = jnp.where(c == BLACK, 0, 1)

  new_board = jnp.where(is_pass, board, placed)
  new_chain = jnp.where(is_pass, state.chain, chain)
  move_number = state.move_number + 1
  passes = jnp.where(is_pass, state.passes + 1, 0)
  h = jnp.where(is_pass, state.hash, new_hash[pt])
  played = State(
      board=new_board,
      to_play=(-c).astype(jnp.int8),
      move_number=move_number,
      passes=passes,
      ko=jnp.where(is_pass, -1, placed_ko).astype(jnp.int32),
      captures=state.captures.at[cap_index].add(
          jnp.where(is_pass, 0, num_captured)),
      chain=new_chain,
      liberties=_chain_liberties(new_board, new_chain),
      history=jnp.concatenate([new_board[None], state.history[:-1]]),
      hash=h,
      hashes=state.hashes.at[move_number].set(h, mode='drop'),
      game_over=(passes >= 2) | (move_number >= max_moves(state)),
      illegal=jnp.array(False))
  refused = state._replace(game_over=jnp.array(True),
                           illegal=jnp.array(True))
  out = jax.tree_util.tree_map(lambda a, b: jnp.where(legal, a, b), played,
                               refused)
  return jax.tree_util.tree_map(
      lambda a, b: jnp.where(state.game_over, a, b), state, out)


def is_over(state: State) -> jax.Array:
  """bool: two consecutive passes, the move cap reached, or an illegal move."""
  return (state.game_over | (state.passes >= 2)
          | (state.move_number >= max_moves(state)))


def area(state: State) -> tuple[jax.Array, jax.Array]:
  """(black, white) Tromp-Taylor areas: stones plus the empty points from
  which only that colour's stones can be reached."""
  board = state.board
  p = board.shape[0]
  nbr = jnp.asarray(_neighbors(math.isqrt(p)))
  empty = board == EMPTY

  def body(carry):
    rb, rw, _ = carry
    nb = rb | (empty & jnp.any(_pad(rb, False)[nbr], axis=1))
    nw = rw | (empty & jnp.any(_pad(rw, False)[nbr], axis=1))
    return nb, nw, jnp.any(nb != rb) | jnp.any(nw != rw)

  rb, rw, _ = jax.lax.while_loop(
      lambda c: c[2], body, (board == BLACK, board == WHITE, jnp.array(True)))
  black = jnp.sum(board == BLACK) + jnp.sum(empty & rb & ~rw)
  white = jnp.sum(board == WHITE) + jnp.sum(empty & rw & ~rb)
  return black.astype(jnp.int32), white.astype(jnp.int32)


def score(state: State, komi: float = KOMI) -> jax.Array:
  """float32: black's area minus white's area minus komi."""
  black, white = area(state)
  return (black - white).astype(jnp.float32) - komi


def winner(state: State, komi: float = KOMI) -> jax.Array:
  """int32: +1 black won, -1 white won, 0 a tie; after an illegal move,
  the other player wins."""
  s = jnp.sign(score(state, komi)).astype(jnp.int32)
  return jnp.where(state.illegal, -state.to_play.astype(jnp.int32), s)


def features(state: State, feature_set: str = 'mlperf07',
             dtype=jnp.float32) -> jax.Array:
  """The network's input planes, [N, N, C] (NHWC, as the MLPerf flags).

  'mlperf07' (13 planes; cc/model/features.h `Mlperf07Features`, the
  feature set of ml_perf/flags/*/architecture.flags):
    0-7  for k = 0..3 (the current position, then 1, 2, 3 moves ago):
         plane 2k the stones of the player to move, 2k+1 the opponent's
         (zeros before the game's start);
    8    1 where black is to play;
    9-11 the chain at the point has 1, 2, >= 3 liberties;
    12   a legal move there captures (an opponent chain beside it has one
         liberty).
  'agz' (17 planes, `AgzFeatures`): the same stone planes for 8 positions
  (0-15), then the to-play plane.
  """
  n = board_size(state)
  c = state.to_play
  k = {'mlperf07': 4, 'agz': 8}[feature_set]
  hist = state.history[:k]                                # [k, P]
  stones = jnp.stack([hist == c, hist == -c], axis=1).reshape(2 * k, -1)
  planes = [stones, jnp.broadcast_to(c == BLACK, (1, n * n))]
  if feature_set == 'mlperf07':
    lib = state.liberties
    nbr = jnp.asarray(_neighbors(n))
    nb = _pad(state.board, _OFF_BOARD)[nbr]
    atari = jnp.any((nb == -c) & (_pad(lib, 0)[nbr] == 1), axis=1)
    planes += [(lib == 1)[None], (lib == 2)[None], (lib >= 3)[None],
               (legal_moves(state)[:-1] & atari)[None]]
  x = jnp.concatenate(planes, axis=0)                     # [C, P]
  return x.T.reshape(n, n, -1).astype(dtype)


def game(board_size: int, komi: float = KOMI,  # pylint: disable=redefined-outer-name
         max_moves: int | None = None):  # pylint: disable=redefined-outer-name
  """(`mcts.Game` for these rules, its initial state)."""
  from jaxperf.rl import mcts  # pylint: disable=import-outside-toplevel
  g = mcts.Game(
      num_actions=board_size * board_size + 1,
      legal=legal_moves,
      step=step,
      to_play=lambda s: s.to_play.astype(jnp.int32),
      is_over=is_over,
      result=functools.partial(winner, komi=komi))
  return g, init(board_size, max_moves)
