"""Run by tests/test_sharding.py in a subprocess, once per device count: certify a batch of boxes and
run branch and bound, and print what came out (bounds, witnesses, where the work ran) as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_check.py [--method crown]

The flag must be set before jax is imported, hence a fresh process per device count.
"""

import argparse
import json
import sys

import jax
import jax.numpy as jnp

import qbound as qb


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--method", default="crown")
  p.add_argument("--boxes", type=int, default=64)
  p.add_argument("--no-bab", action="store_true")
  p.add_argument("--bab-paired", action="store_true",
                 help="branch and bound on f and its 4-bit copy (differential bounds; slower to compile) "
                      "instead of f and a smaller net (CROWN on the merged net)")
  args = p.parse_args(argv)

  import helpers as H  # tests/ is this script's directory, so it is on sys.path

  f, fq, _, _ = H.random_pair(0, H.SHAPES[0], bits=4)  # 2 -> 8 -> 8 -> 2
  centres = jax.random.uniform(jax.random.key(1), (args.boxes, 2), minval=-1, maxval=1)
  boxes = qb.linf_ball(centres, 0.25)
  search = H.search()
  batch = qb.certify_batch(f, fq, boxes, method=args.method, key=jax.random.key(2), search=search, progress=False)
  out = {"devices": len(jax.devices()), "upper": batch.upper.tolist(), "lower": batch.lower.tolist(),
         "witness": batch.witness.tolist(), "layout": batch.layout}
  if not args.no_bab:
    box = qb.Box(-jnp.ones(2), jnp.ones(2))
    other = fq if args.bab_paired else H.random_pair(1, (2, (6, 6), 2), bits=4)[0]
    merged = qb.merge(f, other, box)
    v, x = qb.maximize_error(merged, box, key=jax.random.key(5), search=search)
    out["sampling"] = {"value": v, "witness": x.tolist()}
    # Stops at a gap (not a time limit), so both runs do the same work.
    res = qb.bounds.branch_and_bound(merged, box, time_budget=600, target_gap=0.2 if args.bab_paired else 0.01,
                                     initial_lower=v, initial_witness=x)
    out["bab"] = {"upper": res.upper, "lower": res.lower, "pieces": res.pieces_bounded, "stopped": res.stopped,
                  "layout": {str(k): v for k, v in res.layout.items()}}
  json.dump(out, sys.stdout)


if __name__ == "__main__":
  main()
