"""Scale: boxes per second of ``qb.certify_batch``, and peak memory under a budget on wide nets.

Prints three tables:

1. **Throughput**: boxes per second of one ``certify_batch`` call against the batch size (1 ... 1024), its
   compilation time apart (each new chunk shape compiles once; a later call with the same shape does not),
   beside a Python loop of ``qb.certify`` over the same boxes (one merged network, so compiled once too) for
   the small sizes. Network: MNIST 3x100 vs its float16 copy at radius 3/255 (``../shared/bench``), or the
   bundled digits MLP vs its float16 copy when the benchmark files are absent (``--net digits``).
2. **Memory**: a 784-1024x4-10 MLP (random weights, 8-bit copy) and a CIFAR-shaped CNN (32x32x3 -> conv 8
   -> conv 16 stride 2 -> dense 100 -> dense 10, random weights, 8-bit copy), CROWN and differential bounds
   on a batch of boxes, each in a fresh subprocess: peak resident memory (``ru_maxrss``), time, bound,
   and the chunks chosen, with ``memory_budget=4 GiB`` beside the unchunked run (``math.inf``: all boxes and
   all backward rows at once). An unchunked run whose own estimate exceeds ``--max-unchunked`` (default
   12 GiB, this machine has 23 GiB shared) is not run: its estimate is shown.

3. **Devices**: the same 64 boxes on 1, 2 and 8 host devices (``XLA_FLAGS``), each in a fresh process.

    python benchmarks/bench_scale.py            # all three tables (tens of minutes on 2 cores)
    python benchmarks/bench_scale.py --quick    # a few minutes: small batch sizes, digits, 2 boxes
    python benchmarks/bench_scale.py --part memory --nets mlp --methods crown
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = pathlib.Path(os.environ.get("QBOUND_BENCH", ROOT.parent / "shared" / "bench"))
GiB = 2**30


# ----------------------------------------------------------------------------------------- problems


def mnist_or_digits(which: str, n: int):
  """``(label, f, fq, boxes)``: MNIST 3x100 vs float16 (radius 3/255) or the bundled digits MLP."""
  import jax
  import numpy as np

  import qbound as qb

  if which == "mnist":
    apply, params = qb.io.load_nnet(BENCH / "nnet" / "mnist_relu_3_100.nnet")
    pixels = np.load(BENCH / "inputs" / "mnist100_pixels_uint8.npy").astype(np.float64).reshape(-1, 784)
    pixels = np.resize(pixels, (n, 784))  # the 100 images, repeated for larger batches
    boxes = qb.Box(np.maximum((pixels - 3) / 255, 0), np.minimum((pixels + 3) / 255, 1))
    label = "MNIST 3x100 vs float16, radius 3/255"
  else:
    from qbound.demo import load_digits_images, load_digits_model

    apply, params = load_digits_model()
    images = np.resize(load_digits_images()[0], (n, 64))
    boxes = qb.linf_ball(images, 0.02, clip_lower=0.0, clip_upper=1.0)
    label = "digits MLP 64-32-32-10 vs float16, radius 0.02"
  fq = functools.partial(apply, dict(params, params=qb.quantize.float_format(params["params"], "float16")))
  return label, functools.partial(apply, params), fq, boxes


def wide_problem(net: str, n: int):
  """``(label, f, fq, boxes)`` for the memory table: the wide MLP or the CIFAR-shaped CNN."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import qbound as qb

  if net == "mlp":
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        for _ in range(4):
          x = nn.relu(nn.Dense(1024)(x))
        return nn.Dense(10)(x)

    shape, label, radius = (784,), "MLP 784-1024x4-10", 0.002
  else:
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (4, 4), strides=2)(x))
        x = nn.relu(nn.Dense(100)(x.reshape(-1)))
        return nn.Dense(10)(x)

    shape, label, radius = (32, 32, 3), "CNN 32x32x3-c8-c16s2-100-10", 0.002
  model = Net()
  params = model.init(jax.random.key(0), jnp.zeros(shape))
  qparams = qb.quantize.uniform(params, bits=8)
  centres = jax.random.uniform(jax.random.key(1), (n, *shape))
  boxes = qb.linf_ball(centres, radius, clip_lower=0.0, clip_upper=1.0)
  return label, functools.partial(model.apply, params), functools.partial(model.apply, qparams), boxes


