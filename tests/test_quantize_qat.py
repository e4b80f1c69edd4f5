"""Tests for qbound.quantize.qat: straight-through estimator, retraining, TTQ."""

import doctest

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qbound import quantize as qz
from qbound.quantize import qat


@pytest.fixture(autouse=True, scope='module')
def strict_promotion():
  with jax.numpy_dtype_promotion('strict'):
    yield


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


MODEL = MLP()


@pytest.fixture(scope='module')
def data():
  """Three well separated classes in 4 dimensions."""
  key_x, key_c = jax.random.split(jax.random.key(0))
  y = jnp.arange(96, dtype=jnp.int32) % 3
  centers = 2.0 * jax.random.normal(key_c, (3, 4))
  x = centers[y] + 0.5 * jax.random.normal(key_x, (96, 4))
  return x, y


@pytest.fixture(scope='module')
def params():
  return MODEL.init(jax.random.key(1), jnp.zeros(4))


def quantized_loss(params, quantizer, data):
  x, y = data
  logits = jax.vmap(MODEL.apply, in_axes=(None, 0))(quantizer(params), x)
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


def same_structure(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype


QUANTIZERS = {
    'uniform2': qz.uniform_quantizer(bits=2, where=qz.kernels_only),
    'uniform3_all': qz.uniform_quantizer(bits=3),
    'ternary': qz.ternary_quantizer(where=qz.kernels_only),
    'binary': qz.binary_quantizer(),
}


@pytest.mark.parametrize('name', sorted(QUANTIZERS))
def test_straight_through_forward_is_exactly_quantized(params, name):
  quantizer = QUANTIZERS[name]
  expected = quantizer(params)
  got = qat.straight_through(quantizer)(params)
  same_structure(got, expected)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('name', sorted(QUANTIZERS))
def test_straight_through_gradient_is_identity(params, name):
  ste = qat.straight_through(QUANTIZERS[name])
  weights = jax.tree_util.tree_map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) - 3.0, params)
  grads = jax.grad(lambda p: sum(jnp.sum(w * q) for w, q in zip(jax.tree_util.tree_leaves(weights),
                                                                jax.tree_util.tree_leaves(ste(p)))))(params)
  for g, w in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(weights)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # The full Jacobian of a small parameter is the identity matrix.
  w = {'kernel': jnp.array([0.3, -1.2, 0.05, 0.9])}
  jac = jax.jacobian(lambda p: qat.straight_through(qz.uniform_quantizer(bits=2))(p)['kernel'])(w)['kernel']
  np.testing.assert_array_equal(np.asarray(jac), np.eye(4, dtype=np.float32))


def test_straight_through_rejects_structure_change():
  with pytest.raises(ValueError, match='tree structure'):
    qat.straight_through(lambda p: {'other': p['w']})({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match='transform'):
    qat.straight_through('uniform')


@pytest.mark.parametrize('name', ['uniform2', 'ternary'])
def test_retrain_lowers_quantized_loss_and_keeps_structure(params, data, name):
  quantizer = QUANTIZERS[name]
  before = quantized_loss(params, quantizer, data)
  shadow = qat.retrain(MODEL.apply, params, quantizer, data, optimizer=optax.adam(1e-2), steps=150,
                       key=jax.random.key(2), batch_size=32)
  same_structure(shadow, params)
  after = quantized_loss(shadow, quantizer, data)
  assert after < 0.7 * before, (before, after)
  # The shadow weights stay float (not on the grid) while their quantized copy is on it.
  kernel = np.asarray(shadow['params']['Dense_0']['kernel'])
  assert len(np.unique(kernel)) > 4
  assert len(np.unique(np.asarray(quantizer(shadow)['params']['Dense_0']['kernel']))) <= 4


def test_retrain_is_pure_and_deterministic(params, data):
  copy = jax.tree_util.tree_map(np.array, params)
  kwargs = dict(optimizer=optax.sgd(0.1), steps=20, key=jax.random.key(3), batch_size=16)
  a = qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, **kwargs)
  b = qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, **kwargs)
  c = qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, **{**kwargs, 'key': jax.random.key(4)})
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(not np.array_equal(x, z) for x, z in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(c)))
  for orig, kept in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(copy)):
    np.testing.assert_array_equal(np.asarray(orig), kept)


