"""certify_batch(): certificates for many input boxes at once, over every device, within memory.

``certify_batch(f, fq, boxes)`` certifies ``max_{x in box} |f(x) - fq(x)|_inf`` for every box of a
batch (a :class:`~qbound.box.Box` whose arrays have a leading batch axis, e.g.
``qb.linf_ball(images, 3 / 255, clip_lower=0, clip_upper=1)``) with one named method. The
networks are traced and merged once; the bound computation and the lower-bound search are each
``jax.vmap``-ed over a chunk of boxes and compiled once per chunk shape (the last chunk is padded
to the same shape, so nothing recompiles; on deep graphs the bounds run as ``certify``'s per-node
steps, each compiled once for the chunk, see ``STEP_NODES``); each chunk is split over the devices of a mesh
(:mod:`qbound.sharding`, the networks replicated) and sized from a memory budget
(:mod:`qbound.memory`), which may also cut the backward bounds into blocks of rows.

Box ``i`` of the batch gets exactly what ``qb.certify(f, fq, box_i, method=method,
key=jax.random.split(key, n)[i])`` gives it (to float rounding: batched matrix products may sum
in another order): the same proven bounds, the same witness search, the same float64 re-evaluation
of the witness (on the host CPU, see :func:`qbound.attack.exact_error`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from qbound import _map_limit, attack, memory, serialize, sharding, validate
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds, require_paired
from qbound.bounds import guards
from qbound.bounds.interval import interval_bounds
from qbound.box import Box, box_at, validate_boxes
from qbound.certificate import Certificate, check_read, max_abs
from qbound.errors import BoundOverflowError, InfiniteBoundWarning, InvalidBoundsError, SoundnessError
from qbound.merge import MergedNetwork, check_networks, merge

BATCH_METHODS = ("interval", "crown", "diff", "diff-interval", "alpha")
# Graphs of at least this many nodes (merged network) have their bounds computed step by step: the
# per-node steps certify runs, each compiled once for a chunk of boxes (vmapped), instead of one
# program per chunk holding every node's backward pass. That program grows with the square of the
# depth: a 7-10-5-7-2 tanh MLP with 7-bit activations (64 nodes, `diff`, idle machine) compiled in
# 33 s for 3 boxes and 273 s for 64, and took the process to 6.1 GiB; step by step 30 s and 35 s at
# 1.0 GiB, as certify on one box. Shallow graphs keep the one program: it runs faster (a warm chunk
# of 64 boxes of that MLP: 0.07 s of bounds against 0.32 s) and compiles about as fast there (MNIST
# 3x100 against float16, 22 nodes, 50 boxes: 26 s against 28 s on a first call, 0.4 s of bounds
# against 2.0 s warm).
STEP_NODES = 40
# What each field of a BatchCertificate holds, for reading it back (qbound.serialize).
_BATCH_FIELDS = {
    "upper": serialize.ARRAY, "lower": serialize.ARRAY, "diff_lower": serialize.ARRAY,
    "diff_upper": serialize.ARRAY, "witness": serialize.ARRAY, "seconds": serialize.ARRAY, "method": serialize.STRING,
    "bounds": serialize.ARRAYS, "sound": serialize.BOOL, "lower_float32": serialize.ARRAY,
    "witness_diff": serialize.ARRAY, "box_lower": serialize.ARRAY, "box_upper": serialize.ARRAY,
    "compile_seconds": serialize.FLOAT, "total_seconds": serialize.FLOAT, "layout": serialize.OBJECT,
}


@dataclasses.dataclass(frozen=True)
class BatchCertificate:
  """Certificates for a batch of boxes, as arrays with a leading batch axis of length ``n``.

  ``batch[i]`` is box ``i``'s :class:`~qbound.certificate.Certificate`, and :meth:`certificates` all of
  them.

  Attributes:
    upper: ``(n,)`` proven upper bounds on each box's maximal error.
    lower: ``(n,)`` errors reached at ``witness`` (float64 evaluation).
    diff_lower, diff_upper: ``(n, outputs)`` proven bounds on ``f_j(x) - fq_j(x)``.
    witness: ``(n, *input_shape)`` inputs reaching ``lower``.
    seconds: ``(n,)`` each box's share of the running time of its chunk (compilation excluded).
    method: the method used for every box.
    bounds: ``{name: (n,) upper bounds}`` of every bound the method computed (``alpha`` also
      reports ``crown`` and ``diff``, which it intersects with).
    sound: whether floating-point margins were applied.
    lower_float32: ``(n,)`` the error at the witness as f and fq compute it.
    witness_diff: ``(n, outputs)`` ``f(witness) - fq(witness)`` in float64.
    box_lower, box_upper: ``(n, *input_shape)`` the boxes.
    compile_seconds: time spent compiling (about 0 when this structure and chunk shape ran before).
    total_seconds: wall-clock time of the whole call (tracing, compilation, chunks, witnesses).
    layout: how the work was laid out: ``devices``, ``chunk`` (boxes per compiled call, all
      devices), ``row_chunk`` (backward rows per block, None for all), ``memory_budget`` and
      ``buffer_budget`` (what is left of it for XLA's buffers), ``memory_estimate`` (bytes per
      device, :mod:`qbound.memory`), ``xla_bytes`` (what XLA
      assigned to the larger of the two compiled programs, per device; the search's alone when the
      bounds run step by step), ``bounds`` (``"program"``: one compiled program per chunk;
      ``"steps"``: on graphs of ``STEP_NODES`` nodes or more, the per-node steps ``certify`` runs,
      vmapped over the chunk, whose compilation then falls in the first chunk's time, not in
      ``compile_seconds``), ``device_of_box`` (the mesh
      position of the device that bounded each box), ``shards`` (``{device id: boxes}`` of a
      chunk's input) and ``seconds`` (running time of the bounds, the search and the witnesses'
      re-evaluation, all boxes together).

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=4))
    >>> boxes = qb.linf_ball(jax.random.uniform(jax.random.key(1), (5, 3)), 0.1)
    >>> batch = qb.certify_batch(f, fq, boxes, method="crown", progress=False)
    >>> batch.upper.shape, bool((batch.lower <= batch.upper).all())
    ((5,), True)
    >>> qb.BatchCertificate.from_json(batch.to_json())[2].upper == batch[2].upper
    True
  """

  upper: np.ndarray
  lower: np.ndarray
  diff_lower: np.ndarray
  diff_upper: np.ndarray
  witness: np.ndarray
  seconds: np.ndarray
  method: str
  bounds: dict = dataclasses.field(default_factory=dict)
  sound: bool = True
  lower_float32: Optional[np.ndarray] = None
  witness_diff: Optional[np.ndarray] = None
  box_lower: Optional[np.ndarray] = None
  box_upper: Optional[np.ndarray] = None
  compile_seconds: float = 0.0
  total_seconds: float = 0.0
  layout: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Never a NaN upper bound (it compares false with everything); infinite ones warn.
    validate.certificate_values("batch certificate", self.lower, self.upper)

  def __len__(self) -> int:
    return int(self.upper.shape[0])

  def __getitem__(self, i: int) -> Certificate:
    """Box ``i``'s certificate."""
    i = range(len(self))[i]
    opt = lambda a: None if a is None else a[i]
    with warnings.catch_warnings():  # the batch warned for its infinite bounds already
      warnings.simplefilter("ignore", InfiniteBoundWarning)
      return Certificate(lower=float(self.lower[i]), upper=float(self.upper[i]),
                         diff_lower=self.diff_lower[i],
                         diff_upper=self.diff_upper[i], witness=self.witness[i], method=self.method,
                         seconds=float(self.seconds[i]), bounds={self.method: float(self.upper[i])},
                         sound=self.sound,
                         lower_float32=None if self.lower_float32 is None else float(self.lower_float32[i]),
                         witness_diff=opt(self.witness_diff), box_lower=opt(self.box_lower),
                         box_upper=opt(self.box_upper))

  def certificates(self) -> list[Certificate]:
    """Every box's :class:`~qbound.certificate.Certificate`, in order."""
    return [self[i] for i in range(len(self))]

  @property
  def gap(self) -> np.ndarray:
    """``upper / lower`` per box (inf where nothing was reached)."""
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(self.lower > 0, self.upper / np.where(self.lower > 0, self.lower, 1), np.inf)

  def proves(self, epsilon: float) -> np.ndarray:
    """Per box, whether ``|f(x) - fq(x)|_inf <= epsilon`` is proved on the whole box."""
    return self.upper <= epsilon

  def to_dict(self) -> dict[str, Any]:
    """The fields as plain Python values (arrays as nested lists; numbers may be inf or NaN)."""
    return {f.name: serialize.plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

  def to_json(self, **kwargs) -> str:
    """The batch as strict JSON (arrays as nested lists; inf and NaN as the strings ``"Infinity"``,
    ``"-Infinity"``, ``"NaN"``); :meth:`from_json` reads it back. ``kwargs`` go to ``json.dumps``."""
    return serialize.dumps(self.to_dict(), **kwargs)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "BatchCertificate":
    """The batch :meth:`to_dict` wrote (or parsed JSON); ``ValueError`` saying what is wrong otherwise."""
    what = "qbound batch certificate"
    kwargs = serialize.fields_from_dict(cls, data, _BATCH_FIELDS, what)
    # Every per-box array has one row per box, as many as upper has entries.
    if kwargs["upper"].ndim != 1:
      hint = " (one number: a one-box certificate? read it with qbound.Certificate.from_json)"
      raise ValueError(f"not a {what}: upper must be a list of one number per box, got shape "
                       f"{kwargs['upper'].shape}{hint if kwargs['upper'].ndim == 0 else ''}.")
    n = kwargs["upper"].size
    per_box = [(name, kwargs.get(name)) for name in _BATCH_FIELDS if _BATCH_FIELDS[name] == serialize.ARRAY]
    per_box += [(f"bounds[{k!r}]", v) for k, v in kwargs.get("bounds", {}).items()]
    for name, value in per_box:
      if value is not None and (value.ndim < 1 or value.shape[0] != n):
        raise ValueError(f"not a {what}: every array needs one row per box, as upper has; upper has shape "
                         f"{kwargs['upper'].shape} and {name} {value.shape}.")
    check_read(what, kwargs)
    with warnings.catch_warnings():  # it warned when it was made; reading it back is no news
      warnings.simplefilter("ignore", InfiniteBoundWarning)
      return cls(**kwargs)

  @classmethod
  def from_json(cls, text: str) -> "BatchCertificate":
    """The batch :meth:`to_json` wrote; ``ValueError`` saying what is wrong for other text."""
    return cls.from_dict(serialize.loads(text, "qbound batch certificate"))

  def __str__(self) -> str:
    up = np.asarray(self.upper)
    return (f"BatchCertificate({len(self)} boxes, method={self.method}, upper median {np.median(up):.6g} "
            f"[{up.min():.6g}, {up.max():.6g}], {self.total_seconds:.2f} s with "
            f"{self.compile_seconds:.2f} s compiling, {self.layout.get('devices', 1)} device(s))")


# ------------------------------------------------------------------------------- device programs


def _box_bounds(fg, qg, mg, box: Box, method: str, sound: bool, row_chunk, alpha_steps: int):
  """``{name: (lower, upper)}`` of ``f - fq`` at the output, as :func:`qbound.certify` computes them,
  and :func:`qbound.bounds.guards.counts` of every node bound computed on the way (under jit the
  bound functions cannot raise for an empty interval themselves: the host reads the counts)."""
  lists = []

  def diff_out(symbolic=True, steps=0):
    if steps:
      from qbound.bounds.alpha import diff_alpha_bounds

      z, zq, d = diff_alpha_bounds(fg, qg, box, steps=steps, sound=sound, row_chunk=row_chunk)
    else:
      z, zq, d = diff_bounds(fg, qg, box, None, sound, symbolic, row_chunk=row_chunk)
    lists.extend([z, zq, d])
    return d[fg.output]

  if method == "interval":
    bounds = interval_bounds(mg, box, sound)
    lists.append(bounds)
    out = {"interval": bounds[mg.output]}
  elif method == "diff":
    out = {"diff": diff_out()}
  elif method == "diff-interval":
    out = {"diff-interval": diff_out(symbolic=False)}
  else:
    crown = crown_bounds(mg, box, None, sound, row_chunk)
    lists.append(crown)
    out = {"crown": crown[mg.output]}
    if method == "alpha":
      if fg is not None:
        out["diff"] = diff_out()
        out["diff-alpha"] = diff_out(steps=alpha_steps)
      else:
        from qbound.bounds.alpha import crown_alpha_node

        out["crown-alpha"] = crown_alpha_node(mg, mg.output, crown, box, steps=alpha_steps, sound=sound,
                                              row_chunk=row_chunk)
        lists.append([out["crown-alpha"]])
  return out, guards.counts([("", None, bounds) for bounds in lists], sound=sound)


@functools.partial(jax.jit, static_argnames=("method", "sound", "row_chunk", "alpha_steps", "mesh"))
def _bounds_chunk(fg, qg, mg, lo, hi, method, sound, row_chunk, alpha_steps, mesh):
  """Bounds for a chunk of boxes, split over the mesh: ``({name: (lo, hi)}, per-box count of empty or
  NaN node intervals, device of each box)``."""
  def body(fg, qg, mg, lo, hi):
    one = lambda lo, hi: _box_bounds(fg, qg, mg, Box(lo, hi), method, sound, row_chunk, alpha_steps)
    out, bad = jax.vmap(one)(lo, hi)
    return out, jnp.sum(bad, axis=(1, 2)), sharding.device_index(mesh, lo.shape[0])

  return sharding.data_parallel(body, mesh, 3, 2)(fg, qg, mg, lo, hi)


@functools.partial(jax.jit, static_argnames=("search", "impl", "mesh"))
def _search_chunk(mg, lo, hi, keys, search, impl, mesh):
  """The lower-bound search of :mod:`qbound.attack` for a chunk of boxes, split over the mesh."""
  def body(mg, lo, hi, keys):
    def one(lo, hi, k):
      key = k if impl is None else jax.random.wrap_key_data(k, impl=impl)
      return attack._search(mg, Box(lo, hi), key, search)

    return jax.vmap(one)(lo, hi, keys)

  return sharding.data_parallel(body, mesh, 1, 3)(mg, lo, hi, keys)


def _bounds_steps(fg, qg, mg, lo, hi, method, sound, row_chunk, alpha_steps, devices: int):
  """:func:`_bounds_chunk`'s results step by step: the bound functions' own per-node steps, each
  compiled once for the chunk (``jax.vmap`` outside ``jax.jit``), on arrays split over the mesh as
  they are (each step runs where its data is)."""
  one = lambda lo, hi: _box_bounds(fg, qg, mg, Box(lo, hi), method, sound, row_chunk, alpha_steps)
  out, bad = jax.vmap(one)(lo, hi)
  rows = lo.shape[0]
  return out, jnp.sum(bad, axis=(1, 2)), np.arange(rows) * devices // rows


def _raise_invalid(merged: MergedNetwork, boxes: Box, i: int, method: str, sound: bool, row_chunk,
                   alpha_steps: int):
  """Box ``i``'s bounds held an empty or NaN interval: bound it again on its own, where the bound
  functions raise with the node named; or raise here if that run comes out well-formed."""
  paired = method in ("diff", "diff-interval", "alpha") and merged.paired
  fg, qg = (merged.f_graph, merged.fq_graph) if paired else (None, None)
  box = Box(jnp.asarray(boxes.lower[i]), jnp.asarray(boxes.upper[i]))
  try:
    _box_bounds(fg, qg, merged.graph, box, method, sound, row_chunk, alpha_steps)
  except (InvalidBoundsError, BoundOverflowError) as err:
    raise type(err)(f"box {i}: {err}") from None
  raise InvalidBoundsError(f"box {i}: the batched {method} bounds held an empty or NaN interval (bound alone, "
                           "the box's bounds are well-formed): a bug in qbound; please report it with this box.")


def _key_data(key, n: int):
  """``jax.random.split(key, n)`` as host arrays, and the key implementation's name (None: raw keys)."""
  keys = jax.random.split(key, n)
  if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(keys)), str(jax.random.key_impl(key))
  return np.asarray(keys), None


