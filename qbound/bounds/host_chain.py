"""A merged network read as a paired chain of dense layers, ReLUs and f_q's own steps, in float64.

:mod:`qbound.bounds.host_bab` searches such chains in NumPy (:class:`~qbound.bounds.host_bounds.Chain`):
:func:`chain_of` reads one off a :class:`~qbound.merge.MergedNetwork` (or says it is none), the
weights of each dense layer as a matrix read off its node (:func:`dense_matrix`: no JAX, which
would compile on a first call), nodes that only reshape skipped, an input normalisation f and f_q
share as the chain's ``prefix`` (:func:`map_box` maps a box through it, rounded outward), and
:func:`input_rounding` reads f_q's rounding of its input (if it rounds it first), whose cells over a
box :func:`input_grid_cells` counts and on whose ties :func:`aligned_splits` splits pieces.

Example:
  >>> import functools, jax, jax.numpy as jnp, qbound as qb
  >>> from qbound.bounds.host_chain import chain_of
  >>> def mlp(p, x):
  ...   return jax.nn.relu(x @ p[0]) @ p[1]
  >>> p = (jnp.ones((2, 3)), jnp.ones((3, 1)))
  >>> box = qb.Box(-jnp.ones(2), jnp.ones(2))
  >>> chain = chain_of(qb.merge(functools.partial(mlp, p), functools.partial(mlp, qb.quantize.uniform(p, bits=4)), box))
  >>> [layer[0] for layer in chain.layers], chain.n_in, chain.n_out
  (['affine', 'relu', 'affine'], 2, 1)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from qbound import dynamic_rounding
from qbound import graph as G
from qbound.bounds.host_bounds import Chain, prefix_step
from qbound.bounds.host_float import down, up
from qbound.bounds.host_steps import ROUND_ERRORS

# Nets of at most this many ReLUs (f's and f_q's together) and inputs of at most this many entries
# (as certify's MILP and LOW_DIMENSIONAL_INPUTS): above, a batch's NumPy work grows past what the
# compiled steps cost, and input splitting needs far more pieces.
MAX_NEURONS = 128
MAX_INPUTS = 8


def dense_matrix(node: G.Node) -> Optional[np.ndarray]:
  """A linear layer's ``(n_out, n_in)`` matrix read off its weights, or None for other linear maps:
  ``x @ W``, ``W @ x`` (also on an input with leading axes of length 1, as ``model.apply(params,
  x[None])`` traces), ``x * c`` and ``x / c`` by a constant entry by entry (a quantizer's scale), and
  a product rescaled entry by entry by constant factors (:class:`~qbound.trace.scaled.ScaledOp`:
  AQT's ``(x @ W_int) * s``, qwix's ``(q @ W_int) * s_a * s_w``), the factors folded into the rows.
  NumPy only: the generic path applies the map to a basis with JAX, whose eager operations compile
  one by one (2.4 s on a first call of a 5-12-8-8-2 pair).

  The folds are computed in float64: a float32 times a float32 is exact, a second factor or a
  division rounds each entry by at most 2^-53 of itself, which the bounds' slack covers (every layer
  widens its forms by ``host_bounds.RELATIVE_SLACK``, 1e-10, of the magnitude of every product).
  """
  op, weights, factors = node.op, node.weights, ()
  if op is None:  # x + b alone (a quantizer's zero point or shift)
    return np.eye(node.size)
  if getattr(op, "factors", None) is not None:
    factors = tuple(zip(op.factors, weights[len(weights) - len(op.factors):]))
    op, weights = op.base, weights[:len(weights) - len(op.factors)]
  name = getattr(op, "name", None)
  if name in ("mul", "div") and len(weights) == 1 and not factors and tuple(op.in_shape) == tuple(node.shape):
    if name == "div" and op.var_pos != 0:  # c / x is not linear
      return None
    c = np.broadcast_to(np.asarray(weights[0], np.float64), node.shape).reshape(-1)
    if not np.all(np.isfinite(c)) or (name == "div" and not np.all(c)):
      return None
    return np.diag(1.0 / c if name == "div" else c)
  if name != "dot_general" or len(weights) != 1:
    return None
  in_shape = tuple(op.in_shape)
  if len(in_shape) < 1 or any(n != 1 for n in in_shape[:-1]):
    return None
  last = len(in_shape) - 1
  w = np.asarray(weights[0], np.float64)
  numbers = dict(op.params).get("dimension_numbers")
  if w.ndim != 2 or node.size != w.shape[1 - op.var_pos] or node.shape[-1] != node.size:
    return None
  if op.var_pos == 0 and numbers == (((last,), (0,)), ((), ())):
    matrix = w.T
  elif op.var_pos == 1 and last == 0 and numbers == (((1,), (0,)), ((), ())):
    matrix = w
  else:
    return None
  for kind, c in factors:
    if np.size(c) != node.size:
      return None
    c = np.asarray(c, np.float64).reshape(-1, 1)
    if not np.all(np.isfinite(c)) or (kind == "div" and not np.all(c)):
      return None
    matrix = matrix * c if kind == "mul" else matrix / c
  return matrix


_RESHAPES = ("reshape", "squeeze", "expand_dims")


def moves_nothing(node: G.Node) -> bool:
  """Whether an affine node only reshapes: it keeps every entry, in row-major order (``x[None]``,
  a squeeze of unit axes), so the chain, on flat vectors, can skip it."""
  op = node.op
  if node.kind != G.AFFINE or node.bias is not None or node.weights or op is None:
    return False
  name = getattr(op, "name", None)
  if int(np.prod(op.in_shape, dtype=np.int64)) != node.size:
    return False
  if name in _RESHAPES:  # (a reshape with ``dimensions`` transposes first; a squeeze's name the axes)
    return name != "reshape" or dict(op.params).get("dimensions") is None
  if name == "broadcast_in_dim":  # only unit axes added: its dimensions keep their order
    dims = tuple(dict(op.params).get("broadcast_dimensions", ()))
    return list(dims) == sorted(dims)
  return False


def clips_nothing(node: G.Node) -> bool:
  """Whether a ``clip`` node clips nothing (its ends infinite: merge's identity beside f_q's clip)."""
  return (len(node.weights) == 2 and bool(np.all(np.asarray(node.weights[0]) == -np.inf))
          and bool(np.all(np.asarray(node.weights[1]) == np.inf)))


def chain_of(merged) -> Optional[Chain]:
  """The merged network as a :class:`Chain`, or None when it is not a small paired chain of dense
  layers (``x @ W + b``, see :func:`dense_matrix`) and ReLUs with few inputs (see ``MAX_NEURONS``,
  ``MAX_INPUTS``); roundings that are identities in both nets, and nodes that only reshape in both
  (:func:`moves_nothing`), are skipped. An input normalisation that f and f_q share exactly (clip,
  shift, divide or multiply entry by entry, as :func:`qbound.io.load_nnet` builds) becomes the
  chain's ``prefix``."""
  if not merged.paired:
    return None
  fg, qg = merged.f_graph, merged.fq_graph
  if len(fg.nodes) != len(qg.nodes) or fg.output != len(fg.nodes) - 1 or qg.output != len(qg.nodes) - 1:
    return None
  n_in = int(np.prod(fg.input_shape))
  if n_in > MAX_INPUTS:
    return None
  prefix, first = _prefix(fg, qg, n_in)
  neurons, kinds = 0, {}
  for i, (a, b) in enumerate(zip(fg.nodes[first:], qg.nodes[first:]), start=first):
    identity = lambda n: n.kind == G.ROUND and n.attrs[0] == "none"  # noqa: E731
    if a.kind != b.kind or a.inputs != (i - 1,) or b.inputs != (i - 1,):
      return None
    if (identity(a) and identity(b)) or (moves_nothing(a) and moves_nothing(b)):
      # (f's identity beside f_q's own rounding, static or dynamic, is not skipped: f_q rounds there.)
      continue
    if a.kind == G.RELU:
      neurons += 2 * a.size
    elif identity(a) and b.kind == G.ROUND and b.attrs[0] in ROUND_ERRORS:
      pass  # f_q rounds with a static scale (the scale is an affine layer of its own), f does not
    elif identity(a) and G.is_dynamic_rounding(b):
      if dynamic_rounding.check_guard(b.attrs[1]) is not None:
        return None  # (the compiled path says why)
    elif a.kind == G.CLIP and clips_nothing(a):
      pass  # f_q clips, f does not
    elif a.kind != G.AFFINE:
      return None
    kinds[i] = a.kind
  order = list(kinds.values())
  dynamic = {i for i in kinds if G.is_dynamic_rounding(qg.nodes[i])}
  if not order or (order[0] != G.AFFINE and min(kinds) not in dynamic) or order[-1] != G.AFFINE:
    # A static rounding of the input itself is left to the input-grid enumeration (qbound.exact.grid),
    # exact where splitting at midpoints would need the pieces to meet the grid's steps; a dynamic
    # one has no grid (its scale moves with the input).
    return None
  if any(k == G.RELU and order[j - 1] != G.AFFINE for j, k in enumerate(order)):
    return None  # (the bounds read each ReLU's input bounds off the affine layer before it)
  if neurons > MAX_NEURONS:
    return None
  fm = {i: dense_matrix(fg.nodes[i]) for i, kind in kinds.items() if kind == G.AFFINE}
  qm = {i: dense_matrix(qg.nodes[i]) for i, kind in kinds.items() if kind == G.AFFINE}
  if any(m is None for m in (*fm.values(), *qm.values())):
    # Other linear maps (convolutions, other scalings) would be read through JAX, compiling on a
    # first call what this search exists to avoid: left to the compiled search.
    return None
  layers = []
  for i, kind in kinds.items():
    if kind == G.RELU:
      layers.append(("relu",))
    elif i in dynamic:
      layers.append(("dynamic", qg.nodes[i].attrs[1], tuple(qg.nodes[i].shape)))
    elif kind == G.ROUND:
      layers.append(("round", qg.nodes[i].attrs[0]))
    elif kind == G.CLIP:
      ends = [np.broadcast_to(np.asarray(w, np.float64), qg.nodes[i].shape).reshape(-1) for w in qg.nodes[i].weights]
      layers.append(("clip", *ends))
    else:
      a, b = fg.nodes[i], qg.nodes[i]
      bias = lambda n: np.zeros(n.size) if n.bias is None else np.broadcast_to(  # noqa: E731
          np.asarray(n.bias, np.float64), n.shape).reshape(-1)
      layers.append(("affine", fm[i], bias(a), qm[i], bias(b)))
  if not any(layer[0] == "affine" for layer in layers):  # the normalisation alone: nothing to search
    return None
  return Chain(tuple(layers), n_in, fg.nodes[-1].size, prefix)


