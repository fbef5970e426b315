"""jaxperf.rl.go: the rules on hand-built positions, and random games under
vmap checked against a small pure-Python rules implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxperf.rl import go

_CHARS = {'.': 0, 'X': 1, 'O': -1}
step = jax.jit(go.step)
legal_moves = jax.jit(go.legal_moves)


def parse(diagram: str) -> np.ndarray:
  """'.XO' rows (X black, O white) -> int8 [N * N]."""
  rows = [r.strip() for r in diagram.strip().splitlines()]
  assert all(len(r) == len(rows) for r in rows), rows
  return np.array([_CHARS[ch] for r in rows for ch in r], np.int8)


def pos(diagram: str, to_play: int = go.BLACK, **kwargs) -> go.State:
  return go.from_board(parse(diagram), to_play, **kwargs)


def pt(n: int, row: int, col: int) -> int:
  return row * n + col


def board(state: go.State) -> np.ndarray:
  return np.asarray(state.board)


# A small, obviously correct reference: boards are lists of ints.


def ref_neighbors(n, i):
  r, c = divmod(i, n)
  return [rr * n + cc for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1),
                                      (r, c + 1)) if 0 <= rr < n and 0 <= cc < n]


def ref_group(b, n, i):
  """(stones, liberties) of the chain at i, by recursive flood fill."""
  stones, libs = set(), set()

  def visit(j):
    stones.add(j)
    for k in ref_neighbors(n, j):
      if b[k] == 0:
        libs.add(k)
      elif b[k] == b[i] and k not in stones:
        visit(k)

  visit(i)
  return stones, libs


def ref_play(b, n, i, color):
  """The board after `color` plays at empty i, or None for a suicide."""
  b = list(b)
  b[i] = color
  for k in ref_neighbors(n, i):
    if b[k] == -color:
      stones, libs = ref_group(b, n, k)
      if not libs:
        for s in stones:
          b[s] = 0
  if not ref_group(b, n, i)[1]:
    return None
  return b


def ref_legal(b, n, color, seen):
  """Legal points: empty, not suicide, no earlier position repeated."""
  out = []
  for i in range(n * n):
    after = ref_play(b, n, i, color) if b[i] == 0 else None
    out.append(after is not None and tuple(after) not in seen)
  return out + [True]


# Captures.


def test_single_stone_capture():
  s = pos("""
      .....
      ..X..
      .XO..
      ..X..
      .....""")
  s = step(s, pt(5, 2, 3))
  assert board(s)[pt(5, 2, 2)] == 0
  assert s.captures.tolist() == [1, 0]
  assert not s.illegal and int(s.to_play) == go.WHITE


def test_group_capture_edge_and_corner():
  corner = pos("""
      .....
      .....
      .....
      ....X
      ...X.""", go.WHITE)
  assert not legal_moves(corner)[pt(5, 4, 4)]   # suicide for white
  edge = pos("""
      OOO.X
      XXXX.
      .....
      .....
      .....""")
  assert int(edge.liberties[0]) == 1
  s = step(edge, pt(5, 0, 3))
  assert board(s)[:3].tolist() == [0, 0, 0]
  assert s.captures.tolist() == [3, 0]
  corner = pos("""
      O.X..
      X....
      .....
      .....
      .....""")
  s = step(corner, pt(5, 0, 1))
  assert board(s)[0] == 0 and s.captures.tolist() == [1, 0]


def test_multi_stone_group_capture_in_the_middle():
  s = pos("""
      .......
      ..XX...
      .XOOX..
      .XO.X..
      ..X....
      .......
      .......""")
  assert legal_moves(s)[pt(7, 3, 3)]
  s = step(s, pt(7, 3, 3))
  assert board(s)[pt(7, 3, 3)] == 1
  assert board(s)[[pt(7, 2, 2), pt(7, 2, 3), pt(7, 3, 2)]].tolist() == [0] * 3
  assert s.captures.tolist() == [3, 0]


# Suicide.


def test_suicide_single_stone_and_group_illegal():
  s = pos("""
      .O...
      O....
      .....
      .....
      .....""")
  assert not legal_moves(s)[0]
  s = pos("""
      .XO..
      XXO..
      OO...
      .....
      .....""")
  assert not legal_moves(s)[0]          # fills the group's last liberty
  assert legal_moves(s)[pt(5, 3, 0)]


def test_apparent_suicide_that_captures_is_legal():
  s = pos("""
      .XO..
      XXO..
      OO...
      .....
      .....""", go.WHITE)
  assert legal_moves(s)[0]
  s = step(s, 0)
  assert s.captures.tolist() == [0, 3]
  assert board(s)[[1, 5, 6]].tolist() == [0, 0, 0]
  assert int(s.liberties[0]) == 2


# Ko, snapback, superko.


def test_simple_ko():
  s = pos("""
      .XO..
      XO.O.
      .XO..
      .....
      .....""")
  s = step(s, pt(5, 1, 2))              # black takes the ko
  assert s.captures.tolist() == [1, 0]
  assert int(s.ko) == pt(5, 1, 1)
  assert not legal_moves(s)[pt(5, 1, 1)]
  refused = step(s, pt(5, 1, 1))
  assert refused.illegal and refused.game_over
  assert (board(refused) == board(s)).all()
  assert int(go.winner(refused)) == go.BLACK   # white tried it: black wins
  s = step(s, pt(5, 4, 4))              # white elsewhere
  s = step(s, pt(5, 4, 0))              # black elsewhere
  assert legal_moves(s)[pt(5, 1, 1)]
  s = step(s, pt(5, 1, 1))              # white retakes
  assert not s.illegal and s.captures.tolist() == [1, 1]
  assert int(s.ko) == pt(5, 1, 2)


def test_snapback():
  s = pos("""
      ..OX.
      OOOX.
      XXXX.
      .....
      .....""")
  s = step(s, pt(5, 0, 1))              # black throws in
  s = step(s, pt(5, 0, 0))              # white takes one stone
  assert s.captures.tolist() == [0, 1] and int(s.ko) == -1
  assert legal_moves(s)[pt(5, 0, 1)]
  s = step(s, pt(5, 0, 1))              # black takes five
  assert s.captures.tolist() == [5, 1]
  assert (board(s)[:3] == [0, 1, 0]).all()


def test_positional_superko():
  """A move that is not a simple-ko retake but recreates an earlier
  position (given as the game's history) is refused."""
  s = pos("""
      .XO..
      XO.O.
      .XO..
      .....
      .....""")
  earlier = go.from_board(parse("""
      .XO..
      X.XO.
      .XO..
      .....
      ....."""))
  # That position occurred earlier in the game (move 0), the current one at
  # move 1, with no ko point now.
  s = s._replace(move_number=jnp.int32(1),
                 hashes=s.hashes.at[1].set(s.hash).at[0].set(earlier.hash))
  assert int(s.ko) == -1
  legal = legal_moves(s)
  assert not legal[pt(5, 1, 2)]
  assert legal[pt(5, 3, 3)] and legal[-1]
  assert step(s, pt(5, 1, 2)).illegal
  # Without that history the same capture is legal.
  assert legal_moves(pos("""
      .XO..
      XO.O.
      .XO..
      .....
      ....."""))[pt(5, 1, 2)]


# Game end and scoring.


def test_two_passes_end_the_game():
  s = go.init(9)
  s = step(s, 81)
  assert not go.is_over(s)
  s = step(s, 40)
  s = step(s, 81)
  assert not go.is_over(s)
  s = step(s, 81)
  assert go.is_over(s) and s.game_over and not s.illegal
  after = step(s, 10)                   # a finished game stays as it is
  assert int(after.move_number) == 4 and board(after)[10] == 0


def test_move_cap():
  assert go.init(9).hashes.shape == (2 * 81 + 1, 2)
  assert go.max_moves(go.init(19)) == 722
  s = go.init(5, max_moves=3)
  for m in (0, 1, 2):
    assert not go.is_over(s)
    s = step(s, m)
  assert go.is_over(s) and not s.illegal
  assert int(step(s, 3).move_number) == 3


SEKI = """
    .X.O.
    XXXOO
    XXXOO
    XXXOO
    XXXOO"""


def test_seki_and_territory_scoring():
  s = pos(SEKI)
  black, white = go.area(s)
  # 13 black stones + eye; 9 white + eye; the shared liberty is dame.
  assert (int(black), int(white)) == (14, 10)
  assert float(go.score(s)) == pytest.approx(14 - 10 - 7.5)
  assert float(go.score(s, 0.0)) == 4.0
  assert int(go.winner(s)) == go.WHITE
  assert int(go.winner(s, 0.0)) == go.BLACK
  legal = legal_moves(s)
  assert legal[pt(5, 0, 2)] and legal[0] and not legal[pt(5, 0, 4)]


def test_score_empty_board_and_territory():
  assert float(go.score(go.init(9))) == -7.5
  s = pos("""
      ..X..
      ..X..
      XXX..
      ...OO
      ...O.""")
  black, white = go.area(s)
  assert (int(black), int(white)) == (5 + 4, 3 + 1)


# Features.


def test_features_mlperf07():
  s = go.init(5)
  s = step(s, 0)                        # black (0, 0)
  s = step(s, 1)                        # white (0, 1)
  f = np.asarray(go.features(s))
  assert f.shape == (5, 5, 13) and f.dtype == np.float32
  assert f[0, 0, 0] == 1 and f[0, 1, 1] == 1 and f[..., :2].sum() == 2
  assert f[0, 0, 2] == 1 and f[..., 2:4].sum() == 1   # one move ago
  assert f[..., 4:8].sum() == 0
  assert (f[..., 8] == 1).all()            # black to play
  s = step(s, pt(5, 2, 2))              # black
  f = np.asarray(go.features(s))
  assert (f[..., 8] == 0).all()
  assert f[0, 1, 0] == 1 and f[..., 0].sum() == 1     # white's stones
  assert f[0, 0, 1] == 1 and f[2, 2, 1] == 1 and f[..., 1].sum() == 2
  assert f[0, 1, 2] == 1 and f[0, 0, 3] == 1          # the position before
  assert f[0, 0, 5] == 1 and f[..., 4].sum() == 0     # two moves ago
  assert f[..., 6:8].sum() == 0
  # Liberties: (0,0) black has 1, (0,1) white 2, (2,2) black 4.
  assert f[0, 0, 9] == 1 and f[0, 1, 10] == 1 and f[2, 2, 11] == 1
  assert f[..., 9:12].sum() == 3
  # White to play can capture (0,0) by playing (1,0).
  assert f[1, 0, 12] == 1 and f[..., 12].sum() == 1
  agz = go.features(s, 'agz', jnp.bfloat16)
  assert agz.shape == (5, 5, 17) and agz.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(agz[..., :8], np.float32),
                                f[..., :8])


