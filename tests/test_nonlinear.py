"""Products of two values and smooth curves (exp, x^2, 1/x, rsqrt, sqrt, erfc, SiLU): their interval
bounds and linear relaxations hold at sampled points of random intervals (float64 reference values),
in sound and float32 mode, including points, tiny, huge and domain-crossing intervals; the tracer
writes softmax, layer norm, RMS norm, GELU, SiLU and attention with them; certify on a tiny
attention block is sound, and the methods without rules for them (milp, forward differential
bounds) name the layer they cannot bound."""

from __future__ import annotations

import functools

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
from qbound.bounds import nonlinear
from qbound.errors import UnsupportedLayerError

N = 64  # intervals per example (one compilation per kind)

REFERENCE = {  # float64 values
    G.SQUARE: np.square, G.EXP: np.exp, G.RECIPROCAL: lambda x: 1 / x, G.RSQRT: lambda x: 1 / np.sqrt(x),
    G.SQRT: np.sqrt, G.ERFC: scipy.special.erfc, G.SILU: lambda x: x / (1 + np.exp(-x)),
    G.GELU: lambda x: x * scipy.special.expit(2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)),
}
# Where each kind's random intervals live: (lowest, highest) of the interval ends.
RANGES = {G.SQUARE: (-30, 30), G.EXP: (-30, 30), G.RECIPROCAL: (0.01, 50), G.RSQRT: (1e-4, 50), G.SQRT: (0, 50),
          G.ERFC: (-6, 6), G.SILU: (-30, 30), G.GELU: (-30, 30)}


@functools.partial(jax.jit, static_argnames=("kind", "sound"))
def _curve(kind, lo, hi, sound):
  return nonlinear.curve_interval(kind, lo, hi, sound=sound), nonlinear.curve_relaxation(kind, lo, hi, sound=sound)


def _check_curve(kind, lo, hi, sound, seed=0):
  lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
  (ilo, ihi), r = _curve(kind, jnp.asarray(lo), jnp.asarray(hi), sound)
  ilo, ihi = np.asarray(ilo, np.float64), np.asarray(ihi, np.float64)
  r = [np.asarray(v, np.float64) for v in r]
  rng = np.random.default_rng(seed)
  t = np.concatenate([np.zeros((1, lo.size)), np.ones((1, lo.size)), rng.uniform(size=(60, lo.size))])
  x = lo.astype(np.float64) + t * (hi.astype(np.float64) - lo)
  y = REFERENCE[kind](x)
  # Float32 mode has no margins: allow its rounding (a few ulps of the values involved).
  tol = 0 if sound else 1e-5 * (1 + np.abs(y) + np.abs(r[0] * x) + np.abs(r[2] * x))
  assert np.all(ilo <= y + tol) and np.all(y <= ihi + tol), kind
  below = r[0] * x + r[1] - y
  above = y - (r[2] * x + r[3])
  assert np.all(below <= tol), (kind, float(np.max(below - tol)), lo[np.argmax(np.max(below - tol, 0))])
  assert np.all(above <= tol), (kind, float(np.max(above - tol)), lo[np.argmax(np.max(above - tol, 0))])
  assert np.all(np.isfinite(r[1])) and np.all(np.isfinite(r[3]))
  return r


def _intervals(kind, data, scale):
  low, high = RANGES[kind]
  a = np.asarray(data.draw(st.lists(st.floats(low, high), min_size=N, max_size=N)))
  w = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=N, max_size=N))) * scale
  return a, np.minimum(a + w, high)


@pytest.mark.parametrize("kind", sorted(REFERENCE))
@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_curve_lines_hold_on_random_intervals(kind, sound, data):
  scale = data.draw(st.sampled_from([0.0, 1e-6, 0.01, 1.0, 10.0]))
  _check_curve(kind, *_intervals(kind, data, scale), sound)


