"""ReLU splitting in branch and bound (qbound.bounds.relusplit): each sub-problem's bounds hold on
its part of the piece (sampling restricted to it), empty sub-problems are recognised, and branch
and bound with ReLU splits stays sound and reaches the exact maximal error (MILP) on small nets."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.bounds import bab, bab_batch, relusplit


def test_candidates_are_the_unstable_neurons_with_the_largest_gap():
  kept = ((np.array([-1.0, -4.0, 0.5]), np.array([1.0, 4.0, 2.0])),
          (np.array([-3.0, -1.0]), np.array([3.0, -0.5])),
          (np.array([-9.0]), np.array([9.0])))  # a difference: never split
  assert relusplit.neuron_candidates(kept, 2, 5) == [(0, 1), (1, 0), (0, 0)]
  assert relusplit.neuron_candidates(kept, 2, 1) == [(0, 1)]
  assert relusplit.neuron_candidates(kept[1:2], 1, 3) == [(0, 0)]
  np.testing.assert_allclose(relusplit.relaxation_gap(np.array([-1.0, 1.0]), np.array([3.0, 2.0])), [0.75, 0.0])


def test_split_clamps_one_neuron_and_copies():
  kept = ((np.array([[-1.0, -2.0]]), np.array([[1.0, 3.0]])),)
  active, inactive = relusplit.split(kept, 0, 1)
  np.testing.assert_array_equal(active[0][0], [[-1.0, 0.0]])
  np.testing.assert_array_equal(active[0][1], [[1.0, 3.0]])
  np.testing.assert_array_equal(inactive[0][1], [[1.0, 0.0]])
  np.testing.assert_array_equal(kept[0][0], [[-1.0, -2.0]])  # unchanged


def test_infeasible_reads_empty_intervals_anywhere():
  ok = ((np.array([0.0]), np.array([1.0])),)
  assert not relusplit.infeasible(ok, (np.array([2.0]), np.array([2.0])))
  assert relusplit.infeasible(ok, (np.array([2.0]), np.array([1.5])))
  assert relusplit.infeasible(((np.array([0.1, 0.0]), np.array([0.0, 1.0])),))


def root_keep(merged, box, sound):
  fg, qg, mg = merged.f_graph, merged.fq_graph, merged.graph
  lo, hi = box.lower[None], box.upper[None]
  outputs = np.arange(fg.nodes[fg.output].size)
  _, _, keep = bab_batch.batch_bounds(fg, qg, mg, lo, hi, True, sound, outputs)
  return tuple((np.asarray(a)[0], np.asarray(b)[0]) for a, b in keep)


@pytest.mark.parametrize("sound", [True, False], ids=["sound", "unsound"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sub_problem_bounds_hold_on_their_part_of_the_piece(seed, sound):
  """Each sub-problem's bounds (every kept node's z, z_q and d, and the output's d) hold at every
  sampled input of its part of the box (float64 values), for f's and f_q's neurons alike."""
  shape = H.SHAPES[1]
  f, fq, _, _ = H.random_pair(seed, shape, bits=3, init_scale=2.0)
  box = H.random_box(seed, shape[0], radius=(0.3, 1.0))
  merged = qb.merge(f, fq, box)
  fg, qg, mg = merged.f_graph, merged.fq_graph, merged.graph
  nodes = bab_batch.kept_nodes(fg, True)
  kept = root_keep(merged, box, sound)
  xs = H.sample_points(box, 4000, seed)
  zf, zq = H.node_values64(fg, xs), H.node_values64(qg, xs)
  values = [zf[i] for i in nodes] + [zq[i] for i in nodes] + [zf[i] - zq[i] for i in nodes]
  out = fg.output
  outputs = np.arange(fg.nodes[out].size)
  candidates = relusplit.neuron_candidates(kept, 2 * len(nodes), 4)
  assert candidates, "the case should have unstable neurons"
  tol = 1e-9 if sound else 1e-4
  for entry, neuron in candidates:
    neuron_values = values[entry].reshape(len(xs), -1)[:, neuron]
    for active, part in zip((True, False), relusplit.split(kept, entry, neuron)):
      prior = tuple((jnp.asarray(a)[None], jnp.asarray(b)[None]) for a, b in part)
      (dlo, dhi), _, keep = bab_batch.batch_bounds(fg, qg, mg, box.lower[None], box.upper[None], True, sound, outputs,
                                              prior=prior, check=False)
      inside = neuron_values >= 0 if active else neuron_values <= 0
      if sound and relusplit.infeasible([(np.asarray(a)[0], np.asarray(b)[0]) for a, b in keep]):
        assert not inside.any(), "a sub-problem called empty holds a sampled input"
        continue
      for (a, b), v in zip(keep, values):
        lo_, hi_ = np.asarray(a, np.float64)[0], np.asarray(b, np.float64)[0]
        scale = tol * (1 + np.abs(v[inside]))
        assert np.all(v[inside] >= lo_ - scale) and np.all(v[inside] <= hi_ + scale)
      d_out = (zf[out] - zq[out]).reshape(len(xs), -1)[inside]
      lo_, hi_ = np.asarray(dlo, np.float64).reshape(-1), np.asarray(dhi, np.float64).reshape(-1)
      assert np.all(d_out >= lo_ - tol * (1 + np.abs(d_out))) and np.all(d_out <= hi_ + tol * (1 + np.abs(d_out)))


def test_a_split_on_a_stable_side_is_found_empty():
  """Clamping a neuron whose bounds are ``[l, u]`` with ``u < 0`` to ``z >= 0`` leaves no input:
  the sub-problem's bounds say so (an empty interval)."""
  f, fq, _, _ = H.random_pair(0, H.SHAPES[1], bits=4)
  box = H.random_box(0, H.SHAPES[1][0], radius=(0.05, 0.1))
  merged = qb.merge(f, fq, box)
  kept = root_keep(merged, box, True)
  lower, upper = kept[0]
  negative = np.flatnonzero(np.asarray(upper).reshape(-1) < 0)
  assert negative.size
  part = relusplit.clamp(kept, 0, int(negative[0]), True)
  prior = tuple((jnp.asarray(a)[None], jnp.asarray(b)[None]) for a, b in part)
  fg = merged.f_graph
  _, _, keep = bab_batch.batch_bounds(fg, merged.fq_graph, merged.graph, box.lower[None], box.upper[None], True, True,
                                 np.arange(fg.nodes[fg.output].size), prior=prior, check=False)
  assert relusplit.infeasible([(np.asarray(a)[0], np.asarray(b)[0]) for a, b in keep])


