"""Tests of qbound.trace: a pure JAX function -> a layer graph that computes the same thing."""

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
from qbound import graph as G

pytestmark = pytest.mark.usefixtures("strict_promotion")

W = jax.random.normal(jax.random.key(2), (4, 3))
W2 = jax.random.normal(jax.random.key(3), (3, 4))


def inputs(shape, num=16, seed=0, scale=2.0):
  return scale * jax.random.normal(jax.random.key(seed), (num, *shape))


def assert_traces_exactly(fn, shape, *, atol=1e-5, num=16):
  """The traced graph equals ``fn`` on random inputs (and is jit/vmap friendly)."""
  graph = qb.trace(fn, jnp.zeros(shape))
  xs = inputs(shape, num)
  expected = jax.vmap(fn)(xs)
  np.testing.assert_allclose(jax.vmap(graph)(xs), expected, atol=atol, rtol=1e-5)
  # A graph is a pytree: jit it as an argument (its weights are leaves, its structure static).
  np.testing.assert_allclose(jax.jit(lambda g, x: g(x))(graph, xs[0]), expected[0], atol=atol, rtol=1e-5)
  return graph


def kinds(graph):
  return [n.kind for n in graph.nodes]


def test_linen_compact_mlp():
  model = H.MLP(hidden=(8, 6), outputs=3)
  params = model.init(jax.random.key(0), jnp.zeros(5))
  graph = assert_traces_exactly(functools.partial(model.apply, params), (5,))
  assert kinds(graph) == ["input", "affine", "relu", "affine", "relu", "affine"]
  assert graph.input_shape == (5,) and graph.output_shape == (3,)
  assert "linear.py" in graph.nodes[1].where  # the source of every layer is kept for messages


def test_linen_sequential():
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(1), jnp.zeros(3))
  graph = assert_traces_exactly(functools.partial(model.apply, params), (3,))
  assert kinds(graph).count("relu") == 2


class NnxNet(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 8, rngs=rngs)
    self.l3 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def test_nnx_model_via_split_and_merge():
  model = NnxNet(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  fn = lambda x: nnx.merge(graphdef, state)(x)
  graph = assert_traces_exactly(fn, (4,))
  assert kinds(graph) == ["input", "affine", "relu", "affine", "relu", "affine"]


def test_reshape_flatten_transpose():
  w = jax.random.normal(jax.random.key(4), (6, 4))

  def fn(x):  # x: (2, 3)
    h = jax.nn.relu(x.reshape(-1) @ w)  # flatten then dense
    h = h.reshape(2, 2).T.ravel()  # reshape, transpose, flatten again
    return jnp.concatenate([h[::-1], h[:2] - h[2:]])  # rev, slices, concat

  graph = assert_traces_exactly(fn, (2, 3))
  assert graph.output_shape == (6,)


def test_routing_and_constant_operations():
  c = jnp.arange(4.0) - 1.5

  def fn(x):
    y = jax.nn.relu(x * c - 0.5) / 3.0  # mul by a constant vector, shift, div by a constant
    y = jnp.pad(y, (1, 1), constant_values=0.25)  # pad with a non-zero constant: affine
    return jnp.mean(y) * jnp.ones(2) - jnp.sum(-x[:2])  # reduce, broadcast, neg, sub

  assert_traces_exactly(fn, (4,))


@pytest.mark.parametrize(
    "name, fn",
    [
        ("nn.relu", lambda x: nn.relu(x @ W)),
        ("jax.nn.relu", lambda x: jax.nn.relu(x @ W)),
        ("jnp.maximum(x, 0)", lambda x: jnp.maximum(x @ W, 0.0)),
        ("jnp.maximum(0, x)", lambda x: jnp.maximum(0.0, x @ W)),
        ("jnp.clip", lambda x: jnp.clip(x @ W, -0.5, 0.5)),
        ("jnp.clip vector bounds", lambda x: jnp.clip(x @ W, jnp.array([-1.0, 0.0, 0.2]), jnp.array([1.0, 0.5, 0.3]))),
        ("jnp.clip lower only", lambda x: jnp.clip(x @ W, min=0.3)),
        ("jnp.minimum const", lambda x: jnp.minimum(x @ W, 0.3)),
        ("relu6", lambda x: jax.nn.relu6(3 * (x @ W))),
        ("clip of clip", lambda x: jnp.clip(jnp.clip(x @ W, -1.0, 1.0), -0.5, 2.0)),
        ("maximum of two values", lambda x: jnp.maximum(x[:3], x @ W)),
        ("minimum of two values", lambda x: jnp.minimum(x[:3], x @ W)),
        ("lax.clamp", lambda x: jax.lax.clamp(-0.2, x @ W, 0.7)),
    ],
)
def test_piecewise_linear_forms(name, fn):
  graph = assert_traces_exactly(fn, (4,))
  assert set(kinds(graph)) <= {"input", "affine", "add", "relu", "clip"}


def test_residual_and_concat_nodes():
  def fn(x):
    h = jax.nn.relu(x @ W) @ W2
    return jnp.concatenate([x + h, jax.nn.relu(h - x)])

  graph = assert_traces_exactly(fn, (4,))
  assert "add" in kinds(graph) and "concat" in kinds(graph)


@pytest.mark.parametrize("example", [jnp.zeros(4), np.zeros(4), jax.ShapeDtypeStruct((4,), jnp.float32),
                                     qb.Box(jnp.zeros(4), jnp.ones(4))])
def test_example_forms(example):
  graph = qb.trace(lambda x: jax.nn.relu(x @ W), example)
  assert graph.input_shape == (4,)


def test_a_graph_traces_to_itself():
  graph = qb.trace(lambda x: jax.nn.relu(x @ W), jnp.zeros(4))
  assert qb.trace(graph, jnp.zeros(4)) is graph
  assert "relu" in graph.summary() and "Graph(3 nodes" in repr(graph)


def test_graph_is_a_pytree_with_static_structure():
  """Different weights, same structure: one compiled function serves both (jit cache reuse)."""
  # The same source line: the source location is part of the static structure (see `where`).
  make = lambda w: (lambda x: jax.nn.relu(x @ w))
  fa, fb = make(W), make(2 * W)
  ga, gb = qb.trace(fa, jnp.zeros(4)), qb.trace(fb, jnp.zeros(4))
  assert jax.tree_util.tree_structure(ga) == jax.tree_util.tree_structure(gb)
  x = jnp.ones(4)
  traces = []

  @jax.jit
  def call(g, x):
    traces.append(1)
    return g(x)

  np.testing.assert_allclose(call(ga, x), fa(x), rtol=1e-6)
  np.testing.assert_allclose(call(gb, x), fb(x), rtol=1e-6)
  assert len(traces) == 1


@settings(max_examples=6)
@given(st.sampled_from(H.SHAPES), st.integers(0, 10_000))
def test_traced_mlp_equals_fn_property(shape, seed):
  f, _, _, _ = H.random_pair(seed, shape, bits=4)
  graph = qb.trace(f, jnp.zeros(shape[0]))
  xs = inputs((shape[0],), 8, seed)
  np.testing.assert_allclose(jax.vmap(graph)(xs), jax.vmap(f)(xs), atol=1e-5, rtol=1e-5)


class ConvNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(2, (3, 3))(x))
    return nn.Dense(2)(x.reshape(-1))


