"""Linear relaxations of activations: lines below and above the function over an interval.

A relaxation of ``y = act(x)`` on ``[lo, hi]`` is a pair of lines with
``lower_slope * x + lower_offset <= act(x) <= upper_slope * x + upper_offset`` for every ``x`` in
the interval, elementwise. In sound mode the offsets are rounded outward so the inequality holds
for the float slopes actually used.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp

from qbound import dynamic_rounding
from qbound import graph as G
from qbound.bounds import choice, fp, saturation


class Relaxation(NamedTuple):
  lower_slope: jnp.ndarray
  lower_offset: jnp.ndarray
  upper_slope: jnp.ndarray
  upper_offset: jnp.ndarray


def relu_default_alpha(lo, hi):
  """CROWN's adaptive lower slope: 1 where the interval is mostly positive, else 0."""
  return (hi >= -lo).astype(lo.dtype)


def relu(lo, hi, alpha=None, *, sound: bool = True) -> Relaxation:
  """The triangle relaxation of ReLU on ``[lo, hi]``.

  Stable neurons are exact (slope 1 if ``lo >= 0``, 0 if ``hi <= 0``). For unstable ones the upper
  line is the chord through ``(lo, 0)`` and ``(hi, hi)``; the lower line is ``alpha * x`` with
  ``alpha`` in [0, 1] (CROWN's adaptive choice when not given). Reference: Ehlers 2017; Wong &
  Kolter, ICML 2018; Zhang et al., NeurIPS 2018.
  """
  dtype = lo.dtype
  active = lo >= 0
  inactive = hi <= 0
  unstable = ~(active | inactive)
  width = jnp.where(unstable, hi - lo, 1)
  chord = jnp.where(unstable, hi / width, 0)
  offset = -chord * lo
  if sound:
    # Valid for the float chord used: above relu at both ends (relu is convex, so in between too).
    at_hi = hi - chord * hi
    u = fp.unit_roundoff(dtype)
    slack = 2 * u * (jnp.abs(chord * lo) + jnp.abs(hi) + jnp.abs(chord * hi)) + fp.tiny(dtype)
    offset = jnp.maximum(offset, at_hi) + slack
  upper_slope = jnp.where(active, 1, chord).astype(dtype)
  upper_offset = jnp.where(unstable, offset, 0).astype(dtype)
  if alpha is None:
    alpha = relu_default_alpha(lo, hi)
  alpha = jnp.clip(alpha, 0, 1).astype(dtype)
  lower_slope = jnp.where(active, 1, jnp.where(inactive, 0, alpha)).astype(dtype)
  return Relaxation(lower_slope, jnp.zeros_like(lo), upper_slope, upper_offset)


class DiffRelaxation(NamedTuple):
  """Lines bounding ``h = relu(zq + d) - relu(zq)`` by ``p * d + q * zq + r`` (lower and upper)."""

  lower_d: jnp.ndarray
  lower_q: jnp.ndarray
  lower_r: jnp.ndarray
  upper_d: jnp.ndarray
  upper_q: jnp.ndarray
  upper_r: jnp.ndarray


def delta_chord_slopes(dl, du):
  """The chords' slopes (lower, upper) of :func:`delta_lines`: the default relaxation."""
  pos = dl >= 0
  neg = du <= 0
  mixed = ~(pos | neg)
  width = jnp.where(mixed, du - dl, 1)
  upper = jnp.where(mixed, du / width, jnp.where(pos, 1, 0)).astype(dl.dtype)
  lower = jnp.where(mixed, -dl / width, jnp.where(neg, 1, 0)).astype(dl.dtype)
  return lower, upper


