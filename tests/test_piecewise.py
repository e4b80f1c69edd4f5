"""Tests of qbound.piecewise: exact piecewise-linear forms and pooling taps (pure numpy)."""

import doctest
import itertools

import numpy as np
import pytest

from qbound import piecewise as PW


def affine(slope, offset, name, shape=(3,)):
  return PW.Piecewise.affine(np.asarray(slope, np.float32), np.asarray(offset, np.float32), shape, name)


def test_hard_tanh_from_two_nested_joins():
  x = affine(1, 0, "x")
  inner = PW.join(affine(0, -1, "-1"), x, np.full(3, -1.0))  # where(x < -1, -1, x)
  outer = PW.join(inner, affine(0, 1, "1"), np.ones(3))      # where(x > 1, 1, inner)
  assert outer.values == ("-1", "x", "1")
  lo, hi, k = PW.clip_form(outer)
  assert k == 1 and np.all(lo == -1) and np.all(hi == 1)
  xs = np.linspace(-3, 3, 13)[:, None]
  np.testing.assert_array_equal(outer(xs), np.clip(xs, -1, 1) * np.ones(3))


def test_continuity_is_checked_exactly():
  """0.1 (float32) * 3 is not 0.3 (float32): the pieces do not meet, however close they are."""
  tenth = affine(np.float32(0.1), 0, "0.1 x")
  with pytest.raises(PW.NotPiecewiseLinear, match="step"):
    PW.join(tenth, affine(0, np.float32(0.3), "0.3"), np.full(3, 3.0))
  meets = PW.Piecewise.affine(0.0, float(np.float32(0.1)) * 3, (3,), "c")  # float64: exactly 0.1f * 3
  exact = PW.join(tenth, meets, np.full(3, 3.0))
  assert len(exact.breaks) == 1


def test_breakpoints_on_both_sides_of_a_cut_are_rejected():
  ramp = PW.Piecewise.ramp(np.array([-1.0, 0.0, 2.0]), (3,), rising=True, x="x", constant="c")
  with pytest.raises(PW.NotPiecewiseLinear, match="both sides"):
    PW.join(ramp, affine(1, 0, "x"), np.ones(3))


def test_identical_pieces_are_merged():
  x = affine(1, 0, "x")
  assert PW.join(x, affine(1, 0, "y"), np.zeros(3)).breaks == ()


@pytest.mark.parametrize("window, strides, padding, dilation", [
    ((2, 2), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 3), (2, 1), ((1, 0), (0, 2)), (2, 1)),
])
def test_pooling_taps_reproduce_max_pooling(window, strides, padding, dilation):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 6))
  taps, out_shape = PW.window_taps(x.shape, window, strides, padding, dilation)
  values = []
  for tap in taps:
    if tap[0] == "slice":
      _, start, limit, step = tap
      values.append(x[tuple(slice(a, b, s) for a, b, s in zip(start, limit, step))])
    else:
      values.append(x[tuple(np.moveaxis(tap[1], -1, 0))])
  got = np.max(values, axis=0)
  padded = np.pad(x, padding, constant_values=-np.inf)
  expected = np.full(out_shape, -np.inf)
  for o in itertools.product(*[range(n) for n in out_shape]):
    for w in itertools.product(*[range(k) for k in window]):
      idx = tuple(oi * s + wi * d for oi, s, wi, d in zip(o, strides, w, dilation))
      expected[o] = max(expected[o], padded[idx])
  np.testing.assert_array_equal(got, expected)


def test_docstring_examples():
  result = doctest.testmod(PW, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0



@pytest.mark.parametrize("values, shape", [(0.0, (4,)), (-0.0, (2, 3)), (np.float32(0.1), (3,)),
                                           (np.full((2, 2), 1e-30), (2, 2)), ([0.5, 0.25, 0.5], (3,)),
                                           (np.zeros(0), (0,))])
def test_exact_is_each_value_as_a_fraction(values, shape):
  """A uniform array shares one Fraction (the fast path); any array equals its entries exactly."""
  from fractions import Fraction

  out = PW.exact(values, shape)
  assert out.shape == shape and out.dtype == object
  want = np.broadcast_to(np.asarray(values, np.float64), shape).ravel()
  assert all(isinstance(got, Fraction) and got == Fraction(float(v)) for got, v in zip(out.ravel(), want))


@pytest.mark.parametrize("values", [np.full(3, np.nan), np.array([1.0, np.nan])])
def test_exact_refuses_nan(values):
  with pytest.raises(ValueError):
    PW.exact(values, (values.size,))
