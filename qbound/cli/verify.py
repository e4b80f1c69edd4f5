"""``qbound verify F G``: a property of two model files decided as VNN-COMP asks, ``unsat``, ``sat`` or ``unknown``.

The first line printed is the answer: ``unsat`` (proved: no input of the box violates the property),
``sat`` (a counterexample, re-checked by evaluating both networks in float32 and float64) or
``unknown``; the exit status is 0 for a decided answer, 1 for ``unknown`` and 2 for a mistake in
the command line or its files. The property is one of

* ``--epsilon E``: ``|F(x) - G(x)|_inf <= E`` (the maximal error, :class:`qbound.props.MaxError`);
* ``--top1``: ``argmax F(x) = argmax G(x)`` (:class:`qbound.props.Top1`);
* ``--delta-top1 D``: wherever F's top softmax output is at least ``D``, G picks the same class
  (:class:`qbound.props.DeltaTop1`);
* none of them, with a VNN-LIB 2.0 file that declares two networks: the file's own unsafe outputs
  over both (:class:`qbound.props.Unsafe`).

The box comes from ``--vnnlib SPEC`` (each input box of the file in turn: ``sat`` as soon as one
has a counterexample, ``unsat`` when all are proved) or from ``--lower/--upper`` (or
``--center/--radius``). For the class properties a trailing Softmax or LogSoftmax of an ONNX model is
left out (they are decided on logits). ``--timeout`` is the whole call's budget in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from qbound.cli import boxes, common
from qbound.cli.common import UsageError, log

EXIT_UNKNOWN = 1


def add_parser(commands) -> None:
  cmd = commands.add_parser(
      "verify", help="decide a property of two model files: unsat (proved), sat (counterexample) or unknown",
      description="Decide a property of two networks F and G (.onnx or .nnet) over an input box: the maximal "
                  "error (--epsilon), top-1 equivalence (--top1), confidence equivalence (--delta-top1), or a "
                  "two-network VNN-LIB 2.0 file's own property. The first line printed is unsat, sat or "
                  "unknown; the exit status is 0 for a decided answer, 1 for unknown, 2 for a usage error.")
  cmd.add_argument("first", metavar="F", help="the original network (.onnx or .nnet)")
  cmd.add_argument("second", metavar="G", help="the compressed network (.onnx or .nnet)")
  cmd.add_argument("--vnnlib", metavar="SPEC", help="a VNN-LIB 1.0 or 2.0 file (.vnnlib or .vnnlib.gz): its input "
                                                    "boxes, and for a two-network 2.0 file its property")
  boxes.add_box_arguments(cmd)
  prop = cmd.add_mutually_exclusive_group()
  prop.add_argument("--epsilon", metavar="E", help="prove |F(x) - G(x)|_inf <= E")
  prop.add_argument("--top1", action="store_true", help="prove argmax F(x) = argmax G(x)")
  prop.add_argument("--delta-top1", metavar="D", help="prove G picks F's class wherever F's top softmax output is "
                                                      ">= D (0 < D < 1)")
  cmd.add_argument("--timeout", metavar="SECONDS", default="60",
                   help="seconds for the whole call, compilation included (default: 60)")
  cmd.add_argument("--seed", type=int, default=0, help="seed of the counterexample search (default: 0)")
  cmd.add_argument("--json", action="store_true", help="after the answer, print the verdicts as JSON")
  cmd.add_argument("--counterexample", metavar="FILE",
                   help="on sat, write the counterexample there in VNN-COMP's format ((X_0 v) ... (Y_0 v) ...)")
  common.add_verbosity_arguments(cmd)
  cmd.set_defaults(run=run)


def _property(args, problem):
  import qbound as qb

  if args.epsilon is not None:
    epsilon = _number(args.epsilon, "--epsilon")
    if epsilon < 0:
      raise UsageError(f"--epsilon must be >= 0, got {args.epsilon}.")
    return qb.props.MaxError(epsilon), None
  if args.top1:
    return qb.props.Top1(), None
  if args.delta_top1 is not None:
    delta = _number(args.delta_top1, "--delta-top1")
    if not 0 < delta < 1:
      raise UsageError(f"--delta-top1 must be in (0, 1) (a softmax probability), got {args.delta_top1}.")
    return qb.props.DeltaTop1(delta), None
  if problem is not None and len(problem.networks) == 2:
    return None, "file"
  raise UsageError("say what to prove: --epsilon E, --top1 or --delta-top1 D (or give --vnnlib a VNN-LIB 2.0 file "
                   "that declares two networks and their property).")


def _number(text: str, option: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise UsageError(f"{option} must be a number, got {text!r}.") from None
  if not math.isfinite(value):
    raise UsageError(f"{option} must be finite, got {text!r}.")
  return value


def _cases(args, shape, params):
  """``(problem, [(box, unsafe polytopes or None)])`` from --vnnlib or the box options."""
  if args.vnnlib is None:
    return None, [(boxes.build_box(args, shape, params), None)]
  if any(v is not None for v in (args.lower, args.upper, args.center, args.radius, args.box_npz)):
    raise UsageError("give the input box one way: --vnnlib SPEC or --lower/--upper (--center/--radius, --box-npz).")
  from qbound import io

  try:
    problem = io.load_vnnlib(args.vnnlib)
  except FileNotFoundError:
    raise UsageError(f"{args.vnnlib}: no such file.") from None
  except (ValueError, OSError, ImportError) as err:
    raise UsageError(str(err)) from None
  if not problem.cases:
    raise UsageError(f"{args.vnnlib}: its input constraints contradict each other, so it has no input box.")
  out = []
  for case in problem.cases:
    box = case.box
    if shape is not None and int(np.prod(box.shape)) == int(np.prod(shape)) and box.shape != tuple(shape):
      import qbound as qb

      box = qb.Box(np.asarray(box.lower).reshape(shape), np.asarray(box.upper).reshape(shape))
    if shape is not None and box.shape != tuple(shape):
      raise UsageError(f"{args.vnnlib} declares inputs of shape {box.shape} but {args.first} takes {tuple(shape)}.")
    out.append((box, case.unsafe))
  return problem, out


def run(args: argparse.Namespace, out) -> int:
  import functools

  import jax

  import qbound as qb
  from qbound.cli.models import declared_input_shape, load_model, output_shape

  start = time.perf_counter()
  timeout = common.parse_seconds(args.timeout, "--timeout")
  common.check_output_path(args.counterexample, "--counterexample")
  logits = bool(args.top1 or args.delta_top1 is not None)
  apply_f, params_f = load_model(args.first, logits=logits)
  apply_g, params_g = load_model(args.second, logits=logits)
  shape = declared_input_shape(params_f, apply_f)
  problem, cases = _cases(args, shape, params_f)
  prop, from_file = _property(args, problem)
  f = functools.partial(apply_f, params_f)
  g = functools.partial(apply_g, params_g)
  box_shape = cases[0][0].shape
  out_f = output_shape(args.first, f, box_shape, declared=shape is not None)
  out_g = output_shape(args.second, g, box_shape)
  if out_f != out_g:
    raise UsageError(f"{args.first} has outputs of shape {out_f} but {args.second} has {out_g}; compared networks "
                     "must have the same outputs.")
  verdicts = []
  answer = "unsat"
  for i, (box, unsafe) in enumerate(cases):
    left = timeout - (time.perf_counter() - start)
    if left <= 0:
      answer = "unknown"
      break
    case_prop = prop
    if from_file:
      if not unsafe:
        raise UsageError(f"{args.vnnlib}: box {i} has no unsafe outputs to avoid.")
      case_prop = qb.props.Unsafe(tuple(unsafe))
    log.info("box %d of %d: deciding %s (%.1f s left)", i + 1, len(cases), case_prop.describe(), left)
    # Each remaining box gets an equal share of what is left.
    budget = left / (len(cases) - i)
    with common.bad_input_is_usage_error():
      verdict = qb.props.verify(f, g, box, case_prop, time_budget=budget, key=jax.random.key(args.seed),
                                progress=common.show_progress(args))
    verdicts.append(verdict)
    log.info("%s", verdict)
    if verdict.status == "counterexample":
      answer = "sat"
      break
    if verdict.status == "unknown":
      answer = "unknown"
  if answer == "sat" and args.counterexample:  # written first: a reader may stop at the answer line
    common.write_output(args.counterexample, counterexample_text(verdicts[-1]), "--counterexample")
  print(answer, file=out)
  if args.json:
    print(json.dumps({"answer": answer, "verdicts": [v.to_dict() for v in verdicts],
                      "seconds": time.perf_counter() - start}, indent=2, allow_nan=False), file=out)
  elif verdicts:
    print(str(verdicts[-1]), file=out)
  return 0 if answer in ("sat", "unsat") else EXIT_UNKNOWN


def counterexample_text(verdict) -> str:
  """VNN-COMP's counterexample format: ``((X_0 v) ... (Y_0 v) ...)`` with F's outputs as ``Y_i`` and G's
  after them (``Y_{n+i}``, as the columns of a two-network property), values as exact decimals of the
  float64 evaluation."""
  from qbound.io.vnnlib import format_real

  x = np.asarray(verdict.counterexample, np.float32).reshape(-1)
  y = np.concatenate([np.asarray(verdict.f_output).reshape(-1), np.asarray(verdict.fq_output).reshape(-1)])
  items = [f"(X_{i} {format_real(v)})" for i, v in enumerate(x)] + \
          [f"(Y_{j} {format_real(v)})" for j, v in enumerate(y)]
  return "(" + "\n ".join(items) + ")\n"
