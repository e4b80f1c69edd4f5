"""ONNX models as ``(apply, params)``: the graph interpreted with jnp, its weights in a pytree.

The graph's structure (nodes, attributes, shapes, integer constants) is read once and captured
by the closure of ``apply``; its float weights go into params, so that quantizers can transform
them and ``apply`` stays a pure function of ``(params, x)``. Params, by top-level key:

```
'params'       weights, flax layout: {'dense_0': {'kernel': (in, out), 'bias': (out,)},
               'conv_0': {'kernel': (*window, in / group, out), 'bias': (out,)},
               'batchnorm_0': {'scale', 'bias'}, ...}, numbered in graph order per kind
'batch_stats'  batch-norm statistics: {'batchnorm_0': {'mean', 'var'}}
'constants'    every other float constant the graph reads (Sub/Mul/Div operands, ...), by name
```

Quantize ``params['params']`` only. Gemm's alpha and beta are folded into the kernel and bias;
``kernel`` puts the output channel last (ONNX Conv's OIHW becomes flax's HWIO). A constant that
several nodes use as a weight is copied into each node's entry.

Files as verification benchmarks (VNN-COMP, VeryDiff) write them are read as they are: Gemm with
any transA, transB, alpha and beta; MatMul + Add in both conventions (``x @ W`` and ERAN's ``W @ x``,
both filed as a dense layer); Flatten and Reshape (0 and -1); input normalisation by Sub and Div
constants inside the graph; weights as Constant nodes, or as initializers that old exporters also
list among the graph's inputs. A classifier's trailing Softmax or LogSoftmax, which qbound does not
bound, is dropped with ``load_onnx(path, logits=True)``.

A file that cannot be read (empty, text, truncated, corrupt, an unsupported op, NaN or infinite
weights, a graph that does not compute on the input shape it declares) raises ValueError naming
the file and, where one is to blame, the node; never an error from inside onnx, protobuf or numpy.

The format is the ONNX IR (https://onnx.ai/onnx/repo-docs/IR.html); operators in
`qbound.io.onnx_ops`.
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qbound.io import onnx_ops
from qbound.io.onnx_ops import Getter, Node

Params = dict[str, Any]
OLDEST_OPSET = 9


def load_onnx(path: str | os.PathLike, *, logits: bool = False
              ) -> tuple[Callable[[Params, jax.Array], Any], Params]:
  """Read an ONNX model as a pure JAX function of one unbatched input and its float32 params.

  When the model's input has rank 2 or more and its first axis is symbolic or 1, that axis
  is the batch axis: ``apply`` takes the input without it (an image ``(C, H, W)`` for a model
  declared ``(N, C, H, W)``) and returns outputs without it. Any other input shape is taken
  as declared. Run batches with ``jax.vmap``. Values are computed in float32.

  Classifiers often end in Softmax (or LogSoftmax), which qbound's bounds do not propagate.
  Top-1 and delta-top-1 properties are decided on the logits (softmax is monotone), so
  ``logits=True`` drops a Softmax or LogSoftmax that computes a graph output, directly or
  through Flatten, Reshape, Squeeze, Unsqueeze, Identity or Dropout nodes (which stay), and
  whose values nothing else reads: ``apply`` then returns the activation's input, whatever
  its axis. A graph that does not end in one is read unchanged. ``apply.output_activation``
  says what the graph ends in either way.

  Args:
    path: the ``.onnx`` file (opset 9 or newer, default domain, one input).
    logits: drop a trailing Softmax or LogSoftmax, so that ``apply`` returns logits.

  Returns:
    ``(apply, params)``: ``apply(params, x)`` evaluates the graph in topological order;
    params as in the module docstring. It returns one array, or a tuple if the model has
    several outputs. ``apply.input_shape`` is the unbatched input shape the file declares
    (None for a size it leaves open; None without a declared shape).
    ``apply.output_activation`` is ``'Softmax'`` or ``'LogSoftmax'`` if the graph output is
    computed by one (as above; left out of ``apply`` when ``logits=True``), else None; a tuple
    of these for a model with several outputs.

  Raises:
    ImportError: the ``onnx`` package is missing (``pip install 'qbound[onnx]'``).
    OSError: the file cannot be opened (missing, a directory, no permission).
    ValueError: the file is not a readable ONNX model (empty, text, truncated, corrupt), holds
      NaN or infinite weights, does not compute on the input shape it declares, or uses an op
      or feature qbound does not read; the message names the file, and the op type and node
      if one is to blame.

  Example:
    >>> import tempfile, numpy as np, onnx
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> w = numpy_helper.from_array(np.full((3, 2), 0.5, np.float32), 'w')
    >>> graph = helper.make_graph(
    ...     [helper.make_node('MatMul', ['x', 'w'], ['h']), helper.make_node('Relu', ['h'], ['r']),
    ...      helper.make_node('Softmax', ['r'], ['y'])],
    ...     'mlp', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 3])],
    ...     [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['N', 2])], [w])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     onnx.save(helper.make_model(graph), f'{tmp}/mlp.onnx')
    ...     apply, params = load_onnx(f'{tmp}/mlp.onnx', logits=True)
    >>> params['params']['dense_0']['kernel'].shape
    (3, 2)
    >>> apply(params, jnp.array([1.0, 2.0, 4.0])).tolist()  # the logits: Softmax left out
    [3.5, 3.5]
    >>> apply.output_activation
    'Softmax'
  """
  onnx, numpy_helper = _import_onnx()
  path = os.fspath(path)
  with open(path, "rb") as f:  # OSError (missing, a directory, no permission) as it is
    data = f.read()
  try:
    return _load(onnx, numpy_helper, path, data, logits)
  except _Refused as err:
    raise ValueError(str(err)) from err.__cause__
  except MemoryError:
    raise
  except Exception as err:  # whatever a corrupt file trips over, the error names the file
    raise ValueError(f"{path}: cannot be read as a network ({type(err).__name__}: {err}); the file is "
                     "corrupt, or uses an ONNX feature qbound does not read") from err


class _Refused(ValueError):
  """The reader's own errors, their message naming the file; `load_onnx` raises them as ValueError."""