# --------------------------------------------------------------------------------------- throughput


def throughput(args):
  import jax
  import numpy as np

  import qbound as qb

  net = args.net or ("mnist" if (BENCH / "nnet" / "mnist_relu_3_100.nnet").is_file() else "digits")
  sizes = [1, 4, 16] if args.quick else [1, 4, 16, 64, 256, 1024]
  loop_sizes = [s for s in sizes if s <= (4 if args.quick else 64)]
  label, f, fq, boxes = mnist_or_digits(net, max(sizes))
  method = args.method
  merged = qb.merge(f, fq, qb.box.box_at(boxes, 0))
  searches = {"full": qb.Search(), "bounds": qb.Search(samples=1, restarts=1, steps=1)}
  print(f"\n== 1. throughput: {label}, method {method}, {len(jax.devices())} device(s) ==")
  rows = []
  for n in sizes:
    sub = qb.box.box_at(boxes, slice(0, n))
    row = dict(n=n)
    for name, search in searches.items():
      run = functools.partial(qb.certify_batch, merged, None, sub, method=method, key=jax.random.key(0),
                              search=search, progress=False)
      first = run()
      seconds = first.total_seconds - first.compile_seconds  # compilation is timed apart (AOT, before the chunks)
      row.update({f"{name}_compile": first.compile_seconds, f"{name}_per_s": n / seconds,
                  f"{name}_chunk": first.layout["chunk"], "median_upper": float(np.median(first.upper))})
      if n in loop_sizes:
        keys = jax.random.split(jax.random.key(0), n)
        one = lambda i: qb.certify(merged, None, qb.box.box_at(sub, i), method=method, key=keys[i], search=search)
        one(0)  # compiled once, not counted
        t = time.perf_counter()
        certs = [one(i) for i in range(n)]
        loop = time.perf_counter() - t
        row[f"{name}_loop_per_s"] = n / loop
        row["same"] = row.get("same", True) and bool(np.allclose([c.upper for c in certs], first.upper, rtol=1e-5))
    rows.append(row)
    print(f"  n={n:>5}: {row['full_per_s']:8.1f} boxes/s, bounds only {row['bounds_per_s']:8.1f} boxes/s "
          f"(compile {row['full_compile']:.1f} s)", flush=True)
  cell = lambda r, k, w: f"{r[k]:{w}.1f}" if k in r else f"{'-':>{w}}"
  print(f"\n{'boxes':>6} | {'chunk':>6} {'compile s':>9} {'boxes/s':>8} {'loop':>8} | {'chunk':>6} {'compile s':>9} "
        f"{'bounds only':>11} {'loop':>8} | {'same':>5} {'median upper':>13}")
  for r in rows:
    print(f"{r['n']:>6} | {r['full_chunk']:>6} {r['full_compile']:>9.1f} {cell(r, 'full_per_s', 8)} "
          f"{cell(r, 'full_loop_per_s', 8)} | {r['bounds_chunk']:>6} {r['bounds_compile']:>9.1f} "
          f"{cell(r, 'bounds_per_s', 11)} {cell(r, 'bounds_loop_per_s', 8)} | "
          f"{str(r.get('same', '-')):>5} {r['median_upper']:>13.6g}")
  print("boxes/s: one certify_batch call, its compilation (timed apart) excluded, with the default Search "
        "(4096 samples, 16 x 100 ascent steps per box); 'bounds only': a one-sample search, so the bounds dominate; "
        "loop: qb.certify once per box on one merged network (compiled once, not counted); same: the loop's upper "
        "bounds equal the batch's. A chunk shape compiled before (in this process) compiles in no time.")
  return rows


