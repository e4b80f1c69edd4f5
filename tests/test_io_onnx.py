"""Tests of qbound.io.load_onnx: small models built with onnx.helper, run by onnxruntime and by
the loaded JAX function on the same random inputs."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx package is needed (pip install qbound[onnx])")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed to check against")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qbound.io import load_onnx  # noqa: E402

IR_VERSION = {9: 4, 10: 5, 11: 6, 13: 7, 17: 8}  # the IR version each opset was released with


@pytest.fixture(autouse=True)
def strict_promotion():
  with jax.numpy_dtype_promotion("strict"):
    yield


def save_model(tmp_path, nodes, input_shape, output_shape, initializers, opset=13, name="model"):
  graph = helper.make_graph(
      nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
      [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                            ir_version=IR_VERSION[opset])
  onnx.checker.check_model(model)
  path = tmp_path / f"{name}.onnx"
  onnx.save(model, path)
  return path


def rand(rng, *shape):
  return rng.standard_normal(shape).astype(np.float32)


def onnxruntime_outputs(path, xs, batch_axis_fixed):
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  if batch_axis_fixed:  # a model declared with batch 1 takes one input at a time
    return np.concatenate([session.run(None, {"x": x[None]})[0] for x in xs])
  return session.run(None, {"x": xs})[0]


def check_against_onnxruntime(path, xs, batch_axis_fixed=False):
  apply, params = load_onnx(path)
  got = np.asarray(jax.jit(jax.vmap(apply, in_axes=(None, 0)))(params, xs))
  want = onnxruntime_outputs(path, xs, batch_axis_fixed)
  # Sums of many terms cancel to small outputs: absolute slack relative to the output scale.
  np.testing.assert_allclose(got, want.reshape(got.shape), rtol=1e-5,
                             atol=1e-6 * max(1.0, np.abs(want).max()))
  return apply, params


def test_mlp_with_gemm_and_relu(tmp_path):
  rng = np.random.default_rng(0)
  w0, b0, w1, c1 = rand(rng, 16, 5), rand(rng, 16), rand(rng, 16, 3), rand(rng, 1, 3)
  nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], transB=1, name="fc0"),
           helper.make_node("Relu", ["h"], ["r"]),
           helper.make_node("Gemm", ["r", "w1", "c1"], ["y"], alpha=0.5, beta=2.0, name="fc1")]
  path = save_model(tmp_path, nodes, ["N", 5], ["N", 3], dict(w0=w0, b0=b0, w1=w1, c1=c1))
  apply, params = check_against_onnxruntime(path, rand(rng, 8, 5))
  assert set(params) == {"params"}
  dense = params["params"]
  np.testing.assert_array_equal(dense["dense_0"]["kernel"], w0.T)  # (in, out): flax layout
  np.testing.assert_array_equal(dense["dense_1"]["kernel"], 0.5 * w1)  # alpha folded in
  np.testing.assert_array_equal(dense["dense_1"]["bias"], 2.0 * c1[0])
  assert apply(params, jnp.zeros(5)).shape == (3,)


def test_matmul_add_becomes_kernel_and_bias(tmp_path):
  rng = np.random.default_rng(1)
  w, b = rand(rng, 4, 6), rand(rng, 6)
  nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["b", "h"], ["y"])]
  path = save_model(tmp_path, nodes, [1, 4], [1, 6], dict(w=w, b=b), opset=17)
  _, params = check_against_onnxruntime(path, rand(rng, 5, 4), batch_axis_fixed=True)
  assert set(params["params"]["dense_0"]) == {"kernel", "bias"}
  np.testing.assert_array_equal(params["params"]["dense_0"]["bias"], b)


def cnn_model(tmp_path, rng, conv, pool, pool_op, channels=2, size=9, opset=13):
  w0, b0 = rand(rng, 4, channels, 3, 3), rand(rng, 4)
  w1 = rand(rng, 4, 4 // conv.get("group", 1), 2, 2)
  nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
           helper.make_node("Relu", ["c0"], ["r0"]),
           helper.make_node("Conv", ["r0", "w1"], ["c1"], name="conv1", **conv),
           helper.make_node(pool_op, ["c1"], ["p"], **pool),
           helper.make_node("Flatten", ["p"], ["f"]),
           helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1)]
  # The flattened size depends on the attributes: let onnx's shape inference tell it.
  probe = helper.make_model(helper.make_graph(
      nodes[:-1], "probe",
      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
      [helper.make_tensor_value_info("f", TensorProto.FLOAT, None)],
      [numpy_helper.from_array(v, k) for k, v in dict(w0=w0, b0=b0, w1=w1).items()]),
      opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION[opset])
  session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
  flat = session.run(None, {"x": np.zeros((1, channels, size, size), np.float32)})[0].shape[1]
  inits = dict(w0=w0, b0=b0, w1=w1, w2=rand(rng, 10, flat), b2=rand(rng, 10))
  return save_model(tmp_path, nodes, [1, channels, size, size], [1, 10], inits, opset=opset)


@pytest.mark.parametrize("conv, pool, pool_op", [
    ({}, dict(kernel_shape=[2, 2], strides=[2, 2]), "MaxPool"),
    (dict(strides=[2, 2], group=2, dilations=[2, 2], pads=[0, 1, 1, 0]),
     dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), "AveragePool"),
    (dict(auto_pad="SAME_UPPER", strides=[2, 1]), dict(kernel_shape=[3, 2], pads=[1, 0, 1, 1]),
     "AveragePool"),
    (dict(auto_pad="SAME_LOWER", strides=[2, 2], group=4),
     dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), "MaxPool"),
    (dict(auto_pad="VALID"), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), "AveragePool"),
    (dict(auto_pad="VALID"), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 1], ceil_mode=1,
                                  count_include_pad=1), "AveragePool"),
    ({}, {}, "GlobalAveragePool"),
], ids=["maxpool", "group-dilation-avg-include-pad", "same-upper-avg", "same-lower-depthwise-ceil",
        "valid-avg-ceil", "valid-avg-ceil-include-pad", "global-avg"])
def test_cnn_with_conv_pool_flatten_gemm(tmp_path, conv, pool, pool_op):
  rng = np.random.default_rng(2)
  path = cnn_model(tmp_path, rng, conv, pool, pool_op)
  apply, params = check_against_onnxruntime(path, rand(rng, 3, 2, 9, 9), batch_axis_fixed=True)
  assert params["params"]["conv_0"]["kernel"].shape == (3, 3, 2, 4)  # HWIO: out channel last
  assert params["params"]["conv_0"]["bias"].shape == (4,)
  assert apply(params, jnp.zeros((2, 9, 9))).shape == (10,)


def misc_model(tmp_path, rng, opset):
  """Sigmoid, Tanh, Clip, LeakyRelu, BatchNormalization, Concat and the shape ops in one graph."""
  c = 6
  inits = dict(w=rand(rng, 4, c), b=rand(rng, c), scale=rand(rng, c), shift=rand(rng, c),
               mean=rand(rng, c), var=np.abs(rand(rng, c)) + 0.5, sub=rand(rng, 3 * c),
               div=np.float32(1.7), shape=np.array([0, -1], np.int64))
  nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
           helper.make_node("Add", ["m", "b"], ["a"]),
           helper.make_node("BatchNormalization", ["a", "scale", "shift", "mean", "var"], ["bn"],
                            epsilon=1e-3),
           helper.make_node("LeakyRelu", ["bn"], ["lr"], alpha=0.1),
           helper.make_node("Sigmoid", ["lr"], ["s"]),
           helper.make_node("Tanh", ["lr"], ["t"])]
  if opset < 11:
    nodes.append(helper.make_node("Clip", ["lr"], ["cl"], min=-0.3, max=0.4))
  else:
    inits.update(lo=np.float32(-0.3), hi=np.float32(0.4))
    nodes.append(helper.make_node("Clip", ["lr", "lo", "hi"], ["cl"]))
  nodes += [helper.make_node("Concat", ["s", "t", "cl"], ["cat"], axis=1),
            helper.make_node("Sub", ["cat", "sub"], ["d"]),
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(3.0))),
            helper.make_node("Mul", ["d", "k"], ["mu"]),
            helper.make_node("Div", ["mu", "div"], ["dv"]),
            helper.make_node("Identity", ["dv"], ["id"]),
            helper.make_node("Dropout", ["id"], ["dr"])]
  if opset < 13:
    nodes += [helper.make_node("Unsqueeze", ["dr"], ["u"], axes=[2]),
              helper.make_node("Transpose", ["u"], ["tr"], perm=[0, 2, 1]),
              helper.make_node("Squeeze", ["tr"], ["sq"], axes=[1])]
  else:
    inits.update(axes_u=np.array([2], np.int64), axes_s=np.array([1], np.int64))
    nodes += [helper.make_node("Unsqueeze", ["dr", "axes_u"], ["u"]),
              helper.make_node("Transpose", ["u"], ["tr"], perm=[0, 2, 1]),
              helper.make_node("Squeeze", ["tr", "axes_s"], ["sq"])]
  nodes.append(helper.make_node("Reshape", ["sq", "shape"], ["y"]))
  return save_model(tmp_path, nodes, ["batch", 4], ["batch", 3 * c], inits, opset=opset)


@pytest.mark.parametrize("opset", [10, 13, 17])
def test_activations_batchnorm_concat_and_shape_ops(tmp_path, opset):
  rng = np.random.default_rng(opset)
  path = misc_model(tmp_path, rng, opset)
  _, params = check_against_onnxruntime(path, 2 * rand(rng, 16, 4))
  assert set(params["params"]["dense_0"]) == {"kernel", "bias"}
  assert set(params["params"]["batchnorm_0"]) == {"scale", "bias"}
  assert set(params["batch_stats"]["batchnorm_0"]) == {"mean", "var"}
  assert {"sub", "div", "k"} <= set(params["constants"])
  names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(params["constants"])}
  assert not names & {"kernel", "bias"}


@pytest.mark.parametrize("opset", [11, 13])
def test_softmax_and_global_max_pool_follow_their_opset(tmp_path, opset):
  # Softmax coerces to 2-D at axis 1 before opset 13 and works along axis -1 since.
  nodes = [helper.make_node("GlobalMaxPool", ["x"], ["g"]), helper.make_node("Sub", ["x", "g"], ["d"]),
           helper.make_node("Softmax", ["d"], ["y"])]
  path = save_model(tmp_path, nodes, ["N", 2, 3], ["N", 2, 3], {}, opset=opset)
  check_against_onnxruntime(path, rand(np.random.default_rng(4), 4, 2, 3))


def test_shape_that_is_computed_is_refused(tmp_path):
  nodes = [helper.make_node("Relu", ["x"], ["r"]),
           helper.make_node("Reshape", ["x", "r"], ["y"], name="rs")]
  with pytest.raises(ValueError, match=r"node 'rs' \(Reshape\): the target shape .* must be a constant"):
    load_onnx(save_model(tmp_path, nodes, [2], [2], {}))


def test_batch_axis_rules(tmp_path):
  w = np.arange(15, dtype=np.float32).reshape(5, 3)
  nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
  for shape, unbatched in [([5], (5,)), ([1, 1, 1, 5], (1, 1, 5)), (["n", 5], (5,)), ([2, 5], (2, 5))]:
    out = [*shape[:-1], 3]
    apply, params = load_onnx(save_model(tmp_path, nodes, shape, out, dict(w=w)))
    x = jnp.ones(unbatched, jnp.float32)
    np.testing.assert_array_equal(apply(params, x), x @ w)
    with pytest.raises(ValueError, match="input of shape"):
      apply(params, jnp.ones((7,), jnp.float32))


def test_unsupported_op_is_named_with_node_and_file(tmp_path):
  nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Erf", ["r"], ["y"], name="gelu_part")]
  path = save_model(tmp_path, nodes, ["N", 3], ["N", 3], {})
  with pytest.raises(ValueError, match=r"'Erf' \(node 'gelu_part'\)") as info:
    load_onnx(path)
  assert str(path) in str(info.value)


def test_used_second_output_is_refused(tmp_path):
  nodes = [helper.make_node("Dropout", ["x"], ["d", "mask"], name="drop"),
           helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
           helper.make_node("Add", ["d", "mf"], ["y"])]
  with pytest.raises(ValueError, match="'Cast'"):
    load_onnx(save_model(tmp_path, nodes, ["N", 3], ["N", 3], {}))
  nodes = [nodes[0], helper.make_node("Concat", ["d", "mask"], ["y"], axis=1)]
  with pytest.raises(ValueError, match=r"node 'drop' \(Dropout\): only the first output"):
    load_onnx(save_model(tmp_path, nodes, ["N", 3], ["N", 6], {}))


@pytest.mark.parametrize("content", [b"", b"\x08\x07\x12\x05hello\xff\xff\xff", "truncated"])
def test_garbled_file_is_a_value_error(tmp_path, content):
  if content == "truncated":
    rng = np.random.default_rng(3)
    good = misc_model(tmp_path, rng, 13).read_bytes()
    content = good[:len(good) // 2]
  path = tmp_path / "garbled.onnx"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="ONNX model") as info:
    load_onnx(path)
  assert str(path) in str(info.value)


def test_missing_onnx_package_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "onnx", None)
  with pytest.raises(ImportError, match=r"pip install .qbound\[onnx\]"):
    load_onnx(tmp_path / "any.onnx")


def test_text_file_is_not_taken_for_a_corrupt_model(tmp_path):
  from qbound.io import bundled_path

  path = tmp_path / "digits.onnx"
  path.write_bytes(bundled_path("digits_mlp.nnet").read_bytes())
  with pytest.raises(ValueError, match=r"not a readable ONNX model: it is a text file \(starting '// qbound") as info:
    load_onnx(path)
  assert str(path) in str(info.value) and "load_nnet" in str(info.value)


def test_random_bytes_are_a_value_error_naming_the_file(tmp_path):
  path = tmp_path / "random.onnx"
  path.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
  with pytest.raises(ValueError, match="random.onnx: not a readable ONNX model"):
    load_onnx(path)


def test_apply_knows_its_input_shape(tmp_path):
  w = np.ones((5, 3), np.float32)
  nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
  for shape, unbatched in [([5], (5,)), (["n", 5], (5,)), ([2, 5], (2, 5)), (["n", "m", 5], (None, 5))]:
    out = [*shape[:-1], 3]
    apply, _ = load_onnx(save_model(tmp_path, nodes, shape, out, dict(w=w)))
    assert apply.input_shape == unbatched


# --- networks as VNN-COMP and VeryDiff ship them ------------------------------------------------

BENCH = Path(__file__).parents[1] / ".." / "shared" / "bench"
VERYDIFF = BENCH / "verydiff"
LHC = ["2_80-1.onnx", "2_80-1-0.1.onnx"]
MNIST = ["mnist_relu_3_100.onnx", "mnist_relu_3_100_pruned5.onnx"]


def needs_bench(path):
  if not path.exists():
    pytest.skip(f"{path.name} not found under {BENCH.resolve()} (the shared bench checkout beside the "
                "repository)")


def run_onnxruntime(path, xs, batch_axis):
  """onnxruntime's outputs for inputs xs (n, *unbatched shape), one call per input."""
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return np.stack([session.run(None, {name: x[None] if batch_axis else x})[0] for x in xs])


