"""The stages :func:`qbound.certify.certify` runs beside its bound passes, each feeding the call's
:class:`~qbound.anytime.Tracker`: the exact MILP (:mod:`qbound.exact.milp`), the input-grid
enumeration (:mod:`qbound.exact.grid`), optimised slopes on the merged network
(:mod:`qbound.bounds.alpha`) and the staircase search (:func:`qbound.attack.search_until`); and the
tests that choose among them. ``certify`` decides when each runs and how long it may take.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from qbound import attack
from qbound.anytime import Tracker
from qbound.bounds.crown import crown_bounds
from qbound.box import Box
from qbound.merge import MergedNetwork


def crown_alpha_output(merged: MergedNetwork, box, sound: bool, steps: int):
  """Bounds on the merged network's output by CROWN with ``steps`` of optimised slopes."""
  from qbound.bounds.alpha import crown_alpha_node

  graph = merged.graph
  bounds = crown_bounds(graph, box, None, sound)
  return crown_alpha_node(graph, graph.output, bounds, box, steps=steps, sound=sound)


def small_piecewise_linear_net(merged: MergedNetwork, max_neurons: int = 128) -> bool:
  """Whether the exact MILP is worth trying: few piecewise-linear neurons (ReLU, clip and rounding
  steps; the identities merge puts beside a rounding cost nothing), only MILP-encodable nodes."""
  from qbound import graph as G
  from qbound.exact.encoding import SUPPORTED_KINDS

  nodes = merged.graph.nodes
  if not {n.kind for n in nodes} <= set(SUPPORTED_KINDS):
    return False
  if any(n.kind == G.ROUND and n.attrs[0] not in ("none", "nearest", "away", "floor", "ceil") for n in nodes):
    return False  # dynamic fake quantizations are no staircase the MILP can encode
  neurons = [n for n in nodes if n.kind in (G.RELU, G.CLIP) or (n.kind == G.ROUND and n.attrs[0] != "none")]
  return sum(n.size for n in neurons) <= max_neurons


def run_milp(track, merged, box, outputs, time_limit: float) -> None:
  from qbound.exact import milp as solve_milp

  res = solve_milp(merged, None, box, time_limit=time_limit, output=outputs)
  track.add_witness(merged.graph, res.maximizer)
  name = "milp" if "milp" not in track.per_method else "milp-2"
  track.add_upper(name, res.upper)


def run_grid(track, merged, box, sound: bool, deadline: float, stop, target_gap: float,
             refine_deadline: Optional[float] = None, compiled=None) -> None:
  """Where f_q rounds its input first: the error cell by cell, if its first pass ends in time."""
  from qbound.exact.grid import auto_max_cells, grid_error

  # Grids past 2^15 cells only when their first pass can end in time (AUTO_CELLS_PER_SECOND times
  # the share of a core the load average leaves; grid_error gives up after two chunks if the rest
  # would end past the deadline). Past its first pass it refines the largest bounds first, towards
  # target_gap, and returns at refine_deadline. The inputs it reaches go to the tracker as it finds
  # them, so they count even if it gives up.
  witness = track.snapshot()["witness"]
  res = grid_error(merged, box, deadline=deadline, max_cells=auto_max_cells(deadline - time.perf_counter()),
                   sound=sound, stop=stop, refine_gap=target_gap, reached=None if witness is None else witness[None],
                   refine_deadline=refine_deadline, report=lambda x: track.add_witness(merged.graph, x),
                   report_upper=lambda upper: track.add_upper("grid", upper), compiled=compiled)
  if res is not None:
    track.add_bounds("grid", res.diff_lower, res.diff_upper)
    track.add_witness(merged.graph, res.witness)


def dynamic_scales(merged: MergedNetwork) -> bool:
  """Whether f_q rounds with scales computed from its input (qbound.dynamic_rounding)."""
  from qbound import graph as G

  return any(G.is_dynamic_rounding(node) for node in merged.fq_graph.nodes)


def staircase_search(track: Tracker, graph, box: Box, key, search, until: float, runs: int,
                      finished: Callable[[], bool], failure: list, background: bool = False) -> None:
  """:func:`qbound.attack.search_until` with every witness going to ``track`` and an exception to
  ``failure``. ``background``: in a thread of its own, whose priority it lowers."""
  try:
    if background:  # never the caller's thread: its priority would stay lowered
      attack.lower_thread_priority()
    attack.search_until(graph, box, key=key, search=search, until=until, runs=runs, stop=finished,
                        report=lambda x: track.add_witness(graph, x))
  except BaseException as err:  # noqa: BLE001 - raised by the stages once they end
    failure.append(err)
