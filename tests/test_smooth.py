"""Tests of qbound.bounds.smooth: the tanh and sigmoid relaxations and their differential versions.

Each property samples the real function (numpy float64, i.e. the real-arithmetic tanh and sigmoid
to ~1e-16) on random intervals and checks it lies between the proven lines, which are computed in
float32 with XLA's (not correctly rounded) tanh and logistic. Arrays have one fixed length so
that every hypothesis example reuses the same compiled operations.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound.bounds import smooth

pytestmark = pytest.mark.usefixtures("strict_promotion")

N = 64  # intervals per example
PHI = {"tanh": np.tanh, "sigmoid": lambda x: 0.5 * (1 + np.tanh(x / 2))}  # float64, accurate near 0 and far out


# Compiled once per kind (and with or without parameters): eager dispatch of the bisection is slow.
relaxation = jax.jit(smooth.relaxation, static_argnums=0)
diff_relaxation = jax.jit(smooth.diff_relaxation, static_argnums=0)
diff_interval = jax.jit(smooth.diff_interval, static_argnums=0)


def f32(a):
  return jnp.asarray(np.asarray(a, np.float32))


@st.composite
def intervals(draw, n=N):
  """``n`` intervals: centres across the convex, concave and saturated parts, widths from 0 to 12."""
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  scale = draw(st.sampled_from([0.0, 1e-4, 0.05, 1.0, 6.0]))
  center = rng.uniform(-8, 8, n) * draw(st.sampled_from([0.1, 1.0]))
  radius = rng.uniform(0, 1, n) * scale
  lo = (center - radius).astype(np.float32)
  hi = (center + radius).astype(np.float32)
  return lo, hi, rng


def points(lo, hi, rng, num=200):
  """Samples of every interval (float64), the two ends and 0 where inside included; shape (num + 3, n)."""
  lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
  inner = lo64 + rng.uniform(size=(num, lo.size)) * (hi64 - lo64)
  zero = np.clip(0.0, lo64, hi64)[None]
  return np.concatenate([inner, lo64[None], hi64[None], zero])


def assert_between(lower, value, upper, label):
  assert np.all(lower <= value), f"{label}: below by {np.max(lower - value)}"
  assert np.all(value <= upper), f"{label}: above by {np.max(value - upper)}"


@settings(max_examples=25)
@given(st.sampled_from(sorted(PHI)), intervals(), st.booleans())
def test_relaxation_lines_enclose_the_function(kind, case, optimised):
  lo, hi, rng = case
  params = None
  if optimised:  # any slopes alpha might pick are sound too
    params = {"lower": f32(rng.uniform(size=N)), "upper": f32(rng.uniform(size=N))}
  r = relaxation(kind, f32(lo), f32(hi), params)
  xs = points(lo, hi, rng)
  y = PHI[kind](xs)
  line = lambda s, o: np.asarray(s, np.float64) * xs + np.asarray(o, np.float64)
  assert_between(line(r.lower_slope, r.lower_offset), y, line(r.upper_slope, r.upper_offset), kind)
  ilo, ihi = smooth.interval(kind, f32(lo), f32(hi))
  assert_between(np.asarray(ilo, np.float64), y, np.asarray(ihi, np.float64), f"{kind} interval")


@settings(max_examples=10)
@given(st.sampled_from(sorted(PHI)), intervals())
def test_offsets_are_sound_for_any_slope(kind, case):
  """The offsets are proven for every slope, even ones outside the useful range."""
  lo, hi, rng = case
  kl, ku = f32(rng.uniform(-0.5, 1.5, N)), f32(rng.uniform(-0.5, 1.5, N))
  b_lo, b_up = smooth.offsets(kind, f32(lo), f32(hi), kl, ku)
  xs = points(lo, hi, rng)
  y = PHI[kind](xs)
  as64 = lambda a: np.asarray(a, np.float64)
  assert_between(as64(kl) * xs + as64(b_lo), y, as64(ku) * xs + as64(b_up), kind)


@pytest.mark.parametrize("kind", sorted(PHI))
def test_default_lines_are_crown_tangents_and_chords(kind):
  """Convex part: chord above (touching at both ends); concave part: chord below; tight when narrow."""
  phi = PHI[kind]
  lo, hi = f32([-3.0, 0.5, -0.01]), f32([-1.0, 2.5, 0.01])
  r = smooth.relaxation(kind, lo, hi)
  lo64, hi64 = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  up = lambda x: np.asarray(r.upper_slope, np.float64) * x + np.asarray(r.upper_offset, np.float64)
  low = lambda x: np.asarray(r.lower_slope, np.float64) * x + np.asarray(r.lower_offset, np.float64)
  np.testing.assert_allclose(up(lo64)[0], phi(lo64)[0], atol=1e-5)  # chord through both ends
  np.testing.assert_allclose(up(hi64)[0], phi(hi64)[0], atol=1e-5)
  np.testing.assert_allclose(low(lo64)[1], phi(lo64)[1], atol=1e-5)
  np.testing.assert_allclose(low(hi64)[1], phi(hi64)[1], atol=1e-5)
  assert np.max(up(hi64)[2] - low(hi64)[2]) < 1e-5  # near-linear around 0


@st.composite
def diff_cases(draw):
  """Bounds of zq, d and z (z's interval contains zq + d, sometimes strictly), d often tiny or 0."""
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  q_center = rng.uniform(-6, 6, N)
  q_rad = rng.uniform(0, 1, N) * draw(st.sampled_from([0.0, 0.1, 1.0, 3.0]))
  d_scale = draw(st.sampled_from([0.0, 1e-5, 1e-2, 0.5]))
  d_center = rng.normal(size=N) * d_scale
  d_rad = rng.uniform(0, 1, N) * d_scale * draw(st.sampled_from([0.0, 0.5, 2.0]))
  exact_zero = rng.uniform(size=N) < 0.2
  d_center, d_rad = np.where(exact_zero, 0, d_center), np.where(exact_zero, 0, d_rad)
  ql, qu = (q_center - q_rad).astype(np.float32), (q_center + q_rad).astype(np.float32)
  dl, du = (d_center - d_rad).astype(np.float32), (d_center + d_rad).astype(np.float32)
  slack = rng.uniform(0, 0.5, N) * draw(st.sampled_from([0.0, 1.0]))
  zl = (ql.astype(np.float64) + dl - slack).astype(np.float32)
  zu = (qu.astype(np.float64) + du + slack).astype(np.float32)
  return (zl, zu, ql, qu, dl, du), rng


@settings(max_examples=25)
@given(st.sampled_from(sorted(PHI)), diff_cases(), st.booleans())
def test_differential_lines_enclose_the_difference(kind, case, optimised):
  (zl, zu, ql, qu, dl, du), rng = case
  params = None
  if optimised:
    params = {"d_lower": f32(rng.uniform(size=N)), "d_upper": f32(rng.uniform(size=N))}
  r = diff_relaxation(kind, *map(f32, (zl, zu, ql, qu, dl, du)), params)
  ilo, ihi = diff_interval(kind, (f32(zl), f32(zu)), (f32(ql), f32(qu)), (f32(dl), f32(du)))
  zq = points(ql, qu, rng, 100)
  d = points(dl, du, rng, 100)[rng.permutation(103)]
  z = zq + d
  inside = (z >= zl) & (z <= zu)  # pairs (zq, d) that the bounds describe
  h = PHI[kind](z) - PHI[kind](zq)
  as64 = lambda a: np.asarray(a, np.float64)
  low = as64(r.lower_d) * d + as64(r.lower_q) * zq + as64(r.lower_r)
  up = as64(r.upper_d) * d + as64(r.upper_q) * zq + as64(r.upper_r)
  assert_between(np.where(inside, low, -np.inf), h, np.where(inside, up, np.inf), f"{kind} lines")
  assert_between(np.where(inside, as64(ilo), -np.inf), h, np.where(inside, as64(ihi), np.inf), f"{kind} interval")
  zero = (dl == 0) & (du == 0)  # where d is exactly 0 the difference is exactly 0, and so are the bounds
  for field in r:
    assert np.all(np.asarray(field)[zero] == 0)
  assert np.all(np.asarray(ilo)[zero] == 0) and np.all(np.asarray(ihi)[zero] == 0)


def test_differential_lines_are_tight_for_small_differences():
  """With d tiny against the z range, the mean-value lines leave a gap of order |d|, not of order 1."""
  z = (f32(np.full(N, 0.2)), f32(np.full(N, 0.6)))
  d = (f32(np.full(N, 1e-3)), f32(np.full(N, 2e-3)))
  zq = (z[0] - d[1], z[1] - d[0])
  r = smooth.diff_relaxation("tanh", *z, *zq, *d)
  gap = (np.asarray(r.upper_d) - np.asarray(r.lower_d)) * 2e-3 + np.asarray(r.upper_r) - np.asarray(r.lower_r)
  assert np.max(gap) < 2e-3
  assert np.all(np.asarray(r.lower_q) == 0)  # the mean-value family, not the pair of relaxations


def test_docstring_examples():
  result = doctest.testmod(smooth, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
