"""The TVM target (``mpqc.targets.tvm``): bit for bit equal to the integer reference, artifacts that run with the TVM
runtime alone, CUDA code that compiles, and the arithmetic traps it avoids (FMA contraction, rounding, sum order)."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM's pool starts one thread here otherwise (TVM_NOTES trap 2)

import json  # noqa: E402
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from conftest import (build_conv_kernel, conv_reference, example_models, extreme_codes, freeze_at_random_bits,
                      mixed_bit_program, quantized_graph, randomize_batchnorm)
from mpqc.errors import ConfigError, MpqcError, UnsupportedOpError
from mpqc.reference import IntegerProgram, IntNode, IntValue

tvm = pytest.importorskip("tvm")
from mpqc.targets import tvm as mtvm  # noqa: E402
from mpqc.targets.tvm import target as tvm_target  # noqa: E402
from mpqc.targets.tvm import weights as tvm_weights  # noqa: E402
from mpqc.targets.tvm.kernels import avx2 as tvm_avx2  # noqa: E402
from mpqc.targets.tvm.kernels import amx, avx512_vnni, implicit_gemm  # noqa: E402
from mpqc.targets.tvm.kernels import registry as tvm_kernels  # noqa: E402

HOST_HAS_VNNI = avx512_vnni.target_has_vnni(tvm.target.Target(mtvm.host_target()))
needs_vnni = pytest.mark.skipif(not HOST_HAS_VNNI, reason="this CPU has no avx512_vnni")
HOST_HAS_AVX2 = tvm_avx2.target_has_avx2(tvm.target.Target(mtvm.host_target()))
needs_avx2 = pytest.mark.skipif(not HOST_HAS_AVX2, reason="this CPU has no avx2")
AVX2_TARGET = {"kind": "llvm", "mcpu": "x86-64-v3"}  # AVX2 code only, on any AVX2 host (VNNI ones included)

MODELS = {
    "resnet20": (lambda: example_models.resnet20(), (4, 1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 64, 64)),
    "token_mlp": (lambda: TokenMLP(), (2, 5, 24)),
}
FMA = re.compile(r"\bvfn?m(?:add|sub)\w*")


def _program(name: str, seed: int = 1) -> tuple[IntegerProgram, torch.Tensor]:
    _, program, x = mixed_bit_program(*MODELS[name], seed)
    return program, x


def _assert_bit_exact(program: IntegerProgram, lowered: mtvm.LoweredModule, x: torch.Tensor) -> None:
    assert torch.equal(lowered(x), program.run(x))
    env = program.run_all(x)
    codes = lowered.exposed(x)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    assert sorted(codes) == sorted(quantizers)
    for name in quantizers:
        ref: IntValue = env[name]
        ours = torch.from_numpy(codes[name])
        assert ours.dtype in (torch.int8, torch.uint8)
        assert torch.equal(ours.to(torch.int64), ref.q), f"{name}: 8-bit codes differ from the reference"


@pytest.fixture(scope="module")
def resnet20():
    program, x = _program("resnet20")
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    return program, x, mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers)


# --------------------------------------------------------------------------------------------- bit-exact
def test_resnet20_is_bit_exact_with_the_reference(resnet20):
    program, x, lowered = resnet20
    _assert_bit_exact(program, lowered, x)
    # another input, with values far outside the calibration range (clamps saturate)
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) * 4
    assert torch.equal(lowered(x2), program.run(x2))


def test_no_fused_multiply_add_in_the_cpu_code(resnet20):
    """TVM's LLVM backend contracts a*b + c into one FMA (one rounding) unless the product is fenced. The whole
    module, residual requantisations included, must contain no FMA instruction (its conv sums are integer)."""
    _, _, lowered = resnet20
    asm = lowered.source("asm")
    assert "vpdpbusd" in asm or "vpmaddwd" in asm or "vpmulld" in asm  # integer dot products are there
    assert not FMA.findall(asm)


@pytest.mark.parametrize("name", [
    # depthwise convs, ReLU6 clamps, residual adds between quantizers, fp32 global mean (the full suite only: 25 s;
    # depthwise/grouped convs stay in the fast suite in test_less_common_ops_are_bit_exact)
    pytest.param("mobilenet_v2", marks=pytest.mark.slow),
    "resnet18",  # max pooling, strided 1x1 shortcuts, the 8-bit quantizer before the global pool
])
def test_torchvision_models_are_bit_exact(name):
    program, x = _program(name)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers)
    assert not lowered.inexact
    _assert_bit_exact(program, lowered, x)


class _LessCommonOps(torch.nn.Module):
    """Integer avg-pool (a sum), grouped conv, ReLU6, cat of dequantized values, ceil-mode max pool on floats."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.bn, self.relu, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2)
        self.c2, self.relu6 = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.ReLU6()
        self.mp, self.c3, self.fc = nn.MaxPool2d(3, 2, 1, ceil_mode=True), nn.Conv2d(16, 4, 1), nn.Linear(100, 5)

    def forward(self, x):
        a = self.pool(self.relu(self.bn(self.c1(x))))
        b = self.relu6(self.c2(a))
        return self.fc(torch.flatten(self.c3(self.mp(torch.cat([a, b], 1))), 1))


