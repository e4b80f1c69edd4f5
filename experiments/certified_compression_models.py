"""Certified compression beyond the digits MLP: a digits CNN and MNIST 3x100.

The frontier of ``certified_compression.py`` (per-layer bit widths of the kernels with the least
storage whose certified maximal error over a set of L-inf balls meets a budget, against every uniform
width) on two more networks:

* ``digits CNN``: ``qb.models.CNN`` (two 3x3 convolutions of 4 and 8 channels, max pooling, a dense
  layer of 32, 10 outputs) trained here on the 8x8 digits (seeded), balls of radius 0.02 around test
  images;
* ``MNIST 3x100``: the ERAN network of ``../shared/bench/nnet`` (skipped, saying so, when the
  benchmark checkout is absent), balls of radius 1/255 around MNIST test images.

Every number in the table is a sound certificate computed from scratch (``qb.certify_batch``,
differential bounds, the maximum over the balls), with test accuracy and top-1 agreement with f.

    python experiments/certified_compression_models.py           # ~10 min on 2 cores
    python experiments/certified_compression_models.py --smoke   # a tiny CNN, for CI-sized checks

Writes ``frontier.csv`` (one row per model, target and candidate) and ``summary.json``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
import qbound as qb
from qbound.quantize.policy import Selection, kernels_only

NAME = "certified_compression_models"
FULL = dict(images=20, targets=(0.05, 0.1, 0.5), widths=tuple(range(12, 1, -1)), channels=(4, 8), features=(32,),
            epochs=30, mnist_images=10, mnist_radius=1 / 255)
SMOKE = dict(images=1, targets=(10.0,), widths=(8, 4), channels=(2,), features=(), epochs=1, mnist_images=0,
             mnist_radius=1 / 255)


def frontier(model: str, apply, params, boxes, x_test, y_test, targets, widths) -> list[dict]:
  """Uniform widths and the searched per-layer widths for each target, every row re-certified."""
  kernels = [qb.quantize.path_str(p) for p, _ in Selection(params, kernels_only).selected]
  f = functools.partial(apply, params)

  def row(target, candidate, bits, qparams, seconds=None):
    t0 = time.perf_counter()
    uppers = np.asarray(qb.certify_batch(f, functools.partial(apply, qparams), boxes, method="diff",
                                         progress=False).upper)
    return dict(model=model, target=target, candidate=candidate, bits="/".join(str(bits[k]) for k in kernels),
                bytes=qb.compression.storage_bytes(params, bits), certified=float(np.max(uppers)),
                certified_mean=float(np.mean(uppers)), accuracy=common.accuracy(apply, qparams, x_test, y_test),
                agreement=common.agreement(apply, params, qparams, x_test), search_seconds=seconds,
                certify_seconds=time.perf_counter() - t0)

  uniform = [row(None, f"uniform-{w}", {k: w for k in kernels},
                 qb.compression.quantize_layers(params, {k: w for k in kernels})) for w in widths]
  rows = []
  for target in targets:
    meeting = [u for u in uniform if u["certified"] <= target]
    rows += [dict(u, target=target, meets=u["certified"] <= target) for u in uniform]
    if not meeting:
      print(f"{model}, epsilon {target}: no uniform width meets it")
      continue
    t0 = time.perf_counter()
    plan = qb.compression.search(params, apply, boxes, epsilon=target, widths=widths, progress=False)
    searched = row(target, "searched", plan.bits, plan.params, time.perf_counter() - t0)
    assert searched["certified"] <= target, searched  # re-certified from scratch
    best_uniform = min(u["bytes"] for u in meeting)
    assert searched["bytes"] <= best_uniform, (searched, best_uniform)
    rows.append(dict(searched, meets=True, best_uniform_bytes=best_uniform,
                     candidates=len(plan.uniform) + len(plan.steps)))
  return rows


def main(argv=None):
  args = common.parser(NAME, __doc__).parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  key = jax.random.key(args.seed)

  x_train, y_train, x_test, y_test = common.digits()
  x_test = jnp.asarray(x_test, jnp.float32)
  cnn = qb.models.CNN(channels=cfg["channels"], features=cfg["features"], outputs=10)
  apply = lambda v, x: cnn.apply(v, x.reshape(8, 8, 1))  # noqa: E731 - flat 64-pixel inputs, as the MLP's
  init_key, train_key = jax.random.split(key)
  params = cnn.init(init_key, jnp.zeros((8, 8, 1)))
  params = common.train(apply, params, train_key, x_train, y_train, epochs=cfg["epochs"])
  boxes = qb.linf_ball(x_test[: cfg["images"]], 0.02, clip_lower=0.0, clip_upper=1.0)
  rows = frontier("digits CNN", apply, params, boxes, x_test, y_test, cfg["targets"], cfg["widths"])

  mnist = common.BENCH / "nnet" / "mnist_relu_3_100.nnet"
  if cfg["mnist_images"] and mnist.is_file():
    m_apply, m_params = qb.io.load_nnet(mnist)
    pixels = np.load(common.BENCH / "inputs" / "mnist100_pixels_uint8.npy").reshape(100, -1).astype(np.float32) / 255
    labels = np.load(common.BENCH / "inputs" / "mnist100_labels.npy")
    m_boxes = qb.linf_ball(jnp.asarray(pixels[: cfg["mnist_images"]]), cfg["mnist_radius"], clip_lower=0.0,
                           clip_upper=1.0)
    rows += frontier("MNIST 3x100", m_apply, m_params, m_boxes, jnp.asarray(pixels), labels, cfg["targets"],
                     cfg["widths"])
  elif cfg["mnist_images"]:
    print(f"MNIST 3x100 skipped: {mnist} is absent (the benchmark checkout ../shared/bench)")

  print(common.table(rows, ["model", "target", "candidate", "bits", "bytes", "certified", "certified_mean", "accuracy",
                            "agreement", "meets", "candidates", "search_seconds"],
                     title="certified max |f - f_q| over L-inf balls (differential bounds, re-certified); "
                           "bits per kernel in layer order"))
  common.write_csv(out / "frontier.csv", rows)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "rows": rows,
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/frontier.csv, summary.json ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
