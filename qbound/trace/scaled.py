"""Output scales kept beside the product they rescale: ``(x @ W) * s`` as one affine node.

Quantization libraries that compute in integers rescale after the product: AQT's weight-only int8
layer is ``(x @ W_int) * s_w + b`` and qwix's static-range layer ``(q(x / s_a) @ W_int) * s_a *
s_w + b``. Traced as written, that is a product node and a scaling node where the float model has
one product node, so the two networks' layers do not line up and the differential bounds (which
need pairs) cannot run. Folding the scale into the weights, ``x @ (W_int * s)``, would pair them,
but ``W_int * s`` rounded to float32 is another network than the one the library runs (qbound's
guarantee is for the real-arithmetic function of the given float constants, see
:mod:`qbound.bounds.fp`).

:class:`ScaledOp` folds without rounding anything: one linear map that applies the product, then
multiplies (or divides) by the constant factors, each in its own float operation, exactly the
operations the library performs. The real-arithmetic map equals the two nodes it replaces, so no
bound changes meaning, and its rounding count (``terms``) adds one rounding per factor, which keeps
sound mode's margins proven. :func:`fuse_scales` rewrites a traced graph so; the float model's
products become the same kind of op with factors of 1 (:func:`qbound.merge.align`), and the pairs
line up.

Example:
  >>> import jax.numpy as jnp, qbound as qb
  >>> from qbound.trace.scaled import fuse_scales
  >>> w, s = jnp.array([[2.0, -1.0], [1.0, 3.0]]), jnp.array([0.5, 0.25])
  >>> g = fuse_scales(qb.trace(lambda x: (x @ w) * s + 1.0, jnp.zeros(2)))
  >>> [n.kind for n in g.nodes], g.nodes[1].op.name, g(jnp.ones(2)).tolist()
  (['input', 'affine'], 'dot_general*scale', [2.5, 1.5])
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound.trace.linear import LinearOp

# The products whose output scales are kept beside them.
SCALABLE = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True, eq=False)
class ScaledOp:
  """``base(x)`` followed by elementwise constant factors: ``base(x) * c_1 / c_2 ...``.

  Weights are the base op's weights followed by one array per factor (of the output's shape);
  ``factors`` says for each whether it multiplies (``"mul"``) or divides (``"div"``). The same
  interface as :class:`~qbound.trace.linear.LinearOp`.
  """

  base: LinearOp
  factors: tuple[str, ...]
  # Whether every factor is constant along the output axes that come from the input (a scale per
  # output channel), checked on the values when fused: then the factors fold into the weight's
  # output channels (:meth:`folded_weight`), which the differential bounds use for ``|A - A_q|``.
  per_channel: bool = False

  @property
  def name(self) -> str:
    return self.base.name + "*scale"

  @property
  def in_shape(self):
    return self.base.in_shape

  @property
  def out_shape(self):
    return self.base.out_shape

  @property
  def dtype(self):
    return self.base.dtype

  coefficients = True

  @property
  def terms(self) -> int:  # one more rounding per factor, after the product's own
    return self.base.terms + len(self.factors)

  @property
  def terms_transpose(self) -> int:
    return self.base.terms_transpose + len(self.factors)

  def _key(self):
    return (self.base, self.factors, self.per_channel)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, ScaledOp) and self._key() == other._key()

  def with_dtype(self, dtype) -> "ScaledOp":
    return dataclasses.replace(self, base=self.base.with_dtype(dtype))

  def _split(self, weights):
    k = len(weights) - len(self.factors)
    return tuple(weights[:k]), tuple(weights[k:])

  @staticmethod
  def _scale(kind, y, c):
    return y * c if kind == "mul" else y / c

  def apply(self, weights, x):
    base, scales = self._split(weights)
    y = self.base.apply(base, x)
    for kind, c in zip(self.factors, scales):
      y = self._scale(kind, y, c)
    return y

  def apply_abs(self, weights, x):
    return self.apply(tuple(jnp.abs(w) for w in weights), x)

  def transpose(self, weights, y):
    base, scales = self._split(weights)
    for kind, c in zip(self.factors[::-1], scales[::-1]):
      y = self._scale(kind, y, c)
    return self.base.transpose(base, y)

  def transpose_abs(self, weights, y):
    return self.transpose(tuple(jnp.abs(w) for w in weights), y)

  def folded_weight(self, weights):
    """The base weight with the factors applied to its output channels, computed in float (each
    factor one rounding); None unless ``per_channel`` and the base is a product of one weight."""
    base, scales = self._split(weights)
    layout = _channel_layout(self.base) if self.per_channel and len(base) == 1 else None
    if layout is None:
      return None
    w = base[0]
    for kind, c in zip(self.factors, scales):
      w = self._scale(kind, w, _per_weight(layout, c, jnp.ndim(w)))
    return w


def _channel_layout(op: LinearOp):
  """``(output axes that come from the weight, the weight's axes they are)`` for a product of the
  input (operand 0) with one weight, or None for other shapes of product."""
  params = dict(op.params)
  if op.var_pos != 0:
    return None
  if op.name == "dot_general":
    (contract_x, contract_w), (batch_x, batch_w) = params["dimension_numbers"]
    if batch_x or batch_w:
      return None
    n_free_x = len(op.in_shape) - len(contract_x)
    n_out = len(op.out_shape)
    w_free = tuple(d for d in range(n_out - n_free_x + len(contract_w)) if d not in contract_w)
    return tuple(range(n_free_x, n_out)), w_free
  if op.name == "conv_general_dilated":
    numbers = params["dimension_numbers"]
    return (numbers.out_spec[1],), (numbers.rhs_spec[0],)
  return None


def _per_weight(layout, factor, w_ndim: int):
  """An output-shaped factor, constant along the input's axes, as an array broadcasting against
  the weight: its values along the weight's output channels."""
  out_axes, w_axes = layout
  index = tuple(slice(None) if a in out_axes else 0 for a in range(jnp.ndim(factor)))
  values = factor[index]  # along the output's weight axes, which dot_general and conv keep in the weight's order
  shape = [1] * w_ndim
  for a, n in zip(w_axes, jnp.shape(values)):
    shape[a] = n
  return jnp.reshape(values, shape)


def _is_per_channel(op: LinearOp, factors) -> bool:
  """Whether every factor (output-shaped) is constant along the output axes that come from the input."""
  layout = _channel_layout(op)
  if layout is None:
    return False
  out_axes = layout[0]
  for f in factors:
    f = np.asarray(f)
    index = tuple(slice(None) if a in out_axes else slice(0, 1) for a in range(f.ndim))
    if not np.array_equal(f, np.broadcast_to(f[index], f.shape)):
      return False
  return True


def elementwise_factor(node: G.Node) -> str | None:
  """``"mul"`` or ``"div"`` for an affine node multiplying (dividing) its input by a constant of
  its own shape, else None."""
  op = node.op
  if node.kind != G.AFFINE or not isinstance(op, LinearOp) or op.name not in ("mul", "div"):
    return None
  if op.var_pos != 0 and op.name == "div":
    return None
  shape = tuple(node.shape)
  if tuple(op.in_shape) != shape or len(node.weights) != 1 or np.shape(node.weights[0]) != shape:
    return None
  return op.name


def _scalable(node: G.Node) -> bool:
  op = node.op
  if node.kind != G.AFFINE or node.bias is not None:
    return False
  return isinstance(op, ScaledOp) or (isinstance(op, LinearOp) and op.name in SCALABLE)


def fuse_scales(graph: G.Graph) -> G.Graph:
  """``graph`` with every product followed by constant elementwise factors written as one
  :class:`ScaledOp` node (the factors' node's bias kept as its bias). The same real-arithmetic
  function, computed by the same float operations; returns ``graph`` itself if nothing fuses."""
  nodes = list(graph.nodes)
  consumers = graph.consumers()
  alias = list(range(len(nodes)))
  fused = False
  for idx, node in enumerate(nodes):
    if idx == 0:
      continue
    node = dataclasses.replace(node, inputs=tuple(alias[i] for i in node.inputs))
    nodes[idx] = node
    kind = elementwise_factor(node)
    if kind is None:
      continue
    read = graph.nodes[idx].inputs[0]  # the node as traced: nothing else may read it
    src = node.inputs[0]
    if read == graph.output or len(consumers[read]) != 1 or not _scalable(nodes[src]):
      continue
    prev = nodes[src]
    base, factors = (prev.op.base, prev.op.factors) if isinstance(prev.op, ScaledOp) else (prev.op, ())
    weights = prev.weights + node.weights
    scales = weights[len(weights) - len(factors) - 1:]
    op = ScaledOp(base, factors + (kind,), per_channel=_is_per_channel(base, scales))
    nodes[src] = dataclasses.replace(prev, op=op, weights=weights, bias=node.bias, shape=node.shape)
    alias[idx] = src
    fused = True
  if not fused:
    return graph
  kept = [i for i in range(len(nodes)) if alias[i] == i]
  remap = {old: new for new, old in enumerate(kept)}
  result = [dataclasses.replace(nodes[i], inputs=tuple(remap[j] for j in nodes[i].inputs)) for i in kept]
  return G.Graph(nodes=tuple(result), output=remap[alias[graph.output]])


def scaled_like(node: G.Node, like: ScaledOp, factor_values) -> G.Node:
  """``node`` (a plain product) as ``like``'s kind of :class:`ScaledOp` with the given factors
  (exact: the float model's products get factors that multiply back to 1 in real arithmetic)."""
  weights = node.weights + tuple(jnp.asarray(np.broadcast_to(np.asarray(v, node.op.dtype), node.shape))
                                 for v in factor_values)
  return dataclasses.replace(node, op=like, weights=weights)
