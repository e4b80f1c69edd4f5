"""Soundness of qbound.bounds (IBP and CROWN): every upper bound is checked against sampling and,
on small ReLU nets, against the exact MILP value.

Errors are evaluated in float64 (the real-arithmetic value of the float32 network, up to ~1e-16
relative), which is what sound-mode bounds promise to enclose.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.attack import exact_error
from qbound.bounds.crown import crown_bounds
from qbound.bounds.interval import interval_bounds
from qbound.exact import milp

pytestmark = pytest.mark.usefixtures("strict_promotion")


def output_bounds(graph, box, sound=True):
  """``{method: (lower, upper)}`` of the graph's output, float64 numpy."""
  out = {"interval": interval_bounds(graph, box, sound)[graph.output],
         "crown": crown_bounds(graph, box, None, sound)[graph.output]}
  return {k: (np.asarray(lo, np.float64), np.asarray(hi, np.float64)) for k, (lo, hi) in out.items()}


def max_abs(lo, hi):
  return float(max(np.max(-lo), np.max(hi), 0.0))


def assert_encloses(bounds, values, *, atol=0.0, label=""):
  """Every sampled output lies in its proven interval (elementwise, batch in front)."""
  lo, hi = bounds
  below = values < lo - atol
  above = values > hi + atol
  assert not below.any(), f"{label}: a sampled value {values[below].min()} is below the bound {lo.min()}"
  assert not above.any(), f"{label}: a sampled value {values[above].max()} is above the bound {hi.max()}"


def make_case(shape, seed, compression, radius=(0.05, 1.0)):
  kind, amount = compression
  if kind == "bits":
    f, fq, _, _ = H.random_pair(seed, shape, bits=amount)
  else:
    f, fq, _, _ = H.random_pair(seed, shape, noise=amount)
  box = H.random_box(seed + 1000, shape[0], radius=radius)
  return f, fq, qb.merge(f, fq, box), box


COMPRESSIONS = [("bits", 2), ("bits", 4), ("bits", 8), ("noise", 0.02), ("noise", 0.1)]
CASES = [(shape, seed, COMPRESSIONS[(i + seed) % len(COMPRESSIONS)])
         for i, shape in enumerate(H.SHAPES) for seed in range(4)]


@pytest.fixture(scope="module")
def evaluated_cases():
  """For each case: the merged net, its box, both methods' output bounds, float64 sampled outputs."""
  out = []
  for shape, seed, compression in CASES:
    _, _, merged, box = make_case(shape, seed, compression)
    values = H.eval64(merged, H.sample_points(box, 2000, seed))
    out.append((shape, seed, compression, merged, box, output_bounds(merged.graph, box), values))
  return out


def test_sampled_errors_within_bounds(evaluated_cases):
  for shape, seed, compression, _, _, bounds, values in evaluated_cases:
    for method, b in bounds.items():
      assert_encloses(b, values, label=f"{method} on {shape} seed {seed} {compression}")


def test_crown_never_looser_than_interval(evaluated_cases):
  for *_, bounds, _ in evaluated_cases:
    (ilo, ihi), (clo, chi) = bounds["interval"], bounds["crown"]
    assert np.all(clo >= ilo) and np.all(chi <= ihi)


def test_crown_strictly_tighter_on_most_nets(evaluated_cases):
  ratios = []
  for *_, bounds, _ in evaluated_cases:
    ratios.append(max_abs(*bounds["crown"]) / max_abs(*bounds["interval"]))
  ratios = np.array(ratios)
  assert np.mean(ratios < 1) >= 0.6, f"CROWN/IBP ratios {np.round(ratios, 3)}"
  assert np.median(ratios) < 0.8


def test_graph_bounds_for_every_node_are_sound():
  """Not only the output: every node's proven interval contains its sampled values."""
  _, _, merged, box = make_case(H.SHAPES[1], 3, ("bits", 3))
  xs = H.sample_points(box, 500, 3)
  with jax.enable_x64(True):
    g64 = qb.graph.astype(merged.graph, jnp.float64)
    values = jax.vmap(g64.values)(jnp.asarray(xs, jnp.float64))
  for method, all_bounds in (("interval", interval_bounds(merged.graph, box, True)),
                             ("crown", crown_bounds(merged.graph, box, None, True))):
    for idx, (lo, hi) in enumerate(all_bounds):
      assert_encloses((np.asarray(lo, np.float64), np.asarray(hi, np.float64)), np.asarray(values[idx]),
                      label=f"{method} node {idx} ({merged.graph.nodes[idx].kind})")


