"""Quantization-aware retraining of the digits MLP: accuracy and certified error, with and without.

The digits MLP 64 -> 32 -> 32 -> 10 (ReLU; trained as ``train_digits_model.py`` does, Adam on
scikit-learn's 8x8 digits) gets ternary and 2/3/4-bit kernels (biases stay float32):

* ``ternary``: Ternary Weight Networks (Li & Liu 2016), threshold 0.7 mean|w|;
* ``ttq``: Trained Ternary Quantization (Zhu et al., ICLR 2017), threshold 0.05 max|w|, its two
  scales per layer initialised to the L2-optimal values (``init_ttq_scales``) and, when retrained,
  learned (``qbound.quantize.qat.retrain_ttq``);
* ``uniform2``/``3``/``4``: symmetric uniform, one scale per tensor.

Each is applied three ways:

* ``none``: post-training quantization of the float network f;
* ``retrain``: quantization-aware retraining on the training labels (Sung, Shin & Hwang 2016,
  "Resiliency of Deep Neural Networks under Quantization"; straight-through gradients,
  Courbariaux et al. 2015), ``qat.retrain(..., loss='cross_entropy')``, then quantize the shadow
  weights;
* ``distill``: the same retraining, but towards f's own logits on the training images
  (``loss='mse'``, data ``(x, f(x))``), i.e. the quantized copy is trained to stay close to f.

For each it reports the test accuracy and the certified maximal logit error
``max_x |f(x) - f_q(x)|_inf`` (``qbound.certify``, method auto; f is always the original float
network) over L-inf balls of radius 0.02 (clipped to [0, 1]) around the first few test images:
the largest proven upper bound and the largest error actually reached.

    python experiments/qat_digits.py           # full: about three minutes on 2 CPU cores
    python experiments/qat_digits.py --smoke   # a few seconds (interval bounds, short training)

Writes ``results.csv`` and ``summary.json`` under ``results/qat_digits/``.
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
from qbound.quantize import qat

NAME = "qat_digits"
SCHEMES = ("ternary", "ttq", "uniform2", "uniform3", "uniform4")
MODES = ("none", "retrain", "distill")

FULL = dict(epochs=60, steps=2000, batch_size=64, learning_rate=1e-3, images=5, radius=0.02, method="auto",
            schemes=SCHEMES, search=None)
SMOKE = dict(epochs=3, steps=20, batch_size=64, learning_rate=1e-3, images=1, radius=0.02, method="interval",
             schemes=("ternary", "ttq", "uniform2"), search=qb.Search(samples=256, restarts=2, steps=10))


def quantizer(scheme: str):
  """The kernels-only ``params -> params`` quantizer of a scheme (not TTQ, whose scales are learned)."""
  if scheme == "ternary":
    return qb.quantize.ternary_quantizer(where=qb.quantize.kernels_only)
  return qb.quantize.uniform_quantizer(bits=int(scheme.removeprefix("uniform")), where=qb.quantize.kernels_only)


def quantized_variables(scheme, mode, apply, variables, data, cfg, key):
  """The quantized variables of one (scheme, mode), and the seconds spent retraining."""
  x_train, y_train = data
  if mode == "none":
    if scheme == "ttq":
      return qb.quantize.trained_ternary(variables, qb.quantize.init_ttq_scales(variables)), 0.0
    return quantizer(scheme)(variables), 0.0
  targets = y_train if mode == "retrain" else jax.vmap(functools.partial(apply, variables))(x_train)
  kwargs = dict(optimizer=optax.adam(cfg["learning_rate"]), steps=cfg["steps"], key=key,
                batch_size=cfg["batch_size"], loss="cross_entropy" if mode == "retrain" else "mse")
  start = time.perf_counter()
  if scheme == "ttq":
    shadow, scales = qat.retrain_ttq(apply, variables, (x_train, targets), **kwargs)
    out = qb.quantize.trained_ternary(shadow, scales)
  else:
    out = quantizer(scheme)(qat.retrain(apply, variables, quantizer(scheme), (x_train, targets), **kwargs))
  return common.block(out), time.perf_counter() - start


def main(argv=None):
  args = common.parser(NAME, __doc__).parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  key = jax.random.key(args.seed)
  k_model, k_qat, k_cert = jax.random.split(key, 3)

  x_train, y_train, x_test, y_test = common.digits()
  apply, variables = common.train_mlp(k_model, (32, 32), x_train, y_train, epochs=cfg["epochs"])
  f = functools.partial(apply, variables)
  float_acc = common.accuracy(apply, variables, x_test, y_test)
  boxes = [common.pixel_box(x, cfg["radius"]) for x in x_test[: cfg["images"]]]
  data = (jnp.asarray(x_train), jnp.asarray(y_train))

  rows = [dict(scheme="float32", mode="-", acc=float_acc, upper_max=0.0, lower_max=0.0)]
  for si, scheme in enumerate(cfg["schemes"]):
    for mi, mode in enumerate(MODES):
      qvars, qat_s = quantized_variables(scheme, mode, apply, variables, data, cfg,
                                         jax.random.fold_in(k_qat, 10 * si + mi))
      fq = functools.partial(apply, qvars)
      certs = common.certify_boxes(f, fq, boxes, k_cert, method=cfg["method"], search=cfg["search"])
      uppers, lowers = [c.upper for c in certs], [c.lower for c in certs]
      rows.append(dict(scheme=scheme, mode=mode, acc=common.accuracy(apply, qvars, x_test, y_test),
                       upper_max=float(np.max(uppers)), lower_max=float(np.max(lowers)),
                       upper_mean=float(np.mean(uppers)), lower_mean=float(np.mean(lowers)),
                       method="/".join(sorted({c.method for c in certs})), qat_seconds=qat_s,
                       certify_seconds=float(np.sum([c.seconds for c in certs]))))
  common.check_certificates(rows, lower="lower_max", upper="upper_max")

  # The claim this experiment backs: retraining raises accuracy, distilling lowers the certified error.
  findings = []
  for scheme in cfg["schemes"]:
    by_mode = {r["mode"]: r for r in rows if r["scheme"] == scheme}
    none, retrain, distill = by_mode["none"], by_mode["retrain"], by_mode["distill"]
    findings.append(dict(
        scheme=scheme, acc_gain_retrain=retrain["acc"] - none["acc"], acc_gain_distill=distill["acc"] - none["acc"],
        upper_ratio_distill=distill["upper_max"] / none["upper_max"],
        upper_ratio_retrain=retrain["upper_max"] / none["upper_max"]))

  title = (f"digits MLP 64-32-32-10, kernels quantized (biases float32): test accuracy ({len(x_test)} images) and "
           f"certified max |f - f_q|_inf over L-inf balls of radius {cfg['radius']} around {cfg['images']} test "
           f"image(s), method {cfg['method']} (f = the float network)")
  print(common.table(rows, ["scheme", "mode", "acc", "upper_max", "lower_max", "method", "qat_seconds"], title=title))
  print()
  print(common.table(findings, ["scheme", "acc_gain_retrain", "acc_gain_distill", "upper_ratio_retrain",
                                "upper_ratio_distill"],
                     title="effect of retraining (accuracy gain in points of 1; upper ratio = retrained / none)"))
  common.write_csv(out / "results.csv", rows)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed,
             "config": {k: v for k, v in cfg.items() if k != "search"}, "float_accuracy": float_acc,
             "rows": rows, "findings": findings, "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/results.csv, summary.json ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
