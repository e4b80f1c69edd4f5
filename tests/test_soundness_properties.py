"""Soundness of every bound method on random fake-quantized, clipped and leaky network pairs.

The property: no proven bound lies below an error that is actually reached. A differential bound
once assumed that paired clip nodes of f and f_q have the same cuts, while qb.merge pairs f_q's
saturating fake quantization ``clip(floor(relu(z) * s), 0, 2^q - 1) / s`` with an identity clip
(+-inf) put into f: the bound came out far below the reached error. These tests draw such pairs at
random (floor, round-half-even, ceil and round-half-away; saturating and non-saturating cuts at the
bottom and the top; signed codes and zero points; relu6 against a narrower clip; leaky ReLUs of
other slopes; inputs scaled by 1/255 against 1/256; per-channel scales; quantized or perturbed
weights) with ordinary, wide, thin and degenerate boxes, and check every method against float64
values at dense samples, corners, a grid and the input gradient ascent finds
(``soundness_cases.check``).

Bound propagation compiles once per graph structure, so the default suite runs the per-node
methods (interval, CROWN, differential bounds) on every structure of ``soundness_cases.STRUCTURES``
(every family and rounding mode once), the MILP on any, and the methods that compile whole programs
per structure (optimised slopes, branch and bound, auto, batched certification) on one structure
each; ``benchmarks/soundness_long.py`` runs them all on many more cases and structures.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import qbound as qb
import soundness_cases as S
from soundness_cases import Act, Case

PER_NODE_METHODS = ("interval", "crown", "diff", "diff-interval")
# The structure each costly method runs on in the default suite (benchmarks/soundness_long.py runs
# them on all): the fixed bug's pattern (f_q's floor fake quantization, often saturating, beside f's
# identity) and relu6-style clips against other cuts; the methods on each share its compilations.
FAKE_QUANT = S.STRUCTURES[0]
CLIPS = next(s for s in S.STRUCTURES if s.family == "clip" and s.shape == S.SHAPES[0])
COSTLY = {"alpha": CLIPS, "batch": CLIPS, "bab": FAKE_QUANT, "auto": CLIPS, "milp": None}  # milp: any
ONE_LAYER = [s for s in S.STRUCTURES if s.shape == S.SHAPES[0]]
# No shrinking: each step of it may be a new structure to compile (seconds each), and the failure
# message prints the case as code already.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)


def examples(fraction: float) -> int:
  """A share of the loaded hypothesis profile's examples (15 by default, 300 when thorough)."""
  return max(1, math.ceil(settings.default.max_examples * fraction))


def assert_sound(method: str, case: Case, sound: bool):
  outcome = S.check(method, case, sound)
  assert not outcome.violations, S.describe(case, outcome, [method], sound)


def assert_every_node_sound(case: Case, sound: bool):
  violations = []
  for method in PER_NODE_METHODS:
    violations += S.check(method, case, sound).violations
  assert not violations, S.describe(case, S.Outcome(violations), PER_NODE_METHODS, sound)


# Every structure gets its examples (hypothesis's own choice among structures is far from even);
# within one, the cases differ in values only and share the compilations.
@settings(max_examples=examples(0.2), phases=NO_SHRINK)
@pytest.mark.parametrize("structure", S.STRUCTURES, ids=str)
@given(data=st.data())
def test_every_node_bound_holds_the_reached_values(structure, data):
  """interval and CROWN on the merged graph, and the differential bounds (symbolic and interval)
  on paired nets: every node's interval holds its float64 values (``z``, ``z_q`` and ``d = z -
  z_q`` for the differential ones) and the output's holds every reached error."""
  assert_every_node_sound(data.draw(S.cases(structure), label="case"), True)


@settings(max_examples=examples(0.1), phases=NO_SHRINK)
@pytest.mark.parametrize("structure", ONE_LAYER, ids=str)
@given(data=st.data())
def test_every_node_bound_without_margins_is_close(structure, data):
  """The same with ``sound=False`` (no floating-point margins), up to 1e-4 relative; fewer cases
  (the sound bounds are the ones certificates rest on), on the one-layer structures (every family
  and rounding mode but one each) whose compilations the costly tests share."""
  assert_every_node_sound(data.draw(S.cases(structure), label="case"), False)


