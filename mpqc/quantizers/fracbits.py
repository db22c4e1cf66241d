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
**0 bit = pruned channel** (kernel-wise, on the layers ``mark_prunable`` found droppable): the channels' bits may
go below ``min_bits`` down to 0. The integer quantizer at 0 bits is ``Q_0 = 0`` and between 0 and ``min_bits`` the
output interpolates ``Q_0`` and ``Q_min`` the same way, ``Q_b = (b / min_bits) * Q_min`` (the *channel gate*
``b / min_bits``, which also scales the channel's bias, so that at 0 bits the channel's whole output is 0). Its
cost is ``b`` bits per weight, the same linear interpolation of the integer costs (0 and ``min_bits``) as above.
After the search, ``prune_channels`` rounds each layer's channels below ``min_bits`` as a whole: of those, it keeps
the ``round(sum of gates)`` strongest (their gates folded into the weight, so they output what they did, now at
``min_bits``) and removes the others from the layer and from the layers that read it.

**The gates are decided by the end of the search**: a linear gate is a scale the next layer can undo, so a search
with linear gates fades every channel of a layer a little (gates ~0.78 in ResNet-20's last blocks at 1.5 bits per
weight) and pruning them afterwards was a real change of function that fine-tuning had to repair. Over the second
half of the search (from :data:`DECIDE_FROM`), each prunable layer's gates move to what ``prune_channels`` will
do with them, so that the network adapts to it while it still searches (gradual pruning, Zhu & Gupta 2017)::

    gate = g + lam * (keep - g)      (value; the gradient reaches g unchanged, straight-through)

