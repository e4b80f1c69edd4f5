"""The property "max error <= epsilon over the box" in VNN-LIB, for other verifiers to check.

VNN-LIB (https://www.vnnlib.org) states a verification problem in SMT-LIB 2 syntax over the
input variables ``X_i`` and output variables ``Y_j`` of an ONNX network. The classic form used by
VNN-COMP (the International Verification of Neural Networks Competition; Bak, Liu and Johnson,
"The Second International Verification of Neural Networks Competition (VNN-COMP 2021): Summary
and Results", arXiv:2109.00498; rules and benchmarks at https://github.com/stanleybak/vnncomp2021)
declares the variables, bounds the inputs to a box, and asserts the **negation** of the property,
an unsafe output region as a disjunction of conjunctions. A verifier answers ``unsat`` (no input
of the box reaches the unsafe region: the property holds) or ``sat`` with a counterexample.

For the maximal error of a compressed network, ``Y = g(X) = f(X) - f_q(X)`` is the merged
difference network (:func:`qbound.io.export_onnx` writes it) and :func:`export_vnnlib` writes::

  (declare-const X_0 Real) ...          one per input entry, flattened in row-major (C) order
  (declare-const Y_0 Real) ...          one per output entry, likewise
  (assert (<= X_i upper_i)) (assert (>= X_i lower_i))      the box, exactly
  (assert (or (and (>= Y_j epsilon)) (and (<= Y_j -epsilon)) ...))   for each checked output j

Semantics. ``unsat`` means: for every real ``x`` in the box and every checked ``j``,
``-epsilon < g_j(x) < epsilon``; so ``max_x max_j |g_j(x)| < epsilon``, and in particular qbound's
claim "the maximal error is at most epsilon" holds. ``sat`` means some ``x`` in the box has
``|g_j(x)| >= epsilon``: that refutes "error < epsilon", but refutes "error <= epsilon" only if the
counterexample's error is strictly above epsilon (VNN-LIB has no strict comparisons, so the
boundary ``|g_j(x)| = epsilon`` falls on the unsafe side). Exporting qbound's certified upper bound
as epsilon therefore asks the other verifier to confirm it; when that bound is exactly tight
(e.g. 0 for identical networks), give a slightly larger epsilon.

Numbers. Box corners and epsilon are written as the **exact** decimal expansion of the binary
floating-point value held (float32 for a float32 box): every float has a finite decimal expansion,
so the real box in the file is exactly the box qbound certified, and a reader parsing it into
float32, float64 or rationals gets exactly that value back. The box is not widened: the property
is about the same set, and an outward rounding would make the other verifier check a larger (and
possibly false) claim. Negative numbers are written ``-0.5``, as VNN-COMP's files do (their
parsers read the number with ``float``), not SMT-LIB's ``(- 0.5)``.
"""

from __future__ import annotations

import decimal
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Optional

import numpy as np


def format_real(value) -> str:
  """The exact decimal expansion of a float (no exponent, always with a point).

  Example:
    >>> format_real(np.float32(0.1)), format_real(-2.0), format_real(1e-3)
    ('0.100000001490116119384765625', '-2.0', '0.001000000000000000020816681711721685132943093776702880859375')
  """
  v = float(value)  # float32 -> float64 is exact
  if not math.isfinite(v):
    raise ValueError(f"VNN-LIB numbers must be finite, got {value!r}.")
  if v == 0:
    return "0.0"  # -0.0 is the same real number
  text = format(decimal.Decimal(v), "f")
  return text if "." in text else text + ".0"


def _flat_outputs(num_outputs, outputs) -> tuple[int, list[int]]:
  n = math.prod(num_outputs) if isinstance(num_outputs, (tuple, list)) else int(num_outputs)
  if n < 1:
    raise ValueError(f"the network must have at least one output, got {num_outputs!r}.")
  if outputs is None:
    return n, list(range(n))
  chosen = [int(j) for j in np.asarray(outputs).reshape(-1)]
  if not chosen:
    raise ValueError("outputs is empty: give the output indices to check, or None for all of them.")
  bad = [j for j in chosen if not 0 <= j < n]
  if bad:
    raise ValueError(f"outputs {bad} are out of range: the network has {n} outputs (flattened), 0 to {n - 1}.")
  return n, sorted(set(chosen))


