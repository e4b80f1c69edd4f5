"""How fast the gap closes on ACAS Xu 1_1 vs its float16 copy, property 1, output 0 (issue 14).

``certify(f, fq, box, outputs=[0], time_budget=60)`` with no epsilon certifies the maximal error
itself; the goal is ``upper / lower <= 1.1`` within 60 s. Prints, in one run, with the settings
before this work ("before": a parent's bounds met before a piece's rows, no whole-box search in
the rounds, which take 5% of the time, batches of 32) and now ("now") interleaved:

  1. branch and bound (``qb.bounds.branch_and_bound``, warm) on output 0: upper, lower and their
     ratio after 5, 10, 20, 30, 45 and 60 s (its ``report`` hook);
  2. ``qb.certify(..., outputs=[0], time_budget=60)``: with ``target_gap=0.1`` (the seconds to
     reach 1.1, or 60) and with the default ``target_gap`` (the ratio after 60 s);
  3. (``--bracket``) where the true maximum lies: the best of many whole-box searches
     (``qb.maximize_error`` with :data:`qbound.bounds.refute.GLOBAL_SEARCH`, new keys) and a long
     branch and bound's upper bound.

Run: ``PYTHONPATH=. python benchmarks/bench_f16_gap.py [--seconds 60] [--reps 1] [--bracket 300]``.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import bab, refute, sparse

from bench_tight import _pairs

BOX = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]), jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))
MARKS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300)
# (module, setting): main's value before this work, and the value now.
KNOBS = {(sparse, "PRIOR_AFTER_ROWS"): False, (refute, "GLOBAL_SEARCH"): None, (refute, "GAP_SHARE"): refute.SHARE,
         (bab, "GAP_BATCH_SIZE"): 32}
SETTINGS = {"before": dict(KNOBS), "now": {knob: getattr(*knob) for knob in KNOBS}}


@contextlib.contextmanager
def setting(name: str):
  saved = {knob: getattr(*knob) for knob in KNOBS}
  for (module, key), value in SETTINGS[name].items():
    setattr(module, key, value)
  try:
    yield
  finally:
    for (module, key), value in saved.items():
      setattr(module, key, value)


def load() -> str:
  return open("/proc/loadavg").read().split()[0]


def curve(merged, seconds: float, reached: float, witness) -> tuple:
  """Branch and bound on output 0 for ``seconds``: ``(result, {mark: (upper, lower)})``."""
  start, marks = time.perf_counter(), {}

  def report(root_lower, root_upper, upper, lower, x):
    elapsed = time.perf_counter() - start
    for mark in MARKS:
      if elapsed >= mark and mark not in marks:
        marks[mark] = (upper, lower)

  res = bab.branch_and_bound(merged, BOX, outputs=[0], time_budget=seconds, target_gap=0.0, initial_lower=reached,
                             initial_witness=witness, report=report)
  marks[min(m for m in MARKS if m >= seconds)] = (res.upper, res.lower)
  return res, marks


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=60.0)
  parser.add_argument("--reps", type=int, default=1)
  parser.add_argument("--bracket", type=float, default=0.0, help="seconds of each bracketing run (0: none)")
  parser.add_argument("--skip-curve", action="store_true")
  parser.add_argument("--skip-certify", action="store_true")
  args = parser.parse_args(argv)
  f, fq = _pairs("ACASXU_run2a_1_1_batch_2000")
  merged = qb.merge(f, fq, BOX)
  reached, witness = qb.maximize_error(merged, BOX, outputs=[0])
  for name in SETTINGS:  # compile each setting's steps first
    with setting(name):
      bab.branch_and_bound(merged, BOX, outputs=[0], time_budget=3, initial_lower=reached, initial_witness=witness)
      qb.certify(f, fq, BOX, outputs=[0], time_budget=5)
  marks = [m for m in MARKS if m <= args.seconds] or [MARKS[0]]
  if not args.skip_curve:
    print(f"\n== 1. branch and bound, output 0, no epsilon: upper / lower (ratio) after t seconds ==")
    print(f"{'setting':<8}{'load':>6}{'pieces':>8}" + "".join(f"{f'{m} s':>31}" for m in marks))
    for _ in range(args.reps):
      for name in SETTINGS:
        with setting(name):
          res, at = curve(merged, args.seconds, reached, witness)
        cells = "".join(f"{f'{at[m][0]:.3e} / {at[m][1]:.3e} ({at[m][0] / at[m][1]:.2f})':>31}"
                        if m in at else f"{'':>31}" for m in marks)
        print(f"{name:<8}{load():>6}{res.pieces_bounded:>8}{cells}", flush=True)
  if not args.skip_certify:
    print(f"\n== 2. qb.certify(f, fq, box, outputs=[0], time_budget={args.seconds:g}) ==")
    print(f"{'setting':<8}{'target_gap':>11}{'load':>6}{'s':>7}{'upper':>12}{'lower':>12}{'upper/lower':>12}")
    for _ in range(args.reps):
      for gap in (0.1, 0.02):
        for name in SETTINGS:
          with setting(name):
            cert = qb.certify(f, fq, BOX, outputs=[0], time_budget=args.seconds, target_gap=gap)
          print(f"{name:<8}{gap:>11}{load():>6}{cert.seconds:>7.1f}{cert.upper:>12.4e}{cert.lower:>12.4e}"
                f"{cert.upper / cert.lower:>12.4f}", flush=True)
  if args.bracket:
    print(f"\n== 3. where the maximum lies: {args.bracket:g} s of whole-box searches, {args.bracket:g} s of branch "
          "and bound ==")
    start, best, runs = time.perf_counter(), (0.0, None), 0
    while time.perf_counter() - start < args.bracket:
      value, x = qb.maximize_error(merged, BOX, key=jax.random.key(10_000 + runs), search=refute.GLOBAL_SEARCH,
                                   outputs=[0])
      runs += 1
      best = max(best, (value, x), key=lambda t: t[0])
    exact = float(np.abs(qb.attack.exact_error(merged.graph, best[1])[0]))
    print(f"searches: {runs}, best {best[0]:.5e} (float64 {exact:.5e}) at {np.asarray(best[1]).tolist()} "
          f"(load {load()})")
    res, _ = curve(merged, args.bracket, max(reached, best[0]), best[1])
    print(f"branch and bound ('now'): upper {res.upper:.5e} after {res.seconds:.0f} s, {res.pieces_bounded} pieces "
          f"(load {load()}): the maximum lies in [{exact:.5e}, {res.upper:.5e}]")


if __name__ == "__main__":
  main()