def test_linen_conv_and_flatten():
  model = ConvNet()
  params = model.init(jax.random.key(0), jnp.zeros((5, 5, 1)))
  graph = assert_traces_exactly(functools.partial(model.apply, params), (5, 5, 1))
  assert kinds(graph)[1] == "affine" and "relu" in kinds(graph)
  assert any(n.op is not None and n.op.name == "conv_general_dilated" for n in graph.nodes[1:])


# --- errors ------------------------------------------------------------------------------------


def test_unsupported_primitive_names_primitive_and_location():
  with pytest.raises(qb.UnsupportedPrimitiveError, match=r"primitive 'sin' used at .*test_trace\.py:\d+") as err:
    qb.trace(lambda x: jnp.sin(x @ W), jnp.zeros(4))
  assert "Supported:" in str(err.value)
  assert isinstance(err.value, ValueError)  # callers catching ValueError see it too


def test_product_of_inputs_is_not_linear():
  with pytest.raises(qb.UnsupportedPrimitiveError, match=r"'mul' used at .*test_trace\.py.*not linear"):
    qb.trace(lambda x: x * x, jnp.zeros(4))


def test_division_by_input_is_rejected():
  with pytest.raises(qb.UnsupportedPrimitiveError, match="'div'.*dividing by an input-dependent value"):
    qb.trace(lambda x: 1.0 / (x + 2.0), jnp.zeros(4))


@pytest.mark.parametrize("fn, prim", [(jnp.abs, "abs"), (jnp.tanh, "tanh"), (jnp.exp, "exp")])
def test_other_unsupported_primitives(fn, prim):
  with pytest.raises(qb.UnsupportedPrimitiveError, match=f"'{prim}'"):
    qb.trace(lambda x: fn(x @ W), jnp.zeros(4))


def test_dtype_conversion_is_rejected():
  with pytest.raises(qb.UnsupportedPrimitiveError, match="convert_element_type"):
    qb.trace(lambda x: (x @ W).astype(jnp.bfloat16).astype(jnp.float32), jnp.zeros(4))


def test_unsupported_primitive_inside_library_function_has_a_location():
  with pytest.raises(qb.UnsupportedPrimitiveError) as err:
    qb.trace(lambda x: jax.nn.hard_tanh(x @ W), jnp.zeros(4))
  assert "used at ." not in str(err.value)
  assert "test_trace.py" in str(err.value)


def test_multiple_outputs_are_rejected():
  with pytest.raises(ValueError, match="single array; it returns 2 outputs"):
    qb.trace(lambda x: (x @ W, x), jnp.zeros(4))


def test_constant_function_is_rejected():
  with pytest.raises(ValueError, match="does not depend on its input"):
    qb.trace(lambda x: jnp.ones(3), jnp.zeros(4))


def test_integer_output_is_rejected():
  with pytest.raises(ValueError, match="float array"):
    qb.trace(lambda x: jnp.argmax(x), jnp.zeros(4))


def test_wrong_input_shape_is_reported():
  with pytest.raises(ValueError, match=r"could not be evaluated on an input of shape \(4,\)"):
    qb.trace(lambda x: x @ jnp.ones((7, 2)), jnp.zeros(4), label="f")


def test_node_kinds_are_known():
  graph = qb.trace(lambda x: jnp.clip(jax.nn.relu(x @ W) @ W2, -1.0, 1.0) + x, jnp.zeros(4))
  assert set(kinds(graph)) <= {G.INPUT, G.AFFINE, G.ADD, G.CONCAT, G.RELU, getattr(G, "CLIP", "clip")}
