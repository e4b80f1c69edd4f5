"""Per-primitive rules: how each known JAX primitive on input-dependent values becomes graph nodes.

A rule is ``rule(builder, eqn, ins, where, shape) -> value``; :data:`_RULES` maps primitive names
to rules (rules are data, as in jax_verify). Linear primitives have no entry here: the builder
turns them into affine nodes itself (:meth:`qbound.trace.builder._Builder.linear`). Every rewrite
is exact in real arithmetic: ``max(a, b) = a + relu(b - a)``, ``|x| = -x + relu(2x)``, max pooling
as a tree of those over strided slices, ``jnp.where`` between continuous pieces as ReLUs and clips
(:mod:`qbound.piecewise`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qbound import graph as G
from qbound import piecewise as PW
from qbound.trace.linear import host_array
from qbound.trace.primitives import UnsupportedPrimitiveError, _IDENTITY_PRIMS

if TYPE_CHECKING:
  from qbound.trace.builder import _Builder


def _both_nodes(ins):
  return ins[0][0] == "node" and ins[1][0] == "node"


def _rule_add(b: _Builder, eqn, ins, where, shape):
  if _both_nodes(ins):
    return b.add(b.broadcast(ins[0], shape, where), b.broadcast(ins[1], shape, where), (1, 1), where, shape)
  var, const = (ins[0], ins[1]) if ins[0][0] == "node" else (ins[1], ins[0])
  return b.shift(var, const[1], where, shape)


def _rule_sub(b: _Builder, eqn, ins, where, shape):
  if _both_nodes(ins):
    return b.add(b.broadcast(ins[0], shape, where), b.broadcast(ins[1], shape, where), (1, -1), where, shape)
  if ins[0][0] == "node":
    return b.shift(ins[0], -np.asarray(ins[1][1]), where, shape)
  neg = b.scale(ins[1], -1.0, where, shape)
  return b.shift(neg, ins[0][1], where, shape)


def _rule_neg(b: _Builder, eqn, ins, where, shape):
  return b.scale(ins[0], -1.0, where, shape)


def _rule_identity(b: _Builder, eqn, ins, where, shape):
  return ins[0]


def _integer_valued(b: _Builder, value) -> bool:
  """Whether a node's values are integers: a rounding, possibly clipped at integers since."""
  node = b.nodes[value[1]]
  while node.kind == G.CLIP and all(np.all(np.asarray(w) == np.round(np.asarray(w))) for w in node.weights):
    node = b.nodes[node.inputs[0]]
  return node.kind == G.ROUND and node.attrs[0] != "none"


def _rule_convert(b: _Builder, eqn, ins, where, shape):
  """Conversions that keep every value: int -> float, float -> wider float, int -> wider int
  (qbound's nodes hold every value in their float dtype), and float -> int of values already rounded,
  which XLA saturates at the integer type's range (qwix's ``astype(int8)`` after ``jnp.round``):
  a clip. Other float -> int conversions truncate, a rounding qbound does not bound."""
  new = np.dtype(eqn.params["new_dtype"])
  old = np.dtype(eqn.invars[0].aval.dtype)
  if new == old:
    return ins[0]
  if new == np.bool_ or old == np.bool_:
    b.unsupported(eqn, f"converting {old} to {new} is a step")
  int_new, int_old = jnp.issubdtype(new, jnp.integer), jnp.issubdtype(old, jnp.integer)
  if not int_new:
    if int_old or (jnp.finfo(new).nmant >= jnp.finfo(old).nmant and jnp.finfo(new).maxexp >= jnp.finfo(old).maxexp):
      return ins[0]  # integers (exact below 2**24 in float32) and wider floats keep the value
    b.unsupported(eqn, f"converting {old} to {new} rounds values; quantize activations with "
                  "qbound.quantize instead")
  if int_old:
    if jnp.iinfo(new).min <= jnp.iinfo(old).min and jnp.iinfo(new).max >= jnp.iinfo(old).max:
      return ins[0]
    b.unsupported(eqn, f"converting {old} to the narrower {new} wraps around")
  if jnp.issubdtype(old, jnp.floating) and _integer_valued(b, ins[0]):
    info = jnp.iinfo(new)
    return b.clip(ins[0], host_array(int(info.min), b.dtype, shape), host_array(int(info.max), b.dtype, shape),
                  where, shape)
  b.unsupported(eqn, f"converting {old} to {new} rounds values; quantize activations with "
                "qbound.quantize instead")


