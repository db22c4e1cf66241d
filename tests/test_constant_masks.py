"""``passes/constant_masks.py``: a constant additive mask in front of a softmax (Swin's shifted-window mask, 0 and
-100) becomes a keep mask, so the softmax input quantizer sees only the scores (issue 15). The tiny Swin's program
through every backend with the rewritten mask: tests/test_ops_vit.py (``_every_stage``)."""
from __future__ import annotations

import torch
from torch import nn

from mpqc import pipeline
from mpqc.ops.softmax import masked_softmax
from mpqc.passes.constant_masks import GAP, mask_keep
from test_ops_vit import tiny_swin

NEG_INF = float("-inf")


class MaskedScores(nn.Module):
    """Scores ``[B, 2, 3, 4]`` viewed ``[2B, 3, 4]`` + a constant ``[3, 4]`` mask, viewed back to ``[B, 2, 3, 4]``,
    then ``Tensor.softmax`` over the last dim (Swin's view-add-view-softmax chain)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, x):
        b = x.shape[0]
        return (x.view(b * 2, 3, 4) + self.mask).view(b, 2, 3, 4).softmax(dim=-1)  # (Tensor.softmax)


def _masked_softmaxes(gm) -> int:
    return sum(node.target is masked_softmax for node in gm.graph.nodes)


def test_mask_keep_keeps_each_rows_maximum_and_refuses_biases():
    mask = torch.tensor([[0.0, -100.0, -1e9, NEG_INF],       # Swin's value, HF's, -inf: masked
                         [-100.0, -100.0, -100.0, -100.0],   # fully masked: torch's softmax(x - 100) = softmax(x)
                         [-100.0, -200.0, -100.0, -200.0]])  # the row's maximum is kept
    assert torch.equal(mask_keep(mask, 3), torch.tensor([[[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]]).bool())
    assert mask_keep(torch.tensor([[0.0, -GAP + 1]]), 2) is None            # within GAP of the maximum: a bias
    assert mask_keep(torch.tensor([[0.0, -GAP]]), 2) is not None
    assert mask_keep(torch.tensor([[NEG_INF, NEG_INF], [0.0, -100.0]]), 2) is None  # torch gives NaN: left alone
    assert mask_keep(torch.zeros(3, 4), 2) is None                          # nothing masked
    assert mask_keep(torch.tensor([[0, -100]]), 2) is None                  # not floating
    assert mask_keep(torch.zeros(1, 1, 4), 2) is None                       # more dims than the scores


def test_constant_mask_through_views_becomes_a_keep_mask_with_torchs_numerics():
    mask = torch.tensor([[0.0, -100.0, -1e9, NEG_INF], [-100.0] * 4, [-100.0, -200.0, -100.0, -200.0]])
    model, x = MaskedScores(mask).eval(), 3 * torch.randn(2, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    gm, _ = pipeline.trace(model, (x,))
    assert _masked_softmaxes(gm) == 1
    assert not any("softmax" in str(n.target) and n.target is not masked_softmax for n in gm.graph.nodes)
    with torch.no_grad():
        expected, got = model(x), gm(x)
        # rows whose maximum is 0 (Swin's): kept entries equal, masked ones 0 where torch has <= exp(|x| - 100)
        torch.testing.assert_close(got[..., 0, :], expected[..., 0, :], atol=1e-30, rtol=1e-6)
        # rows whose maximum is -100: torch rounds x - 100 in fp32 (half an ulp of 100: 4e-6), the rewrite does not
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[..., 0, 1:], torch.zeros_like(got[..., 0, 1:]))
        torch.testing.assert_close(got[..., 1, :], torch.softmax(x[..., 1, :], -1), atol=0, rtol=1e-6)  # fully
        # masked row: all kept, softmax(x), as torch's softmax(x - 100) in exact arithmetic


def test_a_graded_bias_is_left_as_an_add():
    model, x = MaskedScores(-torch.arange(12.0).view(3, 4) * 10).eval(), torch.randn(2, 2, 3, 4)
    gm, _ = pipeline.trace(model, (x,))
    assert _masked_softmaxes(gm) == 0
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_tiny_swin_shifted_window_mask_becomes_a_keep_mask():
    """One shifted block in the tiny Swin (the second stage's window covers its whole map: no shift): one masked
    softmax, the same fp32 outputs, and its input quantizer's range set by the scores, not by the -100 mask."""
    model, x = tiny_swin(), torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    gm, _ = pipeline.trace(model, (x,))
    assert _masked_softmaxes(gm) == 1
    assert sum("softmax" in str(n.target) for n in gm.graph.nodes) == 3
    assert [n.name for n in gm.graph.nodes if n.target is masked_softmax] == ["softmax_1"]  # the second block's,
    # named as captured: its quantizers keep their names
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-5)
    from mpqc.config import QuantizerConfig
    from mpqc.quantizers import get_method

    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (x,))
    masked = next(n for n in gm.graph.nodes if n.target is masked_softmax)
    quantizer = gm.get_submodule(masked.args[0].target)
    assert float(quantizer.log_range.detach().exp()) < 1.0  # was >= 100 (the mask's -100 in range)
