"""Tie splits in the NumPy search: a piece split on the value of f_q's dynamic rounding of its input.

Where f_q's first layer quantizes the input with a scale computed from it (qwix's dynamic
activation quantization of a model's input, :mod:`qbound.dynamic_rounding`), the rounding's ties
lie on surfaces no input axis follows: with qwix's ``minmax`` zero points, ``x_0 = -x_2`` for the
zero point's tie and ``x_1 = 95.5 (x_0 - x_2) / 255`` for an entry's own. A piece that straddles
one keeps that entry's whole band however small the piece gets, and
:func:`qbound.bounds.host_bab.host_branch_and_bound` stalls along the surface (the nnx MLP with
``minmax``: pieces 1e-8 wide bounded at 0.0365 where every input within 1e-4 of them reaches at
most 0.017, docs/results/quant-libraries.md). This is the NumPy counterpart of
:mod:`qbound.bounds.tiesplit`.

An entry's value is ``v = k s`` for an integer ``k``. Where a piece leaves an entry exactly two
steps ``k`` and ``k + 1`` (:func:`candidates`), the piece is split at a threshold ``theta``
between their values into two sub-problems on the same box, ``v <= theta`` and ``v >= theta``,
which cover it, as a ReLU split covers a piece with ``z >= 0`` and ``z <= 0``. Each carries its
bounds on ``v``, the search's ``values`` of the piece
(:func:`qbound.bounds.host_bounds.bound_pieces`), which :func:`qbound.dynamic_rounding.value_range`
narrows to one step's values where they admit a single ``k``; where they admit none, no input of
the piece is in that sub-problem (:func:`empty`), and it is dropped.

Example:
  >>> import numpy as np
  >>> from qbound.dynamic_rounding import DynamicScale
  >>> layer = ("dynamic", DynamicScale(127.5, -128, 127), (2,))
  >>> lo, hi = np.array([[1.0, 0.0037]]), np.array([[1.0, 0.0042]])  # x_1 / s crosses 0.5
  >>> rows, entry, theta, below, above = candidates(layer, lo, hi, *no_values(lo), np.ones((1, 2)))
  >>> int(entry[0]), bool(below[0][0, 1] <= theta[0] <= above[1][0, 1])
  (1, True)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from qbound import dynamic_rounding
from qbound.bounds.host_bounds import error_bound
from qbound.bounds.host_halves import bound_in_halves
from qbound.bounds.host_steps import step_error

# Whether the NumPy search splits pieces on its input rounding's steps, where f_q's first layer
# rounds the input with a scale computed from it.
ENABLED = True
# Only pieces small enough that every entry may take at most MAX_STEPS steps: on wider pieces an
# input split gains more (the nnx MLP with qwix's minmax, 10 s: 1.524 with tie splits on any piece
# that straddles a tie, 1.504 with at most 2 steps per entry, 1.501 with 3, 1.524 with 4, 1.516
# without tie splits; docs/results/quant-libraries.md).
MAX_STEPS = 3
# A piece is split on a tie only where its input split gained little: the geometric mean of its
# halves' gains below TIE_GAIN of the piece's bound (the minmax nnx MLP, the search alone, 10 s:
# 1.5004 / 1.4999 / 1.4997 / 1.5004 for 1, 0.1, 0.01, 0.001; 1.516 without tie splits).
TIE_GAIN = 0.01


def tie_layer(chain) -> Optional[tuple]:
  """The chain's first layer when it is a dynamic rounding of the input (tie splits apply), else None."""
  first = chain.layers[0] if chain.layers else None
  if not ENABLED or first is None or first[0] != "dynamic" or first[1].norm == "rms":
    return None  # (an rms,c layer's joint saturation term is not met with the cases' values)
  return first


def no_values(lo: np.ndarray):
  """The values of pieces not split on a tie: every entry unbounded."""
  return np.full_like(lo, -np.inf), np.full_like(lo, np.inf)


def _entries(layer, lo, hi, value_lo, value_hi):
  """Per piece and entry: the possible steps ``k`` (``k_lo``, ``k_hi``, and the scale's bounds), and
  the value's bounds ``[sl, su]`` met with the piece's own."""
  _, spec, shape = layer
  k = len(lo)
  with np.errstate(divide="ignore", invalid="ignore"):
    _, _, sl, su, _ = step_error(layer, lo, hi)
    sl, su = np.maximum(sl, value_lo), np.minimum(su, value_hi)
    k_lo, k_hi, s_lo, s_hi, known = dynamic_rounding.step_range(
        spec, lo.reshape(k, *shape), hi.reshape(k, *shape), len(shape), (sl.reshape(k, *shape), su.reshape(k, *shape)))
  flat = lambda a: np.broadcast_to(a, (k, *shape)).reshape(k, -1)  # noqa: E731
  return flat(k_lo), flat(k_hi), flat(s_lo), flat(s_hi), flat(known), sl, su


