"""Which open pieces branch and bound splits next, and the children it bounds for them.

The open pieces sit in a heap of :class:`OpenPiece` (:func:`qbound.bounds.bab.branch_and_bound`),
worst bound first. Each function below pops the worst of them, as many as
one batch holds, and lists the children to bound: for strong branching both halves along each
candidate dimension (and, where enabled, both sides of a ReLU's or a dynamic rounding's split) of
every parent, of which branch and bound keeps the best pair once they are bounded
(:func:`qbound.bounds.splitting.strong_branching_axis`); otherwise the two halves along the
dimension that weighs most. A piece with nothing left to split (a single point) is handed to
``close`` instead.

Example:
  >>> import heapq, numpy as np
  >>> from qbound.bounds.bab_children import BoundedPiece, halves
  >>> piece = BoundedPiece(1.0, np.zeros(2), np.array([1.0, 4.0]), 0, None, None, np.ones(2), (), 0, 0)
  >>> heap = [piece.open(tiebreak=0)]
  >>> batch = halves(heap, batch_size=4, close=print)
  >>> [hi.tolist() for hi in batch.his]
  [[1.0, 2.0], [1.0, 4.0]]
  >>> len(heap), batch.depths
  (0, [1, 1])
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from qbound.bounds import relusplit, tiesplit
from qbound.bounds.splitting import candidate_axes, split_at, split_scores


class BoundedPiece(NamedTuple):
  """A piece of the input box with its bounds, as a batch returns it.

  Attributes:
    bound: the proven bound on ``max |f_j - f_q,j|`` over the piece (the outputs that count).
    lo, hi: the piece's corners, flat.
    worst: the output whose bound that is.
    diff_lower, diff_upper: per-output bounds on ``f - f_q`` over the piece.
    sensitivity: the worst output's bound's ``|input coefficients|`` (where to split).
    kept: the bounds of the nodes its children start from (their parent's).
    depth: the input splits that made it.
    splits: the ReLU and tie splits that made it (a sub-problem of its box when non-zero).
  """

  bound: float
  lo: np.ndarray
  hi: np.ndarray
  worst: int
  diff_lower: Any
  diff_upper: Any
  sensitivity: np.ndarray
  kept: tuple
  depth: int
  splits: int

  @property
  def empty(self) -> bool:
    """A sub-problem (a ReLU or tie split's) that holds no input: its bounds came out empty."""
    return bool(self.splits) and bool(np.all(self.diff_lower == np.inf))

  def open(self, tiebreak: int) -> "OpenPiece":
    """The heap's item for this piece."""
    return OpenPiece(-self.bound, tiebreak, self)


class OpenPiece(NamedTuple):
  """An open piece in branch and bound's heap: its :class:`BoundedPiece` ordered by its bound,
  largest first (``neg_bound``), then by when it was pushed (``tiebreak``, never equal, so the
  pieces themselves are never compared)."""

  neg_bound: float
  tiebreak: int
  piece: BoundedPiece


@dataclasses.dataclass
class Children:
  """The pieces of the next batch: ``parents`` (:class:`BoundedPiece`), for strong branching ``options`` (per
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


def strong_branching(heap: list[OpenPiece], count: int, batch_size: int, close: Callable, *, relu_split: bool = False,
                     relu_depth: int = 0, relu_candidates: int = 0, paired: bool = True,
                     tie_entries: Sequence[int] = ()) -> Children:
  """The worst pieces, as many as fill a batch with both halves along each of their ``count``
  candidate dimensions (:func:`qbound.bounds.splitting.candidate_axes`), plus both sides of up to
  ``relu_candidates`` ReLU splits once a piece has ``relu_depth`` input splits (``relu_split``;
  :mod:`qbound.bounds.relusplit`) and of tie splits on the kept entries ``tie_entries``
  (:mod:`qbound.bounds.tiesplit`)."""
  out = Children()
  while heap:
    top = heap[0].piece
    candidates = candidate_axes(top.hi - top.lo, top.sensitivity, count)
    neurons = []
    if relu_split and top.depth >= relu_depth:
      kept = top.kept
      neurons = relusplit.neuron_candidates(kept, 2 * len(kept) // 3 if paired else len(kept), relu_candidates)
    tie_splits = []
    if tie_entries and top.depth >= tiesplit.DEPTH:
      tie_splits = tiesplit.tie_candidates(top.kept, tie_entries, tiesplit.CANDIDATES)
    if out.parents and len(out.los) + 2 * (len(candidates) + len(neurons) + len(tie_splits)) > batch_size:
      break  # the batch is full
    t = heapq.heappop(heap).piece
    if not candidates and not neurons and not tie_splits:  # a single point, nothing loose left to split
      close(t)
      continue
    out.parents.append(t)
    out.options.append(candidates + neurons + tie_splits)
    for axis in candidates:
      left_hi, right_lo = split_at(t.lo, t.hi, axis)
      out.add(t.lo, left_hi, t.kept, t.depth + 1, t.splits)
      out.add(right_lo, t.hi, t.kept, t.depth + 1, t.splits)
    for entry, neuron in neurons:
      for prior in relusplit.split(t.kept, entry, neuron):
        out.add(t.lo, t.hi, prior, t.depth, t.splits + 1)
    for entry, index, threshold in tie_splits:
      for prior in tiesplit.split(t.kept, entry, index, threshold):
        out.add(t.lo, t.hi, prior, t.depth, t.splits + 1)
  return out


def halves(heap: list[OpenPiece], batch_size: int, close: Callable) -> Children:
  """The worst half-batch of pieces, each split in half along the dimension that weighs most in its
  bound (:func:`qbound.bounds.splitting.split_scores`); ``parents`` holds each child's parent."""
  out = Children()
  for _ in range(min(max(batch_size // 2, 1), len(heap))):
    t = heapq.heappop(heap).piece
    lo, hi = t.lo, t.hi
    width = hi - lo
    axis = int(np.argmax(split_scores(width, t.sensitivity)))
    if width[axis] <= 0:  # a single point: nothing left to split
      close(t)
      continue
    out.parents += [t, t]
    left_hi, right_lo = split_at(lo, hi, axis)
    out.add(lo, left_hi, t.kept, t.depth + 1, t.splits)
    out.add(right_lo, hi, t.kept, t.depth + 1, t.splits)
  return out


def grid(heap: list[OpenPiece], count: int, splits: int, close: Callable) -> Children:
  """The ``count`` worst pieces, each cut in ``2 ** splits`` cells: halved along each of its ``splits``
  dimensions that weigh most in its bound (:func:`qbound.bounds.splitting.candidate_axes`), every
  cell kept; ``parents`` holds each child's parent."""
  out = Children()
  for _ in range(min(count, len(heap))):
    t = heapq.heappop(heap).piece
    axes = candidate_axes(t.hi - t.lo, t.sensitivity, splits)
    if not axes:  # a single point: nothing left to split
      close(t)
      continue
    cells = [(t.lo, t.hi)]
    for axis in axes:
      cells = [half for lo, hi in cells for half in _halves(lo, hi, axis)]
    for lo, hi in cells:
      out.parents.append(t)
      out.add(lo, hi, t.kept, t.depth + len(axes), t.splits)
  return out


def _halves(lo, hi, axis) -> tuple:
  """The two halves ``((lo, hi'), (lo', hi))`` of a box split at its midpoint along ``axis``."""
  left_hi, right_lo = split_at(lo, hi, axis)
  return (lo, left_hi), (right_lo, hi)
