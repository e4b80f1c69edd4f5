"""Binary and ternary weights: two or three levels per layer, with learned or derived scales.

* `binary`: BinaryConnect signs (Courbariaux, Bengio & David, NeurIPS 2015) scaled
  by the mean magnitude as in XNOR-Net's binary-weight networks (Rastegari et
  al., ECCV 2016): w' = alpha * sign(w), alpha = mean|w|.
* `ternary`: Ternary Weight Networks (Li & Liu 2016, arXiv:1605.04711):
  w' in {-alpha, 0, +alpha} with threshold 0.7 * mean|w|.
* `trained_ternary`: the forward pass of Trained Ternary Quantization (Zhu, Han,
  Mao & Dally, ICLR 2017): w' in {-w_neg, 0, +w_pos} with two trainable scales
  per layer; differentiable in the scales (training the latent weights needs a
  straight-through estimator, which lives with quantization-aware training).

Like the grid quantizers in `qbound.quantize.weights`, each is a factory
returning a pure transform plus a convenience function; scales are per
parameter tensor. Output keeps each leaf's dtype and structure, and is jit-able.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from qbound.quantize import numerics
from qbound.quantize.policy import (
    PyTree,
    Selection,
    Transform,
    Where,
    as_predicate,
    kernels_only,
    map_selected,
    path_str,
)

TWN_THRESHOLD = 0.7  # Li & Liu's approximation of the optimal threshold: 0.7 * E|w|.


def _masked_mean(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Mean of `values` where `mask`, 0 where nothing is selected."""
  total = jnp.sum(jnp.where(mask, values, 0.0), axis=axis, keepdims=axis is not None)
  count = jnp.sum(mask, axis=axis, keepdims=axis is not None)
  return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(total.dtype), 0.0)


def binary_quantizer(*, per_channel: bool = False, where: Where = None) -> Transform:
  """Binary weights w' = alpha * sign(w) with alpha = mean|w| (sign(0) taken as +1).

  BinaryConnect (Courbariaux et al., NeurIPS 2015) binarizes to the sign;
  XNOR-Net's binary-weight networks (Rastegari et al., ECCV 2016) scale by
  alpha = mean|w|, the L2-optimal scale for fixed signs. With `per_channel`,
  one alpha per output channel (last axis) as in XNOR-Net's per-filter scales.

  Args:
    per_channel: one alpha per output channel of parameters with >= 2 dims.
    where: which parameters to binarize.

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> binary_quantizer()({'w': jnp.array([0.5, -1.5, 0.0, 2.0])})['w'].tolist()
  [1.0, -1.0, 1.0, 1.0]
  """
  predicate = as_predicate(where)

  def quantize_leaf(path, x):
    xf = x.astype(numerics.compute_dtype(x.dtype))
    axes = tuple(range(x.ndim - 1)) if per_channel and x.ndim >= 2 else None
    alpha = jnp.mean(jnp.abs(xf), axis=axes, keepdims=True)
    return jnp.where(xf >= 0, alpha, -alpha).astype(x.dtype)

  return lambda params: map_selected(quantize_leaf, params, predicate)


def binary(params: PyTree, *, per_channel: bool = False, where: Where = None) -> PyTree:
  """Binarizes `params`; see `binary_quantizer`.

  >>> import jax.numpy as jnp
  >>> binary({'w': jnp.array([3.0, -1.0])})['w'].tolist()
  [2.0, -2.0]
  """
  return binary_quantizer(per_channel=per_channel, where=where)(params)


def ternary_quantizer(*, where: Where = None) -> Transform:
  """Ternary Weight Networks: w' = alpha * sign(w) * [|w| > delta] per parameter.

  Li & Liu 2016, "Ternary Weight Networks": delta = 0.7 * mean|w|, and
  alpha = mean of |w| over the weights above delta (the L2-optimal scale for
  that support). A tensor with nothing above delta (all zero) stays zero.

  Args:
    where: which parameters to ternarize.

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> ternary_quantizer()({'w': jnp.array([1.0, -3.0, 0.2, 0.0])})['w'].tolist()
  [2.0, -2.0, 0.0, 0.0]
  """
  predicate = as_predicate(where)

  def quantize_leaf(path, x):
    xf = x.astype(numerics.compute_dtype(x.dtype))
    a = jnp.abs(xf)
    keep = a > TWN_THRESHOLD * jnp.mean(a)
    alpha = _masked_mean(a, keep)
    return jnp.where(keep, jnp.sign(xf) * alpha, 0.0).astype(x.dtype)

  return lambda params: map_selected(quantize_leaf, params, predicate)


def ternary(params: PyTree, *, where: Where = None) -> PyTree:
  """Ternarizes `params` (TWN); see `ternary_quantizer`.

  >>> import jax.numpy as jnp
  >>> ternary({'w': jnp.array([0.1, 0.5, -0.6])})['w'].tolist()
  [0.0, 0.550000011920929, -0.550000011920929]
  """
  return ternary_quantizer(where=where)(params)


