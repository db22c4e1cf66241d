"""A budget that leaves a kind of quantizer no room above its minimum bits: found before the search
(``mpqc.search.floor_only_kinds``) and trained at that floor, as uniform QAT (``compile``)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import mpqc
from conftest import FAST, quantized_small_cnn
from conftest import example_batch as _example
from mpqc.budgets import ActivationMemory, AverageBits, BitOps, WeightMemory
from mpqc.config import QuantizerConfig
from mpqc.errors import ConfigError
from mpqc.passes.insert_quantizers import cost_items, quantized_activations, quantized_layers, smallest_bits
from mpqc.quantizers.base import BitRange
from mpqc.report import format_report
from mpqc.search import floor_only_kinds


def _floor_cost(gm, budget_kind, **options):
    floor = smallest_bits(quantized_layers(gm), quantized_activations(gm))
    return float(budget_kind(1, **options).cost(cost_items(gm), floor))


def test_weight_memory_at_the_floor_holds_the_weights_only():
    gm = quantized_small_cnn()
    floor = _floor_cost(gm, WeightMemory)
    assert floor_only_kinds(gm, WeightMemory(floor)) == {"weight"}
    smallest_layer = min(layer.info.params for layer in quantized_layers(gm))
    # room for the smallest layer one bit up: the search has a choice again
    assert floor_only_kinds(gm, WeightMemory(floor + smallest_layer / 8)) == set()
    assert floor_only_kinds(gm, WeightMemory(floor + smallest_layer / 8 - 1)) == {"weight"}


def test_bitops_at_the_floor_holds_both_kinds_and_activation_memory_the_activations():
    gm = quantized_small_cnn()
    assert floor_only_kinds(gm, BitOps(_floor_cost(gm, BitOps))) == {"weight", "activation"}
    activations_at_floor = _floor_cost(gm, ActivationMemory, mode="sum")
    assert floor_only_kinds(gm, ActivationMemory(activations_at_floor, mode="sum")) == {"activation"}
    assert floor_only_kinds(gm, AverageBits(2.0)) == {"weight"}


def test_fixed_ranges_and_pruning_leave_nothing_to_hold():
    fixed_activations = QuantizerConfig(activation_bits=BitRange(8, 8))
    gm = quantized_small_cnn(config=fixed_activations)
    assert floor_only_kinds(gm, BitOps(_floor_cost(gm, BitOps))) == {"weight"}  # activations have no range
    uniform = quantized_small_cnn(config=fixed_activations.at_floor(["weight"]))
    assert floor_only_kinds(uniform, WeightMemory(_floor_cost(uniform, WeightMemory))) == set()
    prunable = quantized_small_cnn("fracbits-kernel")  # a pruned channel frees budget for another's bits
    assert floor_only_kinds(prunable, WeightMemory(_floor_cost(prunable, WeightMemory))) == set()


def test_at_floor_shrinks_the_named_ranges_and_refuses_other_names():
    config = QuantizerConfig(weight_bits=BitRange(3, 8), activation_bits=BitRange(4, 8))
    assert config.at_floor(["weight"]).weight_bits == BitRange(3, 3)
    assert config.at_floor(["weight"]).activation_bits == BitRange(4, 8)
    assert config.at_floor(["activation"]).activation_bits == BitRange(4, 4)
    with pytest.raises(ConfigError, match="'weight' or 'activation'"):
        config.at_floor(["bias"])


def test_a_budget_at_the_floor_trains_exactly_what_uniform_qat_does(trained_small_cnn, digits_loaders):
    """At 2 bits per weight with a 2-bit floor the search has one answer: compile trains it from the first step,
    the same run as uniform W2 QAT (weights at BitRange(2, 2)), not a descent from 8 bits frozen onto it."""
    example = _example(digits_loaders)
    searched = mpqc.compile(trained_small_cnn, example, budget="avg-bits=2", data=digits_loaders, method="dq",
                            config=FAST)
    uniform_config = replace(FAST, quantizers=FAST.quantizers.at_floor(["weight"]))
    uniform = mpqc.compile(trained_small_cnn, example, budget="avg-bits=2", data=digits_loaders, method="dq",
                           config=uniform_config)
    report = searched.report
    assert report["budget"]["floor_only"] == ["weight"] and report["budget"]["met"]
    assert "floor_only" not in uniform.report["budget"]  # its weights have no range: nothing was held
    assert all(layer["weight_bits_search"] == 2.0 for layer in report["layers"])
    assert report["layers"] == uniform.report["layers"]
    assert torch.equal(searched(example), uniform(example))
    assert "weights held at their minimum bits" in format_report(report)
