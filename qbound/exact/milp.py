"""The exact maximal error of a piecewise-linear network, by mixed-integer linear programming.

The merged network ``g = f - f_q`` is encoded as a big-M MILP (:mod:`qbound.exact.encoding`: one
binary per unstable ReLU, one integer per rounded entry) with big-M values from qbound's tightest
sound bounds (CROWN intersected with interval bounds, and for paired f and f_q tightened by
differential bounds, which also enter as cuts between paired nodes).

Maximising ``s * g_j`` for every output ``j`` and sign ``s`` and taking the largest gives
``max_x |g(x)|_inf``. The solver is HiGHS (through :func:`scipy.optimize.milp`), an open solver.

Reference: Tjeng, Xiao, Tedrake, "Evaluating Robustness of Neural Networks with Mixed Integer
Programming", ICLR 2019 (the big-M formulation with bounds from a cheaper verifier).

What the result means: ``value`` is an error actually reached (``g`` at the solver's maximiser,
re-evaluated in float64), ``upper`` is the solver's proven (dual) bound plus :func:`~qbound.exact.encoding.tolerance`, so
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
from typing import Callable, Optional, Sequence, Union

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
from qbound.errors import SoundnessError
from qbound.exact.encoding import Encoding, check_kinds, encode, tolerance
from qbound.merge import MergedNetwork, merge

MIP_REL_GAP = 1e-9
# Points evaluated before solving, for a first reached error (cheap: one float64 batch).
STARTS = 256


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
    tolerance: the amount added to the solver's dual bounds (see :func:`~qbound.exact.encoding.tolerance`).
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
