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


def test_product_of_inputs_is_a_square_node():
  assert [n.kind for n in qb.trace(lambda x: x * x, jnp.zeros(4)).nodes] == ["input", "square"]


def test_division_by_input_is_a_reciprocal():
  kinds = [n.kind for n in qb.trace(lambda x: 1.0 / (x + 2.0), jnp.zeros(4)).nodes]
  assert "reciprocal" in kinds


@pytest.mark.parametrize("fn, prim", [(jnp.sign, "sign"), (jnp.sin, "sin"), (jnp.log, "log")])
def test_other_unsupported_primitives(fn, prim):
  with pytest.raises(qb.UnsupportedPrimitiveError, match=f"'{prim}'"):
    qb.trace(lambda x: fn(x @ W), jnp.zeros(4))


def test_dtype_conversion_is_rejected():
  with pytest.raises(qb.UnsupportedPrimitiveError, match="convert_element_type"):
    qb.trace(lambda x: (x @ W).astype(jnp.bfloat16).astype(jnp.float32), jnp.zeros(4))


def test_unsupported_primitive_inside_library_function_has_a_location():
  with pytest.raises(qb.UnsupportedPrimitiveError, match="'expm1'") as err:
    qb.trace(lambda x: jax.nn.elu(x @ W), jnp.zeros(4))
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


# --- smooth and piecewise-linear activations -------------------------------------------------


@pytest.mark.parametrize(
    "name, fn, expected",
    [
        ("jnp.tanh", lambda x: jnp.tanh(x @ W), {"tanh"}),
        ("nn.tanh", lambda x: nn.tanh(x @ W), {"tanh"}),
        ("nnx.tanh", lambda x: nnx.tanh(x @ W), {"tanh"}),
        ("jax.nn.sigmoid", lambda x: jax.nn.sigmoid(x @ W), {"sigmoid"}),
        ("nn.sigmoid", lambda x: nn.sigmoid(x @ W), {"sigmoid"}),
        ("nnx.sigmoid", lambda x: nnx.sigmoid(x @ W), {"sigmoid"}),
        ("jax.nn.leaky_relu", lambda x: jax.nn.leaky_relu(x @ W), {"relu"}),
        ("nn.leaky_relu(0.2)", lambda x: nn.leaky_relu(x @ W, 0.2), {"relu"}),
        ("leaky slope above 1", lambda x: jax.nn.leaky_relu(x @ W, 1.5), {"relu"}),
        ("nn.hard_tanh", lambda x: nn.hard_tanh(x @ W), {"clip"}),
        ("jax.nn.hard_sigmoid", lambda x: jax.nn.hard_sigmoid(x @ W), {"clip"}),
        ("jnp.abs", lambda x: jnp.abs(x @ W), {"relu"}),
        ("where as relu", lambda x: jnp.where(x @ W > 0, x @ W, 0.0), {"relu"}),
        ("where with the constant first", lambda x: jnp.where(0.5 <= x @ W, x @ W, 0.5), {"clip"}),
        ("where of affine pieces", lambda x: jnp.where(x @ W >= 1.0, 2 * (x @ W) - 1, (x @ W) / 1), {"relu"}),
        ("nested where, three pieces",
         lambda x: jnp.where(x @ W > 1, 2 * (x @ W) - 1, jnp.where(x @ W < -1, 0.5 * (x @ W) - 0.5, x @ W)), {"relu"}),
        ("where with a vector threshold", lambda x: jnp.where(x @ W > jnp.array([0.0, 1.0, -1.0]), x @ W,
                                                                jnp.array([0.0, 1.0, -1.0])), {"clip"}),
        ("where with a constant mask", lambda x: jnp.where(jnp.array([True, False, True]), x @ W, -(x @ W)), set()),
    ],
)
def test_activation_forms_trace_exactly(name, fn, expected):
  graph = assert_traces_exactly(fn, (4,), num=64)
  assert set(kinds(graph)) - {"input", "affine", "add"} == expected


