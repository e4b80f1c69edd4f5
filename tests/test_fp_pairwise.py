"""``fp.pairwise_sum``: its error against exact rational sums stays within the tree depth's bound,
which the rounding margins of bound propagation assume (``fp.pairwise_terms``)."""

from fractions import Fraction

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound.bounds import fp


def _within_tree_bound(x: np.ndarray):
  got = np.asarray(fp.pairwise_sum(jnp.asarray(x)), np.float64)
  n = x.shape[1]
  depth = max(n - 1, 0).bit_length()  # additions a term passes through
  assert fp.pairwise_terms(n) == depth + 1  # the product's rounding, then the tree's additions
  for row, value in zip(x, got):
    exact = sum((Fraction(float(v)) for v in row), Fraction(0))
    magnitude = sum((abs(Fraction(float(v))) for v in row), Fraction(0))
    allowed = Fraction(fp.gamma(depth, np.float32)) * magnitude if depth else Fraction(0)
    allowed += depth * n * Fraction(fp.tiny(np.float32))  # flushed subnormal sums
    assert abs(Fraction(float(value)) - exact) <= allowed, (n, float(value), float(exact))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 130).flatmap(lambda n: hnp.arrays(
    np.float32, (2, n), elements=st.floats(float(np.float32(-1e30)), float(np.float32(1e30)), width=32, allow_nan=False, allow_infinity=False))))
def test_pairwise_sum_error_within_its_depth(x):
  _within_tree_bound(x)


@pytest.mark.parametrize("n", [2, 3, 17, 32, 33, 50, 64, 100, 561])
def test_pairwise_sum_cancelling_rows(n):
  """Rows built to cancel: large terms of both signs with small ones between, where a sum's
  rounding is largest relative to its result."""
  rs = np.random.default_rng(n)
  big = rs.uniform(1, 2, n) * 2.0 ** rs.integers(20, 40, n)
  x = np.stack([np.where(np.arange(n) % 2 == 0, big, -np.roll(big, 1)),
                rs.normal(size=n) * 2.0 ** rs.integers(-30, 30, n),
                np.concatenate([[1e30], np.full(n - 2, 1.0), [-1e30]])[:n]]).astype(np.float32)
  _within_tree_bound(x)


def test_pairwise_sum_edges():
  np.testing.assert_array_equal(np.asarray(fp.pairwise_sum(jnp.zeros((3, 0)))), np.zeros(3))
  x = jnp.asarray([[1.5], [-2.0]])
  np.testing.assert_array_equal(np.asarray(fp.pairwise_sum(x)), [1.5, -2.0])
  # the entries beyond the largest power of two below n are added once, onto the first ones
  x = jnp.asarray([[1.0, 2.0, 4.0, 8.0, 16.0]])
  assert float(fp.pairwise_sum(x)[0]) == 31.0
