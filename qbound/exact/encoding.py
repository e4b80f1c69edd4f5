"""The big-M MILP encoding of a piecewise-linear graph (Tjeng, Xiao, Tedrake, ICLR 2019).

Every node of the merged network ``g = f - f_q`` becomes MILP variables: the input ranges over the
box, ``affine`` and ``add`` nodes are linear equalities, ``concat`` nodes reuse their inputs'
variables, and every ReLU ``y = max(x, 0)`` whose input bounds ``[l, u]`` straddle zero gets one
binary ``a`` and the big-M constraints

    y >= x,   y >= 0,   y <= x - l (1 - a),   y <= u a

(stable ReLUs need no binary: ``y = x`` when ``l >= 0``, ``y = 0`` when ``u <= 0``). A ``clip``
node is ``lo + relu(x - lo) - relu(x - hi)``: two such ReLUs of shifted inputs. The big-M
values ``l, u`` are the tightest sound bounds the caller has: the tighter they are, the fewer ReLUs
are unstable and the smaller the solver's tree. Differences ``z - z_q`` of paired nodes with known
bounds enter as cuts: the LP relaxation relaxes f and f_q independently and cannot otherwise see
that they nearly cancel. For paired ReLUs ``y = relu(x)``, ``y_q = relu(x_q)`` with ``x - x_q`` in
``[tl, tu]``, the chords of ``min(t, 0) <= y - y_q <= max(t, 0)`` over that interval tie the two
outputs' difference to their inputs' (``PAIR_CUTS``; on the nets of ``benchmarks/bench_tight.py``
they sped HiGHS up by up to 2x on some nets and changed the others by about 10% either way). A
``round`` node (fake quantization of activations) is one integer variable ``k`` with
``|x - k| <= 1/2`` (``floor`` and ``ceil`` alike), so activation-quantized networks are encoded
exactly too.

The solver's dual bound is proven only up to its floating-point tolerances; :func:`tolerance` is
the slack :func:`qbound.exact.milp` adds for them.

Reference: Tjeng, Xiao, Tedrake, "Evaluating Robustness of Neural Networks with Mixed Integer
Programming", ICLR 2019 (the big-M formulation with bounds from a cheaper verifier).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

from qbound import graph as G
from qbound.errors import UnsupportedLayerError

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

# Add the chord cuts between paired ReLUs (see the module docstring).
PAIR_CUTS = True



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
