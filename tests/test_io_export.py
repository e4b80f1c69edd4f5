"""Tests of qbound.io.export_onnx, export_vnnlib, export_property and ``qbound export``.

Every exported network is run by onnxruntime and read back with qbound.io.load_onnx, on random
inputs, against the JAX function it came from (for merged networks: f(x) - f_q(x)).

Tolerances. The exported graph holds the same float32 constants in the same real operations, so
elementwise-only graphs must agree bit for bit; where a matrix product sums, onnxruntime (MLAS)
and XLA choose their own accumulation order, which moves float32 results by a few units in the
last place of the *summed terms*. Hence the absolute tolerance ``ORT_TOL * scale``, where
``scale`` is the largest magnitude of f's and f_q's outputs, not of their (small) difference:
the roundings of f and f_q do not cancel in f - f_q. ACAS Xu 1_1 differs by 9e-7 at a scale of
0.4 (2e-6 relative); ``ORT_TOL = 1e-5`` leaves 5x headroom and is still 10^4 below what a wrong
sign, a missing bias or a misplaced axis produces. ``load_onnx`` runs the same XLA operations on
the same float32 weights, so its round trip is bit-identical in practice (ACAS Xu: max difference
0.0 on 1,000 inputs); it is checked with ``LOAD_TOL = 1e-6`` relative to the output scale (a few
ulps), so that XLA may pick another summation order for the batch-1 matrix product on another CPU.
"""

import decimal
import doctest
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qbound as qb
from qbound import cli
from qbound import graph as G
from qbound.io import bundled_path
from qbound.io.vnnlib import format_real, vnnlib_text

onnx = pytest.importorskip("onnx", reason="the onnx package is needed (pip install qbound[onnx])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to check against")

ORT_TOL = 1e-5
LOAD_TOL = 1e-6
ACAS = str(bundled_path("ACASXU_run2a_1_1_batch_2000.nnet"))
ACAS_16 = str(bundled_path("ACASXU_run2a_1_1_batch_2000_16bit.nnet"))
ACAS_P1 = (np.array([55947.691, -3.141592, -3.141592, 1145, 0]), np.array([60760, 3.141592, 3.141592, 1200, 60]))


# ------------------------------------------------------------------------------------------ helpers


def run_onnxruntime(path, xs):
  """Outputs of the ONNX file on a batch ``xs`` (one run per input if its batch axis is 1)."""
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  xs = np.asarray(xs, np.float32)
  if session.get_inputs()[0].shape[0] == 1:
    return np.concatenate([session.run(None, {"x": x[None]})[0] for x in xs])
  return session.run(None, {"x": xs})[0]


def run_loaded(path, xs):
  apply, params = qb.io.load_onnx(path)
  return np.asarray(jax.jit(jax.vmap(apply, in_axes=(None, 0)))(params, jnp.asarray(xs)))


def check_export(net, path, xs, want, scale, *, example=None, batch_size=1, loaded=True):
  """Exports ``net`` and checks onnxruntime's and load_onnx's outputs on ``xs`` against ``want``."""
  model = qb.io.export_onnx(net, path, example, batch_size=batch_size)
  np.testing.assert_allclose(run_onnxruntime(path, xs), want, rtol=0, atol=ORT_TOL * scale)
  if loaded:
    np.testing.assert_allclose(run_loaded(path, xs), want, rtol=0, atol=LOAD_TOL * scale)
  return model


def op_types(model):
  return [n.op_type for n in model.graph.node]


def difference(f, fq, xs):
  """``(f(xs) - fq(xs), scale)`` with the scale of the outputs of f and fq."""
  a, b = np.asarray(jax.vmap(f)(xs)), np.asarray(jax.vmap(fq)(xs))
  return a - b, max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))


def uniform(seed, shape, n=32, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, (n, *shape)).astype(np.float32)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):  # NHWC without the batch axis, as Flax takes it
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME")(x))
    x = nn.relu(nn.Conv(6, (2, 2), kernel_dilation=2, feature_group_count=3, padding=((1, 0), (0, 2)))(x))
    x = x.reshape(-1)
    return nn.Dense(4)(x)


