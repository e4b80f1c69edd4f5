"""Lower bounds on the maximal error: inputs that reach a large ``|f(x) - f_q(x)|_inf``.

Uniform samples and random vertices of the box are evaluated in one vmapped, jit-compiled batch;
the best ones start projected gradient ascent (Adam from optax, on box-normalised coordinates,
projected back onto the box after every step) on ``|g(x)|_inf``, as in PGD attacks (Madry et al.,
"Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018). Then, if
``Search.refine_rounds`` asks for it (:data:`STAIRCASE` does), a derivative-free refinement: the
best points found so far are perturbed at random within a radius that shrinks
geometrically round after round, and the best of old and new points are kept (an elitist random
local search, in the family of Rastrigin's fixed-step random search, "The convergence of the random
search method in the extremal control of a many parameter system", Automation and Remote Control
24, 1963, and Schumer and Steiglitz's adaptive step random search, IEEE TAC 13(3), 1968). It needs
no gradient: where f_q rounds its activations it is a staircase, whose gradient is zero on the
treads and useless across the jumps, and gradient ascent stops at the first tread.

:func:`maximize_error` with ``exact=True`` runs the whole search on the graph cast to float64 on
the host CPU: the error it ranks is the real-arithmetic one a certificate reports as ``lower``. On a
staircase this matters: in float32, ``x / s`` rounds to the far side of a rounding tie for inputs
within an ulp of it, and a float32 search homes in on such inputs, where the real-arithmetic
error is a fraction of what float32 shows (qwix's dynamic int8 MLP: 0.034 in float32 at points
where float64 gives 0.006-0.019).

Whatever it returns is an error actually reached: a valid lower bound on the maximal error, with
its witness.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qbound import graph as G
from qbound import sharding, validate
from qbound.bounds.common import FAST_COMPILE, tracing
from qbound.box import Box, sample_uniform, sample_vertices, validate_box
from qbound.errors import BoundOverflowError
from qbound.merge import MergedNetwork


@dataclasses.dataclass(frozen=True)
class Search:
  """Settings of the lower-bound search.

  Attributes:
    samples: uniform samples drawn from the box (plus a quarter as many random vertices).
    restarts: how many of the best samples start gradient ascent.
    steps: gradient-ascent steps per start.
    learning_rate: Adam's initial step, in units of the box's width (cosine-decayed).
    refine_rounds: rounds of the derivative-free refinement (0, the default: none; on smooth
      networks 20 rounds reached up to 2% more, 3x on ACAS Xu 1_1, for a first call 0.5-2.3 s
      longer, see the comment above :data:`STAIRCASE`; networks that round use :data:`STAIRCASE`).
    refine_points: how many of the best points found so far each round perturbs.
    refine_tries: random perturbations of each point per round: a random half of the coordinates
      moved uniformly within the round's radius.
    refine_radius: the first round's radius, in units of the box's width; it shrinks geometrically
      to ``refine_radius * 1e-4`` in the last round.
  """

  samples: int = 4096
  restarts: int = 16
  steps: int = 100
  learning_rate: float = 0.05
  refine_rounds: int = 0
  refine_points: int = 16
  refine_tries: int = 16
  refine_radius: float = 0.25

  def __post_init__(self):
    # Checked here, once: the settings are static arguments of compiled searches, where a negative
    # count or a NaN step would fail deep inside XLA or search nothing without a word.
    validate.integer("Search.samples", self.samples, minimum=0)
    validate.integer("Search.restarts", self.restarts, minimum=0)
    validate.integer("Search.steps", self.steps, minimum=0)
    validate.non_negative("Search.learning_rate", self.learning_rate)
    validate.integer("Search.refine_rounds", self.refine_rounds, minimum=0)
    validate.integer("Search.refine_points", self.refine_points, minimum=0)
    validate.integer("Search.refine_tries", self.refine_tries, minimum=0)
    validate.non_negative("Search.refine_radius", self.refine_radius)


# The refinement is off by default: on smooth networks, after gradient ascent (20 rounds of 16 points x
# 16 tries), it reached a little more for a longer first call. Measured with QBOUND_JAX_CACHE=0 in one
# process, old and new interleaved, on a loaded machine (load 7.7 on 2 cores), the NeuroDiff pairs
# against their 16-bit copies (benchmarks/bench_tight.py's boxes): MNIST 3x100 (6 boxes) reached
# +0-1.7% (0.00242 = 0.00242 on the first box), first call 1.5 -> 3.8 s, warm 238 -> 393 ms; HAR
# (6 boxes) +0-0.6%, 2.0 -> 3.8 s, 302 -> 380 ms; ACAS Xu 1_1 on property 1's box 1.63e-5 ->
# 4.85e-5, 1.5 -> 2.0 s, 34 -> 59 ms.

# Settings for networks that round their activations (staircases; certify uses them with
# exact=True): more samples, no gradient ascent (zero gradients on the treads), a longer refinement
# of more points from a smaller first radius. Chosen among five settings of about equal cost on the
# linen 4-16-16-2 MLP pairs of benchmarks/bench_quant_libraries.py (float64 search, 10 keys each,
# 0.3 s warm each): median (min-max) error reached 0.0334 (0.0320-0.0347) on qwix dynamic int8 and
# 0.0632 (0.0590-0.0716) on AQT static int8 po2, against 0.0322 (0.0306-0.0341) and 0.0625
# (0.0559-0.0716) for 30 rounds of 128 points x 32 tries from radius 0.25. The default search
# (gradient ascent, no refinement; 0.01 s warm) reached 0.0196 and 0.0403 in float32, 0.0227 and
# 0.0430 in float64 (medians of 6 keys; float64 values at their witnesses).
STAIRCASE = Search(samples=16384, restarts=0, steps=0, refine_rounds=40, refine_points=256, refine_tries=16,
                   refine_radius=0.1)


def check_search(value: Any):
  """None or a :class:`qbound.attack.Search` (whose fields check themselves)."""
  if value is not None and not isinstance(value, Search):
    raise TypeError(f"search must be None or a qbound.Search(samples=..., restarts=..., steps=..., "
                    f"learning_rate=...); got {type(value).__name__} {validate.shown(value)}.")
  return value


def _abs_max(fn, x, outputs=None):
  y = fn(x)
  return jnp.max(jnp.abs(y if outputs is None else y.reshape(-1)[jnp.asarray(outputs)]))


def _nan_last(values):
  return jnp.where(jnp.isnan(values), -jnp.inf, values)


def _search(fn: Callable, box: Box, key, search: Search, mesh=None, input_dtype=None, outputs=None):
  """Best ``(value, x)`` of ``|fn(x)|_inf`` found over the box (samples and restarts split over
  ``mesh``'s devices when given). With ``input_dtype``, every input tried is first rounded to that
  dtype (a float32 model searched in float64: its witnesses stay float32 inputs, inside the box
  since the box's corners are float32 too). ``outputs``: a tuple of flat output indices, the only
  ones whose error counts (None: all)."""
  def representable(x):
    return x if input_dtype is None else x.astype(input_dtype).astype(x.dtype)

  k_uniform, k_vertex = jax.random.split(key)
  xs = representable(jnp.concatenate([sample_uniform(k_uniform, box, search.samples),
                                      sample_vertices(k_vertex, box, max(search.samples // 4, 1)),
                                      box.center[None]]))
  xs = sharding.constrain_batch(xs, mesh)
  objective = functools.partial(_abs_max, fn, outputs=outputs)
  # NaN marks an input where the float32 evaluation overflowed (inf - inf): no error is known there,
  # and NaN would win argmax and top_k (NaN sorts above everything), so such samples rank last.
  values = _nan_last(jax.vmap(objective)(xs))
  restarts = min(search.restarts, xs.shape[0])
  _, top = jax.lax.top_k(values, restarts)
  width = box.upper - box.lower
  safe_width = jnp.where(width > 0, width, 1)
  starts = sharding.constrain_batch((xs[top] - box.lower) / safe_width, mesh)

  schedule = optax.cosine_decay_schedule(search.learning_rate, max(search.steps, 1))
  optimizer = optax.adam(schedule)

  def to_x(t):
    return representable(box.lower + jnp.clip(t, 0, 1) * width)

  def ascend(t0):
    def step(carry, _):
      t, state, best_v, best_t = carry
      v, grad = jax.value_and_grad(lambda t: objective(to_x(t)))(t)
      better = v > best_v
      best_v = jnp.where(better, v, best_v)
      best_t = jnp.where(better, t, best_t)
      updates, state = optimizer.update(-grad, state, t)
      t = jnp.clip(optax.apply_updates(t, updates), 0, 1)
      return (t, state, best_v, best_t), None

    init = (t0, optimizer.init(t0), -jnp.inf, t0)
    (t, _, best_v, best_t), _ = jax.lax.scan(step, init, None, length=search.steps)
    final_v = objective(to_x(t))
    return jnp.where(final_v > best_v, final_v, best_v), jnp.where(final_v > best_v, t, best_t)

  cand_v, cand_x = values, xs
  if restarts and search.steps:  # (not compiled at all otherwise: STAIRCASE has none)
    asc_v, asc_t = jax.vmap(ascend)(starts)
    cand_v = jnp.concatenate([cand_v, _nan_last(asc_v)])
    cand_x = jnp.concatenate([cand_x, jax.vmap(to_x)(asc_t)])
  if search.refine_rounds and search.refine_points and search.refine_tries:
    cand_v, cand_x = _refine(objective, to_x, cand_v, cand_x, (cand_x - box.lower) / safe_width,
                             jax.random.fold_in(key, 1), search, mesh)
  best = jnp.argmax(cand_v)
  return cand_v[best], cand_x[best]


def _refine(objective, to_x, values, xs, ts, key, search: Search, mesh=None):
  """Derivative-free refinement of the best of the points ``xs`` (``ts`` box-normalised, ``to_x``
  maps back): every round perturbs each of the ``refine_points`` best points ``refine_tries`` times,
  a random half of the coordinates moved uniformly within the round's radius, and keeps the best of
  old and new points. Returns the kept points' values and inputs (each value is the objective at
  its input exactly: ``to_x(ts)`` may differ from ``xs`` by an ulp)."""
  points = min(search.refine_points, ts.shape[0])
  kept_v, top = jax.lax.top_k(values, points)
  kept = (kept_v, ts[top], xs[top])
  rounds, first = search.refine_rounds, search.refine_radius
  shrink = 1e-4 ** (1.0 / max(rounds - 1, 1))  # to first * 1e-4 in the last round

  def round_(kept, k):
    kept_v, kept_t, kept_x = kept
    k_step, k_mask = jax.random.split(jax.random.fold_in(key, k))
    shape = (points, search.refine_tries, *kept_t.shape[1:])
    step = jax.random.uniform(k_step, shape, kept_t.dtype, -1.0, 1.0)
    step = jnp.where(jax.random.bernoulli(k_mask, 0.5, shape), step, 0.0)
    radius = first * shrink ** k.astype(kept_t.dtype)
    tries = jnp.clip(kept_t[:, None] + radius * step, 0.0, 1.0).reshape(-1, *kept_t.shape[1:])
    tries = sharding.constrain_batch(tries, mesh)
    tried_x = jax.vmap(to_x)(tries)
    tried_v = _nan_last(jax.vmap(objective)(tried_x))
    all_v = jnp.concatenate([kept_v, tried_v])
    kept_v, best = jax.lax.top_k(all_v, points)
    return (kept_v, jnp.concatenate([kept_t, tries])[best], jnp.concatenate([kept_x, tried_x])[best]), None

  (kept_v, _, kept_x), _ = jax.lax.scan(round_, kept, jnp.arange(rounds))
  return kept_v, kept_x


@functools.partial(jax.jit, static_argnames=("search", "mesh", "input_dtype", "outputs"))
def _search_graph(graph: G.Graph, box: Box, key, search: Search, mesh=None, input_dtype=None, outputs=None):
  return _search(graph, box, key, search, mesh, input_dtype, outputs)


# The search compiled without XLA's backend optimisations (FAST_COMPILE), for small networks: there
# a first call mostly waits for the compiler, and a search runs in milliseconds either way. Measured
# (2 cores, compile / warm search): ACAS Xu pair 1.6 s / 17 ms -> 0.57 s / 26 ms, the digits MLP
# pair 1.2 s / 8 ms -> 0.42 s / 33 ms; but a small CNN pair 1.6 s / 79 ms -> 0.78 s / 257 ms and
# MNIST 3x100 1.2 s / 0.12 s -> 0.62 s / 0.20 s, so convolutions and larger networks keep the
# optimised program.
FAST_SEARCH_PRODUCTS = 1 << 15
_search_graph_fast = functools.partial(jax.jit, static_argnames=("search", "mesh", "input_dtype", "outputs"),
                                       compiler_options=FAST_COMPILE)(_search_graph.__wrapped__)


def has_rounding(graph: G.Graph) -> bool:
  """Whether the graph rounds values inside its forward pass (quantized activations): it is then a
  staircase, whose maximal error :data:`STAIRCASE` with ``exact=True`` searches best."""
  return any(node.kind == G.ROUND and node.attrs[0] != "none" for node in graph.nodes)


def _search_exact(graph: G.Graph, box: Box, key, search: Search, outputs=None):
  """:func:`_search` on the graph cast to float64, on the host CPU (see :func:`exact_error`); the
  inputs tried are rounded to the graph's own input dtype. Returns ``(value, x)`` as NumPy values."""
  input_dtype = np.dtype(jnp.result_type(box.lower))
  fast = _compiles_fast(graph)
  with jax.enable_x64(True), jax.default_device(jax.local_devices(backend="cpu")[0]):
    box64 = Box(jnp.asarray(np.asarray(box.lower, np.float64)), jnp.asarray(np.asarray(box.upper, np.float64)))
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # a typed key, moved to the host as its data
      key = jax.random.wrap_key_data(np.asarray(jax.random.key_data(key)), impl=jax.random.key_impl(key))
    else:
      key = jnp.asarray(np.asarray(key))
    search_fn = _search_graph_fast if fast else _search_graph
    value, x = search_fn(G.float64_copy(graph), box64, key, search, None, input_dtype.type, outputs)
    return float(value), np.asarray(x).astype(input_dtype)


def _compiles_fast(graph: G.Graph) -> bool:
  """Whether the search on ``graph`` takes the :data:`FAST_COMPILE` program: dense layers only, with
  at most :data:`FAST_SEARCH_PRODUCTS` multiplications per evaluation."""
  linear = [node for node in graph.nodes if node.kind == G.AFFINE and node.op is not None]
  if any(node.op.name.startswith("conv_general_dilated") for node in linear):  # rescaled ones too
    return False
  return sum(node.terms * node.size for node in linear) <= FAST_SEARCH_PRODUCTS


# How certify runs STAIRCASE on networks that round (qbound.certify): beside the bounds, in a thread of
# its own, once the first bound is proven, for this share of the time budget and at least this many
# runs, at this niceness added to the thread's (it yields the CPU to the bounds, whose first
# compilation it delayed at nice 0 on a loaded machine, without starving: a nice of 5 still gets
# about a third of a nice-0 thread's share of the CPU).
STAIRCASE_SHARE = 0.05
STAIRCASE_RUNS = 1
STAIRCASE_NICE = 5


def lower_thread_priority(nice: int = STAIRCASE_NICE) -> None:
  """Lowers the calling thread's scheduling priority by ``nice`` where the OS sets it per thread
  (Linux); elsewhere nothing. Call it from a thread of its own (it is not undone)."""
  try:
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
  except (AttributeError, OSError):  # no per-thread priorities here
    pass


def search_until(graph: G.Graph, box: Box, *, key, search: Optional[Search], until: float, runs: int,
                 stop: Callable[[], bool], report: Callable) -> None:
  """:func:`maximize_error` with ``exact=True`` (settings ``search`` or :data:`STAIRCASE`), run with a
  new key each time until ``time.perf_counter()`` passes ``until`` (at least ``runs`` times) or
  ``stop()``; ``report(witness)`` after each run.

  Several short runs rather than one long one: each run's refinement closes in on the best few
  points of its own samples, and new samples find other steps.
  """
  key = jax.random.key(0) if key is None else key
  run = 0
  while True:
    _, x = maximize_error(graph, box, key=jax.random.fold_in(key, run), search=search or STAIRCASE, exact=True)
    report(x)
    run += 1
    if stop() or (run >= runs and time.perf_counter() >= until):
      return


def exact_error(graph: G.Graph, x) -> np.ndarray:
  """``graph(x)`` evaluated in float64: the real-arithmetic value up to ~1e-16 relative.

  Runs on the host's CPU backend (always present in jaxlib), whatever the default device: TPUs
  have no float64, and this one evaluation per witness is all of qbound's default path that
  uses it (bounds and searches run in float32 on the devices).
  """
  return exact_errors(graph, np.asarray(x)[None])[0]


# Batches are padded to a power of two of at least this many inputs, so a first call compiles one
# program for its first probes, its witness and most batches after (each size compiles on its own:
# 0.1-0.2 s on small nets, more on CNNs).
_MIN_BUCKET = 16


def exact_errors(graph: G.Graph, xs) -> np.ndarray:
  """:func:`exact_error` for a batch of inputs ``xs`` (leading axis), in one compiled call."""
  xs = np.asarray(xs)
  if xs.dtype == object or xs.ndim == 0:  # None, or a list of arrays of different shapes
    raise TypeError(f"exact_errors takes a batch of inputs as one numeric array, got {xs.dtype} of shape {xs.shape}")
  n = xs.shape[0]
  bucket = max(_MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
  padded = np.concatenate([xs, np.broadcast_to(xs[:1], (bucket - n, *xs.shape[1:]))]) if 0 < n < bucket else xs
  with jax.enable_x64(True), jax.default_device(jax.local_devices(backend="cpu")[0]):
    out = _vmapped(G.float64_copy(graph), jnp.asarray(padded, jnp.float64))
    out = np.asarray(out, np.float64)[:n]
  _check_no_nan(out, xs)
  return out


def _check_no_nan(values: np.ndarray, xs: np.ndarray) -> None:
  """Raises if a float64 evaluation overflowed to NaN (``values`` and ``xs`` with one row per input):
  NaN would be taken for an error reached, or slip through every comparison with a bound, when no
  error is known there at all."""
  rows = np.isnan(values.reshape(values.shape[0], -1)).any(axis=1)
  if rows.any():
    x = xs[int(np.flatnonzero(rows)[0])].reshape(-1)
    shown = x[:8].tolist() + (["..."] if x.size > 8 else [])
    raise BoundOverflowError(
        f"evaluating the networks in float64 at x = {shown} gave NaN: a value overflowed even float64. "
        "The inputs or weights are too large; scale them down.")


# One evaluation per witness or probe batch: compiled for a short compile (see FAST_COMPILE).
@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _vmapped(graph: G.Graph, xs):
  return jax.vmap(graph)(xs)


def maximize_error(fn, box: Box, *, key=None, search: Optional[Search] = None, mesh=None, exact: bool = False,
                   outputs=None):
  """The largest ``|fn(x)|_inf`` found over ``box`` and the input reaching it.

  Args:
    fn: a pure JAX function of one input (e.g. ``lambda x: f(x) - fq(x)``), a traced
      :class:`~qbound.graph.Graph` or a :class:`~qbound.merge.MergedNetwork` (these reuse
      compiled code across calls).
    box: the input set.
    key: a ``jax.random`` key; ``jax.random.key(0)`` when omitted.
    search: the sampling and gradient-ascent settings.
    mesh: the devices the samples and restarts are split over (a one-axis
      :class:`jax.sharding.Mesh`, see :mod:`qbound.sharding`); default: all of ``jax.devices()``.
    exact: search the real-arithmetic error instead (``fn`` a graph or merged network only): the
      graph cast to float64 on the host CPU, the inputs tried rounded to the box's dtype. The value
      is then what :func:`exact_error` gives at the witness, as a certificate's ``lower``. Worth
      it where f_q rounds its activations (see the module's docstring); ``mesh`` is not used.
    outputs: flat output indices whose error counts (default: all), as ``certify``'s ``outputs``.

  Returns:
    ``(value, witness)`` with ``value == |fn(witness)|_inf`` (as computed in the function's dtype,
    or in float64 with ``exact``).
    Inputs where ``fn`` overflows to NaN are never chosen; ``value`` is ``-inf`` if every input
    tried did.

  Raises:
    TypeError, ValueError: an argument of the wrong kind or out of range (see :mod:`qbound.validate`).

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> v, x = qb.maximize_error(lambda x: jnp.sin(3 * x), qb.Box(jnp.zeros(1), jnp.ones(1)))
    >>> round(float(v), 3)
    1.0

    A staircase (rounding to steps of 1/4: the error peaks at the ties), searched in float64:

    >>> g = qb.trace(lambda x: x - jnp.round(4 * x) / 4, jnp.zeros(2))
    >>> v, x = qb.maximize_error(g, qb.Box(-jnp.ones(2), jnp.ones(2)), search=qb.attack.STAIRCASE, exact=True)
    >>> round(v, 3)
    0.125
  """
  validate.function("fn", fn)
  box = validate_box(box)
  key = validate.prng_key("key", key)
  search = check_search(search)
  validate.mesh_or_devices(mesh, None)
  key = jax.random.key(0) if key is None else key
  search = search or Search()
  if isinstance(fn, MergedNetwork):
    fn = fn.graph
  if outputs is not None:
    outputs = tuple(int(o) for o in np.asarray(outputs, np.int64).reshape(-1))
    n_out = int(np.prod(jax.eval_shape(fn, jax.ShapeDtypeStruct(box.lower.shape, box.lower.dtype)).shape))
    if not outputs or min(outputs) < 0 or max(outputs) >= n_out:
      raise ValueError(f"maximize_error(outputs={list(outputs)}): needs flat output indices in [0, {n_out}) "
                       "(at least one); pass None for all outputs.")
  if validate.boolean("exact", exact):
    if not isinstance(fn, G.Graph):
      raise TypeError("maximize_error(exact=True) needs a traced Graph or a MergedNetwork (qb.merge(f, fq, box)): "
                      f"a plain function cannot be evaluated in float64; got {type(fn).__name__}.")
    return _search_exact(fn, box, key, search, outputs)
  mesh = sharding.resolve_mesh(mesh)
  if isinstance(fn, G.Graph):
    fast = _compiles_fast(fn) and not tracing((fn, box, key))  # options only on an outermost jit
    search_fn = _search_graph_fast if fast else _search_graph
    value, x = search_fn(fn, box, key, search, mesh, outputs=outputs)
  else:
    value, x = jax.jit(_search, static_argnums=(0, 3, 4, 5, 6))(fn, box, key, search, mesh, None, outputs)
  return float(value), np.asarray(x)


# --- projected gradient ascent on many pieces at once, one objective per output and sign -----------


@dataclasses.dataclass(frozen=True)
class PieceSearch:
  """Settings of :func:`search_pieces`.

  Attributes:
    starts: random starting points per piece and objective (an objective is one output's
      ``+g_j`` or ``-g_j``), plus each piece's centre once per objective.
    steps: projected gradient-ascent steps per start.
    step: the first step, as a share of the piece's width along each input (signed gradient
      steps, halved by a cosine schedule to 1% of it by the end).
    momentum: heavy-ball momentum on the signed steps (Polyak), 0 for plain PGD.
  """

  starts: int = 8
  steps: int = 60
  step: float = 0.1
  momentum: float = 0.75

  def __post_init__(self):
    validate.integer("PieceSearch.starts", self.starts, minimum=0)
    validate.integer("PieceSearch.steps", self.steps, minimum=0)
    validate.non_negative("PieceSearch.step", self.step)
    validate.non_negative("PieceSearch.momentum", self.momentum)


def _piece_ascent(graph: G.Graph, outputs, search: PieceSearch, shape, lo, hi, t0, j, sign):
  """Signed-gradient ascent with momentum on ``sign * g_j`` in the piece ``[lo, hi]`` from the
  box-normalised point ``t0``: the best ``max_k |g_k|`` seen over the selected outputs and its input."""
  width = hi - lo
  to_x = lambda t: lo + jnp.clip(t, 0.0, 1.0) * width
  g = lambda x: graph(x.reshape(shape)).reshape(-1)
  objective = lambda t: sign * g(to_x(t))[j]
  value_of = lambda x: jnp.max(jnp.abs(g(x)[outputs]))
  steps = max(search.steps, 1)

  def step(carry, k):
    t, velocity, best_v, best_t = carry
    grad = jax.grad(objective)(t)
    size = search.step * (0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * k / steps)))
    velocity = search.momentum * velocity + jnp.sign(grad)
    t = jnp.clip(t + size * jnp.sign(velocity), 0.0, 1.0)
    v = value_of(to_x(t))
    better = v > best_v
    return (t, velocity, jnp.where(better, v, best_v), jnp.where(better, t, best_t)), None

  init = (t0, jnp.zeros_like(t0), value_of(to_x(t0)), t0)
  (_, _, best_v, best_t), _ = jax.lax.scan(step, init, jnp.arange(search.steps, dtype=t0.dtype))
  return _nan_last(best_v), to_x(best_t)


