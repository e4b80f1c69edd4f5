"""Branch and bound on the device with forward bounds (``qb.bounds.forward_branch_and_bound``) against
the default branch and bound (``qb.bounds.branch_and_bound``), in the same process, interleaved.

* ``--acas``: ACAS Xu 1_1..1_9 against their float16 copies (``../shared/bench``), property 1's box,
  epsilon 0.05, output 0 and all five outputs: a warm-up call of each (compiling), then ``--reps``
  calls of each, alternating; the median time and the pieces bounded.
* ``--small``: the first six random MLPs of ``bench_tight.py --only exact`` (2-5 inputs, 2-3 hidden
  layers of 8-16 ReLUs, 3-8 bits) on ``[-1, 1]^n``, target gap 2%: first call (compiling) and a
  second call of each.
* ``--differing``: ACAS Xu pruned pairs (``benchmarks/data``), properties 1, 7 and 8, epsilon 0.05,
  20 s each, nets ``--nets``.
* ``--neurodiff``: ACAS Xu 1_1..1_9 vs float16, property 1, epsilon 0.05, output 0: the device loop
  with NeuroDiff's choices (``relu_rules="equation"``, ``split_rule="gradient"``, with and without
  the backward pass at the output, and on differential zonotopes) against the coefficient split and
  ``branch_and_bound``, interleaved in one process (a first call of each, which compiles, then
  ``--reps`` warm calls of each; median).
* ``--fresh``: the same nets and property with NeuroDiff's intermediate variables
  (``forward_branch_and_bound(fresh_vars=2 / 4)``) against the device loop's default and
  ``qb.certify(method="bab")``, interleaved (``FRESH_VARIANTS``).
* ``--certify 2 3``: ``qb.certify(method="bab")`` with the host loop (the default) against
  ``certify.BAB_DEVICE_FRESH_VARS = 2, 3`` (the device loop), each warmed until a call proves, then
  ``--reps`` calls of each interleaved; median seconds.
* ``--first-calls host|device``: in this process, certify on 1_1 until a call proves: run it in
  new processes with ``QBOUND_JAX_CACHE=0`` (cold) and without (persistent cache).

Run: ``python benchmarks/bench_forward_bab.py --acas --small --differing`` (about 15 minutes on 2
shared cores). Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds.bab import branch_and_bound
from qbound.bounds.forward_bab import forward_branch_and_bound

PROPERTY_1 = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]),
                    jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))


def _timed(run):
  start = time.perf_counter()
  res = run()
  return time.perf_counter() - start, res


def bench_acas(reps: int, budget: float):
  from bench_tight import _pairs

  for outputs in ([0], None):
    for k in range(1, 10):
      merged = qb.merge(*_pairs(f"ACASXU_run2a_1_{k}_batch_2000"), PROPERTY_1)
      runs = {"old": lambda: branch_and_bound(merged, PROPERTY_1, outputs=outputs, epsilon=0.05, time_budget=budget),
              "new": lambda: forward_branch_and_bound(merged, PROPERTY_1, outputs=outputs, epsilon=0.05,
                                                      time_budget=budget)}
      for run in runs.values():
        run()
      times = {name: [] for name in runs}
      last = {}
      for _ in range(reps):
        for name, run in runs.items():
          seconds, last[name] = _timed(run)
          times[name].append(seconds)
      print(json.dumps({"net": f"1_{k}", "outputs": "0" if outputs else "all",
                        **{f"{n}_s": round(float(np.median(t)), 3) for n, t in times.items()},
                        **{f"{n}_pieces": r.pieces_bounded for n, r in last.items()},
                        **{f"{n}_stopped": r.stopped for n, r in last.items()}}), flush=True)


def bench_small(nets: int = 6):
  from bench_tight import mlp_apply, random_net

  rng = np.random.default_rng(0)
  for i in range(nets):
    n_in = int(rng.integers(2, 6))
    hidden = [int(rng.choice([8, 12, 16])) for _ in range(int(rng.integers(2, 4)))]
    widths = [n_in, *hidden, 2]
    bits = int(rng.choice([3, 4, 6, 8]))
    params = random_net(jax.random.key(i), widths)
    f = functools.partial(mlp_apply, params)
    fq = functools.partial(mlp_apply, qb.quantize.uniform(params, bits=bits))
    box = qb.Box(-jnp.ones(n_in), jnp.ones(n_in))
    merged = qb.merge(f, fq, box)
    row = {"net": "-".join(map(str, widths)), "bits": bits}
    for name, run in (("old", lambda: branch_and_bound(merged, box, time_budget=10, target_gap=0.02)),
                      ("new", lambda: forward_branch_and_bound(merged, box, time_budget=10, target_gap=0.02))):
      first, _ = _timed(run)
      again, res = _timed(run)
      row[name] = dict(first=round(first, 2), again=round(again, 3), stopped=res.stopped, upper=round(res.upper, 5),
                       lower=round(res.lower, 5), pieces=res.pieces_bounded)
    print(json.dumps(row), flush=True)


def bench_differing(nets, budget: float):
  import acas_properties
  import bench_differing

  compiled = False
  for k in nets:
    f, fq = bench_differing.acas_pair(k)
    for prop in ("1", "7", "8"):
      box = acas_properties.get(prop).raw_box()
      merged = qb.merge(f, fq, box)
      runs = (("old", lambda: branch_and_bound(merged, box, epsilon=0.05, time_budget=budget)),
              ("new", lambda: forward_branch_and_bound(merged, box, epsilon=0.05, time_budget=budget)))
      if not compiled:
        for _, run in runs:
          run()
        compiled = True
      row = {"net": f"1_{k}", "prop": prop}
      for name, run in runs:
        seconds, res = _timed(run)
        row[name] = dict(s=round(seconds, 2), stopped=res.stopped, upper=float(f"{res.upper:.3g}"),
                         lower=float(f"{res.lower:.3g}"), pieces=res.pieces_bounded)
      print(json.dumps(row), flush=True)


NEURODIFF_VARIANTS = {
    "coefficient split": dict(split_rule="bound"),
    "equation+gradient": dict(relu_rules="equation", split_rule="gradient", output_backward=False),
    "node+gradient": dict(split_rule="gradient", output_backward=False),
    "equation+gradient+backward": dict(relu_rules="equation", split_rule="gradient"),
    "node+gradient+backward": dict(split_rule="gradient"),
    "zonotope+gradient": dict(domain="zonotope", split_rule="gradient"),
    "zonotope+bound": dict(domain="zonotope", split_rule="bound"),
    "branch_and_bound": None,  # the default host loop, for reference
}


# --fresh: NeuroDiff's intermediate symbolic variables (forward_branch_and_bound(fresh_vars=k)),
# against the device loop's default and certify(method="bab") (the default path).
FRESH_VARIANTS = {
    "device loop": dict(),
    "fresh 2": dict(fresh_vars=2),
    "fresh 4": dict(fresh_vars=4),
    "certify bab": "certify",
}
# --fresh-scope: variables for d only against variables for z, z_q and d (fresh_scope="all").
SCOPE_VARIANTS = {
    "fresh 2, d": dict(fresh_vars=2),
    "fresh 2, all": dict(fresh_vars=2, fresh_scope="all"),
    "fresh 4, all": dict(fresh_vars=4, fresh_scope="all"),
}
# --fresh-tune: counts between those.
TUNE_VARIANTS = {
    "fresh 2, d": dict(fresh_vars=2),
    "fresh 3, d": dict(fresh_vars=3),
    "fresh 1, all": dict(fresh_vars=1, fresh_scope="all"),
}


def bench_neurodiff(reps: int, budget: float = 10.0, nets=range(1, 10), variants=None):
  from bench_tight import _pairs

  variants = NEURODIFF_VARIANTS if variants is None else variants
  for k in nets:
    pair = _pairs(f"ACASXU_run2a_1_{k}_batch_2000")
    merged = qb.merge(*pair, PROPERTY_1)

    def run(kw):
      if kw is None:
        return branch_and_bound(merged, PROPERTY_1, outputs=[0], epsilon=0.05, time_budget=budget)
      if kw == "certify":  # the whole default path, as a user calls it
        return qb.certify(*pair, PROPERTY_1, method="bab", epsilon=0.05, outputs=[0])  # its own budget
      return forward_branch_and_bound(merged, PROPERTY_1, outputs=[0], epsilon=0.05, time_budget=budget, **kw)

    first = {name: _timed(lambda: run(kw))[0] for name, kw in variants.items()}
    times = {name: [] for name in variants}
    last = {}
    for _ in range(reps):
      for name, kw in variants.items():
        seconds, last[name] = _timed(lambda: run(kw))
        times[name].append(seconds)
    for name in variants:
      res = last[name]
      print(json.dumps({"net": f"1_{k}", "variant": name, "first_s": round(first[name], 2),
                        "warm_s": round(float(np.median(times[name])), 3),
                        "pieces": getattr(res, "pieces_bounded", None),
                        "stopped": getattr(res, "stopped", None), "upper": round(float(res.upper), 4),
                        "load": round(os.getloadavg()[0], 1)}), flush=True)


def bench_certify(reps: int, fresh_counts, nets=range(1, 10), outputs=(0,), scope=None):
  """``qb.certify(f, fq, box, method="bab", epsilon=0.05, outputs=...)`` with the host loop (the
  default) and with ``certify.BAB_DEVICE_FRESH_VARS = k`` (the device loop with k fresh variables per
  layer), interleaved call by call in one process after two warm-up calls of each."""
  from bench_tight import _pairs
  C = importlib.import_module("qbound.certify")  # the module: qbound.certify is the function

  C.BAB_DEVICE_FRESH_SCOPE = scope
  variants = {"host": None, **{f"device, fresh {k}": k for k in fresh_counts}}
  outs = None if outputs is None else list(outputs)
  for k in nets:
    pair = _pairs(f"ACASXU_run2a_1_{k}_batch_2000")
    times = {name: [] for name in variants}
    uppers = {}
    for name, count in variants.items():  # warm: until a call proves (a first call returns at its
      C.BAB_DEVICE_FRESH_VARS = count     # budget while its thread compiles on), at most 8 calls
      for _ in range(8):
        if qb.certify(*pair, PROPERTY_1, method="bab", epsilon=0.05, outputs=outs).upper <= 0.05:
          break
    for rep in range(reps):
      for name, count in variants.items():
        C.BAB_DEVICE_FRESH_VARS = count
        seconds, cert = _timed(lambda: qb.certify(*pair, PROPERTY_1, method="bab", epsilon=0.05, outputs=outs))
        times[name].append(seconds)
        uppers[name] = float(cert.upper)
    C.BAB_DEVICE_FRESH_VARS = None
    print(json.dumps({"net": f"1_{k}", "outputs": "all" if outputs is None else list(outputs),
                      **{name: round(float(np.median(t)), 3) for name, t in times.items()},
                      **{f"{name} upper": round(u, 4) for name, u in uppers.items()},
                      "load": round(os.getloadavg()[0], 1)}), flush=True)


def bench_first_calls(fresh, net=1, calls=8, scope=None):
  """In this (fresh) process: ``certify(method="bab", epsilon=0.05, outputs=[0])`` on ACAS Xu 1_net
  vs float16 called until one proves (at most ``calls``), with the host loop (``fresh`` None) or the
  device loop; each call's seconds, and the seconds from the first call's start to the proof. Run it
  in new processes, with ``QBOUND_JAX_CACHE=0`` (cold) and without (JAX's persistent cache)."""
  from bench_tight import _pairs
  C = importlib.import_module("qbound.certify")

  C.BAB_DEVICE_FRESH_VARS = fresh
  C.BAB_DEVICE_FRESH_SCOPE = scope
  pair = _pairs(f"ACASXU_run2a_1_{net}_batch_2000")
  start, seconds, proved = time.perf_counter(), [], False
  for _ in range(calls):
    t, cert = _timed(lambda: qb.certify(*pair, PROPERTY_1, method="bab", epsilon=0.05, outputs=[0]))
    seconds.append(round(t, 2))
    if cert.upper <= 0.05:
      proved = True
      break
  print(json.dumps({"net": f"1_{net}", "variant": "host" if fresh is None else f"device, fresh {fresh}",
                    "cache": os.environ.get("QBOUND_JAX_CACHE", "default"), "calls_s": seconds, "proved": proved,
                    "to_proof_s": round(time.perf_counter() - start, 1), "load": round(os.getloadavg()[0], 1)}),
        flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--acas", action="store_true")
  parser.add_argument("--small", action="store_true")
  parser.add_argument("--differing", action="store_true")
  parser.add_argument("--neurodiff", action="store_true")
  parser.add_argument("--fresh", action="store_true", help="NeuroDiff's intermediate variables (FRESH_VARIANTS)")
  parser.add_argument("--fresh-scope", action="store_true", help="variables for d only or all three (SCOPE_VARIANTS)")
  parser.add_argument("--fresh-tune", action="store_true", help="other counts (TUNE_VARIANTS)")
  parser.add_argument("--acas-nets", type=int, nargs="+", default=list(range(1, 10)))
  parser.add_argument("--certify", type=int, nargs="*", default=None,
                      help="certify(method='bab'): the host loop against the device loop with these fresh counts")
  parser.add_argument("--first-calls", choices=["host", "device"], default=None,
                      help="in this process, certify until it proves (run in fresh processes; see bench_first_calls)")
  parser.add_argument("--fresh-count", type=int, default=2)
  parser.add_argument("--scope", default=None, help="certify.BAB_DEVICE_FRESH_SCOPE for --certify and --first-calls")
  parser.add_argument("--reps", type=int, default=2)
  parser.add_argument("--nets", type=int, nargs="+", default=[1, 5])
  args = parser.parse_args(argv)
  if args.acas:
    bench_acas(args.reps, budget=10.0)
  if args.small:
    bench_small()
  if args.differing:
    bench_differing(args.nets, budget=20.0)
  if args.neurodiff:
    bench_neurodiff(args.reps, nets=args.acas_nets)
  if args.fresh:
    bench_neurodiff(args.reps, nets=args.acas_nets, variants=FRESH_VARIANTS)
  if args.fresh_scope:
    bench_neurodiff(args.reps, nets=args.acas_nets, variants=SCOPE_VARIANTS)
  if args.fresh_tune:
    bench_neurodiff(args.reps, nets=args.acas_nets, variants=TUNE_VARIANTS)
  if args.first_calls:
    bench_first_calls(None if args.first_calls == "host" else args.fresh_count, scope=args.scope)
  if args.certify is not None:
    bench_certify(args.reps, args.certify or [2], nets=args.acas_nets, scope=args.scope)


if __name__ == "__main__":
  main()
