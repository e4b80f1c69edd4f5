"""Counterexample search inside branch and bound (qbound.bounds.refute, qbound.attack.search_pieces):
what it reports is an error reached at an input inside the box, never above the exact maximum, and it
finds maxima that branch and bound's probes miss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.attack import PieceSearch, search_pieces
from qbound.bounds import bab, fused, refute

SMALL = PieceSearch(starts=4, steps=30)


def test_search_pieces_finds_the_larger_output_and_sign():
  # g = (x0 - 2 x1, 0.5 x0) on [-1, 1]^2: max |g| = 3 at (1, -1) or (-1, 1).
  graph = qb.trace(lambda x: jnp.array([[1.0, -2.0], [0.5, 0.0]]) @ x, jnp.zeros(2))
  lo, hi = -jnp.ones((1, 2)), jnp.ones((1, 2))
  value, x = search_pieces(graph, lo, hi, key=jax.random.key(0), search=SMALL)
  assert value == pytest.approx(3.0, rel=1e-6)
  assert abs(float(x[0]) - 2 * float(x[1])) == pytest.approx(3.0, rel=1e-6)
  # Only output 1 counts: its maximum is 0.5.
  value, _ = search_pieces(graph, lo, hi, key=jax.random.key(0), outputs=[1], search=SMALL)
  assert value == pytest.approx(0.5, rel=1e-6)


def test_search_pieces_stays_in_each_piece():
  graph = qb.trace(lambda x: jnp.sum(x)[None], jnp.zeros(3))
  lo = jnp.array([[0.0, 0.0, 0.0], [-3.0, -3.0, -3.0]])
  hi = jnp.array([[0.1, 0.2, 0.3], [-2.0, -2.0, -2.0]])
  value, x = search_pieces(graph, lo, hi, key=jax.random.key(1), search=SMALL)
  assert value == pytest.approx(9.0)  # the second piece's corner (-3, -3, -3)
  np.testing.assert_allclose(x, [-3.0, -3.0, -3.0])


def test_search_pieces_refuses_mismatched_corners():
  graph = qb.trace(lambda x: x, jnp.zeros(2))
  with pytest.raises(ValueError, match="pieces"):
    search_pieces(graph, jnp.zeros((2, 2)), jnp.ones((3, 2)), key=jax.random.key(0))


@pytest.mark.parametrize("seed, shape, bits", [(0, H.SHAPES[0], 3),
                                               pytest.param(1, H.SHAPES[1], 4, marks=pytest.mark.slow)])
def test_reached_errors_are_real_and_below_the_exact_maximum(seed, shape, bits):
  """The value is the error at the returned input (float64 within float32 rounding), that input lies
  in the box, and it never exceeds the exact maximal error (MILP); on these small nets it reaches it."""
  f, fq, _, _ = H.random_pair(seed, shape, bits=bits)
  box = qb.Box(-jnp.ones(shape[0]), jnp.ones(shape[0]))
  merged = qb.merge(f, fq, box)
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert exact.optimal
  value, x = search_pieces(merged.graph, box.lower[None], box.upper[None], key=jax.random.key(seed),
                           search=PieceSearch(starts=32, steps=100))
  assert box.contains(x)
  reached = float(np.abs(H.eval64(merged, x[None])).max())
  assert reached == pytest.approx(value, rel=1e-4, abs=1e-6)
  assert reached <= exact.upper + exact.tolerance
  assert reached >= 0.9 * exact.value


def test_rows_cover_the_box_the_best_input_and_the_worst_pieces():
  lower, upper = np.zeros(2, np.float32), np.array([4.0, 8.0], np.float32)
  worst = [(np.array([1.0, 1.0], np.float32), np.array([2.0, 2.0], np.float32))]
  los, his = refute.rows_to_search(lower, upper, np.array([4.0, 0.0], np.float32), worst, rows=7, box_rows=2)
  assert los.shape == his.shape == (7, 2)
  for row in (0, 1):
    np.testing.assert_array_equal(los[row], lower)
    np.testing.assert_array_equal(his[row], upper)
  # around the best input (4, 0), a quarter of the box's edges, clipped to the box
  np.testing.assert_allclose(los[2], [3.5, 0.0])
  np.testing.assert_allclose(his[2], [4.0, 1.0])
  np.testing.assert_array_equal(los[5], worst[0][0])
  np.testing.assert_array_equal(los[6], lower)  # padding: the box again
  assert np.all(los >= lower) and np.all(his <= upper) and np.all(los <= his)


def test_search_share_grows_only_when_the_bound_is_far_from_epsilon():
  s = refute.WorstPieceSearch(None, np.arange(1), np.zeros(1), np.ones(1), (1,), share=0.1, far_share=0.5,
                              first_after=0.5, far_after=8.0, spent=2.0)
  assert not s.due(0.2)  # before first_after
  assert not s.due(10.0, upper=1.0, epsilon=0.5)  # 2 s > 10% of 10 s
  assert s.due(10.0, upper=100.0, epsilon=0.5)  # far (200x epsilon after 8 s): up to half the time
  assert not s.due(5.0, upper=100.0, epsilon=0.5)  # far, but too early to give up on a proof
  assert not s.due(10.0, upper=100.0)  # no epsilon: no proof to give up on


def test_a_proof_is_given_up_only_after_far_after_seconds_of_search_not_of_compilation():
  """A first call compiles for most of its first seconds; the far test counts the rest only."""
  compiled = [3.0]
  s = refute.WorstPieceSearch(None, np.arange(1), np.zeros(1), np.ones(1), (1,), share=0.1, far_share=0.5,
                              first_after=0.5, far_after=8.0, spent=2.0, compiling=lambda: compiled[0],
                              compiled_before=1.0)
  compiled[0] = 6.0  # 5 s compiling since branch and bound began
  assert not s.due(10.0, upper=100.0, epsilon=0.5) and not s.far  # 5 s of search: not far yet
  assert s.due(13.0, upper=100.0, epsilon=0.5) and s.far  # 8 s of search
  fresh = refute.WorstPieceSearch(None, np.arange(1), np.zeros(1), np.ones(1), (1,), far_after=8.0,
                                  compiling=lambda: compiled[0])
  assert fresh.compiled_before == 6.0  # (the clock read when the search is made, by default)


def test_branch_and_bound_counts_its_root_compilation_out_of_the_far_test(monkeypatch):
  """branch_and_bound reads the compiling clock as it begins, before its root's batch (which a first
  call compiles), and its search rounds count from that reading."""
  readings = []
  def clock():
    readings.append(float(len(readings)))
    return readings[-1]

  monkeypatch.setattr(fused, "seconds_compiling", clock)
  made = []
  real = refute.searcher
  monkeypatch.setattr(refute, "searcher", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
  f, fq, _, _ = H.random_pair(6, (2, (8,), 1), bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  bab.branch_and_bound(qb.merge(f, fq, box), box, time_budget=1.0, epsilon=0.01)
  assert made and made[0].compiled_before == readings[0] == 0.0 and made[0].compiling is clock


def test_rounds_are_charged_before_they_run_only_where_a_counterexample_looks_unlikely(monkeypatch):
  """Issue 19: the clock starts at the root's end; a round's measured cost must fit in the share
  before it runs while the error reached is far below epsilon and the bound near it; elsewhere the
  rounds run as before (the pruned pairs they refute had reached 0.45-0.9 epsilon, or had bounds
  thousands of times epsilon)."""
  s = refute.WorstPieceSearch(None, np.arange(1), np.zeros(1), np.ones(1), (1,), share=0.05, first_after=0.4,
                              first_from_root=True, hopeful_lower=0.1)
  monkeypatch.setattr(refute, "_ROUND_COST", {s._key(): 0.1})
  unlikely = dict(upper=2.0, epsilon=0.05, lower=1e-5)  # ACAS Xu vs float16: 40x epsilon, 2e-4 of it reached
  assert not s.due(1.0, **unlikely)  # the root's batch ends here (a first call's compiling root)
  assert not s.due(1.3, **unlikely)  # 0.3 s after the root: too early for any round
  assert s.due(1.5, upper=2.0, epsilon=0.05, lower=0.03)  # 0.6 epsilon reached: checked before, paid after
  assert s.due(1.5, upper=100.0, epsilon=0.05, lower=1e-5)  # bound 2000x epsilon: the same
  assert s.due(1.5, upper=2.0)  # no epsilon: the same
  assert not s.due(2.5, **unlikely)  # 5% of 1.5 s after the root does not cover a 0.1 s round
  assert s.due(3.0, **unlikely)  # 5% of 2 s does
  s.spent = 0.1
  assert not s.due(4.0, **unlikely) and s.due(5.0, **unlikely)  # the next needs 0.2 s of 4 s
  # Before a round was measured, ROUND_GUESS per output is charged.
  monkeypatch.setattr(refute, "_ROUND_COST", {})
  fresh = refute.WorstPieceSearch(None, np.arange(5), np.zeros(1), np.ones(1), (1,), share=0.05, first_after=0.0,
                                  first_from_root=True, hopeful_lower=0.1)
  assert fresh.round_cost() == pytest.approx(5 * refute.ROUND_GUESS)
  # The schedule before issue 19 (clock from the start, never charged first) is still there to compare.
  old = refute.WorstPieceSearch(None, np.arange(1), np.zeros(1), np.ones(1), (1,), share=0.05, first_after=0.5)
  assert old.due(0.5, **unlikely)


def test_branch_and_bound_with_search_is_sound_and_its_witness_is_real():
  """With the search rounds (forced to run at once), the bounds still hold on samples, the lower
  bound is the error at the witness and it is at least the one without them."""
  f, fq, _, _ = H.random_pair(3, H.SHAPES[2], bits=3)
  box = qb.Box(-jnp.ones(H.SHAPES[2][0]), jnp.ones(H.SHAPES[2][0]))
  merged = qb.merge(f, fq, box)
  first_after = refute.FIRST_AFTER
  try:
    refute.FIRST_AFTER = 0.0
    res = bab.branch_and_bound(merged, box, time_budget=0.5, target_gap=0.0, search=True)
  finally:
    refute.FIRST_AFTER = first_after
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.abs(values).max() <= res.upper + 1e-9
  assert np.abs(H.eval64(merged, res.witness[None])).max() == pytest.approx(res.lower, rel=1e-4, abs=1e-6)
  assert box.contains(res.witness)
  assert res.lower <= res.upper


def test_without_epsilon_rounds_also_search_the_whole_box_for_the_selected_outputs(monkeypatch):
  """Closing the gap (no epsilon), a round past ``global_after`` also runs ``maximize_error`` on the
  whole box, on the selected outputs only (here the output of smaller error): what it returns is
  that output's error at its input. With an epsilon it runs only once the bound is far from it
  (FAR_GLOBAL: a proof is out of reach there), and never before ``global_after``."""
  f, fq, _, _ = H.random_pair(4, H.SHAPES[0], bits=3)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  sampled = np.abs(H.eval64(merged, H.grid(box, 60))).max(axis=0)
  small = int(np.argmin(sampled))
  assert sampled[1 - small] > 1.5 * sampled[small]  # counting the other output would show
  calls = []
  real = refute.maximize_error
  monkeypatch.setattr(refute, "maximize_error", lambda *a, **k: calls.append(k["outputs"]) or real(*a, **k))
  make = lambda: refute.WorstPieceSearch(merged.graph, np.array([small]), np.asarray(box.lower),
                                         np.asarray(box.upper), (2,), search=SMALL, first_after=0.0,
                                         global_after=0.5, global_search=H.search(), far_after=0.0)
  assert refute.FAR_GLOBAL
  far = 200 * 0.5
  for epsilon, elapsed, upper, runs in ((None, 0.2, np.inf, False), (None, 1.0, np.inf, True),
                                        (0.5, 1.0, 1.0, False), (0.5, 1.0, far, True), (0.5, 0.2, far, False)):
    s = make()
    s.due(0.0, epsilon=epsilon)  # the root's end
    assert s.due(elapsed, upper=upper, epsilon=epsilon)
    calls.clear()
    value, x = s.run([], np.zeros(2, np.float32))
    assert bool(calls) == runs and all(list(c) == [small] for c in calls)
    assert box.contains(x)
    reached = float(np.abs(H.eval64(merged, x[None])[0, small]))
    assert reached == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert reached >= 0.9 * sampled[small]