# ------------------------------------------------------------------------------------------- memory


def memory_child(spec: dict) -> dict:
  """One row of the memory table, in this (fresh) process."""
  import jax
  import numpy as np

  import qbound as qb

  label, f, fq, boxes = wide_problem(spec["net"], spec["boxes"])
  merged = qb.merge(f, fq, qb.box.box_at(boxes, 0))
  base = _maxrss()
  budget = math.inf if spec["budget"] is None else spec["budget"]
  if spec["budget"] is None:  # unchunked: all boxes in one call and every backward row at once
    qb.memory.default_row_chunk = lambda rows: None
  search = qb.Search(samples=256, restarts=4, steps=20)
  plan = qb.memory.plan(merged, spec["method"], budget=budget, boxes=spec["boxes"], search=search)
  out = dict(spec, label=label, estimate=plan.estimate, row_chunk=plan.row_chunk, chunk=plan.box_chunk,
             rss_before=base)
  if spec["budget"] is None and plan.estimate > spec["max_unchunked"]:
    out.update(skipped=True, compile=None)  # too large to run on this machine: the estimate only
    return out
  t = time.perf_counter()
  batch = qb.certify_batch(merged, None, boxes, method=spec["method"], search=search, memory_budget=budget,
                           progress=False)
  out.update(skipped=False, seconds=time.perf_counter() - t, compile=batch.compile_seconds,
             run=batch.total_seconds - batch.compile_seconds, upper=float(np.max(batch.upper)),
             median_upper=float(np.median(batch.upper)), lower=float(np.max(batch.lower)),
             xla_bytes=batch.layout["xla_bytes"], rss=_maxrss(), row_chunk=batch.layout["row_chunk"],
             chunk=batch.layout["chunk"])
  return out


