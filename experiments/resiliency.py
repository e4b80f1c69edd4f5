"""Resiliency of digits classifiers of growing size under ternary and 2/3/4/8-bit weights.

After Sung, Shin and Hwang, "Resiliency of Deep Neural Networks under Quantization" (arXiv
1511.06488, 2016): wider networks lose less accuracy when their weights are quantized, and
retraining with the quantized weights in the forward pass recovers most of the rest. Here: MLPs
64 -> w -> w -> 10 (ReLU) on scikit-learn's 8x8 digits for growing w, their kernels quantized
ternary (TWN, Li & Liu 2016) and uniformly at 2, 3, 4 and 8 bits (symmetric, one scale per
tensor; biases stay float32), directly and, when ``qbound.quantize`` has quantization-aware
retraining (``qat.retrain``), after retraining through a straight-through quantized forward pass.
For every network it writes the test accuracy, the storage against float32
(``qbound.quantize.size_report``, Huffman-coded indices), and the certified maximal logit error
``max |f(x) - f_q(x)|_inf`` (``qbound.certify``, differential bounds ``diff``) over L-inf balls around a few test
images, where f is the float network the quantized one came from. A CNN family is added when
qbound can trace convolutions (tried on every run; the outcome is recorded in ``summary.json``).

    python experiments/resiliency.py             # full: widths 16..512, a few minutes
    python experiments/resiliency.py --smoke     # one tiny width, seconds

Writes ``resiliency.csv``, ``summary.json`` and ``resiliency.png`` under ``results/resiliency/``.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qbound as qb
import common

NAME = "resiliency"

FULL = dict(widths=(16, 32, 64, 128, 256, 512), cnn_channels=(4, 8, 16), epochs=60, qat_steps=1500,
            images=3, radius=0.02, quantizers=("ternary", 2, 3, 4, 8), method="diff", time_budget=3.0)
SMOKE = dict(widths=(16,), cnn_channels=(), epochs=5, qat_steps=40, images=1, radius=0.02,
             quantizers=("ternary", 2, 8), method="interval", search=qb.Search(samples=512, restarts=4, steps=30))


def quantizer(name):
  """A kernels-only ``params -> params`` transform (biases stay float, as in the paper)."""
  if name == "ternary":
    return qb.quantize.ternary_quantizer(where=qb.quantize.kernels_only)
  return qb.quantize.uniform_quantizer(bits=int(name), where=qb.quantize.kernels_only)


def load_retrain():
  """The library's quantization-aware retraining, or ``(None, reason)``."""
  fn = getattr(qb.quantize, "retrain", None)
  if callable(fn):
    return fn, None
  try:
    from qbound.quantize.qat import retrain
    return retrain, None
  except Exception as exc:
    return None, f"no quantization-aware retraining in qbound.quantize ({type(exc).__name__}: {exc})"


class CNN(nn.Module):
  """8x8x1 -> conv3x3(c) -> relu -> conv3x3(2c, stride 2) -> relu -> dense 10."""

  channels: int = 8

  @nn.compact
  def __call__(self, x):
    x = x.reshape(8, 8, 1)
    x = nn.relu(nn.Conv(self.channels, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2), padding="SAME")(x))
    return nn.Dense(10)(x.reshape(-1))


def cnn_support() -> tuple[bool, str]:
  """Whether qbound certifies a (tiny) convolutional net right now."""
  model = CNN(2)
  variables = model.init(jax.random.key(0), jnp.zeros(64))
  f = functools.partial(model.apply, variables)
  fq = functools.partial(model.apply, qb.quantize.uniform(variables, bits=4))
  try:
    qb.certify(f, fq, common.pixel_box(np.full(64, 0.5), 0.01), method="interval",
               search=qb.Search(samples=8, restarts=1, steps=1))
    return True, "qbound certifies convolutional networks"
  except Exception as exc:
    lines = str(exc).strip().splitlines()
    return False, f"{type(exc).__name__} while tracing/bounding a conv net: {lines[0][:300] if lines else 'no message'}"


def count_params(variables) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"])))


def run_family(family, sizes, cfg, data, key, retrain, rows):
  x_train, y_train, x_test, y_test = data
  boxes = [common.pixel_box(x, cfg["radius"]) for x in x_test[: cfg["images"]]]
  for size in sizes:
    k_model, k_qat, k_cert = jax.random.split(jax.random.fold_in(key, size), 3)
    if family == "mlp":
      model = common.MLP((size, size), 10)
      label = f"64-{size}-{size}-10"
    else:
      model = CNN(size)
      label = f"cnn c={size}"
    init_key, train_key = jax.random.split(k_model)
    variables = model.init(init_key, jnp.zeros(64))
    start = time.perf_counter()
    variables = common.train(model.apply, variables, train_key, x_train, y_train, epochs=cfg["epochs"])
    train_s = time.perf_counter() - start
    f = functools.partial(model.apply, variables)
    acc_float = common.accuracy(model.apply, variables, x_test, y_test)
    base = dict(family=family, net=label, size=size, params=count_params(variables), float_acc=acc_float)
    rows.append(dict(base, quantizer="float32", retrained=False, acc=acc_float, ratio=1.0, bits_per_weight=32.0,
                     train_seconds=train_s))
    for qi, qname in enumerate(cfg["quantizers"]):
      q = quantizer(qname)
      variants = [(False, q(variables))]
      if retrain is not None:
        start = time.perf_counter()
        shadow = retrain(model.apply, variables, q, (jnp.asarray(x_train), jnp.asarray(y_train)),
                         optimizer=optax.adam(1e-3), steps=cfg["qat_steps"], key=jax.random.fold_in(k_qat, qi),
                         batch_size=64)
        variants.append((True, q(shadow), time.perf_counter() - start))
      for variant in variants:
        retrained, qvars = variant[0], variant[1]
        fq = functools.partial(model.apply, qvars)
        report = qb.quantize.size_report(qvars["params"])
        certs = common.certify_boxes(f, fq, boxes, k_cert, method=cfg["method"], search=cfg.get("search"),
                                     time_budget=cfg.get("time_budget"))
        uppers, lowers = [c.upper for c in certs], [c.lower for c in certs]
        rows.append(dict(base, quantizer=str(qname), retrained=retrained,
                         acc=common.accuracy(model.apply, qvars, x_test, y_test),
                         ratio=report.compression_ratio, bits_per_weight=report.bits_per_weight,
                         upper=float(np.mean(uppers)), upper_max=float(np.max(uppers)),
                         lower=float(np.mean(lowers)), lower_max=float(np.max(lowers)),
                         gap=float(np.mean(uppers) / max(np.mean(lowers), 1e-30)),
                         best_method="/".join(sorted({c.method for c in certs})),
                         certify_seconds=float(np.mean([c.seconds for c in certs])),
                         qat_seconds=variant[2] if retrained else None))


