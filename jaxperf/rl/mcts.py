"""Monte-Carlo tree search with MiniGo's node arithmetic, as one JAX program.

The MLPerf reference (minigo/cc/mcts_node.{h,cc}, mcts_tree.cc) keeps, for
every edge of a node, a visit count N, a total value W and a prior P, with
values in [-1, 1] from black's point of view:

  child_Q      = W / (1 + N)
  U_scale      = 2 (log((1 + N_node + 19652) / 19652) + 1.25)
  action score = child_Q * to_play + U_scale * sqrt(max(1, N_node - 1))
                 * P / (1 + child_N) - 1000 * illegal

(to_play = +1 for black, -1 for white). A leaf is expanded with the
network's move probabilities renormalised over the legal moves, and every
edge's W starts at the leaf's value reduced by `value_init_penalty` for the
player to move (clipped to [-1, 1]; "first play urgency"); the value (or, at
a finished game, +-1 by the score) is then added to W and 1 to N of every
edge on the path to the root. (The reference's C++ search, unlike its
earlier Python one, has no rule that reads the double pass first after a
pass; neither has this one.) Dirichlet noise over the legal moves is mixed into the root's priors
once the root is expanded. The move played is sampled in proportion to the
root's visit counts ** 0.98 (board points only) for the opening moves of a
game and is the most visited one after (`pick_move`).

The tree is a set of fixed-size arrays (one node per readout), so a search
is a `lax.fori_loop` of readouts, each a `lax.while_loop` down the tree,
one network evaluation and a `lax.while_loop` back up; `jax.vmap` runs
thousands of games' searches side by side, and the network sees a batch of
one leaf per game per readout. That batching across games replaces the
reference's virtual losses (its way to batch several leaves of one game):
each game's readouts here are strictly sequential, which is the search
virtual losses approximate.

The game is given as functions of one game's state (see `Game`); the
network as `evaluate(state) -> (move probabilities [A], value)`, value from
black's point of view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

UCT_BASE = 19652.0
UCT_INIT = 1.25


@dataclasses.dataclass(frozen=True)
class Game:
  """A two-player game as functions of one game's state.

  num_actions: moves, the last being the pass.
  legal(state) -> bool [A]; step(state, action) -> state;
  to_play(state) -> +1 (black) or -1 (white);
  is_over(state) -> bool (the game has ended: no more moves);
  result(state) -> +1 if black wins, -1 if white wins (a finished game).
  """
  num_actions: int
  legal: Callable[[Any], jax.Array]
  step: Callable[[Any, jax.Array], Any]
  to_play: Callable[[Any], jax.Array]
  is_over: Callable[[Any], jax.Array]
  result: Callable[[Any], jax.Array]
  pass_action: int | None = None        # default: the last action


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  num_readouts: int = 800
  value_init_penalty: float = 0.2
  dirichlet_alpha: float = 0.03
  noise_mix: float = 0.25
  inject_noise: bool = True
  # False: the search reads a pass only where no other move is legal (the
  # reference's --allow_pass=0, used for the bootstrap games).
  allow_pass: bool = True


class Tree:
  """One game's search tree (fields as arrays; node 0 is the root)."""

  def __init__(self, **fields):
    self.__dict__.update(fields)


jax.tree_util.register_pytree_node(
    Tree, lambda t: (tuple(t.__dict__.values()), tuple(t.__dict__.keys())),
    lambda keys, values: Tree(**dict(zip(keys, values))))


def _node_n(tree: Tree, x) -> jax.Array:
  """N of node x: the stats of the edge into it (the root's own)."""
  return jnp.where(x == 0, tree.root_n,
                   tree.edge_n[tree.parent[x], jnp.maximum(tree.move[x], 0)])


