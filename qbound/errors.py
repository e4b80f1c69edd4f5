"""The errors qbound raises where a bound cannot be trusted.

* :class:`SoundnessError`: a proven bound contradicts something true. Either a reached error
  exceeds a proven upper bound (:func:`qbound.certify` and :func:`qbound.certify_batch` check
  every certificate against its witness before returning it), or a bound propagation produced an
  empty interval (``lower > upper``) at some node, which no true value can lie in
  (:class:`InvalidBoundsError`). Both are bugs in qbound: please report them.
* :class:`BoundOverflowError`: a bound propagation produced NaN, because some value overflowed
  the float type it runs in (huge inputs or weights). Not a bug, but no bound either.
* :class:`UnsupportedLayerError`: a bound method that has no rule for one of the network's layers
  (the message names the layer and a method that has one).
* :class:`UnboundedLayerError`: a layer unbounded over the box (``1/x`` whose input may be 0).
* :class:`VnnlibError`: a VNN-LIB file that cannot be read (or asks for something qbound does
  not support); the message says where and what.
"""

from __future__ import annotations


class SoundnessError(AssertionError):
  """A proven bound contradicts a reached error or itself: a bug in qbound; please report it."""


class InvalidBoundsError(SoundnessError):
  """A bound propagation produced ``lower > upper`` at some node: no value lies in an empty interval,
  so one of the bounds that made it is wrong (a bug in a relaxation; please report it)."""


class BoundOverflowError(ValueError):
  """A bound propagation produced NaN: some value overflowed the float type (inputs or weights too
  large for float32). Scale the problem down or compute in float64 (``jax.enable_x64``)."""


class InfiniteBoundWarning(RuntimeWarning):
  """A certificate's upper bound is ``inf``: the bounds overflowed float32 without turning NaN (inputs
  or weights too large for it). The certificate is valid but proves nothing; scale the problem
  down, shrink the box, or compute in float64 (``jax.enable_x64``)."""


class FloatTieWarning(RuntimeWarning):
  """At a certificate's witness, f and fq as they run (float32) differ by more than the proven upper
  bound, which holds for the real-arithmetic networks (docs/concepts/soundness.md): in float32 a
  rounding of fq's (``round(x / s)``) lands on the other side of a tie, a whole quantization step
  away from the real-arithmetic value. The bound is still proven for the real-arithmetic error; the
  networks as executed can exceed it at such inputs."""


class VnnlibError(ValueError):
  """A VNN-LIB file that :func:`qbound.io.load_vnnlib` cannot read, or a problem in it qbound does
  not support. The message names the file, the line (and column when known) and what is wrong, as
  ``path:line:column: what``; the parts are also kept as attributes.

  Attributes:
    source: the file (or the name given for a string), or None.
    line: the 1-based line, or None when the problem has no one place (e.g. a missing bound).
    column: the 1-based column, or None.
    reason: what is wrong, without the place.
  """

  def __init__(self, reason: str, *, source=None, line=None, column=None):
    self.source, self.line, self.column, self.reason = source, line, column, reason
    place = (source, line, column if line is not None else None)
    where = ":".join(str(part) for part in place if part is not None)
    super().__init__(f"{where}: {reason}" if where else reason)


class UnboundedLayerError(ValueError):
  """A layer's input leaves the function's domain over the box (``1/x`` whose input may be 0,
  ``rsqrt`` of a possibly non-positive value): no finite bound exists there. The message names the
  layer and its source line."""


class UnsupportedLayerError(ValueError):
  """A bound method has no rule for a layer of the traced network (e.g. differential zonotopes,
  which support affine layers and ReLU only). The message names the layer and a method that
  supports it."""
