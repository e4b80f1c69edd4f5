"""Writes the analysis notebooks in notebooks/ from the cells below (so they are reviewable code).

Each notebook reads what an experiment wrote under ``results/NAME/`` (the full run) or, when that
is absent, ``results/smoke/NAME/``; ``QBOUND_RESULTS=DIR`` points them at another results root
(``DIR/NAME`` or ``DIR/smoke/NAME``). They only load, tabulate, check and plot: no qbound code,
no bounds computed. Rebuild after editing this file, then execute headless::

    python notebooks/build_notebooks.py
    python experiments/run_all.py --smoke          # runs the experiments, then every notebook

The notebooks are committed with the outputs of a run on the full results
(``python notebooks/build_notebooks.py --execute``): the docs site renders them as committed, and the
tests run each one again on smoke results. ``run_all.py`` saves executed copies under
``results/[smoke/]notebooks/``.

One notebook is a walkthrough rather than an analysis: ``quant_libraries`` quantizes a small model
with qwix and with AQT and certifies it live (about a minute on 2 cores), then shows the table
``benchmarks/bench_quant_libraries.py`` wrote, if it is there.
"""

from __future__ import annotations

import os
import pathlib
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

# Shared by every notebook: find the results, read CSV and JSON, show a table.
SETUP = r'''import csv, json, math, os, pathlib
import numpy as np
import matplotlib.pyplot as plt
from IPython.display import Markdown, display
%matplotlib inline


def results_root() -> pathlib.Path:
    """$QBOUND_RESULTS, else the results/ folder of the checkout this notebook runs in."""
    if os.environ.get("QBOUND_RESULTS"):
        return pathlib.Path(os.environ["QBOUND_RESULTS"])
    for d in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:
        if (d / "results").is_dir() and (d / "experiments").is_dir():
            return d / "results"
    raise FileNotFoundError("no results/ folder found; run the experiment first or set QBOUND_RESULTS")


def experiment_dir(name: str) -> pathlib.Path:
    """results/NAME (full run) if it has a summary, else results/smoke/NAME."""
    root = results_root()
    for d in (root / name, root / "smoke" / name):
        if (d / "summary.json").is_file():
            return d
    raise FileNotFoundError(f"no results for {name} under {root}: run python experiments/{name}.py [--smoke]")


def number(v):
    if v in ("", None):
        return None
    if v in ("True", "False"):
        return v == "True"
    try:
        x = float(v)
    except ValueError:
        return v
    return int(x) if x.is_integer() and "." not in v and "e" not in v.lower() else x


def read_csv(path):
    with open(path, newline="") as fh:
        return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def show_table(rows, columns, title=""):
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(columns) + " |",
                                                       "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    display(Markdown("\n".join(lines)))


def check_sound(rows, lower="lower", upper="upper"):
    """Every proven upper bound is at least the error reached (lower); returns how many rows checked."""
    n = 0
    for r in rows:
        lo, up = r.get(lower), r.get(upper)
        if isinstance(lo, (int, float)) and isinstance(up, (int, float)):
            assert 0 <= lo <= up, r
            n += 1
    return n
'''


def load(name: str) -> str:
  return f'''NAME = "{name}"
RESULTS = experiment_dir(NAME)
summary = json.loads((RESULTS / "summary.json").read_text())
print(f"results from {{RESULTS}} (smoke run: {{summary['smoke']}}, {{summary['seconds']:.0f}} s, "
      f"{{summary['machine']['cpu_count']}} CPUs, jax {{summary['machine']['jax']}})")'''


