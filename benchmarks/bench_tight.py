"""Tightness and speed of qbound's certificates against exact values and published baselines.

Prints, in one run:
  1. exactness: certify(method="auto") vs the exact maximal error (bracketed by the MILP and a
     long branch and bound) on small random ReLU nets;
  2. MNIST 3x100 vs its 16-bit copy (radius 3/255, images 0..9): differential vs CROWN on the
     merged network vs NeuroDiff's published numbers (../shared/bench/README.md);
  3. HAR vs its 16-bit copy (radius 0.1, inputs 0..9): same columns;
  4. ACAS Xu 1_1 vs its 16-bit copy on property 1's box, output 0: epsilon 0.05 proved, and the
     maximal error certified to upper/lower <= 1.1, by branch and bound;
  5. ACAS Xu 1_1..1_9 vs their 16-bit copies, property 1, epsilon 0.05 through
     ``qb.certify(method="bab")``: output 0, and all five outputs in one call (median of 3 warm calls
     per net; NeuroDiff: 0.23-0.26 s per output, idle);
  6. (``--only acas-profile``, not in the default run) where the time of those warm calls goes: per
     net, pieces and batches of branch and bound, milliseconds per batch, and the wall time split
     into the batches' bounds, the counterexample search's rounds (:mod:`qbound.bounds.refute`),
     the rest of branch and bound (probes, splitting, the heap) and the rest of ``certify``
     (tracing, the first search, checks); and, interleaved in the same run, the same call without
     the search rounds (``qbound.bounds.refute.ENABLED = False``).
Compilation is timed separately (the first input of each table) from the per-input times.

Run: ``python benchmarks/bench_tight.py [--only exact,mnist,har,acas,acas-nets,acas-profile] [--cache DIR]
[--reference-seconds 30]``.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import bab_machine, fused
from qbound.bounds.bab import branch_and_bound
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds

BENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench"
NEURODIFF_MNIST = [0.004422, 0.004010, 0.003584, 0.003261, 0.002380, 0.002258, 0.002588, 0.004675, 0.003916, 0.003862]
NEURODIFF_HAR = [0.002819, 0.002596, 0.002315, 0.002442, 0.002249, 0.002314, 0.002252, 0.002095, 0.002130, 0.002041]


def max_abs(bounds) -> float:
  lo, hi = (np.asarray(b, np.float64) for b in bounds)
  return float(max(-lo.min(), hi.max()))


def random_net(key, widths):
  keys = jax.random.split(key, len(widths))
  layers = []
  for k, (n_in, n_out) in zip(keys, zip(widths[:-1], widths[1:])):
    kw, kb = jax.random.split(k)
    layers.append({"kernel": jax.random.normal(kw, (n_in, n_out)) / np.sqrt(n_in),
                   "bias": 0.1 * jax.random.normal(kb, (n_out,))})
  return {"params": {f"dense_{i}": layer for i, layer in enumerate(layers)}}


def mlp_apply(params, x):
  layers = params["params"]
  for i in range(len(layers)):
    x = x @ layers[f"dense_{i}"]["kernel"] + layers[f"dense_{i}"]["bias"]
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def exact_net(i: int):
  """The exactness table's net ``i``: ``(f, fq, box, widths, bits)`` (the same draws as the table:
  net ``i`` takes the ``i``-th draws of one generator seeded 0)."""
  rng = np.random.default_rng(0)
  for k in range(i + 1):
    n_in = int(rng.integers(2, 6))
    hidden = [int(rng.choice([8, 12, 16])) for _ in range(int(rng.integers(2, 4)))]
    widths = [n_in, *hidden, 2]
    bits = int(rng.choice([3, 4, 6, 8]))
  params = random_net(jax.random.key(i), widths)
  qparams = qb.quantize.uniform(params, bits=bits)
  f, fq = functools.partial(mlp_apply, params), functools.partial(mlp_apply, qparams)
  return f, fq, qb.Box(-jnp.ones(n_in), jnp.ones(n_in)), widths, bits


def bench_exact(n_nets: int = 12, budget: float = 4.5, reference_seconds: float = 30.0):
  """certify(method="auto") within ``budget`` seconds against the exact maximal error.

  The exact value is bracketed by two independent long runs per net: HiGHS on the MILP and branch
  and bound to a 0.1% gap, each with ``reference_seconds``; ``exact in [lo, hi]`` is the tightest
  bracket they (and the certificate) prove. ``upper/exact <=`` divides by ``lo``, so it is an
  upper bound on the true ratio. The first ``s`` column is the first call on the net (compiling
  its new layer shapes, in a process that has certified the nets above it); the second is a
  second call, compiled.
  """
  print(f"\n== 1. exactness: certify(method='auto', time_budget={budget}) vs the exact maximal error on small "
        "random ReLU nets ==")
  print(f"{'net':<18}{'bits':>5}{'exact in [lo, hi]':>26}{'upper':>11}{'upper/exact <=':>16}{'lower':>11}"
        f"{'method':>8}{'s first':>9}{'s again':>9}{'milp':>16}")
  ratios, firsts, agains = [], [], []
  for i in range(n_nets):
    f, fq, box, widths, bits = exact_net(i)
    cert = qb.certify(f, fq, box, method="auto", time_budget=budget, target_gap=0.02)
    again = qb.certify(f, fq, box, method="auto", time_budget=budget, target_gap=0.02)
    exact = qb.exact.milp(f, fq, box, time_limit=reference_seconds)
    reference = branch_and_bound(qb.merge(f, fq, box), box, time_budget=reference_seconds, target_gap=1e-3,
                                 initial_lower=max(exact.value, cert.lower), initial_witness=exact.maximizer)
    lo = max(exact.value, reference.lower, cert.lower, again.lower)
    hi = min(exact.upper, reference.upper, cert.upper, again.upper)
    ratio = cert.upper / lo
    ratios.append(ratio)
    firsts.append(cert.seconds)
    agains.append(again.seconds)
    name = "-".join(map(str, widths))
    milp = f"{exact.seconds:.1f} s" + (" optimal" if exact.optimal else " limit")
    print(f"{name:<18}{bits:>5}{f'[{lo:.6f}, {hi:.6f}]':>26}{cert.upper:>11.6f}{ratio:>16.4f}{cert.lower:>11.6f}"
          f"{cert.method:>8}{cert.seconds:>9.2f}{again.seconds:>9.2f}{milp:>16}", flush=True)
  ok = sum(r <= 1.02 and s < 5 for r, s in zip(ratios, firsts))
  print(f"upper/exact: max {max(ratios):.4f}, median {np.median(ratios):.4f}; within 1.02 in under 5 s (first "
        f"call): {ok}/{len(ratios)}; time: first call max {max(firsts):.2f} s, again max {max(agains):.2f} s")


def _pairs(name):
  f_app, fp = qb.io.load_nnet(BENCH / "nnet" / f"{name}.nnet")
  q_app, qp = qb.io.load_nnet(BENCH / "nnet_16bit" / f"{name}_16bit.nnet")
  return functools.partial(f_app, fp), functools.partial(q_app, qp)


def _table(title, f, fq, boxes, baseline):
  print(f"\n== {title} ==")
  print(f"{'input':>5}{'diff (qbound)':>15}{'CROWN merged':>14}{'ratio':>8}{'NeuroDiff':>11}{'sampled':>11}"
        f"{'diff s':>9}{'CROWN s':>9}")
  diff_t, rows = [], []
  for k, box in enumerate(boxes):
    merged = qb.merge(f, fq, box)
    t0 = time.perf_counter()
    _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, True, True)
    d = jax.block_until_ready(d[merged.f_graph.output])
    t1 = time.perf_counter()
    c = jax.block_until_ready(crown_bounds(merged.graph, box, None, True)[merged.graph.output])
    t2 = time.perf_counter()
    reached, _ = qb.maximize_error(merged, box)
    dv, cv = max_abs(d), max_abs(c)
    rows.append((dv, cv))
    if k > 0:
      diff_t.append(t1 - t0)
    print(f"{k:>5}{dv:>15.6f}{cv:>14.4f}{cv / dv:>8.1f}{baseline[k]:>11.6f}{reached:>11.6f}{t1 - t0:>9.3f}{t2 - t1:>9.3f}"
          + ("  (includes compilation)" if k == 0 else ""))
  ours = np.array([r[0] for r in rows])
  print(f"diff <= NeuroDiff on {int(np.sum(ours <= np.array(baseline)))}/{len(rows)} inputs; "
        f"diff tighter than CROWN by {min(r[1] / r[0] for r in rows):.0f}x or more; "
        f"warm diff time {np.mean(diff_t):.3f} s per input (NeuroDiff: 0.12-0.19 s MNIST, ~0.075 s HAR)")


def bench_mnist():
  f, fq = _pairs("mnist_relu_3_100")
  pixels = np.load(BENCH / "inputs" / "mnist100_pixels_uint8.npy").astype(np.float32).reshape(100, -1)
  boxes = [qb.Box(jnp.asarray(np.maximum((p - 3) / 255, 0)), jnp.asarray(np.minimum((p + 3) / 255, 1)))
           for p in pixels[:10]]
  _table("2. MNIST 3x100 vs 16-bit copy, radius 3/255 (max over the 10 outputs)", f, fq, boxes, NEURODIFF_MNIST)


def bench_har():
  f, fq = _pairs("HAR")
  data = np.loadtxt(BENCH / "inputs" / "har_test.csv", delimiter=",", dtype=np.float64)[:10, 1:].astype(np.float32)
  boxes = [qb.Box(jnp.asarray(np.maximum(x - 0.1, -1)), jnp.asarray(np.minimum(x + 0.1, 1))) for x in data]
  _table("3. HAR vs 16-bit copy, radius 0.1 (max over the 6 outputs)", f, fq, boxes, NEURODIFF_HAR)


def bench_acas(budget: float):
  print("\n== 4. ACAS Xu 1_1 vs 16-bit copy, property 1 box, output 0 ==")
  f, fq = _pairs("ACASXU_run2a_1_1_batch_2000")
  box = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]), jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))
  merged = qb.merge(f, fq, box)
  reached, witness = qb.maximize_error(jax.jit(lambda x: merged.graph(x)[:1]), box)
  # Compile once on a throwaway run so that the table's times are solving times.
  t0 = time.perf_counter()
  branch_and_bound(merged, box, outputs=[0], time_budget=0.01, initial_lower=reached, initial_witness=witness)
  print(f"compilation (first run): {time.perf_counter() - t0:.1f} s")
  print(f"{'task':<34}{'upper':>12}{'lower':>12}{'up/low':>9}{'pieces':>9}{'s':>8}{'stopped':>10}")
  for task, kwargs in [("prove epsilon = 0.05", dict(epsilon=0.05, target_gap=0.0)),
                       ("certify max error to gap 1.1", dict(target_gap=0.1))]:
    res = branch_and_bound(merged, box, outputs=[0], time_budget=budget, initial_lower=reached,
                           initial_witness=witness, **kwargs)
    print(f"{task:<34}{res.upper:>12.3g}{res.lower:>12.3g}{res.upper / res.lower:>9.3g}{res.pieces_bounded:>9}"
          f"{res.seconds:>8.2f}{res.stopped:>10}")
  print("NeuroDiff: epsilon 0.05 proved in 0.23-0.26 s on an idle machine (213 splits); sampled maximum about 1.6e-5")


def bench_acas_nets(calls: int = 3):
  print("\n== 5. ACAS Xu 1_1..1_9 vs 16-bit copies, property 1, epsilon 0.05: qb.certify(method='bab') ==")
  box = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]), jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))
  print("warm: after two calls and fused.wait() (the walks' own programs compiled); 'steps': output 0 with "
        "bab_machine.FUSED_WALKS off, interleaved")
  print(f"{'net':<6}{'output 0: s':>13}{'steps: s':>10}{'upper':>10}{'all five: s':>13}{'upper':>10}")
  medians = []
  for i in range(1, 10):
    f, fq = _pairs(f"ACASXU_run2a_1_{i}_batch_2000")
    run = lambda outputs: qb.certify(f, fq, box, method="bab", epsilon=0.05, outputs=outputs, time_budget=30)
    run([0]), run(None)  # compile (and warm the caches) first
    fused.wait()

    def steps_only():
      bab_machine.FUSED_WALKS = False
      try:
        return run([0])
      finally:
        bab_machine.FUSED_WALKS = True

    one, steps, five = zip(*[(run([0]), steps_only(), run(None)) for _ in range(calls)])
    t1, ts, t5 = (np.median([c.seconds for c in cs]) for cs in (one, steps, five))
    medians.append((t1, ts, t5))
    print(f"1_{i:<4}{t1:>13.2f}{ts:>10.2f}{max(c.upper for c in one):>10.4f}{t5:>13.2f}"
          f"{max(c.upper for c in five):>10.4f}", flush=True)
  t1, ts, t5 = np.median(medians, axis=0)
  print(f"median over the nets: output 0 {t1:.3f} s (steps only {ts:.3f} s), all five {t5:.3f} s "
        "(NeuroDiff: 0.23-0.26 s per output, idle)")


class _Stopwatch:
  """Wall time spent inside a few functions (summed over threads and calls) while it is installed."""

  def __init__(self, targets):
    self.targets = targets  # (owner, attribute name, label, wait for the result's arrays)
    self.seconds = {label: 0.0 for _, _, label, _ in targets}
    self.calls = {label: 0 for _, _, label, _ in targets}
    self.last = {}
    self._saved = []

  def __enter__(self):
    for owner, name, label, block in self.targets:
      fn = getattr(owner, name)
      self._saved.append((owner, name, fn))

      def timed(*args, _fn=fn, _label=label, _block=block, **kwargs):
        t0 = time.perf_counter()
        out = _fn(*args, **kwargs)
        if _block:
          jax.block_until_ready(out)
        self.seconds[_label] += time.perf_counter() - t0
        self.calls[_label] += 1
        self.last[_label] = out
        return out

      setattr(owner, name, timed)
    return self

  def __exit__(self, *exc):
    for owner, name, fn in reversed(self._saved):
      setattr(owner, name, fn)


def bench_acas_profile(calls: int = 3):
  """Where the warm ``certify(method="bab", epsilon=0.05)`` calls of section 5 spend their time."""
  from qbound.bounds import bab, refute

  print("\n== 6. ACAS Xu 1_1..1_9 vs 16-bit copies, property 1, epsilon 0.05: where the warm time goes ==")
  print(f"the warm call of median time of {calls} per net; 'no search s': median of the same call without the "
        "search rounds, interleaved")
  box = qb.Box(jnp.array([55947.691, -3.141592, -3.141592, 1145, 0]),
               jnp.array([60760, 3.141592, 3.141592, 1200, 60.0]))
  print(f"{'net':<6}{'outputs':>8}{'s':>7}{'pieces':>8}{'batches':>8}{'ms/batch':>9}{'bounds s':>9}{'search s':>9}"
        f"{'bab rest':>9}{'certify rest':>13}{'no search s':>12}")
  rows = []
  for i in range(1, 10):
    f, fq = _pairs(f"ACASXU_run2a_1_{i}_batch_2000")
    for outputs, label in (([0], "0"), (None, "all")):
      run = lambda: qb.certify(f, fq, box, method="bab", epsilon=0.05, outputs=outputs, time_budget=30)
      run()  # compile (and warm the caches) first
      fused.wait()
      measured, plain = [], []
      for _ in range(calls):
        watch = _Stopwatch([(bab, "batch_bounds", "bounds", True), (refute.WorstPieceSearch, "run", "search", False),
                            (bab, "branch_and_bound", "bab", False)])
        with watch:
          t0 = time.perf_counter()
          cert = run()
          total = time.perf_counter() - t0
        assert cert.upper <= 0.05, cert.upper
        measured.append((total, watch.last["bab"].pieces_bounded, watch.calls["bounds"], watch.seconds["bounds"],
                         watch.seconds["search"], watch.seconds["bab"]))
        saved, refute.ENABLED = refute.ENABLED, False
        try:
          t0 = time.perf_counter()
          run()
          plain.append(time.perf_counter() - t0)
        finally:
          refute.ENABLED = saved
      # The breakdown of the call of median time (its parts add up), beside the median without search.
      total, pieces, batches, bounds, search, in_bab = sorted(measured)[len(measured) // 2]
      rows.append((total, np.median(plain)))
      print(f"1_{i:<4}{label:>8}{total:>7.2f}{pieces:>8.0f}{batches:>8.0f}{1000 * bounds / max(batches, 1):>9.1f}"
            f"{bounds:>9.2f}{search:>9.2f}{in_bab - bounds - search:>9.2f}{total - in_bab:>13.2f}"
            f"{np.median(plain):>12.2f}", flush=True)
  t = np.asarray(rows)
  print(f"median over nets and both output sets: {np.median(t[:, 0]):.2f} s, without the search rounds "
        f"{np.median(t[:, 1]):.2f} s")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="exact,mnist,har,acas,acas-nets")
  parser.add_argument("--acas-budget", type=float, default=60.0)
  parser.add_argument("--reference-seconds", type=float, default=30.0,
                      help="the exactness table's MILP and long branch and bound, each (a looser bracket if shorter)")
  parser.add_argument("--cache", default=None, help="a JAX persistent compilation cache directory")
  args = parser.parse_args(argv)
  if args.cache:
    # Every compiled step, however small: they are many and each compiles in well under a second.
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  only = set(args.only.split(","))
  if "exact" in only:
    bench_exact(reference_seconds=args.reference_seconds)
  if not BENCH.exists():
    print(f"\n{BENCH} is absent: skipping the MNIST, HAR and ACAS Xu tables.")
    return
  if "mnist" in only:
    bench_mnist()
  if "har" in only:
    bench_har()
  if "acas" in only:
    bench_acas(args.acas_budget)
  if "acas-nets" in only:
    bench_acas_nets()
  if "acas-profile" in only:
    bench_acas_profile()


if __name__ == "__main__":
  main()
