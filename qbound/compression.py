"""Certified compression: the smallest per-layer bit widths whose certificate meets an error budget.

Bit widths are usually chosen by accuracy or by a sensitivity heuristic (HAWQ: Dong et al., ICCV
2019; per-layer MSE) and checked afterwards, if at all. :func:`search` chooses them by what can be
proven: every candidate assignment of bits to layers is certified over a set of boxes (e.g. L-inf
balls around a calibration set, with :func:`qbound.certify_batch`), and only assignments whose
largest certified error is at most ``epsilon`` are kept.

The search starts from the smallest *uniform* width that meets the budget (so its answer is never
larger than the best uniform one), then lowers one layer at a time, greedily: among the layers whose
next lower width still meets the budget, the one that saves the most bytes per unit of certified error
it adds. Every candidate shares the compiled bound steps of the first (the weights are arguments),
so a candidate costs one batched bound pass.

Two per-layer scores help read and order it: :func:`attribution` (the certified error with only one
layer quantized: which layer's quantization the certificate pays for) and :func:`sensitivity` (a
cheap HAWQ-style score, the output MSE of quantizing one layer alone); either ordering can drive the
search instead of the greedy choice (``search(..., order=...)``, one candidate per step). To lower the
certified error of a given format rather than choose a format, retrain it with the bound in the loss:
:func:`certified_retrain` (:mod:`qbound.certified_training`).

Storage is counted as the format stores it: ``bits`` per quantized weight plus one float32 scale per
tensor (or per output channel), every other parameter at 32 bits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from qbound import validate
from qbound.batch import certify_batch
from qbound.box import Box, validate_boxes
from qbound.certified_training import certified_retrain as certified_retrain
from qbound.certified_training import error_bound as error_bound
from qbound.quantize.policy import Selection, Where, by_path, kernels_only, path_str
from qbound.quantize.weights import uniform_quantizer


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One assignment of bit widths and what it costs and proves.

  Attributes:
    bits: ``{parameter path: bit width}``.
    bytes: storage (see the module docstring).
    certified: the largest certified error over the boxes (a proven upper bound).
  """

  bits: dict
  bytes: int
  certified: float


@dataclasses.dataclass(frozen=True)
class Plan:
  """The outcome of :func:`search`.

  Attributes:
    bits: the chosen ``{parameter path: bit width}``.
    params: the parameters quantized accordingly.
    bytes: their storage.
    certified: the largest certified error over the boxes (re-certified from scratch at the end).
    epsilon: the budget.
    uniform: the uniform widths tried first, each a :class:`Candidate`.
    steps: every candidate certified during the greedy search, in order.
    seconds: wall-clock time.
  """

  bits: dict
  params: object
  bytes: int
  certified: float
  epsilon: float
  uniform: tuple
  steps: tuple
  seconds: float


def storage_bytes(params, bits: dict, *, per_channel: bool = False) -> int:
  """Bytes to store ``params`` with the parameters in ``bits`` at those widths (plus one float32
  scale per tensor, or per output channel) and everything else at 32 bits.

  Example:
    >>> import numpy as np
    >>> storage_bytes({"kernel": np.zeros((4, 2)), "bias": np.zeros(2)}, {"kernel": 4})
    16
  """
  total_bits = 0
  for path, leaf in Selection(params, None, check=False).selected:
    name = path_str(path)
    size = int(np.size(leaf))
    if name in bits:
      scales = int(np.shape(leaf)[-1]) if per_channel and np.ndim(leaf) >= 2 else 1
      total_bits += bits[name] * size + 32 * scales
    else:
      total_bits += 32 * size
  return math.ceil(total_bits / 8)


def certified_error(f: Callable, fq: Callable, boxes: Box, *, method: str = "diff", sound: bool = True) -> float:
  """The largest certified error of ``fq`` against ``f`` over a batch of boxes
  (:func:`qbound.certify_batch`): a proven upper bound on ``max_box max_x |f(x) - fq(x)|_inf``."""
  return float(np.max(np.asarray(certify_batch(f, fq, boxes, method=method, sound=sound, progress=False).upper)))


def quantize_layers(params, bits: dict, *, per_channel: bool = False):
  """``params`` with each parameter of ``bits`` (``{path: width}``, paths as
  :func:`qbound.quantize.path_str` writes them) uniformly quantized to its width (symmetric, one scale
  per tensor or per output channel); the rest unchanged.

  Example:
    >>> import numpy as np
    >>> q = quantize_layers({"kernel": np.linspace(-1, 1, 9, dtype=np.float32)}, {"kernel": 2})
    >>> sorted(set(np.asarray(q["kernel"]).tolist()))
    [-1.0, 0.0, 1.0]
  """
  return by_path([(name, uniform_quantizer(b, per_channel=per_channel)) for name, b in bits.items()])(params)


