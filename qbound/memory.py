"""Memory-bounded bound propagation: row blocks, footprint estimates, and a plan from a budget.

Backward linear bounds (CROWN, :mod:`qbound.bounds.crown`; differential,
:mod:`qbound.bounds.diff`) bound a node of ``n`` neurons with ``2 n`` rows (``+e_i`` and ``-e_i``)
that are carried back to the input: a ``(rows, neurons)`` matrix per layer on the way. On a wide
layer (a 32x32x16 convolution has 16,384 neurons: 32,768 rows of up to 16,384 entries, 2 GiB in
float32 each) this is what fills memory, and vmapping over a batch of boxes multiplies it by the
batch. Rows are independent, so they can be bounded a block at a time
(:func:`qbound.bounds.rows.node_bounds_by_rows`, a ``lax.map`` over blocks of ``row_chunk`` rows whose rows are
built inside the loop, never as one ``2n x n`` identity), and boxes a chunk at a time.

:func:`plan` chooses both from a budget in bytes (per device) with an explicit estimate of the peak:

``peak = fixed + boxes * max(per_box + row_chunk * per_row, search_per_box)``

* ``fixed``: twice the weights' bytes (the weights and the ``|W|`` the rounding margins use).
* ``per_row`` (one backward row): ``itemsize * ROW_FACTOR[method] * live``, where ``live`` is the
  most coefficients one row holds at once on its way back through the graph (the coefficients of
  every node still waiting to be reached, plus the node being transposed and its inputs;
  :func:`backward_live`, exact for any DAG). The factor (CROWN 10, differential 24: they carry
  coefficients on ``d`` and on ``z_q``) covers the temporaries: absolute values, relaxation
  products, the pairwise sums' padding to a power of two. ``alpha`` adds ``SLOPE_FACTOR`` values
  per activation neuron: every row has its own slopes, their Adam moments and gradients.
* ``per_box`` (one box, whatever the rows): every node's bounds and relaxation coefficients,
  ``itemsize * BOX_FACTOR[method] * (sum of the merged graph's node sizes)``.
* ``search_per_box`` (the lower-bound search of :mod:`qbound.attack`, run after the bounds, so
  the larger of the two counts): ``itemsize * (SEARCH_FACTOR * points * (input size + twice the
  two widest nodes) + restarts * 4 * sum of node sizes)``.

The factors were calibrated against XLA's own buffer assignment (``compiled.memory_analysis()``)
on MLPs (100-256-256-10, 784-1024x4-10, MNIST 3x100) and CNNs (12x12x3 and 32x32x3 inputs), CROWN
and differential, with row blocks of 16 rows to half of all rows and 1 to 8 boxes: the estimate
exceeds XLA's count on every one of them, by 1.26x to 7.3x (most conservative for large blocks,
whose loop XLA compiles into less than the sum of its parts). It is an estimate of XLA's buffers, not of the
process's resident size, which adds the runtime, compiled code and host copies (the benchmark
``benchmarks/bench_scale.py`` measures both). :func:`qbound.certify_batch` also checks XLA's count
after compiling and halves the chunk (or the row block) if it is over the budget after all.

The row chunk is the whole node (one block) when one box's full rows fit; otherwise it is the
largest that fits with one box per device. The boxes per device are then cut into the fewest
chunks that fit, all of one size (so the last one is padded by less than a chunk).

Example:
  >>> import jax, jax.numpy as jnp, qbound as qb
  >>> f = lambda x: jax.nn.relu(x @ jnp.ones((4, 3))) @ jnp.ones((3, 2))
  >>> box = qb.Box(-jnp.ones(4), jnp.ones(4))
  >>> p = qb.memory.plan(qb.merge(f, f, box), "crown", budget=2**30, boxes=10)
  >>> p.row_chunk is None, p.box_chunk   # everything fits: full rows, all 10 boxes at once
  (True, 10)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import jax
import numpy as np

from qbound import graph as G
from qbound.bounds.crown import relu_inputs
from qbound.bounds.rows import MIN_BLOCKED_ROWS, node_bounds_by_rows  # noqa: F401  (re-exported)

# Temporaries per live backward coefficient, and per neuron per box: calibrated (see module doc).
ROW_FACTOR = {"interval": 0.0, "crown": 10.0, "diff": 24.0, "diff-interval": 0.0, "alpha": 48.0}
BOX_FACTOR = {"interval": 8.0, "crown": 40.0, "diff": 48.0, "diff-interval": 32.0, "alpha": 96.0}
SEARCH_FACTOR = 1.25  # per sampled point: the input, the widest layer's value and its successor's
SLOPE_FACTOR = 24.0  # alpha: per row, its own slopes for every activation (a few sets), Adam's moments, gradients


# ------------------------------------------------------------------------------------ estimates


def backward_live(graph: G.Graph, target: int) -> int:
  """The most coefficients one backward row holds at once on its way from ``target`` to the input.

  Simulates :func:`qbound.bounds.crown.backward_lower`'s walk: the nodes waiting to be reached
  hold a coefficient array each; processing a node adds its inputs' arrays before its own is freed.
  """
  pending = {target: graph.nodes[target].size}
  peak = pending[target]
  for idx in range(target, 0, -1):
    if idx not in pending:
      continue
    own = pending.pop(idx)
    new = {s: graph.nodes[s].size for s in graph.nodes[idx].inputs if s not in pending}
    peak = max(peak, sum(pending.values()) + own + sum(new.values()))
    pending.update(new)
  return peak


def bounded_nodes(graph: G.Graph) -> list[int]:
  """The nodes backward bounds are computed for: every activation's input and the output."""
  return [t for t in relu_inputs(graph) + [graph.output] if t != 0]