def test_from_board_chains():
  s = pos("""
      XX.O.
      .X.OO
      X..O.
      ..XXX
      O..X.""")
  chain = np.asarray(s.chain)
  assert chain[[0, 1, 6]].tolist() == [0, 0, 0]
  assert chain[[3, 8, 9, 13]].tolist() == [3, 3, 3, 3]
  assert chain[[17, 18, 19, 23]].tolist() == [17] * 4
  assert chain[10] == 10 and chain[20] == 20 and chain[2] == 25
  assert int(s.liberties[0]) == 4 and int(s.liberties[3]) == 5


# Random games under vmap against the reference.


GAMES, MOVES, N = 24, 90, 7


@pytest.fixture(scope='module')
def random_games():
  """GAMES random games of MOVES moves on NxN, vmapped and jitted; each
  move a uniformly random legal point (a pass only if none)."""

  def one_step(states, key):
    legal = jax.vmap(go.legal_moves)(states)
    logits = jnp.where(legal, 0.0, -jnp.inf).at[:, -1].add(
        jnp.where(legal[:, :-1].any(axis=1), -jnp.inf, 0.0))
    moves = jax.random.categorical(key, logits)
    new = jax.vmap(go.step)(states, moves)
    feats = jax.vmap(go.features)(states)
    return new, (states, legal, moves, feats)

  @jax.jit
  def run(key):
    states = jax.vmap(lambda _: go.init(N))(jnp.arange(GAMES))
    final, trace = jax.lax.scan(one_step, states,
                                jax.random.split(key, MOVES))
    return final, trace

  final, (states, legal, moves, feats) = run(jax.random.PRNGKey(0))
  return jax.tree_util.tree_map(np.asarray,
                                (final, states, legal, moves, feats))