def delta_lines(dl, du, lower_slope=None, upper_slope=None, *, sound: bool = True):
  """Lines around ``h = phi(zq + d) - phi(zq)`` from the difference alone, for monotone 1-Lipschitz
  ``phi`` (ReLU, clip): ``h`` lies between ``min(d, 0)`` and ``max(d, 0)`` (ReluDiff, Paulsen,
  Wang, Wang, ICSE 2020; NeuroDiff, Paulsen, Wang, Wang, Wang, ASE 2020).

  Any slope ``a`` in [0, 1] gives valid lines over ``[dl, du]``: below the concave ``min(d, 0)``
  with offset ``min((1 - a) dl, -a du)`` and above the convex ``max(d, 0)`` with offset
  ``max(-a dl, (1 - a) du)``, both checked at the two ends. The chords are the default slopes;
  optimised slopes (:mod:`qbound.bounds.alpha`) tighten them. Returns
  ``(lower_slope, lower_offset, upper_slope, upper_offset)``.
  """
  dtype = dl.dtype
  default_lo, default_up = delta_chord_slopes(dl, du)
  lo_s = default_lo if lower_slope is None else jnp.clip(lower_slope, 0, 1).astype(dtype)
  up_s = default_up if upper_slope is None else jnp.clip(upper_slope, 0, 1).astype(dtype)
  lo_o = jnp.minimum((1 - lo_s) * dl, -lo_s * du)
  up_o = jnp.maximum(-up_s * dl, (1 - up_s) * du)
  if sound:
    u = fp.unit_roundoff(dtype)
    lo_o = lo_o - 3 * u * (jnp.abs(dl) + jnp.abs(du)) - fp.tiny(dtype)
    up_o = up_o + 3 * u * (jnp.abs(dl) + jnp.abs(du)) + fp.tiny(dtype)
  return lo_s, lo_o, up_s, up_o


def relu_gap(lo, hi):
  """Largest vertical gap of :func:`relu`'s default relaxation over ``[lo, hi]`` (0 if stable)."""
  return jnp.where((lo >= 0) | (hi <= 0), 0, jnp.minimum(hi, -lo))


def relu_diff(zl, zu, ql, qu, dl, du, params=None, *, sound: bool = True) -> DiffRelaxation:
  """Linear bounds on ``relu(z) - relu(zq)`` in terms of ``d = z - zq`` and ``zq``.

  Per neuron, the tighter of two families is used (by the largest gap between its lines at the
  default slopes):

  * from the difference alone, :func:`delta_lines` (exact when both neurons are active or both
    inactive);
  * from the two ReLUs' own relaxations written with ``z = zq + d`` (exact when each neuron is
    stable, e.g. ``h = z`` when z is active and zq inactive).

  Args:
    zl, zu: bounds of the pre-activation z of f.
    ql, qu: bounds of the pre-activation zq of f_q.
    dl, du: bounds of ``d = z - zq``.
    params: optional slopes to optimise: ``d_lower``, ``d_upper`` (for :func:`delta_lines`),
      ``z`` and ``q`` (lower slopes of the two ReLUs' relaxations).
    sound: outward-rounded offsets.
  """
  params = params or {}
  rz = relu(zl, zu, params.get("z"), sound=sound)
  rq = relu(ql, qu, params.get("q"), sound=sound)
  # relu(z) - relu(zq) >= (lower of relu(z)) - (upper of relu(zq)), with z = zq + d.
  pair = DiffRelaxation(
      lower_d=rz.lower_slope, lower_q=rz.lower_slope - rq.upper_slope, lower_r=rz.lower_offset - rq.upper_offset,
      upper_d=rz.upper_slope, upper_q=rz.upper_slope - rq.lower_slope, upper_r=rz.upper_offset - rq.lower_offset)
  both_active = (zl >= 0) & (ql >= 0)
  both_inactive = (zu <= 0) & (qu <= 0)
  lo_s, lo_o, up_s, up_o = delta_lines(dl, du, params.get("d_lower"), params.get("d_upper"), sound=sound)
  one, zero = jnp.ones_like(lo_s), jnp.zeros_like(lo_s)
  lo_s = jnp.where(both_active, one, jnp.where(both_inactive, zero, lo_s))
  up_s = jnp.where(both_active, one, jnp.where(both_inactive, zero, up_s))
  lo_o = jnp.where(both_active | both_inactive, zero, lo_o)
  up_o = jnp.where(both_active | both_inactive, zero, up_o)
  chords = DiffRelaxation(lower_d=lo_s, lower_q=zero, lower_r=lo_o, upper_d=up_s, upper_q=zero, upper_r=up_o)
  gap_pair = relu_gap(zl, zu) + relu_gap(ql, qu)
  gap_chords = jnp.where(both_active | both_inactive, 0, jnp.maximum(jnp.abs(dl), jnp.abs(du)))
  if sound:
    # The pair family subtracts slopes and offsets in float: widen by those roundings times |zq|.
    u = fp.unit_roundoff(zl.dtype)
    qmag = jnp.maximum(jnp.abs(ql), jnp.abs(qu))
    pair = pair._replace(
        lower_r=pair.lower_r - 2 * u * (jnp.abs(rz.lower_offset) + jnp.abs(rq.upper_offset)
                                        + jnp.abs(pair.lower_q) * qmag) - fp.tiny(zl.dtype),
        upper_r=pair.upper_r + 2 * u * (jnp.abs(rz.upper_offset) + jnp.abs(rq.lower_offset)
                                        + jnp.abs(pair.upper_q) * qmag) + fp.tiny(zl.dtype))
  # The pair's lines only where some ReLU's phase is open; one choice for all six fields.
  gap_pair = jnp.where(both_active | both_inactive, jnp.inf, gap_pair)
  return choice.least_gap((chords, pair), (gap_chords, gap_pair))


