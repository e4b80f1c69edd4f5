"""What every ``qbound`` subcommand shares: the usage-error path, number parsing, output, verbosity.

Mistakes in the command line or its files print ``qbound: error: <message>`` on stderr and exit
with status 2, without a traceback (:class:`UsageError`); anything else propagates with its
traceback, because it is a bug to report.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import pathlib
import re
import sys
from typing import Callable, Optional, Sequence

import numpy as np

from qbound import validate

USAGE_ERROR = 2
QUIET, NORMAL, VERBOSE = 0, 1, 2
log = logging.getLogger("qbound.cli")


class UsageError(Exception):
  """A mistake the user can fix; ``main`` prints it as ``qbound: error: <message>`` and returns 2."""


@contextlib.contextmanager
def bad_input_is_usage_error():
  """qbound's ValueErrors (empty boxes, mismatched shapes, unsupported layers) are the user's to fix.
  A :class:`qbound.SoundnessError` is an AssertionError, a bug in qbound: it keeps its traceback, as
  does a TypeError (the command line passes arguments of the right kinds, so one is a bug too)."""
  try:
    yield
  except ValueError as err:
    raise UsageError(str(err)) from None


class Parser(argparse.ArgumentParser):
  """argparse, but its errors go through ``main``'s one error path (same prefix, same exit status)."""

  def error(self, message: str):
    raise UsageError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------- negative option values

# A value that starts with '-' and is a number or a comma-separated list of them: '-1', '-1,-1',
# '-.5,0.5', '-inf,0', '-1e-3'. argparse takes such a token for an option (unless it is a lone
# negative number) and fails with "expected one argument".
_NEGATIVE_VALUES = re.compile(r"^-(\d|\.\d|inf\b|infinity\b|nan\b)[^\s]*$", re.IGNORECASE)


def value_options(parser: argparse.ArgumentParser) -> set[str]:
  """Every option string of ``parser`` and its subcommands that takes one value."""
  options = set()
  for action in parser._actions:  # argparse keeps them private, but stable since Python 3.2
    if isinstance(action, argparse._SubParsersAction):
      for sub in action.choices.values():
        options |= value_options(sub)
    elif action.option_strings and action.nargs is None:
      options.update(action.option_strings)
  return options


def join_negative_values(argv: Sequence[str], options: set[str]) -> list[str]:
  """``argv`` with ``--lower -1,-1`` written ``--lower=-1,-1`` where an option takes a negative value.

  Example:
    >>> join_negative_values(["certify", "m.nnet", "--lower", "-1,-1", "--upper", "1,1"], {"--lower", "--upper"})
    ['certify', 'm.nnet', '--lower=-1,-1', '--upper', '1,1']
  """
  out, i = [], 0
  argv = list(argv)
  while i < len(argv):
    token = argv[i]
    if token in options and i + 1 < len(argv) and _NEGATIVE_VALUES.match(argv[i + 1]):
      out.append(f"{token}={argv[i + 1]}")
      i += 2
      continue
    out.append(token)
    i += 1
  return out


# ------------------------------------------------------------------------------------------- numbers


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
    bad = next(t for t in tokens if not validate.is_number(t))
    raise UsageError(f"{option}: {bad!r} is not a number.") from None
  if not np.all(np.isfinite(values)):
    raise UsageError(f"{option}: every value must be finite, got {text!r}.")
  return values


def parse_seconds(text: str, option: str) -> float:
  """A time budget: seconds > 0, or ``inf`` for none; ``UsageError`` otherwise.

  Example:
    >>> parse_seconds("2.5", "--time-budget"), parse_seconds("inf", "--time-budget")
    (2.5, inf)
  """
  try:
    value = float(text)
  except ValueError:
    raise UsageError(f"{option} needs a number of seconds > 0 (or inf for no limit), got {text!r}.") from None
  if not value > 0:  # also refuses nan
    raise UsageError(f"{option} needs a number of seconds > 0 (or inf for no limit), got {text!r}.")
  return value


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


# -------------------------------------------------------------------------------------------- output


def write_output(path: Optional[str], text: str, option: str = "--output") -> None:
  """Writes ``text`` (a certificate's JSON) to ``option``'s file (``--output``) when it was given."""
  if path is None:
    return
  try:
    pathlib.Path(path).write_text(text + "\n", encoding="utf-8")
  except OSError as err:
    raise UsageError(f"{option} {path}: cannot write it ({err.strerror or err}).") from None


def check_output_path(path: Optional[str], option: str = "--output") -> None:
  """``option`` (``--output``) must name a file in an existing directory; checked before a long computation."""
  if path is None:
    return
  if pathlib.Path(path).is_dir():
    raise UsageError(f"{option} {path} is a directory; give a file name.")
  if not pathlib.Path(path).resolve().parent.is_dir():
    raise UsageError(f"{option} {path}: the directory {pathlib.Path(path).parent} does not exist.")


# ----------------------------------------------------------------------------------------- verbosity


def add_verbosity_arguments(command: argparse.ArgumentParser) -> None:
  """``-q/--quiet`` and ``-v/--verbose`` (repeatable) for a subcommand."""
  group = command.add_mutually_exclusive_group()
  group.add_argument("-q", "--quiet", action="store_true",
                     help="no progress bars or log messages: only the result (and errors) are printed")
  group.add_argument("-v", "--verbose", action="count", default=0,
                     help="log what qbound does on stderr (-vv for debugging detail); progress bars even "
                          "when stderr is not a terminal")


def verbosity(args: argparse.Namespace) -> int:
  """``QUIET``, ``NORMAL`` or ``VERBOSE`` (or more, for -vv) from the parsed arguments."""
  if getattr(args, "quiet", False):
    return QUIET
  return NORMAL + getattr(args, "verbose", 0)


def show_progress(args: argparse.Namespace) -> bool:
  """Progress bars: never with --quiet or --json (stdout is for the result then), always with
  --verbose, otherwise only when stderr is a terminal (not in logs and pipes)."""
  level = verbosity(args)
  if level == QUIET or getattr(args, "json", False):
    return False
  return level >= VERBOSE or sys.stderr.isatty()


@contextlib.contextmanager
def logging_to_stderr(level: int):
  """qbound's loggers print to stderr for the duration of one command at the level ``-q/-v`` ask for."""
  logger = logging.getLogger("qbound")
  handler = logging.StreamHandler(sys.stderr)  # sys.stderr now: tests and callers may replace it
  handler.setFormatter(logging.Formatter("qbound: %(message)s"))
  before = logger.level, logger.propagate
  logger.setLevel({QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}.get(level, logging.DEBUG))
  logger.propagate = False
  logger.addHandler(handler)
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(before[0])
    logger.propagate = before[1]


def progress_kwargs(fn: Callable, show: bool) -> dict:
  """``{'progress': show}`` (or ``verbose``) if ``fn`` takes such an argument, else nothing: the
  command line asks for progress bars wherever the library offers them."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # pragma: no cover - builtins
    return {}
  for name in ("progress", "verbose"):
    if name in params:
      return {name: show}
  return {}
