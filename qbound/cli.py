"""The ``qbound`` command line.

``qbound demo`` runs :func:`qbound.demo.run_demo`; ``qbound certify MODEL`` certifies the maximal
error between a model file and its uniformly quantized copy (or a second model file given with
``--compare``) over an input box, and prints a summary or the certificate as JSON; ``qbound export
MODEL`` writes their merged difference network as ONNX and the property "error <= epsilon over the
box" as VNN-LIB, for other verifiers (:func:`qbound.io.export_property`)::

    qbound certify net.nnet --bits 4 --center 0.1,0.2,0.3 --radius 0.01
    qbound certify net.nnet --compare net_fp16.nnet --lower 0,0,0 --upper 1,1,1 --json
    qbound certify net.nnet --compare net_fp16.nnet --inputs images.npz --radius 0.0118 --clip 0,1
    qbound export net.nnet --compare net_fp16.nnet --lower 0,0,0 --upper 1,1,1 --epsilon 0.05 --out prop/

With ``--inputs``, ``certify`` certifies an L-inf ball around every input of a file in one
:func:`qbound.certify_batch` call (vmapped, split over every device, chunked to memory).

Mistakes in the command line or its files (a missing file, a box of the wrong size, lower > upper)
print ``qbound: error: <message>`` on stderr and exit with status 2, without a traceback: they
are the user's to fix. Anything else propagates with its traceback, because it is a bug to report.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import sys
from typing import Callable, Optional, Sequence

import numpy as np

USAGE_ERROR = 2
_MODEL_SUFFIXES = (".nnet", ".onnx")


class UsageError(Exception):
  """A mistake the user can fix; ``main`` prints it as ``qbound: error: <message>`` and returns 2."""


@contextlib.contextmanager
def _bad_input_is_usage_error():
  """qbound's ValueErrors (empty boxes, mismatched shapes, unsupported layers) are the user's to fix.
  A :class:`qbound.SoundnessError` is an AssertionError, a bug in qbound: it keeps its traceback."""
  try:
    yield
  except ValueError as err:
    raise UsageError(str(err)) from None


class _Parser(argparse.ArgumentParser):
  """argparse, but its errors go through ``main``'s one error path (same prefix, same exit status)."""

  def error(self, message: str):
    raise UsageError(f"{message} (see '{self.prog} --help')")


# ---------------------------------------------------------------------------------------------- parsing


def parse_values(text: str, option: str) -> np.ndarray:
  """A comma-separated list of numbers as a float array, or a ``UsageError`` naming ``option``.

  Example:
    >>> parse_values("0, 0.5,1e-2,", "--lower").tolist()
    [0.0, 0.5, 0.01]
  """
  tokens = [t.strip() for t in text.split(",") if t.strip()]
  if not tokens:
    raise UsageError(f"{option} needs comma-separated numbers, e.g. {option} 0,0.5,1; got {text!r}.")
  try:
    values = np.array([float(t) for t in tokens], np.float64)
  except ValueError:
    bad = next(t for t in tokens if not _is_number(t))
    raise UsageError(f"{option}: {bad!r} is not a number.") from None
  if not np.all(np.isfinite(values)):
    raise UsageError(f"{option}: every value must be finite, got {text!r}.")
  return values


def _is_number(token: str) -> bool:
  try:
    float(token)
  except ValueError:
    return False
  return True


