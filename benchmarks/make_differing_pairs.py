"""Builds network pairs that really differ: pruned-and-retrained ACAS Xu copies, QAT digits copies.

The float16 copies of ``../shared/bench`` differ from their originals by rounding only (weights move
by at most 2^-11 relative). The pairs built here differ beyond rounding, the regime of VeryDiff's
``acas-prune`` family (Teuber, Kern, Janzen and Beckert, "Revisiting Differential Verification:
Equivalence Verification with Confidence", TACAS 2025): every weight moves, the pruned ones by
their whole value, and f_q is only trained to stay close to f. Both are made with qbound's own
tools, from fixed seeds:

* **ACAS Xu, pruned and distilled** (``benchmarks/data/acas_pruned/``): for each of
  ``ACASXU_run2a_1_{k}_batch_2000.nnet`` (k = 1..9, from ``../shared/bench/nnet``), the
  smallest-magnitude fraction of every layer's weights is set to 0 (``qb.quantize.prune``,
  ``scope='layer'``; Han, Pool, Tran and Dally, NeurIPS 2015), then every weight and bias is
  retrained by distillation from the original: optax AdamW (Adam with a weight decay of 1e-4, so
  that even the weights of neurons that never fire, whose gradient is 0, move a little) on the mean
  squared difference of all five outputs, over fresh uniform samples of the network's whole input
  range ([mins, maxes] of the file: uniform on the normalised box as well, the normalisation
  being affine) at every step. The pruned weights are held at exactly 0 by masking their updates.
  By default the 10% level for all nine nets, plus 5% and 30% for 1_1; each copy is written as
  ``ACASXU_run2a_1_{k}_batch_2000_pruned{P}.nnet`` with the original's CC-BY-4.0 header kept and
  the change stated, and ``pairs.json`` beside them records per pair the fraction pruned, the
  weight changes and the maximal difference sampled on property 1's box (Katz et al., CAV 2017).
* **digits MLP, quantization-aware distillation** (``benchmarks/data/digits_qat/``): the bundled
  ``qbound/data/digits_mlp.nnet`` (64-32-32-10) with ternary (TWN, Li and Liu 2016) and symmetric
  per-tensor 2-, 3- and 4-bit kernels, retrained through the quantizer with straight-through
  gradients (``qb.quantize.retrain``; Sung, Shin and Hwang 2016; Courbariaux et al., NeurIPS 2015)
  towards f's own logits on the training images (``loss='mse'``, as ``experiments/qat_digits.py``'s
  ``distill`` mode). Biases stay float32. ``pairs.json`` records accuracies and sampled differences.

Why the ACAS Xu retraining is written here and not with ``qb.quantize.retrain``: that function
draws each minibatch with ``jax.random.choice(..., replace=False)`` from a fixed data set, which
permutes the whole set at every step (about 30 ms a step for 65,536 samples here, 60 s per net);
fresh uniform samples per step cost nothing and never repeat. It also lets a mask hold the pruned
weights at 0 in the optimizer rather than through a straight-through "quantizer".

Run from the repository root (about two minutes on 2 CPU cores, 5 s of training per ACAS Xu copy)::

    python benchmarks/make_differing_pairs.py                 # everything, into benchmarks/data/
    python benchmarks/make_differing_pairs.py --only acas --nets 1 --sparsity 0.05 0.1 0.3
    python benchmarks/make_differing_pairs.py --smoke         # 1_1 at 10%, few steps, temp dir
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qbound as qb
from qbound.quantize import qat

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import acas_properties  # noqa: E402  (needs the path above)

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = pathlib.Path(os.environ.get("QBOUND_BENCH", ROOT.parent / "shared" / "bench"))
DATA = ROOT / "benchmarks" / "data"
ACAS_NAME = "ACASXU_run2a_1_{k}_batch_2000"

# ACAS Xu distillation. lr 1e-3 for 3000 steps lands the sampled maximal difference on property 1's
# box at 4e-4..8e-3 per output over nets 1_1..1_9 (VeryDiff's pair: 3e-3..7e-3); 3e-3 doubles it, 1e-4
# leaves 5e-4..1e-3 and moves the weights 5x less.
ACAS = dict(steps=3000, batch_size=512, learning_rate=1e-3, weight_decay=1e-4)
ACAS_SMOKE = dict(steps=100, batch_size=128, learning_rate=1e-3, weight_decay=1e-4)
# Digits QAT: the settings of experiments/qat_digits.py (full mode).
DIGITS = dict(steps=2000, batch_size=64, learning_rate=1e-3)
DIGITS_SMOKE = dict(steps=20, batch_size=64, learning_rate=1e-3)
DIGITS_SCHEMES = ("ternary", "uniform2", "uniform3", "uniform4")

# Samples for the "sampled max |f - f_q|" columns: uniform in the box, plus qbound's search.
SAMPLES = 1 << 17


# --- ACAS Xu -------------------------------------------------------------------------------------

def prune_mask(params: dict, sparsity: float) -> tuple[dict, dict]:
  """Magnitude-pruned layers and the mask that keeps them so (1 where a weight lives, 0 where pruned).

  Args:
    params: ``params['params']`` of `qbound.io.load_nnet` (``dense_k`` -> kernel, bias).
    sparsity: the fraction of each kernel set to 0 (biases are never pruned, as in Han et al.).

  Returns:
    ``(pruned, mask)`` with the structure of ``params``.
  """
  pruned = qb.quantize.prune(params, sparsity, scope="layer")
  # The pruner zeroes exactly floor(sparsity * n) entries per kernel; an entry that was 0 already
  # (none in ACAS Xu) would count as pruned here too, which is what holding it at 0 means anyway.
  mask = {name: {"kernel": (layer["kernel"] != 0).astype(jnp.float32), "bias": jnp.ones_like(layer["bias"])}
          for name, layer in pruned.items()}
  return pruned, mask


def distill(apply, teacher: dict, start: dict, mask: dict, *, key, steps: int, batch_size: int,
            learning_rate: float, weight_decay: float):
  """Retrains ``start`` (pruned layers) towards the teacher network on uniform samples of its input range.

  The loss is the mean squared difference of all outputs; the optimizer AdamW (Loshchilov and
  Hutter, ICLR 2019) with its updates multiplied by ``mask``, so pruned weights stay exactly 0. One
  jitted ``lax.scan`` over the steps, fresh samples every step.

  Args:
    apply: ``apply(params, x)`` of `qbound.io.load_nnet` (raw input, normalised inside).
    teacher: the original network's full params (layers and normalisation).
    start: the layers to start from (``params['params']`` layout).
    mask: 1 for trainable entries, 0 for entries held at their value (the pruned zeros).
    key: PRNG key of the samples.
    steps, batch_size, learning_rate, weight_decay: the optimizer's settings.

  Returns:
    ``(layers, losses)``: the retrained layers and the loss at every step.
  """
  norm = teacher["normalisation"]
  domain = qb.Box(norm["mins"], norm["maxes"])
  f = jax.vmap(functools.partial(apply, teacher))
  fq = jax.vmap(apply, in_axes=(None, 0))
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss(layers, x):
    return jnp.mean(jnp.square(fq({"params": layers, "normalisation": norm}, x) - f(x)))

  @jax.jit
  def run(layers, key):
    # optax mixes its int32 step count with Python floats; keep that from tripping strict promotion.
    with jax.numpy_dtype_promotion("standard"):
      state = optimizer.init(layers)

      def step(carry, k):
        layers, state = carry
        value, grads = jax.value_and_grad(loss)(layers, qb.box.sample_uniform(k, domain, batch_size))
        updates, state = optimizer.update(grads, state, layers)
        updates = jax.tree.map(jnp.multiply, updates, mask)  # decay included: a pruned 0 stays 0
        return (optax.apply_updates(layers, updates), state), value

      (layers, _), losses = jax.lax.scan(step, (layers, state), jax.random.split(key, steps))
    return layers, losses

  return run(start, key)


def sampled_max_diff(f, fq, box: qb.Box, key, num: int = SAMPLES) -> tuple[np.ndarray, float]:
  """Per-output max |f - f_q| over ``num`` uniform samples of the box, and qbound's search over it.

  Returns:
    ``(per_output, searched)``: the sampled per-output maxima (float32 evaluation) and the largest
    ``max_j |f_j - f_q,j|`` found by `qb.maximize_error` (sampling plus gradient ascent).
  """
  k_sample, k_search = jax.random.split(key)
  g = jax.jit(lambda x: f(x) - fq(x))
  xs = qb.box.sample_uniform(k_sample, box, num)
  per_output = np.asarray(jnp.max(jnp.abs(jax.vmap(g)(xs)), axis=0), np.float64)
  searched, _ = qb.maximize_error(g, box, key=k_search)
  return per_output, float(searched)


def weight_changes(original: dict, copy: dict, mask: dict) -> dict:
  """Statistics of ``|w_q - w|`` over every weight and bias (``pruned`` ones included)."""
  leaves = lambda tree: [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  change = np.concatenate([np.abs(a - b) for a, b in zip(leaves(original), leaves(copy))])
  kept = np.concatenate(leaves(mask)) > 0
  weights = np.concatenate(leaves(original))
  return {"max_abs_weight_change": float(change.max()),
          "max_abs_weight_change_kept": float(change[kept].max()),
          "median_abs_weight_change_kept": float(np.median(change[kept])),
          "min_abs_weight_change": float(change.min()),
          "unchanged_values": int(np.sum(change == 0)),
          "values": int(change.size),
          "max_abs_weight_original": float(np.abs(weights).max())}


def acas_header(source_header: list[str], sparsity: float, cfg: dict, seed: int) -> list[str]:
  """The original's comment lines (its CC-BY-4.0 notice first) plus what was changed and how."""
  return [*source_header,
          "// Modified copy (CC-BY-4.0 asks that changes be indicated): written by qbound's",
          f"// benchmarks/make_differing_pairs.py. {sparsity:.0%} of each layer's weights pruned by magnitude",
          "// (set to 0), then every other weight and bias retrained by distillation from the original",
          f"// (MSE of the 5 outputs, optax AdamW lr {cfg['learning_rate']:g}, weight decay {cfg['weight_decay']:g},",
          f"// {cfg['steps']} steps of {cfg['batch_size']} uniform samples of the input range, seed {seed}).",
          "// This is not the network Julian et al. trained: use it for differential verification only."]


