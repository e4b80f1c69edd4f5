"""Tests of qbound.io.load_vnnlib: VNN-LIB 1.0 and 2.0 problems read into float32 boxes and unsafe
output polytopes.

Every file ``export_vnnlib`` writes reads back to exactly its box and property; decimal corners are
rounded outward to the nearest float32 values (checked against exact rationals); the real VeryDiff
files (when ``../shared/bench`` is present); a hand-written 2.0 problem over two networks; and clear
errors (file, line, what) on broken or unsupported files. Fuzzing: random bytes, every truncation of a
valid file, token soup and deleted parentheses give a problem or a VnnlibError, never another
exception, and quickly.
"""

import doctest
import gzip
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qbound as qb
from qbound.errors import VnnlibError
from qbound.io import vnnlib_linear, vnnlib_reader, vnnlib_syntax
from qbound.io.vnnlib import vnnlib_text
from qbound.io.vnnlib_reader import load_vnnlib, parse_vnnlib

vnnlib = pytest.importorskip("vnnlib", reason="the vnnlib package is needed (pip install 'qbound[vnnlib]')")

BENCH = Path(__file__).parents[1] / ".." / "shared" / "bench"
VERYDIFF = BENCH / "verydiff"
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SECONDS_PER_PARSE = 2.0  # a parse of a small file takes milliseconds; this catches hangs


def outward(value, side):
  """The largest float32 <= value (side "lower") or the smallest >= value ("upper"), for a Fraction."""
  near = np.float32(float(value))
  candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
  if side == "lower":
    return max(c for c in candidates if Fraction(float(c)) <= value)
  return min(c for c in candidates if Fraction(float(c)) >= value)


def expected_unsafe(n_out, epsilon, outputs):
  """The polytopes of export_vnnlib's negated property: Y_j >= eps_j or Y_j <= -eps_j, per checked j."""
  eps = np.broadcast_to(np.asarray(epsilon, np.float64).reshape(-1), (n_out,))
  result = []
  for j in sorted(set(outputs if outputs is not None else range(n_out))):
    unit = np.eye(n_out)[j]
    result += [(-unit[None], np.array([-eps[j]])), (unit[None], np.array([-eps[j]]))]
  return result


def assert_unsafe(case, want):
  got = [(p.A, p.b) for p in case.unsafe]
  assert len(got) == len(want), (got, want)
  for (a, b), (wa, wb) in zip(got, want):
    assert a.dtype == b.dtype == np.float64
    np.testing.assert_array_equal(a, wa)
    np.testing.assert_array_equal(b, wb)


def parse_or_refuse(text):
  """A problem, or VnnlibError (anything else fails the test), within SECONDS_PER_PARSE."""
  start = time.perf_counter()
  try:
    problem = parse_vnnlib(text, source="fuzz.vnnlib")
  except VnnlibError as exc:
    assert str(exc).startswith("fuzz.vnnlib"), str(exc)
    problem = None
  else:
    for case in problem.cases:
      assert case.box.lower.dtype == np.float32 and np.all(case.box.lower <= case.box.upper)
  assert time.perf_counter() - start < SECONDS_PER_PARSE
  return problem


# --------------------------------------------------------------------------- round trips, numbers


@pytest.mark.parametrize("shape, epsilon, num_outputs, outputs", [
    ((3,), 0.25, 2, None),
    ((2, 2), [0.5, 0.0, 1e-30], (3,), [2, 0]),
    ((1, 1, 3), 0.1, 4, [1]),
])
def test_export_vnnlib_files_read_back_exactly(tmp_path, shape, epsilon, num_outputs, outputs):
  rng = np.random.default_rng(3)
  lower = (rng.standard_normal(shape) * 10.0 ** rng.integers(-12, 12, shape)).astype(np.float32)
  box = qb.Box(lower, lower + np.abs(lower) * np.float32(0.1))  # corners like 0.1: long decimals
  path = qb.io.export_vnnlib(box, tmp_path / "p.vnnlib", epsilon=epsilon, num_outputs=num_outputs, outputs=outputs)
  problem = load_vnnlib(path)
  n_in, n_out = int(np.prod(shape)), int(np.prod(num_outputs))
  assert problem.version == "1.0" and problem.source == str(path) and len(problem.cases) == 1
  assert problem.networks == (qb.io.VnnlibNetwork("N", "X", (n_in,), "Y", (n_out,)),)
  got = problem.box  # flat, as VNN-LIB 1.0 declares the input
  assert got.lower.dtype == got.upper.dtype == np.float32
  np.testing.assert_array_equal(got.lower, box.lower.reshape(-1))
  np.testing.assert_array_equal(got.upper, box.upper.reshape(-1))
  assert_unsafe(problem.cases[0], expected_unsafe(n_out, epsilon, outputs))


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@FUZZ
@given(pairs=st.lists(st.tuples(finite32, finite32), min_size=1, max_size=6),
       epsilon=st.floats(0, float(np.float32(1e30)), width=32), n_out=st.integers(1, 4))
