"""Random network pairs with fake quantization, clips and leaky ReLUs, and the soundness property
every bound method must satisfy on them: no proven bound below an error that is actually reached.

Shared by ``tests/test_soundness_properties.py`` (the default suite, few examples) and
``benchmarks/soundness_long.py`` (many examples, a table of violations per method).

A :class:`Case` is plain data (its ``repr`` is the code that rebuilds it): a network shape from
the small fixed set ``SHAPES``, one activation :class:`Act` for f and one for f_q, a weight seed,
how f_q's weights are compressed, an input scaling per network and a box. Bound propagation
compiles once per graph *structure* (weights are arguments), so the strategies vary values (weights,
scales, clip cuts, slopes, boxes) far more than structures (shape, activation kinds, rounding modes).

The reference a bound is checked against (:func:`reference`) is computed in float64, the
real-arithmetic value of the float32 networks up to ~1e-16 relative, which is what sound bounds
promise to enclose: every node's value of both networks at uniform samples, all box corners, a
grid (up to 3 inputs), the centre, and the input gradient ascent (:func:`qbound.maximize_error`)
finds. :func:`check` runs one method on one case and returns what it violated; it never raises for a
violation, so a long run can count them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import helpers as H
import qbound as qb
from qbound import graph as G
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds
from qbound.bounds.interval import interval_bounds

# (inputs, hidden widths, outputs). Hidden layers of one net share a width, so a per-channel scale
# vector fits every layer. The default suite's structures use the first two (fewer compilations).
SHAPES = ((2, (6,), 2), (3, (5, 5), 1), (4, (8,), 3))
DEFAULT_SHAPES = SHAPES[:2]
# Rounding of fake quantization: jnp.floor, jnp.round (halves to even), jnp.ceil, jax.lax.round
# (halves away from zero, its default).
ROUND = {"floor": jnp.floor, "nearest": jnp.round, "ceil": jnp.ceil, "away": jax.lax.round}
MODES = tuple(ROUND)

# Families of (f's activation, f_q's activation) (see :func:`activations`). The first seven are
# expected to pair in qb.merge (f gets identity steps beside f_q's extra ones), so the differential
# bounds run on them; the last two are pairs it cannot pair.
PAIRED_FAMILIES = ("relu", "fq", "fq2", "fqs", "fqz", "clip", "leaky")
FAMILIES = PAIRED_FAMILIES + ("relu-vs-clip", "fq-in-f")

# Tolerances: float64 evaluation differs from real arithmetic by ~1e-16 relative, so sound bounds
# get almost none; sound=False skips the floating-point margins and is held to 1e-4 relative.
SOUND_RTOL = 1e-9
UNSOUND_RTOL = 1e-4

# Lower-bound search settings: one setting, so the search compiles once per graph structure.
SEARCH = qb.Search(samples=256, restarts=4, steps=30)
UNIFORM_SAMPLES = 1500
GRID_PER_AXIS = {1: 201, 2: 41, 3: 13}


@dataclasses.dataclass(frozen=True)
class Act:
  """One hidden activation, applied elementwise to a layer's pre-activation ``z``.

  Attributes:
    kind: ``relu``; ``linear`` (none); ``fq``: fake quantization of ``relu(z)``,
      ``clip(round(relu(z) * scale), lo, hi) / scale``; ``fqs``: the same without the ReLU (signed
      codes); ``fqz``: asymmetric codes with a zero point, ``(clip(round(z * scale) + zero, lo,
      hi) - zero) / scale`` (:func:`qbound.quantize.activations.fake_quant`'s form); ``clip``:
      ``clip(z, lo, hi)`` (relu6, hard tanh, ...); ``leaky``: ``where(z > 0, z, slope * z)``.
    mode: the rounding of ``fq`` / ``fqs`` (a key of ``ROUND``).
    scale: ``s``, one float or one per channel (a tuple as long as the layer).
    lo, hi: clip cuts (in codes for ``fq`` / ``fqs``; may be infinite).
    slope: the negative slope of ``leaky``.
    zero: the zero point of ``fqz`` (nonzero: adding 0 traces to no node, another structure).
  """

  kind: str
  mode: str = "nearest"
  scale: float | tuple = 1.0
  lo: float = 0.0
  hi: float = math.inf
  slope: float = 0.1
  zero: float = 0.0

  def __call__(self, z):
    dtype = z.dtype
    s = jnp.asarray(self.scale, dtype)
    lo, hi = jnp.asarray(self.lo, dtype), jnp.asarray(self.hi, dtype)
    if self.kind == "relu":
      return jax.nn.relu(z)
    if self.kind == "linear":
      return z
    if self.kind == "fq":
      return jnp.clip(ROUND[self.mode](jax.nn.relu(z) * s), lo, hi) / s
    if self.kind == "fqs":
      return jnp.clip(ROUND[self.mode](z * s), lo, hi) / s
    if self.kind == "fqz":
      zero = jnp.asarray(self.zero, dtype)
      return (jnp.clip(ROUND[self.mode](z * s) + zero, lo, hi) - zero) / s
    if self.kind == "clip":
      return jnp.clip(z, lo, hi)
    if self.kind == "leaky":
      return jnp.where(z > 0, z, jnp.asarray(self.slope, dtype) * z)
    raise ValueError(f"unknown activation kind {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Case:
  """A pair of networks ``x -> W_out act(... act(W_1 (x / c) + b_1) ...) + b_out`` and a box.

  Attributes:
    family: which family of :func:`cases` made it (for reports).
    shape: ``(inputs, hidden widths, outputs)``.
    act_f, act_q: the hidden activation of f and of f_q.
    seed: seed of f's weights (normal, ``gain / sqrt(fan_in)``; biases ``0.5 * gain``).
    compression: f_q's weights: ``("bits", b)`` uniform quantization, ``("noise", sigma)``
      perturbation, or ``("same",)`` f's own (all of the error comes from the activations).
    gain: weight scale (larger makes more activations unstable or saturated).
    input_scale: ``(c_f, c_q)``: f reads ``x / c_f`` and f_q ``x / c_q`` (e.g. 255 vs 256).
    lower, upper: the box.
  """

  family: str
  shape: tuple
  act_f: Act
  act_q: Act
  seed: int
  compression: tuple = ("bits", 4)
  gain: float = 1.0
  input_scale: tuple = (1.0, 1.0)
  lower: tuple = (-1.0, -1.0)
  upper: tuple = (1.0, 1.0)

  @property
  def box(self) -> qb.Box:
    return qb.Box(jnp.asarray(self.lower, jnp.float32), jnp.asarray(self.upper, jnp.float32))

  @property
  def expect_paired(self) -> bool:
    return self.family in PAIRED_FAMILIES

  def networks(self) -> tuple[Callable, Callable]:
    """``(f, fq)``: pure functions of one unbatched float32 input."""
    params, qparams = _weights(self.shape, self.seed, self.compression, self.gain)
    c_f, c_q = (jnp.asarray(c, jnp.float32) for c in self.input_scale)
    return (functools.partial(_forward, params, self.act_f, c_f), functools.partial(_forward, qparams, self.act_q, c_q))


def _forward(params, act: Act, c, x):
  h = x / c
  for w, b in params[:-1]:
    h = act(h @ w + b)
  w, b = params[-1]
  return h @ w + b


@functools.lru_cache(maxsize=256)
def _weights(shape, seed: int, compression: tuple, gain: float):
  n_in, hidden, n_out = shape
  sizes = (n_in, *hidden, n_out)
  rng = np.random.default_rng(seed)
  params = [(jnp.asarray(rng.normal(size=(a, b)) * gain / np.sqrt(a), jnp.float32),
             jnp.asarray(rng.normal(size=b) * 0.5 * gain, jnp.float32)) for a, b in zip(sizes[:-1], sizes[1:])]
  if compression[0] == "bits":
    qparams = H.uniform_quantize(params, compression[1])
  elif compression[0] == "noise":
    qparams = H.perturb(params, jax.random.key(seed + 1), compression[1])
  else:
    qparams = params
  return params, qparams


@functools.lru_cache(maxsize=64)
def merged(case: Case) -> qb.MergedNetwork:
  f, fq = case.networks()
  return qb.merge(f, fq, case.box)


# ------------------------------------------------------------------------------------ strategies


class Structure(NamedTuple):
  """What fixes the traced graphs' structure (and so what compiles): a family of activation pairs,
  a shape and the rounding modes (``"-"`` where the family has no rounding on that side)."""

  family: str
  shape: tuple
  mode_f: str = "-"
  mode_q: str = "-"

  def __str__(self) -> str:
    n_in, hidden, n_out = self.shape
    modes = "" if self.mode_f == self.mode_q == "-" else f" {self.mode_f}/{self.mode_q}"
    return f"{self.family}{modes} {n_in}x{'x'.join(map(str, hidden))}x{n_out}"


def _with_shapes(pairs, shapes):
  """Every ``(family, mode_f, mode_q)`` on one of ``shapes`` in turn (each structure once)."""
  return tuple(Structure(family, shapes[i % len(shapes)], mode_f, mode_q) for i, (family, mode_f, mode_q) in
               enumerate(pairs))


# Every family and every rounding once, alternating between two shapes: the default suite.
_ROTATED = MODES[1:] + MODES[:1]
STRUCTURES = _with_shapes(
    [("fq", "-", m) for m in MODES]
    + [("fq2", a, b) for a, b in zip(MODES, _ROTATED)]
    + [("fqs", "-", m) for m in _ROTATED] + [("fqz", "-", "nearest")]
    + [("clip", "-", "-"), ("clip", "-", "-"), ("leaky", "-", "-"), ("relu", "-", "-"),
       ("relu-vs-clip", "-", "-"), ("fq-in-f", "floor", "-")],
    DEFAULT_SHAPES)
# Every family on every shape with every rounding (and every pair of them for fq2): the long run.
ALL_STRUCTURES = tuple(
    Structure(family, shape, mode_f, mode_q) for shape in SHAPES for family, mode_f, mode_q in
    [("fq", "-", m) for m in MODES] + [("fq2", a, b) for a in MODES for b in MODES]
    + [("fqs", "-", m) for m in MODES] + [("fqz", "-", m) for m in MODES] + [("fq-in-f", m, "-") for m in MODES]
    + [("clip", "-", "-"), ("leaky", "-", "-"), ("relu", "-", "-"), ("relu-vs-clip", "-", "-")])


def _scale(rng: np.random.Generator, width: int):
  """A fake-quantization scale ``s`` (codes per unit): a power of two or 255-style value, or
  log-uniform in [0.5, 64]; one for the layer, or one per channel."""
  def one():
    if rng.random() < 0.4:
      return float(rng.choice([1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 255.0 / 6, 127.0]))
    return float(np.float32(np.exp(rng.uniform(np.log(0.5), np.log(64.0)))))

  if rng.random() < 0.5:
    return tuple(one() for _ in range(width))
  return one()


def _code_range(rng: np.random.Generator, signed: bool):
  """Clip cuts of the codes: the full range of 1 to 8 bits, a narrow one (saturating over most of
  the box), or one side open; at the bottom a cut above 0 lifts the ReLU's zeros too."""
  bits = int(rng.integers(1, 9))
  if signed:
    lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
  else:
    lo, hi = 0.0, 2.0 ** bits - 1
  kind = rng.choice(["full", "narrow", "top open", "bottom open", "bottom raised"])
  if kind == "narrow":
    hi = float(rng.integers(0, 4))
    lo = min(lo, hi - 1)
  elif kind == "top open":
    hi = math.inf
  elif kind == "bottom open":
    lo = -math.inf
  elif kind == "bottom raised":
    lo = float(rng.integers(1, 4))
    hi = max(hi, lo + 1)
  return lo, hi


def _clip_cuts(rng: np.random.Generator):
  """Cuts of a plain clip (relu6-, hard-tanh-style, one-sided, narrow): never both infinite (no
  clip at all), never ``(0, inf)`` (a ReLU) and never equal (a constant): those trace as other
  structures."""
  kind = rng.choice(["relu6", "hardtanh", "upper only", "interval", "narrow"])
  if kind == "relu6":
    return 0.0, float(rng.choice([6.0, 4.0, 1.0, 0.5]))
  if kind == "hardtanh":
    return -float(rng.choice([1.0, 0.8, 1.2, 2.0])), float(rng.choice([1.0, 0.8, 1.2, 2.0]))
  if kind == "upper only":
    return -math.inf, float(np.float32(rng.uniform(-1.0, 2.0)))
  lo = float(np.float32(rng.uniform(-2.0, 1.5)))
  width = rng.uniform(1e-3, 0.2) if kind == "narrow" else rng.uniform(0.1, 3.0)
  return lo, float(np.float32(lo + width))


def _fake_quant(rng, mode: str, width: int) -> Act:
  lo, hi = _code_range(rng, False)
  return Act("fq", mode, _scale(rng, width), lo, hi)


def activations(structure: Structure, rng: np.random.Generator) -> tuple[Act, Act]:
  """``(act_f, act_q)`` of a structure's family, the values drawn from ``rng``."""
  family, width = structure.family, structure.shape[1][0]
  if family == "relu":
    return Act("relu"), Act("relu")
  if family == "fq":  # f_q's (often saturating) fake quantization beside f's identity
    return Act("relu"), _fake_quant(rng, structure.mode_q, width)
  if family == "fq2":  # both fake-quantized, with other scales, cuts and roundings
    return _fake_quant(rng, structure.mode_f, width), _fake_quant(rng, structure.mode_q, width)
  if family == "fqs":  # signed codes and no ReLU: clipped at the bottom and the top
    lo, hi = _code_range(rng, True)
    return Act("linear"), Act("fqs", structure.mode_q, _scale(rng, width), lo, hi)
  if family == "fqz":  # asymmetric codes: [0, 2^bits - 1] around a zero point
    bits = int(rng.integers(1, 9))
    hi = 2.0 ** bits - 1
    zero = float(rng.integers(1, max(2, int(hi))))
    lo, hi = (0.0, float(rng.integers(0, 4))) if rng.random() < 0.25 else (0.0, hi)  # narrow: saturating
    return Act("linear"), Act("fqz", structure.mode_q, _scale(rng, width), lo, max(hi, 1.0), zero=zero)
  if family == "clip":
    (lo_f, hi_f), (lo_q, hi_q) = _clip_cuts(rng), _clip_cuts(rng)
    return Act("clip", lo=lo_f, hi=hi_f), Act("clip", lo=lo_q, hi=hi_q)
  if family == "leaky":  # slope 0 would trace as a ReLU (another structure)
    slope_f, slope_q = (float(np.float32(v)) for v in rng.uniform(0.01, 0.5, 2))
    return Act("leaky", slope=slope_f), Act("leaky", slope=slope_q)
  # Pairs qb.merge cannot pair (the differential methods are skipped; the others run on the merged
  # graph): f's ReLU against f_q's clip, and a fake quantization in f that f_q lacks.
  if family == "relu-vs-clip":
    return Act("relu"), Act("clip", lo=0.0, hi=float(rng.choice([0.5, 1.0, 4.0])))
  if family == "fq-in-f":
    return _fake_quant(rng, structure.mode_f, width), Act("relu")
  raise ValueError(f"unknown family {family!r}")


def _box(rng: np.random.Generator, kind: str, n_in: int, c: float):
  """A box in f's input units (``c`` times a box around O(1) values): ordinary, wide, thin, or
  degenerate (zero width) in some coordinates."""
  centre = rng.uniform(-1.5, 1.5, n_in)
  if kind == "ordinary":
    radius = rng.uniform(0.05, 1.0, n_in)
  elif kind == "wide":
    radius = rng.uniform(1.0, 3.0, n_in)
  elif kind == "thin":
    radius = np.full(n_in, 10.0 ** rng.uniform(-6, -2))
  else:
    radius = np.where(rng.random(n_in) < 0.5, 0.0, rng.uniform(0.1, 1.0, n_in))
  lower = np.asarray((centre - radius) * c, np.float32)
  upper = np.maximum(np.asarray((centre + radius) * c, np.float32), lower)
  return tuple(float(v) for v in lower), tuple(float(v) for v in upper)


@st.composite
def cases(draw, structure: Structure) -> Case:
  """Random :class:`Case` s of one structure: everything drawn is a value (weights, scales, cuts,
  slopes, boxes), so all of them reuse one set of compilations.

  Hypothesis draws the seeds and the discrete edge cases (compression, weight scale, input
  scaling, kind of box); the continuous values come from a generator seeded by it, uniformly
  spread (hypothesis favours boundary values: tiny boxes at 0, which hide most errors).
  """
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="values seed"))
  act_f, act_q = activations(structure, rng)
  compression = draw(st.one_of(st.tuples(st.just("bits"), st.integers(2, 8)),
                               st.tuples(st.just("noise"), st.sampled_from([1e-3, 0.02, 0.1, 0.3])),
                               st.just(("same",))))
  c_f, c_q = draw(st.sampled_from([(1.0, 1.0), (255.0, 256.0), (256.0, 255.0), (255.0, 255.0), (1.0, 1.001)]))
  box_kind = draw(st.sampled_from(["ordinary", "wide", "thin", "degenerate"]))
  lower, upper = _box(rng, box_kind, structure.shape[0], c_f)
  return Case(family=structure.family, shape=structure.shape, act_f=act_f, act_q=act_q,
              seed=draw(st.integers(0, 2**16)), compression=compression,
              gain=draw(st.sampled_from([1.0, 2.0, 0.5, 4.0])), input_scale=(c_f, c_q), lower=lower, upper=upper)