def _maxrss() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def memory(args):
  nets = args.nets.split(",")
  methods = args.methods.split(",")
  counts = {"mlp": args.boxes_mlp, "cnn": args.boxes_cnn}
  print(f"\n== 2. memory: budget {args.budget / GiB:g} GiB vs unchunked, each row a fresh process ==")
  rows = []
  for net in nets:
    n = 2 if args.quick else counts[net]
    for method in methods:
      for budget in (args.budget, None):
        spec = dict(net=net, method=method, boxes=n, budget=budget, max_unchunked=args.max_unchunked)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
          print(proc.stderr[-2000:])
          rows.append(dict(spec, error=proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"))
        else:
          rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"  {net} {method} {'4 GiB' if budget else 'unchunked'}: " + (
            r.get("error") or ("not run" if r.get("skipped") else
                               f"peak {r['rss'] / GiB:.2f} GiB, {r['seconds']:.1f} s, upper {r['upper']:.6g}")),
              flush=True)
  print(f"\n{'network':<28} {'method':<6} {'boxes':>5} {'budget':>9} {'boxes/call':>10} {'rows/block':>10} {'estimate':>9} "
        f"{'XLA':>9} {'peak RSS':>9} {'compile s':>9} {'run s':>7} {'max upper':>11}")
  for r in rows:
    if "error" in r:
      print(f"{r['net']:<28} {r['method']:<6} error: {r['error']}")
      continue
    budget = "unchunked" if r["budget"] is None else f"{r['budget'] / GiB:g} GiB"
    gib = lambda b: "-" if b is None else f"{b / GiB:.2f}G"
    run = "-" if r.get("skipped") else f"{r['run']:.1f}"
    comp = "-" if r.get("compile") is None else f"{r['compile']:.1f}"
    upper = "not run" if r.get("skipped") else f"{r['upper']:.6g}"
    print(f"{r['label']:<28} {r['method']:<6} {r['boxes']:>5} {budget:>9} {r['chunk']:>10} "
          f"{str(r['row_chunk'] or 'all'):>10} {gib(r['estimate']):>9} {gib(r.get('xla_bytes')):>9} "
          f"{gib(r.get('rss')):>9} {comp:>9} {run:>7} {upper:>11}")
  print("estimate: qbound.memory's peak per device; XLA: bytes XLA assigned to the larger compiled program; peak "
        "RSS: the whole process (runtime, compiled code, host copies included); rows/block 'all': no row blocks.")
  return rows


def devices_child(spec: dict) -> dict:
  """Boxes per second of certify_batch on this process's devices (bounds only, then with the search)."""
  import jax

  import qbound as qb

  label, f, fq, boxes = mnist_or_digits(spec["net"], spec["boxes"])
  merged = qb.merge(f, fq, qb.box.box_at(boxes, 0))
  out = dict(spec, devices=len(jax.devices()), label=label)
  for name, search in (("bounds", qb.Search(samples=1, restarts=1, steps=1)), ("full", qb.Search())):
    b = qb.certify_batch(merged, None, boxes, method=spec["method"], search=search, progress=False)
    out[f"{name}_per_s"] = spec["boxes"] / (b.total_seconds - b.compile_seconds)
    out[f"{name}_compile"] = b.compile_seconds
    out["upper"] = float(b.upper.max())
  return out


def devices(args):
  """The same batch on 1, 2 and 8 host devices (XLA_FLAGS), each in a fresh process."""
  net = args.net or ("mnist" if (BENCH / "nnet" / "mnist_relu_3_100.nnet").is_file() else "digits")
  n = 16 if args.quick else 64
  print(f"\n== 3. devices: {n} boxes, {net}, method {args.method}, host devices from XLA_FLAGS ==")
  rows = []
  for count in (1, 2, 8):
    spec = dict(net=net, method=args.method, boxes=n)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--devices-child", json.dumps(spec)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
      print(proc.stderr[-2000:])
      continue
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  print(f"{'devices':>7} {'bounds only boxes/s':>20} {'with search boxes/s':>20} {'compile s':>10} {'max upper':>11}")
  for r in rows:
    print(f"{r['devices']:>7} {r['bounds_per_s']:>20.1f} {r['full_per_s']:>20.1f} {r['bounds_compile']:>10.1f} "
          f"{r['upper']:>11.6g}")
  print(f"host devices share this machine's {os.cpu_count()} cores, so splitting the same work 1, 2 or 8 ways "
        "cannot make it much faster here (it checks the layout and its cost); on GPUs and TPUs each device "
        "brings its own compute.")
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes only (a few minutes)")
  p.add_argument("--part", choices=("all", "throughput", "memory", "devices"), default="all")
  p.add_argument("--net", choices=("mnist", "digits"), default=None, help="throughput network (default: mnist if "
                                                                           "../shared/bench is there)")
  p.add_argument("--method", default="diff", help="throughput method (default: diff)")
  p.add_argument("--nets", default="mlp,cnn")
  p.add_argument("--methods", default="crown,diff")
  p.add_argument("--boxes-mlp", type=int, default=32, help="boxes per memory run of the MLP (default 32)")
  p.add_argument("--boxes-cnn", type=int, default=4, help="boxes per memory run of the CNN (default 4)")
  p.add_argument("--budget", type=float, default=4 * GiB)
  p.add_argument("--max-unchunked", type=float, default=12 * GiB)
  p.add_argument("--child", help=argparse.SUPPRESS)
  p.add_argument("--devices-child", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(memory_child(json.loads(args.child))))
    return
  if args.devices_child:
    print(json.dumps(devices_child(json.loads(args.devices_child))))
    return
  if args.quick and args.net is None:
    args.net, args.method = "digits", "crown"
  if args.part in ("all", "throughput"):
    throughput(args)
  if args.part in ("all", "memory"):
    memory(args)
  if args.part in ("all", "devices"):
    devices(args)


if __name__ == "__main__":
  main()
