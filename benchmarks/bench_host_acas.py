"""The NumPy branch and bound (:mod:`qbound.bounds.host_bab`) at ACAS Xu's size, against the compiled one.

ACAS Xu 1_1..1_9 against their float16 copies, property 1, epsilon 0.05, output 0 (issue 19): per
net, the compiled :func:`qbound.bounds.bab.branch_and_bound` (warm: compiled by a first call before
it is timed) and :func:`qbound.bounds.host_bab.host_branch_and_bound` with its size gate lifted
(``MAX_NEURONS``: 6 x 50 ReLUs in f and in f_q are 600), with and without the backward pass for
the hidden layers' unstable neurons (``host_bounds.HIDDEN_BACKWARD``), interleaved per net, each
with the same time budget. Pieces are the pieces bounded (strong branching bounds two candidate
splits of each parent, four children). The host search reads the ``.nnet`` files' input
normalisation (clip, shift, divide) as its ``Chain.prefix``.

Run: ``python benchmarks/bench_host_acas.py [--nets 1,2,...] [--budget 10]`` (prints ``uptime``'s load).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import host_bab, host_bounds
from qbound.bounds.bab import branch_and_bound

BENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench"
BOX = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]), jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))


def _pairs(name):
  f_app, fp = qb.io.load_nnet(BENCH / "nnet" / f"{name}.nnet")
  q_app, qp = qb.io.load_nnet(BENCH / "nnet_16bit" / f"{name}_16bit.nnet")
  return functools.partial(f_app, fp), functools.partial(q_app, qp)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--nets", default="1,2,3,4,5,6,7,8,9")
  parser.add_argument("--budget", type=float, default=10.0)
  args = parser.parse_args()
  print(f"load at start: {os.getloadavg()[0]:.1f}")
  host_bab.MAX_NEURONS = 10**6
  print(f"{'net':<5}{'compiled s':>11}{'pieces':>8}{'ms/pc':>7}{'host s':>9}{'pieces':>8}{'ms/pc':>7}{'upper':>10}"
        f"{'fwd s':>9}{'pieces':>8}{'ms/pc':>7}{'upper':>10}")
  rows = []
  for i in map(int, args.nets.split(",")):
    f, fq = _pairs(f"ACASXU_run2a_1_{i}_batch_2000")
    merged = qb.merge(f, fq, BOX)
    chain = host_bab.chain_of(merged)
    kw = dict(outputs=[0], time_budget=args.budget, epsilon=0.05, target_gap=0.0)
    branch_and_bound(merged, BOX, **kw)  # compiles
    t0 = time.perf_counter()
    c = branch_and_bound(merged, BOX, **kw)
    tc = time.perf_counter() - t0
    out = []
    for hidden in (True, False):
      host_bounds.HIDDEN_BACKWARD = hidden
      r = host_bab.host_branch_and_bound(merged, BOX, chain=chain, **kw)
      out.append(r)
    host_bounds.HIDDEN_BACKWARD = True
    rows.append((tc, out[0].seconds, out[1].seconds))
    print(f"1_{i:<3}{tc:>11.2f}{c.pieces_bounded:>8}{1e3 * tc / c.pieces_bounded:>7.2f}"
          + "".join(f"{r.seconds:>9.2f}{r.pieces_bounded:>8}{1e3 * r.seconds / r.pieces_bounded:>7.2f}{r.upper:>10.3g}"
                    for r in out), flush=True)
  med = np.median(rows, axis=0)
  print(f"medians: compiled {med[0]:.2f} s, host {med[1]:.2f} s, host without hidden backward {med[2]:.2f} s "
        f"(budget {args.budget:g} s; 'upper' above 0.05 means not proved); load at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
