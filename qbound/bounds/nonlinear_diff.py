"""Differential rules for products and smooth curves: bounds on ``h(z) - h(z_q)`` layer by layer.

:mod:`qbound.bounds.diff` follows ``d = z - z_q`` through paired layers of f and f_q. This module
gives it the transformer layers (:data:`qbound.graph.NONLINEAR`), in the two forms it needs: an
interval of the output's ``d`` from its inputs' bounds (ReluDiff's forward rules, Paulsen, Wang,
Wang, ICSE 2020), and lines in ``d`` and ``z_q`` (NeuroDiff's symbolic differences, Paulsen, Wang,
Wang, Wang, ASE 2020) for the backward pass.

* **Curves** ``h`` (exp, 1/x, rsqrt, sqrt, erfc, SiLU, GELU, x^2): by the mean value theorem
  ``h(z) - h(z_q) = h'(xi) d`` for some ``xi`` between ``z`` and ``z_q``, so ``s d`` with ``s`` in
  the range of ``h'`` over the hull of both inputs' bounds (for ``x^2`` exactly ``(z + z_q) d``).
  ``h'`` is monotone on each convex or concave piece, so its range is spanned by its values at the
  ends and at the inflection points inside. Lines: :func:`qbound.bounds.smooth.mvt_lines` around
  ``{s d}``; or the two networks' own CROWN lines (:func:`qbound.bounds.nonlinear.curve_relaxation`)
  subtracted, with ``z = z_q + d``; or the interval as constants: per neuron the family whose lines
  are closest (the largest gap over the box, as :func:`qbound.bounds.smooth.diff_relaxation`).
* **Products** ``x y - x_q y_q = x d_y + d_x y_q``: each term a bilinear product of two bounded
  values, relaxed by the planes of :func:`qbound.bounds.nonlinear.product_relaxation` (McCormick,
  Math. Programming 1976; slopes through the box's centre), then written in ``d_x, d_y, x_q, y_q``
  with ``x = x_q + d_x``. Or the two products' own planes subtracted; or the interval. Both plane
  families share one slope per variable for their lower and upper plane, so their gap is the
  difference of their offsets, and the closer one is taken per entry.

Sound mode: the relaxations' own margins (:mod:`qbound.bounds.nonlinear`) plus the roundings of
the slopes combined here (``a_1 + a_2``, ``a - a_q``), as offsets.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import choice, fp, nonlinear, smooth
from qbound.bounds.common import plus
from qbound.bounds.relax import DiffRelaxation


def _u(x):
  return fp.unit_roundoff(jnp.result_type(x))


def _tiny(x):
  return fp.tiny(jnp.result_type(x))


def _magnitude(lo, hi):
  return jnp.maximum(jnp.abs(lo), jnp.abs(hi))


# --- curves ---------------------------------------------------------------------------------------


def derivative_range(kind: str, lo, hi, *, sound: bool = True):
  """Proven ``(s_min, s_max)`` with ``s_min <= h'(x) <= s_max`` for ``x`` in ``[lo, hi]``
  (``-inf, inf`` where the interval leaves ``h``'s domain or ``h'`` is unbounded there).

  Example:
    >>> import jax.numpy as jnp
    >>> from qbound.bounds import nonlinear_diff
    >>> s_min, s_max = nonlinear_diff.derivative_range("exp", jnp.array([0.0]), jnp.array([1.0]))
    >>> bool(s_min[0] <= 1.0 <= 2.718281 <= s_max[0] < 2.7184)
    True
  """
  curve = nonlinear.CURVES[kind]
  bad = nonlinear.invalid(kind, lo, hi) | ~jnp.isfinite(lo) | ~jnp.isfinite(hi)
  safe_lo, safe_hi = jnp.where(bad, 1, lo), jnp.where(bad, 1, hi)
  # h' is monotone between inflection points: its extremes are at the ends or at an inflection.
  points = [safe_lo, safe_hi] + [jnp.clip(p, safe_lo, safe_hi) for p in curve.inflections]
  s_min, s_max = jnp.inf, -jnp.inf
  for x in points:
    s = curve.deriv(x)
    e = curve.deriv_error(x, s) if sound else 0
    s_min, s_max = jnp.minimum(s_min, s - e), jnp.maximum(s_max, s + e)
  if sound:
    s_min, s_max = fp.round_down(s_min), fp.round_up(s_max)
  # sqrt' is infinite at 0, and at a flushed subnormal -0 it comes out as -inf: any non-finite
  # derivative makes the whole range unbounded.
  bad = bad | ~jnp.isfinite(s_min) | ~jnp.isfinite(s_max)
  return jnp.where(bad, -jnp.inf, s_min).astype(lo.dtype), jnp.where(bad, jnp.inf, s_max).astype(lo.dtype)


def slope_range(kind: str, z, zq, *, sound: bool = True):
  """The range of ``s`` with ``h(z) - h(z_q) = s (z - z_q)``: ``h'`` over the hull of ``z``'s and
  ``z_q``'s bounds (mean value theorem), for ``x^2`` exactly ``z + z_q``."""
  (zl, zu), (ql, qu) = z, zq
  if kind == G.SQUARE:
    lo, hi = zl + ql, zu + qu
    return (fp.round_down(lo), fp.round_up(hi)) if sound else (lo, hi)
  return derivative_range(kind, jnp.minimum(zl, ql), jnp.maximum(zu, qu), sound=sound)


