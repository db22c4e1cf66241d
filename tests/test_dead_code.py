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


class WindowMask(nn.Module):
    """A mask built in place as Swin builds its shifted-window mask: ``new_zeros``, then slices filled; nothing
    reads the fills' results (the value lives in the base tensor), and the mask is a constant of the program.
    (Added to the scores without Swin's softmax: ``passes/constant_masks.py`` would make a softmax's 0/-100 mask a
    keep mask, tests/test_constant_masks.py; here the added constant itself is under test.)"""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        mask = x.new_zeros((4, 4))
        mask[:2, 2:] = -100.0
        mask[2:, :2] = -100.0
        return self.proj(x) + mask


def test_in_place_writes_stay_and_a_constant_computed_from_them_holds_them():
    from mpqc.ops.constants import constant_value, is_constant, mutates

    model, x = WindowMask().eval(), torch.randn(2, 4, 4)
    gm, _ = pipeline.trace(model, (x,))  # through capture, canonicalize (dead code erased) and the rest
    writes = [node for node in gm.graph.nodes if mutates(node)]
    assert len(writes) == 2 and all(not node.users for node in writes)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    add = next(node for node in gm.graph.nodes if node.op == "call_function" and node.target in
               (torch.add, torch.ops.aten.add.Tensor) or (node.op == "call_function" and "add" in str(node.target)))
    mask = next(arg for arg in add.args if isinstance(arg, fx.Node) and is_constant(gm, arg))
    expected = torch.zeros(4, 4)
    expected[:2, 2:] = expected[2:, :2] = -100.0
    assert torch.equal(constant_value(gm, mask), expected)


def test_a_constant_read_by_a_chain_deeper_than_the_recursion_limit_has_its_value():
    """A constant whose reader starts a chain of thousands of nodes, each the next one's first argument (MaxViT-T's
    residual stream), is computed: telling in-place writes from readers once recursed along the chain."""
    from mpqc.ops.constants import constant_value

    graph = fx.Graph()
    x, table = graph.placeholder("x"), graph.get_attr("table")
    value = scaled = graph.call_function(torch.mul, (table, 2.0))
    for _ in range(3000):
        value = graph.call_function(torch.add, (value, x))
    graph.output(value)
    root = nn.Module()
    root.register_buffer("table", torch.arange(4.0))
    gm = fx.GraphModule(root, graph)
    assert torch.equal(constant_value(gm, table), torch.arange(4.0))
    assert torch.equal(constant_value(gm, scaled), torch.arange(4.0) * 2)
