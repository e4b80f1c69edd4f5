"""Branch and bound in NumPy (qbound.bounds.host_bab): sound bounds on every piece, in float64
against sampling and the exact MILP, and certify(method="auto") using it on small ReLU pairs."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound import dynamic_rounding as DR
from qbound import rms_rounding
from qbound.bounds import host_backward, host_bab, host_bounds, host_chain, host_float, host_halves, host_steps
from qbound.exact.encoding import _matrices


def pair(seed, shape, bits=None, noise=None):
  """A random MLP of ``shape`` (as helpers.SHAPES) and its copy with weights and biases rounded to
  ``bits`` (per layer, symmetric) or perturbed by ``noise`` times N(0, 1). Built in NumPy: flax's
  init and the quantizers compile per shape (seconds each on a loaded machine)."""
  rng = np.random.default_rng(seed)
  n_in, hidden, n_out = shape
  widths = [n_in, *hidden, n_out]
  layers, copies = [], []
  for a, b in zip(widths[:-1], widths[1:]):
    w, bias = rng.normal(size=(a, b)) / np.sqrt(a), 0.1 * rng.normal(size=b)
    if bits is not None:
      step = np.abs(w).max() / (2 ** (bits - 1) - 1)
      wq, bq = np.round(w / step) * step, np.round(bias / step) * step
    else:
      wq, bq = w + noise * rng.normal(size=w.shape), bias + noise * rng.normal(size=b)
    layers.append((w.astype(np.float32), bias.astype(np.float32)))
    copies.append((wq.astype(np.float32), bq.astype(np.float32)))
  return functools.partial(H.relu_mlp, tuple(layers)), functools.partial(H.relu_mlp, tuple(copies))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(H.SHAPES[:3] + H.SHAPES[4:]),
       kind=st.sampled_from(["2", "3", "6", "noise 0.3", "noise 2.0"]), width=st.floats(0.01, 1.0))
def test_piece_bounds_hold_at_sampled_points(seed, shape, kind, width):
  """Every piece's bounds on f - f_q hold at points sampled in it, for close copies and for pairs
  whose weights differ by more than the weights themselves (noise 2.0)."""
  bits, noise = (None, float(kind.split()[1])) if kind.startswith("noise") else (int(kind), None)
  f, fq = pair(seed, shape, bits, noise)
  box = H.random_box(seed, shape[0])
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  assert chain is not None
  # (host_bab.evaluate is checked against the merged graph in float64 below.)
  _bounds_hold_in_pieces_and_halves(chain, box, seed, width, lambda xs: host_bab.evaluate(chain, xs))


def _bounds_hold_in_pieces_and_halves(chain, box, seed, width, values_at):
  """Bounds of 4 random pieces of ``box`` (edges ``width`` of random spans), and of their halves
  along the first input started from the pieces' bounds (a parent's), hold at 300 points sampled
  in each and at its corners; ``values_at(xs)``: ``f - f_q`` at flat points ``(k, n_in)``."""
  rng = np.random.default_rng(seed)
  lo0, hi0 = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  pieces = 4  # (a fixed count: the float64 reference compiles once per shape)
  a, b = rng.uniform(lo0, hi0, (2, pieces, lo0.size))
  lo, hi = np.minimum(a, b), np.minimum(a, b) + width * np.abs(a - b)
  dl, du, _, _, kept = host_bab.bound_pieces(chain, lo, hi)
  half_hi = hi.copy()
  half_hi[:, 0] = (lo[:, 0] + hi[:, 0]) / 2
  hdl, hdu, _, _, _ = host_bab.bound_pieces(chain, lo, half_hi, kept)
  for dl, du, top in ((dl, du, hi), (hdl, hdu, half_hi)):
    xs = lo[:, None] + rng.uniform(size=(pieces, 300, lo0.size)) * (top - lo)[:, None]
    xs[:, 0], xs[:, 1] = lo, top  # the corners too
    values = np.asarray(values_at(xs.reshape(-1, lo0.size))).reshape(pieces, 300, -1)
    assert np.all(values >= dl[:, None] - 1e-12) and np.all(values <= du[:, None] + 1e-12)


def test_evaluate_is_the_networks_difference():
  f, fq = pair(4, H.SHAPES[2], bits=3)
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  merged = qb.merge(f, fq, box)
  xs = H.sample_points(box, 50)
  np.testing.assert_allclose(host_bab.evaluate(host_bab.chain_of(merged), xs), H.eval64(merged.graph, xs),
                             rtol=1e-12, atol=1e-12)


@functools.cache
def exact_case(seed, shape, bits):
  """``(f, fq, box, MILP result)`` on the box [-1, 1]^n: solved once for the tests that share it."""
  f, fq = pair(seed, shape, bits)
  box = qb.Box(-jnp.ones(shape[0]), jnp.ones(shape[0]))
  return f, fq, box, qb.exact.milp(f, fq, box, time_limit=5)


@pytest.mark.parametrize("seed, shape, bits", [(0, H.SHAPES[0], 3),
                                              pytest.param(5, H.SHAPES[1], 4, marks=pytest.mark.slow)])
def test_converges_to_the_exact_value(seed, shape, bits):
  f, fq, box, exact = exact_case(seed, shape, bits)
  # The MILP's proven interval [value, upper] (optimal or not) and the search's must overlap; the
  # search closes its own gap to 1%.
  res = host_bab.host_branch_and_bound(qb.merge(f, fq, box), box, time_budget=30, target_gap=0.01)
  tol = exact.tolerance
  assert res.stopped == "gap" and res.upper <= 1.01 * res.lower
  assert res.lower <= exact.upper + tol and exact.value - tol <= res.upper
  # The reached error is reached (float64).
  assert np.abs(H.eval64(qb.merge(f, fq, box).graph, res.witness[None])).max() == pytest.approx(res.lower, rel=1e-12)


def test_sound_when_stopped_early():
  f, fq = pair(3, H.SHAPES[2], bits=6)
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  merged = qb.merge(f, fq, box)
  res = host_bab.host_branch_and_bound(merged, box, time_budget=0.05, target_gap=0.0)
  values = H.eval64(merged.graph, H.sample_points(box, 4000))
  assert np.all(values >= res.diff_lower - 1e-12) and np.all(values <= res.diff_upper + 1e-12)
  assert np.abs(values).max() <= res.upper and res.lower <= res.upper


def test_selected_outputs_and_epsilon():
  f, fq = pair(1, H.SHAPES[0], bits=3)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  one = host_bab.host_branch_and_bound(merged, box, outputs=[1], time_budget=10, target_gap=0.01)
  values = H.eval64(merged.graph, H.sample_points(box, 2000))
  assert np.abs(values[:, 1]).max() <= one.upper <= 1.01 * one.lower + 1e-12
  res = host_bab.host_branch_and_bound(merged, box, time_budget=10, epsilon=10.0)
  assert res.stopped == "epsilon" and res.upper <= 10.0


def test_dense_matrices_read_off_the_weights():
  """The NumPy path equals the generic one (a basis through JAX) for x @ W, W @ x and flax Dense."""
  w = np.asarray(jax.random.normal(jax.random.key(0), (3, 4)), np.float32)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  for fn in (lambda x: jax.nn.relu(x @ w) @ w.T, lambda x: jax.nn.relu(w.T @ x) @ w.T):
    graph = qb.trace(fn, jnp.zeros(3))
    ref = _matrices(graph)
    for i, node in enumerate(graph.nodes):
      if node.kind == "affine":
        np.testing.assert_array_equal(host_chain.dense_matrix(node), ref[i])
  f, fq = pair(0, H.SHAPES[1], bits=4)
  graph = qb.merge(f, fq, box).f_graph
  ref = _matrices(graph)
  for i, node in enumerate(graph.nodes):
    if node.kind == "affine":
      np.testing.assert_array_equal(host_chain.dense_matrix(node), ref[i])


def _int_scaled_mlp(layers, x, factors=("mul",)):
  """``layers`` as an integer-weight library computes them: ``(x @ W_int) * s + b`` per layer, the
  scale ``s`` per output channel (AQT's weight-only int8 layer); with ``factors=("mul", "div")``,
  ``(x @ W_int) * s / t`` (two factors)."""
  for i, (w_int, scale, bias) in enumerate(layers):
    x = x @ w_int * scale
    if "div" in factors:
      x = x / jnp.float32(3.0)
    x = x + bias
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def _int_layers(seed, shape, bits=4):
  """A random MLP and its layers as ``(W_int, s, b)``: integer weights at ``bits``, a scale per
  output channel."""
  f, _ = pair(seed, shape, noise=0.0)
  layers = []
  for w, b in f.args[0]:
    step = (np.abs(w).max(axis=0) / (2 ** (bits - 1) - 1)).astype(np.float32)
    layers.append((np.round(w / step).astype(np.float32), step, b))
  return f, tuple(layers)


def test_batched_calls_and_rescaled_products_are_chains():
  """``model.apply(p, x[None])[0]`` (a batch axis added and removed) and products rescaled per
  output channel (``(x @ W_int) * s``: AQT's weight-only layers; also with a second factor) are
  chains too, whose NumPy evaluation is the networks' difference and whose bounds hold; a reshape
  that reorders the entries is not."""
  shape = H.SHAPES[2]
  f, layers = _int_layers(6, shape)
  box = qb.Box(-jnp.ones(shape[0]), jnp.ones(shape[0]))
  batched = lambda fn: (lambda x: fn(x[None])[0])  # noqa: E731
  xs = H.sample_points(box, 400)
  fq = functools.partial(_int_scaled_mlp, layers)
  for first, second in ((f, fq), (batched(f), batched(fq))):
    merged = qb.merge(first, second, box)
    chain = host_bab.chain_of(merged)
    assert chain is not None
    reference = H.eval64(merged.graph, xs).reshape(len(xs), -1)
    np.testing.assert_allclose(host_bab.evaluate(chain, xs), reference, rtol=1e-12, atol=1e-12)
    res = host_bab.host_branch_and_bound(merged, box, time_budget=2.0, target_gap=0.0)
    assert np.abs(reference).max() <= res.upper
  # Two factors fold too, each entry rounded once more in float64 (inside the bounds' slack).
  merged = qb.merge(f, functools.partial(_int_scaled_mlp, layers, factors=("mul", "div")), box)
  np.testing.assert_allclose(host_bab.evaluate(host_bab.chain_of(merged), xs), H.eval64(merged.graph, xs),
                             rtol=1e-12, atol=1e-12)
  # A reshape that reorders the entries is no chain (its order would be lost on flat vectors).
  square = qb.Box(-jnp.ones((2, 2)), jnp.ones((2, 2)))
  reordered = lambda fn: (lambda x: fn(jax.lax.reshape(x, (4,), dimensions=(1, 0))))  # noqa: E731
  in_order = lambda fn: (lambda x: fn(x.reshape(4)))  # noqa: E731
  f4, fq4 = pair(7, (4, (8,), 2), bits=3)
  assert host_bab.chain_of(qb.merge(reordered(f4), reordered(fq4), square)) is None
  merged = qb.merge(in_order(f4), in_order(fq4), square)
  xs = H.sample_points(square, 50)
  np.testing.assert_allclose(host_bab.evaluate(host_bab.chain_of(merged), xs.reshape(len(xs), 4)),
                             H.eval64(merged.graph, xs).reshape(len(xs), -1), rtol=1e-12, atol=1e-12)


def test_only_small_paired_relu_chains():
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  w = jnp.ones((3, 3)) / 3
  tanh = qb.merge(lambda x: jnp.tanh(x @ w), lambda x: jnp.tanh(x @ (w * 0.9)), box)
  residual = qb.merge(lambda x: x + jax.nn.relu(x @ w), lambda x: x + jax.nn.relu(x @ (w * 0.9)), box)
  assert host_bab.chain_of(tanh) is None and host_bab.chain_of(residual) is None
  wide = jnp.ones((3, 100)) / 3
  big = qb.merge(lambda x: jax.nn.relu(x @ wide).sum(), lambda x: jax.nn.relu(x @ (wide * 0.9)).sum(), box)
  assert host_bab.chain_of(big) is None  # 200 ReLUs > MAX_NEURONS
  with pytest.raises(ValueError, match="host_branch_and_bound needs"):
    host_bab.host_branch_and_bound(tanh, box)
  # A ReLU at the output is left to the compiled search (the search once crashed on it).
  assert host_bab.chain_of(qb.merge(lambda x: jax.nn.relu(x @ w), lambda x: jax.nn.relu(x @ (w * 0.9)), box)) is None
  small = qb.merge(lambda x: jax.nn.relu(x @ w) @ w, lambda x: jax.nn.relu(x @ (w * 0.9)) @ w, box)
  with pytest.raises(ValueError, match="outputs must be flat indices"):
    host_bab.host_branch_and_bound(small, box, outputs=[3])
  with pytest.raises(ValueError, match="time_budget"):
    host_bab.host_branch_and_bound(small, box, time_budget=-1.0)


def _rounding_pairs():
  """Small ReLU chains whose f_q rounds its activations (f has identities there): with a constant
  scale (qbound's own fake quantization), and with a scale from the input, written as qwix does."""
  rng = np.random.default_rng(0)
  w1 = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  b1 = jnp.asarray(0.1 * rng.normal(size=8), jnp.float32)
  f = lambda x: jax.nn.relu(x @ w1 + b1) @ w2  # noqa: E731
  grid = qb.quantize.ActivationRange(jnp.float32(-1.0), jnp.float32(1.0))
  static = lambda x: jax.nn.relu(qb.quantize.fake_quant(x, grid, 3) @ w1 + b1) @ w2  # noqa: E731

  def dense(x, w):
    s = jnp.max(jnp.abs(x)) / 127.5
    s = jnp.where(s < 1e-19, 1.0, s)
    return (jnp.round(x / s).astype(jnp.int8).astype(jnp.float32) @ w) * s

  dynamic = lambda x: dense(jax.nn.relu(dense(x, w1) + b1), w2)  # noqa: E731
  return f, {"static": static, "dynamic": dynamic}


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_rounding_in_f_q_alone_is_not_skipped(kind):
  """f's identity beside f_q's own rounding is not a chain's skipped identity (it once was, and the
  search proved bounds near 0 on errors of 0.076, which certify's final check caught as a
  SoundnessError). A static rounding of the input is no chain (the input grid takes it); one with
  scales from the input is a chain layer of its own, ``dynamic``, and certify's NumPy search takes it."""
  f, fqs = _rounding_pairs()
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fqs[kind], box)
  assert any(n.kind == "round" and n.attrs[0] != "none" for n in merged.fq_graph.nodes)
  chain = host_bab.chain_of(merged)
  if kind == "static":
    assert chain is None
  else:
    assert [layer[0] for layer in chain.layers] == ["dynamic", "affine", "relu", "dynamic", "affine"]
  cert = qb.certify(f, fqs[kind], box, time_budget=2.0)
  xs = jnp.asarray(H.sample_points(box, 4000), jnp.float32)
  errors = np.abs(np.asarray(jax.vmap(f)(xs)) - np.asarray(jax.vmap(fqs[kind])(xs)))
  assert errors.max() <= cert.upper
  assert np.abs(H.eval64(merged, np.asarray(xs, np.float64))).max() <= cert.upper
  assert ("host-bab" in cert.bounds) == (kind == "dynamic")


@pytest.mark.parametrize("seed, shape, bits", [(0, H.SHAPES[0], 3),
                                              pytest.param(2, H.SHAPES[1], 6, marks=pytest.mark.slow)])
def test_certify_auto_matches_the_exact_value(seed, shape, bits):
  """certify(auto) on a small ReLU pair: sound against sampling, within the gap of the MILP's value."""
  f, fq, box, exact = exact_case(seed, shape, bits)
  cert = qb.certify(f, fq, box, method="auto", time_budget=30, target_gap=0.02)
  tol = exact.tolerance
  assert "host-bab" in cert.bounds
  values = H.eval64(qb.merge(f, fq, box).graph, H.sample_points(box, 2000))
  assert np.abs(values).max() <= cert.upper
  assert cert.lower <= exact.upper + tol and exact.value - tol <= cert.upper <= 1.02 * cert.lower


def test_certify_auto_budget_expiring_during_the_host_search():
  """A budget far too short for the gap: the call returns on time with a sound interval."""
  f, fq = pair(3, H.SHAPES[2], bits=8)
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  start = time.perf_counter()
  cert = qb.certify(f, fq, box, method="auto", time_budget=0.5, target_gap=0.0)
  # The budget, and slack for a loaded machine (without the deadline the search would run on to its
  # piece limit, MAX_PIECES).
  assert time.perf_counter() - start < 15.0
  values = H.eval64(qb.merge(f, fq, box).graph, H.sample_points(box, 2000))
  assert np.abs(values).max() <= cert.upper and cert.lower <= cert.upper
  assert np.all(values >= cert.diff_lower - 1e-12) and np.all(values <= cert.diff_upper + 1e-12)


def test_certify_auto_budget_spent_before_the_host_search_starts():
  """A budget already spent when the NumPy search's thread starts (1 ms; under load, 0.1 s did it):
  the call returns its interval bound, where it raised host_branch_and_bound's ValueError for a
  time_budget of 0."""
  f, fq = pair(2, H.SHAPES[0], bits=3)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  cert = qb.certify(f, fq, box, method="auto", time_budget=1e-3, target_gap=0.0)
  values = H.eval64(qb.merge(f, fq, box).graph, H.sample_points(box, 2000))
  assert np.abs(values).max() <= cert.upper and cert.lower <= cert.upper


def test_certify_auto_deadline_before_the_first_probes_are_evaluated(monkeypatch):
  """The NumPy search's bounds arrive while the first probes' float64 evaluation still compiles (a
  short budget on a loaded machine), and the deadline comes: the certificate evaluates the probes
  itself. It had no witness at all (None, read as NaN: a TypeError inside the float64 evaluation)."""
  import importlib
  import threading

  certify_module = importlib.import_module("qbound.certify")
  f, fq = pair(3, H.SHAPES[2], bits=8)
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  release, real = threading.Event(), certify_module._first_probes

  def slow_probes(*args, **kwargs):  # past the deadline (the certificate's own call waits too)
    release.wait(1.5)
    return real(*args, **kwargs)

  monkeypatch.setattr(certify_module, "_first_probes", slow_probes)
  try:
    cert = qb.certify(f, fq, box, method="auto", time_budget=0.5, target_gap=0.0)
  finally:
    release.set()
  assert cert.witness.shape == box.shape and np.all(np.isfinite(cert.witness))
  values = H.eval64(qb.merge(f, fq, box).graph, H.sample_points(box, 2000))
  assert cert.lower <= cert.upper and np.abs(values).max() <= cert.upper


@pytest.mark.slow  # (compiles branch and bound's steps: ~5 s)
def test_certify_auto_without_host_search(monkeypatch):
  """HOST_HEAD_START = None: auto's compiled branch and bound alone, as before."""
  import importlib

  certify_module = importlib.import_module("qbound.certify")

  monkeypatch.setattr(certify_module, "HOST_HEAD_START", None)
  f, fq = pair(0, H.SHAPES[0], 3)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  cert = qb.certify(f, fq, box, method="auto", time_budget=30, target_gap=0.02)
  assert "host-bab" not in cert.bounds and cert.upper <= 1.02 * cert.lower + 1e-12


@pytest.mark.parametrize("depth", [2, 3, 99])
def test_piece_bounds_hold_whichever_layers_get_backward_rows(depth, monkeypatch):
  """The backward pass from every hidden layer (2), from the third dense layer on (3, the default)
  or for the outputs only (99): sound at sampled points either way, on a pair with three hidden
  layers whose copy differs by more than its weights."""
  monkeypatch.setattr(host_bounds, "BACKWARD_FROM_DEPTH", depth)
  f, fq = pair(7, H.SHAPES[1], noise=1.0)
  box = H.random_box(7, 3)
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  rng = np.random.default_rng(7)
  lo0, hi0 = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  a, b = rng.uniform(lo0, hi0, (2, 4, 3))
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  dl, du, *_ = host_bab.bound_pieces(chain, lo, hi)
  xs = lo[:, None] + rng.uniform(size=(4, 500, 3)) * (hi - lo)[:, None]
  values = host_bab.evaluate(chain, xs.reshape(-1, 3)).reshape(4, 500, -1)
  assert np.all(values >= dl[:, None] - 1e-12) and np.all(values <= du[:, None] + 1e-12)


@settings(max_examples=50, deadline=None)
@given(x=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20))
def test_outward_rounding_steps_past_the_neighbouring_floats(x):
  x = np.asarray(x, np.float64)
  with np.errstate(over="ignore"):  # at +-max the step overflows to +-inf: still outward
    assert np.all(host_float.down(x) <= np.nextafter(x, -np.inf))
    assert np.all(host_float.up(x) >= np.nextafter(x, np.inf))


def _reference_backward(chain, upto, rows_d, rows_q, lines, lo, hi):
  """The backward pass of host_backward.backward written out plainly (np.where on each entry's sign,
  the rows copied for every piece unless they are the pieces' own, no rounding slack)."""
  k = lo.shape[0]
  lam_d = np.broadcast_to(rows_d, (k,) + rows_d.shape[-2:]).copy()
  lam_q = np.broadcast_to(rows_q, (k,) + rows_q.shape[-2:]).copy()
  const = np.zeros(lam_d.shape[:2])
  for j in range(upto - 1, -1, -1):
    layer = chain.layers[j]
    if layer[0] == "affine":
      _, w, b, wq, bq = layer
      const += lam_d @ (b - bq) + lam_q @ bq
      lam_d, lam_q = lam_d @ w, lam_d @ (w - wq) + lam_q @ wq
    elif layer[0] in host_bounds.F_Q_STEPS:  # z_q' = z_q + e: the least of (lam_q - lam_d) e per entry
      c = lam_q - lam_d
      least = lambda low, up: np.where(c >= 0, c * low[:, None], c * up[:, None])  # noqa: E731
      e_lo, e_hi = lines[j][:2]
      if len(lines[j]) > 2:  # every entry within its band [n_lo, n_hi] but `count` of them at most
        n_lo, n_hi, count = lines[j][2:]
        band, full = least(n_lo, n_hi), least(e_lo, e_hi)
        const += band.sum(-1) + np.sort(full - band, axis=-1)[..., :count].sum(-1)
      else:
        const += least(e_lo, e_hi).sum(-1)
    else:
      ln = lines[j]
      pick = lambda lam, low, up: np.where(lam >= 0, low[:, None], up[:, None])  # noqa: E731
      const += (lam_d * pick(lam_d, ln.r_l, ln.r_u)).sum(-1) + (lam_q * pick(lam_q, 0 * ln.t, ln.t)).sum(-1)
      lam_d, lam_q = (lam_d * pick(lam_d, ln.p_l, ln.p_u),
                      lam_q * pick(lam_q, ln.a, ln.s) + lam_d * pick(lam_d, ln.q_l, ln.q_u))
  return const + np.minimum(lam_q * lo[:, None], lam_q * hi[:, None]).sum(-1)


@pytest.mark.parametrize("seed, shape, noise", [(1, H.SHAPES[1], 1.0), (4, H.SHAPES[2], None),
                                               (2, H.SHAPES[1], "rms,3 int4"), (6, H.SHAPES[1], "rms,2 int8")])
def test_backward_pass_matches_a_plain_reference(seed, shape, noise, monkeypatch):
  """host_backward.backward (rows shared by the pieces until the first ReLU layer, lines picked by
  sign as products, the rounding's slack from a bound on |rows| over the whole batch; on qwix's
  rms,c layers, the band's terms as products and the few saturating entries' as row minima; and
  the saturation rows, each piece's own) gives the plain pass's values, lowered by no more than a small slack, on every backward pass of a batch."""
  if isinstance(noise, str):
    f, fq = dynamic_quant_pair(seed, shape, noise)
  else:
    f, fq = pair(seed, shape, bits=None if noise else 4, noise=noise)
  box = H.random_box(seed, shape[0])
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  calls, real = [], host_backward.backward

  def spy(*args):
    calls.append((args, real(*args)))
    return calls[-1][1]

  monkeypatch.setattr(host_backward, "backward", spy)
  monkeypatch.setattr(host_bounds, "BACKWARD_FROM_DEPTH", 2)
  rng = np.random.default_rng(seed)
  lo0, hi0 = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  a, b = rng.uniform(lo0, hi0, (2, 16, lo0.size))
  host_bab.bound_pieces(chain, np.minimum(a, b), np.maximum(a, b))
  assert len(calls) >= 2  # a hidden layer's rows and the outputs'
  for (chain_, upto, rows_d, rows_q, lines, _, lo, hi), value in calls:
    reference = _reference_backward(chain_, upto, rows_d, rows_q, lines, lo, hi)
    scale = 1.0 + np.abs(reference)
    assert np.all(value <= reference + 1e-12 * scale)
    assert np.all(value >= reference - 1e-6 * scale)  # (RELATIVE_SLACK of magnitudes up to ~1e3 here)


def test_root_bounds_reported_before_any_split():
  """report_root gets the whole box's bounds on every output once, before the search splits (what
  certify shows at once, with the interval bound now computed only after the search), and they
  hold at sampled points."""
  f, fq = pair(5, H.SHAPES[2], bits=4)
  box = H.random_box(5, H.SHAPES[2][0])
  merged = qb.merge(f, fq, box)
  seen, batches = [], []
  res = host_bab.host_branch_and_bound(merged, box, time_budget=5.0, target_gap=0.02,
                                       report_root=lambda lo, up: seen.append((lo, up, len(batches))),
                                       report=lambda *args: batches.append(args))
  assert len(seen) == 1 and seen[0][2] == 0
  lo, up, _ = seen[0]
  np.testing.assert_array_equal(lo, res.root_lower)
  np.testing.assert_array_equal(up, res.root_upper)
  values = H.eval64(merged.graph, H.sample_points(box, 2000))
  assert np.all(values >= lo - 1e-12) and np.all(values <= up + 1e-12)


def static_quant_pair(seed, shape, bits, span=1.0):
  """A random ReLU MLP of ``shape`` and its copy whose hidden activations are fake-quantized to
  ``bits`` on the static range ``[-span, span]`` (qbound.quantize.fake_quant: divide by the scale,
  round, clip, multiply back), values beyond it saturating."""
  f, _ = pair(seed, shape, noise=0.0)
  layers = f.args[0]
  grid = qb.quantize.ActivationRange(jnp.float32(-span), jnp.float32(span))

  def fq(x):
    for i, (w, b) in enumerate(layers):
      x = x @ w + b
      if i < len(layers) - 1:
        x = qb.quantize.fake_quant(jax.nn.relu(x), grid, bits)
    return x

  return f, fq


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(H.SHAPES[:3]), bits=st.sampled_from([2, 3, 5]),
       span=st.sampled_from([0.3, 1.0, 3.0]), width=st.floats(0.01, 1.0))
