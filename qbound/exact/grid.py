"""The maximal error cell by cell, where f_q rounds its input first (static input quantization).

When every path from the input through f_q passes a staircase rounding of an entrywise affine
function of the input (``round(clip(x / s))``: AQT and qwix with static activation scales, qbound's
own fake quantization), f_q is constant on each cell of the grid those roundings draw on the input
box: a product of intervals, one per input entry, between consecutive rounding ties. On a cell,
``f - f_q`` is f minus a constant, and a linear bound of f is nearly exact there. Bound propagation
cannot see this: it bounds every rounding of f_q's hidden layers by a full step, independently of
the others, although in a few input dimensions only a few of their sign patterns are realisable
(for AQT's int8 MLP on ``[-1, 1]^4``, 4x the error reached; see docs/models.md).

So :func:`grid_error` enumerates the cells, in blocks of a few cells per entry:

* f_q at one point of each cell, evaluated in float32 with a-priori rounding-error bounds
  (:func:`qbound.exact.cells.error_bounds`: the standard model of Higham 2002, as :mod:`qbound.bounds.fp`, on the
  magnitudes of the interval bounds over the whole box). A rounding whose input lies within its
  error bound of a tie could round either way in real arithmetic: such a cell gets f_q's interval
  bounds over the cell instead (rare: float32's error is ~1e-5 steps);
* f by forward symbolic intervals over each block (:mod:`qbound.exact.forms`; Wang et al. 2018):
  linear lower and upper bounds valid on the block, minimised over each of its cells in closed form;
* the cell's bound is f's bound minus f_q's value; the maximum over cells is the proven bound;
* cells whose bound exceeds the error reached by more than ``refine_gap`` are bounded again with
  f's linear bounds over the cell itself (exact where f is affine on the cell).

Every input point lies in a closed cell whose representative rounds the same way (cells are
widened by a relative 1e-9 past their computed ties), so the bound covers the box, ties included.
The cells with the largest bounds give the reached error: points just inside their corners,
evaluated in float64 on the merged graph.

Cost: one float32 pass of f_q per cell, the linear bounds per block, and the linear bounds again
per refined cell (about 60 us each on a loaded CPU, the dominant cost). AQT's int8 input grid on
``[-1, 1]^4`` has 65^4 = 1.8e7 cells: minutes, not the 10 s of ``certify``'s default budget (see
docs/models.md); ``certify(method="auto")`` enumerates grids of at most :data:`AUTO_MAX_CELLS` cells
(local boxes). :data:`MAX_CELLS` caps it; :func:`grid_error` returns None past its deadline.

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
import functools
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import attack
from qbound import graph as G
from qbound.bounds import fp
from qbound.bounds.interval import interval_bounds
from qbound.box import Box
from qbound.errors import SoundnessError
from qbound.exact.cells import cell_tables, cells_at_most, error_bounds, evaluate, input_cells, pre_rounding
from qbound.exact.forms import linear_bounds
from qbound.exact.forms import supported as forms_supported

# At most this many cells (f_q's forward passes): about 4 s of float32 passes on one core for
# AQT's 4-16-16-2 MLP at 65^4 = 1.8e7 cells.
MAX_CELLS = 1 << 25
# certify(method='auto') enumerates grids of at most this many cells (about a second warm on
# AQT's 4-16-16-2 MLP; 1.8e7 cells take minutes, see docs/models.md).
AUTO_MAX_CELLS = 1 << 15
# With more time, certify allows this many cells per second of its deadline (measured: AQT's
# 1.8e7 cells in 169 s warm at load 10, refine_gap 0.2: about 1e5 per second alone; inside
# certify, beside its search thread at load 8.5, not within 200 s: 4e4 leaves room).
AUTO_CELLS_PER_SECOND = 40_000
# Blocks (the first pass's boxes) per call at most (1.8e7 cells: 4^4 cells each; with 5^4 the first
# pass refines 3.5x more cells, measured at a threshold of 0.09), and cells per chunk.
MAX_BLOCKS = 1 << 17
CHUNK_CELLS = 1 << 20
# Cells whose corners are tried for the reached error.
WITNESS_CELLS = 32
# Cells refined per batch (the reached error, and with it the threshold, is updated between them).
REFINE_BATCH = 1 << 14

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


def auto_max_cells(seconds: float) -> int:
  """The most cells ``certify(method="auto")`` enumerates with ``seconds`` for it."""
  return max(AUTO_MAX_CELLS, int(AUTO_CELLS_PER_SECOND * max(seconds, 0.0)))


def _f_on_cells(value, lam, blk_lo, blk_hi, cell_lo, cell_hi):
  """Bounds of f on cells from the linear bounds (qbound.exact.forms) over their blocks.

  ``value``, ``lam`` (``(k, rows)``, ``(k, rows, *in)``): lower bounds of the rows ``[+e_j; -e_j]``
  of f over the blocks ``[blk_lo, blk_hi]`` and their coefficients on the input, so that
  ``row . f(x) >= value + lam . x - min_block lam . y`` on a block; minimised over each of its cells
  (``(k, c, *in)``) in closed form. Returns ``(f_lo, f_hi)``, each ``(k, c, n)``.
  """
  axes = tuple(range(2, lam.ndim))
  cell_axes = tuple(a + 1 for a in axes)
  lam_b = lam[:, None]  # (k, 1, rows, *in)
  lo_b, hi_b = cell_lo[:, :, None], cell_hi[:, :, None]
  at_cell = jnp.sum(jnp.minimum(lam_b * lo_b, lam_b * hi_b), axis=cell_axes)  # (k, c, rows)
  at_block = jnp.sum(jnp.minimum(lam * blk_lo[:, None], lam * blk_hi[:, None]), axis=axes)  # (k, rows)
  mag = (jnp.sum(jnp.abs(lam_b) * jnp.maximum(jnp.abs(lo_b), jnp.abs(hi_b)), axis=cell_axes)
         + (jnp.sum(jnp.abs(lam) * jnp.maximum(jnp.abs(blk_lo[:, None]), jnp.abs(blk_hi[:, None])), axis=axes)
            + jnp.abs(value))[:, None])
  size = int(np.prod(lam.shape[2:]))
  rows = value[:, None] + at_cell - at_block[:, None]
  rows = fp.round_down(rows - fp.dot_margin(2 * size + 4, mag, rows.dtype))
  n = rows.shape[-1] // 2
  return rows[..., :n], -rows[..., n:]


def _differences(f_lo, f_hi, q_lo, q_hi):
  """Proven ``(lower, upper)`` of ``f - f_q`` from bounds of each (float margins included)."""
  d_lo = f_lo - q_hi
  d_hi = f_hi - q_lo
  return (fp.round_down(d_lo - fp.dot_margin(1, jnp.abs(f_lo) + jnp.abs(q_hi), d_lo.dtype)),
          fp.round_up(d_hi + fp.dot_margin(1, jnp.abs(f_hi) + jnp.abs(q_lo), d_hi.dtype)))


def _cells_of(ids, tables, counts, per, blocks_per, offsets, in_shape):
  """The cells of blocks ``ids``: their indices ``(k, c, d)``, widened ends and representatives."""
  lo32, hi32, rep = tables
  multi = jnp.stack(jnp.unravel_index(ids, blocks_per), -1) * jnp.asarray(per)  # (k, d)
  idx = jnp.minimum(multi[:, None, :] + offsets[None], jnp.asarray(counts) - 1)  # (k, c, d)
  entries = jnp.arange(len(counts))
  gather = lambda t: t[entries, idx].reshape(*idx.shape[:2], *in_shape)  # noqa: E731
  return idx, gather(lo32), gather(hi32), gather(rep)


@functools.partial(jax.jit, static_argnames=("k", "counts", "per", "blocks_per"))
def _chunk(qg: G.Graph, q_err, tables, first, value, lam, blk_lo, blk_hi, *, k, counts, per, blocks_per):
  """One chunk of ``k`` blocks from block ``first``: every cell's bound on ``|f - f_q|`` (flat,
  ``(k * cells per block,)``; ``inf`` where a rounding met a possible tie, so it is refined)."""
  n_blocks = math.prod(blocks_per)
  ids = jnp.minimum(first + jnp.arange(k), n_blocks - 1)
  offsets = jnp.stack(jnp.meshgrid(*[jnp.arange(b) for b in per], indexing="ij"), -1).reshape(-1, len(per))
  in_shape = qg.input_shape
  _, cell_lo, cell_hi, reps = _cells_of(ids, tables, counts, per, blocks_per, offsets, in_shape)
  c = reps.shape[1]
  vq, flagged = jax.vmap(lambda x: evaluate(qg, q_err, x))(reps.reshape(k * c, *in_shape))
  vq = vq.reshape(k, c, -1)
  err = q_err[qg.output].reshape(-1)
  f_lo, f_hi = _f_on_cells(value[ids], lam[ids], blk_lo[ids], blk_hi[ids], cell_lo, cell_hi)
  d_lo, d_hi = _differences(f_lo, f_hi, fp.round_down(vq - err), fp.round_up(vq + err))
  worst = jnp.max(jnp.maximum(-d_lo, d_hi), axis=-1).reshape(-1)
  return jnp.where(flagged, jnp.inf, worst)


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
    self.offsets = jnp.stack(jnp.meshgrid(*[jnp.arange(b) for b in self.per], indexing="ij"), -1).reshape(
        -1, len(self.per))
    self.q_err = _error_bounds(qg, q_bounds)
    # The same bounds for a float64 evaluation: the standard model's terms scale with the unit
    # roundoff (2^-53 against 2^-24); a factor 2 to spare.
    self.q_err64 = [np.asarray(e, np.float64) * 2.0 ** -28 for e in self.q_err]
    self.n_out = int(np.prod(fg.output_shape))

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

  def cells(self, positions):
    """Widened ends, representatives and indices ``(d,)`` of the cells at flat ``positions``."""
    ids = jnp.asarray(np.minimum(positions // self.cells_per_block, self.n_blocks - 1))
    idx, lo, hi, rep = _cells_of(ids, self.tables, self.counts, self.per, self.blocks_per, self.offsets,
                                 self.in_shape)
    pick = jnp.asarray(positions % self.cells_per_block)
    rows = jnp.arange(pick.shape[0])
    return (np.asarray(lo[rows, pick]), np.asarray(hi[rows, pick]), np.asarray(rep[rows, pick]),
            np.asarray(idx[rows, pick]))

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
        qg64 = attack._host64(self.qg)  # noqa: SLF001
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

  def refine(self, positions):
    """Bounds of ``|f - f_q|`` on single cells: f's linear bounds over the cell itself."""
    lo, hi, rep, idx = self.cells(positions)
    value, _ = _batched(lambda a, b: linear_bounds(self.fg, a, b), lo, hi)
    value = value.astype(np.float64)
    f_lo, f_hi = value[:, : self.n_out], -value[:, self.n_out:]
    q_lo, q_hi = self.f_q(rep)
    d = np.maximum(np.max(q_hi - f_lo, axis=1), np.max(f_hi - q_lo, axis=1))
    return d * (1 + 2.0 ** -50), idx


