"""The measured latency budget (``mpqc.Latency``, ``latency=3ms``): a per-layer, per-bit table measured on this CPU
through the kernels ``lower`` picks, cached in the tuning database, differentiable in the bits, refused when
infeasible and met after freezing."""
from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("tvm")

import mpqc  # noqa: E402
from conftest import FAST  # noqa: E402
from conftest import example_batch as _example  # noqa: E402
from mpqc.budgets import LayerBits, parse_budget  # noqa: E402
from mpqc.errors import ConfigError, InfeasibleBudgetError  # noqa: E402
from mpqc.layers import LayerInfo  # noqa: E402
from mpqc.report import format_report  # noqa: E402
from mpqc.targets.tvm import between_layers, latency  # noqa: E402
from mpqc.targets.tvm.kernels import registry  # noqa: E402
from mpqc.targets.tvm.target import resolve_target  # noqa: E402

HAS_AVX2 = "avx2" in registry.target_isas(resolve_target("llvm"))
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2 (the table test forces the AVX2 kernels)")

# Two small layers: a conv on the AVX2 kernels (wide, narrow and the int16 multi-step ones, from the bits) and a
# depthwise conv on TVM's generic operators, channels-last as between two kernel layers (one entry whatever the bits).
LAYERS = [
    LayerInfo("conv", "conv2d", (32, 16, 3, 3), 4608, 32, 32, 294912, (16, 8, 8), (32, 8, 8), 1024, 2048),
    LayerInfo("dw", "conv2d", (32, 1, 3, 3), 288, 32, 32, 4608, (32, 4, 4), (32, 4, 4), 512, 512),
]


def _bits(w, a):
    return {layer.name: LayerBits(torch.as_tensor(wi), torch.as_tensor(ai)) for layer, wi, ai in zip(LAYERS, w, a)}


@needs_avx2
def test_latency_table_is_measured_cached_and_differentiable(tmp_path, monkeypatch):
    measured = []
    measure = latency.measure_blocks

    def counted(entries, target, repeat=30, rounds=3, tuning_dir=None):
        measured.extend(block for _, block in entries)
        return measure(entries, target, 3, rounds=1, tuning_dir=tuning_dir)

    monkeypatch.setattr(latency, "measure_blocks", counted)
    latency.clear_memo()
    budget = mpqc.Latency(1.0, isa="avx2", tuning_db=str(tmp_path))
    table = budget.table(LAYERS)

    conv_blocks = set(table.blocks[0].values())
    assert conv_blocks == {"avx2wide_conv", "avx2_conv", "avx2s2_conv", "avx2s4_conv"}  # 16 channels: 4 quads
    assert table.blocks[0][8, 8] == "avx2wide_conv" and table.blocks[0][4, 8] == "avx2s4_conv"
    assert set(table.blocks[1].values()) == {latency.GENERIC_CHANNELS_LAST}
    assert sorted(measured) == sorted([*conv_blocks, latency.GENERIC_CHANNELS_LAST])  # each once, not per bit pair
    assert (table.grid > 0).all()
    stored = json.loads((tmp_path / latency.TABLE_FILE).read_text())["hosts"][table.host]
    assert len(stored) == len(measured)
    # each kernel measured at its tuned tile, recorded where a lowering with this tuning_db finds it
    tiles = json.loads((tmp_path / "vnni_tiles.json").read_text())
    assert {key.split(" conv ")[0] for key in tiles} == conv_blocks
    # equal bits -> equal kernel -> equal entry; the generic layer does not depend on the bits
    assert table.grid[0, 2 - 2, 8 - 2] == table.grid[0, 4 - 2, 8 - 2]
    assert torch.unique(table.grid[1]).numel() == 1

    # cached: a new process (memo cleared) reads the database and measures nothing
    latency.clear_memo()
    monkeypatch.setattr(latency, "measure_blocks", lambda *args, **kw: pytest.fail("measured again"))
    again = mpqc.Latency(1.0, isa="avx2", tuning_db=str(tmp_path)).table(LAYERS)
    assert torch.equal(again.grid, table.grid)

    # differentiable: exact at integer bits, bilinear between them, gradient = the grid's difference across a step
    w = torch.tensor([7.25, 5.0], requires_grad=True)
    a = torch.tensor([8.0, 3.5], requires_grad=True)
    cost = budget.cost(LAYERS, _bits(w, a))
    cost.backward()
    g = table.grid
    assert cost.item() == pytest.approx(float(0.75 * g[0, 5, 6] + 0.25 * g[0, 6, 6] + g[1, 3, 1]), rel=1e-6)
    assert w.grad[0].item() == pytest.approx(float(g[0, 6, 6] - g[0, 5, 6]), rel=1e-6)
    assert w.grad[1].item() == 0 and a.grad[1].item() == 0  # generic: bits do not change its speed
    integer = budget.per_layer(LAYERS, _bits([4, 8], [8, 2]))
    assert integer.tolist() == pytest.approx([float(g[0, 2, 6]), float(g[1, 6, 0])])


