"""passes/round_weights.py: frozen weights fitted to their grids (MSE scales, GPTQ rounding) before fine-tuning."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import mpqc
from conftest import FAST, ROOT, freeze_at_random_bits, quantized_graph
from conftest import example_batch as _example
from mpqc.config import RoundingConfig
from mpqc.errors import ConfigError
from mpqc.passes.insert_quantizers import quantized_layers
from mpqc.passes.round_weights import gptq, round_weights
from mpqc.quantizers.calibration import mse_channel_clip


class ConvNet(nn.Module):
    """A conv, a depthwise (grouped) conv, a Conv1d over rows and a linear: every layer kind GPTQ rounds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.rows = nn.Conv1d(8, 12, 3, stride=2, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        x = torch.relu(self.rows(x.mean(dim=2)))
        return self.head(x.mean(dim=2))


def _correlated(samples: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Inputs whose columns are strongly correlated (as a layer's inputs are): a few shared factors plus noise."""
    factors = torch.randn(samples, 4, generator=generator) @ torch.randn(4, width, generator=generator)
    return factors + 0.1 * torch.randn(samples, width, generator=generator)


def _output_error(weight, rounded, hessian) -> float:
    difference = (weight - rounded).double()
    return float(torch.trace(difference @ hessian.double() @ difference.T))


def test_gptq_lands_on_the_grid_and_beats_round_to_nearest_on_correlated_inputs():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 64, generator=generator)
    x = _correlated(512, 64, generator)
    hessian = x.T @ x
    scale = (weight.abs().amax(1, keepdim=True) / 7).double()
    rounded = gptq(weight, hessian, scale, -8, 7)
    codes = rounded / scale
    assert torch.allclose(codes, codes.round(), atol=1e-9) and codes.min() >= -8 and codes.max() <= 7
    nearest = (weight / scale).round().clamp(-8, 7) * scale
    assert _output_error(weight, rounded, hessian) < 0.5 * _output_error(weight, nearest, hessian)


def test_gptq_rounds_a_column_no_input_reaches_to_nearest():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 8, generator=generator)
    x = _correlated(64, 8, generator)
    x[:, 3] = 0  # a dead input
    scale = torch.full((4, 1), 0.25, dtype=torch.float64)
    rounded = gptq(weight, x.T @ x, scale, -8, 7)
    assert torch.equal(rounded[:, 3], ((weight[:, 3:4] / scale).round().clamp(-8, 7) * scale)[:, 0])


def _frozen_convnet(seed: int = 0):
    torch.manual_seed(seed)
    model = ConvNet().eval()
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 3, 12, 12, generator=generator),) for _ in range(3)]
    gm, _ = quantized_graph(model, batches[0][0])
    gm, _ = freeze_at_random_bits(gm, seed=seed, low=3, high=5)
    return model, gm.eval(), batches


def _error_to_fp32(model, gm, batches) -> float:
    with torch.no_grad():
        return sum(float((gm(*inputs) - model(*inputs)).square().sum()) for inputs in batches)


def test_gptq_rounded_weights_are_their_own_fake_quantization_and_the_output_is_closer_to_fp32():
    model, gm, batches = _frozen_convnet()
    by_mse = round_weights(copy.deepcopy(gm), batches, "mse")
    by_gptq = round_weights(copy.deepcopy(gm), batches, "gptq")
    layers = quantized_layers(by_gptq)
    assert {type(layer.module).__name__ for layer in layers} >= {"QuantConv2d", "QuantConv1d", "QuantLinear"}
    for layer, fitted in zip(layers, quantized_layers(by_mse)):
        with torch.no_grad():
            weight = layer.module.weight
            assert torch.equal(layer.weight_quantizer(weight), weight), layer.name  # on the grid: nothing to round
            assert torch.equal(layer.weight_quantizer.scale, fitted.weight_quantizer.scale), layer.name
    assert _error_to_fp32(model, by_gptq, batches) < _error_to_fp32(model, by_mse, batches)


