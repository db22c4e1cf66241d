"""fold_batchnorm: structure before/after, numerics on hand-made graphs and the model zoo, folding math properties."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from mpqc.passes.capture import capture
from mpqc.passes.fold_batchnorm import fold_batchnorm
from conftest import TORCHVISION_ZOO, randomize_batchnorm

ZOO = [name for name in TORCHVISION_ZOO if name != "squeezenet1_0"]  # squeezenet has no BatchNorm


def batchnorm_nodes(gm: fx.GraphModule) -> list[str]:
    return [
        n.target
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
    ]


def conv2d_nodes(gm: fx.GraphModule) -> list[str]:
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    return [n.target for n in calls if isinstance(gm.get_submodule(n.target), nn.Conv2d)]


def has_submodule(gm: fx.GraphModule, name: str) -> bool:
    return name in dict(gm.named_modules())


def run(module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(*inputs)


def assert_same_outputs(after: torch.Tensor, before: torch.Tensor) -> None:
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5 * before.abs().max().item())


class Tiny(nn.Module):
    """conv2d -> bn2d, conv1d -> bn1d, linear -> bn1d, and a bias-free conv: all foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv_nobias = nn.Conv2d(6, 6, 3, groups=3, bias=False)
        self.bn_nobias = nn.BatchNorm2d(6)
        self.conv1d = nn.Conv1d(6, 4, 3)
        self.bn1d = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 5)
        self.bn_fc = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        y = self.bn_nobias(self.conv_nobias(y))
        y = self.bn1d(self.conv1d(y.flatten(2)))
        return self.bn_fc(self.fc(y.mean(-1)))


def tiny_graph(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    return capture(randomize_batchnorm(model), (x,))


def test_folds_every_batchnorm_of_a_tiny_model() -> None:
    model, x = Tiny(), torch.randn(2, 3, 8, 8)
    gm = tiny_graph(model, x)
    assert batchnorm_nodes(gm) == ["bn", "bn_nobias", "bn1d", "bn_fc"]
    expected = run(model, x)

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == []
    assert not any(has_submodule(gm, name) for name in ("bn", "bn_nobias", "bn1d", "bn_fc"))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "conv_nobias", "conv1d", "fc"]
    assert gm.get_submodule("conv_nobias").bias is not None
    assert_same_outputs(run(gm, x), expected)


def test_does_not_change_the_captured_model() -> None:
    model, x = Tiny(), torch.randn(2, 3, 8, 8)
    gm = tiny_graph(model, x)
    weight = model.conv.weight.clone()

    fold_batchnorm(gm)

    assert torch.equal(model.conv.weight, weight)
    assert isinstance(model.bn, nn.BatchNorm2d)


class ProducerWithOtherUser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)
        self.bn2 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.bn(y) + y  # the conv's unnormalised output is used again
        return self.bn2(self.conv2(z))


def test_leaves_batchnorm_whose_producer_has_other_users() -> None:
    model, x = ProducerWithOtherUser(), torch.randn(2, 3, 8, 8)
    gm = tiny_graph(model, x)
    expected = run(model, x)

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == ["bn"]
    assert has_submodule(gm, "bn") and not has_submodule(gm, "bn2")
    assert isinstance(gm.get_submodule("conv"), nn.Conv2d) and torch.equal(gm.conv.weight, model.conv.weight)
    assert_same_outputs(run(gm, x), expected)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class SharedBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 3, 1)
        self.conv_b = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x)) + self.bn(self.conv_b(x))


def test_leaves_batchnorm_after_a_module_that_is_called_twice() -> None:
    model, x = SharedConv(), torch.randn(2, 3, 8, 8)
    gm = tiny_graph(model, x)
    expected = run(model, x)

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == ["bn"]
    assert_same_outputs(run(gm, x), expected)


def test_folds_a_shared_batchnorm_into_each_producer_and_then_deletes_it() -> None:
    model, x = SharedBatchNorm(), torch.randn(2, 3, 8, 8)
    gm = tiny_graph(model, x)
    expected = run(model, x)

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == []
    assert not has_submodule(gm, "bn")
    assert_same_outputs(run(gm, x), expected)


class LinearOnSequence(nn.Module):
    """BatchNorm1d on a 3-d linear output normalises dim 1 (the sequence), not the linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_leaves_batchnorm_that_does_not_normalise_the_producer_channels() -> None:
    model, x = LinearOnSequence(), torch.randn(2, 6, 6)
    gm = tiny_graph(model, x)
    expected = run(model, x)

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == ["bn"]
    assert_same_outputs(run(gm, x), expected)


def test_leaves_linear_batchnorm_when_the_rank_is_unknown() -> None:
    model = randomize_batchnorm(LinearOnSequence())
    gm = fx.symbolic_trace(model)  # no shape metadata

    assert batchnorm_nodes(fold_batchnorm(gm)) == ["bn"]


def test_leaves_batchnorm_in_training_mode() -> None:
    model, x = Tiny(), torch.randn(2, 3, 8, 8)
    gm = tiny_graph(model, x).train()

    assert batchnorm_nodes(fold_batchnorm(gm)) == ["bn", "bn_nobias", "bn1d", "bn_fc"]


class FunctionalBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("mean", torch.randn(3))
        self.register_buffer("var", torch.rand(3) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var)


def test_leaves_functional_batch_norm() -> None:
    model, x = FunctionalBatchNorm(), torch.randn(2, 3, 8, 8)
    gm = tiny_graph(model, x)
    code = gm.code

    gm = fold_batchnorm(gm)

    assert gm.code == code
    assert_same_outputs(run(gm, x), run(model, x))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_has_no_batchnorm_left_and_same_outputs(name: str) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(getattr(tvm, name)(weights=None))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    gm = capture(model, (x,))
    layers = conv2d_nodes(gm)
    assert batchnorm_nodes(gm)

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == []
    assert conv2d_nodes(gm) == layers
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    assert_same_outputs(run(gm, x), run(model, x))


def test_export_captured_graph_folds_too() -> None:
    class ShapeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Tiny()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) if x.shape[-1] > 4 else self.inner(-x)

    model, x = ShapeBranch(), torch.randn(1, 3, 8, 8)
    gm = tiny_graph(model, x)
    assert batchnorm_nodes(gm) == ["inner.bn", "inner.bn_nobias", "inner.bn1d", "inner.bn_fc"]

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == []
    x = torch.randn(4, 3, 8, 8)
    assert_same_outputs(run(gm, x), run(model, x))


@settings(max_examples=25, deadline=None)
@given(
    in_groups=st.integers(1, 3),
    group_width=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    bias=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_folded_conv_equals_conv_then_batchnorm(
    in_groups: int, group_width: int, out_per_group: int, kernel: int, bias: bool, affine: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    groups = in_groups
    model = nn.Sequential(
        nn.Conv2d(groups * group_width, groups * out_per_group, kernel, groups=groups, bias=bias),
        nn.BatchNorm2d(groups * out_per_group, affine=affine),
    )
    x = torch.randn(2, groups * group_width, 6, 6)
    gm = tiny_graph(model, x)

    gm = fold_batchnorm(gm)

    assert batchnorm_nodes(gm) == []
    assert_same_outputs(run(gm, x), run(model, x))
