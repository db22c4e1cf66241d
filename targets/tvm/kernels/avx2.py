"""AVX2 micro-kernels for the implicit-GEMM int8 convolution of ``implicit_gemm.py`` (CPUs without VNNI).

*Matches*: what the VNNI kernel matches (``conv2d`` with ``groups == 1``, 2-D ``linear``) on an llvm target with
``avx2`` (asked of LLVM, :func:`target_has_avx2`); ``registry.py`` chooses it per layer.

*Rewrites to*: the same TE (``implicit_gemm.conv2d_te``: NHWC uint8 activations, weights packed ``[Co/16, K/4, 16, 4]``,
the same schedule and register tiles, fewer of them: 16 ymm registers) with the block named :data:`NARROW` or
:data:`WIDE`, whose 16x4 inner block is tensorized as two halves of 8 output channels, each:

* :data:`NARROW` (FBGEMM's ACC32 design): ``vpmaddubsw`` (the 4 activation bytes broadcast x 8, times the 8x4 int8
  weight block: adjacent u8 x s8 products summed in pairs into **saturating** int16) -> ``vpmaddwd`` with ones
  (int16 pairs summed into int32) -> ``vpaddd`` into the accumulator;
* :data:`WIDE`: the activation bytes split as ``a = (a & 127) + (a & 128)``, each part through ``vpmaddubsw`` ->
  ``vpmaddwd`` (ones) and both added: twice the work, for the layers where the narrow form could saturate;
* :data:`MULTI_STEP` (per-bit speed): ``steps`` (2, 4 or 8) consecutive 4-deep ``vpmaddubsw`` results summed in
  int16 (``vpaddw``) and widened once (``vpmaddwd``), where ``steps * pair_bound <= 32767``
  (:func:`int16_steps`; 4-bit weights x 8-bit activations: 2*255*7 = 3570, 9 steps) and ``steps`` divides the
  layer's ``ceil(C/4)``: ``1 + 1/steps`` multiplies per 32 products instead of 2 (:func:`micro_kernel` chooses).

*Ensures* (saturation impossible by construction): a layer takes :data:`NARROW` only where
:func:`pair_bound` ``= 2 * max|a| * max|w| <= 32767`` for its bits: activations stored unsigned in ``[0, 2^a - 1]``
(a signed ``a``-bit input is shifted by ``2^(a-1)`` instead of VNNI's 128, and ``2^(a-1) * sum(w)`` leaves the
bias), weights in ``[-(2^(w-1) - 1), 2^(w-1) - 1]``: every pair except 8-bit weights x 8-bit activations
(``2*255*127 = 64770``); there :data:`WIDE` sums at most ``2*128*127 = 32512`` per int16. The int32 sums are exact,
so the layers are bit-exact with ``mpqc.reference`` at every bit pair (``tests/test_tvm.py``, with the extreme codes
that saturate a naive kernel). These kernels run on every x86-64-v3 CPU, AVX-512 ones included.
"""
from __future__ import annotations

from typing import Any

from mpqc.targets.tvm.kernels.implicit_gemm import Kernel, MicroKernel, broadcast_activations, register_dot_16x4

NARROW_INTRIN, WIDE_INTRIN = "mpqc_x86_avx2_u8s8s32_16x4", "mpqc_x86_avx2_wide_u8s8s32_16x4"
INT16_MAX = 32767
# 16 ymm registers: 6 tiles of 16 int32 lanes (12 ymm), plus a broadcast, the ones and a product (FBGEMM: 12)
MAX_ACCUMULATORS, PREFERRED_ACCUMULATORS = 6, 6


def target_has_avx2(target: Any) -> bool:
    """Whether an llvm ``target`` can run these kernels: LLVM's answer for its ``mcpu``/``mattr``."""
    from tvm.target import codegen

    return target.kind.name == "llvm" and bool(codegen.target_has_features("avx2", target))


def activation_shift(bits: int) -> int:
    """What a signed ``bits``-bit activation is shifted by to become unsigned: ``2^(bits-1)`` (codes
    ``[-(2^(b-1)-1), 2^(b-1)-1]`` -> ``[1, 2^b - 1]``, no wider than an unsigned ``bits``-bit one)."""
    return 2 ** (bits - 1)


def pair_bound(weight_bits: int, activation_bits: int) -> int:
    """The largest ``|a0*w0 + a1*w1|`` ``vpmaddubsw`` can form for these bits (activations as stored: unsigned,
    at most ``2^a - 1``; weights symmetric, at most ``2^(w-1) - 1``)."""
    return 2 * (2**activation_bits - 1) * (2 ** (weight_bits - 1) - 1)


def needs_wide(weight_bits: int, activation_bits: int) -> bool:
    """Whether the narrow form could saturate its int16 pair sums for these bits (only 8 x 8 can)."""
    return pair_bound(weight_bits, activation_bits) > INT16_MAX


def _madd(activations, b, start: int, ones: int):
    from tvm.script import tirx as T

    pairs = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", activations,
                                    b.vload([start, 0], dtype="int8x32"))
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, T.broadcast(T.int16(ones), 16))


def _narrow(a, b, c, start):
    from tvm.script import tirx as T

    return c[T.ramp(T.int32(start), 1, 8)] + _madd(broadcast_activations(a, 8), b, start, 1)


