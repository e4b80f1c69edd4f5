"""The NumPy branch and bound where f_q rounds its input (qbound.bounds.host_chain.aligned_splits):
splits on the rounding's ties with a case on each side, sound at and next to the ties (float32 and
float64), and what they buy; certify runs the NumPy search while the input grid compiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.bounds import host_bab, host_bounds, host_chain

# f_q's rounding of its input, as the chain reads it: (scale, clip or None, mode).
ROUNDINGS = {"nearest 4": (4.0, None, jnp.round), "nearest 3 (ties inexact)": (3.0, None, jnp.round),
             "nearest 5 clipped": (5.0, 2.0, jnp.round), "floor 4": (4.0, None, jnp.floor),
             "negative scale 3": (-3.0, None, jnp.round)}


def grid_pair(seed, rounding, hidden=(8, 8), n_in=2, hidden_step=0.125):
  """A random ReLU MLP and its copy whose input is rounded (``ROUNDINGS``) and whose first hidden
  layer is rounded to ``hidden_step``; f scales its input by a factor that cancels (no shared
  normalisation)."""
  scale, clip, op = ROUNDINGS[rounding]
  rng = np.random.default_rng(seed)
  widths = [n_in, *hidden, 1]
  ws = [jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32) for a, b in zip(widths[:-1], widths[1:])]
  bs = [jnp.asarray(0.1 * rng.normal(size=b), jnp.float32) for b in widths[1:]]

  def body(x, first):
    h = jax.nn.relu(x @ ws[0] + bs[0])
    if first:
      h = jnp.round(h / hidden_step) * hidden_step
    for w, b in zip(ws[1:-1], bs[1:-1]):
      h = jax.nn.relu(h @ w + b)
    return h @ ws[-1] + bs[-1]

  def fq(x):
    v = x * scale
    if clip is not None:
      v = jnp.clip(v, -clip, clip)
    return body(op(v) / scale, True)

  return (lambda x: body((x * 2.0) / 2.0, False)), fq


def _chain(f, fq, box):
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  assert chain is not None and host_chain.input_rounding(chain) is not None
  return merged, chain


def _rounded(rounding, xs):
  """f_q's rounded input values at ``xs``: float64 and float32 evaluations of the model's own ops."""
  scale, clip, op = ROUNDINGS[rounding]
  out = []
  for dtype in (np.float64, np.float32):
    v = xs.astype(dtype) * dtype(scale)
    if clip is not None:
      v = np.clip(v, -clip, clip)
    out.append({jnp.round: np.round, jnp.floor: np.floor}[op](v))
  return out


def _near_ties(rounding, lo, hi, axes, rng, count):
  """Points of each piece whose ``axes`` entry is on a tie or a few ulps from it (float32 and float64)."""
  scale = ROUNDINGS[rounding][0]
  shift = 0.0 if ROUNDINGS[rounding][2] is jnp.floor else 0.5
  rows = np.arange(len(lo))
  xs = lo[:, None] + rng.uniform(size=(len(lo), count, lo.shape[1])) * (hi - lo)[:, None]
  q = xs[rows[:, None], np.arange(count)[None], axes[:, None]] * scale
  tie = (np.round(q - shift) + shift) / scale
  ulps = rng.integers(-3, 4, size=tie.shape)
  f32 = np.nextafter(tie.astype(np.float32), np.float32(np.inf)).astype(np.float64) - tie.astype(np.float32)
  moved = tie + ulps * np.where(rng.uniform(size=tie.shape) < 0.5, np.abs(f32), np.spacing(np.abs(tie) + 1e-300))
  xs[rows[:, None], np.arange(count)[None], axes[:, None]] = np.clip(moved, lo[rows, axes][:, None], hi[rows, axes][:, None])
  return xs


def _tie_splits(seed, rounding, width, count):
  """``count`` random pieces of ``[-1, 1]^2`` (edges ``width`` of random spans) of a ``grid_pair``,
  each split on a tie along a random input: ``(merged, chain, rng, lo, hi, axes, cut)``."""
  f, fq = grid_pair(seed, rounding)
  merged, chain = _chain(f, fq, qb.Box(-jnp.ones(2), jnp.ones(2)))
  rng = np.random.default_rng(seed)
  a, b = rng.uniform(-1, 1, (2, count, 2))
  lo, hi = np.minimum(a, b), np.minimum(a, b) + width * np.abs(a - b) + 1e-3
  axes = rng.integers(0, 2, count)
  rows = np.arange(count)
  cut = host_chain.aligned_splits(host_chain.input_rounding(chain), lo, hi, axes, (lo[rows, axes] + hi[rows, axes]) / 2)
  return merged, chain, rng, lo, hi, axes, cut


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), rounding=st.sampled_from(sorted(ROUNDINGS)), width=st.floats(0.05, 1.0))
def test_tie_splits_cover_the_piece_in_their_cases(seed, rounding, width):
  """Every input of a piece, on a tie, a few ulps from one (float32 and float64) or anywhere, lies
  in a half whose case holds the value f_q rounds it to, in either precision."""
  _, _, rng, lo, hi, axes, cut = _tie_splits(seed, rounding, width, 16)
  rows = np.arange(16)
  assert np.all(cut.upper_lo <= cut.lower_hi)
  assert np.all((cut.lower_hi > lo[rows, axes]) & (cut.upper_lo < hi[rows, axes]))
  xs = np.concatenate([_near_ties(rounding, lo, hi, axes, rng, 40),
                       lo[:, None] + rng.uniform(size=(16, 40, 2)) * (hi - lo)[:, None]], axis=1)
  halves = cut.halves(lo, hi, np.full_like(lo, -np.inf), np.full_like(lo, np.inf), axes)  # (as host_bab splits)
  for values in _rounded(rounding, xs):
    covered = np.zeros(xs.shape[:2], bool)
    for h_lo, h_hi, v_lo, v_hi in halves:
      in_box = np.all((xs >= h_lo[:, None]) & (xs <= h_hi[:, None]), axis=2)
      in_case = np.all((values >= v_lo[:, None]) & (values <= v_hi[:, None]), axis=2)
      covered |= in_box & in_case
    assert covered.all()
  for _, _, v_lo, v_hi in halves:  # and each half of a split on a tie has a case on that input
    assert np.all(np.isfinite(v_lo[rows, axes]) | np.isfinite(v_hi[rows, axes]) | ~cut.usable)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), rounding=st.sampled_from(sorted(ROUNDINGS)), width=st.floats(0.05, 1.0))
def test_bounds_of_each_case_hold_at_its_inputs(seed, rounding, width):
  """The two halves of tie splits, bounded in their cases from their parent's bounds, hold at the
  halves' inputs of their cases (the merged graph in float64), next to the ties included."""
  merged, chain, rng, lo, hi, axes, cut = _tie_splits(seed, rounding, width, 4)
  free = (np.full_like(lo, -np.inf), np.full_like(lo, np.inf))
  *_, kept = host_bounds.bound_pieces(chain, lo, hi, values=free)
  halves = []
  for h_lo, h_hi, v_lo, v_hi in cut.halves(lo, hi, *free, axes):  # (as host_bab splits its pieces)
    dl, du, *_ = host_bounds.bound_pieces(chain, h_lo, h_hi, kept, values=(v_lo, v_hi))
    halves.append((h_lo, h_hi, v_lo, v_hi, dl, du))
  for h_lo, h_hi, v_lo, v_hi, dl, du in halves:
    xs = np.concatenate([_near_ties(rounding, h_lo, h_hi, axes, rng, 60),
                         h_lo[:, None] + rng.uniform(size=(4, 60, 2)) * (h_hi - h_lo)[:, None]], axis=1)
    values = H.eval64(merged.graph, xs.reshape(-1, 2)).reshape(4, xs.shape[1], -1)
    rounded = _rounded(rounding, xs)[0]
    in_case = np.all((rounded >= v_lo[:, None]) & (rounded <= v_hi[:, None]), axis=2)
    ok = (values >= dl[:, None] - 1e-12) & (values <= du[:, None] + 1e-12)
    assert np.all(ok[in_case])


