"""qb.exact.grid_error on AQT's static int8 MLP over the whole box [-1, 1]^4 (65^4 = 1.8e7 cells).

The 4-16-16-2 linen MLP of ``bench_quant_libraries.py`` with AQT's int8 weights and static int8
activations (power-of-two scales): f_q rounds its input to steps of 1/32. For each refine gap, the
first call (compiling) and a warm call of ``grid_error``: seconds, bound, reached error, their ratio,
and the cells bounded again after the first pass. Run it from the repository root, once per version
to compare (interleaved, as the load varies)::

    python benchmarks/bench_grid.py --gaps 0.4 0.02
    python benchmarks/bench_grid.py --gaps 0.02 --refine-seconds 0 2 4   # stopped S s into the refinement

With ``--refine-seconds``, each call is stopped that many seconds after its refinement starts (the
first ``report_upper``): the bound and reached error an anytime caller (``certify``) gets then.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import qbound as qb  # noqa: E402
from qbound.exact.grid import grid_error  # noqa: E402

import bench_quant_libraries as quant  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--gaps", type=float, nargs="*", default=[0.4])
  parser.add_argument("--calls", type=int, default=2, help="calls per gap (the first one compiles)")
  parser.add_argument("--refine-seconds", type=float, nargs="*", default=[None],
                      help="stop each call this many seconds into its refinement (after a first, compiling call)")
  args = parser.parse_args(argv)
  f, fq, box = quant.build("linen-mlp", "aqt static int8 po2")
  merged = qb.merge(f, fq, box)
  print(f"qbound from {pathlib.Path(qb.__file__).parent.parent}, load {os.getloadavg()[0]:.1f}")
  print(f"{'gap':>5} {'call':>4} {'refine s':>8} {'seconds':>8} {'bound':>9} {'reached':>9} {'ratio':>6} "
        f"{'refined':>9} {'load':>5}")
  timed = args.refine_seconds != [None]
  if timed:
    grid_error(merged, box, refine_gap=1e9)  # compiles; not shown
  for gap in args.gaps:
    for call in range(args.calls):
      for limit in args.refine_seconds:
        refining = []
        stop = None if limit is None else (lambda: bool(refining) and time.perf_counter() > refining[0] + limit)
        start = time.perf_counter()
        res = grid_error(merged, box, refine_gap=gap, stop=stop,
                         report_upper=lambda _: refining or refining.append(time.perf_counter()))
        seconds = time.perf_counter() - start
        shown = "-" if limit is None else f"{limit:g}"
        print(f"{gap:>5} {call:>4} {shown:>8} {seconds:>8.1f} {res.upper:>9.5f} {res.lower:>9.5f} "
              f"{res.upper / res.lower:>6.3f} {res.refined:>9} {os.getloadavg()[0]:>5.1f}", flush=True)


if __name__ == "__main__":
  main()
