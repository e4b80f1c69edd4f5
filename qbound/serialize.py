"""Certificates as JSON and back: strict JSON out, a clear error for anything else in.

Python's ``json`` writes ``inf`` and ``nan`` as the bare words ``Infinity`` and ``NaN``, which are
not JSON: most other readers (JavaScript's ``JSON.parse``, ``jq``, Go, Rust's serde) refuse the
whole file. A certificate can hold them (an upper bound that overflowed float32 is ``inf``, a
per-output bound of an output not asked about may be ``-inf``, ``lower_float32`` is NaN where f
and fq overflow in float32), so :func:`dumps` writes every non-finite number as one of the
strings ``"Infinity"``, ``"-Infinity"``, ``"NaN"`` (the convention of protobuf's JSON mapping)
and :func:`fields_from_dict` reads them back, along with the bare words older files may hold.

:func:`fields_from_dict` checks a dict against the fields of a certificate class before building
it: not an object, unknown or missing fields, and values of the wrong kind raise ``ValueError``
naming the field, what it holds and what it should hold.

Example:
  >>> from qbound import serialize
  >>> serialize.dumps({"upper": float("inf"), "diff_lower": [-float("inf"), 0.5]})
  '{"upper": "Infinity", "diff_lower": ["-Infinity", 0.5]}'
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import jax
import numpy as np

_NON_FINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}

# The kinds of value a field may hold (see fields_from_dict).
FLOAT, ARRAY, STRING, BOOL, FLOATS, ARRAYS, OBJECT = "float", "array", "string", "bool", "floats", "arrays", "object"
_DESCRIBE = {FLOAT: "a number", ARRAY: "a (nested) list of numbers", STRING: "a string", BOOL: "true or false",
             FLOATS: "an object of numbers", ARRAYS: "an object of lists of numbers", OBJECT: "an object"}


def plain(value: Any) -> Any:
  """``value`` with arrays as nested lists and numpy scalars as Python numbers (dicts recursively)."""
  if isinstance(value, Mapping):
    return {str(k): plain(v) for k, v in value.items()}
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    return np.asarray(value).tolist()
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  return value


def _encode(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
  if isinstance(value, dict):
    return {k: _encode(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_encode(v) for v in value]
  return value


def dumps(data: Mapping[str, Any], **kwargs) -> str:
  """``data`` (arrays allowed) as strict JSON, non-finite numbers as strings; ``kwargs`` go to ``json.dumps``."""
  return json.dumps(_encode(plain(data)), allow_nan=False, **kwargs)


def loads(text: Any, what: str) -> Any:
  """``json.loads(text)``, with a ``ValueError`` saying it is not JSON (or not text) otherwise."""
  if not isinstance(text, (str, bytes, bytearray)):
    raise TypeError(f"{what} JSON must be a str (e.g. the text of a .json file); got {type(text).__name__}. "
                    "For a dict use from_dict.")
  try:
    return json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f"not a {what}: the text is not JSON ({err}).") from None
  except UnicodeDecodeError as err:
    raise ValueError(f"not a {what}: the bytes are not UTF-8 text ({err}).") from None


def _float(value: Any) -> float:
  if isinstance(value, str) and value in _NON_FINITE:
    return _NON_FINITE[value]
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError
  return float(value)


def _nested(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return [_nested(v) for v in value]
  return _float(value)


def _array(value: Any) -> np.ndarray:
  if isinstance(value, (np.ndarray, jax.Array)):
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
      raise TypeError
    return array.astype(np.float64)
  if not isinstance(value, (list, tuple, int, float)) or isinstance(value, bool):
    raise TypeError
  try:
    return np.asarray(_nested(value), np.float64)
  except ValueError:  # ragged nesting
    raise TypeError from None


def _convert(kind: str, value: Any) -> Any:
  """``value`` read as ``kind``, or TypeError."""
  if kind == FLOAT:
    return _float(value)
  if kind == ARRAY:
    return _array(value)
  if kind == STRING:
    if not isinstance(value, str):
      raise TypeError
    return value
  if kind == BOOL:
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError
    return bool(value)
  if kind in (FLOATS, ARRAYS, OBJECT):
    if not isinstance(value, Mapping):
      raise TypeError
    if kind == OBJECT:
      return dict(value)
    convert = _float if kind == FLOATS else _array
    return {str(k): convert(v) for k, v in value.items()}
  raise AssertionError(kind)  # pragma: no cover


def _kind_of(value: Any) -> str:
  """How a message describes a JSON value: its kind, and for lists what is wrong inside."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, str):
    return f"the string {value if len(value) <= 40 else value[:37] + '...'!r}"
  if isinstance(value, Mapping):
    return "an object"
  if isinstance(value, (list, tuple)):
    bad = _first_bad(value)
    if bad is not None:
      return "a list holding " + _kind_of(bad[0])
    return "a ragged nested list (rows of different lengths)" if _ragged(value) else "a list"
  return f"{type(value).__name__} {value!r}"


def _first_bad(value: Any) -> Any:
  """``(entry,)`` for the first entry of a nested list that is not a number, or None."""
  for v in value:
    if isinstance(v, (list, tuple)):
      bad = _first_bad(v)
      if bad is not None:
        return bad
      continue
    try:
      _float(v)
    except TypeError:
      return (v,)
  return None


def _ragged(value: Any) -> bool:
  try:
    np.asarray(_nested(value), np.float64)
  except (TypeError, ValueError):
    return True
  return False


def fields_from_dict(cls, data: Any, kinds: Mapping[str, str], what: str) -> dict[str, Any]:
  """The fields of the dataclass ``cls`` read back from its ``to_dict`` (or parsed JSON) form.

  Args:
    cls: the dataclass (:class:`~qbound.Certificate`, :class:`~qbound.BatchCertificate`).
    data: what was read.
    kinds: the kind of every field (``FLOAT``, ``ARRAY``, ...); fields with a default may be
      missing or null (None), the others must be there.
    what: the name of the thing, for messages (``"qbound certificate"``).

  Returns:
    The keyword arguments for ``cls``: numbers as floats (non-finite strings decoded), arrays as
    float64 arrays.

  Raises:
    ValueError: ``data`` is not a dict, has unknown or missing fields, or a field holds a value of
      the wrong kind; the message names the field, what it holds and what it should hold.
  """
  if not isinstance(data, Mapping):
    raise ValueError(f"not a {what}: expected a JSON object of fields, got {_kind_of(data)}.")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = set(data) - set(fields)
  if unknown:
    raise ValueError(f"not a {what}: unknown fields {sorted(map(str, unknown))} (a {what} has "
                     f"{', '.join(fields)}).")
  required = [name for name, f in fields.items()
              if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  missing = [name for name in required if name not in data]
  if missing:
    raise ValueError(f"not a {what}: missing fields {missing} (a {what} needs {', '.join(required)}).")
  out = {}
  for name, value in data.items():
    if value is None and name not in required:
      if fields[name].default is None:
        out[name] = None
      # else null stands for the default (bounds={}, sound=True): leave it to the dataclass.
      continue
    try:
      out[name] = _convert(kinds[name], value)
    except TypeError:
      raise ValueError(f"not a {what}: field {name!r} must be {_DESCRIBE[kinds[name]]}, got "
                       f"{_kind_of(value)}.") from None
  return out
