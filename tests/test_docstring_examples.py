"""Every module's docstring examples run and print what they say (the style guide asks each public
function for a runnable example; an example that no longer runs is a wrong piece of documentation).

Modules whose examples other test modules already run (with their own options) are left to those.
"""

import doctest
import importlib
import pkgutil

import pytest

import qbound

# Run by their own test modules (see `grep testmod tests/`; tests/test_quantize_doctests.py runs qbound.quantize).
TESTED_ELSEWHERE = {"qbound.certified_training", "qbound.compression", "qbound.models", "qbound.piecewise",
                    "qbound.serialize", "qbound.bounds.smooth", "qbound.validate", "qbound.quantize.activations",
                    "qbound.quantize.qat", "qbound.io.onnx_export", "qbound.io.vnnlib_reader", "qbound.exact.grid",
                    "qbound.exact.forms", "qbound.exact.cell_bounds"}


def _modules():
  names = [info.name for info in pkgutil.walk_packages(qbound.__path__, "qbound.")]
  return sorted(n for n in names if n not in TESTED_ELSEWHERE and n.split(".")[:2] != ["qbound", "quantize"]
                and not n.endswith("__main__"))


# Examples that certify or branch and bound, 2-21 s each on two loaded cores: run with `-m slow`.
SLOW = {"qbound.batch", "qbound.bounds.bab", "qbound.bounds.alpha", "qbound.demo", "qbound.bounds.forward_bab",
        "qbound.bounds.diff", "qbound.certify", "qbound.props.agreement", "qbound.certificate", "qbound.bounds.forward",
        "qbound.attack"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in _modules()])
def test_examples_run(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed"


def test_slow_list_names_modules():
  assert SLOW <= set(_modules()) and TESTED_ELSEWHERE <= {info.name for info in pkgutil.walk_packages(qbound.__path__, "qbound.")}
