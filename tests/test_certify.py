"""Tests of qbound.certify: the one call most users make, and its error messages."""

import functools
import importlib
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.certify import METHODS


class Net(nn.Module):
  """The README's user-written network: 5 -> 64 -> 64 -> 3."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(3)(x)


def numpy_forward(params, x):
  """Net in float64 numpy, independent of qbound's tracing."""
  h = np.asarray(x, np.float64)
  layers = params["params"]
  for i in range(3):
    h = h @ np.asarray(layers[f"Dense_{i}"]["kernel"], np.float64) + np.asarray(layers[f"Dense_{i}"]["bias"], np.float64)
    if i < 2:
      h = np.maximum(h, 0)
  return h


@pytest.fixture(scope="module")
def readme():
  model = Net()
  params = model.init(jax.random.key(0), jnp.zeros(5))
  qparams = qb.quantize.uniform(params, bits=8)  # exactly as in the README
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, qparams)
  box = qb.Box(lower=-jnp.ones(5), upper=jnp.ones(5))
  # The README's call, with room for a cold compile on a loaded machine: with the default 10 s the
  # deadline could come before the search that the sampling test relies on. It runs to its deadline
  # (this random net's gap is 1.9 after 25 s, 2.3 after 10 s; the search's error is the same in all),
  # so the budget is what this fixture costs the suite.
  cert = qb.certify(f, fq, box, time_budget=15)
  return f, fq, params, qparams, box, cert


def test_readme_contract(readme):
  f, fq, params, qparams, box, cert = readme
  # The quantized weights differ from the originals, on an 8-bit grid (255 levels at most).
  kernel = np.asarray(qparams["params"]["Dense_1"]["kernel"])
  assert not np.array_equal(kernel, np.asarray(params["params"]["Dense_1"]["kernel"]))
  assert len(np.unique(kernel)) <= 255
  assert 0 < cert.lower <= cert.upper
  assert box.contains(cert.witness) and cert.witness.shape == (5,)
  assert cert.diff_lower.shape == (3,) and cert.diff_upper.shape == (3,)
  assert np.all(cert.diff_lower <= cert.diff_upper)
  assert cert.upper == pytest.approx(max(np.max(-cert.diff_lower), np.max(cert.diff_upper)))
  # lower is the error at the witness in float64, recomputed here without qbound.
  diff64 = numpy_forward(params, cert.witness) - numpy_forward(qparams, cert.witness)
  assert cert.lower == pytest.approx(np.max(np.abs(diff64)), rel=1e-9, abs=1e-12)
  np.testing.assert_allclose(cert.witness_diff, diff64, rtol=1e-9, atol=1e-12)
  # ... and as f and fq compute it in float32: close, but only up to rounding.
  assert cert.lower_float32 == pytest.approx(cert.lower, rel=1e-2)
  assert cert.method in cert.bounds
  assert cert.upper <= min(cert.bounds.values()) + 1e-12  # per-output intersection can only help
  assert 0 < cert.seconds < 120
  assert cert.sound
  np.testing.assert_array_equal(cert.box_lower, box.lower)
  assert cert.gap == pytest.approx(cert.upper / cert.lower)
  assert cert.proves(cert.upper) and not cert.proves(cert.lower * 0.5)
  assert "max error in [" in str(cert)


