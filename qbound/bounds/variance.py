"""Lower bounds of variances and means of squares (layer norm, RMS norm) by Cauchy-Schwarz.

A layer norm divides by ``sqrt(var + eps)``. Linear relaxations bound ``var = mean(x^2) -
mean(x)^2`` (flax's default) as a difference of two separately relaxed squares, and ``mean((x -
m)^2)`` through tangents at the middle of each entry's interval: once the entries' intervals are a
few times wider than their spread, the variance is proven only ``>= 0`` and ``1 / sqrt(var + eps)``
is bounded by ``1 / sqrt(eps)`` (1000 for flax's 1e-6). A mean of squares has a lower bound that
does not go through the entries' intervals. For weights ``w_i >= 0`` and any row ``r`` with
``r_i = 0`` where ``w_i = 0``, Cauchy-Schwarz gives

    sum_i r_i y_i <= sqrt(sum_i w_i y_i^2) sqrt(Q),   Q = sum_i r_i^2 / w_i,

so ``sum_i w_i y_i^2 >= max(L, 0)^2 / Q`` where ``L`` is a lower bound of ``r . y`` over the box:
one CROWN row (Zhang et al., NeurIPS 2018) per mean, walked back to the input through the whole
network rather than through the entries' intervals. The row is ``r_i = w_i p_i`` with ``p`` the
values at the box's centre, where the bound is tight when the network is close to linear over the
box (``L`` near ``sum w p^2``, ``Q = sum w p^2``). For the fast variance ``sum w x^2 - m^2`` with
``m = sum w x``: ``sum w x^2 - m^2 = sum w (x - m)^2 - (s - 1) m^2`` (``s = sum w``), and ``p`` is
centred, ``p_i = x_i - m`` at the centre, so ``r . (x - m) = r . x - m sum r`` is again one row on
``x``.

The patterns are found in the graph's structure (:func:`find`): a bias-free linear chain from a
``square`` node (a mean over the last axis, a broadcast), and for the fast variance ``A - S`` with
``A`` that chain of ``x^2`` and ``S`` the square of the same chain of ``x``. The chain's weights
are checked in traced code (non-negative, and equal for the two chains), so a graph that only looks
like a variance gets no bound (``-inf``), never a wrong one.

Sound mode: ``L`` is CROWN's sound bound; ``Q`` is rounded up, ``m sum r`` and ``(s - 1) m^2`` are
taken at their largest magnitude over ``m``'s bounds (widened by the rounding of the computed mean),
and the float evaluation of the mean (``n`` positive terms) is allowed ``2 (n + 4) u`` of its
magnitude. The measurement behind it (the digits
ViT at radius 0.01, ``experiments/vit_digits.py``): the final layer norm's variance, sampled in
[1.2, 1.8], was proven ``>= 0`` on two images of three; with this bound ``>= 0.10``, ``0.77`` and
``0.37``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp
from qbound.bounds.common import jit_step

# The chain's weights are found by applying it to every unit vector: a dense (outputs x inputs)
# matrix, kept small.
MAX_ENTRIES = 1 << 20


class Pattern(NamedTuple):
  """``node = chain(square(y))`` (``centred=None``), or ``node = chain(square(x)) - square(chain(x))``.

  Attributes:
    y: the node whose squares are averaged (``x`` for the fast variance).
    chain: the bias-free affine nodes from the square to the mean, in order.
    centred: for the fast variance, ``(mean_chain, mean_node, square_of_mean_node, sum_node)``:
      the chain from ``x`` to its mean, its last node, the square of it, and the ``A`` node.
  """

  y: int
  chain: tuple
  centred: Optional[tuple] = None


def _plain_affine(node: G.Node) -> bool:
  return node.kind == G.AFFINE and node.bias is None and len(node.inputs) == 1


def _chain_back(graph: G.Graph, idx: int, stop: int = -1):
  """``(start, chain)``: the bias-free affine nodes ending at ``idx``, walked back to the first
  node that is not one, or to ``stop`` (``start``)."""
  chain = []
  while idx != stop and _plain_affine(graph.nodes[idx]):
    chain.append(idx)
    idx = graph.nodes[idx].inputs[0]
  return idx, tuple(reversed(chain))


def _same_ops(graph: G.Graph, a: tuple, b: tuple) -> bool:
  return len(a) == len(b) and all(graph.nodes[i].op == graph.nodes[j].op for i, j in zip(a, b))


def find(graph: G.Graph) -> dict:
  """``{node index: Pattern}`` for every mean of squares and fast variance in ``graph``.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> from qbound.bounds import variance
    >>> g = qb.trace(lambda x: jnp.mean(x * x) - jnp.mean(x) ** 2, jnp.zeros(4))
    >>> [p.y for p in variance.find(g).values()]
    [0]
  """
  consumers = graph.consumers()
  out = {}
  centred_sums = set()
  for idx, node in enumerate(graph.nodes):
    if node.kind != G.ADD or len(node.inputs) != 2 or sorted(node.attrs) != [-1, 1]:
      continue
    a, s = node.inputs if node.attrs[0] > 0 else node.inputs[::-1]
    if graph.nodes[s].kind != G.SQUARE:
      continue
    sq, chain_a = _chain_back(graph, a)
    if graph.nodes[sq].kind != G.SQUARE:
      continue
    x = graph.nodes[sq].inputs[0]
    start, chain_m = _chain_back(graph, graph.nodes[s].inputs[0], stop=x)
    if chain_a and start == x and _same_ops(graph, chain_a, chain_m) and _small(graph, x, a):
      out[idx] = Pattern(x, chain_a, (chain_m, chain_m[-1], s, a))
      centred_sums.add(a)
  for idx, node in enumerate(graph.nodes):
    if idx in out or idx in centred_sums or not _plain_affine(node):
      continue
    if any(_plain_affine(graph.nodes[c]) for c in consumers[idx]):
      continue  # not the chain's end
    sq, chain = _chain_back(graph, idx)
    if graph.nodes[sq].kind == G.SQUARE and _small(graph, graph.nodes[sq].inputs[0], idx):
      out[idx] = Pattern(graph.nodes[sq].inputs[0], chain)
  return out


def _small(graph: G.Graph, src: int, dst: int) -> bool:
  return graph.nodes[src].size * graph.nodes[dst].size <= MAX_ENTRIES


def _weights(chain_nodes, in_shape, dtype):
  """The chain's matrix ``(outputs, inputs)``, by applying it to every unit vector."""
  n = 1
  for d in in_shape:
    n *= d
  eye = jnp.eye(n, dtype=dtype).reshape((n, *in_shape))

  def apply(v):
    for node in chain_nodes:
      v = node.linear(v)
    return v.reshape(-1)

  return jax.vmap(apply)(eye).T


