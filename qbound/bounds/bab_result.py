"""What branch and bound returns (:class:`BabResult`) and when it stops (:func:`stop_reason`).

Example:
  >>> from qbound.bounds.bab_result import settled_level, stop_reason
  >>> stop_reason(0.04, 0.001, epsilon=0.05, target_gap=0.05, past_budget=False, stop=None, too_many=False)
  'proved'
  >>> settled_level(0.02, None, 0.5)  # without an epsilon, pieces within the gap of the error reached
  0.03
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class BabResult:
  """The outcome of branch and bound.

  Attributes:
    upper: proven bound on the maximal error over the box (selected outputs): the largest bound of
      any piece, open or finished.
    lower: the largest error reached (at ``witness``), float32 evaluation of the merged graph.
    witness: the input reaching ``lower``.
    diff_lower, diff_upper: per-output proven bounds on ``f - f_q`` (over all remaining pieces).
    pieces_bounded: how many pieces were bounded.
    pieces_left: pieces still open when it stopped.
    stopped: why it stopped: ``"gap"``, ``"time"``, ``"proved"``, ``"refuted"``, ``"exhausted"``,
      ``"max_pieces"`` or ``"stop"``.
    seconds: wall-clock time.
    layout: ``{device id: pieces}`` of one bounded batch: how the frontier was split over the
      devices (see :mod:`qbound.sharding`).
    root_lower, root_upper: the per-output bounds on ``f - f_q`` over the whole box (the first
      batch: differential bounds for paired networks, CROWN otherwise), before any split.
  """

  upper: float
  lower: float
  witness: np.ndarray
  diff_lower: np.ndarray
  diff_upper: np.ndarray
  pieces_bounded: int
  pieces_left: int
  stopped: str
  seconds: float
  layout: Optional[dict] = None
  root_lower: Optional[np.ndarray] = None
  root_upper: Optional[np.ndarray] = None


def settled_level(lower: float, epsilon: Optional[float], target_gap: float) -> float:
  """The bound at or below which an open piece needs no more splitting: the search stops once its
  worst piece is there (:func:`stop_reason`: epsilon proved, or the gap closed)."""
  level = -np.inf if epsilon is None else float(epsilon)
  return max(level, (1 + target_gap) * lower) if lower > 0 else level


def stop_reason(upper: float, lower: float, *, epsilon: Optional[float], target_gap: float, past_budget: bool,
                stop, too_many: bool) -> Optional[str]:
  """Why branch and bound stops with the proven ``upper`` and the reached ``lower``, or None to go on
  (in this order: epsilon proved or refuted, the gap closed, the time budget spent, ``stop()``, too
  many open pieces)."""
  if epsilon is not None and upper <= epsilon:
    return "proved"
  if epsilon is not None and lower > epsilon:
    return "refuted"
  if lower > 0 and upper <= (1 + target_gap) * lower:
    return "gap"
  if past_budget:
    return "time"
  if stop is not None and stop():
    return "stop"
  if too_many:
    return "max_pieces"
  return None