@functools.partial(jax.jit, static_argnames=("search", "shape"))
def _search_pieces(graph: G.Graph, outputs, lo, hi, key, search: PieceSearch, shape):
  pieces, dim = lo.shape
  objectives = 2 * outputs.shape[0]
  per_piece = objectives * (search.starts + 1)
  random = jax.random.uniform(key, (pieces, objectives, search.starts, dim), lo.dtype)
  centre = jnp.full((pieces, objectives, 1, dim), 0.5, lo.dtype)
  t0 = jnp.concatenate([random, centre], axis=2).reshape(pieces * per_piece, dim)
  which = jnp.repeat(jnp.arange(pieces), per_piece)
  objective = jnp.tile(jnp.repeat(jnp.arange(objectives), search.starts + 1), pieces)
  j = outputs[objective // 2]
  sign = jnp.where(objective % 2 == 0, 1.0, -1.0).astype(lo.dtype)
  ascend = functools.partial(_piece_ascent, graph, outputs, search, shape)
  values, xs = jax.vmap(ascend)(lo[which], hi[which], t0, j, sign)
  best = jnp.argmax(values)
  return values[best], xs[best]


# As for maximize_error, small dense nets take the program compiled without XLA's optimisations:
# ACAS Xu pair, 8 pieces (branch and bound's rounds), first call 0.97 s against 3.41 s, then 0.41 s
# against 0.31 s per round (loaded machine). A round's compilation counts against the search's
# share of branch and bound's time, so a cold call would otherwise search once.
_search_pieces_fast = functools.partial(jax.jit, static_argnames=("search", "shape"),
                                        compiler_options=FAST_COMPILE)(_search_pieces.__wrapped__)


def search_pieces(graph: G.Graph, lower, upper, *, key, outputs=None, search: Optional[PieceSearch] = None):
  """The largest ``max_j |g_j(x)|`` found by projected gradient ascent in a batch of pieces.

  Every piece ``[lower[i], upper[i]]`` gets, for each selected output ``j`` and each sign ``s``,
  ``search.starts`` uniform random starts and its centre, each climbing ``s * g_j`` by signed
  gradient steps with momentum, projected back onto the piece (PGD, Madry et al., ICLR 2018;
  momentum as in MI-FGSM, Dong et al., CVPR 2018). One objective per output and sign climbs the
  steepest way to each candidate maximiser; ascent on ``|g|_inf`` itself follows whichever output
  is largest at the start. Used by branch and bound on its worst pieces
  (:mod:`qbound.bounds.refute`), where ``g`` is close to piecewise affine with few pieces.

  Args:
    graph: the merged network's graph (``g = f - f_q``) of one unbatched input.
    lower, upper: the pieces' corners, shape ``(pieces, *input_shape)``.
    key: a ``jax.random`` key.
    outputs: indices into the flattened output whose error counts (all by default).
    search: the settings (:class:`PieceSearch`).

  Returns:
    ``(value, x)``: the best error reached (float32 evaluation) and the input reaching it.

  Example:
    >>> import jax, jax.numpy as jnp, qbound as qb
    >>> from qbound.attack import search_pieces
    >>> g = qb.trace(lambda x: 2.0 * x - 1.0, jnp.zeros(1))
    >>> v, x = search_pieces(g, jnp.zeros((2, 1)), jnp.array([[0.25], [0.5]]), key=jax.random.key(0))
    >>> round(v, 3), x.tolist()
    (1.0, [0.0])
  """
  search = search or PieceSearch()
  lower = jnp.asarray(lower)
  upper = jnp.asarray(upper)
  if lower.shape != upper.shape or lower.ndim < 2:
    raise ValueError(f"search_pieces needs lower and upper of one shape (pieces, *input_shape); got "
                     f"{lower.shape} and {upper.shape}")
  n_out = int(np.prod(jax.eval_shape(graph, jax.ShapeDtypeStruct(lower.shape[1:], lower.dtype)).shape))
  outputs = jnp.arange(n_out) if outputs is None else jnp.asarray(outputs, jnp.int32)
  flat_lo, flat_hi = lower.reshape(lower.shape[0], -1), upper.reshape(upper.shape[0], -1)
  shape = tuple(lower.shape[1:])
  fast = _compiles_fast(graph) and not tracing((graph, lower, upper, key))
  value, x = (_search_pieces_fast if fast else _search_pieces)(graph, outputs, flat_lo, flat_hi, key, search, shape)
  return float(value), np.asarray(x).reshape(shape)
