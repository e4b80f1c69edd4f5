"""qb.compression.error_bound and certified_retrain: QAT with a differentiable bound on |f - f_q| in the loss."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import qbound as qb
from helpers import mlp

Q3 = qb.quantize.uniform_quantizer(bits=3, where=qb.quantize.kernels_only)


@pytest.fixture(scope="module")
def setting():
  # One hidden layer: the bound's compiled steps (and their gradients) stay few.
  n_in, n_out = 5, 3
  model = mlp((8,), n_out)
  params = model.init(jax.random.key(3), jnp.zeros(n_in))
  x = jax.random.uniform(jax.random.key(4), (64, n_in), minval=-1, maxval=1)
  teacher = jax.vmap(functools.partial(model.apply, params))(x)
  return model, params, x, teacher


@pytest.mark.slow  # 13 s; tests/test_compression.py covers error_bound
def test_error_bound_is_the_certified_bound_and_has_gradients(setting):
  model, params, x, _ = setting
  boxes = qb.linf_ball(x[:6], 0.05)
  q = Q3(params)
  bound = qb.compression.error_bound(model.apply, params, q, x[0], key=jax.random.key(0), method="diff-interval")
  value = bound(q, boxes)
  assert value.shape == (6,)
  # The same differential bound as the sound certificate, without its floating-point margins.
  sound = qb.certify_batch(functools.partial(model.apply, params), functools.partial(model.apply, q), boxes,
                           method="diff-interval", progress=False).upper
  assert jnp.allclose(value, sound, rtol=1e-3, atol=1e-5)
  # It follows the parameters passed in (not the ones traced): f_q = f has a zero bound.
  assert float(jnp.max(bound(params, boxes))) <= 1e-6
  grads = jax.grad(lambda q: bound(q, boxes).mean())(q)
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(grads["params"]) if g.ndim == 2)


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_certified_retraining_lowers_the_training_bound(setting):
  """The same dampened distillation run (same key, steps, data) with the bound in the loss ends with a
  lower bound over the training boxes, re-certified soundly, than without it, and both below the start.

  Without dampening neither holds reliably: the straight-through gradient of a loss whose optimum is
  between grid points makes the weights oscillate across the rounding boundaries (Nagel et al. 2022)."""
  model, params, x, teacher = setting
  kwargs = dict(radius=0.05, optimizer=optax.adam(1e-3), steps=60, key=jax.random.key(5), batch_size=32,
                method="diff-interval", dampen=10.0)
  plain = qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), weight=0.0, **kwargs)
  aware = qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), weight=1.0, **kwargs)
  f = functools.partial(model.apply, params)
  boxes = qb.linf_ball(x, 0.05)
  err = lambda shadow: float(jnp.mean(qb.certify_batch(f, functools.partial(model.apply, Q3(shadow)), boxes,
                                                         method="diff-interval", progress=False).upper))
  assert err(aware) < err(plain) < err(params)


def test_weight_zero_is_plain_qat(setting):
  model, params, x, teacher = setting
  kwargs = dict(optimizer=optax.adam(3e-3), steps=5, batch_size=16, loss="mse")
  key = jax.random.key(6)
  ours = qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), radius=0.05, weight=0.0, key=key,
                                          **kwargs)
  # certified_retrain splits its key: the training half is the second.
  qat = qb.quantize.retrain(model.apply, params, Q3, (x, teacher), key=jax.random.split(key)[1], **kwargs)
  assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(qat)))


def test_bad_input_is_refused(setting):
  model, params, x, teacher = setting
  kwargs = dict(radius=0.05, weight=1.0, optimizer=optax.adam(1e-3), steps=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="radius"):
    qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), **dict(kwargs, radius=-1.0))
  with pytest.raises(ValueError, match="weight"):
    qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), **dict(kwargs, weight=-0.1))
  with pytest.raises(ValueError, match="dampen"):
    qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), dampen=-1.0, **kwargs)
  with pytest.raises(ValueError, match="clip"):
    qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), clip=(1.0, 0.0), **kwargs)
  with pytest.raises(ValueError, match="explicit PRNG key"):
    qb.compression.certified_retrain(model.apply, params, Q3, (x, teacher), **dict(kwargs, key=None))
  with pytest.raises(ValueError, match="unknown bound method"):
    qb.compression.error_bound(model.apply, params, Q3(params), x[0], key=jax.random.key(0), method="milp")
  with pytest.raises(ValueError, match="penalty must be a function"):
    qb.quantize.retrain(model.apply, params, Q3, (x, teacher), optimizer=optax.adam(1e-3), steps=1,
                        key=jax.random.key(0), penalty=3.0)


def test_a_weight_computed_from_trained_parameters_is_refused():
  """A kernel scaled by a trained parameter is not a leaf of the graph, so the bound could not follow it."""
  def apply(p, x):
    return jax.nn.relu(x @ (p["params"]["kernel"] * p["params"]["scale"])) @ p["params"]["out"]

  params = {"params": {"kernel": jnp.ones((3, 4)), "scale": jnp.asarray(2.0), "out": jnp.ones((4, 2))}}
  with pytest.raises(ValueError, match="computes node"):
    qb.compression.error_bound(apply, params, params, jnp.zeros(3), key=jax.random.key(0))
  # Training only the parameter that appears as itself makes the others constants, and the bound works.
  bound = qb.compression.error_bound(apply, params, params, jnp.zeros(3), key=jax.random.key(0),
                                     where="params/out")
  assert float(jnp.max(bound(params, qb.linf_ball(jnp.zeros((1, 3)), 0.1)))) <= 1e-6


@pytest.mark.parametrize("name", [pytest.param("qbound.certified_training", marks=pytest.mark.slow),  # 19 s
                                  "qbound.compression"])
def test_docstring_examples(name):
  import doctest
  import importlib

  result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0


def test_interval_training_bound_covers_sampled_errors(setting):
  """IBP on the merged network: looser than the differential bound, but still above every error reached."""
  model, params, x, _ = setting
  boxes = qb.linf_ball(x[:6], 0.05)
  q = Q3(params)
  bound = qb.compression.error_bound(model.apply, params, q, x[0], key=jax.random.key(0), method="interval")
  value = bound(q, boxes)
  u = jax.random.uniform(jax.random.key(9), (100, *boxes.lower.shape))
  pts = boxes.lower + u * (boxes.upper - boxes.lower)
  f, fq = functools.partial(model.apply, params), functools.partial(model.apply, q)
  reached = jnp.max(jnp.abs(jax.vmap(jax.vmap(f))(pts) - jax.vmap(jax.vmap(fq))(pts)), axis=(0, 2))
  assert value.shape == (6,) and bool(jnp.all(reached <= value))
