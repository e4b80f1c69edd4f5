"""The clean-up pass after tracing: fold added constants and merged clips, drop unused nodes."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from qbound import graph as G


def _is_transpose(node: G.Node) -> bool:
  return node.kind == G.AFFINE and node.bias is None and node.op is not None and node.op.name == "transpose"


def _permutation(node: G.Node) -> tuple:
  return tuple(dict(node.op.params)["permutation"])


def _with_permutation(params: tuple, perm: tuple) -> tuple:
  return tuple((k, perm if k == "permutation" else v) for k, v in params)


def _reads_lone_transpose(nodes: list[G.Node], consumers: list[list[int]], idx: int, output: int) -> bool:
  """Whether node ``idx`` reads a transpose that nothing else reads."""
  src = nodes[idx].inputs[0]
  return _is_transpose(nodes[src]) and consumers[src] == [idx] and src != output


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
        lo = np.maximum(np.asarray(node.weights[0]), 0)
        if np.all(lo <= np.asarray(node.weights[1])):
          lo = jnp.asarray(lo)
          new_nodes[src] = dataclasses.replace(node, inputs=prev.inputs, weights=(lo, node.weights[1]))
          alias[idx] = src
      elif prev.kind == G.CLIP and consumers[src] == [idx] and src != output:
        lo = np.maximum(np.asarray(prev.weights[0]), np.asarray(node.weights[0]))
        hi = np.minimum(np.asarray(prev.weights[1]), np.asarray(node.weights[1]))
        if np.all(lo <= hi):  # otherwise clip(clip(x)) is a constant that one clip cannot express
          lo, hi = jnp.asarray(lo), jnp.asarray(hi)
          new_nodes[src] = dataclasses.replace(prev, weights=(lo, hi))
          alias[idx] = src
      continue
    if _is_transpose(node) and _reads_lone_transpose(new_nodes, consumers, idx, output):
      # transpose(transpose(x)): one transpose, none when the two cancel (a product traced with its
      # operands in canonical order, then put back in the order the einsum asked for; see
      # qbound.trace.rules._rule_dot_general).
      src = node.inputs[0]
      inner = new_nodes[src]
      perm = tuple(_permutation(inner)[i] for i in _permutation(node))
      if perm == tuple(range(len(perm))):
        alias[idx] = inner.inputs[0]
      else:
        op = dataclasses.replace(inner.op, params=_with_permutation(inner.op.params, perm), out_shape=node.shape)
        new_nodes[src] = dataclasses.replace(inner, op=op, shape=node.shape, where=node.where)
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
