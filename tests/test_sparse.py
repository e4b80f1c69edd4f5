"""Rows only where they matter (:mod:`qbound.bounds.sparse`): the row bookkeeping itself."""

import jax.numpy as jnp
import numpy as np
import pytest

from qbound.bounds.sparse import tighten_where


@pytest.mark.parametrize("counts", [(0, 0, 0), (3, 0, 1), (5, 5, 5), (1, 17, 0), (20, 20, 2)])
def test_tighten_where_gives_every_box_its_own_rows(counts):
  """Boxes with different numbers of set entries (none, some, all): each set entry gets its own
  box's row bound; unset entries keep their bounds, except that a box without any set entry pads
  with its entry 0, whose row bound (proven like any other) may tighten it."""
  rng = np.random.default_rng(sum(counts))
  boxes, n = len(counts), 20
  mask = np.zeros((boxes, n), bool)
  for b, c in enumerate(counts):
    mask[b, rng.choice(n, size=c, replace=False)] = True
  lo = jnp.asarray(rng.uniform(-3, -1, (boxes, n)), jnp.float32)
  hi = jnp.asarray(rng.uniform(1, 3, (boxes, n)), jnp.float32)
  value = rng.uniform(-0.5, 0.5, (boxes, n)).astype(np.float32)  # each box's exact neuron values
  calls = []

  def lower_fn(rows, state):
    # rows (boxes, 2R, n): the lower bound of rows . value over a box whose neurons are exactly
    # ``value`` is rows . value, computed per box from that box's own state.
    calls.append(rows.shape)
    assert rows.shape[0] == boxes and rows.shape[2] == n
    return jnp.einsum("brn,bn->br", rows, state)

  new_lo, new_hi = tighten_where((lo, hi), mask, lower_fn, jnp.asarray(value))
  new_lo, new_hi = np.asarray(new_lo), np.asarray(new_hi)
  kept = ~mask
  if mask.any():
    kept[~mask.any(axis=1), 0] = False
  np.testing.assert_array_equal(new_lo[kept], np.asarray(lo)[kept])
  np.testing.assert_array_equal(new_hi[kept], np.asarray(hi)[kept])
  padded = ~mask & ~kept
  np.testing.assert_allclose(new_lo[padded], value[padded], rtol=0, atol=1e-6)
  np.testing.assert_allclose(new_lo[mask], value[mask], rtol=0, atol=1e-6)
  np.testing.assert_allclose(new_hi[mask], value[mask], rtol=0, atol=1e-6)
  assert len(calls) == (1 if mask.any() else 0)
  if calls:  # one padded row count for every box, at most the node's size
    assert max(counts) * 2 <= calls[0][1] <= 2 * n


def test_shared_relaxation_lines_give_the_same_bounds(monkeypatch):
  """The walks of the sparse differential pass share each activation's lines, computed once: the
  bounds are those of lines computed again per walk, bit for bit."""
  import helpers as H
  import qbound as qb
  from qbound.bounds import sparse

  f, fq, _, _ = H.random_pair(4, (2, (8, 8), 2), noise=1e-2)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  rng = np.random.default_rng(0)
  lo = rng.uniform(-1, 0.5, (4, 2)).astype(np.float32)
  pieces = qb.Box(jnp.asarray(lo), jnp.asarray(lo + 0.5))
  out = {}
  for share in (True, False):
    monkeypatch.setattr(sparse, "SHARE_LINES", share)
    res = sparse.diff_bounds_sparse(merged.f_graph, merged.fq_graph, pieces, f_crown=False, coefficients=True)
    out[share] = [np.asarray(a) for b in (res.zq, res.d) for pair in b for a in pair] + [np.asarray(res.coefficients)]
  for a, b in zip(out[True], out[False]):
    np.testing.assert_array_equal(a, b)


