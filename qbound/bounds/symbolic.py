"""Symbolic intervals: a value between two linear functions of the input box's coordinates, and of
fresh variables named along the way.

``L x + l <= value <= U x + u`` over a box (ReluVal's symbolic intervals, Wang et al., USENIX
Security 2018): the algebra :mod:`qbound.bounds.forward` pushes through a network (affine maps,
sums of relaxation lines, concretisation over the box, each with its float rounding bounded in sound
mode), and NeuroDiff's intermediate symbolic variables (Paulsen, Wang, Wang, Wang, ASE 2020,
:func:`_fresh_variables`): a neuron whose two functions lie far apart is named by a fresh variable,
which later layers carry exactly instead of adding up the gap, the variables' ranges joining the
box's coordinates in the context.

Example:
  >>> import jax.numpy as jnp
  >>> from qbound.bounds.symbolic import Symbolic, _Context, concretize
  >>> s = Symbolic(L=jnp.array([[1.0], [-1.0]]), l=jnp.zeros(1), U=jnp.array([[1.0], [-1.0]]), u=jnp.ones(1))
  >>> ctx = _Context(center=jnp.zeros(2), radius=jnp.ones(2), xmax=jnp.ones(2), sound=False)
  >>> [float(v[0]) for v in concretize(s, ctx)]  # x0 - x1 over [-1, 1]^2, and + 1 above
  [-2.0, 3.0]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qbound.bounds import fp, neurodiff_rules

class Symbolic(NamedTuple):
  """``L x + l <= value <= U x + u`` over the box: ``L``, ``U`` of shape ``(inputs, *node shape)``."""

  L: jnp.ndarray
  l: jnp.ndarray
  U: jnp.ndarray
  u: jnp.ndarray



def _gamma(n: int, dtype) -> float:
  return fp.SLACK * fp.gamma(n, dtype)


def _split_sign(a):
  return jnp.maximum(a, 0), jnp.minimum(a, 0)


class _Context(NamedTuple):
  """The box as the steps need it: centre and radius (flat) and the largest ``|x|`` per input."""

  center: jnp.ndarray
  radius: jnp.ndarray
  xmax: jnp.ndarray
  sound: bool
  relu_rules: str = "node"


def _magnitude(s: Symbolic, ctx: _Context):
  """A bound on ``|L x + l|`` and ``|U x + u|`` over the box, per entry (sizes rounding margins)."""
  coef = jnp.tensordot(ctx.xmax[:s.L.shape[0]], jnp.abs(s.L) + jnp.abs(s.U), axes=1)
  return coef + jnp.abs(s.l) + jnp.abs(s.u)


def _widen(s: Symbolic, err, ctx: _Context) -> Symbolic:
  if not ctx.sound:
    return s
  return s._replace(l=fp.round_down(s.l - err), u=fp.round_up(s.u + err))


def _affine(lin, lin_abs, s: Symbolic):
  """``W s`` for a linear map given as ``lin`` (W) and ``lin_abs`` (|W|), without its bias."""
  total = jax.vmap(lin)(s.L + s.U)
  spread = jax.vmap(lin_abs)(s.U - s.L)
  c_total = lin(s.l + s.u)
  c_spread = lin_abs(s.u - s.l)
  return Symbolic((total - spread) / 2, (c_total - c_spread) / 2, (total + spread) / 2, (c_total + c_spread) / 2)


def _add(a: Symbolic, b: Symbolic) -> Symbolic:
  n = max(a.L.shape[0], b.L.shape[0])
  a, b = _pad(a, n), _pad(b, n)
  return Symbolic(a.L + b.L, a.l + b.l, a.U + b.U, a.u + b.u)


def _pad(s: Symbolic, n: int) -> Symbolic:
  """``s`` over ``n`` variables: the inputs' functions gain zero coefficients for the fresh
  variables after them (:func:`_fresh_variables`)."""
  extra = n - s.L.shape[0]
  if extra == 0:
    return s
  widths = [(0, extra)] + [(0, 0)] * (s.L.ndim - 1)
  return Symbolic(jnp.pad(s.L, widths), s.l, jnp.pad(s.U, widths), s.u)


def _lines(terms, offsets, shape, n_in, dtype):
  """``sum_k slope_k * s_k + offset`` as a symbolic interval, for lines ``(lower slope, upper slope,
  s_k)`` per term and ``offsets = (lower, upper)``: each line takes ``s_k``'s lower or upper
  function by its slope's sign."""
  n_in = max([n_in] + [s.L.shape[0] for _, _, s in terms])
  L = jnp.zeros((n_in, *shape), dtype)
  U = jnp.zeros((n_in, *shape), dtype)
  l, u = offsets
  for lower_slope, upper_slope, s in terms:
    s = _pad(s, n_in)
    lp, ln = _split_sign(lower_slope)
    up, un = _split_sign(upper_slope)
    L = L + lp * s.L + ln * s.U
    l = l + lp * s.l + ln * s.u
    U = U + up * s.U + un * s.L
    u = u + up * s.u + un * s.l
  return Symbolic(L, l, U, u)


