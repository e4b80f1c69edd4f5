"""Branch and bound in NumPy on small paired ReLU chains: a first call that compiles nothing.

:mod:`qbound.bounds.bab` bounds its pieces with jit-compiled steps: about 80 XLA programs, 5-12 CPU
seconds on a first call (docs/results.md), where a warm call on a small net closes the gap in well
under a second. On a net of a few dozen ReLUs and a handful of inputs, the same search runs fast
enough in NumPy, whose operations need no compilation. :func:`host_branch_and_bound` bounds a
batch of pieces in float64 by

* forward symbolic intervals (Wang, Pei, Whitehouse, Yang, Jana, "Formal Security Analysis of
  Neural Networks using Symbolic Intervals", USENIX Security 2018) for f's ``z``, f_q's ``z_q`` and
  their difference ``d = z - z_q`` (NeuroDiff, Paulsen, Wang, Wang, Wang, ASE 2020): an affine
  layer maps ``d`` exactly, ``W z + b - (W_q z_q + b_q) = W_q d + (W - W_q) z + (b - b_q)``; through a
  ReLU pair whose phases are both known ``d`` keeps a linear form (``d``, ``0``, ``z`` or ``-z_q``),
  otherwise the narrower of the two ReLUs' own lines' difference (DeepPoly's lines, Singh et al.,
  POPL 2019) and the chords of ``min(d, 0)`` and ``max(d, 0)`` in ``d`` (ReluDiff, Paulsen, Wang,
  Wang, ICSE 2020);
* a backward pass in ``d`` and ``z_q`` (CROWN, Zhang et al., NeurIPS 2018, with the differential
  lines of :func:`qbound.bounds.relax.relu_diff`) for the ``d`` of every neuron that some piece
  cannot tell active from inactive, and for the outputs;
* each piece's bounds met with its parent's, neuron by neuron (``z_q = z - d`` tightens the third
  of any two).

On a piece where every ReLU of f and f_q is stable the bounds are the networks' own affine pieces,
so they become exact as pieces shrink. The pieces with the largest bounds are split first: along
the two inputs whose interval-gradient smear is largest (ReluVal's, as :mod:`qbound.bounds.bab`'s
``split_rule="gradient"``), both halves of both bounded in the same batch, the split whose halves'
gains have the largest product kept (:mod:`qbound.bounds.bab`'s strong branching). Every new
piece's centre and the corner its bound points to are evaluated, and a few steps of sign-gradient
ascent run from the best of them, so the reached error rises too.

Soundness in float64: every form is widened by :data:`RELATIVE_SLACK` of its magnitude over the
piece at each layer, and every backward step by the same fraction of the magnitude of every term it
sums (the rounding of float64 sums of a few thousand terms is below ``1e-12`` of their magnitude,
Higham 2002, section 3.1), as :mod:`qbound.exact.forms` does; the lines' offsets are checked at
their ends with a few ulps to spare. The weights are float32 values, exact in float64. The bounds
hold for the real-arithmetic networks.

Example:
  >>> import functools, jax, jax.numpy as jnp, qbound as qb
  >>> from qbound.bounds.host_bab import host_branch_and_bound
  >>> def mlp(p, x):
  ...   return jax.nn.relu(x @ p[0] + p[1]) @ p[2]
  >>> p = (jax.random.normal(jax.random.key(0), (2, 8)), jnp.full(8, 0.1), jax.random.normal(jax.random.key(1), (8, 1)))
  >>> box = qb.Box(-jnp.ones(2), jnp.ones(2))
  >>> merged = qb.merge(functools.partial(mlp, p), functools.partial(mlp, qb.quantize.uniform(p, bits=4)), box)
  >>> res = host_branch_and_bound(merged, box, time_budget=5.0, target_gap=0.01)
  >>> res.lower <= res.upper <= 1.01 * res.lower
  True
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from qbound import graph as G

# float64 forms are widened by this fraction of their magnitude over the piece, per layer.
RELATIVE_SLACK = 1e-10
# Nets of at most this many ReLUs (f's and f_q's together) and inputs of at most this many entries
# (as certify's MILP and LOW_DIMENSIONAL_INPUTS): above, a batch's NumPy work grows past what the
# compiled steps cost, and input splitting needs far more pieces.
MAX_NEURONS = 128
MAX_INPUTS = 8
# Pieces split per round, each into two halves along CANDIDATES input dimensions (strong branching);
# 8 steps of sign-gradient ascent from the ASCENT best new points (and the best so far) per round.
BATCH = 64
CANDIDATES = 2
ASCENT = 8
# Open pieces kept at most (``stopped == "max_pieces"`` past it; each keeps 6 float64 bounds per
# neuron, 1.4 kB on a 5-12-8-8-2 pair).
MAX_PIECES = 200_000


@dataclasses.dataclass(frozen=True)
class Chain:
  """A paired chain of layers in float64: ``("affine", W, b, W_q, b_q)`` or ``("relu",)``."""

  layers: tuple
  n_in: int
  n_out: int


@dataclasses.dataclass(frozen=True)
class HostBabResult:
  """The outcome of :func:`host_branch_and_bound`.

  Attributes:
    upper: proven bound on ``max |f_j - f_q,j|`` over the box and the selected outputs.
    lower: the largest error reached (float64 evaluation of the chain), at ``witness``.
    witness: the input reaching ``lower`` (flat).
    diff_lower, diff_upper: per-output proven bounds on ``f - f_q`` (all outputs).
    root_lower, root_upper: the same over the whole box, before any split.
    pieces_bounded: how many pieces were bounded.
    stopped: ``"gap"``, ``"time"``, ``"stop"``, ``"epsilon"`` or ``"max_pieces"``.
    seconds: wall-clock time.
  """

  upper: float
  lower: float
  witness: np.ndarray
  diff_lower: np.ndarray
  diff_upper: np.ndarray
  root_lower: np.ndarray
  root_upper: np.ndarray
  pieces_bounded: int
  stopped: str
  seconds: float


def _dense_matrix(node: G.Node) -> Optional[np.ndarray]:
  """A dense layer's ``(n_out, n_in)`` matrix read off its weights (``x @ W``, ``W @ x``), or None
  for other linear maps. NumPy only: the generic path applies the map to a basis with JAX, whose
  eager operations compile one by one (2.4 s on a first call of a 5-12-8-8-2 pair)."""
  op = node.op
  if getattr(op, "name", None) != "dot_general" or len(node.weights) != 1 or len(op.in_shape) != 1:
    return None
  w = np.asarray(node.weights[0], np.float64)
  numbers = dict(op.params).get("dimension_numbers")
  if w.ndim != 2 or node.shape != (w.shape[1 - op.var_pos],):
    return None
  if op.var_pos == 0 and numbers == (((0,), (0,)), ((), ())):
    return w.T
  if op.var_pos == 1 and numbers == (((1,), (0,)), ((), ())):
    return w
  return None


def chain_of(merged) -> Optional[Chain]:
  """The merged network as a :class:`Chain`, or None when it is not a small paired chain of dense
  layers (``x @ W + b``) and ReLUs (identity roundings skipped) with few inputs (see
  ``MAX_NEURONS``, ``MAX_INPUTS``)."""
  if not merged.paired:
    return None
  fg, qg = merged.f_graph, merged.fq_graph
  if len(fg.nodes) != len(qg.nodes) or fg.output != len(fg.nodes) - 1 or qg.output != len(qg.nodes) - 1:
    return None
  n_in = int(np.prod(fg.input_shape))
  if n_in > MAX_INPUTS:
    return None
  neurons, kinds = 0, []
  for i, (a, b) in enumerate(zip(fg.nodes[1:], qg.nodes[1:]), start=1):
    identity = lambda n: n.kind == G.ROUND and n.attrs[0] == "none"  # noqa: E731
    if a.kind != b.kind or a.inputs != (i - 1,) or b.inputs != (i - 1,):
      return None
    if a.kind == G.RELU:
      neurons += 2 * a.size
    elif not (a.kind == G.AFFINE or identity(a)):
      return None
    kinds.append(a.kind)
  if neurons > MAX_NEURONS:
    return None
  fm = {i: _dense_matrix(n) for i, n in enumerate(fg.nodes) if n.kind == G.AFFINE}
  qm = {i: _dense_matrix(n) for i, n in enumerate(qg.nodes) if n.kind == G.AFFINE}
  if any(m is None for m in (*fm.values(), *qm.values())):
    # Other linear maps (scaled, convolutions) would be read through JAX, compiling on a first
    # call what this search exists to avoid: left to the compiled search.
    return None
  layers = []
  for i, kind in enumerate(kinds, start=1):
    if kind == G.RELU:
      layers.append(("relu",))
    elif kind == G.AFFINE:
      a, b = fg.nodes[i], qg.nodes[i]
      bias = lambda n: np.zeros(n.size) if n.bias is None else np.broadcast_to(  # noqa: E731
          np.asarray(n.bias, np.float64), n.shape).reshape(-1)
      layers.append(("affine", fm[i], bias(a), qm[i], bias(b)))
  return Chain(tuple(layers), n_in, fg.nodes[-1].size)


def evaluate(chain: Chain, xs: np.ndarray) -> np.ndarray:
  """``f(x) - f_q(x)`` in float64 for a batch ``xs`` of shape ``(k, n_in)``."""
  z = zq = np.asarray(xs, np.float64)
  for layer in chain.layers:
    if layer[0] == "relu":
      z, zq = np.maximum(z, 0.0), np.maximum(zq, 0.0)
    else:
      _, w, b, wq, bq = layer
      z, zq = z @ w.T + b, zq @ wq.T + bq
  return z - zq


def _ascent(chain: Chain, xs, box_lo, box_hi, outputs, steps: int, first_step: float):
  """Projected sign-gradient ascent on ``max_j |f_j - f_q,j|`` from each row of ``xs`` (exact
  gradients: the networks are linear around almost every point). Returns the points visited."""
  visited = [xs]
  step = first_step * (box_hi - box_lo)
  for _ in range(steps):
    z = zq = xs
    masks = []
    for layer in chain.layers:
      if layer[0] == "relu":
        masks.append((z > 0, zq > 0))
        z, zq = np.maximum(z, 0.0), np.maximum(zq, 0.0)
      else:
        z, zq = z @ layer[1].T + layer[2], zq @ layer[3].T + layer[4]
    d = (z - zq)[:, outputs]
    j = outputs[np.argmax(np.abs(d), axis=1)]
    sign = np.sign(d[np.arange(len(xs)), np.argmax(np.abs(d), axis=1)])
    grads = []
    for which in (1, 3):
      g, mask_i = None, len(masks)
      for layer in reversed(chain.layers):
        if layer[0] == "relu":
          mask_i -= 1
          g = g * masks[mask_i][0 if which == 1 else 1]
        else:
          g = layer[which][j] if g is None else g @ layer[which]
      grads.append(g)
    grad = sign[:, None] * (grads[0] - grads[1])
    xs = np.clip(xs + step * np.sign(grad), box_lo, box_hi)
    visited.append(xs)
    step = step * 0.7
  return np.concatenate(visited)


# Forms: (k, n_in + 1, m) arrays, a linear function of the input per neuron, constant last.


def _concrete(form, lo, hi, upper: bool):
  """The maximum (``upper``) or minimum of every form over its piece, widened outward."""
  coeff = form[:, :-1]
  a, b = coeff * lo[:, :, None], coeff * hi[:, :, None]
  value = (np.maximum(a, b) if upper else np.minimum(a, b)).sum(axis=1) + form[:, -1]
  slack = RELATIVE_SLACK * _magnitude(form, lo, hi)
  return value + slack if upper else value - slack


def _magnitude(form, lo, hi):
  """``max |form|`` over the piece, bounded above (``(k, m)``)."""
  xmax = np.maximum(np.abs(lo), np.abs(hi))
  return (np.abs(form[:, :-1]) * xmax[:, :, None]).sum(axis=1) + np.abs(form[:, -1])


def _affine(lower, upper, w, b, lo, hi):
  """Forms of ``w z + b`` from forms of ``z``, the constant widened by the rounding's bound."""
  pos, neg = np.maximum(w, 0.0).T, np.minimum(w, 0.0).T
  l_out = lower @ pos + upper @ neg
  u_out = upper @ pos + lower @ neg
  l_out[:, -1] += b
  u_out[:, -1] += b
  big = np.maximum(_magnitude(lower, lo, hi), _magnitude(upper, lo, hi))
  slack = RELATIVE_SLACK * (big @ np.abs(w).T + np.abs(b))
  l_out[:, -1] -= slack
  u_out[:, -1] += slack
  return l_out, u_out


