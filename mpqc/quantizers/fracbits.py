"""FracBits: mixed precision through fractional bit-widths interpolating neighbouring integer quantizers.

Yang & Jin, "FracBits: Mixed Precision Quantization via Fractional Bit-Widths", AAAI 2021.

Each quantizer learns a fractional bit-width ``b`` in its :class:`~mpqc.quantizers.base.BitRange`: one per layer,
or one per output channel of a weight (the paper's *kernel-wise* variant, method ``"fracbits-kernel"``). The
output interpolates the two neighbouring integer quantizers with the fractional part as weight::

    Q_b(x) = (1 - f) * Q_lo(x) + f * Q_{lo+1}(x),     lo = min(floor(b), b_max - 1),   f = b - lo

so ``dQ/db = Q_{lo+1}(x) - Q_lo(x)`` and, at an integer ``b``, the output *is* ``Q_b`` (bit for bit), the integer
quantizer that freezing produces (same codes, tested). The paper interpolates between ``floor(b)`` and
``ceil(b)``, which coincide at an integer ``b`` and leave it without a gradient there (its code starts at 7.5
bits); taking the upper neighbour ``lo + 1`` instead gives the same outputs with a gradient at integers too, so
the search can start from ``init_bits`` exactly. ``Q_k`` is the learned-range uniform quantizer of
:mod:`mpqc.quantizers.uniform` (weights: per-output-channel normalisation and one learned clipping level per
layer; activations: one learned range per tensor), a stand-in for the paper's DoReFa/PACT-style quantizers that
stays in mpqc's integer contract.

``bits()`` is ``b``. Kernel-wise, it is the mean of the channels' bit-widths, which is the parameter-weighted
mean (every output channel has the same number of weights), so every budget stays exact: weight memory and
average bits are linear in each channel's bits, BitOPs bilinear in (weight, activation) bits. The paper's
costs interpolate the neighbouring integer costs with the same weights ``1 - f`` and ``f``, which is exactly
``b`` (and ``b_w * b_a`` for BitOPs), so the shared budget penalty on ``bits()`` is the paper's cost term.

After the search, freezing rounds ``b`` (then repairs the budget). Kernel-wise bits are frozen to one bit-width
per layer, ``round(mean)``, since the integer contract stores one weight bit-width per layer; the per-channel
search result stays readable through :meth:`FracBitsWeightQuantizer.channel_bits`.
Not implemented: 0-bit channels (channel pruning through a 0-bit quantizer).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mpqc.quantizers.base import BitRange
from mpqc.quantizers.uniform import LearnedRangeQuantizer


class _FracBitsQuantizer(LearnedRangeQuantizer):
    """A fractional bit-width ``frac_bits`` (scalar, or ``[C]`` kernel-wise) and the interpolation."""

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int, bit_range: BitRange, per_channel: bool,
        channels: int | None = None, max_range: float | None = None,
    ) -> None:
        super().__init__(signed, dynamic_range, bit_range, per_channel, max_range)
        init = float(min(max(init_bits, bit_range.min_bits), bit_range.max_bits))
        self.frac_bits = nn.Parameter(torch.full((channels,), init) if channels else torch.tensor(init))

    @property
    def kernel_wise(self) -> bool:
        return self.frac_bits.dim() == 1

    def channel_bits(self) -> Tensor:
        """The fractional bit-width(s): a scalar, or one per output channel (kernel-wise)."""
        low, high = self.bit_range.min_bits, self.bit_range.max_bits
        # Clamped in value, straight-through in gradient (``project_`` keeps the stored value in range).
        return self.frac_bits.detach().clamp(low, high) + (self.frac_bits - self.frac_bits.detach())

    def bits(self) -> Tensor:
        return self.channel_bits().mean() if self.kernel_wise else self.channel_bits()

    def _interpolate(self, x: Tensor) -> Tensor:
        low, high = self.bit_range.min_bits, self.bit_range.max_bits
        b = self.channel_bits()
        if high == low:
            return self.quantize_at(x, low)
        lower = torch.clamp(torch.floor(b.detach()), low, high - 1).long()
        frac = b - lower
        if not self.kernel_wise:
            lower = int(lower)
        else:
            frac = frac.reshape([-1] + [1] * (x.dim() - 1))
            if bool((lower == lower[0]).all()):
                lower = int(lower[0])  # every channel on the same pair: the per-layer path (same values)
        q_lower, q_upper = self.quantize_at(x, lower), self.quantize_at(x, lower + 1)
        # (1 - f) * Q_lo + f * Q_hi: exactly Q_lo at f = 0 and exactly Q_hi at f = 1.
        return (1 - frac) * q_lower + frac * q_upper

    @torch.no_grad()
    def project_(self) -> None:
        super().project_()
        self.frac_bits.clamp_(self.bit_range.min_bits, self.bit_range.max_bits)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", kernel_wise" if self.kernel_wise else "")


class FracBitsWeightQuantizer(_FracBitsQuantizer):
    """Signed, per-output-channel weight quantizer with a fractional bit-width per layer or per channel.

    >>> w = torch.randn(4, 3, 3, 3)
    >>> q = FracBitsWeightQuantizer(w, init_bits=4)
    >>> q.bits().item()
    4.0
    >>> torch.allclose(q(w), q.to_fixed(4, w)(w))
    True
    >>> FracBitsWeightQuantizer(w, init_bits=4, kernel_wise=True).channel_bits().shape
    torch.Size([4])
    """

    def __init__(
        self, weight: Tensor, init_bits: int = 8, bit_range: BitRange = BitRange(), kernel_wise: bool = False
    ) -> None:
        super().__init__(True, 1.0, init_bits, bit_range, per_channel=True,
                         channels=weight.shape[0] if kernel_wise else None, max_range=1.0)

    def forward(self, w: Tensor) -> Tensor:
        return self._interpolate(w)


class FracBitsActivationQuantizer(_FracBitsQuantizer):
    """Per-tensor activation quantizer with a fractional bit-width (unsigned after ReLU-like producers).

    >>> q = FracBitsActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=8)
    >>> q.bits().item()
    8.0
    """

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int = 8, bit_range: BitRange = BitRange()
    ) -> None:
        super().__init__(signed, dynamic_range, init_bits, bit_range, per_channel=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._interpolate(x)

