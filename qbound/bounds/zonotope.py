"""Differential zonotopes: f, f_q and d = f - f_q over one set of shared generators.

A zonotope encloses a node's value as ``c + G eps`` with ``eps`` in ``[-1, 1]^m``. Here the three
values of a node pair, f's ``z``, f_q's ``z_q`` and their difference ``d = z - z_q``, are carried
as three zonotopes over the *same* generators: the input box's (one per input coordinate, fixed by
``x``), and for every ReLU layer one fresh generator per neuron for f's relaxation, one for f_q's
and one for d's. Because d's zonotope names f's and f_q's own relaxation generators, the errors of
the two networks' relaxations cancel in ``d`` instead of adding up: the domain of VeryDiff
(Teuber, Kern, Janzen, Beckert, "Revisiting Differential Verification: Equivalence Verification
with Confidence", TACAS 2025), which stays tight where the copies really differ (pruned and
retrained), where bounds that keep only intervals of ``z_q`` lose the correlation.

Affine layers are exact: ``z' = W z + b``, ``z_q' = W_q z_q + b_q`` and
``d' = W d + (W - W_q) z_q + (b - b_q)``. ReLU on one network is DeepZ's relaxation (Singh et al.,
"Fast and Effective Robustness Certification", NeurIPS 2018): ``relu(z) = lam z + r`` with
``r`` in the range of ``relu(z) - lam z`` over ``z``'s bounds, ``r`` a fresh generator. For
``d' = relu(z) - relu(z_q)`` every one of these identities is a sound enclosure, and each neuron
takes the one whose enclosure is narrowest (the case split of VeryDiff by the stability of ``z``
and ``z_q``, with the narrower option where both apply):

* ``relu(z)' - relu(z_q)'``: f's and f_q's relaxations themselves (always; exact when both
  are stable: ``0``, ``z``, ``-z_q``);
* ``d + (relu(z)' - z)``, where ``z_q >= 0`` (``relu(z_q) = z_q``; exactly ``d`` when ``z >= 0`` too);
* ``d - (relu(z_q)' - z_q)``, where ``z >= 0``;
* ``g d + r`` with ``r`` fresh, from ``relu(z) - relu(z_q)`` lying between ``min(0, d)`` and
  ``max(0, d)`` (ReLU is monotone and 1-Lipschitz; VeryDiff's rule where both are unstable);
* an interval, ``[relu(l) - relu(u_q), relu(u) - relu(l_q)]`` meet ``[min(0, l_d), max(0, u_d)]``.

The bounds every relaxation reads are the zonotopes' extremes, met with those of ``z_q + d``,
``z - d`` and ``z - z_q`` and then with each other by ``z = z_q + d``. Every relaxation's offset
range is evaluated at its input range's ends (and 0), so any slope computed in float is sound.

The input generators at the output measure how much each input coordinate's width costs the bound:
``|G_f - G_q|`` of input ``i`` at output ``j`` is VeryDiff's split heuristic (``influence``).

Sound mode: each zonotope also carries an interval term ``err`` (a radius per neuron). Every step
computes its new centre and generators in float and moves a proven bound on their rounding into
``err`` (the standard model of arithmetic, Higham 2002, as :mod:`qbound.bounds.fp` does): the
computed centre and generators are then exact by definition from there on.

Only affine layers and ReLUs are supported (dense and other linear layers alike); any other layer
raises :class:`~qbound.errors.UnsupportedLayerError` naming it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp
from qbound.bounds.diff import _DeltaLinear
from qbound.bounds.forward import _tighten
from qbound.bounds.interval import center_radius
from qbound.box import Box
from qbound.errors import UnsupportedLayerError

SUPPORTED_KINDS = (G.INPUT, G.AFFINE, G.RELU, G.CLIP)


class Zonotope(NamedTuple):
  """``center + sum_b blocks[b]^T eps_b + [-err, err]`` for generators ``eps`` in ``[-1, 1]``.

  Attributes:
    center: the node's shape.
    blocks: one entry per generator block of the shared layout (input, then f's, f_q's and d's
      fresh generators of each ReLU layer): an array ``(generators, *shape)``, or None where the
      value does not depend on that block.
    err: the node's shape, ``>= 0``: an extra interval term (the rounding of sound mode).
  """

  center: jnp.ndarray
  blocks: tuple
  err: jnp.ndarray


class ZonotopeBounds(NamedTuple):
  """What :func:`diff_zonotope_bounds` returns (a leading axis of pieces in the batched form).

  Attributes:
    lower, upper: proven bounds on ``f(x) - f_q(x)`` over the box, of the output's shape.
    influence: ``(inputs, outputs)``: ``|G_f - G_q|`` of each input generator at each (flat)
      output, i.e. how much of the output's difference each input coordinate's half-width moves
      (VeryDiff's split score; divide by the half-width for a coefficient per unit input).
    z, zq, d: ``(lower, upper)`` of every node of f, of f_q and of their difference.
  """

  lower: jnp.ndarray
  upper: jnp.ndarray
  influence: jnp.ndarray
  z: list
  zq: list
  d: list


def check_supported(fg: G.Graph, qg: G.Graph) -> None:
  """Raises :class:`UnsupportedLayerError` unless f and f_q are paired chains of affine maps and ReLUs."""
  from qbound.merge import same_structure

  if not same_structure(fg, qg):
    raise UnsupportedLayerError("differential zonotopes need f and f_q with the same layer structure; these "
                                "differ. Use qbound.bounds.crown on the merged network instead.")
  for i, node in enumerate(fg.nodes):
    if node.kind not in SUPPORTED_KINDS:
      where = f" (traced from {node.where})" if node.where else ""
      raise UnsupportedLayerError(
          f"differential zonotopes support affine layers and ReLU only; node {i} is a {node.kind!r} "
          f"layer{where}. Use qbound.bounds.diff (differential bounds), which supports every traced layer.")
    if node.kind != G.INPUT and len(node.inputs) != 1:
      raise UnsupportedLayerError(f"differential zonotopes need single-input layers; node {i} ({node.kind}) "
                                  f"reads {len(node.inputs)} nodes.")


def supported(fg: G.Graph, qg: G.Graph) -> bool:
  """Whether :func:`check_supported` passes."""
  try:
    check_supported(fg, qg)
  except UnsupportedLayerError:
    return False
  return True


def _layout(graph: G.Graph, keep: Optional[int] = None):
  """Generator blocks: ``sizes`` (input, then f, f_q, d per activation layer) and each activation
  node's three block ids."""
  sizes = [graph.nodes[0].size]
  fresh = {}
  for i, node in enumerate(graph.nodes):
    if node.kind in (G.RELU, G.CLIP):
      fresh[i] = (len(sizes), len(sizes) + 1, len(sizes) + 2)
      sizes += [node.size if keep is None else min(keep, node.size)] * 3
  return tuple(sizes), fresh


def _abs_generators(z: Zonotope):
  """``sum_k |G_k|`` per neuron and the number of generators summed."""
  total, count = jnp.zeros_like(z.center), 0
  for b in z.blocks:
    if b is not None:
      total = total + jnp.sum(jnp.abs(b), axis=0)
      count += b.shape[0]
  return total, count


def radius(z: Zonotope, sound: bool):
  """A bound on ``|value - center|``; in sound mode it covers the rounding of its own sum."""
  gens, count = _abs_generators(z)
  r = gens + z.err
  if sound:
    r = fp.round_up(r + fp.dot_margin(count + 1, r, r.dtype))
  return r


def concretize(z: Zonotope, sound: bool):
  """``(lower, upper)``: the zonotope's extremes per neuron."""
  r = radius(z, sound)
  if sound:
    return fp.round_down(z.center - r), fp.round_up(z.center + r)
  return z.center - r, z.center + r


def _fresh(half, shape, keep: Optional[int] = None):
  """Fresh generators of half-widths ``half``: ``(block, rest)``.

  One generator per neuron, ``half[j]`` on neuron ``j`` only; with ``keep``, only for the ``keep``
  widest neurons (a ``(keep, *shape)`` block), the others' half-widths returned as ``rest`` for
  the interval term: they lose their correlation, but the layers after cost ``keep`` generators
  instead of the layer's width (zonotope order reduction, as in Girard, HSCC 2005, with boxes).
  """
  flat = half.reshape(-1)
  if keep is None or keep >= flat.size:
    return jnp.diag(flat).reshape((flat.size, *shape)), jnp.zeros_like(half)
  _, idx = jax.lax.top_k(flat, keep)
  block = jax.nn.one_hot(idx, flat.size, dtype=flat.dtype) * flat[idx][:, None]
  rest = flat.at[idx].set(0).reshape(half.shape)
  return block.reshape((keep, *shape)), rest


def combine(terms, sound: bool, offset=None, fresh: Optional[int] = None, keep: Optional[int] = None) -> Zonotope:
  """``sum_t coef_t * Z_t + [lo, hi]``: per-neuron coefficients, the offset as a fresh generator.

  Args:
    terms: ``(coefficient, Zonotope)`` pairs (coefficients of the node's shape or scalars), over
      the same block layout.
    sound: add the proven rounding of the result's centre and generators to ``err``; the margin
      also covers an error of up to ``u |coefficient|`` in each coefficient.
    offset: ``(lo, hi)`` or None.
    fresh: the block the offset's generator goes to (required with ``offset``).
    keep: fresh generators kept (see :func:`_fresh`; None: one per neuron).
  """
  center = sum(coef * z.center for coef, z in terms)
  n_blocks = len(terms[0][1].blocks)
  blocks = []
  for b in range(n_blocks):
    parts = [coef * z.blocks[b] for coef, z in terms if z.blocks[b] is not None]
    blocks.append(functools.reduce(jnp.add, parts) if parts else None)
  err = sum(jnp.abs(coef) * z.err for coef, z in terms)
  magnitude = 0.0
  if sound:
    for coef, z in terms:
      magnitude = magnitude + jnp.abs(coef) * (jnp.abs(z.center) + _abs_generators(z)[0] + z.err)
  if offset is not None:
    mid, half = center_radius(*offset, sound)
    center = center + mid
    blocks[fresh], rest = _fresh(half, center.shape, keep)
    magnitude = magnitude + jnp.abs(mid)
    err = err + rest
  err = jnp.broadcast_to(err, center.shape)
  if sound:
    err = fp.round_up(err + fp.dot_margin(len(terms) + 2, magnitude, center.dtype))
  return Zonotope(center, tuple(blocks), err)


def affine(node: G.Node, z: Zonotope, sound: bool) -> Zonotope:
  """``W z + b`` (exact up to the rounding moved into ``err``)."""
  blocks = tuple(None if b is None else jax.vmap(node.linear)(b) for b in z.blocks)
  center = node.linear(z.center)
  if node.bias is not None:
    center = center + node.bias
  err = node.linear_abs(z.err)
  if sound:
    magnitude = node.linear_abs(jnp.abs(z.center) + _abs_generators(z)[0] + z.err)
    if node.bias is not None:
      magnitude = magnitude + jnp.abs(node.bias)
    err = fp.round_up(err + fp.dot_margin(node.terms + 2, magnitude, center.dtype))
  return Zonotope(center, blocks, err)


def diff_affine(nf: G.Node, nq: G.Node, d: Zonotope, zq: Zonotope, sound: bool) -> Zonotope:
  """``d' = W d + (W - W_q) z_q + (b - b_q)``: ReluDiff's affine rule on zonotopes."""
  delta = _DeltaLinear(nf, nq)
  blocks = []
  for bd, bq in zip(d.blocks, zq.blocks):
    parts = [jax.vmap(nf.linear)(bd)] if bd is not None else []
    if bq is not None and not delta.zero:
      parts.append(jax.vmap(delta.apply)(bq))
    blocks.append(functools.reduce(jnp.add, parts) if parts else None)
  center = nf.linear(d.center)
  err = nf.linear_abs(d.err)
  if not delta.zero:
    center = center + delta.apply(zq.center)
    err = err + delta.apply_abs(zq.err)
  db = None if nf.bias is None else nf.bias - nq.bias
  if db is not None:
    center = center + db
  err = jnp.broadcast_to(err, center.shape)
  if sound:
    # W - W_q and b - b_q are computed in float too: at most u of their size each, inside the
    # four extra terms of the margin.
    magnitude = nf.linear_abs(jnp.abs(d.center) + _abs_generators(d)[0] + d.err)
    if not delta.zero:
      magnitude = magnitude + delta.margin_abs(jnp.abs(zq.center) + _abs_generators(zq)[0] + zq.err)
    if db is not None:
      magnitude = magnitude + 2 * jnp.abs(db)
    err = fp.round_up(err + fp.dot_margin(nf.terms + 4, magnitude, center.dtype))
  return Zonotope(center, tuple(blocks), err)


def cuts(node: G.Node, dtype):
  """``(lo, hi)`` of a ReLU (``0, inf``) or clip node, broadcast to the node's shape."""
  if node.kind == G.RELU:
    lo, hi = jnp.zeros(node.shape, dtype), jnp.full(node.shape, jnp.inf, dtype)
  else:
    lo, hi = node.weights
  return jnp.broadcast_to(jnp.asarray(lo, dtype), node.shape), jnp.broadcast_to(jnp.asarray(hi, dtype), node.shape)


def clip(x, c):
  return jnp.minimum(jnp.maximum(x, c[0]), c[1])


def chord_slope(lower, upper, c):
  """The slope of ``clip(x, *c)``'s chord over ``[lower, upper]`` (DeepZ's ReLU slope): exactly 1
  where the range lies between the cuts and 0 where it lies beyond one of them."""
  span = jnp.where(upper > lower, upper - lower, 1.0)
  chord = jnp.clip((clip(upper, c) - clip(lower, c)) / span, 0.0, 1.0)
  inside = (lower >= c[0]) & (upper <= c[1])
  beyond = (upper <= c[0]) | (lower >= c[1])
  return jnp.where(inside, 1.0, jnp.where(beyond, 0.0, chord))


def _at_points(fn, points, slope, sound: bool):
  """The range of ``fn(x) - slope x`` over ``points`` (the extremes of a piecewise linear function
  whose kinks are among them), each value widened by its proven rounding in sound mode."""
  values = [fn(x) - slope * x for x in points]
  if sound:
    # fn(x) - slope x computes exactly where the slope is 0, or 1 with fn(x) = x or 0 (stable
    # neurons): no margin there, so stable layers stay exact.
    exact = [(slope == 0) | ((slope == 1) & ((fn(x) == x) | (fn(x) == 0))) for x in points]
    errs = [jnp.where(e, 0.0, fp.dot_margin(2, jnp.abs(fn(x)) + jnp.abs(slope * x), x.dtype))
            for x, e in zip(points, exact)]
    lows = [v - e for v, e in zip(values, errs)]
    highs = [v + e for v, e in zip(values, errs)]
    return fp.round_down(functools.reduce(jnp.minimum, lows)), fp.round_up(functools.reduce(jnp.maximum, highs))
  return functools.reduce(jnp.minimum, values), functools.reduce(jnp.maximum, values)


def clip_offset(lower, upper, c, slope, sound: bool):
  """The range of ``clip(x, *c) - slope x`` for ``x`` in ``[lower, upper]`` (any slope)."""
  points = (lower, jnp.clip(c[0], lower, upper), jnp.clip(c[1], lower, upper), upper)
  return _at_points(lambda x: clip(x, c), points, slope, sound)


def offset_zonotope(offset, block: int, n_blocks: int, sound: bool, keep: Optional[int] = None) -> Zonotope:
  """``[lo, hi]`` as a zonotope: its midpoint and fresh generators in ``block`` (see :func:`_fresh`)."""
  mid, half = center_radius(*offset, sound)
  fresh, rest = _fresh(half, mid.shape, keep)
  blocks = tuple(fresh if b == block else None for b in range(n_blocks))
  return Zonotope(mid, blocks, rest)


def _activation(z: Zonotope, bounds, c, block: int, sound: bool, keep: Optional[int] = None):
  """DeepZ on one network: ``(relaxed zonotope, slope, offset zonotope)``, the relaxed one being
  ``slope * z + offset``."""
  slope = chord_slope(*bounds, c)
  part = offset_zonotope(clip_offset(*bounds, c, slope, sound), block, len(z.blocks), sound, keep)
  return combine([(slope, z), (1.0, part)], sound), slope, part


def _one_signed_diff(d_bounds, sound: bool):
  """``clip(z) - clip(z_q) = g d + r`` for equal cuts: ``g`` the chord slope of ``max(0, d)`` over
  d's bounds and ``r``'s range from ``min(0, d) <= clip(z) - clip(z_q) <= max(0, d)`` (clip is
  monotone and 1-Lipschitz), whose lower line is concave and upper line convex in ``d``: extremes
  at d's bounds."""
  lo, hi = d_bounds
  g = chord_slope(lo, hi, (jnp.zeros_like(lo), jnp.full_like(lo, jnp.inf)))
  low = _at_points(lambda x: jnp.minimum(x, 0), (lo, hi), g, sound)[0]
  high = _at_points(lambda x: jnp.maximum(x, 0), (lo, hi), g, sound)[1]
  return g, (low, high)


def _diff_activation(d: Zonotope, z: Zonotope, zq: Zonotope, zr, zqr, bounds, c, cq, block: int,
                     sound: bool, keep: Optional[int] = None) -> Zonotope:
  """``d' = clip(z, *c) - clip(z_q, *cq)``: the narrowest sound form per neuron (module docstring)."""
  (zl, zu), (ql, qu), (dl, du) = bounds
  (_, lam, part), (_, lam_q, part_q) = zr, zqr
  both = combine([(lam, z), (1.0, part), (-lam_q, zq), (-1.0, part_q)], sound)
  q_active = combine([(1.0, d), (lam - 1.0, z), (1.0, part)], sound)
  f_active = combine([(1.0, d), (1.0 - lam_q, zq), (-1.0, part_q)], sound)
  g, offset = _one_signed_diff((dl, du), sound)
  chord = combine([(g, d)], sound, offset, block, keep)
  box_lo, box_hi = diff_range(bounds, c, cq, sound)
  box = offset_zonotope((box_lo, box_hi), block, len(d.blocks), sound, keep)
  options = [both, q_active, f_active, chord, box]
  widths = [_abs_generators(o)[0] + o.err for o in options]
  inf = jnp.asarray(jnp.inf, widths[0].dtype)
  widths[1] = jnp.where((ql >= cq[0]) & (qu <= cq[1]), widths[1], inf)  # clip(z_q) = z_q
  widths[2] = jnp.where((zl >= c[0]) & (zu <= c[1]), widths[2], inf)  # clip(z) = z
  widths[3] = jnp.where((c[0] == cq[0]) & (c[1] == cq[1]), widths[3], inf)  # needs equal cuts
  pick = jnp.argmin(jnp.stack(widths), axis=0)
  select = lambda arrays: functools.reduce(lambda acc, k: jnp.where(pick == k, arrays[k], acc),
                                           range(1, len(arrays)), arrays[0])
  blocks = []
  for b in range(len(d.blocks)):
    parts = [o.blocks[b] for o in options]
    if all(p is None for p in parts):
      blocks.append(None)
    else:
      like = next(p for p in parts if p is not None)
      blocks.append(select([jnp.zeros_like(like) if p is None else p for p in parts]))
  return Zonotope(select([o.center for o in options]), tuple(blocks), select([o.err for o in options]))


def diff_range(bounds, c, cq, sound: bool):
  """An interval of ``clip(z, *c) - clip(z_q, *cq)`` from the three intervals: clip is monotone,
  and with equal cuts the difference lies between ``min(0, d)`` and ``max(0, d)``."""
  (zl, zu), (ql, qu), (dl, du) = bounds
  down = fp.round_down if sound else (lambda v: v)
  up = fp.round_up if sound else (lambda v: v)
  lo, hi = down(clip(zl, c) - clip(qu, cq)), up(clip(zu, c) - clip(ql, cq))
  same = (c[0] == cq[0]) & (c[1] == cq[1])
  lo = jnp.where(same, jnp.maximum(lo, jnp.minimum(dl, 0)), lo)
  hi = jnp.where(same, jnp.minimum(hi, jnp.maximum(du, 0)), hi)
  return lo, jnp.maximum(lo, hi)


def _meet(a, b):
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


def _node_bounds(z, zq, d, sound: bool):
  """Each value's extremes, met with those of the other two combined, then ``z = z_q + d``."""
  zb = _meet(concretize(z, sound), concretize(combine([(1.0, zq), (1.0, d)], sound), sound))
  qb = _meet(concretize(zq, sound), concretize(combine([(1.0, z), (-1.0, d)], sound), sound))
  db = _meet(concretize(d, sound), concretize(combine([(1.0, z), (-1.0, zq)], sound), sound))
  return _tighten(zb, qb, db, sound)


def diff_zonotope_bounds(fg: G.Graph, qg: G.Graph, box: Box, *, sound: bool = True, prior=None,
                         keep: Optional[int] = None) -> ZonotopeBounds:
  """Differential zonotope bounds of two paired graphs over one box (see the module docstring).

  A pure function of the graphs (static structure) and the box: ``jax.jit`` it, ``jax.vmap`` it
  over pieces (:func:`diff_zonotope_batch`). Call :func:`check_supported` first.

  Args:
    fg, qg: f and f_q traced, the same chain of affine layers and ReLUs.
    box: the input box.
    sound: proven floating-point margins.
    prior: optional ``(z, zq, d)`` bounds known to hold on the box (e.g. the differential bounds'
      or a parent piece's), one ``(lower, upper)`` or None per node each: every node's bounds are
      met with them before any relaxation reads them.
    keep: fresh generators kept per activation layer and network (f, f_q, d): the widest ``keep``
      relaxations get one each, the others join the interval term (:func:`_fresh`). None: every
      neuron's (exact layout, most expensive: generators grow by three layer widths per layer).

  Returns:
    A :class:`ZonotopeBounds` (unbatched).
  """
  sizes, fresh = _layout(fg, keep)
  shape = box.lower.shape
  center, rad = center_radius(box.lower, box.upper, sound)
  n_in = center.size
  zero = jnp.zeros_like(center)
  none = (None,) * (len(sizes) - 1)
  x = Zonotope(center, (_fresh(rad, shape)[0],) + none, zero)
  zs, qs, ds = [x], [x], [Zonotope(zero, (None,) + none, zero)]
  z_b, q_b, d_b = [(box.lower, box.upper)], [(box.lower, box.upper)], [(zero, zero)]
  for i in range(1, len(fg.nodes)):
    nf, nq = fg.nodes[i], qg.nodes[i]
    j = nf.inputs[0]
    if nf.kind == G.AFFINE:
      z, zq = affine(nf, zs[j], sound), affine(nq, qs[j], sound)
      d = diff_affine(nf, nq, ds[j], qs[j], sound)
      bounds = _node_bounds(z, zq, d, sound)
    else:  # RELU or CLIP (check_supported)
      bf, bq, bd = fresh[i]
      c, cq = cuts(nf, center.dtype), cuts(nq, center.dtype)
      bounds_in = (z_b[j], q_b[j], d_b[j])
      zr = _activation(zs[j], z_b[j], c, bf, sound, keep)
      zqr = _activation(qs[j], q_b[j], cq, bq, sound, keep)
      z, zq = zr[0], zqr[0]
      d = _diff_activation(ds[j], zs[j], qs[j], zr, zqr, bounds_in, c, cq, bd, sound, keep)
      bounds = _node_bounds(z, zq, d, sound)
      # The activation's range is known from its input's (monotone): meet with it.
      bounds = (_meet(bounds[0], (clip(z_b[j][0], c), clip(z_b[j][1], c))),
                _meet(bounds[1], (clip(q_b[j][0], cq), clip(q_b[j][1], cq))),
                _meet(bounds[2], diff_range(bounds_in, c, cq, sound)))
    if prior is not None:
      bounds = tuple(b if known is None or known[i] is None else _meet(b, known[i]) for b, known in zip(bounds, prior))
      bounds = _tighten(*bounds, sound)
    zs.append(z)
    qs.append(zq)
    ds.append(d)
    z_b.append(bounds[0])
    q_b.append(bounds[1])
    d_b.append(bounds[2])
  out = fg.output
  lower, upper = d_b[out]
  gf, gq = zs[out].blocks[0], qs[out].blocks[0]
  influence = jnp.abs(gf - gq).reshape(n_in, -1)
  return ZonotopeBounds(lower, upper, influence, z_b, q_b, d_b)


@functools.partial(jax.jit, static_argnames=("sound", "keep"))
def diff_zonotope_batch(fg: G.Graph, qg: G.Graph, lower, upper, prior=None, *, sound: bool = True,
                        keep: Optional[int] = None) -> ZonotopeBounds:
  """:func:`diff_zonotope_bounds` for a batch of boxes (leading axis of ``lower``, ``upper`` and
  every array of ``prior``), one compiled program per graph structure and batch size. Call
  :func:`check_supported` first."""
  one = lambda lo, hi, p: diff_zonotope_bounds(fg, qg, Box(lo, hi), sound=sound, prior=p, keep=keep)
  return jax.vmap(one)(lower, upper, prior)


def diff_zonotope(f, fq=None, box: Optional[Box] = None, *, sound: bool = True) -> Box:
  """Proven bounds on ``f(x) - fq(x)`` over ``box`` by differential zonotopes (VeryDiff's domain).

  Args:
    f: the original network (a pure JAX function of one input), or a
      :class:`~qbound.merge.MergedNetwork` (then ``fq=None``).
    fq: the compressed network, with the same chain of affine layers and ReLUs.
    box: the input box.
    sound: proven floating-point margins (:mod:`qbound.bounds.fp`).

  Returns:
    A :class:`~qbound.box.Box` of the output's shape holding ``f(x) - fq(x)`` for every ``x`` in ``box``.

  Raises:
    UnsupportedLayerError: a layer other than affine maps and ReLUs, or f and fq not paired.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> from qbound.bounds.zonotope import diff_zonotope
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> f = functools.partial(model.apply, model.init(jax.random.key(0), jnp.zeros(4)))
    >>> fq = functools.partial(model.apply, model.init(jax.random.key(1), jnp.zeros(4)))  # far apart
    >>> box = qb.Box(-jnp.ones(4), jnp.ones(4))
    >>> out = diff_zonotope(f, fq, box)
    >>> v = f(box.center) - fq(box.center)
    >>> bool(jnp.all((out.lower <= v) & (v <= out.upper)))
    True
  """
  from qbound.bounds.guards import check_bounds, spot_check
  from qbound.box import validate_box
  from qbound.merge import MergedNetwork, merge

  if box is None:
    raise ValueError("diff_zonotope needs the input box: diff_zonotope(f, fq, box).")
  box = validate_box(box)
  merged = f if isinstance(f, MergedNetwork) else merge(f, fq, box)
  check_supported(merged.f_graph, merged.fq_graph)
  out = _jitted(merged.f_graph, merged.fq_graph, box, sound=sound)
  check_bounds([("differential zonotopes: f's nodes", merged.f_graph, out.z),
                ("differential zonotopes: f_q's nodes", merged.fq_graph, out.zq),
                ("differential zonotopes: d = f - f_q", merged.f_graph, out.d)], sound=sound)
  spot_check(merged.graph, box, out.lower, out.upper, sound=sound, what="differential zonotopes")
  return Box(out.lower, out.upper)


@functools.partial(jax.jit, static_argnames=("sound",))
def _jitted(fg, qg, box, sound):
  return diff_zonotope_bounds(fg, qg, box, sound=sound)
