"""Lookup-table kernels: elementwise functions of b-bit codes (GELU, erf and tanh forms; any float64 function)
and embedding lookups from a per-row quantized table.

**Elementwise tables** (:class:`IntegerTable`): a function ``f`` from input codes (``b_in`` bits, scale
``s_in``) to output codes (``b_out`` bits, scale ``s_out``) is the table over every input code::

    T[i] = clamp(round_half_even(f(float64((qmin + i) * s_in)) / s_out), out range),  i = 0 .. qmax - qmin

built once in float64 at freeze time. Reference: ``T[q - qmin]`` (torch indexing); TVM: ``take``; ONNX:
``Gather``. A gather of the same integers is exact in every backend by construction (TVM's
FakeQuantizationToInteger and onnxruntime's QLinear lookup ops do the same). Codes outside the input range are an
error in the reference and in onnxruntime (Gather checks indices); TVM's ``take`` is emitted with ``mode="clip"``.

**Embeddings** (:class:`IntegerEmbedding`): a table of integer codes ``W[v, :]`` (b bits, signed) with one scale
per row ``s_v``. ``embedding_*`` gather rows and their scales: ``(W[ids], s[ids])``, exact everywhere.
:meth:`IntegerEmbedding.requantized` gives the table requantized to one output scale at freeze time
(``round_half_even(W[v, k] * s_v / s_out)`` in float64, clamped), so that the embedding's output is codes at one
scale and the lookup stays a pure gather; BERT's three embeddings then add as integers at a common scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.quantizers.base import integer_range


def gelu_erf(x: Tensor) -> Tensor:
    """``0.5 x (1 + erf(x / sqrt 2))`` (float64)."""
    return F.gelu(x, approximate="none")


def gelu_tanh(x: Tensor) -> Tensor:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (float64)."""
    return F.gelu(x, approximate="tanh")


FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": gelu_erf, "gelu_tanh": gelu_tanh, "tanh": torch.tanh}


@dataclass(frozen=True)
class IntegerTable:
    """A 2^b-entry lookup table for the function ``FUNCTIONS[function]`` from input to output codes."""

    function: str
    in_bits: int
    in_scale: float
    out_bits: int
    out_scale: float
    in_signed: bool = True
    out_signed: bool = True

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise ConfigError(f"IntegerTable: unknown function {self.function!r}; known: {sorted(FUNCTIONS)}")
        if not 1 <= self.in_bits <= 8 or not 1 <= self.out_bits <= 8:
            raise ConfigError(f"IntegerTable({self.function}): bits must be in 1..8, got in_bits={self.in_bits}, "
                              f"out_bits={self.out_bits}")
        for arg in ("in_scale", "out_scale"):
            value = getattr(self, arg)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"IntegerTable({self.function}): {arg} must be positive and finite, got {value}")
        integer_range(self.in_bits, self.in_signed), integer_range(self.out_bits, self.out_signed)

    @property
    def in_min(self) -> int:
        return integer_range(self.in_bits, self.in_signed)[0]

    def table(self) -> Tensor:
        """The output code for every input code from ``qmin`` to ``qmax`` (int64)."""
        lo, hi = integer_range(self.in_bits, self.in_signed)
        x = torch.arange(lo, hi + 1, dtype=torch.float64) * self.in_scale
        y = torch.round(FUNCTIONS[self.function](x) / self.out_scale)
        return torch.clamp(y, *integer_range(self.out_bits, self.out_signed)).to(torch.int64)


def table_reference(q: Tensor, spec: IntegerTable) -> Tensor:
    """``T[q - qmin]`` of int64 codes (an index error for codes outside the input range)."""
    return spec.table()[q.to(torch.int64) - spec.in_min]


def table_relax(bb, q, spec: IntegerTable):
    from tvm import relax

    index = bb.emit(relax.op.subtract(q, relax.const(spec.in_min, "int64")))
    return bb.emit(relax.op.take(relax.const(spec.table().numpy(), "int64"), index, axis=0, mode="clip"))


def table_onnx(g, q: str, spec: IntegerTable) -> str:
    index = g.node("Sub", [q, g.const(np.int64(spec.in_min))])
    return g.node("Gather", [g.const(spec.table().numpy(), f"{spec.function}_table"), index], axis=0)


# --------------------------------------------------------------------------------------------- embeddings
@dataclass(frozen=True, eq=False)
class IntegerEmbedding:
    """A per-row quantized embedding table: codes ``[V, D]`` (``bits``, signed) and one scale per row ``[V]``."""

    codes: Tensor
    row_scale: Tensor
    bits: int

    def __post_init__(self) -> None:
        if self.codes.dim() != 2 or tuple(self.row_scale.shape) != (self.codes.shape[0],):
            raise ConfigError(f"IntegerEmbedding: codes must be [V, D] and row_scale [V], got "
                              f"{tuple(self.codes.shape)} and {tuple(self.row_scale.shape)}")
        lo, hi = integer_range(self.bits, True)
        if self.codes.numel() and (int(self.codes.min()) < lo or int(self.codes.max()) > hi):
            raise ConfigError(f"IntegerEmbedding: codes leave the signed {self.bits}-bit range [{lo}, {hi}]")
        if not bool((self.row_scale > 0).all()):
            raise ConfigError("IntegerEmbedding: every row scale must be positive")

    @classmethod
    def quantize(cls, weight: Tensor, bits: int) -> "IntegerEmbedding":
        """Symmetric per-row quantization of a float table (max-abs scale; all-zero rows get scale 1)."""
        hi = integer_range(bits, True)[1]
        amax = weight.detach().double().abs().amax(1)
        scale = torch.where(amax > 0, amax / hi, torch.ones_like(amax))
        codes = torch.clamp(torch.round(weight.detach().double() / scale[:, None]), -hi, hi).to(torch.int8)
        return cls(codes, scale.float(), bits)

    def requantized(self, out_bits: int, out_scale: float) -> Tensor:
        """The table as codes at one scale: ``clamp(round_half_even(W * s_v / s_out))`` (int64, float64 math)."""
        y = torch.round(self.codes.double() * (self.row_scale.double() / out_scale)[:, None])
        return torch.clamp(y, *integer_range(out_bits, True)).to(torch.int64)


def embedding_reference(ids: Tensor, spec: IntegerEmbedding) -> tuple[Tensor, Tensor]:
    """``(codes[ids], row_scale[ids])``: int64 codes ``[..., D]`` and float32 scales ``[...]``."""
    ids = ids.to(torch.int64)
    return spec.codes[ids].to(torch.int64), spec.row_scale[ids]


def embedding_relax(bb, ids, spec: IntegerEmbedding):
    from tvm import relax

    op = relax.op
    codes = bb.emit(op.astype(op.take(relax.const(spec.codes.numpy(), "int8"), ids, axis=0, mode="clip"), "int64"))
    scale = bb.emit(op.take(relax.const(spec.row_scale.float().numpy(), "float32"), ids, axis=0, mode="clip"))
    return codes, scale


def embedding_onnx(g, ids: str, spec: IntegerEmbedding) -> tuple[str, str]:
    codes = g.node("Cast", [g.node("Gather", [g.const(spec.codes.numpy(), "embedding_codes"), ids], axis=0)], to=7)
    scale = g.node("Gather", [g.const(spec.row_scale.float().numpy(), "embedding_row_scale"), ids], axis=0)
    return codes, scale
