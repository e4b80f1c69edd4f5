"""The model readers never crash on a bad file: load_onnx and load_nnet either read it (and the network
then runs) or raise ValueError naming the file, whatever the bytes (empty, random, truncated, flipped,
the other format). Never a raw traceback from inside onnx, protobuf or numpy, never a hang."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

onnx = pytest.importorskip("onnx", reason="the onnx package is needed (pip install qbound[onnx])")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qbound.io import load_nnet, load_onnx, save_nnet  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, database=None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A small valid ONNX model in VNN-COMP style and a small valid NNet file, as bytes, and a scratch dir."""
  tmp = tmp_path_factory.mktemp("readers")
  rng = np.random.default_rng(0)
  inits = {"mean": rng.normal(size=(1, 1, 1, 4)), "range": rng.uniform(1, 2, 4),
           "w0": rng.normal(size=(6, 4)), "b0": rng.normal(size=6), "w1": rng.normal(size=(6, 3)),
           "shape": np.array([0, -1], np.int64)}
  nodes = [helper.make_node("Sub", ["x", "mean"], ["c"]), helper.make_node("Div", ["c", "range"], ["n"]),
           helper.make_node("Flatten", ["n"], ["f"]),
           helper.make_node("Gemm", ["f", "w0", "b0"], ["g"], transB=1, alpha=0.5),
           helper.make_node("Relu", ["g"], ["r"]), helper.make_node("MatMul", ["r", "w1"], ["m"]),
           helper.make_node("Constant", [], ["b1"], value_floats=[0.1, 0.2, 0.3]),
           helper.make_node("Add", ["m", "b1"], ["a"]), helper.make_node("Reshape", ["a", "shape"], ["l"]),
           helper.make_node("Softmax", ["l"], ["y"])]
  graph = helper.make_graph(
      nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 4])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
      [numpy_helper.from_array(np.asarray(v, np.int64 if v.dtype == np.int64 else np.float32), k)
       for k, v in inits.items()])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
  onnx.checker.check_model(model)
  layers = {f"dense_{k}": {"kernel": jnp.asarray(rng.normal(size=(n, m)), jnp.float32),
                           "bias": jnp.asarray(rng.normal(size=m), jnp.float32)}
            for k, (n, m) in enumerate([(3, 4), (4, 2)])}
  save_nnet(tmp / "small.nnet", {"params": layers}, header=["a small network"])
  return {"onnx": model.SerializeToString(), "nnet": (tmp / "small.nnet").read_bytes(), "dir": tmp}


def outcome(files, reader: str, data: bytes, name: str = "fuzzed"):
  """Writes data, reads it with load_onnx or load_nnet; a network it reads must run on its input shape.

  Returns 'loaded' or the ValueError's message, after checking that the message names the file.
  """
  path = files["dir"] / f"{name}.{reader}"
  path.write_bytes(data)
  try:
    if reader == "onnx":
      apply, params = load_onnx(path)
      shape = apply.input_shape
      if shape is None or None in shape or math.prod(shape) > 10**6:
        return "loaded"
    else:
      apply, params = load_nnet(path)
      shape = params["normalisation"]["mins"].shape
    out = apply(params, jnp.ones(shape, jnp.float32))
    jax.block_until_ready(out)
    return "loaded"
  except ValueError as err:
    assert str(path) in str(err), f"the error does not name the file: {err}"
    return str(err)


# --- ONNX -------------------------------------------------------------------------------------


def test_small_onnx_model_reads_and_drops_its_softmax(files):
  assert outcome(files, "onnx", files["onnx"]) == "loaded"
  path = files["dir"] / "fuzzed.onnx"
  apply, params = load_onnx(path, logits=True)
  assert apply.output_activation == "Softmax" and apply.input_shape == (1, 1, 4)


