"""Forward symbolic differential intervals: f, f_q and f - f_q as linear functions of the input.

Every node's value is enclosed between two linear functions of the input ``x``,
``L x + l <= value <= U x + u`` (symbolic intervals, Wang et al., "Formal Security Analysis of
Neural Networks using Symbolic Intervals", USENIX Security 2018), for f's node ``z``, f_q's node
``z_q`` and their difference ``d = z - z_q`` alike, pushed forward once through the graph:

* affine layers map both functions exactly: ``W+ L + W- U`` below, ``W+ U + W- L`` above, and for
  the difference ``d' = W d + (W - W_q) z_q + (b - b_q)`` (ReluDiff's rule, Paulsen, Wang, Wang,
  ICSE 2020);
* an activation is replaced by the linear lines of its relaxation over its input's concrete range
  (:mod:`qbound.bounds.rules`), and the difference of two activations by the differential lines in
  ``d`` and ``z_q`` (ReLU, clips with their own cuts, roundings, tanh and sigmoid), each line
  substituted by the input's lower or upper function by the sign of its slope: the symbolic
  differential intervals of NeuroDiff (Paulsen, Wang, Wang, Wang, ASE 2020).

Because ``d`` is carried as a function of ``x`` in its own right, it keeps the correlation between
the two networks that intervals on ``z`` and ``z_q`` lose; and because everything is a function of
the few input coordinates, a whole pass costs ``O(layers * width^2 * inputs)``: for inputs of a
few dimensions (ACAS Xu's 5) about a tenth of the backward pass (:mod:`qbound.bounds.diff`), which
bounds every layer from the output back. It is much looser on deep nets, though: on ACAS Xu (six
hidden layers) the relaxation errors of every layer add up, and branch and bound with it needs
6-100x the pieces of the backward bounds (:mod:`qbound.bounds.forward_bab` measures the trade; the
default branch and bound keeps the backward passes). The linear functions also
say how much each input coordinate widens the output's bound (``|U - L|`` times the coordinate's
width): the split rule of ReluVal and of VeryDiff's generator influence (Teuber et al., TACAS 2025).

**NeuroDiff's own rules** (``relu_rules="equation"``, :mod:`qbound.bounds.neurodiff_rules`): each
bounding function relaxed over its own range rather than the neuron's (Neurify's lines for ``z`` and
``z_q``; for ``d`` one case per pair of neuron states, reading ``z``'s own functions where ``z_q`` is
inactive, and per-function chords where both change sign). Measured on ACAS Xu 1_1 vs float16,
output 0 (``benchmarks/bench_pieces.py --forward-rules``, 32 random pieces per edge of property 1's
box, sound mode): the two rule sets are within 10% of each other at every edge (root 296 against
271; edge 1/8 median 0.51 against 0.52; edge 1/16 median 1.5e-5 both, worst 0.92 against 0.83), and
both 5-200x looser than the backward pass (root 46, 1/8 median 0.0026). A float64 numpy model of
NeuroDiff's pass (``benchmarks/neurodiff_reference.py``) gives the same root bound (271). So the
per-piece bound is not why NeuroDiff proves ACAS Xu in few splits; its split rule is
(:mod:`qbound.bounds.forward_bab`, ``split_rule="gradient"``).

**Intermediate variables** (``fresh=k``, NeuroDiff's, :mod:`qbound.bounds.symbolic`): after each
ReLU the ``k`` neurons of ``d`` whose bounding functions lie farthest apart are named by a fresh
variable, which later layers carry exactly instead of adding up the relaxation gap. On ACAS Xu 1_2
vs float16, output 0, pieces of 1/16 of property 1's box: median bound 0.0071 without, 0.0017 with 2
a layer; in the device loop 1.3-4.3x fewer pieces (docs/results/acas-search.md).

Every node's concrete range (the functions' extremes over the box) is intersected with interval
arithmetic on its inputs' ranges, with optional ``prior`` bounds (a parent piece's, in branch and
bound) and, for paired nodes, with ``z = z_q + d``; the activations' relaxations use those ranges.

Sound mode: the coefficients are computed in float, so every step adds to the constants ``l`` and
``u`` a proven bound on the rounding of that step's coefficients times the largest ``|x|`` over the
box (the standard model of arithmetic, Higham 2002, as in :mod:`qbound.bounds.fp`), and the
concrete ranges are rounded outward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.bounds import fp, neurodiff_rules, nonlinear, rules
from qbound.bounds.symbolic import (FRESH_FORMS, Symbolic, _Context, _add, _affine, _fresh_variables, _gamma, _lines,
                                    _lines_error, _magnitude, _pad, _widen, concretize, equation_ranges)
from qbound.bounds.diff import _DeltaLinear, diff_interval_node
from qbound.bounds.interval import node_interval
from qbound.box import Box


class ForwardBounds(NamedTuple):
  """What :func:`forward_diff_bounds` returns: concrete ``(lower, upper)`` per node of f (``z``), of
  f_q (``zq``) and of their difference (``d``), and the output difference as linear functions."""

  z: list
  zq: list
  d: list
  d_out: Symbolic


def _affine_rounding(node: G.Node, s: Symbolic, ctx: _Context):
  """Proven bound on the float32 rounding of an affine node's product with ``s`` (0 when not sound)."""
  if not ctx.sound:
    return 0.0
  dtype = s.l.dtype
  return _gamma(node.terms + 4, dtype) * node.linear_abs(_magnitude(s, ctx)) + (node.terms + 4) * fp.tiny(dtype)


