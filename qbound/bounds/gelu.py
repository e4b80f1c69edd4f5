"""GELU's tanh form as one smooth curve: its value, slope, float error models and shape.

``jax.nn.gelu(x)`` (``approximate=True``, the default) is ``x s(x)`` with ``s = (1 + tanh(v)) / 2``,
``v = sqrt(2 / pi) (x + 0.044715 x^3)`` (Hendrycks & Gimpel, "Gaussian Error Linear Units", 2016).
Bounded as one curve (:data:`qbound.bounds.nonlinear.CURVES`), concave / convex / concave with one
minimum, as CROWN for transformers relaxes it (Shi et al., ICLR 2020; auto_LiRPA, Xu et al.,
NeurIPS 2020), rather than as a cube, a tanh and a product whose relaxations multiply widths.

Example:
  >>> from qbound.bounds import gelu
  >>> round(gelu.GELU_INFLECTION, 4), round(gelu.GELU_ARGMIN, 5)
  (1.4185, -0.75246)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qbound.bounds import fp


def _bisect(fn, lo, hi, steps: int = 60):
  """A root of the increasing float64 function ``fn`` in ``[lo, hi]`` (host side, at import)."""
  for _ in range(steps):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if fn(mid) < 0 else (lo, mid)
  return (lo + hi) / 2


# GELU, tanh form (jax.nn.gelu's default): f(x) = x s(x), s = (1 + tanh(v)) / 2 = sigmoid(2 v),
# v = C (x + A x^3). f'' changes sign only at +-1.4185 (concave outside, convex between; checked on
# a float64 grid of [-40, 40] with the stable form below); f' = s + 2 x s (1 - s) v' vanishes only
# at -0.75247, the minimum -0.17004 (Hendrycks & Gimpel, "Gaussian Error Linear Units", 2016).
GELU_C, GELU_A = math.sqrt(2 / math.pi), 0.044715


def _gelu64(x):
  v = GELU_C * (x + GELU_A * x ** 3)
  return x / (1 + math.exp(-2 * v))


def _gelu_deriv64(x):
  v = GELU_C * (x + GELU_A * x ** 3)
  s = 1 / (1 + math.exp(-2 * v))
  return s + 2 * x * s * (1 - s) * GELU_C * (1 + 3 * GELU_A * x * x)


def _gelu_second64(x, h=1e-6):
  return (_gelu_deriv64(x + h) - _gelu_deriv64(x - h)) / (2 * h)


GELU_INFLECTION = _bisect(lambda x: -_gelu_second64(x), 0.5, 3.0)
GELU_ARGMIN = _bisect(_gelu_deriv64, -3.0, 0.0)
# float64 value to ~1e-16; 1e-7 below it, so that it stays below when cast to float32 (ulp 1.5e-8).
GELU_MIN = _gelu64(GELU_ARGMIN) - 1e-7


def gelu(x):
  return jax.nn.gelu(x, approximate=True)


def gelu_deriv(x):
  # Beyond |x| = 20 the float slope is exactly 0 or 1 (tanh is +-1), as at +-20: clipping keeps
  # x^3 from overflowing into 0 * inf.
  x = jnp.clip(x, -20, 20)
  t = jnp.tanh(GELU_C * (x + GELU_A * x ** 3))
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * (GELU_C * (1 + 3 * GELU_A * x * x))


def gelu_deriv_error(x, d):
  # Measured: at most 3.4 u (1 + |x| (1 + 3 A x^2)) (1 - t^2 loses its digits as t nears +-1).
  x = jnp.minimum(jnp.abs(x), 20)
  u, tiny = fp.unit_roundoff(jnp.result_type(d)), fp.tiny(jnp.result_type(d))
  return 16 * u * (1 + x * (1 + 3 * GELU_A * x * x)) + 64 * tiny


def gelu_value_error(x, y):
  """``|computed - exact| <= 16 u (|x| + |y|) + 16 tiny`` (measured at most 2.5 u (|x| + |y|) on 4
  million float32 points against float64, jax 0.10.2 CPU; relative error is unbounded in the left
  tail, where ``1 + tanh`` cancels)."""
  u, tiny = fp.unit_roundoff(jnp.result_type(y)), fp.tiny(jnp.result_type(y))
  return 16 * u * (jnp.abs(x) + jnp.abs(y)) + 16 * tiny
