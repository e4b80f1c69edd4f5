"""Branch and bound on the input (qbound.bounds.bab): sound at every stop, and converging to the
exact maximal error on small ReLU nets."""

from __future__ import annotations

import heapq

import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.bounds import bab, bab_batch, bab_children, splitting
from qbound.bounds.diff import diff_bounds


def small_case(seed=0, shape=H.SHAPES[0], bits=3):
  f, fq, _, _ = H.random_pair(seed, shape, bits=bits)
  n_in = shape[0]
  box = qb.Box(-jnp.ones(n_in), jnp.ones(n_in))
  return f, fq, box, qb.merge(f, fq, box)


def test_root_bounds_are_the_differential_bounds():
  _, _, box, merged = small_case()
  res = bab.branch_and_bound(merged, box, time_budget=0.0)
  _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True)
  lo, hi = (np.asarray(b, np.float64).reshape(-1) for b in d[merged.f_graph.output])
  np.testing.assert_allclose(res.root_lower, lo, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(res.root_upper, hi, rtol=1e-5, atol=1e-7)
  assert res.upper >= res.lower and res.pieces_bounded >= 1


# The second and third (~27 s and ~16 s) run with -m slow; the first covers the same code.
@pytest.mark.parametrize("seed, shape, bits", [(0, H.SHAPES[0], 3), pytest.param(1, H.SHAPES[1], 4, marks=pytest.mark.slow),
                                              pytest.param(2, H.SHAPES[3], 6, marks=pytest.mark.slow)])
def test_converges_to_the_exact_value(seed, shape, bits):
  """Every stop is sound (lower <= exact <= upper), and the gap closes on small nets."""
  f, fq, box, merged = small_case(seed, shape, bits)
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert exact.optimal
  res = bab.branch_and_bound(merged, box, time_budget=60, target_gap=0.01)
  tol = exact.tolerance
  assert res.lower <= exact.upper + tol and res.upper >= exact.value - tol
  assert res.stopped in ("gap", "exhausted"), res
  assert res.upper <= 1.01 * exact.upper + tol
  # The reached error is reached: the witness's error, in float64, is the lower bound (up to float32).
  assert np.abs(H.eval64(merged, res.witness[None])).max() == pytest.approx(res.lower, rel=1e-4, abs=1e-6)


def test_sampled_errors_within_the_bounds_when_stopped_early():
  f, fq, box, merged = small_case(3, H.SHAPES[2], 4)
  res = bab.branch_and_bound(merged, box, time_budget=0.3, target_gap=0.0)
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= res.diff_lower - 1e-9) and np.all(values <= res.diff_upper + 1e-9)
  assert np.abs(values).max() <= res.upper + 1e-9


def test_candidate_axes_skip_empty_dimensions():
  sensitivity = np.ones(4)
  assert splitting.candidate_axes(np.array([1.0, 0.02, 50.0, 0.0]), sensitivity) == [2, 0, 1]
  assert splitting.candidate_axes(np.zeros(4), sensitivity) == []
  assert splitting.candidate_axes(np.array([0.0, 1e-9, 0.0, 0.0]), sensitivity) == [1]


def test_candidate_axes_keep_the_dimensions_that_weigh_most_in_the_bound():
  width = np.full(5, 1.0)
  sensitivity = np.array([0.1, 3.0, 0.0, 2.0, 1.0])
  assert splitting.candidate_axes(width, sensitivity) == [1, 3, 4]
  # The weight is |coefficient| times width: a narrower piece side counts for less.
  assert splitting.candidate_axes(np.array([1.0, 0.2, 1.0, 1.0, 1.0]), sensitivity) == [3, 4, 1]
  assert splitting.candidate_axes(width[:3], sensitivity[:3]) == [1, 0, 2]  # few dimensions: all
  # A dimension the bound ignores is still split once it is the only one left with width.
  assert splitting.candidate_axes(np.array([0.0, 0.0, 1.0, 0.0, 0.0]), sensitivity) == [2]


@pytest.mark.parametrize("seed,shape,compression", [(0, H.SHAPES[1], {"bits": 3}), (1, H.SHAPES[2], {"bits": 8}),
                                                    (2, H.SHAPES[0], {"noise": 1e-3})])
