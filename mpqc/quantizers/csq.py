"""CSQ: bit-level continuous sparsification, on the bit values and on the bit selection (bi-level).

Xiao et al., "CSQ: Growing Mixed-Precision Quantization Scheme with Bi-level Continuous Sparsification", 2022
(public code: github lawsonX/CSQ).

**Weights** are held by the quantizer as ``N = b_max - 1`` magnitude bit-planes, each with a positive and a
negative bit (so a weight can change sign continuously), and one selection gate per plane::

    w_c = s_c * sum_i  g_i * (sigmoid(T p_i) - sigmoid(T n_i)) * 2**i          i = 0 (LSB) .. N-1 (MSB)

``sigmoid(T .)`` is the continuous sparsification of a bit (value level) and ``g_i = sigmoid(T m_i)`` that of a
plane's selection (selection level); ``s_c`` is a learned per-output-channel scale. The temperature ``T``
is annealed exponentially over the search, ``T = T_0 (T_1 / T_0) ** progress`` (the paper's schedule rises to
200), through :meth:`~mpqc.quantizers.base.Quantizer.set_progress`; at ``progress == 1.0`` (the search's last
step) every bit and gate is the hard ``x > 0`` (straight-through), so the model the search ends with is exactly
binary: its weights are integers times ``s_c`` and ``bits()`` is an integer.

``bits()`` = 1 (sign) + the number of selected planes, soft during the search (``b_min + sum of the optional
gates``): the budget penalty reads it, which is how the budget-aware regularisation of the paper acts here (the
paper's signed L1 term on the gates, whose sign follows the gap to the target, is replaced by the shared
squared-ReLU budget penalty: it prunes precision while over budget and leaves growth to the task loss).

Two choices keep the result inside mpqc's integer contract (a uniform symmetric grid per layer), documented
because they differ from the paper:

* the top ``b_min - 1`` planes are always selected and the gates of the others are *ordered*: a plane's gate
  logit is (in value; straight-through in gradient) the running minimum of the logits from the most significant
  optional plane down, so a less significant plane is never more selected than a more significant one.
  Selected planes are then always the top ones, and ``k`` selected planes are exactly a signed ``(k + 1)``-bit
  grid with step ``s_c 2**(N-k)`` (``to_fixed``). The paper's gates are independent, which can select
  non-contiguous planes.
* the layer's own float weight is not used during the search; when freezing, the hard bit-planes are written
  into it (``encoded_weight``), and ``to_fixed`` returns the fixed quantizer that represents them exactly.

**Activations** (the paper quantizes them at a fixed precision) get the same ordered, annealed selection gates
over the bit-widths of their range: with ``e_j`` the gate of the ``j``-th bit above ``b_min``,
``Q(x) = Q_{b_min}(x) + sum_j e_j (Q_{b_min+j+1}(x) - Q_{b_min+j}(x))`` (each selected bit adds its refinement),
computed as the mixture ``sum_k pi_k Q_k(x)`` with ``pi_k = e_{k-1} - e_k``, which at binary gates is exactly
``Q_b``, the integer quantizer freezing produces; ``Q_k`` is the learned-range quantizer of
:mod:`mpqc.quantizers.uniform`. During the search the mixture of all bit-widths is one autograd node
(:func:`mpqc.quantizers.mixture.bit_mixture`: the same values and gradients at a fraction of the time and memory);
at binary gates only the selected term is computed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mpqc.quantizers.base import BitRange, FixedQuantizer, ScheduledQuantizer, channel_max
from mpqc.quantizers.mixture import bit_mixture
from mpqc.quantizers.uniform import LearnedRangeQuantizer

#: Temperature at the start and at the end of the search: a factor 200 as in the paper (its 1 -> 200), in logit
#: units three times smaller, so that Adam at the quantizer learning rate moves a gate across its threshold about
#: as fast as it moves FracBits' bit-width by one bit.
START_TEMPERATURE, FINAL_TEMPERATURE = 3.0, 600.0
#: Initial logit magnitudes: bit values start crisp (sigmoid(9): the pretrained weight at b_max bits), selection
#: gates soft enough to move early in the search (sigmoid(3) = 0.95).
VALUE_LOGIT, GATE_LOGIT = 3.0, 1.0


def _binary(logits: Tensor, temperature: float, hard: bool) -> Tensor:
    """``sigmoid(T * logits)``, or at the end of the search the hard ``logits > 0`` (straight-through)."""
    soft = torch.sigmoid(temperature * logits)
    if not hard:
        return soft
    return (logits > 0).to(soft.dtype) + (soft - soft.detach())


def _ordered(gate_logits: Tensor) -> Tensor:
    """Running minimum from the first (most significant) gate down, so gates never increase along the planes;
    straight-through, so each gate keeps its own gradient (a gate held down by a more significant one is not
    dragged down with it, and is on again as soon as that one is)."""
    if not gate_logits.numel():
        return gate_logits
    return gate_logits + (torch.cummin(gate_logits.detach(), dim=0).values - gate_logits.detach())


class _Annealed(ScheduledQuantizer):
    """The temperature schedule, ``T_0 (T_1 / T_0) ** progress``, and the gates it anneals."""

    def _init_schedule(self, start: float, final: float) -> None:
        self.start_temperature, self.final_temperature = float(start), float(final)
        self._init_progress()

    def temperature(self) -> float:
        return self.start_temperature * (self.final_temperature / self.start_temperature) ** self._fraction

    def gates(self) -> Tensor:
        """The (ordered) selection gates of the optional bits, most significant first."""
        return _binary(_ordered(self.gate_logits), self.temperature(), self.hard)

    def bits(self) -> Tensor:
        return self.bit_range.min_bits + self.gates().sum()


def _gate_logits(init_bits: int, bit_range: BitRange, magnitude: float) -> Tensor:
    on = min(max(int(init_bits), bit_range.min_bits), bit_range.max_bits) - bit_range.min_bits
    optional = bit_range.max_bits - bit_range.min_bits
    return torch.tensor([magnitude if j < on else -magnitude for j in range(optional)])


class CSQWeightQuantizer(_Annealed):
    """Bit-plane weights with bi-level continuous sparsification; signed, per-output-channel scales.

    >>> w = torch.randn(4, 3, 3, 3)
    >>> q = CSQWeightQuantizer(w, init_bits=4)
    >>> q.set_progress(1.0)                      # the end of the search: every gate is 0 or 1
    >>> q.bits().item(), sorted(set(q.gates().tolist()))
    (4.0, [0.0, 1.0])
    >>> torch.allclose(q(w), q.to_fixed(4, w)(q.encoded_weight(w)))
    True
    """

    signed = True
    per_channel = True

    def __init__(
        self, weight: Tensor, init_bits: int = 8, bit_range: BitRange = BitRange(),
        start_temperature: float = START_TEMPERATURE, final_temperature: float = FINAL_TEMPERATURE,
        value_logit: float = VALUE_LOGIT, gate_logit: float = GATE_LOGIT,
    ) -> None:
        super().__init__()
        self.bit_range = bit_range
        self._init_schedule(start_temperature, final_temperature)
        planes = bit_range.max_bits - 1
        self.value_logit = float(value_logit)
        self.pos_logits = nn.Parameter(torch.empty((planes, *weight.shape)))
        self.neg_logits = nn.Parameter(torch.empty((planes, *weight.shape)))
        self.log_scale = nn.Parameter(torch.empty(weight.shape[0]))
        self.init_weight_clip_(weight, channel_max(weight))
        self.gate_logits = nn.Parameter(_gate_logits(init_bits, bit_range, gate_logit))
        self.register_buffer("powers", 2.0 ** torch.arange(planes, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def init_weight_clip_(self, weight: Tensor, clip: Tensor) -> None:
        """Encode ``weight`` clipped per channel at ``clip`` in sign-magnitude binary at the largest precision
        (the paper's ini2bit, with the clipping level instead of the largest magnitude)."""
        planes, value_logit = self.planes, self.value_logit
        gamma = clip.reshape(-1).float().clamp_min(1e-8)
        shape = [-1] + [1] * (weight.dim() - 1)
        top = 2**planes - 1
        codes = torch.clamp(torch.round(weight.detach().abs() / gamma.reshape(shape) * top), 0, top).long()
        bit_values = torch.stack([(codes >> i) & 1 for i in range(planes)]).bool()  # [planes, *weight.shape]
        positive = (weight.detach() > 0).unsqueeze(0)
        self.pos_logits.copy_(torch.where(bit_values & positive, value_logit, -value_logit))
        self.neg_logits.copy_(torch.where(bit_values & ~positive, value_logit, -value_logit))
        # A set bit starts at sigmoid(T0 a) - sigmoid(-T0 a) < 1: the scale makes up for it.
        set_bit = math.tanh(self.start_temperature * value_logit / 2)
        self.log_scale.copy_(torch.log(gamma / (top * set_bit)))

    @property
    def planes(self) -> int:
        return self.bit_range.max_bits - 1

    def selection(self) -> Tensor:
        """Per-plane selection ``[planes]`` (LSB first): 1 for the always-selected top planes, else the gates."""
        fixed_on = self.bit_range.min_bits - 1
        gates = self.gates()
        ones = torch.ones(fixed_on, dtype=gates.dtype, device=gates.device)
        return torch.cat([gates.flip(0), ones])

    def _plane_sum(self) -> Tensor:
        """``sum_i g_i (bit+_i - bit-_i) 2**i``: integers once the gates are binary."""
        temperature, hard = self.temperature(), self.hard
        values = _binary(self.pos_logits, temperature, hard) - _binary(self.neg_logits, temperature, hard)
        return torch.tensordot(self.selection() * self.powers, values, dims=1)

    def _scale(self, ndim: int) -> Tensor:
        return self.log_scale.exp().reshape([-1] + [1] * (ndim - 1))

    def forward(self, w: Tensor) -> Tensor:
        """The weight the bit-planes encode (the layer's float weight ``w`` is not read during the search)."""
        return self._scale(w.dim()) * self._plane_sum()

    @torch.no_grad()
    def encoded_weight(self, weight: Tensor) -> Tensor:
        """The hard-gated weight: every bit and gate at ``logit > 0``."""
        values = (self.pos_logits > 0).float() - (self.neg_logits > 0).float()
        selection = torch.cat([(_ordered(self.gate_logits) > 0).float().flip(0),
                               self.gate_logits.new_ones(self.bit_range.min_bits - 1)])
        return self._scale(weight.dim()) * torch.tensordot(selection * self.powers, values, dims=1)

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        """``bits``-bit fixed quantizer on the top planes: step ``s_c 2**(N - bits + 1)``, the same range; exact on
        the hard-gated weight when ``bits`` is its number of selected planes + 1."""
        scale = self.log_scale.detach().exp() * 2.0 ** (self.planes - (int(bits) - 1))
        return FixedQuantizer(int(bits), True, scale, per_channel=True)

    def extra_repr(self) -> str:
        return (f"planes={self.planes}, bits={self.bits().item():.2f}, T={self.temperature():.3g}, "
                f"range={self.bit_range}")


class CSQActivationQuantizer(_Annealed, LearnedRangeQuantizer):
    """Per-tensor activation quantizer whose bits above ``b_min`` are selected by ordered, annealed gates.

    >>> q = CSQActivationQuantizer(signed=False, dynamic_range=6.0, init_bits=5)
    >>> q.set_progress(1.0)
    >>> q.bits().item()
    5.0
    """

    def __init__(
        self, signed: bool, dynamic_range: float, init_bits: int = 8, bit_range: BitRange = BitRange(),
        start_temperature: float = START_TEMPERATURE, final_temperature: float = FINAL_TEMPERATURE,
        gate_logit: float = GATE_LOGIT,
    ) -> None:
        LearnedRangeQuantizer.__init__(self, signed, dynamic_range, bit_range, per_channel=False)
        self._init_schedule(start_temperature, final_temperature)
        self.gate_logits = nn.Parameter(_gate_logits(init_bits, bit_range, gate_logit))

    def bit_probabilities(self) -> Tensor:
        """``pi_k`` for ``k = b_min .. b_max``: the probability that exactly ``k`` bits are selected."""
        gates = self.gates()
        above = torch.cat([gates.new_ones(1), gates])   # P(bits >= b_min + j), j = 0 .. G
        below = torch.cat([gates, gates.new_zeros(1)])  # P(bits >= b_min + j + 1)
        return above - below

    def forward(self, x: Tensor) -> Tensor:
        bit_widths = range(self.bit_range.min_bits, self.bit_range.max_bits + 1)
        if not self.hard:  # every term, in one autograd node (mpqc.quantizers.mixture)
            return bit_mixture(x, self.log_range.exp(), self.bit_probabilities(), bit_widths, self.signed)
        out = None
        for k, pi in zip(bit_widths, self.bit_probabilities()):
            if pi.detach().item() == 0.0:
                continue  # binary gates: only the selected bit-width's term, so the output is exactly Q_b
            term = pi * self.quantize_at(x, k)
            out = term if out is None else out + term
        return out

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> FixedQuantizer:
        return self.fixed(bits)

    def extra_repr(self) -> str:
        return (f"signed={self.signed}, bits={self.bits().item():.2f}, T={self.temperature():.3g}, "
                f"range={self.bit_range}")
