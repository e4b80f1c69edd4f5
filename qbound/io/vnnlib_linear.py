"""The ``vnnlib`` package's comparisons as exact linear constraints: input bounds, ties, output rows.

The package parses a VNN-LIB assertion into a tree of comparisons between terms (sums, negations,
products by constants of variables and decimal literals) and puts it in disjunctive normal form;
its own linear forms are doubles. :class:`_Constraints` reads one comparison of that tree in exact
rational arithmetic, from the numbers as written, into what :mod:`qbound.io.vnnlib_reader` folds
into boxes and polytopes:

* a :class:`_Bound` ``x[net][flat] op value`` on one input element;
* a :class:`_Tie` ``x[low][flat] op x[high][flat]`` between the same element of two networks' inputs;
* one or two :class:`_Row` ``sum coeffs[j] y_j <= b`` over the concatenated flat outputs
  (``==`` gives two);
* or ``True`` / ``False`` for a comparison of constants.

Strict comparisons are read as their closures; anything else (``!=``, products of two variables,
constraints that mix inputs with outputs or relate two elements of one input, hidden nodes) raises
a :class:`~qbound.errors.VnnlibError` that names the line. Private to :mod:`qbound.io`.
"""

from __future__ import annotations

import decimal
from fractions import Fraction
from typing import NamedTuple, Optional

from qbound.errors import VnnlibError


class _Bound(NamedTuple):  # x[net][flat] op value
  net: int
  flat: int
  op: str                  # "<=", ">=" or "=="
  value: Fraction
  line: Optional[int]


class _Tie(NamedTuple):    # x[low][flat] op x[high][flat], low < high
  low: int
  high: int
  flat: int
  op: str
  line: Optional[int]


class _Row(NamedTuple):    # sum coeffs[j] y_j <= b
  coeffs: dict
  b: Fraction
  line: Optional[int]


_FLIP = {"<=": ">=", ">=": "<=", "==": "=="}


class _Constraints:
  """Comparisons of a parsed query as exact _Bound, _Tie and _Row over the given networks."""

  def __init__(self, vnnlib, networks, source):
    self.vnnlib, self.networks, self.source = vnnlib, networks, source
    self.index = {net.name: k for k, net in enumerate(networks)}
    v = vnnlib
    self.ops = {v.LessEqual: "<=", v.LessThan: "<", v.GreaterEqual: ">=", v.GreaterThan: ">", v.Equal: "==",
                v.NotEqual: "!="}

  def fail(self, what, line=None):
    raise VnnlibError(what, source=self.source, line=line)

  def first_line(self, node) -> Optional[int]:
    stack = [node]
    while stack:
      node = stack.pop()
      if isinstance(node, (self.vnnlib.Var, self.vnnlib.Literal)):
        return int(node.line)
      stack.extend(reversed(node.children()))
    return None

  def linear(self, expr) -> tuple[dict, Fraction]:
    """``expr`` as exact ``({(net, kind, flat): coefficient}, constant)``."""
    v = self.vnnlib
    if isinstance(expr, v.Var):
      kind = {v.SymbolKind.Input: "in", v.SymbolKind.Output: "out"}.get(expr.kind)
      if kind is None:
        self.fail(f"{expr.name} is not a network's input or output (hidden nodes are not supported)", expr.line)
      flat = 0
      for i, size in zip(expr.indices, expr.shape):
        flat = flat * int(size) + int(i)
      return {(self.index[expr.network_name], kind, flat): Fraction(1)}, Fraction(0)
    if isinstance(expr, v.Literal):
      try:
        return {}, Fraction(decimal.Decimal(expr.lexeme))
      except (ValueError, ArithmeticError):
        self.fail(f"cannot read the number {expr.lexeme[:40]!r}", expr.line)
    if isinstance(expr, v.Negate):
      terms, const = self.linear(expr.expr)
      return {k: -c for k, c in terms.items()}, -const
    if isinstance(expr, (v.Plus, v.Minus)):
      parts = [self.linear(arg) for arg in ((expr.head, *expr.rest) if isinstance(expr, v.Minus) else expr.args)]
      terms, const = dict(parts[0][0]), parts[0][1]
      sign = -1 if isinstance(expr, v.Minus) else 1
      for more, c in parts[1:]:
        const += sign * c
        for k, a in more.items():
          terms[k] = terms.get(k, 0) + sign * a
      return terms, const
    if isinstance(expr, v.Multiply):
      terms, const = {}, Fraction(1)  # (terms + const) * (more + c), at most one side with variables
      for arg in expr.args:
        more, c = self.linear(arg)
        if more and terms:
          self.fail("non-linear term: a product of two variables (VNN-LIB problems qbound reads are linear)",
                    self.first_line(expr))
        terms = {k: a * c for k, a in terms.items()} | {k: a * const for k, a in more.items()}
        const *= c
      return terms, const
    self.fail(f"unsupported term {str(expr).strip()[:60]!r}", self.first_line(expr))

  def atom(self, comparison):
    """One comparison as a _Bound, a _Tie, a list of _Row (two for ==), or a constant's truth."""
    op = self.ops.get(type(comparison))
    line = self.first_line(comparison)
    if op is None:
      self.fail(f"unsupported comparison {str(comparison).strip()[:60]!r}", line)
    left, right = self.linear(comparison.lhs), self.linear(comparison.rhs)
    terms = dict(left[0])
    for k, a in right[0].items():
      terms[k] = terms.get(k, 0) - a
    terms = {k: a for k, a in terms.items() if a != 0}
    const = left[1] - right[1]  # the atom is: sum terms + const  op  0
    if not terms:
      return {"<=": const <= 0, "<": const < 0, ">=": const >= 0, ">": const > 0, "==": const == 0,
              "!=": const != 0}[op]
    if op == "!=":
      self.fail("'!=' is not supported: its region is not closed (write (or (< a b) (> a b)))", line)
    closed = {"<": "<=", ">": ">="}.get(op, op)  # strict comparisons read as their closures
    kinds = {k[1] for k in terms}
    if kinds == {"out"}:
      coeffs = {self.networks[net].output_offset + flat: a for (net, _, flat), a in terms.items()}
      rows = []
      if closed in ("<=", "=="):
        rows.append(_Row(coeffs, -const, line))
      if closed in (">=", "=="):
        rows.append(_Row({j: -a for j, a in coeffs.items()}, const, line))
      return rows
    if kinds != {"in"}:
      self.fail("a constraint that mixes inputs and outputs is not supported (qbound reads input boxes "
                "and output polytopes)", line)
    if len(terms) == 1:
      ((net, _, flat), a), = terms.items()
      return _Bound(net, flat, closed if a > 0 else _FLIP[closed], -const / a, line)
    if len(terms) == 2 and const == 0:
      (k1, a1), (k2, a2) = sorted(terms.items())
      if k1[0] != k2[0] and k1[2] == k2[2] and a1 == -a2:
        if op in ("<", ">"):
          self.fail("a strict inequality between two networks' inputs is not supported (qbound reads "
                    "problems whose networks share one input: use ==)", line)
        return _Tie(k1[0], k2[0], k1[2], closed if a1 > 0 else _FLIP[closed], line)
    self.fail("unsupported input constraint: qbound reads bounds on single input elements and equalities "
              "between the same element of two networks' inputs (X_f[i] == X_g[i])", line)