def _prefix(fg: G.Graph, qg: G.Graph, n_in: int):
  """The elementwise maps f and f_q share, identically, before their first dense layer (an input
  normalisation: clip, ``x + b``, ``x / r``, ``x * r``), as :class:`Chain`'s ``prefix``; and the
  index of the first node after them."""
  steps, i = [], 1
  while i < len(fg.nodes):
    a, b = fg.nodes[i], qg.nodes[i]
    if a.inputs != (i - 1,) or b.inputs != (i - 1,) or a.shape != (n_in,) or a.kind != b.kind:
      break
    same = lambda u, v: np.array_equal(np.asarray(u, np.float64), np.asarray(v, np.float64))  # noqa: E731
    vector = lambda v: np.broadcast_to(np.asarray(v, np.float64), (n_in,)).copy()  # noqa: E731
    if a.kind == G.CLIP and len(a.weights) == 2 and all(map(same, a.weights, b.weights)):
      step = [("clip", vector(a.weights[0]), vector(a.weights[1]))]
    elif a.kind == G.AFFINE and a.op is None and b.op is None:
      step = []
    elif (a.kind == G.AFFINE and a.op is not None and a.op == b.op and len(a.weights) == 1
          and getattr(a.op, "name", None) in ("div", "mul") and np.asarray(a.weights[0]).size in (1, n_in)
          and (a.op.name == "mul" or a.op.var_pos == 0) and same(a.weights[0], b.weights[0])
          and np.all(np.asarray(a.weights[0]) != 0)):
      step = [(a.op.name, vector(a.weights[0]))]
    else:
      break
    if a.kind == G.AFFINE:
      if (a.bias is None) != (b.bias is None) or (a.bias is not None and not same(a.bias, b.bias)):
        break
      if a.bias is not None:
        step.append(("shift", vector(a.bias)))
    steps += step
    i += 1
  return tuple(steps), i


