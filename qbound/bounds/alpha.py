"""Optimised relaxations ("alpha"): slopes chosen by gradient ascent on the bound itself.

Every lower slope in [0, 1] of an unstable ReLU (and every slope of the difference lines of
:func:`qbound.bounds.relax.delta_lines`, and every slope of the lines around tanh and sigmoid and
their differences, :mod:`qbound.bounds.smooth`) gives a valid relaxation, so the bound is a function of
the slopes that can be maximised: the slopes are a pytree, one set per bounded row (output and
sign), optimised with optax's Adam and projected back onto [0, 1] after each step. Every
iterate is a valid bound, so the best per row seen so far is kept (the result is anytime and
never worse than the default slopes it starts from). A branch-and-bound piece's default bound comes
from the intermediate bounds it inherits: :func:`diff_alpha_pieces` starts from those. Measured on
the pieces where branch and bound stalls, optimised slopes move the bound by 0-4% where one input
split removes a third or more, so branch and bound does not use them (docs/methods/alpha.md).

Reference: Xu, Zhang, Wang, Wang, Jana, Lin, Hsieh, "Fast and Complete: Enabling Complete Neural
Network Verification with Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021
(alpha-CROWN); applied here to CROWN on the merged network and to the differential bounds.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbound import graph as G
from qbound.bounds import nonlinear, relax, smooth
from qbound.bounds.crown import backward_lower, intersect
from qbound.bounds.diff import diff_backward_lower, diff_bound_node, diff_bounds
from qbound.bounds.sparse import diff_bounds_sparse, output_rows, output_scatter
from qbound.box import Box
from qbound.bounds.rows import node_bounds_by_rows


def maximize_rows(bound: Callable, init, *, steps: int, learning_rate: float):
  """Maximises ``bound(params) -> (m,)`` rowwise over params in [0, 1]; best value per row.

  Rows share nothing (each has its own slopes), so ascending the sum ascends each row. Called
  eagerly, a Python loop of Adam steps: ``bound`` is a walk over jit-compiled per-node steps whose
  derivatives JAX compiles once per step, so nothing compiles the whole unrolled walk. Under a
  transformation (``jit``, ``vmap``: batched certification), a ``lax.scan``, so the walk is traced
  once, not once per step.
  """
  optimizer = optax.adam(learning_rate)

  def total(p):
    rows = bound(p)
    return jnp.sum(rows), rows

  value_and_grad = jax.value_and_grad(total, has_aux=True)
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(init)):
    def step(carry, _):
      params, state, best = carry
      (_, rows), grad = value_and_grad(params)
      params, state = _adam_step(optimizer, grad, state, params)
      return (params, state, jnp.maximum(best, rows)), None

    first = bound(init)
    (params, _, best), _ = jax.lax.scan(step, (init, optimizer.init(init), first), None, length=steps)
    return jnp.maximum(best, bound(params))
  params, state = init, optimizer.init(init)
  best = None
  for _ in range(steps):
    (_, rows), grad = value_and_grad(params)
    best = rows if best is None else jnp.maximum(best, rows)
    params, state = _adam_step(optimizer, grad, state, params)
  last = bound(params)
  return last if best is None else jnp.maximum(best, last)


@functools.partial(jax.jit, static_argnums=0)
def _adam_step(optimizer, grad, state, params):
  """One projected ascent step: Adam on the negated gradient, then back into [0, 1]."""
  updates, state = optimizer.update(jax.tree_util.tree_map(jnp.negative, grad), state, params)
  params = jax.tree_util.tree_map(lambda p: jnp.clip(p, 0, 1), optax.apply_updates(params, updates))
  return params, state


def _per_row(x, m):
  return jnp.broadcast_to(x, (m, *x.shape))


def crown_alpha_node(graph: G.Graph, target: int, bounds, box: Box, *, steps: int = 20,
                     learning_rate: float = 0.1, sound: bool = True, row_chunk=None,
                     optimise_nonlinear: bool = False):
  """alpha-CROWN bounds ``(lower, upper)`` of node ``target`` given bounds of its ReLU inputs
  (``row_chunk`` rows at a time when given, see :mod:`qbound.memory`).

  ``optimise_nonlinear``: also optimise the planes of products and the lines of curves
  (transformer layers; :func:`qbound.bounds.nonlinear.product_planes`,
  :func:`qbound.bounds.nonlinear.curve_relaxation`), not only ReLU, tanh and sigmoid slopes. Off
  by default: on the digits ViT (experiments/vit_digits.py, image 0, 20 steps) it left the output
  bound where CROWN's slopes put it (3.39 at radius 0.005; 1.30e5 at 0.01, where tanh's slopes
  alone reach 1.27e5) and its gradient steps compiled for 200 s; on a small attention block
  (tests/helpers.py, radius 0.05) it tightened one output's upper bound by 8%."""
  node = graph.nodes[target]
  init = {}
  for idx, n in enumerate(graph.nodes[: target + 1]):
    if n.kind == G.RELU:
      lo, hi = bounds[n.inputs[0]]
      init[idx] = relax.relu_default_alpha(lo, hi)
    elif n.kind in G.SMOOTH:
      lo, hi = bounds[n.inputs[0]]
      init[idx] = smooth.default_params(n.kind, lo, hi)
    elif n.kind == G.MUL and optimise_nonlinear:
      init[idx] = nonlinear.default_product_fractions(bounds[n.inputs[0]])
    elif n.kind in G.CURVES and optimise_nonlinear:
      init[idx] = nonlinear.default_fractions(n.kind, *bounds[n.inputs[0]])

  def lower(rows):  # every row has its own slopes
    start = jax.tree_util.tree_map(lambda v: _per_row(v, rows.shape[0]), init)
    return maximize_rows(lambda a: backward_lower(graph, target, rows, bounds, box, alphas=a, sound=sound), start,
                         steps=steps, learning_rate=learning_rate)

  return node_bounds_by_rows(lower, node.size, node.shape, box.lower.dtype, row_chunk)


