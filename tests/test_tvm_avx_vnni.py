"""The AVX-VNNI kernel (``targets/tvm/kernels/avx_vnni.py``: the 256-bit VEX ``vpdpbusd``): the code LLVM builds for
an AVX-VNNI target, the ISA resolution from the CPU flags, the refusals on a CPU without ``avx_vnni``, and exactness
at every bit pair (with the real instruction where the CPU has it; with the instruction emulated on every AVX2 CPU,
which checks everything around it: operands, lanes, tiles, schedule)."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM's pool starts one thread here otherwise (TVM_NOTES trap 2)

import dataclasses  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mpqc  # noqa: E402
from conftest import (build_conv_kernel, conv_reference, example_models, extreme_codes,  # noqa: E402
                      freeze_at_random_bits, load_script, quantized_graph)
from mpqc import cli, cpu  # noqa: E402
from mpqc.budgets import parse_budget  # noqa: E402
from mpqc.errors import ConfigError  # noqa: E402
from mpqc.layers import LayerInfo  # noqa: E402
from mpqc.reference import IntegerProgram  # noqa: E402

tvm = pytest.importorskip("tvm")
from mpqc.targets import tvm as mtvm  # noqa: E402
from mpqc.targets.tvm import latency, loader  # noqa: E402
from mpqc.targets.tvm import target as tvm_target  # noqa: E402
from mpqc.targets.tvm import weights as tvm_weights  # noqa: E402
from mpqc.targets.tvm.kernels import avx512_vnni, avx_vnni, implicit_gemm, registry  # noqa: E402

HOST_FLAGS = cpu.cpu_flags()
NO_AVX_VNNI = "this CPU has no avx_vnni (/proc/cpuinfo): the AVX-VNNI kernel cannot run here"
needs_avx_vnni = pytest.mark.skipif("avx_vnni" not in HOST_FLAGS, reason=NO_AVX_VNNI)

ALDER_LAKE = {"kind": "llvm", "mcpu": "alderlake"}  # AVX-VNNI, no AVX-512
SAPPHIRE_RAPIDS = {"kind": "llvm", "mcpu": "sapphirerapids"}  # AVX-512 VNNI + VL and AVX-VNNI
V3 = {"sse4_1", "sse4_2", "popcnt", "ssse3", "avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"}
FLAGS = {  # /proc/cpuinfo flags of three CPU classes (the int8 ones and x86-64-v3/v4's)
    "zen3": V3,
    "alderlake": V3 | {"avx_vnni"},
    "sapphirerapids": V3 | {"avx_vnni", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni"},
}


def _with_flags(monkeypatch, flags, target: bool = True) -> None:
    """Make this process see ``flags`` in /proc/cpuinfo (``target``: for the host's LLVM target too)."""
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    if target:
        monkeypatch.setattr(tvm_target, "cpu_flags", lambda: frozenset(flags))


def _assert_vex_ymm_only(asm: str) -> None:
    """Every ``vpdpbusd`` is the VEX form on ymm registers, and no zmm register appears anywhere."""
    dots = [line.strip() for line in asm.splitlines() if "vpdpbusd" in line]
    assert dots and all(re.match(r"\{vex\}\s+vpdpbusd\s", d) and "%ymm" in d for d in dots), dots[:3]
    assert "%zmm" not in asm


@pytest.fixture(scope="module")
def small_program():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    gm, _ = quantized_graph(example_models.small_cnn(), x)
    gm, _ = freeze_at_random_bits(gm, seed=3)
    return IntegerProgram.from_graph(gm), x


@pytest.fixture(scope="module")
def alder_lake_module(small_program):
    program, x = small_program
    return mtvm.lower(program, target=ALDER_LAKE, input_shape=tuple(x.shape))


# --------------------------------------------------------------------------------------------- the code
def test_an_avx_vnni_target_gets_vex_vpdpbusd_on_ymm(small_program, alder_lake_module):
    """``lower`` for an AVX-VNNI target without AVX-512 (``-mcpu=alderlake``) puts the two convs and the linear layer
    on the AVX-VNNI kernel: ``{vex} vpdpbusd`` on ymm, no zmm register. Forced on an AVX-512 target
    (``sapphirerapids``, where ``auto`` picks AMX, falling back to AVX-512 VNNI for these narrow layers), the
    module is built for ``x86-64-v3`` + ``avxvnni``: the same code, no AVX-512 instruction."""
    program, x = small_program
    lowered = alder_lake_module
    assert lowered.meta["isa"] == "avxvnni" and lowered.meta["cpu_flags"] == ["avx2", "avx_vnni"]
    assert lowered.meta["kernel_layers"] == {"conv1": "avxvnni_conv", "conv2": "avxvnni_conv", "fc": "avxvnni_conv"}
    assert [node.op for node in program.layers()] == ["conv2d", "conv2d", "linear"]
    assert lowered.schedules["kernels"] == lowered.schedules["kernel_functions"] == 3
    _assert_vex_ymm_only(lowered.source("asm"))

    forced = mtvm.lower(program, target=SAPPHIRE_RAPIDS, input_shape=tuple(x.shape), isa="avxvnni")
    assert forced.meta["isa"] == "avxvnni" and set(forced.meta["kernel_layers"].values()) == {"avxvnni_conv"}
    assert not tvm.target.codegen.target_has_features("avx512f", forced.target)
    _assert_vex_ymm_only(forced.source("asm"))
    auto = mtvm.lower(program, target=SAPPHIRE_RAPIDS, input_shape=tuple(x.shape))  # AMX takes no 8-/16-channel
    assert auto.meta["isa"] == "amx" and re.search(r"vpdpbusd\s+%zmm", auto.source("asm"))  # conv: AVX-512 VNNI


@pytest.mark.parametrize("layout", ["NHWC", "NC"])
def test_the_micro_kernel_is_two_ymm_dot_products_per_block(layout):
    """One 16x4 block is two ``vpdpbusd ymm`` (8 int32 lanes each), for a conv and a linear layer, on a plain
    ``x86-64-v3`` + ``avxvnni`` target too; the intrinsic refuses lanes other than 8 and 16."""
    channels = 32
    geometry = implicit_gemm.ConvGeometry(layout, False, channels, *(((3, 3), (1, 1), (1, 1)) if layout == "NHWC"
                                                                       else ()))
    taps = 9 if layout == "NHWC" else 1
    x_shape = (1, 6, 6, channels) if layout == "NHWC" else (4, channels)
    target = {"kind": "llvm", "mcpu": "x86-64-v3", "mattr": ["+avxvnni"]}
    _, asm = build_conv_kernel(geometry, x_shape, "uint8", (2, taps * channels // 4, 16, 4), micro=avx_vnni.VNNI256,
                               target=target)
    _assert_vex_ymm_only(asm)
    assert "vpmaddubsw" not in asm
    with pytest.raises(ConfigError, match="lanes"):
        avx512_vnni.vpdpbusd(4)


# --------------------------------------------------------------------------------------------- the choice
def test_auto_resolves_to_avxvnni_only_where_the_flag_is(monkeypatch):
    """ISA order avx512vnni > avxvnni > avx2 > generic, from /proc/cpuinfo (monkeypatched): AVX-VNNI only with
    ``avx_vnni``; a CPU with AVX-512 VNNI but no AVX-VNNI (Ice Lake, Zen 4) has no ``avxvnni`` to force."""
    expected = {"zen3": "avx2", "alderlake": "avxvnni", "sapphirerapids": "avx512vnni"}
    for name, flags in FLAGS.items():
        _with_flags(monkeypatch, flags)
        host = mtvm.resolve_target("llvm")
        assert registry.resolve_isa(host) == expected[name] == cpu.int8_isa(), name
        assert ("avxvnni" in registry.target_isas(host)) == ("avx_vnni" in flags), name
    assert registry.target_isas(tvm.target.Target(SAPPHIRE_RAPIDS)) == ["amx", "avx512vnni", "avxvnni", "avx2"]
    icelake = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]})
    assert registry.target_isas(icelake) == ["avx512vnni", "avx2"]
    geometry = latency.LayerGeometry("conv2d", 16, 32, 1, (3, 3), (1, 1), (1, 1), (8, 8), 4)
    assert set(latency.kernel_blocks(geometry, "avxvnni").values()) == {"avxvnni_conv"}  # the latency table's choice
    depthwise = dataclasses.replace(geometry, in_channels=32, groups=32)
    assert set(latency.kernel_blocks(depthwise, "avxvnni").values()) == {latency.GENERIC_CHANNELS_LAST}


