"""The NumPy branch and bound (qbound.bounds.host_bab) on nets that normalise their input first, as
ACAS Xu's ``.nnet`` files (clip, shift, divide): the box's image is bounded, the witnesses map back
into the box, and the bounds hold at sampled points and meet the exact MILP's value."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.bounds import host_bab
from test_host_bab import pair


def _normalised(seed, shape, bits, op="div"):
  """``pair``'s MLPs behind one input normalisation ``clip(x, c_lo, c_hi)``, ``- mean``, ``/ r``
  (or ``* r``), with scales of both signs and a clip that cuts into the box."""
  f, fq = pair(seed, shape, bits)
  rng = np.random.default_rng(seed + 1)
  n = shape[0]
  c_lo, c_hi = (-0.8 * np.ones(n)).astype(np.float32), rng.uniform(0.3, 2.0, n).astype(np.float32)
  mean = rng.normal(size=n).astype(np.float32)
  r = (rng.uniform(0.5, 3.0, n) * rng.choice([-1.0, 1.0], n)).astype(np.float32)

  def norm(g, x):
    x = jnp.clip(x, c_lo, c_hi) - mean
    return g(x / r if op == "div" else x * r)

  return functools.partial(norm, f), functools.partial(norm, fq)


def test_the_normalisation_is_the_chains_prefix():
  f, fq = _normalised(0, H.SHAPES[0], 3)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  assert [step[0] for step in chain.prefix] == ["clip", "shift", "div"]
  xs = H.sample_points(box, 200)
  np.testing.assert_allclose(host_bab.evaluate(chain, xs), H.eval64(merged.graph, xs), rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match="prefix"):
    host_bab.bound_pieces(chain, np.zeros((1, 2)), np.ones((1, 2)))
  # Different normalisations in f and f_q: not a shared prefix, so not a chain.
  g, _ = _normalised(0, H.SHAPES[0], 3)
  _, gq = _normalised(1, H.SHAPES[0], 3)
  assert host_bab.chain_of(qb.merge(g, gq, box)) is None


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(H.SHAPES[:3]), bits=st.sampled_from([2, 3, 6]),
       op=st.sampled_from(["div", "mul"]), width=st.floats(0.05, 1.0))
def test_bounds_hold_at_sampled_points(seed, shape, bits, op, width):
  """The box's image holds every point's image, and a short search's bounds hold at sampled points
  of the box; its witness lies in the box and reaches its lower bound."""
  f, fq = _normalised(seed, shape, bits, op)
  box = H.random_box(seed, shape[0], radius=(0.05, 1.5 * width))
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  assert chain is not None and chain.prefix
  xs = H.sample_points(box, 2000, seed)
  xs[:2] = np.asarray(box.lower), np.asarray(box.upper)
  lo, hi = host_bab.map_box(chain, np.asarray(box.lower, np.float64)[None], np.asarray(box.upper, np.float64)[None])
  ys = np.asarray(xs, np.float64)
  for step in chain.prefix:  # the images, step by step in float64
    ys = np.clip(ys, step[1], step[2]) if step[0] == "clip" else (
        ys + step[1] if step[0] == "shift" else ys / step[1] if step[0] == "div" else ys * step[1])
  assert np.all(ys >= lo) and np.all(ys <= hi)
  res = host_bab.host_branch_and_bound(merged, box, time_budget=0.3, target_gap=0.0)
  values = H.eval64(merged.graph, xs)
  assert np.all(values >= res.diff_lower - 1e-12) and np.all(values <= res.diff_upper + 1e-12)
  assert np.abs(values).max() <= res.upper + 1e-12
  assert np.all(res.witness >= np.asarray(box.lower)) and np.all(res.witness <= np.asarray(box.upper))
  assert np.abs(H.eval64(merged.graph, res.witness[None])).max() == pytest.approx(res.lower, rel=1e-9, abs=1e-15)


def test_converges_to_the_exact_value():
  f, fq = _normalised(2, H.SHAPES[0], 3)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  exact = qb.exact.milp(f, fq, box, time_limit=5)
  res = host_bab.host_branch_and_bound(qb.merge(f, fq, box), box, time_budget=30, target_gap=0.01)
  tol = exact.tolerance
  assert res.stopped == "gap" and res.upper <= 1.01 * res.lower
  assert res.lower <= exact.upper + tol and exact.value - tol <= res.upper


def test_certify_auto_uses_it():
  f, fq = _normalised(3, H.SHAPES[0], 3)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  cert = qb.certify(f, fq, box, method="auto", time_budget=20, target_gap=0.01)
  assert "host-bab" in cert.bounds and cert.upper <= 1.01 * cert.lower + 1e-12
  values = H.eval64(qb.merge(f, fq, box).graph, H.sample_points(box, 2000))
  assert np.abs(values).max() <= cert.upper


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(H.SHAPES[:3]), kind=st.sampled_from(["3", "noise 1.0"]),
       variant=st.sampled_from([("HIDDEN_BACKWARD", False), ("BACKWARD_ROWS", "all")]))
def test_backward_row_variants_are_sound(seed, shape, kind, variant):
  """``host_bounds.HIDDEN_BACKWARD = False`` (the backward pass for the outputs only) and
  ``BACKWARD_ROWS = "all"`` (rows on z_q and z too): the bounds hold at sampled points, for a close
  copy and for weights that differ by as much as themselves."""
  from qbound.bounds import host_bounds

  bits, noise = (None, float(kind.split()[1])) if kind.startswith("noise") else (int(kind), None)
  f, fq = pair(seed, shape, bits, noise)
  box = H.random_box(seed, shape[0])
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  lo, hi = np.asarray(box.lower, np.float64)[None], np.asarray(box.upper, np.float64)[None]
  name, value = variant
  saved = getattr(host_bounds, name)
  setattr(host_bounds, name, value)
  try:
    dl, du, _, _, kept = host_bounds.bound_pieces(chain, lo, hi)
    # And a half of the box from the whole box's bounds (a parent's).
    half_hi = hi.copy()
    half_hi[:, 0] = (lo[:, 0] + hi[:, 0]) / 2
    hdl, hdu, *_ = host_bounds.bound_pieces(chain, lo, half_hi, kept)
  finally:
    setattr(host_bounds, name, saved)
  xs = H.sample_points(box, 2000, seed)
  values = host_bab.evaluate(chain, xs)
  assert np.all(values >= dl[0] - 1e-12) and np.all(values <= du[0] + 1e-12)
  half = values[xs[:, 0] <= half_hi[0, 0]]
  assert np.all(half >= hdl[0] - 1e-12) and np.all(half <= hdu[0] + 1e-12)


def test_a_normalisation_alone_is_not_a_chain():
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(lambda x: jnp.clip(x, -0.5, 0.5) / 2.0, lambda x: jnp.clip(x, -0.5, 0.5) / 2.0, box)
  assert host_bab.chain_of(merged) is None
