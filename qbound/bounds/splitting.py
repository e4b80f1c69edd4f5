"""Where branch and bound splits a piece of the input box: scores, candidates and the kept split.

A piece's bound is the minimum over the piece of a linear function of the input, so
``|coefficient_i| * width_i`` is what dimension ``i``'s width costs it: ReluVal's smear (Wang et al.,
USENIX Security 2018), VeryDiff's generator influence (Teuber et al., TACAS 2025). Strong branching
bounds both halves along a few of the dimensions that weigh most and keeps the split whose children
gain most together (the product rule of MIP solvers; Achterberg, "Constraint Integer
Programming", 2007, section 5.3). On paired ReLU chains the coefficients are by default replaced by
an interval gradient's largest magnitude over the piece (NeuroDiff's split; Paulsen et al., ASE
2020; :func:`gradient_coefficients`): the scores here read either.

Example:
  >>> import numpy as np
  >>> from qbound.bounds.splitting import candidate_axes, split_at
  >>> candidate_axes(np.array([1.0, 0.5, 0.0]), np.array([1.0, 4.0, 9.0]), count=2)
  [1, 0]
  >>> left_hi, right_lo = split_at(np.zeros(2), np.ones(2), 1)
  >>> left_hi.tolist(), right_lo.tolist()
  ([1.0, 0.5], [0.0, 0.5])
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qbound import graph as G


def split_scores(width: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
  """How much each input dimension weighs in a piece's bound: ``|coefficient| * width`` (what the
  bound's minimum over the piece loses to that dimension's width; ReluVal's smear, VeryDiff's
  generator influence), -1 for dimensions of width 0. A tiny share of the width breaks ties, so
  that a dimension the bound ignores is still split once the others are."""
  score = (sensitivity + 1e-9 * (sensitivity.max(initial=0.0) + 1e-30)) * width
  return np.where(width > 0, score, -1.0)


def candidate_axes(width: np.ndarray, sensitivity: np.ndarray, count: int = 3) -> list:
  """The dimensions worth trying to split: positive width, the ``count`` that weigh most in the
  bound (:func:`split_scores`)."""
  score = split_scores(width, sensitivity)
  axes = np.argsort(-score, kind="stable")[:count]
  return [int(a) for a in axes if score[a] >= 0]


def strong_branching_axis(parent: float, children: Sequence[tuple]) -> int:
  """Which of the tried splits to keep: the largest product of the two children's improvements.

  Ranking splits by the worse child alone (minimax) stalls: when the worst region sits in one
  corner, every split leaves one child nearly as bad as the parent. The product of both children's
  gains (each at least a small floor) is the score MIP solvers use for strong branching
  (Achterberg, "Constraint Integer Programming", 2007, section 5.3).
  """
  floor = 1e-6 * max(abs(parent), 1e-30)
  return int(np.argmax([max(parent - a, floor) * max(parent - b, floor) for a, b in children]))


def split_at(lo, hi, axis):
  """Upper corner of the left half and lower corner of the right half, split at the midpoint."""
  mid = np.float32((lo[axis] + hi[axis]) / 2)
  left_hi, right_lo = hi.copy(), lo.copy()
  left_hi[axis] = mid
  right_lo[axis] = mid
  return left_hi, right_lo


def gradient_supported(fg: G.Graph, qg: G.Graph) -> bool:
  """Whether :func:`interval_gradient` walks these graphs: chains of affine layers, ReLUs and clips."""
  return all(n.kind in (G.INPUT, G.AFFINE, G.RELU, G.CLIP) and (n.kind == G.INPUT or tuple(n.inputs) == (i - 1,))
             for g in (fg, qg) for i, n in enumerate(g.nodes))


def _chain_gradient(graph: G.Graph, bounds, rows):
  """Interval gradient of ``rows @ output`` w.r.t. the input of a chain of affine layers, ReLUs and
  clips: centre and radius, shape ``(k, inputs)``. A ReLU whose input range is ``[lo, hi]`` has slope
  1 (``lo >= 0``), 0 (``hi <= 0``) or anything in [0, 1] (the cotangent's interval joined with 0)."""
  c, r = rows, jnp.zeros_like(rows)
  for i in range(graph.output, 0, -1):
    node = graph.nodes[i]
    if node.kind == G.AFFINE:
      c, r = jax.vmap(node.linear_transpose)(c), jax.vmap(node.linear_abs_transpose)(r)
    else:  # ReLU, or a clip: slope 1 between its cuts, 0 outside
      lo, hi = bounds[node.inputs[0]]
      low_cut, high_cut = (0.0, jnp.inf) if node.kind == G.RELU else node.weights
      flat = (hi <= low_cut) | (lo >= high_cut)
      kink = ~flat & ((lo < low_cut) | (hi > high_cut))
      gl, gu = c - r, c + r
      gl = jnp.where(flat, 0.0, jnp.where(kink, jnp.minimum(gl, 0.0), gl))
      gu = jnp.where(flat, 0.0, jnp.where(kink, jnp.maximum(gu, 0.0), gu))
      c, r = (gl + gu) / 2, (gu - gl) / 2
  return c.reshape(c.shape[0], -1), r.reshape(r.shape[0], -1)


def interval_gradient(fg: G.Graph, qg: G.Graph, z, zq, outputs):
  """An enclosure of the gradient of ``f_j - f_q,j`` over a piece, for each selected output ``j``:
  centre and radius of shape ``(inputs, len(outputs))``, from the ReLU states that the node bounds
  ``z`` (f's) and ``zq`` (f_q's) give (ReluVal's interval gradient, Wang et al., USENIX Security
  2018; NeuroDiff splits where ``max |gradient| * width`` is largest). The caller checks
  :func:`gradient_supported`."""
  node = fg.nodes[fg.output]
  rows = jax.nn.one_hot(jnp.asarray(outputs), node.size, dtype=z[0][0].dtype).reshape((len(outputs), *node.shape))
  cf, rf = _chain_gradient(fg, z, rows)
  cq, rq = _chain_gradient(qg, zq, rows)
  return (cf - cq).T, (rf + rq).T


def gradient_coefficients(fg: G.Graph, qg: G.Graph, lo, hi, z, zq, outputs):
  """NeuroDiff's split score as branch and bound's coefficients: the largest ``|gradient|`` of
  ``f_j - f_q,j`` per input over each piece, from an interval gradient over the ReLU states that the
  pieces' node bounds ``z`` (f's) and ``zq`` (f_q's) give (ReluVal's interval gradient, Wang et al.,
  USENIX Security 2018; NeuroDiff, Paulsen et al., ASE 2020), for the lower and the upper rows alike
  (``(pieces, 2 * outputs, inputs)``: the split rule reads their sum, times the width)."""
  needed = lambda g: tuple(sorted({n.inputs[0] for n in g.nodes if n.kind in (G.RELU, G.CLIP)}))
  nf, nq = needed(fg), needed(qg)
  return _gradient_scores(fg, qg, lo, hi, tuple(z[i] for i in nf), tuple(zq[i] for i in nq), nf, nq,
                          tuple(int(o) for o in outputs))


@functools.partial(jax.jit, static_argnames=("nf", "nq", "outputs"))
def _gradient_scores(fg, qg, lo, hi, zf, zq, nf, nq, outputs):
  def one(l, h, bf, bq):
    # Only the nodes a ReLU or clip reads are looked at; the input's entry gives the dtype.
    full_f, full_q = [(l, h)] + [None] * (len(fg.nodes) - 1), [(l, h)] + [None] * (len(qg.nodes) - 1)
    for i, b in zip(nf, bf):
      full_f[i] = b
    for i, b in zip(nq, bq):
      full_q[i] = b
    centre, radius = interval_gradient(fg, qg, full_f, full_q, outputs)
    return (jnp.abs(centre) + radius).T  # (outputs, inputs)

  rows = jax.vmap(one)(lo, hi, zf, zq)
  return jnp.concatenate([rows, rows], axis=1)


def resolve_split_rule(merged, paired: bool, split_rule: str) -> str:
  """``"bound"`` or ``"gradient"`` from a ``split_rule`` argument (see :func:`qbound.bounds.bab.branch_and_bound`)."""
  if split_rule not in ("auto", "bound", "gradient"):
    raise ValueError(f"split_rule must be 'auto', 'bound' or 'gradient'; got {split_rule!r}.")
  walks = paired and gradient_supported(merged.f_graph, merged.fq_graph)
  if split_rule == "auto":
    return "gradient" if walks else "bound"
  if split_rule == "gradient" and not walks:
    raise ValueError("split_rule='gradient' needs f and f_q paired as chains of affine layers, ReLUs and clips "
                     "(the interval gradient walks no other node); use split_rule='bound'.")
  return split_rule
