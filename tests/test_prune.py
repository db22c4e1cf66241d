"""FracBits kernel-wise channel pruning: the 0-bit quantizer, mark_prunable, prune_channels, and a compile."""
from __future__ import annotations

import functools
import json
import math
import sys

import pytest
import torch
from torch import nn

import mpqc
from conftest import FAST, example_models, quantized_graph, randomize_batchnorm
from mpqc.budgets import ActivationMemory, BitOps, LayerBits, WeightMemory
from mpqc.errors import InfeasibleBudgetError
from mpqc.passes.analyze_layers import layer_nodes
from mpqc.passes.freeze import freeze
from mpqc.passes.insert_quantizers import current_bits, quantized_layers, smallest_bits
from mpqc.passes.mark_prunable import mark_prunable
from mpqc.passes.prune_channels import channel_consumers, fewest_channels, prune_channels, pruned_infos
from mpqc.quantizers import BitRange
from mpqc.quantizers.fracbits import FracBitsWeightQuantizer
from mpqc.reference import IntegerProgram
from mpqc.targets.onnx import export_onnx
from mpqc.targets.onnx_check import AGREEMENT_FLOOR, compare_with_reference


def _prunable_quantizer(channels: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, 3, 3, 3, generator=generator)
    quantizer = FracBitsWeightQuantizer(weight, init_bits=4, bit_range=BitRange(2, 8), kernel_wise=True)
    assert quantizer.enable_pruning()
    return quantizer, weight