def _relu_forms(lower, upper, zl, zu, lo, hi):
  """DeepPoly's lines of ``relu(z)`` from forms of ``z`` and its bounds ``[zl, zu]``."""
  k, p, _ = lower.shape
  active, inactive = zl >= 0, zu <= 0
  unstable = ~active & ~inactive
  slope = np.where(unstable, zu / np.where(unstable, zu - zl, 1.0), 0.0) * (1 + 1e-12)
  chord = slope[:, None] * upper
  chord[:, -1] -= slope * zl
  chord[:, -1] += 2 * RELATIVE_SLACK * (_magnitude(chord, lo, hi) + slope * np.abs(zl))
  zero = np.zeros_like(lower)
  u_out = np.where(active[:, None], upper, np.where(unstable[:, None], chord, zero))
  keep_identity = active | (unstable & (zu > -zl))
  l_out = np.where(keep_identity[:, None], lower, zero)
  return l_out, u_out


def _delta_forms(ld, ud, dl, du, lo, hi):
  """Lines of ``h = relu(z_q + d) - relu(z_q)`` in ``d`` alone, as forms: ``h`` lies between
  ``min(d, 0)`` and ``max(d, 0)``, so between their chords over ``[dl, du]`` (ReluDiff, Paulsen,
  Wang, Wang, ICSE 2020; :func:`qbound.bounds.relax.delta_lines`), whose slopes are in [0, 1]."""
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
  l_out[:, -1] -= RELATIVE_SLACK * _magnitude(l_out, lo, hi)
  u_out[:, -1] += RELATIVE_SLACK * _magnitude(u_out, lo, hi)
  return l_out, u_out


