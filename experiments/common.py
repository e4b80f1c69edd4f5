"""Glue shared by the experiments: data, small MLPs, boxes, timing, result files and tables.

Nothing here computes a bound: every bound comes from ``qbound`` itself. The experiments are
scripts (``python experiments/NAME.py [--smoke] [--out DIR]``) whose ``main(argv)`` can also be
called in-process (``tests/test_experiments.py``, ``experiments/run_all.py``); this module is
imported as ``common`` because the scripts' directory is on ``sys.path`` either way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
import platform
import resource
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qbound as qb

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
# The benchmark checkout beside the repository (see /work/shared/bench/README.md).
BENCH = pathlib.Path(os.environ.get("QBOUND_BENCH", ROOT.parent / "shared" / "bench"))


# --- command line and output ---------------------------------------------------------------------

def parser(name: str, doc: Optional[str]) -> argparse.ArgumentParser:
  """The common command line: ``--smoke``, ``--out DIR``, ``--seed``."""
  p = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=(doc or "").split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true",
                 help=f"a few seconds, for CI; writes under results/smoke/{name}/ unless --out is given")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help=f"output directory (default results/{name}/, or results/smoke/{name}/ with --smoke)")
  p.add_argument("--seed", type=int, default=0, help="seed of the root PRNG key (jax.random.key)")
  return p


def out_dir(name: str, args) -> pathlib.Path:
  """Where an experiment writes: ``--out``, else ``results/[smoke/]NAME``; created if needed."""
  path = args.out if args.out is not None else (RESULTS / "smoke" / name if args.smoke else RESULTS / name)
  path.mkdir(parents=True, exist_ok=True)
  return path


def settings(args, smoke: dict, full: dict, **overrides) -> dict:
  """A copy of the ``smoke`` or ``full`` settings (by ``--smoke``), with the ``overrides`` the
  command line gave (those that are not None, empty or 0) put in."""
  cfg = dict(smoke if args.smoke else full)
  cfg.update({name: value for name, value in overrides.items() if value})
  return cfg


def setup(args) -> None:
  """Full runs compile in every process, so the compile times they report are real: they turn off the
  persistent XLA compilation cache that ``import qbound`` turns on, unless ``$QBOUND_JAX_CACHE`` or
  the user's own JAX cache directory asks for one. Smoke runs are dominated by compilation and keep
  the cache (``~/.cache/qbound/jax``, or ``$QBOUND_JAX_CACHE``; ``QBOUND_JAX_CACHE=0`` turns it off),
  so a rerun takes seconds."""
  if args.smoke or os.environ.get("QBOUND_JAX_CACHE") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  jax.config.update("jax_compilation_cache_dir", None)


def pyplot():
  """matplotlib's pyplot on the non-interactive Agg backend."""
  import matplotlib

  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  return plt


def _plain(value):
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
  if isinstance(value, pathlib.Path):
    return str(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return _plain(dataclasses.asdict(value))
  return value


def write_json(path: pathlib.Path, obj: Any) -> pathlib.Path:
  path.write_text(json.dumps(_plain(obj), indent=1) + "\n")
  return path


def write_csv(path: pathlib.Path, rows: Sequence[dict]) -> pathlib.Path:
  """Rows (dicts) as CSV; the columns are the union of the keys in first-seen order."""
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  with path.open("w", newline="") as fh:
    writer = csv.DictWriter(fh, columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _fmt_csv(row.get(k)) for k in columns})
  return path


def _fmt_csv(v):
  if v is None:
    return ""
  if isinstance(v, float):
    return repr(v)
  if isinstance(v, (np.floating,)):
    return repr(float(v))
  return v


