"""Shared pytest configuration: hypothesis profiles and the test helpers on the path."""

import os
import sys

# XLA's CPU fusion emitters take minutes to compile the long elementwise chains of sound-mode bound
# propagation (e.g. 123 s against 15 s for the differential bounds of a 20-node net, run time
# 0.6 against 0.8 ms): the test suite compiles far more than it runs, so it uses the older emitters.
# Set before JAX creates its CPU backend, which reads XLA_FLAGS once.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()

# The suite is hermetic: no persistent compilation cache carried between runs (import qbound turns
# one on by default; tests/test_compilation_cache.py checks that in fresh processes).
os.environ.setdefault("QBOUND_JAX_CACHE", "0")

import jax
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from every test module

# A crashed worker's test is re-run once and the run cannot hang (see xdist_recovery.py).
from xdist_recovery import pytest_sessionfinish, pytest_xdist_make_scheduler  # noqa: E402, F401

# Few, reproducible examples by default (the whole suite must stay within a few minutes on two
# cores); `pytest --hypothesis-profile=thorough` runs many more.
settings.register_profile("default", max_examples=15, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def strict_promotion():
  """Runs a test with strict dtype promotion, so no silent float64/int promotion hides in the code.

  Not used around :func:`qbound.attack.maximize_error` and :func:`qbound.certify`: optax's
  schedules mix an int32 step count with Python floats, which strict promotion rejects.
  """
  with jax.numpy_dtype_promotion("strict"):
    yield


# Heavier integration checks whose code other default tests cover, run with `-m slow` (and by the
# benchmarks) rather than in the default suite, which must stay within CI's 15 minutes on two cores:
# after this session's merges it took 14:25 in a fresh clone. Measured seconds (one worker, idle) in
# each comment; every one of them passes with `pytest -m slow`.
SLOW_IN_DEFAULT_RUN = {
    "tests/test_fixed_point_qnn.py::test_digits_certificates_enclose_reached_errors[1500]",  # 16; 1502 stays
    "tests/test_certified_training.py::test_docstring_examples[qbound.certified_training]",  # 19
    "tests/test_certified_training.py::test_error_bound_is_the_certified_bound_and_has_gradients",  # 13
    "tests/test_compression.py::test_plan_meets_the_budget_and_beats_uniform",  # 14
    "tests/test_experiments.py::test_top1_agreement",  # 14 (the notebook below reruns its smoke)
    "tests/test_experiments.py::test_notebook_runs[top1_agreement]",
    "tests/test_experiments.py::test_certified_compression",  # 18
    "tests/test_experiments.py::test_notebook_runs[certified_compression]",
    "tests/test_experiments.py::test_notebook_runs[resiliency]",  # 15
    "tests/test_experiments.py::test_notebook_runs[scaling]",  # 13
    "tests/test_memory.py::test_estimate_bounds_what_xla_allocates",  # 13
    "tests/test_zonotope.py::test_large_weight_differences_on_a_deeper_net",  # 10
    "tests/test_bab.py::test_close_copy_of_a_larger_net_is_bounded_sparsely_and_soundly",  # 11
    "tests/test_props.py::test_verdicts_hold_against_sampling",  # 21
    "tests/test_props.py::test_max_error_goes_through_certify",  # 10
    "tests/test_cli_verify.py::test_epsilon_on_nnet_files",  # 11; the tiny-box JSON test stays
    "tests/test_models.py::test_linen_residual_tanh_maxpool_cnn_is_certified_soundly[0]",  # 10
}


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.nodeid in SLOW_IN_DEFAULT_RUN:
      item.add_marker(pytest.mark.slow)
