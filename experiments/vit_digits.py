"""A small vision transformer on the 8x8 digits against its int8 copy: proven error bounds.

The model: the 8x8 image cut into four 4x4 patches (4 tokens of 16 pixels), a linear patch
embedding of width 32 plus learned position embeddings, pre-norm transformer blocks (flax
LayerNorm, 2-head softmax self-attention, a GELU MLP of width 64), mean pooling, a final LayerNorm
and a linear classifier. Trained with Adam (optax) for a few hundred steps, then quantized to int8
weights (``qb.quantize.uniform(params, bits=8)``). Certified over L-inf balls (radius 0.005 and
0.01, clipped to [0, 1]) around test images: CROWN on the merged network (``f - f_q`` as one graph),
``qb.certify(method="crown")`` (what ``method="auto"`` also runs for such models, before its
attack and branch and bound; differential bounds have no rule for products and smooth curves yet).

    python experiments/vit_digits.py           # full: 1 block, 3 images, two radii (~10 minutes)
    python experiments/vit_digits.py --smoke   # seconds: a narrower model, 1 image

Writes ``vit_digits.csv`` (one row per image, radius and method: proven upper bound, reached
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
SMOKE = dict(width=16, blocks=1, heads=2, mlp=32, steps=40, images=1, radii=(0.005,), methods=("crown",),
             budget=2.0)
FULL = dict(width=32, blocks=1, heads=2, mlp=64, steps=400, images=3, radii=(0.0001, 0.001, 0.005, 0.01),
            methods=("crown",), budget=60.0)


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


def main(argv=None):
  p = common.parser(NAME, __doc__)
  p.add_argument("--centered-variance", action="store_true",
                 help="layer norms compute mean((x - mean)^2) (flax use_fast_variance=False), not mean(x^2) - mean^2")
  args = p.parse_args(argv)
  common.setup(args)
  cfg = common.settings(args, SMOKE, FULL)
  out = common.out_dir(NAME, args)
  start = time.perf_counter()
  k_model, k_cert = jax.random.split(jax.random.key(args.seed))
  x_train, y_train, x_test, y_test = common.digits()
  model = ViT(cfg["width"], cfg["blocks"], cfg["heads"], cfg["mlp"], fast_variance=not args.centered_variance)
  t = time.perf_counter()
  params = train(model, k_model, x_train, y_train, cfg["steps"])
  train_seconds = time.perf_counter() - t
  qparams = qb.quantize.uniform(params, bits=8)
  float_acc = common.accuracy(model.apply, params, x_test, y_test)
  int8_acc = common.accuracy(model.apply, qparams, x_test, y_test)
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, qparams)
  graph = qb.trace(f, jnp.zeros(64))
  kinds = {}
  for node in graph.nodes:
    kinds[node.kind] = kinds.get(node.kind, 0) + 1
  print(f"ViT width {cfg['width']}, {cfg['blocks']} block(s): accuracy float {float_acc:.4f}, int8 {int8_acc:.4f}; "
        f"trained in {train_seconds:.1f} s; graph of f: {len(graph.nodes)} nodes {kinds}")

  rows = []
  for i, x in enumerate(x_test[: cfg["images"]]):
    for radius in cfg["radii"]:
      box = common.pixel_box(x, radius)
      for method in cfg["methods"]:
        t = time.perf_counter()
        cert = qb.certify(f, fq, box, method=method, key=jax.random.fold_in(k_cert, i), time_budget=cfg["budget"])
        rows.append(dict(image=i, radius=radius, method=method, upper=cert.upper, lower=cert.lower,
                         gap=cert.gap, best_method=cert.method, seconds=time.perf_counter() - t,
                         interval=cert.bounds.get("interval", float("nan")),
                         crown=cert.bounds.get("crown", float("nan"))))
        print(f"  image {i} radius {radius} {method:>5}: error in [{cert.lower:.4g}, {cert.upper:.4g}] "
              f"({cert.method}, {rows[-1]['seconds']:.1f} s)")
  common.check_certificates(rows)
  table_rows = []
  for radius in cfg["radii"]:
    for method in cfg["methods"]:
      sel = [r for r in rows if r["radius"] == radius and r["method"] == method]
      table_rows.append(dict(radius=radius, method=method, images=len(sel),
                             upper_median=float(np.median([r["upper"] for r in sel])),
                             lower_median=float(np.median([r["lower"] for r in sel])),
                             gap_median=float(np.median([r["gap"] for r in sel])),
                             seconds_median=float(np.median([r["seconds"] for r in sel]))))
  print(common.table(table_rows, ["radius", "method", "images", "upper_median", "lower_median", "gap_median",
                                  "seconds_median"],
                     title="ViT vs int8 copy: proven upper bound and reached error (medians over images)"))
  common.write_csv(out / "vit_digits.csv", rows)
  summary = {"experiment": NAME, "smoke": args.smoke, "seed": args.seed, "config": cfg,
             "centered_variance": args.centered_variance, "float_acc": float_acc,
             "int8_acc": int8_acc, "train_seconds": train_seconds, "graph_kinds": kinds, "rows": rows,
             "table": table_rows, "differential": "not available: products and smooth curves have no "
                                                  "differential rule (UnsupportedLayerError)",
             "seconds": time.perf_counter() - start, "machine": common.machine()}
  common.write_json(out / "summary.json", summary)
  print(f"wrote {out}/vit_digits.csv, summary.json ({summary['seconds']:.1f} s)")
  return summary


if __name__ == "__main__":
  main()