def candidates(layer, lo, hi, value_lo, value_hi, weight):
  """The pieces to split on a tie, and how.

  A piece is a candidate where some entry may take exactly two steps ``k`` and ``k + 1`` (it
  straddles one tie) and no entry more than ``MAX_STEPS``; of those entries, the one of largest
  ``weight`` (``(pieces, n_in)``, the search's split weights of the inputs, which the entries
  follow one to one). ``theta`` is the midpoint between the two steps' values at the middle of the
  piece's scale range.

  Returns:
    ``(rows, entry, theta, below, above)``: the candidates' row indices, the entry and threshold of
    each, and the two sub-problems' values (each ``(lower, upper)``, ``(len(rows), n_in)`` arrays):
    ``v <= theta`` and ``v >= theta`` on the entry, the piece's values elsewhere.
  """
  k_lo, k_hi, s_lo, s_hi, known, sl, su = _entries(layer, lo, hi, value_lo, value_hi)
  straddles = known & (k_hi == k_lo + 1)
  score = np.where(straddles, weight + 1e-300, -np.inf)
  near = (known & (k_hi - k_lo <= MAX_STEPS - 1)).all(axis=1)
  rows = np.flatnonzero(straddles.any(axis=1) & near)
  entry = np.argmax(score[rows], axis=1)
  at = (rows, entry)
  theta = (k_lo[at] + 0.5) * (s_lo[at] + s_hi[at]) / 2
  below = (sl[rows].copy(), su[rows].copy())
  above = (sl[rows].copy(), su[rows].copy())
  picked = (np.arange(len(rows)), entry)
  below[1][picked] = np.minimum(below[1][picked], theta)
  above[0][picked] = np.maximum(above[0][picked], theta)
  return rows, entry, theta, below, above


def empty(layer, lo, hi, value_lo, value_hi) -> np.ndarray:
  """Pieces whose values admit no input: some entry's bounds hold no step's value
  (:func:`qbound.dynamic_rounding.value_range`), or cross."""
  _, spec, shape = layer
  k = len(lo)
  with np.errstate(divide="ignore", invalid="ignore"):
    v_lo, v_hi = dynamic_rounding.value_range(spec, lo.reshape(k, *shape), hi.reshape(k, *shape), len(shape),
                                              (value_lo.reshape(k, *shape), value_hi.reshape(k, *shape)))
  return (v_lo > v_hi).reshape(k, -1).any(axis=1)


def split_round(chain, layer, outputs, parent_bound, p_lo, p_hi, p_vlo, p_vhi, p_dl, p_du, p_kept, smear, score,
                halves, parallel) -> int:
  """Tie splits in one round of the NumPy search: the round's pieces (``p_*``, with their bounds
  ``parent_bound`` and split weights ``smear``) that straddle a tie of ``layer``
  (:func:`candidates`) are split on it in place of their input splits (``halves``: the chosen
  children's rows and bounds, per half, changed in place) where the two cases' gains score better
  (``score``: the input splits', as the search ranks them). Cases that hold no input are closed at
  once (bound 0, bounds on ``f - f_q`` empty). Returns the number of cases bounded."""
  rows, _, _, below, above = candidates(layer, p_lo, p_hi, p_vlo, p_vhi, smear)
  # Only where the input split gained little (geometric mean of its halves' gains below
  # TIE_GAIN of the piece's bound): elsewhere it is the better split.
  stuck = -score[rows] <= (TIE_GAIN * parent_bound[rows]) ** 2
  rows, below, above = rows[stuck], tuple(a[stuck] for a in below), tuple(a[stuck] for a in above)
  if not len(rows):
    return 0
  n = p_lo.shape[1]
  t_lo, t_hi = np.repeat(p_lo[rows], 2, axis=0), np.repeat(p_hi[rows], 2, axis=0)
  t_vlo = np.stack([below[0], above[0]], axis=1).reshape(-1, n)
  t_vhi = np.stack([below[1], above[1]], axis=1).reshape(-1, n)
  tdl, tdu, _, _, tkept = bound_in_halves(chain, t_lo, t_hi, np.repeat(p_kept[rows], 2, axis=0), (t_vlo, t_vhi),
                                         parallel=parallel)
  tdl = np.maximum(tdl, np.repeat(p_dl[rows], 2, axis=0))
  tdu = np.minimum(tdu, np.repeat(p_du[rows], 2, axis=0))
  gone = empty(layer, t_lo, t_hi, t_vlo, t_vhi)
  tdl[gone], tdu[gone] = np.inf, -np.inf
  t_bound = np.where(gone, 0.0, error_bound(tdl, tdu, outputs))
  gain = np.maximum(parent_bound[rows][:, None] - t_bound.reshape(-1, 2), 0.0)
  win = -(gain[:, 0] * gain[:, 1]) - 1e-9 * (gain[:, 0] + gain[:, 1]) < score[rows]
  dst = rows[win]
  for half, (rows_new, bound) in enumerate(halves):
    src = 2 * np.flatnonzero(win) + half
    for name, values in (("lo", t_lo), ("hi", t_hi), ("dl", tdl), ("du", tdu), ("kept", tkept), ("vlo", t_vlo),
                         ("vhi", t_vhi)):
      rows_new[name][dst] = values[src]
    bound[dst] = t_bound[src]
  return len(t_lo)
