"""Interval bounds and linear relaxations of products and smooth functions (transformer layers).

Two families of node (:data:`qbound.graph.NONLINEAR`):

* **Products** ``z = x * y`` of two input-dependent values (attention's ``q k^T`` and
  ``softmax(..) v``, layer norm's ``(x - mean) * rsqrt(var)``, gating). For ANY slopes ``a, b``,
  ``h(x, y) = x y - a x - b y`` is bilinear, so its extremes over the box ``[xl, xu] x [yl, yu]``
  are at the four vertices: ``a x + b y + min_v h <= x y <= a x + b y + max_v h``. McCormick's
  envelopes (McCormick, Math. Programming 1976) and the planes of CROWN for transformers (Shi,
  Zhang, Chang, Huang, Hsieh, "Robustness Verification for Transformers", ICLR 2020; auto_LiRPA,
  Xu et al., NeurIPS 2020) are such planes; qbound uses the slopes through the box's centre
  (``a = (yl + yu) / 2``, ``b = (xl + xu) / 2``), whose two planes are each at most ``rx ry``
  from ``x y`` (``rx``, ``ry`` the half-widths), where a McCormick plane can be ``4 rx ry`` away.
* **Curves** ``y = f(x)`` (:data:`CURVES`): ``exp``, ``x^2``, ``1/x``, ``1/sqrt(x)``, ``sqrt``,
  ``erfc``, SiLU and GELU (tanh form, :mod:`qbound.bounds.gelu`). Each is convex or concave
  between known inflection points. For a slope ``k``,
  ``g(x) = f(x) - k x`` has the same curvature, so on a convex piece ``[a, b]`` its maximum is at
  ``a`` or ``b`` and its minimum is above the tangent at any point ``p`` of the piece (a convex
  function lies above its tangents); concave pieces the reverse. The lines ``k x + min g`` and
  ``k x + max g`` hence hold for every slope, proven piece by piece as in
  :mod:`qbound.bounds.smooth`; the slopes are CROWN's (Zhang, Weng, Chen, Hsieh, Daniel, NeurIPS
  2018): chord above and tangent at the midpoint below on a convex interval, the reverse on a
  concave one, and the chord for both where the interval crosses an inflection (SiLU).

Sound mode: every function is evaluated in float with an error bound measured against float64
(jax 0.10.2, CPU, several million points; see the error models in :data:`CURVES`), and every other
float operation with its own rounding. Domains: ``1/x`` whose input's bounds contain 0, and
``rsqrt`` / ``sqrt`` of a possibly negative (for rsqrt: non-positive) input get the whole real
line as bounds (never a wrong one), and :func:`check_domains` raises a clear error naming the layer.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound.bounds import fp
from qbound.bounds.gelu import (GELU_ARGMIN, GELU_INFLECTION, GELU_MIN, gelu, gelu_deriv, gelu_deriv_error,
                                 gelu_value_error)
from qbound.bounds.relax import Relaxation
from qbound.errors import UnboundedLayerError, UnsupportedLayerError

_U32 = 2.0 ** -24


def _u(x):
  return fp.unit_roundoff(jnp.result_type(x))


def _tiny(x):
  return fp.tiny(jnp.result_type(x))


class Curve(NamedTuple):
  """A smooth function of one value and what its bounds need.

  Attributes:
    value: ``f(x)`` as computed in float.
    value_error: ``(x, y) -> e`` with ``|y - f(x)| <= e`` for the computed ``y``.
    deriv: ``f'(x)`` as computed.
    deriv_error: ``(x, d) -> e`` likewise.
    inflections: the points where the curvature changes, increasing.
    convex: per piece between inflections (``len(inflections) + 1``), whether ``f`` is convex there.
    monotone: +1 increasing, -1 decreasing (on each side of a pole), 0 neither (then ``f`` falls
      up to ``argmin`` and rises after it).
    argmin, min_value: for ``monotone == 0``: the minimiser and a proven lower bound of the minimum.
    low, high: a proven range of ``f`` over its domain.
    domain: ``"all"``, ``"nonzero"``, ``"positive"`` or ``"nonnegative"``.
    deriv_floor: tangent points are taken at least this far right (sqrt's slope is infinite at 0).
  """

  value: Callable
  value_error: Callable
  deriv: Callable
  deriv_error: Callable
  inflections: tuple
  convex: tuple
  monotone: int
  argmin: float = 0.0
  min_value: float = 0.0
  low: float = -math.inf
  high: float = math.inf
  domain: str = "all"
  deriv_floor: float = -math.inf


def _bisect(fn, lo, hi, steps: int = 60):
  """A root of the increasing float64 function ``fn`` in ``[lo, hi]`` (host side, at import)."""
  for _ in range(steps):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if fn(mid) < 0 else (lo, mid)
  return (lo + hi) / 2


def _sig64(x):
  return 1 / (1 + math.exp(-x))


# SiLU: f'' = s'(x) (2 + x (1 - 2 s(x))) vanishes at +-2.3994 (convex between, concave outside);
# f' = s (1 + x (1 - s)) vanishes at -1.2785, the minimum -0.27846.
_SILU_INFLECTION = _bisect(lambda x: -(2 + x * (1 - 2 * _sig64(x))), 1.0, 4.0)
_SILU_ARGMIN = _bisect(lambda x: 1 + x * (1 - _sig64(x)), -3.0, 0.0)
_SILU_MIN = _SILU_ARGMIN * _sig64(_SILU_ARGMIN) - 1e-9  # float64 value to ~1e-16, rounded down generously


def _relative(c):
  """The error model ``c u |y| + c tiny``."""
  return lambda x, y: c * (_u(y) * jnp.abs(y) + _tiny(y))


def _silu(x):
  return x * jax.nn.sigmoid(x)


def _silu_deriv(x):
  s = jax.nn.sigmoid(x)
  return s + x * s * (1 - s)


def _erfc_deriv(x):
  return (-2 / math.sqrt(math.pi)) * jnp.exp(-x * x)


# Error models (measured maxima against float64 on 2-4 million float32 points, jax 0.10.2 CPU):
# exp 4.7 ulps, rsqrt 1.2, sqrt and 1/x 1.0 (correctly rounded), erfc 67 ulps relative in its tail
# and 2.7 u absolute, GELU 2.5 u (|x| + |y|) (relative error is unbounded in its left tail, where
# 1 + tanh cancels). The models below are 4-60 times those; derivatives computed from several
# operations get a sum of their parts' errors.
CURVES: dict[str, Curve] = {
    G.SQUARE: Curve(jnp.square, _relative(2), lambda x: 2 * x, lambda x, d: _tiny(d) * jnp.ones_like(d),
                    (), (True,), 0, argmin=0.0, min_value=0.0, low=0.0),
    G.EXP: Curve(jnp.exp, _relative(fp.TRANSCENDENTAL_ULPS), jnp.exp, _relative(fp.TRANSCENDENTAL_ULPS),
                 (), (True,), 1, low=0.0),
    G.RECIPROCAL: Curve(lambda x: 1 / x, _relative(4), lambda x: -1 / (x * x), _relative(16),
                        (0.0,), (False, True), -1, domain="nonzero"),
    G.RSQRT: Curve(jax.lax.rsqrt, _relative(fp.TRANSCENDENTAL_ULPS), lambda x: -0.5 * jax.lax.rsqrt(x) ** 3,
                   _relative(4 * fp.TRANSCENDENTAL_ULPS), (), (True,), -1, low=0.0, domain="positive"),
    # sqrt: a subnormal input is flushed to 0 on CPU, so sqrt(x) may be returned as 0 for x up
    # to the smallest normal number: up to sqrt(tiny) off.
    G.SQRT: Curve(jnp.sqrt, lambda x, y: _relative(4)(x, y) + 2 * math.sqrt(fp.tiny(jnp.result_type(y))), lambda x: 0.5 / jnp.sqrt(x), _relative(16), (), (False,), 1,
                  low=0.0, domain="nonnegative", deriv_floor=1e-30),
    G.ERFC: Curve(jax.lax.erfc, lambda x, y: 256 * _u(y) * jnp.abs(y) + 16 * _u(y) + 64 * _tiny(y), _erfc_deriv,
                  lambda x, d: (128 + 2 * x * x) * _u(d) * jnp.abs(d) + 64 * _tiny(d),
                  (0.0,), (False, True), -1, low=0.0, high=2.0),
    G.SILU: Curve(_silu, _relative(2 * fp.TRANSCENDENTAL_ULPS), _silu_deriv,
                  lambda x, d: 8 * fp.TRANSCENDENTAL_ULPS * _u(d) * (1 + jnp.abs(x)) + 64 * _tiny(d),
                  (-_SILU_INFLECTION, _SILU_INFLECTION), (False, True, False), 0,
                  argmin=_SILU_ARGMIN, min_value=_SILU_MIN, low=_SILU_MIN),
    G.GELU: Curve(gelu, gelu_value_error, gelu_deriv, gelu_deriv_error, (-GELU_INFLECTION, GELU_INFLECTION),
                  (False, True, False), 0, argmin=GELU_ARGMIN, min_value=GELU_MIN, low=GELU_MIN),
}


def invalid(kind: str, lo, hi):
  """Where ``[lo, hi]`` leaves the function's domain (its bounds are then the whole real line)."""
  domain = CURVES[kind].domain if kind in CURVES else "all"
  if domain == "nonzero":
    return (lo <= 0) & (hi >= 0)
  if domain == "positive":
    return lo <= 0
  if domain == "nonnegative":
    return lo < 0
  return jnp.zeros(jnp.shape(lo), bool)


def _eval(curve: Curve, x, sound: bool):
  y = curve.value(x)
  return y, (curve.value_error(x, y) if sound else jnp.zeros_like(y))


# --- interval bounds ------------------------------------------------------------------------------


def curve_interval(kind: str, lo, hi, *, sound: bool = True):
  """Bounds of ``f(x)`` for ``x`` in ``[lo, hi]`` (the real line where :func:`invalid`)."""
  curve = CURVES[kind]
  bad = invalid(kind, lo, hi)
  safe_lo, safe_hi = jnp.where(bad, 1, lo), jnp.where(bad, 1, hi)
  yl, el = _eval(curve, safe_lo, sound)
  yu, eu = _eval(curve, safe_hi, sound)
  if curve.monotone > 0:
    out_lo, out_hi = yl - el, yu + eu
  elif curve.monotone < 0:
    out_lo, out_hi = yu - eu, yl + el
  else:
    inside = (safe_lo < curve.argmin) & (safe_hi > curve.argmin)
    out_lo = jnp.where(inside, curve.min_value, jnp.minimum(yl - el, yu - eu))
    out_hi = jnp.maximum(yl + el, yu + eu)
  if sound:
    out_lo, out_hi = fp.round_down(out_lo), fp.round_up(out_hi)
  out_lo, out_hi = jnp.maximum(out_lo, curve.low), jnp.minimum(out_hi, curve.high)
  return jnp.where(bad, -jnp.inf, out_lo).astype(lo.dtype), jnp.where(bad, jnp.inf, out_hi).astype(lo.dtype)


def product_interval(x, y, *, sound: bool = True):
  """Bounds of ``x * y`` over the box of ``x = (lower, upper)`` and ``y``: the vertices' extremes."""
  (xl, xu), (yl, yu) = x, y
  corners = [_times(a, b) for a in (xl, xu) for b in (yl, yu)]
  lo = jnp.minimum(jnp.minimum(corners[0], corners[1]), jnp.minimum(corners[2], corners[3]))
  hi = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
  if sound:
    # A subnormal end is flushed to 0 on CPU before it is multiplied: up to tiny times the other factor.
    flushed = _tiny(xl) * (jnp.maximum(jnp.abs(xl), jnp.abs(xu)) + jnp.maximum(jnp.abs(yl), jnp.abs(yu)))
    lo, hi = fp.round_down(lo - flushed), fp.round_up(hi + flushed)
  return lo, hi


def _times(a, b):
  """``a * b`` with ``0 * inf = 0`` (a zero-width factor times an unbounded one is still 0)."""
  return jnp.where((a == 0) | (b == 0), 0, a * b)


def node_interval(node: G.Node, bounds, sound: bool):
  """Interval bounds of a :data:`~qbound.graph.NONLINEAR` node from its inputs' bounds."""
  if node.kind == G.MUL:
    return product_interval(bounds[node.inputs[0]], bounds[node.inputs[1]], sound=sound)
  return curve_interval(node.kind, *bounds[node.inputs[0]], sound=sound)


# --- lines of given slopes ------------------------------------------------------------------------


def _g(curve: Curve, x, k, sound: bool):
  """``g(x) = f(x) - k x`` and its error bound."""
  y, e = _eval(curve, x, sound)
  kx = k * x
  g = y - kx
  if not sound:
    return g, e
  return g, e + 2 * _u(g) * (jnp.abs(kx) + jnp.abs(g)) + _tiny(g)


def _slope_point(curve: Curve, a, b, k, convex: bool, steps: int = 30):
  """A point of ``[a, b]`` near where ``f' = k`` (``f'`` is increasing on a convex piece,
  decreasing on a concave one). Any point gives a proven bound; a good one a tight bound."""
  def body(_, bracket):
    lo, hi = bracket
    mid = (lo + hi) / 2
    right = (curve.deriv(jnp.maximum(mid, curve.deriv_floor)) < k) == convex
    return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

  lo, hi = jax.lax.fori_loop(0, steps, body, (a, b))
  return jnp.maximum((lo + hi) / 2, curve.deriv_floor)


def _tangent_bound(curve: Curve, a, b, k, convex: bool, sound: bool):
  """On a piece ``[a, b]`` where ``g = f - k x`` is convex: a lower bound of ``min g`` (concave: an
  upper bound of ``max g``) from the tangent at a point ``p`` of the piece."""
  p = jax.lax.stop_gradient(_slope_point(curve, a, b, k, convex))
  gp, eg = _g(curve, p, k, sound)
  d = curve.deriv(p)
  g1 = d - k
  ends = (g1 * (a - p), g1 * (b - p))
  step = jnp.minimum(*ends) if convex else jnp.maximum(*ends)
  value = gp + step
  if not sound:
    return value
  u = _u(value)
  reach = jnp.maximum(jnp.abs(a - p), jnp.abs(b - p)) * (1 + 4 * u)
  err = eg + (curve.deriv_error(p, d) + 4 * u * jnp.abs(g1)) * reach + 2 * u * (jnp.abs(value) + jnp.abs(step))
  err = err + _tiny(value)
  return value - err if convex else value + err


def curve_offsets(kind: str, lo, hi, lower_slope, upper_slope, *, sound: bool = True):
  """Proven ``(b_lo, b_up)`` with ``k_lo x + b_lo <= f(x) <= k_up x + b_up`` on ``[lo, hi]``, for
  ANY slopes, piece by piece between the inflection points (see the module docstring)."""
  curve = CURVES[kind]
  cuts = (-jnp.inf, *curve.inflections, jnp.inf)
  upper, lower = -jnp.inf, jnp.inf
  for r, convex in enumerate(curve.convex):
    present = (hi >= cuts[r]) & (lo <= cuts[r + 1])
    a, b = jnp.clip(cuts[r], lo, hi), jnp.clip(cuts[r + 1], lo, hi)
    # The ends bound the maximum of a convex piece (minimum of a concave one).
    if convex:
      ends = [_g(curve, x, upper_slope, sound) for x in (a, b)]
      top = jnp.maximum(ends[0][0] + ends[0][1], ends[1][0] + ends[1][1])
      bottom = _tangent_bound(curve, a, b, lower_slope, True, sound)
    else:
      ends = [_g(curve, x, lower_slope, sound) for x in (a, b)]
      bottom = jnp.minimum(ends[0][0] - ends[0][1], ends[1][0] - ends[1][1])
      top = _tangent_bound(curve, a, b, upper_slope, False, sound)
    upper = jnp.maximum(upper, jnp.where(present, top, -jnp.inf))
    lower = jnp.minimum(lower, jnp.where(present, bottom, jnp.inf))
  return lower, upper


def default_slopes(kind: str, lo, hi):
  """CROWN's slopes ``(lower, upper)``: chord and midpoint tangent by curvature, chords across an
  inflection point."""
  curve = CURVES[kind]
  mid = (lo + hi) / 2
  width = hi - lo
  narrow = width <= 1e-6 * (1 + jnp.abs(mid))
  tangent = curve.deriv(jnp.maximum(mid, curve.deriv_floor))
  chord = jnp.where(narrow, tangent, (curve.value(hi) - curve.value(lo)) / jnp.where(narrow, 1, width))
  cuts = (-jnp.inf, *curve.inflections, jnp.inf)
  convex_only = concave_only = jnp.ones(jnp.shape(lo), bool)
  for r, convex in enumerate(curve.convex):
    present = (hi > cuts[r]) & (lo < cuts[r + 1])
    if convex:
      concave_only = concave_only & ~present
    else:
      convex_only = convex_only & ~present
  lower = jnp.where(convex_only, tangent, chord)
  upper = jnp.where(concave_only, tangent, chord)
  return lower, upper


def slope_range(kind: str, lo, hi):
  """A range ``(k_min, k_max)`` of slopes worth trying on ``[lo, hi]``: the derivative at both ends
  and CROWN's slopes (:func:`default_slopes`). Any slope gives proven lines (:func:`curve_offsets`);
  optimised slopes (:mod:`qbound.bounds.alpha`) move within this range."""
  curve = CURVES[kind]
  ends = [curve.deriv(jnp.maximum(x, curve.deriv_floor)) for x in (lo, hi)]
  lower, upper = default_slopes(kind, lo, hi)
  k_min = jnp.minimum(jnp.minimum(ends[0], ends[1]), jnp.minimum(lower, upper))
  k_max = jnp.maximum(jnp.maximum(ends[0], ends[1]), jnp.maximum(lower, upper))
  return k_min, k_max


def default_fractions(kind: str, lo, hi):
  """CROWN's slopes as fractions of :func:`slope_range`: ``{"lower", "upper"}`` in [0, 1], the
  starting point of optimised slopes."""
  bad = invalid(kind, lo, hi)
  lo, hi = jnp.where(bad, 1, lo), jnp.where(bad, 1, hi)
  k_min, k_max = slope_range(kind, lo, hi)
  lower, upper = default_slopes(kind, lo, hi)
  span = k_max - k_min
  ok = jnp.isfinite(span) & (span > 0)
  frac = lambda k: jnp.where(ok, jnp.clip((k - k_min) / jnp.where(ok, span, 1), 0, 1), 0.5)
  return {"lower": frac(lower).astype(lo.dtype), "upper": frac(upper).astype(lo.dtype)}


def curve_relaxation(kind: str, lo, hi, *, sound: bool = True, fractions=None) -> Relaxation:
  """Lines below and above ``f`` on ``[lo, hi]`` (horizontal lines at the interval bounds where
  the slopes or offsets overflow, and at the whole real line outside the domain).

  ``fractions``: optional ``{"lower", "upper"}`` in [0, 1] (any leading axes, e.g. one set per
  backward row): the slopes ``k_min + fraction (k_max - k_min)`` of :func:`slope_range` instead of
  CROWN's. Every slope gives proven lines, so these can be optimised (alpha-CROWN, Xu et al.,
  ICLR 2021, applied to curves as in Shi et al., ICLR 2020).

  Example:
    >>> import jax.numpy as jnp
    >>> from qbound.bounds import nonlinear
    >>> r = nonlinear.curve_relaxation("exp", jnp.array([-1.0]), jnp.array([2.0]))
    >>> x = jnp.linspace(-1, 2, 7)
    >>> bool(jnp.all((r.lower_slope * x + r.lower_offset <= jnp.exp(x)) &
    ...              (jnp.exp(x) <= r.upper_slope * x + r.upper_offset)))
    True
  """
  bad = invalid(kind, lo, hi)
  safe_lo, safe_hi = jnp.where(bad, 1, lo), jnp.where(bad, 1, hi)
  if fractions is None:
    lower_slope, upper_slope = jax.lax.stop_gradient(default_slopes(kind, safe_lo, safe_hi))
  else:
    k_min, k_max = jax.lax.stop_gradient(slope_range(kind, safe_lo, safe_hi))
    span = jnp.where(jnp.isfinite(k_max - k_min), k_max - k_min, 0)
    lower_slope = k_min + fractions["lower"] * span
    upper_slope = k_min + fractions["upper"] * span
    shape = jnp.shape(lower_slope)  # the fractions' leading axes (one set per row)
    lo, hi, bad = (jnp.broadcast_to(v, shape) for v in (lo, hi, bad))
    safe_lo, safe_hi = jnp.broadcast_to(safe_lo, shape), jnp.broadcast_to(safe_hi, shape)
  b_lo, b_up = curve_offsets(kind, safe_lo, safe_hi, lower_slope, upper_slope, sound=sound)
  box_lo, box_hi = curve_interval(kind, lo, hi, sound=sound)
  flat_lo = ~(jnp.isfinite(lower_slope) & jnp.isfinite(b_lo)) | bad
  flat_up = ~(jnp.isfinite(upper_slope) & jnp.isfinite(b_up)) | bad
  dtype = lo.dtype
  return Relaxation(jnp.where(flat_lo, 0, lower_slope).astype(dtype), jnp.where(flat_lo, box_lo, b_lo).astype(dtype),
                    jnp.where(flat_up, 0, upper_slope).astype(dtype), jnp.where(flat_up, box_hi, b_up).astype(dtype))


class ProductRelaxation(NamedTuple):
  """``x_slope x + y_slope y + lower_offset <= x y <= x_slope x + y_slope y + upper_offset``."""

  x_slope: jnp.ndarray
  y_slope: jnp.ndarray
  lower_offset: jnp.ndarray
  upper_offset: jnp.ndarray


def product_offsets(x, y, a, b, *, sound: bool = True):
  """Proven ``(low, high)`` with ``a x + b y + low <= x y <= a x + b y + high`` on the box, for ANY
  slopes ``a``, ``b``: the extremes of the bilinear ``x y - a x - b y`` over the four vertices
  (``+-inf`` where a bound is not finite)."""
  (xl, xu), (yl, yu) = x, y
  low, high = jnp.inf, -jnp.inf
  for xv in (xl, xu):
    for yv in (yl, yu):
      xy, ax, by = _times(xv, yv), _times(a, xv), _times(b, yv)
      h = xy - ax - by
      # Three products and two differences, and subnormal factors flushed to 0 (tiny times the other).
      err = (4 * _u(h) * (jnp.abs(xy) + jnp.abs(ax) + jnp.abs(by))
             + _tiny(h) * (4 + 2 * (jnp.abs(xv) + jnp.abs(yv) + jnp.abs(a) + jnp.abs(b)))) if sound else 0
      low, high = jnp.minimum(low, h - err), jnp.maximum(high, h + err)
  return low, high


class ProductPlanes(NamedTuple):
  """``x_lower x + y_lower y + lower_offset <= x y <= x_upper x + y_upper y + upper_offset``."""

  x_lower: jnp.ndarray
  y_lower: jnp.ndarray
  lower_offset: jnp.ndarray
  x_upper: jnp.ndarray
  y_upper: jnp.ndarray
  upper_offset: jnp.ndarray


def product_planes(x, y, fractions, *, sound: bool = True) -> ProductPlanes:
  """A plane below and one above ``x * y``, with slopes ``a = yl + s (yu - yl)``, ``b = xl + t
  (xu - xl)`` from ``fractions = {"a_lower", "b_lower", "a_upper", "b_upper"}`` in [0, 1] (any
  leading axes). 0 and 1 give McCormick's planes (Math. Programming 1976), 1/2 the planes through
  the centre of :func:`product_relaxation`; every choice is proven, so they can be optimised
  (alpha-CROWN, Xu et al., ICLR 2021; the plane choice of Shi et al., ICLR 2020)."""
  (xl, xu), (yl, yu) = x, y
  finite = jnp.isfinite(xl) & jnp.isfinite(xu) & jnp.isfinite(yl) & jnp.isfinite(yu)
  slope = lambda lo, hi, f: jnp.where(finite, lo + f * jnp.where(finite, hi - lo, 0), 0)
  a_l, b_l = slope(yl, yu, fractions["a_lower"]), slope(xl, xu, fractions["b_lower"])
  a_u, b_u = slope(yl, yu, fractions["a_upper"]), slope(xl, xu, fractions["b_upper"])
  low, _ = product_offsets(x, y, a_l, b_l, sound=sound)
  _, high = product_offsets(x, y, a_u, b_u, sound=sound)
  box_lo, box_hi = product_interval(x, y, sound=sound)
  low, high = jnp.where(finite, low, box_lo), jnp.where(finite, high, box_hi)
  dtype = xl.dtype
  return ProductPlanes(a_l.astype(dtype), b_l.astype(dtype), low.astype(dtype), a_u.astype(dtype),
                       b_u.astype(dtype), high.astype(dtype))


def default_product_fractions(x):
  """The centre planes of :func:`product_relaxation` as :func:`product_planes`' fractions."""
  half = jnp.full(jnp.shape(x[0]), 0.5, x[0].dtype)
  return {"a_lower": half, "b_lower": half, "a_upper": half, "b_upper": half}


def product_relaxation(x, y, *, sound: bool = True) -> ProductRelaxation:
  """Planes below and above ``x * y`` over the box ``x = (xl, xu)``, ``y = (yl, yu)``.

  The slopes go through the box's centre; the offsets are the extremes of the bilinear
  ``x y - a x - b y`` over the four vertices, proven for the float slopes used.

  Example:
    >>> import jax.numpy as jnp
    >>> from qbound.bounds import nonlinear
    >>> one = lambda v: jnp.array([v])
    >>> r = nonlinear.product_relaxation((one(-1.0), one(2.0)), (one(0.5), one(1.5)))
    >>> xs, ys = jnp.meshgrid(jnp.linspace(-1, 2, 5), jnp.linspace(0.5, 1.5, 5))
    >>> plane = r.x_slope * xs + r.y_slope * ys
    >>> bool(jnp.all((plane + r.lower_offset <= xs * ys) & (xs * ys <= plane + r.upper_offset)))
    True
  """
  (xl, xu), (yl, yu) = x, y
  finite = jnp.isfinite(xl) & jnp.isfinite(xu) & jnp.isfinite(yl) & jnp.isfinite(yu)
  a = jnp.where(finite, (yl + yu) / 2, 0)
  b = jnp.where(finite, (xl + xu) / 2, 0)
  low, high = product_offsets(x, y, a, b, sound=sound)
  box_lo, box_hi = product_interval(x, y, sound=sound)
  low, high = jnp.where(finite, low, box_lo), jnp.where(finite, high, box_hi)
  dtype = xl.dtype
  return ProductRelaxation(a.astype(dtype), b.astype(dtype), low.astype(dtype), high.astype(dtype))


# --- one node of CROWN's backward pass ------------------------------------------------------------


def _row_sum(x):
  return fp.pairwise_sum(x)


def _magnitude(bounds):
  lo, hi = bounds
  return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _offset_sum(lam, lower_offset, upper_offset):
  """``sum(pos * lower_offset + neg * upper_offset)`` per row, with ``0 * inf = 0``."""
  pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
  return _row_sum(_times(pos, lower_offset) + _times(neg, upper_offset))


def backward_rule(node: G.Node, lam, src_bounds, sound: bool, alpha=None):
  """CROWN through a :data:`~qbound.graph.NONLINEAR` node: coefficients passed to each input, and
  the constant and rounding margin per row (as :func:`qbound.bounds.crown._backward_rule`).

  ``alpha``: optional optimised slopes, one set per row: :func:`product_planes`' fractions for a
  product, :func:`curve_relaxation`'s for a curve."""
  dtype = lam.dtype
  u = fp.unit_roundoff(dtype)
  n_terms = fp.pairwise_terms(node.size)
  if node.kind == G.MUL and alpha is not None:
    r = product_planes(src_bounds[0], src_bounds[1], alpha, sound=sound)
    pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
    parts = (pos * r.x_lower + neg * r.x_upper, pos * r.y_lower + neg * r.y_upper)
    beta = _offset_sum(lam, r.lower_offset, r.upper_offset)
    if not sound:
      return parts, beta, jnp.zeros(lam.shape[0], dtype)
    x_slope = jnp.maximum(jnp.abs(r.x_lower), jnp.abs(r.x_upper))
    y_slope = jnp.maximum(jnp.abs(r.y_lower), jnp.abs(r.y_upper))
    offset = jnp.maximum(jnp.abs(r.lower_offset), jnp.abs(r.upper_offset))
    spread = (u * fp.SLACK * (x_slope * _magnitude(src_bounds[0]) + y_slope * _magnitude(src_bounds[1]))
              + fp.margin_coefficient(n_terms, dtype) * offset)
    return parts, beta, _row_sum(_times(jnp.abs(lam), spread)) + fp.margin_floor(n_terms, dtype)
  if node.kind == G.MUL:
    r = product_relaxation(src_bounds[0], src_bounds[1], sound=sound)
    parts = (lam * r.x_slope, lam * r.y_slope)
    beta = _offset_sum(lam, r.lower_offset, r.upper_offset)
    if not sound:
      return parts, beta, jnp.zeros(lam.shape[0], dtype)
    offset = jnp.maximum(jnp.abs(r.lower_offset), jnp.abs(r.upper_offset))
    spread = (u * fp.SLACK * (jnp.abs(r.x_slope) * _magnitude(src_bounds[0]) + jnp.abs(r.y_slope)
                              * _magnitude(src_bounds[1])) + fp.margin_coefficient(n_terms, dtype) * offset)
    return parts, beta, _row_sum(_times(jnp.abs(lam), spread)) + fp.margin_floor(n_terms, dtype)
  r = curve_relaxation(node.kind, *src_bounds[0], sound=sound, fractions=alpha)
  pos, neg = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
  parts = (pos * r.lower_slope + neg * r.upper_slope,)
  beta = _offset_sum(lam, r.lower_offset, r.upper_offset)
  if not sound:
    return parts, beta, jnp.zeros(lam.shape[0], dtype)
  slope = jnp.maximum(jnp.abs(r.lower_slope), jnp.abs(r.upper_slope))
  offset = jnp.maximum(jnp.abs(r.lower_offset), jnp.abs(r.upper_offset))
  spread = (u * fp.SLACK * _times(slope, _magnitude(src_bounds[0]))
            + fp.margin_coefficient(n_terms, dtype) * offset)
  return parts, beta, _row_sum(_times(jnp.abs(lam), spread)) + fp.margin_floor(n_terms, dtype)


# --- what other methods and the user are told ------------------------------------------------------


def first_nonlinear(graph: G.Graph) -> Optional[int]:
  """The index of the first :data:`~qbound.graph.NONLINEAR` node of ``graph``, or None."""
  return next((i for i, n in enumerate(graph.nodes) if n.kind in G.NONLINEAR), None)


def require_none(graph: G.Graph, method: str) -> None:
  """Raises :class:`~qbound.errors.UnsupportedLayerError` naming the first product or smooth curve
  node of ``graph`` (``method`` has no rule for them; interval bounds and CROWN have)."""
  idx = first_nonlinear(graph)
  if idx is None:
    return
  node = graph.nodes[idx]
  raise UnsupportedLayerError(
      f"{method}: no rule for the {node.kind!r} layer (node {idx}, {node.where or 'unknown source'}); "
      "products of two input-dependent values, exp, 1/x, rsqrt, sqrt, erfc, SiLU and GELU (softmax, layer norm, "
      "attention, GELU) are bounded by interval bounds and CROWN on the merged network: "
      "qb.certify(..., method='crown') or method='auto'.")


def check_domains(graph: G.Graph, bounds) -> None:
  """Raises :class:`~qbound.errors.UnboundedLayerError` naming the layer where a reciprocal's input may be 0, or an rsqrt's /
  sqrt's may be negative: the function is unbounded there (the bounds are the real line)."""
  for idx, node in enumerate(graph.nodes):
    if node.kind not in CURVES or CURVES[node.kind].domain == "all":
      continue
    lo, hi = bounds[node.inputs[0]]
    if isinstance(lo, jax.core.Tracer):
      return
    if bool(np.any(np.asarray(invalid(node.kind, jnp.asarray(lo), jnp.asarray(hi))))):
      what = {"nonzero": "may be 0", "positive": "may be 0 or negative", "nonnegative": "may be negative"}
      raise UnboundedLayerError(
          f"the input of the {node.kind!r} layer (node {idx}, {node.where or 'unknown source'}) "
          f"{what[CURVES[node.kind].domain]} over this box (its bounds reach [{float(np.min(lo)):.3g}, "
          f"{float(np.max(hi)):.3g}]), where it is unbounded: no finite bound exists. Shrink the box, or add "
          "a margin (e.g. eps in a norm) that keeps the input away from 0.")
