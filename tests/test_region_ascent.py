"""Linear programs over linear regions (qbound.bounds.region_ascent): the error returned is reached
at the point returned, never below the start's, never above a proven bound or the exact maximum."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.bounds import host_bab
from qbound.bounds.region_ascent import region_ascent
from test_host_bab import exact_case, pair


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(H.SHAPES[:3] + H.SHAPES[4:]),
       kind=st.sampled_from(["3", "6", "noise 0.3", "noise 2.0"]))
def test_reached_at_its_point_and_below_the_bound(seed, shape, kind):
  bits, noise = (None, float(kind.split()[1])) if kind.startswith("noise") else (int(kind), None)
  f, fq = pair(seed, shape, bits, noise)
  box = H.random_box(seed, shape[0])
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  outputs = np.arange(chain.n_out)
  start = np.random.default_rng(seed).uniform(lo, hi)
  x, value = region_ascent(chain, start, lo, hi, outputs)
  assert np.all(lo <= x) and np.all(x <= hi)
  reached = np.abs(host_bab.evaluate(chain, x[None]))[0].max()
  assert value == reached
  assert value >= np.abs(host_bab.evaluate(chain, start[None]))[0].max()
  dl, du, *_ = host_bab.bound_pieces(chain, lo[None], hi[None])
  assert value <= max(du.max(), -dl.min())


def test_reaches_the_exact_value_from_the_search_points():
  """On a small pair the climb from the box's centre, then from a few random points, ends within
  the MILP's bracket of the exact value's lower end or below it, and at most at its upper end."""
  f, fq, box, exact = exact_case(0, H.SHAPES[0], 3)
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  rng = np.random.default_rng(0)
  best = max(region_ascent(chain, x, lo, hi, np.arange(chain.n_out))[1]
             for x in [(lo + hi) / 2, *rng.uniform(lo, hi, (20, lo.size))])
  assert best <= exact.upper + exact.tolerance
  assert best >= 0.9 * exact.value  # a local search: near the maximum, not necessarily at it


def test_seen_patterns_are_skipped():
  f, fq = pair(1, H.SHAPES[2], bits=3)
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  lo, hi = -np.ones(5), np.ones(5)
  seen: set = set()
  x, value = region_ascent(chain, np.zeros(5), lo, hi, np.arange(chain.n_out), seen=seen)
  assert seen
  # From the same start every region is known: no program runs, the start comes back.
  y, again = region_ascent(chain, np.zeros(5), lo, hi, np.arange(chain.n_out), seen=seen)
  assert np.array_equal(y, np.zeros(5)) and again <= value
