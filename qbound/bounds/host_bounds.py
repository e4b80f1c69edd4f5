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
from typing import Optional

import numpy as np

from qbound import dynamic_rounding
from qbound.bounds import host_backward
from qbound.bounds.host_backward import meet, pair_lines, times
from qbound.bounds.host_float import RELATIVE_SLACK, down, up
from qbound.bounds.host_steps import F_Q_STEPS, chain_values, step_error
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
# Before an rms,c layer, bound its saturations on the network: per entry, the others' norm from
# below and its saturation error from above, by backward rows from each piece's centre
# (host_backward.saturation_rest; qbound.bounds.rms_rest in the compiled passes).
SATURATION_ROWS = True


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


def _affine(lower, upper, mag, w, b):
  """Forms of ``w z + b`` from forms of ``z`` whose magnitudes are at most ``mag``, the constant
  widened by the rounding's bound; and the new forms' magnitude bound."""
  pos, neg = np.maximum(w, 0.0).T, np.minimum(w, 0.0).T
  l_out = times(lower, pos) + times(upper, neg)
  u_out = times(upper, pos) + times(lower, neg)
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
  x = np.asarray(xs, np.float64)
  for step in chain.prefix:
    x = prefix_step(step, x)
  z, zq = chain_values(chain.layers, x)
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
      zl, zu, ql, qu, dl, du = meet(zl, zu, ql, qu, dl, du)
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
          zl, zu, ql, qu, dl, du = host_backward.backward_node(chain, j + 1, lines, mags, lo, hi, (zl, zu, ql, qu, dl, du),
                                                  columns, "d" if last else BACKWARD_ROWS)
      kept.append(np.stack([zl, zu, ql, qu, dl, du], axis=1).reshape(k, 6 * m))
      offset += 6 * m
    elif layer[0] in F_Q_STEPS:
      # f_q alone: z_q' = s(z_q) = z_q + e, so d' = z - z_q' = d - e, with e in [e_lo, e_hi] per piece
      # (host_steps.step_error); and z_q' lies in [s(ql), s(qu)], so d' in [z - s(qu), z - s(ql)]. Per neuron
      # the narrower forms are kept: where s(z_q) is pinned to one value over the piece (bounds
      # within one step of a rounding, beyond one end of a clip) those are exact.
      rest = host_backward.saturation_rest(chain, j, lines, mags, lo, hi, ql, qu) if SATURATION_ROWS and j > 0 else None
      e_lo, e_hi, sl, su, joint = step_error(layer, ql, qu, rest)
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
      zl, zu, ql, qu, dl, du = meet(zl, zu, ql, qu, dl, du)
    else:
      lines[j] = pair_lines(zl, zu, ql, qu, dl, du)
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
      zl, zu, ql, qu, dl, du = meet(zl, zu, ql, qu, dl, du)
  return dl, du, ld, ud, np.concatenate(kept, axis=1)
