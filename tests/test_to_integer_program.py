"""passes/to_integer_program.py: Before/Expected requantisation regions on small programs, and the region the
reference executes equals the contract written out by hand."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import freeze_at_random_bits, quantized_graph, randomize_batchnorm
from mpqc.errors import CheckpointError
from mpqc.ops import IntNode, IntValue
from mpqc.passes.to_integer_program import fuse_requantize, integer_values
from mpqc.quantizers.base import integer_range
from mpqc.reference import IntegerProgram

Q = {"bits": 8, "signed": True, "scale": 0.1}
CONV = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "weight_bits": 4, "module": "c"}
POOL = {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0], "dilation": [1, 1], "ceil_mode": False}


def regions(nodes: list[IntNode]) -> dict[str, dict]:
    return {node.name: node.attrs["region"] for node in fuse_requantize(nodes) if node.op == "quantize"}


def test_residual_add_and_relu_fuse_over_two_integer_leaves():
    before = [IntNode("x", "input", []), IntNode("q0", "quantize", ["x"], dict(Q)),
              IntNode("c1", "conv2d", ["q0"], dict(CONV)), IntNode("c2", "conv2d", ["q0"], dict(CONV)),
              IntNode("a", "add", ["c1", "c2"]), IntNode("r", "relu", ["a"]), IntNode("q1", "quantize", ["r"], dict(Q))]
    assert regions(before) == {"q0": {"steps": [], "leaves": ["x"]},
                               "q1": {"steps": ["a", "r"], "leaves": ["c1", "c2"]}}


def test_ops_that_keep_integers_are_leaves_not_steps():
    before = [IntNode("x", "input", []), IntNode("q0", "quantize", ["x"], dict(Q)),
              IntNode("c", "conv2d", ["q0"], dict(CONV)), IntNode("r", "relu", ["c"]),
              IntNode("m", "max_pool2d", ["r"], dict(POOL)), IntNode("f", "flatten", ["m"], {"start_dim": 1}),
              IntNode("q1", "quantize", ["f"], dict(Q))]
    assert integer_values(before) == {"q0", "c", "r", "m", "f", "q1"}
    assert regions(before)["q1"] == {"steps": [], "leaves": ["f"]}


def test_float_values_fuse_through_clamp_pool_and_flatten():
    before = [IntNode("x", "input", []), IntNode("q0", "quantize", ["x"], dict(Q)),
              IntNode("c", "conv2d", ["q0"], dict(CONV)), IntNode("k", "clamp", ["c"], {"min": 0.0, "max": 6.0}),
              IntNode("m", "max_pool2d", ["k"], dict(POOL)), IntNode("f", "flatten", ["m"], {"start_dim": 1}),
              IntNode("q1", "quantize", ["f"], dict(Q))]
    assert regions(before)["q1"] == {"steps": ["k", "m", "f"], "leaves": ["c"]}


def test_ops_that_do_not_fuse_end_the_region():
    before = [IntNode("x", "input", []), IntNode("q0", "quantize", ["x"], dict(Q)),
              IntNode("c1", "conv2d", ["q0"], dict(CONV)), IntNode("c2", "conv2d", ["q0"], dict(CONV)),
              IntNode("a", "add", ["c1", "c2"]), IntNode("g", "global_avg_pool", ["a"]),
              IntNode("r", "relu", ["g"]), IntNode("q1", "quantize", ["r"], dict(Q))]
    assert regions(before)["q1"] == {"steps": ["r"], "leaves": ["g"]}


def test_a_shared_sub_expression_is_in_each_region():
    before = [IntNode("x", "input", []), IntNode("q0", "quantize", ["x"], dict(Q)),
              IntNode("c1", "conv2d", ["q0"], dict(CONV)), IntNode("c2", "conv2d", ["q0"], dict(CONV)),
              IntNode("a", "add", ["c1", "c2"]), IntNode("q1", "quantize", ["a"], dict(Q)),
              IntNode("r", "relu", ["a"]), IntNode("q2", "quantize", ["r"], {**Q, "scale": 0.2})]
    after = regions(before)
    assert after["q1"] == {"steps": ["a"], "leaves": ["c1", "c2"]}
    assert after["q2"] == {"steps": ["a", "r"], "leaves": ["c1", "c2"]}


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = self.c0(x)
        return self.head(torch.relu(self.c1(y) + self.c2(y)))


def _residual_program(seed: int = 3) -> IntegerProgram:
    torch.manual_seed(0)
    gm, _ = quantized_graph(randomize_batchnorm(_Residual()), torch.randn(4, 2, 8, 8))
    gm, _ = freeze_at_random_bits(gm, seed=seed)
    return IntegerProgram.from_graph(gm)


def test_residual_relu_region():
    """From a real graph: the head's input quantizer fuses relu(add) over the two integer accumulators, and the
    reference's codes are the contract written out by hand."""
    program = _residual_program()
    (quantize,) = [n for n in program.nodes if n.op == "quantize" and program.node(n.inputs[0]).op == "relu"]
    region = quantize.attrs["region"]
    assert [program.node(name).op for name in region["steps"]] == ["add", "relu"]
    assert [program.node(name).op for name in region["leaves"]] == ["conv2d", "conv2d"]

    env = program.run_all(torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1)))
    s_out = float(quantize.attrs["scale"])
    a, b = (env[name] for name in region["leaves"])
    assert isinstance(a, IntValue) and isinstance(b, IntValue)
    y = torch.relu(a.q.float() * (a.scale / s_out).float() + b.q.float() * (b.scale / s_out).float())
    qmin, qmax = integer_range(quantize.attrs["bits"], quantize.attrs["signed"])
    assert torch.equal(env[quantize.name].q, torch.clamp(torch.round(y), qmin, qmax).to(torch.int64))


def test_programs_saved_without_regions_still_load(tmp_path):
    program = _residual_program()
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    program.save(tmp_path)
    structure = json.loads((tmp_path / "program.json").read_text())
    assert structure["format"] == "mpqc-integer-program/2"
    structure["format"] = "mpqc-integer-program/1"
    for node in structure["nodes"]:
        node["attrs"].pop("region", None)
    (tmp_path / "program.json").write_text(json.dumps(structure))
    assert torch.equal(IntegerProgram.load(tmp_path).run(x), program.run(x))
    structure["format"] = "mpqc-integer-program/9"
    (tmp_path / "program.json").write_text(json.dumps(structure))
    with pytest.raises(CheckpointError, match="readable: mpqc-integer-program/1, mpqc-integer-program/2"):
        IntegerProgram.load(tmp_path)
