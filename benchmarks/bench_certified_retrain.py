"""Does certified retraining lower the certified bound? Oscillation dampening on and off.

The 5-8-3 MLP of tests/test_certified_training.py at 3 bits (per-tensor scales, kernels only), distilled
towards f for 60 Adam steps of 32 examples, with ``weight`` x the differential-interval bound over L-inf
balls of radius 0.05 in the loss and ``dampen`` x the oscillation dampening of Nagel et al. (ICML 2022).
Per-tensor scales recalibrated on every call (max-abs, the default) or fixed at the start
(``uniform_quantizer(calibrate_on=params)``). Prints the mean over the 64 training balls of the sound certified bound (certify_batch, diff-interval)
for three training keys, and first the bound's gradient against central finite differences in f_q's
weights (the gradient is right; the straight-through estimator around it is what misleads).

  PYTHONPATH=$PWD python benchmarks/bench_certified_retrain.py
"""

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import qbound as qb  # noqa: E402
from helpers import mlp  # noqa: E402

Q3 = qb.quantize.uniform_quantizer(bits=3, where=qb.quantize.kernels_only)
KEYS = (5, 6, 7)
# (learning rate, dampen, weight, scale fixed at the start)
RUNS = [(3e-3, 0.0, 0.0, False), (3e-3, 0.0, 1.0, False), (3e-3, 10.0, 0.0, False), (3e-3, 10.0, 1.0, False),
        (1e-3, 0.0, 0.0, False), (1e-3, 0.0, 1.0, False), (1e-3, 0.0, 100.0, False),
        (1e-3, 10.0, 0.0, False), (1e-3, 10.0, 1.0, False), (1e-3, 1000.0, 100.0, False),
        (3e-3, 0.0, 1.0, True), (3e-3, 10.0, 0.0, True), (3e-3, 10.0, 1.0, True),
        (1e-3, 10.0, 0.0, True), (1e-3, 10.0, 1.0, True)]


def main():
  model = mlp((8,), 3)
  params = model.init(jax.random.key(3), jnp.zeros(5))
  x = jax.random.uniform(jax.random.key(4), (64, 5), minval=-1, maxval=1)
  teacher = jax.vmap(functools.partial(model.apply, params))(x)
  f = functools.partial(model.apply, params)
  boxes = qb.linf_ball(x, 0.05)

  q0 = Q3(params)
  bound = qb.compression.error_bound(model.apply, params, q0, x[0], key=jax.random.key(0), method="diff-interval")
  mean_bound = jax.jit(lambda q: bound(q, boxes).mean())
  grads = jax.tree_util.tree_leaves(jax.grad(mean_bound)(q0))
  leaves, treedef = jax.tree_util.tree_flatten(q0)
  rng, worst = np.random.default_rng(0), 0.0
  for i, leaf in enumerate(leaves):
    if leaf.ndim != 2:
      continue
    for _ in range(5):
      idx = tuple(int(rng.integers(0, s)) for s in leaf.shape)
      at = lambda d: float(mean_bound(treedef.unflatten(leaves[:i] + [leaf.at[idx].add(d)] + leaves[i + 1:])))
      fd = (at(1e-3) - at(-1e-3)) / 2e-3
      worst = max(worst, abs(fd - float(grads[i][idx])) / max(abs(fd), 1e-3))
  print(f"bound gradient vs finite differences (10 kernel entries): largest relative gap {worst:.3f}")

  fixed = qb.quantize.uniform_quantizer(bits=3, where=qb.quantize.kernels_only, calibrate_on=params)

  def certified(shadow, quantizer=Q3):
    fq = functools.partial(model.apply, quantizer(shadow))
    return float(jnp.mean(qb.certify_batch(f, fq, boxes, method="diff-interval", progress=False).upper))

  print(f"start (nearest rounding): {certified(params):.4f}")
  print("| scale | lr | dampen | weight | " + " | ".join(f"key {k}" for k in KEYS) + " | mean |")
  print("| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in KEYS) + " | ---: |")
  for lr, dampen, weight, fix in RUNS:
    quantizer = fixed if fix else Q3
    values = [certified(qb.compression.certified_retrain(
        model.apply, params, quantizer, (x, teacher), radius=0.05, weight=weight, optimizer=optax.adam(lr),
        steps=60, key=jax.random.key(k), batch_size=32, method="diff-interval", dampen=dampen), quantizer)
        for k in KEYS]
    print(f"| {'fixed' if fix else 'max-abs'} | {lr:g} | {dampen:g} | {weight:g} | " + " | ".join(f"{v:.4f}" for v in values)
          + f" | {np.mean(values):.4f} |", flush=True)


if __name__ == "__main__":
  argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
  main()
