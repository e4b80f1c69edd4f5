"""Helpers shared by the bound methods."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from qbound import graph as G
from qbound.box import Box
from qbound.trace.state import inside_transformation


def as_graph(fn, box: Box) -> G.Graph:
  """The layer graph of ``fn``: traced for a function, taken as is for a graph or merged network."""
  from qbound.merge import MergedNetwork  # merge imports bounds users; avoid a cycle at import
  from qbound.trace import trace

  if isinstance(fn, MergedNetwork):
    graph = fn.graph
  elif isinstance(fn, G.Graph):
    graph = fn
  else:
    graph = trace(fn, box)
  if tuple(graph.input_shape) != tuple(box.shape):
    raise ValueError(f"the box has shape {box.shape} but the network's input has shape {graph.input_shape}.")
  G.check_finite(graph)
  return graph


def local(node: G.Node) -> G.Node:
  """The node reading inputs ``0..k-1``: the per-node steps of bound propagation are jit-compiled
  on it, so every node of the same kind, shapes and operation shares one compilation."""
  import dataclasses

  return dataclasses.replace(node, inputs=tuple(range(len(node.inputs))))


# Node kinds whose backward step is linear in the rows (no relaxation picks a line by sign).
LINEAR_KINDS = (G.AFFINE, G.ADD, G.CONCAT)


def first_half(rows, batched: bool):
  """The first half of the rows ``[R; -R]`` (see :func:`mirror_rows`)."""
  return jax.lax.slice_in_dim(rows, 0, rows.shape[1 if batched else 0] // 2, axis=1 if batched else 0)


@functools.partial(jax.jit, static_argnames=("batched",))
def mirror_rows(parts, beta, err, batched: bool):
  """A linear backward step's results for rows ``[R; -R]`` from its results for ``R`` alone.

  Bounding every entry from both sides walks back the rows ``+e_i`` and ``-e_i``. Through a
  linear step, the coefficients and constant of ``-R`` are exactly the negated ones of ``R`` (IEEE
  rounding is symmetric, so every product and sum of negated terms is the negated result) and the
  margin is the same (it reads ``|R|``): the first step, often the largest product of the walk
  (HAR: 1000 rows through the 500x561 first layer), is computed for half the rows. ``parts`` is
  any pytree of coefficient arrays (None entries stay None).
  """
  axis = 1 if batched else 0
  both = lambda a, b: jnp.concatenate([a, b], axis)
  return jax.tree_util.tree_map(lambda p: both(p, -p), parts), both(beta, -beta), both(err, err)


def plus(total, value):
  """``total + value`` with None as zero (running sums that start empty)."""
  return value if total is None else total + value


# XLA options for programs that are compiled on a first call and cheap to run: without XLA's
# backend optimisations they compile in about half the time (interval bounds: 0.29 s against 0.62 s
# on MNIST 3x100, 0.54 s against 1.02 s on a small CNN) and run up to 1.8x slower (1.8 -> 3.2 ms
# for 32 boxes, MNIST), which is noise beside the backward passes they feed.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# XLA options for the per-node steps of bound propagation (jit_step's default, on CPU). A first
# branch and bound compiles dozens of them (41 on the 5-12-8-8-2 MLP of bench_tight.py's exactness
# table), each a chain of small elementwise operations that XLA's CPU backend splits into several
# LLVM modules compiled apart: as one module they compile in 10-20% less CPU time and run as fast
# (benchmarks/bench_step_compile.py, docs/results/exactness.md). Optimisation level 1 as well saved more
# compile time but cost up to 20% of ACAS Xu's warm time per batch: not taken.
STEP_COMPILE = {"xla_cpu_parallel_codegen_split_count": 1}

# XLA options for the steps of small nets (branch_and_bound's and certify's, at most
# bab.SMALL_NET_NEURONS activation neurons) when SMALL_NETS_AT_LEVEL_1: optimisation level 1 as well. There a step's arrays are
# small, a first call is mostly compilation, and without the persistent cache (a machine's first
# call ever) the first batch of branch and bound on qwix's dynamic int8 nnx MLP took 12.1 s to
# compile at the default level against 7.2 s at level 1, while warm calls bounded as many pieces
# (35,785 and 35,281 at level 1 against 37,801 and 30,997 in 10 s; docs/results/quant-libraries.md).
SMALL_NET_STEP_COMPILE = {"xla_cpu_parallel_codegen_split_count": 1, "xla_backend_optimization_level": 1}
# Opt-in (bab.small_net_steps reads it): a process that also calls the passes directly (at
# STEP_COMPILE) compiles those steps twice; the test suite, which does, ran 11% longer on three of
# its heaviest files (108.7 against 97.8 s), and its whole run went over CI's 15 minutes.
SMALL_NETS_AT_LEVEL_1 = False

# The XLA options of the steps compiled in this context (None: STEP_COMPILE); see step_compile.
_STEP_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("qbound_step_options", default=None)


@contextlib.contextmanager
def step_compile(options: dict | None):
  """Steps dispatched inside the ``with`` block (in this thread) compile with XLA ``options``
  instead of :data:`STEP_COMPILE` (None: no change). Used for small nets, see
  :data:`SMALL_NET_STEP_COMPILE`.

  Example:
    >>> from qbound.bounds import common
    >>> with common.step_compile(common.SMALL_NET_STEP_COMPILE):
    ...   common.current_step_compile() is common.SMALL_NET_STEP_COMPILE
    True
    >>> common.current_step_compile() is common.STEP_COMPILE
    True
  """
  token = _STEP_OPTIONS.set(options) if options is not None else None
  try:
    yield
  finally:
    if token is not None:
      _STEP_OPTIONS.reset(token)


def current_step_compile() -> dict:
  """The XLA options steps compile with here (see :func:`step_compile`)."""
  return _STEP_OPTIONS.get() or STEP_COMPILE


@functools.cache
def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


def jit_step(fn: Callable, in_axes: tuple, *, compiler_options: dict | None = None) -> Callable:
  """``fn`` jit-compiled twice: as is, and mapped over a leading batch axis of the arguments whose
  ``in_axes`` entry is 0 (None: shared, e.g. the node). Call as ``step(*args, sound=..., batched=...)``.

  Branch and bound and batched certification bound many boxes at once; mapping inside each compiled
  step keeps the Python walk between steps as cheap as for one box (``jax.vmap`` around the walk
  would re-batch every step on every call). ``compiler_options``: XLA's, e.g. :data:`FAST_COMPILE`;
  None: :func:`current_step_compile` on CPU (:data:`STEP_COMPILE` unless :func:`step_compile` says
  otherwise; read at each call).
  """

  def mapped(*args, sound):
    return jax.vmap(functools.partial(fn, sound=sound), in_axes=in_axes)(*args)

  mapped.__name__ = mapped.__qualname__ = f"{fn.__name__}_batched"  # names the step in JAX's compile logs
  # JAX takes compiler options on the outermost jit only: inside another program (batched
  # certification jits whole passes) a step with options is traced into it as plain code.
  plain = (jax.jit(fn, static_argnames=("sound",)), jax.jit(mapped, static_argnames=("sound",)))
  # {id(options): (options, (single, batched))}; the options are kept, so their id is not reused.
  programs: dict = {}

  def compiled(options):
    if not options:
      return plain
    entry = programs.get(id(options))
    if entry is None:
      entry = programs[id(options)] = (options, (
          jax.jit(fn, static_argnames=("sound",), compiler_options=options),
          jax.jit(mapped, static_argnames=("sound",), compiler_options=options)))
    return entry[1]

  def step(*args, sound: bool, batched: bool = False):
    # Inside another transformation (a jit, or a lax.map over row blocks whose arguments are all
    # concrete) XLA options are refused: trace the plain steps into the outer program.
    if tracing(args) or inside_transformation():
      one, many = plain
    else:
      options = compiler_options if compiler_options is not None else current_step_compile() if _on_cpu() else None
      one, many = compiled(options)
    return (many if batched else one)(*args, sound=sound)

  step.__doc__ = fn.__doc__
  return step


def tracing(tree) -> bool:
  """Whether any leaf of ``tree`` is a tracer (the call is inside ``jit``, ``vmap`` or ``grad``)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))
