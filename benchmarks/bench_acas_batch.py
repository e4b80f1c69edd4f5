"""Where a branch-and-bound batch's time goes on ACAS Xu vs float16 (issue 19; docs/results/acas-batch.md).

Captures the batches of a warm ``qb.certify(f, fq, box, method="bab", epsilon=0.05, outputs=[0])``
on ACAS Xu 1_1 vs its float16 copy (property 1), then, in the same process:

* ``--replay`` (default): replays them with variants interleaved, wall and CPU milliseconds per
  batch (median over rounds; each variant recompiled when switched): ``fp.pairwise_sum`` as before
  issue 19 (pad to a power of two, interleaved halves) against now, and the sparse passes with and
  without rows at exact targets (``sparse.SKIP_EXACT_TARGETS``);
* ``--trace``: XLA op time of the last batch per module and per op (``jax.profiler``), 5 replays;
* ``--candidates``: pieces and seconds of ``certify`` on 1_1..1_9 with ``bab.LARGE_NET_CANDIDATES``
  2 and 1 (output 0 and all five outputs), interleaved.

Run: ``PYTHONPATH=. python benchmarks/bench_acas_batch.py [--replay] [--trace] [--candidates] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import bab, fp, sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_f16_gap import BOX  # noqa: E402
from bench_tight import _pairs  # noqa: E402


def interleaved_pairwise_sum(x):
  """``fp.pairwise_sum`` before issue 19: zeros padded to a power of two, interleaved halves."""
  x = x.reshape(x.shape[0], -1)
  n = x.shape[1]
  width = 1 << max(n - 1, 0).bit_length()
  if width != n:
    x = jnp.pad(x, ((0, 0), (0, width - n)))
  while x.shape[1] > 1:
    x = x[:, 0::2] + x[:, 1::2]
  return x[:, 0]


def capture(net: int = 1):
  """The arguments of every ``batch_bounds`` call of a warm certify call (after a first one)."""
  f, fq = _pairs(f"ACASXU_run2a_1_{net}_batch_2000")
  run = functools.partial(qb.certify, f, fq, BOX, method="bab", epsilon=0.05, outputs=[0], time_budget=30)
  run()
  calls = []
  original = bab.batch_bounds

  def recording(*args, **kwargs):
    calls.append((args, kwargs))
    return original(*args, **kwargs)

  bab.batch_bounds = recording
  try:
    run()
  finally:
    bab.batch_bounds = original
  return original, calls


def replay(rounds: int):
  bounds, calls = capture()
  batches = calls[1:]  # the root's batch measures the widening too
  saved = (fp.pairwise_sum, sparse.SKIP_EXACT_TARGETS)
  variants = {
      "before issue 19 (interleaved sums, rows at exact targets)": (interleaved_pairwise_sum, False),
      "contiguous sums, rows at exact targets": (saved[0], False),
      "now (contiguous sums, no rows at exact targets)": (saved[0], True),
  }
  wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
  try:
    for _ in range(rounds):
      for name, (summing, skip) in variants.items():
        fp.pairwise_sum, sparse.SKIP_EXACT_TARGETS = summing, skip
        jax.clear_caches()  # the steps trace fp.pairwise_sum: compile them again
        for args, kwargs in batches:
          jax.block_until_ready(bounds(*args, **kwargs))
        t0, c0 = time.perf_counter(), time.process_time()
        for args, kwargs in batches:
          jax.block_until_ready(bounds(*args, **kwargs))
        wall[name].append((time.perf_counter() - t0) / len(batches))
        cpu[name].append((time.process_time() - c0) / len(batches))
  finally:
    fp.pairwise_sum, sparse.SKIP_EXACT_TARGETS = saved
    jax.clear_caches()
  print(f"\n== the {len(batches)} warm batches of 1_1 (output 0) replayed, {rounds} rounds interleaved ==")
  print(f"{'variant':<58}{'wall ms/batch':>15}{'CPU ms/batch':>14}{'CPU min':>9}")
  for name in variants:
    print(f"{name:<58}{1000 * np.median(wall[name]):>15.1f}{1000 * np.median(cpu[name]):>14.1f}"
          f"{1000 * np.min(cpu[name]):>9.1f}")


def trace():
  bounds, calls = capture()
  args, kwargs = calls[-1]
  for _ in range(3):
    jax.block_until_ready(bounds(*args, **kwargs))
  with tempfile.TemporaryDirectory() as out:
    with jax.profiler.trace(out, create_perfetto_trace=True):
      for _ in range(5):
        jax.block_until_ready(bounds(*args, **kwargs))
    events = json.load(gzip.open(glob.glob(f"{out}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
  modules, ops = collections.Counter(), collections.Counter()
  for e in events:
    info = e.get("args")
    if e.get("ph") == "X" and isinstance(info, dict) and "hlo_op" in info:
      modules[info["hlo_module"]] += e["dur"] / 5000
      ops[(info["hlo_module"], info["hlo_op"])] += e["dur"] / 5000
  print("\n== XLA op time of the last warm batch of 1_1 (ms per batch, summed over threads; 5 replays) ==")
  print(f"all ops: {sum(modules.values()):.1f}")
  for name, ms in modules.most_common(6):
    print(f"{ms:8.2f}  {name}")
  for (module, op), ms in ops.most_common(15):
    print(f"{ms:8.2f}  {module} / {op}")


def candidates(calls: int = 3):
  counted = {}
  original = bab.branch_and_bound

  def counting(*args, **kwargs):
    result = original(*args, **kwargs)
    counted["pieces"] = result.pieces_bounded
    return result

  saved = bab.LARGE_NET_CANDIDATES
  bab.branch_and_bound = counting
  print("\n== bab.LARGE_NET_CANDIDATES 2 against 1: pieces bounded, median warm seconds (interleaved) ==")
  print(f"{'net':<6}{'outputs':>8}{'2: pieces':>11}{'s':>7}{'1: pieces':>11}{'s':>7}")
  try:
    for i in range(1, 10):
      f, fq = _pairs(f"ACASXU_run2a_1_{i}_batch_2000")
      for outputs, label in (([0], "0"), (None, "all")):
        run = functools.partial(qb.certify, f, fq, BOX, method="bab", epsilon=0.05, outputs=outputs,
                                time_budget=30)
        row = {}
        for count in (2, 1):
          bab.LARGE_NET_CANDIDATES = count
          run()
        seconds = collections.defaultdict(list)
        for _ in range(calls):
          for count in (2, 1):
            bab.LARGE_NET_CANDIDATES = count
            cert = run()
            seconds[count].append(cert.seconds)
            row[count] = counted["pieces"]
        print(f"1_{i:<4}{label:>8}{row[2]:>11}{np.median(seconds[2]):>7.2f}{row[1]:>11}{np.median(seconds[1]):>7.2f}",
              flush=True)
  finally:
    bab.branch_and_bound = original
    bab.LARGE_NET_CANDIDATES = saved


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--replay", action="store_true")
  parser.add_argument("--trace", action="store_true")
  parser.add_argument("--candidates", action="store_true")
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  if not (args.replay or args.trace or args.candidates):
    args.replay = True
  if args.replay:
    replay(args.rounds)
  if args.trace:
    trace()
  if args.candidates:
    candidates()


if __name__ == "__main__":
  main()
