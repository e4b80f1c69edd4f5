"""Backward bounds only where they matter: many boxes, and rows only for the neurons that need them.

Bounding a node of ``n`` neurons backward costs ``2n`` rows carried to the input, and the bounds
of an activation's input only matter where its relaxation is not exact (:func:`rules.loose`: a
ReLU whose input changes sign, a clip crossing a cut...). On the small pieces branch and bound
spends its time on, few neurons are such at the first layers: on ACAS Xu pieces of 1/16 of property
1's box, about 4 of each layer's 50 under CROWN (the last three hidden layers still take 33-50 rows a
piece once padded, docs/results/acas-batch.md). So the node's bounds are first taken from interval arithmetic on
its inputs' (already tightened) bounds; then only the ``(box, neuron)`` pairs loose there get
backward rows (every box as many as the box with the most loose neurons, padded to a power of two
so that few row counts are compiled), and the result is intersected with any bounds known to hold
(a parent piece's, in branch and bound; see ``PRIOR_AFTER_ROWS`` for why after the rows). The
bounds are those of the dense passes (:func:`qbound.bounds.crown.crown_bounds`,
:func:`qbound.bounds.diff.diff_bounds`) wherever they could change anything, at a fraction of the
work.

Runs eagerly (it reads on the host which rows to compute); under ``jax.jit`` use the dense passes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound._recent import Recent
from qbound.bounds import fp, nonlinear, rms_rest, rules, tiesplit
from qbound.bounds import fused as fused_programs
from qbound.bounds.common import local
from qbound.bounds.crown import ACTIVATIONS, backward_lower, intersect, relu_inputs
from qbound.bounds.diff import _activation_lines as _diff_lines
from qbound.bounds.diff import _diff_interval_step, _tighten, diff_backward_lower
from qbound.bounds.guards import check_bounds
from qbound.bounds.interval import _node_interval
from qbound.bounds.rows import first_set_entries
from qbound.box import Box

# Each box's rows are padded to a power of ROW_GROWTH, at least MIN_ROWS: every row count compiles
# each backward step once more (about 0.1-0.3 s each on ACAS Xu's layers), and padding rows cost little.
MIN_ROWS = 16
ROW_GROWTH = 2


def _padded(count: int) -> int:
  size = MIN_ROWS
  while size < count:
    size *= ROW_GROWTH
  return size


def _rows_for(count: int, neurons: int) -> int:
  """The rows each box gets when the box with the most set entries has ``count`` (none for 0)."""
  return min(_padded(count), neurons) if count > 0 else 0


@functools.partial(jax.jit, static_argnames=("shape",))
def _pair_rows(flat, shape, like):
  """Rows ``+e_k`` and ``-e_k`` for every ``k`` in ``flat`` (boxes, R): shape ``(boxes, 2R, *shape)``,
  ``[R; -R]`` (the two rows of ``flat[b, r]`` at ``r`` and ``R + r``), so that a walk's first,
  linear step takes half of them (``signed_pairs``, :func:`qbound.bounds.common.mirror_rows`)."""
  n = int(np.prod(shape))
  unit = jax.nn.one_hot(flat, n, dtype=like.dtype)
  rows = jnp.concatenate([unit, -unit], axis=1)
  return rows.reshape((flat.shape[0], 2 * flat.shape[1], *shape))


@jax.jit
def _scatter(bounds, flat, low):
  """``bounds`` (lower, upper; leading axis of boxes) intersected with the rows' results ``low``
  (boxes, 2R) of the neurons ``flat`` (boxes, R), rows laid out as :func:`_pair_rows` makes them."""
  lo, hi = bounds
  batch, shape = lo.shape[0], lo.shape[1:]
  count = flat.shape[1]
  box = jnp.arange(batch)[:, None]
  new_lo = lo.reshape(batch, -1).at[box, flat].max(low[:, :count])
  new_hi = hi.reshape(batch, -1).at[box, flat].min(-low[:, count:])
  return new_lo.reshape((batch, *shape)), new_hi.reshape((batch, *shape))


def tighten_where(bounds, mask, lower_fn, state, sound: bool = True):
  """``bounds`` tightened by backward rows where ``mask`` is set (one row pair per set entry).

  Every box gets as many rows as the box with the most set entries needs (padded, see
  :func:`_padded`), so the rows share the boxes' leading axis and the backward pass reads each
  box's own bounds without gathering them row by row (gathering the bounds of every earlier node
  compiled one program per node and row count: most of a first branch and bound's time).

  Args:
    bounds: ``(lower, upper)`` of one node, leading axis of boxes.
    mask: where to compute rows (same shape as the bounds).
    lower_fn: ``(rows (boxes, 2R, *shape), state) -> (boxes, 2R)`` lower bounds of the rows, the
      rows of each box with the state of that box.
    state: a pytree with a leading axis of boxes (the boxes, the bounds of earlier nodes).
    sound: whether the bounds have rounding margins (else crossed ends are put back in order, see
      :func:`qbound.bounds.crown.intersect`).
  """
  lo = bounds[0]
  where = np.asarray(mask).reshape(lo.shape[0], -1)
  counts = where.sum(axis=1)
  most = int(counts.max(initial=0))
  if most == 0:
    return bounds
  flat = jnp.asarray(first_set_entries(where, _rows_for(most, where.shape[1]))[0])
  return _tightened_at(bounds, flat, lower_fn, state, sound)


def _tightened_at(bounds, flat, lower_fn, state, sound: bool):
  """``bounds`` met with the lower bounds of the row pairs of the neurons ``flat`` (boxes, R)."""
  lo = bounds[0]
  out = _scatter(bounds, flat, lower_fn(_pair_rows(flat, tuple(lo.shape[1:]), lo), state))
  return out if sound else fp.unsound_order(out)


def tighten_ahead(bounds, mask, lower_fn, state, size: int, sound: bool = True):
  """:func:`tighten_where` with each box's row count ``size`` chosen in advance (a branch and bound's
  earlier batches: :func:`diff_bounds_sparse`'s ``row_sizes``), so that nothing is read to the host
  and the walks queue behind each other (the indices by a program of their own once compiled,
  :func:`qbound.bounds.fused.row_indices`; read on the host until then). Returns ``(bounds,
  most)``: ``most`` (on the device, or an int) the largest number of set entries in a box; where it
  exceeds ``size`` some entries got no row and kept their (sound, looser) bounds, and the caller
  bounds the batch again with larger sizes."""
  if size == 0:
    return bounds, int(np.asarray(mask).reshape(mask.shape[0], -1).sum(axis=1).max(initial=0))
  flat, most = fused_programs.row_indices(mask, size)
  return _tightened_at(bounds, flat, lower_fn, state, sound), most


def _consumers(graph: G.Graph) -> list[list[int]]:
  """For every node, the activation nodes that read it."""
  out: list[list[int]] = [[] for _ in graph.nodes]
  for idx, node in enumerate(graph.nodes):
    if node.kind in ACTIVATIONS:
      out[node.inputs[0]].append(idx)
    elif node.kind in G.NONLINEAR:  # products and curves: loose wherever an input is not a point
      for i in node.inputs:
        out[i].append(idx)
  return out


@jax.jit
def _loose_any(nodes, bounds):
  """Where any of the activation ``nodes`` reading a node with ``bounds`` is loose."""
  lo, hi = bounds
  out = jnp.zeros(lo.shape, bool)
  for node in nodes:
    out = out | rules.loose(local(node), lo, hi)
  return out


@jax.jit
def _diff_loose_any(pairs, z, zq, d):
  lo = d[0]
  out = jnp.zeros(lo.shape, bool)
  for nf, nq in pairs:
    out = out | rules.diff_loose(local(nf), local(nq), z, zq, d)
  return out


# Whether a parent piece's bounds (``prior``) meet an activation input's bounds only after that
# node's CROWN rows, which then go wherever the piece's own interval bounds are loose (False: met
# before, and rows only where the met bounds are still loose). Met before, a neuron the parent's
# bounds call stable got no row, so it kept the parent's wider interval: the intervals of later
# layers widened with it, z = z_q + d with them, and a neuron a fresh pass proves inactive became
# unstable. On ACAS Xu 1_1 vs float16 a child's bound on f - f_q came out up to 3x its own fresh
# bound (2.76e-5 against 9.4e-6 on the open pieces after 30 s; a third of the 256 worst were
# looser by 2x or more). After: branch and bound certifying the maximal error of output 0 on
# property 1 went from upper/lower 1.89 to 1.13 in 30 s (load 6-7); epsilon 0.05 on 1_1..1_9 took
# the same pieces (fewer for all five outputs) and no longer (docs/results/acas-f16-gap.md).
PRIOR_AFTER_ROWS = True
# The same for crown_bounds_sparse (CROWN on the merged network: pairs whose layers do not pair, or
# without a differential rule). ACAS Xu 1_1 against its float16 and its 10%-pruned copies bounded that
# way (maximal error of output 0 on property 1's box, equal pieces; benchmarks/bench_crown_prior.py):
# upper/lower 70-127 against 175-183, and 1.02 against 2.25 (docs/results/acas-f16-gap.md).
CROWN_PRIOR_AFTER_ROWS = True

# Whether the walks of diff_bounds_sparse share each activation's relaxation lines (see there).
SHARE_LINES = True


# Whether targets whose interval bounds are exact already get no backward rows (see exact_targets).
SKIP_EXACT_TARGETS = True


def _entrywise(node: G.Node) -> bool:
  """Whether each entry of the node is a function of the same entry of its one input alone, so
  that it maps a box of inputs onto a box (every corner combination reachable)."""
  if len(node.inputs) != 1:
    return False
  if node.kind in ACTIVATIONS:
    return True
  if node.kind != G.AFFINE:
    return False
  op = node.op
  if op is None:  # x + b
    return True
  # x * w, x / w with w broadcast to x (the elementwise case of qbound.trace.linear's term counts)
  return ((op.name == "mul" or (op.name == "div" and op.var_pos == 0)) and len(node.weights) == 1
          and tuple(op.in_shape) == tuple(op.out_shape) == tuple(node.shape))


def _same_node(a: G.Node, b: G.Node) -> bool:
  if (a.kind, a.inputs, a.op, a.attrs) != (b.kind, b.inputs, b.op, b.attrs) or len(a.weights) != len(b.weights):
    return False
  if (a.bias is None) != (b.bias is None):
    return False
  pairs = list(zip(a.weights, b.weights)) + ([] if a.bias is None else [(a.bias, b.bias)])
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def exact_targets(fg: G.Graph, qg: Optional[G.Graph] = None) -> tuple[frozenset, frozenset]:
  """Targets whose interval bounds CROWN's rows cannot tighten: ``(own, diff)``.

  ``own``: affine nodes reading a node whose values fill a box (the input, or entrywise maps of it:
  an ``.nnet`` file's clip and normalisation), in both graphs. Each entry is then a linear function
  over a box, whose interval bound is its exact range, which is also all that a backward row
  proves (up to rounding). ``diff`` (paired graphs): those of ``own`` where f and f_q read the
  same values (every node before the target equal in both), so that ``d = (W - W_q) x + (b - b_q)``
  is linear over the same box. On ACAS Xu these are the first dense layer's rows: 18 of each
  network's 50 neurons a piece, padded to 32, through four steps (see docs/results/acas-batch.md).
  """
  key, pair = (id(fg), id(qg)), (fg, qg)
  found = _exact_kept.get(key, pair)
  if found is None:
    found = _exact_targets(fg, qg)
    _exact_kept.put(key, found, pair)
  return found


# exact_targets of the last few graphs (or pairs): every batch of a branch and bound asks again, and
# comparing the weights read each one back from the device (18 arrays a batch on ACAS Xu).
_exact_kept = Recent(size=8)


def _exact_targets(fg: G.Graph, qg: Optional[G.Graph]) -> tuple[frozenset, frozenset]:
  graphs = [fg] if qg is None else [fg, qg]
  boxlike = [[False] * len(g.nodes) for g in graphs]
  for b, g in zip(boxlike, graphs):
    for i, node in enumerate(g.nodes):
      b[i] = i == 0 or (_entrywise(node) and b[node.inputs[0]])
  own = {i for i, node in enumerate(fg.nodes)
         if node.kind == G.AFFINE and len(node.inputs) == 1 and all(b[node.inputs[0]] for b in boxlike)}
  if qg is None:
    return frozenset(own), frozenset()
  diff = set()
  for i in sorted(own):
    if all(_same_node(fg.nodes[j], qg.nodes[j]) for j in range(1, fg.nodes[i].inputs[0] + 1)):
      diff.add(i)
  return frozenset(own), frozenset(diff)


def _known(prior, i):
  return None if prior is None or prior[i] is None else prior[i]


class SparseDiff(NamedTuple):
  """What :func:`diff_bounds_sparse` returns: per node ``(lower, upper)`` of f (``z``), f_q (``zq``)
  and the difference (``d``), each with a leading axis of boxes; per target, the mask of the neurons
  given differential rows (0 where none); and
  the input coefficients of the output's bounds, ``(boxes, 2 * outputs, *input shape)`` (lower
  rows of the selected outputs, then upper ones), or None."""

  z: list
  zq: list
  d: list
  rows: dict
  coefficients: Optional[jnp.ndarray]


@functools.partial(jax.jit, static_argnames=("n", "shape", "dtype", "batch"))
def output_rows(n: int, outputs, shape, dtype, batch: int):
  eye = jnp.eye(n, dtype=dtype)[jnp.asarray(outputs)]
  rows = jnp.concatenate([eye, -eye]).reshape((2 * len(outputs), *shape))
  return jnp.broadcast_to(rows, (batch, *rows.shape))


@jax.jit
def output_scatter(bounds, outputs, low):
  lo, hi = bounds
  batch, shape = lo.shape[0], lo.shape[1:]
  k = outputs.shape[0]
  new_lo = lo.reshape(batch, -1).at[:, outputs].max(low[:, :k])
  new_hi = hi.reshape(batch, -1).at[:, outputs].min(-low[:, k:])
  return new_lo.reshape((batch, *shape)), new_hi.reshape((batch, *shape))


def _walks(by_programs: bool):
  """The batched backward walks: each by its own program once compiled (:mod:`qbound.bounds.fused`),
  or step by step."""
  if by_programs:
    return fused_programs.crown_lower, fused_programs.diff_lower
  return functools.partial(backward_lower, batched=True), functools.partial(diff_backward_lower, batched=True)


def diff_bounds_sparse(fg: G.Graph, qg: G.Graph, box: Box, *, sound: bool = True, f_crown: bool = True,
                       prior: Optional[Sequence] = None, outputs: Optional[Sequence[int]] = None,
                       coefficients: bool = False, check: bool = True, every_neuron: bool = False,
                       own_output_rows: bool = False, hidden_diff_rows: bool = True,
                       fused: bool = False, row_sizes: Optional[dict] = None) -> SparseDiff:
  """Differential bounds of two paired graphs over a batch of boxes, rows only where they matter.

  The same bounds as :func:`qbound.bounds.diff.diff_bounds` (``batched=True``) where they could
  change a relaxation, in one forward sweep: each node's intervals from its inputs' tightened
  bounds (and ``prior``), then, at an activation's input, CROWN rows for f_q's and f's loose
  neurons and differential rows where the pair's lines are loose; at the output, rows for the
  selected outputs only.

  Args:
    fg, qg: the traced f and f_q (same structure).
    box: boxes along a leading axis.
    sound: proven floating-point margins.
    f_crown: f's own CROWN rows (False: f's bounds from intervals and ``z = z_q + d`` only).
    prior: optional ``(z, zq, d)`` lists of bounds known to hold on each box (leading axis of
      boxes; None entries skipped), e.g. a parent piece's.
    outputs: the flat output indices whose difference is bounded by rows (default all); the
      others keep their interval bounds.
    coefficients: also return the output rows' input coefficients.
    check: raise for empty or NaN intervals (:mod:`qbound.bounds.guards`).
    every_neuron: rows for every neuron of every activation's input, loose or not, on the steps
      compiled for the sparse ones: close to the dense passes' bounds (not equal: the intervals are
      intersected in another order), for measuring how close f_q is to f.
    own_output_rows: also CROWN rows of the selected outputs in f and in f_q, met with the
      differential ones through ``d = z - z_q``. Where f_q really differs from f, that is the
      tighter bound on many pieces (ACAS Xu pruned pairs, property 8: 17% below the interval
      bounds of ``z`` and ``z_q`` the output took without them; ``bab_batch.OWN_OUTPUT_ROWS``).
    hidden_diff_rows: differential rows at the activations' inputs where the pair's lines are loose
      (False: ``d`` there from its forward intervals met with ``z - z_q`` only; the output keeps its
      rows). Pairs that really differ, whose own rows hold the bound, go faster without
      (``bab_batch.DIFFERING_HIDDEN_DIFF_ROWS``).
    fused: each backward walk, and each node's forward intervals, by one compiled program once a
      worker thread has compiled it (:mod:`qbound.bounds.fused`; the same bounds, fewer
      dispatches): for branch and bound's many batches of one shape.
    row_sizes: a dict kept by the caller across calls on batches of the same networks (branch and
      bound's), per target and walk the rows each box got last time. Where it holds a size, the
      row indices are computed on the device for that size (:func:`tighten_ahead`) and nothing is
      read to the host until the end, so the walks queue behind each other while Python prepares
      the next; a box that needed more rows than its size makes the pass run again with the sizes
      it needed (the same bounds as without, up to the order of floating-point sums). Where it
      holds none, the counts are read as usual and recorded.
  """
  passes = dict(sound=sound, f_crown=f_crown, prior=prior, outputs=outputs, coefficients=coefficients,
                every_neuron=every_neuron, own_output_rows=own_output_rows, hidden_diff_rows=hidden_diff_rows,
                fused=fused)
  out = None if row_sizes is None else _with_sizes_ahead(fg, qg, box, row_sizes, passes)
  if out is None:
    out = _diff_bounds_sparse(fg, qg, box, **passes)
  if check:
    check_bounds([("differential bounds: f's nodes", fg, out.z), ("differential bounds: f_q's nodes", qg, out.zq),
                  ("differential bounds: d = f - f_q", fg, out.d)], sound=sound,
                 counter=fused_programs.bound_counts if fused else None)
  return out


# How many passes ran again because a box needed more rows than its size (for benchmarks).
PASSES_AGAIN = [0]


def _with_sizes_ahead(fg, qg, box, row_sizes: dict, passes: dict) -> Optional[SparseDiff]:
  """The pass with the row counts of ``row_sizes`` (see :func:`diff_bounds_sparse`), run again with
  the counts a box needed while some box needed more; None if they still grew after three passes."""
  for _ in range(3):
    pending: list = []
    out = _diff_bounds_sparse(fg, qg, box, **passes, row_sizes=row_sizes, pending=pending)
    short = False
    for (key, size, n, _), count in zip(pending, jax.device_get([m for _, _, _, m in pending])):
      row_sizes[key] = _rows_for(int(count), n)
      short = short or count > size
    if not short:
      return out
    PASSES_AGAIN[0] += 1
  return None


def _diff_bounds_sparse(fg, qg, box, *, sound, f_crown, prior, outputs, coefficients, every_neuron,
                        own_output_rows, hidden_diff_rows, fused, row_sizes=None, pending=None) -> SparseDiff:
  """:func:`diff_bounds_sparse`'s pass; with ``row_sizes``, row counts taken from it where it has
  them (each appended to ``pending`` as ``(key, size, neurons, most)``) and recorded where not."""
  nonlinear.require_none(fg, "differential bounds")
  # With the programs, each walk's first step takes half of its row pairs (signed_pairs); step by
  # step, the extra slicing and mirroring cost as much as they save (ACAS Xu batches: 37.6-39.7 ms
  # against 35.6-38.2 ms).
  crown_walk, diff_walk = _walks(fused)
  n_nodes = len(fg.nodes)

  def loose(mask):
    return jnp.ones(mask.shape, bool) if every_neuron else mask

  out_idx = fg.output
  n_out = fg.nodes[out_idx].size
  outputs = np.arange(n_out) if outputs is None else np.asarray(outputs, np.int64)
  targets = set(relu_inputs(fg))
  exact_own, exact_diff = exact_targets(fg, qg) if SKIP_EXACT_TARGETS else (set(), set())
  cons_f, cons_q = _consumers(fg), _consumers(qg)
  zero = jnp.zeros_like(box.lower)
  z, zq, d = [(box.lower, box.upper)], [(box.lower, box.upper)], [(zero, zero)]
  rows: dict = {}
  coef = None
  boxes = (box.lower, box.upper)
  def tighten(key, bounds, mask, lower_fn, state):
    """tighten_where, or with row_sizes its row count from earlier batches (tighten_ahead)."""
    n = int(np.prod(bounds[0].shape[1:]))
    size = None if row_sizes is None else row_sizes.get(key)
    if size is not None:
      size = min(size, n)
    if size is None:
      if row_sizes is not None:  # recorded for the next batches
        counts = np.asarray(mask).reshape(mask.shape[0], -1).sum(axis=1)
        row_sizes[key] = _rows_for(int(counts.max(initial=0)), n)
      return tighten_where(bounds, mask, lower_fn, state, sound=sound)
    out, most = tighten_ahead(bounds, mask, lower_fn, state, size, sound=sound)
    pending.append((key, size, n, most))
    return out

  # Each activation pair's relaxation lines, computed once its input's bounds are final and shared
  # by the walks from every later target (else each walk computed them again: 30 more steps per
  # batch of ACAS Xu pieces): (differential lines, f_q's lines).
  lines: dict = {}
  for i in range(1, n_nodes):
    nf, nq = fg.nodes[i], qg.nodes[i]
    ins = nf.inputs
    z_in, q_in, d_in = (tuple(b[j] for j in ins) for b in (z, zq, d))
    step_by_step = lambda: (_node_interval(local(nf), z_in, sound=sound, batched=True),
                            _node_interval(local(nq), q_in, sound=sound, batched=True),
                            _diff_interval_step(local(nf), local(nq), z_in, q_in, d_in, sound=sound, batched=True))
    if fused:
      zi, qi, di = fused_programs.node_intervals(local(nf), local(nq), z_in, q_in, d_in, sound=sound,
                                                 fallback=step_by_step)
    else:
      zi, qi, di = step_by_step()
    if nf.kind in ACTIVATIONS and SHARE_LINES:
      extra = None
      if rms_rest.applies(nq):  # which entries of an rms quantization can saturate: three rows per entry
        extra = {"rest": rms_rest.joint_bounds(qg, i, zq, box, backward_lower, sound=sound, batched=True,
                                               lines={k: v[1] for k, v in lines.items()})}
      elif sound and tiesplit.applies(nq) and prior is not None and _known(prior[1], i) is not None:
        # A sub-problem's bounds on the value may pin its step (float-sound bounds only: an
        # unsound prior may miss the value by more than the slack and pin a step that is not there).
        extra = {"rest": _known(prior[1], i)}
      lines[i] = _diff_lines(local(nf), local(nq), tuple(z[j] for j in ins), tuple(zq[j] for j in ins),
                             tuple(d[j] for j in ins), extra, sound=sound, batched=True)
    meet = lambda bounds: tuple(b if _known(p, i) is None else intersect(b, p[i], sound=sound)
                                for b, p in zip(bounds, prior))
    late = PRIOR_AFTER_ROWS and i in targets
    if prior is not None and not late:
      zi, qi, di = meet((zi, qi, di))
    if i in targets:
      if i not in exact_own:  # (else intervals are exact: no row could tighten them)
        state_q = {"box": boxes, "bounds": zq + [qi], "lines": {k: v[1] for k, v in lines.items()}}
        qi = tighten(("q", i), qi, loose(_loose_any(tuple(qg.nodes[c] for c in cons_q[i]), qi)),
                     lambda r, g, i=i: crown_walk(qg, i, r, g["bounds"], Box(*g["box"]), sound=sound,
                                                  lines=g["lines"], signed_pairs=fused), state_q)
      if f_crown and i not in exact_own:
        state_f = {"box": boxes, "bounds": z + [zi]}
        zi = tighten(("f", i), zi, loose(_loose_any(tuple(fg.nodes[c] for c in cons_f[i]), zi)),
                     lambda r, g, i=i: crown_walk(fg, i, r, g["bounds"], Box(*g["box"]), sound=sound,
                                                  signed_pairs=fused), state_f)
      if prior is not None and late:
        zi, qi, di = meet((zi, qi, di))
      zi, qi, di = _tighten(zi, qi, di, sound)
      if i in exact_diff or not hidden_diff_rows:
        rows[i] = 0
      else:
        pairs = tuple((fg.nodes[c], qg.nodes[c]) for c in cons_f[i])
        mask = loose(_diff_loose_any(pairs, zi, qi, di))
        rows[i] = mask
        state_d = {"box": boxes, "z": z + [zi], "zq": zq + [qi], "d": d + [di], "lines": dict(lines)}
        di = tighten(("d", i), di, mask, lambda r, g, i=i: diff_walk(
            fg, qg, i, r, g["z"], g["zq"], g["d"], Box(*g["box"]), sound=sound, lines=g["lines"], signed_pairs=fused),
            state_d)
        zi, qi, di = _tighten(zi, qi, di, sound)
    elif i == out_idx:
      shape = tuple(nf.shape)
      out_rows = output_rows(nf.size, outputs, shape, box.lower.dtype, box.lower.shape[0])
      selected = jnp.asarray(outputs)
      if own_output_rows:
        low_q = crown_walk(qg, i, out_rows, zq + [qi], box, sound=sound, lines={k: v[1] for k, v in lines.items()},
                           signed_pairs=fused)
        qi = output_scatter(qi, selected, low_q)
        zi = output_scatter(zi, selected, crown_walk(fg, i, out_rows, z + [zi], box, sound=sound, signed_pairs=fused))
      low = diff_walk(fg, qg, i, out_rows, z + [zi], zq + [qi], d + [di], box, sound=sound,
                      with_coefficients=coefficients, lines=lines, signed_pairs=fused)
      if coefficients:
        low, coef = low
      di = output_scatter(di, selected, low)
      zi, qi, di = _tighten(zi, qi, di, sound)
    z.append(zi)
    zq.append(qi)
    d.append(di)
  return SparseDiff(z, zq, d, rows, coef)


def crown_bounds_sparse(graph: G.Graph, box: Box, *, sound: bool = True, prior: Optional[Sequence] = None,
                        outputs: Optional[Sequence[int]] = None, coefficients: bool = False,
                        check: bool = True):
  """CROWN bounds of every node over a batch of boxes, rows only where they matter (see the module
  docstring): :func:`qbound.bounds.crown.crown_bounds` where it could change anything.

  Returns the list of every node's bounds; with ``coefficients``, ``(bounds, coefficients)`` with
  the output rows' input coefficients as in :class:`SparseDiff`."""
  out_idx = graph.output
  outputs = np.arange(graph.nodes[out_idx].size) if outputs is None else np.asarray(outputs, np.int64)
  targets = set(relu_inputs(graph)) - (exact_targets(graph)[0] if SKIP_EXACT_TARGETS else set())
  cons = _consumers(graph)
  bounds = [(box.lower, box.upper)]
  boxes = (box.lower, box.upper)
  coef = None
  for i in range(1, len(graph.nodes)):
    node = graph.nodes[i]
    b = _node_interval(local(node), tuple(bounds[j] for j in node.inputs), sound=sound, batched=True)
    late = CROWN_PRIOR_AFTER_ROWS and i in targets
    if _known(prior, i) is not None and not late:
      b = intersect(b, prior[i], sound=sound)
    if i in targets:
      b = tighten_where(b, _loose_any(tuple(graph.nodes[c] for c in cons[i]), b),
                        lambda r, g, i=i: backward_lower(graph, i, r, g["bounds"], Box(*g["box"]), sound=sound,
                                                         batched=True), {"box": boxes, "bounds": bounds + [b]},
                        sound=sound)
      if _known(prior, i) is not None and late:
        b = intersect(b, prior[i], sound=sound)
    elif i == out_idx:
      out_rows = output_rows(node.size, outputs, tuple(node.shape), box.lower.dtype, box.lower.shape[0])
      low = backward_lower(graph, i, out_rows, bounds + [b], box, sound=sound, batched=True,
                           with_coefficients=coefficients)
      if coefficients:
        low, coef = low
      b = output_scatter(b, jnp.asarray(outputs), low)
    bounds.append(b)
  if check:
    check_bounds([("CROWN bounds", graph, bounds)], sound=sound)
  return (bounds, coef) if coefficients else bounds
