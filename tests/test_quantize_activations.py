"""Tests for qbound.quantize.activations: calibration, fake-quant f -> f_q, DQA."""

import doctest
import functools
import math
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound.quantize import activations as A
from qbound.quantize import coding


@pytest.fixture(autouse=True, scope='module')
def strict_promotion():
  with jax.numpy_dtype_promotion('strict'):
    yield


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(12)(x))
    return nn.Dense(3)(x)


class Nested(nn.Module):
  """A Block with its own Dense, and one Dense module called twice."""

  @nn.compact
  def __call__(self, x):
    x = Block()(x)
    shared = nn.Dense(6)
    return shared(nn.relu(shared(x)))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(6)(x))


MODEL = MLP()


@pytest.fixture(scope='module')
def params():
  return MODEL.init(jax.random.key(0), jnp.zeros(5))


@pytest.fixture(scope='module')
def calib():
  return jax.random.normal(jax.random.key(1), (64, 5))


def pre_activations(params, x):
  """The Dense outputs of MLP written out by hand."""
  p = params['params']
  h0 = x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  h1 = jax.nn.relu(h0) @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  h2 = jax.nn.relu(h1) @ p['Dense_2']['kernel'] + p['Dense_2']['bias']
  return {'Dense_0': h0, 'Dense_1': h1, 'Dense_2': h2}


def on_grid(values, r, bits, symmetric=True):
  scale, zero, qmin, qmax = A.activation_grid(r, bits, symmetric=symmetric)
  codes = np.asarray(values, np.float64) / scale + zero
  assert np.allclose(codes, np.round(codes), atol=1e-3), codes
  assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8), symmetric=st.booleans(),
       lo=st.floats(-5, 1), width=st.floats(0.1, 6))
def test_fake_quant_is_on_the_grid_with_half_step_error(seed, bits, symmetric, lo, width):
  r = A.ActivationRange(jnp.float32(lo), jnp.float32(lo + width))
  x = jax.random.uniform(jax.random.key(seed), (200,), minval=lo - 1.0, maxval=lo + width + 1.0)
  out = A.fake_quant(x, r, bits, symmetric=symmetric)
  assert out.dtype == x.dtype and out.shape == x.shape
  on_grid(out, r, bits, symmetric)
  scale = A.activation_grid(r, bits, symmetric=symmetric)[0]
  inside = (x >= lo) & (x <= lo + width)
  assert np.all(np.abs(np.asarray(out - x))[np.asarray(inside)] <= scale / 2 + 1e-5)
  # The formula of the docstring: x' = (clip(round(x / s) + z, qmin, qmax) - z) * s.
  s, z, qmin, qmax = A.activation_grid(r, bits, symmetric=symmetric)
  expected = (np.clip(np.round(np.asarray(x, np.float64) / s) + z, qmin, qmax) - z) * s
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_activation_grid_errors():
  with pytest.raises(ValueError, match='bits'):
    A.activation_grid(A.ActivationRange(jnp.float32(0), jnp.float32(1)), 1)
  with pytest.raises(ValueError, match='lower <= upper'):
    A.activation_grid(A.ActivationRange(jnp.float32(1), jnp.float32(0)), 4)
  with pytest.raises(ValueError, match='finite'):
    A.activation_grid(A.ActivationRange(jnp.float32(0), jnp.float32(np.inf)), 4)
  # A zero range gets s = 1 rather than dividing by zero.
  assert A.activation_grid(A.ActivationRange(jnp.float32(0), jnp.float32(0)), 4)[0] == 1.0


def test_calibrate_records_min_max_of_dense_outputs(params, calib):
  ranges = A.calibrate(MODEL.apply, params, calib)
  assert sorted(ranges) == ['Dense_0', 'Dense_1', 'Dense_2']
  hand = jax.vmap(functools.partial(pre_activations, params))(calib)
  for name, r in ranges.items():
    assert float(r.lower) == pytest.approx(float(hand[name].min()), abs=1e-5)
    assert float(r.upper) == pytest.approx(float(hand[name].max()), abs=1e-5)
  only = A.calibrate(MODEL.apply, params, calib, layers=['Dense_0', 'Dense_2'])
  assert sorted(only) == ['Dense_0', 'Dense_2']