# Inputs up to this many elements are run through the graph on shapes only when the model is loaded;
# a declared input of more than _LARGEST_INPUT elements (4 TiB of float32) is a corrupt size.
_CHECKED_INPUT_SIZE = 2**25
_LARGEST_INPUT = 2**40

# Nodes that may stand between a dropped Softmax and the graph output: they move values, not change them.
_SHAPE_ONLY = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")
_OUTPUT_ACTIVATIONS = ("Softmax", "LogSoftmax")


def _load(onnx, numpy_helper, path: str, data: bytes, logits: bool):
  """`load_onnx` on the file's bytes; every error it raises itself is a `_Refused`."""
  model, opset = _parse(onnx, path, data)
  graph = model.graph
  nodes, constants = _nodes_and_constants(onnx, numpy_helper, path, graph)

  output_names = [o.name for o in graph.output]
  if not output_names:
    raise _Refused(f"{path}: the graph declares no output")
  activations = [_output_activation(nodes, name, output_names) for name in output_names]
  if logits:  # the activation becomes an Identity: the shape-only nodes after it still apply
    dropped = {id(node) for node in activations if node is not None}
    nodes = [Node("Identity", n.name, n.inputs[:1], n.outputs, {}) if id(n) in dropped else n for n in nodes]

  input_name, batched, expected = _input_layout(onnx, path, graph, constants)
  ordered = _topological(path, nodes, {input_name, "", *constants})
  uses = collections.Counter(t for n in ordered for t in n.inputs)
  uses.update(output_names)
  for name in uses:
    value = constants.get(name)
    if value is not None and np.issubdtype(value.dtype, np.floating) and np.isnan(value).any():
      raise _Refused(f"{path}: the constant {name!r} holds NaN, which would make outputs and bounds NaN; "
                     "the file is corrupt, or was exported from a broken model")
  builder = _GraphBuilder(path, opset, constants, uses)
  steps = [(node, _rule(builder, node, uses)) for node in ordered]
  produced = {input_name, *constants, *(n.outputs[0] for n in ordered)}
  for name in output_names:
    if name not in produced:
      raise _Refused(f"{path}: graph output {name!r} is not computed by any node")
  output_getters = [builder.input(Node("Output", name, (name,), (), {}), 0) for name in output_names]
  declared_outputs = [_declared_shape(o) for o in graph.output]
  params = builder.finish()

  def apply(params: Params, x: jax.Array):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
      x = x.astype(jnp.float32)
    if expected is not None and (len(x.shape) != len(expected) or any(
            e is not None and e != s for e, s in zip(expected, x.shape))):
      raise ValueError(f"the model takes one input of shape "
                       f'{tuple("?" if e is None else e for e in expected)}, got {x.shape}'
                       + ("; use jax.vmap to run a batch" if batched else ""))
    env = {input_name: jnp.expand_dims(x, 0) if batched else x}
    for node, run in steps:
      try:
        (env[node.outputs[0]],) = run(params, env)
      except (TypeError, ValueError, IndexError, KeyError, ArithmeticError) as err:
        raise ValueError(f"{path}: node {node.name!r} ({node.op_type}) fails on an input of shape "
                         f"{x.shape}: {type(err).__name__}: {err}") from err
    outputs = tuple(_unbatch(path, name, get(params, env), batched, declared)
                    for name, get, declared in zip(output_names, output_getters, declared_outputs))
    return outputs[0] if len(outputs) == 1 else outputs

  if expected is not None and None not in expected and math.prod(expected) <= _CHECKED_INPUT_SIZE:
    # Run the graph once on shapes only: a graph that cannot compute on the input it declares (a
    # corrupt size, a wrong axis) is refused here, naming its node, rather than on first use. (Some
    # rules build static numpy arrays as large as a feature map, so huge inputs are left unchecked.)
    try:
      jax.eval_shape(apply, params, jax.ShapeDtypeStruct(expected, jnp.float32))
    except ValueError as err:
      raise _Refused(f"{err} (the input shape the file declares)") from err.__cause__
  # The unbatched input shape the file declares (None where it leaves a size open, None for no
  # shape), for callers that need it before calling (the command line spreads one --lower value).
  apply.input_shape = expected
  kinds = tuple(None if node is None else node.op_type for node in activations)
  apply.output_activation = kinds[0] if len(kinds) == 1 else kinds
  return apply, params


