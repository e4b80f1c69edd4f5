"""Tests of qbound.attack: the lower-bound search reaches known maxima, and what it reports is real."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.attack import Search, exact_error

FAST = H.search()


def check_witness(fn, box, value, witness):
  """The reported value is ``|fn(witness)|_inf`` and the witness lies in the box."""
  assert box.contains(witness)
  assert witness.shape == box.shape
  np.testing.assert_allclose(value, float(jnp.max(jnp.abs(fn(jnp.asarray(witness))))), rtol=1e-6, atol=1e-7)


def test_maximum_at_a_vertex():
  # |sum(x * c)| over [-1, 2]^3 peaks at the vertex choosing the side that maximises it: 2*3 + 1*1 + 2*2.
  c = jnp.array([3.0, -1.0, 2.0])
  fn = lambda x: jnp.sum(x * c)[None]
  box = qb.Box(-jnp.ones(3), 2 * jnp.ones(3))
  value, witness = qb.maximize_error(fn, box, search=FAST)
  assert value == pytest.approx(11.0, rel=1e-6)
  np.testing.assert_allclose(witness, [2.0, -1.0, 2.0])
  check_witness(fn, box, value, witness)


def test_interior_maximum_by_gradient_ascent():
  # A bump of height 1 at an interior point: sampling alone gets close, gradient ascent gets there.
  peak = jnp.array([0.3, -0.55])
  fn = lambda x: jnp.exp(-20 * jnp.sum((x - peak) ** 2))[None]
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  value, witness = qb.maximize_error(fn, box, search=Search(samples=64, restarts=4, steps=200))
  assert value == pytest.approx(1.0, abs=1e-4)
  np.testing.assert_allclose(witness, peak, atol=1e-2)
  check_witness(fn, box, value, witness)


def test_largest_output_counts():
  # The inf-norm: the second output dominates everywhere; its maximum is 5 at x = 1.
  fn = lambda x: jnp.stack([0.1 * x[0], 5 * x[0] ** 3])
  box = qb.Box(-0.5 * jnp.ones(1), jnp.ones(1))
  value, witness = qb.maximize_error(fn, box, search=FAST)
  assert value == pytest.approx(5.0, rel=1e-6)
  check_witness(fn, box, value, witness)


def test_flat_coordinates_and_degenerate_box():
  fn = lambda x: (x[0] - x[1])[None]
  box = qb.Box(jnp.array([0.0, 0.25]), jnp.array([1.0, 0.25]))  # x[1] is fixed
  value, witness = qb.maximize_error(fn, box, search=FAST)
  assert value == pytest.approx(0.75)
  assert witness[1] == pytest.approx(0.25)


def test_deterministic_for_a_fixed_key():
  f, fq, _, _ = H.random_pair(0, H.SHAPES[2], bits=3)
  merged = qb.merge(f, fq, jnp.zeros(5))
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  a = qb.maximize_error(merged, box, key=jax.random.key(3), search=FAST)
  b = qb.maximize_error(merged, box, key=jax.random.key(3), search=FAST)
  assert a[0] == b[0]
  np.testing.assert_array_equal(a[1], b[1])
  c = qb.maximize_error(merged, box, key=jax.random.key(4), search=FAST)
  for value, witness in (a, c):
    check_witness(merged, box, value, witness)


def test_graph_merged_and_function_agree():
  f, fq, _, _ = H.random_pair(1, H.SHAPES[0], bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  via_merged = qb.maximize_error(merged, box, search=FAST)
  via_graph = qb.maximize_error(merged.graph, box, search=FAST)
  via_fn = qb.maximize_error(lambda x: f(x) - fq(x), box, search=FAST)
  assert via_merged[0] == via_graph[0]
  assert via_fn[0] == pytest.approx(via_merged[0], rel=1e-3)
  # A reached error is a lower bound on the maximal one: below any proven upper bound.
  proven = qb.bounds.crown(merged, box)
  assert via_merged[0] <= max(float(jnp.max(-proven.lower)), float(jnp.max(proven.upper)))


def test_more_search_never_finds_less_on_a_sampled_grid():
  f, fq, _, _ = H.random_pair(2, H.SHAPES[4], bits=3)
  box = qb.Box(-jnp.ones(1), jnp.ones(1))
  merged = qb.merge(f, fq, box)
  value, witness = qb.maximize_error(merged, box, search=FAST)
  grid_max = H.max_error(merged, H.grid(box, 4001))
  assert value >= grid_max * (1 - 1e-3) - 1e-6  # the 1-D maximum is found (up to the grid spacing)
  assert value <= grid_max + 1e-3


def test_exact_error_is_float64():
  w = np.array([[1.0 + 2**-23], [-1.0]], np.float32)
  graph = qb.trace(lambda x: x @ jnp.asarray(w), jnp.zeros(2))
  x = np.array([3.0, 3.0], np.float32)
  out = exact_error(graph, x)
  assert out.dtype == np.float64
  np.testing.assert_allclose(out, [3.0 * 2**-23], rtol=1e-12)


def test_invalid_box_is_rejected():
  with pytest.raises(ValueError, match="empty"):
    qb.maximize_error(lambda x: x, qb.Box(jnp.ones(2), jnp.zeros(2)))