def _max_pair(b: _Builder, x, y, where, shape):
  """max(x, y) exactly: relu for max(x, 0), a clip node against other constants, else x + relu(y - x)."""
  if x[0] == "const":
    x, y = y, x
  if y[0] == "const":
    c = host_array(y[1], b.dtype, shape)
    if not np.any(np.asarray(c)):
      out = b.relu(x, where, shape)
    else:
      out = b.clip(x, c, host_array(np.inf, b.dtype, shape), where, shape)
    if np.all(np.isfinite(np.asarray(c))):
      b.piecewise_of[out[1]] = (x[1], PW.Piecewise.ramp(np.asarray(c), shape, rising=True, x=x, constant=("const", c)))
    return out
  diff = b.add(y, x, (1, -1), where, shape)
  return b.add(x, b.relu(diff, where, shape), (1, 1), where, shape)


def _min_pair(b: _Builder, x, y, where, shape):
  """min(x, y) exactly: a clip node against a constant, else x - relu(x - y)."""
  if x[0] == "const":
    x, y = y, x
  if y[0] == "const":
    c = host_array(y[1], b.dtype, shape)
    out = b.clip(x, host_array(-np.inf, b.dtype, shape), c, where, shape)
    if np.all(np.isfinite(np.asarray(c))):
      b.piecewise_of[out[1]] = (x[1], PW.Piecewise.ramp(np.asarray(c), shape, rising=False, x=x, constant=("const", c)))
    return out
  diff = b.add(x, y, (1, -1), where, shape)
  return b.add(x, b.relu(diff, where, shape), (1, -1), where, shape)


def _broadcast_value(b: _Builder, v, shape, where):
  if v[0] == "node" and b.shape_of(v) != tuple(shape):
    raise UnsupportedPrimitiveError(f"max/min of shapes {b.shape_of(v)} and {shape} at {where}")
  return v


def _rule_max(b: _Builder, eqn, ins, where, shape):
  return _max_pair(b, _broadcast_value(b, ins[0], shape, where), _broadcast_value(b, ins[1], shape, where),
                   where, shape)


def _rule_min(b: _Builder, eqn, ins, where, shape):
  return _min_pair(b, _broadcast_value(b, ins[0], shape, where), _broadcast_value(b, ins[1], shape, where),
                   where, shape)


def _rule_clamp(b: _Builder, eqn, ins, where, shape):
  lo, x, hi = ins
  return _min_pair(b, _max_pair(b, x, lo, where, shape), hi, where, shape)


def _rule_round(b: _Builder, eqn, ins, where, shape):
  mode = {"round": "nearest", "floor": "floor", "ceil": "ceil"}[eqn.primitive.name]
  if mode == "nearest" and eqn.params.get("rounding_method") != jax.lax.RoundingMethod.TO_NEAREST_EVEN:
    mode = "away"  # jax.lax.round's default: halves away from zero
  return b.emit(G.Node(kind=G.ROUND, inputs=(ins[0][1],), shape=shape, attrs=(mode,), where=where))


def _rule_smooth(b: _Builder, eqn, ins, where, shape):
  kind = {"tanh": G.TANH, "logistic": G.SIGMOID}[eqn.primitive.name]
  return b.emit(G.Node(kind=kind, inputs=(ins[0][1],), shape=shape, where=where))


# --- products and smooth curves (transformer layers; bounded by qbound.bounds.nonlinear) ---------


def _curve(b: _Builder, kind: str, x, where, shape):
  return b.emit(G.Node(kind=kind, inputs=(x[1],), shape=tuple(shape), where=where))