def build_parser() -> argparse.ArgumentParser:
  """The ``qbound`` argument parser with its ``demo``, ``certify`` and ``export`` subcommands."""
  from qbound.certify import METHODS
  from qbound.demo import DEFAULT_RADIUS

  parser = _Parser(prog="qbound", description="Formal bounds on the error of quantized neural networks.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  demo = commands.add_parser("demo", help="certify a bundled digits MLP against its 8/6/4-bit copies",
                             description="Certify the bundled digits MLP against its weight-quantized "
                                         "copies over an L-inf ball around a test image.")
  demo.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4], help="bit widths (default: 8 6 4)")
  demo.add_argument("--radius", type=float, default=DEFAULT_RADIUS,
                    help=f"L-inf radius in pixel units, pixels in [0, 1] (default: {DEFAULT_RADIUS})")
  demo.add_argument("--image", type=int, default=0, help="which bundled test image, 0 to 19 (default: 0)")
  demo.add_argument("--method", choices=METHODS, default="auto", help="upper-bound method (default: auto)")
  demo.add_argument("--seed", type=int, default=0, help="seed of the lower-bound search (default: 0)")
  demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  demo.set_defaults(run=_run_demo)

  cert = commands.add_parser(
      "certify", help="certify the error between a model file and its quantized copy",
      description="Certify max_x |f(x) - f_q(x)|_inf over an input box, where f is MODEL and f_q its "
                  "uniformly quantized copy (or the model in --compare). Without a box option the box "
                  "is the input range declared in the model file.")
  _add_model_arguments(cert)
  many = cert.add_argument_group("many inputs at once (qbound.certify_batch): a ball of --radius around each")
  many.add_argument("--inputs", metavar="FILE", help="a .npy, or a .npz with an array 'inputs' (or a single "
                                                     "array), of shape (n, *input_shape) or (n, input_size)")
  many.add_argument("--clip", metavar="LO,HI", help="intersect every ball with [LO, HI] (e.g. 0,1 for pixels)")
  many.add_argument("--memory-budget", metavar="BYTES", help="bytes per device for one chunk of inputs, "
                                                             "e.g. 4GiB (default: half the device's memory)")
  many.add_argument("--devices", type=int, metavar="N", help="use the first N devices (default: all)")
  cert.add_argument("--method", choices=METHODS, default="auto", help="upper-bound method (default: auto)")
  cert.add_argument("--seed", type=int, default=0, help="seed of the lower-bound search (default: 0)")
  cert.add_argument("--json", action="store_true", help="print the certificate as JSON")
  cert.add_argument("--output", metavar="FILE", help="also write the certificate as JSON to FILE")
  cert.set_defaults(run=_run_certify)

  export = commands.add_parser(
      "export", help="write the merged network f - f_q as ONNX and 'error <= epsilon' as VNN-LIB",
      description="Write the merged difference network g = f - f_q (f is MODEL, f_q its uniformly "
                  "quantized copy or the model in --compare) to OUT/merged.onnx, and the property "
                  "'|g_j(x)| <= epsilon for every x in the box' to OUT/property.vnnlib, in the form "
                  "VNN-COMP verifiers (alpha-beta-CROWN, Marabou, NNV) read. A verifier's 'unsat' "
                  "proves |g_j(x)| < epsilon on the whole box. Without a box option the box is the "
                  "input range declared in the model file.")
  _add_model_arguments(export)
  export.add_argument("--epsilon", metavar="E", required=True,
                      help="the error bound to check, e.g. the 'upper' of 'qbound certify --json'")
  export.add_argument("--outputs", metavar="J,J,..", help="flat indices of the outputs to check "
                                                          "(default: all)")
  export.add_argument("--out", metavar="DIR", required=True,
                      help="directory to write merged.onnx and property.vnnlib to (created if missing)")
  export.set_defaults(run=_run_export)
  return parser


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
  """MODEL, how to get f_q from it (quantizer options or --compare), and the input box."""
  command.add_argument("model", metavar="MODEL", help="the model file (.nnet, or .onnx with qbound[onnx])")
  quant = command.add_argument_group("quantization of MODEL's weights (kernels and biases)")
  quant.add_argument("--bits", type=int, default=None, help="bit width of the uniform quantizer (default: 8)")
  quant.add_argument("--per-channel", action="store_true", help="one scale per output channel")
  quant.add_argument("--asymmetric", action="store_true", help="min-max range with a zero point")
  command.add_argument("--compare", metavar="OTHER", help="a second model file to compare MODEL with, "
                                                          "instead of quantizing it")
  box = command.add_argument_group("input box (one of the three forms; a single value applies to every input)")
  box.add_argument("--lower", metavar="V,V,..", help="the box's lower corner")
  box.add_argument("--upper", metavar="V,V,..", help="the box's upper corner")
  box.add_argument("--center", metavar="V,V,..", help="the centre of an L-inf ball")
  box.add_argument("--radius", metavar="R", help="the L-inf ball's radius (or one per input, V,V,..)")
  box.add_argument("--box-npz", metavar="FILE", help="a .npz with arrays 'lower' and 'upper' "
                                                     "(or 'center' and 'radius') of the input's shape")


# ----------------------------------------------------------------------------------------------- models