def clip(lo, hi, low_cut, high_cut, *, sound: bool = True) -> Relaxation:
  """Parallel-line relaxation of ``clip(x, low_cut, high_cut)`` on ``[lo, hi]``.

  Both lines have the chord's slope; their offsets are the extremes of ``clip(x) - slope * x``,
  a piecewise-linear function whose extremes sit at the interval's ends or the kinks. Exact when
  the interval lies in one linear piece. (The cuts may be infinite.)
  """
  dtype = lo.dtype

  def phi(x):
    return jnp.minimum(jnp.maximum(x, low_cut), high_cut)

  width = hi - lo
  flat = width <= 0
  slope = jnp.where(flat, 0, (phi(hi) - phi(lo)) / jnp.where(flat, 1, width)).astype(dtype)
  points = [lo, hi, jnp.clip(low_cut, lo, hi), jnp.clip(high_cut, lo, hi)]
  values = [phi(x) - slope * x for x in points]
  upper = functools.reduce(jnp.maximum, values)
  lower = functools.reduce(jnp.minimum, values)
  if sound:
    u = fp.unit_roundoff(dtype)
    spread = functools.reduce(jnp.maximum, [jnp.abs(phi(x)) + jnp.abs(slope * x) for x in points])
    upper = upper + 2 * u * spread + fp.tiny(dtype)
    lower = lower - 2 * u * spread - fp.tiny(dtype)
  return Relaxation(slope, lower, slope, upper)


def clip_value(x, cuts):
  """``min(max(x, lo), hi)`` for ``cuts = (lo, hi)`` (either may be infinite)."""
  return jnp.minimum(jnp.maximum(x, cuts[0]), cuts[1])


def clip_gap_lines(a, b, cuts_f, cuts_q, slope=None, *, sound: bool = True):
  """Parallel lines ``slope * x + (lower, upper)`` around ``e(x) = clip_f(x) - clip_q(x)`` on ``[a, b]``.

  ``e`` is what two clips with different cuts add to the difference of their inputs' images (0
  everywhere when the cuts are the same). It is piecewise linear with kinks at the four cuts, so
  for any slope ``k`` the extremes of ``e(x) - k x`` over ``[a, b]`` sit at the ends or at the cuts
  inside it: evaluating those six points gives the tightest offsets, valid for every ``k`` (the
  chord's by default). Returns ``(slope, lower_offset, upper_offset)``.
  """
  dtype = a.dtype

  def gap(x):
    return clip_value(x, cuts_f) - clip_value(x, cuts_q)

  if slope is None:
    width = b - a
    flat = width <= 0
    slope = jnp.where(flat, 0, (gap(b) - gap(a)) / jnp.where(flat, 1, width))
  slope = jnp.broadcast_to(jnp.asarray(slope, dtype), a.shape)
  points = [a, b] + [jnp.clip(jnp.broadcast_to(c, a.shape), a, b) for c in (*cuts_f, *cuts_q)]
  values = [gap(x) - slope * x for x in points]
  upper = functools.reduce(jnp.maximum, values)
  lower = functools.reduce(jnp.minimum, values)
  if sound:
    # gap(x) - k x takes three roundings: within 3u of |clip_f(x)| + |clip_q(x)| + |k x|.
    spread = functools.reduce(jnp.maximum, [jnp.abs(clip_value(x, cuts_f)) + jnp.abs(clip_value(x, cuts_q))
                                            + jnp.abs(slope * x) for x in points])
    upper = upper + 4 * fp.unit_roundoff(dtype) * spread + fp.tiny(dtype)
    lower = lower - 4 * fp.unit_roundoff(dtype) * spread - fp.tiny(dtype)
  same = (jnp.broadcast_to(cuts_f[0], a.shape) == cuts_q[0]) & (jnp.broadcast_to(cuts_f[1], a.shape) == cuts_q[1])
  zero = jnp.zeros_like(a)
  return (jnp.where(same, zero, slope).astype(dtype), jnp.where(same, zero, lower).astype(dtype),
          jnp.where(same, zero, upper).astype(dtype))


