"""VNN-LIB text to the ``vnnlib`` package's parsed query: tokens, the 1.0 -> 2.0 translation, errors.

:func:`qbound.io.load_vnnlib` (:mod:`qbound.io.vnnlib_reader`) hands every file to one parser, the
reference implementation of the VNN-LIB 2.0 standard (the ``vnnlib`` package, A. Antony and M.
Daggitt; ``pip install 'qbound[vnnlib]'``), which parses, scope- and type-checks it and puts each
assertion in disjunctive normal form. This module holds what comes before and around that call:

* a tokenizer of s-expressions (:func:`_read_forms`) that checks every file first (text, not
  binary; balanced parentheses; nesting at most ``MAX_DEPTH`` deep; numbers within ``1e±300``)
  and keeps the line and column of every atom, so that errors point into the file;
* the translation of a VNN-LIB 1.0 file (``(declare-const X_0 Real)`` ...) to the equivalent 2.0
  text (:func:`_translate_v1`): ``X_i`` -> ``X[i]``, ``Y_j`` -> ``Y[j]`` of one network named
  ``N`` with input shape ``(n,)`` and output shape ``(m,)``, token by token on the same lines, so
  that the package's line numbers point into the 1.0 file. The package's own conversion
  (``vnnlib.compat.transform``) is not used: in version 1.0.2 it turns an ``(assert (and ...))`` of
  input bounds into separate cases (one of them without those bounds), keeps only the upper bound
  of ``(== X[i] c)`` and reads single networks only;
* the call of the package (:func:`_parse_with_package`), its errors turned into
  :class:`~qbound.errors.VnnlibError` at the line it reports.

Everything here is private to :mod:`qbound.io`: the reader imports it, nothing else should.
"""

from __future__ import annotations

import decimal
import json
import re
from typing import NamedTuple

from qbound.errors import VnnlibError

MAX_DEPTH = 200                # parentheses nested deeper than this are refused (no file needs 10)
_INSTALL = "pip install 'qbound[vnnlib]'"


# ------------------------------------------------------------------- text, tokens, s-expressions


class _Atom(NamedTuple):
  text: str
  line: int
  col: int


class _List(NamedTuple):
  items: list
  line: int
  col: int
  end_line: int


_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")  # 1.0 allows 1e-3, .5
_TOKEN = re.compile(r'(?P<nl>\n)|(?P<ws>[^\S\n]+)|(?P<comment>;[^\n]*)|(?P<open>\()|(?P<close>\))'
                    r'|(?P<string>"[^"\n]*")|(?P<atom>[^\s();"]+)|(?P<bad>.)')


def _import_vnnlib():
  try:
    import vnnlib
  except ImportError as exc:
    raise ImportError(f"reading VNN-LIB needs the 'vnnlib' package: {_INSTALL}") from exc
  return vnnlib


def _decode(data: bytes, source) -> str:
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as exc:
    line = data.count(b"\n", 0, exc.start) + 1
    col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    raise VnnlibError(f"byte 0x{data[exc.start]:02x} is not UTF-8 text: this is not a VNN-LIB file (binary data?)",
                      source=source, line=line, column=col) from None


def _position(text: str, offset: int) -> tuple[int, int]:
  line = text.count("\n", 0, offset) + 1
  return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _read_forms(text: str, source) -> list:
  """The top-level s-expressions, with the line and column of every atom and parenthesis."""
  forms, stack = [], []
  line, line_start = 1, 0
  for match in _TOKEN.finditer(text):
    kind, tok = match.lastgroup, match.group()
    col = match.start() - line_start + 1
    if kind == "nl":
      line, line_start = line + 1, match.end()
    elif kind in ("ws", "comment"):
      continue
    elif kind == "open":
      if len(stack) >= MAX_DEPTH:
        raise VnnlibError(f"parentheses nested more than {MAX_DEPTH} deep", source=source, line=line, column=col)
      stack.append(_List([], line, col, line))
    elif kind == "close":
      if not stack:
        raise VnnlibError("unbalanced parentheses: this ')' closes nothing", source=source, line=line, column=col)
      done = stack.pop()._replace(end_line=line)
      (stack[-1].items if stack else forms).append(done)
    elif kind == "bad":
      raise VnnlibError("unterminated string (a '\"' without its closing '\"' on the same line)", source=source,
                        line=line, column=col)
    else:
      if not stack:
        raise VnnlibError(f"not a VNN-LIB file: expected '(' to start a declaration or assertion, found {tok[:40]!r}",
                          source=source, line=line, column=col)
      if not tok.isascii():
        at = next(i for i, c in enumerate(tok) if not c.isascii())
        raise VnnlibError(f"non-ASCII character {tok[at]!r} outside a comment", source=source, line=line,
                          column=col + at)
      if _NUMBER.match(tok):
        value = decimal.Decimal(tok)
        if value != 0 and not -300 <= value.adjusted() < 300:
          raise VnnlibError(f"number {tok[:40]} is out of range (VNN-LIB numbers are read as doubles)",
                            source=source, line=line, column=col)
      stack[-1].items.append(_Atom(tok, line, col))
  if stack:
    first = stack[0]
    raise VnnlibError(f"truncated file or unbalanced parentheses: the '(' opened here is never closed "
                      f"({len(stack)} open at the end of the file)", source=source, line=first.line, column=first.col)
  return forms


