"""Bounds of a fake quantization whose scale is a root mean square (qwix's ``rms,c`` calibration).

qwix's ``act_calibration_method="rms,c"`` (``qwix/_src/core/qarray.py``, ``calibrate``) scales an
activation by the root mean square of its entries instead of their largest magnitude::

    s = c * sqrt(mean(x^2)) / Q              # Q = 127.5 for int8; c is required (e.g. "rms,3")
    s = where(s < sqrt(tiny), 1, s)          # the same guard as absmax
    q = s * clip(round(x / s), -128, 127)    # the int8 cast saturates

Over the ``n`` entries of a group (a tensor, or a token) write ``m = sqrt(sum x^2)`` (the L2 norm)
and ``D = sqrt(n) Q / c``, so ``s = m / D``. Unlike ``max|x|``, ``m`` does not cap the quotient at
the clip: ``|x_i| <= m`` gives ``|x_i / s| <= D``, which is beyond 127 when ``c < sqrt(n)``, so the
largest entries saturate and the error of such an entry is ``x_i - 127 s``, far more than half a
step. What is known of ``q`` over bounds ``[lo, hi]`` of ``x`` (:func:`bounds`):

* ``m`` lies between the norms of the entries' smallest and largest magnitudes over the bounds, and
  for each entry the others' part ``r_i^2 = m^2 - x_i^2`` is at least ``r_i^2`` of their smallest
  magnitudes (``rest``);
* the quotient ``u_i = D x_i / m = D x_i / sqrt(x_i^2 + r_i^2)`` increases with ``x_i`` and, for
  ``x_i > 0``, falls as ``r_i`` grows: ``u_i <= D hi_i / sqrt(hi_i^2 + rest_i^2)``, and alike below;
* the error: ``s/2`` where ``u_i`` stays within half a step of the clip; past it (``u_i > 127.5``)
  the entry saturates, ``q_i = 127 s`` and ``x_i - q_i = x_i - (127 / D) sqrt(x_i^2 + r_i^2)``,
  increasing in ``x_i`` (``127 < D`` there) and falling with ``r_i``: at most its value at
  ``x_i = hi_i``, ``r_i = rest_i``. So the band shrinks with the box, and it is exact for a box that
  is a point;
* a step, as for ``max|x|`` (:mod:`qbound.dynamic_rounding`): where ``u_i`` stays strictly inside one
  rounding step (or past a clip) over the bounds, ``q_i = k m / D`` between ``k`` times the bounds
  of ``m / D``;
* the guard: where it may fire (``m <= D g``), ``q = 0`` with an error below ``min(m, D g)``;
* jointly (:func:`parts`, :func:`saturating_count`): an entry past a clip has ``|u_i| > 126.5`` and
  ``sum u_i^2 = D^2``, so fewer than ``D^2 / 126.5^2`` of a group's entries saturate at once; the
  error is every entry's half step plus a saturation part that at most that many entries carry
  (:mod:`qbound.bounds.saturation` bounds a sum over the next layer with it).

Every quantity is computed relative to the group's largest magnitude (so squares of small entries
do not underflow), and covered for float32's rounding of the library's sum of ``n`` squares, mean,
square root and quotient by a relative slack of ``2^-18 + n 2^-23`` (sound for ``n`` far below
``2^23``).

Reference: qwix (Google, https://github.com/google/qwix), ``calibrate``'s ``rms`` method; the
symmetric int8 grid of Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018.

Example:
  >>> import jax.numpy as jnp
  >>> from qbound.dynamic_rounding import DynamicScale, quantize
  >>> from qbound import rms_rounding
  >>> spec = DynamicScale(divisor=2 * 127.5 / 3, low=-128, high=127, norm="rms")  # "rms,3", n = 4
  >>> lo, hi = jnp.array([0.5, -1.0, 0.2, 0.0]), jnp.array([0.6, -0.9, 0.3, 0.1])
  >>> half, flat, v_lo, v_hi = rms_rounding.bounds(spec, lo, hi, (0,))
  >>> x = jnp.array([0.55, -0.95, 0.25, 0.05])
  >>> bool(jnp.all(jnp.abs(quantize(spec, x) - x) <= half))
  True
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from qbound._arrays import namespace

# float32's rounding of a few operations (a relative 2^-24 each): 2^-18 covers them many times over;
# a sum of n squares adds n 2^-24 at most, counted twice.
_REL = 2.0 ** -18
_ULP = 2.0 ** -23


def slack(terms: int) -> float:
  """The relative slack for a scale computed from a mean of ``terms`` squares in float32."""
  return _REL + (terms + 8) * _ULP


class Joint(NamedTuple):
  """What the network around an ``rms`` node proves beyond its input's intervals
  (:func:`qbound.bounds.rms_rest.joint_bounds`), each of the input's shape, in real arithmetic:

  Attributes:
    rest: lower bounds of each entry's others' norm, ``r_i = sqrt(sum_{j != i} x_j^2)`` over its group.
    top: upper bounds of ``x_i - (high / D) (1 - rel) m`` (``m`` the group's norm, ``rel`` the
      :func:`slack`): the error of entry ``i`` wherever it saturates at the top.
    bottom: upper bounds of ``-x_i + (low / D) (1 - rel) m``, alike at the bottom.
  """

  rest: jnp.ndarray
  top: jnp.ndarray
  bottom: jnp.ndarray


class Parts(NamedTuple):
  """The error ``e = q(t) - t`` of an ``rms`` node over bounds of ``t``, split (:func:`parts`).

  Every entry has ``-base <= e_i <= base``, except entries that saturate: one past the top has
  ``-(base + over_top_i) <= e_i <= base``, one past the bottom ``-base <= e_i <= base + over_bottom_i``,
  and at most :func:`saturating_count` entries of a group saturate at once. ``flat``, ``v_lo``,
  ``v_hi`` as :func:`bounds` returns them.
  """

  base: jnp.ndarray
  over_top: jnp.ndarray
  over_bottom: jnp.ndarray
  flat: jnp.ndarray
  v_lo: jnp.ndarray
  v_hi: jnp.ndarray


def may_saturate(spec) -> bool:
  """Whether an ``rms`` scale without zero point lets entries reach past a clip (``D`` above it)."""
  return (spec.norm == "rms" and spec.zero_point is None
          and float(spec.divisor) > min(float(spec.high), -float(spec.low)) - 0.5)


def group_others(shape: tuple, axes) -> np.ndarray:
  """``(n, n)`` booleans over the flattened entries of a value of ``shape``: entry ``j`` is in entry
  ``i``'s group and is not ``i`` (``axes``: a scale's reduced axes, or None for the whole tensor)."""
  n = int(np.prod(shape, dtype=np.int64))
  reduced = range(len(shape)) if axes is None else [len(shape) + a if a < 0 else a for a in axes]
  kept = [a for a in range(len(shape)) if a not in reduced]
  index = np.indices(shape).reshape(len(shape), -1)
  group = (np.ravel_multi_index(tuple(index[a] for a in kept), tuple(shape[a] for a in kept)) if kept
           else np.zeros(n, np.int64))
  return (group[:, None] == group[None, :]) & ~np.eye(n, dtype=bool)


def saturation_rows(center, others, c_top: float, c_bottom: float, bottom: bool, u: float):
  """Linear rows whose lower bounds over a box bound an ``rms`` node's saturations
  (:mod:`qbound.bounds.rms_rest`): per entry ``i`` of ``center`` (``(..., n)``, the node's input at
  the box's centre, flattened; leading axes a batch of boxes) ``w_i``, the centre with entry ``i``
  and every entry outside its group (``others``, ``(n, n)``) set to 0, scaled to norm at most 1 (so
  ``r_i >= w_i . x``), and the negated saturation rows ``t_i = (1 - c_top alpha_i) e_i - c_top
  beta_i w_i`` and, with ``bottom``, ``b_i = -(1 + c_bottom alpha_i) e_i - c_bottom beta_i w_i``
  (``(alpha_i, beta_i)`` the direction of ``(x_i, r_i)`` at the centre, of norm at most 1).
  ``u``: the unit roundoff of the arithmetic; every scale is shrunk by a few of it, so that the
  norms stay at most 1 whatever the rounding. Returns ``(..., 2n or 3n, n)``: ``[w; -t(; -b)]``."""
  xp = namespace(center)
  n = center.shape[-1]
  p = xp.where(others, center[..., None, :], 0.0)
  norm = xp.sqrt(xp.sum(p * p, axis=-1)) * (1 + 2 * (n + 4) * u)  # >= |p|
  w = p / xp.where(norm > 0, norm, 1.0)[..., None] * (1 - 4 * u)  # |w| <= 1
  whole = xp.sqrt(center * center + norm * norm)
  safe = xp.where(whole > 0, whole, 1.0)
  alpha = xp.where(whole > 0, center / safe, 0.0) * (1 - 8 * u)
  beta = xp.where(whole > 0, norm / safe, 0.0) * (1 - 8 * u)
  eye = xp.eye(n, dtype=center.dtype)
  top = (1 - c_top * alpha)[..., None] * eye - (c_top * beta)[..., None] * w
  parts = [w, -top]
  if bottom:
    parts.append((1 + c_bottom * alpha)[..., None] * eye + (c_bottom * beta)[..., None] * w)
  return xp.concatenate(parts, axis=-2)


def joint_from_rows(low, rows, mag, u: float, tiny: float):
  """``(rest, top, bottom)`` of a :class:`Joint` (flat, before any outward rounding) from lower bounds
  ``low`` (``(..., 2n or 3n)``) of :func:`saturation_rows`' ``rows`` over a box where the node's
  input has magnitudes at most ``mag`` (``(..., n)``). The rows' coefficients carry their own
  rounding: each lower bound is lowered by ``4 u |row| . mag``."""
  xp = namespace(low, rows, mag)
  n = mag.shape[-1]
  slack = 4 * u * xp.sum(xp.abs(rows) * mag[..., None, :], axis=-1) + 16 * tiny
  rest = xp.maximum(low[..., :n] - slack[..., :n], 0.0)
  top = -low[..., n:2 * n] + slack[..., n:2 * n]
  bottom = (-low[..., 2 * n:] + slack[..., 2 * n:] if low.shape[-1] > 2 * n
            else xp.full(top.shape, xp.inf, dtype=top.dtype))
  return rest, top, bottom


def saturating_count(spec, terms: int) -> int:
  """How many of a group's ``terms`` entries can be past a clip at once (by more than half a step).

  Such an entry has ``|u_i| = D |x_i| / m > t`` with ``t = min(high, -low) - 1/2`` (a whole step of
  room below the clip, far more than float32's rounding of ``u``), and ``sum u_i^2 = D^2``: so fewer
  than ``D^2 / t^2`` of them at once (one for ``rms,3`` on 16 entries: ``D = 170``, ``t = 126.5``).
  """
  t = min(float(spec.high), -float(spec.low)) - 0.5
  if t <= 0:
    return terms
  return int(min(terms, np.floor(float(spec.divisor) ** 2 / t ** 2)))


def parts(spec, lo, hi, axes: tuple, rest=None) -> Parts:
  """The node's error split into a band every entry keeps and what saturation adds (:class:`Parts`),
  for inputs in ``[lo, hi]`` (``axes``: the reduced axes of ``lo``, leading axes a batch of boxes).
  ``rest``: an optional :class:`Joint` (from :func:`qbound.bounds.rms_rest.joint_bounds`): each
  entry's others' norm bounded below, met with the bound from their intervals, and its saturation
  errors bounded above, met with the bounds from the intervals."""
  xp = namespace(lo, hi)
  d, top, bottom = float(spec.divisor), float(spec.high), float(spec.low)
  terms = int(np.prod([lo.shape[a] for a in axes], dtype=np.int64))
  rel = slack(terms)
  mag = xp.maximum(xp.abs(lo), xp.abs(hi))
  mig = xp.where((lo <= 0) & (hi >= 0), 0.0, xp.minimum(xp.abs(lo), xp.abs(hi)))
  big = xp.max(mag, axis=axes, keepdims=True)  # each group's largest magnitude: the unit below
  unit = xp.where(big > 0, big, 1.0)
  ln, hn, mag_n, mig_n = lo / unit, hi / unit, mag / unit, mig / unit
  sq_hi = xp.sum(mag_n * mag_n, axis=axes, keepdims=True) * (1 + rel) + 1e-30  # bounds of sum x^2 / unit^2
  sq_lo = xp.maximum(xp.sum(mig_n * mig_n, axis=axes, keepdims=True) * (1 - rel) - 1e-30, 0.0)
  m_hi = xp.sqrt(sq_hi) * unit * (1 + rel)  # bounds of m = sqrt(sum x^2)
  m_lo = xp.sqrt(sq_lo) * unit * (1 - rel)
  # each entry's others: r_i^2 = m^2 - x_i^2 >= rest_i^2 (the sum rounded down, the entry's part up)
  rest2 = xp.maximum((sq_lo - mig_n * mig_n * (1 + rel)) * (1 - rel) - 1e-30, 0.0)
  if rest is not None:  # r_i >= rest_i, and so m^2 >= rest_i^2 + mig_i^2 for every i
    rest_n = rest.rest / unit
    rest2 = xp.maximum(rest2, rest_n * rest_n * (1 - rel) - 1e-30)
    sq_lo = xp.maximum(sq_lo, xp.max(rest2 + mig_n * mig_n, axis=axes, keepdims=True) * (1 - rel) - 1e-30)
    m_lo = xp.sqrt(sq_lo) * unit * (1 - rel)

  def ratio(t):  # t / sqrt(t^2 + rest^2), in [-1, 1]; where the denominator underflows, +-1 bounds it
    den = xp.sqrt(t * t + rest2)
    return xp.where(den > 0, t / xp.where(den > 0, den, 1.0), xp.sign(t))

  m_hi_n = xp.sqrt(sq_hi)  # >= 1 where the group is not all 0
  up = xp.where(hn > 0, ratio(hn), hn / m_hi_n)  # u_i / D for t_i <= hi_i: x_i / m <= hi_i / m_hi if hi_i <= 0
  down = xp.where(ln < 0, ratio(ln), ln / m_hi_n)
  u_hi = xp.clip(d * up, -d, d)
  u_lo = xp.clip(d * down, -d, d)
  u_hi = u_hi + (xp.abs(u_hi) + 1e-30) * 2 * rel
  u_lo = u_lo - (xp.abs(u_lo) + 1e-30) * 2 * rel
  s_hi = m_hi / d
  # the library's scale is s (1 +- rel): a value k s moves by k s rel <= m rel
  base = 0.5 * s_hi * (1 + rel) + m_hi * 2 * rel
  # saturation past the top: x_i - (top / D) sqrt(x_i^2 + r_i^2) <= its value at hi_i, rest_i (top < D)
  if top < d:
    root = xp.sqrt(hn * hn + rest2) * (1 - rel)
    past = xp.maximum(hn - (top / d) * root, 0.0) * unit
    if rest is not None:  # x_i - top s <= x_i - (top / D) (1 - rel) m, bounded on the network
      past = xp.minimum(past, xp.maximum(rest.top, 0.0))
  else:  # u <= D <= top: only float32's slack can reach past it
    past = s_hi * xp.maximum(u_hi - top, 0.0)
  over_top = xp.where(u_hi > top + 0.5, xp.maximum(past * (1 + rel) + m_hi * 2 * rel - base, 0.0), 0.0)
  if -bottom < d:
    root = xp.sqrt(ln * ln + rest2) * (1 - rel)
    past = xp.maximum(-ln + (bottom / d) * root, 0.0) * unit
    if rest is not None:
      past = xp.minimum(past, xp.maximum(rest.bottom, 0.0))
  else:
    past = s_hi * xp.maximum(bottom - u_lo, 0.0)
  over_bottom = xp.where(u_lo < bottom - 0.5, xp.maximum(past * (1 + rel) + m_hi * 2 * rel - base, 0.0), 0.0)
  guard_may_fire = xp.zeros_like(m_lo, bool)
  if spec.guard is not None and spec.guard[0] != "eq":
    cut = spec.guard[1]
    guard_may_fire = m_lo <= d * cut * (1 + rel)  # where it fires, q = 0 and |t| <= m < D cut
    base = xp.maximum(base, xp.minimum(m_hi, d * cut * (1 + rel)))
  elif spec.guard is not None:
    guard_may_fire = m_lo <= 0
  k = xp.clip(xp.round(u_lo), bottom, top)
  one_step = (u_lo > k - 0.5) & (u_hi < k + 0.5)  # strictly inside one step: no tie either way
  at_high = u_lo > top - 0.5
  at_low = u_hi < bottom + 0.5
  k = xp.where(at_high, top, xp.where(at_low, bottom, k))
  flat = (one_step | at_high | at_low) & (m_lo > 0) & ~guard_may_fire
  ends = (k * (m_lo / d) * (1 - rel), k * (m_hi / d) * (1 + rel))
  v_lo = xp.where(k >= 0, ends[0], ends[1])
  v_hi = xp.where(k >= 0, ends[1], ends[0])
  shape = xp.shape(lo)
  return Parts(xp.broadcast_to(base, shape), over_top, over_bottom, flat, xp.where(flat, v_lo, 0.0),
               xp.where(flat, v_hi, 0.0))


def bounds(spec, lo, hi, axes: tuple, rest=None):
  """``(half, flat, v_lo, v_hi)`` of an ``rms`` dynamic rounding node for inputs in ``[lo, hi]``, as
  :func:`qbound.dynamic_rounding.bounds` returns them (``axes``: the axes of ``lo`` each scale is
  taken over, leading axes being a batch of boxes): every entry's worst case, saturation included.

  Args:
    spec: the node's :class:`~qbound.dynamic_rounding.DynamicScale` (``norm == "rms"``).
    lo, hi: bounds of the node's input.
    axes: the reduced axes of ``lo`` (non-negative).
    rest: an optional :class:`Joint` (see :func:`parts`).

  Returns:
    ``|v - t| <= half`` for ``t`` in the bounds; where ``flat``, ``v_lo <= v <= v_hi``.
  """
  return from_parts(parts(spec, lo, hi, axes, rest))


def from_parts(p: Parts):
  """:func:`bounds`' ``(half, flat, v_lo, v_hi)`` from the node's :class:`Parts` (every entry's worst
  case: its band and the larger of its saturation errors)."""
  return p.base + namespace(p.base).maximum(p.over_top, p.over_bottom), p.flat, p.v_lo, p.v_hi
