"""mpqc: a mixed-precision quantization compiler for PyTorch.

>>> import mpqc
>>> result = mpqc.compile(model, example_inputs, budget=mpqc.WeightMemory(kib=20),   # doctest: +SKIP
...                       data=(train_loader, val_loader), method="dq")
>>> result.save("runs/r20")                                                          # doctest: +SKIP

The names below load on first use (PEP 562), so ``import mpqc.passes.X`` or ``mpqc.targets.X`` does not import
the compiler, the sweep or matplotlib.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

_EXPORTS = {
    "ActivationMemory": "mpqc.budgets", "AverageBits": "mpqc.budgets", "BitOps": "mpqc.budgets",
    "Budget": "mpqc.budgets", "Latency": "mpqc.budgets", "TargetCost": "mpqc.budgets", "WeightMemory": "mpqc.budgets",
    "parse_budget": "mpqc.budgets",
    "CompiledModel": "mpqc.compile", "compile": "mpqc.compile",
    "CompileConfig": "mpqc.config", "QuantizerConfig": "mpqc.config", "RoundingConfig": "mpqc.config",
    "TrainConfig": "mpqc.config",
    "MpqcError": "mpqc.errors",
    "METHODS": "mpqc.quantizers", "BitRange": "mpqc.quantizers",
    "IntegerProgram": "mpqc.reference",
    "SweepResult": "mpqc.sweep", "sweep": "mpqc.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mpqc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """``mpqc.compile`` and ``mpqc.sweep`` stay the functions when their modules are imported (an import binds the
    submodule on its package; the functions' names are the API)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("compile", "sweep") and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