def vnnlib_text(box, *, epsilon, num_outputs, outputs: Optional[Sequence[int]] = None,
                comment: str = "") -> str:
  """The VNN-LIB text of "``|Y_j| <= epsilon`` over the box" (see the module docstring).

  Args:
    box: a :class:`~qbound.box.Box` (or any object with ``lower`` and ``upper`` arrays of the
      network's unbatched input shape), finite, ``lower <= upper``.
    epsilon: the error bound, a number ``>= 0``, or one per output (an array of the output's
      shape or of ``num_outputs`` entries).
    num_outputs: the number of network outputs, or the output shape (they are flattened).
    outputs: flat indices of the outputs to check; None checks every output.
    comment: extra lines for the file's header comment.

  Returns:
    The file's text.

  Example:
    >>> import numpy as np, qbound as qb
    >>> text = vnnlib_text(qb.Box(np.zeros(1, np.float32), np.ones(1, np.float32)), epsilon=0.5,
    ...                    num_outputs=1)
    >>> print(text[text.index("(declare"):])
    (declare-const X_0 Real)
    <BLANKLINE>
    (declare-const Y_0 Real)
    <BLANKLINE>
    ; the input box
    (assert (>= X_0 0.0))
    (assert (<= X_0 1.0))
    <BLANKLINE>
    ; the negated property: some checked output reaches |Y_j| >= epsilon
    (assert (or
      (and (>= Y_0 0.5))
      (and (<= Y_0 -0.5))
    ))
    <BLANKLINE>
  """
  lower, upper = np.asarray(box.lower), np.asarray(box.upper)
  if lower.shape != upper.shape:
    raise ValueError(f"the box's corners differ in shape: lower {lower.shape}, upper {upper.shape}.")
  if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper))):
    raise ValueError("the box must be finite: VNN-LIB bounds every input by two numbers.")
  if np.any(lower > upper):
    i = int(np.argmax((lower > upper).reshape(-1)))
    raise ValueError(f"the box is empty: lower > upper at flat input {i}.")
  n_out, chosen = _flat_outputs(num_outputs, outputs)
  eps = np.asarray(epsilon, np.float64)
  try:
    eps = np.broadcast_to(eps.reshape(-1) if eps.size == n_out else eps, (n_out,))
  except ValueError:
    raise ValueError(f"epsilon must be one number or one per output ({n_out}), got shape {eps.shape}.") from None
  if not np.all(np.isfinite(eps)) or np.any(eps < 0):
    raise ValueError(f"epsilon must be finite and >= 0, got {epsilon!r}.")

  flat_lo, flat_hi = lower.reshape(-1), upper.reshape(-1)
  dtype = np.result_type(lower, upper)
  same_eps = bool(np.all(eps[chosen] == eps[chosen[0]]))
  lines = [
      "; Generated by qbound (qbound.io.export_vnnlib). VNN-LIB: https://www.vnnlib.org",
      "; Property: |Y_j| <= epsilon for every input X in the box and every checked output j, where",
      "; Y = g(X) is the network's output; for qbound's merged network g(X) = f(X) - f_q(X).",
      f"; Inputs X_0..X_{flat_lo.size - 1}: the input of shape {lower.shape}, flattened in row-major (C) order;",
      f"; outputs Y_0..Y_{n_out - 1}: the output, flattened likewise. Checked outputs: "
      + ("all" if len(chosen) == n_out else ", ".join(map(str, chosen))) + ".",
      "; epsilon = " + (format_real(eps[chosen[0]]) if same_eps else "one value per output, below") + ".",
      f"; Numbers are the exact decimal values of the {dtype} box corners and of epsilon.",
      "; The last assertion is the NEGATION of the property: 'unsat' proves max_j |Y_j| < epsilon",
      "; on the whole box; 'sat' gives an input with |Y_j| >= epsilon.",
  ]
  # Comments stay ASCII (file names may not be): some VNN-LIB readers open files as ASCII.
  lines += [f"; {line}" for line in comment.encode("ascii", "backslashreplace").decode().splitlines()]
  lines.append("")
  lines += [f"(declare-const X_{i} Real)" for i in range(flat_lo.size)]
  lines.append("")
  lines += [f"(declare-const Y_{j} Real)" for j in range(n_out)]
  lines += ["", "; the input box"]
  for i, (lo, hi) in enumerate(zip(flat_lo, flat_hi)):
    lines.append(f"(assert (>= X_{i} {format_real(lo)}))")
    lines.append(f"(assert (<= X_{i} {format_real(hi)}))")
  lines += ["", "; the negated property: some checked output reaches |Y_j| >= epsilon", "(assert (or"]
  for j in chosen:
    e = format_real(eps[j])
    lines.append(f"  (and (>= Y_{j} {e}))")
    lines.append(f"  (and (<= Y_{j} {format_real(-eps[j])}))")
  lines += ["))", ""]
  return "\n".join(lines)


