"""Linear lower and upper bounds of a piecewise-linear network over many small boxes, in float64.

Forward symbolic intervals (Wang, Pei, Whitehouse, Yang, Jana, "Formal Security Analysis of Neural
Networks using Symbolic Intervals", USENIX Security 2018; the ReLU lines of DeepPoly, Singh et al.,
POPL 2019): every node carries a lower and an upper affine function of the input, valid on the
box; affine nodes map them exactly, a ReLU whose input bounds straddle 0 takes the chord above
and ``0`` or the identity below, a clip that is not stable falls back to its constant bounds. On a
box where every ReLU is stable the two forms are the network's own affine piece, so on the small
boxes of :mod:`qbound.exact.grid` the bounds are nearly exact.

Where every linear map is a dense layer (a matrix read off its weights,
:func:`qbound.bounds.host_chain.dense_matrix`) and the net has at most :data:`NUMPY_MAX_NEURONS`
neurons, in NumPy: nothing compiles, so a machine's first call starts at once (the compiled
program is 2x faster warm on AQT's 4-16-16-2 MLP, 0.035 against 0.06 s per 4096 boxes, but takes
2.4-3.3 s to compile, twice: one program for few boxes, one for many). Otherwise one compiled
float64 program for a whole batch of boxes (CROWN's per-node steps compile once per batch size,
seconds each on a first call). Both compute the same forms. float64's own rounding is covered by widening every
form by :data:`RELATIVE_SLACK` of its magnitude over the box: the error of float64 sums of a few
thousand terms is below ``1e-12`` of their magnitude (Higham 2002, section 3.1).

Example:
  >>> import jax, jax.numpy as jnp, numpy as np, qbound as qb
  >>> from qbound.exact.forms import linear_bounds
  >>> g = qb.trace(lambda x: jax.nn.relu(x @ jnp.array([[1.0], [-1.0]])), jnp.zeros(2))
  >>> value, lam = linear_bounds(g, np.array([[0.5, 0.0]]), np.array([[1.0, 0.25]]))
  >>> lam[0].round(6).tolist(), value[0].round(6).tolist()   # rows +e_0, -e_0: relu(x0 - x1) = x0 - x1 there
  ([[1.0, -1.0], [-1.0, 1.0]], [0.25, -1.0])
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound._arrays import namespace
from qbound.bounds import host_chain

# float64 forms are widened by this fraction of their magnitude over the box, per node.
RELATIVE_SLACK = 1e-10
KINDS = (G.INPUT, G.AFFINE, G.ADD, G.CONCAT, G.RELU, G.CLIP, G.ROUND)


def supported(graph: G.Graph) -> bool:
  """Whether every node is one :func:`linear_bounds` handles (no rounding but the identity)."""
  return all(n.kind in KINDS and (n.kind != G.ROUND or n.attrs[0] == "none") for n in graph.nodes)


def _magnitude(form, xmax):
  """``max |form . (x, 1)|`` over ``|x| <= xmax`` (forms ``(k, P, *S)``, last of P the constant)."""
  coeff = form[:, :-1]
  x = xmax.reshape(xmax.shape[0], -1, *([1] * (form.ndim - 2)))
  return jnp.sum(jnp.abs(coeff) * x, axis=1) + jnp.abs(form[:, -1])


def _concrete(form, lo, hi, upper: bool):
  """The minimum (maximum if ``upper``) of the form over the boxes, widened outward."""
  shape = (lo.shape[0], -1, *([1] * (form.ndim - 2)))
  coeff = form[:, :-1]
  a, b = coeff * lo.reshape(shape), coeff * hi.reshape(shape)
  value = jnp.sum(jnp.maximum(a, b) if upper else jnp.minimum(a, b), axis=1) + form[:, -1]
  slack = RELATIVE_SLACK * _magnitude(form, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
  return value + slack if upper else value - slack


def _widen(form, slack, upper: bool):
  return form.at[:, -1].add(slack if upper else -slack)


def _map(node: G.Node, form, fn):
  """``fn`` (a node's linear map) applied to every coefficient of a batch of forms."""
  return jax.vmap(jax.vmap(fn))(form)


@jax.jit
def _forms(graph: G.Graph, lo, hi):
  k = lo.shape[0]
  n_in = int(np.prod(graph.input_shape))
  xmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi)).reshape(k, n_in)
  lo_f, hi_f = lo.reshape(k, n_in), hi.reshape(k, n_in)
  eye = jnp.concatenate([jnp.eye(n_in), jnp.zeros((1, n_in))]).reshape(n_in + 1, *graph.input_shape)
  ident = jnp.broadcast_to(eye, (k, *eye.shape))
  lower, upper, bounds = [ident], [ident], [(lo, hi)]
  for node in graph.nodes[1:]:
    ls, us = [lower[i] for i in node.inputs], [upper[i] for i in node.inputs]
    if node.kind == G.AFFINE:
      pos = lambda z: (node.linear(z) + node.linear_abs(z)) / 2  # noqa: E731
      neg = lambda z: (node.linear(z) - node.linear_abs(z)) / 2  # noqa: E731
      l_out = _map(node, ls[0], pos) + _map(node, us[0], neg)
      u_out = _map(node, us[0], pos) + _map(node, ls[0], neg)
      if node.bias is not None:
        l_out, u_out = l_out.at[:, -1].add(node.bias), u_out.at[:, -1].add(node.bias)
      big = jnp.maximum(_magnitude(ls[0], xmax), _magnitude(us[0], xmax))
      slack = RELATIVE_SLACK * (jax.vmap(node.linear_abs)(big) + (0 if node.bias is None else jnp.abs(node.bias)))
      l_out, u_out = _widen(l_out, slack, False), _widen(u_out, slack, True)
    elif node.kind == G.ADD:
      l_out = u_out = None
      for sign, lf, uf in zip(node.attrs, ls, us):
        shape = (k, n_in + 1, *node.shape)
        lt, ut = (lf, uf) if sign > 0 else (-uf, -lf)
        lt, ut = jnp.broadcast_to(lt, shape), jnp.broadcast_to(ut, shape)
        l_out = lt if l_out is None else l_out + lt
        u_out = ut if u_out is None else u_out + ut
      slack = RELATIVE_SLACK * (_magnitude(l_out, xmax) + _magnitude(u_out, xmax))
      l_out, u_out = _widen(l_out, slack, False), _widen(u_out, slack, True)
    elif node.kind == G.CONCAT:
      l_out = jnp.concatenate(ls, axis=node.attrs[0] + 2)
      u_out = jnp.concatenate(us, axis=node.attrs[0] + 2)
    elif node.kind == G.ROUND:  # the identity beside f_q's rounding
      l_out, u_out = ls[0], us[0]
    else:  # relu, clip: lines from the input's concrete bounds
      zl, zu = bounds[node.inputs[0]]
      if node.kind == G.RELU:
        c_lo, c_hi = jnp.zeros_like(zl), jnp.full_like(zl, jnp.inf)
      else:
        c_lo = jnp.broadcast_to(node.weights[0], zl.shape[1:])
        c_hi = jnp.broadcast_to(node.weights[1], zl.shape[1:])
      l_out, u_out = _clip_lines(ls[0], us[0], zl, zu, c_lo, c_hi, node.kind == G.RELU, xmax)
    lower.append(l_out)
    upper.append(u_out)
    bounds.append((_concrete(l_out, lo_f, hi_f, False), _concrete(u_out, lo_f, hi_f, True)))
  out = graph.output
  return lower[out], upper[out]