def test_random_games_match_the_reference(random_games):
  final, states, legal, moves, _ = random_games
  total_captures = 0
  for g in range(GAMES):
    b = [0] * (N * N)
    seen = {tuple(b)}
    color, placed, passes = 1, 0, 0
    for t in range(MOVES):
      if states.game_over[t, g]:
        assert passes >= 2
        break
      assert states.board[t, g].tolist() == b
      assert int(states.to_play[t, g]) == color
      assert legal[t, g].tolist() == ref_legal(b, N, color, seen), (g, t)
      m = int(moves[t, g])
      if m == N * N:
        passes += 1
      else:
        b = ref_play(b, N, m, color)
        placed += 1
        passes = 0
        seen.add(tuple(b))
      color = -color
      for i in range(N * N):                # every chain has a liberty
        if b[i]:
          assert ref_group(b, N, i)[1]
    nxt = final if t == MOVES - 1 else jax.tree_util.tree_map(
        lambda x: x[t + 1], states)         # pylint: disable=cell-var-from-loop
    got = np.asarray(nxt.board[g])
    assert got.tolist() == b
    caps = nxt.captures[g]
    total_captures += int(caps.sum())
    assert np.count_nonzero(got) == placed - int(caps.sum())
    assert not final.illegal[g]
  assert total_captures > 0