# ---------------------------------------------------------------------------------------------- the quantizer
def test_a_channel_at_0_bits_is_zero_and_below_min_bits_is_the_min_bits_quantizer_scaled_by_its_bits():
    quantizer, weight = _prunable_quantizer()
    with torch.no_grad():
        quantizer.frac_bits.copy_(torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 5.0]))
    q2 = quantizer.quantize_at(weight, 2)
    q5 = quantizer.quantize_at(weight, 5)
    out = quantizer(weight).detach()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for channel, bits in ((1, 0.5), (2, 1.0), (3, 1.5)):
        torch.testing.assert_close(out[channel], q2[channel] * bits / 2, rtol=0, atol=1e-7)
    assert torch.equal(out[4], q2[4].detach()) and torch.equal(out[5], q5[5].detach())
    torch.testing.assert_close(quantizer.channel_gate(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    assert quantizer.bits().item() == pytest.approx((0 + 0.5 + 1 + 1.5 + 2 + 5) / 6)  # a pruned channel costs 0


def test_the_bits_below_min_bits_get_a_gradient_and_project_keeps_them_down_to_0():
    quantizer, weight = _prunable_quantizer()
    with torch.no_grad():
        quantizer.frac_bits.copy_(torch.tensor([1.0, 1.0, 1.0, 3.0, 3.0, 3.0]))
    quantizer(weight).pow(2).sum().backward()
    assert (quantizer.frac_bits.grad[:3] != 0).all()
    with torch.no_grad():
        quantizer.frac_bits.copy_(torch.tensor([-1.0, 0.3, 1.0, 3.0, 9.0, 3.0]))
    quantizer.project_()
    assert quantizer.frac_bits.tolist() == pytest.approx([0.0, 0.3, 1.0, 3.0, 8.0, 3.0])


def test_the_polarisation_term_is_zero_at_pruned_and_whole_channels_and_pushes_the_others_apart():
    quantizer, _ = _prunable_quantizer()
    with torch.no_grad():
        quantizer.frac_bits.copy_(torch.tensor([0.0, 2.0, 5.0, 0.0, 2.0, 8.0]))  # gates 0 or 1
    assert float(quantizer.extra_loss().detach()) == 0.0
    with torch.no_grad():
        quantizer.frac_bits.copy_(torch.tensor([0.6, 1.4, 5.0, 0.0, 2.0, 8.0]))  # gates 0.3 and 0.7
    loss = quantizer.extra_loss()
    assert float(loss.detach()) == pytest.approx(quantizer.polarization * 2 * 0.3 * 0.7)
    loss.backward()
    assert quantizer.frac_bits.grad[0] > 0 > quantizer.frac_bits.grad[1]  # descent: 0.6 bits down, 1.4 bits up
    assert quantizer.frac_bits.grad[3] > 0  # a pruned channel stays pruned (projected at 0 bits)
    assert torch.equal(quantizer.frac_bits.grad[[2, 4, 5]], torch.zeros(3))  # whole channels feel nothing
    plain = FracBitsWeightQuantizer(torch.randn(6, 3, 3, 3), init_bits=4, kernel_wise=True)
    assert plain.extra_loss() is None  # pruning not enabled


def test_over_the_second_half_of_the_search_the_gates_move_to_the_layers_decision_and_the_cost_follows():
    quantizer, weight = _prunable_quantizer()
    with torch.no_grad():
        quantizer.frac_bits.copy_(torch.tensor([0.0, 0.6, 0.9, 1.1, 1.6, 5.0]))
    linear = torch.tensor([0.0, 0.3, 0.45, 0.55, 0.8, 1.0])
    keep = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])  # round(0.3 + 0.45 + 0.55 + 0.8) = 2 of the faded ones
    for progress in (0.0, 0.5):  # the first half: the linear gate
        quantizer.set_progress(progress)
        torch.testing.assert_close(quantizer.channel_gate(), linear)
        assert quantizer.bits().item() == pytest.approx((0 + 0.6 + 0.9 + 1.1 + 1.6 + 5) / 6)
    quantizer.set_progress(0.75)  # half way to the decision
    torch.testing.assert_close(quantizer.channel_gate(), (linear + keep) / 2)
    quantizer.set_progress(1.0)  # the last step: every gate is the decision, exactly
    assert torch.equal(quantizer.channel_gate().detach(), keep)
    assert quantizer.bits().item() == pytest.approx((0 + 0 + 0 + 2 + 2 + 5) / 6)  # min_bits x gate: the pruned cost
    out = quantizer(weight)
    q2 = quantizer.quantize_at(weight, 2).detach()
    assert torch.equal(out[:3].detach(), torch.zeros_like(out[:3])) and torch.equal(out[3:5].detach(), q2[3:5])
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert (quantizer.frac_bits.grad[1:5] != 0).all()  # straight-through: the gates keep learning, the off ones too
    resumed, _ = _prunable_quantizer()
    resumed.load_state_dict(quantizer.state_dict())  # the schedule is in the state dict
    assert torch.equal(resumed.channel_gate(), quantizer.channel_gate())
    with torch.no_grad():  # the decision follows the search: channel 2 overtakes channel 3
        quantizer.frac_bits.copy_(torch.tensor([0.0, 0.6, 1.2, 1.0, 1.6, 5.0]))
    assert quantizer.channel_gate().tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_without_pruning_the_bits_stop_at_min_bits_and_layer_wise_fracbits_cannot_prune():
    weight = torch.randn(4, 3, 3, 3)
    kernel = FracBitsWeightQuantizer(weight, init_bits=4, kernel_wise=True)
    with torch.no_grad():
        kernel.frac_bits.fill_(0.5)
    kernel.project_()
    assert kernel.frac_bits.tolist() == [2.0] * 4 and kernel.channel_gate() is None
    assert not FracBitsWeightQuantizer(weight, init_bits=4).enable_pruning()


# ---------------------------------------------------------------------------------------------- mark_prunable
def test_only_layers_read_by_plain_layers_alone_are_prunable():
    example = torch.randn(2, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), example, method="fracbits-kernel")
    mark_prunable(gm)
    prunable = {layer.name for layer in quantized_layers(gm) if layer.weight_quantizer.channel_gate() is not None}
    # a block's first conv feeds only its second; the second conv, the stem, shortcuts feed residual adds; fc the output
    assert prunable == {f"layer{stage}.{block}.conv1" for stage in (1, 2, 3) for block in range(3)}
    small, _ = quantized_graph(randomize_batchnorm(example_models.small_cnn()), torch.randn(2, 1, 8, 8),
                               method="fracbits-kernel")
    mark_prunable(small)
    assert [layer.weight_quantizer.channel_gate() is not None for layer in quantized_layers(small)] \
        == [True, True, False]  # conv2 reaches fc through relu, pool and flatten


@pytest.mark.parametrize("method", ["dq", "sdq", "fracbits", "csq"])
def test_methods_without_channel_pruning_are_left_as_they_are(method):
    gm, _ = quantized_graph(randomize_batchnorm(example_models.small_cnn()), torch.randn(2, 1, 8, 8), method=method)
    mark_prunable(gm)
    assert all(layer.weight_quantizer.channel_gate() is None for layer in quantized_layers(gm))