class _Conv1d(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.relu, self.fc = torch.nn.Conv1d(2, 6, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Linear(48, 3)

    def forward(self, x):
        return self.fc(self.relu(self.c(x)).flatten(1))


@pytest.mark.parametrize("model, shape", [(_LessCommonOps, (2, 3, 16, 16)), (_Conv1d, (2, 2, 16))],
                         ids=["pools-cat-groups", "conv1d"])
def test_less_common_ops_are_bit_exact(model, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    gm, _ = quantized_graph(randomize_batchnorm(model()), x)
    gm, _ = freeze_at_random_bits(gm, seed=2)
    program = IntegerProgram.from_graph(gm)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    _assert_bit_exact(program, mtvm.lower(program, input_shape=shape, expose=quantizers), x)


class _PoolsOfAccumulators(torch.nn.Module):
    """A ResNet stem (conv, ReLU, 3x3/2 max pool with padding) and a signed conv output max-pooled with ceil_mode."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.relu, self.mp = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        self.c2, self.mp2, self.fc = nn.Conv2d(16, 8, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Linear(8 * 25, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.mp2(self.c2(self.mp(self.relu(self.c1(x))))), 1))


@pytest.mark.parametrize("isa", ["generic", "auto"])
def test_max_pools_of_accumulators_run_on_the_requantized_codes(isa):
    """A max pool whose result is requantised runs after the requantisation, on 8-bit codes (rounding is monotone,
    so the codes are the same): no int32 pool is left in the module, and it is bit-exact with the reference, the
    stem's unsigned codes and the signed ones with ceil_mode alike."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 22, 22)  # 22 -> 11 -> 9: the ceil_mode pool's last window hangs over the edge
    gm, _ = quantized_graph(_PoolsOfAccumulators(), x)
    gm, _ = freeze_at_random_bits(gm, seed=3)
    program = IntegerProgram.from_graph(gm)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers, isa=isa)
    pools = [line for line in lowered.ir_module["main"].script().splitlines() if "max_pool2d" in line]
    assert len(pools) == 2 and all(re.search(r'dtype="u?int8"\) = R.nn.max_pool2d', line) for line in pools), pools
    _assert_bit_exact(program, lowered, x)


class _InvertedResidual(torch.nn.Module):
    """MobileNetV2's block: 1x1 expansion, ReLU6, depthwise 3x3 (stride 2), then a grouped 3x3 (8 groups of 4
    channels, dilated, as ResNeXt/RegNet group theirs), 1x1 projection, and a residual add."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.expand, self.act = nn.Conv2d(8, 32, 1), nn.ReLU6()
        self.dw1, self.dw2 = nn.Conv2d(32, 32, 3, 2, 1, groups=32), nn.Conv2d(32, 32, 3, 1, 2, dilation=2, groups=8)
        self.project, self.shortcut, self.fc = nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 1), nn.Linear(16, 3)

    def forward(self, x):
        a = self.act(self.dw1(self.act(self.expand(x))))
        b = self.project(self.act(self.dw2(a)))
        return self.fc((b + self.shortcut(a)).mean((2, 3)))


def test_depthwise_convs_between_kernel_layers_stay_channels_last():
    """A depthwise or grouped conv reading a layer kernel's channels-last output runs channels-last (``hwio``
    weights): no transpose to NCHW and back around it, and every code is the reference's."""
    isa = tvm_kernels.resolve_isa(tvm.target.Target(mtvm.host_target()), "auto")
    if isa == "generic":
        pytest.skip("this CPU has no ISA kernel, so nothing is channels-last")
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    gm, _ = quantized_graph(randomize_batchnorm(_InvertedResidual()), x)
    gm, _ = freeze_at_random_bits(gm, seed=4)
    program = IntegerProgram.from_graph(gm)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    main = mtvm.lower(program, input_shape=tuple(x.shape)).ir_module["main"].script()
    assert main.count('data_layout="NHWC", kernel_layout="HWIO"') == 2
    assert main.count("permute_dims") == 1  # the one before the global mean's integer sum
    assert "permute_dims" not in main[:main.rindex('kernel_layout="HWIO"')]
    _assert_bit_exact(program, mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers), x)


# --------------------------------------------------------------------------------------------- the traps
class _Reductions(torch.nn.Module):
    """mean over the spatial dims (an integer sum of 8-bit codes), sum over the last dim of an int32 accumulator
    (an int64 sum), keepdim both ways."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)
        self.fc = torch.nn.Linear(8 + 4 * 8, 5)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        pooled = torch.mean(a, dim=[-2, -1], keepdim=True).flatten(1)
        summed = self.c2(a).sum(-1)
        return self.fc(torch.cat([pooled, summed.flatten(1)], 1))


@pytest.mark.parametrize("seed", [2, 5])
def test_reductions_are_bit_exact(seed):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm, _ = quantized_graph(_Reductions(), x)
    gm, _ = freeze_at_random_bits(gm, seed=seed)
    program = IntegerProgram.from_graph(gm)
    assert [node.op for node in program.nodes if node.op in ("mean", "sum")] == ["mean", "sum"]
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    _assert_bit_exact(program, mtvm.lower(program, input_shape=x.shape, expose=quantizers), x)


class _PaddedPools(torch.nn.Module):
    """Average pools with padding: count_include_pad both ways, ceil_mode (a partial last window)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)
        self.pool = torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.fc = torch.nn.Linear(4 * 5 * 5, 5)

    def forward(self, x):
        a = torch.nn.functional.avg_pool2d(torch.relu(self.c1(x)), 3, 1, 1)
        return self.fc(torch.flatten(self.pool(self.c2(a)), 1))


@pytest.mark.parametrize("seed", [1, 3])
def test_padded_avg_pools_are_bit_exact(seed):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    gm, _ = quantized_graph(_PaddedPools(), x)
    gm, _ = freeze_at_random_bits(gm, seed=seed)
    program = IntegerProgram.from_graph(gm)
    pools = [node for node in program.nodes if node.op == "avg_pool2d"]
    assert [p.attrs["count_include_pad"] for p in pools] == [True, False] and pools[1].attrs["ceil_mode"]
    with torch.no_grad():
        assert (program.run(x) - gm(x)).abs().max() < 0.1 * gm(x).abs().max()  # the fake-quant graph agrees
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    _assert_bit_exact(program, mtvm.lower(program, input_shape=x.shape, expose=quantizers), x)