def _network_step(node: G.Node, ins, bounds_in, ctx: _Context, n_in: int) -> Symbolic:
  """One node of one network: its symbolic interval from its inputs' (``ins``) and their ranges."""
  dtype = ins[0].l.dtype
  if node.kind == G.AFFINE:
    s = _affine(node.linear, node.linear_abs, ins[0])
    err = _affine_rounding(node, ins[0], ctx)
    if node.bias is not None:
      s = s._replace(l=s.l + node.bias, u=s.u + node.bias)
      if ctx.sound:
        err = err + fp.unit_roundoff(dtype) * fp.SLACK * (jnp.abs(s.l) + jnp.abs(s.u))
    return _widen(s, err, ctx)
  if node.kind == G.ADD:
    zero = jnp.zeros(node.shape, dtype)
    terms = [(jnp.full(node.shape, sign, dtype),) * 2 + (_broadcast(s, node.shape),) for sign, s in zip(node.attrs, ins)]
    s = _lines(terms, (zero, zero), node.shape, n_in, dtype)
    return _widen(s, _lines_error(terms, (zero, zero), ctx, dtype) if ctx.sound else 0.0, ctx)
  if node.kind == G.CONCAT:
    axis = node.attrs[0]
    n = max(s.L.shape[0] for s in ins)
    ins = [_pad(s, n) for s in ins]
    return Symbolic(jnp.concatenate([s.L for s in ins], axis + 1), jnp.concatenate([s.l for s in ins], axis),
                    jnp.concatenate([s.U for s in ins], axis + 1), jnp.concatenate([s.u for s in ins], axis))
  if node.kind in (G.RELU, G.CLIP, G.ROUND) or node.kind in G.SMOOTH:
    lo, hi = bounds_in[0]
    if node.kind == G.RELU and ctx.relu_rules == "equation":
      r = neurodiff_rules.relu_lines(equation_ranges(ins[0], ctx), lo, hi, sound=ctx.sound)
    else:
      r = rules.for_node(node, lo, hi, None, sound=ctx.sound)
    terms = [(r.lower_slope, r.upper_slope, ins[0])]
    offsets = (r.lower_offset, r.upper_offset)
    s = _lines(terms, offsets, node.shape, n_in, dtype)
    return _widen(s, _lines_error(terms, offsets, ctx, dtype) if ctx.sound else 0.0, ctx)
  raise ValueError(f"forward symbolic bounds have no rule for node kind {node.kind!r}")


