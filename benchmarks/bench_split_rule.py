"""``branch_and_bound``'s split rules against each other: ``SPLIT_RULE = "bound"`` (the worst output's
bound coefficients times the width) and ``"gradient"`` (an interval gradient of ``f_j - f_q,j`` over
the piece times the width, NeuroDiff's rule), through ``qb.certify(method="bab")``.

ACAS Xu 1_1..1_9 against their float16 copies (``../shared/bench``), property 1's box, epsilon 0.05,
output 0 and all five outputs: a first call of each rule (compiling), then ``--reps`` warm calls of
each, alternating in one process; median seconds and the pieces ``branch_and_bound`` bounded.

``--copy pruned10 --epsilon 0.5 --budget 10``: the same against the 10%-pruned, retrained copies
(``benchmarks/data/acas_pruned``, see bench_differing.py), where strong branching tries a single
dimension (``DIFFERING_CANDIDATES``), so the split rule alone chooses the split.

Run: ``python benchmarks/bench_split_rule.py --reps 3`` (prints one JSON line per net and outputs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import qbound as qb
from qbound.bounds import bab

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_forward_bab import PROPERTY_1  # noqa: E402
from bench_differing import acas_pair  # noqa: E402
from bench_tight import _pairs  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--nets", default="1,2,3,4,5,6,7,8,9")
  parser.add_argument("--outputs", default="0,all")
  parser.add_argument("--copy", default="16bit", help="16bit, or pruned10/pruned5/pruned30 (bench_differing.py)")
  parser.add_argument("--epsilon", type=float, default=0.05)
  parser.add_argument("--budget", type=float, default=None, help="certify's time_budget (default: its own)")
  args = parser.parse_args(argv)
  pieces = []
  real = bab.branch_and_bound  # certify imports it from the module when it runs

  def counting(*a, **kw):
    res = real(*a, **kw)
    pieces.append(res.pieces_bounded)
    return res

  bab.branch_and_bound = counting
  for outputs in ([0] if o == "0" else None for o in args.outputs.split(",")):
    for k in args.nets.split(","):
      f, fq = (_pairs(f"ACASXU_run2a_1_{k}_batch_2000") if args.copy == "16bit"
               else acas_pair(int(k), args.copy))
      row = {"net": f"1_{k}", "outputs": "0" if outputs else "all"}
      times = {"bound": [], "gradient": []}
      for rep in range(args.reps + 1):
        for rule in times:
          bab.SPLIT_RULE = rule
          pieces.clear()
          start = time.perf_counter()
          budget = {} if args.budget is None else {"time_budget": args.budget}
          res = qb.certify(f, fq, PROPERTY_1, method="bab", epsilon=args.epsilon, outputs=outputs, **budget)
          seconds = time.perf_counter() - start
          if rep:
            times[rule].append(seconds)
          row[f"{rule}_pieces"] = sum(pieces)
          row[f"{rule}_decided"] = ("proved" if res.upper <= args.epsilon else
                                    "refuted" if res.lower > args.epsilon else "open")
          row[f"{rule}_upper"] = round(float(res.upper), 4)
      for rule, t in times.items():
        row[f"{rule}_s"] = round(float(np.median(t)), 3)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
