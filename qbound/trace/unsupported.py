"""The message of :class:`~qbound.trace.UnsupportedPrimitiveError`: the user's operation, not JAX's.

A primitive qbound has no rule for is rarely what the user wrote: ``jax.nn.log_softmax`` fails on
``log``, ``jax.nn.elu`` on ``expm1``, ``jax.nn.softplus`` on ``ne``.
The equation's traceback says which function the user called: walking it from the primitive
outward, the first frame outside JAX, Flax, optax and numpy is the user's line, and the library
function it called (past JAX's and Flax's wrappers: ``jit``, module method wrappers) is the
operation to name, as the user would write it (``jax.nn.gelu``, ``flax.linen.LayerNorm``).

This only reads tracebacks, so it works for any library function; a few common ones also get a
hint on what to do instead. When nothing can be recognised (the user's own ``x * x``), the message
names the primitive and the source line as before.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

# Python packages whose frames are library code, not the user's.
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "chex", "equinox")
# Frames of these files wrap a call without being the operation (jit, module methods, transforms).
_WRAPPERS = (
    "jax/_src/source_info_util.py", "jax/_src/traceback_util.py", "jax/_src/pjit.py", "jax/_src/api.py",
    "jax/_src/api_util.py",
    "jax/_src/linear_util.py", "jax/_src/custom_derivatives.py", "jax/_src/core.py", "jax/_src/checkify.py",
    "jax/_src/interpreters/", "jax/_src/ad_checkpoint.py", "flax/linen/module.py", "flax/linen/transforms.py",
    "flax/core/", "flax/nnx/object.py", "flax/nnx/graph.py", "flax/nnx/module.py", "flax/nnx/transforms/",
    "flax/nnx/bridge/", "flax/linen/combinators.py", "flax/nnx/helpers.py",  # Sequential containers
)
# Library source files and the public namespace their functions are used from.
_NAMESPACES = (
    ("jax/_src/nn/functions.py", "jax.nn"),
    ("jax/_src/nn/", "jax.nn"),
    ("jax/_src/numpy/linalg.py", "jax.numpy.linalg"),
    ("jax/_src/numpy/fft.py", "jax.numpy.fft"),
    ("jax/_src/numpy/", "jax.numpy"),
    ("jax/_src/scipy/special.py", "jax.scipy.special"),
    ("jax/_src/scipy/", "jax.scipy"),
    ("jax/_src/lax/", "jax.lax"),
    ("jax/_src/random.py", "jax.random"),
    ("jax/_src/ops/special.py", "jax.scipy.special"),
    ("flax/linen/", "flax.linen"),
    ("flax/nnx/", "flax.nnx"),
    ("optax/", "optax"),
)

_SMOOTH = ("qbound bounds ReLU, leaky ReLU, ReLU6, hard tanh (jnp.clip), hard sigmoid, abs, tanh, sigmoid, GELU, "
           "SiLU, exp, softmax and layer / RMS norm; build the model with one of those")
_LOG = ("it takes a logarithm, which qbound has no rule for; certify the logits instead (f and fq without "
        "their final log-softmax: the predicted class, the argmax, is the same), or use jax.nn.softmax")
_HINTS = {
    "log_softmax": _LOG, "logsumexp": _LOG,
    "elu": _SMOOTH, "selu": _SMOOTH, "celu": _SMOOTH, "softplus": _SMOOTH, "sparse_plus": _SMOOTH,
    "squareplus": _SMOOTH, "glu": _SMOOTH, "log_sigmoid": _SMOOTH, "mish": _SMOOTH, "PReLU": _SMOOTH,
}


@functools.cache
def _package_dirs() -> tuple[str, ...]:
  """The directories of the installed library packages (found once, by import spec, not imported)."""
  import importlib.util

  dirs = []
  for name in _LIBRARIES:
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      spec = None
    if spec is not None and spec.submodule_search_locations:
      dirs.extend(os.path.realpath(d) + os.sep for d in spec.submodule_search_locations)
  return tuple(dirs)


def _is_library(file_name: str) -> bool:
  """Whether a frame's file belongs to a library rather than to the user (``<string>``, a notebook
  cell or a script count as the user's)."""
  if not file_name or file_name.startswith("<"):
    return False
  path = os.path.realpath(file_name)
  # Python's own machinery (functools, contextlib) between the user and a library counts as library.
  return path.startswith(_package_dirs()) or ("/lib/python3" in path and "site-packages" not in path)


