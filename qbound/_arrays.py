"""Which array library a function's inputs come from: NumPy, or JAX (arrays and tracers).

Some bounds (:func:`qbound.dynamic_rounding.bounds`, :func:`qbound.rms_rounding.parts`) serve both
the compiled bound passes, on JAX arrays, and the NumPy branch and bound
(:mod:`qbound.bounds.host_bab`), whose point is to compile nothing: JAX's eager operations on NumPy
inputs would compile one small program each on a first call. Written once against the functions
NumPy and ``jax.numpy`` share, they run in the library their inputs come from.

Example:
  >>> import numpy as np, jax.numpy as jnp
  >>> from qbound._arrays import namespace
  >>> namespace(np.zeros(2)) is np, namespace(np.zeros(2), jnp.zeros(2)) is jnp
  (True, True)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def namespace(*arrays):
  """``numpy`` when every argument is a NumPy array or scalar, else ``jax.numpy``."""
  if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays):
    return np
  return jnp
