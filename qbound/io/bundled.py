"""Files shipped inside the package (qbound/data), for demos and tests that need no checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_path(name: str) -> Path:
  """The path of a file bundled in ``qbound/data``.

  Among them are ACAS Xu network 1_1 and its float16 copy from the NeuroDiff artifact
  (Paulsen et al., ASE 2020; see ``qbound/data/README.md`` for sources and licences).

  Args:
    name: a file name, e.g. ``'ACASXU_run2a_1_1_batch_2000.nnet'`` or
      ``'ACASXU_run2a_1_1_batch_2000_16bit.nnet'``.

  Returns:
    The file's path on disk.

  Raises:
    FileNotFoundError: no such bundled file; the message lists the ones there are.

  Example:
    >>> bundled_path('ACASXU_run2a_1_1_batch_2000.nnet').name
    'ACASXU_run2a_1_1_batch_2000.nnet'
  """
  root = resources.files("qbound") / "data"
  entry = root / name
  if Path(name).name != name or not entry.is_file():
    available = sorted(e.name for e in root.iterdir() if e.is_file()) if root.is_dir() else []
    raise FileNotFoundError(f"no bundled file {name!r} in qbound/data; there are: "
                            f'{", ".join(available) or "none"}')
  if not isinstance(entry, Path):
    # Only a zipped install lands here; readers need a real file.
    raise FileNotFoundError(f"qbound/data/{name} is inside an archive, not on disk; extract it "
                            "with importlib.resources.as_file")
  return entry