def _parse(onnx, path: str, data: bytes):
  """The model in ``data`` and its default-domain opset, checked to be one qbound can read."""
  # The serialisation onnx.load picks by the file's extension: binary protobuf unless it says otherwise.
  fmt = onnx.serialization.registry.get_format_from_file_extension(os.path.splitext(path)[1]) or "protobuf"
  try:
    model = onnx.load_model_from_string(data, format=fmt)
  except Exception as err:  # protobuf raises its own DecodeError, among others
    what = _what_it_is(data) if fmt == "protobuf" else f"not valid ONNX {fmt}"
    raise _Refused(f"{path}: not a readable ONNX model: {what} ({type(err).__name__}: {err})") from err
  graph = model.graph
  opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
  if not graph.node or "ai.onnx" not in opsets:
    lacks = "no graph nodes" if not graph.node else "no import of the default ONNX opset"
    raise _Refused(f"{path}: not a usable ONNX model: it has {lacks}; {_what_it_is(data)}")
  opset = opsets["ai.onnx"]
  if opset < OLDEST_OPSET:
    raise _Refused(
        f"{path}: opset {opset} is older than {OLDEST_OPSET}, the oldest qbound reads; convert it "
        "first: onnx.version_converter.convert_version(onnx.load(path), 13)")
  if len(graph.sparse_initializer):
    raise _Refused(f"{path}: sparse initializers are not supported")
  foreign = {i: n.domain for i, n in enumerate(graph.node) if n.domain not in ("", "ai.onnx")}
  unsupported = [f"{n.op_type!r} (node {_node_name(n, i)!r}" + (f", domain {foreign[i]!r})" if i in foreign else ")")
                 for i, n in enumerate(graph.node)
                 if i in foreign or (n.op_type not in onnx_ops.RULES and n.op_type != "Constant")]
  if unsupported:
    raise _Refused(f'{path}: unsupported ONNX op: {", ".join(unsupported)}. qbound.io.load_onnx '
                   f'reads {", ".join(sorted([*onnx_ops.RULES, "Constant"]))}')
  _load_external_data(path, model)
  return model, opset


def _node_name(node, i: int) -> str:
  return node.name or f"#{i} (unnamed)"