def _product(b: _Builder, x, y, where, shape):
  """``x * y`` of two input-dependent values (broadcast to ``shape``): ``square`` when they are the
  same value, else a ``mul`` node."""
  x, y = b.broadcast(x, shape, where), b.broadcast(y, shape, where)
  if b.is_same(x, y):
    return _curve(b, G.SQUARE, x, where, shape)
  return b.emit(G.Node(kind=G.MUL, inputs=(x[1], y[1]), shape=tuple(shape), where=where))


def _rule_mul(b: _Builder, eqn, ins, where, shape):
  if not _both_nodes(ins):
    return b.linear(eqn, ins, where, shape)
  return _product(b, ins[0], ins[1], where, shape)


def _normalised_exp(b: _Builder, num, den):
  """``(s, axis)`` when ``num / den`` is ``exp(s) / sum(exp(s), axis)`` broadcast back (a softmax),
  else None."""
  if num[0] != "node" or den[0] != "node" or b.nodes[num[1]].kind != G.EXP:
    return None
  node = b.nodes[den[1]]
  while node.kind == G.AFFINE and node.bias is None and node.op is not None and node.op.name in (
      "broadcast_in_dim", "reshape"):
    node = b.nodes[node.inputs[0]]
  if node.kind != G.AFFINE or node.op is None or node.op.name != "reduce_sum" or node.bias is not None:
    return None
  axes = dict(node.op.params).get("axes")
  if node.inputs[0] != num[1] or axes is None or len(axes) != 1:
    return None
  return ("node", b.nodes[num[1]].inputs[0]), int(axes[0])


def _softmax(b: _Builder, s, axis: int, where):
  """``softmax(s)_i = 1 / sum_j exp(s_j - s_i)`` along ``axis``: the same function as
  ``exp(s_i) / sum_j exp(s_j)``, written with the differences ``s_j - s_i``. Their bounds cancel
  what ``s_j`` and ``s_i`` share (a subtracted maximum, the input's own spread), every ``exp`` of
  them is at most 1 apart from where ``s_i`` is smallest, and the sum is at least 1 (its ``j = i``
  term is ``exp(0)``): the reciprocal stays in ``(0, 1]`` (Shi et al., ICLR 2020, bound softmax
  through the same differences)."""
  shape = b.shape_of(s)
  n = shape[axis]
  wide = tuple(shape) + (n,)
  own = b.route(s, lambda t: lax.broadcast_in_dim(t, wide, tuple(range(len(shape)))), where)
  perm = tuple(d for d in range(len(shape)) if d != axis) + (axis,)
  moved = b.route(s, lambda t: lax.transpose(t, perm), where) if perm != tuple(range(len(shape))) else s
  kept = tuple(d for d in range(len(shape)) if d != axis) + (len(shape),)
  others = b.route(moved, lambda t: lax.broadcast_in_dim(t, wide, kept), where)
  diff = b.add(others, own, (1, -1), where, wide)
  # s_i - s_i is 0, which bounds of the difference cannot see: zeroed, so the sum is at least 1 and
  # the reciprocal at most 1 under interval bounds too (without it, up to 1e11 on a 6-8-4 MLP).
  index = [1] * len(wide)
  index[axis] = n
  off_diagonal = (np.arange(n).reshape(index) != np.arange(n).reshape((1,) * len(shape) + (n,)))
  diff = b.multiply(diff, np.broadcast_to(off_diagonal, wide).astype(np.float32), where)
  total = b.route(_curve(b, G.EXP, diff, where, wide), lambda t: jnp.sum(t, axis=len(shape)), where)
  return _curve(b, G.RECIPROCAL, total, where, shape)


def _rule_div(b: _Builder, eqn, ins, where, shape):
  """``x / y = x * (1 / y)`` for an input-dependent ``y``; a softmax as :func:`_softmax`."""
  num, den = ins
  if den[0] == "const":
    return b.linear(eqn, ins, where, shape)
  softmax = _normalised_exp(b, num, den)
  if softmax is not None and b.shape_of(num) == tuple(shape):
    return _softmax(b, *softmax, where)
  inverse = _curve(b, G.RECIPROCAL, den, where, b.shape_of(den))
  if num[0] == "const":
    inverse = b.broadcast(inverse, shape, where)
    return b.multiply(inverse, host_array(num[1], b.dtype, shape), where)
  return _product(b, num, inverse, where, shape)