class Residual(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
    h = nn.Conv(4, (3, 3), padding="SAME")(h)
    y = nn.relu(h + nn.Conv(4, (1, 1))(x))  # residual addition
    y = jnp.concatenate([y, h], axis=-1)    # concatenation along channels
    return nn.Dense(3)(y.reshape(-1))


def flax_pair(module, shape, bits, seed=0):
  # Random N(0, 0.3^2) weights and biases in the module's param tree: no eager init to compile.
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(seed), jnp.zeros(shape))
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)
  qparams = qb.quantize.uniform(params, bits=bits)
  return functools.partial(module.apply, params), functools.partial(module.apply, qparams)


# --------------------------------------------------------------------------------- merged networks


@pytest.mark.parametrize("batch_size", [1, None], ids=["batch1", "symbolic"])
def test_mlp_merged_network_computes_f_minus_fq(tmp_path, batch_size):
  f, fq = flax_pair(MLP(), (5,), bits=4)
  merged = qb.merge(f, fq, jnp.zeros(5))
  xs = uniform(0, (5,))
  want, scale = difference(f, fq, xs)
  model = check_export(merged, tmp_path / "mlp.onnx", xs, want, scale, batch_size=batch_size)
  ops = op_types(model)
  assert ops.count("MatMul") == 6 and ops.count("Relu") == 4 and ops[-1] == "Sub"
  dims = model.graph.input[0].type.tensor_type.shape.dim
  assert [d.dim_param or d.dim_value for d in dims] == [1 if batch_size else "batch", 5]


def test_conv_net_uses_native_conv(tmp_path):
  f, fq = flax_pair(CNN(), (9, 9, 3), bits=6)
  merged = qb.merge(f, fq, jnp.zeros((9, 9, 3)))
  xs = uniform(1, (9, 9, 3), n=16)
  want, scale = difference(f, fq, xs)
  model = check_export(merged, tmp_path / "cnn.onnx", xs, want, scale)
  ops = op_types(model)
  assert ops.count("Conv") == 4
  convs = [n for n in model.graph.node if n.op_type == "Conv"]
  attrs = {a.name: onnx.helper.get_attribute_value(a) for a in convs[1].attribute}
  assert attrs["group"] == 3 and attrs["dilations"] == [2, 2] and attrs["pads"] == [1, 0, 0, 2]
  # No explicit matrices: the file holds about the weights themselves, not (in x out) matrices.
  n_weights = sum(np.size(w) for n in merged.graph.nodes for w in n.weights)
  n_stored = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
  assert n_stored < 2 * n_weights + 2000


def test_residual_cnn_with_add_and_concat(tmp_path):
  f, fq = flax_pair(Residual(), (6, 6, 2), bits=5)
  merged = qb.merge(f, fq, jnp.zeros((6, 6, 2)))
  assert {"add", "concat"} <= {n.kind for n in merged.graph.nodes}
  xs = uniform(2, (6, 6, 2), n=16)
  want, scale = difference(f, fq, xs)
  model = check_export(merged, tmp_path / "res.onnx", xs, want, scale, batch_size=None)
  assert {"Conv", "Concat", "Add", "Sub"} <= set(op_types(model))


def test_activation_quantization_round_and_clip(tmp_path):
  model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(8), nn.relu, nn.Dense(2)])
  params = model.init(jax.random.key(3), jnp.zeros(4))
  calib = jax.random.normal(jax.random.key(4), (64, 4))
  ranges = qb.quantize.activations.calibrate(model.apply, params, calib)
  apply_q = qb.quantize.activations.quantize_activations(model.apply, ranges, bits=4)
  f, fq = functools.partial(model.apply, params), functools.partial(apply_q, params)
  merged = qb.merge(f, fq, jnp.zeros(4))
  kinds = [n.kind for n in merged.graph.nodes]
  assert "round" in kinds and "clip" in kinds
  xs = uniform(5, (4,), n=64, low=-2, high=2)
  want, scale = difference(f, fq, xs)
  onnx_model = check_export(merged, tmp_path / "actq.onnx", xs, want, scale)
  assert {"Round", "Clip", "Identity"} <= set(op_types(onnx_model))  # Identity: f's "none" rounding


