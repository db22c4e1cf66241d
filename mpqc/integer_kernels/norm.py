"""Integer LayerNorm and RMSNorm over the last axis (I-BERT's integer-only LayerNorm, with an exact rational
output step), in three backends of one semantics.

Semantics (:func:`norm_reference`) for input codes ``q`` (int64, up to 16 bits, scale ``s``), normalized size
``N`` (the last axis), affine ``gamma``/``beta`` (float, per channel), output ``b_out`` bits at scale ``s_out``::

    LayerNorm:  c = N * q - sum(q)     (= N * (q - mean), exact: no division)   E = round(4^P * N^3 * eps / s^2)
    RMSNorm:    c = q                                                          E = round(4^P * N * eps / s^2)
    D = isqrt(sum(c^2) * 4^P + E)      (floor square root by unrolled Newton steps, :func:`~.arith.isqrt`)
    G = round_half_even(gamma * sqrt(N) / s_out * 2^16),  B = round_half_even(beta / s_out * 2^16)   (per channel)
    out = clamp(round_half_even((G * c * 2^P + B * D) / (D * 2^16)), qmin, qmax)

because ``(x - mean) / sqrt(var + eps) = c * sqrt(N) / sqrt(sum(c^2) + N^3 eps / s^2)`` for ``x = s * q``
(``q * sqrt(N) / sqrt(sum(q^2) + N eps / s^2)`` for RMSNorm). Everything at run time is int64: sums, squares, the
Newton square root (floor semantics in every backend: floor division in torch and TVM, ``Mod`` then exact
``Div`` in ONNX) and one exact rational rounded half to even. ``G``, ``B`` and ``E`` are frozen constants
computed once in float64. Versus float LayerNorm the error is the rounding of ``G``/``B`` (2^-16 relative) and of
``D`` (below ``1/D``, ``D ~ 2^P sqrt(sum c^2)``): well under one output LSB (tested). ``P`` (``sqrt_shift``, up to
16) is the largest shift the int64 bounds allow; it refines ``E`` too (eps of 1e-5 at s = 1/32 is 0.25 squared
codes: rounded alone it vanished and moved RMSNorm outputs by 0.6 LSB, measured) for the size and bits; without it a low-variance row of 2-bit
codes has ``D`` near 50, and the floor square root alone moved outputs of about 30 codes by 0.6 LSB (measured).

Bounds: ``sum(c^2) <= N^3 * 2^(2 * in_bits)`` and ``|G c| + |B| D`` must stay below 2^62; :meth:`IntegerNorm.check`
refuses sizes and affine values that could overflow, with the numbers.

GroupNorm is the same kernel on the input reshaped to ``[B, G, (C/G) * H * W]``, with gain and offset of shape
``[G, (C/G) * H * W]`` (:meth:`IntegerNorm.group_norm`).

L2-normalize (``F.normalize(x, dim=-1)`` = ``x / max(||x||, eps)``, Swin V2's cosine attention) is the same kernel
too (:class:`IntegerL2Normalize`): ``c = q``, no offset, ``E = 0``, ``G = round_half_even(2^16 / s_out)`` (no
``sqrt(N)``: a unit norm, not a unit mean square) and the denominator floored at the clamp,
``D = max(isqrt(sum(q^2) * 4^P), F)`` with ``F = max(1, round_half_even(2^P * eps / s))``, so::

    out = clamp(round_half_even(G * q * 2^P / (D * 2^16)), qmin, qmax)

An all-zero row gives zeros (float: ``0 / eps`` = 0). Versus float the error is again the rounding of ``G``
(2^-17 relative) and ``D`` (below ``1/D``): well under one output LSB (tested).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.integer_kernels import arith
from mpqc.quantizers.base import integer_range

AFFINE_FRACTION_BITS = 16
INT64_HEADROOM = 2**62
MAX_SQRT_SHIFT = 16


@dataclass(frozen=True, eq=False)
class IntegerNorm:
    """Frozen parameters of one LayerNorm (``center=True``) or RMSNorm (``center=False``) over the last axis."""

    size: int
    in_bits: int
    in_scale: float
    out_bits: int
    out_scale: float
    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 1e-5
    center: bool = True
    out_signed: bool = True

    def __post_init__(self) -> None:
        name = "IntegerNorm" + ("(layer)" if self.center else "(rms)")
        if not 2 <= self.in_bits <= 16 or not 2 <= self.out_bits <= 8:
            raise ConfigError(f"{name}: in_bits must be in 2..16 and out_bits in 2..8, got {self.in_bits}, "
                              f"{self.out_bits}")
        for arg in ("in_scale", "out_scale"):
            value = getattr(self, arg)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name}: {arg} must be positive and finite, got {value}")
        for arg in ("weight", "bias"):
            t = getattr(self, arg)
            if t is not None and (t.dim() == 0 or t.shape[-1] != self.size):
                raise ConfigError(f"{name}: {arg} must have shape (..., {self.size}), got {tuple(t.shape)}")
        if self.eps < 0:
            raise ConfigError(f"{name}: eps must be >= 0, got {self.eps}")
        self.check()

    def _float(self, t: Tensor | None, default: float) -> Tensor:
        return torch.full((self.size,), default, dtype=torch.float64) if t is None else t.detach().double()

    @classmethod
    def group_norm(cls, num_groups: int, channels: int, spatial: int, *, weight: Tensor | None = None,
                   bias: Tensor | None = None, **kwargs) -> "IntegerNorm":
        """GroupNorm of ``[B, C, *spatial]`` codes as this kernel over ``[B, G, (C/G) * prod(spatial)]`` (reshape the
        input that way, and the output back): LayerNorm statistics per group, the per-channel affine repeated over
        the spatial positions into a ``[G, (C/G) * prod(spatial)]`` gain and offset."""
        if channels % num_groups:
            raise ConfigError(f"IntegerNorm.group_norm: {channels} channels do not split into {num_groups} groups")

        def per_position(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().double().repeat_interleave(spatial).reshape(num_groups, -1)

        return cls(size=channels // num_groups * spatial, weight=per_position(weight), bias=per_position(bias),
                   center=True, **kwargs)

    def gain(self) -> Tensor:
        """``G`` per channel (int64)."""
        g = self._float(self.weight, 1.0) * math.sqrt(self.size) / self.out_scale * 2.0**AFFINE_FRACTION_BITS
        return torch.round(g).to(torch.int64)

    def offset(self) -> Tensor:
        """``B`` per channel (int64)."""
        return torch.round(self._float(self.bias, 0.0) / self.out_scale * 2.0**AFFINE_FRACTION_BITS).to(torch.int64)

    def epsilon_steps(self, shift: int | None = None) -> int:
        """``E``: eps in units of the squared input codes, times N^3 (LayerNorm) or N (RMSNorm), times 4^P."""
        n = self.size**3 if self.center else self.size
        shift = self.sqrt_shift if shift is None else shift
        return int(round(n * self.eps / self.in_scale**2 * 4**shift))

    def _fits(self, shift: int) -> bool:
        n, top = self.size, 2**self.in_bits
        c_max = n * top if self.center else top // 2
        sum_sq = n * c_max**2 * 4**shift + self.epsilon_steps(shift)
        d_max = max(math.isqrt(sum_sq) + 1, self.denominator_floor(shift))
        affine = int(self.gain().abs().max()) * c_max * 2**shift + int(self.offset().abs().max()) * d_max
        return max(sum_sq, affine, d_max * 2**AFFINE_FRACTION_BITS) < INT64_HEADROOM

    @property
    def sqrt_shift(self) -> int:
        """``P``: the square root's extra fraction bits, the largest (<= 16) the int64 bounds allow."""
        return max(p for p in range(MAX_SQRT_SHIFT + 1) if self._fits(p))

    def denominator_floor(self, shift: int | None = None) -> int:
        """``F``: the least denominator ``D`` (1 here: ``isqrt`` returns at least 1; a clamp for L2-normalize)."""
        return 1

    def check(self) -> None:
        if not self._fits(0):
            raise ConfigError(f"IntegerNorm: size {self.size} at {self.in_bits} input bits with this "
                              f"gamma/beta/out_scale can overflow int64 (sum(c^2), G*c or B*D beyond 2^62)")

    @property
    def out_range(self) -> tuple[int, int]:
        return integer_range(self.out_bits, self.out_signed)


