"""Tests for qbound.quantize.numerics: every format puts values on its grid."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound.quantize import numerics


@pytest.fixture(autouse=True, scope='module')
def strict_promotion():
  with jax.numpy_dtype_promotion('strict'):
    yield


def weights():
  """Small float32 arrays without subnormals (XLA on CPU may flush them to zero).

  Two fixed shapes: every new shape costs an XLA compile per op.
  """
  return hnp.arrays(
      np.float32,
      st.sampled_from([(16,), (3, 5)]),
      elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
  ).map(lambda x: np.where(np.abs(x) < 1e-6, np.float32(0), x))


def test_round_to_int_modes():
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.7, 1.2])
  assert numerics.round_to_int(x).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 1.0]  # ties to even
  assert numerics.round_to_int(x, 'floor').tolist() == [0.0, 1.0, 2.0, -1.0, -2.0, 1.0]


def test_stochastic_rounding_is_unbiased_and_within_one_step():
  x = jnp.full((20000,), 0.3)
  r = numerics.round_to_int(x, 'stochastic', jax.random.key(0))
  assert set(np.unique(np.asarray(r)).tolist()) == {0.0, 1.0}
  assert abs(float(r.mean()) - 0.3) < 0.02


def test_rounding_validation():
  with pytest.raises(ValueError, match='needs an explicit PRNG'):
    numerics.round_to_int(jnp.ones(2), 'stochastic')
  with pytest.raises(ValueError, match='only used with'):
    numerics.round_to_int(jnp.ones(2), 'nearest', jax.random.key(0))
  with pytest.raises(ValueError, match='unknown rounding'):
    numerics.round_to_int(jnp.ones(2), 'up')


@pytest.mark.parametrize('bits', [2, 3, 8])
def test_int_range(bits):
  qmin, qmax = numerics.int_range(bits)
  assert qmax == 2 ** (bits - 1) - 1 and qmin == -qmax
  assert numerics.int_range(bits, symmetric=False) == (0, 2**bits - 1)


@settings(max_examples=25, deadline=None)
@given(x=weights(), bits=st.integers(2, 8), scale=st.floats(1e-3, 10.0))
def test_quantize_int_codes_are_integers_in_range(x, bits, scale):
  qmin, qmax = numerics.int_range(bits)
  s = np.float32(scale)
  y = np.asarray(numerics.quantize_int(jnp.asarray(x), s, qmin=qmin, qmax=qmax))
  q = y / s
  np.testing.assert_allclose(q, np.round(q), atol=1e-3)
  assert q.min() >= qmin - 1e-3 and q.max() <= qmax + 1e-3
  # Inside the range, round to nearest is off by at most half a step.
  inside = np.abs(x) <= qmax * s
  assert np.all(np.abs(x - y)[inside] <= s / 2 * (1 + 1e-5) + 1e-6)


@settings(max_examples=25, deadline=None)
@given(m=st.floats(1e-8, 1e8, allow_subnormal=False), bits=st.integers(2, 16))
def test_fixed_point_frac_bits_is_the_largest_that_fits(m, bits):
  fl = int(numerics.fixed_point_frac_bits(np.float32(m), bits))
  m = float(np.float32(m))
  qmax = 2 ** (bits - 1) - 1
  assert m * 2.0**fl <= qmax < m * 2.0 ** (fl + 1)


@settings(max_examples=25, deadline=None)
@given(x=weights(), bits=st.integers(2, 12), fl=st.integers(-3, 10))
def test_fixed_point_values_on_grid(x, bits, fl):
  y = np.asarray(numerics.quantize_fixed_point(jnp.asarray(x), bits, fl), np.float64)
  q = y * 2.0**fl
  assert np.all(q == np.round(q))  # scaling by powers of two is exact
  assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1


@settings(max_examples=25, deadline=None)
@given(x=weights(), bits=st.integers(2, 6), e_max=st.integers(-4, 8))
def test_power_of_two_values(x, bits, e_max):
  y = np.asarray(numerics.quantize_power_of_two(jnp.asarray(x), bits, e_max), np.float64)
  nz = y != 0
  e = np.log2(np.abs(y[nz]))
  assert np.all(e == np.round(e))
  e_min = e_max - (2 ** (bits - 1) - 2)
  assert np.all((e >= e_min) & (e <= e_max))
  assert np.all(np.sign(y[nz]) == np.sign(x[nz]))
  assert np.all(y[x == 0] == 0)
  # Within the window the exponent is the nearest one to log2|x|.
  a = np.abs(x.astype(np.float64))
  window = nz & (a >= 2.0**e_min) & (a <= 2.0**e_max)
  assert np.all(np.abs(np.log2(np.abs(y[window])) - np.log2(a[window])) <= 0.5 + 1e-6)


@pytest.mark.parametrize('name', sorted(numerics.FLOAT_FORMATS))
def test_cast_float_saturates_and_is_representable(name):
  dt = numerics.FLOAT_FORMATS[name]
  big = float(ml_dtypes.finfo(dt).max)
  beyond = min(2 * big, float(np.finfo(np.float32).max))
  x = jnp.array([beyond, -beyond, jnp.inf, -jnp.inf, 0.1, -7.3, 0.0, 1e-3], jnp.float32)
  y = numerics.cast_float(x, name)
  assert y.dtype == jnp.float32
  assert not bool(jnp.any(jnp.isnan(y)))
  assert y[:4].tolist() == [big, -big, big, -big]
  np.testing.assert_array_equal(np.asarray(y).astype(dt).astype(np.float32), np.asarray(y))


@settings(max_examples=20, deadline=None)
@given(x=weights(), name=st.sampled_from(sorted(numerics.FLOAT_FORMATS)))
def test_cast_float_is_round_to_nearest(x, name):
  dt = numerics.FLOAT_FORMATS[name]
  y = np.asarray(numerics.cast_float(jnp.asarray(x), name))
  big = float(ml_dtypes.finfo(dt).max)
  expected = np.clip(x, -big, big).astype(dt).astype(np.float32)  # ml_dtypes' own rounding
  np.testing.assert_array_equal(y, expected)


def test_cast_float_keeps_input_dtype():
  x = jnp.array([1.0, 1000.0], jnp.bfloat16)
  y = numerics.cast_float(x, 'float8_e4m3')
  assert y.dtype == jnp.bfloat16 and y.tolist() == [1.0, 448.0]


def test_unknown_float_format():
  with pytest.raises(ValueError, match='unknown float format'):
    numerics.cast_float(jnp.ones(2), 'float4')


def test_check_bits():
  with pytest.raises(ValueError, match='binary'):
    numerics.check_bits(1, minimum=2)
  with pytest.raises(ValueError, match='integer'):
    numerics.check_bits(4.0, minimum=2)
  assert numerics.check_bits(np.int64(4), minimum=2) == 4