def diff_default_slopes(fg: G.Graph, target: int, z, zq, d) -> dict:
  """The slopes the default differential relaxation uses at every activation up to ``target``, as
  optimisable parameters: ``{node index: {name: slopes}}`` (one value per neuron; with a leading
  axis of boxes when the bounds have one).

  Started from these, :func:`diff_alpha_node`'s first iterate IS the default bound
  (:func:`qbound.bounds.diff.diff_bound_node` on the same ``z, zq, d``), so keeping the best iterate
  per row can only tighten it. (ReLU: the chords of :func:`qbound.bounds.relax.delta_lines`, CROWN's
  adaptive lower slopes of both ReLUs and of f_q's own ReLU; clip: the chords; tanh and sigmoid:
  :func:`qbound.bounds.smooth.default_diff_params`. Rounding has no slopes.)
  """
  init = {}
  for idx, n in enumerate(fg.nodes[: target + 1]):
    if n.kind in G.SMOOTH:
      j = n.inputs[0]
      params = smooth.default_diff_params(n.kind, *z[j], *zq[j], *d[j])
      params["mu"] = smooth.default_params(n.kind, *zq[j])
      init[idx] = params
      continue
    if n.kind not in (G.RELU, G.CLIP):  # rounding has no slopes to optimise
      continue
    j = n.inputs[0]
    d_lower, d_upper = relax.delta_chord_slopes(*d[j])
    params = {"d_lower": d_lower, "d_upper": d_upper}
    if n.kind == G.RELU:
      params.update(z=relax.relu_default_alpha(*z[j]), q=relax.relu_default_alpha(*zq[j]),
                    mu=relax.relu_default_alpha(*zq[j]))
    init[idx] = params
  return init


def diff_alpha_node(fg: G.Graph, qg: G.Graph, target: int, z, zq, d, box: Box, *, steps: int = 20,
                    learning_rate: float = 0.1, sound: bool = True, row_chunk=None):
  """Differential bounds of ``d`` at node ``target`` with optimised slopes (``row_chunk`` rows at a
  time when given).

  Never looser than the default slopes on the same bounds ``z, zq, d``: the slopes start at
  :func:`diff_default_slopes`, whose bound is the first iterate, and each row keeps its best
  iterate (:func:`maximize_rows`). It can be looser than a bound computed from OTHER intermediate
  bounds (a branch-and-bound piece inherits its ancestors'): give it those bounds
  (:func:`diff_alpha_pieces`), or intersect."""
  node = fg.nodes[target]
  init = diff_default_slopes(fg, target, z, zq, d)

  def lower(rows):  # every row has its own slopes
    start = jax.tree_util.tree_map(lambda v: _per_row(v, rows.shape[0]), init)
    return maximize_rows(lambda a: diff_backward_lower(fg, qg, target, rows, z, zq, d, box, alphas=a, sound=sound),
                         start, steps=steps, learning_rate=learning_rate)

  return node_bounds_by_rows(lower, node.size, node.shape, box.lower.dtype, row_chunk)


