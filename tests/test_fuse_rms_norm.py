"""``passes/fuse_rms_norm.py``: an RMSNorm written out by hand (LLaMA's, T5's, as a division) becomes one
``F.rms_norm`` call through torch.fx and torch.export, with the same values; near-misses are left alone; a LLaMA
block with its own RMSNorm goes through the reference and onnxruntime like ``nn.RMSNorm`` (issue 15)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpqc import pipeline


class LlamaRMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm.forward``, verbatim."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class T5LayerNorm(LlamaRMSNorm):
    """transformers' ``T5LayerNorm.forward`` (fp32 branch): the square of a cast, the weight on the left."""

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states


class DivisionRMSNorm(LlamaRMSNorm):
    """``x / sqrt(mean(x * x) + eps)``, no weight."""

    def forward(self, x):
        return x / torch.sqrt(1e-5 + torch.mean(x * x, dim=-1, keepdim=True))


class OtherDimNorm(LlamaRMSNorm):
    """A mean over dim 1, not the last: not an RMSNorm over features, left alone."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)


class OtherTensorNorm(LlamaRMSNorm):
    """The square of another tensor: left alone."""

    def forward(self, x):
        y = x + 1
        return x * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    """linear -> norm -> linear, the norm's input with an outlier channel; ``branch`` forces torch.export (fx
    cannot trace a condition on a shape)."""

    def __init__(self, norm: nn.Module, branch: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.norm, self.head = nn.Linear(8, 16), norm, nn.Linear(16, 4)
        self.branch = branch
        with torch.no_grad():
            self.proj.weight[5] *= 20

    def forward(self, x):
        h = self.proj(x)
        if self.branch and h.shape[-1] > 4:
            h = h + 0
        return self.head(self.norm(h) + h)


def _rms_norms(gm) -> list:
    return [node for node in gm.graph.nodes if node.target in (F.rms_norm, torch.rms_norm)]


def _traced(norm: nn.Module, branch: bool = False):
    model = Block(norm, branch).eval()
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    gm, _ = pipeline.trace(model, (x,))
    return model, gm, x


@pytest.mark.parametrize("branch", [False, True], ids=["fx", "export"])
@pytest.mark.parametrize("norm, weighted", [(LlamaRMSNorm, True), (T5LayerNorm, True), (DivisionRMSNorm, False)],
                         ids=["llama", "t5", "division"])
def test_hand_written_rms_norm_becomes_one_call_with_the_same_values(norm, weighted, branch):
    model, gm, x = _traced(norm(16), branch)
    (fused,) = _rms_norms(gm)
    _, shape, weight, eps = fused.args
    assert shape == [16] and eps == pytest.approx(1e-5 if norm is DivisionRMSNorm else 1e-6)
    assert (weight is not None) == weighted
    assert not any("rsqrt" in str(n.target) or "sqrt" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [OtherDimNorm, OtherTensorNorm])
def test_near_misses_are_left_alone(norm):
    model, gm, x = _traced(norm(16))
    assert not _rms_norms(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


def test_a_llama_block_goes_through_the_reference_and_onnxruntime_like_nn_rms_norm(tmp_path):
    from test_ops_transformer import _assert_onnxruntime_agrees, _assert_reference_matches_fake_quant, _program

    model = Block(LlamaRMSNorm(16))
    x = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    gm, program, inputs, _ = _program(model, (x,), seed=2)
    (norm,) = [node for node in program.nodes if node.op == "rms_norm"]
    assert norm.attrs["size"] == 16 and norm.attrs["eps"] == 1e-6
    assert torch.equal(norm.tensors["weight"].float(), torch.linspace(0.5, 1.5, 16))
    _assert_reference_matches_fake_quant(gm, program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)
