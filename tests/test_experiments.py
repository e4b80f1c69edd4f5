"""The experiments' smoke modes and the analysis notebooks run, and what they write is sane.

Each experiment's ``main(['--smoke', '--out', DIR])`` is called in-process (once per test session)
into a temporary results root; the notebooks are then executed headless against that root
(``QBOUND_RESULTS``). Checks: the files exist, every reached error is at most its proven bound,
and a few relations that must hold between methods (e.g. the exact MILP value is below every proven
upper bound). About a minute on two cores with a warm XLA cache (the smoke runs keep one in
``~/.cache/qbound/jax-smoke``), two to three minutes cold.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(EXPERIMENTS))

NAMES = ["random_nets", "resiliency", "deep_compression", "bench_differential", "scaling", "top1_agreement",
         "certified_compression"]
if (EXPERIMENTS / "activation_quant.py").is_file():
  NAMES.append("activation_quant")


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
  return tmp_path_factory.mktemp("results")


_RUNS: dict = {}


@pytest.fixture
def smoke(results_root):
  """``smoke(name) -> (summary, out_dir)``: runs the experiment's smoke mode once per session."""

  def run(name):
    if name not in _RUNS:
      out = results_root / "smoke" / name
      module = importlib.import_module(name)
      try:
        _RUNS[name] = (module.main(["--smoke", "--out", str(out)]), out)
      except BaseException as exc:
        _RUNS[name] = exc
    if isinstance(_RUNS[name], BaseException):
      pytest.fail(f"{name} --smoke failed: {_RUNS[name]!r}")
    return _RUNS[name]

  return run


def read_csv(path):
  with open(path, newline="") as fh:
    rows = list(csv.DictReader(fh))
  return [{k: _num(v) for k, v in r.items()} for r in rows]


def _num(v):
  if v == "":
    return None
  try:
    return float(v)
  except ValueError:
    return v


def assert_sound(rows, lower="lower", upper="upper"):
  checked = 0
  for r in rows:
    lo, up = r.get(lower), r.get(upper)
    if isinstance(lo, float) and isinstance(up, float):
      assert math.isfinite(up) and 0 <= lo <= up, r
      checked += 1
  assert checked > 0
  return checked


def test_random_nets(smoke):
  summary, out = smoke("random_nets")
  for f in ("errors.csv", "summary.json", "error_vs_bits.png", "reachable_sets.png"):
    assert (out / f).stat().st_size > 0
  rows = read_csv(out / "errors.csv")
  assert_sound(rows)
  for bits in {r["bits"] for r in rows}:
    sel = {r["method"]: r for r in rows if r["bits"] == bits}
    assert set(sel) >= {"interval", "crown", "diff-interval", "diff"}
    # CROWN's bounds are intersected with interval bounds, so never looser.
    assert sel["crown"]["upper"] <= sel["interval"]["upper"] * (1 + 1e-6)
    if "exact-milp" in sel:
      exact = sel["exact-milp"]["lower"]
      assert all(exact <= r["upper"] * (1 + 1e-6) + 1e-9 for r in sel.values()), sel
  reach = summary["reachable"]
  assert set(reach["certified"]) >= {"f_interval", "f_crown", "fq_crown", "diff_diff"}


@pytest.mark.slow  # 15-30 s of smoke run; `python experiments/resiliency.py --smoke` does the same
def test_resiliency(smoke):
  summary, out = smoke("resiliency")
  rows = read_csv(out / "resiliency.csv")
  assert (out / "resiliency.png").stat().st_size > 0
  assert_sound(rows)
  for r in rows:
    assert 0 <= r["acc"] <= 1
    if r["quantizer"] != "float32":
      assert r["ratio"] > 1, r
  assert isinstance(summary["cnn_supported"], bool) and summary["cnn_note"]


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_deep_compression(smoke):
  summary, out = smoke("deep_compression")
  stages = read_csv(out / "stages.csv")
  assert [r["stage"] for r in stages] == ["float32", "pruned", "pruned+retrained", "shared", "huffman"]
  assert_sound(stages)
  sizes = [r["size_bytes"] for r in stages]
  assert sizes[0] > sizes[1] >= sizes[3] >= sizes[4]
  assert stages[0]["acc"] > 0.9
  assert stages[3]["upper"] == stages[4]["upper"]  # Huffman coding changes storage, not values


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_bench_differential(smoke):
  summary, out = smoke("bench_differential")
  rows = read_csv(out / "bench.csv")
  assert any(r["family"] == "acas" for r in rows)  # ACAS 1_1 is bundled, so it always runs
  reached = {(r["net"], r["input"]): r["lower"] for r in rows if r["method"] == "sampling"}
  for r in rows:
    if r["method"] != "sampling":
      assert r["bound"] >= reached[(r["net"], r["input"])] >= 0, r
  for s in summary["summary"]:
    assert s["first_call_seconds"] > 0


