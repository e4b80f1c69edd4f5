"""A batch of pieces bounded in two halves on two threads: the NumPy search's second core.

:func:`qbound.bounds.host_bab.host_branch_and_bound` runs in one thread; on a warm ``certify``
call the stages' thread only waits for it, so the second core of a 2-core machine was idle.
NumPy releases the interpreter lock inside its loops, so :func:`bound_in_halves` bounds a large
batch's second half in a thread of its own while the caller bounds the first. Each half is bounded
on its own (its batch-wide slacks and backward rows are its own): the result is that of two calls
of :func:`qbound.bounds.host_bounds.bound_pieces`, whatever the threads' timing, never looser than
one call on the whole batch. ``bound_pieces`` on 1,024 pieces of qwix's nnx ``rms,3`` MLP: 80-93 ms
in one call, 60-65 ms in halves (the lock between NumPy's many small calls costs the rest);
``certify``'s 10 s on that row: bound / reached 1.546 against 1.587 (docs/results/host-search.md).

Example:
  >>> import numpy as np
  >>> from qbound.bounds.host_bounds import Chain
  >>> w = np.array([[1.0, -1.0]])
  >>> chain = Chain(layers=(("affine", w, np.zeros(1), 1.01 * w, np.zeros(1)),), n_in=2, n_out=1)
  >>> lo = np.zeros((600, 2)); hi = np.ones((600, 2))
  >>> dl, du, *_ = bound_in_halves(chain, lo, hi, None, None, parallel=True)
  >>> dl.shape, bool(np.all(du >= 0.0099))
  ((600, 1), True)
"""

from __future__ import annotations

import os
import threading

import numpy as np

from qbound.bounds.host_bounds import bound_pieces

# Batches of at least this many pieces go in two halves (rounds of 256 pieces or more, each split
# in two: the NumPy search's rounds once its frontier is broad); smaller ones gain nothing.
PARALLEL_FROM = 512


def usable_cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - macOS, Windows
    return os.cpu_count() or 1


def bound_in_halves(chain, lo, hi, prior, values, parallel: bool):
  """:func:`~qbound.bounds.host_bounds.bound_pieces` of a batch: in two halves, the second in a
  thread of its own, when ``parallel``, the batch has at least ``PARALLEL_FROM`` pieces and two
  cores are usable; else in one call. ``prior`` and ``values`` as ``bound_pieces`` takes them
  (``values`` a pair of arrays, or None)."""
  k = len(lo)
  whole = lambda: bound_pieces(chain, lo, hi, prior, values=values)  # noqa: E731
  if not parallel or k < PARALLEL_FROM or usable_cores() < 2:
    return whole()

  def part(h):
    return bound_pieces(chain, lo[h], hi[h], None if prior is None else prior[h],
                        values=None if values is None else (values[0][h], values[1][h]))

  second: list = []

  def run_second():
    try:
      second.append(part(slice(k // 2, k)))
    except BaseException as err:  # noqa: BLE001 - raised in the caller's thread below
      second.append(err)

  helper = threading.Thread(target=run_second, name="qbound-host-bounds", daemon=True)
  try:
    helper.start()
  except RuntimeError:  # no new thread at interpreter shutdown (a call still running as the process exits)
    return whole()
  first = part(slice(0, k // 2))
  helper.join()
  if isinstance(second[0], BaseException):
    raise second[0]
  return tuple(np.concatenate([a, b]) for a, b in zip(first, second[0]))