# ------------------------------------------------------------------------------------- reference


class Reference(NamedTuple):
  """float64 values of every node at the reference points of one box.

  Attributes:
    points: ``(n, *input_shape)``, all inside the box.
    nodes: the merged graph's node values, one ``(n, size)`` array per node.
    f_nodes, q_nodes: the same for ``merged.f_graph`` and ``merged.fq_graph`` (f_q's input is
      node 0 of the merged graph).
    diffs: ``(n, outputs)``: ``f(x) - f_q(x)``.
  """

  points: np.ndarray
  nodes: list
  f_nodes: list
  q_nodes: list
  diffs: np.ndarray

  @property
  def max_error(self) -> float:
    return float(np.max(np.abs(self.diffs)))


@functools.lru_cache(maxsize=None)
def _values64(structure):
  del structure  # one compilation per graph structure and batch size; the weights are arguments
  return jax.jit(jax.vmap(lambda graph, x: graph.values(x), in_axes=(None, 0)))


def _points(box: qb.Box, seed: int, witness) -> np.ndarray:
  """Uniform samples, every corner, a grid (up to 3 inputs), the centre and the search's witness;
  as many for every box of one input size (one compilation of the evaluation)."""
  rng = np.random.default_rng(seed)
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  n = lo.size
  parts = [lo + rng.uniform(size=(UNIFORM_SAMPLES, n)) * (hi - lo)]
  corners = np.array(list(itertools.product([0, 1], repeat=n)), bool)
  parts.append(np.where(corners, hi, lo))
  if n in GRID_PER_AXIS:
    parts.append(H.grid(box, GRID_PER_AXIS[n]))
  parts.append(((lo + hi) / 2)[None])
  parts.append(np.asarray(witness, np.float64).reshape(1, n))
  # float32 points (what a user could pass), inside the float32 box.
  return np.clip(np.concatenate(parts).astype(np.float32), np.asarray(box.lower), np.asarray(box.upper))