@pytest.mark.parametrize("kind", sorted(REFERENCE))
def test_curve_extreme_intervals(kind):
  low, high = RANGES[kind]
  mid = (low + high) / 2
  lo = np.array([low, high, mid, mid, low, mid, low] + [mid] * (N - 7), np.float32)
  hi = np.array([low, high, mid, np.nextafter(np.float32(mid), np.float32(np.inf)), high, mid + 1e-7, low + 1e-3]
                + [mid] * (N - 7), np.float32)
  _check_curve(kind, lo, hi, True)


def test_exp_overflow_gives_infinite_but_valid_bounds():
  lo, hi = jnp.full(N, 80.0), jnp.full(N, 100.0)
  (ilo, ihi), r = _curve(G.EXP, lo, hi, True)
  assert np.all(np.asarray(ihi) == np.inf) and np.all(np.asarray(ilo) <= np.exp(80.0))
  assert not np.any(np.isnan(np.asarray(r.lower_offset))) and not np.any(np.isnan(np.asarray(r.upper_offset)))


@pytest.mark.parametrize("kind", [G.RECIPROCAL, G.RSQRT, G.SQRT])
def test_outside_the_domain_is_the_real_line(kind):
  lo, hi = jnp.full(N, -1.0), jnp.full(N, 2.0)
  (ilo, ihi), r = _curve(kind, lo, hi, True)
  assert np.all(np.asarray(ilo) == -np.inf) and np.all(np.asarray(ihi) == np.inf)
  assert np.all(np.asarray(r.lower_slope) == 0) and np.all(np.asarray(r.upper_offset) == np.inf)


def test_negative_reciprocal():
  lo = -np.geomspace(50, 0.01, N).astype(np.float32)
  _check_curve(G.RECIPROCAL, lo, lo * np.float32(0.5), True)


def test_reciprocal_around_zero_names_the_layer():
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  with pytest.raises(ValueError, match="reciprocal.*may be 0"):
    qb.bounds.crown(lambda x: 1 / (x + 0.5), box)


@functools.partial(jax.jit, static_argnames=("sound",))
def _product(xl, xu, yl, yu, sound):
  return (nonlinear.product_interval((xl, xu), (yl, yu), sound=sound),
          nonlinear.product_relaxation((xl, xu), (yl, yu), sound=sound))


@pytest.mark.parametrize("sound", [True, False])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_product_planes_hold_on_random_boxes(sound, data):
  def ends(scale):
    a = np.asarray(data.draw(st.lists(st.floats(-100, 100), min_size=N, max_size=N)), np.float32)
    w = np.asarray(data.draw(st.lists(st.floats(0, 1), min_size=N, max_size=N)), np.float32) * scale
    return a, a + w

  scale = data.draw(st.sampled_from([0.0, 1e-5, 0.1, 10.0, 1000.0]))
  (xl, xu), (yl, yu) = ends(scale), ends(data.draw(st.sampled_from([0.0, 1.0, 100.0])))
  (ilo, ihi), r = _product(*(jnp.asarray(v) for v in (xl, xu, yl, yu)), sound)
  rng = np.random.default_rng(0)
  f64 = lambda v: np.asarray(v, np.float64)
  for tx, ty in [(0, 0), (0, 1), (1, 0), (1, 1)] + [tuple(rng.uniform(size=2)) for _ in range(30)]:
    x = f64(xl) + tx * (f64(xu) - f64(xl))
    y = f64(yl) + ty * (f64(yu) - f64(yl))
    z = x * y
    plane = f64(r.x_slope) * x + f64(r.y_slope) * y
    tol = 0 if sound else 1e-5 * (1 + np.abs(z) + np.abs(plane))
    assert np.all(f64(ilo) <= z + tol) and np.all(z <= f64(ihi) + tol)
    assert np.all(plane + f64(r.lower_offset) <= z + tol) and np.all(z <= plane + f64(r.upper_offset) + tol)


# --- tracing and end to end ---------------------------------------------------------------------

