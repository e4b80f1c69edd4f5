"""Layer graphs to ONNX: hand a network (above all the merged ``f - f_q``) to other tools.

:func:`export_onnx` writes a :class:`~qbound.graph.Graph` (or a
:class:`~qbound.merge.MergedNetwork`, or a pure JAX function traced on an example input) as an
ONNX model (https://onnx.ai/onnx/repo-docs/IR.html, operators per https://onnx.ai/onnx/operators/)
that computes exactly the graph's function: the same float32 constants in the same real
operations, so in real arithmetic the two functions are equal; evaluated in float32 they differ
only by the order of sums (a matrix product's accumulation order is the runtime's choice).

Layout: the ONNX input is ``x`` of shape ``(B, *input_shape)`` and the output ``y`` of shape
``(B, *output_shape)``, where ``input_shape`` and ``output_shape`` are the graph's unbatched
shapes and ``B`` is a leading batch axis: of size 1 by default, as VNN-COMP's benchmarks declare
it (alpha-beta-CROWN, Marabou and NNV drop a leading axis of size 1), or symbolic (``batch_size=None``,
named ``batch``) for running many inputs at once. Every value of the graph keeps its own layout
behind that axis (a Flax convolution's NHWC stays NHWC: it is transposed to ONNX's NCHW around
each ``Conv`` only). :func:`qbound.io.load_onnx` reads the file back as a function of one
unbatched input again.

The export is a table, :data:`NODE_EXPORTERS`, from node kind to rule; affine nodes have a second
table, :data:`AFFINE_ROUTES`, by the name of their linear primitive:

=====================  ===========================================================================
graph node             ONNX
=====================  ===========================================================================
affine ``dot_general``  ``MatMul`` with the kernel as a matrix (plus ``Transpose``/``Reshape`` when
                       the contraction is not over the last axis), then ``Add`` of the bias
affine ``conv``        ``Conv`` (kernel in OIHW, pads, strides, dilations, groups) between
                       transposes to and from NCHW
affine ``mul``/``div``  ``Mul``/``Div`` by the constant (``div`` stays a division: ``x / c`` and
                       ``x * (1 / c)`` round differently)
affine reshape-like    ``Reshape`` (``reshape``, ``squeeze``, ``expand_dims``, size-preserving
                       ``broadcast_in_dim``), ``Transpose``
other affine maps      the explicit matrix (the map applied to the identity basis, exact for
                       maps that route or multiply entries) as ``MatMul``; refused beyond
                       ``max_matrix_entries``
``add``                ``Add``/``Sub`` in the graph's order (and ``Mul`` by -1 when the sum is
                       negated), signs read as the graph reads them (``> 0`` adds)
``concat``             ``Concat``
``relu``               ``Relu``; ``tanh`` -> ``Tanh``; ``sigmoid`` -> ``Sigmoid``
``clip``               ``Clip`` when both bounds are one number each, else ``Max``/``Min`` with the
                       bound arrays; an infinite side is left out
``round``              ``Round`` (ONNX rounds half to even, as ``jnp.round``), ``Floor``,
                       ``Ceil``; ``none`` -> ``Identity``
=====================  ===========================================================================

A node of any other kind raises :class:`UnsupportedNodeError` naming it. The model is checked with
``onnx.checker.check_model(full_check=True)`` (which runs ONNX's shape inference) before it is
written. Needs the ``onnx`` package (``pip install 'qbound[onnx]'``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G

DEFAULT_OPSET = 13
"""Opset 13 (2020), old enough for the verifiers' ONNX readers (onnx2pytorch in alpha-beta-CROWN,
Marabou, MATLAB's importer in NNV); every operator written here has its current form since then
(Clip takes its bounds as inputs and Round exists since opset 11)."""

DEFAULT_MAX_MATRIX_ENTRIES = 1 << 24
"""The largest explicit matrix (16.8M float32 entries, 64 MiB) a linear map is written as."""

INPUT_NAME, OUTPUT_NAME, BATCH_NAME = "x", "y", "batch"


class UnsupportedNodeError(ValueError):
  """The graph has a node the ONNX exporter has no rule for (or one it cannot write exactly)."""


# ------------------------------------------------------------------------------------------ emitter


class _Emitter:
  """Collects ONNX nodes and initializers. Every tensor carries a leading batch axis."""

  def __init__(self, onnx, numpy_helper, batch_size: Optional[int], max_matrix_entries: int):
    self.onnx = onnx
    self.numpy_helper = numpy_helper
    self.batch_size = batch_size
    self.max_matrix_entries = max_matrix_entries
    self.nodes: list = []
    self.initializers: list = []
    self._names: collections.Counter = collections.Counter()
    self.prefix = ""  # names new ONNX nodes after the graph node being exported

  def fresh(self, hint: str) -> str:
    base = f"{self.prefix}_{hint}" if self.prefix else hint
    self._names[base] += 1
    count = self._names[base]
    return base if count == 1 else f"{base}_{count}"

  def const(self, value, hint: str, dtype=np.float32) -> str:
    """An initializer holding ``value`` (float constants must be exact in float32)."""
    name = self.fresh(hint)
    array = _exact_float32(value, name) if dtype == np.float32 else np.asarray(value, dtype)
    self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name

  def op(self, op_type: str, inputs: list[str], hint: Optional[str] = None, **attrs) -> str:
    out = self.fresh(hint or op_type.lower())
    self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], name=out, **attrs))
    return out

  @property
  def batch_dim(self) -> int:
    """The batch entry of a Reshape target: its size if fixed, else -1 (inferred)."""
    return -1 if self.batch_size is None else self.batch_size

  def reshape(self, x: str, shape, from_shape=None) -> str:
    """``x`` (of unbatched shape ``from_shape``) reshaped to ``(B, *shape)``; no-op if equal."""
    shape = tuple(int(s) for s in shape)
    if from_shape is not None and tuple(from_shape) == shape:
      return x
    if self.batch_size is None and math.prod(shape) == 0:
      raise UnsupportedNodeError(f"cannot reshape to the empty shape {shape} behind a "
                                 "symbolic batch axis; export with batch_size=1")
    target = self.const(np.array([self.batch_dim, *shape], np.int64), "shape", dtype=np.int64)
    return self.op("Reshape", [x, target])

  def transpose(self, x: str, perm) -> str:
    """``x`` with its unbatched axes permuted by ``perm`` (the batch axis stays first)."""
    perm = [int(p) for p in perm]
    if perm == list(range(len(perm))):
      return x
    return self.op("Transpose", [x], perm=[0] + [p + 1 for p in perm])

  def align(self, x: str, shape, target_shape) -> str:
    """``x`` reshaped so that numpy broadcasting behind the batch axis works like jnp's."""
    shape, target_shape = tuple(shape), tuple(target_shape)
    if len(shape) >= len(target_shape):
      return x
    return self.reshape(x, (1,) * (len(target_shape) - len(shape)) + shape)


