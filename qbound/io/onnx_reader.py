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

The format is the ONNX IR (https://onnx.ai/onnx/repo-docs/IR.html); operators in
`qbound.io.onnx_ops`.
"""

from __future__ import annotations

import collections
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


def load_onnx(path: str | os.PathLike) -> tuple[Callable[[Params, jax.Array], Any], Params]:
  """Read an ONNX model as a pure JAX function of one unbatched input and its float32 params.

  When the model's input has rank 2 or more and its first axis is symbolic or 1, that axis
  is the batch axis: ``apply`` takes the input without it (an image ``(C, H, W)`` for a model
  declared ``(N, C, H, W)``) and returns outputs without it. Any other input shape is taken
  as declared. Run batches with ``jax.vmap``. Values are computed in float32.

  Args:
    path: the ``.onnx`` file (opset 9 or newer, default domain, one input).

  Returns:
    ``(apply, params)``: ``apply(params, x)`` evaluates the graph in topological order;
    params as in the module docstring. It returns one array, or a tuple if the model has
    several outputs. ``apply.input_shape`` is the unbatched input shape the file declares
    (None for a size it leaves open; None without a declared shape).

  Raises:
    ImportError: the ``onnx`` package is missing (``pip install 'qbound[onnx]'``).
    ValueError: the file is not a readable ONNX model, or uses an op or feature qbound
      does not read; the message names the file, and the op type and node if one is to
      blame.

  Example:
    >>> import tempfile, numpy as np, onnx
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> w = numpy_helper.from_array(np.full((3, 2), 0.5, np.float32), 'w')
    >>> graph = helper.make_graph(
    ...     [helper.make_node('MatMul', ['x', 'w'], ['h']), helper.make_node('Relu', ['h'], ['y'])],
    ...     'mlp', [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 3])],
    ...     [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['N', 2])], [w])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     onnx.save(helper.make_model(graph), f'{tmp}/mlp.onnx')
    ...     apply, params = load_onnx(f'{tmp}/mlp.onnx')
    >>> params['params']['dense_0']['kernel'].shape
    (3, 2)
    >>> apply(params, jnp.array([1.0, 2.0, -4.0])).tolist()
    [0.0, 0.0]
  """
  onnx, numpy_helper = _import_onnx()
  path = os.fspath(path)
  try:
    model = onnx.load(path)
  except OSError:
    raise
  except Exception as err:  # protobuf raises its own DecodeError, among others
    raise ValueError(f"{path}: not a readable ONNX model: {_what_it_is(path)} ({type(err).__name__}: {err})") from err
  graph = model.graph
  opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
  if "ai.onnx" not in opsets or not graph.node:
    raise ValueError(f"{path}: not a usable ONNX model (it has no graph nodes or imports no "
                     "default ONNX opset)")
  opset = opsets["ai.onnx"]
  if opset < OLDEST_OPSET:
    raise ValueError(
        f"{path}: opset {opset} is older than {OLDEST_OPSET}, the oldest qbound reads; convert it "
        "first: onnx.version_converter.convert_version(onnx.load(path), 13)")
  if len(graph.sparse_initializer):
    raise ValueError(f"{path}: sparse initializers are not supported")

  constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  nodes = [Node(n.op_type, n.name or f"#{i} (unnamed)", tuple(n.input), tuple(n.output),
                _attributes(onnx, numpy_helper, n)) for i, n in enumerate(graph.node)]
  foreign = {i: n.domain for i, n in enumerate(graph.node) if n.domain not in ("", "ai.onnx")}
  unsupported = [f"{n.op_type!r} (node {n.name!r}" + (f", domain {foreign[i]!r})" if i in foreign else ")")
                 for i, n in enumerate(nodes)
                 if i in foreign or (n.op_type not in onnx_ops.RULES and n.op_type != "Constant")]
  if unsupported:
    raise ValueError(f'{path}: unsupported ONNX op: {", ".join(unsupported)}. qbound.io.load_onnx '
                     f'reads {", ".join(sorted([*onnx_ops.RULES, "Constant"]))}')
  for node in nodes:
    if node.op_type == "Constant":
      constants[node.outputs[0]] = _constant_value(path, node)

  input_name, batched, expected = _input_layout(onnx, path, graph, constants)
  ordered = _topological(path, [n for n in nodes if n.op_type != "Constant"],
                         {input_name, "", *constants})
  uses = collections.Counter(t for n in ordered for t in n.inputs)
  uses.update(o.name for o in graph.output)
  builder = _GraphBuilder(path, opset, constants, uses)
  steps = []
  for node in ordered:
    for k, extra in enumerate(node.outputs[1:], start=1):
      if extra and uses[extra]:
        builder.fail(node, f"only the first output is supported, output {k} ({extra!r}) is used")
    steps.append((node.outputs[0], onnx_ops.RULES[node.op_type](builder, node)))
  produced = {input_name, *constants, *(n.outputs[0] for n in ordered)}
  output_names = [o.name for o in graph.output]
  for name in output_names:
    if name not in produced:
      raise ValueError(f"{path}: graph output {name!r} is not computed by any node")
  output_getters = [builder.input(Node("Output", name, (name,), (), {}), 0) for name in output_names]
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
    for name, run in steps:
      (env[name],) = run(params, env)
    outputs = tuple(_unbatch(get(params, env), batched) for get in output_getters)
    return outputs[0] if len(outputs) == 1 else outputs

  # The unbatched input shape the file declares (None where it leaves a size open, None for no
  # shape), for callers that need it before calling (the command line spreads one --lower value).
  apply.input_shape = expected
  return apply, params


def _what_it_is(path: str) -> str:
  """A guess at what a file that does not parse as ONNX is, for the error message."""
  try:
    with open(path, "rb") as f:
      head = f.read(200)
  except OSError:  # pragma: no cover - it was just opened by onnx.load
    return "it cannot be read"
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
    raise ValueError(f"{path}: qbound reads models with exactly one input, this one has "
                     f"{[i.name for i in inputs]}")
  (model_input,) = inputs
  tensor_type = model_input.type.tensor_type
  if tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                   onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
    raise ValueError(f"{path}: the input {model_input.name!r} must hold floats, its type is "
                     f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}")
  if not tensor_type.HasField("shape"):
    return model_input.name, False, None
  dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
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
  raise ValueError(f"{path}: node {node.name!r} (Constant): only value, value_float(s) and "
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
      raise ValueError(f"{path}: node {node.name!r} ({node.op_type}) reads tensor {missing!r}, "
                       "which no node, initializer or input provides (or the graph has a cycle)")
    pending = waiting
  return ordered


def _unbatch(value, batched: bool):
  value = jnp.asarray(value)
  if not batched or value.ndim == 0:
    return value
  if value.shape[0] != 1:
    raise ValueError(f"an output has shape {value.shape}; the batch axis of size 1 was expected first")
  return value.reshape(value.shape[1:])


class _GraphBuilder:
  """Load-time state shared by the op rules: constants, params filed so far, tensor uses."""

  def __init__(self, path: str, opset: int, constants: dict[str, np.ndarray],
               uses: collections.Counter):
    self.path = path
    self.opset = opset
    self._constants = constants
    self._uses = uses
    self._params: dict[str, dict] = {"params": {}, "batch_stats": {}, "constants": {}}
    self._groups: collections.Counter = collections.Counter()
    self._dense: dict[str, tuple[str, int]] = {}
    self._constant_keys: dict[str, str] = {}

  def fail(self, node: Node, message: str):
    raise ValueError(f"{self.path}: node {node.name!r} ({node.op_type}): {message}")

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
    self._params[section].setdefault(group, {})[leaf] = np.asarray(value, np.float32)
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