def test_exact_multiply_is_not_contracted_into_fma():
    """a*M1 + b*M2 over vectors, inlined and vectorized: a plain product is fused into FMAs by TVM's LLVM backend
    (results change); the fenced product of ``_exact_mul_te`` is not (equal to NumPy's fp32 arithmetic)."""
    from tvm import te

    n = 4096
    a, m1, b, m2 = (te.placeholder((n,), "float32", name=name) for name in ("a", "m1", "b", "m2"))
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    expected = values[0] * values[1] + values[2] * values[3]

    def build(mul):
        out = te.compute((n,), lambda i: mul(a, m1)[i] + mul(b, m2)[i], name="out")
        sch = tvm.s_tir.Schedule(te.create_prim_func([a, m1, b, m2, out]))
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint != "out":
                sch.compute_inline(block)
        _, inner = sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, 16])
        sch.vectorize(inner)
        lib = tvm.compile(sch.mod, target=tvm.target.Target(mtvm.host_target()))
        result = tvm.runtime.tensor(np.zeros(n, np.float32))
        lib["main"](*[tvm.runtime.tensor(v) for v in values], result)
        return result.numpy(), lib.mod.inspect_source("asm")

    fenced, fenced_asm = build(lambda x, y: mtvm._exact_mul_te(x, y, mode="llvm"))
    plain, plain_asm = build(lambda x, y: te.compute(x.shape, lambda i: x[i] * y[i], name="mul"))
    assert np.array_equal(fenced, expected) and not FMA.findall(fenced_asm)
    if FMA.findall(plain_asm):  # the trap exists on this machine (FMA hardware): it changes results
        assert (plain != expected).mean() > 0.05


def test_relax_round_is_half_to_even():
    from tvm import relax
    from tvm.relax import op as R

    ties = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -127.5, 0.49999997, 2.5000002], np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(ties.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():  # the CUDA requantisation: Relax round (nearbyintf)
            out = bb.emit_output(R.astype(R.round(x), "int32"))
        bb.emit_func_output(out)
    with bb.function("requantize", [x]):
        with bb.dataflow():  # the CPU requantisation: llvm.roundeven (vectorizes; Relax round's nearbyint does not)
            requantized = bb.emit_output(bb.emit_te(mtvm._round_clip_te, x, -127, 127, "int8"))
        bb.emit_func_output(requantized)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(mtvm.host_target())), tvm.cpu())
    expected = torch.round(torch.from_numpy(ties))
    assert np.array_equal(vm["main"](tvm.runtime.tensor(ties)).numpy(), expected.to(torch.int32).numpy())
    assert np.array_equal(vm["requantize"](tvm.runtime.tensor(ties)).numpy(),
                          expected.clamp(-127, 127).to(torch.int8).numpy())


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (4, 4), (7, 7), (8, 8), (14, 14), (20, 20), (31, 32)])
def test_torch_sum_order_reproduces_pytorch_mean(hw):
    """PyTorch's fp32 mean is not a sequential sum; ``torch_sum_order`` reproduces its order exactly."""
    x = (torch.randn((3, 5, *hw), generator=torch.Generator().manual_seed(hw[0])) * 7).float()
    rows = x.reshape(15, -1).numpy()
    ours = np.array([mtvm.torch_sum_order(list(row), lambda p, q: np.float32(p + q)) for row in rows], np.float32)
    ours = ours / np.float32(hw[0] * hw[1])
    assert np.array_equal(ours, F.adaptive_avg_pool2d(x, 1).reshape(-1).numpy())


# --------------------------------------------------------------------------------------------- VNNI kernels
def _vnni_kernel(geometry, x: np.ndarray, weight: np.ndarray, tile=None, micro=avx512_vnni.VNNI,
                 target=None) -> tuple[np.ndarray, str]:
    """Build, schedule (tensorized) and run one convolution on ``micro`` (VNNI by default); returns its int32
    NHWC output and the asm."""
    packed = tvm_weights.vnni_layout(weight)
    run, asm = build_conv_kernel(geometry, x.shape, str(x.dtype), packed.shape, tile, micro, target)
    return run(x, packed), asm


@needs_vnni
@pytest.mark.parametrize("layout, signed, channels, out, kernel, stride, padding, dilation, size, tile", [
    ("NHWC", False, 64, 32, (3, 3), (1, 1), (1, 1), (1, 1), 14, None),  # a ResNet 3x3 conv, default 7x2 tile
    ("NCHW", True, 3, 10, (7, 7), (2, 2), (3, 3), (1, 1), 30, (5, 1)),  # a stem: signed NCHW input, C=3, Co=10
    ("NHWC", False, 32, 48, (1, 1), (2, 2), (0, 0), (1, 1), 8, (4, 3)),  # a strided 1x1 shortcut: no copy stage
    ("NHWC", True, 8, 16, (3, 3), (1, 1), (2, 2), (2, 2), 9, (3, 1)),  # dilated, signed
    ("NC", True, 100, 10, (1, 1), (1, 1), (0, 0), (1, 1), 5, None),  # a linear layer on a batch of 5
])
def test_vnni_kernel_is_exact(layout, signed, channels, out, kernel, stride, padding, dilation, size, tile):
    """The hand-scheduled, tensorized VNNI convolution equals an exact float64 convolution, signed inputs included
    (the kernel sees x + 128; subtracting 128 * sum(w) per channel, as the lowering folds into the bias, is exact)."""
    rng = np.random.default_rng(0)
    dtype = np.int8 if signed else np.uint8
    low, high = (-127, 128) if signed else (0, 256)
    nchw = rng.integers(low, high, (2, channels, size, size) if layout != "NC" else (size, channels)).astype(dtype)
    weight = rng.integers(-127, 128, (out, channels, *kernel) if layout != "NC" else (out, channels)).astype(np.int8)
    x = nchw.transpose(0, 2, 3, 1).copy() if layout == "NHWC" else nchw
    geometry = implicit_gemm.ConvGeometry(layout, signed, channels, kernel, stride, padding, dilation)
    got, asm = _vnni_kernel(geometry, x, weight, implicit_gemm.Tile(*tile) if tile else None)
    assert re.search(r"vpdpbusd\s+%zmm", asm)
    if layout == "NC":
        expected = torch.from_numpy(nchw).double() @ torch.from_numpy(weight).double().T
        got = got.reshape(size, -1)
    else:
        expected = F.conv2d(torch.from_numpy(nchw).double(), torch.from_numpy(weight).double(), None, stride, padding,
                            dilation).permute(0, 2, 3, 1)
    if signed:
        got = got - 128 * np.pad(weight.reshape(out, -1).astype(np.int64).sum(1), (0, got.shape[-1] - out))
    assert np.array_equal(got[..., :out], expected.round().long().numpy())
    assert not got[..., out:].any()  # padded output channels read zero weights