def _ttq_delta(xf: jax.Array, threshold: float) -> jax.Array:
  # Zhu et al. threshold each layer at a fraction t of its largest magnitude.
  return threshold * jnp.max(jnp.abs(xf))


def _check_threshold(threshold: float) -> float:
  threshold = float(threshold)
  if not 0.0 <= threshold < 1.0:
    raise ValueError(f'TTQ threshold must be in [0, 1) (a fraction of max|w|), got {threshold}.')
  return threshold


def init_ttq_scales(params: PyTree, threshold: float = 0.05, *, where: Where = kernels_only) -> dict:
  """Initial TTQ scales: ``{path: (w_pos, w_neg)}`` for each selected parameter.

  w_pos is the mean of the weights above delta = threshold * max|w| and w_neg
  the mean magnitude of those below -delta: the L2-optimal scales for the
  ternary assignment, a natural start for training them (Zhu et al. learn them
  by gradient descent from there). The result is a pytree (a dict keyed by
  '/'-joined path of pairs of float32 scalars) to train with optax.

  Args:
    params: the full-precision parameters.
    threshold: t in delta = t * max|w|; the paper uses 0.05.
    where: which parameters get scales; kernels by default, as the paper
      ternarizes weights, not biases.

  Returns:
    A dict from path string to ``(w_pos, w_neg)``.

  >>> import jax.numpy as jnp
  >>> s = init_ttq_scales({'kernel': jnp.array([1.0, 3.0, -2.0, 0.01])})
  >>> [float(v) for v in s['kernel']]
  [2.0, 2.0]
  """
  threshold = _check_threshold(threshold)
  scales = {}
  for path, x in Selection(params, where).selected:
    xf = x.astype(jnp.float32)
    delta = _ttq_delta(xf, threshold)
    scales[path_str(path)] = (_masked_mean(xf, xf > delta), _masked_mean(-xf, xf < -delta))
  return scales


def trained_ternary_quantizer(scales: Mapping[str, tuple], threshold: float = 0.05) -> Transform:
  """Trained Ternary Quantization forward pass with the given scales.

  Zhu, Han, Mao & Dally, ICLR 2017, "Trained Ternary Quantization": with
  delta = t * max|w| per parameter,
  w' = +w_pos if w > delta, -w_neg if w < -delta, 0 otherwise.
  Only parameters with an entry in `scales` are ternarized. The output is
  differentiable with respect to `scales` (not to the latent weights).

  Args:
    scales: ``{path string: (w_pos, w_neg)}``, as made by `init_ttq_scales`.
    threshold: t, the fraction of max|w| below which weights become 0.

  Returns:
    A transform ``params -> params``.

  >>> import jax.numpy as jnp
  >>> ttq = trained_ternary_quantizer({'kernel': (1.5, 0.5)})
  >>> ttq({'kernel': jnp.array([1.0, -2.0, 0.05]), 'bias': jnp.array([0.3])})['kernel'].tolist()
  [1.5, -0.5, 0.0]
  """
  threshold = _check_threshold(threshold)
  if not isinstance(scales, Mapping):
    raise ValueError('TTQ scales must be a dict {path: (w_pos, w_neg)}; build one with init_ttq_scales.')
  for name, pair in scales.items():
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
      raise ValueError(f'TTQ scales for {name!r} must be a pair (w_pos, w_neg), got {pair!r}.')

  def quantize_leaf(path, x):
    w_pos, w_neg = scales[path_str(path)]
    dt = numerics.compute_dtype(x.dtype)
    xf = x.astype(dt)
    delta = _ttq_delta(xf, threshold)
    w_pos, w_neg = jnp.asarray(w_pos, dt), jnp.asarray(w_neg, dt)
    out = jnp.where(xf > delta, w_pos, jnp.where(xf < -delta, -w_neg, jnp.zeros_like(xf)))
    return out.astype(x.dtype)

  def apply(params: PyTree) -> PyTree:
    names = {path_str(p) for p, _ in Selection(params, check=False).selected}
    if scales and names and not names & set(scales):
      raise ValueError(
          f'none of the TTQ scale names {sorted(scales)[:3]} matches a float parameter '
          f'(e.g. {sorted(names)[0]!r}); build the scales from these params with init_ttq_scales.'
      )
    return map_selected(quantize_leaf, params, lambda p: path_str(p) in scales)

  return apply


def trained_ternary(params: PyTree, scales: Mapping[str, tuple], threshold: float = 0.05) -> PyTree:
  """Ternarizes `params` with trained scales; see `trained_ternary_quantizer`.

  >>> import jax.numpy as jnp
  >>> p = {'kernel': jnp.array([1.0, 3.0, -2.0, 0.01])}
  >>> trained_ternary(p, init_ttq_scales(p))['kernel'].tolist()
  [2.0, 2.0, -2.0, 0.0]
  """
  return trained_ternary_quantizer(scales, threshold)(params)
