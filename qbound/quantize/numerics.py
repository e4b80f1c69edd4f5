"""Number formats: array -> array functions that put values on a grid.

This module knows nothing about pytrees, layers or paths; it defines what each
format *is*. Choosing the scale of a layer (calibration) lives in
`qbound.quantize.weights`, choosing which parameters to touch in
`qbound.quantize.policy`. Every function here is plain `jnp` code, works under
`jax.jit`, computes in at least float32 and returns the input's dtype.

Formats and their exact semantics:

* Uniform integer grid (Jacob et al., CVPR 2018, "Quantization and Training of
  Neural Networks for Efficient Integer-Arithmetic-Only Inference")::

      q  = clip(round(x / s) + z, qmin, qmax)     integer code
      x' = (q - z) * s                            dequantized value

  symmetric: z = 0, qmax = 2^(b-1) - 1, qmin = -qmax (the code -2^(b-1) is
  unused so the grid is symmetric about zero); asymmetric: qmin = 0,
  qmax = 2^b - 1 and an integer zero point z.

* Dynamic fixed point (Qiu et al., FPGA 2016, "Going Deeper with Embedded FPGA
  Platform for Convolutional Neural Network"): a b-bit two's complement integer
  with `frac_bits` fractional bits, i.e. the uniform grid with s = 2^-frac_bits::

      q  = clip(round(x * 2^fl), -2^(b-1), 2^(b-1) - 1);   x' = q * 2^-fl

* Power of two (Miyashita et al. 2016, "Convolutional Neural Networks using
  Logarithmic Data Representation"; Zhou et al., ICLR 2017, INQ)::

      x' = sign(x) * 2^clip(round(log2|x|), e_max - n + 1, e_max),  n = 2^(b-1) - 1

  one bit for the sign and b - 1 bits for the exponent, one exponent code
  reserved for zero. |x| < 2^(e_min - 1) (nearer to 0 than to 2^e_min) becomes 0.

* IEEE-like floats float16, bfloat16, float8_e4m3fn and float8_e5m2 (Micikevicius
  et al. 2022, "FP8 Formats for Deep Learning") with saturation: values beyond
  the format's largest finite number are clipped to it before the cast, which
  rounds to nearest, ties to even. A plain cast would turn them into NaN (e4m3fn
  has no infinity) or inf (e5m2, float16, bfloat16).

Rounding modes (`ROUNDING_MODES`), for the integer and fixed-point grids:

* ``'nearest'``: round to nearest, ties to even (`jnp.round`); error <= s/2.
* ``'floor'``: round toward -inf; error < s, always x' <= x.
* ``'stochastic'``: floor(x / s + u), u ~ U[0, 1) drawn from an explicit `key`
  (Gupta et al., ICML 2015, "Deep Learning with Limited Numerical Precision");
  unbiased, E[x'] = x, error < s.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

ROUNDING_MODES = ('nearest', 'floor', 'stochastic')

# Names accepted by `cast_float`; 'float8_e4m3' is the finite-only e4m3fn
# variant (max 448, no inf), the one used by NVIDIA Hopper and OCP FP8.
FLOAT_FORMATS = types.MappingProxyType({
    'float16': np.dtype(np.float16),
    'bfloat16': np.dtype(ml_dtypes.bfloat16),
    'float8_e4m3': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e4m3fn': np.dtype(ml_dtypes.float8_e4m3fn),
    'float8_e5m2': np.dtype(ml_dtypes.float8_e5m2),
})

# float32 holds every integer up to 2^24 exactly, so integer codes stay exact.
MAX_INT_BITS = 24


def check_bits(bits, *, minimum: int, maximum: int = MAX_INT_BITS, what: str = 'bits', why: str = '') -> int:
  """Returns `bits` as an int, or raises a `ValueError` saying what is allowed (and `why`, when given)."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise ValueError(f'{what} must be an integer, got {bits!r}.')
  bits = int(bits)
  if not minimum <= bits <= maximum:
    hint = ''
    if minimum == 2 and bits < 2:
      hint = ' For 1-bit or ternary weights use `binary`, `ternary` or `trained_ternary`.'
    raise ValueError(f'{what} must be between {minimum} and {maximum}{why}, got {bits}.{hint}')
  return bits


