"""Tests for qbound.quantize.compress: pruning, weight sharing, low rank, and their composition."""

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
  return biased_mlp_params(seed, sizes=(16, 16, 3))


def kernels(tree):
  return [np.asarray(tree['params'][f'Dense_{i}']['kernel']) for i in range(3)]


def biases(tree):
  return [np.asarray(tree['params'][f'Dense_{i}']['bias']) for i in range(3)]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), sparsity=st.floats(0.0, 0.99))
def test_layer_pruning_removes_the_smallest(seed, sparsity):
  params = mlp_params(seed)
  out = qz.prune(params, sparsity)
  for x, y in zip(kernels(params), kernels(out)):
    pruned = y == 0
    assert pruned.sum() == int(np.floor(sparsity * x.size))
    np.testing.assert_array_equal(y[~pruned], x[~pruned])
    if pruned.any() and (~pruned).any():
      assert np.abs(x[pruned]).max() <= np.abs(x[~pruned]).min()
  for x, y in zip(biases(params), biases(out)):
    np.testing.assert_array_equal(x, y)  # kernels only by default


def test_global_pruning_uses_one_ranking():
  params = mlp_params(1)
  out = qz.prune(params, 0.7, scope='global')
  xs, ys = kernels(params), kernels(out)
  total = sum(x.size for x in xs)
  assert sum((y == 0).sum() for y in ys) == int(0.7 * total)
  pruned = np.concatenate([np.abs(x[y == 0]) for x, y in zip(xs, ys)])
  kept = np.concatenate([np.abs(x[y != 0]) for x, y in zip(xs, ys)])
  assert pruned.max() <= kept.min()


def test_pruning_validation():
  for bad in (1.0, -0.1, 1.5, True):
    with pytest.raises(ValueError, match=r'sparsity must be a number in \[0, 1\)'):
      qz.prune(mlp_params(), bad)
  with pytest.raises(ValueError, match='scope'):
    qz.pruner(0.5, scope='model')


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(1, 4))
def test_weight_sharing_codebook_and_nearest_centroid(seed, bits):
  params = qz.prune(mlp_params(seed), 0.5)
  out = qz.share_weights(params, bits)
  for x, y in zip(kernels(params), kernels(out)):
    np.testing.assert_array_equal(x == 0, y == 0)  # pruned zeros stay zero, no new zeros
    codebook = np.unique(y[y != 0])
    assert codebook.size <= 2**bits
    # After the final assignment every weight sits on its nearest centroid.
    nearest = codebook[np.argmin(np.abs(x[x != 0][:, None] - codebook[None, :]), axis=1)]
    np.testing.assert_allclose(np.abs(x[x != 0] - y[y != 0]), np.abs(x[x != 0] - nearest), atol=1e-6)
  for x, y in zip(biases(params), biases(out)):
    np.testing.assert_array_equal(x, y)


def test_weight_sharing_converges_to_cluster_means():
  w = jnp.array([0.1, 0.11, 0.12, 0.5, 0.52, 0.9, 0.91, 0.0])
  y = np.asarray(qz.share_weights({'kernel': w}, bits=2, iterations=50)['kernel'])
  # Linear init 0.1, 0.37, 0.64, 0.91 settles on the four cluster means.
  np.testing.assert_allclose(y, [0.11, 0.11, 0.11, 0.5, 0.52, 0.905, 0.905, 0.0], rtol=1e-5)
  assert y[-1] == 0.0


def test_low_rank_exact_at_true_rank_and_eckart_young():
  a = jax.random.normal(jax.random.key(0), (12, 3))
  b = jax.random.normal(jax.random.key(1), (3, 7))
  params = {'dense': {'kernel': a @ b, 'bias': jnp.ones(7)}}
  for r in (3, 4, 7, 100):
    np.testing.assert_allclose(qz.low_rank(params, r)['dense']['kernel'], a @ b, atol=1e-4)
  np.testing.assert_allclose(qz.low_rank(params, energy=1.0)['dense']['kernel'], a @ b, atol=1e-4)
  s = np.linalg.svd(np.asarray(a @ b), compute_uv=False)
  err = np.linalg.norm(np.asarray(qz.low_rank(params, 1)['dense']['kernel'] - a @ b))
  assert err == pytest.approx(np.sqrt(np.sum(s[1:] ** 2)), rel=1e-4)
  assert qz.low_rank(params, 1)['dense']['bias'] is params['dense']['bias']


def test_low_rank_energy_picks_the_fewest_values():
  w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
  # Energies 9, 4, 1 of 14: 9/14 < 0.7 <= 13/14.
  out = np.asarray(qz.low_rank({'kernel': w}, energy=0.7)['kernel'])
  np.testing.assert_allclose(out, np.diag([3.0, 2.0, 0.0]), atol=1e-6)
  out = np.asarray(qz.low_rank({'kernel': w}, energy=9 / 14)['kernel'])
  np.testing.assert_allclose(out, np.diag([3.0, 0.0, 0.0]), atol=1e-6)


def test_low_rank_conv_kernel_keeps_shape():
  k = jax.random.normal(jax.random.key(2), (3, 3, 4, 6))
  out = qz.low_rank({'conv': {'kernel': k}}, 2)['conv']['kernel']
  assert out.shape == k.shape and out.dtype == k.dtype
  assert np.linalg.matrix_rank(np.asarray(out).reshape(-1, 6), tol=1e-4) == 2


def test_low_rank_validation():
  for kwargs in ({}, {'rank': 2, 'energy': 0.9}, {'rank': 0}, {'energy': 0.0}, {'energy': 1.5}):
    with pytest.raises(ValueError):
      qz.low_rank_approximator(**kwargs)


def test_deep_compression_pipeline_composes_and_jits():
  params = mlp_params(3)
  pipeline = qz.chain(
      qz.pruner(0.8),
      qz.weight_sharer(3),
      qz.uniform_quantizer(8, where=qz.kernels_only),
  )
  out = pipeline(params)
  jitted = jax.jit(pipeline)(params)
  assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
  for x, y, z in zip(kernels(params), kernels(out), kernels(jitted)):
    assert (y == 0).sum() == int(0.8 * x.size)
    assert np.unique(y[y != 0]).size <= 8
    q = y / (np.abs(y).max() / 127)
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    np.testing.assert_allclose(y, z, atol=1e-6)
  report = qz.size_report(out)
  assert report.compression_ratio > 2.0
  assert all(l.sparse and l.codebook_size <= 8 for l in report.layers)


def test_compress_input_unchanged():
  params = mlp_params(4)
  before = [k.copy() for k in kernels(params)]
  qz.chain(qz.pruner(0.5, scope='global'), qz.weight_sharer(2), qz.low_rank_approximator(2))(params)
  for a, b in zip(before, kernels(params)):
    np.testing.assert_array_equal(a, b)