def test_piece_bounds_hold_with_quantized_activations(seed, shape, bits, span, width):
  """f_q's static roundings and clips (behind dense layers) are chain layers whose bounds hold at
  points sampled in each piece and its halves, in float64 against the merged graph; ranges that
  saturate (span 0.3) and coarse grids included."""
  f, fq = static_quant_pair(seed, shape, bits, span)
  box = H.random_box(seed, shape[0])
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  assert chain is not None and {"round", "clip"} <= {layer[0] for layer in chain.layers}

  def values_at(xs):
    values = H.eval64(merged.graph, xs).reshape(len(xs), -1)
    np.testing.assert_allclose(host_bab.evaluate(chain, xs), values, rtol=0, atol=1e-12)
    return values

  _bounds_hold_in_pieces_and_halves(chain, box, seed, width, values_at)


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_quantized_activations_converge_to_the_exact_value():
  """With f_q's roundings and clips modelled, the search closes its gap on a small pair and its
  interval meets the exact MILP's; certify(auto) takes it and is sound against sampling."""
  f, fq = static_quant_pair(3, H.SHAPES[0], 3, span=0.6)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  exact = qb.exact.milp(f, fq, box, time_limit=10)
  res = host_bab.host_branch_and_bound(merged, box, time_budget=20, target_gap=0.01)
  assert res.stopped == "gap" and res.upper <= 1.01 * res.lower
  assert res.lower <= exact.upper + exact.tolerance and exact.value - exact.tolerance <= res.upper
  cert = qb.certify(f, fq, box, time_budget=5.0)
  assert "host-bab" in cert.bounds
  values = H.eval64(merged.graph, H.sample_points(box, 4000))
  assert np.abs(values).max() <= cert.upper <= 1.02 * cert.lower + 1e-12