def check_rounding(rounding: str, key) -> None:
  """Raises a `ValueError` for an unknown mode or a key that does not fit it."""
  if rounding not in ROUNDING_MODES:
    raise ValueError(f'unknown rounding {rounding!r}; choose one of {ROUNDING_MODES}.')
  if rounding == 'stochastic' and key is None:
    raise ValueError("rounding='stochastic' needs an explicit PRNG `key`.")
  if rounding != 'stochastic' and key is not None:
    raise ValueError(f"a `key` is only used with rounding='stochastic', not {rounding!r}.")


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype arithmetic is done in: at least float32 (float64 stays float64).

  Spelled out rather than via `jnp.promote_types`, which refuses bfloat16 with
  float32 under strict dtype promotion.
  """
  dtype = np.dtype(dtype)
  if dtype.itemsize >= 4:
    return jax.dtypes.canonicalize_dtype(dtype)
  return np.dtype(np.float32)


def round_to_int(x: jax.Array, rounding: str = 'nearest', key=None) -> jax.Array:
  """Rounds to integers (still a float array) with one of `ROUNDING_MODES`.

  Args:
    x: float array.
    rounding: 'nearest' (ties to even), 'floor' or 'stochastic'.
    key: PRNG key, required for (and only for) 'stochastic'.

  Returns:
    An array of x's shape and dtype holding integer values.

  >>> import jax.numpy as jnp
  >>> round_to_int(jnp.array([0.5, 1.5, -0.5, 2.7])).tolist()
  [0.0, 2.0, -0.0, 3.0]
  >>> round_to_int(jnp.array([2.7, -2.2]), 'floor').tolist()
  [2.0, -3.0]
  """
  check_rounding(rounding, key)
  if rounding == 'nearest':
    return jnp.round(x)
  if rounding == 'floor':
    return jnp.floor(x)
  noise = jax.random.uniform(key, x.shape, dtype=compute_dtype(x.dtype))
  return jnp.floor(x.astype(noise.dtype) + noise).astype(x.dtype)


def int_range(bits: int, symmetric: bool = True) -> tuple[int, int]:
  """(qmin, qmax) of the b-bit integer code.

  >>> int_range(8), int_range(8, symmetric=False)
  ((-127, 127), (0, 255))
  """
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax
  return 0, 2**bits - 1


def quantize_int(
    x: jax.Array,
    scale,
    zero_point=0,
    *,
    qmin: int,
    qmax: int,
    rounding: str = 'nearest',
    key=None,
) -> jax.Array:
  """Fake-quantizes onto the uniform grid: x' = (clip(round(x/s) + z, qmin, qmax) - z) * s.

  Args:
    x: float array.
    scale: step size s > 0, broadcastable to x (a scalar or one per channel).
    zero_point: integer offset z, broadcastable to x.
    qmin: smallest integer code.
    qmax: largest integer code.
    rounding: one of `ROUNDING_MODES`.
    key: PRNG key for stochastic rounding.

  Returns:
    x' with x's shape and dtype.

  >>> import jax.numpy as jnp
  >>> quantize_int(jnp.array([0.26, -1.0, 9.0]), 0.5, qmin=-7, qmax=7).tolist()
  [0.5, -1.0, 3.5]
  """
  dt = compute_dtype(x.dtype)
  s = jnp.asarray(scale, dt)
  z = jnp.asarray(zero_point, dt)
  q = jnp.clip(round_to_int(x.astype(dt) / s, rounding, key) + z, qmin, qmax)
  return ((q - z) * s).astype(x.dtype)


def fixed_point_frac_bits(max_abs, bits: int) -> jax.Array:
  """Fractional length of dynamic fixed point, chosen so nothing overflows.

  The largest integer fl with max_abs * 2^fl <= 2^(b-1) - 1: as many fractional
  bits as the dynamic range allows (Qiu et al., FPGA 2016, pick the fractional
  length per layer from the range of its weights). Can be negative (large
  weights) or exceed `bits` (tiny weights). For max_abs == 0 it is b - 1.

  >>> int(fixed_point_frac_bits(0.9, 8)), int(fixed_point_frac_bits(3.0, 8))
  (7, 5)
  """
  m = jnp.asarray(max_abs, jnp.float32)
  qmax = 2.0 ** (bits - 1) - 1
  safe = jnp.where(m > 0, m, 1.0)
  fl = jnp.floor(jnp.log2(qmax / safe)).astype(jnp.int32)
  # log2 is inexact near powers of two; nudge fl to the exact answer.
  fl = jnp.where(jnp.ldexp(safe, fl) > qmax, fl - 1, fl)
  fl = jnp.where(jnp.ldexp(safe, fl + 1) <= qmax, fl + 1, fl)
  return jnp.where(m > 0, fl, bits - 1)


def quantize_fixed_point(
    x: jax.Array, bits: int, frac_bits, *, rounding: str = 'nearest', key=None
) -> jax.Array:
  """x' = clip(round(x * 2^fl), -2^(b-1), 2^(b-1) - 1) * 2^-fl (two's complement).

  Scaling by a power of two is exact, so x' is exactly on the grid.

  >>> import jax.numpy as jnp
  >>> quantize_fixed_point(jnp.array([0.3, -2.0]), 4, 2).tolist()
  [0.25, -2.0]
  """
  dt = compute_dtype(x.dtype)
  fl = jnp.asarray(frac_bits, jnp.int32)
  q = round_to_int(jnp.ldexp(x.astype(dt), fl), rounding, key)
  q = jnp.clip(q, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  return jnp.ldexp(q, -fl).astype(x.dtype)


def quantize_power_of_two(x: jax.Array, bits: int, max_exponent) -> jax.Array:
  """x' = sign(x) * 2^e with e = clip(round(log2|x|), e_max - n + 1, e_max).

  n = 2^(b-1) - 1 exponents (one sign bit; one exponent code stands for zero).
  Rounding is in the log domain: to the exponent nearest log2|x| (ties to even).
  Magnitudes below 2^(e_min - 1), closer to 0 than to the smallest power,
  become 0; zeros stay zero.

  >>> import jax.numpy as jnp
  >>> quantize_power_of_two(jnp.array([0.3, -1.0, 0.0, 0.01, 5.0]), 3, 0).tolist()
  [0.25, -1.0, 0.0, 0.0, 1.0]
  """
  dt = compute_dtype(x.dtype)
  xf = x.astype(dt)
  a = jnp.abs(xf)
  e_max = jnp.asarray(max_exponent, jnp.int32)
  e_min = e_max - (2 ** (bits - 1) - 2)
  e = jnp.round(jnp.log2(jnp.where(a > 0, a, 1.0))).astype(jnp.int32)
  e = jnp.clip(e, e_min, e_max)
  out = jnp.sign(xf) * jnp.ldexp(jnp.ones_like(xf), e)
  keep = a >= jnp.ldexp(jnp.ones_like(xf), e_min - 1)
  return jnp.where(keep, out, jnp.zeros_like(xf)).astype(x.dtype)


def float_dtype(name: str) -> np.dtype:
  """The numpy dtype of a format name in `FLOAT_FORMATS`; `ValueError` otherwise."""
  try:
    return FLOAT_FORMATS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'unknown float format {name!r}; choose one of {sorted(FLOAT_FORMATS)}.'
    ) from None


def cast_float(x: jax.Array, name: str) -> jax.Array:
  """Rounds x to the float format `name` with saturation, back in x's dtype.

  x' = cast(clip(x, -max, max)), max the format's largest finite value, cast
  rounding to nearest, ties to even. If x's own dtype cannot hold every value
  of the format (e.g. a bfloat16 input cast to 'float16') the way back rounds
  once more.

  >>> import jax.numpy as jnp
  >>> cast_float(jnp.array([1000.0, -1e9, 0.1]), 'float8_e4m3').tolist()
  [448.0, -448.0, 0.1015625]
  """
  target = float_dtype(name)
  limit = float(ml_dtypes.finfo(target).max)
  dt = compute_dtype(x.dtype)
  return jnp.clip(x.astype(dt), -limit, limit).astype(target).astype(x.dtype)