class _FlattenToLinear(nn.Module):
    """conv -> relu -> flatten of a 4x4 map -> linear -> relu -> linear: channels become blocks of 16 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1, stride=2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(6 * 16, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.relu(self.conv(x)), 1))))


def test_channel_consumers_follow_a_flatten_into_blocks_of_features():
    gm, _ = quantized_graph(_FlattenToLinear().eval(), torch.randn(2, 1, 8, 8), method="fracbits-kernel")
    nodes = {str(node.target): node for node in layer_nodes(gm)}
    [reader] = channel_consumers(gm, nodes["conv"])
    assert reader.node is nodes["fc1"] and reader.per_channel == 16
    assert channel_consumers(gm, nodes["fc1"])[0].node is nodes["fc2"]
    assert channel_consumers(gm, nodes["fc2"]) is None


# ---------------------------------------------------------------------------------------------- prune_channels
def _set_channel_bits(gm, seed: int, zero_fraction: float = 0.4) -> dict[str, torch.Tensor]:
    """Random integer bits in 2..8 per channel of every prunable layer, a share of the channels at exactly 0, and
    two below ``min_bits`` that are kept (their gates folded into their weights).

    The readers' weights on the 0-bit channels are made small, so that each reader row's largest weight (which sets
    its quantization scale) sits on a kept channel and removing the dead columns leaves the scales as they were.
    """
    generator = torch.Generator().manual_seed(seed)
    zeroed = {}
    nodes = {str(node.target): node for node in layer_nodes(gm)}
    for layer in quantized_layers(gm):
        quantizer = layer.weight_quantizer
        if quantizer.channel_gate() is None:
            continue
        channels = quantizer.frac_bits.numel()
        bits = torch.randint(2, 9, (channels,), generator=generator).float()
        zero = torch.rand(channels, generator=generator) < zero_fraction
        zero[:2] = False
        bits[zero] = 0.0
        bits[:2] = torch.tensor([0.8, 0.75]) * quantizer.bit_range.min_bits  # gates summing to 1.55: both kept
        with torch.no_grad():
            quantizer.frac_bits.copy_(bits)
            for reader in channel_consumers(gm, nodes[layer.name]):
                dead = (torch.nonzero(zero).flatten()[:, None] * reader.per_channel
                        + torch.arange(reader.per_channel)).flatten()
                gm.get_submodule(str(reader.node.target)).weight[:, dead] *= 0.01
        zeroed[layer.name] = zero
    return zeroed


@pytest.mark.parametrize("model, shape", [
    (example_models.resnet20, (4, 1, 28, 28)),
    (example_models.small_cnn, (4, 1, 8, 8)),
    (_FlattenToLinear, (4, 1, 8, 8)),
])
def test_removing_0_bit_channels_and_folding_the_kept_gates_keeps_the_outputs_and_shrinks_the_layers(model, shape):
    torch.manual_seed(0)
    example = torch.randn(*shape)
    gm, _ = quantized_graph(randomize_batchnorm(model()), example, method="fracbits-kernel")
    with torch.no_grad():  # non-zero biases everywhere: the pruned channels' bias must go too
        for layer in quantized_layers(gm):
            if layer.module.bias is not None:
                layer.module.bias.add_(0.3)
    mark_prunable(gm)
    zeroed = _set_channel_bits(gm, seed=1)
    assert sum(int(z.sum()) for z in zeroed.values()) > 0
    before_infos = {layer.name: layer.info for layer in quantized_layers(gm)}
    predicted = pruned_infos(gm, {name: int((~zero).sum()) for name, zero in zeroed.items()})
    with torch.no_grad():
        before = gm(example)
    gm = prune_channels(gm, (example,))
    assert predicted == [layer.info for layer in quantized_layers(gm)]  # what a budget sees before pruning
    with torch.no_grad():
        after = gm(example)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    after_infos = {layer.name: layer.info for layer in quantized_layers(gm)}
    nodes = {str(node.target): node for node in layer_nodes(gm)}
    for name, zero in zeroed.items():
        kept = int((~zero).sum())
        info, old = after_infos[name], before_infos[name]
        assert info.out_channels == info.weight_shape[0] == kept and info.params == math.prod(info.weight_shape)
        assert info.macs * old.params == old.macs * info.params  # MACs shrink with the weight (rows and columns)
        assert gm.get_submodule(name).weight_quantizer.frac_bits.numel() == kept
        for reader in channel_consumers(gm, nodes[name]):
            reader_name = str(reader.node.target)
            assert after_infos[reader_name].weight_shape[1] == kept * reader.per_channel
            assert after_infos[reader_name].params < before_infos[reader_name].params


@pytest.mark.parametrize("budget", [WeightMemory(1), BitOps(1), ActivationMemory(1, mode="sum")],
                         ids=lambda budget: budget.kind)
def test_the_search_cost_counts_the_readers_columns_of_channels_at_0_bits_as_gone(budget):
    """With every channel either at 0 bits or whole, the differentiable cost the search minimises is the cost of
    the pruned model: the channel's own weights (its bits) and its readers' columns (``input_kept``)."""
    torch.manual_seed(0)
    example = torch.randn(4, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), example, method="fracbits-kernel")
    mark_prunable(gm)
    zeroed = _set_channel_bits(gm, seed=3)
    with torch.no_grad():
        for layer in quantized_layers(gm):
            if layer.name in zeroed:
                layer.weight_quantizer.frac_bits[:2] = 4.0  # no channel between 0 and min_bits
    layers = quantized_layers(gm)
    searched = budget.cost([layer.info for layer in layers], current_bits(layers))
    assert searched.requires_grad
    readers = [layer.name for layer in layers if layer.input_kept() != 1.0]
    assert len(readers) == len(zeroed) == 9

    kept_bits = {}
    for layer in layers:
        bits = layer.weight_quantizer.bits().detach()
        if layer.name in zeroed:
            bits = layer.weight_quantizer.channel_bits().detach()[~zeroed[layer.name]].mean()
        kept_bits[layer.name] = LayerBits(bits, layer.input_quantizer.bits().detach())
    pruned = pruned_infos(gm, {name: int((~zero).sum()) for name, zero in zeroed.items()})
    assert float(searched.detach()) == pytest.approx(float(budget.cost(pruned, kept_bits)), rel=1e-6)


def test_a_removed_channel_that_still_output_something_leaves_its_mean_in_the_readers_bias():
    """fc1's channel 0 at 0.4 of 2 bits rounds away (gate 0.2); fc2 (the output layer, linear) gets its mean over
    the calibration inputs in its bias, so the output's mean over them is what it was (without it, it would move
    by what the bias moved)."""
    torch.manual_seed(0)
    example, calibration = torch.randn(2, 1, 8, 8), torch.randn(64, 1, 8, 8)
    gm, _ = quantized_graph(_FlattenToLinear().eval(), example, method="fracbits-kernel")
    mark_prunable(gm)
    fc1, fc2 = quantized_layers(gm)[1:]
    with torch.no_grad():
        fc1.weight_quantizer.frac_bits[0] = 0.4
        fc1.module.bias[0] = 2.0  # a clearly positive channel after the ReLU
        fc2.module.weight[:, 0] = fc2.module.weight[:, 1:].abs().amax(1) / 2  # not a row's max: scales stay
        before = gm(calibration).mean(0)
    bias = fc2.module.bias.detach().clone()
    gm = prune_channels(gm, (example,), calibration_inputs=(calibration,))
    assert quantized_layers(gm)[1].info.out_channels == 11
    with torch.no_grad():
        torch.testing.assert_close(gm(calibration).mean(0), before, rtol=0, atol=1e-5)
    assert (gm.get_submodule("fc2").bias - bias).abs().min() > 0.05  # what the removed channel contributed


def test_a_reader_that_prunes_its_own_channels_too_gets_the_mean_through_its_folded_gate():
    """conv's channel 0 (gate 0.2) goes; fc1, which reads it, keeps its own channels 0 and 1 at gates 0.8 and 0.75
    (folded). fc1's output mean over the calibration inputs stays what it was: the mean enters fc1's bias once,
    under fc1's gate (compensating before folding fc1 counted the gate twice: 0.12 off)."""
    torch.manual_seed(0)
    example, calibration = torch.randn(2, 1, 8, 8), torch.randn(64, 1, 8, 8)
    gm, _ = quantized_graph(_FlattenToLinear().eval(), example, method="fracbits-kernel")
    mark_prunable(gm)
    conv, fc1, _ = quantized_layers(gm)
    with torch.no_grad():
        conv.weight_quantizer.frac_bits[0] = 0.4
        conv.module.bias[0] = 2.0
        fc1.weight_quantizer.frac_bits[:2] = torch.tensor([1.6, 1.5])
        fc1.module.weight[:, :16] = 0.8 * fc1.module.weight[:, 16:].abs().amax(1, keepdim=True)  # not a max; 1 LSB at 2 bits
    outputs = []
    hook = gm.get_submodule("fc1").register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        gm(calibration)
        gm = prune_channels(gm, (example,), calibration_inputs=(calibration,))
        gm(calibration)
    hook.remove()
    assert quantized_layers(gm)[0].info.out_channels == 5 and quantized_layers(gm)[1].info.out_channels == 12
    torch.testing.assert_close(outputs[-1].mean(0), outputs[0].mean(0), rtol=0, atol=1e-5)


