"""``verify``: a proven answer to a property of two networks on a box, with a witness when it fails."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from qbound import validate
from qbound.box import Box, validate_box
from qbound.certify import Certificate, certify
from qbound.merge import check_networks, merge
from qbound.props import engine
from qbound.props.spec import DeltaTop1, MaxError, RelativeError, Top1, Unsafe

PROPERTIES = (Top1, DeltaTop1, MaxError, RelativeError, Unsafe)

# VNN-COMP's words for the three answers: "unsat" means no input reaches the unsafe set.
VNNCOMP_WORDS = {"proved": "unsat", "counterexample": "sat", "unknown": "unknown"}


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The answer to one property on one box.

  Attributes:
    status: ``"proved"`` (no input of the box violates the property: a proof by bound
      propagation), ``"counterexample"`` (``counterexample`` violates it, checked by evaluating
      both networks in float32 and in float64) or ``"unknown"`` (time ran out).
    property: what was decided, in words.
    counterexample: the input that violates the property, or None.
    f_output, fq_output: both networks' outputs at the counterexample (float64), or None.
    pieces_bounded: pieces of the box bounded (0 when a search or one certificate decided).
    pieces_left: pieces still open when it stopped.
    closed_fraction: share of the box's volume proven safe (1.0 when proved).
    stopped: why it stopped (``"proved"``, ``"counterexample"``, ``"time"``, ``"max_pieces"``,
      ``"unsplittable"``).
    seconds: wall-clock time of the call.
    certificate: for :class:`~qbound.props.MaxError`, the certificate of the maximal error.
  """

  status: str
  property: str
  counterexample: Optional[np.ndarray] = None
  f_output: Optional[np.ndarray] = None
  fq_output: Optional[np.ndarray] = None
  pieces_bounded: int = 0
  pieces_left: int = 0
  closed_fraction: float = 0.0
  stopped: str = ""
  seconds: float = 0.0
  certificate: Optional[Certificate] = None

  @property
  def vnncomp(self) -> str:
    """The answer in VNN-COMP's words: ``unsat`` (proved), ``sat`` (counterexample) or ``unknown``."""
    return VNNCOMP_WORDS[self.status]

  @property
  def decided(self) -> bool:
    return self.status != "unknown"

  def to_dict(self) -> dict[str, Any]:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "certificate"}
    for name in ("counterexample", "f_output", "fq_output"):
      if out[name] is not None:
        out[name] = np.asarray(out[name], np.float64).tolist()
    out["answer"] = self.vnncomp
    out["certificate"] = None if self.certificate is None else self.certificate.to_dict()
    return out

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

  def __str__(self) -> str:
    text = f"{self.vnncomp}: {self.property} {self.status} in {self.seconds:.2f} s"
    if self.status == "counterexample":
      text += f" (x = {np.asarray(self.counterexample).reshape(-1)[:6].tolist()}...)"
    elif self.status == "unknown":
      text += f" ({self.closed_fraction:.1%} of the box proven, {self.pieces_left} pieces open, stopped: {self.stopped})"
    return text


def _check_property(prop) -> None:
  if not isinstance(prop, PROPERTIES):
    raise TypeError(f"prop must be one of qb.props.Top1(), DeltaTop1(delta), MaxError(epsilon), "
                    f"RelativeError(rel, floor) or Unsafe(...), "
                    f"got {prop!r}.")