def test_export_round_trip_on_any_float32_box(pairs, epsilon, n_out):
  lower = np.array([min(p) for p in pairs], np.float32)
  upper = np.array([max(p) for p in pairs], np.float32)
  problem = parse_vnnlib(vnnlib_text(qb.Box(lower, upper), epsilon=epsilon, num_outputs=n_out))
  np.testing.assert_array_equal(problem.box.lower, lower)  # bit for bit, up to the sign of zero
  np.testing.assert_array_equal(problem.box.upper, upper)
  assert_unsafe(problem.cases[0], expected_unsafe(n_out, np.float64(np.float32(epsilon)), None))


def test_float64_and_decimal_corners_round_outward():
  # float64 corners (export writes them exactly) and decimals: the float32 box must contain them, tightly.
  values = ["0.1", "-0.1", "1e-3", ".5", "3", "-2.5E2", "0.33333333333333333333333333", "1e-50", "-1e-50",
            "16777217", "0.1000000000000000055511151231257827021181583404541015625", "-0.0"]
  text = "".join(f"(declare-const X_{i} Real)\n" for i in range(len(values)))
  text += "".join(f"(assert (>= X_{i} {v}))\n(assert (<= X_{i} {v}))\n" for i, v in enumerate(values))
  box = parse_vnnlib(text).box
  for i, v in enumerate(values):
    exact = Fraction(v)
    assert box.lower[i] == outward(exact, "lower") and box.upper[i] == outward(exact, "upper"), v
    assert Fraction(float(box.lower[i])) <= exact <= Fraction(float(box.upper[i]))
    if Fraction(float(np.float32(float(exact)))) == exact:  # representable: no widening
      assert box.lower[i] == box.upper[i]
  assert box.lower[0] < np.float32(0.1) == box.upper[0]  # float32(0.1) lies above 0.1


def test_outputs_polytopes_are_exact_or_rounded_up():
  text = """(vnnlib-version <2.0>)
(declare-network f (declare-input X real [1]) (declare-output Y real [3]))
(assert (and (>= X[0] 0.0) (<= X[0] 1.0)))
(assert (or (>= Y[0] 0.1) (<= (- Y[1] (* 0.5 Y[2])) -0.25) (== Y[2] 2.0)))"""
  (p1, p2, p3), = [c.unsafe for c in parse_vnnlib(text).cases]
  np.testing.assert_array_equal(p1.A, [[-1, 0, 0]])
  assert p1.b[0] >= -0.1 and Fraction(p1.b[0]) >= Fraction("-0.1") and p1.b[0] == np.nextafter(-0.1, 1)
  np.testing.assert_array_equal(p2.A, [[0, 1, -0.5]])
  np.testing.assert_array_equal(p2.b, [-0.25])
  np.testing.assert_array_equal(p3.A, [[0, 0, 1], [0, 0, -1]])
  np.testing.assert_array_equal(p3.b, [2, -2])
  assert p3.contains([7, 7, 2]) and not p3.contains([7, 7, 2.5]) and not p1.contains([0.05, 0, 0])


# ---------------------------------------------------------------------------------- real files


@pytest.mark.skipif(not (VERYDIFF / "sigma_0.1.vnnlib").exists(),
                    reason=f"VeryDiff's files not found under {VERYDIFF.resolve()} (the shared bench checkout)")
def test_verydiff_lhc_box():
  problem = load_vnnlib(VERYDIFF / "sigma_0.1.vnnlib")
  assert problem.version == "1.0" and problem.networks[0].input_shape == (16,)
  assert problem.networks[0].output_shape == (5,)
  np.testing.assert_array_equal(problem.box.lower, np.full(16, outward(Fraction("-0.1"), "lower")))
  np.testing.assert_array_equal(problem.box.upper, np.full(16, outward(Fraction("0.1"), "upper")))
  (polytope,), = [case.unsafe for case in problem.cases]  # no output constraint: every output
  assert polytope.A.shape == (0, 5) and polytope.contains(np.arange(5.0))


