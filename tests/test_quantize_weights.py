"""Tests for qbound.quantize.weights: grid quantizers as pure pytree transforms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound import quantize as qz
from helpers import biased_mlp_params
from qbound.quantize import numerics


@pytest.fixture(autouse=True, scope='module')
def strict_promotion():
  with jax.numpy_dtype_promotion('strict'):
    yield


def mlp_params(seed=0, dtype=jnp.float32):
  return biased_mlp_params(seed, dtype=dtype)


def leaves_by_path(tree):
  return {qz.path_str(qz.path_of(kp)): x for kp, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_pure(transform, params, jit_atol=None):
  """Same structure and dtypes, input untouched, same result under jit.

  XLA may rewrite x / (m / qmax) as x * qmax / m, so under jit a value landing
  exactly on a grid point can come out a hair below it; floor then drops a step.
  `jit_atol(leaf)` allows for that.
  """
  before = jax.tree_util.tree_map(np.array, params)
  out = transform(params)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(params)):
    assert a.dtype == b.dtype and a.shape == b.shape
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)
  jitted = jax.jit(transform)(params)
  for x, a, b in zip(*(jax.tree_util.tree_leaves(t) for t in (params, out, jitted))):
    atol = 1e-7 if jit_atol is None else jit_atol(x)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=atol)
  return out


QUANTIZERS = {
    'uniform4': qz.uniform_quantizer(4),
    'uniform8_channel': qz.uniform_quantizer(8, per_channel=True),
    'uniform3_asym': qz.uniform_quantizer(3, symmetric=False),
    'uniform4_floor': qz.uniform_quantizer(4, rounding='floor'),
    'uniform4_stochastic': qz.uniform_quantizer(4, rounding='stochastic', key=jax.random.key(1)),
    'fixed_point6': qz.fixed_point_quantizer(6),
    'power_of_two4': qz.power_of_two_quantizer(4),
    'float8_e4m3': qz.float_quantizer('float8_e4m3'),
    'bfloat16': qz.float_quantizer('bfloat16'),
}


@pytest.mark.parametrize('name', sorted(QUANTIZERS))
def test_pure_same_structure_and_jittable(name):
  one_step = lambda x: float(jnp.abs(x).max()) / 7 * 1.001
  assert_pure(QUANTIZERS[name], mlp_params(), one_step if name == 'uniform4_floor' else None)


@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize('name', ['uniform4', 'fixed_point6', 'power_of_two4', 'float8_e4m3'])
def test_half_precision_dtype_is_kept(name, dtype):
  out = QUANTIZERS[name](mlp_params(dtype=dtype))
  assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(out))


def _codes(x, y, bits, per_channel):
  """Recomputes the scale and returns y / s, the integer codes."""
  axes = tuple(range(x.ndim - 1)) if per_channel and x.ndim >= 2 else None
  m = np.max(np.abs(x), axis=axes, keepdims=True)
  s = np.where(m > 0, m / (2 ** (bits - 1) - 1), 1.0)
  return y / s, s


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8), per_channel=st.booleans())
def test_uniform_on_grid_and_within_half_step(seed, bits, per_channel):
  params = mlp_params(seed)
  out = qz.uniform(params, bits, per_channel=per_channel)
  qmax = 2 ** (bits - 1) - 1
  for path, x in leaves_by_path(params).items():
    x = np.asarray(x, np.float64)
    y = np.asarray(leaves_by_path(out)[path], np.float64)
    q, s = _codes(x, y, bits, per_channel)
    np.testing.assert_allclose(q, np.round(q), atol=1e-4, err_msg=path)
    assert np.abs(np.round(q)).max() <= qmax
    assert np.all(np.abs(x - y) <= s / 2 * (1 + 1e-5) + 1e-7), path


def test_per_channel_scales_each_output_channel():
  w = jnp.array([[1.0, 0.01], [-0.7, 0.02]])
  out = qz.uniform({'kernel': w}, 2, per_channel=True)['kernel']
  # qmax = 1: each column's largest weight survives with its own scale.
  np.testing.assert_array_equal(out, np.array([[1.0, 0.0], [-1.0, 0.02]], np.float32))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 6), per_channel=st.booleans(), factor=st.floats(0.3, 3.0))
def test_calibrate_on_fixes_the_grid(seed, bits, per_channel, factor):
  """A grid calibrated once: the same as recalibrating on the reference itself, and for moved weights
  the reference's grid points, clipped to its range (codes within +-qmax)."""
  params = mlp_params(seed)
  fixed = qz.uniform_quantizer(bits, per_channel=per_channel, calibrate_on=params)
  recalibrated = qz.uniform(params, bits, per_channel=per_channel)
  for a, b in zip(jax.tree_util.tree_leaves(fixed(params)), jax.tree_util.tree_leaves(recalibrated)):
    np.testing.assert_array_equal(a, b)
  moved = jax.tree_util.tree_map(lambda w: w * factor, params)
  out = fixed(moved)
  qmax = 2 ** (bits - 1) - 1
  for path, x in leaves_by_path(params).items():
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1)) if per_channel and x.ndim >= 2 else None
    s = np.max(np.abs(x), axis=axes, keepdims=True) / qmax
    s = np.where(s > 0, s, 1.0)
    y, m = np.asarray(leaves_by_path(out)[path], np.float64), np.asarray(leaves_by_path(moved)[path], np.float64)
    codes = y / s
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4, err_msg=path)
    assert np.abs(np.round(codes)).max() <= qmax
    s = np.broadcast_to(s, m.shape)
    inside = np.abs(m) <= qmax * s
    assert np.all(np.abs(m - y)[inside] <= s[inside] / 2 * (1 + 1e-5) + 1e-7), path
    np.testing.assert_allclose(y[~inside], np.sign(m[~inside]) * qmax * s[~inside], rtol=1e-5, err_msg=path)


