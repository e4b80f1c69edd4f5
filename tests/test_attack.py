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


def test_only_the_selected_outputs_count():
  # The second output dominates everywhere, but only the first counts: its maximum is 0.1 at x = 1
  # (a function, a traced graph, and the graph searched in float64 alike).
  fn = lambda x: jnp.concatenate([0.1 * x, 5 * x])
  box = qb.Box(-0.5 * jnp.ones(1), jnp.ones(1))
  graph = qb.trace(fn, jnp.zeros(1))
  for target, exact in ((fn, False), (graph, False), (graph, True)):
    value, witness = qb.maximize_error(target, box, search=FAST, outputs=[0], exact=exact)
    assert value == pytest.approx(0.1, rel=1e-6)
    assert abs(0.1 * float(witness[0])) == pytest.approx(value, rel=1e-6)
  for bad in ([], [2], [-1]):
    with pytest.raises(ValueError, match="flat output indices"):
      qb.maximize_error(fn, box, search=FAST, outputs=bad)


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


# --- staircases: f_q rounds its activations -------------------------------------------------------

# A smaller STAIRCASE setting: the tests' networks are tiny.
STAIRS = Search(samples=2048, restarts=0, steps=0, refine_rounds=30, refine_points=64, refine_tries=16,
                refine_radius=0.1)


def test_refinement_climbs_a_staircase_to_its_known_maximum():
  # sum_i w_i (x_i - round(4 x_i) / 4): each term at most |w_i| / 8, reached at the rounding ties
  # (4 x_i = k + 1/2 rounds to the even k, so the tie itself is on the high side when w_i > 0).
  # Uniform samples miss the ties (one sample in 8^-6 falls within 1/64 of step of all six), and
  # the error is flat across each tread's direction of other coordinates.
  w = jnp.array([1.0, -2.0, 0.5, 3.0, -1.0, 1.5])
  graph = qb.trace(lambda x: jnp.sum(w * (x - jnp.round(4 * x) / 4))[None], jnp.zeros(6))
  box = qb.Box(-jnp.ones(6), jnp.ones(6))
  best = float(jnp.sum(jnp.abs(w))) / 8
  sampled, _ = qb.maximize_error(graph, box, search=Search(samples=STAIRS.samples, restarts=0, steps=0))
  value, witness = qb.maximize_error(graph, box, search=STAIRS, exact=True)
  assert sampled < 0.95 * best  # what the samples alone reach
  assert 0.98 * best <= value <= best
  assert value == float(np.max(np.abs(exact_error(graph, witness))))  # the certificate's measure
  assert witness.dtype == np.float32 and box.contains(witness)


def test_exact_search_ranks_by_the_real_arithmetic_error():
  # x / 0.1 rounds differently in float32 and in real arithmetic for inputs within an ulp of a tie:
  # the exact search's value is the float64 error at its (float32) witness, as certify's lower.
  graph = qb.trace(lambda x: (x - jnp.round(x / 0.1) * 0.1), jnp.zeros(3))
  box = qb.Box(jnp.zeros(3), jnp.ones(3))
  value, witness = qb.maximize_error(graph, box, search=STAIRS, exact=True, key=jax.random.key(2))
  assert value == float(np.max(np.abs(exact_error(graph, witness))))
  assert 0.049 <= value <= 0.05 + 1e-7


def test_staircase_certificate_reaches_its_grid_maximum_and_stays_below_its_bound():
  # A 2-input net whose hidden activations are rounded to steps of 1/8: certify's staircase search
  # (float64, its own thread or inline) reaches the maximum a 1000 x 1000 grid finds, and the proven
  # bound is above both (soundness).
  k1, k2 = jax.random.split(jax.random.key(0))
  w1, w2 = jax.random.normal(k1, (2, 6)), jax.random.normal(k2, (6, 1))
  f = lambda x: jax.nn.relu(x @ w1) @ w2
  fq = lambda x: (jnp.round(jax.nn.relu(x @ w1) * 8) / 8) @ w2
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  cert = qb.certify(f, fq, box, method="crown", search=STAIRS)
  grid = jnp.stack(jnp.meshgrid(*[jnp.linspace(-1, 1, 1000)] * 2), -1).reshape(-1, 2)
  grid_max = float(jnp.max(jnp.abs(jax.vmap(f)(grid) - jax.vmap(fq)(grid))))
  assert grid_max <= cert.upper
  assert 0.99 * grid_max <= cert.lower <= cert.upper


def test_exact_search_needs_a_graph():
  with pytest.raises(TypeError, match="Graph or a MergedNetwork"):
    qb.maximize_error(lambda x: x, qb.Box(jnp.zeros(2), jnp.ones(2)), exact=True)
  with pytest.raises(ValueError):
    Search(refine_rounds=-1)


def test_certify_with_a_budget_searches_a_staircase_beside_the_bounds():
  # The timed path: the staircase search runs in a thread of its own, at a lower priority that
  # stays its own (the caller's thread keeps its niceness); what it reaches stays below the bound.
  import os

  k1, k2 = jax.random.split(jax.random.key(1))
  w1, w2 = jax.random.normal(k1, (2, 6)), jax.random.normal(k2, (6, 1))
  f = lambda x: jax.nn.relu(x @ w1) @ w2
  fq = lambda x: (jnp.round(jax.nn.relu(x @ w1) * 8) / 8) @ w2
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  nice = os.getpriority(os.PRIO_PROCESS, 0)
  cert = qb.certify(f, fq, box, search=STAIRS, time_budget=3.0)
  assert os.getpriority(os.PRIO_PROCESS, 0) == nice
  grid = jnp.stack(jnp.meshgrid(*[jnp.linspace(-1, 1, 500)] * 2), -1).reshape(-1, 2)
  grid_max = float(jnp.max(jnp.abs(jax.vmap(f)(grid) - jax.vmap(fq)(grid))))
  assert cert.lower <= cert.upper and grid_max <= cert.upper


def test_float64_copies_are_kept_while_their_graph_lives():
  """certify evaluates its witnesses several times on one graph: one float64 copy serves them all,
  and it goes with its graph."""
  import gc

  from qbound import attack
  from qbound import graph as G
  from qbound.merge import merge_graphs

  f, fq, _, _ = H.random_pair(0, H.SHAPES[0], bits=4)
  box = H.random_box(0, 2)
  # (merge_graphs: qb.merge keeps its last merges, and their graphs with them)
  graph = merge_graphs(qb.trace(f, box), qb.trace(fq, box)).graph
  other = qb.merge(fq, f, box).graph
  with jax.enable_x64(True):
    copy = G.float64_copy(graph)
    assert G.float64_copy(graph) is copy and G.float64_copy(other) is not copy
    xs = H.sample_points(box, 50)
    np.testing.assert_array_equal(attack.exact_errors(graph, xs), H.eval64(graph, xs))
    np.testing.assert_array_equal(attack.exact_errors(other, xs), -H.eval64(graph, xs))
  key = id(graph)
  assert key in G._float64_copies
  del graph, copy
  gc.collect()
  assert key not in G._float64_copies