X0 = jax.random.normal(jax.random.key(0), (4, 8))
_LN = nn.LayerNorm()
_LN_P = _LN.init(jax.random.key(1), X0)
_RN = nn.RMSNorm()
_RN_P = _RN.init(jax.random.key(1), X0)

LAYERS = {
    "softmax": (lambda x: jax.nn.softmax(x, axis=-1), {G.EXP, G.RECIPROCAL}),
    "layer norm": (lambda x: _LN.apply(_LN_P, x), {G.SQUARE, G.RSQRT, G.MUL}),
    "rms norm": (lambda x: _RN.apply(_RN_P, x), {G.SQUARE, G.RSQRT, G.MUL}),
    "gelu (tanh)": (jax.nn.gelu, {G.GELU}),
    "gelu (erf)": (lambda x: jax.nn.gelu(x, approximate=False), {G.ERFC, G.MUL}),
    "silu": (jax.nn.silu, {G.SILU}),
    "attention": (lambda x: jax.nn.softmax(x @ x.T / 3, axis=-1) @ x, {G.EXP, G.RECIPROCAL, G.MUL}),
    "division": (lambda x: x / (2 + jnp.sin(0) + x * x), {G.SQUARE, G.RECIPROCAL, G.MUL}),
    "sqrt": (lambda x: jnp.sqrt(1 + x * x), {G.SQUARE, G.SQRT}),
    "erf": (jax.scipy.special.erf, {G.ERFC}),
}


# attention (~14 s) runs with -m slow: test_certify_attention_block_is_sound certifies a whole block.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "attention" else n for n in sorted(LAYERS)])
def test_layers_trace_and_bound(name):
  fn, kinds = LAYERS[name]
  box = qb.Box(X0 - 0.1, X0 + 0.1)
  graph = qb.trace(fn, box)
  assert kinds <= {n.kind for n in graph.nodes}
  out = qb.bounds.crown(fn, box)  # spot-checks its own result
  xs = jax.random.uniform(jax.random.key(2), (300, *X0.shape), minval=box.lower, maxval=box.upper)
  ys = jax.vmap(fn)(xs)
  assert bool(jnp.all(ys >= out.lower) & jnp.all(ys <= out.upper))
  ib = qb.bounds.interval(fn, box)
  assert bool(jnp.all(ys >= ib.lower) & jnp.all(ys <= ib.upper))


@pytest.fixture(scope="module")
def attention_pair():
  f, fq, x0 = H.quantized_pair(H.Attention())
  return f, fq, qb.Box(x0 - 0.02, x0 + 0.02)


@pytest.fixture(scope="module")
def tiny_attention_pair():
  f, fq, x0 = H.quantized_pair(H.TinyAttention(), shape=(2, 2))
  return f, fq, qb.Box(x0 - 0.02, x0 + 0.02)


