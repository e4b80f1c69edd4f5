"""Deep Compression on the digits MLP: size, accuracy and certified error after every stage.

After Han, Mao and Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding" (ICLR 2016), on the digits MLP bundled with qbound
(64-32-32-10, ReLU, ``qbound/data/digits_mlp.nnet``, trained by ``train_digits_model.py``):

1. prune: magnitude pruning of every kernel (``qbound.quantize.prune``, per layer);
2. retrain: the surviving weights are retrained with the pruned ones held at zero (Adam, masked
   gradients; Han et al. 2015);
3. share: per-layer k-means weight sharing with 2^b centroids (``qbound.quantize.share_weights``;
   the paper's fine-tuning of the centroids is not done);
4. Huffman: the indices and relative positions Huffman coded (``qbound.quantize.size_report``);
   the weights do not change, only the storage.

Storage: float32 dense for the original; for pruned float weights the paper's sparse format
(32-bit values plus 5-bit relative positions with filler entries); after sharing the codebook plus
fixed-width indices, then Huffman-coded indices (both from ``size_report``). Biases stay float32.
For every stage: test accuracy (450 held-out images) and the certified maximal logit error
``max |f(x) - f_c(x)|_inf`` against the original f over L-inf balls (radius 0.02, clipped to
[0, 1]) around a few test images. The full mode adds a sweep over sparsity and bits, and uniform
quantization of the unpruned kernels at the same bits for reference.

    python experiments/deep_compression.py           # full: pipeline + sweep, a few minutes
    python experiments/deep_compression.py --smoke   # pipeline only, short retraining, seconds

Writes ``stages.csv``, ``sweep.csv``, ``summary.json`` and ``deep_compression.png`` under
``results/deep_compression/``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.demo import load_digits_model
import common

NAME = "deep_compression"
POSITION_BITS = 5  # the paper's relative-index width for fully connected layers

FULL = dict(sparsity=0.8, bits=4, retrain_epochs=20, images=5, radius=0.02, method="diff", time_budget=3.0,
            sweep_sparsity=(0.5, 0.7, 0.8, 0.9), sweep_bits=(2, 3, 4, 5))
SMOKE = dict(sparsity=0.8, bits=4, retrain_epochs=2, images=1, radius=0.02, method="interval",
             sweep_sparsity=(), sweep_bits=(), search=qb.Search(samples=512, restarts=4, steps=30))
# Smoke certifies with interval bounds: the differential bounds take long to compile (see README_SECTION).


def sparse_float_bits(weights) -> int:
  """Bits of float weights in the paper's sparse format: 32-bit values with 5-bit relative
  positions, or 32 bits per weight where that is smaller (``size_report`` stores such weights raw)."""
  return qb.quantize.size_report(weights, huffman=False, position_bits=POSITION_BITS).total_bits


def masked_retrain(apply, variables, weights, data, key, epochs):
  """Retrains ``weights`` (the ``params`` collection) with its zeros held at zero."""
  if epochs <= 0:
    return weights
  mask = jax.tree_util.tree_map(lambda w: (w != 0).astype(w.dtype), weights)
  # Biases are not pruned: keep them trainable even where they happen to be zero.
  mask = {layer: dict(m, bias=jnp.ones_like(m["bias"])) if "bias" in m else m for layer, m in mask.items()}
  apply_w = lambda w, x: apply(common.with_weights(variables, w), x)
  x_train, y_train = data
  return common.train(apply_w, weights, key, x_train, y_train, epochs=epochs, learning_rate=1e-3, mask=mask)


def evaluate(stage, weights, storage_bits, apply, variables, f, boxes, test, key, cfg, **extra):
  cvars = common.with_weights(variables, weights)
  fc = functools.partial(apply, cvars)
  row = dict(stage=stage, **extra, size_bytes=storage_bits / 8, ratio=32 * n_params(weights) / storage_bits,
             acc=common.accuracy(apply, cvars, *test),
             nonzero=float(np.mean([np.mean(np.asarray(w) != 0) for w in kernels(weights)])))
  if stage != "float32":
    certs = common.certify_boxes(f, fc, boxes, key, method=cfg["method"], search=cfg.get("search"),
                                 time_budget=cfg.get("time_budget"))
    row.update(upper=float(np.mean([c.upper for c in certs])), upper_max=float(np.max([c.upper for c in certs])),
               lower=float(np.mean([c.lower for c in certs])), lower_max=float(np.max([c.lower for c in certs])),
               certify_seconds=float(np.mean([c.seconds for c in certs])))
  return row


def kernels(weights):
  return [layer["kernel"] for layer in weights.values()]


def n_params(weights) -> int:
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(weights)))


def pipeline(weights, sparsity, bits, apply, variables, data, key):
  """The compressed weights after each stage: ``[(stage, weights, storage_bits), ...]``."""
  pruned = qb.quantize.prune(weights, sparsity)
  retrained = masked_retrain(apply, variables, pruned, data["train"], key, data["epochs"])
  shared = qb.quantize.share_weights(retrained, bits=bits)
  return [
      ("float32", weights, 32 * n_params(weights)),
      ("pruned", pruned, sparse_float_bits(pruned)),
      ("pruned+retrained", retrained, sparse_float_bits(retrained)),
      ("shared", shared, qb.quantize.size_report(shared, huffman=False, position_bits=POSITION_BITS).total_bits),
      ("huffman", shared, qb.quantize.size_report(shared, huffman=True, position_bits=POSITION_BITS).total_bits),
  ]


def plot(stages, sweep, cfg, path):
  plt = common.pyplot()
  ncols = 3 if sweep else 2
  fig, axes = plt.subplots(1, ncols, figsize=(5.3 * ncols, 4.2))
  names = [r["stage"] for r in stages]
  x = np.arange(len(names))
  ax = axes[0]
  ax.bar(x, [r["size_bytes"] / 1024 for r in stages], color="tab:blue")
  for xi, r in zip(x, stages):
    ax.text(xi, r["size_bytes"] / 1024, f"x{r['ratio']:.1f}\n{100 * r['acc']:.1f}%", ha="center", va="bottom",
            fontsize=8)
  ax.set_xticks(x, names, rotation=20, fontsize=8)
  ax.set_ylabel("storage (KiB)")
  ax.set_ylim(0, 1.3 * max(r["size_bytes"] for r in stages) / 1024)
  ax.set_title(f"pipeline: prune {cfg['sparsity']:.0%}, share {cfg['bits']} bits\n(label: ratio, test accuracy)",
               fontsize=9)
  ax = axes[1]
  cert = [r for r in stages if r.get("upper") is not None]
  cx = [names.index(r["stage"]) for r in cert]
  ax.bar(np.array(cx) - 0.2, [r["upper"] for r in cert], 0.4, color="tab:green", label="certified upper")
  ax.bar(np.array(cx) + 0.2, [r["lower"] for r in cert], 0.4, color="tab:red", label="reached lower")
  ax.set_xticks(x, names, rotation=20, fontsize=8)
  ax.text(0, 0, "reference", ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("max logit error vs original (mean over boxes)")
  ax.set_title(f"certified error, L-inf radius {cfg['radius']} ({cfg['method']})", fontsize=9)
  ax.legend(fontsize=8)
  if sweep:
    ax = axes[2]
    markers = {2: "v", 3: "s", 4: "o", 5: "^"}
    for r in sweep:
      color = "tab:gray" if r["stage"] == "uniform" else plt.cm.viridis(r["sparsity"])
      ax.scatter(r["ratio"], r["upper"], marker=markers.get(r["bits"], "o"), color=color, s=40,
                 edgecolor="k" if r["stage"] == "uniform" else "none")
      ax.annotate(f"{100 * r['acc']:.0f}%", (r["ratio"], r["upper"]), fontsize=6, xytext=(3, 2),
                  textcoords="offset points")
    for b, m in markers.items():
      ax.scatter([], [], marker=m, color="k", label=f"{b} bits")
    ax.scatter([], [], marker="o", color="tab:gray", edgecolor="k", label="uniform, no pruning")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio (Huffman)")
    ax.set_ylabel("certified max logit error")
    ax.set_title("sweep: colour = sparsity (0.5 dark .. 0.9 light),\nlabel = test accuracy", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
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
  k_train, k_cert = jax.random.split(key)

  apply, variables = load_digits_model()
  weights = variables["params"]
  f = functools.partial(apply, variables)
  x_train, y_train, x_test, y_test = common.digits()
  data = {"train": (x_train, y_train), "epochs": cfg["retrain_epochs"]}
  boxes = [common.pixel_box(x, cfg["radius"]) for x in x_test[: cfg["images"]]]
  test = (x_test, y_test)

  stages = [evaluate(name, w, storage, apply, variables, f, boxes, test, k_cert, cfg, sparsity=cfg["sparsity"],
                     bits=cfg["bits"])
            for name, w, storage in pipeline(weights, cfg["sparsity"], cfg["bits"], apply, variables, data, k_train)]
  sweep = []
  for s in cfg["sweep_sparsity"]:
    for b in cfg["sweep_bits"]:
      *_, (name, w, storage) = pipeline(weights, s, b, apply, variables, data, k_train)
      sweep.append(evaluate("pruned+shared+huffman", w, storage, apply, variables, f, boxes, test, k_cert, cfg,
                            sparsity=s, bits=b))
  for b in cfg["sweep_bits"]:
    w = qb.quantize.uniform(weights, bits=b, where=qb.quantize.kernels_only)
    sweep.append(evaluate("uniform", w, qb.quantize.size_report(w).total_bits, apply, variables, f, boxes, test,
                          k_cert, cfg, sparsity=0.0, bits=b))
  common.check_certificates(stages + sweep)

  cols = ["stage", "sparsity", "bits", "size_bytes", "ratio", "acc", "upper", "lower"]
  print(common.table(stages, cols, title=f"Deep Compression of the digits MLP 64-32-32-10 "
                                         f"(certified over {cfg['images']} boxes, method {cfg['method']})"))
  if sweep:
    print(common.table(sweep, cols, title="sweep (final stage: pruned + retrained + shared + Huffman)"))
  common.write_csv(out / "stages.csv", stages)
  if sweep:
    common.write_csv(out / "sweep.csv", sweep)
  plot(stages, sweep, cfg, out / "deep_compression.png")
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "stages": stages,
             "sweep": sweep, "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/stages.csv{', sweep.csv' if sweep else ''}, summary.json, deep_compression.png "
        f"({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
