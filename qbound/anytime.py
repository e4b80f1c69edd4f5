"""The anytime state of a :func:`qbound.certify` call: the best proven bounds and reached error so
far (:class:`Tracker`), and the stages run until a deadline (:func:`run_until_deadline`).

A certificate is valid whenever the call stops: every stage only adds proven bounds (met with those
already there) or evaluated inputs (the best kept), so the call can return at its deadline with
what is proven so far, while a stage that is still compiling finishes in the background.

Example:
  >>> import numpy as np
  >>> from qbound.anytime import Tracker
  >>> track = Tracker(2, None)
  >>> track.add_bounds("interval", [-1.0, -2.0], [1.0, 0.5])
  >>> track.add_upper("bab", 0.75)
  >>> track.upper, track.best_method
  (0.75, 'bab')
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

import numpy as np

from qbound import attack
from qbound.certificate import max_abs

_log = logging.getLogger("qbound")


class Tracker:
  """The best proven bounds and the best reached error so far, with who proved what."""

  def __init__(self, n_out: int, outputs):
    # The stages run in a worker thread when the time budget is finite (see certify): every update
    # and the final read take the lock; evaluations happen outside it.
    self.lock = threading.Lock()
    self.diff_lower = np.full(n_out, -np.inf)
    self.diff_upper = np.full(n_out, np.inf)
    self.outputs = outputs
    self.per_method: dict[str, float] = {}
    self.best_method = None
    self.lower = 0.0
    self.witness = None

  @property
  def upper(self) -> float:
    return max_abs(self.diff_lower, self.diff_upper, self.outputs)

  def add_bounds(self, name: str, lower, upper):
    lower = np.asarray(lower, np.float64).reshape(-1)
    upper = np.asarray(upper, np.float64).reshape(-1)
    with self.lock:
      before = self.upper
      self.per_method[name] = max_abs(lower, upper, self.outputs)
      self.diff_lower = np.maximum(self.diff_lower, lower)
      self.diff_upper = np.minimum(self.diff_upper, upper)
      if self.best_method is None or self.upper < before:
        self.best_method = name

  def add_upper(self, name: str, upper: float):
    """A bound on the selected outputs' maximal error as a whole (MILP, branch and bound)."""
    with self.lock:
      self._add_upper(name, upper)

  def _add_upper(self, name: str, upper: float):
    self.per_method[name] = float(upper)
    if upper < self.upper:
      self.best_method = name
      sel = np.zeros_like(self.diff_lower, dtype=bool)
      sel[self.outputs if self.outputs is not None else slice(None)] = True
      self.diff_lower = np.where(sel, np.maximum(self.diff_lower, -upper), self.diff_lower)
      self.diff_upper = np.where(sel, np.minimum(self.diff_upper, upper), self.diff_upper)

  def add_witness(self, graph, x):
    diff = attack.exact_error(graph, x).reshape(-1)
    value = float(np.max(np.abs(diff if self.outputs is None else diff[self.outputs])))
    with self.lock:
      if self.witness is None or value > self.lower:
        self.lower, self.witness = value, np.asarray(x)

  def add_witnesses(self, graph, xs):
    """The best of a batch of inputs ``xs`` (leading axis), evaluated in float64 in one call."""
    diffs = attack.exact_errors(graph, xs).reshape(xs.shape[0], -1)
    if self.outputs is not None:
      diffs = diffs[:, self.outputs]
    values = np.max(np.abs(diffs), axis=1)
    best = int(np.argmax(values))
    with self.lock:
      if self.witness is None or values[best] > self.lower:
        self.lower, self.witness = float(values[best]), np.asarray(xs[best])

  def snapshot(self) -> dict:
    """The state as it is now, copied under the lock (the worker may still be adding to it)."""
    with self.lock:
      return dict(lower=self.lower, upper=self.upper, witness=self.witness, diff_lower=self.diff_lower.copy(),
                  diff_upper=self.diff_upper.copy(), per_method=dict(self.per_method), best_method=self.best_method)

  def done(self, target_gap: float, epsilon: Optional[float]) -> bool:
    if epsilon is not None and (self.upper <= epsilon or self.lower > epsilon):
      return True
    return self.upper <= (1 + target_gap) * self.lower  # also true when both are 0


def closing_reserve(time_budget: float) -> float:
  """Seconds kept at the end of a call for the certificate itself (the witness evaluated in float64
  and float32: compiled at the start of the stages, so milliseconds by then)."""
  return min(0.1, 0.1 * time_budget)


def run_until_deadline(stages: Callable[[], None], track: Tracker, stop: threading.Event, deadline: float,
                        closed: Optional[threading.Event] = None) -> None:
  """Runs ``stages`` in a worker thread and returns at ``deadline``, or when they finish.

  A stage cannot be interrupted while it compiles (seconds on a first call), so waiting for the
  stages would break the time budget; instead the call returns with what is proven so far and sets
  ``stop``, and the worker skips every later stage once its current one ends (what that one
  compiled is cached for the next call). A certificate needs one proven bound: if none is there at
  the deadline, it waits for the first (interval bounds, a fraction of a second). An exception from
  the stages is raised here if it comes before the call returns, else logged. ``closed``, when
  set by a stage, returns at once too (the gap is closed; a stage still compiling is left to end).
  """
  if deadline == float("inf"):
    stages()
    return
  failure: list = []
  returned = threading.Event()

  def work():
    try:
      stages()
    except BaseException as err:  # noqa: BLE001 - handed to the caller, or logged once it has returned
      if returned.is_set():
        _log.warning("a certify stage still running after the call returned failed: %s: %s",
                     type(err).__name__, err)
      else:
        failure.append(err)

  # Not a daemon: at interpreter exit Python waits for it (its current stage, then it stops), where a
  # daemon thread still inside XLA would abort the process.
  worker = threading.Thread(target=work, name="qbound-certify", daemon=False)
  worker.start()
  if closed is None:
    worker.join(timeout=max(deadline - time.perf_counter(), 0.0))
  else:
    while worker.is_alive() and not closed.is_set() and time.perf_counter() < deadline:
      worker.join(timeout=min(0.01, max(deadline - time.perf_counter(), 0.0)))
  if worker.is_alive():
    stop.set()
    while worker.is_alive() and not track.snapshot()["per_method"]:
      worker.join(timeout=0.01)
  returned.set()
  if failure:
    raise failure[0]
