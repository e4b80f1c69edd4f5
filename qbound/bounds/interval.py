"""Interval bound propagation (IBP).

Each node's value is enclosed in a box, pushed forward layer by layer: an affine layer maps the box
with centre ``c`` and radius ``r`` to centre ``A c + b`` and radius ``|A| r``; ReLU is monotone.
Cheap (one forward pass for the lower and upper corners) and loose on deep nets. References:
Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust
Models", 2018; Mirman, Gehr, Vechev, "Differentiable Abstract Interpretation for Provably Robust
Neural Networks", ICML 2018.
"""

from __future__ import annotations


import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp, nonlinear, relax, smooth
from qbound.bounds.common import FAST_COMPILE, as_graph, jit_step, local
from qbound.bounds.guards import check_bounds, spot_check
from qbound.box import Box, validate_box


# Linear maps that only move or copy entries (no sums, no coefficients).
ROUTING_ONLY = ("broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "slice", "rev")


def center_radius(lower, upper, sound: bool):
  """A centre and radius with ``[lower, upper]`` inside ``[c - r, c + r]`` exactly."""
  c = (lower + upper) / 2
  r = jnp.maximum(upper - c, c - lower)
  return c, (fp.round_up(r) if sound else r)


def affine_interval(node: G.Node, lower, upper, sound: bool):
  """Bounds of ``op(x) + bias`` for ``x`` in ``[lower, upper]``."""
  if node.op is None or not node.op.coefficients:
    # Moving entries around (and summing them) is monotone: the ends map to the ends, exactly for
    # pure routing, with the sums' rounding otherwise. No centre-radius rounding, which would push a
    # bound of 0 below 0 in front of a reciprocal or rsqrt (a softmax's sum of exponentials).
    lo, hi = node.linear(lower), node.linear(upper)
    sums = node.op is not None and node.op.name not in ROUTING_ONLY
    if sound and sums:
      lo = fp.round_down(lo - fp.dot_margin(node.terms + 2, node.linear(jnp.abs(lower)), lo.dtype))
      hi = fp.round_up(hi + fp.dot_margin(node.terms + 2, node.linear(jnp.abs(upper)), hi.dtype))
    if node.bias is not None:
      lo, hi = lo + node.bias, hi + node.bias
      if sound:
        lo, hi = fp.round_down(lo), fp.round_up(hi)
    return lo, hi
  if (node.op.name in ("mul", "div") and (node.op.name == "mul" or node.op.var_pos == 0) and len(node.weights) == 1
      and tuple(node.op.in_shape) == tuple(node.shape) and tuple(jnp.shape(node.weights[0])) == tuple(node.shape)):
    # Entrywise scaling maps the ends to the ends (a bound of 0 stays 0 before an rsqrt).
    a, b = node.linear(lower), node.linear(upper)
    lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
    if sound:
      lo, hi = fp.round_down(lo), fp.round_up(hi)
    if node.bias is not None:
      lo, hi = lo + node.bias, hi + node.bias
      if sound:
        lo, hi = fp.round_down(lo), fp.round_up(hi)
    return lo, hi
  c, r = center_radius(lower, upper, sound)
  yc = node.linear(c)
  if node.bias is not None:
    yc = yc + node.bias
  yr = node.linear_abs(r)
  if not sound:
    return yc - yr, yc + yr
  magnitude = node.linear_abs(jnp.abs(c) + r)
  if node.bias is not None:
    magnitude = magnitude + jnp.abs(node.bias)
  margin = fp.dot_margin(node.terms + 2, magnitude, yc.dtype)
  return fp.round_down(yc - yr - margin), fp.round_up(yc + yr + margin)


def add_interval(node: G.Node, bounds, sound: bool):
  lo = hi = None
  for sign, i in zip(node.attrs, node.inputs):
    l, u = bounds[i]
    tl, tu = (l, u) if sign > 0 else (-u, -l)
    if lo is None:
      lo, hi = tl, tu
    else:
      lo, hi = lo + tl, hi + tu
      if sound:
        lo, hi = fp.round_down(lo), fp.round_up(hi)
  return lo, hi


def node_interval(node: G.Node, bounds, sound: bool):
  """IBP for one node given its inputs' bounds."""
  if node.kind == G.AFFINE:
    return affine_interval(node, *bounds[node.inputs[0]], sound)
  if node.kind == G.ADD:
    return add_interval(node, bounds, sound)
  if node.kind == G.CONCAT:
    axis = node.attrs[0]
    return (jnp.concatenate([bounds[i][0] for i in node.inputs], axis),
            jnp.concatenate([bounds[i][1] for i in node.inputs], axis))
  if node.kind == G.RELU:
    l, u = bounds[node.inputs[0]]
    return jnp.maximum(l, 0), jnp.maximum(u, 0)
  if node.kind == G.CLIP:
    l, u = bounds[node.inputs[0]]
    return node.apply_clip(l), node.apply_clip(u)
  if node.kind == G.ROUND:  # monotone, or within its band (a dynamic fake quantization)
    l, u = relax.step_input(*bounds[node.inputs[0]], sound)
    return relax.rounding_range(node, l, u, sound=sound)
  if node.kind in G.SMOOTH:  # monotone, evaluated with a proven error bound
    return smooth.interval(node.kind, *bounds[node.inputs[0]], sound=sound)
  if node.kind in G.NONLINEAR:  # products and smooth curves
    return nonlinear.node_interval(node, bounds, sound)
  raise ValueError(f"interval bounds have no rule for node kind {node.kind!r}")


_node_interval = jit_step(node_interval, (None, 0), compiler_options=FAST_COMPILE)


def interval_bounds(graph: G.Graph, box: Box, sound: bool = True, *, batched: bool = False,
                    check: bool = True) -> list:
  """IBP bounds ``(lower, upper)`` of every node of ``graph`` over ``box``.

  One jit-compiled step per node (shared by nodes of the same kind, shapes and operation), so
  compilation grows with the number of distinct layers, not with the whole unrolled graph. With
  ``batched``, ``box`` holds many boxes along a leading axis and so does every bound. ``check``:
  raise if any node's interval is empty or NaN (:mod:`qbound.bounds.guards`).
  """
  bounds = [(box.lower, box.upper)]
  for node in graph.nodes[1:]:
    bounds.append(_node_interval(local(node), tuple(bounds[i] for i in node.inputs), sound=sound, batched=batched))
  if check:
    check_bounds([("interval bounds", graph, bounds)], sound=sound)
  return bounds


def interval(fn, box: Box, *, sound: bool = True) -> Box:
  """Proven bounds on ``fn(x)`` for every ``x`` in ``box``, by interval bound propagation.

  Args:
    fn: a pure JAX function of one input, a :class:`~qbound.graph.Graph`, or a
      :class:`~qbound.merge.MergedNetwork`.
    box: the input set.
    sound: widen by proven floating-point margins (see :mod:`qbound.bounds.fp`).

  Returns:
    A :class:`~qbound.box.Box` of the output's shape with ``lower <= fn(x) <= upper``.

  Example:
    >>> import jax.numpy as jnp, qbound as qb
    >>> out = qb.bounds.interval(lambda x: 2 * x + 1, qb.Box(-jnp.ones(2), jnp.ones(2)))
    >>> [round(float(v), 4) for v in out.upper]
    [3.0, 3.0]
  """
  box = validate_box(box)
  graph = as_graph(fn, box)
  lower, upper = interval_bounds(graph, box, sound)[graph.output]
  spot_check(graph, box, lower, upper, sound=sound, what="interval bounds")
  return Box(lower, upper)