def _power(b: _Builder, x, n: int, where, shape):
  """``x ** n`` for ``n >= 1`` by repeated squaring."""
  if n == 1:
    return x
  half = _power(b, x, n // 2, where, shape)
  square = _curve(b, G.SQUARE, half, where, shape)
  return square if n % 2 == 0 else _product(b, square, x, where, shape)


def _rule_integer_pow(b: _Builder, eqn, ins, where, shape):
  n = int(eqn.params["y"])
  if n == 0:
    return ("const", host_array(1, b.dtype, shape))
  out = _power(b, ins[0], abs(n), where, shape)
  return out if n > 0 else _curve(b, G.RECIPROCAL, out, where, shape)


def _rule_square(b: _Builder, eqn, ins, where, shape):
  return _curve(b, G.SQUARE, ins[0], where, shape)


_CURVE_PRIMS = {"exp": G.EXP, "rsqrt": G.RSQRT, "sqrt": G.SQRT, "erfc": G.ERFC}


def _rule_curve(b: _Builder, eqn, ins, where, shape):
  return _curve(b, _CURVE_PRIMS[eqn.primitive.name], ins[0], where, shape)


def _rule_erf(b: _Builder, eqn, ins, where, shape):
  """``erf(x) = 1 - erfc(x)``."""
  return b.shift(b.scale(_curve(b, G.ERFC, ins[0], where, shape), -1.0, where, shape), 1.0, where, shape)


def _rule_dot_general(b: _Builder, eqn, ins, where, shape):
  """A contraction of two input-dependent values (attention's ``q k^T``, ``weights @ v``): both
  moved to a common shape ``(batch, free of x, free of y, contracted)``, multiplied entry by entry
  and summed over the contracted axes."""
  if not _both_nodes(ins):
    return b.linear(eqn, ins, where, shape)
  (cx, cy), (bx, by) = eqn.params["dimension_numbers"]
  x, y = ins
  if x[1] > y[1]:
    # Products commute: ``x . y`` is built with the earlier node first, then transposed to the
    # layout asked for. Two networks that write one einsum with its operands swapped (qwix swaps
    # attention's ``q k^T``) then trace to the same product, and the transpose that follows it in
    # one of them cancels against this one (:mod:`qbound.trace.simplify`), so the two pair.
    nb, nfx = len(bx), len(b.shape_of(x)) - len(bx) - len(cx)
    nfy = len(b.shape_of(y)) - len(by) - len(cy)
    swapped = _contract(b, y, x, (cy, cx), (by, bx), where)
    perm = tuple(range(nb)) + tuple(nb + nfy + i for i in range(nfx)) + tuple(nb + j for j in range(nfy))
    if perm == tuple(range(len(perm))):
      return swapped
    return b.route(swapped, lambda t: lax.transpose(t, perm), where)
  return _contract(b, x, y, (cx, cy), (bx, by), where)


def _contract(b: _Builder, x, y, contracting, batch, where):
  """``dot_general(x, y)`` of two nodes, output ``(batch, free of x, free of y)``."""
  (cx, cy), (bx, by) = contracting, batch
  sx, sy = b.shape_of(x), b.shape_of(y)
  fx = [d for d in range(len(sx)) if d not in cx and d not in bx]
  fy = [d for d in range(len(sy)) if d not in cy and d not in by]
  nb, nfx, nfy, nc = len(bx), len(fx), len(fy), len(cx)
  common = (tuple(sx[d] for d in bx) + tuple(sx[d] for d in fx) + tuple(sy[d] for d in fy)
            + tuple(sx[d] for d in cx))

  def arrange(v, order, kept):
    perm = tuple(order)
    if perm != tuple(range(len(perm))):
      v = b.route(v, lambda t, perm=perm: lax.transpose(t, perm), where)
    if b.shape_of(v) == common:  # already in place: jax emits no broadcast, there is no op to record
      return v
    return b.route(v, lambda t: lax.broadcast_in_dim(t, common, kept), where)

  rest = tuple(range(nb + nfx + nfy, nb + nfx + nfy + nc))
  xs = arrange(x, list(bx) + fx + list(cx), tuple(range(nb + nfx)) + rest)
  ys = arrange(y, list(by) + fy + list(cy), tuple(range(nb)) + tuple(range(nb + nfx, nb + nfx + nfy)) + rest)
  product = b.emit(G.Node(kind=G.MUL, inputs=(xs[1], ys[1]), shape=common, where=where))
  if nc:
    product = b.route(product, lambda t: jnp.sum(t, axis=rest), where)
  return product


_FLIPPED = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}


