"""The integer reference against the fake-quant graph it was built from, and the program's file round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.fx import Interpreter

from conftest import example_models, freeze_at_random_bits, quantized_graph, randomize_batchnorm
from mpqc.errors import UnsupportedOpError
from mpqc.passes.insert_quantizers import ACT_QUANTIZERS
from mpqc.quantizers.base import FixedQuantizer
from mpqc.reference import IntegerProgram, IntValue

MODELS = {
    "small_cnn": (lambda: example_models.small_cnn(), (4, 1, 8, 8)),
    "resnet20": (lambda: example_models.resnet20(), (4, 1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64)),
}


def _fake_quant_codes(gm, x):
    """Integer codes (value / scale) at every activation quantizer of the fake-quant graph."""
    codes = {}

    class Recorder(Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op == "call_module" and n.target.startswith(ACT_QUANTIZERS + "."):
                q: FixedQuantizer = self.module.get_submodule(n.target)
                codes[n.name] = torch.round(value / q.scale.abs()).to(torch.int64)
            return value

    with torch.no_grad():
        out = Recorder(gm).run(x)
    return codes, out


@pytest.mark.parametrize("name", list(MODELS))
def test_integer_reference_agrees_with_fake_quant_at_mixed_bits(name):
    torch.manual_seed(0)
    build, shape = MODELS[name]
    model = randomize_batchnorm(build())
    x = torch.randn(shape)
    gm, _ = quantized_graph(model, x)
    gm, chosen = freeze_at_random_bits(gm, seed=1)
    assert len(set(chosen.values())) > 2, "the test needs really mixed bit-widths"
    program = IntegerProgram.from_graph(gm)

    codes, fake_out = _fake_quant_codes(gm, x)
    env = program.run_all(x)
    total = mismatched = 0
    for node_name, fake_codes in codes.items():
        ref = env[node_name]
        assert isinstance(ref, IntValue)
        diff = (ref.q - fake_codes).abs()
        assert int(diff.max()) <= 1, f"{node_name}: integer reference and fake-quant differ by more than 1 LSB"
        total += diff.numel()
        mismatched += int((diff > 0).sum())
    # 1-LSB flips only at rounding ties of fp32 arithmetic: rare.
    assert mismatched / total < 2e-3, f"{mismatched}/{total} quantized activations differ"

    ref_out = program.run(x)
    assert ref_out.shape == fake_out.shape
    scale = fake_out.abs().max()
    assert (ref_out - fake_out).abs().max() <= 0.05 * scale
    assert (ref_out.argmax(1) == fake_out.argmax(1)).float().mean() >= 0.5


def test_quantized_values_stay_in_their_bit_range():
    torch.manual_seed(0)
    model = randomize_batchnorm(example_models.resnet20())
    x = torch.randn(2, 1, 28, 28)
    gm, _ = quantized_graph(model, x)
    gm, _ = freeze_at_random_bits(gm, seed=3, low=2, high=4)
    program = IntegerProgram.from_graph(gm)
    env = program.run_all(x)
    for node in program.nodes:
        if node.op == "quantize":
            bits, signed = node.attrs["bits"], node.attrs["signed"]
            low, high = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            q = env[node.name].q
            assert low <= int(q.min()) and int(q.max()) <= high, node.name
        if node.op in ("conv2d", "linear"):
            bits = node.attrs["weight_bits"]
            w = node.tensors["weight"]
            assert w.dtype == torch.int8
            assert int(w.abs().max()) <= 2 ** (bits - 1) - 1, node.name


def test_program_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), x)
    gm, _ = freeze_at_random_bits(gm, seed=2)
    program = IntegerProgram.from_graph(gm)
    program.save(tmp_path)
    loaded = IntegerProgram.load(tmp_path)
    assert torch.equal(program.run(x), loaded.run(x))
    assert loaded.layer_bits() == program.layer_bits()


def test_residual_add_is_requantized_in_one_region():
    """resnet20's block output relu(conv + shortcut) is requantized straight from its integer inputs; the last
    block's, which feeds the pooling, gets its own fixed 8-bit quantizer."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    gm, _ = quantized_graph(randomize_batchnorm(example_models.resnet20()), x)
    gm, _ = freeze_at_random_bits(gm, seed=4)
    program = IntegerProgram.from_graph(gm)
    adds = [node for node in program.nodes if node.op == "add"]
    assert len(adds) == 9
    consumers = lambda name: [n for n in program.nodes if name in n.inputs]  # noqa: E731
    for add in adds:
        (relu,) = consumers(add.name)
        assert relu.op == "relu"
        (quantize,) = consumers(relu.name)
        assert quantize.op == "quantize"
    assert quantize.attrs["module"].endswith("_out") and quantize.attrs["bits"] == 8
    (pool,) = consumers(quantize.name)
    assert pool.op == "global_avg_pool"


