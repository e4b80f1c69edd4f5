"""Bigger compiled programs for branch and bound's warm batches, compiled on a second thread.

Bound propagation runs as a Python loop over small compiled steps: each step compiles once per node
kind and shape and serves every node and walk of that kind, so a first call compiles little. The
backward passes (:func:`qbound.bounds.crown.backward_lower`,
:func:`qbound.bounds.diff.diff_backward_lower`) walk from a target node to the input one step per
node, about ten steps a walk on ACAS Xu's six layers, and the forward intervals take three steps a
node (f, f_q and their difference). Each step is one dispatch from Python, and on the many small
batches of a branch and bound that proves an epsilon for a close copy (ACAS Xu against its float16
copy: batches of 16 pieces, 30-35 ms each) the dispatches and the arrays passed between steps cost
about a third of each batch.

So there, each walk also gets one compiled program of its own (for its target, row count and batch
shape), and so do each node's three forward intervals. Compiling them takes seconds (7.3 s for one
ACAS Xu batch's 18 programs: a walk's program grows with its depth, and each target and row count
is one more), which a first call would pay in full; and on a 2-core machine a compilation beside a
call slows the call as much (ACAS Xu 1_1's first call 21-22 s against 10.8 s, warm calls in a loop
0.65-1.5 s against 0.4 s). So a call asks for the programs it lacks and goes on step by step; a
worker thread compiles them only once no bounding call (:func:`while_in_use`: ``certify``,
``branch_and_bound``) has run for ``IDLE_SECONDS``, or at once in :func:`wait`, or beside a
search that runs long and warm (:func:`compile_beside`: the compilation then pays for itself many
times over). Later batches and calls take each program that is ready. The bounds are the same
computation (up to XLA's order of floating-point operations, which the proven margins already allow
for, :mod:`qbound.bounds.fp`).

On ACAS Xu 1_1..1_9 vs float16 (property 1, epsilon 0.05, output 0), warm after :func:`wait`:
median 0.29-0.31 s against 0.37-0.38 s step by step in the same runs (docs/results/acas-speed.md; with
the end-of-batch check by a program of its own too, :func:`bound_counts`, and fewer fixed costs
around the batches, and the rows' indices taken ahead, :func:`row_indices`, 0.216 s against 0.292 s). JAX's
persistent compilation cache (:mod:`qbound._compilation_cache`) keeps the programs for later
processes (which still compile, i.e. load, them between calls).

``ENABLED = False`` turns this off (every pass step by step).

Example:
  >>> import jax, jax.numpy as jnp, qbound as qb
  >>> from qbound.bounds import fused
  >>> from qbound.bounds.crown import crown_bounds
  >>> g = qb.trace(lambda x: jax.nn.relu(x @ jnp.array([[1.0, -1.0], [2.0, 0.5]])) @ jnp.ones((2, 1)),
  ...              jnp.zeros(2))
  >>> box = qb.Box(-jnp.ones((4, 2)), jnp.ones((4, 2)))
  >>> bounds = crown_bounds(g, box, batched=True)
  >>> rows = jnp.ones((4, 1, 1))
  >>> first = fused.crown_lower(g, g.output, rows, bounds, box, sound=True)  # step by step
  >>> fused.wait()  # its program, compiled now rather than after a second of idleness
  >>> again = fused.crown_lower(g, g.output, rows, bounds, box, sound=True)  # one program
  >>> bool(jnp.allclose(first, again)), fused.programs() >= 1
  (True, True)
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from qbound.bounds import guards
from qbound.bounds.crown import backward_lower
from qbound.bounds.diff import diff_backward_lower, diff_interval_node
from qbound.bounds.interval import node_interval
from qbound.bounds.rows import first_set_entries
from qbound.box import Box

ENABLED = True
# At most this many programs per process (each holds a compiled executable and its memory maps, see
# qbound._map_limit, which clears them with JAX's caches); past it, the others stay step by step.
MAX_PROGRAMS = 256

_FAILED = object()  # a program that could not be compiled or called: its walks stay step by step
_programs: dict = {}  # key -> compiled program, None until it is compiled, or _FAILED
_executor = None
_executor_lock = threading.Lock()
_WORKER_NAME = "qbound-programs"


def _crown_walk(graph, rows, bounds, lo, hi, lines, *, target, sound, with_coefficients, signed_pairs):
  return backward_lower(graph, target, rows, bounds, Box(lo, hi), sound=sound, batched=True, lines=lines,
                        with_coefficients=with_coefficients, signed_pairs=signed_pairs)


def _diff_walk(pair, rows, bounds, lo, hi, lines, *, target, sound, with_coefficients, signed_pairs):
  (fg, qg), (z, zq, d) = pair, bounds
  return diff_backward_lower(fg, qg, target, rows, z, zq, d, Box(lo, hi), sound=sound, batched=True,
                             lines=lines, with_coefficients=with_coefficients, signed_pairs=signed_pairs)


def _node_intervals(pair, z_in, q_in, d_in, *, sound):
  def one(z_in, q_in, d_in):
    nf, nq = pair
    return (node_interval(nf, z_in, sound), node_interval(nq, q_in, sound),
            diff_interval_node(nf, nq, z_in, q_in, d_in, sound))
  return jax.vmap(one)(z_in, q_in, d_in)


def _bound_counts(bounds, *, sound):
  return guards._counts(bounds, sound=sound)


def _row_indices(mask, *, size):
  flat, counts = first_set_entries(mask.reshape(mask.shape[0], -1), size)
  return flat, jnp.max(counts)


def _host_row_indices(mask, size: int):
  flat, counts = first_set_entries(np.asarray(mask).reshape(mask.shape[0], -1), size)
  return flat, int(counts.max(initial=0))


_PROGRAMS = {"crown": _crown_walk, "diff": _diff_walk, "intervals": _node_intervals, "counts": _bound_counts,
             "rows": _row_indices}


def crown_lower(graph, target: int, rows, bounds, box: Box, *, sound: bool, lines=None,
                with_coefficients: bool = False, signed_pairs: bool = False):
  """:func:`qbound.bounds.crown.backward_lower` over a batch of boxes (``batched=True``), by its
  walk's own program once compiled (see the module docstring)."""
  args = (graph, rows, list(bounds[:target + 1]), box.lower, box.upper, lines)
  static = dict(target=target, sound=sound, with_coefficients=with_coefficients, signed_pairs=signed_pairs)
  return _run("crown", _walk_key("crown", graph, rows, box, lines, static), args, static)


