"""Certifying activation-quantized networks: rounding is bounded as a staircase, never as identity."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from qbound import graph as G

MODEL = nn.Sequential([nn.Dense(12), nn.relu, nn.Dense(12), nn.relu, nn.Dense(3)])
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros(4))
CALIB = jax.random.uniform(jax.random.key(1), (64, 4), minval=-1, maxval=1)
BOX = qb.Box(-jnp.ones(4), jnp.ones(4))


def sampled_max(f, fq, n=20000):
  xs = np.asarray(qb.box.sample_uniform(jax.random.key(3), BOX, n), np.float64)
  return float(np.max(np.abs(jax.vmap(f)(xs) - jax.vmap(fq)(xs))))


@pytest.mark.slow  # compiling the differential bounds of a rounding graph takes minutes on 2 cores
@pytest.mark.parametrize("bits, symmetric", [(4, False)])
def test_direct_activation_quantization_is_certified_soundly(bits, symmetric):
  ranges = qb.quantize.calibrate(MODEL.apply, PARAMS, CALIB)
  fq_apply = qb.quantize.quantize_activations(MODEL.apply, ranges, bits, symmetric=symmetric)
  f = functools.partial(MODEL.apply, PARAMS)
  fq = functools.partial(fq_apply, PARAMS)
  merged = qb.merge(f, fq, BOX)
  assert any(n.kind == G.ROUND for n in merged.fq_graph.nodes)
  assert merged.paired, "the fake-quant steps should align with identities in f"
  cert = qb.certify(f, fq, BOX, method="diff")
  reached = sampled_max(f, fq)
  assert cert.lower <= cert.upper
  assert reached <= cert.upper + 1e-6
  # Far tighter than the generic bound on the merged network.
  assert cert.upper < qb.bounds.crown(merged, BOX).upper.max()


def test_rounding_alone_is_not_treated_as_identity():
  f = lambda x: x @ jnp.ones((2, 1))
  fq = lambda x: jnp.round(x * 4) / 4 @ jnp.ones((2, 1))
  box = qb.Box(jnp.zeros(2), jnp.ones(2))
  for method in ("interval", "crown", "diff"):
    cert = qb.certify(f, fq, box, method=method)
    # Each input loses up to 1/8 to rounding: the error reaches 1/4 near x = (1/8, 1/8).
    assert cert.upper >= 0.25 - 1e-6, method


@pytest.mark.parametrize("tie, away, even", [(0.5, 1.0, 0.0), (2.5, 3.0, 2.0), (-1.5, -2.0, -2.0)])
def test_halves_round_as_the_network_rounds_them(tie, away, even):
  """jax.lax.round rounds halves away from zero, jnp.round to even: the graph, the bounds and the
  reached error follow the function's own rule (a box on the tie itself shows any mix-up)."""
  box = qb.Box(jnp.full(1, tie), jnp.full(1, tie))
  for rounding, want in ((jax.lax.round, away), (jnp.round, even)):
    fq = lambda x: rounding(x) * 1.0
    f = lambda x: x * 0.0
    assert float(qb.trace(fq, box)(jnp.full(1, tie))[0]) == want
    for method in ("interval", "crown", "milp"):
      cert = qb.certify(f, fq, box, method=method)
      assert cert.lower == abs(want) and cert.upper >= abs(want), (rounding, method)


def test_alignment_rejects_a_scaling_that_does_not_cancel():
  f = lambda x: jax.nn.relu(x @ jnp.ones((2, 3))) @ jnp.ones((3, 1))
  fq = lambda x: (jax.nn.relu(x @ jnp.ones((2, 3))) * 0.5) @ jnp.ones((3, 1))
  merged = qb.merge(f, fq, qb.Box(jnp.zeros(2), jnp.ones(2)))
  assert not merged.paired  # f * 0.5 is not f: no identity to insert
  x = jnp.array([0.3, 0.7])
  np.testing.assert_allclose(merged(x), f(x) - fq(x), rtol=1e-6)
