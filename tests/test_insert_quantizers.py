"""insert_quantizers: structure (one quantizer per layer weight and per layer-input tensor) and numerics."""
from __future__ import annotations

import pytest
import torch
import torchvision

from conftest import example_models, quantized_graph, randomize_batchnorm
from mpqc.passes.insert_quantizers import ACT_QUANTIZERS, current_bits, quantized_layers, smallest_bits
from mpqc.qmodules import QuantConv2d, QuantLinear
from mpqc.quantizers import FixedQuantizer
from mpqc.quantizers.dq import DQActivationQuantizer, DQWeightQuantizer


def _act_quantizer_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(ACT_QUANTIZERS + ".")]


def test_every_layer_is_quantized_and_named_after_itself():
    x = torch.randn(2, 1, 28, 28)
    gm, layers = quantized_graph(randomize_batchnorm(example_models.resnet20()), x)
    quantized = quantized_layers(gm)
    assert [q.name for q in quantized] == [layer.name for layer in layers]
    for q in quantized:
        assert isinstance(q.module, (QuantConv2d, QuantLinear))
        assert isinstance(q.weight_quantizer, DQWeightQuantizer)
        assert isinstance(q.input_quantizer, DQActivationQuantizer)
    # The shortcut conv of a downsampling block shares its input with conv1: one quantizer, named after conv1.
    shared = [q for q in quantized if q.name == "layer2.0.shortcut.0"][0]
    assert shared.input_quantizer_name == "act_quantizers.layer2_0_conv1"
    # 1 + 18 + 2 shortcut convs + 1 fc; 20 distinct layer inputs (2 shared) + 1 residual end before the pool.
    assert len(quantized) == 22
    assert len(_act_quantizer_nodes(gm)) == 20 + 1


def test_every_user_of_a_quantized_tensor_reads_the_quantized_value():
    x = torch.randn(2, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), x)
    for node in _act_quantizer_nodes(gm):
        source = node.args[0]
        assert list(source.users) == [node], f"{source.name} is read around its quantizer"


def test_signs_follow_the_producers():
    x = torch.randn(2, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), x)
    quantizers = gm.get_submodule(ACT_QUANTIZERS)
    assert quantizers["conv1"].signed  # normalised image input has negative values
    assert not quantizers["layer1_0_conv1"].signed  # after a ReLU
    assert not quantizers["fc"].signed  # pooled ReLU output
    # A graph input that is non-negative on the calibration data is unsigned.
    gm, _ = quantized_graph(example_models.small_cnn(), torch.rand(4, 1, 8, 8))
    assert not gm.get_submodule(ACT_QUANTIZERS)["conv1"].signed


def test_output_close_to_float_at_8_bits():
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    gm, _ = quantized_graph(model, x)
    with torch.no_grad():
        actual = gm(x)
    sqnr = 10 * torch.log10(expected.pow(2).mean() / (expected - actual).pow(2).mean())
    assert sqnr > 25, f"8-bit fake quantization SQNR {sqnr:.1f} dB"


def test_bits_are_differentiable_and_smallest_bits_respect_the_policy():
    x = torch.randn(2, 1, 28, 28)
    gm, layers = quantized_graph(randomize_batchnorm(example_models.resnet20()), x, first_last="fixed")
    quantized = quantized_layers(gm)
    assert isinstance(quantized[0].weight_quantizer, FixedQuantizer)
    assert isinstance(quantized[0].input_quantizer, FixedQuantizer)
    assert isinstance(quantized[-1].weight_quantizer, FixedQuantizer)
    assert not isinstance(quantized[-1].input_quantizer, FixedQuantizer)
    bits = current_bits(quantized)
    total = sum(b.weight + b.activation for b in bits.values())
    total.backward()
    assert quantized[1].weight_quantizer.log_step.grad is not None
    smallest = smallest_bits(quantized)
    assert float(smallest[quantized[0].name].weight) == 8 and float(smallest[quantized[1].name].weight) == 2


def test_a_model_without_layers_is_refused():
    from mpqc.errors import MpqcError

    with pytest.raises(MpqcError, match="no conv1d/conv2d/linear"):
        quantized_graph(torch.nn.Sequential(torch.nn.ReLU()), torch.randn(2, 3))