``g = b / min_bits`` the linear gate, ``keep`` the layer's decision (1 for the ``round(sum of g)`` channels with the
largest ``g`` below ``min_bits``, 0 for the others: :func:`~mpqc.quantizers.base.channels_to_keep`, recomputed
every step, so the decision follows the search) and ``lam`` rising linearly from 0 to 1 over the second half. The
cost follows the gate (``min_bits * gate`` bits per weight below ``min_bits``), which the decision leaves where it
was (``round(sum of g)`` channels kept); at the search's last step every gate is exactly 0 or 1, the cost is the
pruned model's, and pruning removes channels that already output nothing.
(Sharpening each gate toward 0 or 1 on its own instead, ``g^p / (g^p + (1-g)^p)`` with ``p`` annealed to 100 as in
Continuous Sparsification, was tried: every gate at 0.78 went to 1 and none was pruned, the search ending 34%
above its budget for freezing to cut; measured on the quick start's ``--full`` fracbits-kernel run.)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from mpqc.quantizers.base import BitRange, ScheduledQuantizer, channels_to_keep
from mpqc.quantizers.mixture import bit_mixture
from mpqc.quantizers.uniform import LearnedRangeQuantizer


#: Weight of the polarisation term on the channel gates of a pruning (kernel-wise) weight quantizer.
POLARIZATION_WEIGHT = 0.01
#: Where in the search (its progress) the channel gates of a pruning quantizer start moving to the layer's decision.
DECIDE_FROM = 0.5


def decision_weight(progress: float, start: float = DECIDE_FROM) -> float:
    """How far the channel gates have moved to the layer's decision: 0 before ``start``, 1 at the search's end."""
    return 0.0 if progress <= start else min((progress - start) / (1.0 - start), 1.0)


class _FracBitsQuantizer(ScheduledQuantizer, LearnedRangeQuantizer):
    """A fractional bit-width ``frac_bits`` (scalar, or ``[C]`` kernel-wise) and the interpolation."""

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int, bit_range: BitRange, per_channel: bool,
        channels: int | None = None, max_range: float | None = None, weight: Tensor | None = None,
    ) -> None:
        LearnedRangeQuantizer.__init__(self, signed, dynamic_range, bit_range, per_channel, max_range, weight)
        init = float(min(max(init_bits, bit_range.min_bits), bit_range.max_bits))
        self.frac_bits = nn.Parameter(torch.full((channels,), init) if channels else torch.tensor(init))
        self.prunable = False
        self._init_progress()

    @property
    def kernel_wise(self) -> bool:
        return self.frac_bits.dim() == 1

    @property
    def lowest_bits(self) -> int:
        """The lowest bit-width a channel may take: 0 where pruning is enabled, else ``min_bits``."""
        return 0 if self.prunable else self.bit_range.min_bits

    def channel_bits(self) -> Tensor:
        """The fractional bit-width(s): a scalar, or one per output channel (kernel-wise)."""
        low, high = self.lowest_bits, self.bit_range.max_bits
        # Clamped in value, straight-through in gradient (``project_`` keeps the stored value in range).
        return self.frac_bits.detach().clamp(low, high) + (self.frac_bits - self.frac_bits.detach())

    def channel_cost_bits(self) -> Tensor:
        """What each channel costs in bits per weight: its bit-width, or ``min_bits * gate`` below ``min_bits``
        (the gate where the search stands: the pruned layer's cost at its end)."""
        bits, gate = self.channel_bits(), self.channel_gate()
        if gate is None:
            return bits
        return torch.where(bits < self.bit_range.min_bits, self.bit_range.min_bits * gate, bits)

    def bits(self) -> Tensor:
        return self.channel_cost_bits().mean() if self.kernel_wise else self.channel_bits()

    def _interpolate(self, x: Tensor) -> Tensor:
        low, high = self.bit_range.min_bits, self.bit_range.max_bits
        b = self.channel_bits()
        if self.prunable:
            b = torch.where(b < low, b.detach().clamp_min(low), b)  # Q_min below min_bits, scaled by the gate
        if high == low:
            output = self.quantize_at(x, low)
        else:
            lower = torch.clamp(torch.floor(b.detach()), low, high - 1).long()
            frac = b - lower
            if not self.per_channel:
                # An activation's pair in one autograd node (mpqc.quantizers.mixture), same values and gradients.
                output = bit_mixture(x, self.log_range.exp(), torch.stack([1 - frac, frac]),
                                     (int(lower), int(lower) + 1), self.signed)
            else:
                if not self.kernel_wise:
                    lower = int(lower)
                else:
                    frac = frac.reshape([-1] + [1] * (x.dim() - 1))
                    if bool((lower == lower[0]).all()):
                        lower = int(lower[0])  # every channel on the same pair: the per-layer path (same values)
                q_lower, q_upper = self.quantize_at(x, lower), self.quantize_at(x, lower + 1)
                # (1 - f) * Q_lo + f * Q_hi: exactly Q_lo at f = 0 and exactly Q_hi at f = 1.
                output = (1 - frac) * q_lower + frac * q_upper
        gate = self.channel_gate()
        return output if gate is None else output * gate.reshape([-1] + [1] * (x.dim() - 1))

    def enable_pruning(self) -> bool:
        if not self.kernel_wise:
            return False
        self.prunable = True
        return True

    def channel_gate(self) -> Tensor | None:
        if not self.prunable:
            return None
        b, low = self.channel_bits(), self.bit_range.min_bits
        linear = torch.where(b < low, b / low, torch.ones_like(b))
        weight = decision_weight(self._fraction)
        if weight == 0.0:
            return linear
        keep = channels_to_keep(linear.detach()).to(linear.dtype)
        return linear + weight * (keep - linear.detach())  # the value moves to the decision; d gate / d g = 1

    @torch.no_grad()
    def keep_channels_(self, keep: Tensor) -> None:
        if not self.prunable:
            raise NotImplementedError("pruning is not enabled on this FracBits quantizer")
        # The kept channels' gates are folded into their weight rows (``prune_channels``): their scales follow,
        # so that Q(g w) = g Q(w).
        gate = self.channel_gate().detach()[keep].clamp_min(1e-8)
        self.log_gamma = nn.Parameter(self.log_gamma[keep] + gate.log())
        self.frac_bits = nn.Parameter(self.frac_bits[keep].clamp_min(self.bit_range.min_bits))

    @torch.no_grad()
    def project_(self) -> None:
        super().project_()
        self.frac_bits.clamp_(self.lowest_bits, self.bit_range.max_bits)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", kernel_wise" if self.kernel_wise else "") + (
            ", prunable" if self.prunable else "")


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
        self, weight: Tensor, init_bits: int = 8, bit_range: BitRange = BitRange(), kernel_wise: bool = False,
        polarization: float = POLARIZATION_WEIGHT,
    ) -> None:
        super().__init__(True, 1.0, init_bits, bit_range, per_channel=True,
                         channels=weight.shape[0] if kernel_wise else None, max_range=1.0, weight=weight)
        self.polarization = polarization

    def forward(self, w: Tensor) -> Tensor:
        return self._interpolate(w)

    def extra_loss(self) -> Tensor | None:
        """Where channels may be pruned: ``polarization * sum_c g_c (1 - g_c)`` over the channel gates, zero at
        gates 0 (pruned) and 1 (whole), so that the search decides per channel instead of fading all of them."""
        gate = self.channel_gate()
        if gate is None or self.polarization == 0:
            return None
        return self.polarization * (gate * (1 - gate)).sum()


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

