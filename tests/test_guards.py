"""Well-formed-interval guards (:func:`qbound.bounds.guards.check_bounds`), per node and fused."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from qbound.bounds.guards import UNSOUND_TOLERANCE, check_bounds
from qbound.bounds.interval import interval_bounds


@functools.lru_cache(maxsize=None)
def _graph_and_bounds():
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), jnp.zeros(3))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(functools.partial(model.apply, params), functools.partial(model.apply, params), box)
  graph = merged.f_graph
  return graph, list(interval_bounds(graph, box, True))


@pytest.mark.parametrize("fused", [False, True])
def test_well_formed_bounds_pass(fused):
  graph, bounds = _graph_and_bounds()
  check_bounds([("interval bounds", graph, bounds)], sound=True, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_an_empty_interval_names_its_node_and_entry(fused):
  graph, bounds = _graph_and_bounds()
  bad = list(bounds)
  node = len(bad) - 2
  lo, hi = (np.array(b) for b in bad[node])
  lo[1] = hi[1] + 1.0
  bad[node] = (jnp.asarray(lo), jnp.asarray(hi))
  with pytest.raises(qb.InvalidBoundsError, match=rf"node {node} .*entry \(1,\)"):
    check_bounds([("good", graph, bounds), ("the bounds under test", graph, bad)], sound=True, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_nan_is_an_overflow_error(fused):
  graph, bounds = _graph_and_bounds()
  bad = list(bounds)
  lo, hi = (np.array(b) for b in bad[1])
  hi[0] = np.nan
  bad[1] = (jnp.asarray(lo), jnp.asarray(hi))
  with pytest.raises(qb.BoundOverflowError, match="NaN at node 1"):
    check_bounds([("bounds", graph, bad)], sound=True, fused=fused)


@pytest.mark.parametrize("fused", [False, True])
def test_unsound_bounds_may_cross_by_rounding_only(fused):
  graph, bounds = _graph_and_bounds()
  lo, hi = (np.array(b) for b in bounds[1])
  crossed = list(bounds)
  crossed[1] = (jnp.asarray(hi + 1e-6), jnp.asarray(hi))  # a few ulps: tolerated without margins
  check_bounds([("bounds", graph, crossed)], sound=False, fused=fused)
  with pytest.raises(qb.InvalidBoundsError):
    check_bounds([("bounds", graph, crossed)], sound=True, fused=fused)
  far = list(bounds)
  far[1] = (jnp.asarray(hi + 10 * UNSOUND_TOLERANCE * (2 + 2 * np.abs(hi))), jnp.asarray(hi))
  with pytest.raises(qb.InvalidBoundsError):
    check_bounds([("bounds", graph, far)], sound=False, fused=fused)
