"""Tracing: a pure JAX function of one input -> a :class:`~qbound.graph.Graph` of known layers.

This is the only module that touches JAX internals (jaxpr equations, primitives, ``bind``). It
walks the jaxpr of ``fn`` with every parameter folded in as a constant, evaluates what does not
depend on the input, inlines nested calls (``jit``, ``custom_jvp_call`` as used by ``nn.relu``,
checkpoints), and turns each equation that does depend on the input into a node:

* linear maps with constant coefficients (``dot_general``, ``conv_general_dilated``, ``mul`` and
  ``div`` by a constant, ``neg``) and data routing (``reshape``, ``transpose``, ``broadcast_in_dim``,
  ``squeeze``, ``expand_dims``, ``reduce_sum``, ``slice``, ``pad``, ``rev``, ``tile``,
  ``concatenate``, ``reduce_window_sum`` i.e. average pooling) become ``affine`` nodes; an added
  constant becomes their bias. Operations on constants only (batch norm's ``rsqrt(var + eps)``)
  are evaluated while tracing;
* ``add``/``sub`` of two inputs-dependent values become ``add`` nodes;
* ``round``/``floor``/``ceil`` become ``round`` nodes, bounded as the staircase they are (never
  as the identity), with halves rounded as the function does (to even for ``jnp.round``, away
  from zero for ``jax.lax.round``'s default);
* ``tanh`` and ``logistic`` (sigmoid) become ``tanh`` and ``sigmoid`` nodes;
* ``max(x, 0)`` becomes a ``relu`` node; ``max``/``min``/``clamp`` against other constants become
  ``clip`` nodes (``jnp.clip``, hard-tanh, the input clipping of .nnet files), and against each other
  are rewritten exactly with ReLUs (``max(a, b) = a + relu(b - a)``); ``reduce_max`` and max
  pooling (``reduce_window_max``) are trees of those over slices (or gathers, where a window meets
  the padding) of the input;
* a comparison with a constant feeding ``select_n`` (``jnp.where``: leaky ReLU, hard tanh) and
  ``abs`` become ReLUs and clips when the result is a continuous piecewise-linear function of the
  compared value (:mod:`qbound.piecewise`); a ``select_n`` with a constant mask is affine.

The piecewise-linear rewrites are exact in real arithmetic: no new constant is computed in float.
Anything else raises :class:`UnsupportedPrimitiveError` naming the primitive and the source line.
The idea of a table of per-primitive rules over a jaxpr comes from jax_verify (Stanislav Fort et
al., DeepMind), whose released package no longer imports with current JAX (see the README).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jcore  # internals live here and nowhere else in qbound
from jax._src import source_info_util

from qbound import graph as G
from qbound import piecewise as PW
from qbound.box import Box


class UnsupportedPrimitiveError(ValueError):
  """The traced function uses an operation qbound cannot bound."""


_CALL_PARAM_NAMES = ("jaxpr", "call_jaxpr", "fun_jaxpr")
_COEFFICIENT_PRIMS = {"dot_general", "conv_general_dilated", "mul", "div"}
_ROUTING_PRIMS = {"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "transpose", "reduce_sum",
                  "slice", "pad", "rev", "concatenate", "dynamic_slice", "gather", "reduce_window_sum", "tile"}
_IDENTITY_PRIMS = {"copy", "copy_p", "optimization_barrier"}
_PRECISE_PRIMS = {"dot_general", "conv_general_dilated"}
SUPPORTED = sorted(_COEFFICIENT_PRIMS | _ROUTING_PRIMS | _IDENTITY_PRIMS |
                   {"add", "add_any", "sub", "neg", "max", "min", "clamp", "convert_element_type",
                    "round", "floor", "ceil", "tanh", "logistic", "abs", "select_n", "ge", "gt", "le", "lt",
                    "reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min",
                    "jit", "pjit", "custom_jvp_call", "custom_vjp_call", "checkpoint", "closed_call"})


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


def _where(eqn, outer: str = "") -> str:
  """The user's source line of an equation; inside JAX's own functions, the line that called them."""
  try:
    here = source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover - a JAX version without source info
    here = ""
  if outer and (not here or here.strip(". ") == "" or "/jax/" in here or "/jax/_src/" in here):
    return outer
  return here or outer or "<unknown source>"


class _Builder:
  """Walks jaxpr equations and emits graph nodes."""

  def __init__(self, input_shape, dtype):
    self.nodes: list[G.Node] = [G.Node(kind=G.INPUT, inputs=(), shape=tuple(input_shape))]
    self.dtype = dtype
    # node index -> (index of x, Piecewise): nodes known as piecewise-linear functions of another
    # node, so that nested jnp.where (hard tanh) can extend them.
    self.piecewise_of: dict[int, tuple[int, PW.Piecewise]] = {}

  # Values are ('node', index) or ('const', array).
  def emit(self, node: G.Node):
    self.nodes.append(node)
    return ("node", len(self.nodes) - 1)

  def shape_of(self, value):
    return self.nodes[value[1]].shape if value[0] == "node" else tuple(np.shape(value[1]))

  def run(self, jaxpr, consts, args, outer_where: str = ""):
    env: dict = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return ("const", v.val)
      return env[v]

    for var, val in zip(jaxpr.constvars, consts):
      env[var] = ("const", val)
    for var, val in zip(jaxpr.invars, args):
      env[var] = val
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self.equation(eqn, ins, outer_where)
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, ins, outer_where: str = ""):
    self.current_where = _where(eqn, outer_where)
    prim = eqn.primitive
    name = prim.name
    sub = next((eqn.params[p] for p in _CALL_PARAM_NAMES if p in eqn.params), None)
    if sub is not None and name not in ("scan", "while", "cond"):
      if isinstance(sub, jcore.ClosedJaxpr):
        return self.run(sub.jaxpr, sub.consts, ins, _where(eqn, outer_where))
      return self.run(sub, (), ins, _where(eqn, outer_where))
    if all(v[0] == "const" for v in ins):
      outs = prim.bind(*[v[1] for v in ins], **eqn.params)
      outs = outs if prim.multiple_results else [outs]
      return [("const", o) for o in outs]
    if prim.multiple_results:
      self.unsupported(eqn, "it has several results")
    if name != "select_n" and any(v[0] == "pred" for v in ins):
      self.unsupported(eqn, "it uses the result of comparing an input-dependent value (a step); only "
                       "jnp.where choosing between continuous pieces can be bounded")
    where = _where(eqn, outer_where)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    rule = _RULES.get(name)
    if rule is None:
      if name in _COEFFICIENT_PRIMS or name in _ROUTING_PRIMS:
        return [self.linear(eqn, ins, where, out_shape)]
      self.unsupported(eqn)
    return [rule(self, eqn, ins, where, out_shape)]

  def unsupported(self, eqn, why: str = "", where: str = ""):
    name = eqn.primitive.name
    extra = f" ({why})" if why else ""
    where = where or getattr(self, "current_where", "") or _where(eqn)
    raise UnsupportedPrimitiveError(
        f"qbound cannot bound the primitive '{name}' used at {where}{extra}. Supported: "
        f"{', '.join(SUPPORTED)}. Rewrite that step with supported operations or open an issue.")

  # --- emitters --------------------------------------------------------------------------------

  def linear(self, eqn, ins, where, out_shape):
    var_positions = [i for i, v in enumerate(ins) if v[0] == "node"]
    name = eqn.primitive.name
    if len(var_positions) > 1:
      if name == "concatenate":
        return self.emit(G.Node(kind=G.CONCAT, inputs=tuple(v[1] for v in ins if v[0] == "node"),
                                shape=out_shape, attrs=(eqn.params["dimension"],), where=where))
      self.unsupported(eqn, "it multiplies two input-dependent values, which is not linear")
    pos = var_positions[0]
    if name == "div" and pos != 0:
      self.unsupported(eqn, "dividing by an input-dependent value is not linear")
    params = dict(eqn.params)
    if name in _PRECISE_PRIMS and "precision" in params:
      params["precision"] = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
    frozen = _freeze(params)
    try:
      hash(frozen)
    except TypeError:
      frozen = tuple((k, _Unhashable(v)) for k, v in frozen)
    coefficients = name in _COEFFICIENT_PRIMS
    in_value = ins[pos]
    consts = [jnp.asarray(v[1]) for i, v in enumerate(ins) if i != pos]
    if name in ("mul", "div"):
      consts = [jnp.broadcast_to(c, out_shape).astype(self.dtype) for c in consts]
    bias = None
    if not coefficients and any(np.any(np.asarray(c) != 0) for c in consts if np.issubdtype(np.asarray(c).dtype, np.floating)):
      # Routing ops with constant data (pad value, concatenated constants) are affine: split them
      # into the same op on zero data plus the op's value at x = 0.
      zero_in = jnp.zeros(self.shape_of(in_value), self.dtype)
      args = list(consts)
      args.insert(pos, zero_in)
      bias = eqn.primitive.bind(*args, **eqn.params)
      consts = [jnp.zeros_like(c) if np.issubdtype(np.asarray(c).dtype, np.floating) else c for c in consts]
    op = LinearOp(name=name, primitive=eqn.primitive, params=frozen, var_pos=pos,
                  in_shape=self.shape_of(in_value), out_shape=out_shape, dtype=np.dtype(self.dtype).name,
                  coefficients=coefficients)
    op = _with_term_counts(op, tuple(consts))
    node = G.Node(kind=G.AFFINE, inputs=(in_value[1],), shape=out_shape, op=op, weights=tuple(consts),
                  bias=bias, where=where)
    return self.emit(node)

  def shift(self, value, const, where, shape):
    """``value + const`` for an input-dependent value."""
    c = jnp.broadcast_to(jnp.asarray(const, self.dtype), shape)
    return self.emit(G.Node(kind=G.AFFINE, inputs=(value[1],), shape=shape, bias=c, where=where))

  def scale(self, value, factor, where, shape):
    """``factor * value`` for a constant scalar factor."""
    const = jnp.full(shape, factor, self.dtype)
    op = _op_of(lambda v, c: v * c, shape, self.dtype, const)
    return self.emit(G.Node(kind=G.AFFINE, inputs=(value[1],), shape=shape, op=op, weights=(const,),
                            where=where))

  def broadcast(self, value, shape, where):
    """``value`` (e.g. a scalar) broadcast to ``shape``, as lax does implicitly for scalars."""
    if self.shape_of(value) == tuple(shape):
      return value
    op = _op_of(lambda v: jnp.broadcast_to(v, shape), self.shape_of(value), self.dtype)
    return self.emit(G.Node(kind=G.AFFINE, inputs=(value[1],), shape=tuple(shape), op=op, where=where))

  def add(self, a, b, signs, where, shape):
    return self.emit(G.Node(kind=G.ADD, inputs=(a[1], b[1]), shape=shape, attrs=signs, where=where))

  def clip(self, value, lo, hi, where, shape):
    return self.emit(G.Node(kind=G.CLIP, inputs=(value[1],), shape=shape, weights=(lo, hi), where=where))

  def relu(self, value, where, shape):
    return self.emit(G.Node(kind=G.RELU, inputs=(value[1],), shape=shape, where=where))

  def multiply(self, value, factors, where):
    """``factors * value`` for a constant array of the value's shape (elementwise)."""
    shape = self.shape_of(value)
    const = jnp.asarray(np.broadcast_to(np.asarray(factors), shape), self.dtype)
    op = _op_of(lambda v, c: v * c, shape, self.dtype, const)
    return self.emit(G.Node(kind=G.AFFINE, inputs=(value[1],), shape=shape, op=op, weights=(const,), where=where))

  def combine(self, a, c, sign: int, where, shape):
    """``a + sign * c`` for values that may be constants."""
    if a[0] == "const" and c[0] == "const":
      return ("const", jnp.asarray(a[1], self.dtype) + sign * jnp.asarray(c[1], self.dtype))
    if c[0] == "const":
      return self.shift(a, sign * jnp.asarray(c[1], self.dtype), where, shape)
    if a[0] == "const":
      term = c if sign > 0 else self.scale(c, -1.0, where, shape)
      return self.shift(term, a[1], where, shape)
    return self.add(a, c, (1, sign), where, shape)

  def piecewise(self, x, pw: PW.Piecewise, where):
    """A node computing ``pw(x)`` exactly from the pieces' own values (see :mod:`qbound.piecewise`)."""
    shape = self.shape_of(x)
    form = PW.clip_form(pw)
    if not pw.breaks:
      out = pw.values[0]
    elif form is not None and self.is_same(pw.values[form[2]], x):
      lo, hi, _ = form
      if np.all(lo == 0) and np.all(np.isposinf(hi)):
        out = self.relu(x, where, shape)
      else:
        out = self.clip(x, jnp.asarray(lo, self.dtype), jnp.asarray(hi, self.dtype), where, shape)
    else:
      out = pw.values[0]
      for k in range(1, len(pw.values)):
        step = self.combine(pw.values[k], pw.values[k - 1], -1, where, shape)  # (s_k - s_{k-1}) (x - c_k)
        kink = self.relu(step, where, shape)
        rising = pw.slopes[k] >= pw.slopes[k - 1]
        if np.all(rising):  # T_k = relu(step)
          out = self.combine(out, kink, 1, where, shape)
        elif not np.any(rising):  # T_k = min(step, 0) = step - relu(step)
          out = self.combine(self.combine(out, step, 1, where, shape), kink, -1, where, shape)
        else:
          falling = (~rising.astype(bool)).astype(np.float32)
          out = self.combine(out, self.multiply(step, falling, where), 1, where, shape)
          out = self.combine(out, self.multiply(kink, 1 - 2 * falling, where), 1, where, shape)
    if out[0] == "node" and not self.is_same(out, x):
      self.piecewise_of[out[1]] = (x[1], pw)
    return out

  def is_same(self, a, c) -> bool:
    return a[0] == "node" and c[0] == "node" and self.same(a[1], c[1])

  def as_piecewise(self, value, x):
    """``value`` as a :class:`~qbound.piecewise.Piecewise` function of node ``x``, or None."""
    shape = self.shape_of(x)
    if value[0] == "const":
      return PW.Piecewise.affine(0, np.asarray(value[1]), shape, value)
    if self.same(value[1], x[1]):
      return PW.Piecewise.affine(1, 0, shape, value)
    idx = value[1]
    if idx in self.piecewise_of and self.same(self.piecewise_of[idx][0], x[1]):
      return dataclasses.replace(self.piecewise_of[idx][1])
    node = self.nodes[idx]
    if node.kind != G.AFFINE or len(node.inputs) != 1 or node.shape != shape:
      return None
    inner = self.as_piecewise(("node", node.inputs[0]), x)
    if inner is None or inner.breaks:
      return None
    one = np.ones(shape)
    if node.op is None:
      scale = one
    elif node.op.in_shape == shape and np.shape(node.weights[0]) == shape and node.op.name in ("mul", "div"):
      w = PW.exact(np.asarray(node.weights[0]), shape)
      if node.op.name == "div":
        if node.op.var_pos != 0 or np.any(w == 0):
          return None
        w = 1 / w
      scale = w
    else:
      return None
    return inner.then_affine(scale, 0 if node.bias is None else np.asarray(node.bias), value)

  def same(self, i: int, j: int) -> bool:
    """Whether nodes ``i`` and ``j`` compute the same value (the same operations on the same
    constants), e.g. ``x @ w`` written twice in ``jnp.where(x @ w > 0, x @ w, 0)``."""
    if i == j:
      return True
    a, c = self.nodes[i], self.nodes[j]
    if (a.kind, a.shape, a.op, a.attrs, len(a.inputs), len(a.weights), a.bias is None) != \
       (c.kind, c.shape, c.op, c.attrs, len(c.inputs), len(c.weights), c.bias is None):
      return False
    if a.kind == G.INPUT:
      return False
    arrays = list(zip(a.weights, c.weights)) + ([] if a.bias is None else [(a.bias, c.bias)])
    if not all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in arrays):
      return False
    return all(self.same(p, q) for p, q in zip(a.inputs, c.inputs))

  def max_of(self, values, where, shape, *, minimum: bool = False):
    """The elementwise maximum (or minimum) of several values, as a balanced tree of pairs."""
    pair = _min_pair if minimum else _max_pair
    while len(values) > 1:
      merged = [pair(self, values[i], values[i + 1], where, shape) for i in range(0, len(values) - 1, 2)]
      values = merged + values[len(merged) * 2:]
    return values[0]

  def route(self, x, fn, where, *consts):
    """``fn(x, *consts)`` for a function made of one routing primitive (slice, gather, reshape)."""
    op = _op_of(fn, self.shape_of(x), self.dtype, *consts)
    return self.emit(G.Node(kind=G.AFFINE, inputs=(x[1],), shape=op.out_shape, op=op, weights=tuple(consts),
                            where=where))


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