def verify(f: Callable, fq: Callable, box: Box, prop, *, time_budget: float = 10.0, key=None, sound: bool = True,
           batch_size: Optional[int] = None, progress: Optional[bool] = None) -> Verdict:
  """Decides a property of the pair ``(f, f_q)`` on ``box``: proved, a counterexample, or unknown.

  Top-1, delta-top-1, relative-error, weighted max-error and polytope properties
  (:mod:`qbound.props.spec`) are decided by input splitting with bounds on the rows of the
  property's polytopes (differential bounds for networks with the same layers;
  :mod:`qbound.props.engine`) and a gradient search for counterexamples;
  :class:`~qbound.props.MaxError` without weights by :func:`qbound.certify` with its ``epsilon``.

  Args:
    f, fq: the two networks, pure JAX functions of one unbatched input with the same output shape
      (logits for the top-1 properties).
    box: the input set.
    prop: a property (``qb.props.Top1()``, ``DeltaTop1(0.9)``, ``MaxError(0.05)``,
      ``RelativeError(0.01, floor=1e-3)``, ``Unsafe(...)``).
    time_budget: seconds before it answers ``unknown`` (compilation included; a batch of pieces
      started before the deadline is finished, so a first call on a new network, whose first batch
      compiles its steps, can take seconds past a short budget: 5.6 s for 1 s on a small CNN).
    key: a ``jax.random`` key for the counterexample search; ``jax.random.key(0)`` when omitted.
    sound: proven floating-point margins in every bound (the default).
    batch_size: pieces bounded at once (None: 64 for inputs of at most 64 entries, else 32).
    progress: a progress bar on stderr (``None``: only on a terminal).

  Returns:
    A :class:`Verdict`.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(2))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
    >>> box = qb.linf_ball(jnp.array([0.5, -0.3]), 0.01)
    >>> qb.props.verify(f, fq, box, qb.props.Top1()).status in ("proved", "counterexample")
    True
  """
  start = time.perf_counter()
  _check_property(prop)
  check_networks(f, fq)
  key = validate.prng_key("key", key)
  if key is None:
    key = jax.random.key(0)
  sound = validate.boolean("sound", sound)
  progress = validate.optional_boolean("progress", progress)
  time_budget = validate.seconds("time_budget", time_budget)
  if batch_size is not None:
    batch_size = validate.integer("batch_size", batch_size, minimum=1)
  box = validate_box(box)
  raw = merge(f, fq, box)
  if raw.f_graph.output_shape != raw.fq_graph.output_shape:
    raise ValueError(f"f returns shape {raw.f_graph.output_shape} but f_q {raw.fq_graph.output_shape}.")
  n_out = int(np.prod(raw.output_shape))
  prop.polytopes(n_out)  # refuses a property that does not fit the outputs, before any compiling
  if isinstance(prop, MaxError) and prop.weights is None:
    return _max_error(prop, raw, box, start, time_budget, key, sound, progress)
  if batch_size is None:
    batch_size = 64 if int(np.prod(box.shape)) <= 64 else 32
  left = max(time_budget - (time.perf_counter() - start), 0.0)
  out = engine.decide(prop, f, fq, box, time_budget=left, key=key, sound=sound, batch_size=batch_size,
                      progress=progress, raw=raw)
  return _verdict(prop, raw, out.status, out.counterexample, start, pieces_bounded=out.pieces_bounded,
                  pieces_left=out.pieces_left, closed_fraction=out.closed_fraction, stopped=out.stopped)


def _verdict(prop, raw, status, x, start, **fields) -> Verdict:
  yf = yq = None
  if x is not None:
    from qbound.attack import exact_errors

    yf = exact_errors(raw.f_graph, np.asarray(x)[None])[0]
    yq = exact_errors(raw.fq_graph, np.asarray(x)[None])[0]
  return Verdict(status=status, property=prop.describe(), counterexample=x, f_output=yf, fq_output=yq,
                 seconds=time.perf_counter() - start, **fields)


def _max_error(prop: MaxError, raw, box, start, time_budget, key, sound, progress) -> Verdict:
  left = max(time_budget - (time.perf_counter() - start), 1e-3)
  cert = certify(raw, None, box, key=key, sound=sound, time_budget=left, epsilon=prop.epsilon,
                 outputs=None if prop.outputs is None else list(prop.outputs), progress=progress)
  status, x = "unknown", None
  if cert.upper <= prop.epsilon:
    status = "proved"
  elif cert.lower > prop.epsilon:
    x = engine.confirm(prop, raw, np.asarray(cert.witness, np.float32)[None])
    status = "counterexample" if x is not None else "unknown"
  verdict = _verdict(prop, raw, status, x, start, stopped=status if status != "unknown" else "time",
                     closed_fraction=1.0 if status == "proved" else 0.0)
  return dataclasses.replace(verdict, certificate=cert)
