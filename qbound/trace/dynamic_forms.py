"""The symbolic values of a dynamic activation scale's pattern while it is traced (:mod:`qbound.trace.dynamic`).

Each is one step of the pattern read so far: ``|x|`` (:class:`AbsOf`), its maximum over some axes
and the constants it is divided by (:class:`Scale`), ``x^2`` and its sum (:class:`SquareOf`,
:class:`SquareSum`), a clipped extreme and a zero point (:class:`Extreme`, :class:`ZeroPoint`,
:class:`ZeroProduct`), the guard's comparison (:class:`Compare`), ``x / s`` or ``x * (1 / s)``
(:class:`Quotient`, :class:`Reciprocal`, :class:`Overflow`), its rounding (:class:`Rounded`) and a
product still to be rescaled (:class:`Pending`). A value that holds one of them is
``("lazy", Deferred)``: the form and the equation that made it, replayed through the ordinary rules
(:func:`materialize`) when anything else reads it.

Example:
  >>> from qbound.trace.dynamic_forms import uniform_value
  >>> uniform_value([2.0, 2.0]), uniform_value([1.0, 2.0])
  (2.0, None)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
  from qbound.trace.builder import _Builder


@dataclasses.dataclass(frozen=True)
class AbsOf:
  x: int  # node index


@dataclasses.dataclass(frozen=True)
class Scale:
  """``max|x|`` over ``axes`` of ``x`` (a scale per group of entries), then ``factors`` (``("div", c)`` /
  ``("mul", c)``), then a guard.

  ``tags`` has the shape of the scale's value as it is now (reshaped, broadcast, transposed as the
  library moves it) and holds each entry's group number: where the scale meets ``x`` or the
  product, its tags must be the groups of the entries it scales (:func:`group_numbers`), so a scale moved
  to the wrong axis is never taken for the right one.
  """
  x: int
  axes: tuple = ()  # the reduced axes of x (with every axis of length 1)
  factors: tuple = ()
  spread: Optional[float] = None  # asymmetric: the scale is c (max(max x, 0) - min(min x, 0)) (c: spread)
  guard: Optional[tuple] = None
  norm: str = "max"  # "rms": the scale is sqrt(sum of x^2 over axes), not max|x| (qwix's rms,c)
  tags: Any = dataclasses.field(default=None, compare=False, hash=False)

  @property
  def divisor(self) -> float:
    q = 1.0
    for kind, c in self.factors:
      q = q * c if kind == "div" else q / c
    return q


def group_numbers(shape, axes) -> np.ndarray:
  """Each entry's group number for a scale that reduces ``axes`` of a tensor of ``shape``."""
  kept = [1 if d in axes else n for d, n in enumerate(shape)]
  return np.broadcast_to(np.arange(int(np.prod(kept, dtype=np.int64))).reshape(kept), shape)


def laid_out(tags, groups) -> bool:
  """Whether a scale with ``tags``, broadcast as the operation does, scales entries of ``groups``."""
  try:
    return bool(np.array_equal(np.broadcast_to(tags, groups.shape), groups))
  except ValueError:
    return False


def same_scale(a, b) -> bool:
  return isinstance(a, Scale) and isinstance(b, Scale) and a == b and np.array_equal(a.tags, b.tags)


@dataclasses.dataclass(frozen=True)
class SquareOf:
  """``x^2`` (on the way to qwix's ``rms``: ``sqrt(mean(x^2))``)."""
  x: int


