"""Tie splits in the NumPy search (qbound.bounds.host_ties): pieces split on the value of f_q's
dynamic rounding of its input. Each case's bounds hold for the inputs whose rounded value it
holds, the cases cover the piece, empty cases hold no input, and the search stays sound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbound import dynamic_rounding as DR
from qbound.box import Box
from qbound.bounds import host_bab, host_ties
from qbound.bounds.host_bounds import Chain, bound_pieces, evaluate
from qbound.bounds.host_steps import step_values

_GUARD = ("lt", 1e-19, 1.0)
SPECS = {"absmax int8": DR.DynamicScale(127.5, -128, 127, guard=_GUARD),
         "minmax int8": DR.DynamicScale(255.0, -128, 127, guard=_GUARD, zero_point=(-128.0, 255.0)),
         "absmax int4 away": DR.DynamicScale(7.5, -8, 7, rounding="away")}


def chain_with_input_rounding(seed: int, spec, n_in: int = 4, hidden: int = 8) -> Chain:
  """A random 2-layer ReLU pair whose f_q rounds its input with ``spec`` (a scale from the input)
  and has its weights perturbed."""
  rng = np.random.default_rng(seed)
  w1, b1 = rng.normal(size=(hidden, n_in)), 0.1 * rng.normal(size=hidden)
  w2, b2 = rng.normal(size=(2, hidden)) / np.sqrt(hidden), 0.1 * rng.normal(size=2)
  noise = lambda a: a + 0.02 * rng.normal(size=a.shape)  # noqa: E731
  layers = (("dynamic", spec, (n_in,)), ("affine", w1, b1, noise(w1), noise(b1)), ("relu",),
            ("affine", w2, b2, noise(w2), noise(b2)))
  return Chain(layers=layers, n_in=n_in, n_out=2)


def piece_on_a_tie(chain, seed: int, width: float):
  """A piece of edge ``width`` around an input whose entry 1 sits on a rounding tie (entries 0 and
  -1 hold the largest and smallest values, so entry 1 leaves the scale alone)."""
  rng = np.random.default_rng(seed)
  spec = chain.layers[0][1]
  x = rng.uniform(-0.7, 0.7, chain.n_in)
  x[0], x[-1] = 1.0, -0.8
  s = (1.8 if spec.zero_point is not None else 1.0) / spec.divisor
  x[1] = (np.floor(x[1] / s) + 0.5) * s
  return x - width / 2, x + width / 2


def points_in(lo, hi, rng, count=3000):
  xs = lo + rng.uniform(size=(count, lo.size)) * (hi - lo)
  return np.concatenate([xs, lo[None], hi[None]])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(sorted(SPECS)), width=st.sampled_from([1e-6, 1e-4, 1e-3]))
def test_each_case_holds_for_the_inputs_it_holds(seed, kind, width):
  chain = chain_with_input_rounding(seed, SPECS[kind])
  layer = host_ties.tie_layer(chain)
  assert layer is not None
  lo, hi = piece_on_a_tie(chain, seed, width)
  lo, hi = lo[None], hi[None]
  weight = np.ones_like(lo)
  rows, entry, theta, below, above = host_ties.candidates(layer, lo, hi, *host_ties.no_values(lo), weight)
  assert list(rows) == [0], "the piece straddles entry 1's tie"
  rng = np.random.default_rng(seed)
  xs = points_in(lo[0], hi[0], rng)
  # A few points on the tie itself, where either rounding may come out.
  xs[:20, entry[0]] = np.clip(theta[0] * (1 + rng.normal(size=20) * 1e-15), lo[0, entry[0]], hi[0, entry[0]])
  values = step_values(layer, xs)[:, entry[0]]
  errors = evaluate(chain, xs)
  cover = np.zeros(len(xs), bool)
  for case, holds in ((below, values <= theta[0]), (above, values >= theta[0])):
    cover |= holds
    assert np.all(case[0][0, entry[0]] <= values[holds]) and np.all(values[holds] <= case[1][0, entry[0]])
    dl, du, *_ = bound_pieces(chain, lo, hi, values=case)
    assert np.all(errors[holds] >= dl - 1e-12) and np.all(errors[holds] <= du + 1e-12)
    if holds.any():
      assert not host_ties.empty(layer, lo, hi, *case)[0]
  assert cover.all()


def test_a_case_narrows_its_entry_to_one_step():
  """On a tiny piece across a tie, each case pins the entry to one step's values: both cases'
  bounds are tighter than the piece's own."""
  chain = chain_with_input_rounding(3, SPECS["minmax int8"])
  layer = host_ties.tie_layer(chain)
  lo, hi = (a[None] for a in piece_on_a_tie(chain, 3, 1e-7))
  dl, du, *_ = bound_pieces(chain, lo, hi)
  _, _, _, below, above = host_ties.candidates(layer, lo, hi, *host_ties.no_values(lo), np.ones_like(lo))
  for case in (below, above):
    cdl, cdu, *_ = bound_pieces(chain, lo, hi, values=case)
    assert np.all(cdu - cdl <= du - dl + 1e-12) and np.any(cdu - cdl < 0.5 * (du - dl))


def test_a_case_beyond_every_step_is_empty():
  chain = chain_with_input_rounding(1, SPECS["absmax int8"])
  layer = host_ties.tie_layer(chain)
  lo, hi = (a[None] for a in piece_on_a_tie(chain, 1, 1e-7))
  v = step_values(layer, (lo + hi) / 2)
  s = 1.0 / 127.5
  # Entry 2's value lies strictly between two steps: no input of the piece has it.
  between = (np.floor(v[0, 2] / s) + 0.5) * s
  value_lo, value_hi = host_ties.no_values(lo)
  value_lo[0, 2], value_hi[0, 2] = between - 1e-4 * s, between + 1e-4 * s
  assert host_ties.empty(layer, lo, hi, value_lo, value_hi)[0]
  assert not host_ties.empty(layer, lo, hi, *host_ties.no_values(lo))[0]


def test_no_tie_splits_behind_rms_layers_or_static_roundings():
  rms = DR.DynamicScale(2.0 * 127.5 / 3.0, -128, 127, guard=_GUARD, norm="rms")
  assert host_ties.tie_layer(chain_with_input_rounding(0, rms)) is None
  plain = chain_with_input_rounding(0, SPECS["absmax int8"])
  assert host_ties.tie_layer(Chain(layers=plain.layers[1:], n_in=4, n_out=2)) is None


@pytest.mark.parametrize("kind", ["minmax int8", "absmax int4 away"])
def test_the_search_with_tie_splits_is_sound(kind, monkeypatch):
  """host_branch_and_bound with tie splits, on a small box across ties: its bounds hold against
  dense sampling."""
  chain = chain_with_input_rounding(5, SPECS[kind])
  lo, hi = piece_on_a_tie(chain, 5, 0.02)
  box = Box(lo.astype(np.float32), hi.astype(np.float32))
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  calls = []
  original = host_ties.candidates
  monkeypatch.setattr(host_ties, "candidates", lambda *args: calls.append(1) or original(*args))
  res = host_bab.host_branch_and_bound(None, box, chain=chain, time_budget=1.0, target_gap=0.0)
  assert calls, "the search looked for tie splits"
  errors = evaluate(chain, points_in(lo, hi, np.random.default_rng(0), 20_000))
  assert np.abs(errors).max() <= res.upper
  assert np.all(errors >= res.diff_lower - 1e-12) and np.all(errors <= res.diff_upper + 1e-12)
