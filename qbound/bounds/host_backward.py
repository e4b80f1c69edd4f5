"""The backward pass of the NumPy search's bounds (:mod:`qbound.bounds.host_bounds`), in float64.

CROWN's backward pass (Zhang et al., NeurIPS 2018) on a paired chain in the variables ``d = z - z_q``
and ``z_q`` (NeuroDiff's differential form, Paulsen et al., ASE 2020): :func:`backward` bounds linear
rows over each piece from the per-piece relaxation lines of every layer before them
(:func:`pair_lines` at ReLU layers, the step's error interval at f_q's own roundings and clips);
:func:`backward_node` tightens a layer's bounds of ``d`` (and ``z_q``, ``z``) with it; and
:func:`saturation_rest` bounds the saturations of qwix's ``rms,c`` roundings on the network with rows
from each piece's centre (the compiled passes' :mod:`qbound.bounds.rms_rest`).

Soundness in float64: every step is widened by :data:`~qbound.bounds.host_float.RELATIVE_SLACK` of
the magnitude of every term it sums, as in :mod:`qbound.bounds.host_bounds`.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.host_bounds import Chain
  >>> from qbound.bounds.host_backward import backward
  >>> w = np.array([[1.0, -1.0]])                       # f = x0 - x1, f_q = x0 - x1 - 0.25
  >>> chain = Chain((("affine", w, np.zeros(1), w, np.array([-0.25])),), n_in=2, n_out=1)
  >>> lo, hi = np.array([[0.0, 0.0]]), np.array([[1.0, 1.0]])
  >>> mags = [(np.zeros((1, 2)), np.ones((1, 2)))]
  >>> low = backward(chain, 1, np.array([[1.0], [-1.0]]), np.zeros((2, 1)), {}, mags, lo, hi)
  >>> low.round(6).tolist()                             # 0.25 <= d <= 0.25
  [[0.25, -0.25]]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from qbound import dynamic_rounding, rms_rounding
from qbound.bounds.host_float import EPS, RELATIVE_SLACK, TINY, down, up
from qbound.bounds.host_steps import F_Q_STEPS, chain_values

if TYPE_CHECKING:  # (host_bounds imports this module)
  from qbound.bounds.host_bounds import Chain


def times(forms, matrix):
  """``forms @ matrix`` over the last axis, as one 2-D product: NumPy's stacked ``matmul`` on
  ``(256, 6, 16)`` forms took 2.3x as long as one BLAS product of the ``(1536, 16)`` rows with one
  BLAS thread, 14x with several (docs/results/host-search.md)."""
  return (forms.reshape(-1, forms.shape[-1]) @ matrix).reshape(forms.shape[:-1] + matrix.shape[1:])


class PairLines(NamedTuple):
  """One ReLU layer's lines, per neuron: ``h = relu(z) - relu(z_q)`` between ``p d + q z_q + r``
  (lower and upper), and ``relu(z_q)`` between ``a z_q`` and ``s z_q + t``; with the magnitudes of
  ``d`` and ``z_q`` at the layer's input (for the rounding of the backward pass)."""

  p_l: np.ndarray
  q_l: np.ndarray
  r_l: np.ndarray
  p_u: np.ndarray
  q_u: np.ndarray
  r_u: np.ndarray
  a: np.ndarray
  s: np.ndarray
  t: np.ndarray
  d_max: np.ndarray
  q_max: np.ndarray


def _relu_lines(lo, hi):
  """The triangle relaxation ``a z <= relu(z) <= s z + t`` on ``[lo, hi]``, CROWN's adaptive ``a``,
  the chord's offset raised to hold at both ends in float64."""
  active, inactive = lo >= 0, hi <= 0
  unstable = ~(active | inactive)
  s = np.where(active, 1.0, np.where(unstable, hi / np.where(unstable, hi - lo, 1.0), 0.0))
  t = np.where(unstable, np.maximum(-s * lo, hi - s * hi), 0.0)
  t = np.where(unstable, t + 2 * EPS * (np.abs(s * lo) + np.abs(hi) + np.abs(s * hi)) + TINY, 0.0)
  a = np.where(active, 1.0, np.where(unstable, (hi >= -lo).astype(np.float64), 0.0))
  return a, s, t