@pytest.mark.parametrize("name", ["mnist_0_local_15.vnnlib", "mnist_7_local_15.vnnlib"])
def test_verydiff_mnist_boxes(name):
  path = VERYDIFF / name
  if not path.exists():
    pytest.skip(f"{name} not found under {VERYDIFF.resolve()} (the shared bench checkout)")
  problem = load_vnnlib(path)
  assert problem.networks[0].input_shape == (784,) and problem.networks[0].output_shape == (0,)
  # An independent reading of the two statement forms these files use.
  bounds = {}
  for line in path.read_text().splitlines():
    parts = line.replace("(", " ").replace(")", " ").split()
    if parts[:2] == ["assert", "<="]:
      left, right = parts[2:]
      if left.startswith("X_"):
        bounds[("upper", int(left[2:]))] = Fraction(right)
      else:
        bounds[("lower", int(right[2:]))] = Fraction(left)
  assert len(bounds) == 2 * 784
  for side in ("lower", "upper"):
    want = np.array([outward(bounds[(side, i)], side) for i in range(784)], np.float32)
    np.testing.assert_array_equal(getattr(problem.box, side), want)
  free = [i for i in range(784) if bounds[("lower", i)] != bounds[("upper", i)]]
  assert len(free) == 15 and all(problem.box.lower[i] == 0 and problem.box.upper[i] == 1 for i in free)
  fixed = np.setdiff1d(np.arange(784), free)  # one float32 step wide at most (exact for 0 and 1)
  assert np.all(np.nextafter(problem.box.lower[fixed], np.float32(np.inf)) >= problem.box.upper[fixed])


# ------------------------------------------------------------------- two networks, disjunctions


TWO = """(vnnlib-version <2.0>)
; f and its compressed copy g: is |f(x)_0 - g(x)_0| <= 0.05 and f(x)_1 - g(x)_1 < 0.125 on the box?
(declare-network f
  (declare-input X_f real [1, 2])
  (declare-output Y_f real [2]))
(declare-network g
  (isomorphic-to f)
  (declare-input X_g real [1, 2])
  (declare-output Y_g real [2]))
(assert (and (>= X_f[0,0] -1.0) (<= X_f[0,0] 1.0)))
(assert (and (>= X_f[0,1] 0.0) (<= X_f[0,1] 0.5)))
(assert (<= X_g[0,1] 0.25))
(assert (== X_f[0,0] X_g[0,0]))
(assert (== X_g[0,1] X_f[0,1]))
(assert (or (> Y_g[0] (+ Y_f[0] 0.05))
            (< Y_g[0] (- Y_f[0] 0.05))
            (>= (- Y_f[1] Y_g[1]) 0.125)))
"""


def test_two_networks_sharing_one_input(tmp_path):
  path = tmp_path / "pair.vnnlib.gz"
  path.write_bytes(gzip.compress(TWO.encode()))  # VNN-COMP ships its problems compressed
  problem = load_vnnlib(path)
  f, g = problem.networks
  assert (f.name, f.input_name, f.input_shape, f.output_shape, f.output_offset) == ("f", "X_f", (1, 2), (2,), 0)
  assert (g.name, g.output_name, g.output_offset, g.isomorphic_to, g.equal_to) == ("g", "Y_g", 2, "f", None)
  assert problem.output_size == 4 and problem.version == "2.0"
  # One shared input; the bound stated on X_g's copy applies to it.
  np.testing.assert_array_equal(problem.box.lower, [[-1, 0]])
  np.testing.assert_array_equal(problem.box.upper, [[1, 0.25]])
  (first, second, third), = [case.unsafe for case in problem.cases]
  np.testing.assert_array_equal(first.A, [[1, 0, -1, 0]])  # columns: [y_f; y_g]
  np.testing.assert_array_equal(second.A, [[-1, 0, 1, 0]])
  np.testing.assert_array_equal(third.A, [[0, -1, 0, 1]])
  assert first.b[0] == second.b[0] == np.nextafter(-0.05, 1) and third.b[0] == -0.125
  unsafe = lambda y: any(p.contains(y) for p in problem.cases[0].unsafe)
  assert unsafe([0.0, 0.0, 0.06, 0.0]) and unsafe([0.0, 0.0, -0.06, 0.0]) and unsafe([0, 1.0, 0, 0.5])
  assert not unsafe([0.0, 0.0, 0.04, 0.0]) and not unsafe([0, 1.0, 0, 0.9])