def _broadcast(s: Symbolic, shape) -> Symbolic:
  """A symbolic interval broadcast to ``shape`` (a scalar added to a vector, as the graph does)."""
  if tuple(s.l.shape) == tuple(shape):
    return s
  n_in = s.L.shape[0]
  return Symbolic(jnp.broadcast_to(s.L, (n_in, *shape)), jnp.broadcast_to(s.l, shape),
                  jnp.broadcast_to(s.U, (n_in, *shape)), jnp.broadcast_to(s.u, shape))


def _diff_step(nf: G.Node, nq: G.Node, d_ins, zq_ins, z_b, zq_b, d_b, ctx: _Context, n_in: int, z_ins=None) -> Symbolic:
  """One node pair: the symbolic interval of ``d = z - z_q`` at the node."""
  dtype = d_ins[0].l.dtype
  if nf.kind == G.AFFINE:
    s = _affine(nf.linear, nf.linear_abs, d_ins[0])
    err = _affine_rounding(nf, d_ins[0], ctx)
    delta = _DeltaLinear(nf, nq)
    if not delta.zero:
      s = _add(s, _affine(delta.apply, delta.apply_abs, zq_ins[0]))
      if ctx.sound:
        err = (err + _gamma(nf.terms + 6, dtype) * delta.margin_abs(_magnitude(zq_ins[0], ctx))
               + (nf.terms + 6) * fp.tiny(dtype))
    if nf.bias is not None:
      db = nf.bias - nq.bias
      s = s._replace(l=s.l + db, u=s.u + db)
      if ctx.sound:
        err = err + fp.unit_roundoff(dtype) * fp.SLACK * (2 * jnp.abs(db) + jnp.abs(s.l) + jnp.abs(s.u))
    return _widen(s, err, ctx)
  if nf.kind in (G.ADD, G.CONCAT):
    return _network_step(nf, d_ins, None, ctx, n_in)
  if nf.kind == G.RELU and ctx.relu_rules == "equation":
    ranges = [equation_ranges(s[0], ctx) for s in (z_ins, zq_ins, d_ins)]
    r = neurodiff_rules.relu_diff_lines(z_b[0], zq_b[0], d_b[0], *ranges, sound=ctx.sound)
    terms = [(r.a_z, r.b_z, z_ins[0]), (r.a_q, r.b_q, zq_ins[0]), (r.a_d, r.b_d, d_ins[0])]
    offsets = (r.a_0, r.b_0)
    s = _lines(terms, offsets, nf.shape, n_in, dtype)
    return _widen(s, _lines_error(terms, offsets, ctx, dtype) if ctx.sound else 0.0, ctx)
  if nf.kind in (G.RELU, G.CLIP, G.ROUND) or nf.kind in G.SMOOTH:
    r = rules.diff_for_nodes(nf, nq, z_b[0], zq_b[0], d_b[0], None, sound=ctx.sound)
    terms = [(r.lower_d, r.upper_d, d_ins[0]), (r.lower_q, r.upper_q, zq_ins[0])]
    offsets = (r.lower_r, r.upper_r)
    s = _lines(terms, offsets, nf.shape, n_in, dtype)
    return _widen(s, _lines_error(terms, offsets, ctx, dtype) if ctx.sound else 0.0, ctx)
  raise ValueError(f"forward differential bounds have no rule for node kind {nf.kind!r}")


def _meet(a, b):
  return jnp.maximum(a[0], b[0]), jnp.minimum(a[1], b[1])


