"""How a branch-and-bound search on a large net uses the machine: the walks' own programs and when
they compile, how its arrays are placed, the row counts it takes ahead, and batches bounded at once.

None of this changes a piece's bound: a piece gets the same bounds step by step or by programs, with
row counts read back or taken ahead, in a batch bounded alone or beside another. What changes is
how many pieces a second the search bounds, and with batches at once the order in which it takes
them from its heap (``docs/results/acas-speed.md``, ``docs/results/pruned-pairs.md``).

Example:
  >>> from qbound.bounds import bab_machine
  >>> bab_machine.use_programs(small=True, mesh=None)  # small nets keep the steps
  False
  >>> bab_machine.batches_at_once(True, open_pieces=10, elapsed=30.0)  # a narrow frontier: one batch
  1
  >>> bab_machine.side_by_side(lambda batch: [2 * x for x in batch], [[1, 2], [3]])
  [[2, 4], [6]]
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import functools
import threading
from typing import Callable, Optional

import jax
import numpy as np

from qbound import sharding
from qbound._recent import Recent
from qbound.bounds import fused
from qbound.bounds.host_halves import usable_cores

# On nets above bab.SMALL_NET_NEURONS, paired batches (the root's too, with its widening measure) take
# each backward walk, and each node's forward intervals, by a compiled program of their own once a
# worker thread has compiled it between calls (qbound/bounds/fused.py): the same bounds in fewer
# dispatches. ACAS Xu 1_1..1_9 vs float16, output 0, warm after fused.wait(): median 0.29-0.31 s
# against 0.37-0.38 s step by step in the same runs (0.216 s against 0.292 s with ROWS_AHEAD and the
# root's batch skipping f's rows for close copies; benchmarks/bench_tight.py --only acas-nets).
# Small nets keep the steps (their batches cost little more than the dispatches' Python, and a test
# suite of small nets would compile programs for nothing).
FUSED_WALKS = True

# A search that takes the walks' programs lets those it lacks compile beside it (fused.compile_beside,
# rather than once qbound is idle) when it has run this many seconds with this many seconds of its
# budget left, and nothing was compiled for BESIDE_WARM_SECONDS: it is warm and long, and the
# programs pay for their compilation several times over (ACAS Xu 1_6 against its pruned copy,
# property 8, epsilon 0.5: 15-17 s against 25 s once they are ready). A first call still compiling
# its steps, or a proof of a second or two, would only be slowed on a 2-core machine (see fused's
# module docstring). ACAS Xu pruned pairs, 20 s budgets: docs/results/pruned-pairs.md.
BESIDE_AFTER = 2.0
BESIDE_SECONDS_LEFT = 5.0
BESIDE_WARM_SECONDS = 1.0

# A search with the programs on a broad frontier bounds BATCHES_AT_ONCE batches at once, all but the
# first on threads of their own (BATCHES_AT_ONCE_AFTER seconds in, with at least BATCHES_AT_ONCE_OPEN
# open pieces): XLA runs most of a batch's steps on one core here (1.47-1.49 of two cores busy), and
# JAX lets go of the interpreter while a step runs. ACAS Xu pruned pairs, property 8 at 0.5, warm,
# 20 s: 10-15% more pieces a second; three at once did no better (docs/results/pruned-pairs.md).
BATCHES_AT_ONCE = 2
BATCHES_AT_ONCE_AFTER = 2.0
BATCHES_AT_ONCE_OPEN = 64

# Whether the searches that take the walks' programs also take each walk's row count from their
# earlier batches (sparse.diff_bounds_sparse's row_sizes).
ROWS_AHEAD = True

# The row sizes after the root's batch of the last few searches (see ROWS_AHEAD), by their graphs
# (qb.merge keeps its last merges), box, outputs, batch size and mode, so that a search of the same
# boxes again reads nothing back in its root's batch either.
_ROOT_ROW_SIZES = Recent(size=8)

_batch_threads = None  # the threads bounding the other batches (made on first use)
_batch_threads_lock = threading.Lock()


def use_programs(small: bool, mesh) -> bool:
  """Whether a search's batches take the walks' own programs (FUSED_WALKS): large nets on one
  device (a batch sharded over several keeps the steps, which map over its boxes as they lie)."""
  return FUSED_WALKS and not small and sharding.size(mesh) == 1


def placements(programs: bool, mesh) -> tuple[Callable, Callable]:
  """``(put_networks, put_batch)``: how a search puts its networks and its batches on the devices.

  The walks' programs return plain arrays (on the default device, committed to none), as jax.jit
  does for such arguments. Networks and batches put on a one-device mesh (committed, with its
  sharding) made the steps meet both kinds, and jit compiles once for each mix of argument
  shardings: 15-23 compilations per new ACAS Xu pruned-pair instance once the programs were ready,
  against 1-16 without them. With the programs on the default device, everything stays plain.
  """
  if programs and mesh.devices.flat[0] == jax.devices()[0]:
    return sharding.put_plain, sharding.put_plain
  return functools.partial(sharding.put_replicated, mesh=mesh), functools.partial(sharding.put_batch, mesh=mesh)


def root_row_sizes(programs: bool, graphs: tuple, box, outputs: np.ndarray, batch_size: int,
                   sound: bool) -> tuple[Optional[tuple], Optional[dict]]:
  """``(key, row_sizes)``: the dict a search with the programs keeps its walks' row counts in
  (ROWS_AHEAD), started from the root's batch of an earlier search of the same boxes, and the key to
  :func:`remember_root_row_sizes` it under; ``(None, None)`` without."""
  if not (programs and ROWS_AHEAD):
    return None, None
  key = (id(graphs[0]), id(graphs[1]), tuple(np.asarray(box.lower).reshape(-1).tolist()),
         tuple(np.asarray(box.upper).reshape(-1).tolist()), tuple(np.asarray(outputs).tolist()), batch_size, sound)
  return key, dict(_ROOT_ROW_SIZES.get(key, graphs) or {})


def remember_root_row_sizes(key: tuple, row_sizes: dict, graphs: tuple) -> None:
  """Keeps the row counts after a search's root batch for the next search of the same boxes."""
  _ROOT_ROW_SIZES.put(key, dict(row_sizes), graphs)


