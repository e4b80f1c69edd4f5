"""XLA options of the per-node steps: with ``common.SMALL_NETS_AT_LEVEL_1`` (opt-in), small nets'
steps compile at optimisation level 1 (``common.SMALL_NET_STEP_COMPILE``), chosen per thread by
``common.step_compile``."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers as H
import qbound as qb
from qbound.bounds import bab, common


def _options_seen(monkeypatch, run):
  """Runs ``run()`` and returns the options ``current_step_compile`` gave to the steps it dispatched."""
  seen = []
  original = common.current_step_compile

  def spy():
    options = original()
    seen.append(options)
    return options

  monkeypatch.setattr(common, "current_step_compile", spy)
  run()
  return seen


def test_step_compile_is_scoped_to_its_block_and_thread():
  """The options hold inside the block, in its thread only, and are put back after it (also when
  the block raises); None changes nothing."""
  options = {"xla_backend_optimization_level": 1}
  other = []
  with common.step_compile(options):
    assert common.current_step_compile() is options
    thread = threading.Thread(target=lambda: other.append(common.current_step_compile()))
    thread.start()
    thread.join()
    with common.step_compile(None):
      assert common.current_step_compile() is options
  assert other == [common.STEP_COMPILE]
  assert common.current_step_compile() is common.STEP_COMPILE
  try:
    with common.step_compile(options):
      raise KeyError("inside")
  except KeyError:
    pass
  assert common.current_step_compile() is common.STEP_COMPILE


@pytest.mark.slow  # an opt-in (common.SMALL_NETS_AT_LEVEL_1): its branch and bound runs, 10 s, with the slow tests
def test_small_nets_compile_their_steps_at_level_1_and_larger_ones_at_the_default(monkeypatch):
  """With SMALL_NETS_AT_LEVEL_1, branch_and_bound and certify on a small net dispatch their steps
  with SMALL_NET_STEP_COMPILE; with the small-net threshold below the net's size, or without it (the
  default), with STEP_COMPILE."""
  f, fq, _, _ = H.random_pair(0, (3, (8, 8), 2), bits=4)
  box = qb.Box(-jnp.ones(3), jnp.ones(3))
  merged = qb.merge(f, fq, box)
  assert bab.small_net_steps(merged) is None  # opt-in
  monkeypatch.setattr(common, "SMALL_NETS_AT_LEVEL_1", True)
  assert bab.small_net_steps(merged) is common.SMALL_NET_STEP_COMPILE
  assert bab.small_net_steps("not a merged network") is None  # validated later, with its own error
  run_bab = lambda: bab.branch_and_bound(merged, box, time_budget=0.5)  # noqa: E731
  seen = _options_seen(monkeypatch, run_bab)
  assert seen and all(options is common.SMALL_NET_STEP_COMPILE for options in seen)
  seen = _options_seen(monkeypatch, lambda: qb.certify(f, fq, box, method="bab", time_budget=1.0))
  assert common.SMALL_NET_STEP_COMPILE in [s for s in seen]
  monkeypatch.setattr(bab, "SMALL_NET_NEURONS", 4)  # the 16 ReLUs of each net: not small now
  assert bab.small_net_steps(merged) is None
  seen = _options_seen(monkeypatch, run_bab)
  assert seen and all(options is common.STEP_COMPILE for options in seen)


@pytest.mark.slow  # (as above)
def test_small_net_steps_stay_sound_against_samples(monkeypatch):
  """Bounds computed by the level-1 steps (branch and bound on a small net, float-sound mode) hold at
  sampled inputs evaluated in float64: level 1 may contract a product into an addition (one rounding
  fewer), which the proven margins cover."""
  monkeypatch.setattr(common, "SMALL_NETS_AT_LEVEL_1", True)
  f, fq, _, _ = H.random_pair(3, (4, (12, 12), 3), bits=3, init_scale=2.0)
  box = qb.Box(-jnp.ones(4), jnp.ones(4))
  merged = qb.merge(f, fq, box)
  assert bab.small_net_steps(merged) is common.SMALL_NET_STEP_COMPILE
  res = bab.branch_and_bound(merged, box, time_budget=2.0, target_gap=0.0)
  xs = jax.random.uniform(jax.random.key(1), (20000, 4), minval=-1.0, maxval=1.0)
  with jax.enable_x64(True):
    from qbound import attack

    errors = np.abs(attack.exact_errors(merged.graph, np.asarray(xs)))
  assert errors.max() <= res.upper
  assert res.lower <= res.upper
