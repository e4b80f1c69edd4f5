"""qb.props: top-1, delta-top-1, max-error and polytope properties, decided soundly."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qbound as qb
from helpers import SHAPES, eval64, random_box, random_pair, sample_points
from qbound.props import engine
from qbound.props.spec import DeltaTop1, MaxError, Polytope, RelativeError, Top1, Unsafe

CLASS_SHAPES = [s for s in SHAPES if s[2] >= 2]


def _outputs64(f_graph, xs):
  return eval64(f_graph, xs).reshape(len(xs), -1)


def assert_verdict_holds(prop, f, fq, box, verdict, samples=3000):
  """A proof must survive dense sampling (float64); a counterexample must be one, inside the box."""
  raw = qb.merge(f, fq, box)
  if verdict.status == "proved":
    xs = sample_points(box, samples, seed=1)
    yf, yq = _outputs64(raw.f_graph, xs), _outputs64(raw.fq_graph, xs)
    bad = [k for k in range(len(xs)) if prop.violated(yf[k], yq[k])]
    assert not bad, f"{prop.describe()} proved, but x = {xs[bad[0]].tolist()} violates it"
  elif verdict.status == "counterexample":
    x = np.asarray(verdict.counterexample)
    assert box.contains(x)
    yf, yq = _outputs64(raw.f_graph, x[None]), _outputs64(raw.fq_graph, x[None])
    assert prop.violated(yf[0], yq[0])
    np.testing.assert_allclose(verdict.f_output, yf[0], rtol=1e-12)


@pytest.mark.slow  # 21 s; the fixed verdict tests stay
@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(CLASS_SHAPES), bits=st.sampled_from([2, 3, 4, 6, 8]),
       delta=st.sampled_from([None, 0.6, 0.9]), radius=st.sampled_from([(0.01, 0.05), (0.05, 0.3), (0.3, 1.0)]))
def test_verdicts_hold_against_sampling(seed, shape, bits, delta, radius):
  f, fq, _, _ = random_pair(seed, shape, bits=bits, init_scale=1.5)
  box = random_box(seed, shape[0], radius=radius)
  prop = Top1() if delta is None else DeltaTop1(delta)
  verdict = qb.props.verify(f, fq, box, prop, time_budget=3.0)
  assert_verdict_holds(prop, f, fq, box, verdict)


@pytest.mark.slow  # ~18 s: how tight the proof is; the verdicts' soundness is checked by the other tests
def test_proof_needs_the_differential_rows(monkeypatch):
  """A close copy (weights + 0.1% noise) on the whole box [-1, 1]^5, delta = 0.9: the bounds of f
  and f_q alone need tens of thousands of pieces, the mixed sums (``d_c - d_m`` against f's margin,
  :func:`engine.with_mixed_sums`) prove it on the box itself; and the proof holds."""
  f, fq, _, _ = random_pair(3, SHAPES[2], noise=1e-3, init_scale=2.0)
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  prop = DeltaTop1(0.9)
  verdict = qb.props.verify(f, fq, box, prop, time_budget=20.0)
  assert verdict.status == "proved" and verdict.pieces_bounded <= 64, str(verdict)
  assert_verdict_holds(prop, f, fq, box, verdict)
  monkeypatch.setattr(engine, "MAX_ROWS", 0)  # no mixed sums
  without = qb.props.verify(f, fq, box, prop, time_budget=3.0)
  assert without.status == "unknown" or without.pieces_bounded > 100 * verdict.pieces_bounded


def test_mixed_sums_close_what_rows_alone_cannot():
  """On one piece across the boundary, the polytope "f prefers 0, f_q prefers 1" is closed only by
  the sum of its rows."""
  A = np.array([[-1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])  # f_1 - f_0 <= 0, fq_0 - fq_1 <= 0
  b = np.zeros(2)
  A2, b2 = engine.with_mixed_sums(A, b, 2)
  assert A2.shape == (3, 4) and np.allclose(A2[2], [-1, 1, 1, -1]) and b2[2] == 0
  book = engine.RowBook([Polytope(A, b)], 2)
  P = book.P
  # f_0 - f_1 and fq_0 - fq_1 both in [-1, 1]: no row alone closes. The sum of the rows says
  # d_0 - d_1 >= 0 (f prefers 0 by more than f_q does), which d_0 - d_1 in [-0.2, -0.1] rules out.
  def bounds(value_lo, value_hi):
    lo = np.zeros((1, len(P)))
    hi = np.zeros((1, len(P)))
    for r, v in enumerate(P):
      if np.allclose(np.abs(v), [1, 1]):
        sign = 1.0 if v[0] > 0 else -1.0
        lo[0, r], hi[0, r] = (value_lo, value_hi) if sign > 0 else (-value_hi, -value_lo)
    return lo, hi

  lows = book.lower(bounds(-1.0, 1.0), bounds(-1.0, 1.0), bounds(-0.2, -0.1))
  closes = (lows - book.b[None] > 0).any(axis=2)
  assert closes.all()
  assert not (lows[:, :, :2] - book.b[None, :, :2] > 0).any()  # the rows alone do not
  lows = book.lower(bounds(-1.0, 1.0), bounds(-1.0, 1.0), bounds(-0.1, 0.2))
  assert not (lows - book.b[None] > 0).any(axis=2).all()


def test_counterexample_found_and_checked():
  """A 2-bit copy of a net disagrees with it on a large box: a counterexample, in the box, checked."""
  f, fq, _, _ = random_pair(1, SHAPES[2], bits=2, init_scale=1.5)
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  verdict = qb.props.verify(f, fq, box, Top1(), time_budget=10.0)
  assert verdict.status == "counterexample" and verdict.vnncomp == "sat"
  assert_verdict_holds(Top1(), f, fq, box, verdict)
  data = json.loads(verdict.to_json())
  assert data["answer"] == "sat" and len(data["counterexample"]) == 5


def test_unpaired_networks_use_crown_on_each():
  """f and a copy with another hidden width (not paired): still decided, and soundly."""
  f, _, _, _ = random_pair(4, SHAPES[0], bits=8)
  g, _, _, _ = random_pair(4, (2, (8, 6), 2), bits=8)
  box = random_box(2, 2, radius=(0.01, 0.02))
  assert not qb.merge(f, g, box).paired
  verdict = qb.props.verify(f, g, box, Top1(), time_budget=5.0)
  assert verdict.status in ("proved", "counterexample")
  assert_verdict_holds(Top1(), f, g, box, verdict)


@pytest.mark.slow  # 10 s
def test_max_error_goes_through_certify():
  f, fq, _, _ = random_pair(5, SHAPES[2], bits=4)
  box = random_box(5, 5, radius=(0.05, 0.1))
  cert = qb.certify(f, fq, box, time_budget=5.0)
  above = qb.props.verify(f, fq, box, MaxError(2 * cert.upper + 1e-6), time_budget=5.0)
  assert above.status == "proved" and above.certificate is not None
  below = qb.props.verify(f, fq, box, MaxError(cert.lower / 2), time_budget=5.0)
  assert below.status == "counterexample"
  assert_verdict_holds(MaxError(cert.lower / 2), f, fq, box, below)


def test_weighted_and_relative_errors():
  """Weighted max error (through the splitting engine) agrees with certify's interval, and the relative
  error's verdicts hold against sampling."""
  f, fq, _, _ = random_pair(5, SHAPES[2], bits=4)
  box = random_box(5, 5, radius=(0.05, 0.1))
  cert = qb.certify(f, fq, box, time_budget=5.0)
  weights = (1.0, 2.0, 0.5)
  above = MaxError(2 * 2.0 * cert.upper + 1e-6, weights=weights)
  assert qb.props.verify(f, fq, box, above, time_budget=10.0).status == "proved"
  below = MaxError(0.5 * 0.5 * cert.lower, weights=weights)
  verdict = qb.props.verify(f, fq, box, below, time_budget=10.0)
  assert verdict.status == "counterexample"
  assert_verdict_holds(below, f, fq, box, verdict)
  for prop in (RelativeError(0.5, floor=2 * cert.upper), RelativeError(0.01, floor=0.0)):
    verdict = qb.props.verify(f, fq, box, prop, time_budget=5.0)
    assert verdict.status != "unknown", str(verdict)
    assert_verdict_holds(prop, f, fq, box, verdict)
  assert qb.props.verify(f, fq, box, RelativeError(0.5, floor=2 * cert.upper)).status == "proved"
  with pytest.raises(ValueError, match="weights"):
    MaxError(0.1, weights=(1.0, -1.0))
  with pytest.raises(ValueError, match="one weight per selected output"):
    qb.props.verify(f, fq, box, MaxError(0.1, weights=(1.0, 2.0)))


