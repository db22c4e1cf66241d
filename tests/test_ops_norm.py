"""RMSNorm and GroupNorm as the integer norm kernel (``mpqc/ops/norm.py``): through every stage and backend at
random mixed bits (the reference within 1 LSB of fake-quant stepwise, TVM bit-exact, onnxruntime within the
contract), their frozen kernels' parameters, and a group too large for the int64 kernel refused before training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mpqc import pipeline
from mpqc.config import QuantizerConfig
from mpqc.errors import MpqcError
from mpqc.quantizers import get_method
from test_ops_transformer import (_assert_onnxruntime_agrees, _assert_reference_matches_fake_quant,
                                  _assert_tvm_bit_exact, _program)


class RMSBlock(nn.Module):
    """A pre-norm MLP block with RMSNorm (LLaMA's shape, in miniature), an outlier channel in its input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.norm, self.head = nn.Linear(8, 16), nn.RMSNorm(16, eps=1e-6), nn.Linear(16, 4)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.proj.weight[5] *= 20

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.norm(h) + h)


class GroupNormNet(nn.Module):
    """Conv -> GroupNorm (4 groups of 2 channels) -> ReLU -> conv -> GroupNorm (1 group: LayerNorm over C, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.conv2, self.norm2 = nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.GroupNorm(1, 4)
        self.head = nn.Linear(4, 5)
        with torch.no_grad():
            for norm in (self.norm1, self.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        return self.head(self.norm2(self.conv2(x)).mean((2, 3)))


def _ops(program, op):
    return [node for node in program.nodes if node.op == op]


def _rms_program():
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    return _program(RMSBlock(), (x,), seed=2)


def _group_norm_program():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return _program(GroupNormNet(), (x,), seed=3)


def test_rms_norm_agrees_with_fake_quant_and_onnxruntime(tmp_path):
    gm, program, inputs, _ = _rms_program()
    (norm,) = _ops(program, "rms_norm")
    assert norm.attrs["size"] == 16 and norm.attrs["eps"] == 1e-6
    assert torch.equal(norm.tensors["weight"].float(), gm.get_submodule("norm").weight.detach())
    _assert_reference_matches_fake_quant(gm, program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)


def test_group_norm_agrees_with_fake_quant_and_onnxruntime(tmp_path):
    gm, program, inputs, _ = _group_norm_program()
    norms = _ops(program, "group_norm")
    assert [(n.attrs["groups"], n.attrs["channels"], n.attrs["spatial"]) for n in norms] == [(4, 8, 64), (1, 4, 16)]
    assert all(n.attrs["in_bits"] <= 8 for n in norms)
    _assert_reference_matches_fake_quant(gm, program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_rms_program, _group_norm_program], ids=["rms_norm", "group_norm"])
def test_norms_are_bit_exact_on_tvm(build):
    """(GroupNorm's input reaches TVM in a packed NHWC layout after a conv: read back in NCHW for the groups.)"""
    _, program, inputs, _ = build()
    _assert_tvm_bit_exact(program, inputs)


def test_group_norm_too_large_for_the_int64_kernel_is_refused_before_training():
    """One group over 64 channels x 128 x 128 positions: the kernel's sums could overflow int64 even at 8-bit input
    codes, so the quantized graph is refused with the layer and its sizes named, not after training."""
    model = nn.Sequential(nn.Conv2d(3, 64, 1), nn.GroupNorm(1, 64))
    x = torch.randn(1, 3, 128, 128)
    gm, _ = pipeline.trace(model, (x,))
    with pytest.raises(MpqcError, match=r"group_norm.*64 channels in 1 groups, 16384 positions.*overflow int64"):
        pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (x,))
