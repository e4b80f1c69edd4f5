"""Certified compression: per-layer bit widths chosen by what can be proven, and retraining that lowers the proof.

For each error budget epsilon (logits), ``qb.compression.search`` picks the bit width of each of the
digits MLP's three kernels (uniform symmetric quantization, one scale per tensor) with the least
storage whose certified maximal error over L-inf balls around test images (radius 0.02, clipped to
[0, 1]; differential bounds, ``qb.certify_batch``) is at most epsilon, three ways:

* ``searched``: the greedy search (every layer tried at every step);
* ``attribution-ordered``: layer by layer, the layer with the smallest certified error when quantized
  alone (``qb.compression.attribution`` at the best uniform width) first, each lowered while the
  certificate holds (``search(order=...)``);
* ``sensitivity-ordered``: the same descent in the order of a HAWQ-style sensitivity (Dong et al.,
  ICCV 2019; here the output MSE of quantizing one layer alone on 256 training images,
  ``qb.compression.sensitivity``).

Beside them: every uniform width, two pipelines of the other experiments (ternary, TWN; Deep
Compression's prune 50% + 4-bit weight sharing), and retrained formats (4-bit uniform and ternary
kernels; Adam, straight-through gradients, L-inf balls of the same radius around training images):

* ``qat``: quantization-aware retraining on the labels (``loss='cross_entropy'``);
* ``distill``: the same towards f's logits (``loss='mse'``);
* ``certified``: distillation plus ``weight`` times a differentiable bound on |f - f_q| over the
  training balls (``qb.compression.certified_retrain``, certified training after Gowal et al. 2018
  and Zhang et al. 2020);
* ``certified-ce``: the labels' cross-entropy plus the same bound.

each with 3 seeds (minibatch order), 600 steps of 64 examples, learning rate 1e-3, weight 0.1.

Every certified number in the tables is recomputed from scratch for its row over the test balls
(none of which the retraining saw), with test accuracy and top-1 agreement with f on the 449 test
images. The bundled digits model (``qbound/data/digits_mlp.nnet``, the README's demo model) is f.

    python experiments/certified_compression.py           # ~15 min on 2 cores (retraining most of it)
    python experiments/certified_compression.py --smoke    # seconds

Writes ``frontier.csv`` (one row per target and candidate; retrained formats at their first seed),
``attribution.csv`` (per layer), ``retraining.csv`` (every seed), ``retraining_summary.csv`` (over seeds)
and ``summary.json`` under ``results/certified_compression/``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import qbound as qb
from qbound import demo
from qbound.quantize.policy import kernels_only

NAME = "certified_compression"
RETRAIN_MODES = ("qat", "distill", "certified", "certified-ce")
FULL = dict(images=50, radius=0.02, targets=(0.05, 0.1, 0.5), widths=tuple(range(12, 1, -1)), calibration=256,
            retrain_formats=("uniform-4", "ternary"), retrain_modes=RETRAIN_MODES, seeds=3, steps=600, batch_size=64,
            learning_rate=1e-3, weight=0.1, bound="diff")
SMOKE = dict(images=4, radius=0.02, targets=(0.5,), widths=(8, 6, 4), calibration=32,
             retrain_formats=("uniform-4",), retrain_modes=("certified",), seeds=1, steps=2, batch_size=4,
             learning_rate=1e-3, weight=0.1, bound="interval")


def quantizer(fmt: str):
  if fmt == "ternary":
    return qb.quantize.ternary_quantizer(where=kernels_only)
  return qb.quantize.uniform_quantizer(bits=int(fmt.removeprefix("uniform-")), where=kernels_only)


def main(argv=None):
  args = common.parser(NAME, __doc__).parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  key = jax.random.key(args.seed)

  apply, params = demo.load_digits_model()
  x_train, y_train, x_test, y_test = common.digits()
  x_train, x_test = jnp.asarray(x_train, jnp.float32), jnp.asarray(x_test, jnp.float32)
  f = functools.partial(apply, params)
  boxes = qb.linf_ball(x_test[: cfg["images"]], cfg["radius"], clip_lower=0.0, clip_upper=1.0)
  kernels = [qb.quantize.path_str(p) for p, _ in qb.quantize.policy.Selection(params, kernels_only).selected]

  def row(target, candidate, bits, qparams, seconds=None):
    # One sound certificate per ball, from scratch (qb.compression.certified_error is their maximum).
    uppers = np.asarray(qb.certify_batch(f, functools.partial(apply, qparams), boxes, method="diff",
                                         progress=False).upper)
    return dict(target=target, candidate=candidate, bits=bits,
                bytes=qb.compression.storage_bytes(params, bits) if isinstance(bits, dict) else bits,
                certified=float(np.max(uppers)), certified_mean=float(np.mean(uppers)),
                accuracy=common.accuracy(apply, qparams, x_test, y_test),
                agreement=common.agreement(apply, params, qparams, x_test), search_seconds=seconds)

  # Every uniform width, and the pipelines, once (their certificates do not depend on the target).
  baselines = []
  for w in cfg["widths"]:
    bits = {k: w for k in kernels}
    qparams = qb.compression.quantize_layers(params, bits)
    baselines.append(row(None, f"uniform-{w}", bits, qparams))
  pipelines = {
      "ternary": (qb.quantize.ternary_quantizer(where=kernels_only), 2),
      "prune50+share4": (qb.quantize.chain(qb.quantize.pruner(0.5), qb.quantize.weight_sharer(4)), None),
  }
  for name, (transform, width) in pipelines.items():
    qparams = dict(params, params=transform(params["params"]))
    bits = {k: width for k in kernels} if width else qb.quantize.size_report(qparams, huffman=False).total_bits // 8
    baselines.append(row(None, name, bits, qparams))

  # Retraining: each format four ways, from f, on the training images (f's logits as the teacher), with
  # several seeds (minibatch order): the certified maximum over 50 balls varies between runs.
  teacher = jax.vmap(f)(x_train)
  retrained = []
  for fi, fmt in enumerate(cfg["retrain_formats"]):
    q = quantizer(fmt)
    bits = {k: (2 if fmt == "ternary" else int(fmt.removeprefix("uniform-"))) for k in kernels}
    ptq = row(None, fmt, bits, q(params))
    retrained.append(dict(ptq, format=fmt, mode="none", seed=None))
    for mi, mode in enumerate(cfg["retrain_modes"]):
      labels = mode in ("qat", "certified-ce")
      for seed in range(cfg["seeds"]):
        t0 = time.perf_counter()
        shadow = qb.compression.certified_retrain(
            apply, params, q, (x_train, jnp.asarray(y_train) if labels else teacher), radius=cfg["radius"],
            weight=cfg["weight"] if mode.startswith("certified") else 0.0,
            optimizer=optax.adam(cfg["learning_rate"]), steps=cfg["steps"], batch_size=cfg["batch_size"],
            loss="cross_entropy" if labels else "mse", where="params/*", clip=(0.0, 1.0), method=cfg["bound"],
            key=jax.random.fold_in(jax.random.fold_in(key, 10 * fi + mi), seed))
        qparams = common.block(q(shadow))
        r = row(None, f"{fmt}+{mode}", bits, qparams, time.perf_counter() - t0)
        retrained.append(dict(r, format=fmt, mode=mode, seed=seed))
  # The frontier shows the first seed of each retrained format; retraining.csv has them all.
  baselines += [{k: v for k, v in r.items() if k not in ("format", "mode", "seed")} for r in retrained
                if r["mode"] != "none" and r["seed"] == 0]
  averaged = []
  for fmt in cfg["retrain_formats"]:
    for mode in ("none",) + tuple(cfg["retrain_modes"]):
      runs = [r for r in retrained if r["format"] == fmt and r["mode"] == mode]
      averaged.append(dict(format=fmt, mode=mode, runs=len(runs),
                           **{f"{c}_{stat}": float(fn([r[c] for r in runs]))
                              for c in ("certified", "certified_mean", "accuracy", "agreement")
                              for stat, fn in (("avg", np.mean), ("min", np.min), ("max", np.max))}))

  rows, layer_rows = [], []
  for target in cfg["targets"]:
    uniform_ok = [b for b in baselines if b["candidate"].startswith("uniform-") and b["certified"] <= target]
    if not uniform_ok:
      print(f"epsilon {target}: no uniform width meets it")
      continue
    width = min(uniform_ok, key=lambda b: b["bytes"])["bits"][kernels[0]]
    # Which layer's quantization the certificate pays for, at the width the search starts from, and
    # the HAWQ-style proxy for the same question.
    attr = qb.compression.attribution(params, apply, boxes, width)
    sens = qb.compression.sensitivity(params, apply, x_train[: cfg["calibration"]], width)
    total = sum(attr.values())
    for k in kernels:
      layer_rows.append(dict(target=target, layer=k, bits=width, attributed=attr[k], share=attr[k] / total,
                             sensitivity=sens[k]))
    orders = {"searched": None, "attribution-ordered": sorted(kernels, key=attr.get),
              "sensitivity-ordered": sorted(kernels, key=sens.get)}
    searched = []
    for name, order in orders.items():
      t0 = time.perf_counter()
      plan = qb.compression.search(params, apply, boxes, epsilon=target, widths=cfg["widths"], order=order,
                                   progress=False)
      r = row(target, name, plan.bits, plan.params, time.perf_counter() - t0)
      assert r["certified"] <= target, r  # re-certified from scratch
      searched.append(dict(r, meets=True, candidates=len(plan.uniform) + len(plan.steps)))
    best_uniform = min(b["bytes"] for b in uniform_ok)
    assert searched[0]["bytes"] <= best_uniform, (searched[0], best_uniform)
    searched[0]["best_uniform_bytes"] = best_uniform
    rows += searched
    rows += [dict(b, target=target, meets=b["certified"] <= target) for b in baselines]

  def show_bits(bits):
    return bits if not isinstance(bits, dict) else "/".join(str(bits[k]) for k in kernels)

  for r in rows + retrained:
    r["bits"] = show_bits(r["bits"])
  print(common.table(rows, ["target", "candidate", "bits", "bytes", "certified", "certified_mean", "accuracy",
                            "agreement", "meets",
                            "candidates", "search_seconds"],
                     title=f"digits MLP: certified max |f - f_q| over {cfg['images']} balls of radius {cfg['radius']} "
                           "(differential bounds); bits per kernel (dense_0/1/2)"))
  print()
  print(common.table(layer_rows, ["target", "layer", "bits", "attributed", "share", "sensitivity"],
                     title="per-layer attribution: certified error with only that layer quantized (share of the "
                           "sum), and the output MSE (sensitivity) of the same"))
  print()
  print(common.table(retrained, ["format", "mode", "seed", "certified", "certified_mean", "accuracy", "agreement",
                                 "search_seconds"],
                     title=f"retraining ({cfg['steps']} steps; certified = distill + {cfg['weight']} x "
                           f"{cfg['bound']} bound over training balls); certified over the test balls, re-certified"))
  print()
  print(common.table(averaged, ["format", "mode", "runs", "certified_avg", "certified_min", "certified_max",
                                "certified_mean_avg", "accuracy_avg", "agreement_avg"],
                     title="retraining over seeds: certified max over the balls (avg/min/max over runs), the mean "
                           "over the balls, accuracy and agreement (avg over runs)"))
  common.write_csv(out / "frontier.csv", rows)
  common.write_csv(out / "attribution.csv", layer_rows)
  common.write_csv(out / "retraining.csv", retrained)
  common.write_csv(out / "retraining_summary.csv", averaged)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "rows": rows,
             "attribution": layer_rows, "retraining": retrained, "retraining_summary": averaged,
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/frontier.csv, attribution.csv, retraining.csv, summary.json ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
