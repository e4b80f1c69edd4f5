"""Backward linear bound propagation (CROWN).

To bound a node ``z`` of the graph, CROWN starts from ``lambda . z`` for a set of rows ``lambda``
(here ``+e_i`` and ``-e_i`` for every entry, giving a lower and an upper bound at once) and walks the
graph backwards: affine layers transpose exactly, and every ReLU is replaced by linear lower and
upper relaxations chosen per sign of the coefficient, until ``lambda . z >= Lambda . x + beta``
holds for all inputs in the box, whose minimum over the box is closed-form. Bounds of every
ReLU's input are needed first and are themselves computed by CROWN, layer by layer, intersected
with interval bounds.

Reference: Zhang, Weng, Chen, Hsieh, Daniel, "Efficient Neural Network Robustness Certification
with General Activation Functions", NeurIPS 2018 (CROWN); the ReLU relaxation is that of Wong &
Kolter 2018 and DeepPoly (Singh et al., POPL 2019). Optimised lower slopes (``alphas``) follow Xu
et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
Massively Parallel Incomplete Verifiers", ICLR 2021.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp, relax
from qbound.bounds.common import as_graph
from qbound.bounds.interval import center_radius, interval_bounds
from qbound.box import Box, validate_box


ACTIVATIONS = (G.RELU, G.CLIP, G.ROUND)


def _row_sum(x):
  # A fixed pairwise order, so that sums over a layer carry log2(n) roundings, not n.
  return fp.pairwise_sum(x)


def _magnitude(bounds, idx):
  lo, hi = bounds[idx]
  return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def backward_lower(graph: G.Graph, target: int, rows, bounds, box: Box, *, alphas=None, sound: bool = True):
  """Lower bounds of ``rows[k] . z_target`` over the box, one per row.

  Args:
    graph: the layer graph.
    target: index of the node ``z_target``.
    rows: coefficients, shape ``(m, *node.shape)``.
    bounds: proven ``(lower, upper)`` for every node that feeds a ReLU before ``target`` (and,
      in sound mode, for every node, to size rounding margins).
    box: the input box.
    alphas: optional ``{relu node index: lower slope array}`` (values in [0, 1]).
    sound: add proven floating-point margins.

  Returns:
    An array of shape ``(m,)``.
  """
  dtype = rows.dtype
  lambdas = {target: rows}
  beta = jnp.zeros(rows.shape[0], dtype)
  err = jnp.zeros(rows.shape[0], dtype)

  def push(idx, value):
    nonlocal err
    if idx in lambdas:
      total = lambdas[idx] + value
      if sound:
        err = err + fp.unit_roundoff(dtype) * fp.SLACK * _row_sum(jnp.abs(total) * _magnitude(bounds, idx))
      lambdas[idx] = total
    else:
      lambdas[idx] = value

  for idx in range(target, 0, -1):
    if idx not in lambdas:
      continue
    lam = lambdas.pop(idx)
    node = graph.nodes[idx]
    if node.kind == G.AFFINE:
      if node.bias is not None:
        beta = beta + _row_sum(lam * node.bias)
        if sound:
          err = err + fp.dot_margin(fp.pairwise_terms(node.size), _row_sum(jnp.abs(lam * node.bias)), dtype)
      src = node.inputs[0]
      push(src, jax.vmap(node.linear_transpose)(lam))
      if sound:
        # sum_i (|A|^T |lam|)_i m_i = |lam| . (|A| m): one vector per node instead of a product per row.
        spread = node.linear_abs(_magnitude(bounds, src))
        err = err + fp.dot_margin(node.op.terms_transpose if node.op else 1, _row_sum(jnp.abs(lam) * spread), dtype)
    elif node.kind == G.ADD:
      for sign, src in zip(node.attrs, node.inputs):
        push(src, lam if sign > 0 else -lam)
    elif node.kind == G.CONCAT:
      axis = node.attrs[0] + 1
      start = 0
      for src in node.inputs:
        width = graph.nodes[src].shape[node.attrs[0]]
        push(src, jax.lax.slice_in_dim(lam, start, start + width, axis=axis))
        start += width
    elif node.kind in ACTIVATIONS:
      src = node.inputs[0]
      lo, hi = bounds[src]
      if node.kind == G.RELU:
        alpha = None if alphas is None else alphas.get(idx)
        r = relax.relu(lo, hi, alpha, sound=sound)
      elif node.kind == G.CLIP:
        r = relax.clip(lo, hi, *node.weights, sound=sound)
      else:
        r = relax.rounding(lo, hi, node.attrs[0], sound=sound)
      pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
      push(src, pos * r.lower_slope + neg * r.upper_slope)
      beta = beta + _row_sum(neg * r.upper_offset) + _row_sum(pos * r.lower_offset)
      if sound:
        slope = jnp.maximum(jnp.abs(r.lower_slope), jnp.abs(r.upper_slope))
        err = err + fp.unit_roundoff(dtype) * fp.SLACK * _row_sum(jnp.abs(lam) * slope * _magnitude(bounds, src))
        err = err + fp.dot_margin(fp.pairwise_terms(node.size), _row_sum(jnp.abs(neg * r.upper_offset) + jnp.abs(pos * r.lower_offset)), dtype)
    else:
      raise ValueError(f"CROWN has no rule for node kind {node.kind!r}")

  lam = lambdas.pop(0, None)
  if lam is None:  # the target does not depend on the input
    return beta - err if sound else beta
  c, rad = center_radius(box.lower, box.upper, sound)
  lin = _row_sum(lam * c)
  spread = _row_sum(jnp.abs(lam) * rad)
  value = lin - spread + beta
  if not sound:
    return value
  n = int(c.size)
  err = err + fp.dot_margin(2 * fp.pairwise_terms(n) + 2, _row_sum(jnp.abs(lam) * (jnp.abs(c) + rad)) + jnp.abs(beta), dtype)
  return fp.round_down(value - err)


def bound_node(graph: G.Graph, target: int, bounds, box: Box, *, alphas=None, sound: bool = True,
               row_chunk: Optional[int] = None):
  """CROWN lower and upper bounds of node ``target`` (elementwise, the node's shape).

  ``row_chunk`` rows at a time when given (bounded memory, :mod:`qbound.memory`), else all ``2n``.
  """
  from qbound.memory import node_bounds_by_rows

  node = graph.nodes[target]
  lower = lambda rows: backward_lower(graph, target, rows, bounds, box, alphas=alphas, sound=sound)
  return node_bounds_by_rows(lower, node.size, node.shape, box.lower.dtype, row_chunk)


def relu_inputs(graph: G.Graph) -> list[int]:
  """Indices of the nodes whose bounds an activation's relaxation needs, in topological order."""
  return sorted({node.inputs[0] for node in graph.nodes if node.kind in ACTIVATIONS} - {0})


def intersect(a, b):
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


@functools.partial(jax.jit, static_argnames=("sound", "row_chunk"))
def crown_bounds(graph: G.Graph, box: Box, alphas: Optional[Mapping] = None, sound: bool = True,
                 row_chunk: Optional[int] = None) -> list:
  """Bounds of every node: interval bounds, tightened by CROWN on every ReLU input and the output.

  ``row_chunk``: backward rows per block (None: all at once); see :mod:`qbound.memory`.
  """
  bounds = list(interval_bounds(graph, box, sound))
  for idx in relu_inputs(graph) + [graph.output]:
    if idx == 0:
      continue
    bounds[idx] = intersect(bounds[idx], bound_node(graph, idx, bounds, box, alphas=alphas, sound=sound,
                                                    row_chunk=row_chunk))
  return bounds


def crown(fn, box: Box, *, sound: bool = True) -> Box:
  """Proven bounds on ``fn(x)`` over ``box`` by CROWN (backward linear relaxation).

  Never looser than :func:`~qbound.bounds.interval` (the two are intersected).

  Args:
    fn: a pure JAX function of one input, a :class:`~qbound.graph.Graph`, or a
      :class:`~qbound.merge.MergedNetwork`.
    box: the input set.
    sound: widen by proven floating-point margins (see :mod:`qbound.bounds.fp`).

  Returns:
    A :class:`~qbound.box.Box` with ``lower <= fn(x) <= upper`` for every ``x`` in ``box``.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> fn = lambda x: jax.nn.relu(x) - jax.nn.relu(-x)   # the identity, written with ReLUs
    >>> out = qb.bounds.crown(fn, qb.Box(-jnp.ones(1), jnp.ones(1)))
    >>> bool(out.upper[0] < 1.5)
    True
  """
  box = validate_box(box)
  graph = as_graph(fn, box)
  bounds = crown_bounds(graph, box, None, sound)
  return Box(*bounds[graph.output])
