"""Certified top-1 agreement of the digits MLP with its 8-, 4-, 2-bit and ternary copies, beside the measured one.

The bundled digits MLP 64 -> 32 -> 32 -> 10 (ReLU; ``qbound/data/digits_mlp.nnet``, trained by
``train_digits_model.py``) against copies with their kernels quantized (biases stay float32):
uniform symmetric per-tensor integers at 8, 4 and 2 bits, and ternary (TWN, Li & Liu 2016). For each
copy and each radius (0.01 and 0.02, pixels in [0, 1]):

* ``agree_all``: the measured agreement, ``argmax f(x) = argmax f_q(x)`` on all test images of the
  model's split (449 images; the bundled ``digits_test.npz`` holds its first 20);
* ``agree_centres``: the same on the first ``N`` test images, the centres of the balls;
  ``agree_box_centres`` is :class:`qbound.props.Agreement`'s measured agreement, taken at the
  centres of the *clipped* boxes (a pixel at 0 moves to ``r / 2``), which can differ for a copy
  that is close to a decision boundary everywhere (the 2-bit one);
* ``certified`` / ``counterexample`` / ``unknown``: shares of the ``N`` L-inf balls (clipped to
  [0, 1]) on which :func:`qbound.props.certified_agreement` proves top-1 equivalence (VeryDiff's
  property: the two networks pick the same class at every point of the ball), finds an input of the
  ball where they differ, or runs out of its per-box time budget;
* ``cex_f_changed``: share of the balls with a counterexample at which f's own class differs from
  its class at the image (the ball crosses f's decision boundary, and the copy's boundary does not
  follow it exactly); the other counterexamples are where the copy alone changes its mind;
* ``median_seconds`` per box and ``seconds`` for all ``N`` boxes (compilation is done once before,
  on a warm-up box, and reported apart as ``warmup_seconds``).

``certified <= agree_centres`` always (a proved ball's centre agrees), and ``agree_centres - certified``
is the measured agreement that does not survive a perturbation of that radius or is not proven
within the budget. Every counterexample is checked again here: inside its box, and both networks'
outputs there (float32, as they run) pick different classes.

    python experiments/top1_agreement.py           # full: 100 images, 2 s per box; ~3 min on 2 CPU cores
    python experiments/top1_agreement.py --smoke   # 3 images, 0.5 s per box: a few seconds after compiling

Writes ``results.csv`` (one row per copy and radius), ``boxes.csv`` (one row per box), ``summary.json``
and ``top1_agreement.png`` under ``results/top1_agreement/``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
import qbound as qb
from qbound.demo import load_digits_model
from qbound.quantize.policy import kernels_only

NAME = "top1_agreement"
qz = qb.quantize
COPIES = {
    "uniform8": qz.uniform_quantizer(8, where=kernels_only),
    "uniform4": qz.uniform_quantizer(4, where=kernels_only),
    "uniform2": qz.uniform_quantizer(2, where=kernels_only),
    "ternary": qz.ternary_quantizer(where=kernels_only),
}
RADII = (0.01, 0.02)

FULL = dict(images=100, time_budget=2.0, warmup_budget=120.0)
SMOKE = dict(images=3, time_budget=0.5, warmup_budget=120.0)
COLUMNS = ["copy", "radius", "acc", "agree_all", "agree_centres", "certified", "counterexample", "unknown",
           "cex_f_changed", "median_seconds", "seconds"]


def predict(f, x) -> np.ndarray:
  """``argmax f`` over a batch of inputs."""
  return np.asarray(jnp.argmax(jax.jit(jax.vmap(f))(jnp.asarray(x)), axis=-1))


def check_verdicts(agreement: qb.props.Agreement, boxes: qb.Box, image_agrees, f, fq, what: str) -> None:
  """A proved box's image and centre agree; every counterexample lies in its box and really separates
  the classes."""
  prop = qb.props.Top1()
  for i, (v, same, same_image) in enumerate(zip(agreement.verdicts, agreement.measured, image_agrees)):
    assert v.status in ("proved", "counterexample", "unknown"), (what, i, v.status)
    if v.status == "proved":
      assert same and same_image, f"{what}, box {i}: proved, but the networks disagree at its image or centre"
    if v.status != "counterexample":
      continue
    x = np.asarray(v.counterexample, np.float32)
    lo, hi = np.asarray(boxes.lower[i]), np.asarray(boxes.upper[i])
    assert np.all(lo <= x) and np.all(x <= hi), f"{what}, box {i}: counterexample outside its box"
    yf, yq = np.asarray(f(jnp.asarray(x)), np.float64), np.asarray(fq(jnp.asarray(x)), np.float64)
    assert prop.violated(yf, yq), f"{what}, box {i}: no disagreement at the counterexample ({yf}, {yq})"
    assert np.argmax(yf) != np.argmax(yq), (what, i)
    assert prop.violated(v.f_output, v.fq_output), f"{what}, box {i}: the verdict's float64 outputs agree"


def plot(rows, path, title: str) -> None:
  plt = common.pyplot()
  copies = list(dict.fromkeys(r["copy"] for r in rows))
  fig, axes = plt.subplots(1, len(RADII), figsize=(11, 3.8), sharey=True, squeeze=False)
  x = np.arange(len(copies))
  for ax, radius in zip(axes[0], RADII):
    sel = {r["copy"]: r for r in rows if r["radius"] == radius}
    certified = [sel[c]["certified"] for c in copies]
    ax.bar(x - 0.2, [sel[c]["agree_centres"] for c in copies], 0.4, label="measured (centres)", color="C0")
    ax.bar(x + 0.2, certified, 0.4, label="certified (whole ball)", color="C2")
    ax.bar(x + 0.2, [sel[c]["counterexample"] for c in copies], 0.4, bottom=certified, label="counterexample in ball",
           color="C3", hatch="//", alpha=0.5)
    ax.set_xticks(x, copies)
    ax.set_title(f"radius {radius}")
    ax.set_ylim(0, 1.22)
    ax.grid(True, axis="y", alpha=0.3)
  axes[0][0].set_ylabel("share of boxes")
  axes[0][0].legend(fontsize=7, loc="upper left", ncol=3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--images", type=int, default=None, help="boxes per copy and radius (default 100; 3 with --smoke)")
  p.add_argument("--time-budget", type=float, default=None, help="seconds per box (default 2; 0.5 with --smoke)")
  args = p.parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL, images=args.images, time_budget=args.time_budget)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()

  apply, params = load_digits_model()
  _, _, x_test, y_test = common.digits()
  f = functools.partial(apply, params)
  n = min(cfg["images"], len(x_test))
  centres = jnp.asarray(x_test[:n], jnp.float32)
  predicted = predict(f, x_test)
  float_acc = float(np.mean(predicted == y_test))
  copies = {name: functools.partial(apply, common.block(transform(params))) for name, transform in COPIES.items()}

  # Compilation, once, outside the per-box budgets (which include compiling): the programs compiled for
  # this input shape serve every copy and radius, so the budgets then measure deciding alone.
  warm = qb.linf_ball(centres[0], RADII[0], clip_lower=0.0, clip_upper=1.0)
  warmup = qb.props.verify(f, copies["uniform8"], warm, qb.props.Top1(), time_budget=cfg["warmup_budget"],
                           key=jax.random.key(args.seed), progress=False)
  print(f"warm-up (compiling): {warmup}")

  rows, box_rows, key = [], [], jax.random.key(args.seed)
  for ci, (name, fq) in enumerate(copies.items()):
    predicted_q = predict(fq, x_test)
    image_agrees = predicted[:n] == predicted_q[:n]
    base = dict(copy=name, acc=float(np.mean(predicted_q == y_test)),
                agree_all=float(np.mean(predicted == predicted_q)))
    for ri, radius in enumerate(RADII):
      boxes = qb.linf_ball(centres, radius, clip_lower=0.0, clip_upper=1.0)
      what = f"{name}, radius {radius}"
      agreement = qb.props.certified_agreement(f, fq, boxes, time_budget=cfg["time_budget"],
                                               key=jax.random.fold_in(key, 10 * ci + ri), progress=None)
      check_verdicts(agreement, boxes, image_agrees, f, fq, what)
      status = [v.status for v in agreement.verdicts]
      seconds = [v.seconds for v in agreement.verdicts]
      counts = {s: status.count(s) for s in ("proved", "counterexample", "unknown")}
      cex_class = [int(np.argmax(v.f_output)) if v.status == "counterexample" else None for v in agreement.verdicts]
      f_changed = [c is not None and c != int(predicted[i]) for i, c in enumerate(cex_class)]
      row = dict(base, radius=radius, boxes=n, agree_centres=float(np.mean(image_agrees)),
                 agree_box_centres=agreement.measured_agreement, certified=counts["proved"] / n,
                 counterexample=counts["counterexample"] / n, unknown=counts["unknown"] / n,
                 cex_f_changed=float(np.mean(f_changed)),
                 median_seconds=float(np.median(seconds)), max_seconds=float(np.max(seconds)),
                 seconds=agreement.seconds)
      assert row["certified"] <= min(row["agree_centres"], row["agree_box_centres"]), row
      rows.append(row)
      for i, v in enumerate(agreement.verdicts):
        box_rows.append(dict(copy=name, radius=radius, image=i, label=int(y_test[i]),
                             centre_agrees=bool(image_agrees[i]), box_centre_agrees=bool(agreement.measured[i]),
                             status=v.status, f_class=int(predicted[i]), fq_class=int(predicted_q[i]),
                             cex_f_class=cex_class[i],
                             cex_fq_class=int(np.argmax(v.fq_output)) if v.status == "counterexample" else None,
                             seconds=v.seconds, pieces_bounded=v.pieces_bounded,
                             pieces_left=v.pieces_left, closed_fraction=v.closed_fraction, stopped=v.stopped))
      print(f"  {what}: {n} boxes, agreement at the images {row['agree_centres']:.0%}, certified "
            f"{row['certified']:.0%}, counterexample {row['counterexample']:.0%}, unknown {row['unknown']:.0%} "
            f"({row['seconds']:.1f} s)", flush=True)

  title = (f"bundled digits MLP 64-32-32-10 (test accuracy {float_acc:.4f}) vs kernel-quantized copies: top-1 "
           f"agreement measured on all {len(x_test)} test images (agree_all) and at {n} centres, and certified "
           f"on the L-inf balls around them ({cfg['time_budget']:g} s per box)")
  print(common.table(rows, COLUMNS, title=title))
  common.write_csv(out / "results.csv", rows)
  common.write_csv(out / "boxes.csv", box_rows)
  plot(rows, out / "top1_agreement.png", f"digits MLP: top-1 agreement with its quantized copies over {n} L-inf balls "
       f"({cfg['time_budget']:g} s per box)")
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg, "images": n,
             "test_images": len(x_test), "float_acc": float_acc, "radii": list(RADII), "copies": list(COPIES),
             "property": qb.props.Top1().describe(), "rows": rows,
             "warmup": {"status": warmup.status, "seconds": warmup.seconds},
             "warmup_seconds": warmup.seconds, "boxes_seconds": float(sum(r["seconds"] for r in rows)),
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"warm-up {warmup.seconds:.1f} s, boxes {summary['boxes_seconds']:.1f} s; wrote {out}/results.csv, "
        f"boxes.csv, summary.json, top1_agreement.png ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