def _sum_forms(a, b, upper: bool, lo, hi):
  """``a + b`` widened by :data:`RELATIVE_SLACK` of both terms' magnitudes (not the sum's, which
  may be far smaller: f's and f_q's forms nearly cancel on close copies)."""
  out = a + b
  slack = RELATIVE_SLACK * (_magnitude(a, lo, hi) + _magnitude(b, lo, hi))
  out[:, -1] += slack if upper else -slack
  return out


def _down(x):
  return np.nextafter(x, -np.inf)


def _up(x):
  return np.nextafter(x, np.inf)


EPS = np.finfo(np.float64).eps
TINY = np.finfo(np.float64).tiny


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


def _backward(chain: Chain, upto: int, lam_d, lam_q, lines: dict, mags: list, lo, hi):
  """Lower bounds of ``lam_d . d + lam_q . z_q`` at the output of layer ``upto - 1``, over each piece:
  CROWN's backward pass (Zhang et al., NeurIPS 2018) on the pair in the variables ``d`` and ``z_q``
  (NeuroDiff's differential form, Paulsen et al., ASE 2020). ``lam_*``: ``(k, R, m)`` rows;
  ``lines[j]``: :class:`_PairLines` of ReLU layer ``j``; ``mags[j]``: ``(d_max, q_max)`` at layer
  ``j``'s input. Returns ``(k, R)`` bounds, widened by the float64 rounding of every step."""
  k, rows = lam_d.shape[:2]
  const = np.zeros((k, rows))
  err = np.zeros((k, rows))
  for j in range(upto - 1, -1, -1):
    layer = chain.layers[j]
    d_in, q_in = mags[j]
    if layer[0] == "affine":
      _, w, b, wq, bq = layer
      m_out, m_in = w.shape
      flat_d, flat_q = lam_d.reshape(-1, m_out), lam_q.reshape(-1, m_out)
      const += (flat_d @ (b - bq) + flat_q @ bq).reshape(k, rows)
      # Every term's magnitude, summed: |lam_d| (|W| d_in + |W - W_q| q_in + |b - b_q|) + |lam_q| (|W_q| q_in + |b_q|).
      mag_d = d_in @ np.abs(w).T + q_in @ np.abs(w - wq).T + np.abs(b - bq)
      mag_q = q_in @ np.abs(wq).T + np.abs(bq)
      err += np.einsum("krm,km->kr", np.abs(lam_d), mag_d) + np.einsum("krm,km->kr", np.abs(lam_q), mag_q)
      lam_d, lam_q = (flat_d @ w).reshape(k, rows, m_in), (flat_d @ (w - wq) + flat_q @ wq).reshape(k, rows, m_in)
    else:
      ln = lines[j]
      pos_d, pos_q = lam_d >= 0, lam_q >= 0
      p = np.where(pos_d, ln.p_l[:, None], ln.p_u[:, None])
      q = np.where(pos_d, ln.q_l[:, None], ln.q_u[:, None])
      r = np.where(pos_d, ln.r_l[:, None], ln.r_u[:, None])
      slope = np.where(pos_q, ln.a[:, None], ln.s[:, None])
      offset = np.where(pos_q, 0.0, ln.t[:, None])
      const += (lam_d * r + lam_q * offset).sum(-1)
      new_d, new_q = lam_d * p, lam_d * q + lam_q * slope
      # |new_d| d_max + |new_q| q_max + |step| <= |lam_d| mag_d + |lam_q| mag_q (either line).
      mag_d = (np.maximum(np.abs(ln.p_l), np.abs(ln.p_u)) * ln.d_max + np.maximum(np.abs(ln.q_l), np.abs(ln.q_u))
               * ln.q_max + np.maximum(np.abs(ln.r_l), np.abs(ln.r_u)))
      mag_q = np.maximum(ln.a, ln.s) * ln.q_max + ln.t
      err += np.einsum("krm,km->kr", np.abs(lam_d), mag_d) + np.einsum("krm,km->kr", np.abs(lam_q), mag_q)
      lam_d, lam_q = new_d, new_q
  # At the input d = 0 and z_q = x.
  a, b = lam_q * lo[:, None], lam_q * hi[:, None]
  value = const + np.minimum(a, b).sum(-1)
  xmax = np.maximum(np.abs(lo), np.abs(hi))
  err += (np.abs(lam_q) * xmax[:, None]).sum(-1) + np.abs(const)
  return value - RELATIVE_SLACK * err