def _exact_float32(value, what: str) -> np.ndarray:
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.floating):
    array = array.astype(np.float64)
  cast = array.astype(np.float32)
  same = (cast.astype(np.float64) == array.astype(np.float64)) | (np.isnan(cast) & np.isnan(array))
  if not np.all(same):
    raise UnsupportedNodeError(
        f"{what}: the constants are {array.dtype} values that float32 cannot hold exactly, and the "
        "exported model computes in float32. Cast the graph first if float32 rounding is what you "
        "want: qbound.graph.astype(graph, jnp.float32).")
  return cast


# ------------------------------------------------------------------------------------ affine routes


def _bias_add(em: _Emitter, node: G.Node, y: str, y_shape) -> str:
  if node.bias is None:
    if tuple(y_shape) != tuple(node.shape):
      raise UnsupportedNodeError(f"the linear map gives shape {tuple(y_shape)} but the node "
                                 f"has shape {node.shape} and no bias to broadcast against")
    return y
  y = em.align(y, y_shape, node.shape)
  bias = np.broadcast_to(np.asarray(node.bias), node.shape)
  return em.op("Add", [y, em.const(bias, "bias")])


def _route_elementwise(op_type: str) -> Callable:
  def route(em: _Emitter, node: G.Node, x: str) -> Optional[str]:
    op = node.op
    if op.var_pos != 0 and op_type == "Div":
      return None  # c / x is not linear; the tracer never makes it
    if tuple(op.in_shape) != tuple(op.out_shape) or len(node.weights) != 1:
      return None
    c = np.asarray(node.weights[0])
    if c.size and np.all(c == c.reshape(-1)[0]):
      c = c.reshape(-1)[0]  # one number: a scalar initializer broadcasts the same way
    else:
      c = np.broadcast_to(c, op.out_shape)
    return em.op(op_type, [x, em.const(c, "c")])
  return route