def test_polytopes_are_the_property_engines():
  # One Polytope class: the reader's polytopes feed qb.props.Unsafe as they are.
  assert qb.io.Polytope is qb.props.Polytope
  problem = parse_vnnlib(TWO)
  polytopes = problem.cases[0].unsafe
  assert all(type(p) is qb.props.Polytope and p.A.dtype == p.b.dtype == np.float64 for p in polytopes)
  assert not any(p.A.flags.writeable or p.b.flags.writeable for p in polytopes)
  prop = qb.props.Unsafe(polytopes)
  assert prop.violated([0.0, 0.0], [0.06, 0.0]) and not prop.violated([0.0, 0.0], [0.04, 0.0])
  no_outputs = parse_vnnlib("(declare-const X_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n")
  everything, = no_outputs.cases[0].unsafe  # no output constraints: one polytope without rows
  assert everything.A.shape == (0, 0) and everything.contains(np.zeros(0))


def test_inputs_tied_by_two_inequalities_or_through_a_third_network():
  both = TWO.replace("(assert (== X_f[0,0] X_g[0,0]))",
                     "(assert (<= X_f[0,0] X_g[0,0])) (assert (>= X_f[0,0] X_g[0,0]))")
  np.testing.assert_array_equal(parse_vnnlib(both).box.upper, [[1, 0.25]])
  three = """(vnnlib-version <2.0>)
(declare-network a (declare-input A real [1]) (declare-output P real [1]))
(declare-network b (equal-to a) (declare-input B real [1]) (declare-output Q real [1]))
(declare-network c (declare-input C real [1]) (declare-output R real [2]))
(assert (== A[0] B[0])) (assert (== C[0] B[0])) (assert (>= C[0] 0.0)) (assert (<= A[0] 2.0))
(assert (<= R[1] P[0]))"""
  problem = parse_vnnlib(three)
  assert [n.output_offset for n in problem.networks] == [0, 1, 2] and problem.networks[1].equal_to == "a"
  assert (float(problem.box.lower[0]), float(problem.box.upper[0])) == (0.0, 2.0)
  np.testing.assert_array_equal(problem.cases[0].unsafe[0].A, [[-1, 0, 0, 1]])


def test_v1_disjunction_of_input_boxes():
  text = """; VNN-COMP style: input boxes inside the disjunction
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(assert (or
  (and (>= X_0 0.0) (<= X_0 0.5) (>= X_1 -1) (<= X_1 1) (>= Y_0 Y_1))
  (and (>= X_0 0.5) (<= X_0 1.0) (>= X_1 -1) (<= X_1 1) (>= Y_0 Y_1))
  (and (>= X_0 0.5) (<= X_0 1.0) (>= X_1 -1) (<= X_1 1) (<= Y_0 (- 2)))
  (and (<= 0.5 X_0) (<= X_0 1.0) (>= X_1 -1) (<= X_1 1) (<= Y_0 (- 2)))))
"""
  problem = parse_vnnlib(text)
  assert len(problem.cases) == 2
  first, second = problem.cases
  np.testing.assert_array_equal(first.box.lower, [0, -1])
  np.testing.assert_array_equal(first.box.upper, [0.5, 1])
  np.testing.assert_array_equal(second.box.lower, [0.5, -1])
  assert len(first.unsafe) == 1 and len(second.unsafe) == 2  # the repeated clause is kept once
  np.testing.assert_array_equal(second.unsafe[1].A, [[1, 0]])
  np.testing.assert_array_equal(second.unsafe[1].b, [-2])
  with pytest.raises(VnnlibError, match="2 input boxes"):
    problem.box
  # The same problem with the input disjunction and the output one in separate assertions.
  split = """(declare-const X_0 Real) (declare-const Y_0 Real)
(assert (or (and (>= X_0 0) (<= X_0 1)) (and (>= X_0 2) (<= X_0 3))))
(assert (or (>= Y_0 1) (<= Y_0 -1)))"""
  problem = parse_vnnlib(split)
  assert [len(case.unsafe) for case in problem.cases] == [2, 2]
  assert [float(case.box.upper[0]) for case in problem.cases] == [1.0, 3.0]


@pytest.mark.parametrize("text", [TWO, "(declare-const X_0 Real)\n(assert (<= X_0 0.25)) (assert (>= X_0 0.0))"],
                         ids=["2.0", "1.0"])
