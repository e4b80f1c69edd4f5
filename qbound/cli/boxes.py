"""The input box on the command line: ``--lower/--upper``, ``--center/--radius``, ``--box-npz``, the
model's declared range, or with ``--inputs`` a ball around every input of a file."""

from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

from qbound.cli.common import UsageError, parse_values


def add_box_arguments(command: argparse.ArgumentParser) -> None:
  box = command.add_argument_group("input box (one of the three forms; a single value applies to every input; "
                                   "negative values work as --lower -1,-1 or --lower=-1,-1)")
  box.add_argument("--lower", metavar="V,V,..", help="the box's lower corner")
  box.add_argument("--upper", metavar="V,V,..", help="the box's upper corner")
  box.add_argument("--center", metavar="V,V,..", help="the centre of an L-inf ball")
  box.add_argument("--radius", metavar="R", help="the L-inf ball's radius (or one per input, V,V,..)")
  box.add_argument("--box-npz", metavar="FILE", help="a .npz with arrays 'lower' and 'upper' "
                                                     "(or 'center' and 'radius') of the input's shape")


def declared_box(params: dict):
  """The model file's input range ``(mins, maxes)`` if it declares a finite one, else ``None``."""
  norm = params.get("normalisation") if isinstance(params, dict) else None
  if norm is None or "mins" not in norm or "maxes" not in norm:
    return None
  mins, maxes = np.asarray(norm["mins"], np.float64), np.asarray(norm["maxes"], np.float64)
  # NNet writers put +-FLT_MAX (or inf) where an input has no range: that is no box to certify over.
  limit = np.finfo(np.float32).max / 2
  if not (np.all(np.abs(mins) < limit) and np.all(np.abs(maxes) < limit)):
    return None
  return mins, maxes


def _model_name(args: argparse.Namespace) -> str:
  """The model file the box is for: ``certify``'s MODEL, or ``verify``'s first network F."""
  return getattr(args, "model", None) or getattr(args, "first", None) or "the model"


def build_box(args: argparse.Namespace, shape: Optional[tuple[int, ...]], params: dict):
  """The input box from the command line (or the model's declared range), checked against ``shape``."""
  forms = [name for name, given in (("--lower/--upper", args.lower is not None or args.upper is not None),
                                    ("--center/--radius", args.center is not None or args.radius is not None),
                                    ("--box-npz", args.box_npz is not None)) if given]
  if len(forms) > 1:
    raise UsageError(f"give the input box one way, not with both {forms[0]} and {forms[1]}.")
  if (args.lower is None) != (args.upper is None):
    raise UsageError("--lower and --upper go together: give both corners of the box.")
  if (args.center is None) != (args.radius is None):
    raise UsageError("--center and --radius go together: give the ball's centre and its radius.")

  if args.lower is not None:
    lower, upper = parse_values(args.lower, "--lower"), parse_values(args.upper, "--upper")
    if shape is None and lower.size != upper.size and 1 in (lower.size, upper.size):
      # A single value on one side spreads over as many inputs as the other side gives.
      shape = (max(lower.size, upper.size),)
    lower, upper = fit(lower, shape, "--lower"), fit(upper, shape, "--upper")
  elif args.center is not None:
    center = fit(parse_values(args.center, "--center"), shape, "--center")
    radius = fit(parse_values(args.radius, "--radius"), center.shape, "--radius")
    if np.any(radius < 0):
      raise UsageError(f"--radius must be >= 0, got {args.radius}.")
    lower, upper = center - radius, center + radius
  elif args.box_npz is not None:
    lower, upper = box_from_npz(args.box_npz)
  else:
    declared = declared_box(params)
    if declared is None:
      raise UsageError(f"{_model_name(args)} declares no finite input range, so there is no default box; give one "
                       "with --lower/--upper, --center/--radius or --box-npz.")
    lower, upper = declared

  if lower.shape != upper.shape:
    raise UsageError(f"the box's corners differ in size: lower has shape {lower.shape}, upper {upper.shape}.")
  if shape is not None and lower.shape != shape:
    raise UsageError(f"the box has shape {lower.shape} ({lower.size} values per corner) but {_model_name(args)} "
                     f"takes inputs of shape {shape} ({int(np.prod(shape))} values).")
  if np.any(lower > upper):
    i = tuple(int(k) for k in np.argwhere(lower > upper)[0])
    where = i[0] if len(i) == 1 else i
    raise UsageError(f"the box is empty: lower > upper at input {where} ({lower[i]:g} > {upper[i]:g}).")
  return float32_outward(lower, upper)


def float32_outward(lower: np.ndarray, upper: np.ndarray):
  """The box in float32, each corner rounded outward where the typed value has no float32 (55947.691
  is between two float32 numbers): the box certified holds every input asked for, as
  :func:`qbound.io.load_vnnlib`'s boxes do."""
  import qbound as qb

  big = float(np.finfo(np.float32).max)
  corners = []
  for option, corner, outward in (("lower", lower, -np.inf), ("upper", upper, np.inf)):
    corner = np.asarray(corner, np.float64)
    if np.any(np.abs(corner) > big):
      raise UsageError(f"the box's {option} corner has values beyond float32's range (+-{big:.4g}), which the "
                       "networks compute in.")
    corners.append(np.asarray(qb.box.round_outward(corner, np.float32, outward)))
  return qb.Box(lower=corners[0], upper=corners[1])