NOTEBOOKS = {
    "random_nets": [
        ("md", """# Random ReLU networks: certified quantization error against the bit width

After Cooke, Mo and Xiang 2023 ("Guaranteed quantization error computation for neural network model
compression"): N(0, 1) weights and biases, inputs in [-1, 1]^n, uniform symmetric per-tensor quantization
of weights and biases. Produced by `python experiments/random_nets.py` (`--smoke` for the CI version)."""),
        ("code", SETUP),
        ("code", load("random_nets")),
        ("code", """rows = read_csv(RESULTS / "errors.csv")
print("rows checked lower <= upper:", check_sound(rows))
methods = list(dict.fromkeys(r["method"] for r in rows))
for net in dict.fromkeys(r["net"] for r in rows):
    sel = [r for r in rows if r["net"] == net]
    bits = sorted({r["bits"] for r in sel})
    table = []
    for b in bits:
        row = {"bits": b}
        for m in methods:
            hit = [r for r in sel if r["bits"] == b and r["method"] == m]
            row[m] = hit[0]["upper"] if hit else None
        row["reached"] = max(r["lower"] for r in sel if r["bits"] == b and r["lower"] is not None)
        table.append(row)
    show_table(table, ["bits", *methods, "reached"], title=f"net {net}: proven upper bound per method")"""),
        ("md", """How loose is each method? The ratio of its upper bound to the exact maximal error (the MILP value when
it was solved to optimality, else the largest error reached, which makes the ratio an upper estimate)."""),
        ("code", """fig, axes = plt.subplots(1, len(set(r["net"] for r in rows)), figsize=(11, 3.6), squeeze=False)
for ax, net in zip(axes[0], dict.fromkeys(r["net"] for r in rows)):
    sel = [r for r in rows if r["net"] == net]
    bits = sorted({r["bits"] for r in sel})
    def exact(b):
        m = [r for r in sel if r["bits"] == b and r["method"] == "exact-milp" and r.get("optimal")]
        return m[0]["lower"] if m else max(r["lower"] for r in sel if r["bits"] == b and r["lower"] is not None)
    for m in methods:
        if m == "exact-milp":
            continue
        pts = [(r["bits"], r["upper"] / exact(r["bits"])) for r in sel if r["method"] == m]
        ax.plot(*zip(*pts), "o-", label=m, ms=4)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_yscale("log"); ax.set_xlabel("bits"); ax.set_ylabel("upper / exact"); ax.set_title(net)
    ax.grid(True, which="both", alpha=0.3)
axes[0][0].legend(fontsize=7)
plt.tight_layout()"""),
        ("code", """reach = summary["reachable"]
print(f"reachable-set plot: {reach['samples']} samples, {reach['bits']}-bit copy")
for k in ("f", "fq", "diff"):
    lo, hi = np.array(reach["sampled"][f"{k}_min"]), np.array(reach["sampled"][f"{k}_max"])
    print(f"  sampled {k:>4}: output ranges {np.round(np.stack([lo, hi], 1), 4).tolist()}")
for name, (lo, hi) in reach["certified"].items():
    print(f"  certified {name:>18}: {np.round(np.stack([lo, hi], 1), 4).tolist()}")
    who = name.split("_")[0]
    assert np.all(np.array(lo) <= np.array(reach["sampled"][f"{who}_min"]) + 1e-4)
    assert np.all(np.array(hi) >= np.array(reach["sampled"][f"{who}_max"]) - 1e-4)"""),
        ("md", "The figures the experiment saved:"),
        ("code", """from IPython.display import Image
for png in ("error_vs_bits.png", "reachable_sets.png"):
    display(Image(filename=str(RESULTS / png)))"""),
    ],
    "resiliency": [
        ("md", """# Resiliency under quantization: accuracy, storage and certified error against network size

After Sung, Shin and Hwang 2016: digits MLPs 64-w-w-10 of growing width, kernels quantized ternary / 2 / 3 / 4 /
8 bits, directly and (when qbound has it) after quantization-aware retraining. The certified error compares each
quantized network with the float network it came from. Produced by `python experiments/resiliency.py`."""),
        ("code", SETUP),
        ("code", load("resiliency")),
        ("code", """rows = read_csv(RESULTS / "resiliency.csv")
print("rows checked lower <= upper:", check_sound(rows))
for note in summary["notes"]:
    print("note:", note)
print("retraining:", summary["retraining"])
show_table(rows, ["net", "params", "quantizer", "retrained", "acc", "ratio", "bits_per_weight", "upper", "lower", "gap"],
           title=f"certified over {summary['config']['images']} boxes of radius {summary['config']['radius']}, "
                 f"method {summary['config']['method']}")"""),
        ("md", "Accuracy lost to quantization (float accuracy minus quantized accuracy), against the number of parameters:"),
        ("code", """fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
for q in dict.fromkeys(r["quantizer"] for r in rows if r["quantizer"] != "float32"):
    for retrained, ls in ((False, "--"), (True, "-")):
        sel = sorted((r for r in rows if r["quantizer"] == q and r["retrained"] == retrained and r["family"] == "mlp"),
                     key=lambda r: r["params"])
        if sel:
            ax[0].plot([r["params"] for r in sel], [r["float_acc"] - r["acc"] for r in sel], ls, marker="o", ms=4,
                       label=f"{q}{' retrained' if retrained else ''}")
            ax[1].plot([r["params"] for r in sel], [r["upper"] / r["lower"] for r in sel], ls, marker="o", ms=4)
ax[0].set_xscale("log"); ax[0].set_xlabel("parameters"); ax[0].set_ylabel("accuracy drop"); ax[0].legend(fontsize=6, ncol=2)
ax[1].set_xscale("log"); ax[1].set_xlabel("parameters"); ax[1].set_ylabel("upper / lower (gap)"); ax[1].set_title("tightness")
for a in ax: a.grid(True, which="both", alpha=0.3)
plt.tight_layout()"""),
        ("code", """from IPython.display import Image
display(Image(filename=str(RESULTS / "resiliency.png")))"""),
    ],
    "deep_compression": [
        ("md", """# Deep Compression of the digits MLP: size, accuracy and certified error per stage

Prune -> retrain -> share (k-means) -> Huffman (Han et al. 2016) on the bundled digits MLP 64-32-32-10. The
certified error compares each stage with the original network. Produced by `python experiments/deep_compression.py`."""),
        ("code", SETUP),
        ("code", load("deep_compression")),
        ("code", """stages = read_csv(RESULTS / "stages.csv")
print("rows checked lower <= upper:", check_sound(stages))
show_table(stages, ["stage", "sparsity", "bits", "size_bytes", "ratio", "acc", "nonzero", "upper", "lower"],
           title=f"pipeline (method {summary['config']['method']}, {summary['config']['images']} boxes)")
sizes = [r["size_bytes"] for r in stages]
assert sizes[-1] <= sizes[-2], "Huffman coding must not grow the storage"
assert stages[0]["ratio"] == 1"""),
        ("code", """sweep_path = RESULTS / "sweep.csv"
if sweep_path.is_file():
    sweep = read_csv(sweep_path)
    print("rows checked lower <= upper:", check_sound(sweep))
    show_table(sweep, ["stage", "sparsity", "bits", "ratio", "acc", "upper", "lower"], title="sweep")
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for s in sorted({r["sparsity"] for r in sweep}):
        sel = sorted((r for r in sweep if r["sparsity"] == s), key=lambda r: r["bits"])
        label = "uniform, unpruned" if s == 0 else f"sparsity {s}"
        ax[0].plot([r["ratio"] for r in sel], [r["acc"] for r in sel], "o-", label=label)
        ax[1].plot([r["ratio"] for r in sel], [r["upper"] for r in sel], "o-", label=label)
    ax[0].set_ylabel("test accuracy"); ax[1].set_ylabel("certified max logit error"); ax[1].set_yscale("log")
    for a in ax: a.set_xscale("log"); a.set_xlabel("compression ratio"); a.grid(True, which="both", alpha=0.3)
    ax[0].legend(fontsize=7); plt.tight_layout()
else:
    print("no sweep in this (smoke) run")"""),
        ("code", """from IPython.display import Image
display(Image(filename=str(RESULTS / "deep_compression.png")))"""),
    ],
    "bench_differential": [
        ("md", """# Differential verification benchmarks beside NeuroDiff

MNIST 3x100, HAR and ACAS Xu 1_1..1_9 against their float16 copies (the ReluDiff / NeuroDiff problems,
`../shared/bench`). Bounds on max |f_16 - f| per input and method, with compile time shown apart from the
per-input time. Produced by `python experiments/bench_differential.py`."""),
        ("code", SETUP),
        ("code", load("bench_differential")),
        ("code", """rows = read_csv(RESULTS / "bench.csv")
for note in summary["notes"]:
    print("note:", note)
for r in rows:
    if r["method"] != "sampling":
        assert r["bound"] >= 0
# every proven bound is at least the error reached by sampling on the same input
reached = {(r["net"], r["input"]): r["lower"] for r in rows if r["method"] == "sampling"}
for r in rows:
    if r["method"] != "sampling":
        assert reached[(r["net"], r["input"])] <= r["bound"], r
show_table(summary["summary"], ["family", "method", "n", "bound_mean", "ratio_to_neurodiff", "proved_0.05",
                                 "lower_mean", "compile_seconds", "per_input_seconds", "neurodiff_seconds"],
           title="per family and method (compile = first call minus the median per-input call)")"""),
        ("code", """fams = list(dict.fromkeys(r["family"] for r in rows))
fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.6), squeeze=False)
for ax, fam in zip(axes[0], fams):
    sel = [r for r in rows if r["family"] == fam]
    for m in dict.fromkeys(r["method"] for r in sel):
        pts = [(i, r["bound"] if m != "sampling" else r["lower"]) for i, r in enumerate(x for x in sel if x["method"] == m)]
        ax.plot(*zip(*pts), "o-" if m != "sampling" else "*", label=m, ms=4)
    nd = [r["neurodiff"] for r in sel if r["method"] == "sampling"]
    ax.plot(range(len(nd)), nd, "k--", label="NeuroDiff" if fam != "acas" else "epsilon 0.05")
    ax.set_yscale("log"); ax.set_title(fam); ax.set_xlabel("input / network"); ax.grid(True, which="both", alpha=0.3)
axes[0][0].set_ylabel("max |f_16 - f|"); axes[0][0].legend(fontsize=6)
plt.tight_layout()"""),
        ("code", """from IPython.display import Image
for png in ("bench_bounds.png", "bench_times.png"):
    display(Image(filename=str(RESULTS / png)))"""),
    ],
    "scaling": [
        ("md", """# Scaling of the bound methods with width and depth; sampling throughput

Random MLPs 16 -> [w] x d -> 10 and their 8-bit copies. Time (compile apart), XLA memory, fitted growth
exponents, and forward passes per second of `jit(vmap(f))` against this machine's matmul rate. Produced by
`python experiments/scaling.py`."""),
        ("code", SETUP),
        ("code", load("scaling")),
        ("code", """width = read_csv(RESULTS / "width.csv")
depth = read_csv(RESULTS / "depth.csv")
tp = read_csv(RESULTS / "throughput.csv")
cols = ["method", "width", "depth", "seconds", "compile_seconds", "xla_temp_mib", "skipped"]
show_table(width, cols, title="vs width (depth 2)")
show_table(depth, cols, title="vs depth")
exps = [dict(sweep=k, method=m, **v) for k, d in summary["exponents"].items() for m, v in d.items()]
show_table(exps, ["sweep", "method", "time", "compile", "xla_temp_memory", "points"], title="growth exponents (log-log slopes)")
show_table(tp, ["network", "width", "passes_per_second", "gflops", "fraction_of_matmul"],
           title=f"sampling throughput; matmul {summary['matmul_gflops']:.1f} GFLOP/s")
assert all(r["seconds"] > 0 for r in width + depth if r.get("seconds") is not None)
assert all(0 < r["fraction_of_matmul"] < 5 for r in tp)"""),
        ("code", """fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
for m in dict.fromkeys(r["method"] for r in width):
    sel = [r for r in width if r["method"] == m and r.get("seconds") is not None]
    ax[0].plot([r["width"] for r in sel], [r["seconds"] for r in sel], "o-", label=m)
    sel = [r for r in depth if r["method"] == m and r.get("seconds") is not None]
    ax[1].plot([r["depth"] for r in sel], [r["compile_seconds"] for r in sel], "o-", label=m)
ax[0].set_xscale("log", base=2); ax[0].set_yscale("log"); ax[0].set_xlabel("width"); ax[0].set_ylabel("run time (s)")
ax[1].set_yscale("log"); ax[1].set_xlabel("depth"); ax[1].set_ylabel("compile time (s)")
for a in ax: a.grid(True, which="both", alpha=0.3); a.legend(fontsize=7)
plt.tight_layout()"""),
        ("code", """from IPython.display import Image
display(Image(filename=str(RESULTS / "scaling.png")))"""),
    ],
    "activation_quant": [
        ("md", """# Activation quantization: DQA against direct quantization

The hidden pre-activations of a digits MLP quantized to b = 3, 4, 5 bits directly, with DQA (important channels
get 2 extra bits, their shift errors Huffman coded), and directly at b + 2 bits for reference. Weights stay
float32. Produced by `python experiments/activation_quant.py`."""),
        ("code", SETUP),
        ("code", load("activation_quant")),
        ("code", """rows = read_csv(RESULTS / "activation_quant.csv")
print("rows checked lower <= upper:", check_sound(rows))
print(f"float32 accuracy {summary['float_acc']:.4f}; quantized layers {summary['layers']}")
show_table(rows, ["scheme", "bits", "acc", "memory_bits", "overhead", "upper", "lower", "best_method"],
           title=f"certified over {summary['config']['images']} boxes, method {summary['config']['method']}")"""),
        ("md", "Accuracy and certified error per bit of activation memory:"),
        ("code", """fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
for s in dict.fromkeys(r["scheme"] for r in rows):
    sel = sorted((r for r in rows if r["scheme"] == s), key=lambda r: r["memory_bits"])
    ax[0].plot([r["memory_bits"] for r in sel], [r["acc"] for r in sel], "o-", label=s)
    ax[1].plot([r["memory_bits"] for r in sel], [r["upper"] for r in sel], "o-", label=s)
ax[0].axhline(summary["float_acc"], color="k", ls=":", label="float32")
ax[0].set_ylabel("test accuracy"); ax[1].set_ylabel("certified max logit error"); ax[1].set_yscale("log")
for a in ax: a.set_xlabel("activation bits per input"); a.grid(True, which="both", alpha=0.3); a.legend(fontsize=7)
plt.tight_layout()"""),
        ("code", """from IPython.display import Image
display(Image(filename=str(RESULTS / "activation_quant.png")))"""),
    ],
    "top1_agreement": [
        ("md", """# Certified top-1 agreement of the digits MLP with its quantized copies

The bundled digits MLP 64-32-32-10 against copies with uniform 8-, 4-, 2-bit and ternary kernels. *Measured*
agreement: both networks pick the same class at the test images. *Certified* agreement: they pick the same class
at every point of the L-inf ball (radius 0.01 or 0.02, clipped to [0, 1]) around the image, proven by
`qb.props.certified_agreement` (top-1 equivalence as in VeryDiff, TACAS 2025); a *counterexample* is a point of
the ball where the classes differ; *unknown*: neither within the per-box time budget. Produced by
`python experiments/top1_agreement.py`."""),
        ("code", SETUP),
        ("code", load("top1_agreement")),
        ("code", """rows = read_csv(RESULTS / "results.csv")
boxes = read_csv(RESULTS / "boxes.csv")
cfg = summary["config"]
print(f"float32 test accuracy {summary['float_acc']:.4f}; {summary['images']} boxes per copy and radius, "
      f"{cfg['time_budget']} s per box; warm-up (compiling) {summary['warmup_seconds']:.1f} s")
for r in rows:
    assert abs(r["certified"] + r["counterexample"] + r["unknown"] - 1) < 1e-9, r
    assert r["certified"] <= r["agree_centres"] + 1e-12, r  # a proved ball's centre agrees
assert not [b for b in boxes if b["status"] == "proved" and not b["centre_agrees"]], "proved, yet the centre disagrees"
odd = [b for b in boxes if not b["centre_agrees"] and b["status"] != "counterexample"]
print(f"{len(odd)} boxes whose centre disagrees without a counterexample reported (a tie at the centre, or none)")
print("cex_f_changed: share of balls whose counterexample also changes f's own class (the ball crosses f's boundary)")
show_table(rows, ["copy", "radius", "acc", "agree_all", "agree_centres", "agree_box_centres", "certified",
                  "counterexample", "unknown", "cex_f_changed", "median_seconds", "seconds"],
           title=f"agree_all: on all {summary['test_images']} test images; the rest over the {summary['images']} balls "
                 "(agree_centres at the images, agree_box_centres at the centres of the clipped boxes)")"""),
        ("md", """Measured agreement at the centres beside the certified share, per copy, for both radii. The gap between the
two bars is agreement that holds at the test image but is either broken inside the ball (counterexample, hatched)
or not proven within the budget."""),
        ("code", """copies = list(dict.fromkeys(r["copy"] for r in rows))
radii = sorted({r["radius"] for r in rows})
fig, axes = plt.subplots(1, len(radii), figsize=(11, 3.8), sharey=True, squeeze=False)
x = np.arange(len(copies))
for ax, radius in zip(axes[0], radii):
    sel = {r["copy"]: r for r in rows if r["radius"] == radius}
    ax.bar(x - 0.2, [sel[c]["agree_centres"] for c in copies], 0.4, label="measured (centres)", color="C0")
    ax.bar(x + 0.2, [sel[c]["certified"] for c in copies], 0.4, label="certified (whole ball)", color="C2")
    ax.bar(x + 0.2, [sel[c]["counterexample"] for c in copies], 0.4, bottom=[sel[c]["certified"] for c in copies],
           label="counterexample in ball", color="C3", hatch="//", alpha=0.5)
    ax.set_xticks(x, copies); ax.set_title(f"radius {radius}"); ax.set_ylim(0, 1.22)
    ax.grid(True, axis="y", alpha=0.3)
axes[0][0].set_ylabel("share of boxes"); axes[0][0].legend(fontsize=7, loc="upper left", ncol=3)
plt.tight_layout()"""),
        ("md", "Time per box (seconds, log scale), by copy, radius and verdict:"),
        ("code", """fig, ax = plt.subplots(figsize=(8, 3.4))
marks = {"proved": ("o", "C2"), "counterexample": ("x", "C3"), "unknown": ("s", "C7")}
labelled = set()
for k, (c, radius) in enumerate((c, r) for c in copies for r in radii):
    for status, (m, colour) in marks.items():
        t = [b["seconds"] for b in boxes if b["copy"] == c and b["radius"] == radius and b["status"] == status]
        if t:
            ax.plot(k + np.linspace(-0.2, 0.2, len(t)), t, m, ms=3, alpha=0.6, color=colour,
                    label=None if status in labelled else status)
            labelled.add(status)
ax.set_xticks(range(len(copies) * len(radii)), [f"{c} r={r}" for c in copies for r in radii], fontsize=7, rotation=20)
ax.set_yscale("log"); ax.set_ylabel("seconds per box"); ax.grid(True, which="both", alpha=0.3); ax.legend(fontsize=7)
plt.tight_layout()"""),
    ],
    "certified_compression": [
        ("md", """# Certified compression of the digits MLP

`qb.compression.search` chooses a bit width per kernel of the bundled digits MLP 64-32-32-10 so that the
*certified* maximal logit error over L-inf balls (radius 0.02) around test images meets a budget epsilon, with
the least storage. Beside the greedy search: the same descent in the order of the per-layer attribution
(`qb.compression.attribution`: the certified error with only that layer quantized) and of a HAWQ-style
sensitivity (`qb.compression.sensitivity`: the output MSE of quantizing that layer alone), every uniform width,
fixed pipelines, and retrained formats, including certified-error-aware retraining
(`qb.compression.certified_retrain`: distillation plus a differentiable bound on |f - f_q| over training balls).
Every certified number was recomputed from scratch for its row. Produced by
`python experiments/certified_compression.py`."""),
        ("code", SETUP),
        ("code", load("certified_compression")),
        ("code", """rows = read_csv(RESULTS / "frontier.csv")
layers = read_csv(RESULTS / "attribution.csv")
retrained = read_csv(RESULTS / "retraining.csv")
searches = ("searched", "attribution-ordered", "sensitivity-ordered")
for r in rows:
    if r["candidate"] in searches:
        assert r["certified"] <= r["target"], r  # every searched answer meets its budget, re-certified
    assert r["meets"] == (r["certified"] <= r["target"]), r
targets = sorted({r["target"] for r in rows})
for t in targets:
    show_table([r for r in rows if r["target"] == t and (r["candidate"] in searches or r["meets"])],
               ["candidate", "bits", "bytes", "certified", "accuracy", "agreement", "candidates", "search_seconds"],
               title=f"epsilon = {t}: the searches and every candidate that meets it (bits: dense_0/1/2)")"""),
        ("md", """Storage against certified error for every candidate (one point each; the budgets as dashed lines, the
searched answers circled). Below a line and to the left is better."""),
        ("code", """fig, ax = plt.subplots(figsize=(8, 4.2))
seen = {}
for r in rows:
    if r["target"] != targets[0] or r["candidate"] in searches:
        continue
    kind = "uniform" if r["candidate"].startswith("uniform-") and "+" not in r["candidate"] else (
        "retrained" if "+" in r["candidate"] else "pipeline")
    colour = {"uniform": "C0", "retrained": "C2", "pipeline": "C7"}[kind]
    ax.plot(r["bytes"], r["certified"], "o", color=colour, label=None if kind in seen else kind)
    seen[kind] = True
    ax.annotate(r["candidate"], (r["bytes"], r["certified"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
for k, t in enumerate(targets):
    ax.axhline(t, ls="--", color=f"C{k + 3}", lw=0.8)
    for name, m in zip(searches, "o^s"):
        s = [r for r in rows if r["target"] == t and r["candidate"] == name]
        if s:
            ax.plot(s[0]["bytes"], s[0]["certified"], m, mfc="none", ms=11, color=f"C{k + 3}",
                    label=f"{name}" if k == 0 else None)
ax.set_yscale("log"); ax.set_xlabel("bytes"); ax.set_ylabel("certified max |f - f_q| (logits)")
ax.grid(True, which="both", alpha=0.3); ax.legend(fontsize=7)
plt.tight_layout()"""),
        ("md", """Per-layer attribution at the width each search starts from: the certified error with only that layer
quantized (its share of the sum), beside the HAWQ-style sensitivity. The two orderings need not agree: the
sensitivity is measured at the test images, the attribution over the whole balls."""),
        ("code", """show_table(layers, ["target", "layer", "bits", "attributed", "share", "sensitivity"])
fig, ax = plt.subplots(figsize=(7, 3))
first = [l for l in layers if l["target"] == layers[0]["target"]]
x = np.arange(len(first))
sens = np.array([l["sensitivity"] for l in first])
ax.bar(x - 0.2, [l["share"] for l in first], 0.4, label="attributed share (certified)")
ax.bar(x + 0.2, sens / sens.sum(), 0.4, label="sensitivity share (output MSE)")
ax.set_xticks(x, [l["layer"].split("/")[1] for l in first])
ax.set_title(f"{first[0]['bits']} bits"); ax.legend(fontsize=7); ax.grid(True, axis="y", alpha=0.3)
plt.tight_layout()"""),
        ("md", """Retraining: post-training quantization (`none`), QAT on the labels, distillation towards f, and
certified-error-aware retraining (distillation or cross-entropy plus the bound over training balls). The
certified error is over the *test* balls, which training never saw."""),
        ("code", """averaged = read_csv(RESULTS / "retraining_summary.csv")
show_table(retrained, ["format", "mode", "seed", "certified", "certified_mean", "accuracy", "agreement",
                       "search_seconds"], title="every run (search_seconds: the retraining's seconds)")
show_table(averaged, ["format", "mode", "runs", "certified_avg", "certified_min", "certified_max",
                      "certified_mean_avg", "accuracy_avg", "agreement_avg"], title="over seeds")
formats = list(dict.fromkeys(r["format"] for r in averaged))
fig, axes = plt.subplots(1, len(formats), figsize=(5 * len(formats), 3.4), squeeze=False)
for ax, fmt in zip(axes[0], formats):
    sel = [r for r in averaged if r["format"] == fmt]
    avg = np.array([r["certified_avg"] for r in sel])
    err = np.array([[a - r["certified_min"] for a, r in zip(avg, sel)], [r["certified_max"] - a for a, r in zip(avg, sel)]])
    colours = ["C7" if r["mode"] == "none" else "C2" if r["mode"].startswith("certified") else "C0" for r in sel]
    ax.bar(range(len(sel)), avg, yerr=err, capsize=3, color=colours)
    ax.plot(range(len(sel)), [r["certified_mean_avg"] for r in sel], "k_", ms=14, label="mean over the balls")
    for i, r in enumerate(sel):
        ax.annotate(f"acc {r['accuracy_avg']:.3f}", (i, r["certified_max"]), ha="center", fontsize=7, xytext=(0, 2),
                    textcoords="offset points")
    ax.set_xticks(range(len(sel)), [r["mode"] for r in sel], fontsize=8)
    ax.set_title(f"{fmt} (bars: max over the balls, avg and range over seeds)", fontsize=9)
    ax.set_ylabel("certified |f - f_q|"); ax.grid(True, axis="y", alpha=0.3); ax.legend(fontsize=7)
plt.tight_layout()"""),
    ],
}