def _both_nodes(ins):
  return ins[0][0] == "node" and ins[1][0] == "node"


def _rule_add(b: _Builder, eqn, ins, where, shape):
  if _both_nodes(ins):
    return b.add(b.broadcast(ins[0], shape, where), b.broadcast(ins[1], shape, where), (1, 1), where, shape)
  var, const = (ins[0], ins[1]) if ins[0][0] == "node" else (ins[1], ins[0])
  return b.shift(var, const[1], where, shape)


def _rule_sub(b: _Builder, eqn, ins, where, shape):
  if _both_nodes(ins):
    return b.add(b.broadcast(ins[0], shape, where), b.broadcast(ins[1], shape, where), (1, -1), where, shape)
  if ins[0][0] == "node":
    return b.shift(ins[0], -jnp.asarray(ins[1][1]), where, shape)
  neg = b.scale(ins[1], -1.0, where, shape)
  return b.shift(neg, ins[0][1], where, shape)


def _rule_neg(b: _Builder, eqn, ins, where, shape):
  return b.scale(ins[0], -1.0, where, shape)


def _rule_identity(b: _Builder, eqn, ins, where, shape):
  return ins[0]


def _rule_convert(b: _Builder, eqn, ins, where, shape):
  new = np.dtype(eqn.params["new_dtype"])
  old = np.dtype(eqn.invars[0].aval.dtype)
  if new == old:
    return ins[0]
  b.unsupported(eqn, f"converting {old} to {new} rounds values; quantize activations with "
                "qbound.quantize instead")


