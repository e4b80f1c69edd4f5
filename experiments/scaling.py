"""How the bound methods scale: time and memory against width and depth, and sampling throughput.

Random ReLU MLPs 16 -> [w] * d -> 10 (Flax default initialisation, ``jax.random.key``) against
their 8-bit copies (uniform, symmetric, per tensor), over an L-inf ball of radius 0.1 around a
random input. For each method (interval, CROWN on the merged network, differential symbolic
``diff``; all via ``qbound.bounds``), against the width w (depth 2) and the depth d (width 64):

* ``first_seconds``: the first call (tracing + XLA compilation + run); ``seconds``: the fastest of
  three later calls; ``compile_seconds`` = first - seconds;
* memory: XLA's own accounting of the bound compiled as one program (``memory_analysis()``:
  temporary buffers, and arguments = the weights) where the JAX version provides it, left empty
  once that compilation is predicted to pass ``--cap`` (it grows far faster with depth than the
  per-step compilation the bounds run with), and the process's peak RSS (which only grows);
* growth exponents: slopes of log(time) and log(memory) against log(width) / log(depth) by
  ``numpy.polyfit`` over the largest sizes measured.

A size is skipped when the previous one predicts more than ``--cap`` seconds (cubic growth for
CROWN and diff, quadratic for interval). Sampling throughput: forward passes per second of
``jax.jit(jax.vmap(f))`` on a batch (f alone, and the merged f - f_q that the lower-bound search
evaluates), as achieved FLOP/s against the measured float32 matmul rate of this machine.

    python experiments/scaling.py            # full: widths 64..4096, depths 2..12 (minutes)
    python experiments/scaling.py --smoke    # tiny sizes, seconds

Writes ``width.csv``, ``depth.csv``, ``throughput.csv``, ``summary.json`` and ``scaling.png``
under ``results/scaling/``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
import common

NAME = "scaling"
METHODS = ("interval", "crown", "diff")
# Exponents for predicting the next size's (run, compile) time from the last one, to skip sizes
# beyond the cap: run time grows with the width like w^2 (interval) or w^3 (CROWN, diff: one
# backward pass per neuron pair); compilation hardly depends on the width but grows with the
# number of layers, steeply for diff (measured: about depth^3).
GROWTH = {"width": {"interval": (2.0, 0.5), "crown": (3.0, 0.5), "diff": (3.0, 0.5)},
          "depth": {"interval": (1.0, 1.5), "crown": (2.0, 2.0), "diff": (2.0, 3.5)}}

FULL = dict(methods=METHODS, widths=(64, 128, 256, 512, 1024, 2048, 4096), depth_width=64,
            depths=(2, 3, 4, 6, 8, 10, 12), batch=4096, matmul_n=2048, cap=150.0, tail=4)
# Smoke: no diff (its compilation alone takes tens of seconds, see README_SECTION.md).
SMOKE = dict(methods=("interval", "crown"), widths=(8, 16, 32), depth_width=8, depths=(1, 2), batch=256,
             matmul_n=256, cap=10.0, tail=3)
INPUTS, OUTPUTS, RADIUS = 16, 10, 0.1


def net(key, hidden):
  k_init, k_x = jax.random.split(key)
  apply, variables = common.random_mlp(k_init, INPUTS, hidden, OUTPUTS, std=0.0)
  f = functools.partial(apply, variables)
  fq = functools.partial(apply, qb.quantize.uniform(variables, bits=8))
  box = qb.linf_ball(jax.random.normal(k_x, (INPUTS,)), RADIUS)
  return f, fq, box


def xla_memory(method, merged, box):
  """``(temp_bytes, argument_bytes)`` of the compiled bound computation, or ``(None, None)``."""
  try:
    # The bound functions run as loops of per-node jitted steps; jitting the whole loop gives XLA's
    # estimate for the computation as one program.
    if method == "interval":
      lowered = jax.jit(qb.bounds.interval_bounds).lower(merged.graph, box)
    elif method == "crown":
      lowered = jax.jit(qb.bounds.crown_bounds).lower(merged.graph, box)
    else:
      lowered = jax.jit(qb.bounds.diff_bounds).lower(merged.f_graph, merged.fq_graph, box)
    m = lowered.compile().memory_analysis()
    return int(m.temp_size_in_bytes), int(m.argument_size_in_bytes)
  except Exception:  # internals of this JAX / qbound version; the column is then empty
    return None, None


def measure(method, merged, box, whole_program: bool = True):
  """Times of the bound; with ``whole_program``, XLA's memory estimate for it compiled as one program
  (seconds to minutes of compilation on deep nets, so the sweep skips it past the cap)."""
  _, first = common.timed(common.bound, method, merged, box)
  steady = min(common.timed(common.bound, method, merged, box)[1] for _ in range(3))
  (temp, args), memory_seconds = common.timed(xla_memory, method, merged, box) if whole_program else ((None, None), None)
  return dict(first_seconds=first, seconds=steady, compile_seconds=max(first - steady, 0.0),
              xla_temp_mib=None if temp is None else temp / 2**20, xla_args_mib=None if args is None else args / 2**20,
              xla_memory_seconds=memory_seconds, peak_rss_mib=common.peak_rss_mib())


def sweep(kind, sizes, cfg, key):
  rows, last, skipped, whole = [], {}, {}, {}
  for size in sizes:
    hidden = (size, size) if kind == "width" else (cfg["depth_width"],) * size
    f, fq, box = net(jax.random.fold_in(key, size), hidden)
    merged = qb.merge(f, fq, box)
    for m in cfg["methods"]:
      row = dict(sweep=kind, width=hidden[0], depth=len(hidden), method=m)
      if m in skipped:
        rows.append(dict(row, skipped=skipped[m]))
        continue
      if m in last:
        prev_size, prev_run, prev_compile = last[m]
        g_run, g_compile = GROWTH[kind][m]
        ratio = size / prev_size
        predicted = prev_run * ratio**g_run + prev_compile * ratio**g_compile
        if predicted > cfg["cap"]:
          skipped[m] = f"predicted {predicted:.0f} s > cap {cfg['cap']:.0f} s"
          rows.append(dict(row, skipped=skipped[m]))
          continue
      # XLA's memory estimate compiles the bound as one program, which grows much faster with depth
      # than the per-step compilation the bounds use (diff: about depth^3.5).
      whole_program = m not in whole or whole[m] is not None  # None: an earlier size was already past the cap
      if whole.get(m) is not None:
        prev_size, prev_seconds = whole[m]
        whole_program = prev_seconds * (size / prev_size) ** GROWTH[kind][m][1] <= cfg["cap"]
      row.update(measure(m, merged, box, whole_program))
      whole[m] = (size, row["xla_memory_seconds"]) if whole_program else None
      last[m] = (size, row["seconds"], row["compile_seconds"])
      rows.append(row)
      print(f"  {kind} {size:>5} {m:<9} first {row['first_seconds']:8.3f} s  steady {row['seconds']:8.4f} s  "
            f"xla temp {row['xla_temp_mib'] if row['xla_temp_mib'] is not None else float('nan'):8.1f} MiB", flush=True)
  return rows


def exponents(rows, kind, cfg):
  out = {}
  for m in cfg["methods"]:
    sel = [r for r in rows if r["method"] == m and r.get("seconds") is not None]
    xs = [r[kind] for r in sel]
    # A size compiled earlier (depth 2 = the width sweep's width-64 net) shows no compile time.
    comp = [(r[kind], r["compile_seconds"]) for r in sel if r["compile_seconds"] > 0.05]
    out[m] = {"time": common.loglog_slope(xs, [r["seconds"] for r in sel], tail=cfg["tail"]),
              "compile": common.loglog_slope([c[0] for c in comp], [c[1] for c in comp], tail=cfg["tail"]),
              "xla_temp_memory": common.loglog_slope(xs, [r["xla_temp_mib"] or np.nan for r in sel], tail=cfg["tail"]),
              "points": len(sel)}
  return out


def matmul_rate(n, key) -> float:
  """Measured float32 matmul FLOP/s (2 n^3 per product, fastest of 5)."""
  a = jax.random.normal(key, (n, n), jnp.float32)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
  mm = jax.jit(jnp.dot)
  common.block(mm(a, b))
  best = min(common.timed(mm, a, b)[1] for _ in range(5))
  return 2 * n**3 / best


def throughput(cfg, key):
  rows = []
  for w in cfg["widths"]:
    f, fq, box = net(jax.random.fold_in(key, w), (w, w))
    merged = qb.merge(f, fq, box)
    xs = qb.box.sample_uniform(jax.random.fold_in(key, 7), box, cfg["batch"])
    flops_f = 2 * (INPUTS * w + w * w + w * OUTPUTS)
    for label, fn, flops in (("f", f, flops_f), ("f - f_q (merged)", merged, 2 * flops_f + OUTPUTS)):
      run = jax.jit(jax.vmap(fn))
      common.block(run(xs))
      best = min(common.timed(run, xs)[1] for _ in range(5))
      rows.append(dict(width=w, network=label, batch=cfg["batch"], passes_per_second=cfg["batch"] / best,
                       flops_per_pass=flops, gflops=cfg["batch"] * flops / best / 1e9))
  return rows


def plot(width_rows, depth_rows, tp_rows, rate, exps, path):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  colors = {"interval": "tab:gray", "crown": "tab:blue", "diff": "tab:green"}
  for ax, rows, kind in ((axes[0], width_rows, "width"), (axes[2], depth_rows, "depth")):
    for m, c in colors.items():
      sel = [r for r in rows if r["method"] == m and r.get("seconds") is not None]
      if not sel:
        continue
      xs = [r[kind] for r in sel]
      ax.plot(xs, [r["seconds"] for r in sel], "o-", color=c,
              label=f"{m} run (slope {exps[kind][m]['time']:.2f})")
      comp = [(r[kind], r["compile_seconds"]) for r in sel if r["compile_seconds"] > 0.05]  # not cached
      if comp:
        ax.plot(*zip(*comp), "x--", color=c, alpha=0.6, label=f"{m} compile (slope {exps[kind][m]['compile']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(kind)
    ax.set_ylabel("seconds")
    ax.set_title(f"bound time vs {kind}" + (" (depth 2)" if kind == "width" else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
  ax = axes[1]
  for m, c in colors.items():
    sel = [r for r in width_rows if r["method"] == m and r.get("xla_temp_mib") is not None]
    if sel:
      ax.plot([r["width"] for r in sel], [r["xla_temp_mib"] for r in sel], "o-", color=c,
              label=f"{m} XLA temp (slope {exps['width'][m]['xla_temp_memory']:.2f})")
  sel = [r for r in width_rows if r["method"] == "interval" and r.get("xla_args_mib") is not None]
  if sel:
    ax.plot([r["width"] for r in sel], [r["xla_args_mib"] for r in sel], "k:", label="weights (f and f_q)")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("width")
  ax.set_ylabel("MiB")
  ax.set_title("memory of the compiled bound vs width")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=6)
  ax = axes[3]
  for label, c in (("f", "tab:purple"), ("f - f_q (merged)", "tab:orange")):
    sel = [r for r in tp_rows if r["network"] == label]
    ax.plot([r["width"] for r in sel], [r["gflops"] for r in sel], "o-", color=c, label=f"jit(vmap({label}))")
  ax.axhline(rate / 1e9, color="k", ls="--", label=f"matmul {rate / 1e9:.0f} GFLOP/s")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("width")
  ax.set_ylabel("GFLOP/s")
  ax.set_title("sampling throughput")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def replot(out):
  """Fits and figure again from width.csv, depth.csv, throughput.csv and summary.json in ``out``."""
  import csv
  import json

  def load(name):
    with open(out / name, newline="") as fh:
      rows = list(csv.DictReader(fh))
    for r in rows:
      for k, v in r.items():
        if k not in ("sweep", "method", "network", "skipped"):
          r[k] = float(v) if v not in ("", None) else None
        elif v == "":
          r[k] = None
    return rows

  summary = json.loads((out / "summary.json").read_text())
  cfg = summary["config"]
  width_rows, depth_rows, tp_rows = load("width.csv"), load("depth.csv"), load("throughput.csv")
  exps = {"width": exponents(width_rows, "width", cfg), "depth": exponents(depth_rows, "depth", cfg)}
  summary["exponents"] = exps
  common.write_json(out / "summary.json", summary)
  plot(width_rows, depth_rows, tp_rows, summary["matmul_gflops"] * 1e9, exps, out / "scaling.png")
  exp_rows = [dict(sweep=k, method=m, **v) for k, d in exps.items() for m, v in d.items()]
  print(common.table(exp_rows, ["sweep", "method", "time", "compile", "xla_temp_memory", "points"],
                     title="growth exponents (log-log slopes)"))
  return summary


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--cap", type=float, default=None, help="skip sizes predicted to take longer (seconds)")
  p.add_argument("--replot", action="store_true",
                 help="only recompute the fits and the figure from the CSV files of an earlier run")
  args = p.parse_args(argv)
  if args.replot:
    return replot(common.out_dir(NAME, args))
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL, cap=args.cap)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  key = jax.random.key(args.seed)
  width_rows = sweep("width", cfg["widths"], cfg, jax.random.fold_in(key, 1))
  depth_rows = sweep("depth", cfg["depths"], cfg, jax.random.fold_in(key, 2))
  exps = {"width": exponents(width_rows, "width", cfg), "depth": exponents(depth_rows, "depth", cfg)}
  rate = matmul_rate(cfg["matmul_n"], jax.random.fold_in(key, 3))
  tp_rows = throughput(cfg, jax.random.fold_in(key, 4))
  for r in tp_rows:
    r["fraction_of_matmul"] = r["gflops"] * 1e9 / rate

  cols = ["method", "width", "depth", "first_seconds", "seconds", "compile_seconds", "xla_temp_mib", "skipped"]
  print(common.table(width_rows, cols, title="bound time and memory vs width (depth 2)"))
  print(common.table(depth_rows, cols, title=f"bound time and memory vs depth (width {cfg['depth_width']})"))
  exp_rows = [dict(sweep=k, method=m, **v) for k, d in exps.items() for m, v in d.items()]
  print(common.table(exp_rows, ["sweep", "method", "time", "compile", "xla_temp_memory", "points"],
                     title=f"growth exponents (log-log slope over the last {cfg['tail']} sizes measured)"))
  print(common.table(tp_rows, ["network", "width", "passes_per_second", "gflops", "fraction_of_matmul"],
                     title=f"sampling throughput, batch {cfg['batch']}; matmul {rate / 1e9:.1f} GFLOP/s "
                           f"(n={cfg['matmul_n']})"))
  common.write_csv(out / "width.csv", width_rows)
  common.write_csv(out / "depth.csv", depth_rows)
  common.write_csv(out / "throughput.csv", tp_rows)
  plot(width_rows, depth_rows, tp_rows, rate, exps, out / "scaling.png")
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "exponents": exps,
             "matmul_gflops": rate / 1e9, "width": width_rows, "depth": depth_rows, "throughput": tp_rows,
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/width.csv, depth.csv, throughput.csv, summary.json, scaling.png ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