def test_random_games_chains_and_liberties(random_games):
  _, states, _, _, _ = random_games
  for t in range(0, MOVES, 7):
    for g in range(GAMES):
      b = states.board[t, g].tolist()
      chain = states.chain[t, g]
      libs = states.liberties[t, g]
      for i in range(N * N):
        if not b[i]:
          assert chain[i] == N * N and libs[i] == 0
          continue
        stones, ref_libs = ref_group(b, N, i)
        assert libs[i] == len(ref_libs) > 0
        assert {j for j in range(N * N) if chain[j] == chain[i]} == stones


def test_random_games_features(random_games):
  _, states, _, _, feats = random_games
  assert feats.shape == (MOVES, GAMES, N, N, 13)
  for t in (0, 1, 2, 5, MOVES - 1):
    for g in range(0, GAMES, 5):
      f = feats[t, g].reshape(N * N, 13)
      c = int(states.to_play[t, g])
      assert (f[:, 8] == (c == 1)).all()
      for k in range(4):
        prev = (states.board[t - k, g] if t - k >= 0
                else np.zeros(N * N, np.int8))
        assert (f[:, 2 * k] == (prev == c)).all()
        assert (f[:, 2 * k + 1] == (prev == -c)).all()


def test_score_under_vmap(random_games):
  final = random_games[0]
  scores = np.asarray(jax.jit(jax.vmap(go.score))(final))
  for g in range(0, GAMES, 6):
    b = final.board[g].tolist()
    black = white = 0
    for i in range(N * N):
      if b[i] == 1:
        black += 1
      elif b[i] == -1:
        white += 1
      else:
        region, colors, todo = {i}, set(), [i]
        while todo:
          j = todo.pop()
          for k in ref_neighbors(N, j):
            if b[k] == 0 and k not in region:
              region.add(k)
              todo.append(k)
            elif b[k]:
              colors.add(b[k])
        if colors == {1}:
          black += 1
        elif colors == {-1}:
          white += 1
    assert scores[g] == pytest.approx(black - white - 7.5)
