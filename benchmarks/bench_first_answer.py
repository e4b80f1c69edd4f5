"""Time to a first certificate in a fresh process, and whether ``time_budget`` holds on that first call.

Each row runs in its own Python process (so nothing is compiled yet), with the default
``qb.certify(f, fq, box)`` (method ``auto``) or with ``time_budget=`` set:

* ``demo MLP``: the bundled digits MLP 64-32-32-10 vs its 8-bit copy, radius 0.02 around a bundled test
  image (what ``qbound demo`` certifies first);
* ``MLP 6-32-32-3``: a random ``qb.models.MLP`` (linen) vs its 8-bit copy on ``[-1, 1]^6``;
* ``CNN digits``: a random ``qb.models.CNN`` (two 3x3 convolutions of 4 and 8 channels, max pooling, one
  dense layer of 32, linen) on 8x8 images vs its 8-bit copy, radius 0.02 around a bundled test image;
* ``MNIST 3x100 vs f16``: radius 3/255 around MNIST test image 0 (needs ``../shared/bench``);
* ``ACAS Xu 1_1 vs f16``: the bundled 1_1 and its float16 copy on property 1's box (raw units).

Columns: ``cold`` = first call with the default budget (10 s) and no persistent compilation cache
(``QBOUND_JAX_CACHE=0``), ``gap`` = its upper / lower; ``budget b`` = wall time of a cold first call
with ``time_budget=b``; ``cache 1st`` / ``cache 2nd`` = the same with the smallest budget, in a process
with the persistent cache in a fresh directory (filling it), then in another process reading it
(``cache gap``: upper / lower of that second call). Every time is the ``certify`` call alone (the
process's import and model set-up are excluded, and printed as ``setup``).

Run: ``python benchmarks/bench_first_answer.py [--cases demo mlp cnn mnist acas] [--budgets 0.5 2 10]``
(about 5-10 minutes on 2 cores). Writes ``results/bench_first_answer/results.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = pathlib.Path(os.environ.get("QBOUND_BENCH", ROOT.parent / "shared" / "bench"))
CASES = ("demo", "mlp", "cnn", "mnist", "acas")
NAMES = {"demo": "demo MLP (digits, 8 bits)", "mlp": "MLP 6-32-32-3 (8 bits)", "cnn": "CNN digits 8x8 (8 bits)",
         "mnist": "MNIST 3x100 vs f16", "acas": "ACAS Xu 1_1 vs f16"}


def _setup(case: str):
  """``(f, fq, box)`` of a case (runs in the child process)."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  import qbound as qb
  from qbound import demo

  if case == "demo":
    apply, params = demo.load_digits_model()
    images, _ = demo.load_digits_images()
    qparams = dict(params, params=qb.quantize.uniform(params["params"], bits=8))
    box = qb.linf_ball(images[0], 0.02, clip_lower=0.0, clip_upper=1.0)
    return functools.partial(apply, params), functools.partial(apply, qparams), box
  if case == "mlp":
    model = qb.models.MLP(features=(32, 32, 3))
    params = model.init(jax.random.key(0), jnp.zeros(6))
    qparams = qb.quantize.uniform(params, bits=8)
    box = qb.Box(-jnp.ones(6), jnp.ones(6))
    return functools.partial(model.apply, params), functools.partial(model.apply, qparams), box
  if case == "cnn":
    model = qb.models.CNN(channels=(4, 8), features=(32,), outputs=10)
    params = model.init(jax.random.key(0), jnp.zeros((8, 8, 1)))
    qparams = qb.quantize.uniform(params, bits=8)
    images, _ = demo.load_digits_images()
    box = qb.linf_ball(np.asarray(images[0]).reshape(8, 8, 1), 0.02, clip_lower=0.0, clip_upper=1.0)
    return functools.partial(model.apply, params), functools.partial(model.apply, qparams), box
  if case == "mnist":
    f_app, fp = qb.io.load_nnet(BENCH / "nnet" / "mnist_relu_3_100.nnet")
    q_app, qp = qb.io.load_nnet(BENCH / "nnet_16bit" / "mnist_relu_3_100_16bit.nnet")
    x = np.load(BENCH / "inputs" / "mnist100_pixels_uint8.npy")[0].astype(np.float32).reshape(-1) / 255
    box = qb.linf_ball(x, 3 / 255, clip_lower=0.0, clip_upper=1.0)
    return functools.partial(f_app, fp), functools.partial(q_app, qp), box
  if case == "acas":
    f_app, fp = qb.io.load_nnet(qb.io.bundled_path("ACASXU_run2a_1_1_batch_2000.nnet"))
    q_app, qp = qb.io.load_nnet(qb.io.bundled_path("ACASXU_run2a_1_1_batch_2000_16bit.nnet"))
    import acas_properties  # benchmarks/acas_properties.py, beside this script

    box = acas_properties.get("1").raw_box()
    return functools.partial(f_app, fp), functools.partial(q_app, qp), box
  raise ValueError(f"unknown case {case!r}; choose from {CASES}")