def test_windows_line_endings_and_byte_order_marks(text):
  want = parse_vnnlib(text).box
  for variant in (text.replace("\n", "\r\n"), "\ufeff" + text, ("\ufeff" + text).encode()):
    got = parse_vnnlib(variant).box
    np.testing.assert_array_equal(got.lower, want.lower)
    np.testing.assert_array_equal(got.upper, want.upper)


def test_a_disjunct_without_inputs_is_dropped_but_not_every_one():
  text = V1 + "(assert (or (and (>= X_0 0) (<= X_0 1) (>= Y_0 1)) (and (>= X_0 2) (<= X_0 1) (<= Y_0 -1))))"
  problem = parse_vnnlib(text)  # the second disjunct's box [2, 1] holds no input: it says nothing
  assert len(problem.cases) == 1 and len(problem.cases[0].unsafe) == 1
  with pytest.raises(VnnlibError, match=r"inverted bounds for input X_0 \(in disjunct 1 of 2\)"):
    parse_vnnlib(text.replace("(<= X_0 1) (>= Y_0 1)", "(<= X_0 -1) (>= Y_0 1)"))


def test_2_0_conveniences():
  text = """(vnnlib-version <2.0>)
(declare-network net (declare-input X float32 [3]) (declare-output Y float32 [1]))
(assert (and (< X[0] 0.5) (> X[0] (- 0.5))))
(assert (<= (* 2.0 X[1]) 1.0)) (assert (>= (- X[1]) -3.0)) (assert (>= (+ X[1] 1.0) 0.5))
(assert (== X[2] 0.25))
(assert (<= 1.0 2.0))
(assert (<= Y[0] 0.0))"""
  problem = parse_vnnlib(text)
  np.testing.assert_array_equal(problem.box.lower, [-0.5, -0.5, 0.25])  # strict bounds closed
  np.testing.assert_array_equal(problem.box.upper, [0.5, 0.5, 0.25])
  never = parse_vnnlib(text.replace("(<= 1.0 2.0)", "(<= 2.0 1.0)"))
  assert never.cases == ()  # never true: no cases
  with pytest.raises(VnnlibError, match="0 input boxes"):
    never.box


def test_agrees_with_the_packages_own_conversion_where_it_applies():
  # vnnlib.compat.transform (single networks, one bound per assertion) in doubles, against ours.
  text = vnnlib_text(qb.Box(np.float32([0.1, -2]), np.float32([0.3, 1e-7])), epsilon=0.5, num_outputs=3)
  ours = parse_vnnlib(text).cases[0]
  import vnnlib.compat

  theirs, = vnnlib.compat.transform(vnnlib.parse_query_string(vnnlib_syntax._translate_v1(
      vnnlib_syntax._read_forms(text, "t"), "t")[0]))
  np.testing.assert_array_equal(np.array(theirs.input_box).T, [ours.box.lower, ours.box.upper])
  assert [(p.coeff_matrix, p.rhs) for p in theirs.output_constraints] == \
         [(p.A.tolist(), p.b.tolist()) for p in ours.unsafe]


# A random formula as a tree, rendered in both versions and evaluated exactly: the cases must describe
# the same set. Numbers are multiples of 1/4 and coefficients small integers, so that floats are exact.
quarter = st.integers(-16, 16).map(lambda k: Fraction(k, 4))


@st.composite
def formulas(draw, n_in, n_out, depth=3):
  if depth == 0 or draw(st.booleans()):
    if draw(st.booleans()):  # an input bound that keeps [-4, 4]'s boxes non-empty
      i, c = draw(st.integers(0, n_in - 1)), abs(draw(quarter))
      return draw(st.sampled_from([("<=", ("X", i), c), (">=", ("X", i), -c), ("=", ("X", i), c)]))
    terms = draw(st.lists(st.tuples(st.integers(-2, 2), st.integers(0, n_out - 1)), min_size=1, max_size=3))
    left = ("+", *[("*", a, ("Y", j)) for a, j in terms])
    return (draw(st.sampled_from(["<=", ">=", "=", "<", ">"])), left, draw(quarter))
  args = draw(st.lists(formulas(n_in, n_out, depth - 1), min_size=1, max_size=3))
  return (draw(st.sampled_from(["and", "or"])), *args)