def test_calibrate_on_must_match_the_parameters():
  with pytest.raises(ValueError, match="calibrate_on has no parameter 'kernel'"):
    qz.uniform_quantizer(3, calibrate_on={'bias': jnp.ones(2)})({'kernel': jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="calibrate_on has no parameter 'kernel' of shape"):
    qz.uniform_quantizer(3, calibrate_on={'kernel': jnp.ones(3)})({'kernel': jnp.ones((2, 2))})


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8))
def test_asymmetric_codes_and_error(seed, bits):
  params = mlp_params(seed)
  out = qz.uniform(params, bits, symmetric=False)
  for path, x in leaves_by_path(params).items():
    x = np.asarray(x, np.float64)
    y = np.asarray(leaves_by_path(out)[path], np.float64)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    s = (hi - lo) / (2**bits - 1)
    z = -np.round(lo / s)
    q = y / s + z
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    assert np.round(q).min() >= 0 and np.round(q).max() <= 2**bits - 1
    assert np.all(np.abs(x - y) <= s / 2 * (1 + 1e-4) + 1e-7), path


def test_floor_and_stochastic_error_below_one_step():
  params = mlp_params(3)
  floor = qz.uniform(params, 4, rounding='floor')
  stoch = qz.uniform(params, 4, rounding='stochastic', key=jax.random.key(0))
  for path, x in leaves_by_path(params).items():
    x = np.asarray(x, np.float64)
    s = np.abs(x).max() / 7
    f = np.asarray(leaves_by_path(floor)[path], np.float64)
    r = np.asarray(leaves_by_path(stoch)[path], np.float64)
    assert np.all(f <= x + 1e-7) and np.all(x - f < s * (1 + 1e-5))
    assert np.all(np.abs(x - r) < s * (1 + 1e-5))


def test_stochastic_rounding_depends_only_on_key_and_path():
  params = mlp_params(4)
  key = jax.random.key(7)
  a = qz.uniform(params, 3, rounding='stochastic', key=key)
  b = qz.uniform(params, 3, rounding='stochastic', key=key, where=qz.kernels_only)
  c = qz.uniform(params, 3, rounding='stochastic', key=jax.random.key(8))
  k = ('params', 'Dense_1', 'kernel')
  get = lambda t: t['params']['Dense_1']['kernel']
  np.testing.assert_array_equal(get(a), get(b))
  assert not np.array_equal(get(a), get(c)), k


