"""MkDocs hook: puts files that live outside docs/ into the site, so that nothing is copied by hand.

* ``notebooks/*.ipynb`` become pages under ``notebooks/`` (rendered by mkdocs-jupyter, which runs
  them at build time: they only read ``results/`` and plot, a few seconds in all);
* the figures and tables of ``results/`` (``*.png``, ``*.csv``, not the smoke runs) are published
  under ``results/``.

Pages link to both as the repository lays them out (``../../results/bench_differing/pieces.csv``
from ``docs/results/pruned-pairs.md``), so the links also work when the Markdown is read on GitHub;
this hook drops the one ``../`` that leaves ``docs/`` before MkDocs checks and renders them.
``on_files`` runs before mkdocs-jupyter's own, which must see the notebooks to render them.
"""

from __future__ import annotations

import pathlib
import re

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parents[2]
PUBLISHED = {"notebooks": ("*.ipynb",), "results": ("*.png", "*.csv")}


@event_priority(100)  # before mkdocs-jupyter (default priority 0)
def on_files(files: Files, config) -> Files:
  for folder, patterns in PUBLISHED.items():
    for pattern in patterns:
      for path in sorted((ROOT / folder).rglob(pattern)):
        rel = path.relative_to(ROOT)
        if "smoke" in rel.parts:
          continue
        files.append(File(rel.as_posix(), src_dir=str(ROOT), dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
  return files


def on_page_markdown(markdown: str, page, config, files) -> str:
  depth = page.file.src_uri.count("/")
  up = "../" * (depth + 1)
  pattern = re.compile(r"(\]\(|\]: |src=\")" + re.escape(up) + "(" + "|".join(PUBLISHED) + ")/")
  return pattern.sub(lambda m: m.group(1) + "../" * depth + m.group(2) + "/", markdown)
