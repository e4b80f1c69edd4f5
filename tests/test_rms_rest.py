"""qbound.bounds.rms_rest: the saturations of qwix's ``rms,c`` quantization bounded on the network.

What is checked: the three bounds per entry (the others' norm from below, the saturation errors at
the top and bottom from above) hold at sampled inputs of random and dominated boxes, in float64 and
in both float modes; the node's error split with them (:func:`qbound.rms_rounding.parts`) holds for
the library's own float32 quantization; branch and bound's sparse passes with them are sound against
sampling and never looser than without them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qbound as qb
import helpers as H
from qbound import dynamic_rounding as DR
from qbound import rms_rounding
from qbound.bounds import rms_rest
from qbound.bounds.crown import backward_lower, crown_bounds
from qbound.bounds.sparse import diff_bounds_sparse

WIDTH = 16


def _rms_mlp(c, seed=11, relu=True):
  """A 3-16-2 ReLU net and its copy with qwix's rms,c on the 16 hidden entries, written out as qwix
  computes it in float32 (``qwix/_src/core/qarray.py``); ``relu=False``: no ReLU (entries of both
  signs, so the bottom clip too)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  w1, b1 = jax.random.normal(keys[0], (3, WIDTH)), 0.3 * jax.random.normal(keys[1], (WIDTH,))
  w2 = jax.random.normal(keys[2], (WIDTH, 2)) / 4

  def hidden(x):
    return jax.nn.relu(x @ w1 + b1) if relu else x @ w1 + b1

  def quantize(h):
    s = jnp.sqrt(jnp.mean(jnp.square(h))) * jnp.float32(c) / jnp.float32(127.5)
    s = jnp.where(s < 1e-19, jnp.ones_like(s), s)
    return jnp.clip(jnp.round(h / s), -128, 127) * s

  def f(x):
    return hidden(x) @ w2

  def fq(x):
    h = hidden(x)
    s = jnp.sqrt(jnp.mean(jnp.square(h))) * c / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return (jnp.round(h / s).astype(jnp.int8).astype(jnp.float32) @ w2) * s

  return f, fq, hidden, quantize, (np.asarray(w1, np.float64), np.asarray(b1, np.float64))


def _boxes(rng, n):
  """Random sub-boxes of [-1, 1]^3, of radius 0.01 to 0.5."""
  center = rng.uniform(-0.8, 0.8, size=(n, 3))
  radius = rng.choice([0.01, 0.05, 0.2, 0.5], size=(n, 1))
  return (center - radius).astype(np.float32), (center + radius).astype(np.float32)