@dataclasses.dataclass(frozen=True)
class SquareSum:
  """``sum(x^2)`` over ``axes`` of ``x``, divided by ``count`` (``jnp.mean``'s ``n``), until its square root
  makes it a :class:`Scale` of norm ``rms``; ``tags`` as for :class:`Scale`."""
  x: int
  axes: tuple
  count: float = 1.0
  tags: Any = dataclasses.field(default=None, compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class Extreme:
  """``min x`` or ``max x`` over ``axes`` (qwix's ``minmax``), then clipped to include 0, then times ``factor``."""
  x: int
  kind: str  # "min" or "max"
  axes: tuple
  with_zero: bool = False
  factor: float = 1.0
  tags: Any = dataclasses.field(default=None, compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class ZeroPoint:
  """``offset - low / s`` (``low`` the clipped minimum, :class:`Extreme`), rounded once ``rounded``,
  then saturated to ``[low, high]`` by an integer cast: the zero point of an asymmetric scale."""
  scale: Scale
  offset: float = 0.0
  negated: bool = False
  rounded: bool = False
  low: float = -np.inf
  high: float = np.inf
  tags: Any = dataclasses.field(default=None, compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class ZeroProduct:
  """The product of a zero point (broadcast over ``x``'s shape) with constant weights."""
  zero: ZeroPoint
  weights: Any = dataclasses.field(compare=False, hash=False)
  params: Any = dataclasses.field(compare=False, hash=False)


@dataclasses.dataclass(frozen=True)
class Compare:
  scale: Scale
  cmp: str  # the scale ``cmp`` the cut: "lt", "le", "eq"
  cut: float


@dataclasses.dataclass(frozen=True)
class Quotient:
  x: int
  scale: Scale
  zero: Optional[ZeroPoint] = None
  low: float = -np.inf  # clipped before rounding (AQT)
  high: float = np.inf
  reciprocal_guarded: bool = False  # x * where(isinf(1 / s), 1, 1 / s) (AQT)
  layout: Any = dataclasses.field(default=None, compare=False, hash=False)  # see Rounded


@dataclasses.dataclass(frozen=True)
class Reciprocal:
  """``1 / s`` (``magnitude``: its absolute value, on the way to ``isinf``), ``guarded`` once an
  overflow to inf is replaced by 1."""
  scale: Scale
  magnitude: bool = False
  guarded: bool = False


@dataclasses.dataclass(frozen=True)
class Overflow:
  """``isinf(1 / s)``."""
  scale: Scale


@dataclasses.dataclass(frozen=True)
class Rounded:
  x: int
  scale: Scale
  rounding: str
  low: float = -np.inf
  high: float = np.inf
  zero: Optional[ZeroPoint] = None
  reciprocal_guarded: bool = False
  # Reshaped or transposed on the way (qwix's tiles: x split into tiles, divided, flattened to round,
  # split again to rescale): which entry of x each entry now holds; None: x's own layout. Only
  # elementwise steps read a value out of its layout.
  layout: Any = dataclasses.field(default=None, compare=False, hash=False)


def moved_form(b: _Builder, form, eqn):
  """``form`` (a :class:`Quotient` or :class:`Rounded`) reshaped or transposed by ``eqn``."""
  x_shape = b.shape_of(("node", form.x))
  home = np.arange(int(np.prod(x_shape, dtype=np.int64))).reshape(x_shape)
  layout = np.asarray(eqn.primitive.bind(jnp.asarray(home if form.layout is None else form.layout, jnp.int32),
                                         **eqn.params))
  at_home = layout.shape == home.shape and np.array_equal(layout, home)
  return dataclasses.replace(form, layout=None if at_home else layout)


@dataclasses.dataclass(frozen=True)
class Pending:
  """A product node of the quantized activation, still to be multiplied by ``1 / scale``; ``tags``:
  the group of the scale each of the product's entries needs (:class:`Scale`)."""
  node: int
  scale: Scale
  tags: Any = dataclasses.field(default=None, compare=False, hash=False)
  # with a zero point, the product of the zero point with the same weights is still to be subtracted
  zero_product: Optional[tuple] = dataclasses.field(default=None, compare=False, hash=False)


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


def deferred(form, b: _Builder, eqn, ins, outer_where, shape):
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


def uniform_value(c) -> Optional[float]:
  """A constant's one value if all its entries are equal (a scalar), else None."""
  a = np.asarray(c)
  if a.size == 0 or not np.issubdtype(a.dtype, np.number):
    return None
  first = a.reshape(-1)[0]
  return float(first) if np.all(a == first) else None


def form_of(v):
  return v[1].form if v[0] == "lazy" else None
