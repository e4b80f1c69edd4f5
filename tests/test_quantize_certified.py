"""Every compression scheme, end to end: certify's upper bound holds against sampled errors.

One net structure for all schemes, so bound propagation compiles once (weights are arguments) and
the whole file stays within seconds. The sampled error comes from an independent dense sample
(uniform points plus random box vertices), not from certify's own search.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qbound as qb
from qbound import quantize as qz

import helpers

SIZES = (8, 8, 3)
BOX = qb.Box(lower=-jnp.ones(5), upper=jnp.linspace(-0.5, 1.0, 5))


def _params():
  return helpers.biased_mlp_params(seed=3, sizes=SIZES)


def _ttq(params):
  return qz.trained_ternary(params, qz.init_ttq_scales(params))


WEIGHT_SCHEMES = {
    "uniform-4": lambda p: qz.uniform(p, bits=4),
    "uniform-3-per-channel": lambda p: qz.uniform(p, bits=3, per_channel=True),
    "uniform-4-asymmetric": lambda p: qz.uniform(p, bits=4, symmetric=False),
    "uniform-4-floor": lambda p: qz.uniform(p, bits=4, rounding="floor"),
    "uniform-4-stochastic": lambda p: qz.uniform(p, bits=4, rounding="stochastic", key=jax.random.key(7)),
    "fixed-point-6": lambda p: qz.fixed_point(p, bits=6),
    "power-of-two-4": lambda p: qz.power_of_two(p, bits=4),
    "ternary": qz.ternary,
    "trained-ternary": _ttq,
    "binary": qz.binary,
    "float16": lambda p: qz.float_format(p, "float16"),
    "bfloat16": lambda p: qz.float_format(p, "bfloat16"),
    "float8-e4m3": lambda p: qz.float_format(p, "float8_e4m3fn"),
    "float8-e5m2": lambda p: qz.float_format(p, "float8_e5m2"),
    "policy-8-first-4-rest": qz.by_path([(["*/Dense_0/kernel", "*/Dense_2/kernel"], qz.uniform_quantizer(bits=8)),
                                         ("*/kernel", qz.uniform_quantizer(bits=4))]),
    "prune-50": lambda p: qz.prune(p, 0.5),
    "prune-global-50": lambda p: qz.prune(p, 0.5, scope="global"),
    "share-3": lambda p: qz.share_weights(p, bits=3),
    "low-rank-2": lambda p: qz.low_rank(p, rank=2),
    "prune-share-quantize": qz.chain(qz.pruner(0.5), qz.weight_sharer(bits=3),
                                     qz.uniform_quantizer(bits=6, where=qz.kernels_only)),
}


def _sampled_error(f, fq, box, n=4096):
  xs = qb.box.sample_uniform(jax.random.key(11), box, n)
  xs = jnp.concatenate([xs, qb.box.sample_vertices(jax.random.key(12), box, 64)])
  errors = jnp.abs(jax.vmap(f)(xs) - jax.vmap(fq)(xs))
  return float(jnp.max(errors))


def _check(f, fq, box, methods=("crown", "diff")):
  reached = _sampled_error(f, fq, box)
  assert reached > 0, "the scheme changed nothing; the check would be empty"
  for method in methods:
    cert = qb.certify(f, fq, box, method=method)
    assert cert.lower <= cert.upper
    assert reached <= cert.upper, f"{method}: sampled {reached} above the certified {cert.upper}"
  return reached


@pytest.mark.parametrize("name", sorted(WEIGHT_SCHEMES))
def test_weight_scheme_is_certified_soundly(name):
  model = helpers.BiasedMLP(SIZES)
  params = _params()
  qparams = WEIGHT_SCHEMES[name](params)
  assert jax.tree_util.tree_structure(qparams) == jax.tree_util.tree_structure(params)
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, qparams)
  _check(f, fq, BOX)


def _calibration(model, params):
  xs = qb.box.sample_uniform(jax.random.key(5), BOX, 256)
  return xs, qz.calibrate(model.apply, params, xs)


@pytest.mark.parametrize("bits", [3, 5])
def test_direct_activation_quantization_with_quantized_weights_is_certified(bits):
  model = helpers.BiasedMLP(SIZES)
  params = _params()
  _, ranges = _calibration(model, params)
  fq_apply = qz.quantize_activations(model.apply, ranges, bits=bits)
  f = functools.partial(model.apply, params)
  fq = functools.partial(fq_apply, qz.uniform(params, bits=8))
  _check(f, fq, BOX, methods=("interval", "crown"))


def test_dqa_is_certified_soundly():
  model = helpers.BiasedMLP(SIZES)
  params = _params()
  xs, _ = _calibration(model, params)
  fq_apply, report = qz.dqa(model.apply, params, xs, bits=3, extra_bits=2, important_fraction=0.25)
  assert report is not None
  f = functools.partial(model.apply, params)
  fq = functools.partial(fq_apply, params)
  _check(f, fq, BOX, methods=("interval", "crown"))


def test_retrained_network_is_certified_soundly():
  """A straight-through retrained copy (different weights, same structure) certifies like any other."""
  model = helpers.BiasedMLP(SIZES)
  params = _params()
  xs = qb.box.sample_uniform(jax.random.key(9), BOX, 64)
  targets = jax.vmap(functools.partial(model.apply, params))(xs)

  retrained = qz.retrain(model.apply, params, qz.uniform_quantizer(bits=3), (xs, targets),
                         optimizer=optax.adam(1e-2), steps=20, key=jax.random.key(1), loss="mse")
  qparams = qz.uniform(retrained, bits=3)
  np.testing.assert_array_equal(np.asarray(qz.uniform(qparams, bits=3)["params"]["Dense_0"]["kernel"]),
                                np.asarray(qparams["params"]["Dense_0"]["kernel"]))
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, qparams)
  _check(f, fq, BOX)