def test_a_reader_row_keeps_its_learned_scale_when_its_largest_weight_was_on_a_pruned_channel():
    example = torch.randn(4, 1, 8, 8)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.small_cnn()), example, method="fracbits-kernel")
    mark_prunable(gm)
    conv1, conv2 = (layer for layer in quantized_layers(gm)[:2])
    with torch.no_grad():
        conv1.weight_quantizer.frac_bits[0] = 0.0
        conv2.module.weight[0, 0] = 10 * conv2.module.weight[0].abs().max()  # row 0's max on the dead channel
    old_scale = conv2.weight_quantizer.scale_at(4, conv2.module.weight).detach().clone()
    gm = prune_channels(gm, (example,))
    assert gm.get_submodule("conv2").weight.shape[1] == conv2.module.weight.shape[1]
    # The per-channel scales are learned parameters: removing a column leaves the row's grid as it was.
    torch.testing.assert_close(conv2.weight_quantizer.scale_at(4, gm.get_submodule("conv2").weight), old_scale,
                               rtol=0, atol=0)


def test_channels_below_min_bits_round_per_layer_to_their_summed_gates_and_a_layer_keeps_at_least_one():
    example = torch.randn(4, 1, 8, 8)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.small_cnn()), example, method="fracbits-kernel")
    mark_prunable(gm)
    conv1, conv2 = (layer.weight_quantizer for layer in quantized_layers(gm)[:2])
    assert conv1.bit_range.min_bits == 2
    bits = torch.tensor([3.0] * 8 + [0.6, 0.6, 0.6, 0.7, 0.6, 0.6, 0.6, 0.6])  # 8 whole, 8 at gate 0.3 and 0.35
    with torch.no_grad():
        conv1.frac_bits.copy_(bits)
        conv2.frac_bits.zero_()  # every channel at 0 bits
    weight = gm.get_submodule("conv1").weight.detach().clone()
    gm = prune_channels(gm, (example,))
    layers = quantized_layers(gm)
    # 8 whole + round(0.35 + 7 * 0.3 = 2.45) = 2 of the others: the strongest, then the first of the equal ones
    assert layers[0].info.out_channels == 10
    assert layers[0].weight_quantizer.frac_bits.tolist() == [3.0] * 8 + [2.0, 2.0]  # kept ones now at min_bits
    kept_weight = layers[0].module.weight.detach()
    torch.testing.assert_close(kept_weight[:8], weight[:8], rtol=0, atol=0)
    torch.testing.assert_close(kept_weight[8:], weight[[8, 11]] * torch.tensor([0.3, 0.35])[:, None, None, None])
    assert layers[1].info.out_channels == 1 and layers[1].weight_quantizer.frac_bits.item() == 2.0
    assert layers[2].info.weight_shape == (10, 1)