def _samples(rng, lo, hi, count):
  xs = lo[:, None] + rng.uniform(size=(lo.shape[0], count, lo.shape[1])) * (hi - lo)[:, None]
  corners = np.where(rng.uniform(size=(lo.shape[0], 16, lo.shape[1])) < 0.5, lo[:, None], hi[:, None])
  return np.concatenate([xs, corners], axis=1).astype(np.float32)


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1.5, 2.0, 3.0]), st.booleans(), st.booleans())
def test_joint_bounds_hold_at_sampled_inputs(seed, c, sound, relu):
  """rest <= the others' norm, top and bottom >= the saturation errors' expressions (float64), and the
  node's error split with them holds for the library's float32 quantization, saturation count too."""
  rng = np.random.default_rng(seed)
  f, fq, hidden, quantize, (w1, b1) = _rms_mlp(c, relu=relu)
  lo, hi = _boxes(rng, 6)
  g = qb.trace(fq, jnp.zeros(3))
  (idx,) = [i for i, n in enumerate(g.nodes) if rms_rest.applies(n)]
  box = qb.Box(jnp.asarray(lo), jnp.asarray(hi))
  bounds = crown_bounds(g, box, sound=sound, batched=True)
  joint = rms_rest.joint_bounds(g, idx, bounds, box, backward_lower, sound=sound, batched=True)
  rest, top, bottom = (np.asarray(a, np.float64) for a in joint)
  spec = g.nodes[idx].attrs[1]
  d, rel = float(spec.divisor), rms_rounding.slack(WIDTH)
  xs = _samples(rng, lo, hi, 300)
  y = xs.astype(np.float64) @ w1 + b1  # (boxes, samples, 16), real arithmetic
  y = np.maximum(y, 0) if relu else y
  if not relu:
    assert np.all(np.isfinite(bottom))  # rows for the bottom clip too
  m = np.linalg.norm(y, axis=-1, keepdims=True)
  others = np.sqrt(np.maximum(m * m - y * y, 0))
  tol = 1e-6 * (1 + m)
  assert np.all(rest[:, None] <= others + tol)
  assert np.all(y - 127 / d * (1 - rel) * m <= top[:, None] + tol)
  assert np.all(-y - 128 / d * (1 - rel) * m <= bottom[:, None] + tol)
  # The error split with the joint bounds, for the library's own float32 quantization.
  y_lo, y_hi = bounds[g.nodes[idx].inputs[0]]
  p = DR.saturation_parts(spec, y_lo, y_hi, 1, joint)
  base, over_top, over_bottom = (np.asarray(a, np.float64)[:, None] for a in (p.base, p.over_top, p.over_bottom))
  h32 = np.asarray(jax.vmap(jax.vmap(hidden))(jnp.asarray(xs)))
  e = np.asarray(jax.vmap(jax.vmap(quantize))(jnp.asarray(h32)), np.float64) - h32
  assert np.all(e >= -(base + over_top) * (1 + 1e-6)) and np.all(e <= (base + over_bottom) * (1 + 1e-6))
  joint_count = DR.joint_saturation(spec, (WIDTH,))
  if joint_count is not None:
    past = np.abs(e) > base * (1 + 1e-6)
    assert np.all(past.sum(axis=-1) <= joint_count[0])


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_joint_bounds_see_that_no_entry_dominates():
  """On a box where every hidden entry stays positive and none dominates, the others' norm is far
  from 0 and no entry can saturate, which the entries' intervals alone do not show."""
  f, fq, hidden, quantize, (w1, b1) = _rms_mlp(3.0)
  g = qb.trace(fq, jnp.zeros(3))
  (idx,) = [i for i, n in enumerate(g.nodes) if rms_rest.applies(n)]
  box = qb.Box(jnp.array([0.2, -0.4, 0.1]), jnp.array([0.4, -0.2, 0.3]))
  bounds = crown_bounds(g, box)
  joint = rms_rest.joint_bounds(g, idx, bounds, box, backward_lower)
  y = np.maximum(H.sample_points(box, 500) @ w1 + b1, 0)
  others = np.sqrt(np.maximum(np.sum(y * y, -1, keepdims=True) - y * y, 0))
  assert np.all(np.asarray(joint.rest) <= others.min(0) + 1e-6)
  assert np.all(np.asarray(joint.rest) >= 0.5 * others.min(0))  # close to the true minimum
  y_lo, y_hi = bounds[g.nodes[idx].inputs[0]]
  spec = g.nodes[idx].attrs[1]
  alone, joint_parts = DR.saturation_parts(spec, y_lo, y_hi, 1), DR.saturation_parts(spec, y_lo, y_hi, 1, joint)
  assert float(jnp.max(joint_parts.over_top)) <= float(jnp.max(alone.over_top))
  assert float(jnp.sum(joint_parts.over_top)) < float(jnp.sum(alone.over_top)) or float(jnp.sum(alone.over_top)) == 0


def _pieces(rng, n):
  lo, hi = _boxes(rng, n)
  return qb.Box(jnp.asarray(lo), jnp.asarray(hi))


