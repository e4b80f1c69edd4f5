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
Kolter 2018 and DeepPoly (Singh et al., POPL 2019); tanh and sigmoid use CROWN's tangent and chord
lines (:mod:`qbound.bounds.smooth`). Optimised lower slopes (``alphas``) follow Xu
et al., "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and
Massively Parallel Incomplete Verifiers", ICLR 2021.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp, nonlinear, rules, saturation, variance
from qbound.bounds.common import LINEAR_KINDS, as_graph, first_half, jit_step, local, mirror_rows
from qbound.bounds.interval import ROUTING_ONLY, _node_interval, center_radius, interval_bounds
from qbound.bounds.rows import node_bounds_by_rows
from qbound.bounds.guards import check_bounds, spot_check
from qbound.box import Box, validate_box


ACTIVATIONS = (G.RELU, G.CLIP, G.ROUND, G.TANH, G.SIGMOID)


def _row_sum(x):
  # A fixed pairwise order, so that sums over a layer carry log2(n) roundings, not n.
  return fp.pairwise_sum(x)


def _magnitude(bounds, idx):
  lo, hi = bounds[idx]
  return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _accumulate(total, value, src_bounds, err, sound: bool):
  """``total + value`` for a node's coefficients reached twice, and ``err`` plus that sum's rounding."""
  total = total + value
  if not sound:
    return total, err
  mag = jnp.maximum(jnp.abs(src_bounds[0]), jnp.abs(src_bounds[1]))
  return total, err + fp.unit_roundoff(total.dtype) * fp.SLACK * fp.margin_sum(jnp.abs(total) * mag)


def _backward_step(node: G.Node, lam, src_bounds, alpha, beta_in, err_in, lines, sound: bool):
  """One node of the backward pass: the coefficients passed to each input (in ``node.inputs``
  order), and the running constant and rounding margin per row with this node's added."""
  parts, beta, err = _backward_rule(node, lam, src_bounds, alpha, sound, lines)
  return parts, beta_in + beta, err_in + err


def _activation_lines(node: G.Node, src_bounds, alpha, sound: bool):
  """An activation's relaxation lines, one value per neuron, in a step of their own before they
  meet the rows (XLA would otherwise recompute them once per row; see
  :func:`qbound.bounds.diff._activation_lines`)."""
  return rules.for_node(node, *src_bounds[0], alpha, sound=sound)


def _backward_rule(node: G.Node, lam, src_bounds, alpha, sound: bool, lines=None):
  dtype = lam.dtype
  beta = jnp.zeros(lam.shape[0], dtype)
  err = jnp.zeros(lam.shape[0], dtype)
  if node.kind == G.AFFINE:
    if node.bias is not None:
      beta = _row_sum(lam * node.bias)
    if sound:
      # sum_i (|A|^T |lam|)_i m_i = |lam| . (|A| m): one vector per node instead of a product per row.
      # The margins are linear in the magnitudes, so the bias's is added entry by entry: one row sum.
      n_t = node.op.terms_transpose if node.op else 1
      spread = fp.margin_coefficient(n_t, dtype) * node.linear_abs(_magnitude(src_bounds, 0))
      err = err + fp.margin_floor(n_t, dtype)
      if node.bias is not None:
        spread = spread + fp.margin_coefficient(fp.pairwise_terms(node.size), dtype) * jnp.abs(node.bias)
        err = err + fp.margin_floor(fp.pairwise_terms(node.size), dtype)
      err = err + fp.margin_sum(jnp.abs(lam) * spread)
    return (jax.vmap(node.linear_transpose)(lam),), beta, err
  if node.kind == G.ADD:
    return tuple(lam if sign > 0 else -lam for sign in node.attrs), beta, err
  if node.kind == G.CONCAT:
    axis = node.attrs[0] + 1
    parts, start = [], 0
    for lo, _ in src_bounds:
      width = lo.shape[node.attrs[0]]
      parts.append(jax.lax.slice_in_dim(lam, start, start + width, axis=axis))
      start += width
    return tuple(parts), beta, err
  if node.kind in ACTIVATIONS:
    r = lines if lines is not None else _activation_lines(node, src_bounds, alpha, sound)
    pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
    # One of pos, neg is 0 in every entry: the two products add up exactly.
    beta = _row_sum(neg * r.upper_offset + pos * r.lower_offset)
    if sound:
      slope = jnp.maximum(jnp.abs(r.lower_slope), jnp.abs(r.upper_slope))
      offset = jnp.maximum(jnp.abs(r.lower_offset), jnp.abs(r.upper_offset))
      spread = (fp.unit_roundoff(dtype) * fp.SLACK * slope * _magnitude(src_bounds, 0)
                + fp.margin_coefficient(fp.pairwise_terms(node.size), dtype) * offset)
      err = fp.margin_sum(jnp.abs(lam) * spread) + fp.margin_floor(fp.pairwise_terms(node.size), dtype)
    if isinstance(r, saturation.SaturatingRelaxation):  # at most K clips of a group at once
      saved, margin = saturation.saving(node, lam, r.sat_lower, r.sat_upper, sound=sound)
      beta, err = beta + saved, err + margin
    return (pos * r.lower_slope + neg * r.upper_slope,), beta, err
  if node.kind in G.NONLINEAR:
    return nonlinear.backward_rule(node, lam, src_bounds, sound, alpha)
  raise ValueError(f"CROWN has no rule for node kind {node.kind!r}")


