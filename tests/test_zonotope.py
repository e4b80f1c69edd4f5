"""Soundness of differential zonotopes (qbound.bounds.zonotope).

The property: every node's bounds of f (``z``), f_q (``z_q``) and their difference (``d``) hold the
float64 values at dense samples, corners and the centre of the box, and the output's bound on
``|f - f_q|`` is at least the exact maximal error the MILP finds. Pairs range from close copies
(quantized) to copies whose weights differ by several times their size (noise of 1-3 times the
largest weight, or two independent initialisations), in sound mode (proven float margins: no
tolerance) and without margins (a small relative tolerance). Random nets use the shapes of
``helpers.SHAPES`` so that compilations are shared.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
import qbound as qb
from qbound.bounds import zonotope
from qbound.errors import UnsupportedLayerError
from qbound.exact import milp

SHAPE = helpers.SHAPES[0]  # 2 inputs, two hidden layers of 8, 2 outputs
DEEP = helpers.SHAPES[1]  # 3 inputs, three hidden layers of 6, 2 outputs


def pair(seed: int, shape=SHAPE, *, noise=None, bits=None, independent=False, init_scale=1.0):
  """``(merged, box)`` for a random pair: quantized (``bits``), perturbed (``noise`` times the
  largest weight) or two independent initialisations of the same architecture."""
  if independent:
    f, _, _, _ = helpers.random_pair(seed, shape, bits=8, init_scale=init_scale)
    fq, _, _, _ = helpers.random_pair(seed + 1000, shape, bits=8, init_scale=init_scale)
  else:
    f, fq, _, _ = helpers.random_pair(seed, shape, bits=bits, noise=noise, init_scale=init_scale)
  box = helpers.random_box(seed, shape[0])
  return qb.merge(f, fq, box), box


def violations(merged, box, out, sound: bool, points: int = 4000) -> list:
  """Where a node's bounds leave its float64 values at samples of the box (none for sound ones;
  ``sound=False``: beyond 1e-4 of the values' scale)."""
  xs = helpers.sample_points(box, points)
  vz = helpers.node_values64(merged.f_graph, xs)
  vq = helpers.node_values64(merged.fq_graph, xs)
  found = []
  for name, bounds, values in (("z", out.z, vz), ("zq", out.zq, vq), ("d", out.d, [a - b for a, b in zip(vz, vq)])):
    for i, ((lo, hi), v) in enumerate(zip(bounds, values)):
      lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
      tol = 0.0 if sound else 1e-4 * (1 + np.max(np.abs(v)))
      below, above = np.max(lo - v), np.max(v - hi)
      if below > tol or above > tol:
        found.append(f"{name}[{i}] ({merged.f_graph.nodes[i].kind}): out by {max(below, above):.3g}")
  return found


def bounds(merged, box, sound=True):
  return zonotope._jitted(merged.f_graph, merged.fq_graph, box, sound=sound)


@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("kind", ["quantized", "noise", "independent"])
def test_every_node_holds_the_sampled_values(kind, sound):
  """f, f_q and d at every node hold the float64 values at 4,000 samples, corners and centre,
  for close and far-apart copies."""
  settings_ = dict(quantized=dict(bits=4), noise=dict(noise=1.5), independent=dict(independent=True))[kind]
  for seed in range(3):
    merged, box = pair(seed, **settings_)
    out = bounds(merged, box, sound)
    assert not violations(merged, box, out, sound), (kind, seed, violations(merged, box, out, sound))


@pytest.mark.slow  # 10 s; the random-pair soundness tests above stay
def test_large_weight_differences_on_a_deeper_net():
  """Three hidden layers, noise of three times the largest weight, larger weights (more unstable
  ReLUs) and wide boxes: every node still holds its values."""
  for seed in range(3):
    merged, box = pair(seed, DEEP, noise=3.0, init_scale=2.0)
    out = bounds(merged, box)
    assert not violations(merged, box, out, True)


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), noise=st.sampled_from([0.01, 0.3, 1.0, 3.0]),
       radius=st.sampled_from([(1e-3, 1e-2), (0.05, 1.0), (1.0, 4.0)]), init_scale=st.sampled_from([0.5, 1.0, 3.0]))
def test_property_sound_on_random_pairs_and_boxes(seed, noise, radius, init_scale):
  """Property: for any perturbed pair and box (thin, ordinary, wide), sound bounds hold every
  sampled value at every node."""
  f, fq, _, _ = helpers.random_pair(seed, SHAPE, noise=noise, init_scale=init_scale)
  box = helpers.random_box(seed, SHAPE[0], radius=radius)
  merged = qb.merge(f, fq, box)
  out = bounds(merged, box)
  assert not violations(merged, box, out, True, points=1000)