@pytest.mark.parametrize("layout, channels", [("NCHW", 3), ("NHWC", 64)])
def test_the_input_stage_selects_between_clamped_reads_and_the_padding(layout, channels):
    """A padded conv's input stage (scheduled, nothing built: any host) reads the input at clamped indices under a
    ``Select`` (it vectorizes; a read guarded by ``if_then_else`` branched per pixel), the clamps kept by the
    simplifier (the padding's pixels never read out of bounds); a few-channel input's pixel loop runs serially in
    the parallel one (no fused index decomposed per pixel). Its values: the exactness tests above and in
    ``test_tvm_amx.py``."""
    from tvm import s_tir, te
    from tvm.tirx import ForKind

    geometry = implicit_gemm.ConvGeometry(layout, True, channels, (3, 3), (1, 1), (1, 1))
    shape = (2, channels, 9, 9) if layout == "NCHW" else (2, 9, 9, channels)
    x = te.placeholder(shape, "int8", name="x")
    w = te.placeholder((1, 9 * -(-channels // 4), 16, 4), "int8", name="w")
    sch = s_tir.Schedule(te.create_prim_func([x, w, implicit_gemm.conv2d_te(x, w, geometry)]))
    assert implicit_gemm.schedule_conv(sch, None, avx512_vnni.VNNI)
    stage = sch.get(sch.get_sblock(implicit_gemm.PAD_BLOCK))
    text = str(stage.body)
    assert "Select" in text and "if_then_else" not in text
    assert text.count("T.max(T.min(") >= 2  # the row and the column clamped in the read itself
    kinds = [sch.get(loop).kind for loop in sch.get_loops(sch.get_sblock(implicit_gemm.PAD_BLOCK))]
    assert kinds[0] == ForKind.PARALLEL and kinds[-1] == ForKind.VECTORIZED
    if channels < 16:  # 4 bytes per pixel: the pixel loop serial between the two
        assert kinds == [ForKind.PARALLEL, ForKind.SERIAL, ForKind.VECTORIZED]


@needs_vnni
def test_vnni_intrinsic_refuses_a_weight_that_is_not_packed():
    """TVM_NOTES trap 3: tensorizing a plain [N, K] weight compiled into silently wrong code. The intrinsic's
    buffers declare their strides, so such a match is refused (when the match is lowered) instead."""
    from tvm import s_tir, te

    a = te.placeholder((16, 64), "uint8", name="a")
    w = te.placeholder((32, 64), "int8", name="w")
    k = te.reduce_axis((0, 64), "k")
    c = te.compute((16, 32), lambda i, j: te.sum(a[i, k].astype("int32") * w[j, k].astype("int32"), axis=k),
                   name="c")
    sch = s_tir.Schedule(te.create_prim_func([a, w, c]).with_attr("global_symbol", "main"))
    i, j, kk = sch.get_loops(sch.get_sblock("c"))
    j_outer, j_inner = sch.split(j, [None, 16])
    k_outer, k_inner = sch.split(kk, [None, 4])
    sch.reorder(i, j_outer, k_outer, j_inner, k_inner)
    sch.decompose_reduction(sch.get_sblock("c"), k_outer)
    sch.tensorize(j_inner, avx512_vnni.register_intrinsic())
    with pytest.raises(Exception, match="strides"):
        tvm.compile(sch.mod, target=tvm.target.Target(mtvm.host_target()))


@needs_vnni
def test_the_vnni_choice_follows_the_target_features(resnet20):
    """Layers use the VNNI kernels where the target has avx512vnni (this host; on an AMX host the 64-channel convs
    use AMX) and TVM's own int8 ops where it does not (the same CPU described without the feature); both are
    bit-exact."""
    program, x, lowered = resnet20
    layers = [node.name for node in program.layers()]
    kernels = lowered.meta["kernel_layers"]
    assert sorted(kernels) == sorted(layers) and set(kernels.values()) <= {avx512_vnni.VNNI.block, amx.AMX.block}
    assert lowered.meta["vnni_layers"] == [layer for layer in layers if kernels[layer] == avx512_vnni.VNNI.block]
    assert lowered.schedules["vnni"] == lowered.schedules["vnni_functions"] > 0
    assert lowered.schedules["kernels"] == lowered.schedules["kernel_functions"]
    zmm_dot = re.compile(r"vpdpbusd\s+%zmm")  # the kernels' 512-bit dot products (LLVM may use xmm ones anyway)
    assert zmm_dot.search(lowered.source("asm"))
    host = mtvm.host_target()
    without = {**host, "mattr": [f for f in host["mattr"] if f != "+avx512vnni"]}
    assert not avx512_vnni.target_has_vnni(tvm.target.Target(without))
    plain = mtvm.lower(program, target=without, input_shape=tuple(x.shape))
    assert plain.meta["vnni_layers"] == [] and plain.schedules["vnni_functions"] == 0
    assert not zmm_dot.search(plain.source("asm"))
    assert torch.equal(plain(x), program.run(x))
    with pytest.raises(ConfigError, match="avx512vnni"):
        mtvm.lower(program, target=without, input_shape=tuple(x.shape), vnni=True)


# --------------------------------------------------------------------------------------------- packed weights
# --------------------------------------------------------------------------------------------- AVX2 kernels
@needs_avx2
@pytest.mark.parametrize("signed", [False, True])
def test_avx2_kernel_is_exact_at_every_bit_pair(signed):
    """Every weight x activation bit pair in 2..8 on the micro-kernel and shift the registry chooses for those bits
    (narrow, wide at 8 x 8, int16 multi-step ones where the bits leave room), with extreme codes (all-max and
    all-min activations against all-max / all-min weights): equal to an exact float64 convolution (signed: the
    kernel sees x + 2^(a-1); the lowering's bias correction ``2^(a-1) * sum(w)`` is subtracted here). Built for
    x86-64-v3, so the same code runs on every AVX2 host."""
    rng = np.random.default_rng(7)
    kernel = tvm_kernels.BY_ISA["avx2"]
    channels, out, size, padding = 32, 32, 5, (1, 1)
    built = {}
    for activation_bits in range(2, 9):
        for weight_bits in range(2, 9):
            facts = tvm_kernels.LayerFacts("conv2d", 1, weight_bits, activation_bits, signed, 4, channels)
            micro, shift = kernel.micro(facts), kernel.shift(facts)
            assert (micro is tvm_avx2.WIDE) == (weight_bits == 8 and activation_bits == 8)
            geometry = implicit_gemm.ConvGeometry("NHWC", signed, channels, (3, 3), (1, 1), padding, shift=shift)
            key = (micro.block, signed, shift)
            if key not in built:
                built[key] = build_conv_kernel(geometry, (4, size, size, channels), "int8" if signed else "uint8",
                                               (out // 16, 9 * channels // 4, 16, 4), micro=micro, target=AVX2_TARGET)
            run, asm = built[key]
            assert "vpmaddubsw" in asm and "zmm" not in asm
            low, high = (-(2 ** (activation_bits - 1) - 1), 2 ** (activation_bits - 1) - 1) if signed else \
                (0, 2**activation_bits - 1)
            x = extreme_codes(rng, (4, channels, size, size), low, high)  # all high, all low, 2 random
            half = 2 ** (weight_bits - 1) - 1
            weight = extreme_codes(rng, (out, channels, 3, 3), -half, half).astype(np.int8)
            got = run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype("int8" if signed else "uint8"),
                      tvm_weights.vnni_layout(weight))
            if signed:
                got = got - shift * weight.reshape(out, -1).astype(np.int64).sum(1)
            assert np.array_equal(got, conv_reference(x, weight, padding)), \
                f"w{weight_bits} a{activation_bits} signed={signed}"
    blocks = {block for block, _, _ in built}
    assert blocks == {"avx2_conv", "avx2wide_conv", "avx2s2_conv", "avx2s4_conv", "avx2s8_conv"}


@needs_avx2
def test_narrow_avx2_form_would_saturate_at_8x8_bits():
    """The test above can fail: 8-bit weights x 8-bit unsigned activations on the narrow form (``vpmaddubsw``'s
    int16 pair sums, 2*255*127 > 32767) are wrong, which is why the registry gives them the wide form."""
    assert tvm_avx2.needs_wide(8, 8) and not tvm_avx2.needs_wide(7, 8) and not tvm_avx2.needs_wide(8, 7)
    assert tvm_avx2.pair_bound(8, 7) <= 32767 and tvm_avx2.pair_bound(7, 8) <= 32767
    rng = np.random.default_rng(3)
    x = np.full((1, 8, 4, 4), 255, np.uint8)
    weight = extreme_codes(rng, (16, 8, 1, 1), -127, 127).astype(np.int8)
    geometry = implicit_gemm.ConvGeometry("NHWC", False, 8)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    expected = conv_reference(x, weight, (0, 0))
    narrow, _ = _vnni_kernel(geometry, nhwc, weight, micro=tvm_avx2.NARROW, target=AVX2_TARGET)
    wide, _ = _vnni_kernel(geometry, nhwc, weight, micro=tvm_avx2.WIDE, target=AVX2_TARGET)
    assert not np.array_equal(narrow, expected)
    assert np.array_equal(wide, expected)
    # int16 multi-step kernels: 8 steps hold only when 8 * pair_bound fits (4-bit weights: yes; 7-bit: no)
    assert tvm_avx2.int16_steps(4, 8) >= 8 and tvm_avx2.int16_steps(7, 8) == 1
    x = np.full((1, 32, 2, 2), 255, np.uint8)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    geometry = implicit_gemm.ConvGeometry("NHWC", False, 32)
    for half, exact in ((7, True), (63, False)):
        weight = extreme_codes(rng, (16, 32, 1, 1), -half, half).astype(np.int8)
        got, _ = _vnni_kernel(geometry, nhwc, weight, micro=tvm_avx2.MULTI_STEP[8], target=AVX2_TARGET)
        assert np.array_equal(got, conv_reference(x, weight, (0, 0))) == exact


@needs_avx2
def test_forced_avx2_lowering_is_bit_exact_on_any_host():
    """``isa="avx2"``: conv/linear layers on the AVX2 kernels (narrow or wide per layer from its bits), x86-64-v3
    code (no AVX-512 instruction, so it runs on VNNI hosts too), bit-exact with the reference, codes included."""
    program, x = _program("resnet20", seed=2)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers, isa="avx2")
    assert lowered.meta["isa"] == "avx2" and lowered.meta["vnni_layers"] == []
    bits = {lowered.meta["layer_nodes"][m]: b for m, b in program.layer_bits().items()}
    channels = {node.name: int(node.tensors["weight"].shape[1]) for node in program.layers()}
    expected = {layer: tvm_avx2.micro_kernel(w, a, channels[layer]).block for layer, (w, a) in bits.items()}
    assert lowered.meta["kernel_layers"] == expected
    assert lowered.schedules["kernels"] == lowered.schedules["kernel_functions"] > 0
    asm = lowered.source("asm")
    assert "vpmaddubsw" in asm and "%zmm" not in asm and "vpdpbusd" not in asm
    assert not FMA.findall(asm)
    _assert_bit_exact(program, lowered, x)


class TokenMLP(torch.nn.Module):
    """A transformer block's MLP on tokens ``[batch, tokens, features]``: LayerNorm (signed codes) -> linear -> ReLU
    (unsigned codes) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(24), torch.nn.Linear(24, 40), torch.nn.Linear(40, 8)

    def forward(self, x):
        return self.down(F.relu(self.up(self.norm(x))))


@needs_avx2
def test_linears_on_tokens_run_on_the_isa_kernel_bit_exact():
    """A linear on rank-3 tokens is one ``[rows, features]`` GEMM on the ISA's kernel (it ran on TVM's generic int8
    matmul before), for a signed and an unsigned input, bit-exact with the reference, codes included."""
    program, x = _program("token_mlp", seed=3)
    quantizers = [node.name for node in program.nodes if node.op == "quantize"]
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), expose=quantizers, isa="avx2")
    assert sorted(lowered.meta["kernel_layers"]) == sorted(node.name for node in program.layers())
    assert lowered.schedules["kernels"] == lowered.schedules["kernel_functions"] > 0
    _assert_bit_exact(program, lowered, x)


def test_layers_on_different_micro_kernels_are_never_merged():
    """Relax merges structurally equal PrimFuncs, and block names take no part in that equality: two layers of one
    geometry on different micro-kernels (e.g. 2 int16 steps and 4) once became one function, running one layer on
    a kernel its bits could overflow. The kernel is an annotation of the conv block, so every chosen micro-kernel
    keeps a function of its own (this program lost ``avx2s2_conv`` before)."""
    from tvm import tirx

    from mpqc.targets.tvm.schedule import block_names

    program, x = _program("resnet20", seed=1)
    built = mtvm.build_module(program, [tuple(x.shape)], isa="avx2")
    present = {name for _, func in built.mod.functions_items() if isinstance(func, tirx.PrimFunc)
               for name in block_names(func) if tvm_kernels.is_kernel_block(name)}
    assert len(set(built.kernel_layers.values())) >= 4
    assert present == set(built.kernel_layers.values())


def test_isa_choice_and_its_errors():
    """``auto`` takes the best ISA the target has; a forced one the target lacks is refused naming the feature;
    ``vnni=`` keeps its meaning; forcing AVX2 on an AVX-512 target builds for x86-64-v3."""
    v2, v3 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2"}), tvm.target.Target(AVX2_TARGET)
    v4 = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]})
    assert tvm_kernels.target_isas(v4) == ["avx512vnni", "avx2"] and tvm_kernels.target_isas(v3) == ["avx2"]
    assert [tvm_kernels.resolve_isa(t) for t in (v4, v3, v2)] == ["avx512vnni", "avx2", "generic"]
    assert tvm_kernels.resolve_isa(v4, "avx2") == "avx2" and tvm_kernels.resolve_isa(v4, vnni=False) == "generic"
    assert tvm_kernels.resolve_isa(v4, vnni=True) == "avx512vnni"
    with pytest.raises(ConfigError, match="avx2"):
        tvm_kernels.resolve_isa(v2, "avx2")
    with pytest.raises(ConfigError, match="avx512vnni"):
        tvm_kernels.resolve_isa(v3, vnni=True)
    with pytest.raises(ConfigError, match="contradicts"):
        tvm_kernels.resolve_isa(v4, "avx2", vnni=True)
    with pytest.raises(ConfigError, match="isa must be"):
        tvm_kernels.resolve_isa(v4, "sse")
    forced = tvm_kernels.isa_target(v4, "avx2")
    assert tvm_avx2.target_has_avx2(forced) and not avx512_vnni.target_has_vnni(forced)
    assert not tvm.target.codegen.target_has_features("avx512f", forced)
    assert tvm_kernels.isa_target(v3, "avx2") is v3
    depthwise = tvm_kernels.LayerFacts("conv2d", 8, 4, 4, False, 4)
    assert tvm_kernels.choose("avx2", depthwise) is None and tvm_kernels.choose("generic", depthwise) is None


def test_weight_layouts_refuse_what_they_cannot_hold():
    with pytest.raises(ConfigError, match="layout must be one of"):
        tvm_weights.WeightLayout("w", "conv", 4, (8, 3, 3, 3), "nchw16c")
    with pytest.raises(ConfigError, match="'io' layout is for 2-D"):
        tvm_weights.WeightLayout("w", "conv", 4, (8, 3, 3, 3), "io")
    for layout, shape, width in (("oihw", (8, 3, 3, 3), 8), ("vnni", (8, 3), 8), ("vnni", (8, 3, 3, 3), 2)):
        with pytest.raises(ConfigError, match="kernel_width"):  # widens a vnni conv2d kernel, never narrows one
            tvm_weights.WeightLayout("w", "conv", 4, shape, layout, kernel_width=width)


@pytest.mark.parametrize("layout", ["oihw", "hwio", "io", "vnni", "vnni-widened"])
def test_bit_packed_weights_unpack_exactly(layout):
    """Every bit-width 2..8, odd sizes (streams that end mid-byte), each kernel layout: pack in NumPy, unpack with
    the module's TE function, get the codes back (placed in the kernel's layout; ``vnni-widened``: a 3x3 kernel
    read as 3x8 with zero taps, as the AMX kernel reads a few-channel conv)."""
    from tvm import relax

    rng = np.random.default_rng(int.from_bytes(layout.encode(), "little") % 1000)
    shapes = {bits: (5, 3, 3, 3) if layout != "io" else (7, 13) for bits in range(2, 9)}
    width = 8 if layout == "vnni-widened" else 0
    layout = layout.removesuffix("-widened")
    specs = tvm_weights.place([tvm_weights.WeightLayout(f"w{bits}", f"layer{bits}", bits, shape, layout,
                                                        kernel_width=width) for bits, shape in shapes.items()])
    half = {bits: 2 ** (bits - 1) - 1 for bits in shapes}
    codes = {spec.name: rng.integers(-half[spec.bits], half[spec.bits] + 1, spec.shape).astype(np.int8)
             for spec in specs}
    packed = tvm_weights.pack_bits(specs, codes)
    assert packed.size == sum((spec.count * spec.bits + 7) // 8 for spec in specs) + 1
    bb = relax.BlockBuilder()
    var = relax.Var("packed", relax.TensorType(packed.shape, "uint8"))
    with bb.function("main", [var]):
        with bb.dataflow():
            out = bb.emit_output(relax.Tuple([bb.emit_te(lambda p, s=spec: tvm_weights.unpack_te(p, s), var)
                                              for spec in specs]))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target(mtvm.host_target())), tvm.cpu())
    unpacked = vm["main"](tvm.runtime.tensor(packed))
    arrange = {"oihw": lambda w: w, "hwio": lambda w: w.transpose(2, 3, 1, 0), "io": lambda w: w.T,
               "vnni": lambda w: tvm_weights.vnni_layout(w, width)}[layout]
    for spec, got in zip(specs, unpacked):
        assert np.array_equal(got.numpy(), arrange(codes[spec.name])), f"{spec.bits}-bit {layout}"
    codes["w3"][0, 0] = 4  # outside the signed 3-bit range
    with pytest.raises(MpqcError, match="layer3"):
        tvm_weights.pack_bits(specs, codes)


# --------------------------------------------------------------------------------------------- artifacts
def test_artifact_runs_with_tvm_and_numpy_only(resnet20, tmp_path):
    program, x, _ = resnet20
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), out=tmp_path / "artifact")
    files = {p.name for p in (tmp_path / "artifact").iterdir()}
    assert {"model.so", "params.bin", "model.json", "loader.py"} <= files
    meta = json.loads((tmp_path / "artifact" / "model.json").read_text())
    assert meta["format"] == mtvm.ARTIFACT_FORMAT and meta["inputs"][0]["shape"] == list(x.shape)
    assert meta["inputs"][0]["quantizers"][0]["bits"] <= 8
    assert meta["layers"] == {m: {"weight_bits": w, "activation_bits": a} for m, (w, a) in program.layer_bits().items()}
    np.save(tmp_path / "x.npy", x.numpy())
    # A deployment machine has no torch and no mpqc. Here both are installed, and tvm_ffi 0.1.14 imports torch
    # eagerly when it can (a workaround in tvm_ffi/__init__.py, skipped on ImportError), so the child process
    # makes them unimportable, as on such a machine, and checks that nothing loaded them anyway.
    script = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'mpqc', 'torchvision'):
            raise ImportError('not installed on a deployment machine: ' + name)
sys.meta_path.insert(0, NoTorch())
import numpy as np
sys.path.insert(0, {str(tmp_path / 'artifact')!r})
from loader import load
run = load({str(tmp_path / 'artifact')!r})
np.save({str(tmp_path / 'y.npy')!r}, run(np.load({str(tmp_path / 'x.npy')!r})))
leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mpqc', 'torchvision'))
assert not leaked, leaked
"""
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "y.npy")), program.run(x))
    assert torch.equal(lowered(x), program.run(x))