def test_diff_bounds_without_f_crown_are_sound(seed, shape, compression):
  """f_crown=False bounds f's nodes by intervals and z = z_q + d: still sound, and for a close copy
  as tight as with f's CROWN bounds."""
  f, fq, _, _ = H.random_pair(seed, shape, **compression)
  box = H.random_box(seed, shape[0])
  merged = qb.merge(f, fq, box)
  values = H.eval64(merged, H.sample_points(box, 2000, seed))
  for f_crown in (True, False):
    _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True, f_crown=f_crown)
    lo, hi = (np.asarray(b, np.float64).reshape(-1) for b in d[merged.f_graph.output])
    assert np.all(values >= lo - 1e-9) and np.all(values <= hi + 1e-9), f_crown
    if f_crown:
      width = hi - lo
    elif "noise" in compression:
      assert np.all(hi - lo <= 1.05 * width + 1e-7)


def test_f_crown_is_skipped_only_for_close_copies():
  """Branch and bound drops f's CROWN bounds when z_q + d is barely wider than them (a close copy),
  and keeps them for a coarse one."""
  widening = {}
  for name, compression in (("close", {"noise": 1e-4}), ("coarse", {"bits": 2})):
    f, fq, _, _ = H.random_pair(3, H.SHAPES[1], init_scale=2.0, **compression)
    box = qb.Box(-jnp.ones(3), jnp.ones(3))
    merged = qb.merge(f, fq, box)
    z, zq, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True)
    widening[name] = bab_batch.widening_of(merged.f_graph, z, zq, d)
  assert widening["close"] <= bab_batch.F_CROWN_WIDENING < widening["coarse"]


def test_strong_branching_prefers_splits_that_help_both_children():
  # Minimax would pick axis 0 (worse child 0.9 < 0.95); the product of gains picks axis 1.
  assert splitting.strong_branching_axis(1.0, [(0.9, 0.999), (0.95, 0.6)]) == 1
  # No gain anywhere: any axis, but a valid one.
  assert splitting.strong_branching_axis(1.0, [(1.0, 1.0), (1.0, 1.0)]) in (0, 1)


def test_default_batch_size_follows_the_net_size():
  _, _, _, small = small_case()
  assert bab.default_batch_size(small) == 256
  f, fq, _, _ = H.random_pair(0, (4, (200, 200), 2), bits=8)
  box = qb.Box(-jnp.ones(4), jnp.ones(4))
  assert bab.default_batch_size(qb.merge(f, fq, box)) == 32


def test_auto_branches_first_on_few_inputs(monkeypatch):
  """Paired networks with few inputs: auto goes to branch and bound (no separate CROWN pass) and
  closes the gap to the exact value. (The NumPy search that auto also runs on such small pairs
  would close it first: tests/test_host_bab.py.)"""
  import importlib

  monkeypatch.setattr(importlib.import_module("qbound.certify"), "HOST_HEAD_START", None)
  f, fq, box, _ = small_case(0, H.SHAPES[0], 3)
  cert = qb.certify(f, fq, box, method="auto", time_budget=60, target_gap=0.02)
  assert {"interval", "diff", "bab"} <= set(cert.bounds) and "crown" not in cert.bounds
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert cert.lower <= exact.upper + exact.tolerance
  assert exact.value - exact.tolerance <= cert.upper <= 1.02 * exact.upper + exact.tolerance


def test_progress_bar_shows_the_interval(capsys):
  _, _, box, merged = small_case()
  res = bab.branch_and_bound(merged, box, time_budget=0.5, progress=True)
  err = capsys.readouterr().err
  assert "branch and bound" in err and "piece" in err, err
  assert res.upper >= res.lower
  with pytest.raises(TypeError, match="progress"):
    bab.branch_and_bound(merged, box, progress="yes")


def test_sparse_bounds_on_every_neuron_measure_the_dense_widening():
  """``every_neuron=True`` (branch and bound's check of how close f_q is) gives about the widening
  of the dense differential bounds, and its bounds hold the values the networks reach."""
  from qbound.bounds.sparse import diff_bounds_sparse

  f, fq, box, merged = small_case(seed=1, shape=H.SHAPES[1], bits=4)
  boxes = qb.Box(box.lower[None], box.upper[None])
  fg, qg = merged.f_graph, merged.fq_graph
  dense = bab_batch.widening_of(fg, *diff_bounds(fg, qg, boxes, None, True, True, batched=True))
  full = diff_bounds_sparse(fg, qg, boxes, every_neuron=True)
  assert bab_batch.widening_of(fg, full.z, full.zq, full.d) == pytest.approx(dense, rel=0.1)
  xs = np.random.default_rng(0).uniform(np.asarray(box.lower), np.asarray(box.upper), (64, box.lower.size))
  values = np.stack([np.asarray(f(jnp.asarray(x)) - fq(jnp.asarray(x)), np.float64).reshape(-1) for x in xs])
  lo, hi = (np.asarray(b, np.float64).reshape(-1) for b in full.d[fg.output])
  assert np.all(values >= lo - 1e-6) and np.all(values <= hi + 1e-6)