def assert_close(got, want):
  want = want.reshape(got.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", LHC)
def test_verydiff_lhc_with_and_without_softmax(name):
  path = VERYDIFF / name
  needs_bench(path)
  rng = np.random.default_rng(0)
  xs = np.concatenate([rng.uniform(-0.1, 0.1, (16, 16)), rng.normal(0, 2, (8, 16))]).astype(np.float32)
  want = run_onnxruntime(path, xs, batch_axis=True)
  apply, params = load_onnx(path)
  assert apply.input_shape == (16,) and apply.output_activation == "Softmax"
  assert_close(np.asarray(jax.vmap(apply, in_axes=(None, 0))(params, xs)), want)

  logit_fn, logit_params = load_onnx(path, logits=True)
  assert logit_fn.output_activation == "Softmax"
  assert sorted(logit_params) == ["params"] and len(logit_params["params"]) == 3
  logits = np.asarray(jax.vmap(logit_fn, in_axes=(None, 0))(logit_params, xs))
  assert logits.shape == (24, 5)
  assert_close(np.asarray(jax.nn.softmax(logits, axis=-1)), want)
  assert (logits.argmax(-1) == want.reshape(24, 5).argmax(-1)).all()  # top-1 decided on logits

  from qbound.trace import trace  # the logits are a graph qbound bounds: no softmax left in it
  trace(lambda x: logit_fn(logit_params, x), jnp.zeros(16, jnp.float32))


@pytest.mark.parametrize("name", MNIST)
def test_verydiff_mnist_weight_times_column_is_a_dense_layer(name):
  path = VERYDIFF / name
  needs_bench(path)
  xs = np.random.default_rng(1).uniform(0, 1, (8, 784)).astype(np.float32)
  apply, params = load_onnx(path)
  assert apply.input_shape == (784,) and apply.output_activation is None
  assert_close(np.asarray(jax.vmap(apply, in_axes=(None, 0))(params, xs)),
               run_onnxruntime(path, xs, batch_axis=False))
  # W @ X with W (out, in): filed as flax kernels (in, out) with their biases, nothing left in constants.
  assert [params["params"][f"dense_{k}"]["kernel"].shape for k in range(4)] == \
      [(784, 100), (100, 100), (100, 10), (10, 10)]
  assert set(params) == {"params"} and all(set(v) == {"kernel", "bias"} for v in params["params"].values())
  nnet = BENCH / "nnet" / "mnist_relu_3_100.nnet"
  if name == "mnist_relu_3_100.onnx" and nnet.exists():  # the same network as the NNet copy
    from qbound.io import load_nnet
    nnet_apply, nnet_params = load_nnet(nnet)
    np.testing.assert_allclose(apply(params, xs[0]), nnet_apply(nnet_params, xs[0]), rtol=1e-5, atol=1e-5)


def nnet_as_vnncomp_onnx(nnet_params, path, batch_dim=1):
  """An NNet network written as VNN-COMP writes ACAS Xu: input (1, 1, 1, n), normalised inside the
  graph by Sub and Div, Flatten, then MatMul + Add and Relu per layer (no clip: inputs stay in the box)."""
  norm = nnet_params["normalisation"]
  layers = [nnet_params["params"][f"dense_{k}"] for k in range(len(nnet_params["params"]))]
  n_in, n_out = layers[0]["kernel"].shape[0], layers[-1]["kernel"].shape[1]
  inits = {"mean": np.asarray(norm["means"]).reshape(1, 1, 1, n_in),
           "range": np.asarray(norm["ranges"])}
  nodes = [helper.make_node("Sub", ["x", "mean"], ["centred"]),
           helper.make_node("Div", ["centred", "range"], ["scaled"]),
           helper.make_node("Flatten", ["scaled"], ["h0"], axis=1)]
  for k, layer in enumerate(layers):
    inits[f"W{k}"], inits[f"b{k}"] = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    last = k == len(layers) - 1
    nodes += [helper.make_node("MatMul", [f"h{k}", f"W{k}"], [f"m{k}"]),
              helper.make_node("Add", [f"m{k}", f"b{k}"], ["y" if last else f"a{k}"])]
    if not last:
      nodes.append(helper.make_node("Relu", [f"a{k}"], [f"h{k + 1}"]))
  graph = helper.make_graph(
      nodes, "vnncomp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 1, 1, n_in])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, n_out])],
      [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
  onnx.checker.check_model(model)
  onnx.save(model, path)
  return path


BENCH_NNETS = sorted(BENCH.glob("nnet/*.nnet"))


@pytest.mark.skipif(not BENCH_NNETS, reason=f"benchmark networks not found at {BENCH.resolve()} "
                                            "(the shared bench checkout beside the repository)")
@pytest.mark.parametrize("nnet", BENCH_NNETS, ids=lambda p: p.name)
def test_bench_networks_as_vnncomp_onnx_match_onnxruntime_and_nnet(tmp_path, nnet):
  from qbound.io import load_nnet

  nnet_apply, nnet_params = load_nnet(nnet)
  batch_dim = "unk__0" if "HAR" in nnet.name else 1  # both batch conventions
  path = nnet_as_vnncomp_onnx(nnet_params, tmp_path / "net.onnx", batch_dim)
  apply, params = load_onnx(path)
  n_in = nnet_params["normalisation"]["mins"].shape[0]
  assert apply.input_shape == (1, 1, n_in)
  lo = np.maximum(np.asarray(nnet_params["normalisation"]["mins"], np.float64), -1.0)
  hi = np.minimum(np.asarray(nnet_params["normalisation"]["maxes"], np.float64), 1.0 if n_in > 5 else np.inf)
  xs = np.random.default_rng(2).uniform(lo, hi, (6, n_in)).astype(np.float32)
  got = np.asarray(jax.vmap(apply, in_axes=(None, 0))(params, xs.reshape(6, 1, 1, n_in)))
  assert_close(got, run_onnxruntime(path, xs.reshape(6, 1, 1, n_in), batch_axis=True))
  want = np.asarray(jax.vmap(nnet_apply, in_axes=(None, 0))(nnet_params, xs))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  assert set(params) == {"params", "constants"} and set(params["constants"]) == {"mean", "range"}


@pytest.mark.parametrize("trans_a, trans_b, alpha, beta, c_shape", [
    (0, 0, 1.0, 1.0, (3,)), (0, 1, 0.5, 2.0, (1, 3)), (1, 0, 1.0, 1.0, ()), (1, 1, -1.5, 0.25, (1, 1)),
    (0, 1, 2.0, 0.0, None)], ids=["plain", "transB-alpha-beta", "transA-scalar-C", "both", "no-C"])
def test_gemm_attributes(tmp_path, trans_a, trans_b, alpha, beta, c_shape):
  rng = np.random.default_rng(5)
  w = rand(rng, *((3, 4) if trans_b else (4, 3)))
  inits = dict(w=w) if c_shape is None else dict(w=w, c=rand(rng, *c_shape))
  attrs = dict(transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
  node = helper.make_node("Gemm", ["x", "w"] + ([] if c_shape is None else ["c"]), ["y"], **attrs)
  # transA takes A as (K, M): a (4, 1) column; without it A is the batched row (N, 4).
  shape, out = ([4, 1], [1, 3]) if trans_a else (["N", 4], ["N", 3])
  path = save_model(tmp_path, [node], shape, out, inits)
  apply, params = load_onnx(path)
  xs = rand(rng, 5, 4, 1) if trans_a else rand(rng, 5, 4)
  assert_close(np.asarray(jax.vmap(apply, in_axes=(None, 0))(params, xs)),
               run_onnxruntime(path, xs, batch_axis=False) if trans_a else onnxruntime_outputs(path, xs, False))
  np.testing.assert_allclose(params["params"]["dense_0"]["kernel"], alpha * (w.T if trans_b else w), rtol=1e-6)


@pytest.mark.parametrize("order", ["h+b", "b+h"])
@pytest.mark.parametrize("convention", ["x@W", "W@x", "W@column"])
def test_matmul_add_in_both_conventions(tmp_path, order, convention):
  rng = np.random.default_rng(6)
  if convention == "x@W":
    w, b, shape, out, mm = rand(rng, 4, 6), rand(rng, 6), ["N", 4], ["N", 6], ["x", "w"]
  elif convention == "W@x":
    w, b, shape, out, mm = rand(rng, 6, 4), rand(rng, 6), [4], [6], ["w", "x"]
  else:  # ERAN's column vectors: x (4, 1), bias (6, 1)
    w, b, shape, out, mm = rand(rng, 6, 4), rand(rng, 6, 1), [4, 1], [6, 1], ["w", "x"]
  add = ["h", "b"] if order == "h+b" else ["b", "h"]
  nodes = [helper.make_node("MatMul", mm, ["h"]), helper.make_node("Add", add, ["r"]),
           helper.make_node("Relu", ["r"], ["y"])]
  path = save_model(tmp_path, nodes, shape, out, dict(w=w, b=b))
  apply, params = load_onnx(path)
  xs = rand(rng, 5, *[4] + ([1] if convention == "W@column" else []))
  batched = convention == "x@W"
  want = onnxruntime_outputs(path, xs, False) if batched else run_onnxruntime(path, xs, batch_axis=False)
  assert_close(np.asarray(jax.vmap(apply, in_axes=(None, 0))(params, xs)), want)
  dense = params["params"]["dense_0"]
  np.testing.assert_array_equal(dense["kernel"], w if convention == "x@W" else w.T)  # (in, out)
  assert ("bias" in dense) == (convention != "W@column")  # a (6, 1) column is no flax bias


@pytest.mark.parametrize("target, shape, out", [
    ([0, -1], [1, 2, 6], [1, 12]), ([0, 3, -1], ["N", 2, 6], ["N", 3, 4]), ([-1, 4], [1, 2, 6], [3, 4]),
    ([-1], [1, 2, 6], [12])], ids=["keep-batch", "symbolic-batch", "batch-folded", "batch-dropped"])
def test_reshape_with_minus_one_and_zero(tmp_path, target, shape, out):
  w = np.arange(12 * 12, dtype=np.float32).reshape(12, 12) / 100
  nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Relu", ["r"], ["y"])]
  path = save_model(tmp_path, nodes, shape, out, dict(shape=np.array(target, np.int64), w=w))
  apply, params = load_onnx(path)
  xs = rand(np.random.default_rng(7), 3, 2, 6)
  got = np.asarray(jax.vmap(apply, in_axes=(None, 0))(params, xs))
  want = run_onnxruntime(path, xs, batch_axis=True)
  if out[0] in (1, "N"):
    want = want[:, 0]  # onnxruntime keeps the batch axis, apply drops it
  assert_close(got, want)


def test_weights_as_constant_nodes_and_initializers_listed_as_inputs(tmp_path):
  rng = np.random.default_rng(8)
  w0, b0, w1 = rand(rng, 5, 4), rand(rng, 4), rand(rng, 4, 3)
  const = lambda name, value: helper.make_node(  # noqa: E731
      "Constant", [], [name], value=numpy_helper.from_array(value, name + "_value"))
  nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"]),  # before the Constant nodes it reads
           const("w0", w0), const("b0", b0),
           helper.make_node("Constant", [], ["bias1"], value_floats=[0.5, -0.5, 1.0]),
           helper.make_node("Constant", [], ["flat"], value_ints=[-1]),
           helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["m"]),
           helper.make_node("Add", ["m", "bias1"], ["a"]), helper.make_node("Reshape", ["a", "flat"], ["y"])]
  # Old exporters (IR 3) list every initializer among the graph's inputs too.
  graph = helper.make_graph(
      nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5]),
                     helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 3])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [numpy_helper.from_array(w1, "w1")])
  path = tmp_path / "old.onnx"
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3), path)
  apply, params = load_onnx(path)
  xs = rand(rng, 4, 5)
  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  want = np.stack([session.run(None, {"x": x[None]})[0] for x in xs])
  assert_close(np.asarray(jax.vmap(apply, in_axes=(None, 0))(params, xs)), want)
  assert apply.input_shape == (5,)
  np.testing.assert_array_equal(params["params"]["dense_0"]["kernel"], w0)
  np.testing.assert_array_equal(params["params"]["dense_1"]["bias"], [0.5, -0.5, 1.0])