QUANT_LIBRARIES = [
    ("md", """# Certifying models quantized by qwix and AQT

qbound takes the functions the libraries produce, as they are: it traces them, pairs their layers
with the float model's where it can (then the differential bounds apply), and certifies
`max |f(x) - f_q(x)|` over an input box. Needs the optional extras: `pip install 'qbound[qwix,aqt]'`.
Unlike the other notebooks, this one runs qbound itself (about a minute on 2 cores)."""),
    ("code", """import functools, time
import jax, jax.numpy as jnp
import flax.linen as nn
import qbound as qb


class MLP(nn.Module):
    dot_general_cls: object = None  # AQT replaces the layers' products through this

    @nn.compact
    def __call__(self, x):
        extra = {} if self.dot_general_cls is None else {"dot_general_cls": self.dot_general_cls}
        for width in (16, 16):
            x = nn.relu(nn.Dense(width, **extra)(x))
        return nn.Dense(2, **extra)(x)


model = MLP()
params = model.init(jax.random.key(3), jnp.zeros((1, 4)))
box = qb.Box(-jnp.ones(4), jnp.ones(4))
f = lambda x: model.apply(params, x[None])[0]  # one unbatched input, as qbound wants


def report(name, fq):
    start = time.perf_counter()
    merged = qb.merge(f, fq, box)
    cert = qb.certify(f, fq, box, time_budget=10, target_gap=0.1)
    print(f"{name:<28} paired={merged.paired!s:<5} bound={cert.upper:.4g}  reached={cert.lower:.4g}  "
          f"ratio={cert.upper / cert.lower:.3g}  {cert.method}  {time.perf_counter() - start:.1f} s")
    return cert"""),
    ("md", """**qwix**, post-training quantization of the weights to int8. qwix dequantizes the kernels before
the product, so f_q's layers are f's layers with other weights."""),
    ("code", """import qwix

rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]
ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
abstract = jax.eval_shape(ptq.init, jax.random.key(0), jnp.zeros((1, 4)))
qparams = qwix.quantize_params(params["params"], abstract["params"])
report("qwix int8 weights", lambda x: ptq.apply({"params": qparams}, x[None])[0])"""),
    ("md", """**qwix with static activation scales**: int8 weights *and* activations, the activation scales
calibrated once (qwix's QAT provider collects the statistics on a calibration batch, `quantize_params` turns
them into scales). f_q computes `(round(x / s_a) @ W_int) * s_a * s_w + b` in integers; qbound keeps the
rescaling beside the product and writes f's layer as `(x / s_a) @ W * s_a + b` (exactly f), so the two
pair. Scales computed from each input (`act_static_scale=False`, the default): below."""),
    ("code", """rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
calibration = jax.random.uniform(jax.random.key(5), (64, 4), minval=-1, maxval=1)
_, stats = qwix.quantize_model(model, qwix.QtProvider(rules)).apply(params, calibration, mutable=["quant_stats"])
srq = qwix.quantize_model(model, qwix.PtqProvider(rules))
abstract = jax.eval_shape(srq.init, jax.random.key(0), jnp.zeros((1, 4)))
sparams = qwix.quantize_params(params["params"], abstract["params"], stats["quant_stats"])
report("qwix static int8 (w + act)", lambda x: srq.apply({"params": sparams}, x[None])[0])"""),
    ("md", """**Dynamic activation scales**, computed from each input as the model runs: qwix's default (`max|x| / 127.5`
per tensor, or per token for a batch), qwix's asymmetric `minmax` scales with an int8 zero point, and AQT's
default int8 activations (a reciprocal, clipped before rounding). qbound recognises each pattern as one
dynamic rounding node `q(x) = s(x) (c(x) - z(x))` before f's own product, so the layers pair; the node is
bounded from each scale group's bounds (`qbound/dynamic_rounding.py`). Differential bounds only here, to
keep the notebook fast; every bound is checked against the largest error of 20,000 samples of the
library's own function."""),
    ("code", """def dynamic(name, fq, box, batched=False):
    g = (lambda x: model.apply(params, x)) if batched else f
    start = time.perf_counter()
    merged = qb.merge(g, fq, box)
    cert = qb.certify(g, fq, box, method="diff")
    xs = jax.random.uniform(jax.random.key(1), (20000, *box.shape), minval=box.lower, maxval=box.upper)
    sampled = float(jnp.max(jnp.abs(jax.vmap(g)(xs) - jax.vmap(fq)(xs))))
    assert sampled <= cert.upper
    print(f"{name:<28} paired={merged.paired!s:<5} bound={cert.upper:.4g}  sampled={sampled:.4g}  "
          f"{time.perf_counter() - start:.1f} s")


def qwix_dynamic(method, x0):
    rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8",
                                   act_calibration_method=method)]
    dq = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(dq.init, jax.random.key(0), x0)
    dparams = qwix.quantize_params(params["params"], abstract["params"])
    return lambda x: dq.apply({"params": dparams}, x)


absmax, minmax = qwix_dynamic("absmax", jnp.zeros((1, 4))), qwix_dynamic("minmax", jnp.zeros((1, 4)))
dynamic("qwix dynamic int8", lambda x: absmax(x[None])[0], box)
dynamic("qwix dynamic minmax int8", lambda x: minmax(x[None])[0], box)
tokens = qb.Box(-jnp.ones((3, 4)), jnp.ones((3, 4)))  # a batch of 3 tokens: one scale each
dynamic("qwix dynamic per-token int8", qwix_dynamic("absmax", tokens.lower), tokens, batched=True)

from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax

aqt_dynamic = MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)))
dynamic("aqt dynamic int8", lambda x: aqt_dynamic.apply(params, x[None], rngs={"params": jax.random.key(0)})[0], box)"""),
    ("md", """**AQT**, int8 weights through `AqtDotGeneral`. AQT multiplies by the weight scale *after* the
integer product, `(x @ W_int) * s_w`; qbound keeps that as one op (the same float operations, so the
bound is about the network AQT runs) beside f's `x @ W`, and the layers pair."""),
    ("code", """from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2.flax import aqt_flax

config = aqt_config.dot_general_make(lhs_bits=None, rhs_bits=8)
aqt_model = MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(config))
cert = report("aqt int8 weights", lambda x: aqt_model.apply(params, x[None], rngs={"params": jax.random.key(0)})[0])
print("witness:", cert.witness)"""),
    ("md", """The benchmark (`python benchmarks/bench_quant_libraries.py`) runs these and more (nnx, a small
CNN, int4, AQT with static activation scales) with first-call and warm times; its table, if it has been run:"""),
    ("code", """import csv, pathlib
from IPython.display import Markdown, display

for d in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]:
    path = d / "results" / "quant_libraries" / "results.csv"
    if path.is_file():
        rows = list(csv.DictReader(path.open()))
        cols = ["model", "config", "paired", "bound", "reached", "ratio", "first_s", "warm_s", "note"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        def cell(v):
            try:
                return f"{float(v):.4g}"
            except ValueError:
                return v
        for r in rows:
            lines.append("| " + " | ".join(cell(r[c]) for c in cols) + " |")
        display(Markdown("\\n".join(lines)))
        break
else:
    print("no results/quant_libraries/results.csv: run python benchmarks/bench_quant_libraries.py")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 2.5))
xs = jnp.linspace(-1, 1, 201)
line = lambda t: jnp.zeros(4).at[0].set(t)
ax.plot(xs, jax.vmap(lambda t: jnp.max(jnp.abs(f(line(t)) - aqt_model.apply(params, line(t)[None], rngs={"params": jax.random.key(0)})[0])))(xs))
ax.axhline(cert.upper, color="C3", ls="--", label="certified bound")
ax.set_xlabel("x[0] (other inputs 0)"); ax.set_ylabel("|f - f_q| (AQT int8)"); ax.legend(fontsize=7)
plt.tight_layout()"""),
]

