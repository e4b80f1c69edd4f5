"""Branch and bound on the device with forward symbolic bounds: many cheap pieces, few host trips.

For inputs of a few entries, the forward symbolic differential intervals of
:mod:`qbound.bounds.forward` bound a piece for ``O(layers * width^2 * inputs)``: on ACAS Xu (5
inputs, 6 x 50 ReLUs) about 0.1 ms a piece in batches of 64, against 2-3 ms for the backward passes
that :mod:`qbound.bounds.bab` takes. They are looser per piece (at an edge of 1/16 of ACAS Xu's
property 1 box, vs its float16 copy, a median 50x the backward bound), so they need more splits; the
trade pays when each split is cheap enough, which is what NeuroDiff (Paulsen, Wang, Wang, Wang,
ASE 2020) does on the CPU. Here the whole loop runs inside one compiled program
(``lax.while_loop``), the host reading a few scalars every ``k`` iterations:

* the open pieces live in a fixed-capacity buffer on the device (corners, bound, split scores and
  the bounds each passes on to its children);
* every iteration takes the ``batch`` pieces with the largest upper bounds (``lax.top_k``), splits
  each in two at the midpoint of the dimension that weighs most (``split_rule``: ``"gradient"``,
  the largest ``max |g_i| * width_i`` of an interval gradient ``g`` of ``f - f_q`` over the piece,
  as NeuroDiff splits, :func:`qbound.bounds.splitting.interval_gradient`; or ``"bound"``, ``|L_j| + |U_j|`` of the output's
  linear bounds times the width: ReluVal's smear, Wang et al., USENIX Security 2018), bounds the
  children with their parent's node bounds as ``prior``, evaluates the network at
  each child's centre and at the corner its gradient points to (the lower bound), and writes the
  children that are not finished back into free slots;
* a piece is finished once its bound is at most ``max(epsilon, (1 + target_gap) * lower)``: it can
  decide nothing any more; the largest bound of finished pieces is kept, so the answer whenever it
  stops is the same valid interval as :func:`qbound.bounds.branch_and_bound`'s.

Why NeuroDiff needs few splits (docs/results/acas-search.md, "Why NeuroDiff's forward analysis needs few
splits"): not its per-piece bound, which qbound's forward pass matches (its rules are
``relu_rules="equation"``, within 10% either way), but its split rule. The output bound's
coefficients say how ``d`` moves with each input, which for a float16 copy is hardly at all; the
interval gradient weighs each input by how much it moves the unstable neurons, whose relaxations are
where the bound's width comes from. On ACAS Xu 1_1..1_9 vs float16 (output 0, epsilon 0.05) the
gradient split needs 1.3-4.6x fewer pieces than the coefficient split wherever either proves, 1_1 in
563 pieces and 0.23 s warm (load 5-8; NeuroDiff 0.23-0.26 s idle); 1_3 and 1_4 stay undecided in
10 s, where NeuroDiff relies on intermediate symbolic variables. Those are here too
(``fresh_vars=k``, :func:`qbound.bounds.symbolic._fresh_variables`): with 2 a layer the pieces drop
1.3-4.3x on every net, 1_3 and 1_4 are proved, and the median over the nine falls from 0.98 to 0.80 s
at load 7.5 (``certify(method="bab")`` 1.44 s in the same run), at 20% more per piece and a program
that compiles for 1.5-2 minutes (``fresh_scope="all"``, variables for ``z`` and ``z_q`` too: 1_3
and 1_4 in half the time, every easy net slower). ``domain="zonotope"`` (fresh generators per layer for all three
values) proves all nine with the gradient split in 0.41-0.79 s warm, about as fast as
:func:`qbound.bounds.branch_and_bound` (0.36-1.09 s, same run).

The gradient split is the default where it applies (``SPLIT_RULE = "auto"``). Measured before it,
with the coefficient split (``benchmarks/bench_forward_bab.py``, docs/results/acas-speed.md): this does **not** beat
:func:`qbound.bounds.branch_and_bound` on ACAS Xu, where the forward bounds need 6-100x its pieces
(the six layers' relaxation errors add up; 1_3-1_5 vs float16 undecided at epsilon 0.05 within
10 s), and the one program compiles for 15-60 s, so ``auto`` and ``bab`` do not use it. Its second
call closes a 2% gap 1.1-7x faster than the default on small random MLPs (2-5 inputs, 8-16 ReLUs a
layer), where a batch costs the default little more than its host round trips.

Soundness: the per-piece bounds are :func:`qbound.bounds.forward.forward_diff_bounds` (float
rounding margins in sound mode); a reached value above a piece's bound is recorded on the device
and checked in float64 on the host (:func:`qbound.bounds.guards.check_points`), as the host loop
does.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound.bounds import guards
from qbound.bounds.arguments import branch_and_bound_args
from qbound.bounds.probe import probe_piece
from qbound.bounds.crown import relu_inputs
from qbound.bounds.diff import diff_backward_lower
from qbound.bounds.forward import forward_diff_bounds
from qbound.bounds.sparse import output_rows
from qbound.bounds.splitting import interval_gradient, resolve_split_rule
from qbound.bounds.zonotope import check_supported as zonotope_check_supported
from qbound.bounds.zonotope import diff_zonotope_bounds
from qbound.box import Box

# Node kinds the forward passes have rules for (qbound.bounds.forward).
SUPPORTED_KINDS = frozenset({G.INPUT, G.AFFINE, G.ADD, G.CONCAT, G.RELU, G.CLIP, G.ROUND}) | frozenset(G.SMOOTH)

# Default pieces taken per iteration.
BATCH = 32
# Bytes the device buffer of open pieces may take (corners, bounds, split scores and the node
# bounds passed on): ACAS Xu (7.3 KB a piece) holds about 9,000 pieces, a net of 40 ReLUs 65,000.
BUFFER_BYTES = 64 << 20
# Whether the selected outputs are bounded again by a backward pass over the forward node bounds.
OUTPUT_BACKWARD = True
# Fresh zonotope generators per layer and network with domain "zonotope" or "both".
ZONOTOPE_KEEP = 16
DOMAIN = "forward"
# Where a piece is split: "bound" weighs each dimension by the output bound's linear coefficients
# (|L_j| + |U_j|, or the backward pass's); "gradient" by an interval enclosure of the gradient of
# f - f_q over the piece (ReluVal's smear, as NeuroDiff splits); "auto": "gradient" where
# interval_gradient walks the graphs (chains of affine layers, ReLUs and clips), else "bound".
# ACAS Xu 1_1..1_9 vs float16, output 0, eps 0.05: 1.3-4.6x fewer pieces with "gradient" wherever
# either proves (docs/results/acas-search.md); four random MLPs of bench_forward_bab.py --small: 51-16,079
# pieces against 61-40,581 (one net 39 against 37).
SPLIT_RULE = "auto"
# NeuroDiff's intermediate symbolic variables per ReLU layer in the forward pass (forward.py's
# ``fresh``); 0: none.
FRESH_VARS = 0


class _State(NamedTuple):
  """The search on the device. Empty slots have ``up = -inf``; a piece not bounded yet (the root)
  has ``up = +inf`` and ``fresh``."""

  lo: jnp.ndarray  # (C, n) lower corners
  hi: jnp.ndarray  # (C, n) upper corners
  up: jnp.ndarray  # (C,) proven bound on max_j |g_j| over the piece (selected outputs)
  fresh: jnp.ndarray  # (C,) bool: not bounded yet
  dlo: jnp.ndarray  # (C, m) per-output lower bounds of f - f_q on the piece
  dhi: jnp.ndarray  # (C, m)
  sens: jnp.ndarray  # (C, n) |L_j| + |U_j| of the piece's worst output j
  prior: tuple  # per kept node: ((C, *shape) lower, (C, *shape) upper) for z, zq, d
  closed_up: jnp.ndarray  # () largest bound of a finished piece
  closed_lo: jnp.ndarray  # (m,)
  closed_hi: jnp.ndarray  # (m,)
  lower: jnp.ndarray  # () best error reached
  witness: jnp.ndarray  # (n,)
  root_lo: jnp.ndarray  # (m,) the root piece's bounds
  root_hi: jnp.ndarray
  bounded: jnp.ndarray  # () int32 pieces bounded
  violation: jnp.ndarray  # () largest (reached - bound) seen on a piece; > 0 is a bug to check
  bad_point: jnp.ndarray  # (n,)
  bad_lo: jnp.ndarray  # (m,)
  bad_hi: jnp.ndarray  # (m,)


def supported(merged) -> bool:
  """Whether ``merged`` can be bounded here: paired graphs of node kinds the forward passes have
  rules for."""
  if not merged.paired:
    return False
  return all(n.kind in SUPPORTED_KINDS for g in (merged.f_graph, merged.fq_graph) for n in g.nodes)


def _bound_children(fg, qg, lo, hi, prior, outputs, sound, domain, relu_rules="node", split_rule="bound",
                    output_backward=None, fresh_vars=0, fresh_form=None, fresh_scope=None):
  """Bounds of a batch of pieces: ``(dlo, dhi, up, worst output, sens, kept bounds)``.

  ``domain``: ``"forward"``: every node's bounds from the forward symbolic pass
  (:mod:`qbound.bounds.forward`), the split scores from the output's linear bounds;
  ``"zonotope"``: differential zonotopes (:mod:`qbound.bounds.zonotope`, ``ZONOTOPE_KEEP`` fresh
  generators per layer), the split scores from their input generators (VeryDiff's influence);
  ``"both"``: the forward pass, then the zonotopes over its bounds. With ``OUTPUT_BACKWARD`` the
  selected outputs are bounded again by one backward differential pass from the output over the
  node bounds (:func:`qbound.bounds.diff.diff_backward_lower`, ``2 * outputs`` rows).
  """
  nodes = relu_inputs(fg)
  n_nodes = len(fg.nodes)
  out_node = fg.output

  def one(l, h, p):
    known = None
    if p is not None:
      known = []
      for j in range(3):
        full = [None] * n_nodes
        for k, i in enumerate(nodes):
          full[i] = p[j * len(nodes) + k]
        known.append(full)
    n_in = l.size
    if domain in ("forward", "both"):
      out = forward_diff_bounds(fg, qg, Box(l, h), sound=sound, prior=known, relu_rules=relu_rules,
                                fresh=fresh_vars, fresh_form=fresh_form, fresh_scope=fresh_scope)
      L = out.d_out.L[:n_in].reshape(n_in, -1)[:, outputs]  # the inputs' coefficients (not the fresh variables')
      U = out.d_out.U[:n_in].reshape(n_in, -1)[:, outputs]
      z, zq, d, sens = out.z, out.zq, out.d, jnp.abs(L) + jnp.abs(U)
      known = (z, zq, d)
    if domain in ("zonotope", "both"):
      zono = diff_zonotope_bounds(fg, qg, Box(l, h), sound=sound, prior=known, keep=ZONOTOPE_KEEP)
      half = ((h - l) / 2).reshape(-1)
      sens = zono.influence[:, outputs] / jnp.where(half > 0, half, 1.0)[:, None]
      z, zq, d = zono.z, zono.zq, zono.d
    if split_rule == "gradient":
      centre, radius = interval_gradient(fg, qg, z, zq, outputs)
      sens = jnp.abs(centre) + radius  # the largest |gradient| per dimension
    return z, zq, d, sens

  z, zq, d, sens_all = jax.vmap(one)(lo, hi, prior)
  box = Box(lo, hi)
  dlo, dhi = (b.reshape(b.shape[0], -1) for b in d[out_node])
  if OUTPUT_BACKWARD if output_backward is None else output_backward:
    batch = lo.shape[0]
    keep_sens = sens_all
    node = fg.nodes[out_node]
    rows = output_rows(node.size, outputs, tuple(node.shape), lo.dtype, batch)
    low, coefficients = diff_backward_lower(fg, qg, out_node, rows, z, zq, d, box, sound=sound, batched=True,
                                            with_coefficients=True)
    k = outputs.shape[0]
    dlo = dlo.at[:, outputs].max(low[:, :k])
    dhi = dhi.at[:, outputs].min(-low[:, k:])
    coefficients = jnp.abs(coefficients.reshape(batch, 2 * k, -1))
    sens_all = jnp.swapaxes(coefficients[:, :k] + coefficients[:, k:], 1, 2)
    if split_rule == "gradient":
      sens_all = keep_sens
  sel = jnp.maximum(-dlo[:, outputs], dhi[:, outputs])
  worst = jnp.argmax(sel, axis=1)
  up = jnp.max(sel, axis=1)
  sens = jnp.take_along_axis(sens_all, worst[:, None, None], axis=2)[:, :, 0]
  keep = tuple(b[i] for b in (z, zq, d) for i in nodes)
  return dlo, dhi, up, worst, sens, keep


def _probe(graph: G.Graph, outputs, lo, hi, worst):
  """Errors reached on a batch of pieces (:func:`qbound.bounds.probe.probe_piece` at each centre)."""
  return jax.vmap(functools.partial(probe_piece, graph, outputs))((lo + hi) / 2, lo, hi, worst)


def _finished_below(state: _State, epsilon, target_gap):
  """Pieces with a bound at most this decide nothing more."""
  return jnp.maximum(epsilon, (1 + target_gap) * state.lower)


def _step(fg, qg, mg, outputs, batch, sound, domain, epsilon, target_gap, state: _State, relu_rules="node",
          split_rule="bound", output_backward=None, fresh_vars=0, fresh_form=None, fresh_scope=None) -> _State:
  """One iteration: split the ``batch`` worst open pieces, bound the children, keep the open ones."""
  capacity, n = state.lo.shape
  shape = tuple(fg.input_shape)
  done_at = _finished_below(state, epsilon, target_gap)
  top, idx = jax.lax.top_k(state.up, batch)
  active = top > done_at
  p_lo, p_hi, fresh = state.lo[idx], state.hi[idx], state.fresh[idx]
  width = p_hi - p_lo
  score = jnp.where(width > 0, (state.sens[idx] + 1e-9 * (jnp.max(state.sens[idx], axis=1, keepdims=True) + 1e-30))
                    * width, -1.0)
  axis = jnp.argmax(score, axis=1)
  splittable = jnp.max(score, axis=1) >= 0
  hot = jax.nn.one_hot(axis, n, dtype=bool)
  mid = (p_lo + p_hi) / 2
  # Fresh pieces (the root) are bounded as they are: their "left child" is the piece itself.
  split = ~fresh
  left_hi = jnp.where(hot & split[:, None], mid, p_hi)
  right_lo = jnp.where(hot, mid, p_lo)
  c_lo = jnp.concatenate([p_lo, right_lo])
  c_hi = jnp.concatenate([left_hi, p_hi])
  c_prior = tuple((jnp.concatenate([a[idx], a[idx]]), jnp.concatenate([b[idx], b[idx]])) for a, b in state.prior)
  c_valid = jnp.concatenate([active & (splittable | fresh), active & splittable & split])
  dlo, dhi, up, worst, sens, keep = _bound_children(
      fg, qg, c_lo.reshape((2 * batch, *shape)), c_hi.reshape((2 * batch, *shape)), c_prior, outputs, sound, domain,
      relu_rules, split_rule, output_backward, fresh_vars, fresh_form, fresh_scope)
  # A child lies inside its parent, so the parent's output bounds hold on it too (the prior covers
  # the nodes activations read, not the output).
  inherit = jnp.concatenate([~fresh, ~fresh])[:, None]
  parent_lo = jnp.concatenate([state.dlo[idx], state.dlo[idx]])
  parent_hi = jnp.concatenate([state.dhi[idx], state.dhi[idx]])
  dlo = jnp.where(inherit, jnp.maximum(dlo, parent_lo), dlo)
  dhi = jnp.where(inherit, jnp.minimum(dhi, parent_hi), dhi)
  up = jnp.max(jnp.maximum(-dlo[:, outputs], dhi[:, outputs]), axis=1)
  values, points = _probe(mg, outputs, c_lo.reshape((2 * batch, *shape)), c_hi.reshape((2 * batch, *shape)), worst)
  values = jnp.where(c_valid, values, -jnp.inf)
  points = points.reshape(2 * batch, n)
  best = jnp.argmax(values)
  better = values[best] > state.lower
  lower = jnp.where(better, values[best], state.lower)
  witness = jnp.where(better, points[best], state.witness)
  gap = jnp.where(c_valid, values - up, -jnp.inf)
  worst_gap = jnp.argmax(gap)
  bad = gap[worst_gap] > state.violation
  violation = jnp.where(bad, gap[worst_gap], state.violation)
  bad_point = jnp.where(bad, points[worst_gap], state.bad_point)
  bad_lo = jnp.where(bad, dlo[worst_gap], state.bad_lo)
  bad_hi = jnp.where(bad, dhi[worst_gap], state.bad_hi)
  # Root bounds: the first iteration bounds the root (fresh) as child 0.
  root_lo = jnp.where(fresh[0], dlo[0], state.root_lo)
  root_hi = jnp.where(fresh[0], dhi[0], state.root_hi)
  # Children whose bound decides nothing more are finished; the rest go back into free slots.
  done_at = jnp.maximum(epsilon, (1 + target_gap) * lower)
  open_ = c_valid & (up > done_at)
  closed = c_valid & ~open_
  # Parents that could not be split (single points) are finished as they are.
  stuck = active & ~splittable & ~fresh
  closed_up = jnp.maximum(state.closed_up, jnp.max(jnp.where(closed, up, -jnp.inf)))
  closed_up = jnp.maximum(closed_up, jnp.max(jnp.where(stuck, top, -jnp.inf)))
  closed_lo = jnp.minimum(state.closed_lo, jnp.min(jnp.where(closed[:, None], dlo, jnp.inf), axis=0))
  closed_hi = jnp.maximum(state.closed_hi, jnp.max(jnp.where(closed[:, None], dhi, -jnp.inf), axis=0))
  closed_lo = jnp.minimum(closed_lo, jnp.min(jnp.where(stuck[:, None], state.dlo[idx], jnp.inf), axis=0))
  closed_hi = jnp.maximum(closed_hi, jnp.max(jnp.where(stuck[:, None], state.dhi[idx], -jnp.inf), axis=0))
  # Free the taken parents, then write the open children into free slots.
  taken = jnp.where(active, idx, capacity)
  up_buf = state.up.at[taken].set(-jnp.inf, mode="drop")
  fresh_buf = state.fresh.at[taken].set(False, mode="drop")
  slots = jnp.nonzero(up_buf == -jnp.inf, size=2 * batch, fill_value=capacity)[0]
  where = jnp.where(open_, slots[jnp.cumsum(open_) - 1], capacity)
  put = lambda buf, v: buf.at[where].set(v, mode="drop")
  prior = tuple((put(a, k[0]), put(b, k[1])) for (a, b), k in zip(state.prior, keep))
  return _State(
      lo=put(state.lo, c_lo), hi=put(state.hi, c_hi), up=put(up_buf, up), fresh=fresh_buf,
      dlo=put(state.dlo, dlo), dhi=put(state.dhi, dhi), sens=put(state.sens, sens), prior=prior,
      closed_up=closed_up, closed_lo=closed_lo, closed_hi=closed_hi, lower=lower, witness=witness,
      root_lo=root_lo, root_hi=root_hi, bounded=state.bounded + jnp.sum(c_valid).astype(jnp.int32),
      violation=violation, bad_point=bad_point, bad_lo=bad_lo, bad_hi=bad_hi)


def _running(state: _State, batch, epsilon, target_gap):
  """Whether the search goes on: an open piece above the finish line, no refutation, room for a
  batch of children."""
  open_ = state.up > _finished_below(state, epsilon, target_gap)
  room = jnp.sum(state.up == -jnp.inf) >= 2 * batch
  refuted = (epsilon > -jnp.inf) & (state.lower > epsilon)
  return jnp.any(open_) & ~refuted & room & (state.violation <= 0)


@functools.partial(jax.jit, static_argnames=("outputs", "batch", "sound", "domain", "relu_rules", "split_rule",
                                    "output_backward", "fresh_vars", "fresh_form",
                                    "fresh_scope"),
                   donate_argnames=("state",),
                   compiler_options=None)
def _run(fg, qg, mg, state: _State, iterations, epsilon, target_gap, *, outputs, batch, sound, domain,
         relu_rules="node", split_rule="bound", output_backward=None, fresh_vars=0, fresh_form=None,
         fresh_scope=None):
  """Up to ``iterations`` steps, fewer if the search ends; returns the state and the steps taken."""
  outs = jnp.asarray(outputs)

  def cond(carry):
    s, i = carry
    return (i < iterations) & _running(s, batch, epsilon, target_gap)

  def body(carry):
    s, i = carry
    return _step(fg, qg, mg, outs, batch, sound, domain, epsilon, target_gap, s, relu_rules, split_rule,
                 output_backward, fresh_vars, fresh_form, fresh_scope), i + 1

  return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))


def _initial_state(fg, lo0, hi0, n_out, capacity, lower, witness) -> _State:
  n = lo0.size
  f32 = np.float32
  up = np.full(capacity, -np.inf, f32)
  up[0] = np.inf
  fresh = np.zeros(capacity, bool)
  fresh[0] = True
  lo = np.zeros((capacity, n), f32)
  hi = np.zeros((capacity, n), f32)
  lo[0], hi[0] = lo0, hi0
  prior = []
  for _ in range(3):
    for i in relu_inputs(fg):
      shape = (capacity, *fg.nodes[i].shape)
      prior.append((np.full(shape, -np.inf, f32), np.full(shape, np.inf, f32)))
  m = (n_out,)
  return _State(lo=lo, hi=hi, up=up, fresh=fresh, dlo=np.zeros((capacity, n_out), f32),
                dhi=np.zeros((capacity, n_out), f32), sens=np.zeros((capacity, n), f32), prior=tuple(prior),
                closed_up=f32(0.0), closed_lo=np.full(m, np.inf, f32), closed_hi=np.full(m, -np.inf, f32),
                lower=f32(lower), witness=np.asarray(witness, f32).reshape(-1), root_lo=np.full(m, -np.inf, f32),
                root_hi=np.full(m, np.inf, f32), bounded=np.int32(0), violation=f32(0.0), bad_point=np.zeros(n, f32),
                bad_lo=np.zeros(m, f32), bad_hi=np.zeros(m, f32))


# Steps per compiled call at first; doubled while a call takes less than REPORT_EVERY / 2.
FIRST_ITERATIONS = 2
MAX_ITERATIONS = 1024


def forward_branch_and_bound(merged, box: Box, *, outputs: Optional[Sequence[int]] = None,
                             time_budget: float = 10.0, target_gap: float = 0.05,
                             epsilon: Optional[float] = None, batch_size: Optional[int] = None,
                             max_pieces: int = 1_000_000, initial_lower: float = 0.0, initial_witness=None,
                             sound: bool = True, report=None, report_every: float = 0.1,
                             domain: Optional[str] = None, relu_rules: Optional[str] = None,
                             split_rule: Optional[str] = None, output_backward: Optional[bool] = None,
                             fresh_vars: Optional[int] = None, fresh_form: Optional[str] = None,
                             fresh_scope: Optional[str] = None):
  """Input-splitting branch and bound with forward symbolic bounds, run on the device.

  The same contract as :func:`qbound.bounds.branch_and_bound` (and the same
  :class:`~qbound.bounds.bab.BabResult`), for paired networks whose nodes
  :mod:`qbound.bounds.forward` bounds (:func:`supported`); meant for inputs of a few entries.

  Args:
    merged: a paired :class:`~qbound.merge.MergedNetwork`.
    box: the input box.
    outputs: indices (into the flattened output) whose error counts; all by default.
    time_budget: seconds before it stops, checked between compiled calls.
    target_gap: stop once ``upper <= (1 + target_gap) * lower``.
    epsilon: if given, stop once ``upper <= epsilon`` (proved) or ``lower > epsilon`` (refuted).
    batch_size: pieces split per iteration (``2 * batch_size`` children bounded); default ``BATCH``.
    max_pieces: most open pieces: the device buffer holds this many, or fewer if they would take
      more than ``BUFFER_BYTES`` (a fixed shape: one compilation); when it is full the search
      stops with ``"max_pieces"``.
    initial_lower, initial_witness: an error already reached.
    sound: proven floating-point margins.
    report: as in :func:`qbound.bounds.branch_and_bound`.
    report_every: seconds between reports (and about the length of one compiled call).
    domain: ``"forward"`` (default), ``"zonotope"`` or ``"both"`` (see ``_bound_children``).
    relu_rules: the forward pass's ReLU rules (:func:`qbound.bounds.forward.forward_diff_bounds`):
      ``"node"`` (default) or ``"equation"`` (NeuroDiff's).
    split_rule: ``"gradient"`` (an interval gradient of ``f - f_q``, :func:`qbound.bounds.splitting.interval_gradient`, as
      NeuroDiff; chains of affine layers, ReLUs and clips only), ``"bound"`` (the output bound's
      coefficients) or ``"auto"`` (default ``SPLIT_RULE``: ``"gradient"`` where it applies).
    output_backward: bound the selected outputs again by one backward pass (default
      ``OUTPUT_BACKWARD``).
    fresh_vars: NeuroDiff's intermediate symbolic variables per ReLU layer in the forward pass
      (``fresh`` of :func:`qbound.bounds.forward.forward_diff_bounds`; default ``FRESH_VARS``; 0: none).
    fresh_form: how they name a neuron (``fresh_form`` there; default its ``FRESH_FORM``).
    fresh_scope: whose neurons get them (``fresh_scope`` there: ``"d"`` or ``"all"``; default its
      ``FRESH_SCOPE``).

  Returns:
    A :class:`~qbound.bounds.bab.BabResult`.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> from qbound.bounds.forward_bab import forward_branch_and_bound
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(2))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=4))
    >>> box = qb.Box(-jnp.ones(2), jnp.ones(2))
    >>> res = forward_branch_and_bound(qb.merge(f, fq, box), box, time_budget=20, target_gap=0.01)
    >>> res.lower <= res.upper <= 1.01 * res.lower or res.stopped == "time"
    True
  """
  from qbound.bounds.bab import BabResult

  start = time.perf_counter()
  box = branch_and_bound_args(merged, box, outputs=outputs, time_budget=time_budget, target_gap=target_gap,
                              epsilon=epsilon, batch_size=batch_size, max_pieces=max_pieces,
                              initial_lower=initial_lower, initial_witness=initial_witness, sound=sound)
  domain = DOMAIN if domain is None else domain
  relu_rules = "node" if relu_rules is None else relu_rules
  output_backward = OUTPUT_BACKWARD if output_backward is None else bool(output_backward)
  from qbound.bounds.forward import resolve_fresh
  fresh_vars, fresh_form, fresh_scope = resolve_fresh(FRESH_VARS if fresh_vars is None else fresh_vars, fresh_form,
                                                      fresh_scope, name="fresh_vars")
  from qbound.bounds.forward import RELU_RULES
  if relu_rules not in RELU_RULES:
    raise ValueError(f"relu_rules must be one of {RELU_RULES}; got {relu_rules!r}.")
  if domain not in ("forward", "zonotope", "both"):
    raise ValueError(f"domain must be 'forward', 'zonotope' or 'both'; got {domain!r}.")
  if domain != "forward":
    zonotope_check_supported(merged.f_graph, merged.fq_graph)
  if not supported(merged):
    kinds = sorted({n.kind for g in (merged.f_graph, merged.fq_graph) for n in g.nodes} - SUPPORTED_KINDS)
    raise ValueError("forward branch and bound needs paired networks (f and f_q of the same structure) of "
                     f"affine layers, adds, concatenations and elementwise activations; got paired={merged.paired}"
                     + (f", unsupported node kinds {kinds}" if kinds else "") + ". Use qbound.bounds.branch_and_bound.")
  split_rule = resolve_split_rule(merged, merged.paired, SPLIT_RULE if split_rule is None else split_rule)
  n_out = int(np.prod(merged.output_shape))
  outputs = tuple(range(n_out)) if outputs is None else tuple(int(o) for o in outputs)
  batch = BATCH if batch_size is None else int(batch_size)
  kept = sum(fg_node.size for fg_node in (merged.f_graph.nodes[i] for i in relu_inputs(merged.f_graph)))
  shape = tuple(box.shape)
  lo0 = np.asarray(box.lower, np.float32).reshape(-1)
  hi0 = np.asarray(box.upper, np.float32).reshape(-1)
  per_piece = 4 * (4 * lo0.size + 3 * n_out + 6 * kept) + 2
  capacity = max(min(int(max_pieces), BUFFER_BYTES // per_piece), 4 * batch)
  witness0 = (lo0 + hi0) / 2 if initial_witness is None else np.asarray(initial_witness, np.float32).reshape(-1)
  state = jax.device_put(_initial_state(merged.f_graph, lo0, hi0, n_out, capacity, initial_lower, witness0))
  eps = np.float32(-np.inf if epsilon is None else epsilon)  # the finish line without an epsilon: the gap alone
  gap = np.float32(target_gap)
  fg, qg, mg = merged.f_graph, merged.fq_graph, merged.graph
  iterations = FIRST_ITERATIONS
  while True:
    t = time.perf_counter()
    state, _ = _run(fg, qg, mg, state, np.int32(iterations), eps, gap, outputs=outputs, batch=batch,
                        sound=sound, domain=domain, relu_rules=relu_rules, split_rule=split_rule,
                        output_backward=output_backward, fresh_vars=fresh_vars, fresh_form=fresh_form,
                        fresh_scope=fresh_scope)
    up, closed_up, lower, violation, free = jax.device_get(
        (jnp.max(state.up), state.closed_up, state.lower, state.violation, jnp.sum(state.up == -jnp.inf)))
    if violation > 0:  # in float32: look again in float64 before calling it a bug
      point, dlo, dhi = jax.device_get((state.bad_point, state.bad_lo, state.bad_hi))
      guards.check_points(mg, point.reshape((1, *shape)), dlo[None].astype(np.float64), dhi[None].astype(np.float64),
                          sound=sound, what="forward branch and bound, a piece's bounds", outputs=np.asarray(outputs))
      state = state._replace(violation=jnp.float32(0.0))
    elapsed = time.perf_counter() - t
    upper = max(float(up), float(closed_up))
    if report is not None:
      root_lo, root_hi, witness = jax.device_get((state.root_lo, state.root_hi, state.witness))
      report(root_lo.astype(np.float64), root_hi.astype(np.float64), upper, float(lower), witness.reshape(shape))
    if epsilon is not None and lower > epsilon:
      stopped = "refuted"
      break
    if float(up) <= max(float(eps), (1 + float(gap)) * float(lower)):  # no open piece left to split
      if epsilon is not None and upper <= epsilon:
        stopped = "proved"
      elif lower > 0 and lower < upper <= (1 + target_gap) * lower:
        stopped = "gap"
      else:
        stopped = "exhausted"
      break
    if free < 2 * batch:
      stopped = "max_pieces"
      break
    if time.perf_counter() - start > time_budget:
      stopped = "time"
      break
    if elapsed < report_every / 2:
      iterations = min(2 * iterations, MAX_ITERATIONS)
  s = jax.device_get(state)
  open_ = s.up > -np.inf
  diff_lower = np.minimum(s.closed_lo, np.min(np.where(open_[:, None], s.dlo, np.inf), axis=0)).astype(np.float64)
  diff_upper = np.maximum(s.closed_hi, np.max(np.where(open_[:, None], s.dhi, -np.inf), axis=0)).astype(np.float64)
  upper = max(float(np.max(s.up)), float(s.closed_up))
  return BabResult(upper=upper, lower=float(s.lower), witness=s.witness.reshape(shape), diff_lower=diff_lower,
                   diff_upper=diff_upper, pieces_bounded=int(s.bounded), pieces_left=int(np.sum(open_)),
                   stopped=stopped, seconds=time.perf_counter() - start, layout=None,
                   root_lower=s.root_lo.astype(np.float64), root_upper=s.root_hi.astype(np.float64))