def curve_diff_interval(kind: str, z, zq, d, *, sound: bool = True):
  """Bounds of ``h(z) - h(z_q)``: ``s d`` over the slope and ``d`` ranges, intersected with
  ``h([z]) - h([z_q])``; exactly ``[0, 0]`` where ``d`` is."""
  (zl, zu), (ql, qu), (dl, du) = z, zq, d
  lo, hi = nonlinear.product_interval(slope_range(kind, z, zq, sound=sound), d, sound=sound)
  fzl, fzu = nonlinear.curve_interval(kind, zl, zu, sound=sound)
  fql, fqu = nonlinear.curve_interval(kind, ql, qu, sound=sound)
  lo2, hi2 = fzl - fqu, fzu - fql
  if sound:
    lo2, hi2 = fp.round_down(lo2), fp.round_up(hi2)
  lo, hi = jnp.maximum(lo, lo2), jnp.minimum(hi, hi2)
  exact = (dl == 0) & (du == 0)
  return jnp.where(exact, 0, lo).astype(dl.dtype), jnp.where(exact, 0, hi).astype(dl.dtype)


def _line_gap(r: DiffRelaxation, q, d):
  """The largest distance between the two lines of ``r`` over the box of ``z_q`` and ``d``."""
  at = lambda slope, lo, hi: jnp.maximum(slope * lo, slope * hi)
  return at(r.upper_d - r.lower_d, *d) + at(r.upper_q - r.lower_q, *q) + r.upper_r - r.lower_r


def _flat(lo, hi) -> DiffRelaxation:
  zero = jnp.zeros_like(lo)
  return DiffRelaxation(zero, zero, lo, zero, zero, hi)


