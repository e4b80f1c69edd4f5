"""Differential rules of products and smooth curves (qbound.bounds.nonlinear_diff): their intervals
and lines around ``h(z) - h(z_q)`` and ``x y - x_q y_q`` hold at sampled pairs of random boxes
(float64 reference values), in sound and float32 mode, for close pairs (small ``d``) and far ones
(large ``d``: big weight differences); differential bounds and ``certify(method="diff")`` on a small
attention block hold against sampling."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings, strategies as st

import helpers as H
import qbound as qb
from qbound import graph as G
from qbound.bounds import nonlinear_diff

N = 48  # boxes per example (one compilation per kind and mode)
POINTS = 40

REFERENCE = {  # float64 values
    G.SQUARE: np.square, G.EXP: np.exp, G.RECIPROCAL: lambda x: 1 / x, G.RSQRT: lambda x: 1 / np.sqrt(x),
    G.SQRT: np.sqrt, G.ERFC: scipy.special.erfc, G.SILU: lambda x: x / (1 + np.exp(-x)),
    G.GELU: lambda x: x * scipy.special.expit(2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)),
}
# Where z_q's intervals live, and the largest |d| (z = z_q + d must stay in the domain).
RANGES = {G.SQUARE: (-20, 20), G.EXP: (-20, 20), G.RECIPROCAL: (0.05, 40), G.RSQRT: (1e-3, 40), G.SQRT: (0, 40),
          G.ERFC: (-6, 6), G.SILU: (-20, 20), G.GELU: (-20, 20)}


# XLA on CPU reads subnormal float32 inputs as zero, so a box end rounded outward to a subnormal is
# read as 0, which is no longer outward (an end of 1e-43 in float64 would be d's box [0, 0]: exactly
# zero): ends below the smallest normal go to 0 when that is outward, else to the smallest normal.
_TINY = np.finfo(np.float32).tiny


def _down(x):
  x = np.asarray(x, np.float64)
  v = np.nextafter(x.astype(np.float32), np.float32(-np.inf))
  return np.where(np.abs(v) >= _TINY, v, np.where(x >= 0, 0, -_TINY)).astype(np.float32)


def _up(x):
  x = np.asarray(x, np.float64)
  v = np.nextafter(x.astype(np.float32), np.float32(np.inf))
  return np.where(np.abs(v) >= _TINY, v, np.where(x <= 0, 0, _TINY)).astype(np.float32)


def _pair_boxes(data, low, high, d_scale):
  """Boxes of z_q and d (float64 ends) and of z = z_q + d, with every float32 end rounded outward."""
  a = np.asarray(data.draw(st.lists(st.floats(low, high), min_size=N, max_size=N)))
  w = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=N, max_size=N))) * data.draw(
      st.sampled_from([0.0, 1e-4, 0.1, 2.0]))
  ql, qu = a, np.minimum(a + w, high)
  b = np.asarray(data.draw(st.lists(st.floats(-1, 1), min_size=N, max_size=N))) * d_scale
  wd = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=N, max_size=N))) * d_scale
  dl, du = b, b + wd
  return (ql, qu), (dl, du)


def _points(q, d, seed):
  rng = np.random.default_rng(seed)
  t = np.concatenate([np.zeros((1, N)), np.ones((1, N)), rng.uniform(size=(POINTS, N))])
  s = np.concatenate([np.ones((1, N)), np.zeros((1, N)), rng.uniform(size=(POINTS, N))])
  return q[0] + t * (q[1] - q[0]), d[0] + s * (d[1] - d[0])


def _f32(bounds):
  return jnp.asarray(_down(bounds[0])), jnp.asarray(_up(bounds[1]))


@functools.partial(jax.jit, static_argnames=("kind", "sound"))
def _curve(kind, z, zq, d, sound):
  return (nonlinear_diff.curve_diff_interval(kind, z, zq, d, sound=sound),
          nonlinear_diff.curve_diff_relaxation(kind, z, zq, d, sound=sound))


@pytest.mark.parametrize("kind", sorted(REFERENCE))
@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_curve_differences_hold_on_random_pairs(kind, sound, data):
  low, high = RANGES[kind]
  d_scale = data.draw(st.sampled_from([0.0, 1e-5, 0.01, 1.0]))
  (ql, qu), (dl, du) = _pair_boxes(data, low, high, d_scale)
  if low >= 0:  # keep z = z_q + d inside the domain: shift d up where needed
    lift = np.maximum(low - (ql + dl), 0)
    dl, du = dl + lift, du + lift
    # ... until the float64 sum is inside too (the lift is rounded), so every sampled point is
    # (rounded sums are monotone): sqrt(-1e-17) is NaN, which no bound encloses.
    while np.any(ql + dl < low):
      dl = np.where(ql + dl < low, np.nextafter(dl, np.inf), dl)
    du = np.maximum(du, dl)
  z = (ql + dl, qu + du)
  (ilo, ihi), r = _curve(kind, _f32(z), _f32((ql, qu)), _f32((dl, du)), sound)
  xq, dd = _points((ql, qu), (dl, du), data.draw(st.integers(0, 99)))
  x = xq + dd
  h = REFERENCE[kind](x) - REFERENCE[kind](xq)
  r = [np.asarray(v, np.float64) for v in r]
  lower = r[0] * dd + r[1] * xq + r[2]
  upper = r[3] * dd + r[4] * xq + r[5]
  scale = 1 + np.abs(REFERENCE[kind](x)) + np.abs(r[0] * dd) + np.abs(r[1] * xq) + np.abs(r[3] * dd) + np.abs(r[4] * xq)
  # The float64 reference itself: h is a difference of two values, each within a few ulps.
  reference = 8 * np.finfo(np.float64).eps * (np.abs(REFERENCE[kind](x)) + np.abs(REFERENCE[kind](xq)))
  tol = reference if sound else 1e-5 * scale
  ilo, ihi = np.asarray(ilo, np.float64), np.asarray(ihi, np.float64)
  assert np.all(ilo <= h + tol) and np.all(h <= ihi + tol), kind
  # ... and the lines' own float64 evaluation (three products and two sums, each within eps).
  eps = np.finfo(np.float64).eps
  lower_tol = tol + 4 * eps * (np.abs(r[0] * dd) + np.abs(r[1] * xq) + np.abs(r[2]))
  upper_tol = tol + 4 * eps * (np.abs(r[3] * dd) + np.abs(r[4] * xq) + np.abs(r[5]))
  assert np.all(lower <= h + lower_tol), (kind, float(np.max(lower - h - lower_tol)))
  assert np.all(h <= upper + upper_tol), (kind, float(np.max(h - upper - upper_tol)))
  if d_scale == 0.0:
    assert np.all(ilo == 0) and np.all(ihi == 0)


# Point boxes of z_q and d, at XLA's backend optimisation level 0: there a choice made field by field
# took a line's slopes from one candidate and its offset from another (before the choice became one
# index per entry, 36 of these 256 entries broke a line, the first by 0.02).
_ONE_CHOICE_PER_ENTRY = """
import functools, json, numpy as np, jax, jax.numpy as jnp, scipy.special
from qbound import graph as G
from qbound.bounds import nonlinear_diff
reference = {"gelu": lambda x: x * scipy.special.expit(2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)),
             "silu": lambda x: x * scipy.special.expit(x)}