def pair_lines(zl, zu, ql, qu, dl, du) -> PairLines:
  """Lines of ``relu(z_q + d) - relu(z_q)`` in ``d`` and ``z_q``: per neuron the tighter of the two
  ReLUs' own lines (``z = z_q + d``) and the chords of ``min(d, 0)``, ``max(d, 0)`` (as
  :func:`qbound.bounds.relax.relu_diff`)."""
  az, sz, tz = _relu_lines(zl, zu)
  aq, sq, tq = _relu_lines(ql, qu)
  q_mag = np.maximum(np.abs(ql), np.abs(qu))
  # relu(z) - relu(zq) >= az (zq + d) - (sq zq + tq); <= sz (zq + d) + tz - aq zq; the slope
  # differences rounded: widened by their rounding times |zq|.
  pair_l = (az, az - sq, -tq - 2 * EPS * (tq + np.abs(az - sq) * q_mag) - TINY)
  pair_u = (sz, sz - aq, tz + 2 * EPS * (tz + np.abs(sz - aq) * q_mag) + TINY)
  straddle = (dl < 0) & (du > 0)
  width = np.where(straddle, du - dl, 1.0)
  lo_s = np.where(straddle, -dl / width, np.where(du <= 0, 1.0, 0.0))
  up_s = np.where(straddle, du / width, np.where(dl >= 0, 1.0, 0.0))
  slack = 4 * EPS * (np.abs(dl) + np.abs(du)) + TINY
  lo_o = np.minimum((1 - lo_s) * dl, -lo_s * du) - slack
  up_o = np.maximum(-up_s * dl, (1 - up_s) * du) + slack
  both_active = (zl >= 0) & (ql >= 0)
  both_inactive = (zu <= 0) & (qu <= 0)
  zero = np.zeros_like(zl)
  one = np.ones_like(zl)
  lo_s = np.where(both_active, one, np.where(both_inactive, zero, lo_s))
  up_s = np.where(both_active, one, np.where(both_inactive, zero, up_s))
  lo_o = np.where(both_active | both_inactive, zero, lo_o)
  up_o = np.where(both_active | both_inactive, zero, up_o)
  gap = lambda lo, hi: np.where((lo >= 0) | (hi <= 0), 0.0, np.minimum(hi, -lo))  # noqa: E731
  gap_pair = gap(zl, zu) + gap(ql, qu)
  gap_chords = np.where(both_active | both_inactive, 0.0, np.maximum(np.abs(dl), np.abs(du)))
  use_pair = (gap_pair < gap_chords) & ~(both_active | both_inactive)
  pick = lambda a, b: np.where(use_pair, a, b)  # noqa: E731
  return PairLines(pick(pair_l[0], lo_s), pick(pair_l[1], zero), pick(pair_l[2], lo_o),
                    pick(pair_u[0], up_s), pick(pair_u[1], zero), pick(pair_u[2], up_o), aq, sq, tq,
                    np.maximum(np.abs(dl), np.abs(du)), q_mag)


