"""How much CPU the NumPy search gets inside a first ``certify`` call, per checkout.

``certify(method="auto", time_budget=4.5, target_gap=0.02)`` on one exactness net (default
5-12-16-16-2), first and second call in a fresh process with JAX's persistent cache off, the
checkouts alternating. Per call: upper/lower, seconds, the process's CPU seconds, and the NumPy
search thread's own CPU seconds and pieces (``time.thread_time`` around
``host_branch_and_bound``): what the rest of the call (compilations, other threads) took from it,
and what the load left it.

Run: ``python benchmarks/bench_host_first_call.py --checkouts /work/main,. [--net 2] [--rounds 2]``.
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


def child(net: int) -> None:
  sys.path.insert(0, str(HERE))
  import qbound as qb
  from bench_tight import exact_net
  from qbound.bounds import host_bab

  real, searches = host_bab.host_branch_and_bound, []

  def timed(*args, **kwargs):  # certify imports it from the module when its thread starts
    cpu = time.thread_time()
    res = real(*args, **kwargs)
    searches.append(dict(search_cpu=time.thread_time() - cpu, pieces=res.pieces_bounded, stopped=res.stopped))
    return res

  host_bab.host_branch_and_bound = timed
  f, fq, box, widths, bits = exact_net(net)
  for call in ("first", "again"):
    cpu = time.process_time()
    cert = qb.certify(f, fq, box, method="auto", time_budget=4.5, target_gap=0.02)
    row = dict(call=call, name="-".join(map(str, widths)), ratio=cert.upper / cert.lower, seconds=cert.seconds,
               cpu=time.process_time() - cpu)
    time.sleep(0.5)  # the search thread stops at the call's deadline, a batch later
    row.update(searches.pop() if searches else {})
    print(json.dumps(row), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--checkouts", default=".")
  parser.add_argument("--net", type=int, default=2)
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args.net)
    return
  print("| checkout | round | load | call | upper/lower | s | process CPU s | search CPU s | pieces |")
  print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
  for r in range(args.rounds):
    for c in args.checkouts.split(","):
      c = str(Path(c).resolve())
      load = os.getloadavg()[0]
      for row in child_rows(__file__, ["--net", str(args.net)], checkout=c,
                            env=dict(os.environ, QBOUND_JAX_CACHE="0")):
        print(f"| {Path(c).name} | {r} | {load:.1f} | {row['call']} | {row['ratio']:.4f} | {row['seconds']:.2f} | "
              f"{row['cpu']:.2f} | {row.get('search_cpu', float('nan')):.2f} | {row.get('pieces', 0):,} |", flush=True)


if __name__ == "__main__":
  main()
