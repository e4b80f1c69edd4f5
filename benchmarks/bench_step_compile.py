"""First-call compilation of the per-node steps, with and without :data:`qbound.bounds.common.STEP_COMPILE`.

In one process, alternating (``jax.clear_caches()`` before each, JAX's persistent cache off), for:
  * the 12-8-8 MLP of the exactness table (``bench_tight.py``, net 0, 3 bits): one sparse
    differential pass over 256 random pieces (f's own CROWN rows kept, as for a copy that differs);
  * ACAS Xu 1_1 vs its 16-bit copy: one pass over 32 pieces of 1/8 of property 1's box (f's own
    CROWN rows skipped, as for a close copy), if ``../shared/bench`` is present;
  * with ``--bab``: branch and bound on the MLP from a cold start to upper/lower <= 1.02;
it prints the first call's wall and CPU seconds (``os.times``-style process time), XLA's own
compile seconds and program count (JAX's monitoring events), and the warm CPU milliseconds per
pass (best of 3 x 10; for ``--bab``, warm pieces per CPU second over 2 s).

Run: ``python benchmarks/bench_step_compile.py [--reps 2] [--bab]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QBOUND_JAX_CACHE", "0")  # cold compiles: no persistent cache

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import monitoring  # noqa: E402

import qbound as qb  # noqa: E402
from qbound.bounds import common, sparse  # noqa: E402
from qbound.bounds.bab import branch_and_bound  # noqa: E402
from qbound.box import Box  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tight import BENCH, _pairs, exact_net  # noqa: E402

# STEP_COMPILE's choice, against XLA's defaults and against one module at optimisation level 1.
VARIANTS = {"XLA's defaults": {}, "STEP_COMPILE": dict(common.STEP_COMPILE),
            "+ opt. level 1": {**common.STEP_COMPILE, "xla_backend_optimization_level": 1}}
_compile = {"seconds": 0.0, "programs": 0}


def _listen(name, seconds, **kwargs):
  if name.endswith("backend_compile_duration"):
    _compile["seconds"] += seconds
    _compile["programs"] += 1


def _pieces(box: qb.Box, count: int, fraction: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  lo0, hi0 = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  width = (hi0 - lo0) * fraction
  lo = lo0 + rng.uniform(0, 1, (count, *lo0.shape)) * (hi0 - lo0 - width)
  return Box(jnp.asarray(lo, jnp.float32), jnp.asarray(lo + width, jnp.float32))


def _timed(fn):
  _compile.update(seconds=0.0, programs=0)
  wall, cpu = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - wall, time.process_time() - cpu, _compile["seconds"], _compile["programs"]


def _pass_row(fg, qg, pieces, f_crown):
  run = lambda: jax.block_until_ready(sparse.diff_bounds_sparse(fg, qg, pieces, f_crown=f_crown,
                                                                  coefficients=True).d)
  _, wall, cpu, xla, programs = _timed(run)
  warm = []
  for _ in range(3):
    start = time.process_time()
    for _ in range(10):
      run()
    warm.append((time.process_time() - start) / 10 * 1e3)
  return f"{wall:>8.2f}{cpu:>8.2f}{xla:>8.2f}{programs:>6}{min(warm):>12.1f}"


def _bab_row(merged, box):
  res, wall, cpu, xla, programs = _timed(lambda: branch_and_bound(merged, box, time_budget=120, target_gap=0.02))
  start = time.process_time()
  warm = branch_and_bound(merged, box, time_budget=2.0, target_gap=0.0, search=False)
  rate = warm.pieces_bounded / (time.process_time() - start)
  return (f"{wall:>8.2f}{cpu:>8.2f}{xla:>8.2f}{programs:>6}{rate:>12.0f}"
          f"   ({res.pieces_bounded} pieces, upper/lower {res.upper / res.lower:.4f})")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=2)
  parser.add_argument("--bab", action="store_true")
  args = parser.parse_args(argv)
  monitoring.register_event_duration_secs_listener(_listen)
  f, fq, box, widths, bits = exact_net(0)
  mlp = qb.merge(f, fq, box)
  cases = [("MLP " + "-".join(map(str, widths)), lambda: _pass_row(mlp.f_graph, mlp.fq_graph,
                                                                    _pieces(box, 256, 0.25), True))]
  if BENCH.exists():
    acas_box = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]),
                      jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))
    af, afq = _pairs("ACASXU_run2a_1_1_batch_2000")
    acas = qb.merge(af, afq, acas_box)
    cases.append(("ACAS Xu 1_1 vs 16-bit", lambda: _pass_row(acas.f_graph, acas.fq_graph,
                                                             _pieces(acas_box, 32, 1 / 8), False)))
  if args.bab:
    cases.append(("MLP branch and bound to 1.02", lambda: _bab_row(mlp, box)))
  print(f"{'case / options':<34}{'wall s':>8}{'cpu s':>8}{'xla s':>8}{'progs':>6}{'warm':>12}")
  print("(first call: wall, CPU and XLA compile seconds, XLA programs; warm: CPU ms per pass, or pieces per CPU s)")
  for rep in range(args.reps):
    for case, row in cases:
      for variant, options in VARIANTS.items():
        common.STEP_COMPILE = options
        jax.clear_caches()
        line = row()
        print(f"{case + ', ' + variant:<34}{line}  load {os.getloadavg()[0]:.1f}", flush=True)
  common.STEP_COMPILE = VARIANTS["STEP_COMPILE"]


if __name__ == "__main__":
  main()
