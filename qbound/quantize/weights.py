"""Weight quantizers on a grid: uniform integer, dynamic fixed point, power of two, float.

Each scheme comes as a factory capturing its hyper-parameters and returning a
pure transform ``params -> params`` (composable with `chain`, `masked` and
`by_path`), plus a convenience function applying it once. The grid of each
format is defined in `qbound.quantize.numerics`; this module calibrates it to a
parameter (picks the scale, fractional length or exponent range from the
weights) and maps it over a pytree.

All transforms return a new pytree of the same structure whose selected float
leaves keep their dtype and lie on the scheme's grid; unselected and non-float
leaves are returned as they are. They work under `jax.jit` (the NaN/inf check on
the inputs then is skipped). By default (``where=None``) every parameter is
quantized: kernels *and* biases (and normalisation scales); pass
``where=kernels_only`` to keep biases in full precision. Batch-norm statistics
and other non-parameter state are never touched (see `qbound.quantize.policy`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qbound.quantize import numerics
from qbound.quantize.policy import (
    PyTree,
    Selection,
    Transform,
    Where,
    as_predicate,
    leaf_key,
    map_selected,
    path_of,
    path_str,
)


def _calibration_axes(x: jax.Array, per_channel: bool):
  """Axes to reduce over for the scale: all but the last (output channel) axis of a kernel."""
  if per_channel and x.ndim >= 2:
    return tuple(range(x.ndim - 1))
  return None


def uniform_quantizer(
    bits: int = 8,
    *,
    per_channel: bool = False,
    symmetric: bool = True,
    rounding: str = 'nearest',
    key: jax.Array | None = None,
    where: Where = None,
    calibrate_on: PyTree | None = None,
) -> Transform:
  """Uniform integer quantization with max-abs (or min-max) calibration.

  Jacob et al., CVPR 2018, "Quantization and Training of Neural Networks for
  Efficient Integer-Arithmetic-Only Inference". Per parameter (or per output
  channel), with the grid of `numerics.quantize_int`:

  * symmetric: s = max|x| / qmax, z = 0, qmax = 2^(b-1) - 1, qmin = -qmax;
  * asymmetric: the range [min(x, 0), max(x, 0)] is split into 2^b - 1 steps,
    s = (max - min) / (2^b - 1), z = -round(min / s), codes in [0, 2^b - 1].

  The calibrated range always covers the weights, so with round-to-nearest the
  error is at most s/2 per element. An all-zero tensor gets s = 1 and stays 0.

  Args:
    bits: bit width b, 2 to 24.
    per_channel: one scale per output channel (the last axis) of each parameter
      with two or more dimensions (Krishnamoorthi 2018, "Quantizing deep
      convolutional networks for efficient inference"); 1-D parameters such as
      biases get one scale.
    symmetric: symmetric grid (z = 0) or asymmetric with a zero point.
    rounding: 'nearest' (ties to even), 'floor' or 'stochastic'.
    key: PRNG key for stochastic rounding; each parameter draws from a key
      folded in from its path.
    where: which parameters to quantize (see `qbound.quantize.policy`).
    calibrate_on: parameters (with the same paths) whose ranges fix the grid once, instead of
      recalibrating on every call; values outside the range are clipped to its ends. For
      retraining: with a recalibrated scale the largest weight moves every other weight's grid,
      which the straight-through gradient does not see.

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> fixed = uniform_quantizer(bits=3, calibrate_on={'w': jnp.array([1.5, 0.3])})  # s = 1.5 / 3
  >>> fixed({'w': jnp.array([0.2, 3.0])})['w'].tolist()
  [0.0, 1.5]
  >>> q3 = uniform_quantizer(bits=3)
  >>> q3({'kernel': jnp.array([[0.6, -1.5], [0.2, 0.9]])})['kernel'].tolist()
  [[0.5, -1.5], [0.0, 1.0]]
  """
  bits = numerics.check_bits(bits, minimum=2)
  numerics.check_rounding(rounding, key)
  qmin, qmax = numerics.int_range(bits, symmetric)
  predicate = as_predicate(where)
  reference = None
  if calibrate_on is not None:
    reference = {path_of(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(calibrate_on)[0]}

  def quantize_leaf(path, x):
    xf = x.astype(numerics.compute_dtype(x.dtype))
    if reference is not None:
      if path not in reference or jnp.shape(reference[path]) != jnp.shape(x):
        raise ValueError(f'calibrate_on has no parameter {path_str(path)!r} of shape {jnp.shape(x)}; pass '
                         'parameters with the tree structure of the ones quantized.')
      xf = jnp.asarray(reference[path]).astype(xf.dtype)
    axes = _calibration_axes(xf, per_channel)
    if symmetric:
      scale = jnp.max(jnp.abs(xf), axis=axes, keepdims=True) / qmax
      zero_point = jnp.zeros_like(scale)
    else:
      lo = jnp.minimum(jnp.min(xf, axis=axes, keepdims=True), 0.0)
      hi = jnp.maximum(jnp.max(xf, axis=axes, keepdims=True), 0.0)
      scale = (hi - lo) / (qmax - qmin)
    # A zero range (all-zero tensor, or one that underflows) would divide by 0.
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    if not symmetric:
      zero_point = qmin - jnp.round(lo / scale)
    k = None if key is None else leaf_key(key, path)
    return numerics.quantize_int(x, scale, zero_point, qmin=qmin, qmax=qmax, rounding=rounding, key=k)

  return lambda params: map_selected(quantize_leaf, params, predicate)


def uniform(
    params: PyTree,
    bits: int = 8,
    *,
    per_channel: bool = False,
    symmetric: bool = True,
    rounding: str = 'nearest',
    key: jax.Array | None = None,
    where: Where = None,
) -> PyTree:
  """Uniform integer quantization of `params`; see `uniform_quantizer`.

  >>> import jax.numpy as jnp
  >>> w = {'kernel': jnp.array([[1.0, 0.1], [-0.7, 2.0]])}
  >>> uniform(w, bits=2, per_channel=True)['kernel'].tolist()
  [[1.0, 0.0], [-1.0, 2.0]]
  """
  return uniform_quantizer(
      bits, per_channel=per_channel, symmetric=symmetric, rounding=rounding, key=key, where=where
  )(params)


@dataclasses.dataclass(frozen=True)
class FixedPointFormat:
  """A dynamic fixed-point format: b-bit two's complement with `frac_bits` fractional bits.

  Values are q * 2^-frac_bits, q in [-2^(b-1), 2^(b-1) - 1]. `int_bits` =
  bits - frac_bits counts the sign bit; either part may be negative (e.g.
  frac_bits > bits for tiny weights, whose leading bits are all zero).
  """

  bits: int
  frac_bits: int

  @property
  def int_bits(self) -> int:
    return self.bits - self.frac_bits

  @property
  def step(self) -> float:
    """Grid spacing 2^-frac_bits."""
    return 2.0**-self.frac_bits

  @property
  def max_value(self) -> float:
    """Largest representable value (2^(b-1) - 1) * 2^-frac_bits."""
    return (2 ** (self.bits - 1) - 1) * self.step


def _fixed_point_frac_bits(x: jax.Array, bits: int) -> jax.Array:
  return numerics.fixed_point_frac_bits(jnp.max(jnp.abs(x.astype(jnp.float32))), bits)


def fixed_point_quantizer(
    bits: int = 8, *, rounding: str = 'nearest', key: jax.Array | None = None, where: Where = None
) -> Transform:
  """Dynamic fixed point with a per-parameter fractional length.

  Qiu et al., FPGA 2016, "Going Deeper with Embedded FPGA Platform for
  Convolutional Neural Network": each layer's weights share a bit width but get
  their own fractional length. Here every parameter tensor (kernel, bias) gets
  the largest fractional length fl at which its largest magnitude still fits,
  max|x| * 2^fl <= 2^(b-1) - 1, so nothing overflows; then
  x' = round(x * 2^fl) * 2^-fl. `fixed_point_formats` reports the chosen formats.

  Args:
    bits: total bit width including the sign bit, 2 to 24.
    rounding: 'nearest' (ties to even), 'floor' or 'stochastic'.
    key: PRNG key for stochastic rounding.
    where: which parameters to quantize.

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> fixed_point_quantizer(bits=4)({'kernel': jnp.array([0.3, -0.7])})['kernel'].tolist()
  [0.25, -0.75]
  """
  bits = numerics.check_bits(bits, minimum=2)
  numerics.check_rounding(rounding, key)
  predicate = as_predicate(where)

  def quantize_leaf(path, x):
    k = None if key is None else leaf_key(key, path)
    return numerics.quantize_fixed_point(x, bits, _fixed_point_frac_bits(x, bits), rounding=rounding, key=k)

  return lambda params: map_selected(quantize_leaf, params, predicate)


def fixed_point(
    params: PyTree, bits: int = 8, *, rounding: str = 'nearest', key: jax.Array | None = None, where: Where = None
) -> PyTree:
  """Dynamic fixed-point quantization of `params`; see `fixed_point_quantizer`.

  >>> import jax.numpy as jnp
  >>> fixed_point({'bias': jnp.array([3.3, 0.1])}, bits=6)['bias'].tolist()
  [3.25, 0.125]
  """
  return fixed_point_quantizer(bits, rounding=rounding, key=key, where=where)(params)


def fixed_point_formats(params: PyTree, bits: int = 8, *, where: Where = None) -> dict[str, FixedPointFormat]:
  """The format `fixed_point` picks for each parameter, keyed by '/'-joined path.

  Not jit-able (it returns Python ints).

  >>> import jax.numpy as jnp
  >>> fmt = fixed_point_formats({'w': jnp.array([3.3, 0.1])}, bits=6)['w']
  >>> fmt.int_bits, fmt.frac_bits, fmt.step
  (3, 3, 0.125)
  """
  bits = numerics.check_bits(bits, minimum=2)
  sel = Selection(params, where)
  return {
      path_str(p): FixedPointFormat(bits, int(_fixed_point_frac_bits(x, bits))) for p, x in sel.selected
  }


def power_of_two_quantizer(bits: int = 4, *, where: Where = None) -> Transform:
  """Logarithmic quantization: every weight becomes 0 or +-2^e.

  Miyashita, Lee & Murmann 2016, "Convolutional Neural Networks using
  Logarithmic Data Representation"; the exponent window as in Zhou et al.,
  ICLR 2017, "Incremental Network Quantization". One sign bit and b - 1 bits of
  exponent code, one code meaning zero: n = 2^(b-1) - 1 exponents
  e_max - n + 1 .. e_max per parameter, with e_max = round(log2 max|x|). Each
  weight goes to 2^round(log2|x|) clipped to the window; magnitudes below
  2^(e_min - 1) become 0, zeros stay zero. See `numerics.quantize_power_of_two`.

  Args:
    bits: bit width b, 2 to 8.
    where: which parameters to quantize.

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> power_of_two_quantizer(bits=3)({'kernel': jnp.array([1.0, -0.3, 0.05, 0.0])})['kernel'].tolist()
  [1.0, -0.25, 0.0, 0.0]
  """
  bits = numerics.check_bits(bits, minimum=2, maximum=8)
  predicate = as_predicate(where)

  def quantize_leaf(path, x):
    m = jnp.max(jnp.abs(x.astype(jnp.float32)))
    e_max = jnp.round(jnp.log2(jnp.where(m > 0, m, 1.0))).astype(jnp.int32)
    return numerics.quantize_power_of_two(x, bits, e_max)

  return lambda params: map_selected(quantize_leaf, params, predicate)


def power_of_two(params: PyTree, bits: int = 4, *, where: Where = None) -> PyTree:
  """Power-of-two quantization of `params`; see `power_of_two_quantizer`.

  >>> import jax.numpy as jnp
  >>> power_of_two({'w': jnp.array([3.0, 0.7])}, bits=2)['w'].tolist()
  [4.0, 0.0]
  """
  return power_of_two_quantizer(bits, where=where)(params)


def float_quantizer(fmt: str = 'bfloat16', *, where: Where = None) -> Transform:
  """Rounds weights to a lower-precision float format, saturating, kept in the input dtype.

  Formats: 'float16', 'bfloat16', 'float8_e4m3' (the finite e4m3fn variant,
  Micikevicius et al. 2022, "FP8 Formats for Deep Learning") and
  'float8_e5m2'. Out-of-range weights saturate to the largest finite value
  instead of becoming NaN or inf; see `numerics.cast_float`.

  Args:
    fmt: the format name.
    where: which parameters to round.

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> float_quantizer('float8_e5m2')({'w': jnp.array([1e6, 0.3])})['w'].tolist()
  [57344.0, 0.3125]
  """
  numerics.float_dtype(fmt)  # validate the name now, not at first use
  predicate = as_predicate(where)
  return lambda params: map_selected(lambda path, x: numerics.cast_float(x, fmt), params, predicate)


def float_format(params: PyTree, fmt: str, *, where: Where = None) -> PyTree:
  """Rounds `params` to the float format `fmt`; see `float_quantizer`.

  >>> import jax.numpy as jnp
  >>> float_format({'w': jnp.array([1000.0])}, 'float8_e4m3')['w'].tolist()
  [448.0]
  """
  return float_quantizer(fmt, where=where)(params)