def test_certify_auto_on_a_relu_output():
  """A small net whose output is a ReLU: certify(auto) used to crash in the NumPy search
  (TypeError in its gradient ascent); such nets go to the compiled search, soundly."""
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  w = np.asarray(jax.random.normal(jax.random.key(3), (3, 4)), np.float32)
  f = lambda x: jax.nn.relu(x @ w)  # noqa: E731
  fq = lambda x: jax.nn.relu(x @ (w * 0.9) + 0.05)  # noqa: E731
  cert = qb.certify(f, fq, box, time_budget=3.0)
  values = H.eval64(qb.merge(f, fq, box).graph, H.sample_points(box, 2000))
  assert np.abs(values).max() <= cert.upper and cert.lower <= cert.upper


def test_certify_auto_on_affine_layers_only():
  """Two dense layers and no activation (an nnx.Linear, a linen Sequential of Dense): the NumPy
  search's region ascent met a region with no ReLU rows and crashed (ValueError in its linear
  program); the region is the whole box, and the bound is the exact maximum."""
  box = qb.Box(-jnp.ones(5), jnp.ones(5))
  w = np.asarray(jax.random.normal(jax.random.key(0), (5, 3)), np.float32)
  f = lambda x: x @ w  # noqa: E731
  fq = lambda x: x @ (np.round(w * 8) / 8)  # noqa: E731
  cert = qb.certify(f, fq, box, time_budget=3.0)
  exact = np.abs(np.round(w * 8) / 8 - w).sum(axis=0).max()  # at a corner of the box
  assert cert.lower <= cert.upper and exact <= cert.upper <= exact * (1 + 1e-4)
  assert cert.lower >= exact * (1 - 1e-4)