def reference(mn: qb.MergedNetwork, box: qb.Box, seed: int = 0) -> Reference:
  """The float64 :class:`Reference` of a merged network on a box (the search included)."""
  _, witness = qb.maximize_error(mn, box, key=jax.random.key(seed), search=SEARCH)
  xs = _points(box, seed, witness)
  with jax.enable_x64(True):
    g64 = G.astype(jax.tree_util.tree_map(np.asarray, mn.graph), jnp.float64)
    values = _values64(jax.tree_util.tree_structure(g64))(g64, jnp.asarray(xs, jnp.float64))
    nodes = [np.asarray(v, np.float64).reshape(xs.shape[0], -1) for v in values]
  n_f = len(mn.f_graph.nodes)
  f_nodes = nodes[:n_f]
  q_nodes = [nodes[0]] + [nodes[i + mn.fq_offset] for i in range(1, len(mn.fq_graph.nodes))]
  return Reference(xs, nodes, f_nodes, q_nodes, nodes[mn.graph.output])


@functools.lru_cache(maxsize=64)
def case_reference(case: Case) -> Reference:
  return reference(merged(case), case.box, case.seed)


# ----------------------------------------------------------------------------------------- checks


class Outcome(NamedTuple):
  """What one method did on one case: ``violations`` (empty: sound), or ``skipped`` (why not run)."""

  violations: list
  skipped: Optional[str] = None
  seconds: float = 0.0