# --- against the exact maximal error -----------------------------------------------------------

# Two structures only: the first case of each compiles the bound methods (seconds), the rest reuse them.
MILP_CASES = [(H.SHAPES[0], 0, ("bits", 4)), (H.SHAPES[0], 1, ("noise", 0.05)), (H.SHAPES[0], 2, ("bits", 6)),
              (H.SHAPES[4], 0, ("bits", 2)), (H.SHAPES[4], 1, ("noise", 0.1)), (H.SHAPES[4], 3, ("bits", 3))]


@pytest.mark.parametrize("shape, seed, compression", MILP_CASES)
def test_exact_error_within_certified_interval(shape, seed, compression):
  f, fq, merged, box = make_case(shape, seed, compression, radius=(0.05, 0.4))
  exact = milp(merged, box=box, time_limit=30)
  assert exact.optimal
  sampled = H.max_error(merged, H.sample_points(box, 2000, seed))
  assert sampled <= exact.value + 1e-9  # the MILP's maximiser is at least as good as sampling
  for method in ("interval", "crown", "diff"):
    with jax.numpy_dtype_promotion("standard"):  # the lower-bound search uses optax (not strict-clean)
      cert = qb.certify(f, fq, box, method=method, search=H.search())
    # lower <= exact maximal error <= upper, the exact one known to lie in [value, upper].
    assert cert.lower <= exact.upper, method
    assert exact.value <= cert.upper, method
    assert cert.lower <= exact.value + exact.tolerance, method


# --- hypothesis properties ---------------------------------------------------------------------


@st.composite
def nets_and_boxes(draw):
  shape = draw(st.sampled_from(H.SHAPES))
  seed = draw(st.integers(0, 10_000))
  if draw(st.booleans()):
    compression = ("bits", draw(st.integers(2, 8)))
  else:
    compression = ("noise", draw(st.floats(1e-3, 0.3)))
  n_in = shape[0]
  center = np.array(draw(st.lists(st.floats(-2, 2), min_size=n_in, max_size=n_in)), np.float32)
  radius = np.array(draw(st.lists(st.floats(0, 1.5), min_size=n_in, max_size=n_in)), np.float32)
  return shape, seed, compression, qb.Box(jnp.asarray(center - radius), jnp.asarray(center + radius))


def merged_for(shape, seed, compression, box):
  kind, amount = compression
  f, fq, _, _ = H.random_pair(seed, shape, **({"bits": amount} if kind == "bits" else {"noise": amount}))
  return qb.merge(f, fq, box)


@settings(max_examples=20)
@given(nets_and_boxes())
def test_bounds_sound_property(case):
  shape, seed, compression, box = case
  merged = merged_for(shape, seed, compression, box)
  values = H.eval64(merged, H.sample_points(box, 256, seed))
  bounds = output_bounds(merged.graph, box)
  for method, b in bounds.items():
    assert_encloses(b, values, label=method)
  (ilo, ihi), (clo, chi) = bounds["interval"], bounds["crown"]
  assert np.all(clo >= ilo) and np.all(chi <= ihi)


@settings(max_examples=15)
@given(nets_and_boxes())
def test_unsound_mode_is_close_and_within_sound_mode(case):
  """sound=False drops the float margins: valid up to rounding, and inside the sound bounds."""
  shape, seed, compression, box = case
  merged = merged_for(shape, seed, compression, box)
  values = H.eval64(merged, H.sample_points(box, 256, seed))
  sound = output_bounds(merged.graph, box, True)
  loose = output_bounds(merged.graph, box, False)
  for method in sound:
    lo, hi = loose[method]
    scale = 1e-4 * (1 + np.max(np.abs(values)) + max_abs(lo, hi))
    assert_encloses(loose[method], values, atol=scale, label=f"{method} sound=False")
    assert np.all(sound[method][0] <= lo) and np.all(hi <= sound[method][1])