def _nodes_and_constants(onnx, numpy_helper, path: str, graph) -> tuple[list[Node], dict[str, np.ndarray]]:
  """The graph's nodes freed from protobuf, and its constants: initializers and Constant nodes' values."""
  constants = {}
  for tensor in graph.initializer:
    try:
      constants[tensor.name] = numpy_helper.to_array(tensor)
    except Exception as err:
      raise _Refused(f"{path}: initializer {tensor.name!r} cannot be read ({type(err).__name__}: {err}); "
                     "the file is corrupt or truncated") from err
  nodes = []
  for i, n in enumerate(graph.node):
    try:
      attrs = _attributes(onnx, numpy_helper, n)
    except Exception as err:
      raise _Refused(f"{path}: node {_node_name(n, i)!r} ({n.op_type}): its attributes cannot be read "
                     f"({type(err).__name__}: {err}); the file is corrupt") from err
    nodes.append(Node(n.op_type, _node_name(n, i), tuple(n.input), tuple(n.output), attrs))
  for node in nodes:
    if node.op_type == "Constant":
      if not node.outputs:
        raise _Refused(f"{path}: node {node.name!r} (Constant) has no output")
      constants[node.outputs[0]] = _constant_value(path, node)
  return [n for n in nodes if n.op_type != "Constant"], constants


def _rule(builder: _GraphBuilder, node: Node, uses: collections.Counter) -> onnx_ops.Run:
  """The node's forward pass from its op's rule; what the rule trips over is refused naming the node."""
  if not node.outputs or not node.outputs[0]:
    builder.fail(node, "it has no output")
  for k, extra in enumerate(node.outputs[1:], start=1):
    if extra and uses[extra]:
      builder.fail(node, f"only the first output is supported, output {k} ({extra!r}) is used")
  builder.node = node
  try:
    return onnx_ops.RULES[node.op_type](builder, node)
  except _Refused:
    raise
  except Exception as err:
    raise _Refused(f"{builder.path}: node {node.name!r} ({node.op_type}): cannot be read "
                   f"({type(err).__name__}: {err})") from err


def _what_it_is(data: bytes) -> str:
  """A guess at what a file that is no ONNX model is, for the error message."""
  head = data[:200]
  if not head:
    return "the file is empty"
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError:
    return "the file is corrupt or truncated, or not an ONNX model at all"
  if text.isprintable() or all(ch.isprintable() or ch in "\r\n\t" for ch in text):
    first = text.splitlines()[0][:60] if text.splitlines() else text[:60]
    return (f"it is a text file (starting {first!r}), and ONNX models are binary protobuf; a .nnet file "
            "is read by qbound.io.load_nnet")
  return "the file is corrupt or truncated, or not an ONNX model at all"


def _load_external_data(path: str, model) -> None:
  """Weights kept in files beside the model (models over 2 GB), read as onnx.load reads them."""
  from onnx import external_data_helper

  tensors = [*model.graph.initializer,
             *(a.t for n in model.graph.node for a in n.attribute if a.HasField("t"))]
  if not any(external_data_helper.uses_external_data(t) for t in tensors):
    return
  try:
    external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
  except Exception as err:
    raise _Refused(f"{path}: its weights are kept in external data files that cannot be read "
                   f"({type(err).__name__}: {err}); keep them beside the model, as exported") from err


def _output_activation(nodes: list[Node], output: str, output_names: list[str]) -> Node | None:
  """The Softmax or LogSoftmax node that computes graph output ``output``, directly or through
  shape-only nodes, and whose values nothing else reads; None if there is none."""
  producer = {n.outputs[0]: n for n in nodes if n.outputs}
  reads = collections.Counter(t for n in nodes for t in n.inputs)
  if reads[output] or output_names.count(output) != 1:
    return None
  node = producer.get(output)
  while node is not None and node.op_type in _SHAPE_ONLY and node.inputs:
    name = node.inputs[0]
    if reads[name] != 1 or name in output_names:
      return None
    node = producer.get(name)
  return node if node is not None and node.op_type in _OUTPUT_ACTIVATIONS else None


def _declared_shape(value_info) -> tuple | None:
  """The shape a graph input or output declares (None for a size it leaves open), or None."""
  tensor_type = value_info.type.tensor_type
  if not tensor_type.HasField("shape"):
    return None
  return tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)


