"""AVX-VNNI micro-kernel of the implicit-GEMM int8 convolution (``implicit_gemm.py``): the AVX-512 VNNI kernel
(``avx512_vnni.py``) at 8 int32 lanes, the VEX-encoded 256-bit ``vpdpbusd`` of Alder Lake, Sapphire Rapids,
Meteor Lake and Zen 5 (``/proc/cpuinfo`` flag ``avx_vnni``, LLVM feature ``avxvnni``).

*Matches*: what the registry (``registry.py``) gives the ``avxvnni`` ISA: ``conv2d`` (groups 1) and ``linear``
(tokens flattened to rows) at any bits <= 8, on an llvm target with ``avxvnni`` (LLVM's answer for its
``mcpu``/``mattr``).

*Rewrites to*: the conv block :data:`VNNI256` (``avxvnni_conv``): the same TE, packed ``[Co/16, K/4, 16, 4]``
weights, schedule and shift (128) as AVX-512 VNNI; its 16x4 inner block is tensorized with :data:`INTRIN`, two
``vpdpbusd ymm`` (``avx512_vnni.vpdpbusd(8)``: the 4 activation bytes broadcast to 32 lanes times 8 output
channels' 4 weight bytes, added to 8 int32 lanes). The register tile holds at most 6 int32x16 accumulators (12 of
the 16 ymm registers; the rest: the broadcast and the weights), as the AVX2 kernels' does.

*Ensures*: exact int32 accumulation at every bit pair 2..8, as AVX-512 VNNI (``vpdpbusd`` adds four u8 x s8
products straight into an int32 lane: no int16 stage, so nothing saturates, unlike AVX2's ``vpmaddubsw``). The
module holds the VEX form only where the target has no AVX-512 VL (with it LLVM emits the EVEX form): the
registry's ``isa_target`` builds a forced ``avxvnni`` for ``x86-64-v3`` + ``avxvnni`` on an AVX-512 target, so
the code runs on every AVX-VNNI CPU.
"""
from __future__ import annotations

from mpqc.targets.tvm.kernels.avx512_vnni import SHIFT, vpdpbusd
from mpqc.targets.tvm.kernels.implicit_gemm import Kernel, MicroKernel, register_dot_16x4

INTRIN = "mpqc_x86_avxvnni_u8s8s32_16x4"
LANES = 8  # int32 lanes of one ymm vpdpbusd
MAX_ACCUMULATORS, PREFERRED_ACCUMULATORS = 6, 6  # int32x16 accumulators (2 ymm each) of the 16 ymm registers


def register_intrinsic() -> str:
    """Register :data:`INTRIN` (two ymm ``vpdpbusd`` on the 16x4 block; once per process) and return its name."""
    return register_dot_16x4(INTRIN, vpdpbusd(LANES), lanes=LANES)


VNNI256 = MicroKernel("avxvnni_conv", register_intrinsic, MAX_ACCUMULATORS, PREFERRED_ACCUMULATORS)
KERNEL = Kernel("avxvnni", ("avxvnni",), lambda layer: VNNI256, lambda layer: SHIFT)
