"""``qbound demo``: the bundled digits MLP against its 8-, 6- and 4-bit copies (:mod:`qbound.demo`)."""

from __future__ import annotations

import argparse

from qbound.cli import common
from qbound.cli.common import UsageError


def add_parser(commands) -> None:
  from qbound.certify import METHODS
  from qbound.demo import DEFAULT_RADIUS

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
  common.add_verbosity_arguments(demo)
  demo.set_defaults(run=run)


def run(args: argparse.Namespace, out) -> int:
  from qbound.demo import run_demo
  from qbound.quantize.numerics import check_bits

  for bits in args.bits:  # before the demo prints its header
    try:
      check_bits(bits, minimum=2)
    except ValueError as err:
      raise UsageError(f"--bits: {err}") from None
  # The demo's bar is its only sign of life on a first (compiling) run: shown unless asked not to.
  progress = not args.no_progress and common.verbosity(args) != common.QUIET
  try:
    run_demo(bits=args.bits, radius=args.radius, image=args.image, method=args.method,
             progress=progress, seed=args.seed, file=out)
  except ValueError as err:
    raise UsageError(str(err)) from None
  return 0
