"""The tree search and self-play on Go positions (jaxperf.rl.go rules)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxperf.rl import go, mcts, selfplay

N = 5
KOMI = 0.5
# Black to play. The white stones on the bottom row are in atari; taking
# them at row 3, column 2 (point 17) is black's only winning move if the
# game ends after it.
CAPTURE = ['...OX',
           'OO...',
           'O.X.O',
           'XX.X.',
           'OOOXO']
WIN = 17


def _board(rows):
  return jnp.asarray([{'.': 0, 'X': 1, 'O': -1}[c] for r in rows for c in r],
                     jnp.int8)


def _uniform(state):
  del state
  return jnp.full((N * N + 1,), 1 / (N * N + 1)), jnp.float32(0.0)


def _material(state):
  """A stand-in network: uniform priors, black's area lead as the value."""
  return (jnp.full((N * N + 1,), 1 / (N * N + 1)),
          jnp.tanh(go.score(state, KOMI) / 4.0))


def test_search_finds_the_only_winning_move():
  """With the game ending after black's move, only the capture wins (checked
  here by scoring every legal move); the search with an uninformed network
  finds it from the game results alone."""
  game, _ = go.game(N, komi=KOMI, max_moves=1)
  state = go.from_board(_board(CAPTURE), to_play=go.BLACK, max_moves=1)
  legal = np.nonzero(np.asarray(go.legal_moves(state)))[0]
  wins = [m for m in legal
          if float(go.score(go.step(state, m), KOMI)) > 0]
  assert wins == [WIN] and len(legal) > 8
  cfg = mcts.SearchConfig(num_readouts=120, inject_noise=False)
  tree = jax.jit(lambda k: mcts.search(game, _uniform, state, k, cfg))(
      jax.random.key(0))
  move = mcts.pick_move(game, tree, jax.random.key(1), False)
  assert int(move) == WIN
  assert float(mcts.root_q(tree)) > 0.3


def test_one_move_capture_is_preferred():
  """In an open game, a network that values area makes the search prefer
  taking the stones in atari to every other move."""
  game, _ = go.game(N, komi=KOMI)
  state = go.from_board(_board(CAPTURE), to_play=go.BLACK)
  cfg = mcts.SearchConfig(num_readouts=64, inject_noise=False)
  tree = jax.jit(lambda k: mcts.search(game, _material, state, k, cfg))(
      jax.random.key(2))
  visits = np.asarray(tree.edge_n[0])
  assert int(np.argmax(visits)) == WIN
  assert int(mcts.pick_move(game, tree, jax.random.key(3), False)) == WIN


def test_selfplay_plays_legal_go_to_the_end():
  """Self-play on 5x5 with a pseudo-random-prior network: every game ends
  (two passes or the cap) without an illegal move, results are the
  engine's scores, and the record holds one row per move played."""
  game, init = go.game(N, komi=KOMI, max_moves=40)

  def noisy(state):
    h = jnp.sum(state.board.astype(jnp.float32) * jnp.arange(N * N)) + \
        state.move_number
    logits = jnp.sin(h + jnp.arange(N * N + 1) * 1.7)
    return jax.nn.softmax(logits), jnp.tanh(go.score(state, KOMI) / 8.0)

  cfg = selfplay.PlayConfig(max_moves=40, soft_pick_moves=4,
                            search=mcts.SearchConfig(num_readouts=16,
                                                     dirichlet_alpha=0.5))
  out = jax.jit(lambda k: selfplay.play(game, [noisy], go.features, init, k,
                                        4, cfg))(jax.random.key(4))
  final = out['final']
  assert np.all(np.asarray(jax.vmap(go.is_over)(final)))
  assert not np.any(np.asarray(final.illegal))
  np.testing.assert_array_equal(
      out['result'], np.asarray(jax.vmap(lambda s: go.winner(s, KOMI))(final)))
  moves = np.asarray(out['moves'])
  valid = np.asarray(out['valid'])
  np.testing.assert_array_equal(valid.sum(0), moves)
  feats = np.asarray(out['features'])
  assert feats.shape == (40, 4, N, N, go.FEATURE_PLANES['mlperf07'])
  # The first recorded position is the empty board, black to play.
  np.testing.assert_array_equal(feats[0, :, :, :, :8], 0)
  np.testing.assert_array_equal(feats[0, :, :, :, 8], 1)
  # Each recorded move's policy is a distribution; no visits past the end.
  policy = np.asarray(out['policy'])
  assert np.all(np.abs(policy[valid].sum(-1) - 1) < 1e-5)