# The larger block's CROWN steps take ~35 s to compile on two cores: the default run certifies the
# tiny block (layer norm, softmax attention, products), -m slow the larger one with its GELU MLP.
@pytest.mark.parametrize("pair", ["tiny_attention_pair", pytest.param("attention_pair", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["crown", "auto", "bab", pytest.param("alpha", marks=pytest.mark.slow)])
def test_certify_attention_block_is_sound(request, pair, method):
  f, fq, box = request.getfixturevalue(pair)
  if method == "auto":
    # auto's 3 s reach CROWN's bound once CROWN's steps are compiled (a first call spends them
    # compiling): compiled here, whatever ran before in this worker (the crown case, if it did).
    qb.certify(f, fq, box, method="crown", time_budget=60.0)
  cert = qb.certify(f, fq, box, method=method, time_budget=3.0)
  assert np.isfinite(cert.upper) and cert.lower <= cert.upper
  assert "crown" in cert.bounds or method in ("bab", "alpha")
  xs = jax.random.uniform(jax.random.key(5), (2000, *box.shape), minval=box.lower, maxval=box.upper)
  err = jnp.max(jnp.abs(jax.vmap(f)(xs) - jax.vmap(fq)(xs)))
  assert float(err) <= cert.upper


@pytest.mark.parametrize("method", ["milp"])  # diff and diff-interval have rules: tests/test_nonlinear_diff.py
def test_other_methods_name_the_layer(attention_pair, method):
  f, fq, box = attention_pair
  with pytest.raises(UnsupportedLayerError, match="square|mul|exp|rsqrt"):
    qb.certify(f, fq, box, method=method)


def test_differential_functions_name_the_layer(attention_pair):
  f, fq, box = attention_pair
  for fn in (qb.bounds.forward_diff,):  # qb.bounds.diff has rules for them (qbound.bounds.nonlinear_diff)
    with pytest.raises(UnsupportedLayerError, match="helpers.py|normalization"):
      fn(f, fq, box)


def test_gelu_is_one_curve_only_for_its_own_constants():
  kinds = lambda fn, x=jnp.zeros(3): [n.kind for n in qb.trace(fn, x).nodes]
  assert kinds(jax.nn.gelu) == ["input", G.GELU]
  assert kinds(jax.jit(lambda x: 2 * jax.nn.gelu(x - 1)))[-2] == G.GELU
  # Another cube coefficient is another function: the pieces stay.
  assert G.GELU not in kinds(lambda x: x * (0.5 * (1 + jnp.tanh(0.7978846 * (x + 0.05 * x ** 3)))))
  assert G.GELU not in kinds(lambda x: jax.nn.gelu(x, approximate=False))
  with jax.enable_x64(True):
    assert kinds(jax.nn.gelu, jnp.zeros(3, jnp.float64)) == ["input", G.GELU]
  x = jnp.linspace(-12, 12, 2001)
  assert bool(jnp.all(qb.trace(jax.nn.gelu, x)(x) == jax.nn.gelu(x)))


@pytest.mark.slow  # (10 s: a tightness comparison; the curve's soundness is tested above)
def test_gelu_curve_is_tighter_than_its_pieces():
  w1, w2 = jax.random.normal(jax.random.key(0), (4, 16)), jax.random.normal(jax.random.key(1), (16, 3))
  pieces = lambda x: x * (0.5 * (1 + jnp.tanh(0.7978846 * (x + 0.0447149 * x ** 3))))
  box = qb.Box(-0.3 * jnp.ones(4), 0.3 * jnp.ones(4))
  one = qb.bounds.crown(lambda x: jax.nn.gelu(x @ w1) @ w2, box)
  split = qb.bounds.crown(lambda x: pieces(x @ w1) @ w2, box)
  xs = jax.random.uniform(jax.random.key(2), (2000, 4), minval=-0.3, maxval=0.3)
  ys = jax.nn.gelu(xs @ w1) @ w2
  assert bool(jnp.all((one.lower <= ys) & (ys <= one.upper)))
  assert float(jnp.sum(one.upper - one.lower)) < 0.8 * float(jnp.sum(split.upper - split.lower))


def test_softmax_interval_bounds_stay_within_zero_and_one():
  """softmax(s)_i = 1 / sum_j exp(s_j - s_i): interval bounds of s_i - s_i could not see that it is 0,
  and the reciprocal's upper bound reached 1e11 on a 6-8-4 MLP; the diagonal is exactly 0 now."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.softmax(nn.Dense(4)(nn.relu(nn.Dense(8)(x))))

  net = Net()
  params = net.init(jax.random.key(0), jnp.zeros(6))
  f = functools.partial(net.apply, params)
  box = qb.Box(-jnp.ones(6), jnp.ones(6))
  xs = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2000, 6)), jnp.float32)
  values = np.asarray(jax.vmap(f)(xs))
  for bound in (qb.bounds.interval, qb.bounds.crown):
    out = bound(f, box)
    assert np.all(np.asarray(out.upper) <= 1.0 + 1e-4) and np.all(np.asarray(out.lower) >= 0.0)
    assert np.all(values >= np.asarray(out.lower)) and np.all(values <= np.asarray(out.upper))