def test_a_small_input_grid_goes_to_the_grid():
  """f_q that scales and rounds its input first: a chain for the NumPy search, and where its input
  grid is small certify(auto) enumerates it (exact cell by cell; the NumPy search runs only while
  the grid's programs compile, tests/test_host_input_grid.py); a dense layer first has no input grid."""
  rng = np.random.default_rng(1)
  w1 = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
  # (f scales by 2 where f_q scales by 4, so the scaling is no shared input normalisation.)
  f = lambda x: jax.nn.relu(((x * 2.0) / 2.0) @ w1) @ w2  # noqa: E731
  fq = lambda x: jax.nn.relu((jnp.round(x * 4.0) / 4.0) @ w1) @ w2  # noqa: E731
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  assert chain is not None and chain.layers[1][0] == "round"
  assert 9 ** 3 <= host_bab.input_grid_cells(chain, box.lower, box.upper) <= 10 ** 3
  cert = qb.certify(f, fq, box, time_budget=2.0)
  values = H.eval64(merged.graph, H.sample_points(box, 4000))
  assert np.abs(values).max() <= cert.upper and cert.lower <= cert.upper
  g, gq = static_quant_pair(0, H.SHAPES[0], 3)
  square = qb.Box(-jnp.ones(2), jnp.ones(2))
  assert host_bab.input_grid_cells(host_bab.chain_of(qb.merge(g, gq, square)),
                                   -np.ones(2), np.ones(2)) is None