def export_vnnlib(box, path: str | os.PathLike, *, epsilon, num_outputs,
                  outputs: Optional[Sequence[int]] = None, comment: str = "") -> pathlib.Path:
  """Write the property "``max over the box of |Y_j| <= epsilon``" as a VNN-LIB file.

  Pair it with the ONNX file of the merged network (:func:`qbound.io.export_onnx`), or use
  :func:`export_property`, which writes both. Semantics, number format and citations are in the
  module docstring: ``unsat`` from a verifier proves ``|g_j(x)| < epsilon`` on the whole box.

  Args:
    box: the input box (a :class:`~qbound.box.Box`), exactly as certified.
    path: the ``.vnnlib`` file to write.
    epsilon: the error bound (``>= 0``), one number or one per output.
    num_outputs: the number of outputs of the network, or its output shape.
    outputs: flat indices of the outputs to check (e.g. ``[0]`` for ACAS Xu's property 1); None
      checks all.
    comment: extra header comment lines.

  Returns:
    The path written.

  Example:
    >>> import tempfile, numpy as np, qbound as qb
    >>> box = qb.Box(lower=np.zeros(2, np.float32), upper=np.full(2, 0.1, np.float32))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   text = export_vnnlib(box, f"{tmp}/p.vnnlib", epsilon=0.25, num_outputs=3, outputs=[0]).read_text()
    >>> "(assert (<= X_1 0.100000001490116119384765625))" in text, "(and (<= Y_0 -0.25))" in text
    (True, True)
  """
  path = pathlib.Path(path)
  path.write_text(vnnlib_text(box, epsilon=epsilon, num_outputs=num_outputs, outputs=outputs,
                              comment=comment), encoding="ascii")
  return path


def export_property(net, box, directory: str | os.PathLike, *, epsilon,
                    outputs: Optional[Sequence[int]] = None, onnx_name: str = "merged.onnx",
                    vnnlib_name: str = "property.vnnlib", comment: str = "",
                    **onnx_options) -> tuple[pathlib.Path, pathlib.Path]:
  """Write a network and the property "error <= epsilon over the box" for another verifier.

  Writes ``directory/merged.onnx`` (:func:`qbound.io.export_onnx`, batch axis of size 1) and
  ``directory/property.vnnlib`` (:func:`export_vnnlib`), the pair VNN-COMP verifiers take:
  ``abcrown.py --onnx_path merged.onnx --vnnlib_path property.vnnlib``.

  Args:
    net: the merged network (:func:`qbound.merge`), a Graph, or a JAX function (traced on the box).
    box: the input box; its shape must be the network's input shape.
    directory: where to write (created if missing).
    epsilon: the error bound to check, e.g. qbound's certified ``cert.upper``.
    outputs: flat output indices to check; None for all.
    onnx_name, vnnlib_name: the file names.
    comment: extra header comment for the VNN-LIB file.
    **onnx_options: passed to :func:`qbound.io.export_onnx` (``opset``, ``max_matrix_entries``, ...).

  Returns:
    ``(onnx_path, vnnlib_path)``.

  Example:
    >>> import tempfile, jax, jax.numpy as jnp, qbound as qb
    >>> f = lambda x: jax.nn.relu(x @ jnp.array([[1.0, -2.0], [0.5, 1.0]]))
    >>> fq = lambda x: jax.nn.relu(x @ jnp.array([[1.0, -2.0], [0.5, 0.75]]))
    >>> box = qb.Box(lower=jnp.zeros(2), upper=jnp.ones(2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   paths = export_property(qb.merge(f, fq, box), box, tmp, epsilon=0.25)
    ...   [p.name for p in paths]
    ['merged.onnx', 'property.vnnlib']
  """
  from qbound.io.onnx_export import as_graph, export_onnx

  graph = as_graph(net, box)
  if tuple(np.shape(box.lower)) != tuple(graph.input_shape):
    raise ValueError(f"the box has shape {tuple(np.shape(box.lower))} but the network takes inputs of shape "
                     f"{graph.input_shape}.")
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  onnx_path, vnnlib_path = directory / onnx_name, directory / vnnlib_name
  # Check the property first: a bad epsilon or box should not leave half the pair behind.
  text = vnnlib_text(box, epsilon=epsilon, num_outputs=graph.output_shape, outputs=outputs,
                     comment="\n".join(filter(None, [f"Network: {onnx_name}", comment])))
  export_onnx(graph, onnx_path, **onnx_options)
  vnnlib_path.write_text(text, encoding="ascii")
  return onnx_path, vnnlib_path