def fit(values: np.ndarray, shape: Optional[tuple[int, ...]], option: str) -> np.ndarray:
  """One value per input; a single value is repeated when the model's input shape is known."""
  if values.size == 1 and shape is not None:
    return np.full(shape, values[0])
  if shape is not None and values.size != int(np.prod(shape)):
    raise UsageError(f"{option} has {values.size} values but the model takes {int(np.prod(shape))} inputs "
                     f"(shape {shape}); give one value per input, or a single value for all.")
  return values.reshape(shape) if shape is not None else values


def box_from_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
  try:
    with open(path, "rb") as file:
      head = file.read(4)
  except FileNotFoundError:
    raise UsageError(f"--box-npz {path}: no such file.") from None
  except OSError as err:
    raise UsageError(f"--box-npz {path}: cannot be read ({err}).") from None
  if head != b"PK\x03\x04":  # (np.load would try it as pickled data and say so)
    raise UsageError(f"--box-npz {path}: not a NumPy .npz archive (a zip of arrays, as np.savez writes, with "
                     "'lower' and 'upper' or 'center' and 'radius').")
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: np.asarray(data[k], np.float64) for k in data.files}
  except FileNotFoundError:
    raise UsageError(f"--box-npz {path}: no such file.") from None
  except Exception as err:  # numpy raises ValueError, OSError, zipfile.BadZipFile, ... for bad files
    raise UsageError(f"--box-npz {path}: not a readable .npz file ({err}).") from None
  if {"lower", "upper"} <= arrays.keys():
    lower, upper = arrays["lower"], arrays["upper"]
  elif {"center", "radius"} <= arrays.keys():
    radius = arrays["radius"]
    if np.any(radius < 0):
      raise UsageError(f"--box-npz {path}: the radius must be >= 0.")
    lower, upper = arrays["center"] - radius, arrays["center"] + radius
  else:
    raise UsageError(f"--box-npz {path} must hold arrays 'lower' and 'upper' (or 'center' and 'radius'); "
                     f"it holds {sorted(arrays) or 'nothing'}.")
  for name, arr in (("lower", lower), ("upper", upper)):
    if not np.all(np.isfinite(arr)):
      raise UsageError(f"--box-npz {path}: the {name} corner has values that are not finite.")
  return lower, upper


def build_boxes(args: argparse.Namespace, shape: Optional[tuple[int, ...]]):
  """A batch of L-inf balls of ``--radius`` around the rows of ``--inputs`` (clipped to ``--clip``)."""
  for option, value in (("--lower", args.lower), ("--upper", args.upper), ("--center", args.center),
                        ("--box-npz", args.box_npz)):
    if value is not None:
      raise UsageError(f"--inputs certifies a ball around each input; it cannot be combined with {option}.")
  if args.radius is None:
    raise UsageError("--inputs needs --radius: the L-inf radius of the ball around each input.")
  x = inputs_from_file(args.inputs)
  n = x.shape[0]
  if shape is not None:
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
      raise UsageError(f"--inputs {args.inputs}: each input has shape {x.shape[1:]} ({int(np.prod(x.shape[1:]))} "
                       f"values) but {_model_name(args)} takes inputs of shape {shape} ({int(np.prod(shape))} values).")
    x = x.reshape((n, *shape))
  radius = fit(parse_values(args.radius, "--radius"), x.shape[1:], "--radius")
  if np.any(radius < 0):
    raise UsageError(f"--radius must be >= 0, got {args.radius}.")
  lower, upper = x - radius, x + radius
  if args.clip is not None:
    lo_hi = parse_values(args.clip, "--clip")
    if lo_hi.size != 2 or lo_hi[0] > lo_hi[1]:
      raise UsageError(f"--clip needs two numbers LO,HI with LO <= HI, got {args.clip!r}.")
    lower, upper = np.clip(lower, *lo_hi), np.clip(upper, *lo_hi)
    if np.any(x < lo_hi[0]) or np.any(x > lo_hi[1]):
      raise UsageError(f"--inputs {args.inputs}: some inputs lie outside --clip {args.clip}.")
  return float32_outward(lower, upper)


def inputs_from_file(path: str) -> np.ndarray:
  """The batch of inputs in a .npy or .npz file, as float64 with a leading batch axis."""
  try:
    data = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise UsageError(f"--inputs {path}: no such file.") from None
  except Exception as err:  # numpy raises ValueError, OSError, zipfile.BadZipFile, ... for bad files
    raise UsageError(f"--inputs {path}: not a readable .npy or .npz file ({err}).") from None
  if isinstance(data, np.lib.npyio.NpzFile):
    with data:
      names = list(data.files)
      if "inputs" in names:
        name = "inputs"
      elif len(names) == 1:
        name = names[0]
      else:
        raise UsageError(f"--inputs {path} holds {sorted(names) or 'nothing'}; name the batch 'inputs' "
                         "(or save a single array).")
      x = np.asarray(data[name])
  else:
    x = np.asarray(data)
  if x.ndim < 2 or x.shape[0] == 0 or not np.issubdtype(x.dtype, np.number):
    raise UsageError(f"--inputs {path}: need a numeric array of shape (n, *input_shape) with n >= 1, "
                     f"got shape {x.shape} and dtype {x.dtype}.")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise UsageError(f"--inputs {path}: some inputs are not finite.")
  return x
