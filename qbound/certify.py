"""certify(): the maximal error of a compressed network, as a proven interval.

``certify(f, fq, box)`` returns a :class:`Certificate` with

* ``upper``: proven, ``max_{x in box} max_j |f_j(x) - fq_j(x)| <= upper``;
* ``lower``: reached, the error at ``witness`` (so the true maximum lies in ``[lower, upper]``);
* ``diff_lower``, ``diff_upper``: proven per-output bounds on ``f_j(x) - fq_j(x)``.

What "proven" means: in the default sound mode, the bounds hold for the real-arithmetic functions
f and f_q (their weights being exactly the given float values), despite the bounds themselves
being computed in float32 (see :mod:`qbound.bounds.fp`). ``lower`` is the error at the witness
evaluated in float64 (the real-arithmetic value to about 1e-16 relative); ``lower_float32`` is the
same error as f and fq compute it in their own dtype, which differs from it by rounding (by a whole
quantization step where f_q's rounding meets a tie: :class:`~qbound.errors.FloatTieWarning`).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbound import _map_limit, attack, certify_stages as stages, validate
from qbound.anytime import Tracker, closing_reserve, run_until_deadline
from qbound.bounds import fused, nonlinear
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds, require_paired
from qbound.bounds.interval import interval_bounds
from qbound.box import Box, validate_box
from qbound.certificate import Certificate
from qbound.certify_host import HostSearch, host_chain_for
from qbound.errors import BoundOverflowError, SoundnessError, UnboundedLayerError
from qbound.merge import MergedNetwork, check_networks, merge

# Inputs of at most this many entries count as low-dimensional: auto branches on the input first.
LOW_DIMENSIONAL_INPUTS = 8
# Opt-in (issue 19): "bab" and auto's branch and bound on paired chains of affine layers and ReLUs
# (or clips) with low-dimensional inputs run on the device (qbound.bounds.forward_bab) with this many
# of NeuroDiff's intermediate variables per ReLU layer; None: the host loop (bab.branch_and_bound).
# ACAS Xu 1_1..1_9 vs float16, property 1, epsilon 0.05, output 0, warm, through certify: a median
# 0.94 s against 1.76 s at load 6-8, faster on 7 of 9 nets, 2-4x slower on 1_3 and 1_4
# (docs/results/acas-search.md); but its one program compiles for 1.5-2 minutes on a first call, which is why it
# is not the default.
BAB_DEVICE_FRESH_VARS = None
# Whose neurons get them there ("d" or "all", qbound.bounds.forward.FRESH_SCOPES; None: its default).
BAB_DEVICE_FRESH_SCOPE = None
# "bab" on paired networks with at most LOW_DIMENSIONAL_INPUTS inputs goes to branch and bound first,
# as auto does (interval bounds, then its first batch; no CROWN, differential pass or search before
# it). False: the stages first, as before (benchmarks/bench_certify_fixed_cost.py compares them).
BAB_BRANCH_FIRST = True
METHODS = ("auto", "interval", "crown", "alpha", "diff", "diff-interval", "bab", "milp")
# auto on small paired ReLU chains with few inputs (qbound.bounds.host_chain.chain_of) starts a branch
# and bound in NumPy with the stages, which compiles nothing, and gives it this share of the time
# left alone before the compiled branch and bound starts beside it: on bench_tight.py's exactness
# nets it closes 11 of 12 on its own in 0.06-4.8 CPU seconds, seven of them in under 0.2, where
# the compiled one's first call spends 5-12 CPU seconds compiling (docs/results/exactness.md). The whole
# time (1.0): a compiled search started beside it only took CPU from it (first calls on the three
# hardest nets 1.05-1.78x exact against 1.46-3.5x with a quarter, and no worse warm; on gated
# nets it cannot close, 8-32-32-2 to 8-64-2, the same). If it stops early, the compiled branch and
# bound gets the time left. None: off.
HOST_HEAD_START = 1.0


def _diff_output(merged: MergedNetwork, box, sound: bool, symbolic: bool, alpha_steps: int = 0):
  if alpha_steps:
    from qbound.bounds.alpha import diff_alpha_bounds

    _, _, d = diff_alpha_bounds(merged.f_graph, merged.fq_graph, box, steps=alpha_steps, sound=sound)
  else:
    _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, box, None, sound, symbolic)
  return d[merged.f_graph.output]


# Opt-in: auto on staircases (f_q rounds its activations) with few inputs runs the plain
# differential pass in a thread of its own beside branch and bound. Its program compiles in 2-3 s
# where branch and bound's first batch takes 8-11 s on a first call (qwix rms,3 nnx MLP, load 6-7,
# persistent cache warm), and such first calls end with interval bounds. With it, first calls of the
# rms MLPs ended at 25-59x instead of 255-535x, but once at 25.6 where main's got 4.39 (branch and
# bound compiled sooner without it): a trade, not a gain, so off (docs/results/qwix-rms.md).
PLAIN_DIFF_BESIDE_BAB = False
# Opt-in: on staircases whose f_q computes its scales from the input (dynamic roundings), the
# differential *interval* pass (certify(method="diff-interval"), no backward rows) in a thread of its
# own beside branch and bound. Where the persistent cache does not hold the programs (a machine's
# first call on a model), its steps compile in 1-2 s while branch and bound's first batch takes 5-12
# s, and it bounds these errors 3-30x tighter than intervals: first calls of qwix's dynamic MLPs
# (fresh processes, cache off) ended at 17-35x the reached error instead of 475-1,060x, 85-201x
# instead of 255-535x (rms,3). But with the programs cached (the common case: every later process)
# it took the interpreter from branch and bound's first batch: first calls of the linen minmax row
# ended at 14.1 and 2.5 against 1.5 and 1.6 without it, the tiled row at 1.7 and 4.0 against 1.5 and
# 1.3; started only if branch and bound had no bound after 40% of the time, still 3.1 and 6.2, and a
# cold minmax call then ended with the interval bound. So off, a trade as PLAIN_DIFF_BESIDE_BAB is.
# Not on static scales either way: there its steps compiled for 5.5 s and the second calls ended
# with its bound (6.4, 8.1) where branch and bound's gave 5.4, 5.8 (docs/results/quant-libraries.md).
DIFF_INTERVAL_BESIDE_BAB = False


FIRST_RANDOM_CORNERS = 13
# The share of the time left that certify(method='auto') gives the input-grid enumeration's first
# pass. Once every cell has a bound, its refinement (best first, anytime) keeps the rest of the time
# when GRID_KEEPS_REST: on AQT's whole box branch and bound's bound after 30 s (0.33) is above the
# grid's after its first pass alone (0.24), and the refinement's 20% more time lowers it most
# (docs/results/grid.md).
GRID_SHARE = 0.8
GRID_KEEPS_REST = True
# Where the grid is enumerated, the NumPy search (qbound.bounds.host_bab) still runs while the grid's
# programs compile, and waits once they run (qbound.certify_host.host_chain_for).
HOST_WHILE_GRID_COMPILES = True

# The methods ``time_budget`` holds (the others are one bound propagation each, run to the end).
TIMED_METHODS = ("auto", "bab", "milp")


@jax.jit
def _graph_at(graph, x):
  return graph(x), jnp.zeros((), jnp.float32)  # (f's and fq's own values are not at hand)


def _error_and_scale(f, fq, x):
  """``f(x) - fq(x)`` as they compute it, and the larger of their outputs' magnitudes."""
  y, yq = f(x), fq(x)
  return y - yq, jnp.maximum(jnp.max(jnp.abs(y)), jnp.max(jnp.abs(yq)))


