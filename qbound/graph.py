"""The layer graph: what a traced network looks like to qbound's bound propagation.

A :class:`Graph` is a tuple of :class:`Node` s in topological order. Node 0 is the input. Every node
holds one value (an array of ``node.shape``) computed from the values of ``node.inputs``. The kinds:

=============  ==============================================================================
kind           value
=============  ==============================================================================
``input``      the network's input x
``affine``     ``op(x) + bias``: ``op`` a linear map (dot_general, conv, reshape, ...) whose
               constant operands are ``weights``; ``bias`` may be None
``add``        ``sum_i signs[i] * x_i`` over several nodes (residual additions, f - f_q)
``concat``     concatenation of several nodes along ``attrs[0]``
``relu``       ``max(x, 0)``
``clip``       ``min(max(x, lo), hi)`` with ``weights = (lo, hi)`` (may be -inf / +inf)
``round``      rounding to an integer, ``attrs[0]`` in ``nearest``, ``floor``, ``ceil`` (or
               ``none``: the identity standing beside a rounding in the other network)
               (fake quantization: ``clip(round(x / s)) * s`` is affine, round, clip, affine),
               or ``dynamic``: ``s(x) * clip(round(x / s(x)))`` with ``s(x) = max|x| / Q``, a
               fake quantization whose scale is computed from its input (``attrs[1]``, see
               :mod:`qbound.dynamic_rounding`)
``tanh``       ``tanh(x)``
``sigmoid``    the logistic function ``1 / (1 + exp(-x))``
``mul``        the product ``x * y`` of two nodes of the node's shape (attention, gating)
``square``     ``x * x``
``exp``        ``exp(x)``
``reciprocal`` ``1 / x`` (its input's bounds must not contain 0: division ``x / y = x * (1 / y)``)
``rsqrt``      ``1 / sqrt(x)`` on ``x > 0`` (layer and RMS norm)
``sqrt``       ``sqrt(x)`` on ``x >= 0``
``erfc``       the complementary error function (exact GELU is ``x / 2 * erfc(-x / sqrt 2)``)
``silu``       ``x * sigmoid(x)`` (``jax.nn.silu``)
``gelu``       ``x / 2 * (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` (``jax.nn.gelu``'s default
               tanh form, one curve rather than a cube, a tanh and a product)
=============  ==============================================================================

The last nine are bounded by :mod:`qbound.bounds.nonlinear` (interval and CROWN) and
:mod:`qbound.bounds.nonlinear_diff` (differential bounds); the other methods name them in an
:class:`~qbound.errors.UnsupportedLayerError`. Softmax, layer norm and
RMS norm are written with them when traced.

Other piecewise-linear operations are written exactly with these kinds when traced (leaky ReLU
and ``jnp.where`` as ReLUs, max pooling as a tree of ``max(a, b) = a + relu(b - a)``, average
pooling and inference batch norm as affine nodes); see :mod:`qbound.trace`.

The arrays (``weights``, ``bias``) are pytree leaves and the structure is static, so a graph is a
pytree: bound propagation jit-compiles once per structure and takes the weights as arguments.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qbound import dynamic_rounding

INPUT, AFFINE, ADD, CONCAT, RELU, CLIP, ROUND = "input", "affine", "add", "concat", "relu", "clip", "round"
TANH, SIGMOID = "tanh", "sigmoid"
# Rounding modes of ``round`` nodes: ``nearest`` rounds halves to even (jnp.round), ``away`` rounds
# them away from zero (jax.lax.round's default).
ROUNDING = {"nearest": jnp.round, "away": lambda x: jax.lax.round(x, jax.lax.RoundingMethod.AWAY_FROM_ZERO),
            "floor": jnp.floor, "ceil": jnp.ceil, "none": lambda x: x}
# S-shaped activations (increasing, convex below 0 and concave above): their functions.
SMOOTH = {TANH: jnp.tanh, SIGMOID: jax.nn.sigmoid}
MUL, SQUARE, EXP, RECIPROCAL, RSQRT, SQRT, ERFC, SILU, GELU = (
    "mul", "square", "exp", "reciprocal", "rsqrt", "sqrt", "erfc", "silu", "gelu")
# Smooth functions of one input bounded by qbound.bounds.nonlinear: their functions.
CURVES = {SQUARE: jnp.square, EXP: jnp.exp, RECIPROCAL: lambda x: 1 / x, RSQRT: jax.lax.rsqrt, SQRT: jnp.sqrt,
          ERFC: jax.lax.erfc, SILU: lambda x: x * jax.nn.sigmoid(x),
          GELU: lambda x: jax.nn.gelu(x, approximate=True)}
# The kinds only interval bounds, CROWN and differential bounds support (products of two values, and CURVES).
NONLINEAR = (MUL, *CURVES)


class SourceNote(str):
  """A source location kept for messages: every note compares equal, so two graphs traced from
  different lines share one jit compilation (pytree structures compare their static fields)."""

  def __eq__(self, other):
    return isinstance(other, str)

  def __ne__(self, other):
    return not self.__eq__(other)

  def __hash__(self):
    return 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Node:
  """One value of the network. See the module docstring for the kinds.

  Attributes:
    kind: one of ``input``, ``affine``, ``add``, ``concat``, ``relu``, ``clip``, ``round``,
      ``tanh``, ``sigmoid``, or one of :data:`NONLINEAR` (``mul``, ``exp``, ...).
    inputs: indices of the nodes this one reads.
    shape: shape of this node's value.
    op: for ``affine``, the linear map (a hashable object with ``apply``, ``apply_abs`` and
      ``in_shape``; see :mod:`qbound.trace`); None means the identity.
    weights: the linear map's constant operands (pytree leaves).
    bias: constant added after ``op`` (same shape as the node) or None.
    attrs: small static data (``add``: signs; ``concat``: axis).
    where: the source location it was traced from, for error messages.
  """

  kind: str = dataclasses.field(metadata=dict(static=True))
  inputs: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  op: Any = dataclasses.field(default=None, metadata=dict(static=True))
  weights: tuple[Any, ...] = ()
  bias: Any = None
  attrs: tuple = dataclasses.field(default=(), metadata=dict(static=True))
  where: str = dataclasses.field(default=SourceNote(""), metadata=dict(static=True), compare=False)

  def __post_init__(self):
    if not isinstance(self.where, SourceNote):
      object.__setattr__(self, "where", SourceNote(self.where))

  @property
  def size(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64))

  def linear(self, x):
    """The node's linear part applied to ``x`` (``affine`` only)."""
    return x if self.op is None else self.op.apply(self.weights, x)

  def linear_abs(self, x):
    """The linear part with every coefficient replaced by its absolute value."""
    return x if self.op is None else self.op.apply_abs(self.weights, x)

  def linear_transpose(self, y):
    """The transpose of the linear part applied to ``y`` (one cotangent of the node's shape)."""
    if self.op is None:
      return y
    return self.op.transpose(self.weights, y)

  def linear_abs_transpose(self, y):
    if self.op is None:
      return y
    return self.op.transpose_abs(self.weights, y)

  def apply_clip(self, x):
    """``clip(x, lo, hi)`` for a ``clip`` node."""
    return jnp.minimum(jnp.maximum(x, self.weights[0]), self.weights[1])

  @property
  def terms(self) -> int:
    """The largest number of products summed into one output of the linear part (for rounding)."""
    return 1 if self.op is None else self.op.terms


