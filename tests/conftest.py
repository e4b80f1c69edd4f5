"""Shared pytest configuration: hypothesis profiles and the test helpers on the path."""

import os
import sys

# XLA's CPU fusion emitters take minutes to compile the long elementwise chains of sound-mode bound
# propagation (e.g. 123 s against 15 s for the differential bounds of a 20-node net, run time
# 0.6 against 0.8 ms): the test suite compiles far more than it runs, so it uses the older emitters.
# Set before JAX creates its CPU backend, which reads XLA_FLAGS once.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false").strip()
# For the same reason the suite compiles without LLVM's optimisations (XLA's backend level 0, not
# the default 2): most of its programs run once or twice on tiny nets. Fresh-clone .ci/run test
# times: 15:34 at level 2, 10:51-14:22 at level 1, 10:01 at level 0 (load 2.5-3). Level 0 once showed
# that a choice between candidate lines written field by field could mix candidates (each field's
# select fused with its own copy of the comparison): qbound.bounds.choice now makes one choice per
# entry, and test_nonlinear_diff checks it at level 0 in a subprocess whatever this setting.
# Users and the benchmarks get XLA's default. Set XLA_FLAGS with an xla_backend_optimization_level
# of your own to test at another level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# The suite is hermetic: no persistent compilation cache carried between runs (import qbound turns
# one on by default; tests/test_compilation_cache.py checks that in fresh processes, with its own).
# Within one run, though, the test modules compile many of the same small programs (the same helper
# nets, node kinds and batch shapes) in both xdist workers and in the subprocesses of the CLI and
# sharding tests: they share one cache, made here by the process that starts the run (the workers
# inherit the variable) and deleted when it ends. A subset of six heavy modules took 172 s with it
# against 198 s without. Set QBOUND_JAX_CACHE=0 to run without it.
if "QBOUND_JAX_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile

  _run_cache = tempfile.mkdtemp(prefix="qbound-test-jax-cache-")
  os.environ["QBOUND_JAX_CACHE"] = _run_cache
  atexit.register(shutil.rmtree, _run_cache, ignore_errors=True)

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


# The test files that take longest, with their seconds in a full run (2026-12-08, a fresh clone on
# a busy machine: 2,127 s of tests on two workers). xdist's file scheduling hands files out in
# collection order, so these are collected first and the short files fill the end (longest first,
# as in list scheduling): a long file started last would leave the other worker idle while it runs.
# The others follow by their number of tests, as xdist would order them (`--no-loadscope-reorder` in
# pyproject.toml keeps this order).
LONGEST_FILES = {
    "test_soundness_properties": 247, "test_nonlinear": 199, "test_bounds": 149, "test_trace_dynamic": 126,
    "test_trace": 83, "test_cli": 82, "test_quant_libraries": 70, "test_bab": 68, "test_host_bab": 64,
    "test_docstring_examples": 60, "test_docs_examples": 53, "test_sparse": 46, "test_fused": 43,
    "test_certify": 40, "test_nonlinear_diff": 40, "test_experiments": 35, "test_quantize_certified": 34,
    "test_activations": 32, "test_exact_grid": 28, "test_rms_rest": 27, "test_zonotope": 25, "test_exact": 25,
}


def pytest_collection_modifyitems(config, items):
  """Longest test files first (``LONGEST_FILES``), each file's tests in their own order."""
  stem = lambda item: os.path.splitext(os.path.basename(str(item.fspath)))[0]  # noqa: E731
  counts: dict = {}
  for item in items:
    counts[stem(item)] = counts.get(stem(item), 0) + 1
  items.sort(key=lambda item: (-LONGEST_FILES.get(stem(item), 0), -counts[stem(item)], stem(item)))


@pytest.fixture
def strict_promotion():
  """Runs a test with strict dtype promotion, so no silent float64/int promotion hides in the code.

  Not used around :func:`qbound.attack.maximize_error` and :func:`qbound.certify`: optax's
  schedules mix an int32 step count with Python floats, which strict promotion rejects.
  """
  with jax.numpy_dtype_promotion("strict"):
    yield


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_within_the_map_limit():
  """Clears JAX's compilation caches after a test module once its worker holds 65% of the kernel's
  limit on memory maps: every XLA program keeps about nine, and a worker that reached the limit
  (65,530 by default) crashed in XLA's compiler (qbound._map_limit). After a module, not a test:
  the module's tests share its programs (a module compiles at most some 15,000 maps' worth). Below
  the library's own threshold, so its warning never fires inside a test."""
  yield
  from qbound import _map_limit

  _map_limit.release_if_near_limit(0.65, warn=False, min_interval=0.0)  # (whenever certify read last)
