"""analyze_layers / layer_nodes: hand-computed LayerInfo, FlopCounterMode cross-checks, per-sample properties."""
from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from mpqc.errors import ExampleInputError, MpqcError
from mpqc.layers import LAYER_META, LayerInfo
from mpqc.passes.analyze_layers import analyze_layers, layer_nodes
from mpqc.passes.capture import capture
from mpqc.passes.fold_batchnorm import fold_batchnorm
from conftest import TORCHVISION_ZOO as ZOO



class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 3x16x16 -> 8x8x8
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8, bias=False)  # -> 8x6x6
        self.conv1d = nn.Conv1d(8, 4, 5)  # 8x36 -> 4x32
        self.fc = nn.Linear(32, 10)  # 4x32 -> 4x10: a linear on a sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.conv1d(y.flatten(2)))


EXPECTED_TINY = [
    LayerInfo("conv", "conv2d", (8, 3, 3, 3), 216, 8, 8, 8 * 8 * 8 * 27, (3, 16, 16), (8, 8, 8), 768, 512),
    LayerInfo("depthwise", "conv2d", (8, 1, 3, 3), 72, 0, 8, 8 * 6 * 6 * 9, (8, 8, 8), (8, 6, 6), 512, 288),
    LayerInfo("conv1d", "conv1d", (4, 8, 5), 160, 4, 4, 4 * 32 * 40, (8, 36), (4, 32), 288, 128),
    LayerInfo("fc", "linear", (10, 32), 320, 10, 10, 4 * 10 * 32, (4, 32), (4, 10), 128, 40),
]


def module_flops(gm: fx.GraphModule, inputs: tuple) -> dict[str, int]:
    """FlopCounterMode's flops per module qualified name, for one run of ``gm``."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gm(*inputs)
    prefix = type(gm).__name__ + "."
    return {
        name.removeprefix(prefix): sum(counts.values())
        for name, counts in counter.get_flop_counts().items()
        if name.startswith(prefix)
    }


@pytest.mark.parametrize("batch", [1, 4])
def test_tiny_model_layer_infos_per_sample(batch: int) -> None:
    gm = capture(Tiny(), (torch.randn(batch, 3, 16, 16),))

    layers = analyze_layers(gm, (torch.randn(batch, 3, 16, 16),))

    assert layers == EXPECTED_TINY
    assert [n.meta[LAYER_META] for n in layer_nodes(gm)] == EXPECTED_TINY
    assert layers[1].params_per_channel == 9


def test_layer_nodes_are_the_conv_and_linear_calls_in_graph_order() -> None:
    gm = capture(Tiny(), (torch.randn(1, 3, 16, 16),))

    assert [n.target for n in layer_nodes(gm)] == ["conv", "depthwise", "conv1d", "fc"]


class QuantizedLikeConv(nn.Conv2d):
    """Stands in for a later pass's quantized module: a subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight.round(), self.bias)


def test_layer_nodes_and_analysis_find_subclasses() -> None:
    gm = capture(Tiny(), (torch.randn(1, 3, 16, 16),))
    replacement = QuantizedLikeConv(8, 8, 3, groups=8, bias=False)
    gm.set_submodule("depthwise", replacement)
    gm.recompile()

    assert [n.target for n in layer_nodes(gm)] == ["conv", "depthwise", "conv1d", "fc"]
    assert analyze_layers(gm, (torch.randn(2, 3, 16, 16),)) == EXPECTED_TINY


def test_analysis_is_the_same_after_batchnorm_folding() -> None:
    x = torch.randn(2, 3, 16, 16)
    gm = fold_batchnorm(capture(Tiny(), (x,)))

    assert analyze_layers(gm, (x,)) == EXPECTED_TINY


