"""Every cell's bound on ``|f - f_q|`` in a chunk of blocks: the first pass of :mod:`qbound.exact.grid`.

A block is a box of a few cells per input entry. Over it, f has linear lower and upper bounds
(:mod:`qbound.exact.forms`); on each of its cells f_q is one constant, evaluated at the cell's
representative in float32 within proven rounding error (:func:`qbound.exact.cells.evaluate`, the
standard model of Higham 2002). A cell's bound is f's bound minimised over the cell less f_q's
value, with floating-point margins, or ``inf`` where a rounding of f_q met a possible tie (then
:mod:`qbound.exact.grid` settles it in float64).

Two things keep it fast, as one compiled program per chunk:

* the cells go through f_q in groups of about :data:`GROUP_CELLS` (``jax.lax.map``), whose values
  stay in cache: on AQT's 4-16-16-2 MLP 1.6x faster than one batch of 2^20 cells;
* f's linear bound minimised over a cell is a sum over input entries of terms that depend on the
  cell's end along that entry only (the cell is a product of intervals), so each term is computed
  once per block and entry and the sums are broadcast over the block's cells (Wang et al.,
  "Formal Security Analysis of Neural Networks using Symbolic Intervals", USENIX Security 2018, for
  the linear bounds).

Example (a 2-input net whose input is rounded to steps of 1/4 on ``[-1, 1]^2``: 9 cells a side):
  >>> import jax.numpy as jnp, numpy as np, qbound as qb
  >>> from qbound.exact import cells, forms
  >>> from qbound.exact.cell_bounds import chunk_bounds
  >>> from qbound.bounds.interval import interval_bounds
  >>> f = lambda x: jnp.sum(x)
  >>> box = qb.Box(-jnp.ones(2), jnp.ones(2))
  >>> m = qb.merge(f, lambda x: jnp.sum(jnp.round(x * 4) / 4), box)
  >>> tables = cells.cell_tables(cells.input_cells(m.fq_graph, box), box)
  >>> t = tuple(jnp.asarray(np.stack([tab[col] for tab in tables])) for col in range(3))
  >>> err = cells.error_bounds(m.fq_graph, interval_bounds(m.fq_graph, box, True))
  >>> value, lam = forms.linear_bounds(m.f_graph, -np.ones((1, 2)), np.ones((1, 2)))  # one block
  >>> b = chunk_bounds(m.fq_graph, err, t, 0, value, lam, -np.ones((1, 2), np.float32),
  ...                  np.ones((1, 2), np.float32), k=1, counts=(9, 9), per=(9, 9), blocks_per=(1, 1))
  >>> b.shape, round(float(b.max()), 4)   # |x - round(4x)/4| summed over 2 entries: 1/4
  ((81,), 0.25)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp
from qbound.exact.cells import evaluate

# Cells per group inside a chunk (measured 2026-12-05 on AQT's 4-16-16-2 MLP at load 10: groups of
# 2^14 cells 0.62 s per 2^20 cells, of 2^12 0.86 s, one batch of 2^20 1.03 s).
GROUP_CELLS = 1 << 14


def group_blocks(cells_per_block: int, k: int, group_cells: int = GROUP_CELLS) -> int:
  """Blocks per group for chunks of ``k`` blocks (``k`` is rounded up to a multiple of it)."""
  return max(1, min(k, group_cells // cells_per_block))


def _entry_terms(lam, lo, hi):
  """Per entry ``i`` (``lam``: ``(g, rows, d)``; ``lo``, ``hi``: ``(g, m, d)``, ``m`` cells or one
  block): ``min(lam_i lo_i, lam_i hi_i)`` and ``|lam_i| max(|lo_i|, |hi_i|)``, each ``(g, rows, m, d)``."""
  lam = lam[:, :, None]
  lo, hi = lo[:, None], hi[:, None]
  return jnp.minimum(lam * lo, lam * hi), jnp.abs(lam) * jnp.maximum(jnp.abs(lo), jnp.abs(hi))


def _f_on_cells(value, lam, blk_lo, blk_hi, ends_lo, ends_hi, per):
  """Bounds of f on every cell of a group of blocks from f's linear bounds over each block.

  ``value``, ``lam`` (``(g, rows)``, ``(g, rows, d)``): lower bounds of the rows ``[+e_j; -e_j]`` of f
  over the blocks ``[blk_lo, blk_hi]`` (``(g, d)``) and their coefficients on the input, so that
  ``row . f(x) >= value + lam . x - min_block lam . y`` on a block. ``ends_lo``, ``ends_hi``: per
  entry ``i`` the ends of the block's cells along it, ``(g, per[i])``. The bound is minimised over each
  cell in closed form, one entry at a time (a cell is a product of intervals). Returns
  ``(f_lo, f_hi)``, each ``(g, n, c)`` with the cells in C order of ``per`` (last: no transposes).
  """
  g, rows, d = lam.shape
  at_cell = jnp.zeros((g, rows, *per), lam.dtype)
  mag = jnp.zeros((g, rows, *per), lam.dtype)
  for i in range(d):
    term, size = _entry_terms(lam[:, :, i:i + 1], ends_lo[i][:, :, None], ends_hi[i][:, :, None])
    shape = (g, rows, *[per[i] if j == i else 1 for j in range(d)])
    at_cell = at_cell + term.reshape(shape)
    mag = mag + size.reshape(shape)
  term, size = _entry_terms(lam, blk_lo[:, None], blk_hi[:, None])  # (g, rows, 1, d)
  at_block = jnp.sum(term[:, :, 0], axis=-1)
  mag_block = jnp.sum(size[:, :, 0], axis=-1) + jnp.abs(value)
  expand = (slice(None), slice(None)) + (None,) * d
  out = value[expand] + at_cell - at_block[expand]
  # Sums of 2d + 1 terms: the margin of 2d + 4 products covers them (Higham 2002, as fp.dot_margin).
  out = fp.round_down(out - fp.dot_margin(2 * d + 4, mag + mag_block[expand], out.dtype))
  out = out.reshape(g, rows, -1)
  n = rows // 2
  return out[:, :n], -out[:, n:]


def _differences(f_lo, f_hi, q_lo, q_hi):
  """Proven ``(lower, upper)`` of ``f - f_q`` from bounds of each (float margins included)."""
  d_lo = f_lo - q_hi
  d_hi = f_hi - q_lo
  return (fp.round_down(d_lo - fp.dot_margin(1, jnp.abs(f_lo) + jnp.abs(q_hi), d_lo.dtype)),
          fp.round_up(d_hi + fp.dot_margin(1, jnp.abs(f_hi) + jnp.abs(q_lo), d_hi.dtype)))


@functools.partial(jax.jit, static_argnames=("k", "counts", "per", "blocks_per", "group_cells", "candidates"))
def chunk_bounds(qg: G.Graph, q_err, tables, first, value, lam, blk_lo, blk_hi, *, k, counts, per, blocks_per,
                 group_cells: int = GROUP_CELLS, candidates: bool = False):
  """Every cell's bound on ``|f - f_q|`` in the ``k`` blocks from block ``first``.

  Args:
    qg: f_q's graph; ``q_err``: its a-priori rounding-error bounds
      (:func:`qbound.exact.cells.error_bounds`).
    tables: the cells' widened ends and representatives per flat input entry, ``(d, width)`` each
      (:func:`qbound.exact.cells.cell_tables`, padded).
    first: the chunk's first block (blocks past the last one repeat it).
    value, lam, blk_lo, blk_hi: f's linear bounds over the chunk's blocks and the blocks
      (:func:`qbound.exact.forms.linear_bounds`), ``k`` rows each.
    k, counts, per, blocks_per: blocks in the chunk; cells per entry; cells per block per entry;
      blocks per entry.
    group_cells: cells per group at most (whole blocks, at least one).
    candidates: also return, per group, the cell whose error looks largest (f's linear bounds'
      midpoint at the cell less f_q's value): where a reached error is worth looking for.

  Returns:
    ``(k * prod(per),)`` bounds, block by block, cells in C order of ``per``; ``inf`` where a rounding
    of f_q met a possible tie. With ``candidates``, also ``(positions, estimates)``, one per group:
    positions (in the chunk's cell order, below ``k * prod(per)``) and their estimated errors (no
    bound either way: an input there must be evaluated before its error counts).
  """
  d = len(counts)
  n_blocks = math.prod(blocks_per)
  group = group_blocks(math.prod(per), k, group_cells)
  in_shape = qg.input_shape
  err = q_err[qg.output].reshape(-1, 1)  # (n, 1): against values (g, n, c)
  lo32, hi32, rep = tables

  def one_group(args):
    j, value, lam, blk_lo, blk_hi = args
    ids = jnp.minimum(first + j * group + jnp.arange(group), n_blocks - 1)
    corner = jnp.stack(jnp.unravel_index(ids, blocks_per), -1) * jnp.asarray(per)  # (g, d)
    idx = [jnp.minimum(corner[:, i, None] + jnp.arange(per[i]), counts[i] - 1) for i in range(d)]
    ends_lo = [lo32[i, idx[i]] for i in range(d)]
    ends_hi = [hi32[i, idx[i]] for i in range(d)]
    reps = jnp.stack([jnp.broadcast_to(rep[i, idx[i]].reshape(group, *[per[i] if j == i else 1 for j in range(d)]),
                                       (group, *per)) for i in range(d)], -1)
    c = math.prod(per)
    vq, flagged = jax.vmap(lambda x: evaluate(qg, q_err, x))(reps.reshape(group * c, *in_shape))
    vq = vq.reshape(group, c, -1).transpose(0, 2, 1)  # (g, n, c): n is small, c large
    f_lo, f_hi = _f_on_cells(value, lam.reshape(group, lam.shape[1], d), blk_lo.reshape(group, d),
                             blk_hi.reshape(group, d), ends_lo, ends_hi, per)
    d_lo, d_hi = _differences(f_lo, f_hi, fp.round_down(vq - err), fp.round_up(vq + err))
    worst = jnp.where(flagged, jnp.inf, jnp.max(jnp.maximum(-d_lo, d_hi), axis=1).reshape(-1))
    if not candidates:
      return worst
    # An estimate only (where to look), so neither margins nor ties matter: past the chunk's last
    # block (padding) it is -inf.
    guess = jnp.max(jnp.abs((f_lo + f_hi) / 2 - vq), axis=1).reshape(-1)
    guess = jnp.where(j * group * c + jnp.arange(group * c) < k * c, guess, -jnp.inf)
    best = jnp.argmax(guess)
    return worst, j * group * c + best, guess[best]

  n = -(-k // group)
  pad = lambda a: jnp.concatenate([a, jnp.broadcast_to(a[-1:], (n * group - k, *a.shape[1:]))])  # noqa: E731
  split = lambda a: pad(jnp.asarray(a)).reshape(n, group, *a.shape[1:])  # noqa: E731
  out = jax.lax.map(one_group, (jnp.arange(n), split(value), split(lam), split(blk_lo), split(blk_hi)))
  if candidates:
    out, positions, guesses = out
    return out.reshape(-1)[:k * math.prod(per)], positions, guesses
  return out.reshape(-1)[:k * math.prod(per)]
