"""Large errors of a chain whose f_q rounds, found in NumPy without gradients: nothing to compile.

Where f_q rounds its activations (static or dynamic scales, :class:`~qbound.bounds.host_bounds.Chain`'s
``round`` and ``dynamic`` layers) ``f - f_q`` is a staircase: its gradient is zero on the treads
and says nothing about the jumps, so the NumPy search's gradient steps stop on the first tread.
:func:`staircase_search` is :mod:`qbound.attack`'s derivative-free search (``STAIRCASE``: uniform
samples and random vertices of the box, then an elitist random local search whose radius shrinks
geometrically, after Rastrigin, Automation and Remote Control 24, 1963, and Schumer and Steiglitz,
IEEE TAC 13(3), 1968) on the chain's float64 evaluation, batched in NumPy: 0.1-0.3 s a run on a
4-16-16-2 MLP, where the compiled search first compiles for seconds.

Its values are the chain's own float64 evaluation. On a rounding tie (a dynamic scale puts each
group's largest entry on one, ``x / s = +-Q``) NumPy's quotient and XLA's may round apart, so the
caller evaluates the points it keeps again as it evaluates every witness, and several of them.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.host_bounds import Chain
  >>> from qbound.bounds.host_staircase import staircase_search
  >>> w = np.array([[1.0, 1.0]])
  >>> chain = Chain((("affine", 3 * np.eye(2), np.zeros(2), 3 * np.eye(2), np.zeros(2)), ("round", "nearest"),
  ...                ("affine", w / 3, np.zeros(1), w / 3, np.zeros(1))), n_in=2, n_out=1)
  >>> values, xs = staircase_search(chain, -np.ones(2), np.ones(2), np.arange(1), np.random.default_rng(0))
  >>> bool(0.3 < values[0] <= 1 / 3), xs.shape  # two rounding errors of at most 1/6 each
  (True, (16, 2))
"""

from __future__ import annotations

import numpy as np

from qbound.attack import STAIRCASE, Search
from qbound.bounds.host_bounds import evaluate


def staircase_search(chain, lower: np.ndarray, upper: np.ndarray, outputs: np.ndarray, rng: np.random.Generator,
                     search: Search = STAIRCASE, keep: int = 16):
  """The ``keep`` largest errors ``max_j |f_j - f_q,j|`` (``j`` in ``outputs``) that a run of the
  search reaches over the box ``[lower, upper]`` (flat, after the chain's prefix), with their inputs.

  Returns:
    ``(values, xs)``: ``(keep,)`` values, largest first, and ``(keep, n_in)`` inputs.
  """
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  width = upper - lower

  def objective(xs):
    with np.errstate(invalid="ignore"):  # (an overflow's NaN ranks last)
      values = np.abs(evaluate(chain, xs))[:, outputs].max(axis=1)
    return np.where(np.isnan(values), -np.inf, values)

  n = lower.size
  vertices = np.where(rng.uniform(size=(max(search.samples // 4, 1), n)) < 0.5, lower, upper)
  xs = np.concatenate([lower + rng.uniform(size=(search.samples, n)) * width, vertices, ((lower + upper) / 2)[None]])
  values = objective(xs)
  points = min(search.refine_points, len(xs))
  best = np.argsort(-values)[:points]
  xs, values = xs[best], values[best]
  rounds = search.refine_rounds
  shrink = 1e-4 ** (1.0 / max(rounds - 1, 1))  # to the first radius * 1e-4 in the last round
  for k in range(rounds):
    # Each kept point moved refine_tries times, a random half of its coordinates within the radius.
    step = rng.uniform(-1.0, 1.0, (points, search.refine_tries, n))
    step = np.where(rng.uniform(size=step.shape) < 0.5, step, 0.0)
    tries = np.clip(xs[:, None] + search.refine_radius * shrink ** k * step * width, lower, upper).reshape(-1, n)
    every_x, every_v = np.concatenate([xs, tries]), np.concatenate([values, objective(tries)])
    best = np.argsort(-every_v, kind="stable")[:points]
    xs, values = every_x[best], every_v[best]
  return values[:keep], xs[:keep]
