"""Deciding a property of two networks on a box: input splitting with differential bounds on rows.

The property's unsafe set is a union of polytopes ``{y : A y <= b}`` over ``y = [f(x); f_q(x)]``
(:mod:`qbound.props.spec`). A piece of the box is *closed* when every polytope has a row with
``A_r y > b_r`` on the whole piece. A row ``a . f + a' . f_q`` is bounded from below three ways,
and the best is kept:

- ``a . f + a' . f_q`` term by term;
- ``(a + a') . f - a' . d`` and ``(a + a') . f_q + a . d``, with ``d = f - f_q``.

The last two are where differential bounds pay: the top-1 row pair "f prefers ``c`` to ``m``,
f_q does not" sums to ``(d_m - d_c)``, so a piece is closed as soon as ``d_c - d_m`` stays below f's
margin, however loose f's and f_q's own bounds are. So both networks get a final linear layer ``P``
holding every distinct ``a``, ``a'`` and ``a + a'`` (up to sign), and one bound propagation gives
``P f``, ``P f_q`` and ``P d`` on every piece of a batch: the differential bounds of
:func:`qbound.bounds.diff_bounds` when f and f_q have the same layers, CROWN on each network and on
the merged one otherwise.

Open pieces are split in two along the input dimension that weighs most in the rows closest to
closing each polytope (``|row . J| * width`` with ``J`` the outputs' Jacobian at the centre; ReluVal's
smear, VeryDiff's generator influence), those most likely to hold a counterexample first (smallest
value of the property's objective at the best point probed). When fewer pieces are open than a
batch holds, their children are split again until the batch is full (a batch costs about the same
whether it holds 2 pieces or 64). Each piece's centre is probed and a few
projected gradient steps taken inside it; a point whose outputs look unsafe is checked again exactly
(float32 and float64 evaluations must both violate the property) before it is reported.

This is input-splitting branch and bound as in ReluVal (Wang et al., USENIX Security 2018), NeuroDiff
(Paulsen et al., ASE 2020) and VeryDiff (Teuber et al., TACAS 2025), with VeryDiff's properties.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qbound import graph as G
from qbound.attack import exact_errors
from qbound.bounds.splitting import split_at
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds
from qbound.box import Box
from qbound.merge import MergedNetwork, merge


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What the splitting engine found (see :class:`qbound.props.Verdict` for the public result)."""

  status: str
  counterexample: Optional[np.ndarray]
  pieces_bounded: int
  pieces_left: int
  closed_fraction: float
  stopped: str


# Mixed sums are added to a polytope only while it has at most this many rows in all.
MAX_ROWS = 4096