@settings(max_examples=examples(0.2), phases=NO_SHRINK)
@pytest.mark.parametrize("sound", [True, False], ids=["sound", "unsound"])
@pytest.mark.parametrize("method", sorted(COSTLY))
@given(data=st.data())
def test_certified_bounds_hold_the_reached_errors(method, sound, data):
  """qb.certify (alpha, bab, milp, auto) and qb.certify_batch (diff, crown, interval on the box, a
  part of it and a face): per-output bounds hold every reached ``f - f_q`` and ``upper`` is at
  least every reached error."""
  structure = COSTLY[method] or data.draw(st.sampled_from(S.STRUCTURES), label="structure")
  assert_sound(method, data.draw(S.cases(structure), label="case"), sound)


# --- the fixed bug's pattern, every rounding, deterministic -------------------------------------

# f's ReLU beside f_q's fake quantization that saturates over most of the box (codes clipped to
# [0, 3] while relu(z) * 16 reaches ~40), the pattern the differential clip rule got wrong.
SATURATING = [Case("fq", S.SHAPES[0], Act("relu"), Act("fq", mode, 16.0, 0.0, 3.0), seed=3, compression=("same",),
                   gain=2.0, lower=(-1.0, -0.5), upper=(1.0, 1.5)) for mode in S.MODES]
# Cuts below and above: f_q's codes clipped to [2, 5] (zeros lifted), per-channel scales.
LIFTED = [Case("fq", S.SHAPES[0], Act("relu"), Act("fq", mode, (1.0, 2.0, 4.0, 8.0, 3.0, 0.5), 2.0, 5.0), seed=4,
               compression=("bits", 4), lower=(-1.0, -1.0), upper=(1.0, 1.0)) for mode in S.MODES]


@pytest.mark.parametrize("sound", [True, False], ids=["sound", "unsound"])
@pytest.mark.parametrize("case", SATURATING + LIFTED, ids=[f"saturating-{m}" for m in S.MODES]
                         + [f"lifted-{m}" for m in S.MODES])
def test_saturating_fake_quantization_beside_identity(case, sound):
  assert S.merged(case).paired
  reached = S.case_reference(case).max_error
  assert reached > 0.1  # the clip really saturates: a large error for the bounds to enclose
  for method in PER_NODE_METHODS:
    assert_sound(method, case, sound)


# --- which patterns merge pairs ------------------------------------------------------------------

PAIRING = {
    "floor fake quant": (Act("relu"), Act("fq", "floor", 7.0, 0.0, 15.0)),
    "jax.lax.round fake quant": (Act("relu"), Act("fq", "away", 7.0, 0.0, 15.0)),
    "per-channel scales": (Act("relu"), Act("fq", "ceil", (1.0, 2.0, 3.0, 4.0, 5.0, 6.0), 0.0, 3.0)),
    "top open": (Act("relu"), Act("fq", "nearest", 4.0, 0.0, math.inf)),
    "bottom open": (Act("relu"), Act("fq", "nearest", 4.0, -math.inf, 3.0)),
    "signed codes": (Act("linear"), Act("fqs", "nearest", 4.0, -8.0, 7.0)),
    "zero point": (Act("linear"), Act("fqz", "nearest", 4.0, 0.0, 15.0, zero=6.0)),
    "both fake-quantized": (Act("fq", "nearest", 255.0, 0.0, 255.0), Act("fq", "floor", 15.0, 0.0, 15.0)),
    "relu6 vs clip(0, 4)": (Act("clip", lo=0.0, hi=6.0), Act("clip", lo=0.0, hi=4.0)),
    "leaky slopes": (Act("leaky", slope=0.1), Act("leaky", slope=0.2)),
}


@pytest.mark.parametrize("name", sorted(PAIRING))
def test_fake_quantization_patterns_pair(name):
  """The differential bounds only run on paired nets: these patterns must pair for them to be tested."""
  act_f, act_q = PAIRING[name]
  case = Case("fq", S.SHAPES[0], act_f, act_q, seed=0, input_scale=(255.0, 256.0), lower=(0.0, 0.0),
              upper=(255.0, 255.0))
  mn = S.merged(case)
  assert mn.paired, name
  xs = np.random.default_rng(0).uniform(0, 255, (64, 2)).astype(np.float32)
  f, fq = case.networks()
  np.testing.assert_allclose(np.asarray(jax.vmap(mn)(xs)), np.asarray(jax.vmap(f)(xs) - jax.vmap(fq)(xs)),
                             rtol=1e-5, atol=1e-5)


# --- sound=False across a rounding step ------------------------------------------------------------


