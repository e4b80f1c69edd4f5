"""All 100 MNIST test images in one call: ``qbound.certify_batch`` on MNIST 3x100 vs its float16 copy.

The problem of ReluDiff/NeuroDiff (``../shared/bench/README.md``): the MNIST classifier 784-100-100-10-10
(``nnet/mnist_relu_3_100.nnet``) against its float16 copy, over the L-inf ball of radius 3/255 around each
of the 100 test images (pixels in [0, 1], the ball clipped to [0, 1]); the bound is
``max_x max_j |f_j(x) - f16_j(x)|``. The copy is made with ``qbound.quantize.float_format(params, 'float16')``
(``--copy quantize``, the default; every weight and bias rounded to float16, the input normalisation
untouched), which is checked against the benchmark's own ``nnet_16bit/mnist_relu_3_100_16bit.nnet``
(``--copy file`` certifies that one instead).

All 100 balls go through ONE ``certify_batch`` call (differential bounds by default, the lower-bound search,
the float64 re-evaluation of every witness), compiled once for the chunk shape and split over every device.
It reports the time per image (after compilation, which is reported separately) and the distribution of the
proven bounds and of the errors reached, beside NeuroDiff's published bounds for images 0..9.

    python experiments/batch_mnist.py              # the 100 MNIST images (needs ../shared/bench)
    python experiments/batch_mnist.py --smoke      # CI: the bundled digits MLP, 8 images, CROWN

Without the benchmark checkout (``QBOUND_BENCH`` overrides its path) the full mode says so and certifies the
bundled digits MLP (64-32-32-10) against its float16 copy on the 20 bundled test images instead. Writes
``images.csv`` (one row per image), ``summary.json``, ``batch.json.gz`` (the BatchCertificate) and
``bounds_hist.png`` under ``results/batch_mnist/``.
"""

from __future__ import annotations

import functools
import gzip
import time

import jax
import numpy as np

import qbound as qb
import common

NAME = "batch_mnist"
NEURODIFF_MNIST = [0.004422, 0.004010, 0.003584, 0.003261, 0.002380, 0.002258, 0.002588, 0.004675, 0.003916,
                   0.003862]  # images 0..9, bench README (NeuroDiff, float32, not sound against rounding)
FULL = dict(images=100, radius=3, method="diff", search=qb.Search())
SMOKE = dict(images=8, radius=0.02, method="crown", search=qb.Search(samples=256, restarts=4, steps=20))


def mnist_problem(cfg, copy: str):
  """``(f, fq, boxes, labels, description)`` for the bench's MNIST 3x100, or None if absent."""
  paths = [common.BENCH / "nnet" / "mnist_relu_3_100.nnet", common.BENCH / "nnet_16bit" / "mnist_relu_3_100_16bit.nnet",
           common.BENCH / "inputs" / "mnist100_pixels_uint8.npy", common.BENCH / "inputs" / "mnist100_labels.npy"]
  if not all(p.is_file() for p in paths):
    return None
  apply, params = qb.io.load_nnet(paths[0])
  apply_16, params_16 = qb.io.load_nnet(paths[1])
  ours = dict(params, params=qb.quantize.float_format(params["params"], "float16"))
  agree = _weights_agree(ours["params"], params_16["params"])
  fq = functools.partial(apply, ours) if copy == "quantize" else functools.partial(apply_16, params_16)
  pixels = np.load(paths[2])[: cfg["images"]].astype(np.float64).reshape(-1, 784)
  labels = np.load(paths[3])[: cfg["images"]]
  r = cfg["radius"]
  # The bench's box, computed in float64 (validate_box rounds it outward to float32).
  boxes = qb.Box(lower=np.maximum((pixels - r) / 255, 0), upper=np.minimum((pixels + r) / 255, 1))
  what = (f"MNIST 3x100 vs its float16 copy ({'qbound.quantize.float_format' if copy == 'quantize' else paths[1].name}; "
          f"{agree} of the quantized weights equal the bench's 16-bit file), radius {r}/255")
  return functools.partial(apply, params), fq, boxes, labels, what, {"weights_equal_to_bench_16bit": agree}


def _weights_agree(a, b) -> str:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  same = sum(int(np.sum(np.asarray(x) == np.asarray(y))) for x, y in zip(la, lb))
  total = sum(int(np.size(x)) for x in la)
  return f"{same}/{total}"


def digits_problem(cfg):
  """The bundled digits MLP vs its float16 copy over balls around the bundled test images."""
  from qbound.demo import load_digits_images, load_digits_model

  apply, params = load_digits_model()
  images, labels = load_digits_images()
  images, labels = images[: cfg["images"]], labels[: cfg["images"]]
  fq = functools.partial(apply, dict(params, params=qb.quantize.float_format(params["params"], "float16")))
  boxes = qb.linf_ball(images, cfg["radius"], clip_lower=0.0, clip_upper=1.0)
  what = f"bundled digits MLP 64-32-32-10 vs its float16 copy, radius {cfg['radius']}"
  return functools.partial(apply, params), fq, boxes, labels, what, {}


