"""NeuroDiff's ReLU rules for the forward pass (qbound.bounds.neurodiff_rules, relu_rules="equation"
of qbound.bounds.forward) and the interval-gradient split rule of qbound.bounds.forward_bab: every
line and bound holds at sampled points, in float32 and in sound mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.bounds import forward as F
from qbound.bounds import neurodiff_rules as N
from qbound.bounds.splitting import gradient_supported, interval_gradient


@pytest.mark.parametrize("sound", [True, False])
def test_difference_lines_hold_in_every_case(sound):
  """With inputs ``x = (z, zq)`` the three functions are exact (``z = x0``, ``zq = x1``,
  ``d = x0 - x1``), so the lines must bound ``relu(x0) - relu(x1)`` at every sampled point; the
  random boxes cover all nine pairs of neuron states."""
  rng = np.random.default_rng(0)
  n = 4000
  centre = rng.uniform(-1, 1, (n, 2))
  radius = rng.uniform(0, 1, (n, 2)) * rng.choice([0.01, 1.0], (n, 1))
  lo, hi = (centre - radius).astype(np.float32), (centre + radius).astype(np.float32)
  z, zq = (lo[:, 0], hi[:, 0]), (lo[:, 1], hi[:, 1])
  d = (lo[:, 0] - hi[:, 1], hi[:, 0] - lo[:, 1])
  exact = lambda a, b: N.EquationRanges(jnp.asarray(a), jnp.asarray(b), jnp.asarray(a), jnp.asarray(b))
  lines = N.relu_diff_lines(tuple(map(jnp.asarray, z)), tuple(map(jnp.asarray, zq)), tuple(map(jnp.asarray, d)),
                            exact(*z), exact(*zq), exact(*d), sound=sound)
  a_z, a_q, a_d, a_0, b_z, b_q, b_d, b_0 = (np.asarray(v, np.float64) for v in lines)
  states = {(s, t) for s, t in zip(np.sign(np.clip(lo[:, 0], 0, None)) - (hi[:, 0] <= 0),
                                   np.sign(np.clip(lo[:, 1], 0, None)) - (hi[:, 1] <= 0))}
  assert len(states) == 9
  for u in rng.uniform(0, 1, (64, 2)):
    x = lo.astype(np.float64) + u * (hi - lo).astype(np.float64)
    h = np.maximum(x[:, 0], 0) - np.maximum(x[:, 1], 0)
    dx = x[:, 0] - x[:, 1]
    lower = a_z * x[:, 0] + a_q * x[:, 1] + a_d * dx + a_0
    upper = b_z * x[:, 0] + b_q * x[:, 1] + b_d * dx + b_0
    assert np.all(lower <= h + 1e-6) and np.all(h <= upper + 1e-6)


@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("seed, bits, noise", [(0, 3, None), (1, 6, None), (2, None, 0.05), (3, None, 0.3)])
def test_equation_rules_are_sound_against_sampling(seed, bits, noise, sound):
  """Node and output bounds of the forward pass with NeuroDiff's rules hold at float64 samples,
  on boxes wide (many unstable neurons) and narrow."""
  shape = H.SHAPES[1]
  f, fq, _, _ = H.random_pair(seed, shape, bits=bits, noise=noise, init_scale=2.0)
  radii = [(0.5, 1.0), (0.05, 0.3), (0.01, 0.05)]
  boxes = [H.random_box(seed * 10 + k, shape[0], radius=r) for k, r in enumerate(radii)]
  merged = qb.merge(f, fq, boxes[0])
  lower = jnp.stack([b.lower for b in boxes])
  upper = jnp.stack([b.upper for b in boxes])
  out = F.forward_diff_batch(merged.f_graph, merged.fq_graph, lower, upper, sound=sound, relu_rules="equation")
  dlo, dhi = (np.asarray(v, np.float64) for v in out.d[merged.f_graph.output])
  for k, box in enumerate(boxes):
    values = H.eval64(merged, H.sample_points(box, 2000, seed=k))
    slack = 1e-6 if sound else 1e-5  # float32 without margins may miss by rounding
    assert np.all(values >= dlo[k] - slack) and np.all(values <= dhi[k] + slack)
    # f's own node bounds hold too (z at the output node)
    zlo, zhi = (np.asarray(v, np.float64)[k] for v in out.z[merged.f_graph.output])
    fv = H.eval64(merged.f_graph, H.sample_points(box, 500, seed=k))
    assert np.all(fv >= zlo - slack) and np.all(fv <= zhi + slack)


def test_unknown_rules_are_refused():
  f, fq, _, _ = H.random_pair(0, H.SHAPES[0])
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  with pytest.raises(ValueError, match="relu_rules"):
    F.forward_diff_bounds(merged.f_graph, merged.fq_graph, box, relu_rules="neurify")


@pytest.mark.parametrize("seed", [0, 1])
def test_interval_gradient_encloses_the_gradient(seed):
  """The interval gradient of f - f_q over a box contains the autodiff gradient at sampled points."""
  shape = H.SHAPES[2]
  f, fq, _, _ = H.random_pair(seed, shape, bits=4)
  box = H.random_box(seed, shape[0], radius=(0.1, 0.4))
  merged = qb.merge(f, fq, box)
  fg, qg = merged.f_graph, merged.fq_graph
  assert gradient_supported(fg, qg)
  bounds = F.forward_diff_bounds(fg, qg, box, sound=True)
  outputs = (0, 2)
  centre, radius = (np.asarray(v, np.float64) for v in interval_gradient(fg, qg, bounds.z, bounds.zq, outputs))
  points = H.sample_points(box, 200, seed=seed).astype(np.float32)
  for j, o in enumerate(outputs):
    grads = np.asarray(jax.vmap(jax.grad(lambda x: f(x)[o] - fq(x)[o]))(jnp.asarray(points)), np.float64)
    inside = np.abs(grads - centre[:, j]) <= radius[:, j] * (1 + 1e-5) + 1e-5
    assert inside.all()


def test_gradient_split_needs_a_chain():
  """A skip connection (an add node): the interval gradient does not walk it, so the explicit
  gradient split is refused before anything compiles (``"auto"`` falls back to the bound's
  coefficients)."""
  from qbound.bounds.forward_bab import forward_branch_and_bound

  w1 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)
  w2 = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)
  f = lambda x: jax.nn.relu(x @ w1) @ w2 + x
  fq = lambda x: jax.nn.relu(x @ jnp.round(w1 * 4) / 4) @ w2 + x
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert merged.paired and not gradient_supported(merged.f_graph, merged.fq_graph)
  with pytest.raises(ValueError, match="chains"):
    forward_branch_and_bound(merged, box, split_rule="gradient")
  with pytest.raises(ValueError, match="split_rule"):
    forward_branch_and_bound(merged, box, split_rule="smear")


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(domain="zonotope", split_rule="gradient"),
                                dict(relu_rules="equation", split_rule="gradient", output_backward=False)])
def test_device_loop_with_the_gradient_split_is_sound(kw):
  """The device loop with the interval-gradient split, on differential zonotopes or on NeuroDiff's
  forward rules: its bounds hold at float64 samples (one more compiled program each: slow)."""
  from qbound.bounds.forward_bab import forward_branch_and_bound

  shape = H.SHAPES[2]
  f, fq, _, _ = H.random_pair(0, shape, bits=3)
  box = qb.Box(-jnp.ones(shape[0]), jnp.ones(shape[0]))
  merged = qb.merge(f, fq, box)
  res = forward_branch_and_bound(merged, box, time_budget=30, target_gap=0.05, batch_size=8, max_pieces=2048, **kw)
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= res.diff_lower - 1e-7) and np.all(values <= res.diff_upper + 1e-7)
  assert np.abs(values).max() <= res.upper + 1e-7
  assert res.lower <= res.upper * (1 + 1e-5) + 1e-7
