"""Saturation errors bounded together: at most ``K`` entries of a group past a clip at once.

A fake quantization whose scale is a root mean square (qwix's ``rms,c``, :mod:`qbound.rms_rounding`)
lets the largest entries saturate, with an error far above half a step. Each entry alone may be
the one that saturates, so a relaxation entry by entry gives every entry its worst clip, and a
layer that sums the entries sums those clips: on the 4-16-16-2 MLPs with ``rms,3``, 16 clips of
which at most one can happen (80x the reached error). The error set is not a box but a box plus a
*sparse* part: ``e = r + t`` with ``|r_i| <= base_i`` and ``t`` nonzero in at most ``K`` entries of
each group (:func:`qbound.rms_rounding.saturating_count`), ``t_i`` in ``[-over_top_i, over_bottom_i]``.

A backward bound pass meets the node with rows ``lam`` and needs ``min_e lam . e`` (or of ``-e``).
Over the sparse part that is minus the sum of the ``K`` largest gains ``g_i = lam_i^+ a_i + lam_i^- b_i``
per group (``a``, ``b`` the sparse widths on the side each sign of ``lam_i`` reads), where a box
relaxation would subtract all of them: the support function of the set of ``K``-sparse vectors, as
in the top-``k`` bounds of cardinality-constrained sets (e.g. the ``L0`` balls of sparse
adversarial attacks, Croce and Hein, ICCV 2019). The relaxations keep each entry's whole band in
their offsets (sound for any reader), and carry the sparse widths beside them
(:class:`SaturatingRelaxation`, :class:`SaturatingDiffRelaxation`); the passes that know it add
back :func:`saving`, the gains beyond the ``K`` largest.

Example:
  >>> import jax.numpy as jnp
  >>> from qbound import graph as G
  >>> from qbound.dynamic_rounding import DYNAMIC, DynamicScale
  >>> from qbound.bounds import saturation
  >>> spec = DynamicScale(divisor=170.0, low=-128, high=127, norm="rms")   # rms,3 on 16 entries: K = 1
  >>> node = G.Node(kind=G.ROUND, inputs=(0,), shape=(16,), attrs=(DYNAMIC, spec))
  >>> rows = jnp.ones((1, 16))
  >>> widths = jnp.full((16,), 0.25)
  >>> saved, _ = saturation.saving(node, rows, widths, widths, sound=False)
  >>> float(saved[0])  # 16 clips of 0.25 in the box relaxation, one of them here
  3.75
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qbound import dynamic_rounding
from qbound import graph as G
from qbound.bounds import fp


# Whether the relaxations carry the saturation widths and the backward passes use them (to compare
# with every entry's own clip). Read while tracing: set it before the first call, or clear JAX's
# caches, since the compiled steps keep what they saw.
ENABLED = True


class SaturatingRelaxation(NamedTuple):
  """:class:`qbound.bounds.relax.Relaxation`'s lines, whose offsets hold each entry's whole band, and
  the sparse widths in them: ``sat_lower`` of the lower offset, ``sat_upper`` of the upper one."""

  lower_slope: jnp.ndarray
  lower_offset: jnp.ndarray
  upper_slope: jnp.ndarray
  upper_offset: jnp.ndarray
  sat_lower: jnp.ndarray
  sat_upper: jnp.ndarray


class SaturatingDiffRelaxation(NamedTuple):
  """:class:`qbound.bounds.relax.DiffRelaxation`'s lines with the sparse widths of ``lower_r`` and
  ``upper_r`` (as :class:`SaturatingRelaxation`)."""

  lower_d: jnp.ndarray
  lower_q: jnp.ndarray
  lower_r: jnp.ndarray
  upper_d: jnp.ndarray
  upper_q: jnp.ndarray
  upper_r: jnp.ndarray
  sat_lower: jnp.ndarray
  sat_upper: jnp.ndarray


def applies(node: G.Node) -> bool:
  """Whether ``node`` is a dynamic rounding whose saturations are limited jointly."""
  return (ENABLED and G.is_dynamic_rounding(node)
          and dynamic_rounding.joint_saturation(node.attrs[1], node.shape) is not None)


def _top_sum(gains, count: int, axes: tuple):
  """Per row (axis 0), the sum over groups of each group's ``count`` largest gains; ``axes``: the
  group axes of the node (``gains`` has a leading row axis before them)."""
  axes = tuple(a + 1 for a in axes)
  rest = [a for a in range(1, gains.ndim) if a not in axes]
  moved = jnp.transpose(gains, (0, *rest, *axes))
  size = int(np.prod([gains.shape[a] for a in axes], dtype=np.int64))
  moved = moved.reshape(gains.shape[0], -1, size)
  top = moved.max(axis=-1, keepdims=True) if count == 1 else jax.lax.top_k(moved, count)[0]
  return jnp.sum(top, axis=(1, 2))


def saving(node: G.Node, rows, sat_lower, sat_upper, *, sound: bool):
  """``(saving, margin)`` per row: how much the lower bound ``min rows . e`` rises when the sparse
  widths ``sat_lower`` (read by positive coefficients) and ``sat_upper`` (by negative ones) count only
  for the ``K`` largest gains of each group, and (sound) a proven bound on this sum's float rounding.

  Args:
    node: the dynamic rounding node (:func:`applies`).
    rows: coefficients on the node's value (or on minus its error), ``(rows, *node.shape)``.
    sat_lower, sat_upper: the sparse widths of the offsets the rows read (node's shape).
    sound: also bound the rounding of the sums.
  """
  count, axes = dynamic_rounding.joint_saturation(node.attrs[1], node.shape)
  gains = jnp.maximum(rows, 0) * sat_lower - jnp.minimum(rows, 0) * sat_upper  # >= 0
  total = fp.margin_sum(gains)
  saved = jnp.maximum(total - _top_sum(gains, count, axes), 0.0)
  if not sound:
    return saved, jnp.zeros_like(saved)
  # the gains, their sum and the top sums each carry a relative error below gamma(n + 2) of the total
  n = node.size
  return saved, 2 * fp.margin_coefficient(n + 2, rows.dtype) * total + 2 * fp.margin_floor(n, rows.dtype)