def with_mixed_sums(A: np.ndarray, b: np.ndarray, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """The polytope's rows plus the sum of every row on f alone with every row on f_q alone.

  Each sum is implied by the two rows, so a piece where it cannot hold holds none of the polytope.
  The sums are where ``d = f - f_q`` enters: top-1's "f prefers ``c`` to ``m``" plus "f_q prefers
  ``m`` to ``c``" is ``d_m - d_c <= 0``, closed wherever the differential bound of ``d_c - d_m`` stays
  below 0, however loose the bounds of f and f_q alone.
  """
  on_f = np.flatnonzero(np.any(A[:, :n_out] != 0, axis=1) & np.all(A[:, n_out:] == 0, axis=1))
  on_q = np.flatnonzero(np.all(A[:, :n_out] == 0, axis=1) & np.any(A[:, n_out:] != 0, axis=1))
  if on_f.size == 0 or on_q.size == 0 or A.shape[0] + on_f.size * on_q.size > MAX_ROWS:
    return A, b
  i, j = (v.reshape(-1) for v in np.meshgrid(on_f, on_q, indexing="ij"))
  # b_i + b_j rounded up (the sum's float64 rounding must not shrink the implied half-space).
  return np.concatenate([A, A[i] + A[j]]), np.concatenate([b, _sum_up(b[i], b[j])])


# A float64 sum is within this much of the real sum, relative to the terms' magnitudes.
_SUM_SLACK = 2.0 ** -51


def _sum_up(x, y):
  return x + y + _SUM_SLACK * (np.abs(x) + np.abs(y))


def _sum_down(x, y):
  return x + y - _SUM_SLACK * (np.abs(x) + np.abs(y))


class RowBook:
  """The spec layer ``P`` and, for each polytope row, where its three lower bounds come from.

  ``P`` holds every distinct nonzero vector among ``a``, ``a'`` and ``a + a'`` of the rows
  ``a . f + a' . f_q <= b``, each up to sign (a bound propagation gives both ends of each row).
  """

  def __init__(self, polytopes, n_out: int):
    systems = [with_mixed_sums(p.A, p.b, n_out) for p in polytopes]
    self.n_poly = len(systems)
    self.rows = max(1, max(A.shape[0] for A, _ in systems))
    self.A = np.zeros((self.n_poly, self.rows, 2 * n_out))
    self.b = np.full((self.n_poly, self.rows), np.inf)  # padding rows: 0 <= inf never closes nor binds
    for i, (A, b) in enumerate(systems):
      self.A[i, :A.shape[0]] = A
      self.b[i, :A.shape[0]] = b
    vectors: list[np.ndarray] = []
    index: dict = {}

    def spec(v):
      """(row of P, sign) of the vector ``v``, or (-1, 0) for zero."""
      nz = np.flatnonzero(v)
      if nz.size == 0:
        return -1, 0.0
      sign = 1.0 if v[nz[0]] > 0 else -1.0
      key = tuple((sign * v).tolist())
      if key not in index:
        index[key] = len(vectors)
        vectors.append(sign * v)
      return index[key], sign

    self._index = index
    shape = (self.n_poly, self.rows)
    self.a, self.q, self.u = (np.full(shape, -1), np.zeros(shape)), (np.full(shape, -1), np.zeros(shape)), \
        (np.full(shape, -1), np.zeros(shape))
    for i in range(self.n_poly):
      for r in range(self.rows):
        a, aq = self.A[i, r, :n_out], self.A[i, r, n_out:]
        for (idx, sgn), v in ((self.a, a), (self.q, aq), (self.u, a + aq)):
          idx[i, r], sgn[i, r] = spec(v)
    exact = np.stack(vectors) if vectors else np.zeros((1, n_out))
    # The layer runs in float32: P is its float32 rounding, and a row ``v`` whose entries are not
    # float32 numbers (weights like 0.1, ``rel - 1``) is bounded as ``v32 . y - |v - v32| . max|y|``,
    # with ``max|y|`` from unit rows appended to P (no correction where every entry is exact).
    self.P = exact.astype(np.float32)
    self._rounding = np.abs(exact - self.P.astype(np.float64))  # (rows of P, n_out)
    self._units = len(self.P)
    self.P = np.concatenate([self.P, np.eye(n_out, dtype=np.float32)])

  def lower_of(self, bounds, v: np.ndarray) -> np.ndarray:
    """Lower bounds ``(pieces,)`` of ``v . y`` from bounds on ``P y`` (one network's outputs ``y``);
    ``v`` must be a row of ``P`` up to sign (``KeyError`` otherwise)."""
    v = np.asarray(v, np.float64)
    nz = np.flatnonzero(v)
    sgn = 1.0 if v[nz[0]] > 0 else -1.0
    idx = self._index[tuple((sgn * v).tolist())]
    lo, hi = (np.asarray(b, np.float64) for b in bounds)
    return (lo[:, idx] if sgn > 0 else -hi[:, idx]) - self._slack(lo, hi)[:, idx]

  def _slack(self, lo, hi) -> np.ndarray:
    """``|v - v32| . max|y|`` for every row of P but the unit rows: ``(pieces, rows)``."""
    if not self._rounding.any():
      return np.zeros((lo.shape[0], self._units))
    units = slice(self._units, self._units + self._rounding.shape[1])
    largest = np.maximum(np.abs(lo[:, units]), np.abs(hi[:, units]))
    # 0 * inf counts as 0: an exact entry costs nothing however large the output may be.
    terms = np.where(self._rounding[None] > 0, largest[:, None, :] * self._rounding[None], 0.0)
    return _sum_up(terms.sum(axis=2), 0.0)

  def lower(self, zf, zq, d) -> np.ndarray:
    """Lower bounds ``(pieces, polytopes, rows)`` of every row from the pieces' bounds on ``P f``,
    ``P f_q`` and ``P d`` (each a ``(lower, upper)`` pair of ``(pieces, len(P))`` arrays)."""
    def low(bounds, spec, flip=1.0):
      idx, sgn = spec
      lo, hi = (np.asarray(v, np.float64) for v in bounds)
      slack = self._slack(lo, hi)
      lo, hi = (np.concatenate([v[:, :self._units] - slack, np.zeros((v.shape[0], 1))], axis=1) if k == 0 else
                np.concatenate([v[:, :self._units] + slack, np.zeros((v.shape[0], 1))], axis=1)
                for k, v in enumerate((lo, hi)))
      s = sgn * flip
      return np.where(s > 0, lo[:, idx], np.where(s < 0, -hi[:, idx], 0.0))

    # Each a sum of two float32 bounds in float64, rounded down so it stays a lower bound.
    termwise = _sum_down(low(zf, self.a), low(zq, self.q))
    through_f = _sum_down(low(zf, self.u), low(d, self.q, -1.0))
    through_q = _sum_down(low(zq, self.u), low(d, self.a))
    return np.maximum(termwise, np.maximum(through_f, through_q))


def spec_networks(f, fq, box: Box, P: np.ndarray) -> MergedNetwork:
  """f and f_q followed by the same linear layer ``P`` (flattened outputs), merged."""
  weights = jnp.asarray(P, jnp.float32)
  return merge(lambda x: weights @ f(x).reshape(-1), lambda x: weights @ fq(x).reshape(-1), box)


def bound_rows(spec: MergedNetwork, lo, hi, sound: bool):
  """Bounds on ``P f``, ``P f_q`` and ``P d`` over a batch of pieces."""
  box = Box(jnp.asarray(lo), jnp.asarray(hi))
  out = spec.f_graph.output
  if spec.paired:
    z, zq, d = diff_bounds(spec.f_graph, spec.fq_graph, box, None, sound, True, batched=True)
    return z[out], zq[out], d[out]
  zf = crown_bounds(spec.f_graph, box, None, sound, batched=True)[out]
  zq = crown_bounds(spec.fq_graph, box, None, sound, batched=True)[spec.fq_graph.output]
  d = crown_bounds(spec.graph, box, None, sound, batched=True)[spec.graph.output]
  return zf, zq, d


@functools.partial(jax.jit, static_argnames=("prop",))
def descend(fg: G.Graph, qg: G.Graph, prop, x0, lo, hi, steps):
  """Projected signed-gradient descent on ``prop.objective`` from each start ``x0`` inside its piece
  ``[lo, hi]`` (leading batch axis), step ``s`` of size ``width / 2**(s+1)``. Returns the best
  objective reached, the point, and the Jacobian of ``[f; f_q]`` at the start (what the split rule
  reads). ``steps`` is traced (a loop, not unrolled): one compiled program for the whole-box search
  and the pieces' probes."""
  n_f = int(np.prod(fg.output_shape))

  def both(x):
    return jnp.concatenate([fg(x).reshape(-1), qg(x).reshape(-1)])

  def score(x):
    y = both(x)
    return prop.objective(y[:n_f], y[n_f:])

  def one(x, low, high):
    value_and_grad = jax.value_and_grad(score)
    width = high - low

    def step(s, carry):
      point, best_v, best_x = carry
      _, g = value_and_grad(point)
      point = jnp.clip(point - jnp.sign(g) * width / jnp.exp2(s + 1.0), low, high)
      v = score(point)
      better = v < best_v
      return point, jnp.where(better, v, best_v), jnp.where(better, point, best_x)

    _, best_v, best_x = jax.lax.fori_loop(0, steps, step, (x, score(x), x))
    return best_v, best_x, jax.jacrev(both)(x).reshape(-1, x.size)

  return jax.vmap(one)(x0, lo, hi)


def confirm(prop, raw: MergedNetwork, xs: np.ndarray) -> Optional[np.ndarray]:
  """The first of ``xs`` whose outputs violate the property both in float32 (as the networks run)
  and in float64 (up to ~1e-16 relative), or None."""
  xs = np.asarray(xs, np.float32)
  f32 = np.asarray(jax.vmap(raw.f_graph)(jnp.asarray(xs)), np.float64).reshape(len(xs), -1)
  q32 = np.asarray(jax.vmap(raw.fq_graph)(jnp.asarray(xs)), np.float64).reshape(len(xs), -1)
  f64 = exact_errors(raw.f_graph, xs).reshape(len(xs), -1)
  q64 = exact_errors(raw.fq_graph, xs).reshape(len(xs), -1)
  for k in range(len(xs)):
    if prop.violated(f32[k], q32[k]) and prop.violated(f64[k], q64[k]):
      return xs[k]
  return None


def split_weights(book: RowBook, lows: np.ndarray, jac: np.ndarray, width: np.ndarray) -> np.ndarray:
  """How much a unit of each dimension's width weighs, summed over the open polytopes, in each one's
  row closest to closing it: ``|row . J|``, normalised per polytope so each polytope counts alike
  (times the width, the ReluVal/VeryDiff split score)."""
  gap = lows - book.b  # (polytopes, rows): > 0 closes
  open_ = ~(gap > 0).any(axis=1)
  weight = np.zeros_like(width, dtype=np.float64)
  for i in np.flatnonzero(open_):
    r = int(np.argmax(np.where(np.isfinite(book.b[i]), gap[i], -np.inf)))
    sensitivity = np.abs(book.A[i, r] @ jac)
    total = float((sensitivity * width).sum())
    if total > 0:
      weight += sensitivity / total
  # A dimension the bounds ignore is still split once the others are narrow.
  return weight + 1e-9 * max(float(weight.max(initial=0.0)), 1e-30)


def halves(lo: np.ndarray, hi: np.ndarray, weight: np.ndarray):
  """The two halves of a piece along the dimension that weighs most (``weight * width``), or None
  for a single point."""
  width = hi - lo
  score = np.where(width > 0, weight * width, -1.0)
  axis = int(np.argmax(score))
  if score[axis] < 0:
    return None
  left_hi, right_lo = split_at(lo, hi, axis)
  return (lo, left_hi), (right_lo, hi)


def decide(prop, f, fq, box: Box, *, time_budget: float, key, sound: bool = True, batch_size: int = 64,
           max_pieces: int = 200_000, search_steps: int = 20,
           probe_steps: int = 3, progress: Optional[bool] = False, raw: Optional[MergedNetwork] = None) -> Outcome:
  """Proves ``prop`` on ``box``, finds a counterexample, or runs out of time (see the module doc)."""
  start = time.perf_counter()
  raw = merge(f, fq, box) if raw is None else raw
  n_out = int(np.prod(raw.output_shape))
  book = RowBook(prop.polytopes(n_out), n_out)
  spec = spec_networks(f, fq, box, book.P)
  shape = box.shape
  lower0 = np.asarray(box.lower, np.float32).reshape(-1)
  upper0 = np.asarray(box.upper, np.float32).reshape(-1)
  dim = lower0.size

  def flat(v):
    return np.asarray(v).reshape(len(v), -1)

  # A search over the whole box first: random starts plus the centre (as many as a batch of pieces,
  # so that the search and the probes share one compiled program).
  search_starts = batch_size
  starts = np.array(jax.random.uniform(key, (search_starts, dim), minval=lower0, maxval=upper0), np.float32)
  starts[0] = (lower0 + upper0) / 2
  values, points, _ = descend(raw.f_graph, raw.fq_graph, prop, jnp.asarray(starts.reshape((-1, *shape))),
                              jnp.broadcast_to(lower0.reshape(shape), (search_starts, *shape)),
                              jnp.broadcast_to(upper0.reshape(shape), (search_starts, *shape)), search_steps)
  hits = np.flatnonzero(np.asarray(values) <= 0)
  if hits.size:
    found = confirm(prop, raw, flat(points)[hits].reshape((-1, *shape)))
    if found is not None:
      return Outcome("counterexample", found.reshape(shape), 0, 1, 0.0, "counterexample")

  # Open pieces, bounded and not closed: (objective at the best probe, tiebreak, lower corner, upper
  # corner, depth, split weights).
  heap: list = []
  counter = itertools.count()
  bounded = 0
  closed = 0.0
  stuck = 0  # open pieces that are single points: the property stays undecided there
  counterexample = None

  def bound_batch(pieces):
    """Bounds ``pieces`` (``(lo, hi, depth)``) and pushes the open ones."""
    nonlocal bounded, closed, counterexample, stuck
    k = len(pieces)
    los, his = [p[0] for p in pieces], [p[1] for p in pieces]
    pad = batch_size - k
    lo = np.stack(los + [los[-1]] * pad).reshape((batch_size, *shape))
    hi = np.stack(his + [his[-1]] * pad).reshape((batch_size, *shape))
    zf, zq, d = ((np.asarray(a)[:k], np.asarray(b)[:k]) for a, b in bound_rows(spec, lo, hi, sound))
    lows = book.lower(zf, zq, d)
    refuted = ((lows - book.b[None]) > 0).any(axis=2)
    if hasattr(prop, "refuted_by_f"):  # conditions on f alone no polytope row states (DeltaTop1)
      refuted |= prop.refuted_by_f(lambda v: book.lower_of(zf, v), n_out)
    closes = refuted.all(axis=1)
    v, xs, jac = descend(raw.f_graph, raw.fq_graph, prop, jnp.asarray((lo + hi) / 2), jnp.asarray(lo),
                         jnp.asarray(hi), probe_steps)
    v, xs, jac = np.asarray(v)[:k], flat(xs)[:k], np.asarray(jac)[:k]
    bounded += k
    suspects = np.flatnonzero((v <= 0) & ~closes)
    if suspects.size:
      found = confirm(prop, raw, xs[suspects].reshape((-1, *shape)))
      if found is not None:
        counterexample = found
    for i, (plo, phi, depth) in enumerate(pieces):
      if closes[i]:
        closed += 2.0 ** -depth
      elif np.all(phi <= plo):
        stuck += 1  # a single point that no row closes and no probe confirms
      else:
        weight = split_weights(book, lows[i], jac[i], phi - plo)
        heapq.heappush(heap, (float(v[i]), next(counter), plo, phi, depth, weight))

  def children(take) -> list:
    """Each taken piece split in two, then the children split further (the one that weighs most
    first) while the batch has room: a few open pieces still fill a batch."""
    pool = []
    for t in take:
      for half in halves(t[2], t[3], t[5]) or ():
        pool.append((*half, t[4] + 1, t[5]))
    while 0 < len(pool) < batch_size:
      scores = [float(np.max(w * (h - l))) for l, h, _, w in pool]
      i = int(np.argmax(scores))
      split = halves(pool[i][0], pool[i][1], pool[i][3])
      if split is None or len(pool) + 1 > batch_size:
        break
      _, _, depth, weight = pool.pop(i)
      pool += [(*half, depth + 1, weight) for half in split]
    return [(l, h, depth) for l, h, depth, _ in pool]

  bar = tqdm(desc=f"deciding {prop.describe()}", unit="piece", disable=None if progress is None else not progress,
             leave=False)
  bound_batch([(lower0, upper0, 0)])  # the whole box is bounded whatever the budget: a first answer
  stopped = "proved"
  while True:
    bar.update(bounded - bar.n)
    bar.set_postfix_str(f"closed {closed:.1%}", refresh=False)
    if counterexample is not None:
      stopped = "counterexample"
      break
    if not heap:
      break
    if time.perf_counter() - start > time_budget:
      stopped = "time"
      break
    if len(heap) > max_pieces:
      stopped = "max_pieces"
      break
    take = [heapq.heappop(heap) for _ in range(min(max(batch_size // 2, 1), len(heap)))]
    batch = children(take)
    for chunk in range(0, len(batch), batch_size):
      bound_batch(batch[chunk:chunk + batch_size])
  bar.close()
  if counterexample is not None:
    return Outcome("counterexample", counterexample.reshape(shape), bounded, len(heap), closed, "counterexample")
  if not heap and stopped == "proved":
    if stuck:
      return Outcome("unknown", None, bounded, stuck, closed, "unsplittable")
    return Outcome("proved", None, bounded, 0, 1.0, "proved")
  return Outcome("unknown", None, bounded, len(heap) + stuck, closed, stopped)
