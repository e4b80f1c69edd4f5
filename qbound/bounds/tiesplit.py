"""Splitting a branch-and-bound piece on a dynamic rounding's step: the analogue of ReLU splits for ties.

A dynamically scaled fake quantization (:mod:`qbound.dynamic_rounding`) is discontinuous where an
entry's quotient ``x / s + z`` meets a rounding tie, and with scales and zero points computed from
the input those ties lie on surfaces no input axis follows (``x_0 = -x_3`` for a ``minmax`` zero
point's tie, ``x_1 = 95.5 (x_0 - x_3) / 255`` for an entry's own). A piece that straddles one
never gets that entry on one step, however small it is: the entry keeps its whole band, and
branch and bound stalls along the surface (the nnx MLP with qwix's ``minmax``,
``docs/results/quant-libraries.md``).

The value of such an entry is ``v = k s`` for an integer ``k``. Splitting the piece at a threshold
``theta`` of ``v`` gives two sub-problems on the same box, ``v <= theta`` and ``v >= theta``,
which cover it (as a ReLU split covers a piece with ``z >= 0`` and ``z <= 0``,
:mod:`qbound.bounds.relusplit`). Each carries its clamped bounds on ``v`` as a prior, which the
sparse passes hand to the node's relaxation: there ``v`` is narrowed to one step's values where
the bounds admit a single integer ``k`` (:func:`qbound.dynamic_rounding.value_range`), and the
entry's error ``v - x`` is read from them as well as from its band
(:func:`qbound.bounds.relax.dynamic_error`); where they admit none, the sub-problem's bounds come
out empty and it is dropped. With ``theta`` between two steps' values, each sub-problem holds one
step. Float-sound bounds only: without margins a prior may miss the value by more than the slack.

Example:
  >>> import numpy as np
  >>> kept = ((np.array([0.0, 0.74]), np.array([0.0, 0.76])),)
  >>> tie_candidates(kept, [0], 1)
  [(0, 1, 0.75)]
  >>> below, above = split(kept, 0, 1, 0.75)
  >>> float(below[0][1][1]) >= 0.75 >= float(above[0][0][1])
  True
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from qbound import graph as G
from qbound.bounds import relusplit

# Whether branch_and_bound's strong branching also tries splits on dynamic roundings' steps
# (branch_and_bound's ``tie_split=None``), how many entries per piece, and after how many input
# splits of the piece.
ENABLED = True
CANDIDATES = 2
DEPTH = 24
# By default only in branch and bound runs of at least this many seconds: on the qwix MLPs with
# dynamic scales, tie splits lowered the nnx minmax row's bound after 30 and 60 s (0.03649 and
# 0.03632 against 0.03696 and 0.03690) and changed nothing in the default 10 s, where the first
# call's bound came out 1-3.5% looser on the dynamic rows (their sub-problems' programs compile
# during the call): docs/results/quant-libraries.md.
MIN_BUDGET = 20.0
# A node's step is taken as ``max|v| / MIN_STEPS`` (int8: 127 steps a side at most), and an entry's
# value range over more than ``MIN_SPAN`` of it as one that may hold two steps' values.
MIN_STEPS = 127.0
MIN_SPAN = 0.25


def applies(node: G.Node) -> bool:
  """Whether ``node`` is a dynamic rounding whose value bounds can pin its step (not ``rms``: its
  relaxation reads other joint bounds)."""
  return (G.is_dynamic_rounding(node) and node.attrs[1].norm != "rms")


def tie_candidates(kept: Sequence, entries: Sequence[int], count: int) -> list[tuple[int, int, float]]:
  """Up to ``count`` splits ``(entry, flat index, threshold)`` of one piece: the widest value ranges
  of the earliest rounding that has any, then of the next.

  Args:
    kept: the piece's bounds, ``(lower, upper)`` per kept entry (branch and bound's priors).
    entries: which kept entries are the values of dynamic roundings (:func:`applies`) of f_q, in
      the order of the network.
    count: at most this many.

  A range is measured in steps of its node, ``s`` about ``max|v| / 127``; one over a quarter of a
  step may hold two steps' values. Earlier roundings come first: their loose entries loosen every
  later layer. The threshold is the range's midpoint: between the two steps' values when it spans
  one tie.
  """
  chosen: list = []
  for entry in entries:
    lower, upper = (np.asarray(a, np.float64).reshape(-1) for a in kept[entry])
    scale = max(float(np.max(np.abs(lower), initial=0.0)), float(np.max(np.abs(upper), initial=0.0)))
    if not lower.size or not np.isfinite(scale) or scale <= 0:
      continue
    steps = np.where(np.isfinite(upper - lower), (upper - lower) / (scale / MIN_STEPS), 0.0)
    for k in np.argsort(-steps, kind="stable")[:count - len(chosen)]:
      if steps[k] > MIN_SPAN:
        chosen.append((entry, int(k), float((lower[k] + upper[k]) / 2)))
    if len(chosen) >= count:
      break
  return chosen


def split(kept: Sequence, entry: int, index: int, threshold: float) -> tuple[tuple, tuple]:
  """The two sub-problems' bounds: ``v <= threshold`` and ``v >= threshold`` at ``kept[entry]``'s
  entry ``index`` (flat), clamped as a ReLU split clamps (:func:`qbound.bounds.relusplit.clamp`)."""
  dtype = np.asarray(kept[entry][0]).dtype
  # The threshold as a float of the bounds' dtype, a step outward on each side so both cover it.
  theta = np.asarray(threshold, dtype)
  return (relusplit.clamp(kept, entry, index, False, np.nextafter(theta, np.inf, dtype=dtype)),
          relusplit.clamp(kept, entry, index, True, np.nextafter(theta, -np.inf, dtype=dtype)))