def curve_diff_relaxation(kind: str, z, zq, d, *, sound: bool = True) -> DiffRelaxation:
  """Lines ``p d + q z_q + r`` below and above ``h(z_q + d) - h(z_q)`` (see the module docstring).

  Example:
    >>> import jax.numpy as jnp
    >>> from qbound.bounds import nonlinear_diff
    >>> one = lambda v: jnp.array([v])
    >>> z, zq, d = (one(0.0), one(1.0)), (one(0.0), one(1.0)), (one(-0.01), one(0.01))
    >>> r = nonlinear_diff.curve_diff_relaxation("exp", z, zq, d)
    >>> x, xq = jnp.array(0.505), jnp.array(0.5)
    >>> h = jnp.exp(x) - jnp.exp(xq)
    >>> bool((r.lower_d * (x - xq) + r.lower_q * xq + r.lower_r <= h)
    ...      & (h <= r.upper_d * (x - xq) + r.upper_q * xq + r.upper_r))
    True
  """
  (zl, zu), (ql, qu), (dl, du) = z, zq, d
  dtype = dl.dtype
  s_min, s_max = slope_range(kind, z, zq, sound=sound)
  finite_s = jnp.isfinite(s_min) & jnp.isfinite(s_max)
  s_min, s_max = jnp.where(finite_s, s_min, 0), jnp.where(finite_s, s_max, 0)
  lo_s, lo_o, up_s, up_o = smooth.mvt_lines(dl, du, s_min, s_max, sound=sound)
  lo_o, up_o = jnp.where(finite_s, lo_o, -jnp.inf), jnp.where(finite_s, up_o, jnp.inf)
  zero = jnp.zeros_like(dl)
  mvt = DiffRelaxation(jnp.broadcast_to(lo_s, dl.shape), zero, lo_o, jnp.broadcast_to(up_s, dl.shape), zero, up_o)
  rz = nonlinear.curve_relaxation(kind, zl, zu, sound=sound)
  rq = nonlinear.curve_relaxation(kind, ql, qu, sound=sound)
  # h(z) - h(zq) >= (lower line of h(z)) - (upper line of h(zq)), with z = zq + d.
  pair = DiffRelaxation(
      lower_d=rz.lower_slope, lower_q=rz.lower_slope - rq.upper_slope, lower_r=rz.lower_offset - rq.upper_offset,
      upper_d=rz.upper_slope, upper_q=rz.upper_slope - rq.lower_slope, upper_r=rz.upper_offset - rq.lower_offset)
  if sound:  # slopes and offsets subtracted in float: widen by those roundings (times |zq|)
    u, qmag = _u(dl), _magnitude(ql, qu)
    pair = pair._replace(
        lower_r=pair.lower_r - 2 * u * (jnp.abs(rz.lower_offset) + jnp.abs(rq.upper_offset)
                                        + jnp.abs(pair.lower_q) * qmag) - _tiny(dl),
        upper_r=pair.upper_r + 2 * u * (jnp.abs(rz.upper_offset) + jnp.abs(rq.lower_offset)
                                        + jnp.abs(pair.upper_q) * qmag) + _tiny(dl))
  flat = _flat(*curve_diff_interval(kind, z, zq, d, sound=sound))
  candidates = (flat, mvt, pair)
  out = choice.least_gap(candidates, [_line_gap(c, zq, d) for c in candidates])
  exact = (dl == 0) & (du == 0)
  return DiffRelaxation(*[jnp.where(exact, 0, v).astype(dtype) for v in out])


# --- products -------------------------------------------------------------------------------------


class ProductDiffRelaxation(NamedTuple):
  """``dx d_x + dy d_y + xq x_q + yq y_q + lower <= x y - x_q y_q <= (same slopes) + upper``."""

  dx: jnp.ndarray
  dy: jnp.ndarray
  xq: jnp.ndarray
  yq: jnp.ndarray
  lower: jnp.ndarray
  upper: jnp.ndarray


def product_diff_interval(x, xq, dx, y, yq, dy, *, sound: bool = True):
  """Bounds of ``x y - x_q y_q`` from the bounds of ``x, x_q, d_x = x - x_q`` and likewise ``y``:
  ``[x] [d_y] + [d_x] [y_q]``, intersected with ``[x] [y] - [x_q] [y_q]``; 0 where both ``d`` are."""
  a_lo, a_hi = nonlinear.product_interval(x, dy, sound=sound)
  b_lo, b_hi = nonlinear.product_interval(dx, yq, sound=sound)
  lo, hi = a_lo + b_lo, a_hi + b_hi
  p_lo, p_hi = nonlinear.product_interval(x, y, sound=sound)
  q_lo, q_hi = nonlinear.product_interval(xq, yq, sound=sound)
  lo2, hi2 = p_lo - q_hi, p_hi - q_lo
  if sound:
    lo, hi, lo2, hi2 = fp.round_down(lo), fp.round_up(hi), fp.round_down(lo2), fp.round_up(hi2)
  lo, hi = jnp.maximum(lo, lo2), jnp.minimum(hi, hi2)
  exact = (dx[0] == 0) & (dx[1] == 0) & (dy[0] == 0) & (dy[1] == 0)
  dtype = dx[0].dtype
  return jnp.where(exact, 0, lo).astype(dtype), jnp.where(exact, 0, hi).astype(dtype)