def _itemsize(graph: G.Graph) -> int:
  """Bytes per value: the graph's float dtype (float32 unless it was traced in float64)."""
  for leaf in jax.tree_util.tree_leaves(graph):
    dtype = np.dtype(getattr(leaf, "dtype", np.float32))
    if np.issubdtype(dtype, np.floating):
      return int(dtype.itemsize)
  return 4


def weight_bytes(graph: G.Graph) -> int:
  """Bytes of the graph's weights and biases."""
  leaves = jax.tree_util.tree_leaves(graph)
  return int(sum(np.size(x) * np.dtype(getattr(x, "dtype", np.float32)).itemsize for x in leaves))


def _sizes(graph: G.Graph) -> int:
  return int(sum(n.size for n in graph.nodes))


def _graphs(merged, method: str):
  """The graphs a method runs backward passes on: the merged one (crown) or f and f_q (diff)."""
  if method in ("diff", "diff-interval"):
    return [merged.f_graph, merged.fq_graph]
  if method == "alpha" and merged.paired:  # CROWN on the merged net, then (optimised) differential bounds
    return [merged.graph, merged.f_graph, merged.fq_graph]
  return [merged.graph]


def max_rows(merged, method: str) -> int:
  """The most rows any one backward pass of ``method`` takes (twice the widest bounded node)."""
  if method in ("interval", "diff-interval"):
    return 0
  return max(2 * g.nodes[t].size for g in _graphs(merged, method) for t in bounded_nodes(g))


def row_bytes(merged, method: str) -> int:
  """Estimated peak bytes per backward row (see the module docstring)."""
  if method in ("interval", "diff-interval"):
    return 0
  graph = merged.graph
  live = max(backward_live(g, t) for g in _graphs(merged, method) for t in bounded_nodes(g))
  values = ROW_FACTOR[method] * live
  if method == "alpha":
    values += SLOPE_FACTOR * sum(n.size for n in graph.nodes if n.kind in (G.RELU, G.CLIP))
  return int(math.ceil(_itemsize(graph) * values))


def box_bytes(merged, method: str) -> int:
  """Estimated bytes per box that do not grow with the rows: every node's bounds and relaxations."""
  return int(math.ceil(_itemsize(merged.graph) * BOX_FACTOR[method] * _sizes(merged.graph)))