def activation_model(tmp_path, op, opset, tail, axis=None, name="act"):
  """x (N, 2, 5) -> MatMul -> op (Softmax or LogSoftmax, or Relu for none) -> the tail of shape-only ops."""
  rng = np.random.default_rng(9)
  inits = dict(w=rand(rng, 5, 5), flat=np.array([0, -1], np.int64))
  attrs = {} if axis is None else dict(axis=axis)
  nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]),
           helper.make_node(op, ["logits"], ["t0"], **attrs)]
  for k, tail_op in enumerate(tail):
    extra = ["flat"] if tail_op == "Reshape" else []
    nodes.append(helper.make_node(tail_op, [f"t{k}", *extra], [f"t{k + 1}"]))
  nodes[-1].output[0] = "y"
  out = ["N", 10] if {"Flatten", "Reshape"} & set(tail) else ["N", 2, 5]
  return save_model(tmp_path, nodes, ["N", 2, 5], out, inits, opset=opset, name=name)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset, axis", [(11, None), (11, 2), (13, None), (13, 1)])
@pytest.mark.parametrize("tail", [[], ["Flatten"], ["Reshape", "Identity"]], ids=["", "flatten", "reshape-id"])
def test_logits_drops_a_trailing_softmax(tmp_path, op, opset, axis, tail):
  path = activation_model(tmp_path, op, opset, tail, axis)
  xs = 3 * rand(np.random.default_rng(10), 4, 2, 5)
  apply, params = check_against_onnxruntime(path, xs)  # the op itself, with its opset's axis rules
  assert apply.output_activation == op
  logit_fn, logit_params = load_onnx(path, logits=True)
  assert logit_fn.output_activation == op
  # onnxruntime on the same graph with the activation replaced by Identity gives the logits.
  model = onnx.load(path)
  (act,) = [n for n in model.graph.node if n.op_type == op]
  act.op_type = "Identity"
  del act.attribute[:]
  identity_path = tmp_path / "identity.onnx"
  onnx.save(model, identity_path)
  want = onnxruntime_outputs(identity_path, xs, batch_axis_fixed=False)
  assert_close(np.asarray(jax.vmap(logit_fn, in_axes=(None, 0))(logit_params, xs)), want)