def test_unsafe_polytopes_of_both_outputs():
  """A VNN-LIB style property: f_0 - fq_0 >= 10 can never hold for an 8-bit copy (proved), and
  f_0 >= -100 holds everywhere (a counterexample at once)."""
  f, fq, _, _ = random_pair(6, SHAPES[0], bits=8)
  box = random_box(6, 2)
  far = Unsafe((Polytope(np.array([[-1.0, 0.0, 1.0, 0.0]]), np.array([-10.0])),))
  assert qb.props.verify(f, fq, box, far, time_budget=5.0).status == "proved"
  easy = Unsafe((Polytope(np.array([[-1.0, 0.0, 0.0, 0.0]]), np.array([100.0])),))
  verdict = qb.props.verify(f, fq, box, easy, time_budget=5.0)
  assert verdict.status == "counterexample"
  assert_verdict_holds(easy, f, fq, box, verdict)


def test_certified_agreement_counts_the_boxes():
  f, fq, _, _ = random_pair(7, SHAPES[2], bits=6)
  centres = jax.random.uniform(jax.random.key(0), (4, 5), minval=-1, maxval=1)
  report = qb.props.certified_agreement(f, fq, qb.linf_ball(centres, 0.01), time_budget=3.0)
  assert len(report.verdicts) == 4 and report.measured.shape == (4,)
  assert math.isclose(report.certified + report.refuted + report.unknown, 1.0)
  for v, same in zip(report.verdicts, report.measured):
    if v.status == "proved":
      assert same  # the centre is in the box
  assert "boxes" in str(report)