_error_at = jax.jit(_error_and_scale, static_argnums=(0, 1))


def _hashable(*objects) -> bool:
  """Whether every object can key a compiled program (e.g. ``functools.partial``, lambdas)."""
  try:
    for obj in objects:
      hash(obj)
  except TypeError:
    return False
  return True


def _first_probes(box: Box, key) -> np.ndarray:
  """The box's centre, lower and upper corners and :data:`FIRST_RANDOM_CORNERS` random corners.

  The corners are drawn by NumPy from a seed taken from ``key``: ``jax.random`` would compile its
  generator first (0.1-0.2 s of a first call, for 13 coin flips).
  """
  lower, upper = np.asarray(box.lower), np.asarray(box.upper)
  seed = [1] if key is None else np.asarray(jax.random.key_data(key)).reshape(-1).tolist() + [1]
  bits = np.random.default_rng(seed).random((FIRST_RANDOM_CORNERS, *lower.shape)) < 0.5
  corners = np.where(bits, upper, lower)
  return np.concatenate([((lower + upper) / 2)[None], lower[None], upper[None], corners]).astype(lower.dtype)


def _device_loop(merged: MergedNetwork, box: Box) -> bool:
  """Whether branch and bound runs on the device (``BAB_DEVICE_FRESH_VARS`` set, a paired chain of
  affine layers and ReLUs or clips, low-dimensional inputs)."""
  if BAB_DEVICE_FRESH_VARS is None or not merged.paired or int(np.prod(box.shape)) > LOW_DIMENSIONAL_INPUTS:
    return False
  from qbound.bounds.splitting import gradient_supported

  return gradient_supported(merged.f_graph, merged.fq_graph)