def _tighten(z, zq, d, sound: bool):
  """``z = zq + d``: each of the three intervals tightens the others."""
  (zl, zu), (ql, qu), (dl, du) = z, zq, d
  down = fp.round_down if sound else (lambda v: v)
  up = fp.round_up if sound else (lambda v: v)
  z = (jnp.maximum(zl, down(ql + dl)), jnp.minimum(zu, up(qu + du)))
  zq = (jnp.maximum(ql, down(zl - du)), jnp.minimum(qu, up(zu - dl)))
  d = (jnp.maximum(dl, down(zl - qu)), jnp.minimum(du, up(zu - ql)))
  if not sound:  # unsound bounds can cross by rounding: keep their ends in order (see crown.intersect)
    z, zq, d = fp.unsound_order(z), fp.unsound_order(zq), fp.unsound_order(d)
  return z, zq, d


def _context(box: Box, sound: bool, relu_rules: str = "node") -> _Context:
  lo = box.lower.reshape(-1)
  hi = box.upper.reshape(-1)
  center = (lo + hi) / 2
  radius = jnp.maximum(hi - center, center - lo)
  if sound:
    radius = fp.round_up(radius)
  return _Context(center, radius, jnp.maximum(jnp.abs(lo), jnp.abs(hi)), sound, relu_rules)


def _input_symbolic(box: Box) -> Symbolic:
  n_in = box.lower.size
  eye = jnp.eye(n_in, dtype=box.lower.dtype).reshape((n_in, *box.lower.shape))
  zero = jnp.zeros(box.lower.shape, box.lower.dtype)
  return Symbolic(eye, zero, eye, zero)


