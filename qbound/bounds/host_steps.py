"""f_q's own steps in a NumPy chain: static roundings, clips, and quantization with dynamic scales.

Where f has an identity and f_q rounds or clips (a fake quantization of its activations), the chain
(:class:`~qbound.bounds.host_bounds.Chain`) has a layer of f_q alone: ``("round", mode)``,
``("clip", lo, hi)`` or ``("dynamic", spec, shape)`` (scales computed from the input,
:mod:`qbound.dynamic_rounding`). Its value is ``z_q' = z_q + e``; :func:`step_values` evaluates it,
and :func:`step_error` bounds ``e`` (and ``z_q'``) over each piece from the bounds of ``z_q``, with,
for an ``rms,c`` layer, how many of its entries can leave the band every entry keeps at once.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.host_steps import step_error
  >>> e_lo, e_hi, v_lo, v_hi, joint = step_error(("round", "nearest"), np.array([[0.2]]), np.array([[0.4]]))
  >>> e_lo.round(6).tolist(), e_hi.round(6).tolist(), v_lo.tolist(), v_hi.tolist(), joint  # rounds to 0 there
  ([[-0.4]], [[-0.2]], [[0.0]], [[0.0]], ())
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qbound import dynamic_rounding, rms_rounding
from qbound.bounds.host_float import down, up

# Layers of f_q alone (f has an identity there): z_q' = z_q + e with e bounded per piece.
F_Q_STEPS = ("round", "clip", "dynamic")
# Those that round (f_q a staircase there: zero derivative but for the jumps).
ROUNDINGS = ("round", "dynamic")

# A static rounding's error ``round(v) - v``, per mode (graph.ROUNDING's names).
ROUND_ERRORS = {"nearest": (-0.5, 0.5), "away": (-0.5, 0.5), "floor": (-1.0, 0.0), "ceil": (0.0, 1.0)}


def round_values(mode: str, x):
  """``x`` rounded as a ``round`` node of that mode rounds it (monotone: bounds round to bounds)."""
  if mode == "nearest":
    return np.round(x)  # halves to even, as jnp.round
  if mode == "away":
    return np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5))
  return np.floor(x) if mode == "floor" else np.ceil(x)


def step_values(layer, x):
  """f_q's value after a ``round``, ``clip`` or ``dynamic`` layer (f's is unchanged); ``x`` is
  ``(k, neurons)``."""
  if layer[0] == "round":
    return round_values(layer[1], x)
  if layer[0] == "dynamic":
    _, spec, shape = layer
    if spec.axes is None:  # one scale per piece's tensor, not over the batch of pieces
      spec = dataclasses.replace(spec, axes=tuple(range(-len(shape), 0)))
    with np.errstate(divide="ignore", invalid="ignore"):  # the guard's scale of an all-zero group
      return dynamic_rounding.quantize(spec, x.reshape(len(x), *shape)).reshape(x.shape)
  return np.clip(x, layer[1], layer[2])


def chain_values(layers, x):
  """f's and f_q's values ``(z, z_q)`` after ``layers`` (a paired chain's, or its first few) for
  inputs ``x`` (``(k, n_in)``, after the chain's prefix), in float64."""
  z = zq = x
  for layer in layers:
    if layer[0] == "relu":
      z, zq = np.maximum(z, 0.0), np.maximum(zq, 0.0)
    elif layer[0] in F_Q_STEPS:
      zq = step_values(layer, zq)
    else:
      _, w, b, wq, bq = layer
      z, zq = z @ w.T + b, zq @ wq.T + bq
  return z, zq


def step_error(layer, ql, qu, rest=None):
  """Per piece and neuron, an interval holding ``e = s(v) - v`` for the step ``s`` of a ``round`` or
  ``clip`` layer and every ``v`` in ``[ql, qu]``, rounded outward: ``s(v)`` lies in
  ``[s(ql), s(qu)]`` (``s`` is monotone), and a rounding moves ``v`` by at most its mode's error.
  Returns ``(e_lo, e_hi, sl, su, joint)``, ``s(v)`` in ``[sl, su]``, and ``joint`` ``()`` but for an
  ``rms,c`` layer (:func:`_dynamic_error`; ``rest``, an optional :class:`qbound.rms_rounding.Joint` of
  its saturations bounded on the network, ``(k, *shape)`` arrays, is used there)."""
  if layer[0] == "dynamic":
    return _dynamic_error(layer, ql, qu, rest)
  sl, su = step_values(layer, ql), step_values(layer, qu)
  lo, hi = down(sl - qu), up(su - ql)
  if layer[0] == "round":
    e_lo, e_hi = ROUND_ERRORS[layer[1]]
    lo, hi = np.maximum(lo, e_lo), np.minimum(hi, e_hi)
  else:  # clip(v) - v is 0 inside the clip, a - v below it and b - v above it (ends may be infinite)
    lo = np.maximum(lo, down(np.minimum(layer[2] - qu, 0.0)))
    hi = np.minimum(hi, up(np.maximum(layer[1] - ql, 0.0)))
  return lo, hi, sl, su, ()


def _dynamic_error(layer, ql, qu, rest=None):
  """:func:`step_error` of a ``dynamic`` layer: ``|s(v) - v| <= half`` per entry, from each group's
  largest magnitude over the piece (:func:`qbound.dynamic_rounding.bounds`, which also covers the
  library's float32 rounding of its scale and quotient), and ``s(v)`` in ``[v_lo, v_hi]`` where the
  piece keeps an entry's quotient inside one rounding step (``flat``).

  ``joint``: for qwix's ``rms,c`` with one scale for the layer, ``(n_lo, n_hi, count)``: every
  entry's error lies in ``[n_lo, n_hi]``, its interval met with the band every entry keeps, but for
  at most ``count`` entries at once, those past a clip (:func:`qbound.dynamic_rounding.joint_saturation`:
  the squares of the quotients sum to ``Q^2``). An entry whose interval misses the band (pinned past
  a clip) keeps its interval, and the count stays ``count`` for the others: a relaxation of the real
  constraint. Else ``()``."""
  _, spec, shape = layer
  k = len(ql)
  lo, hi = ql.reshape(k, *shape), qu.reshape(k, *shape)
  joint = dynamic_rounding.joint_saturation(spec, shape) if spec.axes is None else None
  with np.errstate(divide="ignore", invalid="ignore"):  # (quotients of all-zero groups, masked out)
    if joint is None:
      half, flat, v_lo, v_hi = dynamic_rounding.bounds(spec, lo, hi, len(shape))
    else:  # (the band and the worst case from the same parts, computed once)
      parts = dynamic_rounding.saturation_parts(spec, lo, hi, len(shape), rest)
      half, flat, v_lo, v_hi = rms_rounding.from_parts(parts)
  half, flat = half.reshape(ql.shape), flat.reshape(ql.shape)
  v_lo, v_hi = v_lo.reshape(ql.shape), v_hi.reshape(ql.shape)
  sl = np.where(flat, np.maximum(v_lo, down(ql - half)), down(ql - half))
  su = np.where(flat, np.minimum(v_hi, up(qu + half)), up(qu + half))
  e_lo, e_hi = np.maximum(down(sl - qu), -half), np.minimum(up(su - ql), half)
  if joint is None:
    return e_lo, e_hi, sl, su, ()
  base = parts.base.reshape(ql.shape)
  n_lo, n_hi = np.maximum(e_lo, -base), np.minimum(e_hi, base)
  missed = n_lo > n_hi
  return e_lo, e_hi, sl, su, (np.where(missed, e_lo, n_lo), np.where(missed, e_hi, n_hi), joint[0])
