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
           progress: Optional[bool] = None) -> Plan:
  """The per-layer bit widths with the least storage whose certified error over ``boxes`` is at most
  ``epsilon`` (greedy, starting from the best uniform width; see the module docstring).

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

  Returns:
    A :class:`Plan`, its certificate recomputed from scratch.

  Raises:
    ValueError: no width in ``widths`` meets the budget even uniformly at the widest (the message
      gives the best certified error reached), or bad arguments.

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
  while True:
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
  return Plan(bits=dict(current.bits), params=final_params, bytes=current.bytes, certified=recertified,
              epsilon=epsilon, uniform=tuple(uniform), steps=tuple(steps), seconds=time.perf_counter() - start)