# Dynamic quantizations of every dense layer's input, written as qwix computes them:
# ``(clip(round(x / s)) @ W) * s + b`` with ``s`` from ``x`` (guarded against 0): (Q, low, high,
# rounding, norm).
DYNAMIC_KINDS = {"absmax int8": (127.5, -128, 127, "nearest", "max"),
                 "absmax,0.9 int4 away": (7.5 / 0.9, -8, 7, "away", "max"),  # the largest saturate
                 "rms,3 int4": (7.5 / 3.0, -8, 7, "nearest", "rms"),
                 "rms,2 int8": (127.5 / 2.0, -128, 127, "nearest", "rms")}  # a few entries at once saturate


def dynamic_quant_pair(seed, shape, kind):
  """A random ReLU MLP of ``shape`` and its copy whose dense layers read their input dynamically
  quantized (``DYNAMIC_KINDS[kind]``), the model's input included."""
  f, _ = pair(seed, shape, noise=0.0)
  layers = f.args[0]
  q, low, high, rounding, norm = DYNAMIC_KINDS[kind]

  def dense(x, w, b):
    s = (jnp.max(jnp.abs(x)) if norm == "max" else jnp.sqrt(jnp.mean(jnp.square(x)))) / q
    s = jnp.where(s < 1e-19, 1.0, s)
    method = jax.lax.RoundingMethod.TO_NEAREST_EVEN if rounding == "nearest" else jax.lax.RoundingMethod.AWAY_FROM_ZERO
    c = jnp.clip(jax.lax.round(x / s, method), low, high)
    return (c @ w) * s + b

  def fq(x):
    for i, (w, b) in enumerate(layers):
      x = dense(x, w, b)
      if i < len(layers) - 1:
        x = jax.nn.relu(x)
    return x

  return f, fq


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.sampled_from(H.SHAPES[:3]), kind=st.sampled_from(sorted(DYNAMIC_KINDS)),
       width=st.floats(0.01, 1.0))