def test_logits_leaves_graphs_without_a_trailing_softmax_unchanged(tmp_path):
  xs = rand(np.random.default_rng(11), 3, 2, 5)
  plain = activation_model(tmp_path, "Relu", 13, ["Flatten"], name="plain")
  a, p = load_onnx(plain)
  b, q = load_onnx(plain, logits=True)
  assert a.output_activation is None and b.output_activation is None
  np.testing.assert_array_equal(jax.vmap(a, in_axes=(None, 0))(p, xs), jax.vmap(b, in_axes=(None, 0))(q, xs))

  # A Softmax followed by an op that changes values is no output activation: it stays.
  rng = np.random.default_rng(12)
  nodes = [helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["s"]),
           helper.make_node("Mul", ["s", "k"], ["y"])]
  path = save_model(tmp_path, nodes, ["N", 5], ["N", 5], dict(w=rand(rng, 5, 5), k=np.float32(2.0)), name="mul")
  apply, params = load_onnx(path, logits=True)
  assert apply.output_activation is None
  check_against_onnxruntime(path, rand(rng, 3, 5))

  # A Softmax whose values another node also reads stays too.
  nodes = [helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["s"]),
           helper.make_node("Flatten", ["s"], ["y"]), helper.make_node("Relu", ["s"], ["unused"])]
  path = save_model(tmp_path, nodes, ["N", 5], ["N", 5], dict(w=rand(rng, 5, 5)), name="shared")
  apply, params = load_onnx(path, logits=True)
  assert apply.output_activation is None
  np.testing.assert_allclose(jnp.sum(apply(params, jnp.ones(5, jnp.float32))), 1.0, rtol=1e-6)


