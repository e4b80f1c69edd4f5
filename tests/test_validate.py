"""Tests of qbound.validate: every public call refuses bad arguments up front, naming them.

Each refusal must be a TypeError (wrong kind) or ValueError (out of range) whose message names the
argument, shows the value and says what is accepted; and it must come before any tracing or
compilation, so these tests are fast.
"""

import doctest
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from qbound import validate
from qbound.bounds.arguments import branch_and_bound_args

NAN = float("nan")


@pytest.fixture(scope="module")
def pair():
  model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
  params = model.init(jax.random.key(0), jnp.zeros(2))
  f = lambda x: model.apply(params, x)
  fq = lambda x: model.apply(qb.quantize.uniform(params, bits=4), x)
  return f, fq, qb.Box(-jnp.ones(2), jnp.ones(2))


def refused(call, error, *words):
  with pytest.raises(error) as err:
    call()
  for word in words:
    assert word in str(err.value), (word, str(err.value))
  return str(err.value)


CERTIFY_REFUSALS = [
    (dict(time_budget=NAN), ValueError, ["time_budget", "nan", "seconds > 0"]),
    (dict(time_budget=0), ValueError, ["time_budget", "got 0"]),
    (dict(time_budget=-1), ValueError, ["time_budget", "-1"]),
    (dict(time_budget="2"), TypeError, ["time_budget", "str '2'"]),
    (dict(time_budget=True), TypeError, ["time_budget", "bool True"]),
    (dict(time_budget=-math.inf), ValueError, ["time_budget", "-inf"]),
    (dict(epsilon=-1), ValueError, ["epsilon", "-1", ">= 0"]),
    (dict(epsilon=NAN), ValueError, ["epsilon", "nan"]),
    (dict(epsilon=math.inf), ValueError, ["epsilon", "inf", "finite"]),
    (dict(alpha_steps=-5), ValueError, ["alpha_steps", "-5", "integer >= 0"]),
    (dict(alpha_steps=2.5), TypeError, ["alpha_steps", "float 2.5"]),
    (dict(alpha_steps="20"), TypeError, ["alpha_steps", "str '20'"]),
    (dict(target_gap=NAN), ValueError, ["target_gap", "nan"]),
    (dict(target_gap=-0.1), ValueError, ["target_gap", "-0.1"]),
    (dict(key="abc"), TypeError, ["key", "str 'abc'", "jax.random.key(0)", "PRNGKey"]),
    (dict(key=0), TypeError, ["key", "int 0", "pass jax.random.key(0)"]),
    (dict(key=jnp.zeros(2)), TypeError, ["key", "dtype float32", "shape (2,)"]),
    (dict(key=jax.random.split(jax.random.key(0), 3)), ValueError, ["key", "single PRNG key", "(3,)"]),
    (dict(sound="no"), TypeError, ["sound", "True or False", "str 'no'"]),
    (dict(sound=1), TypeError, ["sound", "int 1"]),
    (dict(outputs=[5]), ValueError, ["outputs", "[0, 3)", "[5]"]),
    (dict(outputs=[-1]), ValueError, ["outputs", "[-1]"]),
    (dict(outputs=[0.5]), TypeError, ["outputs", "integers", "[0.5]"]),
    (dict(outputs="0"), TypeError, ["outputs", "str '0'"]),
    (dict(outputs=[]), ValueError, ["outputs", "empty"]),
    (dict(method="magic"), ValueError, ["method", "'magic'", "auto, interval"]),
    (dict(method=None), ValueError, ["method", "None"]),
    (dict(search="fast"), TypeError, ["search", "qbound.Search", "str 'fast'"]),
]


@pytest.mark.parametrize("kwargs, error, words", CERTIFY_REFUSALS,
                         ids=[f"{k}={v!r}"[:40] for (kw, _, _) in CERTIFY_REFUSALS for k, v in kw.items()])
def test_certify_refuses(pair, kwargs, error, words):
  f, fq, box = pair
  refused(lambda: qb.certify(f, fq, box, **kwargs), error, *words)


def test_certify_refuses_networks_that_are_not_functions(pair):
  f, fq, box = pair
  refused(lambda: qb.certify(3, fq, box), TypeError, "f must be a function", "int 3")
  refused(lambda: qb.certify(f, "fq", box), TypeError, "fq must be a function")
  refused(lambda: qb.certify(f, None, box), TypeError, "fq is None", "MergedNetwork")
  merged = qb.merge(f, fq, box)
  refused(lambda: qb.certify(merged, fq, box), ValueError, "MergedNetwork with fq=None")