@pytest.mark.slow  # 15-30 s of smoke run; `python experiments/scaling.py --smoke` does the same
def test_scaling(smoke):
  summary, out = smoke("scaling")
  width = read_csv(out / "width.csv")
  measured = [r for r in width if r.get("seconds") is not None]
  assert measured and all(r["seconds"] > 0 and r["first_seconds"] >= r["seconds"] for r in measured)
  assert summary["matmul_gflops"] > 0
  tp = read_csv(out / "throughput.csv")
  assert all(r["passes_per_second"] > 0 for r in tp)
  assert "interval" in summary["exponents"]["width"]


def test_batch_mnist(smoke):
  """All boxes in one certify_batch call (the bundled digits in smoke mode)."""
  summary, out = smoke("batch_mnist")
  for f in ("images.csv", "summary.json", "batch.json.gz", "bounds_hist.png"):
    assert (out / f).stat().st_size > 0
  rows = read_csv(out / "images.csv")
  assert len(rows) == summary["images"] and assert_sound(rows) == len(rows)
  assert summary["one_call"] and summary["seconds_per_image"] > 0 and summary["compile_seconds"] >= 0
  assert summary["upper"]["min"] <= summary["upper"]["median"] <= summary["upper"]["max"]
  import gzip

  import qbound as qb

  with gzip.open(out / "batch.json.gz", "rt") as fh:
    batch = qb.BatchCertificate.from_json(fh.read())
  assert [r["upper"] for r in rows] == batch.upper.tolist()


@pytest.mark.slow  # 14 s of smoke run; `python experiments/top1_agreement.py --smoke` does the same
def test_top1_agreement(smoke):
  """Certified top-1 agreement (qb.props.certified_agreement) beside the measured one."""
  summary, out = smoke("top1_agreement")
  for f in ("results.csv", "boxes.csv", "summary.json", "top1_agreement.png"):
    assert (out / f).stat().st_size > 0
  rows = read_csv(out / "results.csv")
  assert {(r["copy"], r["radius"]) for r in rows} == {(c, r) for c in ("uniform8", "uniform4", "uniform2", "ternary")
                                                        for r in (0.01, 0.02)}
  for r in rows:
    assert r["boxes"] == summary["images"] == 3
    assert math.isclose(r["certified"] + r["counterexample"] + r["unknown"], 1.0)
    assert 0 <= r["certified"] <= r["agree_centres"] <= 1, r  # a proved ball's centre agrees
    assert 0 <= r["agree_all"] <= 1 and r["median_seconds"] > 0 and r["seconds"] > 0
  boxes = read_csv(out / "boxes.csv")
  assert len(boxes) == 3 * len(rows)
  for b in boxes:
    assert b["status"] in ("proved", "counterexample", "unknown")
    assert not (b["status"] == "proved" and b["centre_agrees"] == "False"), b
  # The 8-bit copy agrees with the float network on at least 99% of the test images, and top-1
  # equivalence is proven on the warm-up box (image 0, radius 0.01, 8 bits, a budget that covers compiling).
  u8 = {r["radius"]: r for r in rows if r["copy"] == "uniform8"}
  assert u8[0.01]["agree_all"] >= 0.99 and summary["warmup"]["status"] == "proved"