def test_json_round_trip(readme):
  *_, cert = readme
  text = cert.to_json()
  json.loads(text)  # plain JSON
  back = qb.Certificate.from_json(text)
  for field in ("lower", "upper", "method", "seconds", "bounds", "sound", "lower_float32"):
    assert getattr(back, field) == getattr(cert, field)
  for field in ("diff_lower", "diff_upper", "witness", "witness_diff", "box_lower", "box_upper"):
    np.testing.assert_array_equal(getattr(back, field), getattr(cert, field))
  with pytest.raises(ValueError, match="unknown fields"):
    qb.Certificate.from_dict({**cert.to_dict(), "colour": "red"})
  # Files whose fields contradict each other as no certificate can are refused, saying what is wrong.
  data = cert.to_dict()
  witness = np.asarray(data["witness"])
  for change, message in [({"lower": 2 * cert.upper}, "above the proven upper"),
                          ({"upper": "NaN"}, "upper is NaN"),
                          ({"diff_lower": (np.asarray(cert.diff_upper) + 1).tolist()}, "diff_lower is above"),
                          ({"witness": witness[:1].tolist()}, "witness has shape"),
                          ({"witness": (np.asarray(cert.box_upper) + 1).tolist()}, "outside the box"),
                          ({"box_lower": (np.asarray(cert.box_upper) + 1).tolist()}, "not the corners")]:
    with pytest.raises(ValueError, match=message):
      qb.Certificate.from_json(json.dumps({**data, **change}))


def test_sampled_errors_below_upper(readme):
  f, fq, _, _, box, cert = readme
  merged = qb.merge(f, fq, box)
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.all(values >= cert.diff_lower) and np.all(values <= cert.diff_upper)
  assert np.max(np.abs(values)) <= cert.lower * (1 + 1e-6) + 1e-9  # the search beats plain sampling


def check_method(method, **kwargs):
  f, fq, _, _ = H.random_pair(3, H.SHAPES[0], bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  one = qb.certify(f, fq, box, method=method, search=H.search(), **kwargs)
  assert one.method == method and set(one.bounds) == {method}
  assert one.lower <= one.upper
  values = H.eval64(qb.merge(f, fq, box), H.sample_points(box, 1000))
  assert np.all(values >= one.diff_lower) and np.all(values <= one.diff_upper)
  return f, fq, box, one


@pytest.mark.parametrize("method", ["interval", "crown", "diff", "diff-interval", "milp"])
def test_each_method_is_sound(method):
  # The MILP returns once HiGHS proves optimality; the budget only matters on a loaded machine.
  f, fq, box, one = check_method(method, **({"time_budget": 60.0} if method == "milp" else {}))
  if method in ("interval", "crown", "diff"):
    # auto runs these three first and keeps the tightest bound per output; on a loaded machine its
    # deadline may come before one of them has compiled, and what it runs after them depends on the
    # budget, so only the bounds it reports are certain.
    auto = qb.certify(f, fq, box, search=H.search())
    # On small ReLU pairs the NumPy search (host-bab) runs first, and the interval bound only if it
    # proves nothing or stops early with time left (its tracing took the search's interpreter lock
    # on first calls).
    assert "interval" in auto.bounds or "host-bab" in auto.bounds
    if method in auto.bounds:
      assert auto.upper <= one.upper + 1e-12
  if method == "milp":  # exact: the interval closes up to the solver's tolerance
    assert one.upper - one.lower <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"auto", "interval", "crown", "diff", "diff-interval", "milp"}))
def test_each_slow_method_is_sound(method):
  check_method(method)


