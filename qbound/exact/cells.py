"""The cells of f_q's input grid, and f_q's value on a cell within proven rounding error.

Where every path from the input through f_q passes a staircase rounding of an entrywise affine
function of the input (:func:`pre_rounding`), the ties of those roundings cut the box into cells
(:func:`input_cells`, :func:`cell_tables`) on each of which f_q is constant. :func:`evaluate` runs f_q
at one point of a cell in float32, and :func:`error_bounds` bounds how far each node's float32 value
can be from its real-arithmetic one (the standard model of Higham 2002, as :mod:`qbound.bounds.fp`),
so that a rounding near a tie is recognised. :mod:`qbound.exact.grid` enumerates the cells.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound.bounds import fp
from qbound.box import Box

# Cells are widened past their computed ties by this relative amount (float64 ties are exact to
# ~1e-16 relative): a point near a tie then lies in both neighbouring cells.
CELL_WIDENING = 1e-9
STAIRCASES = ("nearest", "away", "floor", "ceil")


def pre_rounding(graph: G.Graph):
  """``(gates, chain)``: the staircase rounding nodes fed by the input through affine and clip
  nodes only, and those nodes; None when some path from the input to the output avoids them (or
  meets another kind of node first)."""
  feeds = [False] * len(graph.nodes)  # the value depends on x without a rounding in between
  feeds[0] = True
  gates = []
  for idx, node in enumerate(graph.nodes[1:], start=1):
    if not any(feeds[i] for i in node.inputs):
      continue
    if node.kind == G.ROUND and node.attrs[0] in STAIRCASES:
      gates.append(idx)
    elif node.kind in (G.AFFINE, G.CLIP):
      feeds[idx] = True
    else:
      return None
  if feeds[graph.output] or not gates:
    return None
  chain = [i for i in range(1, len(graph.nodes)) if feeds[i]]
  # Clips only right before the rounding (then the rounding's input is a clipped affine function).
  for i in chain:
    if graph.nodes[i].kind == G.CLIP and any(graph.nodes[c].kind == G.AFFINE for c in graph.consumers()[i]):
      return None
  return gates, chain


def _entrywise_affine(graph: G.Graph, gate: int):
  """``(M, b, clip_lo, clip_hi)`` with the gate's input ``= clip(M x + b)`` per entry (float64), or
  None unless each entry depends on at most one input entry."""
  n_in = int(np.prod(graph.input_shape, dtype=np.int64))
  src = graph.nodes[gate].inputs[0]
  clips = []
  while graph.nodes[src].kind == G.CLIP:
    clips.append(graph.nodes[src])
    src = graph.nodes[src].inputs[0]
  m_b = _dense_path(graph, src, n_in)
  if m_b is not None:
    m, b = m_b
  else:
    m, b = _path_by_jax(graph, src, n_in)
  if np.any((m != 0).sum(axis=1) > 1):
    return None
  lo = np.full(b.shape, -np.inf)
  hi = np.full(b.shape, np.inf)
  for node in reversed(clips):  # innermost first
    c_lo = np.broadcast_to(np.asarray(node.weights[0], np.float64), node.shape).reshape(-1)
    c_hi = np.broadcast_to(np.asarray(node.weights[1], np.float64), node.shape).reshape(-1)
    lo, hi = np.minimum(np.maximum(lo, c_lo), c_hi), np.minimum(np.maximum(hi, c_lo), c_hi)
  return m, b, lo, hi


def _dense_path(graph: G.Graph, src: int, n_in: int):
  """``(M, b)`` with node ``src`` ``= M x + b`` (float64, flat), read off the weights where the path
  to it is a chain of dense maps (:func:`qbound.bounds.host_chain.dense_matrix`), reshapes and
  clips (passed through, as :func:`_path_by_jax` does); else None. NumPy: nothing compiles."""
  from qbound.bounds import host_chain

  m, b, node_id = np.eye(n_in), np.zeros(n_in), src
  path = []
  while node_id != 0:
    node = graph.nodes[node_id]
    if len(node.inputs) != 1:
      return None
    path.append(node)
    node_id = node.inputs[0]
  for node in reversed(path):
    if node.kind == G.CLIP or host_chain.moves_nothing(node):
      continue
    if node.kind != G.AFFINE:
      return None
    matrix = host_chain.dense_matrix(node)
    if matrix is None:
      return None
    bias = 0.0 if node.bias is None else np.broadcast_to(np.asarray(node.bias, np.float64), node.shape).reshape(-1)
    m, b = matrix @ m, matrix @ b + bias
  return m, b


def _path_by_jax(graph: G.Graph, src: int, n_in: int):
  """:func:`_dense_path` for any linear path: node ``src`` evaluated in float64 at 0 and the unit
  vectors (each operation compiles on a first call)."""
  with jax.enable_x64(True):
    g64 = G.float64_copy(graph)
    def value(x):
      vals = [x]
      for node in g64.nodes[1:src + 1]:
        if node.kind == G.CLIP:  # clips on other branches: not on this gate's path, never read
          vals.append(vals[node.inputs[0]])
          continue
        vals.append(G._apply_node(node, [vals[i] for i in node.inputs]))  # noqa: SLF001
      return vals[src].reshape(-1)
    zero = jnp.zeros(graph.input_shape, jnp.float64)
    b = np.asarray(value(zero), np.float64)
    basis = jnp.eye(n_in, dtype=jnp.float64).reshape((n_in, *graph.input_shape))
    m = np.asarray(jax.vmap(value)(basis), np.float64).reshape(n_in, -1).T - b[:, None]
  return m, b


def _ties(mode: str, u_lo: float, u_hi: float) -> np.ndarray:
  """The values of ``u`` in ``[u_lo, u_hi]`` where the rounding jumps."""
  offset = 0.5 if mode in ("nearest", "away") else 0.0
  first, last = math.ceil(u_lo - offset), math.floor(u_hi - offset)
  if last - first > 1 << 22:
    raise OverflowError
  return np.arange(first, last + 1, dtype=np.float64) + offset


def cells_at_most(graph: G.Graph, gates, bounds) -> float:
  """An upper bound on the number of cells: the product over rounded entries of one plus the ties
  within their input's interval bounds (exact when each input entry is rounded once)."""
  total = 1.0
  for gate in gates:
    lo, hi = (np.asarray(b, np.float64).reshape(-1) for b in bounds[graph.nodes[gate].inputs[0]])
    offset = 0.5 if graph.nodes[gate].attrs[0] in ("nearest", "away") else 0.0
    ties = np.maximum(np.floor(hi - offset) - np.ceil(lo - offset) + 1, 0)
    total *= float(np.prod(1 + np.minimum(ties, 1e9)))
    if not np.isfinite(total) or total > 1e18:
      return math.inf
  return total


