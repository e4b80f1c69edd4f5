"""Which linear relaxation each activation node gets (piecewise-linear ones from
:mod:`qbound.bounds.relax`, S-shaped ones from :mod:`qbound.bounds.smooth`)."""

from __future__ import annotations

from qbound import graph as G
from qbound.bounds import relax, smooth
from qbound.bounds.relax import DiffRelaxation, Relaxation


def for_node(node: G.Node, lo, hi, params=None, *, sound: bool = True) -> Relaxation:
  """The relaxation of an activation node (relu, clip, round, tanh, sigmoid) on ``[lo, hi]``.

  ``params`` are the optimisable slopes: ReLU's lower slope, or the ``{"lower", "upper"}``
  fractions of :func:`qbound.bounds.smooth.relaxation`; None gives the defaults. For a dynamic
  ``rms`` rounding: a :class:`qbound.rms_rounding.Joint` (:mod:`qbound.bounds.rms_rest`), or None.
  """
  if node.kind == G.RELU:
    return relax.relu(lo, hi, params, sound=sound)
  if node.kind == G.CLIP:
    return relax.clip(lo, hi, *node.weights, sound=sound)
  if node.kind == G.ROUND:
    return relax.rounding(lo, hi, node.attrs[0], sound=sound, node=node, rest=params)
  if node.kind in G.SMOOTH:
    return smooth.relaxation(node.kind, lo, hi, params, sound=sound)
  raise ValueError(f"no linear relaxation for node kind {node.kind!r}")


def diff_for_nodes(nf: G.Node, nq: G.Node, z, zq, d, params=None, *, sound: bool = True) -> DiffRelaxation:
  """Lines bounding ``act_f(z) - act_q(zq)`` in ``d = z - zq`` and ``zq`` for a pair of activation
  nodes of the same kind (whose clips' cuts or rounding modes may differ), given the bounds
  ``z``, ``zq``, ``d`` of their inputs as ``(lower, upper)`` pairs. ``params``: a ReLU's, clip's or
  curve's slopes; for a dynamic ``rms`` rounding ``{"rest": ...}`` (:mod:`qbound.bounds.rms_rest`)."""
  if nf.kind == G.RELU:
    return relax.relu_diff(*z, *zq, *d, params, sound=sound)
  if nf.kind == G.CLIP:
    return relax.clip_diff(*z, *zq, *d, nf.weights, nq.weights, params, sound=sound)
  if nf.kind in G.SMOOTH:
    return smooth.diff_relaxation(nf.kind, *z, *zq, *d, params, sound=sound)
  if nf.kind == G.ROUND:
    rest = params.get("rest") if isinstance(params, dict) else None
    return relax.rounding_diff(*z, *zq, nf.attrs[0], nq.attrs[0], sound=sound, nodes=(nf, nq), rest=rest)
  raise ValueError(f"no differential relaxation for node kind {nf.kind!r}")


def loose(node: G.Node, lo, hi):
  """Where the relaxation of the activation ``node`` over ``[lo, hi]`` is not exact, so a tighter
  bound on its input could tighten what follows: a ReLU whose input changes sign, a clip whose input
  crosses a cut, a rounding not on one step, any tanh or sigmoid of positive width. Elsewhere the
  activation is linear over the interval and its input's bound matters no more."""
  if node.kind == G.RELU:
    return (lo < 0) & (hi > 0)
  if node.kind == G.CLIP:
    low_cut, high_cut = node.weights
    return ((lo < low_cut) & (hi > low_cut)) | ((lo < high_cut) & (hi > high_cut))
  if node.kind == G.ROUND:
    if not relax.is_staircase(node.attrs[0]):  # exact only where its input's bounds fix its step
      return ~relax.dynamic_bounds(node, lo, hi)[1]
    fn = G.ROUNDING[node.attrs[0]]
    return fn(lo) != fn(hi)
  if node.kind in G.SMOOTH or node.kind in G.NONLINEAR:
    return hi > lo
  raise ValueError(f"no linear relaxation for node kind {node.kind!r}")


def diff_loose(nf: G.Node, nq: G.Node, z, zq, d):
  """Where the differential lines of a pair of activations (:func:`diff_for_nodes`) are not exact
  over the bounds ``z``, ``zq``, ``d`` of their inputs. Two ReLUs each linear over their input's
  range differ by a linear function of ``d`` and ``zq`` (``d``, ``zq + d``, ``-zq`` or 0), so only
  neurons that change sign in f or f_q need ``d``'s bound; other kinds: wherever ``d`` is not a
  single point."""
  if nf.kind == G.RELU:
    return loose(nf, *z) | loose(nq, *zq)
  return d[1] > d[0]