def _rule_compare(b: _Builder, eqn, ins, where, shape):
  """``x >= c`` and friends: a symbolic comparison, usable only by ``select_n`` (``jnp.where``)."""
  (x, c), name = ins, eqn.primitive.name
  if x[0] == "const":
    (c, x), name = (x, c), _FLIPPED[name]
  if c[0] != "const":
    b.unsupported(eqn, "it compares two input-dependent values; use jnp.maximum / jnp.minimum")
  x = b.broadcast(x, shape, where)
  cut = np.broadcast_to(np.asarray(c[1], np.dtype(b.dtype)), shape)
  return ("pred", x, name, cut)


def _rule_select_n(b: _Builder, eqn, ins, where, shape):
  """``jnp.where``: a constant mask selects elementwise; a comparison ``x >= c`` selects between two
  continuous piecewise-linear functions of ``x`` (leaky ReLU, hard tanh), written exactly with ReLUs."""
  pred, *cases = ins
  if pred[0] == "const":
    mask = np.broadcast_to(np.asarray(pred[1]), shape)
    out, bias = None, np.zeros(shape, np.dtype(b.dtype))
    for i, case in enumerate(cases):
      chosen = (mask == i) if mask.dtype != np.bool_ else (mask == bool(i))
      if case[0] == "const":
        bias = bias + np.where(chosen, np.broadcast_to(np.asarray(case[1]), shape), 0)
        continue
      if not chosen.any():
        continue
      term = b.multiply(b.broadcast(case, shape, where), chosen.astype(np.float32), where)
      out = term if out is None else b.add(out, term, (1, 1), where, shape)
    if out is None:
      return ("const", jnp.asarray(bias, b.dtype))
    return b.shift(out, bias, where, shape) if np.any(bias) else out
  if len(cases) != 2:
    b.unsupported(eqn, "it selects among more than two input-dependent cases")
  _, x, name, cut = pred
  false_pw, true_pw = (b.as_piecewise(b.broadcast(v, shape, where) if v[0] == "node" else v, x) for v in cases)
  if false_pw is None or true_pw is None:
    b.unsupported(eqn, "jnp.where chooses between values that are not piecewise-linear functions of the "
                  "compared value")
  below, above = (false_pw, true_pw) if name in ("ge", "gt") else (true_pw, false_pw)
  try:
    pw = PW.join(below, above, cut)
  except PW.NotPiecewiseLinear as err:
    b.unsupported(eqn, f"this jnp.where is not a continuous piecewise-linear function: {err}")
  return b.piecewise(x, pw, where)


def _rule_abs(b: _Builder, eqn, ins, where, shape):
  """``|x| = relu(x) + relu(-x)``: two kinks at the same point, so every bound of it is at least 0 and
  CROWN's triangle lines sum to the chord (the generic ``-x + relu(2x)`` of :meth:`piecewise` bounded
  ``|x|`` over ``[-1, 1]`` by ``[-1, 3]`` with intervals, and a reciprocal of ``1 + |x|`` failed)."""
  x = ins[0]
  if x[0] == "const":
    return ("const", np.abs(x[1]))
  negated = b.scale(x, -1.0, where, shape)
  out = b.combine(b.relu(x, where, shape), b.relu(negated, where, shape), 1, where, shape)
  zero, one = PW.exact(0, shape), PW.exact(1, shape)
  b.piecewise_of[out[1]] = (x[1], PW.Piecewise((np.zeros(shape),), (-one, one), (zero, zero), (negated, x)))
  return out


