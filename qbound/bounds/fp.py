"""Outward rounding: margins that keep float32 bound computations sound.

Bound propagation runs in the graph's float dtype (float32 by default, the only wide type TPUs
have). Every float operation may round, and XLA on CPU flushes subnormal results to zero, so a
bound computed naively can sit a few units in the last place on the wrong side of the truth. The
*sound mode* used by default widens each computed bound by a proven margin from the standard model
of floating-point arithmetic (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
2002, sections 2.2 and 3.1): with unit roundoff ``u`` (2**-24 for float32), a sum of ``n``
products computed in ANY order, with or without fused multiply-adds, has absolute error at most
``gamma(n) * sum_i |a_i b_i|`` with ``gamma(n) = n u / (1 - n u)``. To that qbound adds ``n`` times
the smallest normal number for flushed subnormals, and a factor 1.01 that covers the rounding of
the margin's own computation (whose relative error is at most ``gamma(n)``, far below 1% while
``n u < 1e-3``, which :func:`gamma` checks).

What the guarantee is: a sound-mode bound holds for the *real-arithmetic* value of the network
whose weights are exactly the float values given. Matrix products run at ``Precision.HIGHEST`` so
that no backend silently computes them in bfloat16 or TF32.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

SLACK = 1.01


def unit_roundoff(dtype) -> float:
  return float(np.finfo(np.dtype(dtype)).eps) / 2


def gamma(n: int, dtype) -> float:
  """``n u / (1 - n u)``: the relative error bound of a length-``n`` dot product."""
  u = unit_roundoff(dtype)
  nu = n * u
  if nu >= 1e-3:
    raise ValueError(f"a sum of {n} terms in {np.dtype(dtype).name} is too long for qbound's rounding "
                     "margins (n * u must stay below 1e-3); compute in float64 (jax_enable_x64).")
  return nu / (1 - nu)


def tiny(dtype) -> float:
  """The smallest normal number: the most a flushed subnormal result can lose."""
  return float(np.finfo(np.dtype(dtype)).tiny)


def round_down(x):
  """A float strictly below ``x`` by at least one unit in the last place (and by a normal number at 0)."""
  dtype = jnp.result_type(x)
  return x - (jnp.abs(x) * (4 * unit_roundoff(dtype)) + 16 * tiny(dtype))


def round_up(x):
  dtype = jnp.result_type(x)
  return x + (jnp.abs(x) * (4 * unit_roundoff(dtype)) + 16 * tiny(dtype))


def unsound_order(bounds):
  """``(min(lower, upper), max(lower, upper))``: for bounds computed without margins only, whose
  intersections can cross by rounding; sound ones never cross, and the guards report it if they do."""
  lo, hi = bounds
  return jnp.minimum(lo, hi), jnp.maximum(lo, hi)


def dot_margin(n: int, magnitude, dtype):
  """The proven error bound of a sum of ``n`` products whose absolute values add up to ``magnitude``."""
  return margin_coefficient(n, dtype) * magnitude + margin_floor(n, dtype)


def margin_coefficient(n: int, dtype) -> float:
  """:func:`dot_margin`'s factor on the magnitude. Being linear in it, the margins of several sums
  can be added up term by term and summed once (the SLACK covers that sum's own rounding too)."""
  return SLACK * gamma(n + 2, dtype)


def margin_floor(n: int, dtype) -> float:
  """:func:`dot_margin`'s constant: flushed subnormals, at most one per rounding."""
  return (n + 2) * tiny(dtype)


def pairwise_sum(x):
  """Row sums of a ``(rows, n)`` array by pairwise (tree) summation in a fixed order.

  Each term passes through at most ``ceil(log2 n)`` additions, so the error is at most
  ``gamma(ceil(log2 n)) * sum |x|`` (Higham 2002, section 4.2) instead of ``gamma(n - 1)`` for an
  unknown order: much smaller margins for the long sums of bound propagation.

  The tree adds the upper half of the row onto the lower half, level by level (contiguous slices),
  after folding the entries beyond the largest power of two below ``n`` onto the first ones: the
  tree of the row padded with zeros to a power of two (``x + 0`` is exact), without the pad.
  Interleaved halves (``x[:, 0::2] + x[:, 1::2]``) after a pad, as before, cost 13-26% more CPU
  per branch-and-bound batch on ACAS Xu, where these sums of 50 terms are a third of the work
  (docs/results/acas-batch.md).
  """
  x = x.reshape(x.shape[0], -1)
  n = x.shape[1]
  if n <= 1:
    return x[:, 0] if n == 1 else jnp.zeros(x.shape[0], x.dtype)
  half = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
  if n > half:  # fold the tail: entry half + k goes onto entry k (one addition, as against a zero pad's)
    x = jnp.concatenate([x[:, :n - half] + x[:, half:], x[:, n - half:half]], axis=1)
  while x.shape[1] > 1:
    half = x.shape[1] // 2
    x = x[:, :half] + x[:, half:]
  return x[:, 0]


def margin_sum(x):
  """Row sums of a ``(rows, n)`` array of NONNEGATIVE terms: rounding margins and magnitudes.

  Summed in any order their relative error is at most ``gamma(n - 1)`` (Higham 2002, section 4.2),
  nothing cancels, and a margin only needs to come out no smaller than it should: :data:`SLACK`
  (1%) covers that error while ``n u <= 1e-3``, so such rows are summed by XLA's own reduction,
  about 5x faster than :func:`pairwise_sum` (0.12 against 0.66 ms for 1000 rows of 561 on CPU).
  Longer rows are summed pairwise, whose ``gamma(log2 n)`` always stays below it. Sums whose
  terms have both signs (the bounds' values) must use :func:`pairwise_sum`.
  """
  x = x.reshape(x.shape[0], -1)
  if x.shape[1] * unit_roundoff(x.dtype) > 1e-3:
    return pairwise_sum(x)
  return jnp.sum(x, axis=1)


def pairwise_terms(n: int) -> int:
  """The number of roundings a product term of a pairwise sum of ``n`` products goes through."""
  return max(n - 1, 0).bit_length() + 1


# XLA's float32 tanh and logistic are polynomial or rational approximations, not correctly rounded
# (nor does IEEE 754 require them to be). Measured against float64 on 6 million points of
# [-20, 20] (jax 0.10.2, CPU): at most 4.4 ulps (tanh) and 2.5 ulps (logistic), i.e. below
# 5 u |y|. qbound assumes a generous 64 u |y| (plus 64 times the smallest normal number for
# flushed subnormals): thirteen times the measured error, room for other backends' versions
# (CUDA's tanhf and expf are documented within 2 ulps). A backend with a coarser tanh (e.g. an
# approximate hardware instruction, about 2^-11 relative) needs a larger value here.
TRANSCENDENTAL_ULPS = 64


def transcendental_error(y):
  """A bound on ``|fl(phi(x)) - phi(x)|`` for a computed ``y = fl(phi(x))``, phi = tanh or logistic."""
  dtype = jnp.result_type(y)
  return TRANSCENDENTAL_ULPS * (unit_roundoff(dtype) * jnp.abs(y) + tiny(dtype))
