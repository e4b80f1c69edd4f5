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


def host_array(value, dtype, shape=None):
  """``value`` (broadcast to ``shape``) as a JAX array of ``dtype``, computed by NumPy.

  The tracer builds many small constants; made by ``jnp`` ops eagerly, each op compiles on its own
  on a first call (about 10 ms each), where NumPy and one transfer compile nothing.
  """
  array = np.asarray(value, dtype)
  return jnp.asarray(array if shape is None else np.broadcast_to(array, tuple(shape)))


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


# Primitives that send every input entry to at most one output entry and read one input per output.
_ONE_TO_ONE = frozenset({"reshape", "transpose", "squeeze", "expand_dims", "rev", "copy", "copy_p",
                         "convert_element_type", "slice", "neg"})


def _counted(op: LinearOp, consts):
  """``(terms, terms_transpose)`` read off the shapes for the common primitives, else ``None``.

  Counting on all-ones data (below) runs each primitive and its transpose once, eagerly: every one
  compiles on its own, a tenth of a second or more per layer on a first call. For these primitives
  the counts follow from the shapes alone, and tests/test_trace_linear.py checks them against the
  counts on all-ones data.
  """
  name = op.name
  if name in _ONE_TO_ONE and not consts:
    return 1, 1
  if name == "broadcast_in_dim" and not consts:
    return 1, max(int(np.prod(op.out_shape, dtype=np.int64) // max(np.prod(op.in_shape, dtype=np.int64), 1)), 1)
  if not all(jnp.issubdtype(jnp.result_type(c), jnp.floating) for c in consts):
    return None
  elementwise = name == "mul" or (name == "div" and op.var_pos == 0)
  if elementwise and tuple(op.in_shape) == tuple(op.out_shape):
    return 1, 1
  if name == "dot_general" and len(consts) == 1:
    (contract_l, contract_r), (batch_l, batch_r) = dict(op.params)["dimension_numbers"]
    x_contract, w_contract, w_batch = ((contract_l, contract_r, batch_r) if op.var_pos == 0
                                       else (contract_r, contract_l, batch_l))
    w_shape = np.shape(consts[0])
    terms = int(np.prod([op.in_shape[d] for d in x_contract], dtype=np.int64))
    free = [w_shape[d] for d in range(len(w_shape)) if d not in w_contract and d not in w_batch]
    return max(terms, 1), max(int(np.prod(free, dtype=np.int64)), 1)
  if name == "conv_general_dilated" and len(consts) == 1 and op.var_pos == 0:
    return _conv_counts(dict(op.params), np.shape(consts[0]), op.in_shape, op.out_shape)
  return None


def _conv_counts(params: dict, kernel_shape, in_shape, out_shape) -> tuple[int, int] | None:
  """A convolution's counts from its shapes (dilated inputs and batch groups: ``None``).

  The taps an output meets factor into one count per spatial axis, and so do the outputs an
  input meets, so the largest counts are products of the largest per axis: along an axis, output
  ``o`` reads input ``o * stride + j * dilation - pad_low`` at tap ``j`` when that lies inside it.
  """
  if params.get("batch_group_count", 1) != 1 or any(d != 1 for d in (params.get("lhs_dilation") or ())):
    return None
  numbers = params["dimension_numbers"]
  spatial = len(numbers.rhs_spec) - 2
  dilation = params.get("rhs_dilation") or (1,) * spatial
  reads, read_by = 1, 1
  for axis in range(spatial):
    k = kernel_shape[numbers.rhs_spec[2 + axis]]
    n, m = in_shape[numbers.lhs_spec[2 + axis]], out_shape[numbers.out_spec[2 + axis]]
    position = (np.arange(m)[:, None] * params["window_strides"][axis] + np.arange(k)[None, :] * dilation[axis]
                - params["padding"][axis][0])
    inside = (position >= 0) & (position < n)
    reads *= int(inside.sum(axis=1).max(initial=0))
    read_by *= int(np.bincount(position[inside], minlength=1).max(initial=0))
  groups = params.get("feature_group_count", 1)
  terms = reads * kernel_shape[numbers.rhs_spec[1]]
  terms_transpose = read_by * (kernel_shape[numbers.rhs_spec[0]] // groups)
  return max(terms, 1), max(terms_transpose, 1)


def _with_term_counts(op: LinearOp, consts) -> LinearOp:
  """Counts the products summed per output (and per input, for the transpose) on all-ones data."""
  counted = _counted(op, consts) if op.coefficients or not consts else None
  if counted is not None:
    return dataclasses.replace(op, terms=counted[0], terms_transpose=counted[1])
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