def render(node, version):
  if isinstance(node, Fraction):
    return f"{float(node)}" if version == "2.0" else f"{float(node):g}"
  if isinstance(node, int):
    return render(Fraction(node), version)
  if node[0] in ("X", "Y"):
    return f"{node[0]}[{node[1]}]" if version == "2.0" else f"{node[0]}_{node[1]}"
  op = "==" if node[0] == "=" and version == "2.0" else node[0]
  return f"({op} {' '.join(render(arg, version) for arg in node[1:])})"


def evaluate(node, x, y):
  op, *args = node
  if op in ("and", "or"):
    return (all if op == "and" else any)(evaluate(arg, x, y) for arg in args)

  def linear(t):  # {variable: coefficient}, constant
    if isinstance(t, (int, Fraction)):
      return {}, Fraction(t)
    if t[0] in ("X", "Y"):
      return {t: Fraction(1)}, Fraction(0)
    parts = [linear(u) for u in t[1:]]
    if t[0] == "*":  # (* constant term)
      return {v: parts[0][1] * c for v, c in parts[1][0].items()}, parts[0][1] * parts[1][1]
    terms = {}
    for more, _ in parts:
      for v, c in more.items():
        terms[v] = terms.get(v, 0) + c
    return terms, sum(c for _, c in parts)

  (left, c1), (right, c2) = linear(args[0]), linear(args[1])
  terms = {v: left.get(v, 0) - right.get(v, 0) for v in {**left, **right}}
  d = sum(c * (x if v[0] == "X" else y)[v[1]] for v, c in terms.items()) + c1 - c2
  if any(terms.values()):  # strict comparisons of a variable are read as their closures
    op = {"<": "<=", ">": ">="}.get(op, op)
  return {"<=": d <= 0, ">=": d >= 0, "=": d == 0, "<": d < 0, ">": d > 0}[op]


@FUZZ
@given(data=st.data(), n_in=st.integers(1, 2), n_out=st.integers(1, 2))
def test_random_formulas_describe_the_same_set(data, n_in, n_out):
  asserts = [(op, ("X", i), Fraction(c)) for i in range(n_in) for op, c in (("<=", 4), (">=", -4))]
  asserts += data.draw(st.lists(formulas(n_in, n_out), min_size=1, max_size=3))
  points = data.draw(st.lists(st.tuples(st.lists(quarter, min_size=n_in, max_size=n_in),
                                        st.lists(quarter, min_size=n_out, max_size=n_out)), min_size=20, max_size=20))
  for version in ("1.0", "2.0"):
    if version == "1.0":
      text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
      text += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    else:
      text = (f"(vnnlib-version <2.0>)\n(declare-network f (declare-input X real [{n_in}]) "
              f"(declare-output Y real [{n_out}]))\n")
    text += "".join(f"(assert {render(a, version)})\n" for a in asserts)
    try:
      cases = parse_vnnlib(text).cases
    except VnnlibError as exc:  # every disjunct's input bounds contradict each other: no input at all
      assert "inverted bounds" in str(exc), (text, exc)
      cases = ()
    for x, y in points:
      want = all(evaluate(a, x, y) for a in asserts)
      got = any(case.box.contains(np.array(x, np.float32)) and any(p.contains(np.array(y, float)) for p in case.unsafe)
                for case in cases)
      assert got == want, (text, x, y)


# ------------------------------------------------------------------------------------ errors


V2 = "(vnnlib-version <2.0>)\n(declare-network f (declare-input X real [2]) (declare-output Y real [1]))\n"
BOX = "(assert (and (>= X[0] 0.0) (<= X[0] 1.0) (>= X[1] 0.0) (<= X[1] 1.0)))\n"
PAIR = ("(vnnlib-version <2.0>)\n(declare-network f (declare-input X real [1]) (declare-output Y real [1]))\n"
        "(declare-network g (equal-to f) (declare-input Z real [1]) (declare-output W real [1]))\n"
        "(assert (and (>= X[0] 0.0) (<= X[0] 1.0)))\n")
V1 = "(declare-const X_0 Real)\n(declare-const Y_0 Real)\n"


