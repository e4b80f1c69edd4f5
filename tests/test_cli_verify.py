"""``qbound verify F G`` and the VNN-COMP scripts around it."""

import json
import pathlib
import subprocess

import numpy as np
import pytest

import qbound as qb
from qbound import cli
from test_cli import ACAS, ACAS_16, ACAS_BOX, run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def softmax_mlp(path, seed: int, noise: float = 0.0, base_seed: int = 0):
  """A 3-input ONNX MLP 3-12-12-4 ending in Softmax; ``noise`` perturbs the weights of the net of
  ``base_seed`` (a stand-in for a compressed copy)."""
  onnx = pytest.importorskip("onnx")
  from onnx import TensorProto, helper, numpy_helper

  rng = np.random.default_rng(base_seed)
  shapes = (("w1", (3, 12)), ("b1", (12,)), ("w2", (12, 12)), ("b2", (12,)), ("w3", (12, 4)))
  values = {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes}
  noisy = np.random.default_rng(seed)
  values = {k: (v + noise * noisy.normal(size=v.shape)).astype(np.float32) for k, v in values.items()}
  nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["z1"]),
           helper.make_node("Relu", ["z1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
           helper.make_node("Add", ["h2", "b2"], ["z2"]), helper.make_node("Relu", ["z2"], ["r2"]),
           helper.make_node("MatMul", ["r2", "w3"], ["logits"]),
           helper.make_node("Softmax", ["logits"], ["y"], axis=-1)]
  graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                            [numpy_helper.from_array(v, k) for k, v in values.items()])
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
  return str(path)


@pytest.fixture
def pair(tmp_path):
  return softmax_mlp(tmp_path / "f.onnx", 0), softmax_mlp(tmp_path / "g.onnx", 1, noise=0.3)


def test_top1_counterexample_is_written_and_checks_out(capsys, tmp_path, pair):
  f, g = pair
  cex = tmp_path / "cex.txt"
  code, out, _ = run(["verify", f, g, "--lower", "-3", "--upper", "3", "--top1", "--timeout", "30",
                      "--counterexample", str(cex), "-q"], capsys)
  assert out.splitlines()[0] == "sat" and code == 0
  text = cex.read_text()
  assert text.startswith("((X_0 ") and "(Y_7 " in text  # 3 inputs, 4 + 4 outputs
  x = np.array([float(line.split()[1].rstrip(")")) for line in text.split("(X_")[1:]][:3], np.float32)
  apply_f, params_f = qb.io.load_onnx(f, logits=True)
  apply_g, params_g = qb.io.load_onnx(g, logits=True)
  yf, yg = np.asarray(apply_f(params_f, x)), np.asarray(apply_g(params_g, x))
  c = int(np.argmax(yf))
  assert np.any(np.delete(yg, c) > yg[c])


def test_tiny_box_is_proved_with_json(capsys, pair):
  f, g = pair
  x = "0.3,-0.2,0.1"
  code, out, _ = run(["verify", f, f, "--center", x, "--radius", "0.001", "--delta-top1", "0.5", "--json", "-q"],
                     capsys)
  lines = out.splitlines()
  assert lines[0] == "unsat" and code == 0
  report = json.loads("\n".join(lines[1:]))
  assert report["answer"] == "unsat" and report["verdicts"][0]["status"] == "proved"


@pytest.mark.slow  # 11 s; the tiny-box JSON test stays
def test_epsilon_on_nnet_files(capsys):
  code, out, _ = run(["verify", ACAS, ACAS_16, *ACAS_BOX, "--epsilon", "0.05", "-q"], capsys)
  assert out.splitlines()[0] == "unsat" and code == 0
  code, out, _ = run(["verify", ACAS, ACAS_16, *ACAS_BOX, "--epsilon", "0", "-q"], capsys)
  assert out.splitlines()[0] == "sat" and code == 0


def test_vnnlib_boxes(capsys, tmp_path, pair):
  pytest.importorskip("vnnlib")
  f, g = pair
  box = qb.Box(np.array([0.3, -0.2, 0.1], np.float32), np.array([0.301, -0.199, 0.101], np.float32))
  spec = qb.io.export_vnnlib(box, tmp_path / "p.vnnlib", epsilon=1.0, num_outputs=4)
  code, out, _ = run(["verify", f, f, "--vnnlib", str(spec), "--top1", "-q"], capsys)
  assert out.splitlines()[0] in ("unsat", "unknown")
  code, out, err = run(["verify", f, g, "--vnnlib", str(spec), "--lower", "0", "--upper", "1", "--top1"], capsys)
  assert code == 2 and "one way" in err


@pytest.mark.parametrize("extra, message", [
    ([], "say what to prove"),
    (["--delta-top1", "1.5"], "--delta-top1 must be in (0, 1)"),
    (["--epsilon", "abc"], "--epsilon must be a number"),
    (["--top1", "--timeout", "-1"], "--timeout"),
    (["--top1", "--counterexample", "/no/such/dir/ce.txt"], "--counterexample /no/such/dir/ce.txt: the directory"),
])
def test_usage_errors(extra, message, capsys, pair):
  f, g = pair
  code = cli.main(["verify", f, g, "--lower", "0", "--upper", "1", *extra])
  _, err = capsys.readouterr()
  assert code == 2 and message in err


def test_no_box_is_a_usage_error_naming_the_first_network(capsys, pair):
  # (It raised AttributeError: 'Namespace' object has no attribute 'model', exit 1 read as "unknown".)
  f, g = pair
  code = cli.main(["verify", f, g, "--top1"])
  _, err = capsys.readouterr()
  assert code == 2 and f"{f} declares no finite input range" in err


def test_run_instance_script(tmp_path, pair):
  """VNN-COMP's run_instance.sh on a one-network VNN-LIB file: the results file's first line is the
  answer (the installed .venv of the checkout runs it)."""
  pytest.importorskip("vnnlib")
  if not (ROOT / ".venv" / "bin" / "qbound").exists():
    pytest.skip("run_instance.sh runs the checkout's .venv/bin/qbound, which this checkout does not have")
  f, g = pair
  box = qb.Box(np.full(3, -3.0, np.float32), np.full(3, 3.0, np.float32))
  spec = qb.io.export_vnnlib(box, tmp_path / "p.vnnlib", epsilon=1.0, num_outputs=4)
  results = tmp_path / "results.txt"
  subprocess.run(["bash", str(ROOT / "vnncomp" / "run_instance.sh"), "v1", "test", f"{f},{g}", str(spec),
                  str(results), "40"], check=True, timeout=120)
  lines = results.read_text().splitlines()
  assert lines[0] == "sat" and lines[1].startswith("((X_0 ")
