"""Certified-error-aware retraining: quantization-aware training that also lowers a bound on |f - f_q|.

Certified training (Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models", 2018: IBP; Zhang et al., "Towards Stable and Efficient Training of
Verifiably Robust Neural Networks", ICLR 2020: CROWN-IBP) adds to the task loss a bound computed by
bound propagation over boxes around the training points, and back-propagates through the bound. Here
the property is the compression error: the loss is the task (or distillation) loss of the quantized
network f_q plus ``weight`` times the mean over L-inf balls around the minibatch of a bound on
``max_x |f(x) - f_q(x)|_inf``, and the quantized weights enter through the straight-through
estimator of :func:`qbound.quantize.straight_through`, as in plain QAT.

The bound is qbound's own (:func:`qbound.bounds.diff.diff_bounds`, differential bounds; or interval
bounds on the merged network): bound propagation takes the layer graph's weights as pytree leaves,
so ``jax.grad`` goes through it once those leaves are the trained parameters. :func:`error_bound`
finds which graph leaf is which parameter by tracing f_q twice, at the quantized parameters and at a
random perturbation of the trained ones, and refuses networks whose trace *computes* a weight from
trained parameters (e.g. a normalisation folded into a kernel), since those leaves would not follow
the training. The training bound is unsound (no floating-point margins) and only steers training:
every number reported afterwards comes from a sound certificate recomputed from scratch
(:func:`qbound.compression.certified_error`).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbound import validate
from qbound.box import Box
from qbound.quantize.policy import Selection, Transform, Where

BOUND_METHODS = ("diff", "diff-interval", "interval")


def _graph_node_of_leaf(graph, index: int) -> str:
  """The node (kind and source line) holding a graph's ``index``-th pytree leaf, for messages."""
  seen = 0
  for i, node in enumerate(graph.nodes):
    count = len(jax.tree_util.tree_leaves(node))
    if index < seen + count:
      return f"node {i} ({node.kind}{', ' + str(node.where) if str(node.where) else ''})"
    seen += count
  return f"leaf {index}"


