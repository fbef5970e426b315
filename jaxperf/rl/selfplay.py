"""Games played by tree search, many at once: self-play for training data
and matches between two networks for evaluation.

Every game takes one move per iteration of a `lax.while_loop`, each move a
full search (`mcts.search`, vmapped over the games); games that have ended
wait for the others (their searches still run, their results are dropped).
As the reference's selfplay: the opening's moves (`soft_pick_moves`) are
sampled from the visit counts, later ones are the most visited; a player
resigns when the root's value for it falls below its game's resign
threshold (`resign_threshold` <= -1 disables it); Dirichlet noise only in
self-play. Self-play records, for every move, the position (the network's
input), the root's visit distribution (the policy target) and, once the
game has ended, its result from black's point of view (the value target).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxperf.rl import mcts


@dataclasses.dataclass(frozen=True)
class PlayConfig:
  max_moves: int                    # the game's move cap
  soft_pick_moves: int = 0          # opening moves sampled from visits
  search: mcts.SearchConfig = mcts.SearchConfig()


def play(game: mcts.Game, evaluators: Sequence[Callable], features: Callable,
         initial: Any, key: jax.Array, num_games: int, config: PlayConfig, *,
         black: jax.Array | None = None,
         resign_threshold: jax.Array | float = -1.0,
         record: bool = True) -> dict[str, jax.Array]:
  """Plays `num_games` games from `initial` (one game's state).

  Args:
    evaluators: one network per player as `evaluate(state) -> (probs,
      value)`, or `evaluate(state, mix)` if it has a true `takes_mix`
      attribute (mix: a uint32 of the game and player, for randomness that
      must stay a function of the position within one player's searches); with one, it plays both sides (self-play), with two,
      evaluators[black[g]] plays black in game g and the other white.
    features: state -> the network input recorded for training.
    black: int [num_games], which evaluator plays black (two evaluators).
    resign_threshold: scalar or [num_games]; a player resigns when the
      root's value from its side is below it.
    record: keep each move's features and visit distribution.

  Returns:
    {'result' [G] (+1 black won, -1 white won), 'moves' [G] (moves played),
     'resigned' [G], 'final' (the games' last states), and with `record`: 'features' [max_moves, G, ...],
     'policy' [max_moves, G, A], 'to_play' [max_moves, G], 'valid'
     [max_moves, G]}.
  """
  g = num_games
  a = game.num_actions
  if black is None:
    black = jnp.zeros((g,), jnp.int32)
  threshold = jnp.broadcast_to(jnp.asarray(resign_threshold, jnp.float32),
                               (g,))
  states = jax.tree.map(lambda x: jnp.broadcast_to(x, (g,) + jnp.shape(x)),
                        initial)

  def call(e, s, mix):
    return e(s, mix) if getattr(e, 'takes_mix', False) else e(s)

  def evaluate_for(player_index, mixes):
    if len(evaluators) == 1:
      return lambda s: call(evaluators[0], s, mixes[0])

    def evaluate(s):
      outs = [call(e, s, m) for e, m in zip(evaluators, mixes)]
      return jax.tree.map(
          lambda *xs: jnp.where(player_index == 0, xs[0], xs[1]), *outs)
    return evaluate

  # Each (game, player) has its own stream for the evaluators' randomness
  # (the reference's per-player inference symmetries).
  key, mix_key = jax.random.split(key)
  mix = jax.random.bits(mix_key, (g, 2), jnp.uint32)

  def one_move(state, key, move_no, last, black_idx, thr, mixes):
    to_play = game.to_play(state)
    # The evaluator of the player to move searches its own tree.
    mover = jnp.where(to_play > 0, black_idx, 1 - black_idx)
    k_search, k_pick = jax.random.split(key)
    tree = mcts.search(game, evaluate_for(mover, mixes), state, k_search,
                       config.search, last_move=last)
    move = mcts.pick_move(game, tree, k_pick,
                          move_no < config.soft_pick_moves)
    q = mcts.root_q(tree) * to_play
    resign = q < thr
    return move, mcts.visit_policy(tree), resign

  sample = features(initial)
  buf = {}
  if record:
    buf = {'features': jnp.zeros((config.max_moves, g) + sample.shape,
                                 sample.dtype),
           'policy': jnp.zeros((config.max_moves, g, a), jnp.float32),
           'to_play': jnp.zeros((config.max_moves, g), jnp.int32),
           'valid': jnp.zeros((config.max_moves, g), bool)}
  carry = dict(states=states, last=jnp.full((g,), -1, jnp.int32),
               done=jax.vmap(game.is_over)(states),
               result=jnp.zeros((g,), jnp.int32),
               resigned=jnp.zeros((g,), bool),
               moves=jnp.zeros((g,), jnp.int32), step=jnp.int32(0),
               key=key, buf=buf)

  def cond(c):
    return (c['step'] < config.max_moves) & ~jnp.all(c['done'])

  def body(c):
    key, sub = jax.random.split(c['key'])
    keys = jax.random.split(sub, g)
    move, policy, resign = jax.vmap(
        one_move, in_axes=(0, 0, None, 0, 0, 0, 0))(
            c['states'], keys, c['step'], c['last'], black, threshold, mix)
    live = ~c['done']
    to_play = jax.vmap(game.to_play)(c['states'])
    buf = c['buf']
    if record:
      feats = jax.vmap(features)(c['states'])
      keep = live & ~resign
      buf = {'features': buf['features'].at[c['step']].set(feats),
             'policy': buf['policy'].at[c['step']].set(policy),
             'to_play': buf['to_play'].at[c['step']].set(to_play),
             'valid': buf['valid'].at[c['step']].set(keep)}
    resigning = live & resign
    playing = live & ~resign
    stepped = jax.vmap(game.step)(c['states'], move)
    states = jax.tree.map(
        lambda new, old: jnp.where(
            playing.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
        stepped, c['states'])
    over = jax.vmap(game.is_over)(states)
    scored = jax.vmap(game.result)(states).astype(jnp.int32)
    result = jnp.where(resigning, -to_play, c['result'])
    result = jnp.where(playing & over, scored, result)
    return dict(states=states, last=jnp.where(playing, move, c['last']),
                done=c['done'] | resigning | (playing & over),
                result=result, resigned=c['resigned'] | resigning,
                moves=c['moves'] + playing.astype(jnp.int32),
                step=c['step'] + 1, key=key, buf=buf)

  out = jax.lax.while_loop(cond, body, carry)
  # Games still running at the cap are scored as they stand.
  capped = ~out['done']
  result = jnp.where(capped, jax.vmap(game.result)(out['states']),
                     out['result']).astype(jnp.int32)
  res = {'result': result, 'moves': out['moves'],
         'resigned': out['resigned'], 'final': out['states']}
  res.update(out['buf'])
  return res
