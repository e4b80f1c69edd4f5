"""Linear maps with constant coefficients, as the graph's affine nodes carry them.

A :class:`LinearOp` is one JAX primitive (``dot_general``, ``conv_general_dilated``, ``mul``,
``reshape``, ``pad``, ...) with every operand but the input fixed: it applies the map, its absolute
value and their transposes (what backward bound propagation needs), and counts the products summed
per entry, which sizes the rounding margins of sound mode (:mod:`qbound.bounds.fp`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qbound.trace.primitives import _COEFFICIENT_PRIMS


def _freeze(value):
  if isinstance(value, dict):
    return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
  if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuples (ConvDimensionNumbers) keep their type
    return type(value)(*(_freeze(v) for v in value))
  if isinstance(value, (list, tuple)):
    return tuple(_freeze(v) for v in value)
  return value


@dataclasses.dataclass(frozen=True, eq=False)
class LinearOp:
  """A linear map given by one primitive whose other operands are constants.

  ``apply(weights, x)`` evaluates ``primitive(*operands)`` with ``x`` at position ``var_pos`` and
  the constant ``weights`` at the other positions. For coefficient primitives (dot, conv, mul,
  div) ``apply_abs`` uses ``|weights|``; routing primitives (reshape, pad, ...) only move or sum
  entries, so they are their own absolute value. ``terms`` is the largest number of products summed
  into one output and ``terms_transpose`` the same for the transpose: they size rounding margins.
  Matrix products run at ``Precision.HIGHEST`` so that TPUs and GPUs do not drop to bf16/TF32.
  """

  name: str
  primitive: Any
  params: tuple
  var_pos: int
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  dtype: str
  coefficients: bool
  terms: int = 1
  terms_transpose: int = 1

  def _key(self):
    return (self.name, self.primitive, self.params, self.var_pos, self.in_shape, self.dtype)

  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, LinearOp) and self._key() == other._key()

  def with_dtype(self, dtype) -> "LinearOp":
    """The same map computing in ``dtype`` (e.g. float64 for exact checks)."""
    name = np.dtype(dtype).name
    params = tuple((k, np.dtype(dtype) if k == "preferred_element_type" and v is not None else v)
                   for k, v in self.params)
    return dataclasses.replace(self, params=params, dtype=name)

  def apply(self, weights, x):
    args = list(weights)
    args.insert(self.var_pos, x)
    out = self.primitive.bind(*args, **dict(self.params))
    return out[0] if self.primitive.multiple_results else out

  def apply_abs(self, weights, x):
    if self.coefficients:
      weights = tuple(jnp.abs(w) for w in weights)
    return self.apply(weights, x)

  def transpose(self, weights, y):
    spec = jax.ShapeDtypeStruct(self.in_shape, jnp.dtype(self.dtype))
    return jax.linear_transpose(lambda x: self.apply(weights, x), spec)(y)[0]

  def transpose_abs(self, weights, y):
    if self.coefficients:
      weights = tuple(jnp.abs(w) for w in weights)
    return self.transpose(weights, y)



@dataclasses.dataclass(frozen=True, eq=False)
class _Unhashable:
  value: Any


def _with_term_counts(op: LinearOp, consts) -> LinearOp:
  """Counts the products summed per output (and per input, for the transpose) on all-ones data."""
  ones_w = tuple(jnp.ones_like(c) if jnp.issubdtype(c.dtype, jnp.floating) else c for c in consts)
  if not op.coefficients:
    ones_w = consts
  dtype = jnp.dtype(op.dtype)
  with jax.ensure_compile_time_eval():
    fwd = op.apply(ones_w, jnp.ones(op.in_shape, dtype))
    bwd = op.transpose(ones_w, jnp.ones(op.out_shape, dtype))
  terms = int(np.max(np.asarray(fwd), initial=1))
  terms_t = int(np.max(np.asarray(bwd), initial=1))
  return dataclasses.replace(op, terms=max(terms, 1), terms_transpose=max(terms_t, 1))


def _op_of(fn: Callable, in_shape, dtype, *consts) -> LinearOp:
  """The LinearOp of ``fn(x, *consts)``, a function made of exactly one linear primitive."""
  closed = jax.make_jaxpr(fn)(jnp.zeros(in_shape, dtype), *consts)
  (eqn,) = closed.jaxpr.eqns
  op = LinearOp(name=eqn.primitive.name, primitive=eqn.primitive, params=_freeze(dict(eqn.params)), var_pos=0,
                in_shape=tuple(in_shape), out_shape=tuple(eqn.outvars[0].aval.shape), dtype=np.dtype(dtype).name,
                coefficients=eqn.primitive.name in _COEFFICIENT_PRIMS)
  return _with_term_counts(op, tuple(jnp.asarray(c) for c in consts))

