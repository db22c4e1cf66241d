"""passes/dead_code.py: values nothing reads are erased, modules included (a pretrained model's pooler that the
wrapper around it does not return), so no quantizer, layer or budget share is spent on them."""
from __future__ import annotations

import torch
from torch import fx, nn

from mpqc import pipeline
from mpqc.budgets import AverageBits, LayerBits
from mpqc.passes.dead_code import SHAPE_GUARD, erase_dead_code


class WithPooler(nn.Module):
    """Returns the token states; computes a pooled output from a linear layer nobody reads (as HF's BertPooler)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.pooler = nn.Linear(8, 8)

    def forward(self, x):
        states = torch.relu(self.body(x))
        torch.tanh(self.pooler(states[:, 0]))  # dead
        return states


def test_unused_module_calls_are_erased_and_outputs_unchanged():
    model, x = WithPooler().eval(), torch.randn(2, 3, 8)
    gm = fx.symbolic_trace(model)
    assert any(node.op == "call_module" and node.target == "pooler" for node in gm.graph.nodes)
    gm = erase_dead_code(gm)
    assert [node.target for node in gm.graph.nodes if node.op == "call_module"] == ["body"]
    assert torch.equal(gm(x), model(x))
    assert "pooler.weight" in gm.state_dict()  # the parameters stay: a state dict of the model still loads


def test_no_layer_of_a_dead_module_reaches_the_budget():
    gm, layers = pipeline.trace(WithPooler().eval(), (torch.randn(2, 3, 8),))
    assert [layer.name for layer in layers] == ["body"]
    bits = {"body": LayerBits(torch.tensor(4.0), torch.tensor(8.0))}
    assert float(AverageBits(4.0).cost(layers, bits)) == 4.0


def test_the_export_shape_guard_stays():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.call_module(SHAPE_GUARD, (x,))
    graph.output(x)
    root = nn.Module()
    root.add_module(SHAPE_GUARD, nn.Identity())
    gm = erase_dead_code(fx.GraphModule(root, graph))
    assert [node.target for node in gm.graph.nodes if node.op == "call_module"] == [SHAPE_GUARD]
