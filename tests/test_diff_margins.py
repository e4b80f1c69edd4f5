"""Rounding margins of sound-mode bounds, checked against exact rational arithmetic.

The networks normalise their input as the .nnet benchmarks do (``(clip(x) - mean) / range``, an
elementwise division node) before two dense layers. Every value of ``f(x) - f_q(x)`` is computed
with :class:`fractions.Fraction` from the float32 weights, so "sound" here means: the bound holds
for the real-arithmetic networks, not only up to float64 rounding. The regimes stress the margins:
massive cancellation (inputs near a large mean, divided by a small range, large weights of both
signs), products near float32's overflow, and products in the subnormal range (which XLA on CPU
flushes to zero).
"""

from __future__ import annotations

import importlib
import itertools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qbound as qb

diff_module = importlib.import_module("qbound.bounds.diff")

N_IN, N_HIDDEN, N_OUT = 5, 7, 2


def _net(p):
  """``W2 relu(W1 ((clip(x, lo, hi) - mean) / rng) + b1) + b2`` with float32 constants ``p``."""
  c = {k: jnp.asarray(v) for k, v in p.items()}
  return lambda x: jax.nn.relu(((jnp.clip(x, c["lo"], c["hi"]) - c["mean"]) / c["rng"]) @ c["w1"] + c["b1"]) @ c["w2"] + c["b2"]


def _exact(p, x):
  """The network's output at ``x`` in exact rational arithmetic (float32 constants read exactly)."""
  q = lambda a: [Fraction(float(v)) if np.isfinite(v) else float(v) for v in np.ravel(a)]  # clips may be at +-inf
  lo, hi, mean, rng, b1, b2 = q(p["lo"]), q(p["hi"]), q(p["mean"]), q(p["rng"]), q(p["b1"]), q(p["b2"])
  w1 = np.asarray(p["w1"]).tolist()
  w2 = np.asarray(p["w2"]).tolist()
  h0 = [(min(max(Fraction(float(v)), lo[i]), hi[i]) - mean[i]) / rng[i] for i, v in enumerate(x)]
  h1 = [max(sum((h0[i] * Fraction(w1[i][j]) for i in range(len(h0))), b1[j]), 0) for j in range(len(b1))]
  return [sum((h1[j] * Fraction(w2[j][k]) for j in range(len(h1))), b2[k]) for k in range(len(b2))]


def _pair(seed: int, regime: str, equal: np.ndarray):
  """Parameters of f and f_q: f_q's weights moved by about 2^-11 relative (a float16-like copy);
  its ranges equal f's where ``equal`` holds, moved by one part in 2^11 elsewhere."""
  rs = np.random.default_rng(seed)
  scale_x, scale_w, mean, rng_scale = {
      "plain": (1.0, 1.0, 0.0, 1.0),
      "cancel": (1.0e3, 1.0e3, 1.0e3, 1.0e-3),  # x - mean cancels; dividing by 1e-3 magnifies it
      "overflow": (1.0e16, 1.0e17, 0.0, 1.0),   # products near 1e34, sums near 1e35 (float32 max 3.4e38)
      "subnormal": (1.0e-19, 1.0e-20, 0.0, 1.0),  # products near 1e-39, below the smallest normal 1.2e-38
  }[regime]
  f32 = lambda a: np.asarray(a, np.float32)
  p = dict(lo=f32(np.full(N_IN, -np.inf)), hi=f32(np.full(N_IN, np.inf)), mean=f32(np.full(N_IN, mean)),
           rng=f32(rng_scale * rs.uniform(0.5, 2.0, N_IN)),
           w1=f32(scale_w * rs.normal(size=(N_IN, N_HIDDEN))), b1=f32(scale_w * scale_x * 0.3 * rs.normal(size=N_HIDDEN)),
           w2=f32(rs.normal(size=(N_HIDDEN, N_OUT))), b2=f32(rs.normal(size=N_OUT)))
  move = lambda a: f32(a * (1 + 2.0**-11 * rs.choice([-1.0, 1.0], size=np.shape(a))))
  pq = dict(p, w1=move(p["w1"]), b1=move(p["b1"]), w2=move(p["w2"]), b2=move(p["b2"]),
            rng=np.where(equal, p["rng"], move(p["rng"])).astype(np.float32))
  centre = f32(mean + scale_x * rs.uniform(-1, 1, N_IN) * (1e-5 if regime == "cancel" else 1.0))
  radius = f32(scale_x * (1e-5 if regime == "cancel" else 0.1) * np.ones(N_IN))
  return p, pq, qb.Box(centre - radius, centre + radius)


