"""Uniform quantization at integer bit-widths with a learned dynamic range: what SDQ, FracBits and CSQ build on.

At ``k`` bits a tensor is quantized the way :class:`~mpqc.quantizers.base.FixedQuantizer` does it::

    Q_k(x) = s_k * clamp(round(x / s_k), qmin_k, qmax_k),     s_k = alpha / L_k,   L_k = qmax_k

* activations: one learned range ``alpha`` per tensor (PACT-style clipping level, initialised from calibration);
* weights: per output channel, ``s_{k,c} = gamma_c * alpha / L_k`` with a learned ``gamma_c`` (``log_gamma``,
  starting at ``max |w_c|`` or at the clipping level ``init_weight_clip_`` gives it) and one learned
  ``alpha <= 1`` per layer acting on the normalised weights, as DQ does.

``alpha`` is stored as ``log_range`` (positive under any optimizer step) and learned through the
straight-through round (LSQ-style gradients). :meth:`LearnedRangeQuantizer.quantize_at` computes the rounding
as ``FixedQuantizer`` does, so ``quantize_at(x, k)`` and ``fixed(k, x)(x)`` give the same integer codes, their
values differing only by the rounding of the scale that ``FixedQuantizer`` stores (as a logarithm): the endpoints
of every interpolation or stochastic choice are the integer quantizers that freezing produces.

``bits`` may be a Python int or an integer tensor of one bit-width per output channel (FracBits kernel-wise).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mpqc.quantizers.base import (BitRange, FixedQuantizer, Quantizer, _broadcast_channels, channel_max,
                                  positive_levels, round_ste)


class LearnedRangeQuantizer(Quantizer):
    """Base of the SDQ, FracBits and CSQ-activation quantizers: the learned range and ``Q_k`` at integer ``k``.

    Subclasses add the bit-width parametrisation (``bits()``) and ``forward``.
    """

    def __init__(
        self, signed: bool, dynamic_range: float, bit_range: BitRange, per_channel: bool,
        max_range: float | None = None, weight: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.signed = signed
        self.per_channel = per_channel
        self.bit_range = bit_range
        self.max_range = max_range
        self.log_range = nn.Parameter(torch.tensor(math.log(max(dynamic_range, 1e-4))))
        if per_channel:
            if weight is None:
                raise TypeError("a per-channel (weight) quantizer needs the layer's weight")
            self.log_gamma = nn.Parameter(channel_max(weight).log())

    @torch.no_grad()
    def init_weight_clip_(self, weight: Tensor, clip: Tensor) -> None:
        if not self.per_channel:
            super().init_weight_clip_(weight, clip)
        self.log_gamma.copy_(clip.reshape(-1).float().clamp_min(1e-8).log())

    def scale_at(self, bits: int | Tensor, x: Tensor) -> Tensor:
        """Flat scale(s) at ``bits``: ``[C]`` per output channel of a weight, or ``[1]``."""
        alpha = self.log_range.exp()
        if self.per_channel:
            return self.log_gamma.exp() * alpha / positive_levels(bits, True)
        return (alpha / positive_levels(bits, self.signed)).reshape(-1)

    def quantize_at(self, x: Tensor, bits: int | Tensor) -> Tensor:
        """``Q_bits(x)``, computed as ``FixedQuantizer(bits, ...)`` computes it (straight-through round)."""
        scale = self.scale_at(bits, x).abs().clamp_min(1e-12)
        if isinstance(bits, Tensor):
            q_max = positive_levels(bits, self.signed).to(x.dtype)
            q_min = -q_max if self.signed else torch.zeros_like(q_max)
            shape = [-1] + [1] * (x.dim() - 1) if self.per_channel else [1] * x.dim()
            q_min, q_max = q_min.reshape(shape), q_max.reshape(shape)
        else:
            q_max = positive_levels(bits, self.signed)
            q_min = -q_max if self.signed else 0
        scale = _broadcast_channels(scale, x.dim(), 0) if self.per_channel else scale.reshape([1] * x.dim())
        return round_ste(torch.clamp(x / scale, q_min, q_max)) * scale

    def fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        """The ``FixedQuantizer`` equal to ``Q_bits`` (weight quantizers need the layer's ``weight``)."""
        if self.per_channel and weight is None:
            raise TypeError("a weight quantizer needs the layer's weight to freeze its per-channel scales")
        scale = self.scale_at(int(bits), weight if self.per_channel else torch.empty(0)).detach()
        return FixedQuantizer(int(bits), self.signed, scale, per_channel=self.per_channel)

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        return self.fixed(bits, weight)

    @torch.no_grad()
    def project_(self) -> None:
        if self.max_range is not None:
            self.log_range.clamp_(max=math.log(self.max_range))

    def extra_repr(self) -> str:
        return f"signed={self.signed}, bits={self.bits().item():.2f}, range={self.bit_range}"