def test_retrain_where_freezes_unselected(params, data):
  shadow = qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, optimizer=optax.adam(1e-2), steps=10,
                       key=jax.random.key(5), where='params/Dense_1/*')
  np.testing.assert_array_equal(shadow['params']['Dense_0']['kernel'], params['params']['Dense_0']['kernel'])
  assert not np.array_equal(shadow['params']['Dense_1']['kernel'], params['params']['Dense_1']['kernel'])


def test_retrain_mse_distils_float_network(params, data):
  x, _ = data
  teacher = jax.vmap(MODEL.apply, in_axes=(None, 0))(params, x)
  quantizer = QUANTIZERS['ternary']

  def distance(p):
    return float(jnp.mean(jnp.square(jax.vmap(MODEL.apply, in_axes=(None, 0))(quantizer(p), x) - teacher)))

  shadow = qat.retrain(MODEL.apply, params, quantizer, (x, teacher), optimizer=optax.adam(1e-2), steps=100,
                       key=jax.random.key(6), loss='mse')
  assert distance(shadow) < 0.7 * distance(params)


def test_retrain_dampening_pulls_shadow_weights_to_their_grid_points(params, data):
  """Nagel et al. 2022: dampen x |w - q(w)|^2 keeps the shadow weights near their grid points, where
  distillation alone pulls them towards f's weights (between grid points, at the rounding boundaries)."""
  x, _ = data
  teacher = jax.vmap(MODEL.apply, in_axes=(None, 0))(params, x)
  quantizer = QUANTIZERS['uniform2']

  def off_grid(p):
    return sum(float(jnp.sum(jnp.square(a - b))) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                                  jax.tree_util.tree_leaves(quantizer(p))))

  kwargs = dict(optimizer=optax.adam(1e-2), steps=30, key=jax.random.key(7), loss='mse')
  plain = qat.retrain(MODEL.apply, params, quantizer, (x, teacher), **kwargs)
  dampened = qat.retrain(MODEL.apply, params, quantizer, (x, teacher), dampen=100.0, **kwargs)
  assert off_grid(dampened) < 0.5 * min(off_grid(params), off_grid(plain))


def test_retrain_bad_arguments(params, data):
  kwargs = dict(optimizer=optax.adam(1e-2), steps=5, key=jax.random.key(0))
  with pytest.raises(ValueError, match='unknown loss'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, loss='hinge', **kwargs)
  with pytest.raises(ValueError, match='batch_size'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, batch_size=1000, **kwargs)
  with pytest.raises(ValueError, match='PRNG key'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, **{**kwargs, 'key': None})
  with pytest.raises(ValueError, match='same nonzero number'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], (data[0], data[1][:5]), **kwargs)
  with pytest.raises(ValueError, match='optax'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, **{**kwargs, 'optimizer': 0.1})
  with pytest.raises(ValueError, match='steps'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, **{**kwargs, 'steps': 0})
  with pytest.raises(ValueError, match='dampen must be a finite number >= 0'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], data, dampen=-1.0, **kwargs)
  # Targets that do not fit the loss are named before anything compiles (optax's own errors are cryptic).
  teacher = jax.vmap(MODEL.apply, in_axes=(None, 0))(params, data[0])
  with pytest.raises(ValueError, match="integer class labels.*loss='mse'"):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], (data[0], teacher), **kwargs)
  with pytest.raises(ValueError, match=r'one integer label per example'):
    qat.retrain(MODEL.apply, params, QUANTIZERS['uniform2'], (data[0], jnp.zeros((len(data[0]), 2), jnp.int32)),
                **kwargs)
  with pytest.raises(ValueError, match='integer class labels'):
    qat.retrain_ttq(MODEL.apply, params, (data[0], teacher), **kwargs)