def _clip_pieces(zl, zu, ql, qu, cuts):
  """Where one clip maps both intervals through its identity piece, and where onto one constant."""
  identity = (cuts[0] <= jnp.minimum(zl, ql)) & (jnp.maximum(zu, qu) <= cuts[1])
  constant = ((zu <= cuts[0]) & (qu <= cuts[0])) | ((zl >= cuts[1]) & (ql >= cuts[1]))
  return identity, constant


def _same_clip_lines(dl, du, identity, constant, params, sound):
  """Lines in ``d`` around ``phi(zq + d) - phi(zq)`` for ONE clip ``phi`` (monotone, 1-Lipschitz):
  :func:`delta_lines`, exactly ``d`` on the identity piece and 0 on a constant one."""
  lo_s, lo_o, up_s, up_o = delta_lines(dl, du, params.get("d_lower"), params.get("d_upper"), sound=sound)
  one, zero = jnp.ones_like(lo_s), jnp.zeros_like(lo_s)
  lo_s = jnp.where(identity, one, jnp.where(constant, zero, lo_s))
  up_s = jnp.where(identity, one, jnp.where(constant, zero, up_s))
  lo_o = jnp.where(identity | constant, zero, lo_o)
  up_o = jnp.where(identity | constant, zero, up_o)
  return lo_s, lo_o, up_s, up_o


def clip_diff(zl, zu, ql, qu, dl, du, cuts_f, cuts_q, params=None, *, sound: bool = True) -> DiffRelaxation:
  """Linear bounds on ``clip_f(z) - clip_q(zq)`` in ``d = z - zq`` and ``zq``, for clips whose cuts
  may differ (f_q's fake quantization saturates at its range while f, aligned beside it, has an
  identity clip at +-inf; or relu6 beside relu, hard tanh beside a wider one).

  Only for the SAME monotone 1-Lipschitz ``phi`` does ``phi(zq + d) - phi(zq)`` lie between
  ``min(d, 0)`` and ``max(d, 0)`` (ReluDiff's rule, Paulsen et al., ICSE 2020). With two clips,
  split off the difference of the two functions at one point:

  * ``A``: ``[clip_f(z) - clip_f(zq)] + e(zq)``, ``e = clip_f - clip_q`` read at ``zq`` in ``[ql, qu]``;
  * ``B``: ``[clip_q(z) - clip_q(zq)] + e(z)``, ``e`` read at ``z = zq + d`` in ``[zl, zu]``.

  The bracket takes ReluDiff's lines (exact on the identity or on one constant piece), ``e``
  the parallel lines of :func:`clip_gap_lines`; per neuron the family whose lines are closer
  (largest vertical gap) is used. With equal cuts ``e`` is exactly 0 and both are ReluDiff's rule.

  Args:
    zl, zu, ql, qu, dl, du: bounds of ``z``, ``zq`` and ``d``.
    cuts_f, cuts_q: ``(lo, hi)`` of each network's clip.
    params: optional slopes ``d_lower``, ``d_upper`` in [0, 1] of the bracket's lines.
    sound: outward-rounded offsets.
  """
  params = params or {}
  dtype = dl.dtype
  families = []
  for own, other_interval, on_z in ((cuts_f, (ql, qu), False), (cuts_q, (zl, zu), True)):
    identity, constant = _clip_pieces(zl, zu, ql, qu, own)
    lo_s, lo_o, up_s, up_o = _same_clip_lines(dl, du, identity, constant, params, sound)
    k, e_lo, e_hi = clip_gap_lines(*other_interval, cuts_f, cuts_q, sound=sound)
    # e(z) with z = zq + d puts k on both d and zq; e(zq) puts it on zq only.
    k_d = k if on_z else jnp.zeros_like(k)
    relaxation = DiffRelaxation(lower_d=lo_s + k_d, lower_q=k, lower_r=lo_o + e_lo,
                                upper_d=up_s + k_d, upper_q=k, upper_r=up_o + e_hi)
    if sound:  # the two offsets and the slopes were added in float
      u = fp.unit_roundoff(dtype)
      dmag = jnp.maximum(jnp.abs(dl), jnp.abs(du))
      relaxation = relaxation._replace(
          lower_r=relaxation.lower_r - 2 * u * (jnp.abs(lo_o) + jnp.abs(e_lo) + jnp.abs(k_d) * dmag) - fp.tiny(dtype),
          upper_r=relaxation.upper_r + 2 * u * (jnp.abs(up_o) + jnp.abs(e_hi) + jnp.abs(k_d) * dmag) + fp.tiny(dtype))
    width = jnp.maximum((up_s - lo_s) * dl, (up_s - lo_s) * du) + up_o - lo_o + e_hi - e_lo
    families.append((relaxation, width))
  (first, width_first), (second, width_second) = families
  out = choice.least_gap((first, second), (width_first, width_second))
  return DiffRelaxation(*[v.astype(dtype) for v in out])


