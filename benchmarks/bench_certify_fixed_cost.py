"""What a warm ``qb.certify(f, fq, box, method="bab", epsilon=0.05, outputs=[0])`` costs beside its
branch and bound (issue 19), before and after branch and bound goes first on few inputs.

ACAS Xu 1_1..1_9 against their float16 copies (``../shared/bench``), property 1's box. Variants, in
one process, interleaved call by call after warm-up calls of each (until a call proves):

* ``stages first``: the path before this change, CROWN, the differential pass and the gradient
  search before branch and bound, and a float64 copy of the graph made at every witness evaluation
  (``certify.BAB_BRANCH_FIRST = False``, ``graph.KEEP_FLOAT64_COPIES = False``); both variants trace with
  ``piecewise.exact``'s shared fractions (measured apart, ``--trace``);
* ``bab first``: the default now;
* ``--device``: the same two with ``certify.BAB_DEVICE_FRESH_VARS = 2`` (the device loop).

``--all-outputs``: all five outputs in one call (``outputs=None``) instead of output 0.

Prints one JSON line per net (median seconds of ``--reps`` calls, and of the same calls less the
time inside branch and bound, whose search swings with the load; the load average), then the
medians over the nets. Run: ``PYTHONPATH=. python benchmarks/bench_certify_fixed_cost.py --reps 3``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import numpy as np

import qbound as qb
from qbound import graph as G

C = importlib.import_module("qbound.certify")  # the module: qbound.certify is the function


def _variants(device: bool):
  counts = [None, 2] if device else [None]
  out = {}
  for count in counts:
    tag = "" if count is None else f", device {count}"
    out[f"stages first{tag}"] = dict(BAB_BRANCH_FIRST=False, KEEP_FLOAT64_COPIES=False, BAB_DEVICE_FRESH_VARS=count)
    out[f"bab first{tag}"] = dict(BAB_BRANCH_FIRST=True, KEEP_FLOAT64_COPIES=True, BAB_DEVICE_FRESH_VARS=count)
  return out


_BAB_SECONDS: list = []


def _timing_branch_and_bound():
  """Records each branch and bound's own seconds (host loop and device loop), so that a call's time
  outside it (what this change is about) is measured apart from its search, whose time swings with
  the load."""
  import qbound.bounds.bab as bab
  import qbound.bounds.forward_bab as forward_bab

  for module, name in ((bab, "branch_and_bound"), (forward_bab, "forward_branch_and_bound")):
    real = getattr(module, name)

    def timed(*args, _real=real, **kwargs):
      start = time.perf_counter()
      res = _real(*args, **kwargs)
      _BAB_SECONDS.append(time.perf_counter() - start)
      return res

    setattr(module, name, timed)


def _set(settings):
  for name, value in settings.items():
    setattr(G if name == "KEEP_FLOAT64_COPIES" else C, name, value)


def _exact_one_by_one(values, shape):
  """``piecewise.exact`` before the shared fractions: one Fraction per entry."""
  from fractions import Fraction

  arr = np.asarray(values)
  if arr.dtype != object:
    arr = arr.astype(np.float64)
  flat = [v if isinstance(v, Fraction) else Fraction(float(v)) for v in np.broadcast_to(arr, shape).ravel()]
  out = np.empty(len(flat), dtype=object)
  out[:] = flat
  return out.reshape(shape)


def bench_trace(reps: int):
  """``qb.merge`` of ACAS Xu 1_1 and its float16 copy (both traced), one Fraction per entry against
  shared ones, interleaved; median seconds of ``reps`` calls each."""
  from bench_forward_bab import PROPERTY_1
  from bench_tight import _pairs

  from qbound import piecewise

  pair = _pairs("ACASXU_run2a_1_1_batch_2000")
  shared = piecewise.exact
  times = {"one by one": [], "shared": []}
  qb.merge(*pair, PROPERTY_1)
  for _ in range(reps):
    for name, fn in (("one by one", _exact_one_by_one), ("shared", shared)):
      piecewise.exact = fn
      start = time.perf_counter()
      qb.merge(*pair, PROPERTY_1)
      times[name].append(time.perf_counter() - start)
  piecewise.exact = shared
  print(json.dumps({"merge s": {n: round(float(np.median(t)), 4) for n, t in times.items()},
                    "load": round(os.getloadavg()[0], 1)}), flush=True)


def main(argv=None):
  from bench_forward_bab import PROPERTY_1
  from bench_tight import _pairs

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--nets", type=int, nargs="*", default=list(range(1, 10)))
  parser.add_argument("--device", action="store_true", help="also the device loop with 2 fresh variables")
  parser.add_argument("--trace", action="store_true", help="only qb.merge, with and without shared fractions")
  parser.add_argument("--all-outputs", action="store_true", help="all five outputs in one call instead of output 0")
  args = parser.parse_args(argv)
  outputs = None if args.all_outputs else [0]
  if args.trace:
    bench_trace(max(args.reps, 10))
    return
  variants = _variants(args.device)
  medians = {name: [] for name in variants}
  outside_medians = {name: [] for name in variants}
  _timing_branch_and_bound()
  for k in args.nets:
    pair = _pairs(f"ACASXU_run2a_1_{k}_batch_2000")
    call = lambda: qb.certify(*pair, PROPERTY_1, method="bab", epsilon=0.05, outputs=outputs)
    for settings in variants.values():  # warm: a first call returns at its budget while it compiles
      _set(settings)
      for _ in range(8):
        if call().upper <= 0.05:
          break
    times = {name: [] for name in variants}
    outside = {name: [] for name in variants}
    unproved = {name: 0 for name in variants}
    loads = []
    for _ in range(args.reps):
      for name, settings in variants.items():
        _set(settings)
        _BAB_SECONDS.clear()
        start = time.perf_counter()
        cert = call()
        times[name].append(time.perf_counter() - start)
        outside[name].append(times[name][-1] - sum(_BAB_SECONDS))
        unproved[name] += int(cert.upper > 0.05)  # timed as it is, and counted
        loads.append(os.getloadavg()[0])
    for name, t in times.items():
      medians[name].append(float(np.median(t)))
      outside_medians[name].append(float(np.median(outside[name])))
    print(json.dumps({"net": f"1_{k}", **{name: round(float(np.median(t)), 3) for name, t in times.items()},
                      **{f"{name}: outside bab": round(float(np.median(t)), 3) for name, t in outside.items()},
                      "unproved calls": {n: u for n, u in unproved.items() if u},
                      "load": f"{min(loads):.1f}-{max(loads):.1f}"}), flush=True)
  _set(dict(BAB_BRANCH_FIRST=True, KEEP_FLOAT64_COPIES=True, BAB_DEVICE_FRESH_VARS=None))
  print(json.dumps({"net": "median", **{name: round(float(np.median(m)), 3) for name, m in medians.items()},
                    **{f"{name}: outside bab": round(float(np.median(m)), 3) for name, m in outside_medians.items()}}))


if __name__ == "__main__":
  main()