@pytest.mark.parametrize("name", ZOO)
def test_zoo_macs_match_flop_counter_per_layer(name: str) -> None:
    torch.manual_seed(0)
    batch = 2
    x = torch.randn(batch, 3, 64, 64)
    gm = capture(getattr(tvm, name)(weights=None), (x,))

    layers = analyze_layers(gm, (x,))

    flops = module_flops(gm, (x,))
    assert len(layers) == len(layer_nodes(gm)) > 0
    assert [2 * batch * layer.macs for layer in layers] == [flops[layer.name] for layer in layers]
    for layer, node in zip(layers, layer_nodes(gm)):
        assert node.meta[LAYER_META] is layer
        assert layer.input_elements * batch == node.args[0].meta["tensor_meta"].shape.numel()
        assert layer.output_shape == tuple(node.meta["tensor_meta"].shape)[1:]


@settings(max_examples=30, deadline=None)
@given(
    groups=st.integers(1, 3),
    in_per_group=st.integers(1, 3),
    out_per_group=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    size=st.tuples(st.integers(3, 9), st.integers(3, 9)),
    batch=st.integers(1, 3),
)
def test_conv2d_macs_match_flop_counter_and_do_not_depend_on_batch(
    groups: int,
    in_per_group: int,
    out_per_group: int,
    kernel: tuple[int, int],
    stride: int,
    padding: int,
    size: tuple[int, int],
    batch: int,
) -> None:
    conv = nn.Conv2d(groups * in_per_group, groups * out_per_group, kernel, stride, padding, groups=groups)
    gm = capture(nn.Sequential(conv), (torch.randn(1, conv.in_channels, *size),))
    x = torch.randn(batch, conv.in_channels, *size)

    [layer] = analyze_layers(gm, (x,))

    assert 2 * batch * layer.macs == module_flops(gm, (x,))["0"]
    assert (layer.out_channels, *layer.output_shape[1:]) == tuple(conv(x).shape[1:])
    assert analyze_layers(gm, (x[:1],)) == [layer]


@settings(max_examples=20, deadline=None)
@given(
    in_features=st.integers(1, 16),
    out_features=st.integers(1, 16),
    leading=st.lists(st.integers(1, 4), max_size=2),
    batch=st.integers(1, 3),
)
def test_linear_macs_match_flop_counter(in_features: int, out_features: int, leading: list[int], batch: int) -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(in_features, out_features)))
    x = torch.randn(batch, *leading, in_features)

    [layer] = analyze_layers(gm, (x,))

    assert 2 * batch * layer.macs == module_flops(gm, (x,))["0"]
    assert layer.input_shape == (*leading, in_features) and layer.output_shape == (*leading, out_features)


class BatchFolding(nn.Module):
    """Folds a time dimension into the batch: the linear sees (B*T, F)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, x.shape[-1]))


def test_layer_with_batch_folded_into_dim0_counts_per_sample() -> None:
    gm = fx.symbolic_trace(BatchFolding())

    [layer] = analyze_layers(gm, (torch.randn(2, 3, 5),))

    assert (layer.input_shape, layer.output_shape, layer.macs) == ((3, 5), (3, 2), 30)


class Truncating(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, 5)[:3])


def test_layer_whose_dim0_is_not_per_batch_raises_naming_the_node() -> None:
    gm = fx.symbolic_trace(Truncating())
    [node] = layer_nodes(gm)

    with pytest.raises(MpqcError, match="not a multiple of the batch size 4") as failure:
        analyze_layers(gm, (torch.randn(4, 5),))  # the linear sees 3 rows
    assert node.format_node() in str(failure.value)


class TupleLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:  # type: ignore[override]
        return (super().forward(x),)


def test_layer_without_a_tensor_shape_raises_naming_the_node() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    gm.set_submodule("0", TupleLinear(4, 4))
    [node] = layer_nodes(gm)

    with pytest.raises(MpqcError, match="no tensor shape for its output") as failure:
        analyze_layers(gm, (torch.randn(2, 4),))
    assert node.format_node() in str(failure.value)


def test_inputs_that_do_not_run_raise_example_input_error() -> None:
    gm = capture(Tiny(), (torch.randn(1, 3, 16, 16),))

    with pytest.raises(ExampleInputError, match="conv"):
        analyze_layers(gm, (torch.randn(1, 5, 16, 16),))
