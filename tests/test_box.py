"""Tests of qbound.box: validation, L-inf balls, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qbound as qb
from qbound.box import sample_uniform, sample_vertices, validate_box


@st.composite
def boxes(draw, max_dim=4):
  n = draw(st.integers(1, max_dim))
  center = np.array(draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n)), np.float32)
  radius = np.array(draw(st.lists(st.floats(0, 5), min_size=n, max_size=n)), np.float32)
  return qb.Box(jnp.asarray(center - radius), jnp.asarray(center + radius))


def test_properties():
  box = qb.Box(lower=jnp.array([-1.0, 0.0]), upper=jnp.array([3.0, 0.0]))
  assert box.shape == (2,)
  np.testing.assert_allclose(box.center, [1.0, 0.0])
  np.testing.assert_allclose(box.radius, [2.0, 0.0])
  np.testing.assert_allclose(box.width, [4.0, 0.0])
  assert box.contains(np.array([0.5, 0.0]))
  assert not box.contains(np.array([3.5, 0.0]))
  assert box.contains(np.array([3.0 + 1e-7, 0.0]), atol=1e-6)
  np.testing.assert_allclose(box.clip(jnp.array([5.0, -1.0])), [3.0, 0.0])
  assert "Box(shape=(2,)" in repr(box)


def test_box_is_a_pytree():
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  doubled = jax.jit(lambda b: qb.Box(2 * b.lower, 2 * b.upper))(box)
  np.testing.assert_allclose(doubled.upper, 2 * np.ones(3))
  batch = qb.Box(jnp.zeros((4, 3)), jnp.ones((4, 3)))
  widths = jax.vmap(lambda b: jnp.sum(b.width))(batch)
  np.testing.assert_allclose(widths, 3 * np.ones(4))


@pytest.mark.parametrize(
    "lower, upper, match",
    [
        (jnp.ones(2), jnp.zeros(2), "empty: lower > upper at index"),
        (jnp.array([0.0, jnp.nan]), jnp.ones(2), r"lower is not finite at index \(1,\)"),
        (jnp.zeros(2), jnp.array([1.0, jnp.inf]), "upper is not finite"),
        (jnp.zeros(2), jnp.ones(3), r"shape \(2,\) but box.upper has shape \(3,\)"),
        (np.array(["a", "b"]), np.array(["c", "d"]), "must be numeric"),
    ],
)
def test_validate_box_rejects(lower, upper, match):
  with pytest.raises(ValueError, match=match):
    validate_box(qb.Box(lower, upper))


def test_validate_box_rejects_non_box():
  with pytest.raises(ValueError, match=r"must be a qbound.Box\(lower=..., upper=...\), got tuple"):
    validate_box((jnp.zeros(2), jnp.ones(2)))


def test_validate_box_names_the_argument():
  with pytest.raises(ValueError, match="^region is empty"):
    validate_box(qb.Box(jnp.ones(1), jnp.zeros(1)), name="region")


def test_validate_box_makes_float_arrays():
  box = validate_box(qb.Box(jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32)))
  assert box.lower.dtype == jnp.float32 and box.upper.dtype == jnp.float32
  point = validate_box(qb.Box(jnp.ones(2), jnp.ones(2)))  # a degenerate box is a valid input set
  assert point.contains(np.ones(2))



@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
def test_validate_box_does_not_shrink_a_float64_box():
  """Narrowing a float64 box to float32 must round outward, or the bound covers a smaller set."""
  lower, upper = np.array([0.1]), np.array([0.3])  # neither is a float32 number
  box = validate_box(qb.Box(lower, upper))
  assert np.float64(np.asarray(box.lower)[0]) <= 0.1, "validate_box rounded the lower corner inward"
  assert np.float64(np.asarray(box.upper)[0]) >= 0.3, "validate_box rounded the upper corner inward"


def test_linf_ball():
  ball = qb.linf_ball(jnp.array([0.0, 0.5]), 0.25)
  np.testing.assert_allclose(ball.lower, [-0.25, 0.25])
  np.testing.assert_allclose(ball.upper, [0.25, 0.75])
  per_coordinate = qb.linf_ball(jnp.zeros(2), jnp.array([0.1, 0.2]))
  np.testing.assert_allclose(per_coordinate.upper, [0.1, 0.2])


def test_linf_ball_clips_to_the_domain():
  ball = qb.linf_ball(jnp.array([0.0, 0.99, 0.5]), 0.02, clip_lower=0.0, clip_upper=1.0)
  np.testing.assert_allclose(ball.lower, [0.0, 0.97, 0.48], rtol=1e-6)
  np.testing.assert_allclose(ball.upper, [0.02, 1.0, 0.52], rtol=1e-6)
  validate_box(ball)


def test_linf_ball_of_integers_is_float():
  ball = qb.linf_ball(jnp.array([1, 2]), 1)
  assert ball.lower.dtype == jnp.float32
  np.testing.assert_allclose(ball.upper, [2.0, 3.0])


@given(boxes(), st.integers(0, 2**31 - 1))
def test_samples_lie_in_the_box(box, seed):
  key = jax.random.key(seed)
  xs = np.asarray(sample_uniform(key, box, 64))
  assert xs.shape == (64, *box.shape)
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  assert np.all(xs >= lo) and np.all(xs <= hi)
  vs = np.asarray(sample_vertices(key, box, 16))
  assert vs.shape == (16, *box.shape)
  assert np.all((vs == lo) | (vs == hi))


def test_sampling_is_deterministic_and_covers_the_box():
  box = qb.Box(jnp.array([-1.0, 10.0]), jnp.array([1.0, 20.0]))
  a = sample_uniform(jax.random.key(0), box, 2000)
  b = sample_uniform(jax.random.key(0), box, 2000)
  np.testing.assert_array_equal(a, b)
  # Uniform: both halves of every coordinate get points, and the mean is near the centre.
  np.testing.assert_allclose(np.mean(np.asarray(a), axis=0), [0.0, 15.0], atol=0.2)
  vertices = np.asarray(sample_vertices(jax.random.key(1), box, 200))
  assert len({tuple(v) for v in vertices}) == 4


def test_multidimensional_box():
  box = qb.Box(jnp.zeros((2, 3, 1)), jnp.ones((2, 3, 1)))
  assert box.shape == (2, 3, 1)
  xs = sample_uniform(jax.random.key(0), box, 5)
  assert xs.shape == (5, 2, 3, 1)
  assert validate_box(box).shape == (2, 3, 1)
