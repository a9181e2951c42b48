"""Every usage example in the package's docstrings runs and prints what it claims."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import engm_fast

# Modules whose import needs an optional package are skipped with the reason, not hidden.
MODULES = sorted(m.name for m in pkgutil.walk_packages(engm_fast.__path__, "engm_fast.") if not m.name.endswith("_C"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if exc.name is None or exc.name.startswith("engm_fast"):
            raise  # our own module failing to import is a failure, not an optional package
        pytest.skip(f"{name} needs the optional package {exc.name!r}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
