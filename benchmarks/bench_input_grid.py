"""The NumPy branch and bound where f_q rounds its input: splits on the rounding's ties against midpoints.

:func:`qbound.bounds.host_bab.host_branch_and_bound` alone (warm: NumPy compiles nothing), with
``host_bab.ALIGNED_SPLITS`` on (a split along a rounded input falls on the tie nearest the
midpoint, a case on each side: ``qbound.bounds.host_chain.aligned_splits``) and off (midpoints),
side by side in one process, on

* ``toy``: a 2-8-8-1 ReLU MLP whose copy rounds its input to thirds and its first hidden layer to
  eighths (the pair of ``tests/test_host_input_grid.py``), box ``[-1, 1]^2``;
* ``aqt po2``: AQT's static int8 po2 quantization of the 4-16-16-2 linen MLP of
  ``bench_quant_libraries.py`` (its input rounded to steps of 1/32 on ``[-1, 1]^4``, about 1.9e7
  cells), whose reached error is compared with the input grid's (0.07558);
* ``qwix rms static``: qwix's int8 weights and activations with static ``rms,3`` scales on the nnx
  MLP of ``bench_quant_libraries.py``.

Each with the time budget(s) given and ``target_gap=0.02``; prints bound, reached, their ratio,
pieces bounded and seconds. Needs the ``qwix`` and ``aqt`` extras for the library rows (skipped
without them).

Run: ``python benchmarks/bench_input_grid.py [--budgets 10 30] [--models toy "aqt po2" "qwix rms static"]``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import qbound as qb  # noqa: E402
from qbound.bounds import host_bab  # noqa: E402


def toy():
  rng = np.random.default_rng(1)
  ws = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32) for s in ((2, 8), (8, 8), (8, 1))]
  bs = [jnp.asarray(0.1 * rng.normal(size=s[1]), jnp.float32) for s in ((2, 8), (8, 8), (8, 1))]

  def body(x, rounded):
    h = jax.nn.relu(x @ ws[0] + bs[0])
    if rounded:
      h = jnp.round(h / 0.125) * 0.125
    return jax.nn.relu(h @ ws[1] + bs[1]) @ ws[2] + bs[2]

  f = lambda x: body((x * 2.0) / 2.0, False)  # noqa: E731
  fq = lambda x: body(jnp.round(x * 3.0) / 3.0, True)  # noqa: E731
  return f, fq, qb.Box(-jnp.ones(2), jnp.ones(2))


def library(model: str, config: str):
  from bench_quant_libraries import build

  return build(model, config)


MODELS = {"toy": toy, "aqt po2": lambda: library("linen-mlp", "aqt static int8 po2"),
          "qwix rms static": lambda: library("nnx-mlp", "qwix static rms int8")}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budgets", type=float, nargs="*", default=[10.0])
  parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
  parser.add_argument("--out", type=Path, default=Path("results/host_bab/input_grid.csv"))
  args = parser.parse_args(argv)
  rows = []
  print(f"{'model':<16}{'budget':>7}{'splits':>10}{'bound':>11}{'reached':>11}{'ratio':>8}{'pieces':>9}{'s':>7}  stopped")
  for name in args.models:
    try:
      f, fq, box = MODELS[name]()
    except ImportError as err:
      print(f"{name:<16} skipped: {err}")
      continue
    merged = qb.merge(f, fq, box)
    chain = host_bab.chain_of(merged)
    for budget in args.budgets:
      for aligned in (False, True):
        host_bab.ALIGNED_SPLITS = aligned
        res = host_bab.host_branch_and_bound(merged, box, time_budget=budget, target_gap=0.02, chain=chain)
        row = {"model": name, "budget": budget, "splits": "ties" if aligned else "midpoints", "bound": res.upper,
               "reached": res.lower, "ratio": res.upper / res.lower if res.lower > 0 else float("inf"),
               "pieces": res.pieces_bounded, "seconds": res.seconds, "stopped": res.stopped}
        rows.append(row)
        print(f"{name:<16}{budget:>7.0f}{row['splits']:>10}{res.upper:>11.5g}{res.lower:>11.5g}{row['ratio']:>8.3f}"
              f"{res.pieces_bounded:>9}{res.seconds:>7.2f}  {res.stopped}", flush=True)
  host_bab.ALIGNED_SPLITS = True
  if rows:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
      writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