def test_unsupported_ops_are_all_listed():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = torch.erf(self.conv(x))
            y = torch.sin(y).amax((2, 3))
            return self.fc(y)

    x = torch.randn(2, 1, 8, 8)
    gm, _ = quantized_graph(Odd(), x)
    gm, _ = freeze_at_random_bits(gm)
    with pytest.raises(UnsupportedOpError) as error:
        IntegerProgram.from_graph(gm)
    message = str(error.value)
    assert "erf" in message and "sin" in message and "amax" in message
    assert "3 node(s)" in message


def test_a_bias_beyond_int32_is_refused_not_wrapped():
    from mpqc.errors import MpqcError
    from mpqc.passes.insert_quantizers import quantized_layers

    model = torch.nn.Sequential(torch.nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    x = torch.randn(4, 16)
    gm, _ = quantized_graph(model, x)
    with torch.no_grad():
        quantized_layers(gm)[0].input_quantizer.log_range.fill_(-20.0)  # a collapsed input range
    gm, _ = freeze_at_random_bits(gm, seed=0)
    with pytest.raises(MpqcError, match="more than int32 holds"):
        IntegerProgram.from_graph(gm)


def test_targets_refuse_a_model_that_was_not_frozen():
    from mpqc.errors import MpqcError
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.tvm import lower

    x = torch.randn(2, 1, 8, 8)
    gm, _ = quantized_graph(example_models.small_cnn(), x)
    for target in (lambda: lower(gm, input_shape=(1, 1, 8, 8)), lambda: export_onnx(gm, "/tmp/never.onnx")):
        with pytest.raises(MpqcError, match="not frozen"):
            target()
    frozen, _ = freeze_at_random_bits(gm)
    assert IntegerProgram.of(frozen).layer_bits() == IntegerProgram.from_graph(frozen).layer_bits()


@pytest.mark.parametrize("op, weight_shape, attrs, input_shape", [
    ("conv2d", (8, 128, 3, 3), {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}, (2, 128, 6, 6)),
    ("conv2d", (16, 1, 3, 3), {"stride": [2, 2], "padding": [1, 1], "dilation": [1, 1], "groups": 16}, (2, 16, 7, 7)),
    ("conv1d", (4, 64, 5), {"stride": [1], "padding": [2], "dilation": [2], "groups": 2}, (3, 128, 20)),
    ("linear", (10, 1152), {}, (5, 1152)),
])
@pytest.mark.parametrize("weight_max", [57, 127])  # 255 * 57 * 1152 is just below 2**24; 127 needs float64
def test_integer_layer_sums_are_exact_in_fp32_and_float64(op, weight_shape, attrs, input_shape, weight_max):
    """The fp32 fast path is taken only where every partial sum is an integer fp32 holds; the sums equal float64's,
    also with every code at its extreme (the largest possible sums)."""
    from mpqc.reference import integer_layer_sum

    generator = torch.Generator().manual_seed(weight_max)
    weight = torch.randint(-weight_max, weight_max + 1, weight_shape, generator=generator)
    weight[0] = weight_max
    for q in (torch.randint(0, 256, input_shape, generator=generator), torch.full(input_shape, 255)):
        exact = integer_layer_sum(op, q, weight, attrs)
        expected = {"linear": lambda: F.linear(q.double(), weight.double()),
                    "conv2d": lambda: F.conv2d(q.double(), weight.double(), None, **attrs),
                    "conv1d": lambda: F.conv1d(q.double(), weight.double(), None, **attrs)}[op]()
        assert torch.equal(exact.double(), expected)
        assert float(expected.abs().max()) % 1 == 0