@pytest.mark.parametrize("text, line, column, message", [
    ("", None, None, "empty file"),
    ("; only a comment\n\n", None, None, "empty file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff", 1, 1, "byte 0x89 is not UTF-8 text"),
    (b"; latin-1\n(declare-const X_0 Real) ; caf\xe9", 2, 31, "byte 0xe9 is not UTF-8"),
    ("(declare-const X_0 Real)\x00", 1, 25, "control character U\\+0000"),
    ('{"vnnlib": 2}', 1, 1, "not a VNN-LIB file"),
    ("import vnnlib\n", 1, 1, "not a VNN-LIB file"),
    ("(set-logic QF_LRA)\n", 1, 1, "unknown command 'set-logic'"),
    (V1 + "(assert (<= X_0 1.0)))\n", 3, 22, "unbalanced parentheses"),
    (V1 + "(assert (<= X_0 1.0))\n(assert (>= X_0 0.0)", 4, 1, "truncated file"),
    (V2 + "(assert (<= X[0] 1.0)", 3, 1, "truncated file"),
    (V1 + "(assert (<= X_1 1.0))", 3, 13, "unknown variable 'X_1'"),
    (V1 + "(assert (<= X_0 foo))", 3, 17, "unknown variable or symbol 'foo'"),
    (V2 + BOX + "(assert (<= Z[0] 1.0))", 4, None, "Undeclared variable: 'Z'"),
    (V2 + "(assert (<= X[0] 1.0))\n(assert (>= X[1] 0.0))\n(assert (<= X[1] 1.0))", 3, None,
     "input X\\[0\\] has no lower bound"),
    (V1 + "(assert (>= X_0 0.0))", 3, None, "input X_0 has no upper bound"),
    (V1 + "(assert (<= X_0 1.0))\n(assert (>= X_0 2.0))", 4, None,
     "inverted bounds for input X_0.*2.*line 4.*1.*line 3"),
    (V1 + "(assert (<= X_0 1.0)) (assert (>= X_0 0.0))\n(assert (<= (* Y_0 Y_0) 1.0))", 4, None, "non-linear"),
    (V2 + BOX + "\n(assert (<= (* Y[0] X[0]) 1.0))", 5, None, "non-linear"),
    (V2 + BOX + "(assert (<= X[0] 1e3))", 4, 18, "syntax error at 'e3'"),
    (V2, 2, 74, "ends too early"),
    (V2 + BOX + "(assert (!= Y[0] 0.0))", 4, None, "'!=' is not supported"),
    (V1 + "(assert (<= X_0 1.0)) (assert (>= X_0 0.0))\n(assert (<= (+ X_0 Y_0) 1.0))", 4, None, "mixes inputs"),
    (V2 + BOX + "(assert (<= X[0] X[1]))", 4, None, "unsupported input constraint"),
    (V1 + "(assert (not (<= X_0 1.0)))", 3, 9, "'not' is not supported"),
    (V1 + "(assert (<= (/ X_0 2) 1.0))", 3, 13, "'/' is not supported"),
    ("(declare-const X_0 Real)\n(declare-const X_2 Real)", 2, 16, "X_2 is declared but X_1 is not"),
    ("(declare-const X_0 Real)\n(declare-const X_0 Real)", 2, 16, "declared twice"),
    ("(declare-const X_0 Int)", 1, 20, "VNN-LIB 1.0 variables are Real"),
    ("(declare-const W_0 Real)", 1, 16, "cannot declare 'W_0'"),
    ("(declare-const X_0 Real)", None, None, "no assertions"),
    ("(declare-network f (declare-input X real [1]))", 1, 1, "VNN-LIB 2.0: a 2.0 file starts with"),
    (V1 + "(assert (<= X_0 1e39)) (assert (>= X_0 0))", 3, None, "outside the float32 range"),
    (V1 + "(assert (<= X_0 1e999)) (assert (>= X_0 0))", 3, 17, "number 1e999 is out of range"),
    (V2 + BOX + "(assert (<= Y[0] 0." + "0" * 320 + "1))", 4, 18,
     r"out of range \(VNN-LIB numbers are read as doubles\)"),
    (V1 + '(assert "x)', 3, 9, "unterminated string"),
    (V2 + BOX + "(assert (<= Y[0] 0.5é))", 4, 21, "non-ASCII character 'é' outside a comment"),
    ("(" * 300, 1, 201, "nested more than 200 deep"),
    (V1 + "".join(f"(assert (or (<= X_0 {i}.0) (>= X_0 -{i}.0)))\n" for i in range(18)), 19, None,
     "more than 100000 clauses"),
    ("(vnnlib-version <2.0>)\n(declare-network f (declare-input X real [1]) (declare-hidden H real [1] \"h\") "
     "(declare-output Y real [1]))\n(assert (<= X[0] 1.0))", 2, None, "hidden nodes"),
    ("(vnnlib-version <2.0>)\n(declare-network f (declare-input X real [1]) (declare-input U real [1]) "
     "(declare-output Y real [1]))\n(assert (<= X[0] 1.0))", 2, None, "2 input and 1 output tensors"),
    (PAIR + "(assert (>= X[0] Z[0]))\n(assert (< Y[0] W[0]))", 5, None, "X\\[0\\] >= Z\\[0\\] alone.*monotonicity"),
    (PAIR + "(assert (< Y[0] W[0]))", None, None, "Z\\[0\\] is not tied to X\\[0\\]"),
    (PAIR + "(assert (> X[0] Z[0]))", 5, None, "strict inequality between two networks' inputs"),
])
def test_errors_say_where_and_what(text, line, column, message):
  with pytest.raises(VnnlibError, match=message) as info:
    parse_vnnlib(text, source="bad.vnnlib")
  error = info.value
  assert isinstance(error, ValueError) and (error.source, error.line, error.column) == ("bad.vnnlib", line, column)
  assert str(error) == ":".join(str(p) for p in ("bad.vnnlib", line, column) if p is not None) + ": " + error.reason