def _relative(file_name: str) -> str:
  """The part of a library path from its package on (``jax/_src/nn/functions.py``)."""
  path = file_name.replace(os.sep, "/")
  for name in _LIBRARIES:
    marker = f"/{name}/"
    if marker in path:
      return name + "/" + path.rsplit(marker, 1)[1]
  return path


def _public_name(frame) -> Optional[str]:
  """``jax.nn.gelu`` or ``flax.linen.LayerNorm`` for a frame of that library function, else None."""
  rel = _relative(frame.file_name)
  namespace = next((ns for prefix, ns in _NAMESPACES if rel.startswith(prefix)), None)
  if namespace is None:
    return None
  parts = frame.function_name.split(".")
  if len(parts) == 2 and parts[1] in ("__call__", "forward", "apply"):
    parts = parts[:1]  # a module's call: name the module class
  if len(parts) != 1 or not parts[0].isidentifier() or parts[0].startswith("_"):
    return None  # private helpers, closures, operator overloads (x * x): no name a user would know
  return f"{namespace}.{parts[0]}"


def _frames(source_info) -> Sequence:
  traceback = getattr(source_info, "traceback", None)
  return list(getattr(traceback, "frames", None) or ()) if traceback is not None else []


def user_operation(eqn, calls: Sequence = ()) -> Optional[tuple[str, str]]:
  """``(operation, where)`` for an equation inside a library function the user called: the
  function's public name and the user's line that called it; None if there is none to name.

  Args:
    eqn: the equation of the unsupported primitive.
    calls: the call equations (``jit``, ``custom_jvp_call``) it sits in, outermost first. A
      jitted function's equations are traced apart, so their tracebacks end at the function
      (``jax.nn.silu``); the call's own traceback goes on from there to the user's line.

  Example (the equations of ``jax.nn.gelu`` called at line 8 of the user's file)::

      ('jax.nn.gelu', '/home/me/model.py:8 (MLP.__call__)')
  """
  frames = _frames(eqn.source_info)  # innermost first
  for call in reversed(calls):
    frames += _frames(call.source_info)
  user = next((i for i, fr in enumerate(frames) if not _is_library(fr.file_name)), None)
  if user is None or user == 0:
    return None
  # From the user's frame inward: the first library frame that is not a wrapper is what they called.
  for frame in reversed(frames[:user]):
    if any(w in _relative(frame.file_name) for w in _WRAPPERS):
      continue
    name = _public_name(frame)
    if name is None:
      return None
    caller = frames[user]
    return name, f"{caller.file_name}:{caller.line_num} ({caller.function_name})"
  return None


def message(eqn, why: str, where: str, supported: Sequence[str], calls: Sequence = ()) -> str:
  """The whole error message for an unsupported primitive ``eqn`` (``why``: an optional reason,
  ``where``: the source line the tracer attributes it to, ``calls``: see `user_operation`)."""
  primitive = eqn.primitive.name
  extra = f" ({why})" if why else ""
  tail = f"Supported: {', '.join(supported)}. Rewrite that step with supported operations or open an issue."
  try:
    found = user_operation(eqn, calls)
  except Exception:  # pragma: no cover - a JAX without tracebacks: the plain message below
    found = None
  if found is None:
    return f"qbound cannot bound the primitive '{primitive}' used at {where}{extra}. {tail}"
  operation, called_at = found
  module = str(getattr(eqn.source_info, "name_stack", "") or "")
  in_module = f" in module {module}" if module else ""
  short = operation.rsplit(".", 1)[1]
  hint = f" {short}: {_HINTS[short]}." if short in _HINTS else ""
  uses = f"it uses the primitive '{primitive}'" + (extra if why else ", which qbound has no rule for")
  return f"qbound cannot bound {operation}, called at {called_at}{in_module}: {uses}.{hint} {tail}"