def make_acas(nets, sparsities_all, extra, cfg, out: pathlib.Path, seed: int) -> list[dict]:
  """Builds and writes the pruned-and-distilled ACAS Xu copies; returns one record per pair."""
  if not (BENCH / "nnet").is_dir():
    print(f"{BENCH / 'nnet'} is absent: skipping the ACAS Xu pairs (set QBOUND_BENCH to the bench checkout).")
    return []
  out.mkdir(parents=True, exist_ok=True)
  box1 = acas_properties.get("1").raw_box()
  records = []
  print(f"ACAS Xu: prune, then distil ({cfg['steps']} AdamW steps of {cfg['batch_size']} samples, lr "
        f"{cfg['learning_rate']:g}); sampled max |f - f_q| per output on property 1's box ({SAMPLES} samples)")
  for k in nets:
    for sparsity in sorted(set(sparsities_all) | set(extra.get(k, ()))):
      name = ACAS_NAME.format(k=k)
      source = BENCH / "nnet" / f"{name}.nnet"
      apply, params = qb.io.load_nnet(source)
      start = time.perf_counter()
      pruned, mask = prune_mask(params["params"], sparsity)
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), k), round(1000 * sparsity))
      k_train, k_eval = jax.random.split(key)
      layers, losses = distill(apply, params, pruned, mask, key=k_train, **cfg)
      layers = jax.block_until_ready(layers)
      seconds = time.perf_counter() - start
      # Pruned entries must still be exactly 0: the mask covers the decay as well.
      assert all(bool(jnp.all(l["kernel"][m["kernel"] == 0] == 0)) for l, m in zip(layers.values(), mask.values()))
      copy = {"params": layers, "normalisation": params["normalisation"]}

      file = out / f"{name}_pruned{round(100 * sparsity)}.nnet"
      qb.io.save_nnet(file, copy, header=acas_header(qb.io.read_nnet_header(source), sparsity, cfg, seed))
      _, again = qb.io.load_nnet(file)
      same = all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(copy), jax.tree.leaves(again)))
      assert same, f"{file} does not read back to the network written"

      f, fq = functools.partial(apply, params), functools.partial(apply, again)
      per_output, searched = sampled_max_diff(f, fq, box1, k_eval)
      kernels = [np.asarray(l["kernel"]) for l in layers.values()]
      record = {"file": file.name, "original": source.name, "net": f"1_{k}", "sparsity": sparsity,
                "pruned_fraction_of_weights": float(sum((w == 0).sum() for w in kernels) / sum(w.size for w in kernels)),
                "pruned_fraction_of_parameters": float(sum((w == 0).sum() for w in kernels)
                                                       / sum(x.size for x in jax.tree.leaves(layers))),
                **weight_changes(params["params"], layers, mask),
                "property1_sampled_max_diff_per_output": per_output.tolist(),
                "property1_searched_max_diff": searched,
                "property1_reached_max_diff": max(float(per_output.max()), searched),
                "final_loss": float(jnp.mean(losses[-100:])), "train_seconds": seconds,
                "bytes": file.stat().st_size}
      records.append(record)
      print(f"  {file.name}: pruned {record['pruned_fraction_of_weights']:.3f}, max |dw| "
            f"{record['max_abs_weight_change']:.3f} (kept weights {record['max_abs_weight_change_kept']:.3f}, "
            f"median {record['median_abs_weight_change_kept']:.2g}, unchanged {record['unchanged_values']}), "
            f"property 1 max |f - f_q| per output {np.array2string(per_output, precision=4)} "
            f"(search {searched:.4f}), {seconds:.1f} s", flush=True)
  return records