def _import_onnx():
  try:
    import onnx
    from onnx import numpy_helper
  except ImportError as err:
    raise ImportError("qbound.io.load_onnx needs the 'onnx' package: pip install 'qbound[onnx]'") from err
  return onnx, numpy_helper


def _input_layout(onnx, path: str, graph, constants) -> tuple[str, bool, tuple | None]:
  """The input's name, whether its first axis is a batch axis, and the unbatched shape apply takes.

  A first axis that is symbolic or 1 (on rank 2 or more) is a batch axis; unknown sizes are None.
  """
  inputs = [i for i in graph.input if i.name not in constants]  # old IRs list initializers too
  if len(inputs) != 1:
    raise _Refused(f"{path}: qbound reads models with exactly one input, this one has "
                   f"{[i.name for i in inputs]}")
  (model_input,) = inputs
  tensor_type = model_input.type.tensor_type
  if tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                   onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
    raise _Refused(f"{path}: the input {model_input.name!r} must hold floats, its type is "
                   f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}")
  dims = _declared_shape(model_input)
  if dims is None:
    return model_input.name, False, None
  if any(d is not None and d < 0 for d in dims) or math.prod(d or 1 for d in dims) > _LARGEST_INPUT:
    raise _Refused(f"{path}: the input {model_input.name!r} declares the shape {dims}, which no input "
                   "can have (a negative or astronomically large size); the file is corrupt")
  batched = len(dims) >= 2 and dims[0] in (None, 1)
  return model_input.name, batched, tuple(dims[1:] if batched else dims)


def _attributes(onnx, numpy_helper, node) -> dict[str, Any]:
  attrs = {}
  for attribute in node.attribute:
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
      value = value.decode()
    elif isinstance(value, onnx.TensorProto):
      value = numpy_helper.to_array(value)
    elif isinstance(value, list) and value and isinstance(value[0], bytes):
      value = [v.decode() for v in value]
    attrs[attribute.name] = value
  return attrs


def _constant_value(path: str, node: Node) -> np.ndarray:
  attrs = node.attrs
  if "value" in attrs:
    return np.asarray(attrs["value"])
  if "value_float" in attrs or "value_floats" in attrs:
    return np.asarray(attrs.get("value_float", attrs.get("value_floats")), np.float32)
  if "value_int" in attrs or "value_ints" in attrs:
    return np.asarray(attrs.get("value_int", attrs.get("value_ints")), np.int64)
  raise _Refused(f"{path}: node {node.name!r} (Constant): only value, value_float(s) and "
                 f"value_int(s) are supported, it has {sorted(attrs)}")


def _topological(path: str, nodes: list[Node], available: set[str]) -> list[Node]:
  """The nodes in an order where each runs after its inputs exist (file order when it is one)."""
  available, ordered, pending = set(available), [], nodes
  while pending:
    waiting = []
    for node in pending:
      if all(t in available for t in node.inputs):
        ordered.append(node)
        available.update(node.outputs)
      else:
        waiting.append(node)
    if len(waiting) == len(pending):
      node = waiting[0]
      missing = next(t for t in node.inputs if t not in available)
      raise _Refused(f"{path}: node {node.name!r} ({node.op_type}) reads tensor {missing!r}, "
                     "which no node, initializer or input provides (or the graph has a cycle)")
    pending = waiting
  return ordered


def _unbatch(path: str, name: str, value, batched: bool, declared: tuple | None):
  """An output without its batch axis (of size 1). An output declared without one (a Squeeze or
  Reshape dropped it: its declared first size is that of the value, and not 1) is returned as is."""
  value = jnp.asarray(value)
  if not batched or value.ndim == 0:
    return value
  if value.shape[0] != 1:
    if declared is not None and len(declared) == value.ndim and declared[0] == value.shape[0]:
      return value
    raise ValueError(f"{path}: the output {name!r} has shape {value.shape}; the batch axis of size 1 "
                     "was expected first, as on the input")
  return value.reshape(value.shape[1:])


