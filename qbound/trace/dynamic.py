"""Activation scales computed at run time (qwix, AQT), traced as one rounding node.

qwix quantizes an activation ``x`` with ``s = max|x| / 127.5``, guarded by ``where(s < g, 1, s)``,
then ``int8(round(x / s))``, an integer product and a rescale by ``s`` (see
:mod:`qbound.dynamic_rounding` for the equations and why the result is bounded). Traced one
primitive at a time, the scale is a step function of the input (the guard is a ``jnp.where``
between a value and a constant, not continuous) and ``x / s`` a product of two input-dependent
values, with no useful bound. Traced as a whole, the pattern is ``(q(x) @ W_int) * s_w``: a
dynamic rounding node ``q`` (bounded from the bounds of ``x``: ``x`` plus at most half its
largest scale over them, or, where ``x / s`` stays on one step, that step times the scale) before
the same product the float model has, so the layers pair for the differential bounds.

How: the values of the pattern are kept symbolic (``("lazy", Deferred)``, :mod:`qbound.trace.dynamic_forms`) while they are read
only by the next step of the pattern: ``|x|`` (:class:`AbsOf`), its maximum over some axes and the
constants it is divided by (:class:`Scale`), the guard's comparison (:class:`Compare`) and
``where`` (a guarded :class:`Scale`), ``x / s`` (:class:`Quotient`), its rounding and saturating
cast (:class:`Rounded`), the product of that with constant weights (:class:`Pending`, the product
still divided by ``s``), and the rescale by ``s`` that completes it. Each deferred value keeps the
equation that made it: used in any other way, it is replayed through the ordinary rules
(:func:`~qbound.trace.dynamic_forms.materialize`), so nothing changes for functions without the pattern, and one whose pattern
qbound does not know (a scale that varies along a contracted axis) fails as before, naming the
library's line.

Variants of the same node:

* a scale per group of entries (per token, per channel): the maximum over some axes. Each scale
  carries ``tags``, its entries' group numbers, moved through every broadcast, reshape and
  transpose the library applies; where it divides ``x`` and where it rescales the product they
  must be the groups of the entries they meet (:func:`group_numbers`), and the scale must be constant
  along the contracted axes (:func:`_product_groups`), or it does not factor out of the sums.
* asymmetric scales with a zero point (qwix's ``minmax``): ``min x`` and ``max x`` clipped to
  include 0 (:class:`Extreme`), ``s = c (max - min) / 255``, the zero point ``round(qmin - c min / s)``
  in an integer type (:class:`ZeroPoint`), ``x / s + z``, and qwix's product
  ``(c @ W - z @ W) * s`` (:class:`ZeroProduct`), which is ``q(x) @ W`` with ``q = s (c - z)``.
* qwix's ``rms,c``: ``x^2`` (:class:`SquareOf`), its sum over the group's axes divided by ``n``
  (:class:`SquareSum`), its square root: a :class:`Scale` of norm ``rms``, ``sqrt(sum x^2) / sqrt(n)``,
  then the same factors and guard (bounded by :mod:`qbound.rms_rounding`).
* a scale per tile of the contracted axis (qwix's ``tile_size``): ``x`` split into tiles, divided
  by each tile's scale, flattened to round and split again to rescale, then flattened before the
  product with dequantized weights. The quotient and its rounding keep their ``layout`` (which of
  ``x``'s entries each holds) through reshapes and transposes; only elementwise steps read them
  out of place, and the node is emitted on the tiled ``x`` (``qbound.merge`` gives f the same
  reshapes, proven to move every entry back).
* AQT's calibration: the guard ``where(max|x| == 0, 1, max|x|)`` before the division by 127.5,
  ``x * where(isinf(1 / s), 1, 1 / s)`` (:class:`Reciprocal`, :class:`Overflow`) and a clip to
  integer ends before the rounding (the same as after it).

How the node is bounded: :mod:`qbound.dynamic_rounding`.

Example:
  >>> import jax.numpy as jnp, qbound as qb
  >>> w = jnp.array([[1.0, -2.0], [0.5, 1.0]])
  >>> def fq(x):
  ...   s = jnp.max(jnp.abs(x)) / 127.5
  ...   s = jnp.where(s < 1e-19, 1.0, s)
  ...   return (jnp.round(x / s) @ w) * s
  >>> [(n.kind, n.attrs[:1]) for n in qb.trace(fq, jnp.zeros(2)).nodes]
  [('input', ()), ('round', ('dynamic',)), ('affine', ())]
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import dynamic_rounding as DR
from qbound import graph as G
from qbound.trace.dynamic_forms import (AbsOf, Compare, Extreme, Overflow, Pending, Quotient, Reciprocal, Rounded, Scale,
                                        SquareOf, SquareSum, ZeroPoint, ZeroProduct, deferred, form_of,
                                        group_numbers, laid_out, moved_form, same_scale, uniform_value)

if TYPE_CHECKING:
  from qbound.trace.builder import _Builder


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}


def rule(b: _Builder, eqn, ins, where: str, shape, outer_where: str):
  """The pattern's next value for ``eqn`` on (possibly) deferred inputs, or None to materialize them."""
  name = eqn.primitive.name
  forms = [form_of(v) for v in ins]

  def lazy(form):
    return deferred(form, b, eqn, ins, outer_where, shape)

  if name == "abs" and ins[0][0] == "node":
    return lazy(AbsOf(ins[0][1]))
  if isinstance(forms[0], (Quotient, Rounded)) and len(ins) == 1 and name in ("reshape", "transpose", "squeeze",
                                                                              "expand_dims"):
    return lazy(moved_form(b, forms[0], eqn))
  if ins[0][0] == "node" and (name == "square" or (name == "integer_pow" and eqn.params["y"] == 2)):
    return lazy(SquareOf(ins[0][1]))  # qwix's rms calibration: sqrt(mean(x^2))
  if name == "reduce_sum" and isinstance(forms[0], SquareOf):
    x_shape = b.shape_of(("node", forms[0].x))
    axes = tuple(sorted(set(eqn.params["axes"]) | {d for d, n in enumerate(x_shape) if n == 1}))
    return lazy(SquareSum(forms[0].x, axes, tags=np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)))
  if isinstance(forms[0], SquareSum) and len(ins) == 2 and name in ("div", "mul") and ins[1][0] == "const":
    c = uniform_value(ins[1][1])  # the mean's division by n
    if c is None or not (c > 0 and np.isfinite(c)):
      return None
    return lazy(dataclasses.replace(forms[0], count=forms[0].count * c if name == "div" else forms[0].count / c))
  if name == "sqrt" and isinstance(forms[0], SquareSum):
    ss = forms[0]  # sqrt(sum / n) = sqrt(sum) / sqrt(n)
    return lazy(Scale(ss.x, ss.axes, (("div", float(np.sqrt(ss.count))),), norm="rms", tags=ss.tags))
  if name == "reduce_max" and isinstance(forms[0], AbsOf):
    # One scale per group: per tensor, per token (a row's), per channel; the axes kept are the groups.
    x_shape = b.shape_of(("node", forms[0].x))
    axes = tuple(sorted(set(eqn.params["axes"]) | {d for d, n in enumerate(x_shape) if n == 1}))
    return lazy(Scale(forms[0].x, axes, tags=np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)))
  if name in ("reduce_min", "reduce_max") and ins[0][0] == "node":  # qwix's minmax calibration
    x_shape = b.shape_of(ins[0])
    axes = tuple(sorted(set(eqn.params["axes"]) | {d for d, n in enumerate(x_shape) if n == 1}))
    return lazy(Extreme(ins[0][1], name[len("reduce_"):], axes,
                        tags=np.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)))
  if name in ("min", "max") and len(ins) == 2:  # min(min x, 0), max(max x, 0)
    for a, c in ((0, 1), (1, 0)):
      e = forms[a]
      if (isinstance(e, Extreme) and e.kind == name and not e.with_zero and e.factor == 1.0
          and ins[c][0] == "const" and uniform_value(ins[c][1]) == 0.0):
        return lazy(dataclasses.replace(e, with_zero=True))
  if name == "mul" and len(ins) == 2:  # the calibration's factor: minmax,c
    for a, c in ((0, 1), (1, 0)):
      e = forms[a]
      if isinstance(e, Extreme) and e.with_zero and ins[c][0] == "const":
        factor = uniform_value(ins[c][1])
        if factor is not None and factor > 0 and np.isfinite(factor):
          return lazy(dataclasses.replace(e, factor=e.factor * factor))
  if name == "sub" and isinstance(forms[0], Extreme) and isinstance(forms[1], Extreme):
    top, bottom = forms
    if (top.kind, bottom.kind) != ("max", "min") or not (top.with_zero and bottom.with_zero):
      return None
    if not (b.same(top.x, bottom.x) and top.axes == bottom.axes and top.factor == bottom.factor
            and np.array_equal(top.tags, bottom.tags)):
      return None
    factors = () if top.factor == 1.0 else (("mul", top.factor),)
    return lazy(Scale(top.x, top.axes, factors, spread=top.factor, tags=top.tags))
  if name == "div" and isinstance(forms[0], Extreme) and isinstance(forms[1], Scale):
    low, scale = forms
    if (low.kind == "min" and low.with_zero and scale.spread == low.factor and b.same(low.x, scale.x)
        and low.axes == scale.axes and np.array_equal(low.tags, scale.tags)):
      return lazy(ZeroPoint(scale, tags=scale.tags))  # c min(min x, 0) / s
    return None
  if (name == "sub" and ins[0][0] == "const" and isinstance(forms[1], ZeroPoint)
      and not forms[1].negated and not forms[1].rounded):
    offset = uniform_value(ins[0][1])
    if offset is None:
      return None
    return lazy(dataclasses.replace(forms[1], offset=offset, negated=True))  # offset - c min / s
  if isinstance(forms[0], ZeroPoint) and len(ins) == 1:
    z = forms[0]
    if name == "round" and z.negated and not z.rounded:
      if eqn.params.get("rounding_method") != jax.lax.RoundingMethod.TO_NEAREST_EVEN:
        return None
      return lazy(dataclasses.replace(z, rounded=True))
    if name == "convert_element_type" and z.rounded:
      new = np.dtype(eqn.params["new_dtype"])
      if jnp.issubdtype(new, jnp.integer):
        info = jnp.iinfo(new)
        return lazy(dataclasses.replace(z, low=max(z.low, float(info.min)), high=min(z.high, float(info.max))))
      return lazy(z) if jnp.issubdtype(new, jnp.floating) and jnp.finfo(new).nmant >= 10 else None
  if isinstance(forms[0], (Scale, Extreme, ZeroPoint, SquareSum)) and len(ins) == 1 and name in _MOVES:
    if name == "convert_element_type":
      new = eqn.params["new_dtype"]
      if not jnp.issubdtype(new, jnp.floating) or jnp.finfo(new).nmant < jnp.finfo(b.dtype).nmant:
        return None
      return lazy(forms[0])
    # the scale moved (broadcast, reshaped, transposed): its tags move with it
    tags = np.asarray(eqn.primitive.bind(jnp.asarray(forms[0].tags, jnp.int32), **eqn.params))
    return lazy(dataclasses.replace(forms[0], tags=tags))
  for a, kinds in ((0, ("div", "mul")), (1, ("mul",))):
    if name in kinds and len(ins) == 2 and isinstance(forms[a], Scale) and ins[1 - a][0] == "const":
      return _scaled(forms[a], name, uniform_value(ins[1 - a][1]), lazy)
  if name == "integer_pow" and isinstance(forms[0], Scale) and eqn.params["y"] == -1:
    return lazy(Reciprocal(forms[0]))  # AQT: x * (1 / s)
  if name == "div" and ins[0][0] == "const" and isinstance(forms[1], Scale) and uniform_value(ins[0][1]) == 1.0:
    return lazy(Reciprocal(forms[1]))
  if name == "abs" and isinstance(forms[0], Reciprocal) and not forms[0].magnitude:
    return lazy(dataclasses.replace(forms[0], magnitude=True))  # jnp.isinf(1 / s): |1 / s| == inf
  if (name == "eq" and isinstance(forms[0], Reciprocal) and forms[0].magnitude and ins[1][0] == "const"
      and uniform_value(ins[1][1]) == np.inf):
    return lazy(Overflow(forms[0].scale))
  if (name == "select_n" and isinstance(forms[0], Overflow) and len(ins) == 3 and isinstance(forms[1], Reciprocal)
      and not forms[1].magnitude and same_scale(forms[1].scale, forms[0].scale) and ins[2][0] == "const"
      and uniform_value(ins[2][1]) == 1.0):
    return lazy(dataclasses.replace(forms[1], guarded=True))  # where(isinf(1 / s), 1, 1 / s)
  if name == "mul" and len(ins) == 2:  # x * (1 / s)
    for a, c in ((0, 1), (1, 0)):
      r = forms[c]
      if (ins[a][0] == "node" and isinstance(r, Reciprocal) and not r.magnitude and b.same(ins[a][1], r.scale.x)
          and b.shape_of(ins[a]) == tuple(shape) and laid_out(r.scale.tags, group_numbers(tuple(shape), r.scale.axes))):
        if not (r.guarded or DR.reciprocal_is_finite(r.scale.guard)):
          return None  # 1 / s may overflow to inf and nothing replaces it
        return lazy(Quotient(ins[a][1], r.scale, reciprocal_guarded=r.guarded))
  if isinstance(forms[0], Quotient) and name in ("max", "min") and len(ins) == 2 and ins[1][0] == "const":
    return _clipped(forms[0], name, uniform_value(ins[1][1]), lazy)
  if name in ("max", "min") and len(ins) == 2 and isinstance(forms[1], Quotient) and ins[0][0] == "const":
    return _clipped(forms[1], name, uniform_value(ins[0][1]), lazy)  # AQT clips x / s before rounding
  if name == "clamp" and isinstance(forms[1], Quotient) and ins[0][0] == "const" and ins[2][0] == "const":
    low = _clipped(forms[1], "max", uniform_value(ins[0][1]), lazy)
    return None if low is None else _clipped(form_of(low), "min", uniform_value(ins[2][1]), lazy)
  if name in _FLIP and len(ins) == 2:
    (s, c), cmp = (forms[0], ins[1]), name
    if not isinstance(s, Scale):
      (s, c), cmp = (forms[1], ins[0]), _FLIP[name]
    cut = uniform_value(c[1]) if isinstance(s, Scale) and c[0] == "const" else None
    if cut is None or cmp not in ("lt", "le", "eq") or s.guard is not None:
      return None
    return lazy(Compare(s, cmp, cut))
  if name == "select_n" and isinstance(forms[0], Compare) and len(ins) == 3:
    pred = forms[0]
    if same_scale(forms[1], pred.scale) and ins[2][0] == "const":  # where(s < cut, fallback, s)
      fallback = uniform_value(ins[2][1])
      if fallback is not None:
        return lazy(dataclasses.replace(pred.scale, guard=(pred.cmp, pred.cut, fallback)))
    return None
  if name == "div" and ins[0][0] == "node" and isinstance(forms[1], Scale):
    if not b.same(ins[0][1], forms[1].x) or b.shape_of(ins[0]) != tuple(shape):
      return None  # x divided by the scale of another value
    if not laid_out(forms[1].tags, group_numbers(tuple(shape), forms[1].axes)):
      return None  # each entry divided by another group's scale
    return lazy(Quotient(ins[0][1], forms[1]))
  if name == "add" and len(ins) == 2:  # x / s + z
    for a, c in ((0, 1), (1, 0)):
      quotient, zero = forms[a], forms[c]
      if (isinstance(quotient, Quotient) and quotient.zero is None and quotient.layout is None
          and isinstance(zero, ZeroPoint)
          and zero.rounded and same_scale(zero.scale, quotient.scale)
          and laid_out(zero.tags, group_numbers(tuple(shape), quotient.scale.axes))):
        return lazy(dataclasses.replace(quotient, zero=zero))
  if name == "round" and isinstance(forms[0], Quotient):
    mode = "nearest" if eqn.params.get("rounding_method") == jax.lax.RoundingMethod.TO_NEAREST_EVEN else "away"
    qt = forms[0]
    # Clipping x / s to integer ends before rounding is clipping after it.
    if any(np.isfinite(e) and e != round(e) for e in (qt.low, qt.high)):
      return None
    return lazy(Rounded(qt.x, qt.scale, mode, low=qt.low, high=qt.high, zero=qt.zero,
                        reciprocal_guarded=qt.reciprocal_guarded, layout=qt.layout))
  if isinstance(forms[0], Rounded):
    r = forms[0]
    if name == "convert_element_type" and len(ins) == 1:
      new = np.dtype(eqn.params["new_dtype"])
      if jnp.issubdtype(new, jnp.integer):  # saturating, as for static scales (trace.rules._rule_convert)
        info = jnp.iinfo(new)
        return lazy(dataclasses.replace(r, low=max(r.low, float(info.min)), high=min(r.high, float(info.max))))
      if jnp.issubdtype(new, jnp.floating) and jnp.finfo(new).nmant >= 10:  # small integers stay exact
        return lazy(r)
      return None
  # max(r, c) and min(r, c), either way round (jnp.clip writes max(c, r)): clipped to integer ends.
  rounded_at = [i for i, form in enumerate(forms[:2]) if isinstance(form, Rounded)]
  if name in ("max", "min") and len(ins) == 2 and len(rounded_at) == 1 and ins[1 - rounded_at[0]][0] == "const":
    r, c = forms[rounded_at[0]], uniform_value(ins[1 - rounded_at[0]][1])
    if c is None:
      return None
    return lazy(dataclasses.replace(r, low=max(r.low, c)) if name == "max" else
                dataclasses.replace(r, high=min(r.high, c)))
  if name == "clamp" and isinstance(forms[1], Rounded) and ins[0][0] == "const" and ins[2][0] == "const":
    lo, hi = uniform_value(ins[0][1]), uniform_value(ins[2][1])
    if lo is None or hi is None:
      return None
    return lazy(dataclasses.replace(forms[1], low=max(forms[1].low, lo), high=min(forms[1].high, hi)))
  if name in ("dot_general", "conv_general_dilated") and len(ins) == 2:  # the zero point's product: z @ W
    for pos in (0, 1):
      z = forms[pos]
      if (isinstance(z, ZeroPoint) and z.rounded and ins[1 - pos][0] == "const"
          and laid_out(z.tags, group_numbers(z.tags.shape, z.scale.axes))):
        return lazy(ZeroProduct(z, (pos, ins[1 - pos][1]), (name, eqn.params)))
  if (name == "sub" and isinstance(forms[0], Pending) and forms[0].zero_product is not None
      and isinstance(forms[1], ZeroProduct)):
    p, zp = forms
    (rounded, pos, weights, numbers) = p.zero_product
    if (zp.zero == rounded.zero and zp.weights[0] == pos and np.shape(zp.weights[1]) == np.shape(weights)
        and np.array_equal(zp.weights[1], weights) and zp.params == numbers
        and zp.zero.tags.shape == b.shape_of(("node", rounded.x))):
      return lazy(dataclasses.replace(p, zero_product=None))  # (c - z) @ W = q @ W / s
    return None
  if name in ("dot_general", "conv_general_dilated") and len(ins) == 2:
    pos = 0 if isinstance(forms[0], Rounded) else 1 if isinstance(forms[1], Rounded) else None
    if pos is None or ins[1 - pos][0] != "const" or forms[pos].layout is not None:
      return None
    tags = _product_groups(b, forms[pos], eqn, pos, tuple(shape))
    if tags is None:
      return None  # the scale varies along a contracted axis: it does not factor out of the product
    q = _quantized(b, forms[pos], eqn, where)
    args = list(ins)
    args[pos] = q
    product = b.linear(eqn, args, where, tuple(shape))
    r = forms[pos]
    if r.zero is None:
      return lazy(Pending(product[1], r.scale, tags))
    # Both products are linear in the activation (a convolution pads c and z alike with zeros), so
    # subtracting z's product with the same weights leaves (c - z) @ W.
    return lazy(Pending(product[1], r.scale, tags, zero_product=(r, pos, ins[1 - pos][1], (name, eqn.params))))
  if isinstance(forms[0], Pending) and name == "convert_element_type" and len(ins) == 1:
    return lazy(forms[0]) if jnp.issubdtype(eqn.params["new_dtype"], jnp.floating) else None
  if name == "mul" and len(ins) == 2:
    for a, c in ((0, 1), (1, 0)):
      if (isinstance(forms[a], Pending) and same_scale(forms[c], forms[a].scale) and forms[a].zero_product is None
          and b.shape_of(("node", forms[a].node)) == tuple(shape) and laid_out(forms[c].tags, forms[a].tags)):
        return ("node", forms[a].node)  # (q @ W) / s * s, each entry by its own group's scale
      if (isinstance(forms[a], Rounded) and same_scale(forms[c], forms[a].scale) and forms[a].zero is None
          and forms[a].layout is None and b.shape_of(("node", forms[a].x)) == tuple(shape)
          and laid_out(forms[c].tags, group_numbers(tuple(shape), forms[a].scale.axes))):
        return _quantized(b, forms[a], eqn, where)  # the fake-quantized activation, dequantized in float
  return None