def test_candidate_axes_take_as_many_as_asked():
  width = np.ones(5)
  sensitivity = np.array([0.1, 3.0, 0.2, 2.0, 1.0])
  assert splitting.candidate_axes(width, sensitivity, 2) == [1, 3]
  assert splitting.candidate_axes(width, sensitivity, 1) == [1]


@pytest.mark.slow  # 11 s
def test_close_copy_of_a_larger_net_is_bounded_sparsely_and_soundly():
  """Above SMALL_NET_NEURONS a close copy (f's CROWN rows skipped) takes the sparse passes, with
  rows per piece: every sampled difference lies within the bounds, at every stop."""
  f, fq, _, _ = H.random_pair(4, (3, (140, 140), 2), noise=1e-3)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert not bab._dense_for_close_copies(merged)
  res = bab.branch_and_bound(merged, box, time_budget=60, target_gap=0.0, max_pieces=24)
  assert res.stopped == "max_pieces" and res.pieces_bounded > 24
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= res.diff_lower - 1e-9) and np.all(values <= res.diff_upper + 1e-9)
  assert np.abs(values).max() <= res.upper + 1e-9 and res.lower <= res.upper


def test_zonotope_option_is_sound_and_converges():
  """With ``zonotope=True`` each batch's differential bounds are met with differential zonotopes':
  on a pair far apart (noise of the largest weight) every stop is sound and the gap closes to the
  exact value; networks the zonotopes cannot bound are refused by name."""
  f, fq, _, _ = H.random_pair(5, H.SHAPES[0], noise=1.0)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert exact.optimal
  res = bab.branch_and_bound(merged, box, time_budget=60, target_gap=0.01, zonotope=True)
  tol = exact.tolerance
  assert res.lower <= exact.upper + tol and exact.value - tol <= res.upper <= 1.01 * exact.upper + tol
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= res.diff_lower - 1e-9) and np.all(values <= res.diff_upper + 1e-9)
  smooth = qb.merge(lambda x: jnp.tanh(x * 2.0), lambda x: jnp.tanh(x * 2.5), box)
  with pytest.raises(qb.errors.UnsupportedLayerError, match="tanh"):
    bab.branch_and_bound(smooth, box, time_budget=1, zonotope=True)


def test_influence_coefficients_are_per_unit_width_for_both_rows():
  influence = jnp.asarray([[[2.0, 4.0, 0.0], [1.0, 0.0, 3.0]]])  # (pieces, inputs, outputs)
  lo, hi = jnp.asarray([[0.0, -1.0]]), jnp.asarray([[2.0, -1.0]])  # half-widths 1 and 0
  rows = np.asarray(bab_batch.influence_coefficients(influence, lo, hi, np.asarray([0, 2])))
  assert rows.shape == (1, 4, 2)
  np.testing.assert_allclose(rows[0], [[2.0, 1.0], [0.0, 3.0], [2.0, 1.0], [0.0, 3.0]])


def test_root_children_fit_beside_the_root_or_not_at_all():
  assert bab._root_children(np.array([1.0, 0.0, 2.0]), 32) == [0, 2]
  assert bab._root_children(np.array([1.0, 1.0, 1.0, 1.0, 1.0]), 11) == [0, 1, 2, 3, 4]
  assert bab._root_children(np.array([1.0, 1.0, 1.0, 1.0, 1.0]), 10) == []
  assert bab._root_children(np.zeros(3), 32) == []


@pytest.mark.parametrize("root_children", [True, False])
def test_root_split_in_the_first_batch_is_sound(monkeypatch, root_children):
  """The root's batch bounds the root's halves along every dimension beside it, and the root is
  split at once: the first batch bounds 1 + 2 * dims pieces, and every stop stays sound."""
  monkeypatch.setattr(bab, "ROOT_CHILDREN", root_children)
  f, fq, box, merged = small_case(3, H.SHAPES[2], 4)
  first = bab.branch_and_bound(merged, box, time_budget=0.0)
  assert first.pieces_bounded == (1 + 2 * box.lower.size if root_children else 1)
  values = H.eval64(merged, H.sample_points(box, 2000))
  for res in (first, bab.branch_and_bound(merged, box, time_budget=0.3, target_gap=0.0)):
    assert np.all(values >= res.diff_lower - 1e-9) and np.all(values <= res.diff_upper + 1e-9)
    assert np.abs(values).max() <= res.upper + 1e-9
  # The root's own bounds are still reported as such.
  _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True)
  np.testing.assert_allclose(first.root_upper, np.asarray(d[merged.f_graph.output][1]).reshape(-1), rtol=1e-5, atol=1e-7)