def test_mse_refits_each_channel_range_to_its_frozen_bits_and_nearest_changes_nothing():
    _, gm, batches = _frozen_convnet(seed=1)
    before = copy.deepcopy(gm)
    saved = before.state_dict()
    round_weights(gm, batches, "nearest")
    assert all(torch.equal(value, saved[name]) for name, value in gm.state_dict().items())
    round_weights(gm, [], "mse")
    changed = 0
    for layer, old in zip(quantized_layers(gm), quantized_layers(before)):
        quantizer = layer.weight_quantizer
        expected = mse_channel_clip(layer.module.weight, quantizer.fixed_bits) / quantizer.qmax
        assert torch.allclose(quantizer.scale, expected, rtol=1e-6), layer.name
        assert torch.equal(layer.module.weight, old.module.weight), layer.name  # the float weight is kept
        changed += not torch.allclose(quantizer.scale, old.weight_quantizer.scale)
    assert changed  # the ranges the search left are not already the MSE-best at 3-5 bits


def test_bad_rounding_requests_get_clear_errors():
    model = ConvNet().eval()
    x = torch.randn(2, 3, 12, 12)
    gm, _ = quantized_graph(model, x)
    with pytest.raises(ConfigError, match="after freeze.*'conv'|'conv'.*after freeze"):
        round_weights(gm, [(x,)], "gptq")
    _, frozen, _ = _frozen_convnet()
    with pytest.raises(ConfigError, match="weight rounding must be one of"):
        round_weights(frozen, [(x,)], "stochastic")
    with pytest.raises(ConfigError, match="needs calibration batches"):
        round_weights(frozen, [], "gptq")
    with pytest.raises(ConfigError, match="weight rounding must be one of"):
        RoundingConfig(how="up")
    with pytest.raises(ConfigError, match="batches must be >= 1"):
        RoundingConfig(batches=0)
    with pytest.raises(ConfigError, match="damping"):
        RoundingConfig(damping=0.0)


def test_compile_with_gptq_rounding_meets_its_budget_and_the_integer_model_agrees(trained_small_cnn, digits_loaders):
    config = dataclasses.replace(FAST, rounding=RoundingConfig(how="gptq", batches=2))
    result = mpqc.compile(trained_small_cnn, _example(digits_loaders), budget="avg-bits=3", data=digits_loaders,
                          config=config)
    report = result.report
    assert report["budget"]["met"] and report["totals"]["average_weight_bits"] <= 3.0
    accuracy = report["accuracy"]
    assert accuracy["quantized"] > 60, accuracy
    assert abs(accuracy["integer_reference"] - accuracy["quantized"]) < 2.0, accuracy


def cli_config(command: str, flags: list[str], monkeypatch):
    """The ``CompileConfig`` ``mpqc COMMAND`` (compile or sweep) builds for a small digits run with ``flags``;
    SystemExit where argparse refuses them."""
    from mpqc.cli import _parser
    from mpqc.cli_inputs import prepare_run

    monkeypatch.chdir(ROOT)
    args = _parser().parse_args([command, "--model", "examples/models.py:small_cnn", "--data", "digits", "--budget",
                                 "avg-bits=4", "--out", "runs/x", "--subset", "64", "--val-subset", "32", *flags])
    return prepare_run(args, "8")[-1]


@pytest.mark.parametrize("command", ["compile", "sweep"])
def test_the_cli_passes_the_rounding_into_the_config(command, monkeypatch):
    for flag, expected in (([], "mse"), (["--weight-rounding", "gptq"], "gptq")):
        assert cli_config(command, flag, monkeypatch).rounding.how == expected
    with pytest.raises(SystemExit):
        cli_config(command, ["--weight-rounding", "up"], monkeypatch)


def test_gptq_leaves_a_conv_it_cannot_unfold_at_mse_rounding_and_names_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, _ = quantized_graph(model, x)
    gm, _ = freeze_at_random_bits(gm, low=4, high=4)
    by_mse = round_weights(copy.deepcopy(gm), [], "mse")
    with pytest.warns(UserWarning, match="layer '0'.*QuantConv2d padded \\(1, 1\\) \\(reflect\\)"):
        round_weights(gm, [(x,)], "gptq")
    (padded, plain), (padded_mse, plain_mse) = quantized_layers(gm), quantized_layers(by_mse)
    assert torch.equal(padded.module.weight, padded_mse.module.weight)  # the float weight, rounded by its MSE range
    assert not torch.equal(plain.module.weight, plain_mse.module.weight)  # GPTQ-rounded
