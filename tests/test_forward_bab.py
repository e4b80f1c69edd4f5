"""Branch and bound on the device with forward symbolic bounds (qbound.bounds.forward_bab), and the
scanned forward pass (qbound.bounds.forward): sound at every stop, exact on small ReLU nets.

Every test here uses one net structure, one batch size and one buffer size, so the device loop
compiles once for the file (it is one large program: 10-30 s to compile on 2 shared cores); the
tests that run it to convergence (against the exact MILP value, close and far pairs, epsilon) are
marked slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.bounds import forward as F
from qbound.bounds.forward_bab import forward_branch_and_bound

SHAPE = H.SHAPES[2]  # 5 inputs, two hidden layers of 8, 3 outputs
KW = dict(batch_size=8, max_pieces=2048)


def case(seed, bits=4, noise=None, box_seed=None):
  f, fq, _, _ = H.random_pair(seed, SHAPE, bits=None if noise else bits, noise=noise)
  box = (qb.Box(-jnp.ones(SHAPE[0]), jnp.ones(SHAPE[0])) if box_seed is None
         else H.random_box(box_seed, SHAPE[0]))
  return f, fq, box, qb.merge(f, fq, box)


def check_sound(merged, box, res):
  """The result's per-output bounds hold at float64 samples, and its upper bound above them all."""
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= res.diff_lower - 1e-7) and np.all(values <= res.diff_upper + 1e-7)
  assert np.abs(values).max() <= res.upper + 1e-7
  # ``lower`` is the float32 evaluation (as branch_and_bound's): on a close pair it can exceed the
  # float64 error, and so a proven upper bound, by float32 rounding of f - f_q (seen: 4e-6 relative).
  assert res.lower <= res.upper * (1 + 1e-5) + 1e-7
  # The reached error is reached at the witness (float32 evaluation against float64).
  assert np.abs(H.eval64(merged, res.witness[None])).max() == pytest.approx(res.lower, rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("seed, bits", [(0, 3), (1, 6)])
def test_converges_to_the_exact_value(seed, bits):
  f, fq, box, merged = case(seed, bits)
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert exact.optimal
  res = forward_branch_and_bound(merged, box, time_budget=60, target_gap=0.01, **KW)
  tol = exact.tolerance
  assert res.lower <= exact.upper + tol and res.upper >= exact.value - tol
  assert res.stopped in ("gap", "exhausted"), res
  assert res.upper <= 1.01 * exact.upper + tol
  check_sound(merged, box, res)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), bits=st.sampled_from([2, 3, 4, 8]), box_seed=st.integers(0, 1000),
       budget=st.sampled_from([0.0, 0.2]))
def test_sound_on_random_nets_and_boxes(seed, bits, box_seed, budget):
  """Stopped early or not, the bounds hold against float64 sampling."""
  _, _, box, merged = case(seed, bits, box_seed=box_seed)
  res = forward_branch_and_bound(merged, box, time_budget=budget, target_gap=0.0, **KW)
  check_sound(merged, box, res)


@pytest.mark.slow
@pytest.mark.parametrize("noise", [1e-4, 0.5])
def test_close_copy_and_far_perturbed_pair(noise):
  _, _, box, merged = case(2, noise=noise)
  res = forward_branch_and_bound(merged, box, time_budget=5, target_gap=0.05, **KW)
  check_sound(merged, box, res)
  assert res.stopped in ("gap", "exhausted", "time", "max_pieces")


@pytest.mark.slow
def test_epsilon_proved_and_refuted():
  _, _, box, merged = case(3, bits=4)
  reference = forward_branch_and_bound(merged, box, time_budget=10, target_gap=0.01, **KW)
  proved = forward_branch_and_bound(merged, box, epsilon=2 * reference.upper, time_budget=10, **KW)
  assert proved.stopped == "proved" and proved.upper <= 2 * reference.upper
  refuted = forward_branch_and_bound(merged, box, epsilon=0.5 * reference.lower, time_budget=10, **KW)
  assert refuted.stopped == "refuted" and refuted.lower > 0.5 * reference.lower
  check_sound(merged, box, proved)


@pytest.mark.slow  # opt-in method: its default tests keep soundness, scanning and refusals
def test_selected_outputs_and_root_bounds():
  _, _, box, merged = case(4, bits=4)
  res = forward_branch_and_bound(merged, box, outputs=[1], time_budget=0.0, target_gap=0.0, batch_size=8,
                                 max_pieces=2048)
  values = H.eval64(merged, H.sample_points(box, 1000))
  assert np.abs(values[:, 1]).max() <= res.upper + 1e-7
  assert np.all(values >= res.root_lower - 1e-7) and np.all(values <= res.root_upper + 1e-7)


def test_refuses_unpaired_networks():
  f, _, _, _ = H.random_pair(4, H.SHAPES[0], bits=8)
  g, _, _, _ = H.random_pair(4, (2, (8, 6), 2), bits=8)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, g, box)
  assert not merged.paired
  with pytest.raises(ValueError, match="paired"):
    forward_branch_and_bound(merged, box)


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_scanned_forward_pass_equals_the_unrolled_one(monkeypatch):
  """Identical blocks run as one lax.scan: the same values as unrolled, up to float32 rounding (the
  scanned body is compiled, the unrolled pass here runs op by op; each carries its own margins)."""
  model = H.mlp((6, 6, 6, 6), 2)
  params = model.init(jax.random.key(0), jnp.zeros(3))
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, H.uniform_quantize(params, 4))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert F.repeated_run(merged.f_graph, merged.fq_graph) is not None
  outs = []
  for scan in (True, False):
    monkeypatch.setattr(F, "SCAN_REPEATED", scan)
    outs.append(F.forward_diff_bounds(merged.f_graph, merged.fq_graph, box, sound=True))
  for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sound_with_scanned_blocks_and_priors():
  """A net whose hidden layers are scanned (lax.scan) with the parents' bounds as priors."""
  model = H.mlp((6, 6, 6, 6), 2)
  params = model.init(jax.random.key(1), jnp.zeros(3))
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, H.uniform_quantize(params, 3))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  res = forward_branch_and_bound(merged, box, time_budget=60, target_gap=0.05, batch_size=8, max_pieces=2048)
  assert res.pieces_bounded > 8
  check_sound(merged, box, res)