@pytest.mark.parametrize("sound", [True, False])
def test_sparse_bounds_with_joint_saturation_are_sound_and_tighter(sound):
  """Branch and bound's passes (qbound.bounds.sparse) on pieces of the box: sound against float32 and
  float64 sampling, never looser than with the entries' intervals alone, tighter on some pieces."""
  f, fq, *_ = _rms_mlp(3.0)
  rng = np.random.default_rng(0)
  pieces = _pieces(rng, 16)
  merged = qb.merge(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
  widths = {}
  try:
    for on in (True, False):
      rms_rest.ENABLED = on
      out = diff_bounds_sparse(merged.f_graph, merged.fq_graph, pieces, sound=sound)
      lo, hi = (np.asarray(a, np.float64) for a in out.d[merged.f_graph.output])
      widths[on] = np.maximum(-lo, hi).max(axis=1)
      if on:
        xs = _samples(rng, np.asarray(pieces.lower), np.asarray(pieces.upper), 400)
        err32 = np.asarray(jax.vmap(jax.vmap(f))(jnp.asarray(xs)) - jax.vmap(jax.vmap(fq))(jnp.asarray(xs)), np.float64)
        err64 = H.eval64(merged, xs.reshape(-1, 3).astype(np.float64)).reshape(err32.shape)
        for e in (err32, err64):
          rounding = 1e-5 * np.abs(e).max() if e is err32 else 0.0
          assert np.all(lo[:, None] - rounding <= e) and np.all(e <= hi[:, None] + rounding)
  finally:
    rms_rest.ENABLED = True
  assert np.all(widths[True] <= widths[False] * (1 + 1e-5)), (widths[True], widths[False])
  assert np.any(widths[True] < 0.9 * widths[False])


def _deep_rms_mlp(c=3.0, seed=11):
  """3-16-16-2 ReLU net and its copy with qwix's rms,c on the first hidden layer's outputs."""
  k = jax.random.split(jax.random.key(seed), 5)
  w1, b1 = jax.random.normal(k[0], (3, WIDTH)), 0.3 * jax.random.normal(k[1], (WIDTH,))
  w2, b2 = jax.random.normal(k[2], (WIDTH, WIDTH)) / 4, 0.3 * jax.random.normal(k[3], (WIDTH,))
  w3 = jax.random.normal(k[4], (WIDTH, 2)) / 4

  def f(x):
    return jax.nn.relu(jax.nn.relu(x @ w1 + b1) @ w2 + b2) @ w3

  def fq(x):
    h = jax.nn.relu(x @ w1 + b1)
    s = jnp.sqrt(jnp.mean(jnp.square(h))) * c / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return jax.nn.relu((jnp.round(h / s).astype(jnp.int8).astype(jnp.float32) @ w2) * s + b2) @ w3

  return f, fq


@pytest.mark.slow  # (12-13 s: a consistency check of the batch shape, not a bound's soundness)
def test_widening_measured_at_the_batch_shape_is_the_same(monkeypatch):
  """bab_batch.WIDENING_AT_BATCH_SHAPE: the widening measured again on every neuron, on the root box
  repeated over the batch, equals the one measured on a batch of one (it only reuses programs)."""
  from qbound.bounds import bab_batch, sparse
  f, fq = _deep_rms_mlp()
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  pieces = _pieces(np.random.default_rng(1), 4)
  lo = jnp.concatenate([box.lower[None], pieces.lower])
  hi = jnp.concatenate([box.upper[None], pieces.upper])
  calls = []
  full = sparse.diff_bounds_sparse

  def counted(*args, **kwargs):
    calls.append(kwargs.get("every_neuron", False))
    return full(*args, **kwargs)

  monkeypatch.setattr(bab_batch, "diff_bounds_sparse", counted)
  spreads = {}
  for on in (True, False):
    monkeypatch.setattr(bab_batch, "WIDENING_AT_BATCH_SHAPE", on)
    _, spreads[on] = bab_batch.batch_bounds(merged.f_graph, merged.fq_graph, merged.graph, lo, hi, True, True,
                                            jnp.arange(2), True, True)
  assert calls.count(True) == 2  # measured again, both ways
  np.testing.assert_allclose(spreads[True], spreads[False], rtol=1e-6)


def _saturating_bab(box, sound, batches, seed=0):
  """bab.SATURATING_CANDIDATES on the deep rms,3 net over ``box``: the candidate counts strong
  branching used, and whether the bound holds against float32 and float64 sampling."""
  from qbound.bounds import bab, bab_children, splitting

  f, fq = _deep_rms_mlp()
  merged = qb.merge(f, fq, box)
  assert bab._saturating(merged)
  counts = []
  original = splitting.candidate_axes

  def recorded(width, coefficients, count):
    counts.append(count)
    return original(width, coefficients, count)

  bab_children.candidate_axes = recorded
  try:
    # A fixed number of batches whatever the time (a first call compiles for seconds).
    res = bab.branch_and_bound(merged, box, time_budget=float("inf"), target_gap=0.0, batch_size=16, sound=sound,
                               search=False, stop=lambda: len(counts) >= batches)
  finally:
    bab_children.candidate_axes = original
  rng = np.random.default_rng(seed)
  xs = _samples(rng, np.asarray(box.lower)[None], np.asarray(box.upper)[None], 2000)[0]
  err32 = np.abs(np.asarray(jax.vmap(f)(jnp.asarray(xs)) - jax.vmap(fq)(jnp.asarray(xs)), np.float64)).max()
  err64 = np.abs(H.eval64(merged, xs.astype(np.float64))).max()
  assert max(err64, res.lower) <= res.upper
  assert err32 <= res.upper * (1 + 1e-5) + 1e-6
  return counts


@pytest.mark.slow  # ~10 s: the split rule's choice; the joint bounds' soundness is checked above
def test_branch_and_bound_on_saturating_nets_splits_one_dimension():
  """Once the open pieces fill the batch, a net whose f_q may saturate under rms,c is branched on one
  dimension per piece (bab.SATURATING_CANDIDATES), and its bound holds against sampling."""
  from qbound.bounds import bab

  counts = _saturating_bab(qb.Box(-jnp.ones(3), jnp.ones(3)), True, 12)
  assert counts[0] > 1 and min(counts) == bab.SATURATING_CANDIDATES  # (more while few pieces are open)


@pytest.mark.slow  # ~10 s an example at load 10, mostly compiling
@settings(max_examples=4, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.05, 0.3, 1.0]), st.booleans())
def test_branch_and_bound_on_saturating_nets_is_sound(seed, radius, sound):
  """The same on random and dominated boxes (a small radius: one entry dominates the norm), in both
  float modes."""
  rng = np.random.default_rng(seed)
  center = rng.uniform(-1 + radius, 1 - radius, size=3).astype(np.float32)
  _saturating_bab(qb.Box(jnp.asarray(center - radius), jnp.asarray(center + radius)), sound, 30, seed)


