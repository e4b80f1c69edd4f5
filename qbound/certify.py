"""certify(): the maximal error of a compressed network, as a proven interval.

``certify(f, fq, box)`` returns a :class:`Certificate` with

* ``upper``: proven, ``max_{x in box} max_j |f_j(x) - fq_j(x)| <= upper``;
* ``lower``: reached, the error at ``witness`` (so the true maximum lies in ``[lower, upper]``);
* ``diff_lower``, ``diff_upper``: proven per-output bounds on ``f_j(x) - fq_j(x)``.

What "proven" means: in the default sound mode, the bounds hold for the real-arithmetic functions
f and f_q (their weights being exactly the given float values), despite the bounds themselves
being computed in float32 (see :mod:`qbound.bounds.fp`). ``lower`` is the error at the witness
evaluated in float64 (the real-arithmetic value to about 1e-16 relative); ``lower_float32`` is the
same error as f and fq compute it in their own dtype, which differs from it by rounding.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qbound import attack
from qbound.bounds.crown import crown_bounds
from qbound.bounds.diff import diff_bounds, require_paired
from qbound.bounds.interval import interval_bounds
from qbound.box import Box, validate_box
from qbound.merge import MergedNetwork, merge

METHODS = ("auto", "interval", "crown", "diff", "diff-interval")


class SoundnessError(AssertionError):
  """A reached error exceeds a proven upper bound: a bug in qbound; please report it."""


@dataclasses.dataclass(frozen=True)
class Certificate:
  """A proven interval ``[lower, upper]`` for the maximal error ``max_x |f(x) - fq(x)|_inf``.

  Attributes:
    lower: an error actually reached, at ``witness`` (float64 evaluation).
    upper: a proven upper bound on the maximal error over the box.
    diff_lower: per-output proven lower bounds on ``f_j(x) - fq_j(x)``.
    diff_upper: per-output proven upper bounds on ``f_j(x) - fq_j(x)``.
    witness: the input reaching ``lower``.
    method: the method that proved ``upper``.
    seconds: wall-clock time of the whole certification.
    bounds: the upper bound each method tried gave (name -> value).
    sound: whether floating-point margins were applied (see :mod:`qbound.bounds.fp`).
    lower_float32: the error at ``witness`` as f and fq compute it in their own dtype.
    witness_diff: ``f(witness) - fq(witness)`` per output (float64 evaluation).
    box_lower, box_upper: the box certified over.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(3))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=4))
    >>> cert = qb.certify(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
    >>> cert.lower <= cert.upper
    True
    >>> qb.Certificate.from_json(cert.to_json()).upper == cert.upper
    True
  """

  lower: float
  upper: float
  diff_lower: np.ndarray
  diff_upper: np.ndarray
  witness: np.ndarray
  method: str
  seconds: float
  bounds: dict = dataclasses.field(default_factory=dict)
  sound: bool = True
  lower_float32: Optional[float] = None
  witness_diff: Optional[np.ndarray] = None
  box_lower: Optional[np.ndarray] = None
  box_upper: Optional[np.ndarray] = None

  @property
  def gap(self) -> float:
    """``upper / lower`` (inf when nothing was reached): 1 means the maximal error is known exactly."""
    return float("inf") if self.lower <= 0 else self.upper / self.lower

  def proves(self, epsilon: float) -> bool:
    """Whether the certificate proves ``|f(x) - fq(x)|_inf <= epsilon`` on the whole box."""
    return self.upper <= epsilon

  def to_dict(self) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      out[field.name] = np.asarray(value).tolist() if isinstance(value, (np.ndarray, jax.Array)) else value
    return out

  def to_json(self, **kwargs) -> str:
    """The certificate as JSON (arrays as nested lists)."""
    return json.dumps(self.to_dict(), **kwargs)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "Certificate":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
      raise ValueError(f"not a qbound certificate: unknown fields {sorted(unknown)}")
    arrays = {"diff_lower", "diff_upper", "witness", "witness_diff", "box_lower", "box_upper"}
    kwargs = {k: (np.asarray(v, np.float64) if k in arrays and v is not None else v) for k, v in data.items()}
    return cls(**kwargs)

  @classmethod
  def from_json(cls, text: str) -> "Certificate":
    return cls.from_dict(json.loads(text))

  def __str__(self) -> str:
    return (f"Certificate(max error in [{self.lower:.6g}, {self.upper:.6g}], gap {self.gap:.3g}, "
            f"method={self.method}, {self.seconds:.2f} s)")


def _max_abs(lower, upper) -> float:
  lower = np.asarray(lower, np.float64)
  upper = np.asarray(upper, np.float64)
  return float(max(np.max(-lower), np.max(upper), 0.0))


def _diff_output(merged: MergedNetwork, box, sound: bool, symbolic: bool):
  _, _, d = diff_bounds(merged.f_graph, merged.fq_graph, merged.graph, merged.fq_offset, box, None, sound, symbolic)
  return d[merged.f_graph.output]


def _bounds_by_method(method: str, merged: MergedNetwork, box, sound: bool):
  graph = merged.graph
  if method == "interval":
    return {"interval": interval_bounds(graph, box, sound)[graph.output]}
  if method == "crown":
    return {"crown": crown_bounds(graph, box, None, sound)[graph.output]}
  if method in ("diff", "diff-interval"):
    require_paired(merged)
    return {method: _diff_output(merged, box, sound, method == "diff")}
  if method == "auto":
    found = {"interval": interval_bounds(graph, box, sound)[graph.output],
             "crown": crown_bounds(graph, box, None, sound)[graph.output]}
    if merged.paired:
      found["diff"] = _diff_output(merged, box, sound, True)
    return found
  raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")


def certify(f: Callable, fq: Callable, box: Box, *, method: str = "auto", key=None, sound: bool = True,
            search: Optional[attack.Search] = None) -> Certificate:
  """Certifies the maximal error ``max_{x in box} |f(x) - fq(x)|_inf`` as a proven interval.

  Args:
    f: the original network, a pure JAX function of one unbatched input (e.g.
      ``functools.partial(model.apply, params)``).
    fq: the compressed network, with the same input and output shapes.
    box: the input set (a :class:`~qbound.box.Box`).
    method: ``"interval"`` (IBP), ``"crown"`` (backward linear relaxation), or ``"auto"``
      (every method, keeping the tightest per output).
    key: a ``jax.random`` key for the lower-bound search; ``jax.random.key(0)`` when omitted.
    sound: widen the bounds by proven floating-point margins (the default).
    search: settings of the lower-bound search (:class:`qbound.attack.Search`).

  Returns:
    A :class:`Certificate` with ``lower <= max error <= upper``.

  Raises:
    ValueError: an invalid box (inverted, NaN, wrong shape), f and fq with different output
      shapes, non-finite parameters, or an operation qbound cannot bound.

  Example:
    >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, qbound as qb
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(3)])
    >>> params = model.init(jax.random.key(0), jnp.zeros(5))
    >>> f = functools.partial(model.apply, params)
    >>> fq = functools.partial(model.apply, qb.quantize.uniform(params, bits=8))
    >>> cert = qb.certify(f, fq, qb.Box(lower=-jnp.ones(5), upper=jnp.ones(5)))
    >>> 0 < cert.lower <= cert.upper
    True
  """
  start = time.perf_counter()
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
  box = validate_box(box)
  merged = f if isinstance(f, MergedNetwork) and fq is None else merge(f, fq, box)
  graph = merged.graph

  found = _bounds_by_method(method, merged, box, sound)
  diff_lower = np.max(np.stack([np.asarray(b[0], np.float64) for b in found.values()]), axis=0)
  diff_upper = np.min(np.stack([np.asarray(b[1], np.float64) for b in found.values()]), axis=0)
  per_method = {name: _max_abs(*b) for name, b in found.items()}
  upper = _max_abs(diff_lower, diff_upper)
  best_method = min(per_method, key=per_method.get)

  value32, witness = attack.maximize_error(graph, box, key=key, search=search)
  witness_diff = attack.exact_error(graph, witness)
  lower = float(np.max(np.abs(witness_diff)))
  lower_float32 = value32
  if not isinstance(f, MergedNetwork):
    lower_float32 = float(jnp.max(jnp.abs(f(jnp.asarray(witness)) - fq(jnp.asarray(witness)))))

  if sound and lower > upper:
    raise SoundnessError(f"reached error {lower!r} at {witness.tolist()} exceeds the proven bound {upper!r} "
                         f"({per_method}); this is a bug in qbound, please report it with this input.")
  return Certificate(lower=lower, upper=upper, diff_lower=diff_lower, diff_upper=diff_upper, witness=witness,
                     method=best_method, seconds=time.perf_counter() - start, bounds=per_method, sound=sound,
                     lower_float32=lower_float32, witness_diff=witness_diff,
                     box_lower=np.asarray(box.lower), box_upper=np.asarray(box.upper))
