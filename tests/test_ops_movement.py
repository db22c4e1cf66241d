"""Data movement (``mpqc/ops/movement.py``, ``indexing.py``, ``concat.py``) and pools (``pooling.py``,
``adaptive.py``) in the integer program: at random mixed 2-8 bits, TVM is bit-exact with the reference at every
quantize node, onnxruntime agrees within 1 LSB, the fake-quant graph agrees step by step; scales move with their
channels; what cannot be exact is refused with the node's name."""
from __future__ import annotations

import os
import shutil

os.environ.setdefault("TVM_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from conftest import freeze_at_random_bits, mixed_bit_program, quantized_graph  # noqa: E402
from mpqc.errors import MpqcError, UnsupportedOpError  # noqa: E402
from mpqc.reference import IntegerProgram, IntValue  # noqa: E402
from test_reference import _fake_quant_codes  # noqa: E402


# --------------------------------------------------------------------------------------------- models
class ShuffleNetBlocks(nn.Module):
    """torchvision's ShuffleNetV2 units (chunk, cat, view/transpose/contiguous/view channel shuffle), then
    ``nn.ChannelShuffle``."""

    def __init__(self):
        super().__init__()
        from torchvision.models.shufflenetv2 import InvertedResidual

        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.down, self.unit = InvertedResidual(16, 32, 2), InvertedResidual(32, 32, 1)
        self.shuffle, self.head, self.fc = nn.ChannelShuffle(4), nn.Conv2d(32, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        y = self.head(self.shuffle(self.unit(self.down(self.stem(x)))))
        return self.fc(y.mean([2, 3]))


class Movement(nn.Module):
    """Integer values moved: cat of two differently scaled quantized values and an accumulator (per-channel
    scales), a 5-d view/permute/reshape, slicing with a step, constant padding (the channel dim too), stack,
    flatten(1, 2), transpose and indexing with ``...``/``None``/ints."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.c4, self.pad = nn.Conv2d(16, 8, 3), nn.ZeroPad2d((0, 1, 1, 0))
        self.fc = nn.Linear(4 * 5 * 5 + 8 * 4, 5)

    def forward(self, x):
        n = x.size(0)
        a = torch.relu(self.c1(x))  # quantized for c2 and c3
        b = torch.relu(self.c2(a))  # an accumulator
        c = self.c3(a)  # an accumulator of another scale
        j = torch.cat([a, b, c], 1)  # [n, 20, 10, 10]
        j = j[:, 2:18].view(n, 4, 4, 10, 10).permute(0, 2, 1, 3, 4).reshape(n, 16, 10, 10)
        p = self.pad(F.pad(j[:, :, 1:, ::2], (1, 0, 0, 1)))  # [n, 16, 11, 7]
        s = torch.stack([p[:, :8], p[:, 8:]], 2).flatten(1, 2)  # [n, 16, 11, 7]
        y = self.c4(s)  # [n, 8, 9, 5]
        z = y.transpose(2, 3)[..., None, 1:5, 0]  # [n, 8, 1, 4]: ..., None, a slice, an int
        w = F.pad(torch.relu(y), (0, 0, 0, 0, 1, 1))[:, 2:6, ::2]  # channel padding: [n, 4, 5, 5]
        return self.fc(torch.cat([w.flatten(1), z[:, :, 0].flatten(1)], 1))


class FloatSteps(nn.Module):
    """Movement of float values (ReLU6 outputs): every op as a step of the quantize node's region, a padding value
    that is not 0, a cat of an integer and a float value."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 12, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 8, 3)
        self.fc = nn.Linear(8 * 3 * 4, 5)

    def forward(self, x):
        a = F.relu6(self.c1(x))  # float [n, 8, 8, 8]
        b = torch.relu(self.c0(x))  # integer [n, 12, 8, 8]
        u, v = a.chunk(2, 1)
        m = torch.cat([v, b[:, 4:], u], 1)  # a float cat with an integer part
        m = F.channel_shuffle(m, 2).transpose(2, 3).reshape(-1, 16, 8, 8)
        m = F.pad(m, (1, 1, 1, 1), value=0.5)
        q, r = torch.split(m, [6, 10], 1)
        m = torch.stack([q[:, :4], r[:, :4]], 1).flatten(1, 2)[:, :, 1:, 2:]  # [n, 8, 9, 8]
        m = torch.cat([m, torch.relu(m)], 1)
        y = F.relu6(self.c2(m))  # [n, 8, 7, 6]
        return self.fc(y[:, :, ::3, 1:5].flatten(1))


class Pools2d(nn.Module):
    """Adaptive average and max pooling to sizes whose windows differ and overlap and to a divisor of the input
    (ONNX: MatMul / Gather, or AveragePool / MaxPool), adaptive max pooling on (ReLU6) floats too, average pools
    with ceil_mode / count_include_pad both ways."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.aap, self.aap_even, self.amp = nn.AdaptiveAvgPool2d((3, 4)), nn.AdaptiveAvgPool2d(5), \
            nn.AdaptiveMaxPool2d((4, 3))
        self.amp_even = nn.AdaptiveMaxPool2d(5)
        self.ap = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True)
        self.fc = nn.Linear(8 * (12 + 25 + 12 + 25 + 12 + 36 + 16), 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))  # [n, 8, 10, 10]
        f = F.relu6(self.c2(a))  # float
        parts = [self.aap(a), self.aap_even(a), self.amp(a), self.amp_even(a), F.adaptive_max_pool2d(f, (3, 4)),
                 self.ap(a)[:, :, :6, :6], F.avg_pool2d(f, 3, 3, 1, ceil_mode=True, count_include_pad=False)]
        return self.fc(torch.cat([p.flatten(1) for p in parts], 1))


class Pools1d(nn.Module):
    """MaxPool1d (padding, dilation, ceil_mode), AvgPool1d both ways, AdaptiveAvgPool1d/AdaptiveMaxPool1d to sizes
    that do not divide the input."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=1)
        self.mp, self.ap = nn.MaxPool1d(3, 2, 1, dilation=2, ceil_mode=True), nn.AvgPool1d(3, 2, 1, ceil_mode=True)
        self.aap, self.amp = nn.AdaptiveAvgPool1d(5), nn.AdaptiveMaxPool1d(7)
        self.fc = nn.Linear(6 * (8 + 9 + 5 + 7 + 6), 3)

    def forward(self, x):
        a = torch.relu(self.c1(x))  # [n, 6, 17]
        parts = [self.mp(a), self.ap(a), self.aap(a), self.amp(F.relu6(a)),
                 F.avg_pool1d(a, 4, 3, 2, count_include_pad=False)]
        return self.fc(torch.cat([p.flatten(1) for p in parts], 1))


MOVEMENT_MODELS = {
    "shufflenet_blocks": (ShuffleNetBlocks, (2, 3, 32, 32)),
    "movement": (Movement, (2, 3, 10, 10)),
    "float_steps": (FloatSteps, (2, 3, 8, 8)),
}
POOL_MODELS = {"pools2d": (Pools2d, (2, 3, 10, 10)), "pools1d": (Pools1d, (2, 2, 17))}
MODELS = {**MOVEMENT_MODELS, **POOL_MODELS}


SEEDS = {"pools1d": 4}  # (two layers: a seed that draws 3+ distinct bit-widths for their 4 quantizers)


def program_of(name: str):
    """The model's fake-quant graph frozen at random mixed 2-8 bits, its program and an input."""
    return mixed_bit_program(*MODELS[name], SEEDS.get(name, 3))


# --------------------------------------------------------------------------------------------- checks
def assert_bit_exact_on_tvm(program: IntegerProgram, x: torch.Tensor) -> None:
    mtvm = pytest.importorskip("mpqc.targets.tvm")
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers)
    assert not lowered.inexact
    assert torch.equal(lowered(x), program.run(x))
    env, codes = program.run_all(x), lowered.exposed(x)
    for name in quantizers:
        assert torch.equal(torch.from_numpy(codes[name]).to(torch.int64), env[name].q), f"{name}: codes differ"


def assert_agrees_with_onnxruntime(program: IntegerProgram, x: torch.Tensor, tmp_path, cpu: str | None = None) -> None:
    """The contract (stepwise and end to end within 1 LSB), every quantizer never more than 1 LSB off."""
    from mpqc.targets.onnx import export_onnx
    from mpqc.targets.onnx_check import compare_with_reference, contract_violations

    exported = export_onnx(program, tmp_path / "model.onnx", input_shapes=[tuple(x.shape)])
    x2 = 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    agreement = compare_with_reference(program, exported.path, x2, cpu=cpu)
    assert contract_violations(agreement) == [], agreement
    for stats in agreement["quantizers"].values():
        assert stats["max_lsb"] <= 1 and stats["end_to_end_max_lsb"] <= 1, stats


def assert_agrees_with_fake_quant(gm, program: IntegerProgram, x: torch.Tensor) -> None:
    """Step by step (the reference re-run on the fake-quant codes): every code within 1 LSB; the outputs close."""
    codes, fake = _fake_quant_codes(gm, x)
    stepwise = {node.name: x for node in program.nodes if node.op == "input"}
    flips = total = 0
    for node in program.nodes:
        if node.op == "input":
            continue
        value = program.step(node, stepwise)
        if node.name in codes:
            diff = (value.q - codes[node.name]).abs()
            assert int(diff.max()) <= 1, f"{node.name}: {int(diff.max())} LSB from the fake-quant graph"
            flips, total = flips + int((diff > 0).sum()), total + diff.numel()
            value = IntValue(codes[node.name], value.scale)
        stepwise[node.name] = value
    assert total and flips / total < 5e-3, f"{flips}/{total} codes flipped"
    with torch.no_grad():
        assert (program.run(x) - fake).abs().max() <= 0.05 * fake.abs().max()


# --------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", list(MOVEMENT_MODELS))
def test_movement_is_bit_exact_on_tvm(name):
    _, program, x = program_of(name)
    assert_bit_exact_on_tvm(program, x)


@pytest.mark.parametrize("name", list(MOVEMENT_MODELS))
def test_movement_agrees_with_onnxruntime(name, tmp_path):
    _, program, x = program_of(name)
    assert_agrees_with_onnxruntime(program, x, tmp_path)


@pytest.mark.parametrize("name", list(MODELS))
def test_movement_agrees_with_the_fake_quant_graph(name):
    gm, program, x = program_of(name)
    assert_agrees_with_fake_quant(gm, program, x)


@pytest.mark.parametrize("name", list(POOL_MODELS))
def test_pools_are_bit_exact_on_tvm(name):
    _, program, x = program_of(name)
    assert_bit_exact_on_tvm(program, x)


@pytest.mark.parametrize("name", list(POOL_MODELS))
def test_pools_agree_with_onnxruntime(name, tmp_path):
    _, program, x = program_of(name)
    assert_agrees_with_onnxruntime(program, x, tmp_path)


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="needs QEMU's user-mode emulator (qemu-user)")
@pytest.mark.parametrize("name", list(MODELS))
def test_onnxruntime_agrees_on_an_emulated_avx2_cpu(name, tmp_path):
    """onnxruntime's AVX2 kernels (QEMU Haswell), whatever the host: the same contract."""
    _, program, x = program_of(name)
    assert_agrees_with_onnxruntime(program, x, tmp_path, cpu="Haswell")


