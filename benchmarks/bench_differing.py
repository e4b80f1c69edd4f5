"""Epsilon-equivalence of ACAS Xu nets and their pruned-and-retrained copies, beside VeryDiff.

VeryDiff (Teuber, Kern, Janzen and Beckert, "Revisiting Differential Verification: Equivalence
Verification with Confidence", TACAS 2025) reports, on its ``acas-prune`` family (ACAS Xu nets
against pruned-and-retrained copies, 10 nets x 10 properties, epsilon 0.05 over all five outputs,
120 s): 43 proved, 57 counterexamples, 0 unknown, median 0.24 s on the proved ones
(``../shared/bench/verydiff/README.md``). Its networks are not public here, so this benchmark runs
the same kind of instance on qbound's own family (``benchmarks/make_differing_pairs.py``): nets
1_1..1_9 of ``../shared/bench/nnet`` against their 10%-pruned, distilled copies, on the input boxes of
ACAS Xu properties 1-5 and 7-10 (Katz et al., "Reluplex", CAV 2017, Appendix VI;
``benchmarks/acas_properties.py``), for epsilon in {0.05, 0.5}. The networks take raw inputs and
normalise them as their .nnet files say (`qbound.io.load_nnet`), so the boxes are in raw units.

Each instance is one ``qb.certify(f, fq, box, epsilon=eps, time_budget=T)`` (method ``auto``: for
these 5-input paired nets, branch and bound on the input with differential bounds, as NeuroDiff,
Paulsen et al., ASE 2020, splits the input). Verdict: ``proved`` if ``upper <= eps``,
``counterexample`` if ``lower > eps`` (an input whose float64 error exceeds eps), else
``undecided``. Before the table, one warm-up call on the first instance compiles the bound steps,
with the full budget (a shorter one left row counts that later pieces need uncompiled, so the
first instances of the table paid for compiling); its time is reported as the cold time, and every
time in the table is warm.

``--pieces`` measures instead how tight one bound is on small boxes: for 1_1 against its pruned copy
and against its float16 copy (``../shared/bench/nnet_16bit``), on random sub-boxes of property 1's
box whose edges are 1/2, 1/4, ..., 1/64 of the box's, each method's bound on ``max |f - f_q|``
divided by the error reached there (``qb.maximize_error`` on the merged net). Methods are the
entries of `PIECE_METHODS` (name -> ``callable(f, fq, box) -> Box`` of bounds on ``f - f_q``);
add one there (or pass ``methods=`` to `main`) to put a new method in the table.

Run from the repository root::

    python benchmarks/bench_differing.py                         # 9 nets x 9 boxes x 2 eps, <= 20 s each
    python benchmarks/bench_differing.py --nets 1 2 3 --props 1 3 --eps 0.05 --time-budget 5
    python benchmarks/bench_differing.py --smoke                 # 1_1, property 1, eps 0.05, 2 s
    python benchmarks/bench_differing.py --pieces [--pieces-per-size 20]
    python benchmarks/bench_differing.py --zonotope --warmup-budget 60   # branch and bound with differential zonotopes
    # old and new in the same run, interleaved per instance, on the instances an earlier run left undecided:
    python benchmarks/bench_differing.py --undecided-from results/bench_differing/results.csv --candidates 2 1
    python benchmarks/bench_differing.py --nets 9 8 7 --props 8 --eps 0.05 --relu-split both
    # optimised slopes against the default ones on the 20 worst open pieces after 15 s (stalled_pieces):
    python benchmarks/bench_differing.py --stalled --nets 9 --props 8 --time-budget 15

Writes ``results/bench_differing/results.csv`` (``pieces.csv`` in ``--pieces`` mode; under
``results/smoke/`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping

# Cold times are real compile times: no persistent compilation cache unless QBOUND_JAX_CACHE asks.
os.environ.setdefault("QBOUND_JAX_CACHE", "0")

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import acas_properties  # noqa: E402  (needs the path above)
from common import table, write_csv  # noqa: E402  (experiments/common.py: one table and CSV format)

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = pathlib.Path(os.environ.get("QBOUND_BENCH", ROOT.parent / "shared" / "bench"))
PAIRS = ROOT / "benchmarks" / "data" / "acas_pruned"
NAME = "ACASXU_run2a_1_{k}_batch_2000"

# VeryDiff's own published run on acas-prune (../shared/bench/verydiff/README.md).
VERYDIFF = dict(tool="VeryDiff (published)", family="acas-prune", eps=0.05, instances=100, proved=43,
                counterexample=57, undecided=0, median_proved_s=0.24, timeout_s=120)

VERDICTS = ("proved", "counterexample", "undecided")



# --- networks -------------------------------------------------------------------------------------

def load(path: pathlib.Path) -> Callable:
  """The network of a .nnet file as a function of one raw input (normalised inside)."""
  apply, params = qb.io.load_nnet(path)
  return functools.partial(apply, params)


def acas_pair(k: int, copy: str = "pruned10") -> tuple[Callable, Callable]:
  """``(f, fq)``: ACAS Xu net 1_k and its copy (``pruned10``, ``pruned5``, ``pruned30`` or ``16bit``)."""
  name = NAME.format(k=k)
  if copy == "16bit":
    other = BENCH / "nnet_16bit" / f"{name}_16bit.nnet"
  else:
    other = PAIRS / f"{name}_{copy}.nnet"
  if not other.exists():
    raise FileNotFoundError(f"{other} is missing; build it with python benchmarks/make_differing_pairs.py")
  return load(BENCH / "nnet" / f"{name}.nnet"), load(other)


def verdict(cert: qb.Certificate, eps: float) -> str:
  """``proved`` if the proven bound is at most eps, ``counterexample`` if a reached error exceeds it."""
  if cert.upper <= eps:
    return "proved"
  if cert.lower > eps:
    return "counterexample"
  return "undecided"


# --- certify table --------------------------------------------------------------------------------

def run_instance(f, fq, net: str, prop: str, eps: float, budget: float) -> dict:
  """One certify call; a row of the table. An exception becomes verdict ``error`` (and is printed):
  a long run should not be lost to one instance, but an error is never counted as decided."""
  box = acas_properties.get(prop).raw_box()
  start = time.perf_counter()
  try:
    cert = qb.certify(f, fq, box, epsilon=eps, time_budget=budget, key=jax.random.key(0))
  except Exception as e:  # noqa: BLE001  (reported in the row and on the console)
    print(f"  ERROR on {net} property {prop} eps {eps}: {type(e).__name__}: {e}", flush=True)
    return dict(net=net, prop=prop, eps=eps, verdict="error", upper=math.nan, lower=math.nan,
                seconds=time.perf_counter() - start, method=type(e).__name__, diff_root=math.nan,
                interval=math.nan)
  # "diff_root": the differential bound on the whole box (branch and bound's first batch), the
  # bound VeryDiff reports as its first (3252 on 1_1, property 1, against its own pruned copy).
  return dict(net=net, prop=prop, eps=eps, verdict=verdict(cert, eps), upper=cert.upper, lower=cert.lower,
              seconds=cert.seconds, method=cert.method, diff_root=cert.bounds.get("diff", math.nan),
              interval=cert.bounds.get("interval", math.nan))


def summarise(rows: list[dict], eps: float) -> dict:
  chosen = [r for r in rows if r["eps"] == eps]
  counts = {v: sum(r["verdict"] == v for r in chosen) for v in VERDICTS}
  proved_s = [r["seconds"] for r in chosen if r["verdict"] == "proved"]
  decided_s = [r["seconds"] for r in chosen if r["verdict"] in ("proved", "counterexample")]
  med = lambda xs: float(np.median(xs)) if xs else math.nan
  return dict(tool="qbound (this run)", family="pruned10 (ours)", eps=eps, instances=len(chosen), **counts,
              errors=sum(r["verdict"] == "error" for r in chosen), median_proved_s=med(proved_s),
              median_decided_s=med(decided_s), max_decided_s=max(decided_s, default=math.nan))


def bench_certify(nets, props, epsilons, budget: float, out: pathlib.Path, warm_budget=None,
                  variants=(("default", {}),), only=None) -> list[dict]:
  """``variants``: ``(label, {name: value})`` settings of :mod:`qbound.bounds.bab`'s module constants
  each instance runs with in turn (old and new in the same run, interleaved); ``only``: the set of
  ``(net, prop, eps)`` to run (e.g. the undecided ones of an earlier run), None for all."""
  from qbound.bounds import bab, bab_batch, refute
  # A setting names a constant of bab or of its batch bounding (bab_batch), or of refute as "refute.NAME".
  owner = lambda name: ((refute, name[len("refute."):]) if name.startswith("refute.")  # noqa: E731
                        else (bab if hasattr(bab, name) else bab_batch, name))
  defaults = {name: getattr(*owner(name)) for _, setting in variants for name in setting}

  def use(setting):
    for name, value in {**defaults, **setting}.items():
      setattr(*owner(name), value)

  first_f, first_fq = acas_pair(nets[0])
  # Warm-up: the first instance, so that the table's times exclude compiling the bound steps
  # (compiled per layer shape and row count, and shared by every ACAS Xu pair).
  warm_budget = budget if warm_budget is None else warm_budget
  use(variants[-1][1])
  warm = run_instance(first_f, first_fq, f"1_{nets[0]}", props[0], epsilons[0], warm_budget)
  print(f"cold: first call (compilation included, budget {warm_budget:g} s) on 1_{nets[0]} property {props[0]} "
        f"eps {epsilons[0]}: {warm['verdict']}, upper {warm['upper']:.4g}, lower {warm['lower']:.4g}, "
        f"{warm['seconds']:.2f} s", flush=True)

  rows = []
  header = (f"{'net':>4} {'prop':>4} {'eps':>5} {'verdict':>14} {'upper':>11} {'lower':>11} {'s':>7} "
            f"{'diff_root':>10}  method")
  print(f"\nwarm, time budget {budget:g} s per instance\n{header}\n{'-' * len(header)}", flush=True)
  for k in nets:
    f, fq = (first_f, first_fq) if k == nets[0] else acas_pair(k)
    for prop in props:
      for eps in epsilons:
        if only is not None and (f"1_{k}", str(prop), float(eps)) not in only:
          continue
        for label, setting in variants:
          use(setting)
          row = run_instance(f, fq, f"1_{k}", prop, eps, budget)
          row["variant"] = label
          rows.append(row)
          print(f"{row['net']:>4} {row['prop']:>4} {row['eps']:>5g} {row['verdict']:>14} {row['upper']:>11.4g} "
                f"{row['lower']:>11.4g} {row['seconds']:>7.2f} {row['diff_root']:>10.4g}  {row['method']}"
                f"{'' if len(variants) == 1 else ', ' + label}", flush=True)
  use({})
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / "results.csv", rows)

  summary = []
  for label, _ in variants:
    for eps in epsilons:
      s = summarise([r for r in rows if r["variant"] == label], eps)
      if len(variants) > 1:
        s["tool"] += f", {label}"
      summary.append(s)
  summary.append(VERYDIFF)
  cols = ["tool", "family", "eps", "instances", "proved", "counterexample", "undecided", "errors",
          "median_proved_s", "median_decided_s", "timeout_s"]
  for s in summary[:-1]:
    s["timeout_s"] = budget
  print()
  print(table(summary, cols, title="summary (qbound: warm times; VeryDiff: its published acas-prune run, "
                                   "other networks and hardware)"))
  same = [r for r in rows if (r["net"], r["prop"], r["eps"]) == (warm["net"], warm["prop"], warm["eps"])]
  if same:
    print(f"cold vs warm on {warm['net']} property {warm['prop']} eps {warm['eps']}: {warm['seconds']:.2f} s "
          f"first call (budget {warm_budget:g} s), {same[0]['seconds']:.2f} s warm (budget {budget:g} s, "
          f"{same[0]['verdict']})")
  print(f"wrote {out / 'results.csv'}")
  return rows


# --- optimised slopes on stalled pieces -----------------------------------------------------------

class _OpenPieces:
  """Stands in for branch and bound's ``heapq`` to keep a reference to its heap: after the run,
  the pieces still open (the heap's items, see :func:`qbound.bounds.bab.branch_and_bound`)."""

  def __init__(self):
    import heapq
    self._heapq, self.heap = heapq, None

  def heappush(self, heap, item):
    self.heap = heap
    self._heapq.heappush(heap, item)

  def heappop(self, heap):
    return self._heapq.heappop(heap)


def _prior_lists(fg, items):
  """The kept bounds of heap items as :func:`qbound.bounds.sparse.diff_bounds_sparse`'s ``prior``."""
  from qbound.bounds import bab_batch
  nodes = bab_batch.kept_nodes(fg, True)
  k = len(nodes)
  prior = tuple([None] * len(fg.nodes) for _ in range(3))
  for j in range(3):
    for n, i in enumerate(nodes):
      entry = j * k + n
      prior[j][i] = tuple(jnp.asarray(np.stack([it[8][entry][side] for it in items])) for side in (0, 1))
  return prior


def stalled_pieces(f, fq, box: qb.Box, *, budget: float, worst: int = 20, steps=(20, 100), outputs=None,
                   label: str = "", warmup: float = 8.0) -> list[dict]:
  """Optimised slopes against the default ones (and against one input split) on the ``worst`` open
  pieces of a branch-and-bound run of ``budget`` seconds, each from the bounds it inherited.

  Per piece: its own bound (branch and bound's), the default slopes' bound recomputed from the
  inherited bounds (the sparse passes, as branch and bound does), the optimised slopes' after each
  number of Adam ``steps`` (started at the default ones), ``z - z_q`` from each network's own
  bounds at the output, that with alpha-CROWN on each network's output (``steps[0]`` steps, piece
  by piece), the best input split (the larger of the two halves' bounds, the best dimension), and
  the seconds each took for the batch of pieces.
  A first run of ``warmup`` seconds compiles the steps, so that the measured run is warm.
  """
  from qbound.bounds import bab
  from qbound.bounds.alpha import diff_alpha_pieces
  merged = qb.merge(f, fq, box)
  fg, qg = merged.f_graph, merged.fq_graph
  bab.branch_and_bound(merged, box, outputs=outputs, time_budget=warmup, target_gap=0.0)
  spy = _OpenPieces()
  real = bab.heapq
  bab.heapq = spy
  try:
    res = bab.branch_and_bound(merged, box, outputs=outputs, time_budget=budget, target_gap=0.0)
  finally:
    bab.heapq = real
  out_idx = np.arange(fg.nodes[fg.output].size) if outputs is None else np.asarray(outputs)
  items = sorted(spy.heap, key=lambda it: it[0])[:worst]
  print(f"{label}: branch and bound {budget:g} s: upper {res.upper:.4g}, lower {res.lower:.4g}, "
        f"{res.pieces_bounded} pieces, {len(spy.heap)} open; the {len(items)} worst open bound "
        f"{-items[-1][0]:.4g}-{-items[0][0]:.4g}", flush=True)
  lo = jnp.asarray(np.stack([it[2] for it in items]).reshape(len(items), *box.shape))
  hi = jnp.asarray(np.stack([it[3] for it in items]).reshape(len(items), *box.shape))
  prior = _prior_lists(fg, items)

  rows = [dict(pair=label, piece=k, own=-it[0], depth=it[9]) for k, it in enumerate(items)]
  for n in (0, *steps):
    for repeat in range(2):  # the first call compiles: time the second
      t0 = time.perf_counter()
      optimised, default = diff_alpha_pieces(fg, qg, lo, hi, prior=prior, outputs=out_idx, steps=n)
      value = worst_of_n(jax.block_until_ready(optimised), out_idx, len(items))
      seconds = time.perf_counter() - t0
    for r, v in zip(rows, value):
      r[f"alpha{n}"] = v
      r[f"alpha{n}_s"] = seconds
  # Which bound is active: on ACAS Xu's stalled pieces it is z - z_q from each network's own CROWN
  # bounds at the output (met in the sparse passes' ``z = z_q + d``), not the differential pass.
  # So also: alpha-CROWN on f's and on f_q's output, piece by piece, from the piece's bounds.
  from qbound.bounds.alpha import crown_alpha_node
  from qbound.bounds.sparse import diff_bounds_sparse
  dense = diff_bounds_sparse(fg, qg, qb.Box(lo, hi), prior=prior, outputs=out_idx)
  t = fg.output
  (zl, zu), (ql, qu) = ((np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in (dense.z[t], dense.zq[t]))
  naive = worst_of_n((zl - qu, zu - ql), out_idx, len(items))
  own_alpha = np.empty(len(items))
  t0 = time.perf_counter()
  for k in range(len(items)):
    piece = qb.Box(lo[k], hi[k])
    ends = []
    for graph, bounds, (low, high) in ((fg, dense.z, (zl[k], zu[k])), (qg, dense.zq, (ql[k], qu[k]))):
      a, b = crown_alpha_node(graph, t, [(x[k], y[k]) for x, y in bounds], piece, steps=steps[0])
      ends.append((np.maximum(np.asarray(a, np.float64), low), np.minimum(np.asarray(b, np.float64), high)))
    (fl, fh), (gl, gh) = ends
    own_alpha[k] = min(worst_of_n((fl - gh, fh - gl), out_idx, 1)[0], rows[k][f"alpha{steps[0]}"])
  own_seconds = time.perf_counter() - t0  # (the first piece compiles)
  for r, v, w in zip(rows, naive, own_alpha):
    r["z_minus_zq"] = v
    r[f"crown_alpha{steps[0]}_f_and_fq"] = w
    r[f"crown_alpha{steps[0]}_f_and_fq_s"] = own_seconds
  # The best input split: both halves along every dimension, with the piece's bounds as prior.
  dims = int(np.prod(box.shape))
  best = np.full(len(items), np.inf)
  split_seconds = 0.0
  for axis in range(dims):
    halves = [bab.split_at(it[2], it[3], axis) for it in items]
    los = [it[2] for it in items] + [h[1] for h in halves]
    his = [h[0] for h in halves] + [it[3] for it in items]
    both = items + items
    for repeat in range(2):
      t0 = time.perf_counter()
      _, default = diff_alpha_pieces(fg, qg, jnp.asarray(np.stack(los).reshape(2 * len(items), *box.shape)),
                                     jnp.asarray(np.stack(his).reshape(2 * len(items), *box.shape)),
                                     prior=_prior_lists(fg, both), outputs=out_idx, steps=0)
      value = worst_of_n(default, out_idx, 2 * len(items))
      seconds = time.perf_counter() - t0
    split_seconds += seconds
    best = np.minimum(best, np.maximum(value[:len(items)], value[len(items):]))
  for r, v in zip(rows, best):
    r["input_split"] = v
    r["input_split_s"] = split_seconds
  return rows


def worst_of_n(bounds, out_idx, n):
  """Each of ``n`` pieces' largest ``|f - f_q|`` bound over the outputs ``out_idx``."""
  blo, bhi = (np.asarray(b, np.float64).reshape(n, -1)[:, out_idx] for b in bounds)
  return np.maximum(-blo, bhi).max(1)


# --- tightness on pieces --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def merged(f, fq) -> qb.MergedNetwork:
  """The merged network of a pair, traced once (any box of the input's shape serves as example)."""
  return qb.merge(f, fq, jnp.zeros(5, jnp.float32))


def _crown_merged(f, fq, box):
  return qb.bounds.crown(merged(f, fq), box)


def _diff(f, fq, box):
  return qb.bounds.diff(merged(f, fq), None, box)


# name -> callable(f, fq, box) -> Box of proven bounds on f(x) - fq(x) over the box. Add an entry
# to put a new method in the pieces table.
def _forward(f, fq, box):
  return qb.bounds.forward_diff(merged(f, fq), None, box)


def _diff_alpha(f, fq, box, everywhere=False):
  """Optimised differential slopes (20 Adam steps, started at the default ones)."""
  from qbound.bounds.alpha import diff_alpha_bounds
  m = merged(f, fq)
  _, _, d = diff_alpha_bounds(m.f_graph, m.fq_graph, box, steps=20, everywhere=everywhere)
  return qb.Box(*d[m.f_graph.output])


def _host(f, fq, box, hidden=True):
  """The NumPy search's bound on one piece (qbound.bounds.host_bounds; its size gate lifted, and
  with or without the backward pass for hidden layers)."""
  import dataclasses

  from qbound.bounds import host_bab, host_bounds, host_chain
  saved = host_chain.MAX_NEURONS, host_bounds.HIDDEN_BACKWARD
  host_chain.MAX_NEURONS, host_bounds.HIDDEN_BACKWARD = 10**6, hidden
  try:
    chain = host_bab.chain_of(merged(f, fq))
    lo, hi = host_bab.map_box(chain, np.asarray(box.lower, np.float64)[None], np.asarray(box.upper, np.float64)[None])
    dl, du, *_ = host_bounds.bound_pieces(dataclasses.replace(chain, prefix=()), lo, hi)
  finally:
    host_chain.MAX_NEURONS, host_bounds.HIDDEN_BACKWARD = saved
  return qb.Box(dl[0], du[0])


PIECE_METHODS: dict[str, Callable] = {"crown (merged)": _crown_merged, "diff": _diff, "forward": _forward,
                                      "diff alpha": _diff_alpha,
                                      "diff alpha everywhere": functools.partial(_diff_alpha, everywhere=True),
                                      "host": _host, "host forward": functools.partial(_host, hidden=False)}
DEFAULT_PIECE_METHODS = ("crown (merged)", "diff", "forward")


def random_pieces(box: qb.Box, fraction: float, count: int, rng: np.random.Generator) -> list[qb.Box]:
  """``count`` sub-boxes whose every edge is ``fraction`` of the box's, placed uniformly inside it."""
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  edge = fraction * (hi - lo)
  pieces = []
  for _ in range(count):
    start = lo + rng.uniform(size=lo.shape) * (hi - lo - edge)
    low = np.clip(start, lo, hi).astype(np.float32)
    high = np.clip(start + edge, lo, hi).astype(np.float32)
    pieces.append(qb.Box(jnp.asarray(np.minimum(low, high)), jnp.asarray(high)))
  return pieces


def bench_pieces(methods: Mapping[str, Callable], per_size: int, sizes, out: pathlib.Path, seed: int = 0):
  box = acas_properties.get("1").raw_box()
  pairs = {}
  for label, copy in (("1_1 pruned10", "pruned10"), ("1_1 float16", "16bit")):
    try:
      pairs[label] = acas_pair(1, copy)
    except FileNotFoundError as e:
      print(f"skipping {label}: {e}")
  rows = []
  for label, (f, fq) in pairs.items():
    rng = np.random.default_rng(seed)
    m = merged(f, fq)
    for fraction in sizes:
      for i, piece in enumerate(random_pieces(box, fraction, per_size, rng)):
        reached, _ = qb.maximize_error(m, piece, key=jax.random.key(i))
        for name, method in methods.items():
          start = time.perf_counter()
          bounds = jax.block_until_ready(method(f, fq, piece))
          seconds = time.perf_counter() - start
          bound = float(max(np.max(-np.asarray(bounds.lower, np.float64)), np.max(np.asarray(bounds.upper)), 0.0))
          rows.append(dict(pair=label, edge=f"1/{round(1 / fraction)}", piece=i, method=name, bound=bound,
                           reached=reached, ratio=bound / reached if reached > 0 else math.inf, seconds=seconds))
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / "pieces.csv", rows)

  summary = []
  for label in pairs:
    for fraction in sizes:
      for name in methods:
        sel = [r for r in rows if r["pair"] == label and r["edge"] == f"1/{round(1 / fraction)}" and r["method"] == name]
        ratios = np.array([r["ratio"] for r in sel])
        summary.append(dict(pair=label, edge=f"1/{round(1 / fraction)}", method=name, pieces=len(sel),
                            median_reached=float(np.median([r["reached"] for r in sel])),
                            median_bound=float(np.median([r["bound"] for r in sel])),
                            median_ratio=float(np.median(ratios)), worst_ratio=float(np.max(ratios)),
                            # the first call of each method on a pair compiles: the median ignores it
                            median_s=float(np.median([r["seconds"] for r in sel]))))
  print(table(summary, ["pair", "edge", "method", "pieces", "median_reached", "median_bound", "median_ratio",
                        "worst_ratio", "median_s"],
              title=f"bound / reached on random pieces of property 1's box ({per_size} per size, seed {seed}; "
                    "reached = qb.maximize_error on the merged net over the piece)"))
  print(f"wrote {out / 'pieces.csv'}")
  return summary


def main(argv=None, methods: Mapping[str, Callable] | None = None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--nets", type=int, nargs="+", default=list(range(1, 10)), help="ACAS Xu nets 1_k")
  p.add_argument("--props", nargs="+", default=list(acas_properties.DEFAULT),
                 help="property boxes (1-5, 7-10; 6.1 and 6.2 too)")
  p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.5])
  p.add_argument("--time-budget", type=float, default=20.0, help="seconds per certify call")
  p.add_argument("--smoke", action="store_true", help="1_1, property 1, eps 0.05, 2 s")
  p.add_argument("--pieces", action="store_true", help="tightness on random pieces of property 1's box instead")
  p.add_argument("--pieces-per-size", type=int, default=20)
  p.add_argument("--methods", nargs="+", default=None, help=f"pieces mode: which of {list(PIECE_METHODS)}")
  p.add_argument("--warmup-budget", type=float, default=None,
                 help="seconds for the warm-up call (default: --time-budget); longer when compiling takes longer")
  p.add_argument("--zonotope", action="store_true",
                 help="branch and bound meets each batch's differential bounds with differential zonotopes'")
  p.add_argument("--no-search", action="store_true",
                 help="branch and bound without its counterexample search rounds (qbound.bounds.refute)")
  p.add_argument("--relu-split", choices=["default", "on", "off", "both"], default="default",
                 help="branch and bound's ReLU splitting (qbound.bounds.relusplit); both: every instance "
                      "without then with it, in the same run")
  p.add_argument("--candidates", type=int, nargs="+", default=None,
                 help="strong-branching candidates on ACAS Xu pairs that differ (bab.DIFFERING_CANDIDATES); several: every "
                      "instance with each, in the same run")
  p.add_argument("--stalled", action="store_true",
                 help="optimised slopes vs default on the worst open pieces after --time-budget s of branch "
                      "and bound, on the first of --nets and --props (stalled_pieces)")
  p.add_argument("--undecided-from", type=pathlib.Path, default=None,
                 help="only the instances undecided in this results.csv of an earlier run")
  p.add_argument("--instances", nargs="+", default=None, metavar="NET:PROP:EPS",
                 help="only these instances, e.g. 6:7:0.05 (ACAS Xu 1_6, property 7, epsilon 0.05)")
  p.add_argument("--search-schedule", choices=["default", "before19", "both"], default="default",
                 help="the search rounds' schedule (qbound.bounds.refute): before19 is the one before issue 19 "
                      "(first round 0.5 s from the start, never charged before it runs); both: every instance "
                      "with each, interleaved")
  p.add_argument("--out", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  if args.zonotope:
    from qbound.bounds import bab
    bab.ZONOTOPE = True
  if args.no_search:
    from qbound.bounds import refute
    refute.ENABLED = False
  if not (BENCH / "nnet").is_dir():
    print(f"{BENCH} is absent (set QBOUND_BENCH to the bench checkout): nothing to run.")
    return None
  out = args.out or (ROOT / "results" / ("smoke/bench_differing" if args.smoke else "bench_differing"))
  if args.pieces:
    methods = dict(methods or {name: PIECE_METHODS[name] for name in DEFAULT_PIECE_METHODS})
    if args.methods:
      pool = {**PIECE_METHODS, **methods}
      methods = {name: pool[name] for name in args.methods}
    sizes = [2.0 ** -j for j in range(1, 7)]
    if args.smoke:
      sizes, args.pieces_per_size = sizes[:1], 2
    return bench_pieces(methods, args.pieces_per_size, sizes, out)
  for prop in args.props:
    acas_properties.get(prop)  # fail early on a name that is not a property
  if args.stalled:
    f, fq = acas_pair(args.nets[0])
    rows = stalled_pieces(f, fq, acas_properties.get(args.props[0]).raw_box(), budget=args.time_budget,
                          label=f"1_{args.nets[0]} property {args.props[0]}")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "stalled_pieces.csv", rows)
    cols = [k for k in rows[0] if k != "pair"]
    print(table([{k: float(np.median([r[k] for r in rows])) for k in cols}], cols,
                title="medians over the pieces (bounds; *_s: seconds for all the pieces)"))
    return rows
  if args.smoke:
    args.nets, args.props, args.eps, args.time_budget = args.nets[:1], args.props[:1], args.eps[:1], 2.0
  variants = [("default", {})]
  if args.relu_split != "default":
    variants = [(f"relu split {v}", {"RELU_SPLIT": v == "on"})
                for v in (["off", "on"] if args.relu_split == "both" else [args.relu_split])]
  if args.candidates:
    variants = [(f"{label + ', ' if label != 'default' else ''}candidates {c}", {**setting, "DIFFERING_CANDIDATES": c})
                for c in args.candidates for label, setting in variants]
  if args.search_schedule != "default":
    before19 = {"refute.FIRST_AFTER": 0.5, "refute.FIRST_FROM_ROOT": False, "refute.HOPEFUL_LOWER": 0.0}
    schedules = {"before19": before19, "default": {}}
    chosen = ["before19", "default"] if args.search_schedule == "both" else [args.search_schedule]
    variants = [(f"{label + ', ' if label != 'default' else ''}schedule {c}", {**setting, **schedules[c]})
                for c in chosen for label, setting in variants]
  only = None
  if args.instances:
    only = set()
    for spec in args.instances:
      k, prop, eps = spec.split(":")
      only.add((f"1_{k}", prop, float(eps)))
    args.nets = sorted({int(s.split(":")[0]) for s in args.instances})
    args.props = list(dict.fromkeys(s.split(":")[1] for s in args.instances))
    args.eps = sorted({float(s.split(":")[2]) for s in args.instances})
  if args.undecided_from is not None:
    import csv
    with open(args.undecided_from) as fh:
      only = {(r["net"], r["prop"], float(r["eps"])) for r in csv.DictReader(fh) if r["verdict"] == "undecided"}
  return bench_certify(args.nets, args.props, args.eps, args.time_budget, out, args.warmup_budget, variants, only)


if __name__ == "__main__":
  main()