def diff_lower(fg, qg, target: int, rows, z, zq, d, box: Box, *, sound: bool, lines=None,
               with_coefficients: bool = False, signed_pairs: bool = False):
  """:func:`qbound.bounds.diff.diff_backward_lower` over a batch of boxes (``batched=True``), by its
  walk's own program once compiled (see the module docstring)."""
  bounds = (list(z[:target + 1]), list(zq[:target + 1]), list(d[:target + 1]))
  args = ((fg, qg), rows, bounds, box.lower, box.upper, lines)
  static = dict(target=target, sound=sound, with_coefficients=with_coefficients, signed_pairs=signed_pairs)
  return _run("diff", _walk_key("diff", (fg, qg), rows, box, lines, static), args, static)


def node_intervals(nf, nq, z_in, q_in, d_in, *, sound: bool, fallback):
  """Interval bounds of f's node ``nf``, f_q's ``nq`` and their difference over a batch of boxes
  (:func:`qbound.bounds.interval.node_interval`, :func:`qbound.bounds.diff.diff_interval_node`;
  ``nf``, ``nq`` reading inputs ``0..k-1``), by one program once compiled; until then
  ``fallback()``, the same three by their steps."""
  args = ((nf, nq), z_in, q_in, d_in)
  leaves, tree = jax.tree_util.tree_flatten(args)
  key = ("intervals", sound, tree, tuple(_aval(leaf) for leaf in leaves))
  return _run("intervals", key, args, dict(sound=sound), fallback)


def bound_counts(groups, *, sound: bool):
  """:func:`qbound.bounds.guards.counts` of ``groups`` (``(what, graph, bounds)`` triples) by one
  program once compiled; until then counted by NumPy on the host, as
  :func:`qbound.bounds.guards.check_bounds` does for few entries (its end-of-batch check read every
  node's bounds one array at a time: 4 ms of an ACAS Xu batch's 26). Returns ``(nodes, 2)`` counts."""
  bounds = tuple(tuple(tuple(b) for b in group_bounds) for _, _, group_bounds in groups)
  leaves, tree = jax.tree_util.tree_flatten(bounds)
  key = ("counts", sound, tree, tuple(_aval(leaf) for leaf in leaves))
  return _run("counts", key, (bounds,), dict(sound=sound), lambda: guards.host_counts(groups, sound=sound))


def row_indices(mask, size: int):
  """Each box's first ``size`` set entries of ``mask`` (leading axis of boxes), padded with its last
  one (entry 0 where none), as :func:`qbound.bounds.sparse.tighten_ahead` takes them: ``(flat,
  most)``, ``flat`` ``(boxes, size)`` int32 and ``most`` the largest count of set entries in a box.
  By one program once compiled (nothing read to the host); until then on the host (``most`` an int)."""
  key = ("rows", size, _aval(mask))
  return _run("rows", key, (mask,), dict(size=size), lambda: _host_row_indices(mask, size))


