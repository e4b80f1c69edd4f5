"""Tests of qbound.exact.milp: exact maximal errors, against hand computation and dense grids."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers as H
import qbound as qb
from qbound import graph as G
from qbound.bounds.crown import crown_bounds
from qbound.bounds.interval import interval_bounds
from qbound.exact import MilpResult, encoding, milp


pytestmark = pytest.mark.usefixtures("strict_promotion")


def assert_brackets(result, true_max, *, close=None):
  """``value <= true max <= upper``, value at most ``close`` below the true maximum.

  HiGHS stops at an absolute gap of 1e-6 and accepts maximisers within its feasibility tolerances,
  so the reached value may sit slightly below the true maximum: by ``result.tolerance`` by default.
  """
  close = result.tolerance if close is None else close
  assert result.value <= result.upper
  assert result.upper >= true_max
  assert result.value >= true_max - close


# --- hand-computable cases ---------------------------------------------------------------------


def test_shifted_relu():
  # relu(x) - relu(x - 0.25) = clip(x, 0, 0.25): the maximum 0.25 is reached on all of [0.25, 1].
  result = milp(jax.nn.relu, lambda x: jax.nn.relu(x - 0.25), qb.Box(-jnp.ones(1), jnp.ones(1)))
  assert result.optimal
  assert result.value == pytest.approx(0.25, abs=1e-12)
  assert 0.25 <= result.upper <= 0.25 + 1e-4
  assert result.maximizer[0] >= 0.25 - 1e-9
  assert isinstance(result, MilpResult) and "optimal" in str(result)


def test_sum_of_relus_versus_relu_of_sum():
  # relu(a) + relu(b) - relu(a + b) = min(|a|, |b|) when a, b have opposite signs, else 0.
  f = lambda x: (jax.nn.relu(x[0]) + jax.nn.relu(x[1]))[None]
  fq = lambda x: jax.nn.relu(x[0] + x[1])[None]
  box = qb.Box(jnp.array([-1.0, -0.5]), jnp.array([0.75, 2.0]))
  result = milp(f, fq, box)
  # max over the box of min(|a|, |b|) with opposite signs: a = -1, b in [0.5 .. 2] -> 1; a = 0.75, b = -0.5 -> 0.5.
  assert result.value == pytest.approx(1.0, abs=1e-9)
  a, b = result.maximizer
  assert a == pytest.approx(-1.0, abs=1e-6) and b >= 1.0 - 1e-6
  assert result.binaries >= 1


def test_linear_networks_need_no_binaries():
  # (W - W_q)^T x over a box: per output j, max_x d_j . x = sum_i max(d_ij l_i, d_ij u_i), and the
  # same for -d_j.
  w = jnp.array([[1.0, -2.0, 0.5], [3.0, -1.0, 0.0]])
  wq = jnp.array([[1.25, -2.0, 0.5], [2.5, -1.0, 0.125]])
  box = qb.Box(jnp.array([-1.0, 0.0]), jnp.array([2.0, 1.0]))
  result = milp(lambda x: x @ w, lambda x: x @ wq, box)
  d = np.asarray(w - wq)
  lo, hi = np.asarray(box.lower)[:, None], np.asarray(box.upper)[:, None]
  most = np.sum(np.maximum(d * lo, d * hi), axis=0)
  least = np.sum(np.minimum(d * lo, d * hi), axis=0)
  assert result.binaries == 0 and result.optimal
  np.testing.assert_allclose(result.per_output, np.maximum(most, -least), atol=1e-12)
  assert result.value == pytest.approx(np.max(np.maximum(most, -least)), abs=1e-12)


def test_identical_networks():
  f, _, _, _ = H.random_pair(0, H.SHAPES[0], bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  result = milp(f, f, box)
  assert result.value == 0.0
  assert result.upper <= 1e-4 and result.optimal


def test_differential_cuts_change_no_value():
  f, fq, _, _ = H.random_pair(3, H.SHAPES[0], bits=5)
  box = H.random_box(3, 2, radius=(0.3, 0.8))
  merged = qb.merge(f, fq, box)
  with_cuts = milp(merged, box=box)
  without = milp(merged, box=box, differential=False)
  assert with_cuts.value == pytest.approx(without.value, abs=max(with_cuts.tolerance, without.tolerance))
  assert with_cuts.binaries <= without.binaries  # tighter big-M values stabilise ReLUs
  assert_brackets(with_cuts, H.max_error(merged, H.grid(box, 401)))


def test_clip_nodes():
  # clip(x, 0, 1) - clip(x, 0.5, 0.75) on [-1, 2]: 0.5 at x <= 0, 0.25 at x >= 1.
  f = lambda x: jnp.clip(x, 0.0, 1.0)
  fq = lambda x: jnp.clip(x, 0.5, 0.75)
  box = qb.Box(-jnp.ones(1), 2 * jnp.ones(1))
  result = milp(f, fq, box)
  assert result.value == pytest.approx(0.5, abs=1e-9)
  assert result.maximizer[0] <= 1e-6
  # One-sided clips (min/max against a constant) and relu6 against a dense grid.
  f2 = lambda x: jnp.minimum(jax.nn.relu6(3 * x), 4.0) + jnp.maximum(x, 0.3)
  fq2 = lambda x: jnp.minimum(jax.nn.relu6(2.9 * x), 4.5) + jnp.maximum(x, 0.25)
  merged = qb.merge(f2, fq2, box)
  result = milp(merged, box=box, differential=False)
  assert_brackets(result, H.max_error(merged, H.grid(box, 30001)), close=1e-3)


@pytest.mark.parametrize("rounding", [jnp.round, jax.lax.round, jnp.floor, jnp.ceil])
def test_rounding_nodes(rounding):
  # A staircase minus a line: the maximum sits just beside a step, where the solver's maximiser (on
  # the step itself, the closure of each piece) is moved to the side the network really takes.
  g = lambda x: rounding(3.3 * x[:1] - 0.2 + x[1:]) * 0.3 - x[:1]
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  result = milp(g, box=box)
  assert result.integers >= 1 and result.optimal
  grid_max = H.max_error(qb.trace(g, box), H.grid(box, 1001))
  assert_brackets(result, grid_max)
  assert result.value <= grid_max + 5e-3  # the grid is within a step of the 1001-point spacing


class FakeQuantMLP(nn.Module):
  """The MLP of ``helpers.MLP`` with fake-quantized activations: ``clip(round(x / s), -8, 7) * s``."""

  hidden: tuple
  outputs: int
  scale: float = 0.125

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = jnp.clip(jnp.round(nn.relu(nn.Dense(width)(x)) / self.scale), -8, 7) * self.scale
    return nn.Dense(self.outputs)(x)


def activation_quantized(seed, shape):
  f, _, params, _ = H.random_pair(seed, shape, bits=4)
  fq = functools.partial(FakeQuantMLP(tuple(shape[1]), shape[2]).apply, params)
  return f, fq


def test_activation_quantized_network_against_grid():
  f, fq = activation_quantized(0, (1, (6,), 1))
  box = qb.Box(-jnp.ones(1), jnp.ones(1))
  merged = qb.merge(f, fq, box)
  assert "round" in {n.kind for n in merged.graph.nodes}
  # Without the differential bounds (their first compilation for this structure takes minutes).
  result = milp(merged, box=box, differential=False)
  assert result.optimal and result.integers > result.binaries
  assert_brackets(result, H.max_error(merged, H.grid(box, 200_001)))


@pytest.mark.slow
def test_activation_quantized_network_with_differential_cuts():
  f, fq = activation_quantized(0, H.SHAPES[0])
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  plain = milp(merged, box=box, differential=False)
  cut = milp(merged, box=box)
  assert cut.value == pytest.approx(plain.value, abs=1e-6)
  assert_brackets(cut, H.max_error(merged, H.grid(box, 801)))


# --- against brute-force grids -----------------------------------------------------------------


@pytest.mark.parametrize("seed, compression", [(0, dict(bits=3)), (1, dict(noise=0.1)), (2, dict(bits=5))])
def test_one_input_against_grid(seed, compression):
  f, fq, _, _ = H.random_pair(seed, H.SHAPES[4], **compression)
  box = qb.Box(jnp.array([-1.5]), jnp.array([1.0]))
  merged = qb.merge(f, fq, box)
  result = milp(merged, box=box)
  grid_max = H.max_error(merged, H.grid(box, 100_001))
  assert result.optimal
  # Piecewise linear in 1-D: a grid of spacing 2.5e-5 is within (slope * spacing) of the maximum.
  assert_brackets(result, grid_max)
  assert result.value <= grid_max * (1 + 1e-3) + 1e-6
  assert result.upper - result.value <= result.tolerance + 2e-6


@pytest.mark.parametrize("seed, compression", [(0, dict(bits=4)), (3, dict(noise=0.05))])
def test_two_inputs_against_grid(seed, compression):
  f, fq, _, _ = H.random_pair(seed, H.SHAPES[0], **compression)
  box = H.random_box(seed, 2, radius=(0.3, 0.8))
  merged = qb.merge(f, fq, box)
  result = milp(merged, box=box)
  grid_max = H.max_error(merged, H.grid(box, 401))
  assert result.optimal
  assert_brackets(result, grid_max)
  assert result.value <= grid_max * 1.02 + 1e-5  # the grid comes within 2% of the exact maximum
  # The bound is never looser than CROWN's, and the proven interval is a point up to the tolerance.
  lo, hi = crown_bounds(merged.graph, box, None, True)[merged.graph.output]
  assert result.upper <= max(float(-jnp.min(lo)), float(jnp.max(hi))) + 1e-12
  assert result.gap <= result.tolerance + 2e-6


def test_residual_and_concat_graph_against_grid():
  w = jax.random.normal(jax.random.key(0), (2, 4))
  v = jax.random.normal(jax.random.key(1), (6, 2))
  make = lambda w, v: (lambda x: jnp.concatenate([jax.nn.relu(x @ w), x]) @ v + x)
  f, fq = make(w, v), make(H.uniform_quantize(w, 3), v)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  merged = qb.merge(f, fq, box)
  kinds = {n.kind for n in merged.graph.nodes}
  assert {"concat", "add"} <= kinds
  result = milp(merged, box=box, differential=False)
  assert_brackets(result, H.max_error(merged, H.grid(box, 401)), )


def test_nnx_model():
  class Net(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(2, 6, rngs=rngs)
      self.l2 = nnx.Linear(6, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  qstate = H.uniform_quantize(state, bits=3)
  f = lambda x: nnx.merge(graphdef, state)(x)
  fq = lambda x: nnx.merge(graphdef, qstate)(x)
  box = qb.Box(-2 * jnp.ones(2), 2 * jnp.ones(2))
  result = milp(f, fq, box, differential=False)
  assert_brackets(result, H.max_error(qb.merge(f, fq, box), H.grid(box, 301)), )


# --- options and result fields -----------------------------------------------------------------


@pytest.fixture(scope="module")
def three_outputs():
  f, fq, _, _ = H.random_pair(1, H.SHAPES[2], bits=4)
  box = H.random_box(1, 5, radius=(0.05, 0.3))
  return qb.merge(f, fq, box), box


def test_per_output_values(three_outputs):
  merged, box = three_outputs
  full = milp(merged, box=box, prune=False, differential=False)
  assert full.per_output.shape == (3,) and full.per_output_upper.shape == (3,)
  assert full.pruned == 0 and full.solved == 6
  assert np.all(full.per_output <= full.per_output_upper)
  assert full.value == pytest.approx(np.max(full.per_output))
  sampled = np.abs(H.eval64(merged, H.sample_points(box, 1000))).max(axis=0)
  assert np.all(sampled <= full.per_output_upper)
  assert np.all(sampled <= full.per_output + 1e-9)  # every output solved exactly
  # Asking for one output gives that output's exact maximum.
  j = int(np.argmin(full.per_output))
  single = milp(merged, box=box, output=j, differential=False)
  assert single.value == pytest.approx(full.per_output[j], abs=1e-7)
  assert np.isnan(single.per_output_upper[(j + 1) % 3])
  # Pruning never changes the overall maximum.
  pruned = milp(merged, box=box, differential=False)
  assert pruned.value == pytest.approx(full.value, abs=1e-7)
  assert pruned.solved + pruned.pruned == 6


def test_given_bounds_are_used_as_big_m(three_outputs):
  merged, box = three_outputs
  ibp = interval_bounds(merged.graph, box, True)
  crown = crown_bounds(merged.graph, box, None, True)
  with_ibp = milp(merged, box=box, bounds=ibp)  # given bounds: no differential step
  with_crown = milp(merged, box=box, bounds=crown)
  assert with_ibp.value == pytest.approx(with_crown.value, abs=1e-7)
  assert with_ibp.binaries >= with_crown.binaries  # looser bounds, more unstable ReLUs


def test_time_limit_gives_a_proven_interval():
  f, fq, _, _ = H.random_pair(1, H.SHAPES[0], noise=0.05)
  box = H.random_box(1, 2, radius=(0.8, 1.0))
  merged = qb.merge(f, fq, box)
  crown_lo, crown_hi = crown_bounds(merged.graph, box, None, True)[merged.graph.output]
  crown_max = max(float(-jnp.min(crown_lo)), float(jnp.max(crown_hi)))
  grid_max = H.max_error(merged, H.grid(box, 301))
  for limit in (0.0, 0.05):
    result = milp(merged, box=box, time_limit=limit)
    assert not result.optimal
    assert result.value <= result.upper <= crown_max + 1e-12
    assert grid_max <= result.upper
    assert result.seconds < 10
  # Before any solve, the value comes from the sampled starts and upper from the bounds alone.
  none = milp(merged, box=box, time_limit=0.0)
  assert none.solved == 0 and none.value > 0
  assert none.upper == pytest.approx(float(np.nanmax(none.per_output_upper)))


def test_plain_graph_and_function_of_one_argument():
  fn = lambda x: jax.nn.relu(x) - 0.5 * jax.nn.relu(x - 0.2)
  box = qb.Box(-jnp.ones(1), jnp.ones(1))
  # max |g| on [-1, 1]: g(1) = 1 - 0.4 = 0.6.
  # (0.2 is not a float32 number: g(1) = 0.6 + 1.5e-9 for the float32 constant actually used.)
  assert milp(fn, box=box).value == pytest.approx(0.6, abs=1e-8)
  assert milp(qb.trace(fn, box), box=box).value == pytest.approx(0.6, abs=1e-8)


def test_result_is_frozen():
  result = milp(jax.nn.relu, lambda x: 0.5 * jax.nn.relu(x), qb.Box(-jnp.ones(1), jnp.ones(1)))
  assert result.value == pytest.approx(0.5)
  with pytest.raises(dataclasses.FrozenInstanceError):
    result.value = 0.0


def test_tolerance_scales_with_the_problem():
  small = encoding.encode(qb.trace(jax.nn.relu, jnp.zeros(1)),
                             [(np.array([-1.0]), np.array([1.0]))] * 2)
  assert encoding.tolerance(small) == pytest.approx(1e-5)


# --- errors ------------------------------------------------------------------------------------


def test_unsupported_node_kind():
  graph = qb.trace(jax.nn.relu, jnp.zeros(2))
  odd = dataclasses.replace(graph.nodes[1], kind="tanh")
  bad = G.Graph(nodes=(graph.nodes[0], odd), output=1)
  with pytest.raises(ValueError, match="node 1 is 'tanh'.*qbound.certify"):
    milp(bad, box=qb.Box(-jnp.ones(2), jnp.ones(2)))


def test_bad_arguments():
  f, fq, _, _ = H.random_pair(0, H.SHAPES[0], bits=4)
  box = qb.Box(-jnp.ones(2), jnp.ones(2))
  with pytest.raises(ValueError, match="empty"):
    milp(f, fq, qb.Box(jnp.ones(2), -jnp.ones(2)))
  with pytest.raises(ValueError, match="needs the input box"):
    milp(f, fq)
  merged = qb.merge(f, fq, box)
  with pytest.raises(ValueError, match="not both"):
    milp(merged, fq, box)
  with pytest.raises(ValueError, match=r"output must index the 2 outputs"):
    milp(merged, box=box, output=2)
  with pytest.raises(ValueError, match="bounds must hold"):
    milp(merged, box=box, bounds=[(box.lower, box.upper)])
  with pytest.raises(ValueError, match=r"box has shape \(3,\)"):
    milp(merged, box=qb.Box(-jnp.ones(3), jnp.ones(3)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_wider_nets_against_sampling(seed):
  """Heavier: 5 inputs, 8-8 hidden, unit boxes (tens of binaries, seconds per net)."""
  f, fq, _, _ = H.random_pair(seed, H.SHAPES[2], bits=4)
  box = H.random_box(seed, 5, radius=(0.5, 1.0))
  merged = qb.merge(f, fq, box)
  result = milp(merged, box=box, time_limit=120)
  sampled = H.max_error(merged, H.sample_points(box, 20_000, seed))
  assert result.optimal
  assert sampled <= result.value + 1e-9 <= result.upper + 1e-9