def table(rows: Sequence[dict], columns: Sequence[str], *, title: str = "") -> str:
  """An aligned text table of the given columns (floats in 4 significant digits)."""
  def cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return "-"
    if isinstance(v, (float, np.floating)):
      return f"{float(v):.4g}"
    return str(v)

  body = [[cell(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
  lines = [title] if title else []
  lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
  return "\n".join(lines)


def machine() -> dict:
  """What the numbers were measured on."""
  return {"platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
          "qbound": qb.__version__}


# --- timing and memory ---------------------------------------------------------------------------

def block(tree):
  return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def timed(fn: Callable, *args, **kwargs):
  """``(result, seconds)`` of ``fn(*args, **kwargs)``, waiting for every array it returns."""
  start = time.perf_counter()
  out = block(fn(*args, **kwargs))
  return out, time.perf_counter() - start


def peak_rss_mib() -> float:
  """Peak resident memory of this process so far (MiB); it only grows."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# --- bounds, as qbound computes them -------------------------------------------------------------

BOUND_METHODS = ("interval", "crown", "diff-interval", "diff")


def certify_methods() -> tuple[str, ...]:
  """The methods ``qbound.certify`` accepts in this checkout (the list grows: alpha, bab, milp)."""
  import importlib

  return tuple(importlib.import_module("qbound.certify").METHODS)


def certify(f, fq, box, *, method: str = "auto", key=None, **options) -> qb.Certificate:
  """:func:`qbound.certify`, passing only the options (``search``, ``time_budget``, ``outputs``, ...)
  that this checkout's ``certify`` knows and that are not None."""
  known = inspect.signature(qb.certify).parameters
  options = {k: v for k, v in options.items() if v is not None and k in known}
  return qb.certify(f, fq, box, method=method, key=key, **options)


def _diff_fn():
  # Older checkouts had qb.bounds.diff as the submodule rather than the function.
  d = getattr(qb.bounds, "diff", None)
  if d is None or not callable(d):
    from qbound.bounds.diff import diff as d
  return d


def bound(method: str, merged, box) -> qb.Box:
  """Proven bounds on ``f(x) - fq(x)`` over ``box`` by one cheap method, on a merged network,
  without the lower-bound search of ``certify`` (for timing the bound alone)."""
  if method == "interval":
    return qb.bounds.interval(merged, box)
  if method == "crown":
    return qb.bounds.crown(merged, box)
  if method == "diff":
    return _diff_fn()(merged, None, box)
  if method == "diff-interval":
    return _diff_fn()(merged, None, box, symbolic=False)
  raise ValueError(f"unknown bound method {method!r}")


def max_abs(b: qb.Box, output: Optional[int] = None) -> float:
  """``max_j |[lower_j, upper_j]|`` (over output ``output`` only when given)."""
  lo, hi = np.asarray(b.lower, np.float64).ravel(), np.asarray(b.upper, np.float64).ravel()
  if output is not None:
    lo, hi = lo[output:output + 1], hi[output:output + 1]
  return float(max(np.max(-lo), np.max(hi), 0.0))


def timed_bounds(merged, box, methods: Iterable[str] = BOUND_METHODS, repeats: int = 1) -> dict:
  """``{method: (Box, seconds)}``; with ``repeats > 1`` the seconds are the fastest of the calls."""
  out = {}
  for m in methods:
    best = math.inf
    for _ in range(max(repeats, 1)):
      b, s = timed(bound, m, merged, box)
      best = min(best, s)
    out[m] = (b, best)
  return out


# --- models and data -----------------------------------------------------------------------------

class MLP(nn.Module):
  """ReLU MLP (Dense_0, Dense_1, ...); ``std`` > 0 draws kernels and biases from N(0, std^2)."""

  hidden: tuple[int, ...] = (32, 32)
  outputs: int = 10
  std: float = 0.0

  @nn.compact
  def __call__(self, x):
    kw = {}
    if self.std > 0:
      kw = dict(kernel_init=nn.initializers.normal(self.std), bias_init=nn.initializers.normal(self.std))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, **kw)(x))
    return nn.Dense(self.outputs, **kw)(x)


def random_mlp(key, inputs: int, hidden: Sequence[int], outputs: int, std: float = 1.0):
  """A Gaussian random MLP as ``(apply, variables)``."""
  model = MLP(tuple(hidden), outputs, std)
  return model.apply, model.init(key, jnp.zeros(inputs))


def digits():
  """scikit-learn's 8x8 digits in [0, 1], the split of ``train_digits_model.py``:
  ``(x_train, y_train, x_test, y_test)``."""
  from train_digits_model import split_digits

  return split_digits()


def train(apply: Callable, variables, key, x_train, y_train, *, epochs: int, batch_size: int = 64,
          learning_rate: float = 3e-3, mask=None):
  """Adam on the softmax cross-entropy, as in ``train_digits_model.py``; returns the variables.

  ``mask`` (a pytree like ``variables`` of 0/1 arrays) keeps pruned weights at zero: gradients and
  weights are multiplied by it after every step (the retraining of Han et al. 2015).
  """
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(variables)
  apply_mask = (lambda t: t) if mask is None else (lambda t: jax.tree_util.tree_map(lambda a, m: a * m, t, mask))

  def loss_fn(v, xb, yb):
    logits = jax.vmap(functools.partial(apply, v))(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def epoch(carry, perm_key):
    v, s = carry
    num_batches = x_train.shape[0] // batch_size
    perm = jax.random.permutation(perm_key, x_train.shape[0])[: num_batches * batch_size]

    def step(carry, idx):
      v, s = carry
      loss, grads = jax.value_and_grad(loss_fn)(v, x_train[idx], y_train[idx])
      updates, s = optimizer.update(apply_mask(grads), s, v)
      return (apply_mask(optax.apply_updates(v, updates)), s), loss

    (v, s), losses = jax.lax.scan(step, (v, s), perm.reshape(num_batches, batch_size))
    return (v, s), losses.mean()

  carry = (variables, opt_state)
  for k in jax.random.split(key, epochs):
    carry, _ = epoch(carry, k)
  return carry[0]


def train_mlp(key, hidden: Sequence[int], x_train, y_train, *, epochs: int, outputs: int = 10):
  """A fresh MLP trained on ``(x_train, y_train)``: ``(apply, variables)``."""
  model = MLP(tuple(hidden), outputs)
  init_key, train_key = jax.random.split(key)
  variables = model.init(init_key, jnp.zeros(x_train.shape[1]))
  return model.apply, train(model.apply, variables, train_key, x_train, y_train, epochs=epochs)


def agreement(apply: Callable, params, qparams, x) -> float:
  """Top-1 agreement of ``apply(qparams, .)`` with ``apply(params, .)`` on the inputs ``x``."""
  ref = jnp.argmax(jax.vmap(functools.partial(apply, params))(x), axis=-1)
  got = jnp.argmax(jax.vmap(functools.partial(apply, qparams))(x), axis=-1)
  return float(jnp.mean(ref == got))


def accuracy(apply: Callable, variables, x, y) -> float:
  logits = jax.jit(jax.vmap(functools.partial(apply, variables)))(jnp.asarray(x))
  return float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(y)))