def _meet(zl, zu, ql, qu, dl, du):
  """``z = z_q + d``: each pair of bounds tightens the third (rounded outward)."""
  zl, zu = np.maximum(zl, _down(ql + dl)), np.minimum(zu, _up(qu + du))
  ql, qu = np.maximum(ql, _down(zl - du)), np.minimum(qu, _up(zu - dl))
  dl, du = np.maximum(dl, _down(zl - qu)), np.minimum(du, _up(zu - ql))
  return zl, zu, ql, qu, dl, du


def _backward_node(chain, upto, lines, mags, lo, hi, bounds, columns):
  """Bounds of ``z_q`` and ``d`` at the output of layer ``upto - 1`` by the backward pass (rows
  +-e on d and z_q, for the neurons ``columns`` only), met with ``bounds`` and ``z = z_q + d``."""
  k = lo.shape[0]
  m = bounds[0].shape[1]
  c = len(columns)
  unit = np.zeros((c, m))
  unit[np.arange(c), columns] = 1.0
  zero = np.zeros((c, m))
  lam_d = np.broadcast_to(np.concatenate([unit, -unit]), (k, 2 * c, m))
  v = _backward(chain, upto, lam_d, np.zeros_like(lam_d), lines, mags, lo, hi)
  zl, zu, ql, qu, dl, du = (b.copy() for b in bounds)
  dl[:, columns], du[:, columns] = np.maximum(dl[:, columns], v[:, :c]), np.minimum(du[:, columns], -v[:, c:])
  return _meet(zl, zu, ql, qu, dl, du)