def _walk_key(name: str, graphs, rows, box: Box, lines, static: dict) -> tuple:
  """What a walk's program is compiled for. Everything else a walk reads (every node's bounds, the
  lines' arrays) has the shapes the graphs and the batch give it; an argument that does not fit
  after all makes the call raise, and that walk stays step by step."""
  return (name, tuple(sorted(static.items())), _graphs_key(graphs), tuple(rows.shape), rows.dtype,
          tuple(box.lower.shape), jax.tree_util.tree_structure(lines))


def _run(name: str, key, args, static: dict, fallback=None):
  """``_PROGRAMS[name](*args, **static)`` by its program under ``key`` if compiled, else step by
  step (``fallback()``, by default the same function uncompiled) after asking for the program."""
  program_fn = _PROGRAMS[name]
  step_by_step = fallback or (lambda: program_fn(*args, **static))
  if not ENABLED:
    return step_by_step()
  program = _programs.get(key)
  if program is None or program is _FAILED:
    if key not in _programs and len(_programs) < MAX_PROGRAMS:
      _programs[key] = None
      abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(*_aval(leaf)), args)
      try:
        _worker().submit(_compile, key, program_fn, abstract, static)
      except RuntimeError:  # the interpreter is exiting (a certify stage finishing its batch): none is compiled
        _programs[key] = _FAILED
    return step_by_step()
  try:
    return program(*args)
  except (TypeError, ValueError):  # arguments the program does not take after all (e.g. weak types)
    _programs[key] = _FAILED
    return step_by_step()


_graph_keys: dict = {}  # id(graph) -> its structure and weights' shapes, while the graph lives


def _graphs_key(graphs):
  """The structure of a graph (or of a pair of graphs) and its weights' shapes: what a walk's program
  is compiled for. Kept per graph object (graphs are frozen), since a walk is called many times."""
  if isinstance(graphs, tuple):
    return tuple(_graphs_key(g) for g in graphs)
  key = _graph_keys.get(id(graphs))
  if key is None:
    leaves, tree = jax.tree_util.tree_flatten(graphs)
    key = _graph_keys[id(graphs)] = (tree, tuple(_aval(leaf) for leaf in leaves))
    weakref.finalize(graphs, _graph_keys.pop, id(graphs), None)
  return key


def _aval(leaf) -> tuple:
  if not hasattr(leaf, "dtype"):  # a Python number (arrays' attributes are read directly: np.result_type
    leaf = np.asarray(leaf)       # on a JAX array goes through a deprecation path costing microseconds)
  return tuple(leaf.shape), leaf.dtype


def _compile(key, walk, abstract, static: dict) -> None:
  # Only once no bounding call has run for IDLE_SECONDS (or in wait()): on a 2-core machine a
  # compilation next to a first call made it twice as slow (ACAS Xu 1_1: 21-22 s against 10.8 s),
  # and warm calls in a loop 0.65-1.5 s against 0.4 s.
  while not _forced.is_set() and threading.main_thread().is_alive():
    if _beside or (_active == 0 and time.monotonic() - _last_end >= IDLE_SECONDS):
      break
    _forced.wait(timeout=0.1)
  if not threading.main_thread().is_alive():  # the interpreter is exiting: compile nothing more
    _programs[key] = _FAILED
    return
  try:
    program = jax.jit(functools.partial(walk, **static)).trace(*abstract).lower().compile()
  except Exception:  # noqa: BLE001 (any failure keeps the pass step by step, which reports errors itself)
    program = _FAILED
  if key in _programs:  # (not forgotten by clear() meanwhile)
    _programs[key] = program


def _worker() -> concurrent.futures.ThreadPoolExecutor:
  global _executor
  with _executor_lock:
    if _executor is None:
      _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=_WORKER_NAME)
    return _executor


# Programs compile only after this long without a bounding call (see _compile), or beside a long one
# (compile_beside).
IDLE_SECONDS = 1.0
_active = 0  # how many bounding calls run now (see while_in_use)
_beside = False  # whether the bounding calls running now let programs compile beside them
_last_end = time.monotonic()  # when the last one ended (or this module was imported)
_active_lock = threading.Lock()
_ended = threading.Condition(_active_lock)  # notified when the last bounding call running ends
_in_call = threading.local()  # how deep this thread is in bounding calls
_forced = threading.Event()  # set while wait() asks for every program now


