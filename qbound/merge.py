"""The merged difference network ``g(x) = f(x) - f_q(x)``.

Both networks read the same input; their hidden layers run side by side (for dense layers: one
layer with the block-diagonal weight ``[[W, 0], [0, W_q]]`` acting on ``[z; z_q]``, the first one
``[W, W_q]`` acting on ``x``), and a final layer ``[I, -I]`` subtracts the outputs. Any bound on
``g`` bounds the error of the compressed network. This is the construction of Cooke, Mo, Xiang,
"Guaranteed Quantization Error Computation for Neural Network Model Compression", 2023 (and the
"merged network" alpha-beta-CROWN is run on in the differential verification literature).

In qbound the merged network is a :class:`~qbound.graph.Graph` whose nodes are f's nodes, then
f_q's (reading the same input node), then one ``add`` node with signs ``(+1, -1)``; this is the
block-diagonal network written sparsely. :meth:`MergedNetwork.dense_layers` writes it out as
explicit matrices for dense nets, and :attr:`MergedNetwork.layers` pairs f's nodes with f_q's when
the two have the same structure (what the differential bounds need).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound import validate
from qbound._recent import Recent
from qbound.box import Box, validate_box
from qbound.trace import trace
from qbound.trace.scaled import ScaledOp, fuse_scales, scaled_like


class PairedLayer(NamedTuple):
  """One layer of f and the corresponding layer of f_q (indices into the merged graph)."""

  kind: str
  shape: tuple[int, ...]
  f_node: int
  fq_node: int


def _offset(node: G.Node, shift: int) -> G.Node:
  return dataclasses.replace(node, inputs=tuple(0 if i == 0 else i + shift for i in node.inputs))


def same_structure(a: G.Graph, b: G.Graph) -> bool:
  """Whether two graphs have the same layers in the same order (weights may differ)."""
  if len(a.nodes) != len(b.nodes) or a.output != b.output:
    return False
  for na, nb in zip(a.nodes, b.nodes):
    if (na.kind, na.inputs, na.shape, na.op) != (nb.kind, nb.inputs, nb.shape, nb.op):
      return False
    if na.attrs != nb.attrs and na.kind != G.ROUND:  # a rounding may face another rounding mode
      return False
    if (na.bias is None) != (nb.bias is None) or len(na.weights) != len(nb.weights):
      return False
    if any(np.shape(wa) != np.shape(wb) for wa, wb in zip(na.weights, nb.weights)):
      return False
  return True


def _identity_beside(node: G.Node, src: int) -> Optional[G.Node]:
  """An identity node of the same structure as ``node`` (a step f_q has and f lacks), or None."""
  if len(node.inputs) != 1:
    return None
  base = dict(inputs=(src,), where="identity beside f_q's " + (node.where or node.kind))
  if node.kind == G.ROUND:
    return dataclasses.replace(node, attrs=("none",), **base)
  if node.kind == G.CLIP:
    lo = jnp.full(node.shape, -jnp.inf, jnp.result_type(node.weights[0]))
    return dataclasses.replace(node, weights=(lo, -lo), **base)
  if _is_routing(node):  # f_q reshapes on the way (qwix's tiles): f moves its entries alike and back
    return dataclasses.replace(node, **base)
  if node.kind == G.AFFINE and (node.op is None or (node.op.name in ("mul", "div") and node.op.in_shape == node.shape)):
    # The same scaling as f_q's, so both networks' values stay in the same units, but no shift:
    # f_q's shifts (the +1/2 of floor(x s + 1/2), zero points) are part of its quantization, and
    # copying them would leave f's chain off the identity by them. The chain of such steps must
    # compose to the identity, which _is_identity_chain proves.
    bias = None if node.bias is None else jnp.zeros_like(node.bias)
    return dataclasses.replace(node, bias=bias, **base)
  return None


_ROUTING = ("reshape", "transpose", "squeeze", "expand_dims")


def _is_routing(node: G.Node) -> bool:
  """A node that only moves its input's entries (a reshape or transpose, nothing added)."""
  return (node.kind == G.AFFINE and node.op is not None and node.op.name in _ROUTING and not node.weights
          and node.bias is None)