# --- digits ---------------------------------------------------------------------------------------

def digits_quantizer(scheme: str):
  """The kernels-only quantizer of a scheme: TWN ternary or symmetric per-tensor uniform k-bit."""
  if scheme == "ternary":
    return qb.quantize.ternary_quantizer(where=qb.quantize.kernels_only)
  return qb.quantize.uniform_quantizer(bits=int(scheme.removeprefix("uniform")), where=qb.quantize.kernels_only)


def digits_header(source_header: list[str], scheme: str, cfg: dict, seed: int) -> list[str]:
  what = "ternary (TWN, threshold 0.7 mean|w|)" if scheme == "ternary" else \
      f"symmetric per-tensor {scheme.removeprefix('uniform')}-bit"
  return [*source_header,
          f"// Quantized copy: {what} kernels, float32 biases, written by qbound's",
          "// benchmarks/make_differing_pairs.py: quantization-aware retraining (qb.quantize.retrain,",
          f"// straight-through gradients) towards the float network's logits (MSE), optax Adam lr "
          f"{cfg['learning_rate']:g},",
          f"// {cfg['steps']} steps of {cfg['batch_size']} training images, seed {seed}."]


def make_digits(cfg, out: pathlib.Path, seed: int, schemes=DIGITS_SCHEMES) -> list[dict]:
  """Builds and writes the QAT copies of the bundled digits MLP; returns one record per copy."""
  sys.path.insert(0, str(ROOT / "experiments"))
  try:
    from train_digits_model import split_digits  # the split the bundled model was trained on
  except ImportError as e:  # scikit-learn (the digits data) is an optional dependency
    print(f"skipping the digits copies: {e}")
    return []
  out.mkdir(parents=True, exist_ok=True)
  source = qb.io.bundled_path("digits_mlp.nnet")
  apply, params = qb.io.load_nnet(source)
  x_train, _, x_test, y_test = split_digits()
  f = functools.partial(apply, params)
  accuracy = lambda p: float(jnp.mean(jnp.argmax(jax.vmap(functools.partial(apply, p))(x_test), -1) == y_test))
  targets = jax.vmap(f)(jnp.asarray(x_train))
  images = np.load(qb.io.bundled_path("digits_test.npz"))["images"]
  records = []
  print(f"digits MLP (test accuracy {accuracy(params):.4f}): quantization-aware distillation, "
        f"{cfg['steps']} Adam steps")
  for i, scheme in enumerate(schemes):
    start = time.perf_counter()
    quantize = digits_quantizer(scheme)
    key = jax.random.fold_in(jax.random.key(seed), 100 + i)
    k_train, k_eval = jax.random.split(key)
    shadow = qat.retrain(apply, params, quantize, (jnp.asarray(x_train), targets),
                         optimizer=optax.adam(cfg["learning_rate"]), steps=cfg["steps"], key=k_train,
                         batch_size=cfg["batch_size"], loss="mse", where="params/*")
    copy = jax.block_until_ready(quantize(shadow))
    seconds = time.perf_counter() - start

    file = out / f"digits_mlp_{scheme}_qat.nnet"
    qb.io.save_nnet(file, copy, header=digits_header(qb.io.read_nnet_header(source), scheme, cfg, seed))
    _, again = qb.io.load_nnet(file)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(copy), jax.tree.leaves(again)))

    fq = functools.partial(apply, again)
    # Differences: over the whole input range [0, 1]^64, and over L-inf balls of radius 0.02 around
    # the bundled test images (the boxes the experiments certify over), worst ball.
    whole, whole_search = sampled_max_diff(f, fq, qb.Box(jnp.zeros(64), jnp.ones(64)), k_eval, 1 << 14)
    balls = [sampled_max_diff(f, fq, qb.linf_ball(x, 0.02, clip_lower=0.0, clip_upper=1.0),
                              jax.random.fold_in(k_eval, j), 1 << 12)[1] for j, x in enumerate(images[:5])]
    kernels = [np.asarray(l["kernel"]) for l in again["params"].values()]
    record = {"file": file.name, "original": source.name, "scheme": scheme,
              "accuracy_float": accuracy(params), "accuracy_post_training": accuracy(quantize(params)),
              "accuracy_qat": accuracy(again),
              "distinct_kernel_values_per_layer": [int(np.unique(w).size) for w in kernels],
              **weight_changes(params["params"], again["params"], jax.tree.map(jnp.ones_like, params["params"])),
              "box01_sampled_max_diff": float(whole.max()), "box01_searched_max_diff": whole_search,
              "balls_r0.02_searched_max_diff_images0-4": balls,
              "train_seconds": seconds, "bytes": file.stat().st_size}
    records.append(record)
    print(f"  {file.name}: accuracy {record['accuracy_qat']:.4f} (without retraining "
          f"{record['accuracy_post_training']:.4f}), kernel values per layer {record['distinct_kernel_values_per_layer']}, "
          f"max |dw| {record['max_abs_weight_change']:.3f}, max |f - f_q| searched: [0,1]^64 {whole_search:.3f}, "
          f"balls r=0.02 {max(balls):.3f}; {seconds:.1f} s", flush=True)
  return records


