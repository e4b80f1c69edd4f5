"""What does not depend on the input, evaluated as one compiled program before the walk.

The tracer walks a jaxpr equation by equation; an equation whose inputs are all constants (a
library's weight quantization inside the forward pass: AQT's and qwix's ``round(w / s)``, scale
computations, casts) used to be evaluated on its own, each operation compiling a program of its own
(a few milliseconds to 25 ms each, hundreds of them: 2.2 s of a machine's first call on AQT's static
po2 MLP). :func:`fold_constants` splits a jaxpr by data dependence with JAX's partial evaluation (nested
``jit`` calls included; a ``custom_vjp`` or ``custom_jvp`` call is split where the walk reaches it,
:meth:`qbound.trace.builder._Builder.equation`), evaluates the known part as one compiled program,
and returns the rest with the values it needs. XLA computes each operation as the user's jitted model
does (it does not reassociate floating-point arithmetic), so the constants are those the model uses.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from qbound.trace.fold import fold_constants
  >>> closed = jax.make_jaxpr(lambda x: x * jnp.round(jnp.arange(3.0) / 2))(jnp.zeros(3))
  >>> rest, values = fold_constants(closed, [None])
  >>> len(rest.jaxpr.eqns), [v.tolist() for v in values]   # the product left; round(arange / 2) known
  (1, [[0.0, 0.0, 1.0]])
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax._src import core as jcore  # (the builder reads the same internals)
from jax._src.interpreters import partial_eval as pe

__all__ = ["fold_constants"]


def fold_constants(closed, known: Sequence[Optional[object]], min_equations: int = 0):
  """Splits ``closed`` (a ``ClosedJaxpr``) into its part that depends only on the known inputs,
  evaluated now, and the rest.

  Args:
    closed: the jaxpr.
    known: per input, its value where known, else None.
    min_equations: return None when the known part has fewer equations than this (the walk then
      evaluates them one by one, as it reads the original equations: worth it where they are few).

  Returns:
    ``(rest, values)``: ``rest`` a ``ClosedJaxpr`` whose inputs are ``values`` (the known part's
    results it needs) followed by the unknown inputs, in order; its outputs are ``closed``'s. Or None
    (see ``min_equations``).
  """
  unknowns = [v is None for v in known]
  part, rest, _, _ = pe.partial_eval_jaxpr_nounits(closed, unknowns=unknowns, instantiate=True)
  if len(part.jaxpr.eqns) < min_equations:
    return None
  args = [v for v in known if v is not None]
  if not part.jaxpr.eqns:  # values passed through only: nothing to compile
    return rest, jcore.eval_jaxpr(part.jaxpr, part.consts, *args)
  return rest, _program(part.jaxpr)(*part.consts, *args)


# Compiled known parts by their text (constants as arguments): tracing the same model again in a
# process (a second certify call, a test suite's many) reuses the program, where a new function
# object would be traced, lowered and looked up in the persistent cache again (0.1-0.3 s each).
_PROGRAMS: "collections.OrderedDict[str, Callable]" = collections.OrderedDict()
MAX_PROGRAMS = 256
_PROGRAMS_LOCK = threading.Lock()


def _program(jaxpr) -> Callable:
  """A jitted function of ``jaxpr``'s constants and inputs, shared by every jaxpr of the same text.

  The text names every operation with its parameters and every value's shape and dtype, so equal
  texts compute the same function of their arguments, except where a parameter's text does not
  say what it computes: a callback (its function), a nested jaxpr's constants or an array
  parameter (values not printed), an object's address (reusable once it is gone). Such a jaxpr is
  never shared (:func:`_shareable`)."""
  opened = pe.convert_constvars_jaxpr(jaxpr)
  text = str(opened)
  with _PROGRAMS_LOCK:  # (certify_batch may trace in threads)
    fn = _PROGRAMS.get(text)
    if fn is None:
      fn = jax.jit(jcore.jaxpr_as_fun(jcore.ClosedJaxpr(opened, ())))
      if " at 0x" not in text and _shareable(opened):
        _PROGRAMS[text] = fn
        while len(_PROGRAMS) > MAX_PROGRAMS:
          _PROGRAMS.popitem(last=False)
    else:
      _PROGRAMS.move_to_end(text)
  return fn


def _shareable(jaxpr) -> bool:
  """Whether ``jaxpr``'s text says all it computes: no callback, no nested jaxpr with constants of
  its own, no array parameter (checked through nested jaxprs)."""
  for eqn in jaxpr.eqns:
    if "callback" in eqn.primitive.name:
      return False
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, jcore.ClosedJaxpr):
          if item.consts or not _shareable(item.jaxpr):
            return False
        elif isinstance(item, jcore.Jaxpr):
          if not _shareable(item):
            return False
        elif isinstance(item, (np.ndarray, jax.Array)) and np.size(item) > 1:
          return False
  return True
