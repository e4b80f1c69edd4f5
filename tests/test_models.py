"""Tests of qbound.models (the zoo) and the issue's must-show certificates on models written by a
user: a linen ``@nn.compact`` residual CNN with tanh and max pooling, and the same in flax nnx,
both with 8-bit weights, certified soundly against sampling.

The certificates use CROWN on the merged network in the default suite (seconds to compile);
``certify(method="auto")``, which adds the differential and optimised bounds and branch and bound,
compiles for minutes on these graphs and runs in the slow tests.
"""

import doctest
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers as H
import qbound as qb
from qbound import models

# --- the zoo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", sorted(models.ACTIVATIONS))
def test_mlp_traces_exactly_with_every_activation(activation):
  model = models.MLP(features=(6, 5, 2), activation=activation)
  params = model.init(jax.random.key(0), jnp.zeros(3))
  f = functools.partial(model.apply, params)
  graph = qb.trace(f, jnp.zeros(3))
  xs = 2 * jax.random.normal(jax.random.key(1), (32, 3))
  np.testing.assert_allclose(jax.vmap(graph)(xs), jax.vmap(f)(xs), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(model.apply(params, xs), jax.vmap(f)(xs), atol=1e-6)  # batched = unbatched


@pytest.mark.parametrize("model", [
    models.CNN(channels=(2, 3), features=(5,), outputs=3, pool="max"),
    models.CNN(channels=(2,), features=(), outputs=2, pool="avg", activation="sigmoid"),
    models.ResidualCNN(channels=2, blocks=2, outputs=3, activation="tanh"),
    models.ResidualCNN(channels=2, blocks=1, outputs=2, activation="leaky_relu", pool="avg"),
], ids=["cnn-max", "cnn-avg-sigmoid", "residual-tanh", "residual-leaky-avg"])
def test_conv_models_take_one_image_or_a_batch_and_trace_exactly(model):
  with jax.numpy_dtype_promotion("standard"):  # flax's avg_pool divides by a Python int
    params = model.init(jax.random.key(0), jnp.zeros((4, 4, 1)))
    f = functools.partial(model.apply, params)
    xs = jax.random.normal(jax.random.key(1), (6, 4, 4, 1))
    np.testing.assert_allclose(model.apply(params, xs), jax.vmap(f)(xs), atol=1e-5)
    graph = qb.trace(f, jnp.zeros((4, 4, 1)))
    np.testing.assert_allclose(jax.vmap(graph)(xs), jax.vmap(f)(xs), atol=1e-5, rtol=1e-5)
  assert graph.input_shape == (4, 4, 1)


def test_residual_cnn_has_residual_additions_and_pooling():
  model = models.ResidualCNN(channels=2, blocks=2, outputs=2)
  params = model.init(jax.random.key(0), jnp.zeros((4, 4, 1)))
  graph = qb.trace(functools.partial(model.apply, params), jnp.zeros((4, 4, 1)))
  adds_of_two_convs = [n for n in graph.nodes if n.kind == "add" and len(n.inputs) == 2]
  assert len(adds_of_two_convs) >= 2
  assert sum(1 for n in graph.nodes if n.op is not None and n.op.name == "conv_general_dilated") == 5


def test_unknown_activation_and_pooling_are_reported():
  with pytest.raises(ValueError, match="unknown activation 'swish'"):
    models.MLP(features=(2,), activation="swish").init(jax.random.key(0), jnp.zeros(2))
  with pytest.raises(ValueError, match="unknown pooling 'median'"):
    models.CNN(channels=(1,), pool="median").init(jax.random.key(0), jnp.zeros((4, 4, 1)))


def test_docstring_examples():
  result = doctest.testmod(models, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


# --- must show: certificates on user-written residual CNNs with tanh and max pooling -------------


class ResidualTanhCNN(nn.Module):
  """Written as a user would: one (H, W, C) image in, a residual block with tanh, max pooling."""

  @nn.compact
  def __call__(self, x):
    x = x[None]  # one batch axis for every layer
    x = nn.tanh(nn.Conv(2, (2, 2))(x))
    x = x + nn.Conv(2, (2, 2))(nn.tanh(nn.Conv(2, (2, 2))(x)))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(2)(x.reshape(-1))


class NnxResidualTanhCNN(nnx.Module):
  """The same in flax nnx, with batch norm (in eval mode) after the first convolution."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 2, (2, 2), rngs=rngs)
    self.norm = nnx.BatchNorm(2, rngs=rngs)
    self.conv2 = nnx.Conv(2, 2, (2, 2), rngs=rngs)
    self.conv3 = nnx.Conv(2, 2, (2, 2), rngs=rngs)
    self.out = nnx.Linear(2, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.tanh(self.norm(self.conv1(x[None])))
    x = x + self.conv3(nnx.tanh(self.conv2(x)))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.out(x.reshape(-1))


SHAPE = (2, 2, 1)


def linen_pair(seed):
  model = ResidualTanhCNN()
  params = model.init(jax.random.key(seed), jnp.zeros(SHAPE))
  qparams = qb.quantize.uniform(params, bits=8)
  return functools.partial(model.apply, params), functools.partial(model.apply, qparams)


def nnx_pair(seed):
  model = NnxResidualTanhCNN(nnx.Rngs(seed))
  model.norm.mean[...] = jax.random.normal(jax.random.key(seed + 1), (2,)) * 0.1
  model.norm.var[...] = jax.random.uniform(jax.random.key(seed + 2), (2,), minval=0.5, maxval=2.0)
  model.eval()
  graphdef, state = nnx.split(model)
  qstate = qb.quantize.uniform(state, bits=8)
  return (lambda x: nnx.merge(graphdef, state)(x)), (lambda x: nnx.merge(graphdef, qstate)(x))


def box_for(seed):
  center = jax.random.uniform(jax.random.key(100 + seed), SHAPE, minval=-1, maxval=1)
  return qb.linf_ball(center, 0.1)


def assert_certificate_sound(f, fq, box, method, seed):
  with jax.numpy_dtype_promotion("standard"):  # the lower-bound search uses optax
    cert = qb.certify(f, fq, box, method=method, search=H.search(), time_budget=20)
  merged = qb.merge(f, fq, box)
  reached = H.max_error(merged, H.sample_points(box, 4000, seed))
  assert 0 < cert.lower <= cert.upper
  assert reached <= cert.upper, f"sampled error {reached} above the proven {cert.upper}"
  # f and f_q really are the user's functions: the witness's error is theirs.
  x = jnp.asarray(cert.witness, jnp.float32)
  np.testing.assert_allclose(cert.lower_float32, float(jnp.max(jnp.abs(f(x) - fq(x)))), rtol=1e-6)
  return cert, reached


@pytest.mark.parametrize("seed", [pytest.param(0, marks=pytest.mark.slow), 1])  # 10 s each
def test_linen_residual_tanh_maxpool_cnn_is_certified_soundly(seed):
  f, fq = linen_pair(seed)
  cert, reached = assert_certificate_sound(f, fq, box_for(seed), "crown", seed)
  assert cert.upper < 50 * max(reached, 1e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_nnx_residual_tanh_maxpool_cnn_is_certified_soundly(seed):
  f, fq = nnx_pair(seed)
  cert, reached = assert_certificate_sound(f, fq, box_for(seed), "crown", seed)
  assert cert.upper < 50 * max(reached, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("make", [linen_pair, nnx_pair], ids=["linen", "nnx"])
def test_auto_certificate_on_residual_tanh_maxpool_cnns(make):
  """``auto`` (differential, optimised, branch and bound) gets within a few percent of sampling."""
  f, fq = make(0)
  cert, reached = assert_certificate_sound(f, fq, box_for(0), "auto", 0)
  assert cert.method.startswith(("diff", "bab"))
  assert cert.upper <= 1.5 * cert.lower
