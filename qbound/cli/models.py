"""Model files on the command line: loading them, their declared inputs, and the pair (f, f_q).

``MODEL`` is a ``.nnet`` or ``.onnx`` file; ``f_q`` is its uniformly quantized copy (``--bits``,
``--per-channel``, ``--asymmetric``) or a second file (``--compare``).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
from typing import Callable, Optional

import numpy as np

from qbound.cli import boxes
from qbound.cli.common import UsageError, log


def add_model_arguments(command: argparse.ArgumentParser) -> None:
  """MODEL, how to get f_q from it (quantizer options or --compare), and the input box."""
  command.add_argument("model", metavar="MODEL", help="the model file (.nnet, or .onnx with qbound[onnx])")
  quant = command.add_argument_group("quantization of MODEL's weights (kernels and biases)")
  quant.add_argument("--bits", type=int, default=None, help="bit width of the uniform quantizer (default: 8)")
  quant.add_argument("--per-channel", action="store_true", help="one scale per output channel")
  quant.add_argument("--asymmetric", action="store_true", help="min-max range with a zero point")
  command.add_argument("--compare", metavar="OTHER", help="a second model file to compare MODEL with, "
                                                          "instead of quantizing it")
  boxes.add_box_arguments(command)


def load_model(path: str, *, logits: bool = False) -> tuple[Callable, dict]:
  """``(apply, params)`` of a model file, chosen by its suffix; ``UsageError`` if it cannot be read.
  ``logits``: an ONNX model's trailing Softmax/LogSoftmax is left out (``load_onnx(logits=True)``)."""
  from qbound import io

  suffix = pathlib.Path(path).suffix.lower()
  loaders = {".nnet": io.load_nnet}
  if hasattr(io, "load_onnx"):
    loaders[".onnx"] = functools.partial(io.load_onnx, logits=logits)
  if suffix not in loaders:
    raise UsageError(f"{path}: unknown model format {suffix or '(no suffix)'!r}; qbound reads "
                     f"{' and '.join(sorted(loaders))} files.")
  if not pathlib.Path(path).is_file():
    raise UsageError(f"{path}: no such file.")
  try:
    return loaders[suffix](path)
  except UnicodeDecodeError:  # the loaders say so themselves now; kept for other readers
    raise UsageError(f"{path}: not a text NNet file (it holds bytes that are not UTF-8).") from None
  except (ValueError, OSError, ImportError) as err:
    message = str(err)
    raise UsageError(message if path in message else f"{path}: {message}") from None


def declared_input_shape(params: dict, apply: Optional[Callable] = None) -> Optional[tuple[int, ...]]:
  """The input shape a loaded model declares, else ``None``: NNet files in their normalisation
  constants, ONNX files in their graph's input (``apply.input_shape``, when every size is known)."""
  norm = params.get("normalisation") if isinstance(params, dict) else None
  if norm is not None and "mins" in norm:
    return tuple(np.shape(norm["mins"]))
  shape = getattr(apply, "input_shape", None)
  if shape is not None and all(isinstance(d, int) and d > 0 for d in shape):
    return tuple(shape)
  return None


def output_shape(name: str, f: Callable, shape: tuple[int, ...], declared: bool = True) -> tuple[int, ...]:
  """The output shape of ``f`` on an input of ``shape``; ``UsageError`` if it does not take one."""
  import jax

  try:
    out = jax.eval_shape(f, jax.ShapeDtypeStruct(shape, np.float32))
  except (ValueError, TypeError) as err:
    # The loaders' hint to vmap a batch is for Python callers; on the command line it misleads.
    reason = str(err).split("; use jax.vmap")[0]
    hint = ""
    if not declared and int(np.prod(shape)) == 1:
      hint = (f" ({name} does not declare its input shape, so a single box value cannot be spread over its "
              "inputs: give one value per input)")
    raise UsageError(f"{name} does not take an input of shape {shape} (the box's shape): {reason}{hint}") from None
  if not hasattr(out, "shape"):
    raise UsageError(f"{name} has several outputs; qbound certifies models with one output.")
  return tuple(out.shape)


def check_compressor_options(args: argparse.Namespace) -> None:
  quantizing = args.bits is not None or args.per_channel or args.asymmetric
  if args.compare is not None and quantizing:
    raise UsageError("--bits, --per-channel and --asymmetric quantize MODEL, so they cannot be used with "
                     "--compare, which compares MODEL with another file as it is.")


def networks_and_box(args: argparse.Namespace):
  """``(f, f_q, box, description of f_q, boxes)`` from MODEL, --compare or the quantizer options, the box,
  and with --inputs the batch of boxes (``box`` is then its first; ``boxes`` is None without --inputs)."""
  import qbound as qb

  apply, params = load_model(args.model)
  shape = declared_input_shape(params, apply)
  log.info("%s: input shape %s", args.model, "not declared" if shape is None else shape)
  batch = boxes.build_boxes(args, shape) if getattr(args, "inputs", None) is not None else None
  box = boxes.build_box(args, shape, params) if batch is None else qb.box.box_at(batch, 0)
  f = functools.partial(apply, params)
  out_shape = output_shape(args.model, f, box.shape, declared=shape is not None)

  if args.compare is not None:
    apply_q, params_q = load_model(args.compare)
    other_shape = declared_input_shape(params_q, apply_q)
    if other_shape is not None and other_shape != box.shape:
      raise UsageError(f"{args.model} takes inputs of shape {box.shape} but {args.compare} takes {other_shape}; "
                       "compared models must have the same inputs.")
    fq = functools.partial(apply_q, params_q)
    other_out = output_shape(args.compare, fq, box.shape)
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
  log.info("f: %s, f_q: %s, outputs of shape %s", args.model, against, out_shape)
  return f, fq, box, against, batch