def _rule_reduce_max(b: _Builder, eqn, ins, where, shape):
  """``jnp.max`` over axes: halves compared pairwise along each axis, ``log2 n`` levels."""
  minimum = eqn.primitive.name == "reduce_min"
  x = ins[0]
  for axis in sorted(eqn.params["axes"]):
    n = b.shape_of(x)[axis]
    while n > 1:
      h = n // 2
      def part(start, stop, axis=axis):
        return b.route(x, lambda v: lax.slice_in_dim(v, start, stop, axis=axis), where)
      first, second = part(0, h), part(h, 2 * h)
      m = b.max_of([first, second], where, b.shape_of(first), minimum=minimum)
      if n % 2:
        rest = part(2 * h, n)
        m_shape = list(b.shape_of(m))
        m_shape[axis] += 1
        m = b.emit(G.Node(kind=G.CONCAT, inputs=(m[1], rest[1]), shape=tuple(m_shape), attrs=(axis,), where=where))
      x, n = m, h + n % 2
  return x if b.shape_of(x) == tuple(shape) else b.route(x, lambda v: jnp.reshape(v, shape), where)


def _rule_reduce_window_max(b: _Builder, eqn, ins, where, shape):
  """Max (min) pooling: the maximum of the window's taps, each a strided slice or a gather."""
  p = eqn.params
  if any(d != 1 for d in p["base_dilation"]):
    b.unsupported(eqn, "base dilation is not supported")
  x = ins[0]
  try:
    taps, out_shape = PW.window_taps(b.shape_of(x), p["window_dimensions"], p["window_strides"], p["padding"],
                                     p["window_dilation"])
  except PW.NotPiecewiseLinear as err:
    b.unsupported(eqn, str(err))
  if not taps:  # an empty output
    return ("const", host_array(0, b.dtype, out_shape))
  values = []
  for tap in taps:
    if tap[0] == "slice":
      _, start, limit, strides = tap
      values.append(b.route(x, lambda v: lax.slice(v, start, limit, strides), where))
    else:
      values.append(b.route(x, _gather_taps, where, jnp.asarray(tap[1])))
  return b.max_of(values, where, tuple(out_shape), minimum=eqn.primitive.name == "reduce_window_min")


def _gather_taps(v, indices):
  """``v[indices[..., 0], indices[..., 1], ...]`` as one gather primitive."""
  nd = v.ndim
  dnums = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=tuple(range(nd)),
                                     start_index_map=tuple(range(nd)))
  return lax.gather(v, indices, dnums, slice_sizes=(1,) * nd, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


_RULES: dict[str, Callable] = {
    "tanh": _rule_smooth,
    "logistic": _rule_smooth,
    **{name: _rule_compare for name in _FLIPPED},
    "select_n": _rule_select_n,
    "abs": _rule_abs,
    "reduce_max": _rule_reduce_max,
    "reduce_min": _rule_reduce_max,
    "reduce_window_max": _rule_reduce_window_max,
    "reduce_window_min": _rule_reduce_window_max,
    "round": _rule_round,
    "floor": _rule_round,
    "ceil": _rule_round,
    "add": _rule_add,
    "add_any": _rule_add,
    "sub": _rule_sub,
    "neg": _rule_neg,
    "max": _rule_max,
    "min": _rule_min,
    "clamp": _rule_clamp,
    "convert_element_type": _rule_convert,
    "stop_gradient": _rule_identity,
    "mul": _rule_mul,
    "div": _rule_div,
    "dot_general": _rule_dot_general,
    "integer_pow": _rule_integer_pow,
    "square": _rule_square,
    "erf": _rule_erf,
    **{name: _rule_curve for name in _CURVE_PRIMS},
    **{name: _rule_identity for name in _IDENTITY_PRIMS},
}