def bound_pieces(chain: Chain, lo: np.ndarray, hi: np.ndarray, prior: Optional[np.ndarray] = None):
  """Proven bounds on ``f - f_q`` over each piece ``[lo_i, hi_i]`` (``(k, n_in)`` each).

  ``prior``: bounds of every affine layer's ``z``, ``z_q`` and ``d`` proven on a larger box holding
  each piece (its parent's ``kept``, ``(k, 6 * neurons)``), met with the new ones: tighter lines.

  Returns:
    ``(d_lower, d_upper, d_lower_form, d_upper_form, kept)``: ``(k, n_out)`` bounds, the output's
    forms ``(k, n_in + 1, n_out)`` whose coefficients say which corner each bound points to, and
    every affine layer's bounds for the pieces' children (``prior``).
  """
  k, n = lo.shape
  eye = np.zeros((k, n + 1, n))
  eye[:, np.arange(n), np.arange(n)] = 1.0
  lz = uz = lq = uq = eye
  ld = ud = np.zeros_like(eye)
  zl = ql = lo
  zu = qu = hi
  dl = du = np.zeros_like(lo)
  lines: dict = {}
  mags: list = []
  kept: list = []
  offset = 0
  for j, layer in enumerate(chain.layers):
    mags.append((np.maximum(np.abs(dl), np.abs(du)), np.maximum(np.abs(ql), np.abs(qu))))
    if layer[0] == "affine":
      _, w, b, wq, bq = layer
      dw, db = w - wq, b - bq
      ld_z, ud_z = _affine(lz, uz, dw, db, lo, hi)
      ld_d, ud_d = _affine(ld, ud, wq, np.zeros_like(bq), lo, hi)
      # The sums' rounding, relative to the terms (f's and f_q's parts may nearly cancel).
      ld, ud = _sum_forms(ld_z, ld_d, False, lo, hi), _sum_forms(ud_z, ud_d, True, lo, hi)
      lz, uz = _affine(lz, uz, w, b, lo, hi)
      lq, uq = _affine(lq, uq, wq, bq, lo, hi)
      zl, zu = _concrete(lz, lo, hi, False), _concrete(uz, lo, hi, True)
      ql, qu = _concrete(lq, lo, hi, False), _concrete(uq, lo, hi, True)
      dl, du = _concrete(ld, lo, hi, False), _concrete(ud, lo, hi, True)
      dl = _down(dl - RELATIVE_SLACK * np.abs(dl))
      du = _up(du + RELATIVE_SLACK * np.abs(du))
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
        if len(columns):
          zl, zu, ql, qu, dl, du = _backward_node(chain, j + 1, lines, mags, lo, hi, (zl, zu, ql, qu, dl, du),
                                                  columns)
      kept.append(np.stack([zl, zu, ql, qu, dl, du], axis=1).reshape(k, 6 * m))
      offset += 6 * m
    else:
      lines[j] = _pair_lines(zl, zu, ql, qu, dl, du)
      rz_l, rz_u = _relu_forms(lz, uz, zl, zu, lo, hi)
      rq_l, rq_u = _relu_forms(lq, uq, ql, qu, lo, hi)
      both_active = (zl >= 0) & (ql >= 0)
      both_inactive = (zu <= 0) & (qu <= 0)
      only_z = (zl >= 0) & (qu <= 0)
      only_q = (zu <= 0) & (ql >= 0)
      # Neither phase pair known: the two lines' difference, or the chords in d, the narrower.
      diff_l, diff_u = _sum_forms(rz_l, -rq_u, False, lo, hi), _sum_forms(rz_u, -rq_l, True, lo, hi)
      width_forms = _concrete(diff_u, lo, hi, True) - _concrete(diff_l, lo, hi, False)
      iv_l, iv_u = np.minimum(dl, 0.0), np.maximum(du, 0.0)
      dt_l, dt_u = _delta_forms(ld, ud, dl, du, lo, hi)
      width_delta = _concrete(dt_u, lo, hi, True) - _concrete(dt_l, lo, hi, False)
      use_delta = width_delta < width_forms
      new_ld = np.where(use_delta[:, None], dt_l, diff_l)
      new_ud = np.where(use_delta[:, None], dt_u, diff_u)
      zero = np.zeros_like(ld)
      cases = [(both_active, ld, ud), (both_inactive, zero, zero), (only_z, lz, uz), (only_q, -uq, -lq)]
      for mask, l_case, u_case in cases:
        new_ld = np.where(mask[:, None], l_case, new_ld)
        new_ud = np.where(mask[:, None], u_case, new_ud)
      ld, ud = new_ld, new_ud
      lz, uz, lq, uq = rz_l, rz_u, rq_l, rq_u
      relu_zl, relu_zu = np.maximum(zl, 0.0), np.maximum(zu, 0.0)
      relu_ql, relu_qu = np.maximum(ql, 0.0), np.maximum(qu, 0.0)
      zl, zu, ql, qu = relu_zl, relu_zu, relu_ql, relu_qu
      dl = np.maximum(_concrete(ld, lo, hi, False), np.maximum(iv_l, _down(relu_zl - relu_qu)))
      du = np.minimum(_concrete(ud, lo, hi, True), np.minimum(iv_u, _up(relu_zu - relu_ql)))
      zl, zu, ql, qu, dl, du = _meet(zl, zu, ql, qu, dl, du)
  return dl, du, ld, ud, np.concatenate(kept, axis=1)