def forward_diff_bounds(fg: G.Graph, qg: G.Graph, box: Box, *, sound: bool = True, prior=None,
                        relu_rules: str = "node", fresh: int = 0, fresh_form: Optional[str] = None,
                        fresh_scope: Optional[str] = None) -> ForwardBounds:
  """Symbolic differential intervals of two paired graphs over one box (see the module docstring).

  A pure function of the graphs (whose structure is static) and the box: ``jax.jit`` it, and
  ``jax.vmap`` it over many boxes (:func:`forward_diff_batch`). A run of identical blocks of a
  chain (ACAS Xu's five hidden layers of 50 after the first) is one ``lax.scan`` over the blocks'
  stacked weights rather than unrolled (:func:`repeated_run`): the same values, and a program that
  compiles in a fraction of the time.

  Args:
    fg, qg: the traced f and f_q of the same structure (:attr:`qbound.merge.MergedNetwork.paired`).
    box: the input box.
    sound: proven floating-point margins.
    prior: optional ``(z, zq, d)`` bounds known to hold on the box (e.g. a parent piece's), one
      ``(lower, upper)`` per node each (None entries are skipped); intersected with every node's.
    relu_rules: ``"node"``: each ReLU (and pair of ReLUs) relaxed over its input's concrete range
      (:mod:`qbound.bounds.rules`); ``"equation"``: NeuroDiff's rules, each bounding function
      relaxed over its own range (:mod:`qbound.bounds.neurodiff_rules`). Other activations keep
      their rules either way.
    fresh: intermediate symbolic variables per ReLU layer for ``d`` (NeuroDiff's): after each ReLU
      the ``fresh`` neurons of ``d`` whose bounding functions lie farthest apart are named by a
      fresh variable (:func:`qbound.bounds.symbolic._fresh_variables`), so later layers carry them
      exactly instead of adding up their relaxation gaps. 0: none. ``d``'s functions (``d_out``
      too) then run over the inputs followed by the fresh variables.
    fresh_form: how a fresh variable names a neuron, one of ``FRESH_FORMS`` (default ``FRESH_FORM``):
      ``"midline"``, the midline of its two functions plus the variable; ``"range"``, the variable
      alone over the neuron's proven range (NeuroDiff's).
    fresh_scope: whose neurons get variables, one of ``FRESH_SCOPES`` (default ``FRESH_SCOPE``):
      ``"d"`` (NeuroDiff's), or ``"all"``: ``z``'s and ``z_q``'s too, each from slots of its own, so
      their functions also run over the inputs and every variable.

  Returns:
    A :class:`ForwardBounds`.
  """
  nonlinear.require_none(fg, "forward symbolic differential bounds")
  if relu_rules not in RELU_RULES:
    raise ValueError(f"relu_rules must be one of {RELU_RULES}; got {relu_rules!r}.")
  ctx = _context(box, sound, relu_rules)
  n_in = int(box.lower.size)
  x = _input_symbolic(box)
  zero = Symbolic(jnp.zeros_like(x.L), x.l, jnp.zeros_like(x.U), x.u)
  fresh, fresh_form, fresh_scope = resolve_fresh(fresh, fresh_form, fresh_scope)
  every = fresh_scope == "all"
  per_net = 0
  if fresh:  # d runs over the inputs and every layer's fresh variables from the start (fixed shapes)
    extra = sum(min(fresh, n.size) for n in fg.nodes if n.kind == G.RELU)
    per_net = extra
    if every:  # slots: d's, then z's, then z_q's
      extra = 3 * extra
      x_pad = _pad(x, n_in + extra)
    zero = _pad(zero, n_in + extra)
    pad = jnp.zeros(extra, ctx.center.dtype)
    ctx = ctx._replace(center=jnp.concatenate([ctx.center, pad]), radius=jnp.concatenate([ctx.radius, pad]),
                       xmax=jnp.concatenate([ctx.xmax, pad]))
  slot = n_in  # the next fresh variable's index
  zs, qs, ds = [x], [x], [zero]
  if fresh and every:
    zs, qs = [x_pad], [x_pad]
  z = [(box.lower, box.upper)]
  zq = [(box.lower, box.upper)]
  d = [(jnp.zeros_like(box.lower), jnp.zeros_like(box.lower))]
  run = repeated_run(fg, qg, prior) if SCAN_REPEATED else None
  known_of = lambda i: None if prior is None else tuple(None if p is None else p[i] for p in prior)
  i = 1
  while i < len(fg.nodes):
    if run is not None and i == run[0]:
      first, period, repeats = run
      ctx, slot = _scan_run(fg, qg, first, period, repeats, known_of, ctx, n_in, sound, (zs, qs, ds, z, zq, d),
                            fresh, slot, fresh_form, per_net if every else 0)
      i = first + period * repeats
      continue
    nf, nq = fg.nodes[i], qg.nodes[i]
    ins = nf.inputs
    symbolic, concrete = _node_bounds(nf, nq, [zs[j] for j in ins], [qs[j] for j in ins], [ds[j] for j in ins],
                                      [z[j] for j in ins], [zq[j] for j in ins], [d[j] for j in ins], known_of(i),
                                      ctx, n_in, sound)
    if fresh and nf.kind == G.RELU:
      k = min(fresh, nf.size)
      symbolic, ctx = _name_fresh(symbolic, concrete, ctx, slot, k, fresh_form, per_net if every else 0)
      slot += k
    for lst, v in zip((zs, qs, ds, z, zq, d), symbolic + concrete):
      lst.append(v)
    i += 1
  return ForwardBounds(z, zq, d, ds[fg.output])


# How a fresh variable names a neuron by default (one of FRESH_FORMS; see
# qbound.bounds.symbolic._fresh_variables).
FRESH_FORM = "midline"
# Whose neurons get fresh variables by default: "d" only (NeuroDiff's) or "all" (z, z_q and d).
FRESH_SCOPE = "d"
FRESH_SCOPES = ("d", "all")


