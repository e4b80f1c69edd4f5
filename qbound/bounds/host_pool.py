"""Open pieces of :mod:`qbound.bounds.host_bab` in preallocated arrays, their slots reused.

Branch and bound keeps every open piece's box, bounds and inherited neuron bounds (276 float64 per
piece on a 5-12-16-16-2 pair) and, each round, replaces a batch of them by their children and drops
the pieces the target closed. Rebuilding the arrays each round (``np.concatenate`` of the pieces
kept) copies all of them: with 20,000 open pieces that was 14% of the search's time on the
exactness table's 5-12-16-16-2 (docs/results/exactness.md). Here a parent's slot takes its first child, a
closed piece's slot goes on a free list, and only the new rows are written.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.host_pool import PiecePool
  >>> pool = PiecePool(dict(lo=np.zeros((1, 2)), hi=np.ones((1, 2))), np.array([3.0]))
  >>> slots = pool.add(dict(lo=np.full((2, 2), 0.5), hi=np.ones((2, 2))), np.array([1.0, 2.0]))
  >>> pool.remove(np.array([0]))
  >>> sorted(pool.bound[pool.open_slots()].tolist()), pool.count
  ([1.0, 2.0], 2)
"""

from __future__ import annotations

import numpy as np


class PiecePool:
  """Rows of named arrays (``fields``: name -> ``(k, ...)``) with a bound per row; rows are open
  or free. ``bound`` and ``fields[name]`` are indexed by slot (``open_slots()``)."""

  def __init__(self, fields: dict, bound: np.ndarray, capacity: int = 1024):
    k = len(bound)
    capacity = max(capacity, 2 * k)
    self.fields = {name: np.empty((capacity,) + a.shape[1:], a.dtype) for name, a in fields.items()}
    for name, a in fields.items():
      self.fields[name][:k] = a
    self.bound = np.full(capacity, -np.inf)
    self.bound[:k] = bound
    self.open = np.zeros(capacity, bool)
    self.open[:k] = True
    self.used = k  # slots [0, used) have been written; the free ones among them are listed
    self.free: list = []
    self.count = k

  def open_slots(self) -> np.ndarray:
    return np.flatnonzero(self.open[:self.used])

  def remove(self, slots: np.ndarray) -> None:
    """Frees ``slots`` (open ones)."""
    self.open[slots] = False
    self.bound[slots] = -np.inf
    self.free.extend(np.asarray(slots).tolist())
    self.count -= len(slots)

  def put(self, slots: np.ndarray, fields: dict, bound: np.ndarray) -> None:
    """Overwrites the open ``slots`` (a parent's slot taking its child)."""
    for name, a in fields.items():
      self.fields[name][slots] = a
    self.bound[slots] = bound

  def add(self, fields: dict, bound: np.ndarray) -> np.ndarray:
    """New open rows; returns their slots (free ones first, then new ones, growing by doubling)."""
    k = len(bound)
    reuse = min(k, len(self.free))
    slots = np.array(self.free[len(self.free) - reuse:], np.int64)
    del self.free[len(self.free) - reuse:]
    fresh = k - reuse
    if self.used + fresh > len(self.bound):
      self._grow(self.used + fresh)
    slots = np.concatenate([slots, np.arange(self.used, self.used + fresh)])
    self.used += fresh
    self.open[slots] = True
    self.count += k
    self.put(slots, fields, bound)
    return slots

  def _grow(self, need: int) -> None:
    capacity = max(need, 2 * len(self.bound))
    for name, a in self.fields.items():
      grown = np.empty((capacity,) + a.shape[1:], a.dtype)
      grown[:self.used] = a[:self.used]
      self.fields[name] = grown
    self.bound = np.concatenate([self.bound, np.full(capacity - len(self.bound), -np.inf)])
    self.open = np.concatenate([self.open, np.zeros(capacity - len(self.open), bool)])