def _tolerance(values, bound, sound: bool) -> float:
  scale = 1.0 + float(np.max(np.abs(values), initial=0.0))
  if sound:
    return SOUND_RTOL * scale
  return UNSOUND_RTOL * (scale + float(np.max(np.abs(np.asarray(bound, np.float64)), initial=0.0)))


def enclosure_violations(label: str, lower, upper, values, sound: bool) -> list:
  """Where sampled ``values`` (``(n, size)``) leave the proven ``[lower, upper]`` (entrywise), and any
  empty (``lower > upper``) or NaN interval; one message per kind of failure."""
  lo = np.asarray(lower, np.float64).reshape(-1)
  hi = np.asarray(upper, np.float64).reshape(-1)
  out = []
  if np.any(np.isnan(lo)) or np.any(np.isnan(hi)):
    out.append(f"{label}: NaN bound")
    return out
  tol = _tolerance(values, np.concatenate([lo, hi]), sound)
  if np.any(lo > hi + (0 if sound else tol)):
    j = int(np.argmax(lo - hi))
    out.append(f"{label}: empty interval at entry {j}: lower {float(lo[j])!r} > upper {float(hi[j])!r}")
  below = values < lo - tol
  above = values > hi + tol
  for name, bad, excess in (("below the lower bound", below, lo - values), ("above the upper bound", above, values - hi)):
    if bad.any():
      k, j = np.unravel_index(np.argmax(np.where(bad, excess, -np.inf)), bad.shape)
      out.append(f"{label}: a reached value {float(values[k, j])!r} (entry {j}) is {name} "
                 f"[{float(lo[j])!r}, {float(hi[j])!r}] by {float(excess[k, j]):.3g}")
  return out


