"""Differential verification benchmarks: networks against their float16 copies, beside NeuroDiff.

The problems of ReluDiff (ICSE 2020) and NeuroDiff (ASE 2020), as defined in
``../shared/bench/README.md`` (the public networks and inputs of their artifacts):

* MNIST 3x100 (784-100-100-10-10) vs its float16 copy, L-inf radius 3/255 around test images 0..9
  (clipped to [0, 1]); bound = max over the 10 outputs of ``|f_16(x) - f(x)|``;
* HAR (561-500-6) vs its float16 copy, radius 0.1 around test inputs 0..9 (clipped to [-1, 1]);
* ACAS Xu 1_1..1_9 vs their float16 copies over the property-1 box, output 0 only; NeuroDiff
  proves ``|delta_0| < 0.05`` there (with 213 input splits on 1_1).

For each network and method (interval, CROWN on the merged network, differential interval =
ReluDiff, differential symbolic = NeuroDiff-style, each through ``qbound.bounds`` on one merged
network, so every input after the first reuses the compiled code; on ACAS Xu also
``certify(method='bab', epsilon=0.05)``) it records the certified bound and the wall time per input. The first call of a method on a network
structure includes tracing and XLA compilation; ``compile_seconds`` = first call - median of the
later calls, ``per_input_seconds`` = median of the later calls (2 cores shared with other jobs,
so times are indicative). The error reached by sampling + gradient ascent
(``qbound.maximize_error``) is a lower bound. NeuroDiff's numbers are those of the bench README
(its float32 arithmetic is not sound against rounding; qbound's bounds are, see qbound.bounds.fp).

    python experiments/bench_differential.py           # full: 10 + 10 inputs, 9 ACAS nets
    python experiments/bench_differential.py --smoke   # one input per net, interval only

Skips (with a message) when the benchmark checkout is absent (``QBOUND_BENCH`` overrides its path);
ACAS 1_1 is bundled with qbound and always runs. Writes ``bench.csv``, ``summary.json``,
``bench_bounds.png`` and ``bench_times.png`` under ``results/bench_differential/``.
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np

import qbound as qb
import common

NAME = "bench_differential"

# NeuroDiff on a 2-core machine, 2 threads (bench README).
NEURODIFF = {
    "mnist": dict(bounds=[0.004422, 0.004010, 0.003584, 0.003261, 0.002380, 0.002258, 0.002588, 0.004675,
                          0.003916, 0.003862], seconds="0.12-0.19", seconds_mid=0.155),
    "har": dict(bounds=[0.002819, 0.002596, 0.002315, 0.002442, 0.002249, 0.002314, 0.002252, 0.002095,
                        0.002130, 0.002041], seconds="0.075", seconds_mid=0.075),
    # ACAS Xu: re-measured on an idle machine (the earlier 0.8-1.0 s was taken under load).
    "acas": dict(epsilon=0.05, seconds="0.23-0.26 (1_1, output 0, 213 splits)", seconds_mid=0.245),
}
ACAS_LOWER = (55947.691, -3.141592, -3.141592, 1145.0, 0.0)
ACAS_UPPER = (60760.0, 3.141592, 3.141592, 1200.0, 60.0)

# Per family: bound methods timed through qbound.bounds, then certify() methods. Since bound
# propagation compiles per step (seconds, not the quarter of an hour one whole program for ACAS Xu's
# 6 hidden layers took), ACAS Xu runs every method and branch and bound by default
# (--acas-heavy is kept as a no-op for old command lines).
FULL = dict(inputs=10, acas=tuple(range(1, 10)),
            methods={"mnist": common.BOUND_METHODS, "har": common.BOUND_METHODS, "acas": common.BOUND_METHODS},
            certify={"mnist": (), "har": (), "acas": ("bab",)}, time_budget=20.0, search=qb.Search())
ACAS_HEAVY = dict(methods=common.BOUND_METHODS, certify=("bab",))
SMOKE = dict(inputs=1, acas=(1,), methods={"mnist": ("interval",), "har": ("interval",), "acas": ("interval",)},
             certify={"mnist": (), "har": (), "acas": ()}, time_budget=2.0,
             search=qb.Search(samples=256, restarts=2, steps=10))


def bench_file(*parts):
  path = common.BENCH.joinpath(*parts)
  return path if path.is_file() else None


def acas_paths(k):
  name = f"ACASXU_run2a_1_{k}_batch_2000"
  f = bench_file("nnet", f"{name}.nnet")
  q = bench_file("nnet_16bit", f"{name}_16bit.nnet")
  if (f is None or q is None) and k == 1:  # bundled with qbound
    f, q = qb.io.bundled_path(f"{name}.nnet"), qb.io.bundled_path(f"{name}_16bit.nnet")
  return f, q


def problems(cfg):
  """``[(family, label, f_path, fq_path, [(index, box), ...], output or None)]`` and skip notes."""
  out, notes = [], []
  n = cfg["inputs"]
  families = cfg.get("families", ("mnist", "har", "acas"))
  f, q = bench_file("nnet", "mnist_relu_3_100.nnet"), bench_file("nnet_16bit", "mnist_relu_3_100_16bit.nnet")
  px = bench_file("inputs", "mnist100_pixels_uint8.npy")
  if "mnist" not in families:
    pass
  elif f and q and px:
    pixels = np.load(px)[:n].astype(np.float32)
    boxes = [(i, qb.Box(np.maximum((p - 3) / 255, 0), np.minimum((p + 3) / 255, 1))) for i, p in enumerate(pixels)]
    out.append(("mnist", "MNIST 3x100", f, q, boxes, None))
  else:
    notes.append(f"MNIST skipped: benchmark files not found under {common.BENCH}")
  f, q, csv = (bench_file("nnet", "HAR.nnet"), bench_file("nnet_16bit", "HAR_16bit.nnet"),
               bench_file("inputs", "har_test.csv"))
  if "har" not in families:
    pass
  elif f and q and csv:
    x = np.loadtxt(csv, delimiter=",", max_rows=n, ndmin=2)[:, 1:].astype(np.float32)
    boxes = [(i, qb.Box(np.maximum(xi - 0.1, -1), np.minimum(xi + 0.1, 1))) for i, xi in enumerate(x)]
    out.append(("har", "HAR 561-500-6", f, q, boxes, None))
  else:
    notes.append(f"HAR skipped: benchmark files not found under {common.BENCH}")
  box = qb.Box(np.asarray(ACAS_LOWER, np.float32), np.asarray(ACAS_UPPER, np.float32))
  for k in (cfg["acas"] if "acas" in families else ()):
    f, q = acas_paths(k)
    if f is None or q is None:
      notes.append(f"ACAS Xu 1_{k} skipped: not found under {common.BENCH}")
      continue
    out.append(("acas", f"ACAS Xu 1_{k}", f, q, [(0, box)], 0))
  return out, notes


def run(cfg, key, partial_csv=None):
  rows, notes = [], []
  todo, skip = problems(cfg)
  notes += skip
  available = common.certify_methods()
  for fam, label, f_path, q_path, boxes, output in todo:
    apply, params = qb.io.load_nnet(f_path)
    apply_q, params_q = qb.io.load_nnet(q_path)
    f = functools.partial(apply, params)
    fq = functools.partial(apply_q, params_q)
    start = time.perf_counter()
    merged = qb.merge(f, fq, boxes[0][1])
    merge_s = time.perf_counter() - start
    outputs = None if output is None else [output]
    ref = NEURODIFF[fam]
    for i, box in boxes:
      base = dict(family=fam, net=label, input=i, merge_seconds=merge_s if i == boxes[0][0] else None,
                  neurodiff=ref["bounds"][i] if "bounds" in ref and i < len(ref["bounds"]) else ref.get("epsilon"),
                  neurodiff_seconds=ref["seconds_mid"])
      target = merged if output is None else (lambda x, m=merged: m(x)[output:output + 1])
      (lower, _), s = common.timed(qb.maximize_error, target, box, key=jax.random.fold_in(key, i),
                                   search=cfg["search"])
      rows.append(dict(base, method="sampling", lower=lower, seconds=s))
      for m in cfg["methods"][fam]:
        b, s = common.timed(common.bound, m, merged, box)
        rows.append(dict(base, method=m, bound=common.max_abs(b, output), seconds=s))
      for m in cfg["certify"][fam]:
        if m not in available:
          continue
        opts = dict(search=cfg["search"], time_budget=cfg["time_budget"], outputs=outputs)
        if m == "bab" and fam == "acas":
          opts["epsilon"] = NEURODIFF["acas"]["epsilon"]
        cert = common.certify(merged, None, box, method=m, key=jax.random.fold_in(key, i), **opts)
        rows.append(dict(base, method=f"certify:{m}", bound=cert.upper, lower=cert.lower, seconds=cert.seconds,
                         proved=cert.upper < NEURODIFF["acas"]["epsilon"] if fam == "acas" else None))
    print(f"  {label}: {len(boxes)} input(s) done, {time.perf_counter() - start:.1f} s", flush=True)
    if partial_csv is not None:  # keep what is done if a later network takes too long
      common.write_csv(partial_csv, rows)
  return rows, notes


def summarise(rows):
  """Per network family and method: mean bound, ratio to NeuroDiff, compile and per-input time."""
  out = []
  keys = []
  for r in rows:
    k = (r["family"], r["method"])
    if k not in keys:
      keys.append(k)
  for fam, m in keys:
    sel = [r for r in rows if r["family"] == fam and r["method"] == m]
    # Per network: the first input pays compilation; ACAS nets share one structure, so only the
    # very first ACAS net does.
    secs = [r["seconds"] for r in sel]
    first, later = secs[0], secs[1:]
    per_input = float(np.median(later)) if later else None
    row = dict(family=fam, method=m, n=len(sel), first_call_seconds=first,
               compile_seconds=(first - per_input) if per_input is not None else None,
               per_input_seconds=per_input)
    if m == "sampling":
      row["lower_mean"] = float(np.mean([r["lower"] for r in sel]))
    else:
      bounds = [r["bound"] for r in sel]
      row["bound_mean"] = float(np.mean(bounds))
      row["bound_max"] = float(np.max(bounds))
      if fam != "acas":
        row["ratio_to_neurodiff"] = float(np.mean([r["bound"] / r["neurodiff"] for r in sel if r["neurodiff"]]))
      else:
        row["proved_0.05"] = int(sum(r["bound"] < NEURODIFF["acas"]["epsilon"] for r in sel))
    row["neurodiff_seconds"] = NEURODIFF[fam]["seconds"]
    out.append(row)
  return out


def plot(rows, path_bounds, path_times, summary):
  plt = common.pyplot()
  fams = [f for f in ("mnist", "har", "acas") if any(r["family"] == f for r in rows)]
  methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "sampling"]
  colors = dict(zip(methods, plt.cm.tab10(np.arange(len(methods)))))
  fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 4), squeeze=False)
  for ax, fam in zip(axes[0], fams):
    sel = [r for r in rows if r["family"] == fam]
    xs = sorted({(r["net"], r["input"]) for r in sel}, key=lambda t: (len(t[0]), t))
    pos = {k: i for i, k in enumerate(xs)}
    for m in methods:
      pts = [(pos[(r["net"], r["input"])], r["bound"]) for r in sel if r["method"] == m]
      if pts:
        ax.plot(*zip(*pts), "o-", ms=4, color=colors[m], label=m)
    pts = [(pos[(r["net"], r["input"])], r["lower"]) for r in sel if r["method"] == "sampling"]
    ax.plot(*zip(*pts), "*", color="tab:red", ms=8, label="reached (sampling)")
    if fam == "acas":
      ax.axhline(NEURODIFF["acas"]["epsilon"], color="k", ls="--", label="NeuroDiff proves 0.05")
      ax.set_xticks(range(len(xs)), [n.split()[-1] for n, _ in xs], fontsize=8)
      ax.set_xlabel("ACAS Xu network (property 1 box, output 0)")
    else:
      nd = [(pos[(r["net"], r["input"])], r["neurodiff"]) for r in sel if r["method"] == methods[0] and r["neurodiff"]]
      ax.plot(*zip(*nd), "k--", marker="s", ms=4, label="NeuroDiff")
      ax.set_xlabel("input index")
    ax.set_yscale("log")
    ax.set_ylabel("certified max |f_16 - f|")
    ax.set_title(sel[0]["net"] if fam != "acas" else "ACAS Xu vs float16")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path_bounds, dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(fams), figsize=(5.2 * len(fams), 3.8), squeeze=False)
  for ax, fam in zip(axes[0], fams):
    sel = [s for s in summary if s["family"] == fam and s["method"] != "sampling"]
    x = np.arange(len(sel))
    comp = [s["compile_seconds"] or 0 for s in sel]
    per = [s["per_input_seconds"] if s["per_input_seconds"] is not None else s["first_call_seconds"] for s in sel]
    ax.bar(x - 0.2, comp, 0.4, label="compile (first call - per input)", color="tab:gray")
    ax.bar(x + 0.2, per, 0.4, label="per input (median)", color="tab:blue")
    ax.axhline(NEURODIFF[fam]["seconds_mid"], color="k", ls="--", label=f"NeuroDiff {NEURODIFF[fam]['seconds']} s")
    ax.set_xticks(x, [s["method"].replace("certify:", "") for s in sel], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.set_title(fam)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path_times, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--families", nargs="+", default=["mnist", "har", "acas"], choices=["mnist", "har", "acas"])
  p.add_argument("--acas-nets", nargs="+", type=int, default=None, help="which ACAS Xu nets 1_k (default 1..9)")
  p.add_argument("--acas-heavy", action="store_true",
                 help="symbolic differential bounds and branch and bound (epsilon 0.05) on ACAS Xu even in smoke "
                      "mode (the full mode runs them anyway)")
  args = p.parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL, families=tuple(args.families), acas=tuple(args.acas_nets or ()))
  if args.acas_heavy:
    cfg["methods"] = dict(cfg["methods"], acas=ACAS_HEAVY["methods"])
    cfg["certify"] = dict(cfg["certify"], acas=ACAS_HEAVY["certify"])
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  rows, notes = run(cfg, jax.random.key(args.seed), out / "bench.partial.csv")
  for n in notes:
    print("note:", n)
  if not rows:
    print("nothing to run: no benchmark networks found.")
    summary = {"experiment": NAME, "smoke": args.smoke, "notes": notes, "rows": [], "summary": []}
    common.write_json(out / "summary.json", summary)
    return summary
  for r in rows:
    if r.get("bound") is not None and r.get("lower") is not None and r["lower"] > r["bound"]:
      raise AssertionError(f"reached error above a proven bound: {r}")
  summ = summarise(rows)
  print(common.table(rows, ["net", "input", "method", "bound", "lower", "neurodiff", "seconds"],
                     title="per input: certified bound on max |f_16 - f| (ACAS: output 0) and wall time"))
  print(common.table(summ, ["family", "method", "n", "bound_mean", "ratio_to_neurodiff", "proved_0.05",
                            "lower_mean", "compile_seconds", "per_input_seconds", "neurodiff_seconds"],
                     title="summary (compile = first call - median per-input call)"))
  common.write_csv(out / "bench.csv", rows)
  (out / "bench.partial.csv").unlink(missing_ok=True)
  plot(rows, out / "bench_bounds.png", out / "bench_times.png", summ)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "bench": str(common.BENCH),
             "neurodiff": NEURODIFF, "notes": notes, "summary": summ, "rows": rows,
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/bench.csv, summary.json, bench_bounds.png, bench_times.png ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
