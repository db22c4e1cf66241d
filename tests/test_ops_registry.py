"""The op registry (mpqc/ops/): every op of the integer program has its reference, TVM and ONNX backends and a
numerics test; facts-only ops are refused by the integer program; importing passes and targets stays cheap."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mpqc import ops
from mpqc.ops import OpDef

ROOT = Path(__file__).resolve().parent.parent


def missing(op: OpDef) -> list[str]:
    """What an op of the integer program lacks: a backend, or a numerics test that exists."""
    lacks = [f"{type(op).__name__}: no {method}" for method in ("evaluate", "relax", "onnx")
             if not op.has_backend(method)]
    if op.fuses_into_requantize:
        lacks += [f"{type(op).__name__}: no {method}" for method in ("requantize_step", "relax_requantize_step")
                  if not op.has_backend(method)]
    if not op.numerics_tests:
        lacks.append(f"{type(op).__name__}: no numerics test")
    for test in op.numerics_tests:
        path, _, name = test.partition("::")
        source = ROOT / path
        if not source.exists() or f"def {name}(" not in source.read_text():
            lacks.append(f"{type(op).__name__}: numerics test {test} does not exist")
    return lacks


@pytest.mark.parametrize("op", [op for op in ops.all_ops() if op.names], ids=lambda op: type(op).__name__)
def test_every_program_op_has_every_backend_and_a_numerics_test(op):
    assert missing(op) == []


def test_the_walk_catches_an_op_without_a_backend():
    class Half(OpDef):  # not registered: the check must fail on it
        names = ("half",)

        def evaluate(self, program, node, env):
            return env[node.inputs[0]]

    assert missing(Half()) == ["Half: no relax", "Half: no onnx", "Half: no numerics test"]


def test_program_ops_and_fx_targets_are_claimed_once():
    names = [name for op in ops.all_ops() for name in op.names]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match="already registered"):
        @ops.register_op
        class AnotherReLU(OpDef):
            functions = (torch.relu,)


def test_fx_nodes_find_their_family():
    from torch.fx import symbolic_trace

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act, self.pool = nn.Conv2d(1, 2, 3), nn.ReLU6(), nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            y = self.pool(self.act(self.conv(x))) + torch.relu(x).mean((2, 3), keepdim=True)
            return torch.softmax(y.flatten(1).sigmoid(), 1)

    gm = symbolic_trace(Net())
    families = {node.name: type(ops.op_of(gm, node)).__name__ for node in gm.graph.nodes if node.op != "output"}
    assert families == {"x": "Input", "conv": "Layer", "act": "Clamp", "pool": "GlobalAvgPool", "relu": "ReLU",
                        "mean": "Reduce", "add": "Add", "flatten": "Flatten", "sigmoid": "Lookup",
                        "softmax": "Softmax"}
    nodes = {node.name: node for node in gm.graph.nodes}
    assert ops.is_nonnegative(gm, nodes["act"]) and ops.is_nonnegative(gm, nodes["pool"])
    assert ops.is_nonnegative(gm, nodes["add"]) and not ops.is_nonnegative(gm, nodes["conv"])
    assert ops.keeps_zero(gm, nodes["act"]) and not ops.keeps_zero(gm, nodes["add"])
    assert ops.is_nonnegative(gm, nodes["sigmoid"]) and ops.is_nonnegative(gm, nodes["softmax"])
    with pytest.raises(ops.Unsupported, match="softmax over dim 1 of a value without a traced shape"):
        ops.describe(gm, nodes["softmax"])  # (symbolic_trace records no shapes; capture does)
    with pytest.raises(ops.Unsupported, match="sigmoid needs a frozen activation quantizer on its input"):
        ops.describe(gm, nodes["sigmoid"])


def test_importing_passes_and_targets_does_not_import_the_compiler():
    code = ("import sys, mpqc.passes.capture, mpqc.passes.insert_quantizers, mpqc.passes.prune_channels, "
            "mpqc.passes.to_integer_program, mpqc.targets.tvm, mpqc.ops\n"
            "print(sorted(m for m in ('mpqc.compile', 'mpqc.sweep', 'matplotlib', 'tvm', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
