"""Per-row bit-widths for embedding tables, given by how often each row is read.

A lookup table never multiplies by its codes: a row is read, scaled by its own scale and handed on as a float. So
its rows need not share a bit-width (the integer contract stores one per layer for convs and linears, whose
kernels run on the codes). And rows are not read alike: in a text model's word table a handful of tokens make most
of the text and half the vocabulary never occurs in a given corpus (all-MiniLM-L6-v2 on the fortunes training
texts: 15,291 of 30,522 rows read at all). If a row's error counts in proportion to how often it is read,
``f_r``, the allocation minimising ``sum_r f_r 4^-b_r`` (the squared error of a ``b``-bit grid) at a fixed total
``sum_r b_r`` is ``b_r = c + log2(f_r) / 2`` (reverse water-filling); :func:`rows_by_frequency` rounds it,
clamps it to the bit range and sets ``c`` so the table's mean is the bit-width the search and freezing gave it,
then fills what rounding left over one row at a time where it removes the most error. The table's weight memory
(and average bits) is what it was, so every budget that counted it still holds.

Measured on all-MiniLM-L6-v2 before any training (``bench/minilm_table_bits.py``: fp32 activations, linears at 5
bits, 3.99 bits per weight in all): cosine to fp32 0.958 and top-10 neighbour agreement 73.0% with the word
table at a uniform 3 bits, 0.975 and 81.8% with its rows by frequency in the training texts.

:class:`RowBitsQuantizer` is the frozen table's quantizer: a per-row :class:`FixedQuantizer` whose codes are
clamped to each row's range; ``bits()`` is the mean (what budgets count), ``frozen()`` carries the row bits.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.quantizers.base import BitRange, FixedQuantizer, FrozenQuant, _broadcast_channels, round_ste, row_ranges
from mpqc.quantizers.calibration import mse_channel_clip


def rows_by_frequency(counts: Tensor, mean_bits: float, bit_range: BitRange) -> Tensor:
    """One bit-width per row (float tensor of integers in ``bit_range``) whose mean is at most ``mean_bits`` and
    as close to it as one row's bit allows; rows read more often get more bits (see the module docstring). Rows
    never read count as read half a time, so unread rows tie and the leftover bits go to the most-read rows.

    >>> rows_by_frequency(torch.tensor([1000.0, 100.0, 10.0, 0.0]), 4.0, BitRange(2, 8)).tolist()
    [6.0, 5.0, 3.0, 2.0]
    """
    low_bits, high_bits = bit_range.min_bits, bit_range.max_bits
    if not low_bits <= mean_bits:
        raise ConfigError(f"a table's rows cannot average {mean_bits:g} bits: the least is {low_bits}")
    weight = counts.double().clamp_min(0) + 0.5
    level = torch.log2(weight) / 2
    lowest, highest = low_bits - float(level.max()) - 1, high_bits - float(level.min()) + 1
    for _ in range(64):  # the largest c whose rounded, clamped allocation stays within the mean
        middle = (lowest + highest) / 2
        if (middle + level).round().clamp(low_bits, high_bits).mean() > mean_bits:
            highest = middle
        else:
            lowest = middle
    bits = (lowest + level).round().clamp(low_bits, high_bits)
    spare = int(mean_bits * len(bits) - float(bits.sum()) + 1e-9)  # whole bits rounding left unused
    if spare > 0:  # one more bit where it removes the most error, f_r * 4^-b_r (at most once per row)
        gain = torch.where(bits < high_bits, weight * 4.0 ** -bits, torch.tensor(-1.0, dtype=weight.dtype))
        order = torch.argsort(gain, descending=True, stable=True)[:spare]
        bits[order[gain[order] > 0]] += 1
    return bits.float()


def mse_row_clip(weight: Tensor, row_bits: Tensor) -> Tensor:
    """Each row's clipping level ``[R]`` fitted to its own bit-width by :func:`mse_channel_clip` (one search per
    bit-width present)."""
    clip = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for bits in row_bits.unique().tolist():
        rows = (row_bits == bits).nonzero().flatten().to(weight.device)
        clip[rows] = mse_channel_clip(weight[rows], int(bits)).reshape(-1).to(clip.dtype)
    return clip


class RowBitsQuantizer(FixedQuantizer):
    """A table's frozen weight quantizer with one bit-width per row (``row_bits``, a buffer) and a learned scale
    per row; ``fixed_bits`` is the largest row bit-width (what the table is stored in)."""

    def __init__(self, row_bits: Tensor, signed: bool, scale: Tensor) -> None:
        super().__init__(int(row_bits.max()), signed, scale, per_channel=True)
        if row_bits.numel() != self.log_scale.numel():
            raise ConfigError(f"{row_bits.numel()} row bit-widths for {self.log_scale.numel()} row scales")
        self.register_buffer("row_bits", row_bits.detach().float().reshape(-1).clone())

    def _row_bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return tuple(_broadcast_channels(bound, x.dim(), 0) for bound in row_ranges(self.row_bits, self.signed))

    def forward(self, x: Tensor) -> Tensor:
        scale = self._scale(x)
        low, high = self._row_bounds(x)
        return round_ste(torch.clamp(x / scale, low, high)) * scale

    def bits(self) -> Tensor:
        return self.row_bits.mean()

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        raise ConfigError("a table's per-row bit-widths are final: it is not frozen again")

    @torch.no_grad()
    def init_weight_clip_(self, weight: Tensor, clip: Tensor) -> None:
        self.log_scale.copy_((clip.reshape(-1).float() / row_ranges(self.row_bits, self.signed)[1])
                             .clamp_min(1e-12).log())

    def frozen(self) -> FrozenQuant:
        return FrozenQuant(self.fixed_bits, self.signed, self.scale.detach().clone(), self.row_bits.clone())

    def extra_repr(self) -> str:
        return f"rows at {float(self.bits()):.3f} bits on average (max {self.fixed_bits}), signed={self.signed}"