# --- arbitrary traced functions ----------------------------------------------------------------

_W = np.asarray(jax.random.normal(jax.random.key(7), (3, 5)), np.float32)
_V = np.asarray(jax.random.normal(jax.random.key(8), (5, 3)), np.float32)

FUNCTIONS = {
    "residual": lambda x: x + jax.nn.relu(x @ _W) @ _V,
    "concat": lambda x: jnp.concatenate([jax.nn.relu(x @ _W), x]),
    "clip": lambda x: jnp.clip(x @ _W, -0.5, 0.7) @ _V,
    "relu6": lambda x: jax.nn.relu6(4 * (x @ _W)),
    "max of two": lambda x: jnp.maximum(x, jax.nn.relu(x @ _W) @ _V),
    "min of two": lambda x: jnp.minimum(x @ _W @ _V, 2 * x),
    "sum and mean": lambda x: jnp.sum(jax.nn.relu(x @ _W)) * jnp.ones(2) + jnp.mean(x) * jnp.ones(2),
    "scale and shift": lambda x: jax.nn.relu((x - 0.3) / 0.7 @ _W) * 2.5 + 1.0,
}
# Negation and scalar broadcasting: traced as `mul` ops and broadcasts that CROWN must transpose.
FUNCTIONS.update({
    "negation": lambda x: -jax.nn.relu(x @ _W),
    "constant minus x": lambda x: 1.0 - jax.nn.relu(x @ _W),
    "vector minus scalar": lambda x: jax.nn.relu(x @ _W) - jnp.mean(x),
})


def check_traced_function(fn, sound):
  box = qb.Box(jnp.array([-1.0, 0.0, 0.5]), jnp.array([0.5, 1.0, 1.5]))
  graph = qb.trace(fn, box)
  values = H.eval64(graph, H.sample_points(box, 1000))
  for method in (qb.bounds.interval, qb.bounds.crown):
    out = method(fn, box, sound=sound)
    b = (np.asarray(out.lower, np.float64), np.asarray(out.upper, np.float64))
    atol = 0.0 if sound else 1e-5 * (1 + np.max(np.abs(values)))
    assert_encloses(b, values, atol=atol, label=f"{method.__name__} sound={sound}")
  crown, ibp = qb.bounds.crown(fn, box, sound=sound), qb.bounds.interval(fn, box, sound=sound)
  assert np.all(crown.upper <= ibp.upper) and np.all(crown.lower >= ibp.lower)


@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_bounds_of_traced_functions(name, sound):
  check_traced_function(FUNCTIONS[name], sound)


def test_bounds_accept_graph_merged_and_function():
  f, fq, merged, box = make_case(H.SHAPES[0], 5, ("bits", 4))
  via_fn = qb.bounds.crown(lambda x: f(x) - fq(x), box)
  via_merged = qb.bounds.crown(merged, box)
  via_graph = qb.bounds.crown(merged.graph, box)
  np.testing.assert_array_equal(via_merged.upper, via_graph.upper)
  # Tracing f - fq directly gives another graph of the same function: also sound, similar width.
  values = H.eval64(merged, H.sample_points(box, 500))
  assert_encloses((np.asarray(via_fn.lower, np.float64), np.asarray(via_fn.upper, np.float64)), values)


def test_bounds_reject_bad_boxes():
  fn = lambda x: jax.nn.relu(x @ _W)
  with pytest.raises(ValueError, match="empty"):
    qb.bounds.crown(fn, qb.Box(jnp.ones(3), jnp.zeros(3)))
  with pytest.raises(ValueError, match="not finite"):
    qb.bounds.interval(fn, qb.Box(jnp.array([0.0, jnp.nan, 0.0]), jnp.ones(3)))
  graph = qb.trace(fn, jnp.zeros(3))
  with pytest.raises(ValueError, match=r"box has shape \(4,\) but the network's input has shape \(3,\)"):
    qb.bounds.crown(graph, qb.Box(jnp.zeros(4), jnp.ones(4)))