def upper_violations(label: str, upper: float, reached: float, sound: bool) -> list:
  """A proven max-error ``upper`` below the largest ``reached`` error."""
  tol = _tolerance(np.array([reached]), np.array([upper]), sound)
  if not upper >= reached - tol:
    return [f"{label}: proven upper bound {upper!r} < reached error {reached!r}"]
  return []


def _node_violations(label: str, bounds, values, sound: bool, graph: G.Graph) -> list:
  out = []
  for idx, (lo, hi) in enumerate(bounds):
    out += enclosure_violations(f"{label} node {idx} ({graph.nodes[idx].kind})", lo, hi, values[idx], sound)
  return out


# certify: "reached error 0.5 at [...] exceeds the proven bound 0.4 (...)"; certify_batch writes the
# numbers as np.float64(...). Spot checks: "output 0 is 0.2, outside the proven [0.08, 0.09]".
_NUMBER = r"(?:np\.float64\()?([-+0-9.eE]+|-?inf|nan)\)?"
_REACHED = re.compile(rf"reached error {_NUMBER} at .*? exceeds the proven bound {_NUMBER}")
_OUTSIDE = re.compile(rf"is {_NUMBER}, outside the proven \[{_NUMBER}, {_NUMBER}\]")


def _soundness_error(label: str, err: Exception, sound: bool) -> list:
  """A :class:`qbound.SoundnessError` the library raised about its own bounds (certify's witness
  check, a spot check, an empty interval): a violation, except in unsound mode within tolerance."""
  message = f"{label}: {type(err).__name__}: {err}"
  if sound or isinstance(err, qb.InvalidBoundsError):
    return [message]
  if found := _REACHED.search(str(err)):
    reached, upper = float(found.group(1)), float(found.group(2))
    return [message] if upper_violations(label, upper, reached, sound) else []
  if found := _OUTSIDE.search(str(err)):
    value, lo, hi = (float(g) for g in found.groups())
    return [message] if enclosure_violations(label, lo, hi, np.array([[value]]), sound) else []
  return [message]


