"""The AMX kernel (``targets/tvm/kernels/amx.py``: ``tdpbusd`` on tile registers): which layers the registry gives it
and which fall back to AVX-512 VNNI, the tile configuration's bytes, the code LLVM builds for an AMX target (on any
x86 host: building runs no tile instruction), and, where the CPU has AMX, exactness at every bit pair and geometry
and a whole ResNet-18 bit-exact with the reference."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM's pool starts one thread here otherwise (TVM_NOTES trap 2)

import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import build_conv_kernel, extreme_codes, mixed_bit_program  # noqa: E402
from mpqc import cpu  # noqa: E402
from mpqc.errors import ConfigError  # noqa: E402

tvm = pytest.importorskip("tvm")
from mpqc.targets import tvm as mtvm  # noqa: E402
from mpqc.targets.tvm import weights as tvm_weights  # noqa: E402
from mpqc.targets.tvm.kernels import amx, avx512_vnni, implicit_gemm, registry  # noqa: E402

HOST_FLAGS = cpu.cpu_flags()
needs_amx = pytest.mark.skipif(not {"amx_tile", "amx_int8"} <= HOST_FLAGS,
                               reason="this CPU has no amx_tile/amx_int8 (/proc/cpuinfo): the AMX kernel cannot run here")
SAPPHIRE_RAPIDS = {"kind": "llvm", "mcpu": "sapphirerapids"}  # AMX, AVX-512 VNNI, AVX-VNNI


def _facts(op="conv2d", channels=64, groups=1, weight_bits=4, activation_bits=8, dilated=False):
    return registry.LayerFacts(op, groups, weight_bits, activation_bits, False, 4, channels, dilated)


# --------------------------------------------------------------------------------------------- the choice
def test_amx_takes_convs_whose_channels_fill_tile_rows_and_the_rest_fall_back_to_vnni():
    """Best first: an AMX target offers amx, then avx512vnni; a conv with 64 or 512 input channels goes on AMX,
    and so does one whose channels (padded to 4) divide 64 (a 3-channel first conv, 16 and 32 channels: a tile row
    holds several taps), unless dilated along its width; a 96- or 24-channel conv (tile rows not filled), a linear
    layer and a depthwise conv do not: the first ones fall back to AVX-512 VNNI, the depthwise one to TVM's
    operators, as without AMX."""
    assert registry.target_isas(tvm.target.Target(SAPPHIRE_RAPIDS))[:2] == ["amx", "avx512vnni"]
    assert registry.resolve_isa(tvm.target.Target(SAPPHIRE_RAPIDS)) == "amx"
    for channels in (64, 128, 512, 3, 4, 8, 16, 32):
        assert registry.choose("amx", _facts(channels=channels)) is amx.KERNEL
    for facts in (_facts(channels=96), _facts(channels=24), _facts(channels=3, dilated=True),
                  _facts(op="linear", channels=512)):
        assert registry.choose("amx", facts) is avx512_vnni.KERNEL, facts
    assert registry.choose("amx", _facts(groups=64)) is None
    assert registry.choose("amx", _facts(weight_bits=9)) is None  # over 8 bits: no kernel takes it
    icelake = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni"]})
    assert "amx" not in registry.target_isas(icelake)
    with pytest.raises(ConfigError, match="amx"):
        registry.resolve_isa(icelake, "amx")


def test_a_forced_amx_on_a_cpu_without_it_is_refused_naming_the_flags(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni", "avx512bw"}))
    assert cpu.missing_flags("amx") == ["amx_int8", "amx_tile"]
    with pytest.raises(ConfigError, match="amx_int8, amx_tile"):
        registry.check_runnable("amx", "measuring")


def test_tile_configuration_bytes():
    """Palette 1; accumulators (tiles 0-3: 2 x pixel group + channel block) rows x 64 bytes, activations (4-5, one
    per pixel group) rows x 64 bytes, weights (6-7, one per channel block) 16 x 64 bytes: colsb at bytes
    16 + 2 * tile, rows at byte 48 + tile."""
    raw = np.array(amx.tile_config(14, 2, 2), dtype="<u4").tobytes()
    assert len(raw) == 64 and raw[0] == 1 and raw[1] == 0 and not any(raw[2:16])
    assert list(np.frombuffer(raw[16:48], dtype="<u2")) == [64] * 8 + [0] * 8
    assert list(raw[48:64]) == [14] * 6 + [16, 16] + [0] * 8
    one = np.array(amx.tile_config(7, 1, 1), dtype="<u4").tobytes()
    assert list(np.frombuffer(one[16:48], dtype="<u2"))[:8] == [64, 0, 0, 0, 64, 0, 64, 0]
    assert list(one[48:56]) == [7, 0, 0, 0, 7, 0, 16, 0]


def test_tiles_are_the_largest_row_divisor_up_to_16_or_two_of_them_by_one_or_two_blocks():
    tile = implicit_gemm.Tile
    assert amx.AMX.tile_candidates(56, 4) == [tile(14, 1), tile(14, 2), tile(28, 1), tile(28, 2)]
    assert amx.AMX.tile_candidates(112, 3) == [tile(16, 1)]  # 32 does not divide 112; 3 blocks: one at a time
    assert amx.AMX.default_tile(7, 32) == tile(7, 2) and amx.AMX.default_tile(56, 3) == tile(14, 1)
    assert amx.split_rows(28) == (14, 2) and amx.split_rows(16) == (16, 1)


# --------------------------------------------------------------------------------------------- the code
def test_a_layer_loads_the_tile_configuration_once_per_parallel_chunk():
    """Chunks: the largest divisor of the tiles up to 4 per core (equal shares), one per tile where no divisor
    gives every core one (a prime count of tiles stays parallel); the configuration is loaded at each chunk's start
    and nowhere else (built for Sapphire Rapids: nothing runs)."""
    assert [amx.parallel_chunks(extent, cores=2) for extent in (448, 112, 49, 13, 7, 1)] == [8, 8, 7, 13, 7, 1]
    assert amx.parallel_chunks(448, cores=16) == 64 and amx.parallel_chunks(13, cores=16) == 13
    geometry = implicit_gemm.ConvGeometry("NHWC", False, 64, (3, 3), (1, 1), (1, 1))
    _, asm = build_conv_kernel(geometry, (1, 8, 8, 64), "uint8", (2, 9 * 16, 16, 4), micro=amx.AMX,
                               target={**SAPPHIRE_RAPIDS, "num-cores": 2})
    assert len(re.findall(r"\bldtilecfg\b", asm)) == 1 and re.search(r"\btdpbusd\b", asm)


def test_an_amx_target_gets_tile_instructions():
    """Built for Sapphire Rapids on any host (nothing runs): the conv is tensorized with the tile configuration,
    accumulators zeroed in their tiles (``tilezero``), tile loads, ``tdpbusd`` and tile stores, and no
    ``vpdpbusd``."""
    geometry = implicit_gemm.ConvGeometry("NHWC", False, 128, (3, 3), (1, 1), (1, 1))
    _, asm = build_conv_kernel(geometry, (1, 14, 14, 128), "uint8", (2, 9 * 32, 16, 4), micro=amx.AMX,
                               target=SAPPHIRE_RAPIDS)
    for instruction in ("ldtilecfg", "tilezero", "tileloadd", "tdpbusd", "tilestored"):
        assert re.search(rf"\b{instruction}\b", asm), instruction
    assert "vpdpbusd" not in asm


# --------------------------------------------------------------------------------------------- exactness
GEOMETRIES = [  # (channels, out channels, size, kernel, stride, padding, dilation)
    (64, 32, 9, (3, 3), (1, 1), (1, 1), (1, 1)),  # a ResNet 3x3 (9 = 3 x 3 rows of tiles: 9 is no power of 2)
    (128, 48, 8, (1, 1), (2, 2), (0, 0), (1, 1)),  # a downsampling shortcut: 1x1, stride 2, 3 channel blocks
    (64, 32, 7, (3, 3), (2, 2), (1, 1), (1, 1)),  # a strided 3x3
    (3, 32, 19, (7, 7), (2, 2), (3, 3), (1, 1)),  # a ResNet stem: 16 taps of 4 bytes per tile row, widened to 7x16
    (16, 16, 9, (3, 3), (1, 1), (1, 1), (1, 1)),  # 4 taps of 16 channels per row, widened to 3x4
    (32, 16, 8, (1, 1), (2, 2), (0, 0), (1, 1)),  # 2 taps of 32 channels, a 1x1 widened to 1x2
    (64, 16, 8, (3, 3), (1, 1), (2, 2), (2, 2)),  # dilated
]


@needs_amx
@pytest.mark.parametrize("signed", [False, True])
def test_amx_kernel_is_exact_at_every_bit_pair_and_geometry(signed):
    """Every weight x activation bit pair in 2..8 (extreme codes: all-max and all-min activations against all-max /
    all-min weights) on a ResNet 3x3, and the other geometries at 8x8 bits: equal to an exact float64 convolution
    (signed: the kernel sees x + 128 and ``128 * sum(w)`` is subtracted here, as the lowering does in the bias)."""
    rng = np.random.default_rng(5)
    dtype = "int8" if signed else "uint8"
    for index, (channels, out, size, kernel, stride, padding, dilation) in enumerate(GEOMETRIES):
        geometry = amx.AMX.widened(implicit_gemm.ConvGeometry("NHWC", signed, channels, kernel, stride, padding,
                                                              dilation, shift=avx512_vnni.SHIFT))
        width = kernel[1] + geometry.extra_columns
        run, _ = build_conv_kernel(geometry, (2, size, size, channels), dtype,
                                   (-(-out // 16), kernel[0] * width * -(-channels // 4), 16, 4), micro=amx.AMX)
        pairs = [(w, a) for w in range(2, 9) for a in range(2, 9)] if index == 0 else [(8, 8)]
        for weight_bits, activation_bits in pairs:
            low, high = (-(2 ** (activation_bits - 1) - 1), 2 ** (activation_bits - 1) - 1) if signed else \
                (0, 2**activation_bits - 1)
            x = extreme_codes(rng, (2, channels, size, size), low, high)
            half = 2 ** (weight_bits - 1) - 1
            weight = extreme_codes(rng, (out, channels, *kernel), -half, half).astype(np.int8)
            got = run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)).astype(dtype),
                      tvm_weights.vnni_layout(weight, width if geometry.extra_columns else 0))
            got = got[..., :out]
            if signed:
                got = got - 128 * weight.reshape(out, -1).astype(np.int64).sum(1)
            expected = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(weight).double(), None, stride,
                                padding, dilation).permute(0, 2, 3, 1).round().long().numpy()
            assert np.array_equal(got, expected), (GEOMETRIES[index], weight_bits, activation_bits, signed)


@needs_amx
def test_resnet18_on_amx_is_bit_exact_with_the_reference():
    """A torchvision ResNet-18 (64x64 input) at random mixed 2-8 bits, lowered for this AMX CPU: its 64..512-channel
    convs and the 3-channel first conv (widened to 7x16 taps) on AMX, the classifier on AVX-512 VNNI, every output
    bit-exact."""
    import torchvision

    _, program, x = mixed_bit_program(lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 64, 64), seed=1)
    lowered = mtvm.lower(program, input_shape=tuple(x.shape))
    assert lowered.meta["isa"] == "amx" and "amx_tile" in lowered.meta["cpu_flags"]
    kernels = lowered.meta["kernel_layers"]
    assert sum(block == amx.AMX.block for block in kernels.values()) == 20  # the stem, 16 3x3 and 3 1x1 shortcuts
    assert sorted(layer for layer, block in kernels.items() if block == avx512_vnni.VNNI.block) == ["fc"]
    assert lowered.schedules["kernels"] == lowered.schedules["kernel_functions"]  # every one tensorized
    assert torch.equal(lowered(x), program.run(x))


@needs_amx
def test_an_exported_amx_artifact_runs_exactly_in_a_fresh_process(tmp_path):
    """The artifact's loader (TVM and NumPy only) asks Linux for the AMX tiles itself: a fresh process that never
    built AMX code runs the Fashion-MNIST ResNet-20 (its 64-channel convs on AMX) bit-exact."""
    import subprocess
    import sys

    from conftest import example_models

    _, program, x = mixed_bit_program(lambda: example_models.resnet20(num_classes=10, in_channels=1), (2, 1, 28, 28),
                                      seed=2)
    lowered = mtvm.lower(program, input_shape=tuple(x.shape), out=tmp_path / "artifact")
    assert amx.AMX.block in lowered.meta["kernel_layers"].values()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "expected.npy", program.run(x).numpy())
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[1]); from loader import load; "
            "run = load(sys.argv[1]); print(np.array_equal(run(np.load(sys.argv[2])), np.load(sys.argv[3])))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "artifact"), str(tmp_path / "x.npy"),
                           str(tmp_path / "expected.npy")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TVM_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-2000:]