def test_leaky_relu_is_a_x_plus_relu_of_the_rest():
  """No constant is computed in float: the graph is a x + relu(x - a x), exactly leaky_relu in reals."""
  graph = qb.trace(lambda x: jax.nn.leaky_relu(x, 0.1), jnp.zeros(3))
  assert kinds(graph) == ["input", "affine", "add", "relu", "add"]
  assert np.all(np.asarray(graph.nodes[1].weights[0]) == np.float32(0.1))


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda x: jnp.where(x @ W > 0, 1.0, 0.0), "step function"),
        (lambda x: jnp.where(x @ W > 0, x @ W, x @ W + 1), "step function"),
        (lambda x: jnp.where(x[:3] > x @ W, x[:3], 0.0), "compares two input-dependent values"),
        (lambda x: jnp.where(x @ W > 0, x[:3], 0.0), "not piecewise-linear functions of the compared value"),
        (lambda x: (x @ W > 0).astype(jnp.float32), "comparing an input-dependent value"),
        (lambda x: jnp.where(x @ W > 0, jnp.tanh(x @ W), 0.0), "not piecewise-linear"),
    ],
)
def test_where_that_is_not_continuous_piecewise_linear_is_rejected(fn, match):
  with pytest.raises(qb.UnsupportedPrimitiveError, match=match) as err:
    qb.trace(fn, jnp.zeros(4))
  assert "test_trace.py" in str(err.value)


# --- pooling -----------------------------------------------------------------------------------


@settings(max_examples=20)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(0, 2),
       st.integers(0, 1), st.integers(1, 2), st.booleans())
def test_max_pooling_traces_exactly(wh, ww, sh, sw, pad_lo, pad_hi, dil, take_min):
  """Any window, stride, padding (-inf, so a padded tap never wins) and dilation."""
  window, strides = (wh, ww, 1), (sh, sw, 1)
  padding = ((pad_lo, pad_hi), (min(pad_lo, ww - 1), pad_hi), (0, 0))
  padding = tuple((min(a, (w - 1) * dil), min(b, (w - 1) * dil)) for (a, b), w in zip(padding, (wh, ww, 1)))
  if (ww - 1) * dil + 1 > 4 + padding[1][0] + padding[1][1]:
    ww = 1  # the window must fit into the (padded) input
    window, padding = (wh, 1, 1), (padding[0], (0, 0), (0, 0))
  op, init = (jax.lax.min, jnp.inf) if take_min else (jax.lax.max, -jnp.inf)
  fn = lambda x: jax.lax.reduce_window(x, init, op, window, strides, padding, window_dilation=(dil, dil, 1))
  graph = assert_traces_exactly(fn, (5, 4, 2))
  assert set(kinds(graph)) <= {"input", "affine", "add", "relu"}


def standard(fn, *args, **kwargs):
  """``fn`` under standard dtype promotion (flax's avg_pool divides by a Python int)."""
  with jax.numpy_dtype_promotion("standard"):
    return fn(*args, **kwargs)


@pytest.mark.parametrize(
    "name, fn",
    [
        ("nn.max_pool 2x2", lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))),
        ("nn.max_pool SAME", lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")),
        ("nn.avg_pool 2x2", lambda x: standard(nn.avg_pool, x, (2, 2), strides=(2, 2))),
        ("nn.avg_pool SAME without padding",
         lambda x: standard(nn.avg_pool, x, (3, 3), padding="SAME", count_include_pad=False)),
        ("min pooling", lambda x: jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (2, 2, 1), (2, 2, 1), "VALID")),
        ("global max", lambda x: jnp.max(x, axis=(0, 1))),
        ("max over odd axis", lambda x: jnp.max(x[:5], axis=0)),
        ("global min", lambda x: jnp.min(x)),
    ],
)
def test_pooling_traces_exactly(name, fn):
  graph = assert_traces_exactly(fn, (6, 6, 2))
  assert set(kinds(graph)) <= {"input", "affine", "add", "relu", "concat"}
  if "avg" in name:
    assert kinds(graph).count("relu") == 0  # average pooling is linear


def test_pooling_window_entirely_in_padding_is_rejected():
  fn = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (2,), (1,), ((0, 3),))
  with pytest.raises(qb.UnsupportedPrimitiveError, match="entirely in the padding"):
    qb.trace(fn, jnp.zeros(4))


# --- linen and nnx layers ----------------------------------------------------------------------


class BatchNormNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=True)(x)
    x = nn.Dropout(0.5, deterministic=True)(nn.tanh(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(2)(x.reshape(-1))


def test_linen_batch_norm_and_dropout_fold_into_affine_nodes():
  model = BatchNormNet()
  variables = model.init(jax.random.key(0), jnp.zeros((4, 4, 1)))
  # Non-trivial running statistics, so that the folded constants matter.
  stats = variables["batch_stats"]["BatchNorm_0"]
  variables = {**variables, "batch_stats": {"BatchNorm_0": {"mean": stats["mean"] + 0.3, "var": stats["var"] * 2.5}}}
  graph = assert_traces_exactly(functools.partial(model.apply, variables), (4, 4, 1))
  # rsqrt(var + eps) * scale was evaluated while tracing: batch norm is a scaling and a shift.
  assert set(kinds(graph)) <= {"input", "affine", "add", "relu", "tanh"}
  assert kinds(graph).count("tanh") == 1


def test_linen_sequential_with_new_activations():
  model = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(6), nn.leaky_relu, nn.Dense(6), nn.sigmoid,
                         nn.Dense(6), nn.hard_tanh, nn.Dense(2)])
  params = model.init(jax.random.key(1), jnp.zeros(3))
  graph = assert_traces_exactly(functools.partial(model.apply, params), (3,))
  assert {"tanh", "sigmoid", "relu", "clip"} <= set(kinds(graph))


class NnxConvNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 2, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(2, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.linear = nnx.Linear(2 * 2 * 2, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.tanh(self.bn(self.conv(x)))
    x = self.drop(nn.max_pool(x, (2, 2), strides=(2, 2)))
    return self.linear(nnx.relu(x).reshape(-1))


def test_nnx_conv_batch_norm_dropout_in_eval_mode():
  model = NnxConvNet(nnx.Rngs(0))
  model.bn.mean[...] = model.bn.mean[...] + 0.2
  model.bn.var[...] = model.bn.var[...] * 3.0
  model.eval()  # running statistics, no dropout
  graphdef, state = nnx.split(model)
  graph = assert_traces_exactly(lambda x: nnx.merge(graphdef, state)(x), (4, 4, 1))
  assert {"tanh", "relu"} <= set(kinds(graph))


def _quantized_inside(w, scale_of):
  """A layer that quantizes its weights inside the forward pass, as AQT and qwix do: ``round(w / s)``
  with ``s`` from ``w``'s largest magnitudes (a dozen equations on constants), applied to the input
  through a straight-through ``custom_vjp`` whose arguments are the input and the constants."""

  @jax.custom_vjp
  def ste(x, wq):
    return x @ wq

  ste.defvjp(lambda x, wq: (x @ wq, (x, wq)), lambda res, g: (g @ res[1].T, res[0][:, None] * g))

  def layer(x):
    s = scale_of(w)
    wq = jnp.clip(jnp.round(w / s), -127, 127).astype(jnp.int8).astype(jnp.float32) * s
    return jax.nn.relu(ste(x, wq)) + jnp.round(jnp.abs(w).max() * 4) / 4

  return layer


@pytest.mark.parametrize("scale_of", [lambda w: jnp.max(jnp.abs(w), axis=0) / 127,
                                      lambda w: jnp.sqrt(jnp.mean(w * w)) * 3 / 127 + 1e-6],
                         ids=["absmax per column", "rms"])
def test_constant_parts_fold_and_the_graph_equals_the_function(scale_of):
  w = jax.random.normal(jax.random.key(0), (5, 4))
  fn = _quantized_inside(w, scale_of)
  closed = jax.make_jaxpr(fn)(jnp.zeros(5))
  from qbound.trace.fold import fold_constants
  from qbound.trace.builder import FOLD_MIN_EQUATIONS
  rest, values = fold_constants(closed, [None], FOLD_MIN_EQUATIONS)   # the weights' quantization: large enough
  assert values and len(rest.jaxpr.eqns) < len(closed.jaxpr.eqns)
  assert fold_constants(jax.make_jaxpr(lambda x: x @ w)(jnp.zeros(5)), [None], FOLD_MIN_EQUATIONS) is None
  g = qb.trace(fn, jnp.zeros(5))
  xs = jax.random.normal(jax.random.key(1), (64, 5))
  np.testing.assert_array_equal(np.asarray(jax.vmap(g)(xs)), np.asarray(jax.vmap(fn)(xs)))
  assert [n.kind for n in g.nodes if n.kind != "affine"] == ["input", "relu"]


def test_a_custom_vjp_calls_constant_part_folds_where_the_walk_reaches_it(monkeypatch):
  # Partial evaluation keeps a custom_vjp call whole; the walk folds its constant arguments' part.
  w = jax.random.normal(jax.random.key(2), (3, 3))

  @jax.custom_vjp
  def quantized_matmul(x, w):
    s = jnp.max(jnp.abs(w)) / 127
    wq = jnp.round(jnp.clip(w / s, -127, 127)) * s
    return jnp.tanh(x) @ (wq + jnp.floor(w * 0) + jnp.ceil(w * 0) - jnp.abs(w) * 0)

  quantized_matmul.defvjp(lambda x, w: (quantized_matmul(x, w), None), lambda res, g: (g, g))
  from qbound.trace import builder
  folded = []
  real = builder.fold_constants
  monkeypatch.setattr(builder, "fold_constants", lambda *a: folded.append(real(*a)) or folded[-1])
  g = qb.trace(lambda x: quantized_matmul(x, w), jnp.zeros(3))
  assert [f is not None for f in folded] == [True]
  xs = jax.random.normal(jax.random.key(3), (32, 3))
  np.testing.assert_array_equal(np.asarray(jax.vmap(g)(xs)),
                                np.asarray(jax.vmap(lambda x: quantized_matmul(x, w))(xs)))


def test_a_folded_program_is_shared_by_models_of_the_same_shape_with_their_own_weights():
  # trace.fold keeps the known part's program by its text, the constants as arguments: a second
  # model of the same structure reuses it and still gets its own weights' quantization.
  from qbound.trace import fold as fold_module

  fns = [_quantized_inside(jax.random.normal(jax.random.key(seed), (5, 4)) * scale,
                           lambda w: jnp.max(jnp.abs(w), axis=0) / 127)
         for seed, scale in [(0, 1.0), (1, 3.0)]]
  graphs = [qb.trace(fn, jnp.zeros(5)) for fn in fns]
  programs = len(fold_module._PROGRAMS)
  again = qb.trace(fns[1], jnp.zeros(5))
  assert len(fold_module._PROGRAMS) == programs  # reused, not compiled again
  xs = jax.random.normal(jax.random.key(2), (64, 5))
  for g, fn in zip(graphs + [again], fns + [fns[1]]):
    np.testing.assert_array_equal(np.asarray(jax.vmap(g)(xs)), np.asarray(jax.vmap(fn)(xs)))
  assert not np.array_equal(np.asarray(jax.vmap(graphs[0])(xs)), np.asarray(jax.vmap(graphs[1])(xs)))


def test_a_known_part_with_a_callback_is_never_shared():
  # A callback's text names no function: two known parts that differ only in it print alike.
  import importlib

  fold_module = importlib.import_module("qbound.trace.fold")
  outs = []
  for value in (1.0, 2.0):
    callback = lambda v=value: np.full((3,), v, np.float32)  # noqa: E731
    fn = lambda x, cb=callback: x * (jax.pure_callback(cb, jax.ShapeDtypeStruct((3,), jnp.float32)) + jnp.round(  # noqa: E731
        jnp.arange(3.0) / 2) + jnp.floor(jnp.arange(3.0) / 3) + jnp.ceil(jnp.arange(3.0) / 4) - jnp.abs(jnp.arange(3.0)))
    closed = jax.make_jaxpr(fn)(jnp.zeros(3))
    part, _, _, _ = fold_module.pe.partial_eval_jaxpr_nounits(closed, [True], True)
    assert not fold_module._shareable(fold_module.pe.convert_constvars_jaxpr(part.jaxpr))
    _, values = fold_module.fold_constants(closed, [None])
    outs.append([np.asarray(v) for v in values])
  assert any(not np.array_equal(a, b) for a, b in zip(*outs))


def test_a_function_traced_again_gives_its_kept_graph_unless_its_constants_can_change():
  """Traced graphs are kept by their jaxpr's text and their constants' identities, where those are
  JAX arrays: the same function, or one computing the same with the same arrays, gives the same
  graph object; other arrays, another input shape, or a closure over a NumPy array (which can
  change in place) are traced afresh, so the graph always computes what the function does now."""
  model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(0), jnp.zeros(3))
  f = functools.partial(model.apply, params)
  g = qb.trace(f, jnp.zeros(3))
  assert qb.trace(f, jnp.zeros(3)) is g
  assert qb.trace(functools.partial(model.apply, params), jnp.zeros(3)) is g
  other = jax.tree_util.tree_map(lambda w: w + 1.0, params)
  g_other = qb.trace(functools.partial(model.apply, other), jnp.zeros(3))
  assert g_other is not g
  x = jnp.array([0.3, -0.2, 0.5])
  np.testing.assert_allclose(g_other(x), model.apply(other, x), rtol=1e-6)
  assert qb.trace(lambda v: f(v[:3]), jnp.zeros(4)) is not g

  w = np.array([[1.0, -2.0], [0.5, 1.5]], np.float32)
  h = lambda v: jax.nn.relu(v @ w)  # noqa: E731
  first = qb.trace(h, jnp.zeros(2))
  w[0, 0] = 3.0  # changed in place: the same object, another network
  second = qb.trace(h, jnp.zeros(2))
  y = jnp.array([1.0, 1.0])
  np.testing.assert_allclose(second(y), h(y), rtol=1e-6)
  assert not np.allclose(first(y), second(y))


def _interval_and_crown_enclose_samples(fn, n_in: int, seed: int, name: str = "") -> None:
  """Interval and CROWN bounds of ``fn`` over [-1, 1]^n_in have its output's shape and hold at 500
  sampled inputs."""
  box = qb.Box(-jnp.ones(n_in), jnp.ones(n_in))
  xs = jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (500, n_in)), jnp.float32)
  values = np.asarray(jax.vmap(fn)(xs))
  for bound in (qb.bounds.interval, qb.bounds.crown):
    out = bound(fn, box)
    assert out.lower.shape == values.shape[1:], name
    assert np.all(values >= np.asarray(out.lower) - 1e-5) and np.all(values <= np.asarray(out.upper) + 1e-5)