def action_scores(tree: Tree, x, to_play) -> jax.Array:
  """The reference's CalculateChildActionScore at node x."""
  n = _node_n(tree, x)
  u_scale = 2.0 * (jnp.log((1.0 + n + UCT_BASE) / UCT_BASE) + UCT_INIT)
  u_common = u_scale * jnp.sqrt(jnp.maximum(1.0, n - 1.0))
  q = tree.edge_w[x] / (1.0 + tree.edge_n[x])
  u = u_common * tree.edge_p[x] / (1.0 + tree.edge_n[x])
  return q * to_play + u - 1000.0 * (~tree.legal[x])


def _set(tree_states, index, state):
  return jax.tree.map(lambda a, s: a.at[index].set(s), tree_states, state)


def _get(tree_states, index):
  return jax.tree.map(lambda a: a[index], tree_states)


def search(game: Game, evaluate: Callable, state: Any, key: jax.Array,
           config: SearchConfig, *, last_move: jax.Array | int = -1
           ) -> Tree:
  """`config.num_readouts` readouts from `state` (one game; vmap for
  many). `last_move`: the move that led to `state` (-1 none), kept as
  the root's move."""
  a = game.num_actions
  pass_a = a - 1 if game.pass_action is None else game.pass_action
  m = config.num_readouts + 1
  states = jax.tree.map(
      lambda s: jnp.zeros((m,) + jnp.shape(s), jnp.asarray(s).dtype), state)
  tree = Tree(
      states=_set(states, 0, state),
      to_play=jnp.zeros((m,), jnp.int32).at[0].set(
          game.to_play(state).astype(jnp.int32)),
      parent=jnp.full((m,), -1, jnp.int32),
      move=jnp.full((m,), -1, jnp.int32).at[0].set(last_move),
      children=jnp.full((m, a), -1, jnp.int32),
      edge_n=jnp.zeros((m, a), jnp.float32),
      edge_w=jnp.zeros((m, a), jnp.float32),
      edge_p=jnp.zeros((m, a), jnp.float32),
      legal=jnp.zeros((m, a), bool),
      expanded=jnp.zeros((m,), bool),
      root_n=jnp.zeros((), jnp.float32),
      root_w=jnp.zeros((), jnp.float32),
      count=jnp.ones((), jnp.int32))

  def select(tree):
    """Descends from the root by action score to a node not yet expanded;
    a child met for the first time is added (its state computed once,
    after the descent)."""
    def cond(c):
      t, x, _, new = c
      return t.expanded[x] & ~new

    def body(c):
      t, x, _, _ = c
      scores = action_scores(t, x, t.to_play[x].astype(jnp.float32))
      if not config.allow_pass:
        scores = scores.at[pass_a].set(-1e5)
      best = jnp.argmax(scores).astype(jnp.int32)
      best = jnp.where(t.legal[x, best], best, pass_a)
      child = t.children[x, best]
      new = child < 0
      return t, jnp.where(new, x, child), best, new

    t, x, best, new = jax.lax.while_loop(
        cond, body, (tree, jnp.int32(0), jnp.int32(0), jnp.bool_(False)))
    # A new child of x by `best`: one game step, written into a free slot
    # (an unconditional one-row update, which stays in place under vmap).
    idx = jnp.where(new, t.count, x)
    state = jax.tree.map(lambda a, b: jnp.where(new, a, b),
                         game.step(_get(t.states, x), best),
                         _get(t.states, idx))
    t = Tree(**{**t.__dict__,
                'states': _set(t.states, idx, state),
                'to_play': t.to_play.at[idx].set(
                    game.to_play(state).astype(jnp.int32)),
                'parent': t.parent.at[idx].set(
                    jnp.where(new, x, t.parent[idx])),
                'move': t.move.at[idx].set(jnp.where(new, best, t.move[idx])),
                'children': t.children.at[x, best].set(
                    jnp.where(new, idx, t.children[x, best])),
                'count': t.count + new.astype(jnp.int32)})
    return t, idx

  def backup(tree, x, value):
    def cond(c):
      return c[1] >= 0

    def body(c):
      t, y = c
      p = t.parent[y]
      mv = jnp.maximum(t.move[y], 0)
      root = y == 0
      t = Tree(**{**t.__dict__,
                  'edge_n': t.edge_n.at[p, mv].add(jnp.where(root, 0.0, 1.0)),
                  'edge_w': t.edge_w.at[p, mv].add(jnp.where(root, 0.0,
                                                             value)),
                  'root_n': t.root_n + jnp.where(root, 1.0, 0.0),
                  'root_w': t.root_w + jnp.where(root, value, 0.0)})
      return t, jnp.where(root, -1, p)

    return jax.lax.while_loop(cond, body, (tree, x))[0]

  def readout(tree):
    tree, x = select(tree)
    s = _get(tree.states, x)
    over = game.is_over(s)
    probs, value = evaluate(s)
    legal = game.legal(s)
    total = jnp.sum(jnp.where(legal, probs, 0.0))
    prior = jnp.where(legal, probs, 0.0) / jnp.where(total > 0, total, 1.0)
    to_play = game.to_play(s).astype(jnp.float32)
    init = jnp.clip(value - config.value_init_penalty * to_play, -1.0, 1.0)
    expand = ~over
    tree = Tree(**{**tree.__dict__,
                   'edge_p': tree.edge_p.at[x].set(
                       jnp.where(expand, prior, tree.edge_p[x])),
                   'edge_w': tree.edge_w.at[x].add(jnp.where(expand, init,
                                                             0.0)),
                   'legal': tree.legal.at[x].set(
                       jnp.where(expand, legal, tree.legal[x])),
                   'expanded': tree.expanded.at[x].set(expand)})
    backed = jnp.where(over, game.result(s).astype(jnp.float32), value)
    return backup(tree, x, backed)

  noise_key, _ = jax.random.split(key)
  tree = readout(tree)                    # expands the root
  if config.inject_noise:
    noise = jax.random.dirichlet(noise_key, jnp.full((a,), config.dirichlet_alpha))
    legal = tree.legal[0]
    noise = jnp.where(legal, noise, 0.0)
    total = jnp.sum(noise)
    noise = noise / jnp.where(total > 0, total, 1.0)
    tree = Tree(**{**tree.__dict__, 'edge_p': tree.edge_p.at[0].set(
        (1 - config.noise_mix) * tree.edge_p[0] + config.noise_mix * noise)})
  return jax.lax.fori_loop(1, config.num_readouts, lambda _, t: readout(t),
                           tree)


