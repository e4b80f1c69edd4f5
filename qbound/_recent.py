"""The last few results of a computation, kept by key for the process (a small LRU).

A key may name objects by their ``id`` (a graph, a traced constant): the entry then keeps those
objects (its ``pins``), so their ids cannot be taken by others while it is kept, and it is found
again only for the very same objects. qbound keeps traced graphs and merges this way, so that a
certify call in a loop traces f and f_q once, and what hangs off a graph object (its exact targets,
a branch and bound's row counts) is found again.

Example:
  >>> from qbound._recent import Recent
  >>> kept = Recent(size=2)
  >>> a, b = [1.0], [1.0]
  >>> kept.put((id(a),), "from a", pins=(a,))
  >>> kept.get((id(a),), pins=(a,)), kept.get((id(a),), pins=(b,))
  ('from a', None)
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Hashable, Optional, Sequence


class Recent:
  """The last ``size`` values put, by key, each with the objects its key names (see the module)."""

  def __init__(self, size: int):
    self.size = size
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key: Hashable, pins: Sequence[Any] = ()) -> Optional[Any]:
    """The value kept under ``key`` for these ``pins`` (compared by identity), or None."""
    with self._lock:
      entry = self._entries.get(key)
      if entry is None or len(entry[0]) != len(pins) or any(a is not b for a, b in zip(entry[0], pins)):
        return None
      self._entries.move_to_end(key)
      return entry[1]

  def put(self, key: Hashable, value: Any, pins: Sequence[Any] = ()) -> None:
    """Keeps ``value`` under ``key``, with ``pins`` alive beside it; the oldest entry past ``size`` goes."""
    with self._lock:
      self._entries[key] = (tuple(pins), value)
      self._entries.move_to_end(key)
      while len(self._entries) > self.size:
        self._entries.popitem(last=False)