def test_piece_bounds_hold_with_dynamic_scales(seed, shape, kind, width):
  """f_q's dynamically scaled quantizations (scales from each input: absmax, saturating, rms; qwix's
  zero points and AQT's in test_quant_libraries) are chain layers whose bounds hold at points
  sampled in each piece and its halves, in float64, as the merged graph and the chain evaluate them."""
  f, fq = dynamic_quant_pair(seed, shape, kind)
  box = H.random_box(seed, shape[0])
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  assert chain is not None and [layer[0] for layer in chain.layers][:2] == ["dynamic", "affine"]

  # The merged graph's float64 evaluation, and the chain's own in NumPy: they may round a quotient
  # on a tie apart (a group's largest entry is at +-Q exactly), and the bounds cover either.
  _bounds_hold_in_pieces_and_halves(chain, box, seed, width, lambda xs: H.eval64(merged.graph, xs))
  _bounds_hold_in_pieces_and_halves(chain, box, seed, width, lambda xs: host_bab.evaluate(chain, xs))


_GUARD = ("lt", 1e-19, 1.0)


@pytest.mark.parametrize("spec", [
    DR.DynamicScale(127.5, -128, 127, guard=_GUARD), DR.DynamicScale(7.5 / 0.9, -8, 7, rounding="away"),
    DR.DynamicScale(255.0, -128, 127, guard=_GUARD, zero_point=(-128.0, 255.0)),
    DR.DynamicScale(7.0, -7, 7, guard=("lt", DR.RECIPROCAL_OVERFLOW, 1.0)),
    DR.DynamicScale(127.5, -128, 127, guard=_GUARD, axes=(-1,)),
    DR.DynamicScale(2.0 * 127.5 / 3.0, -128, 127, guard=_GUARD, norm="rms")])