# --------------------------------------------------------------------------------------------- structure
def quantizer_of(program: IntegerProgram, layer: str):
    return next(node for node in program.nodes
                if node.op == "quantize" and node.attrs["module"] == f"act_quantizers.{layer}")


def test_cat_of_differently_scaled_integers_keeps_each_scale_until_the_quantize_node():
    """``cat([a, b, c])`` of two quantized values and an accumulator is an integer value whose per-channel scale
    holds each input's scales; the view/permute/reshape channel shuffle moves them with their channels; the next
    quantize node requantizes the moved value in its region (a leaf, each channel with its own multiplier)."""
    _, program, x = program_of("movement")
    env = program.run_all(x)
    cat = next(node for node in program.nodes if node.op == "cat")
    a, b, c = (env[name] for name in cat.inputs)
    joined = env[cat.name]
    assert isinstance(joined, IntValue) and joined.scale.shape == (1, 20, 1, 1)
    expected = torch.cat([s.expand(1, n, 1, 1) if s.dim() == 0 else s.reshape(1, n, 1, 1)
                          for s, n in ((a.scale, 8), (b.scale, 8), (c.scale, 4))], 1)
    assert torch.equal(joined.scale, expected)
    assert len(set(expected.flatten().tolist())) > 3
    shuffled = env[next(node.name for node in program.nodes if node.op == "reshape" and
                        node.attrs["shape"] == [-1, 16, 10, 10])]
    order = torch.arange(2, 18).view(4, 4).t().reshape(-1)  # the channels of j[:, 2:18] after the shuffle
    assert torch.equal(shuffled.scale.flatten(), expected.flatten()[order])
    assert torch.equal(shuffled.q, joined.q[:, order])
    quantize = quantizer_of(program, "c4")
    assert quantize.attrs["region"] == {"steps": [], "leaves": [quantize.inputs[0]]}


