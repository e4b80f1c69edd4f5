"""The certificate: a proven interval ``[lower, upper]`` for the maximal error, and how it is read back.

:func:`qbound.certify` makes it (and :class:`qbound.batch.BatchCertificate` holds one per box); it is a
plain frozen dataclass that writes and reads strict JSON (:mod:`qbound.serialize`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import numpy as np

from qbound import serialize, validate
from qbound.errors import InfiniteBoundWarning


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

  def __post_init__(self):
    # Never a NaN upper bound (it compares false with everything); an infinite one warns.
    validate.certificate_values("certificate", self.lower, self.upper)

  @property
  def gap(self) -> float:
    """``upper / lower`` (inf when nothing was reached): 1 means the maximal error is known exactly."""
    return float("inf") if self.lower <= 0 else self.upper / self.lower

  def proves(self, epsilon: float) -> bool:
    """Whether the certificate proves ``|f(x) - fq(x)|_inf <= epsilon`` on the whole box."""
    return self.upper <= epsilon

  def to_dict(self) -> dict[str, Any]:
    """The fields as plain Python values (arrays as nested lists; numbers may be inf or NaN)."""
    return {field.name: serialize.plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

  def to_json(self, **kwargs) -> str:
    """The certificate as strict JSON (arrays as nested lists; inf and NaN as the strings
    ``"Infinity"``, ``"-Infinity"``, ``"NaN"``); ``kwargs`` go to ``json.dumps``."""
    return serialize.dumps(self.to_dict(), **kwargs)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "Certificate":
    """The certificate :meth:`to_dict` wrote (or parsed JSON); ``ValueError`` saying what is wrong otherwise."""
    kwargs = serialize.fields_from_dict(cls, data, _CERTIFICATE_FIELDS, "qbound certificate")
    check_read("qbound certificate", kwargs)
    with warnings.catch_warnings():  # it warned when it was made; reading it back is no news
      warnings.simplefilter("ignore", InfiniteBoundWarning)
      return cls(**kwargs)

  @classmethod
  def from_json(cls, text: str) -> "Certificate":
    """The certificate :meth:`to_json` wrote; ``ValueError`` saying what is wrong for other text."""
    return cls.from_dict(serialize.loads(text, "qbound certificate"))

  def __str__(self) -> str:
    return (f"Certificate(max error in [{self.lower:.6g}, {self.upper:.6g}], gap {self.gap:.3g}, "
            f"method={self.method}, {self.seconds:.2f} s)")


# What each field of a Certificate holds, for reading it back (qbound.serialize).
_CERTIFICATE_FIELDS = {
    "lower": serialize.FLOAT, "upper": serialize.FLOAT, "diff_lower": serialize.ARRAY, "diff_upper": serialize.ARRAY,
    "witness": serialize.ARRAY, "method": serialize.STRING, "seconds": serialize.FLOAT, "bounds": serialize.FLOATS,
    "sound": serialize.BOOL, "lower_float32": serialize.FLOAT, "witness_diff": serialize.ARRAY,
    "box_lower": serialize.ARRAY, "box_upper": serialize.ARRAY,
}


def check_read(what: str, fields: dict[str, Any]) -> None:
  """Raises ``ValueError`` where certificate fields read back from a file contradict each other as no
  certificate qbound makes can: a NaN bound, a reached error above the proven bound (certify raises
  a SoundnessError instead of returning that), bounds on ``f - f_q`` with lower above upper, a
  witness shaped otherwise than the box or outside it. One box or a batch (a leading axis) alike."""
  def arrays(*names):
    return [None if fields.get(n) is None else np.asarray(fields[n], np.float64) for n in names]

  lower, upper = arrays("lower", "upper")
  for name, value in (("upper", upper), ("lower", lower)):
    if value is not None and np.isnan(value).any():
      raise ValueError(f"not a valid {what}: {name} is NaN (qbound never writes a NaN bound or reached error).")
  if lower is not None and upper is not None and np.any(lower > upper):
    raise ValueError(f"not a valid {what}: the reached error (lower, {np.max(lower)}) is above the proven upper "
                     f"bound ({np.min(upper)}): qbound raises a SoundnessError rather than write that.")
  diff_lower, diff_upper = arrays("diff_lower", "diff_upper")
  if diff_lower is not None and diff_upper is not None:
    if diff_lower.shape != diff_upper.shape:
      raise ValueError(f"not a valid {what}: diff_lower has shape {diff_lower.shape} and diff_upper {diff_upper.shape}.")
    if np.any(diff_lower > diff_upper):
      raise ValueError(f"not a valid {what}: diff_lower is above diff_upper for some output.")
  witness, box_lower, box_upper = arrays("witness", "box_lower", "box_upper")
  if box_lower is not None and box_upper is not None:
    if box_lower.shape != box_upper.shape or np.any(box_lower > box_upper):
      raise ValueError(f"not a valid {what}: box_lower and box_upper are not the corners of a box (shapes "
                       f"{box_lower.shape} and {box_upper.shape}, or lower above upper).")
    if witness is not None:
      if witness.shape != box_lower.shape:
        raise ValueError(f"not a valid {what}: the witness has shape {witness.shape}, the box {box_lower.shape}.")
      if np.any(witness < box_lower) or np.any(witness > box_upper):
        raise ValueError(f"not a valid {what}: the witness lies outside the box.")


def max_abs(lower, upper, outputs=None) -> float:
  """``max_j max(-lower_j, upper_j, 0)``: the largest ``|f_j - fq_j|`` the per-output bounds allow."""
  lower = np.asarray(lower, np.float64).reshape(-1)
  upper = np.asarray(upper, np.float64).reshape(-1)
  if outputs is not None:
    lower, upper = lower[outputs], upper[outputs]
  return float(max(np.max(-lower), np.max(upper), 0.0)) + 0.0  # never -0.0