rng = np.random.default_rng(0)
xq = np.concatenate([[-0.8785201763296824], rng.uniform(-3, 3, 255)]).astype(np.float32)
d = np.concatenate([[0.9174738268165619], rng.uniform(-1, 1, 255)]).astype(np.float32)
x = xq + d
point = lambda v: (jnp.asarray(v), jnp.asarray(v))
broken = {}
for kind in ("gelu", "silu"):
  r = jax.jit(functools.partial(nonlinear_diff.curve_diff_relaxation, kind, sound=False))(point(x), point(xq), point(d))
  r = [np.asarray(v, np.float64) for v in r]
  a, b, c = (np.asarray(v, np.float64) for v in (xq, d, x))
  h = reference[kind](c) - reference[kind](a)
  tol = 1e-5 * (1 + np.abs(reference[kind](c)) + np.abs(r[0] * b) + np.abs(r[1] * a) + np.abs(r[3] * b) + np.abs(r[4] * a))
  broken[kind] = int(np.sum(r[0] * b + r[1] * a + r[2] > h + tol) + np.sum(h > r[3] * b + r[4] * a + r[5] + tol))
print(json.dumps(broken))
"""


def test_every_field_of_a_line_comes_from_one_candidate():
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "optimization_level" not in f]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags + ["--xla_backend_optimization_level=0"]), QBOUND_JAX_CACHE="0")
  out = subprocess.run([sys.executable, "-c", _ONE_CHOICE_PER_ENTRY], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"gelu": 0, "silu": 0}


def test_curve_difference_is_tight_for_close_pairs():
  """A small ``d`` gives a small difference even where ``z`` is wide (the MVT lines)."""
  zq = (jnp.full(4, -3.0), jnp.full(4, 1.0))
  d = (jnp.full(4, -1e-3), jnp.full(4, 1e-3))
  z = (zq[0] + d[0], zq[1] + d[1])
  lo, hi = nonlinear_diff.curve_diff_interval(G.EXP, z, zq, d)
  assert float(jnp.max(hi)) < 3e-3 and float(jnp.min(lo)) > -3e-3


def test_slopes_outside_the_domain_are_unbounded():
  s_min, s_max = nonlinear_diff.derivative_range(G.RECIPROCAL, jnp.array([-1.0]), jnp.array([1.0]))
  assert float(s_min[0]) == -np.inf and float(s_max[0]) == np.inf
  z, zq, d = (jnp.array([-1.0]), jnp.array([1.0])), (jnp.array([0.5]), jnp.array([1.0])), (jnp.array([-1.5]), jnp.array([0.5]))
  r = nonlinear_diff.curve_diff_relaxation(G.RECIPROCAL, z, zq, d)
  assert all(bool(jnp.all(~jnp.isnan(v))) for v in r)


@functools.partial(jax.jit, static_argnames=("sound",))
def _product(x, xq, dx, y, yq, dy, sound):
  return (nonlinear_diff.product_diff_interval(x, xq, dx, y, yq, dy, sound=sound),
          nonlinear_diff.product_diff_relaxation(x, xq, dx, y, yq, dy, sound=sound))


@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_product_differences_hold_on_random_pairs(sound, data):
  d_scale = data.draw(st.sampled_from([0.0, 1e-5, 0.01, 1.0, 10.0]))
  q_x, d_x = _pair_boxes(data, -10, 10, d_scale)
  q_y, d_y = _pair_boxes(data, -10, 10, d_scale)
  box_x = (q_x[0] + d_x[0], q_x[1] + d_x[1])
  box_y = (q_y[0] + d_y[0], q_y[1] + d_y[1])
  (ilo, ihi), r = _product(_f32(box_x), _f32(q_x), _f32(d_x), _f32(box_y), _f32(q_y), _f32(d_y), sound)
  seed = data.draw(st.integers(0, 99))
  xq, dx = _points(q_x, d_x, seed)
  yq, dy = _points(q_y, d_y, seed + 1)
  yq, dy = yq[::-1], dy[::-1]  # other corners of the box than x's
  h = (xq + dx) * (yq + dy) - xq * yq
  r = [np.asarray(v, np.float64) for v in r]
  plane = r[0] * dx + r[1] * dy + r[2] * xq + r[3] * yq
  scale = 1 + np.abs((xq + dx) * (yq + dy)) + np.abs(r[0] * dx) + np.abs(r[1] * dy) + np.abs(r[2] * xq) + np.abs(r[3] * yq)
  reference = 8 * np.finfo(np.float64).eps * (np.abs((xq + dx) * (yq + dy)) + np.abs(xq * yq))
  tol = reference if sound else 1e-5 * scale
  ilo, ihi = np.asarray(ilo, np.float64), np.asarray(ihi, np.float64)
  assert np.all(ilo <= h + tol) and np.all(h <= ihi + tol)
  assert np.all(plane + r[4] <= h + tol), float(np.max(plane + r[4] - h - tol))
  assert np.all(h <= plane + r[5] + tol), float(np.max(h - plane - r[5] - tol))


class _Block(nn.Module):
  """Layer norm, softmax attention, an exact-GELU MLP and a SiLU: every kind of transformer node."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q, k, v = nn.Dense(4)(h), nn.Dense(4)(h), nn.Dense(4)(h)
    a = jax.nn.softmax(q @ k.T / 2.0, axis=-1)
    x = x + nn.Dense(4)(a @ v)
    x = x + nn.Dense(4)(nn.gelu(nn.Dense(6)(x), approximate=False))
    return nn.Dense(2)(jax.nn.silu(x).mean(0))


