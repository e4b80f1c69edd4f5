"""Bounds on ``f - f_q`` over many small boxes at once, in NumPy float64: the bounding step of
:mod:`qbound.bounds.host_bab`.

For a paired chain of dense layers and ReLUs (:class:`Chain`; f_q may also round or clip on its
own between them), :func:`bound_pieces` bounds a batch
of pieces by forward symbolic intervals (Wang, Pei, Whitehouse, Yang, Jana, USENIX Security 2018)
for f's ``z``, f_q's ``z_q`` and their difference ``d = z - z_q`` (NeuroDiff, Paulsen, Wang, Wang,
Wang, ASE 2020), tightened by a backward (CROWN, Zhang et al., NeurIPS 2018) pass in ``d`` and
``z_q`` for the neurons some piece leaves unstable, and by a parent piece's bounds. NumPy's
operations compile nothing: this is what lets a first call skip XLA's compilations.

Soundness in float64: every form is widened by :data:`RELATIVE_SLACK` of its magnitude over the
piece at each layer, and every backward step by the same fraction of the magnitude of every term it
sums (the rounding of float64 sums of a few thousand terms is below ``1e-12`` of their magnitude,
Higham 2002, section 3.1), as :mod:`qbound.exact.forms` does; the lines' offsets are checked at
their ends with a few ulps to spare. The weights are float32 values, exact in float64, or folds of
them (a scale divided or a second factor multiplied in, :func:`qbound.bounds.host_chain.dense_matrix`)
rounded by at most 2^-53 of the entry per factor, far inside that slack.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.host_bounds import Chain, bound_pieces
  >>> w = np.array([[1.0, -1.0]])                       # f = relu(x0 - x1), f_q = relu(x0 - x1 - 0.25)
  >>> chain = Chain((("affine", w, np.zeros(1), w, np.array([-0.25])), ("relu",),
  ...                ("affine", np.eye(1), np.zeros(1), np.eye(1), np.zeros(1))), n_in=2, n_out=1)
  >>> dl, du, *_ = bound_pieces(chain, np.array([[0.5, 0.0]]), np.array([[1.0, 0.25]]))
  >>> dl.round(6).tolist(), du.round(6).tolist()        # both active there: d = 0.25 exactly
  ([[0.25]], [[0.25]])
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import numpy as np

from qbound import dynamic_rounding
from qbound.bounds.host_float import EPS, TINY, down, up
from qbound.bounds.host_steps import F_Q_STEPS, step_error, step_values

# float64 forms are widened by this fraction of their magnitude over the piece, per layer.
RELATIVE_SLACK = 1e-10
# The backward pass for the unstable neurons of hidden layers too (the outputs always get it).
# False: 4-5x cheaper per piece at ACAS Xu's size (6 x 50 ReLUs) but looser, so more pieces:
# benchmarks/bench_host_acas.py, docs/results/acas-search.md.
HIDDEN_BACKWARD = True
# ... from the hidden layer of this depth on (dense layers counted from 1). Behind one ReLU layer
# (depth 2) the forward symbolic intervals relax the same ReLUs with the same kind of lines as the
# backward pass would, so its rows bought nothing there: on the exactness table's nets 0-2.6% more
# pieces without them, at a quarter less time per piece on 5-12-16-16-2 (docs/results/exactness.md).
BACKWARD_FROM_DEPTH = 3
# Behind an rms,c layer (a joint saturation term: host_steps.step_error) the backward rows count only
# as many saturated entries as can saturate at once, which forward intervals cannot: rows from the
# second dense layer on there. qwix rms,3 MLPs, a machine's first call, 10 s: nnx 1.74 -> 1.67 and
# 1.73 -> 1.66 (QT), linen 1.25 -> 1.18 (both); from the first layer on, nnx 1.71; rows on d, z_q
# and z as well (BACKWARD_ROWS = "all"), 1.80 (docs/results/quant-libraries.md).
JOINT_BACKWARD_FROM_DEPTH = 2
# Which values of a hidden layer's unstable neurons the backward pass bounds: "d" (rows +-e on d),
# or "all" (on d, z_q and z = z_q + d, as the compiled differential pass): about as tight as it on
# pieces of ACAS Xu 1_1 (where "d" alone is 1.4-2,500x looser), at 1.1-3x the cost of a piece, and
# still 5-8x slower there than the compiled search (docs/results/acas-search.md, "The NumPy search at ACAS Xu's
# size"; benchmarks/bench_host_acas.py).
BACKWARD_ROWS = "d"


@dataclasses.dataclass(frozen=True)
class Chain:
  """A paired chain of layers in float64: ``("affine", W, b, W_q, b_q)``, ``("relu",)``, or a step
  of f_q alone where f has an identity (:mod:`qbound.bounds.host_steps`): ``("round", mode)`` (a static rounding,
  ``mode`` one of ``host_steps.ROUND_ERRORS``), ``("clip", lo, hi)`` (bounds per entry) or ``("dynamic",
  spec, shape)`` (a fake quantization with scales computed from its input, :mod:`qbound.dynamic_rounding`'s
  ``spec``, the node's ``shape`` giving its groups).

  ``prefix``: elementwise monotone maps that f and f_q share before their first layer (an input
  normalisation, as ACAS Xu's ``.nnet`` files: ``("clip", lo, hi)``, ``("shift", b)`` for ``x + b``,
  ``("div", r)`` for ``x / r``, ``("mul", r)`` for ``x * r``); ``layers`` read their result. The
  bounds here take the pieces after it (:func:`qbound.bounds.host_chain.map_box`)."""

  layers: tuple
  n_in: int
  n_out: int
  prefix: tuple = ()


# Forms: (k, n_in + 1, m) arrays, a linear function of the input per neuron, constant last. Each
# comes with its magnitude ``(k, m)``: a bound on ``|coefficients| . max(|lo|, |hi|) + |constant|``
# over the piece (the terms a float64 evaluation of the form sums), carried from layer to layer
# (``|W|`` times the inputs' magnitudes, as the rounding's slack already was) instead of summed
# again from each form's coefficients: the rounding's slack is a RELATIVE_SLACK of it.


def _concrete(form, mag, lo, hi, upper: bool):
  """The maximum (``upper``) or minimum of every form over its piece, widened outward: from the
  piece's centre and radius, ``c . mid +- |c| . rad`` (the rounding of ``mid`` and ``rad``, a few
  ulps of ``max(|lo|, |hi|)``, is inside the slack; ``mag`` bounds every term summed). NumPy's
  ``einsum`` contracts the input axis 3x faster than a product summed over that middle axis
  (docs/results/exactness.md)."""
  coeff = form[:, :-1]
  spread = np.einsum("knm,kn->km", np.abs(coeff), (hi - lo) / 2)
  value = np.einsum("knm,kn->km", coeff, (lo + hi) / 2) + form[:, -1]
  slack = RELATIVE_SLACK * mag
  return value + (spread + slack) if upper else value - (spread + slack)


def _times(forms, matrix):
  """``forms @ matrix`` over the last axis, as one 2-D product: NumPy's stacked ``matmul`` on
  ``(256, 6, 16)`` forms took 2.3x as long as one BLAS product of the ``(1536, 16)`` rows with one
  BLAS thread, 14x with several (docs/results/host-search.md)."""
  return (forms.reshape(-1, forms.shape[-1]) @ matrix).reshape(forms.shape[:-1] + matrix.shape[1:])


def _affine(lower, upper, mag, w, b):
  """Forms of ``w z + b`` from forms of ``z`` whose magnitudes are at most ``mag``, the constant
  widened by the rounding's bound; and the new forms' magnitude bound."""
  pos, neg = np.maximum(w, 0.0).T, np.minimum(w, 0.0).T
  l_out = _times(lower, pos) + _times(upper, neg)
  u_out = _times(upper, pos) + _times(lower, neg)
  l_out[:, -1] += b
  u_out[:, -1] += b
  terms = mag @ np.abs(w).T + np.abs(b)
  slack = RELATIVE_SLACK * terms
  l_out[:, -1] -= slack
  u_out[:, -1] += slack
  return l_out, u_out, terms + slack


def _relu_forms(lower, upper, mag_l, mag_u, zl, zu):
  """DeepPoly's lines of ``relu(z)`` from forms of ``z`` and its bounds ``[zl, zu]``, with their
  magnitudes."""
  active, inactive = zl >= 0, zu <= 0
  unstable = ~active & ~inactive
  slope = np.where(unstable, zu / np.where(unstable, zu - zl, 1.0), 0.0) * (1 + 1e-12)
  # The chord's terms: slope times the upper form's, and slope |zl|.
  chord_terms = slope * (mag_u + np.abs(zl))
  chord_slack = 2 * RELATIVE_SLACK * (chord_terms + slope * np.abs(zl))
  # The upper form times 1 (active), the chord's slope (unstable) or 0: products by 1 and 0 are
  # exact, and 6x faster than np.where over the forms (docs/results/host-search.md).
  u_out = np.where(active, 1.0, slope)[:, None] * upper
  u_out[:, -1] += np.where(unstable, chord_slack - slope * zl, 0.0)
  mag_uo = np.where(active, mag_u, np.where(unstable, chord_terms + chord_slack, 0.0))
  keep_identity = active | (unstable & (zu > -zl))
  l_out = keep_identity[:, None] * lower
  return l_out, u_out, np.where(keep_identity, mag_l, 0.0), mag_uo


def _delta_forms(ld, ud, mag_ld, mag_ud, dl, du):
  """Lines of ``h = relu(z_q + d) - relu(z_q)`` in ``d`` alone, as forms: ``h`` lies between
  ``min(d, 0)`` and ``max(d, 0)``, so between their chords over ``[dl, du]`` (ReluDiff, Paulsen,
  Wang, Wang, ICSE 2020; :func:`qbound.bounds.relax.delta_lines`), whose slopes are in [0, 1];
  with their magnitudes."""
  straddle = (dl < 0) & (du > 0)
  width = np.where(straddle, du - dl, 1.0)
  lo_s = np.where(straddle, -dl / width, np.where(du <= 0, 1.0, 0.0))
  up_s = np.where(straddle, du / width, np.where(dl >= 0, 1.0, 0.0))
  lo_o = np.minimum((1 - lo_s) * dl, -lo_s * du)
  up_o = np.maximum(-up_s * dl, (1 - up_s) * du)
  # The offsets are checked at the two ends in float64: widened by a few roundings of |dl| + |du|.
  slack = 4 * np.finfo(np.float64).eps * (np.abs(dl) + np.abs(du)) + np.finfo(np.float64).tiny
  l_out = lo_s[:, None] * ld
  u_out = up_s[:, None] * ud
  l_out[:, -1] += lo_o - slack
  u_out[:, -1] += up_o + slack
  # The products' own rounding: a relative RELATIVE_SLACK of the forms' magnitude.
  mag_l = lo_s * mag_ld + np.abs(lo_o) + slack
  mag_u = up_s * mag_ud + np.abs(up_o) + slack
  l_out[:, -1] -= RELATIVE_SLACK * mag_l
  u_out[:, -1] += RELATIVE_SLACK * mag_u
  return l_out, u_out, mag_l * (1 + RELATIVE_SLACK), mag_u * (1 + RELATIVE_SLACK)


def _sum_forms(a, b, mag_a, mag_b, upper: bool):
  """``a + b`` widened by :data:`RELATIVE_SLACK` of both terms' magnitudes (not the sum's, which
  may be far smaller: f's and f_q's forms nearly cancel on close copies); with its magnitude."""
  out = a + b
  terms = mag_a + mag_b
  slack = RELATIVE_SLACK * terms
  out[:, -1] += slack if upper else -slack
  return out, terms + slack


class _PairLines(NamedTuple):
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


def _pair_lines(zl, zu, ql, qu, dl, du) -> _PairLines:
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
  return _PairLines(pick(pair_l[0], lo_s), pick(pair_l[1], zero), pick(pair_l[2], lo_o),
                    pick(pair_u[0], up_s), pick(pair_u[1], zero), pick(pair_u[2], up_o), aq, sq, tq,
                    np.maximum(np.abs(dl), np.abs(du)), q_mag)


def _backward(chain: Chain, upto: int, rows_d, rows_q, lines: dict, mags: list, lo, hi):
  """Lower bounds of ``rows_d . d + rows_q . z_q`` at the output of layer ``upto - 1``, over each
  piece: CROWN's backward pass (Zhang et al., NeurIPS 2018) on the pair in the variables ``d`` and
  ``z_q`` (NeuroDiff's differential form, Paulsen et al., ASE 2020). ``rows_*``: ``(R, m)`` rows,
  the same for every piece; ``lines[j]``: :class:`_PairLines` of ReLU layer ``j``, or the
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
  bound = np.abs(lam)  # A >= |lam|, for every piece
  const = np.zeros(lam.shape[:-1])
  err = np.zeros((k, lam.shape[0]))
  for j in range(upto - 1, -1, -1):
    layer = chain.layers[j]
    d_in, q_in = mags[j]
    if layer[0] == "affine":
      _, w, b, wq, bq = layer
      m_out, m_in = w.shape
      block = np.zeros((2 * m_out, 2 * m_in))
      block[:m_out, :m_in], block[:m_out, m_in:], block[m_out:, m_in:] = w, w - wq, wq
      const = const + _times(lam, np.concatenate([b - bq, bq]))
      # Every term's magnitude, summed: |lam_d| (|W| d_in + |W - W_q| q_in + |b - b_q|) + |lam_q| (|W_q| q_in + |b_q|).
      mag_d = d_in @ np.abs(w).T + q_in @ np.abs(w - wq).T + np.abs(b - bq)
      mag_q = q_in @ np.abs(wq).T + np.abs(bq)
      err += np.concatenate([mag_d, mag_q], axis=1) @ bound.T
      lam = _times(lam, block)
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


def _meet(zl, zu, ql, qu, dl, du):
  """``z = z_q + d``: each pair of bounds tightens the third (rounded outward)."""
  zl, zu = np.maximum(zl, down(ql + dl)), np.minimum(zu, up(qu + du))
  ql, qu = np.maximum(ql, down(zl - du)), np.minimum(qu, up(zu - dl))
  dl, du = np.maximum(dl, down(zl - qu)), np.minimum(du, up(zu - ql))
  return zl, zu, ql, qu, dl, du


def _backward_node(chain, upto, lines, mags, lo, hi, bounds, columns, which: str = "d"):
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
  v = _backward(chain, upto, np.concatenate(on_d), np.concatenate(on_q), lines, mags, lo, hi).reshape(k, len(on_d), c)
  zl, zu, ql, qu, dl, du = (b.copy() for b in bounds)
  pairs = [(dl, du)] + ([(ql, qu), (zl, zu)] if which == "all" else [])
  for i, (low, high) in enumerate(pairs):
    low[:, columns] = np.maximum(low[:, columns], v[:, 2 * i])
    high[:, columns] = np.minimum(high[:, columns], -v[:, 2 * i + 1])
  return _meet(zl, zu, ql, qu, dl, du)


def _shift(form, mag, shift, upper: bool):
  """``form + shift`` (``shift`` per piece and neuron, on the constant), widened by the addition's
  rounding; with its magnitude."""
  out = form.copy()
  out[:, -1] += shift
  terms = mag + np.abs(shift)
  out[:, -1] += RELATIVE_SLACK * terms if upper else -RELATIVE_SLACK * terms
  return out, terms * (1 + RELATIVE_SLACK)


def _constant(value, n_in: int):
  """Forms that are the constant ``value`` (``(k, m)``), with their magnitude."""
  form = np.zeros((value.shape[0], n_in + 1, value.shape[1]))
  form[:, -1] = value
  return form, np.abs(value)


def prefix_step(step, x):
  """One map of ``chain.prefix`` applied to ``x`` in float64."""
  if step[0] == "clip":
    return np.clip(x, step[1], step[2])
  if step[0] == "shift":
    return x + step[1]
  return x / step[1] if step[0] == "div" else x * step[1]


def error_bound(dl, du, outputs):
  """Each piece's bound on ``max |f - f_q|`` over ``outputs``, from its bounds ``dl <= f - f_q <= du``."""
  return np.maximum(du[:, outputs], -dl[:, outputs]).max(axis=1)


def evaluate(chain: Chain, xs: np.ndarray) -> np.ndarray:
  """``f(x) - f_q(x)`` in float64 for a batch ``xs`` of shape ``(k, n_in)``."""
  z = np.asarray(xs, np.float64)
  for step in chain.prefix:
    z = prefix_step(step, z)
  zq = z
  for layer in chain.layers:
    if layer[0] == "relu":
      z, zq = np.maximum(z, 0.0), np.maximum(zq, 0.0)
    elif layer[0] in F_Q_STEPS:
      zq = step_values(layer, zq)
    else:
      _, w, b, wq, bq = layer
      z, zq = z @ w.T + b, zq @ wq.T + bq
  return z - zq


def bound_pieces(chain: Chain, lo: np.ndarray, hi: np.ndarray, prior: Optional[np.ndarray] = None,
                 values: Optional[tuple] = None):
  """Proven bounds on ``f - f_q`` over each piece ``[lo_i, hi_i]`` (``(k, n_in)`` each).

  ``prior``: bounds of every affine layer's ``z``, ``z_q`` and ``d`` proven on a larger box holding
  each piece (its parent's ``kept``, ``(k, 6 * neurons)``), met with the new ones: tighter lines.

  ``values``: where f_q rounds its input (:func:`qbound.bounds.host_chain.input_rounding`), a case
  of each piece, ``(lowest, highest)`` (``(k, n_in)`` each) rounded values of the input: the bounds
  then hold for the inputs of the piece whose rounded values lie there (the cases of
  :func:`qbound.bounds.host_chain.aligned_splits`); ignored where a piece's values miss them. The
  same where the chain's first layer rounds the input with a scale computed from it (the tie
  splits of :mod:`qbound.bounds.host_ties`; not behind an ``rms,c`` joint term).

  Returns:
    ``(d_lower, d_upper, d_lower_form, d_upper_form, kept)``: ``(k, n_out)`` bounds, the output's
    forms ``(k, n_in + 1, n_out)`` whose coefficients say which corner each bound points to, and
    every affine layer's bounds for the pieces' children (``prior``).
  """
  if chain.prefix:
    raise ValueError("bound_pieces takes pieces after the chain's input normalisation (chain.prefix): map them "
                     "with qbound.bounds.host_chain.map_box and pass dataclasses.replace(chain, prefix=()).")
  k, n = lo.shape
  eye = np.zeros((k, n + 1, n))
  eye[:, np.arange(n), np.arange(n)] = 1.0
  lz = uz = lq = uq = eye
  ld = ud = np.zeros_like(eye)
  zl = ql = lo
  zu = qu = hi
  dl = du = np.zeros_like(lo)
  # The forms' magnitudes (see _affine): the identity's is max(|lo|, |hi|), d's forms are 0.
  mzl = mzu = mql = mqu = np.maximum(np.abs(lo), np.abs(hi))
  mdl = mdu = np.zeros_like(lo)
  lines: dict = {}
  mags: list = []
  kept: list = []
  offset = 0
  for j, layer in enumerate(chain.layers):
    mags.append((np.maximum(np.abs(dl), np.abs(du)), np.maximum(np.abs(ql), np.abs(qu))))
    if layer[0] == "affine":
      _, w, b, wq, bq = layer
      dw, db = w - wq, b - bq
      mz, mq = np.maximum(mzl, mzu), np.maximum(mql, mqu)
      ld_z, ud_z, m_dz = _affine(lz, uz, mz, dw, db)
      ld_d, ud_d, m_dd = _affine(ld, ud, np.maximum(mdl, mdu), wq, np.zeros_like(bq))
      # The sums' rounding, relative to the terms (f's and f_q's parts may nearly cancel).
      (ld, mdl), (ud, mdu) = _sum_forms(ld_z, ld_d, m_dz, m_dd, False), _sum_forms(ud_z, ud_d, m_dz, m_dd, True)
      lz, uz, mzl = _affine(lz, uz, mz, w, b)
      lq, uq, mql = _affine(lq, uq, mq, wq, bq)
      mzu, mqu = mzl, mql
      zl, zu = _concrete(lz, mzl, lo, hi, False), _concrete(uz, mzu, lo, hi, True)
      ql, qu = _concrete(lq, mql, lo, hi, False), _concrete(uq, mqu, lo, hi, True)
      dl, du = _concrete(ld, mdl, lo, hi, False), _concrete(ud, mdu, lo, hi, True)
      dl = down(dl - RELATIVE_SLACK * np.abs(dl))
      du = up(du + RELATIVE_SLACK * np.abs(du))
      zl, zu, ql, qu, dl, du = _meet(zl, zu, ql, qu, dl, du)
      m = w.shape[0]
      if prior is not None:
        old = prior[:, offset:offset + 6 * m].reshape(k, 6, m)
        zl, ql, dl = np.maximum(zl, old[:, 0]), np.maximum(ql, old[:, 2]), np.maximum(dl, old[:, 4])
        zu, qu, du = np.minimum(zu, old[:, 1]), np.minimum(qu, old[:, 3]), np.minimum(du, old[:, 5])
      last = j == len(chain.layers) - 1
      if (last or chain.layers[j + 1][0] == "relu") and j > 0:
        # Rows only where they can change something: the outputs, and the neurons some piece
        # cannot tell active from inactive in f or f_q (stable pairs' lines are exact).
        if last:
          columns = np.arange(w.shape[0])
        else:
          columns = np.flatnonzero((((zl < 0) & (zu > 0)) | ((ql < 0) & (qu > 0))).any(axis=0))
          depth = sum(layer[0] == "affine" for layer in chain.layers[:j + 1])
          # Behind a joint saturation term (an rms,c layer: host_steps.step_error) the backward rows
          # see what forward intervals cannot, from the second dense layer on.
          joint = any(chain.layers[i][0] in F_Q_STEPS and len(lines[i]) > 2 for i in lines)
          if not HIDDEN_BACKWARD or depth < (JOINT_BACKWARD_FROM_DEPTH if joint else BACKWARD_FROM_DEPTH):
            columns = columns[:0]
        if len(columns):
          zl, zu, ql, qu, dl, du = _backward_node(chain, j + 1, lines, mags, lo, hi, (zl, zu, ql, qu, dl, du),
                                                  columns, "d" if last else BACKWARD_ROWS)
      kept.append(np.stack([zl, zu, ql, qu, dl, du], axis=1).reshape(k, 6 * m))
      offset += 6 * m
    elif layer[0] in F_Q_STEPS:
      # f_q alone: z_q' = s(z_q) = z_q + e, so d' = z - z_q' = d - e, with e in [e_lo, e_hi] per piece
      # (host_steps.step_error); and z_q' lies in [s(ql), s(qu)], so d' in [z - s(qu), z - s(ql)]. Per neuron
      # the narrower forms are kept: where s(z_q) is pinned to one value over the piece (bounds
      # within one step of a rounding, beyond one end of a clip) those are exact.
      e_lo, e_hi, sl, su, joint = step_error(layer, ql, qu)
      if values is not None and layer[0] == "dynamic" and j == 0 and not joint:
        # The input's dynamic rounding, in the pieces' tie cases (host_ties): one step's values where
        # a case admits a single step.
        _, spec, shape = layer
        with np.errstate(divide="ignore", invalid="ignore"):
          values = tuple(v.reshape(k, -1) for v in dynamic_rounding.value_range(
              spec, ql.reshape(k, *shape), qu.reshape(k, *shape), len(shape),
              (values[0].reshape(k, *shape), values[1].reshape(k, *shape))))
      if values is not None and layer[0] in ("round", "dynamic"):  # f_q's rounding of its input, in the pieces' cases
        case_l, case_u = np.maximum(sl, values[0]), np.minimum(su, values[1])
        ok = case_l <= case_u
        sl, su = np.where(ok, case_l, sl), np.where(ok, case_u, su)
        e_lo, e_hi = np.maximum(e_lo, down(sl - qu)), np.minimum(e_hi, up(su - ql))
        values = None  # (the input's rounding only: the first of f_q's roundings)
      lines[j] = (e_lo, e_hi) + joint
      n_in = lo.shape[1]
      (cl_form, mcl), (cu_form, mcu) = _constant(sl, n_in), _constant(su, n_in)
      (sq_l, msq_l), (sq_u, msq_u) = _shift(lq, mql, e_lo, False), _shift(uq, mqu, e_hi, True)
      width_q = _concrete(sq_u, msq_u, lo, hi, True) - _concrete(sq_l, msq_l, lo, hi, False)
      use_values = (su - sl) <= width_q
      (sd_l, msd_l), (sd_u, msd_u) = _shift(ld, mdl, -e_hi, False), _shift(ud, mdu, -e_lo, True)
      (pd_l, mpd_l), (pd_u, mpd_u) = _shift(lz, mzl, -su, False), _shift(uz, mzu, -sl, True)
      width_shift = _concrete(sd_u, msd_u, lo, hi, True) - _concrete(sd_l, msd_l, lo, hi, False)
      width_values = _concrete(pd_u, mpd_u, lo, hi, True) - _concrete(pd_l, mpd_l, lo, hi, False)
      use_z = width_values < width_shift
      lq, uq = np.where(use_values[:, None], cl_form, sq_l), np.where(use_values[:, None], cu_form, sq_u)
      mql, mqu = np.where(use_values, mcl, msq_l), np.where(use_values, mcu, msq_u)
      ld, ud = np.where(use_z[:, None], pd_l, sd_l), np.where(use_z[:, None], pd_u, sd_u)
      mdl, mdu = np.where(use_z, mpd_l, msd_l), np.where(use_z, mpd_u, msd_u)
      ql, qu = sl, su
      dl = np.maximum(_concrete(ld, mdl, lo, hi, False), down(zl - su))
      du = np.minimum(_concrete(ud, mdu, lo, hi, True), up(zu - sl))
      zl, zu, ql, qu, dl, du = _meet(zl, zu, ql, qu, dl, du)
    else:
      lines[j] = _pair_lines(zl, zu, ql, qu, dl, du)
      rz_l, rz_u, mrz_l, mrz_u = _relu_forms(lz, uz, mzl, mzu, zl, zu)
      rq_l, rq_u, mrq_l, mrq_u = _relu_forms(lq, uq, mql, mqu, ql, qu)
      both_active = (zl >= 0) & (ql >= 0)
      both_inactive = (zu <= 0) & (qu <= 0)
      only_z = (zl >= 0) & (qu <= 0)
      only_q = (zu <= 0) & (ql >= 0)
      # Neither phase pair known: the two lines' difference, or the chords in d, the narrower.
      (diff_l, mdiff_l), (diff_u, mdiff_u) = (_sum_forms(rz_l, -rq_u, mrz_l, mrq_u, False),
                                              _sum_forms(rz_u, -rq_l, mrz_u, mrq_l, True))
      width_forms = _concrete(diff_u, mdiff_u, lo, hi, True) - _concrete(diff_l, mdiff_l, lo, hi, False)
      iv_l, iv_u = np.minimum(dl, 0.0), np.maximum(du, 0.0)
      dt_l, dt_u, mdt_l, mdt_u = _delta_forms(ld, ud, mdl, mdu, dl, du)
      width_delta = _concrete(dt_u, mdt_u, lo, hi, True) - _concrete(dt_l, mdt_l, lo, hi, False)
      use_delta = width_delta < width_forms
      new_ld = np.where(use_delta[:, None], dt_l, diff_l)
      new_ud = np.where(use_delta[:, None], dt_u, diff_u)
      new_mdl, new_mdu = np.where(use_delta, mdt_l, mdiff_l), np.where(use_delta, mdt_u, mdiff_u)
      zero, none = np.zeros_like(ld), np.zeros_like(mdl)
      cases = [(both_active, ld, ud, mdl, mdu), (both_inactive, zero, zero, none, none),
               (only_z, lz, uz, mzl, mzu), (only_q, -uq, -lq, mqu, mql)]
      for mask, l_case, u_case, ml_case, mu_case in cases:
        new_ld = np.where(mask[:, None], l_case, new_ld)
        new_ud = np.where(mask[:, None], u_case, new_ud)
        new_mdl, new_mdu = np.where(mask, ml_case, new_mdl), np.where(mask, mu_case, new_mdu)
      ld, ud, mdl, mdu = new_ld, new_ud, new_mdl, new_mdu
      lz, uz, lq, uq = rz_l, rz_u, rq_l, rq_u
      mzl, mzu, mql, mqu = mrz_l, mrz_u, mrq_l, mrq_u
      relu_zl, relu_zu = np.maximum(zl, 0.0), np.maximum(zu, 0.0)
      relu_ql, relu_qu = np.maximum(ql, 0.0), np.maximum(qu, 0.0)
      zl, zu, ql, qu = relu_zl, relu_zu, relu_ql, relu_qu
      dl = np.maximum(_concrete(ld, mdl, lo, hi, False), np.maximum(iv_l, down(relu_zl - relu_qu)))
      du = np.minimum(_concrete(ud, mdu, lo, hi, True), np.minimum(iv_u, up(relu_zu - relu_ql)))
      zl, zu, ql, qu, dl, du = _meet(zl, zu, ql, qu, dl, du)
  return dl, du, ld, ud, np.concatenate(kept, axis=1)
