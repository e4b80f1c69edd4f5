"""Bounds on ``f - f_q`` over one batch of pieces: the bounding step of :mod:`qbound.bounds.bab`.

Differential bounds for paired networks (:mod:`qbound.bounds.sparse`'s passes with backward rows
only where they matter, or the dense passes on close copies of small nets; ReluDiff, Paulsen et al.,
ICSE 2020; NeuroDiff, Paulsen et al., ASE 2020), met with differential zonotopes on request
(VeryDiff, Teuber et al., TACAS 2025), and CROWN on the merged network otherwise (Zhang et al.,
NeurIPS 2018). Each returns what branch and bound needs from a batch: the output's bounds, the
coefficients its split rule reads, and the bounds a piece passes on to its children.

Example (the root box of a random pair as a batch of one piece):
  >>> import jax, jax.numpy as jnp, qbound as qb
  >>> from qbound.bounds.bab_batch import batch_bounds
  >>> params = [(jax.random.normal(jax.random.key(i), (2, 2)), jnp.zeros(2)) for i in range(2)]
  >>> def mlp(p, x):
  ...   return jax.nn.relu(x @ p[0][0] + p[0][1]) @ p[1][0] + p[1][1]
  >>> f, fq = (lambda x: mlp(params, x)), (lambda x: mlp(qb.quantize.uniform(params, bits=4), x))
  >>> box = qb.Box(-jnp.ones(2), jnp.ones(2))
  >>> m = qb.merge(f, fq, box)
  >>> (lo, hi), coefficients, keep = batch_bounds(m.f_graph, m.fq_graph, m.graph, box.lower[None], box.upper[None],
  ...                                             True, True, jnp.arange(2))
  >>> bool(jnp.all(lo <= hi)), coefficients.shape
  (True, (1, 4, 2))
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound.merge import same_structure
from qbound.bounds import tiesplit
from qbound.bounds.crown import relu_inputs
from qbound.bounds.diff import diff_backward_lower, diff_bounds
from qbound.bounds.sparse import crown_bounds_sparse, diff_bounds_sparse, output_rows, output_scatter
from qbound.bounds.splitting import gradient_coefficients
from qbound.bounds.zonotope import diff_zonotope_batch as zonotope_batch
from qbound.box import Box

# Fresh zonotope generators kept per layer and network (see qbound.bounds.zonotope._fresh): on
# pieces of ACAS Xu property 1 (1/4 to 1/64 of the box), 16 cost 0.9 ms a piece against 2-3 ms for
# all, at the same median bound (benchmarks/bench_pieces.py).
ZONOTOPE_KEEP = 16
# With the zonotopes, split by their generator influence (VeryDiff's heuristic) rather than by the
# differential bound's input coefficients. Off: on ACAS Xu pruned pairs at epsilon 0.05 (20 s, warm,
# shared cores) it proved 1_1 property 1 in 477 pieces against 605 (861 without zonotopes), but took
# 2,013 pieces against 1,309 on 1_3 property 3 and ended 1_6 and 1_8 property 8 at uppers 9.5 and
# 1.14 against 2.7 and 0.20.
ZONOTOPE_SPLIT = False


# f's own CROWN bounds are skipped (f_crown=False) when z_q + d is at most this much wider than them,
# on average over the whole box, at every node an activation reads: they then add little and cost
# a third of the work. Measured on 12 random MLPs: 0-13% wider at 6-8 bits (skipping them: up to
# 1.5x more pieces per second), 34-50% at 3 bits (skipping them: twice the pieces to close the gap);
# ACAS Xu vs float16: 0%.
F_CROWN_WIDENING = 1.15

# On nets above bab.SMALL_NET_NEURONS, pairs that really differ (f's own CROWN bounds kept) also
# bound the selected outputs of f and of f_q by CROWN rows, met with the differential rows
# (OWN_OUTPUT_ROWS; sparse.diff_bounds_sparse's own_output_rows), and take no differential rows at
# the hidden layers (DIFFERING_HIDDEN_DIFF_ROWS False): there the two networks' own rows hold the
# bound, and without those rows a batch takes about 2/3 of the time (ACAS Xu pruned pairs,
# docs/results/pruned-pairs.md#own-output-rows; small nets were not measured and keep the rows
# they had). The root's batch keeps the hidden rows and takes no own output rows: the widening that
# tells close copies from such pairs is measured on it, and close copies' first calls then compile
# nothing more.
OWN_OUTPUT_ROWS = True
DIFFERING_HIDDEN_DIFF_ROWS = False

# Nor are they measured for when f_q is f's layer structure with every weight and bias within
# CLOSE_WEIGHTS of the largest magnitude in its layer (float16, bfloat16 and 8-bit copies): the
# widening is then close to 1 (ACAS Xu vs float16: 1.02), and f's own rows and the measure took a
# third of the root's batch (38-44 ms against 25 ms on ACAS Xu 1_1; see close_by_weights).
CLOSE_WEIGHTS = 2.0 ** -8

# Above this widening measured on the sparse bounds, f_q is taken as a copy that really differs
# without measuring again on every neuron (see _batch_bounds).
SPARSE_WIDENING_DOUBT = 2.0
# Whether that measurement runs on the root box repeated over the whole batch rather than on a batch
# of one: the same bounds, but through the programs compiled for the batch's shape, where a batch
# of one traced and compiled its own (137 of the 298 programs of the first batch on qwix's rms,3
# linen MLP; see docs/results/qwix-rms.md).
WIDENING_AT_BATCH_SHAPE = True


def batch_bounds(fg: G.Graph, qg: G.Graph, mg: G.Graph, lo, hi, paired: bool, sound: bool, outputs,
                  f_crown: bool = True, widening: bool = False, prior=None, dense: bool = False,
                  zonotope: bool = False, check: bool = True, split_rule: str = "bound", ties: bool = False,
                  own_output_rows: bool = False, hidden_diff_rows: bool = True, fused: bool = False,
                  row_sizes=None):
  """Bounds on ``f - f_q`` over a batch of pieces (leading axis of ``lo``, ``hi``), backward rows only
  where they matter (:mod:`qbound.bounds.sparse`): differential bounds for paired nets, CROWN on the
  merged net otherwise. With ``dense``, close copies (``f_crown=False``) take the dense differential
  passes instead (small nets, see ``qbound.bounds.bab``).

  ``prior``: bounds known to hold on each piece (its parent's, from ``keep`` below), a tuple of
  ``(lower, upper)`` per node of :func:`kept_nodes`, each with a leading axis of pieces.

  Returns ``((lower, upper), coefficients, keep)``: the output's bounds, the coefficients on the
  input of the selected outputs' lower then upper bounds (what the split rule reads), and the
  bounds worth passing on to the pieces' children; with ``widening`` (paired nets) also
  :func:`widening_of`.

  ``zonotope`` (paired nets of affine layers, ReLUs and clips, sparse passes): differential
  zonotopes (:mod:`qbound.bounds.zonotope`) run after the differential bounds, their relaxations
  reading those bounds; the output's bounds and the bounds passed on are met with theirs.

  ``check=False``: empty intervals are not raised for (ReLU-split sub-problems, whose bounds may
  prove them empty: :func:`qbound.bounds.relusplit.infeasible`).

  ``split_rule="gradient"`` (paired chains, :func:`qbound.bounds.splitting.gradient_supported`):
  the coefficients returned are an interval gradient's largest magnitude instead
  (:func:`qbound.bounds.splitting.gradient_coefficients`).

  ``ties`` (paired nets): the bounds passed on include f_q's dynamic roundings' values, which tie
  splits clamp (:mod:`qbound.bounds.tiesplit`).

  ``own_output_rows``, ``hidden_diff_rows=False`` (paired nets, sparse passes; branch and bound
  asks for them on large nets' copies that really differ, see ``OWN_OUTPUT_ROWS`` and
  ``DIFFERING_HIDDEN_DIFF_ROWS``): CROWN rows at f's and f_q's outputs too; no differential rows at
  the activations' inputs.

  ``fused`` (paired nets, sparse passes): walks by their own programs once compiled
  (:mod:`qbound.bounds.fused`); ``row_sizes`` (paired nets, sparse passes): each walk's row count
  from the earlier batches of the same search, kept in this dict (see
  :func:`qbound.bounds.sparse.diff_bounds_sparse`).
  """
  box = Box(lo, hi)
  if paired and not f_crown and dense:
    # A close copy (f's own CROWN bounds skipped, see F_CROWN_WIDENING) of a small net: the dense
    # passes, without a host round trip per node. The parents' bounds are not used here.
    z, zq, d = diff_bounds(fg, qg, box, None, sound, True, batched=True, f_crown=False)
    out = fg.output
    rows = output_rows(fg.nodes[out].size, outputs, tuple(fg.nodes[out].shape), lo.dtype, lo.shape[0])
    low, coefficients = diff_backward_lower(fg, qg, out, rows, z, zq, d, box, sound=sound, batched=True,
                                            with_coefficients=True)
    nodes = kept_nodes(fg, paired, qg if ties else None)
    keep = tuple(b[i] for b in (z, zq, d) for i in nodes)
    if split_rule == "gradient":
      coefficients = gradient_coefficients(fg, qg, lo, hi, z, zq, outputs)
    result = (output_scatter(d[out], jnp.asarray(outputs), low), coefficients, keep)
    return (result, widening_of(fg, z, zq, d)) if widening else result
  if paired:
    nodes = kept_nodes(fg, paired, qg if ties else None)
    known = None
    if prior is not None:
      k = len(nodes)
      known = tuple(node_list(len(fg.nodes), nodes, prior[j * k:(j + 1) * k]) for j in range(3))
    out = diff_bounds_sparse(fg, qg, box, sound=sound, f_crown=f_crown, outputs=outputs, coefficients=True,
                             prior=known, check=check, own_output_rows=own_output_rows,
                             hidden_diff_rows=hidden_diff_rows, fused=fused, row_sizes=row_sizes)
    keep = tuple(b[i] for b in (out.z, out.zq, out.d) for i in nodes)
    d_out = out.d[fg.output]
    if zonotope:
      zono = zonotope_batch(fg, qg, lo, hi, (out.z, out.zq, out.d), sound=sound, keep=ZONOTOPE_KEEP)
      keep = tuple(b[i] for b in (zono.z, zono.zq, zono.d) for i in nodes)
      d_out = (jnp.maximum(d_out[0], zono.lower), jnp.minimum(d_out[1], zono.upper))
    coefficients = out.coefficients
    if zonotope and ZONOTOPE_SPLIT:
      coefficients = influence_coefficients(zono.influence, lo, hi, outputs)
    if split_rule == "gradient":
      coefficients = gradient_coefficients(fg, qg, lo, hi, out.z, out.zq, outputs)
    result = (d_out, coefficients, keep)
    if not widening:
      return result
    # The sparse bounds leave z_q + d at their interval bounds wherever no activation is loose, which
    # overstates the widening (ACAS Xu 1_1 vs float16: 1.44, with rows for every neuron 1.02; vs its
    # pruned copy: 2.5 and 2.3). Where that could change the decision, it is measured again with rows
    # for every neuron of the first box (seconds of compilation on a first call, hence not always).
    # On the root alone (the first piece; the root's batch also holds its halves, see _root_children).
    root = lambda bounds: [(lo_[:1], hi_[:1]) for lo_, hi_ in bounds]
    spread = widening_of(fg, root(out.z), root(out.zq), root(out.d))
    if F_CROWN_WIDENING < spread <= SPARSE_WIDENING_DOUBT:
      if WIDENING_AT_BATCH_SHAPE:  # the root repeated over the batch: this batch's programs serve it
        whole = Box(jnp.broadcast_to(lo[:1], lo.shape), jnp.broadcast_to(hi[:1], hi.shape))
        full = diff_bounds_sparse(fg, qg, whole, sound=sound, outputs=outputs, every_neuron=True, fused=fused)
        spread = widening_of(fg, root(full.z), root(full.zq), root(full.d))
      else:
        full = diff_bounds_sparse(fg, qg, Box(lo[:1], hi[:1]), sound=sound, outputs=outputs, every_neuron=True)
        spread = widening_of(fg, full.z, full.zq, full.d)
    return result, spread
  nodes = kept_nodes(mg, paired)
  known = None if prior is None else node_list(len(mg.nodes), nodes, prior)
  bounds, coefficients = crown_bounds_sparse(mg, box, sound=sound, outputs=outputs, coefficients=True, prior=known,
                                             check=check)
  return bounds[mg.output], coefficients, tuple(bounds[i] for i in nodes)


def influence_coefficients(influence, lo, hi, outputs):
  """VeryDiff's split score as branch and bound's coefficients: ``|G_f - G_q|`` of each input
  generator at each selected output, per unit of the input's half-width, for the lower and the
  upper rows alike (``(pieces, 2 * outputs, inputs)``)."""
  n = lo.shape[0]
  half = ((hi - lo) / 2).reshape(n, -1)
  per_unit = influence[:, :, jnp.asarray(outputs)] / jnp.where(half > 0, half, 1.0)[:, :, None]
  rows = jnp.swapaxes(per_unit, 1, 2)
  return jnp.concatenate([rows, rows], axis=1)


def kept_nodes(graph: G.Graph, paired: bool, qg: G.Graph = None) -> list[int]:
  """The nodes whose bounds a piece passes on to its children: those activations read, and (paired,
  ``qg`` given) f_q's dynamic roundings, whose value bounds a tie split clamps
  (:mod:`qbound.bounds.tiesplit`)."""
  nodes = relu_inputs(graph)
  if not (paired and qg is not None):
    return nodes
  return sorted(set(nodes) | {i for i, node in enumerate(qg.nodes) if tiesplit.applies(node)})


def node_list(n: int, nodes, values) -> list:
  out: list = [None] * n
  for i, v in zip(nodes, values):
    out[i] = v
  return out


def close_by_weights(fg: G.Graph, qg: G.Graph) -> bool:
  """Whether f_q is f up to small weight changes: the same nodes (kinds, operations, clips and
  roundings alike), and every affine node's weights and bias within ``CLOSE_WEIGHTS`` times the
  largest magnitude among them. Such a copy is taken as close without measuring the widening (f's
  own CROWN bounds skipped, see ``F_CROWN_WIDENING``): a speed decision, not a soundness one."""
  if not same_structure(fg, qg):
    return False
  for a, b in zip(fg.nodes, qg.nodes):
    if a.attrs != b.attrs:  # (a rounding facing another mode: a step of f_q's own)
      return False
    arrays = [(np.asarray(x), np.asarray(y)) for x, y in zip(a.weights, b.weights)]
    if a.bias is not None:
      arrays.append((np.asarray(a.bias), np.asarray(b.bias)))
    if a.kind != G.AFFINE:  # (clips' ends) equal, or not the same node
      if not all(np.array_equal(x, y) for x, y in arrays):
        return False
      continue
    scale = max((float(np.max(np.abs(x), initial=0.0)) for x, _ in arrays), default=0.0)
    if any(float(np.max(np.abs(x - y), initial=0.0)) > CLOSE_WEIGHTS * scale for x, y in arrays):
      return False
  return True


def widening_of(fg: G.Graph, z, zq, d) -> float:
  """How much wider ``z_q + d`` is than f's CROWN bounds ``z``, worst over the nodes activations read
  (ratio of mean widths)."""
  worst = 1.0
  for i in relu_inputs(fg):
    narrow = float(jnp.mean(z[i][1] - z[i][0]))
    wide = float(jnp.mean(zq[i][1] - zq[i][0] + d[i][1] - d[i][0]))
    worst = max(worst, wide / max(narrow, 1e-30))
  return worst