def _clip_lines(lf, uf, zl, zu, c_lo, c_hi, relu: bool, xmax):
  """Lower and upper forms of ``clip(z, c_lo, c_hi)`` (a ReLU: ``c_lo = 0, c_hi = inf``)."""
  expand = lambda a: a[:, None]  # noqa: E731 - over the coefficient axis
  inside = (zl >= c_lo) & (zu <= c_hi)
  below, above = zu <= c_lo, zl >= c_hi
  const_lo = jnp.clip(zl, c_lo, c_hi)
  const_hi = jnp.clip(zu, c_lo, c_hi)
  const = lambda v: jnp.zeros_like(lf).at[:, -1].set(v)  # noqa: E731
  l_out = jnp.where(expand(inside), lf, const(const_lo))
  u_out = jnp.where(expand(inside), uf, const(const_hi))
  l_out = jnp.where(expand(below), const(jnp.broadcast_to(c_lo, zl.shape)), l_out)
  u_out = jnp.where(expand(below), const(jnp.broadcast_to(c_lo, zl.shape)), u_out)
  l_out = jnp.where(expand(above), const(jnp.broadcast_to(c_hi, zl.shape)), l_out)
  u_out = jnp.where(expand(above), const(jnp.broadcast_to(c_hi, zl.shape)), u_out)
  if relu:
    # Unstable ReLU: the chord above, slope u / (u - l) made a little steeper so its rounding keeps
    # it above; below, the identity or 0, whichever is closer on more of the interval (DeepPoly).
    unstable = (zl < 0) & (zu > 0)
    slope = jnp.where(unstable, zu / jnp.where(unstable, zu - zl, 1.0), 0.0) * (1 + 1e-12)
    chord = expand(slope) * uf
    chord = chord.at[:, -1].add(-slope * zl)
    chord = _widen(chord, 2 * RELATIVE_SLACK * (_magnitude(chord, xmax) + slope * jnp.abs(zl)), True)
    ident = expand(zu > -zl)
    u_out = jnp.where(expand(unstable), chord, u_out)
    l_out = jnp.where(expand(unstable), jnp.where(ident, lf, jnp.zeros_like(lf)), l_out)
  return l_out, u_out


