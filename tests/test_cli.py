"""Tests of the ``qbound`` command line (qbound.cli) and the demo (qbound.demo).

``main(argv)`` is called in-process (jit caches are shared, so the suite stays fast); one smoke
test runs the installed ``qbound`` entry point in a subprocess. The bundled digits MLP and the
bundled ACAS Xu pair are the models: real files through the real loaders.

No strict dtype promotion here: certify's lower-bound search uses optax.adam, whose bias
correction (``decay ** count``, float ** int32) fails under ``jax.numpy_dtype_promotion("strict")``.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qbound as qb
from qbound import cli, demo
from qbound.io import bundled_path

DIGITS = str(bundled_path("digits_mlp.nnet"))
ACAS = str(bundled_path("ACASXU_run2a_1_1_batch_2000.nnet"))
ACAS_16 = str(bundled_path("ACASXU_run2a_1_1_batch_2000_16bit.nnet"))
# A small ACAS Xu box (raw units: feet, radians, feet per second) around a typical encounter.
ACAS_BOX = ["--center", "5000,0.1,-0.2,700,600", "--radius", "10,0.01,0.01,5,5"]


def run(argv, capsys):
  """``(exit status, stdout, stderr)`` of ``qbound argv``, run in-process."""
  code = cli.main(argv)
  out, err = capsys.readouterr()
  return code, out, err


def test_demo_returns_rows_and_prints_table():
  buf = io.StringIO()
  rows = demo.run_demo(bits=(8, 4), radius=0.02, image=1, progress=False, file=buf)
  assert [r["bits"] for r in rows] == [8, 4]
  for row in rows:
    assert 0 < row["lower"] <= row["upper"] < np.inf
    assert row["gap"] == pytest.approx(row["upper"] / row["lower"])
    assert row["certificate"].box_lower.shape == (64,)
  # Coarser weights, larger error: what the demo is meant to show.
  assert rows[1]["lower"] > rows[0]["lower"]
  table = buf.getvalue()
  assert "certified upper" in table and "reached lower" in table
  assert len([line for line in table.splitlines() if line.strip().startswith(("8 ", "4 "))]) == 2


def test_demo_subcommand(capsys):
  code, out, err = run(["demo", "--bits", "6", "--radius", "0.01", "--no-progress"], capsys)
  assert code == 0, err
  assert "radius 0.01" in out
  assert any(line.split()[:1] == ["6"] for line in out.splitlines())


def test_certify_json_is_a_certificate(capsys, tmp_path):
  output = tmp_path / "cert.json"
  code, out, err = run(["certify", DIGITS, "--bits", "4", "--per-channel", "--center", "0.3",
                        "--radius", "0.02", "--json", "--output", str(output), "--time-budget", "3"], capsys)
  assert code == 0, err
  cert = qb.Certificate.from_json(out)
  assert 0 < cert.lower <= cert.upper
  assert cert.box_upper - cert.box_lower == pytest.approx(np.full(64, 0.04), abs=1e-6)
  assert qb.Certificate.from_json(output.read_text()).upper == cert.upper
  # The witness lies in the box and reaches the claimed error on the real files' networks.
  assert np.all(cert.witness >= cert.box_lower) and np.all(cert.witness <= cert.box_upper)


def test_certify_default_box_is_the_files_input_range(capsys):
  code, out, err = run(["certify", DIGITS, "--bits", "8", "--asymmetric", "--method", "crown"], capsys)
  assert code == 0, err
  assert "64 inputs, widths 1 to 1" in out  # the digits file declares pixels in [0, 1]
  assert "asymmetric" in out and "proven upper bound" in out


def test_typed_corners_are_rounded_outward_to_float32(capsys):
  # 55947.691 lies between two float32 numbers: the box certified starts at the lower one (it was
  # rounded to the nearest, 55947.69140625, leaving the typed corner outside the certified box).
  code, out, err = run(["certify", ACAS, "--compare", ACAS_16, "--lower", "55947.691,-0.1,-0.1,1145,10",
                        "--upper", "55947.7,0.1,0.1,1150,20.3", "--method", "interval", "--json"], capsys)
  assert code == 0, err
  cert = json.loads(out)
  assert cert["box_lower"][0] <= 55947.691 and cert["box_upper"][4] >= 20.3
  assert np.float32(cert["box_lower"][0]) == cert["box_lower"][0]  # float32 corners
  code, _, err = run(["certify", ACAS, "--compare", ACAS_16, "--lower", "1e39,-3,-3,1145,0",
                      "--upper", "2e39,3,3,1200,60"], capsys)
  assert code == 2 and "beyond float32's range" in err


def test_certify_box_npz_and_seed(capsys, tmp_path):
  box = tmp_path / "box.npz"
  np.savez(box, center=np.full(64, 0.5), radius=np.float64(0.01))
  code, out, err = run(["certify", DIGITS, "--box-npz", str(box), "--method", "interval", "--seed", "3",
                        "--json"], capsys)
  assert code == 0, err
  cert = json.loads(out)
  assert cert["method"] == "interval" and cert["lower"] <= cert["upper"]


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_compare_acas_xu_with_its_16_bit_copy(capsys):
  # CROWN, not auto: auto adds the differential bound, whose first compilation on ACAS Xu's
  # seven layers takes ~40 s; the demo tests already run auto.
  code, out, err = run(["certify", ACAS, "--compare", ACAS_16, *ACAS_BOX, "--method", "crown", "--json"],
                       capsys)
  assert code == 0, err
  cert = qb.Certificate.from_json(out)
  assert 0 < cert.lower <= cert.upper
  # float16 weights: a small error, far below the network's output scale.
  assert cert.upper < 0.1
  assert cert.method == "crown" and set(cert.bounds) == {"crown"}


@pytest.mark.parametrize("argv, message", [
    (["certify", "missing.nnet"], "missing.nnet: no such file"),
    (["certify", "model.h5"], "unknown model format '.h5'"),
    (["certify", DIGITS, "--lower", "0,0", "--upper", "1,1"], "--lower has 2 values but the model takes 64"),
    (["certify", DIGITS, "--lower", "0.6", "--upper", "0.4"], "lower > upper at input 0"),
    (["certify", DIGITS, "--lower", "0"], "--lower and --upper go together"),
    (["certify", DIGITS, "--center", "0.5"], "--center and --radius go together"),
    (["certify", DIGITS, "--center", "0.5", "--radius", "-1"], "--radius must be >= 0"),
    (["certify", DIGITS, "--lower", "0,x", "--upper", "1"], "--lower: 'x' is not a number"),
    (["certify", DIGITS, "--lower", "nan", "--upper", "1"], "must be finite"),
    (["certify", DIGITS, "--lower", "0", "--upper", "1", "--center", "0", "--radius", "1"], "one way"),
    (["certify", DIGITS, "--bits", "1"], "--bits: bits must be between 2 and"),
    (["certify", DIGITS, "--compare", ACAS], "same inputs"),
    (["certify", ACAS, "--compare", ACAS_16, "--bits", "8"], "cannot be used with --compare"),
    (["certify", DIGITS, "--method", "magic"], "invalid choice: 'magic'"),
    (["certify", DIGITS, "--box-npz", "nowhere.npz"], "nowhere.npz: no such file"),
    (["demo", "--image", "99"], "image must be an index"),
    (["demo", "--bits", "8", "1"], "--bits: bits must be between 2 and"),  # before the demo's header (out == "")
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: COMMAND"),
])
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
  code, out, err = run(argv, capsys)
  assert code == 2
  assert err.startswith("qbound: error: ") and message in err, err
  assert "Traceback" not in err and out == ""


def test_a_soundness_error_is_not_taken_for_bad_input(capsys, monkeypatch):
  """A reached error above a proven bound is qbound's bug: it surfaces with its traceback, never as
  exit status 2 with the user blamed."""
  def broken(*args, **kwargs):
    raise qb.SoundnessError("reached error 2.0 exceeds the proven bound 1.0")

  monkeypatch.setattr(qb, "certify", broken)
  with pytest.raises(qb.SoundnessError, match="exceeds the proven bound"):
    cli.main(["certify", DIGITS])


def test_bad_files_exit_2_naming_the_file(capsys, tmp_path):
  broken = tmp_path / "broken.nnet"
  broken.write_text("// a comment\n3,64,10,64,\n64,32,10,\n")
  binary = tmp_path / "binary.nnet"
  binary.write_bytes(bytes(range(256)))
  no_keys = tmp_path / "box.npz"
  np.savez(no_keys, lo=np.zeros(64))
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"garbage")
  for argv, message in [([str(broken)], "broken.nnet, line 3"),
                        ([DIGITS, "--box-npz", str(garbage)], "not a NumPy .npz archive"),
                        ([str(binary)], "not a text NNet file"),
                        ([DIGITS, "--box-npz", str(no_keys)], "must hold arrays 'lower' and 'upper'"),
                        ([DIGITS, "--output", str(tmp_path)], "is a directory"),
                        ([DIGITS, "--output", str(tmp_path / "no" / "c.json")], "does not exist")]:
    code, _, err = run(["certify", *argv], capsys)
    assert code == 2 and err.startswith("qbound: error: ") and message in err, err


def test_certify_onnx_model(capsys, onnx_mlp):
  path = onnx_mlp
  code, out, err = run(["certify", str(path), "--bits", "4", "--lower", "0,0,0,0", "--upper", "1,1,1,1",
                        "--method", "crown", "--json"], capsys)
  assert code == 0, err
  cert = qb.Certificate.from_json(out)
  assert 0 < cert.lower <= cert.upper
  # ONNX files declare no input range: without a box option there is nothing to certify over.
  code, _, err = run(["certify", str(path)], capsys)
  assert code == 2 and "declares no finite input range" in err


def test_help_exits_0(capsys):
  code, out, _ = run(["certify", "--help"], capsys)
  assert code == 0 and "--compare" in out


def test_installed_entry_point_smoke():
  exe = shutil.which("qbound", path=str(Path(sys.executable).parent)) or shutil.which("qbound")
  if exe is None:
    pytest.skip("the qbound entry point is not installed (pip install -e .)")
  proc = subprocess.run([exe, "certify", ACAS, "--bits", "8", *ACAS_BOX, "--method", "interval"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "proven upper bound" in proc.stdout and "its 8-bit copy" in proc.stdout


# ------------------------------------------------------------------- many inputs (certify_batch)


@pytest.fixture
def digit_inputs(tmp_path):
  """Five bundled digits test images, as a .npz with an 'inputs' array."""
  with np.load(bundled_path("digits_test.npz")) as data:
    images = np.asarray(data["images"][:5], np.float32)
  path = tmp_path / "digits.npz"
  np.savez(path, inputs=images, labels=np.arange(5))
  return str(path), images


def test_certify_many_inputs_at_once(capsys, tmp_path, digit_inputs):
  path, images = digit_inputs
  out_file = tmp_path / "batch.json"
  code, out, err = run(["certify", DIGITS, "--bits", "8", "--inputs", path, "--radius", "0.02", "--clip", "0,1",
                        "--method", "crown", "--json", "--output", str(out_file)], capsys)
  assert code == 0, err
  batch = qb.BatchCertificate.from_json(out)
  assert len(batch) == 5 and batch.method == "crown"
  assert np.all((0 < batch.lower) & (batch.lower <= batch.upper))
  np.testing.assert_allclose(batch.box_lower, np.maximum(images - 0.02, 0), atol=1e-6)
  np.testing.assert_allclose(batch.box_upper, np.minimum(images + 0.02, 1), atol=1e-6)
  assert qb.BatchCertificate.from_json(out_file.read_text()).upper.tolist() == batch.upper.tolist()
  # The same box through the one-box path gives the same proven bound.
  code, out, err = run(["certify", DIGITS, "--bits", "8", "--box-npz", str(_box_file(tmp_path, batch, 3)),
                        "--method", "crown", "--json"], capsys)
  assert code == 0, err
  assert qb.Certificate.from_json(out).upper == pytest.approx(batch.upper[3], rel=1e-5)


def qbound_memory():
  from qbound import memory

  return memory


def _box_file(tmp_path, batch, i):
  path = tmp_path / f"box{i}.npz"
  np.savez(path, lower=batch.box_lower[i], upper=batch.box_upper[i])
  return path


def test_certify_many_inputs_summary(capsys, digit_inputs):
  path, _ = digit_inputs
  # On CPU the budget includes what the test process already holds (often a few GiB late in the suite).
  budget = f"{int(qbound_memory().process_bytes() // 2**20) + 1024}MiB"
  code, out, err = run(["certify", DIGITS, "--inputs", path, "--radius", "0.02", "--method", "interval",
                        "--memory-budget", budget, "--devices", "1"], capsys)
  assert code == 0, err
  assert "inputs:       5 from" in out and "proven upper: median" in out
  assert len([line for line in out.splitlines() if line.strip()[:1].isdigit() and "  " in line.strip()]) >= 5


@pytest.mark.parametrize("extra, message", [
    (["--center", "0"], "cannot be combined with --center"),
    ([], "needs --radius"),
    (["--radius", "-1"], "--radius must be >= 0"),
    (["--radius", "0.1", "--clip", "1,0"], "--clip needs two numbers"),
    (["--radius", "0.1", "--clip", "0.5,1"], "outside --clip"),
    (["--radius", "0.1", "--method", "bab"], "not batched"),
    (["--radius", "0.1", "--memory-budget", "lots"], "not a number of bytes"),
    (["--radius", "0.1", "--devices", "99"], "--devices must be between 1"),
])
def test_many_inputs_bad_options(extra, message, capsys, digit_inputs):
  path, _ = digit_inputs
  code, _, err = run(["certify", DIGITS, "--inputs", path, *extra], capsys)
  assert code == 2 and message in err, err


def test_many_inputs_bad_files(capsys, tmp_path):
  np.save(tmp_path / "flat.npy", np.zeros(64))
  np.savez(tmp_path / "two.npz", a=np.zeros((2, 64)), b=np.zeros((2, 64)))
  np.save(tmp_path / "wrong.npy", np.zeros((2, 10)))
  for name, message in (("missing.npz", "no such file"), ("flat.npy", "shape (n, *input_shape)"),
                        ("two.npz", "name the batch 'inputs'"), ("wrong.npy", "each input has shape (10,)")):
    code, _, err = run(["certify", DIGITS, "--inputs", str(tmp_path / name), "--radius", "0.1"], capsys)
    assert code == 2 and message in err, (name, err)
  code, _, err = run(["certify", DIGITS, "--clip", "0,1"], capsys)
  assert code == 2 and "use it with --inputs" in err


# ------------------------------------------- negative values, broadcasting, time budget, verbosity


@pytest.fixture
def onnx_mlp(tmp_path):
  """A 4-input ONNX MLP (no declared input range, a declared input shape)."""
  onnx = pytest.importorskip("onnx")
  from onnx import TensorProto, helper, numpy_helper

  rng = np.random.default_rng(0)
  weights = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("w1", (4, 8)), ("b1", (8,)), ("w2", (8, 3)))]
  nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["z"]),
           helper.make_node("Relu", ["z"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
  graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], weights)
  path = tmp_path / "mlp.onnx"
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
  return str(path)


def test_negative_values_after_a_space(capsys, onnx_mlp):
  code, out, err = run(["certify", onnx_mlp, "--lower", "-1,-1,-0.5,-.5", "--upper", "1,1,1,1", "--method",
                        "interval", "--json"], capsys)
  assert code == 0, err
  cert = qb.Certificate.from_json(out)
  np.testing.assert_array_equal(cert.box_lower, [-1, -1, -0.5, -0.5])
  code, out, err = run(["certify", onnx_mlp, "--center", "-1,-2,0,1e-3", "--radius", "0.1", "--method",
                        "interval", "--json"], capsys)
  assert code == 0, err
  assert qb.Certificate.from_json(out).box_lower[1] == pytest.approx(-2.1)
  # Still refused where a negative value makes no sense, with the same message as before.
  code, _, err = run(["certify", onnx_mlp, "--center", "0", "--radius", "-1,-1,-1,-1"], capsys)
  assert code == 2 and "--radius must be >= 0" in err


def test_join_negative_values_leaves_other_tokens_alone():
  options = {"--lower", "--upper", "--seed"}
  assert cli.common.join_negative_values(["--lower", "-inf,0", "--seed", "-3", "--json", "-v"], options) == [
      "--lower=-inf,0", "--seed=-3", "--json", "-v"]
  assert cli.common.join_negative_values(["--upper", "-v"], options) == ["--upper", "-v"]  # an option, not a value


def test_single_value_spreads_over_an_onnx_models_inputs(capsys, onnx_mlp):
  code, out, err = run(["certify", onnx_mlp, "--lower", "-1", "--upper", "1", "--method", "interval", "--json"],
                       capsys)
  assert code == 0, err
  cert = qb.Certificate.from_json(out)
  np.testing.assert_array_equal(cert.box_lower, -np.ones(4))
  np.testing.assert_array_equal(cert.box_upper, np.ones(4))
  code, out, err = run(["certify", onnx_mlp, "--center", "0.5", "--radius", "0.1", "--method", "interval",
                        "--json"], capsys)
  assert code == 0, err
  np.testing.assert_allclose(qb.Certificate.from_json(out).box_upper, np.full(4, 0.6), rtol=1e-6)


def test_time_budget_reaches_certify(capsys, monkeypatch):
  seen = {}
  real = qb.certify

  def spy(*args, **kwargs):
    seen.update(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(qb, "certify", spy)
  code, _, err = run(["certify", DIGITS, "--method", "interval", "--time-budget", "2.5", "--quiet"], capsys)
  assert code == 0, err
  assert seen["time_budget"] == 2.5 and seen["method"] == "interval"


@pytest.mark.parametrize("value", ["nan", "0", "-1", "soon"])
def test_bad_time_budget(capsys, value):
  code, out, err = run(["certify", DIGITS, "--time-budget", value], capsys)
  assert code == 2 and "--time-budget needs a number of seconds > 0" in err and out == ""


def test_time_budget_is_for_one_box(capsys, digit_inputs):
  path, _ = digit_inputs
  code, _, err = run(["certify", DIGITS, "--inputs", path, "--radius", "0.1", "--time-budget", "5"], capsys)
  assert code == 2 and "--time-budget applies to one box" in err


def test_version(capsys):
  code, out, _ = run(["--version"], capsys)
  assert code == 0 and out.startswith(f"qbound {qb.__version__} (jax ")


def test_quiet_and_verbose(capsys):
  code, out, err = run(["certify", DIGITS, "--method", "interval", "--verbose"], capsys)
  assert code == 0
  assert "qbound: certifying over a box of shape (64,) with method interval" in err
  assert "proven upper bound" in out  # the result still goes to stdout
  code, out, err = run(["certify", DIGITS, "--method", "interval", "-q"], capsys)
  assert code == 0 and err == "" and "proven upper bound" in out
  code, _, err = run(["certify", DIGITS, "--quiet", "--verbose"], capsys)
  assert code == 2 and "not allowed with argument" in err


def test_quiet_batch_has_no_progress_bar(capsys, monkeypatch, digit_inputs):
  path, _ = digit_inputs
  seen = {}
  real = qb.certify_batch

  def spy(*args, **kwargs):
    seen.update(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(qb, "certify_batch", spy)
  code, _, err = run(["certify", DIGITS, "--inputs", path, "--radius", "0.02", "--method", "interval", "-q"], capsys)
  assert code == 0, err
  assert seen["progress"] is False and err == ""


def test_python_dash_m(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "qbound.cli", "--version"], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0 and proc.stdout.startswith("qbound "), proc.stderr
