"""Which open pieces branch and bound splits next, and the children it bounds for them.

The open pieces sit in a heap of tuples ``(-upper, tiebreak, lower corner, upper corner, worst
output, diff lower, diff upper, |input coefficients|, kept bounds, input splits, other splits)``
(:func:`qbound.bounds.bab.branch_and_bound`). Each function below pops the worst of them, as many as
one batch holds, and lists the children to bound: for strong branching both halves along each
candidate dimension (and, where enabled, both sides of a ReLU's or a dynamic rounding's split) of
every parent, of which branch and bound keeps the best pair once they are bounded
(:func:`qbound.bounds.splitting.strong_branching_axis`); otherwise the two halves along the
dimension that weighs most. A piece with nothing left to split (a single point) is handed to
``close`` instead.

Example:
  >>> import heapq, numpy as np
  >>> from qbound.bounds.bab_children import halves
  >>> piece = (-1.0, 0, np.zeros(2), np.array([1.0, 4.0]), 0, None, None, np.ones(2), (), 0, 0)
  >>> heap = [piece]
  >>> batch = halves(heap, batch_size=4, close=print)
  >>> [hi.tolist() for hi in batch.his]
  [[1.0, 2.0], [1.0, 4.0]]
  >>> len(heap), batch.depths
  (0, [1, 1])
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Callable, Sequence

import numpy as np

from qbound.bounds import relusplit, tiesplit
from qbound.bounds.splitting import candidate_axes, split_at, split_scores


@dataclasses.dataclass
class Children:
  """The pieces of the next batch: ``parents`` (heap items), for strong branching ``options`` (per
  parent, the splits tried: input dimensions, ReLU and tie splits; two children each, in order),
  and each child's box, prior bounds, input-split depth and count of other splits."""

  parents: list = dataclasses.field(default_factory=list)
  options: list = dataclasses.field(default_factory=list)
  los: list = dataclasses.field(default_factory=list)
  his: list = dataclasses.field(default_factory=list)
  priors: list = dataclasses.field(default_factory=list)
  depths: list = dataclasses.field(default_factory=list)
  splits: list = dataclasses.field(default_factory=list)

  def add(self, lo, hi, prior, depth: int, split_count: int) -> None:
    self.los.append(lo)
    self.his.append(hi)
    self.priors.append(prior)
    self.depths.append(depth)
    self.splits.append(split_count)


def strong_branching(heap: list, count: int, batch_size: int, close: Callable, *, relu_split: bool = False,
                     relu_depth: int = 0, relu_candidates: int = 0, paired: bool = True,
                     tie_entries: Sequence[int] = ()) -> Children:
  """The worst pieces, as many as fill a batch with both halves along each of their ``count``
  candidate dimensions (:func:`qbound.bounds.splitting.candidate_axes`), plus both sides of up to
  ``relu_candidates`` ReLU splits once a piece has ``relu_depth`` input splits (``relu_split``;
  :mod:`qbound.bounds.relusplit`) and of tie splits on the kept entries ``tie_entries``
  (:mod:`qbound.bounds.tiesplit`)."""
  out = Children()
  while heap:
    top = heap[0]
    candidates = candidate_axes(top[3] - top[2], top[7], count)
    neurons = []
    if relu_split and top[9] >= relu_depth:
      kept = top[8]
      neurons = relusplit.neuron_candidates(kept, 2 * len(kept) // 3 if paired else len(kept), relu_candidates)
    tie_splits = []
    if tie_entries and top[9] >= tiesplit.DEPTH:
      tie_splits = tiesplit.tie_candidates(top[8], tie_entries, tiesplit.CANDIDATES)
    if out.parents and len(out.los) + 2 * (len(candidates) + len(neurons) + len(tie_splits)) > batch_size:
      break  # the batch is full
    t = heapq.heappop(heap)
    if not candidates and not neurons and not tie_splits:  # a single point, nothing loose left to split
      close(t)
      continue
    out.parents.append(t)
    out.options.append(candidates + neurons + tie_splits)
    for axis in candidates:
      left_hi, right_lo = split_at(t[2], t[3], axis)
      out.add(t[2], left_hi, t[8], t[9] + 1, t[10])
      out.add(right_lo, t[3], t[8], t[9] + 1, t[10])
    for entry, neuron in neurons:
      for prior in relusplit.split(t[8], entry, neuron):
        out.add(t[2], t[3], prior, t[9], t[10] + 1)
    for entry, index, threshold in tie_splits:
      for prior in tiesplit.split(t[8], entry, index, threshold):
        out.add(t[2], t[3], prior, t[9], t[10] + 1)
  return out


def halves(heap: list, batch_size: int, close: Callable) -> Children:
  """The worst half-batch of pieces, each split in half along the dimension that weighs most in its
  bound (:func:`qbound.bounds.splitting.split_scores`); ``parents`` holds each child's parent."""
  out = Children()
  for _ in range(min(max(batch_size // 2, 1), len(heap))):
    t = heapq.heappop(heap)
    lo, hi = t[2], t[3]
    width = hi - lo
    axis = int(np.argmax(split_scores(width, t[7])))
    if width[axis] <= 0:  # a single point: nothing left to split
      close(t)
      continue
    out.parents += [t, t]
    left_hi, right_lo = split_at(lo, hi, axis)
    out.add(lo, left_hi, t[8], t[9] + 1, t[10])
    out.add(right_lo, hi, t[8], t[9] + 1, t[10])
  return out
