"""Walks and node intervals by their own compiled programs (qbound.bounds.fused): the same bounds as
step by step, compiled only between calls, and step by step whenever a program cannot serve."""

from __future__ import annotations

import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.bounds import bab, bab_machine, fused
from qbound.bounds.sparse import diff_bounds_sparse


@pytest.fixture
def own_programs(monkeypatch):
  """A fresh table of programs for this test (programs other tests asked for stay out of it), which
  compile only in fused.wait() (the calls below are not all marked as bounding calls)."""
  monkeypatch.setattr(fused, "_programs", {})
  monkeypatch.setattr(fused, "IDLE_SECONDS", 3600.0)
  monkeypatch.setattr(fused, "_last_end", time.monotonic())
  yield fused._programs


def pieces(seed, n_in, count=4, width=0.5):
  rng = np.random.default_rng(seed)
  lo = rng.uniform(-1, 1 - width, size=(count, n_in)).astype(np.float32)
  return qb.Box(jnp.asarray(lo), jnp.asarray(lo + width))


def counting(programs):
  """Each ready program wrapped to count its calls; returns the counter."""
  calls = {"n": 0}
  for key, program in list(programs.items()):
    if program is not None and program is not fused._FAILED:
      def counted(*args, _program=program):
        calls["n"] += 1
        return _program(*args)
      programs[key] = counted
  return calls


