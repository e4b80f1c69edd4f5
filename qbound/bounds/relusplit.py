"""ReLU splitting for branch and bound: a piece split on the sign of one neuron's input.

Input splitting shrinks a piece's box; on ACAS Xu pieces of 1/2,000-1/8,000 of a property's box
about half of each network's ReLUs still change sign, and each such ReLU's relaxation loosens the
bound. Splitting the piece on one unstable neuron instead gives two sub-problems on the same box:
"piece and z_k >= 0" and "piece and z_k <= 0". Neither needs new bound machinery (the simplest
sound form of beta-CROWN's splits, Wang et al., NeurIPS 2021, without the beta multipliers): a
sub-problem is the piece with its bounds on z_k clamped to ``[max(l, 0), u]`` or ``[l, min(u, 0)]``,
passed to the sparse passes (:mod:`qbound.bounds.sparse`) as bounds known to hold, which then
recompute everything downstream with that ReLU exact. The two sub-problems cover the piece, so the
piece's bound is the larger of theirs; each sub-problem's children (input splits or further ReLU
splits) inherit its clamped bounds, which hold on every part of it.

For paired networks the splittable neurons are f's (``z``) and f_q's (``z_q``) ReLU inputs: fixing
the sign of either makes one side of VeryDiff's case split of ``relu(z) - relu(z_q)`` stable
(Teuber et al., TACAS 2025), and ``z = z_q + d`` often fixes the other.

A sub-problem can be empty (no input of the piece gives z_k that sign). In the default float-sound
mode every bound is a proven enclosure on the sub-problem, so an empty interval at any node proves
it empty (:func:`infeasible`); branch and bound then drops it.

Which neurons: those whose triangle relaxation gives away most, ``-l u / (u - l)`` (the largest gap
between ReLU and its upper line; the intercept term of BaBSR, Bunel et al., JMLR 2020), a few of
them tried by strong branching beside the input dimensions (a filtered form of FSB, De Palma et
al., 2021): branch and bound bounds both sub-problems of each candidate and keeps the best split.

Example:
  >>> import numpy as np
  >>> kept = ((np.array([-1.0, 0.5]), np.array([2.0, 1.0])),)
  >>> neuron_candidates(kept, 1, 2)
  [(0, 0)]
  >>> active, inactive = split(kept, 0, 0)
  >>> active[0][0].tolist(), inactive[0][1].tolist()
  ([0.0, 0.5], [0.0, 1.0])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def relaxation_gap(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
  """``-l u / (u - l)`` where ``l < 0 < u`` (the triangle relaxation's largest gap), else 0."""
  lower = np.asarray(lower, np.float64)
  upper = np.asarray(upper, np.float64)
  unstable = (lower < 0) & (upper > 0)
  width = np.where(unstable, upper - lower, 1.0)
  return np.where(unstable, -lower * upper / width, 0.0)


def neuron_candidates(kept: Sequence, splittable: int, count: int) -> list[tuple[int, int]]:
  """The ``count`` unstable neurons whose relaxation gives away most (:func:`relaxation_gap`).

  Args:
    kept: one piece's bounds, ``(lower, upper)`` per entry (branch and bound's kept nodes: for
      paired networks f's ReLU inputs, then f_q's, then the differences').
    splittable: how many leading entries hold neurons that may be split (the differences' may not).
    count: at most this many.

  Returns:
    ``(entry, flat neuron index)`` pairs, largest gap first; only neurons with a positive gap.
  """
  scored = []
  for entry in range(min(splittable, len(kept))):
    lower, upper = kept[entry]
    gap = relaxation_gap(lower, upper).reshape(-1)
    if not gap.size:
      continue
    top = np.argsort(-gap, kind="stable")[:count]
    scored += [(float(gap[k]), entry, int(k)) for k in top if gap[k] > 0]
  scored.sort(key=lambda s: -s[0])
  return [(entry, k) for _, entry, k in scored[:count]]


def clamp(kept: Sequence, entry: int, neuron: int, active: bool, threshold: float = 0.0) -> tuple:
  """``kept`` with one neuron's bounds restricted to one side of ``threshold`` (0: its sign):
  ``[max(l, t), u]`` if ``active``, else ``[l, min(u, t)]``. Copies only the entry it changes."""
  lower, upper = kept[entry]
  shape = np.shape(lower)
  lower = np.array(lower, copy=True).reshape(-1)
  upper = np.array(upper, copy=True).reshape(-1)
  if active:
    lower[neuron] = max(lower[neuron], threshold)
  else:
    upper[neuron] = min(upper[neuron], threshold)
  out = list(kept)
  out[entry] = (lower.reshape(shape), upper.reshape(shape))
  return tuple(out)


def split(kept: Sequence, entry: int, neuron: int) -> tuple[tuple, tuple]:
  """The two sub-problems' bounds: ``(z >= 0, z <= 0)`` at ``kept[entry]``'s ``neuron``."""
  return clamp(kept, entry, neuron, True), clamp(kept, entry, neuron, False)


def infeasible(kept: Sequence, *more) -> bool:
  """Whether one piece's bounds prove its sub-problem empty: ``lower > upper`` at some entry of
  ``kept`` or of the further ``(lower, upper)`` pairs ``more``.

  Valid only for bounds with proven rounding margins (``sound=True``): each is then an enclosure
  of the true values over the sub-problem, which an empty interval cannot be unless there are none.
  """
  for lower, upper in list(kept) + list(more):
    with np.errstate(invalid="ignore"):
      if np.any(np.asarray(lower) > np.asarray(upper)):
        return True
  return False
