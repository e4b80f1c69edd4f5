"""Activation scales computed at run time (qwix's dynamic ``act_qtype``), traced as one rounding node.

qwix quantizes an activation ``x`` with ``s = max|x| / 127.5``, guarded by ``where(s < g, 1, s)``,
then ``int8(round(x / s))``, an integer product and a rescale by ``s`` (see
:mod:`qbound.dynamic_rounding` for the equations and why the result is bounded). Traced one
primitive at a time, the scale is a step function of the input (the guard is a ``jnp.where``
between a value and a constant, not continuous) and ``x / s`` a product of two input-dependent
values, with no useful bound. Traced as a whole, the pattern is ``(q(x) @ W_int) * s_w``: a
dynamic rounding node ``q`` (bounded from the bounds of ``x``: ``x`` plus at most half its
largest scale over them, or, where ``x / s`` stays on one step, that step times the scale) before
the same product the float model has, so the layers pair for the differential bounds.

How: the values of the pattern are kept symbolic (``("lazy", Deferred)``) while they are read
only by the next step of the pattern: ``|x|`` (:class:`AbsOf`), its maximum over the whole tensor
and the constants it is divided by (:class:`Scale`), the guard's comparison (:class:`Compare`)
and ``where`` (a guarded :class:`Scale`), ``x / s`` (:class:`Quotient`), its rounding and
saturating cast (:class:`Rounded`), the product of that with constant weights (:class:`Pending`,
the product still divided by ``s``), and the rescale by ``s`` that completes it. Each deferred
value keeps the equation that made it: used in any other way, it is replayed through the ordinary
rules (:func:`materialize`), so nothing changes for functions without the pattern, and one whose
pattern qbound does not know (per-token scales, asymmetric zero points) fails as before, naming
the library's line.

The pattern must divide ``x`` by a scale computed from that same ``x``, over the whole tensor
(per-token and per-channel scales, and asymmetric ones with zero points, are not this pattern and
are refused as before). How the node is bounded: :mod:`qbound.dynamic_rounding`.

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
from typing import TYPE_CHECKING, Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import dynamic_rounding as DR
from qbound import graph as G

if TYPE_CHECKING:
  from qbound.trace.builder import _Builder


@dataclasses.dataclass(frozen=True)
class AbsOf:
  x: int  # node index


@dataclasses.dataclass(frozen=True)
class Scale:
  """``max|x|`` over the whole tensor, then ``factors`` (``("div", c)`` / ``("mul", c)``), then a guard."""
  x: int
  factors: tuple = ()
  guard: Optional[tuple] = None

  @property
  def divisor(self) -> float:
    q = 1.0
    for kind, c in self.factors:
      q = q * c if kind == "div" else q / c
    return q


@dataclasses.dataclass(frozen=True)
class Compare:
  scale: Scale
  cmp: str  # the scale ``cmp`` the cut: "lt", "le", "eq"
  cut: float


@dataclasses.dataclass(frozen=True)
class Quotient:
  x: int
  scale: Scale


@dataclasses.dataclass(frozen=True)
class Rounded:
  x: int
  scale: Scale
  rounding: str
  low: float = -np.inf
  high: float = np.inf


@dataclasses.dataclass(frozen=True)
class Pending:
  """A product node of the quantized activation, still to be multiplied by ``1 / scale``."""
  node: int
  scale: Scale


@dataclasses.dataclass(eq=False)
class Deferred:
  """A symbolic value and the equation that made it (replayed by :func:`materialize`)."""
  form: Any
  eqn: Any
  ins: list
  outer_where: str
  calls: list
  shape: tuple
  value: Any = None  # the materialized value, once made


def _lazy(form, b: _Builder, eqn, ins, outer_where, shape):
  return ("lazy", Deferred(form, eqn, list(ins), outer_where, list(getattr(b, "calls", [])), tuple(shape)))


def materialize(b: _Builder, v):
  """``v`` as an ordinary value (node or constant): a deferred value's equation replayed."""
  if v[0] != "lazy":
    return v
  d: Deferred = v[1]
  if d.value is None:
    ins = [materialize(b, i) for i in d.ins]
    saved = getattr(b, "calls", [])
    b.calls = d.calls
    try:
      (d.value,) = b.equation(d.eqn, ins, d.outer_where, defer=False)
    finally:
      b.calls = saved
  return d.value


def _uniform(c) -> Optional[float]:
  """A constant's one value if all its entries are equal (a scalar), else None."""
  a = np.asarray(c)
  if a.size == 0 or not np.issubdtype(a.dtype, np.number):
    return None
  first = a.reshape(-1)[0]
  return float(first) if np.all(a == first) else None


def _form(v):
  return v[1].form if v[0] == "lazy" else None


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq"}