def resolve_fresh(fresh, fresh_form, fresh_scope, name: str = "fresh"):
  """``(count, form, scope)`` of fresh variables with the defaults filled in, or a ValueError naming
  the argument (``name``: the count's, as the caller calls it)."""
  fresh = int(fresh)
  if fresh < 0:
    raise ValueError(f"{name} must be a count of variables per ReLU layer, at least 0; got {fresh}.")
  fresh_form = FRESH_FORM if fresh_form is None else fresh_form
  if fresh_form not in FRESH_FORMS:
    raise ValueError(f"fresh_form must be one of {FRESH_FORMS}; got {fresh_form!r}.")
  fresh_scope = FRESH_SCOPE if fresh_scope is None else fresh_scope
  if fresh_scope not in FRESH_SCOPES:
    raise ValueError(f"fresh_scope must be one of {FRESH_SCOPES}; got {fresh_scope!r}.")
  return fresh, fresh_form, fresh_scope


def _name_fresh(symbolic, concrete, ctx, slot: int, k: int, fresh_form: str, per_net: int):
  """A ReLU node's ``(z, z_q, d)`` functions with ``k`` of d's neurons named by fresh variables from
  ``slot`` on, and z's and z_q's too from ``slot + per_net`` and ``slot + 2 * per_net`` when
  ``per_net`` (``fresh_scope="all"``). Returns the functions and the context."""
  s_d, ctx = _fresh_variables(symbolic[2], concrete[2], ctx, slot, k, fresh_form)
  if not per_net:
    return symbolic[:2] + (s_d,), ctx
  s_z, ctx = _fresh_variables(symbolic[0], concrete[0], ctx, slot + per_net, k, fresh_form)
  s_q, ctx = _fresh_variables(symbolic[1], concrete[1], ctx, slot + 2 * per_net, k, fresh_form)
  return (s_z, s_q, s_d), ctx


def _node_bounds(nf, nq, zs_in, qs_in, ds_in, zb, qb, db, known, ctx: _Context, n_in: int, sound: bool):
  """One node pair: symbolic intervals ``(z, zq, d)`` and concrete ranges ``(z, zq, d)``."""
  s_z = _network_step(nf, zs_in, zb, ctx, n_in)
  s_q = _network_step(nq, qs_in, qb, ctx, n_in)
  s_d = _diff_step(nf, nq, ds_in, qs_in, zb, qb, db, ctx, n_in, zs_in)
  zi = _meet(concretize(s_z, ctx), node_interval(_local(nf), tuple(zb), sound))
  qi = _meet(concretize(s_q, ctx), node_interval(_local(nq), tuple(qb), sound))
  di = _meet(concretize(s_d, ctx), diff_interval_node(_local(nf), _local(nq), tuple(zb), tuple(qb), tuple(db), sound))
  if known is not None:  # bounds known to hold on the box already (a parent piece's)
    zi, qi, di = (b if k is None else _meet(b, k) for b, k in zip((zi, qi, di), known))
  zi, qi, di = _tighten(zi, qi, di, sound)
  return (s_z, s_q, s_d), (zi, qi, di)


# The ReLU rules forward_diff_bounds knows (its ``relu_rules`` argument).
RELU_RULES = ("node", "equation")

# Whether forward_diff_bounds scans runs of identical blocks (repeated_run) instead of unrolling them.
# ACAS Xu vs float16, 64 boxes, sound: the program compiled in 16-19 s unrolled (14,482 lines of HLO).
SCAN_REPEATED = True


def _signature(graph: G.Graph, i: int):
  """What must agree between two nodes for one compiled step to serve both."""
  n = graph.nodes[i]
  leaves = jax.tree_util.tree_leaves((n.weights, n.bias))
  return (n.kind, tuple(n.shape), n.op, n.attrs, tuple(i - j for j in n.inputs),
          n.bias is None, tuple((tuple(jnp.shape(v)), jnp.result_type(v)) for v in leaves))


