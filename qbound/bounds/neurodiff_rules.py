"""NeuroDiff's ReLU rules for forward symbolic intervals: lines on each bounding function's own range.

A forward symbolic pass (:mod:`qbound.bounds.forward`) encloses a neuron's input ``z`` between two
linear functions of the input, ``L(x) <= z <= U(x)``. The default rules relax ``relu`` once over
the neuron's concrete range ``[lo, hi]`` and apply those lines to ``L`` and ``U``. The rules here
relax each function over *its own* range instead, as Neurify does for one network (Wang, Pei,
Whitehouse, Yang, Jana, "Efficient Formal Safety Analysis of Neural Networks", NeurIPS 2018) and
NeuroDiff for the difference of two (Paulsen, Wang, Wang, Wang, "NeuroDiff: Scalable Differential
Verification of Neural Networks using Fine-Grained Approximation", ASE 2020):

* ``relu(z) <= chord of relu over [min U, max U]`` applied to ``U``, since ``relu(z) <= relu(U(x))``;
* ``relu(z) >= lam * L(x)`` with ``lam = max L / (max L - min L)`` (0 when ``max L <= 0``);
* for ``h = relu(z) - relu(z_q)`` with ``d = z - z_q``, one case per pair of neuron states, each
  side with its own line (NeuroDiff's nine cases, written for ``d = f - f_q``): ``h = 0``, ``-z_q``,
  ``z``, ``d`` where both neurons are stable; ``-relu(z_q)`` and ``relu(z)`` (the one network's
  lines) where one is inactive; ``h = min(d, z) <= d`` and ``h = max(d, -z_q) >= d`` where one is
  active (the other side a constant); and where both change sign, ``min(d, 0) <= h <= max(d, 0)``
  with the chords of :func:`qbound.bounds.relax.delta_lines` over the lower and the upper function
  of ``d`` separately.

Unlike :func:`qbound.bounds.relax.relu_diff`, whose lines are in ``d`` and ``z_q`` only, these may
read ``z``'s own functions (``h = z`` where ``z_q`` is inactive), so the callers pass three symbolic
inputs. Every line holds over the whole box whatever the ranges' float rounding, provided the
ranges given enclose each function's values (the caller rounds them outward); offsets computed
here are rounded outward in sound mode.

Example (``z`` active, ``z_q`` inactive, so ``h = z`` exactly: slope 1 on ``z`` on both sides):
  >>> import jax.numpy as jnp
  >>> from qbound.bounds.neurodiff_rules import EquationRanges, relu_diff_lines
  >>> a = lambda v: jnp.array([v], jnp.float32)
  >>> z, zq, d = (a(1.0), a(2.0)), (a(-1.0), a(-0.5)), (a(1.5), a(3.0))
  >>> ranges = lambda lo, hi: EquationRanges(lo, hi, lo, hi)
  >>> lines = relu_diff_lines(z, zq, d, ranges(*z), ranges(*zq), ranges(*d))
  >>> [float(v[0]) for v in (lines.a_z, lines.b_z, lines.a_d, lines.b_d)]
  [1.0, 1.0, 0.0, 0.0]
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from qbound.bounds import relax
from qbound.bounds.relax import Relaxation


class EquationRanges(NamedTuple):
  """The ranges over the box of a node's lower function ``L`` and upper function ``U``."""

  low: jnp.ndarray  # min L
  lows_up: jnp.ndarray  # max L
  ups_low: jnp.ndarray  # min U
  up: jnp.ndarray  # max U


class DiffLines(NamedTuple):
  """``h`` between ``a_z z + a_q z_q + a_d d + a_0`` and ``b_z z + b_q z_q + b_d d + b_0``, each
  slope applied to the lower or upper function of its variable by its sign."""

  a_z: jnp.ndarray
  a_q: jnp.ndarray
  a_d: jnp.ndarray
  a_0: jnp.ndarray
  b_z: jnp.ndarray
  b_q: jnp.ndarray
  b_d: jnp.ndarray
  b_0: jnp.ndarray