# ------------------------------------------------------------------------ VNN-LIB 1.0 -> 2.0


_V1_NAME = re.compile(r"([XY])_(0|[1-9][0-9]*)\Z")
_V1_COMPARISONS = {"<=": "<=", ">=": ">=", "<": "<", ">": ">", "=": "=="}
_V1_UNSUPPORTED = ("not", "=>", "xor", "ite", "distinct", "let", "forall", "exists", "/", "div", "abs")


def _decimal_text(atom: _Atom, source) -> str:
  """A 1.0 number (``1``, ``-0.5``, ``1e-3``, ``.5``) as the exact 2.0 decimal (``-?d+.d+``)."""
  text = format(decimal.Decimal(atom.text), "f")  # in range: _read_forms checked it
  return text if "." in text else text + ".0"


def _translate_v1(forms: list, source) -> tuple[str, int, int]:
  """The 2.0 text of a 1.0 file, every token of an assertion on its original line (so the
  package's line numbers are the file's), and the numbers of inputs and outputs."""
  declared: dict[str, dict[int, _Atom]] = {"X": {}, "Y": {}}
  tokens: list[tuple[str, int]] = []

  def fail(what, node):
    raise VnnlibError(what, source=source, line=node.line, column=node.col)

  def head_of(node):
    if not node.items:
      fail("empty parentheses '()'", node)
    if not isinstance(node.items[0], _Atom):
      fail("expected an operator after '('", node)
    return node.items[0].text

  def arith(node):
    if isinstance(node, _Atom):
      match = _V1_NAME.match(node.text)
      if match:
        if int(match.group(2)) not in declared[match.group(1)]:
          fail(f"unknown variable {node.text!r}: not declared (before this line)", node)
        tokens.append((f"{match.group(1)}[{match.group(2)}]", node.line))
      elif _NUMBER.match(node.text):
        tokens.append((_decimal_text(node, source), node.line))
      else:
        fail(f"unknown variable or symbol {node.text[:40]!r} (VNN-LIB 1.0 names inputs X_0, X_1, ... and "
             f"outputs Y_0, Y_1, ...)", node)
      return
    op = head_of(node)
    args = node.items[1:]
    if op in ("+", "*", "-"):
      if not args:
        fail(f"'({op})' needs at least one argument", node)
      tokens.append(("(" + op, node.line))
      for arg in args:
        arith(arg)
      tokens.append((")", node.end_line))
    elif op in _V1_UNSUPPORTED:
      fail(f"'{op}' is not supported: VNN-LIB terms are linear: +, -, * by a constant", node)
    else:
      fail(f"expected a number, a variable or (+ ...), (- ...), (* ...), found {op[:40]!r}", node)

  def boolean(node):
    if isinstance(node, _Atom):
      fail(f"expected a comparison, (and ...) or (or ...), found {node.text[:40]!r}", node)
    op = head_of(node)
    args = node.items[1:]
    if op in ("and", "or"):
      if not args:
        fail(f"'({op})' needs at least one argument", node)
      tokens.append(("(" + op, node.line))
      for arg in args:
        boolean(arg)
    elif op in _V1_COMPARISONS:
      if len(args) != 2:
        fail(f"'{op}' takes two arguments, got {len(args)}", node)
      tokens.append(("(" + _V1_COMPARISONS[op], node.line))
      arith(args[0])
      arith(args[1])
    elif op in _V1_UNSUPPORTED:
      fail(f"'{op}' is not supported: VNN-LIB asserts and/or combinations of linear comparisons", node)
    else:
      fail(f"unknown operator {op[:40]!r} (expected <=, >=, <, >, =, and, or)", node)
    tokens.append((")", node.end_line))

  for form in forms:
    command = head_of(form)
    args = form.items[1:]
    if command in ("declare-const", "declare-fun"):
      want = 2 if command == "declare-const" else 3
      if len(args) != want or not all(isinstance(a, _Atom) for a in (args[0], args[-1])):
        fail(f"expected ({command} NAME{' ()' if want == 3 else ''} Real)", form)
      if want == 3 and not (isinstance(args[1], _List) and not args[1].items):
        fail("expected (declare-fun NAME () Real): VNN-LIB variables take no arguments", form)
      name, sort = args[0], args[-1]
      match = _V1_NAME.match(name.text)
      if not match:
        fail(f"cannot declare {name.text[:40]!r}: VNN-LIB 1.0 names inputs X_0, X_1, ... and outputs Y_0, Y_1, ...",
             name)
      if sort.text != "Real":
        fail(f"{name.text} is declared {sort.text[:40]!r}: VNN-LIB 1.0 variables are Real", sort)
      index = int(match.group(2))
      if index in declared[match.group(1)]:
        fail(f"{name.text} is declared twice (first at line {declared[match.group(1)][index].line})", name)
      declared[match.group(1)][index] = name
    elif command == "assert":
      if len(args) != 1:
        fail(f"'assert' takes one formula, got {len(args)}", form)
      tokens.append(("(assert", form.line))
      boolean(args[0])
      tokens.append((")", form.end_line))
    elif command in ("declare-network", "declare-input", "declare-output"):
      fail(f"{command!r} is VNN-LIB 2.0: a 2.0 file starts with (vnnlib-version <2.0>)", form)
    else:
      fail(f"unknown command {command[:40]!r}: VNN-LIB 1.0 has declare-const, declare-fun and assert", form)

  for letter, kind in (("X", "inputs"), ("Y", "outputs")):
    indices = declared[letter]
    missing = next((i for i in range(len(indices) + 1) if i not in indices), None)
    if indices and missing < len(indices):
      later = min(i for i in indices if i > missing)
      fail(f"{letter}_{later} is declared but {letter}_{missing} is not: the {kind} must be "
           f"{letter}_0, {letter}_1, ... without gaps", indices[later])
  n_in, n_out = len(declared["X"]), len(declared["Y"])
  if n_in == 0:
    raise VnnlibError("declares no inputs: a VNN-LIB 1.0 file declares (declare-const X_0 Real), ...", source=source)
  if not any(tok == "(assert" for tok, _ in tokens):
    raise VnnlibError("no assertions: the inputs need bounds, (assert (<= X_0 ...)) ...", source=source)
  # 2.0 needs an output tensor of positive size; a file without Y_j gets a placeholder nobody reads.
  parts = [f"(vnnlib-version <2.0>) (declare-network N (declare-input X real [{n_in}]) "
           f"(declare-output Y real [{max(n_out, 1)}]))"]
  line = 1
  for tok, at in tokens:
    parts.append("\n" * (at - line) if at > line else " ")
    line = max(line, at)
    parts.append(tok)
  return "".join(parts), n_in, n_out


