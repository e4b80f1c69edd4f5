"""certify's branch and bound in NumPy (:mod:`qbound.bounds.host_bab`), in a thread beside the stages.

On small paired ReLU chains with few inputs, ``certify(method="auto")`` runs the NumPy search,
which compiles nothing, at once and beside the compiled stages (docs/methods/bab.md, "On the
host"). This module holds that thread: which chains take it (:func:`host_chain_for`), and
:class:`HostSearch`, which runs it, hands its bounds and inputs to the call's tracker, and waits
while the input grid computes.

Example:
  >>> import functools, jax, jax.numpy as jnp, qbound as qb
  >>> from qbound.certify_host import host_chain_for
  >>> def mlp(p, x):
  ...   return jax.nn.relu(x @ p[0]) @ p[1]
  >>> p = (jnp.ones((2, 3)), jnp.ones((3, 1)))
  >>> box = qb.Box(-jnp.ones(2), jnp.ones(2))
  >>> merged = qb.merge(functools.partial(mlp, p), functools.partial(mlp, qb.quantize.uniform(p, bits=4)), box)
  >>> [layer[0] for layer in host_chain_for(merged, box, time_budget=10.0, grid_share=0.8).layers]
  ['affine', 'relu', 'affine']
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import numpy as np

from qbound.box import Box


def host_chain_for(merged, box: Box, *, time_budget: float, grid_share: float, while_grid_compiles: bool = True):
  """The chain the NumPy search takes (:func:`qbound.bounds.host_bab.chain_of`), or None.

  Where f_q rounds its input on a grid the enumeration covers in its share of the time
  (``grid_share``; :mod:`qbound.exact.grid`, exact cell by cell), the search runs only while the
  grid's programs compile (all of a machine's first call on AQT's 1.9e7 cells, whose interval bound
  was 141-173x the error) and waits while the grid computes (:class:`HostSearch`; with the CPU to
  itself the grid ends at 1.05-1.16x, beside the search at 1.86x): unless ``while_grid_compiles``
  is False, in which case such chains get None.
  """
  from qbound import attack
  from qbound.bounds import host_bab

  chain = host_bab.chain_of(merged)
  if chain is not None and not while_grid_compiles and attack.has_rounding(merged.graph):
    from qbound.exact.grid import auto_max_cells

    cells = host_bab.input_grid_cells(chain, np.asarray(box.lower), np.asarray(box.upper))
    if cells is not None and cells <= auto_max_cells(grid_share * min(time_budget, 3600.0)):
      return None
  return chain


class HostSearch:
  """The NumPy search of one ``certify`` call, in a thread of its own.

  Its proven bounds go to ``track`` as ``"host-bab"``; its best inputs are evaluated again through
  the merged graph (``track.add_witness``), but only once ``evaluator_ready`` is set (the first
  probes compile that evaluation: in two threads at once it compiles twice). An exception is
  appended to ``failures`` (the stages raise it). ``grid_idle`` is cleared while the input grid
  computes: the search waits then. ``closed`` is set when it closed the gap: the call returns.

  Args:
    track: the call's :class:`~qbound.anytime.Tracker`.
    merged, box, chain: the networks, the box and :func:`host_chain_for`'s chain.
    outputs, target_gap, epsilon: as ``certify``'s.
    left: seconds left of the stages' time.
    finished: whether the call is over (deadline, gap or epsilon).
    failed: set when the stages failed: the search stops too.
    evaluator_ready: set once the float64 evaluation of witnesses is compiled.
    failures: where an exception goes.
  """

  def __init__(self, track, merged, box: Box, chain, *, outputs, target_gap: float, epsilon: Optional[float],
               left: Callable[[], float], finished: Callable[[], bool], failed: threading.Event,
               evaluator_ready: threading.Event, failures: list):
    self.track, self.merged, self.box, self.chain = track, merged, box, chain
    self.outputs, self.target_gap, self.epsilon = outputs, target_gap, epsilon
    self.left, self.finished, self.failed = left, finished, failed
    self.evaluator_ready, self.failures = evaluator_ready, failures
    self.grid_idle = threading.Event()
    self.grid_idle.set()
    self.closed = threading.Event()
    self.thread: Optional[threading.Thread] = None

  def start(self) -> None:
    self.thread = threading.Thread(target=self._run, name="qbound-host-bab", daemon=False)
    self.thread.start()

  def _stop(self) -> bool:
    """Polled between batches: waits while the grid computes; True once the call is over."""
    while not self.grid_idle.wait(0.02):
      if self.finished() or self.failed.is_set():
        break
    return self.finished() or self.failed.is_set()

  def _run(self) -> None:
    from qbound.bounds.host_bab import host_branch_and_bound

    track, graph, shape = self.track, self.merged.graph, self.box.shape
    try:
      pending = [0.0, None]  # the search's best input not yet handed to the tracker
      candidates: list = []  # its staircase search's best inputs, not yet handed to the tracker

      def flush():
        if pending[1] is not None:
          track.add_witness(graph, pending[1].reshape(shape))  # evaluated again, in float64
          pending[1] = None
        while candidates:
          xs = candidates.pop()
          track.add_witnesses(graph, xs.reshape(len(xs), *shape))

      def report_candidates(xs):
        candidates.append(xs)
        if self.evaluator_ready.is_set():
          flush()

      def report(upper, lower, witness):
        track.add_upper("host-bab", upper)
        if lower > pending[0]:
          pending[:] = [lower, witness]
        if self.evaluator_ready.is_set():
          flush()

      budget = self.left()
      if budget <= 0:  # the call's time ran out before this thread started (a short budget, a loaded machine)
        return
      res = host_branch_and_bound(self.merged, self.box, outputs=self.outputs, time_budget=budget,
                                  target_gap=self.target_gap, epsilon=self.epsilon, stop=self._stop, report=report,
                                  chain=self.chain, report_root=lambda lo, up: track.add_bounds("host-bab", lo, up),
                                  report_candidates=report_candidates)
      track.add_bounds("host-bab", res.diff_lower, res.diff_upper)
      self.evaluator_ready.wait(timeout=max(self.left(), 0.0))
      flush()
      if track.done(self.target_gap, self.epsilon):
        self.closed.set()
    except BaseException as err:  # noqa: BLE001 - raised by the stages once they end
      self.failures.append(err)
