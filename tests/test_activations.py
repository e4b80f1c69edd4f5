"""Soundness of every bound method on networks with the newer operations: tanh, sigmoid, leaky ReLU,
hard tanh, abs, max and average pooling.

Each network is compared against its quantized copy; every proven bound must enclose the errors
reached by dense sampling (a grid over a 2-D box, evaluated in float64). Bound propagation
compiles once per network *structure* (weights are arguments), so each test draws its networks
from one structure with different seeds and bit widths; that keeps the suite fast.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.bounds.alpha import crown_alpha_node, diff_alpha_bounds
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds
from qbound.bounds.interval import interval_bounds


class MixedNet(nn.Module):
  """Dense -> [tanh | sigmoid | leaky ReLU | hard tanh | abs] on five pairs of units -> Dense."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(10, bias_init=nn.initializers.normal(0.5))(2 * x)
    h = jnp.concatenate([nn.tanh(h[0:2]), nn.sigmoid(h[2:4]), nn.leaky_relu(h[4:6], 0.1), nn.hard_tanh(h[6:8]),
                         jnp.abs(h[8:10])])
    return nn.Dense(2)(h)


class SmoothNet(nn.Module):
  """Dense -> [tanh | sigmoid] -> Dense: slopes to optimise."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, bias_init=nn.initializers.normal(0.5))(2 * x)
    return nn.Dense(1)(jnp.concatenate([nn.tanh(h[:2]), nn.sigmoid(h[2:])]))


def pooling_net(seed):
  """2 inputs -> a 2x2 image -> tanh -> [2x2 max pool | 2x2 average pool], with lax.reduce_window."""
  rng = np.random.default_rng(seed)
  params = (jnp.asarray(rng.normal(size=(2, 4)) * 2, jnp.float32), jnp.asarray(rng.normal(size=4), jnp.float32))

  def apply(params, x):
    w, b = params
    h = jnp.tanh(x @ w + b).reshape(2, 2, 1)
    biggest = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (2, 2, 1), (2, 2, 1), "VALID")
    mean = jax.lax.reduce_window(h, 0.0, jax.lax.add, (2, 2, 1), (2, 2, 1), "VALID") / 4
    return jnp.concatenate([biggest.reshape(1), mean.reshape(1)])

  return apply, params


BOX = qb.Box(jnp.array([-0.6, -0.2]), jnp.array([0.3, 0.5]))
POOL_BOX = qb.Box(jnp.array([-0.5, -0.1]), jnp.array([0.4, 0.6]))


def pair(model, seed, bits):
  params = model.init(jax.random.key(seed), jnp.zeros(2))
  return (functools.partial(model.apply, params),
          functools.partial(model.apply, qb.quantize.uniform(params, bits=bits)))


def pooling_pair(seed, bits):
  apply, params = pooling_net(seed)
  return functools.partial(apply, params), functools.partial(apply, qb.quantize.uniform(params, bits=bits))


def sampled(merged, box):
  """float64 values of f - f_q on a 61 x 61 grid over the 2-D box (corners included)."""
  return H.eval64(merged, H.grid(box, 61))


def assert_encloses(lower, upper, values, label):
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  assert np.all(lower <= values), f"{label}: a sampled error {values.min()} is below the bound {lower.min()}"
  assert np.all(values <= upper), f"{label}: a sampled error {values.max()} is above the bound {upper.max()}"


def check_methods(f, fq, box, label, methods=("interval", "crown", "diff-interval", "diff")):
  """The bound methods (called as :func:`qbound.certify` calls them, to share its compilations)
  enclose the samples; returns the max-abs bound of each."""
  merged = qb.merge(f, fq, box)
  assert merged.paired
  values = sampled(merged, box)
  fg, qg, out_f = merged.f_graph, merged.fq_graph, merged.f_graph.output
  compute = {
      "interval": lambda: interval_bounds(merged.graph, box, True)[merged.graph.output],
      "crown": lambda: crown_bounds(merged.graph, box, None, True)[merged.graph.output],
      "diff-interval": lambda: diff_bounds(fg, qg, box, None, True, False)[2][out_f],
      "diff": lambda: diff_bounds(fg, qg, box, None, True, True)[2][out_f],
  }
  widths = {}
  for method in methods:
    lo, hi = compute[method]()
    assert_encloses(lo, hi, values, f"{label} {method}")
    widths[method] = float(np.max(np.maximum(-np.asarray(lo), np.asarray(hi))))
  return widths, values


@pytest.mark.parametrize("seed, bits", [(0, 8), (1, 4), (2, 6)])
def test_every_bound_method_is_sound_on_mixed_activations(seed, bits):
  widths, values = check_methods(*pair(MixedNet(), seed, bits), BOX, f"mixed seed {seed} {bits} bits")
  reached = np.max(np.abs(values))
  assert widths["diff"] <= widths["crown"] and widths["diff"] <= widths["diff-interval"] * (1 + 1e-6)
  assert widths["diff"] < 20 * reached  # the differential bounds follow the small error, not f's range


@pytest.mark.parametrize("seed, bits", [(0, 8), (3, 5), (4, 3)])
def test_interval_and_crown_are_sound_with_pooling(seed, bits):
  check_methods(*pooling_pair(seed, bits), POOL_BOX, f"pooling seed {seed} {bits} bits", methods=("interval", "crown"))


@pytest.mark.slow
@pytest.mark.parametrize("seed, bits", [(0, 8), (3, 5), (4, 3)])
def test_differential_bounds_are_sound_with_pooling(seed, bits):
  """Max pooling is a tree of ``a + relu(b - a)``: the differential ReLU rules apply (compiles ~30 s)."""
  check_methods(*pooling_pair(seed, bits), POOL_BOX, f"pooling seed {seed} {bits} bits",
                methods=("diff-interval", "diff"))


# (0, 6) takes ~18 s on 2 loaded cores: with -m slow; the other two cover the same slopes.
@pytest.mark.parametrize("seed, bits", [pytest.param(0, 6, marks=pytest.mark.slow), (1, 3), (2, 8)])
def test_optimised_differential_slopes_are_sound(seed, bits):
  """``certify(method="alpha")`` on paired networks: differential bounds with optimised tanh and
  sigmoid slopes (and their mean-value lines)."""
  f, fq = pair(SmoothNet(), seed, bits)
  merged = qb.merge(f, fq, BOX)
  _, _, d = diff_alpha_bounds(merged.f_graph, merged.fq_graph, BOX, steps=8)
  assert_encloses(*d[merged.f_graph.output], sampled(merged, BOX), "diff alpha")


@pytest.mark.slow
@pytest.mark.parametrize("seed, bits", [(0, 6), (1, 3)])
def test_optimised_slopes_are_sound_and_never_looser(seed, bits):
  """alpha-CROWN on the merged network, and the optimised differential bounds against the defaults."""
  f, fq = pair(SmoothNet(), seed, bits)
  merged = qb.merge(f, fq, BOX)
  values = sampled(merged, BOX)
  graph = merged.graph
  bounds = crown_bounds(graph, BOX, None, True)
  lo, hi = crown_alpha_node(graph, graph.output, bounds, BOX, steps=8, sound=True)
  assert_encloses(lo, hi, values, "crown alpha")
  _, _, d = diff_alpha_bounds(merged.f_graph, merged.fq_graph, BOX, steps=8)
  _, _, d0 = diff_bounds(merged.f_graph, merged.fq_graph, BOX, None, True, True)  # the default slopes
  out = merged.f_graph.output
  assert_encloses(*d[out], values, "diff alpha")
  # The optimisation starts from the default slopes and keeps the best bound per row.
  assert np.all(np.asarray(d[out][1]) <= np.asarray(d0[out][1]) + 1e-6)
  assert np.all(np.asarray(d[out][0]) >= np.asarray(d0[out][0]) - 1e-6)


@pytest.mark.parametrize("seed, bits", [(4, 8), (5, 3)])
def test_certify_auto_is_sound_on_mixed_activations(seed, bits):
  """``auto``: no MILP for tanh and sigmoid. It stops at a gap of 10 here, after the one-shot bounds
  and sampling (the optimised and branch-and-bound stages are what the slow tests add)."""
  f, fq = pair(MixedNet(), seed, bits)
  with jax.numpy_dtype_promotion("standard"):
    cert = qb.certify(f, fq, BOX, search=H.search(), time_budget=5, target_gap=10.0)
  values = sampled(qb.merge(f, fq, BOX), BOX)
  assert np.max(np.abs(values)) <= cert.upper
  assert cert.lower <= cert.upper
  assert not any(name.startswith("milp") for name in cert.bounds)


def test_exact_milp_names_the_activation_it_cannot_encode():
  f, fq = pair(MixedNet(), 0, 8)
  with pytest.raises(ValueError, match=r"node \d+ is 'tanh'.*qbound.certify"):
    qb.exact.milp(f, fq, BOX)


def test_unsound_mode_stays_within_sound_mode():
  """sound=False drops the margins (including tanh's): never looser, and close."""
  f, fq = pair(MixedNet(), 6, 8)
  merged = qb.merge(f, fq, BOX)
  sound = crown_bounds(merged.graph, BOX, None, True)[merged.graph.output]
  loose = crown_bounds(merged.graph, BOX, None, False)[merged.graph.output]
  assert np.all(np.asarray(sound[0]) <= np.asarray(loose[0])) and np.all(np.asarray(loose[1]) <= np.asarray(sound[1]))
  np.testing.assert_allclose(loose[1], sound[1], rtol=1e-3, atol=1e-4)


def test_abs_is_bounded_at_least_zero_and_crown_upper_is_the_chord():
  """|x| as relu(x) + relu(-x): interval and CROWN bounds never go below 0 (the generic -x + relu(2x)
  gave [-1, 3] over [-1, 1]), CROWN's upper is the chord, and 1 / (1 + |x W|) is bounded (its
  denominator was taken as possibly 0)."""
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  w = jnp.array([[1.0, -2.0], [0.5, 1.0]])
  for bound in (qb.bounds.interval, qb.bounds.crown):
    out = bound(lambda x: jnp.abs(x @ w), box)
    assert np.all(np.asarray(out.lower) >= -1e-30)
  crown = qb.bounds.crown(lambda x: jnp.abs(2.0 * x), box)
  assert np.all(np.asarray(crown.upper) <= 2.0 + 1e-4)
  g = lambda x: x / (1.0 + jnp.abs(x @ w))  # noqa: E731
  out = qb.bounds.crown(g, box)
  xs = np.random.default_rng(0).uniform(-1, 1, (4000, 2)).astype(np.float32)
  values = np.asarray(jax.vmap(g)(jnp.asarray(xs)))
  assert np.all(values >= np.asarray(out.lower) - 1e-6) and np.all(values <= np.asarray(out.upper) + 1e-6)