def load_model(path: str) -> tuple[Callable, dict]:
  """``(apply, params)`` of a model file, chosen by its suffix; ``UsageError`` if it cannot be read."""
  from qbound import io

  suffix = pathlib.Path(path).suffix.lower()
  loaders = {".nnet": io.load_nnet}
  if hasattr(io, "load_onnx"):
    loaders[".onnx"] = io.load_onnx
  if suffix not in loaders:
    raise UsageError(f"{path}: unknown model format {suffix or '(no suffix)'!r}; qbound reads "
                     f"{' and '.join(sorted(loaders))} files.")
  if not pathlib.Path(path).is_file():
    raise UsageError(f"{path}: no such file.")
  try:
    return loaders[suffix](path)
  except UnicodeDecodeError:
    raise UsageError(f"{path}: not a text NNet file (it holds bytes that are not UTF-8).") from None
  except (ValueError, OSError, ImportError) as err:
    message = str(err)
    raise UsageError(message if path in message else f"{path}: {message}") from None


def declared_input_shape(params: dict) -> Optional[tuple[int, ...]]:
  """The input shape a loaded model declares in its params (NNet files do), else ``None``."""
  norm = params.get("normalisation") if isinstance(params, dict) else None
  return None if norm is None or "mins" not in norm else tuple(np.shape(norm["mins"]))


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


