"""``qbound export MODEL``: the merged difference network as ONNX and "error <= epsilon over the box" as
VNN-LIB, for other verifiers (:func:`qbound.io.export_property`)."""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

from qbound.cli import common, models
from qbound.cli.common import UsageError


def add_parser(commands) -> None:
  export = commands.add_parser(
      "export", help="write the merged network f - f_q as ONNX and 'error <= epsilon' as VNN-LIB",
      description="Write the merged difference network g = f - f_q (f is MODEL, f_q its uniformly "
                  "quantized copy or the model in --compare) to OUT/merged.onnx, and the property "
                  "'|g_j(x)| <= epsilon for every x in the box' to OUT/property.vnnlib, in the form "
                  "VNN-COMP verifiers (alpha-beta-CROWN, Marabou, NNV) read. A verifier's 'unsat' "
                  "proves |g_j(x)| < epsilon on the whole box. Without a box option the box is the "
                  "input range declared in the model file.")
  models.add_model_arguments(export)
  export.add_argument("--epsilon", metavar="E", required=True,
                      help="the error bound to check, e.g. the 'upper' of 'qbound certify --json'")
  export.add_argument("--outputs", metavar="J,J,..", help="flat indices of the outputs to check "
                                                          "(default: all)")
  export.add_argument("--out", metavar="DIR", required=True,
                      help="directory to write merged.onnx and property.vnnlib to (created if missing)")
  common.add_verbosity_arguments(export)
  export.set_defaults(run=run)


def run(args: argparse.Namespace, out) -> int:
  import qbound as qb

  models.check_compressor_options(args)
  epsilon = common.parse_values(args.epsilon, "--epsilon")
  if epsilon.size != 1 or epsilon[0] < 0:
    raise UsageError(f"--epsilon needs one number >= 0, got {args.epsilon!r}.")
  epsilon = float(epsilon[0])
  outputs = None
  if args.outputs is not None:
    values = common.parse_values(args.outputs, "--outputs")
    if np.any(values != np.round(values)) or np.any(values < 0):
      raise UsageError(f"--outputs takes output indices (integers >= 0), got {args.outputs!r}.")
    outputs = [int(v) for v in values]
  directory = pathlib.Path(args.out)
  if directory.exists() and not directory.is_dir():
    raise UsageError(f"--out {args.out} is a file; give a directory.")

  f, fq, box, against, _ = models.networks_and_box(args)
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