def _gradient_weight(chain: Chain, kept, dl, du, outputs):
  """Per input dimension, ``max |g_i|`` for an interval ``g`` holding the gradient of the worst
  output's ``f_j - f_q,j`` over the piece (ReluVal's interval gradient, as NeuroDiff splits): each
  ReLU's derivative is 1, 0 or anything in [0, 1] by its input's bounds in ``kept``."""
  k = dl.shape[0]
  side = np.maximum(du[:, outputs], -dl[:, outputs])
  worst = outputs[np.argmax(side, axis=1)]
  affine = [j for j, layer in enumerate(chain.layers) if layer[0] == "affine"]
  sizes = [chain.layers[j][1].shape[0] for j in affine]
  starts = np.concatenate([[0], np.cumsum([6 * m for m in sizes])])
  total_lo = total_hi = None
  for which in (1, 3):  # f's weights and z bounds, then f_q's
    g_lo = g_hi = None
    for j in range(len(chain.layers) - 1, -1, -1):
      layer = chain.layers[j]
      if layer[0] == "affine":
        w = layer[which]
        if g_lo is None:
          g_lo = g_hi = w[worst]
        else:
          c, r = (g_lo + g_hi) / 2, (g_hi - g_lo) / 2
          c, r = c @ w, r @ np.abs(w)
          g_lo, g_hi = c - r, c + r
      else:
        a = affine.index(j - 1)
        b = kept[:, starts[a]:starts[a + 1]].reshape(k, 6, sizes[a])
        lo_pre, hi_pre = (b[:, 0], b[:, 1]) if which == 1 else (b[:, 2], b[:, 3])
        on, off = lo_pre >= 0, hi_pre <= 0
        g_lo = np.where(on, g_lo, np.where(off, 0.0, np.minimum(g_lo, 0.0)))
        g_hi = np.where(on, g_hi, np.where(off, 0.0, np.maximum(g_hi, 0.0)))
    if total_lo is None:
      total_lo, total_hi = g_lo, g_hi
    else:
      total_lo, total_hi = total_lo - g_hi, total_hi - g_lo
  return np.maximum(np.abs(total_lo), np.abs(total_hi))


def _error_bound(dl, du, outputs):
  return np.maximum(du[:, outputs], -dl[:, outputs]).max(axis=1)