def is_dynamic_rounding(node: Node) -> bool:
  """Whether ``node`` rounds with scales computed from its own input (:mod:`qbound.dynamic_rounding`)."""
  return node.kind == ROUND and node.attrs[0] == dynamic_rounding.DYNAMIC


def _apply_node(node: Node, args):
  if node.kind == AFFINE:
    y = node.linear(args[0])
    return y if node.bias is None else y + node.bias
  if node.kind == ADD:
    total = None
    for sign, a in zip(node.attrs, args):
      term = a if sign > 0 else -a
      total = term if total is None else total + term
    return total
  if node.kind == CONCAT:
    return jnp.concatenate(args, axis=node.attrs[0])
  if node.kind == RELU:
    return jnp.maximum(args[0], 0)
  if node.kind == CLIP:
    return node.apply_clip(args[0])
  if node.kind == ROUND:
    if is_dynamic_rounding(node):  # attrs[1]: its DynamicScale
      return dynamic_rounding.quantize(node.attrs[1], args[0])
    return ROUNDING[node.attrs[0]](args[0])
  if node.kind in SMOOTH:
    return SMOOTH[node.kind](args[0])
  if node.kind == MUL:
    return args[0] * args[1]
  if node.kind in CURVES:
    return CURVES[node.kind](args[0])
  raise ValueError(f"unknown node kind {node.kind!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Graph:
  """A network as a tuple of nodes; callable on ONE unbatched input.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> g = qb.trace(lambda x: jax.nn.relu(x @ jnp.ones((2, 3))), jnp.zeros(2))
    >>> [n.kind for n in g.nodes], g.output_shape
    (['input', 'affine', 'relu'], (3,))
  """

  nodes: tuple[Node, ...]
  output: int = dataclasses.field(metadata=dict(static=True))

  @property
  def input_shape(self) -> tuple[int, ...]:
    return self.nodes[0].shape

  @property
  def output_shape(self) -> tuple[int, ...]:
    return self.nodes[self.output].shape

  def __call__(self, x):
    return self.values(x)[self.output]

  def values(self, x) -> list:
    """Every node's value on input ``x``."""
    vals = [x]
    for node in self.nodes[1:]:
      vals.append(_apply_node(node, [vals[i] for i in node.inputs]))
    return vals

  def consumers(self) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in self.nodes]
    for idx, node in enumerate(self.nodes):
      for i in node.inputs:
        out[i].append(idx)
    return out

  def summary(self) -> str:
    """A table of the nodes: index, kind, inputs, shape, parameters, source."""
    rows = []
    for idx, node in enumerate(self.nodes):
      nparams = sum(int(np.size(w)) for w in node.weights) + (0 if node.bias is None else int(np.size(node.bias)))
      opname = "" if node.op is None else node.op.name
      rows.append(f"{idx:>4} {node.kind:<7} {opname:<22} in={list(node.inputs)!s:<12} "
                  f"shape={node.shape!s:<16} params={nparams:<8} {node.where}")
    return "\n".join(rows)

  def __repr__(self) -> str:
    return f"Graph({len(self.nodes)} nodes, {self.input_shape} -> {self.output_shape})"