def _max_pair(b: _Builder, x, y, where, shape):
  """max(x, y) exactly: relu for max(x, 0), a clip node against other constants, else x + relu(y - x)."""
  if x[0] == "const":
    x, y = y, x
  if y[0] == "const":
    c = jnp.broadcast_to(jnp.asarray(y[1], b.dtype), shape)
    if not np.any(np.asarray(c)):
      out = b.relu(x, where, shape)
    else:
      out = b.clip(x, c, jnp.full(shape, jnp.inf, b.dtype), where, shape)
    if np.all(np.isfinite(np.asarray(c))):
      b.piecewise_of[out[1]] = (x[1], PW.Piecewise.ramp(np.asarray(c), shape, rising=True, x=x, constant=("const", c)))
    return out
  diff = b.add(y, x, (1, -1), where, shape)
  return b.add(x, b.relu(diff, where, shape), (1, 1), where, shape)


def _min_pair(b: _Builder, x, y, where, shape):
  """min(x, y) exactly: a clip node against a constant, else x - relu(x - y)."""
  if x[0] == "const":
    x, y = y, x
  if y[0] == "const":
    c = jnp.broadcast_to(jnp.asarray(y[1], b.dtype), shape)
    out = b.clip(x, jnp.full(shape, -jnp.inf, b.dtype), c, where, shape)
    if np.all(np.isfinite(np.asarray(c))):
      b.piecewise_of[out[1]] = (x[1], PW.Piecewise.ramp(np.asarray(c), shape, rising=False, x=x, constant=("const", c)))
    return out
  diff = b.add(x, y, (1, -1), where, shape)
  return b.add(x, b.relu(diff, where, shape), (1, -1), where, shape)


