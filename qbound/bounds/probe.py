"""Errors reached on the pieces of branch and bound: each piece's centre, or the corner its gradient points to.

Evaluating the merged network where a piece's error is likely largest, as pieces are made, lets
the lower bound keep up with the shrinking upper bounds (and is the float64-checked evidence
that a piece's bound holds: :func:`qbound.bounds.guards.check_points`).

Example:
  >>> import jax.numpy as jnp, qbound as qb
  >>> from qbound.bounds.probe import probe_piece
  >>> box = qb.Box(jnp.zeros(2), jnp.ones(2))
  >>> merged = qb.merge(lambda x: x[:1] - 2 * x[1:], lambda x: 0.5 * x[:1], box)  # g = x0 / 2 - 2 x1
  >>> value, x = probe_piece(merged.graph, jnp.array([0]), jnp.full(2, 0.5), box.lower, box.upper, 0)
  >>> float(value), x.tolist()  # the centre's error is 0.75; the corner (0, 1) reaches 2
  (2.0, [0.0, 1.0])
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound import sharding


def probe_piece(graph: G.Graph, outputs, x, low, high, j):
  """The error reached in one piece ``[low, high]``: at its centre ``x`` or at the corner its gradient
  points to, whichever is larger.

  On a small piece ``g`` is close to affine, so the corner in the direction of
  ``sign(g_j(x)) * grad g_j(x)`` (``j`` the piece's worst output) is close to where ``|g_j|`` peaks on
  the piece: a reached error that keeps up with the shrinking upper bounds, for one more forward
  pass. Returns the better point's ``max_j |g_j|`` over the selected outputs and that point.
  """
  value_of = lambda y: jnp.max(jnp.abs(graph(y).reshape(-1)[outputs]))
  g_j, grad = jax.value_and_grad(lambda y: graph(y).reshape(-1)[outputs][j])(x)
  direction = jnp.sign(g_j) * grad
  corner = jnp.where(direction > 0, high, jnp.where(direction < 0, low, x))
  at_centre, at_corner = value_of(x), value_of(corner)
  better = at_corner > at_centre
  return jnp.where(better, at_corner, at_centre), jnp.where(better, corner, x)


@functools.partial(jax.jit, static_argnames=("mesh",))
def probe_batch(graph: G.Graph, outputs, xs, lo, hi, worst, mesh=None):
  """:func:`probe_piece` on a batch of pieces, split over the mesh's devices."""
  one = functools.partial(probe_piece, graph, outputs)
  return sharding.data_parallel(jax.vmap(one), mesh, 0, 4)(xs, lo, hi, worst)
