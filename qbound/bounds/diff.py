"""Differential bound propagation: bounds that follow ``d = f(x) - f_q(x)`` layer by layer.

Generic bounds on the merged network relax f and f_q independently, and their relaxation errors do
not cancel. Differential verification instead tracks, for every pair of corresponding layers, the
difference ``d = z - z_q`` of the two activations alongside ``z_q``:

* affine layers: ``d' = A d + (A - A_q) z_q + (b - b_q)`` and ``z_q' = A_q z_q + b_q`` (exact);
* ReLU: ``relu(z_q + d) - relu(z_q)`` bounded by lines in ``d`` and ``z_q``
  (:func:`qbound.bounds.relax.relu_diff`); tanh and sigmoid by the mean value theorem,
  ``phi(z_q + d) - phi(z_q) = s d`` with ``s`` in the range of ``phi'``
  (:func:`qbound.bounds.smooth.diff_relaxation`);
* transformer layers: products ``x y - x_q y_q = x d_y + d_x y_q`` and smooth curves (exp, 1/x,
  rsqrt, sqrt, erfc, SiLU, x^2) by :mod:`qbound.bounds.nonlinear_diff`.

Two forms are computed: a forward *interval* form for every node (ReluDiff, Paulsen, Wang, Wang,
ICSE 2020) and a backward *symbolic* form, CROWN-style, for every ReLU input and the output, whose
coefficients on ``d`` and ``z_q`` are carried back to the input (the symbolic differential
intervals of NeuroDiff, Paulsen, Wang, Wang, Wang, ASE 2020, written as a backward linear
relaxation in the manner of CROWN, Zhang et al. 2018). Bounds on ``z`` and ``z_q`` come from CROWN
on each network, and ``z = z_q + d`` tightens all three.

Works for any two networks with the same layer structure (any weight perturbation, not only
rounding); :attr:`qbound.merge.MergedNetwork.paired` tells.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional


import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp, nonlinear, nonlinear_diff, relax, rules, saturation, smooth
from qbound.bounds.common import LINEAR_KINDS, first_half, jit_step, local, mirror_rows, plus
from qbound.bounds.crown import (ACTIVATIONS, _routing_only, _row_sum, batch_of, crown_bounds, intersect, relu_inputs,
                                 split_rows, unit_rows)
from qbound.bounds.interval import center_radius, interval_bounds
from qbound.bounds.rows import node_bounds_by_rows
from qbound.bounds.guards import check_bounds, spot_check
from qbound.box import Box, validate_box
from qbound.trace.scaled import ScaledOp

_WEIGHT_LINEAR = {"dot_general", "conv_general_dilated", "mul"}


@dataclasses.dataclass(frozen=True)
class _DeltaLinear:
  """The map ``x -> A x - A_q x`` of a pair of affine nodes, without cancellation where possible."""

  nf: G.Node
  nq: G.Node

  @property
  def zero(self) -> bool:
    return self.nf.op is None or not self.nf.op.coefficients

  @property
  def exact_weights(self) -> bool:
    return self.nf.op.name in _WEIGHT_LINEAR

  def _dw(self):
    return tuple(a - b for a, b in zip(self.nf.weights, self.nq.weights))

  def _differs(self):
    """For an elementwise division ``x / w`` (input normalisation): where the two divisors are
    equal the difference is exactly 0, and without this mask it would be bounded by
    ``|x / w| + |x / w_q|``, a loose interval whose magnitude then sizes every rounding margin
    downstream (on HAR, whose 16-bit copy keeps its ranges of 1, this doubled the margins).
    None for other maps."""
    op = self.nf.op
    if op.name == "div" and op.var_pos == 0 and len(self.nf.weights) == 1:
      return self.nf.weights[0] != self.nq.weights[0]
    return None

  def apply(self, x):
    if self.exact_weights:
      return self.nf.op.apply(self._dw(), x)
    out = self.nf.linear(x) - self.nq.linear(x)
    differs = self._differs()
    return out if differs is None else jnp.where(differs, out, 0)

  def _folded_dw(self):
    """``A - A_q`` as one weight for rescaled products (:mod:`qbound.trace.scaled`), or None."""
    op = self.nf.op
    if not isinstance(op, ScaledOp):
      return None
    wf, wq = op.folded_weight(self.nf.weights), op.folded_weight(self.nq.weights)
    return None if wf is None or wq is None else wf - wq

  def apply_abs(self, x):
    """An upper bound on ``|A - A_q| x`` (for ``x >= 0``), linear in ``x`` with coefficients >= 0."""
    if self.exact_weights:
      return self.nf.op.apply_abs(self._dw(), x)
    folded = self._folded_dw()
    if folded is not None:
      # The folded weights ``W t - W_q s`` carry one rounding per factor and one for the
      # difference, each at most u of |W t| or |W_q s|: gamma(factors + 3) of both covers them.
      # A product flushed to zero as subnormal loses at most the smallest normal number per rounding.
      dtype = jnp.result_type(x)
      k = len(self.nf.op.factors)
      spare = fp.SLACK * fp.gamma(k + 3, dtype)
      flushed = (2 * k + 1) * fp.tiny(dtype) * self.nf.op.base.apply_abs((jnp.ones_like(folded),), x)
      return self.nf.op.base.apply_abs((folded,), x) + spare * self.margin_abs(x) + flushed
    return self.margin_abs(x)

  def margin_abs(self, x):
    """The magnitude the roundings of :meth:`apply` and :meth:`transpose` are relative to: ``|A -
    A_q| x`` where the difference of weights is formed first, else ``|A| x + |A_q| x``."""
    if self.exact_weights:
      return self.nf.op.apply_abs(self._dw(), x)
    out = self.nf.linear_abs(x) + self.nq.linear_abs(x)
    differs = self._differs()
    return out if differs is None else jnp.where(differs, out, 0)

  def transpose(self, y):
    if self.exact_weights:
      return self.nf.op.transpose(self._dw(), y)
    differs = self._differs()
    if differs is not None:  # elementwise: the mask applies to the cotangent as to the output
      y = jnp.where(differs, y, 0)
    return self.nf.linear_transpose(y) - self.nq.linear_transpose(y)


def _bias_diff(nf: G.Node, nq: G.Node):
  if nf.bias is None:
    return None
  return nf.bias - nq.bias


def _magnitude(b):
  return jnp.maximum(jnp.abs(b[0]), jnp.abs(b[1]))


def diff_interval_node(nf: G.Node, nq: G.Node, z, zq, d, sound: bool):
  """Forward interval bounds of ``d`` at one node (ReluDiff's interval rules)."""
  if nf.kind == G.AFFINE:
    j = nf.inputs[0]
    cd, rd = center_radius(*d[j], sound)
    yc = nf.linear(cd)
    yr = nf.linear_abs(rd)
    magnitude = nf.linear_abs(jnp.abs(cd) + rd)
    delta = _DeltaLinear(nf, nq)
    if not delta.zero:
      cq, rq = center_radius(*zq[j], sound)
      yc = yc + delta.apply(cq)
      yr = yr + delta.apply_abs(rq)
      magnitude = magnitude + delta.margin_abs(jnp.abs(cq) + rq)
    db = _bias_diff(nf, nq)
    if db is not None:
      yc = yc + db
      magnitude = magnitude + jnp.abs(db)
    if not sound:
      return yc - yr, yc + yr
    margin = fp.dot_margin(2 * nf.terms + 4, magnitude, yc.dtype)
    return fp.round_down(yc - yr - margin), fp.round_up(yc + yr + margin)
  if nf.kind == G.ADD:
    lo = hi = None
    for sign, i in zip(nf.attrs, nf.inputs):
      tl, tu = d[i] if sign > 0 else (-d[i][1], -d[i][0])
      lo, hi = (tl, tu) if lo is None else (lo + tl, hi + tu)
      if sound and lo is not tl:
        lo, hi = fp.round_down(lo), fp.round_up(hi)
    return lo, hi
  if nf.kind == G.CONCAT:
    axis = nf.attrs[0]
    return (jnp.concatenate([d[i][0] for i in nf.inputs], axis), jnp.concatenate([d[i][1] for i in nf.inputs], axis))
  if nf.kind == G.RELU:
    j = nf.inputs[0]
    (zl, zu), (ql, qu), (dl, du) = z[j], zq[j], d[j]
    # relu is monotone and 1-Lipschitz (d' between min(d,0) and max(d,0)), and d' lies in
    # relu([z]) - relu([zq]).
    lo = jnp.maximum(jnp.minimum(dl, 0), jnp.maximum(zl, 0) - jnp.maximum(qu, 0))
    hi = jnp.minimum(jnp.maximum(du, 0), jnp.maximum(zu, 0) - jnp.maximum(ql, 0))
    if sound:
      lo = jnp.where(lo == jnp.minimum(dl, 0), lo, fp.round_down(lo))
      hi = jnp.where(hi == jnp.maximum(du, 0), hi, fp.round_up(hi))
    return lo, hi
  if nf.kind == G.CLIP:  # the cuts may differ (a saturating fake quantization beside an identity)
    j = nf.inputs[0]
    return relax.clip_diff_interval(z[j], zq[j], d[j], nf.weights, nq.weights, sound=sound)
  if nf.kind == G.ROUND:
    j = nf.inputs[0]
    (zl, zu), (ql, qu), (dl, du) = relax.step_input(*z[j], sound), relax.step_input(*zq[j], sound), d[j]
    # Each side's range and offsets (a staircase's; a dynamic quantization's: relax.rounding_range).
    e_f, e_q = relax.offsets(nf, zl, zu), relax.offsets(nq, ql, qu)
    f_lo, f_hi = relax.rounding_range(nf, zl, zu, sound=sound)
    q_lo, q_hi = relax.rounding_range(nq, ql, qu, sound=sound)
    lo = jnp.maximum(dl + (e_f[0] - e_q[1]), f_lo - q_hi)
    hi = jnp.minimum(du + (e_f[1] - e_q[0]), f_hi - q_lo)
    return (fp.round_down(lo), fp.round_up(hi)) if sound else (lo, hi)
  if nf.kind in G.SMOOTH:
    j = nf.inputs[0]
    return smooth.diff_interval(nf.kind, z[j], zq[j], d[j], sound=sound)
  if nf.kind in G.NONLINEAR:
    return nonlinear_diff.node_diff_interval(nf, tuple(z[i] for i in nf.inputs), tuple(zq[i] for i in nf.inputs),
                                             tuple(d[i] for i in nf.inputs), sound=sound)
  raise ValueError(f"differential bounds have no rule for node kind {nf.kind!r}")


def _diff_step(nf: G.Node, nq: G.Node, lv, mv, z, zq, d, a, beta_in, err_in, lines, sound: bool):
  """:func:`_diff_rule` with the running constant and margin per row carried through."""
  to_d, to_q, beta, err = _diff_rule(nf, nq, lv, mv, z, zq, d, a, sound, lines)
  return to_d, to_q, beta_in + beta, err_in + err


def _activation_lines(nf: G.Node, nq: G.Node, z, zq, d, a, sound: bool):
  """An activation pair's relaxation lines (one value per neuron): ``(diff lines, f_q's lines)``.

  Computed in a step of their own, before they meet the rows: the lines are long chains of cheap
  elementwise operations, and XLA (on CPU at least) fuses such producers into every consumer, so
  inside the backward step it recomputed them once per row (on HAR's 561 input clips with 1000
  rows, 8-15 ms of a 2-3 ms step). An optimisation barrier does not stop it: XLA on CPU drops
  barriers before fusing.
  """
  if nf.kind == G.MUL:  # products and curves: see qbound.bounds.nonlinear_diff
    return (nonlinear_diff.product_diff_relaxation(z[0], zq[0], d[0], z[1], zq[1], d[1], sound=sound),
            nonlinear.product_relaxation(zq[0], zq[1], sound=sound))
  if nf.kind in G.CURVES:
    return (nonlinear_diff.curve_diff_relaxation(nf.kind, z[0], zq[0], d[0], sound=sound),
            nonlinear.curve_relaxation(nf.kind, *zq[0], sound=sound))
  a = a or {}
  return (rules.diff_for_nodes(nf, nq, z[0], zq[0], d[0], a, sound=sound),
          rules.for_node(nq, *zq[0], a.get("rest" if nq.kind == G.ROUND else "mu"), sound=sound))


def _diff_rule(nf: G.Node, nq: G.Node, lv, mv, z, zq, d, a, sound: bool, lines=None):
  """One node pair of the backward pass, with ``z, zq, d`` the bounds of its inputs (in order).

  Returns the coefficients on ``d`` and on ``z_q`` passed to each input (tuples, or None), and the
  constant and rounding margin added per row. ``lines``: an activation pair's
  :func:`_activation_lines` when computed already.
  """
  rows = (lv if lv is not None else mv).shape[0]
  dtype = (lv if lv is not None else mv).dtype
  u = fp.unit_roundoff(dtype)
  beta = jnp.zeros(rows, dtype)
  err = jnp.zeros(rows, dtype)
  to_d = to_q = None
  if nf.kind == G.AFFINE:
    n_t = nf.op.terms_transpose if nf.op is not None else 1
    # Sound mode: every rounding margin of this step is a row sum of |coefficients| times a
    # per-entry magnitude; they are added up entry by entry first (``margins``, at the node, and
    # ``input_margins``, at its input) so that each walk step does two row sums, not six.
    margins = input_margins = None
    if lv is not None:
      db = _bias_diff(nf, nq)
      if db is not None:
        beta = beta + _row_sum(lv * db)
      to_d = (jax.vmap(nf.linear_transpose)(lv),)
      delta = _DeltaLinear(nf, nq)
      if not delta.zero:
        to_q = (jax.vmap(delta.transpose)(lv),)
      if sound:
        # sum_i (|A|^T |l|)_i m_i = |l| . (|A| m): a vector per node instead of a product per row.
        spread = fp.margin_coefficient(n_t, dtype) * nf.linear_abs(_magnitude(d[0]))
        err = err + fp.margin_floor(n_t, dtype)
        if not delta.zero:
          spread = spread + fp.margin_coefficient(n_t + 1, dtype) * delta.margin_abs(_magnitude(zq[0]))
          err = err + fp.margin_floor(n_t + 1, dtype)
        if db is not None:
          spread = spread + fp.margin_coefficient(fp.pairwise_terms(nf.size) + 1, dtype) * jnp.abs(db)
          err = err + fp.margin_floor(fp.pairwise_terms(nf.size) + 1, dtype)
        margins = jnp.abs(lv) * spread
    if mv is not None:
      if nq.bias is not None:
        beta = beta + _row_sum(mv * nq.bias)
      from_mu = jax.vmap(nq.linear_transpose)(mv)
      summed = to_q is not None
      to_q = (from_mu,) if to_q is None else (to_q[0] + from_mu,)
      if sound:
        if summed:  # the sum just formed
          input_margins = jnp.abs(to_q[0]) * (u * fp.SLACK * _magnitude(zq[0]))
        spread = fp.margin_coefficient(n_t, dtype) * nq.linear_abs(_magnitude(zq[0]))
        err = err + fp.margin_floor(n_t, dtype)
        if nq.bias is not None:
          spread = spread + fp.margin_coefficient(fp.pairwise_terms(nq.size), dtype) * jnp.abs(nq.bias)
          err = err + fp.margin_floor(fp.pairwise_terms(nq.size), dtype)
        margins = plus(margins, jnp.abs(mv) * spread)
    if sound:
      err = err + fp.margin_sum(margins) + (0 if input_margins is None else fp.margin_sum(input_margins))
  elif nf.kind == G.ADD:
    if lv is not None:
      to_d = tuple(lv if sign > 0 else -lv for sign in nf.attrs)
    if mv is not None:
      to_q = tuple(mv if sign > 0 else -mv for sign in nf.attrs)
  elif nf.kind == G.CONCAT:
    axis = nf.attrs[0] + 1
    widths = [lo.shape[nf.attrs[0]] for lo, _ in d]
    starts = [sum(widths[:k]) for k in range(len(widths))]
    if lv is not None:
      to_d = tuple(jax.lax.slice_in_dim(lv, s, s + w, axis=axis) for s, w in zip(starts, widths))
    if mv is not None:
      to_q = tuple(jax.lax.slice_in_dim(mv, s, s + w, axis=axis) for s, w in zip(starts, widths))
  elif nf.kind == G.MUL:
    r, rq = lines if lines is not None else _activation_lines(nf, nq, z, zq, d, a, sound)
    to_d, to_q, beta, err = nonlinear_diff.backward_rule(nf, lv, mv, zq, d, r, rq, sound)
  elif nf.kind in ACTIVATIONS or nf.kind in G.CURVES:
    r, rq = lines if lines is not None else _activation_lines(nf, nq, z, zq, d, a, sound)
    margins = None  # sound mode: the step's margins entry by entry, summed once (see above)
    if lv is not None:
      pos, neg = jnp.maximum(lv, 0), jnp.minimum(lv, 0)
      to_d = (pos * r.lower_d + neg * r.upper_d,)
      to_q = (pos * r.lower_q + neg * r.upper_q,)
      beta = beta + _row_sum(pos * r.lower_r + neg * r.upper_r)
      if sound:
        sd = jnp.maximum(jnp.abs(r.lower_d), jnp.abs(r.upper_d))
        sq = jnp.maximum(jnp.abs(r.lower_q), jnp.abs(r.upper_q))
        so = jnp.maximum(jnp.abs(r.lower_r), jnp.abs(r.upper_r))
        spread = (u * fp.SLACK * (sd * _magnitude(d[0]) + sq * _magnitude(zq[0]))
                  + fp.margin_coefficient(fp.pairwise_terms(nf.size), dtype) * so)
        margins = jnp.abs(lv) * spread
        err = err + fp.margin_floor(fp.pairwise_terms(nf.size), dtype)
      # At most K clips of a group at once. (Not on f_q's rows, mv, which carry only the weights'
      # difference: there it changed the rms,3 MLPs' bounds by under 1%, for one more compiled sum.)
      if isinstance(r, saturation.SaturatingDiffRelaxation):
        saved, margin = saturation.saving(nq, lv, r.sat_lower, r.sat_upper, sound=sound)
        beta, err = beta + saved, err + margin
    if mv is not None:
      pos, neg = jnp.maximum(mv, 0), jnp.minimum(mv, 0)
      from_mu = pos * rq.lower_slope + neg * rq.upper_slope
      if sound and to_q is not None:
        margins = plus(margins, jnp.abs(to_q[0] + from_mu) * (u * fp.SLACK * _magnitude(zq[0])))
      to_q = (from_mu,) if to_q is None else (to_q[0] + from_mu,)
      beta = beta + _row_sum(pos * rq.lower_offset + neg * rq.upper_offset)
      if sound:
        slope = jnp.maximum(jnp.abs(rq.lower_slope), jnp.abs(rq.upper_slope))
        offset = jnp.maximum(jnp.abs(rq.lower_offset), jnp.abs(rq.upper_offset))
        spread = (u * fp.SLACK * slope * _magnitude(zq[0])
                  + fp.margin_coefficient(fp.pairwise_terms(nf.size), dtype) * offset)
        margins = plus(margins, jnp.abs(mv) * spread)
        err = err + fp.margin_floor(fp.pairwise_terms(nf.size), dtype)
    if sound:
      err = err + fp.margin_sum(margins)
  else:
    raise ValueError(f"differential bounds have no rule for node kind {nf.kind!r}")
  return to_d, to_q, beta, err


def _accumulate(total, value, bounds, err, sound: bool):
  """``total + value`` for coefficients reaching a node twice, and ``err`` plus that sum's rounding."""
  total = total + value
  if not sound:
    return total, err
  return total, err + fp.unit_roundoff(total.dtype) * fp.SLACK * fp.margin_sum(jnp.abs(total) * _magnitude(bounds))


def _at_input(mv, beta, err, box: Box, sound: bool):
  """At the input both networks read the same x: d = 0 there, and zq = x."""
  c, rad = center_radius(box.lower, box.upper, sound)
  value = _row_sum(mv * c) - _row_sum(jnp.abs(mv) * rad) + beta
  if not sound:
    return value
  err = err + fp.dot_margin(2 * fp.pairwise_terms(int(c.size)) + 2, fp.margin_sum(jnp.abs(mv) * (jnp.abs(c) + rad)) + jnp.abs(beta), mv.dtype)
  return fp.round_down(value - err)


_diff_step = jit_step(_diff_step, (None, None, 0, 0, 0, 0, 0, 0, 0, 0, 0))
_activation_lines = jit_step(_activation_lines, (None, None, 0, 0, 0, 0))
_accumulate = jit_step(_accumulate, (0, 0, 0, 0))
_at_input = jit_step(_at_input, (0, 0, 0, 0))


def diff_backward_lower(fg: G.Graph, qg: G.Graph, target: int, rows, z, zq, d, box: Box, *,
                        alphas=None, sound: bool = True, batched: bool = False, with_coefficients: bool = False,
                        signed_pairs: bool = False, lines=None):
  """Lower bounds of ``rows[k] . d_target`` over the box (``d = z - z_q`` at node ``target``).

  A Python loop over jit-compiled steps per node pair, like :func:`qbound.bounds.crown.backward_lower`
  (``batched``: a leading axis of many boxes on the box, bounds and rows). ``with_coefficients``:
  also return each row's coefficients on the input, ``(rows, *input shape)`` (the bound is their
  minimum over the box plus a constant; branch and bound splits where they weigh most).
  ``signed_pairs``: the rows are ``[R; -R]``, see :func:`qbound.bounds.crown.backward_lower`.
  ``lines``: optional ``{activation node index: _activation_lines(...)}`` computed already from these
  bounds (walks from many targets share them, :mod:`qbound.bounds.sparse`).
  """
  known_lines = lines
  lam = {target: rows}
  mu: dict = {}
  beta = err = jnp.zeros(rows.shape[: 2 if batched else 1], rows.dtype)

  def push(store, mags, src, value):
    nonlocal err
    if src in store:
      store[src], err = _accumulate(store[src], value, mags[src], err, sound=sound, batched=batched)
    else:
      store[src] = value

  for idx in range(target, 0, -1):
    lv = lam.pop(idx, None)
    mv = mu.pop(idx, None)
    if lv is None and mv is None:
      continue
    nf, nq = fg.nodes[idx], qg.nodes[idx]
    a = None if alphas is None or nf.kind not in ACTIVATIONS else alphas.get(idx)
    ins = nf.inputs
    bounds = tuple(z[i] for i in ins), tuple(zq[i] for i in ins), tuple(d[i] for i in ins)
    lines = None if known_lines is None else known_lines.get(idx)
    if (nf.kind in ACTIVATIONS or nf.kind in G.NONLINEAR) and lines is None:
      lines = _activation_lines(local(nf), local(nq), *bounds, a, sound=sound, batched=batched)
    if idx == target and signed_pairs and nf.kind in LINEAR_KINDS:
      half = lambda x: first_half(x, batched)
      to_d, to_q, b, e = _diff_step(local(nf), local(nq), half(lv), None, *bounds, a, half(beta), half(err), lines,
                                    sound=sound, batched=batched)
      (to_d, to_q), beta, err = mirror_rows((to_d, to_q), b, e, batched=batched)
    else:
      to_d, to_q, beta, err = _diff_step(local(nf), local(nq), lv, mv, *bounds, a, beta, err, lines,
                                         sound=sound, batched=batched)
    for src, value in zip(ins, to_d or ()):
      push(lam, d, src, value)
    for src, value in zip(ins, to_q or ()):
      push(mu, zq, src, value)

  lam.pop(0, None)
  mv = mu.pop(0, None)
  if mv is None:
    value = fp.round_down(beta - err) if sound else beta
    mv = jnp.zeros((*rows.shape[: 2 if batched else 1], *box.lower.shape[1 if batched else 0:]), rows.dtype)
  else:
    value = _at_input(mv, beta, err, box, sound=sound, batched=batched)
  return (value, mv) if with_coefficients else value


def diff_bound_node(fg, qg, target, z, zq, d, box, *, alphas=None, sound=True, row_chunk=None, batched=False):
  """Symbolic differential bounds ``(lower, upper)`` of ``d`` at node ``target`` (``row_chunk`` rows
  at a time when given, see :mod:`qbound.memory`)."""
  node = fg.nodes[target]
  if row_chunk is not None:
    if batched:
      raise ValueError("row_chunk bounds one box at a time (vmap it over boxes); call without batched.")
    lower = lambda rows: diff_backward_lower(fg, qg, target, rows, z, zq, d, box, alphas=alphas, sound=sound)
    return node_bounds_by_rows(lower, node.size, node.shape, box.lower.dtype, row_chunk)
  rows = unit_rows(node.size, tuple(node.shape), jnp.dtype(box.lower.dtype), batch_of(box, batched))
  low = diff_backward_lower(fg, qg, target, rows, z, zq, d, box, alphas=alphas, sound=sound, batched=batched,
                            signed_pairs=True)
  return split_rows(low, tuple(node.shape))


@functools.partial(jax.jit, static_argnames=("sound",))
def _tighten(z, zq, d, sound: bool):
  """``z = zq + d``: each of the three intervals tightens the others."""
  (zl, zu), (ql, qu), (dl, du) = z, zq, d
  lo, hi = ql + dl, qu + du
  z_new = (jnp.maximum(zl, fp.round_down(lo) if sound else lo), jnp.minimum(zu, fp.round_up(hi) if sound else hi))
  lo, hi = zl - du, zu - dl
  q_new = (jnp.maximum(ql, fp.round_down(lo) if sound else lo), jnp.minimum(qu, fp.round_up(hi) if sound else hi))
  lo, hi = zl - qu, zu - ql
  d_new = (jnp.maximum(dl, fp.round_down(lo) if sound else lo), jnp.minimum(du, fp.round_up(hi) if sound else hi))
  if not sound:  # unsound bounds can cross by rounding: keep their ends in order (see crown.intersect)
    z_new, q_new, d_new = fp.unsound_order(z_new), fp.unsound_order(q_new), fp.unsound_order(d_new)
  return z_new, q_new, d_new


_diff_interval_step = jit_step(diff_interval_node, (None, None, 0, 0, 0))


def _symbolic_targets(fg: G.Graph) -> set:
  """The nodes that get a backward symbolic pass: every activation's or product's input and the
  output, except routing maps (a layer norm's statistic broadcast to its row) of a node whose
  bounds are symbolic already: intervals move those bounds exactly, a pass would find nothing."""
  targets = set(relu_inputs(fg)) | {fg.output}
  settled = {0}
  for i, node in enumerate(fg.nodes):
    if i in targets and i != fg.output and _routing_only(node) and node.inputs[0] in settled:
      targets.discard(i)
    if i in targets or (_routing_only(node) and node.inputs and node.inputs[0] in settled):
      settled.add(i)
  return targets


def diff_bounds(fg: G.Graph, qg: G.Graph, box: Box, alphas=None, sound: bool = True, symbolic: bool = True,
                row_chunk: Optional[int] = None, *, batched: bool = False, f_crown: bool = True, check: bool = True,
                node_bound: Optional[Callable] = None):
  """Bounds ``(z, zq, d)`` for every node of two paired graphs (lists indexed by f's nodes).

  ``z`` and ``zq`` come from CROWN on f and f_q, then tightened with ``z = zq + d``. Runs as a
  Python loop over jit-compiled per-node steps (see :func:`qbound.bounds.crown.backward_lower`);
  wrap it in ``jax.jit`` or ``jax.vmap`` as needed.

  Args:
    fg, qg: the traced f and f_q (same structure).
    box: the input box.
    alphas: optional ``{activation node index: {name: slopes}}``, see :func:`relax.relu_diff`
      (``d_lower``, ``d_upper``, ``z``, ``q``) and ``mu`` for the lower slope of relu(zq).
    sound: proven floating-point margins.
    symbolic: backward symbolic bounds on ReLU inputs and the output (else intervals only).
    row_chunk: backward rows per block (None: all at once); see :mod:`qbound.memory`.
    batched: ``box`` holds many boxes along a leading axis, and so does every bound.
    f_crown: bound f's own nodes by CROWN. False: by intervals, then ``z = z_q + d`` at every node
      an activation reads, about a third less work and as tight when ``d`` is small next to ``z_q``
      (close copies such as float16).
    check: raise if any node's interval is empty or NaN (:mod:`qbound.bounds.guards`).
    node_bound: ``(target, z, zq, d) -> (lower, upper)``, the symbolic bounds of ``d`` at a node
      (default :func:`diff_bound_node`); optimised slopes plug in here
      (:func:`qbound.bounds.alpha.diff_alpha_bounds`).
  """
  zq = list(crown_bounds(qg, box, None, sound, row_chunk, batched=batched, check=False))
  if f_crown:
    z = list(crown_bounds(fg, box, None, sound, row_chunk, batched=batched, check=False))
  else:
    z = list(interval_bounds(fg, box, sound, batched=batched, check=False))
  # 1/x, rsqrt and sqrt whose input may leave their domain: a clear error here, not NaN lines later.
  nonlinear.check_domains(fg, z)
  nonlinear.check_domains(qg, zq)
  n = len(fg.nodes)
  zero = jnp.zeros(box.shape, box.lower.dtype)
  d = [(zero, zero)]
  targets = _symbolic_targets(fg)
  tightened = set(relu_inputs(fg)) | {fg.output}
  for i in range(1, n):
    nf, nq = fg.nodes[i], qg.nodes[i]
    ins = nf.inputs
    d.append(_diff_interval_step(local(nf), local(nq), tuple(z[j] for j in ins), tuple(zq[j] for j in ins),
                                 tuple(d[j] for j in ins), sound=sound, batched=batched))
    if i in targets:
      if symbolic and node_bound is not None:
        d[i] = intersect(d[i], node_bound(i, z, zq, d), sound=sound)
      elif symbolic:
        d[i] = intersect(d[i], diff_bound_node(fg, qg, i, z, zq, d, box, alphas=alphas, sound=sound,
                                               row_chunk=row_chunk, batched=batched), sound=sound)
    if i in tightened:
      z[i], zq[i], d[i] = _tighten(z[i], zq[i], d[i], sound)  # elementwise: batched or not
  if check:
    check_bounds([("differential bounds: f's nodes", fg, z), ("differential bounds: f_q's nodes", qg, zq),
                  ("differential bounds: d = f - f_q", fg, d)], sound=sound)
  return z, zq, d


def diff(f, fq, box: Box, *, sound: bool = True, symbolic: bool = True) -> Box:
  """Proven bounds on ``f(x) - fq(x)`` over ``box`` by differential bound propagation.

  Args:
    f: the original network (a pure function of one input) or a
      :class:`~qbound.merge.MergedNetwork` (then ``fq`` is None).
    fq: the compressed network, with the same layer structure as f.
    box: the input set.
    sound: widen by proven floating-point margins.
    symbolic: use backward symbolic bounds (NeuroDiff-style); False gives ReluDiff's intervals.

  Returns:
    A :class:`~qbound.box.Box` with ``lower <= f(x) - fq(x) <= upper`` for all x in the box.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(4))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
    >>> box = qb.Box(-jnp.ones(4), jnp.ones(4))
    >>> d, m = qb.bounds.diff(f, fq, box), qb.bounds.crown(qb.merge(f, fq, box), box)
    >>> bool(jnp.all(d.upper - d.lower <= m.upper - m.lower))
    True
  """
  from qbound.merge import MergedNetwork, merge

  box = validate_box(box)
  merged = f if isinstance(f, MergedNetwork) else merge(f, fq, box)
  require_paired(merged)
  _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, sound, symbolic)
  lower, upper = d[merged.f_graph.output]
  spot_check(merged.graph, box, lower, upper, sound=sound, what="differential bounds")
  return Box(lower, upper)


def require_paired(merged) -> None:
  if not merged.paired:
    raise ValueError("differential bounds need f and f_q with the same layer structure (the same layers in "
                     "the same order, only weights differing); these differ. Use qbound.bounds.crown on the "
                     "merged network instead, or certify(..., method='crown').")
