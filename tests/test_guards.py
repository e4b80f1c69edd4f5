"""Well-formed-interval guards (:func:`qbound.bounds.guards.check_bounds` and :func:`counts`)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from qbound.bounds.guards import UNSOUND_TOLERANCE, check_bounds, counts
from qbound.bounds.interval import interval_bounds


@functools.lru_cache(maxsize=None)
def _graph_and_bounds():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), jnp.zeros(3))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(functools.partial(model.apply, params), functools.partial(model.apply, params), box)
  graph = merged.f_graph
  return graph, list(interval_bounds(graph, box, True))


def _replaced(bounds, node, lo=None, hi=None):
  out = list(bounds)
  old_lo, old_hi = out[node]
  out[node] = (jnp.asarray(old_lo if lo is None else lo), jnp.asarray(old_hi if hi is None else hi))
  return out


@pytest.mark.parametrize("sound", [True, False])
def test_well_formed_bounds_pass(sound):
  graph, bounds = _graph_and_bounds()
  check_bounds([("interval bounds", graph, bounds)], sound=sound)


def test_an_empty_interval_names_its_group_node_and_entry():
  graph, bounds = _graph_and_bounds()
  node = len(bounds) - 2
  lo, hi = (np.array(b) for b in bounds[node])
  lo[1] = hi[1] + 1.0
  bad = _replaced(bounds, node, lo=lo)
  with pytest.raises(qb.InvalidBoundsError, match=rf"the bounds under test: empty interval at node {node} .*entry \(1,\)"):
    check_bounds([("good", graph, bounds), ("the bounds under test", graph, bad)], sound=True)


def test_nan_is_an_overflow_error():
  graph, bounds = _graph_and_bounds()
  hi = np.array(bounds[1][1])
  hi[0] = np.nan
  with pytest.raises(qb.BoundOverflowError, match="NaN at node 1"):
    check_bounds([("bounds", graph, _replaced(bounds, 1, hi=hi))], sound=True)


def test_unsound_bounds_may_cross_by_rounding_only():
  graph, bounds = _graph_and_bounds()
  hi = np.array(bounds[1][1])
  crossed = _replaced(bounds, 1, lo=hi + 1e-6)  # a few ulps: tolerated without margins
  check_bounds([("bounds", graph, crossed)], sound=False)
  with pytest.raises(qb.InvalidBoundsError):
    check_bounds([("bounds", graph, crossed)], sound=True)
  far = _replaced(bounds, 1, lo=hi + 10 * UNSOUND_TOLERANCE * (2 + 2 * np.abs(hi)))
  with pytest.raises(qb.InvalidBoundsError):
    check_bounds([("bounds", graph, far)], sound=False)


def test_counts_inside_a_compiled_program_match_the_eager_check():
  """Batched certification returns counts() from its own program: same per-node counts."""
  graph, bounds = _graph_and_bounds()
  lo, hi = (np.array(b) for b in bounds[2])
  lo[:2] = hi[:2] + 1.0
  hi[3] = np.nan
  bad = _replaced(bounds, 2, lo=lo, hi=hi)
  groups = [("a", graph, bounds), ("b", graph, bad)]
  inside = jax.jit(lambda b: counts([("a", graph, b[0]), ("b", graph, b[1])], sound=True))((bounds, bad))
  expected = np.zeros((2 * len(bounds), 2), int)
  expected[len(bounds) + 2] = [1, 2]
  np.testing.assert_array_equal(np.asarray(inside), expected)
  np.testing.assert_array_equal(np.asarray(counts(groups, sound=True)), expected)