def _route_dot(em: _Emitter, node: G.Node, x: str) -> Optional[str]:
  """``dot_general`` without batch dimensions as one MatMul against a (K, M) matrix."""
  op = node.op
  params = dict(op.params)
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  if lb or rb or len(node.weights) != 1:
    return None
  w = np.asarray(node.weights[0])
  x_contract, w_contract = (lc, rc) if op.var_pos == 0 else (rc, lc)
  x_shape = tuple(op.in_shape)
  x_free = [d for d in range(len(x_shape)) if d not in x_contract]
  w_free = [d for d in range(w.ndim) if d not in w_contract]
  x_free_shape = [x_shape[d] for d in x_free]
  w_free_shape = [w.shape[d] for d in w_free]
  k = math.prod(x_shape[d] for d in x_contract)
  # x -> (B, *x_free, K), contracted axes last in the order they pair with the kernel's.
  perm = x_free + list(x_contract)
  moved = em.transpose(x, perm)
  moved_shape = [x_shape[d] for d in perm]
  flat = em.reshape(moved, (*x_free_shape, k), moved_shape)
  kernel = np.transpose(w, list(w_contract) + w_free).reshape(k, math.prod(w_free_shape))
  y = em.op("MatMul", [flat, em.const(kernel, "kernel")])
  y_shape = (*x_free_shape, math.prod(w_free_shape))
  if op.var_pos == 0:  # dot_general's output: lhs free axes, then rhs free axes
    return em.reshape(y, op.out_shape, y_shape)
  split = (*x_free_shape, *w_free_shape)
  y = em.reshape(y, split, y_shape)
  nx = len(x_free_shape)
  return em.transpose(y, [nx + i for i in range(len(w_free_shape))] + list(range(nx)))


def _route_conv(em: _Emitter, node: G.Node, x: str) -> Optional[str]:
  """``conv_general_dilated`` with x as the image as one ONNX Conv between layout transposes."""
  op = node.op
  p = dict(op.params)
  if op.var_pos != 0 or len(node.weights) != 1 or p.get("batch_group_count", 1) != 1:
    return None
  if any(d != 1 for d in p.get("lhs_dilation") or ()):
    return None  # a transposed convolution: ONNX Conv has no input dilation
  padding = p["padding"]
  if isinstance(padding, str) or any(lo < 0 or hi < 0 for lo, hi in padding):
    return None
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  w = np.asarray(node.weights[0])
  n = w.ndim - 2
  in_shape = tuple(op.in_shape)
  images, channels = in_shape[lhs_spec[0]], in_shape[lhs_spec[1]]
  spatial = [in_shape[d] for d in lhs_spec[2:]]
  # (B, *in_shape) -> (B, images, C, *spatial) -> (B * images, C, *spatial): NCHW.
  nchw = em.transpose(x, lhs_spec)
  merged_batch = -1 if em.batch_size is None else em.batch_size * images
  shape = em.const(np.array([merged_batch, channels, *spatial], np.int64), "shape", dtype=np.int64)
  nchw = em.op("Reshape", [nchw, shape])
  kernel = np.transpose(w, rhs_spec)  # OIHW
  attrs = dict(kernel_shape=list(kernel.shape[2:]),
               strides=list(p.get("window_strides") or (1,) * n),
               dilations=list(p.get("rhs_dilation") or (1,) * n),
               pads=[int(lo) for lo, _ in padding] + [int(hi) for _, hi in padding],
               group=int(p.get("feature_group_count", 1)))
  y = em.op("Conv", [nchw, em.const(kernel, "kernel")], **attrs)
  out_shape = tuple(op.out_shape)
  spatial_out = [out_shape[d] for d in out_spec[2:]]
  unmerged = em.reshape(y, (images, out_shape[out_spec[1]], *spatial_out))
  # Axis p of the output sits at spec position out_spec.index(p) of (images, O, *spatial).
  return em.transpose(unmerged, [list(out_spec).index(d) for d in range(len(out_shape))])


