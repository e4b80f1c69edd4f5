"""Runs the `>>>` examples in qbound.quantize's docstrings."""

import doctest
import importlib

import pytest

MODULES = ['__init__', 'numerics', 'policy', 'weights', 'ternary', 'compress', 'coding']


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module('qbound.quantize' + ('' if name == '__init__' else f'.{name}'))
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0, f'{name} has no examples'
  assert result.failed == 0
