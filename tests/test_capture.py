"""capture: both tracing paths keep conv/linear/batchnorm as call_module nodes and reproduce the eager model."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from mpqc.errors import CaptureError, ExampleInputError
from mpqc.passes.capture import KEPT_MODULES, capture
from conftest import TORCHVISION_ZOO as ZOO

#: The torch.export path is slower; a representative subset runs on it.
EXPORT_ZOO = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "squeezenet1_0"]
_ATEN_LAYER_OPS = ("aten.conv", "aten.linear", "aten.batch_norm")


def zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(tvm, name)(weights=None)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.normal_(module.running_mean, std=0.1)
    return model.eval()


def image(batch: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def eager(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def kept_module_names(model: nn.Module, prefix: str = "") -> set[str]:
    return {prefix + name for name, module in model.named_modules() if isinstance(module, KEPT_MODULES)}


def called_module_names(gm: fx.GraphModule) -> set[str]:
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    return {n.target for n in calls if isinstance(gm.get_submodule(n.target), KEPT_MODULES)}


def aten_layer_calls(gm: fx.GraphModule) -> list[str]:
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return [target for target in calls if target.startswith(_ATEN_LAYER_OPS)]


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 16:
            return self.inner(x)
        return -self.inner(x)


class DataBranch(nn.Module):
    """Python control flow on tensor values: neither tracer can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)).view(x.shape[0], -1))


# --- torch.fx path ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_zoo_captures_with_layers_as_modules(name: str) -> None:
    model = zoo_model(name)
    gm = capture(model, (image(2),))

    assert isinstance(gm, fx.GraphModule)
    assert called_module_names(gm) == kept_module_names(model)
    assert aten_layer_calls(gm) == []
    x = image(3, seed=2)
    torch.testing.assert_close(eager(gm, x), eager(model, x))


def test_graph_owns_copies_of_the_parameters() -> None:
    model = SmallNet().eval()
    gm = capture(model, (torch.randn(2, 3, 8, 8),))

    with torch.no_grad():
        gm.get_submodule("conv").weight.zero_()
    assert model.conv.weight.abs().sum() > 0
    assert gm.get_submodule("conv") is not model.conv


def test_puts_the_model_in_eval_mode() -> None:
    model = SmallNet().train()
    gm = capture(model, (torch.randn(2, 3, 8, 8),))

    assert not model.training
    assert not gm.training
    assert not gm.get_submodule("bn").training


def test_every_tensor_node_has_tensor_meta() -> None:
    gm = capture(SmallNet(), (torch.randn(2, 3, 8, 8),))

    tensor_nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_module") or n.target is F.relu]
    assert [n.name for n in tensor_nodes if "tensor_meta" not in n.meta] == []
    assert len(tensor_nodes) == 5
    assert tuple(next(n for n in gm.graph.nodes if n.target == "conv").meta["tensor_meta"].shape) == (2, 8, 8, 8)


class PlainConvSubclass(nn.Conv2d):
    """Keeps nn.Conv2d.forward: captured as a leaf module although it is defined outside torch.nn."""


