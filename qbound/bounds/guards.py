"""Guards that keep a wrong bound from going unnoticed: well-formed intervals and spot checks.

**Well-formed intervals.** Every propagated bound is checked before anyone uses it: no node may
end with ``lower > upper``.

A sound bound propagation never produces an empty interval, since each node's true values lie in
it; intersections of sound bounds (``z = z_q + d``, CROWN with intervals) keep them. So an
inverted interval anywhere proves that some relaxation is wrong, and a bound built on it would be
wrong silently (a saturating clip paired with an identity once gave one). The ``*_bounds``
functions of :mod:`qbound.bounds` call :func:`check_bounds` on their result (one small compiled
reduction and one transfer of a count per node), and raise
:class:`~qbound.errors.InvalidBoundsError` naming the node, or
:class:`~qbound.errors.BoundOverflowError` for NaN.

``sound=False`` bounds skip floating-point margins, so rounding alone can invert an interval of a
node whose range is a single point by a few units in the last place; those are tolerated up to
``UNSOUND_TOLERANCE`` relative to the entries' magnitude, and anything larger is an error there too.

**Spot checks.** :func:`spot_check` evaluates the network in float64 at a few points of the box
(its centre, vertices, uniform samples) and raises :class:`~qbound.errors.SoundnessError` if a
bound misses a value: the public one-call methods (``qb.bounds.interval``, ``crown``, ``diff``)
run it on what they return, and branch and bound on every piece it probes.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound.bounds import nonlinear
from qbound.bounds.common import tracing
from qbound.errors import BoundOverflowError, InvalidBoundsError, SoundnessError

UNSOUND_TOLERANCE = 1e-3
# A spot check forgives a value this far outside a bound, relative to its size (float64 evaluation
# against float32 bounds: the bugs it is for are far larger).
SPOT_TOLERANCE = 1e-6
SPOT_POINTS = 32


def counts(groups: Sequence[tuple[str, G.Graph, Sequence]], *, sound: bool):
  """Per node of all groups, in order: how many entries are NaN and how many have ``lower > upper``
  (beyond the tolerance of unsound bounds), an int array ``(nodes, 2)``. Traceable: a compiled
  program (e.g. batched certification) returns it and :func:`raise_for_counts` reads it on the host."""
  return _counts(tuple(tuple(tuple(b) for b in bounds) for _, _, bounds in groups), sound=sound)


@functools.partial(jax.jit, static_argnames=("sound",))
def _counts(bounds, sound: bool):
  # All nodes flattened into one vector and counted per node from a running sum: one reduction to
  # compile, where a reduction per node took 0.8-1.7 s to compile for a few dozen nodes (a tenth of
  # a first branch and bound on ACAS Xu) against 0.2 s. (Segment ids from jnp.repeat made XLA
  # constant-fold a large array for seconds.)
  tolerance = 0.0 if sound else UNSOUND_TOLERANCE
  flat = [(lo.reshape(-1), hi.reshape(-1)) for group in bounds for lo, hi in group]
  if not flat:
    return jnp.zeros((0, 2), jnp.int32)
  offsets = np.concatenate([[0], np.cumsum([lo.size for lo, _ in flat])])
  lo = jnp.concatenate([lo for lo, _ in flat])
  hi = jnp.concatenate([hi for _, hi in flat])

  def per_node(bad):
    running = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(bad.astype(jnp.int32))])
    return running[offsets[1:]] - running[offsets[:-1]]

  nan = jnp.isnan(lo) | jnp.isnan(hi)
  inverted = lo > hi + tolerance * (1 + jnp.abs(lo) + jnp.abs(hi))
  return jnp.stack([per_node(nan), per_node(inverted)], axis=1)


# A group whose label holds this bounds differences ``z - z_q``, not values (see check_bounds).
DIFFERENCES = "d = f - f_q"


def check_bounds(groups: Sequence[tuple[str, G.Graph, Sequence]], *, sound: bool, counter=None) -> None:
  """Raises if any node's ``(lower, upper)`` holds NaN or ``lower > upper``.

  Args:
    groups: ``(what, graph, bounds)`` triples: ``bounds`` holds ``(lower, upper)`` per node of
      ``graph`` (batched or not), and ``what`` names them in the message (e.g. ``"CROWN bounds of
      f_q"``). All groups are checked by one compiled reduction and one transfer.
    sound: whether they were computed with proven margins (else small inversions are tolerated).
    counter: optional ``counter(groups, sound=sound)`` returning :func:`counts` (e.g.
      :func:`qbound.bounds.fused.bound_counts`, by a program compiled between calls), used
      instead of choosing between the host and the compiled reduction here.
  """
  leaves = [leaf for _, _, bounds in groups for leaf in jax.tree_util.tree_leaves(bounds)]
  if tracing(leaves):  # under jit or vmap: the caller returns counts() from its program instead
    return
  for what, graph, bounds in groups:  # 1/x near 0: say where, rather than "NaN" further on
    # Bounds of differences f - f_q (differential bounds) are no layer's input: no domain to check.
    if DIFFERENCES in what:
      continue
    if graph is not None and bounds is not None and len(bounds) == len(graph.nodes):
      nonlinear.check_domains(graph, bounds)
  if counter is not None:
    raise_for_counts(np.asarray(counter(groups, sound=sound)), groups, sound=sound)
  elif sum(int(np.size(leaf)) for leaf in leaves) <= HOST_CHECK_ENTRIES:
    raise_for_counts(host_counts(groups, sound=sound), groups, sound=sound)
  else:
    raise_for_counts(np.asarray(counts(groups, sound=sound)), groups, sound=sound)


# Up to this many bound entries in all, :func:`check_bounds` counts on the host: the compiled
# reduction costs 0.1-0.3 s to compile on a first call, NumPy microseconds to a millisecond here.
HOST_CHECK_ENTRIES = 1 << 18


def host_counts(groups, *, sound: bool) -> np.ndarray:
  """:func:`counts` computed by NumPy on the host."""
  tolerance = 0.0 if sound else UNSOUND_TOLERANCE
  rows = []
  for _, _, bounds in groups:
    for lo, hi in bounds:
      lo, hi = np.asarray(lo), np.asarray(hi)
      nan = np.isnan(lo) | np.isnan(hi)
      with np.errstate(invalid="ignore", over="ignore"):
        inverted = lo > hi + tolerance * (1 + np.abs(lo) + np.abs(hi))
      rows.append((int(np.count_nonzero(nan)), int(np.count_nonzero(inverted))))
  return np.asarray(rows, np.int64).reshape(-1, 2)


def raise_for_counts(node_counts, groups: Sequence[tuple[str, G.Graph, Sequence]], *, sound: bool,
                     where: str = "") -> None:
  """Raises for the first node :func:`counts` found NaN or inverted in (``where``: e.g. which box of
  a batch, put before the message). A group's bounds may be None when only the counts left the
  device (then the message names the node without its values)."""
  node_counts = np.asarray(node_counts).reshape(-1, 2)
  bad = np.flatnonzero(node_counts.sum(axis=1))
  if bad.size == 0:
    return
  position = int(bad[0])
  for what, graph, bounds in groups:
    if position < len(bounds):
      break
    position -= len(bounds)
  node = graph.nodes[position]
  label = f"node {position} ({node.kind}{' at ' + node.where if node.where else ''})"
  what = where + what
  if node_counts[int(bad[0]), 0]:
    detail = ""
    if bounds is not None:
      lo, hi = (np.asarray(v) for v in bounds[position])
      detail = f", entry {tuple(int(i) for i in np.argwhere(np.isnan(lo) | np.isnan(hi))[0])}"
    raise BoundOverflowError(
        f"{what}: NaN at {label}{detail}: a value overflowed the float type while bounding. The inputs or "
        "weights are too large for it; scale them down, or compute in float64 (with jax.enable_x64(True)).")
  detail = ""
  if bounds is not None:
    lo, hi = (np.asarray(v) for v in bounds[position])
    tolerance = 0.0 if sound else UNSOUND_TOLERANCE
    entry = tuple(int(i) for i in np.argwhere(lo > hi + tolerance * (1 + np.abs(lo) + np.abs(hi)))[0])
    detail = f", entry {entry}: lower {lo[entry]!r} > upper {hi[entry]!r}"
  raise InvalidBoundsError(
      f"{what}: empty interval at {label}{detail}. No value lies in it, so a relaxation feeding this node is "
      "wrong: a bug in qbound; please report it with this network and box.")


def spot_points(box, count: int = SPOT_POINTS, seed: int = 0) -> np.ndarray:
  """The box's centre, then vertices (all of them for up to 4 dimensions, else random ones) and
  uniform samples alternating: ``count`` points in all, from a fixed seed (a check, not a search)."""
  lo = np.asarray(box.lower, np.float64).reshape(-1)
  hi = np.asarray(box.upper, np.float64).reshape(-1)
  rng = np.random.default_rng(seed)
  n = lo.size
  if n <= 4:
    signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(bool)
  else:
    signs = rng.random((count // 2, n)) < 0.5
  vertices = np.where(signs, hi, lo)
  uniform = lo + rng.random((max(count - 1 - len(vertices), 0), n)) * (hi - lo)
  points = np.concatenate([((lo + hi) / 2)[None], vertices, uniform])[:max(count, 1 + len(vertices))]
  return points.reshape((-1, *np.shape(box.lower)))


def spot_check(graph: G.Graph, box, lower, upper, *, sound: bool, what: str) -> None:
  """Raises :class:`~qbound.errors.SoundnessError` if ``graph``, evaluated in float64 at the
  :func:`spot_points` of the box, leaves ``[lower, upper]`` anywhere."""
  points = spot_points(box)
  lower = np.broadcast_to(np.asarray(lower, np.float64).reshape(-1), (points.shape[0], np.size(lower)))
  upper = np.broadcast_to(np.asarray(upper, np.float64).reshape(-1), (points.shape[0], np.size(upper)))
  check_points(graph, points, lower, upper, sound=sound, what=what)


def check_points(graph: G.Graph, points, lower, upper, *, sound: bool, what: str, outputs=None) -> None:
  """Raises :class:`~qbound.errors.SoundnessError` if ``graph(points[k])`` (float64) leaves
  ``[lower[k], upper[k]]`` (flat outputs, one row per point; ``outputs``: only those columns)."""
  from qbound.attack import exact_errors

  points = np.asarray(points)
  values = exact_errors(graph, points).reshape(points.shape[0], -1)
  lower = np.asarray(lower, np.float64).reshape(points.shape[0], -1)
  upper = np.asarray(upper, np.float64).reshape(points.shape[0], -1)
  if outputs is not None:
    values, lower, upper = values[:, outputs], lower[:, outputs], upper[:, outputs]
  slack = (SPOT_TOLERANCE if sound else UNSOUND_TOLERANCE) * (1 + np.abs(values))
  outside = (values < lower - slack) | (values > upper + slack)
  if np.any(outside):
    k, j = (int(i) for i in np.argwhere(outside)[0])
    raise SoundnessError(
        f"{what}: at x = {points[k].reshape(-1).tolist()} output {j} is {values[k, j]!r}, outside the proven "
        f"[{lower[k, j]!r}, {upper[k, j]!r}]: a bug in qbound; please report it with this network and box.")
