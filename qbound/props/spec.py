"""Properties of a pair of networks, as values: what :func:`qbound.props.verify` decides.

A property says which inputs are *bad*: an input ``x`` of the box is a counterexample when the pair
of outputs ``(f(x), f_q(x))`` lies in the property's unsafe set. Every property here gives

- ``polytopes(n_out)``: a union of polytopes ``{y : A y <= b}`` over ``y = [f(x); f_q(x)]`` (both
  outputs flattened and concatenated) that *contains* the unsafe set. Proving that no input reaches
  any of them proves the property; they may be larger than the unsafe set (the delta-top-1
  condition, a sum of exponentials, is relaxed to the linear conditions it implies);
- ``violated(yf, yq)``: the exact test of one pair of outputs (float64), with strict inequalities where
  the property's boundary is ambiguous (ties of an argmax), so that every counterexample reported is
  one whatever the tie-breaking;
- ``objective(yf, yq)``: a differentiable score, negative inside the unsafe set, that the
  counterexample search descends.

The top-1 and delta-top-1 equivalences are those of VeryDiff (Teuber, Kern, Janzen, Beckert,
"Revisiting Differential Verification: Equivalence Verification with Confidence", TACAS 2025):
top-1: ``argmax f(x) = argmax f_q(x)`` for every ``x`` of the box; delta-top-1: wherever f's top
softmax output is at least ``delta``, f_q picks the same class. Both are decided on the logits:
``softmax_c(f) >= delta`` implies ``f_c - f_j >= log(delta / (1 - delta))`` for every ``j != c``
(the other classes' exponentials sum to at most ``(1 - delta) / delta`` times ``exp(f_c)``), a
linear condition on logit differences, so no bound on the softmax itself is needed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Polytope:
  """``{y : A y <= b}`` over ``y = [f(x); f_q(x)]`` (flattened outputs of both networks); no rows is
  every ``y``.

  Attributes:
    A: ``(rows, n_f + n_q)`` coefficients.
    b: ``(rows,)`` right-hand sides.
  """

  A: np.ndarray
  b: np.ndarray

  def __post_init__(self):
    A = np.asarray(self.A, np.float64)
    b = np.asarray(self.b, np.float64).reshape(-1)
    if A.ndim != 2 or A.shape[0] != b.size:
      raise ValueError(f"a polytope needs A of shape (rows, outputs) and b of shape (rows,), "
                       f"got A {A.shape} and b {b.shape}.")
    if not (np.isfinite(A).all() and not np.isnan(b).any()):
      raise ValueError("a polytope's A must be finite and its b free of NaN.")
    object.__setattr__(self, "A", A)
    object.__setattr__(self, "b", b)

  def contains(self, y) -> bool:
    return bool(np.all(self.A @ np.asarray(y, np.float64).reshape(-1) <= self.b))

  def __repr__(self) -> str:
    return f"Polytope(rows={self.A.shape[0]}, outputs={self.A.shape[1]})"


def _pair_difference(n: int, plus: Sequence[tuple[int, float]]) -> np.ndarray:
  row = np.zeros(n)
  for i, v in plus:
    row[i] += v
  return row


def _class_polytopes(k: int, margin: float) -> list[Polytope]:
  """``{f_j - f_c <= -margin for all j != c, f_q_c - f_q_m <= 0}`` for every class ``c`` and ``m != c``:
  f's class is ``c`` (with the margin) and f_q's is not."""
  out = []
  for c in range(k):
    for m in range(k):
      if m == c:
        continue
      rows = [_pair_difference(2 * k, [(j, 1.0), (c, -1.0)]) for j in range(k) if j != c]
      rows.append(_pair_difference(2 * k, [(k + c, 1.0), (k + m, -1.0)]))
      b = np.concatenate([np.full(k - 1, -margin), [0.0]])
      out.append(Polytope(np.stack(rows), b))
  return out


def _top_margin(yf, c):
  """``max_{j != c} yf_j - yf_c`` (negative iff ``c`` is the strict argmax)."""
  others = jnp.where(jnp.arange(yf.shape[0]) == c, -jnp.inf, yf)
  return jnp.max(others) - yf[c]


def _fq_keeps(yq, c):
  """``min_{m != c} (yq_c - yq_m)`` (negative iff some other class beats ``c`` strictly)."""
  others = jnp.where(jnp.arange(yq.shape[0]) == c, jnp.inf, yq[c] - yq)
  return jnp.min(others)


@dataclasses.dataclass(frozen=True)
class Top1:
  """Top-1 equivalence: ``argmax f(x) = argmax f_q(x)`` for every ``x`` of the box.

  A counterexample is an input where f has one strictly largest output ``c`` and some output of
  f_q is strictly above f_q's ``c``: the classes differ whatever the tie-breaking. (VeryDiff, TACAS 2025.)

  Example:
    >>> import numpy as np
    >>> Top1().violated(np.array([2.0, 1.0]), np.array([0.0, 1.0]))
    True
  """

  def describe(self) -> str:
    return "top-1 equivalence"

  def margin(self) -> float:
    return 0.0

  def polytopes(self, n_out: int) -> list[Polytope]:
    _need_classes(n_out, self.describe())
    return _class_polytopes(n_out, self.margin())

  def violated(self, yf, yq) -> bool:
    yf = np.asarray(yf, np.float64).reshape(-1)
    yq = np.asarray(yq, np.float64).reshape(-1)
    c = int(np.argmax(yf))
    unique = bool(np.all(np.delete(yf, c) < yf[c]))
    return unique and self._confident(yf, c) and bool(np.any(np.delete(yq, c) > yq[c]))

  def _confident(self, yf, c) -> bool:
    return True

  def objective(self, yf, yq):
    """Negative iff ``(yf, yq)`` is a counterexample (up to rounding): the smallest over classes
    ``c`` of the largest of f's top margin against ``c`` and f_q's margin keeping ``c``."""
    k = yf.shape[0]
    scores = [jnp.maximum(jnp.maximum(_top_margin(yf, c), self._confidence_gap(yf, c)), _fq_keeps(yq, c))
              for c in range(k)]
    return jnp.min(jnp.stack(scores))

  def _confidence_gap(self, yf, c):
    return jnp.asarray(-jnp.inf, yf.dtype)


@dataclasses.dataclass(frozen=True)
class DeltaTop1(Top1):
  """Delta-top-1 (confidence) equivalence: wherever f's top softmax output is at least ``delta``,
  f_q picks the same class.

  Decided on logits: ``softmax_c(f) >= delta`` implies ``f_c - f_j >= log(delta / (1 - delta))``
  for all ``j != c``, the linear margin the proof uses. A counterexample has f's unique top class
  ``c`` with ``softmax_c(f) >= delta`` (computed stably in float64) and an output of f_q strictly
  above f_q's ``c``. (VeryDiff, TACAS 2025.)

  Attributes:
    delta: the confidence threshold, in ``(0, 1)``.

  Example:
    >>> import numpy as np
    >>> prop = DeltaTop1(0.9)
    >>> round(prop.margin(), 4)
    2.1972
    >>> prop.violated(np.array([1.0, 0.9]), np.array([0.0, 1.0]))  # f is only 52% sure
    False
  """

  delta: float = 0.9

  def __post_init__(self):
    d = self.delta
    if isinstance(d, bool) or not isinstance(d, (int, float, np.floating)) or not (0.0 < float(d) < 1.0):
      raise ValueError(f"delta must be a number in (0, 1) (a softmax probability), got {d!r}.")
    object.__setattr__(self, "delta", float(d))

  def describe(self) -> str:
    return f"delta-top-1 equivalence (delta = {self.delta:g})"

  def margin(self) -> float:
    # Rounded down (the float64 log is within a few ulps): a smaller margin keeps the rows implied.
    t = math.log(self.delta / (1.0 - self.delta))
    return max(0.0, t - 1e-12 * abs(t))

  def _confident(self, yf, c) -> bool:
    shifted = yf - yf[c]
    log_softmax_c = -(np.log(np.sum(np.exp(shifted - shifted.max()))) + shifted.max())
    return bool(log_softmax_c >= math.log(self.delta))

  def _confidence_gap(self, yf, c):
    return math.log(self.delta) - (yf[c] - jax_logsumexp(yf))

  def refuted_by_f(self, lower_of, n_out: int) -> np.ndarray:
    """Which polytopes a piece rules out because f is never ``delta``-confident in their class ``c``
    there: ``sum_{j != c} exp(lower(f_j - f_c)) > (1 - delta) / delta``, the exact condition the
    polytope's linear rows only imply. ``lower_of(v)``: the pieces' lower bounds of ``v . f``;
    ``n_out``: the number of classes.

    Returns a ``(pieces, polytopes)`` mask in the order of ``polytopes(n_out)``.
    """
    k = None
    columns = []
    for c in range(n_out):
      total = 0.0
      for j in range(n_out):
        if j != c:
          v = np.zeros(n_out)
          v[j], v[c] = 1.0, -1.0
          total = total + np.exp(np.minimum(lower_of(v), 700.0))
      # exp and the sum in float64 are within ~1e-15 relative; the slack covers them.
      never = total > (1.0 - self.delta) / self.delta * (1.0 + 1e-9)
      columns += [never] * (n_out - 1)
      k = never.shape[0]
    return np.stack(columns, axis=1) if columns else np.zeros((k or 0, 0), bool)


def jax_logsumexp(v):
  m = jnp.max(v)
  return m + jnp.log(jnp.sum(jnp.exp(v - m)))


@dataclasses.dataclass(frozen=True)
class MaxError:
  """The maximal error is at most ``epsilon``: ``weight_j * |f_j(x) - f_q_j(x)| <= epsilon`` for every
  ``x`` of the box and every selected output ``j`` (weights 1 by default; a weight of ``1 / tol_j``
  gives each output its own tolerance).

  Without weights :func:`qbound.props.verify` decides it with :func:`qbound.certify` (which also
  reports the maximal error as an interval); with weights, by the splitting engine on the
  polytopes ``weight_j * d_j >= epsilon`` and ``-weight_j * d_j >= epsilon``. A counterexample has
  a weighted error strictly above ``epsilon``.

  Attributes:
    epsilon: the largest error allowed (non-negative).
    outputs: flat output indices that count (all when None).
    weights: one positive weight per selected output (None: all 1).

  Example:
    >>> import numpy as np
    >>> MaxError(0.1).violated(np.array([1.0, 2.0]), np.array([1.0, 2.2]))
    True
    >>> MaxError(0.1, weights=(1.0, 0.1)).violated(np.array([1.0, 2.0]), np.array([1.0, 2.2]))
    False
  """

  epsilon: float
  outputs: Optional[tuple[int, ...]] = None
  weights: Optional[tuple[float, ...]] = None

  def __post_init__(self):
    e = self.epsilon
    if isinstance(e, bool) or not isinstance(e, (int, float, np.floating)) or not (float(e) >= 0) or math.isinf(e):
      raise ValueError(f"epsilon must be a finite non-negative number, got {e!r}.")
    object.__setattr__(self, "epsilon", float(e))
    if self.outputs is not None:
      object.__setattr__(self, "outputs", tuple(int(i) for i in np.asarray(self.outputs).reshape(-1)))
    if self.weights is not None:
      w = np.asarray(self.weights, np.float64).reshape(-1)
      if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise ValueError(f"weights must be finite and positive, got {w.tolist()}.")
      if self.outputs is not None and w.size != len(self.outputs):
        raise ValueError(f"give one weight per selected output: {w.size} weights for {len(self.outputs)} outputs.")
      object.__setattr__(self, "weights", tuple(float(v) for v in w))

  def describe(self) -> str:
    which = "" if self.outputs is None else f" on outputs {list(self.outputs)}"
    weighted = "" if self.weights is None else " (weighted)"
    return f"max error <= {self.epsilon:g}{which}{weighted}"

  def _selected(self, n_out: int) -> np.ndarray:
    sel = np.arange(n_out) if self.outputs is None else np.asarray(self.outputs, np.int64)
    if sel.size == 0 or sel.min() < 0 or sel.max() >= n_out:
      raise ValueError(f"outputs must be flat indices in [0, {n_out}), got {list(sel)}.")
    if self.weights is not None and len(self.weights) != sel.size:
      raise ValueError(f"give one weight per selected output: {len(self.weights)} weights for {sel.size} outputs.")
    return sel

  def _weights(self, n: int) -> np.ndarray:
    return np.ones(n) if self.weights is None else np.asarray(self.weights, np.float64)

  def polytopes(self, n_out: int) -> list[Polytope]:
    out = []
    sel = self._selected(n_out)
    for j, w in zip(sel, self._weights(sel.size)):
      row = w * _pair_difference(2 * n_out, [(int(j), 1.0), (n_out + int(j), -1.0)])
      out += [Polytope(-row[None], np.array([-self.epsilon])), Polytope(row[None], np.array([-self.epsilon]))]
    return out

  def violated(self, yf, yq) -> bool:
    yf = np.asarray(yf, np.float64).reshape(-1)
    yq = np.asarray(yq, np.float64).reshape(-1)
    sel = self._selected(yf.size)
    return bool(np.max(self._weights(sel.size) * np.abs(yf[sel] - yq[sel])) > self.epsilon)

  def objective(self, yf, yq):
    sel = self._selected(yf.shape[0])
    w = jnp.asarray(self._weights(sel.size), yf.dtype)
    return self.epsilon - jnp.max(w * jnp.abs(yf[sel] - yq[sel]))


@dataclasses.dataclass(frozen=True)
class RelativeError:
  """The error is small relative to f's output: ``|f_j(x) - f_q_j(x)| <= rel * |f_j(x)| + floor`` for
  every ``x`` of the box and every selected output ``j``.

  ``floor`` is the absolute error allowed where ``f_j`` is near 0 (with ``floor = 0`` any error where
  ``f_j(x) = 0`` is a counterexample). Decided by the splitting engine on four polytopes per output,
  one per sign of ``f_j`` and of the error: e.g. ``f_j >= 0`` and
  ``f_j - f_q_j >= rel * f_j + floor``.

  Attributes:
    rel: the relative tolerance (non-negative).
    floor: the absolute tolerance added (non-negative).
    outputs: flat output indices that count (all when None).

  Example:
    >>> import numpy as np
    >>> RelativeError(0.05, floor=0.01).violated(np.array([10.0, 0.0]), np.array([10.4, 0.005]))
    False
    >>> RelativeError(0.05, floor=0.01).violated(np.array([10.0, 0.0]), np.array([10.6, 0.0]))
    True
  """

  rel: float
  floor: float = 0.0
  outputs: Optional[tuple[int, ...]] = None

  def __post_init__(self):
    for name in ("rel", "floor"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not (float(v) >= 0) or math.isinf(v):
        raise ValueError(f"{name} must be a finite non-negative number, got {v!r}.")
      object.__setattr__(self, name, float(v))
    if self.outputs is not None:
      object.__setattr__(self, "outputs", tuple(int(i) for i in np.asarray(self.outputs).reshape(-1)))

  def describe(self) -> str:
    which = "" if self.outputs is None else f" on outputs {list(self.outputs)}"
    return f"relative error <= {self.rel:g} |f| + {self.floor:g}{which}"

  def _selected(self, n_out: int) -> np.ndarray:
    return MaxError(0.0, self.outputs)._selected(n_out)

  def polytopes(self, n_out: int) -> list[Polytope]:
    out = []
    for j in self._selected(n_out):
      f_j = _pair_difference(2 * n_out, [(int(j), 1.0)])
      d_j = _pair_difference(2 * n_out, [(int(j), 1.0), (n_out + int(j), -1.0)])
      for s_f in (1.0, -1.0):
        for s_d in (1.0, -1.0):
          # s_f f_j >= 0 and s_d d_j >= rel s_f f_j + floor
          A = np.stack([-s_f * f_j, -s_d * d_j + self.rel * s_f * f_j])
          out.append(Polytope(A, np.array([0.0, -self.floor])))
    return out

  def violated(self, yf, yq) -> bool:
    yf = np.asarray(yf, np.float64).reshape(-1)
    yq = np.asarray(yq, np.float64).reshape(-1)
    sel = self._selected(yf.size)
    return bool(np.any(np.abs(yf[sel] - yq[sel]) > self.rel * np.abs(yf[sel]) + self.floor))

  def objective(self, yf, yq):
    sel = self._selected(yf.shape[0])
    return jnp.min(self.rel * jnp.abs(yf[sel]) + self.floor - jnp.abs(yf[sel] - yq[sel]))


@dataclasses.dataclass(frozen=True, eq=False)
class Unsafe:
  """A union of polytopes over ``y = [f(x); f_q(x)]`` that no input may reach, as a VNN-LIB file states
  its negated property (:func:`qbound.io.load_vnnlib`).

  The polytopes are closed (``A y <= b``, VNN-LIB has no strict comparisons): a counterexample is an
  input whose outputs satisfy every row of one polytope, and a proof shows ``A_r y > b_r`` for
  some row of each.

  Attributes:
    polytopes_: the polytopes.
    name: what to call the property in reports.

  Example:
    >>> import numpy as np
    >>> prop = Unsafe((Polytope(np.array([[1.0, -1.0]]), np.array([-0.5])),))
    >>> prop.violated(np.array([0.0]), np.array([1.0]))
    True
  """

  polytopes_: tuple[Polytope, ...]
  name: str = "unsafe outputs (VNN-LIB)"

  def __post_init__(self):
    polys = tuple(self.polytopes_)
    if not polys:
      raise ValueError("an Unsafe property needs at least one polytope (an empty union is never reached).")
    widths = {p.A.shape[1] for p in polys}
    if len(widths) != 1:
      raise ValueError(f"every polytope must act on the same outputs, got widths {sorted(widths)}.")
    object.__setattr__(self, "polytopes_", polys)

  def describe(self) -> str:
    return self.name

  def polytopes(self, n_out: int) -> list[Polytope]:
    width = self.polytopes_[0].A.shape[1]
    if width != 2 * n_out:
      raise ValueError(f"the property's polytopes act on {width} outputs, but [f(x); f_q(x)] has {2 * n_out} "
                       f"({n_out} per network).")
    return list(self.polytopes_)

  def violated(self, yf, yq) -> bool:
    y = np.concatenate([np.asarray(yf, np.float64).reshape(-1), np.asarray(yq, np.float64).reshape(-1)])
    return any(p.contains(y) for p in self.polytopes_)

  def objective(self, yf, yq):
    y = jnp.concatenate([yf.reshape(-1), yq.reshape(-1)])
    scores = []
    for p in self.polytopes_:
      if p.A.shape[0] == 0:  # every output is unsafe
        return jnp.asarray(-1.0, y.dtype)
      scale = np.maximum(np.linalg.norm(p.A, axis=1), 1e-30)
      scores.append(jnp.max((jnp.asarray(p.A / scale[:, None], y.dtype) @ y) - jnp.asarray(p.b / scale, y.dtype)))
    return jnp.min(jnp.stack(scores))


def _need_classes(n_out: int, what: str) -> None:
  if n_out < 2:
    raise ValueError(f"{what} compares classes: the networks need at least 2 outputs, got {n_out}.")


Property = Top1 | DeltaTop1 | MaxError | RelativeError | Unsafe