def clip_diff_interval(z, zq, d, cuts_f, cuts_q, *, sound: bool = True):
  """Interval bounds of ``clip_f(z) - clip_q(zq)`` (the two families of :func:`clip_diff` as
  intervals, intersected with the range ``clip_f([z]) - clip_q([zq])``)."""
  (zl, zu), (ql, qu), (dl, du) = z, zq, d
  lo = clip_value(zl, cuts_f) - clip_value(qu, cuts_q)
  hi = clip_value(zu, cuts_f) - clip_value(ql, cuts_q)
  if sound:
    lo, hi = fp.round_down(lo), fp.round_up(hi)
  for own, (a, b) in ((cuts_f, (ql, qu)), (cuts_q, (zl, zu))):
    identity, constant = _clip_pieces(zl, zu, ql, qu, own)
    # The same clip on both: between min(d, 0) and max(d, 0), and within its own image's range.
    same_lo = jnp.maximum(jnp.minimum(dl, 0), clip_value(zl, own) - clip_value(qu, own))
    same_hi = jnp.minimum(jnp.maximum(du, 0), clip_value(zu, own) - clip_value(ql, own))
    if sound:
      same_lo = jnp.where(same_lo == jnp.minimum(dl, 0), same_lo, fp.round_down(same_lo))
      same_hi = jnp.where(same_hi == jnp.maximum(du, 0), same_hi, fp.round_up(same_hi))
    same_lo = jnp.where(identity, dl, jnp.where(constant, 0, same_lo))
    same_hi = jnp.where(identity, du, jnp.where(constant, 0, same_hi))
    _, e_lo, e_hi = clip_gap_lines(a, b, cuts_f, cuts_q, jnp.zeros_like(a), sound=sound)
    total_lo, total_hi = same_lo + e_lo, same_hi + e_hi
    if sound:
      total_lo = jnp.where(e_lo == 0, same_lo, fp.round_down(total_lo))
      total_hi = jnp.where(e_hi == 0, same_hi, fp.round_up(total_hi))
    lo, hi = jnp.maximum(lo, total_lo), jnp.minimum(hi, total_hi)
  return lo.astype(dl.dtype), hi.astype(dl.dtype)


# Largest distance below and above x of each rounding: round(x) in [x - 1/2, x + 1/2], etc.
ROUNDING_ERROR = {"nearest": (-0.5, 0.5), "away": (-0.5, 0.5), "floor": (-1.0, 0.0), "ceil": (0.0, 1.0), "none": (0.0, 0.0)}


def is_staircase(mode: str) -> bool:
  """Whether a rounding mode is an elementwise monotone staircase (its value at an interval's ends
  bounds it); a dynamic fake quantization is not (:mod:`qbound.dynamic_rounding`)."""
  return mode != dynamic_rounding.DYNAMIC


