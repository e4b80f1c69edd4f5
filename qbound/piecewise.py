"""Exact piecewise-linear forms used by tracing: ``jnp.where``, ``abs``, leaky ReLU and pooling windows.

Pure numpy on the constants known at trace time; :mod:`qbound.trace` turns the results into graph
nodes. Two ideas:

* A continuous piecewise-linear function of one value ``x`` (elementwise), ``P_0`` below the first
  break, ``P_k(x) = s_k x + t_k`` between breaks ``c_k`` and ``c_{k+1}``, equals
  ``P_0 + sum_k T_k`` with ``T_k = relu(P_k - P_{k-1})`` where the slope rises at ``c_k`` and
  ``T_k = min(P_k - P_{k-1}, 0) = (P_k - P_{k-1}) - relu(P_k - P_{k-1})`` where it falls, because
  ``P_k - P_{k-1} = (s_k - s_{k-1}) (x - c_k)`` by continuity. The pieces are computed by the
  user's own operations and no new constant is computed in float, so the graph is exactly the
  traced function in real arithmetic (leaky ReLU becomes ``a x + relu(x - a x)``); continuity and
  slopes are checked in rational arithmetic. ``jnp.where(x >= c, A, B)``
  with ``A``, ``B`` such functions of ``x`` is one again when it is continuous at ``c`` (a step is not
  piecewise linear and is rejected).
* A max-pooling window is the maximum of its taps: for every window offset, the input entries that
  offset reads, one per output position. Taps that fall into the padding (``-inf`` for max pooling)
  are replaced by the nearest tap of the same window inside the input, which changes no maximum;
  so every tap is a strided slice or a gather of the input, and the pooling is exactly a tree of
  ``max(a, b) = a + relu(b - a)`` over them.
"""

from __future__ import annotations

import dataclasses
import itertools
from fractions import Fraction

import numpy as np


class NotPiecewiseLinear(ValueError):
  """The traced ``where`` is not a continuous piecewise-linear function of the compared value."""


@dataclasses.dataclass(frozen=True)
class Piecewise:
  """A continuous piecewise-linear function of one value ``x``, elementwise (arrays of one shape).

  Piece ``k`` is ``slopes[k] * x + offsets[k]`` for ``x`` between ``breaks[k - 1]`` and
  ``breaks[k]``; the breaks are nondecreasing elementwise and finite. Slopes and offsets are exact
  rationals (numpy arrays of ``Fraction``) so that checks never round; ``values[k]`` is whatever
  computes piece ``k`` (in :mod:`qbound.trace`, the graph value the user's code computed it with).
  """

  breaks: tuple
  slopes: tuple
  offsets: tuple
  values: tuple

  def __post_init__(self):
    # Arithmetic on 0-d object arrays returns bare Fractions: a scalar's pieces (leaky_relu of one
    # entry) are kept as arrays, as every other shape's are.
    for name in ("breaks", "slopes", "offsets"):
      object.__setattr__(self, name, tuple(v if isinstance(v, np.ndarray) else np.asarray(v)
                                           for v in getattr(self, name)))

  @staticmethod
  def affine(slope, offset, shape, value) -> "Piecewise":
    return Piecewise((), (exact(slope, shape),), (exact(offset, shape),), (value,))

  @staticmethod
  def ramp(cut, shape, *, rising: bool, x, constant) -> "Piecewise":
    """``max(x, cut)`` (``rising``) or ``min(x, cut)``; ``x`` and ``constant`` compute the pieces."""
    cut = np.broadcast_to(np.asarray(cut), shape)
    flat = (exact(0, shape), exact(cut, shape), constant)
    ident = (exact(1, shape), exact(0, shape), x)
    pieces = (flat, ident) if rising else (ident, flat)
    return Piecewise((cut,), tuple(p[0] for p in pieces), tuple(p[1] for p in pieces), tuple(p[2] for p in pieces))

  @property
  def shape(self):
    return self.slopes[0].shape

  def then_affine(self, scale, shift, value) -> "Piecewise":
    """``scale * self + shift`` (exact) for an affine ``self``, computed by ``value``."""
    assert not self.breaks
    scale, shift = exact(scale, self.shape), exact(shift, self.shape)
    return Piecewise((), (self.slopes[0] * scale,), (self.offsets[0] * scale + shift,), (value,))

  def __call__(self, x):
    """Evaluates the function in float64 (for tests)."""
    as_float = lambda a: a.astype(np.float64)
    out = as_float(self.slopes[0]) * x + as_float(self.offsets[0])
    for c, s, t in zip(self.breaks, self.slopes[1:], self.offsets[1:]):
      out = np.where(x >= c, as_float(s) * x + as_float(t), out)
    return out


