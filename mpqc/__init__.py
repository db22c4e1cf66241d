"""mpqc: a mixed-precision quantization compiler for PyTorch.

>>> import mpqc
>>> result = mpqc.compile(model, example_inputs, budget=mpqc.WeightMemory(kib=20),   # doctest: +SKIP
...                       data=(train_loader, val_loader), method="dq")
>>> result.save("runs/r20")                                                          # doctest: +SKIP
"""
from mpqc.budgets import ActivationMemory, AverageBits, BitOps, Budget, TargetCost, WeightMemory, parse_budget
from mpqc.compile import CompiledModel, compile
from mpqc.config import CompileConfig, QuantizerConfig, TrainConfig
from mpqc.errors import MpqcError
from mpqc.quantizers import METHODS, BitRange
from mpqc.reference import IntegerProgram
from mpqc.sweep import SweepResult, sweep

__all__ = [
    "ActivationMemory", "AverageBits", "BitOps", "BitRange", "Budget", "CompileConfig", "CompiledModel",
    "IntegerProgram", "METHODS", "MpqcError", "QuantizerConfig", "TargetCost", "TrainConfig", "WeightMemory", "compile",
    "parse_budget", "sweep", "SweepResult",
]