def write_records(path: pathlib.Path, records: list[dict], config: dict) -> None:
  """Writes ``pairs.json``, keeping records of files this run did not rebuild."""
  old = json.loads(path.read_text()) if path.exists() else {}
  pairs = {r["file"]: r for r in old.get("pairs", [])}
  pairs.update({r["file"]: r for r in records})
  doc = {"generator": "benchmarks/make_differing_pairs.py", "config": config,
         "machine": {"platform": platform.platform(), "jax": jax.__version__, "devices": str(jax.devices())},
         "pairs": [pairs[name] for name in sorted(pairs)]}
  path.write_text(json.dumps(doc, indent=1) + "\n")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="acas,digits", help="comma-separated: acas, digits")
  p.add_argument("--nets", type=int, nargs="+", default=list(range(1, 10)), help="ACAS Xu nets 1_k")
  p.add_argument("--sparsity", type=float, nargs="+", default=[0.1], help="pruning levels for every net")
  p.add_argument("--extra-sparsity", type=float, nargs="*", default=[0.05, 0.3],
                 help="further levels for the first net of --nets only")
  p.add_argument("--steps", type=int, default=None, help="retraining steps (default 3000 ACAS, 2000 digits)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=pathlib.Path, default=None, help="output root (default benchmarks/data)")
  p.add_argument("--smoke", action="store_true", help="1_1 at 10%% and one digits scheme, few steps, temp dir")
  args = p.parse_args(argv)
  only = set(args.only.split(","))
  acas_cfg, digits_cfg = dict(ACAS_SMOKE if args.smoke else ACAS), dict(DIGITS_SMOKE if args.smoke else DIGITS)
  if args.steps:
    acas_cfg["steps"] = digits_cfg["steps"] = args.steps
  root = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="qbound_pairs_")) if args.smoke else DATA)
  nets, extra, schemes = args.nets, {args.nets[0]: tuple(args.extra_sparsity)}, DIGITS_SCHEMES
  if args.smoke:
    nets, extra, schemes = [1], {}, DIGITS_SCHEMES[:1]
  start = time.perf_counter()
  if "acas" in only:
    records = make_acas(nets, args.sparsity, extra, acas_cfg, root / "acas_pruned", args.seed)
    if records:
      write_records(root / "acas_pruned" / "pairs.json", records, {**acas_cfg, "seed": args.seed})
  if "digits" in only:
    records = make_digits(digits_cfg, root / "digits_qat", args.seed, schemes)
    if records:
      write_records(root / "digits_qat" / "pairs.json", records, {**digits_cfg, "seed": args.seed})
  print(f"wrote under {root} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
