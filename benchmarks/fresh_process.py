"""A benchmark's ``--child`` run in a fresh process, for first calls and side-by-side checkouts.

A first ``certify`` call pays for every compilation, so benchmarks of first calls run each one in a
new process; comparing two checkouts means importing qbound from each (``PYTHONPATH``). The child
prints one JSON object per line on stdout; this returns them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Mapping, Optional, Sequence


def child_rows(script: str, args: Sequence[str], *, checkout: Optional[str] = None,
               env: Optional[Mapping[str, str]] = None) -> list[dict]:
  """Runs ``python script --child *args`` (qbound imported from ``checkout`` when given) with
  ``env`` (default: this process's) and returns the JSON rows it printed."""
  child_env = dict(os.environ if env is None else env)
  if checkout:
    child_env["PYTHONPATH"] = str(checkout)
  out = subprocess.run([sys.executable, str(script), "--child", *args], env=child_env, capture_output=True,
                       text=True, check=True).stdout
  return [json.loads(line) for line in out.splitlines()]