def map_box(chain: Chain, lo: np.ndarray, hi: np.ndarray):
  """The box ``[lo, hi]`` (``(k, n_in)``) through ``chain.prefix``, rounded outward: each map acts
  on each entry alone and is monotone, so the image of a box is the box of its corners' images
  (as ReluVal's input intervals, Wang et al., USENIX Security 2018).

  Example:
    >>> import numpy as np
    >>> from qbound.bounds.host_chain import Chain, map_box
    >>> chain = Chain((), n_in=1, n_out=1, prefix=(("shift", np.array([-1.0])), ("div", np.array([-2.0]))))
    >>> lo, hi = map_box(chain, np.array([[0.0]]), np.array([[4.0]]))  # (x - 1) / -2 over [0, 4]
    >>> lo.round(9).tolist(), hi.round(9).tolist(), bool(lo[0, 0] < -1.5 and hi[0, 0] > 0.5)
    ([[-1.5]], [[0.5]], True)
  """
  lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
  for step in chain.prefix:
    a, b = prefix_step(step, lo), prefix_step(step, hi)
    if step[0] == "clip":  # exact, and increasing
      lo, hi = a, b
    else:
      lo, hi = down(np.minimum(a, b)), up(np.maximum(a, b))
  return lo, hi


def _unmap(chain: Chain, ys: np.ndarray, box_lo, box_hi) -> np.ndarray:
  """Inputs in the box whose images under ``chain.prefix`` are (about) ``ys``: the witnesses."""
  xs = np.asarray(ys, np.float64)
  for step in reversed(chain.prefix):
    if step[0] == "shift":
      xs = xs - step[1]
    elif step[0] == "div":
      xs = xs * step[1]
    elif step[0] == "mul":
      xs = xs / step[1]
  # A clipped entry pinned at a clip's end is reached by the box's end beyond it.
  return np.clip(xs, box_lo, box_hi)