def error_bound(apply: Callable, params, qparams, example, *, key: jax.Array, where: Where = None,
                method: str = "diff") -> Callable[[object, Box], jax.Array]:
  """A bound on ``max_x |f(x) - f_q(x)|_inf`` over boxes that ``jax.grad`` can differentiate in f_q's weights.

  f is ``apply(params, .)``; f_q is ``apply(q, .)`` for parameters ``q`` with the tree structure of
  ``qparams``, of which the leaves selected by ``where`` may change (they are the ones training
  updates). f and f_q are traced once, at ``params`` and ``qparams``; the returned function puts
  ``q``'s selected leaves into f_q's layer graph and runs bound propagation on it (the certified
  training of Gowal et al. 2018, IBP, and Zhang et al., ICLR 2020, CROWN-IBP, with the bound of the
  merged difference network in place of a robustness margin).

  Args:
    apply: ``apply(params, x)`` for one unbatched input.
    params: f's parameters (fixed).
    qparams: f_q's parameters at the start (their values fix the graph's structure).
    example: an input, or a :class:`~qbound.box.Box`, fixing the input shape.
    key: PRNG key of the random perturbation that identifies the trained leaves in the graph.
    where: which float parameters of ``qparams`` change (all by default).
    method: ``"diff"``: differential bounds with backward symbolic bounds (NeuroDiff-style, the
      tightest and about twice the cost); ``"diff-interval"``: differential intervals (ReluDiff);
      ``"interval"``: interval bounds (IBP) on the merged network (loose: the two networks'
      intervals do not cancel).

  Returns:
    ``bound(q, boxes) -> (n,)``: for each of the ``n`` boxes (stacked along a leading axis) an
    upper bound on ``max |f(x) - f_q(x)|`` over the box and the outputs, *without* floating-point
    margins (for training; certify the result with :func:`qbound.compression.certified_error`).

  Raises:
    ValueError: an unknown method, f and f_q of different layer structures (for ``diff``), or a
      trained parameter that the trace does not keep as it is (the message names the node; leave
      such parameters out of ``where``).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> q = qb.quantize.uniform(params, bits=4)
    >>> bound = qb.compression.error_bound(model.apply, params, q, jnp.zeros(3), key=jax.random.key(1),
    ...                                  method="diff-interval")
    >>> boxes = qb.linf_ball(jnp.zeros((2, 3)), 0.1)
    >>> g = jax.grad(lambda q: bound(q, boxes).mean())(q)
    >>> bool(jnp.any(g["params"]["layers_0"]["kernel"] != 0))
    True
  """
  from qbound.bounds.diff import diff_bounds, require_paired
  from qbound.bounds.interval import interval_bounds
  from qbound.merge import merge, merge_graphs
  from qbound.trace import trace

  if method not in BOUND_METHODS:
    raise ValueError(f"unknown bound method {method!r}; choose one of {BOUND_METHODS}.")
  validate.function("apply", apply)
  if validate.prng_key("key", key) is None:
    raise ValueError("error_bound needs an explicit PRNG key, e.g. key=jax.random.key(0).")
  example = example if isinstance(example, Box) else jnp.asarray(example)
  merged = merge(functools.partial(apply, params), functools.partial(apply, qparams), example)
  if method != "interval":
    require_paired(merged)
  fg, qg = merged.f_graph, merged.fq_graph

  sel = Selection(qparams, where)
  if not sel.indices:
    raise ValueError("where selects no float parameter of qparams; the bound would not depend on training.")
  # Trace again with every trained leaf moved by a different random amount: a graph leaf that equals
  # a moved parameter is that parameter; one that moved but equals none is computed from it.
  keys = jax.random.split(key, len(sel.indices))
  moved = [x + (0.01 + 0.01 * jnp.abs(x)) * jax.random.uniform(k, jnp.shape(x), jnp.result_type(x), 0.5, 1.0)
           for k, (_, x) in zip(keys, sel.selected)]
  qg_moved = trace(functools.partial(apply, sel.rebuild(moved)), example, label="fq")
  leaves, treedef = jax.tree_util.tree_flatten(qg)
  leaves_moved, treedef_moved = jax.tree_util.tree_flatten(qg_moved)
  if treedef != treedef_moved:
    raise ValueError("f_q traces to a different layer graph when its trained parameters change; error_bound "
                     "needs a fixed structure (e.g. no parameter-dependent branches or pruned-away layers).")
  source = {}
  for i, (a, b) in enumerate(zip(leaves, leaves_moved)):
    if np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a), np.asarray(b)):
      continue  # does not depend on the trained parameters
    hits = [j for j, m in enumerate(moved) if np.shape(m) == np.shape(b) and np.array_equal(np.asarray(m), np.asarray(b))]
    if not hits:
      raise ValueError(f"f_q's layer graph computes {_graph_node_of_leaf(qg, i)} from trained parameters instead of "
                       "holding one as it is, so the bound could not follow training; leave the parameters it is "
                       "computed from (e.g. normalisation constants) out of `where`, e.g. where='params/*'.")
    source[i] = hits[0]
  if not source:
    raise ValueError("none of the selected parameters appears in f_q's layer graph; check `where`.")

  def bound(q, boxes: Box) -> jax.Array:
    trained = [leaf for _, leaf in Selection(q, where, check=False).selected]
    if len(trained) != len(moved):
      raise ValueError("the parameters passed to the bound do not have the structure of qparams.")
    graph = treedef.unflatten([trained[source[i]].astype(jnp.result_type(leaf)) if i in source else leaf
                               for i, leaf in enumerate(leaves)])
    if method == "interval":
      net = merge_graphs(fg, graph).graph
      lower, upper = interval_bounds(net, boxes, False, batched=True, check=False)[net.output]
    else:
      _, _, d = diff_bounds(fg, graph, boxes, None, False, method == "diff", batched=True, check=False)
      lower, upper = d[fg.output]
    axes = tuple(range(1, jnp.ndim(upper)))
    return jnp.max(jnp.maximum(-lower, upper), axis=axes)

  return bound