def _route_reshape(em: _Emitter, node: G.Node, x: str) -> Optional[str]:
  op = node.op
  if op.name == "reshape" and dict(op.params).get("dimensions") is not None:
    return None  # reshape with a transpose folded in
  if math.prod(op.in_shape) != math.prod(op.out_shape):
    return None  # a broadcast that repeats entries: the matrix route
  return em.reshape(x, op.out_shape, op.in_shape)


def _route_transpose(em: _Emitter, node: G.Node, x: str) -> Optional[str]:
  return em.transpose(x, dict(node.op.params)["permutation"])


def _route_matrix(em: _Emitter, node: G.Node, x: str) -> str:
  """Any linear map as its explicit matrix: row i is the map applied to the i-th basis vector.

  Exact for maps that route, sum or multiply entries by constants (each entry of the matrix is a
  product of one coefficient with 1); only sizes up to ``max_matrix_entries`` are written.
  """
  op = node.op
  n_in, n_out = math.prod(op.in_shape), math.prod(op.out_shape)
  if n_in * n_out > em.max_matrix_entries:
    raise UnsupportedNodeError(
        f"the linear map {op.name!r} ({op.in_shape} -> {op.out_shape}) has no native ONNX "
        f"route, and as an explicit matrix it would have {n_in} x {n_out} = {n_in * n_out:,} entries, "
        f"more than max_matrix_entries={em.max_matrix_entries:,}. Raise the limit, or write that step "
        "with a dense layer, a convolution, a reshape or a transpose.")
  dtype = jnp.dtype(op.dtype)
  eye = jnp.eye(n_in, dtype=dtype).reshape((n_in, *op.in_shape))
  rows = jax.vmap(lambda e: op.apply(node.weights, e))(eye)
  matrix = np.asarray(rows).reshape(n_in, n_out)
  flat = em.reshape(x, (n_in,), op.in_shape)
  y = em.op("MatMul", [flat, em.const(matrix, "matrix")])
  return em.reshape(y, op.out_shape, (n_out,))


def _route_scaled(em: _Emitter, node: G.Node, x: str) -> str:
  """A rescaled product (:mod:`qbound.trace.scaled`): the product's own route, then one Mul or Div
  per factor, the same float operations (its explicit matrix would round the products ``W * s``)."""
  op = node.op
  n_base = len(node.weights) - len(op.factors)
  base = dataclasses.replace(node, op=op.base, weights=node.weights[:n_base], bias=None)
  route = AFFINE_ROUTES.get(op.base.name)
  y = route(em, base, x) if route is not None else None
  if y is None:
    y = _route_matrix(em, base, x)
  for kind, c in zip(op.factors, node.weights[n_base:]):
    y = em.op("Mul" if kind == "mul" else "Div", [y, em.const(np.broadcast_to(np.asarray(c), op.out_shape), "c")])
  return y


AFFINE_ROUTES: dict[str, Callable[[_Emitter, G.Node, str], Optional[str]]] = {
    "dot_general*scale": _route_scaled,
    "conv_general_dilated*scale": _route_scaled,
    "dot_general": _route_dot,
    "conv_general_dilated": _route_conv,
    "mul": _route_elementwise("Mul"),
    "div": _route_elementwise("Div"),
    "reshape": _route_reshape,
    "squeeze": _route_reshape,
    "expand_dims": _route_reshape,
    "broadcast_in_dim": _route_reshape,
    "transpose": _route_transpose,
}
"""Linear primitive name -> native ONNX route; a route returning None (or a primitive not listed)
falls back to the explicit matrix."""


# ------------------------------------------------------------------------------------- node kinds

Inputs = list[tuple[str, tuple[int, ...]]]  # (tensor name, unbatched shape) per graph input


def _affine(em: _Emitter, node: G.Node, inputs: Inputs) -> str:
  ((x, x_shape),) = inputs
  if node.op is None:
    return _bias_add(em, node, x, x_shape)
  route = AFFINE_ROUTES.get(node.op.name)
  y = route(em, node, x) if route is not None else None
  if y is None:
    y = _route_matrix(em, node, x)
  return _bias_add(em, node, y, node.op.out_shape)


