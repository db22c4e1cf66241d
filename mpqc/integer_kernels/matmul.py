"""Matmul between two quantized activations (Q.K^T, attention.V), batched, with int32 accumulation.

Semantics (:func:`matmul_reference`): ``acc = a @ b`` over the codes (int64 in the reference, exact), with numpy
batch broadcasting; the result is an int32-range accumulator at scale ``s_a * s_b``, requantized by whatever
follows (the contract's requantize step, not part of this kernel). :class:`IntegerMatmul` refuses bit-widths and
depths whose accumulator could leave int32 (``K * max|a| * max|b| < 2^31``).

* TVM: ``relax.op.matmul`` on int32 operands with int32 output: exact under that bound.
* ONNX: ``MatMulInteger`` on **uint8 operands with zero points** (``code + 128`` with zero point 128 for signed
  codes, the code itself with zero point 0 for unsigned ones): onnxruntime's u8 x u8 kernels widen to int16 before
  multiplying and are exact on every x86 CPU, while its u8 x s8 kernels saturate pairs of products in int16 on
  CPUs without VNNI (``targets/onnx.py``'s docstring has the measurements). This is the storage the QDQ export
  already uses for activation codes, so in an exported graph the operands are QuantizeLinear outputs and
  :func:`matmul_onnx_storage` applies directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.quantizers.base import integer_range

INT32_LIMIT = 2**31 - 1
SIGNED_ZERO_POINT = 128


@dataclass(frozen=True)
class IntegerMatmul:
    """The operands' bit-widths and signs and the contraction depth ``depth`` (K)."""

    a_bits: int
    b_bits: int
    depth: int
    a_signed: bool = True
    b_signed: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.a_bits <= 8 or not 2 <= self.b_bits <= 8:
            raise ConfigError(f"IntegerMatmul: operand bits must be in 2..8, got {self.a_bits}, {self.b_bits}")
        a = max(abs(v) for v in integer_range(self.a_bits, self.a_signed))
        b = max(abs(v) for v in integer_range(self.b_bits, self.b_signed))
        if self.depth * a * b > INT32_LIMIT:
            raise ConfigError(f"IntegerMatmul: depth {self.depth} at {self.a_bits}x{self.b_bits} bits can overflow "
                              f"the int32 accumulator ({self.depth} * {a} * {b} > 2^31 - 1)")

    def zero_points(self) -> tuple[int, int]:
        return (SIGNED_ZERO_POINT if self.a_signed else 0, SIGNED_ZERO_POINT if self.b_signed else 0)


def _check_depth(spec: IntegerMatmul, k: int) -> None:
    if k != spec.depth:
        raise ConfigError(f"IntegerMatmul: operands contract over {k}, the spec says depth {spec.depth}")


# --------------------------------------------------------------------------------------------- reference (torch)
def matmul_reference(a: Tensor, b: Tensor, spec: IntegerMatmul) -> Tensor:
    """``a @ b`` of int64 codes (batched, broadcast); int64 result within the int32 range."""
    _check_depth(spec, a.shape[-1])
    return torch.matmul(a.to(torch.int64), b.to(torch.int64))


# --------------------------------------------------------------------------------------------- TVM (relax)
def matmul_relax(bb, a, b, spec: IntegerMatmul):
    """Emit ``a @ b`` of integer codes (relax exprs, any int dtype) as an int32 matmul; returns int64."""
    from tvm import relax

    op = relax.op
    acc = bb.emit(op.matmul(op.astype(a, "int32"), op.astype(b, "int32"), out_dtype="int32"))
    return bb.emit(op.astype(acc, "int64"))


# --------------------------------------------------------------------------------------------- ONNX
def matmul_onnx_storage(g, a_u8: str, b_u8: str, spec: IntegerMatmul) -> str:
    """``MatMulInteger`` of uint8 storage (``code + zero point``), int32 output."""
    za, zb = spec.zero_points()
    return g.node("MatMulInteger", [a_u8, b_u8, g.const(np.uint8(za), "a_zero_point"),
                                    g.const(np.uint8(zb), "b_zero_point")])


def to_storage_onnx(g, codes: str, signed: bool) -> str:
    """int64 codes -> uint8 storage (``code + 128`` for signed codes)."""
    from mpqc.integer_kernels.backends import storage_from_codes_onnx

    return storage_from_codes_onnx(g, codes, SIGNED_ZERO_POINT if signed else 0)


def matmul_onnx(g, a: str, b: str, spec: IntegerMatmul) -> str:
    """``a @ b`` of int64 codes (tensor names): uint8 storage, ``MatMulInteger``, back to int64."""
    acc = matmul_onnx_storage(g, to_storage_onnx(g, a, spec.a_signed), to_storage_onnx(g, b, spec.b_signed), spec)
    return g.node("Cast", [acc], to=7)