def test_fake_quant_by_hand_per_element_clip_floor_ceil(tmp_path):
  w = jax.random.normal(jax.random.key(6), (3, 5))
  lo, hi = jnp.array([-3.0, -2, -1, -4, -2]), jnp.array([2.0, 3, 1, 4, 5])

  def f(x):
    return x @ w

  def fq(x):
    z = x @ w
    return jnp.clip(jnp.round(z * 4.0), lo * 4, hi * 4) / 4.0 + jnp.floor(z) - jnp.ceil(z)

  merged = qb.merge(f, fq, jnp.zeros(3))
  xs = uniform(7, (3,), n=64, low=-3, high=3)
  want, scale = difference(f, fq, xs)
  model = check_export(merged, tmp_path / "hand.onnx", xs, want, scale)
  assert {"Max", "Min", "Round", "Floor", "Ceil", "Div"} <= set(op_types(model))


# ------------------------------------------------------------------------------- exact elementwise


def test_elementwise_graph_is_bit_exact_and_rounds_half_to_even(tmp_path):
  def fn(x):
    return jnp.round(x * 2.0) + jnp.clip(x, -1.0, 0.5) - jnp.floor(x) / 3.0 + jnp.ceil(-x)

  halves = np.array([[0.25, 0.75, 1.25, -0.25, -0.75, -1.25]], np.float32)  # x * 2 hits .5 exactly
  xs = np.concatenate([halves, uniform(8, (6,), n=31, low=-3, high=3)])
  model = qb.io.export_onnx(fn, tmp_path / "ew.onnx", jnp.zeros(6))
  want = np.asarray(jax.vmap(fn)(xs))
  np.testing.assert_array_equal(run_onnxruntime(tmp_path / "ew.onnx", xs), want)
  np.testing.assert_array_equal(run_loaded(tmp_path / "ew.onnx", xs), want)
  assert "Clip" in op_types(model) and "MatMul" not in op_types(model)


def test_add_signs_follow_the_graph(tmp_path):
  def scale_node(c, src):
    op = qb.trace(lambda x: x * c, jnp.zeros(4)).nodes[1].op
    return G.Node(kind=G.AFFINE, inputs=(src,), shape=(4,), op=op, weights=(jnp.full(4, c),))

  nodes = (G.Node(kind=G.INPUT, inputs=(), shape=(4,)), scale_node(3.0, 0), scale_node(-0.7, 0),
           G.Node(kind=G.ADD, inputs=(1, 2), shape=(4,), attrs=(-1, 1)),
           G.Node(kind=G.ADD, inputs=(3, 1), shape=(4,), attrs=(-1, -1)),
           G.Node(kind=G.ADD, inputs=(4, 2, 0), shape=(4,), attrs=(1, -1, 1)),
           G.Node(kind=G.ADD, inputs=(5, 0, 3), shape=(4,), attrs=(-1, -1, 1)))
  graph = G.Graph(nodes=nodes, output=6)
  xs = uniform(9, (4,), n=64, low=-5, high=5)
  qb.io.export_onnx(graph, tmp_path / "signs.onnx")
  np.testing.assert_array_equal(run_onnxruntime(tmp_path / "signs.onnx", xs), np.asarray(jax.vmap(graph)(xs)))


def test_a_constant_add_after_a_matmul_is_its_bias(tmp_path):
  # onnx2pytorch (alpha-beta-CROWN) takes an Add of a constant right after a MatMul as its bias.
  w = jax.random.normal(jax.random.key(19), (3, 3))
  merged = qb.merge(lambda x: x @ w, lambda x: x + 0.5, jnp.zeros(3))
  assert [n.kind for n in merged.graph.nodes] == ["input", "affine", "affine", "add"]
  model = qb.io.export_onnx(merged, tmp_path / "order.onnx")
  constants = {t.name for t in model.graph.initializer}
  nodes = list(model.graph.node)
  for first, second in zip(nodes, nodes[1:]):
    if first.op_type == "MatMul" and second.op_type == "Add" and set(second.input) & constants:
      assert first.output[0] in second.input
  xs = uniform(20, (3,), n=8)
  want, scale = difference(lambda x: x @ w, lambda x: x + 0.5, xs)
  np.testing.assert_allclose(run_onnxruntime(tmp_path / "order.onnx", xs), want, rtol=0, atol=ORT_TOL * scale)