def plot(batch, path, title):
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  upper, lower = np.asarray(batch.upper), np.asarray(batch.lower)
  bins = np.linspace(0, max(upper.max(), lower.max()) * 1.05, 30)
  ax.hist(upper, bins=bins, alpha=0.7, label=f"proven upper (median {np.median(upper):.3g})")
  ax.hist(lower, bins=bins, alpha=0.7, label=f"reached lower (median {np.median(lower):.3g})")
  ax.set_xlabel("max |f(x) - f_q(x)| over the ball")
  ax.set_ylabel("images")
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def quantiles(x) -> dict:
  x = np.asarray(x, np.float64)
  q = np.quantile(x, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
  return dict(zip(["min", "p10", "p25", "median", "p75", "p90", "max"], q.tolist()), mean=float(x.mean()))


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--method", default=None, help="certify_batch method (default: diff full, crown smoke)")
  p.add_argument("--copy", choices=("quantize", "file"), default="quantize",
                 help="float16 copy from qbound.quantize (default) or the bench's 16-bit file")
  p.add_argument("--memory-budget", type=float, default=None, help="bytes per device (default: half the memory)")
  args = p.parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL, method=args.method)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()

  problem = None if args.smoke else mnist_problem(cfg, args.copy)
  notes = []
  if problem is None:
    if not args.smoke:
      notes.append(f"MNIST skipped: benchmark files not found under {common.BENCH}; certifying the bundled digits "
                   "MLP instead")
      print(notes[-1])
      cfg.update(images=20, radius=0.02)
    problem = digits_problem(cfg)
  f, fq, boxes, labels, what, extra = problem
  short = what.split(" (")[0] + (f", radius {cfg['radius']}/255" if "MNIST" in what else "")
  n = int(np.shape(boxes.lower)[0])
  print(f"{what}: {n} images, method {cfg['method']}, {len(jax.devices())} device(s)")

  batch = qb.certify_batch(f, fq, boxes, method=cfg["method"], key=jax.random.key(args.seed), search=cfg["search"],
                           memory_budget=args.memory_budget, progress=True)
  running = batch.total_seconds - batch.compile_seconds
  rows = []
  for i in range(n):
    rows.append(dict(image=i, label=int(labels[i]), upper=float(batch.upper[i]), lower=float(batch.lower[i]),
                     gap=float(batch.gap[i]), seconds=float(batch.seconds[i]),
                     neurodiff=NEURODIFF_MNIST[i] if "MNIST" in what and i < len(NEURODIFF_MNIST) else None))
  common.check_certificates(rows)
  compared = [r for r in rows if r["neurodiff"] is not None]
  summary = {
      "experiment": NAME, "smoke": args.smoke, "seed": args.seed, "problem": what, "images": n,
      "method": cfg["method"], "search": cfg["search"], "notes": notes, **extra,
      "one_call": True, "total_seconds": batch.total_seconds, "compile_seconds": batch.compile_seconds,
      "seconds_per_image": running / n, "seconds_per_image_with_compile": batch.total_seconds / n,
      "bound_seconds_per_image": batch.layout["seconds"]["bounds"] / n,
      "search_seconds_per_image": batch.layout["seconds"]["search"] / n,
      "upper": quantiles(batch.upper), "lower": quantiles(batch.lower), "gap": quantiles(batch.gap),
      "tighter_than_neurodiff": (f"{sum(r['upper'] <= r['neurodiff'] for r in compared)}/{len(compared)}"
                                 if compared else None),
      "layout": {k: v for k, v in batch.layout.items() if k != "device_of_box"},
      "wall_seconds": time.perf_counter() - start, "machine": common.machine(),
  }
  print(common.table(rows[:10], ["image", "label", "upper", "lower", "gap", "neurodiff"],
                     title=f"first 10 of {n} images (all in images.csv)"))
  u = summary["upper"]
  print(f"proven upper over {n} images: min {u['min']:.4g}, median {u['median']:.4g}, max {u['max']:.4g}; "
        f"reached lower median {summary['lower']['median']:.4g}")
  print(f"one call: {batch.total_seconds:.1f} s = {batch.compile_seconds:.1f} s compiling + "
        f"{summary['seconds_per_image'] * 1e3:.1f} ms per image ({summary['bound_seconds_per_image'] * 1e3:.1f} ms "
        f"bounds, {summary['search_seconds_per_image'] * 1e3:.1f} ms search; "
        f"chunk {batch.layout['chunk']} on {batch.layout['devices']} device(s))"
        + (f"; upper <= NeuroDiff on {summary['tighter_than_neurodiff']}" if compared else ""))
  common.write_csv(out / "images.csv", rows)
  common.write_json(out / "summary.json", summary)
  with gzip.open(out / "batch.json.gz", "wt") as fh:  # witnesses and boxes: a few MB of JSON
    fh.write(batch.to_json() + "\n")
  plot(batch, out / "bounds_hist.png", f"{short}: {n} images, {cfg['method']}, one certify_batch call")
  print(f"wrote {out}/images.csv, summary.json, batch.json.gz, bounds_hist.png")
  return summary


if __name__ == "__main__":
  main()
