"""Certified quantization error of random ReLU networks against the bit width.

After Cooke, Mo and Xiang, "Guaranteed quantization error computation for neural network model
compression" (ICCPS / arXiv 2023): fully connected ReLU networks with N(0, 1) weights and biases,
2-3 inputs over the box [-1, 1]^n, and uniformly quantized copies (symmetric, one scale per
tensor, weights and biases) at 2..8 bits. For every bit width it writes, per ``qbound.certify``
method (interval; CROWN on the merged network; differential interval = ReluDiff; differential
symbolic = NeuroDiff-style; optimised slopes ``alpha``; branch and bound ``bab``; ``auto``, each
where this checkout has it, with a time budget), the proven upper bound of
``max_x |f(x) - f_q(x)|_inf``, the error reached (sampling + gradient ascent, and for bab/auto
the best piece centre), and the exact value from the MILP (``qbound.exact.milp``, HiGHS) within a
time limit. It also plots, for one 2-output net, the
reachable output sets of f and f_q (sampled points and the certified output boxes) and the error
set ``{f(x) - f_q(x)}`` with the certified difference boxes.

    python experiments/random_nets.py            # full: 2 nets x 7 bit widths, a few minutes
    python experiments/random_nets.py --smoke    # one small net, 3 bit widths, seconds

Writes ``errors.csv`` (one row per net, bit width and method), ``summary.json``,
``error_vs_bits.png`` and ``reachable_sets.png`` under ``results/random_nets/``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
import common

NAME = "random_nets"

# Methods in the order of the plot; those this checkout's certify() does not know are skipped.
METHODS = ("interval", "crown", "diff-interval", "diff", "alpha", "bab", "auto")
FULL = dict(nets=[dict(inputs=2, hidden=(10, 10, 10), outputs=2), dict(inputs=3, hidden=(20, 20), outputs=2)],
            bits=(2, 3, 4, 5, 6, 7, 8), methods=METHODS, time_budget=3.0, milp_time=15.0, samples=20000,
            plot_bits=4, reach_bab_budget=3.0)
SMOKE = dict(nets=[dict(inputs=2, hidden=(8, 8), outputs=2)], bits=(2, 4, 8), methods=common.BOUND_METHODS,
             time_budget=1.0, milp_time=2.0, samples=2000, plot_bits=4, reach_bab_budget=None,
             search=qb.Search(samples=512, restarts=4, steps=30))


def load_milp():
  """``qbound.exact.milp`` if it imports, else ``(None, reason)``."""
  try:
    from qbound.exact import milp
    return milp, None
  except Exception as exc:  # being written by another engineer; skip the column if absent
    return None, f"qbound.exact.milp unavailable ({type(exc).__name__}: {exc})"


def net_label(spec) -> str:
  return f"{spec['inputs']}-{'-'.join(map(str, spec['hidden']))}-{spec['outputs']}"


def run_net(spec, key, cfg, milp, rows):
  k_init, k_cert = jax.random.split(key)
  apply, variables = common.random_mlp(k_init, spec["inputs"], spec["hidden"], spec["outputs"], std=1.0)
  f = functools.partial(apply, variables)
  box = qb.Box(-jnp.ones(spec["inputs"]), jnp.ones(spec["inputs"]))
  label = net_label(spec)
  available = common.certify_methods()
  methods = [m for m in cfg["methods"] if m in available]
  for bits in cfg["bits"]:
    fq = functools.partial(apply, qb.quantize.uniform(variables, bits=bits))
    merged = qb.merge(f, fq, box)
    base = dict(net=label, bits=bits)
    key_bits = jax.random.fold_in(k_cert, bits)
    for method in methods:
      # The same key for every method: the sampling lower bound is shared, the upper bounds differ.
      cert = common.certify(merged, None, box, method=method, key=key_bits, search=cfg.get("search"),
                            time_budget=cfg["time_budget"])
      rows.append(dict(base, method=method, upper=cert.upper, lower=cert.lower, seconds=cert.seconds,
                       best=cert.method))
    if milp is not None and not cfg.get("milp_error"):
      try:
        res = milp(merged, box=box, time_limit=cfg["milp_time"])
      except Exception as exc:  # the exact module is still being finished: note it, keep going
        cfg["milp_error"] = f"qbound.exact.milp failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        print(f"note: {cfg['milp_error']}; the MILP column is skipped.")
        continue
      rows.append(dict(base, method="exact-milp", upper=res.upper, lower=res.value, seconds=res.seconds,
                       optimal=res.optimal, binaries=res.binaries))
  return apply, variables


def plot_errors(rows, nets, path, milp_note):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(nets), figsize=(5.2 * len(nets), 3.8), squeeze=False)
  style = {"interval": ("tab:gray", "s--"), "crown": ("tab:blue", "^-"), "diff-interval": ("tab:orange", "v--"),
           "diff": ("tab:green", "o-"), "alpha": ("tab:cyan", "<-"), "bab": ("tab:brown", ">-"),
           "auto": ("black", "x:")}
  for ax, label in zip(axes[0], nets):
    sel = [r for r in rows if r["net"] == label]
    for m, (color, fmt) in style.items():
      pts = [(r["bits"], r["upper"]) for r in sel if r["method"] == m]
      if pts:
        ax.plot(*zip(*pts), fmt, color=color, label=f"{m} (upper)", ms=5)
    bits = sorted({r["bits"] for r in sel})
    best = [max(r["lower"] for r in sel if r["bits"] == b and r.get("lower") is not None) for b in bits]
    ax.plot(bits, best, "*", color="tab:red", ms=9, label="largest error reached (lower)")
    pts = [(r["bits"], r["lower"], r["upper"], r["optimal"]) for r in sel if r["method"] == "exact-milp"]
    if pts:
      b, lo, up, opt = zip(*pts)
      ax.errorbar(b, lo, yerr=[np.zeros(len(lo)), np.subtract(up, lo)], fmt="D", mfc="none", color="tab:purple",
                  label="MILP (exact; bar to its bound)", ms=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits (uniform, symmetric, per tensor)")
    ax.set_ylabel("max |f(x) - f_q(x)|_inf over [-1, 1]^n")
    ax.set_title(f"random ReLU net {label}, N(0,1) weights")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=7)
  if milp_note:
    fig.text(0.01, 0.01, milp_note, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def reachable_sets(apply, variables, spec, bits, samples, key, path, budget):
  """Sampled outputs of f and f_q with their certified boxes; the error set with the diff boxes."""
  f = functools.partial(apply, variables)
  fq = functools.partial(apply, qb.quantize.uniform(variables, bits=bits))
  box = qb.Box(-jnp.ones(spec["inputs"]), jnp.ones(spec["inputs"]))
  xs = qb.box.sample_uniform(key, box, samples)
  ys, yqs = jax.vmap(f)(xs), jax.vmap(fq)(xs)
  ds = np.asarray(ys - yqs)
  merged = qb.merge(f, fq, box)
  boxes = {"f": {m: getattr(qb.bounds, m)(f, box) for m in ("interval", "crown")},
           "fq": {m: getattr(qb.bounds, m)(fq, box) for m in ("interval", "crown")},
           "diff": {m: common.bound(m, merged, box) for m in common.BOUND_METHODS}}
  if budget and "bab" in common.certify_methods():  # input splitting: per-output bounds near the sampled set
    cert = common.certify(merged, None, box, method="bab", key=key, time_budget=budget)
    boxes["diff"]["bab"] = qb.Box(cert.diff_lower, cert.diff_upper)

  plt = common.pyplot()
  from matplotlib.patches import Rectangle

  def rect(ax, b, color, ls, label):
    lo, hi = np.asarray(b.lower), np.asarray(b.upper)
    ax.add_patch(Rectangle(lo, *(hi - lo), fill=False, ec=color, ls=ls, lw=1.4, label=label))

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
  ax1.scatter(*np.asarray(ys).T, s=1, alpha=0.3, color="tab:blue", label="f(x), sampled")
  ax1.scatter(*np.asarray(yqs).T, s=1, alpha=0.3, color="tab:orange", label=f"f_q(x), {bits}-bit, sampled")
  rect(ax1, boxes["f"]["crown"], "tab:blue", "-", "f: CROWN box")
  rect(ax1, boxes["fq"]["crown"], "tab:orange", "-", "f_q: CROWN box")
  rect(ax1, boxes["f"]["interval"], "tab:blue", ":", "f: interval box")
  rect(ax1, boxes["fq"]["interval"], "tab:orange", ":", "f_q: interval box")
  ax1.autoscale_view()
  ax1.set_xlabel("output 0")
  ax1.set_ylabel("output 1")
  ax1.set_title(f"reachable sets over [-1, 1]^{spec['inputs']} ({net_label(spec)})")
  ax1.legend(fontsize=7, markerscale=6)

  ax2.scatter(*ds.T, s=1, alpha=0.3, color="tab:red", label="f(x) - f_q(x), sampled")
  colors = {"interval": ("tab:gray", ":"), "crown": ("tab:blue", "--"), "diff-interval": ("tab:orange", "-."),
            "diff": ("tab:green", "-"), "bab": ("tab:brown", "-")}
  for m, (c, ls) in colors.items():
    if m not in boxes["diff"]:
      continue
    rect(ax2, boxes["diff"][m], c, ls, f"{m} box (max |.| {common.max_abs(boxes['diff'][m]):.3g})")
  lo, hi = np.asarray(boxes["diff"]["diff"].lower), np.asarray(boxes["diff"]["diff"].upper)
  pad = 0.6 * (hi - lo)
  ax2.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
  ax2.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
  ax2.set_xlabel("error on output 0")
  ax2.set_ylabel("error on output 1")
  ax2.set_title("error set and certified difference boxes (zoomed to diff)")
  ax2.legend(fontsize=7, markerscale=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  sampled = {"f_min": np.asarray(ys).min(0), "f_max": np.asarray(ys).max(0), "fq_min": np.asarray(yqs).min(0),
             "fq_max": np.asarray(yqs).max(0), "diff_min": ds.min(0), "diff_max": ds.max(0)}
  certified = {f"{who}_{m}": [np.asarray(b.lower), np.asarray(b.upper)]
               for who, d in boxes.items() for m, b in d.items()}
  # A sampled point outside a certified box would be a soundness bug.
  for who, pts in (("f", np.asarray(ys)), ("fq", np.asarray(yqs)), ("diff", ds)):
    for m, b in boxes[who].items():
      assert np.all(pts >= np.asarray(b.lower) - 1e-4) and np.all(pts <= np.asarray(b.upper) + 1e-4), (who, m)
  return {"bits": bits, "samples": samples, "sampled": sampled, "certified": certified}


def main(argv=None):
  args = common.parser(NAME, __doc__).parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL)
  out = common.out_dir(NAME, args)
  milp, milp_note = load_milp()
  if milp_note:
    print(f"note: {milp_note}; the MILP column is skipped.")
  start = time.perf_counter()
  key = jax.random.key(args.seed)
  rows, nets = [], []
  for i, spec in enumerate(cfg["nets"]):
    apply, variables = run_net(spec, jax.random.fold_in(key, i), cfg, milp, rows)
    nets.append(net_label(spec))
    if i == 0:
      first = (apply, variables, spec)
  common.check_certificates(rows)
  milp_note = milp_note or cfg.pop("milp_error", None)
  if milp_note:
    rows = [r for r in rows if r["method"] != "exact-milp"]

  cols = ["net", "bits", "method", "upper", "lower", "seconds"]
  print(common.table(rows, cols + ([] if milp_note else ["optimal"]),
                     title="certified max |f - f_q|_inf over [-1,1]^n (upper: proven; lower: reached)"))
  common.write_csv(out / "errors.csv", rows)
  plot_errors(rows, nets, out / "error_vs_bits.png", milp_note)
  reach = reachable_sets(*first, cfg["plot_bits"], cfg["samples"], jax.random.fold_in(key, 1000),
                         out / "reachable_sets.png", cfg["reach_bab_budget"])
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg,
             "milp": milp_note or "qbound.exact.milp", "reachable": reach, "rows": rows,
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/errors.csv, summary.json, error_vs_bits.png, reachable_sets.png "
        f"({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
