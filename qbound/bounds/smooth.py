"""Linear relaxations of the S-shaped activations tanh and sigmoid, and of their differences.

Both are increasing, convex on ``(-inf, 0]`` and concave on ``[0, inf)``. Everything here rests on
two facts about such a ``phi`` over an interval ``[l, u]``:

* **Lines of any slope.** For a slope ``k`` the tightest lines are ``k x + min f`` and
  ``k x + max f`` with ``f(x) = phi(x) - k x``. ``f`` is convex left of 0 and concave right of
  it, so its maximum is at ``l`` or in the concave part, where ``f(x) <= f(p) + f'(p) (x - p)``
  for ANY point ``p`` of that part (a concave function lies below its tangents); its minimum
  likewise. The bound holds whichever ``p`` is used (a good one is where ``phi' = k``), so the
  offsets are proven for every slope, and the slopes can be chosen freely: CROWN's tangent and
  chord lines (Zhang, Weng, Chen, Hsieh, Daniel, "Efficient Neural Network Robustness
  Certification with General Activation Functions", NeurIPS 2018) by default, optimised ones
  (alpha-CROWN, Xu et al., ICLR 2021) on request.
* **Differences.** By the mean value theorem ``phi(z) - phi(zq) = s d`` with ``d = z - zq`` and
  ``s = phi'(xi)`` for a ``xi`` between ``z`` and ``zq``, so ``s`` lies in ``[s_min, s_max]``, the
  range of ``phi'`` over the hull of the ``z`` and ``zq`` intervals. The set of ``s d`` is bounded
  by lines in ``d`` (chords of ``max(s_min d, s_max d)`` and ``min(...)``), exactly 0 when ``d``
  is: the differential relaxation of ReluDiff and NeuroDiff (Paulsen et al., ICSE 2020 and
  ASE 2020), whose ReLU case is ``s`` in ``[0, 1]``.

Sound mode: ``tanh`` and ``logistic`` are evaluated in float with the error bound of
:func:`qbound.bounds.fp.transcendental_error` (a generous ulps margin: XLA's versions are not
correctly rounded), and every other float operation with its own rounding.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import choice, fp
from qbound.bounds.relax import DiffRelaxation, Relaxation


class _Shape(NamedTuple):
  """One S-shaped function: value, derivative from the value, where the derivative equals ``k``."""

  value: Callable
  deriv_of_value: Callable  # phi'(x) written in y = phi(x)
  point_of_slope: Callable  # the x >= 0 with phi'(x) = k (0 above the peak, inf at k <= 0)
  peak: float  # phi'(0), the largest slope
  low: float  # the range of phi is the open interval (low, high)
  high: float


def _tanh_point(k):
  return jnp.arctanh(jnp.sqrt(jnp.clip(1 - k, 0, 1)))


def _sigmoid_point(k):
  s = (1 + jnp.sqrt(jnp.clip(1 - 4 * k, 0, 1))) / 2
  return jnp.log(s) - jnp.log1p(-s)


SHAPES = {
    G.TANH: _Shape(jnp.tanh, lambda y: 1 - y * y, _tanh_point, 1.0, -1.0, 1.0),
    G.SIGMOID: _Shape(jax.nn.sigmoid, lambda y: y * (1 - y), _sigmoid_point, 0.25, 0.0, 1.0),
}


def _value(kind, x, sound):
  """``(phi(x), error bound)`` of the float evaluation."""
  y = SHAPES[kind].value(x)
  return y, (fp.transcendental_error(y) if sound else jnp.zeros_like(y))


def _deriv(kind, x, sound):
  """``(phi'(x), error bound)``: ``phi'`` from the computed value, ``|y| <= 1`` for both shapes."""
  y, e = _value(kind, x, sound)
  d = SHAPES[kind].deriv_of_value(y)
  if not sound:
    return d, jnp.zeros_like(d)
  u = fp.unit_roundoff(y.dtype)
  # |phi'(y') - phi'(y)| <= |y' - y| (|y| + |y'| or |1 - y - y'|) <= e (2 + e), plus two roundings.
  return d, e * (2 + e) + 4 * u + fp.tiny(y.dtype)


def interval(kind, lo, hi, *, sound: bool = True):
  """Bounds of ``phi(x)`` for ``x`` in ``[lo, hi]``: ``phi`` is increasing; its range is open."""
  shape = SHAPES[kind]
  yl, el = _value(kind, lo, sound)
  yu, eu = _value(kind, hi, sound)
  return jnp.maximum(yl - el, shape.low), jnp.minimum(yu + eu, shape.high)


# --- lines of a given slope ---------------------------------------------------------------------


def _f(kind, x, k, sound):
  """``f(x) = phi(x) - k x`` and its error bound."""
  y, e = _value(kind, x, sound)
  kx = k * x
  f = y - kx
  if not sound:
    return f, e
  u = fp.unit_roundoff(f.dtype)
  return f, e + 2 * u * (jnp.abs(kx) + jnp.abs(f)) + fp.tiny(f.dtype)


def _tangent_extreme(kind, a, b, p, k, upper: bool, sound: bool):
  """A bound on ``max`` (``upper``) or ``min`` of ``f`` over ``[a, b]``, where ``f`` is concave
  (``upper``) or convex: ``f(p) + f'(p) (x - p)`` at the better end, for ``p`` in ``[a, b]``."""
  p = jax.lax.stop_gradient(jnp.clip(p, a, b))
  fp_, ef = _f(kind, p, k, sound)
  dphi, ed = _deriv(kind, p, sound)
  g = dphi - k
  ends = (g * (a - p), g * (b - p))
  step = jnp.maximum(*ends) if upper else jnp.minimum(*ends)
  value = fp_ + step
  if not sound:
    return value
  u = fp.unit_roundoff(value.dtype)
  err = ef + (ed + 4 * u * jnp.abs(g)) * (b - a) * (1 + 4 * u) + 2 * u * (jnp.abs(value) + jnp.abs(step))
  err = err + fp.tiny(value.dtype)
  return value + err if upper else value - err


def offsets(kind, lo, hi, lower_slope, upper_slope, *, sound: bool = True):
  """Proven offsets ``(b_lo, b_up)`` with ``k_lo x + b_lo <= phi(x) <= k_up x + b_up`` on ``[lo, hi]``.

  Valid for ANY slopes (see the module docstring): the maximum of ``phi(x) - k x`` is at ``lo`` or
  in the concave part ``[max(lo, 0), hi]``, bounded there by a tangent at the point where
  ``phi' = k``; the minimum at ``hi`` or in the convex part ``[lo, min(hi, 0)]``.
  """
  shape = SHAPES[kind]
  zero = jnp.zeros_like(lo)
  # Maximum of phi(x) - k_up x.
  cands = []
  for x in (lo, hi):
    f, e = _f(kind, x, upper_slope, sound)
    cands.append(f + e)
  a, b = jnp.maximum(lo, 0), jnp.maximum(hi, 0)
  concave = _tangent_extreme(kind, a, b, shape.point_of_slope(upper_slope), upper_slope, True, sound)
  upper = jnp.maximum(jnp.maximum(*cands), jnp.where(hi > 0, concave, -jnp.inf))
  # Minimum of phi(x) - k_lo x.
  cands = []
  for x in (lo, hi):
    f, e = _f(kind, x, lower_slope, sound)
    cands.append(f - e)
  a, b = jnp.minimum(lo, zero), jnp.minimum(hi, 0)
  convex = _tangent_extreme(kind, a, b, -shape.point_of_slope(lower_slope), lower_slope, False, sound)
  lower = jnp.minimum(jnp.minimum(*cands), jnp.where(lo < 0, convex, jnp.inf))
  return lower, upper


# --- the default (CROWN) slopes and the range of useful slopes ------------------------------------


def slope_range(kind, lo, hi):
  """``(min, max)`` of ``phi'`` over ``[lo, hi]`` (as computed, no margin): the useful slopes."""
  deriv = lambda x: SHAPES[kind].deriv_of_value(SHAPES[kind].value(x))
  top = deriv(jnp.clip(0, lo, hi))
  bottom = jnp.minimum(deriv(lo), deriv(hi))
  return bottom, jnp.maximum(top, bottom)


def _upper_tangent_slope(kind, lo, hi, chord, steps: int = 24):
  """Slope of the tangent from ``(lo, phi(lo))`` touching ``phi`` at ``t`` in ``[0, hi]`` (``lo < 0``),
  or the chord where the touching point lies beyond ``hi``. Found by bisection on ``t``; any slope
  is sound (the offsets are proven for the slope used), so its accuracy only affects tightness."""
  shape = SHAPES[kind]
  deriv = lambda x: shape.deriv_of_value(shape.value(x))
  anchor = shape.value(lo)

  def gap(t):  # increasing in t on [0, inf): the tangent at t, evaluated at lo, minus phi(lo)
    return shape.value(t) + deriv(t) * (lo - t) - anchor

  def body(_, bracket):
    a, b = bracket
    mid = (a + b) / 2
    above = gap(mid) >= 0
    return jnp.where(above, a, mid), jnp.where(above, mid, b)

  hi_pos = jnp.maximum(hi, 0)
  _, t = jax.lax.fori_loop(0, steps, body, (jnp.zeros_like(lo), hi_pos))
  return jnp.where(gap(hi_pos) < 0, chord, deriv(t))


def default_slopes(kind, lo, hi):
  """CROWN's slopes ``(lower, upper)`` on ``[lo, hi]`` (Zhang et al. 2018, section 3.3).

  Convex part only (``hi <= 0``): the chord above, the tangent at the midpoint below; concave part
  only: the reverse; across 0: tangents through the far end's point (or chords where that
  tangent would touch outside the interval).
  """
  shape = SHAPES[kind]
  deriv = lambda x: shape.deriv_of_value(shape.value(x))
  width = hi - lo
  mid = (lo + hi) / 2
  narrow = width <= 1e-7 * (1 + jnp.abs(mid))
  chord = jnp.where(narrow, deriv(mid), (shape.value(hi) - shape.value(lo)) / jnp.where(narrow, 1, width))
  tangent = deriv(mid)
  up_cross = _upper_tangent_slope(kind, lo, hi, chord)
  # phi is point-symmetric about (0, phi(0)): the lower line on [lo, hi] mirrors the upper on [-hi, -lo].
  low_cross = _upper_tangent_slope(kind, -hi, -lo, chord)
  lower = jnp.where(hi <= 0, tangent, jnp.where(lo >= 0, chord, low_cross))
  upper = jnp.where(hi <= 0, chord, jnp.where(lo >= 0, tangent, up_cross))
  bottom, top = slope_range(kind, lo, hi)
  return jnp.clip(lower, bottom, top), jnp.clip(upper, bottom, top)


def _fraction(k, bottom, top):
  span = top - bottom
  return jnp.where(span > 0, (k - bottom) / jnp.where(span > 0, span, 1), 0.5)


def default_params(kind, lo, hi):
  """The default slopes as fractions of :func:`slope_range`, the parameters alpha optimises."""
  lower, upper = default_slopes(kind, lo, hi)
  bottom, top = slope_range(kind, lo, hi)
  return {"lower": _fraction(lower, bottom, top), "upper": _fraction(upper, bottom, top)}


def relaxation(kind, lo, hi, params=None, *, sound: bool = True) -> Relaxation:
  """Lines below and above ``phi`` on ``[lo, hi]`` (``phi`` = tanh or sigmoid, by ``kind``).

  Args:
    kind: ``"tanh"`` or ``"sigmoid"``.
    lo, hi: bounds of the input.
    params: optional ``{"lower", "upper"}`` in [0, 1]: the slopes as fractions of
      :func:`slope_range` (alpha-CROWN's parameters); CROWN's tangents and chords otherwise.
    sound: offsets proven despite float evaluation of ``phi``.

  Example:
    >>> import jax.numpy as jnp
    >>> from qbound.bounds import smooth
    >>> r = smooth.relaxation("tanh", jnp.array([-1.0]), jnp.array([2.0]))
    >>> x = jnp.linspace(-1, 2, 7)
    >>> bool(jnp.all((r.lower_slope * x + r.lower_offset <= jnp.tanh(x)) &
    ...              (jnp.tanh(x) <= r.upper_slope * x + r.upper_offset)))
    True
  """
  if params is None:
    lower, upper = jax.lax.stop_gradient(default_slopes(kind, lo, hi))
  else:
    bottom, top = jax.lax.stop_gradient(slope_range(kind, lo, hi))
    lower = bottom + jnp.clip(params["lower"], 0, 1) * (top - bottom)
    upper = bottom + jnp.clip(params["upper"], 0, 1) * (top - bottom)
  b_lo, b_up = offsets(kind, lo, hi, lower, upper, sound=sound)
  return Relaxation(lower, b_lo, upper, b_up)


def gap(r: Relaxation, lo, hi):
  """Largest vertical distance between a relaxation's two lines over ``[lo, hi]``."""
  at = lambda x: (r.upper_slope - r.lower_slope) * x + r.upper_offset - r.lower_offset
  return jnp.maximum(at(lo), at(hi))


# --- differences phi(z) - phi(zq) ---------------------------------------------------------------


def derivative_range(kind, lo, hi, *, sound: bool = True):
  """Proven ``(s_min, s_max)`` with ``s_min <= phi'(x) <= s_max`` on ``[lo, hi]``; ``s_min >= 0``."""
  shape = SHAPES[kind]
  top, e_top = _deriv(kind, jnp.clip(0, lo, hi), sound)
  dl, el = _deriv(kind, lo, sound)
  du, eu = _deriv(kind, hi, sound)
  bottom = jnp.minimum(dl - el, du - eu)
  return jnp.maximum(bottom, 0), jnp.minimum(top + e_top, shape.peak)


def mvt_lines(dl, du, s_min, s_max, lower_param=None, upper_param=None, *, sound: bool = True):
  """Lines in ``d`` around ``{s d : s in [s_min, s_max], d in [dl, du]}`` (any signs of ``s``).

  The set lies between the concave ``min(s_min d, s_max d)`` and the convex ``max(s_min d, s_max d)``;
  a line of slope ``a`` in ``[s_min, s_max]`` stays above the convex one with the larger of its
  gaps at the two ends, and below the concave one with the smaller. The chords are the default
  slopes; ``lower_param`` / ``upper_param`` in [0, 1] pick ``a = s_min + param (s_max - s_min)``.
  Returns ``(lower_slope, lower_offset, upper_slope, upper_offset)``.
  """
  def over(d):
    return jnp.maximum(s_min * d, s_max * d)

  def under(d):
    return jnp.minimum(s_min * d, s_max * d)

  width = du - dl
  flat = width <= 0
  safe = jnp.where(flat, 1, width)
  chord_up = jnp.where(flat, jnp.where(dl >= 0, s_max, s_min), (over(du) - over(dl)) / safe)
  chord_lo = jnp.where(flat, jnp.where(dl >= 0, s_min, s_max), (under(du) - under(dl)) / safe)
  span = s_max - s_min
  if upper_param is None:
    up_s = jnp.clip(chord_up, s_min, s_max)
  else:
    up_s = s_min + jnp.clip(upper_param, 0, 1) * span
  if lower_param is None:
    lo_s = jnp.clip(chord_lo, s_min, s_max)
  else:
    lo_s = s_min + jnp.clip(lower_param, 0, 1) * span
  up_o = jnp.maximum(over(dl) - up_s * dl, over(du) - up_s * du)
  lo_o = jnp.minimum(under(dl) - lo_s * dl, under(du) - lo_s * du)
  if sound:
    u = fp.unit_roundoff(dl.dtype)
    # max |s|: a decreasing curve's slopes are negative (qbound.bounds.nonlinear_diff).
    mag = 4 * u * jnp.maximum(jnp.abs(s_min), jnp.abs(s_max)) * (jnp.abs(dl) + jnp.abs(du)) + fp.tiny(dl.dtype)
    up_o, lo_o = up_o + mag, lo_o - mag
  return lo_s, lo_o, up_s, up_o


def default_diff_params(kind, zl, zu, ql, qu, dl, du):
  """Default parameters of :func:`diff_relaxation` (the chords), as fractions in [0, 1]."""
  s_min, s_max = derivative_range(kind, jnp.minimum(zl, ql), jnp.maximum(zu, qu), sound=False)
  lo_s, _, up_s, _ = mvt_lines(dl, du, s_min, s_max, sound=False)
  return {"d_lower": _fraction(lo_s, s_min, s_max), "d_upper": _fraction(up_s, s_min, s_max)}


def diff_relaxation(kind, zl, zu, ql, qu, dl, du, params=None, *, sound: bool = True) -> DiffRelaxation:
  """Linear bounds on ``phi(z) - phi(zq)`` in terms of ``d = z - zq`` and ``zq``.

  Per neuron, the tighter (by the largest gap between the lines) of two families:

  * the mean value theorem, :func:`mvt_lines` with ``s`` in :func:`derivative_range` over the hull
    of the ``z`` and ``zq`` intervals (what the differential bounds are for: small ``d``);
  * the two functions' own relaxations, written with ``z = zq + d``.

  Exactly 0 where ``d`` is exactly 0.

  Args:
    kind: ``"tanh"`` or ``"sigmoid"``.
    zl, zu, ql, qu, dl, du: bounds of ``z``, ``zq`` and ``d``.
    params: optional fractions ``d_lower``, ``d_upper`` in [0, 1] of the difference lines' slopes.
    sound: proven float margins.

  Example:
    >>> import jax.numpy as jnp
    >>> from qbound.bounds import smooth
    >>> z, zq = jnp.array([0.30, 0.31]), jnp.array([0.29, 0.30])     # z - zq = 0.01
    >>> one = lambda v: jnp.array([v])
    >>> r = smooth.diff_relaxation("tanh", one(0.2), one(0.4), one(0.2), one(0.4), one(0.0), one(0.02))
    >>> h = jnp.tanh(z) - jnp.tanh(zq)
    >>> d = z - zq
    >>> bool(jnp.all((r.lower_d * d + r.lower_r <= h) & (h <= r.upper_d * d + r.upper_r)))
    True
  """
  params = params or {}
  s_min, s_max = derivative_range(kind, jnp.minimum(zl, ql), jnp.maximum(zu, qu), sound=sound)
  lo_s, lo_o, up_s, up_o = mvt_lines(dl, du, s_min, s_max, params.get("d_lower"), params.get("d_upper"),
                                     sound=sound)
  zero = jnp.zeros_like(lo_o)
  lo_s, up_s = jnp.broadcast_to(lo_s, lo_o.shape), jnp.broadcast_to(up_s, up_o.shape)
  mvt = DiffRelaxation(lo_s, zero, lo_o, up_s, zero, up_o)
  rz = relaxation(kind, zl, zu, sound=sound)
  rq = relaxation(kind, ql, qu, sound=sound)
  # phi(z) - phi(zq) >= (lower line of phi(z)) - (upper line of phi(zq)), with z = zq + d.
  pair = DiffRelaxation(
      lower_d=rz.lower_slope, lower_q=rz.lower_slope - rq.upper_slope, lower_r=rz.lower_offset - rq.upper_offset,
      upper_d=rz.upper_slope, upper_q=rz.upper_slope - rq.lower_slope, upper_r=rz.upper_offset - rq.lower_offset)
  if sound:  # slopes and offsets subtracted in float: widen by those roundings times |zq|
    u = fp.unit_roundoff(zl.dtype)
    qmag = jnp.maximum(jnp.abs(ql), jnp.abs(qu))
    pair = pair._replace(
        lower_r=pair.lower_r - 2 * u * (jnp.abs(rz.lower_offset) + jnp.abs(rq.upper_offset)
                                        + jnp.abs(pair.lower_q) * qmag) - fp.tiny(zl.dtype),
        upper_r=pair.upper_r + 2 * u * (jnp.abs(rz.upper_offset) + jnp.abs(rq.lower_offset)
                                        + jnp.abs(pair.upper_q) * qmag) + fp.tiny(zl.dtype))
  gap_mvt = jnp.maximum((up_s - lo_s) * dl, (up_s - lo_s) * du) + up_o - lo_o
  gap_pair = gap(rz, zl, zu) + gap(rq, ql, qu)
  exact = (dl == 0) & (du == 0)
  out = choice.least_gap((mvt, pair), (gap_mvt, jnp.where(exact, jnp.inf, gap_pair)))
  return DiffRelaxation(*[jnp.where(exact, 0, v).astype(dl.dtype) for v in out])


def diff_interval(kind, z, zq, d, *, sound: bool = True):
  """Interval bounds of ``phi(z) - phi(zq)``: ``s d`` with ``s`` in the derivative range, intersected
  with ``phi([z]) - phi([zq])``; exactly ``[0, 0]`` where ``d`` is."""
  (zl, zu), (ql, qu), (dl, du) = z, zq, d
  s_min, s_max = derivative_range(kind, jnp.minimum(zl, ql), jnp.maximum(zu, qu), sound=sound)
  lo = jnp.where(dl < 0, s_max * dl, s_min * dl)
  hi = jnp.where(du > 0, s_max * du, s_min * du)
  fzl, fzu = interval(kind, zl, zu, sound=sound)
  fql, fqu = interval(kind, ql, qu, sound=sound)
  lo2, hi2 = fzl - fqu, fzu - fql
  if sound:
    lo = jnp.where(dl == 0, 0, fp.round_down(lo))
    hi = jnp.where(du == 0, 0, fp.round_up(hi))
    lo2, hi2 = fp.round_down(lo2), fp.round_up(hi2)
  return jnp.maximum(lo, lo2).astype(dl.dtype), jnp.minimum(hi, hi2).astype(dl.dtype)