def test_merged_network_and_unsound_mode():
  f, fq, _, _ = H.random_pair(4, H.SHAPES[0], bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  search = H.search()
  via_merged = qb.certify(merged, None, box, method="crown", key=jax.random.key(1), search=search)
  via_fns = qb.certify(f, fq, box, method="crown", key=jax.random.key(1), search=search)
  assert via_merged.upper == via_fns.upper and via_merged.lower == via_fns.lower
  loose = qb.certify(f, fq, box, method="crown", sound=False, search=search)
  assert not loose.sound and loose.upper <= via_fns.upper
  with pytest.raises(ValueError, match="not both|fq=None"):
    qb.certify(merged, fq, box)


def test_identical_networks_have_zero_error():
  f, _, _, _ = H.random_pair(5, H.SHAPES[0], bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  cert = qb.certify(f, f, box, method="diff", search=H.search())
  assert cert.lower == 0.0
  assert cert.upper < 1e-4  # differential bounds see the cancellation: only float margins remain
  assert cert.gap == float("inf")
  # CROWN on the merged network relaxes both copies independently: sound, but far from zero.
  assert qb.certify(f, f, box, method="crown", search=H.search()).upper > 1e-2


# --- bad inputs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pair():
  f, fq, params, _ = H.random_pair(6, H.SHAPES[0], bits=4)
  return f, fq, params


@pytest.mark.parametrize(
    "box, match",
    [
        (qb.Box(jnp.ones(2), -jnp.ones(2)), r"box is empty: lower > upper at index \(0,\)"),
        (qb.Box(jnp.array([0.0, jnp.nan]), jnp.ones(2)), r"box.lower is not finite at index \(1,\)"),
        (qb.Box(jnp.zeros(2), jnp.array([jnp.inf, 1.0])), "box.upper is not finite"),
        (qb.Box(jnp.zeros(2), jnp.ones(3)), r"box.lower has shape \(2,\) but box.upper has shape \(3,\)"),
        (qb.Box(jnp.zeros(3), jnp.ones(3)), r"f could not be evaluated on an input of shape \(3,\)"),
    ],
)
def test_bad_box(small_pair, box, match):
  f, fq, _ = small_pair
  with pytest.raises(ValueError, match=match):
    qb.certify(f, fq, box)


def test_box_must_be_a_box(small_pair):
  f, fq, _ = small_pair
  with pytest.raises(ValueError, match="must be a qbound.Box"):
    qb.certify(f, fq, (jnp.zeros(2), jnp.ones(2)))


def test_different_output_shapes(small_pair):
  f, _, _ = small_pair
  other = lambda x: jax.nn.relu(x @ jnp.ones((2, 5)))
  with pytest.raises(ValueError, match=r"f returns shape \(2,\) but f_q returns \(5,\)"):
    qb.certify(f, other, qb.Box(-jnp.ones(2), jnp.ones(2)))


@pytest.mark.parametrize("bad, word", [(jnp.nan, "NaN"), (jnp.inf, "inf"), (-jnp.inf, "inf")])
def test_non_finite_params(small_pair, bad, word):
  f, _, params = small_pair
  broken = jax.tree_util.tree_map(lambda w: w, params)
  broken["params"]["Dense_0"]["bias"] = broken["params"]["Dense_0"]["bias"].at[1].set(bad)
  fq = functools.partial(H.mlp((8, 8), 2).apply, broken)
  with pytest.raises(ValueError, match=f"fq: the bias of node 1 .* contain {word}.*Check the params"):
    qb.certify(f, fq, qb.Box(-jnp.ones(2), jnp.ones(2)))


def test_invalid_method(small_pair):
  f, fq, _ = small_pair
  with pytest.raises(ValueError, match="unknown method 'exact'; choose one of auto, interval, crown"):
    qb.certify(f, fq, qb.Box(-jnp.ones(2), jnp.ones(2)), method="exact")


def test_unsupported_operation(small_pair):
  f, _, _ = small_pair
  with pytest.raises(qb.UnsupportedPrimitiveError, match="'sin'"):
    qb.certify(f, lambda x: jnp.sin(f(x)), qb.Box(-jnp.ones(2), jnp.ones(2)))


@pytest.mark.parametrize("method", ["interval", "auto"])
def test_lower_is_not_zero_when_a_corner_differs(method):
  """Zero biases and a box centred at 0: the centre reaches no error, but corners do, and the
  certificate's lower bound must show it whatever the time budget leaves for searching."""
  W1 = jax.random.normal(jax.random.key(1), (6, 16))
  W2 = jax.random.normal(jax.random.key(2), (16, 3))
  q = lambda w: jnp.round(w * 4) / 4
  f = lambda x: jax.nn.relu(x @ W1) @ W2
  fq = lambda x: jax.nn.relu(x @ q(W1)) @ q(W2)
  box = qb.Box(-jnp.ones(6), jnp.ones(6))
  corner = float(jnp.max(jnp.abs(f(box.upper) - fq(box.upper))))
  assert corner > 0
  cert = qb.certify(f, fq, box, method=method, time_budget=0.1)
  assert cert.lower >= corner * (1 - 1e-5) and cert.lower > 0


# --- method="bab" on few inputs: branch and bound first --------------------------------------------


@pytest.mark.parametrize("seed", [8, 10])
def test_bab_on_few_inputs_goes_to_branch_and_bound_first(seed, monkeypatch):
  """On a paired net with few inputs, bab's first batch is the differential bound and its probes the
  search: certify runs neither CROWN, the differential pass nor the gradient search before it (they
  cost 0.2-0.3 s of a warm ACAS Xu proof), and the certificate is as sound as before, against
  sampling and the exact MILP value."""
  C = importlib.import_module("qbound.certify")
  f, fq, _, _ = H.random_pair(seed, H.SHAPES[0], bits=4)
  box = H.random_box(seed, 2)

  def not_here(*args, **kwargs):
    raise AssertionError("a stage before branch and bound ran")

  monkeypatch.setattr(C, "crown_bounds", not_here)
  monkeypatch.setattr(C, "diff_bounds", not_here)
  monkeypatch.setattr(C.attack, "maximize_error", not_here)
  cert = qb.certify(f, fq, box, method="bab", target_gap=0.05, time_budget=60, search=H.search())
  assert cert.method == "bab" and set(cert.bounds) == {"bab"}
  merged = qb.merge(f, fq, box)
  values = H.eval64(merged, H.sample_points(box, 1000))
  assert np.all(values >= cert.diff_lower) and np.all(values <= cert.diff_upper)
  exact = qb.exact.milp(merged, None, box, time_limit=10)
  assert cert.lower <= exact.upper + 1e-6 and exact.value <= cert.upper + 1e-6


@pytest.mark.parametrize("setting, value", [("LOW_DIMENSIONAL_INPUTS", 1), ("BAB_BRANCH_FIRST", False)])
def test_bab_on_many_inputs_still_runs_the_stages_before_it(setting, value, monkeypatch):
  """Above LOW_DIMENSIONAL_INPUTS inputs (or with BAB_BRANCH_FIRST off) bab keeps CROWN, the
  differential pass and the search first."""
  C = importlib.import_module("qbound.certify")
  monkeypatch.setattr(C, setting, value)
  called = []
  real = C.crown_bounds
  monkeypatch.setattr(C, "crown_bounds", lambda *a, **k: called.append(1) or real(*a, **k))
  f, fq, _, _ = H.random_pair(8, H.SHAPES[0], bits=4)
  cert = qb.certify(f, fq, H.random_box(8, 2), method="bab", target_gap=0.5, time_budget=60, search=H.search())
  assert called and set(cert.bounds) == {"bab"} and cert.lower <= cert.upper


@pytest.mark.slow  # ~20 s: an opt-in stage (PLAIN_DIFF_BESIDE_BAB) compiled for this test alone
def test_plain_differential_pass_beside_branch_and_bound_is_sound(monkeypatch):
  """Opt-in (certify.PLAIN_DIFF_BESIDE_BAB): on a staircase with few inputs, auto also runs the
  plain differential pass in a thread beside branch and bound; its bound holds against sampling."""
  C = importlib.import_module("qbound.certify")
  monkeypatch.setattr(C, "PLAIN_DIFF_BESIDE_BAB", True)
  monkeypatch.setattr(C, "GRID_SHARE", 0.0)  # no grid: the staircase goes to branch and bound
  monkeypatch.setattr(C, "HOST_HEAD_START", None)  # (the NumPy search would close this one alone)
  rng = np.random.default_rng(0)
  w1, w2 = rng.normal(size=(3, 8)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
  f = lambda x: jax.nn.relu(x @ w1) @ w2  # noqa: E731
  fq = lambda x: (jnp.round(jax.nn.relu(x @ w1) * 4) / 4) @ w2  # noqa: E731  (activations rounded)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  ran = []
  plain = C._diff_output  # noqa: SLF001
  monkeypatch.setattr(C, "_diff_output", lambda *a, **k: ran.append(1) or plain(*a, **k))
  cert = qb.certify(f, fq, box, time_budget=20, target_gap=0.05)
  assert ran and "diff" in cert.bounds
  values = H.eval64(qb.merge(f, fq, box), H.sample_points(box, 2000))
  assert np.all(values >= cert.diff_lower) and np.all(values <= cert.diff_upper)
  assert np.max(np.abs(values)) <= cert.upper and cert.lower <= cert.upper


def test_a_float32_tie_beyond_the_real_arithmetic_bound_warns():
  """At x0, 0.7 x0 / 0.1 is -37.4999993 in real arithmetic (rounds to -37) but -37.5 exactly in
  float32 (rounds to -38): the networks as executed differ by a whole step more than the proven
  real-arithmetic maximum. certify says so (FloatTieWarning) instead of returning silently; where
  the bound covers the float32 error, nothing is said."""
  s, w, a = jnp.float32(0.1), jnp.float32(0.7), jnp.float32(-3.75)
  head = lambda y: jnp.concatenate([y[None], 2.0 * jax.nn.relu(a - y)[None]])  # noqa: E731
  f = lambda x: head(x[0] * w)  # noqa: E731
  fq = lambda x: head(jnp.round(x[0] * w / s) * s)  # noqa: E731
  x0 = np.float32(-5.357143)
  box = qb.Box(jnp.array([x0]), jnp.array([x0 + np.float32(0.01)]))
  with pytest.warns(qb.FloatTieWarning, match="float32"):
    cert = qb.certify(f, fq, box, method="auto", time_budget=10.0)  # (2 s missed the tie once under load)
  assert cert.lower <= cert.upper < cert.lower_float32
  with warnings.catch_warnings():
    warnings.simplefilter("error", qb.FloatTieWarning)
    cert = qb.certify(f, fq, box, method="diff")  # its rounding band holds both sides of the tie
  assert cert.lower_float32 <= cert.upper


def test_lower_float32_counts_the_chosen_outputs_only():
  """lower_float32 was the largest error over every output, also where `outputs` chose fewer (and
  then stood above `upper`); it counts the chosen ones now, as lower does, in certify_batch too."""
  w = jnp.array([[1.0, 3.0], [0.5, -2.0]])
  f = lambda x: x @ w  # noqa: E731
  fq = lambda x: x @ (w * jnp.array([0.99, 0.9]))  # noqa: E731  (output 1 errs ten times as much)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  with warnings.catch_warnings():
    warnings.simplefilter("error", qb.FloatTieWarning)
    cert = qb.certify(f, fq, box, method="crown", outputs=[0])
    batch = qb.certify_batch(f, fq, qb.Box(box.lower[None], box.upper[None]), method="crown", outputs=[0])
  assert cert.lower_float32 == pytest.approx(cert.lower, rel=1e-5) and cert.lower_float32 <= cert.upper
  assert batch.lower_float32[0] == pytest.approx(batch.lower[0], rel=1e-5)


def test_float_ties_warn_only_beyond_float32_noise():
  """A tight certificate's gap can be smaller than float32's rounding of large outputs: an excess
  within about 100 ulps of the outputs is no tie's and says nothing."""
  from qbound import validate
  with warnings.catch_warnings():
    warnings.simplefilter("error", qb.FloatTieWarning)
    validate.float_ties("certificate", 1.00002e-5, 1.0e-5, np.zeros(2), 100.0)  # 2e-10 over, outputs ~100
    validate.float_ties("certificate", 1.001e-5, 1.0e-5, np.zeros(2), 0.0)  # not known: 1% allowed
  with pytest.warns(qb.FloatTieWarning):
    validate.float_ties("certificate", 0.1, 0.05, np.zeros(2), 4.0)
