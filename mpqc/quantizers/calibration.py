"""Where quantizer ranges start: per-output-channel weight clipping by an MSE search, activation ranges from a
high percentile of calibration data. Every method's quantizers start from these and then learn their scales.

* :func:`mse_channel_clip`: for each output channel, the clipping level ``r * max|w_c|`` (``r`` on a grid of
  :data:`CLIP_RATIOS`) whose signed symmetric ``bits``-bit quantization has the smallest squared error;
  at 8 bits it stays close to the largest magnitude, at 2 bits it clips the tails (a grid of 3 levels set by the
  largest weight leaves most weights at 0).
* :func:`percentile_range`: the ``percentile`` of ``|x|`` (signed) or of ``x`` (unsigned), so that a few outliers
  in the calibration batch do not stretch an activation's grid.

>>> w = torch.tensor([[1.0, 0.3, -0.3, 0.3, -0.3, 0.3, -0.3, 0.3, -0.3]])
>>> float(mse_channel_clip(w, 2)) < 1.0  # 2 bits: the outlier 1.0 is clipped
True
>>> float(mse_channel_clip(w, 8))  # 8 bits: the full range
1.0
"""
from __future__ import annotations

import torch
from torch import Tensor

from mpqc.errors import ConfigError
from mpqc.quantizers.base import channel_max, positive_levels

#: Clipping ratios (of each channel's largest magnitude) the MSE search tries: 0.01, 0.02, ..., 1.00.
CLIP_RATIOS = tuple(round(0.01 * i, 2) for i in range(1, 101))
#: How weight ranges start: ``"mse"`` (per-channel MSE search) or ``"max"`` (each channel's largest magnitude).
WEIGHT_INITS = ("mse", "max")


#: Elements of the weight the MSE search holds in one working buffer: whole channels at a time, about 1 MiB of
#: float32, so the 100 passes over a chunk stay in cache (RegNetY-128GF's 637 M weights: 2.5 min, was over 30).
MSE_CHUNK_ELEMENTS = 1 << 18


@torch.no_grad()
def mse_channel_clip(weight: Tensor, bits: int, ratios: tuple[float, ...] = CLIP_RATIOS) -> Tensor:
    """Per-output-channel clipping level ``[C]`` minimising the squared error of signed symmetric ``bits``-bit
    quantization (round half to even, ``qmax = 2**(bits-1) - 1`` steps per side) of ``weight`` [C, ...].

    Channels are searched a chunk at a time in one reused buffer; each channel's error is summed over the whole
    channel as before, so the result does not depend on the chunking."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    top = channel_max(w)
    best = top.clone()
    rows = max(1, MSE_CHUNK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        stop = start + rows
        best[start:stop] = _mse_clip_rows(w[start:stop], top[start:stop], bits, ratios)
    return best


def _mse_clip_rows(w: Tensor, top: Tensor, bits: int, ratios: tuple[float, ...]) -> Tensor:
    """:func:`mse_channel_clip` of the rows ``w`` [R, K] whose largest magnitudes are ``top`` [R]."""
    levels = positive_levels(int(bits), True)
    best_error = torch.full_like(top, float("inf"))
    best = top.clone()
    buffer = torch.empty_like(w)
    for ratio in ratios:
        clip = top * ratio
        scale = (clip / levels).unsqueeze(1)
        torch.div(w, scale, out=buffer)
        error = buffer.round_().clamp_(-levels, levels).mul_(scale).sub_(w).square_().sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, clip, best)
    return best


def weight_clip(weight: Tensor, bits: int, how: str = "mse") -> Tensor:
    """The per-output-channel clipping level ``[C]`` a weight quantizer starting at ``bits`` gets: ``how`` is
    ``"mse"`` (:func:`mse_channel_clip`) or ``"max"`` (the largest magnitude)."""
    if how == "mse":
        return mse_channel_clip(weight, bits)
    if how == "max":
        return channel_max(weight)
    raise ConfigError(f"weight init must be one of {WEIGHT_INITS}, got {how!r}")


@torch.no_grad()
def percentile_range(x: Tensor, percentile: float, signed: bool) -> float:
    """The ``percentile`` (in (0, 100]) of ``|x|`` where ``signed``, else of ``max(x, 0)``: an activation range
    that ignores the rarest ``100 - percentile`` % of values (100: the largest magnitude)."""
    if not 0 < percentile <= 100:
        raise ConfigError(f"activation percentile must be in (0, 100], got {percentile}")
    values = (x.detach().abs() if signed else x.detach().clamp_min(0)).reshape(-1).float()
    if values.numel() == 0:
        return 0.0
    k = max(1, min(values.numel(), int(torch.tensor(percentile / 100 * values.numel()).ceil())))
    return float(values.kthvalue(k).values)
