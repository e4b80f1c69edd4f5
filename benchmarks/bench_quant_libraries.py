"""Models quantized by qwix and AQT, certified as they are: bound, reached error, time.

For three small models (a 4-16-16-2 linen MLP and the same as an nnx module on the box
``[-1, 1]^4``, and a conv net (8x8 image, conv 3x3/2 with 4 channels, ReLU, dense 10, untrained
weights) on the L-inf ball of radius 0.05 around a bundled 8x8 digits test image, clipped to
[0, 1]), and each way of quantizing them:

* ``qbound int8``: qbound's own uniform weight quantization (``qb.quantize.uniform``, 8 bits);
* ``qwix int8`` / ``qwix int4``: qwix post-training quantization of the weights;
* ``qwix static int8``: qwix int8 weights and int8 activations with static scales, calibrated on
  64 inputs (qwix's QAT provider collects the statistics, ``quantize_params`` turns them into scales);
* ``qwix dynamic int8``: qwix int8 weights and int8 activations with dynamic scales (``max|x| /
  127.5`` computed from each input as the model runs: qwix's default without ``act_static_scale``,
  see ``qbound.dynamic_rounding``);
* ``qwix dynamic minmax int8`` (asymmetric scales with zero points), ``qwix dynamic per-token int8``
  (a batch of 3 tokens, one scale each; the box is 3 x 4) and ``aqt dynamic int8`` (AQT's default
  calibration of int8 activations): dynamic scales beyond per-tensor absmax (not the CNN);
* ``qwix dynamic rms int8`` / ``qwix static rms int8``: qwix's ``rms,3`` calibration of the int8
  activations, ``s = 3 sqrt(mean(x^2)) / 127.5`` from each input (the largest entries saturate,
  ``qbound.rms_rounding``) or calibrated on the 64 inputs (a constant scale); ``qwix qt rms int8``:
  the dynamic one as qwix's QT provider runs it (float parameters quantized on the fly; MLPs only);
* ``qwix dynamic tiled int8``: ``tile_size=2``, one dynamic ``max|x|`` scale per tile of 2 entries
  along the contracted axis (MLPs only);
* ``aqt int8``: AQT int8 weights through ``AqtDotGeneral`` (float activations);
* ``aqt static int8 po2``: AQT int8 weights and activations with constant calibration bounds and
  power-of-two scales (what lets f's layers pair with AQT's, see ``qbound.trace.scaled``);

the table gives ``qb.certify``'s proven bound (default method ``auto`` and time budget), the error
reached (at its witness) and their ratio on the first call, the ratio on a second call, whether f
and f_q pair (differential bounds), the time of the first call (each row runs in a fresh process
with an empty persistent compilation cache of its own, so this includes every compilation, as a
machine's first call on a model does; ``--cache user`` keeps the user's cache instead, where the
programs of earlier runs make a new process's first call nearly warm) and of a second, warm call,
both with the same time budget. Every bound is also checked
against an independent search on the libraries' own functions in float32 (5000 uniform samples and
vertices plus ``qb.maximize_error`` with another key, gradient ascent and 40 rounds of refinement):
``independent`` is what it reached, which must not exceed ``bound``.

Run from the repository root (needs the ``qwix`` and ``aqt`` extras)::

    python benchmarks/bench_quant_libraries.py              # all rows, cold, about 12 minutes on 2 cores
    python benchmarks/bench_quant_libraries.py --cache user # the user's compilation cache (later processes)
    python benchmarks/bench_quant_libraries.py --models linen-mlp --configs "aqt int8"
    python benchmarks/bench_quant_libraries.py --models linen-mlp --configs "aqt static int8 po2" \
        --radius 0.0625 --center 0.26 -0.34 0.16 -0.04     # a local box (5^4 cells of AQT's input grid)

Writes ``results/quant_libraries/results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb

INPUTS = 4
MODELS = ("linen-mlp", "nnx-mlp", "cnn")
CONFIGS = ("qbound int8", "qwix int8", "qwix int4", "qwix static int8", "qwix dynamic int8", "aqt int8",
           "aqt static int8 po2")
# Dynamic activation scales beyond qwix's per-tensor absmax (issue 16; branch dynscale): qwix's
# asymmetric minmax scales with zero points, qwix's scale per token on a batch of 3 tokens (the box
# is 3 x 4, f and f_q take the batch), and AQT's dynamic calibration (int8 weights and activations).
DYNAMIC_CONFIGS = ("qwix dynamic minmax int8", "qwix dynamic per-token int8", "aqt dynamic int8")
# qwix's rms calibration (issue 16): s = 3 sqrt(mean(x^2)) / 127.5, the entries past
# 127.5 s saturate (qbound.rms_rounding); with static scales it is a constant scale like any other.
RMS_CONFIGS = ("qwix dynamic rms int8", "qwix qt rms int8", "qwix static rms int8")
# A scale per tile of 2 entries along the contracted axis (qwix's tile_size): qwix
# dequantizes before the product, and f gets the same reshapes so the layers pair.
RMS_CONFIGS = RMS_CONFIGS + ("qwix dynamic tiled int8",)
CONFIGS = CONFIGS + DYNAMIC_CONFIGS + RMS_CONFIGS
RMS = "rms,3"
TOKENS = 3


class NotApplicable(Exception):
  """The library offers no such quantization for this model."""


def _linen():
  import flax.linen as nn

  class MLP(nn.Module):
    dot_general_cls: object = None

    @nn.compact
    def __call__(self, x):
      extra = {} if self.dot_general_cls is None else {"dot_general_cls": self.dot_general_cls}
      for width in (16, 16):
        x = nn.relu(nn.Dense(width, **extra)(x))
      return nn.Dense(2, **extra)(x)

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # a batch of 8x8 images
      x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x[..., None]))
      return nn.Dense(10)(x.reshape((x.shape[0], -1)))

  return MLP, CNN


def _mlp_params(model):
  params = model.init(jax.random.key(3), jnp.zeros((1, INPUTS)))
  return jax.tree_util.tree_map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape), params)


def _qwix_rules(config):
  import qwix

  if config == "qwix static int8":
    return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True)]
  if config == "qwix static rms int8":
    return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True,
                                  act_calibration_method=RMS)]
  if config == "qwix dynamic tiled int8":
    return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", tile_size=2)]
  if config in ("qwix dynamic rms int8", "qwix qt rms int8"):
    return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_calibration_method=RMS)]
  if config in ("qwix dynamic int8", "qwix dynamic per-token int8"):  # scales from each input at run time
    return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
  if config == "qwix dynamic minmax int8":
    return [qwix.QuantizationRule(module_path=".*", weight_qtype="int8", act_qtype="int8",
                                  act_calibration_method="minmax")]
  return [qwix.QuantizationRule(module_path=".*", weight_qtype=config.split()[-1])]


def _qwix_linen(model, params, config, calibration):
  """``apply(x_batch)`` of the qwix-quantized linen model."""
  import qwix

  rules = _qwix_rules(config)
  if config == "qwix qt rms int8":  # QT: the float parameters, quantized as the model runs
    qt = qwix.quantize_model(model, qwix.QtProvider(rules))
    return lambda xs: qt.apply(params, xs)
  stats = {}
  if config.startswith("qwix static"):
    _, collected = qwix.quantize_model(model, qwix.QtProvider(rules)).apply(params, calibration,
                                                                          mutable=["quant_stats"])
    stats = collected["quant_stats"]
  ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), calibration[:1])
  qparams = qwix.quantize_params(params["params"], abstract["params"], stats)
  return lambda xs: ptq.apply({"params": qparams}, xs)


def _aqt_config(config):
  from aqt.jax.v2 import calibration as aqt_calibration
  from aqt.jax.v2 import config as aqt_config

  if config == "aqt int8":
    return aqt_config.dot_general_make(lhs_bits=None, rhs_bits=8)
  if config == "aqt dynamic int8":  # AQT's default calibration: max|x| of each input
    return aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)
  cfg = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8)
  cfg.fwd.dg_quantizer.lhs.calibration = functools.partial(aqt_calibration.ConstantCalibration, bound=2.0,
                                                           po2_scale=True)
  return cfg


def build(model_name: str, config: str):
  """``(f, fq, box)`` for one row: functions of one unbatched input."""
  if model_name == "cnn":
    return _build_cnn(config)
  if model_name == "nnx-mlp":
    return _build_nnx(config)
  MLP, _ = _linen()
  model = MLP()
  params = _mlp_params(model)
  box = qb.Box(-jnp.ones(INPUTS), jnp.ones(INPUTS))
  calibration = jax.random.uniform(jax.random.key(5), (64, INPUTS), minval=-1, maxval=1)
  batched_f = functools.partial(model.apply, params)
  if config == "qbound int8":
    batched_q = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
  elif config.startswith("qwix"):
    batched_q = _qwix_linen(model, params, config, calibration)
  else:
    from aqt.jax.v2.flax import aqt_flax

    cfg = _aqt_config(config)
    qmodel = MLP(dot_general_cls=lambda: aqt_flax.AqtDotGeneral(cfg))
    batched_q = lambda xs: qmodel.apply(params, xs, rngs={"params": jax.random.key(0)})  # noqa: E731
  if config == "qwix dynamic per-token int8":  # the input is a batch of tokens, one scale each
    return batched_f, batched_q, qb.Box(-jnp.ones((TOKENS, INPUTS)), jnp.ones((TOKENS, INPUTS)))
  return (lambda x: batched_f(x[None])[0]), (lambda x: batched_q(x[None])[0]), box


def _build_nnx(config):
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(INPUTS, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs),
                              nnx.Linear(16, 2, rngs=rngs)])

    def __call__(self, x):
      for layer in self.layers[:-1]:
        x = jax.nn.relu(layer(x))
      return self.layers[-1](x)

  if config.startswith("aqt"):
    raise NotApplicable("AQT's Flax layers are linen")
  model = MLP(nnx.Rngs(3))
  box = qb.Box(-jnp.ones(INPUTS), jnp.ones(INPUTS))
  graphdef, state = nnx.split(model)
  if config == "qbound int8":
    q_graphdef, q_state = graphdef, qb.quantize.uniform(state, bits=8)
  else:
    import qwix

    calibration = jax.random.uniform(jax.random.key(5), (64, INPUTS), minval=-1, maxval=1)
    # nnx: the static scales come from the example batch given to quantize_model.
    provider = qwix.QtProvider if config == "qwix qt rms int8" else qwix.PtqProvider
    qmodel = qwix.quantize_model(model, provider(_qwix_rules(config)), calibration)
    q_graphdef, q_state = nnx.split(qmodel)
  if config == "qwix dynamic per-token int8":  # the input is a batch of tokens, one scale each
    box = qb.Box(-jnp.ones((TOKENS, INPUTS)), jnp.ones((TOKENS, INPUTS)))
    return nnx.merge(graphdef, state), nnx.merge(q_graphdef, q_state), box
  f = lambda x: nnx.merge(graphdef, state)(x[None])[0]  # noqa: E731
  fq = lambda x: nnx.merge(q_graphdef, q_state)(x[None])[0]  # noqa: E731
  return f, fq, box


def _build_cnn(config):
  _, CNN = _linen()
  if config.startswith("aqt"):
    raise NotApplicable("flax.linen.Conv takes no AQT product")
  if config in ("qwix int8", "qwix int4"):
    raise NotApplicable("qwix: conv_general_dilated requires same act_qtype and weight_qtype")
  if config == "qwix dynamic per-token int8":
    raise NotApplicable("the CNN takes one image")
  if config == "qwix dynamic tiled int8":
    raise NotApplicable("the MLP rows show tiles")
  if config == "qwix qt rms int8":
    raise NotApplicable("the MLP rows show QT")
  from qbound.demo import load_digits_images

  images, _ = load_digits_images()
  images = jnp.asarray(images.reshape(-1, 8, 8))
  model = CNN()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))
  center = images[0]
  box = qb.Box(jnp.clip(center - 0.05, 0, 1), jnp.clip(center + 0.05, 0, 1))
  batched_f = functools.partial(model.apply, params)
  if config == "qbound int8":
    batched_q = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
  else:
    batched_q = _qwix_linen(model, params, config, images)
  return (lambda x: batched_f(x[None])[0]), (lambda x: batched_q(x[None])[0]), box


# The independent search: gradient ascent, then the derivative-free refinement (qbound.attack), in
# float32 on the libraries' own functions: on staircases it finds the inputs next to rounding ties
# where float32 rounds the other way than real arithmetic, a harder test of the bound than sampling.
INDEPENDENT_SEARCH = qb.Search(refine_rounds=40, refine_points=64, refine_tries=16, refine_radius=0.1)


def independent_error(f, fq, box: qb.Box) -> float:
  """The largest error an independent search reaches on the functions themselves (float32)."""
  rng = np.random.default_rng(1)
  lo, hi = np.asarray(box.lower), np.asarray(box.upper)
  xs = lo + rng.uniform(size=(4000, *lo.shape)) * (hi - lo)
  corners = np.where(rng.integers(0, 2, size=(1000, *lo.shape)).astype(bool), hi, lo)
  xs = jnp.asarray(np.concatenate([xs, corners]), jnp.float32)
  sampled = float(jnp.max(jnp.abs(jax.vmap(f)(xs) - jax.vmap(fq)(xs))))
  ascended, _ = qb.maximize_error(lambda x: f(x) - fq(x), box, key=jax.random.key(7), search=INDEPENDENT_SEARCH)
  return max(sampled, float(ascended))


def local_box(box: qb.Box, center, radius: float) -> qb.Box:
  """The L-inf ball of ``radius`` around ``center`` (one value for every entry, or one per entry),
  inside ``box``."""
  c = jnp.broadcast_to(jnp.asarray(center, jnp.float32), box.lower.shape)
  return qb.Box(jnp.maximum(c - radius, box.lower), jnp.minimum(c + radius, box.upper))


def run_row(model_name: str, config: str, time_budget: float, center=None, radius=None) -> dict:
  row = {"model": model_name, "config": config}
  try:
    f, fq, box = build(model_name, config)
  except NotApplicable as why:
    return {**row, "note": f"n/a: {why}"}
  if radius is not None:
    box = local_box(box, center, radius)
  try:
    paired = qb.merge(f, fq, box).paired
  except qb.UnsupportedPrimitiveError as err:
    return {**row, "note": f"unsupported: {str(err)[:120]}"}
  times, certs = [], []
  for _ in range(2):
    start = time.perf_counter()
    certs.append(qb.certify(f, fq, box, time_budget=time_budget))
    times.append(time.perf_counter() - start)
  first, warm = certs
  independent = independent_error(f, fq, box)
  if independent > min(first.upper, warm.upper):
    raise AssertionError(f"{model_name} {config}: an independent search reached {independent} > "
                         f"{min(first.upper, warm.upper)}")

  def ratio(cert):
    return float(cert.upper / cert.lower) if cert.lower > 0 else float("inf")

  return {**row, "paired": bool(paired), "bound": float(first.upper), "reached": float(first.lower),
          "ratio": ratio(first), "method": first.method, "first_s": times[0], "warm_bound": float(warm.upper),
          "warm_ratio": ratio(warm), "warm_s": times[1], "independent": independent, "note": ""}


def format_table(rows) -> str:
  head = (f"{'model':<10} {'config':<20} {'paired':>6} {'bound':>10} {'reached':>10} {'ratio':>7} "
          f"{'first s':>8} {'warm ratio':>10} {'warm s':>7} {'method':<8} note")
  lines = [head]
  for r in rows:
    if "bound" not in r:
      lines.append(f"{r['model']:<10} {r['config']:<20} {'':>6} {'':>10} {'':>10} {'':>7} {'':>8} {'':>10} {'':>7} "
                   f"{'':<8} {r['note']}")
      continue
    lines.append(f"{r['model']:<10} {r['config']:<20} {str(r['paired']):>6} {r['bound']:>10.4g} "
                 f"{r['reached']:>10.4g} {r['ratio']:>7.3g} {r['first_s']:>8.2f} {r['warm_ratio']:>10.3g} "
                 f"{r['warm_s']:>7.2f} "
                 f"{r['method']:<8} {r['note']}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
  parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
  parser.add_argument("--time-budget", type=float, default=10.0, help="qb.certify's time budget (its default: 10)")
  parser.add_argument("--out", default="results/quant_libraries/results.csv")
  parser.add_argument("--radius", type=float, default=None,
                      help="certify on the L-inf ball of this radius around --center instead (MLPs)")
  parser.add_argument("--center", type=float, nargs="*", default=[0.0], help="the ball's centre (one value or one per input)")
  parser.add_argument("--cache", choices=("cold", "user"), default="cold",
                      help="cold (default): each row's process starts from an empty persistent compilation cache of "
                           "its own, as a machine's first call on a model does; user: the environment's cache "
                           "(QBOUND_JAX_CACHE or ~/.cache/qbound/jax), where earlier runs left the programs")
  parser.add_argument("--one", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)  # one row, as JSON
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(run_row(*args.one, args.time_budget, args.center, args.radius)))
    return None
  rows = []
  for model_name in args.models:
    for config in args.configs:
      # A fresh process per row, with an empty compilation cache of its own (--cache cold): its first
      # call pays every compilation, as a machine's first call on a model does. (With the user's
      # cache, programs compiled by earlier runs of the same models are read from disk instead.)
      local = [] if args.radius is None else ["--radius", str(args.radius), "--center", *map(str, args.center)]
      with tempfile.TemporaryDirectory(prefix="qbound-cold-cache-") as empty:
        env = dict(os.environ, QBOUND_JAX_CACHE=empty) if args.cache == "cold" else None
        done = subprocess.run([sys.executable, __file__, "--one", model_name, config, "--time-budget",
                               str(args.time_budget), *local], capture_output=True, text=True, check=False, env=env)
      if done.returncode != 0:
        raise RuntimeError(f"{model_name} {config} failed:\n{done.stderr[-3000:]}")
      rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
      print(format_table(rows[-1:]).split("\n")[1], flush=True)
  print()
  print(format_table(rows))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  fields = ["model", "config", "paired", "bound", "reached", "ratio", "method", "first_s", "warm_bound", "warm_ratio",
            "warm_s", "independent", "note"]
  with out.open("w", newline="") as fh:
    writer = csv.DictWriter(fh, fieldnames=fields)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: r.get(k, "") for k in fields})
  print(f"wrote {out}")
  return rows


if __name__ == "__main__":
  main()