def test_dynamic_rounding_bounds_agree_in_numpy_and_jax(spec):
  """qbound.dynamic_rounding's bounds, written once for both array libraries, give the NumPy search
  what the compiled passes compute (both in float64 here), and its NumPy quantizer keeps within them."""
  rng = np.random.default_rng(0)
  centre = rng.normal(size=(30, 2, 4)) * rng.choice([1e-3, 1.0, 20.0], size=(30, 1, 1))
  radius = np.abs(rng.normal(size=(30, 2, 4))) * rng.choice([0.0, 1e-3, 0.3], size=(30, 1, 1))
  lo, hi = centre - radius, centre + radius
  in_numpy = DR.bounds(spec, lo, hi, 2)
  with jax.enable_x64(True):
    in_jax = [np.asarray(a) for a in DR.bounds(spec, jnp.asarray(lo), jnp.asarray(hi), 2)]
  assert all(isinstance(a, np.ndarray) for a in in_numpy)
  for a, b in zip(in_numpy, in_jax):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
  assert in_numpy[1].any() and not in_numpy[1].all()
  half, flat, v_lo, v_hi = in_numpy
  points = lo + rng.uniform(size=(20, *lo.shape)) * (hi - lo)
  # (with one scale per tensor, quantize takes one (2, 4) tensor at a time; per row, any batch)
  q = np.stack([np.stack([DR.quantize(spec, x) for x in p]) if spec.axes is None else DR.quantize(spec, p)
                for p in points])
  assert isinstance(q, np.ndarray) and np.all(np.abs(q - points) <= half)
  assert np.all((q >= v_lo) & (q <= v_hi) | ~flat)


def test_certify_auto_with_dynamic_scales_takes_the_numpy_search():
  """certify(auto) on a small pair whose f_q quantizes its activations with scales from the input
  runs the NumPy search (nothing compiled for it), soundly against the library's float32 f_q."""
  f, fq = dynamic_quant_pair(2, H.SHAPES[1], "absmax,0.9 int4 away")
  box = qb.Box(-jnp.ones(H.SHAPES[1][0]), jnp.ones(H.SHAPES[1][0]))
  cert = qb.certify(f, fq, box, time_budget=4.0)
  assert "host-bab" in cert.bounds
  xs = H.sample_points(box, 4000)
  errors = np.abs(np.asarray(jax.vmap(f)(jnp.asarray(xs, jnp.float32)) - jax.vmap(fq)(jnp.asarray(xs, jnp.float32))))
  assert errors.max() <= cert.upper
  assert np.abs(H.eval64(qb.merge(f, fq, box), xs)).max() <= cert.upper
  assert 0 < cert.lower <= cert.upper


