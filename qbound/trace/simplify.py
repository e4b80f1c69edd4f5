"""The clean-up pass after tracing: fold added constants and merged clips, drop unused nodes."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from qbound import graph as G


def _simplify(nodes: list[G.Node], output: int) -> tuple[list[G.Node], int]:
  """Folds added constants into the affine node before them and drops nodes the output ignores."""
  consumers: list[list[int]] = [[] for _ in nodes]
  for idx, node in enumerate(nodes):
    for i in node.inputs:
      consumers[i].append(idx)
  alias = list(range(len(nodes)))
  new_nodes = list(nodes)
  for idx, node in enumerate(nodes):
    node = dataclasses.replace(node, inputs=tuple(alias[i] for i in node.inputs))
    new_nodes[idx] = node
    if node.kind == G.CLIP:
      src = node.inputs[0]
      prev = new_nodes[src]
      if prev.kind == G.RELU and consumers[src] == [idx] and src != output:
        # relu then clip (jnp.clip(x, 0, hi) traces so) is one clip at max(lo, 0).
        lo = jnp.maximum(node.weights[0], 0)
        if bool(jnp.all(lo <= node.weights[1])):
          new_nodes[src] = dataclasses.replace(node, inputs=prev.inputs, weights=(lo, node.weights[1]))
          alias[idx] = src
      elif prev.kind == G.CLIP and consumers[src] == [idx] and src != output:
        lo = jnp.maximum(prev.weights[0], node.weights[0])
        hi = jnp.minimum(prev.weights[1], node.weights[1])
        if bool(jnp.all(lo <= hi)):  # otherwise clip(clip(x)) is a constant that one clip cannot express
          new_nodes[src] = dataclasses.replace(prev, weights=(lo, hi))
          alias[idx] = src
      continue
    if node.kind != G.AFFINE or node.op is not None:
      continue
    src = node.inputs[0]
    prev = new_nodes[src]
    if node.bias is None:
      alias[idx] = src
      continue
    if prev.kind == G.AFFINE and consumers[src] == [idx] and src != output:
      bias = node.bias if prev.bias is None else prev.bias + node.bias
      new_nodes[src] = dataclasses.replace(prev, bias=bias, shape=node.shape)
      alias[idx] = src
  output = alias[output]
  # Keep what the output needs, in order.
  needed = {0, output}
  for idx in range(len(new_nodes) - 1, -1, -1):
    if idx in needed and alias[idx] == idx:
      needed.update(new_nodes[idx].inputs)
  kept = [i for i in range(len(new_nodes)) if i in needed and alias[i] == i]
  remap = {old: new for new, old in enumerate(kept)}
  result = [dataclasses.replace(new_nodes[i], inputs=tuple(remap[j] for j in new_nodes[i].inputs)) for i in kept]
  return result, remap[output]