def _graph_method(name: str):
  def run(mn, box, ref, sound):
    graph = mn.graph
    if name == "interval":
      bounds = interval_bounds(graph, box, sound)
    else:
      bounds = crown_bounds(graph, box, None, sound)
    out = _node_violations(name, bounds, ref.nodes, sound, graph)
    lo, hi = bounds[graph.output]
    upper = float(max(np.max(-np.asarray(lo, np.float64)), np.max(np.asarray(hi, np.float64)), 0.0))
    return out + upper_violations(name, upper, ref.max_error, sound)

  return run


def _diff_method(symbolic: bool):
  name = "diff" if symbolic else "diff-interval"

  def run(mn, box, ref, sound):
    if not mn.paired:
      return None
    fg, qg = mn.f_graph, mn.fq_graph
    z, zq, d = diff_bounds(fg, qg, box, None, sound, symbolic)
    out = _node_violations(f"{name} z", z, ref.f_nodes, sound, fg)
    out += _node_violations(f"{name} zq", zq, ref.q_nodes, sound, qg)
    gaps = [a - b for a, b in zip(ref.f_nodes, ref.q_nodes)]
    out += _node_violations(f"{name} d", d, gaps, sound, fg)
    lo, hi = d[fg.output]
    upper = float(max(np.max(-np.asarray(lo, np.float64)), np.max(np.asarray(hi, np.float64)), 0.0))
    return out + upper_violations(name, upper, ref.max_error, sound)

  return run