def test_artifact_weights_are_bit_packed(resnet20, tmp_path):
    """params.bin holds the weights at their own bit-widths (ResNet-20 at random 2-8 bits): within 2% of
    sum(bits * params) / 8; the module's unpack_weights gives back exactly the codes, in the kernels' layouts."""
    program, x, lowered = resnet20
    lowered.export(tmp_path)
    stored = tvm.runtime.load_param_dict((tmp_path / "params.bin").read_bytes())
    meta = json.loads((tmp_path / "model.json").read_text())
    layers = program.layers()
    assert len({node.attrs["weight_bits"] for node in layers}) > 3
    ideal = sum(node.attrs["weight_bits"] * node.tensors["weight"].numel() for node in layers) / 8
    weight_bytes = stored[meta["weights"]["packed"]].numpy().nbytes
    assert abs(weight_bytes - ideal) <= 0.02 * ideal
    assert meta["weights"]["packed_bytes"] == weight_bytes and meta["weights"]["bits_over_8"] == ideal
    biases = sum(stored[name].numpy().nbytes for name in meta["params"] if name.endswith(".bias"))
    assert sum(array.numpy().nbytes for array in stored.values()) == weight_bytes + biases  # nothing else stored
    unpacked = lowered.unpacked_weights()
    assert sorted(unpacked) == sorted(f"{node.name}.weight" for node in layers)
    for node in layers:
        codes = node.tensors["weight"].numpy()
        entry = meta["weights"]["layers"][f"{node.name}.weight"]
        arrange = {"oihw": lambda w: w, "hwio": lambda w: w.transpose(2, 3, 1, 0), "io": lambda w: w.T,
                   "vnni": lambda w: tvm_weights.vnni_layout(w, entry.get("kernel_width", 0))}[entry["layout"]]
        assert np.array_equal(unpacked[f"{node.name}.weight"], arrange(codes)), node.name


