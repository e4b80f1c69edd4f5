"""Many random fake-quantized, clipped and leaky network pairs through every bound method: counts
of soundness violations (a proven bound below a reached error, an empty or NaN interval).

The same cases and checks as ``tests/test_soundness_properties.py`` (``tests/soundness_cases.py``),
with many more examples and without stopping at the first violation. The methods that compile
little per graph structure (interval, CROWN, differential bounds, MILP) run on every structure
(family x shape x rounding modes, ``ALL_STRUCTURES``); the ones that compile whole programs per
structure (optimised slopes, branch and bound, auto, batched certification) on the default
suite's ``STRUCTURES`` unless ``--all-structures``. Hypothesis draws the cases (a fixed ``--seed``
makes a run repeatable); every violating case is printed as the code that rebuilds it.

Run from the repository root::

    python benchmarks/soundness_long.py --examples 100 --batch-examples 10   # ~40 min on 2 CPU cores
    python benchmarks/soundness_long.py --examples 20 --methods diff,crown --sound sound
"""

from __future__ import annotations

import argparse
import collections
import gc
import resource
import sys
import time
from pathlib import Path

import qbound as qb  # noqa: F401  (first: sets XLA's CPU flags before JAX's backend starts)
import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import soundness_cases as S  # noqa: E402

PER_NODE = ("interval", "crown", "diff", "diff-interval", "milp")
COSTLY = ("alpha", "bab", "auto", "batch")
METHODS = PER_NODE + COSTLY


def draw_cases(structures, n: int, run_seed: int) -> list:
  """``n`` cases, the structures in turn (so each gets its share), drawn by hypothesis."""
  out = []

  @seed(run_seed)
  @settings(max_examples=n, database=None, deadline=None, phases=(Phase.generate,),
            suppress_health_check=list(HealthCheck))
  @given(data=st.data())
  def collect(data):
    if len(out) < n:
      out.append(data.draw(S.cases(structures[len(out) % len(structures)])))

  collect()
  return out


def forget_compilations() -> None:
  """Drops JAX's compiled programs and the cases' cached graphs and references."""
  S.case_reference.cache_clear()
  S.merged.cache_clear()
  S._values64.cache_clear()
  jax.clear_caches()
  gc.collect()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--examples", type=int, default=100, help="cases per method (default 100)")
  parser.add_argument("--batch-examples", type=int,
                      help="cases for batch (default a quarter of --examples: each is 3 boxes x 3 methods, and "
                           "every structure compiles 3 whole programs, ~1 min)")
  parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
  parser.add_argument("--sound", choices=("both", "sound", "unsound"), default="both")
  parser.add_argument("--all-structures", action="store_true",
                      help="run the costly methods on every structure too (compiles for hours)")
  parser.add_argument("--seed", type=int, default=0, help="hypothesis seed of the cases")
  parser.add_argument("--report", type=Path, help="also write every violation and its case here")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - set(METHODS)
  if unknown:
    parser.error(f"unknown methods {sorted(unknown)}")
  modes = {"both": (True, False), "sound": (True,), "unsound": (False,)}[args.sound]

  groups = [([m for m in methods if m in PER_NODE], S.ALL_STRUCTURES),
            ([m for m in methods if m in COSTLY], S.ALL_STRUCTURES if args.all_structures else S.STRUCTURES)]
  cases_run = collections.Counter()
  skipped = collections.Counter()
  violating = collections.Counter()
  seconds = collections.Counter()
  unpaired = collections.Counter()
  failures = []
  start = time.perf_counter()
  batch_examples = args.batch_examples if args.batch_examples is not None else max(1, args.examples // 4)
  for group_methods, structures in groups:
    if not group_methods:
      continue
    cases = draw_cases(structures, args.examples, args.seed)
    # Case k is of structure k % len(structures). Run them structure by structure and, for the
    # methods that compile whole programs per structure, clear JAX's caches in between: those of
    # many structures fill the memory (11 GB, then out of memory, after about ten of the default
    # structures' batched certification), while one structure's stay warm for all its cases. (The
    # per-node methods compile per node kind, shared by all structures: they keep their caches.)
    # Batch runs on the first cases drawn (one structure each in turn).
    order = sorted(range(len(cases)), key=lambda k: (k % len(structures), k))
    for done, k in enumerate(order, start=1):
      case = cases[k]
      t = time.perf_counter()
      S.case_reference(case)  # once per case, shared by the methods (timed on its own row)
      seconds["reference"] += time.perf_counter() - t
      cases_run["reference"] += 1
      if not S.merged(case).paired:
        unpaired[case.family] += 1
      for method in group_methods:
        if method == "batch" and k >= batch_examples:
          continue
        for sound in modes:
          key = (method, "sound" if sound else "unsound")
          outcome = S.check(method, case, sound)
          seconds[key] += outcome.seconds
          if outcome.skipped:
            skipped[key] += 1
            continue
          cases_run[key] += 1
          if outcome.violations:
            violating[key] += 1
            failures.append((key, case, outcome))
            print(f"VIOLATION {key[0]} {key[1]}:\n{S.describe(case, outcome, [method], sound, limit=3)}\n", flush=True)
      last_of_structure = done == len(order) or order[done] % len(structures) != k % len(structures)
      if last_of_structure and set(group_methods) & set(COSTLY):
        forget_compilations()
      if done % 10 == 0:
        print(f"... {done}/{len(cases)} cases of {', '.join(group_methods)} ({time.perf_counter() - start:.0f} s, "
              f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB)", flush=True)

  print(f"\n{'method':<15} {'mode':<8} {'cases':>6} {'skipped':>8} {'violations':>11} {'seconds':>9}")
  for method in methods:
    for sound in modes:
      key = (method, "sound" if sound else "unsound")
      print(f"{method:<15} {key[1]:<8} {cases_run[key]:>6} {skipped[key]:>8} {violating[key]:>11} {seconds[key]:>9.1f}")
  print(f"{'reference':<15} {'':<8} {cases_run['reference']:>6} {'':>8} {'':>11} {seconds['reference']:>9.1f}")
  print(f"total {time.perf_counter() - start:.0f} s; not paired (expected for relu-vs-clip and fq-in-f): "
        f"{dict(unpaired) or 'none'}")
  if args.report:
    with open(args.report, "w") as fh:
      for (method, mode), case, outcome in failures:
        fh.write(f"## {method} {mode}\n{S.describe(case, outcome, [method], mode == 'sound', limit=20)}\n\n")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
