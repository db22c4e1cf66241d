"""SDQ: stochastic differentiable quantization with a Differentiable Bitwidth Parameter per quantizer.

Huang et al., "SDQ: Stochastic Differentiable Quantization with Mixed Precision", ICML 2022.

**Search.** Every quantizer (a layer's weight, a layer's input) holds a pair of adjacent bit-widths
``(b, b + 1)`` of its :class:`~mpqc.quantizers.base.BitRange` and a Differentiable Bitwidth Parameter (DBP)
``beta`` in [0, 1], the probability of the upper one. In training mode each forward pass draws the bit-width::

    Q(x) = Q_{b+1}(x)  with probability beta,     Q_b(x)  with probability 1 - beta

(one draw per quantizer per step, from torch's global generator, so a seeded run and its resume are
reproducible). The choice is straight-through for the DBP: its gradient is that of the expected output
``E[Q] = beta Q_{b+1} + (1 - beta) Q_b``, i.e. ``dL/dbeta = <dL/dQ, Q_{b+1}(x) - Q_b(x)>``, while the input and
the range get the gradient of the quantizer actually drawn. ``bits()`` is the expected bit-width
``E[bits] = b + beta``, differentiable in ``beta``: the budget penalty reads it.
``Q_k`` is the learned-range uniform quantizer of :mod:`mpqc.quantizers.uniform` (weights: per-output-channel
normalisation as in DQ and one learned clipping level per layer; activations: one learned range per tensor).

When an optimizer step takes ``beta`` out of [0, 1], :meth:`project_` moves the pair one bit down (``beta < 0``)
or up (``beta > 1``) and carries the excess over, so the pair always brackets the expected bit-width and the
whole BitRange is reachable from one DBP (the paper decays the pair downwards only; here both ways).

**Evaluation** (``model.eval()``) is deterministic: the more probable of the two bit-widths, i.e.
``round(b + beta)``, the integer that freezing starts from (before any budget repair).

**Fixed-bit training** after the search (``to_fixed``) uses :class:`SDQFixedQuantizer` for weights: the fixed
quantizer plus the *entropy-aware bin regularisation* (EBR) as its ``extra_loss()``, and the method's
registered default turns knowledge distillation from the fp32 model on for fine-tuning
(``QuantMethod.defaults.finetune_distill``). EBR as implemented (:func:`entropy_aware_bin_regularization`):
weights are binned by their integer code; each bin's term pulls the bin's mean onto its quantization level and
its variance to zero (the bin regulariser of Xu et al., ICCV 2021, that SDQ builds on; measured in units of the
dynamic range ``qmax * step``, so that the pull is the same at every bit-width), and the terms are weighted by
each bin's share ``-p_j log p_j / H`` of the entropy ``H`` of the quantized weights, so bins that carry the
information dominate and nearly empty outlier bins do not. The paper's exact
weighting could not be checked here (only its abstract is in ``shared/seeds``); this weighting is our reading.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mpqc.quantizers.base import BitRange, FixedQuantizer, _broadcast_channels
from mpqc.quantizers.mixture import bit_mixture
from mpqc.quantizers.uniform import LearnedRangeQuantizer

#: Default strength of the entropy-aware bin regularisation during fixed-bit fine-tuning (per weight quantizer).
EBR_WEIGHT = 1.0


def entropy_aware_bin_regularization(w: Tensor, scale: Tensor, qmin: int, qmax: int, per_channel: bool) -> Tensor:
    """EBR of ``w`` quantized with (detached) ``scale``: entropy-weighted sum over bins of
    ``(mean_j - level_j)**2 + var_j``, in units of the dynamic range (``qmax`` steps).

    >>> w = torch.tensor([0.0, 1.0, 1.0, -1.0])
    >>> entropy_aware_bin_regularization(w, torch.tensor([1.0]), -1, 1, per_channel=False).item()
    0.0
    """
    scale = scale.detach().abs().clamp_min(1e-12)
    scale = _broadcast_channels(scale, w.dim(), 0) if per_channel else scale.reshape([1] * w.dim())
    u = (w / scale).reshape(-1)
    codes = torch.clamp(torch.round(u.detach()), qmin, qmax).long() - qmin
    n_bins = qmax - qmin + 1
    count = torch.bincount(codes, minlength=n_bins).to(u.dtype)
    occupied = count > 0
    mean = torch.zeros(n_bins, dtype=u.dtype, device=u.device).index_add(0, codes, u) / count.clamp_min(1)
    spread = torch.zeros(n_bins, dtype=u.dtype, device=u.device).index_add(0, codes, (u - mean[codes]) ** 2)
    variance = spread / count.clamp_min(1)
    centre = torch.arange(qmin, qmax + 1, dtype=u.dtype, device=u.device)
    per_bin = (mean - centre) ** 2 + variance
    p = count / count.sum()
    h = torch.where(occupied, -p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    weights = h / h.sum() if h.sum().item() > 0 else occupied.to(u.dtype) / occupied.sum()
    # In units of the step the pull on a weight grows like 4**bits (an SGD step overshoots at 8 bits); measured
    # in units of the dynamic range (qmax steps) instead, it is the same force at every bit-width.
    return (weights * per_bin).sum() / float(max(abs(qmin), qmax)) ** 2


class SDQFixedQuantizer(FixedQuantizer):
    """A :class:`FixedQuantizer` whose ``extra_loss()`` is SDQ's entropy-aware bin regularisation of the last
    tensor it quantized in training mode (the layer's weight), times ``ebr_weight``.

    >>> q = SDQFixedQuantizer(2, True, torch.tensor([0.5]), ebr_weight=1.0)
    >>> _ = q(torch.tensor([0.5, -0.5, 0.0, 0.1]))
    >>> round(q.extra_loss().item(), 4)  # bins -1, 0, 1 equally likely; bin 0 = {0, 0.2}: 0.1**2 + 0.01, / 3
    0.0067
    """

    def __init__(
        self, bits: int, signed: bool, scale: Tensor, per_channel: bool = False, ebr_weight: float = EBR_WEIGHT
    ) -> None:
        super().__init__(bits, signed, scale, per_channel)
        self.ebr_weight = float(ebr_weight)
        self._last_input: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.ebr_weight > 0 and torch.is_grad_enabled():
            self._last_input = x
        return super().forward(x)

    def extra_loss(self) -> Tensor | None:
        x, self._last_input = self._last_input, None  # each forward's input is regularised once
        if x is None:
            return None
        return self.ebr_weight * entropy_aware_bin_regularization(x, self.scale, self.qmin, self.qmax,
                                                                  self.per_channel)

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        if bits == self.fixed_bits:
            return self
        plain = super().to_fixed(bits, weight)
        return SDQFixedQuantizer(bits, self.signed, plain.scale, self.per_channel, self.ebr_weight)

    def __getstate__(self):  # deepcopy/pickle: never carry a tensor attached to an old graph
        state = super().__getstate__()
        state = dict(state, _last_input=None)
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ebr_weight={self.ebr_weight}"


class _SDQQuantizer(LearnedRangeQuantizer):
    """A DBP over the adjacent pair (``lower``, ``lower + 1``) and the stochastic choice between them."""

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int, bit_range: BitRange, per_channel: bool,
        max_range: float | None = None, weight: Tensor | None = None,
    ) -> None:
        super().__init__(signed, dynamic_range, bit_range, per_channel, max_range, weight)
        low, high = bit_range.min_bits, bit_range.max_bits
        init_bits = min(max(int(init_bits), low), high)
        lower = min(max(init_bits - 1, low), max(low, high - 1))
        self.register_buffer("lower", torch.tensor(lower, dtype=torch.long))
        self.dbp = nn.Parameter(torch.tensor(float(init_bits - lower)))

    def _pair(self) -> tuple[int, int]:
        lower = int(self.lower)
        return lower, min(lower + 1, self.bit_range.max_bits)

    def probability(self) -> Tensor:
        """The DBP as a probability: clamped into [0, 1] in value, straight-through in gradient (so a DBP at 0 or 1
        can leave it; ``project_`` then moves the pair)."""
        return self.dbp.detach().clamp(0.0, 1.0) + (self.dbp - self.dbp.detach())

    def bits(self) -> Tensor:
        lower, upper = self._pair()
        return lower + self.probability() * (upper - lower)

    def _choose(self, x: Tensor) -> Tensor:
        lower, upper = self._pair()
        if upper == lower:
            return self.quantize_at(x, lower)
        beta = self.probability()
        if self.training:
            pick_upper = bool(torch.rand((), device=x.device) < beta.detach())
        else:
            pick_upper = int(torch.round(self.bits().detach())) == upper
        if not self.per_channel:
            # An activation: the same value and gradients as below, as a one-hot mixture in one autograd node
            # (mpqc.quantizers.mixture): the drawn quantizer in value, the expectation's gradient for the DBP.
            expectation = torch.stack([1 - beta, beta])
            drawn = torch.tensor([0.0, 1.0] if pick_upper else [1.0, 0.0], device=x.device)
            return bit_mixture(x, self.log_range.exp(), drawn + (expectation - expectation.detach()),
                               (lower, upper), self.signed)
        q_lower, q_upper = self.quantize_at(x, lower), self.quantize_at(x, upper)
        chosen = q_upper if pick_upper else q_lower
        # Straight-through on the choice: the value is the drawn quantizer's (the added term is exactly zero);
        # the DBP's gradient is that of the expectation, <dL/dQ, Q_upper - Q_lower>.
        return chosen + (beta - beta.detach()) * (q_upper - q_lower)

    @torch.no_grad()
    def project_(self) -> None:
        super().project_()
        low, high = self.bit_range.min_bits, self.bit_range.max_bits
        beta = self.dbp.item()
        if high == low:
            self.dbp.fill_(0.0)
            return
        if 0.0 <= beta <= 1.0:
            return
        expected = min(max(int(self.lower) + beta, low), high)
        lower = min(max(math.floor(expected), low), high - 1)
        self.lower.fill_(lower)
        self.dbp.fill_(expected - lower)


class SDQWeightQuantizer(_SDQQuantizer):
    """Signed, per-output-channel SDQ weight quantizer (one DBP and one clipping level per layer).

    >>> w = torch.randn(4, 3, 3, 3)
    >>> q = SDQWeightQuantizer(w, init_bits=4)
    >>> (int(q.lower), q.dbp.item(), q.bits().item())
    (3, 1.0, 4.0)
    >>> q(w).shape
    torch.Size([4, 3, 3, 3])
    """

    def __init__(
        self, weight: Tensor, init_bits: int = 8, bit_range: BitRange = BitRange(), ebr_weight: float = EBR_WEIGHT
    ) -> None:
        super().__init__(True, 1.0, init_bits, bit_range, per_channel=True, max_range=1.0, weight=weight)
        self.ebr_weight = ebr_weight

    def forward(self, w: Tensor) -> Tensor:
        return self._choose(w)

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        plain = self.fixed(bits, weight)
        return SDQFixedQuantizer(plain.fixed_bits, True, plain.scale, True, self.ebr_weight)


class SDQActivationQuantizer(_SDQQuantizer):
    """Per-tensor SDQ activation quantizer (unsigned after ReLU-like producers).

    >>> q = SDQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=8)
    >>> q.bits().item()
    8.0
    """

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int = 8, bit_range: BitRange = BitRange()
    ) -> None:
        super().__init__(signed, dynamic_range, init_bits, bit_range, per_channel=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._choose(x)