def test_nets_without_saturating_rms_keep_strong_branching():
  """Absmax scales never saturate, and rms,c whose entries cannot reach the clip (c > sqrt(n) 127.5 / 126.5):
  both keep STRONG_BRANCHING_CANDIDATES."""
  from qbound.bounds import bab

  k = jax.random.split(jax.random.key(3), 2)
  w1, w2 = jax.random.normal(k[0], (3, WIDTH)), jax.random.normal(k[1], (WIDTH, 2)) / 4

  def quantized(c, norm):
    def fq(x):
      h = jax.nn.relu(x @ w1)
      m = jnp.sqrt(jnp.mean(jnp.square(h))) * c if norm == "rms" else jnp.max(jnp.abs(h))
      s = jnp.where(m / 127.5 < 1e-19, 1.0, m / 127.5)
      return (jnp.round(h / s).astype(jnp.int8).astype(jnp.float32) @ w2) * s
    return fq

  f = lambda x: jax.nn.relu(x @ w1) @ w2  # noqa: E731
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  assert bab._saturating(qb.merge(f, quantized(3.0, "rms"), box))
  assert not bab._saturating(qb.merge(f, quantized(5.0, "rms"), box))  # sqrt(16) 127.5 / 5 < 126.5: no clip
  assert not bab._saturating(qb.merge(f, quantized(1.0, "absmax"), box))


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_branch_and_bound_upper_never_rises_between_batches(monkeypatch):
  """bab.WITHIN_PARENT: a child's bounds are met with its parent's, so the largest open bound never
  rises from one batch to the next (a child's own passes may bound it more loosely than its parent,
  as on the rms,3 MLPs, where the upper rose by 7% between batches without it)."""
  from qbound.bounds import bab

  f, fq = _deep_rms_mlp()
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  monkeypatch.setattr(bab, "REPORT_EVERY", 0.0)
  uppers = []
  res = bab.branch_and_bound(merged, box, time_budget=float("inf"), target_gap=0.0, batch_size=16, search=False,
                             report=lambda rl, ru, upper, lower, x: uppers.append(upper),
                             stop=lambda: len(uppers) >= 12)
  assert len(uppers) >= 12
  assert all(b <= a for a, b in zip(uppers, uppers[1:])), uppers
  assert res.upper <= uppers[-1]