def test_tanh_and_sigmoid_kinds_have_entries(tmp_path):
  # The kinds come with the smooth activations; the exporter already knows them by name.
  nodes = (G.Node(kind=G.INPUT, inputs=(), shape=(3,)), G.Node(kind="tanh", inputs=(0,), shape=(3,)),
           G.Node(kind="sigmoid", inputs=(1,), shape=(3,)))
  model = qb.io.export_onnx(G.Graph(nodes=nodes, output=2), tmp_path / "smooth.onnx")
  assert op_types(model) == ["Tanh", "Sigmoid"]
  xs = uniform(10, (3,), n=8, low=-4, high=4)
  np.testing.assert_allclose(run_onnxruntime(tmp_path / "smooth.onnx", xs), 1 / (1 + np.exp(-np.tanh(xs))),
                             rtol=1e-6)


def test_linear_maps_without_native_route_become_matrices(tmp_path):
  def fn(x):  # slice, pad, sum, broadcast, transpose: routing maps
    y = jnp.pad(x[1:, :], ((1, 0), (0, 2))) * 2.0
    return jnp.concatenate([y.T.reshape(-1), jnp.broadcast_to(jnp.sum(x, axis=0), (2, 3)).reshape(-1)])

  xs = uniform(11, (4, 3), n=16)
  model = check_export(fn, tmp_path / "routing.onnx", xs, np.asarray(jax.vmap(fn)(xs)), 1.0,
                       example=jnp.zeros((4, 3)))
  assert "MatMul" in op_types(model)
  with pytest.raises(qb.io.UnsupportedNodeError, match="max_matrix_entries=10"):
    qb.io.export_onnx(fn, tmp_path / "big.onnx", jnp.zeros((4, 3)), max_matrix_entries=10)


def test_dot_general_layouts(tmp_path):
  w3 = jax.random.normal(jax.random.key(12), (2, 3, 5))
  w2 = jax.random.normal(jax.random.key(13), (4, 2))

  def fn(x):  # x: (2, 3, 4)
    a = jnp.einsum("ijk,ijm->km", x, w3)      # contract the leading axes
    b = jnp.einsum("ni,ijk->njk", w2, x)      # x on the right, free axes after the kernel's
    return a.reshape(-1) + b.reshape(-1)[:20]

  xs = uniform(14, (2, 3, 4), n=16)
  want = np.asarray(jax.vmap(fn)(xs))
  check_export(fn, tmp_path / "dots.onnx", xs, want, max(1.0, np.abs(want).max()), example=jnp.zeros((2, 3, 4)))


# --------------------------------------------------------------------------------------- must-show


def test_acas_xu_nnet_to_onnx_and_back_on_1000_inputs(tmp_path):
  apply, params = qb.io.load_nnet(ACAS)
  f = functools.partial(apply, params)
  norm = params["normalisation"]
  mins, maxes = np.asarray(norm["mins"]), np.asarray(norm["maxes"])
  margin = 0.1 * (maxes - mins)  # also outside the declared range, where the input clipping acts
  xs = np.random.default_rng(15).uniform(mins - margin, maxes + margin, (1000, 5)).astype(np.float32)
  want = np.asarray(jax.jit(jax.vmap(f))(xs))
  scale = max(1.0, float(np.abs(want).max()))
  path = tmp_path / "acas.onnx"
  model = qb.io.export_onnx(f, path, jnp.zeros(5))
  assert op_types(model)[:6] == ["Max", "Min", "Add", "Div", "MatMul", "Add"]

  loaded_apply, loaded = qb.io.load_onnx(path)
  for k in range(7):  # the same float32 weights, bit for bit
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(loaded["params"][f"dense_{k}"][leaf], params["params"][f"dense_{k}"][leaf])
  np.testing.assert_allclose(run_loaded(path, xs), want, rtol=0, atol=LOAD_TOL * scale)
  np.testing.assert_allclose(run_onnxruntime(path, xs), want, rtol=0, atol=ORT_TOL * scale)