def _broadcast_value(b: _Builder, v, shape, where):
  if v[0] == "node" and b.shape_of(v) != tuple(shape):
    raise UnsupportedPrimitiveError(f"max/min of shapes {b.shape_of(v)} and {shape} at {where}")
  return v


def _rule_max(b: _Builder, eqn, ins, where, shape):
  return _max_pair(b, _broadcast_value(b, ins[0], shape, where), _broadcast_value(b, ins[1], shape, where),
                   where, shape)


def _rule_min(b: _Builder, eqn, ins, where, shape):
  return _min_pair(b, _broadcast_value(b, ins[0], shape, where), _broadcast_value(b, ins[1], shape, where),
                   where, shape)


def _rule_clamp(b: _Builder, eqn, ins, where, shape):
  lo, x, hi = ins
  return _min_pair(b, _max_pair(b, x, lo, where, shape), hi, where, shape)


def _rule_round(b: _Builder, eqn, ins, where, shape):
  mode = {"round": "nearest", "floor": "floor", "ceil": "ceil"}[eqn.primitive.name]
  if mode == "nearest" and eqn.params.get("rounding_method") != jax.lax.RoundingMethod.TO_NEAREST_EVEN:
    mode = "away"  # jax.lax.round's default: halves away from zero
  return b.emit(G.Node(kind=G.ROUND, inputs=(ins[0][1],), shape=shape, attrs=(mode,), where=where))