class _GraphBuilder:
  """Load-time state shared by the op rules: constants, params filed so far, tensor uses."""

  def __init__(self, path: str, opset: int, constants: dict[str, np.ndarray],
               uses: collections.Counter):
    self.path = path
    self.opset = opset
    self.node: Node | None = None  # the node whose rule runs, for errors that arise in param()
    self._constants = constants
    self._uses = uses
    self._params: dict[str, dict] = {"params": {}, "batch_stats": {}, "constants": {}}
    self._groups: collections.Counter = collections.Counter()
    self._dense: dict[str, tuple[str, int]] = {}
    self._constant_keys: dict[str, str] = {}

  def fail(self, node: Node, message: str):
    raise _Refused(f"{self.path}: node {node.name!r} ({node.op_type}): {message}")

  def has_input(self, node: Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i] != ""

  def is_const(self, node: Node, i: int) -> bool:
    return self.has_input(node, i) and node.inputs[i] in self._constants

  def is_weight(self, node: Node, i: int) -> bool:
    return self.is_const(node, i) and np.issubdtype(self._constants[node.inputs[i]].dtype, np.floating)

  def static(self, node: Node, i: int, what: str) -> np.ndarray:
    if not self.has_input(node, i):
      self.fail(node, f"{what} (input {i}) is missing")
    if not self.is_const(node, i):
      self.fail(node, f"{what} (input {i}, {node.inputs[i]!r}) must be a constant (an "
                      "initializer or a Constant node's output); qbound reads static graphs only")
    return self._constants[node.inputs[i]]

  def input(self, node: Node, i: int) -> Getter:
    if not self.has_input(node, i):
      self.fail(node, f"input {i} is missing")
    name = node.inputs[i]
    if name not in self._constants:
      return lambda params, env: env[name]
    value = self._constants[name]
    if not np.issubdtype(value.dtype, np.floating):
      return lambda params, env: value  # integers (shapes, indices) stay static numpy
    key = self._constant_key(name)
    return lambda params, env: params["constants"][key]

  def new_group(self, kind: str) -> str:
    index = self._groups[kind]
    self._groups[kind] += 1
    return f"{kind}_{index}"

  def param(self, group: str, leaf: str, value, section: str = "params") -> Getter:
    with np.errstate(over="ignore", invalid="ignore"):
      value = np.asarray(value, np.float32)
    if not np.isfinite(value).all():
      bad = value[~np.isfinite(value)][0]
      message = (f"its {leaf} ({group}) holds {bad}, not a finite float32 number; the file is corrupt, "
                 "or its weights overflow float32")
      if self.node is None:
        raise _Refused(f"{self.path}: {message}")
      self.fail(self.node, message)
    self._params[section].setdefault(group, {})[leaf] = value
    return lambda params, env: params[section][group][leaf]

  def mark_dense(self, tensor: str, group: str, n_out: int) -> None:
    self._dense[tensor] = (group, n_out)

  def dense_bias(self, node: Node) -> tuple[int, Getter] | None:
    """If node adds a constant (out,) vector to a dense layer's only use, file it as bias."""
    for i in (0, 1):
      if not (self.is_weight(node, i) and self.has_input(node, 1 - i)):
        continue
      source = node.inputs[1 - i]
      if source not in self._dense or self._uses[source] != 1:
        continue
      group, n_out = self._dense[source]
      value = self._constants[node.inputs[i]]
      fits = value.size == n_out and value.shape[-1:] == (n_out,)
      if fits and "bias" not in self._params["params"][group]:
        return i, self.param(group, "bias", value)
    return None

  def _constant_key(self, name: str) -> str:
    if name not in self._constant_keys:
      key = re.sub(r"\W+", "_", name).strip("_") or "constant"
      taken = set(self._constant_keys.values())
      # 'kernel' and 'bias' are reserved for weights: quantizers look for those names.
      base, n = (key + "_constant" if key in ("kernel", "bias") else key), 1
      key = base
      while key in taken:
        key, n = f"{base}_{n}", n + 1
      self._constant_keys[name] = key
      self._params["constants"][key] = np.asarray(self._constants[name], np.float32)
    return self._constant_keys[name]

  def finish(self) -> Params:
    """The params filed so far as jnp arrays; empty sections other than 'params' left out."""
    return {section: jax.tree.map(jnp.asarray, entries)
            for section, entries in self._params.items() if entries or section == "params"}