def _output_shape(name: str, f: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The output shape of ``f`` on an input of ``shape``; ``UsageError`` if it does not take one."""
  import jax

  try:
    out = jax.eval_shape(f, jax.ShapeDtypeStruct(shape, np.float32))
  except (ValueError, TypeError) as err:
    # The loaders' hint to vmap a batch is for Python callers; on the command line it misleads.
    reason = str(err).split("; use jax.vmap")[0]
    raise UsageError(f"{name} does not take an input of shape {shape} (the box's shape): {reason}") from None
  if not hasattr(out, "shape"):
    raise UsageError(f"{name} has several outputs; qbound certifies models with one output.")
  return tuple(out.shape)


# -------------------------------------------------------------------------------------------------- box


def build_box(args: argparse.Namespace, shape: Optional[tuple[int, ...]], params: dict):
  """The input box from the command line (or the model's declared range), checked against ``shape``."""
  import qbound as qb

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
    lower, upper = _fit(lower, shape, "--lower"), _fit(upper, shape, "--upper")
  elif args.center is not None:
    center = _fit(parse_values(args.center, "--center"), shape, "--center")
    radius = _fit(parse_values(args.radius, "--radius"), center.shape, "--radius")
    if np.any(radius < 0):
      raise UsageError(f"--radius must be >= 0, got {args.radius}.")
    lower, upper = center - radius, center + radius
  elif args.box_npz is not None:
    lower, upper = _box_from_npz(args.box_npz)
  else:
    declared = declared_box(params)
    if declared is None:
      raise UsageError(f"{args.model} declares no finite input range, so there is no default box; give one "
                       "with --lower/--upper, --center/--radius or --box-npz.")
    lower, upper = declared

  if lower.shape != upper.shape:
    raise UsageError(f"the box's corners differ in size: lower has shape {lower.shape}, upper {upper.shape}.")
  if shape is not None and lower.shape != shape:
    raise UsageError(f"the box has shape {lower.shape} ({lower.size} values per corner) but {args.model} "
                     f"takes inputs of shape {shape} ({int(np.prod(shape))} values).")
  if np.any(lower > upper):
    i = tuple(int(k) for k in np.argwhere(lower > upper)[0])
    where = i[0] if len(i) == 1 else i
    raise UsageError(f"the box is empty: lower > upper at input {where} ({lower[i]:g} > {upper[i]:g}).")
  return qb.Box(lower=np.asarray(lower, np.float32), upper=np.asarray(upper, np.float32))


def _fit(values: np.ndarray, shape: Optional[tuple[int, ...]], option: str) -> np.ndarray:
  """One value per input; a single value is repeated when the model's input shape is known."""
  if values.size == 1 and shape is not None:
    return np.full(shape, values[0])
  if shape is not None and values.size != int(np.prod(shape)):
    raise UsageError(f"{option} has {values.size} values but the model takes {int(np.prod(shape))} inputs "
                     f"(shape {shape}); give one value per input, or a single value for all.")
  return values.reshape(shape) if shape is not None else values


def _box_from_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
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


# --------------------------------------------------------------------------------------------- commands


def _run_demo(args: argparse.Namespace, out) -> int:
  from qbound.demo import run_demo

  try:
    run_demo(bits=args.bits, radius=args.radius, image=args.image, method=args.method,
             progress=not args.no_progress, seed=args.seed, file=out)
  except ValueError as err:
    raise UsageError(str(err)) from None
  return 0


def _run_certify(args: argparse.Namespace, out) -> int:
  import jax

  import qbound as qb

  _check_compressor_options(args)
  # Checked before certifying, so a typo in the path does not throw away a long computation.
  if args.output is not None and pathlib.Path(args.output).is_dir():
    raise UsageError(f"--output {args.output} is a directory; give a file name.")
  if args.output is not None and not pathlib.Path(args.output).resolve().parent.is_dir():
    raise UsageError(f"--output {args.output}: the directory {pathlib.Path(args.output).parent} does not exist.")

  for option, value in (("--clip", args.clip), ("--memory-budget", args.memory_budget), ("--devices", args.devices)):
    if value is not None and args.inputs is None:
      raise UsageError(f"{option} applies to many inputs at once: use it with --inputs FILE --radius R.")

  f, fq, box, against, boxes = _networks_and_box(args)
  if boxes is not None:
    return _run_certify_batch(args, f, fq, boxes, against, out)
  with _bad_input_is_usage_error():
    cert = qb.certify(f, fq, box, method=args.method, key=jax.random.key(args.seed))

  _write_output(args.output, cert.to_json(indent=2))
  if args.json:
    print(cert.to_json(indent=2), file=out)
  else:
    print(summary(cert, args.model, against, args.output), file=out)
  return 0


def _write_output(path: Optional[str], text: str) -> None:
  """Writes ``text`` (a certificate's JSON) to ``--output`` when it was given."""
  if path is None:
    return
  try:
    pathlib.Path(path).write_text(text + "\n", encoding="utf-8")
  except OSError as err:
    raise UsageError(f"--output {path}: cannot write it ({err.strerror or err}).") from None


def _check_compressor_options(args: argparse.Namespace) -> None:
  quantizing = args.bits is not None or args.per_channel or args.asymmetric
  if args.compare is not None and quantizing:
    raise UsageError("--bits, --per-channel and --asymmetric quantize MODEL, so they cannot be used with "
                     "--compare, which compares MODEL with another file as it is.")


def _networks_and_box(args: argparse.Namespace):
  """``(f, f_q, box, description of f_q, boxes)`` from MODEL, --compare or the quantizer options, the box,
  and with --inputs the batch of boxes (``box`` is then its first; ``boxes`` is None without --inputs)."""
  import qbound as qb

  apply, params = load_model(args.model)
  shape = declared_input_shape(params)
  boxes = build_boxes(args, shape) if getattr(args, "inputs", None) is not None else None
  box = build_box(args, shape, params) if boxes is None else qb.box.box_at(boxes, 0)
  f = functools.partial(apply, params)
  out_shape = _output_shape(args.model, f, box.shape)

  if args.compare is not None:
    apply_q, params_q = load_model(args.compare)
    other_shape = declared_input_shape(params_q)
    if other_shape is not None and other_shape != box.shape:
      raise UsageError(f"{args.model} takes inputs of shape {box.shape} but {args.compare} takes {other_shape}; "
                       "compared models must have the same inputs.")
    fq = functools.partial(apply_q, params_q)
    other_out = _output_shape(args.compare, fq, box.shape)
    if other_out != out_shape:
      raise UsageError(f"{args.model} has outputs of shape {out_shape} but {args.compare} has {other_out}; "
                       "compared models must have the same outputs.")
    against = args.compare
  else:
    bits = 8 if args.bits is None else args.bits
    try:
      qweights = qb.quantize.uniform(params["params"], bits=bits, per_channel=args.per_channel,
                                     symmetric=not args.asymmetric)
    except ValueError as err:
      raise UsageError(f"--bits: {err}") from None
    # Only params['params'] holds weights; the rest (input normalisation, ...) is the interface.
    fq = functools.partial(apply, dict(params, params=qweights))
    against = (f"its {bits}-bit copy (uniform, {'asymmetric' if args.asymmetric else 'symmetric'}, "
               f"{'per channel' if args.per_channel else 'per tensor'})")
  return f, fq, box, against, boxes


def _run_export(args: argparse.Namespace, out) -> int:
  import qbound as qb

  _check_compressor_options(args)
  epsilon = parse_values(args.epsilon, "--epsilon")
  if epsilon.size != 1 or epsilon[0] < 0:
    raise UsageError(f"--epsilon needs one number >= 0, got {args.epsilon!r}.")
  epsilon = float(epsilon[0])
  outputs = None
  if args.outputs is not None:
    values = parse_values(args.outputs, "--outputs")
    if np.any(values != np.round(values)) or np.any(values < 0):
      raise UsageError(f"--outputs takes output indices (integers >= 0), got {args.outputs!r}.")
    outputs = [int(v) for v in values]
  directory = pathlib.Path(args.out)
  if directory.exists() and not directory.is_dir():
    raise UsageError(f"--out {args.out} is a file; give a directory.")

  f, fq, box, against, _ = _networks_and_box(args)
  try:
    merged = qb.merge(f, fq, box)
    onnx_path, vnnlib_path = qb.io.export_property(
        merged, box, directory, epsilon=epsilon, outputs=outputs,
        comment=f"f: {args.model}\nf_q: {args.compare if args.compare is not None else against}")
  except (ValueError, ImportError) as err:
    raise UsageError(str(err)) from None
  except OSError as err:
    raise UsageError(f"--out {args.out}: cannot write there ({err.strerror or err}).") from None
  chosen = [] if outputs is None else sorted(set(outputs))
  checked = ("all outputs" if outputs is None else
             ("output " if len(chosen) == 1 else "outputs ") + ", ".join(map(str, chosen)))
  print("\n".join([
      f"model:        {args.model}",
      f"compared to:  {against}",
      f"network:      {onnx_path}   (g = f - f_q, input {box.shape} with a batch axis of 1 in front)",
      f"property:     {vnnlib_path}   (|g_j| <= {epsilon:.9g} over the box, {checked})",
      "check it:     abcrown.py --onnx_path " + str(onnx_path) + " --vnnlib_path " + str(vnnlib_path),
      "              'unsat' (safe) proves the bound; 'sat' (unsafe) comes with an input where it fails.",
  ]), file=out)
  return 0


def build_boxes(args: argparse.Namespace, shape: Optional[tuple[int, ...]]):
  """A batch of L-inf balls of ``--radius`` around the rows of ``--inputs`` (clipped to ``--clip``)."""
  import qbound as qb

  for option, value in (("--lower", args.lower), ("--upper", args.upper), ("--center", args.center),
                        ("--box-npz", args.box_npz)):
    if value is not None:
      raise UsageError(f"--inputs certifies a ball around each input; it cannot be combined with {option}.")
  if args.radius is None:
    raise UsageError("--inputs needs --radius: the L-inf radius of the ball around each input.")
  x = _inputs_from_file(args.inputs)
  n = x.shape[0]
  if shape is not None:
    if int(np.prod(x.shape[1:])) != int(np.prod(shape)):
      raise UsageError(f"--inputs {args.inputs}: each input has shape {x.shape[1:]} ({int(np.prod(x.shape[1:]))} "
                       f"values) but {args.model} takes inputs of shape {shape} ({int(np.prod(shape))} values).")
    x = x.reshape((n, *shape))
  radius = _fit(parse_values(args.radius, "--radius"), x.shape[1:], "--radius")
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
  return qb.Box(lower=np.asarray(lower, np.float32), upper=np.asarray(upper, np.float32))


def _inputs_from_file(path: str) -> np.ndarray:
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


def parse_bytes(text: str) -> float:
  """``4GiB``, ``512MiB``, ``1e9`` or ``inf`` as a number of bytes.

  Example:
    >>> parse_bytes("4GiB"), parse_bytes("1.5e9")
    (4294967296.0, 1500000000.0)
  """
  units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
  t = text.strip().lower()
  scale = 1.0
  for unit, size in units.items():
    if t.endswith(unit):
      t, scale = t[: -len(unit)].strip(), size
      break
  try:
    value = float(t) * scale
  except ValueError:
    raise UsageError(f"--memory-budget: {text!r} is not a number of bytes (e.g. 4GiB, 512MiB, 1e9).") from None
  if not value > 0:
    raise UsageError(f"--memory-budget must be positive, got {text!r}.")
  return value


def _run_certify_batch(args: argparse.Namespace, f, fq, boxes, against: str, out) -> int:
  import jax

  import qbound as qb

  method = args.method
  if method == "auto":  # auto adapts per box; in a batch, the tightest one-shot bound that applies
    method = "diff" if qb.merge(f, fq, qb.box.box_at(boxes, 0)).paired else "crown"
  budget = None if args.memory_budget is None else parse_bytes(args.memory_budget)
  devices = None
  if args.devices is not None:
    if not 1 <= args.devices <= len(jax.devices()):
      raise UsageError(f"--devices must be between 1 and {len(jax.devices())} (the devices jax sees), got {args.devices}.")
    devices = jax.devices()[: args.devices]
  with _bad_input_is_usage_error():
    batch = qb.certify_batch(f, fq, boxes, method=method, key=jax.random.key(args.seed), devices=devices,
                             memory_budget=budget, progress=not args.json)
  _write_output(args.output, batch.to_json())
  if args.json:
    print(batch.to_json(), file=out)
  else:
    print(batch_summary(batch, args.model, against, args.inputs, args.output), file=out)
  return 0


def batch_summary(batch, model: str, against: str, inputs: str, output: Optional[str] = None,
                  rows: int = 20) -> str:
  """A human-readable account of a batch of certificates (the first ``rows`` inputs, then totals)."""
  n = len(batch)
  width = np.asarray(batch.box_upper) - np.asarray(batch.box_lower)
  lines = [
      f"model:        {model}",
      f"compared to:  {against}",
      f"inputs:       {n} from {inputs}, boxes of widths {width.min():.6g} to {width.max():.6g}",
      f"method:       {batch.method} on {batch.layout.get('devices', 1)} device(s), {batch.layout.get('chunk')} "
      "inputs per compiled call" + ("" if batch.layout.get("row_chunk") is None
                                    else f", {batch.layout['row_chunk']} backward rows per block"),
      "max error |f(x) - f_q(x)|_inf over each box:",
      f"{'input':>7}  {'proven upper':>13}  {'reached lower':>13}  {'gap':>7}",
  ]
  for i in range(min(n, rows)):
    lines.append(f"{i:>7}  {batch.upper[i]:>13.6g}  {batch.lower[i]:>13.6g}  {batch.gap[i]:>7.4g}")
  if n > rows:
    lines.append(f"{'...':>7}  ({n - rows} more; --json or --output for all)")
  worst = int(np.argmax(batch.upper))
  lines += [
      f"proven upper: median {np.median(batch.upper):.6g}, max {batch.upper[worst]:.6g} (input {worst})",
      f"reached lower: max {np.max(batch.lower):.6g}",
      f"time:         {batch.total_seconds:.2f} s ({batch.compile_seconds:.2f} s compiling, "
      f"{np.mean(batch.seconds):.4f} s per input after)" + ("" if batch.sound else " (unsound mode)"),
  ]
  if output is not None:
    lines.append(f"certificates written to {output}")
  return "\n".join(lines)


def summary(cert, model: str, against: str, output: Optional[str] = None) -> str:
  """A human-readable account of a certificate."""
  lower, upper = np.asarray(cert.box_lower), np.asarray(cert.box_upper)
  width = upper - lower
  methods = ", ".join(f"{name} {value:.6g}" for name, value in cert.bounds.items())
  lines = [
      f"model:        {model}",
      f"compared to:  {against}",
      f"input box:    {lower.size} inputs, widths {width.min():.6g} to {width.max():.6g}"
      + (f"\n              lower {_vector(lower)}\n              upper {_vector(upper)}" if lower.size <= 8 else ""),
      "max error |f(x) - f_q(x)|_inf over the box:",
      f"  proven upper bound   {cert.upper:.6g}   (tightest: {cert.method}; {methods})",
      f"  reached lower bound  {cert.lower:.6g}   (at the witness input)",
      f"  gap upper / lower    {cert.gap:.4g}",
  ]
  if lower.size <= 8:
    lines.append(f"witness:      {_vector(cert.witness)}")
  lines.append(f"time:         {cert.seconds:.2f} s" + ("" if cert.sound else " (unsound mode)"))
  if output is not None:
    lines.append(f"certificate written to {output}")
  return "\n".join(lines)


def _vector(x) -> str:
  return np.array2string(np.asarray(x, np.float64).reshape(-1), precision=6, separator=", ", max_line_width=200)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``qbound`` with ``argv`` (``sys.argv[1:]`` when omitted); returns the exit status.

  Example:
    >>> main(["certify", "no_such_model.nnet"])
    2
  """
  try:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, sys.stdout)
  except UsageError as err:
    print(f"qbound: error: {err}", file=sys.stderr)
    return USAGE_ERROR
  except SystemExit as exit_:  # --help and --version exit through argparse
    return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else USAGE_ERROR)


if __name__ == "__main__":
  sys.exit(main())
