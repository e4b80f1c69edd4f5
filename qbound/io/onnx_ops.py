"""ONNX operators written with jnp and lax: one rule per op type, kept as data in `RULES`.

A rule runs once, when the model is loaded: ``rule(b, node) -> run``. It reads the node's
attributes, asks the graph builder ``b`` for its operands (constant weights are filed into
params there) and returns ``run(params, env) -> (output,)``, the node's forward pass, which the
loaded ``apply`` calls with the values computed so far. Values keep the ONNX layout, batch axis
of size 1 included (NCHW for images), so each rule follows the ONNX operator specification
(https://onnx.ai/onnx/operators/) literally; the loader adds and removes that axis.

Semantics that changed between opsets (9 up to the current one) are handled where they differ:
Clip bounds (attributes before opset 11, inputs since), Squeeze/Unsqueeze axes (attributes before
13, inputs since) and Softmax/LogSoftmax (2-D coercion before 13).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Getter = Callable[[dict, dict], Any]
Run = Callable[[dict, dict], tuple]


class Node(NamedTuple):
  """An ONNX node, freed from protobuf: attributes are Python values and numpy arrays."""

  op_type: str
  name: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  attrs: dict[str, Any]


class Builder(Protocol):
  """What a rule may ask of the graph being loaded (implemented in `qbound.io.onnx_reader`)."""

  opset: int

  def fail(self, node: Node, message: str): ...
  def has_input(self, node: Node, i: int) -> bool: ...
  def is_const(self, node: Node, i: int) -> bool: ...
  def is_weight(self, node: Node, i: int) -> bool: ...
  def static(self, node: Node, i: int, what: str) -> np.ndarray: ...
  def input(self, node: Node, i: int) -> Getter: ...
  def new_group(self, kind: str) -> str: ...
  def param(self, group: str, leaf: str, value, section: str = "params") -> Getter: ...
  def mark_dense(self, tensor: str, group: str, n_out: int) -> None: ...
  def dense_bias(self, node: Node) -> tuple[int, Getter] | None: ...


def _elementwise(fn: Callable) -> Callable[[Builder, Node], Run]:
  def rule(b: Builder, node: Node) -> Run:
    x = b.input(node, 0)
    return lambda params, env: (fn(x(params, env)),)
  return rule


def _binary(fn: Callable) -> Callable[[Builder, Node], Run]:
  def rule(b: Builder, node: Node) -> Run:
    x, y = b.input(node, 0), b.input(node, 1)
    return lambda params, env: (fn(x(params, env), y(params, env)),)
  return rule


def _variadic(fn: Callable) -> Callable[[Builder, Node], Run]:
  """Max, Min: any number of inputs, broadcast against each other (numpy rules, as ONNX's)."""
  def rule(b: Builder, node: Node) -> Run:
    parts = [b.input(node, i) for i in range(len(node.inputs))]

    def run(params, env):
      out = parts[0](params, env)
      for part in parts[1:]:
        out = fn(out, part(params, env))
      return (out,)
    return run
  return rule


def _add(b: Builder, node: Node) -> Run:
  # MatMul followed by Add of a constant is how many exporters write a dense layer: file the
  # constant as that layer's bias, so params look like flax's {'kernel', 'bias'}.
  found = b.dense_bias(node)
  if found is None:
    return _binary(jnp.add)(b, node)
  i, bias = found
  x = b.input(node, 1 - i)
  return lambda params, env: (x(params, env) + bias(params, env),)


def _leaky_relu(b: Builder, node: Node) -> Run:
  alpha = float(node.attrs.get("alpha", 0.01))
  return _elementwise(lambda v: jax.nn.leaky_relu(v, alpha))(b, node)


def _gemm(b: Builder, node: Node) -> Run:
  """Y = alpha * A' @ B' + beta * C, with A' = A^T if transA, B' = B^T if transB."""
  alpha = float(node.attrs.get("alpha", 1.0))
  beta = float(node.attrs.get("beta", 1.0))
  trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
  a = b.input(node, 0)
  if not b.is_weight(node, 1):
    w, c = b.input(node, 1), b.input(node, 2) if b.has_input(node, 2) else None

    def run_dynamic(params, env):
      x, y = a(params, env), w(params, env)
      out = alpha * ((x.T if trans_a else x) @ (y.T if trans_b else y))
      return (out if c is None else out + beta * c(params, env),)
    return run_dynamic

  # Constant B becomes a flax-style kernel (in, out) with alpha folded in, so the layer is the
  # plain x @ kernel + bias that qbound's quantizers and bound rules know.
  w = np.asarray(b.static(node, 1, "B"), np.float64)
  if w.ndim != 2:
    b.fail(node, f"B must be a matrix, got shape {w.shape}")
  kernel_value = alpha * (w.T if trans_b else w)
  n_out = kernel_value.shape[1]
  group = b.new_group("dense")
  kernel = b.param(group, "kernel", kernel_value)
  bias = dynamic_c = None
  if b.is_weight(node, 2):
    c = beta * np.asarray(b.static(node, 2, "C"), np.float64)
    if c.size == n_out and c.shape[-1:] == (n_out,):
      c = c.reshape(n_out)
    elif c.size == 1:
      c = np.full(n_out, c.reshape(()))
    bias = b.param(group, "bias", c)
  elif b.has_input(node, 2):
    dynamic_c = b.input(node, 2)

  def run(params, env):
    x = a(params, env)
    out = (x.T if trans_a else x) @ kernel(params, env)
    if bias is not None:
      out = out + bias(params, env)
    elif dynamic_c is not None:
      out = out + beta * dynamic_c(params, env)
    return (out,)
  return run


def _matmul(b: Builder, node: Node) -> Run:
  if b.is_weight(node, 1) and b.static(node, 1, "B").ndim == 2:  # x @ W: the usual dense layer
    value = b.static(node, 1, "B")
    group = b.new_group("dense")
    kernel = b.param(group, "kernel", value)
    b.mark_dense(node.outputs[0], group, value.shape[1])
    a = b.input(node, 0)
    return lambda params, env: (a(params, env) @ kernel(params, env),)
  if b.is_weight(node, 0) and not b.is_const(node, 1) and b.static(node, 0, "A").ndim == 2:
    # W @ x, the column-vector convention (ERAN's and VeryDiff's MNIST nets): a dense layer with
    # kernel W^T. On a matrix x (k, n) it acts on each column: (x^T @ W^T)^T.
    value = b.static(node, 0, "A")
    group = b.new_group("dense")
    kernel = b.param(group, "kernel", value.T)
    b.mark_dense(node.outputs[0], group, value.shape[0])
    x = b.input(node, 1)

    def run(params, env):
      v = x(params, env)
      if v.ndim == 1:
        return (v @ kernel(params, env),)
      return (jnp.swapaxes(jnp.swapaxes(v, -1, -2) @ kernel(params, env), -1, -2),)
    return run
  return _binary(jnp.matmul)(b, node)


def _clip(b: Builder, node: Node) -> Run:
  if b.opset < 11:
    bounds = [node.attrs.get("min"), node.attrs.get("max")]
  else:
    # Constant bounds stay Python floats: they are part of the activation (ReLU6), not weights.
    bounds = [None if not b.has_input(node, i)
              else float(np.asarray(b.static(node, i, "bound")).reshape(()))
              if b.is_const(node, i) else b.input(node, i) for i in (1, 2)]
  x = b.input(node, 0)

  def run(params, env):
    lo, hi = (v(params, env) if callable(v) else v for v in bounds)
    return (jnp.clip(x(params, env), lo, hi),)
  return run


def _normalised(fn: Callable) -> Callable[[Builder, Node], Run]:
  """Softmax and LogSoftmax: ``fn`` along ``axis`` (default -1) since opset 13; before it, on the
  input coerced to 2-D at ``axis`` (default 1), along the second axis."""
  def rule(b: Builder, node: Node) -> Run:
    x = b.input(node, 0)
    if b.opset >= 13:
      axis = int(node.attrs.get("axis", -1))
      return lambda params, env: (fn(x(params, env), axis=axis),)
    axis = int(node.attrs.get("axis", 1))

    def run(params, env):  # before opset 13: coerce to 2-D at axis, normalise each row
      v = x(params, env)
      if not -v.ndim <= axis < max(v.ndim, 1):
        raise ValueError(f"axis {axis} is out of range for an input of rank {v.ndim}")
      rows = math.prod(v.shape[:axis % v.ndim])
      return (fn(v.reshape(rows, -1), axis=-1).reshape(v.shape),)
    return run
  return rule


def _explicit_pads(b: Builder, node: Node, in_shape: Sequence[int], kernel: Sequence[int],
                   strides: Sequence[int], dilations: Sequence[int]) -> list[tuple[int, int]]:
  """ONNX pads / auto_pad as (begin, end) per spatial axis."""
  auto_pad = node.attrs.get("auto_pad", "NOTSET")
  n = len(kernel)
  if auto_pad == "NOTSET":
    pads = list(node.attrs.get("pads", [0] * 2 * n))
    return list(zip(pads[:n], pads[n:]))
  if auto_pad == "VALID":
    return [(0, 0)] * n
  if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
    b.fail(node, f"unknown auto_pad {auto_pad!r}")
  pairs = []
  for size, k, s, d in zip(in_shape, kernel, strides, dilations):
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    small, big = total // 2, total - total // 2
    pairs.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
  return pairs


def _conv(b: Builder, node: Node) -> Run:
  if not b.is_weight(node, 1):
    b.fail(node, "the weights W must be a constant (an initializer)")
  w = b.static(node, 1, "W")
  n = w.ndim - 2
  if n not in (1, 2, 3):
    b.fail(node, f"only 1-, 2- and 3-D convolutions are supported, W has shape {w.shape}")
  spatial = "DHW"[3 - n:]
  dimension_numbers = ("NC" + spatial, spatial + "IO", "NC" + spatial)
  strides = tuple(node.attrs.get("strides", (1,) * n))
  dilations = tuple(node.attrs.get("dilations", (1,) * n))
  groups = int(node.attrs.get("group", 1))
  window = w.shape[2:]
  _explicit_pads(b, node, window, window, strides, dilations)  # fail early on a bad auto_pad
  group = b.new_group("conv")
  # ONNX stores OIHW; flax's HWIO puts the output channel last, where quantizers look for it.
  kernel = b.param(group, "kernel", np.moveaxis(w, (0, 1), (-1, -2)))
  bias = None
  if b.is_weight(node, 2):
    bias = b.param(group, "bias", b.static(node, 2, "B"))
  elif b.has_input(node, 2):
    bias = b.input(node, 2)
  x = b.input(node, 0)

  def run(params, env):
    v = x(params, env)
    pads = _explicit_pads(b, node, v.shape[2:], window, strides, dilations)
    out = lax.conv_general_dilated(
        v, kernel(params, env), window_strides=strides, padding=pads, rhs_dilation=dilations,
        dimension_numbers=dimension_numbers, feature_group_count=groups)
    if bias is not None:
      out = out + bias(params, env).reshape((-1,) + (1,) * n)
    return (out,)
  return run


def _pool_geometry(b: Builder, node: Node, in_shape: Sequence[int]):
  """Window, strides, dilations and (begin, end) pads of a pool; ceil_mode as extra end pad."""
  window = tuple(node.attrs["kernel_shape"])
  n = len(window)
  strides = tuple(node.attrs.get("strides", (1,) * n))
  dilations = tuple(node.attrs.get("dilations", (1,) * n))
  pads = _explicit_pads(b, node, in_shape, window, strides, dilations)
  extra = []
  for size, (lo, hi), k, s, d in zip(in_shape, pads, window, strides, dilations):
    span = size + lo + hi - (k - 1) * d - 1
    out = span // s + 1
    if node.attrs.get("ceil_mode", 0):
      out = -(-span // s) + 1
      if (out - 1) * s >= size + lo:  # a last window that starts in the end padding is dropped
        out -= 1
    extra.append(max((out - 1) * s + (k - 1) * d + 1 - (size + lo + hi), 0))
  return window, strides, dilations, pads, extra


def _max_pool(b: Builder, node: Node) -> Run:
  if "kernel_shape" not in node.attrs:
    b.fail(node, "kernel_shape is required")
  x = b.input(node, 0)

  def run(params, env):
    v = x(params, env)
    window, strides, dilations, pads, extra = _pool_geometry(b, node, v.shape[2:])
    padding = ((0, 0), (0, 0)) + tuple((lo, hi + e) for (lo, hi), e in zip(pads, extra))
    out = lax.reduce_window(v, np.array(-np.inf, v.dtype), lax.max, (1, 1) + window,
                            (1, 1) + strides, padding, window_dilation=(1, 1) + dilations)
    return (out,)
  return run


def _average_pool(b: Builder, node: Node) -> Run:
  if "kernel_shape" not in node.attrs:
    b.fail(node, "kernel_shape is required")
  include_pad = bool(node.attrs.get("count_include_pad", 0))
  x = b.input(node, 0)

  def run(params, env):
    v = x(params, env)
    window, strides, dilations, pads, extra = _pool_geometry(b, node, v.shape[2:])
    padding = ((0, 0), (0, 0)) + tuple((lo, hi + e) for (lo, hi), e in zip(pads, extra))
    total = lax.reduce_window(v, np.array(0, v.dtype), lax.add, (1, 1) + window,
                              (1, 1) + strides, padding, window_dilation=(1, 1) + dilations)
    # The divisor is static: how many positions of each window count (the input, plus the
    # explicit pads when count_include_pad; never the ceil_mode overhang), axis by axis.
    divisor = np.ones((), np.float64)
    for size, (lo, hi), e, k, s, d, n_out in zip(v.shape[2:], pads, extra, window, strides,
                                                  dilations, total.shape[2:]):
      counted = np.zeros(size + lo + hi + e, bool)
      counted[slice(0, size + lo + hi) if include_pad else slice(lo, lo + size)] = True
      taps = np.arange(n_out)[:, None] * s + np.arange(k)[None, :] * d
      divisor = np.multiply.outer(divisor, counted[taps].sum(axis=1))
    if np.all(divisor == divisor.flat[0]):
      return (total / float(divisor.flat[0]),)
    return (total / divisor.astype(v.dtype),)
  return run


def _global_pool(reduce: Callable) -> Callable[[Builder, Node], Run]:
  def rule(b: Builder, node: Node) -> Run:
    x = b.input(node, 0)

    def run(params, env):
      v = x(params, env)
      return (reduce(v, axis=tuple(range(2, v.ndim)), keepdims=True),)
    return run
  return rule


def _flatten(b: Builder, node: Node) -> Run:
  axis = node.attrs.get("axis", 1)
  x = b.input(node, 0)

  def run(params, env):
    v = x(params, env)
    cut = axis % v.ndim if axis < 0 else axis
    return (v.reshape(math.prod(v.shape[:cut]), math.prod(v.shape[cut:])),)
  return run


def _reshape(b: Builder, node: Node) -> Run:
  shape = [int(s) for s in np.asarray(b.static(node, 1, "the target shape")).reshape(-1)]
  allow_zero = node.attrs.get("allowzero", 0)
  x = b.input(node, 0)

  def run(params, env):
    v = x(params, env)
    # 0 copies the input's size on that axis unless allowzero (opset 14) says it means 0.
    target = [v.shape[i] if s == 0 and not allow_zero else s for i, s in enumerate(shape)]
    return (v.reshape(target),)
  return run


def _batch_norm(b: Builder, node: Node) -> Run:
  if node.attrs.get("training_mode", 0):
    b.fail(node, "training_mode=1 is not supported; export the model for inference")
  for i, what in enumerate(("scale", "B", "input_mean", "input_var"), start=1):
    if not b.is_weight(node, i):
      b.fail(node, f"{what} must be a constant (an initializer)")
  epsilon = float(node.attrs.get("epsilon", 1e-5))
  group = b.new_group("batchnorm")
  # The flax.linen.BatchNorm layout: scale and bias are parameters, mean and var statistics.
  scale = b.param(group, "scale", b.static(node, 1, "scale"))
  bias = b.param(group, "bias", b.static(node, 2, "B"))
  mean = b.param(group, "mean", b.static(node, 3, "input_mean"), section="batch_stats")
  var = b.param(group, "var", b.static(node, 4, "input_var"), section="batch_stats")
  x = b.input(node, 0)

  def run(params, env):
    v = x(params, env)
    shape = (-1,) + (1,) * (v.ndim - 2)
    mul = scale(params, env) * lax.rsqrt(var(params, env) + epsilon)
    return ((v - mean(params, env).reshape(shape)) * mul.reshape(shape)
            + bias(params, env).reshape(shape),)
  return run


def _concat(b: Builder, node: Node) -> Run:
  if "axis" not in node.attrs:
    b.fail(node, "axis is required")
  axis = node.attrs["axis"]
  parts = [b.input(node, i) for i in range(len(node.inputs))]
  return lambda params, env: (jnp.concatenate([p(params, env) for p in parts], axis=axis),)


def _transpose(b: Builder, node: Node) -> Run:
  perm = node.attrs.get("perm")
  x = b.input(node, 0)
  return lambda params, env: (jnp.transpose(x(params, env), perm),)


def _axes(b: Builder, node: Node) -> tuple[int, ...] | None:
  if b.opset < 13:
    axes = node.attrs.get("axes")
  else:
    axes = b.static(node, 1, "axes") if b.has_input(node, 1) else None
  return None if axes is None else tuple(int(a) for a in np.asarray(axes).reshape(-1))


def _squeeze(b: Builder, node: Node) -> Run:
  axes = _axes(b, node)
  x = b.input(node, 0)
  return lambda params, env: (jnp.squeeze(x(params, env), axis=axes),)


def _unsqueeze(b: Builder, node: Node) -> Run:
  axes = _axes(b, node)
  if axes is None:
    b.fail(node, "axes are required")
  x = b.input(node, 0)
  return lambda params, env: (jnp.expand_dims(x(params, env), axes),)


_identity = _elementwise(lambda v: v)

RULES: dict[str, Callable[[Builder, Node], Run]] = {
    "Add": _add,
    "AveragePool": _average_pool,
    "BatchNormalization": _batch_norm,
    "Ceil": _elementwise(jnp.ceil),
    "Clip": _clip,
    "Concat": _concat,
    "Conv": _conv,
    "Div": _binary(jnp.divide),
    "Dropout": _identity,  # inference: the identity (a used mask output is refused by the loader)
    "Flatten": _flatten,
    "Floor": _elementwise(jnp.floor),
    "Gemm": _gemm,
    "GlobalAveragePool": _global_pool(jnp.mean),
    "GlobalMaxPool": _global_pool(jnp.max),
    "Identity": _identity,
    "LeakyRelu": _leaky_relu,
    "LogSoftmax": _normalised(jax.nn.log_softmax),
    "MatMul": _matmul,
    "Max": _variadic(jnp.maximum),
    "MaxPool": _max_pool,
    "Min": _variadic(jnp.minimum),
    "Mul": _binary(jnp.multiply),
    "Relu": _elementwise(jax.nn.relu),
    "Reshape": _reshape,
    "Round": _elementwise(jnp.round),  # both round halves to even
    "Sigmoid": _elementwise(jax.nn.sigmoid),
    "Softmax": _normalised(jax.nn.softmax),
    "Squeeze": _squeeze,
    "Sub": _binary(jnp.subtract),
    "Tanh": _elementwise(jnp.tanh),
    "Transpose": _transpose,
    "Unsqueeze": _unsqueeze,
}
"""ONNX op type -> rule. ``Constant`` is not here: the loader folds it into the constants."""