def repeated_run(fg: G.Graph, qg: G.Graph, prior=None):
  """The longest run of identical blocks in a chain: ``(first node, nodes per block, blocks)``, or None.

  A run qualifies when every node in it reads only the node before it, the blocks agree node by
  node (kind, shape, linear map, weight shapes, in both graphs, and in which ``prior`` bounds are
  given), the node before the run has the shape of each block's last node (the carried value), and
  no later node reads into the run except its last node.
  """
  n = len(fg.nodes)
  known = lambda i: None if prior is None else tuple(p is None or p[i] is None for p in prior)
  key = [None] + [(_signature(fg, i), _signature(qg, i), known(i)) for i in range(1, n)]
  chain = [False] + [tuple(fg.nodes[i].inputs) == (i - 1,) and tuple(qg.nodes[i].inputs) == (i - 1,)
                     for i in range(1, n)]
  best, saved = None, 0
  for period in range(1, 5):
    for first in range(1, n - 2 * period + 1):
      if not all(chain[first:first + period]):
        continue
      if tuple(fg.nodes[first - 1].shape) != tuple(fg.nodes[first + period - 1].shape):
        continue
      repeats = 1
      while (first + (repeats + 1) * period <= n
             and all(chain[first + repeats * period + k] and key[first + repeats * period + k] == key[first + k]
                     for k in range(period))):
        repeats += 1
      end = first + repeats * period
      later_ok = all(j >= end - 1 for i in range(end, n) for j in fg.nodes[i].inputs) and fg.output >= end - 1
      if repeats >= 2 and later_ok and (repeats - 1) * period > saved:
        best, saved = (first, period, repeats), (repeats - 1) * period
  return best


def _stacked(graph: G.Graph, first: int, period: int, repeats: int, k: int):
  """Node ``first + k`` of the run as a template and its blocks' weights and biases stacked."""
  group = [graph.nodes[first + r * period + k] for r in range(repeats)]
  weights = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[g.weights for g in group])
  bias = None if group[0].bias is None else jnp.stack([g.bias for g in group])
  return _local(group[0]), weights, bias


def _scan_run(fg, qg, first, period, repeats, known_of, ctx, n_in, sound, lists, fresh=0, slot=0,
              fresh_form="midline", per_net=0):
  """Bounds of the nodes of a repeated run by ``lax.scan`` over its blocks; appended to ``lists``
  (``zs, qs, ds, z, zq, d``; the run's inner symbolic intervals are not kept, nothing reads them).
  Returns the context and the next fresh variable's index (:func:`_fresh_variables`; with
  ``per_net``, z's and z_q's variables take the slots ``per_net`` and ``2 * per_net`` after d's)."""
  import dataclasses

  zs, qs, ds, z, zq, d = lists
  f_parts = [_stacked(fg, first, period, repeats, k) for k in range(period)]
  q_parts = [_stacked(qg, first, period, repeats, k) for k in range(period)]
  priors = []
  for k in range(period):
    group = [known_of(first + r * period + k) for r in range(repeats)]
    if group[0] is None:
      priors.append(None)
      continue
    priors.append(tuple(None if group[0][j] is None else
                        jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[g[j] for g in group]) for j in range(3)))
  xs = ([(w, b) for _, w, b in f_parts], [(w, b) for _, w, b in q_parts], priors)

  def block(carry, x):
    s_prev, c_prev, (centre, radius, xmax, at) = carry
    c = ctx._replace(center=centre, radius=radius, xmax=xmax)
    f_w, q_w, known = x
    out = []
    for k in range(period):
      nf = dataclasses.replace(f_parts[k][0], weights=f_w[k][0], bias=f_w[k][1])
      nq = dataclasses.replace(q_parts[k][0], weights=q_w[k][0], bias=q_w[k][1])
      s_prev, c_prev = _node_bounds(nf, nq, [s_prev[0]], [s_prev[1]], [s_prev[2]], [c_prev[0]], [c_prev[1]],
                                    [c_prev[2]], known[k], c, n_in, sound)
      if fresh and nf.kind == G.RELU:
        n_fresh = min(fresh, nf.size)
        s_prev, c = _name_fresh(s_prev, c_prev, c, at, n_fresh, fresh_form, per_net)
        at = at + n_fresh
      out.append(c_prev)
    return (s_prev, c_prev, (c.center, c.radius, c.xmax, at)), tuple(out)

  start = ((zs[first - 1], qs[first - 1], ds[first - 1]), (z[first - 1], zq[first - 1], d[first - 1]),
           (ctx.center, ctx.radius, ctx.xmax, jnp.int32(slot)))
  (s_last, _, (centre, radius, xmax, _)), ys = jax.lax.scan(block, start, xs)
  per_block = sum(min(fresh, fg.nodes[first + k].size) for k in range(period) if fg.nodes[first + k].kind == G.RELU)
  for r in range(repeats):
    for k in range(period):
      zi, qi, di = jax.tree_util.tree_map(lambda a: a[r], ys[k])
      last = r == repeats - 1 and k == period - 1
      for lst, v in zip((zs, qs, ds), s_last if last else (None, None, None)):
        lst.append(v)
      z.append(zi)
      zq.append(qi)
      d.append(di)
  return ctx._replace(center=centre, radius=radius, xmax=xmax), slot + per_block * repeats if fresh else slot


