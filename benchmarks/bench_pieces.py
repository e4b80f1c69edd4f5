"""How tight each bound is on small pieces of a box, and what a piece costs, batched.

Branch and bound lives on small pieces: what decides how fast it closes is how close a bound gets
to the reached error on a piece of a given size, and how many pieces a second it bounds. For ACAS
Xu 1_1 against its pruned-and-retrained copy (``benchmarks/data/acas_pruned``) and against its
float16 copy (``qbound/data``), on random pieces of ACAS Xu property 1's box whose every edge is
1/2, 1/4, ..., 1/64 of the box's, this prints per edge size the median and worst of
``bound / reached`` (``bound = max_j max(-lower_j, upper_j)`` over the five outputs, ``reached`` the
largest ``|f - f_q|`` at dense samples of the piece: uniform points, all 32 corners and the centre)
for three bounds, each on the whole batch of pieces at once, as branch and bound calls them:

* ``zonotope``: differential zonotopes (:mod:`qbound.bounds.zonotope`, VeryDiff's domain), every
  fresh generator kept; ``zono16``: the 16 widest fresh generators per layer and network kept;
* ``diff``: the sparse differential bounds branch and bound uses (:mod:`qbound.bounds.sparse`);
* ``zono16+diff``: ``zono16`` reading ``diff``'s node bounds, output met with ``diff``'s (what
  ``branch_and_bound(..., zonotope=True)`` computes per batch);
* ``crown``: CROWN on the merged network (sparse rows as well).

All in sound mode. ``ms/piece`` is the warm time of one batched call divided by its pieces (the
first call compiles and is not counted).

With ``--forward-rules`` it compares instead, on the float16 pair, the root box and random pieces of
edge 1/2 .. 1/16, the bound on output 0's difference of the forward symbolic pass with its default
ReLU rules (``relu_rules="node"``), with NeuroDiff's (``"equation"``,
:mod:`qbound.bounds.neurodiff_rules`), and of the sparse backward pass (median and worst).

Run from the repository root::

    python benchmarks/bench_pieces.py [--pieces 32] [--seed 0] [--forward-rules]

Writes ``results/bench_pieces/pieces.csv``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("QBOUND_JAX_CACHE", "0")

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import zonotope
from qbound.bounds.sparse import crown_bounds_sparse, diff_bounds_sparse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments"))
import acas_properties  # noqa: E402
import bench_differing  # noqa: E402
from common import table, write_csv  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "qbound" / "data"


def pairs() -> dict:
  """Label -> ``(f, fq)``: the pruned pair and the float16 pair of ACAS Xu 1_1."""
  load = bench_differing.load
  out = {}
  pruned = bench_differing.PAIRS / "ACASXU_run2a_1_1_batch_2000_pruned10.nnet"
  original = DATA / "ACASXU_run2a_1_1_batch_2000.nnet"
  out["1_1 pruned10"] = (load(original), load(pruned))
  out["1_1 float16"] = (load(original), load(DATA / "ACASXU_run2a_1_1_batch_2000_16bit.nnet"))
  return out


def pieces(box: qb.Box, fraction: float, count: int, rng: np.random.Generator):
  """``count`` sub-boxes, every edge ``fraction`` of the box's, centred on uniform random points
  (moved inside the box where they would stick out): ``(lower, upper)`` of shape ``(count, n)``."""
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  edge = fraction * (hi - lo)
  centres = lo + rng.uniform(size=(count, lo.size)) * (hi - lo)
  start = np.clip(centres - edge / 2, lo, hi - edge)
  low = start.astype(np.float32)
  high = np.minimum((start + edge).astype(np.float32), hi.astype(np.float32))
  return low, np.maximum(low, high)


def reached(merged, low, high, rng, samples: int = 4096) -> np.ndarray:
  """The largest ``max_j |f_j - f_q,j|`` at uniform samples, the corners and the centre of each piece."""
  n = low.shape[1]
  corners = np.array(np.meshgrid(*[[0.0, 1.0]] * n, indexing="ij")).reshape(n, -1).T
  unit = np.concatenate([rng.uniform(size=(samples, n)), corners, np.full((1, n), 0.5)])
  xs = low[:, None] + unit[None] * (high - low)[:, None]
  with jax.enable_x64(True):
    g64 = qb.graph.astype(merged.graph, jnp.float64)
    values = jax.jit(jax.vmap(jax.vmap(g64)))(jnp.asarray(xs, jnp.float64))
  return np.abs(np.asarray(values)).reshape(low.shape[0], -1, values.shape[-1]).max(axis=(1, 2))


def methods(merged) -> dict:
  """Name -> ``fn(lower, upper) -> (lower, upper)`` of bounds on ``f - f_q``, batched."""
  fg, qg, mg = merged.f_graph, merged.fq_graph, merged.graph
  zonotope.check_supported(fg, qg)

  def zono(lo, hi):
    out = zonotope.diff_zonotope_batch(fg, qg, lo, hi, sound=True)
    return out.lower, out.upper

  def diff(lo, hi):
    return diff_bounds_sparse(fg, qg, qb.Box(lo, hi), sound=True).d[fg.output]

  def crown(lo, hi):
    return crown_bounds_sparse(mg, qb.Box(lo, hi), sound=True)[mg.output]

  def zono_keep(lo, hi):
    out = zonotope.diff_zonotope_batch(fg, qg, lo, hi, sound=True, keep=16)
    return out.lower, out.upper

  def zono_on_diff(lo, hi):
    # The zonotope's relaxations read the differential bounds' intervals too, and its output is
    # met with theirs: how branch and bound would use both on a batch.
    out = diff_bounds_sparse(fg, qg, qb.Box(lo, hi), sound=True)
    z = zonotope.diff_zonotope_batch(fg, qg, lo, hi, (out.z, out.zq, out.d), sound=True, keep=16)
    dlo, dhi = out.d[fg.output]
    return jnp.maximum(dlo, z.lower), jnp.minimum(dhi, z.upper)

  return {"zonotope": zono, "zono16": zono_keep, "diff": diff, "zono16+diff": zono_on_diff, "crown": crown}


def run(count: int, seed: int, out: pathlib.Path) -> list[dict]:
  box = acas_properties.get("1").raw_box()
  sizes = [2.0 ** -k for k in range(1, 7)]
  rows = []
  for label, (f, fq) in pairs().items():
    merged = qb.merge(f, fq, jnp.zeros(5, jnp.float32))
    rng = np.random.default_rng(seed)
    fns = methods(merged)
    for fraction in sizes:
      low, high = pieces(box, fraction, count, rng)
      best = reached(merged, low, high, rng)
      for name, fn in fns.items():
        lo, hi = jnp.asarray(low), jnp.asarray(high)
        jax.block_until_ready(fn(lo, hi))  # compile (once per method and batch size)
        start = time.perf_counter()
        dlo, dhi = jax.block_until_ready(fn(lo, hi))
        seconds = time.perf_counter() - start
        bound = np.maximum(-np.asarray(dlo, np.float64), np.asarray(dhi, np.float64)).reshape(count, -1).max(1)
        bound = np.maximum(bound, 0.0)
        if np.any(bound < best):
          raise AssertionError(f"{name} on {label}: a bound below a reached error: {bound.min()} < {best.max()}")
        ratio = bound / np.maximum(best, 1e-30)
        rows.append(dict(pair=label, edge=f"1/{round(1 / fraction)}", method=name, pieces=count,
                         median_reached=float(np.median(best)), median_ratio=float(np.median(ratio)),
                         worst_ratio=float(np.max(ratio)), ms_per_piece=1e3 * seconds / count))
        print(f"{label:>13} {rows[-1]['edge']:>5} {name:>9}: median {rows[-1]['median_ratio']:.4g}, worst "
              f"{rows[-1]['worst_ratio']:.4g}, {rows[-1]['ms_per_piece']:.3g} ms/piece", flush=True)
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / "pieces.csv", rows)
  print(table(rows, ["pair", "edge", "method", "pieces", "median_reached", "median_ratio", "worst_ratio",
                     "ms_per_piece"],
              title=f"bound / reached on random pieces of property 1's box ({count} per size, seed {seed}, sound mode, "
                    "one batched call per method and size, warm)"))
  print(f"wrote {out / 'pieces.csv'}")
  return rows


def run_forward_rules(count: int, seed: int) -> list[dict]:
  """Output 0's bound on the float16 pair: forward pass with each ReLU rule set, and the backward pass."""
  from qbound.bounds.forward import forward_diff_batch

  box = acas_properties.get("1").raw_box()
  f, fq = pairs()["1_1 float16"]
  merged = qb.merge(f, fq, box)
  fg, qg = merged.f_graph, merged.fq_graph
  rng = np.random.default_rng(seed)
  fns = {"forward node": lambda lo, hi: forward_diff_batch(fg, qg, lo, hi, sound=True, relu_rules="node").d[fg.output],
         "forward equation": lambda lo, hi: forward_diff_batch(fg, qg, lo, hi, sound=True,
                                                               relu_rules="equation").d[fg.output],
         "backward (sparse)": lambda lo, hi: diff_bounds_sparse(fg, qg, qb.Box(lo, hi), sound=True).d[fg.output]}
  rows = []
  for fraction in [1.0, 0.5, 0.25, 0.125, 0.0625]:
    if fraction == 1.0:
      low, high = np.asarray(box.lower)[None], np.asarray(box.upper)[None]
    else:
      low, high = pieces(box, fraction, count, rng)
    for name, fn in fns.items():
      dlo, dhi = fn(jnp.asarray(low), jnp.asarray(high))
      bound = np.maximum(-np.asarray(dlo, np.float64)[:, 0], np.asarray(dhi, np.float64)[:, 0])
      rows.append(dict(edge="root" if fraction == 1.0 else f"1/{round(1 / fraction)}", method=name,
                       median_bound=float(np.median(bound)), worst_bound=float(np.max(bound))))
      print(rows[-1], flush=True)
  print(table(rows, ["edge", "method", "median_bound", "worst_bound"],
              title=f"output 0's bound on ACAS Xu 1_1 vs float16 ({count} pieces per edge, seed {seed}, sound mode)"))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pieces", type=int, default=32, help="pieces per edge size (one batch)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=ROOT / "results" / "bench_pieces")
  p.add_argument("--forward-rules", action="store_true", help="compare the forward pass's ReLU rules instead")
  args = p.parse_args(argv)
  if args.forward_rules:
    return run_forward_rules(args.pieces, args.seed)
  return run(args.pieces, args.seed, args.out)


if __name__ == "__main__":
  main()
