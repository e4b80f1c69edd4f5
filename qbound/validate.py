"""Checks of the arguments of qbound's public calls: one place, one wording.

Every public entry point (:func:`qbound.certify`, :func:`qbound.certify_batch`,
:func:`qbound.maximize_error`, :func:`qbound.merge`, :func:`qbound.linf_ball`,
:func:`qbound.bounds.branch_and_bound`, :func:`qbound.exact.milp`) checks what it is given before
any tracing or compilation, so a wrong argument costs nothing and never reaches JAX, where it would
surface as an unrelated error deep inside a compiled program, or not at all (a string ``sound``
is truthy; a NaN ``time_budget`` compares false with everything, so the loop it bounds never stops
for time).

Each check raises :class:`TypeError` for a value of the wrong kind and :class:`ValueError` for one
out of range, with a message of the form ``"<name> must be <what is accepted>; got <value>."``,
and returns the value in a normal form (a Python ``float``, ``int`` or ``bool``, an index array).
The checks of qbound's own types live beside them and word their messages with these
(:func:`qbound.merge.check_networks`, :func:`qbound.merge.check_example`,
:func:`qbound.attack.check_search`, :func:`qbound.bounds.arguments.branch_and_bound_args`): this
module imports no other qbound module.

Example:
  >>> from qbound import validate
  >>> validate.positive("time_budget", 2)
  2.0
  >>> validate.positive("time_budget", float("nan"))
  Traceback (most recent call last):
  ...
  ValueError: time_budget must be a finite number > 0; got nan.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

# ------------------------------------------------------------------------------------------ numbers


def shown(value: Any) -> str:
  """The value as a message quotes it: short, with its type when that is the problem."""
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _real(name: str, value: Any, accepted: str) -> float:
  """``value`` as a float, or a TypeError: Python and numpy numbers and 0-d arrays, never bools."""
  # bool is an int in Python: time_budget=True or epsilon=False is a slip, not a number.
  if isinstance(value, (bool, np.bool_)) or value is None or isinstance(value, (str, bytes)):
    raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {shown(value)}.")
  if isinstance(value, numbers.Real):
    return float(value)
  try:
    array = np.asarray(value)
  except Exception:  # pragma: no cover - objects numpy cannot even look at
    array = None
  if array is None or array.shape != () or not (np.issubdtype(array.dtype, np.integer)
                                                or np.issubdtype(array.dtype, np.floating)):
    shape = "" if array is None or array.shape == () else f" of shape {array.shape}"
    raise TypeError(f"{name} must be {accepted}; got {type(value).__name__}{shape} {shown(value)}.")
  return float(array)


def number(name: str, value: Any, *, minimum: Optional[float] = None, strict: bool = False,
           allow_inf: bool = False, accepted: Optional[str] = None) -> float:
  """A real number, not NaN, finite unless ``allow_inf``, and ``>= minimum`` (``> minimum`` if ``strict``).

  Args:
    name: the argument's name, for the message.
    value: what the caller passed.
    minimum: the smallest value allowed (None: any).
    strict: whether ``minimum`` itself is excluded.
    allow_inf: whether ``+inf`` is allowed (it means "no limit" for time budgets).
    accepted: how the message describes the values accepted (default: built from the above).

  Returns:
    The value as a Python float.

  Raises:
    TypeError: not a real number (a string, a bool, an array of several values).
    ValueError: NaN, infinite (unless allowed) or below the minimum.
  """
  if accepted is None:
    accepted = "a number" if allow_inf else "a finite number"
    if minimum is not None:
      accepted += f" {'>' if strict else '>='} {minimum:g}"
    if allow_inf:
      accepted += " (math.inf for no limit)"
  result = _real(name, value, accepted)
  if math.isnan(result):
    raise ValueError(f"{name} must be {accepted}; got nan.")
  if math.isinf(result) and not (allow_inf and result > 0):
    raise ValueError(f"{name} must be {accepted}; got {result}.")
  if minimum is not None and (result < minimum or (strict and result == minimum)):
    raise ValueError(f"{name} must be {accepted}; got {shown(value)}.")
  return result


def positive(name: str, value: Any, *, allow_inf: bool = False, accepted: Optional[str] = None) -> float:
  """A number ``> 0`` (see :func:`number`).

  Example:
    >>> positive("time_limit", float("inf"), allow_inf=True)
    inf
  """
  if accepted is None:
    accepted = "a number > 0 (math.inf for no limit)" if allow_inf else "a finite number > 0"
  return number(name, value, minimum=0.0, strict=True, allow_inf=allow_inf, accepted=accepted)


def seconds(name: str, value: Any) -> float:
  """A time limit: a number of seconds ``> 0``, or ``math.inf`` for none.

  Example:
    >>> seconds("time_budget", -1)
    Traceback (most recent call last):
    ...
    ValueError: time_budget must be a number of seconds > 0 (math.inf for no limit); got -1.
  """
  return positive(name, value, allow_inf=True, accepted="a number of seconds > 0 (math.inf for no limit)")


def non_negative(name: str, value: Any, *, accepted: Optional[str] = None) -> float:
  """A finite number ``>= 0`` (see :func:`number`).

  Example:
    >>> non_negative("target_gap", 0)
    0.0
  """
  return number(name, value, minimum=0.0, accepted=accepted or "a finite number >= 0")


def optional_non_negative(name: str, value: Any, *, accepted: Optional[str] = None) -> Optional[float]:
  """None, or a finite number ``>= 0`` (e.g. ``epsilon``)."""
  return None if value is None else non_negative(name, value, accepted=accepted or "None or a finite number >= 0")


def integer(name: str, value: Any, *, minimum: Optional[int] = None, accepted: Optional[str] = None) -> int:
  """A whole number (Python or numpy integer, never a bool or a float), ``>= minimum``.

  Example:
    >>> integer("alpha_steps", 20, minimum=0)
    20
    >>> integer("alpha_steps", 2.5, minimum=0)
    Traceback (most recent call last):
    ...
    TypeError: alpha_steps must be an integer >= 0; got float 2.5.
  """
  accepted = accepted or ("an integer" if minimum is None else f"an integer >= {minimum}")
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
    raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {shown(value)}.")
  result = int(value)
  if minimum is not None and result < minimum:
    raise ValueError(f"{name} must be {accepted}; got {result}.")
  return result


def boolean(name: str, value: Any) -> bool:
  """``True`` or ``False`` (numpy bools too); a string such as ``'no'`` is refused, not read as true.

  Example:
    >>> boolean("sound", "no")
    Traceback (most recent call last):
    ...
    TypeError: sound must be True or False; got str 'no'.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False; got {type(value).__name__} {shown(value)}.")
  return bool(value)


