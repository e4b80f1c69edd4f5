"""Tests of qbound.io.load_onnx: small models built with onnx.helper, run by onnxruntime and by
the loaded JAX function on the same random inputs."""

import sys

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
