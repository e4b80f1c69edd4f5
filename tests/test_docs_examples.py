"""The python blocks of the README and the docs pages run as written.

Each page's blocks run in order in one namespace that starts from the README's quickstart (its
first block: a 5-64-64-3 MLP ``model``, ``params``, ``f``, ``fq`` and ``box``), which the pages
take as given. To keep this cheap, the time budgets the blocks ask for are capped (``certify``,
``branch_and_bound``, ``props.verify``, the MILP) and a retraining's ``steps=1000`` runs 2 steps; the
bounds themselves are checked elsewhere. docs/quant-libraries.md has its own test
(``test_docs_quant_libraries.py``); the results pages hold no code to run.
"""

import functools
import pathlib

import pytest

import helpers as H
import qbound as qb

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/getting-started.md", "docs/concepts/merged-network.md",
         "docs/concepts/batch.md", "docs/methods/interval.md", "docs/methods/crown.md", "docs/methods/alpha.md",
         "docs/methods/diff.md", "docs/methods/forward.md", "docs/methods/zonotope.md", "docs/methods/bab.md",
         "docs/methods/milp.md", "docs/properties.md", "docs/export.md", "docs/quantizers.md",
         "docs/compression.md"]
CAP_SECONDS = 1.0
# What each page's blocks are allowed to shorten (text replaced before they run).
SHORTER = {"docs/compression.md": [("steps=1000", "steps=2")]}


def blocks(page: str) -> list[str]:
  return H.python_blocks(ROOT / page)


def test_every_page_with_code_is_run_here():
  pages = sorted(str(p.relative_to(ROOT)) for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
                 if blocks(str(p.relative_to(ROOT))))
  unlisted = set(pages) - set(PAGES) - {"docs/quant-libraries.md"}
  assert not unlisted, f"pages with python blocks this test does not run: {sorted(unlisted)}; add them to PAGES"


def _capped(fn, name, cap):
  @functools.wraps(fn)
  def run(*args, **kwargs):
    kwargs[name] = min(kwargs.get(name, cap), cap)
    return fn(*args, **kwargs)
  return run


# The compression page searches bit widths and retrains: 14 s here, so it runs with the slow tests.
SLOW_PAGES = {"docs/compression.md"}


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in PAGES])
def test_page_blocks_run(page, monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)  # files the blocks write (ONNX, VNN-LIB) land here
  monkeypatch.setattr(qb, "certify", _capped(qb.certify, "time_budget", CAP_SECONDS))
  monkeypatch.setattr(qb.props, "verify", _capped(qb.props.verify, "time_budget", CAP_SECONDS))
  monkeypatch.setattr(qb.bounds, "branch_and_bound", _capped(qb.bounds.branch_and_bound, "time_budget", CAP_SECONDS))
  monkeypatch.setattr(qb.exact, "milp", _capped(qb.exact.milp, "time_limit", CAP_SECONDS))
  namespace: dict = {}
  exec(blocks("README.md")[0], namespace)
  assert "box" in namespace, "the README's quickstart defines the box the other blocks and pages use"
  codes = blocks(page)
  assert codes, f"{page} has no python block"
  for index, code in enumerate(codes):
    for old, new in SHORTER.get(page, []):
      code = code.replace(old, new)
    try:
      exec(compile(code, f"{page} block {index}", "exec"), namespace)
    except Exception as err:  # noqa: BLE001 - said with the page and block
      raise AssertionError(f"{page}, python block {index} failed: {type(err).__name__}: {err}") from err
