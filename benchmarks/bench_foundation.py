"""Speed and tightness of the foundation methods on a random 2x256 ReLU MLP.

For a Flax MLP 16 -> 256 -> 256 -> 10 (weights from ``jax.random.key(0)``) and its uniformly
quantized copies (8 and 4 bits, symmetric, per tensor), over an L-inf ball around a fixed input,
it prints the maximal error bound each method gives:

* IBP (interval bound propagation) and CROWN on the merged network: proven upper bounds;
* sampling + gradient ascent (``qb.maximize_error``): an error actually reached, a lower bound;

with the time of the first call (tracing and XLA compilation included; JAX's caches are cleared
before it) and of a warm call (the same call again, compiled), and the process's peak resident
memory so far (``ru_maxrss``, which only grows). Run from anywhere::

    python benchmarks/bench_foundation.py               # 10-20 s on 2 CPU cores
    python benchmarks/bench_foundation.py --radius 0.1 --bits 8 6 4
"""

from __future__ import annotations

import argparse
import os
import functools
import platform
import resource
import sys
import time

# Cold times are real compile times: no persistent compilation cache unless QBOUND_JAX_CACHE asks.
os.environ.setdefault("QBOUND_JAX_CACHE", "0")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound.bounds import crown_bounds, interval_bounds


class MLP(nn.Module):
  widths: tuple[int, ...] = (256, 256)
  outputs: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.outputs)(x)


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def max_abs(bounds) -> float:
  lower, upper = (np.asarray(b, np.float64) for b in bounds)
  return float(max(np.max(-lower), np.max(upper), 0.0))


def timed(fn):
  """``(result, seconds)`` of ``fn()``, waiting for every array it returns to be computed."""
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return result, time.perf_counter() - start


def bench(graph, box, key) -> list[tuple[str, str, float, float, float, float]]:
  """Rows ``(method, kind, value, first seconds, warm seconds, peak MiB)`` for one merged graph."""
  methods = [
      ("IBP", "upper", lambda: max_abs(interval_bounds(graph, box, True)[graph.output])),
      ("CROWN", "upper", lambda: max_abs(crown_bounds(graph, box, None, True)[graph.output])),
      ("sampling+PGD", "lower", lambda: qb.maximize_error(graph, box, key=key)[0]),
  ]
  rows = []
  for name, kind, run in methods:
    # Cleared caches make "first" the cold cost a new network shape pays, for every row alike.
    jax.clear_caches()
    value, first = timed(run)
    again, warm = timed(run)
    assert again == value, (name, value, again)  # deterministic: the warm call redoes the same work
    rows.append((name, kind, value, first, warm, peak_rss_mib()))
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
  parser.add_argument("--radius", type=float, default=0.05, help="L-inf radius of the input box")
  parser.add_argument("--inputs", type=int, default=16)
  args = parser.parse_args(argv)

  model = MLP()
  init_key, center_key, search_key = jax.random.split(jax.random.key(0), 3)
  params = model.init(init_key, jnp.zeros(args.inputs))
  center = jax.random.uniform(center_key, (args.inputs,), minval=-1.0, maxval=1.0)
  box = qb.linf_ball(center, args.radius)
  f = functools.partial(model.apply, params)

  print(f"qbound foundation benchmark: MLP {args.inputs}-256-256-10 (ReLU, weights from key 0), "
        f"L-inf ball of radius {args.radius:g}")
  print(f"jax {jax.__version__} on {jax.default_backend()} ({platform.processor() or platform.machine()}, "
        f"{jax.local_device_count()} device), baseline peak RSS {peak_rss_mib():.0f} MiB")
  header = f"{'bits':>4}  {'method':<13} {'bound':<6} {'value':>11}  {'first s':>8}  {'warm s':>8}  {'peak MiB':>8}"
  print(header)
  print("-" * len(header))
  for bits in args.bits:
    fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=bits))
    merged, merge_s = timed(lambda: qb.merge(f, fq, box))
    for name, kind, value, first, warm, peak in bench(merged.graph, box, search_key):
      print(f"{bits:>4}  {name:<13} {kind:<6} {value:>11.5g}  {first:>8.3f}  {warm:>8.4f}  {peak:>8.0f}")
    print(f"{'':>4}  (tracing and merging f and f_q took {merge_s:.2f} s)")


if __name__ == "__main__":
  main()