def _rows(chain, mean_chain, center, sound: bool):
  """Rows ``r_j = w_j p^j`` (shape ``(outputs, *y.shape)``), ``Q_j`` rounded up, ``sum_j r``, ``s_j``
  and whether the chain's weights fit the pattern."""
  del sound
  dtype = center.dtype
  w = _weights(chain, center.shape, dtype).astype(dtype)
  flat = center.reshape(-1)
  valid = jnp.all(w >= 0)
  if mean_chain is None:
    p = jnp.broadcast_to(flat, w.shape)
  else:
    wm = _weights(mean_chain, center.shape, dtype).astype(dtype)
    valid = valid & jnp.all(w == wm)
    p = flat[None, :] - (w @ flat)[:, None]
  r = w * p
  positive = w > 0
  n = flat.size
  u = fp.unit_roundoff(dtype)
  q = jnp.sum(jnp.where(positive, r * r / jnp.where(positive, w, 1), 0), axis=1)
  # Each of the n terms and the sum within (n + 4) u, and w itself within 8 n u of the chain's real
  # weights (a few roundings per entry): Q rounded up generously.
  q = q * (1 + 2 * (n + 4) * u + 8 * n * u)
  rho = jnp.sum(r, axis=1)
  rho_err = (n + 2) * u * jnp.sum(jnp.abs(r), axis=1)
  s = jnp.sum(w, axis=1)
  s_err = jnp.abs(s - 1) + (8 * n + n + 2) * u * s
  return r.reshape((w.shape[0], *center.shape)), q, jnp.abs(rho) + rho_err, s_err, valid