def _float32_errors(f, fq, merged: MergedNetwork, xs, outputs=None):
  """Compiled ``max_j |f_j(x) - fq_j(x)|`` per witness for witnesses shaped like ``xs``, as the user's
  functions compute it (as certify does), and the magnitude of their outputs (0 for a merged network)."""
  def error(d):
    d = jnp.ravel(d)
    return jnp.max(jnp.abs(d if outputs is None else d[np.asarray(outputs)]))

  if f is merged:
    fn = lambda x: (error(merged.graph(x)), jnp.zeros((), jnp.float32))
  else:
    def fn(x):
      y, yq = f(x), fq(x)
      return error(y - yq), jnp.maximum(jnp.max(jnp.abs(y)), jnp.max(jnp.abs(yq)))
  return jax.jit(jax.vmap(fn)).lower(jax.ShapeDtypeStruct(xs.shape, xs.dtype)).compile()


# ---------------------------------------------------------------------------------------- the call


def certify_batch(f: Callable, fq: Optional[Callable], boxes: Box, *, method: str = "diff", key=None,
                  sound: bool = True, search: Optional[attack.Search] = None,
                  outputs: Optional[Sequence[int]] = None, alpha_steps: int = 20, mesh=None,
                  devices: Optional[Sequence] = None, memory_budget: Optional[float] = None,
                  progress: bool = True) -> BatchCertificate:
  """Certifies the maximal error ``max_{x in box} |f(x) - fq(x)|_inf`` for every box of a batch.

  Args:
    f: the original network, a pure JAX function of one unbatched input; or a
      :class:`~qbound.merge.MergedNetwork` with ``fq=None``.
    fq: the compressed network.
    boxes: a :class:`~qbound.box.Box` whose arrays have a leading batch axis (``(n, *input_shape)``),
      e.g. ``qb.linf_ball(centres, radius)`` with a batch of centres.
    method: ``"interval"``, ``"crown"``, ``"diff"`` (the default; f and fq of the same layer
      structure), ``"diff-interval"`` or ``"alpha"`` (optimised slopes; with the ``crown`` and
      ``diff`` bounds it intersects with). ``auto``, ``bab`` and ``milp`` adapt to each box as
      they go and are not batched: loop over :func:`qbound.certify` for those.
    key: a ``jax.random`` key; box ``i``'s search uses ``jax.random.split(key, n)[i]``.
    sound: proven floating-point margins (the default).
    search: settings of the lower-bound search (:class:`qbound.attack.Search`).
    outputs: flat output indices whose error counts (default: all).
    alpha_steps: Adam steps for ``alpha``.
    mesh: a one-axis :class:`jax.sharding.Mesh` (axis :data:`qbound.sharding.AXIS`) to split the
      boxes over; or ``devices``, a list of devices; default: all of ``jax.devices()`` (every
      host's, after ``jax.distributed.initialize()``). The networks are replicated.
    devices: see ``mesh``.
    memory_budget: bytes per device (:func:`qbound.memory.plan` picks the boxes per chunk and,
      if one box does not fit, the backward rows per block); on CPU it includes what the process
      holds already (:func:`qbound.memory.buffer_budget`); None: half the device's memory
      (:func:`qbound.memory.default_budget`); ``math.inf``: no chunking by memory.
    progress: show a tqdm progress bar (on stderr).

  Returns:
    A :class:`BatchCertificate`; ``result[i]`` is box ``i``'s :class:`~qbound.certificate.Certificate`.

  Raises:
    TypeError: an argument of the wrong kind (``sound="no"``, ``key="abc"``, ``alpha_steps=2.5``).
    ValueError: an unknown or unbatched method, invalid boxes (no batch axis, inverted, NaN,
      wrong shape), f and fq not paired for ``diff``, or a memory budget too small for one row.
    SoundnessError: a reached error above a proven bound (a bug; never expected).

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(5))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
    >>> centres = jax.random.uniform(jax.random.key(1), (8, 5))
    >>> batch = qb.certify_batch(f, fq, qb.linf_ball(centres, 0.05), method="diff", progress=False)
    >>> len(batch), bool(((0 < batch.lower) & (batch.lower <= batch.upper)).all())
    (8, True)
  """
  start = time.perf_counter()
  if method not in BATCH_METHODS:
    from qbound.certify import METHODS

    if method in METHODS:
      raise ValueError(f"method {method!r} is not batched: it adapts to each box as it goes. certify_batch takes "
                       f"{', '.join(BATCH_METHODS)}; for {method!r} call qbound.certify once per box.")
    raise ValueError(f"unknown method {method!r}; certify_batch takes one of {', '.join(BATCH_METHODS)}.")
  _map_limit.release_if_near_limit()  # (before this call compiles anything)
  # Every other argument is checked before tracing or compiling anything (qbound.validate).
  check_networks(f, fq)
  validate.mesh_or_devices(mesh, devices)
  key = validate.prng_key("key", key)
  sound = validate.boolean("sound", sound)
  search = attack.check_search(search)
  outputs = validate.output_indices("outputs", outputs)
  alpha_steps = validate.integer("alpha_steps", alpha_steps, minimum=0)
  if memory_budget is not None:
    memory_budget = validate.positive("memory_budget", memory_budget, allow_inf=True,
                                      accepted="a positive number of bytes (None: half the device's memory; "
                                               "math.inf: no chunking by memory)")
  progress = validate.boolean("progress", progress)
  boxes = validate_boxes(boxes)
  n = int(boxes.lower.shape[0])
  key = jax.random.key(0) if key is None else key
  search = search or attack.Search()
  if isinstance(f, MergedNetwork):
    if fq is not None:
      raise ValueError("pass either a MergedNetwork with fq=None, or two functions f and fq.")
    merged = f
  else:
    one = jax.ShapeDtypeStruct(boxes.shape[1:], boxes.lower.dtype)
    try:
      jax.eval_shape(f, one)
    except Exception as err:
      raise ValueError(f"boxes have shape {boxes.shape}, read as {n} boxes of shape {boxes.shape[1:]} (the leading "
                       f"axis is the batch), but f does not take an input of shape {boxes.shape[1:]} "
                       f"({type(err).__name__}: {err}). Give one box per row, shape (n, *input_shape); for a "
                       "single box use qbound.certify, or Box(lower[None], upper[None]).") from None
    merged = merge(f, fq, box_at(boxes, 0))
  if tuple(merged.graph.input_shape) != tuple(boxes.shape[1:]):
    raise ValueError(f"boxes have shape {boxes.shape} but the network's input has shape "
                     f"{merged.graph.input_shape}: give one box per row, shape (n, "
                     f"{', '.join(map(str, merged.graph.input_shape))}).")
  n_out = int(np.prod(merged.output_shape))
  if outputs is not None:
    outputs = np.asarray(outputs, dtype=np.int64).reshape(-1)
    if outputs.size == 0 or outputs.min() < 0 or outputs.max() >= n_out:
      raise ValueError(f"outputs must be flat indices in [0, {n_out}), got {outputs.tolist()}.")
  if method in ("diff", "diff-interval"):
    require_paired(merged)
  paired = merged.paired and method in ("diff", "diff-interval", "alpha")

  mesh = sharding.resolve_mesh(mesh, devices)
  n_dev = sharding.size(mesh)
  budget = memory.default_budget() if memory_budget is None else memory_budget
  if not budget > 0:
    raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  buffers = memory.buffer_budget(budget, local)
  if buffers <= 0:
    raise ValueError(f"memory_budget of {budget / 2**20:.1f} MiB per device is too small: on CPU it includes this "
                     f"process, which already holds {memory.process_bytes() / 2**20:.1f} MiB (plus "
                     f"{memory.CPU_ALLOWANCE / 2**20:.0f} MiB for compiled code) shared by {len(local)} "
                     "device(s); see qbound.memory.buffer_budget.")
  plan = memory.plan(merged, method, budget=buffers, boxes=n, devices=n_dev, search=search)
  key_data, impl = _key_data(key, n)
  lo_all = np.asarray(boxes.lower)
  hi_all = np.asarray(boxes.upper)

  fg, qg = (merged.f_graph, merged.fq_graph) if paired else (None, None)
  fg, qg, mg = sharding.put_replicated((fg, qg, merged.graph), mesh)

  def chunk_inputs(first: int, chunk: int):
    idx = np.minimum(np.arange(first, first + chunk), n - 1)  # the last chunk repeats its last box
    return sharding.put_batch((lo_all[idx], hi_all[idx], key_data[idx]), mesh)

  # Compile once per chunk shape (cached by jax across calls), timed on its own. If XLA's own
  # count of the buffers exceeds the budget after all, halve the chunk (or the row block).
  # Deep graphs: the bounds step by step (STEP_NODES), compiled as the first chunk runs them.
  steps = len(merged.graph.nodes) >= STEP_NODES
  t0 = time.perf_counter()
  while True:
    chunk, row_chunk = plan.box_chunk * n_dev, plan.row_chunk
    lo, hi, kd = chunk_inputs(0, chunk)
    if steps:
      run_bounds = functools.partial(_bounds_steps, method=method, sound=sound, row_chunk=row_chunk,
                                     alpha_steps=alpha_steps, devices=n_dev)
    else:
      run_bounds = _bounds_chunk.lower(fg, qg, mg, lo, hi, method=method, sound=sound, row_chunk=row_chunk,
                                       alpha_steps=alpha_steps, mesh=mesh).compile()
    run_search = _search_chunk.lower(mg, lo, hi, kd, search=search, impl=impl, mesh=mesh).compile()
    used = [memory.compiled_bytes(run) for run in ((run_search,) if steps else (run_bounds, run_search))]
    used = [b for b in used if b is not None]
    xla_bytes = max(used) if used else None
    if xla_bytes is None or xla_bytes <= buffers:
      break
    smaller = memory.shrink(plan, memory.max_rows(merged, method))
    if smaller is None:
      warnings.warn(f"certify_batch: XLA needs {xla_bytes / 2**20:.1f} MiB per device for one box and one row "
                    f"at a time, above the {buffers / 2**20:.1f} MiB left of memory_budget={budget / 2**20:.1f} "
                    "MiB; running anyway.")
      break
    plan = smaller
  # The witnesses' float32 and float64 (host CPU) evaluations, compiled for n witnesses now too.
  float32_errors = _float32_errors(f, fq, merged, lo_all, outputs)
  attack.exact_errors(merged.graph, lo_all)
  compile_seconds = time.perf_counter() - t0
  shards = sharding.layout(lo)

  per_method: dict[str, list] = {}
  phases = {"bounds": 0.0, "search": 0.0}
  witnesses, device_of_box, seconds = [], [], np.zeros(n)
  show = progress and jax.process_index() == 0
  with tqdm(total=n, desc=f"certify_batch ({method})", unit="box", disable=not show, leave=False) as bar:
    for first in range(0, n, chunk):
      t1 = time.perf_counter()
      if first:
        lo, hi, kd = chunk_inputs(first, chunk)
      out, bad, where = jax.block_until_ready(run_bounds(fg, qg, mg, lo, hi))
      t_bounds = time.perf_counter()
      _, x = jax.block_until_ready(run_search(mg, lo, hi, kd))
      phases["bounds"] += t_bounds - t1
      phases["search"] += time.perf_counter() - t_bounds
      out, bad, where, x = sharding.gather((out, bad, where, x))
      real = min(chunk, n - first)
      if np.any(np.asarray(bad)[:real]):
        _raise_invalid(merged, Box(lo_all, hi_all), first + int(np.flatnonzero(np.asarray(bad)[:real])[0]), method,
                       sound, row_chunk, alpha_steps)
      for name, (dl, du) in out.items():
        per_method.setdefault(name, []).append((dl[:real].reshape(real, -1), du[:real].reshape(real, -1)))
      witnesses.append(x[:real])
      device_of_box.append(where[:real])
      seconds[first:first + real] = (time.perf_counter() - t1) / real
      bar.update(real)

  t2 = time.perf_counter()
  witness = np.concatenate(witnesses).astype(lo_all.dtype)
  diff_lower = np.full((n, n_out), -np.inf)
  diff_upper = np.full((n, n_out), np.inf)
  bounds = {}
  for name, parts in per_method.items():
    dl = np.concatenate([p[0] for p in parts]).astype(np.float64)
    du = np.concatenate([p[1] for p in parts]).astype(np.float64)
    bounds[name] = np.array([max_abs(dl[i], du[i], outputs) for i in range(n)])
    diff_lower, diff_upper = np.maximum(diff_lower, dl), np.minimum(diff_upper, du)
  upper = np.array([max_abs(diff_lower[i], diff_upper[i], outputs) for i in range(n)])
  bounds[method] = upper  # alpha: the intersection of what it computed
  witness_diff = attack.exact_errors(merged.graph, witness).reshape(n, -1)
  sel = witness_diff if outputs is None else witness_diff[:, outputs]
  lower = np.max(np.abs(sel), axis=1) + 0.0
  lower_float32, scale_float32 = (np.asarray(v, np.float64) for v in float32_errors(witness))
  bad = np.flatnonzero(lower > upper)
  if not bad.size:
    validate.float_ties("batch certificate", lower_float32, upper, witness, scale_float32)
  if bad.size:
    i = int(bad[0])
    hint = "" if sound else " (sound=False skips the floating-point margins; use sound=True)"
    raise SoundnessError(f"box {i}: reached error {lower[i]!r} at {witness[i].tolist()} exceeds the proven bound "
                         f"{upper[i]!r} ({method}){hint}; {bad.size} box(es) affected; please report this input.")
  phases["witnesses"] = time.perf_counter() - t2
  seconds += phases["witnesses"] / n
  layout = {"devices": n_dev, "chunk": chunk, "row_chunk": row_chunk,
            "memory_budget": None if math.isinf(budget) else int(budget),
            "buffer_budget": None if math.isinf(plan.budget) else int(plan.budget),
            "memory_estimate": plan.estimate, "xla_bytes": xla_bytes, "bounds": "steps" if steps else "program",
            "device_of_box": np.concatenate(device_of_box).astype(int).tolist(),
            "shards": {str(k): v for k, v in shards.items()},
            "seconds": {k: round(v, 6) for k, v in phases.items()}}
  return BatchCertificate(upper=upper, lower=lower, diff_lower=diff_lower, diff_upper=diff_upper, witness=witness,
                          seconds=seconds, method=method, bounds=bounds, sound=sound, lower_float32=lower_float32,
                          witness_diff=witness_diff, box_lower=lo_all, box_upper=hi_all,
                          compile_seconds=compile_seconds, total_seconds=time.perf_counter() - start,
                          layout=layout)
