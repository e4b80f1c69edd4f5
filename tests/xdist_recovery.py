"""``--dist loadfile`` that survives a crashed worker, so the suite ends instead of hanging.

XLA's CPU compiler (jaxlib 0.10.2) now and then segfaults late in a worker's life, each time in a
different, ordinary jit. pytest-xdist then replaces the worker, but its file scheduler re-queues the
dead worker's finished files as empty work and hands a replacement a single test it waits on forever:
the session deadlocks with idle workers (pytest-xdist issues 784, 1323, 1327, 1378; unreleased fixes in
pull requests 1324, 1328, 1363). CI timed out on exactly that. This scheduler re-queues only the
unfinished tests, shuts a worker down as soon as nothing is left to give it, and implements
``mark_test_pending`` so that pytest-rerunfailures runs the crashed test once more in a fresh worker
(``--reruns 1 --only-rerun 'crashed while running'`` in ``pyproject.toml``: ordinary failures are not
re-run). Tests of a file still share one worker, which is what keeps the suite's compile time low.
"""

import pytest
from xdist.scheduler import LoadFileScheduling


class CrashSafeLoadFileScheduling(LoadFileScheduling):
  """pytest-xdist's ``loadfile`` scheduling with crash recovery that cannot deadlock."""

  def remove_node(self, node):
    workload = self.assigned_work.pop(node)
    unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
    if not unfinished:
      return None
    # A worker runs its tests in the order they were sent: the first unfinished one crashed it.
    crashitem = next(nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done)
    # Reported as failed by xdist; run again only if pytest-rerunfailures asks (mark_test_pending).
    unfinished[self._split_scope(crashitem)][crashitem] = True
    for scope, unit in reversed(list(unfinished.items())):
      if not all(unit.values()):
        self.workqueue[scope] = unit
        self.workqueue.move_to_end(scope, last=False)
    # No rescheduling here: mark_test_pending may still add the crashed test to its file's unit, and
    # the replacement worker's arrival reschedules every worker (LoadScopeScheduling.schedule).
    return crashitem

  def add_node_collection(self, node, collection):
    super().add_node_collection(node, collection)
    if node not in self.registered_collections:
      # xdist rejected a replacement whose collection differs from the run's (a test file edited
      # while the suite runs): it would wait for work forever, so the run ends instead, and
      # pytest_sessionfinish reports the tests it never ran.
      node.shutdown()

  def mark_test_pending(self, item):
    scope = self._split_scope(item)
    if scope not in self.workqueue:
      self.workqueue[scope] = {}
      self.workqueue.move_to_end(scope, last=False)
    self.workqueue[scope][item] = False

  def _reschedule(self, node):
    # A replacement still collecting has no collection to index yet: its own arrival schedules it.
    if node.shutting_down or node not in self.registered_collections:
      return
    if self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
      self._assign_work_unit(node)
    # A worker runs a test only once it holds the next one or is told to stop: with the queue empty,
    # tell it now rather than after a completion that a lone pending test would never produce.
    if not self.workqueue:
      node.shutdown()


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
  """``--dist loadfile`` (the default in pyproject.toml) with crash recovery that cannot deadlock."""
  if config.getvalue("dist") == "loadfile":
    return CrashSafeLoadFileScheduling(config, log)
  return None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
  """Fail the run when crashed workers used up their restarts with tests never run (xdist exits 0)."""
  dsession = session.config.pluginmanager.getplugin("dsession")
  sched = getattr(dsession, "sched", None)
  if session.exitstatus == pytest.ExitCode.OK and sched is not None and sched.has_pending:
    session.config.get_terminal_writer().line("qbound tests: some tests never ran (too many crashed workers)", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