def test_per_channel_rounding_would_remove_a_layer_the_search_took_below_min_bits_and_this_keeps_its_share():
    """A strong budget penalty can take every channel of a layer to, say, 0.6 of 2 bits; nearest rounding per
    channel would then leave one channel. Rounded per layer, 32 channels at gate 0.3 keep round(9.6) = 10."""
    example = torch.randn(4, 1, 8, 8)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.small_cnn()), example, method="fracbits-kernel")
    mark_prunable(gm)
    with torch.no_grad():
        quantized_layers(gm)[1].weight_quantizer.frac_bits.fill_(0.6)
    conv2 = quantized_layers(gm)[1]
    searched_bits = float(conv2.weight_quantizer.bits().detach()) * conv2.info.params
    gm = prune_channels(gm, (example,))
    conv2 = quantized_layers(gm)[1]
    assert conv2.info.out_channels == 10
    assert float(conv2.weight_quantizer.bits().detach()) * conv2.info.params == pytest.approx(searched_bits, rel=0.05)


@pytest.mark.parametrize("lowest", [0.5, 2.0], ids=["some-below-min-bits", "all-whole"])
def test_a_budget_below_what_rounding_leaves_prunes_the_channels_with_the_fewest_bits_first(lowest):
    example = torch.randn(4, 1, 8, 8)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.small_cnn()), example, method="fracbits-kernel")
    mark_prunable(gm)
    conv1, conv2, fc = quantized_layers(gm)
    with torch.no_grad():
        conv1.weight_quantizer.frac_bits.copy_(torch.arange(16.0) / 2 + lowest)  # from 0.5 (rounding prunes it) or 2
        conv2.weight_quantizer.frac_bits.fill_(8.0)
    # at 2 bits: conv1 16 x 9, conv2 32 x 16 x 9, fc 10 x 32 weights; a budget that fits with 8 of conv1's channels
    budget = WeightMemory(2 * (8 * 9 + 32 * 8 * 9 + 10 * 32) / 8)
    gm = prune_channels(gm, (example,), budget)
    conv1, conv2, fc = quantized_layers(gm)
    assert conv1.info.out_channels == 8 and conv2.info.weight_shape[1] == 8
    assert conv1.weight_quantizer.frac_bits.tolist() == (torch.arange(8.0, 16.0) / 2 + lowest).tolist()  # the top 8
    frozen = freeze(gm, budget)
    assert budget.met(float(budget.cost([layer.info for layer in quantized_layers(frozen)],
                                        smallest_bits(quantized_layers(frozen)))))