def _lower(low, q, rho, s_err, valid, y_bounds, mean_bounds, sum_bounds, square_bounds, n: int, sound: bool):
  """``max(L', 0)^2 / Q`` less the corrections (see the module docstring), per output."""
  dtype = low.dtype
  u = fp.unit_roundoff(dtype)
  if mean_bounds is not None:
    # The real mean of the float x differs from the computed one by at most the rounding of n
    # terms: delta = (n + 2) u sum w |x| <= (n + 2) u (1 + s_err) max |x|.
    y_mag = jnp.max(jnp.maximum(jnp.abs(y_bounds[0]), jnp.abs(y_bounds[1])))
    delta = (n + 2) * u * (1 + s_err) * y_mag
    computed = jnp.maximum(jnp.abs(mean_bounds[0]), jnp.abs(mean_bounds[1])).reshape(-1)
    m_mag = (computed + delta) * (1 + 4 * u)
    low = low - rho * m_mag * (1 + 4 * u)
  positive = (low > 0) & (q > 0) & jnp.isfinite(q)
  low = jnp.where(positive, low, 0)
  value = low * low / jnp.where(positive, q, 1)
  value = value * (1 - 8 * u)
  if mean_bounds is not None:
    value = value - s_err * m_mag * m_mag * (1 + 4 * u)
    # The graph's own rounding: mean of n positive squares, the square of the mean, their difference.
    # ... and the computed square of the mean is of the computed mean, up to delta from the real one.
    top = jnp.abs(sum_bounds[1]).reshape(-1) + jnp.abs(square_bounds[1]).reshape(-1)
    value = value - 2 * (n + 4) * u * top - (2 * computed + delta) * delta * (1 + 4 * u)
  else:
    value = value * (1 - 2 * (n + 4) * u)
  if sound:
    value = fp.round_down(value)
  value = jnp.where(positive & valid & jnp.isfinite(value), value, -jnp.inf)
  return value.astype(dtype)


_rows = jit_step(_rows, (None, None, 0))
_lower = jit_step(_lower, (0, 0, 0, 0, 0, 0, 0, 0, 0, None))


@functools.partial(jax.jit, static_argnames=("idx", "batched"))
def _center_value(graph: G.Graph, lower, upper, idx: int, batched: bool):
  value = lambda lo, hi: graph.values((lo + hi) / 2)[idx]
  return jax.vmap(value)(lower, upper) if batched else value(lower, upper)


def lower_bound(graph: G.Graph, idx: int, pattern: Pattern, bounds, box, backward_lower, *, sound: bool = True,
                batched: bool = False):
  """A proven lower bound of node ``idx`` (its shape; ``-inf`` where none is found), from
  :func:`find`'s ``pattern`` and proven ``bounds`` of the nodes before it.

  ``backward_lower(graph, node, rows, bounds, box, sound=, batched=)`` is a sound lower bound of
  ``rows . node`` over the box (CROWN's, :func:`qbound.bounds.crown.backward_lower`, which calls
  this function: passed in, so that imports run one way).
  """

  nodes = tuple(graph.nodes[i] for i in pattern.chain)
  mean_nodes = None if pattern.centred is None else tuple(graph.nodes[i] for i in pattern.centred[0])
  center = _center_value(graph, box.lower, box.upper, pattern.y, batched)
  rows, q, rho, s_err, valid = _rows(nodes, mean_nodes, center, sound=sound, batched=batched)
  low = backward_lower(graph, pattern.y, rows, bounds, box, sound=sound, batched=batched)
  if pattern.centred is None:
    mean_b = sum_b = square_b = None
  else:
    _, mean_idx, square_idx, sum_idx = pattern.centred
    mean_b, sum_b, square_b = bounds[mean_idx], bounds[sum_idx], bounds[square_idx]
  # Roundings of the graph's own mean: n terms and a few more for the chain's other steps.
  n = graph.nodes[pattern.y].size + 2 * len(pattern.chain)
  value = _lower(low, q, rho, s_err, valid, bounds[pattern.y], mean_b, sum_b, square_b, n, sound=sound,
                 batched=batched)
  shape = graph.nodes[idx].shape
  return value.reshape((value.shape[0], *shape) if batched else shape)