@pytest.mark.parametrize("sound", [True, False])
def test_programs_give_the_step_by_step_bounds(own_programs, sound):
  f, fq, _, _ = H.random_pair(3, (3, (24, 24), 2), noise=1e-2)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  fg, qg = merged.f_graph, merged.fq_graph
  boxes = pieces(0, 3)
  steps = diff_bounds_sparse(fg, qg, boxes, sound=sound, f_crown=False, outputs=[0, 1], coefficients=True)
  first = diff_bounds_sparse(fg, qg, boxes, sound=sound, f_crown=False, outputs=[0, 1], coefficients=True,
                             fused=True)
  assert own_programs and all(p is None for p in own_programs.values())  # asked for, not compiled in the call
  fused.wait()
  calls = counting(own_programs)
  assert calls and len(own_programs) >= 3
  again = diff_bounds_sparse(fg, qg, boxes, sound=sound, f_crown=False, outputs=[0, 1], coefficients=True,
                             fused=True)
  assert calls["n"] >= len(own_programs)  # every walk and node by its program
  for run in (first, again):
    for mine, ref in zip(run.d + run.z + run.zq, steps.d + steps.z + steps.zq):
      for a, b in zip(mine, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  out = fg.output
  lo, hi = (np.asarray(v, np.float64) for v in again.d[out])
  for k in range(boxes.lower.shape[0]):
    piece = qb.Box(boxes.lower[k], boxes.upper[k])
    values = H.eval64(merged, H.sample_points(piece, 500))
    assert np.all(values >= lo[k] - 1e-9) and np.all(values <= hi[k] + 1e-9)


def test_programs_compile_only_after_calls_and_idle_time(own_programs, monkeypatch):
  f, fq, _, _ = H.random_pair(4, (3, (16, 16), 2), noise=1e-2)
  merged = qb.merge(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
  boxes = pieces(1, 3)

  @fused.while_in_use
  def call():
    with pytest.raises(RuntimeError, match="between calls"):
      fused.wait()
    return diff_bounds_sparse(merged.f_graph, merged.fq_graph, boxes, f_crown=False, fused=True)

  call()
  time.sleep(0.5)
  assert own_programs and all(p is None for p in own_programs.values())  # not idle for an hour yet
  monkeypatch.setattr(fused, "IDLE_SECONDS", 0.2)  # idle long enough now: they compile by themselves
  deadline = time.monotonic() + 120
  while any(p is None for p in own_programs.values()) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert all(p is not None and p is not fused._FAILED for p in own_programs.values())
  fused.wait()  # (nothing left to compile)


def test_a_batch_finishing_at_interpreter_exit_goes_step_by_step(own_programs, monkeypatch):
  """A certify stage still bounding its batch as the script exits: the programs' worker refuses new
  work then; the batch is bounded step by step and nothing is asked for (it raised before)."""
  f, fq, _, _ = H.random_pair(4, (3, (16, 16), 2), noise=1e-2)
  merged = qb.merge(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
  boxes = pieces(2, 3)
  usual = diff_bounds_sparse(merged.f_graph, merged.fq_graph, boxes, f_crown=False, fused=False)

  class Exiting:
    def submit(self, *args, **kwargs):
      raise RuntimeError("cannot schedule new futures after interpreter shutdown")

  monkeypatch.setattr(fused, "_worker", Exiting)
  out = diff_bounds_sparse(merged.f_graph, merged.fq_graph, boxes, f_crown=False, fused=True)
  assert own_programs and all(p is fused._FAILED for p in own_programs.values())
  for mine, ref in zip(out.d, usual.d):
    np.testing.assert_allclose(np.asarray(mine[0]), np.asarray(ref[0]), rtol=1e-5, atol=1e-6)


def test_wait_waits_for_a_bounding_call_still_running_on_another_thread():
  """certify returns at its deadline while a stage may still finish its batch: wait() after it waits
  for that batch instead of raising."""
  started, release = threading.Event(), threading.Event()

  @fused.while_in_use
  def straggler():
    started.set()
    release.wait(10)

  thread = threading.Thread(target=straggler)
  thread.start()
  started.wait(10)
  threading.Timer(0.3, release.set).start()
  begun = time.monotonic()
  fused.wait()
  assert not thread.is_alive() and time.monotonic() - begun >= 0.25
  thread.join()


def test_a_long_call_lets_its_programs_compile_beside_it_until_it_ends(own_programs):
  f, fq, _, _ = H.random_pair(4, (3, (16, 16), 2), noise=1e-2)
  merged = qb.merge(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
  boxes = pieces(1, 3)
  run = lambda: diff_bounds_sparse(merged.f_graph, merged.fq_graph, boxes, f_crown=False, fused=True)

  @fused.while_in_use
  def call(beside):
    run()
    time.sleep(0.3)
    assert own_programs and all(p is None for p in own_programs.values())  # in a call: they wait
    if beside:
      fused.compile_beside()
      deadline = time.monotonic() + 120
      while any(p is None for p in own_programs.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
      assert all(p is not None and p is not fused._FAILED for p in own_programs.values())
    return fused._beside

  fused.compile_beside()  # between calls it grants nothing
  assert not fused._beside
  assert call(beside=True)
  assert not fused._beside  # the call ended: programs asked for later wait for idleness again
  own_programs.clear()
  assert not call(beside=False)


@pytest.mark.slow  # (13 s; the default suite sits near CI's 15 minutes)
def test_branch_and_bound_lets_its_programs_compile_beside_it_once_it_runs_long(own_programs, monkeypatch):
  """A search on a large net that has run a while, warm, with time left asks for the programs it lacks
  now (BESIDE_AFTER, BESIDE_WARM_SECONDS, BESIDE_SECONDS_LEFT); short or nearly finished searches
  never do."""
  f, fq, _, _ = H.random_pair(4, (3, (140, 140), 2), bits=3)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  asked = []
  real = fused.compile_beside
  monkeypatch.setattr(fused, "compile_beside", lambda: asked.append(1) or real())
  run = lambda: bab.branch_and_bound(merged, box, time_budget=4, target_gap=0.0, max_pieces=10**6)
  monkeypatch.setattr(bab_machine, "BESIDE_SECONDS_LEFT", 1e9)
  run()
  assert not asked and not fused.programs()
  monkeypatch.setattr(bab_machine, "BESIDE_AFTER", 0.5)
  monkeypatch.setattr(bab_machine, "BESIDE_WARM_SECONDS", 0.0)
  monkeypatch.setattr(bab_machine, "BESIDE_SECONDS_LEFT", 0.0)
  res = run()
  assert asked
  # Started during the call (IDLE_SECONDS is an hour here); one still compiling when it ended finishes.
  deadline = time.monotonic() + 60
  while not fused.programs() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert fused.programs() > 0
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.abs(values).max() <= res.upper + 1e-9


def test_compilations_are_timed_outside_the_programs_worker_only():
  fresh = lambda: jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(3))  # a new function: traced and compiled
  fresh()
  assert fused.seconds_since_compilation() < 1.0
  time.sleep(0.3)
  before = fused.seconds_since_compilation()
  worker = threading.Thread(target=fresh, name=fused._WORKER_NAME + "_test")
  worker.start()
  worker.join()
  assert fused.seconds_since_compilation() >= before  # the programs' own compilations do not count


def test_a_search_with_programs_keeps_its_arrays_uncommitted_as_the_programs_return_them(monkeypatch):
  """Steps fed both committed arrays (a one-device mesh's) and the programs' plain results compiled
  once for each mix; with the programs, every batch is plain."""
  f, fq, _, _ = H.random_pair(4, (3, (140, 140), 2), noise=1e-3)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  seen = []
  real = bab.batch_bounds
  def recorded(fg, qg, mg, lo, hi, *args, **kwargs):
    weights = [w for node in fg.nodes + qg.nodes for w in node.weights]
    seen.append([lo.committed, hi.committed] + [w.committed for w in weights if isinstance(w, jax.Array)])
    return real(fg, qg, mg, lo, hi, *args, **kwargs)

  monkeypatch.setattr(bab, "batch_bounds", recorded)
  bab.branch_and_bound(merged, box, time_budget=5, epsilon=0.05, max_pieces=200)
  assert seen and len(seen[0]) > 2 and not any(any(batch) for batch in seen)


def test_a_long_search_bounds_a_second_batch_on_its_own_thread_and_stays_sound(monkeypatch):
  """Past BATCHES_AT_ONCE_AFTER, on a broad frontier, a search with the programs bounds two batches at once,
  the second on its own thread; every piece's bound still holds."""
  f, fq, _, _ = H.random_pair(4, (3, (140, 140), 2), bits=3)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  threads = []
  real = bab.batch_bounds
  def recorded(*args, **kwargs):
    threads.append(threading.current_thread().name)
    return real(*args, **kwargs)

  monkeypatch.setattr(bab, "batch_bounds", recorded)
  monkeypatch.setattr(bab_machine, "BATCHES_AT_ONCE_OPEN", 4)
  monkeypatch.setattr(bab_machine, "usable_cores", lambda: 2)  # (a runner pinned to one core, too)
  monkeypatch.setattr(bab_machine, "BATCHES_AT_ONCE_AFTER", 1e9)
  bab.branch_and_bound(merged, box, time_budget=2, target_gap=0.0)
  assert threads and not any(name.startswith("qbound-other-batch") for name in threads)
  threads.clear()
  monkeypatch.setattr(bab_machine, "BATCHES_AT_ONCE_AFTER", 0.0)
  # Stopped by its pieces, not a clock: a busy worker still compiling its steps could spend a short
  # budget before the frontier is broad enough for two batches (the test failed so under load).
  res = bab.branch_and_bound(merged, box, time_budget=120, target_gap=0.0, max_pieces=400)
  second = sum(name.startswith("qbound-other-batch") for name in threads)
  assert 0 < second < len(threads)
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.abs(values).max() <= res.upper + 1e-9
  reached = np.abs(H.eval64(merged, np.asarray(res.witness)[None])).max()
  assert 0 < res.lower <= reached * (1 + 1e-5) and res.lower <= res.upper


def test_a_program_that_refuses_its_arguments_leaves_the_walk_step_by_step(own_programs):
  f, fq, _, _ = H.random_pair(5, (3, (16, 16), 2), noise=1e-2)
  merged = qb.merge(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
  boxes = pieces(2, 3)
  run = lambda: diff_bounds_sparse(merged.f_graph, merged.fq_graph, boxes, f_crown=False, outputs=[0], fused=True)
  ref = run()
  fused.wait()

  def refuses(*args):
    raise TypeError("arguments of another structure")

  for key in own_programs:
    own_programs[key] = refuses
  out = run()
  assert all(p is fused._FAILED for p in own_programs.values())
  for a, b in zip(out.d[merged.f_graph.output], ref.d[merged.f_graph.output]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_branch_and_bound_on_a_large_close_copy_proves_the_same_with_programs(own_programs):
  """Above SMALL_NET_NEURONS, after the programs compiled, an epsilon proof takes the same pieces'
  bounds: the same verdict, and sound at sampled points."""
  f, fq, _, _ = H.random_pair(4, (3, (140, 140), 2), noise=1e-3)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert bab_machine.FUSED_WALKS
  run = lambda: bab.branch_and_bound(merged, box, time_budget=60, epsilon=0.05, max_pieces=400)
  first = run()
  fused.wait()
  calls = counting(own_programs)
  second = run()
  assert calls["n"] > 0
  assert first.stopped == second.stopped
  assert second.upper == pytest.approx(first.upper, rel=1e-4, abs=1e-6)
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.abs(values).max() <= second.upper + 1e-9


def test_batches_sharded_over_several_devices_keep_the_steps():
  one, eight = (types.SimpleNamespace(devices=np.empty(k)) for k in (1, 8))
  assert bab_machine.use_programs(False, None) and bab_machine.use_programs(False, one)
  assert not bab_machine.use_programs(False, eight) and not bab_machine.use_programs(True, None)


def test_the_end_of_batch_check_by_its_program_counts_as_the_host_does(own_programs):
  """The check of every node's bounds (qbound.bounds.guards) by a program of its own once compiled:
  the same counts, and an inverted or NaN interval is still raised for, naming its node."""
  from qbound.bounds import guards
  from qbound.errors import BoundOverflowError, InvalidBoundsError

  f, fq, _, _ = H.random_pair(6, (3, (16, 16), 2), noise=1e-2)
  merged = qb.merge(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
  out = diff_bounds_sparse(merged.f_graph, merged.fq_graph, pieces(3, 3), f_crown=False, fused=True)
  groups = [("f", merged.f_graph, out.z), ("d = f - f_q", merged.f_graph, out.d)]
  host = guards.host_counts(groups, sound=True)
  np.testing.assert_array_equal(np.asarray(fused.bound_counts(groups, sound=True)), host)  # (host, not compiled)
  fused.wait()
  assert any(key[0] == "counts" and p not in (None, fused._FAILED) for key, p in own_programs.items())
  np.testing.assert_array_equal(np.asarray(fused.bound_counts(groups, sound=True)), host)
  node = merged.f_graph.output
  lo, hi = out.z[node]
  for bad, error in ((lo.at[1, 0].set(hi[1, 0] + 1.0), InvalidBoundsError), (lo.at[0, 1].set(jnp.nan), BoundOverflowError)):
    broken = list(out.z)
    broken[node] = (bad, hi)
    with pytest.raises(error, match=f"node {node}"):
      guards.check_bounds([("f", merged.f_graph, broken)], sound=True, counter=fused.bound_counts)


def test_a_copy_close_by_its_weights_skips_the_root_measure_and_proves_the_same(monkeypatch):
  """A float16-like copy of a large net is known as close before the root's batch (no f CROWN rows
  and no widening measured there); a 4-bit copy, or one that rounds its activations, is not. Either
  way branch and bound proves the same epsilon, and its upper bound holds at sampled points."""
  from qbound.bounds import bab_batch

  f, fq, params, _ = H.random_pair(4, (3, (140, 140), 2), noise=1e-4)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert bab_batch.close_by_weights(merged.f_graph, merged.fq_graph)
  _, f4, _, _ = H.random_pair(4, (3, (140, 140), 2), bits=4)
  assert not bab_batch.close_by_weights(merged.f_graph, qb.merge(f, f4, box).fq_graph)
  rounds = qb.merge(f, lambda x: f(jnp.round(x * 64) / 64), box)
  assert not bab_batch.close_by_weights(rounds.f_graph, rounds.fq_graph)

  measured = []
  real = bab_batch.widening_of
  monkeypatch.setattr(bab_batch, "widening_of", lambda *a: measured.append(1) or real(*a))
  run = lambda: bab.branch_and_bound(merged, box, time_budget=60, epsilon=0.05, max_pieces=400)
  by_weights = run()
  assert not measured
  monkeypatch.setattr(bab_batch, "CLOSE_WEIGHTS", 0.0)
  by_measure = run()
  assert measured
  assert by_weights.stopped == by_measure.stopped == "proved" and by_weights.upper <= 0.05
  values = H.eval64(merged, H.sample_points(box, 2000))
  assert np.abs(values).max() <= by_weights.upper + 1e-9


@pytest.mark.parametrize("sound", [True, False])
def test_row_counts_taken_ahead_give_the_bounds_read_as_usual(own_programs, sound):
  """With ``row_sizes`` (branch and bound's earlier batches) the row indices come from the device
  for sizes fixed in advance; sizes too small for some box make the pass run again with the sizes
  it needed, so the bounds are those of the usual pass, whatever the sizes given."""
  from qbound.bounds import sparse

  f, fq, _, _ = H.random_pair(7, (3, (24, 24), 2), noise=3e-2)
  merged = qb.merge(f, fq, qb.Box(-jnp.ones(3), jnp.ones(3)))
  fg, qg = merged.f_graph, merged.fq_graph
  boxes = pieces(4, 3, count=6, width=0.8)
  run = lambda sizes: diff_bounds_sparse(fg, qg, boxes, sound=sound, f_crown=True, outputs=[0, 1], coefficients=True,
                                         row_sizes=sizes)
  usual = run(None)
  sizes: dict = {}
  recorded = run(sizes)  # (nothing known yet: counts read and recorded)
  assert sizes and all(0 <= v <= 24 for v in sizes.values()) and any(v > 0 for v in sizes.values())
  cases = lambda: [dict(sizes), {key: 0 for key in sizes}, {key: 1000 for key in sizes}]  # noqa: E731
  for given in cases() + [None] + cases():  # host indices, then (after wait) their programs
    if given is None:
      fused.wait()
      assert any(key[0] == "rows" and p not in (None, fused._FAILED) for key, p in own_programs.items())
      continue
    before = sparse.PASSES_AGAIN[0]
    ahead = run(given)
    if all(v == 0 for v in given.values()):
      assert sparse.PASSES_AGAIN[0] > before  # too small: the pass ran again
    assert given == sizes  # (the sizes it needed, recorded)
    for out in (recorded, ahead):
      for mine, ref in zip(out.d + out.z + out.zq, usual.d + usual.z + usual.zq):
        for a, b in zip(mine, ref):
          np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.asarray(out.coefficients), np.asarray(usual.coefficients), rtol=1e-5, atol=1e-6)