def test_latency_budget_parses_and_validates():
    assert parse_budget("latency=3ms") == mpqc.Latency(3.0)
    assert parse_budget("latency=2.5ms,avx2") == mpqc.Latency(2.5, isa="avx2")
    assert parse_budget("latency=0.5s").ms == 500.0
    assert parse_budget(mpqc.Latency(3.0, isa="avx2").text) == mpqc.Latency(3.0, isa="avx2")
    with pytest.raises(ConfigError, match="positive finite"):
        mpqc.Latency(0.0)
    with pytest.raises(ConfigError, match="isa"):
        mpqc.Latency(1.0, isa="sse")
    with pytest.raises(ConfigError, match="between_layers_ms"):
        mpqc.Latency(1.0, between_layers_ms=-0.1)
    with pytest.raises(ConfigError, match="latency"):
        parse_budget("latency=3 parsecs")


#: relative cost per MAC of each kernel, for a deterministic table (the measurement is tested above)
_SPEED = {"avx2wide_conv": 2.0, "avx2_conv": 1.4, "avx2s2_conv": 1.2, "avx2s4_conv": 1.0, "avx2s8_conv": 0.9,
          latency.GENERIC: 3.0, latency.GENERIC_CHANNELS_LAST: 3.0}
BETWEEN = 0.001  # ms: the work between the layers, as the fake measurement gives it


@needs_avx2
def test_compile_meets_a_latency_budget_after_freezing(trained_small_cnn, digits_loaders, tmp_path, monkeypatch):
    """small_cnn on 8x8 digits (its middle conv searched, first and last layers fixed at 8 bits), the AVX2
    kernels, a table whose entries follow the kernels' work (deterministic, so the budget's logic is what is
    tested): one below the smallest achievable is refused before training, with the numbers; one between the
    smallest and the 8-bit latency is met after freezing, and the report shows each layer's predicted ms."""
    from mpqc import pipeline

    def fake_measure(entries, target, repeat=30, rounds=3, tuning_dir=None):
        return [1e-6 * g.in_channels * g.out_channels * (g.kernel or (1,))[0] ** 2 * _SPEED[block]
                for g, block in entries]

    monkeypatch.setattr(latency, "measure_blocks", fake_measure)
    monkeypatch.setattr(between_layers, "between_layers_ms", lambda *args, **kwargs: BETWEEN)
    latency.clear_memo()
    example = _example(digits_loaders)
    _, layers = pipeline.trace(trained_small_cnn.eval(), (example[:1],))
    table = mpqc.Latency(1.0, isa="avx2", tuning_db=str(tmp_path)).table(layers)
    eight = sum(table.at(8, 8)) + BETWEEN
    with pytest.raises(InfeasibleBudgetError, match=r"latency budget 1e-06 ms is infeasible") as refused:
        mpqc.compile(trained_small_cnn, example, budget=mpqc.Latency(1e-6, isa="avx2", tuning_db=str(tmp_path)),
                     data=digits_loaders, config=FAST)
    smallest = float(re.search(r"smallest achievable is ([0-9.e+-]+) ms", str(refused.value)).group(1))
    assert smallest < eight

    limit = (smallest + eight) / 2
    result = mpqc.compile(trained_small_cnn, example, data=digits_loaders, config=FAST,
                          budget=mpqc.Latency(limit, isa="avx2", tuning_db=str(tmp_path)))
    report = result.report
    assert report["budget"]["met"] and report["budget"]["achieved"] <= limit
    predicted = [layer["predicted_ms"] for layer in report["layers"]]
    # the work between the layers (measured once on the model by compile) is part of the cost, and shown
    assert report["budget"]["between_layers_ms"] == BETWEEN
    assert sum(predicted) + BETWEEN == pytest.approx(report["budget"]["achieved"])
    bits = {layer["name"]: (layer["weight_bits"], layer["activation_bits"]) for layer in report["layers"]}
    assert predicted == pytest.approx([table.at(*bits[layer.name])[i] for i, layer in enumerate(layers)])
    assert f"{predicted[1]:.3f} ms" in format_report(report)
    assert f"of which {BETWEEN} ms between the layers" in format_report(report)