NOTEBOOKS["quant_libraries"] = QUANT_LIBRARIES


def build(name: str, cells) -> nbformat.NotebookNode:
  nb = new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  nb.metadata["language_info"] = {"name": "python"}
  nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name}-{i}"
  return nb


def execute(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """``nb`` run headless in this folder (results/ as the full runs left it), with its outputs."""
  import nbclient

  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
  root = f"{HERE.parent}{os.sep}"
  for cell in nb.cells:  # this machine's paths left out: libraries' warnings (tqdm's), the results folder
    if cell.cell_type == "code":
      cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
      for out in cell.outputs:
        if out.get("output_type") == "stream":
          out["text"] = out["text"].replace(root, "")
  return nb


def main(argv=None) -> list[pathlib.Path]:
  """``python notebooks/build_notebooks.py [--execute] [NAME ...]``: writes the notebooks (all by
  default); with ``--execute``, with their outputs, as the docs site shows them (it renders the
  committed notebooks without running them: rebuild with ``--execute`` after new results)."""
  args = list(argv if argv is not None else sys.argv[1:])
  run = "--execute" in args
  names = [a for a in args if a != "--execute"] or list(NOTEBOOKS)
  written = []
  for name in names:
    path = HERE / f"{name}.ipynb"
    nb = build(name, NOTEBOOKS[name])
    nbformat.write(execute(nb) if run else nb, path)
    written.append(path)
    print(f"wrote {path.relative_to(HERE.parent)}" + (" (executed)" if run else ""))
  return written


if __name__ == "__main__":
  main()