# The operations that may begin the pattern (on an ordinary node): what the builder defers.
STARTS = ("abs", "reduce_max", "reduce_min", "square", "integer_pow")

_MOVES = ("broadcast_in_dim", "reshape", "squeeze", "transpose", "convert_element_type", "stop_gradient")


def _scaled(scale: Scale, name: str, c: Optional[float], lazy):
  """``scale`` divided or multiplied by a constant ``c``; after a guard ``where(s == 0, v, s)``, the
  guard moves past the factor (it fires at the same inputs, ``v`` scaled alike: AQT's order)."""
  if c is None or c <= 0 or not np.isfinite(c):
    return None
  guard = scale.guard
  if guard is not None:
    if guard[:2] != ("eq", 0.0):
      return None
    guard = ("eq", 0.0, guard[2] / c if name == "div" else guard[2] * c)
  return lazy(dataclasses.replace(scale, factors=scale.factors + ((name, c),), guard=guard))


def _clipped(quotient: Quotient, name: str, c: Optional[float], lazy):
  if c is None or quotient.zero is not None:
    return None
  if name == "max":
    return lazy(dataclasses.replace(quotient, low=max(quotient.low, c)))
  return lazy(dataclasses.replace(quotient, high=min(quotient.high, c)))


def _product_groups(b: _Builder, r: Rounded, eqn, pos: int, out_shape) -> Optional[np.ndarray]:
  """The scale group each entry of the product ``eqn`` of ``r`` (its operand ``pos``) needs, or None
  when the scale varies along a contracted axis (then it does not factor out of the sums)."""
  x_shape = b.shape_of(("node", r.x))
  groups = group_numbers(x_shape, r.scale.axes)
  if eqn.primitive.name == "conv_general_dilated":
    lhs_spec, _, out_spec = eqn.params["dimension_numbers"]
    if pos != 0 or any(d != lhs_spec[0] and d not in r.scale.axes for d in range(len(x_shape))):
      return None  # only a scale per image (qwix's) factors out of a convolution
    per_image = groups[tuple(slice(None) if d == lhs_spec[0] else 0 for d in range(len(x_shape)))]
    kept = [1] * len(out_shape)
    kept[out_spec[0]] = out_shape[out_spec[0]]
    if eqn.params.get("batch_group_count", 1) != 1:
      return None
    return np.broadcast_to(per_image.reshape(kept), out_shape)
  (contracting, batching) = eqn.params["dimension_numbers"]
  contract, batch = tuple(contracting[pos]), tuple(batching[pos])
  if any(d not in r.scale.axes for d in contract):
    return None
  free = [d for d in range(len(x_shape)) if d not in contract and d not in batch]
  # dot_general's result: batch axes, then the left operand's free axes, then the right one's
  kept = groups[tuple(0 if d in contract else slice(None) for d in range(len(x_shape)))]
  remaining = [d for d in range(len(x_shape)) if d not in contract]
  kept = np.transpose(kept, [remaining.index(d) for d in (*batch, *free)])
  n_other = len(out_shape) - len(batch) - len(free)
  at = len(batch) + (len(free) if pos == 0 else 0)
  kept = kept.reshape(kept.shape[:at] + (1,) * n_other + kept.shape[at:])
  return np.broadcast_to(kept, out_shape)