@dataclass(frozen=True, eq=False)
class IntegerL2Normalize(IntegerNorm):
    """Frozen parameters of ``x / max(||x||_2, eps)`` over the last axis (see the module docstring): ``IntegerNorm``
    without centering, offset or epsilon inside the root, a unit-norm gain and a floor on the denominator."""

    center: bool = False
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.center or self.weight is not None or self.bias is not None:
            raise ConfigError("IntegerL2Normalize: no centering, weight or bias (it is x / max(||x||, eps))")
        super().__post_init__()

    def gain(self) -> Tensor:
        g = torch.full((self.size,), 2.0**AFFINE_FRACTION_BITS / self.out_scale, dtype=torch.float64)
        return torch.round(g).to(torch.int64)

    def epsilon_steps(self, shift: int | None = None) -> int:
        return 0

    def denominator_floor(self, shift: int | None = None) -> int:
        shift = self.sqrt_shift if shift is None else shift
        return max(1, int(round(self.eps / self.in_scale * 2**shift)))


# --------------------------------------------------------------------------------------------- reference (torch)
def norm_reference(q: Tensor, spec: IntegerNorm) -> Tensor:
    """Integer LayerNorm/RMSNorm of codes ``q`` (int64, last axis of size ``spec.size``); returns codes (int64)."""
    if q.shape[-1] != spec.size:
        raise ConfigError(f"IntegerNorm: input's last axis is {q.shape[-1]}, the norm's size is {spec.size}")
    q = q.to(torch.int64)
    c = spec.size * q - q.sum(-1, keepdim=True) if spec.center else q
    shift = 2**spec.sqrt_shift
    d = arith.isqrt((c * c).sum(-1, keepdim=True) * (shift * shift) + spec.epsilon_steps())
    if spec.denominator_floor() > 1:
        d = torch.clamp(d, min=spec.denominator_floor())
    out = arith.div_round_half_even(spec.gain() * shift * c + spec.offset() * d, d * 2**AFFINE_FRACTION_BITS)
    return torch.clamp(out, *spec.out_range)


