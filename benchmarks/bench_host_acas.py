"""The NumPy branch and bound (:mod:`qbound.bounds.host_bab`) at ACAS Xu's size, against the compiled one.

ACAS Xu 1_1..1_9 against their float16 copies, property 1, epsilon 0.05, output 0 (issue 19): per
net, the compiled :func:`qbound.bounds.bab.branch_and_bound` (warm: compiled by a first call before
it is timed) and :func:`qbound.bounds.host_bab.host_branch_and_bound` with its size gate lifted
(``MAX_NEURONS``: 6 x 50 ReLUs in f and in f_q are 600) in three variants: ``host`` (the default),
``fwd`` (no backward pass for the hidden layers' unstable neurons, ``host_bounds.HIDDEN_BACKWARD``)
and ``all`` (backward rows on ``d``, ``z_q`` and ``z``, ``host_bounds.BACKWARD_ROWS``), interleaved per net, each
with the same time budget. Pieces are the pieces bounded (strong branching bounds two candidate
splits of each parent, four children). The host search reads the ``.nnet`` files' input
normalisation (clip, shift, divide) as its ``Chain.prefix``.

``--pieces``: instead, output 0's bound on random pieces of 1_1's box by the NumPy bounds with
backward rows on ``d`` and on ``d``, ``z_q``, ``z``, beside the compiled differential pass.

Run: ``python benchmarks/bench_host_acas.py [--nets 1,2,...] [--budget 10] [--pieces]`` (prints the load).
"""

from __future__ import annotations

import argparse
import os
import time

import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import host_bab, host_bounds, host_chain
from qbound.bounds.bab import branch_and_bound

from bench_tight import _pairs  # ACAS Xu 1_k and its float16 copy, as the other ACAS benchmarks load them

BOX = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]), jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))


# The NumPy search's variants, in the table's order: (host_bounds.HIDDEN_BACKWARD, host_bounds.BACKWARD_ROWS).
VARIANTS = ((True, "d"), (False, "d"), (True, "all"))


def bench_pieces(per_size: int = 3, seed: int = 0):
  """Output 0's bound on random pieces of 1_1's box (edges 1/4, 1/8, 1/16 of it): the NumPy
  bounds with backward rows on ``d`` (the default) and on ``d``, ``z_q`` and ``z``, each on a batch
  of 64 copies of the piece (ms per piece), beside the compiled differential pass."""
  import dataclasses

  from qbound.bounds.diff import diff_bounds

  f, fq = _pairs("ACASXU_run2a_1_1_batch_2000")
  merged = qb.merge(f, fq, BOX)
  chain = host_bab.chain_of(merged)
  core = dataclasses.replace(chain, prefix=())
  rng = np.random.default_rng(seed)
  lo0, hi0 = np.asarray(BOX.lower, np.float64), np.asarray(BOX.upper, np.float64)
  print(f"{'edge':<6}{'rows on d':>12}{'ms/pc':>7}{'d, z_q, z':>12}{'ms/pc':>7}{'diff':>12}")
  for frac in (0.25, 0.125, 0.0625):
    for _ in range(per_size):
      start = lo0 + rng.uniform(size=5) * (hi0 - lo0) * (1 - frac)
      box = qb.Box(jnp.asarray(start, jnp.float32), jnp.asarray(start + frac * (hi0 - lo0), jnp.float32))
      lo, hi = host_bab.map_box(chain, np.asarray(box.lower, np.float64)[None], np.asarray(box.upper, np.float64)[None])
      cells = []
      for which in ("d", "all"):
        host_bounds.BACKWARD_ROWS = which
        t0 = time.perf_counter()
        with host_bab._one_blas_thread():
          dl, du, *_ = host_bounds.bound_pieces(core, np.repeat(lo, 64, 0), np.repeat(hi, 64, 0))
        cells.append(f"{max(du[0, 0], -dl[0, 0]):>12.3g}{(time.perf_counter() - t0) / 64 * 1e3:>7.1f}")
      host_bounds.BACKWARD_ROWS = "d"
      _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True)
      d = d[merged.f_graph.output]
      print(f"1/{round(1 / frac):<4}" + "".join(cells) + f"{max(float(d[1][0]), -float(d[0][0])):>12.3g}", flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--nets", default="1,2,3,4,5,6,7,8,9")
  parser.add_argument("--budget", type=float, default=10.0)
  parser.add_argument("--pieces", action="store_true", help="bounds on random pieces of 1_1's box instead")
  args = parser.parse_args()
  print(f"load at start: {os.getloadavg()[0]:.1f}")
  host_chain.MAX_NEURONS = 10**6
  if args.pieces:
    bench_pieces()
    print(f"load at end: {os.getloadavg()[0]:.1f}")
    return
  print(f"{'net':<5}{'compiled s':>11}{'pieces':>8}{'ms/pc':>7}"
        + "".join(f"{name + ' s':>9}{'pieces':>8}{'ms/pc':>7}{'upper':>10}" for name in ("host", "fwd", "all")))
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
    for hidden, which in VARIANTS:
      host_bounds.HIDDEN_BACKWARD, host_bounds.BACKWARD_ROWS = hidden, which
      r = host_bab.host_branch_and_bound(merged, BOX, chain=chain, **kw)
      out.append(r)
    host_bounds.HIDDEN_BACKWARD, host_bounds.BACKWARD_ROWS = True, "d"
    rows.append((tc, *(r.seconds for r in out)))
    print(f"1_{i:<3}{tc:>11.2f}{c.pieces_bounded:>8}{1e3 * tc / c.pieces_bounded:>7.2f}"
          + "".join(f"{r.seconds:>9.2f}{r.pieces_bounded:>8}{1e3 * r.seconds / r.pieces_bounded:>7.2f}{r.upper:>10.3g}"
                    for r in out), flush=True)
  med = np.median(rows, axis=0)
  print(f"medians: compiled {med[0]:.2f} s, host {med[1]:.2f} s, fwd (no hidden backward) {med[2]:.2f} s, "
        f"all (rows on d, z_q, z) {med[3]:.2f} s "
        f"(budget {args.budget:g} s; 'upper' above 0.05 means not proved); load at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