def test_float_movement_is_fused_into_the_requantisation_region():
    _, program, _ = program_of("float_steps")
    quantize = quantizer_of(program, "c2")
    steps = {program.node(name).op for name in quantize.attrs["region"]["steps"]}
    assert {"split", "getitem", "cat", "channel_shuffle", "transpose", "reshape", "pad", "stack", "slice",
            "clamp", "relu"} <= steps
    leaves = {program.node(name).op for name in quantize.attrs["region"]["leaves"]}
    assert leaves <= {"conv2d", "relu", "slice"}  # integer values only: c1's accumulator, relu(c0) and its slice


def test_shape_arithmetic_is_bookkeeping_and_views_take_the_traced_sizes():
    _, program, _ = program_of("shufflenet_blocks")
    views = [node.attrs["shape"] for node in program.nodes if node.op == "reshape"]
    assert [-1, 2, 16, 8, 8] in views and [-1, 32, 8, 8] in views  # x.view(b, 2, c // 2, h, w), x.view(b, c, h, w)
    assert {node.op for node in program.nodes} >= {"split", "getitem", "transpose", "channel_shuffle", "cat"}


# --------------------------------------------------------------------------------------------- clear errors
class _Refused(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.c1, self.c2 = kind, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)
        self.ap, self.amp = nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.AdaptiveMaxPool2d(2, return_indices=True)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        if self.kind == "reflect":
            a = F.pad(a, (1, 1, 1, 1), mode="reflect")
        elif self.kind == "runtime_slice":
            a = a[:, : a.size(1) // 2].repeat(1, 2, 1, 1)
        elif self.kind == "indices":
            a = self.amp(a)[0]
        elif self.kind == "pad_value":
            a = F.pad(a, (1, 1), value=1.0)[..., 1:-1]
        elif self.kind == "mixed_scales":
            a = F.max_pool2d(self.ap(a), 2)  # codes of different scales in one window
        elif self.kind == "tensor_index":
            a = a[:, [0, 2, 1, 3, 4, 5, 6, 7]]
        return self.c2(a)


@pytest.mark.parametrize("kind, error, match", [
    ("reflect", UnsupportedOpError, r"pad.*padding mode 'reflect' \(constant padding only\)"),
    ("runtime_slice", UnsupportedOpError, r"a slice with bounds computed at run time"),
    ("indices", UnsupportedOpError, r"adaptive max pooling with return_indices"),
    ("tensor_index", UnsupportedOpError, r"advanced indexing with a list or tensor of indices"),
    ("pad_value", MpqcError, r"node 'pad': padding an integer value with 1.0"),
    ("mixed_scales", MpqcError, r"node 'max_pool2d': max_pool2d of an integer value whose scale varies"),
])
def test_what_cannot_be_exact_is_refused_naming_the_node(kind, error, match):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm, _ = quantized_graph(_Refused(kind), x)
    gm, _ = freeze_at_random_bits(gm, seed=1)
    with pytest.raises(error, match=match):
        IntegerProgram.from_graph(gm).run(x)


def test_cat_is_integer_only_when_every_input_is():
    """Before/Expected regions: a cat of two accumulators is an integer value (a leaf of the next quantize
    node); with a float input (a clamp) it is a float step, its integer input a leaf."""
    from mpqc.ops import IntNode
    from mpqc.passes.to_integer_program import fuse_requantize, integer_values

    q = {"bits": 8, "signed": True, "scale": 0.1}
    conv = {"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "weight_bits": 4, "module": "c"}
    head = [IntNode("x", "input", []), IntNode("q0", "quantize", ["x"], dict(q)),
            IntNode("c1", "conv2d", ["q0"], dict(conv)), IntNode("c2", "conv2d", ["q0"], dict(conv))]
    integer = head + [IntNode("j", "cat", ["c1", "c2"], {"dim": 1}), IntNode("q1", "quantize", ["j"], dict(q))]
    assert "j" in integer_values(integer)
    assert fuse_requantize(integer)[-1].attrs["region"] == {"steps": [], "leaves": ["j"]}
    mixed = head + [IntNode("k", "clamp", ["c2"], {"min": 0.0, "max": 6.0}),
                    IntNode("j", "cat", ["c1", "k"], {"dim": 1}), IntNode("q1", "quantize", ["j"], dict(q))]
    assert "j" not in integer_values(mixed)
    assert fuse_requantize(mixed)[-1].attrs["region"] == {"steps": ["k", "j"], "leaves": ["c1", "c2"]}
