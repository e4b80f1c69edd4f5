"""The jaxpr walker: evaluates what is constant, inlines nested calls, and emits graph nodes.

:class:`_Builder` reads a jaxpr's equations in order; each value is ``('node', index)`` (depends on
the input), ``('const', array)`` (evaluated while tracing) or ``('pred', ...)`` (a comparison with a
constant, usable only by ``jnp.where``). Equations on constants only are evaluated; calls (``jit``,
``custom_jvp_call``, checkpoints) are walked inline; the rest go to the per-primitive rules of
:mod:`qbound.trace.rules`, or, for linear primitives, to :meth:`_Builder.linear`. The emitters
(``shift``, ``scale``, ``relu``, ``clip``, ``piecewise``, ``max_of``, ``route``, ...) are the
building blocks the rules write their nodes with. Unknown primitives end in
:meth:`_Builder.unsupported`, which raises :class:`~qbound.trace.UnsupportedPrimitiveError`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as jcore  # internals live here and nowhere else in qbound
from jax._src import source_info_util

from qbound import graph as G
from qbound import piecewise as PW
from qbound.trace.linear import LinearOp, _freeze, _op_of, _Unhashable, _with_term_counts, host_array
from qbound.trace.primitives import (SUPPORTED, UnsupportedPrimitiveError, _CALL_PARAM_NAMES,
                                     _COEFFICIENT_PRIMS, _PRECISE_PRIMS, _ROUTING_PRIMS)
from qbound.trace import dynamic, dynamic_forms
from qbound.trace.fold import fold_constants
from qbound.trace.rules import _RULES, _max_pair, _min_pair
from qbound.trace.unsupported import message as unsupported_message, user_operation


# Primitives that become products and smooth curves (messages name the user's line for them).
_CURVE_PRIMS = {"integer_pow", "square", "exp", "rsqrt", "sqrt", "erf", "erfc"}


def _makes_nonlinear(name: str, ins) -> bool:
  if name in _CURVE_PRIMS:
    return True
  if name in ("mul", "dot_general"):
    return all(v[0] == "node" for v in ins)
  return name == "div" and ins[1][0] == "node"


def _where(eqn, outer: str = "") -> str:
  """The user's source line of an equation; inside JAX's own functions, the line that called them."""
  try:
    here = source_info_util.summarize(eqn.source_info)
  except Exception:  # pragma: no cover - a JAX version without source info
    here = ""
  if outer and (not here or here.strip(". ") == "" or "/jax/" in here or "/jax/_src/" in here):
    return outer
  return here or outer or "<unknown source>"


# jax.nn.gelu(x) (approximate=True): x * (0.5 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))).
_GELU_CUBE, _GELU_SCALE = 0.044715, float(np.sqrt(2 / np.pi))


def _gelu_input(eqn, producers, read):
  """The variable ``x`` when ``eqn`` ends jax.nn.gelu's tanh form of ``x`` (matched equation by
  equation from the last product back to ``x ** 3``, constants within float32 rounding), else None."""
  def const(v, value):
    if isinstance(v, jcore.Literal):
      val = v.val
    else:
      got = read(v)  # every operand of the matched equations was read before the last one
      if got[0] != "const":
        return False
      val = got[1]
    val = np.asarray(val, np.float64)
    # Within float32's rounding of the constant (2 ulps): the curve's bounds are for these values,
    # so a function with other constants keeps its own equations.
    return val.size > 0 and bool(np.all(np.abs(val - value) <= 2.4e-7 * abs(value)))

  def op(v, name):
    e = None if isinstance(v, jcore.Literal) else producers.get(v)
    return e if e is not None and e.primitive.name == name else None

  def split(e, value):
    """The non-constant operand of a binary ``e`` whose other operand is ``value``."""
    a, b = e.invars
    if const(a, value):
      return b
    return a if const(b, value) else None

  if eqn.primitive.name != "mul" or len(eqn.invars) != 2:
    return None
  for x, h in (eqn.invars, eqn.invars[::-1]):
    half = op(h, "mul")
    g = half and split(half, 0.5)
    one = g is not None and op(g, "add")
    t = one and split(one, 1.0)
    tanh = t is not None and op(t, "tanh")
    scaled = tanh and op(tanh.invars[0], "mul")
    inner = scaled and split(scaled, _GELU_SCALE)
    total = inner is not None and op(inner, "add")
    if not total:
      continue
    cube_term = [v for v in total.invars if v is not x]
    if len(cube_term) != 1 or x not in total.invars:
      continue
    term = op(cube_term[0], "mul")
    cube_var = term and split(term, _GELU_CUBE)
    cube = cube_var is not None and op(cube_var, "integer_pow")
    if cube and cube.params.get("y") == 3 and cube.invars[0] is x:
      return x
  return None


# Inside a call with constant and input-dependent arguments, a constant part of at least this many
# equations is evaluated as one compiled program (trace.fold); each equation costs a compilation of
# its own otherwise (AQT's weight quantization: 15-20 equations per layer).
FOLD_MIN_EQUATIONS = 8


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
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      gelu = _gelu_input(eqn, producers, read)
      if gelu is not None and read(gelu)[0] == "node":
        # jax.nn.gelu's tanh form: one curve node (its cube, tanh and product above stay unused).
        where = self.user_where(eqn, _where(eqn, outer_where))
        outs = [self.emit(G.Node(kind=G.GELU, inputs=(read(gelu)[1],), shape=tuple(eqn.outvars[0].aval.shape),
                                 where=where))]
      else:
        outs = self.equation(eqn, ins, outer_where)
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
    return [read(v) for v in jaxpr.outvars]

  def equation(self, eqn, ins, outer_where: str = "", defer: bool = True):
    self.current_where = _where(eqn, outer_where)
    prim = eqn.primitive
    name = prim.name
    sub = next((eqn.params[p] for p in _CALL_PARAM_NAMES if p in eqn.params), None)
    if (name in ("jit", "pjit") and eqn.params.get("name") == "silu" and len(ins) == 1 and ins[0][0] == "node"):
      # jax.nn.silu: one node of its own (tighter than the product of x and sigmoid(x)).
      where = self.user_where(eqn, _where(eqn, outer_where))
      return [self.emit(G.Node(kind=G.SILU, inputs=(ins[0][1],), shape=tuple(eqn.outvars[0].aval.shape),
                               where=where))]
    if sub is not None and name not in ("scan", "while", "cond"):
      # The calls we are inside of: their tracebacks continue the inner equations' (whose stop at
      # a jit boundary), for naming the user's operation in unsupported()'s message.
      self.calls = getattr(self, "calls", []) + [eqn]
      try:
        closed = sub if isinstance(sub, jcore.ClosedJaxpr) else jcore.ClosedJaxpr(sub, ())
        kinds = {v[0] for v in ins}
        folded = None
        if kinds == {"const", "node"}:
          # (a custom_vjp or custom_jvp call that partial evaluation kept whole: its constant part,
          # a library's weight quantization, as one compiled program where it is large; a small
          # one is walked as written, which keeps the equations' tracebacks for naming them)
          folded = fold_constants(closed, [v[1] if v[0] == "const" else None for v in ins], FOLD_MIN_EQUATIONS)
        if folded is not None:
          closed, values = folded
          ins = [("const", v) for v in values] + [v for v in ins if v[0] == "node"]
        return self.run(closed.jaxpr, closed.consts, ins, _where(eqn, outer_where))
      finally:
        self.calls = self.calls[:-1]
    if any(v[0] == "lazy" for v in ins) or (defer and name in dynamic.STARTS and ins[0][0] == "node"):
      # Dynamic activation scales: the pattern's values stay symbolic (trace.dynamic), anything
      # else reads them as the ordinary values their equations make.
      out = dynamic.rule(self, eqn, ins, self.user_where(eqn, _where(eqn, outer_where)),
                         tuple(eqn.outvars[0].aval.shape), outer_where) if defer else None
      if out is not None:
        return [out]
      ins = [dynamic_forms.materialize(self, v) for v in ins]
      self.current_where = _where(eqn, outer_where)
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
    if _makes_nonlinear(name, ins):
      where = self.user_where(eqn, where)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    rule = _RULES.get(name)
    if rule is None:
      if name in _COEFFICIENT_PRIMS or name in _ROUTING_PRIMS:
        return [self.linear(eqn, ins, where, out_shape)]
      self.unsupported(eqn)
    return [rule(self, eqn, ins, where, out_shape)]

  def user_where(self, eqn, where: str) -> str:
    """``where``, or for an equation inside a library function (``flax.linen.LayerNorm``) that
    function and the user's line that called it: what messages about its nodes should name."""
    try:
      found = user_operation(eqn, getattr(self, "calls", ()))
    except Exception:  # pragma: no cover - a JAX without tracebacks
      found = None
    return where if found is None else f"{found[1]}, in {found[0]}"

  def unsupported(self, eqn, why: str = "", where: str = ""):
    # The message names the user's operation (jax.nn.gelu, not integer_pow) where it can: unsupported.py.
    where = where or getattr(self, "current_where", "") or _where(eqn)
    raise UnsupportedPrimitiveError(unsupported_message(eqn, why, where, SUPPORTED, getattr(self, "calls", ())))

  # --- emitters --------------------------------------------------------------------------------

  def linear(self, eqn, ins, where, out_shape):
    var_positions = [i for i, v in enumerate(ins) if v[0] == "node"]
    name = eqn.primitive.name
    if name == "scatter" and ins[1][0] == "node":
      self.unsupported(eqn, "its indices depend on the input")
    if len(var_positions) > 1:
      if name == "concatenate":
        return self.concatenate(ins, eqn.params["dimension"], where, out_shape)
      if name == "stack":  # each part given the new axis, then concatenated along it
        axis = eqn.params["axis"]
        parts = [self.route(v, lambda t, axis=axis: jnp.expand_dims(t, axis), where) if v[0] == "node"
                 else ("const", np.expand_dims(np.asarray(v[1]), axis)) for v in ins]
        return self.concatenate(parts, axis, where, out_shape)
      if name == "scatter" and var_positions == [0, 2]:
        # x.at[i].set(u) with constant indices is linear in (x, u) together: the same scatter with
        # zero updates (x, its set entries cleared) plus with a zero operand (u in place). (Not
        # scatter-add: its parameters hold a float32 combiner, which float64 evaluations cannot bind.)
        zeros = lambda v: ("const", host_array(0, self.dtype, self.shape_of(v)))  # noqa: E731
        kept = self.linear(eqn, [ins[0], ins[1], zeros(ins[2])], where, out_shape)
        placed = self.linear(eqn, [zeros(ins[0]), ins[1], ins[2]], where, out_shape)
        return self.combine(kept, placed, 1, where, out_shape)
      self.unsupported(eqn, "it multiplies two input-dependent values, which is not linear")
    pos = var_positions[0]
    if name == "div" and pos != 0:
      self.unsupported(eqn, "dividing by an input-dependent value is not linear")
    params = dict(eqn.params)
    if name in _PRECISE_PRIMS and "precision" in params:
      params["precision"] = (lax.Precision.HIGHEST, lax.Precision.HIGHEST)
    integer = jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.integer)
    if integer and params.get("preferred_element_type") is not None:
      params["preferred_element_type"] = None  # the integer product, computed in floats like a float one
    frozen = _freeze(params)
    try:
      hash(frozen)
    except TypeError:
      frozen = tuple((k, _Unhashable(v)) for k, v in frozen)
    coefficients = name in _COEFFICIENT_PRIMS
    in_value = ins[pos]
    consts = [jnp.asarray(v[1]) for i, v in enumerate(ins) if i != pos]
    if name in ("mul", "div"):
      consts = [host_array(c, self.dtype, out_shape) for c in consts]
    elif coefficients and any(jnp.issubdtype(c.dtype, jnp.integer) for c in consts):
      exact = 2 ** (jnp.finfo(self.dtype).nmant + 1)  # integers of at most this size are floats exactly
      if any(jnp.issubdtype(c.dtype, jnp.integer) and np.max(np.abs(np.asarray(c, np.int64)), initial=0) > exact
             for c in consts):
        self.unsupported(eqn, f"its integer weights exceed {exact}, which {np.dtype(self.dtype).name} "
                         "cannot hold exactly")
      consts = [host_array(c, self.dtype) for c in consts]
    bias = None
    if not coefficients and any(np.any(np.asarray(c) != 0) for c in consts if np.issubdtype(np.asarray(c).dtype, np.floating)):
      # Routing ops with constant data (pad value, concatenated constants) are affine: split them
      # into the same op on zero data plus the op's value at x = 0.
      zero_in = host_array(0, self.dtype, self.shape_of(in_value))
      args = list(consts)
      args.insert(pos, zero_in)
      bias = eqn.primitive.bind(*args, **eqn.params)
      consts = [host_array(0, c.dtype, c.shape) if np.issubdtype(np.asarray(c).dtype, np.floating) else c
                for c in consts]
    op = LinearOp(name=name, primitive=eqn.primitive, params=frozen, var_pos=pos,
                  in_shape=self.shape_of(in_value), out_shape=out_shape, dtype=np.dtype(self.dtype).name,
                  coefficients=coefficients)
    op = _with_term_counts(op, tuple(consts))
    if integer:
      self._check_no_overflow(eqn, op, consts, pos)
    node = G.Node(kind=G.AFFINE, inputs=(in_value[1],), shape=out_shape, op=op, weights=tuple(consts),
                  bias=bias, where=where)
    return self.emit(node)

  def concatenate(self, parts, axis: int, where, out_shape):
    """``jnp.concatenate(parts, axis)`` of input-dependent parts (at least two) and constants.

    Without constants, one CONCAT node. With them, each input-dependent part zero-padded to the
    output's shape (a routing op), summed, plus the constants at their places: a CONCAT node of the
    input-dependent parts alone would drop them and misplace what follows.
    """
    if all(v[0] == "node" for v in parts):
      return self.emit(G.Node(kind=G.CONCAT, inputs=tuple(v[1] for v in parts), shape=out_shape, attrs=(axis,),
                              where=where))
    axis = axis % len(out_shape)
    constants = np.zeros(out_shape, self.dtype)
    total, start = None, 0
    for v in parts:
      size = (self.shape_of(v) if v[0] == "node" else np.shape(v[1]))[axis]
      if v[0] == "node":
        config = [(0, 0, 0)] * len(out_shape)
        config[axis] = (start, out_shape[axis] - start - size, 0)
        padded = self.route(v, lambda t, zero, config=tuple(config): lax.pad(t, zero, config), where,
                            host_array(0, self.dtype))
        total = padded if total is None else self.combine(total, padded, 1, where, out_shape)
      else:
        index = [slice(None)] * len(out_shape)
        index[axis] = slice(start, start + size)
        constants[tuple(index)] = np.broadcast_to(np.asarray(v[1], self.dtype), constants[tuple(index)].shape)
      start += size
    return self.shift(total, constants, where, out_shape)

  def _check_no_overflow(self, eqn, op, consts, pos):
    """An integer product (qwix's int8 x int8 -> int32) equals its real value unless it wraps
    around: refuse one whose largest possible sum exceeds the result type's range."""
    x_dtype, out_dtype = eqn.invars[pos].aval.dtype, eqn.outvars[0].aval.dtype
    if not jnp.issubdtype(x_dtype, jnp.integer):
      self.unsupported(eqn, "a product of a float input computed in integers rounds it")
    largest_x = max(abs(int(jnp.iinfo(x_dtype).min)), int(jnp.iinfo(x_dtype).max))
    with jax.ensure_compile_time_eval():
      largest = float(jnp.max(op.apply_abs(tuple(consts), jnp.ones(op.in_shape, self.dtype)))) * largest_x
    if largest * (1 + 1e-3) > int(jnp.iinfo(out_dtype).max):  # 1e-3: the float32 sum's own rounding
      self.unsupported(eqn, f"its {out_dtype} sums may overflow (up to {largest:.3g})")

  def shift(self, value, const, where, shape):
    """``value + const`` for an input-dependent value."""
    c = host_array(const, self.dtype, shape)
    return self.emit(G.Node(kind=G.AFFINE, inputs=(value[1],), shape=shape, bias=c, where=where))

  def scale(self, value, factor, where, shape):
    """``factor * value`` for a constant scalar factor."""
    const = host_array(factor, self.dtype, shape)
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
      return ("const", host_array(np.asarray(a[1], self.dtype) + sign * np.asarray(c[1], self.dtype), self.dtype))
    if c[0] == "const":
      return self.shift(a, sign * np.asarray(c[1], self.dtype), where, shape)
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
        out = self.clip(x, host_array(lo, self.dtype), host_array(hi, self.dtype), where, shape)
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