def _quantized(b: _Builder, r: Rounded, eqn, where: str):
  """The node computing ``q(x)``: a ``round`` node of mode ``dynamic`` on ``x``."""
  ndim = len(b.shape_of(("node", r.x)))
  axes = None if len(r.scale.axes) == ndim else tuple(d - ndim for d in r.scale.axes)
  zero_point = None
  if r.zero is None and r.scale.spread is not None:
    b.unsupported(eqn, "an activation divided by a min/max (asymmetric) scale and rounded without its zero point")
  if r.zero is not None:
    offset, span = r.zero.offset, r.scale.divisor * r.scale.spread
    span = round(span) if abs(span - round(span)) <= 1e-6 * span else span
    if offset != round(offset) or span != round(span) or r.zero.low > offset or r.zero.high < offset + span:
      b.unsupported(eqn, f"an asymmetric dynamic quantization whose zero point qbound cannot bound (offset "
                    f"{offset}, span {span}, zero point saturated to [{r.zero.low}, {r.zero.high}])")
    zero_point = (float(offset), float(span))
  guard = r.scale.guard
  if r.reciprocal_guarded:  # 1 / s overflowed, replaced by 1: then x * 1 rounds to 0, as with s = 1
    if guard is not None and guard[:2] != ("eq", 0.0):
      b.unsupported(eqn, f"a dynamically scaled activation quantization with two guards ({guard} and isinf(1 / s))")
    guard = ("lt", DR.RECIPROCAL_OVERFLOW, 1.0)  # where(s == 0, ...) fires inside it
  spec = DR.DynamicScale(divisor=r.scale.divisor, low=r.low, high=r.high, rounding=r.rounding,
                         guard=guard, axes=axes, zero_point=zero_point, norm=r.scale.norm)
  why = DR.check_guard(spec)
  if why is not None:
    b.unsupported(eqn, f"a dynamically scaled activation quantization whose scale qbound cannot bound: {why}")
  return b.emit(G.Node(kind=G.ROUND, inputs=(r.x,), shape=b.shape_of(("node", r.x)), attrs=(DR.DYNAMIC, spec),
                       where=where))
