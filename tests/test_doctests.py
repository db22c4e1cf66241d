"""Every example in a docstring of mpqc, mpqc.passes and mpqc.targets runs and prints what it says (two had rotted
unnoticed: a clipping example that did not clip, a usage sketch run as an example)."""
from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import mpqc
import mpqc.passes
import mpqc.targets


def _modules_with_examples() -> list[str]:
    """Every module of the three packages whose source holds an example (``>>>``); the subpackages ``passes`` and
    ``targets`` install as ``mpqc.passes`` / ``mpqc.targets`` from their own directories, so each is walked."""
    names = set()
    for package in (mpqc, mpqc.passes, mpqc.targets):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            spec = importlib.util.find_spec(info.name)
            origin = Path(spec.origin) if spec is not None and spec.origin else None
            if origin is not None and origin.suffix == ".py" and ">>>" in origin.read_text(encoding="utf-8"):
                names.add(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_the_modules_with_examples_are_found():
    assert {"mpqc.quantizers.calibration", "mpqc.pipeline", "mpqc.ops.lookup"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed (run pytest -s)"