def relu_lines(eq: EquationRanges, lo, hi, *, sound: bool = True) -> Relaxation:
  """Lines for ``relu(z)``: the lower one applied to ``L``, the upper one to ``U`` (Neurify).

  Args:
    eq: the ranges of ``L`` and ``U`` over the box.
    lo, hi: the neuron's concrete range (possibly tighter than ``[eq.low, eq.up]``); they decide
      which neurons are stable.
    sound: outward-rounded offsets.
  """
  dtype = lo.dtype
  active = lo >= 0
  inactive = hi <= 0
  lam = jnp.where(eq.lows_up <= 0, 0.0, jnp.where(eq.low >= 0, 1.0,
                  eq.lows_up / jnp.where(eq.lows_up > eq.low, eq.lows_up - eq.low, 1.0)))
  lam = jnp.clip(lam, 0, 1)  # any slope in [0, 1] gives a valid lower line: rounding cannot break it
  chord = relax.relu(jnp.minimum(eq.ups_low, eq.up), eq.up, jnp.zeros_like(lo), sound=sound)
  one, zero = jnp.ones_like(lo), jnp.zeros_like(lo)
  lower_slope = jnp.where(active, one, jnp.where(inactive, zero, lam)).astype(dtype)
  upper_slope = jnp.where(active, one, jnp.where(inactive, zero, chord.upper_slope)).astype(dtype)
  upper_offset = jnp.where(active | inactive, zero, chord.upper_offset).astype(dtype)
  return Relaxation(lower_slope, zero, upper_slope, upper_offset)


def relu_diff_lines(z, zq, d, eq_z: EquationRanges, eq_q: EquationRanges, eq_d: EquationRanges, *,
                    sound: bool = True) -> DiffLines:
  """Lines for ``h = relu(z) - relu(z_q)`` in ``z``, ``z_q`` and ``d = z - z_q`` (NeuroDiff's cases).

  Args:
    z, zq, d: concrete ``(lower, upper)`` ranges of the two pre-activations and their difference
      (the neuron states come from ``z`` and ``zq``).
    eq_z, eq_q, eq_d: the ranges of each one's lower and upper functions over the box.
    sound: outward-rounded offsets.
  """
  (zl, zu), (ql, qu), (dl, du) = z, zq, d
  zero, one = jnp.zeros_like(zl), jnp.ones_like(zl)
  z_in, z_act = zu <= 0, zl >= 0
  q_in, q_act = qu <= 0, ql >= 0
  z_un, q_un = ~(z_in | z_act), ~(q_in | q_act)
  rz = relu_lines(eq_z, zl, zu, sound=sound)
  rq = relu_lines(eq_q, ql, qu, sound=sound)
  # Both change sign: min(d, 0) <= h <= max(d, 0), each chord over its own function's range.
  _, _, up_s, up_o = relax.delta_lines(jnp.minimum(eq_d.ups_low, eq_d.up), eq_d.up, sound=sound)
  lo_s, lo_o, _, _ = relax.delta_lines(eq_d.low, jnp.maximum(eq_d.lows_up, eq_d.low), sound=sound)
  pick = lambda *cases: _select(cases, zero)
  a_z = pick((z_act & q_in, one))
  b_z = pick((z_act & q_in, one), (z_un & q_in, rz.upper_slope))
  a_q = pick((z_in & q_act, -one), (z_in & q_un, -rq.upper_slope))
  b_q = pick((z_in & q_act, -one))
  a_d = pick((z_act & q_act, one), (z_un & q_act, one), (z_un & q_un, lo_s))
  b_d = pick((z_act & q_act, one), (z_act & q_un, one), (z_un & q_un, up_s))
  a_0 = pick((z_in & q_un, -rq.upper_offset), (z_act & q_un, jnp.minimum(dl, zl)), (z_un & q_un, lo_o))
  b_0 = pick((z_un & q_in, rz.upper_offset), (z_un & q_act, jnp.maximum(du, -ql)), (z_un & q_un, up_o))
  return DiffLines(a_z, a_q, a_d, a_0, b_z, b_q, b_d, b_0)


def _select(cases, default):
  out = default
  for mask, value in cases:
    out = jnp.where(mask, value, out)
  return out.astype(default.dtype)
