"""Top-1 and delta-top-1 equivalence on VeryDiff's public pairs, beside VeryDiff's published verdicts.

VeryDiff (Teuber, Kern, Janzen and Beckert, "Revisiting Differential Verification: Equivalence
Verification with Confidence", TACAS 2025) ships test examples that ``../shared/bench/verydiff``
copies (README there):

* the LHC jet-tagging MLP ``2_80-1`` (16-40-40-5, ending in Softmax) against a copy pruned 10% and retrained,
  on the box ``sigma_0.1.vnnlib`` ([-0.1, 0.1]^16), delta-top-1 equivalence for delta 0.8, 0.9, 0.99
  and 0.999. VeryDiff's published runs: counterexample (0.18 s), counterexample (0.014 s), unknown
  after 600 s, proved (6.7 s, 449 splits);
* the MNIST 3x100 ReLU net against a pruned-and-retrained copy, top-1 equivalence on the two local
  boxes ``mnist_{0,7}_local_15.vnnlib`` (VeryDiff publishes no verdict for these two boxes).

Each instance runs in a fresh process (``qbound verify F G --vnnlib SPEC ...``, the command VNN-COMP's
``run_instance.sh`` calls), so its time includes loading and compiling; with the persistent
compilation cache warm (a first run filled it) the compile share shrinks; ``--cold`` empties the
cache per instance (``QBOUND_JAX_CACHE=0``). Every counterexample is re-checked independently of
qbound: both ONNX files are evaluated at it with onnxruntime (Softmax included) and the property is
tested on those outputs.

Run from the repository root (needs ``../shared/bench`` and ``qbound[onnx,vnnlib]``)::

    python benchmarks/bench_props.py [--timeout 60] [--cold]

Writes ``results/bench_props/results.csv`` and prints the table in Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = pathlib.Path(os.environ.get("QBOUND_BENCH", ROOT.parent / "shared" / "bench")) / "verydiff"

# (pair, spec, property option, VeryDiff's published verdict and time)
INSTANCES = [
    ("lhc", "sigma_0.1.vnnlib", ["--delta-top1", "0.8"], "counterexample, 0.18 s"),
    ("lhc", "sigma_0.1.vnnlib", ["--delta-top1", "0.9"], "counterexample, 0.014 s"),
    ("lhc", "sigma_0.1.vnnlib", ["--delta-top1", "0.99"], "unknown after 600 s"),
    ("lhc", "sigma_0.1.vnnlib", ["--delta-top1", "0.999"], "proved, 6.7 s (449 splits)"),
    ("mnist", "mnist_0_local_15.vnnlib", ["--top1"], "not published"),
    ("mnist", "mnist_7_local_15.vnnlib", ["--top1"], "not published"),
]
PAIRS = {"lhc": ("2_80-1.onnx", "2_80-1-0.1.onnx"), "mnist": ("mnist_relu_3_100.onnx", "mnist_relu_3_100_pruned5.onnx")}
WORDS = {"unsat": "proved", "sat": "counterexample", "unknown": "unknown"}


def onnx_outputs(path: pathlib.Path, x: np.ndarray) -> np.ndarray:
  """The ONNX model at ``x`` by onnxruntime (independent of qbound), batch axis added if declared."""
  import onnxruntime as ort

  session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  inp = session.get_inputs()[0]
  rank = len(inp.shape)
  feed = x.astype(np.float32).reshape(-1)
  if rank >= 2:
    feed = feed.reshape([1] + [int(d) if isinstance(d, int) else -1 for d in inp.shape[1:]])
  return np.asarray(session.run(None, {inp.name: feed})[0], np.float64).reshape(-1)


def recheck(pair: str, prop: list[str], x: np.ndarray) -> bool:
  """Whether ``x`` violates the property by onnxruntime's outputs of both original files."""
  first, second = (BENCH / name for name in PAIRS[pair])
  yf, yg = onnx_outputs(first, x), onnx_outputs(second, x)
  c = int(np.argmax(yf))
  if not np.all(np.delete(yf, c) < yf[c]):
    return False
  if prop[0] == "--delta-top1":
    # The files end in Softmax: yf holds probabilities.
    if yf[c] < float(prop[1]):
      return False
  return bool(np.any(np.delete(yg, c) > yg[c]))


def run(pair: str, spec: str, prop: list[str], timeout: float, cold: bool) -> dict:
  first, second = (BENCH / name for name in PAIRS[pair])
  with tempfile.TemporaryDirectory() as tmp:
    cex = pathlib.Path(tmp) / "cex.txt"
    env = dict(os.environ)
    if cold:
      env["QBOUND_JAX_CACHE"] = "0"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qbound.cli", "verify", str(first), str(second),
                           "--vnnlib", str(BENCH / spec), *prop, "--timeout", str(timeout), "--json", "-q",
                           "--counterexample", str(cex)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
  lines = proc.stdout.splitlines()
  if not lines or lines[0] not in WORDS:
    raise RuntimeError(f"qbound verify failed on {pair} {spec} {prop}:\n{proc.stdout}\n{proc.stderr}")
  report = json.loads("\n".join(lines[1:]))
  verdict = report["verdicts"][-1]
  checked = ""
  if lines[0] == "sat":
    checked = "yes" if recheck(pair, prop, np.asarray(verdict["counterexample"])) else "NO"
  return {"pair": pair, "box": spec, "property": " ".join(p.lstrip("-") for p in prop), "qbound": WORDS[lines[0]],
          "seconds_in_call": round(report["seconds"], 2), "wall_seconds": round(wall, 2),
          "pieces": verdict["pieces_bounded"], "closed": round(verdict["closed_fraction"], 4),
          "counterexample_rechecked": checked}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--timeout", type=float, default=60.0, help="seconds per instance (default 60)")
  parser.add_argument("--cold", action="store_true", help="no persistent compilation cache")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "results" / "bench_props")
  args = parser.parse_args(argv)
  if not BENCH.is_dir():
    print(f"{BENCH} is absent: this benchmark needs ../shared/bench/verydiff", file=sys.stderr)
    return 1
  rows = []
  for (pair, spec, prop, theirs) in INSTANCES:
    row = run(pair, spec, prop, args.timeout, args.cold)
    row["verydiff"] = theirs
    rows.append(row)
    print(row, flush=True)
  args.out.mkdir(parents=True, exist_ok=True)
  with open(args.out / "results.csv", "w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print("\n| pair | box | property | qbound | s in call | s wall | pieces | cex re-checked | VeryDiff (published) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['pair']} | {r['box']} | {r['property']} | {r['qbound']} | {r['seconds_in_call']} | "
          f"{r['wall_seconds']} | {r['pieces']} | {r['counterexample_rechecked'] or '-'} | {r['verydiff']} |")
  return 0 if all(r["counterexample_rechecked"] != "NO" for r in rows) else 2


if __name__ == "__main__":
  sys.exit(main())
