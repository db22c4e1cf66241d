"""freeze: integer bit-widths that meet the budget, and outputs unchanged when the bits already are integers."""
from __future__ import annotations

import zlib

import pytest
import torch

from conftest import example_models, quantized_graph, randomize_batchnorm, set_bits
from mpqc.budgets import AverageBits, BitOps, WeightMemory
from mpqc.errors import InfeasibleBudgetError
from mpqc.passes.freeze import freeze, integer_bits
from mpqc.passes.insert_quantizers import quantized_layers
from mpqc.quantizers import FixedQuantizer


def _graph():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    gm, layers = quantized_graph(randomize_batchnorm(example_models.resnet20()), x)
    return gm, layers, x


def test_freezing_at_integer_bits_keeps_the_outputs():
    gm, _, x = _graph()
    set_bits(gm, lambda name: 3 + zlib.crc32(name.encode()) % 5)
    with torch.no_grad():
        before = gm(x)
        seen = _inputs_and_outputs(gm, x)
    freeze(gm, WeightMemory(1e12))
    layers = quantized_layers(gm)
    for layer in layers:
        assert isinstance(layer.weight_quantizer, FixedQuantizer) and isinstance(layer.input_quantizer, FixedQuantizer)
        assert layer.module.input_quantizer is layer.input_quantizer
        # The bias is now rounded to the accumulator step s_in * s_w[c] (the integer contract): by <= half a step.
        step = layer.input_quantizer.scale.abs() * layer.weight_quantizer.scale.abs()
        error = (layer.module.quantized_bias() - layer.module.bias).abs()
        assert bool((error <= step / 2 + 1e-7).all()), layer.name
    # Apart from that rounding, freezing changes nothing: same quantizers, same values. Layer by layer on the same
    # inputs: the two paths differ by float noise, summed over up to 576 products per output and in an order that
    # depends on the CPU's kernels (under 1e-5 on an AVX2 EPYC, up to 2.7e-5 on an AVX-512 Xeon), far below any
    # quantization step (the smallest bias step here is 6.7e-4).
    for layer in layers:
        del layer.module.input_quantizer
    with torch.no_grad():
        for name, (inputs, output) in seen.items():
            torch.testing.assert_close(gm.get_submodule(name)(inputs), output, rtol=1e-4, atol=1e-4)
        after = gm(x)
    assert after.shape == before.shape


def _inputs_and_outputs(gm, x):
    """Each quantized layer's and activation quantizer's input and output in one forward pass of ``x``."""
    seen = {}
    names = [layer.name for layer in quantized_layers(gm)] + [layer.input_quantizer_name
                                                              for layer in quantized_layers(gm)]

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, (inputs[0], output))
        return hook

    hooks = [gm.get_submodule(name).register_forward_hook(record(name)) for name in names]
    gm(x)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("budget_fn", [
    lambda layers: AverageBits(3.0),
    lambda layers: WeightMemory(sum(l.params for l in layers) * 2.5 / 8),
    lambda layers: BitOps(sum(l.macs for l in layers) * 3 * 4),
])
def test_rounding_over_the_budget_is_repaired(budget_fn):
    gm, layers, _ = _graph()
    set_bits(gm, lambda name: 4)  # fractional search results would round to 4 bits: over every budget above
    budget = budget_fn(layers)
    bits = integer_bits(gm, budget)
    freeze(gm, budget)
    from mpqc.passes.insert_quantizers import current_bits

    cost = float(budget.cost(layers, current_bits(quantized_layers(gm))))
    assert budget.met(cost), f"{budget}: {cost}"
    assert min(bits.values()) >= 2 and max(bits.values()) <= 8
    # It lowered as little as it had to: one more bit anywhere would not fit... or it is at the maximum.
    assert cost > 0.8 * budget.limit


def test_loose_budget_rounds_to_nearest():
    gm, layers, _ = _graph()
    for layer in quantized_layers(gm):
        with torch.no_grad():
            q = layer.weight_quantizer
            q.log_step.copy_(torch.log(q.log_range.exp() / (2 ** (5.4 - 1) - 1)))  # 5.4 bits
    bits = integer_bits(gm, AverageBits(8))
    assert all(bits[f"{layer.name}.weight_quantizer"] == 5 for layer in quantized_layers(gm))


def test_unreachable_budget_is_refused():
    gm, layers, _ = _graph()
    with pytest.raises(InfeasibleBudgetError, match="cannot be met"):
        integer_bits(gm, AverageBits(1.0))


def test_slack_left_by_lowering_is_given_back():
    gm, layers, _ = _graph()
    set_bits(gm, lambda name: 4)
    params = sum(layer.params for layer in layers)
    budget = WeightMemory(params * 3.5 / 8)  # needs some layers at 3, not all
    bits = integer_bits(gm, budget)
    cost = float(budget.cost(layers, _assignment(gm, bits)))
    assert budget.met(cost)
    weight_bits = [bits[f"{layer.name}.weight_quantizer"] for layer in layers]
    assert set(weight_bits) == {3, 4}, weight_bits  # mixed: not everything was pushed down to 3
    # No single layer could go back up to 4 bits without breaking the budget.
    for layer in layers:
        key = f"{layer.name}.weight_quantizer"
        if bits[key] == 3:
            trial = dict(bits, **{key: 4})
            assert not budget.met(float(budget.cost(layers, _assignment(gm, trial)))), layer.name


def _assignment(gm, bits):
    from mpqc.budgets import LayerBits

    return {
        layer.name: LayerBits(torch.tensor(float(bits[f"{layer.name}.weight_quantizer"])),
                              torch.tensor(float(bits[layer.input_quantizer_name])))
        for layer in quantized_layers(gm)
    }
