"""``time_budget`` is the call's wall-clock time: certify returns at its deadline with what is proven.

A stage that compiles cannot be interrupted, so certify runs its stages in a worker thread and
returns at the deadline; these tests stand a slow stage in for a long compilation (a sleep), so they
do not depend on the machine's speed beyond seconds of slack.
"""

import importlib
import logging
import threading
import time

import numpy as np
import pytest

import helpers as H
import qbound as qb
import qbound.bounds.bab as bab_module

C = importlib.import_module("qbound.certify")  # the module: ``qbound.certify`` is the function


@pytest.fixture(autouse=True)
def compiled_search_only(monkeypatch):
  """These tests stand slow stages in for the compiled branch and bound; on these small pairs the
  NumPy search (qbound.bounds.host_bab, tested in test_host_bab.py) would close the gap first."""
  monkeypatch.setattr(C, "HOST_HEAD_START", None)


@pytest.fixture
def pair():
  f, fq, _, _ = H.random_pair(0, H.SHAPES[0], bits=4)
  return f, fq, H.random_box(0, 2)


def test_returns_at_the_deadline_with_what_is_proven(pair, monkeypatch):
  f, fq, box = pair
  qb.certify(f, fq, box, time_budget=5.0)  # compiled once, so only the slow stage below takes time
  release = threading.Event()
  real = bab_module.branch_and_bound

  def slow(*args, **kwargs):  # stands in for a branch and bound that compiles for a long time
    release.wait(timeout=30)
    return real(*args, **kwargs)

  monkeypatch.setattr(bab_module, "branch_and_bound", slow)
  start = time.perf_counter()
  cert = qb.certify(f, fq, box, time_budget=1.0)
  seconds = time.perf_counter() - start
  release.set()
  assert seconds < 4.0, seconds
  assert "bab" not in cert.bounds and "interval" in cert.bounds
  assert cert.lower <= cert.upper < np.inf
  xs = H.sample_points(box, 500)
  assert np.max(np.abs(H.eval64(qb.merge(f, fq, box), xs))) <= cert.upper


def test_an_error_before_the_deadline_is_raised(pair, monkeypatch):
  f, fq, box = pair

  def broken(*args, **kwargs):
    raise RuntimeError("broken stage")

  monkeypatch.setattr(C, "interval_bounds", broken)
  with pytest.raises(RuntimeError, match="broken stage"):
    qb.certify(f, fq, box, time_budget=5.0)


@pytest.mark.slow  # behaviour, not soundness: heavy for the default suite (CI's 15 minutes)
def test_an_error_after_the_deadline_is_logged(pair, monkeypatch, caplog):
  f, fq, box = pair
  qb.certify(f, fq, box, time_budget=5.0)
  release = threading.Event()

  def slow_then_broken(*args, **kwargs):
    release.wait(timeout=30)
    raise RuntimeError("late failure")

  monkeypatch.setattr(bab_module, "branch_and_bound", slow_then_broken)
  logger = logging.getLogger("qbound")
  logger.addHandler(caplog.handler)
  try:
    cert = qb.certify(f, fq, box, time_budget=1.0)
    release.set()
    for thread in threading.enumerate():
      if thread.name == "qbound-certify":
        thread.join(timeout=30)
  finally:
    logger.removeHandler(caplog.handler)
  assert np.isfinite(cert.upper)
  assert "late failure" in caplog.text


def test_infinite_budget_runs_in_the_calling_thread(pair, monkeypatch):
  f, fq, box = pair
  seen = []
  real = bab_module.branch_and_bound

  def spy(*args, **kwargs):
    seen.append(threading.current_thread() is threading.main_thread())
    return real(*args, **kwargs)

  monkeypatch.setattr(bab_module, "branch_and_bound", spy)
  qb.certify(f, fq, box, time_budget=float("inf"), target_gap=0.5)
  assert seen == [threading.current_thread() is threading.main_thread()]


def test_a_named_method_still_gets_its_first_bound(pair, monkeypatch):
  """At a deadline before method='bab' has its first bound (interval bounds on few inputs, where it
  goes to branch and bound first; CROWN otherwise), the call waits for it rather than returning
  without one."""
  f, fq, box = pair
  qb.certify(f, fq, box, method="bab", time_budget=5.0)
  real = C._first_probes

  def slow_probes(*args, **kwargs):  # the deadline passes before any bound
    time.sleep(1.5)
    return real(*args, **kwargs)

  monkeypatch.setattr(C, "_first_probes", slow_probes)
  cert = qb.certify(f, fq, box, method="bab", time_budget=0.5)
  assert np.isfinite(cert.upper) and cert.lower <= cert.upper
