"""Read VNN-LIB verification problems (1.0 and 2.0): input boxes and unsafe output polytopes.

VNN-LIB (https://www.vnnlib.org) states a neural-network verification problem in SMT-LIB-like
syntax: constraints on a network's inputs and outputs whose conjunction describes a
**counterexample**. A verifier answers ``unsat`` (no input in the region reaches the unsafe
outputs: the property holds) or ``sat``. Two versions are in use:

* **1.0**, the classic form of VNN-COMP (Bak, Liu and Johnson, "The Second International
  Verification of Neural Networks Competition (VNN-COMP 2021): Summary and Results",
  arXiv:2109.00498) and of VeryDiff's files: ``(declare-const X_0 Real)`` ... for the flattened
  input and ``Y_0`` ... for the flattened output of one network, then ``(assert ...)`` s.
* **2.0**, the typed standard (https://github.com/VNNLIB/VNNLIB-Standard; VNN-COMP 2026 ships its
  problems in it): ``(vnnlib-version <2.0>)``, one ``(declare-network f (declare-input X real
  [1,5]) (declare-output Y real [1,5]))`` per network, tensor elements ``X[0,3]``, and
  assertions that may relate several networks (``(equal-to f)``, ``(isomorphic-to f)``).

Both go through one parser, the reference implementation of the 2.0 standard (the ``vnnlib``
package, A. Antony and M. Daggitt; ``pip install 'qbound[vnnlib]'``), which parses, scope- and
type-checks the file and puts each assertion in disjunctive normal form. A 1.0 file is first
translated to the equivalent 2.0 text (``X_i`` -> ``X[i]``, ``Y_j`` -> ``Y[j]`` of one network
named ``N`` with input shape ``(n,)`` and output shape ``(m,)``), token by token on the same
lines, so that the package's line numbers point into the 1.0 file (:mod:`qbound.io.vnnlib_syntax`
holds the tokenizer, that translation and the package's errors). Linear terms are folded in exact
rational arithmetic from the numbers as written (:mod:`qbound.io.vnnlib_linear`; the package's
linear forms are doubles). This module holds the public reader: the results, and the folding of
the package's disjunctive normal form into boxes and polytopes.

What you get (:class:`VnnlibProblem`): the version, the networks declared, and a list of cases.
The file's assertions, put together in disjunctive normal form, are a disjunction of clauses;
clauses with the same input box form one :class:`VnnlibCase`, whose unsafe region is the
disjunction of their output polytopes. The problem is ``sat`` iff for some case, some ``x`` in
``case.box`` has an output ``y`` in some polytope ``A y <= b`` of ``case.unsafe``.

* The box is over the input of the (first) network, float32, of its declared shape. For 1.0
  files, ``X_i`` is entry ``i`` of the flat input (row-major order, as qbound writes). Every
  input element needs a lower and an upper bound in every clause. A clause whose bounds
  contradict each other (``lower > upper``) describes no input and is dropped; if every clause
  does, the file is refused (inverted bounds).
* ``y`` is the concatenation of every network's flattened output, in declaration order:
  network ``k``'s output occupies columns ``offset_k : offset_k + size_k`` of ``A``
  (:attr:`VnnlibNetwork.output_offset`). For two networks ``f, g``: ``y = [y_f; y_g]``.
* Several networks must share one input: every element of every network's input tied to the
  same element of another's by an equality (``(== X_f[i] X_g[i])``, or ``<=`` and ``>=`` both),
  so that they are all one input, as in VNN-COMP 2026's isomorphic (original against perturbed)
  ACAS Xu problems. Bounds stated on any of the tied copies all apply.
* A file without output constraints (VeryDiff's files state only the input region) gives one
  polytope with no rows: every output is "unsafe", the property has to come from elsewhere
  (e.g. an error bound ``epsilon``). A 1.0 file that declares no ``Y_j`` reads as a network
  with output shape ``(0,)``.
* Strict comparisons (``<``, ``>``) are read as their closures (``<=``, ``>=``): the polytope
  and the box may gain their boundary. That only enlarges the unsafe set, so an ``unsat``
  proved on what qbound reads holds for the file; a counterexample exactly on the boundary may
  not be one for the file.

Numbers are decimals, read exactly (as rationals); 1.0 files may also write ``3``, ``.5`` or
``1e-3`` (translated exactly; 2.0's grammar has no exponents), within ``1e±300``. Box corners are rounded **outward** to
float32 (``np.nextafter`` when a decimal like 0.1 has no exact float32 value), so the float32 box
contains the real box of the file; files that :func:`qbound.io.export_vnnlib` writes hold exact
float32 values and read back bit for bit. Polytopes are float64: ``A`` rounded to nearest, ``b``
rounded up, so when ``A``'s entries are exact in float64 (``±1`` and ``0``, as in most properties)
the float64 polytope contains the real one.

Not supported, each with a :class:`~qbound.errors.VnnlibError` that says so: hidden-node
variables (``declare-hidden``), networks with several input or output tensors, multi-network
problems whose inputs are not all tied equal (e.g. monotonicity: ``X_f[0] >= X_g[0]``),
constraints that mix inputs with outputs or relate two elements of one input, ``!=``, and
non-linear terms (a product of two variables). Files that would take unbounded time are refused
too: parentheses nested over ``MAX_DEPTH`` deep, more than ``MAX_CLAUSES`` clauses in disjunctive
normal form, tensors of over ``MAX_ELEMENTS`` entries.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import pathlib
import re
import zlib
from fractions import Fraction
from typing import Optional

import numpy as np

from qbound.box import Box
from qbound.errors import VnnlibError
from qbound.io.vnnlib_linear import _Constraints, _Tie
from qbound.io.vnnlib_syntax import MAX_DEPTH as MAX_DEPTH  # the limits, all in the reader's namespace
from qbound.io.vnnlib_syntax import (_Atom, _decode, _import_vnnlib, _parse_with_package, _position, _read_forms,
                                     _translate_v1)
from qbound.props.spec import Polytope

MAX_CLAUSES = 100_000          # clauses of the disjunctive normal form, over all assertions
MAX_ELEMENTS = 10 ** 8         # entries of an input or of all outputs together
MAX_WORK = 5 * 10 ** 6         # input boxes (disjuncts with input constraints) x input entries
MAX_GZIP_BYTES = 2 ** 30       # a .gz file may not decompress to more than this
_F32_MAX = Fraction(float(np.finfo(np.float32).max))


# ---------------------------------------------------------------------------------- the results


@dataclasses.dataclass(frozen=True)
class VnnlibNetwork:
  """One declared network: the interface its ONNX model must have.

  Attributes:
    name: the declared name (``"N"`` for a 1.0 file).
    input_name, input_shape: the input tensor's name (``"X"`` for 1.0) and shape.
    output_name, output_shape: likewise for the output (``"Y"``).
    output_offset: where this network's flattened output starts in the columns of the polytopes
      (:class:`qbound.props.Polytope`, ``A`` of shape ``(rows, outputs)``, ``b`` of shape ``(rows,)``,
      both float64; no rows is every output).
    equal_to: the network this one is declared ``(equal-to ...)``: the same model; or None.
    isomorphic_to: the network this one is declared ``(isomorphic-to ...)``: same interface,
      other weights (e.g. a compressed copy); or None.
  """

  name: str
  input_name: str
  input_shape: tuple[int, ...]
  output_name: str
  output_shape: tuple[int, ...]
  output_offset: int = 0
  equal_to: Optional[str] = None
  isomorphic_to: Optional[str] = None

  @property
  def output_size(self) -> int:
    return math.prod(self.output_shape)


@dataclasses.dataclass(frozen=True, eq=False)
class VnnlibCase:
  """One input box and the unsafe outputs over it.

  Attributes:
    box: the input box (float32, the declared input shape), rounded outward from the file's.
    unsafe: the unsafe output region, a disjunction (tuple) of :class:`qbound.props.Polytope`
      (the property engine's own, also ``qbound.io.Polytope``).
  """

  box: Box
  unsafe: tuple[Polytope, ...]

  def __repr__(self) -> str:
    return f"VnnlibCase(box=<shape {self.box.shape}>, unsafe={self.unsafe!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class VnnlibProblem:
  """A VNN-LIB problem: ``sat`` iff for some case some ``x`` in ``case.box`` has an output in
  ``case.unsafe`` (see the module docstring for the layout and the rounding).

  Attributes:
    source: the file read (or the name given to :func:`parse_vnnlib`).
    version: ``"1.0"`` or the file's 2.x version, e.g. ``"2.0"``.
    networks: the declared networks, in order; one for 1.0.
    cases: the cases (a disjunction over input boxes gives several); none if the assertions
      contradict each other.
  """

  source: str
  version: str
  networks: tuple[VnnlibNetwork, ...]
  cases: tuple[VnnlibCase, ...]

  @property
  def box(self) -> Box:
    """The input box, when the problem has exactly one case (raises VnnlibError otherwise)."""
    if len(self.cases) != 1:
      raise VnnlibError(f"the problem has {len(self.cases)} input boxes, not one: use .cases", source=self.source)
    return self.cases[0].box

  @property
  def output_size(self) -> int:
    """The number of columns of the polytopes: all networks' outputs together."""
    return sum(net.output_size for net in self.networks)

  def __repr__(self) -> str:
    return (f"VnnlibProblem(source={self.source!r}, version={self.version!r}, "
            f"networks={self.networks!r}, cases=<{len(self.cases)}>)")


# ---------------------------------------------------------------------------------- public API


def load_vnnlib(path: str | os.PathLike) -> VnnlibProblem:
  """Read a VNN-LIB 1.0 or 2.0 file (optionally gzip-compressed) into boxes and polytopes.

  VNN-LIB: https://www.vnnlib.org and the 2.0 standard https://github.com/VNNLIB/VNNLIB-Standard;
  the classic 1.0 form as in VNN-COMP (Bak, Liu and Johnson, arXiv:2109.00498). The semantics,
  the output layout for several networks and the rounding are in the module docstring.

  Args:
    path: a ``.vnnlib`` file, or a gzip-compressed one (``.vnnlib.gz``, as VNN-COMP ships them).

  Returns:
    A :class:`VnnlibProblem`.

  Raises:
    VnnlibError: the file is not VNN-LIB, is broken (the message names the line and what is
      wrong), or states something qbound does not support.
    ImportError: the ``vnnlib`` package is missing (``pip install 'qbound[vnnlib]'``).

  Example:
    >>> import tempfile, numpy as np, qbound as qb
    >>> box = qb.Box(np.zeros(2, np.float32), np.full(2, 0.1, np.float32))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   problem = qb.io.load_vnnlib(qb.io.export_vnnlib(box, f"{tmp}/p.vnnlib", epsilon=0.25, num_outputs=1))
    >>> problem.version, problem.box.upper, problem.cases[0].unsafe
    ('1.0', array([0.1, 0.1], dtype=float32), (Polytope(rows=1, outputs=1), Polytope(rows=1, outputs=1)))
    >>> [(p.A.tolist(), p.b.tolist()) for p in problem.cases[0].unsafe]   # Y_0 >= 0.25 or Y_0 <= -0.25
    [([[-1.0]], [-0.25]), ([[1.0]], [-0.25])]
  """
  path = pathlib.Path(path)
  data = path.read_bytes()
  if data[:2] == b"\x1f\x8b":
    try:
      with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        data = stream.read(MAX_GZIP_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
      raise VnnlibError(f"a broken gzip file ({exc})", source=str(path)) from None
    if len(data) > MAX_GZIP_BYTES:
      raise VnnlibError(f"decompresses to more than {MAX_GZIP_BYTES} bytes", source=str(path))
  return parse_vnnlib(data, source=str(path))


def parse_vnnlib(text: str | bytes, *, source: str = "<string>") -> VnnlibProblem:
  """:func:`load_vnnlib` for the text of a file (``str``, or UTF-8 ``bytes``).

  Args:
    text: the VNN-LIB text.
    source: the name error messages give for it.

  Returns:
    A :class:`VnnlibProblem`.

  Example:
    >>> p = parse_vnnlib('''(vnnlib-version <2.0>)
    ... (declare-network f (declare-input X real [2]) (declare-output Y real [1]))
    ... (assert (and (>= X[0] 0.0) (<= X[0] 1.0) (>= X[1] -1.0) (<= X[1] 1.0)))
    ... (assert (> Y[0] 0.5))''')
    >>> p.version, p.networks[0].input_shape, p.box.lower, [q.b.tolist() for q in p.cases[0].unsafe]
    ('2.0', (2,), array([ 0., -1.], dtype=float32), [[-0.5]])
  """
  vnnlib = _import_vnnlib()
  text = _decode(bytes(text), source) if isinstance(text, (bytes, bytearray)) else text.removeprefix("\ufeff")
  bad = re.search(r"[\x00-\x08\x0e-\x1f\x7f]", text)
  if bad:
    line, col = _position(text, bad.start())
    raise VnnlibError(f"control character U+{ord(bad.group()):04X}: this is not a text file", source=source,
                      line=line, column=col)
  forms = _read_forms(text, source)
  if not forms:
    raise VnnlibError("empty file: no VNN-LIB declarations or assertions", source=source)
  head = forms[0].items[0] if forms[0].items else None
  if isinstance(head, _Atom) and head.text == "vnnlib-version":
    version_atom = forms[0].items[1] if len(forms[0].items) > 1 else None
    version = version_atom.text.strip("<>") if isinstance(version_atom, _Atom) else "2"
    query = _parse_with_package(vnnlib, text, source, columns=True)
    networks, names = _networks_v2(query, text, source), _v2_name
  else:
    version = "1.0"
    text2, n_in, n_out = _translate_v1(forms, source)
    query = _parse_with_package(vnnlib, text2, source, columns=False)
    networks, names = (VnnlibNetwork("N", "X", (n_in,), "Y", (n_out,)),), _v1_name
  for net in networks:
    if math.prod(net.input_shape) > MAX_ELEMENTS:
      raise VnnlibError(f"network {net.name!r}'s input has more than {MAX_ELEMENTS} entries", source=source)
  if sum(net.output_size for net in networks) > MAX_ELEMENTS:
    raise VnnlibError(f"the outputs have more than {MAX_ELEMENTS} entries together", source=source)
  cases = _Assertions(vnnlib, query, networks, source, names).cases()
  return VnnlibProblem(source=source, version=version, networks=networks, cases=cases)


# ------------------------------------------------------------------------ names and networks


def _v1_name(kind: str, net: VnnlibNetwork, flat: int) -> str:
  return f"{'X' if kind == 'in' else 'Y'}_{flat}"


def _v2_name(kind: str, net: VnnlibNetwork, flat: int) -> str:
  shape = net.input_shape if kind == "in" else net.output_shape
  name = net.input_name if kind == "in" else net.output_name
  return f"{name}[{','.join(str(int(i)) for i in np.unravel_index(flat, shape))}]" if shape else name


def _declaration_line(text: str, pattern: str) -> Optional[int]:
  match = re.search(pattern, text)
  return _position(text, match.start())[0] if match else None


def _networks_v2(query, text: str, source) -> tuple[VnnlibNetwork, ...]:
  networks, offset = [], 0
  for net in query.networks:
    line = _declaration_line(text, r"\(\s*declare-network\s+" + re.escape(net.name) + r"(?![\w@])")
    if net.hidden:
      raise VnnlibError(f"network {net.name!r} declares hidden nodes ({net.hidden[0].name}): not supported",
                        source=source, line=line)
    if len(net.inputs) != 1 or len(net.outputs) != 1:
      raise VnnlibError(f"network {net.name!r} declares {len(net.inputs)} input and {len(net.outputs)} output "
                        f"tensors: qbound reads networks with one of each", source=source, line=line)
    x, y = net.inputs[0], net.outputs[0]
    networks.append(VnnlibNetwork(
        name=net.name, input_name=x.name, input_shape=tuple(int(d) for d in x.shape), output_name=y.name,
        output_shape=tuple(int(d) for d in y.shape), output_offset=offset, equal_to=net.equal_to or None,
        isomorphic_to=net.isometric_to or None))
    offset += networks[-1].output_size
  return tuple(networks)


# ------------------------------------------------------------------------------ the assertions


def _show(value: Fraction) -> str:
  return f"{float(value):.9g}" if abs(value) < 10 ** 300 else f"{'-' if value < 0 else ''}(beyond 1e300)"


class _Assertions:
  """The assertions of a parsed query, in disjunctive normal form, grouped into cases."""

  def __init__(self, vnnlib, query, networks, source, name):
    self.vnnlib, self.query, self.networks, self.source, self.name = vnnlib, query, networks, source, name
    self.constraints = _Constraints(vnnlib, networks, source)
    self.entries = 0  # of the polytopes made so far

  def fail(self, what, line=None):
    raise VnnlibError(what, source=self.source, line=line)

  def dnf_size(self, expr) -> int:
    if isinstance(expr, self.vnnlib.And):
      size = 1
      for arg in expr.args:
        size = min(size * self.dnf_size(arg), MAX_CLAUSES + 1)
      return size
    if isinstance(expr, self.vnnlib.Or):
      return min(sum(self.dnf_size(arg) for arg in expr.args), MAX_CLAUSES + 1)
    return 1

  # ---- clauses and cases

  def clauses(self) -> tuple[tuple[list, list], list[tuple[list, list]]]:
    """The assertions in disjunctive normal form: the (input atoms, output rows) every clause has
    (from assertions without a disjunction), and each clause's own."""
    common, clauses = ([], []), [([], [])]
    for assertion in self.query.assertions:
      expr = assertion.expr
      line = self.constraints.first_line(expr)
      if self.dnf_size(expr) * len(clauses) > MAX_CLAUSES:
        self.fail(f"the disjunctive normal form of the assertions has more than {MAX_CLAUSES} clauses", line)
      try:
        dnf = expr.to_dnf()
      except (self.vnnlib.VNNLibException, RuntimeError) as exc:
        self.fail(f"the vnnlib parser cannot put this assertion in normal form: {exc}", line)
      options = []
      for conjunction in dnf:
        inputs, rows = [], []
        for comparison in conjunction:
          result = self.constraints.atom(comparison)
          if result is False:
            break
          if isinstance(result, list):
            rows.extend(result)
          elif result is not True:
            inputs.append(result)
        else:
          options.append((inputs, rows))
      if len(options) == 1:
        common[0].extend(options[0][0])
        common[1].extend(options[0][1])
      else:
        clauses = [(i1 + i2, r1 + r2) for i1, r1 in clauses for i2, r2 in options]
      if not clauses:
        break
    return common, clauses

  def box(self, inputs: list, clause: int, of: int):
    """The exact box of one clause: (lower, upper) lists of (Fraction, line) over the shared input,
    or the VnnlibError to raise if every clause's box is empty like this one."""
    nets = self.networks
    where = f" (in disjunct {clause + 1} of {of})" if of > 1 else ""
    lower, upper = [{} for _ in nets], [{} for _ in nets]
    ties: dict[tuple[int, int, int], dict[str, Optional[int]]] = {}
    for atom in inputs:
      if isinstance(atom, _Tie):
        ties.setdefault((atom.flat, atom.low, atom.high), {})
        for op in (("<=", ">=") if atom.op == "==" else (atom.op,)):
          ties[(atom.flat, atom.low, atom.high)].setdefault(op, atom.line)
        continue
      if atom.op in (">=", "=="):
        old = lower[atom.net].get(atom.flat)
        if old is None or atom.value > old[0]:
          lower[atom.net][atom.flat] = (atom.value, atom.line)
      if atom.op in ("<=", "=="):
        old = upper[atom.net].get(atom.flat)
        if old is None or atom.value < old[0]:
          upper[atom.net][atom.flat] = (atom.value, atom.line)
    size = math.prod(nets[0].input_shape)
    if len(nets) > 1:
      for (flat, low, high), ops in ties.items():
        if len(ops) == 1:
          (op, line), = ops.items()
          self.fail(f"{self.name('in', nets[low], flat)} {op} {self.name('in', nets[high], flat)} alone{where}: an "
                    f"inequality between two networks' inputs (as in monotonicity problems) is not supported; "
                    f"qbound reads problems whose networks share one input", line)
      for k, net in enumerate(nets[1:], 1):
        if net.input_shape != nets[0].input_shape:
          self.fail(f"networks {nets[0].name!r} and {net.name!r} have inputs of different shapes "
                    f"({nets[0].input_shape} and {net.input_shape}): they cannot share one input")
      by_flat: dict[int, list] = {}
      for flat, low, high in ties:
        by_flat.setdefault(flat, []).append((low, high))

      def root(parent, k):
        while parent[k] != k:
          k = parent[k]
        return k

      for flat in range(size):  # stops at the first element not tied: at most len(ties) + 1 rounds
        parent = list(range(len(nets)))
        for low, high in by_flat.get(flat, ()):
          parent[root(parent, high)] = root(parent, low)
        loose = next((k for k in range(1, len(nets)) if root(parent, k) != root(parent, 0)), None)
        if loose is not None:
          self.fail(f"{self.name('in', nets[loose], flat)} is not tied to {self.name('in', nets[0], flat)}{where}: "
                    f"qbound reads multi-network problems whose networks share one input, stated as "
                    f"(== {self.name('in', nets[0], flat)} {self.name('in', nets[loose], flat)}) for every element")
      for k in range(1, len(nets)):  # tied copies: every bound applies to the one shared input
        for flat, (value, line) in lower[k].items():
          if flat not in lower[0] or value > lower[0][flat][0]:
            lower[0][flat] = (value, line)
        for flat, (value, line) in upper[k].items():
          if flat not in upper[0] or value < upper[0][flat][0]:
            upper[0][flat] = (value, line)
    lower, upper = lower[0], upper[0]
    for bounds, other, side in ((lower, upper, "lower"), (upper, lower, "upper")):
      if len(bounds) < size:
        flat = next(i for i in range(size) if i not in bounds)
        known = other.get(flat)
        self.fail(f"input {self.name('in', nets[0], flat)} has no {side} bound{where}"
                  + (f" (its other bound is at line {known[1]})" if known else "")
                  + ": every input needs a lower and an upper bound", known[1] if known else None)
    for flat in range(size):
      if lower[flat][0] > upper[flat][0]:
        return VnnlibError(f"inverted bounds for input {self.name('in', nets[0], flat)}{where}: lower bound "
                           f"{_show(lower[flat][0])} (line {lower[flat][1]}) > upper bound {_show(upper[flat][0])} "
                           f"(line {upper[flat][1]}): the box is empty", source=self.source, line=lower[flat][1])
    return [lower[i] for i in range(size)], [upper[i] for i in range(size)]

  def cases(self) -> tuple[VnnlibCase, ...]:
    (common_inputs, common_rows), clauses = self.clauses()
    own = sum(1 for inputs, _ in clauses if inputs)  # clauses with input atoms of their own
    size = math.prod(self.networks[0].input_shape)
    if own * (len(common_inputs) + size) > MAX_WORK:
      self.fail(f"too large a disjunction over inputs: {own} input boxes of {size} entries")
    grouped: dict[tuple, tuple[list, list, list]] = {}  # exact box -> (lower, upper, row sets)
    shared, empty = None, None  # the group of the clauses without input atoms of their own, found once
    for k, (inputs, rows) in enumerate(clauses):
      group = shared
      if inputs or shared is None:
        box = self.box(common_inputs + inputs, k, len(clauses) if inputs else 1)
        if isinstance(box, VnnlibError):  # a disjunct no input satisfies: nothing to check
          empty, group = empty or box, box
        else:
          group = grouped.setdefault((tuple(v for v, _ in box[0]), tuple(v for v, _ in box[1])), (*box, []))
        shared = shared if inputs else group
      if not isinstance(group, VnnlibError):
        group[2].append(common_rows + rows)
    if empty and not grouped:
      raise empty
    shape = self.networks[0].input_shape
    cases, cache = [], {}
    for lower, upper, row_sets in grouped.values():
      lo = np.array([self.to_float32(v, line, "lower", cache) for v, line in lower], np.float32).reshape(shape)
      hi = np.array([self.to_float32(v, line, "upper", cache) for v, line in upper], np.float32).reshape(shape)
      lo.flags.writeable = hi.flags.writeable = False
      unsafe, seen = [], set()
      for rows in row_sets:
        polytope = self.polytope(rows)
        key = (polytope.A.shape, polytope.A.tobytes(), polytope.b.tobytes())
        if key not in seen:
          seen.add(key)
          unsafe.append(polytope)
      cases.append(VnnlibCase(box=Box(lower=lo, upper=hi), unsafe=tuple(unsafe)))
    return tuple(cases)

  # ---- numbers

  def to_float32(self, value: Fraction, line, side: str, cache: dict) -> np.float32:
    """``value`` rounded outward (down for a lower bound, up for an upper one) to float32."""
    if (value, side) in cache:
      return cache[(value, side)]
    if not -_F32_MAX <= value <= _F32_MAX:
      self.fail(f"the {side} bound {_show(value)} lies outside the float32 range", line)
    result = np.float32(float(value))
    toward = np.float32(-np.inf if side == "lower" else np.inf)
    while (Fraction(float(result)) > value) if side == "lower" else (Fraction(float(result)) < value):
      result = np.nextafter(result, toward)
    cache[(value, side)] = result
    return result

  def polytope(self, rows: list) -> Polytope:
    width = sum(net.output_size for net in self.networks)
    self.entries += len(rows) * width
    if self.entries > MAX_ELEMENTS:
      self.fail(f"the output polytopes have more than {MAX_ELEMENTS} entries together (dense): too large")
    A, b = np.zeros((len(rows), width)), np.zeros(len(rows))
    for r, row in enumerate(rows):
      try:
        for j, a in row.coeffs.items():
          A[r, j] = float(a)
        b[r] = float(row.b)
      except OverflowError:
        self.fail("a number in this output constraint is beyond the float64 range", row.line)
      if Fraction(b[r]) < row.b:
        b[r] = math.nextafter(b[r], math.inf)
    A.flags.writeable = b.flags.writeable = False
    return Polytope(A=A, b=b)
