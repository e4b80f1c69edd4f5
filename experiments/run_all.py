"""Runs every experiment, then executes every notebook headless (nbclient, kernel python3).

    python experiments/run_all.py --smoke             # CI: all experiments in smoke mode + notebooks
    python experiments/run_all.py                     # full runs, one after the other (long)
    python experiments/run_all.py --smoke --only random_nets scaling
    python experiments/run_all.py --notebooks-only    # re-execute the notebooks on existing results

Experiments are the scripts in experiments/ with a ``main(argv)`` and a ``--smoke`` flag (all but
this runner and ``common.py``); each runs in its own process, one at a time, so a crash or a
compile cache of one cannot affect the next. The notebooks are rebuilt from
``notebooks/build_notebooks.py``, then executed in ``notebooks/`` (they read ``results/``, the smoke
results when the full ones are absent); executed copies go to ``results/[smoke/]notebooks/``.
Exits non-zero if anything failed, after running the rest.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
NOT_EXPERIMENTS = {"common", "run_all"}


def experiments() -> list[str]:
  """Scripts in experiments/ that define ``main`` and take ``--smoke``."""
  names = []
  for path in sorted(HERE.glob("*.py")):
    text = path.read_text()
    if path.stem not in NOT_EXPERIMENTS and "def main(" in text and "--smoke" in text:
      names.append(path.stem)
  return names


def run_experiment(name: str, smoke: bool, out_root: pathlib.Path | None) -> tuple[bool, float]:
  cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--smoke"] if smoke else [])
  if out_root is not None and name != "train_digits_model":
    cmd += ["--out", str(out_root / ("smoke" if smoke else "") / name)]
  print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
  start = time.perf_counter()
  ok = subprocess.run(cmd, cwd=ROOT).returncode == 0
  return ok, time.perf_counter() - start


def notebooks() -> list[pathlib.Path]:
  return sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute_notebook(path: pathlib.Path, save_dir: pathlib.Path | None, timeout: int = 600) -> tuple[bool, float, str]:
  """Executes a notebook with the venv's python3 kernel; ``(ok, seconds, error)``."""
  import nbformat
  from nbclient import NotebookClient

  start = time.perf_counter()
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
  try:
    client.execute()
    ok, err = True, ""
  except Exception as exc:  # CellExecutionError carries the cell's traceback
    ok, err = False, str(exc)[-2000:]
  if save_dir is not None:
    save_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, save_dir / path.name)
  return ok, time.perf_counter() - start, err


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="smoke mode (seconds per experiment)")
  p.add_argument("--only", nargs="*", default=None, help="experiment names to run (default: all)")
  p.add_argument("--notebooks-only", action="store_true", help="skip the experiments")
  p.add_argument("--no-notebooks", action="store_true", help="skip the notebooks")
  p.add_argument("--results", type=pathlib.Path, default=None,
                 help="results root to write to and read from (default: results/; sets QBOUND_RESULTS)")
  args = p.parse_args(argv)

  if args.results is not None:
    os.environ["QBOUND_RESULTS"] = str(args.results.resolve())
  results = args.results.resolve() if args.results is not None else ROOT / "results"
  report = []
  if not args.notebooks_only:
    for name in args.only or experiments():
      ok, seconds = run_experiment(name, args.smoke, args.results.resolve() if args.results else None)
      report.append(("experiment", name, ok, seconds, ""))
  if not args.no_notebooks:
    subprocess.run([sys.executable, str(ROOT / "notebooks" / "build_notebooks.py")], cwd=ROOT, check=True)
    save = results / ("smoke" if args.smoke else "") / "notebooks"
    for path in notebooks():
      print(f"\n=== notebook {path.name}", flush=True)
      ok, seconds, err = execute_notebook(path, save)
      if err:
        print(err)
      report.append(("notebook", path.stem, ok, seconds, err))

  print("\nsummary")
  for kind, name, ok, seconds, _ in report:
    print(f"  {kind:<10} {name:<22} {'ok  ' if ok else 'FAIL'} {seconds:7.1f} s")
  failed = [r for r in report if not r[2]]
  if failed:
    print(f"{len(failed)} failed: {', '.join(r[1] for r in failed)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