def test_errors_name_the_file(tmp_path):
  path = tmp_path / "broken.vnnlib"
  path.write_text(V1 + "(assert (<= X_0 1.0)")
  with pytest.raises(VnnlibError, match=r"broken\.vnnlib:3:1: truncated"):
    load_vnnlib(path)
  path.write_bytes(b"\x1f\x8b" + bytes(range(40)))
  with pytest.raises(VnnlibError, match=r"broken\.vnnlib: a broken gzip file"):
    load_vnnlib(path)
  with pytest.raises(FileNotFoundError):
    load_vnnlib(tmp_path / "missing.vnnlib")


def test_the_vnnlib_package_is_optional(monkeypatch):
  monkeypatch.setitem(sys.modules, "vnnlib", None)  # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'qbound\[vnnlib\]'"):
    parse_vnnlib(V1)
  # importing qbound does not import it
  code = "import sys, qbound; assert 'vnnlib' not in sys.modules and qbound.io.load_vnnlib"
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("module", [vnnlib_reader, vnnlib_syntax, vnnlib_linear])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0 and (result.attempted > 0 or module is not vnnlib_reader)


# ----------------------------------------------------------------------------------- fuzzing


VALID_V1 = vnnlib_text(qb.Box(np.float32([0.1, -2]), np.float32([0.3, 1e-7])), epsilon=0.5, num_outputs=2) + \
    "(assert (or (and (>= X_0 0.2) (<= Y_0 (- Y_1 (* 2 Y_0)))) (and (= X_1 -1.5e-3))))\n"
VALID_V2 = TWO
TOKENS = ["(", ")", "(", ")", "assert", "declare-const", "declare-fun", "X_0", "X_1", "Y_0", "Real", "<=", ">=",
          "<", "=", "==", "!=", "and", "or", "not", "+", "-", "*", "/", "0.5", "-1", "1e400", ".5", "()",
          "vnnlib-version", "<2.0>", "declare-network", "declare-input", "declare-output", "equal-to", "f", "g",
          "X[0]", "Y[0]", "X[0,0]", "real", "float32", "[1]", "[2]", "[1, 2]", '"n"', '"', ";", "\n", "\t", "é"]


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(data):
  parse_or_refuse(data)


@pytest.mark.parametrize("text", [VALID_V1, VALID_V2], ids=["1.0", "2.0"])
def test_fuzz_every_truncation(text):
  assert parse_or_refuse(text) is not None
  for n in range(len(text)):
    parse_or_refuse(text[:n])


@FUZZ
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=60))
def test_fuzz_token_soup(tokens):
  parse_or_refuse(" ".join(tokens))
  parse_or_refuse("(vnnlib-version <2.0>) " + " ".join(tokens))


@FUZZ
@given(text=st.sampled_from([VALID_V1, VALID_V2]), data=st.data())
def test_fuzz_deleted_parentheses_and_swapped_tokens(text, data):
  parens = [i for i, c in enumerate(text) if c in "()"]
  drop = set(data.draw(st.lists(st.sampled_from(parens), min_size=1, max_size=4)))
  parse_or_refuse("".join(c for i, c in enumerate(text) if i not in drop))
  words = text.split(" ")
  at = data.draw(st.integers(0, len(words) - 1))
  words[at] = data.draw(st.sampled_from(TOKENS))
  parse_or_refuse(" ".join(words))