def test_step_compile_options_give_the_same_bounds(monkeypatch):
  """The per-node steps compiled with STEP_COMPILE (one LLVM module: faster to compile) compute the
  same arithmetic as with XLA's defaults: the bounds agree bit for bit (at optimisation level 1 up
  to rounding)."""
  import helpers as H
  import qbound as qb
  from qbound.bounds import common, sparse

  f, fq, _, _ = H.random_pair(5, (3, (8, 8), 2), noise=0.2)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  rng = np.random.default_rng(1)
  lo = rng.uniform(-1, 0.4, (4, 3)).astype(np.float32)
  pieces = qb.Box(jnp.asarray(lo), jnp.asarray(lo + 0.6))
  out = {}
  variants = (("defaults", {}), ("step", dict(common.STEP_COMPILE)),
              ("level 1", {**common.STEP_COMPILE, "xla_backend_optimization_level": 1}))
  for name, options in variants:
    monkeypatch.setattr(common, "STEP_COMPILE", options)
    res = sparse.diff_bounds_sparse(merged.f_graph, merged.fq_graph, pieces, f_crown=True, coefficients=True)
    out[name] = [np.asarray(a) for b in (res.z, res.zq, res.d) for pair in b for a in pair] + [
        np.asarray(res.coefficients)]
  assert common.STEP_COMPILE  # the default is not XLA's (else this compares nothing)
  for a, b in zip(out["defaults"], out["step"]):
    np.testing.assert_array_equal(a, b)
  # At level 1 (not taken: see common.STEP_COMPILE) LLVM may fuse a product into the first addition
  # of fp.pairwise_sum's tree (one rounding fewer, within the same margins): equal up to rounding.
  for a, b in zip(out["defaults"], out["level 1"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("after", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_parents_bounds_met_after_the_rows_stay_sound(monkeypatch, after, seed):
  """A piece's differential bounds from its parent's (``prior``), met before or after its own rows
  (``PRIOR_AFTER_ROWS``): every node's bounds hold at samples of the piece, in float64, and are no
  looser than the parent's where the parent's were passed on."""
  import helpers as H
  import qbound as qb
  from qbound.bounds import sparse
  from qbound.bounds.bab_batch import kept_nodes, node_list

  monkeypatch.setattr(sparse, "PRIOR_AFTER_ROWS", after)
  f, fq, _, _ = H.random_pair(seed, (3, (8, 8), 2), bits=4, init_scale=2.0)
  rng = np.random.default_rng(seed)
  parent_lo = rng.uniform(-1, 0, 3).astype(np.float32)
  parent = qb.Box(jnp.asarray(parent_lo), jnp.asarray(parent_lo + 1))
  merged = qb.merge(f, fq, parent)
  fg, qg = merged.f_graph, merged.fq_graph
  one = lambda b: qb.Box(b.lower[None], b.upper[None])
  top = sparse.diff_bounds_sparse(fg, qg, one(parent), f_crown=False)
  nodes = kept_nodes(fg, True)
  prior = tuple(node_list(len(fg.nodes), nodes, [b[i] for i in nodes]) for b in (top.z, top.zq, top.d))
  child_lo = parent_lo + rng.uniform(0, 0.5, 3).astype(np.float32)
  child = qb.Box(jnp.asarray(child_lo), jnp.asarray(child_lo + 0.5))
  for f_crown in (False, True):
    res = sparse.diff_bounds_sparse(fg, qg, one(child), f_crown=f_crown, prior=prior, outputs=[0])
    xs = H.sample_points(child, 300, seed)
    zf, zq = H.node_values64(fg, xs), H.node_values64(qg, xs)
    for i in range(1, len(fg.nodes)):
      for (lo, hi), value in ((res.z[i], zf[i]), (res.zq[i], zq[i]), (res.d[i], zf[i] - zq[i])):
        lo, hi = np.asarray(lo, np.float64)[0], np.asarray(hi, np.float64)[0]
        assert np.all(lo <= value) and np.all(value <= hi), (i, f_crown)
    for i in nodes:
      for mine, theirs in ((res.z[i], top.z[i]), (res.zq[i], top.zq[i]), (res.d[i], top.d[i])):
        assert np.all(np.asarray(mine[0]) >= np.asarray(theirs[0]))
        assert np.all(np.asarray(mine[1]) <= np.asarray(theirs[1]))



@pytest.mark.parametrize("after", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_crown_sparse_known_bounds_met_after_the_rows_stay_sound(monkeypatch, after, seed):
  """CROWN on the merged network with known bounds (``prior``; here the union of the piece's eight
  octants' bounds, tighter than the piece's own), met before or after the piece's own rows
  (``CROWN_PRIOR_AFTER_ROWS``): every node's bounds hold at samples of the piece, in float64, and
  are no looser than the known ones where those were passed on."""
  import itertools

  import helpers as H
  import qbound as qb
  from qbound.bounds import sparse
  from qbound.bounds.bab_batch import kept_nodes, node_list

  monkeypatch.setattr(sparse, "CROWN_PRIOR_AFTER_ROWS", after)
  f, fq, _, _ = H.random_pair(seed, (3, (8, 8), 2), bits=4, init_scale=2.0)
  lo = np.random.default_rng(seed).uniform(-1, 0, 3).astype(np.float32)
  piece = qb.Box(jnp.asarray(lo), jnp.asarray(lo + 1))
  graph = qb.merge(f, fq, piece).graph
  corners = np.array(list(itertools.product((0.0, 0.5), repeat=3)), np.float32)
  octants = qb.Box(jnp.asarray(lo + corners), jnp.asarray(lo + corners + 0.5))
  parts = sparse.crown_bounds_sparse(graph, octants)
  nodes = kept_nodes(graph, False)
  known = node_list(len(graph.nodes), nodes, [(parts[i][0].min(0, keepdims=True), parts[i][1].max(0, keepdims=True))
                                              for i in nodes])
  res = sparse.crown_bounds_sparse(graph, qb.Box(piece.lower[None], piece.upper[None]), prior=known, outputs=[0])
  values = H.node_values64(graph, H.sample_points(piece, 300, seed))
  for i in range(1, len(graph.nodes)):
    low, high = (np.asarray(b, np.float64)[0] for b in res[i])
    assert np.all(low <= values[i]) and np.all(values[i] <= high), i
  for i in nodes:
    assert np.all(np.asarray(res[i][0]) >= np.asarray(known[i][0]))
    assert np.all(np.asarray(res[i][1]) <= np.asarray(known[i][1]))


def _differing_pair_and_boxes(seed: int, count: int):
  """A 3-10-10-2 pair that really differs (weights perturbed by half their scale), ``count`` random
  boxes and the batch of them: ``(f's graph, f_q's graph, boxes, batch)``."""
  import helpers as H
  import qbound as qb

  f, fq, _, _ = H.random_pair(seed, (3, (10, 10), 2), noise=0.5, init_scale=1.5)
  boxes = [H.random_box(seed * 10 + k, 3, radius=(0.1, 1.0)) for k in range(count)]
  batch = qb.Box(jnp.stack([b.lower for b in boxes]), jnp.stack([b.upper for b in boxes]))
  merged = qb.merge(f, fq, boxes[0])
  return merged.f_graph, merged.fq_graph, boxes, batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_own_output_rows_are_sound_and_tighten_pairs_that_differ(seed):
  """``own_output_rows``: f's and f_q's own CROWN rows at the selected outputs, met with the
  differential ones. On pairs that really differ (large perturbations) every output bound holds at
  samples of each box in float64, is no looser than without them, is strictly tighter somewhere
  (the interval bounds of ``z`` and ``z_q`` it replaces are loose there), and f's output bounds are
  as tight as CROWN's own on f."""
  import helpers as H
  from qbound.bounds import sparse

  fg, qg, boxes, batch = _differing_pair_and_boxes(seed, 4)
  out = fg.output
  without = sparse.diff_bounds_sparse(fg, qg, batch, outputs=[1])
  with_rows = sparse.diff_bounds_sparse(fg, qg, batch, outputs=[1], own_output_rows=True)
  own_f = sparse.crown_bounds_sparse(fg, batch, outputs=[1])[out]
  gain = 0.0
  for k, b in enumerate(boxes):
    xs = H.sample_points(b, 400, seed + k)
    zf, zq = H.node_values64(fg, xs)[out], H.node_values64(qg, xs)[out]
    for (lo, hi), value in ((with_rows.z[out], zf), (with_rows.zq[out], zq), (with_rows.d[out], zf - zq)):
      lo, hi = np.asarray(lo, np.float64)[k], np.asarray(hi, np.float64)[k]
      assert np.all(lo <= value) and np.all(value <= hi), k
  for mine, theirs in ((with_rows.z[out], without.z[out]), (with_rows.zq[out], without.zq[out]),
                       (with_rows.d[out], without.d[out])):
    assert np.all(np.asarray(mine[0]) >= np.asarray(theirs[0]))
    assert np.all(np.asarray(mine[1]) <= np.asarray(theirs[1]))
    gain = max(gain, float(np.max(np.asarray(theirs[1]) - np.asarray(mine[1]))))
  assert gain > 0
  np.testing.assert_array_less(np.asarray(with_rows.z[out][1])[:, 1], np.asarray(own_f[1])[:, 1] + 1e-5)
  np.testing.assert_array_less(np.asarray(own_f[0])[:, 1], np.asarray(with_rows.z[out][0])[:, 1] + 1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_without_hidden_diff_rows_hold_at_every_node(seed):
  """``hidden_diff_rows=False`` (``d`` at the activations' inputs from its forward intervals and
  ``z - z_q`` only): every node's bounds of f, f_q and their difference hold at samples of each box
  in float64, on a pair that really differs, with and without the own output rows."""
  import helpers as H
  from qbound.bounds import sparse

  fg, qg, boxes, batch = _differing_pair_and_boxes(seed, 3)
  for own in (False, True):
    res = sparse.diff_bounds_sparse(fg, qg, batch, own_output_rows=own, hidden_diff_rows=False)
    assert all(count == 0 for count in res.rows.values())
    for k, b in enumerate(boxes):
      xs = H.sample_points(b, 300, seed + k)
      zf, zq = H.node_values64(fg, xs), H.node_values64(qg, xs)
      for i in range(1, len(fg.nodes)):
        for (lo, hi), value in ((res.z[i], zf[i]), (res.zq[i], zq[i]), (res.d[i], zf[i] - zq[i])):
          lo, hi = np.asarray(lo, np.float64)[k], np.asarray(hi, np.float64)[k]
          assert np.all(lo <= value) and np.all(value <= hi), (i, k, own)
