"""Linear relaxations of activations: lines below and above the function over an interval.

A relaxation of ``y = act(x)`` on ``[lo, hi]`` is a pair of lines with
``lower_slope * x + lower_offset <= act(x) <= upper_slope * x + upper_offset`` for every ``x`` in
the interval, elementwise. In sound mode the offsets are rounded outward so the inequality holds
for the float slopes actually used.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from qbound.bounds import fp


class Relaxation(NamedTuple):
  lower_slope: jnp.ndarray
  lower_offset: jnp.ndarray
  upper_slope: jnp.ndarray
  upper_offset: jnp.ndarray


def relu_default_alpha(lo, hi):
  """CROWN's adaptive lower slope: 1 where the interval is mostly positive, else 0."""
  return (hi >= -lo).astype(lo.dtype)


def relu(lo, hi, alpha=None, *, sound: bool = True) -> Relaxation:
  """The triangle relaxation of ReLU on ``[lo, hi]``.

  Stable neurons are exact (slope 1 if ``lo >= 0``, 0 if ``hi <= 0``). For unstable ones the upper
  line is the chord through ``(lo, 0)`` and ``(hi, hi)``; the lower line is ``alpha * x`` with
  ``alpha`` in [0, 1] (CROWN's adaptive choice when not given). Reference: Ehlers 2017; Wong &
  Kolter, ICML 2018; Zhang et al., NeurIPS 2018.
  """
  dtype = lo.dtype
  active = lo >= 0
  inactive = hi <= 0
  unstable = ~(active | inactive)
  width = jnp.where(unstable, hi - lo, 1)
  chord = jnp.where(unstable, hi / width, 0)
  offset = -chord * lo
  if sound:
    # Valid for the float chord used: above relu at both ends (relu is convex, so in between too).
    at_hi = hi - chord * hi
    u = fp.unit_roundoff(dtype)
    slack = 2 * u * (jnp.abs(chord * lo) + jnp.abs(hi) + jnp.abs(chord * hi)) + fp.tiny(dtype)
    offset = jnp.maximum(offset, at_hi) + slack
  upper_slope = jnp.where(active, 1, chord).astype(dtype)
  upper_offset = jnp.where(unstable, offset, 0).astype(dtype)
  if alpha is None:
    alpha = relu_default_alpha(lo, hi)
  alpha = jnp.clip(alpha, 0, 1).astype(dtype)
  lower_slope = jnp.where(active, 1, jnp.where(inactive, 0, alpha)).astype(dtype)
  return Relaxation(lower_slope, jnp.zeros_like(lo), upper_slope, upper_offset)
