"""Branch and bound in NumPy on small paired ReLU chains: a first call that compiles nothing.

:mod:`qbound.bounds.bab` bounds its pieces with jit-compiled steps: about 80 XLA programs, 5-12 CPU
seconds on a first call (docs/results/exactness.md), where a warm call on a small net closes the gap in well
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
  cannot tell active from inactive (from the third dense layer on), and for the outputs;
* each piece's bounds met with its parent's, neuron by neuron (``z_q = z - d`` tightens the third
  of any two).

Where f_q alone rounds its activations with a static scale, or clips them (a fake quantization
behind a dense layer: ``clip(round(h / s), lo, hi) * s``, as qwix's and AQT's static activation
quantization and :func:`qbound.quantize.fake_quant` compute it), the chain has a layer for that step:
``z_q' = z_q + e`` with ``e`` bounded per piece (within half a step, and by where the piece's bounds
put the rounding and the clip), so ``d' = d - e``; where a piece's bounds pin the step to one value
``c``, ``z_q' = c`` and ``d' = z - c`` exactly. Where f_q rounds the input itself (entry by
entry), a split along such an input falls on the rounding's tie nearest the midpoint and is a case
split (:func:`~qbound.bounds.host_chain.aligned_splits`: each half holds the inputs that round to
its side's value, and the halves overlap where float arithmetic may round either way), so pieces
inside one step of every input have f_q constant. Scales computed from the input (qwix's and AQT's dynamic activation
quantization, :mod:`qbound.dynamic_rounding`; also of the input) are a ``dynamic`` layer: the same
``z_q' = z_q + e``, ``e`` within the band that each group's largest magnitude over the piece
allows, or pinned to one step's values where the piece keeps the quotient on one step. Where that
layer rounds the input, a small piece that straddles one of its ties is also split on the
rounding's value, two cases on the same box (:mod:`qbound.bounds.host_ties`).

On a piece where every ReLU of f and f_q is stable (and every rounding pinned) the bounds are the
networks' own affine pieces, so they become exact as pieces shrink. The pieces with the largest bounds are split first: in half
along the input whose interval-gradient smear is largest (ReluVal's, as :mod:`qbound.bounds.bab`'s
``split_rule="gradient"``; with ``CANDIDATES > 1``, :mod:`qbound.bounds.bab`'s strong branching).
Every new piece's centre and the corner its bound points to are evaluated, a few steps of
sign-gradient ascent run from the best of them, and linear programs over linear regions
(:mod:`qbound.bounds.region_ascent`) climb from the round's best point to a local maximum, so the
reached error rises too; where f_q rounds, runs of a derivative-free search
(:mod:`qbound.bounds.host_staircase`) take a share of the time (``STAIRCASE_SHARE``, less while
they raise nothing and the bound falls, more while the bound stalls). Open pieces are
kept in a :class:`~qbound.bounds.host_pool.PiecePool`.

The bounds (:mod:`qbound.bounds.host_bounds`) are computed in float64 with every rounding covered
by a relative slack, and hold for the real-arithmetic networks. An input normalisation the two
networks share (``.nnet`` files' clip, shift and divide) is applied to the box once, rounded
outward (:func:`map_box`), and the search runs on its image; witnesses are mapped back into the box.

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
from typing import Callable, Optional, Sequence

import numpy as np

from qbound.bounds import host_chain, host_ties
from qbound.bounds.host_bounds import Chain, bound_pieces, error_bound, evaluate
from qbound.bounds.host_halves import bound_in_halves
from qbound.bounds.host_chain import _unmap, aligned_splits, chain_of, input_grid_cells, input_rounding, map_box
from qbound.bounds.host_pool import PiecePool
from qbound.bounds.host_steps import ROUNDINGS, step_values
from qbound.bounds.host_staircase import staircase_search
from qbound.bounds.region_ascent import region_ascent

# The search, and re-exported what a caller of it reads chains and bounds with.
__all__ = ["HostBabResult", "host_branch_and_bound", "Chain", "chain_of", "map_box", "input_grid_cells", "bound_pieces",
           "evaluate"]

# Pieces split per round, each into two halves along CANDIDATES input dimensions (strong branching
# when more than one); 8 steps of sign-gradient ascent from the ASCENT best new points (and the best
# so far) per round. One candidate: strong branching's second candidate saved about 5% of the pieces
# kept for twice the pieces bounded (on the exactness table's nets 3,769 against 7,193 pieces
# bounded to the gap on 5-12-8-8-2, 34,385 against 61,225 on 5-12-16-16-2; docs/results/exactness.md).
BATCH = 128
# Once more than BROAD_FRONTIER x BATCH pieces are open, a round splits a BROAD_FRONTIER-th of them,
# up to MAX_BATCH: the frontier is broad, and larger batches spend less of the time in Python per
# piece. The qwix nnx rms,3 MLP, 10 s: 1.641 -> 1.595 (84,479 -> 102,499 pieces); AQT's static po2
# MLP: 1.627 -> 1.594; the exactness table's nets, whose frontiers stay narrow, the same pieces to
# the gap (benchmarks/bench_host_search.py).
MAX_BATCH = 512
BROAD_FRONTIER = 16
CANDIDATES = 1
ASCENT = 8
# Linear programs over linear regions (qbound.bounds.region_ascent) from the round's best new point,
# at most REGION_PROGRAMS per round and REGION_SHARE of the time so far.
REGION_PROGRAMS = 12
REGION_SHARE = 0.15
# Open pieces kept at most (``stopped == "max_pieces"`` past it; each keeps 6 float64 bounds per
# neuron, 1.4 kB on a 5-12-8-8-2 pair).
MAX_PIECES = 200_000
# Where f_q rounds (a staircase), runs of the derivative-free search (qbound.bounds.host_staircase)
# take this share of the time (but see STALE_RUNS below): one before the first split, then one
# whenever they are below it.
STAIRCASE_SHARE = 0.2
# The share moves to whichever side still moves: STALE_SHARE once STALE_RUNS runs in a row raised
# nothing (the bound then gets the time), STALLED_SHARE once the upper bound has not fallen by 0.1%
# for STALLED_SECONDS (the search's turn). The search alone, 10 s: qwix nnx rms,3 1.645 -> 1.545
# (the bound), linen qwix dynamic int8 1.38 -> 1.356 and AQT dynamic 1.40 -> 1.339 (the reached
# error), the other dynamic rows the same; AQT static po2 1.59 -> 1.64 (a later run had reached
# 0.0756 where these reach 0.0716); with 6 or 10 runs before the share falls, within 0.04 of that.
STALE_RUNS = 3
# A run counts as raising the error reached only by more than this fraction of it: runs converging
# on the same tie creep up by ~1e-7 relative, which kept qwix's minmax nnx MLP at the full share.
STALE_GAIN = 1e-4
STALE_SHARE = 0.05
STALLED_SECONDS = 2.0
STALLED_SHARE = 0.5
# Where f_q rounds its input, pieces are split on the rounding's ties, a case on each side
# (host_chain.aligned_splits): at midpoints, a piece across a tie keeps the rounding's band, and the
# bound stalls (benchmarks/bench_input_grid.py: a 2-8-8-1 pair rounding its input to thirds and its
# hidden layer to eighths, 1.77x the error after 10 s and 30 s, against the gap of 2% in 93 pieces
# with them; AQT's 4-16-16-2 MLP on [-1, 1]^4, 1.82x after 10 s and 1.79x after 30 s, against 1.62x
# and 1.46x; qwix's nnx rms,3 static MLP, 1.04x after 10 s, against the gap in 773 pieces).
ALIGNED_SPLITS = True


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


def _ascent(chain: Chain, xs, box_lo, box_hi, outputs, steps: int, first_step: float):
  """Projected sign-gradient ascent on ``max_j |f_j - f_q,j|`` from each row of ``xs`` (exact
  gradients where the networks are linear around the point; through f_q's roundings the
  straight-through gradient, as quantization-aware training takes it). Returns the points visited."""
  visited = [xs]
  step = first_step * (box_hi - box_lo)
  for _ in range(steps):
    z = zq = xs
    masks = {}
    for j, layer in enumerate(chain.layers):
      if layer[0] == "relu":
        masks[j] = (z > 0, zq > 0)
        z, zq = np.maximum(z, 0.0), np.maximum(zq, 0.0)
      elif layer[0] in ROUNDINGS:
        zq = step_values(layer, zq)
      elif layer[0] == "clip":
        masks[j] = (np.ones_like(zq, bool), (zq > layer[1]) & (zq < layer[2]))
        zq = step_values(layer, zq)
      else:
        z, zq = z @ layer[1].T + layer[2], zq @ layer[3].T + layer[4]
    d = (z - zq)[:, outputs]
    j = outputs[np.argmax(np.abs(d), axis=1)]
    sign = np.sign(d[np.arange(len(xs)), np.argmax(np.abs(d), axis=1)])
    grads = []
    for which in (1, 3):
      g = None
      for i in range(len(chain.layers) - 1, -1, -1):
        layer = chain.layers[i]
        if i in masks:
          g = g * masks[i][0 if which == 1 else 1]
        elif layer[0] == "affine":
          g = layer[which][j] if g is None else g @ layer[which]
      grads.append(g)
    grad = sign[:, None] * (grads[0] - grads[1])
    xs = np.clip(xs + step * np.sign(grad), box_lo, box_hi)
    visited.append(xs)
    step = step * 0.7
  return np.concatenate(visited)


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
      elif layer[0] in ROUNDINGS:
        pass  # the straight-through derivative of f_q's rounding (a split heuristic, not a bound)
      elif layer[0] == "clip":
        if which == 3:  # f_q's clip: a derivative in [0, 1]
          g_lo, g_hi = np.minimum(g_lo, 0.0), np.maximum(g_hi, 0.0)
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
                          report: Optional[Callable] = None, chain: Optional[Chain] = None,
                          report_root: Optional[Callable] = None,
                          report_candidates: Optional[Callable] = None) -> HostBabResult:
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
    report_root: called as ``report_root(diff_lower, diff_upper)`` with the whole box's proven
      bounds on every output of ``f - f_q``, once, before any split.
    report_candidates: where f_q rounds, called with each run of the staircase search's best inputs
      (``(16, n_in)``, largest error first): a rounding tie may fall apart in another evaluation of
      the networks (see :mod:`qbound.bounds.host_staircase`), so a caller that evaluates witnesses
      its own way can take the best of several.

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
                   report, chain, report_root, report_candidates)


def _search(merged, box, outputs, time_budget, target_gap, epsilon, initial_lower, initial_witness, stop, report,
            chain, report_root=None, report_candidates=None) -> HostBabResult:
  start = time.perf_counter()
  chain = chain_of(merged) if chain is None else chain
  if chain is None:
    raise ValueError(f"host_branch_and_bound needs a paired chain of affine layers and ReLUs with at most "
                     f"{host_chain.MAX_NEURONS} ReLUs and {host_chain.MAX_INPUTS} inputs; use qbound.bounds.branch_and_bound instead.")
  outputs = np.arange(chain.n_out) if outputs is None else np.asarray(outputs, np.int64).reshape(-1)
  if outputs.size == 0 or outputs.min() < 0 or outputs.max() >= chain.n_out:
    raise ValueError(f"outputs must be flat indices in [0, {chain.n_out}), got {outputs.tolist()}.")
  n = chain.n_in
  # The search runs on the box's image under the shared input normalisation (chain.prefix), its
  # witnesses mapped back into the box for its caller.
  x_lo = np.asarray(box.lower, np.float64).reshape(1, n)
  x_hi = np.asarray(box.upper, np.float64).reshape(1, n)
  box_lo, box_hi = map_box(chain, x_lo, x_hi)
  x_chain, chain = chain, dataclasses.replace(chain, prefix=())
  lower = float(initial_lower)
  if initial_witness is None:
    witness = ((box_lo + box_hi) / 2)[0]
  else:
    witness = np.clip(map_box(x_chain, *[np.asarray(initial_witness, np.float64).reshape(1, n)] * 2)[0][0],
                      box_lo[0], box_hi[0])
  to_input = lambda y: _unmap(x_chain, y, x_lo[0], x_hi[0])  # noqa: E731

  region_time, seen = [0.0], set()
  # Linear regions are ReLU patterns (region_ascent); f_q's roundings and clips split them further.
  linear_regions = all(layer[0] in ("affine", "relu") for layer in chain.layers)
  staircase = any(layer[0] in ROUNDINGS for layer in chain.layers)
  rounding = input_rounding(chain)
  grid = rounding if ALIGNED_SPLITS else None
  parallel = rounding is None  # (see host_halves.PARALLEL_FROM)
  stair_time, stair_runs = [0.0], [0]
  stale_runs = [0]  # staircase runs since one last raised the error reached
  moved = [np.inf, 0.0]  # the upper bound when it last fell by more than 0.1%, and the time since start

  def staircase_share(now: float, upper: float) -> float:
    """The search's share of the time: more of it while the bound stalls, less while the bound falls
    and the search's runs no longer raise the error reached."""
    if upper < 0.999 * moved[0]:
      moved[:] = [upper, now]
    if now - moved[1] >= STALLED_SECONDS:
      return STALLED_SHARE
    return STALE_SHARE if stale_runs[0] >= STALE_RUNS else STAIRCASE_SHARE

  def staircase_run():
    """One run of the derivative-free search (f_q rounds: gradient steps stop on its treads)."""
    nonlocal lower, witness
    t = time.perf_counter()
    values, xs = staircase_search(chain, box_lo[0], box_hi[0], outputs, np.random.default_rng(stair_runs[0]))
    stair_runs[0] += 1
    stair_time[0] += time.perf_counter() - t
    # (A raise below STALE_GAIN is none.)
    stale_runs[0] = 0 if values[0] > lower * (1 + STALE_GAIN) else stale_runs[0] + 1
    if values[0] > lower:
      lower, witness = float(values[0]), xs[0]
    if report_candidates is not None:
      report_candidates(to_input(xs))

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
    if REGION_PROGRAMS and linear_regions and region_time[0] <= REGION_SHARE * (time.perf_counter() - start):
      t = time.perf_counter()
      y, value = region_ascent(chain, xs[best], box_lo[0], box_hi[0], outputs, REGION_PROGRAMS, seen)
      region_time[0] += time.perf_counter() - t
      if value > errs[best]:
        errs[best], xs[best] = value, y
    if errs[best] > lower:
      lower, witness = float(errs[best]), xs[best]

  # Where f_q rounds its input, each piece's case: the lowest and highest rounded value of every input.
  # Where f_q's first layer rounds the input with a scale computed from it, each piece's tie case:
  # bounds on that rounding's values (host_ties).
  ties = host_ties.tie_layer(chain) if grid is None else None
  cases = None if grid is None and ties is None else (np.full_like(box_lo, -np.inf), np.full_like(box_hi, np.inf))
  dl, du, ld, ud, kept = bound_pieces(chain, box_lo, box_hi, values=cases)
  root_lower, root_upper = dl[0].copy(), du[0].copy()
  if report_root is not None:
    report_root(root_lower, root_upper)
  probe(box_lo, box_hi, (dl, du), ld, ud)
  if staircase:
    staircase_run()
  bounded = 1
  # Open pieces (bound above the target) in a pool; the others are folded into closed_*.
  fields = dict(lo=box_lo, hi=box_hi, dl=dl, du=du, kept=kept)
  if cases is not None:
    fields.update(vlo=cases[0], vhi=cases[1])
  pool = PiecePool(fields, error_bound(dl, du, outputs))
  piece = pool.fields  # (the pool may grow: read its arrays through this dict)
  closed_lower = np.full(chain.n_out, np.inf)
  closed_upper = np.full(chain.n_out, -np.inf)
  closed_bound = -np.inf
  stopped = "time"
  while True:
    target = (1 + target_gap) * lower
    done = np.flatnonzero(pool.open[:pool.used] & (pool.bound[:pool.used] <= target))
    if len(done):
      closed_lower = np.minimum(closed_lower, piece["dl"][done].min(axis=0))
      closed_upper = np.maximum(closed_upper, piece["du"][done].max(axis=0))
      closed_bound = max(closed_bound, float(pool.bound[done].max()))
      pool.remove(done)
    upper = max(closed_bound, float(pool.bound[:pool.used].max(initial=-np.inf)), lower)
    if report is not None:
      report(upper, lower, to_input(witness))
    if not pool.count:
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
    if pool.count > MAX_PIECES:
      stopped = "max_pieces"
      break
    if staircase:
      now = time.perf_counter() - start
      if stair_time[0] <= staircase_share(now, upper) * now:
        staircase_run()
    # The worst pieces; each is split in half along the candidate dimension whose halves gain most.
    m = min(max(BATCH, min(pool.count // BROAD_FRONTIER, MAX_BATCH)), pool.count)
    take = np.argpartition(-pool.bound[:pool.used], m - 1)[:m]
    p_lo, p_hi, p_dl, p_du, p_kept = (piece[name][take] for name in ("lo", "hi", "dl", "du", "kept"))
    mid = (p_lo + p_hi) / 2
    # ReluVal's smear with an interval gradient (as bab.py's split rule "gradient").
    smear = _gradient_weight(chain, p_kept, p_dl, p_du, outputs)
    weight = smear * (p_hi - p_lo)
    cands = min(CANDIDATES, n)
    axes = np.argsort(-weight, axis=1)[:, :cands]  # (m, c)
    rows = np.arange(m)[:, None]
    c_lo = np.repeat(p_lo[:, None], 2 * cands, axis=1)  # (m, 2c, n): candidate i's lower half, then upper half
    c_hi = np.repeat(p_hi[:, None], 2 * cands, axis=1)
    c_hi[rows, np.arange(cands)[None], axes] = mid[rows, axes]
    c_lo[rows, cands + np.arange(cands)[None], axes] = mid[rows, axes]
    c_cases = None
    if cases is not None:
      p_vlo, p_vhi = piece["vlo"][take], piece["vhi"][take]
    if ties is not None:  # the halves keep their parent's tie case
      c_cases = (np.repeat(p_vlo, 2 * cands, axis=0), np.repeat(p_vhi, 2 * cands, axis=0))
    if grid is not None:  # f_q rounds its input: split on its ties, a case on each side
      c_vlo, c_vhi = np.empty_like(c_lo), np.empty_like(c_hi)
      for c in range(cands):
        ax = axes[:, c]
        cut = aligned_splits(grid, p_lo, p_hi, ax, mid[np.arange(m), ax])
        for half, parts in zip((c, cands + c), cut.halves(p_lo, p_hi, p_vlo, p_vhi, ax)):
          c_lo[:, half], c_hi[:, half], c_vlo[:, half], c_vhi[:, half] = parts
      c_cases = (c_vlo.reshape(-1, n), c_vhi.reshape(-1, n))
    c_lo, c_hi = c_lo.reshape(-1, n), c_hi.reshape(-1, n)
    reps = 2 * cands
    cdl, cdu, cld, cud, ckept = bound_in_halves(chain, c_lo, c_hi, np.repeat(p_kept, reps, axis=0), c_cases,
                                                parallel=parallel)
    bounded += len(c_lo)
    probe(c_lo, c_hi, (cdl, cdu), cld, cud)
    # Meet with the parent's bounds (the children lie inside it).
    cdl = np.maximum(cdl, np.repeat(p_dl, reps, axis=0))
    cdu = np.minimum(cdu, np.repeat(p_du, reps, axis=0))
    child_bound = error_bound(cdl, cdu, outputs)
    child = child_bound.reshape(m, 2, cands)
    # Ranked by the product of both halves' gains, as bab.py's strong branching: the worse half
    # alone keeps slicing one narrow dimension.
    gain = np.maximum(pool.bound[take][:, None, None] - child, 0.0)
    score = -(gain[:, 0] * gain[:, 1]) - 1e-9 * (gain[:, 0] + gain[:, 1])
    best = np.argmin(score, axis=1)
    halves = []
    for half in (0, 1):
      pick = np.arange(m) * reps + half * cands + best
      rows_new = dict(lo=c_lo[pick], hi=c_hi[pick], dl=cdl[pick], du=cdu[pick], kept=ckept[pick])
      if c_cases is not None:
        rows_new.update(vlo=c_cases[0][pick], vhi=c_cases[1][pick])
      halves.append((rows_new, child_bound[pick]))
    if ties is not None:  # a split on a tie instead, where its two cases gain more
      bounded += host_ties.split_round(chain, ties, outputs, pool.bound[take], p_lo, p_hi, p_vlo, p_vhi, p_dl, p_du,
                                       p_kept, smear, score[np.arange(m), best], halves, parallel)
    for half, (rows_new, bound) in enumerate(halves):  # the lower halves take their parents' slots
      if half == 0:
        pool.put(take, rows_new, bound)
      else:
        pool.add(rows_new, bound)
  slots = pool.open_slots()
  diff_lower = np.minimum(closed_lower, piece["dl"][slots].min(axis=0, initial=np.inf))
  diff_upper = np.maximum(closed_upper, piece["du"][slots].max(axis=0, initial=-np.inf))
  upper = max(closed_bound, float(pool.bound[slots].max(initial=-np.inf)))
  witness = to_input(witness)
  if x_chain.prefix:  # the error at the witness itself (the normalisation's float64 rounding aside, the same)
    lower = float(np.abs(evaluate(x_chain, witness[None]))[0, outputs].max())
  return HostBabResult(upper=max(upper, 0.0), lower=lower, witness=witness, diff_lower=diff_lower,
                       diff_upper=diff_upper, root_lower=root_lower, root_upper=root_upper,
                       pieces_bounded=bounded, stopped=stopped, seconds=time.perf_counter() - start)