def pixel_box(x, radius: float) -> qb.Box:
  """The L-inf ball of ``radius`` around an image in [0, 1], clipped to [0, 1]."""
  return qb.linf_ball(jnp.asarray(x, jnp.float32), radius, clip_lower=0.0, clip_upper=1.0)


def with_weights(variables: dict, weights) -> dict:
  """``variables`` with ``variables['params']`` replaced (other collections kept, e.g. .nnet
  normalisation constants, which are part of the interface and never quantized)."""
  return dict(variables, params=weights)


def certify_boxes(f, fq, boxes: Sequence[qb.Box], key, *, method: str = "auto", **options) -> list:
  """One :func:`qbound.certify` per box (f and fq merged once), keys split from ``key``."""
  keys = jax.random.split(key, len(boxes))
  merged = qb.merge(f, fq, boxes[0])
  return [certify(merged, None, b, method=method, key=k, **options) for b, k in zip(boxes, keys)]


def check_certificates(rows: Iterable[dict], lower: str = "lower", upper: str = "upper") -> None:
  """Raises if any row has ``lower > upper`` (a soundness bug to report) or non-finite bounds."""
  for r in rows:
    lo, up = r.get(lower), r.get(upper)
    if lo is None or up is None:
      continue
    if not (math.isfinite(lo) and lo >= 0):
      raise AssertionError(f"bad lower bound in {r}")
    if lo > up:
      raise AssertionError(f"reached {lo} exceeds proven {up}: {r}")


def loglog_slope(x, y, *, tail: Optional[int] = None) -> float:
  """Growth exponent: slope of ``log y`` against ``log x`` (least squares, numpy.polyfit),
  over the last ``tail`` points when given (the asymptotic regime)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
  x, y = x[ok], y[ok]
  if tail is not None:
    x, y = x[-tail:], y[-tail:]
  if len(x) < 2:
    return float("nan")
  return float(np.polyfit(np.log(x), np.log(y), 1)[0])