def test_several_outputs_report_their_activations(tmp_path):
  rng = np.random.default_rng(13)
  nodes = [helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("LogSoftmax", ["l"], ["y"]),
           helper.make_node("Relu", ["l"], ["z"])]
  graph = helper.make_graph(
      nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
       helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
      [numpy_helper.from_array(rand(rng, 4, 4), "w")])
  path = tmp_path / "two.onnx"
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)
  # The LogSoftmax's input also feeds 'z'; what matters is that nothing else reads its own values.
  apply, params = load_onnx(path, logits=True)
  assert apply.output_activation == ("LogSoftmax", None)
  y, z = apply(params, jnp.ones(4, jnp.float32))
  np.testing.assert_allclose(z, jax.nn.relu(y), rtol=1e-6)  # y is the logits 'l'


def test_unsupported_op_in_a_vnncomp_graph_names_op_node_and_file(tmp_path):
  nodes = [helper.make_node("Sub", ["x", "m"], ["c"], name="normalise"),
           helper.make_node("Flatten", ["c"], ["f"]),
           helper.make_node("Gemm", ["f", "w"], ["g"], transB=1),
           helper.make_node("Sin", ["g"], ["y"], name="periodic")]
  inits = dict(m=np.zeros(3, np.float32), w=np.ones((2, 3), np.float32))
  path = save_model(tmp_path, nodes, [1, 1, 1, 3], [1, 2], inits)
  with pytest.raises(ValueError, match=r"unsupported ONNX op: 'Sin' \(node 'periodic'\)") as info:
    load_onnx(path)
  assert str(path) in str(info.value)