def _certificate_violations(label: str, cert, ref: Reference, sound: bool) -> list:
  out = enclosure_violations(f"{label} diff bounds", cert.diff_lower, cert.diff_upper, ref.diffs, sound)
  out += upper_violations(label, cert.upper, ref.max_error, sound)
  return out


# certify's time budgets (seconds, compilation included): enough for branch and bound to split
# after the first batch on warm caches, short enough for many examples.
BAB_BUDGET = 0.5
AUTO_BUDGET = 0.5
MILP_BUDGET = 2.0
ALPHA_STEPS = 3


def _certify_method(method: str, **kwargs):
  def run(mn, box, ref, sound):
    try:
      cert = qb.certify(mn, None, box, method=method, sound=sound, search=SEARCH, key=jax.random.key(1), **kwargs)
    except qb.SoundnessError as err:
      return _soundness_error(method, err, sound)
    return _certificate_violations(method, cert, ref, sound)

  return run


def _sub_boxes(box: qb.Box, seed: int) -> list:
  """The box, a random part of it and one of its faces (a box thin in one coordinate)."""
  rng = np.random.default_rng(seed + 7)
  lo, hi = np.asarray(box.lower, np.float64), np.asarray(box.upper, np.float64)
  a, b = rng.uniform(size=lo.shape), rng.uniform(size=lo.shape)
  part = (lo + np.minimum(a, b) * (hi - lo), lo + np.maximum(a, b) * (hi - lo))
  face_hi = hi.copy()
  face_hi[0] = lo[0]
  out = [box]
  for l, u in (part, (lo, face_hi)):
    l32, u32 = np.asarray(l, np.float32), np.asarray(u, np.float32)
    out.append(qb.Box(jnp.asarray(np.minimum(l32, u32)), jnp.asarray(u32)))
  return out


