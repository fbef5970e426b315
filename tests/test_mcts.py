"""The batched tree search on a game small enough to solve by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxperf.rl import mcts

TARGET = 7        # whoever brings the total to 7 or more wins


def _race_game():
  """Players alternately add 1 or 2 (actions 0, 1) to a total; reaching
  TARGET wins. The pass (action 2) is never legal. The player to move
  loses exactly when TARGET - total is a multiple of 3."""
  def legal(s):
    return jnp.asarray([True, True, False]) & ~s['over']

  def step(s, a):
    total = s['total'] + a + 1
    over = total >= TARGET
    return {'total': total, 'to_play': -s['to_play'], 'over': over,
            'winner': jnp.where(over, s['to_play'], 0)}

  return mcts.Game(num_actions=3, legal=legal, step=step,
                   to_play=lambda s: s['to_play'],
                   is_over=lambda s: s['over'],
                   result=lambda s: s['winner'])


def _state(total, to_play=1):
  return {'total': jnp.int32(total), 'to_play': jnp.int32(to_play),
          'over': jnp.bool_(False), 'winner': jnp.int32(0)}


def _uniform(s):
  del s
  return jnp.full((3,), 1 / 3), jnp.float32(0.0)


def test_search_finds_the_forced_win_for_either_player():
  game = _race_game()
  cfg = mcts.SearchConfig(num_readouts=300, inject_noise=False)
  totals = jnp.asarray([0, 2, 3, 5, 0, 2, 3, 5])
  players = jnp.asarray([1, 1, 1, 1, -1, -1, -1, -1])

  def run(total, to_play, key):
    s = jax.tree.map(lambda x: x, _state(0))
    s = {**s, 'total': total, 'to_play': to_play}
    tree = mcts.search(game, _uniform, s, key, cfg)
    return mcts.pick_move(game, tree, key, False), tree.root_n, mcts.root_q(tree)

  keys = jax.random.split(jax.random.key(0), 8)
  moves, n, q = jax.jit(jax.vmap(run))(totals, players, keys)
  # The winning move leaves TARGET - total a multiple of 3 for the opponent.
  want = np.asarray([(TARGET - int(t)) % 3 - 1 for t in totals])
  np.testing.assert_array_equal(np.asarray(moves), want)
  np.testing.assert_array_equal(np.asarray(n), 300)
  # Winning positions: the root's value leans to the player to move.
  assert np.all(np.asarray(q) * np.asarray(players) > 0.3)


def test_visits_and_values_add_up():
  """Every readout adds one visit along one path: the root's N equals the
  readouts, each expanded node's N is 1 + its children's; W at a finished
  game is backed up as the game's result."""
  game = _race_game()
  cfg = mcts.SearchConfig(num_readouts=60, inject_noise=False,
                          value_init_penalty=0.0)
  tree = jax.jit(lambda k: mcts.search(game, _uniform, _state(0), k, cfg))(
      jax.random.key(1))
  count = int(tree.count)
  n = np.asarray(tree.edge_n)
  children = np.asarray(tree.children)
  for x in range(count):
    node_n = (float(tree.root_n) if x == 0 else
              n[int(tree.parent[x]), int(tree.move[x])])
    if bool(tree.expanded[x]):
      assert node_n == 1 + n[x].sum(), x
    kids = children[x][children[x] >= 0]
    for k in kids:
      assert int(tree.parent[k]) == x
  assert float(tree.root_n) == 60
  # With a zero-value network the only non-zero values are game results.
  assert np.all(np.abs(np.asarray(tree.edge_w)) <= n + 1e-6)


def test_dirichlet_noise_only_on_legal_moves_and_soft_pick_samples():
  game = _race_game()
  cfg = mcts.SearchConfig(num_readouts=2, dirichlet_alpha=0.3, noise_mix=0.5)
  tree = mcts.search(game, _uniform, _state(0), jax.random.key(2), cfg)
  p = np.asarray(tree.edge_p[0])
  assert p[2] == 0 and abs(p.sum() - 1) < 1e-5 and p[0] != p[1]
  tree = mcts.search(game, _uniform, _state(0), jax.random.key(3),
                     mcts.SearchConfig(num_readouts=50, inject_noise=False))
  picks = jax.vmap(lambda k: mcts.pick_move(game, tree, k, True))(
      jax.random.split(jax.random.key(4), 2000))
  freq = np.bincount(np.asarray(picks), minlength=3) / 2000
  # In proportion to N ** 0.98 over the non-pass moves.
  weight = np.asarray(tree.edge_n[0])[:2] ** 0.98
  np.testing.assert_allclose(freq[:2], weight / weight.sum(), atol=0.04)
  assert freq[2] == 0


def _features(s):
  return jnp.stack([s['total'], s['to_play']]).astype(jnp.float32)


def test_selfplay_with_search_wins_the_won_game_and_records_it():
  """From 0 the first player (black) has a forced win: self-play with the
  search finds it in every game; the record holds one row per move."""
  from jaxperf.rl import selfplay  # pylint: disable=g-import-not-at-top
  game = _race_game()
  cfg = selfplay.PlayConfig(max_moves=8, search=mcts.SearchConfig(
      num_readouts=200, inject_noise=False))
  out = jax.jit(lambda k: selfplay.play(game, [_uniform], _features,
                                        _state(0), k, 6, cfg))(
      jax.random.key(0))
  np.testing.assert_array_equal(out['result'], 1)
  moves = np.asarray(out['moves'])
  valid = np.asarray(out['valid'])
  np.testing.assert_array_equal(valid.sum(0), moves)
  for g in range(6):
    rows = np.asarray(out['policy'])[:moves[g], g]
    np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out['to_play'])[:moves[g], g],
                                  [1, -1] * (moves[g] // 2)
                                  + [1] * (moves[g] % 2))
  assert np.all(np.asarray(out['final']['total']) >= TARGET)


def test_match_gives_each_side_its_own_network_and_resigns():
  """Two networks: with one readout each plays its prior's favourite (A:
  +1, B: +2), so the final totals tell who played black; a player whose
  value is below its threshold resigns at once."""
  from jaxperf.rl import selfplay  # pylint: disable=g-import-not-at-top
  game = _race_game()
  prefers_two = lambda s: (jnp.asarray([0.01, 0.99, 0.0]), jnp.float32(0.0))
  cfg = selfplay.PlayConfig(max_moves=10, search=mcts.SearchConfig(
      num_readouts=1, inject_noise=False))
  out = selfplay.play(game, [_uniform, prefers_two], _features, _state(0),
                      jax.random.key(1), 2, cfg, black=jnp.asarray([0, 1]),
                      record=False)
  # A black: 1, 3, 4, 6, 7; B black: 2, 3, 5, 6, 8.
  np.testing.assert_array_equal(out['final']['total'], [7, 8])
  np.testing.assert_array_equal(out['result'], [1, 1])
  # A network sure that white wins: after one readout the root's value
  # is W / (1 + N) = -0.5, below the first game's threshold.
  gloomy = lambda s: (jnp.full((3,), 1 / 3), jnp.float32(-1.0))
  out = selfplay.play(game, [gloomy], _features, _state(0),
                      jax.random.key(2), 2, cfg,
                      resign_threshold=jnp.asarray([-0.4, -1.0]),
                      record=False)
  np.testing.assert_array_equal(out['resigned'], [True, False])
  assert int(out['result'][0]) == -1 and int(out['moves'][0]) == 0