def while_in_use(fn):
  """``fn`` marked as a bounding call: no program compiles while one runs, nor until
  ``IDLE_SECONDS`` after (or in :func:`wait`)."""

  @functools.wraps(fn)
  def marked(*args, **kwargs):
    global _active, _last_end, _beside
    with _active_lock:
      _active += 1
    _in_call.depth = getattr(_in_call, "depth", 0) + 1
    try:
      return fn(*args, **kwargs)
    finally:
      _in_call.depth -= 1
      with _active_lock:
        _active -= 1
        _last_end = time.monotonic()
        if _active == 0:
          _beside = False
          _ended.notify_all()

  return marked


def _note_compilation(event: str, duration: float, **kwargs) -> None:
  global _last_compilation, _compiling
  if threading.current_thread().name.startswith(_WORKER_NAME):
    return
  if event == _TRACED:
    _last_compilation = time.monotonic()
  if event in _COMPILING:
    with _compiling_lock:  # (branch and bound's other batches compile on threads of their own)
      _compiling += duration


# When the last function was traced for compilation by a thread other than the programs' worker (a
# step met with new shapes, a first call, a search round): what tells a warm search from one still
# compiling. Every in-memory cache miss traces, whether the persistent cache then holds the
# executable or not.
_TRACED = "/jax/core/compile/jaxpr_trace_duration"
_last_compilation = time.monotonic()
# ... and how long such compilations took in all (tracing, lowering, XLA's compilation or the
# persistent cache's load): what tells a search's own progress from its first call's compiling.
_COMPILING = (_TRACED, "/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_compiling = 0.0
_compiling_lock = threading.Lock()
jax.monitoring.register_event_duration_secs_listener(_note_compilation)


def seconds_since_compilation() -> float:
  """Seconds since a function was last traced for compilation outside the programs' worker.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from qbound.bounds import fused
    >>> _ = jax.jit(lambda x: x + 41.0)(jnp.ones(2))  # a new function: traced and compiled
    >>> fused.seconds_since_compilation() < 5.0
    True
  """
  return time.monotonic() - _last_compilation


def seconds_compiling() -> float:
  """Seconds spent so far in this process compiling (tracing, lowering, XLA) outside the programs'
  worker; the difference between two readings is what a call between them spent compiling.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from qbound.bounds import fused
    >>> before = fused.seconds_compiling()
    >>> _ = jax.jit(lambda x: x * 7.0 - 2.0)(jnp.ones(2))  # a new function: traced and compiled
    >>> fused.seconds_compiling() > before
    True
  """
  return _compiling


def compile_beside() -> None:
  """Lets the programs asked for compile now, beside the bounding calls running, until the last of
  them ends (then they wait for idleness again).

  For a search that will run long anyway: its batches are warm (nothing compiled for a while, see
  :func:`seconds_since_compilation`) and many remain, so the seconds a compilation takes beside it
  come back several times over (ACAS Xu 1_6 against its pruned copy, property 8, epsilon 0.5: 52
  programs compiled in 3.5 s; the proof then took 15-16 s against 25 s step by step). A call that
  ends within seconds (a first call compiling its steps, a close copy's proof) never asks: it would
  only be slowed (branch and bound asks as ``bab_machine.BESIDE_AFTER`` and the settings beside it say).
  Outside a bounding call it grants nothing.

  Example:
    >>> from qbound.bounds import fused
    >>> @fused.while_in_use
    ... def long_search():
    ...   fused.compile_beside()  # programs asked for from now on compile on the worker thread
    ...   return "bounded"
    >>> long_search()
    'bounded'
  """
  global _beside
  with _active_lock:
    if _active:
      _beside = True


def wait() -> None:
  """Compiles every program asked for so far, now, and returns when they are ready (between calls:
  a script's warm runs, benchmarks, tests; otherwise they compile once qbound has been idle for
  ``IDLE_SECONDS``).

  Bounding calls still running on other threads are waited for first: ``certify`` returns at its
  deadline while one of its stages may still finish the batch it bounds.

  Raises:
    RuntimeError: when called from inside a bounding call (it would wait for itself).
  """
  if getattr(_in_call, "depth", 0):
    raise RuntimeError("fused.wait() was called during a bounding call; call it between calls.")
  with _active_lock:
    _ended.wait_for(lambda: _active == 0)
  if _executor is not None:
    _forced.set()
    try:
      _executor.submit(lambda: None).result()
    finally:
      _forced.clear()


def clear() -> None:
  """Forgets every program (to free their memory)."""
  _programs.clear()


def programs() -> int:
  """How many compiled programs are ready now."""
  return sum(1 for p in list(_programs.values()) if p is not None and p is not _FAILED)