# --------------------------------------------------------------------------------------------- TVM (relax)
def norm_relax(bb, q, spec: IntegerNorm):
    """Emit the integer norm of int64 codes ``q`` (a relax expr) into ``bb``."""
    from tvm import relax

    op, c_ = relax.op, arith._c
    if spec.center:
        c = bb.emit(op.subtract(op.multiply(q, c_(spec.size)), op.sum(q, axis=[-1], keepdims=True)))
    else:
        c = q
    shift = 2**spec.sqrt_shift
    sum_sq = bb.emit(op.add(op.multiply(op.sum(op.multiply(c, c), axis=[-1], keepdims=True), c_(shift * shift)),
                            c_(spec.epsilon_steps())))
    d = arith.isqrt_relax(bb, sum_sq)
    if spec.denominator_floor() > 1:
        d = bb.emit(op.maximum(d, c_(spec.denominator_floor())))
    num = bb.emit(op.add(op.multiply(relax.const((spec.gain() * shift).numpy(), "int64"), c),
                         op.multiply(relax.const(spec.offset().numpy(), "int64"), d)))
    out = arith.div_round_half_even_relax(bb, num, bb.emit(op.multiply(d, c_(2**AFFINE_FRACTION_BITS))))
    lo, hi = spec.out_range
    return bb.emit(op.minimum(op.maximum(out, c_(lo)), c_(hi)))


# --------------------------------------------------------------------------------------------- ONNX
def norm_onnx(g, q: str, spec: IntegerNorm) -> str:
    """Append the integer norm of int64 codes ``q`` (a tensor name) to ``g``."""
    i64 = np.int64
    axes = g.const(np.array([-1], dtype=i64), "axes")
    if spec.center:
        c = g.node("Sub", [g.node("Mul", [q, g.const(i64(spec.size))]), g.node("ReduceSum", [q, axes], keepdims=1)])
    else:
        c = q
    shift = 2**spec.sqrt_shift
    sum_sq = g.node("Add", [g.node("Mul", [g.node("ReduceSum", [g.node("Mul", [c, c]), axes], keepdims=1),
                                           g.const(i64(shift * shift))]), g.const(i64(spec.epsilon_steps()))])
    d = arith.isqrt_onnx(g, sum_sq)
    if spec.denominator_floor() > 1:
        d = g.node("Max", [d, g.const(i64(spec.denominator_floor()))])
    num = g.node("Add", [g.node("Mul", [g.const((spec.gain() * shift).numpy(), "gain"), c]),
                         g.node("Mul", [g.const(spec.offset().numpy(), "offset"), d])])
    out = arith.div_round_half_even_onnx(g, num, g.node("Mul", [d, g.const(i64(2**AFFINE_FRACTION_BITS))]))
    lo, hi = spec.out_range
    return g.node("Min", [g.node("Max", [out, g.const(i64(lo))]), g.const(i64(hi))])