def _at_input(lam, beta, err, box: Box, sound: bool):
  """The minimum of ``lam . x + beta`` over the box, less the accumulated rounding margin."""
  c, rad = center_radius(box.lower, box.upper, sound)
  value = _row_sum(lam * c) - _row_sum(jnp.abs(lam) * rad) + beta
  if not sound:
    return value
  n = int(c.size)
  err = err + fp.dot_margin(2 * fp.pairwise_terms(n) + 2, fp.margin_sum(jnp.abs(lam) * (jnp.abs(c) + rad)) + jnp.abs(beta), lam.dtype)
  return fp.round_down(value - err)


_accumulate = jit_step(_accumulate, (0, 0, 0, 0))
_backward_step = jit_step(_backward_step, (None, 0, 0, 0, 0, 0, 0))
_activation_lines = jit_step(_activation_lines, (None, 0, 0))
_at_input = jit_step(_at_input, (0, 0, 0, 0))


def backward_lower(graph: G.Graph, target: int, rows, bounds, box: Box, *, alphas=None, sound: bool = True,
                   batched: bool = False, with_coefficients: bool = False, signed_pairs: bool = False,
                   lines: Optional[Mapping] = None):
  """Lower bounds of ``rows[k] . z_target`` over the box, one per row.

  The walk is a Python loop over jit-compiled per-node steps (compiled once per node kind, shape
  and operation, see :func:`qbound.bounds.common.local`): compiling the unrolled walks of every
  target as one program takes time quadratic in depth and more, minutes for nets with
  fake-quantized activations. Under an outer ``jax.jit`` (or ``vmap``, ``grad``) it traces as usual.

  Args:
    graph: the layer graph.
    target: index of the node ``z_target``.
    rows: coefficients, shape ``(m, *node.shape)``.
    bounds: proven ``(lower, upper)`` for every node that feeds a ReLU before ``target`` (and,
      in sound mode, for every node, to size rounding margins).
    box: the input box.
    alphas: optional ``{activation node index: slopes}``: a ReLU's lower slope array, or a
      tanh/sigmoid's ``{"lower", "upper"}`` slope fractions (values in [0, 1]).
    sound: add proven floating-point margins.
    batched: ``box``, ``bounds``, ``rows`` and ``alphas`` carry a leading axis of many boxes.
    with_coefficients: also return each row's coefficients on the input.
    signed_pairs: the rows are ``[R; -R]`` (as :func:`unit_rows` makes them): a linear target
      node is stepped with ``R`` alone (:func:`qbound.bounds.common.mirror_rows`), the same results.
    lines: optional ``{activation node index: relaxation lines}`` computed already from these
      bounds and ``alphas`` (:func:`rules.for_node`): walks from many targets share them instead
      of computing them again per walk (:mod:`qbound.bounds.sparse`).

  Returns:
    An array of shape ``(m,)`` (``(batch, m)`` when batched); with ``with_coefficients`` also the
    coefficients, ``(m, *input shape)`` (``(batch, m, ...)``).
  """
  lambdas = {target: rows}
  beta = err = jnp.zeros(rows.shape[: 2 if batched else 1], rows.dtype)
  for idx in range(target, 0, -1):
    if idx not in lambdas:
      continue
    node = graph.nodes[idx]
    alpha = None if alphas is None or node.kind not in ACTIVATIONS + G.NONLINEAR else alphas.get(idx)
    src_bounds = tuple(bounds[i] for i in node.inputs)
    step_lines = None if lines is None else lines.get(idx)
    if node.kind in ACTIVATIONS and step_lines is None:
      step_lines = _activation_lines(local(node), src_bounds, alpha, sound=sound, batched=batched)
    lam = lambdas.pop(idx)
    if idx == target and signed_pairs and node.kind in LINEAR_KINDS:
      half = lambda a: first_half(a, batched)
      parts, b, e = _backward_step(local(node), half(lam), src_bounds, alpha, half(beta), half(err), step_lines,
                                   sound=sound, batched=batched)
      parts, beta, err = mirror_rows(parts, b, e, batched=batched)
    else:
      parts, beta, err = _backward_step(local(node), lam, src_bounds, alpha, beta, err, step_lines, sound=sound,
                                        batched=batched)
    for src, value in zip(node.inputs, parts):
      if src in lambdas:
        lambdas[src], err = _accumulate(lambdas[src], value, bounds[src], err, sound=sound, batched=batched)
      else:
        lambdas[src] = value
  lam = lambdas.pop(0, None)
  if lam is None:  # the target does not depend on the input
    value = fp.round_down(beta - err) if sound else beta
    lam = jnp.zeros((*rows.shape[: 2 if batched else 1], *box.lower.shape[1 if batched else 0:]), rows.dtype)
  else:
    value = _at_input(lam, beta, err, box, sound=sound, batched=batched)
  return (value, lam) if with_coefficients else value