def test_avxvnni_is_refused_on_a_cpu_without_the_flag(monkeypatch, small_program, tmp_path):
    """``lower(isa="avxvnni")``, ``mpqc lower --isa avxvnni`` and the latency budget on a CPU without ``avx_vnni``
    (monkeypatched, so on every host): a ConfigError naming the flag; the latency table and the tuning of a
    lowering refuse to measure even for a target that claims AVX-VNNI (they would run its kernels here)."""
    program, x = small_program
    _with_flags(monkeypatch, FLAGS["zen3"])
    with pytest.raises(ConfigError, match=r"no avxvnni; this CPU lacks the /proc/cpuinfo flag\(s\) avx_vnni"):
        mtvm.lower(program, input_shape=tuple(x.shape), isa="avxvnni")
    layers = [LayerInfo("conv", "conv2d", (32, 16, 3, 3), 4608, 32, 32, 294912, (16, 8, 8), (32, 8, 8), 1024, 2048)]
    with pytest.raises(ConfigError, match="avx_vnni"):
        mpqc.Latency(1.0, isa="avxvnni", tuning_db=str(tmp_path)).table(layers)
    with pytest.raises(ConfigError, match=r"latency table would run avxvnni kernels.*lacks.*avx_vnni"):
        latency.latency_table(layers, target=ALDER_LAKE, isa="avxvnni", tuning_db=tmp_path)
    assert not (tmp_path / latency.TABLE_FILE).exists()
    with pytest.raises(ConfigError, match=r"tuning into tuning_db=.*would run avxvnni kernels.*avx_vnni"):
        mtvm.lower(program, target=ALDER_LAKE, input_shape=tuple(x.shape), tuning_db=tmp_path / "db")
    assert not (tmp_path / "db").exists()
    assert parse_budget("latency=3ms,avxvnni") == mpqc.Latency(3.0, isa="avxvnni")
    assert cli._parser().parse_args(["lower", "run", "--out", "o", "--isa", "avxvnni"]).isa == "avxvnni"


