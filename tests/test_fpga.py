"""Accelerator cost models (mpqc.targets.fpga) and the TargetCost budget: hand-computed cycles, straight-through
gradients, the 8-bit ratio, budget parsing and feasibility, freezing across cost plateaus, and one compile."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpqc
from conftest import example_models, quantized_graph, set_bits
from mpqc.budgets import BUDGET_KINDS, LayerBits, TargetCost, parse_budget
from mpqc.errors import ConfigError, InfeasibleBudgetError
from mpqc.layers import LayerInfo
from mpqc.passes.freeze import integer_bits
from mpqc.passes.insert_quantizers import quantized_layers
from mpqc.targets.fpga import (COST_MODELS, BitFusionCost, BitSerialCost, cost_report, format_cost, get_cost_model,
                               layers_from_report, register_cost_model)
from test_compile import FAST

# A 16->16 3x3 conv on 32x32 (stride 1): GEMM m=16 out channels, k=16*9=144, n=32*32=1024 positions.
CONV = LayerInfo(
    name="conv", op="conv2d", weight_shape=(16, 16, 3, 3), params=2304, bias_params=0, out_channels=16,
    macs=2304 * 1024, input_shape=(16, 32, 32), output_shape=(16, 32, 32), input_elements=16384,
    output_elements=16384,
)
# A 256->64 linear layer on one vector: m=64, k=256, n=1.
FC = LayerInfo(
    name="fc", op="linear", weight_shape=(64, 256), params=16384, bias_params=64, out_channels=64, macs=16384,
    input_shape=(256,), output_shape=(64,), input_elements=256, output_elements=64,
)
LAYERS = [CONV, FC]
BITS = {"conv": (4, 3), "fc": (2, 8)}

BISMO = COST_MODELS["bitserial"]  # 8x256x8 (Dm x Dk x Dn), 200 MHz, 8 B/cycle, outputs at 8 bits
FUSION = COST_MODELS["bitfusion"]  # 16x32 fusion units of 16 bricks, 500 MHz, 24 B/cycle, outputs at 8 bits


def _t(value: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(float(value), requires_grad=grad)


def test_defaults_are_the_documented_ones():
    assert (BISMO.dm, BISMO.dk, BISMO.dn, BISMO.clock_hz, BISMO.bytes_per_cycle, BISMO.output_bits) == (
        8, 256, 8, 200e6, 8.0, 8)
    assert (FUSION.rows, FUSION.cols, FUSION.bricks, FUSION.clock_hz, FUSION.bytes_per_cycle, FUSION.output_bits,
            FUSION.power_of_two_fusion) == (16, 32, 16, 500e6, 24.0, 8, True)
    assert set(COST_MODELS) <= set(BUDGET_KINDS)


# ------------------------------------------------------------------------------------------------ bit-serial
def test_bitserial_conv_hand_values():
    # tiles = ceil(16/8) * ceil(144/256) * ceil(1024/8) = 2 * 1 * 128 = 256 binary-matmul tiles per bit-plane pair
    # compute(4, 3) = 4 * 3 * 256 = 3072   (untiled MACs*w*a/(Dm*Dk*Dn) = 2359296*12/16384 = 1728; k=144 of 256)
    # memory(4, 3) = ceil((2304*4 + 16384*3 + 16384*8) / 8 / 8) = ceil(189440 / 64) = 2960
    assert BISMO.compute_cycles([CONV], 4, 3).item() == 3072
    assert BISMO.memory_cycles([CONV], 4, 3).item() == 2960
    assert BISMO.layer_cycles(CONV, _t(4), _t(3)).item() == 3072  # compute-bound
    # 8/8: compute 64 * 256 = 16384, memory ceil((2304 + 16384 + 16384) * 8 / 64) = 4384
    assert BISMO.layer_cycles(CONV, _t(8), _t(8)).item() == 16384


def test_bitserial_untiled_layer_is_macs_times_bits_over_array():
    # m=16, k=512, n=64 divide the 8x256x8 array exactly: compute = MACs * w * a / (8*256*8)
    layer = LayerInfo("exact", "conv2d", (16, 512, 1, 1), 8192, 0, 16, 8192 * 64, (512, 8, 8), (16, 8, 8), 32768,
                      1024)
    assert BISMO.compute_cycles([layer], 3, 5).item() == 8192 * 64 * 15 / (8 * 256 * 8)  # = 480


def test_bitserial_fc_is_memory_bound():
    # tiles = ceil(64/8) * ceil(256/256) * ceil(1/8) = 8; compute(2, 8) = 2 * 8 * 8 = 128
    # memory = ceil((16384*2 + 256*8 + 64*8) / 8 / 8) = ceil(35328 / 64) = 552
    assert BISMO.compute_cycles([FC], 2, 8).item() == 128
    assert BISMO.layer_cycles(FC, _t(2), _t(8)).item() == 552


# ------------------------------------------------------------------------------------------------ BitFusion
def test_bitfusion_slices_fuse_in_powers_of_two():
    slices = [FUSION.slices(_t(b)).item() for b in range(1, 9)]
    assert slices == [1, 1, 2, 2, 4, 4, 4, 4]  # bricks per operand side: 2-, 4-, 8-bit F-PEs
    linear = BitFusionCost(power_of_two_fusion=False)
    assert [linear.slices(_t(b)).item() for b in range(1, 9)] == [1, 1, 2, 2, 3, 3, 4, 4]  # ceil(b/2)


def test_bitfusion_macs_per_fusion_unit_per_cycle():
    # k=4096, m=32, n=1: one column tile; a Fusion Unit does 16/(s(w)*s(a)) MACs a cycle: 16, 4, 1 at 2, 4, 8 bits.
    layer = LayerInfo("wide", "linear", (32, 4096), 131072, 0, 32, 131072, (4096,), (32,), 4096, 32)
    for bits, per_unit in ((2, 16), (4, 4), (8, 1)):
        cycles = FUSION.compute_cycles([layer], bits, bits).item()
        assert cycles == 131072 / (512 * per_unit)  # 16, 64, 256 cycles on 512 fusion units


def test_bitfusion_conv_hand_values():
    # s(4) = 2, s(3) = 2: k-tiles = ceil(144 * 2 * 2 / (16 rows * 16 bricks)) = ceil(2.25) = 3
    # compute = n * ceil(m / cols) * k-tiles = 1024 * ceil(16/32) * 3 = 3072
    # memory = ceil((2304*4 + 16384*3 + 16384*8) / 8 / 24) = ceil(23680 / 24) = ceil(986.67) = 987
    assert FUSION.compute_cycles([CONV], 4, 3).item() == 3072
    assert FUSION.memory_cycles([CONV], 4, 3).item() == 987
    assert FUSION.layer_cycles(CONV, _t(4), _t(3)).item() == 3072
    # 8/8: s = 4, 4: 1024 * ceil(144 * 16 / 256) = 1024 * 9 = 9216 (memory ceil(35072 / 24) = 1462)
    assert FUSION.layer_cycles(CONV, _t(8), _t(8)).item() == 9216
    # 5-bit weights fuse as 8-bit ones (s = 4): 1024 * ceil(144*4*2/256) = 1024 * ceil(4.5) = 5120;
    # with linear fusion s(5) = 3: 1024 * ceil(144*3*2/256) = 1024 * ceil(3.375) = 4096
    assert FUSION.compute_cycles([CONV], 5, 3).item() == 5120
    assert BitFusionCost(power_of_two_fusion=False).compute_cycles([CONV], 5, 3).item() == 4096


def test_bitfusion_fc_is_memory_bound():
    # compute(2, 2) = 1 * ceil(64/32) * ceil(256*1*1/256) = 2; memory = ceil((16384*2 + 256*2 + 64*8)/8/24) = 176
    assert FUSION.compute_cycles([FC], 2, 2).item() == 2
    assert FUSION.layer_cycles(FC, _t(2), _t(2)).item() == 176
    assert FUSION.layer_cycles(FC, _t(8), _t(8)).item() == 696  # (16384 + 256 + 64) * 8 / 8 / 24


def test_fractional_bits_cost_what_freezing_rounds_to():
    assert FUSION.layer_cycles(CONV, _t(4.4), _t(2.6)).item() == FUSION.layer_cycles(CONV, _t(4), _t(3)).item()
    assert BISMO.layer_cycles(CONV, _t(3.6), _t(3.4)).item() == BISMO.layer_cycles(CONV, _t(4), _t(3)).item()


# ------------------------------------------------------------------------------------------------ gradients
def test_gradients_hand_values():
    # bit-serial, compute-bound conv: d/dw (w*a*256) = a*256 = 768, d/da = w*256 = 1024
    w, a = _t(4, True), _t(3, True)
    BISMO.layer_cycles(CONV, w, a).backward()
    assert (w.grad.item(), a.grad.item()) == (768, 1024)
    # BitFusion, compute-bound conv: d/dw = n * ceil(m/cols) * k * s(a) * (1/2) / (rows*bricks) = 1024*144*2/2/256
    w, a = _t(4, True), _t(3, True)
    FUSION.layer_cycles(CONV, w, a).backward()
    assert (w.grad.item(), a.grad.item()) == (576, 576)
    # BitFusion, memory-bound fc: d/dw = params / (8 * 24), d/da = input elements / (8 * 24)
    w, a = _t(2, True), _t(2, True)
    FUSION.layer_cycles(FC, w, a).backward()
    assert w.grad.item() == pytest.approx(16384 / 192) and a.grad.item() == pytest.approx(256 / 192)


@pytest.mark.parametrize("name", sorted(COST_MODELS))
def test_more_bits_more_cycles_and_positive_gradients(name):
    model = COST_MODELS[name]
    w = torch.tensor([3.3, 5.0], requires_grad=True)
    a = torch.tensor([6.0, 2.2], requires_grad=True)
    model.cycles(LAYERS, w, a).sum().backward()
    assert (w.grad > 0).all() and (a.grad > 0).all()
    assert model.total_cycles(LAYERS, {"conv": (8, 8), "fc": (8, 8)}) > model.total_cycles(LAYERS, BITS)


@given(w=st.integers(1, 8), a=st.integers(1, 8), which=st.sampled_from(["w", "a"]),
       name=st.sampled_from(["bitserial", "bitfusion"]))
@settings(max_examples=60, deadline=None)
def test_cycles_never_fall_when_bits_rise(w, a, which, name):
    model = COST_MODELS[name]
    more = (w + 1, a) if which == "w" else (w, a + 1)
    for layer in LAYERS:
        assert model.layer_cycles(layer, *more).item() >= model.layer_cycles(layer, w, a).item()


# ------------------------------------------------------------------------------------------------ report
def test_cost_report_hand_values_and_ratio():
    report = cost_report(LAYERS, BITS, "bitserial")
    assert [layer["cycles"] for layer in report["layers"]] == [3072, 552]
    assert [layer["bound"] for layer in report["layers"]] == ["compute", "memory"]
    assert report["total_cycles"] == 3624
    assert report["latency_s"] == pytest.approx(3624 / 200e6)
    # uniform 8/8: conv 16384; fc max(compute 8*8*8 = 512, memory ceil(133632 / 64) = 2088) = 2088
    assert report["uniform8_cycles"] == 16384 + 2088
    assert report["ratio_vs_8bit"] == pytest.approx(3624 / 18472)
    json.dumps(report)  # JSON-able
    text = format_cost(report)
    for word in ("conv", "fc", "compute", "memory", "3.62 k cycles", "18.1 µs", "18.5 k cycles"):
        assert word in text, word


@pytest.mark.parametrize("name", sorted(COST_MODELS))
def test_ratio_is_one_at_uniform_8_bits(name):
    report = cost_report(LAYERS, {"conv": (8, 8), "fc": (8, 8)}, name)
    assert report["ratio_vs_8bit"] == 1.0
    assert all(layer["cycles"] == layer["cycles_8bit"] for layer in report["layers"])


def test_cost_report_names_missing_layers():
    with pytest.raises(ConfigError, match="fc"):
        cost_report(LAYERS, {"conv": (4, 4)}, "bitfusion")


def test_layers_from_report_round_trip_and_old_reports():
    entries = [{**layer.to_dict(), "weight_bits": BITS[layer.name][0], "activation_bits": BITS[layer.name][1]}
               for layer in LAYERS]
    report = json.loads(json.dumps({"layers": entries}))  # shapes come back as lists
    layers, bits = layers_from_report(report)
    assert layers == LAYERS and bits == BITS
    del entries[0]["out_channels"]
    with pytest.raises(ConfigError, match="out_channels"):
        layers_from_report({"layers": entries})


# ------------------------------------------------------------------------------------------------ registry, config
def test_registry_and_validation(monkeypatch):
    with pytest.raises(ConfigError, match="bitfusion, bitserial"):
        get_cost_model("tpu")
    for make in (lambda: BitSerialCost(dm=0), lambda: BitSerialCost(clock_hz=-1.0), lambda: BitFusionCost(rows=2.5),
                 lambda: BitFusionCost(output_bits=0), lambda: BitFusionCost(bytes_per_cycle=float("inf"))):
        with pytest.raises(ConfigError):
            make()
    with pytest.raises(ConfigError, match="already registered"):
        register_cost_model("bitfusion", BitFusionCost())
    monkeypatch.setitem(COST_MODELS, "bitfusion-small", BitFusionCost(rows=8, cols=8))
    assert parse_budget("bitfusion-small=10k") == TargetCost("bitfusion-small", 1e4)


# ------------------------------------------------------------------------------------------------ TargetCost
@pytest.mark.parametrize(
    ("text", "expected"),
    [("bitfusion=2.5M", TargetCost("bitfusion", 2.5e6)), ("bitserial=800k", TargetCost("bitserial", 8e5)),
     ("BitFusion = 1200", TargetCost("bitfusion", 1200)), ("bitserial=1.5e9", TargetCost("bitserial", 1.5e9))],
)
def test_parse_target_cost(text, expected):
    budget = parse_budget(text)
    assert budget == expected and parse_budget(budget.text) == budget
    assert budget.kind == expected.target and budget.unit == "cycles"


@pytest.mark.parametrize("text", ["bitfusion=2.5MiB", "bitfusion=0", "bitfusion=-3k", "bitfusion=1M,sum",
                                  "bitfusion=fast", "tpu=1M"])
def test_parse_target_cost_rejects_naming_the_text(text):
    with pytest.raises(ConfigError) as info:
        parse_budget(text)
    assert repr(text) in str(info.value)


def test_target_cost_construction():
    assert mpqc.TargetCost("bitfusion", cycles=2.5e6).limit == 2.5e6
    with pytest.raises(ConfigError, match="unknown cost model 'tpu'"):
        TargetCost("tpu", 1e6)
    with pytest.raises(ConfigError, match="positive finite"):
        TargetCost("bitserial", float("nan"))


def _layer_bits(bits, grad=False):
    return {name: LayerBits(_t(w, grad), _t(a, grad)) for name, (w, a) in bits.items()}


def test_target_cost_is_the_model_total_and_differentiable():
    bits = _layer_bits(BITS, grad=True)
    cost = TargetCost("bitserial", 1000).cost(LAYERS, bits)
    assert cost.item() == 3624 and cost.dtype == torch.float32
    TargetCost("bitserial", 1000).penalty(LAYERS, bits).backward()
    # only the conv is compute-bound: d penalty / d w_conv = 2 (3624/1000 - 1) * 768 / 1000
    assert bits["conv"].weight.grad.item() == pytest.approx(2 * (3.624 - 1) * 768 / 1000, rel=1e-5)
    assert bits["fc"].weight.grad.item() == pytest.approx(2 * (3.624 - 1) * 16384 / 64 / 1000, rel=1e-5)
    inside = _layer_bits(BITS, grad=True)
    assert TargetCost("bitserial", 3624).penalty(LAYERS, inside).item() == 0.0


def test_target_cost_feasibility():
    smallest = _layer_bits({"conv": (2, 2), "fc": (2, 2)})
    # BitFusion at 2/2: conv max(1024 * 1 * ceil(144/256) = 1024, ceil(168448 / 192) = 878) = 1024; fc 176
    assert TargetCost("bitfusion", 1200).check_feasible(LAYERS, smallest) == 1200.0
    with pytest.raises(InfeasibleBudgetError) as info:
        TargetCost("bitfusion", 100).check_feasible(LAYERS, smallest)
    assert "bitfusion budget 100 cycles is infeasible" in str(info.value)
    assert "1.20 k cycles" in str(info.value)


# ------------------------------------------------------------------------------------------------ freezing
def test_freeze_steps_over_cost_plateaus(monkeypatch):
    """Compute-bound BitFusion: lowering any operand from 8 to 7 bits saves nothing (5..8 bits fuse alike), so a
    one-bit greedy step would be stuck; freezing must step to 4 bits where that saves."""
    monkeypatch.setitem(COST_MODELS, "fusion-fast-memory", BitFusionCost(bytes_per_cycle=1e9))
    torch.manual_seed(0)
    gm, layers = quantized_graph(example_models.small_cnn().eval(), torch.randn(8, 1, 8, 8))
    set_bits(gm, lambda name: 8)
    # small_cnn on 8x8: conv1 64 cycles at any bits (k=9), conv2 16 * ceil(144*16/256) = 144, fc ceil(32*16/256) = 2
    budget = TargetCost("fusion-fast-memory", 150)
    bits = integer_bits(gm, budget)
    assert budget.met(budget.cost(layers, {
        layer.name: LayerBits(_t(bits[f"{layer.name}.weight_quantizer"]), _t(bits[layer.input_quantizer_name]))
        for layer in quantized_layers(gm)}).item())
    assert min(bits.values()) == 4  # stepped 8 -> 4 at once, where the fused PE halves


# ------------------------------------------------------------------------------------------------ end to end
def test_compile_under_a_bitfusion_budget_and_report_cost(trained_small_cnn, digits_loaders, tmp_path, capsys):
    # small_cnn on 8x8 digits under BitFusion: 335 cycles at 8/8, 148 at 2/2; ask for 230.
    example = next(iter(digits_loaders[1]))[0][:2]
    result = mpqc.compile(trained_small_cnn, example, budget="bitfusion=230", data=digits_loaders, config=FAST)
    report = result.report
    assert report["budget"]["kind"] == "bitfusion" and report["budget"]["unit"] == "cycles"
    assert report["budget"]["met"] and report["budget"]["achieved"] <= 230
    assert report["cost"]["bitfusion"]["total_cycles"] == pytest.approx(report["budget"]["achieved"])
    assert report["cost"]["bitfusion"]["ratio_vs_8bit"] < 230 / 335 + 1e-9
    assert set(report["cost"]) == {"bitfusion", "bitserial"}
    assert report["accuracy"]["quantized"] > 50, report["accuracy"]

    result.save(tmp_path / "run")
    from mpqc.cli import main

    assert main(["report", str(tmp_path / "run"), "--cost", "bitserial"]) == 0
    shown = capsys.readouterr().out
    for word in ("bitfusion=230", "cost model bitserial", "conv2", "uniform 8/8"):
        assert word in shown, word


def test_module_doctests_pass():
    import doctest

    import mpqc.targets.fpga

    result = doctest.testmod(mpqc.targets.fpga, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