def test_acas_xu_merged_with_its_16bit_copy(tmp_path):
  (apply, params), (apply16, params16) = qb.io.load_nnet(ACAS), qb.io.load_nnet(ACAS_16)
  f, fq = functools.partial(apply, params), functools.partial(apply16, params16)
  box = qb.Box(lower=jnp.asarray(ACAS_P1[0], jnp.float32), upper=jnp.asarray(ACAS_P1[1], jnp.float32))
  merged = qb.merge(f, fq, box)
  xs = np.asarray(qb.box.sample_uniform(jax.random.key(16), box, 200))
  want, scale = difference(f, fq, xs)
  onnx_path, vnnlib_path = qb.io.export_property(merged, box, tmp_path / "acas", epsilon=0.05, outputs=[0],
                                                 batch_size=None)
  np.testing.assert_allclose(run_onnxruntime(onnx_path, xs), want, rtol=0, atol=ORT_TOL * scale)
  prop = parse_vnnlib(vnnlib_path.read_text())
  assert prop["inputs"] == 5 and prop["outputs"] == 5 and prop["clauses"] == [[(">=", 0, 0.05)], [("<=", 0, -0.05)]]
  np.testing.assert_array_equal(prop["lower"], np.asarray(box.lower, np.float64))
  np.testing.assert_array_equal(prop["upper"], np.asarray(box.upper, np.float64))


# ------------------------------------------------------------------------------------------ errors


def test_unknown_kind_and_inexact_constants_are_refused(tmp_path):
  nodes = (G.Node(kind=G.INPUT, inputs=(), shape=(2,)), G.Node(kind="mystery", inputs=(0,), shape=(2,)))
  with pytest.raises(qb.io.UnsupportedNodeError, match="node 1 has kind 'mystery'.*relu"):
    qb.io.export_onnx(G.Graph(nodes=nodes, output=1), tmp_path / "x.onnx")
  nodes = (nodes[0], G.Node(kind=G.AFFINE, inputs=(0,), shape=(2,), bias=np.full(2, 0.1, np.float64)))
  with pytest.raises(qb.io.UnsupportedNodeError, match="float32 cannot hold exactly"):
    qb.io.export_onnx(G.Graph(nodes=nodes, output=1), tmp_path / "x.onnx")
  with pytest.raises(ValueError, match="example input"):
    qb.io.export_onnx(lambda x: x * 2.0, tmp_path / "x.onnx")
  with pytest.raises(ValueError, match="batch_size"):
    qb.io.export_onnx(lambda x: x * 2.0, tmp_path / "x.onnx", jnp.zeros(2), batch_size=0)
  with pytest.raises(qb.io.UnsupportedNodeError, match="away from zero.*jnp.round"):
    qb.io.export_onnx(lambda x: jax.lax.round(x * 2.0), tmp_path / "x.onnx", jnp.zeros(2))


# ------------------------------------------------------------------------------------------ VNN-LIB


def parse_vnnlib(text):
  """A small reader of the classic VNN-LIB form: s-expressions, then declarations and asserts."""
  tokens = re.findall(r"\(|\)|[^\s()]+", re.sub(r";[^\n]*", "", text))

  def parse(pos):
    items = []
    while pos < len(tokens):
      tok = tokens[pos]
      if tok == "(":
        sub, pos = parse(pos + 1)
        items.append(sub)
      elif tok == ")":
        return items, pos + 1
      else:
        items.append(tok)
        pos += 1
    return items, pos

  statements, _ = parse(0)
  declared = {"X": [], "Y": []}
  bounds, clauses = {}, None
  for st in statements:
    if st[0] == "declare-const":
      assert st[2] == "Real"
      declared[st[1][0]].append(int(st[1][2:]))
    elif st[0] == "assert" and st[1][0] in ("<=", ">="):
      op, var, value = st[1]
      assert var.startswith("X_")
      bounds[(op, int(var[2:]))] = decimal.Decimal(value)
    elif st[0] == "assert" and st[1][0] == "or":
      assert clauses is None, "one disjunction"
      clauses = [[(c[0], int(c[1][2:]), float(c[2])) for c in conj[1:]] for conj in st[1][1:]]
      assert all(conj[0] == "and" for conj in st[1][1:])
    else:
      raise AssertionError(f"unexpected statement {st}")
  n = len(declared["X"])
  assert declared["X"] == list(range(n)) and declared["Y"] == list(range(len(declared["Y"])))
  return dict(inputs=n, outputs=len(declared["Y"]), clauses=clauses,
              lower_exact=[bounds[(">=", i)] for i in range(n)], upper_exact=[bounds[("<=", i)] for i in range(n)],
              lower=np.array([float(bounds[(">=", i)]) for i in range(n)]),
              upper=np.array([float(bounds[("<=", i)]) for i in range(n)]))