def optional_boolean(name: str, value: Any) -> Optional[bool]:
  """``None`` (the callee decides, e.g. a progress bar only on a terminal), ``True`` or ``False``."""
  return None if value is None else boolean(name, value)


def choice(name: str, value: Any, choices: Sequence[str]) -> str:
  """One of ``choices`` (strings)."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"unknown {name} {shown(value)}; choose one of {', '.join(choices)}.")
  return value


# ---------------------------------------------------------------------------------- keys, functions


@functools.cache
def _raw_key_shape() -> tuple[int, ...]:
  # uint32[2] for the default threefry implementation; other implementations have other sizes.
  return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def prng_key(name: str, key: Any):
  """None, or one JAX PRNG key: typed (``jax.random.key(0)``) or raw (``jax.random.PRNGKey(0)``, uint32[2]).

  Returns:
    The key as given (None stays None: the callee picks its default).

  Raises:
    TypeError: anything else (a string, an int seed, a float array), with what to pass instead.
    ValueError: a batch of keys where one is expected.

  Example:
    >>> prng_key("key", "abc")
    Traceback (most recent call last):
    ...
    TypeError: key must be a JAX PRNG key: jax.random.key(0) (typed) or ...; got str 'abc'.
  """
  if key is None:
    return None
  accepted = ("a JAX PRNG key: jax.random.key(0) (typed) or jax.random.PRNGKey(0) (raw uint32"
              f"{list(_raw_key_shape())})")
  hint = ""
  if isinstance(key, (numbers.Integral, np.integer)) and not isinstance(key, (bool, np.bool_)):
    hint = f" (for a seed, pass jax.random.key({int(key)}))"
  dtype = getattr(key, "dtype", None)
  if dtype is not None and hasattr(key, "shape") and not isinstance(key, (str, bytes)):
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      if tuple(key.shape) != ():
        raise ValueError(f"{name} must be a single PRNG key; got a batch of keys of shape {tuple(key.shape)} "
                         f"(qbound splits one key itself).")
      return key
    if np.dtype(dtype) == np.uint32 and tuple(key.shape) == _raw_key_shape():
      return key
    raise TypeError(f"{name} must be {accepted}; got an array of dtype {np.dtype(dtype).name} and shape "
                    f"{tuple(key.shape)}.")
  raise TypeError(f"{name} must be {accepted}; got {type(key).__name__} {shown(key)}{hint}.")


def function(name: str, fn: Any) -> Callable:
  """A callable (a network: a pure function of one input, a traced Graph, a MergedNetwork)."""
  if not callable(fn):
    raise TypeError(f"{name} must be a function of one input (e.g. functools.partial(model.apply, params)); "
                    f"got {type(fn).__name__} {shown(fn)}.")
  return fn


def dtype_of(value: Any) -> np.dtype:
  """The dtype of an array, a JAX value or anything numpy can read (``object`` if it cannot)."""
  dtype = getattr(value, "dtype", None)
  if dtype is not None:
    return dtype
  try:
    return np.asarray(value).dtype
  except Exception:
    return np.dtype(object)


def is_number(token: str) -> bool:
  """Whether a text token reads as a number (``float`` accepts it)."""
  try:
    float(token)
  except ValueError:
    return False
  return True




def output_indices(name: str, outputs: Any, n_out: Optional[int] = None) -> Optional[np.ndarray]:
  """None, or flat output indices: an int or a non-empty sequence of ints, in ``[0, n_out)`` when given.

  Called once before tracing (kinds only) and once after (range, when ``n_out`` is known).

  Returns:
    The indices as a flat int64 array (None stays None).

  Example:
    >>> output_indices("outputs", [0, 2], 3).tolist()
    [0, 2]
    >>> output_indices("outputs", [0.5])
    Traceback (most recent call last):
    ...
    TypeError: outputs must be None, a flat output index or a sequence of them (integers); got list [0.5].
  """
  if outputs is None:
    return None
  accepted = "None, a flat output index or a sequence of them (integers)"
  if isinstance(outputs, (str, bytes, bool, np.bool_)):
    raise TypeError(f"{name} must be {accepted}; got {type(outputs).__name__} {shown(outputs)}.")
  try:
    array = np.asarray(outputs)
  except Exception:
    raise TypeError(f"{name} must be {accepted}; got {type(outputs).__name__} {shown(outputs)}.") from None
  if array.size and not np.issubdtype(array.dtype, np.integer):
    raise TypeError(f"{name} must be {accepted}; got {type(outputs).__name__} {shown(outputs)}.")
  array = array.astype(np.int64).reshape(-1)
  if array.size == 0:
    raise ValueError(f"{name} is empty; give at least one output index, or None for all outputs.")
  if n_out is not None and (array.min() < 0 or array.max() >= n_out):
    raise ValueError(f"{name} must be flat indices in [0, {n_out}) (the network has {n_out} outputs); "
                     f"got {array.tolist()}.")
  return array


def mesh_or_devices(mesh: Any, devices: Any) -> None:
  """``mesh`` None or a :class:`jax.sharding.Mesh`; ``devices`` None or a non-empty sequence of devices."""
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"mesh must be None or a jax.sharding.Mesh (see qbound.sharding.default_mesh); "
                    f"got {type(mesh).__name__}.")
  if devices is None:
    return
  if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence) or not devices:
    raise TypeError(f"devices must be None or a non-empty list of JAX devices (e.g. jax.devices()[:2]); "
                    f"got {shown(devices)}.")
  for device in devices:
    if not isinstance(device, jax.Device):
      raise TypeError(f"devices must hold JAX devices (from jax.devices()); got {type(device).__name__} "
                      f"{shown(device)}.")


# ----------------------------------------------------------------------------------------- results


def float_ties(what: str, lower_float32, upper, witness, scale=None) -> None:
  """Warns (:class:`~qbound.errors.FloatTieWarning`) where the error at a witness as f and fq run in
  float32 exceeds the real-arithmetic upper bound: a rounding tie that float32 resolves the other way.

  Args:
    what: names the certificate in messages.
    lower_float32: the float32 error(s) at the witness(es), or None.
    upper: the proven upper bound(s).
    witness: the witness input(s), one per bound.
    scale: the magnitude(s) of f's and fq's float32 outputs at the witness(es) (0 or None: not known).
  """
  import warnings

  from qbound.errors import FloatTieWarning

  if lower_float32 is None:
    return
  lower_float32 = np.asarray(lower_float32, np.float64).reshape(-1)
  upper = np.asarray(upper, np.float64).reshape(-1)
  # float32's own rounding moves the outputs by ulps of their magnitude, and a tight certificate's
  # gap may be smaller than that: only an excess well beyond it (about 100 ulps of the outputs, 0.1%
  # of the bound, or 1% where the outputs' magnitude is not known) is taken as a tie's.
  scale = np.zeros_like(upper) if scale is None else np.broadcast_to(np.asarray(scale, np.float64), upper.shape)
  noise = np.where(scale > 0, np.maximum(1e-5 * scale, 1e-3 * np.abs(upper)), 1e-2 * np.abs(upper))
  over = np.flatnonzero(lower_float32 > upper + noise)
  if not over.size:
    return
  i = int(over[0])
  x = np.asarray(witness, np.float64).reshape(upper.size, -1)[i]
  where = "" if upper.size == 1 else f" for {over.size} of {upper.size} boxes (box {i})"
  warnings.warn(
      f"{what}: at the witness {x.tolist()}, f and fq as they run in float32 differ by {float(lower_float32[i])!r}, "
      f"above the proven bound {float(upper[i])!r}{where}. The bound holds for the real-arithmetic networks; in "
      "float32 a rounding in fq (round(x / s)) lands on the other side of a tie there, a whole quantization "
      "step away. Inputs within a few ulps of fq's rounding ties can exceed the bound when the networks run "
      "in float32 (docs/concepts/soundness.md).", FloatTieWarning, stacklevel=4)


def certificate_values(what: str, lower, upper, *, warn: bool = True) -> None:
  """Checks the proven and reached errors of a certificate (one box or a batch) as they are built.

  An upper bound is never NaN: it would compare false with everything, so ``cert.proves(eps)``
  and every ``lower <= upper`` check would be silently wrong. A NaN reached error means no error is
  known at the witness. Both raise :class:`~qbound.errors.BoundOverflowError`. An infinite upper
  bound is sound (it proves nothing): a :class:`~qbound.errors.InfiniteBoundWarning` says why.

  Args:
    what: names the certificate in messages (``"certificate"``, ``"batch certificate"``).
    lower: reached error(s).
    upper: proven upper bound(s).
    warn: whether to warn for infinite upper bounds.
  """
  import warnings

  from qbound.errors import BoundOverflowError, InfiniteBoundWarning

  lower = np.asarray(lower, np.float64).reshape(-1)
  upper = np.asarray(upper, np.float64).reshape(-1)
  for name, values in (("upper bound", upper), ("reached error (lower)", lower)):
    if np.isnan(values).any():
      where = "" if values.size == 1 else f" for box {int(np.flatnonzero(np.isnan(values))[0])}"
      raise BoundOverflowError(
          f"{what}: the {name} is NaN{where}: a value overflowed while computing it. The inputs or weights "
          "are too large for float32; scale them down, shrink the box, or compute in float64 "
          "(jax.enable_x64(True)).")
  if warn and np.isinf(upper).any():
    count = "" if upper.size == 1 else f" for {int(np.isinf(upper).sum())} of {upper.size} boxes"
    warnings.warn(
        f"{what}: the proven upper bound is inf{count}: the bounds overflowed float32 (inputs or weights too "
        "large for it), so nothing is proved there. Scale the problem down, shrink the box, or compute in "
        "float64 (jax.enable_x64(True)).", InfiniteBoundWarning, stacklevel=5)