def product_diff_relaxation(x, xq, dx, y, yq, dy, *, sound: bool = True) -> ProductDiffRelaxation:
  """Planes around ``x y - x_q y_q`` in ``d_x, d_y, x_q, y_q`` (see the module docstring).

  Example:
    >>> import jax.numpy as jnp
    >>> from qbound.bounds import nonlinear_diff
    >>> one = lambda lo, hi: (jnp.array([lo]), jnp.array([hi]))
    >>> r = nonlinear_diff.product_diff_relaxation(one(0.9, 1.1), one(0.9, 1.1), one(-0.01, 0.01),
    ...                                            one(-2.0, 2.0), one(-2.0, 2.0), one(-0.02, 0.02))
    >>> xq, yq, dx, dy = 1.0, 1.5, 0.01, -0.02
    >>> h = (xq + dx) * (yq + dy) - xq * yq
    >>> plane = r.dx * dx + r.dy * dy + r.xq * xq + r.yq * yq
    >>> bool((plane + r.lower <= h) & (h <= plane + r.upper))
    True
  """
  dtype = dx[0].dtype
  u = _u(dx[0])
  mag = lambda b: _magnitude(*b)
  # x d_y + d_x y_q, with x = x_q + d_x.
  r1 = nonlinear.product_relaxation(x, dy, sound=sound)
  r2 = nonlinear.product_relaxation(dx, yq, sound=sound)
  slope_dx = r1.x_slope + r2.x_slope
  lower, upper = r1.lower_offset + r2.lower_offset, r1.upper_offset + r2.upper_offset
  if sound:  # the sums just formed, and a_1 d_x + a_2 d_x written as (a_1 + a_2) d_x
    spare = (2 * u * (jnp.abs(r1.lower_offset) + jnp.abs(r2.lower_offset) + jnp.abs(r1.upper_offset)
                      + jnp.abs(r2.upper_offset)) + 2 * u * jnp.abs(slope_dx) * mag(dx) + 2 * _tiny(lower))
    lower, upper = lower - spare, upper + spare
  split = ProductDiffRelaxation(slope_dx, r1.y_slope, r1.x_slope, r2.y_slope, lower, upper)
  # The two products' own planes, subtracted: x y - x_q y_q with x = x_q + d_x, y = y_q + d_y.
  rf = nonlinear.product_relaxation(x, y, sound=sound)
  rq = nonlinear.product_relaxation(xq, yq, sound=sound)
  a, b = rf.x_slope - rq.x_slope, rf.y_slope - rq.y_slope
  lower, upper = rf.lower_offset - rq.upper_offset, rf.upper_offset - rq.lower_offset
  if sound:
    spare = (2 * u * (jnp.abs(rf.lower_offset) + jnp.abs(rq.upper_offset) + jnp.abs(rf.upper_offset)
                      + jnp.abs(rq.lower_offset)) + 2 * u * (jnp.abs(a) * mag(xq) + jnp.abs(b) * mag(yq))
             + 2 * _tiny(lower))
    lower, upper = lower - spare, upper + spare
  pair = ProductDiffRelaxation(rf.x_slope, rf.y_slope, a, b, lower, upper)
  lo, hi = product_diff_interval(x, xq, dx, y, yq, dy, sound=sound)
  zero = jnp.zeros_like(lo)
  flat = ProductDiffRelaxation(zero, zero, zero, zero, lo, hi)
  candidates = (flat, split, pair)
  out = choice.least_gap(candidates, [c.upper - c.lower for c in candidates])
  exact = (dx[0] == 0) & (dx[1] == 0) & (dy[0] == 0) & (dy[1] == 0)
  return ProductDiffRelaxation(*[jnp.where(exact, 0, v).astype(dtype) for v in out])


