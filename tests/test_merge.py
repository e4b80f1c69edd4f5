"""Tests of qbound.merge: the merged difference network g(x) = f(x) - f_q(x)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound.merge import merge_graphs, same_structure

pytestmark = pytest.mark.usefixtures("strict_promotion")


def random_inputs(n_in, num=32, seed=0):
  return 2 * jax.random.normal(jax.random.key(seed), (num, n_in))


def dense_forward(layers, x):
  """The merged network from its explicit dense layers, in float64 numpy."""
  h = np.asarray(x, np.float64)
  for w, b, act in layers:
    h = h @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    if act == "relu":
      h = np.maximum(h, 0)
  return h


@settings(max_examples=10)
@given(st.sampled_from(H.SHAPES), st.integers(0, 10_000), st.integers(2, 8))
def test_merged_equals_difference_linen(shape, seed, bits):
  f, fq, _, _ = H.random_pair(seed, shape, bits=bits)
  merged = qb.merge(f, fq, jnp.zeros(shape[0]))
  xs = random_inputs(shape[0], 16, seed)
  np.testing.assert_allclose(jax.vmap(merged)(xs), jax.vmap(f)(xs) - jax.vmap(fq)(xs), atol=2e-5, rtol=1e-5)
  assert merged.input_shape == (shape[0],) and merged.output_shape == (shape[2],)


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 6, rngs=rngs)
    self.l2 = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def test_merged_equals_difference_nnx():
  graphdef, state = nnx.split(NnxNet(nnx.Rngs(0)))
  qstate = H.uniform_quantize(state, bits=3)
  f = lambda x: nnx.merge(graphdef, state)(x)
  fq = lambda x: nnx.merge(graphdef, qstate)(x)
  merged = qb.merge(f, fq, jnp.zeros(3))
  xs = random_inputs(3)
  np.testing.assert_allclose(jax.vmap(merged)(xs), jax.vmap(f)(xs) - jax.vmap(fq)(xs), atol=1e-5)
  assert merged.paired


def test_an_nnx_model_in_training_mode_is_told_to_call_eval():
  # BatchNorm in training mode updates its statistics as it runs: a Flax trace error, explained.
  model = nnx.Sequential(nnx.Linear(4, 6, rngs=nnx.Rngs(0)), nnx.BatchNorm(6, rngs=nnx.Rngs(0)), nnx.relu)
  graphdef, state = nnx.split(model)
  f = lambda x: nnx.merge(graphdef, state)(x)  # noqa: E731
  with pytest.raises(ValueError, match=r"Call model.eval\(\)"):
    qb.merge(f, f, qb.linf_ball(jnp.zeros(4), 0.1))
  model.eval()
  graphdef, state = nnx.split(model)
  qb.merge(lambda x: nnx.merge(graphdef, state)(x), lambda x: nnx.merge(graphdef, state)(x),
           qb.linf_ball(jnp.zeros(4), 0.1))


def test_merged_graph_layout():
  f, fq, _, _ = H.random_pair(0, H.SHAPES[0], bits=4)
  merged = qb.merge(f, fq, jnp.zeros(2))
  nodes = merged.graph.nodes
  n_f = len(merged.f_graph.nodes)
  assert merged.fq_offset == n_f - 1
  assert len(nodes) == n_f + len(merged.fq_graph.nodes) - 1 + 1  # shared input, one final add
  last = nodes[merged.graph.output]
  assert last.kind == "add" and last.attrs == (1, -1)
  assert last.inputs == (merged.f_graph.output, merged.fq_graph.output + merged.fq_offset)
  assert nodes[merged.fq_offset + 1].inputs == (0,)  # f_q reads the same input node
  assert "f_q: node" in merged.summary()


def test_dense_layers_block_diagonal():
  shape = (3, (6, 5), 2)
  f, fq, params, qparams = H.random_pair(1, shape, bits=3)
  merged = qb.merge(f, fq, jnp.zeros(3))
  layers = merged.dense_layers()
  assert [w.shape for w, _, _ in layers] == [(3, 12), (12, 10), (10, 4), (4, 2)]
  assert [a for _, _, a in layers] == ["relu", "relu", "linear", "linear"]
  kernels = [params["params"][f"Dense_{i}"]["kernel"] for i in range(3)]
  qkernels = [qparams["params"][f"Dense_{i}"]["kernel"] for i in range(3)]
  # First layer [W, W_q] acting on x.
  np.testing.assert_allclose(layers[0][0], np.concatenate([kernels[0], qkernels[0]], axis=1))
  # Hidden layers [[W, 0], [0, W_q]].
  for k in (1, 2):
    w = layers[k][0]
    n_in, n_out = kernels[k].shape
    np.testing.assert_allclose(w[:n_in, :n_out], kernels[k])
    np.testing.assert_allclose(w[n_in:, n_out:], qkernels[k])
    assert not np.any(w[:n_in, n_out:]) and not np.any(w[n_in:, :n_out])
  # Last layer [I; -I].
  np.testing.assert_array_equal(layers[-1][0], np.concatenate([np.eye(2), -np.eye(2)]))
  # Evaluated as numpy matrices, the layers reproduce f - f_q.
  xs = np.asarray(random_inputs(3))
  np.testing.assert_allclose(dense_forward(layers, xs), jax.vmap(f)(xs) - jax.vmap(fq)(xs), atol=1e-5)


def test_dense_layers_compose_consecutive_affine_maps():
  model = nn.Sequential([nn.Dense(4), nn.Dense(5), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), jnp.zeros(3))
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, H.perturb(params, jax.random.key(1), 0.1))
  merged = qb.merge(f, fq, jnp.zeros(3))
  layers = merged.dense_layers()
  assert [w.shape for w, _, _ in layers] == [(3, 10), (10, 4), (4, 2)]
  xs = np.asarray(random_inputs(3))
  np.testing.assert_allclose(dense_forward(layers, xs), jax.vmap(f)(xs) - jax.vmap(fq)(xs), atol=1e-4)


def test_paired_layers():
  f, fq, _, _ = H.random_pair(2, H.SHAPES[1], noise=0.1)
  merged = qb.merge(f, fq, jnp.zeros(3))
  assert merged.paired and same_structure(merged.f_graph, merged.fq_graph)
  for layer in merged.layers[1:]:
    f_node, fq_node = merged.graph.nodes[layer.f_node], merged.graph.nodes[layer.fq_node]
    assert f_node.kind == fq_node.kind == layer.kind
    assert f_node.shape == fq_node.shape == layer.shape
    assert layer.fq_node == layer.f_node + merged.fq_offset
  assert merged.layers[0].f_node == merged.layers[0].fq_node == 0


def test_different_structures_are_not_paired():
  big = H.mlp((8, 8), 2)
  small = H.mlp((8,), 2)
  pb = big.init(jax.random.key(0), jnp.zeros(2))
  ps = small.init(jax.random.key(1), jnp.zeros(2))
  merged = qb.merge(functools.partial(big.apply, pb), functools.partial(small.apply, ps), jnp.zeros(2))
  assert not merged.paired
  with pytest.raises(ValueError, match="different layer structures"):
    merged.layers
  with pytest.raises(ValueError, match="different layer sequences"):
    merged.dense_layers()
  xs = random_inputs(2)
  np.testing.assert_allclose(jax.vmap(merged)(xs), jax.vmap(functools.partial(big.apply, pb))(xs)
                             - jax.vmap(functools.partial(small.apply, ps))(xs), atol=1e-5)
  assert "structures differ" in merged.summary()


def test_mismatched_output_shapes():
  f = lambda x: jax.nn.relu(x @ jnp.ones((3, 2)))
  fq = lambda x: jax.nn.relu(x @ jnp.ones((3, 4)))
  with pytest.raises(ValueError, match=r"f returns shape \(2,\) but f_q returns \(4,\)"):
    qb.merge(f, fq, jnp.zeros(3))


def test_mismatched_input_shapes():
  ga = qb.trace(lambda x: x @ jnp.ones((3, 2)), jnp.zeros(3))
  gb = qb.trace(lambda x: x @ jnp.ones((4, 2)), jnp.zeros(4))
  with pytest.raises(ValueError, match=r"f takes inputs of shape \(3,\) but f_q takes \(4,\)"):
    merge_graphs(ga, gb)
  with pytest.raises(ValueError, match="fq could not be evaluated"):
    qb.merge(lambda x: x @ jnp.ones((3, 2)), lambda x: x @ jnp.ones((4, 2)), jnp.zeros(3))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_parameters(bad):
  f, _, params, _ = H.random_pair(0, H.SHAPES[0], bits=4)
  broken = jax.tree_util.tree_map(lambda w: w, params)
  broken["params"]["Dense_1"]["kernel"] = broken["params"]["Dense_1"]["kernel"].at[0, 0].set(bad)
  fq = functools.partial(H.mlp((8, 8), 2).apply, broken)
  with pytest.raises(ValueError, match=r"fq: the weights of node \d+ .* contain (NaN|inf)"):
    qb.merge(f, fq, jnp.zeros(2))


def test_dense_layers_need_an_mlp():
  fn = lambda x: jnp.concatenate([jax.nn.relu(x @ jnp.ones((2, 2))), x])
  merged = qb.merge(fn, fn, jnp.zeros(2))
  with pytest.raises(ValueError, match="simple chain; dense_layers"):
    merged.dense_layers()


def test_merging_the_same_functions_again_gives_the_kept_network():
  """A certify call in a loop merges the same f and f_q each time: the traced graphs are kept
  (qbound.trace), and so is their merge; another f_q is merged afresh, and non-finite weights are
  still refused on every call."""
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), jnp.zeros(3))
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=4))
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert qb.merge(f, fq, box) is merged
  other = qb.merge(f, functools.partial(model.apply, qb.quantize.uniform(params, bits=3)), box)
  assert other is not merged and other.f_graph is merged.f_graph
  x = jnp.array([0.2, -0.4, 0.7])
  np.testing.assert_allclose(other(x), f(x) - model.apply(qb.quantize.uniform(params, bits=3), x), rtol=1e-5,
                             atol=1e-6)
  broken = jax.tree_util.tree_map(lambda w: w.at[0].set(jnp.nan) if w.ndim == 1 else w, params)
  for _ in range(2):
    with pytest.raises(ValueError, match="NaN"):
      qb.merge(f, functools.partial(model.apply, broken), box)


@pytest.mark.parametrize("lower, upper, message", [
    (jnp.ones(2), -jnp.ones(2), "empty"),
    (jnp.array([jnp.nan, 0.0]), jnp.ones(2), "not finite"),
    (jnp.zeros(2), jnp.ones(3), "shape"),
])
def test_merge_rejects_a_box_that_certifies_nothing(lower, upper, message):
  """A box given to merge fixed only the input shape: an empty, NaN or mismatched one passed, and
  only failed later where it was used."""
  with pytest.raises(ValueError, match=message):
    qb.merge(lambda x: x * 2.0, lambda x: x * 2.0, qb.Box(lower, upper))
