"""AVX512-VNNI micro-kernel of the implicit-GEMM int8 convolution (``implicit_gemm.py``): one ``vpdpbusd`` per
16x4 block.

*Matches*: what the registry (``registry.py``) gives the ``avx512vnni`` ISA: ``conv2d`` (groups 1) and 2-D
``linear`` at any bits <= 8, on an llvm target with ``avx512vnni`` and ``avx512bw`` (:func:`target_has_vnni`,
LLVM's answer for the target's ``mcpu``/``mattr``).

*Rewrites to*: the conv block :data:`VNNI` (``vnni_conv``), its 16x4 inner block tensorized with :data:`INTRIN`:
the 4 activation bytes broadcast to 64 lanes times the 16x4 weight block, added to 16 int32 lanes. Signed inputs
are shifted by 128. :func:`vpdpbusd` takes the lane count: ``avx_vnni.py`` is this kernel at 8 lanes (ymm).

*Ensures*: int32 accumulation is exact (``vpdpbusd`` adds four u8 x s8 products, each at most 2^15 in size, to an
int32 lane without saturation; |sums| stay far below 2^31 for <= 8-bit codes).

TVM's own ``dot_16x4_vnni`` intrinsic passes ``int32x16`` operands to ``llvm.x86.avx512.vpdpbusd.512``, which takes
``<64 x i8>`` since LLVM 21, so it does not build with this TVM (TVM_NOTES trap 1). :data:`INTRIN` is registered
under its own name and TVM's is left as it is: fixing it in place would let MetaSchedule's auto-tensorization
match unpacked int8 weights elsewhere, which compiles into wrong code (trap 3).
"""
from __future__ import annotations

from typing import Any

from mpqc.errors import ConfigError
from mpqc.targets.tvm.kernels.implicit_gemm import (CONV_BLOCK, Kernel, MicroKernel, broadcast_activations,
                                                    register_dot_16x4)

INTRIN = "mpqc_x86_vnni_u8s8s32_16x4"
MAX_ACCUMULATORS = 24  # R * CB int32x16 accumulators, of the 32 zmm registers (the rest: weights, a broadcast)
SHIFT = 128  # what signed activations are shifted by (the bias absorbs 128 * sum(w))


def target_has_vnni(target: Any) -> bool:
    """Whether an llvm ``target`` (a ``tvm.target.Target``) can run the VNNI kernels: LLVM's answer for its
    ``mcpu`` and ``mattr`` (``host_target()`` fills them from /proc/cpuinfo)."""
    from tvm.target import codegen

    if target.kind.name != "llvm":
        return False
    return bool(codegen.target_has_features("avx512vnni", target) and codegen.target_has_features("avx512bw", target))


def vpdpbusd(lanes: int, instruction=None):
    """The value of ``vpdpbusd`` at ``lanes`` int32 lanes (16: zmm, this module; 8: ymm, ``avx_vnni.py``) for
    ``implicit_gemm.register_dot_16x4``: output channels ``start .. start+lanes`` of the 16x4 block, i.e. the
    accumulator lanes plus, per lane, the 4 activation bytes (broadcast ``lanes`` times) times that channel's 4
    weight bytes. LLVM picks the encoding from the target: EVEX with AVX-512 VNNI (and VL for ymm), ``{vex}`` with
    AVX-VNNI alone. ``instruction(acc, activations, weights)``: the instruction's expression on those operands
    (``int32 x lanes``, ``uint8 x 4*lanes``, ``int8 x 4*lanes``); default the LLVM intrinsic (a test substitutes
    an emulation, to run the operands' plumbing on a CPU without the instruction)."""
    if lanes not in (8, 16):
        raise ConfigError(f"vpdpbusd: lanes must be 8 (ymm) or 16 (zmm), got {lanes}")

    def intrinsic(acc, activations, weights):
        from tvm.script import tirx as T

        return T.call_llvm_pure_intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", acc, activations,
                                       weights)

    dot = instruction or intrinsic

    def value(a, b, c, start):
        from tvm.script import tirx as T

        return dot(c[T.ramp(T.int32(start), 1, lanes)], broadcast_activations(a, lanes),
                   b.vload([start, 0], dtype=f"int8x{4 * lanes}"))

    return value


def register_intrinsic() -> str:
    """Register :data:`INTRIN` (``vpdpbusd`` on the 16x4 block; once per process) and return its name."""
    return register_dot_16x4(INTRIN, vpdpbusd(16))


VNNI = MicroKernel(CONV_BLOCK, register_intrinsic, MAX_ACCUMULATORS, 14)
KERNEL = Kernel("avx512vnni", ("avx512vnni", "avx512bw"), lambda layer: VNNI, lambda layer: SHIFT)
