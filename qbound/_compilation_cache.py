"""JAX's persistent compilation cache, on by default for qbound's many small compiled steps.

A first certificate is mostly XLA compilation (every bound method compiles one small step per node
kind and shape, see the compilation page of the docs). JAX can keep compiled programs on disk
across processes, but its default thresholds skip programs that compile in under a second, which is
nearly all of qbound's steps. ``import qbound`` therefore turns the cache on in the user's cache
directory with thresholds low enough to keep them, unless

* ``QBOUND_JAX_CACHE=0`` (or empty) is set: no persistent cache;
* ``QBOUND_JAX_CACHE=DIR`` is set: the cache lives in ``DIR``;
* the user already chose a cache directory (``JAX_COMPILATION_CACHE_DIR`` or
  ``jax.config.update("jax_compilation_cache_dir", ...)`` before importing qbound): theirs is kept,
  with their thresholds.

The cache is keyed by JAX on the program, the JAX/XLA versions and the device, so a stale entry is
never used; deleting the directory only costs recompilation.

Example:
  >>> from qbound import _compilation_cache
  >>> _compilation_cache.directory({"QBOUND_JAX_CACHE": "0"}) is None
  True
  >>> str(_compilation_cache.directory({"QBOUND_JAX_CACHE": "/tmp/qb"}))
  '/tmp/qb'
"""

import os
import pathlib
from typing import Mapping, Optional

ENV = "QBOUND_JAX_CACHE"
# Every step is kept: JAX's default (1 s) would skip almost all of qbound's, and even 0.05 s skipped
# enough of them that `qbound demo`'s first row took 4.4 s in a second process, against 2.2 s with
# every step kept (7.3 s without the cache).
MIN_COMPILE_SECONDS = 0.0


def directory(environ: Mapping[str, str] = os.environ) -> Optional[pathlib.Path]:
  """Where the cache goes: ``$QBOUND_JAX_CACHE``, else ``$XDG_CACHE_HOME/qbound/jax`` (by default
  ``~/.cache/qbound/jax``); ``None`` when turned off with ``QBOUND_JAX_CACHE=0``."""
  chosen = environ.get(ENV)
  if chosen is not None:
    return None if chosen.strip() in ("", "0") else pathlib.Path(chosen).expanduser()
  base = environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
  return pathlib.Path(base) / "qbound" / "jax"


def apply() -> Optional[pathlib.Path]:
  """Turns the persistent cache on (see the module docstring); returns the directory used, if any."""
  import jax

  if jax.config.jax_compilation_cache_dir:  # the user's own choice wins
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  path = directory()
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:  # a read-only home: compile in every process, as JAX does by default
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
