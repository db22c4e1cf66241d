"""Integer softmax over one axis of b-bit codes, with an optional keep mask (masked attention).

Semantics (the one definition; :func:`softmax_reference`), for input codes ``q`` (int64, any b <= 8 bits, scale
``s_in``) along ``axis``, and a boolean ``keep`` broadcastable to ``q`` (False: the entry is masked out)::

    m = max(q[keep])                                  # the row maximum over kept entries
    d = clamp(m - q, 0, 2^b - 1)                      # code distance from the maximum
    E = T[d] * keep,  T[k] = round_half_even(2^16 * exp(-k * s_in))   (float64, built once: the exp table)
    S = max(sum(E), 1)
    out = clamp(round_half_even(E * M / (S * 2^16)), 0, 2^b_out - 1),  M = round_half_even(2^16 / s_out)

``exp(s_in * (q - m)) = exp(-d * s_in)`` exactly, so the table over ``d`` is the whole exponential for <= 8-bit
codes (2^b entries, I-ViT's Shiftmax replaced by a lookup that is exact by construction); everything after the
gather is int64 arithmetic with an exact rational rounded half to even (:func:`~.arith.div_round_half_even`), so
every backend computes the same codes. Output codes are unsigned ``b_out`` bits at scale ``s_out`` (default
``1 / (2^b_out - 1)``: probability 1 is code ``2^b_out - 1``, and ``M`` is then exact). A fully masked row gives
all zeros (S is 0, taken as 1).

Masks: attention masks arrive as additive float tensors of 0 and large negatives (HF: ``finfo.min``); in the
integer program they are the boolean ``keep`` (:func:`keep_from_additive_mask`, which refuses any other value:
a general additive bias such as ALiBi is not a mask and is not handled here). Masking by ``keep`` is exact: a
masked entry contributes exactly 0, where float softmax gives ``exp(-1e9)``, also 0.

Bounds: ``E * M <= 2^16 * 2^16 / s_out`` and ``S * 2^16 <= N * 2^32``: int64 holds them for ``s_out >= 2^-20`` and
``N < 2^30``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.integer_kernels import arith

EXP_FRACTION_BITS = 16   # T[0] = 2^16
OUT_FRACTION_BITS = 16   # M = 2^16 / s_out
MASKED_CODE = -(2**40)   # stands in for masked entries when taking the row maximum
MASK_THRESHOLD = -1e4    # additive mask entries at or below this are "masked out"


@dataclass(frozen=True)
class IntegerSoftmax:
    """The frozen parameters of one softmax: input bits and scale, output bits and scale, axis."""

    in_bits: int
    in_scale: float
    out_bits: int = 8
    out_scale: float | None = None   # default 1 / (2^out_bits - 1)
    axis: int = -1

    def __post_init__(self) -> None:
        if not 2 <= self.in_bits <= 8 or not 2 <= self.out_bits <= 8:
            raise ConfigError(f"IntegerSoftmax: bits must be in 2..8, got in_bits={self.in_bits}, "
                              f"out_bits={self.out_bits}")
        if not (self.in_scale > 0 and math.isfinite(self.in_scale)):
            raise ConfigError(f"IntegerSoftmax: in_scale must be positive and finite, got {self.in_scale}")
        if self.out_scale is not None and not (2.0**-20 <= self.out_scale <= 1.0):
            raise ConfigError(f"IntegerSoftmax: out_scale must be in [2^-20, 1], got {self.out_scale}")

    @property
    def output_scale(self) -> float:
        return self.out_scale if self.out_scale is not None else 1.0 / (2**self.out_bits - 1)

    @property
    def out_max(self) -> int:
        return 2**self.out_bits - 1

    def exp_table(self) -> Tensor:
        """``T[k] = round_half_even(2^16 * exp(-k * s_in))`` for k in 0..2^in_bits - 1 (int64)."""
        k = torch.arange(2**self.in_bits, dtype=torch.float64)
        return torch.round(torch.exp(-k * self.in_scale) * 2.0**EXP_FRACTION_BITS).to(torch.int64)

    def multiplier(self) -> int:
        return int(torch.round(torch.tensor(2.0**OUT_FRACTION_BITS / self.output_scale, dtype=torch.float64)))


def keep_from_additive_mask(mask: Tensor) -> Tensor:
    """The boolean keep mask of an additive attention mask whose entries are 0 (keep) or <= -1e4 (mask out)."""
    bad = ~((mask == 0) | (mask <= MASK_THRESHOLD))
    if bool(bad.any()):
        raise ConfigError(f"softmax mask: additive mask entries must be 0 or <= {MASK_THRESHOLD:g}, found "
                          f"{mask[bad].flatten()[:4].tolist()}; a general additive bias is not a mask")
    return mask == 0


# --------------------------------------------------------------------------------------------- reference (torch)
def softmax_reference(q: Tensor, spec: IntegerSoftmax, keep: Tensor | None = None) -> Tensor:
    """Integer softmax of codes ``q`` (int64) along ``spec.axis``; returns unsigned codes (int64)."""
    table = spec.exp_table()
    q = q.to(torch.int64)
    qk = q if keep is None else torch.where(keep, q, torch.tensor(MASKED_CODE))
    m = qk.amax(dim=spec.axis, keepdim=True)
    d = torch.clamp(m - q, 0, table.numel() - 1)
    e = table[d]
    if keep is not None:
        e = e * keep.to(torch.int64)
    s = torch.clamp(e.sum(dim=spec.axis, keepdim=True), min=1)
    out = arith.div_round_half_even(e * spec.multiplier(), s * 2**OUT_FRACTION_BITS)
    return torch.clamp(out, 0, spec.out_max)


# --------------------------------------------------------------------------------------------- TVM (relax)
def softmax_relax(bb, q, spec: IntegerSoftmax, keep=None):
    """Emit the integer softmax of int64 codes ``q`` (a relax expr) into ``bb``; ``keep``: a bool expr or None."""
    from tvm import relax

    op, c = relax.op, arith._c
    table = relax.const(spec.exp_table().numpy(), "int64")
    qk = q if keep is None else bb.emit(op.where(keep, q, c(MASKED_CODE)))
    m = bb.emit(op.max(qk, axis=[spec.axis], keepdims=True))
    d = bb.emit(op.minimum(op.maximum(op.subtract(m, q), c(0)), c(2**spec.in_bits - 1)))
    e = bb.emit(op.take(table, d, axis=0))
    if keep is not None:
        e = bb.emit(op.multiply(e, op.astype(keep, "int64")))
    s = bb.emit(op.maximum(op.sum(e, axis=[spec.axis], keepdims=True), c(1)))
    out = arith.div_round_half_even_relax(bb, bb.emit(op.multiply(e, c(spec.multiplier()))),
                                          bb.emit(op.multiply(s, c(2**OUT_FRACTION_BITS))))
    return bb.emit(op.minimum(op.maximum(out, c(0)), c(spec.out_max)))


# --------------------------------------------------------------------------------------------- ONNX
def softmax_onnx(g, q: str, spec: IntegerSoftmax, keep: str | None = None) -> str:
    """Append the integer softmax of int64 codes ``q`` (a tensor name) to ``g``; ``keep``: a bool tensor name."""
    i64 = np.int64
    table = g.const(spec.exp_table().numpy(), "exp_table")
    axes = g.const(np.array([spec.axis], dtype=i64), "axes")
    qk = q if keep is None else g.node("Where", [keep, q, g.const(i64(MASKED_CODE))])
    m = g.node("ReduceMax", [qk, axes], keepdims=1)
    d = g.node("Min", [g.node("Max", [g.node("Sub", [m, q]), g.const(i64(0))]), g.const(i64(2**spec.in_bits - 1))])
    e = g.node("Gather", [table, d], axis=0)
    if keep is not None:
        e = g.node("Mul", [e, g.node("Cast", [keep], to=7)])
    s = g.node("Max", [g.node("ReduceSum", [e, axes], keepdims=1), g.const(i64(1))])
    out = arith.div_round_half_even_onnx(g, g.node("Mul", [e, g.const(i64(spec.multiplier()))]),
                                         g.node("Mul", [s, g.const(i64(2**OUT_FRACTION_BITS))]))
    return g.node("Min", [g.node("Max", [out, g.const(i64(0))]), g.const(i64(spec.out_max))])