class OverridingConvSubclass(nn.Conv2d):
    """Overrides forward: traced through, as keeping it would hide what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class Subclasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.plain = PlainConvSubclass(3, 4, 1)
        self.overriding = OverridingConvSubclass(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.overriding(self.plain(x))


@pytest.mark.parametrize("wrap", [False, True], ids=["fx", "export"])
def test_conv_subclasses_are_kept_only_with_the_plain_forward(wrap: bool) -> None:
    model = ShapeBranch(Subclasses()) if wrap else Subclasses()
    x = torch.randn(2, 3, 20, 20)
    gm = capture(model, (x,))

    prefix = "inner." if wrap else ""
    assert called_module_names(gm) == {prefix + "plain"}
    torch.testing.assert_close(eager(gm, x), eager(model, x))


# --- torch.export path ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXPORT_ZOO)
def test_shape_branch_zoo_captures_through_export_with_layers_as_modules(name: str) -> None:
    model = ShapeBranch(zoo_model(name)).eval()
    with pytest.raises(Exception):
        fx.symbolic_trace(model)
    gm = capture(model, (image(1),))

    assert called_module_names(gm) == kept_module_names(model)
    assert aten_layer_calls(gm) == []
    for batch in (1, 3):
        x = image(batch, seed=batch + 10)
        torch.testing.assert_close(eager(gm, x), eager(model, x))


def test_export_path_keeps_the_calling_convention_and_guards_other_shapes() -> None:
    model = ShapeBranch(SmallNet()).eval()
    gm = capture(model, (torch.randn(1, 3, 20, 20),))

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1
    assert isinstance(gm(torch.randn(4, 3, 20, 20)), torch.Tensor)
    with pytest.raises(Exception, match="Guard failed"):
        gm(torch.randn(4, 3, 12, 12))  # would take the other branch in eager mode


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if x.shape[-1] > 4:
            y = self.conv(y)
        return y


def test_export_path_maps_every_call_of_a_shared_module() -> None:
    model = SharedConv().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))

    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target != "_guards_fn"] == ["conv", "conv"]
    torch.testing.assert_close(eager(gm, x), eager(model, x))


class CircularPadding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return self.fc(y) if x.shape[0] > 0 else y


def test_export_path_leaves_a_conv_it_cannot_map_as_an_aten_call() -> None:
    model = CircularPadding().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))

    assert called_module_names(gm) == {"fc"}
    assert aten_layer_calls(gm) == ["aten.conv2d.default"]
    torch.testing.assert_close(eager(gm, x), eager(model, x))


@settings(max_examples=8, deadline=None)
@given(example_batch=st.integers(1, 3), batch=st.integers(1, 5), width=st.integers(17, 24))
def test_export_path_graph_is_generic_in_the_batch_dimension(example_batch: int, batch: int, width: int) -> None:
    torch.manual_seed(0)
    model = ShapeBranch(SmallNet()).eval()
    gm = capture(model, (torch.randn(example_batch, 3, 20, width),))

    x = torch.randn(batch, 3, 20, width)
    torch.testing.assert_close(eager(gm, x), eager(model, x))


# --- errors -----------------------------------------------------------------------------------------------------


def test_data_dependent_control_flow_raises_capture_error_naming_model_and_both_failures() -> None:
    with pytest.raises(CaptureError) as failure:
        capture(DataBranch(), (torch.randn(1, 3, 8, 8),))

    message = str(failure.value)
    assert "DataBranch" in message
    assert "torch.fx.symbolic_trace failed: TraceError" in message
    assert "torch.export.export(strict=False) failed:" in message
    assert message.count("if x.sum() > 0:") == 2
    assert "test_capture.py" in message


def test_a_failed_capture_prints_one_error_not_torchs_graph_dumps(capfd, caplog) -> None:
    """torch.export prints the graph it traced (and logs warnings) when it fails; mpqc keeps that off stderr, on
    the error and at INFO level of mpqc's capture logger (``mpqc -v``)."""
    with caplog.at_level(logging.INFO, logger="mpqc.passes.capture"), pytest.raises(CaptureError) as failure:
        capture(DataBranch(), (torch.randn(1, 3, 8, 8),))
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""
    assert "def forward" in failure.value.torch_log  # the graph torch.export printed, kept on the error
    assert any("def forward" in record.getMessage() for record in caplog.records)
    assert len(str(failure.value).splitlines()) == 3


def test_inputs_that_do_not_run_raise_example_input_error() -> None:
    with pytest.raises(ExampleInputError) as failure:
        capture(SmallNet(), (torch.randn(1, 4, 8, 8, dtype=torch.float64),))

    message = str(failure.value)
    assert "SmallNet" in message
    assert "shape=(1, 4, 8, 8), dtype=torch.float64" in message
    assert "RuntimeError" in message


def test_errors_point_at_the_model_source_line_even_in_an_installed_package() -> None:
    with pytest.raises(ExampleInputError, match=r"ResNet.*resnet\.py:\d+ in _forward_impl: x = self\.conv1\(x\)"):
        capture(zoo_model("resnet18"), (torch.randn(1, 1, 32, 32),))


def test_inputs_must_be_a_tuple() -> None:
    with pytest.raises(ExampleInputError, match="SmallNet.*tuple.*Tensor"):
        capture(SmallNet(), torch.randn(1, 3, 8, 8))


class _KeywordModel(nn.Module):
    """Called by keyword; ``scale`` is left at its default, ``context`` changes the graph when given."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 3)

    def forward(self, image, scale=None, context=None):
        y = torch.relu(self.conv(image))
        if context is not None:
            y = y + context
        if y.shape[-1] > 100:  # shape control flow: torch.fx fails, torch.export takes over
            y = y * 2
        return {"logits": self.fc(y.mean((2, 3)))}


@pytest.mark.parametrize("tracer", ["fx", "export"])
def test_keyword_example_inputs_become_named_graph_inputs_in_forward_order(tracer, monkeypatch):
    import mpqc.passes.capture as capture_module

    torch.manual_seed(0)
    model = _KeywordModel()
    if tracer == "fx":  # without the shape branch fx traces it; with it, export does
        monkeypatch.setattr(_KeywordModel, "forward", lambda self, image, scale=None, context=None: {
            "logits": self.fc((torch.relu(self.conv(image)) + context).mean((2, 3)))})
    example = {"context": torch.randn(2, 4, 4, 4), "image": torch.randn(2, 1, 6, 6)}
    gm = capture(model, example)
    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["image", "context"]
    assert any(n.op == "call_module" and n.target == "conv" for n in gm.graph.nodes)
    is_export = any(str(n.target).startswith("aten.") for n in gm.graph.nodes if n.op == "call_function")
    assert is_export == (tracer == "export")
    expected = model(**example)["logits"]
    torch.testing.assert_close(gm(example["image"], example["context"])["logits"], expected)
    torch.testing.assert_close(gm(**example)["logits"], expected)
    assert capture_module.keyword_order(model, example) == ["image", "context"]
    with pytest.raises(ExampleInputError, match="no input named 'mask'"):
        capture(model, {"image": example["image"], "mask": example["image"]})
    with pytest.raises(ExampleInputError, match="leave out .*'image'"):
        capture(model, {"context": example["context"]})