def test_a_module_built_for_avx_vnni_never_runs_on_a_cpu_without_it(small_program, alder_lake_module, tmp_path):
    """Cross-compiled for Alder Lake: on a CPU without ``avx_vnni`` the module and its exported artifact refuse to
    run (they would die of SIGILL), naming the flag; on one with it they run, bit-exact."""
    program, x = small_program
    lowered = alder_lake_module
    artifact = lowered.export(tmp_path / "artifact")
    if "avx_vnni" not in HOST_FLAGS:
        with pytest.raises(RuntimeError, match="lacks the /proc/cpuinfo flag\\(s\\) avx_vnni"):
            lowered(x)
        with pytest.raises(RuntimeError, match="avx_vnni"):
            loader.load(artifact)
    else:
        assert torch.equal(lowered(x), program.run(x))
        assert np.array_equal(loader.load(artifact)(x.numpy()), program.run(x).numpy())
    loader.check_cpu({"cpu_flags": []})
    with pytest.raises(RuntimeError, match="no_such_flag"):
        loader.check_cpu({"isa": "test", "cpu_flags": ["no_such_flag"]})


# --------------------------------------------------------------------------------------------- exactness
def _emulated_vpdpbusd(acc, activations, weights):
    """``vpdpbusd ymm`` in plain vector arithmetic: each int32 lane plus the four u8 x s8 products of its bytes."""
    from tvm import tirx

    products = tirx.Cast("int32x32", activations) * tirx.Cast("int32x32", weights)
    for k in range(4):
        acc = acc + tirx.Shuffle([products], [4 * lane + k for lane in range(avx_vnni.LANES)])
    return acc


EMULATED = dataclasses.replace(avx_vnni.VNNI256, register=lambda: implicit_gemm.register_dot_16x4(
    "mpqc_test_avxvnni_emulated", avx512_vnni.vpdpbusd(avx_vnni.LANES, _emulated_vpdpbusd), lanes=avx_vnni.LANES))