def rule(b: _Builder, eqn, ins, where: str, shape, outer_where: str):
  """The pattern's next value for ``eqn`` on (possibly) deferred inputs, or None to materialize them."""
  name = eqn.primitive.name
  forms = [_form(v) for v in ins]

  def lazy(form):
    return _lazy(form, b, eqn, ins, outer_where, shape)

  if name == "abs" and ins[0][0] == "node":
    return lazy(AbsOf(ins[0][1]))
  if name == "reduce_max" and isinstance(forms[0], AbsOf):
    axes, x_shape = set(eqn.params["axes"]), b.shape_of(("node", forms[0].x))
    if any(d not in axes and n != 1 for d, n in enumerate(x_shape)):
      return None  # per-token or per-channel scales: not (yet) this pattern (a kept axis of size 1 is fine)
    return lazy(Scale(forms[0].x))
  if isinstance(forms[0], Scale) and len(ins) == 1 and name in (
      "broadcast_in_dim", "reshape", "expand_dims", "squeeze", "convert_element_type"):
    if name == "convert_element_type" and not jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
      return None
    if name == "convert_element_type" and jnp.finfo(eqn.params["new_dtype"]).nmant < jnp.finfo(b.dtype).nmant:
      return None
    return lazy(forms[0])  # one scale for the whole tensor, whatever its shape
  if name in ("div", "mul") and isinstance(forms[0], Scale) and forms[0].guard is None and ins[1][0] == "const":
    c = _uniform(ins[1][1])
    if c is None or c <= 0 or not np.isfinite(c):
      return None
    return lazy(dataclasses.replace(forms[0], factors=forms[0].factors + ((name, c),)))
  if name == "mul" and isinstance(forms[1], Scale) and forms[1].guard is None and ins[0][0] == "const":
    c = _uniform(ins[0][1])
    if c is None or c <= 0 or not np.isfinite(c):
      return None
    return lazy(dataclasses.replace(forms[1], factors=forms[1].factors + (("mul", c),)))
  if name in _FLIP and len(ins) == 2:
    (s, c), cmp = (forms[0], ins[1]), name
    if not isinstance(s, Scale):
      (s, c), cmp = (forms[1], ins[0]), _FLIP[name]
    cut = _uniform(c[1]) if isinstance(s, Scale) and c[0] == "const" else None
    if cut is None or cmp not in ("lt", "le", "eq") or s.guard is not None:
      return None
    return lazy(Compare(s, cmp, cut))
  if name == "select_n" and isinstance(forms[0], Compare) and len(ins) == 3:
    pred = forms[0]
    if forms[1] == pred.scale and ins[2][0] == "const":  # where(s < cut, fallback, s)
      fallback = _uniform(ins[2][1])
      if fallback is not None:
        return lazy(dataclasses.replace(pred.scale, guard=(pred.cmp, pred.cut, fallback)))
    return None
  if name == "div" and ins[0][0] == "node" and isinstance(forms[1], Scale):
    if not b.same(ins[0][1], forms[1].x) or b.shape_of(ins[0]) != tuple(shape):
      return None  # x divided by the scale of another value
    return lazy(Quotient(ins[0][1], forms[1]))
  if name == "round" and isinstance(forms[0], Quotient):
    mode = "nearest" if eqn.params.get("rounding_method") == jax.lax.RoundingMethod.TO_NEAREST_EVEN else "away"
    return lazy(Rounded(forms[0].x, forms[0].scale, mode))
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
    if name in ("max", "min") and ins[1][0] == "const":
      c = _uniform(ins[1][1])
      if c is None:
        return None
      return lazy(dataclasses.replace(r, low=max(r.low, c)) if name == "max" else
                  dataclasses.replace(r, high=min(r.high, c)))
  if name == "clamp" and isinstance(forms[1], Rounded) and ins[0][0] == "const" and ins[2][0] == "const":
    lo, hi = _uniform(ins[0][1]), _uniform(ins[2][1])
    if lo is None or hi is None:
      return None
    return lazy(dataclasses.replace(forms[1], low=max(forms[1].low, lo), high=min(forms[1].high, hi)))
  if name in ("dot_general", "conv_general_dilated") and len(ins) == 2:
    pos = 0 if isinstance(forms[0], Rounded) else 1 if isinstance(forms[1], Rounded) else None
    if pos is None or ins[1 - pos][0] != "const":
      return None
    q = _quantized(b, forms[pos], eqn, where)
    args = list(ins)
    args[pos] = q
    product = b.linear(eqn, args, where, tuple(shape))
    return lazy(Pending(product[1], forms[pos].scale))
  if isinstance(forms[0], Pending) and name == "convert_element_type" and len(ins) == 1:
    return lazy(forms[0]) if jnp.issubdtype(eqn.params["new_dtype"], jnp.floating) else None
  if name == "mul" and len(ins) == 2:
    for a, c in ((0, 1), (1, 0)):
      if isinstance(forms[a], Pending) and forms[c] == forms[a].scale and b.shape_of(("node", forms[a].node)) == tuple(shape):
        return ("node", forms[a].node)  # (q @ W) / s * s
      if isinstance(forms[a], Rounded) and forms[c] == forms[a].scale and b.shape_of(("node", forms[a].x)) == tuple(shape):
        return _quantized(b, forms[a], eqn, where)  # the fake-quantized activation, dequantized in float
  return None


def _quantized(b: _Builder, r: Rounded, eqn, where: str):
  """The node computing ``q(x)``: a ``round`` node of mode ``dynamic`` on ``x``."""
  spec = DR.DynamicScale(divisor=r.scale.divisor, low=r.low, high=r.high, rounding=r.rounding, guard=r.scale.guard)
  why = DR.check_guard(spec)
  if why is not None:
    b.unsupported(eqn, f"a dynamically scaled activation quantization whose scale qbound cannot bound: {why}")
  return b.emit(G.Node(kind=G.ROUND, inputs=(r.x,), shape=b.shape_of(("node", r.x)), attrs=(DR.DYNAMIC, spec),
                       where=where))
