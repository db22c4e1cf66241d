"""Budgets: hand-computed costs and gradients, the penalty, feasibility checks and the CLI budget syntax."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqc.budgets import (
    ActivationMemory,
    AverageBits,
    BitOps,
    LayerBits,
    WeightMemory,
    parse_budget,
)
from mpqc.errors import ConfigError, InfeasibleBudgetError
from mpqc.layers import LayerInfo

PROPS = settings(max_examples=50, deadline=None)

# Three handmade layers (per sample): a 3->16 3x3 conv on 32x32, a 16->16 3x3 conv on 32x32, a 16->10 linear.
CONV1 = LayerInfo(
    name="conv1", op="conv2d", weight_shape=(16, 3, 3, 3), params=432, bias_params=16, out_channels=16,
    macs=432 * 32 * 32, input_shape=(3, 32, 32), output_shape=(16, 32, 32), input_elements=3072,
    output_elements=16384,
)
CONV2 = LayerInfo(
    name="layer1.conv2", op="conv2d", weight_shape=(16, 16, 3, 3), params=2304, bias_params=0, out_channels=16,
    macs=2304 * 32 * 32, input_shape=(16, 32, 32), output_shape=(16, 32, 32), input_elements=16384,
    output_elements=16384,
)
FC = LayerInfo(
    name="fc", op="linear", weight_shape=(10, 16), params=160, bias_params=10, out_channels=10, macs=160,
    input_shape=(16,), output_shape=(10,), input_elements=16, output_elements=10,
)
LAYERS = [CONV1, CONV2, FC]

W_BITS = (8.0, 4.0, 2.0)
A_BITS = (8.0, 3.0, 5.0)

# Hand-computed costs for W_BITS / A_BITS:
WEIGHT_BYTES = (432 * 8 + 2304 * 4 + 160 * 2) / 8  # = 1624 B
ACT_PER_LAYER = (3072 * 8 / 8, 16384 * 3 / 8, 16 * 5 / 8)  # = 3072, 6144, 10 B
ACT_MAX = 6144.0
ACT_SUM = 9226.0
BITOPS = 442368 * 64 + 2359296 * 12 + 160 * 10  # = 56_624_704
AVG_BITS = (432 * 8 + 2304 * 4 + 160 * 2) / (432 + 2304 + 160)  # = 12992 / 2896


def _bits(w=W_BITS, a=A_BITS, requires_grad=False):
    return {
        layer.name: LayerBits(torch.tensor(wb, requires_grad=requires_grad), torch.tensor(ab, requires_grad=requires_grad))
        for layer, wb, ab in zip(LAYERS, w, a)
    }


def test_hand_values_are_what_the_comments_say():
    # guards the constants themselves against an edit slip
    assert WEIGHT_BYTES == 1624 and ACT_PER_LAYER == (3072, 6144, 10) and BITOPS == 56_624_704
    assert ACT_MAX == max(ACT_PER_LAYER) and ACT_SUM == sum(ACT_PER_LAYER)


# ---------------------------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (WeightMemory(1000), WEIGHT_BYTES),
        (ActivationMemory(1000), ACT_MAX),
        (ActivationMemory(1000, mode="sum"), ACT_SUM),
        (BitOps(1e6), BITOPS),
        (AverageBits(4.0), AVG_BITS),
    ],
    ids=["weight-memory", "activation-max", "activation-sum", "bitops", "avg-bits"],
)
def test_cost_hand_values(budget, expected):
    cost = budget.cost(LAYERS, _bits())
    assert cost.dim() == 0
    assert cost.item() == pytest.approx(expected, rel=1e-6)


def test_cost_single_layer_and_integer_tensors():
    bits = {"fc": LayerBits(torch.tensor(3), torch.tensor(7))}  # integer tensors are accepted
    assert WeightMemory(1).cost([FC], bits).item() == pytest.approx(160 * 3 / 8)
    assert ActivationMemory(1).cost([FC], bits).item() == pytest.approx(16 * 7 / 8)
    assert BitOps(1).cost([FC], bits).item() == pytest.approx(160 * 21)
    assert AverageBits(1).cost([FC], bits).item() == pytest.approx(3.0)


def test_cost_accepts_one_element_bit_tensors():
    bits = {name: LayerBits(b.weight.reshape(1), b.activation.reshape(1)) for name, b in _bits().items()}
    assert WeightMemory(1).cost(LAYERS, bits).item() == pytest.approx(WEIGHT_BYTES)


def test_cost_missing_layer_names_it():
    bits = _bits()
    del bits["layer1.conv2"]
    with pytest.raises(ConfigError, match="layer1.conv2"):
        WeightMemory(1).cost(LAYERS, bits)


def _grads(budget):
    bits = _bits(requires_grad=True)
    budget.cost(LAYERS, bits).backward()
    w = [bits[layer.name].weight.grad for layer in LAYERS]
    a = [bits[layer.name].activation.grad for layer in LAYERS]
    as_float = lambda gs: [0.0 if g is None else g.item() for g in gs]  # noqa: E731 - None: no dependence
    return as_float(w), as_float(a)


def test_weight_memory_gradient():
    w, a = _grads(WeightMemory(1))
    assert w == pytest.approx([432 / 8, 2304 / 8, 160 / 8])
    assert a == [0.0, 0.0, 0.0]


def test_activation_memory_max_gradient_goes_to_the_largest_layer_only():
    w, a = _grads(ActivationMemory(1))
    assert a == pytest.approx([0.0, 16384 / 8, 0.0])
    assert w == [0.0, 0.0, 0.0]


def test_activation_memory_sum_gradient():
    w, a = _grads(ActivationMemory(1, mode="sum"))
    assert a == pytest.approx([3072 / 8, 16384 / 8, 16 / 8])
    assert w == [0.0, 0.0, 0.0]


def test_bitops_gradient():
    w, a = _grads(BitOps(1))
    macs = [layer.macs for layer in LAYERS]
    assert w == pytest.approx([m * ab for m, ab in zip(macs, A_BITS)])  # d/dw_l = MACs_l * a_l
    assert a == pytest.approx([m * wb for m, wb in zip(macs, W_BITS)])  # d/da_l = MACs_l * w_l


def test_average_bits_gradient():
    w, a = _grads(AverageBits(1))
    assert w == pytest.approx([432 / 2896, 2304 / 2896, 160 / 2896])
    assert a == [0.0, 0.0, 0.0]


@given(
    w=st.tuples(*[st.floats(min_value=1.0, max_value=16.0)] * 3),
    a=st.tuples(*[st.floats(min_value=1.0, max_value=16.0)] * 3),
)
@PROPS
def test_costs_match_formulas_for_fractional_bits(w, a):
    bits = _bits(w, a)
    params = [layer.params for layer in LAYERS]
    elements = [layer.input_elements for layer in LAYERS]
    macs = [layer.macs for layer in LAYERS]
    assert WeightMemory(1).cost(LAYERS, bits).item() == pytest.approx(
        sum(p * b for p, b in zip(params, w)) / 8, rel=1e-5
    )
    per_layer = [e * b / 8 for e, b in zip(elements, a)]
    assert ActivationMemory(1).cost(LAYERS, bits).item() == pytest.approx(max(per_layer), rel=1e-5)
    assert ActivationMemory(1, mode="sum").cost(LAYERS, bits).item() == pytest.approx(sum(per_layer), rel=1e-5)
    assert BitOps(1).cost(LAYERS, bits).item() == pytest.approx(
        sum(m * wb * ab for m, wb, ab in zip(macs, w, a)), rel=1e-5
    )
    assert AverageBits(1).cost(LAYERS, bits).item() == pytest.approx(
        sum(p * b for p, b in zip(params, w)) / sum(params), rel=1e-5
    )


# ---------------------------------------------------------------------------------------------------------------
# Penalty, met, check_feasible
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "cost"),
    [
        (WeightMemory(1000), WEIGHT_BYTES),
        (ActivationMemory(kib=4), ACT_MAX),
        (BitOps(5e7), BITOPS),
        (AverageBits(3.0), AVG_BITS),
    ],
    ids=["weight-memory", "activation-memory", "bitops", "avg-bits"],
)
def test_penalty_above_budget_is_squared_relative_excess(budget, cost):
    assert cost > budget.limit
    bits = _bits(requires_grad=True)
    penalty = budget.penalty(LAYERS, bits)
    excess = cost / budget.limit - 1
    assert penalty.item() == pytest.approx(excess**2, rel=1e-5)
    penalty.backward()
    assert any(b.weight.grad is not None and b.weight.grad.item() > 0 for b in bits.values()) or any(
        b.activation.grad is not None and b.activation.grad.item() > 0 for b in bits.values()
    )


def test_penalty_gradient_hand_value():
    budget = WeightMemory(1000)
    bits = _bits(requires_grad=True)
    budget.penalty(LAYERS, bits).backward()
    # d/dw_l (cost/L - 1)^2 = 2 (cost/L - 1) * params_l / 8 / L
    expected = 2 * (WEIGHT_BYTES / 1000 - 1) * 2304 / 8 / 1000
    assert bits["layer1.conv2"].weight.grad.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "budget",
    [WeightMemory(WEIGHT_BYTES), WeightMemory(10_000), ActivationMemory(ACT_MAX), ActivationMemory(1e5, mode="sum"),
     BitOps(BITOPS), BitOps(1e9), AverageBits(AVG_BITS), AverageBits(8.0)],
)
def test_penalty_is_zero_inside_budget(budget):
    bits = _bits(requires_grad=True)
    penalty = budget.penalty(LAYERS, bits)
    assert penalty.item() == 0.0
    penalty.backward()
    for b in bits.values():
        assert b.weight.grad is None or b.weight.grad.item() == 0.0


def test_met_at_the_boundary():
    budget = WeightMemory(1000)
    assert budget.met(1000.0)
    assert budget.met(999.0)
    assert budget.met(1000.0 * (1 + 1e-10))  # within the relative tolerance of 1e-9
    assert not budget.met(1000.0 * (1 + 1e-8))
    assert not budget.met(1001.0)
    assert AverageBits(2.0).met(2.0) and not AverageBits(2.0).met(2.01)
    assert BitOps(1e9).met(1e9) and not BitOps(1e9).met(1.001e9)


@pytest.mark.parametrize(
    ("budget", "requested", "smallest"),
    [
        (WeightMemory(1000), "1000 B", "1.59 KiB"),  # 1624 B
        (ActivationMemory(kib=4), "4.00 KiB", "6.00 KiB"),
        (ActivationMemory(kib=8, mode="sum"), "8.00 KiB", "9.01 KiB"),  # 9226 B
        (BitOps(1e6), "1.00 M BitOPs", "56.6 M BitOPs"),
        (AverageBits(2.0), "2.000 bits", "4.486 bits"),
    ],
    ids=["weight-memory", "activation-max", "activation-sum", "bitops", "avg-bits"],
)
def test_check_feasible_refuses_with_human_units(budget, requested, smallest):
    with pytest.raises(InfeasibleBudgetError) as info:
        budget.check_feasible(LAYERS, _bits())
    message = str(info.value)
    assert requested in message
    assert smallest in message
    assert budget.kind in message


@pytest.mark.parametrize(
    ("budget", "smallest"),
    [
        (WeightMemory(WEIGHT_BYTES), WEIGHT_BYTES),  # exactly at the limit is feasible
        (WeightMemory(kib=2), WEIGHT_BYTES),
        (ActivationMemory(ACT_MAX), ACT_MAX),
        (BitOps(1e8), BITOPS),
        (AverageBits(8.0), AVG_BITS),
    ],
)
def test_check_feasible_returns_smallest_cost(budget, smallest):
    result = budget.check_feasible(LAYERS, _bits())
    assert isinstance(result, float)
    assert result == pytest.approx(smallest, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Construction and parse_budget
# ---------------------------------------------------------------------------------------------------------------


def test_weight_memory_size_arguments():
    assert WeightMemory(kib=20).limit == 20480
    assert WeightMemory(mib=1.5).limit == 1.5 * 1024**2
    assert WeightMemory(300).limit == 300
    assert WeightMemory(kib=20) == WeightMemory(20480)


@pytest.mark.parametrize(
    "kwargs", [{}, {"bytes": 10, "kib": 1}, {"kib": 1, "mib": 1}, {"bytes": 1, "kib": 1, "mib": 1}]
)
def test_weight_memory_needs_exactly_one_size(kwargs):
    with pytest.raises(ConfigError, match=f"got {len(kwargs)}"):
        WeightMemory(**kwargs)
    with pytest.raises(ConfigError):
        ActivationMemory(**kwargs)


@pytest.mark.parametrize(
    "make",
    [lambda: WeightMemory(0), lambda: WeightMemory(-5), lambda: WeightMemory(float("inf")),
     lambda: WeightMemory(float("nan")), lambda: ActivationMemory(kib=0), lambda: ActivationMemory(1, mode="mean"),
     lambda: BitOps(0), lambda: BitOps(-1.0), lambda: BitOps(float("inf")), lambda: AverageBits(0),
     lambda: AverageBits(33), lambda: AverageBits(-1)],
)
def test_invalid_limits_raise(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("weight-memory=20KiB", WeightMemory(20480)),
        ("weight-memory=20kib", WeightMemory(20480)),
        ("weight-memory=1.5MiB", WeightMemory(1.5 * 1024**2)),
        ("weight-memory=5KB", WeightMemory(5000)),
        ("weight-memory=2MB", WeightMemory(2e6)),
        ("weight-memory=1GiB", WeightMemory(1024**3)),
        ("weight-memory=300B", WeightMemory(300)),
        ("weight-memory=300", WeightMemory(300)),
        (" Weight-Memory = 20 KiB ", WeightMemory(20480)),
        ("activation-memory=8KiB", ActivationMemory(8192)),
        ("activation-memory=8KiB,sum", ActivationMemory(8192, mode="sum")),
        ("activation-memory=8KiB,max", ActivationMemory(8192)),
        ("bitops=1.2G", BitOps(1.2e9)),
        ("bitops=350M", BitOps(3.5e8)),
        ("bitops=40k", BitOps(4e4)),
        ("bitops=2T", BitOps(2e12)),
        ("bitops=1.5e9", BitOps(1.5e9)),
        ("bitops=1000", BitOps(1000)),
        ("avg-bits=2", AverageBits(2)),
        ("avg-bits=3.5bits", AverageBits(3.5)),
        ("avg-bits=4b", AverageBits(4)),
    ],
)
def test_parse_budget_units(text, expected):
    parsed = parse_budget(text)
    assert parsed == expected
    assert type(parsed) is type(expected)


def test_budget_equality_distinguishes_kind_and_mode():
    assert WeightMemory(100) != ActivationMemory(100)
    assert ActivationMemory(100) != ActivationMemory(100, mode="sum")
    assert BitOps(100) != AverageBits(4)  # sanity: different classes never compare equal


@pytest.mark.parametrize(
    "budget",
    [WeightMemory(kib=20), WeightMemory(1), WeightMemory(mib=3.25), ActivationMemory(kib=8),
     ActivationMemory(kib=8, mode="sum"), BitOps(1.2e9), BitOps(7), BitOps(1e15), AverageBits(2.0),
     AverageBits(3.75), AverageBits(32)],
)
def test_parse_budget_round_trips_text(budget):
    assert parse_budget(budget.text) == budget


_size = st.one_of(st.integers(min_value=1, max_value=10**12).map(float),
                  st.decimals(min_value="0.01", max_value="100000", places=2).map(float))


@given(size=_size, mode=st.sampled_from(["max", "sum"]))
@PROPS
def test_parse_budget_round_trips_memory(size, mode):
    assert parse_budget(WeightMemory(size).text) == WeightMemory(size)
    assert parse_budget(ActivationMemory(size, mode=mode).text) == ActivationMemory(size, mode=mode)


@given(count=_size, bits=st.decimals(min_value="0.01", max_value="32", places=3).map(float))
@PROPS
def test_parse_budget_round_trips_counts(count, bits):
    assert parse_budget(BitOps(count).text) == BitOps(count)
    assert parse_budget(AverageBits(bits).text) == AverageBits(bits)


@pytest.mark.parametrize(
    "budget", [AverageBits(8 / 3), BitOps(1e9 / 3), WeightMemory(kib=1 / 3)], ids=["avg-bits", "bitops", "weight"]
)
def test_parse_budget_round_trips_full_precision(budget):
    assert parse_budget(budget.text) == budget


@pytest.mark.parametrize(
    "text",
    [
        "weight-memory",  # no '='
        "20KiB",  # no '='
        "weight-memory=",  # no value
        "flops=1G",  # unknown kind
        "weight-memory=20XB",  # unknown unit
        "bitops=1.2GiB",  # a byte unit on a count
        "avg-bits=2KiB",
        "weight-memory=-5KiB",  # negative
        "bitops=-1G",
        "weight-memory=abc",
        "weight-memory=20KiB,sum",  # weight memory takes no option
        "weight-memory=1.2.3KiB",
    ],
)
def test_parse_budget_rejects_bad_strings_naming_them(text):
    with pytest.raises(ConfigError) as info:
        parse_budget(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("weight-memory=0", "weight-memory"),
        ("weight-memory=0KiB", "weight-memory"),
        ("activation-memory=0B", "activation-memory"),
        ("bitops=0", "bitops"),
        ("avg-bits=0", "average bits"),
        ("avg-bits=40", "average bits"),
        ("activation-memory=8KiB,mean", "'mean'"),
    ],
)
def test_parse_budget_rejects_out_of_range_values(text, mentions):
    with pytest.raises(ConfigError) as info:
        parse_budget(text)
    assert mentions in str(info.value)


@pytest.mark.parametrize("text", ["weight-memory=0KiB", "bitops=0", "avg-bits=0", "activation-memory=8KiB,mean"])
def test_parse_budget_out_of_range_errors_quote_the_text(text):
    with pytest.raises(ConfigError) as info:
        parse_budget(text)
    assert repr(text) in str(info.value)