def _sampled_errors(f, fq, box, seed):
  xs = jax.random.uniform(jax.random.key(seed), (2000, *box.shape), minval=box.lower, maxval=box.upper)
  return jax.vmap(f)(xs) - jax.vmap(fq)(xs)


@pytest.mark.slow  # 30 s on two cores, mostly compiling; each rule has its own fast test above
def test_certify_diff_on_a_tiny_attention_block_is_sound():
  f, fq, x0 = H.quantized_pair(H.TinyAttention(), shape=(2, 2))
  box = qb.Box(x0 - 0.02, x0 + 0.02)
  cert = qb.certify(f, fq, box, method="diff")
  err = float(jnp.max(jnp.abs(_sampled_errors(f, fq, box, 6))))
  assert np.isfinite(cert.upper) and err <= cert.upper and cert.lower <= cert.upper


@pytest.mark.slow  # minutes on two loaded cores: CROWN's and the differential bounds' steps compile
def test_certify_diff_on_an_attention_block_is_sound_and_tighter():
  """certify(method="diff") holds against sampling, and on a small box (d small beside z) it is
  tighter than CROWN on the merged network, which bounds f and f_q apart."""
  f, fq, x0 = H.quantized_pair(H.Attention())
  for radius in (0.02, 1e-3):
    box = qb.Box(x0 - radius, x0 + radius)
    cert = qb.certify(f, fq, box, method="diff")
    err = float(jnp.max(jnp.abs(_sampled_errors(f, fq, box, 6))))
    assert np.isfinite(cert.upper) and err <= cert.upper
  crown = qb.certify(f, fq, box, method="crown")
  assert cert.upper < crown.upper