@pytest.mark.parametrize("name, fn", [
    ("concatenate, a constant between", lambda x: jnp.concatenate([x, jnp.array([5.0]), 2 * x])),
    ("stack of scalars", lambda x: jnp.stack([x[0], x[1]])),
    ("stack of vectors", lambda x: jnp.stack([x, 2 * x])),
    ("stack with a constant", lambda x: jnp.stack([x, jnp.ones(2), -x], axis=1)),
])
def test_concatenate_and_stack_keep_every_part_in_place(name, fn):
  """A constant concatenated between input-dependent parts was dropped (one output short, the rest
  misplaced); jnp.stack (its own primitive in current JAX) was refused."""
  _interval_and_crown_enclose_samples(fn, 2, 0, name)


@pytest.mark.parametrize("name, fn", [
    ("set a constant", lambda x: x.at[1].set(5.0)),
    ("set an input-dependent value", lambda x: x.at[0].set(x[3] * 2.0)),
    ("set a slice", lambda x: x.at[1:3].set(-x[:2])),
])
def test_at_set_with_constant_indices_is_traced(name, fn):
  """x.at[i].set(u) (a scatter with constant indices) is linear in x and u together; it was refused."""
  _interval_and_crown_enclose_samples(fn, 4, 1, name)
  with pytest.raises(qb.UnsupportedPrimitiveError, match="scatter-add"):
    qb.bounds.interval(lambda x: x.at[1:3].add(x[:2]), qb.Box(-jnp.ones(4), jnp.ones(4)))


@pytest.mark.parametrize("fn", [lambda x: jnp.where(x[0] > 0, x[0], 0.1 * x[0]),
                                lambda x: jax.nn.leaky_relu(x[1]) * 3.0 + x[2]])
def test_a_piecewise_function_of_one_entry_is_traced(fn):
  """jnp.where / leaky_relu on a scalar (0-d) value crashed inside the tracer (a bare Fraction where
  an array of them was expected)."""
  assert np.shape(fn(jnp.zeros(4))) == ()
  _interval_and_crown_enclose_samples(fn, 4, 2)
