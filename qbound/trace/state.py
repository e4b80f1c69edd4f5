"""Whether JAX is tracing right now: the one question bound propagation asks of JAX's internals.

:func:`qbound.bounds.common.jit_step` compiles its steps with XLA options, which JAX accepts on an
outermost ``jit`` only. A step's arguments can all be concrete arrays while it runs inside another
transformation (a ``lax.map`` over row blocks reads the bounds it closes over), so looking for
tracers among the arguments is not enough; JAX's trace state says it directly. Kept here, beside the
tracer, because it reads ``jax._src``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from qbound.trace.state import inside_transformation
  >>> inside_transformation()
  False
  >>> float(jax.jit(lambda x: x + inside_transformation())(jnp.float32(1)))  # 1 + True, under jit
  2.0
"""

from __future__ import annotations

from jax._src import core as _jcore


def inside_transformation() -> bool:
  """Whether the caller runs under a JAX trace (``jit``, ``vmap``, ``grad``, ``lax.map``, ...)."""
  return not _jcore.trace_state_clean()
