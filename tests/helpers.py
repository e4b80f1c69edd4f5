"""Shared test utilities: small nets, a reference quantizer, float64 evaluation, grids.

Net shapes come from a small fixed set (``SHAPES``) so that jit caches (bound propagation compiles
once per graph structure, the weights being arguments) are reused across tests and hypothesis
examples.
"""

from __future__ import annotations

import functools
import itertools
import pathlib
import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qbound as qb
from qbound import graph as G

# (inputs, hidden widths, outputs): every random net in the tests has one of these shapes.
SHAPES = ((2, (8, 8), 2), (3, (6, 6, 6), 2), (5, (8, 8), 3), (4, (5, 7), 1), (1, (8, 8), 1))


class BiasedMLP(nn.Module):
  """Dense layers of ``sizes`` with ReLU between them and random (not zero) biases."""

  sizes: tuple = (8, 8, 3)

  @nn.compact
  def __call__(self, x):
    for i, n in enumerate(self.sizes):
      x = nn.Dense(n, bias_init=nn.initializers.normal(0.1))(x)
      if i < len(self.sizes) - 1:
        x = nn.relu(x)
    return x


def relu_mlp(layers: Sequence, x):
  """``x`` through dense layers ``layers`` (``(kernel, bias)`` pairs), a ReLU between each two: a
  net built from plain arrays, which compiles nothing to make (flax's init does, per shape)."""
  for i, (kernel, bias) in enumerate(layers):
    x = x @ kernel + bias
    if i < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def biased_mlp_params(seed=0, sizes=(8, 8, 3), dtype=jnp.float32):
  """Parameters of a :class:`BiasedMLP` on 5 inputs, the quantizer tests' standard pytree."""
  params = BiasedMLP(tuple(sizes)).init(jax.random.key(seed), jnp.ones(5))
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


class MLP(nn.Module):
  """A user-written linen MLP: Dense -> ReLU ... -> Dense."""

  hidden: Sequence[int]
  outputs: int

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.outputs)(x)


def uniform_quantize(params, bits: int):
  """Reference symmetric uniform quantizer, per tensor: ``q = round(w / s) * s``,
  ``s = max|w| / (2^(bits-1) - 1)`` (tensors of zeros are left as they are)."""

  def quantize(w):
    w = jnp.asarray(w)
    s = jnp.max(jnp.abs(w)) / (2 ** (bits - 1) - 1)
    safe = jnp.where(s > 0, s, 1.0)
    return jnp.where(s > 0, jnp.round(w / safe) * safe, w).astype(w.dtype)

  return jax.tree_util.tree_map(quantize, params)


