"""Targets whose interval bounds are exact get no backward rows (``sparse.exact_targets``): which
targets those are, and that skipping their rows leaves the bounds sound against sampling and as
tight as with the rows."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.bounds import sparse


def _normalised_mlp(params, x, shift, scale, clip=(-2.0, 2.0)):
  """An ``.nnet``-style net: clip, shift, scale per entry, then a ReLU MLP."""
  x = jnp.clip(x, *clip)
  x = (x + shift) / scale
  layers = params["params"]
  return H.relu_mlp([(layers[f"dense_{i}"]["kernel"], layers[f"dense_{i}"]["bias"]) for i in range(len(layers))], x)


def _pair(seed, n_in=3, widths=(8, 8, 2), q_shift=None, mixing_prefix=False):
  rng = np.random.default_rng(seed)
  sizes = (n_in, *widths)
  params = {"params": {f"dense_{i}": {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
                                      "bias": jnp.asarray(0.1 * rng.normal(size=b), jnp.float32)}
                       for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}}
  qparams = qb.quantize.uniform(params, bits=6)
  shift = jnp.asarray(rng.uniform(-0.5, 0.5, n_in), jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 2.0, n_in), jnp.float32)
  mix = jnp.asarray(rng.normal(size=(n_in, n_in)), jnp.float32)

  def net(p, sh, x):
    if mixing_prefix:  # a dense map before the first layer: the first layer's input is no box
      x = x @ mix
    return _normalised_mlp(p, x, sh, scale)

  f = functools.partial(net, params, shift)
  fq = functools.partial(net, qparams, shift if q_shift is None else q_shift(shift))
  return f, fq


def _first_dense(graph):
  return next(i for i, n in enumerate(graph.nodes) if n.kind == "affine" and n.op is not None
              and n.op.name == "dot_general")


def test_the_first_dense_layer_behind_an_entrywise_prefix_is_exact():
  f, fq = _pair(0)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  m = qb.merge(f, fq, box)
  own, diff = sparse.exact_targets(m.f_graph, m.fq_graph)
  first = _first_dense(m.f_graph)
  assert first in own and first in diff
  later = [i for i in sparse.relu_inputs(m.f_graph) if i > first]
  assert later and not (set(later) & own)  # behind a ReLU layer rows can tighten


def test_a_prefix_that_differs_or_mixes_is_not_exact():
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  f, fq = _pair(1, q_shift=lambda s: s + 1e-3)  # f_q normalises differently: d is not 0 there
  m = qb.merge(f, fq, box)
  own, diff = sparse.exact_targets(m.f_graph, m.fq_graph)
  assert _first_dense(m.f_graph) in own and _first_dense(m.f_graph) not in diff
  f, fq = _pair(1, mixing_prefix=True)  # a dense map first: its image is no box
  m = qb.merge(f, fq, box)
  own, diff = sparse.exact_targets(m.f_graph, m.fq_graph)
  dense = [i for i, n in enumerate(m.f_graph.nodes) if n.kind == "affine" and n.op is not None
           and n.op.name == "dot_general"]
  assert dense[0] in own  # the mixing map itself reads the box: exact
  assert dense[1] not in own and dense[1] not in diff


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), differ=st.booleans(), f_crown=st.booleans())
def test_skipping_exact_targets_is_sound_and_as_tight(seed, differ, f_crown):
  """On random pieces of random normalised pairs, every node's bounds with the exact targets'
  rows skipped hold at sampled inputs (float64) and agree with the bounds computed with those rows
  to within rounding (rows there prove only the interval's range again)."""
  f, fq = _pair(seed % 97, q_shift=(lambda s: s * (1 + 1e-3)) if differ else None)
  rng = np.random.default_rng(seed)
  lo = rng.uniform(-1.5, 0.5, (3, 3)).astype(np.float32)
  hi = lo + rng.uniform(0.05, 1.0, (3, 3)).astype(np.float32)
  pieces = qb.Box(jnp.asarray(lo), jnp.asarray(hi))
  m = qb.merge(f, fq, qb.Box(-2 * jnp.ones(3), 2 * jnp.ones(3)))
  fg, qg = m.f_graph, m.fq_graph
  saved = sparse.SKIP_EXACT_TARGETS
  try:
    results = {}
    for skip in (True, False):
      sparse.SKIP_EXACT_TARGETS = skip
      results[skip] = sparse.diff_bounds_sparse(fg, qg, pieces, f_crown=f_crown, outputs=[0, 1])
  finally:
    sparse.SKIP_EXACT_TARGETS = saved
  res = results[True]
  for b in range(3):
    xs = H.sample_points(qb.Box(pieces.lower[b], pieces.upper[b]), 200, seed + b)
    zf, zq = H.node_values64(fg, xs), H.node_values64(qg, xs)
    for i in range(1, len(fg.nodes)):
      for (l, h), value in ((res.z[i], zf[i]), (res.zq[i], zq[i]), (res.d[i], zf[i] - zq[i])):
        l, h = np.asarray(l, np.float64)[b], np.asarray(h, np.float64)[b]
        assert np.all(l <= value) and np.all(value <= h), (i, b)
  for name in ("z", "zq", "d"):
    for (l1, h1), (l2, h2) in zip(getattr(res, name), getattr(results[False], name)):
      width = np.maximum(np.asarray(h2) - np.asarray(l2), 1e-6)
      assert np.all(np.asarray(h1) - np.asarray(h2) <= 1e-4 * width + 1e-6), name
      assert np.all(np.asarray(l2) - np.asarray(l1) <= 1e-4 * width + 1e-6), name


@pytest.mark.parametrize("seed", [0, 1])
def test_crown_sparse_skips_exact_targets_soundly(seed):
  from qbound.bounds.sparse import crown_bounds_sparse

  f, _ = _pair(seed)
  box = qb.Box(-2 * jnp.ones(3), 2 * jnp.ones(3))
  m = qb.merge(f, f, box)
  rng = np.random.default_rng(seed)
  lo = rng.uniform(-1.5, 0.5, (2, 3)).astype(np.float32)
  pieces = qb.Box(jnp.asarray(lo), jnp.asarray(lo + 0.7))
  bounds = crown_bounds_sparse(m.f_graph, pieces)
  for b in range(2):
    xs = H.sample_points(qb.Box(pieces.lower[b], pieces.upper[b]), 200, seed)
    values = H.node_values64(m.f_graph, xs)
    for i in range(1, len(m.f_graph.nodes)):
      l, h = (np.asarray(x, np.float64)[b] for x in bounds[i])
      assert np.all(l <= values[i]) and np.all(values[i] <= h), i