def _lines_error(terms, offsets, ctx: _Context, dtype):
  """The rounding of :func:`_lines`: each entry is a sum of ``2 * terms + 1`` products and sums."""
  total = jnp.maximum(jnp.abs(offsets[0]), jnp.abs(offsets[1]))
  for lower_slope, upper_slope, s in terms:
    total = total + jnp.maximum(jnp.abs(lower_slope), jnp.abs(upper_slope)) * _magnitude(s, ctx)
  return _gamma(2 * len(terms) + 2, dtype) * total + (2 * len(terms) + 2) * fp.tiny(dtype)


def concretize(s: Symbolic, ctx: _Context):
  """The extremes of ``L x + l`` and ``U x + u`` over the box: ``(lower, upper)``."""
  dtype = s.l.dtype
  n = s.L.shape[0]  # the inputs, and the fresh variables if s has any
  center, radius = ctx.center[:n], ctx.radius[:n]
  lo = jnp.tensordot(center, s.L, axes=1) - jnp.tensordot(radius, jnp.abs(s.L), axes=1) + s.l
  hi = jnp.tensordot(center, s.U, axes=1) + jnp.tensordot(radius, jnp.abs(s.U), axes=1) + s.u
  if not ctx.sound:
    return lo, hi
  reach = jnp.abs(center) + radius
  err_lo = _gamma(2 * n + 2, dtype) * (jnp.tensordot(reach, jnp.abs(s.L), axes=1) + jnp.abs(s.l))
  err_hi = _gamma(2 * n + 2, dtype) * (jnp.tensordot(reach, jnp.abs(s.U), axes=1) + jnp.abs(s.u))
  floor = (2 * n + 2) * fp.tiny(dtype)
  return fp.round_down(lo - err_lo - floor), fp.round_up(hi + err_hi + floor)


def equation_ranges(s: Symbolic, ctx: _Context) -> neurodiff_rules.EquationRanges:
  """The range over the box of ``L x + l`` and of ``U x + u`` each (rounded outward in sound mode)."""
  low, up = concretize(s, ctx)
  ups_low, lows_up = concretize(Symbolic(s.U, s.u, s.L, s.l), ctx)  # min of U, max of L
  return neurodiff_rules.EquationRanges(low, lows_up, ups_low, up)


# How a fresh variable names a neuron: "midline" (its functions' midline plus the variable) or
# "range" (the variable alone, over the neuron's range: NeuroDiff's); see _fresh_variables.
FRESH_FORMS = ("midline", "range")
# With "range", fresh variables go only to neurons whose bounding functions lie at least this share
# of the neuron's proven width apart at their farthest (below it the functions track the inputs).
FRESH_MIN_GAP = 0.5