def _add(em: _Emitter, node: G.Node, inputs: Inputs) -> str:
  """``sum_i s_i x_i`` with the graph's own order of additions (float sums are not associative).

  The running sum is kept as ``sign * t``: adding a term of the same sign is ``Add(t, x)``, of the
  other sign ``Sub(t, x)``, both exact images of the graph's operations since rounding to nearest
  is symmetric under negation; a negative sign at the end becomes ``Mul(t, -1)``.
  """
  terms = [(1 if sign > 0 else -1, em.align(name, shape, node.shape))
           for sign, (name, shape) in zip(node.attrs, inputs)]
  if len(terms) >= 2 and terms[0][0] < 0 < terms[1][0]:
    terms[0], terms[1] = terms[1], terms[0]  # -a + b == b + (-a): addition commutes exactly
  sign, total = terms[0]
  for s, t in terms[1:]:
    total = em.op("Add" if s == sign else "Sub", [total, t])
  if sign < 0:
    total = em.op("Mul", [total, em.const(np.float32(-1), "minus_one")])
  return total


def _concat(em: _Emitter, node: G.Node, inputs: Inputs) -> str:
  axis = node.attrs[0] % len(node.shape)
  return em.op("Concat", [name for name, _ in inputs], axis=axis + 1)


def _unary(op_type: str) -> Callable[[_Emitter, G.Node, Inputs], str]:
  def rule(em: _Emitter, node: G.Node, inputs: Inputs) -> str:
    return em.op(op_type, [inputs[0][0]])
  return rule


def _clip(em: _Emitter, node: G.Node, inputs: Inputs) -> str:
  (x, _), = inputs
  lo, hi = (np.broadcast_to(np.asarray(w), node.shape) for w in node.weights)
  lo_none, hi_none = bool(np.all(lo == -np.inf)), bool(np.all(hi == np.inf))
  if lo_none and hi_none:
    return em.op("Identity", [x])
  uniform = lambda a: a.size > 0 and bool(np.all(a == a.reshape(-1)[0]))  # noqa: E731
  if uniform(lo) and uniform(hi):
    # ONNX Clip takes scalar bounds (inputs since opset 11); "" leaves a side open.
    bounds = ["" if none else em.const(np.asarray(a.reshape(-1)[0]), name)
              for none, a, name in ((lo_none, lo, "lo"), (hi_none, hi, "hi"))]
    while bounds and bounds[-1] == "":
      bounds.pop()
    return em.op("Clip", [x, *bounds])
  y = x if lo_none else em.op("Max", [x, em.const(lo, "lo")])
  return y if hi_none else em.op("Min", [y, em.const(hi, "hi")])


ROUNDING_OPS = {"nearest": "Round", "floor": "Floor", "ceil": "Ceil", "none": "Identity"}
"""Rounding mode of a ``round`` node -> ONNX op. ONNX Round rounds halves to even, like jnp.round
(and like the graph's ``nearest``, :data:`qbound.graph.ROUNDING`)."""


def _round(em: _Emitter, node: G.Node, inputs: Inputs) -> str:
  mode = node.attrs[0]
  if mode == "away":
    raise UnsupportedNodeError("the network rounds halves away from zero (jax.lax.round's default), which no "
                               "single ONNX op does (ONNX Round rounds them to even); round with jnp.round "
                               "to export it")
  if mode not in ROUNDING_OPS:
    raise UnsupportedNodeError(f"rounding mode {mode!r} has no ONNX op "
                               f"(known: {', '.join(ROUNDING_OPS)})")
  return em.op(ROUNDING_OPS[mode], [inputs[0][0]])


NODE_EXPORTERS: dict[str, Callable[[_Emitter, G.Node, Inputs], str]] = {
    "affine": _affine,
    "add": _add,
    "concat": _concat,
    "relu": _unary("Relu"),
    "clip": _clip,
    "round": _round,
    "tanh": _unary("Tanh"),
    "sigmoid": _unary("Sigmoid"),
}
"""Graph node kind -> rule ``rule(emitter, node, [(tensor, unbatched shape) per input]) -> tensor``.
A new node kind needs one entry here."""


# ------------------------------------------------------------------------------------------ export