def test_budgets_below_the_one_channel_floor_are_refused_before_and_after_the_search():
    example = torch.randn(4, 1, 8, 8)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.small_cnn()), example, method="fracbits-kernel")
    mark_prunable(gm)
    infos = fewest_channels(gm)
    assert [info.out_channels for info in infos] == [1, 1, 10]
    floor = 2 * (1 * 9 + 1 * 1 * 9 + 10 * 1) / 8
    assert WeightMemory(floor).check_feasible(infos, smallest_bits(quantized_layers(gm))) == pytest.approx(floor)
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable"):
        WeightMemory(floor * 0.9).check_feasible(infos, smallest_bits(quantized_layers(gm)))
    with pytest.raises(InfeasibleBudgetError, match="down to one channel"):
        prune_channels(gm, (example,), WeightMemory(floor * 0.9))


def test_a_pruned_then_frozen_graph_is_an_integer_program_that_agrees_with_it_and_with_onnxruntime(tmp_path):
    torch.manual_seed(0)
    example = torch.randn(8, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), example, method="fracbits-kernel")
    mark_prunable(gm)
    zeroed = _set_channel_bits(gm, seed=2)
    gm = freeze(prune_channels(gm, (example,)), WeightMemory(1e12))
    program = IntegerProgram.from_graph(gm.eval())
    layers = {node.attrs["module"]: node for node in program.layers()}
    kept = int((~zeroed["layer1.0.conv1"]).sum())
    assert kept < 16 and layers["layer1.0.conv1"].tensors["weight"].shape[0] == kept
    assert layers["layer1.0.conv2"].tensors["weight"].shape[1] == kept
    with torch.no_grad():
        expected = gm(example)
    scale = expected.abs().max()
    assert (program.run(example) - expected).abs().max() <= 0.02 * scale

    exported = export_onnx(program, tmp_path / "pruned.onnx", input_shapes=[tuple(example.shape)])
    agreement = compare_with_reference(program, exported.path, example)
    for name, stats in agreement["quantizers"].items():
        assert stats["within_1_lsb"] >= AGREEMENT_FLOOR and stats["max_lsb"] <= 1, (name, stats)


# ---------------------------------------------------------------------------------------------- compile
#: A search that starts at 2 bits under a 2-bit average budget: channels the task needs least drift to 0 bits.
PRUNING = mpqc.CompileConfig(
    quantizers=mpqc.QuantizerConfig(init_bits=2),
    search=mpqc.TrainConfig(epochs=2, quantizer_lr=0.2, penalty_weight=50.0, checkpoint_every=10),
    finetune=FAST.finetune, progress=False,
)


