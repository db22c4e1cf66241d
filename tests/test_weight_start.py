"""Searched weights started at the budget's uniform bits (``QuantizerConfig(weight_init_bits="budget")``,
``mpqc.search.budget_start_bits``) instead of descending from 8 to it."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import mpqc
from conftest import FAST, quantized_small_cnn
from conftest import example_batch as _example
from mpqc.budgets import BitOps, WeightMemory
from mpqc.config import QuantizerConfig
from mpqc.errors import ConfigError
from mpqc.passes.insert_quantizers import cost_items, current_bits, quantized_activations, quantized_layers
from mpqc.quantizers.base import BitRange
from mpqc.report import format_report
from mpqc.search import budget_start_bits


def _cost_with_weights_at(gm, bits: int, budget_kind=WeightMemory) -> float:
    """``budget_kind``'s cost of ``gm`` with every weight at ``bits``, the rest at their current bits."""
    at = {name: value._replace(weight=torch.tensor(float(bits))) if hasattr(value, "weight") else value
          for name, value in current_bits(quantized_layers(gm), quantized_activations(gm)).items()}
    with torch.no_grad():
        return float(budget_kind(1).cost(cost_items(gm), at))


def test_the_start_is_the_most_bits_every_searched_weight_can_have_at_once():
    gm = quantized_small_cnn()
    at_three = _cost_with_weights_at(gm, 3)
    assert budget_start_bits(gm, WeightMemory(at_three)) == 3
    assert budget_start_bits(gm, WeightMemory(at_three - 1)) == 2
    assert budget_start_bits(gm, WeightMemory(_cost_with_weights_at(gm, 8) * 2)) == 8  # the range's top
    assert budget_start_bits(gm, WeightMemory(_cost_with_weights_at(gm, 2) - 1)) is None  # not even the floor fits
    # BitOps counts the activations at their current bits (8 here): weights at 3 bits with 8-bit inputs fit
    fixed8 = quantized_small_cnn(config=QuantizerConfig(activation_bits=BitRange(8, 8)))
    assert budget_start_bits(fixed8, BitOps(_cost_with_weights_at(fixed8, 3, BitOps))) == 3
    # uniform weights (no range) leave nothing to start
    uniform = quantized_small_cnn(config=QuantizerConfig().at_floor(["weight"]))
    assert budget_start_bits(uniform, WeightMemory(1e9)) is None


@pytest.mark.parametrize("method", ["dq", "fracbits", "fracbits-kernel", "sdq", "csq"])
def test_every_method_starts_its_weights_at_weight_init_bits(method):
    gm, default = quantized_small_cnn(method, QuantizerConfig(weight_init_bits=3)), quantized_small_cnn(method)
    with torch.no_grad():
        for layer, at_init in zip(quantized_layers(gm), quantized_layers(default)):
            # CSQ's bits are soft (sigmoid gates: 3.19 at a 3-bit start), the others' exact
            assert float(layer.weight_quantizer.bits().float().mean()) == pytest.approx(3.0, abs=0.25), layer.name
            assert float(at_init.weight_quantizer.bits().float().mean()) > 7.5
            assert torch.equal(layer.input_quantizer.bits(), at_init.input_quantizer.bits())  # at init_bits still


@pytest.mark.parametrize("bad", ["auto", 0, 17, 3.5, True])
def test_weight_init_bits_refuses_what_is_not_bits_or_budget(bad):
    with pytest.raises(ConfigError, match="weight_init_bits"):
        QuantizerConfig(weight_init_bits=bad)


def test_compile_starts_at_the_budget_and_says_so(trained_small_cnn, digits_loaders):
    example = _example(digits_loaders)
    config = replace(FAST, quantizers=replace(FAST.quantizers, weight_init_bits="budget"))
    result = mpqc.compile(trained_small_cnn, example, budget="avg-bits=3", data=digits_loaders, method="dq",
                          config=config)
    budget = result.report["budget"]
    assert budget["weight_start_bits"] == 3 and budget["met"]
    assert "searched weights started at 3 bits" in format_report(result.report)
    # at the floor the weights are held there instead: nothing to start
    held = mpqc.compile(trained_small_cnn, example, budget="avg-bits=2", data=digits_loaders, method="dq",
                        config=config)
    assert held.report["budget"]["floor_only"] == ["weight"] and "weight_start_bits" not in held.report["budget"]


def test_the_cli_passes_weight_init_bits(monkeypatch):
    from test_round_weights import cli_config

    assert cli_config("compile", ["--weight-init-bits", "budget"], monkeypatch).quantizers.weight_init_bits == "budget"
    assert cli_config("sweep", ["--weight-init-bits", "4"], monkeypatch).quantizers.weight_init_bits == 4
    assert cli_config("compile", [], monkeypatch).quantizers.weight_init_bits is None
    with pytest.raises(SystemExit):
        cli_config("compile", ["--weight-init-bits", "many"], monkeypatch)