def test_certify_accepts_every_documented_form(pair):
  f, fq, box = pair
  search = qb.Search(samples=64, restarts=2, steps=5)
  for key in (None, jax.random.key(1), jax.random.PRNGKey(1), np.asarray(jax.random.PRNGKey(1))):
    cert = qb.certify(f, fq, box, method="interval", key=key, search=search)
    assert cert.lower <= cert.upper
  cert = qb.certify(f, fq, box, method="interval", time_budget=math.inf, target_gap=np.float32(0.1),
                    epsilon=np.float64(1.0), alpha_steps=np.int64(3), outputs=np.array([0, 2]), sound=np.bool_(True),
                    search=search)
  assert cert.sound is True and cert.upper >= 0


BATCH_REFUSALS = [
    (dict(key="abc"), TypeError, ["key", "'abc'"]),
    (dict(sound="no"), TypeError, ["sound", "'no'"]),
    (dict(alpha_steps=-5), ValueError, ["alpha_steps", "-5"]),
    (dict(outputs=[0.5]), TypeError, ["outputs"]),
    (dict(outputs=[9]), ValueError, ["outputs", "[9]"]),
    (dict(memory_budget=NAN), ValueError, ["memory_budget", "nan"]),
    (dict(memory_budget="4GiB"), TypeError, ["memory_budget", "str '4GiB'"]),
    (dict(memory_budget=-1), ValueError, ["memory_budget", "-1"]),
    (dict(progress="yes"), TypeError, ["progress", "'yes'"]),
    (dict(devices="cpu"), TypeError, ["devices", "JAX devices"]),
    (dict(devices=[]), TypeError, ["devices", "non-empty"]),
    (dict(mesh=3), TypeError, ["mesh", "jax.sharding.Mesh"]),
    (dict(search=qb.Search), TypeError, ["search"]),
    (dict(method="auto"), ValueError, ["not batched"]),
    (dict(method="magic"), ValueError, ["unknown method 'magic'"]),
]


@pytest.mark.parametrize("kwargs, error, words", BATCH_REFUSALS,
                         ids=[f"{k}={v!r}"[:40] for (kw, _, _) in BATCH_REFUSALS for k, v in kw.items()])
def test_certify_batch_refuses(pair, kwargs, error, words):
  f, fq, _ = pair
  boxes = qb.linf_ball(jnp.zeros((3, 2)), 0.1)
  refused(lambda: qb.certify_batch(f, fq, boxes, progress=kwargs.pop("progress", False), **kwargs), error, *words)


def test_search_settings_check_themselves():
  refused(lambda: qb.Search(samples=-1), ValueError, "Search.samples", "-1")
  refused(lambda: qb.Search(steps=2.5), TypeError, "Search.steps", "2.5")
  refused(lambda: qb.Search(learning_rate=NAN), ValueError, "Search.learning_rate", "nan")
  assert qb.Search(samples=0, restarts=0, steps=0).samples == 0


def test_maximize_error_refuses():
  box = qb.Box(jnp.zeros(2), jnp.ones(2))
  fn = lambda x: jnp.sin(x)
  refused(lambda: qb.maximize_error(3.0, box), TypeError, "fn must be a function")
  refused(lambda: qb.maximize_error(fn, box, key="abc"), TypeError, "key", "'abc'")
  refused(lambda: qb.maximize_error(fn, box, search={"samples": 5}), TypeError, "search")
  refused(lambda: qb.maximize_error(fn, box, mesh="x"), TypeError, "mesh")
  refused(lambda: qb.maximize_error(fn, (0, 1)), ValueError, "box must be a qbound.Box")


def test_merge_refuses(pair):
  f, fq, box = pair
  refused(lambda: qb.merge(f, 3, box), TypeError, "fq must be a function")
  refused(lambda: qb.merge(f, fq, "abc"), TypeError, "example must be an input", "str 'abc'")
  refused(lambda: qb.merge(f, fq, None), TypeError, "example")
  assert qb.merge(f, fq, jax.ShapeDtypeStruct((2,), jnp.float32)).output_shape == (3,)


@pytest.mark.parametrize("args, kwargs, error, words", [
    ((jnp.zeros(3), -1.0), {}, ValueError, ["radius must be >= 0", "-1"]),
    ((jnp.zeros(3), NAN), {}, ValueError, ["radius must be finite", "nan"]),
    ((jnp.array([0.0, NAN]), 0.1), {}, ValueError, ["center must be finite"]),
    ((jnp.zeros(3), math.inf), {}, ValueError, ["radius must be finite", "inf"]),
    (("abc", 0.1), {}, TypeError, ["center must be a number", "str 'abc'"]),
    ((jnp.zeros(3), "0.1"), {}, TypeError, ["radius"]),
    ((jnp.zeros(3), jnp.ones(2)), {}, ValueError, ["radius of shape (2,)", "centre's shape (3,)", "radius[:, None]"]),
    ((jnp.zeros(2), 0.1), dict(clip_lower=1.0, clip_upper=0.0), ValueError, ["clip_lower must be <= clip_upper"]),
    ((jnp.zeros(2), 0.1), dict(clip_lower=NAN), ValueError, ["clip_lower", "nan"]),
    ((jnp.array([2.0, 0.5]), 0.1), dict(clip_lower=0.0, clip_upper=1.0), ValueError,
     ["center[0] = 2.0 lies outside", "[0.0, 1.0]"]),
])
def test_linf_ball_refuses(args, kwargs, error, words):
  refused(lambda: qb.linf_ball(*args, **kwargs), error, *words)