@pytest.mark.parametrize("tenth", range(10))
def test_every_tenth_prefix_of_an_onnx_model_is_refused(files, tenth):
  data = files["onnx"]
  message = outcome(files, "onnx", data[:len(data) * tenth // 10], f"prefix{tenth}")
  assert message != "loaded"
  if tenth == 0:
    assert "the file is empty" in message


@pytest.mark.parametrize("reader, other, says", [
    ("onnx", "nnet", r"it is a text file \(starting '// a small network'.*load_nnet"),
    ("nnet", "onnx", r"line 1: not a text NNet file: byte 0x[0-9a-f]{2}.*load_onnx")])
def test_the_other_format_is_refused_with_a_pointer(files, reader, other, says):
  message = outcome(files, reader, files[other], "other")
  assert message != "loaded"
  assert re.search(says, message), message


def test_a_text_file_is_not_an_onnx_model(files):
  message = outcome(files, "onnx", b"input,output\n1.0,2.0\n", "text")
  assert "it is a text file (starting 'input,output')" in message


@given(data=st.binary(max_size=3000))
@FUZZ
def test_random_bytes_as_onnx(files, data):
  outcome(files, "onnx", data)


@given(cut=st.integers(0, 10**6))
@FUZZ
def test_truncated_onnx(files, cut):
  data = files["onnx"]
  assert outcome(files, "onnx", data[:cut % len(data)]) != "loaded"


@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
@FUZZ
def test_byte_flips_in_onnx(files, flips):
  data = bytearray(files["onnx"])
  for at, value in flips:
    data[at % len(data)] = value
  outcome(files, "onnx", bytes(data))


def rewritten(files, edit, name):
  """The small ONNX model with ``edit(model)`` applied, as bytes."""
  model = onnx.ModelProto()
  model.ParseFromString(files["onnx"])
  edit(model)
  return outcome(files, "onnx", model.SerializeToString(), name)


def set_initializer(name, value):
  def edit(model):
    (tensor,) = [t for t in model.graph.initializer if t.name == name]
    tensor.CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))
  return edit


@pytest.mark.parametrize("value, says", [
    (np.full((6, 4), np.nan), r"the constant 'w0' holds NaN"),
    (np.full((6, 4), np.inf), r"node '#3 \(unnamed\)' \(Gemm\): its kernel \(dense_0\) holds inf"),
    (np.zeros((6, 5)),
     r"\(Gemm\) fails on an input of shape \(1, 1, 4\): TypeError: .*\(the input shape the file declares\)")])
def test_bad_weights_are_refused_naming_node(files, value, says):
  message = rewritten(files, set_initializer("w0", value), "weights")
  assert re.search(says, message), message


def test_weights_that_overflow_float32_once_scaled_are_refused(files):
  def edit(model):
    set_initializer("w0", np.full((6, 4), 1e38))(model)
    (alpha,) = [a for a in model.graph.node[3].attribute if a.name == "alpha"]
    alpha.f = 8.0  # Gemm's alpha is folded into the kernel: 8e38 is no float32
  assert "(Gemm): its kernel (dense_0) holds inf" in rewritten(files, edit, "overflow")


def test_unsupported_op_names_op_and_node(files):
  def edit(model):
    model.graph.node[4].op_type = "Gelu"
    model.graph.node[4].name = "act"
  assert "unsupported ONNX op: 'Gelu' (node 'act')" in rewritten(files, edit, "unsupported")


def test_foreign_domain_and_missing_tensor_are_refused(files):
  def foreign(model):
    model.graph.node[4].domain = "com.microsoft"
  assert "domain 'com.microsoft'" in rewritten(files, foreign, "foreign")

  def dangling(model):
    model.graph.node[5].input[0] = "nowhere"
  assert "reads tensor 'nowhere', which no node" in rewritten(files, dangling, "dangling")


def test_external_data_that_is_missing_is_refused(files):
  def edit(model):
    (tensor,) = [t for t in model.graph.initializer if t.name == "w1"]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "weights.bin"
  assert "external data files that cannot be read" in rewritten(files, edit, "external")


def test_missing_file_is_an_os_error(files):
  with pytest.raises(FileNotFoundError):
    load_onnx(files["dir"] / "absent.onnx")
  with pytest.raises(FileNotFoundError):
    load_nnet(files["dir"] / "absent.nnet")


# --- NNet -------------------------------------------------------------------------------------


