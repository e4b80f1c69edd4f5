"""Tracing: a pure JAX function of one input -> a :class:`~qbound.graph.Graph` of known layers.

This package is the only part of qbound that touches JAX internals (jaxpr equations, primitives,
``bind``). It walks the jaxpr of ``fn`` with every parameter folded in as a constant, evaluates what does not
depend on the input, inlines nested calls (``jit``, ``custom_jvp_call`` as used by ``nn.relu``,
checkpoints), and turns each equation that does depend on the input into a node:

* linear maps with constant coefficients (``dot_general``, ``conv_general_dilated``, ``mul`` and
  ``div`` by a constant, ``neg``) and data routing (``reshape``, ``transpose``, ``broadcast_in_dim``,
  ``squeeze``, ``expand_dims``, ``reduce_sum``, ``slice``, ``pad``, ``rev``, ``tile``,
  ``concatenate``, ``reduce_window_sum`` i.e. average pooling) become ``affine`` nodes; an added
  constant becomes their bias. Operations on constants only (batch norm's ``rsqrt(var + eps)``)
  are evaluated while tracing;
* ``add``/``sub`` of two inputs-dependent values become ``add`` nodes;
* ``round``/``floor``/``ceil`` become ``round`` nodes, bounded as the staircase they are (never
  as the identity), with halves rounded as the function does (to even for ``jnp.round``, away
  from zero for ``jax.lax.round``'s default);
* a fake quantization with a scale computed from its input, ``(round(x / s(x)) @ W) * s(x)`` with
  ``s(x) = max|x| / Q`` (qwix's dynamic activation scales), becomes ``q(x) @ W`` with ``q`` a
  ``round`` node of mode ``dynamic`` (:mod:`qbound.dynamic_rounding`);
* ``tanh`` and ``logistic`` (sigmoid) become ``tanh`` and ``sigmoid`` nodes;
* ``max(x, 0)`` becomes a ``relu`` node; ``max``/``min``/``clamp`` against other constants become
  ``clip`` nodes (``jnp.clip``, hard-tanh, the input clipping of .nnet files), and against each other
  are rewritten exactly with ReLUs (``max(a, b) = a + relu(b - a)``); ``reduce_max`` and max
  pooling (``reduce_window_max``) are trees of those over slices (or gathers, where a window meets
  the padding) of the input;
* a comparison with a constant feeding ``select_n`` (``jnp.where``: leaky ReLU, hard tanh) and
  ``abs`` become ReLUs and clips when the result is a continuous piecewise-linear function of the
  compared value (:mod:`qbound.piecewise`); a ``select_n`` with a constant mask is affine.

The piecewise-linear rewrites are exact in real arithmetic: no new constant is computed in float.
Anything else raises :class:`UnsupportedPrimitiveError` naming the primitive and the source line.
The idea of a table of per-primitive rules over a jaxpr comes from jax_verify (Stanislav Fort et
al., DeepMind), whose released package no longer imports with current JAX (see the README).

The package, one idea per module:

* :mod:`qbound.trace.primitives`: the primitives known, :class:`UnsupportedPrimitiveError`;
* :mod:`qbound.trace.linear`: :class:`LinearOp`, a linear map given by one primitive;
* :mod:`qbound.trace.fold`: what does not depend on the input, evaluated as one compiled program
  before the walk (a library's weight quantization inside the forward pass);
* :mod:`qbound.trace.builder`: the jaxpr walker and the emitters the rules build nodes with;
* :mod:`qbound.trace.unsupported`: the message of :class:`UnsupportedPrimitiveError`, naming the
  user's operation (``jax.nn.gelu``) rather than JAX's primitive where it can;
* :mod:`qbound.trace.rules`: the per-primitive rules;
* :mod:`qbound.trace.dynamic`: activation scales computed from each input (qwix's dynamic
  ``act_qtype``), recognised as a whole and written as one dynamic rounding node;
* :mod:`qbound.trace.simplify`: the clean-up pass on the finished node list;
* here: :func:`trace`, the one public entry point.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G
from qbound._recent import Recent
from qbound.box import Box
from qbound.trace.builder import FOLD_MIN_EQUATIONS, _Builder
from qbound.trace.dynamic_forms import materialize
from qbound.trace.fold import fold_constants
from qbound.trace.linear import LinearOp
from qbound.trace.primitives import SUPPORTED, UnsupportedPrimitiveError
from qbound.trace.simplify import _simplify

__all__ = ["SUPPORTED", "LinearOp", "UnsupportedPrimitiveError", "trace"]


def _as_spec(example):
  if isinstance(example, Box):
    example = example.lower
  if isinstance(example, jax.ShapeDtypeStruct):
    return example
  arr = np.asarray(example) if not isinstance(example, jax.Array) else example
  dtype = arr.dtype if jnp.issubdtype(arr.dtype, jnp.floating) else jnp.float32
  # float64 inputs compute in float32 unless jax_enable_x64 is on, as everywhere in JAX.
  return jax.ShapeDtypeStruct(tuple(arr.shape), jax.dtypes.canonicalize_dtype(dtype))


def _walk(spec, closed, constants):
  """The builder after walking ``closed`` (inputs: ``constants``, then the input), and its output."""
  builder = _Builder(spec.shape, spec.dtype)
  (out,) = builder.run(closed.jaxpr, closed.consts, [("const", c) for c in constants] + [("node", 0)])
  return builder, materialize(builder, out)


def trace(fn: Callable, example, *, label: str = "fn") -> G.Graph:
  """Traces ``fn`` (a pure function of ONE unbatched input) into a :class:`~qbound.graph.Graph`.

  Args:
    fn: e.g. ``functools.partial(model.apply, params)`` for a Flax linen model, or a function
      that merges an nnx graphdef with its state. Parameters become the graph's constants.
    example: an input (or a ``jax.ShapeDtypeStruct``, or a :class:`~qbound.box.Box`) fixing the
      input shape and dtype.
    label: a name used in error messages (``"f"``, ``"fq"``).

  Returns:
    The layer graph; calling it equals ``fn`` (up to float rounding).

  Raises:
    UnsupportedPrimitiveError: ``fn`` uses an operation qbound has no rule for; the message names
      it and the line it comes from.
    ValueError: ``fn`` fails on an input of that shape, returns several outputs, or its output
      does not depend on the input.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> g = qb.trace(functools.partial(model.apply, params), jnp.zeros(3))
    >>> [n.kind for n in g.nodes]
    ['input', 'affine', 'relu', 'affine']
  """
  if isinstance(fn, G.Graph):
    return fn
  spec = _as_spec(example)
  try:
    closed = jax.make_jaxpr(fn)(jnp.zeros(spec.shape, spec.dtype))
  except Exception as err:  # the user's function rejected the input: say which input it was given
    hint = ""
    if "Cannot mutate" in str(err) or type(err).__name__ == "TraceContextError":
      # (nnx's BatchNorm in training mode updates its batch statistics as it runs; so does Dropout's RNG.)
      hint = (" It changes its own state as it runs: an nnx model in training mode (BatchNorm updating "
              "its statistics, Dropout drawing masks). Call model.eval() before nnx.split, as inference does.")
    raise ValueError(f"{label} could not be evaluated on an input of shape {spec.shape} and dtype "
                     f"{spec.dtype} (the box's shape): {type(err).__name__}: {err}{hint}") from err
  key = _cache_key(closed, spec)
  graph = None if key is None else _traced.get(key, closed.consts)
  if graph is None:
    graph = _trace_closed(closed, spec, label)
    if key is not None:
      _traced.put(key, graph, closed.consts)
  return graph


# Graphs traced lately, by what determines them: the jaxpr as text, the identities of its constants
# (kept alive with the entry) and the input's shape. Only where every constant is a JAX array
# (immutable; a NumPy array could change in place under the same identity). A certify call in a
# loop traced f and f_q afresh each time: 4-6 ms each on ACAS Xu of a 0.26 s proof, against 0.4 ms
# for the jaxpr and 1.2-2 ms for its text; and with the same graph objects, what is kept per graph
# (float64 copies, programs' keys) is found again.
_traced = Recent(size=4)


def _cache_key(closed, spec):
  consts = closed.consts
  if not all(isinstance(c, jax.Array) and not isinstance(c, jax.core.Tracer) for c in consts):
    return None
  return (str(closed.jaxpr), tuple(id(c) for c in consts), tuple(spec.shape), str(spec.dtype))


def _trace_closed(closed, spec, label: str) -> G.Graph:
  jaxpr = closed.jaxpr
  if len(jaxpr.outvars) != 1:
    raise ValueError(f"{label} must return a single array; it returns {len(jaxpr.outvars)} outputs.")
  out_aval = jaxpr.outvars[0].aval
  if not jnp.issubdtype(out_aval.dtype, jnp.floating):
    raise ValueError(f"{label} must return a float array, got dtype {out_aval.dtype}.")
  # What does not depend on the input as one compiled program where it is large (a library's weight
  # quantization); otherwise the walk evaluates it (trace.fold, FOLD_MIN_EQUATIONS).
  folded = fold_constants(closed, [None], FOLD_MIN_EQUATIONS)
  try:
    builder, out = _walk(spec, *(folded if folded is not None else (closed, [])))
  except UnsupportedPrimitiveError:
    if folded is None:
      raise
    # Partial evaluation inlines custom_jvp calls, whose tracebacks name the library function the
    # user called (jax.nn.softplus): the message comes from the jaxpr as written.
    builder, out = _walk(spec, closed, [])
  if out[0] == "const":
    raise ValueError(f"the output of {label} does not depend on its input; there is nothing to bound.")
  nodes, output = _simplify(builder.nodes, out[1])
  return G.Graph(nodes=tuple(nodes), output=output)