class InputRounding(NamedTuple):
  """f_q's rounding of its input, entry by entry (see :func:`input_rounding`): ``q = scale * x +
  offset``, clipped to ``[clip_lo, clip_hi]``, rounded by ``mode``."""

  scale: np.ndarray
  offset: np.ndarray
  clip_lo: np.ndarray
  clip_hi: np.ndarray
  mode: str


def input_rounding(chain: Chain) -> Optional[InputRounding]:
  """Where f_q rounds its input (after scalings entry by entry and clips, before any dense layer
  mixes the entries), the map from the chain's input to the values it rounds; else None.

  Example:
    >>> import numpy as np
    >>> from qbound.bounds.host_chain import Chain, input_rounding
    >>> eye, w = np.eye(2), np.ones((1, 2))
    >>> chain = Chain((("affine", eye, np.zeros(2), 4 * eye, np.ones(2)), ("round", "nearest"),
    ...                ("affine", w, np.zeros(1), w, np.zeros(1))), n_in=2, n_out=1)
    >>> r = input_rounding(chain)
    >>> r.scale.tolist(), r.offset.tolist(), r.mode
    ([4.0, 4.0], [1.0, 1.0], 'nearest')
  """
  n = chain.n_in
  scale, offset = np.ones(n), np.zeros(n)
  clip_lo, clip_hi = np.full(n, -np.inf), np.full(n, np.inf)
  for layer in chain.layers:
    if layer[0] == "affine":
      wq, bq = layer[3], layer[4]
      if wq.shape[0] != wq.shape[1] or np.count_nonzero(wq - np.diag(np.diag(wq))):
        return None  # a dense layer first: no grid on the input
      a = np.diag(wq)
      # clip(v, lo, hi) then a v + b: the clip moves to the new values (its ends mapped, in order).
      ends = np.stack([a * clip_lo + bq, a * clip_hi + bq])
      with np.errstate(invalid="ignore"):  # (inf * 0: a zero scale makes the entry constant)
        ends = np.where(np.isnan(ends), bq, ends)
      clip_lo, clip_hi = ends.min(axis=0), ends.max(axis=0)
      scale, offset = a * scale, a * offset + bq
    elif layer[0] == "clip":
      clip_lo, clip_hi = np.maximum(clip_lo, layer[1]), np.minimum(clip_hi, layer[2])
    elif layer[0] == "round":
      return InputRounding(scale, offset, clip_lo, clip_hi, layer[1])
    else:
      return None
  return None