def test_small_nnet_reads(files):
  assert outcome(files, "nnet", files["nnet"]) == "loaded"


@pytest.mark.parametrize("tenth", range(10))
def test_every_tenth_prefix_of_an_nnet_file_is_refused(files, tenth):
  data = files["nnet"]
  assert outcome(files, "nnet", data[:len(data) * tenth // 10], f"prefix{tenth}") != "loaded"


def nnet_lines(files):
  return files["nnet"].decode().splitlines()


@pytest.mark.parametrize("line, text, says", [  # line: the index among data lines (comments left out)
    (0, "2,3,2,4,5,", r"line 2: expected numLayers,numInputs,numOutputs,maxLayerSize, found 5"),
    (0, "0,3,2,4,", r"line 2: numLayers, numInputs and numOutputs must all be positive"),
    (0, "2,3,x,4,", r"line 2: 'x' is not an integer"),
    (0, "2," + "9" * 5000 + ",2,4,", r"line 2: '9{30}.*' is not an integer"),  # not int()'s own error
    (1, "3,4,2,2,", r"line 3: expected the 3 layer sizes \(numLayers \+ 1\), found 4"),
    (1, "3,5,2,", r"line 13: expected 3 weights: row 4 of the 5x3 matrix of layer 0, found 1"),
    (1, "3,4_0,2,", r"line 3: '4_0' is not an integer"),
    (3, "-1.0,-1.0,", r"line 5: expected 3 input mins, found 2"),
    (3, "nan,0,0,", r"line 5: input mins and maxes must be numbers or \+-inf, found nan"),
    (5, "0.0,zero,0.0,0.0,", r"line 7: 'zero' is not a number"),
    (5, "0.0,1_0,0.0,0.0,", r"line 7: '1_0' is not a number"),
    (6, "1.0,0.0,1.0,1.0,", r"line 8: a range is 0"),
    (7, "nan,0.5,0.5,", r"line 9: weights must be finite float32 numbers, found nan"),
    (7, "1e39,0.5,0.5,", r"line 9: weights must be finite float32 numbers, found 1e\+39"),
    (11, "nan,", r"line 13: biases must be finite float32 numbers, found nan"),
], ids=["header-count", "header-zero", "header-text", "header-huge", "sizes-count", "sizes-vs-rows",
        "underscore-int", "mins-count", "nan-min", "non-numeric", "underscore-float", "zero-range", "nan-weight",
        "float32-overflow", "nan-bias"])
def test_broken_nnet_lines_name_file_line_and_problem(files, line, text, says):
  lines = nnet_lines(files)
  data_lines = [k for k, ln in enumerate(lines) if not ln.startswith("//")]
  lines[data_lines[line]] = text
  message = outcome(files, "nnet", ("\n".join(lines) + "\n").encode(), "broken")
  assert message != "loaded"
  assert re.search(says, message), message


@given(data=st.binary(max_size=3000))
@FUZZ
def test_random_bytes_as_nnet(files, data):
  outcome(files, "nnet", data)


@given(cut=st.integers(0, 10**6))
@FUZZ
def test_truncated_nnet(files, cut):
  data = files["nnet"]
  outcome(files, "nnet", data[:cut % len(data)])


@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
@FUZZ
def test_byte_flips_in_nnet(files, flips):
  data = bytearray(files["nnet"])
  for at, value in flips:
    data[at % len(data)] = value
  outcome(files, "nnet", bytes(data))


TOKENS = st.sampled_from(["nan", "inf", "-inf", "1e999", "", "-", "x", "9" * 5000, "1_0", "0x10", "\u0661",
                          "1e-999", "+", "NaN", "1.5", "-0", "10000000000", "0", "-3", "\x00", "\ufeff1"])


@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), TOKENS), min_size=1, max_size=3))
@FUZZ
def test_token_edits_in_nnet(files, edits):
  lines = nnet_lines(files)
  for line, column, token in edits:
    k = line % len(lines)
    parts = lines[k].split(",")
    parts[column % len(parts)] = token
    lines[k] = ",".join(parts)
  outcome(files, "nnet", ("\n".join(lines) + "\n").encode())