def input_cells(graph: G.Graph, box: Box) -> Optional[list]:
  """Per flat input entry, the boundaries ``lo = e_0 <= ... <= e_m = hi`` of f_q's cells, or None
  when f_q does not round its input first (see the module docstring).

  ``graph`` is f_q's graph (``merged.fq_graph``); a cell of entry ``i`` is ``[e_k, e_{k+1}]``
  (zero-width cells mark ties at the box's ends).

  Example (the input rounded to steps of 1/2 on [0, 1]: ties at 1/4 and 3/4, widened a little):
    >>> import jax.numpy as jnp, qbound as qb
    >>> from qbound.exact.cells import input_cells
    >>> fq = lambda x: jnp.round(x * 2) / 2
    >>> box = qb.Box(jnp.zeros(1), jnp.ones(1))
    >>> [[round(float(e), 6) for e in edges] for edges in input_cells(qb.trace(fq, box.lower), box)]
    [[0.0, 0.25, 0.75, 1.0]]
  """
  found = pre_rounding(graph)
  if found is None:
    return None
  gates, _ = found
  lower = np.asarray(box.lower, np.float64).reshape(-1)
  upper = np.asarray(box.upper, np.float64).reshape(-1)
  ties: list = [[] for _ in range(lower.size)]
  for gate in gates:
    parts = _entrywise_affine(graph, gate)
    if parts is None:
      return None
    m, b, c_lo, c_hi = parts
    mode = graph.nodes[gate].attrs[0]
    for e in range(m.shape[0]):
      cols = np.flatnonzero(m[e])
      if cols.size == 0:
        continue
      i, a = int(cols[0]), float(m[e, cols[0]])
      ends = sorted((a * lower[i] + b[e], a * upper[i] + b[e]))
      u_lo, u_hi = min(max(ends[0], c_lo[e]), c_hi[e]), min(max(ends[1], c_lo[e]), c_hi[e])
      try:
        t = _ties(mode, u_lo, u_hi)
      except OverflowError:
        return None
      x = (t - b[e]) / a
      if np.any(np.abs(t) + abs(b[e]) > 1e3 * abs(a) * (1 + np.abs(x))):
        return None  # float64's error in x would outgrow the cells' widening (CELL_WIDENING)
      ties[i].append(np.clip(x, lower[i], upper[i]))
  edges = [np.sort(np.concatenate([[lower[i]], *ties[i], [upper[i]]])) for i in range(lower.size)]
  for e in edges:
    # A cell narrower than float32 can resolve (two roundings' ties nearly together) would have its
    # representative rounded out of it; zero-width cells (ties at the box's ends) are fine.
    width = np.diff(e)
    if np.any((width > 0) & (width < 1e-5 * (1 + np.abs(e[1:])))):
      return None
  return edges