def _chain_map(chain: list[G.Node]) -> Optional[tuple[list, list]]:
  """The per-entry ``(scale, shift)`` that elementwise steps (scalings, shifts, identity roundings
  and clips, and reshapes that move the entries back where they were) compose to, in rational
  arithmetic on the float values; None if one divides by 0 or the entries end up moved."""
  from fractions import Fraction

  affine = [n for n in chain if n.kind == G.AFFINE]
  if not affine:
    return [Fraction(1)], [Fraction(0)]
  size = affine[0].size
  scales = [Fraction(1)] * size
  shifts = [Fraction(0)] * size
  where = np.arange(size)  # the chain's input entry each entry holds now
  for node in affine:
    if _is_routing(node):
      src = np.asarray(node.op.apply((), jnp.arange(size, dtype=jnp.int32).reshape(node.op.in_shape))).reshape(-1)
      if src.size != size:
        return None
      where, scales, shifts = where[src], [scales[e] for e in src], [shifts[e] for e in src]
      continue
    if node.op is not None:
      c = np.asarray(node.weights[0], np.float64).reshape(-1)
      for e in range(size):
        f = Fraction(float(c[e]))
        if node.op.name == "mul":
          scales[e], shifts[e] = scales[e] * f, shifts[e] * f
        elif f == 0:
          return None
        else:
          scales[e], shifts[e] = scales[e] / f, shifts[e] / f
    if node.bias is not None:
      b = np.asarray(node.bias, np.float64).reshape(-1)
      shifts = [sh + Fraction(float(b[e])) for e, sh in enumerate(shifts)]
  if not np.array_equal(where, np.arange(size)):
    return None
  return scales, shifts


def _is_identity_chain(chain: list[G.Node]) -> bool:
  """Whether elementwise steps (scalings, shifts, identity roundings and clips) compose to the
  identity exactly, checked in rational arithmetic on the float values."""
  mapped = _chain_map(chain)
  return mapped is not None and all(a == 1 for a in mapped[0]) and all(b == 0 for b in mapped[1])


def _undo_factors(op: ScaledOp, chain: list[G.Node], dtype) -> Optional[list]:
  """Factors for f's copy of ``op`` that undo the inserted chain before it, exactly, or None.

  f_q quantizes a product's input as ``x / s`` and rescales the product by ``s`` afterwards; f,
  given the identity steps beside f_q's (the same ``/ s``), needs its product scaled by ``s`` too:
  ``(x / s) @ W * s = x @ W`` in real arithmetic, for a scalar ``s`` (it commutes with the product).
  The chain must compose to one uniform scaling ``c`` without shift, and one of ``op``'s factors
  must carry ``1 / c`` exactly as a float (a ``mul`` by ``1 / c`` or a ``div`` by ``c``).
  """
  from fractions import Fraction

  mapped = _chain_map(chain)
  if mapped is None or any(b != 0 for b in mapped[1]) or len(set(mapped[0])) != 1:
    return None
  c = mapped[0][0]
  values = [1.0] * len(op.factors)
  if c == 1:
    return values
  for k, kind in enumerate(op.factors):
    target = 1 / c if kind == "mul" else c
    value = np.asarray(float(target), dtype)
    if Fraction(float(value)) == target:
      values[k] = value
      return values
  return None


