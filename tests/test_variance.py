"""Lower bounds of variances and means of squares by Cauchy-Schwarz (qbound.bounds.variance): the
patterns of flax's LayerNorm (fast and centred variance) and RMSNorm are found, and nothing else;
the bounds hold against sampling inside random boxes (hypothesis; float32, sound and not), also
through a GELU layer before the norm (-m slow); a chain with a negative weight gets no bound; and where
the entries' intervals are wide the bound is positive while CROWN's own is 0."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qbound as qb
from qbound.bounds import variance
from qbound.bounds.crown import backward_lower, crown_bounds

D_IN, WIDTH = 3, 6


class _Net(nn.Module):
  """Dense (then GELU and dense), then the statistic of a norm over the last axis (two rows of WIDTH)."""

  stat: str = "fast"
  gelu: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(2 * WIDTH)(x)
    if self.gelu:
      h = nn.Dense(2 * WIDTH)(jax.nn.gelu(h))
    h = h.reshape(2, WIDTH)
    if self.stat == "fast":
      return jnp.mean(h * h, -1) - jnp.mean(h, -1) ** 2
    if self.stat == "centred":
      return jnp.mean(jnp.square(h - jnp.mean(h, -1, keepdims=True)), -1)
    return jnp.mean(jnp.square(h), -1)  # RMS norm's


def _graph(stat, seed=0, gelu=False):
  net = _Net(stat, gelu)
  params = net.init(jax.random.key(seed), jnp.zeros(D_IN))
  fn = functools.partial(net.apply, params)
  return fn, qb.trace(fn, jnp.zeros(D_IN))


def test_find_flax_norms():
  x = jnp.zeros((2, 8))
  for norm, centred in [(nn.LayerNorm(), True), (nn.LayerNorm(use_fast_variance=False), False),
                        (nn.RMSNorm(), False)]:
    params = norm.init(jax.random.key(0), x)
    graph = qb.trace(functools.partial(norm.apply, params), x)
    found = variance.find(graph)
    assert len(found) == 1, norm
    (pattern,) = found.values()
    assert (pattern.centred is not None) == centred, norm


def test_find_nothing_else():
  for fn in [lambda x: jnp.mean(x * x) - jnp.mean(x), lambda x: jnp.mean(x) ** 2 - jnp.mean(x * x),
             lambda x: jnp.sum(x * x) - jnp.mean(x) ** 2 + 1.0, lambda x: jax.nn.softmax(x)]:
    graph = qb.trace(fn, jnp.zeros(4))
    assert not any(p.centred for p in variance.find(graph).values()), fn
  # sum(x^2) - mean(x)^2: the two chains differ (a sum, a mean), so no fast variance
  graph = qb.trace(lambda x: jnp.sum(x * x) - jnp.mean(x) ** 2, jnp.zeros(4))
  assert not any(p.centred for p in variance.find(graph).values())


def _check(stat, seed, center, radius, sound, gelu=False):
  fn, graph = _graph(stat, seed, gelu)
  box = qb.Box(jnp.asarray(center - radius, jnp.float32), jnp.asarray(center + radius, jnp.float32))
  bounds = crown_bounds(graph, box, None, sound)
  patterns = variance.find(graph)
  assert len(patterns) == 1
  (idx, pattern), = patterns.items()
  low = variance.lower_bound(graph, idx, pattern, bounds, box, backward_lower, sound=sound)
  xs = jax.random.uniform(jax.random.key(seed), (4000, D_IN), minval=box.lower, maxval=box.upper)
  xs = jnp.concatenate([xs, box.lower[None], box.upper[None], ((box.lower + box.upper) / 2)[None]])
  ys = np.asarray(jax.vmap(fn)(xs), np.float64)
  reach = ys.min(0)
  tol = 0 if sound else 1e-5 * (1 + np.abs(reach))
  assert np.all(np.asarray(low, np.float64) <= reach + tol), (np.asarray(low), reach)
  final = np.asarray(bounds[graph.output][0], np.float64)
  assert np.all(final <= reach + tol)


# A network's seed and a box around a random centre, for the random-box tests below.
RANDOM_BOXES = dict(seed=st.integers(0, 3), radius=st.sampled_from([0.0, 1e-3, 0.05, 0.3, 1.0]),
                    center=st.lists(st.floats(-2, 2), min_size=D_IN, max_size=D_IN))


@pytest.mark.parametrize("stat", ["fast", "centred", "rms"])
@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=4, deadline=None)
@given(**RANDOM_BOXES)
def test_bound_holds_on_random_boxes(stat, sound, seed, radius, center):
  _check(stat, seed, np.asarray(center), radius, sound)


# A GELU layer before the norm: ~15-35 s of compiling per case on two cores.
@pytest.mark.slow
@pytest.mark.parametrize("stat", ["fast", "centred", "rms"])
@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=6, deadline=None)
@given(**RANDOM_BOXES)
def test_bound_holds_after_a_gelu_layer(stat, sound, seed, radius, center):
  _check(stat, seed, np.asarray(center), radius, sound, gelu=True)


def test_negative_weights_get_no_bound():
  w = jnp.array([1.0, -0.5, 1.0, 1.0])
  graph = qb.trace(lambda x: jnp.sum(jnp.square(x) * w), jnp.zeros(4))
  found = variance.find(graph)
  (idx, pattern), = found.items()
  box = qb.Box(jnp.ones(4), 1.1 * jnp.ones(4))
  bounds = crown_bounds(graph, box, None, True)
  assert float(variance.lower_bound(graph, idx, pattern, bounds, box, backward_lower)) == -np.inf
  assert float(bounds[graph.output][0]) <= 2.5 * 1.0  # the sampled minimum is 1 + 1 + 1 - 0.5 * 1.21


def test_positive_where_intervals_are_wide(monkeypatch):
  # y = (c + b, c - b), c in [-5, 5], b in [0.9, 1.1]: the fast variance mean(y^2) - mean(y)^2 = b^2
  # is at least 0.81, but CROWN's relaxed squares lose the chord of mean(y)^2 = c^2 over [-5, 5]
  # and give 0; the Cauchy-Schwarz row r = (1, -1) / 2 reads b exactly.
  def fn(x):
    y = x @ jnp.array([[1.0, 1.0], [1.0, -1.0]])
    return jnp.mean(y * y) - jnp.mean(y) ** 2

  box = qb.Box(jnp.array([-5.0, 0.9]), jnp.array([5.0, 1.1]))
  graph = qb.trace(fn, box)
  (idx, pattern), = variance.find(graph).items()
  assert pattern.centred is not None
  with_bound = float(crown_bounds(graph, box, None, True)[idx][0])
  monkeypatch.setattr(variance, "find", lambda graph: {})
  without = float(crown_bounds(graph, box, None, True)[idx][0])
  assert without <= 0.0 and 0.8 < with_bound <= 0.81


def test_batched_boxes_match_one_by_one():
  fn, graph = _graph("fast", 1)
  lo = jnp.array([[-0.3, 0.1, 0.2], [0.5, -1.0, 0.0]])
  boxes = qb.Box(lo, lo + jnp.array([[0.2], [0.5]]))
  batched = crown_bounds(graph, boxes, None, True, batched=True)[graph.output]
  for b in range(2):
    one = crown_bounds(graph, qb.Box(boxes.lower[b], boxes.upper[b]), None, True)[graph.output]
    np.testing.assert_allclose(np.asarray(batched[0][b]), np.asarray(one[0]), rtol=1e-5, atol=1e-6)