BATCH_METHODS = ("diff", "crown", "interval")


def _batch(mn, box, ref, sound, case: Case):
  boxes = _sub_boxes(box, case.seed)
  refs = [ref] + [reference(mn, b, case.seed + k) for k, b in enumerate(boxes[1:], start=1)]
  batch = qb.Box(jnp.stack([b.lower for b in boxes]), jnp.stack([b.upper for b in boxes]))
  out = []
  for method in BATCH_METHODS:
    if method == "diff" and not mn.paired:
      continue
    label = f"certify_batch {method}"
    try:
      result = qb.certify_batch(mn, None, batch, method=method, sound=sound, search=SEARCH, key=jax.random.key(2),
                                progress=False)
    except qb.SoundnessError as err:
      out += _soundness_error(label, err, sound)
      continue
    for i, r in enumerate(refs):
      out += _certificate_violations(f"{label} box {i}", result[i], r, sound)
  return out


METHODS = {
    "interval": _graph_method("interval"),
    "crown": _graph_method("crown"),
    "diff": _diff_method(True),
    "diff-interval": _diff_method(False),
    "alpha": _certify_method("alpha", alpha_steps=ALPHA_STEPS),
    "bab": _certify_method("bab", time_budget=BAB_BUDGET, target_gap=0.0),
    "milp": _certify_method("milp", time_budget=MILP_BUDGET),
    "auto": _certify_method("auto", time_budget=AUTO_BUDGET),
    "batch": _batch,
}


def check(method: str, case: Case, sound: bool = True) -> Outcome:
  """Runs one method on one case and returns its violations of soundness.

  Checked: every node's proven interval (interval, CROWN, and the differential ``z``, ``z_q``,
  ``d``) holds every node's float64 value at the reference points; the per-output bounds on
  ``f - f_q`` of certificates hold the reference's; no proven upper bound is below the largest
  reached error; no bound is empty or NaN (the library's own ``InvalidBoundsError`` and
  ``BoundOverflowError`` count as violations); and the fake-quantization families pair.
  """
  start = time.perf_counter()
  mn = merged(case)
  out = []
  if case.expect_paired and not mn.paired:
    out.append(f"merge did not pair the {case.family} family ({case.act_f} beside {case.act_q})")
  ref = case_reference(case)
  box = case.box
  try:
    if method == "batch":
      found = _batch(mn, box, ref, sound, case)
    else:
      found = METHODS[method](mn, box, ref, sound)
  except qb.SoundnessError as err:  # an empty interval or a failed spot check, found by the library itself
    found = _soundness_error(method, err, sound)
  except qb.BoundOverflowError as err:  # NaN: these nets and boxes are far from float32's range
    found = [f"{method}: {type(err).__name__}: {err}"]
  if found is None:
    return Outcome(out, skipped="not paired", seconds=time.perf_counter() - start)
  return Outcome(out + found, seconds=time.perf_counter() - start)


def describe(case: Case, outcome: Outcome, methods=None, sound: Optional[bool] = None, limit: int = 6) -> str:
  """A failure message: the violations, then code (run in ``tests/``) that checks the case again."""
  lines = outcome.violations[:limit]
  if len(outcome.violations) > limit:
    lines.append(f"... and {len(outcome.violations) - limit} more")
  lines.append("reproduce in tests/ with:\n  from math import inf\n  import soundness_cases as S\n"
               f"  from soundness_cases import Act, Case\n  case = {case!r}")
  for method in methods or ():
    lines.append(f"  print(S.check({method!r}, case, sound={sound}).violations)")
  return "\n".join(lines)