def diff_alpha_pieces(fg: G.Graph, qg: G.Graph, lo, hi, *, prior=None, outputs=None, steps: int = 20,
                      learning_rate: float = 0.1, sound: bool = True, f_crown: bool = True, check: bool = True):
  """Optimised-slope bounds of the output's ``d`` on a batch of pieces (leading axis of ``lo``,
  ``hi``), each from the bounds branch and bound has for it.

  The intermediate bounds are the sparse passes' (:func:`qbound.bounds.sparse.diff_bounds_sparse`)
  with ``prior`` (the bounds a piece inherits from its ancestors, in that function's format), so
  they are exactly what branch and bound computes for the piece; only the selected outputs' rows
  then get optimised slopes, started at the default ones, and the result is intersected with the
  sparse bound. So it is never looser than the piece's own bound: the bounds of the ancestors'
  pieces are what made optimised slopes on the piece's box alone (:func:`diff_alpha_bounds`)
  measure looser on ACAS Xu pieces (0.37-0.58 against 0.30-0.31, docs/results/pruned-pairs.md).

  Returns:
    ``(lower, upper)`` of the output's ``d``, ``(pieces, *output shape)``, and the default bound's
    ``(lower, upper)`` it improves on.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> from qbound.bounds.alpha import diff_alpha_pieces
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=4))
    >>> lo, hi = -jnp.ones((2, 3)), jnp.ones((2, 3))
    >>> g = qb.merge(functools.partial(model.apply, params), fq, qb.Box(lo[0], hi[0]))
    >>> (a_lo, a_hi), (d_lo, d_hi) = diff_alpha_pieces(g.f_graph, g.fq_graph, lo, hi, steps=5)
    >>> bool(jnp.all(a_lo >= d_lo) & jnp.all(a_hi <= d_hi))
    True
  """
  box = Box(lo, hi)
  out = diff_bounds_sparse(fg, qg, box, sound=sound, f_crown=f_crown, prior=prior, outputs=outputs, check=check)
  target = fg.output
  node = fg.nodes[target]
  outputs = np.arange(node.size) if outputs is None else np.asarray(outputs, np.int64)
  rows = output_rows(node.size, outputs, tuple(node.shape), lo.dtype, lo.shape[0])
  init = diff_default_slopes(fg, target, out.z, out.zq, out.d)
  start = jax.tree_util.tree_map(lambda v: jnp.broadcast_to(v[:, None], (v.shape[0], rows.shape[1], *v.shape[1:])),
                                 init)
  low = maximize_rows(lambda a: diff_backward_lower(fg, qg, target, rows, out.z, out.zq, out.d, box, alphas=a,
                                                    sound=sound, batched=True),
                      start, steps=steps, learning_rate=learning_rate)
  default = out.d[target]
  return output_scatter(default, jnp.asarray(outputs), low), default


def diff_alpha_bounds(fg: G.Graph, qg: G.Graph, box: Box, *, steps: int = 20, learning_rate: float = 0.1,
                      sound: bool = True, row_chunk=None, everywhere: bool = False, check: bool = True):
  """:func:`qbound.bounds.diff.diff_bounds` with optimised slopes: ``(z, zq, d)`` for every node.

  The output's differential bounds (and with ``everywhere`` those of every activation's input:
  tighter intermediate bounds at roughly one optimisation per activation layer more) come from
  :func:`diff_alpha_node`; the rest from the default slopes. One box at a time (under ``vmap`` for
  many).

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> from qbound.bounds.alpha import diff_alpha_bounds
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=4))
    >>> box = qb.Box(-jnp.ones(3), jnp.ones(3))
    >>> g = qb.merge(functools.partial(model.apply, params), fq, box)
    >>> _, _, d = diff_alpha_bounds(g.f_graph, g.fq_graph, box, steps=5)
    >>> _, _, d0 = qb.bounds.diff_bounds(g.f_graph, g.fq_graph, box)
    >>> out = g.f_graph.output
    >>> bool(jnp.all(d[out][1] - d[out][0] <= d0[out][1] - d0[out][0] + 1e-6))
    True
  """
  default = None
  if everywhere:
    # Tighter intermediate bounds can move the default slopes' own choice (CROWN's adaptive lower
    # slope, which family of lines relu_diff takes) and so loosen a later node: meet every node
    # with the default pass's bounds, so that the result is never looser than diff_bounds'.
    default = diff_bounds(fg, qg, box, None, sound, True, row_chunk, check=False)

  def node_bound(target, z, zq, d):
    if everywhere or target == fg.output:
      # (Started at the default slopes on these bounds: never looser than diff_bound_node here.)
      bounds = diff_alpha_node(fg, qg, target, z, zq, d, box, steps=steps, learning_rate=learning_rate,
                               sound=sound, row_chunk=row_chunk)
      return bounds if default is None else intersect(bounds, default[2][target], sound=sound)
    return diff_bound_node(fg, qg, target, z, zq, d, box, sound=sound, row_chunk=row_chunk)

  z, zq, d = diff_bounds(fg, qg, box, None, sound, True, row_chunk, check=check, node_bound=node_bound)
  if default is not None:
    z, zq, d = ([intersect(a, b, sound=sound) for a, b in zip(mine, theirs)]
                for mine, theirs in zip((z, zq, d), default))
  return z, zq, d
