"""Boxes: the input sets qbound certifies over, and the output bounds it proves.

A :class:`Box` is an axis-aligned hyper-rectangle ``{x : lower <= x <= upper}`` stored as two
arrays of the same shape (the shape of ONE unbatched input, e.g. ``(5,)`` or ``(28, 28, 1)``).
It is a pytree, so boxes pass through ``jax.jit`` and ``jax.vmap`` (a leading axis on both arrays
is a batch of boxes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qbound import validate


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Box:
  """The set ``{x : lower <= x <= upper}`` (elementwise).

  Attributes:
    lower: lower corner, an array of the input's shape.
    upper: upper corner, the same shape as ``lower``.

  Example:
    >>> import jax.numpy as jnp, qbound as qb
    >>> box = qb.Box(lower=-jnp.ones(3), upper=jnp.ones(3))
    >>> box.shape, float(box.radius.max())
    ((3,), 1.0)
  """

  lower: Any
  upper: Any

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(jnp.shape(self.lower))

  @property
  def center(self):
    return (self.lower + self.upper) / 2

  @property
  def radius(self):
    return (self.upper - self.lower) / 2

  @property
  def width(self):
    return self.upper - self.lower

  def contains(self, x, *, atol: float = 0.0) -> bool:
    """Whether ``x`` lies in the box (up to ``atol``)."""
    x = np.asarray(x)
    return bool(np.all(x >= np.asarray(self.lower) - atol) and np.all(x <= np.asarray(self.upper) + atol))

  def clip(self, x):
    """Projects ``x`` onto the box (the nearest point of the box in every norm)."""
    return jnp.clip(x, self.lower, self.upper)

  def __repr__(self) -> str:
    return f"Box(shape={self.shape}, lower={np.asarray(self.lower)!r}, upper={np.asarray(self.upper)!r})"


def linf_ball(center, radius, *, clip_lower=None, clip_upper=None) -> Box:
  """The L-infinity ball ``{x : |x - center|_inf <= radius}``, optionally intersected with a domain.

  A batch of centres (a leading axis) gives a batch of balls, one Box whose arrays have that
  leading axis, as :func:`qbound.certify_batch` takes (one radius per ball: ``radius[:, None]``
  for flat inputs).

  Args:
    center: the ball's centre (one unbatched input), or a batch of centres.
    radius: a scalar or an array broadcastable to ``center``.
    clip_lower: optional lower limit of the input domain (e.g. 0 for pixels).
    clip_upper: optional upper limit of the input domain (e.g. 1 for pixels).

  Returns:
    The ball as a :class:`Box`.

  Raises:
    TypeError: a centre, radius or limit that is not numeric.
    ValueError: a NaN or infinite centre or radius, a negative radius, a radius that does not
      broadcast to the centre, ``clip_lower > clip_upper``, or a ball entirely outside the domain
      (checked where the values are known, not under ``jax.jit``).

  Example:
    >>> import jax.numpy as jnp, qbound as qb
    >>> qb.linf_ball(jnp.array([0.0, 0.99]), 0.02, clip_lower=0.0, clip_upper=1.0).upper
    Array([0.02, 1.  ], dtype=float32)
  """
  _check_ball(center, radius, clip_lower, clip_upper)
  center = jnp.asarray(center, dtype=jnp.result_type(center, jnp.float32))
  lower = center - radius
  upper = center + radius
  if clip_lower is not None:
    lower = jnp.maximum(lower, clip_lower)
  if clip_upper is not None:
    upper = jnp.minimum(upper, clip_upper)
  if not isinstance(lower, jax.core.Tracer) and np.any(np.asarray(lower) > np.asarray(upper)):
    i = tuple(int(k) for k in np.argwhere(np.asarray(lower) > np.asarray(upper))[0])
    raise ValueError(f"the ball around center[{', '.join(map(str, i))}] = {np.asarray(center)[i]} lies outside "
                     f"[clip_lower, clip_upper] = [{clip_lower}, {clip_upper}], so the box is empty there; move the "
                     "centre into the domain or widen the limits.")
  return Box(lower=lower, upper=upper)


def _check_ball(center, radius, clip_lower, clip_upper) -> None:
  """linf_ball's arguments: numeric, finite, radius >= 0 and broadcastable, limits in order. Values
  inside ``jax.jit`` are unknown (tracers): only their kinds are checked then."""
  arrays = {}
  for name, value in (("center", center), ("radius", radius), ("clip_lower", clip_lower), ("clip_upper", clip_upper)):
    if value is None and name.startswith("clip"):
      continue
    if isinstance(value, (str, bytes)) or value is None:
      raise TypeError(f"{name} must be a number or an array of numbers; got {type(value).__name__} {value!r}.")
    dtype = validate.dtype_of(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(f"{name} must be a number or an array of numbers; got {type(value).__name__} of dtype "
                      f"{dtype}.")
    if not isinstance(value, jax.core.Tracer):
      arrays[name] = np.asarray(value, np.float64)
  if "center" in arrays and "radius" in arrays:
    try:
      np.broadcast_shapes(arrays["radius"].shape, arrays["center"].shape)
    except ValueError:
      raise ValueError(f"radius of shape {arrays['radius'].shape} does not broadcast to the centre's shape "
                       f"{arrays['center'].shape}; give a scalar, one radius per entry, or radius[:, None] for one "
                       "per ball of a batch.") from None
  for name, values in arrays.items():
    if np.isnan(values).any() or (name in ("center", "radius") and np.isinf(values).any()):
      raise ValueError(f"{name} must be finite; it holds {'nan' if np.isnan(values).any() else 'inf'}"
                       + (" (a clip limit may be +-inf, never NaN)." if name.startswith("clip") else "."))
  if "radius" in arrays and (arrays["radius"] < 0).any():
    raise ValueError(f"radius must be >= 0; got {arrays['radius'].min():g}.")
  if "clip_lower" in arrays and "clip_upper" in arrays and (arrays["clip_lower"] > arrays["clip_upper"]).any():
    raise ValueError(f"clip_lower must be <= clip_upper; got {clip_lower} > {clip_upper}.")


def validate_box(box: Box, *, name: str = "box") -> Box:
  """Checks a box and returns it with float arrays; raises ``ValueError`` saying what is wrong.

  Rejects: a non-Box, lower/upper of different shapes, NaN or infinite corners, and inverted
  (empty) boxes with ``lower > upper`` anywhere.
  """
  if not isinstance(box, Box):
    raise ValueError(f"{name} must be a qbound.Box(lower=..., upper=...), got {type(box).__name__}.")
  lower = np.asarray(box.lower)
  upper = np.asarray(box.upper)
  if lower.shape != upper.shape:
    raise ValueError(f"{name}.lower has shape {lower.shape} but {name}.upper has shape {upper.shape}; "
                     "they must match (the shape of one unbatched input).")
  for side, arr in (("lower", lower), ("upper", upper)):
    if not np.issubdtype(arr.dtype, np.number):
      raise ValueError(f"{name}.{side} must be numeric, got dtype {arr.dtype}.")
    if not np.all(np.isfinite(arr)):
      bad = np.argwhere(~np.isfinite(arr))[0]
      raise ValueError(f"{name}.{side} is not finite at index {tuple(int(i) for i in bad)} "
                       f"(value {arr[tuple(bad)]}); give finite corners.")
  if np.any(lower > upper):
    bad = tuple(int(i) for i in np.argwhere(lower > upper)[0])
    raise ValueError(f"{name} is empty: lower > upper at index {bad} ({lower[bad]} > {upper[bad]}). "
                     "Swap the corners or build the box with qbound.linf_ball(center, radius).")
  dtype = jax.dtypes.canonicalize_dtype(np.result_type(lower.dtype, np.float32)
                                        if np.issubdtype(lower.dtype, np.floating) else np.float32)
  return Box(lower=round_outward(lower, dtype, -np.inf), upper=round_outward(upper, dtype, np.inf))


def validate_boxes(boxes: Box, *, name: str = "boxes") -> Box:
  """:func:`validate_box` for a batch of boxes (arrays with a leading batch axis of length >= 1).

  Example:
    >>> import jax.numpy as jnp, qbound as qb
    >>> qb.box.validate_boxes(qb.linf_ball(jnp.zeros((4, 3)), 0.1)).shape
    (4, 3)
  """
  if isinstance(boxes, Box) and np.ndim(boxes.lower) == 0:
    raise ValueError(f"{name} needs a leading batch axis (one box per row); got scalar corners.")
  boxes = validate_box(boxes, name=name)
  if boxes.shape[0] == 0:
    raise ValueError(f"{name} is an empty batch (leading axis of length 0); give at least one box.")
  return boxes


def box_at(boxes: Box, index) -> Box:
  """Box ``index`` of a batch (or a sub-batch for a slice or an index array)."""
  return Box(lower=boxes.lower[index], upper=boxes.upper[index])


def round_outward(values: np.ndarray, dtype, direction: float):
  """``values`` in ``dtype``, rounded toward ``direction`` where the cast is inexact, so a box
  narrowed from float64 to float32 never shrinks."""
  cast = values.astype(dtype)
  inexact = cast.astype(np.float64) != values.astype(np.float64)
  if direction < 0:
    inexact &= cast.astype(np.float64) > values
  else:
    inexact &= cast.astype(np.float64) < values
  cast = np.where(inexact, np.nextafter(cast, np.asarray(direction, dtype)), cast)
  return jnp.asarray(cast, dtype)


def sample_uniform(key, box: Box, num: int):
  """``num`` points drawn uniformly from the box, shape ``(num, *box.shape)``.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> xs = qb.box.sample_uniform(jax.random.key(0), qb.Box(jnp.zeros(2), jnp.ones(2)), 4)
    >>> xs.shape
    (4, 2)
  """
  u = jax.random.uniform(key, (num, *box.shape), dtype=jnp.result_type(box.lower))
  return box.lower + u * (box.upper - box.lower)


def sample_vertices(key, box: Box, num: int):
  """``num`` random vertices of the box: the maximal error of a piecewise-linear net often sits there."""
  bits = jax.random.bernoulli(key, 0.5, (num, *box.shape))
  return jnp.where(bits, box.upper, box.lower)