def test_gradient_split_rule_is_sound_against_sampling(monkeypatch):
  """``split_rule="gradient"`` (NeuroDiff's interval-gradient score) is used on a paired ReLU chain of
  5 inputs (more than strong branching tries) and every bound holds the sampled errors; unknown rules
  are refused by name."""
  f, fq, box, merged = small_case(3, H.SHAPES[2], 4)
  calls = []
  real = bab_batch.gradient_coefficients
  monkeypatch.setattr(bab_batch, "gradient_coefficients", lambda *a: calls.append(1) or real(*a))
  res = bab.branch_and_bound(merged, box, time_budget=0.5, target_gap=0.0, split_rule="gradient")
  assert calls and res.pieces_bounded > 1
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= res.diff_lower - 1e-9) and np.all(values <= res.diff_upper + 1e-9)
  assert res.lower <= res.upper
  assert np.abs(values).max() <= res.upper + 1e-9
  with pytest.raises(ValueError, match="split_rule"):
    bab.branch_and_bound(merged, box, time_budget=0.1, split_rule="smear")


def test_batch_size_without_epsilon_on_few_inputs():
  f, fq, _, _ = H.random_pair(7, (2, (150, 150), 1), bits=8)
  large = qb.merge(f, fq, qb.Box(-jnp.ones(2), jnp.ones(2)))
  small = qb.merge(*H.random_pair(0, H.SHAPES[0])[:2], qb.Box(-jnp.ones(2), jnp.ones(2)))
  assert bab.gap_batch_size(large, 2, None) == bab.GAP_BATCH_SIZE > 32
  assert bab.gap_batch_size(large, 2, 0.05) == bab.gap_batch_size(large, 9, None) == 32
  assert bab.gap_batch_size(small, 2, None) == bab.gap_batch_size(small, 2, 0.05) == 256


@pytest.mark.slow
def test_closing_the_gap_on_few_inputs_takes_larger_batches():
  """Without an epsilon, on few inputs, a net above SMALL_NET_NEURONS bounds GAP_BATCH_SIZE pieces a
  batch (32 with an epsilon); its bound still holds on samples and its lower bound is reached."""
  f, fq, _, _ = H.random_pair(7, (2, (150, 150), 1), bits=8)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  gap = bab.branch_and_bound(merged, box, time_budget=0.5, target_gap=0.0)
  decide = bab.branch_and_bound(merged, box, time_budget=0.5, epsilon=1e-9)
  assert sum(gap.layout.values()) == bab.GAP_BATCH_SIZE and sum(decide.layout.values()) == 32
  values = np.abs(H.eval64(merged, H.sample_points(box, 500)))
  assert values.max() <= gap.upper + 1e-9
  reached = np.abs(H.eval64(merged, gap.witness[None])).max()
  assert reached == pytest.approx(gap.lower, rel=1e-4, abs=1e-7)