@functools.partial(jax.jit, static_argnames=("n", "shape", "dtype", "batch"))
def unit_rows(n: int, shape: tuple, dtype, batch=None):
  """The rows ``+e_i`` then ``-e_i``: a lower and an upper bound of every entry at once (the same
  rows for each of ``batch`` boxes when given)."""
  eye = jnp.eye(n, dtype=dtype)
  rows = jnp.concatenate([eye, -eye]).reshape((2 * n, *shape))
  return rows if batch is None else jnp.broadcast_to(rows, (batch, *rows.shape))


def batch_of(box: Box, batched: bool):
  """The number of boxes of a batched box (None when not batched)."""
  return int(box.lower.shape[0]) if batched else None


def bound_node(graph: G.Graph, target: int, bounds, box: Box, *, alphas=None, sound: bool = True,
               row_chunk: Optional[int] = None, batched: bool = False):
  """CROWN lower and upper bounds of node ``target`` (elementwise, the node's shape).

  ``row_chunk`` rows at a time when given (bounded memory, :mod:`qbound.memory`), else all ``2n``.
  """
  node = graph.nodes[target]
  if row_chunk is not None:
    if batched:
      raise ValueError("row_chunk bounds one box at a time (vmap it over boxes); call without batched.")
    lower = lambda rows: backward_lower(graph, target, rows, bounds, box, alphas=alphas, sound=sound)
    return node_bounds_by_rows(lower, node.size, node.shape, box.lower.dtype, row_chunk)
  rows = unit_rows(node.size, tuple(node.shape), jnp.dtype(box.lower.dtype), batch_of(box, batched))
  low = backward_lower(graph, target, rows, bounds, box, alphas=alphas, sound=sound, batched=batched, signed_pairs=True)
  return split_rows(low, tuple(node.shape))


@functools.partial(jax.jit, static_argnames=("shape",))
def split_rows(low, shape):
  """Lower bounds of the rows ``+e_i, -e_i`` (last axis) as ``(lower, upper)`` of the node."""
  n = low.shape[-1] // 2
  lead = low.shape[:-1]
  return low[..., :n].reshape((*lead, *shape)), -low[..., n:].reshape((*lead, *shape))


