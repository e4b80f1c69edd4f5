"""Activation quantization on the digits MLP: DQA against direct quantization at 3, 4 and 5 bits.

Direct: the outputs of the hidden Dense layers (the pre-activations) fake-quantized to b bits on
a grid calibrated from their min-max range on training data (Jacob et al., CVPR 2018;
``qbound.quantize.activations.quantize_activations``). DQA (Hu, Henderson and Cano 2024, "DQA:
An Efficient Method for Deep Quantization of Deep Neural Network Activations";
``qbound.quantize.activations.dqa``): the most important quarter of the channels of each layer
get m = 2 extra bits whose shift errors are Huffman coded, at a small memory overhead; channels
ranked by mean |activation| (and, in the full mode, also by the output error each causes alone).
Weights stay float32, so f_q differs from f only by the activation grids.

For each bit width and scheme: test accuracy (450 held-out digits), activation memory per input
(b-bit codes plus DQA's coded shift errors), and the certified maximal logit error
``max |f(x) - f_q(x)|_inf`` (``qbound.certify``; f_q has rounding steps, so it is not paired
with f and differential bounds do not apply: CROWN on the merged network) over L-inf balls
(radius 0.02) around a few test images.

    python experiments/activation_quant.py           # full, a few minutes
    python experiments/activation_quant.py --smoke   # seconds

Writes ``activation_quant.csv``, ``summary.json`` and ``activation_quant.png`` under
``results/activation_quant/``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.quantize import activations as aq
import common

NAME = "activation_quant"
HIDDEN = (32, 32)
LAYERS = ["Dense_0", "Dense_1"]  # the hidden pre-activations; the logits stay float

FULL = dict(bits=(3, 4, 5), extra_bits=2, important_fraction=0.25, importance=("mean_abs", "sensitivity"),
            epochs=60, calib=256, images=5, radius=0.02, method="crown", time_budget=5.0)
SMOKE = dict(bits=(3, 5), extra_bits=2, important_fraction=0.25, importance=("mean_abs",), epochs=5, calib=64,
             images=1, radius=0.02, method="interval", search=qb.Search(samples=256, restarts=2, steps=10))


def evaluate(scheme, bits, fq_apply, variables, f, boxes, test, key, cfg, memory_bits, **extra):
  fq = functools.partial(fq_apply, variables)
  certs = common.certify_boxes(f, fq, boxes, key, method=cfg["method"], search=cfg.get("search"),
                               time_budget=cfg.get("time_budget"))
  return dict(scheme=scheme, bits=bits, **extra, acc=common.accuracy(fq_apply, variables, *test),
              memory_bits=memory_bits, upper=float(np.mean([c.upper for c in certs])),
              upper_max=float(np.max([c.upper for c in certs])), lower=float(np.mean([c.lower for c in certs])),
              lower_max=float(np.max([c.lower for c in certs])), best_method=certs[0].method,
              certify_seconds=float(np.mean([c.seconds for c in certs])))


def plot(rows, float_acc, path):
  plt = common.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  schemes = list(dict.fromkeys(r["scheme"] for r in rows))
  colors = dict(zip(schemes, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
  for s in schemes:
    sel = sorted((r for r in rows if r["scheme"] == s), key=lambda r: r["bits"])
    b = [r["bits"] for r in sel]
    axes[0].plot(b, [r["acc"] for r in sel], "o-", color=colors[s], label=s)
    axes[1].plot(b, [r["upper"] for r in sel], "o-", color=colors[s], label=f"{s} (upper)")
    axes[1].plot(b, [r["lower"] for r in sel], "x--", color=colors[s], alpha=0.6)
    axes[2].plot([r["memory_bits"] for r in sel], [r["upper"] for r in sel], "o-", color=colors[s], label=s)
  axes[0].axhline(float_acc, color="k", ls=":", label="float32")
  axes[0].set_ylabel("test accuracy")
  axes[1].set_ylabel("max logit error (o certified, x reached)")
  axes[1].set_yscale("log")
  axes[2].set_xlabel("activation memory per input (bits)")
  axes[2].set_ylabel("certified max logit error")
  axes[2].set_yscale("log")
  for ax in axes[:2]:
    ax.set_xlabel("activation bits b")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("digits MLP 64-32-32-10: hidden pre-activations quantized (weights float32)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--method", default=None, help="qbound.certify method (default: crown full, interval smoke)")
  args = p.parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL, method=args.method)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  k_model, k_cert = jax.random.split(jax.random.key(args.seed))
  x_train, y_train, x_test, y_test = common.digits()
  apply, variables = common.train_mlp(k_model, HIDDEN, x_train, y_train, epochs=cfg["epochs"])
  f = functools.partial(apply, variables)
  float_acc = common.accuracy(apply, variables, x_test, y_test)
  calib = jnp.asarray(x_train[: cfg["calib"]])
  ranges = aq.calibrate(apply, variables, calib, layers=LAYERS)
  boxes = [common.pixel_box(x, cfg["radius"]) for x in x_test[: cfg["images"]]]
  test = (x_test, y_test)
  values = int(sum(HIDDEN))  # activation values per input at the quantized points

  rows = []
  for b in cfg["bits"]:
    fq = aq.quantize_activations(apply, ranges, b, layers=LAYERS)
    rows.append(evaluate("direct", b, fq, variables, f, boxes, test, k_cert, cfg, b * values))
    for imp in cfg["importance"]:
      fq, report = aq.dqa(apply, variables, calib, b, cfg["extra_bits"], cfg["important_fraction"], layers=LAYERS,
                          importance=imp)
      rows.append(evaluate(f"dqa ({imp})", b, fq, variables, f, boxes, test, k_cert, cfg,
                           report.activation_bits + report.extra_bits_per_input, overhead=report.overhead))
    fq = aq.quantize_activations(apply, ranges, b + cfg["extra_bits"], layers=LAYERS)
    rows.append(evaluate(f"direct b+{cfg['extra_bits']}", b, fq, variables, f, boxes, test, k_cert, cfg,
                         (b + cfg["extra_bits"]) * values))
  common.check_certificates(rows)
  print(common.table(rows, ["scheme", "bits", "acc", "memory_bits", "overhead", "upper", "lower", "best_method"],
                     title=f"activation quantization, float accuracy {float_acc:.4f}; certified over "
                           f"{cfg['images']} boxes (radius {cfg['radius']}, method {cfg['method']})"))
  common.write_csv(out / "activation_quant.csv", rows)
  plot(rows, float_acc, out / "activation_quant.png")
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "float_acc": float_acc,
             "layers": LAYERS, "rows": rows, "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/activation_quant.csv, summary.json, activation_quant.png ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