# Boxes per compiled call: few boxes (a refinement's batch) or many (the grid's first pass), so that
# two programs serve every batch size. Inside a call the boxes go through the forms in groups of
# GROUP: the forms of a group stay in cache (measured 2026-12-05 at load 10 on AQT's 4-16-16-2 MLP:
# 14-18 us a box in groups of 16-256 against 38 us in one batch of 1024 and 77 us of 16384).
SMALL_CALL = 256
LARGE_CALL = 4096
GROUP = 32


@functools.partial(jax.jit, static_argnames=("group",))
def _bounds64(g64: G.Graph, lo, hi, group: int):
  """:func:`linear_bounds` on one call's boxes (float64 inputs, a multiple of ``group``)."""
  k = lo.shape[0]
  split = lambda a: a.reshape(k // group, group, *a.shape[1:])  # noqa: E731
  lf, uf = jax.lax.map(lambda ab: _forms(g64, *ab), (split(lo), split(hi)))
  n = int(np.prod(g64.output_shape))
  lf, uf = lf.reshape(k, -1, n), uf.reshape(k, -1, n)
  # Rows: +e_j (f_j >= lower form) and -e_j (-f_j >= -upper form).
  forms = jnp.concatenate([lf, -uf], axis=2).transpose(0, 2, 1)  # (k, 2n, P)
  return _float32_rows(forms, lo.reshape(k, 1, -1), hi.reshape(k, 1, -1))


def _float32_rows(forms, lo_f, hi_f):
  """``(value, lam)`` in float32 from float64 forms ``(k, rows, P)`` over boxes ``(k, 1, n_in)``
  (NumPy or JAX arrays alike)."""
  xp = namespace(forms, lo_f, hi_f)
  lam64 = forms[..., :-1]
  lam = lam64.astype(xp.float32)
  # Rounding lam to float32 moves the form by at most |lam64 - lam| |x|; the minimum over the box of
  # the float32 form plus the constant, less that and float64's slack, then rounded down.
  xmax = xp.maximum(xp.abs(lo_f), xp.abs(hi_f))
  lam32 = lam.astype(xp.float64)
  low = xp.minimum(lam32 * lo_f, lam32 * hi_f).sum(-1) + forms[..., -1]
  low -= (xp.abs(lam64 - lam32) * xmax).sum(-1)
  low -= RELATIVE_SLACK * ((xp.abs(lam64) * xmax).sum(-1) + xp.abs(forms[..., -1]))
  value = xp.nextafter(low.astype(xp.float32), xp.float32(-np.inf))
  value = xp.where(value.astype(xp.float64) > low, xp.nextafter(value, xp.float32(-np.inf)), value)
  return value, lam


# The NumPy path (no compilation: a first call's forms are ready at once) for graphs of dense layers
# of at most this many neurons in all; boxes per NumPy batch at most this many coefficients (k P n).
NUMPY_MAX_NEURONS = 512
NUMPY_BATCH_ENTRIES = 1 << 21


def _numpy_steps(graph: G.Graph):
  """The graph's nodes as NumPy steps on flat vectors, or None where one is not a dense map (or a
  broadcast or concatenation that flat vectors cannot follow) or the graph is too wide for NumPy:
  ``("input",)``, ``("affine", M, b)``, ``("add", signs)``, ``("concat",)``, ``("identity",)``,
  ``("relu",)``, ``("clip", lo, hi)``."""
  steps, neurons = [], 0
  for node in graph.nodes:
    flat = lambda a: np.broadcast_to(np.asarray(a, np.float64), node.shape).reshape(-1)  # noqa: E731
    if node.kind == G.INPUT:
      steps.append(("input",))
    elif node.kind == G.AFFINE:
      if host_chain.moves_nothing(node):
        steps.append(("identity",))
        continue
      matrix = host_chain.dense_matrix(node)
      if matrix is None:
        return None
      steps.append(("affine", matrix, None if node.bias is None else flat(node.bias)))
      neurons += node.size
    elif node.kind == G.ADD:
      if any(graph.nodes[i].size != node.size for i in node.inputs):
        return None
      steps.append(("add", tuple(node.attrs)))
    elif node.kind == G.CONCAT:
      first = graph.nodes[node.inputs[0]].shape
      if math.prod(first[:node.attrs[0]]) != 1:  # flat vectors concatenate only along the outer axis
        return None
      steps.append(("concat",))
    elif node.kind == G.ROUND:
      steps.append(("identity",))
    elif node.kind == G.RELU:
      steps.append(("relu",))
    elif node.kind != G.CLIP:  # (not a graph linear_bounds takes: supported() says so)
      return None
    elif host_chain.clips_nothing(node):  # (merge's identity beside f_q's clip)
      steps.append(("identity",))
    else:
      steps.append(("clip", flat(node.weights[0]), flat(node.weights[1])))
  return steps if neurons <= NUMPY_MAX_NEURONS else None


def _magnitude_np(form, xmax):
  """``max |form . (x, 1)|`` over ``|x| <= xmax`` (forms ``(k, P, n)``)."""
  return (xmax[:, None, :] @ np.abs(form[:, :-1]))[:, 0] + np.abs(form[:, -1])


def _concrete_np(form, lo, hi, xmax, upper: bool):
  """As :func:`_concrete`, on flat NumPy forms."""
  coeff = form[:, :-1]
  a, b = coeff * lo[:, :, None], coeff * hi[:, :, None]
  value = (np.maximum(a, b) if upper else np.minimum(a, b)).sum(axis=1) + form[:, -1]
  slack = RELATIVE_SLACK * _magnitude_np(form, xmax)
  return value + slack if upper else value - slack


def _relu_lines_np(lf, uf, zl, zu, xmax):
  """:func:`_clip_lines` for a ReLU, on flat NumPy forms ``(k, P, n)``: the identity where active, 0
  where inactive, and where unstable the chord above and the identity or 0 below (DeepPoly)."""
  active, unstable = zl >= 0, (zl < 0) & (zu > 0)
  l_out = np.where((active | (unstable & (zu > -zl)))[:, None], lf, 0.0)
  u_out = np.where(active[:, None], uf, 0.0)
  if unstable.any():
    with np.errstate(divide="ignore", invalid="ignore"):
      slope = np.where(unstable, zu / np.where(unstable, zu - zl, 1.0), 0.0) * (1 + 1e-12)
    chord = slope[:, None] * uf
    chord[:, -1] -= slope * zl
    chord[:, -1] += 2 * RELATIVE_SLACK * (_magnitude_np(chord, xmax) + slope * np.abs(zl))
    u_out = np.where(unstable[:, None], chord, u_out)
  return l_out, u_out


def _clip_lines_np(lf, uf, zl, zu, c_lo, c_hi):
  """:func:`_clip_lines` for a clip, on flat NumPy forms ``(k, P, n)``: the forms where it clips
  nothing over the box, else its constant bounds."""
  inside = ((zl >= c_lo) & (zu <= c_hi))[:, None]

  def const(v):
    out = np.zeros_like(lf)
    out[:, -1] = v
    return out

  return (np.where(inside, lf, const(np.clip(zl, c_lo, c_hi))),
          np.where(inside, uf, const(np.clip(zu, c_lo, c_hi))))


def _forms_np(steps, graph: G.Graph, lo, hi):
  """:func:`_forms` in NumPy float64 on flat boxes ``(k, n_in)``: the output's forms ``(k, P, n)``."""
  k, n_in = lo.shape
  xmax = np.maximum(np.abs(lo), np.abs(hi))
  ident = np.broadcast_to(np.concatenate([np.eye(n_in), np.zeros((1, n_in))])[None], (k, n_in + 1, n_in))
  # Concrete bounds only where a ReLU or clip reads them.
  bounded = {node.inputs[0] for node, step in zip(graph.nodes, steps) if step[0] in ("relu", "clip")}
  lower, upper, bounds = [], [], {}
  for i, (node, step) in enumerate(zip(graph.nodes, steps)):
    kind = step[0]
    ls, us = [lower[j] for j in node.inputs], [upper[j] for j in node.inputs]
    if kind == "input":
      l_out = u_out = ident
    elif kind == "affine":
      matrix, bias = step[1], step[2]
      pos, neg = np.maximum(matrix, 0.0).T, np.minimum(matrix, 0.0).T
      times = lambda form, m: (form.reshape(-1, m.shape[0]) @ m).reshape(k, -1, m.shape[1])  # noqa: E731
      l_out = times(ls[0], pos) + times(us[0], neg)
      u_out = times(us[0], pos) + times(ls[0], neg)
      big = np.maximum(_magnitude_np(ls[0], xmax), _magnitude_np(us[0], xmax))
      slack = RELATIVE_SLACK * (big @ np.abs(matrix).T + (0.0 if bias is None else np.abs(bias)))
      if bias is not None:
        l_out[:, -1] += bias
        u_out[:, -1] += bias
      l_out[:, -1] -= slack
      u_out[:, -1] += slack
    elif kind == "add":
      l_out = sum(lf if sign > 0 else -uf for sign, lf, uf in zip(step[1], ls, us))
      u_out = sum(uf if sign > 0 else -lf for sign, lf, uf in zip(step[1], ls, us))
      slack = RELATIVE_SLACK * (_magnitude_np(l_out, xmax) + _magnitude_np(u_out, xmax))
      l_out[:, -1] -= slack
      u_out[:, -1] += slack
    elif kind == "concat":
      l_out, u_out = np.concatenate(ls, axis=2), np.concatenate(us, axis=2)
    elif kind == "identity":
      l_out, u_out = ls[0], us[0]
    elif kind == "relu":
      l_out, u_out = _relu_lines_np(ls[0], us[0], *bounds[node.inputs[0]], xmax)
    else:
      l_out, u_out = _clip_lines_np(ls[0], us[0], *bounds[node.inputs[0]], *step[1:])
    lower.append(l_out)
    upper.append(u_out)
    if i in bounded:
      bounds[i] = (_concrete_np(l_out, lo, hi, xmax, False), _concrete_np(u_out, lo, hi, xmax, True))
  return lower[graph.output], upper[graph.output]


def _bounds_np(steps, graph: G.Graph, lo, hi):
  """:func:`_bounds64` in NumPy (flat float64 boxes ``(k, n_in)``)."""
  lf, uf = _forms_np(steps, graph, lo, hi)
  forms = np.concatenate([lf, -uf], axis=2).transpose(0, 2, 1)  # (k, 2n, P)
  return _float32_rows(forms, lo[:, None], hi[:, None])


def linear_bounds(graph: G.Graph, lower, upper):
  """CROWN-shaped linear bounds of ``graph``'s output over a batch of boxes, in float32.

  Args:
    graph: a graph of input, affine, add, concat, relu, clip and identity-rounding nodes.
    lower, upper: the boxes, ``(k, *input shape)``.

  Returns:
    ``(value, lam)``, ``(k, 2n)`` and ``(k, 2n, *input shape)`` float32 numpy arrays for the rows
    ``+e_j`` then ``-e_j`` of the ``n`` outputs: ``row . g(x) >= value + lam . (x - y*)`` on each
    box, where ``lam . y*`` is the minimum of ``lam . y`` over the box; so ``value`` is a proven lower
    bound of ``row . g`` there and ``lam`` its coefficients (as
    :func:`qbound.bounds.crown.backward_lower` returns them).
  """
  lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
  k = lower.shape[0]
  steps = _numpy_steps(graph)
  if steps is not None:
    n_in = int(np.prod(graph.input_shape))
    width = max(node.size for node in graph.nodes)
    batch = max(1, NUMPY_BATCH_ENTRIES // ((n_in + 1) * width))
    lo, hi = lower.reshape(k, n_in), upper.reshape(k, n_in)
    parts = [_bounds_np(steps, graph, lo[i: i + batch], hi[i: i + batch]) for i in range(0, k, batch)]
    n = int(np.prod(graph.output_shape))
    if not parts:
      return np.zeros((0, 2 * n), np.float32), np.zeros((0, 2 * n, *graph.input_shape), np.float32)
    return (np.concatenate([v for v, _ in parts]),
            np.concatenate([m for _, m in parts]).reshape(k, 2 * n, *graph.input_shape))
  call = SMALL_CALL if k <= SMALL_CALL else LARGE_CALL
  n = int(np.prod(graph.output_shape))
  values, lams = [], []
  with jax.enable_x64(True):
    g64 = G.float64_copy(graph)
    for first in range(0, k, call):
      lo, hi = lower[first: first + call], upper[first: first + call]
      m = lo.shape[0]
      if m < call:  # padded with the first box: one program per call size
        lo, hi = (np.concatenate([a, np.broadcast_to(a[:1], (call - m, *a.shape[1:]))]) for a in (lo, hi))
      value, lam = _bounds64(g64, jnp.asarray(lo), jnp.asarray(hi), min(GROUP, call))
      values.append(np.asarray(value)[:m])
      lams.append(np.asarray(lam)[:m])
  if not values:
    return np.zeros((0, 2 * n), np.float32), np.zeros((0, 2 * n, *graph.input_shape), np.float32)
  return np.concatenate(values), np.concatenate(lams).reshape(k, 2 * n, *graph.input_shape)