@pytest.fixture
def split_early(monkeypatch):
  """ReLU splits on every piece from the root on, counted."""
  monkeypatch.setattr(bab, "RELU_SPLIT_DEPTH", 0)
  calls = []
  original = relusplit.split
  monkeypatch.setattr(relusplit, "split", lambda *a: calls.append(a[1:]) or original(*a))
  return calls


@pytest.mark.slow  # 9-40 s on loaded cores; ReLU splitting is off by default
def test_converges_to_the_exact_value_with_relu_splits(split_early):
  """ReLU splits from the root on (next to input splits): every stop sound, the gap closes."""
  shape = H.SHAPES[0]
  f, fq, _, _ = H.random_pair(0, shape, bits=3)
  box = qb.Box(-jnp.ones(shape[0]), jnp.ones(shape[0]))
  merged = qb.merge(f, fq, box)
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert exact.optimal
  res = bab.branch_and_bound(merged, box, time_budget=60, target_gap=0.01, relu_split=True)
  tol = exact.tolerance
  assert split_early, "no ReLU split was tried"
  assert res.lower <= exact.upper + tol and res.upper >= exact.value - tol
  assert res.stopped in ("gap", "exhausted"), res
  assert res.upper <= 1.01 * exact.upper + tol


@pytest.mark.slow  # ~12 s; ReLU splitting is off by default, and the sub-problem tests cover its bounds
@settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(seed=st.integers(0, 10_000), sound=st.booleans(), scale=st.sampled_from([1.0, 2.5]))
def test_stopped_early_with_relu_splits_the_bounds_hold_the_sampled_errors(seed, sound, scale):
  """Sound and unsound mode, stopped after a few batches: every sampled ``f - f_q`` within the
  per-output bounds and every sampled error at most ``upper``."""
  shape = H.SHAPES[1]
  f, fq, _, _ = H.random_pair(seed % 7, shape, bits=3, init_scale=scale)
  box = H.random_box(seed, shape[0], radius=(0.2, 1.0))
  merged = qb.merge(f, fq, box)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(bab, "RELU_SPLIT_DEPTH", 0)
    res = bab.branch_and_bound(merged, box, time_budget=0.4, target_gap=0.0, sound=sound, relu_split=True,
                               batch_size=32)
  values = H.eval64(merged, H.sample_points(box, 2000, seed)).reshape(-1, res.diff_lower.size)
  tol = 1e-9 if sound else 1e-4
  assert np.all(values >= res.diff_lower - tol * (1 + np.abs(values)))
  assert np.all(values <= res.diff_upper + tol * (1 + np.abs(values)))
  assert np.abs(values).max() <= res.upper * (1 + tol) + tol
