"""Dynamically scaled fake quantization as one rounding node, and why its bounds are sound.

qwix (PTQ with ``act_qtype`` and no ``act_static_scale``, and its QT provider as trained models run)
quantizes an activation with a scale computed from the activation itself, in float32::

    s = max|x| / Q                      # Q = 127.5 for int8: qwix's symmetric int8 range
    s = where(s < g, 1, s)              # the guard against dividing by 0 (g = sqrt(float32 tiny))
    c = clip(round(x / s), lo, hi)      # the int8 cast saturates at [-128, 127]
    y = (c @ W_int) * s * s_w + b       # an integer product, rescaled

With ``s`` constant along the contracted axes (one scale per tensor), ``(c @ W_int) * s`` is
``(s * c) @ W_int`` in real arithmetic: the layer is the product of ``q(x) = s(x) * c(x)``, the
dynamically fake-quantized activation, a ``round`` node of mode ``dynamic``. ``q`` is not
elementwise (every entry's scale depends on the largest entry), so it is no staircase; what is
known of it over bounds ``[lo, hi]`` of ``x`` (:func:`bounds`):

* the band: ``|q(x) - x| <= band * s(x) <= band * max|x| / Q``, ``band = max(1/2, Q - hi, Q + lo)``
  (``|x / s| <= Q``, so a clip at ``hi >= Q - 1/2`` costs no more than the rounding), with the
  largest ``|x|`` bounded from ``[lo, hi]``: it narrows as a branch-and-bound piece shrinks;
* a step: where ``x_i / s(x) = Q x_i / max|x|`` stays strictly inside one rounding step ``k``
  over the bounds, ``q_i = k max|x| / Q`` exactly, between ``k`` times the bounds of ``max|x| / Q``;
* the guard needs no decision: where it can fire (``max|x| <= Q g``), ``q = 0`` (rounded with
  ``s = 1``, when ``Q g < 1/2``), an error below ``Q g`` that the band takes in.

The same node, four variants (:class:`DynamicScale` fields):

* ``axes``: a scale per group of entries, ``max|x|`` over some axes (qwix: one scale per token for a
  batch; AQT alike). Everything above holds group by group, with each group's ``max|x|``, as
  long as the scale is constant along the product's contracted axes (the tracer checks that).
* ``zero_point``: qwix's asymmetric ``minmax`` (after Jacob et al., "Quantization and Training of
  Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018), with
  ``m = max(max x, 0) - min(min x, 0)``, ``s = m / Q``, the zero point
  ``z = round(qmin - D min(min x, 0) / m)`` (``D = qmax - qmin``: the argument lies in
  ``[qmin, qmax]``, so the integer cast never saturates it) and ``q = s (clip(round(x / s + z)) - z)``.
  Since ``|z - arg| <= 1/2``, ``x / s + z`` lies in ``[qmin - max(Q - D, 0) - 1/2, qmin + max(Q, D) + 1/2]``
  (``x / s`` ranges over ``Q [min, max] / m``), so ``|q - x| <= s (1/2 + max(Q - D, 0))`` for a clip
  to ``[qmin, qmax]``: half a step for plain ``minmax`` (``Q = D``). Where ``z``'s argument
  ``qmin + D (-min) / m`` stays inside one rounding step over the bounds, ``z`` is a constant
  ``K_z``, and where ``x / s + K_z`` does too, ``q = (k - K_z) m / Q`` between constant bounds.
* ``norm="rms"``: qwix's ``rms,c`` calibration, ``s = c sqrt(mean(x^2)) / Q``
  (:mod:`qbound.rms_rounding` bounds it: the entries beyond ``Q s`` saturate).
* AQT's calibration is the symmetric node with a clip to ``[-127, 127]`` *before* the rounding (the
  same as after it, for integer ends) and ``x * (1 / s)``; its guard replaces ``1 / s`` by 1 where it
  overflows (``s < 2^-127``), where ``q = 0`` as with qwix's guard.

float32's own rounding of ``s`` and ``x / s`` (a relative ``2^-24`` each, and XLA may compute
``x * (1 / s)``) is covered by a relative slack of ``2^-18`` on every end. The bounds need no
box fixed while tracing: they read the bounds of ``x`` that the bound method propagates.

Example:
  >>> import jax.numpy as jnp
  >>> from qbound.dynamic_rounding import DynamicScale, quantize
  >>> spec = DynamicScale(divisor=127.5, low=-128, high=127)
  >>> x = jnp.array([0.5, -1.0, 0.25])
  >>> bool(jnp.all(jnp.abs(quantize(spec, x) - x) <= 0.5 / 127.5))
  True
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from qbound import rms_rounding
from qbound._arrays import namespace

# The rounding mode of a ``round`` node that is a dynamically scaled fake quantization.
DYNAMIC = "dynamic"


@dataclasses.dataclass(frozen=True)
class DynamicScale:
  """The static data of a dynamic fake quantization ``s * clip(round(x / s), low, high)``.

  Attributes:
    divisor: ``Q`` in ``s = max|x| / Q`` (the product of the constants the library divides by).
    low, high: the integer range the rounded values are clipped (saturated) to.
    rounding: ``"nearest"`` (halves to even) or ``"away"``.
    guard: ``(comparison, cut, fallback)`` for ``s = where(s <cmp> cut, fallback, s)``, or None.
    axes: the axes ``max|x|`` is taken over, counted from the end (``-1``: the last), one scale for
      each entry of the others (a scale per token or per channel); None: the whole tensor.
    zero_point: ``(offset, span)`` for asymmetric scales with a zero point (qwix's ``minmax``):
      ``s = (max(max x, 0) - min(min x, 0)) / divisor``, ``z = round(offset - c min(min x, 0) / s)``
      with ``c = span / divisor`` (the calibration's factor), and ``q = s * (clip(round(x / s + z)) - z)``;
      None: symmetric, ``s = max|x| / divisor``, no zero point.
    norm: ``"max"``: the scale is ``max|x|`` (or ``zero_point``'s range) over ``divisor``; ``"rms"``:
      qwix's ``rms,c``, ``s = c sqrt(mean(x^2)) / Q``, written ``sqrt(sum(x^2)) / divisor`` with
      ``divisor = sqrt(n) Q / c`` (``n`` the entries the mean is over); see :mod:`qbound.rms_rounding`.
  """

  divisor: float
  low: float
  high: float
  rounding: str = "nearest"
  guard: Optional[tuple[str, float, float]] = None
  axes: Optional[tuple[int, ...]] = None
  zero_point: Optional[tuple[float, float]] = None
  norm: str = "max"

  @property
  def band(self) -> float:
    """The largest ``|c - x / s|`` in real arithmetic: 1/2, or the clip's cost where it cuts inside ``[-Q, Q]``."""
    return max(0.5, self.divisor - self.high, self.divisor + self.low)


def scale_of(spec: DynamicScale, x):
  """The scale the library computes from ``x`` (per tensor, or per group: ``spec.axes``), with its guard."""
  xp, keep = namespace(x), spec.axes is not None
  if spec.norm == "rms":
    s = xp.sqrt(xp.sum(xp.square(x), axis=spec.axes, keepdims=keep)) / spec.divisor
  elif spec.zero_point is None:
    s = xp.max(xp.abs(x), axis=spec.axes, keepdims=keep) / spec.divisor
  else:
    low_c, high_c = _calibration(spec, x)
    s = (high_c - low_c) / spec.zero_point[1]
  if spec.guard is not None:
    cmp, cut, fallback = spec.guard
    fires = {"lt": s < cut, "le": s <= cut, "eq": s == cut}[cmp]
    s = xp.where(fires, xp.asarray(fallback, s.dtype), s)
  return s


def _calibration(spec: DynamicScale, x):
  """qwix's ``minmax``: ``c min(min x, 0)`` and ``c max(max x, 0)`` per group."""
  xp, keep, c = namespace(x), spec.axes is not None, spec.zero_point[1] / spec.divisor
  return (xp.minimum(xp.min(x, axis=spec.axes, keepdims=keep), 0.0) * c,
          xp.maximum(xp.max(x, axis=spec.axes, keepdims=keep), 0.0) * c)


def _round(spec: DynamicScale, z):
  if spec.rounding == "nearest":
    return namespace(z).round(z)
  if namespace(z) is np:
    return np.where(z >= 0, np.floor(z + 0.5), np.ceil(z - 0.5))
  return jax.lax.round(z, jax.lax.RoundingMethod.AWAY_FROM_ZERO)


def quantize(spec: DynamicScale, x):
  """``q(x) = s(x) * clip(round(x / s(x)), low, high)``, the dynamically fake-quantized ``x`` (with a
  zero point ``z``: ``s * (clip(round(x / s + z)) - z)``)."""
  xp, s = namespace(x), scale_of(spec, x)
  if spec.zero_point is None:
    return s * xp.clip(_round(spec, x / s), spec.low, spec.high)
  z = xp.round(spec.zero_point[0] - _calibration(spec, x)[0] / s)
  return s * (xp.clip(_round(spec, x / s + z), spec.low, spec.high) - z)


def check_guard(spec: DynamicScale) -> Optional[str]:
  """Why the guard cannot be bounded as :func:`bounds` does, or None."""
  if spec.norm not in ("max", "rms") or (spec.norm == "rms" and spec.zero_point is not None):
    return f"its scale is of an unknown kind ({spec.norm!r}, zero point {spec.zero_point})"
  if spec.norm == "rms" and not spec.low <= -0.5 < 0.5 <= spec.high:
    return f"its rounded values are clipped to [{spec.low}, {spec.high}], a range without the integers -1, 0, 1"
  if spec.guard is None:
    return None
  cmp, cut, fallback = spec.guard
  if cut < 0 or not np.isfinite(cut) or not np.isfinite(fallback) or (cmp == "eq" and cut != 0):
    return f"its guard replaces scales {cmp} {cut} (only s == 0 or s below a small positive cut are known)"
  if cmp != "eq" and spec.divisor * cut > fallback / 2 * (1 - 1e-6):
    return (f"its guard replaces scales below {cut} with {fallback}, too small to round those "
            "activations to 0")
  return None


# 1 / s overflows float32 to inf only where s < 2^-127 (AQT replaces it by 1 there).
RECIPROCAL_OVERFLOW = 2.0 ** -127


def reciprocal_is_finite(guard) -> bool:
  """Whether ``1 / s`` stays finite in float32 behind ``guard`` (scales below a cut replaced)."""
  return (guard is not None and guard[0] in ("lt", "le") and guard[1] >= 2.0 ** -126
          and 0 < guard[2] and np.isfinite(1 / np.float32(guard[2])))


# Relative slack on the few float32 operations of :func:`bounds` and of the library's scale and
# quotient (each a relative 2^-24 at most): 2^-18 covers them many times over.
_REL = 2.0 ** -18


def joint_saturation(spec: DynamicScale, shape) -> Optional[tuple[int, tuple]]:
  """``(count, axes)`` where a node's saturation errors are limited jointly: at most ``count`` entries
  of each group (``axes`` of a value of ``shape``, non-negative) past a clip at once, fewer than the
  group's entries (qwix's ``rms,c``, :func:`qbound.rms_rounding.saturating_count`); else None."""
  if spec.norm != "rms" or spec.zero_point is not None:
    return None
  axes = tuple(range(len(shape))) if spec.axes is None else tuple(len(shape) + a for a in spec.axes)
  terms = int(np.prod([shape[a] for a in axes], dtype=np.int64))
  t = min(float(spec.high), -float(spec.low)) - 0.5
  if float(spec.divisor) <= t:  # |x / s| <= D: no entry reaches past a clip
    return None
  count = rms_rounding.saturating_count(spec, terms)
  return (count, axes) if count < terms else None


def saturation_parts(spec: DynamicScale, lo, hi, ndim: int, rest=None) -> rms_rounding.Parts:
  """The error of an ``rms`` node split into every entry's band and what saturation adds
  (:class:`qbound.rms_rounding.Parts`; :func:`joint_saturation` says how many saturate at once).
  ``rest``: an optional :class:`qbound.rms_rounding.Joint` (:func:`qbound.rms_rounding.parts`)."""
  axes = tuple(range(lo.ndim - ndim, lo.ndim)) if spec.axes is None else tuple(lo.ndim + a for a in spec.axes)
  return rms_rounding.parts(spec, lo, hi, axes, rest)


def _span(spec: DynamicScale, lo, hi, axes):
  """``(m_lo, m_hi, parts)``: bounds of the range ``m`` a ``max`` scale spans for inputs in
  ``[lo, hi]``, per group of ``axes`` (``max|t|``; with a zero point ``max(max t, 0) - min(min t, 0)``),
  widened by ``_REL``; ``parts`` with a zero point, the bounds ``(top_lo, top_hi, neg_lo, neg_hi)``
  of ``max(max t, 0)`` and ``-min(min t, 0)``, else None."""
  xp = namespace(lo, hi)
  if spec.zero_point is None:
    mag = xp.maximum(xp.abs(lo), xp.abs(hi))
    mig = xp.where((lo <= 0) & (hi >= 0), 0.0, xp.minimum(xp.abs(lo), xp.abs(hi)))
    return (xp.max(mig, axis=axes, keepdims=True) * (1 - _REL), xp.max(mag, axis=axes, keepdims=True) * (1 + _REL),
            None)
  top_lo = xp.maximum(xp.max(lo, axis=axes, keepdims=True), 0.0)
  top_hi = xp.maximum(xp.max(hi, axis=axes, keepdims=True), 0.0)
  neg_lo = xp.maximum(-xp.min(hi, axis=axes, keepdims=True), 0.0)
  neg_hi = xp.maximum(-xp.min(lo, axis=axes, keepdims=True), 0.0)
  return (top_lo + neg_lo) * (1 - _REL), (top_hi + neg_hi) * (1 + _REL), (top_lo, top_hi, neg_lo, neg_hi)


def _guard_may_fire(spec: DynamicScale, m_lo):
  """Where the scale's guard may replace it (a range of at most ``m_lo`` below its cut)."""
  xp = namespace(m_lo)
  if spec.guard is None:
    return xp.zeros_like(m_lo, bool)
  if spec.guard[0] == "eq":
    return m_lo <= 0
  return m_lo <= spec.divisor * spec.guard[1] * (1 + _REL)


def bounds(spec: DynamicScale, lo, hi, ndim: int, rest=None):
  """What is known of the node's value ``v = q(t)`` for ``t`` in ``[lo, hi]`` (one box, or
  a batch of boxes along leading axes; the node's own ``ndim`` trailing axes are the tensor).

  Returns ``(half, flat, v_lo, v_hi)``: ``|v - t| <= half`` everywhere (the band, from the
  largest ``|t|`` over these bounds, so it shrinks with the box: ``half = band * max|t| / Q``),
  and where ``flat``, ``v = k max|t| / Q`` for one integer ``k`` (the quotient ``x / s`` stays
  inside one rounding step), so ``v_lo <= v <= v_hi``. All in float32 with slack ``_REL``.
  ``rest`` (``rms`` only): an optional :class:`qbound.rms_rounding.Joint` (:func:`qbound.rms_rounding.parts`).
  """
  xp = namespace(lo, hi)
  axes = tuple(range(lo.ndim - ndim, lo.ndim)) if spec.axes is None else tuple(lo.ndim + a for a in spec.axes)
  if spec.norm == "rms":
    return rms_rounding.bounds(spec, lo, hi, axes, rest)
  q = spec.divisor
  m_lo, m_hi, parts = _span(spec, lo, hi, axes)
  if spec.zero_point is None:
    zeros, zero_steps = (0.0,), 0.0
    zero_known = True
  else:
    # The zero point is z = round(offset - span min(min t, 0) / m), constant where its argument
    # stays inside one step. Rounding is monotone, so z lies in [round(arg_lo), round(arg_hi)].
    # Where that is two integers (a piece across the tie; at int8's offset -128 and span 255, any
    # piece near inputs whose largest and smallest entries are opposite, max t = -min t), each entry
    # is bounded in both cases, and its value is known where both cases pin it.
    offset, span = spec.zero_point
    top_lo, top_hi, neg_lo, neg_hi = parts
    share_lo = xp.where(neg_lo > 0, neg_lo / xp.where(neg_lo > 0, top_hi + neg_lo, 1.0), 0.0)
    share_hi = xp.where(top_lo > 0, neg_hi / xp.where(top_lo > 0, top_lo + neg_hi, 1.0), 1.0)
    arg_slack = (abs(offset) + span + 1) * _REL
    arg_lo, arg_hi = offset + span * share_lo - arg_slack, offset + span * share_hi + arg_slack
    zero = xp.round(arg_lo)
    zero_known = (arg_lo > zero - 0.5) & (arg_hi < zero + 0.5)
    zero_two = ~zero_known & (xp.round(arg_hi) <= zero + 1)
    zeros = (zero, zero + 1)
    # |z - arg| <= 1/2 and arg in [offset, offset + span]: x / s + z stays within
    # [offset - max(Q - span, 0) - 1/2, offset + max(Q, span) + 1/2] (Q = divisor), so a clip to
    # [low, high] costs at most this many steps more than the rounding's 1/2:
    zero_steps = max(0.0, spec.low - offset + max(q - span, 0.0), offset + max(q, span) - spec.high)
  # The quotient u = x / s = Q t / m, for t in [lo, hi] and m in [m_lo, m_hi]; |u| <= Q.
  safe_lo = xp.where(m_lo > 0, m_lo, 1.0)
  u_lo = xp.where(m_lo > 0, q * xp.minimum(lo / safe_lo, lo / m_hi), xp.where(lo >= 0, 0.0, -q))
  u_hi = xp.where(m_lo > 0, q * xp.maximum(hi / safe_lo, hi / m_hi), xp.where(hi <= 0, 0.0, q))
  u_lo = xp.maximum(u_lo - xp.abs(u_lo) * _REL, -q * (1 + _REL))
  u_hi = xp.minimum(u_hi + xp.abs(u_hi) * _REL, q * (1 + _REL))
  # Per zero point case: each entry's error in steps (1/2, or where it may saturate, how far past
  # the clip it reaches), whether the case pins its step, and that step's value k (v = k s).
  cases = [_zero_case(spec, u_lo + z, u_hi + z, z) for z in zeros]
  band, pinned, k = cases[0]
  if spec.zero_point is not None:
    band_two, pinned_two = xp.maximum(band, cases[1][0]), pinned & cases[1][1]
    band = xp.where(zero_known, band, xp.where(zero_two, band_two, 0.5 + zero_steps))
    band = xp.minimum(band, 0.5 + zero_steps) + (abs(spec.zero_point[0]) + q + spec.zero_point[1] + 1) * _REL
    pinned = xp.where(zero_known, pinned, zero_two & pinned_two)
  half = m_hi * ((band / q) * (1 + _REL) + _REL)
  guard_may_fire = _guard_may_fire(spec, m_lo)
  if spec.guard is not None and spec.guard[0] != "eq":
    # where the guard fires, q = 0 and the error is |t| <= m < Q cut
    half = xp.maximum(half, xp.minimum(m_hi, q * spec.guard[1] * (1 + _REL)))
  flat = pinned & (m_lo > 0) & ~guard_may_fire
  v_lo, v_hi = _step_values(k, m_lo, m_hi, q, xp)
  if spec.zero_point is not None:  # across the tie: both cases' values
    two_lo, two_hi = _step_values(cases[1][2], m_lo, m_hi, q, xp)
    v_lo = xp.where(zero_known, v_lo, xp.minimum(v_lo, two_lo))
    v_hi = xp.where(zero_known, v_hi, xp.maximum(v_hi, two_hi))
  shape = xp.shape(lo)
  return (xp.broadcast_to(half, shape), flat, xp.where(flat, v_lo, 0.0), xp.where(flat, v_hi, 0.0))


def _zero_case(spec: DynamicScale, u_lo, u_hi, zero):
  """``(band, pinned, k)`` for the quotient plus zero point ``x / s + z`` in ``[u_lo, u_hi]``:
  each entry's error in steps (1/2, or how far past a clip it reaches), whether the rounding and
  clip give it one integer ``c`` over the whole range, and ``k = c - z`` there (``v = k s``)."""
  xp = namespace(u_lo, u_hi)
  band = xp.maximum(0.5, xp.maximum(u_hi - spec.high, spec.low - u_lo))
  c = xp.clip(xp.round(u_lo), spec.low, spec.high)
  one_step = (u_lo > c - 0.5) & (u_hi < c + 0.5)  # strictly inside one step: no tie either way
  at_high = u_lo > spec.high - 0.5  # every value rounds to high or above, and saturates there
  at_low = u_hi < spec.low + 0.5
  c = xp.where(at_high, spec.high, xp.where(at_low, spec.low, c))
  return band, one_step | at_high | at_low, c - zero


def _step_values(k, m_lo, m_hi, q, xp):
  """Bounds of ``v = k m / Q`` for ``m`` in ``[m_lo, m_hi]``, widened by ``_REL``."""
  ends = (k * (m_lo / q) * (1 - _REL), k * (m_hi / q) * (1 + _REL))
  return xp.where(k >= 0, ends[0], ends[1]), xp.where(k >= 0, ends[1], ends[0])


def step_range(spec: DynamicScale, lo, hi, ndim: int, value):
  """The integers ``k`` a value ``v = k s`` in ``value = (lower, upper)`` may take for an input in
  ``[lo, hi]`` (``k = c - z`` with a zero point), with the scale's bounds: ``(k_lo, k_hi, s_lo,
  s_hi, known)``; ``known`` is False where the bounds say nothing (no positive scale, the guard may
  fire, an infinite end). float32's rounding of ``s`` and of ``k s`` is inside the slack."""
  value_lo, value_hi = value
  xp = namespace(lo, hi, value_lo, value_hi)
  axes = tuple(range(lo.ndim - ndim, lo.ndim)) if spec.axes is None else tuple(lo.ndim + a for a in spec.axes)
  q = spec.divisor
  m_lo, m_hi, _ = _span(spec, lo, hi, axes)
  guard_may_fire = _guard_may_fire(spec, m_lo)  # where it fires, v = 0 with another scale: no step to read
  # k = v / s with s in [m_lo, m_hi] / Q
  safe = xp.where(m_lo > 0, m_lo, 1.0)
  k_lo = xp.minimum(value_lo * q / safe, value_lo * q / m_hi)
  k_hi = xp.maximum(value_hi * q / safe, value_hi * q / m_hi)
  k_lo = xp.ceil(k_lo - xp.abs(k_lo) * 4 * _REL - _REL)
  k_hi = xp.floor(k_hi + xp.abs(k_hi) * 4 * _REL + _REL)
  known = (m_lo > 0) & ~guard_may_fire & xp.isfinite(k_lo) & xp.isfinite(k_hi)
  return k_lo, k_hi, m_lo / q, m_hi / q, known


def value_range(spec: DynamicScale, lo, hi, ndim: int, value):
  """Bounds on the node's value ``v`` on a sub-problem known to have ``v`` in ``value = (lower,
  upper)`` (a branch-and-bound piece split on it: :mod:`qbound.bounds.tiesplit`, or the NumPy
  search's tie splits, :mod:`qbound.bounds.host_ties`; NumPy or JAX arrays), input in
  ``[lo, hi]``: ``value`` itself, narrowed to one step's ``k [m_lo, m_hi] / Q`` where it admits a
  single integer ``k`` (``v = k s``, ``k = c - z`` with a zero point). Where it admits none, the
  result is empty (lower above upper by more than ``hi - lo``): no input of the piece gives such a
  value.
  """
  value_lo, value_hi = value
  xp = namespace(lo, hi, value_lo, value_hi)
  k_lo, k_hi, s_lo, s_hi, known = step_range(spec, lo, hi, ndim, value)
  ends = (k_lo * s_lo * (1 - _REL), k_lo * s_hi * (1 + _REL))
  step_lo = xp.where(k_lo >= 0, ends[0], ends[1])
  step_hi = xp.where(k_lo >= 0, ends[1], ends[0])
  one = known & (k_lo == k_hi)
  none = known & (k_lo > k_hi)
  out_lo = xp.where(one, xp.maximum(value_lo, step_lo), value_lo)
  out_hi = xp.where(one, xp.minimum(value_hi, step_hi), value_hi)
  # Empty, kept finite (an infinity would turn into NaN in the rows that read it): a lower end
  # above the upper one by more than the input's width, so the error's bounds cross as well.
  return xp.where(none, value_hi + 2 * (hi - lo) + 1, out_lo), out_hi