def ask_beside(programs: bool, elapsed: float, time_budget: float) -> None:
  """Lets the programs a search lacks compile beside it once it is long and warm (BESIDE_*)."""
  if (programs and elapsed >= BESIDE_AFTER and time_budget - elapsed >= BESIDE_SECONDS_LEFT
          and fused.seconds_since_compilation() >= BESIDE_WARM_SECONDS):
    fused.compile_beside()


def batches_at_once(programs: bool, open_pieces: int, elapsed: float) -> int:
  """How many batches a search takes from its heap at once (see BATCHES_AT_ONCE): one where a
  single core is usable, as the NumPy search's halves (:func:`~qbound.bounds.host_halves.usable_cores`)."""
  due = (programs and open_pieces >= BATCHES_AT_ONCE_OPEN and elapsed >= BATCHES_AT_ONCE_AFTER
         and usable_cores() >= 2)
  return max(BATCHES_AT_ONCE, 1) if due else 1


def side_by_side(bound: Callable, batches: list) -> list:
  """``[bound(batch) for batch in batches]``, all but the first batch on threads of their own (in a
  copy of this thread's context: the steps' XLA options, :func:`qbound.bounds.common.step_compile`);
  all in this thread once the interpreter is shutting down (a certify stage still finishing its
  batch as a script exits), where no thread takes new work."""
  try:
    others = [_other_batches().submit(contextvars.copy_context().run, bound, batch) for batch in batches[1:]]
  except RuntimeError:  # ("cannot schedule new futures after interpreter shutdown"), as host_halves does
    return [bound(batch) for batch in batches]
  try:
    first = [bound(batch) for batch in batches[:1]]
  finally:
    rest = [other.result() for other in others]
  return first + rest


def _other_batches() -> concurrent.futures.ThreadPoolExecutor:
  global _batch_threads
  with _batch_threads_lock:
    if _batch_threads is None:
      _batch_threads = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="qbound-other-batch")
    return _batch_threads