def test_real_numbers_are_exact_and_round_trip():
  rng = np.random.default_rng(17)
  values = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-30, 30, 200),
                           [0.1, -0.1, 1e-45, -1e-45, 3.4028235e38, -0.0, 0.0, 1.0, -2.5, 1145.0]]).astype(np.float32)
  for v in values:
    text = format_real(v)
    assert re.fullmatch(r"-?\d+\.\d+", text), text  # plain decimal, as VNN-COMP parsers expect
    assert decimal.Decimal(text) == decimal.Decimal(float(v))  # the exact value, not a nearby one
    assert np.float32(float(text)) == v and np.float32(text) == v
  assert format_real(0.05) == "0.05000000000000000277555756156289135105907917022705078125"
  with pytest.raises(ValueError, match="finite"):
    format_real(np.inf)


def test_vnnlib_box_outputs_and_negated_property():
  lower = np.array([[0.1, -0.3], [1e-8, 2.0]], np.float32)
  box = qb.Box(lower=lower, upper=lower + np.float32(0.25))
  prop = parse_vnnlib(vnnlib_text(box, epsilon=0.125, num_outputs=(3,), outputs=[2, 0]))
  assert prop["inputs"] == 4 and prop["outputs"] == 3
  assert prop["lower_exact"] == [decimal.Decimal(float(v)) for v in lower.reshape(-1)]  # row-major
  assert prop["upper_exact"] == [decimal.Decimal(float(v)) for v in (lower + np.float32(0.25)).reshape(-1)]
  assert prop["clauses"] == [[(">=", 0, 0.125)], [("<=", 0, -0.125)], [(">=", 2, 0.125)], [("<=", 2, -0.125)]]
  per_output = parse_vnnlib(vnnlib_text(box, epsilon=[0.5, 0.25, 0.0], num_outputs=3))
  assert [c[0][2] for c in per_output["clauses"]] == [0.5, -0.5, 0.25, -0.25, 0.0, 0.0]


def test_vnnlib_matches_the_vnncomp_reader_pattern():
  # The statement patterns of the VNN-COMP reader (nnenum's vnnlib.py, also in alpha-beta-CROWN):
  # whitespace squeezed and no space after parentheses, then one regex per statement.
  text = vnnlib_text(qb.Box(np.zeros(2, np.float32), np.ones(2, np.float32)), epsilon=1e-3, num_outputs=2)
  statements, current, depth = [], "", 0
  for line in text.splitlines():
    line = line.split(";")[0].strip()
    if line:
      depth += line.count("(") - line.count(")")
      current += (" " if current else "") + line
      if depth == 0:
        statements.append(" ".join(current.split()).replace("( ", "(").replace(") ", ")"))
        current = ""
  comparison = r"\((<=|>=) (\S+) (\S+)\)"
  declare = re.compile(r"^\(declare-const (X|Y)_(\S+) Real\)$")
  simple = re.compile(r"^\(assert " + comparison + r"\)$")
  dnf = re.compile(r"^\(assert \(or (\(and (" + comparison + r")+\))+\)\)$")
  assert all(declare.match(s) or simple.match(s) or dnf.match(s) for s in statements), statements
  assert sum(bool(dnf.match(s)) for s in statements) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon=-1.0), "epsilon must be finite and >= 0"),
    (dict(epsilon=[0.1, 0.2]), "one per output"),
    (dict(epsilon=0.1, outputs=[3]), "out of range"),
    (dict(epsilon=0.1, outputs=[]), "empty"),
])
def test_vnnlib_rejects_bad_properties(kwargs, message):
  box = qb.Box(np.zeros(2, np.float32), np.ones(2, np.float32))
  with pytest.raises(ValueError, match=message):
    vnnlib_text(box, num_outputs=3, **kwargs)
  with pytest.raises(ValueError, match="empty"):
    vnnlib_text(qb.Box(np.ones(2), np.zeros(2)), epsilon=0.1, num_outputs=3)


