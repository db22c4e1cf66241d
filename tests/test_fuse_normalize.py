"""passes/fuse_normalize.py: the forms of an L2 normalization fx and torch.export trace to become one
``l2_normalize`` call computing the same values; other norms and divisions are left alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from mpqc.ops.norm import l2_normalize
from mpqc.passes.capture import capture
from mpqc.passes.fuse_normalize import fuse_normalize

FORMS = {
    "F.normalize": lambda x: F.normalize(x, dim=-1),
    "F.normalize(dim=1, eps)": lambda x: F.normalize(x, p=2.0, dim=1, eps=1e-6),
    "x / x.norm": lambda x: x / x.norm(dim=-1, keepdim=True),
    "linalg.vector_norm.clamp": lambda x: x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-8),
}
LEFT = {
    "p=1": lambda x: x / x.norm(p=1, dim=-1, keepdim=True),
    "another tensor's norm": lambda x: x / (x + 1).norm(dim=-1, keepdim=True),
    "two dims": lambda x: x / x.norm(dim=(1, 2), keepdim=True),
    "clamp max": lambda x: x / x.norm(dim=-1, keepdim=True).clamp(max=3.0),
}


class Wrap(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) * 2


def _calls(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


@pytest.mark.parametrize("tracer", ["fx", "export"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_normalize_forms_become_one_l2_normalize(form, tracer):
    x = torch.randn(2, 3, 5)
    x[0, 1] = 0  # an all-zero row: 0 with a clamp (and 0 from l2_normalize without one)
    model = Wrap(FORMS[form])
    gm = fx.symbolic_trace(model) if tracer == "fx" else torch.export.export(model, (x,)).module()
    gm = fuse_normalize(gm)
    gm.graph.eliminate_dead_code()
    assert _calls(gm).count(l2_normalize) == 1
    assert not any(str(t).endswith(("norm", "vector_norm.default", "div.Tensor")) for t in _calls(gm)), _calls(gm)
    expected = torch.nan_to_num(model(x), nan=0.0)
    torch.testing.assert_close(gm(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form", sorted(LEFT))
def test_other_divisions_by_a_norm_are_left_alone(form):
    gm = fuse_normalize(fx.symbolic_trace(Wrap(LEFT[form])))
    assert l2_normalize not in _calls(gm)


@pytest.mark.slow  # ~14 s of torch.export; the tiny Swin V2 of tests/test_ops_vit.py is the fast case
def test_capture_and_canonicalize_fuse_swin_v2_cosine_attention():
    from torchvision.models.swin_transformer import ShiftedWindowAttentionV2

    from mpqc.passes.canonicalize import canonicalize

    torch.manual_seed(0)
    attention = ShiftedWindowAttentionV2(16, [4, 4], [2, 2], num_heads=2).eval()
    x = torch.randn(1, 8, 8, 16)
    gm = canonicalize(capture(attention, (x,)))
    assert _calls(gm).count(l2_normalize) == 2  # q and k
    with torch.no_grad():
        torch.testing.assert_close(gm(x), attention(x), atol=1e-6, rtol=1e-5)