def as_graph(net, example=None) -> G.Graph:
  """The graph to export: a Graph as is, a MergedNetwork's ``.graph``, or a traced function.

  Args:
    net: a :class:`~qbound.graph.Graph`, anything with a ``.graph`` attribute holding one (a
      :class:`~qbound.merge.MergedNetwork`), or a pure JAX function of one unbatched input.
    example: for a function, an input (or ``jax.ShapeDtypeStruct`` or Box) fixing its shape.
  """
  if isinstance(net, G.Graph):
    return net
  if isinstance(getattr(net, "graph", None), G.Graph):
    return net.graph
  if callable(net):
    if example is None:
      raise ValueError("export_onnx: to export a function, give an example input (or a Box) fixing "
                       "its input shape: export_onnx(fn, path, example=jnp.zeros(shape)).")
    from qbound.trace import trace

    return trace(net, example)
  raise TypeError(f"export_onnx exports a qbound Graph, a MergedNetwork or a JAX function, not "
                  f"{type(net).__name__}.")


def to_onnx(graph: G.Graph, *, batch_size: Optional[int] = 1, opset: int = DEFAULT_OPSET,
            max_matrix_entries: int = DEFAULT_MAX_MATRIX_ENTRIES, doc: str = "") -> Any:
  """The graph as a checked ``onnx.ModelProto`` (nothing written). Arguments as in `export_onnx`."""
  onnx, numpy_helper = _import_onnx()
  if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
    raise ValueError(f"batch_size must be a positive integer or None (symbolic), got {batch_size!r}.")
  if opset < DEFAULT_OPSET:
    raise ValueError(f"opset must be {DEFAULT_OPSET} or newer (the operators are written in their "
                     f"opset-{DEFAULT_OPSET} form), got {opset}.")
  em = _Emitter(onnx, numpy_helper, batch_size, max_matrix_entries)
  tensors: list[str] = [INPUT_NAME]
  for idx, node in enumerate(graph.nodes):
    if idx == 0:
      if node.kind != G.INPUT:
        raise UnsupportedNodeError(f"node 0 must be the input, it is {node.kind!r}.")
      continue
    rule = NODE_EXPORTERS.get(node.kind)
    where = f" ({node.where})" if node.where else ""
    if rule is None:
      raise UnsupportedNodeError(
          f"node {idx} has kind {node.kind!r}{where}, which has no ONNX exporter; qbound.io.export_onnx "
          f"writes the kinds {', '.join(sorted(NODE_EXPORTERS))}. Add an entry to "
          "qbound.io.onnx_export.NODE_EXPORTERS.")
    em.prefix = f"n{idx}_{node.kind}"
    inputs = [(tensors[i], tuple(graph.nodes[i].shape)) for i in node.inputs]
    try:
      tensors.append(rule(em, node, inputs))
    except UnsupportedNodeError as err:
      raise UnsupportedNodeError(f"node {idx} ({node.kind}){where}: {err}") from None
  em.prefix = ""
  out = tensors[graph.output]
  if out == INPUT_NAME or any(out in n.input for n in em.nodes):
    em.nodes.append(onnx.helper.make_node("Identity", [out], [OUTPUT_NAME], name="output"))
  else:  # rename the last tensor to the graph's output name
    for n in em.nodes:
      for k, name in enumerate(n.output):
        if name == out:
          n.output[k] = OUTPUT_NAME
  em.nodes = _bias_adds_after_their_matmul(em.nodes, {t.name for t in em.initializers})
  batch = BATCH_NAME if batch_size is None else int(batch_size)
  value_info = lambda name, shape: onnx.helper.make_tensor_value_info(  # noqa: E731
      name, onnx.TensorProto.FLOAT, [batch, *shape])
  onnx_graph = onnx.helper.make_graph(
      em.nodes, "qbound", [value_info(INPUT_NAME, graph.input_shape)],
      [value_info(OUTPUT_NAME, graph.output_shape)], em.initializers,
      doc_string=doc or "exported by qbound.io.export_onnx")
  opsets = [onnx.helper.make_opsetid("", opset)]
  from qbound import __version__

  model = onnx.helper.make_model(onnx_graph, opset_imports=opsets, producer_name="qbound",
                                 producer_version=__version__,
                                 ir_version=onnx.helper.find_min_ir_version_for(opsets))
  model.doc_string = onnx_graph.doc_string
  onnx.checker.check_model(model, full_check=True)
  return model


