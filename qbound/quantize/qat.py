"""Quantization-aware retraining: quantized forward pass, float shadow weights, straight-through gradients.

Sung, Shin & Hwang 2016 ("Resiliency of Deep Neural Networks under
Quantization", arXiv:1511.06488) show that retraining a network *with its
quantized weights in the forward pass* recovers most of the accuracy lost to
2- and 3-bit (and ternary) weights. The float weights are kept as "shadow"
weights that receive the gradient; the quantizer is re-applied after every
update. The gradient passes through the rounding as if it were the identity:
the straight-through estimator of BinaryConnect (Courbariaux, Bengio & David,
NeurIPS 2015, "BinaryConnect: Training Deep Neural Networks with binary weights
during propagations").

* `straight_through(quantizer)`: forward value ``quantizer(params)``, gradient
  the identity.
* `retrain(apply_fn, params, quantizer, data, ...)`: optax training of the
  shadow weights through ``straight_through(quantizer)``; any ``params -> params``
  quantizer works (k-bit `uniform_quantizer`, `ternary_quantizer` (TWN),
  `binary_quantizer`, `power_of_two_quantizer`, policies built with `by_path`).
  It returns the float shadow weights: apply the quantizer to get the deployed
  network, ``quantizer(retrain(...))``.
* `retrain_ttq(apply_fn, params, data, ...)`: Trained Ternary Quantization
  (Zhu, Han, Mao & Dally, ICLR 2017), which learns the positive and negative
  scale of every ternarized parameter jointly with the shadow weights.

Everything is pure: randomness (the minibatches) comes from an explicit `key`,
and the whole training loop is one jitted `lax.scan`, compiled once per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbound.quantize.policy import PyTree, Selection, Transform, Where, is_float_array, kernels_only, path_str
from qbound.quantize.ternary import _check_threshold, _ttq_delta, init_ttq_scales, trained_ternary

LOSSES = ('cross_entropy', 'mse')
Loss = Union[str, Callable[[jax.Array, jax.Array], jax.Array]]


def straight_through(quantizer: Transform) -> Transform:
  """Wraps a quantizer so that its value is quantized and its gradient is the identity.

  BinaryConnect's straight-through estimator (Courbariaux et al., NeurIPS 2015;
  used for retraining by Sung, Shin & Hwang 2016): every selected float leaf
  becomes ``q(x) + (x - stop_gradient(x))``, the usual
  ``x + stop_gradient(q(x) - x)`` written so that the forward value is *exactly*
  q(x) in floating point (x - x is exactly 0, whereas x + (q - x) may round).
  The quantizer sees ``stop_gradient(params)``, so no gradient flows through its
  calibration (max|w|, thresholds) either.

  Args:
    quantizer: any transform ``params -> params`` keeping the tree structure.

  Returns:
    A transform with the same values as `quantizer` and the identity Jacobian
    on float leaves.

  >>> import jax, jax.numpy as jnp
  >>> from qbound.quantize.weights import uniform_quantizer
  >>> q = straight_through(uniform_quantizer(bits=2))
  >>> w = {'kernel': jnp.array([0.3, -1.0])}
  >>> q(w)['kernel'].tolist()
  [0.0, -1.0]
  >>> jax.grad(lambda p: jnp.sum(3.0 * q(p)['kernel']))(w)['kernel'].tolist()
  [3.0, 3.0]
  """
  if not callable(quantizer):
    raise ValueError(f'straight_through expects a transform params -> params, got {quantizer!r}.')

  def apply(params: PyTree) -> PyTree:
    quantized = quantizer(jax.lax.stop_gradient(params))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    q_leaves, q_treedef = jax.tree_util.tree_flatten(quantized)
    if q_treedef != treedef:
      raise ValueError('the quantizer changed the tree structure of the parameters; '
                       'straight_through needs a transform that keeps it.')
    out = [
        xq + (x - jax.lax.stop_gradient(x)).astype(xq.dtype) if is_float_array(x) and is_float_array(xq) else xq
        for x, xq in zip(leaves, q_leaves)
    ]
    return treedef.unflatten(out)

  return apply


def _loss_fn(loss: Loss) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if callable(loss):
    return loss
  if loss == 'cross_entropy':
    return lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
  if loss == 'mse':
    # Regression, or distillation towards a teacher's outputs (data = (x, f(x))).
    return lambda out, y: jnp.mean(jnp.square(out - y.astype(out.dtype)))
  raise ValueError(f'unknown loss {loss!r}; choose one of {LOSSES} or pass a function (outputs, targets) -> scalar.')


def _check_data(data, batch_size) -> tuple[jax.Array, jax.Array]:
  if not (isinstance(data, (tuple, list)) and len(data) == 2):
    raise ValueError('data must be a pair (inputs, targets) of arrays with the same leading (example) axis.')
  x, y = jnp.asarray(data[0]), jnp.asarray(data[1])
  if x.ndim < 1 or y.ndim < 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
    raise ValueError(f'inputs and targets need the same nonzero number of examples, got shapes {x.shape} and {y.shape}.')
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= x.shape[0]:
    raise ValueError(f'batch_size must be an int between 1 and the number of examples ({x.shape[0]}), got {batch_size!r}.')
  return x, y


def _check_objective(objective, trainable, xb, yb, loss):
  """The loss on one batch, shapes only: a clear error before the training loop compiles, where a
  loss that does not fit the targets fails deep inside optax."""
  if loss == 'cross_entropy' and not jnp.issubdtype(yb.dtype, jnp.integer):
    raise ValueError(f"loss='cross_entropy' takes integer class labels, got targets of dtype {yb.dtype}: for float "
                     "targets, e.g. distillation towards f's outputs (x, f(x)), pass loss='mse'.")
  try:
    jax.eval_shape(objective, trainable, xb, yb)
  except Exception as err:  # noqa: BLE001 (any failure here is the user's data not fitting the loss)
    raise ValueError(f'the loss cannot be computed on a minibatch of inputs of shape {tuple(xb.shape)} and targets '
                     f'of shape {tuple(yb.shape)} ({type(err).__name__}: {err}). cross_entropy takes one integer '
                     "label per example (shape (n,) for outputs (n, classes)); mse takes targets shaped like "
                     'the outputs.') from None


def _check_steps(steps) -> int:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f'steps must be a positive int, got {steps!r}.')
  return int(steps)


def _fit(objective, trainable, data, *, optimizer, steps, key, batch_size, project=None, loss=None):
  """Minimizes ``objective(trainable, xb, yb)`` with optax over random minibatches, in one jitted scan."""
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(f'optimizer must be an optax GradientTransformation (e.g. optax.adam(1e-3)), got {optimizer!r}.')
  if key is None:
    raise ValueError('retraining needs an explicit PRNG key for its minibatches, e.g. key=jax.random.key(0).')
  steps = _check_steps(steps)
  x, y = _check_data(data, batch_size)
  n = x.shape[0]
  _check_objective(objective, trainable, x[:batch_size], y[:batch_size], loss)

  def step(carry, k):
    tr, opt_state, x, y = carry
    idx = jax.random.choice(k, n, (batch_size,), replace=False)
    value, grads = jax.value_and_grad(objective)(tr, x[idx], y[idx])
    # optax mixes its int32 step count with Python floats (Adam's bias correction), which strict
    # dtype promotion rejects; the optimizer is optax's business, our own code keeps the caller's mode.
    with jax.numpy_dtype_promotion('standard'):
      updates, opt_state = optimizer.update(grads, opt_state, tr)
    tr = optax.apply_updates(tr, updates)
    if project is not None:
      tr = project(tr)
    return (tr, opt_state, x, y), value

  @jax.jit
  def run(tr, keys, x, y):
    with jax.numpy_dtype_promotion('standard'):
      opt_state = optimizer.init(tr)
    (tr, _, _, _), losses = jax.lax.scan(step, (tr, opt_state, x, y), keys)
    return tr, losses

  return run(trainable, jax.random.split(key, steps), x, y)


def retrain(
    apply_fn: Callable,
    params: PyTree,
    quantizer: Transform,
    data: tuple,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    key: jax.Array,
    batch_size: int = 32,
    loss: Loss = 'cross_entropy',
    where: Where = None,
    penalty: Callable | None = None,
    dampen: float = 0.0,
) -> PyTree:
  """Retrains float shadow weights through a quantized forward pass; returns the shadow weights.

  Sung, Shin & Hwang 2016, "Resiliency of Deep Neural Networks under
  Quantization": every step evaluates the network with
  ``straight_through(quantizer)(params)``, so the loss is that of the quantized
  network, and updates the float weights with the straight-through gradient
  (Courbariaux et al., NeurIPS 2015). Minibatches are drawn without replacement
  from `data` with keys split from `key`.

  Args:
    apply_fn: ``apply_fn(params, x)`` for ONE unbatched input (batched here with
      `jax.vmap`), e.g. a linen ``model.apply``.
    params: the starting (float) parameters.
    quantizer: a transform ``params -> params``, e.g. ``uniform_quantizer(bits=3,
      where=kernels_only)`` or ``ternary_quantizer(where=kernels_only)`` (TWN).
    data: ``(inputs, targets)`` with a leading example axis.
    optimizer: an optax optimizer, e.g. ``optax.adam(1e-3)``.
    steps: number of optimizer steps.
    key: PRNG key for the minibatches.
    batch_size: examples per step.
    loss: 'cross_entropy' (integer class targets), 'mse' (targets of the
      outputs' shape; with targets ``f(x)`` of the float network this distils
      f into its quantized copy) or a function ``(outputs, targets) -> scalar``
      on a batch.
    where: which float parameters are trained (all by default); the others are
      kept fixed, e.g. ``where='params/*'`` for .nnet parameters with
      normalisation constants.
    penalty: optional ``penalty(quantized_params, inputs) -> scalar`` added to the loss of every
      minibatch (``quantized_params`` carry the straight-through gradient), e.g. a differentiable
      bound on the error of the quantized network over boxes around the inputs
      (:func:`qbound.compression.certified_retrain`).
    dampen: lambda of the oscillation dampening of Nagel et al. (ICML 2022, "Overcoming
      Oscillations in Quantization-Aware Training"): adds ``dampen * sum((w - stop_gradient(q(w)))**2)``
      over the trained leaves, which pulls each shadow weight towards its grid point. Without it, a
      loss whose optimum lies between grid points (distillation towards f, a bound on |f - f_q|)
      drives the shadow weights to the rounding boundaries, where they flip back and forth and end
      on either side (see :func:`qbound.compression.certified_retrain`). 0 (the default) is plain QAT.

  Returns:
    The retrained float shadow parameters, with the structure of `params`;
    ``quantizer(result)`` is the quantized network that was trained.

  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
  >>> from qbound.quantize.weights import uniform_quantizer
  >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
  >>> x = jax.random.normal(jax.random.key(1), (64, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
  >>> params = model.init(jax.random.key(0), x[0])
  >>> q2 = uniform_quantizer(bits=2)
  >>> shadow = retrain(model.apply, params, q2, (x, y), optimizer=optax.adam(1e-2), steps=100,
  ...                  key=jax.random.key(2), batch_size=32)
  >>> acc = lambda p: float(jnp.mean(jnp.argmax(jax.vmap(model.apply, (None, 0))(p, x), -1) == y))
  >>> acc(q2(shadow)) > acc(q2(params))
  True
  """
  if not callable(apply_fn):
    raise ValueError(f'apply_fn must be a function (params, x) -> outputs, got {apply_fn!r}.')
  sel = Selection(params, where)
  if not sel.indices:
    raise ValueError('no float parameter is selected for training; check `where`.')
  if penalty is not None and not callable(penalty):
    raise ValueError(f'penalty must be a function (quantized_params, inputs) -> scalar, got {penalty!r}.')
  if (isinstance(dampen, bool) or not isinstance(dampen, (int, float, np.floating, np.integer))
      or not 0 <= dampen < np.inf):
    raise ValueError(f'dampen must be a finite number >= 0 (the weight of the oscillation dampening), got {dampen!r}.')
  quantize = straight_through(quantizer)
  loss_fn = _loss_fn(loss)

  def objective(trainable, xb, yb):
    full = quantize(sel.rebuild(trainable))
    value = loss_fn(jax.vmap(apply_fn, in_axes=(None, 0))(full, xb), yb)
    if penalty is not None:
      value = value + penalty(full, xb)
    if dampen > 0:
      # Nagel et al. 2022, eq. 5: the distance of each shadow weight to its (fixed) grid point.
      grid = jax.tree_util.tree_leaves(jax.lax.stop_gradient(quantizer(sel.rebuild(trainable))))
      value = value + dampen * sum(jnp.sum(jnp.square(w - grid[i].astype(w.dtype)))
                                   for w, i in zip(trainable, sel.indices))
    return value

  trained, _ = _fit(objective, [x for _, x in sel.selected], data, optimizer=optimizer, steps=steps, key=key,
                    batch_size=batch_size, loss=loss)
  return sel.rebuild(trained)


def _ttq_straight_through(params: PyTree, scales: Mapping[str, tuple], threshold: float, scaled: bool) -> PyTree:
  """TTQ forward values; gradients to the scales as in `trained_ternary`, to the weights straight through."""
  ternary = trained_ternary(jax.lax.stop_gradient(params), scales, threshold)
  sel = Selection(params, lambda p: path_str(p) in scales, check=False)
  q_sel = Selection(ternary, lambda p: path_str(p) in scales, check=False)
  out = []
  for (path, x), (_, xq) in zip(sel.selected, q_sel.selected):
    xs = jax.lax.stop_gradient(x)
    factor = jnp.ones_like(xs)
    if scaled:
      # Zhu et al. eq. 8: the latent gradient is scaled by w_p above delta, w_n below -delta, 1 between.
      w_pos, w_neg = (jax.lax.stop_gradient(jnp.asarray(s, xs.dtype)) for s in scales[path_str(path)])
      delta = _ttq_delta(xs, threshold)
      factor = jnp.where(xs > delta, w_pos, jnp.where(xs < -delta, w_neg, factor))
    out.append(xq + (x - xs) * factor)
  return sel.rebuild(out)


def retrain_ttq(
    apply_fn: Callable,
    params: PyTree,
    data: tuple,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    key: jax.Array,
    batch_size: int = 32,
    loss: Loss = 'cross_entropy',
    threshold: float = 0.05,
    scales: Mapping[str, tuple] | None = None,
    where: Where = kernels_only,
    scaled_gradients: bool = True,
    min_scale: float = 1e-6,
) -> tuple[PyTree, dict]:
  """Trained Ternary Quantization: learns the ternary scales jointly with the shadow weights.

  Zhu, Han, Mao & Dally, ICLR 2017, "Trained Ternary Quantization". Each
  selected parameter is ternarized in the forward pass to
  {-w_n, 0, +w_p} with delta = t * max|w| (`trained_ternary`). The scales get
  the gradient of that forward pass (the sum of the output gradients over the
  weights assigned to them, eq. 7); the latent weights get the straight-through
  gradient scaled by w_p, 1 or w_n in the three regions (eq. 8), or the plain
  identity with ``scaled_gradients=False``. Weights and scales share one optax
  optimizer; after each update the scales are clipped to at least `min_scale`
  so they stay positive. Unselected float parameters (biases by default) are
  trained in full precision.

  Args:
    apply_fn: ``apply_fn(params, x)`` for one unbatched input.
    params: the starting float parameters.
    data: ``(inputs, targets)`` with a leading example axis.
    optimizer: an optax optimizer.
    steps: number of optimizer steps.
    key: PRNG key for the minibatches.
    batch_size: examples per step.
    loss: 'cross_entropy', 'mse' or a function ``(outputs, targets) -> scalar``.
    threshold: t, the fraction of max|w| below which weights become 0 (0.05 in the paper).
    scales: starting scales ``{path: (w_p, w_n)}``; `init_ttq_scales` by default.
    where: which parameters are ternarized when `scales` is not given.
    scaled_gradients: scale the latent weights' gradients as in the paper.
    min_scale: the smallest value a scale may take.

  Returns:
    ``(params, scales)``: the float shadow weights and the learned scales
    (``{path: (w_p, w_n)}`` of float32 scalars); the deployed network uses
    ``trained_ternary(params, scales, threshold)``.

  >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
  >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
  >>> x = jax.random.normal(jax.random.key(1), (64, 3)); y = (x[:, 0] > 0).astype(jnp.int32)
  >>> params = model.init(jax.random.key(0), x[0])
  >>> shadow, scales = retrain_ttq(model.apply, params, (x, y), optimizer=optax.adam(1e-2), steps=50,
  ...                              key=jax.random.key(2))
  >>> sorted(scales), all(float(s) > 0 for pair in scales.values() for s in pair)
  (['params/layers_0/kernel', 'params/layers_2/kernel'], True)
  """
  if not callable(apply_fn):
    raise ValueError(f'apply_fn must be a function (params, x) -> outputs, got {apply_fn!r}.')
  threshold = _check_threshold(threshold)
  if scales is None:
    scales = init_ttq_scales(params, threshold, where=where)
  if not isinstance(scales, Mapping) or not scales:
    raise ValueError('no parameter to ternarize: `where` selected nothing, or `scales` is empty.')
  scales = {name: (jnp.asarray(pair[0], jnp.float32), jnp.asarray(pair[1], jnp.float32))
            for name, pair in scales.items()}
  if not float(min_scale) > 0:
    raise ValueError(f'min_scale must be positive, got {min_scale!r}.')
  sel = Selection(params)
  unknown = set(scales) - {path_str(p) for p, _ in sel.selected}
  if unknown:
    raise ValueError(f'TTQ scales for {sorted(unknown)} match no float parameter; build them with init_ttq_scales.')
  loss_fn = _loss_fn(loss)

  def objective(trainable, xb, yb):
    full = _ttq_straight_through(sel.rebuild(trainable['params']), trainable['scales'], threshold, scaled_gradients)
    return loss_fn(jax.vmap(apply_fn, in_axes=(None, 0))(full, xb), yb)

  def project(trainable):
    positive = jax.tree_util.tree_map(lambda s: jnp.maximum(s, jnp.asarray(min_scale, s.dtype)), trainable['scales'])
    return {'params': trainable['params'], 'scales': positive}

  start = {'params': [x for _, x in sel.selected], 'scales': scales}
  trained, _ = _fit(objective, start, data, optimizer=optimizer, steps=steps, key=key, batch_size=batch_size,
                    project=project, loss=loss)
  return sel.rebuild(trained['params']), {name: tuple(pair) for name, pair in trained['scales'].items()}