def test_pairs_that_differ_on_large_nets_stay_sound_without_hidden_diff_rows(monkeypatch):
  """On nets above SMALL_NET_NEURONS (lowered here so a small net takes the path), a copy that
  really differs is bounded without differential rows at the hidden layers and with its own output
  rows (bab_batch.DIFFERING_HIDDEN_DIFF_ROWS, OWN_OUTPUT_ROWS): every batch after the root's takes
  that path, and every stop is sound against the exact value (MILP)."""
  from qbound.bounds import sparse

  monkeypatch.setattr(bab, "SMALL_NET_NEURONS", 4)
  calls = []
  real = sparse.diff_bounds_sparse

  def spy(*args, **kwargs):
    calls.append((kwargs.get("own_output_rows"), kwargs.get("hidden_diff_rows")))
    return real(*args, **kwargs)

  monkeypatch.setattr(bab_batch, "diff_bounds_sparse", spy)
  f, fq, _, _ = H.random_pair(0, H.SHAPES[1], noise=0.3, init_scale=2.0)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert exact.optimal
  for budget in (0.3, 1.5):
    res = bab.branch_and_bound(merged, box, time_budget=budget, target_gap=0.01)
    assert res.lower <= exact.upper + exact.tolerance and res.upper >= exact.value - exact.tolerance
  # The root's batch is bounded as before (no own output rows, hidden rows kept); the others not.
  assert calls[0] == (False, True) and (True, False) in calls


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_close_copies_of_large_nets_prove_in_batches_of_16(monkeypatch):
  """Proving an epsilon on a large net's close copy takes batches of CLOSE_COPY_BATCH_SIZE; a copy
  that really differs goes back to 32 after the root's batch, which tells the two apart (with
  ROOT_AT_DIFFERING_SIZE, a copy not close by its weights bounds its root's batch at 32, and goes to
  CLOSE_COPY_BATCH_SIZE if the root's batch finds it close after all). All stay sound at sampled
  points."""
  shapes = []
  real = bab.batch_bounds

  def spy(fg, qg, mg, lo, hi, *args, **kwargs):
    shapes.append(lo.shape[0])
    return real(fg, qg, mg, lo, hi, *args, **kwargs)

  monkeypatch.setattr(bab, "batch_bounds", spy)
  grids = []
  real_grid = bab_children.grid
  monkeypatch.setattr(bab_children, "grid", lambda *args: grids.append(args[1]) or real_grid(*args))
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  seen = {}
  cases = (("close", {"noise": 1e-4}, False), ("coarse", {"bits": 2}, False),
           ("close by widening, root at 32", {"noise": 5e-3}, True))
  for name, compression, root_at_32 in cases:
    monkeypatch.setattr(bab, "ROOT_AT_DIFFERING_SIZE", root_at_32)
    f, fq, _, _ = H.random_pair(7, (2, (150, 150), 1), init_scale=2.0, **compression)
    merged = qb.merge(f, fq, box)
    values = np.abs(H.eval64(merged.graph, H.sample_points(box, 2000)))
    shapes.clear()
    # (three batches, whatever the time: a first call compiles for seconds)
    res = bab.branch_and_bound(merged, box, epsilon=2 * values.max(), time_budget=300.0, search=False,
                               stop=lambda: len(shapes) >= 3)
    assert values.max() <= res.upper + 1e-9 and len(shapes) >= 2
    seen[name] = list(shapes)
    seen[name + " grids"] = list(grids)
    grids.clear()
  assert set(seen["close"]) == {bab.CLOSE_COPY_BATCH_SIZE}
  assert seen["coarse"][0] == bab.CLOSE_COPY_BATCH_SIZE and set(seen["coarse"][1:]) == {32}
  widening = seen["close by widening, root at 32"]
  assert widening[0] == 32 and set(widening[1:]) == {bab.CLOSE_COPY_BATCH_SIZE}
  # While at most a quarter of a batch needs splitting, the close copy's pieces are cut in grids.
  assert seen["close grids"] and all(0 < live <= bab.CLOSE_COPY_BATCH_SIZE // 4 for live in seen["close grids"])
  assert not seen["coarse grids"]


def test_grid_cells_tile_their_parent():
  """bab_children.grid cuts each of the worst pieces in 2 ** splits cells along its dimensions that
  weigh most: the cells tile the parent (their volumes add up to its own, each lies inside it), the
  parent is recorded per cell, and only the ``count`` worst pieces leave the heap."""
  rng = np.random.default_rng(0)
  heap = []
  for i in range(5):
    lo = rng.uniform(-1, 0, 3).astype(np.float32)
    hi = lo + rng.uniform(0.5, 1, 3).astype(np.float32)
    piece = bab_children.BoundedPiece(float(i), lo, hi, 0, np.zeros(1), np.zeros(1), rng.uniform(size=3), (), 0, 0)
    heapq.heappush(heap, piece.open(i))
  closed = []
  out = bab_children.grid(heap, 2, 2, closed.append)
  assert len(heap) == 3 and not closed and len(out.los) == 8 and len(out.parents) == 8
  assert [p.bound for p in out.parents] == [4.0] * 4 + [3.0] * 4
  for k in (0, 4):
    parent = out.parents[k]
    cells = list(zip(out.los[k:k + 4], out.his[k:k + 4]))
    assert all(np.all(parent.lo <= lo) and np.all(hi <= parent.hi) for lo, hi in cells)
    volume = sum(np.prod(hi.astype(np.float64) - lo) for lo, hi in cells)
    assert volume == pytest.approx(np.prod(parent.hi.astype(np.float64) - parent.lo), rel=1e-6)
    assert all(d == 2 for d in out.depths[k:k + 4])