def input_grid_cells(chain: Chain, lower, upper) -> Optional[float]:
  """At most how many cells the input grid of f_q has over the box ``[lower, upper]``, when f_q
  rounds its input (:func:`input_rounding`), else None: the cells :mod:`qbound.exact.grid`
  enumerates, each input's count of rounding steps over its range, multiplied.

  Example:
    >>> import numpy as np
    >>> from qbound.bounds.host_chain import Chain, input_grid_cells
    >>> eye, w = np.eye(2), np.ones((1, 2))
    >>> chain = Chain((("affine", eye, np.zeros(2), 4 * eye, np.zeros(2)), ("round", "nearest"),
    ...                ("affine", w, np.zeros(1), w, np.zeros(1))), n_in=2, n_out=1)
    >>> input_grid_cells(chain, -np.ones(2), np.ones(2))  # 4x over [-1, 1]: 9 steps (at most 10) each
    100.0
  """
  rounding = input_rounding(chain)
  if rounding is None:
    return None
  lo, hi = map_box(chain, np.asarray(lower, np.float64).reshape(1, -1), np.asarray(upper, np.float64).reshape(1, -1))
  a = np.stack([rounding.scale * lo[0] + rounding.offset, rounding.scale * hi[0] + rounding.offset])
  lo, hi = np.clip(a.min(axis=0), rounding.clip_lo, rounding.clip_hi), np.clip(a.max(axis=0), rounding.clip_lo,
                                                                               rounding.clip_hi)
  return float(np.prod(np.floor(hi) - np.ceil(lo) + 2.0))


# A split on f_q's input grid (aligned_splits) overlaps its two halves by this much of the rounded
# value, relative, on each side of the tie: within it float arithmetic may round either way (float32's
# product and sum err by about 1.2e-7 of the magnitudes, the bounds' own slack is 1e-10).
TIE_MARGIN = 1e-6


class AlignedSplit(NamedTuple):
  """Per piece, a split on one input's rounding tie (:func:`aligned_splits`): the lower half ends
  at ``lower_hi``, the upper half starts at ``upper_lo`` (the halves overlap around the tie); where
  ``usable``, the lower half's rounded values are at most / at least (``lower_caps``: at most)
  ``lower_value``, the upper half's the other way from ``upper_value``."""

  lower_hi: np.ndarray
  upper_lo: np.ndarray
  usable: np.ndarray
  lower_caps: np.ndarray
  lower_value: np.ndarray
  upper_value: np.ndarray

  def halves(self, lo, hi, v_lo, v_hi, axes):
    """The two halves of the pieces ``[lo, hi]`` with cases ``[v_lo, v_hi]`` (rows), split along
    ``axes``: ``((lo, hi, v_lo, v_hi) of the lower halves, the same of the upper halves)``."""
    rows = np.arange(len(axes))
    out = []
    for lower in (True, False):
      h_lo, h_hi, c_lo, c_hi = lo.copy(), hi.copy(), v_lo.copy(), v_hi.copy()
      if lower:
        h_hi[rows, axes] = self.lower_hi
      else:
        h_lo[rows, axes] = self.upper_lo
      value = self.lower_value if lower else self.upper_value
      caps = self.lower_caps if lower else ~self.lower_caps
      c_hi[rows, axes] = np.where(self.usable & caps, np.minimum(c_hi[rows, axes], value), c_hi[rows, axes])
      c_lo[rows, axes] = np.where(self.usable & ~caps, np.maximum(c_lo[rows, axes], value), c_lo[rows, axes])
      out.append((h_lo, h_hi, c_lo, c_hi))
    return tuple(out)


