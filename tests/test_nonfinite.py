"""Results that overflow float32: never a NaN bound, never a NaN reached error, always valid JSON.

A box of +-3e38 or weights scaled by 1e13 used to give a certificate whose upper bound was NaN
(and JSON with a bare NaN). Now a NaN anywhere in the bounds raises qb.BoundOverflowError; an upper
bound that overflows to +inf without NaN is returned (it is sound: it proves nothing) with a
qb.InfiniteBoundWarning; the lower-bound search skips inputs where the networks overflow.
"""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from qbound import attack


def strict_loads(text):
  def refuse(word):
    raise ValueError(f"bare {word} in JSON")

  return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def mlp():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
  params = model.init(jax.random.key(0), jnp.zeros(5))
  return model, params


@pytest.mark.parametrize("method", ["interval", "crown"])
def test_huge_box_raises_instead_of_a_nan_upper(mlp, method):
  model, params = mlp
  f = lambda x: model.apply(params, x)
  fq = lambda x: model.apply(qb.quantize.uniform(params, bits=4), x)
  box = qb.Box(-3e38 * jnp.ones(5), 3e38 * jnp.ones(5))
  with pytest.raises(qb.BoundOverflowError, match="overflowed"):
    qb.certify(f, fq, box, method=method)
  with pytest.raises(qb.BoundOverflowError, match="box 0"):
    qb.certify_batch(f, fq, qb.Box(box.lower[None], box.upper[None]), method=method, progress=False)


def test_huge_weights_give_a_finite_certificate_and_valid_json(mlp):
  model, params = mlp
  big = jax.tree_util.tree_map(lambda w: w * 1e13, params)
  f = lambda x: model.apply(big, x)
  fq = lambda x: model.apply(qb.quantize.uniform(big, bits=4), x)
  cert = qb.certify(f, fq, qb.Box(-jnp.ones(5), jnp.ones(5)), method="crown")
  assert np.isfinite(cert.upper) and 0 < cert.lower <= cert.upper
  strict_loads(cert.to_json())


# f and fq scale the input by 10 and 10.5: on [0, 3e37] their interval bounds overflow to +-inf
# without ever subtracting inf from inf, so the upper bound is +inf, not NaN.
W = jnp.array([[1.0, -2.0], [0.5, 3.0]])
F = lambda x: 10.0 * (x @ W)
FQ = lambda x: 10.5 * (x @ W)


def test_infinite_upper_bound_warns_and_writes_strict_json():
  box = qb.Box(jnp.zeros(2), jnp.full(2, 3e37))
  with pytest.warns(qb.InfiniteBoundWarning, match="proven upper bound is inf"):
    cert = qb.certify(F, FQ, box, method="interval")
  assert cert.upper == np.inf and np.isfinite(cert.lower) and cert.lower > 0
  assert not cert.proves(1e300)
  data = strict_loads(cert.to_json())
  assert data["upper"] == "Infinity"
  assert qb.Certificate.from_json(cert.to_json()).upper == np.inf


def test_infinite_upper_bound_in_a_batch():
  boxes = qb.Box(jnp.zeros((2, 2)), jnp.stack([jnp.full(2, 3e37), jnp.ones(2)]))
  with pytest.warns(qb.InfiniteBoundWarning, match="for 1 of 2 boxes"):
    batch = qb.certify_batch(F, FQ, boxes, method="interval", progress=False)
  assert batch.upper[0] == np.inf and np.isfinite(batch.upper[1])
  assert not np.isnan(batch.lower).any()
  back = qb.BatchCertificate.from_json(batch.to_json())
  np.testing.assert_array_equal(back.upper, batch.upper)
  strict_loads(batch.to_json())


def test_search_never_picks_an_input_where_the_function_is_nan():
  # exp(x) * 0 is 0 where exp(x) is finite and NaN where it overflows (x > 88.7): most of the box.
  fn = lambda x: jnp.exp(x) * 0.0 + jnp.sin(x)
  value, x = qb.maximize_error(fn, qb.Box(jnp.full(1, -100.0), jnp.full(1, 1000.0)))
  assert not np.isnan(value) and 0.9 < value <= 1.0 and float(x[0]) < 88.8


def test_search_where_everything_overflows_returns_minus_inf_not_nan():
  fn = lambda x: jnp.exp(x) * 0.0
  value, x = qb.maximize_error(fn, qb.Box(jnp.full(2, 100.0), jnp.full(2, 200.0)))
  assert value == -np.inf and x.shape == (2,)


def test_float64_overflow_at_the_witness_raises():
  def huge(x):
    for _ in range(9):  # (3e38)^9 overflows float64 too
      x = x * 3e38
    return x

  graph = qb.trace(lambda x: huge(x) * 0.0 + x, jnp.zeros(2))  # inf * 0 is NaN
  with pytest.raises(qb.BoundOverflowError, match=r"float64 at x = \[1.0, 1.0\] gave NaN"):
    attack.exact_error(graph, np.ones(2))
  with pytest.raises(qb.BoundOverflowError, match=r"x = \[2.0, 2.0\]"):
    attack.exact_errors(graph, np.array([[0.0, 0.0], [2.0, 2.0]]))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(attack.exact_errors(graph, np.zeros((2, 2))), np.zeros((2, 2)))