def test_ttq_gradients_follow_the_paper():
  """d/dw_p = sum of upstream grads above delta, d/dw_n = -sum below -delta; latent grads scaled (eq. 7, 8)."""
  w = {'kernel': jnp.array([1.0, -2.0, 0.05, 0.5, -0.02])}
  scales = {'kernel': (jnp.float32(1.5), jnp.float32(0.5))}
  upstream = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])

  def objective(p, s, scaled):
    return jnp.sum(upstream * qat._ttq_straight_through(p, s, 0.05, scaled)['kernel'])

  value = qat._ttq_straight_through(w, scales, 0.05, True)['kernel']
  np.testing.assert_array_equal(np.asarray(value), [1.5, -0.5, 0.0, 1.5, 0.0])
  g_w, g_s = jax.grad(objective, argnums=(0, 1))(w, scales, True)
  np.testing.assert_allclose(np.asarray(g_s['kernel']), [1.0 + 4.0, -2.0])
  np.testing.assert_allclose(np.asarray(g_w['kernel']), [1.5 * 1, 0.5 * 2, 3, 1.5 * 4, 5])
  g_plain = jax.grad(objective)(w, scales, False)
  np.testing.assert_allclose(np.asarray(g_plain['kernel']), np.asarray(upstream))


def test_retrain_ttq_learns_positive_scales(params, data):
  start = qz.init_ttq_scales(params)
  before = quantized_loss(params, lambda p: qz.trained_ternary(p, start), data)
  shadow, scales = qat.retrain_ttq(MODEL.apply, params, data, optimizer=optax.adam(1e-2), steps=150,
                                   key=jax.random.key(7), batch_size=32)
  same_structure(shadow, params)
  assert sorted(scales) == sorted(start) == ['params/Dense_0/kernel', 'params/Dense_1/kernel']
  for name, (w_pos, w_neg) in scales.items():
    assert float(w_pos) > 0 and float(w_neg) > 0
    assert (float(w_pos), float(w_neg)) != (float(start[name][0]), float(start[name][1]))
  after = quantized_loss(shadow, lambda p: qz.trained_ternary(p, scales), data)
  assert after < 0.7 * before, (before, after)
  # Biases are not ternarized but trained in float.
  assert not np.array_equal(shadow['params']['Dense_0']['bias'], params['params']['Dense_0']['bias'])


def test_retrain_ttq_scales_stay_positive_under_a_push():
  """A loss that rewards negative scales only drives them down to min_scale."""
  w = {'kernel': jnp.array([[1.0, -1.0], [0.5, -0.5]])}
  x = jnp.ones((4, 2))
  apply_fn = lambda p, xi: xi @ p['kernel']
  shadow, scales = qat.retrain_ttq(apply_fn, w, (x, jnp.zeros(4)), optimizer=optax.sgd(1.0), steps=20,
                                   key=jax.random.key(0), batch_size=4, loss=lambda out, y: jnp.sum(out[:, 0]),
                                   min_scale=1e-3)
  w_pos, w_neg = scales['kernel']
  assert float(w_pos) == pytest.approx(1e-3) and float(w_neg) > 0


def test_retrain_ttq_bad_arguments(params, data):
  kwargs = dict(optimizer=optax.adam(1e-2), steps=5, key=jax.random.key(0))
  with pytest.raises(ValueError, match='match no float parameter'):
    qat.retrain_ttq(MODEL.apply, params, data, scales={'nope': (1.0, 1.0)}, **kwargs)
  with pytest.raises(ValueError, match='nothing'):
    qat.retrain_ttq(MODEL.apply, params, data, where='*/missing', **kwargs)
  with pytest.raises(ValueError, match='threshold'):
    qat.retrain_ttq(MODEL.apply, params, data, threshold=1.5, **kwargs)


def test_docstring_examples():
  with jax.numpy_dtype_promotion('standard'):  # the examples run as users would, in the default mode
    result = doctest.testmod(qat, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
