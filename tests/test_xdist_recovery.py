"""The test runner survives a crashed worker: the crash is re-run once, nothing hangs, nothing is lost."""

import os
import pathlib
import subprocess
import sys
import textwrap

HERE = pathlib.Path(__file__).parent

CRASH_ONCE = """
import ctypes, pathlib
def test_before(): pass
def test_crashes_once():
  marker = pathlib.Path(__file__).with_suffix('.crashed')
  if not marker.exists():
    marker.write_text('')
    ctypes.string_at(0)  # a segfault, as XLA's compiler gives now and then
def test_after(): pass
"""

CRASH_ALWAYS = """
import ctypes
def test_crashes_always(): ctypes.string_at(0)
def test_fails(): assert False, 'an ordinary failure'
def test_passes(): pass
"""


# The crash also adds a test file, as when a test file is edited while the suite runs: the
# replacement worker collects a different set of tests, which xdist refuses to schedule on.
CRASH_AND_EDIT = """
import ctypes, pathlib
def test_before(): pass
def test_crashes_and_adds_a_file():
  added = pathlib.Path(__file__).with_name('test_added.py')
  if not added.exists():
    added.write_text('def test_new(): pass')
    ctypes.string_at(0)
def test_after(): pass
"""


def run(tmp_path, *args, crash_always=True, once=CRASH_ONCE):
  for i in range(3):
    (tmp_path / f"test_once_{i}.py").write_text(textwrap.dedent(once))
  if crash_always:
    (tmp_path / "test_zz_always.py").write_text(textwrap.dedent(CRASH_ALWAYS))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "xdist_recovery", "-rfE",
       "--rootdir", str(tmp_path), "-c", os.devnull, "-n", "2", "--dist", "loadfile", "--reruns", "1",
       "--only-rerun", "crashed while running", *args, str(tmp_path)],
      cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


def test_crashed_tests_rerun_once_and_the_run_ends(tmp_path):
  proc = run(tmp_path)
  summary = proc.stdout.strip().splitlines()[-1]
  # Three crash-once tests pass on their re-run; the always-crashing one fails after one re-run;
  # the ordinary failure is not re-run; every other test ran.
  assert "2 failed, 10 passed, 4 rerun" in summary, proc.stdout[-3000:]
  assert "test_crashes_always - worker" in proc.stdout and "test_fails - AssertionError" in proc.stdout
  assert proc.returncode == 1


def test_tests_left_by_exhausted_restarts_fail_the_run(tmp_path):
  # Three crashes, one restart allowed: the last crash is reported as a re-run that never happens,
  # nothing failed, and xdist alone would exit 0.
  proc = run(tmp_path, "--max-worker-restart", "1", crash_always=False)
  assert "failed" not in proc.stdout.strip().splitlines()[-1], proc.stdout[-3000:]
  assert "some tests never ran" in proc.stdout, proc.stdout[-3000:]
  assert proc.returncode == 1


def test_a_replacement_that_collects_other_tests_ends_the_run(tmp_path):
  # Before: the replacement waited for work forever and the run hung (the subprocess timed out).
  proc = run(tmp_path, crash_always=False, once=CRASH_AND_EDIT)
  assert proc.returncode != 0, proc.stdout[-3000:]
