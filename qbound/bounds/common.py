"""Helpers shared by the bound methods."""

from __future__ import annotations

from qbound import graph as G
from qbound.box import Box


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


def plus(total, value):
  """``total + value`` with None as zero (running sums that start empty)."""
  return value if total is None else total + value