def test_zero_tensor_stays_zero():
  p = jax.tree_util.tree_map(jnp.zeros_like, mlp_params())
  for t in QUANTIZERS.values():
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(t(p)))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 12))
def test_fixed_point_grid_and_report(seed, bits):
  params = mlp_params(seed)
  out = qz.fixed_point(params, bits)
  formats = qz.fixed_point_formats(params, bits)
  for path, x in leaves_by_path(params).items():
    fmt = formats[path]
    assert fmt.bits == bits and fmt.int_bits + fmt.frac_bits == bits
    x = np.asarray(x, np.float64)
    y = np.asarray(leaves_by_path(out)[path], np.float64)
    q = y / fmt.step
    assert np.all(q == np.round(q)) and np.abs(q).max() <= 2 ** (bits - 1) - 1
    assert np.abs(x).max() <= fmt.max_value < 2 * np.abs(x).max() + fmt.step  # nothing overflows, no bit wasted
    assert np.all(np.abs(x - y) <= fmt.step / 2)


def test_fixed_point_report_example():
  fmt = qz.fixed_point_formats({'w': jnp.array([5.0, -0.1])}, bits=8)['w']
  # 5.0 needs 3 integer bits plus sign: 4 integer bits, 4 fractional bits.
  assert (fmt.int_bits, fmt.frac_bits, fmt.max_value) == (4, 4, 127 / 16)


def test_power_of_two_grid():
  params = mlp_params(5)
  out = qz.power_of_two(params, 4)
  for path, y in leaves_by_path(out).items():
    x = np.asarray(leaves_by_path(params)[path], np.float64)
    y = np.asarray(y, np.float64)
    nz = y != 0
    e = np.log2(np.abs(y[nz]))
    assert np.all(e == np.round(e))
    e_max = np.round(np.log2(np.abs(x).max()))
    assert e.max() == e_max and e.min() >= e_max - 6  # 2^(4-1) - 1 = 7 exponents
    assert np.all(np.sign(y[nz]) == np.sign(x[nz]))


@pytest.mark.parametrize('fmt', sorted(numerics.FLOAT_FORMATS))
def test_float_format_on_format_and_saturating(fmt):
  params = jax.tree_util.tree_map(lambda x: 1e3 * x, mlp_params(6))  # beyond e4m3's 448 in places
  params['params']['Dense_0']['bias'] = jnp.array([1e30, -1e30, 1.0, 0.1, 0, 0, 0, 0], jnp.float32)
  out = qz.float_format(params, fmt)
  dt = numerics.FLOAT_FORMATS[fmt]
  for y in jax.tree_util.tree_leaves(out):
    y = np.asarray(y)
    assert not np.any(np.isnan(y)) and not np.any(np.isinf(y))
    np.testing.assert_array_equal(y.astype(dt).astype(np.float32), y)


def test_validation_errors():
  params = mlp_params()
  with pytest.raises(ValueError, match='between 2 and 24.*binary'):
    qz.uniform(params, 1)
  with pytest.raises(ValueError, match='unknown float format'):
    qz.float_quantizer('float7')
  with pytest.raises(ValueError, match='needs an explicit PRNG'):
    qz.uniform_quantizer(4, rounding='stochastic')
  with pytest.raises(ValueError, match='between 2 and 8'):
    qz.power_of_two_quantizer(9)
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad['params']['Dense_0']['kernel'] = bad['params']['Dense_0']['kernel'].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="parameter 'params/Dense_0/kernel' contains NaN"):
    qz.uniform(bad, 8)
  bad['params']['Dense_0']['kernel'] = bad['params']['Dense_0']['kernel'].at[0, 0].set(jnp.inf)
  with pytest.raises(ValueError, match='contains inf'):
    qz.float_format(bad, 'float16')
  # A parameter that is left out is not checked.
  qz.uniform(bad, 8, where=lambda p: p[1] != 'Dense_0')


def test_nnx_state():
  model = nnx.Sequential(nnx.Linear(5, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  qstate = qz.uniform(state, 4, where=qz.kernels_only)
  assert jax.tree_util.tree_structure(qstate) == jax.tree_util.tree_structure(state)
  nnx.update(model, qstate)
  k = np.asarray(model.layers[0].kernel[...])
  q = k / (np.abs(k).max() / 7)
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  assert model(jnp.ones(5)).shape == (3,)
