"""A parent's bounds met before or after a piece's own CROWN rows, on the merged network.

Branch and bound bounds pairs whose layers do not pair (low-rank or otherwise restructured copies)
and pairs without a differential rule (transformer layers) by CROWN on the merged network
(:func:`qbound.bounds.sparse.crown_bounds_sparse`). This compares
:data:`qbound.bounds.sparse.CROWN_PRIOR_AFTER_ROWS` on and off, interleaved in one process, on ACAS
Xu 1_1 against its float16 copy and its 10%-pruned copy forced through that path (the merged
network with ``paired`` False), and, beside them, the paired differential path on the same pairs.
Each row: ``qb.bounds.branch_and_bound(merged, box, outputs=[0], max_pieces=N)`` on property 1's
box, no epsilon (the maximal error itself), warm, stopped at the same piece count (``max_pieces``;
``pieces`` counts every piece bounded, strong branching's children included) so that the load does
not decide the comparison; the seconds are printed beside.

Run: ``PYTHONPATH=. python benchmarks/bench_crown_prior.py [--max-pieces 2000 4000]`` (needs
``../shared/bench``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import qbound as qb
from qbound.bounds import sparse
from qbound.bounds.bab import branch_and_bound
from qbound.merge import MergedNetwork

from bench_differing import BENCH, acas_pair
from bench_f16_gap import BOX


class Unpaired(MergedNetwork):
  """The same merged network, bounded as if its layers did not pair."""

  paired = property(lambda self: False)


def unpaired(merged: MergedNetwork) -> Unpaired:
  return Unpaired(**{field.name: getattr(merged, field.name) for field in dataclasses.fields(merged)})


def pairs():
  for name, copy in (("float16", "16bit"), ("10%-pruned", "pruned10")):
    f, fq = acas_pair(1, copy)
    yield name, qb.merge(f, fq, BOX)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--max-pieces", type=int, nargs="+", default=[2000, 4000])
  args = parser.parse_args(argv)
  if not BENCH.exists():
    print(f"{BENCH} is absent: nothing to run (the ACAS Xu networks live there).")
    return
  print(f"{'pair':<12}{'max':>6}  {'path':<28}{'upper':>11}{'lower':>11}{'ratio':>10}{'pieces':>8}{'s':>7}{'load':>6}")
  for name, merged in pairs():
    variants = [("CROWN, prior after rows", unpaired(merged), True), ("CROWN, prior before rows", unpaired(merged), False),
                ("paired differential", merged, sparse.CROWN_PRIOR_AFTER_ROWS)]
    for _, m, _ in variants[::2]:
      branch_and_bound(m, BOX, time_budget=5, outputs=[0])  # compile
    saved = sparse.CROWN_PRIOR_AFTER_ROWS
    try:
      for cap in args.max_pieces:
        for label, m, after in variants:
          sparse.CROWN_PRIOR_AFTER_ROWS = after
          t0 = time.perf_counter()
          r = branch_and_bound(m, BOX, time_budget=600, outputs=[0], target_gap=0.02, max_pieces=cap)
          print(f"{name:<12}{cap:>6}  {label:<28}{r.upper:>11.4g}{r.lower:>11.4g}{r.upper / r.lower:>10.4g}"
                f"{r.pieces_bounded:>8}{time.perf_counter() - t0:>7.1f}{os.getloadavg()[0]:>6.1f}", flush=True)
    finally:
      sparse.CROWN_PRIOR_AFTER_ROWS = saved


if __name__ == "__main__":
  main()