def _wide(a, b, c, start):
    from tvm.script import tirx as T

    x = broadcast_activations(a, 8)
    low = T.bitwise_and(x, T.broadcast(T.uint8(127), 32))
    high = T.bitwise_and(x, T.broadcast(T.uint8(128), 32))
    return c[T.ramp(T.int32(start), 1, 8)] + _madd(low, b, start, 1) + _madd(high, b, start, 1)


def register_narrow() -> str:
    return register_dot_16x4(NARROW_INTRIN, _narrow, lanes=8)


def register_wide() -> str:
    return register_dot_16x4(WIDE_INTRIN, _wide, lanes=8)


NARROW = MicroKernel("avx2_conv", register_narrow, MAX_ACCUMULATORS, PREFERRED_ACCUMULATORS)
WIDE = MicroKernel("avx2wide_conv", register_wide, MAX_ACCUMULATORS, PREFERRED_ACCUMULATORS)


# --------------------------------------------------------------------------------------------- per-bit speed
STEP_CHOICES = (8, 4, 2)  # int16 steps of a multi-step micro-kernel (each must divide the layer's channels / 4)


def int16_steps(weight_bits: int, activation_bits: int) -> int:
    """How many 4-deep steps of ``vpmaddubsw`` pair sums fit in one int16 lane for these bits (1: none to spare):
    ``steps * pair_bound <= 32767``, so the lane's final sum is exact (``vpaddw`` wraps, and a final sum that
    fits in int16 is exact modulo 2^16 whatever the order)."""
    if needs_wide(weight_bits, activation_bits):
        return 1
    return max(1, INT16_MAX // pair_bound(weight_bits, activation_bits))


def _multi_step_value(steps: int):
    def value(a, b, c, start):
        from tvm.script import tirx as T

        pairs = None
        for step in range(steps):
            activations = T.reinterpret(T.broadcast(T.reinterpret(a.vload([step * 4], "uint8x4"), dtype="int32"), 8),
                                        dtype="uint8x32")
            term = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", activations,
                                           b.vload([step, start, 0], dtype="int8x32"))
            pairs = term if pairs is None else pairs + term  # vpaddw: wraps, exact for a final sum in int16
        widened = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, T.broadcast(T.int16(1), 16))
        return c[T.ramp(T.int32(start), 1, 8)] + widened

    return value


def _register_multi_step(steps: int) -> str:
    """The intrinsic of a ``16 x (4*steps)`` block: ``steps`` ``vpmaddubsw`` summed in int16 (``vpaddw``), one
    ``vpmaddwd`` widening per half: ``1 + 1/steps`` multiplies per 32 products instead of 2."""
    name = f"mpqc_x86_avx2_int16x{steps}_u8s8s32_16x4"
    if name in _MULTI_REGISTERED:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    value = _multi_step_value(steps)
    depth = 4 * steps

    def buffers(a_handle, b_handle, c_handle):
        return (T.match_buffer(a_handle, (depth,), "uint8", offset_factor=1, strides=[1]),
                T.match_buffer(b_handle, (steps, 16, 4), "int8", offset_factor=1, strides=[64, 4, 1]),
                T.match_buffer(c_handle, (16,), "int32", offset_factor=1, strides=[1]))

    @T.prim_func(s_tir=True)
    def desc(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
        a, b, c = buffers(a_handle, b_handle, c_handle)
        with T.sblock("root"):
            T.reads(c[0:16], a[0:depth], b[0:steps, 0:16, 0:4])
            T.writes(c[0:16])
            for j in T.serial(0, steps):
                for i in T.serial(0, 16):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vj, vk = T.axis.remap("SRR", [i, j, k])
                            c[vi] = c[vi] + T.cast(a[vj * 4 + vk], "int32") * T.cast(b[vj, vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a_handle: T.handle, b_handle: T.handle, c_handle: T.handle) -> None:
        a, b, c = buffers(a_handle, b_handle, c_handle)
        with T.sblock("root"):
            T.reads(c[0:16], a[0:depth], b[0:steps, 0:16, 0:4])
            T.writes(c[0:16])
            c[T.ramp(T.int32(0), 1, 8)] = value(a, b, c, 0)
            c[T.ramp(T.int32(8), 1, 8)] = value(a, b, c, 8)

    TensorIntrin.register(name, desc, impl, override=True)
    _MULTI_REGISTERED.add(name)
    return name


_MULTI_REGISTERED: set[str] = set()
MULTI_STEP = {steps: MicroKernel(f"avx2s{steps}_conv", lambda steps=steps: _register_multi_step(steps),
                                 MAX_ACCUMULATORS, PREFERRED_ACCUMULATORS, steps)
              for steps in STEP_CHOICES}


def micro_kernel(weight_bits: int, activation_bits: int, channels: int) -> MicroKernel:
    """The AVX2 micro-kernel for a layer: wide (8 x 8 bits), a multi-step one where its bits leave int16 room for
    2+ steps and its ``ceil(channels/4)`` is a multiple of the steps, else narrow."""
    if needs_wide(weight_bits, activation_bits):
        return WIDE
    room, quads = int16_steps(weight_bits, activation_bits), -(-channels // 4)
    steps = next((s for s in STEP_CHOICES if s <= room and quads % s == 0), 1)
    return MULTI_STEP[steps] if steps > 1 else NARROW


KERNEL = Kernel("avx2", ("avx2",), lambda layer: micro_kernel(layer.weight_bits, layer.activation_bits, layer.channels),
                lambda layer: activation_shift(layer.activation_bits))