def grid_error(merged, box: Box, *, deadline: float = math.inf, max_cells: int = MAX_CELLS, sound: bool = True,
               stop=None, refine_gap: float = 0.02, large_refine_gap: Optional[float] = None) -> Optional[GridResult]:
  """The maximal error of a merged network whose f_q rounds its input first, cell by cell.

  Two passes: f's linear bounds over blocks of cells bound every cell; the cells whose bound
  exceeds ``(1 + refine_gap)`` times the error reached are bounded again with f's linear bounds
  over the cell itself (exact where f is affine on it).

  Args:
    merged: a :class:`~qbound.merge.MergedNetwork` of f and f_q.
    box: the input box.
    deadline: a ``time.perf_counter()`` time; past it the enumeration stops and returns None.
    max_cells: return None without work when the grid has more cells.
    sound: interval bounds with floating-point margins (the a-priori error bounds need them).
    stop: optional callable; when it returns True the enumeration stops and returns None.
    refine_gap: cells within this relative gap of the reached error keep their block bound.
    large_refine_gap: the gap instead for grids of more than :data:`AUTO_MAX_CELLS` cells (None:
      ``refine_gap``): refining to 2% there takes most of the time (on AQT's whole box, 0.2
      refines 468,000 of 1.8e7 cells).

  Returns:
    A :class:`GridResult`, or None when f_q does not round its input first (see the module
    docstring), f has other nodes than affine maps, ReLUs and clips, the grid has more than
    ``max_cells`` cells, or the deadline (or ``stop``) came first.
  """
  start = time.perf_counter()
  late = lambda: time.perf_counter() > deadline or (stop is not None and stop())  # noqa: E731
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
  # Every block's box, and f's linear bounds over it, in one batch.
  blk_lo, blk_hi = grid.block_boxes(n_chunks * k)
  value, lam = _batched(lambda a, b: linear_bounds(fg, a, b), blk_lo, blk_hi)
  value, lam, blk_lo, blk_hi = jnp.asarray(value), jnp.asarray(lam), jnp.asarray(blk_lo), jnp.asarray(blk_hi)
  worst = []
  for chunk in range(n_chunks):
    if late():
      return None
    worst.append(np.asarray(_chunk(qg, grid.q_err, grid.tables, chunk * k, value, lam, blk_lo, blk_hi, k=k,
                                   counts=grid.counts, per=grid.per, blocks_per=grid.blocks_per)))
  worst = np.concatenate(worst)
  # The reached error first, from the cells with the largest block bounds, refined.
  order = np.argpartition(-worst, min(WITNESS_CELLS, worst.size - 1))[:WITNESS_CELLS]
  refined, idx = grid.refine(order)
  lower, witness = _reached(merged, box, grid.tables_np, idx[np.argsort(-refined)])
  bound = refined.max()
  # Largest first bounds first: the reached error rises early, and the cells whose first bound is
  # within refine_gap of it by then keep that bound.
  candidates = np.flatnonzero(worst > (1 + refine_gap) * lower)
  candidates = candidates[np.argsort(-worst[candidates], kind="stable")]
  candidates = candidates[~np.isin(candidates, order)]
  done = np.zeros(worst.size, bool)
  done[order] = True
  first = 0
  while first < candidates.size and worst[candidates[first]] > (1 + refine_gap) * lower:
    if late():
      return None
    part = candidates[first: first + REFINE_BATCH]
    part = part[worst[part] > (1 + refine_gap) * lower]
    first += REFINE_BATCH
    d, idx = grid.refine(part)
    done[part] = True
    bound = max(bound, d.max())
    if d.max() > lower:  # more corners to try
      more, x = _reached(merged, box, grid.tables_np, idx[np.argsort(-d)[:WITNESS_CELLS]])
      if more > lower:
        lower, witness = more, x
  rest = worst[~done]
  upper = float(max(bound, rest.max() if rest.size else 0.0, 0.0))
  if lower > upper:
    raise SoundnessError(f"grid: the error {lower!r} reached at {witness.reshape(-1).tolist()} exceeds the bound "
                         f"{upper!r}: a bug in qbound; please report it with this network and box.")
  n_out = grid.n_out
  return GridResult(lower=lower, upper=upper, diff_lower=np.full(n_out, -upper), diff_upper=np.full(n_out, upper),
                    witness=witness, cells=math.prod(grid.counts), blocks=grid.n_blocks,
                    refined=int(done.sum()), seconds=time.perf_counter() - start)


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