def search(params, apply: Callable, boxes: Box, *, epsilon: float, widths: Sequence[int] = (8, 7, 6, 5, 4, 3, 2),
           where: Where = kernels_only, per_channel: bool = False, method: str = "diff", sound: bool = True,
           progress: Optional[bool] = None, order: Optional[Sequence[str]] = None) -> Plan:
  """The per-layer bit widths with the least storage whose certified error over ``boxes`` is at most
  ``epsilon`` (greedy, starting from the best uniform width; see the module docstring).

  With ``order`` (layer paths, the one to narrow first at the front, e.g. from :func:`sensitivity`
  or :func:`attribution` in ascending order) the descent is the one of sensitivity-based mixed
  precision (HAWQ, Dong et al., ICCV 2019) with the certificate as its stopping rule: each layer in
  turn goes down one width at a time while the certificate still meets ``epsilon``. It certifies
  about one candidate per step instead of one per layer.

  Args:
    params: f's parameters (the pytree ``apply`` takes).
    apply: ``apply(params, x)`` for one unbatched input (e.g. ``model.apply``).
    boxes: boxes along a leading axis (e.g. ``qb.linf_ball(x_calibration, 0.02)``).
    epsilon: the largest certified error allowed, over every box and output.
    widths: the bit widths a layer may get (at least 2 each).
    where: which parameters are quantized (kernels by default); each one is a "layer" here.
    per_channel: one scale per output channel (else per tensor).
    method: the :func:`qbound.certify_batch` method (``"diff"``: differential bounds, needs f and
      f_q of the same layers, which uniform quantization keeps).
    sound: proven floating-point margins.
    progress: a progress bar over the candidates (``None``: only on a terminal).
    order: the layers in the order to narrow them (each at most once, all of them selected by
      ``where``; the ones left out keep the uniform width); None: the greedy search.

  Returns:
    A :class:`Plan`, its certificate recomputed from scratch.

  Raises:
    ValueError: no width in ``widths`` meets the budget even uniformly at the widest (the message
      gives the best certified error reached), an ``order`` naming a layer ``where`` does not select
      or naming one twice, or bad arguments.
    RuntimeError: the answer's certificate, recomputed from scratch, misses the budget (never
      expected: it is the computation that accepted it; raised rather than return an unproven plan).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(2))
    >>> boxes = qb.linf_ball(jax.random.uniform(jax.random.key(1), (4, 2)), 0.05)
    >>> plan = qb.compression.search(params, model.apply, boxes, epsilon=0.05, progress=False)
    >>> plan.certified <= 0.05
    True
  """
  start = time.perf_counter()
  epsilon = validate.non_negative("epsilon", epsilon)
  sound = validate.boolean("sound", sound)
  widths = sorted({validate.integer("widths", w, minimum=2) for w in widths}, reverse=True)
  if not widths:
    raise ValueError("widths must hold at least one bit width.")
  boxes = validate_boxes(boxes)
  layers = [path_str(p) for p, _ in Selection(params, where).selected]
  if not layers:
    raise ValueError("where selects no parameter to quantize.")
  if order is not None:
    order = [order] if isinstance(order, str) else list(order)
    unknown = [name for name in order if name not in layers]
    if unknown:
      raise ValueError(f"order names {unknown}, which `where` does not select; the layers are {layers}.")
    if len(set(order)) != len(order):
      raise ValueError(f"order names a layer more than once: {order}.")
  f = functools.partial(apply, params)
  bar = tqdm(desc="certified compression", unit="candidate", disable=None if progress is None else not progress,
             leave=False)

  def quantized(bits: dict):
    return quantize_layers(params, bits, per_channel=per_channel)

  def certified(bits: dict) -> float:
    bar.update(1)
    return certified_error(f, functools.partial(apply, quantized(bits)), boxes, method=method, sound=sound)

  def candidate(bits: dict) -> Candidate:
    return Candidate(bits=dict(bits), bytes=storage_bytes(params, bits, per_channel=per_channel),
                     certified=certified(bits))

  # The widest uniform assignment first, then narrower ones while they meet the budget.
  uniform = []
  best = None
  for w in widths:
    c = candidate({name: w for name in layers})
    uniform.append(c)
    if c.certified > epsilon:
      break
    best = c
  if best is None:
    bar.close()
    raise ValueError(f"no assignment meets epsilon = {epsilon:g}: even every layer at {widths[0]} bits certifies "
                     f"{uniform[0].certified:.6g} over the boxes; raise epsilon, allow wider bits, or shrink the boxes.")

  steps = []
  current = best
  for name in order or ():
    for w in [w for w in widths if w < current.bits[name]]:
      c = candidate({**current.bits, name: w})
      steps.append(c)
      if c.certified > epsilon:
        break
      current = c
  while order is None:
    options = []
    for name in layers:
      narrower = [w for w in widths if w < current.bits[name]]
      if narrower:
        c = candidate({**current.bits, name: narrower[0]})
        steps.append(c)
        if c.certified <= epsilon:
          options.append(c)
    if not options:
      break
    # Most bytes saved per unit of certified error added (ties: the smaller certificate).
    current = max(options, key=lambda c: ((current.bytes - c.bytes) / max(c.certified - current.certified, 1e-12),
                                          -c.certified))
  bar.close()
  final_params = quantized(current.bits)
  recertified = certified_error(f, functools.partial(apply, final_params), boxes, method=method, sound=sound)
  if not recertified <= epsilon:  # the same computation as the candidate's: never expected, never hidden
    raise RuntimeError(f"the chosen widths re-certify at {recertified:.6g} > epsilon = {epsilon:g} (the search "
                       f"certified {current.certified:.6g}); please report this.")
  return Plan(bits=dict(current.bits), params=final_params, bytes=current.bytes, certified=recertified,
              epsilon=epsilon, uniform=tuple(uniform), steps=tuple(steps), seconds=time.perf_counter() - start)