@pytest.mark.slow  # 18 s of smoke run
def test_certified_compression(smoke):
  """qb.compression.search meets its budget, re-certified, and is no larger than any uniform width
  that meets it."""
  summary, out = smoke("certified_compression")
  rows = read_csv(out / "frontier.csv")
  searched = [r for r in rows if r["candidate"] == "searched"]
  assert searched, rows
  for s in searched:
    assert s["certified"] <= s["target"]
    uniform = [r for r in rows if r["target"] == s["target"] and str(r["candidate"]).startswith("uniform-")
               and "+" not in str(r["candidate"]) and r["certified"] <= s["target"]]
    assert all(s["bytes"] <= r["bytes"] for r in uniform)
  # The ordered descents (attribution, HAWQ-style sensitivity) also never answer with a failing certificate.
  ordered = [r for r in rows if r["candidate"] in ("attribution-ordered", "sensitivity-ordered")]
  assert len(ordered) == 2 * len(searched) and all(r["certified"] <= r["target"] for r in ordered)
  # Attribution: one row per kernel and target, shares of a positive sum.
  layers = read_csv(out / "attribution.csv")
  for t in {r["target"] for r in layers}:
    shares = [r["share"] for r in layers if r["target"] == t]
    assert len(shares) == 3 and abs(sum(shares) - 1) < 1e-6 and min(shares) > 0
  # Retraining rows: the post-training baseline and each mode, all certified over the same test balls.
  retrained = read_csv(out / "retraining.csv")
  assert {r["mode"] for r in retrained} >= {"none", "certified"}
  assert all(r["certified"] > 0 and 0 <= r["accuracy"] <= 1 for r in retrained)
  frontier_names = {r["candidate"] for r in rows}
  assert all(f"{r['format']}+{r['mode']}" in frontier_names for r in retrained if r["mode"] != "none")


@pytest.mark.slow  # 15-30 s of smoke run; `python experiments/certified_compression_models.py --smoke` does the same
def test_certified_compression_models(smoke):
  """The same frontier on a convolutional network: the search meets its budget, re-certified, and is
  no larger than any uniform width that meets it."""
  summary, out = smoke("certified_compression_models")
  rows = read_csv(out / "frontier.csv")
  searched = [r for r in rows if r["candidate"] == "searched"]
  assert searched and all(r["model"] == "digits CNN" for r in rows)
  for s in searched:
    assert s["certified"] <= s["target"]
    uniform = [r for r in rows if r["target"] == s["target"] and str(r["candidate"]).startswith("uniform-")
               and r["certified"] <= s["target"]]
    assert uniform and all(s["bytes"] <= r["bytes"] for r in uniform)


@pytest.mark.skipif(not (EXPERIMENTS / "activation_quant.py").is_file(), reason="no activation_quant experiment")
def test_activation_quant(smoke):
  summary, out = smoke("activation_quant")
  rows = read_csv(out / "activation_quant.csv")
  assert_sound(rows)


def test_build_notebooks_is_reproducible(tmp_path):
  """The committed notebooks are what build_notebooks.py writes (so edits go through the generator)."""
  sys.path.insert(0, str(NOTEBOOKS))
  build = importlib.import_module("build_notebooks")
  import nbformat

  for name, cells in build.NOTEBOOKS.items():
    committed = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in build.build(name, cells).cells], name


# 13-15 s each, and the smoke runs of the first two are tested above.
SLOW_NOTEBOOKS = {"top1_agreement", "certified_compression", "resiliency", "scaling"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_NOTEBOOKS else n
                                  for n in NAMES if (NOTEBOOKS / f"{n}.ipynb").is_file()])
def test_notebook_runs(name, smoke, results_root, monkeypatch):
  smoke(name)
  monkeypatch.setenv("QBOUND_RESULTS", str(results_root))
  import nbformat
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook plots nothing"
  # It read the temporary smoke results, not the checkout's.
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert str(results_root) in text


@pytest.mark.slow  # minutes on two loaded cores: CROWN and the differential bounds compile a step per layer of the ViT
def test_vit_digits(smoke):
  summary, out = smoke("vit_digits")
  rows = read_csv(out / "vit_digits.csv")
  assert rows and summary["graph_kinds"].get("mul", 0) > 0 and summary["graph_kinds"].get("exp", 0) > 0
  assert_sound(rows)
  for r in rows:
    assert math.isfinite(r["upper"]) and r["lower"] <= r["upper"]
