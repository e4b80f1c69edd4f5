"""First calls of certify(method="auto") on the exactness nets, with and without host branch and bound.

``bench_tight.py --only exact`` runs 12 small random ReLU pairs one after another in one process;
its first calls pay for compiling branch and bound's ~80 XLA programs. This script runs the same
nets and calls (``time_budget=4.5, target_gap=0.02``; a first call per net, then a second) in fresh
processes, alternating two variants so that both see the same load:

* ``compiled``: ``qbound.certify.HOST_HEAD_START = None`` (the compiled branch and bound alone, as
  before);
* ``host``: the default, :mod:`qbound.bounds.host_bab` first (NumPy, nothing to compile).

JAX's persistent cache is off in both (``QBOUND_JAX_CACHE=0``): every process compiles what it
uses. ``upper/exact <=`` divides by the lower end of the exact value's bracket (HiGHS and a long
branch and bound, 30 s each, docs/results/exactness.md), raised to the largest error reached in the run (the
exact value is at least that), so it overstates the ratio, if anything; a certificate whose upper
bound fell below an error reached, or below the bracket's lower end minus its width, would be a
soundness bug, and is flagged.

A variant may end in ``@DIR``: its processes import qbound from ``DIR`` (``PYTHONPATH=DIR``, another
checkout, e.g. ``host@/work/main``), so that two versions alternate under the same load.

Run: ``python benchmarks/bench_host_bab.py [--rounds 1] [--nets 0,1,...] [--variants host@DIR,host]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fresh_process import child_rows

# The exact value's bracket per net (docs/results/exactness.md, "Exact values on small nets").
EXACT = [(0.571615, 0.571630), (0.039330, 0.039340), (0.065047, 0.065100), (0.055712, 0.055728),
         (0.461997, 0.462034), (0.010876, 0.010884), (0.092368, 0.092401), (0.515338, 0.515370),
         (0.032059, 0.032090), (0.010961, 0.010970), (0.058134, 0.058170), (0.059969, 0.060004)]
HERE = Path(__file__).resolve().parent


def child(variant: str, nets: list[int], budget: float) -> None:
  """One process: every net's first and second call, one JSON line each."""
  sys.path.insert(0, str(HERE))
  import importlib

  import qbound as qb
  from bench_tight import exact_net

  certify_module = importlib.import_module("qbound.certify")  # the module: qbound.certify is the function
  if variant == "compiled":
    certify_module.HOST_HEAD_START = None
  elif variant.startswith("host:"):  # another head start, e.g. host:0.6
    certify_module.HOST_HEAD_START = float(variant.split(":")[1])
  for i in nets:
    f, fq, box, widths, bits = exact_net(i)
    for call in ("first", "again"):
      cpu = time.process_time()
      cert = qb.certify(f, fq, box, method="auto", time_budget=budget, target_gap=0.02)
      print(json.dumps(dict(net=i, name="-".join(map(str, widths)), bits=bits, call=call, upper=cert.upper,
                            lower=cert.lower, method=cert.method, seconds=cert.seconds,
                            cpu=time.process_time() - cpu)), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=1, help="pairs of processes (compiled, host), alternating")
  parser.add_argument("--nets", default=",".join(map(str, range(12))))
  parser.add_argument("--budget", type=float, default=4.5)
  parser.add_argument("--variants", default="compiled,host",
                      help="comma-separated: compiled, host (the default head start) or host:SHARE, each "
                           "optionally @DIR (qbound imported from DIR)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  nets = [int(n) for n in args.nets.split(",")]
  if args.child:
    child(args.child, nets, args.budget)
    return
  variants = args.variants.split(",")
  env = dict(os.environ, QBOUND_JAX_CACHE="0")
  results: dict = {}
  for r in range(args.rounds):
    for variant in variants:
      load = os.getloadavg()[0]
      name, _, checkout = variant.partition("@")
      results[(variant, r)] = child_rows(__file__, [name, "--nets", args.nets, "--budget", str(args.budget)],
                                         checkout=checkout, env=env)
      print(f"round {r} {variant}: done (load average {load:.1f} at its start, {os.getloadavg()[0]:.1f} at its end)",
            flush=True)
  print(f"\n{'net':<14}{'bits':>5}  " + "  ".join(f"{v + ' r' + str(r):>41}" for r in range(args.rounds)
                                              for v in variants))
  print(f"{'':<19}  " + "  ".join(f"{'upper/exact, s first (cpu) | s again':>41}"
                                  for _ in range(len(variants) * args.rounds)))
  ok = {key: 0 for key in results}
  for k, i in enumerate(nets):
    cells = []
    for r in range(args.rounds):
      for variant in variants:
        first, again = results[(variant, r)][2 * k], results[(variant, r)][2 * k + 1]
        # The bracket's lower end, raised to an error reached in this run (the exact value is at least that).
        lo, hi = EXACT[i]
        lo = max(lo, first["lower"], again["lower"])
        ratio = first["upper"] / lo
        floor = max(EXACT[i][0] - (hi - EXACT[i][0]), first["lower"], again["lower"])
        flag = " UNSOUND" if min(first["upper"], again["upper"]) < floor else ""
        good = ratio <= 1.02 and first["seconds"] < 5
        ok[(variant, r)] += good
        cells.append(f"{ratio:>9.4f} {first['method']:>9} {first['seconds']:5.2f} ({first['cpu']:4.1f}) | "
                     f"{again['seconds']:5.2f}{flag}")
    print(f"{first['name']:<14}{first['bits']:>5}  " + "  ".join(f"{c:>41}" for c in cells))
  print("within 1.02 in under 5 s on the first call: "
        + ", ".join(f"{v} r{r}: {ok[(v, r)]}/{len(nets)}" for (v, r) in ok))


if __name__ == "__main__":
  main()
