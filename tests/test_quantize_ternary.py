"""Tests for qbound.quantize.ternary: binary, TWN and TTQ weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound import quantize as qz
from helpers import biased_mlp_params


@pytest.fixture(autouse=True, scope='module')
def strict_promotion():
  with jax.numpy_dtype_promotion('strict'):
    yield


def mlp_params(seed=0):
  return biased_mlp_params(seed)


def pairs(a, b):
  return zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_binary_is_sign_times_mean_abs(seed):
  params = mlp_params(seed)
  out = qz.binary(params)
  for x, y in pairs(params, out):
    x, y = np.asarray(x), np.asarray(y)
    alpha = np.abs(x).mean()
    np.testing.assert_allclose(y, np.where(x >= 0, alpha, -alpha), rtol=1e-6)


def test_binary_per_channel():
  w = jnp.array([[1.0, -0.1], [-3.0, 0.3]])
  out = np.asarray(qz.binary({'kernel': w}, per_channel=True)['kernel'])
  np.testing.assert_allclose(out, [[2.0, -0.2], [-2.0, 0.2]], rtol=1e-6)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_ternary_twn_threshold_and_scale(seed):
  params = mlp_params(seed)
  out = qz.ternary(params)
  for x, y in pairs(params, out):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.abs(x) > 0.7 * np.abs(x).mean()
    alpha = np.abs(x[keep]).mean()
    np.testing.assert_allclose(y, np.sign(x) * keep * alpha, rtol=1e-5)
    assert len(np.unique(y)) <= 3


def test_ttq_levels_threshold_and_gradient():
  params = mlp_params(4)
  scales = qz.init_ttq_scales(params)
  assert sorted(scales) == [f'params/Dense_{i}/kernel' for i in range(3)]
  out = qz.trained_ternary(params, scales, threshold=0.05)
  for i in range(3):
    x = np.asarray(params['params'][f'Dense_{i}']['kernel'])
    y = np.asarray(out['params'][f'Dense_{i}']['kernel'])
    w_pos, w_neg = (float(v) for v in scales[f'params/Dense_{i}/kernel'])
    delta = 0.05 * np.abs(x).max()
    np.testing.assert_allclose(y, np.where(x > delta, w_pos, np.where(x < -delta, -w_neg, 0.0)), rtol=1e-6)
    assert w_pos == pytest.approx(x[x > delta].mean(), rel=1e-5)
    # Biases have no scales, so they pass through.
    np.testing.assert_array_equal(out['params'][f'Dense_{i}']['bias'], params['params'][f'Dense_{i}']['bias'])

  def total(s):
    return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(qz.trained_ternary(params, s)))

  grads = jax.jit(jax.grad(total))(scales)
  x = np.asarray(params['params']['Dense_1']['kernel'])
  delta = 0.05 * np.abs(x).max()
  g_pos, g_neg = grads['params/Dense_1/kernel']
  assert float(g_pos) == np.sum(x > delta) and float(g_neg) == -np.sum(x < -delta)


def test_ttq_validation():
  params = mlp_params()
  with pytest.raises(ValueError, match='pair'):
    qz.trained_ternary(params, {'params/Dense_0/kernel': 1.0})
  with pytest.raises(ValueError, match='matches'):
    qz.trained_ternary(params, {'Dense_0/kernel': (1.0, 1.0)})
  with pytest.raises(ValueError, match='threshold'):
    qz.init_ttq_scales(params, threshold=1.5)


def test_jit_and_purity():
  params = mlp_params(5)
  for t in (qz.binary_quantizer(), qz.ternary_quantizer(), qz.trained_ternary_quantizer(qz.init_ttq_scales(params))):
    out = t(params)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    for a, b in pairs(out, jax.jit(t)(params)):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_array_equal(params['params']['Dense_0']['kernel'], mlp_params(5)['params']['Dense_0']['kernel'])
