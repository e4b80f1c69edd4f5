"""Compression as pytree transforms: magnitude pruning, weight sharing, low rank.

The first two stages of Deep Compression (Han, Mao & Dally, ICLR 2016,
"Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
Quantization and Huffman Coding"), plus truncated-SVD low rank. The third stage,
Huffman coding, only changes the storage, not the values, and is measured by
`qbound.quantize.coding.size_report`.

Each transform keeps shapes and dtypes, so the compressed parameters run in the
unchanged model code, and they compose: ``chain(pruner(0.9), weight_sharer(4))``
prunes, then shares the surviving weights; a pruned zero stays zero through
weight sharing. All are jit-able. By default they act on kernels only
(``where=kernels_only``): Deep Compression prunes and shares connections, not
biases.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qbound.quantize import numerics
from qbound.quantize.policy import PyTree, Selection, Transform, Where, as_predicate, kernels_only, map_selected

SCOPES = ('layer', 'global')


def _check_sparsity(sparsity) -> float:
  if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
    raise ValueError(f'sparsity must be a number in [0, 1) (the fraction of weights set to 0), got {sparsity!r}.')
  return float(sparsity)


def _keep_mask(magnitudes: jax.Array, sparsity: float) -> jax.Array:
  """False for the floor(sparsity * n) smallest entries of a flat array, True elsewhere.

  Ranks rather than a threshold, so exactly that many are pruned even with ties
  (broken by position; existing zeros go first). Comparing ranks with k, rather
  than slicing the first k, keeps shapes independent of k: one compile serves
  every sparsity.
  """
  n = magnitudes.size
  k = math.floor(sparsity * n)
  order = jnp.argsort(magnitudes, stable=True)
  ranks = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return ranks >= k


def pruner(sparsity: float, *, scope: str = 'layer', where: Where = kernels_only) -> Transform:
  """Magnitude pruning: sets the smallest-magnitude weights to zero.

  Han, Pool, Tran & Dally, NeurIPS 2015, "Learning both Weights and Connections
  for Efficient Neural Networks"; stage one of Deep Compression (Han et al.,
  ICLR 2016). With ``scope='layer'`` each selected parameter loses
  floor(sparsity * size) of its weights; with ``scope='global'`` one magnitude
  ranking over all selected parameters removes floor(sparsity * total), so
  layers with small weights lose more.

  Args:
    sparsity: fraction of weights to set to zero, in [0, 1).
    scope: 'layer' or 'global'.
    where: which parameters to prune (kernels by default).

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> pruner(0.5)({'kernel': jnp.array([0.1, -2.0, 0.3, -0.05])})['kernel'].tolist()
  [0.0, -2.0, 0.30000001192092896, 0.0]
  """
  sparsity = _check_sparsity(sparsity)
  if scope not in SCOPES:
    raise ValueError(f'unknown pruning scope {scope!r}; choose one of {SCOPES}.')
  predicate = as_predicate(where)

  def prune_leaf(path, x):
    keep = _keep_mask(jnp.abs(x.ravel().astype(jnp.float32)), sparsity).reshape(x.shape)
    return jnp.where(keep, x, jnp.zeros_like(x))

  def prune_global(params: PyTree) -> PyTree:
    sel = Selection(params, predicate)
    leaves = [x for _, x in sel.selected]
    if not leaves:
      return params
    flat = jnp.concatenate([jnp.abs(x.ravel().astype(jnp.float32)) for x in leaves])
    keep = _keep_mask(flat, sparsity)
    out, start = [], 0
    for x in leaves:
      k = keep[start : start + x.size].reshape(x.shape)
      out.append(jnp.where(k, x, jnp.zeros_like(x)))
      start += x.size
    return sel.rebuild(out)

  if scope == 'global':
    return prune_global
  return lambda params: map_selected(prune_leaf, params, predicate)


def prune(params: PyTree, sparsity: float, *, scope: str = 'layer', where: Where = kernels_only) -> PyTree:
  """Magnitude-prunes `params`; see `pruner`.

  >>> import jax.numpy as jnp
  >>> p = {'a': {'kernel': jnp.array([1.0, 2.0])}, 'b': {'kernel': jnp.array([10.0, 20.0])}}
  >>> q = prune(p, 0.5, scope='global')
  >>> q['a']['kernel'].tolist(), q['b']['kernel'].tolist()
  ([0.0, 0.0], [10.0, 20.0])
  """
  return pruner(sparsity, scope=scope, where=where)(params)


@functools.partial(jax.jit, static_argnames=('k', 'iterations'))
def _kmeans_1d(x: jax.Array, k: int, iterations: int) -> jax.Array:
  """Lloyd's k-means on the nonzero entries of a flat array; zeros stay zero.

  Linear initialisation between min and max, which Han et al. found best for
  weight sharing since it keeps centroids for the rare large weights. In one
  dimension the nearest centroid is found by binary search between sorted
  centroid midpoints: O(n log k) per iteration instead of an n x k distance
  matrix. An empty cluster keeps its centroid. Jitted at module level so the
  loop compiles once per (shape, k), not on every call.
  """
  nz = x != 0
  any_nz = jnp.any(nz)
  lo = jnp.where(any_nz, jnp.min(jnp.where(nz, x, jnp.inf)), 0.0)
  hi = jnp.where(any_nz, jnp.max(jnp.where(nz, x, -jnp.inf)), 0.0)
  init = lo + (hi - lo) * jnp.arange(k, dtype=x.dtype) / max(k - 1, 1)

  def assign(c):
    return jnp.searchsorted((c[1:] + c[:-1]) / 2, x)

  def step(_, c):
    c = jnp.sort(c)
    idx = assign(c)
    sums = jax.ops.segment_sum(jnp.where(nz, x, 0.0), idx, num_segments=k)
    counts = jax.ops.segment_sum(nz.astype(x.dtype), idx, num_segments=k)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)

  c = jnp.sort(jax.lax.fori_loop(0, iterations, step, init))
  return jnp.where(nz, c[assign(c)], 0.0)


def weight_sharer(bits: int = 5, *, iterations: int = 20, where: Where = kernels_only) -> Transform:
  """Weight sharing: each parameter's nonzero weights take one of 2^bits shared values.

  Stage two of Deep Compression (Han et al., ICLR 2016): per layer, k-means with
  k = 2^bits clusters over the weights, linearly initialised between their
  min and max, then every weight replaced by its centroid. Here a fixed number
  of Lloyd iterations in jnp, and pruned zeros are left out (they stay zero
  and are not a cluster), so ``prune -> share`` keeps the sparsity. The paper
  fine-tunes the centroids afterwards; this is the clustering alone.

  Args:
    bits: index bits per weight, 1 to 16 (the paper: 8 for conv, 5 for dense).
    iterations: number of Lloyd iterations.
    where: which parameters to share (kernels by default).

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> w = {'kernel': jnp.array([0.1, 0.2, 0.0, 1.0, 1.2])}
  >>> [round(v, 2) for v in weight_sharer(bits=1)(w)['kernel'].tolist()]
  [0.15, 0.15, 0.0, 1.1, 1.1]
  """
  bits = numerics.check_bits(bits, minimum=1, maximum=16)
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
    raise ValueError(f'iterations must be a non-negative int, got {iterations!r}.')
  predicate = as_predicate(where)

  def share_leaf(path, x):
    flat = x.ravel().astype(numerics.compute_dtype(x.dtype))
    return _kmeans_1d(flat, 2**bits, iterations).reshape(x.shape).astype(x.dtype)

  return lambda params: map_selected(share_leaf, params, predicate)


def share_weights(params: PyTree, bits: int = 5, *, iterations: int = 20, where: Where = kernels_only) -> PyTree:
  """Shares weights by per-layer k-means; see `weight_sharer`.

  >>> import jax.numpy as jnp
  >>> q = share_weights({'kernel': jnp.linspace(-1.0, 1.0, 100)}, bits=2)
  >>> len(set(q['kernel'].tolist()))
  4
  """
  return weight_sharer(bits, iterations=iterations, where=where)(params)


def _truncated(m: jax.Array, rank: int | None, energy: float | None) -> jax.Array:
  """U_r S_r V_r^T of a matrix, r fixed or the fewest singular values holding `energy`."""
  u, s, vt = jnp.linalg.svd(m, full_matrices=False)
  if rank is not None:
    keep = jnp.arange(s.size) < rank
  else:
    # Smallest r with sum_{i<r} s_i^2 >= energy * sum s_i^2: keep i while the
    # energy before index i is still short of the target.
    sq = s**2
    total = jnp.sum(sq)
    before = (jnp.cumsum(sq) - sq) / jnp.where(total > 0, total, 1.0)
    keep = before < energy
  return (u * jnp.where(keep, s, 0.0)) @ vt


def low_rank_approximator(
    rank: int | None = None, *, energy: float | None = None, where: Where = kernels_only
) -> Transform:
  """Low rank: replaces each kernel by its truncated SVD, in the same shape.

  Denton et al., NeurIPS 2014, "Exploiting Linear Structure Within
  Convolutional Networks for Efficient Evaluation"; by Eckart & Young (1936)
  U_r S_r V_r^T is the best rank-r approximation in the Frobenius and spectral
  norms. The kernel keeps its shape (the product, not the factors), so model
  code is unchanged. A kernel with more than two dims is treated as the matrix
  (prod(shape[:-1]), out), for a conv kernel its im2col form; 1-D and scalar
  parameters are left as they are.

  Args:
    rank: number of singular values kept (>= 1); at or above the true rank the
      kernel is reproduced up to float error.
    energy: instead of `rank`, keep the fewest singular values whose squares
      sum to at least this fraction, in (0, 1], of the total.
    where: which parameters to approximate (kernels by default).

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> w = {'kernel': jnp.array([[3.0, 0.0], [0.0, 0.5]])}
  >>> low_rank_approximator(1)(w)['kernel'].tolist()
  [[3.0, 0.0], [0.0, 0.0]]
  """
  if (rank is None) == (energy is None):
    raise ValueError('give exactly one of `rank` or `energy`.')
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
    raise ValueError(f'rank must be an int >= 1, got {rank!r}.')
  if energy is not None and not 0.0 < energy <= 1.0:
    raise ValueError(f'energy must be in (0, 1], got {energy!r}.')
  predicate = as_predicate(where)

  def approximate(path, x):
    if x.ndim < 2:
      return x
    m = x.reshape(-1, x.shape[-1]).astype(numerics.compute_dtype(x.dtype))
    return _truncated(m, rank, energy).reshape(x.shape).astype(x.dtype)

  return lambda params: map_selected(approximate, params, predicate)


def low_rank(
    params: PyTree, rank: int | None = None, *, energy: float | None = None, where: Where = kernels_only
) -> PyTree:
  """Truncated-SVD low-rank kernels; see `low_rank_approximator`.

  >>> import jax.numpy as jnp
  >>> w = {'kernel': jnp.outer(jnp.arange(3.0), jnp.ones(4))}
  >>> bool(jnp.allclose(low_rank(w, energy=0.99)['kernel'], w['kernel'], atol=1e-5))
  True
  """
  return low_rank_approximator(rank, energy=energy, where=where)(params)