# --- float32 rounding stress -------------------------------------------------------------------


def _stress_pair(ulps: int):
  """f and f_q identical except one weight ``ulps`` float32 steps apart; weights ~1e3, so the true
  error (~0.06 per ulp) is of the size of float32 rounding of the ~1e6 terms that cancel in it."""
  w1 = np.array([[1000.0, -999.75], [-1000.0, 1000.25]], np.float32)
  b1 = np.array([5.0, 5.0], np.float32)
  w2 = np.array([[1000.0], [1000.0]], np.float32)
  w1q = w1.copy()
  w1q[0, 0] = w1[0, 0] + ulps * np.spacing(w1[0, 0])
  make = lambda w: (lambda x: jax.nn.relu(x @ jnp.asarray(w) + jnp.asarray(b1)) @ jnp.asarray(w2))
  return make(w1), make(w1q)


@pytest.mark.parametrize("ulps", [1, 3])
def test_sound_mode_survives_float32_cancellation(ulps):
  f, fq = _stress_pair(ulps)
  box = qb.Box(jnp.full(2, 1.0 - 1e-3), jnp.full(2, 1.0 + 1e-3))  # hidden units stay active
  merged = qb.merge(f, fq, box)
  xs = H.sample_points(box, 2000)
  exact = H.eval64(merged, xs)
  as_float32 = np.asarray(jax.vmap(merged)(jnp.asarray(xs, jnp.float32)), np.float64)
  # The case is a real stress: float32 evaluation of g is off by more than 1% of the error.
  assert np.max(np.abs(as_float32 - exact)) > 0.01 * np.max(np.abs(exact))
  np.testing.assert_allclose(exact_error(merged.graph, xs[0]), exact[0], rtol=1e-12)
  for method, b in output_bounds(merged.graph, box, sound=True).items():
    assert_encloses(b, exact, label=f"sound {method}")
  result = milp(merged, box=box)
  assert result.value <= result.upper and result.value >= np.max(np.abs(exact)) - 1e-12
  for method in ("crown", "diff"):
    with jax.numpy_dtype_promotion("standard"):
      cert = qb.certify(f, fq, box, method=method, search=H.search())
    assert cert.upper >= np.max(np.abs(exact))
    assert cert.lower == pytest.approx(np.max(np.abs(exact)), rel=1e-3)  # float64 re-evaluation
    assert cert.lower <= result.upper and result.value <= cert.upper


# The first shape by default; the two others (~9 s) with -m slow.
@pytest.mark.parametrize("shape", [H.SHAPES[0], *(pytest.param(s, marks=pytest.mark.slow) for s in H.SHAPES[1:3])])
def test_batched_bounds_equal_one_box_at_a_time(shape):
  """``batched=True`` (branch and bound's path) bounds every box exactly as a call on it alone."""
  from qbound.bounds.diff import diff_bounds

  f, fq, _, _ = H.random_pair(11, shape, bits=4)
  boxes = [H.random_box(20 + k, shape[0], radius=(0.05, 1.0)) for k in range(3)]
  merged = qb.merge(f, fq, boxes[0])
  batch = qb.Box(jnp.stack([b.lower for b in boxes]), jnp.stack([b.upper for b in boxes]))
  fg, qg, g = merged.f_graph, merged.fq_graph, merged.graph
  together = {"interval": interval_bounds(g, batch, True, batched=True)[g.output],
              "crown": crown_bounds(g, batch, None, True, batched=True)[g.output],
              "diff": diff_bounds(fg, qg, batch, None, True, True, batched=True)[2][fg.output]}
  for k, box in enumerate(boxes):
    alone = {"interval": interval_bounds(g, box, True)[g.output],
             "crown": crown_bounds(g, box, None, True)[g.output],
             "diff": diff_bounds(fg, qg, box, None, True, True)[2][fg.output]}
    for method, (lo, hi) in alone.items():
      np.testing.assert_allclose(together[method][0][k], lo, rtol=1e-6, atol=1e-7, err_msg=method)
      np.testing.assert_allclose(together[method][1][k], hi, rtol=1e-6, atol=1e-7, err_msg=method)