def _points(box: qb.Box, seed: int):
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  corners = [np.where(np.array(bits), hi, lo) for bits in itertools.product([0, 1], repeat=len(lo))]
  rs = np.random.default_rng(seed)
  inside = lo + (hi - lo) * rs.uniform(size=(16, len(lo)))
  return [np.asarray(x, np.float32) for x in [*corners, (lo + hi) / 2, *inside]]


def _assert_encloses(lower, upper, p, pq, points, label):
  lower, upper = np.ravel(lower), np.ravel(upper)
  for x in points:
    exact = [a - b for a, b in zip(_exact(p, x), _exact(pq, x))]
    for k, e in enumerate(exact):
      assert Fraction(float(lower[k])) <= e <= Fraction(float(upper[k])), (
          f"{label}: output {k} at {x}: exact {float(e)!r} outside [{lower[k]!r}, {upper[k]!r}]")


@pytest.mark.parametrize("regime", ["plain", "cancel", "overflow", "subnormal"])
def test_sound_bounds_hold_in_exact_arithmetic(regime):
  equal = np.arange(N_IN) % 2 == 0
  p, pq, box = _pair(3, regime, equal)
  merged = qb.merge(_net(p), _net(pq), box)
  points = _points(box, 0)
  d = qb.bounds.diff(merged, None, box)
  _assert_encloses(d.lower, d.upper, p, pq, points, f"diff {regime}")
  for method in (qb.bounds.crown, qb.bounds.interval):
    b = method(merged, box)
    _assert_encloses(b.lower, b.upper, p, pq, points, f"{method.__name__} {regime}")


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), regime=st.sampled_from(["plain", "cancel", "overflow", "subnormal"]),
       equal=st.lists(st.booleans(), min_size=N_IN, max_size=N_IN))
def test_differential_bounds_hold_in_exact_arithmetic_property(seed, regime, equal):
  p, pq, box = _pair(seed, regime, np.array(equal))
  merged = qb.merge(_net(p), _net(pq), box)
  for symbolic in (True, False):
    d = qb.bounds.diff(merged, None, box, symbolic=symbolic)
    _assert_encloses(d.lower, d.upper, p, pq, _points(box, seed), f"diff symbolic={symbolic} {regime}")


def test_equal_divisors_make_the_difference_exactly_zero():
  """Where f and f_q divide by the same range, ``d`` at the division is exactly 0 (not the
  ``|x / r| + |x / r_q|`` of two unrelated divisions); where they differ it is a proper interval."""
  equal = np.array([True, False, True, True, False])
  p, pq, box = _pair(1, "plain", equal)
  merged = qb.merge(_net(p), _net(pq), box)
  fg, qg = merged.f_graph, merged.fq_graph
  (div,) = [i for i, n in enumerate(fg.nodes) if n.op is not None and n.op.name == "div"]
  _, _, d = diff_module.diff_bounds(fg, qg, box, None, True, True)
  lo, hi = np.asarray(d[div][0]), np.asarray(d[div][1])
  assert np.all(np.abs(lo[equal]) < 1e-30) and np.all(np.abs(hi[equal]) < 1e-30)
  assert np.all(hi[~equal] - lo[~equal] > 0)