def perturb(params, key, scale: float):
  """Every weight plus ``scale * |w|_max * N(0, 1)`` noise (a stand-in for any compression)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  noisy = [w + scale * jnp.max(jnp.abs(w)) * jax.random.normal(k, w.shape, w.dtype) for w, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, noisy)


@functools.lru_cache(maxsize=None)
def mlp(hidden: tuple[int, ...], outputs: int) -> MLP:
  return MLP(hidden=hidden, outputs=outputs)


def random_pair(seed: int, shape=SHAPES[0], *, bits: int | None = 4, noise: float | None = None,
                init_scale: float = 1.0):
  """``(f, fq, params, qparams)`` for a random MLP of ``shape``, quantized to ``bits`` or perturbed.

  ``init_scale`` multiplies the initial weights (larger weights make more ReLUs unstable).
  """
  n_in, hidden, n_out = shape
  model = mlp(tuple(hidden), n_out)
  key_init, key_noise = jax.random.split(jax.random.key(seed))
  params = model.init(key_init, jnp.zeros(n_in))
  params = jax.tree_util.tree_map(lambda w: w * init_scale, params)
  if noise is not None:
    qparams = perturb(params, key_noise, noise)
  else:
    qparams = uniform_quantize(params, bits)
  f = functools.partial(model.apply, params)
  fq = functools.partial(model.apply, qparams)
  return f, fq, params, qparams


def random_box(seed: int, n_in: int, *, radius=(0.05, 1.0)) -> qb.Box:
  """A random box: centre in [-1, 1]^n, per-coordinate radius in ``radius``."""
  rng = np.random.default_rng(seed)
  center = rng.uniform(-1, 1, n_in)
  r = rng.uniform(*radius, n_in)
  return qb.Box(jnp.asarray(center - r, jnp.float32), jnp.asarray(center + r, jnp.float32))


def dynamic_quant_library(spec, x, reciprocal: bool = False):
  """A dynamic fake quantization of ``x`` as the libraries compute it in float32, written as qwix and
  AQT do (``x / s``, or ``x * (1 / s)`` as XLA may rewrite it, or as AQT does), independent of
  :func:`qbound.dynamic_rounding.quantize` (``spec``: its :class:`~qbound.dynamic_rounding.DynamicScale`,
  ``norm="max"``)."""
  keep = spec.axes is not None
  if spec.zero_point is None:
    s = jnp.max(jnp.abs(x), axis=spec.axes, keepdims=keep) / spec.divisor
  else:
    offset, span = spec.zero_point
    c = span / spec.divisor
    low = jnp.minimum(jnp.min(x, axis=spec.axes, keepdims=keep), 0.0) * c
    high = jnp.maximum(jnp.max(x, axis=spec.axes, keepdims=keep), 0.0) * c
    s = (high - low) / span
  if spec.guard is not None:
    s = jnp.where(s < spec.guard[1], spec.guard[2], s)
  z = x * (1 / s) if reciprocal else x / s
  zero = 0.0
  if spec.zero_point is not None:
    zero = jnp.round(spec.zero_point[0] - low / s)
    z = z + zero
  if spec.low == -127:  # AQT: clip, then round
    z = jnp.clip(z, spec.low, spec.high)
  r = jnp.round(z) if spec.rounding == "nearest" else jax.lax.round(z, jax.lax.RoundingMethod.AWAY_FROM_ZERO)
  return s * (jnp.clip(r, spec.low, spec.high) - zero)


@functools.lru_cache(maxsize=None)
def _batched64(structure):
  del structure  # one compiled function per graph structure (weights are arguments)
  return jax.jit(jax.vmap(lambda graph, x: graph(x), in_axes=(None, 0)))


def eval64(graph: G.Graph, xs) -> np.ndarray:
  """``graph`` on a batch of inputs in float64 (the batched twin of ``qbound.attack.exact_error``)."""
  if isinstance(graph, qb.MergedNetwork):
    graph = graph.graph
  with jax.enable_x64(True):
    g64 = G.astype(graph, jnp.float64)
    fn = _batched64(jax.tree_util.tree_structure(g64))
    return np.asarray(fn(g64, jnp.asarray(np.asarray(xs, np.float64))), np.float64)


@functools.lru_cache(maxsize=None)
def _values64(structure):
  del structure  # one compiled function per graph structure (weights are arguments)
  return jax.jit(jax.vmap(lambda graph, x: graph.values(x), in_axes=(None, 0)))


def node_values64(graph: G.Graph, xs) -> list[np.ndarray]:
  """Every node's float64 value at each of the inputs ``xs``: one ``(len(xs), *node.shape)``
  array per node (``Graph.values``)."""
  with jax.enable_x64(True):
    g64 = G.astype(graph, jnp.float64)
    fn = _values64(jax.tree_util.tree_structure(g64))
    return [np.asarray(v, np.float64) for v in fn(g64, jnp.asarray(np.asarray(xs, np.float64)))]


def sample_points(box: qb.Box, num: int, seed: int = 0) -> np.ndarray:
  """Uniform samples, random vertices, all vertices when few, and the centre of the box (float64)."""
  rng = np.random.default_rng(seed)
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  uniform = lo + rng.uniform(size=(num, *lo.shape)) * (hi - lo)
  bits = rng.integers(0, 2, size=(num // 4 + 1, *lo.shape)).astype(bool)
  vertices = np.where(bits, hi, lo)
  parts = [uniform, vertices, ((lo + hi) / 2)[None]]
  if lo.size <= 6:
    corners = np.array(list(itertools.product([0, 1], repeat=lo.size)), bool).reshape(-1, *lo.shape)
    parts.append(np.where(corners, hi, lo))
  return np.concatenate(parts)


def grid(box: qb.Box, per_axis: int) -> np.ndarray:
  """A dense regular grid over a 1-D or 2-D box (float64), corners included."""
  lo, hi = np.asarray(box.lower, np.float64).ravel(), np.asarray(box.upper, np.float64).ravel()
  axes = [np.linspace(a, b, per_axis) for a, b in zip(lo, hi)]
  mesh = np.meshgrid(*axes, indexing="ij")
  return np.stack([m.ravel() for m in mesh], axis=-1).reshape(-1, *box.shape)


def max_error(graph, xs) -> float:
  """``max_i |graph(xs_i)|_inf`` in float64."""
  out = eval64(graph, xs)
  return float(np.max(np.abs(out.reshape(out.shape[0], -1))))


def search():
  """One lower-bound search setting shared by the tests: ``maximize_error`` compiles once per
  (graph structure, setting), so sharing it keeps the suite fast."""
  return qb.Search(samples=512, restarts=8, steps=60)


class Attention(nn.Module):
  """A small transformer block: layer norm, softmax attention, a GELU MLP (3 tokens of width 4).
  Shared by the nonlinear tests so their compiled CROWN steps are shared too."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q, k, v = nn.Dense(4)(h), nn.Dense(4)(h), nn.Dense(4)(h)
    a = jax.nn.softmax(q @ k.T / 2.0, axis=-1)
    x = x + nn.Dense(4)(a @ v)
    return nn.Dense(2)(nn.gelu(nn.Dense(8)(x)).mean(0))


class TinyAttention(nn.Module):
  """Two tokens of width 2: layer norm, softmax attention, a sum (few node steps to compile)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q, k, v = nn.Dense(2)(h), nn.Dense(2)(h), nn.Dense(2)(h)
    a = jax.nn.softmax(q @ k.T, axis=-1)
    return (x + a @ v).sum(0)


def quantized_pair(model: nn.Module, shape=(3, 4), bits: int = 4):
  """``(f, fq, x0)``: ``model`` at fixed random weights, its ``bits``-bit copy, and an input ``x0``."""
  x0 = jax.random.normal(jax.random.key(3), shape)
  params = model.init(jax.random.key(4), x0)
  return (functools.partial(model.apply, params),
          functools.partial(model.apply, qb.quantize.uniform(params, bits=bits)), x0)


def python_blocks(path: pathlib.Path) -> list[str]:
  """The ```python blocks of a markdown file, dedented (fenced blocks inside list items are indented)."""
  found = re.finditer(r"^( *)```python\n(.*?)^\1```", pathlib.Path(path).read_text(), flags=re.S | re.M)
  return ["\n".join(line[len(m.group(1)):] for line in m.group(2).splitlines()) for m in found]
