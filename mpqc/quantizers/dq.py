"""DQ: differentiable quantization with the step size / dynamic range parametrisation.

Uhlich et al., "Mixed Precision DNNs: All you need is a good parametrization", ICLR 2020, parametrisation
"U3" (case (d, q_max)): a uniform symmetric quantizer is described by its step size ``d`` and its dynamic range
``q_max``; both are learned with straight-through gradients and the bit-width is *inferred*:

    Q(x) = d * round(clamp(x, q_min, q_max) / d)
    b    = log2(q_max / d + 1) + 1      (signed, q_min = -q_max)
    b    = log2(q_max / d + 1)          (unsigned, q_min = 0)

Bit-width bounds ``[b_min, b_max]`` are kept, as in the reference implementation, by clipping ``d`` into
``[q_max / (2**(b_max-1) - 1), q_max / (2**(b_min-1) - 1)]`` (signed; unsigned analogously) in the forward pass,
and by projecting the stored ``d`` back into that interval after every optimizer step (``project_``): a stored
value left outside would get no gradient through the clip and stay stuck at a bound.

Two implementation choices, both documented here because they differ from a literal reading of the paper:

* ``d`` and ``q_max`` are stored as logarithms (``log_step``, ``log_range``) so they stay positive under any
  optimizer step; the quantizer is still a function of (d, q_max) and bits are inferred from them.
* Weights are quantized per output channel: each channel is first normalised by a learned scale ``gamma_c``
  (stored as ``log_gamma``; it starts at the channel's largest magnitude, or at the clipping level
  ``init_weight_clip_`` gives it, the MSE search of :mod:`mpqc.quantizers.calibration` when ``insert_quantizers``
  builds it), and one (d, q_max) pair per layer acts on the normalised weights. The effective per-channel step is
  ``gamma_c * d``; the bit-width is one per layer, which is what the budgets and lowering consume.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mpqc.quantizers.base import BitRange, FixedQuantizer, Quantizer, channel_max, positive_levels, round_ste


class _DQQuantizer(Quantizer):
    """Shared U3 math on a (possibly normalised) input."""

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int, bit_range: BitRange, max_range: float | None = None
    ) -> None:
        super().__init__()
        self.max_range = max_range
        self.signed = signed
        self.bit_range = bit_range
        init_bits = min(max(init_bits, bit_range.min_bits), bit_range.max_bits)
        step = dynamic_range / positive_levels(init_bits, signed)
        self.log_range = nn.Parameter(torch.tensor(math.log(dynamic_range)))
        self.log_step = nn.Parameter(torch.tensor(math.log(step)))

    def step_and_range(self) -> tuple[Tensor, Tensor]:
        """(d, q_max) after clipping d so that the inferred bit-width lies in the bit range."""
        q_max = self.log_range.exp()
        log_smallest = self.log_range - math.log(positive_levels(self.bit_range.max_bits, self.signed))
        log_largest = self.log_range - math.log(positive_levels(self.bit_range.min_bits, self.signed))
        # Straight-through clip in the log domain: the value is clipped, the gradient reaches d even at a bound
        # (``project_`` keeps the stored d inside the bounds, so the clip only acts between an optimizer step and
        # the projection).
        clipped = torch.minimum(torch.maximum(self.log_step, log_smallest), log_largest)
        return torch.exp(self.log_step + (clipped - self.log_step).detach()), q_max

    @torch.no_grad()
    def project_(self) -> None:
        """Keep d inside the bit range (so a clipped d never sits in a zero-gradient region) and
        q_max inside ``max_range``."""
        if self.max_range is not None:
            self.log_range.clamp_(max=math.log(self.max_range))
        log_range = self.log_range
        self.log_step.clamp_(min=float(log_range - math.log(positive_levels(self.bit_range.max_bits, self.signed))),
                             max=float(log_range - math.log(positive_levels(self.bit_range.min_bits, self.signed))))

    def bits(self) -> Tensor:
        step, q_max = self.step_and_range()
        bits = torch.log2(q_max / step + 1)
        return bits + 1 if self.signed else bits

    def _quantize(self, x: Tensor) -> Tensor:
        step, q_max = self.step_and_range()
        q_min = -q_max if self.signed else torch.zeros_like(q_max)
        return step * round_ste(torch.minimum(torch.maximum(x, q_min), q_max) / step)

    def _fixed_step(self, bits: int) -> Tensor:
        """Step size at integer ``bits`` keeping the learned dynamic range."""
        return self.log_range.detach().exp() / positive_levels(bits, self.signed)

    def set_bits(self, bits: int) -> None:
        """Set the step so that ``bits()`` is ``bits`` exactly, keeping the learned range (tests and benchmarks pin
        bit-widths with it)."""
        with torch.no_grad():
            self.log_step.copy_(torch.log(self._fixed_step(bits)))

    def extra_repr(self) -> str:
        return f"signed={self.signed}, bits={self.bits().item():.2f}, range={self.bit_range}"


class DQWeightQuantizer(_DQQuantizer):
    """Signed, per-output-channel weight quantizer; one learned (d, q_max) per layer on normalised weights.

    >>> w = torch.randn(4, 3, 3, 3)
    >>> q = DQWeightQuantizer(w, init_bits=4)
    >>> round(q.bits().item(), 4)
    4.0
    >>> q(w).shape
    torch.Size([4, 3, 3, 3])
    """

    per_channel = True

    def __init__(self, weight: Tensor, init_bits: int = 8, bit_range: BitRange = BitRange()) -> None:
        # Weights are normalised per channel to [-1, 1]: a range above 1 would only waste levels.
        super().__init__(signed=True, dynamic_range=1.0, init_bits=init_bits, bit_range=bit_range, max_range=1.0)
        self.log_gamma = nn.Parameter(channel_max(weight).log())

    def gamma(self, ndim: int) -> Tensor:
        """The learned per-output-channel normalisation, shaped to broadcast against an ``ndim``-d weight."""
        return self.log_gamma.exp().reshape([-1] + [1] * (ndim - 1))

    @torch.no_grad()
    def init_weight_clip_(self, weight: Tensor, clip: Tensor) -> None:
        self.log_gamma.copy_(clip.reshape(-1).float().clamp_min(1e-8).log())

    def forward(self, w: Tensor) -> Tensor:
        gamma = self.gamma(w.dim())
        return gamma * self._quantize(w / gamma)

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        if weight is None:
            raise TypeError("a weight quantizer needs the layer's weight to freeze its per-channel scales")
        scale = self.log_gamma.detach().exp() * self._fixed_step(bits)
        return FixedQuantizer(bits, signed=True, scale=scale, per_channel=True)


class DQActivationQuantizer(_DQQuantizer):
    """Per-tensor activation quantizer: unsigned after ReLU-like producers, signed otherwise.

    >>> q = DQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=8)
    >>> round(q.bits().item(), 4)
    8.0
    """

    per_channel = False

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int = 8, bit_range: BitRange = BitRange()
    ) -> None:
        super().__init__(signed=signed, dynamic_range=max(dynamic_range, 1e-4), init_bits=init_bits, bit_range=bit_range)

    def forward(self, x: Tensor) -> Tensor:
        return self._quantize(x)

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        return FixedQuantizer(bits, signed=self.signed, scale=self._fixed_step(bits).reshape(1))