def align(f_graph: G.Graph, fq_graph: G.Graph) -> Optional[G.Graph]:
  """f's graph with identity steps inserted where f_q has extra elementwise steps.

  Activation quantization turns ``relu(z)`` into ``clip(round(relu(z) / s), lo, hi) * s``: f_q has
  a scaling, a rounding, a clipping and a scaling that f lacks. Inserting their identities into f
  (multiply by 1, round "none", clip at +-inf) gives two graphs of the same structure computing
  the same functions, so the differential bounds apply. Where f_q's product is rescaled after an
  integer product (a :class:`~qbound.trace.scaled.ScaledOp`, from :func:`fuse_scales`), f's product
  becomes the same op with factors that undo the scalings inserted before it (``(x / s) @ W * s``,
  checked exact in rational arithmetic). Returns None when no such alignment exists.
  """
  fn, qn = f_graph.nodes, fq_graph.nodes
  new: list[G.Node] = [fn[0]]
  from_f = {0: 0}  # f's original index -> index in ``new``
  from_q = {0: 0}  # f_q's index -> index in ``new``
  through: dict[int, int] = {}  # inserted identity -> the node it passes on

  def resolve(idx: int) -> int:
    while idx in through:
      idx = through[idx]
    return idx

  def chain_before(idx: int) -> list[G.Node]:
    chain = []
    while idx in through:
      chain.append(new[idx])
      idx = through[idx]
    return chain[::-1]

  undone: set[tuple[int, int]] = set()  # (reader, chain head) pairs whose scaling the reader undoes
  i = 1
  for k in range(1, len(qn)):
    q = qn[k]
    inputs = tuple(from_q[j] for j in q.inputs)
    if i < len(fn):
      cand = fn[i]
      undid = False
      if isinstance(q.op, ScaledOp) and cand.kind == G.AFFINE and cand.op == q.op.base and len(inputs) == 1:
        # f's plain product beside f_q's rescaled one (qbound.trace.scaled): the same kind of op,
        # with factors undoing the identity scalings inserted before it (1 where there are none).
        values = _undo_factors(q.op, chain_before(inputs[0]), cand.op.dtype)
        if values is not None:
          cand, undid = scaled_like(cand, q.op, values), True
      same = (cand.kind, cand.shape, cand.op, cand.attrs, cand.bias is None, len(cand.weights)) == \
             (q.kind, q.shape, q.op, q.attrs, q.bias is None, len(q.weights))
      if same and len(cand.inputs) == len(inputs) and all(
          resolve(a) == from_f[b] for a, b in zip(inputs, cand.inputs)):
        if undid:
          undone.add((len(new), inputs[0]))
        new.append(dataclasses.replace(cand, inputs=inputs))
        from_f[i] = from_q[k] = len(new) - 1
        i += 1
        continue
    ident = _identity_beside(q, inputs[0]) if inputs else None
    if ident is None:
      return None
    new.append(ident)
    from_q[k] = len(new) - 1
    through[len(new) - 1] = inputs[0]
  out = from_q[fq_graph.output]
  if i != len(fn) or resolve(out) != from_f[f_graph.output]:
    return None
  # Every chain of inserted steps, as read by a real node or the output, must be the identity.
  # (A product with factors undoing its chain was checked when it was built.)
  readers = [inp for idx, n in enumerate(new) if idx not in through for inp in n.inputs
             if (idx, inp) not in undone] + [out]
  for idx in set(readers):
    if not _is_identity_chain(chain_before(idx)):
      return None
  return G.Graph(nodes=tuple(new), output=out)


