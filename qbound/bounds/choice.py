"""Choosing, entry by entry, the tightest of several sound relaxations, keeping each one whole.

A relaxation is a NamedTuple of arrays (slopes and offsets of a lower and an upper line), and
each candidate holds on its own. A choice must therefore take every field of an entry from the same
candidate: a slope of one line with the offset of another is no bound at all. Written as one
``where(gap_a < gap_b, a, b)`` per field, it is not: XLA fuses each field's select with its own
copy of the comparison, and copies compiled differently can disagree near ties (at backend
optimisation level 0 the differential GELU relaxation's lower line took its slopes from one
candidate and its offset from another; tests/test_nonlinear_diff.py). :func:`least_gap` makes the
choice once, as an index from one reduction (``argmin``), which XLA does not duplicate into its
consumers, and every field is selected by that same index.

Example:
  >>> import jax.numpy as jnp
  >>> from qbound.bounds.choice import least_gap
  >>> from qbound.bounds.relax import Relaxation
  >>> wide = Relaxation(jnp.array([0.0, 0.0]), jnp.array([-1.0, -1.0]), jnp.array([0.0, 0.0]), jnp.array([1.0, 1.0]))
  >>> slim = Relaxation(jnp.array([1.0, 1.0]), jnp.array([0.0, 0.0]), jnp.array([1.0, 1.0]), jnp.array([0.5, 9.0]))
  >>> least_gap((wide, slim), (jnp.array([2.0, 2.0]), jnp.array([0.5, 9.0]))).upper_offset.tolist()
  [0.5, 1.0]
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import jax
import jax.numpy as jnp

R = TypeVar("R")


def finite(relaxation) -> jnp.ndarray:
  """Per entry, whether every field of ``relaxation`` is finite."""
  out = None
  for v in relaxation:
    ok = jnp.isfinite(v)
    out = ok if out is None else out & ok
  return out


def least_gap(candidates: Sequence[R], gaps: Sequence[jnp.ndarray]) -> R:
  """Per entry, the candidate of least gap, every field taken from it; ties go to the earlier one.

  Args:
    candidates: sound relaxations of the same quantity (NamedTuples of arrays of one shape).
    gaps: one array per candidate, its looseness per entry (smaller is tighter). A candidate whose
      gap or any field is not finite never wins over a finite one; the first wins if none is.

  Returns:
    A relaxation of the candidates' type.
  """
  gap = jnp.stack(jnp.broadcast_arrays(*[jnp.where(finite(c) & jnp.isfinite(g), g, jnp.inf)
                                         for c, g in zip(candidates, gaps)]))
  index = jax.lax.stop_gradient(jnp.argmin(gap, axis=0))
  out = candidates[0]
  for k, candidate in enumerate(candidates[1:], start=1):
    take = index == k
    out = type(out)(*[jnp.where(take, a, b) for a, b in zip(candidate, out)])
  return out