def test_the_work_between_layers_is_measured_once_per_model_and_counted(trained_small_cnn, digits_loaders,
                                                                        tmp_path, monkeypatch):
    """small_cnn lowered for this host: its module's time beyond its layers' table entries (the input's
    quantisation, the pool, the VM's calls) is measured beside them, kept in the table's file under the model's
    structure, added to the budget's cost, and read back (not measured again) by a second compile's budget."""
    from mpqc import pipeline
    from mpqc.config import QuantizerConfig
    from mpqc.quantizers import get_method

    example = _example(digits_loaders)[:2]
    gm, layers = pipeline.trace(trained_small_cnn.eval(), (example,))
    gm = pipeline.quantize(gm, get_method("dq"), QuantizerConfig(), (example,))
    latency.clear_memo()
    budget = mpqc.Latency(1.0, tuning_db=str(tmp_path)).measured_on(gm, (example,))
    between = budget.between_layers_ms
    assert between > 0  # a module always does something besides its layers' kernels
    stored = json.loads((tmp_path / latency.TABLE_FILE).read_text())["hosts"]
    (host,) = stored
    keys = [key for key in stored[host] if key.startswith("between | ")]
    assert len(keys) == 1 and stored[host][keys[0]] == between
    bits = {layer.name: LayerBits(torch.tensor(5.0), torch.tensor(8.0)) for layer in layers}
    assert float(budget.cost(layers, bits)) == pytest.approx(float(budget.per_layer(layers, bits).sum()) + between)
    # a budget is the same budget with or without its measurement (the run's identity, the CLI text)
    assert budget == mpqc.Latency(1.0) and budget.text == "latency=1ms"

    latency.clear_memo()
    monkeypatch.setattr("mpqc.targets.tvm.build.lower", lambda *args, **kwargs: pytest.fail("lowered again"))
    again = mpqc.Latency(1.0, tuning_db=str(tmp_path)).measured_on(gm, (example,))
    assert again.between_layers_ms == between
    # another structure (here: another input size) is another entry
    other = between_layers.structure_key(pipeline.to_integer_program(_frozen(gm)), [(1, 1, 16, 16)], layers)
    assert other != keys[0]


def _frozen(gm):
    import copy

    from mpqc.budgets import WeightMemory
    from mpqc.passes.freeze import freeze

    return freeze(copy.deepcopy(gm).eval(), WeightMemory(1e30))


@pytest.mark.slow
def test_lowered_module_runs_within_ten_percent_of_the_prediction(tmp_path):
    """ResNet-20 (batch 1) at random mixed 2-8 bits: the budget's predicted ms (the table, every layer's kernel
    measured alone, plus the work between the layers measured once on the model at its starting bits) against the
    lowered module's measured ms, both the fastest of their repeats. Timing: run on a quiet machine (other
    processes on the cores make both slower, the whole module more)."""
    from conftest import example_models, mixed_bit_program, quantized_graph, randomize_batchnorm
    from mpqc import pipeline
    from mpqc.targets.tvm import lower

    build = example_models.resnet20
    _, program, x = mixed_bit_program(build, (1, 1, 28, 28), seed=1)
    torch.manual_seed(0)
    _, layers = pipeline.trace(build().eval(), (x,))
    bits = program.layer_bits()
    latency.clear_memo()
    torch.manual_seed(0)
    quantized, _ = quantized_graph(randomize_batchnorm(build()), x)
    budget = mpqc.Latency(1.0, tuning_db=str(tmp_path)).measured_on(quantized, (x,))
    predicted = float(budget.cost(layers, {name: LayerBits(torch.tensor(float(w)), torch.tensor(float(a)))
                                           for name, (w, a) in bits.items()}))
    lowered = lower(program, input_shape=tuple(x.shape), tuning_db=str(tmp_path))  # the table's tiles
    assert torch.equal(lowered(x), program.run(x))
    measured = lowered.timer(x.numpy(), repeat=100, min_repeat_ms=5)()
    assert 0.9 <= measured / predicted <= 1.1, f"measured {measured:.3f} ms, predicted {predicted:.3f} ms"