def export_onnx(net, path: str | os.PathLike, example=None, *, batch_size: Optional[int] = 1,
                opset: int = DEFAULT_OPSET, max_matrix_entries: int = DEFAULT_MAX_MATRIX_ENTRIES,
                doc: str = "") -> Any:
  """Write a network as an ONNX file that computes exactly its function, in float32.

  Args:
    net: a :class:`~qbound.graph.Graph`, a :class:`~qbound.merge.MergedNetwork` (its graph, the
      difference network ``f - f_q``, is written), or a pure JAX function of one unbatched input
      (traced with :func:`qbound.trace` on ``example``).
    path: the ``.onnx`` file to write.
    example: for a function, an input, ``jax.ShapeDtypeStruct`` or Box fixing the input shape.
    batch_size: the size of the leading batch axis of the ONNX input and output: 1 (default, what
      VNN-COMP models declare), another fixed size, or None for a symbolic axis named ``batch``.
    opset: the ONNX opset to declare (13 or newer).
    max_matrix_entries: the largest explicit matrix a linear map without a native ONNX route
      (slices, pads, gathers, sums, broadcasts) may become; larger ones raise.
    doc: the model's doc string (what it computes), shown by tools such as Netron.

  Returns:
    The ``onnx.ModelProto`` written: input ``x`` of shape ``(B, *graph.input_shape)``, output
    ``y`` of shape ``(B, *graph.output_shape)``, both float32 (see the module docstring).

  Raises:
    UnsupportedNodeError: a node kind without an exporter (the message names it and its node), a
      linear map too large for an explicit matrix, or constants float32 cannot hold exactly.
    ImportError: the ``onnx`` package is missing (``pip install 'qbound[onnx]'``).

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, numpy as np, onnxruntime, qbound as qb
    >>> f = lambda x: jax.nn.relu(x @ jnp.array([[1.0, -2.0], [0.5, 1.0]]))
    >>> fq = lambda x: jax.nn.relu(x @ jnp.array([[1.0, -2.0], [0.5, 0.75]]))
    >>> merged = qb.merge(f, fq, jnp.zeros(2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   _ = qb.io.export_onnx(merged, f"{tmp}/merged.onnx")
    ...   session = onnxruntime.InferenceSession(f"{tmp}/merged.onnx")
    ...   session.run(None, {"x": np.array([[1.0, 3.0]], np.float32)})[0].tolist()
    [[0.0, 0.75]]
  """
  graph = as_graph(net, example)
  if not doc and graph is not net and getattr(net, "graph", None) is graph:
    doc = ("qbound merged difference network g(x) = f(x) - f_q(x): f's layers, f_q's layers on the "
           "same input, and their difference")
  model = to_onnx(graph, batch_size=batch_size, opset=opset, max_matrix_entries=max_matrix_entries, doc=doc)
  onnx, _ = _import_onnx()
  onnx.save(model, os.fspath(path))
  return model


def _bias_adds_after_their_matmul(nodes: list, constants: set[str]) -> list:
  """The nodes, reordered so that an Add of a constant right after a MatMul reads that MatMul.

  onnx2pytorch, the ONNX reader of alpha-beta-CROWN, folds an ``Add`` with a constant input that
  directly follows a ``MatMul`` into that MatMul as its bias, without checking that the Add reads
  the MatMul's output (github.com/Talmaj/onnx2pytorch, ``convert/operations.py``). An unrelated
  Add there (f has a bias-free last layer, f_q starts with a shift) is moved before the MatMul;
  it does not read the MatMul's output, so the order stays topological.
  """
  nodes = list(nodes)
  moved = True
  while moved:
    moved = False
    for i in range(len(nodes) - 1):
      first, second = nodes[i], nodes[i + 1]
      if (first.op_type == "MatMul" and second.op_type == "Add" and first.output[0] not in second.input
          and any(name in constants for name in second.input)):
        nodes[i], nodes[i + 1] = second, first
        moved = True
  return nodes


def _import_onnx():
  try:
    import onnx
    from onnx import numpy_helper
  except ImportError as err:
    raise ImportError("qbound.io.export_onnx needs the 'onnx' package: pip install 'qbound[onnx]'") from err
  return onnx, numpy_helper
