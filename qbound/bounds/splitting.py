"""Where branch and bound splits a piece of the input box: scores, candidates and the kept split.

A piece's bound is the minimum over the piece of a linear function of the input, so
``|coefficient_i| * width_i`` is what dimension ``i``'s width costs it: ReluVal's smear (Wang et al.,
USENIX Security 2018), VeryDiff's generator influence (Teuber et al., TACAS 2025). Strong branching
bounds both halves along a few of the dimensions that weigh most and keeps the split whose children
gain most together (the product rule of MIP solvers; Achterberg, "Constraint Integer
Programming", 2007, section 5.3). On paired ReLU chains the coefficients are by default replaced by
an interval gradient's largest magnitude over the piece (NeuroDiff's split; Paulsen et al., ASE
2020; ``qbound.bounds.bab._gradient_coefficients``): the scores here read either.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.splitting import candidate_axes, split_at
  >>> candidate_axes(np.array([1.0, 0.5, 0.0]), np.array([1.0, 4.0, 9.0]), count=2)
  [1, 0]
  >>> left_hi, right_lo = split_at(np.zeros(2), np.ones(2), 1)
  >>> left_hi.tolist(), right_lo.tolist()
  ([1.0, 0.5], [0.0, 0.5])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def split_scores(width: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
  """How much each input dimension weighs in a piece's bound: ``|coefficient| * width`` (what the
  bound's minimum over the piece loses to that dimension's width; ReluVal's smear, VeryDiff's
  generator influence), -1 for dimensions of width 0. A tiny share of the width breaks ties, so
  that a dimension the bound ignores is still split once the others are."""
  score = (sensitivity + 1e-9 * (sensitivity.max(initial=0.0) + 1e-30)) * width
  return np.where(width > 0, score, -1.0)


def candidate_axes(width: np.ndarray, sensitivity: np.ndarray, count: int = 3) -> list:
  """The dimensions worth trying to split: positive width, the ``count`` that weigh most in the
  bound (:func:`split_scores`)."""
  score = split_scores(width, sensitivity)
  axes = np.argsort(-score, kind="stable")[:count]
  return [int(a) for a in axes if score[a] >= 0]


def strong_branching_axis(parent: float, children: Sequence[tuple]) -> int:
  """Which of the tried splits to keep: the largest product of the two children's improvements.

  Ranking splits by the worse child alone (minimax) stalls: when the worst region sits in one
  corner, every split leaves one child nearly as bad as the parent. The product of both children's
  gains (each at least a small floor) is the score MIP solvers use for strong branching
  (Achterberg, "Constraint Integer Programming", 2007, section 5.3).
  """
  floor = 1e-6 * max(abs(parent), 1e-30)
  return int(np.argmax([max(parent - a, floor) * max(parent - b, floor) for a, b in children]))


def split_at(lo, hi, axis):
  """Upper corner of the left half and lower corner of the right half, split at the midpoint."""
  mid = np.float32((lo[axis] + hi[axis]) / 2)
  left_hi, right_lo = hi.copy(), lo.copy()
  left_hi[axis] = mid
  right_lo[axis] = mid
  return left_hi, right_lo