def backward_rule(nf: G.Node, lv, mv, zq, d, r, rq, sound: bool):
  """A product pair of :func:`qbound.bounds.diff.diff_backward_lower`: rows ``lv`` on ``d`` and ``mv``
  on ``z_q`` at the node (either may be None), ``r`` the planes of ``x y - x_q y_q``
  (:func:`product_diff_relaxation`), ``rq`` those of ``x_q y_q``. Returns the coefficients on
  ``(d_x, d_y)`` and ``(x_q, y_q)``, and the constant and rounding margin per row. Sound-mode
  margins as for activations: every coefficient times its variable's magnitude, and the offsets'
  sums."""
  rows = (lv if lv is not None else mv).shape[0]
  dtype = (lv if lv is not None else mv).dtype
  u = fp.unit_roundoff(dtype)
  n_terms = fp.pairwise_terms(nf.size)
  beta = jnp.zeros(rows, dtype)
  err = jnp.zeros(rows, dtype)
  to_d = to_q = margins = None
  if lv is not None:
    pos, neg = jnp.maximum(lv, 0), jnp.minimum(lv, 0)
    to_d = (lv * r.dx, lv * r.dy)
    to_q = (lv * r.xq, lv * r.yq)
    beta = beta + fp.pairwise_sum(pos * r.lower + neg * r.upper)
    if sound:
      spread = (u * fp.SLACK * (jnp.abs(r.dx) * _magnitude(*d[0]) + jnp.abs(r.dy) * _magnitude(*d[1])
                                + jnp.abs(r.xq) * _magnitude(*zq[0]) + jnp.abs(r.yq) * _magnitude(*zq[1]))
                + fp.margin_coefficient(n_terms, dtype) * jnp.maximum(jnp.abs(r.lower), jnp.abs(r.upper)))
      margins = jnp.abs(lv) * spread
      err = err + fp.margin_floor(n_terms, dtype)
  if mv is not None:
    pos, neg = jnp.maximum(mv, 0), jnp.minimum(mv, 0)
    from_mu = (mv * rq.x_slope, mv * rq.y_slope)
    if to_q is not None:
      summed = (to_q[0] + from_mu[0], to_q[1] + from_mu[1])
      if sound:
        margins = plus(margins, u * fp.SLACK * (jnp.abs(summed[0]) * _magnitude(*zq[0])
                                                + jnp.abs(summed[1]) * _magnitude(*zq[1])))
      to_q = summed
    else:
      to_q = from_mu
    beta = beta + fp.pairwise_sum(pos * rq.lower_offset + neg * rq.upper_offset)
    if sound:
      spread = (u * fp.SLACK * (jnp.abs(rq.x_slope) * _magnitude(*zq[0]) + jnp.abs(rq.y_slope) * _magnitude(*zq[1]))
                + fp.margin_coefficient(n_terms, dtype) * jnp.maximum(jnp.abs(rq.lower_offset),
                                                                       jnp.abs(rq.upper_offset)))
      margins = plus(margins, jnp.abs(mv) * spread)
      err = err + fp.margin_floor(n_terms, dtype)
  if sound:
    err = err + fp.margin_sum(margins)
  return to_d, to_q, beta, err


def node_diff_interval(nf: G.Node, z, zq, d, *, sound: bool = True):
  """Interval bounds of ``d`` at a :data:`~qbound.graph.NONLINEAR` node pair, given the bounds of
  its inputs (tuples in input order)."""
  if nf.kind == G.MUL:
    return product_diff_interval(z[0], zq[0], d[0], z[1], zq[1], d[1], sound=sound)
  return curve_diff_interval(nf.kind, z[0], zq[0], d[0], sound=sound)
