"""Size against accuracy and certified error: the digits MLP under every weight compressor of qbound.

The digits MLP 64 -> 32 -> 32 -> 10 (ReLU; trained as ``train_digits_model.py`` does) has its
kernels (biases stay float32) compressed by

* Deep Compression (Han, Mao & Dally, ICLR 2016): magnitude pruning, then weight sharing
  (1-D k-means), then Huffman coding (``pruner -> weight_sharer``, sized by ``size_report``);
* uniform integers at 8, 4 and 2 bits (symmetric, one scale per tensor) and at 4 and 2 bits with one
  scale per output channel;
* power of two (4 bits: sign + 3-bit exponent), dynamic fixed point (8 and 4 bits);
* ternary (TWN, Li & Liu 2016) and binary (XNOR-Net style scaled signs);
* float16, bfloat16, float8 e4m3 and e5m2 (saturating).

For each: test accuracy, the certified maximal logit error ``max_x |f(x) - f_q(x)|_inf``
(``qbound.certify``, method auto) over L-inf balls of radius 0.02 (clipped to [0, 1]) around the
first few test images (the largest proven upper bound and the largest error reached), and the
storage of all weights in two ways:

* ``format_bpw``: the format's own width per kernel weight (b bits; 2 for ternary, 1 for binary; 16
  or 8 for the floats) plus its per-tensor/per-channel constants (a float32 scale, or an 8-bit
  exponent / fractional length); Deep Compression rows use fixed-width codebook indices with
  relative positions (``size_report(huffman=False)``);
* ``coded_bpw``: ``size_report`` (Huffman-coded codebook indices, sparse when smaller, a float32
  codebook of the distinct nonzero values per tensor);

biases counted at 32 bits in both, over all weights. ``ratio`` = 32 / the smaller of the two.

    python experiments/size_report_digits.py           # full: a few minutes on 2 CPU cores
    python experiments/size_report_digits.py --smoke   # a few seconds (interval bounds)

Writes ``results.csv`` and ``summary.json`` under ``results/size_report_digits/``.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import numpy as np

import common
import qbound as qb
from qbound.quantize.policy import Selection, kernels_only

NAME = "size_report_digits"
qz = qb.quantize
K = dict(where=kernels_only)

# name -> (transform, format bits per kernel weight or None for Deep Compression, constants per kernel)
# where constants is 'tensor' (one float32), 'channel' (one float32 per output channel), 'exp8' (8 bits)
# or None.
SCHEMES = {
    "float32": (lambda p: p, 32, None),
    "prune50+share4": (qz.chain(qz.pruner(0.5), qz.weight_sharer(4)), None, None),
    "prune80+share3": (qz.chain(qz.pruner(0.8), qz.weight_sharer(3)), None, None),
    "uniform8": (qz.uniform_quantizer(8, **K), 8, "tensor"),
    "uniform4": (qz.uniform_quantizer(4, **K), 4, "tensor"),
    "uniform2": (qz.uniform_quantizer(2, **K), 2, "tensor"),
    "uniform4/channel": (qz.uniform_quantizer(4, per_channel=True, **K), 4, "channel"),
    "uniform2/channel": (qz.uniform_quantizer(2, per_channel=True, **K), 2, "channel"),
    "pow2-4": (qz.power_of_two_quantizer(4, **K), 4, "exp8"),
    "fixed8": (qz.fixed_point_quantizer(8, **K), 8, "exp8"),
    "fixed4": (qz.fixed_point_quantizer(4, **K), 4, "exp8"),
    "ternary": (qz.ternary_quantizer(**K), 2, "tensor"),
    "binary": (qz.binary_quantizer(**K), 1, "tensor"),
    "float16": (qz.float_quantizer("float16", **K), 16, None),
    "bfloat16": (qz.float_quantizer("bfloat16", **K), 16, None),
    "fp8-e4m3": (qz.float_quantizer("float8_e4m3", **K), 8, None),
    "fp8-e5m2": (qz.float_quantizer("float8_e5m2", **K), 8, None),
}
SMOKE_SCHEMES = ("float32", "prune50+share4", "uniform4", "ternary", "fp8-e4m3")

FULL = dict(epochs=60, images=5, radius=0.02, method="auto", search=None)
SMOKE = dict(epochs=3, images=1, radius=0.02, method="interval", search=qb.Search(samples=256, restarts=2, steps=10))


def format_bits(params, width, constants) -> int:
  """Total bits of all float parameters: kernels in the format's width, the rest at 32 bits."""
  everything = Selection(params, check=False)
  kernels = Selection(params, kernels_only)
  kernel_ids = set(kernels.indices)
  total = sum(32 * int(np.size(everything.leaves[i])) for i in everything.indices if i not in kernel_ids)
  for _, w in kernels.selected:
    extra = {None: 0, "tensor": 32, "exp8": 8, "channel": 32 * int(np.shape(w)[-1])}[constants]
    total += width * int(np.size(w)) + extra
  return total


def main(argv=None):
  args = common.parser(NAME, __doc__).parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL)
  names = SMOKE_SCHEMES if args.smoke else tuple(SCHEMES)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  k_model, k_cert = jax.random.split(jax.random.key(args.seed))

  x_train, y_train, x_test, y_test = common.digits()
  apply, variables = common.train_mlp(k_model, (32, 32), x_train, y_train, epochs=cfg["epochs"])
  f = functools.partial(apply, variables)
  boxes = [common.pixel_box(x, cfg["radius"]) for x in x_test[: cfg["images"]]]
  num_params = sum(int(np.size(x)) for _, x in Selection(variables, check=False).selected)

  rows = []
  for name in names:
    transform, width, constants = SCHEMES[name]
    qvars = common.block(transform(variables))
    coded = qz.size_report(qvars, huffman=True)
    if width is None:
      fmt_bits = qz.size_report(qvars, huffman=False).total_bits
    else:
      fmt_bits = format_bits(qvars, width, constants)
    fmt_bpw, coded_bpw = fmt_bits / num_params, coded.bits_per_weight
    row = dict(scheme=name, acc=common.accuracy(apply, qvars, x_test, y_test), format_bpw=fmt_bpw,
               coded_bpw=coded_bpw, ratio=32.0 / min(fmt_bpw, coded_bpw))
    if name != "float32":
      certs = common.certify_boxes(f, functools.partial(apply, qvars), boxes, k_cert, method=cfg["method"],
                                   search=cfg["search"])
      row.update(upper_max=float(np.max([c.upper for c in certs])), lower_max=float(np.max([c.lower for c in certs])),
                 method="/".join(sorted({c.method for c in certs})),
                 certify_seconds=float(np.sum([c.seconds for c in certs])))
    else:
      row.update(upper_max=0.0, lower_max=0.0, method="-")
    rows.append(row)
  common.check_certificates(rows, lower="lower_max", upper="upper_max")
  assert all(math.isfinite(r["ratio"]) for r in rows)

  title = (f"digits MLP 64-32-32-10 ({num_params} weights; kernels compressed, biases float32): test accuracy "
           f"({len(x_test)} images), bits per weight, compression vs float32, and certified max |f - f_q|_inf over "
           f"L-inf balls of radius {cfg['radius']} around {cfg['images']} test image(s), method {cfg['method']}")
  print(common.table(rows, ["scheme", "acc", "format_bpw", "coded_bpw", "ratio", "upper_max", "lower_max", "method"],
                     title=title))
  common.write_csv(out / "results.csv", rows)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed,
             "config": {k: v for k, v in cfg.items() if k != "search"}, "num_params": num_params, "rows": rows,
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/results.csv, summary.json ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