def _one_unit(w_out: float, b_out: float, fake_quant: bool):
  """``x -> w_out * h(x) + b_out`` on one input, ``h`` a ReLU or its ceil fake quantization
  (9 codes per unit, clipped to [0, 1])."""
  def fn(x):
    h = jax.nn.relu(x)
    if fake_quant:
      h = jnp.clip(jnp.ceil(h * 9.0), 0.0, 1.0) / 9.0
    return h * jnp.float32(w_out) + jnp.float32(b_out)

  return fn


@pytest.mark.parametrize("method", PER_NODE_METHODS)
def test_bounds_without_margins_do_not_lose_a_rounding_step(method):
  """sound=False may be off by float rounding, not by a whole quantization step.

  f = 0.2 and f_q = ceil(9 relu(x)) / 9 clipped to 1/9, paired, on x in [-r, r]: the error is 0.2
  wherever x <= 0. Without margins relu(x) * 9 gets the lower bound 1.5e-8 instead of 0 (its
  centre minus its radius, rounded), ceil makes that a whole code, and every method bounds the
  error by 0.0889 (found by the property tests above; a bug in qbound, not fixed here).
  """
  f, fq = _one_unit(0.0, 0.2, False), _one_unit(1.0, 0.0, True)
  box = qb.Box(jnp.array([-0.47383764]), jnp.array([0.47383764]))
  assert qb.merge(f, fq, box).paired
  cert = qb.certify(f, fq, box, method=method, sound=True)
  assert cert.upper >= 0.2 > cert.upper - 1e-5  # the sound bound is exact here
  try:
    loose = qb.certify(f, fq, box, method=method, sound=False)
  except qb.SoundnessError as err:
    pytest.fail(f"sound=False: {err}")
  assert loose.upper >= 0.2 * (1 - 1e-4)


def test_unsound_rounding_input_puts_crossed_ends_back_in_order():
  """Without margins a backward bound can cross the exact interval it is intersected with (a lower
  bound 4e-6 for a true range [0, 0]); ceil must not turn that into the empty [1, 0]."""
  from qbound.bounds import relax

  lo, hi = relax.step_input(jnp.array([4e-6], jnp.float32), jnp.array([0.0], jnp.float32), sound=False)
  assert float(lo[0]) <= 0.0 <= float(hi[0])
  r = relax.rounding(jnp.array([4e-6], jnp.float32), jnp.array([0.0], jnp.float32), "ceil", sound=False)
  assert float(r.lower_slope[0]) * 0.0 + float(r.lower_offset[0]) <= 0.0 <= float(r.upper_slope[0]) * 0.0 + float(r.upper_offset[0])
  # Sound bounds are never crossed, and stay as given.
  assert relax.step_input(jnp.array([1.0]), jnp.array([2.0]), sound=True)[0][0] == 1.0


def test_unsound_intersections_keep_their_ends_in_order():
  """Unsound bounds can miss the truth by rounding, so two of them may not overlap: intersections
  put the ends back in order instead of leaving an empty interval; sound ones are left as they are."""
  from qbound.bounds.crown import intersect

  a = (jnp.array([0.0, 0.0]), jnp.array([1.0, 1e-3]))
  b = (jnp.array([0.5, 2e-3]), jnp.array([2.0, 3.0]))
  lo, hi = intersect(a, b, sound=False)
  np.testing.assert_array_equal(lo, np.float32([0.5, 1e-3]))
  np.testing.assert_array_equal(hi, np.float32([1.0, 2e-3]))
  lo, hi = intersect(a, b)
  assert float(lo[1]) > float(hi[1])  # sound: left crossed, for the guards to report


def test_unsound_auto_on_floor_fake_quant_beside_an_identity_copy():
  """soundness_long (seed 11) found unsound `auto` raising InvalidBoundsError: f's bounds at the
  identity copy beside f_q's floor fake-quant crossed by 2e-3 in branch and bound."""
  from math import inf

  case = S.Case(family="fq", shape=(2, (6,), 2),
                act_f=S.Act(kind="relu", mode="nearest", scale=1.0, lo=0.0, hi=inf, slope=0.1, zero=0.0),
                act_q=S.Act(kind="fq", mode="floor", scale=(1.0, 41.911930084228516, 17.225522994995117,
                                                            46.70505905151367, 0.5066879987716675, 0.5884937644004822),
                            lo=-inf, hi=127.0, slope=0.1, zero=0.0),
                seed=0, compression=("bits", 2), gain=1.0, input_scale=(1.0, 1.0),
                lower=(-0.18105363845825195, -1.5374213457107544), upper=(1.5589863061904907, -0.40864497423171997))
  assert S.check("auto", case, sound=False).violations == []
  assert S.check("auto", case, sound=True).violations == []
