"""The activations other ops read as codes (a lookup table's input and output, a product's factors) get learnable
bit-widths like a layer's input, and the budgets count them: storage in activation memory, products of two
activations in BitOPs; freezing lowers them to meet a budget."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import quantized_graph, set_bits
from mpqc.budgets import ActivationMemory, BitOps, WeightMemory
from mpqc.layers import ACTIVATION_META, PRODUCT_META, ActivationInfo, ProductInfo
from mpqc.passes.freeze import freeze
from mpqc.passes.insert_quantizers import (cost_items, current_bits, quantized_activations, quantized_layers,
                                           smallest_bits)
from mpqc.quantizers import FixedQuantizer
from mpqc.reference import IntegerProgram


class GatedNet(nn.Module):
    """conv -> SiLU (a lookup: its input is a conv's accumulator, so it gets a quantizer of its own) -> conv;
    squeeze-excitation ``h * sigmoid(fc(pool(h)))`` (a product of two activations) -> conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.c3, self.head = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1), nn.Linear(4, 5)

    def forward(self, x):
        h = self.c2(F.silu(self.c1(x)))
        h = h * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(h, 1)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.c3(h), 1), 1))


def _graph():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm, layers = quantized_graph(GatedNet(), x)
    return gm, layers, x


def test_operand_quantizers_are_learnable_and_described():
    gm, layers, _ = _graph()
    by_name = {layer.name: layer for layer in quantized_layers(gm)}
    # c2 reads SiLU's output codes: before, a fixed 8-bit quantizer; now the method's learnable one
    assert by_name["c2"].input_quantizer.learnable_bits
    activations = {a.name: a for a in quantized_activations(gm)}
    assert activations and all(a.quantizer.learnable_bits and a.quantizer.bit_range.max_bits <= 8
                               for a in activations.values())
    # SiLU's input is c1's 8-channel 8x8 output: 512 elements per sample
    assert 512 in {a.info.elements for a in activations.values()}
    assert not set(activations) & {layer.input_quantizer_name for layer in by_name.values()}
    products = [node.meta[PRODUCT_META] for node in gm.graph.nodes if PRODUCT_META in node.meta]
    assert len(products) == 1 and products[0].macs == 512  # h * gate: one product per output element
    assert all(key in activations or key in by_name for key in (products[0].a, products[0].b))


def test_budgets_count_operands_and_products():
    gm, layers, _ = _graph()
    layer_list, activations = quantized_layers(gm), quantized_activations(gm)
    items = cost_items(gm, layers)
    assert [type(i) for i in items[len(layers):]] == [ActivationInfo] * len(activations) + [ProductInfo]
    set_bits(gm, lambda name: 4)
    bits = current_bits(layer_list, activations)
    only_layers = ActivationMemory(1, mode="sum").cost(layers, bits)
    with_operands = ActivationMemory(1, mode="sum").cost(items, bits)
    assert float((with_operands - only_layers).detach()) == pytest.approx(sum(a.info.elements for a in activations) * 4 / 8)
    product = items[-1]
    assert float((BitOps(1).cost(items, bits) - BitOps(1).cost(layers, bits)).detach()) == pytest.approx(product.macs * 4 * 4)
    # weight memory ignores activations
    assert float(WeightMemory(1).cost(items, bits).detach()) == float(WeightMemory(1).cost(layers, bits).detach())
    # the penalty reaches the operand quantizers' parameters
    ActivationMemory(1, mode="sum").penalty(items, bits).backward()
    assert all(a.quantizer.log_step.grad is not None for a in activations)
    # the smallest cost the space allows counts them at their minimum
    floor = smallest_bits(layer_list, activations)
    assert float(ActivationMemory(1, mode="sum").cost(items, floor)) < float(with_operands.detach())


def test_freezing_lowers_operands_to_meet_an_activation_memory_budget():
    gm, layers, x = _graph()
    set_bits(gm, lambda name: 8)
    items = cost_items(gm, layers)
    activations = quantized_activations(gm)
    at_8 = float(ActivationMemory(1, mode="sum").cost(items, current_bits(quantized_layers(gm), activations)).detach())
    operand_bytes = sum(a.info.elements for a in activations)  # at 8 bits
    budget = ActivationMemory(at_8 - operand_bytes / 2, mode="sum")  # needs the operands' bits lowered too
    frozen = freeze(gm, budget)
    program = IntegerProgram.from_graph(frozen)
    bits = {node.attrs["module"]: node.attrs["bits"] for node in program.nodes if node.op == "quantize"}
    assert all(not gm.get_submodule(a.name).learnable_bits for a in activations)
    assert all(isinstance(gm.get_submodule(a.name), FixedQuantizer) for a in activations)
    integer = current_bits(quantized_layers(frozen), quantized_activations(frozen))
    assert budget.met(float(budget.cost(items, integer)))
    assert any(bits[a.name] < 8 for a in activations)
    assert math.isfinite(float(program.run(x).abs().max()))