def cell_tables(edges: list, box: Box):
  """Per entry: the cells' widened ends and representatives (float32) and core ends (float64)."""
  dtype = np.dtype(jnp.result_type(box.lower))
  tables = []
  for i, e in enumerate(edges):
    lo_c, hi_c = e[:-1], e[1:]
    slack = CELL_WIDENING * (1.0 + np.maximum(np.abs(lo_c), np.abs(hi_c)))
    lo_w = np.maximum(lo_c - slack, e[0])
    hi_w = np.minimum(hi_c + slack, e[-1])
    # Widened ends rounded outward to the input's dtype, so the float32 cell contains the real one.
    lo32 = np.nextafter(lo_w.astype(dtype), -np.inf).astype(dtype)
    hi32 = np.nextafter(hi_w.astype(dtype), np.inf).astype(dtype)
    lo32 = np.maximum(lo32, np.asarray(e[0], dtype))
    hi32 = np.minimum(hi32, np.asarray(e[-1], dtype))
    rep = ((lo_c + hi_c) / 2).astype(dtype)
    tables.append((lo32, hi32, rep, lo_c, hi_c))
  return tables


def error_bounds(graph: G.Graph, bounds) -> list:
  """A-priori bounds on ``|fl(z) - z|`` for every node of ``graph`` evaluated in its dtype at points
  of the box whose interval bounds are ``bounds``, given that no rounding's input lies within its
  own error bound of a tie (then the rounding is exact; :func:`evaluate` checks it per point).

  Affine nodes add the standard dot-product error of their magnitude (Higham 2002, as
  :func:`qbound.bounds.fp.dot_margin`), ReLU and clip are 1-Lipschitz and exact in floats.
  """
  errs = [jnp.zeros(graph.input_shape, jnp.result_type(bounds[0][0]))]
  mags = [jnp.maximum(jnp.abs(bounds[0][0]), jnp.abs(bounds[0][1]))]
  for idx, node in enumerate(graph.nodes[1:], start=1):
    lo, hi = bounds[idx]
    mag = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    if node.kind == G.AFFINE:
      e_in, m_in = errs[node.inputs[0]], mags[node.inputs[0]]
      magnitude = node.linear_abs(m_in + e_in) + (0 if node.bias is None else jnp.abs(node.bias))
      err = fp.round_up(node.linear_abs(e_in) * fp.SLACK + fp.dot_margin(node.terms + 2, magnitude, lo.dtype))
    elif node.kind == G.ADD:
      total = sum(jnp.broadcast_to(errs[i], node.shape) for i in node.inputs)
      magnitude = sum(jnp.broadcast_to(mags[i] + errs[i], node.shape) for i in node.inputs)
      err = fp.round_up(total * fp.SLACK + fp.dot_margin(len(node.inputs), magnitude, lo.dtype))
    elif node.kind == G.CONCAT:
      err = jnp.concatenate([errs[i] for i in node.inputs], axis=node.attrs[0])
    elif node.kind in (G.RELU, G.CLIP) or (node.kind == G.ROUND and node.attrs[0] == "none"):
      err = errs[node.inputs[0]]
    elif node.kind == G.ROUND and node.attrs[0] in STAIRCASES:
      err = jnp.zeros(node.shape, lo.dtype)
    else:
      raise ValueError(f"no a-priori error bound for a {node.kind!r} node")
    errs.append(jnp.broadcast_to(err, node.shape))
    mags.append(jnp.broadcast_to(mag, node.shape))
  return errs




def _near_tie(mode: str, u, err):
  """Whether ``round(u)`` could differ from the real rounding of a value within ``err`` of ``u``."""
  frac = u - jnp.floor(u)
  dist = jnp.abs(frac - 0.5) if mode in ("nearest", "away") else jnp.minimum(frac, 1 - frac)
  # frac and dist round for negative u (-0.3 + 1): a few units of roundoff of u's size more.
  return jnp.any(dist <= err + 4 * jnp.finfo(u.dtype).eps * (1 + jnp.abs(u)))


def evaluate(graph: G.Graph, errs, x):
  """``graph(x)`` in its dtype and whether any rounding met a possible tie."""
  vals = [x]
  flagged = jnp.zeros((), bool)
  for node in graph.nodes[1:]:
    args = [vals[i] for i in node.inputs]
    if node.kind == G.ROUND and node.attrs[0] in STAIRCASES:
      flagged = flagged | _near_tie(node.attrs[0], args[0], errs[node.inputs[0]])
    vals.append(G._apply_node(node, args))  # noqa: SLF001
  return vals[graph.output], flagged