def backward(chain: Chain, upto: int, rows_d, rows_q, lines: dict, mags: list, lo, hi):
  """Lower bounds of ``rows_d . d + rows_q . z_q`` at the output of layer ``upto - 1``, over each
  piece: CROWN's backward pass (Zhang et al., NeurIPS 2018) on the pair in the variables ``d`` and
  ``z_q`` (NeuroDiff's differential form, Paulsen et al., ASE 2020). ``rows_*``: ``(R, m)`` rows,
  the same for every piece (or ``(k, R, m)``, each piece's own); ``lines[j]``: :class:`PairLines` of ReLU layer ``j``, or the
  per-piece interval ``(e_lo, e_hi)`` of f_q's step ``s(v) - v`` at a rounding or clip layer; ``mags[j]``:
  ``(d_max, q_max)`` at layer ``j``'s input. Returns ``(k, R)`` bounds, widened by the float64
  rounding of every step.

  The rows are kept as one array ``[lam_d | lam_q]``, so that an affine layer is one product with
  ``[[W, W - W_q], [0, W_q]]``; they stay ``(R, 2m)`` (one product for all pieces) until the first
  ReLU layer makes them the pieces' own, ``(k, R, 2m)``. A ReLU layer picks each row entry's line by
  its sign as ``lam * upper + max(lam, 0) * (lower - upper)``. The rounding's slack is summed
  against ``A >= |lam|``, a bound that is the same for every piece (``|W|`` products, and the lines'
  largest slopes over the batch): a ``(k, 2m)`` by ``(2m, R)`` product per layer instead of ``|lam|``
  over ``(k, R, 2m)`` (docs/results/host-search.md)."""
  k = lo.shape[0]
  lam = np.concatenate([rows_d, rows_q], axis=-1)  # (R, 2m) until the first ReLU layer, then (k, R, 2m)
  bound = np.abs(lam) if lam.ndim == 2 else np.abs(lam).max(axis=0)  # A >= |lam|, for every piece
  const = np.zeros(lam.shape[:-1])
  err = np.zeros((k, lam.shape[-2]))
  for j in range(upto - 1, -1, -1):
    layer = chain.layers[j]
    d_in, q_in = mags[j]
    if layer[0] == "affine":
      _, w, b, wq, bq = layer
      m_out, m_in = w.shape
      block = np.zeros((2 * m_out, 2 * m_in))
      block[:m_out, :m_in], block[:m_out, m_in:], block[m_out:, m_in:] = w, w - wq, wq
      const = const + times(lam, np.concatenate([b - bq, bq]))
      # Every term's magnitude, summed: |lam_d| (|W| d_in + |W - W_q| q_in + |b - b_q|) + |lam_q| (|W_q| q_in + |b_q|).
      mag_d = d_in @ np.abs(w).T + q_in @ np.abs(w - wq).T + np.abs(b - bq)
      mag_q = q_in @ np.abs(wq).T + np.abs(bq)
      err += np.concatenate([mag_d, mag_q], axis=1) @ bound.T
      lam = times(lam, block)
      bound = bound @ np.abs(block)
    elif layer[0] in F_Q_STEPS:
      # z_q' = z_q + e and d' = d - e (e in [e_lo, e_hi] per piece): the rows keep their
      # coefficients and gain the least of (lam_q - lam_d) e, per piece.
      e_lo, e_hi = lines[j][:2]
      m = lam.shape[-1] // 2
      c = lam[..., m:] - lam[..., :m]
      c_pos, c_neg = np.maximum(c, 0.0), np.minimum(c, 0.0)
      if len(lines[j]) > 2:  # at most `count` entries beyond the band [n_lo, n_hi] at once (host_steps.step_error)
        n_lo, n_hi, count = lines[j][2:]
        if lam.ndim == 2:
          const = const + n_lo @ c_pos.T + n_hi @ c_neg.T
          c_pos, c_neg = c_pos[None], c_neg[None]
        else:
          const = const + np.einsum("krm,km->kr", c_pos, n_lo) + np.einsum("krm,km->kr", c_neg, n_hi)
        # What each entry adds when it leaves the band: c (e - n) <= 0, as e_lo <= n_lo and n_hi <= e_hi
        # (host_steps._dynamic_error); the `count` most negative of them at once. One (k, R, m) array
        # built in place: this is the backward pass's costliest step on rms layers.
        beyond = c_pos * (e_lo - n_lo)[:, None]
        beyond += c_neg * (e_hi - n_hi)[:, None]
        if count == 1:
          const = const + beyond.min(axis=-1)
        else:
          const = const + np.partition(beyond, count - 1, axis=-1)[..., :count].sum(axis=-1)
      elif lam.ndim == 2:
        const = const + e_lo @ c_pos.T + e_hi @ c_neg.T
      else:
        const = const + np.einsum("krm,km->kr", c_pos, e_lo) + np.einsum("krm,km->kr", c_neg, e_hi)
      err += np.maximum(np.abs(e_lo), np.abs(e_hi)) @ (bound[:, :m] + bound[:, m:]).T
    else:
      ln = lines[j]
      m = lam.shape[-1] // 2
      # lam_d >= 0 takes the lower line of h, lam_q >= 0 the lower line a z_q of relu(z_q); the
      # z_q-coefficients of h's lines go to lam_q.
      lower = np.concatenate([ln.p_l, ln.a], axis=1)[:, None]
      upper = np.concatenate([ln.p_u, ln.s], axis=1)[:, None]
      up = np.maximum(lam, 0.0)
      new = lam * upper
      new += up * (lower - upper)
      new[..., m:] += lam[..., :m] * ln.q_u[:, None]
      new[..., m:] += up[..., :m] * (ln.q_l - ln.q_u)[:, None]
      offset_u = np.concatenate([ln.r_u, ln.t], axis=1)
      offset_gap = np.concatenate([ln.r_l - ln.r_u, -ln.t], axis=1)
      if lam.ndim == 2:  # the rows are still every piece's: two (k, 2m) by (2m, R) products
        const = const + offset_u @ lam.T + offset_gap @ up.T
      else:
        const = const + np.einsum("krm,km->kr", lam, offset_u) + np.einsum("krm,km->kr", up, offset_gap)
      # |new_d| d_max + |new_q| q_max + |step| <= |lam_d| mag_d + |lam_q| mag_q (either line).
      p_max = np.maximum(np.abs(ln.p_l), np.abs(ln.p_u))
      q_max = np.maximum(np.abs(ln.q_l), np.abs(ln.q_u))
      mag_d = p_max * ln.d_max + q_max * ln.q_max + np.maximum(np.abs(ln.r_l), np.abs(ln.r_u))
      mag_q = np.maximum(ln.a, ln.s) * ln.q_max + ln.t
      err += np.concatenate([mag_d, mag_q], axis=1) @ bound.T
      # |new_d| <= |lam_d| max|p|, |new_q| <= |lam_q| max(a, s) + |lam_d| max|q|, over the batch.
      bound_d = bound[:, :m] * p_max.max(axis=0)
      bound_q = bound[:, m:] * np.maximum(ln.a, ln.s).max(axis=0) + bound[:, :m] * q_max.max(axis=0)
      bound = np.concatenate([bound_d, bound_q], axis=1)
      lam = new
  if lam.ndim == 2:  # no ReLU layer on the way (a rounding or clip made the constants the pieces' own)
    lam = np.broadcast_to(lam, (k,) + lam.shape)
    const = const if const.ndim == 2 else np.broadcast_to(const, (k,) + const.shape)
  # At the input d = 0 and z_q = x.
  lam_q = lam[..., lam.shape[-1] // 2:]
  a, b = lam_q * lo[:, None], lam_q * hi[:, None]
  value = const + np.minimum(a, b).sum(-1)
  xmax = np.maximum(np.abs(lo), np.abs(hi))
  err += xmax @ bound[:, bound.shape[-1] // 2:].T + np.abs(const)
  return value - RELATIVE_SLACK * err


def meet(zl, zu, ql, qu, dl, du):
  """``z = z_q + d``: each pair of bounds tightens the third (rounded outward)."""
  zl, zu = np.maximum(zl, down(ql + dl)), np.minimum(zu, up(qu + du))
  ql, qu = np.maximum(ql, down(zl - du)), np.minimum(qu, up(zu - dl))
  dl, du = np.maximum(dl, down(zl - qu)), np.minimum(du, up(zu - ql))
  return zl, zu, ql, qu, dl, du


def backward_node(chain, upto, lines, mags, lo, hi, bounds, columns, which: str = "d"):
  """Bounds of ``d`` at the output of layer ``upto - 1`` by the backward pass (rows +-e on d, for
  the neurons ``columns`` only; with ``which == "all"`` on z_q and z too), met with
  ``bounds`` and ``z = z_q + d``. (Rows on z_q as well cost 40% more CPU for 8% fewer pieces on
  5-12-8-8-2: docs/results/exactness.md.)"""
  k = lo.shape[0]
  m = bounds[0].shape[1]
  c = len(columns)
  unit = np.zeros((c, m))
  unit[np.arange(c), columns] = 1.0
  zero = np.zeros_like(unit)
  # Row blocks: +d, -d, then (all) +z_q, -z_q, +z, -z; z = z_q + d in the pass's variables.
  on_d, on_q = [unit, -unit], [zero, zero]
  if which == "all":
    on_d, on_q = on_d + [zero, zero, unit, -unit], on_q + [unit, -unit, unit, -unit]
  v = backward(chain, upto, np.concatenate(on_d), np.concatenate(on_q), lines, mags, lo, hi).reshape(k, len(on_d), c)
  zl, zu, ql, qu, dl, du = (b.copy() for b in bounds)
  pairs = [(dl, du)] + ([(ql, qu), (zl, zu)] if which == "all" else [])
  for i, (low, high) in enumerate(pairs):
    low[:, columns] = np.maximum(low[:, columns], v[:, 2 * i])
    high[:, columns] = np.minimum(high[:, columns], -v[:, 2 * i + 1])
  return meet(zl, zu, ql, qu, dl, du)


def saturation_rest(chain: Chain, j: int, lines: dict, mags: list, lo, hi, ql, qu):
  """What the network proves of the saturations of the ``rms,c`` layer ``j`` (a
  :class:`qbound.rms_rounding.Joint` of ``(k, *shape)`` arrays), or None where the layer cannot
  saturate or has no joint term: the rows of :func:`qbound.rms_rounding.saturation_rows` at each
  piece's centre, walked back to the input by :func:`backward` (the compiled passes'
  :mod:`qbound.bounds.rms_rest`, in float64). ``ql, qu``: bounds of the layer's input ``z_q``."""
  layer = chain.layers[j]
  if layer[0] != "dynamic":
    return None
  _, spec, shape = layer
  if spec.axes is not None or dynamic_rounding.joint_saturation(spec, shape) is None:
    return None
  k, n = ql.shape
  rel = rms_rounding.slack(n)
  d = float(spec.divisor)
  c_top, c_bottom = float(spec.high) / d * (1 - rel), -float(spec.low) / d * (1 - rel)
  with np.errstate(divide="ignore", invalid="ignore"):  # (dynamic roundings of all-zero groups on the way)
    center = chain_values(chain.layers[:j], (lo + hi) / 2)[1]
  others = rms_rounding.group_others(tuple(shape), None)
  rows = rms_rounding.saturation_rows(center, others, c_top, c_bottom, bool((ql < 0).any()), EPS)
  low = backward(chain, j, np.zeros_like(rows), rows, lines, mags, lo, hi)
  mag = np.maximum(np.abs(ql), np.abs(qu))
  rest, top, bottom = rms_rounding.joint_from_rows(low, rows, mag, EPS, TINY)
  finite = lambda v, fallback: np.where(np.isfinite(v), v, fallback)  # noqa: E731
  rest, top, bottom = finite(np.maximum(down(rest), 0.0), 0.0), finite(up(top), np.inf), finite(up(bottom), np.inf)
  return rms_rounding.Joint(*(v.reshape(k, *shape) for v in (rest, top, bottom)))
