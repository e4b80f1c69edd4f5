"""How branch and bound uses the machine (qbound.bounds.bab_machine): batches at once only on long
searches with a broad frontier, bounded on other threads in the caller's context, errors kept."""

from __future__ import annotations

import threading

import pytest

from qbound.bounds import bab_machine, common


def test_batches_at_once_only_with_programs_a_broad_frontier_and_time_run(monkeypatch):
  monkeypatch.setattr(bab_machine, "BATCHES_AT_ONCE", 2)
  monkeypatch.setattr(bab_machine, "usable_cores", lambda: 2)
  open_enough, late = bab_machine.BATCHES_AT_ONCE_OPEN, bab_machine.BATCHES_AT_ONCE_AFTER
  assert bab_machine.batches_at_once(True, open_enough, late) == 2
  assert bab_machine.batches_at_once(False, open_enough, late) == 1
  assert bab_machine.batches_at_once(True, open_enough - 1, late) == 1
  assert bab_machine.batches_at_once(True, open_enough, late - 0.1) == 1
  monkeypatch.setattr(bab_machine, "usable_cores", lambda: 1)  # one core: nothing to overlap
  assert bab_machine.batches_at_once(True, open_enough, late) == 1
  monkeypatch.setattr(bab_machine, "usable_cores", lambda: 2)
  monkeypatch.setattr(bab_machine, "BATCHES_AT_ONCE", 0)  # (1 or less: one batch at a time)
  assert bab_machine.batches_at_once(True, open_enough, late) == 1


def test_side_by_side_keeps_order_runs_others_on_threads_and_in_the_callers_context():
  def bound(batch):
    return batch, threading.current_thread().name, common.current_step_compile()

  with common.step_compile(common.SMALL_NET_STEP_COMPILE):
    results = bab_machine.side_by_side(bound, ["a", "b", "c"])
  assert [r[0] for r in results] == ["a", "b", "c"]
  assert results[0][1] == threading.current_thread().name
  assert all(r[1].startswith("qbound-other-batch") for r in results[1:])
  assert all(r[2] is common.SMALL_NET_STEP_COMPILE for r in results)
  assert bab_machine.side_by_side(bound, []) == []


def test_side_by_side_bounds_every_batch_here_once_no_thread_takes_work(monkeypatch):
  class ShutDown:
    def submit(self, *args):
      raise RuntimeError("cannot schedule new futures after interpreter shutdown")

  monkeypatch.setattr(bab_machine, "_other_batches", ShutDown)
  here = threading.current_thread().name
  assert bab_machine.side_by_side(lambda b: (b, threading.current_thread().name), ["a", "b"]) == [("a", here), ("b", here)]


def test_side_by_side_raises_what_a_batch_raised_once_every_batch_is_done():
  finished = []

  def bound(batch):
    if batch == "bad":
      raise ValueError("a piece's bounds are empty")
    finished.append(batch)
    return batch

  with pytest.raises(ValueError, match="empty"):
    bab_machine.side_by_side(bound, ["bad", "good"])
  assert finished == ["good"]  # the other batch ran to its end before the error came out
  with pytest.raises(ValueError, match="empty"):
    bab_machine.side_by_side(bound, ["good", "bad"])