def test_linf_ball_still_works_under_jit_vmap_and_with_batches():
  ball = jax.jit(lambda c: qb.linf_ball(c, 0.1, clip_lower=0.0, clip_upper=1.0))(jnp.full(2, 0.95))
  np.testing.assert_allclose(ball.upper, [1.0, 1.0])
  balls = qb.linf_ball(jnp.zeros((4, 3)), jnp.arange(4.0)[:, None] / 10)
  assert balls.shape == (4, 3) and float(balls.upper[3, 0]) == pytest.approx(0.3)
  assert jax.vmap(lambda c: qb.linf_ball(c, 0.1).lower)(jnp.ones((2, 2))).shape == (2, 2)
  # Clip limits may be infinite (no limit on that side).
  assert float(qb.linf_ball(jnp.zeros(1), 1.0, clip_lower=-math.inf, clip_upper=0.5).upper[0]) == 0.5


def test_milp_refuses(pair):
  from qbound.exact import milp

  f, fq, box = pair
  refused(lambda: milp(f, fq, box, time_limit=NAN), ValueError, "time_limit", "nan")
  refused(lambda: milp(f, fq, box, time_limit=-1), ValueError, "time_limit", "seconds >= 0", "got -1")
  refused(lambda: milp(f, fq, box, time_limit="60"), TypeError, "time_limit", "str '60'")
  refused(lambda: milp(f, fq, box, prune="no"), TypeError, "prune", "'no'")
  refused(lambda: milp(f, fq, box, differential=1), TypeError, "differential", "int 1")
  refused(lambda: milp(f, fq, box, output=1.5), TypeError, "output", "1.5")
  refused(lambda: milp(f, fq, box, output=[]), ValueError, "output is empty")
  refused(lambda: milp(f, fq, box, output=7), ValueError, "output", "7")
  refused(lambda: milp(f, fq, box, bounds="crown"), TypeError, "bounds", "(lower, upper) pairs")
  refused(lambda: milp(3, fq, box), TypeError, "f must be a function")


def test_branch_and_bound_arguments(pair):
  """qb.bounds.branch_and_bound's arguments, through qbound.bounds.arguments.branch_and_bound_args
  (the check it calls first)."""
  f, fq, box = pair
  merged = qb.merge(f, fq, box)
  check = lambda **kw: branch_and_bound_args(merged, kw.pop("box", box), **kw)
  assert check().shape == (2,)
  refused(lambda: branch_and_bound_args(f, box), TypeError, "merged must be a qbound.MergedNetwork")
  refused(lambda: check(box=qb.Box(jnp.zeros(3), jnp.ones(3))), ValueError, "box has shape (3,)", "(2,)")
  refused(lambda: check(box=qb.Box(jnp.ones(2), jnp.zeros(2))), ValueError, "box is empty")
  refused(lambda: check(time_budget=NAN), ValueError, "time_budget", "nan")
  refused(lambda: check(target_gap=-1), ValueError, "target_gap", "-1")
  refused(lambda: check(epsilon=NAN), ValueError, "epsilon", "nan")
  refused(lambda: check(batch_size=0), ValueError, "batch_size", "0")
  refused(lambda: check(batch_size=8.0), TypeError, "batch_size", "float 8.0")
  refused(lambda: check(max_pieces=0), ValueError, "max_pieces")
  refused(lambda: check(initial_lower=NAN), ValueError, "initial_lower", "nan")
  refused(lambda: check(initial_witness=np.zeros(3)), ValueError, "initial_witness", "(3,)")
  refused(lambda: check(sound="no"), TypeError, "sound", "'no'")
  refused(lambda: check(strong_branching_dims=-1), ValueError, "strong_branching_dims")
  refused(lambda: check(outputs=[3]), ValueError, "outputs", "[3]")
  refused(lambda: check(mesh="all"), TypeError, "mesh")
  assert check(time_budget=math.inf, outputs=[1], initial_witness=np.zeros(2), batch_size=16).shape == (2,)


def test_number_helpers_directly():
  assert validate.number("x", np.float32(2.5)) == 2.5
  assert validate.number("x", jnp.asarray(3)) == 3.0
  refused(lambda: validate.number("x", jnp.ones(2)), TypeError, "x must be a finite number", "shape (2,)")
  refused(lambda: validate.number("x", None), TypeError, "NoneType None")
  assert validate.integer("n", np.int32(4), minimum=1) == 4
  assert validate.boolean("b", np.bool_(False)) is False
  assert validate.prng_key("key", None) is None


def test_docstring_examples():
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(validate, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