def test_export_property_writes_the_pair(tmp_path):
  f, fq = flax_pair(MLP(), (5,), bits=3)
  box = qb.linf_ball(jnp.full(5, 0.2), 0.05)
  onnx_path, vnnlib_path = qb.io.export_property(qb.merge(f, fq, box), box, tmp_path / "new" / "dir",
                                                 epsilon=0.5)
  assert onnx_path.name == "merged.onnx" and vnnlib_path.name == "property.vnnlib"
  prop = parse_vnnlib(vnnlib_path.read_text())
  assert prop["inputs"] == 5 and prop["outputs"] == 3 and len(prop["clauses"]) == 6
  np.testing.assert_array_equal(prop["lower"], np.asarray(box.lower, np.float64))
  xs = np.asarray(qb.box.sample_uniform(jax.random.key(18), box, 16))
  want, scale = difference(f, fq, xs)
  np.testing.assert_allclose(run_onnxruntime(onnx_path, xs), want, rtol=0, atol=ORT_TOL * scale)
  with pytest.raises(ValueError, match="shape"):
    qb.io.export_property(qb.merge(f, fq, box), qb.Box(np.zeros(4), np.ones(4)), tmp_path, epsilon=0.5)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_export_acas_pair(tmp_path, capsys):
  lower, upper = (",".join(map(str, v)) for v in ACAS_P1)
  code = cli.main(["export", ACAS, "--compare", ACAS_16, "--lower", lower, "--upper", upper,
                   "--epsilon", "0.05", "--outputs", "0", "--out", str(tmp_path / "acas")])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert "abcrown.py --onnx_path" in out and "output 0" in out
  prop = parse_vnnlib((tmp_path / "acas" / "property.vnnlib").read_text())
  # The typed corners in float32, rounded outward (the box exported holds the box typed).
  assert np.all(prop["lower"] <= ACAS_P1[0]) and np.all(prop["lower"] > ACAS_P1[0] - 1e-2)
  assert np.all(prop["lower"].astype(np.float32) == prop["lower"])
  assert prop["clauses"] == [[(">=", 0, 0.05)], [("<=", 0, -0.05)]]
  loaded_apply, loaded = qb.io.load_onnx(tmp_path / "acas" / "merged.onnx")
  (apply, params), (apply16, params16) = qb.io.load_nnet(ACAS), qb.io.load_nnet(ACAS_16)
  x = jnp.asarray([58000.0, 0.5, -1.0, 1150.0, 30.0])
  np.testing.assert_allclose(loaded_apply(loaded, x), apply(params, x) - apply16(params16, x), rtol=0, atol=1e-6)


def test_cli_export_quantized_copy(tmp_path, capsys):
  digits = str(bundled_path("digits_mlp.nnet"))
  code = cli.main(["export", digits, "--bits", "4", "--center", "0.3", "--radius", "0.02",
                   "--epsilon", "2.5", "--out", str(tmp_path)])
  out, err = capsys.readouterr()
  assert code == 0, err
  prop = parse_vnnlib((tmp_path / "property.vnnlib").read_text())
  assert prop["inputs"] == 64 and prop["outputs"] == 10 and len(prop["clauses"]) == 20
  assert "4-bit copy" in (tmp_path / "property.vnnlib").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--epsilon", "-1", "--out", "OUT"], "--epsilon needs one number >= 0"),
    (["--epsilon", "abc", "--out", "OUT"], "not a number"),
    (["--epsilon", "0.1"], "required: --out"),
    (["--epsilon", "0.1", "--out", "OUT", "--outputs", "1.5"], "--outputs takes output indices"),
    (["--epsilon", "0.1", "--out", "OUT", "--outputs", "7"], "out of range"),
    (["--epsilon", "0.1", "--out", "OUT", "--bits", "4", "--compare", ACAS_16], "cannot be used with --compare"),
])
def test_cli_export_usage_errors(tmp_path, capsys, extra, message):
  argv = ["export", ACAS, "--center", "58000,0,0,1150,30", "--radius", "1"]
  code = cli.main(argv + [str(tmp_path / "o") if a == "OUT" else a for a in extra])
  _, err = capsys.readouterr()
  assert code == cli.USAGE_ERROR and message in err, err
  assert not (tmp_path / "o" / "merged.onnx").exists()


@pytest.mark.parametrize("module", [qb.io.onnx_export, qb.io.vnnlib], ids=["onnx_export", "vnnlib"])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
