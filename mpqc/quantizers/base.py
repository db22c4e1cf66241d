"""The quantizer interface every method implements, and the fixed-bit quantizer they all freeze into.

Number format (the integer contract, see ``mpqc/reference.py``): symmetric, zero point 0.

* signed b-bit:   integers in ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (the symmetric range, as DQ uses);
* unsigned b-bit: integers in ``[0, 2**b - 1]``.

A value ``x`` quantizes to ``clamp(round_half_even(x / scale), qmin, qmax)`` and dequantizes to ``q * scale``.
Weights use one scale per output channel, activations one scale per tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mpqc.errors import ConfigError


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The closed integer range of a symmetric signed or unsigned ``bits``-bit number."""
    if signed:
        if bits < 2:
            raise ConfigError(f"signed quantization needs at least 2 bits (got {bits})")
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    if bits < 1:
        raise ConfigError(f"unsigned quantization needs at least 1 bit (got {bits})")
    return 0, 2**bits - 1


def row_ranges(row_bits: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """:func:`integer_range` of each row's bit-width: ``(qmin, qmax)`` as float tensors."""
    high = 2.0 ** (row_bits.float() - (1 if signed else 0)) - 1
    return (-high if signed else torch.zeros_like(high)), high


def positive_levels(bits: Tensor | float, signed: bool) -> Tensor | float:
    """Largest integer magnitude representable with (possibly fractional) ``bits``: the 'q_max / d' of DQ."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def channel_max(w: Tensor) -> Tensor:
    """Per-output-channel largest magnitude of ``w``, flat ``[C]`` and detached (never below 1e-8)."""
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-8)


@dataclass(frozen=True)
class BitRange:
    """Inclusive range of bit-widths a learnable quantizer may take."""

    min_bits: int = 2
    max_bits: int = 8

    def __post_init__(self) -> None:
        if not (1 <= self.min_bits <= self.max_bits <= 16):
            raise ConfigError(
                f"bit range must satisfy 1 <= min_bits <= max_bits <= 16, got min_bits={self.min_bits}, "
                f"max_bits={self.max_bits}"
            )


@dataclass(frozen=True)
class FrozenQuant:
    """Integer description of a quantizer after freezing: integer bits, scale(s), sign.

    ``scale`` has shape ``[C]`` (per output channel, weights) or ``[1]`` (per tensor, activations). ``row_bits``
    (embedding tables only, :mod:`mpqc.quantizers.table_rows`): one bit-width per row, ``bits`` their largest
    (the storage); each row's codes are clamped to its own range.
    """

    bits: int
    signed: bool
    scale: Tensor
    row_bits: Tensor | None = None

    @property
    def qmin(self) -> int:
        return integer_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return integer_range(self.bits, self.signed)[1]

    def quantize(self, x: Tensor, channel_dim: int = 0) -> Tensor:
        """Integer values (int32) of ``x``; per-channel scales broadcast along ``channel_dim``."""
        scale = _broadcast_channels(self.scale.to(x.dtype), x.dim(), channel_dim)
        if self.row_bits is None:
            return torch.clamp(torch.round(x / scale), self.qmin, self.qmax).to(torch.int32)
        low, high = (_broadcast_channels(bound.to(x.dtype), x.dim(), channel_dim)
                     for bound in row_ranges(self.row_bits, self.signed))
        return torch.clamp(torch.round(x / scale), low, high).to(torch.int32)


def _broadcast_channels(scale: Tensor, ndim: int, channel_dim: int) -> Tensor:
    if scale.numel() == 1:
        return scale.reshape([1] * ndim)
    shape = [1] * ndim
    shape[channel_dim] = scale.numel()
    return scale.reshape(shape)


class Quantizer(nn.Module):
    """Base class of every mpqc quantizer (weights or activations).

    Subclasses define ``forward(x)`` (fake quantization, differentiable), ``bits()`` (current bit-width as a
    differentiable scalar tensor: expected, fractional or inferred, as the method defines it) and
    ``to_fixed(bits, weight)`` (the equivalent :class:`FixedQuantizer` at an integer bit-width).
    ``learnable_bits`` says whether the search may change this quantizer's bit-width.
    """

    signed: bool
    per_channel: bool
    learnable_bits: bool = True

    def bits(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> "FixedQuantizer":  # pragma: no cover
        """The equivalent fixed-bit quantizer; weight quantizers need the layer's current ``weight``."""
        raise NotImplementedError

    def set_progress(self, fraction: float) -> None:
        """Where training stands, from 0.0 (first step) to 1.0 (last): for schedules such as annealed
        temperatures. The training loop calls it before every step."""

    def project_(self) -> None:
        """Move parameters back into their valid range; the training loop calls it after every optimizer step."""

    def extra_loss(self) -> Tensor | None:
        """A method-specific regulariser added to the training loss (None where the method has none)."""
        return None

    def enable_pruning(self) -> bool:
        """Let this weight quantizer take whole output channels down to 0 bits (a pruned channel); returns
        whether the method supports it. Called by ``mark_prunable`` only for layers whose output channels can
        be dropped from the graph exactly. No method but FracBits kernel-wise supports it."""
        return False

    def channel_gate(self) -> Tensor | None:
        """Per-output-channel factor in [0, 1] that scales the layer's bias along with its quantized weight
        (0 = pruned channel, whose whole output is then 0), or None where the quantizer prunes nothing."""
        return None

    def keep_channels_(self, keep: Tensor) -> None:
        """Drop the output channels not in ``keep`` (indices) from this quantizer's per-channel state and open the
        kept ones' gates to 1 (the ``prune_channels`` pass folds each kept channel's gate into the layer's weight
        and bias first); called on the quantizers for which ``enable_pruning`` returned True."""
        raise NotImplementedError(f"{type(self).__name__} does not prune channels")

    def init_weight_clip_(self, weight: Tensor, clip: Tensor) -> None:
        """Start this weight quantizer's per-output-channel range at ``clip`` ``[C]`` (largest representable
        magnitude per channel, e.g. from :func:`mpqc.quantizers.calibration.mse_channel_clip`) on the layer's
        ``weight``; the range is learned from there."""
        raise NotImplementedError(f"{type(self).__name__} has no per-channel weight range to initialise")

    def encoded_weight(self, weight: Tensor) -> Tensor:
        """The float weight the layer keeps when this (weight) quantizer is frozen: ``weight`` itself, unless the
        method represents the weight its own way during the search (CSQ's bit-planes), then the weight that
        representation encodes. ``freeze`` writes it into the layer before calling ``to_fixed``."""
        return weight


class ScheduledQuantizer(Quantizer):
    """A quantizer with a schedule over the phase (CSQ's annealed temperature, FracBits' channel decisions): where
    training stands is a buffer, ``progress``, so a checkpoint (a resumed run, or a pass that runs after the search
    from a saved model) carries it."""

    def _init_progress(self) -> None:
        self.register_buffer("progress", torch.tensor(0.0))
        self._fraction = 0.0  # the buffer's value as a float, so no forward pass reads a device tensor

    def set_progress(self, fraction: float) -> None:
        self._fraction = min(max(float(fraction), 0.0), 1.0)
        self.progress.fill_(self._fraction)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fraction = self.progress.item()

    @property
    def hard(self) -> bool:
        """Whether the schedule has ended: at the search's last step (progress 1.0)."""
        return self._fraction >= 1.0


def channels_to_keep(gate: Tensor) -> Tensor:
    """Which output channels a layer with channel gates ``gate`` (``b / min_bits`` clipped to 1) keeps: those at
    gate 1, and of the others the ``round(sum of their gates)`` with the largest gates (the first of equal ones),
    so that the kept channels at ``min_bits`` cost what the others cost in the search; at least one channel.

    >>> channels_to_keep(torch.tensor([1.0, 0.3, 0.3, 0.3, 0.3, 0.0, 0.45])).tolist()
    [True, True, False, False, False, False, True]
    """
    keep = gate >= 1
    below = torch.nonzero(~keep).flatten()
    count = math.floor(float(gate[below].sum()) + 0.5)
    keep[below[torch.argsort(gate[below], descending=True, stable=True)[:count]]] = True
    if not keep.any():  # never remove a whole layer: keep its strongest channel
        keep[gate.argmax()] = True
    return keep


class FixedQuantizer(Quantizer):
    """Fixed integer bit-width, learnable scale (LSQ-style gradients through the straight-through round).

    The scale is stored as its logarithm (``log_scale``) so that Adam's steps are relative: a raw 2-bit weight
    scale of ~0.02 would be pushed negative by a step of 0.01.

    Used for layers whose precision policy is fixed (e.g. first/last layer at 8 bits) and, after
    :func:`mpqc.passes.freeze.freeze`, for every quantizer during fine-tuning.

    >>> q = FixedQuantizer(bits=4, signed=True, scale=torch.tensor([0.5]))
    >>> q(torch.tensor([0.2, 0.3, 10.0, -10.0]))
    tensor([ 0.0000,  0.5000,  3.5000, -3.5000], grad_fn=<MulBackward0>)
    """

    learnable_bits = False

    def __init__(self, bits: int, signed: bool, scale: Tensor, per_channel: bool = False) -> None:
        super().__init__()
        self.qmin, self.qmax = integer_range(bits, signed)
        self.fixed_bits = int(bits)
        self.signed = signed
        self.per_channel = per_channel
        self.log_scale = nn.Parameter(scale.detach().clone().float().reshape(-1).abs().clamp_min(1e-12).log())

    @property
    def scale(self) -> Tensor:
        """The (positive) scale: one per output channel, or one per tensor."""
        return self.log_scale.exp()

    def _scale(self, x: Tensor) -> Tensor:
        scale = self.scale
        return _broadcast_channels(scale, x.dim(), 0) if self.per_channel else scale.reshape([1] * x.dim())

    def forward(self, x: Tensor) -> Tensor:
        scale = self._scale(x)
        return round_ste(torch.clamp(x / scale, self.qmin, self.qmax)) * scale

    def bits(self) -> Tensor:
        return torch.tensor(float(self.fixed_bits), device=self.log_scale.device)

    def to_fixed(self, bits: int, weight: Tensor | None = None) -> "FixedQuantizer":
        if bits == self.fixed_bits:
            return self
        # Same dynamic range (qmax * scale), new number of levels.
        new_levels = integer_range(bits, self.signed)[1]
        scale = self.scale.detach() * self.qmax / new_levels
        return FixedQuantizer(bits, self.signed, scale, self.per_channel)

    @torch.no_grad()
    def init_weight_clip_(self, weight: Tensor, clip: Tensor) -> None:
        if not self.per_channel or clip.numel() != self.log_scale.numel():
            raise ConfigError(f"FixedQuantizer with {self.log_scale.numel()} scale(s) cannot take {clip.numel()} "
                              "per-channel clipping levels")
        self.log_scale.copy_((clip.reshape(-1).float() / self.qmax).clamp_min(1e-12).log())

    def frozen(self) -> FrozenQuant:
        return FrozenQuant(self.fixed_bits, self.signed, self.scale.detach().clone())

    def extra_repr(self) -> str:
        return f"bits={self.fixed_bits}, signed={self.signed}, per_channel={self.per_channel}"
