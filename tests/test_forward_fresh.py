"""NeuroDiff's intermediate symbolic variables in the forward pass (``forward_diff_bounds(fresh=k)``,
``forward_branch_and_bound(fresh_vars=k)``): sound against float64 sampling at every node, the same
scanned as unrolled, exact on small ReLU nets in branch and bound, bad counts refused."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound import graph as G
from qbound.bounds import forward as F
from qbound.bounds.forward_bab import forward_branch_and_bound

SHAPE = H.SHAPES[1]  # 3 inputs, three hidden layers of 6 (the last two a scanned run), 2 outputs


def _node_values(graph: G.Graph, xs):
  """Every node's value at the points ``xs`` in float64, one flat row per point."""
  return [v.reshape(len(xs), -1) for v in H.node_values64(graph, xs)]


def _check_all_nodes(merged, box, out, n=2000, seed=0):
  """``z``, ``z_q`` and ``d`` of every node lie within the bounds at float64 samples."""
  xs = H.sample_points(box, n, seed=seed)
  zv = _node_values(merged.f_graph, xs)
  qv = _node_values(merged.fq_graph, xs)
  for i in range(len(merged.f_graph.nodes)):
    for name, vals, (lo, hi) in (("z", zv[i], out.z[i]), ("zq", qv[i], out.zq[i]), ("d", zv[i] - qv[i], out.d[i])):
      lo, hi = np.asarray(lo, np.float64).reshape(-1), np.asarray(hi, np.float64).reshape(-1)
      assert np.all(vals >= lo - 1e-9) and np.all(vals <= hi + 1e-9), (name, i, vals.min(0) - lo, hi - vals.max(0))


def _bounds(merged, box, fresh, form, scope):
  out = F.forward_diff_batch(merged.f_graph, merged.fq_graph, box.lower[None], box.upper[None], sound=True,
                             fresh=fresh, fresh_form=form, fresh_scope=scope)
  return jax.tree_util.tree_map(lambda a: a[0], out)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), bits=st.sampled_from([2, 3, 4, 8]), box_seed=st.integers(0, 1000))
def test_bounds_with_fresh_variables_hold_at_samples(seed, bits, box_seed):
  """Sound mode, two variables per layer for each of z, z_q and d (one compiled pass for every
  example): every node's bounds (z, z_q and d) hold at float64 samples."""
  f, fq, _, _ = H.random_pair(seed, SHAPE, bits=bits)
  box = H.random_box(box_seed, SHAPE[0])
  merged = qb.merge(f, fq, box)
  out = _bounds(merged, box, 2, "midline", "all")
  _check_all_nodes(merged, box, out, seed=seed)
  assert out.d_out.L.shape[0] == SHAPE[0] + 3 * 3 * 2  # inputs, then 2 a layer for d, z and z_q


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 1000), bits=st.sampled_from([2, 3, 4, 8]), box_seed=st.integers(0, 1000),
       fresh=st.sampled_from([1, 6]), form=st.sampled_from(F.FRESH_FORMS), scope=st.sampled_from(F.FRESH_SCOPES))
def test_bounds_with_any_count_and_form_hold_at_samples(seed, bits, box_seed, fresh, form, scope):
  """The same for both forms, both scopes and 1 and 6 variables per layer (6: every neuron)."""
  f, fq, _, _ = H.random_pair(seed, SHAPE, bits=bits)
  box = H.random_box(box_seed, SHAPE[0])
  merged = qb.merge(f, fq, box)
  _check_all_nodes(merged, box, _bounds(merged, box, fresh, form, scope), seed=seed)


@pytest.mark.slow  # two passes op by op and a scan compiled: 15-40 s on 2 loaded cores
def test_fresh_variables_scanned_equal_unrolled(monkeypatch):
  """A run of identical blocks scanned (the fresh variables' index carried through the scan) gives
  the unrolled pass's bounds, up to float32 rounding."""
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
    outs.append(F.forward_diff_bounds(merged.f_graph, merged.fq_graph, box, sound=True, fresh=2))
  assert outs[0].d_out.L.shape[0] == 3 + 4 * 2  # the inputs and 2 variables per ReLU layer
  for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # two passes op by op: 10-20 s on 2 loaded cores