@dataclasses.dataclass(frozen=True)
class MergedNetwork:
  """``g(x) = f(x) - f_q(x)`` as one explicit network. Callable on one unbatched input.

  Attributes:
    graph: the merged graph (f's nodes, f_q's nodes, the final ``[I, -I]`` node).
    f_graph: the traced f.
    fq_graph: the traced f_q.
    fq_offset: f_q's node ``i > 0`` is node ``i + fq_offset`` of ``graph``.
  """

  graph: G.Graph
  f_graph: G.Graph
  fq_graph: G.Graph
  fq_offset: int

  def __call__(self, x):
    return self.graph(x)

  @property
  def input_shape(self):
    return self.graph.input_shape

  @property
  def output_shape(self):
    return self.graph.output_shape

  @property
  def paired(self) -> bool:
    """Whether f and f_q have the same layer structure."""
    return same_structure(self.f_graph, self.fq_graph)

  @property
  def layers(self) -> tuple[PairedLayer, ...]:
    """f's layers beside f_q's (raises ``ValueError`` if their structures differ)."""
    if not self.paired:
      raise ValueError("f and f_q have different layer structures, so their layers cannot be paired; "
                       "the merged graph still works for interval, CROWN and sampling.")
    return tuple(PairedLayer(n.kind, n.shape, i, i + self.fq_offset if i else 0)
                 for i, n in enumerate(self.f_graph.nodes))

  def dense_layers(self) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """The merged network as explicit dense layers ``(W, b, activation)`` with ``y = act(x @ W + b)``.

    Hidden layers are block-diagonal ``[[W, 0], [0, W_q]]`` (the first is ``[W, W_q]``) and the last
    layer is ``[I; -I]``: f's and f_q's final affine layers side by side, then the subtraction. Only
    for chains of affine layers and ReLUs (MLPs); inputs and outputs are flattened.
    """
    layers_f, layers_q = _dense_chain(self.f_graph), _dense_chain(self.fq_graph)
    if [a for _, _, a in layers_f] != [a for _, _, a in layers_q]:
      raise ValueError("f and f_q have different layer sequences; cannot write block-diagonal layers.")
    out = []
    for k, ((w, b, act), (wq, bq, _)) in enumerate(zip(layers_f, layers_q)):
      if k == 0:
        merged_w = np.concatenate([w, wq], axis=1)
      else:
        merged_w = np.block([[w, np.zeros((w.shape[0], wq.shape[1]), w.dtype)],
                             [np.zeros((wq.shape[0], w.shape[1]), w.dtype), wq]])
      out.append((merged_w, np.concatenate([b, bq]), act))
    n_out = layers_f[-1][0].shape[1]
    eye = np.eye(n_out, dtype=layers_f[-1][0].dtype)
    out.append((np.concatenate([eye, -eye], axis=0), np.zeros(n_out, eye.dtype), "linear"))
    return out

  def summary(self) -> str:
    head = f"MergedNetwork: {self.input_shape} -> {self.output_shape}, {len(self.graph.nodes)} nodes"
    if not self.paired:
      return head + " (f and f_q structures differ)\n" + self.graph.summary()
    lines = [head]
    for layer in self.layers[1:]:
      lines.append(f"  {layer.kind:<7} shape={layer.shape!s:<14} f: node {layer.f_node:<4} f_q: node {layer.fq_node}")
    lines.append(f"  add     shape={self.output_shape!s:<14} [I, -I]: node {self.graph.output}")
    return "\n".join(lines)


def _dense_chain(graph: G.Graph) -> list[tuple[np.ndarray, np.ndarray, str]]:
  """A chain graph as dense layers ``(W, b, activation)``; composes consecutive affine nodes."""
  layers: list = []
  w = b = None
  prev = 0
  for idx, node in enumerate(graph.nodes[1:], start=1):
    if node.inputs != (prev,):
      raise ValueError(f"node {idx} ({node.kind}) is not part of a simple chain; dense_layers() needs an MLP.")
    if node.kind == G.AFFINE:
      src_shape = graph.nodes[prev].shape
      n_in = int(np.prod(src_shape))
      eye = jnp.eye(n_in, dtype=jnp.float32).reshape((n_in, *src_shape))
      mat = np.asarray(jax.vmap(node.linear)(eye)).reshape(n_in, -1)
      bias = np.zeros(mat.shape[1], mat.dtype) if node.bias is None else np.asarray(node.bias).reshape(-1)
      if w is None:
        w, b = mat, bias
      else:
        w, b = w @ mat, b @ mat + bias
    elif node.kind == G.RELU:
      if w is None:
        raise ValueError("dense_layers() needs an affine layer before every ReLU.")
      layers.append((w, b, "relu"))
      w = b = None
    else:
      raise ValueError(f"dense_layers() supports affine and relu nodes, not {node.kind!r}.")
    prev = idx
  if w is None:
    raise ValueError("dense_layers() needs the network to end with an affine layer.")
  layers.append((w, b, "linear"))
  return layers


def check_networks(f: Any, fq: Any) -> None:
  """``f`` and ``fq`` two functions, or ``f`` a :class:`~qbound.merge.MergedNetwork` and ``fq`` None."""
  if isinstance(f, MergedNetwork):
    if fq is not None:
      raise ValueError("pass either a MergedNetwork with fq=None, or two functions f and fq.")
    return
  validate.function("f", f)
  if fq is None:
    raise TypeError("fq is None: pass the compressed network fq as well (or a qbound.MergedNetwork as f, "
                    "from qbound.merge(f, fq, box)).")
  validate.function("fq", fq)


