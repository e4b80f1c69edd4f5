"""Dynamically scaled activation quantization (qbound.dynamic_rounding, qbound.trace.dynamic) without qwix.

What is checked: the bounds of a dynamic rounding node hold at sampled inputs of random boxes (the
band and the single-step bounds, as float32 computes the scale and the quotient, both ways XLA may);
the pattern written by hand traces to one node beside f's identity, pairs, and its certificate
holds against sampling; what is not the pattern (a scale per row) fails naming the line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from qbound import dynamic_rounding as DR

import helpers as H

SPECS = [DR.DynamicScale(127.5, -128, 127, guard=("lt", float(np.sqrt(np.finfo(np.float32).tiny)), 1.0)),
         DR.DynamicScale(7.5, -8, 7, rounding="away"),
         DR.DynamicScale(127.5 / 0.9, -128, 127)]  # qwix's "absmax,0.9": the largest entries saturate


def _library(spec, x, reciprocal):
  """The library's float32 computation (``x / s``, or ``x * (1 / s)`` as XLA may rewrite it)."""
  s = jnp.max(jnp.abs(x)) / spec.divisor
  if spec.guard is not None:
    s = jnp.where(s < spec.guard[1], spec.guard[2], s)
  z = x * (1 / s) if reciprocal else x / s
  r = jnp.round(z) if spec.rounding == "nearest" else jax.lax.round(z, jax.lax.RoundingMethod.AWAY_FROM_ZERO)
  return s * jnp.clip(r, spec.low, spec.high)


@pytest.mark.parametrize("spec", SPECS)
def test_bounds_hold_at_sampled_inputs(spec):
  rng = np.random.default_rng(0)
  n, width = 120, 6
  centre = rng.normal(size=(n, width)) * rng.choice([1e-3, 1.0, 30.0], size=(n, 1))
  radius = np.abs(rng.normal(size=(n, width))) * rng.choice([0.0, 1e-4, 1e-2, 0.3], size=(n, 1)) * np.abs(centre).max(1, keepdims=True)
  lo, hi = (centre - radius).astype(np.float32), (centre + radius).astype(np.float32)
  half, flat, v_lo, v_hi = (np.asarray(a) for a in DR.bounds(spec, jnp.asarray(lo), jnp.asarray(hi), 1))
  assert flat.any() and (~flat).any()  # both kinds of bounds are exercised
  xs = lo[:, None] + rng.uniform(size=(n, 100, width)).astype(np.float32) * (hi - lo)[:, None]
  xs = np.concatenate([xs, lo[:, None], hi[:, None]], axis=1)
  for reciprocal in (False, True):
    q = np.asarray(jax.vmap(jax.vmap(lambda x: _library(spec, x, reciprocal)))(jnp.asarray(xs)))
    assert np.all(np.abs(q.astype(np.float64) - xs) <= half[:, None] * (1 + 1e-6))
    inside = (q >= v_lo[:, None]) & (q <= v_hi[:, None])
    assert np.all(inside | ~flat[:, None])


def _fq(w1, b1, w2):
  def quantized_dense(x, w):
    s = jnp.max(jnp.abs(x)) / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    c = jnp.round(x / s).astype(jnp.int8)  # saturates at [-128, 127]
    return (c.astype(jnp.float32) @ w) * s

  return lambda x: quantized_dense(jax.nn.relu(quantized_dense(x, w1) + b1), w2)


def test_hand_written_pattern_pairs_and_is_sound():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w1, w2 = jax.random.normal(k1, (3, 8)), jax.random.normal(k2, (8, 2))
  b1 = 0.1 * jax.random.normal(k3, (8,))
  f = lambda x: jax.nn.relu(x @ w1 + b1) @ w2  # noqa: E731
  fq = _fq(w1, b1, w2)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert merged.paired
  assert [n.attrs[0] for n in merged.fq_graph.nodes if n.kind == "round"] == ["dynamic", "dynamic"]
  points = H.sample_points(box, 3000)
  np.testing.assert_allclose(np.asarray(jax.vmap(merged.fq_graph)(jnp.asarray(points, jnp.float32))),
                             np.asarray(jax.vmap(fq)(jnp.asarray(points, jnp.float32))), atol=1e-5)
  for method in ("interval", "diff"):
    cert = qb.certify(f, fq, box, method=method)
    assert np.max(np.abs(H.eval64(merged, points))) <= cert.upper
    errors = np.abs(np.asarray(jax.vmap(f)(jnp.asarray(points, jnp.float32)) - jax.vmap(fq)(jnp.asarray(points, jnp.float32))))
    assert errors.max() <= cert.upper * (1 + 1e-5)
    assert 0 < cert.lower <= cert.upper


def test_a_box_where_the_guard_may_fire_is_sound():
  """Near 0 the scale falls below qwix's guard (s -> 1, q = 0): covered, not refused."""
  k1, k2 = jax.random.split(jax.random.key(1))
  w1, w2, b1 = jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (4, 2)), jnp.full(4, 1e-19)
  fq = _fq(w1, b1, w2)
  f = lambda x: jax.nn.relu(x @ w1 + b1) @ w2  # noqa: E731
  box = qb.Box(jnp.full(3, -1e-18), jnp.full(3, 1e-18))
  cert = qb.certify(f, fq, box, method="diff")
  xs = jnp.asarray(H.sample_points(box, 500), jnp.float32)
  assert np.max(np.abs(np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))) <= cert.upper


def test_a_scale_per_row_is_refused_naming_the_line():
  w = jnp.ones((3, 2))

  def fq(x):  # x: (2, 3), one scale per row
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return (jnp.round(x / s) @ w) * s

  with pytest.raises(qb.UnsupportedPrimitiveError) as err:
    qb.merge(lambda x: x @ w, fq, qb.Box(-jnp.ones((2, 3)), jnp.ones((2, 3))))
  assert "test_trace_dynamic.py" in str(err.value)