def _rule_smooth(b: _Builder, eqn, ins, where, shape):
  kind = {"tanh": G.TANH, "logistic": G.SIGMOID}[eqn.primitive.name]
  return b.emit(G.Node(kind=kind, inputs=(ins[0][1],), shape=shape, where=where))


_FLIPPED = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}


def _rule_compare(b: _Builder, eqn, ins, where, shape):
  """``x >= c`` and friends: a symbolic comparison, usable only by ``select_n`` (``jnp.where``)."""
  (x, c), name = ins, eqn.primitive.name
  if x[0] == "const":
    (c, x), name = (x, c), _FLIPPED[name]
  if c[0] != "const":
    b.unsupported(eqn, "it compares two input-dependent values; use jnp.maximum / jnp.minimum")
  x = b.broadcast(x, shape, where)
  cut = np.broadcast_to(np.asarray(c[1], np.dtype(b.dtype)), shape)
  return ("pred", x, name, cut)


def _rule_select_n(b: _Builder, eqn, ins, where, shape):
  """``jnp.where``: a constant mask selects elementwise; a comparison ``x >= c`` selects between two
  continuous piecewise-linear functions of ``x`` (leaky ReLU, hard tanh), written exactly with ReLUs."""
  pred, *cases = ins
  if pred[0] == "const":
    mask = np.broadcast_to(np.asarray(pred[1]), shape)
    out, bias = None, np.zeros(shape, np.dtype(b.dtype))
    for i, case in enumerate(cases):
      chosen = (mask == i) if mask.dtype != np.bool_ else (mask == bool(i))
      if case[0] == "const":
        bias = bias + np.where(chosen, np.broadcast_to(np.asarray(case[1]), shape), 0)
        continue
      if not chosen.any():
        continue
      term = b.multiply(b.broadcast(case, shape, where), chosen.astype(np.float32), where)
      out = term if out is None else b.add(out, term, (1, 1), where, shape)
    if out is None:
      return ("const", jnp.asarray(bias, b.dtype))
    return b.shift(out, bias, where, shape) if np.any(bias) else out
  if len(cases) != 2:
    b.unsupported(eqn, "it selects among more than two input-dependent cases")
  _, x, name, cut = pred
  false_pw, true_pw = (b.as_piecewise(b.broadcast(v, shape, where) if v[0] == "node" else v, x) for v in cases)
  if false_pw is None or true_pw is None:
    b.unsupported(eqn, "jnp.where chooses between values that are not piecewise-linear functions of the "
                  "compared value")
  below, above = (false_pw, true_pw) if name in ("ge", "gt") else (true_pw, false_pw)
  try:
    pw = PW.join(below, above, cut)
  except PW.NotPiecewiseLinear as err:
    b.unsupported(eqn, f"this jnp.where is not a continuous piecewise-linear function: {err}")
  return b.piecewise(x, pw, where)