def _widths_of(params, bits, where: Where) -> dict:
  """``bits`` as ``{path: width}`` over the layers ``where`` selects (an int: that width for each)."""
  layers = [path_str(p) for p, _ in Selection(params, where).selected]
  if not layers:
    raise ValueError("where selects no parameter to quantize.")
  if isinstance(bits, dict):
    unknown = [name for name in bits if name not in layers]
    if unknown or not bits:
      raise ValueError(f"bits must map some of the layers {layers} to widths; got {sorted(bits)}.")
    return {name: validate.integer("bits", w, minimum=2) for name, w in bits.items()}
  width = validate.integer("bits", bits, minimum=2)
  return {name: width for name in layers}


def attribution(params, apply: Callable, boxes: Box, bits, *, where: Where = kernels_only, per_channel: bool = False,
                method: str = "diff", sound: bool = True) -> dict:
  """Each layer's share of the certified error: the certified error over ``boxes`` when only that layer
  is quantized (at its width in ``bits``) and every other parameter stays as in f.

  The certified error of the whole assignment is not the sum of these (the bounds are not additive,
  and errors of different layers can cancel or compound), but the layer with the largest value is
  the one whose quantization the certificate is most sensitive to: the first to widen, the last to
  narrow (pass ``sorted(a, key=a.get)`` to :func:`search` as ``order``).

  Args:
    params: f's parameters.
    apply: ``apply(params, x)`` for one unbatched input.
    boxes: boxes along a leading axis.
    bits: ``{path: width}`` (as :func:`search` returns), or one width for every layer ``where`` selects.
    where: the layers, when ``bits`` is one width.
    per_channel, method, sound: as in :func:`search`.

  Returns:
    ``{path: certified error with only that layer quantized}``, in the order of ``bits``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(2))
    >>> boxes = qb.linf_ball(jax.random.uniform(jax.random.key(1), (4, 2)), 0.05)
    >>> a = qb.compression.attribution(params, model.apply, boxes, {"params/layers_0/kernel": 2,
    ...                                                             "params/layers_2/kernel": 8})
    >>> a["params/layers_0/kernel"] > a["params/layers_2/kernel"]
    True
  """
  boxes = validate_boxes(boxes)
  widths = _widths_of(params, bits, where)
  f = functools.partial(apply, params)
  return {name: certified_error(f, functools.partial(apply, quantize_layers(params, {name: w}, per_channel=per_channel)),
                                boxes, method=method, sound=sound)
          for name, w in widths.items()}


def sensitivity(params, apply: Callable, inputs, bits, *, where: Where = kernels_only,
                per_channel: bool = False) -> dict:
  """A cheap HAWQ-style sensitivity of each layer: the mean squared change of f's outputs on ``inputs``
  when only that layer is quantized (at its width in ``bits``).

  HAWQ (Dong et al., ICCV 2019) orders layers by the Hessian of the loss (its top eigenvalue; HAWQ-v2,
  NeurIPS 2020: its trace) and gives the flattest layers the fewest bits. The output MSE of quantizing
  one layer alone is the second-order term that ordering estimates, measured directly and without
  labels. It is an empirical ordering, not a bound: :func:`search` with ``order`` certifies every step.

  Args:
    params: f's parameters.
    apply: ``apply(params, x)`` for one unbatched input.
    inputs: calibration inputs along a leading axis.
    bits: ``{path: width}``, or one width for every layer ``where`` selects.
    where: the layers, when ``bits`` is one width.
    per_channel: one scale per output channel.

  Returns:
    ``{path: mean over inputs and outputs of (f(x) - f_layer(x))^2}``.

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(2))
    >>> s = qb.compression.sensitivity(params, model.apply, jnp.ones((5, 2)), 4)
    >>> sorted(s) == ["params/layers_0/kernel", "params/layers_2/kernel"], all(v >= 0 for v in s.values())
    (True, True)
  """
  import jax
  import jax.numpy as jnp

  widths = _widths_of(params, bits, where)
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 1 or inputs.shape[0] == 0:
    raise ValueError(f"inputs must hold at least one input along a leading axis; got shape {inputs.shape}.")
  run = jax.jit(jax.vmap(apply, in_axes=(None, 0)))
  reference = run(params, inputs)
  return {name: float(jnp.mean(jnp.square(reference - run(quantize_layers(params, {name: w}, per_channel=per_channel),
                                                             inputs))))
          for name, w in widths.items()}