@pytest.mark.slow
def test_certify_diff_interval_on_an_attention_block_is_sound():
  f, fq, x0 = H.quantized_pair(H.Attention())
  box = qb.Box(x0 - 0.02, x0 + 0.02)
  cert = qb.certify(f, fq, box, method="diff-interval")
  assert np.isfinite(cert.upper) and float(jnp.max(jnp.abs(_sampled_errors(f, fq, box, 7)))) <= cert.upper


@pytest.mark.slow  # minutes on two loaded cores: every step of a deeper block compiles, twice
@pytest.mark.parametrize("sound", [True, False])
def test_differential_bounds_of_every_node_hold(sound):
  f, fq, x0 = H.quantized_pair(_Block())
  box = qb.Box(x0 - 0.01, x0 + 0.01)
  merged = qb.merge(f, fq, box)
  _, _, d = qb.bounds.diff_bounds(merged.f_graph, merged.fq_graph, box, sound=sound)
  xs = jax.random.uniform(jax.random.key(5), (2000, *box.shape), minval=box.lower, maxval=box.upper)
  values_f = jax.vmap(merged.f_graph.values)(xs)
  values_q = jax.vmap(merged.fq_graph.values)(xs)
  slack = 0 if sound else 1e-5
  for i in range(len(merged.f_graph.nodes)):  # every node's d, not only the output's
    dv = values_f[i] - values_q[i]
    tol = slack * (1 + jnp.abs(values_f[i]))
    assert bool(jnp.all(dv >= d[i][0] - tol) & jnp.all(dv <= d[i][1] + tol)), (i, merged.f_graph.nodes[i].kind)