@pytest.mark.parametrize("rounding", ["nearest 3 (ties inexact)",
                                      pytest.param("negative scale 3", marks=pytest.mark.slow)])
def test_tie_splits_close_the_gap_where_midpoints_stall(rounding, monkeypatch):
  """A 2-8-8-1 pair rounding its input to thirds (and its first hidden layer to eighths): with tie
  splits the search closes a 1% gap within a few hundred pieces; at midpoints it stalls far above
  (pieces across a tie keep the rounding's band). The bound holds against sampling."""
  f, fq = grid_pair(1, rounding)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged, _ = _chain(f, fq, box)
  res = host_bab.host_branch_and_bound(merged, box, time_budget=30.0, target_gap=0.01)
  assert res.stopped == "gap" and res.pieces_bounded < 5_000
  values = H.eval64(merged.graph, H.sample_points(box, 20_000))
  assert np.abs(values).max() <= res.upper
  monkeypatch.setattr(host_bab, "ALIGNED_SPLITS", False)
  stalled = host_bab.host_branch_and_bound(merged, box, time_budget=5.0, target_gap=0.01)
  assert stalled.stopped != "gap" or stalled.pieces_bounded > 4 * res.pieces_bounded


def test_the_grid_reports_when_its_programs_are_compiled():
  """grid_error calls ``compiled`` once, after its first chunk: certify's NumPy search waits from
  then on, while the grid computes."""
  from qbound.exact.grid import grid_error

  f, fq = grid_pair(2, "nearest 4")
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged, _ = _chain(f, fq, box)
  calls = []
  res = grid_error(merged, box, compiled=lambda: calls.append(1))
  assert res is not None and calls == [1]