def _local(node: G.Node) -> G.Node:
  import dataclasses

  return dataclasses.replace(node, inputs=tuple(range(len(node.inputs))))


@functools.partial(jax.jit, static_argnames=("sound", "relu_rules", "fresh", "fresh_form", "fresh_scope"))
def forward_diff_batch(fg: G.Graph, qg: G.Graph, lower, upper, prior=None, *, sound: bool = True,
                       relu_rules: str = "node", fresh: int = 0, fresh_form: Optional[str] = None,
                       fresh_scope: Optional[str] = None) -> ForwardBounds:
  """:func:`forward_diff_bounds` for a batch of boxes (leading axis of ``lower``, ``upper`` and of
  every array of ``prior``), one compiled program per graph structure and batch size."""
  one = lambda lo, hi, p: forward_diff_bounds(fg, qg, Box(lo, hi), sound=sound, prior=p, relu_rules=relu_rules,
                                              fresh=fresh, fresh_form=fresh_form, fresh_scope=fresh_scope)
  return jax.vmap(one)(lower, upper, prior)


def forward_diff(f, fq, box: Box, *, sound: bool = True) -> Box:
  """Proven bounds on ``f(x) - fq(x)`` over ``box`` by forward symbolic differential intervals.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(4))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
    >>> box = qb.Box(-jnp.ones(4), jnp.ones(4))
    >>> out = qb.bounds.forward_diff(f, fq, box)
    >>> v = f(box.center) - fq(box.center)
    >>> bool(jnp.all((out.lower <= v) & (v <= out.upper)))
    True
  """
  from qbound.bounds.diff import require_paired
  from qbound.bounds.guards import check_bounds, spot_check
  from qbound.box import validate_box
  from qbound.merge import MergedNetwork, merge

  box = validate_box(box)
  merged = f if isinstance(f, MergedNetwork) else merge(f, fq, box)
  require_paired(merged)
  out = _jitted(merged.f_graph, merged.fq_graph, box, sound=sound)
  check_bounds([("forward bounds: f's nodes", merged.f_graph, out.z), ("forward bounds: f_q's nodes", merged.fq_graph,
                out.zq), ("forward bounds: d = f - f_q", merged.f_graph, out.d)], sound=sound)
  lower, upper = out.d[merged.f_graph.output]
  spot_check(merged.graph, box, lower, upper, sound=sound, what="forward differential bounds")
  return Box(lower, upper)


@functools.partial(jax.jit, static_argnames=("sound",))
def _jitted(fg, qg, box, sound):
  return forward_diff_bounds(fg, qg, box, sound=sound)
