"""The exact maximal error of a piecewise-linear network, by mixed-integer linear programming.

Every node of the merged network ``g = f - f_q`` becomes MILP variables: the input ranges over the
box, ``affine`` and ``add`` nodes are linear equalities, ``concat`` nodes reuse their inputs'
variables, and every ReLU ``y = max(x, 0)`` whose input bounds ``[l, u]`` straddle zero gets one
binary ``a`` and the big-M constraints

    y >= x,   y >= 0,   y <= x - l (1 - a),   y <= u a

(stable ReLUs need no binary: ``y = x`` when ``l >= 0``, ``y = 0`` when ``u <= 0``). A ``clip``
node is ``lo + relu(x - lo) - relu(x - hi)``: two such ReLUs of shifted inputs. The big-M
values ``l, u`` are the tightest sound bounds qbound has (CROWN intersected with interval bounds,
and for paired f and f_q tightened by differential bounds): the tighter they are, the fewer ReLUs
are unstable and the smaller the branch-and-bound tree. The differential bounds on ``z - z_q``
also enter as cuts: the LP relaxation relaxes f and f_q independently and cannot otherwise see
that they nearly cancel. For paired ReLUs ``y = relu(x)``, ``y_q = relu(x_q)`` with ``x - x_q`` in
``[tl, tu]``, the chords of ``min(t, 0) <= y - y_q <= max(t, 0)`` over that interval tie the two
outputs' difference to their inputs' (``PAIR_CUTS``; on the nets of ``benchmarks/bench_tight.py``
they sped HiGHS up by up to 2x on some nets and changed the others by about 10% either way). A ``round`` node (fake quantization of activations) is one integer
variable ``k`` with ``|x - k| <= 1/2`` (``floor`` and ``ceil`` alike), so activation-quantized
networks are solved exactly too.

Maximising ``s * g_j`` for every output ``j`` and sign ``s`` and taking the largest gives
``max_x |g(x)|_inf``. The solver is HiGHS (through :func:`scipy.optimize.milp`), an open solver.

Reference: Tjeng, Xiao, Tedrake, "Evaluating Robustness of Neural Networks with Mixed Integer
Programming", ICLR 2019 (the big-M formulation with bounds from a cheaper verifier).

What the result means: ``value`` is an error actually reached (``g`` at the solver's maximiser,
re-evaluated in float64), ``upper`` is the solver's proven (dual) bound plus :func:`tolerance`, so
the maximal error lies in ``[value, upper]`` even when the time limit stops the search. Unlike
qbound's CROWN bounds, whose float32 rounding is accounted for exactly (:mod:`qbound.bounds.fp`),
the solver's bound is proven only up to HiGHS's floating-point tolerances; the tolerance added
covers them with a wide margin on the nets qbound's tests check against brute-force grids.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.sparse

from qbound import attack
from qbound import graph as G
from qbound import validate
from qbound.bounds.common import as_graph
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds
from qbound.box import Box, validate_box
from qbound.errors import SoundnessError, UnsupportedLayerError
from qbound.merge import MergedNetwork, merge

SUPPORTED_KINDS = (G.INPUT, G.AFFINE, G.ADD, G.CONCAT, G.RELU, G.CLIP, G.ROUND)

# HiGHS's default tolerances (HiGHS options reference): an LP is solved when its primal and dual
# residuals are below 1e-7; a MIP solution is accepted with row and integrality violations below
# mip_feasibility_tolerance = 1e-6; branch and bound stops at mip_abs_gap = 1e-6 (the relative gap
# is set by ``MIP_REL_GAP``). The dual bound HiGHS reports is therefore proven only up to residuals
# of that size, measured on the problem at the scale of its variables.
HIGHS_FEASIBILITY_TOLERANCE = 1e-6
# A factor 10 over that tolerance: residuals of 1e-6 at the scale of the largest variable can move
# the objective (a sum of a few such variables with unit coefficients) by a few times 1e-6 * scale.
TOLERANCE_FACTOR = 10.0
MIP_REL_GAP = 1e-9
# Points evaluated before solving, for a first reached error (cheap: one float64 batch).
STARTS = 256
# Add the chord cuts between paired ReLUs (see the module docstring).
PAIR_CUTS = True


@dataclasses.dataclass(frozen=True)
class MilpResult:
  """The maximal error ``max_{x in box} |g(x)|_inf`` as found by the MILP solver.

  Attributes:
    value: an error actually reached: ``|g(maximizer)|_inf`` evaluated in float64.
    upper: a bound on the maximal error proven by the solver (its dual bound plus
      ``tolerance``); ``value <= max error <= upper``.
    maximizer: the input reaching ``value`` (inside the box).
    optimal: whether every sub-problem was solved to optimality within the time limit; then
      ``upper - value`` is at most about ``tolerance`` plus HiGHS's gap of 1e-6.
    seconds: wall-clock time, bound computation and solving included.
    per_output: for every output ``j`` (the output's shape), the largest ``|g_j|`` reached at any
      maximiser found (exact for the outputs that were solved, a lower bound for pruned ones).
    per_output_upper: for every output ``j``, a proven bound on ``max_x |g_j(x)|`` (the solver's
      bound, or the propagated one for sub-problems pruned or never started; ``nan`` for outputs
      not asked for).
    tolerance: the amount added to the solver's dual bounds (see :func:`tolerance`).
    solved: how many sub-problems ``max s * g_j`` the solver ran; ``pruned``: how many were
      skipped because their propagated bound could not beat the value already reached.
    binaries: the number of binary variables (one per unstable ReLU, two at most per clipped
      entry).
    integers: the number of integer variables: the binaries and one per rounded entry.
  """

  value: float
  upper: float
  maximizer: np.ndarray
  optimal: bool
  seconds: float
  per_output: np.ndarray
  per_output_upper: np.ndarray
  tolerance: float = 0.0
  solved: int = 0
  pruned: int = 0
  binaries: int = 0
  integers: int = 0

  @property
  def gap(self) -> float:
    """``upper - value``: the width of the proven interval around the maximal error."""
    return self.upper - self.value

  def __str__(self) -> str:
    state = "optimal" if self.optimal else "time limit"
    return (f"MilpResult(max error in [{self.value:.9g}, {self.upper:.9g}], {state}, "
            f"{self.binaries} binaries, {self.seconds:.2f} s)")


class Encoding(NamedTuple):
  """The MILP of a graph: ``row_lower <= A v <= row_upper``, ``var_lower <= v <= var_upper``.

  ``index[i]`` holds the variable index of every entry of node ``i`` (an int array of the node's
  shape); ``integrality[k]`` is 1 for integer variables (the binaries of unstable ReLUs, and the
  steps of rounding nodes); ``binaries`` counts the former.
  """

  matrix: scipy.sparse.csr_array
  row_lower: np.ndarray
  row_upper: np.ndarray
  var_lower: np.ndarray
  var_upper: np.ndarray
  integrality: np.ndarray
  index: list
  binaries: int = 0


def check_kinds(graph: G.Graph) -> None:
  """Raises :class:`~qbound.errors.UnsupportedLayerError` (a ``ValueError``) for a node the MILP
  cannot encode (only piecewise-linear ReLU nets)."""
  for idx, node in enumerate(graph.nodes):
    if node.kind not in SUPPORTED_KINDS:
      raise UnsupportedLayerError(f"the exact MILP encodes only {', '.join(SUPPORTED_KINDS)} nodes; node {idx} is "
                       f"{node.kind!r} ({node.where or 'no source'}). Use qbound.certify for an upper bound "
                       "on networks with other activations.")


def _matrices(graph: G.Graph) -> dict[int, np.ndarray]:
  """Every affine node's linear part as a dense float64 matrix ``(n_out, n_in)``.

  Applying the linear map to the identity basis in float64 reproduces float32 weights exactly and
  keeps divisions by constants accurate to 1e-16, so the MILP solves the real-arithmetic network.
  """
  out = {}
  with jax.enable_x64(True):
    graph64 = G.astype(graph, jnp.float64)
    for idx, node in enumerate(graph64.nodes):
      if node.kind != G.AFFINE:
        continue
      in_shape = graph64.nodes[node.inputs[0]].shape
      n_in = int(np.prod(in_shape, dtype=np.int64))
      basis = jnp.eye(n_in, dtype=jnp.float64).reshape((n_in, *in_shape))
      cols = np.asarray(jax.vmap(node.linear)(basis), np.float64).reshape(n_in, node.size)
      out[idx] = cols.T
  return out


def encode(graph: G.Graph, bounds, differences: Sequence[tuple] = ()) -> Encoding:
  """The big-M MILP of ``graph`` with every node's value a variable (Tjeng et al., ICLR 2019).

  Args:
    graph: a graph of input, affine, add, concat, relu, clip and round nodes.
    bounds: sound ``(lower, upper)`` of every node (e.g. from
      :func:`qbound.bounds.crown.crown_bounds`); node 0's bounds are the input box.
    differences: optional cuts ``(a, b, lower, upper)``: proven bounds on ``z_a - z_b`` for two
      nodes of the same shape (f's node and f_q's in a merged network). They hold at every
      integer-feasible point, so they change no solution, but they tighten the LP relaxation,
      which relaxes f and f_q independently and otherwise cannot see that they nearly cancel.

  Returns:
    The :class:`Encoding`.
  """
  check_kinds(graph)
  lows = [np.asarray(lo, np.float64) for lo, _ in bounds]
  highs = [np.asarray(hi, np.float64) for _, hi in bounds]
  mats = _matrices(graph)
  var_lower: list[np.ndarray] = []
  var_upper: list[np.ndarray] = []
  integrality: list[np.ndarray] = []
  rows: list[np.ndarray] = []
  cols: list[np.ndarray] = []
  vals: list[np.ndarray] = []
  row_lower: list[np.ndarray] = []
  row_upper: list[np.ndarray] = []
  count = [0, 0, 0]  # variables, rows, binaries

  def new_vars(lo, hi, integer=False):
    lo = np.ravel(lo)
    n = lo.size
    var_lower.append(lo)
    var_upper.append(np.ravel(hi))
    integrality.append(np.full(n, 1 if integer else 0, np.int8))
    start = count[0]
    count[0] += n
    return np.arange(start, start + n)

  def add_rows(row_ids, col_ids, coeffs, lo, hi):
    """Rows ``lo <= sum coeffs * v[col_ids] <= hi``; ``row_ids`` are local (0..m-1)."""
    rows.append(np.asarray(row_ids) + count[1])
    cols.append(np.asarray(col_ids))
    vals.append(np.asarray(coeffs, np.float64))
    lo = np.ravel(lo)
    row_lower.append(lo)
    row_upper.append(np.ravel(hi))
    count[1] += lo.size

  def relu_of_shift(xs, shift, l, u):
    """New variables ``r = max(x - shift, 0)`` for ``x`` in ``[l, u]`` (elementwise), big-M encoded.

    Stable entries need no binary: ``r = x - shift`` when ``l >= shift``, ``r = 0`` when ``u <= shift``.
    Unstable ones get a binary ``a`` and ``r >= z, r <= z - lz (1 - a), r <= uz a`` with
    ``z = x - shift`` in ``[lz, uz]`` (Tjeng et al. 2019, eq. 5).
    """
    lz, uz = l - shift, u - shift
    active, inactive = lz >= 0, uz <= 0
    unstable = ~(active | inactive)
    r = np.empty(xs.size, np.int64)
    alias = active & (shift == 0)  # r = x exactly: reuse x's variable rather than add an equality
    r[alias] = xs[alias]
    r[~alias] = new_vars(np.maximum(lz[~alias], 0), np.maximum(uz[~alias], 0))
    shifted = active & ~alias
    k = int(shifted.sum())
    if k:  # r - x = -shift
      rng = np.arange(k)
      add_rows(np.concatenate([rng, rng]), np.concatenate([r[shifted], xs[shifted]]),
               np.concatenate([np.ones(k), -np.ones(k)]), -shift[shifted], -shift[shifted])
    k = int(unstable.sum())
    if k:
      rs, x, c, lu, uu = r[unstable], xs[unstable], shift[unstable], lz[unstable], uz[unstable]
      a = new_vars(np.zeros(k), np.ones(k), integer=True)
      count[2] += k
      rng = np.arange(k)
      # r - x >= -c
      add_rows(np.concatenate([rng, rng]), np.concatenate([rs, x]),
               np.concatenate([np.ones(k), -np.ones(k)]), -c, np.full(k, np.inf))
      # r - x - lz a <= -c - lz   (r <= x - c - lz (1 - a))
      add_rows(np.concatenate([rng, rng, rng]), np.concatenate([rs, x, a]),
               np.concatenate([np.ones(k), -np.ones(k), -lu]), np.full(k, -np.inf), -c - lu)
      # r - uz a <= 0
      add_rows(np.concatenate([rng, rng]), np.concatenate([rs, a]),
               np.concatenate([np.ones(k), -uu]), np.full(k, -np.inf), np.zeros(k))
    return r

  index: list[np.ndarray] = []
  for idx, node in enumerate(graph.nodes):
    lo, hi = lows[idx].ravel(), highs[idx].ravel()
    if node.kind == G.INPUT:
      index.append(new_vars(lo, hi).reshape(node.shape))
    elif node.kind == G.AFFINE:
      # y - A x = b
      src = index[node.inputs[0]].ravel()
      y = new_vars(lo, hi)
      mat = mats[idx]
      r, c = np.nonzero(mat)
      bias = np.zeros(node.size) if node.bias is None else np.asarray(node.bias, np.float64).ravel()
      m = node.size
      add_rows(np.concatenate([np.arange(m), r]), np.concatenate([y, src[c]]),
               np.concatenate([np.ones(m), -mat[r, c]]), bias, bias)
      index.append(y.reshape(node.shape))
    elif node.kind == G.ADD:
      # y - sum_i s_i x_i = 0
      y = new_vars(lo, hi)
      m = node.size
      row_ids, col_ids, coeffs = [np.arange(m)], [y], [np.ones(m)]
      for sign, src in zip(node.attrs, node.inputs):
        row_ids.append(np.arange(m))
        # Broadcast like the graph's own evaluation does (a scalar added to a vector).
        col_ids.append(np.broadcast_to(index[src], node.shape).ravel())
        coeffs.append(np.full(m, -1.0 if sign > 0 else 1.0))
      add_rows(np.concatenate(row_ids), np.concatenate(col_ids), np.concatenate(coeffs), np.zeros(m), np.zeros(m))
      index.append(y.reshape(node.shape))
    elif node.kind == G.CONCAT:
      # The concatenation of the inputs' variables: no new variable or row is needed.
      index.append(np.concatenate([index[i] for i in node.inputs], axis=node.attrs[0]))
    elif node.kind == G.RELU:
      src = index[node.inputs[0]].ravel()
      l, u = lows[node.inputs[0]].ravel(), highs[node.inputs[0]].ravel()
      index.append(relu_of_shift(src, np.zeros(node.size), l, u).reshape(node.shape))
    elif node.kind == G.CLIP:
      # clip(x, lo, hi) = lo + relu(x - lo) - relu(x - hi) for lo <= hi: two ReLUs of shifted x. An
      # infinite end is replaced by a finite one beyond x's bounds, which changes nothing on them
      # and makes that ReLU stable (no binary).
      src = index[node.inputs[0]].ravel()
      l, u = lows[node.inputs[0]].ravel(), highs[node.inputs[0]].ravel()
      lo_c = np.broadcast_to(np.asarray(node.weights[0], np.float64), node.shape).ravel()
      hi_c = np.broadcast_to(np.asarray(node.weights[1], np.float64), node.shape).ravel()
      empty = lo_c > hi_c  # min(max(x, lo), hi) = hi whatever x is
      hi_f = np.where(np.isfinite(hi_c), hi_c, np.maximum(u, np.where(np.isfinite(lo_c), lo_c, u)) + 1)
      lo_f = np.where(np.isfinite(lo_c), lo_c, np.minimum(l, hi_f) - 1)
      lo_f = np.where(empty, hi_f, lo_f)
      r_lo = relu_of_shift(src, lo_f, l, u)
      r_hi = relu_of_shift(src, hi_f, l, u)
      y = new_vars(lo, hi)
      m = node.size
      rng = np.arange(m)
      # y - r_lo + r_hi = lo   (for empty clips lo = hi and r_lo = r_hi, so y = hi)
      add_rows(np.concatenate([rng, rng, rng]), np.concatenate([y, r_lo, r_hi]),
               np.concatenate([np.ones(m), -np.ones(m), np.ones(m)]), lo_f, lo_f)
      index.append(y.reshape(node.shape))
    elif node.kind == G.ROUND:
      # y = round(x) is an integer k with |x - k| <= 1/2 (floor: 0 <= x - k <= 1; ceil:
      # 0 <= k - x <= 1). The closed intervals admit both neighbours at a tie, so the MILP maximises
      # over the closure of each step: its bound stays valid, and the value re-evaluated at its
      # maximiser is what the network really computes there.
      if node.attrs[0] == "none":  # the identity merge puts beside a rounding of the other network
        index.append(index[node.inputs[0]])
        continue
      if node.attrs[0] not in ("nearest", "away", "floor", "ceil"):
        raise UnsupportedLayerError(f"the exact MILP encodes staircase roundings, not {node.attrs[0]!r} ones "
                                    "(a scale computed from the activation, at " + (node.where or "?") +
                                    "); use method='diff' or 'crown'")
      src = index[node.inputs[0]].ravel()
      l, u = lows[node.inputs[0]].ravel(), highs[node.inputs[0]].ravel()
      below, above = {"nearest": (0.5, 0.5), "away": (0.5, 0.5), "floor": (0.0, 1.0), "ceil": (1.0, 0.0)}[node.attrs[0]]
      # k in [x - above, x + below] for x in [l, u]
      k = new_vars(np.ceil(l - above), np.floor(u + below), integer=True)
      m = node.size
      rng = np.arange(m)
      # -below <= x - k <= above
      add_rows(np.concatenate([rng, rng]), np.concatenate([src, k]), np.concatenate([np.ones(m), -np.ones(m)]),
               np.full(m, -below), np.full(m, above))
      index.append(k.reshape(node.shape))
  known = {(a, b): (np.asarray(d_lo, np.float64).ravel(), np.asarray(d_hi, np.float64).ravel())
           for a, b, d_lo, d_hi in differences}
  for (a, b), (d_lo, d_hi) in known.items():
    ia, ib = index[a].ravel(), index[b].ravel()
    m = ia.size
    rng = np.arange(m)
    add_rows(np.concatenate([rng, rng]), np.concatenate([ia, ib]), np.concatenate([np.ones(m), -np.ones(m)]),
             d_lo, d_hi)
    na, nb = graph.nodes[a], graph.nodes[b]
    pre = (na.inputs[0], nb.inputs[0]) if na.kind == nb.kind == G.RELU else None
    if PAIR_CUTS and pre in known:
      # relu is monotone and 1-Lipschitz, so for t = x - x_q: min(t, 0) <= y - y_q <= max(t, 0). Over
      # t in [tl, tu] the chords of these two hinges are linear cuts tying y - y_q to x - x_q, which
      # the LP relaxation of two independent big-M encodings does not see.
      tl, tu = known[pre]
      xa, xb = index[pre[0]].ravel(), index[pre[1]].ravel()
      cols4 = np.concatenate([ia, ib, xa, xb])
      rows4 = np.concatenate([rng] * 4)
      span = np.where(tu > tl, tu - tl, 1.0)
      # upper: y - y_q <= s (t - tl) + max(tl, 0) with s the chord's slope of max(t, 0)
      up_s = np.where(tl >= 0, 1.0, np.where(tu <= 0, 0.0, tu / span))
      up_c = np.where(tl >= 0, 0.0, np.where(tu <= 0, 0.0, -up_s * tl))
      add_rows(rows4, cols4, np.concatenate([np.ones(m), -np.ones(m), -up_s, up_s]), np.full(m, -np.inf), up_c)
      # lower: y - y_q >= s (t - tu) + min(tu, 0) with s the chord's slope of min(t, 0)
      lo_s = np.where(tu <= 0, 1.0, np.where(tl >= 0, 0.0, -tl / span))
      lo_c = np.where(tu <= 0, 0.0, np.where(tl >= 0, 0.0, -lo_s * tu))
      add_rows(rows4, cols4, np.concatenate([np.ones(m), -np.ones(m), -lo_s, lo_s]), lo_c, np.full(m, np.inf))
  n_vars, n_rows, n_binaries = count
  if rows:
    matrix = scipy.sparse.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                    shape=(n_rows, n_vars))
  else:
    matrix = scipy.sparse.csr_array((0, n_vars))
  cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
  return Encoding(matrix, cat(row_lower, np.float64), cat(row_upper, np.float64), cat(var_lower, np.float64),
                  cat(var_upper, np.float64), cat(integrality, np.int8), index, n_binaries)


def tolerance(enc: Encoding) -> float:
  """The slack added to HiGHS's dual bounds: ``10 * 1e-6 * max(1, largest |variable bound|)``.

  HiGHS accepts residuals up to its feasibility tolerances (1e-6 for MIPs, see
  ``HIGHS_FEASIBILITY_TOLERANCE``) at the scale of the problem's variables; the objective is one
  variable of the problem, so its bound can be off by a few such residuals, and a factor 10 covers
  that. It is ~1e-5 on typical nets, far below the errors of 2-8 bit quantization, and tests check
  ``upper`` against dense grids.
  """
  finite = np.concatenate([np.abs(enc.var_lower), np.abs(enc.var_upper)])
  finite = finite[np.isfinite(finite)]
  scale = max(1.0, float(finite.max(initial=0.0)))
  return TOLERANCE_FACTOR * HIGHS_FEASIBILITY_TOLERANCE * scale


def _solve(enc: Encoding, var: int, sign: float, time_limit: float, cutoff: Optional[float] = None):
  """HiGHS on ``max sign * v[var]`` (subject to ``sign * v[var] >= cutoff`` if given).

  Returns ``(status, proven upper or None, solution or None)``; status 2 (infeasible) with a cutoff
  proves ``sign * v[var] <= cutoff``.
  """
  n = enc.var_lower.size
  c = np.zeros(n)
  c[var] = -sign  # milp minimises
  constraints = []
  if enc.matrix.shape[0]:
    constraints.append(scipy.optimize.LinearConstraint(enc.matrix, enc.row_lower, enc.row_upper))
  if cutoff is not None:
    # Only inputs that beat the error already reached are of interest: a cut that lets HiGHS
    # discard most of the branch-and-bound tree (it halves solve times on the nets tested).
    row = scipy.sparse.csr_array(([sign], ([0], [var])), shape=(1, n))
    constraints.append(scipy.optimize.LinearConstraint(row, cutoff, np.inf))
  res = scipy.optimize.milp(
      c, constraints=constraints, integrality=enc.integrality,
      bounds=scipy.optimize.Bounds(enc.var_lower, enc.var_upper),
      options=dict(time_limit=max(time_limit, 1e-3), mip_rel_gap=MIP_REL_GAP, presolve=True, disp=False))
  dual = getattr(res, "mip_dual_bound", None)
  if dual is None and res.status == 0:
    dual = res.fun  # a pure LP (no unstable ReLU): its optimum is its dual bound
  upper = None if dual is None or not np.isfinite(dual) else -float(dual)
  return res.status, upper, (None if res.x is None else np.asarray(res.x))


def _starts(box: Box, num: int) -> np.ndarray:
  """The centre, then ``num`` random vertices and uniform points of the box (fixed seed)."""
  rng = np.random.default_rng(0)
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  vertices = np.where(rng.integers(0, 2, (num // 2, *lo.shape)).astype(bool), hi, lo)
  uniform = lo + rng.uniform(size=(num - num // 2, *lo.shape)) * (hi - lo)
  return np.concatenate([((lo + hi) / 2)[None], vertices, uniform])


def _neighbours(x: np.ndarray, box: Box, num: int = 64) -> np.ndarray:
  """``x`` and points just beside it: steps of 1e-7 and 1e-5 of the box's width along each axis
  and in random diagonal directions (fixed seed)."""
  width = np.asarray(box.upper, np.float64) - np.asarray(box.lower, np.float64)
  flat = x.reshape(-1)
  n = flat.size
  rng = np.random.default_rng(0)
  directions = np.concatenate([np.eye(n), -np.eye(n), rng.choice([-1.0, 1.0], size=(num, n))])
  points = [flat[None]]
  for scale in (1e-7, 1e-5):
    points.append(flat + scale * directions * width.reshape(-1))
  return np.concatenate(points).reshape(-1, *x.shape)


def _as64(bounds) -> list:
  return [(np.asarray(lo, np.float64), np.asarray(hi, np.float64)) for lo, hi in bounds]


def _network_of(f, fq, box: Box) -> tuple[G.Graph, Optional[MergedNetwork]]:
  """The graph to maximise ``|.|_inf`` of, and the merged network when there is one."""
  if isinstance(f, MergedNetwork) and fq is None:
    return as_graph(f, box), f
  if fq is None:
    return as_graph(f, box), None
  if isinstance(f, MergedNetwork):
    raise ValueError("pass either a MergedNetwork (with fq=None) or two functions f and fq, not both.")
  merged = merge(f, fq, box)
  return merged.graph, merged


def _differential(merged: MergedNetwork, box: Box, bounds: list) -> tuple[list, list]:
  """Bounds tightened by differential bound propagation, and its difference cuts.

  For paired f and f_q, :func:`qbound.bounds.diff.diff_bounds` proves bounds on ``z - z_q`` for
  every pair of layers (and tighter ``z``, ``z_q`` through ``z = z_q + d``). As big-M values they
  stabilise more ReLUs; as cuts they give the LP relaxation the cancellation between f and f_q
  (proving that identical networks have zero error takes HiGHS seconds without them, and no
  branching with them).
  """
  z, zq, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True)
  as64 = lambda b: (np.asarray(b[0], np.float64), np.asarray(b[1], np.float64))
  meet = lambda a, b: (np.maximum(a[0], b[0]), np.minimum(a[1], b[1]))
  bounds = list(bounds)
  cuts = []
  for i in range(1, len(merged.f_graph.nodes)):
    j = i + merged.fq_offset
    bounds[i] = meet(bounds[i], as64(z[i]))
    bounds[j] = meet(bounds[j], as64(zq[i]))
    cuts.append((i, j, *as64(d[i])))
  out = merged.graph.output
  bounds[out] = meet(bounds[out], as64(d[merged.f_graph.output]))
  return bounds, cuts


def milp(f: Union[Callable, G.Graph, MergedNetwork], fq: Optional[Callable] = None, box: Optional[Box] = None, *,
         time_limit: float = 60.0, output: Optional[Union[int, Sequence[int]]] = None, bounds=None,
         prune: bool = True, differential: bool = True) -> MilpResult:
  """The exact maximal error ``max_{x in box} |f(x) - fq(x)|_inf`` of ReLU networks, by MILP.

  Encodes the merged network with the big-M formulation of Tjeng, Xiao, Tedrake (ICLR 2019), big-M
  values from CROWN (and differential bounds, whose difference cuts are added, when f and f_q have
  the same structure), and maximises ``s * g_j`` for every output ``j`` and sign ``s`` with HiGHS,
  most promising first. A sub-problem whose propagated bound cannot beat the error already reached
  is skipped, and the others only search inputs that beat it. The time limit is shared by all
  sub-problems; when it runs out, the solver's dual bound (or the propagated bound, for
  sub-problems never started) keeps ``[value, upper]`` a proven interval.

  Args:
    f: the original network (a pure JAX function of one unbatched input); or, with ``fq=None``, a
      :class:`~qbound.merge.MergedNetwork`, a :class:`~qbound.graph.Graph` or a function ``g``
      whose ``max |g(x)|_inf`` is wanted directly.
    fq: the compressed network, or None.
    box: the input set.
    time_limit: seconds for all solver calls together.
    output: a flat output index or a sequence of them to maximise over (default: all outputs).
    bounds: sound ``(lower, upper)`` bounds of every node of the graph, used as big-M values
      (default: :func:`~qbound.bounds.crown.crown_bounds` in sound mode, tightened by
      differential bounds, see ``differential``). Wrong bounds give wrong results: pass only
      proven ones.
    prune: skip sub-problems that cannot beat the value already reached. With ``prune=False``
      every output is solved, so ``per_output`` is exact for all of them.
    differential: for f and f_q of the same structure (and ``bounds=None``), tighten the big-M
      values with differential bounds and add their difference cuts (see :func:`_differential`).

  Returns:
    A :class:`MilpResult` with ``value <= max error <= upper``.

  Raises:
    TypeError: an argument of the wrong kind (``prune='no'``, ``output=1.5``, ``time_limit='60'``).
    ValueError: an invalid box, a NaN or negative ``time_limit``, a network with other
      operations than affine maps, additions, concatenations, ReLUs, clips and roundings, or an
      output index out of range.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> from qbound.exact import milp
    >>> f = lambda x: jax.nn.relu(x)
    >>> fq = lambda x: jax.nn.relu(x - 0.25)         # the error relu(x) - relu(x - 0.25) peaks at 0.25
    >>> res = milp(f, fq, qb.Box(-jnp.ones(1), jnp.ones(1)))
    >>> round(res.value, 6), res.optimal, res.value <= res.upper < res.value + 1e-4
    (0.25, True, True)
  """
  start = time.perf_counter()
  if box is None:
    raise ValueError("milp needs the input box: milp(f, fq, box) or milp(merged, box=box).")
  # Every argument is checked before tracing or solving anything (qbound.validate).
  validate.function("f", f)
  if fq is not None:
    validate.function("fq", fq)
  # 0 is allowed: no solver call, the interval comes from the sampled starts and propagated bounds.
  time_limit = validate.number("time_limit", time_limit, minimum=0.0, allow_inf=True,
                               accepted="a number of seconds >= 0 (math.inf for no limit)")
  if output is not None:
    validate.output_indices("output", output)
  prune = validate.boolean("prune", prune)
  differential = validate.boolean("differential", differential)
  if bounds is not None and (isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence)):
    raise TypeError(f"bounds must be None or a list of (lower, upper) pairs, one per node of the graph; got "
                    f"{type(bounds).__name__}.")
  box = validate_box(box)
  graph, merged = _network_of(f, fq, box)
  check_kinds(graph)
  cuts: list = []
  if bounds is None:
    bounds = _as64(crown_bounds(graph, box, None, True))
    if differential and merged is not None and merged.paired:
      bounds, cuts = _differential(merged, box, bounds)
  if len(bounds) != len(graph.nodes):
    raise ValueError(f"bounds must hold (lower, upper) for each of the graph's {len(graph.nodes)} nodes; "
                     f"got {len(bounds)}.")
  bounds = _as64(bounds)
  # Node 0 is the box itself (CROWN returns it unchanged; this also covers user-given bounds).
  bounds[0] = (np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64))

  out_shape = graph.output_shape
  n_out = graph.nodes[graph.output].size
  targets = list(range(n_out)) if output is None else [int(j) for j in np.atleast_1d(output)]
  if not targets or any(not 0 <= j < n_out for j in targets):
    raise ValueError(f"output must index the {n_out} outputs of the network (flat indices 0..{n_out - 1}); "
                     f"got {output!r}.")

  enc = encode(graph, bounds, cuts)
  # With roundings g jumps at steps, and the solver's maximiser may sit on a step, where the
  # network takes the other side's value: look at points just beside it too.
  steps = any(n.kind == G.ROUND and n.attrs[0] != "none" for n in graph.nodes)
  tol = tolerance(enc)
  out_vars = enc.index[graph.output].ravel()
  out_lo, out_hi = bounds[graph.output][0].ravel(), bounds[graph.output][1].ravel()

  lower_np, upper_np = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)

  def measure(xs):
    """Box-clipped points (a batch) and their float64 errors ``|g_j(x)|``, zero off the targets."""
    xs = np.clip(np.asarray(xs, np.float64).reshape(-1, *box.shape), lower_np, upper_np)
    return xs, np.where(mask, np.abs(attack.exact_errors(graph, xs).reshape(xs.shape[0], n_out)), 0.0)

  mask = np.zeros(n_out, bool)
  mask[targets] = True
  # A reached error before any solve: prunes sub-problems and gives the first solve a cutoff.
  xs, errs = measure(_starts(box, STARTS))
  per_output = errs.max(axis=0)
  k = int(np.argmax(errs.max(axis=1)))
  best, best_x = float(errs[k].max()), xs[k]
  per_upper = np.full(n_out, np.nan)

  # Most promising sub-problem first: a large value early prunes the rest.
  subproblems = [(j, s, float(out_hi[j] if s > 0 else -out_lo[j])) for j in targets for s in (1.0, -1.0)]
  subproblems.sort(key=lambda t: -t[2])
  optimal, solved, pruned = True, 0, 0
  for j, s, proven in subproblems:
    bound = proven
    remaining = time_limit - (time.perf_counter() - start)
    if prune and proven <= best:
      pruned += 1
    elif remaining <= 0:
      optimal = False
    else:
      solved += 1
      cutoff = best if prune and best > 0 else None
      status, dual, sol = _solve(enc, int(out_vars[j]), s, remaining, cutoff)
      if status == 2 and cutoff is not None:
        bound = min(bound, cutoff + tol)  # nothing in the box beats the value already reached
      elif status in (2, 3):  # infeasible / unbounded: impossible for a box, so numerical trouble
        optimal = False
        warnings.warn(f"HiGHS reported status {status} on output {j}; using the propagated bound for it.")
      else:
        optimal = optimal and status == 0
        if dual is not None:
          # With a cutoff the solver only searched where s * g_j >= cutoff.
          bound = min(bound, max(dual, cutoff or -np.inf) + tol)
      if sol is not None:
        point = sol[enc.index[0].ravel()].reshape(box.shape)
        xs, errs = measure(_neighbours(point, box) if steps else point[None])
        per_output = np.maximum(per_output, errs.max(axis=0))
        k = int(np.argmax(errs.max(axis=1)))
        if errs[k].max() > best:
          best, best_x = float(errs[k].max()), xs[k]
    per_upper[j] = bound if math.isnan(per_upper[j]) else max(per_upper[j], bound)

  proven = float(np.nanmax(per_upper))
  if best > proven:
    # A value the network really takes (float64) above the solver's bound plus its tolerance: the
    # encoding or the propagated bounds it was given are wrong. Never hide that behind max().
    raise SoundnessError(f"MILP: the error {best!r} reached at x = {np.asarray(best_x).reshape(-1).tolist()} "
                         f"exceeds the solver's proven bound {proven!r}: a bug in qbound (or bounds= given that "
                         "are not sound); please report it with this network and box.")
  upper = max(proven, 0.0)
  return MilpResult(value=best, upper=upper, maximizer=best_x, optimal=optimal,
                    seconds=time.perf_counter() - start, per_output=per_output.reshape(out_shape),
                    per_output_upper=per_upper.reshape(out_shape), tolerance=tol, solved=solved, pruned=pruned,
                    binaries=enc.binaries, integers=int(enc.integrality.sum()))