def _rule_abs(b: _Builder, eqn, ins, where, shape):
  """``|x| = -x + relu(x - (-x))``."""
  x = ins[0]
  zero, one = PW.exact(0, shape), PW.exact(1, shape)
  pw = PW.Piecewise((np.zeros(shape),), (-one, one), (zero, zero), (b.scale(x, -1.0, where, shape), x))
  return b.piecewise(x, pw, where)


def _rule_reduce_max(b: _Builder, eqn, ins, where, shape):
  """``jnp.max`` over axes: halves compared pairwise along each axis, ``log2 n`` levels."""
  minimum = eqn.primitive.name == "reduce_min"
  x = ins[0]
  for axis in sorted(eqn.params["axes"]):
    n = b.shape_of(x)[axis]
    while n > 1:
      h = n // 2
      def part(start, stop, axis=axis):
        return b.route(x, lambda v: lax.slice_in_dim(v, start, stop, axis=axis), where)
      first, second = part(0, h), part(h, 2 * h)
      m = b.max_of([first, second], where, b.shape_of(first), minimum=minimum)
      if n % 2:
        rest = part(2 * h, n)
        m_shape = list(b.shape_of(m))
        m_shape[axis] += 1
        m = b.emit(G.Node(kind=G.CONCAT, inputs=(m[1], rest[1]), shape=tuple(m_shape), attrs=(axis,), where=where))
      x, n = m, h + n % 2
  return x if b.shape_of(x) == tuple(shape) else b.route(x, lambda v: jnp.reshape(v, shape), where)


