"""Local maxima of ``|f - f_q|`` by linear programs over linear regions: the lower bound of
:mod:`qbound.bounds.host_bab`.

On a paired chain of dense layers and ReLUs (:class:`~qbound.bounds.host_bounds.Chain`) every
activation pattern of f and f_q (which neurons are on) fixes a polytope of inputs, its *linear
region*, on which ``f_j - f_q,j`` is affine. Its maximum over the region and the box is a small
linear program (one constraint per neuron, ``n_in`` variables) whose optimum is a vertex, where
some neurons sit at zero: flipping one of them gives a neighbouring region that holds the same
vertex, whose program starts from it. :func:`region_ascent` climbs from region to region while the
error grows, to a local maximum of the piecewise-linear error (the linear-region programs of Croce
and Hein, "A randomized gradient-free attack on ReLU networks", GCPR 2018; crossing regions through
shared facets as GeoCert, Jordan, Lewis, Dimakis, NeurIPS 2019).

Gradient steps stop short of those vertices, where the largest errors of ReLU pairs sit (several
neurons' kinks meet there): on the exactness table's 5-12-16-16-2 pair a point at 0.9927 of the
exact value went to the exact value (1.00003 of the MILP bracket's lower end) in one program
(docs/results/exactness.md). The value returned is the chain's float64 error at a point of the box, an
error reached, never a bound.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.host_bounds import Chain
  >>> from qbound.bounds.region_ascent import region_ascent
  >>> w = np.array([[1.0, -1.0]])                          # f = relu(x0 - x1), f_q = relu(x0 - x1 - 0.25)
  >>> chain = Chain((("affine", w, np.zeros(1), w, np.array([-0.25])), ("relu",),
  ...                ("affine", np.eye(1), np.zeros(1), np.eye(1), np.zeros(1))), n_in=2, n_out=1)
  >>> x, value = region_ascent(chain, np.array([-0.5, 0.5]), np.array([-1.0, -1.0]), np.array([1.0, 1.0]),
  ...                          np.array([0]))
  >>> round(value, 6), bool(x[0] - x[1] >= 0.25)           # the error is 0.25 wherever f_q is active
  (0.25, True)
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.optimize

# A vertex's neuron counts as tight (a neighbouring region shares it) within this fraction of the
# pre-activation's magnitude: the programs' optima are exact only to HiGHS's tolerances.
TIGHT = 1e-7
# Neighbouring regions tried per step at most (the tightest neurons first).
NEIGHBOURS = 8


def _pattern_maps(chain, pattern):
  """Per net (f, then f_q), the affine maps ``(A, c)`` of every ReLU's input on the region of
  ``pattern`` (a list per net of boolean vectors, one per ReLU layer), and the outputs'
  ``(G, e)`` of ``f - f_q`` there."""
  n = chain.n_in
  pre, outs = [], []
  for net, which in enumerate((1, 3)):
    a, c, relu = np.eye(n), np.zeros(n), 0
    maps = []
    for layer in chain.layers:
      if layer[0] == "affine":
        a, c = layer[which] @ a, layer[which] @ c + layer[which + 1]
      else:
        on = pattern[net][relu]
        maps.append((a, c))
        a, c = a * on[:, None], c * on
        relu += 1
    pre.append(maps)
    outs.append((a, c))
  return pre, outs[0][0] - outs[1][0], outs[0][1] - outs[1][1]


def _pattern_at(chain, x):
  """The activation pattern of both nets at ``x`` (on: input > 0)."""
  pattern = [[], []]
  for net, which in enumerate((1, 3)):
    z = x
    for layer in chain.layers:
      if layer[0] == "affine":
        z = layer[which] @ z + layer[which + 1]
      else:
        pattern[net].append(z > 0)
        z = np.maximum(z, 0.0)
  return pattern


def _solve(chain, pattern, objective_sign, output, lo, hi):
  """The maximum of ``sign * (f - f_q)_output`` over ``pattern``'s region in the box: ``(x, maps)``
  or ``(None, maps)`` when the program fails (an empty region)."""
  pre, g, e = _pattern_maps(chain, pattern)
  rows, rhs = [], []
  for net in range(2):
    for (a, c), on in zip(pre[net], pattern[net]):
      # on: a x + c >= 0, i.e. -a x <= c; off: a x + c <= 0.
      rows.append(np.where(on[:, None], -a, a))
      rhs.append(np.where(on, c, -c))
  # (Without ReLUs the region is the whole box: no rows.)
  a_ub, b_ub = (np.concatenate(rows), np.concatenate(rhs)) if rows else (None, None)
  res = scipy.optimize.linprog(-objective_sign * g[output], A_ub=a_ub, b_ub=b_ub, bounds=list(zip(lo, hi)),
                               method="highs")
  if res.status != 0 or res.x is None:
    return None, pre
  return np.clip(res.x, lo, hi), pre


def _error(chain, x, outputs):
  """``max_j |f_j - f_q,j|`` at ``x`` in float64, its output and its sign."""
  z = zq = x
  for layer in chain.layers:
    if layer[0] == "affine":
      z, zq = layer[1] @ z + layer[2], layer[3] @ zq + layer[4]
    else:
      z, zq = np.maximum(z, 0.0), np.maximum(zq, 0.0)
  d = (z - zq)[outputs]
  j = int(np.argmax(np.abs(d)))
  return float(abs(d[j])), int(outputs[j]), float(np.sign(d[j]) or 1.0)


def region_ascent(chain, x, lo, hi, outputs, max_programs: int = 40, seen: Optional[set] = None):
  """Climbs from ``x`` through linear regions to a local maximum of ``max_j |f_j - f_q,j|`` over the
  box ``[lo, hi]`` (flat ``(n_in,)`` arrays, after ``chain.prefix``), output indices ``outputs``.

  Args:
    chain: a :class:`~qbound.bounds.host_bounds.Chain` without prefix.
    x: the starting point (in the box).
    lo, hi: the box.
    outputs: flat output indices whose error counts.
    max_programs: linear programs solved at most (about 1-4 ms each).
    seen: activation patterns already climbed from (bytes), skipped and added to.

  Returns:
    ``(point, error)``: the best point visited and its float64 error (at least ``x``'s).
  """
  lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  best_x = np.clip(np.asarray(x, np.float64), lo, hi)
  best, output, sign = _error(chain, best_x, outputs)
  pattern = _pattern_at(chain, best_x)
  programs = 0
  candidates, first = [pattern], True
  while candidates and programs < max_programs:
    moved = None
    for pattern in candidates:
      key = b"".join(np.packbits(np.concatenate(p)).tobytes() for p in pattern if p)
      if seen is not None:
        if key in seen:
          continue
        seen.add(key)
      if programs >= max_programs:
        break
      programs += 1
      y, pre = _solve(chain, pattern, sign, output, lo, hi)
      if y is None:
        continue
      value, y_output, y_sign = _error(chain, y, outputs)
      # The first region's optimum is climbed from even if it is no better than x (x may sit at a
      # vertex whose neighbours are better); after it, only gains.
      if value > best * (1 + 1e-12) or (first and moved is None and value >= best * (1 - 1e-9)):
        if value > best:
          best, best_x, output, sign = value, y, y_output, y_sign
        moved = (pattern, pre, y)
    first = False
    if moved is None:
      break
    candidates = _neighbours(*moved)
  return best_x, best


def _neighbours(pattern, pre, x):
  """The patterns of the regions beside ``pattern``'s at its vertex ``x``: one tight neuron flipped
  (the tightest first)."""
  tight = []
  for net in range(2):
    for layer, ((a, c), on) in enumerate(zip(pre[net], pattern[net])):
      z = a @ x + c
      scale = np.abs(a) @ np.abs(x) + np.abs(c) + 1e-300
      for i in np.flatnonzero(np.abs(z) <= TIGHT * scale):
        tight.append((abs(z[i]) / scale[i], net, layer, i))
  tight.sort()
  out = []
  for _, net, layer, i in tight[:NEIGHBOURS]:
    flipped = [list(p) for p in pattern]
    flipped[net][layer] = flipped[net][layer].copy()
    flipped[net][layer][i] = ~flipped[net][layer][i]
    out.append(flipped)
  return out