def test_fresh_variables_tighten_a_deep_close_pair():
  """Where relaxation gaps add up over layers (a deep, close pair), naming the loosest neurons keeps
  the output bound from growing as fast: tighter than without on this net (checked, not assumed:
  the substitution may lose a neuron's input dependence, so it is not tighter on every net)."""
  model = H.mlp((6, 6, 6, 6), 2)
  params = model.init(jax.random.key(0), jnp.zeros(3))
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, H.uniform_quantize(params, 8))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  widths = {}
  for k in (0, 2):
    out = F.forward_diff_bounds(merged.f_graph, merged.fq_graph, box, sound=True, fresh=k)
    lo, hi = out.d[merged.f_graph.output]
    widths[k] = float(jnp.max(hi - lo))
  values = H.eval64(merged.graph, H.sample_points(box, 2000))
  assert widths[2] < widths[0]
  assert widths[2] >= float(np.max(values.max(0) - values.min(0)))


def test_refuses_a_negative_count():
  f, fq, _, _ = H.random_pair(0, SHAPE, bits=4)
  box = qb.Box(-jnp.ones(SHAPE[0]), jnp.ones(SHAPE[0]))
  merged = qb.merge(f, fq, box)
  with pytest.raises(ValueError, match="fresh"):
    F.forward_diff_bounds(merged.f_graph, merged.fq_graph, box, fresh=-1)
  with pytest.raises(ValueError, match="fresh_form"):
    F.forward_diff_bounds(merged.f_graph, merged.fq_graph, box, fresh=1, fresh_form="box")
  with pytest.raises(ValueError, match="fresh_scope"):
    F.forward_diff_bounds(merged.f_graph, merged.fq_graph, box, fresh=1, fresh_scope="zq")
  with pytest.raises(ValueError, match="fresh_vars"):
    forward_branch_and_bound(merged, box, fresh_vars=-1)


@pytest.mark.slow  # compiles the device loop once more (10-30 s)
@pytest.mark.parametrize("seed, bits, scope", [(0, 3, "d"), (1, 6, "all")])
def test_device_loop_with_fresh_variables_reaches_the_exact_value(seed, bits, scope):
  f, fq, _, _ = H.random_pair(seed, H.SHAPES[2], bits=bits)
  box = qb.Box(-jnp.ones(H.SHAPES[2][0]), jnp.ones(H.SHAPES[2][0]))
  merged = qb.merge(f, fq, box)
  exact = qb.exact.milp(f, fq, box, time_limit=60)
  assert exact.optimal
  res = forward_branch_and_bound(merged, box, time_budget=60, target_gap=0.01, batch_size=8, max_pieces=2048,
                                 fresh_vars=2, fresh_scope=scope)
  tol = exact.tolerance
  assert res.lower <= exact.upper + tol and res.upper >= exact.value - tol
  assert res.stopped in ("gap", "exhausted"), res
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= res.diff_lower - 1e-7) and np.all(values <= res.diff_upper + 1e-7)


def test_certify_uses_the_device_loop_only_when_asked(monkeypatch):
  """``certify.BAB_DEVICE_FRESH_VARS`` (None by default) sends branch and bound to the device loop on
  paired chains with few inputs only."""
  C = importlib.import_module("qbound.certify")  # the module: qbound.certify is the function

  f, fq, _, _ = H.random_pair(0, SHAPE, bits=4)
  box = qb.Box(-jnp.ones(SHAPE[0]), jnp.ones(SHAPE[0]))
  merged = qb.merge(f, fq, box)
  assert not C._device_loop(merged, box)
  monkeypatch.setattr(C, "BAB_DEVICE_FRESH_VARS", 2)
  assert C._device_loop(merged, box)
  wide = qb.Box(-jnp.ones(C.LOW_DIMENSIONAL_INPUTS + 1), jnp.ones(C.LOW_DIMENSIONAL_INPUTS + 1))
  g, gq, _, _ = H.random_pair(0, (C.LOW_DIMENSIONAL_INPUTS + 1, (4,), 1), bits=4)
  assert not C._device_loop(qb.merge(g, gq, wide), wide)


@pytest.mark.slow  # compiles the device loop for this net (10-60 s)
def test_certify_with_the_device_loop_is_sound(monkeypatch):
  C = importlib.import_module("qbound.certify")  # the module: qbound.certify is the function

  monkeypatch.setattr(C, "BAB_DEVICE_FRESH_VARS", 2)
  f, fq, _, _ = H.random_pair(5, H.SHAPES[2], bits=4)
  box = qb.Box(-jnp.ones(H.SHAPES[2][0]), jnp.ones(H.SHAPES[2][0]))
  cert = qb.certify(f, fq, box, method="bab", time_budget=120, target_gap=0.05)
  values = H.eval64(qb.merge(f, fq, box), H.sample_points(box, 2000))
  assert np.abs(values).max() <= cert.upper + 1e-7
  assert cert.upper <= 1.05 * cert.lower + 1e-6 or cert.seconds >= 100