def test_shared_normalisation_costs_no_margin():
  """The margins of a backward pass through the first layer are sized by the magnitude of ``d`` at
  its input, the division. Bounded as two unrelated divisions (``|x / r| + |x / r_q|``) it made
  HAR's sound bound 1.6x the unsound one; with ``d = 0`` there the margins are noise. Here f_q moves
  the first layer's weights by 2^-17 relative and keeps the ranges; every hidden unit stays active,
  so ``f - f_q`` is linear over the box and its exact maximum is at a vertex."""
  p, _, _ = _pair(5, "plain", np.ones(N_IN, bool))
  p = dict(p, b1=(p["b1"] + 20).astype(np.float32))  # every hidden unit active over the box
  pq = dict(p, w1=(p["w1"] * np.float32(1 + 2.0**-17)).astype(np.float32))
  box = qb.Box(np.full(N_IN, 0.4, np.float32), np.full(N_IN, 0.6, np.float32))
  merged = qb.merge(_net(p), _net(pq), box)
  d = qb.bounds.diff(merged, None, box)
  bound = max(-float(np.min(d.lower)), float(np.max(d.upper)))
  corners = _points(box, 0)[: 2**N_IN]
  exact = max(abs(a - b) for x in corners for a, b in zip(_exact(p, x), _exact(pq, x)))
  assert Fraction(bound) >= exact
  assert bound <= 1.01 * float(exact)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([1, 7, 561, 4096]),
       spread=st.sampled_from([0, 10, 30, 70]))
def test_margin_sums_are_covered_by_the_slack(seed, n, spread):
  """``fp.margin_sum`` (XLA's own reduction, any order) times the 1% slack is never below the exact
  sum of nonnegative terms, whose exponents span up to 2^70, subnormals included (flushed ones may
  each lose the smallest normal number)."""
  from qbound.bounds import fp

  rs = np.random.default_rng(seed)
  x = (rs.uniform(0, 1, (3, n)) * 2.0 ** rs.integers(-spread - 60, -60 + spread + 1, (3, n))).astype(np.float32)
  x[0, : n // 2] = np.float32(1e-39)  # subnormal terms
  total = np.asarray(fp.SLACK * fp.margin_sum(jnp.asarray(x)), np.float64)
  for row, got in zip(x, total):
    exact = sum(Fraction(float(v)) for v in row)
    assert Fraction(float(got)) >= exact - n * Fraction(fp.tiny(np.float32))


def test_long_margin_rows_are_summed_pairwise():
  from qbound.bounds import fp

  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 20000)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(fp.margin_sum(x)), np.asarray(fp.pairwise_sum(x)))


@pytest.mark.parametrize("batched", [False, True])
def test_signed_row_pairs_are_bounded_as_before(batched):
  """Walking back only ``R`` of the rows ``[R; -R]`` through a linear target and negating is exact:
  the same bits as walking back all rows (``common.mirror_rows``)."""
  crown_module = importlib.import_module("qbound.bounds.crown")
  p, pq, box = _pair(2, "plain", np.arange(N_IN) % 2 == 0)
  merged = qb.merge(_net(p), _net(pq), box)
  fg, qg = merged.f_graph, merged.fq_graph
  if batched:
    box = qb.Box(jnp.stack([box.lower, box.lower - 0.05]), jnp.stack([box.upper, box.upper + 0.05]))
  z, zq, d = diff_module.diff_bounds(fg, qg, box, None, True, True, batched=batched)
  for target in [i for i in crown_module.relu_inputs(fg)] + [fg.output]:
    node = fg.nodes[target]
    scaled = jnp.diag(jnp.arange(1, node.size + 1, dtype=jnp.float32) / 3).reshape(node.size, *node.shape)
    rows = jnp.concatenate([scaled, -scaled])  # [R; -R], R not unit rows
    if batched:
      rows = jnp.broadcast_to(rows, (2, *rows.shape))
    for lower, args in ((crown_module.backward_lower, (fg, target, rows, z, box)),
                        (diff_module.diff_backward_lower, (fg, qg, target, rows, z, zq, d, box))):
      full = lower(*args, batched=batched)
      halved = lower(*args, batched=batched, signed_pairs=True)
      np.testing.assert_array_equal(np.asarray(full), np.asarray(halved))