def check_example(name: str, value: Any) -> None:
  """An input fixing the shape and dtype: an array of numbers, a ``jax.ShapeDtypeStruct`` or a Box."""
  if isinstance(value, Box):
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in (value.lower, value.upper)):
      validate_box(value, name=name)  # (an empty or NaN box would only fail later, where it is used)
    return
  if isinstance(value, jax.ShapeDtypeStruct):
    return
  accepted = "an input (an array of numbers), a jax.ShapeDtypeStruct or a qbound.Box fixing the input shape"
  if value is None or isinstance(value, (str, bytes)):
    raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {validate.shown(value)}.")
  dtype = validate.dtype_of(value)
  if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer) or jax.dtypes.issubdtype(
      dtype, jax.numpy.floating)):
    raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} of dtype {dtype}.")


def merge_graphs(f_graph: G.Graph, fq_graph: G.Graph) -> MergedNetwork:
  """Merges two traced graphs with the same input shape into ``g = f - f_q``."""
  if f_graph.input_shape != fq_graph.input_shape:
    raise ValueError(f"f takes inputs of shape {f_graph.input_shape} but f_q takes {fq_graph.input_shape}.")
  if f_graph.output_shape != fq_graph.output_shape:
    raise ValueError(f"f returns shape {f_graph.output_shape} but f_q returns {fq_graph.output_shape}; "
                     "the error f - f_q needs outputs of the same shape.")
  if not same_structure(f_graph, fq_graph):
    aligned = align(f_graph, fq_graph)
    if aligned is not None and same_structure(aligned, fq_graph):
      f_graph = aligned
    else:
      # Libraries that rescale after an integer product (AQT, qwix's static activation scales):
      # keep the scales beside the products (exactly, qbound.trace.scaled) and pair again.
      fused = fuse_scales(fq_graph)
      aligned = align(f_graph, fused) if fused is not fq_graph else None
      if aligned is not None and same_structure(aligned, fused):
        f_graph, fq_graph = aligned, fused
  shift = len(f_graph.nodes) - 1
  nodes = list(f_graph.nodes) + [_offset(n, shift) for n in fq_graph.nodes[1:]]
  fq_out = fq_graph.output + shift if fq_graph.output else 0
  nodes.append(G.Node(kind=G.ADD, inputs=(f_graph.output, fq_out), shape=f_graph.output_shape,
                      attrs=(1, -1), where="f - f_q"))
  graph = G.Graph(nodes=tuple(nodes), output=len(nodes) - 1)
  return MergedNetwork(graph=graph, f_graph=f_graph, fq_graph=fq_graph, fq_offset=shift)


def merge(f: Callable, fq: Callable, example) -> MergedNetwork:
  """The merged difference network ``g(x) = f(x) - fq(x)``.

  Args:
    f: the original network, a pure function of one unbatched input (or a traced Graph).
    fq: the compressed network, same input and output shapes.
    example: an input, a ``jax.ShapeDtypeStruct`` or a :class:`~qbound.box.Box` fixing the input shape.

  Returns:
    A :class:`MergedNetwork`; ``merged(x) == f(x) - fq(x)`` up to float rounding.

  Raises:
    TypeError: ``f`` or ``fq`` not callable, or ``example`` not an input, shape or box.
    ValueError: f and fq that cannot be traced on such an input, or with non-finite parameters.
    UnsupportedPrimitiveError: an operation qbound cannot bound (the message names it).

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> qparams = qb.quantize.uniform(params, bits=4)
    >>> g = qb.merge(functools.partial(model.apply, params), functools.partial(model.apply, qparams), jnp.zeros(3))
    >>> [w.shape for w, _, _ in g.dense_layers()]
    [(3, 16), (16, 4), (4, 2)]
  """
  validate.function("f", f)
  validate.function("fq", fq)
  check_example("example", example)
  f_graph = trace(f, example, label="f")
  fq_graph = trace(fq, example, label="fq")
  key, pair = (id(f_graph), id(fq_graph)), (f_graph, fq_graph)
  merged = _merged.get(key, pair)
  if merged is None:
    G.check_finite(f_graph, label="f")
    G.check_finite(fq_graph, label="fq")
    merged = merge_graphs(f_graph, fq_graph)
    _merged.put(key, merged, pair)
  return merged


# The last merges, by their traced graphs (which qbound.trace keeps for functions traced again): a
# certify call in a loop then gets the same merged network, and what is kept per graph object
# (float64 copies, the programs' keys, the weights' comparison) is found again.
_merged = Recent(size=4)
