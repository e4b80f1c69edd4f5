"""Which entries of an ``rms`` fake quantization can saturate, and by how much: rows on the network.

qwix's ``rms,c`` scale (:mod:`qbound.rms_rounding`) is ``s = m / D`` with ``m`` the group's L2 norm,
and entry ``i`` saturates only where it dominates the rest of its group,
``D x_i / sqrt(x_i^2 + r_i^2) > 126.5`` with ``r_i^2 = sum_{j != i} x_j^2``; its error is then
``x_i - 127 s``. From the entries' intervals alone, ``r_i`` is at least the norm of the others'
smallest magnitudes, which is 0 as soon as the others may each be 0 somewhere in the box (ReLU
outputs that change sign over a piece), and ``x_i`` at its upper end: every entry may saturate, with
an error of a quarter of its value under ``rms,3`` (16 entries), where half a step is ``m / 340``.
On branch and bound's worst pieces of qwix's 4-16-16-2 MLPs, those clips made the bounds 3-5x
what the same bounds gave without them, on pieces where no sampled input saturates at all: the
others are never 0 together, and the entry is not at its largest where they are smallest.

Both have bounds that do not go through the intervals. For a row ``w`` with ``|w| <= 1`` and
``w_i = 0``, Cauchy-Schwarz gives ``r_i >= w . x``; and for ``alpha^2 + beta^2 <= 1``, ``beta >= 0``,
``m = |(x_i, r_i)| >= alpha x_i + beta r_i``. So

    r_i >= w . x,        x_i - c m <= (1 - c alpha) x_i - c beta (w . x),

both linear in ``x``: three CROWN rows per entry (Zhang et al., NeurIPS 2018), walked back through
the whole network to the input, bound the others' norm from below and the saturation errors at
the top and bottom (``c = 127 / D`` or ``128 / D``, less float32's slack) from above, jointly (two
rows where the input is a ReLU's output, which never reaches the bottom clip).
``w`` is ``x`` at the box's centre with entry ``i`` (and every entry of other groups) set to 0,
normalised, and ``(alpha, beta)`` the direction of ``(x_i, r_i)`` there: tight where the network
is close to linear over the box. The same idea bounds means of squares in
:mod:`qbound.bounds.variance`. :func:`qbound.rms_rounding.parts` reads the result
(:class:`qbound.rms_rounding.Joint`).

Sound mode: the rows' lower bounds are CROWN's sound ones; ``w`` is shrunk so that its norm stays
at most 1 whatever the rounding of its computation, ``(alpha, beta)`` alike, and the rows'
coefficients, computed in float32, are allowed ``4 u`` of their magnitude times the largest
``|x_j|`` (``u`` the unit roundoff).

Example:
  >>> import jax, jax.numpy as jnp, qbound as qb
  >>> from qbound.bounds.crown import backward_lower, crown_bounds
  >>> from qbound.bounds import rms_rest
  >>> w1, w2 = jnp.linspace(0.5, 1.5, 32).reshape(2, 16), jnp.ones((16, 2))
  >>> def fq(x):  # qwix's rms,3 on 16 ReLU outputs, written out
  ...   h = jax.nn.relu(x @ w1 + 0.1)
  ...   s = jnp.sqrt(jnp.mean(jnp.square(h))) * 3 / 127.5
  ...   s = jnp.where(s < 1e-19, 1.0, s)
  ...   return (jnp.round(h / s).astype(jnp.int8).astype(jnp.float32) @ w2) * s
  >>> box = qb.Box(jnp.array([0.5, 0.5]), jnp.array([1.0, 1.0]))
  >>> g = qb.trace(fq, box.center)
  >>> (idx,) = [i for i, n in enumerate(g.nodes) if rms_rest.applies(n)]
  >>> joint = rms_rest.joint_bounds(g, idx, crown_bounds(g, box), box, backward_lower)
  >>> bool(jnp.all(joint.rest > 1.5))  # every entry's others: their norm is at least ~ sqrt(15) * 0.6
  True
  >>> bool(jnp.all(joint.top < 0))  # and no entry reaches the clip
  True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qbound import rms_rounding
from qbound import graph as G
from qbound.bounds import fp
from qbound.bounds.common import jit_step

# Whether the passes that know it bound the saturations on the network (to compare with the entries'
# intervals alone). Read in the sparse passes' Python loop: takes effect at once.
ENABLED = True


def applies(node: G.Node) -> bool:
  """Whether ``node`` is an ``rms`` dynamic rounding whose entries may saturate (``D`` above the clip)."""
  if not ENABLED or not G.is_dynamic_rounding(node):
    return False
  return rms_rounding.may_saturate(node.attrs[1])


def _rows(center, others, c_top, c_bottom, bottom: bool):
  """The rows ``[w; -t; -b]`` (``(3n, *shape)``; without ``-b`` unless ``bottom``):
  :func:`qbound.rms_rounding.saturation_rows` of the centre, in its float type."""
  rows = rms_rounding.saturation_rows(center.reshape(-1), others, c_top, c_bottom, bottom,
                                      fp.unit_roundoff(center.dtype))
  return rows.reshape((rows.shape[0], *center.shape))


def _finish(low, rows, mag, sound: bool):
  """:class:`qbound.rms_rounding.Joint` from the rows' lower bounds (flat, per entry; ``+inf`` for
  the bottom without its rows)."""
  rest, top, bottom = rms_rounding.joint_from_rows(low, rows.reshape(rows.shape[0], -1), mag.reshape(-1),
                                                   fp.unit_roundoff(low.dtype), fp.tiny(low.dtype))
  if sound:
    rest, top, bottom = jnp.maximum(fp.round_down(rest), 0), fp.round_up(top), fp.round_up(bottom)
  finite = lambda v, fallback: jnp.where(jnp.isfinite(v), v, fallback)  # noqa: E731
  return rms_rounding.Joint(finite(rest, 0.0), finite(top, jnp.inf), finite(bottom, jnp.inf))


def _rows_top(center, others, c_top, c_bottom, sound: bool):
  del sound
  return _rows(center, others, c_top, c_bottom, False)


def _rows_both(center, others, c_top, c_bottom, sound: bool):
  del sound
  return _rows(center, others, c_top, c_bottom, True)


_rows_top = jit_step(_rows_top, (0, None, None, None))
_rows_both = jit_step(_rows_both, (0, None, None, None))
_finish = jit_step(_finish, (0, 0, 0))


@functools.partial(jax.jit, static_argnames=("idx", "batched"))
def _center_value(graph: G.Graph, lower, upper, idx: int, batched: bool):
  value = lambda lo, hi: graph.values((lo + hi) / 2)[idx]
  return jax.vmap(value)(lower, upper) if batched else value(lower, upper)


def joint_bounds(graph: G.Graph, idx: int, bounds, box, backward_lower, *, sound: bool = True, batched: bool = False,
                 lines=None) -> rms_rounding.Joint:
  """What the network proves of the saturations of the ``rms`` rounding node ``idx``
  (:func:`applies`): a :class:`qbound.rms_rounding.Joint` of its input's shape (with a leading axis
  of boxes when ``batched``).

  Args:
    graph: the graph holding the node.
    idx: the node's index.
    bounds: proven bounds of the nodes before it (those a backward pass from its input reads).
    box: the input box (a batch of boxes when ``batched``).
    backward_lower: a sound lower bound of ``rows . node`` over the box,
      :func:`qbound.bounds.crown.backward_lower` (passed in, so that imports run one way).
    sound: proven floating-point margins.
    lines: relaxation lines computed already, as ``backward_lower`` takes them.
  """
  node = graph.nodes[idx]
  spec = node.attrs[1]
  y = node.inputs[0]
  shape = tuple(graph.nodes[y].shape)
  axes = tuple(range(len(shape))) if spec.axes is None else tuple(len(shape) + a for a in spec.axes)
  rel = rms_rounding.slack(int(np.prod([shape[a] for a in axes], dtype=np.int64)))
  d = float(spec.divisor)
  c_top, c_bottom = float(spec.high) / d * (1 - rel), -float(spec.low) / d * (1 - rel)
  others = jnp.asarray(rms_rounding.group_others(shape, spec.axes))
  center = _center_value(graph, box.lower, box.upper, y, batched)
  # A ReLU's outputs never reach the bottom clip: 2n rows, as many as a node's own bounds take, so
  # the backward steps compiled for those serve these too (a first call compiles no more of them).
  rows_fn = _rows_top if graph.nodes[y].kind == G.RELU else _rows_both
  rows = rows_fn(center, others, c_top, c_bottom, sound=sound, batched=batched)
  low = backward_lower(graph, y, rows, bounds, box, sound=sound, batched=batched, lines=lines)
  lo, hi = bounds[y]
  joint = _finish(low, rows, jnp.maximum(jnp.abs(lo), jnp.abs(hi)), sound=sound, batched=batched)
  return jax.tree_util.tree_map(lambda v: v.reshape((v.shape[0], *shape) if batched else shape), joint)