def dynamic_bounds(node: G.Node, lo, hi):
  """:func:`qbound.dynamic_rounding.bounds` of a dynamic rounding node (``lo``/``hi`` its input's
  bounds, possibly with leading batch axes)."""
  return dynamic_rounding.bounds(node.attrs[1], lo, hi, len(node.shape))


def rounding_range(node: G.Node, lo, hi, *, sound: bool = True):
  """Bounds of a rounding node's value for inputs in ``[lo, hi]`` (already through :func:`step_input`):
  the staircase at the ends; for a dynamic one its band, intersected with its step where it has one."""
  mode = node.attrs[0]
  if is_staircase(mode):
    fn = G.ROUNDING[mode]
    return fn(lo), fn(hi)
  below, above, flat, v_lo, v_hi = dynamic_error(node, lo, hi)[:5]
  low, high = lo + below, hi + above
  if sound:
    low, high = fp.round_down(low), fp.round_up(high)
  return jnp.where(flat, jnp.maximum(low, v_lo), low), jnp.where(flat, jnp.minimum(high, v_hi), high)


def offsets(node: G.Node, lo, hi, rest=None):
  """``(below, above)``: the rounding's value lies in ``[x + below, x + above]`` (arrays for a dynamic one)."""
  mode = node.attrs[0]
  if is_staircase(mode):
    return ROUNDING_ERROR[mode]
  return dynamic_error(node, lo, hi, rest)[:2]


def dynamic_error(node: G.Node, lo, hi, rest=None):
  """``(below, above, flat, v_lo, v_hi, over_top, over_bottom)`` of a dynamic rounding node: its value
  lies in ``[x + below, x + above]``, and in ``[v_lo, v_hi]`` where ``flat``. ``over_top`` and
  ``over_bottom`` are the parts of ``-below`` and ``above`` that only saturating entries reach, at most
  :func:`qbound.dynamic_rounding.joint_saturation`'s count of a group at once (0 for other scales).
  ``rest`` (``rms`` scales): an optional :class:`qbound.rms_rounding.Joint`, what the network proves of
  its saturations (:mod:`qbound.bounds.rms_rest`); other scales: optional bounds known to hold on the
  node's value, ``(lower, upper)`` (a sub-problem split on it, :mod:`qbound.bounds.tiesplit`)."""
  spec = node.attrs[1]
  if spec.norm == "rms":
    p = dynamic_rounding.saturation_parts(spec, lo, hi, len(node.shape), rest)
    return -(p.base + p.over_top), p.base + p.over_bottom, p.flat, p.v_lo, p.v_hi, p.over_top, p.over_bottom
  half, flat, v_lo, v_hi = dynamic_bounds(node, lo, hi)
  zero = jnp.zeros_like(half)
  if rest is None:
    return -half, half, flat, v_lo, v_hi, zero, zero
  # A sub-problem with the value in known bounds (a tie split): with v = x + e, e lies within
  # [value_lo - hi, value_hi - lo] as well as the band (rounded outward: these are offsets).
  value_lo, value_hi = dynamic_rounding.value_range(spec, lo, hi, len(node.shape), rest)
  below = jnp.maximum(-half, fp.round_down(value_lo - hi))
  above = jnp.minimum(half, fp.round_up(value_hi - lo))
  return below, above, flat, jnp.maximum(v_lo, value_lo), jnp.minimum(v_hi, value_hi), zero, zero


# Without floating-point margins (sound=False) a bound may sit a few ulps on the wrong side of the
# truth, and at a rounding step that is a whole quantization step: relu(x) * 9 over x in [-a, a]
# came out as [1.5e-8, 9a], and ceil made its lower end 1 for a true 0. Unsound bounds therefore
# enter rounding nodes widened by this many units of roundoff of their magnitude. They may also
# arrive crossed: a backward bound computed from large coefficients can miss by more than that
# near a point range (f_q's dead ReLU times 127: a lower bound 4e-6 for a true 0, intersected with
# the exact [0, 0]), and ceil then turned [4e-6, 0] into [1, 0]; crossed ends are put back in order.
UNSOUND_STEP_ULPS = 64