def _one_blas_thread():
  """OpenBLAS's threads off while it runs: its matrices are small and many, and on two loaded cores
  the threads only wait for each other (5x the CPU time of one thread for a 40960 x 16 by 16 x 12
  product, measured at load 9)."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:  # pragma: no cover - a declared dependency
    return contextlib.nullcontext()
  return threadpool_limits(limits=1, user_api="blas")


def host_branch_and_bound(merged, box, *, outputs: Optional[Sequence[int]] = None, time_budget: float = 10.0,
                          target_gap: float = 0.02, epsilon: Optional[float] = None, initial_lower: float = 0.0,
                          initial_witness=None, stop: Optional[Callable[[], bool]] = None,
                          report: Optional[Callable] = None, chain: Optional[Chain] = None) -> HostBabResult:
  """Input-splitting branch and bound on ``max |f - f_q|`` in NumPy (see the module docstring).

  Args:
    merged: a :class:`~qbound.merge.MergedNetwork` of a small paired ReLU chain (:func:`chain_of`).
    box: the input box.
    outputs: flat output indices whose error counts (default: all).
    time_budget: seconds before it stops; the result is a proven interval whenever it stops.
    target_gap: stop once ``upper <= (1 + target_gap) * lower``.
    epsilon: if given, stop once ``upper <= epsilon`` or ``lower > epsilon``.
    initial_lower, initial_witness: an error already reached (the witness in float64 terms).
    stop: polled between batches; True stops it (e.g. another method closed the gap).
    report: called as ``report(upper, lower, witness)`` after every batch.
    chain: :func:`chain_of` ``(merged)``, if already computed.

  Returns:
    A :class:`HostBabResult`.

  Raises:
    ValueError: the network is not a small paired chain of affine layers and ReLUs, an output
      index is out of range, or a negative or NaN budget, gap, epsilon or lower bound.
  """
  from qbound import validate
  from qbound.box import validate_box

  time_budget = validate.seconds("time_budget", time_budget)
  target_gap = validate.non_negative("target_gap", target_gap)
  epsilon = validate.optional_non_negative("epsilon", epsilon)
  initial_lower = validate.non_negative("initial_lower", initial_lower)
  if outputs is not None:
    validate.output_indices("outputs", outputs)
  box = validate_box(box)
  with _one_blas_thread():
    return _search(merged, box, outputs, time_budget, target_gap, epsilon, initial_lower, initial_witness, stop,
                   report, chain)


def _search(merged, box, outputs, time_budget, target_gap, epsilon, initial_lower, initial_witness, stop, report,
            chain) -> HostBabResult:
  start = time.perf_counter()
  chain = chain_of(merged) if chain is None else chain
  if chain is None:
    raise ValueError(f"host_branch_and_bound needs a paired chain of affine layers and ReLUs with at most "
                     f"{MAX_NEURONS} ReLUs and {MAX_INPUTS} inputs; use qbound.bounds.branch_and_bound instead.")
  outputs = np.arange(chain.n_out) if outputs is None else np.asarray(outputs, np.int64).reshape(-1)
  if outputs.size == 0 or outputs.min() < 0 or outputs.max() >= chain.n_out:
    raise ValueError(f"outputs must be flat indices in [0, {chain.n_out}), got {outputs.tolist()}.")
  n = chain.n_in
  box_lo = np.asarray(box.lower, np.float64).reshape(1, n)
  box_hi = np.asarray(box.upper, np.float64).reshape(1, n)
  lower = float(initial_lower)
  witness = ((box_lo + box_hi) / 2)[0] if initial_witness is None else np.asarray(initial_witness, np.float64).reshape(n)

  def probe(los, his, dls, lds, uds):
    """The pieces' centres and, for each, the corner its worst bound's form points to."""
    nonlocal lower, witness
    worst = np.argmax(np.maximum(dls[1][:, outputs], -dls[0][:, outputs]), axis=1)
    upper_side = dls[1][np.arange(len(worst)), outputs[worst]] >= -dls[0][np.arange(len(worst)), outputs[worst]]
    coeff = np.where(upper_side[:, None], uds[np.arange(len(worst)), :-1, outputs[worst]],
                     -lds[np.arange(len(worst)), :-1, outputs[worst]])
    corners = np.where(coeff >= 0, his, los)
    xs = np.concatenate([(los + his) / 2, corners])
    if ASCENT:
      starts = np.concatenate([witness[None], xs[np.argsort(-np.abs(evaluate(chain, xs))[:, outputs].max(axis=1))[:ASCENT]]])
      xs = np.concatenate([xs, _ascent(chain, starts, box_lo[0], box_hi[0], outputs, 8, 0.05)])
    errs = np.abs(evaluate(chain, xs))[:, outputs].max(axis=1)
    best = int(np.argmax(errs))
    if errs[best] > lower:
      lower, witness = float(errs[best]), xs[best]

  dl, du, ld, ud, kept = bound_pieces(chain, box_lo, box_hi)
  root_lower, root_upper = dl[0].copy(), du[0].copy()
  probe(box_lo, box_hi, (dl, du), ld, ud)
  bounded = 1
  # Open pieces (bound above the target) in arrays; the others are folded into closed_*.
  los, his, dls, dus, keeps = box_lo, box_hi, dl, du, kept
  closed_lower = np.full(chain.n_out, np.inf)
  closed_upper = np.full(chain.n_out, -np.inf)
  closed_bound = -np.inf
  stopped = "time"
  while True:
    target = (1 + target_gap) * lower
    bounds = _error_bound(dls, dus, outputs)
    done = bounds <= target
    if done.any():
      closed_lower = np.minimum(closed_lower, dls[done].min(axis=0))
      closed_upper = np.maximum(closed_upper, dus[done].max(axis=0))
      closed_bound = max(closed_bound, float(bounds[done].max()))
      los, his, dls, dus, bounds = los[~done], his[~done], dls[~done], dus[~done], bounds[~done]
      keeps = keeps[~done]
    upper = max(closed_bound, float(bounds.max(initial=-np.inf)), lower)
    if report is not None:
      report(upper, lower, witness)
    if not len(bounds):
      stopped = "gap"
      break
    if epsilon is not None and (upper <= epsilon or lower > epsilon):
      stopped = "epsilon"
      break
    if stop is not None and stop():
      stopped = "stop"
      break
    if time.perf_counter() - start >= time_budget:
      break
    if len(bounds) > MAX_PIECES:
      stopped = "max_pieces"
      break
    # The worst pieces; each is split in half along the candidate dimension whose halves gain most.
    take = np.argsort(-bounds)[:BATCH]
    rest = np.ones(len(bounds), bool)
    rest[take] = False
    p_lo, p_hi = los[take], his[take]
    mid = (p_lo + p_hi) / 2
    m = len(take)
    # ReluVal's smear with an interval gradient (as bab.py's split rule "gradient").
    weight = _gradient_weight(chain, keeps[take], dls[take], dus[take], outputs) * (p_hi - p_lo)
    cands = min(CANDIDATES, n)
    axes = np.argsort(-weight, axis=1)[:, :cands]  # (m, c)
    rows = np.arange(m)[:, None]
    c_lo = np.repeat(p_lo[:, None], 2 * cands, axis=1)  # (m, 2c, n): candidate i's lower half, then upper half
    c_hi = np.repeat(p_hi[:, None], 2 * cands, axis=1)
    c_hi[rows, np.arange(cands)[None], axes] = mid[rows, axes]
    c_lo[rows, cands + np.arange(cands)[None], axes] = mid[rows, axes]
    c_lo, c_hi = c_lo.reshape(-1, n), c_hi.reshape(-1, n)
    reps = 2 * cands
    cdl, cdu, cld, cud, ckept = bound_pieces(chain, c_lo, c_hi, np.repeat(keeps[take], reps, axis=0))
    bounded += len(c_lo)
    probe(c_lo, c_hi, (cdl, cdu), cld, cud)
    # Meet with the parent's bounds (the children lie inside it).
    cdl = np.maximum(cdl, np.repeat(dls[take], reps, axis=0))
    cdu = np.minimum(cdu, np.repeat(dus[take], reps, axis=0))
    child = _error_bound(cdl, cdu, outputs).reshape(m, 2, cands)
    # Ranked by the product of both halves' gains, as bab.py's strong branching: the worse half
    # alone keeps slicing one narrow dimension.
    gain = np.maximum(bounds[take][:, None, None] - child, 0.0)
    score = -(gain[:, 0] * gain[:, 1]) - 1e-9 * (gain[:, 0] + gain[:, 1])
    best = np.argmin(score, axis=1)
    pick = np.concatenate([np.arange(m) * reps + best, np.arange(m) * reps + cands + best])
    keeps = np.concatenate([keeps[rest], ckept[pick]])
    los = np.concatenate([los[rest], c_lo[pick]])
    his = np.concatenate([his[rest], c_hi[pick]])
    dls = np.concatenate([dls[rest], cdl[pick]])
    dus = np.concatenate([dus[rest], cdu[pick]])
  diff_lower = np.minimum(closed_lower, dls.min(axis=0, initial=np.inf))
  diff_upper = np.maximum(closed_upper, dus.max(axis=0, initial=-np.inf))
  upper = max(closed_bound, float(_error_bound(dls, dus, outputs).max(initial=-np.inf)))
  return HostBabResult(upper=max(upper, 0.0), lower=lower, witness=witness, diff_lower=diff_lower,
                       diff_upper=diff_upper, root_lower=root_lower, root_upper=root_upper,
                       pieces_bounded=bounded, stopped=stopped, seconds=time.perf_counter() - start)