def relu_inputs(graph: G.Graph) -> list[int]:
  """Indices of the nodes whose bounds an activation's relaxation needs, in topological order
  (both factors of a product)."""
  needed = {node.inputs[0] for node in graph.nodes if node.kind in ACTIVATIONS}
  factors = {i for node in graph.nodes if node.kind in G.NONLINEAR for i in node.inputs}
  # A product's factor is often a routing map (attention's q, k, v reshaped, transposed and
  # broadcast to the product's shape) of an affine layer. Routing maps move their input's bounds
  # exactly, so the backward pass belongs to the layer before them: without one there, the
  # projection's interval is |W| times its input's width (9x wider than sampled in the ViT at
  # radius 0.005, against 2x after this).
  for i in list(factors):
    while _routing_only(graph.nodes[i]) and i != 0:
      i = graph.nodes[i].inputs[0]
    factors.add(i)
  return sorted((needed | factors) - {0})


def _routing_only(node: G.Node) -> bool:
  """A map that only moves entries: its interval bounds are exact given its input's, so a backward
  pass of its own would find nothing better."""
  return node.kind == G.AFFINE and node.bias is None and (node.op is None or node.op.name in ROUTING_ONLY)


@functools.partial(jax.jit, static_argnames=("sound",))
def intersect(a, b, sound: bool = True):
  """The intersection of two ``(lower, upper)`` bounds.

  ``sound=False``: bounds computed without rounding margins can miss the truth by rounding (or by
  a whole step of a rounding node near its cut), so two of them may not overlap; their ends are
  then put back in order (see :func:`qbound.bounds.fp.unsound_order`) instead of leaving an empty
  interval.
  """
  out = jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])
  return out if sound else fp.unsound_order(out)


def crown_bounds(graph: G.Graph, box: Box, alphas: Optional[Mapping] = None, sound: bool = True,
                 row_chunk: Optional[int] = None, *, batched: bool = False, check: bool = True) -> list:
  """Bounds of every node: interval bounds, tightened by CROWN on every ReLU input and the output.

  ``row_chunk``: backward rows per block (None: all at once); see :mod:`qbound.memory`. With
  ``batched``, ``box`` holds many boxes along a leading axis and so does every bound. ``check``:
  raise if any node's interval is empty or NaN (:mod:`qbound.bounds.guards`).
  """
  targets = relu_inputs(graph) + [graph.output]
  if nonlinear.first_nonlinear(graph) is not None:
    # Products and curves: one forward sweep, every node's interval from its inputs' tightened
    # bounds (softmax's and layer norm's statistics feed several nonlinear nodes; 1/x and rsqrt
    # need their inputs' CROWN bounds to stay away from 0), and routing maps (broadcasts of a
    # statistic) take their input's bound instead of a backward pass of their own.
    bounds = [(box.lower, box.upper)]
    # Means of squares (layer and RMS norms' variances): a lower bound by Cauchy-Schwarz, one
    # backward row each, that keeps rsqrt(var + eps) finite where the entries' intervals are wide.
    variances = variance.find(graph)
    for idx in range(1, len(graph.nodes)):
      node = graph.nodes[idx]
      bounds.append(_node_interval(local(node), tuple(bounds[i] for i in node.inputs), sound=sound,
                                   batched=batched))
      if idx in targets and not (_routing_only(node) and idx != graph.output):
        bounds[idx] = intersect(bounds[idx], bound_node(graph, idx, bounds, box, alphas=alphas, sound=sound,
                                                        row_chunk=row_chunk, batched=batched), sound=sound)
      if idx in variances:
        low = variance.lower_bound(graph, idx, variances[idx], bounds, box, backward_lower, sound=sound,
                                   batched=batched)
        bounds[idx] = intersect(bounds[idx], (low, jnp.full_like(low, jnp.inf)), sound=sound)
    if check:
      check_bounds([("CROWN bounds", graph, bounds)], sound=sound)
    return bounds
  bounds = list(interval_bounds(graph, box, sound, batched=batched, check=False))
  for idx in targets:
    if idx == 0:
      continue
    bounds[idx] = intersect(bounds[idx], bound_node(graph, idx, bounds, box, alphas=alphas, sound=sound,
                                                    row_chunk=row_chunk, batched=batched), sound=sound)
  if check:
    check_bounds([("CROWN bounds", graph, bounds)], sound=sound)
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
  lower, upper = crown_bounds(graph, box, None, sound)[graph.output]
  spot_check(graph, box, lower, upper, sound=sound, what="CROWN bounds")
  return Box(lower, upper)