def test_quantize_activations_matches_hand_written_fake_quant(params, calib):
  ranges = A.calibrate(MODEL.apply, params, calib)
  fq = A.quantize_activations(MODEL.apply, ranges, 4)
  p = params['params']

  def by_hand(x):
    h = A.fake_quant(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'], ranges['Dense_0'], 4)
    h = A.fake_quant(jax.nn.relu(h) @ p['Dense_1']['kernel'] + p['Dense_1']['bias'], ranges['Dense_1'], 4)
    return A.fake_quant(jax.nn.relu(h) @ p['Dense_2']['kernel'] + p['Dense_2']['bias'], ranges['Dense_2'], 4)

  for x in calib[:8]:
    out = fq(params, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(by_hand(x)), atol=1e-5)
    on_grid(out, ranges['Dense_2'], 4)
  # The error shrinks with the bit width.
  f = jax.vmap(functools.partial(MODEL.apply, params))
  errors = [float(jnp.max(jnp.abs(jax.vmap(functools.partial(A.quantize_activations(MODEL.apply, ranges, b), params))(
      calib) - f(calib)))) for b in (3, 6, 10)]
  assert errors[0] > errors[1] > errors[2]


def test_quantized_function_is_pure(params, calib):
  ranges = A.calibrate(MODEL.apply, params, calib)
  snapshot = jax.tree_util.tree_map(np.array, params)
  fq = A.quantize_activations(MODEL.apply, ranges, 3)
  x = calib[0]
  first = np.asarray(fq(params, x))
  np.testing.assert_array_equal(first, np.asarray(fq(params, x)))
  np.testing.assert_array_equal(first, np.asarray(jax.jit(fq)(params, x)))
  batched = jax.vmap(fq, in_axes=(None, 0))(params, calib[:4])
  np.testing.assert_array_equal(np.asarray(batched[0]), first)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(snapshot)):
    np.testing.assert_array_equal(np.asarray(a), b)
  # No interceptor is left behind: the plain model is unchanged after f_q ran.
  np.testing.assert_array_equal(np.asarray(MODEL.apply(params, x)), np.asarray(pre_activations_out(params, x)))


def pre_activations_out(params, x):
  return pre_activations(params, x)['Dense_2']