def _rule_reduce_window_max(b: _Builder, eqn, ins, where, shape):
  """Max (min) pooling: the maximum of the window's taps, each a strided slice or a gather."""
  p = eqn.params
  if any(d != 1 for d in p["base_dilation"]):
    b.unsupported(eqn, "base dilation is not supported")
  x = ins[0]
  try:
    taps, out_shape = PW.window_taps(b.shape_of(x), p["window_dimensions"], p["window_strides"], p["padding"],
                                     p["window_dilation"])
  except PW.NotPiecewiseLinear as err:
    b.unsupported(eqn, str(err))
  if not taps:  # an empty output
    return ("const", jnp.zeros(out_shape, b.dtype))
  values = []
  for tap in taps:
    if tap[0] == "slice":
      _, start, limit, strides = tap
      values.append(b.route(x, lambda v: lax.slice(v, start, limit, strides), where))
    else:
      values.append(b.route(x, _gather_taps, where, jnp.asarray(tap[1])))
  return b.max_of(values, where, tuple(out_shape), minimum=eqn.primitive.name == "reduce_window_min")


def _gather_taps(v, indices):
  """``v[indices[..., 0], indices[..., 1], ...]`` as one gather primitive."""
  nd = v.ndim
  dnums = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=tuple(range(nd)),
                                     start_index_map=tuple(range(nd)))
  return lax.gather(v, indices, dnums, slice_sizes=(1,) * nd, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


_RULES: dict[str, Callable] = {
    "tanh": _rule_smooth,
    "logistic": _rule_smooth,
    **{name: _rule_compare for name in _FLIPPED},
    "select_n": _rule_select_n,
    "abs": _rule_abs,
    "reduce_max": _rule_reduce_max,
    "reduce_min": _rule_reduce_max,
    "reduce_window_max": _rule_reduce_window_max,
    "reduce_window_min": _rule_reduce_window_max,
    "round": _rule_round,
    "floor": _rule_round,
    "ceil": _rule_round,
    "add": _rule_add,
    "add_any": _rule_add,
    "sub": _rule_sub,
    "neg": _rule_neg,
    "max": _rule_max,
    "min": _rule_min,
    "clamp": _rule_clamp,
    "convert_element_type": _rule_convert,
    **{name: _rule_identity for name in _IDENTITY_PRIMS},
}


def _simplify(nodes: list[G.Node], output: int) -> tuple[list[G.Node], int]:
  """Folds added constants into the affine node before them and drops nodes the output ignores."""
  consumers: list[list[int]] = [[] for _ in nodes]
  for idx, node in enumerate(nodes):
    for i in node.inputs:
      consumers[i].append(idx)
  alias = list(range(len(nodes)))
  new_nodes = list(nodes)
  for idx, node in enumerate(nodes):
    node = dataclasses.replace(node, inputs=tuple(alias[i] for i in node.inputs))
    new_nodes[idx] = node
    if node.kind == G.CLIP:
      src = node.inputs[0]
      prev = new_nodes[src]
      if prev.kind == G.RELU and consumers[src] == [idx] and src != output:
        # relu then clip (jnp.clip(x, 0, hi) traces so) is one clip at max(lo, 0).
        lo = jnp.maximum(node.weights[0], 0)
        if bool(jnp.all(lo <= node.weights[1])):
          new_nodes[src] = dataclasses.replace(node, inputs=prev.inputs, weights=(lo, node.weights[1]))
          alias[idx] = src
      elif prev.kind == G.CLIP and consumers[src] == [idx] and src != output:
        lo = jnp.maximum(prev.weights[0], node.weights[0])
        hi = jnp.minimum(prev.weights[1], node.weights[1])
        if bool(jnp.all(lo <= hi)):  # otherwise clip(clip(x)) is a constant that one clip cannot express
          new_nodes[src] = dataclasses.replace(prev, weights=(lo, hi))
          alias[idx] = src
      continue
    if node.kind != G.AFFINE or node.op is not None:
      continue
    src = node.inputs[0]
    prev = new_nodes[src]
    if node.bias is None:
      alias[idx] = src
      continue
    if prev.kind == G.AFFINE and consumers[src] == [idx] and src != output:
      bias = node.bias if prev.bias is None else prev.bias + node.bias
      new_nodes[src] = dataclasses.replace(prev, bias=bias, shape=node.shape)
      alias[idx] = src
  output = alias[output]
  # Keep what the output needs, in order.
  needed = {0, output}
  for idx in range(len(new_nodes) - 1, -1, -1):
    if idx in needed and alias[idx] == idx:
      needed.update(new_nodes[idx].inputs)
  kept = [i for i in range(len(new_nodes)) if i in needed and alias[i] == i]
  remap = {old: new for new, old in enumerate(kept)}
  result = [dataclasses.replace(new_nodes[i], inputs=tuple(remap[j] for j in new_nodes[i].inputs)) for i in kept]
  return result, remap[output]


def _as_spec(example):
  if isinstance(example, Box):
    example = example.lower
  if isinstance(example, jax.ShapeDtypeStruct):
    return example
  arr = np.asarray(example) if not isinstance(example, jax.Array) else example
  dtype = arr.dtype if jnp.issubdtype(arr.dtype, jnp.floating) else jnp.float32
  # float64 inputs compute in float32 unless jax_enable_x64 is on, as everywhere in JAX.
  return jax.ShapeDtypeStruct(tuple(arr.shape), jax.dtypes.canonicalize_dtype(dtype))


def trace(fn: Callable, example, *, label: str = "fn") -> G.Graph:
  """Traces ``fn`` (a pure function of ONE unbatched input) into a :class:`~qbound.graph.Graph`.

  Args:
    fn: e.g. ``functools.partial(model.apply, params)`` for a Flax linen model, or a function
      that merges an nnx graphdef with its state. Parameters become the graph's constants.
    example: an input (or a ``jax.ShapeDtypeStruct``, or a :class:`~qbound.box.Box`) fixing the
      input shape and dtype.
    label: a name used in error messages (``"f"``, ``"fq"``).

  Returns:
    The layer graph; calling it equals ``fn`` (up to float rounding).

  Raises:
    UnsupportedPrimitiveError: ``fn`` uses an operation qbound has no rule for; the message names
      it and the line it comes from.
    ValueError: ``fn`` fails on an input of that shape, returns several outputs, or its output
      does not depend on the input.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> g = qb.trace(functools.partial(model.apply, params), jnp.zeros(3))
    >>> [n.kind for n in g.nodes]
    ['input', 'affine', 'relu', 'affine']
  """
  if isinstance(fn, G.Graph):
    return fn
  spec = _as_spec(example)
  try:
    closed = jax.make_jaxpr(fn)(jnp.zeros(spec.shape, spec.dtype))
  except Exception as err:  # the user's function rejected the input: say which input it was given
    raise ValueError(f"{label} could not be evaluated on an input of shape {spec.shape} and dtype "
                     f"{spec.dtype} (the box's shape): {type(err).__name__}: {err}") from err
  jaxpr = closed.jaxpr
  if len(jaxpr.outvars) != 1:
    raise ValueError(f"{label} must return a single array; it returns {len(jaxpr.outvars)} outputs.")
  out_aval = jaxpr.outvars[0].aval
  if not jnp.issubdtype(out_aval.dtype, jnp.floating):
    raise ValueError(f"{label} must return a float array, got dtype {out_aval.dtype}.")
  builder = _Builder(spec.shape, spec.dtype)
  (out,) = builder.run(jaxpr, closed.consts, [("node", 0)])
  if out[0] == "const":
    raise ValueError(f"the output of {label} does not depend on its input; there is nothing to bound.")
  nodes, output = _simplify(builder.nodes, out[1])
  return G.Graph(nodes=tuple(nodes), output=output)
