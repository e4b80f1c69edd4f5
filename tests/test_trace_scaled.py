"""Rescaled products (qbound.trace.scaled) and integer arithmetic in traced functions.

Libraries that compute in integers write a layer as ``(q @ W_int) * s + b``: the tracer keeps the
scale beside the product (one op, the same float operations), the merge pairs it with the float
model's product, and integer conversions and products become exact clips and float products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
import helpers as H
from qbound.trace.scaled import ScaledOp, fuse_scales

RNG = np.random.default_rng(0)
W = jnp.asarray(RNG.normal(size=(5, 7)), jnp.float32)
B = jnp.asarray(RNG.normal(size=7) * 0.1, jnp.float32)
W2 = jnp.asarray(RNG.normal(size=(7, 3)), jnp.float32)


def _int8(w):
  """AQT-style per-output-channel int8 weights and their scales."""
  scale = jnp.max(jnp.abs(w), axis=0) / 127.0
  return jnp.round(w / scale), scale


def _float_net(x):
  return jax.nn.relu(x @ W + B) @ W2


def _rescaled_net(x):
  w1, s1 = _int8(W)
  w2, s2 = _int8(W2)
  return (jax.nn.relu((x @ w1) * s1 + B) @ w2) * s2


def _box():
  return qb.Box(-jnp.ones(5), jnp.ones(5))


def test_fused_op_is_linear_and_consistent():
  g = fuse_scales(qb.trace(_rescaled_net, jnp.zeros(5)))
  node = g.nodes[1]
  assert isinstance(node.op, ScaledOp) and node.op.per_channel and node.op.terms == 5 + 1
  x = jnp.asarray(RNG.normal(size=5), jnp.float32)
  y = jnp.asarray(RNG.normal(size=7), jnp.float32)
  spec = jax.ShapeDtypeStruct((5,), jnp.float32)
  expected = jax.linear_transpose(lambda v: node.linear(v), spec)(y)[0]
  np.testing.assert_allclose(node.linear_transpose(y), expected, rtol=1e-6)
  np.testing.assert_allclose(node.linear_abs(jnp.abs(x)), jnp.abs(x) @ jnp.abs(_int8(W)[0] * _int8(W)[1]), rtol=1e-5)
  np.testing.assert_allclose(node.op.folded_weight(node.weights), _int8(W)[0] * _int8(W)[1], rtol=1e-6)
  np.testing.assert_allclose(g(x), _rescaled_net(x), rtol=1e-6)


def test_rescaled_network_pairs_and_its_bounds_hold():
  merged = qb.merge(_float_net, _rescaled_net, _box())
  assert merged.paired
  points = H.sample_points(_box(), 3000)
  values = H.eval64(merged, points)
  for method in ("diff", "crown"):
    cert = qb.certify(_float_net, _rescaled_net, _box(), method=method)
    assert np.all(values >= cert.diff_lower) and np.all(values <= cert.diff_upper), method
  # The differential bound is close to the one on weights folded in float (an other network).
  folded = lambda x: jax.nn.relu(x @ (_int8(W)[0] * _int8(W)[1]) + B) @ (_int8(W2)[0] * _int8(W2)[1])  # noqa: E731
  paired = qb.certify(_float_net, _rescaled_net, _box(), method="diff").upper
  assert paired <= 1.01 * qb.certify(_float_net, folded, _box(), method="diff").upper


def test_saturating_integer_conversion_is_a_clip():
  def fq(x):
    q = jnp.round(x / 0.01).astype(jnp.int8)  # saturates at -128 and 127 (XLA clamps)
    acc = jax.lax.dot_general(q, jnp.ones((3, 2), jnp.int8), (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * 0.01

  g = qb.trace(fq, jnp.zeros(3))
  assert [n.kind for n in g.nodes][:4] == ["input", "affine", "round", "clip"]
  x = jnp.array([0.3, -2.0, 1.5])  # -2.0 and 1.5 saturate
  np.testing.assert_allclose(g(x), fq(x), rtol=1e-6)


def test_integer_steps_that_change_values_are_refused():
  with pytest.raises(qb.UnsupportedPrimitiveError, match="rounds"):
    qb.trace(lambda x: (x * 3).astype(jnp.int8).astype(jnp.float32), jnp.zeros(2))  # truncation
  with pytest.raises(qb.UnsupportedPrimitiveError, match="rounds"):
    qb.trace(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), jnp.zeros(2))
  big = jnp.full((4096, 2), 127, jnp.int8)

  def overflowing(x):
    q = jnp.round(x).astype(jnp.int8)
    return jax.lax.dot_general(q, big, (((0,), (0,)), ((), ())), preferred_element_type=jnp.int16).astype(jnp.float32)

  with pytest.raises(qb.UnsupportedPrimitiveError, match="overflow"):
    qb.trace(overflowing, jnp.zeros(4096))


def test_rescaled_product_exports_as_its_own_float_operations(tmp_path):
  onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'qbound[onnx]')")
  merged = qb.merge(_float_net, _rescaled_net, _box())
  path = tmp_path / "merged.onnx"
  qb.io.export_onnx(merged, path)
  kinds = [n.op_type for n in onnx.load(path).graph.node]
  assert kinds[:2] == ["MatMul", "Mul"]  # the product, then the scale (not a matrix of rounded products)
  apply, params = qb.io.load_onnx(path)
  for x in H.sample_points(_box(), 20).astype(np.float32):
    np.testing.assert_array_equal(np.asarray(apply(params, x)).reshape(-1), np.asarray(merged(x)))


@pytest.mark.slow  # about a minute: 12 random pairs, three methods each
@pytest.mark.parametrize("seed", range(12))
def test_random_rescaled_pairs_are_sound(seed):
  """Random integer-weight nets, per-channel scales, with and without static activation rounding."""
  rng = np.random.default_rng(seed)
  w1, w2 = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=(6, 2)).astype(np.float32)
  b1 = rng.normal(size=6).astype(np.float32)
  q = 2 ** (int(rng.integers(2, 9)) - 1) - 1
  s1, s2 = (np.abs(w1).max(0) / q).astype(np.float32), (np.abs(w2).max(0) / q).astype(np.float32)
  q1, q2 = np.round(w1 / s1).astype(np.float32), np.round(w2 / s2).astype(np.float32)
  s_a, rounded = np.float32(rng.uniform(0.01, 0.2)), bool(rng.integers(0, 2))

  def f(x):
    return jax.nn.relu(x @ w1 + b1) @ w2

  def fq(x):
    if rounded:
      x = jnp.clip(jnp.round(x / s_a), -q, q)
      return (jax.nn.relu((x @ q1) * s_a * s1 + b1) @ q2) * s2
    return (jax.nn.relu((x @ q1) * s1 + b1) @ q2) * s2

  box = qb.Box(-jnp.ones(3) * rng.uniform(0.2, 1.5), jnp.ones(3) * rng.uniform(0.2, 1.5))
  merged = qb.merge(f, fq, box)
  assert merged.paired
  values = H.eval64(merged, H.sample_points(box, 4000, seed))
  for method in ("diff", "crown", "bab"):
    cert = qb.certify(f, fq, box, method=method, time_budget=3)
    assert np.all(values >= cert.diff_lower) and np.all(values <= cert.diff_upper), method
