"""``qbound certify MODEL``: the maximal error between a model file and its quantized copy (or a second
file), over one box (:func:`qbound.certify`) or a ball around every input of a file
(``--inputs``, :func:`qbound.certify_batch`), printed as a summary or as JSON."""

from __future__ import annotations

import argparse
from typing import Optional

import numpy as np

from qbound.cli import common, models
from qbound.cli.common import UsageError, log


def add_parser(commands) -> None:
  from qbound.certify import METHODS

  cert = commands.add_parser(
      "certify", help="certify the error between a model file and its quantized copy",
      description="Certify max_x |f(x) - f_q(x)|_inf over an input box, where f is MODEL and f_q its "
                  "uniformly quantized copy (or the model in --compare). Without a box option the box "
                  "is the input range declared in the model file.")
  models.add_model_arguments(cert)
  many = cert.add_argument_group("many inputs at once (qbound.certify_batch): a ball of --radius around each")
  many.add_argument("--inputs", metavar="FILE", help="a .npy, or a .npz with an array 'inputs' (or a single "
                                                     "array), of shape (n, *input_shape) or (n, input_size)")
  many.add_argument("--clip", metavar="LO,HI", help="intersect every ball with [LO, HI] (e.g. 0,1 for pixels)")
  many.add_argument("--memory-budget", metavar="BYTES", help="bytes per device for one chunk of inputs, "
                                                             "e.g. 4GiB (default: half the device's memory)")
  many.add_argument("--devices", type=int, metavar="N", help="use the first N devices (default: all)")
  cert.add_argument("--method", choices=METHODS, default="auto", help="upper-bound method (default: auto)")
  cert.add_argument("--time-budget", metavar="SECONDS",
                    help="seconds auto, bab and milp may use, compilation included (default: 10; inf: until "
                         "the gap closes); one box only")
  cert.add_argument("--seed", type=int, default=0, help="seed of the lower-bound search (default: 0)")
  cert.add_argument("--json", action="store_true", help="print the certificate as JSON")
  cert.add_argument("--output", metavar="FILE", help="also write the certificate as JSON to FILE")
  common.add_verbosity_arguments(cert)
  cert.set_defaults(run=run)


def run(args: argparse.Namespace, out) -> int:
  import jax

  import qbound as qb

  models.check_compressor_options(args)
  # Checked before certifying, so a typo in the path does not throw away a long computation.
  common.check_output_path(args.output)
  for option, value in (("--clip", args.clip), ("--memory-budget", args.memory_budget), ("--devices", args.devices)):
    if value is not None and args.inputs is None:
      raise UsageError(f"{option} applies to many inputs at once: use it with --inputs FILE --radius R.")
  options = {}
  if args.time_budget is not None:
    if args.inputs is not None:
      raise UsageError("--time-budget applies to one box (qbound.certify); with --inputs every box gets one "
                       "batched method, which runs to completion.")
    options["time_budget"] = common.parse_seconds(args.time_budget, "--time-budget")

  f, fq, box, against, boxes = models.networks_and_box(args)
  if boxes is not None:
    return run_batch(args, f, fq, boxes, against, out)
  log.info("certifying over a box of shape %s with method %s%s", box.shape, args.method,
           f", time budget {options['time_budget']:g} s" if options else "")
  options.update(common.progress_kwargs(qb.certify, common.show_progress(args)))
  with common.bad_input_is_usage_error():
    cert = qb.certify(f, fq, box, method=args.method, key=jax.random.key(args.seed), **options)
  log.info("done in %.2f s: %s", cert.seconds, ", ".join(f"{k} {v:.6g}" for k, v in cert.bounds.items()))

  common.write_output(args.output, cert.to_json(indent=2))
  if args.json:
    print(cert.to_json(indent=2), file=out)
  else:
    print(summary(cert, args.model, against, args.output), file=out)
  return 0


def run_batch(args: argparse.Namespace, f, fq, boxes, against: str, out) -> int:
  import jax

  import qbound as qb

  method = args.method
  if method == "auto":  # auto adapts per box; in a batch, the tightest one-shot bound that applies
    method = "diff" if qb.merge(f, fq, qb.box.box_at(boxes, 0)).paired else "crown"
  budget = None if args.memory_budget is None else common.parse_bytes(args.memory_budget)
  devices = None
  if args.devices is not None:
    if not 1 <= args.devices <= len(jax.devices()):
      raise UsageError(f"--devices must be between 1 and {len(jax.devices())} (the devices jax sees), got "
                       f"{args.devices}.")
    devices = jax.devices()[: args.devices]
  log.info("certifying %d boxes with method %s", len(boxes.lower), method)
  with common.bad_input_is_usage_error():
    batch = qb.certify_batch(f, fq, boxes, method=method, key=jax.random.key(args.seed), devices=devices,
                             memory_budget=budget, progress=common.show_progress(args))
  log.info("done in %.2f s (%.2f s compiling)", batch.total_seconds, batch.compile_seconds)
  common.write_output(args.output, batch.to_json())
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
