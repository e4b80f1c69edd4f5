"""What branch and bound's counterexample-search rounds cost on proofs: schedules interleaved (issue 19).

ACAS Xu 1_1..1_9 against their float16 copies (``../shared/bench/nnet``, ``nnet_16bit``), property 1's
box, ``qb.certify(f, fq, box, method="bab", epsilon=0.05, outputs=[0])``, warm (one call per schedule
first). Each call runs with each schedule of :mod:`qbound.bounds.refute` in turn (so load changes
hit all of them alike):

* ``before19``: the schedule before issue 19 (first round 0.5 s from branch and bound's start, the
  share checked before a round and paid after it);
* ``default``: the module's settings (clock from the root's end; a round charged before it runs where
  a counterexample looks unlikely);
* ``no search``: without the rounds.

Per net and schedule, the call of median time, split into the batches' bounds (``bab.batch_bounds``)
and the search rounds (``WorstPieceSearch.run``), and the median over the calls. Whether the rounds
still refute what they refuted is measured separately, on the pruned pairs
(``benchmarks/bench_differing.py --search-schedule both``).

Run from the repository root (``PYTHONPATH=.`` so that this checkout's ``qbound`` is imported)::

    PYTHONPATH=. python benchmarks/bench_search_schedule.py [--calls 5]
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import bab, refute

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = pathlib.Path(os.environ.get("QBOUND_BENCH", ROOT.parent / "shared" / "bench"))
BOX = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]), jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))
SCHEDULES = {"before19": dict(FIRST_AFTER=0.5, FIRST_FROM_ROOT=False, HOPEFUL_LOWER=0.0, ENABLED=True),
             "default": {}, "no search": dict(ENABLED=False)}


def pair(i: int):
  name = f"ACASXU_run2a_1_{i}_batch_2000"
  f_apply, f_params = qb.io.load_nnet(BENCH / "nnet" / f"{name}.nnet")
  q_apply, q_params = qb.io.load_nnet(BENCH / "nnet_16bit" / f"{name}_16bit.nnet")
  return functools.partial(f_apply, f_params), functools.partial(q_apply, q_params)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--calls", type=int, default=5)
  p.add_argument("--nets", type=int, nargs="+", default=list(range(1, 10)))
  p.add_argument("--out", type=pathlib.Path, default=ROOT / "results" / "bench_search_schedule" / "acas_f16.csv")
  args = p.parse_args(argv)
  defaults = {k: getattr(refute, k) for s in SCHEDULES.values() for k in s}
  use = lambda s: [setattr(refute, k, v) for k, v in {**defaults, **s}.items()]
  spent = dict(search=0.0, rounds=0, bounds=0.0, batches=0)
  run, batch = refute.WorstPieceSearch.run, bab.batch_bounds

  def timed_run(self, *a, **k):
    t = time.perf_counter()
    out = run(self, *a, **k)
    spent["search"] += time.perf_counter() - t
    spent["rounds"] += 1
    return out

  def timed_batch(*a, **k):
    t = time.perf_counter()
    out = jax.block_until_ready(batch(*a, **k))
    spent["bounds"] += time.perf_counter() - t
    spent["batches"] += 1
    return out

  refute.WorstPieceSearch.run, bab.batch_bounds = timed_run, timed_batch
  rows = []
  print(f"{'net':<5}{'schedule':>10}{'s':>7}{'median s':>9}{'bounds s':>9}{'search s':>9}{'rounds':>7}{'batches':>8}",
        flush=True)
  try:
    for i in args.nets:
      f, fq = pair(i)
      call = lambda: qb.certify(f, fq, BOX, method="bab", epsilon=0.05, outputs=[0], time_budget=30)
      for s in SCHEDULES.values():
        use(s)
        call()  # compile and warm the caches
      calls = {name: [] for name in SCHEDULES}
      for _ in range(args.calls):
        for name, s in SCHEDULES.items():
          use(s)
          spent.update(search=0.0, rounds=0, bounds=0.0, batches=0)
          t0 = time.perf_counter()
          cert = call()
          total = time.perf_counter() - t0
          if cert.upper > 0.05:
            raise AssertionError(f"1_{i} not proved with schedule {name}: upper {cert.upper}")
          calls[name].append((total, spent["bounds"], spent["search"], spent["rounds"], spent["batches"]))
      for name, measured in calls.items():
        total, bounds, search, rounds, batches = sorted(measured)[len(measured) // 2]
        med = float(np.median([m[0] for m in measured]))
        rows.append(dict(net=f"1_{i}", schedule=name, seconds=total, median_seconds=med, bounds_s=bounds,
                         search_s=search, rounds=rounds, batches=batches))
        print(f"1_{i:<3}{name:>10}{total:>7.2f}{med:>9.2f}{bounds:>9.2f}{search:>9.2f}{rounds:>7}{batches:>8}", flush=True)
  finally:
    refute.WorstPieceSearch.run, bab.batch_bounds = run, batch
    use({})
  for name in SCHEDULES:
    mine = [r for r in rows if r["schedule"] == name]
    print(f"{name}: median over nets {np.median([r['median_seconds'] for r in mine]):.2f} s, search "
          f"{sum(r['search_s'] for r in mine):.2f} s in {sum(r['rounds'] for r in mine)} rounds (median calls)")
  args.out.parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  print(f"wrote {args.out}")
  return rows


if __name__ == "__main__":
  main()