def search_bytes(merged, search) -> int:
  """Estimated peak bytes of the lower-bound search for one box (:mod:`qbound.attack`)."""
  graph = merged.graph
  samples = search.samples + max(search.samples // 4, 1) + 1
  widest = sorted((n.size for n in graph.nodes), reverse=True)[:2]
  per_sample = int(np.prod(graph.input_shape)) + 2 * sum(widest)
  ascent = search.restarts * 4 * _sizes(graph)
  return int(_itemsize(graph) * (SEARCH_FACTOR * samples * per_sample + ascent))


def default_budget(device=None) -> int:
  """Half of the device's memory as JAX reports it (GPU, TPU); on CPU, half the host's RAM shared
  among the process's local devices."""
  device = device or jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # some backends do not implement it
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"] // 2)
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    ram = 8 * 2**30
  return int(ram // 2 // max(len(jax.local_devices()), 1))


CPU_ALLOWANCE = 256 * 2**20  # compiled code and runtime growth, beyond what the process holds already


def process_bytes() -> int:
  """Resident bytes of this process now (Linux ``/proc/self/statm``; elsewhere the peak so far)."""
  try:
    with open("/proc/self/statm") as fh:
      return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError, AttributeError):
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def buffer_budget(budget: float, devices) -> float:
  """The bytes per device left for XLA's buffers out of ``budget``.

  On GPUs and TPUs that is the budget itself. On CPU the devices' memory is the process's own, so
  what the process holds already (its resident size now) and an allowance for compiled code
  (:data:`CPU_ALLOWANCE`) come off first, shared among the process's CPU ``devices``: the
  process's peak then stays near the budget times the device count. (Compiling itself can take
  more for a while, before the buffers exist; that memory is reused for them.)
  """
  if math.isinf(budget) or not devices or any(d.platform != "cpu" for d in devices):
    return budget
  return budget - (process_bytes() + CPU_ALLOWANCE) / len(devices)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a batch is cut to fit a memory budget (all numbers per device).

  Attributes:
    box_chunk: boxes each device handles per compiled call (the global chunk is this times the
      device count; the last chunk is padded to it).
    row_chunk: backward rows per block, or None for every row at once.
    estimate: estimated peak bytes per device of one call.
    budget: the budget it was planned for (bytes per device).
    per_row, per_box, search_per_box, fixed: the terms of the estimate (module docstring).
  """

  box_chunk: int
  row_chunk: Optional[int]
  estimate: int
  budget: float
  per_row: int
  per_box: int
  search_per_box: int
  fixed: int




def default_row_chunk(rows: int) -> Optional[int]:
  """Rows per block when memory does not force any: half the rows (two blocks) from
  :data:`MIN_BLOCKED_ROWS` rows up, else None (all at once).

  Measured on this project's CPU: XLA compiles all rows at once as straight-line code that is
  slower to compile and to run than a ``lax.map`` over two or more blocks (MNIST 3x100, 50 boxes,
  differential bounds: compile 88 s -> 42 s, run 6.4 s -> 1.3 s, XLA buffers 1.86 -> 0.45 GiB;
  784-1024x4-10 MLP, CROWN, 2 boxes: run 15.6 s -> 1.3 s), the bounds being the same.
  """
  return None if rows < MIN_BLOCKED_ROWS else -(-rows // 2)


def shrink(p: Plan, rows: int) -> Optional[Plan]:
  """A plan of half the boxes per chunk, or (at one box) half the rows per block; None at 1 and 1.

  Used when XLA's own count of a compiled chunk's buffers exceeds the budget after all.
  """
  if p.box_chunk > 1:
    return dataclasses.replace(p, box_chunk=p.box_chunk // 2)
  current = rows if p.row_chunk is None else p.row_chunk
  if current <= 1:
    return None
  return dataclasses.replace(p, row_chunk=current // 2)


def compiled_bytes(compiled) -> Optional[int]:
  """Bytes XLA assigned to a compiled program's arguments, outputs and temporaries (None if the
  backend does not say)."""
  try:
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # not every backend implements it
    return None


def plan(merged, method: str, *, budget: Optional[float] = None, boxes: int = 1, devices: int = 1,
         search=None) -> Plan:
  """The box chunk and row chunk for ``boxes`` boxes on ``devices`` devices within ``budget``.

  Args:
    merged: the :class:`~qbound.merge.MergedNetwork`.
    method: ``interval``, ``crown``, ``diff``, ``diff-interval`` or ``alpha``.
    budget: bytes per device; None: :func:`default_budget`; ``math.inf``: no chunking by memory
      (all boxes in one call; rows in the blocks of :func:`default_row_chunk`).
    boxes: how many boxes will be certified.
    devices: how many devices share them.
    search: the :class:`~qbound.attack.Search` settings (their footprint counts too); None: the
      defaults.

  Returns:
    A :class:`Plan`.

  Raises:
    ValueError: even one box with one backward row at a time would not fit.
  """
  from qbound.attack import Search

  if method not in ROW_FACTOR:
    raise ValueError(f"no memory estimate for method {method!r}; choose one of {', '.join(ROW_FACTOR)}.")
  search = search or Search()
  budget = default_budget() if budget is None else budget
  if not budget > 0:
    raise ValueError(f"memory_budget must be a positive number of bytes, got {budget!r}.")
  per_row, per_box = row_bytes(merged, method), box_bytes(merged, method)
  per_search = search_bytes(merged, search)
  fixed = 2 * weight_bytes(merged.graph)
  rows = max_rows(merged, method)
  wanted = -(-max(int(boxes), 1) // max(int(devices), 1))  # boxes per device
  # Wide nodes go in (at least) two blocks anyway: see default_row_chunk.
  block = default_row_chunk(rows)
  block_rows = rows if block is None else block

  def cost(r):
    return max(per_box + r * per_row, per_search)

  if math.isinf(budget):
    return Plan(wanted, block, fixed + wanted * cost(block_rows), budget, per_row, per_box, per_search, fixed)
  room = budget - fixed
  if room >= cost(block_rows):
    fit = int(room // cost(block_rows))
    chunks = -(-wanted // fit)
    chunk = -(-wanted // chunks)  # equal chunks: the last one is padded by less than one chunk's worth
    return Plan(chunk, block, fixed + chunk * cost(block_rows), budget, per_row, per_box, per_search, fixed)
  row_chunk = int((room - per_box) // per_row) if per_row else 0
  if row_chunk < 1 or room < per_search:
    need = fixed + cost(1)
    raise ValueError(f"memory_budget of {budget / 2**20:.1f} MiB is too small for this network and method "
                     f"{method!r}: one box with one backward row at a time needs about {need / 2**20:.1f} MiB "
                     f"(weights {fixed / 2**20:.1f}, per box {per_box / 2**20:.1f}, search "
                     f"{per_search / 2**20:.1f} MiB; see qbound.memory). Give a larger budget or a smaller "
                     "Search(samples=...).")
  return Plan(1, row_chunk, fixed + cost(row_chunk), budget, per_row, per_box, per_search, fixed)