@fused.while_in_use
def certify(f: Callable, fq: Optional[Callable], box: Box, *, method: str = "auto", key=None, sound: bool = True,
            search: Optional[attack.Search] = None, time_budget: float = 10.0, target_gap: float = 0.02,
            outputs: Optional[Sequence[int]] = None, epsilon: Optional[float] = None,
            alpha_steps: int = 20, progress: Optional[bool] = None) -> Certificate:
  """Certifies the maximal error ``max_{x in box} |f(x) - fq(x)|_inf`` as a proven interval.

  Args:
    f: the original network, a pure JAX function of one unbatched input (e.g.
      ``functools.partial(model.apply, params)``); or a :class:`~qbound.merge.MergedNetwork`
      with ``fq=None``.
    fq: the compressed network, with the same input and output shapes.
    box: the input set (a :class:`~qbound.box.Box`).
    method: ``"interval"`` (IBP), ``"crown"`` (CROWN on the merged network), ``"alpha"``
      (optimised slopes), ``"diff"`` / ``"diff-interval"`` (differential bounds, symbolic or
      interval), ``"bab"`` (branch and bound on the input; after CROWN, differential bounds and the search,
      except on paired networks with at most ``LOW_DIMENSIONAL_INPUTS`` inputs, where its first
      batch is the differential bound and its probes the search), ``"milp"`` (exact, for piecewise-linear
      nets: ReLU, clip, rounding), or ``"auto"``: interval bounds first. Then, for inputs of at
      most ``LOW_DIMENSIONAL_INPUTS`` (8) entries, branch and bound on the input with all the
      time left (for paired networks straight away: its first batch is the differential bound
      and its probes replace the search; otherwise after CROWN and the search; for small paired
      ReLU chains, :mod:`qbound.bounds.host_bab`'s branch and bound in NumPy, which compiles
      nothing, runs first alone for ``HOST_HEAD_START`` of the time (all of it by default; the
      compiled one gets what it leaves; the interval bound only after it, if it stops early), and the exact
      MILP on small piecewise-linear nets (at most 128 ReLU, clip and rounding neurons in all)
      only if branch and bound stops early. For larger inputs: CROWN, differential bounds and
      the search, the MILP with half the time left (small piecewise-linear nets), optimised
      slopes, branch and bound, and the MILP again with what time is left. Each stage runs only
      while ``upper > (1 + target_gap) * lower`` and time is left. The tightest bound per output
      is kept and ``Certificate.bounds`` records what each method proved.
    key: a ``jax.random`` key for the lower-bound search; ``jax.random.key(0)`` when omitted.
    sound: widen the bounds by proven floating-point margins (the default).
    search: settings of the lower-bound search (:class:`qbound.attack.Search`). Where f_q rounds its
      activations (a graph with ``round`` nodes), a second search also runs on the float64 graph
      once the first bound is proven: :data:`qbound.attack.STAIRCASE` (or ``search``) with
      ``exact=True``, beside the bounds in a thread of its own when there is a time budget.
    time_budget: wall-clock seconds of the whole call with ``auto``, ``bab`` and ``milp``,
      compilation included: the call returns at the deadline with what is proven by then (at
      least one bound: if none is there yet, it waits for the interval bounds). A stage cannot be
      interrupted while it compiles, so the stages run in a worker thread, which skips every
      later stage once the call has returned; what its current stage compiles is kept for the
      next call. ``math.inf``: no limit (they stop at ``target_gap``), in the calling thread.
    target_gap: ``auto`` and ``bab`` stop once ``upper <= (1 + target_gap) * lower``.
    outputs: flat output indices whose error counts (default: all).
    epsilon: if given, ``auto`` and ``bab`` stop as soon as ``upper <= epsilon`` is proved or
      ``lower > epsilon`` is found; see :meth:`Certificate.proves`.
    alpha_steps: Adam steps for optimised slopes.
    progress: a progress bar (stderr) while branch and bound runs, with the current
      ``[lower, upper]`` and pieces per second; ``None`` (default) shows it only on a terminal.

  Returns:
    A :class:`Certificate` with ``lower <= max error <= upper``.

  Raises:
    TypeError: an argument of the wrong kind (``sound='no'``, ``key='abc'``, ``alpha_steps=2.5``).
    ValueError: an argument out of range (NaN or negative numbers, an unknown method, output
      indices out of range), an invalid box (inverted, NaN, wrong shape), f and fq with different
      output shapes, non-finite parameters, or an operation qbound cannot bound.
    BoundOverflowError: a bound overflowed float32 to NaN (inputs or weights too large).
    SoundnessError: a reached error above a proven bound (a bug; never expected).

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(5))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
    >>> cert = qb.certify(f, fq, qb.Box(lower=-jnp.ones(5), upper=jnp.ones(5)))
    >>> 0 < cert.lower <= cert.upper
    True
  """
  start = time.perf_counter()
  # Every argument is checked before tracing or compiling anything (qbound.validate).
  validate.choice("method", method, METHODS)
  check_networks(f, fq)
  key = validate.prng_key("key", key)
  sound = validate.boolean("sound", sound)
  progress = validate.optional_boolean("progress", progress)
  search = attack.check_search(search)
  time_budget = validate.seconds("time_budget", time_budget)
  target_gap = validate.non_negative("target_gap", target_gap)
  epsilon = validate.optional_non_negative("epsilon", epsilon)
  alpha_steps = validate.integer("alpha_steps", alpha_steps, minimum=0)
  outputs = validate.output_indices("outputs", outputs)
  box = validate_box(box)
  _map_limit.release_if_near_limit()  # (before this call compiles anything, or starts threads)
  if isinstance(f, MergedNetwork):
    if fq is not None:
      raise ValueError("pass either a MergedNetwork with fq=None, or two functions f and fq.")
    merged = f
  else:
    merged = merge(f, fq, box)
  graph = merged.graph
  n_out = int(np.prod(merged.output_shape))
  if outputs is not None:
    outputs = np.asarray(outputs, dtype=np.int64).reshape(-1)
    if outputs.size == 0 or outputs.min() < 0 or outputs.max() >= n_out:
      raise ValueError(f"outputs must be flat indices in [0, {n_out}), got {outputs.tolist()}.")
  if method in ("diff", "diff-interval"):
    require_paired(merged)
  if method == "milp":  # say so before spending the budget on the preliminary bounds
    nonlinear.require_none(merged.f_graph, "method='milp'")
  # Differential bounds need paired layers. With products and smooth curves (transformers) auto
  # runs both CROWN on the merged network and differential bounds and keeps the tighter per output
  # (neither wins everywhere: experiments/vit_digits.py), and branch and bound splits on CROWN.
  diff_ok = merged.paired
  transformer = nonlinear.first_nonlinear(merged.f_graph) is not None
  staircase = attack.has_rounding(graph)
  track = Tracker(n_out, outputs)
  # The error as f and f_q compute it themselves, compiled (op by op, every operation of the user's
  # model would compile on its own: seconds on a first call of a CNN) once per pair of functions.
  if isinstance(f, MergedNetwork):
    error_float32 = functools.partial(_graph_at, graph)
  else:
    error_float32 = functools.partial(_error_at if _hashable(f, fq) else _error_and_scale, f, fq)

  def closing_values(witness):
    """``f - f_q`` at the witness in float64, the error as f and fq compute it themselves, and the
    magnitude of their outputs there (0 when not known)."""
    witness_diff = attack.exact_error(graph, witness)
    diff32, scale = error_float32(jnp.asarray(witness))
    diff32 = np.asarray(diff32).reshape(-1)
    return witness_diff, float(np.max(np.abs(diff32 if outputs is None else diff32[outputs]))), float(scale)

  stop = threading.Event()  # set when the call returns at its deadline: later stages are skipped
  # The stages' own deadline: the call's, less what the certificate itself takes at the end.
  stages_end = start + time_budget - closing_reserve(time_budget)

  def left() -> float:
    return stages_end - time.perf_counter()

  def finished() -> bool:
    return stop.is_set() or track.done(target_gap, epsilon) or left() <= 0

  def halted() -> bool:
    """The call has returned at its deadline, and this certificate has its proven bound."""
    return stop.is_set() and bool(track.snapshot()["per_method"])

  searchers: list = []  # the staircase search's thread, when it has one
  search_failure: list = []
  staircase_started = threading.Event()

  def start_staircase_search():
    """f_q rounds its activations: gradient ascent and branch and bound's probes stall on its treads,
    and a float32 search is drawn to inputs within an ulp of a rounding tie, where the real-arithmetic
    error is far smaller (qbound.attack). So the derivative-free search on the float64 graph runs
    too: with a time budget in a thread of its own beside the bounds (see attack.STAIRCASE_SHARE),
    otherwise once, here. Started once the first bound is proven (branch and bound's first batch):
    started before, its compilation delayed that batch's on a loaded machine, and first calls ended
    with interval bounds (linen qwix static int8, load 10)."""
    if not staircase or staircase_started.is_set() or halted() or finished():
      return
    staircase_started.set()
    if method in TIMED_METHODS and time_budget != float("inf"):
      # Beside the NumPy search, which runs the same search in its own rounds, one run only: more
      # took the CPU from it (qwix's nnx rms,3 MLP, 10 s: 1.525 against 1.559-1.572).
      share = 0.0 if host_chain is not None else attack.STAIRCASE_SHARE
      until = time.perf_counter() + share * time_budget
      searcher = threading.Thread(target=stages.staircase_search, name="qbound-staircase-search", daemon=False,
                                  args=(track, graph, box, key, search, until, attack.STAIRCASE_RUNS, finished,
                                        search_failure, True))
      searcher.start()
      searchers.append(searcher)
    else:
      stages.staircase_search(track, graph, box, key, search, 0.0, 1, finished, search_failure)

  # Branch and bound in NumPy (qbound.bounds.host_bab) in a thread of its own, beside the stages.
  host_chain = None
  if (method == "auto" and HOST_HEAD_START is not None and merged.paired and not transformer
      and int(np.prod(box.shape)) <= LOW_DIMENSIONAL_INPUTS):
    host_chain = host_chain_for(merged, box, time_budget=time_budget, grid_share=GRID_SHARE,
                                while_grid_compiles=HOST_WHILE_GRID_COMPILES)
  # Set once the first probes have compiled the float64 evaluation of the witnesses: the host search
  # re-evaluates its inputs with it only then (compiling it in two threads at once costs twice).
  evaluator_ready = threading.Event()
  stages_failed = threading.Event()
  host = HostSearch(track, merged, box, host_chain, outputs=outputs, target_gap=target_gap, epsilon=epsilon,
                    left=left, finished=finished, failed=stages_failed, evaluator_ready=evaluator_ready,
                    failures=search_failure)

  from qbound.bounds.bab import small_net_steps
  from qbound.bounds.common import step_compile

  def whole_box_diff(name: str, symbolic: bool):
    """A differential pass on the whole box in a thread beside branch and bound, into the tracker:
    symbolic (PLAIN_DIFF_BESIDE_BAB) or the interval one (DIFF_INTERVAL_BESIDE_BAB)."""
    try:
      with step_compile(small_net_steps(merged)):  # (a new thread does not inherit the context)
        if not halted() and not finished():
          track.add_bounds(name, *_diff_output(merged, box, sound, symbolic))
    except BaseException as err:  # noqa: BLE001 - raised by the stages once they end
      search_failure.append(err)

  def start_beside(name: str, symbolic: bool):
    beside = threading.Thread(target=whole_box_diff, args=(name, symbolic), name=f"qbound-{name}", daemon=False)
    beside.start()
    searchers.append(beside)  # joined (and its failure raised) when the stages end

  def run_stages():
    try:
      with step_compile(small_net_steps(merged)):  # (in the thread that runs the stages)
        bound_stages()
      start_staircase_search()  # if no stage started it (a method without branch and bound)
    except BaseException:
      stages_failed.set()  # the host search stops too, and the error is raised at once
      raise
    finally:
      evaluator_ready.set()
      for searcher in searchers + ([host.thread] if host.thread is not None else []):
        searcher.join()
    if search_failure:
      raise search_failure[0]

  def interval_stage():
    try:
      track.add_bounds("interval", *interval_bounds(graph, box, sound)[graph.output])
    except (UnboundedLayerError, BoundOverflowError):
      # exp overflowing, or 1/x and rsqrt near 0, by intervals: CROWN's tighter inputs may avoid it.
      if nonlinear.first_nonlinear(graph) is None:
        raise

  def bound_stages():
    # Few inputs: splitting the input box converges fast (its pieces' bounds become exact as they
    # shrink), faster than the MILP or optimised slopes on the nets measured (benchmarks/bench_tight.py).
    # So auto and bab on paired networks go to branch and bound directly: its first batch is the
    # differential bound on the whole box, its probes find the reached errors, and (auto) the MILP
    # gets what time is left. Skipping the separate passes saves their compilation (seconds, cold)
    # and, warm, CROWN, the differential pass and the search before it: 0.2-0.3 s of a bab proof
    # of 0.5-0.9 s on ACAS Xu vs float16 (docs/results/acas-search.md, "certify's fixed cost").
    few_inputs = int(np.prod(box.shape)) <= LOW_DIMENSIONAL_INPUTS
    branch_first = (method == "auto" or (method == "bab" and BAB_BRANCH_FIRST)) and few_inputs and diff_ok \
        and not transformer

    # A first reached error before anything else: the centre, the two extreme corners and a few random
    # corners. Every later search starts from it, so a certificate never reports lower = 0 where one
    # of these inputs already differs, however the time budget is spent.
    if host_chain is not None:  # NumPy only: it starts at once, beside the compilations below
      host.start()
    track.add_witnesses(graph, _first_probes(box, key))
    # What the certificate itself evaluates at its witness, done once now: its compilations are then
    # behind it when the call ends at its deadline.
    closing_values(track.snapshot()["witness"])
    evaluator_ready.set()
    # Cheap proven bounds.
    if method == "interval":
      track.add_bounds("interval", *interval_bounds(graph, box, sound)[graph.output])
    elif (method == "auto" or branch_first) and host_chain is None:
      interval_stage()  # bab on few inputs: a bound at once (2 ms warm on ACAS Xu)
    # Input-grid enumeration (qbound.exact.grid), in GRID_SHARE of the time left at most: where f_q
    # rounds its input first, bound propagation stalls at 3-6x the error (docs/methods/grid.md).
    if method == "auto" and staircase and not halted():
      try:
        stages.run_grid(track, merged, box, sound, time.perf_counter() + GRID_SHARE * left(), halted, target_gap,
                        refine_deadline=stages_end if GRID_KEEPS_REST else None, compiled=host.grid_idle.clear)
      finally:
        host.grid_idle.set()
      if track.done(target_gap, epsilon):  # the grid closed the gap: nothing left to prove
        return
    if not branch_first:
      if halted():
        return
      def crown_stage():
        if method in ("crown", "auto", "alpha", "bab", "milp") or (method == "diff" and not diff_ok):
          track.add_bounds("crown", *crown_bounds(graph, box, None, sound)[graph.output])

      def diff_stage():
        if method in ("diff", "diff-interval") or (method in ("auto", "alpha", "bab", "milp") and diff_ok):
          name = "diff-interval" if method == "diff-interval" else "diff"
          track.add_bounds(name, *_diff_output(merged, box, sound, name == "diff"))

      # CROWN first also on transformers, although the differential bounds are the tighter there
      # (0.10 against 0.25 on the digits ViT at radius 0.001, experiments/vit_digits.py): they
      # compile about twice as many steps, and with them first a cold call with a short budget
      # (3 s, tests/test_nonlinear.py) ended with interval bounds only.
      for stage in (crown_stage, diff_stage):
        stage()
        if halted():
          return

      # Reached errors. Staircases too: their own search compiles for seconds on a first call of a
      # larger net (a CNN of 64 inputs: 13 s at load 12), where this one is done in one or two.
      _, x = attack.maximize_error(graph, box, key=key, search=search)
      track.add_witness(graph, x)
      start_staircase_search()

    if halted():  # the call has returned: no stage starts after it
      return
    milp_ok = method == "milp" or (method == "auto" and stages.small_piecewise_linear_net(merged))
    if milp_ok and method == "auto" and not few_inputs and not finished():
      # On small piecewise-linear nets the exact MILP often closes the gap in well under a second: try it
      # first with half the time left, and fall back to the incomplete methods only if it stops.
      stages.run_milp(track, merged, box, outputs, max(left() / 2, 0.5))

    if method == "alpha" or (method == "auto" and not few_inputs and not finished() and not halted()):
      if diff_ok and (not transformer or track.per_method.get("diff", np.inf) <= track.per_method.get("crown", np.inf)):
        track.add_bounds("diff-alpha", *_diff_output(merged, box, sound, True, alpha_steps))
      else:
        track.add_bounds("crown-alpha", *stages.crown_alpha_output(merged, box, sound, alpha_steps))

    if halted():
      return
    if host_chain is not None:
      if not finished():
        # Alone first: on the nets it closes quickly nothing more is compiled.
        host.thread.join(timeout=None if left() == float("inf") else max(HOST_HEAD_START * left(), 0.0))
      # The interval bound only now, if the NumPy search has proven nothing (its budget ran out
      # before it started) or stopped short of the gap with time left: compiled beside it on a
      # first call, its tracing took the search's interpreter lock for 0.4 of 4.4 s; and compiled
      # at the deadline, it ran beside the next call's search (docs/results/host-search.md).
      stopped_early = not host.thread.is_alive() and left() > 0 and not track.done(target_gap, epsilon)
      if not track.snapshot()["per_method"] or stopped_early:
        interval_stage()
      if finished():
        return
    if method == "bab" or branch_first or (method == "auto" and not finished()):
      from qbound.bounds.bab import branch_and_bound

      if method == "auto" and branch_first and staircase and PLAIN_DIFF_BESIDE_BAB and not finished():
        start_beside("diff", True)
      if (method == "auto" and branch_first and staircase and DIFF_INTERVAL_BESIDE_BAB and stages.dynamic_scales(merged)
          and not finished()):
        start_beside("diff-interval", False)

      # Leave the exact MILP a share of the time where it applies (on few inputs splitting is faster:
      # it keeps the time, and the MILP runs only if it stops early).
      budget = left() * (0.4 if method == "auto" and milp_ok and not few_inputs else 1.0)
      if budget > 0 or branch_first:  # branch_first needs at least the whole box bounded (its first batch)
        reached = [track.lower]

        def report(root_lower, root_upper, upper, lower, witness):
          # The latest proven bound, for a call that returns at its deadline while this still runs.
          if branch_first and "diff" not in track.per_method:
            track.add_bounds("diff", root_lower, root_upper)
          track.add_upper("bab", upper)
          start_staircase_search()
          if lower > reached[0]:
            reached[0] = lower
            track.add_witness(graph, witness)

        # Its last batch ends after its budget: a small share of the time is left for it.
        bab_budget = max(0.95 * budget - 0.05, 1e-6)
        if _device_loop(merged, box):
          from qbound.bounds.forward_bab import forward_branch_and_bound

          res = forward_branch_and_bound(merged, box, outputs=outputs, time_budget=bab_budget, target_gap=target_gap,
                                         epsilon=epsilon, initial_lower=track.lower, initial_witness=track.witness,
                                         sound=sound, report=report, fresh_vars=BAB_DEVICE_FRESH_VARS,
                                         fresh_scope=BAB_DEVICE_FRESH_SCOPE)
        else:
          # stop: once the call has returned at its deadline (or the gap is closed), a branch and
          # bound that was still compiling its first batch ends there instead of running out its
          # budget beside the caller's next call.
          res = branch_and_bound(merged, box, outputs=outputs, time_budget=bab_budget, target_gap=target_gap,
                                 epsilon=epsilon, initial_lower=track.lower, initial_witness=track.witness,
                                 sound=sound, progress=progress, report=report,
                                 stop=finished)
        if branch_first:
          track.add_bounds("diff", res.root_lower, res.root_upper)
        track.add_witness(graph, res.witness)
        track.add_bounds("bab", res.diff_lower, res.diff_upper)

    if milp_ok and not halted() and (method == "milp" or not finished()):
      stages.run_milp(track, merged, box, outputs, max(left(), 1.0))

  if method in TIMED_METHODS:
    run_until_deadline(run_stages, track, stop, deadline=stages_end, closed=host.closed)
  else:  # one bound propagation, run to its end whatever the budget
    run_stages()
  final = track.snapshot()
  if final["witness"] is None:
    # The deadline came while the first probes were still being evaluated (their float64 program
    # compiling on a loaded machine) but after another thread's first bound (the NumPy search's):
    # a certificate still needs an input whose error it reports.
    track.add_witnesses(graph, _first_probes(box, key))
    final = track.snapshot()

  lower, upper, witness = final["lower"], final["upper"], final["witness"]
  witness_diff, lower_float32, scale_float32 = closing_values(witness)
  if lower > upper:
    hint = "" if sound else " (sound=False skips the floating-point margins; use sound=True)"
    raise SoundnessError(f"reached error {lower!r} at {witness.tolist()} exceeds the proven bound {upper!r} "
                         f"({final['per_method']}){hint}; please report this input.")
  validate.float_ties("certificate", lower_float32, upper, witness, scale_float32)
  per_method, best = final["per_method"], final["best_method"]
  if method != "auto":  # a named method reports under its own name (its preliminary bounds included)
    per_method, best = {method: upper}, method
  return Certificate(lower=lower, upper=upper, diff_lower=final["diff_lower"], diff_upper=final["diff_upper"],
                     witness=witness, method=best, seconds=time.perf_counter() - start,
                     bounds=per_method, sound=sound, lower_float32=lower_float32, witness_diff=witness_diff,
                     box_lower=np.asarray(box.lower), box_upper=np.asarray(box.upper))
