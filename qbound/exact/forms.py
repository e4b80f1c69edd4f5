"""Linear lower and upper bounds of a piecewise-linear network over many small boxes, in float64.

Forward symbolic intervals (Wang, Pei, Whitehouse, Yang, Jana, "Formal Security Analysis of Neural
Networks using Symbolic Intervals", USENIX Security 2018; the ReLU lines of DeepPoly, Singh et al.,
POPL 2019): every node carries a lower and an upper affine function of the input, valid on the
box; affine nodes map them exactly, a ReLU whose input bounds straddle 0 takes the chord above
and ``0`` or the identity below, a clip that is not stable falls back to its constant bounds. On a
box where every ReLU is stable the two forms are the network's own affine piece, so on the small
boxes of :mod:`qbound.exact.grid` the bounds are nearly exact.

One compiled float64 program for a whole batch of boxes (CROWN's per-node steps compile once per
batch size, seconds each on a first call). float64's own rounding is covered by widening every
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

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G

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
  lam64 = forms[..., :-1]
  lam = lam64.astype(jnp.float32)
  lo_f, hi_f = lo.reshape(k, 1, -1), hi.reshape(k, 1, -1)
  # Rounding lam to float32 moves the form by at most |lam64 - lam| |x|; the minimum over the box of
  # the float32 form plus the constant, less that and float64's slack, then rounded down.
  xmax = jnp.maximum(jnp.abs(lo_f), jnp.abs(hi_f))
  lam32 = lam.astype(jnp.float64)
  low = jnp.minimum(lam32 * lo_f, lam32 * hi_f).sum(-1) + forms[..., -1]
  low -= (jnp.abs(lam64 - lam32) * xmax).sum(-1)
  low -= RELATIVE_SLACK * ((jnp.abs(lam64) * xmax).sum(-1) + jnp.abs(forms[..., -1]))
  value = jnp.nextafter(low.astype(jnp.float32), jnp.float32(-jnp.inf))
  value = jnp.where(value.astype(jnp.float64) > low, jnp.nextafter(value, jnp.float32(-jnp.inf)), value)
  return value, lam


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
