"""A mixture of integer quantizers at several bit-widths, ``sum_k pi_k Q_k(x)``, in one autograd node.

The activation quantizers of three methods are such mixtures during the search: CSQ's (:mod:`mpqc.quantizers.csq`)
over every bit-width of its range, FracBits' (:mod:`~mpqc.quantizers.fracbits`) over a pair, ``(1 - f, f)``, and
SDQ's (:mod:`~mpqc.quantizers.sdq`) over a pair one-hot in value (the drawn bit-width) with the pair's expectation
as gradient. Written as separate ``Q_k`` (:meth:`~mpqc.quantizers.uniform.LearnedRangeQuantizer.quantize_at`)
the autograd graph holds ~8 full-size tensors per bit-width and replays ~10 elementwise kernels per bit-width
backwards: CSQ's search step cost 3.0x a fixed-8-bit QAT step, FracBits' and SDQ's 1.5x (now 1.2x, 1.1x and 0.9x,
``bench/results/search_cost.json``). Here the forward reuses one buffer and the backward needs only ``x`` and the
output, because the learned-range quantizers of one tensor share their clipping range: with ``s_k = alpha / L_k``
(``L_k = q_max`` at ``k`` bits) every ``Q_k`` clips ``x`` at the same ``[lo, alpha]`` (``lo = -alpha`` signed,
``0`` unsigned). The straight-through gradients (as
autograd takes them through ``round_ste(clamp(x / s_k)) * s_k``) are then, with ``S = sum_k pi_k``::

    d out / d x      = S                                    inside (lo, alpha), else 0
    d out / d alpha  = (out - S x) / alpha                  inside (LSQ: sum_k pi_k (round(u_k) - u_k) / L_k)
                       S  from alpha up,  -S from -alpha down (signed),  0 from 0 down (unsigned)
    d out / d pi_k   = Q_k(x)                               recomputed in the backward, one buffer

The codes are those of ``Q_k`` exactly (clipping ``x`` before dividing gives the same rounded codes), so the output
equals the separate-terms mixture up to float association (``tests/test_methods.py`` compares values and
gradients). The one difference: autograd's clamp passes the gradient where ``q_min < x / s_k < q_max`` (not at its
bounds), this where ``lo < x < alpha``; the two differ only for an ``x`` within a rounding error of ``alpha``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mpqc.quantizers.base import positive_levels


class _BitMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, pi: Tensor, bits: tuple[int, ...], signed: bool) -> Tensor:
        scales = _scales(alpha, bits, signed)
        low = -alpha if signed else torch.zeros_like(alpha)
        clipped = torch.clamp(x, low, alpha)
        out, codes = torch.zeros_like(x), torch.empty_like(x)
        for k, (scale, weight) in enumerate(zip(scales.tolist(), pi.tolist())):
            if weight == 0.0:
                continue  # (SDQ's drawn bit-width, FracBits at an integer: the other term only has a gradient)
            torch.div(clipped, scales[k], out=codes).round_()
            out.add_(codes, alpha=weight * scale)
        ctx.save_for_backward(x, alpha, pi, out)
        ctx.bits, ctx.signed = bits, signed
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, alpha, pi, out = ctx.saved_tensors
        signed = ctx.signed
        total = pi.sum()
        low = -alpha if signed else torch.zeros_like(alpha)
        inside = (x > low) & (x < alpha)  # autograd's clamp passes no gradient at its bounds
        grad_inside = torch.where(inside, grad, 0.0)
        grad_x = grad_inside * total if ctx.needs_input_grad[0] else None

        grad_alpha = None
        if ctx.needs_input_grad[1]:
            # (out - S x) elementwise first: the rounding errors are small, their sum must not be a difference of
            # two large sums (sums are torch.sum's, as autograd's through the terms are).
            residual = torch.add(out, x, alpha=-float(total)).mul_(grad_inside)
            grad_alpha = residual.sum() / alpha + total * torch.where(x >= alpha, grad, 0.0).sum()
            if signed:
                grad_alpha = grad_alpha - total * torch.where(x <= low, grad, 0.0).sum()

        grad_pi = None
        if ctx.needs_input_grad[2]:
            scales = _scales(alpha, ctx.bits, signed)
            clipped = torch.clamp(x, low, alpha)
            codes = torch.empty_like(x)
            grad_pi = torch.stack([torch.div(clipped, scales[k], out=codes).round_().mul_(grad).sum() * scales[k]
                                   for k in range(len(ctx.bits))])
        return grad_x, grad_alpha, grad_pi, None, None


def _scales(alpha: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """``s_k = alpha / L_k`` per bit-width, as :meth:`LearnedRangeQuantizer.scale_at` computes each."""
    return torch.stack([(alpha / positive_levels(k, signed)).abs().clamp_min(1e-12) for k in bits])


def bit_mixture(x: Tensor, alpha: Tensor, pi: Tensor, bits: Sequence[int], signed: bool) -> Tensor:
    """``sum_k pi[k] Q_{bits[k]}(x)``: per-tensor learned-range quantizers with the clipping level ``alpha`` (a
    0-d tensor), differentiable in ``x``, ``alpha`` and ``pi`` with the straight-through gradients of the terms."""
    if pi.shape != (len(bits),):
        raise ValueError(f"bit_mixture: {len(bits)} bit-widths but pi has shape {tuple(pi.shape)}")
    return _BitMixture.apply(x, alpha.reshape(()), pi, tuple(int(k) for k in bits), bool(signed))