def test_unsupported_nodes_are_all_listed():
    nodes = [
        IntNode("x", "input", []),
        IntNode("q", "quantize", ["x"], {"bits": 24, "signed": True, "scale": 0.1, "module": "q"}),  # > 16
        IntNode("soft", "softmax", ["q"]),
        IntNode("pool", "adaptive_avg_pool2d", ["x"], {"output_size": [2, 2]}),  # (padded avg pools lower now)
        IntNode("relu", "relu", ["x"]),
    ]
    with pytest.raises(UnsupportedOpError) as error:
        mtvm.lower(IntegerProgram(nodes, ["relu"]), input_shape=(1, 1, 4, 4))
    message = str(error.value)
    assert "3 node(s)" in message
    assert all(name in message for name in ("q (quantize)", "soft (softmax)", "pool (adaptive_avg_pool2d)"))
    assert "relu (relu)" not in message


def test_input_shape_is_required_for_a_bare_program(resnet20):
    with pytest.raises(ConfigError, match="input_shape"):
        mtvm.lower(resnet20[0])


def test_host_target_comes_from_cpu_flags(monkeypatch):
    monkeypatch.setattr(tvm_target, "cpu_flags", lambda: {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c",
                                                           "sse4_2", "popcnt", "ssse3", "avx_vnni"})
    target = mtvm.host_target()
    assert target["mcpu"] == "x86-64-v3" and target["mattr"] == ["+avxvnni"]
    monkeypatch.setattr(tvm_target, "cpu_flags", lambda: set())
    assert "mcpu" not in mtvm.host_target()
    monkeypatch.undo()
    flags = mtvm.cpu_flags()
    if "avx512_vnni" in flags:
        assert "+avx512vnni" in mtvm.host_target()["mattr"]


