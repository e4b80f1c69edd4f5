"""Bounds of a node from its backward rows, a block of rows at a time.

A node of ``n`` neurons is bounded by ``2 n`` rows (``+e_i`` for lower bounds, ``-e_i`` for upper
ones) carried back to the input. Rows are independent, so they can go a block at a time: a
``lax.map`` over blocks whose rows are built inside the loop, never as one ``2n x n`` identity.
:mod:`qbound.memory` chooses the block size from a memory budget.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound._arrays import namespace

# Nodes of at least this many rows go in two blocks or more (see qbound.memory.default_row_chunk).
MIN_BLOCKED_ROWS = 64


def node_bounds_by_rows(lower_fn: Callable, n: int, shape, dtype, row_chunk: Optional[int] = None):
  """Elementwise ``(lower, upper)`` of a node from row lower bounds, ``row_chunk`` rows at a time.

  Args:
    lower_fn: ``rows (m, *shape) -> (m,)`` lower bounds of ``rows[k] . z`` (e.g.
      :func:`qbound.bounds.crown.backward_lower` with everything else bound).
    n: the node's size; rows ``+e_i`` give lower bounds, rows ``-e_i`` upper bounds.
    shape: the node's shape.
    dtype: the rows' dtype.
    row_chunk: rows per block (``lax.map`` over blocks), at most half the rows from
      :data:`MIN_BLOCKED_ROWS` rows up; None: all rows at once, without a loop.

  Returns:
    ``(lower, upper)`` arrays of ``shape``.
  """
  total = 2 * n
  if row_chunk is None:
    eye = jnp.eye(n, dtype=dtype)
    rows = jax.lax.optimization_barrier(jnp.concatenate([eye, -eye]))
    low = lower_fn(rows.reshape((total, *shape)))
  else:
    # A node of many rows always takes two blocks or more: with one, XLA unrolls the loop into the
    # straight-line code that default_row_chunk avoids.
    most = total if total < MIN_BLOCKED_ROWS else -(-total // 2)
    row_chunk = min(max(int(row_chunk), 1), most)
    blocks = -(-total // row_chunk)
    # The last block repeats the last row; its extra results are dropped below.
    ids = jnp.minimum(jnp.arange(blocks * row_chunk), total - 1).reshape(blocks, row_chunk)

    def block(idx):
      sign = jnp.where(idx < n, 1, -1).astype(dtype)
      rows = jax.nn.one_hot(idx % n, n, dtype=dtype) * sign[:, None]
      return lower_fn(rows.reshape((row_chunk, *shape)))

    low = jax.lax.map(block, ids).reshape(-1)[:total]
  return low[:n].reshape(shape), -low[n:].reshape(shape)


def first_set_entries(where, size: int):
  """Each box's first ``size`` set entries of ``where`` (boxes, n) in order, padded with its last
  one (entry 0 where it has none): the neurons whose rows a sparse pass computes, ``(boxes, size)``
  int32, and each box's count of set entries. NumPy arrays in, NumPy out (host); JAX arrays, JAX
  (traceable: :func:`qbound.bounds.fused.row_indices`). Padding repeats a real neuron's row, whose
  bound, scattered again, changes nothing."""
  xp = namespace(where)
  counts = where.sum(axis=1)
  order = (np.argsort(~where, axis=1, kind="stable") if xp is np else jnp.argsort(~where, axis=1, stable=True))
  order = order[:, :size]
  last = order[xp.arange(where.shape[0]), xp.clip(counts - 1, 0, size - 1)]
  flat = xp.where(xp.arange(size)[None, :] < counts[:, None], order, last[:, None]).astype(xp.int32)
  return flat, counts