KERNELS = {
    "vpdpbusd": (avx_vnni.VNNI256, {"kind": "llvm", "mcpu": "x86-64-v3", "mattr": ["+avxvnni"]}, "avx_vnni"),
    "emulated": (EMULATED, {"kind": "llvm", "mcpu": "x86-64-v3"}, "avx2"),
}


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("instruction", ["vpdpbusd", "emulated"])
def test_avx_vnni_kernel_is_exact_at_every_bit_pair(instruction, signed):
    """Every weight x activation bit pair in 2..8 on the kernel and shift the registry chooses (one micro-kernel,
    shift 128), with extreme codes (all-max and all-min activations against all-max / all-min weights): equal to an
    exact float64 convolution (signed: the kernel sees x + 128, and ``128 * sum(w)`` is subtracted here as the
    lowering does in the bias); a linear layer whose features are no multiple of 4 too. ``vpdpbusd``: the real
    instruction, run only where the CPU has ``avx_vnni``; ``emulated``: the same kernel with the instruction
    written as vector arithmetic, built for x86-64-v3, on every AVX2 CPU."""
    micro, target, flag = KERNELS[instruction]
    if flag not in HOST_FLAGS:
        pytest.skip(NO_AVX_VNNI if flag == "avx_vnni" else "this CPU has no avx2")
    rng = np.random.default_rng(11)
    kernel = registry.BY_ISA["avxvnni"]
    channels, out, size, padding = 32, 32, 5, (1, 1)
    dtype = "int8" if signed else "uint8"
    geometry = implicit_gemm.ConvGeometry("NHWC", signed, channels, (3, 3), (1, 1), padding, shift=avx512_vnni.SHIFT)
    run, _ = build_conv_kernel(geometry, (4, size, size, channels), dtype, (out // 16, 9 * channels // 4, 16, 4),
                               micro=micro, target=target)
    for activation_bits in range(2, 9):
        for weight_bits in range(2, 9):
            facts = registry.LayerFacts("conv2d", 1, weight_bits, activation_bits, signed, 4, channels)
            assert kernel.micro(facts) is avx_vnni.VNNI256 and kernel.shift(facts) == avx512_vnni.SHIFT == 128
            low, high = (-(2 ** (activation_bits - 1) - 1), 2 ** (activation_bits - 1) - 1) if signed else \
                (0, 2**activation_bits - 1)
            x = extreme_codes(rng, (4, channels, size, size), low, high)
            half = 2 ** (weight_bits - 1) - 1
            weight = extreme_codes(rng, (out, channels, 3, 3), -half, half).astype(np.int8)
            got = run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(dtype), tvm_weights.vnni_layout(weight))
            if signed:
                got = got - 128 * weight.reshape(out, -1).astype(np.int64).sum(1)
            assert np.array_equal(got, conv_reference(x, weight, padding)), \
                f"{instruction}: w{weight_bits} a{activation_bits} signed={signed}"
    features, rows = 70, 6  # a linear layer: 70 features padded to 72 (18 quads), 20 outputs padded to 32
    linear = implicit_gemm.ConvGeometry("NC", signed, features)
    run, _ = build_conv_kernel(linear, (rows, features), dtype, (2, 18, 16, 4), micro=micro, target=target)
    x = extreme_codes(rng, (rows, features), -127 if signed else 0, 127 if signed else 255)
    weight = extreme_codes(rng, (20, features), -127, 127).astype(np.int8)
    got = run(x.astype(dtype), tvm_weights.vnni_layout(weight)).reshape(rows, -1)
    if signed:
        got = got - 128 * np.pad(weight.astype(np.int64).sum(1), (0, 12))
    assert np.array_equal(got[:, :20], x.astype(np.int64) @ weight.T.astype(np.int64))
    assert not got[:, 20:].any()


# --------------------------------------------------------------------------------------------- bench/latency.py
def test_the_benchmark_knows_avxvnni_and_never_probes_an_instruction_the_cpu_lacks(monkeypatch):
    """``bench/latency.py``: ``--isa avxvnni``, a peak of 128 int8 ops/cycle/core for it, and a clock probe that runs
    ``{vex} vpdpbusd`` only where /proc/cpuinfo shows ``avx_vnni`` (here: monkeypatched away)."""
    bench = load_script("bench/latency.py", "mpqc_bench_latency")
    assert bench.OPS_PER_CYCLE["avxvnni"] == 128 and set(bench.OPS_PER_CYCLE) == set(cpu.ISA_CHOICES[1:])
    assert bench.PROBES["avxvnni"][1] == "{vex} vpdpbusd ymm"
    _with_flags(monkeypatch, HOST_FLAGS - {"avx_vnni"}, target=False)
    info = bench.measure_clock("avxvnni")
    assert "probe_instruction" not in info and info["clock_ghz"] > 0
    if "avx2" in HOST_FLAGS:
        info = bench.measure_clock("avx2")
        assert info["probe_instruction"] == "vpmaddubsw ymm" and info["probe_gops_one_core_measured"] > 0
