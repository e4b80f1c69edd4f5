"""The NumPy branch and bound alone on the exactness nets: CPU seconds and pieces to the gap.

``bench_host_bab.py`` measures whole ``certify`` calls, whose time on a shared machine is mostly the
load; this measures the search itself (:func:`qbound.bounds.host_bab.host_branch_and_bound`,
``target_gap=0.02``, ``time_budget=15``) on the 12 nets of ``bench_tight.py --only exact``, in CPU
seconds of a fresh process per checkout, the checkouts alternating so that they see the same load.
The pieces bounded are the same whatever the speed (the tree depends only on the bounds, the split
rule and the reached error): a change in them is a change in the bounds.

Run: ``python benchmarks/bench_host_search.py --checkouts /work/main,. [--rounds 2] [--nets 0,2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fresh_process import child_rows

HERE = Path(__file__).resolve().parent


def child(nets: list[int], budget: float) -> None:
  sys.path.insert(0, str(HERE))
  import qbound as qb
  from bench_tight import exact_net
  from qbound.bounds import host_bab

  for i in nets:
    f, fq, box, widths, bits = exact_net(i)
    merged = qb.merge(f, fq, box)
    cpu = time.process_time()
    res = host_bab.host_branch_and_bound(merged, box, time_budget=budget, target_gap=0.02)
    print(json.dumps(dict(net=i, name="-".join(map(str, widths)), bits=bits, cpu=time.process_time() - cpu,
                          pieces=res.pieces_bounded, stopped=res.stopped, ratio=res.upper / res.lower)), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--checkouts", default=".", help="comma-separated directories qbound is imported from")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--nets", default=",".join(map(str, range(12))))
  parser.add_argument("--budget", type=float, default=15.0)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  nets = [int(n) for n in args.nets.split(",")]
  if args.child:
    child(nets, args.budget)
    return
  checkouts = [str(Path(c).resolve()) for c in args.checkouts.split(",")]
  runs = {}
  for r in range(args.rounds):
    for c in checkouts:
      load = os.getloadavg()[0]
      runs[(c, r)] = child_rows(__file__, ["--nets", args.nets, "--budget", str(args.budget)], checkout=c)
      print(f"round {r} {c}: load average {load:.1f} at its start, {os.getloadavg()[0]:.1f} at its end", flush=True)
  keys = list(runs)
  print("\n| net | bits | " + " | ".join(f"{Path(c).name} r{r}: pieces, CPU s" for c, r in keys) + " |")
  print("| --- | ---: |" + " ---: |" * len(keys))
  for k, i in enumerate(nets):
    rows = [runs[key][k] for key in keys]
    cells = [f"{row['pieces']:,} {row['cpu']:.2f}" + ("" if row["stopped"] == "gap" else f" ({row['stopped']}, "
                                                                                         f"{row['ratio']:.3f})")
             for row in rows]
    print(f"| {rows[0]['name']} | {rows[0]['bits']} | " + " | ".join(cells) + " |")
  print("| all | | " + " | ".join(f"{sum(row['cpu'] for row in runs[key]):.2f}" for key in keys) + " |")


if __name__ == "__main__":
  main()