def test_violated_is_strict_about_ties():
  assert not Top1().violated([1.0, 1.0], [0.0, 5.0])  # f has no unique class
  assert not Top1().violated([2.0, 1.0], [1.0, 1.0])  # f_q ties: not a clear change of class
  assert Top1().violated([2.0, 1.0], [1.0, 1.5])
  p = DeltaTop1(0.9)
  assert not p.violated([2.0, 0.0], [0.0, 1.0])  # softmax 0.88 < 0.9
  assert p.violated([3.0, 0.0], [0.0, 1.0])  # 0.95


def test_delta_margin_is_implied_by_confidence():
  """softmax_c >= delta implies f_c - f_j >= margin for every j (the rows the proof uses)."""
  rng = np.random.default_rng(0)
  for delta in (0.51, 0.8, 0.99, 0.999):
    p = DeltaTop1(delta)
    for _ in range(2000):
      y = rng.normal(scale=4, size=5)
      c = int(np.argmax(y))
      if p._confident(y, c):
        assert np.all(np.delete(y[c] - y, c) >= p.margin() - 1e-12)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, float("nan"), "0.9", True])
def test_delta_out_of_range(bad):
  with pytest.raises(ValueError, match="delta"):
    DeltaTop1(bad)


def test_bad_arguments_are_refused():
  f, fq, _, _ = random_pair(0, SHAPES[0])
  box = random_box(0, 2)
  with pytest.raises(TypeError, match="prop must be"):
    qb.props.verify(f, fq, box, "top1")
  with pytest.raises(ValueError, match="epsilon"):
    MaxError(-1.0)
  with pytest.raises(ValueError, match="act on 6 outputs"):
    qb.props.verify(f, fq, box, Unsafe((Polytope(np.ones((1, 6)), np.zeros(1)),)))
  single, fq1, _, _ = random_pair(0, SHAPES[3])
  with pytest.raises(ValueError, match="at least 2 outputs"):
    qb.props.verify(single, fq1, random_box(0, 4), Top1())
  with pytest.raises(ValueError, match="time_budget"):
    qb.props.verify(f, fq, box, Top1(), time_budget=float("nan"))


def test_rows_that_float32_cannot_hold_are_widened():
  """A weight of 0.1 is not a float32 number: the spec layer holds its rounding, and the row's bound
  is widened by the rounding times the largest output, so it still bounds the float64 row."""
  A = np.array([[0.1, 0.0, -0.1, 0.0]])
  book = engine.RowBook([Polytope(A, np.array([-1.0]))], 2)
  assert book.P.dtype == np.float32 and np.any(book._rounding > 0)
  n = len(book.P)
  y_lo, y_hi = np.full((1, n), -5.0), np.full((1, n), 5.0)
  y_lo[0, :book._units], y_hi[0, :book._units] = 0.3, 0.3  # every P row's value pinned at 0.3
  lows = book.lower((y_lo, y_hi), (y_lo, y_hi), (y_lo, y_hi))
  slack = book._slack(y_lo, y_hi)
  assert np.all(slack > 0) and np.all(slack < 1e-6)
  assert np.all(lows < 0.3 + 0.3)  # widened, never tightened
