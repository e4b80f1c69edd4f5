"""Optimised differential slopes start from the default ones and are never looser than them.

On random pairs (quantized and perturbed copies), float32 and float-sound: the optimised bounds of
the output's ``d`` (on one box, with and without optimised intermediate bounds, and on a batch of
branch-and-bound pieces with the bounds their parents pass on) lie inside the default ones, and
both enclose the errors reached by sampling (float64).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.bounds import bab_batch
from qbound.bounds.alpha import diff_alpha_bounds, diff_alpha_pieces
from qbound.bounds.diff import diff_bounds
from qbound.bounds.sparse import diff_bounds_sparse

SHAPE = (2, (6, 6), 2)  # two hidden layers: intermediate bounds for everywhere=True to move
# Pairs whose bounds leave the optimised slopes room: a quantized copy, a perturbed one (weights
# that all differ), larger weights (more unstable ReLUs).
PAIRS = [dict(bits=4), dict(bits=None, noise=0.05), dict(bits=6, init_scale=2.0)]


def _inside(inner, outer, what, slack=0.0):
  lo, hi = (np.asarray(a, np.float64) for a in inner)
  olo, ohi = (np.asarray(a, np.float64) for a in outer)
  assert np.all(lo >= olo - slack) and np.all(hi <= ohi + slack), f"{what}: {lo}, {hi} not inside {olo}, {ohi}"


def _encloses(bounds, errors, what):
  lo, hi = (np.asarray(a, np.float64) for a in bounds)
  assert np.all(lo <= errors.min(0)) and np.all(errors.max(0) <= hi), f"{what}: {lo}, {hi} vs sampled"


@pytest.mark.parametrize("everywhere", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("sound", [True, pytest.param(False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("pair", [pytest.param(0, marks=pytest.mark.slow), 1, pytest.param(2, marks=pytest.mark.slow)])
def test_optimised_slopes_never_looser_than_default(pair, sound, everywhere):
  """One box: the output's optimised bounds (20 Adam steps; with ``everywhere`` also every
  activation's input) inside the default ones, and both above the sampled errors."""
  f, fq, _, _ = H.random_pair(pair, SHAPE, **PAIRS[pair])
  box = H.random_box(pair, SHAPE[0], radius=(0.3, 1.0))
  merged = qb.merge(f, fq, box)
  fg, qg, out = merged.f_graph, merged.fq_graph, merged.f_graph.output
  errors = H.eval64(merged, H.sample_points(box, 2000, seed=pair))
  _, _, d0 = diff_bounds(fg, qg, box, None, sound)
  _encloses(d0[out], errors, "default slopes")
  _, _, d = diff_alpha_bounds(fg, qg, box, steps=20, sound=sound, everywhere=everywhere)
  _inside(d[out], d0[out], "optimised slopes")
  _encloses(d[out], errors, "optimised slopes")


@pytest.mark.slow  # 14-20 s of compiling gradient steps; branch and bound does not use diff_alpha_pieces
@pytest.mark.parametrize("sound", [True, False])
def test_optimised_slopes_on_pieces_keep_the_pieces_bounds(sound):
  """Pieces of a box with the bounds their parent passes on (branch and bound's ``keep``): the
  optimised bound is inside the sparse default one the piece has, and above sampled errors."""
  f, fq, _, _ = H.random_pair(7, SHAPE, bits=None, noise=0.05, init_scale=2.0)
  box = H.random_box(7, SHAPE[0], radius=(0.5, 1.0))
  merged = qb.merge(f, fq, box)
  fg, qg = merged.f_graph, merged.fq_graph
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  mid = (lo + hi) / 2
  # The parent: the whole box; its children: its halves along the first input.
  parent = diff_bounds_sparse(fg, qg, qb.Box(jnp.asarray(lo[None]), jnp.asarray(hi[None])), sound=sound)
  nodes = bab_batch.kept_nodes(fg, True)
  prior = tuple([None] * len(fg.nodes) for _ in range(3))
  for j, bounds in enumerate((parent.z, parent.zq, parent.d)):
    for i in nodes:
      prior[j][i] = tuple(jnp.concatenate([b, b]) for b in bounds[i])
  left_hi, right_lo = hi.copy(), lo.copy()
  left_hi[0] = right_lo[0] = mid[0]
  los, his = jnp.asarray(np.stack([lo, right_lo])), jnp.asarray(np.stack([left_hi, hi]))
  optimised, default = diff_alpha_pieces(fg, qg, los, his, prior=prior, steps=20, sound=sound)
  for k in range(2):
    piece = qb.Box(los[k], his[k])
    errors = H.eval64(merged, H.sample_points(piece, 1000, seed=k))
    _inside((optimised[0][k], optimised[1][k]), (default[0][k], default[1][k]), f"piece {k}")
    _encloses((optimised[0][k], optimised[1][k]), errors, f"piece {k}, optimised")