def astype(graph: Graph, dtype) -> Graph:
  """The graph with every float constant cast to ``dtype`` (float64 needs ``jax.enable_x64``)."""
  def cast(a):
    return a if a is None or not jnp.issubdtype(jnp.result_type(a), jnp.floating) else jnp.asarray(a, dtype)

  def convert(_, node: Node) -> Node:
    op = None if node.op is None else node.op.with_dtype(dtype)
    return dataclasses.replace(node, op=op, weights=tuple(cast(w) for w in node.weights), bias=cast(node.bias))

  return map_nodes(graph, convert)


# The float64 copy of each live graph (float64_copy), dropped with the graph: a certify call
# evaluates its witnesses 5-10 times, and each copy cost ~13 ms on ACAS Xu (about a tenth of a warm
# proof's fixed cost). KEEP_FLOAT64_COPIES = False: a new copy every time (benchmarks compare the two).
KEEP_FLOAT64_COPIES = True
_float64_copies: dict = {}  # id(graph) -> its float64 copy, while the graph lives


def float64_copy(graph: Graph) -> Graph:
  """The graph's weights copied to the host and cast to float64 (use it under ``jax.enable_x64``).

  Cast by NumPy: a cast by JAX compiles one small program per weight shape, a noticeable part of
  a first call's time. The copy is kept while the graph lives (graphs are frozen; a finalizer drops
  it with the graph, before its id can be reused), so the witness checks, the exact cell bounds
  and the grid share one copy.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> W = jnp.array([[1.0, -2.0], [0.5, 1.5]])
    >>> graph = qb.merge(lambda x: x @ W, lambda x: x @ jnp.round(W), qb.Box(-jnp.ones(2), jnp.ones(2))).graph
    >>> with jax.enable_x64(True):
    ...   copy = float64_copy(graph)
    ...   print(copy is float64_copy(graph), {w.dtype.name for n in copy.nodes for w in n.weights})
    True {'float64'}
  """
  key = id(graph)
  copy = _float64_copies.get(key) if KEEP_FLOAT64_COPIES else None
  if copy is not None:
    return copy

  def to64(a):
    a = np.asarray(a)
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a

  copy = astype(jax.tree_util.tree_map(to64, graph), jnp.float64)
  if KEEP_FLOAT64_COPIES and key not in _float64_copies:
    _float64_copies[key] = copy
    weakref.finalize(graph, _float64_copies.pop, key, None)
  return copy


def check_finite(graph: Graph, *, label: str = "network") -> None:
  """Raises ``ValueError`` naming the first node whose weights or bias hold NaN or inf."""
  for idx, node in enumerate(graph.nodes):
    for part, arr in [("weights", w) for w in node.weights] + [("bias", node.bias)]:
      if arr is None:
        continue
      arr = np.asarray(arr)
      if node.kind == CLIP:  # clipping at +-inf is fine; NaN is not
        arr = np.where(np.isinf(arr), 0, arr)
      if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        kind = "NaN" if np.any(np.isnan(arr)) else "inf"
        raise ValueError(f"{label}: the {part} of node {idx} ({node.kind} {node.where}) contain {kind}; "
                         "qbound cannot bound a network with non-finite parameters. Check the params "
                         "pytree (e.g. jax.tree_util.tree_map(jnp.isfinite, params)).")


def map_nodes(graph: Graph, fn: Callable[[int, Node], Node]) -> Graph:
  """A graph with every node replaced by ``fn(index, node)``."""
  return Graph(nodes=tuple(fn(i, n) for i, n in enumerate(graph.nodes)), output=graph.output)
