"""Branch and bound on the input box: an anytime certificate that tightens with time.

The box is split into pieces; each piece's maximal error is bounded (differential bounds when f
and f_q are paired, CROWN on the merged network otherwise) a batch of pieces at a time, with
backward rows only for the neurons whose relaxation a tighter bound could change
(:mod:`qbound.bounds.sparse`). A priority queue keeps the pieces with the worst upper bound first;
those are split in two along the dimension that weighs most in their bound: the bound of output
``j`` (the piece's worst) is the minimum over the piece of a linear function of the input, and
``|coefficient_i| * width_i`` is what dimension ``i``'s width costs it (ReluVal's smear; VeryDiff's
generator influence). On paired chains of affine layers, ReLUs and clips the default
(``split_rule="auto"``) weighs input ``i`` instead by ``max |g_i| * width_i``, ``g`` an interval
gradient of ``f_j - f_q,j`` over the piece (ReluVal's, as NeuroDiff splits): the width of a close
copy's bound sits in the relaxations of unstable neurons, which the bound's coefficients do not see
and the interval gradient does. For low-dimensional inputs the split is chosen among the two or three dimensions
that weigh most by bounding both halves of each (strong branching, all candidate halves in the
same batch). Pieces whose upper bound is at most the best error reached so far can hold no larger
error and are dropped. Piece centres, and the corners their gradients point to, are evaluated as
pieces are made, so the lower bound rises too. Whenever it stops (time budget, target gap, or a
decided epsilon) the result is a valid interval: ``upper`` is the largest bound over the remaining
pieces.

The split rule matters more than anything else here. The previous one (``|d g_j / d x_i| *
width_i`` at the centre, among dimensions at least 1/16 as wide relative to the box as the widest)
never split a dimension the network ignores, so the others could not be split past 1/16 of it: on
ACAS Xu 1_1 against a pruned-and-retrained copy, property 1, epsilon 0.5, it was still at 2.8 after
40 s and 8,751 pieces; this one proves it after 403 pieces (about 2 s warm).

Pieces can also be split on the sign of an unstable ReLU's input (``relu_split=True``,
:mod:`qbound.bounds.relusplit`), off by default: on ACAS Xu's stalled pieces the best input split
removes far more of the bound than the best single ReLU split (docs/methods/bab.md).

This is input-splitting branch and bound as in ReluVal (Wang et al., USENIX Security 2018), NeuroDiff
(Paulsen et al., ASE 2020) and VeryDiff (Teuber et al., TACAS 2025), with the batched bounding of
alpha-beta-CROWN (Wang et al., NeurIPS 2021).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import time
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from qbound import graph as G
from qbound import sharding
from qbound.bounds import common, guards, nonlinear, refute, relusplit, rms_rest, tiesplit
from qbound.bounds.probe import probe_batch
from qbound.bounds.splitting import resolve_split_rule, split_at, strong_branching_axis
from qbound.bounds import bab_batch, bab_children, bab_machine, fused
from qbound.bounds.bab_children import BoundedPiece
from qbound.bounds.bab_result import BabResult, settled_level, stop_reason
from qbound.bounds.arguments import branch_and_bound_args
from qbound.bounds.bab_batch import batch_bounds
from qbound.bounds import zonotope as zonotope_domain
from qbound.box import Box


SMALL_NET_NEURONS = 256


def default_batch_size(merged) -> int:
  """Pieces per batch: 256 on small nets, 32 otherwise (measured in ``benchmarks/bench_tight.py``).

  On random MLPs of 2-5 inputs and 2-3 hidden layers of 8-16 ReLUs a batch of 256 costs about
  twice one of 64 and branch and bound closes the gap sooner. On ACAS Xu (300 ReLUs per network) a
  batch costs in proportion to its pieces, and strong branching fills it with few parents early on:
  epsilon = 0.05 over 1_1..1_9 took a median 0.92 s with 32 (24: 0.91 s, 64: 1.22 s, 256: 5x longer).
  """
  return 256 if _activation_neurons(merged) <= SMALL_NET_NEURONS else 32


def _activation_neurons(merged) -> int:
  return sum(n.size for n in merged.f_graph.nodes if n.kind not in (G.INPUT, G.AFFINE, G.ADD, G.CONCAT))


def _saturating(merged) -> bool:
  """Whether f_q has a dynamic ``rms`` rounding whose entries may saturate (see SATURATING_CANDIDATES)."""
  return any(rms_rest.applies(node) for node in merged.fq_graph.nodes)


def _dense_for_close_copies(merged) -> bool:
  """Whether close copies are bounded by the dense differential passes rather than the sparse ones.

  On small nets (at most ``SMALL_NET_NEURONS`` activation neurons, batches of 256) the dense passes
  did as well or better on 5 of 12 random MLPs at 3-8 bits (3 s budget, gap to 1%: 1.04 against
  1.17 on an 8-bit net) and the sparse ones on the other 7. On ACAS Xu vs its float16 copies,
  property 1, eps 0.05, the sparse ones are faster now that their rows follow the pieces: median
  over 1_1..1_9 0.91 s against 1.09 s for output 0, 1.06 s against 1.37 s for all five outputs.
  """
  return _activation_neurons(merged) <= SMALL_NET_NEURONS


# Without an epsilon (closing the gap) on low-dimensional inputs, batches of at least this many
# pieces: there no decision ends the search early, the frontier is wide and full batches cost less
# a piece. ACAS Xu 1_1 vs float16, property 1, output 0, 30 s, interleaved (load 3.8-5.3): upper
# 1.742e-5, 1.743e-5, 1.772e-5 with 64 against 1.771e-5, 1.795e-5, 1.805e-5 with 32 (128: 1.854e-5,
# 1.741e-5). Epsilon runs keep 32 (64 took them 1.22 s against 0.92 s, see default_batch_size).
GAP_BATCH_SIZE = 64


def gap_batch_size(merged, inputs: int, epsilon: Optional[float], strong_branching_dims: int = 8) -> int:
  """Pieces per batch when none is given: :func:`default_batch_size`, or at least
  ``GAP_BATCH_SIZE`` without an epsilon on at most ``strong_branching_dims`` inputs."""
  size = default_batch_size(merged)
  return max(size, GAP_BATCH_SIZE) if epsilon is None and inputs <= strong_branching_dims else size

# Proving an epsilon on a large net's close copy (f's own CROWN rows skipped: bab_batch.F_CROWN_WIDENING)
# on at most strong_branching_dims inputs: batches of this many pieces. Such proofs go level by
# level, each with fewer than 16 pieces above epsilon, so larger batches were mostly padding. ACAS
# Xu 1_1..1_9 vs float16, property 1, eps 0.05, warm, sizes interleaved per net (idle machine):
# output 0 median 0.349 s (12: 0.353, 24: 0.403, 32: 0.492), all five outputs 0.385 s against
# 0.532 s. Pairs that really differ go back to default_batch_size after the root's batch (the
# root's batch tells them apart): their open pieces are many, and 16 was slower on 7 of 8 pruned
# ACAS Xu instances (1_9 property 8 proved in 12.8-13.1 s against 9.4-9.5 s; docs/results/acas-speed.md).
CLOSE_COPY_BATCH_SIZE = 16
# ... and while at most a quarter of such a batch's pieces still need splitting (their bound above
# epsilon), each of them is cut in 2 ** CLOSE_COPY_GRID_SPLITS cells along its dimensions that weigh
# most, all kept, rather than halved along the best of a few by strong branching: a proof's first
# and last levels hold 1-4 such pieces, and a level costs about the same whatever it holds. ACAS Xu
# 1_1..1_9 vs float16, output 0, warm, interleaved: median 0.326 s against 0.386 s, faster on every
# net (0 turns it off; 3 splits: 0.53 s).
CLOSE_COPY_GRID_SPLITS = 2
# Whether a copy not close to f by its weights (bab_batch.close_by_weights: pruned, QAT, 4-6 bit)
# bounds its root's batch at the size of a pair that differs, which such copies turn out to be
# (ACAS Xu pruned and 6- and 8-bit per-channel copies, even f's weights scaled by 1.01), so that the
# steps compiled for the root serve the batches after it; a copy found close after all (its
# widening) then takes CLOSE_COPY_BATCH_SIZE from its second batch on. A first call (nothing cached)
# on ACAS Xu 1_1 against its pruned copy, property 1 at 0.05, compiled 149 functions against 213 and
# proved it in 14.6-15.3 s against 16.3-19 s; against a 6-bit copy 202 against 265. But every warm
# call pays for the larger root batch: 90 pruned-pair instances decided, interleaved, median 0.449 s
# against 0.418 s (a second interleaved run of 16: 0.554 against 0.564). The persistent compilation
# cache pays a first call's compilations once per machine, so it stays off.
ROOT_AT_DIFFERING_SIZE = False

# Strong branching tries at most this many dimensions, those that weigh most in the piece's bound.
# On 12 random MLPs with 4-5 inputs, trying 3 rather than all 4-5 closed the gap faster on 4 of 5
# nets; 2 was slower on one net by 4x. On nets above SMALL_NET_NEURONS (ACAS Xu) 2 did better: vs
# float16, property 1, eps 0.05, 1_1..1_9, median 0.77 s against 0.89 s for output 0 and 0.87 s
# against 1.06 s for all five; 9 pruned pairs at eps 0.05 in 37 s against 40 s in all (1: 60 s;
# those take DIFFERING_CANDIDATES now). That was with the bound split; with the gradient split
# (SPLIT_RULE) 1 does better on close copies: ACAS Xu vs float16, 1,903 pieces against 2,263 over
# the nine nets for output 0 (fewer on three nets, 32 more on two), 2,359 against 2,775 for all
# five outputs (never more on a net; docs/results/acas-batch.md). While few pieces are open,
# FILL_CANDIDATES still tries more.
STRONG_BRANCHING_CANDIDATES = 3
LARGE_NET_CANDIDATES = 1
# Small nets whose f_q has a dynamic `rms` rounding that may saturate (qbound.rms_rounding): one,
# the dimension that weighs most, and a batch splits three times the parents. Their pieces' bounds
# fall slowly and about alike along every dimension (each entry's half step and the saturations
# bounded on the network, qbound.bounds.rms_rest), so trying more dimensions buys little. qwix's
# rms,3 MLPs of benchmarks/bench_quant_libraries.py, warm, after 40 batches of 256 pieces (no
# search rounds): 0.148 against 0.179 (nnx) and 0.131 against 0.141 (linen) at the same CPU time;
# certify's default 10 s, warm, by turns in one process: 1.39-1.53x against 1.70-1.84x (nnx, load
# 7-8; an earlier run at load 5-7: 1.40, 1.49 against 1.40, 1.43), 1.35-1.38x against 1.48-1.56x
# (linen). On qwix's absmax (dynamic int8) MLPs it was neutral to worse (0.065 against 0.066, 0.058
# against 0.055 after 40 batches): they keep STRONG_BRANCHING_CANDIDATES. (docs/results/qwix-first-calls.md)
SATURATING_CANDIDATES = 1
# On nets above SMALL_NET_NEURONS paired with a copy that really differs (f's own CROWN bounds kept,
# see bab_batch.F_CROWN_WIDENING), one: the split is the dimension that weighs most, and a batch bounds twice
# the parents (strong branching only while few pieces are open, see FILL_CANDIDATES). ACAS Xu
# pruned pairs, 20 s, 2 loaded cores, 1 against 2 in the same run: of the 25 instances undecided
# in the last full run, 22 still undecided with both end at a median 0.78x the upper bound (19 of
# 22 lower); on a sample of 36 decided ones 30 proved / 6 refuted against 28 / 6 / 2 undecided,
# median decided time 1.46 s against 1.59 s at eps 0.05, 1.90 s against 2.06 s at 0.5.
DIFFERING_CANDIDATES = 1
# While few pieces are open, each tries as many dimensions as fill half the batch (its padding
# costs as much as pieces): with ROOT_CHILDREN, ACAS Xu's batches fill one batch sooner (1 + 10,
# 20, 32 pieces instead of 1, 4, 8, 16, 32), about 10% less CPU time per proof (docs/results/acas-speed.md).
FILL_CANDIDATES = True


# Whether the root's batch also bounds the root's halves along every dimension (see branch_and_bound).
ROOT_CHILDREN = True


def _root_children(width: np.ndarray, batch_size: int) -> list:
  """The dimensions along which the root's halves are bounded in the root's own batch: every
  dimension of positive width, if they all fit beside the root (none otherwise).

  The first batches of strong branching hold 1, 4, 8 and 16 pieces of a fixed 32 (ACAS Xu), each
  costing a full batch; bounding the root's halves beside it, and then more candidate dimensions
  while few pieces are open, reaches full batches one batch sooner.
  """
  axes = [int(a) for a in np.flatnonzero(width > 0)]
  return axes if ROOT_CHILDREN and 1 + 2 * len(axes) <= batch_size else []


# Whether paired nets of affine layers, ReLUs and clips also take differential zonotopes on every
# batch (branch_and_bound's ``zonotope=None``); see benchmarks/bench_differing.py --zonotope.
ZONOTOPE = False

# ReLU splitting (qbound/bounds/relusplit.py): whether branch_and_bound's strong branching also tries
# splitting pieces on the sign of an unstable neuron (relu_split=None), how many neurons per piece,
# and after how many input splits of the piece.
RELU_SPLIT = False
RELU_SPLIT_CANDIDATES = 2
RELU_SPLIT_DEPTH = 8

# Where branch_and_bound splits a piece (its ``split_rule=None``): "bound" weighs each input by the
# worst output's bound coefficients times the width; "gradient" by an interval gradient of
# f_j - f_q,j over the piece (gradient_coefficients, NeuroDiff's rule); "auto": "gradient" for
# paired chains of affine layers, ReLUs and clips, else "bound". Strong branching still chooses
# among the top candidates of either score. certify(method="bab"), warm, interleaved, loaded 2
# cores (benchmarks/bench_split_rule.py, docs/results/acas-search.md): ACAS Xu 1_1..1_9 vs float16, property 1,
# eps 0.05: never more pieces (0.89-1.0x), median 0.69 -> 0.69 s (output 0), 0.83 -> 0.78 s (all);
# vs the 10%-pruned copies, all outputs: 1.25-4.3x fewer pieces at eps 0.5 (median 1.69 -> 0.93 s),
# 1.4-12.7x at eps 0.05 (all nine proved in 10 s, median 8.49 -> 2.82 s; "bound" left three open).
SPLIT_RULE = "auto"

# Whether a child piece's bounds on f - f_q are met with its parent's (the child's box lies in the
# parent's, so both hold on it). A child's own bound can be looser than its parent's: the output's
# bounds are not among those a piece passes on (bab_batch.kept_nodes), and its passes choose rows
# and relaxations afresh. Without it branch and bound's upper could rise from one batch to the next:
# on qwix's rms,3 MLPs (benchmarks/bench_quant_libraries.py), linen 0.142 after 40 batches, 0.149
# after 60; nnx with one dimension per piece 0.148, 0.159 (docs/results/qwix-first-calls.md).
WITHIN_PARENT = True

# Seconds between two calls of branch_and_bound's ``report``.
REPORT_EVERY = 0.1


def small_net_steps(merged) -> Optional[dict]:
  """The XLA options of the steps compiled for ``merged``'s bounds: ``common.SMALL_NET_STEP_COMPILE``
  on nets of at most :data:`SMALL_NET_NEURONS` activation neurons when ``common.SMALL_NETS_AT_LEVEL_1``
  (opt-in), None (the default) otherwise or for anything that is not a merged network (validated
  later, with its own error)."""
  if not common.SMALL_NETS_AT_LEVEL_1 or not hasattr(merged, "f_graph"):
    return None
  return common.SMALL_NET_STEP_COMPILE if _activation_neurons(merged) <= SMALL_NET_NEURONS else None


def _with_small_net_steps(search):
  """``search(merged, box, **kwargs)`` run with its steps compiled as :func:`small_net_steps` says."""
  @functools.wraps(search)
  def run(merged, box, **kwargs):
    with common.step_compile(small_net_steps(merged)):
      return search(merged, box, **kwargs)
  return run


@fused.while_in_use
@_with_small_net_steps
def branch_and_bound(merged, box: Box, *, outputs: Optional[Sequence[int]] = None, time_budget: float = 10.0,
                     target_gap: float = 0.05, epsilon: Optional[float] = None, batch_size: Optional[int] = None,
                     max_pieces: int = 1_000_000, initial_lower: float = 0.0, initial_witness=None,
                     sound: bool = True, strong_branching_dims: int = 8, mesh=None,
                     progress: Optional[bool] = False, report=None, zonotope: Optional[bool] = None,
                     search: Optional[bool] = None, relu_split: Optional[bool] = None,
                     tie_split: Optional[bool] = None,
                     split_rule: Optional[str] = None, stop=None) -> BabResult:
  """Input-splitting branch and bound on the maximal error of a merged network.

  Args:
    merged: a :class:`~qbound.merge.MergedNetwork`.
    box: the input box.
    outputs: indices (into the flattened output) whose error counts; all by default.
    time_budget: seconds before it stops (the certificate is valid whenever it stops).
    target_gap: stop once ``upper <= (1 + target_gap) * lower``.
    epsilon: if given, stop as soon as ``upper <= epsilon`` (proved) or ``lower > epsilon`` (refuted).
    batch_size: pieces bounded per batch (a fixed shape, so one compilation), rounded up to a
      multiple of the device count. None: :func:`default_batch_size` (256 for nets of at most
      ``SMALL_NET_NEURONS`` activation neurons, whose batches cost little more than their
      dispatch, else 32, whose batches cost in proportion to their pieces; without an epsilon on
      inputs of at most ``strong_branching_dims`` entries, at least ``GAP_BATCH_SIZE``).
    max_pieces: most open pieces kept.
    strong_branching_dims: for inputs of at most this many entries, every split is chosen by
      bounding both halves along each candidate dimension (strong branching); above, the dimension
      that weighs most in the piece's bound is split.
    initial_lower, initial_witness: an error already reached (e.g. by sampling).
    sound: proven floating-point margins.
    mesh: the devices each batch of pieces is split over (a one-axis mesh, see
      :mod:`qbound.sharding`); default: all of ``jax.devices()``. The network is replicated.
    progress: a tqdm bar on stderr with the current ``[lower, upper]`` and pieces per second;
      ``None`` shows it only when stderr is a terminal.
    report: called as ``report(root_lower, root_upper, upper, lower, witness)`` after the root batch
      and then at most every ``REPORT_EVERY`` seconds: the root's per-output bounds on ``f - f_q``,
      the proven bound so far (the largest over open and finished pieces) and the best reached
      error with its input, so a caller holding a deadline has the latest answer.
    zonotope: for paired chains of affine layers, ReLUs and clips, meet every batch's differential
      bounds with differential zonotopes' (:mod:`qbound.bounds.zonotope`), whose relaxations read
      them; None: ``ZONOTOPE`` (off). True on other networks raises
      :class:`~qbound.errors.UnsupportedLayerError`.
    search: run projected gradient ascent on the box, around the best input and on the worst
      open pieces in a share of the time (:mod:`qbound.bounds.refute`); None: ``refute.ENABLED``.
    relu_split: with strong branching, let splits on the sign of an unstable ReLU's input compete
      with the input splits once a piece has been split ``RELU_SPLIT_DEPTH`` times
      (:mod:`qbound.bounds.relusplit`; float-sound or not); None: ``RELU_SPLIT``.
    tie_split: with strong branching, let splits on a dynamic rounding's step compete with the input
      splits once a piece has been split ``tiesplit.DEPTH`` times (:mod:`qbound.bounds.tiesplit`;
      float-sound only); None: ``tiesplit.ENABLED`` with a ``time_budget`` of at least
      ``tiesplit.MIN_BUDGET`` seconds.
    split_rule: which inputs a piece's split tries: ``"bound"`` (the worst output's bound
      coefficients times the width), ``"gradient"`` (an interval gradient of ``f_j - f_q,j`` over
      the piece times the width, as NeuroDiff splits; paired chains of affine layers, ReLUs and
      clips only) or ``"auto"`` (``"gradient"`` where it applies); None: ``SPLIT_RULE``.
    stop: polled between batches; when it returns True the search stops (``stopped == "stop"``),
      e.g. because another method running beside it closed the gap.

  Returns:
    A :class:`BabResult`.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(2))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=4))
    >>> box = qb.Box(-jnp.ones(2), jnp.ones(2))
    >>> res = qb.bounds.branch_and_bound(qb.merge(f, fq, box), box, time_budget=20, target_gap=0.01)
    >>> res.lower <= res.upper <= 1.01 * res.lower or res.stopped == "time"
    True
  """
  start = time.perf_counter()
  compiled_before = fused.seconds_compiling()  # (the search rounds' far test counts searching time only)
  box = branch_and_bound_args(merged, box, outputs=outputs, time_budget=time_budget, target_gap=target_gap,
                              epsilon=epsilon, batch_size=batch_size, max_pieces=max_pieces,
                              initial_lower=initial_lower, initial_witness=initial_witness, sound=sound,
                              strong_branching_dims=strong_branching_dims, mesh=mesh,
                              progress=progress)
  n_out = int(np.prod(merged.output_shape))
  outputs = np.arange(n_out) if outputs is None else np.asarray(outputs, dtype=np.int64)
  # Products and smooth curves (transformers) have no differential rule: CROWN on the merged net.
  paired = merged.paired and nonlinear.first_nonlinear(merged.f_graph) is None
  mesh = sharding.resolve_mesh(mesh)
  after_root = None  # the batch size once the root's batch tells a close copy from a pair that differs
  close_after_root = None  # (the same for a close copy, where the root's batch had the other size)
  # A copy close to f by its weights is known as such before the root's batch, which then skips f's
  # own CROWN rows and the widening measure (bab_batch.CLOSE_WEIGHTS).
  close_weights = paired and bab_batch.close_by_weights(merged.f_graph, merged.fq_graph)
  if batch_size is None:
    batch_size = gap_batch_size(merged, int(np.prod(box.shape)), epsilon, strong_branching_dims)
    if (paired and epsilon is not None and int(np.prod(box.shape)) <= strong_branching_dims
            and _activation_neurons(merged) > SMALL_NET_NEURONS):
      if close_weights or not ROOT_AT_DIFFERING_SIZE:
        batch_size, after_root = CLOSE_COPY_BATCH_SIZE, batch_size
      else:
        after_root, close_after_root = batch_size, CLOSE_COPY_BATCH_SIZE
  batch_size = sharding.padded_size(batch_size, mesh)
  small = _activation_neurons(merged) <= SMALL_NET_NEURONS
  programs = bab_machine.use_programs(small, mesh)
  put_networks, put_batch = bab_machine.placements(programs, mesh)
  fg, qg, mg = put_networks((merged.f_graph, merged.fq_graph, merged.graph))
  out_idx = put_networks(np.asarray(outputs))
  layout = {}
  f_crown = True
  dense = _dense_for_close_copies(merged)
  if zonotope is None:
    zonotope = ZONOTOPE and zonotope_domain.supported(merged.f_graph, merged.fq_graph)
  elif zonotope:
    zonotope_domain.check_supported(merged.f_graph, merged.fq_graph)
  relu_split = RELU_SPLIT if relu_split is None else bool(relu_split)
  # Splits on a dynamic rounding's step (qbound/bounds/tiesplit.py): the kept entries holding f_q's
  # dynamic roundings' values (the second of the three groups z, z_q, d of bab_batch.kept_nodes).
  # By default only in runs of at least tiesplit.MIN_BUDGET seconds (see there).
  ties = (tiesplit.ENABLED and time_budget >= tiesplit.MIN_BUDGET) if tie_split is None else bool(tie_split)
  ties = ties and paired and sound and any(tiesplit.applies(node) for node in merged.fq_graph.nodes)
  tie_entries = []
  if ties:
    kept_at = bab_batch.kept_nodes(merged.f_graph, paired, merged.fq_graph)
    tie_entries = [len(kept_at) + p for p, i in enumerate(kept_at) if tiesplit.applies(merged.fq_graph.nodes[i])]
  split_rule = resolve_split_rule(merged, paired, SPLIT_RULE if split_rule is None else split_rule)

  # With the programs, each walk's row count is taken from the search's earlier batches (sparse's
  # row_sizes): the walks of a batch then queue on the device with nothing read back in between.
  graphs = (merged.f_graph, merged.fq_graph)
  root_key, row_sizes = bab_machine.root_row_sizes(programs, graphs, box, outputs, batch_size, sound)

  def bound_fn(lo, hi, prior, root=False, constrained=False):
    nonlocal f_crown
    lo, hi, prior = put_batch((lo, hi, prior))
    layout.update(sharding.layout(lo))
    if root and close_weights:
      f_crown = False
    elif root and paired:
      bounds, widening = batch_bounds(fg, qg, mg, lo, hi, paired, sound, outputs, True, True, prior,
                                       zonotope=zonotope, split_rule=split_rule, ties=ties,
                                       fused=programs)
      f_crown = widening > bab_batch.F_CROWN_WIDENING
      return sharding.gather(bounds)
    # A large net's copy that really differs (known from the root's batch on, which is bounded as
    # for any pair: close copies' first calls compile nothing more): f's and f_q's own output rows,
    # no hidden differential rows (bab_batch.OWN_OUTPUT_ROWS, DIFFERING_HIDDEN_DIFF_ROWS).
    differs = f_crown and not small
    # ReLU-split sub-problems live in their bounds (the dense passes ignore a parent's), and may be empty.
    return sharding.gather(batch_bounds(fg, qg, mg, lo, hi, paired, sound, outputs, f_crown, prior=prior,
                                         dense=dense and not constrained, zonotope=zonotope,
                                         check=not constrained, split_rule=split_rule, ties=ties,
                                         own_output_rows=differs and bab_batch.OWN_OUTPUT_ROWS,
                                         hidden_diff_rows=not differs or bab_batch.DIFFERING_HIDDEN_DIFF_ROWS,
                                         fused=programs, row_sizes=row_sizes))

  def probe_fn(xs, lo, hi, worst):
    return sharding.gather(probe_batch(mg, out_idx, *put_batch((xs, lo, hi, worst)), mesh))
  shape = box.shape
  lower0 = np.asarray(box.lower, np.float32).reshape(-1)
  upper0 = np.asarray(box.upper, np.float32).reshape(-1)
  dim = lower0.size

  best_lower = float(initial_lower)
  best_x = None if initial_witness is None else np.asarray(initial_witness, np.float32)
  if best_x is None:
    best_x = ((lower0 + upper0) / 2).reshape(shape)

  heap: list[bab_children.OpenPiece] = []
  counter = itertools.count()
  bounded = 0
  found_lock = threading.Lock()  # (batches may be bounded at once, see bab_machine.BATCHES_AT_ONCE)

  def bound_batch(los, his, priors, root=False, depths=None, splits=None):
    """Bounds ``len(los)`` pieces (``priors``: each one's parent's kept bounds, or None; ``depths``:
    each one's input splits; ``splits``: its ReLU splits, whose pieces are sub-problems of their box)."""
    nonlocal best_lower, best_x, bounded
    k = len(los)
    depths = [0] * k if depths is None else depths
    splits = [0] * k if splits is None else splits
    constrained = any(splits)
    pad = batch_size - k
    lo = np.stack(los + [los[-1]] * pad).reshape((batch_size, *shape))
    hi = np.stack(his + [his[-1]] * pad).reshape((batch_size, *shape))
    prior = None
    if priors[0] is not None:
      full = priors + [priors[-1]] * pad
      prior = tuple((np.stack([p[j][0] for p in full]), np.stack([p[j][1] for p in full]))
                    for j in range(len(full[0])))
    (dlo, dhi), coefficients, keep = bound_fn(lo, hi, prior, root, constrained)
    keep = [(np.asarray(a), np.asarray(b)) for a, b in keep]
    coefficients = np.abs(np.asarray(coefficients, np.float64).reshape(batch_size, 2 * len(outputs), -1)[:k])
    dlo = np.asarray(dlo, np.float64).reshape(batch_size, -1)[:k]
    dhi = np.asarray(dhi, np.float64).reshape(batch_size, -1)[:k]
    empty = np.zeros(k, bool)
    if constrained:
      # A sub-problem whose bounds are empty somewhere has no input (float-sound bounds only:
      # see relusplit.infeasible); it holds no error. Elsewhere, an empty interval is a bug.
      for i in range(k):
        bounds_i = [(a[i], b[i]) for a, b in keep] + [(dlo[i], dhi[i])]
        empty[i] = splits[i] > 0 and sound and relusplit.infeasible(bounds_i)
      dlo[empty], dhi[empty] = np.inf, -np.inf
      live = ~empty
      guards.check_bounds([("branch and bound, the bounds of ReLU-split pieces", None,
                            [(a[:k][live], b[:k][live]) for a, b in keep] + [(dlo[live], dhi[live])])],
                          sound=sound)
    sel = np.maximum(-dlo[:, outputs], dhi[:, outputs])
    worst = np.argmax(sel, axis=1)
    ups = np.where(empty, 0.0, sel[np.arange(k), worst])
    centres = (lo + hi) / 2
    values, points = probe_fn(centres, lo, hi, np.concatenate([worst, np.zeros(pad, np.int64)]))
    rows = np.arange(k)
    sensitivity = coefficients[rows, worst] + coefficients[rows, len(outputs) + worst]
    values = np.asarray(values)[:k]
    # A ReLU-split sub-problem's bound holds on its part of the box only, which its probes may miss.
    suspect = np.flatnonzero((values > ups) & (np.asarray(splits) == 0))
    if suspect.size:  # in float32: look again in float64 before calling it a bug
      guards.check_points(merged.graph, np.asarray(points)[suspect], dlo[suspect], dhi[suspect], sound=sound,
                          what="branch and bound, a piece's bounds", outputs=outputs)
    i = int(np.argmax(values))
    with found_lock:
      if values[i] > best_lower:
        best_lower, best_x = float(values[i]), np.asarray(points[i])
      bounded += k
    return [BoundedPiece(ups[i], lo[i].reshape(-1), hi[i].reshape(-1), int(worst[i]), dlo[i], dhi[i], sensitivity[i],
                         tuple((a[i], b[i]) for a, b in keep), depths[i], splits[i]) for i in range(k)]

  def bound_children(batch: bab_children.Children) -> list:
    """Every child of ``batch``, bounded in batches of ``batch_size``."""
    children = []
    for chunk in range(0, len(batch.los), batch_size):
      part = slice(chunk, chunk + batch_size)
      children += bound_batch(batch.los[part], batch.his[part], batch.priors[part], depths=batch.depths[part],
                              splits=batch.splits[part])
    return children

  def take_batches(take) -> list:
    """``take()`` as many times as batches go at once now (bab_machine.batches_at_once), empty ones left out."""
    count = bab_machine.batches_at_once(programs, len(heap), time.perf_counter() - start)
    return [batch for batch in (take() for _ in range(count)) if batch.parents]

  def within(child: BoundedPiece, parent: BoundedPiece) -> BoundedPiece:
    """``child`` with its bounds met with those of its ``parent``."""
    if not WITHIN_PARENT or child.empty:  # (an empty sub-problem stays empty)
      return child
    dlo, dhi = np.maximum(child.diff_lower, parent.diff_lower), np.minimum(child.diff_upper, parent.diff_upper)
    sel = np.maximum(-dlo[outputs], dhi[outputs])
    worst = int(np.argmax(sel))
    return child._replace(bound=float(sel[worst]), worst=worst, diff_lower=dlo, diff_upper=dhi)

  def push(pieces: list[BoundedPiece]) -> None:
    for piece in pieces:
      if piece.empty:  # (see bound_batch)
        continue
      heapq.heappush(heap, piece.open(next(counter)))

  closed = {"upper": 0.0, "lo": np.full(n_out, np.inf), "hi": np.full(n_out, -np.inf)}

  def close(piece: BoundedPiece) -> None:
    closed["upper"] = max(closed["upper"], piece.bound)
    closed["lo"] = np.minimum(closed["lo"], piece.diff_lower)
    closed["hi"] = np.maximum(closed["hi"], piece.diff_upper)

  bar = tqdm(desc="branch and bound", unit="piece", disable=None if progress is None else not progress,
             leave=False)
  # With strong branching, the root's batch also bounds the root's two halves along every
  # dimension (the batch is padded to its fixed size anyway), and the root is split at once: one
  # batch fewer before the batches fill up (see _root_children).
  root_axes = _root_children(upper0 - lower0, batch_size) if dim <= strong_branching_dims else []
  los, his = [lower0], [upper0]
  for axis in root_axes:
    left_hi, right_lo = split_at(lower0, upper0, axis)
    los += [lower0, right_lo]
    his += [left_hi, upper0]
  first = bound_batch(los, his, [None] * len(los), root=True, depths=[0] + [1] * (len(los) - 1))
  if row_sizes is not None:
    bab_machine.remember_root_row_sizes(root_key, row_sizes, graphs)
  if after_root is not None and f_crown:  # a pair that really differs (see CLOSE_COPY_BATCH_SIZE)
    batch_size = sharding.padded_size(after_root, mesh)
  elif close_after_root is not None and not f_crown:
    batch_size = sharding.padded_size(close_after_root, mesh)
  root = first[:1]
  root_lower, root_upper = root[0].diff_lower, root[0].diff_upper
  if root_axes and root[0].bound > best_lower:
    options = first[1:]
    best = strong_branching_axis(root[0].bound, [(options[2 * a].bound, options[2 * a + 1].bound)
                                                 for a in range(len(root_axes))])
    chosen = options[2 * best:2 * best + 2]
    if max(c.bound for c in chosen) <= root[0].bound:
      push(chosen)  # (they had no parent's bounds to start from: kept only if no looser)
    else:
      push(root)
  else:
    push(root)
  # (f_crown is known now: paired nets keep f's own CROWN bounds when f_q really differs.)
  candidate_count = (SATURATING_CANDIDATES if small and _saturating(merged)
                     else STRONG_BRANCHING_CANDIDATES if small
                     else DIFFERING_CANDIDATES if paired and f_crown else LARGE_NET_CANDIDATES)
  stopped = "exhausted"
  last_report = -np.inf
  # Hook: counterexample search rounds (qbound/bounds/refute.py), in their own share of the time.
  searching = refute.searcher(mg, out_idx, lower0, upper0, shape, search, time_budget, compiled_before)
  # Hook: the root's bound reported as soon as it is known. The loop below runs a search round
  # first, and on a first call that round compiles for seconds: certify(auto)'s first call on a
  # small net then hit its deadline with only the interval bound (bench_tight.py's 5-12-8-8-2).
  def send_report() -> None:
    nonlocal last_report
    upper = max(heap[0].piece.bound, closed["upper"])
    report(root_lower, root_upper, upper, best_lower, np.asarray(best_x).reshape(shape))
    last_report = time.perf_counter()

  def close_copy_grid() -> bool:
    """A batch of grid cells (see CLOSE_COPY_GRID_SPLITS) if this search proves an epsilon on a close
    copy in small batches and few pieces need splitting; whether it ran."""
    # (after_root is set only on at most strong_branching_dims inputs)
    if after_root is None or f_crown or not CLOSE_COPY_GRID_SPLITS:
      return False
    settled = settled_level(best_lower, epsilon, target_gap)
    live = sum(item.piece.bound > settled for item in heap) if len(heap) <= 64 * batch_size else len(heap)
    if not live or 4 * live > batch_size:
      return False
    splits = min(int(np.log2(batch_size // live)), CLOSE_COPY_GRID_SPLITS)
    batch = bab_children.grid(heap, live, splits, close)
    push([within(c, t) for c, t in zip(bound_children(batch), batch.parents)])
    return True

  if report is not None and heap:
    send_report()
  while heap:
    if searching is not None and searching.due(time.perf_counter() - start, heap[0].piece.bound, epsilon, best_lower):
      value, x = searching.run(heap, best_x)
      if value > best_lower:
        best_lower, best_x = value, x
    if report is not None and time.perf_counter() - last_report >= REPORT_EVERY:
      send_report()
    bar.update(bounded - bar.n)
    bar.set_postfix_str(f"[{best_lower:.4g}, {heap[0].piece.bound:.4g}]", refresh=False)
    # Pieces that cannot beat the best error reached are finished.
    if heap[0].piece.bound <= best_lower:
      for item in heap:
        close(item.piece)
      heap.clear()
      stopped = "exhausted"
      break
    reason = stop_reason(heap[0].piece.bound, best_lower, epsilon=epsilon, target_gap=target_gap,
                          past_budget=time.perf_counter() - start > time_budget, stop=stop,
                          too_many=len(heap) > max_pieces)
    if reason is not None:
      stopped = reason
      break
    bab_machine.ask_beside(programs, time.perf_counter() - start, time_budget)
    if close_copy_grid():
      continue
    if dim <= strong_branching_dims:
      # Strong branching: bound both halves along each candidate dimension and keep the best split.
      # Few open pieces leave room in the batch (a fixed shape: the padding costs as much as
      # pieces): they try more dimensions, and the first splits, which matter most, are chosen
      # among more of them.
      count = max(candidate_count, (batch_size // 2) // len(heap)) if FILL_CANDIDATES else candidate_count
      # ReLU splits (qbound/bounds/relusplit.py) compete with the input splits once a piece has been
      # split RELU_SPLIT_DEPTH times along its input; splits on a dynamic rounding's step
      # (qbound/bounds/tiesplit.py) likewise.
      take = functools.partial(bab_children.strong_branching, heap, count, batch_size, close,
                               relu_split=relu_split, relu_depth=RELU_SPLIT_DEPTH,
                               relu_candidates=RELU_SPLIT_CANDIDATES, paired=paired, tie_entries=tie_entries)
      batches = take_batches(take)
      for batch, children in zip(batches, bab_machine.side_by_side(bound_children, batches)):
        offset = 0
        for t, candidates in zip(batch.parents, batch.options):
          options = [within(c, t) for c in children[offset:offset + 2 * len(candidates)]]
          offset += len(options)
          best = strong_branching_axis(t.bound, [(options[2 * a].bound, options[2 * a + 1].bound)
                                                       for a in range(len(candidates))])
          push(options[2 * best:2 * best + 2])
      continue
    batches = take_batches(functools.partial(bab_children.halves, heap, batch_size, close))
    for batch, children in zip(batches, bab_machine.side_by_side(bound_children, batches)):
      push([within(c, t) for c, t in zip(children, batch.parents)])

  bar.close()
  for item in heap:
    close(item.piece)
  upper, diff_lower, diff_upper = closed["upper"], closed["lo"], closed["hi"]
  return BabResult(upper=float(upper), lower=best_lower, witness=np.asarray(best_x).reshape(shape),
                   diff_lower=diff_lower, diff_upper=diff_upper, pieces_bounded=bounded,
                   pieces_left=len(heap), stopped=stopped, seconds=time.perf_counter() - start,
                   layout=dict(layout), root_lower=root_lower, root_upper=root_upper)
