"""Packaging habits: licence, changelog, citation, typed package, one version everywhere."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import qbound as qb

ROOT = Path(__file__).resolve().parents[1]


def test_licence_is_apache_2_as_pyproject_says():
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert project["license"] == {"text": "Apache-2.0"}


def test_version_lives_in_one_place():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
  assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "qbound.__version__"}
  assert re.fullmatch(r"\d+\.\d+\.\d+", qb.__version__)
  citation = (ROOT / "CITATION.cff").read_text()
  assert re.search(rf'^version: "{re.escape(qb.__version__)}"$', citation, re.M)
  assert "cff-version: 1.2.0" in citation and "license: Apache-2.0" in citation


def test_build_reads_the_version_without_importing_qbound():
  code = ("import sys, warnings; warnings.simplefilter('ignore'); "
          "from setuptools.config.pyprojecttoml import read_configuration; "
          "print(read_configuration('pyproject.toml', expand=True)['project']['version']); "
          "print('jax' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == [qb.__version__, "False"]


def test_changelog_and_typed_package():
  changelog = (ROOT / "CHANGELOG.md").read_text()
  assert changelog.startswith("# Changelog") and "## [Unreleased]" in changelog
  assert f"## [{qb.__version__}]" in changelog
  assert (ROOT / "qbound" / "py.typed").exists()
  package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
  assert "py.typed" in package_data["qbound"]


def test_entry_point_still_names_main():
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
  assert scripts == {"qbound": "qbound.cli:main"}
  from qbound.cli import main

  assert callable(main)
