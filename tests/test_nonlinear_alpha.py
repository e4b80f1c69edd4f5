"""Optimisable relaxations of products and curves (qbound.bounds.nonlinear.product_planes,
curve_relaxation(fractions=...)): every choice of slopes holds at sampled points of random boxes
(float64 reference values, sound and float32 mode), the default fractions reproduce CROWN's lines,
and alpha-CROWN through an attention block is never looser than CROWN and holds against sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import helpers as H
import qbound as qb
from qbound import graph as G
from qbound.bounds import nonlinear
from qbound.bounds.alpha import crown_alpha_node
from test_nonlinear import RANGES, REFERENCE

N = 64


@functools.partial(jax.jit, static_argnames=("kind", "sound"))
def _curve(kind, lo, hi, fl, fu, sound):
  return nonlinear.curve_relaxation(kind, lo, hi, sound=sound, fractions={"lower": fl, "upper": fu})


@pytest.mark.parametrize("kind", sorted(REFERENCE))
@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_curve_lines_hold_for_any_fractions(kind, sound, data):
  low, high = RANGES[kind]
  lo = np.asarray(data.draw(st.lists(st.floats(low, high), min_size=N, max_size=N)), np.float32)
  width = data.draw(st.sampled_from([0.0, 0.01, 1.0, 10.0]))
  hi = np.minimum(lo + np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=N, max_size=N)), np.float32) * width,
                  np.float32(high))
  rng = np.random.default_rng(data.draw(st.integers(0, 100)))
  # Two rows of fractions per interval (the shape of optimised slopes: one set per backward row).
  fl, fu = (rng.choice([0.0, 1.0, 0.5, rng.uniform()], size=(2, N)).astype(np.float32) for _ in range(2))
  r = _curve(kind, jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(fl), jnp.asarray(fu), sound)
  r = [np.asarray(v, np.float64) for v in r]
  t = np.concatenate([np.zeros((1, N)), np.ones((1, N)), rng.uniform(size=(40, N))])
  x = lo.astype(np.float64) + t * (hi.astype(np.float64) - lo)
  y = REFERENCE[kind](x)
  for row in range(2):
    k_lo, b_lo, k_up, b_up = (v[row] for v in r)
    tol = 0 if sound else 1e-5 * (1 + np.abs(y) + np.abs(k_lo * x) + np.abs(k_up * x))
    assert np.all(k_lo * x + b_lo - y <= tol), kind
    assert np.all(y - (k_up * x + b_up) <= tol), kind


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_default_fractions_give_crowns_lines(kind):
  low, high = RANGES[kind]
  lo = jnp.linspace(low, high, N, dtype=jnp.float32)
  hi = jnp.minimum(lo + jnp.linspace(0, 3, N, dtype=jnp.float32), high)
  default = nonlinear.curve_relaxation(kind, lo, hi)
  fractions = nonlinear.default_fractions(kind, lo, hi)
  chosen = nonlinear.curve_relaxation(kind, lo, hi, fractions=fractions)
  for a, b in zip(default, chosen):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * (1 + float(jnp.max(jnp.abs(a)))))


@functools.partial(jax.jit, static_argnames=("sound",))
def _planes(xl, xu, yl, yu, fractions, sound):
  return nonlinear.product_planes((xl, xu), (yl, yu), fractions, sound=sound)


@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_product_planes_hold_for_any_fractions(sound, data):
  def ends(scale):
    a = np.asarray(data.draw(st.lists(st.floats(-100, 100), min_size=N, max_size=N)), np.float32)
    w = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=N, max_size=N)), np.float32) * scale
    return a, a + w

  (xl, xu), (yl, yu) = ends(data.draw(st.sampled_from([0.0, 0.1, 10.0, 1000.0]))), ends(
      data.draw(st.sampled_from([0.0, 1.0, 100.0])))
  rng = np.random.default_rng(data.draw(st.integers(0, 100)))
  fractions = {k: jnp.asarray(rng.choice([0.0, 1.0, rng.uniform()], size=N), jnp.float32)
               for k in ("a_lower", "b_lower", "a_upper", "b_upper")}
  r = _planes(*(jnp.asarray(v) for v in (xl, xu, yl, yu)), fractions, sound)
  r = [np.asarray(v, np.float64) for v in r]
  f64 = lambda v: np.asarray(v, np.float64)
  for tx, ty in [(0, 0), (0, 1), (1, 0), (1, 1)] + [tuple(rng.uniform(size=2)) for _ in range(20)]:
    x, y = f64(xl) + tx * (f64(xu) - f64(xl)), f64(yl) + ty * (f64(yu) - f64(yl))
    z = x * y
    below, above = r[0] * x + r[1] * y + r[2], r[3] * x + r[4] * y + r[5]
    # Float32 mode has no margins: allow its rounding (a few ulps of every term).
    terms = np.abs(z) + np.abs(r[0] * x) + np.abs(r[1] * y) + np.abs(r[2]) + np.abs(r[3] * x) + np.abs(r[4] * y) \
        + np.abs(r[5])
    tol = 0 if sound else 1e-5 * (1 + terms)
    assert np.all(below <= z + tol) and np.all(z <= above + tol)


def test_centre_fractions_give_the_centre_planes():
  x = (jnp.array([-1.0, 0.5]), jnp.array([2.0, 3.0]))
  y = (jnp.array([0.5, -4.0]), jnp.array([1.5, -1.0]))
  default = nonlinear.product_relaxation(x, y)
  planes = nonlinear.product_planes(x, y, nonlinear.default_product_fractions(x))
  for a, b in [(default.x_slope, planes.x_lower), (default.x_slope, planes.x_upper), (default.y_slope, planes.y_lower),
               (default.lower_offset, planes.lower_offset), (default.upper_offset, planes.upper_offset)]:
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)


@pytest.mark.slow  # half a minute: the gradient of every backward step compiles
@pytest.mark.parametrize("sound", [True, False])
def test_alpha_crown_through_attention_holds_and_is_not_looser(sound):
  f, fq, x0 = H.quantized_pair(H.Attention())
  box = qb.Box(x0 - 0.05, x0 + 0.05)
  graph = qb.trace(f, x0)
  bounds = qb.bounds.crown_bounds(graph, box, None, sound)
  lo0, hi0 = bounds[graph.output]
  lo, hi = crown_alpha_node(graph, graph.output, bounds, box, steps=8, sound=sound, optimise_nonlinear=True)
  assert bool(jnp.all(hi - lo <= hi0 - lo0 + 1e-6))
  xs = jax.random.uniform(jax.random.key(1), (4000, *box.shape), minval=box.lower, maxval=box.upper)
  ys = jax.vmap(f)(xs)
  tol = 0 if sound else 1e-5
  assert bool(jnp.all(ys >= lo - tol) & jnp.all(ys <= hi + tol))
