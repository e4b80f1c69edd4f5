"""A long session's compiled programs against the kernel's limit on a process's memory maps.

XLA's CPU backend maps each compiled program into memory regions of its own (about nine per
program with jaxlib 0.10), and JAX keeps every program a jitted function compiled for as long as
the function lives. Linux caps the memory maps of a process (``vm.max_map_count``, 65,530 by
default); once a process holds that many, XLA's compiler dies with a segmentation fault on the next
compilation. qbound compiles many small programs (150-250 for a first certificate of a small MLP),
so a session that certifies dozens of different models, or a test run in one process, reaches the
limit: the test suite's workers crashed so, late in their lives, until the suite cleared its caches.

:func:`release_if_near_limit` clears JAX's compilation caches (:func:`jax.clear_caches`) once the
process holds more than :data:`SHARE` of its limit, with a warning: programs still in use compile
again, or come back from the persistent compilation cache; that costs time, a crash costs the
session. :func:`qbound.certify` and :func:`qbound.certify_batch` call it before they start. On
systems without ``/proc`` it does nothing.

Example:
  >>> from qbound import _map_limit
  >>> _map_limit.release_if_near_limit()  # far below the limit: nothing to do
  False
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Optional

# The share of vm.max_map_count past which the caches are cleared: a first certificate of a small
# model adds about 2,000 maps, a large one a few thousand more, so a quarter of the default limit
# stays free for the call that follows.
SHARE = 0.75
# Seconds between two reads of /proc/self/maps: the kernel writes it out on every read, 41 ms at
# 40,000 maps (3 ms at 3,000), and a process adds at most about 1,000 maps a second (compiling
# ~100 small programs), far less than the margin above.
MIN_INTERVAL = 1.0
_last_read = [-float("inf")]


@functools.cache
def map_limit() -> Optional[int]:
  """The kernel's limit on one process's memory maps, or None where it cannot be read."""
  try:
    with open("/proc/sys/vm/max_map_count") as fh:
      return int(fh.read().strip())
  except (OSError, ValueError):
    return None


def maps_in_use() -> Optional[int]:
  """How many memory maps this process holds (lines of ``/proc/self/maps``), or None."""
  try:
    with open("/proc/self/maps", "rb") as fh:
      return fh.read().count(b"\n")
  except OSError:
    return None


def release_if_near_limit(share: float = SHARE, *, warn: bool = True, min_interval: Optional[float] = None) -> bool:
  """Clears JAX's compilation caches if this process holds more than ``share`` of its memory-map
  limit; returns whether it did. Reads the maps at most once every ``min_interval`` seconds
  (default :data:`MIN_INTERVAL`)."""
  limit = map_limit()
  wait = MIN_INTERVAL if min_interval is None else min_interval
  if limit is None or time.monotonic() - _last_read[0] < wait:
    return False
  _last_read[0] = time.monotonic()
  used = maps_in_use()
  if used is None or used <= share * limit:
    return False
  import gc

  import jax

  if warn:
    warnings.warn(
        f"this process holds {used:,} memory maps, near the kernel's limit of {limit:,} "
        "(vm.max_map_count), mostly compiled XLA programs; past it the next compilation would crash "
        "the process. qbound clears JAX's compilation caches (jax.clear_caches()) to free them: "
        "programs still in use compile again.", RuntimeWarning, stacklevel=3)
  from qbound.bounds import fused

  fused.clear()  # the walks' own programs hold maps too
  jax.clear_caches()
  gc.collect()
  return True