def aligned_splits(rounding: InputRounding, lo, hi, axes, mid) -> AlignedSplit:
  """Splits of the pieces (rows of ``lo``, ``hi``) along ``axes`` on the tie of f_q's input
  rounding nearest ``mid``, where one lies inside the piece (else at ``mid``, not ``usable``).

  Midpoint splits meet the rounding's ties only in the limit: every piece crossing a tie keeps the
  rounding's whole band, and the roundings of f_q's hidden layers theirs. A split on a tie is a case
  split: the lower half (up to just past the tie) takes the inputs whose rounded value is the one
  below the tie, the upper half (from just before it) those rounding to the one above; an input
  within ``TIE_MARGIN`` of the tie, where float arithmetic may round either way, lies in both. The
  bounds of a half then hold for its inputs of its case (:func:`qbound.bounds.host_bounds.bound_pieces`'s
  ``values``); a piece inside one step of every input is exact in f_q: f_q is constant on it.

  Example:
    >>> import numpy as np
    >>> from qbound.bounds.host_chain import InputRounding, aligned_splits
    >>> grid = InputRounding(np.array([4.0]), np.zeros(1), np.full(1, -np.inf), np.full(1, np.inf), "nearest")
    >>> cut = aligned_splits(grid, np.array([[0.0]]), np.array([[1.0]]), np.array([0]), np.array([0.5]))
    >>> # 4 x = 2.5 is the tie nearest the middle: below it x rounds to 2, above it to 3
    >>> bool(cut.usable[0]), cut.lower_value.tolist(), cut.upper_value.tolist()
    (True, [2.0], [3.0])
    >>> bool(cut.upper_lo[0] < 0.625 < cut.lower_hi[0] < 0.625 + 1e-5)
    True
  """
  rows = np.arange(len(axes))
  a, b = rounding.scale[axes], rounding.offset[axes]
  l, h = lo[rows, axes], hi[rows, axes]
  # Ties: v.5 for rounding to nearest (below them v, above v + 1); integers j for floor (j - 1, j)
  # and ceil (j, j + 1).
  shift = {"nearest": 0.5, "away": 0.5, "floor": 0.0, "ceil": 0.0}[rounding.mode]
  below_value = {"nearest": -0.5, "away": -0.5, "floor": -1.0, "ceil": 0.0}[rounding.mode]
  tie = np.round(a * mid + b - shift) + shift
  # Only ties strictly inside the clip: at its ends the clipped value does not jump.
  first = np.floor(rounding.clip_lo[axes] - shift) + 1.0 + shift
  last = np.ceil(rounding.clip_hi[axes] - shift) - 1.0 + shift
  tie = np.clip(tie, first, last)
  margin = TIE_MARGIN * (1.0 + np.abs(tie) + np.abs(b))
  with np.errstate(divide="ignore", invalid="ignore"):
    x_minus, x_plus = (tie - margin - b) / a, (tie + margin - b) / a
  before, after = np.minimum(x_minus, x_plus), np.maximum(x_minus, x_plus)
  usable = (a != 0) & np.isfinite(before) & np.isfinite(after) & (before > l) & (after < h) & (first <= last)
  value_below, value_above = tie + below_value, tie + below_value + 1.0
  increasing = a > 0  # the lower half of x holds the values below the tie
  return AlignedSplit(lower_hi=np.where(usable, after, mid), upper_lo=np.where(usable, before, mid), usable=usable,
                      lower_caps=increasing, lower_value=np.where(increasing, value_below, value_above),
                      upper_value=np.where(increasing, value_above, value_below))