@pytest.mark.parametrize("seed", range(4))
def test_bound_is_at_least_the_exact_maximal_error(seed):
  """On tiny ReLU pairs far apart, the output bound on ``max |f - f_q|`` is at least the MILP's
  exact value (float64, optimal)."""
  merged, box = pair(seed, SHAPE, noise=1.0 if seed % 2 else None, bits=3 if seed % 2 == 0 else None)
  out = bounds(merged, box)
  upper = float(np.max(np.maximum(-np.asarray(out.lower, np.float64), np.asarray(out.upper, np.float64))))
  exact = milp(merged, box=box, time_limit=20)
  assert exact.optimal
  assert upper >= exact.value, (upper, exact.value)
  assert upper < 1e3 * exact.value + 1.0  # and not vacuous


# keep=3 (~10 s, other shapes to compile) runs with -m slow; keep=1 covers the same reduction.
@pytest.mark.parametrize("keep", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_order_reduction_stays_sound(keep):
  """Only the ``keep`` widest fresh generators per layer kept, the others boxed into the interval
  term: still every node's values, on a deeper net far from its copy."""
  for seed in range(3):
    merged, box = pair(seed, DEEP, noise=2.0, init_scale=2.0)
    out = zonotope.diff_zonotope_batch(merged.f_graph, merged.fq_graph, box.lower[None], box.upper[None], keep=keep)
    out = jax.tree_util.tree_map(lambda a: a[0], out)
    assert not violations(merged, box, out, True)


class ClipMLP(nn.Module):
  """Dense -> clip(lo, hi) -> Dense -> clip -> Dense: relu6 and narrower clips."""

  cut: tuple

  @nn.compact
  def __call__(self, x):
    for width in (8, 8):
      x = jnp.clip(nn.Dense(width)(x), *self.cut)
    return nn.Dense(2)(x)


@pytest.mark.parametrize("cut_q", [(0.0, 6.0), (0.0, 0.5), (-0.25, 1.0)])
def test_clips_with_other_cuts(cut_q):
  """Clips (relu6 in f) against f_q's clips at the same or other cuts and other weights: sound."""
  model_f, model_q = ClipMLP((0.0, 6.0)), ClipMLP(cut_q)
  params = model_f.init(jax.random.key(0), jnp.zeros(2))
  qparams = helpers.perturb(params, jax.random.key(1), 0.5)
  f = functools.partial(model_f.apply, jax.tree_util.tree_map(lambda w: 3 * w, params))
  fq = functools.partial(model_q.apply, jax.tree_util.tree_map(lambda w: 3 * w, qparams))
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  assert [n.kind for n in merged.f_graph.nodes].count("clip") == 2
  out = bounds(merged, box)
  assert not violations(merged, box, out, True)


def test_batched_equals_one_piece_at_a_time():
  merged, box = pair(0, noise=1.0)
  lo = jnp.stack([box.lower, box.lower, (box.lower + box.upper) / 2])
  hi = jnp.stack([box.upper, (box.lower + box.upper) / 2, box.upper])
  batch = zonotope.diff_zonotope_batch(merged.f_graph, merged.fq_graph, lo, hi)
  for k in range(3):
    one = bounds(merged, qb.Box(lo[k], hi[k]))
    np.testing.assert_allclose(batch.lower[k], one.lower, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batch.upper[k], one.upper, rtol=1e-5, atol=1e-6)
  assert batch.influence.shape == (3, 2, 2)
  assert np.all(np.asarray(batch.influence) >= 0)


def test_close_copy_is_tight_and_stable_neurons_exact():
  """A copy that differs by 1e-4 of the largest weight, on a small box: the bound is within a few
  times the sampled error (the domain keeps f and f_q correlated)."""
  merged, box = pair(3, noise=1e-4)
  box = qb.Box(box.center - 0.01, box.center + 0.01)
  out = bounds(merged, box)
  upper = float(np.max(np.maximum(-np.asarray(out.lower), np.asarray(out.upper))))
  reached = helpers.max_error(merged, helpers.sample_points(box, 2000))
  assert reached <= upper <= 3 * reached + 1e-6


def test_public_function_and_unsupported_layers():
  merged, box = pair(1, noise=0.5)
  out = zonotope.diff_zonotope(merged, box=box)
  assert out.lower.shape == (2,)
  f = lambda x: jnp.tanh(x @ jnp.ones((2, 3)))
  with pytest.raises(UnsupportedLayerError, match="'tanh'"):
    zonotope.diff_zonotope(f, f, qb.Box(-jnp.ones(2), jnp.ones(2)))


@pytest.mark.parametrize("seed", range(4))
def test_rounding_dominated_boxes_stay_sound(seed):
  """Far from the origin on a thin box, with a close copy: the float32 rounding of the centres is
  comparable to the box's width, so only the sound margins keep the bounds around the float64
  values (without them the output's bounds miss them by up to 4e-4 on three of these four seeds)."""
  f, fq, _, _ = helpers.random_pair(seed, SHAPE, noise=1e-4, init_scale=3.0)
  centre = jnp.asarray(np.random.default_rng(seed).uniform(100, 300, SHAPE[0]), jnp.float32)
  box = qb.Box(centre - 1e-4, centre + 1e-4)
  merged = qb.merge(f, fq, box)
  out = bounds(merged, box)
  assert not violations(merged, box, out, True)