# ------------------------------------------------------------------------ the vnnlib package


_SYNTAX = re.compile(r"syntax error at line (\d+), column (\d+): '(.*)'\s*\Z", re.S)


def _parse_with_package(vnnlib, text: str, source, *, columns: bool):
  """``vnnlib.parse_query_string``, its errors turned into VnnlibError at the line it reports
  (columns only for 2.0 files: a translated 1.0 file keeps its lines, not its columns)."""
  try:
    return vnnlib.parse_query_string(text)
  except (vnnlib.VNNLibException, RuntimeError) as exc:
    raise _package_error(str(exc), source, columns) from None
  except (IndexError, ValueError, OverflowError) as exc:
    # pybind11's translations of C++ std::out_of_range and std::invalid_argument (e.g. from std::stod), or a
    # UnicodeDecodeError of a message quoting half a character; _read_forms rules out the causes it knows.
    raise VnnlibError(f"the vnnlib parser refuses the file ({type(exc).__name__}: {exc})", source=source) from None


def _package_error(message: str, source, columns: bool) -> VnnlibError:
  try:
    report = json.loads(message)
    errors = report["errors"]
    first = errors[0]
  except (ValueError, KeyError, IndexError, TypeError):
    syntax = _SYNTAX.search(message)
    if not syntax:
      return VnnlibError(f"the vnnlib parser refuses the file: {message.strip()}", source=source)
    line, col, tok = int(syntax.group(1)), int(syntax.group(2)), syntax.group(3)
    what = (f"syntax error at {tok[:40]!r}" if tok else
            "syntax error: the file ends too early (a 2.0 file declares its networks, then asserts at least once)")
    return VnnlibError(what, source=source, line=line, column=col if columns else None)
  what = f"{first.get('message', 'error')}: {first.get('offendingSymbol', '')!r}"
  if first.get("hint"):
    what += f" ({first['hint'].rstrip('.')})"
  if len(errors) > 1:
    what += f"; and {len(errors) - 1} more error(s)"
  line = first.get("line")
  return VnnlibError(what, source=source, line=line if isinstance(line, int) and line > 0 else None)
