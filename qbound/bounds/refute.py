"""Counterexample search inside branch and bound: projected gradient ascent on the worst pieces.

Branch and bound's own probes (a piece's centre and the corner its gradient points to) find the
errors a nearly affine piece reaches, but on a box as large as ACAS Xu property 7's (almost the
whole input space) the pieces stay large for the whole time budget and those two points per piece
miss the peaks. This module adds a real search, run while branch and bound works, in a bounded
share of its time: every round, projected gradient ascent with momentum
(:func:`qbound.attack.search_pieces`: for each output and sign, random starts and the centre of
each piece, signed steps projected back onto the piece; PGD, Madry et al., ICLR 2018, with
momentum as in MI-FGSM, Dong et al., CVPR 2018) on a fixed number of rows:

* the whole box, twice (random starts over the whole input set: on ACAS Xu pruned pairs this alone
  finds the errors 0.576 > 0.5 on 1_3 property 7 and 0.0519 > 0.05 on 1_6 property 7 that 20 s of
  branch and bound's probes did not reach: 0.259 and 0.0447);
* boxes around the best input found so far, a quarter, a sixteenth and a 256th of the box's width
  (a peak just below epsilon is often a ridge whose top lies close by);
* the open pieces with the largest upper bounds (where the bound is loose, a large error may hide;
  the pieces shrink as branch and bound goes, so later rounds search ever finer);
* without an epsilon (closing the gap between the reached error and the bound) on few inputs,
  also :func:`qbound.attack.maximize_error` on the whole box with a new key each round
  (:data:`GLOBAL_SEARCH`): a close copy's error has many peaks of nearly equal height, and the
  rows above climb to the nearest one (issue 14). With an epsilon, the same once the bound is far
  from it (:data:`FAR_GLOBAL`): a proof is then out of reach, and a higher peak elsewhere decides.
  "Far" is judged after :data:`FAR_AFTER` of the budget spent searching: the seconds the process
  spent compiling meanwhile (a first call's steps) do not count.

The rows have one fixed count, so one compilation serves every round. A round runs when the time
spent searching is at most :data:`SHARE` of the time branch and bound has run since its root's batch,
and never before :data:`FIRST_AFTER` seconds after it (instances decided sooner pay nothing; counted from
the root's end, so that a first call's compilation of the root does not bring the first round
forward).

Rounds pay their way (issue 19): where a counterexample looks unlikely, a round is charged to the
share *before* it runs. Unlikely means the error reached so far is below :data:`HOPEFUL_LOWER` times
epsilon and the bound within :data:`FAR_RATIO` times epsilon: ACAS Xu 1_1..1_9 against their float16
copies reach about 1e-5 against epsilon 0.05 while their bound closes by itself from 30-40x epsilon,
and a round (0.06-0.1 s warm) ran after 0.5 s and took 10-30% of calls that prove in 0.5-3 s. Its
cost is the cheapest round measured for this kind of search (:data:`ROUND_GUESS` per output before
any), so the first such round waits until the share covers it. Elsewhere (an error reached within a
factor ten of epsilon, or a bound still hundreds of times epsilon, as on the pruned pairs that the
rounds refute) the rounds run as before: checked before, paid after.

Everything returned is an error actually reached at its input (float32 evaluation of the merged
graph, as branch and bound's probes): a lower bound, never part of a proof.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from typing import Callable, Optional

import jax
import numpy as np

from qbound import graph as G
from qbound.attack import PieceSearch, Search, maximize_error, search_pieces
from qbound.bounds import fused
from qbound.box import Box

# The cheapest round measured per kind of search (node shapes, input size, outputs, settings): a
# warm round's cost, which later calls charge before their first round (the first call's first round
# compiles and costs seconds more).
_ROUND_COST: dict = {}

# Whether branch and bound searches its worst pieces by default (its ``search=None``).
ENABLED = True
# Share of branch and bound's running time that the searches may take.
SHARE = 0.05
# ... and once a proof looks out of reach: after FAR_AFTER of the time budget the bound is still
# more than FAR_RATIO times epsilon (ACAS Xu property 7: uppers 38-2,881 after 20 s against 0.05 or
# 0.5). Not earlier: on a loaded machine, property 1 at 0.05 is still at 100x epsilon after 4 s of
# the 15 s its proof takes, and a search in half the time then left it undecided.
FAR_SHARE = 0.5
FAR_RATIO = 100.0
FAR_AFTER = 0.4
# Seconds branch and bound runs after its root's batch before the first search round (0.4 s after a
# warm ACAS Xu root of about 0.1 s is where 0.5 s from the start was before issue 19).
FIRST_AFTER = 0.4
# Whether FIRST_AFTER counts from the root's batch's end (False: from branch and bound's start, as
# before issue 19; a first call then ran a compiling round right after a compiling root).
FIRST_FROM_ROOT = True
# A round is charged to the share before it runs while the error reached is below HOPEFUL_LOWER
# times epsilon and the bound below FAR_RATIO times epsilon (0: never, as before issue 19). The pruned
# pairs the rounds refute had reached 0.45-0.9 of epsilon (1_6, 1_7 property 7 at 0.05, 1_3 at 0.5)
# or had bounds thousands of times epsilon; float16 copies of ACAS Xu reach 3e-4 of it.
HOPEFUL_LOWER = 0.1
# Seconds a round costs per output, before one was measured (ACAS Xu, 8 rows x 5 starts x 100 steps,
# warm, loaded machine: 0.06-0.1 s for one output, 0.25-0.28 s for five).
ROUND_GUESS = 0.06
# Rows per round: the whole box (BOX_ROWS times), boxes around the best input, the worst open pieces.
ROWS = 8
# The whole box takes two rows: on ACAS Xu 1_7 property 7 at epsilon 0.05 (20 s, three seeds, loaded
# machine) one row never found an error above 0.0416, two found 0.079-0.082 in 0.6-5.8 s each time.
BOX_ROWS = 2
# (Five whole-box rows once far from a proof did no better there: one seed of three either way.)
# Edges, relative to the box's, of the boxes searched around the best input found so far.
AROUND_BEST = (1 / 4, 1 / 16, 1 / 256)
# Settings of each round's ascent (per row: 4 random starts and the centre, for each output and sign).
SEARCH = PieceSearch(starts=4, steps=100)
# Without an epsilon (branch and bound closing the gap between the reached error and the bound),
# each round also runs the whole-box search of qbound.attack.maximize_error with these settings and
# a new key, once GLOBAL_AFTER seconds have passed since the root's batch: the rows above climb to
# the nearest peak, but a close copy's error has many peaks of nearly equal height. On ACAS Xu 1_1
# vs float16, property 1, output 0 (3 s of search each, load 4-6): best 1.636e-5 with these
# settings (6 runs), 1.624e-5 with 20 refinement rounds of the default (28 runs), 1.556e-5 with 15
# rounds of the rows above on the whole box (docs/results/acas-f16-gap.md). None: no such search.
GLOBAL_SEARCH: Optional[Search] = Search(samples=16384, restarts=64, steps=200, refine_rounds=30, refine_points=64)
GLOBAL_AFTER = 1.0
# ... and with an epsilon once the bound is far from it (see FAR_SHARE): a proof is then out of reach,
# and a peak above epsilon elsewhere in the box decides the instance. ACAS Xu 1_7 against its pruned
# copy, property 7, epsilon 0.05: the full run of 2026-12-07 ended undecided at 0.0409 reached,
# while this search finds 0.083 in 0.7 s.
FAR_GLOBAL = True
# ... on inputs of at most this many entries (where it was measured, and where 16,384 samples cost
# little; a round runs inside branch and bound's loop, so a long first compilation would stall it).
GLOBAL_MAX_INPUTS = 8
# Share of branch and bound's running time the rounds may take without an epsilon, where they run
# that search (elsewhere SHARE): on ACAS Xu 1_1 vs float16 (certify, 60 s, load 4.6-7.3) the lower
# bound reached 1.631e-5 / 1.635e-5 with 10% against 1.613e-5 / 1.623e-5 with 5%.
GAP_SHARE = 0.10


def rows_to_search(lower: np.ndarray, upper: np.ndarray, best_x: np.ndarray, worst: list,
                   rows: int = ROWS, around=AROUND_BEST, box_rows: int = BOX_ROWS) -> tuple[np.ndarray, np.ndarray]:
  """The pieces of one round (flattened corners, ``(rows, dim)``): the box ``box_rows`` times, boxes
  around ``best_x`` (clipped to the box) and the pieces ``worst`` (``(lower, upper)`` pairs), padded
  with the box."""
  width = upper - lower
  los, his = [lower] * box_rows, [upper] * box_rows
  for share in around:
    half = width * (share / 2)
    los.append(np.clip(best_x - half, lower, upper))
    his.append(np.clip(best_x + half, lower, upper))
  for lo, hi in worst[:max(rows - len(los), 0)]:
    los.append(lo)
    his.append(hi)
  while len(los) < rows:
    los.append(lower)
    his.append(upper)
  return np.stack(los[:rows]).astype(np.float32), np.stack(his[:rows]).astype(np.float32)


@dataclasses.dataclass
class WorstPieceSearch:
  """The search rounds of one branch-and-bound run (mutable: it keeps the time it has spent).

  Attributes:
    graph: the merged graph ``g = f - f_q``.
    outputs: indices into the flattened output whose error counts.
    lower, upper: the whole box's corners, flattened.
    shape: the input's shape.
    search: the ascent's settings.
    share: most of branch and bound's time the rounds may take.
    far_share: the same once the bound is far from epsilon (:data:`FAR_RATIO`) after ``far_after``
      seconds (not counting those spent compiling, with ``compiling``).
    compiling: a clock of the seconds this process has spent compiling
      (:func:`qbound.bounds.fused.seconds_compiling`), or None. A first call compiles for most of its
      first seconds, and its proof is not out of reach for being slow: on ACAS Xu 1_1 against its
      pruned copy, property 1 at 0.05, a first call (nothing cached) proves it in 16.2 s of a 20 s
      budget counting only its search's time, and ended undecided (upper 16.8) when the far test
      counted its 10-12 s of compilation.
    gap_share: the same without an epsilon.
    global_search: without an epsilon, the settings of a :func:`qbound.attack.maximize_error` on
      the whole box that each round also runs, once ``global_after`` seconds have passed since the
      root's batch (None: none).
    first_after: seconds before the first round (after the root's batch with ``first_from_root``).
    first_from_root: count ``first_after`` from the first :meth:`due` (called after the root's batch).
    hopeful_lower: below this share of epsilon reached (and a bound within :data:`FAR_RATIO`
      epsilon), a round's cost is charged before it runs.
    seed: the rounds' keys are ``jax.random.key(seed + round)``.
    far: whether the last :meth:`due` found the bound far from epsilon.
    origin: seconds of branch and bound at the first :meth:`due` (its root's end), or 0.
    compiled_before: the ``compiling`` clock's reading when branch and bound began (None: read when
      this search is made).

  Example (with ``first_from_root`` the clock starts at the first :meth:`due`, after the root):

    >>> s = WorstPieceSearch(None, np.arange(1), np.zeros(1), np.ones(1), (1,), first_after=0.4,
    ...                      first_from_root=True, hopeful_lower=0.1)
    >>> s.due(0.1), s.due(0.6, upper=2.0, epsilon=0.05, lower=0.03)  # the root ends at 0.1 s; hopeful
    (False, True)
    >>> s.due(0.6, upper=2.0, epsilon=0.05, lower=1e-5)  # unlikely: a 0.06 s round needs 1.2 s at 5%
    False
    >>> s.due(1.4, upper=2.0, epsilon=0.05, lower=1e-5), s.due(0.6, upper=10.0, epsilon=0.05, lower=1e-5)
    (True, True)
  """

  graph: G.Graph
  outputs: np.ndarray
  lower: np.ndarray
  upper: np.ndarray
  shape: tuple
  search: PieceSearch = SEARCH
  share: float = SHARE
  first_after: float = FIRST_AFTER
  far_share: float = FAR_SHARE
  far_after: float = np.inf
  first_from_root: bool = False
  hopeful_lower: float = 0.0
  seed: int = 0
  global_search: Optional[Search] = None
  global_after: float = GLOBAL_AFTER
  gap_share: float = SHARE
  compiling: Optional[Callable[[], float]] = None
  far: bool = False
  gap: bool = False
  elapsed: float = 0.0
  spent: float = 0.0
  rounds: int = 0
  origin: Optional[float] = None
  compiled_before: Optional[float] = None  # the compiling clock's reading when branch and bound began

  def __post_init__(self):
    if self.compiling is not None and self.compiled_before is None:
      self.compiled_before = self.compiling()

  def _key(self) -> tuple:
    nodes = tuple(n.shape for n in self.graph.nodes) if self.graph is not None else ()
    return (nodes, self.lower.size, len(self.outputs), self.search)

  def round_cost(self) -> float:
    """The seconds a round is expected to cost: the cheapest measured, else a guess per output."""
    return _ROUND_COST.get(self._key(), ROUND_GUESS * max(len(self.outputs), 1))

  def due(self, elapsed: float, upper: float = np.inf, epsilon: Optional[float] = None,
          lower: float = 0.0) -> bool:
    """Whether a round may run after ``elapsed`` seconds of branch and bound whose bound is now
    ``upper`` and whose reached error is ``lower`` (with ``epsilon`` given and ``upper`` far above it,
    the search gets more time; with ``lower`` far below it and ``upper`` not far above, a round must
    fit in the share before it runs)."""
    if self.origin is None:
      self.origin = elapsed if self.first_from_root else 0.0
    self.gap, self.elapsed = epsilon is None, elapsed
    searched = elapsed - (self.compiling() - self.compiled_before if self.compiling is not None else 0.0)
    self.far = epsilon is not None and searched >= self.far_after and upper > FAR_RATIO * epsilon
    if elapsed - self.origin < self.first_after:
      return False
    # (The share, too, counts from the root's end: a first call's compiling root buys no search.)
    allowed = (self.far_share if self.far else self.gap_share if self.gap else self.share) * (elapsed - self.origin)
    unlikely = epsilon is not None and lower < self.hopeful_lower * epsilon and upper <= FAR_RATIO * epsilon
    return self.spent + (self.round_cost() if unlikely else 0.0) <= allowed

  def run(self, heap: list, best_x) -> tuple[float, np.ndarray]:
    """One round on the box, around ``best_x`` and on the worst pieces of branch and bound's
    ``heap`` (:class:`~qbound.bounds.bab_children.OpenPiece`, worst bound first): the best
    ``(error, input)`` reached."""
    start = time.perf_counter()
    worst = [(item.piece.lo, item.piece.hi) for item in heapq.nsmallest(ROWS, heap)]
    los, his = rows_to_search(self.lower, self.upper, np.asarray(best_x, np.float32).reshape(-1), worst)
    value, x = search_pieces(self.graph, los.reshape(-1, *self.shape), his.reshape(-1, *self.shape),
                             key=jax.random.key(self.seed + self.rounds), outputs=self.outputs, search=self.search)
    whole_box = ((self.gap or (self.far and FAR_GLOBAL)) and self.global_search is not None
                 and self.elapsed - (self.origin or 0.0) >= self.global_after)
    if whole_box:
      box = Box(self.lower.reshape(self.shape), self.upper.reshape(self.shape))
      found, at = maximize_error(self.graph, box, key=jax.random.key(self.seed + self.rounds + 1_000_003),
                                 search=self.global_search, outputs=self.outputs)
      if found > value:
        value, x = found, np.asarray(at).reshape(self.shape)
    self.rounds += 1
    cost = time.perf_counter() - start
    self.spent += cost
    key = self._key()
    if not whole_box:  # (the cost of the rounds that epsilon's decisions charge in advance)
      _ROUND_COST[key] = min(cost, _ROUND_COST.get(key, np.inf))
    return value, x


def searcher(graph: G.Graph, outputs, lower, upper, shape, enabled: Optional[bool],
             time_budget: float = np.inf, compiled_before: Optional[float] = None) -> Optional[WorstPieceSearch]:
  """The search for branch and bound's ``search`` option (None: :data:`ENABLED`) within its
  ``time_budget``; ``compiled_before``: :func:`qbound.bounds.fused.seconds_compiling` when branch
  and bound began (None: now)."""
  if not (ENABLED if enabled is None else enabled):
    return None
  whole_box = GLOBAL_SEARCH if np.size(lower) <= GLOBAL_MAX_INPUTS else None
  # The module's settings as they are now (tests and benchmarks change them).
  return WorstPieceSearch(graph, np.asarray(outputs), np.asarray(lower, np.float32).reshape(-1),
                          np.asarray(upper, np.float32).reshape(-1), tuple(shape), search=SEARCH, share=SHARE,
                          first_after=FIRST_AFTER, far_share=FAR_SHARE, far_after=FAR_AFTER * time_budget,
                          first_from_root=FIRST_FROM_ROOT, hopeful_lower=HOPEFUL_LOWER,
                          global_search=whole_box, global_after=GLOBAL_AFTER,
                          gap_share=SHARE if whole_box is None else GAP_SHARE, compiling=fused.seconds_compiling,
                          compiled_before=compiled_before)