def exact(values, shape) -> np.ndarray:
  """An array of ``Fraction`` s equal to the (float or Fraction) values, broadcast to ``shape``."""
  arr = np.asarray(values)
  if arr.dtype != object:
    arr = arr.astype(np.float64)
    if arr.size and np.all(arr == arr.flat[0]) and np.broadcast_shapes(arr.shape, shape) == tuple(shape):
      # One value (a ReLU's 0 and 1): one Fraction shared by every entry (Fractions are immutable).
      # Tracing ACAS Xu's 12 ReLUs built ~2,500 of them, 30-50 ms of every warm certify call.
      out = np.empty(shape, dtype=object)
      out.fill(Fraction(float(arr.flat[0])))
      return out
  flat = [v if isinstance(v, Fraction) else Fraction(float(v)) for v in np.broadcast_to(arr, shape).ravel()]
  out = np.empty(len(flat), dtype=object)
  out[:] = flat
  return out.reshape(shape)


def join(below: Piecewise, above: Piecewise, cut) -> Piecewise:
  """``below(x)`` for ``x < cut`` and ``above(x)`` for ``x >= cut`` (the comparison's strictness does
  not matter: the two must agree at ``cut``).

  Raises:
    NotPiecewiseLinear: the result jumps at ``cut``, ``cut`` is not finite, or a break of either
      part lies below ``cut`` for some entries and above it for others.

  Example:
    >>> import numpy as np
    >>> from qbound import piecewise as PW
    >>> x = PW.Piecewise.affine(1, 0, (1,), "x")                 # the identity, computed by "x"
    >>> quarter = PW.Piecewise.affine(0.25, 0, (1,), "x / 4")
    >>> leaky = PW.join(quarter, x, np.zeros(1))                  # jnp.where(x >= 0, x, x / 4)
    >>> leaky.values, leaky(np.array([-2.0, 3.0])).tolist()
    (('x / 4', 'x'), [-0.5, 3.0])
    >>> PW.join(PW.Piecewise.affine(0, 0, (1,), "0"), PW.Piecewise.affine(0, 1, (1,), "1"), np.zeros(1))
    Traceback (most recent call last):
    ...
    qbound.piecewise.NotPiecewiseLinear: it jumps where the comparison changes (a step function)
  """
  cut = np.broadcast_to(np.asarray(cut), below.shape)
  if not np.all(np.isfinite(cut)):
    raise NotPiecewiseLinear("it compares with a non-finite constant")
  kept = 0
  for br in below.breaks:
    if np.all(br <= cut):
      kept += 1
    elif np.all(br >= cut):
      break
    else:
      raise NotPiecewiseLinear("its pieces' breakpoints fall on both sides of the compared constant")
  dropped = 0
  for br in above.breaks:
    if np.all(br <= cut):
      dropped += 1
    elif np.all(br >= cut):
      break
    else:
      raise NotPiecewiseLinear("its pieces' breakpoints fall on both sides of the compared constant")
  c = exact(cut, cut.shape)
  left = below.slopes[kept] * c + below.offsets[kept]
  right = above.slopes[dropped] * c + above.offsets[dropped]
  if not np.all(left == right):
    raise NotPiecewiseLinear("it jumps where the comparison changes (a step function)")
  return simplify(Piecewise(below.breaks[:kept] + (cut,) + above.breaks[dropped:],
                            below.slopes[: kept + 1] + above.slopes[dropped:],
                            below.offsets[: kept + 1] + above.offsets[dropped:],
                            below.values[: kept + 1] + above.values[dropped:]))