def certified_retrain(apply: Callable, params, quantizer: Transform, data: tuple, *, radius: float,
                      weight: float, optimizer: optax.GradientTransformation, steps: int, key: jax.Array,
                      batch_size: int = 32, loss="mse", where: Where = None, method: str = "diff",
                      clip: Optional[Sequence[float]] = None, reference=None, dampen: float = 0.0):
  """Quantization-aware retraining whose loss also penalises a bound on the error ``|f - f_q|``.

  Each step draws a minibatch of ``data``, evaluates f_q = ``apply(quantizer(shadow), .)`` through
  the straight-through estimator (:func:`qbound.quantize.retrain`) and minimises
  ``task loss + weight * mean_boxes bound(boxes)``, where the boxes are the L-inf balls of ``radius``
  around the minibatch's inputs and ``bound`` is :func:`error_bound` (certified training, Gowal et
  al. 2018 and Zhang et al., ICLR 2020, applied to the merged difference network). f is the network
  at ``reference`` (default ``params``), kept fixed. ``weight=0`` is plain QAT.

  Args:
    apply: ``apply(params, x)`` for one unbatched input.
    params: the starting float parameters (f's, unless ``reference`` is given).
    quantizer: the ``params -> params`` quantizer of f_q, e.g. ``uniform_quantizer(bits=4, where=kernels_only)``.
    data: ``(inputs, targets)``: labels for ``loss="cross_entropy"``, or f's outputs for ``"mse"``
      (distillation, the default: the task is then to stay close to f, which the bound certifies).
    radius: the L-inf radius of the training boxes (the certification radius, typically).
    weight: lambda, the weight of the bound in the loss (>= 0).
    optimizer: an optax optimizer.
    steps: optimizer steps.
    key: PRNG key (minibatches, and the leaf identification of :func:`error_bound`).
    batch_size: examples (and boxes) per step.
    loss: ``"mse"``, ``"cross_entropy"`` or ``(outputs, targets) -> scalar``.
    where: which float parameters are trained (all by default; ``"params/*"`` for .nnet models, whose
      normalisation constants the trace folds into the first layer).
    method: the training bound, see :func:`error_bound`.
    clip: ``(lower, upper)`` the boxes are clipped to (the input domain, e.g. ``(0, 1)`` for pixels).
    reference: f's parameters when they are not ``params`` (e.g. to continue from a QAT run).
    dampen: the oscillation dampening of :func:`qbound.quantize.retrain` (Nagel et al., ICML 2022).
      The bound, like the distillation loss, is smallest with f_q's weights at f's, between grid
      points: its straight-through gradient pushes each shadow weight towards the rounding boundary
      on f's side, across it, and back, so without dampening the weights end rounded either way at
      random and the certified bound ends about as often above the start as below (measured in
      docs/results/compression.md). ``dampen`` = 10 x ``weight`` (at least 10) kept the weights at their grid
      points unless the bound's gradient carried them over, and lowered the bound below dampened
      distillation. With max-abs scales keep the learning rate small (1e-3) or fix the grid with
      ``uniform_quantizer(..., calibrate_on=params)``: the straight-through gradient does not see
      the largest weight moving every other weight's grid point through the scale.

  Returns:
    The retrained float shadow parameters; ``quantizer(result)`` is the network to certify.

  Raises:
    ValueError: a negative ``weight``, ``radius`` or ``dampen``, a bad ``clip`` or ``method``, and everything
      :func:`qbound.quantize.retrain` and :func:`error_bound` reject.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(2)])
    >>> x = jax.random.uniform(jax.random.key(1), (64, 3))
    >>> params = model.init(jax.random.key(0), x[0])
    >>> q3 = qb.quantize.uniform_quantizer(bits=3, where=qb.quantize.kernels_only)
    >>> teacher = jax.vmap(lambda v: model.apply(params, v))(x)
    >>> shadow = qb.compression.certified_retrain(model.apply, params, q3, (x, teacher), radius=0.05,
    ...     weight=1.0, optimizer=optax.adam(1e-3), steps=50, key=jax.random.key(2), method="diff-interval",
    ...     dampen=10.0)
    >>> boxes = qb.linf_ball(x[:8], 0.05)
    >>> f = lambda v: model.apply(params, v)
    >>> before = qb.compression.certified_error(f, lambda v: model.apply(q3(params), v), boxes)
    >>> after = qb.compression.certified_error(f, lambda v: model.apply(q3(shadow), v), boxes)
    >>> after < before
    True
  """
  from qbound.quantize.qat import retrain

  radius = validate.non_negative("radius", radius)
  weight = validate.non_negative("weight", weight)
  dampen = validate.non_negative("dampen", dampen)
  if clip is not None:
    if len(clip) != 2 or not float(clip[0]) < float(clip[1]):
      raise ValueError(f"clip must be a pair (lower, upper) with lower < upper, got {clip!r}.")
    clip = (float(clip[0]), float(clip[1]))
  if validate.prng_key("key", key) is None:
    raise ValueError("certified_retrain needs an explicit PRNG key, e.g. key=jax.random.key(0).")
  if not (isinstance(data, (tuple, list)) and len(data) == 2):
    raise ValueError("data must be a pair (inputs, targets) of arrays with the same leading (example) axis.")
  k_bound, k_train = jax.random.split(key)
  reference = params if reference is None else reference
  x0 = jnp.asarray(data[0])[0]
  penalty = None
  if weight > 0:
    bound = error_bound(apply, reference, quantizer(params), x0, key=k_bound, where=where, method=method)

    def penalty(quantized, xb):
      lower, upper = xb - radius, xb + radius
      if clip is not None:
        lower, upper = jnp.maximum(lower, clip[0]), jnp.minimum(upper, clip[1])
      return weight * jnp.mean(bound(quantized, Box(lower.astype(xb.dtype), upper.astype(xb.dtype))))

  return retrain(apply, params, quantizer, data, optimizer=optimizer, steps=steps, key=k_train,
                 batch_size=batch_size, loss=loss, where=where, penalty=penalty, dampen=dampen)
