"""Dynamic activation scales, form by form, in one process: differential bound, branch and bound, search.

For the 4-16-16-2 linen MLP of ``bench_quant_libraries.py`` and each dynamic form (qwix per-tensor
absmax, the baseline; qwix asymmetric ``minmax``; qwix per-token on a batch of 3 tokens; AQT's
dynamic calibration), this measures ``certify(method="diff")`` (the first call, with its
compilations, and the median of 3 warm calls), a warm ``certify(method="bab", time_budget=30)``,
and an independent search on the library's own function: 20,000 uniform samples, then four rounds
of 10,000 points around the best 100 at shrinking radii. The script fails if that search reaches
more than a proven bound.

Run from the repository root (needs the ``qwix`` and ``aqt`` extras)::

    python benchmarks/bench_dynamic_forms.py            # about 5 minutes on 2 cores

Writes ``results/quant_libraries/dynamic_forms_diff.csv``.
"""

import csv
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import qbound as qb

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_quant_libraries as B  # noqa: E402

CONFIGS = ("qwix dynamic int8", "qwix dynamic minmax int8", "qwix dynamic per-token int8", "aqt dynamic int8")


def independent(f, fq, box: qb.Box) -> float:
  err = jax.jit(jax.vmap(lambda x: jnp.max(jnp.abs(f(x) - fq(x)))))
  xs = jax.random.uniform(jax.random.key(11), (20000, *box.shape), minval=box.lower, maxval=box.upper)
  best = float(jnp.max(err(xs)))
  for r in (0.2, 0.05, 0.01, 0.002):
    top = xs[jnp.argsort(-err(xs))[:100]]
    noise = jax.random.uniform(jax.random.key(int(1e4 * r)), (100, 100, *box.shape), minval=-r, maxval=r)
    xs = jnp.clip((top[:, None] + noise * (box.upper - box.lower)).reshape(-1, *box.shape), box.lower, box.upper)
    best = max(best, float(jnp.max(err(xs))))
  return best


def run(config: str) -> dict:
  f, fq, box = B.build("linen-mlp", config)
  start = time.perf_counter()
  cert = qb.certify(f, fq, box, method="diff")
  first = time.perf_counter() - start
  warm = []
  for _ in range(3):
    start = time.perf_counter()
    cert = qb.certify(f, fq, box, method="diff")
    warm.append(time.perf_counter() - start)
  start = time.perf_counter()
  bab = qb.certify(f, fq, box, method="bab", time_budget=30)
  bab_s = time.perf_counter() - start
  reached = independent(f, fq, box)
  if reached > min(cert.upper, bab.upper) * (1 + 1e-5):
    raise AssertionError(f"{config}: an independent search reached {reached} > {min(cert.upper, bab.upper)}")
  return dict(config=config, diff_bound=cert.upper, diff_first_s=first, diff_warm_s=statistics.median(warm),
              bab30_bound=bab.upper, bab30_reached=bab.lower, bab30_s=bab_s, independent=reached,
              ratio_bab=bab.upper / max(bab.lower, reached))


def main(argv=None):
  import argparse

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("configs", nargs="*", help=f"dynamic forms to run (default: all of {', '.join(CONFIGS)})")
  configs = parser.parse_args(argv if argv is not None else sys.argv[1:]).configs or CONFIGS
  rows = []
  for config in configs:
    rows.append(run(config))
    print(rows[-1], flush=True)
  out = pathlib.Path("results/quant_libraries/dynamic_forms_diff.csv")
  out.parent.mkdir(parents=True, exist_ok=True)
  with out.open("w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print(f"wrote {out}")
  return rows


if __name__ == "__main__":
  main()