def simplify(pw: Piecewise) -> Piecewise:
  """Drops breaks between identical pieces."""
  breaks, slopes, offsets, values = [], [pw.slopes[0]], [pw.offsets[0]], [pw.values[0]]
  for c, s, t, v in zip(pw.breaks, pw.slopes[1:], pw.offsets[1:], pw.values[1:]):
    if np.all(s == slopes[-1]) and np.all(t == offsets[-1]):
      continue
    breaks.append(c)
    slopes.append(s)
    offsets.append(t)
    values.append(v)
  return Piecewise(tuple(breaks), tuple(slopes), tuple(offsets), tuple(values))


def clip_form(pw: Piecewise):
  """``(lower cut, upper cut, k)`` if ``pw`` is ``s_k clip(x, lo, hi) + t_k`` (constant outside the one
  piece ``k``; the cuts may be infinite), else None."""
  flat = [np.all(s == 0) for s in pw.slopes]
  moving = [k for k, f in enumerate(flat) if not f]
  if len(moving) != 1:
    return None
  k = moving[0]
  if k > 1 or len(pw.slopes) - k > 2:
    return None
  shape = pw.shape
  lo = pw.breaks[k - 1] if k > 0 else np.full(shape, -np.inf)
  hi = pw.breaks[k] if k < len(pw.breaks) else np.full(shape, np.inf)
  return lo, hi, k


# --- pooling windows ----------------------------------------------------------------------------


def window_taps(in_shape, window, strides, padding, dilation):
  """The taps of a pooling window: one per window offset, each a way of reading the input.

  Each tap is ``("slice", start, limit, strides)`` (a strided slice) when it reads only real input
  entries, else ``("gather", indices)`` with integer ``indices`` of shape ``(*out_shape, ndim)``,
  where a position whose tap falls into the padding reads the nearest tap of its own window
  instead. Identical taps are listed once.

  Raises:
    NotPiecewiseLinear: some window lies entirely in the padding (its maximum would be -inf).
  """
  ndim = len(in_shape)
  out_shape = []
  per_dim = []  # per dim: (out positions, offsets) -> index, and whether each offset is always valid
  for n, w, s, (plo, phi), dil in zip(in_shape, window, strides, padding, dilation):
    span = (w - 1) * dil + 1
    out = max((n + plo + phi - span) // s + 1, 0)
    out_shape.append(out)
    o = np.arange(out)[:, None]
    k = np.arange(w)[None, :]
    idx = o * s + k * dil - plo  # (out, w)
    valid = (idx >= 0) & (idx < n)
    if out and not np.all(valid.any(axis=1)):
      raise NotPiecewiseLinear("a pooling window lies entirely in the padding")
    first = np.argmax(valid, axis=1)[:, None]
    last = (w - 1 - np.argmax(valid[:, ::-1], axis=1))[:, None]
    clamped = o * s + np.clip(k, first, last) * dil - plo
    per_dim.append((clamped, valid.all(axis=0)))
  taps = []
  if min(out_shape) <= 0:  # an empty result
    return taps, tuple(max(o, 0) for o in out_shape)
  seen = set()
  for offsets in itertools.product(*[range(w) for w in window]):
    if all(per_dim[d][1][k] for d, k in enumerate(offsets)):
      start = tuple(int(per_dim[d][0][0, k]) for d, k in enumerate(offsets))
      limit = tuple(start[d] + (out_shape[d] - 1) * strides[d] + 1 for d in range(ndim))
      key = ("slice", start)
      tap = ("slice", start, limit, tuple(strides))
    else:
      grids = np.meshgrid(*[per_dim[d][0][:, k] for d, k in enumerate(offsets)], indexing="ij")
      indices = np.stack(grids, axis=-1).astype(np.int32)
      key = ("gather", indices.tobytes())
      tap = ("gather", indices)
    if key not in seen:
      seen.add(key)
      taps.append(tap)
  return taps, tuple(out_shape)