def test_rms_layers_take_backward_rows_from_the_second_dense_layer(monkeypatch):
  """Behind an rms,c layer the backward rows (which count only the entries that can saturate at
  once) start at the second dense layer: on random pieces of an rms,2 int8 pair the output bounds are
  tighter than with rows from the third only, on most pieces and in total."""
  f, fq = dynamic_quant_pair(5, H.SHAPES[1], "rms,2 int8")
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  rng = np.random.default_rng(0)
  a, b = rng.uniform(-1, 1, (2, 64, 3))
  lo, hi = np.minimum(a, b), np.maximum(a, b)
  widths = {}
  for depth in (3, 2):
    monkeypatch.setattr(host_bounds, "JOINT_BACKWARD_FROM_DEPTH", depth)
    dl, du, *_ = host_bab.bound_pieces(chain, lo, hi)
    widths[depth] = (du - dl).sum(axis=1)
  assert widths[2].sum() < widths[3].sum()
  assert np.mean(widths[2] < widths[3] - 1e-12) > 0.5


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["rms,3 int4", "rms,2 int8"]), width=st.floats(0.02, 1.0))
def test_saturations_bounded_on_the_network_hold_at_sampled_points(seed, kind, width):
  """The saturation rows of an rms,c layer (host_backward.saturation_rest, per piece from its centre)
  bound, at 300 points sampled in each piece, every entry's others' norm from below and its
  saturation errors at the top and bottom from above, as their definitions compute them from f_q's
  values at the layer's input."""
  f, fq = dynamic_quant_pair(seed, H.SHAPES[0], kind)
  box = H.random_box(seed, 2)
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  seen = []
  original = host_backward.saturation_rest

  def recording(chain, j, lines, mags, lo, hi, ql, qu):
    joint = original(chain, j, lines, mags, lo, hi, ql, qu)
    if joint is not None:
      seen.append((j, lo, hi, joint))
    return joint

  rng = np.random.default_rng(seed)
  lo0, hi0 = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  a, b = rng.uniform(lo0, hi0, (2, 6, 2))
  lo, hi = np.minimum(a, b), np.minimum(a, b) + width * np.abs(a - b)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(host_backward, "saturation_rest", recording)
    host_bab.bound_pieces(chain, lo, hi)
  assert [j for j, *_ in seen] == [3, 6]  # the two hidden layers' roundings (the input's 2 entries never saturate)
  for j, lo, hi, joint in seen:
    spec = chain.layers[j][1]
    n = chain.layers[j][2][-1]
    c = 1 - rms_rounding.slack(n)
    xs = lo[:, None] + rng.uniform(size=(len(lo), 300, 2)) * (hi - lo)[:, None]
    x = host_steps.chain_values(chain.layers[:j], xs.reshape(-1, 2))[1].reshape(len(lo), 300, n)
    m = np.sqrt((x * x).sum(-1, keepdims=True))
    rest = np.sqrt(np.maximum(m * m - x * x, 0.0))
    tol = 1e-9 * (1 + m)
    assert np.all(rest >= joint.rest.reshape(-1, 1, n) - tol)
    assert np.all(x - float(spec.high) / float(spec.divisor) * c * m <= joint.top.reshape(-1, 1, n) + tol)
    assert np.all(-x + float(spec.low) / float(spec.divisor) * c * m <= joint.bottom.reshape(-1, 1, n) + tol)
    assert np.all(np.isfinite(joint.top))


def test_saturation_rows_tighten_the_pieces_bounds(monkeypatch):
  """On random pieces of an rms,2 int8 pair, the saturations bounded on the network give tighter
  output bounds than the entries' intervals alone, on most pieces and in total."""
  f, fq = dynamic_quant_pair(2, H.SHAPES[1], "rms,2 int8")
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  chain = host_bab.chain_of(qb.merge(f, fq, box))
  rng = np.random.default_rng(0)
  centre = rng.uniform(-0.9, 0.9, (64, 3))
  lo, hi = centre - 0.05, centre + 0.05
  widths = {}
  for rows in (False, True):
    monkeypatch.setattr(host_bounds, "SATURATION_ROWS", rows)
    dl, du, *_ = host_bab.bound_pieces(chain, lo, hi)
    widths[rows] = (du - dl).sum(axis=1)
  assert widths[True].sum() < widths[False].sum()
  assert np.mean(widths[True] < widths[False] - 1e-12) > 0.5


def test_large_batches_are_bounded_in_two_halves_as_two_calls_would(monkeypatch):
  """A batch above host_halves.PARALLEL_FROM is bounded on two threads, each half on its own: the
  result is exactly that of two calls of bound_pieces (not of one call on the whole batch, whose
  batch-wide slacks differ), and it holds at sampled points."""
  f, fq = dynamic_quant_pair(2, H.SHAPES[1], "rms,3 int4")
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  chain = host_bab.chain_of(merged)
  rng = np.random.default_rng(1)
  centre = rng.uniform(-0.9, 0.9, (40, 3))
  lo, hi = centre - 0.1, centre + 0.1
  _, _, _, _, kept = host_bab.bound_pieces(chain, lo, hi)
  monkeypatch.setattr(host_halves, "PARALLEL_FROM", 16)
  monkeypatch.setattr(host_halves, "usable_cores", lambda: 2)
  both = host_halves.bound_in_halves(chain, lo, hi, kept, None, parallel=True)
  halves = [host_bab.bound_pieces(chain, lo[h], hi[h], kept[h]) for h in (slice(0, 20), slice(20, 40))]
  for got, *parts in zip(both, *halves):
    np.testing.assert_array_equal(got, np.concatenate(parts))
  assert host_halves.bound_in_halves(chain, lo[:15], hi[:15], kept[:15], None, parallel=True)[0].shape == (15, 2)
  xs = lo[:, None] + rng.uniform(size=(40, 200, 3)) * (hi - lo)[:, None]
  values = H.eval64(merged.graph, xs.reshape(-1, 3)).reshape(40, 200, -1)
  assert np.all(values >= both[0][:, None] - 1e-12) and np.all(values <= both[1][:, None] + 1e-12)