def test_layer_selection_and_errors(params, calib):
  ranges = A.calibrate(MODEL.apply, params, calib)
  first_only = A.quantize_activations(MODEL.apply, ranges, 2, layers='Dense_0')
  x = calib[0]
  p = params['params']
  h = A.fake_quant(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'], ranges['Dense_0'], 2)
  h = jax.nn.relu(jax.nn.relu(h) @ p['Dense_1']['kernel'] + p['Dense_1']['bias'])
  np.testing.assert_allclose(np.asarray(first_only(params, x)),
                             np.asarray(h @ p['Dense_2']['kernel'] + p['Dense_2']['bias']), atol=1e-5)
  partial_ranges = {'Dense_0': ranges['Dense_0']}
  with pytest.raises(ValueError, match="'Dense_1' is selected .* no calibrated range"):
    A.quantize_activations(MODEL.apply, partial_ranges, 4, layers='*')(params, x)
  # Without `layers`, only the calibrated layers are quantized.
  np.testing.assert_allclose(np.asarray(A.quantize_activations(MODEL.apply, partial_ranges, 2)(params, x)),
                             np.asarray(first_only(params, x)))
  with pytest.raises(ValueError, match='no layer matched'):
    A.calibrate(MODEL.apply, params, calib, layers='Conv_*')
  with pytest.raises(ValueError, match='no layer matched'):
    A.calibrate(lambda p, x: x * 2.0, params, calib)
  with pytest.raises(ValueError, match='no bit width'):
    A.quantize_activations(MODEL.apply, ranges, {'Dense_0': 4})
  with pytest.raises(ValueError, match='ActivationRange'):
    A.quantize_activations(MODEL.apply, {'Dense_0': (0.0, 1.0)}, 4)


def test_per_layer_bits_and_asymmetric(params, calib):
  ranges = A.calibrate(MODEL.apply, params, calib)
  bits = {'Dense_0': 8, 'Dense_1': 8, 'Dense_2': 3}
  out = A.quantize_activations(MODEL.apply, ranges, bits, symmetric=False)(params, calib[0])
  on_grid(out, ranges['Dense_2'], 3, symmetric=False)


def test_nested_paths_and_shared_modules():
  model = Nested()
  params = model.init(jax.random.key(0), jnp.zeros(4))
  xs = jax.random.normal(jax.random.key(1), (32, 4))
  ranges = A.calibrate(model.apply, params, xs)
  assert sorted(ranges) == ['Block_0/Dense_0', 'Dense_0']
  # The shared Dense's range covers both of its calls.
  p = params['params']
  dense = lambda v: v @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  first = jax.vmap(lambda x: dense(jax.nn.relu(x @ p['Block_0']['Dense_0']['kernel'] + p['Block_0']['Dense_0']['bias'])))(xs)
  second = dense(jax.nn.relu(first))
  both = jnp.concatenate([first, second])
  assert float(ranges['Dense_0'].lower) == pytest.approx(float(both.min()), abs=1e-5)
  assert float(ranges['Dense_0'].upper) == pytest.approx(float(both.max()), abs=1e-5)
  inner = A.calibrate(model.apply, params, xs, layers='Block_0/*')
  assert list(inner) == ['Block_0/Dense_0']


def tapped_mlp(params, x, tap):
  """A plain JAX MLP with quantization points after each ReLU."""
  h = tap('hidden', jax.nn.relu(x @ params['w1'] + params['b1']))
  return tap('out', h @ params['w2'] + params['b2'])


@pytest.fixture(scope='module')
def tapped_params():
  k1, k2 = jax.random.split(jax.random.key(3))
  return {'w1': jax.random.normal(k1, (5, 8)), 'b1': jnp.zeros(8), 'w2': jax.random.normal(k2, (8, 2)),
          'b2': jnp.zeros(2)}


def test_tap_form_for_plain_functions(tapped_params, calib):
  ranges = A.calibrate(tapped_mlp, tapped_params, calib, tap=True)
  assert sorted(ranges) == ['hidden', 'out']
  assert float(ranges['hidden'].lower) == 0.0  # after the ReLU
  fq = A.quantize_activations(tapped_mlp, ranges, 3, tap=True, symmetric=False)
  x = calib[0]
  hidden = A.fake_quant(jax.nn.relu(x @ tapped_params['w1'] + tapped_params['b1']), ranges['hidden'], 3,
                        symmetric=False)
  on_grid(hidden, ranges['hidden'], 3, symmetric=False)
  expected = A.fake_quant(hidden @ tapped_params['w2'] + tapped_params['b2'], ranges['out'], 3, symmetric=False)
  np.testing.assert_allclose(np.asarray(fq(tapped_params, x)), np.asarray(expected), atol=1e-5)
  with pytest.raises(ValueError, match='no tap point'):
    A.calibrate(tapped_mlp, tapped_params, calib, tap=True, layers='nothing')


# ------------------------------------------------------------------------------------------ DQA


def mean_error(fq, params, xs):
  f = jax.vmap(functools.partial(MODEL.apply, params))(xs)
  return float(jnp.mean(jnp.abs(jax.vmap(functools.partial(fq, params))(xs) - f)))


@pytest.mark.parametrize('importance', A.IMPORTANCE)
@pytest.mark.parametrize('bits', [3, 4])
def test_dqa_beats_direct_quantization_at_equal_bits(params, calib, importance, bits):
  direct = A.quantize_activations(MODEL.apply, A.calibrate(MODEL.apply, params, calib), bits)
  fq, report = A.dqa(MODEL.apply, params, calib, bits, 2, 0.25, importance=importance)
  assert mean_error(fq, params, calib) < mean_error(direct, params, calib)
  assert report.importance == importance and report.num_inputs == calib.shape[0]


def test_dqa_limits_equal_direct_quantization(params, calib):
  ranges = A.calibrate(MODEL.apply, params, calib)
  none, report = A.dqa(MODEL.apply, params, calib, 3, 2, 0.0)
  assert report.extra_bits_per_input == 0 and all(l.important == () for l in report.layers)
  every, _ = A.dqa(MODEL.apply, params, calib, 3, 2, 1.0)
  for x in calib[:4]:
    np.testing.assert_array_equal(np.asarray(none(params, x)),
                                  np.asarray(A.quantize_activations(MODEL.apply, ranges, 3)(params, x)))
    np.testing.assert_allclose(np.asarray(every(params, x)),
                               np.asarray(A.quantize_activations(MODEL.apply, ranges, 5)(params, x)), atol=1e-5)


def test_dqa_mean_abs_picks_the_largest_channels(params, calib):
  _, report = A.dqa(MODEL.apply, params, calib, 3, 2, 0.25, layers='Dense_0')
  hand = jax.vmap(functools.partial(pre_activations, params))(calib)['Dense_0']
  top = np.argsort(-np.asarray(jnp.mean(jnp.abs(hand), axis=0)))[:4]
  assert [l.name for l in report.layers] == ['Dense_0']
  assert report.layers[0].important == tuple(sorted(top.tolist()))


def test_dqa_memory_report_arithmetic(params, calib):
  bits, extra = 3, 2
  _, report = A.dqa(MODEL.apply, params, calib, bits, extra, 0.3)
  ranges = A.calibrate(MODEL.apply, params, calib)
  hand = jax.vmap(functools.partial(pre_activations, params))(calib)
  assert [l.name for l in report.layers] == ['Dense_0', 'Dense_1', 'Dense_2']
  for layer in report.layers:
    channels = hand[layer.name].shape[-1]
    k = math.ceil(0.3 * channels)
    assert layer.channels == channels == layer.values_per_input and len(layer.important) == k
    assert layer.important_values_per_input == k
    assert layer.activation_bits == bits * channels
    assert layer.fixed_shift_error_bits == extra * k
    # Recompute the shift errors of the important channels and their Huffman size.
    s, z, lo, hi = A.activation_grid(ranges[layer.name], bits + extra)
    acts = np.asarray(hand[layer.name], np.float64)[:, list(layer.important)]
    codes = np.clip(np.round(acts / s) + z, lo, hi).astype(np.int64)
    high, err = A.shift_split(codes, extra)
    assert high.min() >= -(2 ** (bits - 1)) and high.max() <= 2 ** (bits - 1) - 1  # b-bit codes
    assert err.min() >= 0 and err.max() < 2**extra
    np.testing.assert_array_equal(high * 2**extra + err, codes)
    counts = Counter(err.ravel().tolist())
    lengths = coding.huffman_code_lengths(counts)
    coded = sum(counts[e] * lengths[e] for e in counts)
    assert layer.shift_error_bits == pytest.approx(coded / calib.shape[0])
    assert layer.shift_error_bits <= layer.fixed_shift_error_bits
  assert report.activation_bits == sum(l.activation_bits for l in report.layers)
  assert report.extra_bits_per_input == pytest.approx(sum(l.shift_error_bits for l in report.layers))
  assert report.fixed_extra_bits_per_input == sum(l.fixed_shift_error_bits for l in report.layers)
  assert report.overhead == pytest.approx(report.extra_bits_per_input / report.activation_bits)


def test_shift_split_restores_codes():
  codes = np.arange(-31, 32)
  high, err = A.shift_split(codes, 3)
  np.testing.assert_array_equal(high * 8 + err, codes)
  assert err.min() == 0 and err.max() == 7
  assert high.min() >= -4 and high.max() <= 3  # 6-bit symmetric codes -> 3-bit two's complement


def test_dqa_with_taps_and_bad_arguments(tapped_params, calib):
  fq, report = A.dqa(tapped_mlp, tapped_params, calib, 3, 1, 0.5, tap=True, importance='sensitivity')
  assert [l.name for l in report.layers] == ['hidden', 'out']
  assert fq(tapped_params, calib[0]).shape == (2,)
  with pytest.raises(ValueError, match='important_fraction'):
    A.dqa(tapped_mlp, tapped_params, calib, 3, 1, 1.5, tap=True)
  with pytest.raises(ValueError, match='extra_bits'):
    A.dqa(tapped_mlp, tapped_params, calib, 3, 0, 0.5, tap=True)
  with pytest.raises(ValueError, match=r'bits \+ extra_bits at most 24.*bits=23'):
    A.dqa(tapped_mlp, tapped_params, calib, 23, 2, 0.5, tap=True)
  with pytest.raises(ValueError, match='importance'):
    A.dqa(tapped_mlp, tapped_params, calib, 3, 1, 0.5, tap=True, importance='random')


def test_docstring_examples():
  with jax.numpy_dtype_promotion('standard'):  # the examples run as users would, in the default mode
    result = doctest.testmod(A, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