def step_input(lo, hi, sound: bool):
  """The bounds a rounding node rounds: as given when sound, else in order and widened
  (``UNSOUND_STEP_ULPS``)."""
  if sound:
    return lo, hi
  lo, hi = fp.unsound_order((lo, hi))
  slack = UNSOUND_STEP_ULPS * fp.unit_roundoff(lo.dtype) * (1 + jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
  return lo - slack, hi + slack


def rounding(lo, hi, mode: str, *, sound: bool = True, node: G.Node = None, rest=None) -> Relaxation:
  """Lines around a rounding staircase on ``[lo, hi]``: ``x + e_min <= round(x) <= x + e_max``,
  or the exact constant where the interval stays on one step. (The offsets are exact floats.)
  A dynamic rounding (``node`` given): its band ``x -+ half``, or its step's constant bounds
  (``rest``: see :func:`dynamic_error`)."""
  lo, hi = step_input(lo, hi, sound)
  one = jnp.ones_like(lo)
  if not is_staircase(mode):
    below, above, flat, v_lo, v_hi, over_top, over_bottom = dynamic_error(node, lo, hi, rest)
    slope = jnp.where(flat, 0, one)
    lines = (slope, jnp.where(flat, v_lo, below), slope, jnp.where(flat, v_hi, above))
    if saturation.applies(node):  # q = x + e: the lower offset holds the clips past the top
      return saturation.SaturatingRelaxation(*lines, jnp.where(flat, 0, over_top), jnp.where(flat, 0, over_bottom))
    return Relaxation(*lines)
  fn = G.ROUNDING[mode]
  below, above = ROUNDING_ERROR[mode]
  flat = fn(lo) == fn(hi)
  slope = jnp.where(flat, 0, one)
  return Relaxation(slope, jnp.where(flat, fn(lo), below), slope, jnp.where(flat, fn(lo), above))


def rounding_diff(zl, zu, ql, qu, mode_f: str, mode_q: str, *, sound: bool = True, nodes=None,
                  rest=None) -> DiffRelaxation:
  """Lines around ``round_f(z) - round_q(zq)``: ``d`` plus the difference of the two rounding
  errors, exactly 0 where both round the same way and stay on the same step. A dynamic rounding
  (``nodes = (nf, nq)`` given) beside the identity: ``d + zq - q`` with ``q`` between its
  step's constant bounds where it has one, else ``d`` plus its band (``rest``: f_q's, see
  :func:`dynamic_error`)."""
  zl, zu = step_input(zl, zu, sound)
  ql, qu = step_input(ql, qu, sound)
  one, zero = jnp.ones_like(zl), jnp.zeros_like(zl)
  if is_staircase(mode_f) and is_staircase(mode_q):
    lo_f, hi_f = ROUNDING_ERROR[mode_f]
    lo_q, hi_q = ROUNDING_ERROR[mode_q]
    fn_f, fn_q = G.ROUNDING[mode_f], G.ROUNDING[mode_q]
    same = (mode_f == mode_q != "none") & (fn_f(zl) == fn_f(zu)) & (fn_q(ql) == fn_q(qu)) & (fn_f(zl) == fn_q(ql))
    slope = jnp.where(same, zero, one)
    return DiffRelaxation(slope, zero, jnp.where(same, zero, lo_f - hi_q), slope, zero, jnp.where(same, zero, hi_f - lo_q))
  nf, nq = nodes
  lo_f, hi_f = offsets(nf, zl, zu)
  lo_q, hi_q = offsets(nq, ql, qu, rest)
  low, high = lo_f - hi_q + zero, hi_f - lo_q + zero
  if sound:
    low, high = fp.round_down(low), fp.round_up(high)
  if mode_f == "none":  # f's identity beside f_q's dynamic rounding: d + zq - q, q on its step
    _, _, flat, v_lo, v_hi, over_top, over_bottom = dynamic_error(nq, ql, qu, rest)
    slope_q = jnp.where(flat, one, zero)
    lines = (one, slope_q, jnp.where(flat, -v_hi, low), one, slope_q, jnp.where(flat, -v_lo, high))
    if saturation.applies(nq):  # d - e: the lower offset holds the clips past the bottom
      return saturation.SaturatingDiffRelaxation(*lines, jnp.where(flat, 0, over_bottom), jnp.where(flat, 0, over_top))
    return DiffRelaxation(*lines)
  return DiffRelaxation(one, zero, low, one, zero, high)