# --------------------------------------------------------------------------------------------- tuning
def _small_cnn() -> tuple[IntegerProgram, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm, _ = quantized_graph(example_models.small_cnn(), x)
    gm, _ = freeze_at_random_bits(gm, seed=3)
    return IntegerProgram.from_graph(gm), x


def test_tuning_arguments_are_checked(tmp_path):
    program, x = _small_cnn()
    with pytest.raises(ConfigError, match="tuning_db"):
        mtvm.lower(program, input_shape=tuple(x.shape), trials=4)
    with pytest.raises(ConfigError, match="llvm only"):
        mtvm.lower(program, input_shape=tuple(x.shape), target="cuda", tuning_db=tmp_path)
    # an empty database applies no MetaSchedule record: the functions get the default schedule, still bit-exact;
    # the VNNI kernels' register tiles are measured (every candidate) and recorded per convolution geometry
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), tuning_db=tmp_path / "db")
    assert lowered.schedules["from_database"] == 0 and lowered.schedules["default_rule"] > 0
    assert torch.equal(lowered(x), program.run(x))
    if HOST_HAS_VNNI:
        tiles = json.loads((tmp_path / "db" / "vnni_tiles.json").read_text())
        assert len(tiles) == 3  # conv1, conv2 (strided), fc
        for record in tiles.values():
            assert f"{record['rows']}x{record['blocks']}" in record["candidates_ms"]
            assert record["ms"] == min(record["candidates_ms"].values())


