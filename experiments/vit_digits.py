"""A small vision transformer on the 8x8 digits against int8 copies: proven error bounds.

The model: the 8x8 image cut into four 4x4 patches (4 tokens of 16 pixels), a linear patch
embedding of width 32 plus learned position embeddings, pre-norm transformer blocks (flax
LayerNorm, 2-head softmax self-attention, a GELU MLP of width 64), mean pooling, a final LayerNorm
and a linear classifier. Trained with Adam (optax) for a few hundred steps, then quantized to int8
weights twice: qbound's ``qb.quantize.uniform(params, bits=8)``, and qwix's weight-only PTQ
(``weight_qtype="int8"`` on every module, attention's einsums included; qwix dequantizes the
kernels, and writes ``q k^T`` with its operands swapped, which the tracer puts back in order, so the
layers pair with f's). Certified
over L-inf balls (radius 0.001, 0.005 and 0.01, clipped to [0, 1]) around test images by
``qb.certify`` with ``method="crown"`` (CROWN on the merged network ``f - f_q``: f and f_q
relaxed apart), ``method="diff"`` (differential bounds through every layer, products and
smooth curves included: :mod:`qbound.bounds.nonlinear_diff`) and ``method="auto"`` (both, the
search, optimised slopes and branch and bound, within a time budget). ``reached`` is the
largest error the searches found (a lower bound on the maximal error).

    python experiments/vit_digits.py           # full: 1 block, 3 images, three radii, two copies
    python experiments/vit_digits.py --smoke   # seconds: a narrower model, 1 image

Writes ``vit_digits.csv`` (one row per copy, image, radius and method: proven upper bound, reached
error, seconds) and ``summary.json`` under ``results/vit_digits/``.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qbound as qb
import common

NAME = "vit_digits"
SMOKE = dict(width=16, blocks=1, heads=2, mlp=32, steps=40, images=1, radii=(0.001,), methods=("crown", "diff"),
             copies=("qbound",), budget=2.0)
FULL = dict(width=32, blocks=1, heads=2, mlp=64, steps=400, images=3, radii=(0.001, 0.005, 0.01),
            methods=("crown", "diff", "auto"), copies=("qbound", "qwix"), budget=20.0)


class Block(nn.Module):
  width: int
  heads: int
  mlp: int
  fast_variance: bool = True

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(nn.LayerNorm, use_fast_variance=self.fast_variance)
    h = norm()(x)
    d = self.width // self.heads
    q = nn.Dense(self.width)(h).reshape(-1, self.heads, d)
    k = nn.Dense(self.width)(h).reshape(-1, self.heads, d)
    v = nn.Dense(self.width)(h).reshape(-1, self.heads, d)
    scores = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    attn = jax.nn.softmax(scores, axis=-1)
    mixed = jnp.einsum("hqk,khd->qhd", attn, v).reshape(-1, self.width)
    x = x + nn.Dense(self.width)(mixed)
    h = norm()(x)
    return x + nn.Dense(self.width)(nn.gelu(nn.Dense(self.mlp)(h)))


class ViT(nn.Module):
  """A vision transformer on one flattened 8x8 image (64 values): 4 tokens of 4x4 patches."""

  width: int = 32
  blocks: int = 1
  heads: int = 2
  mlp: int = 64
  classes: int = 10
  fast_variance: bool = True  # flax's default mean(x^2) - mean(x)^2; False: mean((x - mean)^2)

  @nn.compact
  def __call__(self, x):
    img = x.reshape(8, 8)
    patches = img.reshape(2, 4, 2, 4).transpose(0, 2, 1, 3).reshape(4, 16)
    tokens = nn.Dense(self.width)(patches)
    tokens = tokens + self.param("pos", nn.initializers.normal(0.02), (4, self.width))
    for _ in range(self.blocks):
      tokens = Block(self.width, self.heads, self.mlp, self.fast_variance)(tokens)
    norm = nn.LayerNorm(use_fast_variance=self.fast_variance)
    return nn.Dense(self.classes)(norm(tokens.mean(axis=0)))


def train(model, key, x_train, y_train, steps: int, batch: int = 64, learning_rate: float = 3e-3):
  init_key, key = jax.random.split(key)
  params = model.init(init_key, jnp.zeros(64))
  opt = optax.adam(learning_rate)
  state = opt.init(params)
  x_train, y_train = jnp.asarray(x_train, jnp.float32), jnp.asarray(y_train)

  def loss(p, xb, yb):
    logits = jax.vmap(functools.partial(model.apply, p))(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def step(p, s, k):
    idx = jax.random.randint(k, (batch,), 0, x_train.shape[0])
    g = jax.grad(loss)(p, x_train[idx], y_train[idx])
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for k in jax.random.split(key, steps):
    params, state = step(params, state, k)
  return params


def qwix_int8(model, params):
  """qwix's weight-only int8 PTQ of ``model``: ``(apply function, None)``, or ``(None, reason)``
  when qwix is not installed."""
  try:
    import qwix
  except ImportError as err:  # an optional extra
    return None, f"qwix not installed: {err}"
  # Every module (module_path ".*"): qwix also intercepts attention's einsums of two activations
  # (nothing to quantize there in weight-only mode) and writes q k^T with its operands swapped; the
  # tracer builds products in a canonical operand order, so f_q still pairs with f.
  rules = [qwix.QuantizationRule(module_path=".*", weight_qtype="int8")]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), jnp.zeros(64))
  qparams = qwix.quantize_params(params["params"], abstract["params"])
  return (lambda x: qmodel.apply({"params": qparams}, x)), None


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--centered-variance", action="store_true",
                 help="layer norms compute mean((x - mean)^2) (flax use_fast_variance=False), not mean(x^2) - mean^2")
  p.add_argument("--methods", default=None, help="comma-separated certify methods (default: crown,diff,auto)")
  p.add_argument("--copies", default=None, help="comma-separated int8 copies: qbound, qwix (default: both)")
  p.add_argument("--radii", default=None, help="comma-separated radii (default: 0.001,0.005,0.01)")
  p.add_argument("--budget", type=float, default=None, help="seconds per auto certificate (default 20)")
  args = p.parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL, methods=args.methods and tuple(args.methods.split(",")),
                        copies=args.copies and tuple(args.copies.split(",")),
                        radii=args.radii and tuple(float(r) for r in args.radii.split(",")), budget=args.budget)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  k_model, k_cert = jax.random.split(jax.random.key(args.seed))
  x_train, y_train, x_test, y_test = common.digits()
  model = ViT(cfg["width"], cfg["blocks"], cfg["heads"], cfg["mlp"], fast_variance=not args.centered_variance)
  t = time.perf_counter()
  params = train(model, k_model, x_train, y_train, cfg["steps"])
  train_seconds = time.perf_counter() - t
  f = functools.partial(model.apply, params)
  copies, accuracies, skipped = {}, {"float": common.accuracy(model.apply, params, x_test, y_test)}, {}
  for name in cfg["copies"]:
    if name == "qbound":
      qparams = qb.quantize.uniform(params, bits=8)
      copies[name] = functools.partial(model.apply, qparams)
    else:
      fq, reason = qwix_int8(model, params)
      if fq is None:
        skipped[name] = reason
        continue
      copies[name] = fq
    accuracies[name] = float(np.mean(np.argmax(jax.jit(jax.vmap(copies[name]))(jnp.asarray(x_test)), -1) == y_test))
  graph = qb.trace(f, jnp.zeros(64))
  kinds = {}
  for node in graph.nodes:
    kinds[node.kind] = kinds.get(node.kind, 0) + 1
  print(f"ViT width {cfg['width']}, {cfg['blocks']} block(s): accuracy {accuracies}; "
        f"trained in {train_seconds:.1f} s; graph of f: {len(graph.nodes)} nodes {kinds}")

  rows = []
  for copy, fq in copies.items():
    for i, x in enumerate(x_test[: cfg["images"]]):
      for radius in cfg["radii"]:
        box = common.pixel_box(x, radius)
        merged = qb.merge(f, fq, box)
        for method in cfg["methods"]:
          t = time.perf_counter()
          cert = qb.certify(merged, None, box, method=method, key=jax.random.fold_in(k_cert, i),
                            time_budget=cfg["budget"])
          rows.append(dict(copy=copy, paired=merged.paired, image=i, radius=radius, method=method, upper=cert.upper,
                           lower=cert.lower, gap=cert.gap, best_method=cert.method,
                           seconds=time.perf_counter() - t, bounds=str(cert.bounds)))
          print(f"  {copy} image {i} radius {radius} {method:>5}: error in [{cert.lower:.4g}, {cert.upper:.4g}] "
                f"({cert.method}, {rows[-1]['seconds']:.1f} s)", flush=True)
  common.check_certificates(rows)
  table_rows = []
  for copy in copies:
    for radius in cfg["radii"]:
      sel = [r for r in rows if r["copy"] == copy and r["radius"] == radius]
      row = dict(copy=copy, radius=radius, images=len({r["image"] for r in sel}))
      # reached: per image the largest error any method's search found; then the median over images
      reached = [max(r["lower"] for r in sel if r["image"] == i) for i in sorted({r["image"] for r in sel})]
      row["reached"] = float(np.median(reached))
      for method in cfg["methods"]:
        ms = [r for r in sel if r["method"] == method]
        row[method] = float(np.median([r["upper"] for r in ms]))
        row[f"{method}_s"] = float(np.median([r["seconds"] for r in ms]))
      table_rows.append(row)
  columns = ["copy", "radius", "images", "reached"] + [c for m in cfg["methods"] for c in (m, f"{m}_s")]
  print(common.table(table_rows, columns, title="ViT vs int8 copies: proven upper bounds by method and reached "
                                                "error (medians over images; seconds per certificate)"))
  common.write_csv(out / "vit_digits.csv", rows)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg,
             "centered_variance": args.centered_variance, "accuracy": accuracies, "skipped": skipped,
             "train_seconds": train_seconds, "graph_kinds": kinds, "rows": rows, "table": table_rows,
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/vit_digits.csv, summary.json ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
