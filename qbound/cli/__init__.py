"""The ``qbound`` command line.

``qbound demo`` runs :func:`qbound.demo.run_demo`; ``qbound certify MODEL`` certifies the maximal
error between a model file and its uniformly quantized copy (or a second model file given with
``--compare``) over an input box, and prints a summary or the certificate as JSON; ``qbound export
MODEL`` writes their merged difference network as ONNX and the property "error <= epsilon over the
box" as VNN-LIB, for other verifiers (:func:`qbound.io.export_property`)::

    qbound certify net.nnet --bits 4 --center 0.1,0.2,0.3 --radius 0.01
    qbound certify net.nnet --compare net_fp16.nnet --lower -1,-1,0 --upper 1,1,1 --json
    qbound certify net.nnet --compare net_fp16.nnet --inputs images.npz --radius 0.0118 --clip 0,1
    qbound export net.nnet --compare net_fp16.nnet --lower 0,0,0 --upper 1,1,1 --epsilon 0.05 --out prop/

``qbound verify F G`` decides a property of two model files (the maximal error, top-1 or
delta-top-1 equivalence, or a two-network VNN-LIB 2.0 file's property) and prints ``unsat``,
``sat`` or ``unknown`` first, as VNN-COMP's scripts read it (:mod:`~qbound.cli.verify`)::

    qbound verify net.onnx pruned.onnx --vnnlib prop.vnnlib --top1 --timeout 100
    qbound verify lhc.onnx lhc_pruned.onnx --vnnlib sigma_0.1.vnnlib --delta-top1 0.999 --json

With ``--inputs``, ``certify`` certifies an L-inf ball around every input of a file in one
:func:`qbound.certify_batch` call (vmapped, split over every device, chunked to memory).

One module per idea: :mod:`~qbound.cli.common` (errors, numbers, output, verbosity),
:mod:`~qbound.cli.models` (model files, f and f_q), :mod:`~qbound.cli.boxes` (the input box), and
one per subcommand (:mod:`~qbound.cli.certify`, :mod:`~qbound.cli.export`, :mod:`~qbound.cli.demo`,
:mod:`~qbound.cli.verify`).

Mistakes in the command line or its files (a missing file, a box of the wrong size, lower > upper)
print ``qbound: error: <message>`` on stderr and exit with status 2, without a traceback: they
are the user's to fix. Anything else propagates with its traceback, because it is a bug to report.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from qbound.cli import certify as _certify
from qbound.cli import demo as _demo
from qbound.cli import export as _export
from qbound.cli import verify as _verify
from qbound.cli.boxes import build_box, build_boxes, declared_box
from qbound.cli.certify import batch_summary, summary
from qbound.cli.common import USAGE_ERROR, UsageError, parse_bytes, parse_values
from qbound.cli.models import declared_input_shape, load_model
from qbound.cli import common as _common

__all__ = ["USAGE_ERROR", "UsageError", "batch_summary", "build_box", "build_boxes", "build_parser",
           "declared_box", "declared_input_shape", "load_model", "main", "parse_bytes", "parse_values", "summary"]


def _version() -> str:
  import platform

  import jax

  from qbound import __version__

  return f"qbound {__version__} (jax {jax.__version__}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
  """The ``qbound`` argument parser with its ``demo``, ``certify``, ``export`` and ``verify`` subcommands."""
  parser = _common.Parser(prog="qbound", description="Formal bounds on the error of quantized neural networks.")
  parser.add_argument("--version", action="version", version=_version(),
                      help="print qbound's version (and JAX's and Python's) and exit")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  _demo.add_parser(commands)
  _certify.add_parser(commands)
  _export.add_parser(commands)
  _verify.add_parser(commands)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``qbound`` with ``argv`` (``sys.argv[1:]`` when omitted); returns the exit status.

  Example:
    >>> main(["certify", "no_such_model.nnet"])
    2
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    parser = build_parser()
    args = parser.parse_args(_common.join_negative_values(argv, _common.value_options(parser)))
    with _common.logging_to_stderr(_common.verbosity(args)):
      return args.run(args, sys.stdout)
  except UsageError as err:
    print(f"qbound: error: {err}", file=sys.stderr)
    return USAGE_ERROR
  except SystemExit as exit_:  # --help and --version exit through argparse
    return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else USAGE_ERROR)


if __name__ == "__main__":
  sys.exit(main())