def _fresh_variables(s: Symbolic, bounds, ctx: _Context, start, k: int, form: str = "midline"):
  """NeuroDiff's intermediate symbolic variables (Paulsen, Wang, Wang, Wang, ASE 2020): up to ``k``
  neurons of ``s`` get fresh variables, indices ``start .. start + k - 1``.

  A neuron's value ``v`` lies between its two bounding functions ``L x + l`` and ``U x + u``. With
  ``form="range"`` (NeuroDiff's) it is named by a fresh variable ``e`` ranging over its
  proven range ``bounds`` (``L = U = e``); with ``"midline"`` (default) it is written
  ``v = M x + m + e``, ``M x + m`` the midline of the two functions and ``e`` the rest, which lies
  within half their largest gap and within ``bounds`` less the midline's range. Either is sound
  whatever ``e``'s dependence on the input, and a later affine layer maps ``e`` exactly (paths of
  opposite sign cancel), where the two bounding functions would add the gap, times ``|W|``, to every
  neuron after it. The chosen neurons are those whose functions lie farthest apart over the box
  (the relaxations of unstable neurons). ``start`` may be traced (the layers of a scanned run).

  Sound mode: the midline is computed in float, so ``e``'s range is taken from the computed
  midline's own functions (``L - M``, ``U - M``, each concretised with its rounding) and widened by
  the rounding of those differences.

  Returns:
    ``(symbolic interval, context)``: the context's variables now include the fresh ones' ranges.
  """
  n = s.L.shape[0]
  L, U = s.L.reshape(n, -1), s.U.reshape(n, -1)
  l, u = s.l.reshape(-1), s.u.reshape(-1)
  lo, hi = (jnp.broadcast_to(b, s.l.shape).reshape(-1) for b in bounds)
  spread = U - L
  gap = jnp.tensordot(ctx.center[:n], spread, axes=1) + jnp.tensordot(ctx.radius[:n], jnp.abs(spread), axes=1) + u - l
  usable = jnp.isfinite(lo) & jnp.isfinite(hi) & (gap > 0)
  if form == "range":
    usable = usable & (gap >= FRESH_MIN_GAP * (hi - lo))
  top, idx = jax.lax.top_k(jnp.where(usable, gap, -jnp.inf), k)
  use = top > -jnp.inf
  Lk, Uk, lk, uk, lo_k, hi_k = L[:, idx], U[:, idx], l[idx], u[idx], lo[idx], hi[idx]
  if form == "range":
    Mk, mk = jnp.zeros_like(Lk), jnp.zeros_like(lk)
    e_lo, e_hi = lo_k, hi_k
  else:
    Mk, mk = (Lk + Uk) / 2, (lk + uk) / 2
    picked = Symbolic(Lk - Mk, lk - mk, Uk - Mk, uk - mk)  # v - midline lies between these two
    e_lo, e_hi = concretize(picked, ctx)
    mid_lo, mid_hi = concretize(Symbolic(Mk, mk, Mk, mk), ctx)
    if ctx.sound:  # L - M and U - M were rounded: at most u of |L| + |U| per coefficient (and constant)
      err = 4 * fp.unit_roundoff(lk.dtype) * _magnitude(Symbolic(Lk, lk, Uk, uk), ctx)
      e_lo, e_hi = fp.round_down(e_lo - err), fp.round_up(e_hi + err)
      e_lo = jnp.maximum(e_lo, fp.round_down(lo_k - mid_hi))
      e_hi = jnp.minimum(e_hi, fp.round_up(hi_k - mid_lo))
    else:
      e_lo, e_hi = jnp.maximum(e_lo, lo_k - mid_hi), jnp.minimum(e_hi, hi_k - mid_lo)
    e_hi = jnp.maximum(e_lo, e_hi)
  e_lo, e_hi = jnp.where(use, e_lo, 0), jnp.where(use, e_hi, 0)
  cols = jax.nn.one_hot(start + jnp.arange(k), n, dtype=L.dtype).T  # (n, k): e_start, ..., e_start+k-1
  L = L.at[:, idx].set(jnp.where(use, Mk + cols, Lk))
  U = U.at[:, idx].set(jnp.where(use, Mk + cols, Uk))
  l = l.at[idx].set(jnp.where(use, mk, lk))
  u = u.at[idx].set(jnp.where(use, mk, uk))
  centre = (e_lo + e_hi) / 2
  radius = jnp.maximum(e_hi - centre, centre - e_lo)
  if ctx.sound:
    radius = fp.round_up(radius)
  put = lambda a, v: jax.lax.dynamic_update_slice(a, v, (start,))
  ctx = ctx._replace(center=put(ctx.center, centre), radius=put(ctx.radius, radius),
                     xmax=put(ctx.xmax, jnp.maximum(jnp.abs(e_lo), jnp.abs(e_hi))))
  return Symbolic(L.reshape(s.L.shape), l.reshape(s.l.shape), U.reshape(s.U.shape), u.reshape(s.u.shape)), ctx