def child(case: str, budget: float | None) -> None:
  """One first call, printed as one JSON line."""
  import time

  start = time.perf_counter()
  import qbound as qb

  f, fq, box = _setup(case)
  setup = time.perf_counter() - start
  kwargs = {} if budget is None else {"time_budget": budget}
  t = time.perf_counter()
  cert = qb.certify(f, fq, box, **kwargs)
  call = time.perf_counter() - t
  print(json.dumps(dict(case=case, budget=budget, setup=setup, seconds=call, lower=cert.lower, upper=cert.upper,
                        method=cert.method)))


def run(case: str, budget: float | None, cache: str) -> dict:
  env = dict(os.environ, QBOUND_JAX_CACHE=cache)
  args = [sys.executable, __file__, "--child", case] + ([] if budget is None else ["--budget", str(budget)])
  out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
  if out.returncode != 0:
    raise RuntimeError(f"{case} (budget {budget}) failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
  p.add_argument("--budgets", nargs="*", type=float, default=[0.5, 2.0, 10.0])
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    child(args.child, args.budget)
    return []
  sys.path.insert(0, str(ROOT / "experiments"))
  from common import table, write_csv  # experiments/common.py: one table and CSV format

  rows = []
  for case in args.cases:
    if case == "mnist" and not (BENCH / "nnet" / "mnist_relu_3_100.nnet").exists():
      print(f"skipping {NAMES[case]}: {BENCH} is absent (set QBOUND_BENCH)")
      continue
    cold = run(case, None, "0")
    row = {"case": NAMES[case], "setup": cold["setup"], "cold": cold["seconds"],
           "gap": cold["upper"] / max(cold["lower"], 1e-30), "method": cold["method"]}
    for b in args.budgets:
      row[f"budget {b:g}"] = run(case, b, "0")["seconds"]
    smallest = min(args.budgets, default=None)
    with tempfile.TemporaryDirectory() as cache:
      first, second = run(case, smallest, cache), run(case, smallest, cache)
    row.update({"cache 1st": first["seconds"], "cache 2nd": second["seconds"],
                "cache gap": second["upper"] / max(second["lower"], 1e-30)})
    rows.append(row)
    print(json.dumps(row), flush=True)
  cols = (["case", "setup", "cold", "gap", "method"] + [f"budget {b:g}" for b in args.budgets]
          + ["cache 1st", "cache 2nd", "cache gap"])
  print()
  print(table(rows, cols, title="first certificate in a fresh process (seconds of the certify call)"))
  out = ROOT / "results" / "bench_first_answer"
  out.mkdir(parents=True, exist_ok=True)
  write_csv(out / "results.csv", rows)
  print(f"wrote {out / 'results.csv'}")
  return rows


if __name__ == "__main__":
  main()