def pick_move(game: Game, tree: Tree, key: jax.Array,
              soft_pick: jax.Array | bool, *, softmax_temp: float = 0.98
              ) -> jax.Array:
  """The move to play.

  With `soft_pick` (the opening), the reference's SoftPickMove: a board
  point sampled in proportion to child_N ** softmax_temp (0.98), the pass
  excluded unless no point was read at all. Otherwise the most visited
  move, ties broken by action score (GetMostVisitedMove).
  """
  pass_a = game.num_actions - 1 if game.pass_action is None else \
      game.pass_action
  n = tree.edge_n[0]
  weight = jnp.where(jnp.arange(n.shape[0]) == pass_a, 0.0,
                     jnp.power(n, softmax_temp))
  sampled = jnp.where(
      jnp.sum(weight) > 0,
      jax.random.categorical(key, jnp.where(weight > 0, jnp.log(
          jnp.maximum(weight, 1e-30)), -jnp.inf)), pass_a)
  to_play = game.to_play(_get(tree.states, 0)).astype(jnp.float32)
  scores = action_scores(tree, 0, to_play)
  best = jnp.argmax(jnp.where(n == jnp.max(n), scores, -jnp.inf))
  return jnp.where(soft_pick, sampled, best).astype(jnp.int32)


def root_q(tree: Tree) -> jax.Array:
  """The root's value estimate W / (1 + N), black's point of view."""
  return tree.root_w / (1.0 + tree.root_n)


def visit_policy(tree: Tree) -> jax.Array:
  """The root's visit distribution (the policy training target)."""
  n = tree.edge_n[0]
  return n / jnp.maximum(jnp.sum(n), 1.0)