def test_compile_with_fracbits_kernel_prunes_channels_and_the_budget_counts_the_smaller_model(
        trained_small_cnn, digits_loaders, tmp_path):
    example = next(iter(digits_loaders[1]))[0][:2]
    result = mpqc.compile(trained_small_cnn, example, budget="avg-bits=2", data=digits_loaders,
                          method="fracbits-kernel", config=PRUNING, out=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    pruned = {layer["name"]: layer["pruned_channels"] for layer in report["layers"]}
    assert report["totals"]["pruned_channels"] == sum(pruned.values()) > 0, pruned
    assert pruned["fc"] == 0
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["conv1"]["out_channels"] == 16 - pruned["conv1"]
    assert layers["conv2"]["weight_shape"][1] == 16 - pruned["conv1"]  # conv2 lost the matching inputs
    int_layers = {node.attrs["module"]: node for node in result.program.layers()}
    assert int_layers["conv1"].tensors["weight"].shape[0] == 16 - pruned["conv1"]  # the integer model is smaller
    weight_bytes = sum(layer["params"] * layer["weight_bits"] for layer in report["layers"]) / 8
    assert report["totals"]["weight_bytes"] == pytest.approx(weight_bytes)
    assert report["budget"]["met"]
    assert report["totals"]["fp32_weight_bytes"] == 4 * (16 * 9 + 32 * 16 * 9 + 10 * 32)  # the unpruned model
    assert abs(report["accuracy"]["integer_reference"] - report["accuracy"]["quantized"]) < 2.0
    assert "channels pruned" in mpqc.report.format_report(report)
    gates = {layer["name"]: layer.get("channel_gates_search") for layer in report["layers"]}
    assert gates["fc"] is None and sum(gates["conv1"].values()) == 16  # conv1 could prune, fc could not
    # the sharpened gates leave no channel between off and on at the end of the search
    assert report["totals"]["undecided_channels"] == 0, gates


def test_pruning_reaches_a_weight_memory_below_two_bits_per_weight_which_no_other_method_can(
        trained_small_cnn, digits_loaders):
    example = next(iter(digits_loaders[1]))[0][:2]
    params = 16 * 9 + 32 * 16 * 9 + 10 * 32
    budget = mpqc.WeightMemory(1.5 * params / 8)
    result = mpqc.compile(trained_small_cnn, example, budget=budget, data=digits_loaders, method="fracbits-kernel",
                          config=PRUNING)
    assert result.report["budget"]["met"] and result.report["totals"]["weight_bytes"] <= 1.5 * params / 8
    assert result.report["totals"]["pruned_channels"] > 0
    with pytest.raises(InfeasibleBudgetError, match="smallest achievable"):
        mpqc.compile(trained_small_cnn, example, budget=budget, data=digits_loaders, method="fracbits",
                     config=PRUNING)


def test_a_pruned_run_interrupted_in_fine_tuning_resumes_to_the_uninterrupted_result(
        trained_small_cnn, digits_loaders, tmp_path, monkeypatch):
    compile_module = sys.modules["mpqc.compile"]
    example = next(iter(digits_loaders[1]))[0][:2]
    run = functools.partial(mpqc.compile, trained_small_cnn, example, budget="avg-bits=2", data=digits_loaders,
                            method="fracbits-kernel", config=PRUNING)
    uninterrupted = run(out=tmp_path / "a")
    finetune = compile_module.finetune

    def crash_in_fine_tuning(*args, **kwargs):
        finetune(*args, **kwargs, stop_after_steps=5)
        raise KeyboardInterrupt

    monkeypatch.setattr(compile_module, "finetune", crash_in_fine_tuning)
    with pytest.raises(KeyboardInterrupt):
        run(out=tmp_path / "b")
    monkeypatch.undo()
    resumed = run(out=tmp_path / "b", resume=True)
    assert resumed.report["totals"]["pruned_channels"] == uninterrupted.report["totals"]["pruned_channels"] > 0
    for ours, theirs in zip(resumed.program.nodes, uninterrupted.program.nodes):
        assert ours.attrs == theirs.attrs and ours.tensors.keys() == theirs.tensors.keys()
        for key in ours.tensors:
            assert torch.equal(ours.tensors[key], theirs.tensors[key]), (ours.name, key)