def plot(rows, path, notes):
  plt = common.pyplot()
  families = sorted({r["family"] for r in rows})
  fig, axes = plt.subplots(len(families), 3, figsize=(15, 4 * len(families)), squeeze=False)
  colors = {"ternary": "tab:red", "2": "tab:orange", "3": "tab:olive", "4": "tab:green", "8": "tab:blue",
            "float32": "black"}
  for axrow, fam in zip(axes, families):
    sel = [r for r in rows if r["family"] == fam]
    for qname, color in colors.items():
      for retrained, ls in ((False, "--"), (True, "-")):
        pts = sorted((r["params"], r) for r in sel if r["quantizer"] == qname and r["retrained"] == retrained)
        if not pts:
          continue
        xs = [p for p, _ in pts]
        tag = f"{qname}{' retrained' if retrained else ''}" if qname != "float32" else "float32"
        axrow[0].plot(xs, [r["acc"] for _, r in pts], ls, marker="o", color=color, label=tag, ms=4)
        if qname != "float32":
          axrow[1].plot(xs, [r["upper"] for _, r in pts], ls, marker="o", color=color, label=f"{tag} (upper)", ms=4)
          axrow[1].plot(xs, [r["lower"] for _, r in pts], ls, marker="x", color=color, alpha=0.5, ms=5)
          if not retrained:
            axrow[2].plot(xs, [r["ratio"] for _, r in pts], "-", marker="o", color=color, label=tag, ms=4)
    for ax in axrow:
      ax.set_xscale("log")
      ax.grid(True, which="both", alpha=0.3)
      ax.set_xlabel("parameters")
    axrow[0].set_ylabel("test accuracy")
    axrow[0].set_title(f"{fam}: accuracy (dashed: direct, solid: retrained)")
    axrow[1].set_yscale("log")
    axrow[1].set_ylabel("max logit error, mean over boxes")
    axrow[1].set_title("certified upper (o) and reached lower (x) vs original float net")
    axrow[2].set_ylabel("compression ratio vs float32")
    axrow[2].set_title("storage (size_report, Huffman)")
    axrow[0].legend(fontsize=6, ncol=2)
    axrow[2].legend(fontsize=6)
  if notes:
    fig.text(0.01, 0.005, " | ".join(notes), fontsize=7)
  fig.tight_layout(rect=(0, 0.02, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--method", default=None, help="qbound.certify method (default: diff full, interval smoke)")
  args = p.parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL, method=args.method)
  if cfg["method"] not in common.certify_methods():
    cfg["method"] = "diff"
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  key = jax.random.key(args.seed)
  data = common.digits()
  retrain, qat_note = load_retrain()
  cnn_ok, cnn_note = cnn_support()
  notes = []
  if qat_note:
    notes.append(f"no retraining: {qat_note}")
  if not cnn_ok:
    notes.append(f"MLP only: qbound cannot certify the CNN yet ({cnn_note})")
  for n in notes:
    print("note:", n)
  rows = []
  run_family("mlp", cfg["widths"], cfg, data, jax.random.fold_in(key, 0), retrain, rows)
  if cnn_ok and cfg["cnn_channels"]:
    run_family("cnn", cfg["cnn_channels"], cfg, data, jax.random.fold_in(key, 1), retrain, rows)
  common.check_certificates(rows)
  print(common.table(rows, ["net", "params", "quantizer", "retrained", "acc", "ratio", "upper", "lower", "gap"],
                     title=f"digits: test accuracy, compression and certified max logit error "
                           f"(L-inf radius {cfg['radius']}, mean over {cfg['images']} test images, method {cfg['method']})"))
  common.write_csv(out / "resiliency.csv", rows)
  plot(rows, out / "resiliency.png", notes)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "retraining": qat_note or
             "qbound.quantize.qat.retrain (straight-through, Adam 1e-3, batch 64)", "cnn_supported": cnn_ok,
             "cnn_note": cnn_note, "notes": notes, "rows": rows, "seconds": time.perf_counter() - start,
             "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/resiliency.csv, summary.json, resiliency.png ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
