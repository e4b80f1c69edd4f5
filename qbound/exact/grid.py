"""The maximal error cell by cell, where f_q rounds its input first (static input quantization).

When every path from the input through f_q passes a staircase rounding of an entrywise affine
function of the input (``round(clip(x / s))``: AQT and qwix with static activation scales, qbound's
own fake quantization), f_q is constant on each cell of the grid those roundings draw on the input
box: a product of intervals, one per input entry, between consecutive rounding ties. On a cell,
``f - f_q`` is f minus a constant, and a linear bound of f is nearly exact there. Bound propagation
cannot see this: it bounds every rounding of f_q's hidden layers by a full step, independently of
the others, although in a few input dimensions only a few of their sign patterns are realisable
(for AQT's int8 MLP on ``[-1, 1]^4``, 4x the error reached; see docs/results/quant-libraries.md).

So :func:`grid_error` enumerates the cells, in blocks of a few cells per entry:

* f_q at one point of each cell, evaluated in float32 with a-priori rounding-error bounds
  (:func:`qbound.exact.cells.error_bounds`: the standard model of Higham 2002, as :mod:`qbound.bounds.fp`, on the
  magnitudes of the interval bounds over the whole box). A rounding whose input lies within its
  error bound of a tie could round either way in real arithmetic: such a cell is evaluated again in
  float64, and where that is unsure too, gets f_q's interval bounds at the point (both sides);
* f by forward symbolic intervals over each block (:mod:`qbound.exact.forms`; Wang et al. 2018):
  linear lower and upper bounds valid on the block, minimised over each of its cells in closed form;
* the cell's bound is f's bound minus f_q's value; the maximum over cells is the proven bound;
* then best first, as branch and bound does (Bunel et al., "Branch and Bound for Piecewise Linear
  Neural Network Verification", JMLR 2020): the cells with the largest bounds, while they exceed
  ``(1 + refine_gap)`` times the error reached, are bounded again with f's linear bounds over the
  next smaller box around them (half a block per entry, ..., the cell itself: exact where f is
  affine on it). A deadline after the first pass returns the bound proven so far.

Every input point lies in a closed cell whose representative rounds the same way (cells are
widened by a relative 1e-9 past their computed ties), so the bound covers the box, ties included.
The cells with the largest bounds give the reached error: points just inside their corners,
evaluated in float64 on the merged graph (and the inputs passed as ``reached``).

Cost: one float32 pass of f_q per cell and f's float64 linear bounds per block, in compiled chunks
(:mod:`qbound.exact.cell_bounds`; CPU time about 0.15 us per cell and 9 us per block for AQT's
4-16-16-2 MLP), and again linear bounds per box refined. AQT's int8 input grid on ``[-1, 1]^4`` has
65^4 = 1.8e7 cells: a first pass of about 4.4 s of CPU time warm (with the refinement to 1.5x the
reached error, 18-27 s of wall time at load 10-14, against 67-73 s with one batch per chunk), more
than ``certify``'s default 10 s leaves it on a first call unless the machine is quiet. ``certify(method="auto")`` enumerates grids of at most
:data:`AUTO_MAX_CELLS` cells, or :data:`AUTO_CELLS_PER_SECOND` per second of its share of the time
and of a core (:func:`core_share`); :func:`grid_error` gives up
after two chunks when its first pass would end past the deadline. :data:`MAX_CELLS` caps it.

Example:
  >>> import jax, jax.numpy as jnp, qbound as qb
  >>> from qbound.exact.grid import grid_error
  >>> f = lambda x: jnp.sum(jax.nn.relu(x))
  >>> fq = lambda x: jnp.sum(jax.nn.relu(jnp.round(x * 4) / 4))   # input rounded to steps of 1/4
  >>> res = grid_error(qb.merge(f, fq, qb.Box(-jnp.ones(2), jnp.ones(2))), qb.Box(-jnp.ones(2), jnp.ones(2)))
  >>> res.cells, round(res.lower, 3), res.lower <= res.upper < res.lower + 1e-3
  (81, 0.25, True)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import attack
from qbound import graph as G
from qbound.bounds.interval import interval_bounds
from qbound.box import Box
from qbound.errors import SoundnessError
from qbound.exact.cell_bounds import chunk_bounds
from qbound.exact.cells import cell_tables, cells_at_most, error_bounds, evaluate, input_cells, pre_rounding
from qbound.exact.forms import linear_bounds
from qbound.exact.forms import supported as forms_supported

# At most this many cells (f_q's forward passes): about 4 s of float32 passes on one core for
# AQT's 4-16-16-2 MLP at 65^4 = 1.8e7 cells.
MAX_CELLS = 1 << 25
# certify(method='auto') enumerates grids of at most this many cells whatever its time (about a
# second warm on AQT's 4-16-16-2 MLP).
AUTO_MAX_CELLS = 1 << 15
# With more time, certify allows this many cells per second of the grid's deadline, scaled by the
# share of a core the load average leaves (auto_max_cells). The first pass's own throughput is about
# 1.1e7 a second per share (AQT's 1.8e7 cells in about 7.5 s at load 9.3, a share of 0.22); the
# first call's compilations and the refinement need the rest. Measured 2026-12-05 at load 11-12 on
# AQT's whole box: 8e6 let a 20 s certify try a first pass that gave up after two chunks (interval
# bounds on the first call); 4e6 would allow 1.4e7 cells to a 30 s one, where the grid gets 1.46
# (branch and bound: 6.0). On a busy machine the time goes to branch and bound instead; grid_error itself gives up after two
# chunks when the rest of its first pass would end past the deadline.
AUTO_CELLS_PER_SECOND = 6_000_000
# Blocks (the first pass's boxes) per call at most (1.8e7 cells: 4^4 cells each; with 5^4 the first
# pass refines 3.5x more cells, measured at a threshold of 0.09), and cells per chunk.
MAX_BLOCKS = 1 << 17
CHUNK_CELLS = 1 << 20
# Cells whose corners are tried for the reached error.
WITNESS_CELLS = 32
# Cells refined per batch (the reached error, and with it the threshold, is updated between them).
REFINE_BATCH = 1 << 14
# The first batch (they double up to REFINE_BATCH).
FIRST_REFINE_BATCH = 1 << 10
# grid_error's report_upper is called at most this often (seconds).
REPORT_SECONDS = 0.25

# f_q's a-priori rounding-error bounds, once per grid.
_error_bounds = jax.jit(error_bounds)


@dataclasses.dataclass(frozen=True)
class GridResult:
  """The maximal error over the cells of f_q's input grid.

  Attributes:
    lower: an error reached, at ``witness`` (float64 evaluation of the merged graph).
    upper: a proven bound on ``max_x |f(x) - f_q(x)|_inf`` over the box.
    diff_lower, diff_upper: proven per-output bounds on ``f_j - f_q,j`` (flat).
    witness: the input reaching ``lower``.
    cells: how many cells were bounded; ``blocks``: the boxes of the first pass.
    refined: cells bounded again on their own (second pass).
    seconds: wall-clock time.
  """

  lower: float
  upper: float
  diff_lower: np.ndarray
  diff_upper: np.ndarray
  witness: np.ndarray
  cells: int
  blocks: int
  refined: int
  seconds: float


def core_share() -> float:
  """The share of a core this process can expect: cores over the 1-minute load average, at most 1
  (1 where the load average is unknown)."""
  try:
    load = os.getloadavg()[0]
  except (AttributeError, OSError):  # not on this platform
    return 1.0
  return min(1.0, (os.cpu_count() or 1) / max(load, 1e-3))


def auto_max_cells(seconds: float, share: Optional[float] = None) -> int:
  """The most cells ``certify(method="auto")`` enumerates with ``seconds`` for it and ``share`` of a
  core (None: :func:`core_share`)."""
  share = core_share() if share is None else share
  return max(AUTO_MAX_CELLS, int(AUTO_CELLS_PER_SECOND * share * max(seconds, 0.0)))


def _block_layout(counts, max_blocks: int):
  """Cells per block along each entry (the same for all, the smallest that fits ``max_blocks``)."""
  b = 1
  while math.prod(math.ceil(m / b) for m in counts) > max_blocks:
    b += 1
  return [min(b, m) for m in counts]


# Batches of fixed size (the last one padded): one compilation each, whatever the grid.
BATCH = 1024


def _batched(fn, *arrays):
  """``fn`` on ``arrays`` (leading axis) in padded batches of :data:`BATCH`, outputs concatenated."""
  n = arrays[0].shape[0]
  outs = []
  for first in range(0, n, BATCH):
    part = [a[first: first + BATCH] for a in arrays]
    m = part[0].shape[0]
    part = [np.concatenate([p, np.broadcast_to(p[:1], (BATCH - m, *p.shape[1:]))]) if m < BATCH else p for p in part]
    outs.append([np.asarray(o)[:m] for o in fn(*part)])
  return [np.concatenate(o) for o in zip(*outs)]


@jax.jit
def _evaluate_batch(qg: G.Graph, q_err, xs):
  return jax.vmap(lambda x: evaluate(qg, q_err, x))(xs)


class _Grid:
  """The cells of one call: their layout in blocks, and where each cell's numbers come from."""

  def __init__(self, fg, qg, box, edges, sound, q_bounds):
    self.fg, self.qg, self.sound = fg, qg, sound
    self.in_shape = tuple(box.shape)
    self.dtype = np.dtype(jnp.result_type(box.lower))
    self.counts = tuple(len(e) - 1 for e in edges)
    self.tables_np = cell_tables(edges, box)
    width = max(self.counts)
    pad = lambda col: np.stack([np.pad(t[col], (0, width - t[col].size), mode="edge")  # noqa: E731
                                for t in self.tables_np])
    self.tables = tuple(jnp.asarray(pad(col), self.dtype) for col in range(3))
    self.per = tuple(_block_layout(self.counts, MAX_BLOCKS))
    self.blocks_per = tuple(math.ceil(m / b) for m, b in zip(self.counts, self.per))
    self.n_blocks = math.prod(self.blocks_per)
    self.cells_per_block = math.prod(self.per)
    self.q_err = _error_bounds(qg, q_bounds)
    # The same bounds for a float64 evaluation: the standard model's terms scale with the unit
    # roundoff (2^-53 against 2^-24); a factor 2 to spare.
    self.q_err64 = [np.asarray(e, np.float64) * 2.0 ** -28 for e in self.q_err]
    self.n_out = int(np.prod(fg.output_shape))
    self.refined = 0  # cells bounded again after the first pass

  def block_boxes(self, n: int):
    """The boxes of blocks ``0..n-1`` (past the last block: the last one), ``(n, *in)`` each."""
    los, his = [], []
    for i, (m, b) in enumerate(zip(self.counts, self.per)):
      first = np.arange(0, m, b)
      los.append(self.tables_np[i][0][first])
      his.append(self.tables_np[i][1][np.minimum(first + b, m) - 1])
    ids = np.minimum(np.arange(n), self.n_blocks - 1)
    multi = np.unravel_index(ids, self.blocks_per)
    lo = np.stack([los[i][multi[i]] for i in range(len(multi))], -1).reshape(n, *self.in_shape)
    hi = np.stack([his[i][multi[i]] for i in range(len(multi))], -1).reshape(n, *self.in_shape)
    return lo, hi

  def indices(self, positions):
    """The per-entry indices ``(n, d)`` of the cells at flat ``positions`` (block-major order)."""
    blocks = np.minimum(positions // self.cells_per_block, self.n_blocks - 1)
    multi = np.stack(np.unravel_index(blocks, self.blocks_per), -1) * np.asarray(self.per)
    inner = np.stack(np.unravel_index(positions % self.cells_per_block, self.per), -1)
    return np.minimum(multi + inner, np.asarray(self.counts) - 1)

  def boxes(self, idx, size: int):
    """The boxes of ``size`` cells per entry (aligned to multiples of ``size``) holding the cells
    ``idx``: widened float32 ends, ``(n, *in)`` each."""
    first = (idx // size) * size
    last = np.minimum(first + size, np.asarray(self.counts)) - 1
    lo = np.stack([self.tables_np[i][0][first[:, i]] for i in range(idx.shape[1])], -1)
    hi = np.stack([self.tables_np[i][1][last[:, i]] for i in range(idx.shape[1])], -1)
    return lo.reshape(-1, *self.in_shape), hi.reshape(-1, *self.in_shape)

  def cells(self, positions):
    """Widened ends, representatives and indices ``(d,)`` of the cells at flat ``positions``."""
    idx = self.indices(positions)
    lo, hi = self.boxes(idx, 1)
    rep = np.stack([self.tables_np[i][2][idx[:, i]] for i in range(idx.shape[1])], -1).reshape(lo.shape)
    return lo, hi, rep, idx

  def f_q(self, reps):
    """Proven ``(lower, upper)`` of f_q at the representatives (float32, then float64 where a
    rounding met a possible tie, then interval bounds where float64 did too)."""
    n = reps.shape[0]
    v, flagged = _batched(lambda xs: _evaluate_batch(self.qg, self.q_err, jnp.asarray(xs)), reps)
    v = np.asarray(v, np.float64).reshape(n, -1)
    err = np.asarray(self.q_err[self.qg.output], np.float64).reshape(-1)
    lo, hi = v - err * (1 + 2.0 ** -40), v + err * (1 + 2.0 ** -40)
    lo = lo - np.abs(lo) * 2.0 ** -50
    hi = hi + np.abs(hi) * 2.0 ** -50
    if flagged.any():
      rows = np.flatnonzero(flagged)
      with jax.enable_x64(True):
        qg64 = G.float64_copy(self.qg)
        err64 = [jnp.asarray(e) for e in self.q_err64]
        v64, flagged64 = _batched(lambda xs: _evaluate_batch(qg64, err64, jnp.asarray(xs, jnp.float64)),
                                  reps[rows].astype(np.float64))
        v64 = np.asarray(v64, np.float64).reshape(rows.size, -1)
      e64 = self.q_err64[self.qg.output].reshape(-1) * (1 + 2.0 ** -40)
      lo[rows], hi[rows] = v64 - e64 - np.abs(v64) * 2.0 ** -50, v64 + e64 + np.abs(v64) * 2.0 ** -50
      if flagged64.any():  # a tie in real arithmetic (or within 1e-12 steps): both sides, by intervals
        ties = rows[flagged64]
        interval = lambda pts: interval_bounds(self.qg, Box(jnp.asarray(pts), jnp.asarray(pts)), self.sound,  # noqa: E731
                                               batched=True, check=False)[self.qg.output]
        q_lo, q_hi = _batched(interval, reps[ties])
        lo[ties] = np.asarray(q_lo, np.float64).reshape(ties.size, -1)
        hi[ties] = np.asarray(q_hi, np.float64).reshape(ties.size, -1)
    return lo, hi

  def refine(self, positions, size: int = 1, forms=None):
    """Bounds of ``|f - f_q|`` on the cells at ``positions``, with f's linear bounds over the boxes
    of ``size`` cells per entry holding them (``size=1``: over each cell itself, exact where f is
    affine on it), or with ``forms = (value, lam, lower, upper)`` already computed over each cell's
    block. Returns the bounds and the cells' indices ``(n, d)``."""
    self.refined += len(positions)
    lo, hi, rep, idx = self.cells(positions)
    if forms is None:
      b_lo, b_hi = self.boxes(idx, size)
      # The boxes by one integer key each (np.unique over rows sorts lexicographically: slower).
      key = np.ravel_multi_index(tuple((idx // size).T), tuple(-(-np.asarray(self.counts) // size)))
      _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
      value, lam = linear_bounds(self.fg, b_lo[first], b_hi[first])
      inverse = inverse.reshape(-1)
      forms = (value[inverse], lam[inverse], b_lo[first][inverse], b_hi[first][inverse])
    f_lo, f_hi = _f_on_cells_np(*forms, lo, hi)
    q_lo, q_hi = self.f_q(rep)
    d = np.maximum(np.max(q_hi - f_lo + 2.0 ** -52 * (np.abs(q_hi) + np.abs(f_lo)), axis=1),
                   np.max(f_hi - q_lo + 2.0 ** -52 * (np.abs(f_hi) + np.abs(q_lo)), axis=1))
    return d * (1 + 2.0 ** -50), idx


def _f_on_cells_np(value, lam, blk_lo, blk_hi, cell_lo, cell_hi):
  """Bounds of f on one cell per box from f's linear bounds over the box (as
  :mod:`qbound.exact.cell_bounds` does on the device for a block's cells), in float64 (products of
  float32 numbers are exact there; the sums get ``1e-14`` of their magnitude). Returns
  ``(f_lo, f_hi)``, each ``(k, n)``."""
  k = lam.shape[0]
  lam = np.asarray(lam, np.float64).reshape(k, lam.shape[1], -1)
  shape = (k, 1, -1)
  c_lo, c_hi = (np.asarray(a, np.float64).reshape(shape) for a in (cell_lo, cell_hi))
  b_lo, b_hi = (np.asarray(a, np.float64).reshape(shape) for a in (blk_lo, blk_hi))
  value = np.asarray(value, np.float64)
  at_cell = np.minimum(lam * c_lo, lam * c_hi).sum(-1)
  at_block = np.minimum(lam * b_lo, lam * b_hi).sum(-1)
  mag = (np.abs(lam) * np.maximum(np.maximum(np.abs(c_lo), np.abs(c_hi)),
                                  np.maximum(np.abs(b_lo), np.abs(b_hi)))).sum(-1) + np.abs(value)
  rows = value + at_cell - at_block - 1e-14 * mag
  n = rows.shape[-1] // 2
  return rows[:, :n], -rows[:, n:]


def grid_error(merged, box: Box, *, deadline: float = math.inf, max_cells: int = MAX_CELLS, sound: bool = True,
               stop=None, refine_gap: float = 0.02, large_refine_gap: Optional[float] = None,
               reached=None, refine_deadline: Optional[float] = None, report=None,
               report_upper=None, compiled=None) -> Optional[GridResult]:
  """The maximal error of a merged network whose f_q rounds its input first, cell by cell.

  A first pass bounds every cell with f's linear bounds over blocks of cells. Then the cells whose
  bound exceeds ``(1 + refine_gap)`` times the error reached, largest first, are bounded again with
  f's linear bounds over ever smaller boxes around them: half a block per entry, and so on down to
  the cell itself (exact where f is affine on it). A cell within the gap keeps its bound: the result
  is within ``1 + refine_gap`` of the error reached, or the largest bound of a cell bounded on its own.

  Args:
    merged: a :class:`~qbound.merge.MergedNetwork` of f and f_q.
    box: the input box.
    deadline: a ``time.perf_counter()`` time. Past it the enumeration returns None during the first
      pass, and afterwards the bound proven so far (every cell has one by then).
    max_cells: return None without work when the grid has more cells.
    sound: interval bounds with floating-point margins (the a-priori error bounds need them).
    stop: optional callable; when it returns True the enumeration stops as at the deadline.
    refine_gap: cells within this relative gap of the reached error keep their bound.
    large_refine_gap: the gap instead for grids of more than :data:`AUTO_MAX_CELLS` cells (None:
      ``refine_gap``).
    reached: optional inputs (``(k, *in)``) where the error is already known to be large (a
      search's best): evaluated first, so that the refinement starts from their error.
    refine_deadline: a ``time.perf_counter()`` time for the refinement after the first pass (None:
      ``deadline``): the first pass must end by ``deadline``, its refinement returns the bound
      proven so far at ``refine_deadline``.
    report: optional callable, given each input (``(*in)``) where the reached error rose, as soon
      as it is found: during the first pass too, so a caller keeps them if the grid gives up.
    report_upper: optional callable, given the bound proven so far (a float) during the refinement,
      every :data:`REPORT_SECONDS` at most: a caller that must answer at a deadline keeps it even if
      this call returns a moment after.
    compiled: optional callable, called once the first chunk is bounded (its programs compiled, or
      read from the cache): from then on the enumeration is compute-bound, and the chunks after the
      first decide whether the first pass ends by the deadline.

  Returns:
    A :class:`GridResult`, or None when f_q does not round its input first (see the module
    docstring), f has other nodes than affine maps, ReLUs and clips, the grid has more than
    ``max_cells`` cells, or the deadline (or ``stop``) came before every cell had a bound.
  """
  start = time.perf_counter()
  late = lambda: time.perf_counter() > deadline or (stop is not None and stop())  # noqa: E731
  refine_end = deadline if refine_deadline is None else refine_deadline
  late_refining = lambda: time.perf_counter() > refine_end or (stop is not None and stop())  # noqa: E731
  fg, qg = merged.f_graph, merged.fq_graph
  if late() or not forms_supported(fg):
    return None
  # A count from the roundings' interval bounds first: cheap (these steps are compiled by the
  # interval bounds certify starts with), where tracing the input's chain compiles op by op.
  found = pre_rounding(qg)
  if found is None:
    return None
  q_bounds = interval_bounds(qg, box, sound)
  if cells_at_most(qg, found[0], q_bounds) > max_cells:
    return None
  edges = input_cells(qg, box)
  if edges is None or math.prod(len(e) - 1 for e in edges) > max_cells:
    return None
  if large_refine_gap is not None and math.prod(len(e) - 1 for e in edges) > AUTO_MAX_CELLS:
    refine_gap = large_refine_gap
  try:
    grid = _Grid(fg, qg, box, edges, sound, q_bounds)
  except ValueError:
    return None
  k = max(1, min(grid.n_blocks, CHUNK_CELLS // grid.cells_per_block))
  n_chunks = math.ceil(grid.n_blocks / k)
  # Chunk by chunk: f's linear bounds over its blocks, then every cell's bound. The time of the
  # chunks after the first (which compiles) tells whether the rest ends before the deadline: if not,
  # give up at once and leave the time to the caller's other methods.
  blk_lo, blk_hi = grid.block_boxes(n_chunks * k)
  forms_np = []
  # Every cell's bound, written chunk by chunk; per chunk also its largest finite bounds and its
  # infinite ones, so nothing scans all cells between the pass and the refinement (on AQT's whole
  # box a concatenation, a partition and a scan of 1.9e7 bounds took 2.1 s there on a first call).
  chunk_cells = k * grid.cells_per_block
  bounds = np.empty(n_chunks * chunk_cells, np.float64)
  top_finite, infinite = [], []
  lower, witness = 0.0, None

  def reach(more, x):
    """A reached error found: kept if larger, and reported at once."""
    nonlocal lower, witness
    if more > lower or witness is None:
      lower, witness = more, x
      if report is not None and more > 0:
        report(x.reshape(grid.in_shape))

  if reached is not None and len(reached):
    xs = np.asarray(reached, grid.dtype).reshape(-1, *grid.in_shape)
    errs = np.abs(attack.exact_errors(merged.graph, xs)).reshape(xs.shape[0], -1).max(axis=1)
    lower, witness = float(errs.max()), xs[int(np.argmax(errs))]
  timed_from = None
  for chunk in range(n_chunks):
    now = time.perf_counter()
    if late() or (timed_from is not None and now + (now - timed_from) / (chunk - 1) * (n_chunks - chunk) > deadline):
      return None
    if chunk == 1:
      timed_from = now
    rows = slice(chunk * k, (chunk + 1) * k)
    if chunk == 0:
      forms_np.append(linear_bounds(fg, blk_lo[rows], blk_hi[rows]))
    value, lam = forms_np[chunk]
    out, positions, guesses = chunk_bounds(qg, grid.q_err, grid.tables, chunk * k, value, lam, blk_lo[rows],
                                           blk_hi[rows], k=k, counts=grid.counts, per=grid.per,
                                           blocks_per=grid.blocks_per, candidates=True)
    if chunk + 1 < n_chunks:  # the next chunk's forms (NumPy) while the device bounds this one's cells
      following = slice((chunk + 1) * k, (chunk + 2) * k)
      forms_np.append(linear_bounds(fg, blk_lo[following], blk_hi[following]))
    part = bounds[chunk * chunk_cells: (chunk + 1) * chunk_cells]
    part[:] = np.asarray(out)
    top_finite.append(chunk * chunk_cells + _largest_finite(part, WITNESS_CELLS))
    infinite.append(chunk * chunk_cells + np.flatnonzero(np.isinf(part)))
    if chunk == 0 and compiled is not None:
      compiled()
    # The chunk's cells whose error looks largest (one per group of cells): their corners are
    # evaluated now, so the reached error rises during the pass, not only after it (on AQT's whole
    # box the first pass's largest bounds sit where f's block bounds are loose, not where the error
    # is: their corners reached 0.049 against 0.069 here).
    guesses = np.asarray(guesses)
    top = np.argsort(-guesses)[:WITNESS_CELLS]
    top = top[np.isfinite(guesses[top])]
    if top.size:
      reach(*_reached(merged, box, grid.tables_np, grid.indices(chunk * k * grid.cells_per_block
                                                                + np.asarray(positions)[top])))
  block_forms = (np.concatenate([v for v, _ in forms_np]), np.concatenate([m for _, m in forms_np]), blk_lo, blk_hi)
  # Every cell has a bound now (inf where f_q's float32 value met a possible tie): from here on a
  # deadline returns the bound proven so far.
  late = late_refining
  # A reached error from the cells with the largest finite first bounds, refined on their own.
  candidates = np.concatenate(top_finite)
  order = candidates[_largest_finite(bounds[candidates], WITNESS_CELLS)]
  if order.size:
    d, idx = grid.refine(order)
    bounds[order] = np.minimum(bounds[order], d)
    reach(*_reached(merged, box, grid.tables_np, idx[np.argsort(-d)]))
  threshold = lambda: (1 + refine_gap) * lower  # noqa: E731
  # Cells whose float32 value met a possible tie: f_q in float64 there, f from its block's bounds
  # (cheap: no new linear bounds; done even past the deadline, as the bound is infinite without it).
  flagged = np.concatenate(infinite)
  for first in range(0, flagged.size, REFINE_BATCH):
    part = flagged[first: first + REFINE_BATCH]
    blocks = np.minimum(part // grid.cells_per_block, grid.n_blocks - 1)
    d, _ = grid.refine(part, forms=tuple(a[blocks] for a in block_forms))
    bounds[part] = d
  # Then best first: the cells with the largest bounds, in batches, each bounded again over the next
  # smaller box around it (half a block per entry, a quarter, ..., the cell itself) while it stays
  # above the threshold and above every bound outside the batch, so the largest bound falls as fast
  # as it can and a deadline leaves the best bound for the time spent. The corners of the cells
  # bounded highest raise the reached error, and with it the threshold, between batches (small
  # batches first, while it rises fastest).
  sizes = []
  size = max(grid.per)
  while size > 1:
    size = max(1, size // 2)
    sizes.append(size)
  level = np.zeros(bounds.size, np.int8)  # sizes[level]: the next box a cell is bounded over
  level[order] = len(sizes)  # bounded on their own: nothing left to refine
  batch = FIRST_REFINE_BATCH
  # The threshold only rises and bounds only fall: the cells above it are among those above it now
  # (scanned once: the first pass's bounds are one per cell, 1.8e7 on AQT's whole box).
  above = np.flatnonzero(bounds > threshold())
  reported = -math.inf  # when the bound proven so far was last reported
  while True:
    above = above[(bounds[above] > threshold()) & (level[above] < len(sizes))]
    if not above.size:
      break
    if late():
      return _result(grid, bounds, lower, witness, start)
    if report_upper is not None and time.perf_counter() > reported + REPORT_SECONDS:
      # (a scan of every cell's bound: 10-20 ms on AQT's whole box, so not after every batch)
      report_upper(float(max(bounds.max(initial=0.0), 0.0)))
      reported = time.perf_counter()
    if above.size > batch:
      ranked = np.argpartition(-bounds[above], batch)
      part, rest = above[ranked[:batch]], bounds[above[ranked[batch]]]
    else:
      part, rest = above, -np.inf
    batch = min(2 * batch, REFINE_BATCH)
    tried = None
    for step, size in enumerate(sizes):
      # (>= rest: the batch's largest bound always qualifies, ties included, so every batch progresses)
      now = part[(level[part] == step) & (bounds[part] > threshold()) & (bounds[part] >= rest)]
      if not now.size:
        continue
      d, idx = grid.refine(now, size)
      bounds[now] = np.minimum(bounds[now], d)
      level[now] = step + 1
      tried = (bounds[now], idx)
    if tried is not None and tried[0].max() > lower:  # more corners to try, in the cells bounded highest
      reach(*_reached(merged, box, grid.tables_np, tried[1][np.argsort(-tried[0])[:WITNESS_CELLS]]))
  return _result(grid, bounds, lower, witness, start)


def _largest_finite(values, n: int, row: int = 1024):
  """The indices of the ``n`` largest finite ``values`` (fewer if fewer are finite; ties either way), in
  no order. By rows of ``row`` values: the ``n`` largest values lie in the ``n`` rows of largest
  maxima (any other row's values have ``n`` maxima at least as large), so only those rows are
  partitioned (4 ms for 2^20 values against 12 ms for a partition of them all)."""
  masked = np.where(np.isfinite(values), values, -np.inf)
  rows = -(-masked.size // row)
  padded = np.pad(masked, (0, rows * row - masked.size), constant_values=-np.inf).reshape(rows, row)
  maxima = padded.max(axis=1)
  best_rows = np.argpartition(maxima, rows - n)[rows - n:] if rows > n else np.arange(rows)
  picked = (best_rows[:, None] * row + np.arange(row)).reshape(-1)
  among = padded.reshape(-1)[picked]
  top = np.argpartition(among, among.size - n)[among.size - n:] if among.size > n else np.arange(among.size)
  top = top[np.isfinite(among[top])]
  return picked[top]


def _result(grid, bounds, lower, witness, start) -> GridResult:
  """The result from every cell's bound (the largest is the proven one)."""
  upper = float(max(bounds.max(initial=0.0), 0.0))
  if lower > upper:
    raise SoundnessError(f"grid: the error {lower!r} reached at {witness.reshape(-1).tolist()} exceeds the bound "
                         f"{upper!r}: a bug in qbound; please report it with this network and box.")
  n_out = grid.n_out
  return GridResult(lower=lower, upper=upper, diff_lower=np.full(n_out, -upper), diff_upper=np.full(n_out, upper),
                    witness=witness, cells=math.prod(grid.counts), blocks=grid.n_blocks,
                    refined=grid.refined, seconds=time.perf_counter() - start)


def _reached(merged, box: Box, tables, cells) -> tuple:
  """The largest error at points just inside the corners (and the centres) of ``cells``."""
  d = len(tables)
  shape = tuple(box.shape)
  dtype = np.dtype(jnp.result_type(box.lower))
  corners = np.stack(np.meshgrid(*[[0.0, 1.0]] * d, indexing="ij"), -1).reshape(-1, d) if d <= 6 else None
  points = []
  for cell in cells:
    lo = np.array([tables[i][3][cell[i]] for i in range(d)])
    hi = np.array([tables[i][4][cell[i]] for i in range(d)])
    inset = 1e-4 * (hi - lo)
    a, b = lo + inset, hi - inset
    if corners is not None:
      points.append(a + corners * (b - a))
    else:  # too many corners: random ones
      rng = np.random.default_rng(len(points))
      points.append(a + rng.integers(0, 2, (64, d)) * (b - a))
    points.append(((lo + hi) / 2)[None])
  xs = np.concatenate(points).astype(dtype).reshape(-1, *shape)
  errs = np.abs(attack.exact_errors(merged.graph, xs)).reshape(xs.shape[0], -1).max(axis=1)
  k = int(np.argmax(errs))
  return float(errs[k]), xs[k]