@pytest.mark.slow  # MetaSchedule: minutes on 2 shared cores, even for 8 trials
def test_tuned_schedules_are_bit_exact_and_reused(tmp_path):
    program, x = _small_cnn()
    db = tmp_path / "db"
    tuned = mtvm.lower(program, input_shape=tuple(x.shape), trials=8, tuning_db=db)
    assert (db / "database_tuning_record.json").stat().st_size > 0
    assert tuned.schedules["from_database"] > 0
    assert torch.equal(tuned(x), program.run(x))
    tiles = (db / "vnni_tiles.json").read_text() if HOST_HAS_VNNI else None
    reused = mtvm.lower(program, input_shape=tuple(x.shape), tuning_db=db)  # no trials: the records are reused
    assert reused.schedules["from_database"] == tuned.schedules["from_database"]
    assert reused.schedules["vnni"] == tuned.schedules["vnni"] == tuned.schedules["vnni_functions"]
    assert reused.build_seconds < tuned.build_seconds / 5
    assert torch.equal(reused(x), program.run(x))
    if HOST_HAS_VNNI:
        assert (db / "vnni_tiles.json").read_text() == tiles  # nothing measured again


# --------------------------------------------------------------------------------------------- cuda
def _cuda_codegen_available() -> bool:
    if tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        return False
    from tvm.support import nvcc

    try:
        return bool(nvcc.find_cuda_path())
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cuda_codegen_available(), reason="this TVM build has no CUDA codegen or no CUDA toolkit")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_compiles_with_integer_accumulation(resnet20, arch):
    program, x, _ = resnet20
    lowered = mtvm.lower(program, target=f"cuda:{arch}", input_shape=tuple(x.shape))
    assert lowered.kind == "cuda" and arch in str(lowered.target)
    source = lowered.source()
    assert re.search(r"\bint \w*conv2d\w*local\w*\[", source), "conv accumulators are int32 registers"
    assert re.search(r"signed char\* __restrict__ \w*weight", source), "weights are read as int8"
    assert "__fmul_rn" in source and "nearbyintf" in source  # uncontracted products, round half to even
    with pytest.raises(Exception, match="cannot run"):
        lowered(x)


# --------------------------------------------------------------------------------------------- cli
def test_cli_lower_writes_a_checked_artifact(tmp_path, capsys):
    from mpqc.cli import main
    from mpqc.report import REPORT_FORMAT

    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm, _ = quantized_graph(example_models.small_cnn(), x)
    gm, _ = freeze_at_random_bits(gm, seed=3)
    run_dir = tmp_path / "run"
    IntegerProgram.from_graph(gm).save(run_dir)
    (run_dir / "report.json").write_text(json.dumps({"format": REPORT_FORMAT, "layers": []}))
    out = tmp_path / "artifact"
    assert main(["lower", str(run_dir), "--target", "llvm", "--out", str(out), "--input-shape", "1,1,8,8"]) == 0
    printed = capsys.readouterr().out
    assert "bit for bit" in printed and (out / "model.so").is_file()
    meta = json.loads((out / "model.json").read_text())
    if avx512_vnni.target_has_vnni(mtvm.resolve_target("llvm")):  # every layer on a kernel; VNNI's where no AMX one
        assert sorted(meta["kernel_layers"]) == ["conv1", "conv2", "fc"]
        assert meta["vnni_layers"] == [layer for layer in ("conv1", "conv2", "fc")
                                       if meta["kernel_layers"][layer] == avx512_vnni.VNNI.block]
    else:
        assert meta["vnni_layers"] == []
    plain = tmp_path / "plain"
    assert main(["lower", str(run_dir), "--out", str(plain), "--input-shape", "1,1,8,8", "--vnni", "off"]) == 0
    assert "bit for bit" in capsys.readouterr().out
    assert json.loads((plain / "model.json").read_text())["vnni_layers"] == []
    assert main(["lower", str(run_dir), "--out", str(out)]) == 2  # no input shape anywhere: one-line error
    assert "input" in capsys.readouterr().err
