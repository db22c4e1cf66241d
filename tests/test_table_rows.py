"""Per-row bit-widths of embedding tables by how often rows are read (``table_rows="frequency"``)."""
from __future__ import annotations

import pytest
import torch

import mpqc
from mpqc.budgets import WeightMemory
from mpqc.errors import ConfigError
from mpqc.quantizers import BitRange
from mpqc.quantizers.base import row_ranges
from mpqc.quantizers.table_rows import RowBitsQuantizer, rows_by_frequency
from test_ops_transformer import _assert_onnxruntime_agrees, _assert_tvm_bit_exact, bert_inputs, tiny_bert
from test_round_weights import cli_config


def test_rows_by_frequency_spends_the_mean_on_the_rows_read_most():
    generator = torch.Generator().manual_seed(0)
    counts = (1000 * torch.rand(5000, generator=generator) ** 8).floor()  # skewed: many rows never read
    for mean in (2.0, 3.0, 3.7, 5.0, 8.0):
        bits = rows_by_frequency(counts, mean, BitRange(2, 8))
        assert bits.min() >= 2 and bits.max() <= 8 and bool((bits == bits.round()).all())
        assert bits.sum() <= mean * len(bits) and bits.sum() >= mean * len(bits) - len(bits) / 100  # all but 1%
        order = torch.argsort(counts, stable=True)
        assert bool((bits[order].diff() >= -1).all())  # more reads, no fewer bits (one bit of fill aside)
        assert bits[counts == 0].max() <= bits[counts > counts.median()].min()
    with pytest.raises(ConfigError, match="cannot average 1.5 bits"):
        rows_by_frequency(counts, 1.5, BitRange(2, 8))


def test_a_row_bits_quantizer_clamps_each_row_to_its_own_range_and_freezes_to_those_codes():
    torch.manual_seed(0)
    weight = torch.randn(6, 10) * 3
    row_bits = torch.tensor([2.0, 3.0, 8.0, 4.0, 2.0, 5.0])
    quantizer = RowBitsQuantizer(row_bits, signed=True, scale=torch.full((6,), 0.05))
    codes = torch.round(quantizer(weight) / quantizer.scale[:, None])
    low, high = row_ranges(row_bits, True)
    assert bool((codes >= low[:, None]).all() and (codes <= high[:, None]).all())
    assert codes[0].abs().max() == 1 and codes[2].abs().max() > 7  # 2 bits: -1..1; 8 bits: wider
    frozen = quantizer.frozen()
    assert frozen.bits == 8 and torch.equal(frozen.quantize(weight).float(), codes)
    assert float(quantizer.bits()) == pytest.approx(float(row_bits.mean()))
    with pytest.raises(ConfigError):
        RowBitsQuantizer(row_bits[:5], signed=True, scale=torch.ones(6))


def test_compile_with_frequency_rows_meets_its_budget_and_deploys_bit_exact(tmp_path):
    model = tiny_bert(layers=1)
    ids, mask = bert_inputs()
    batch = {"input_ids": ids, "attention_mask": mask}
    loader = torch.utils.data.DataLoader([batch] * 4, batch_size=None)
    config = mpqc.CompileConfig(search=mpqc.TrainConfig(epochs=1, quantizer_lr=0.05),
                                finetune=mpqc.TrainConfig(epochs=1, lr=0.001), progress=False,
                                quantizers=mpqc.QuantizerConfig(table_rows="frequency"))
    compiled = mpqc.compile(model, batch, budget=WeightMemory(5000), data=(loader, None), config=config)
    report = compiled.report
    assert report["budget"]["met"] and report["budget"]["achieved"] <= 5000
    assert report["budget"]["achieved"] == pytest.approx(sum(l["params"] * l["weight_bits"] for l in report["layers"]) / 8)

    program = compiled.program
    word = next(node for node in program.nodes if node.op == "embedding" and "word" in node.attrs["module"])
    table = {layer["name"]: layer for layer in report["layers"]}[word.attrs["module"]]
    assert table["weight_bits"] == pytest.approx(word.attrs["average_weight_bits"]) and table["weight_bits"] <= 8
    # rows read by the batches got more bits than rows never read, and their codes use them
    read = torch.zeros(100, dtype=torch.bool)
    read[ids.flatten()] = True
    row_bits = compiled.graph.get_submodule(word.attrs["module"]).weight_quantizer.row_bits
    assert row_bits[read].min() > row_bits[~read].max() and row_bits.mean() == pytest.approx(table["weight_bits"])
    codes = word.tensors["weight"].abs().amax(dim=1).float()
    assert bool((codes <= row_ranges(row_bits, True)[1]).all()) and codes[read].min() > codes[~read].max()
    histogram = {int(b): n for b, n in table["row_bits"].items()}  # the report: rows per bit-width
    assert sum(histogram.values()) == 100 and histogram == {int(b): int((row_bits == b).sum()) for b in histogram}
    from mpqc.report import format_report
    assert f"rows at {min(histogram)}-{max(histogram)} bits" in format_report(report)

    inputs = (ids, mask)
    _assert_tvm_bit_exact(program, inputs)
    _assert_onnxruntime_agrees(program, inputs, tmp_path)


def test_table_rows_is_validated_and_left_out_of_old_runs_identities():
    with pytest.raises(ConfigError, match="table_rows must be one of"):
        mpqc.QuantizerConfig(table_rows="zipf")
    assert "table_rows" not in mpqc.CompileConfig().identity()["quantizers"]
    chosen = mpqc.CompileConfig(quantizers=mpqc.QuantizerConfig(table_rows="frequency")).identity()["quantizers"]
    assert chosen["table_rows"] == "frequency"


@pytest.mark.parametrize("command", ["compile", "sweep"])
def test_the_cli_passes_table_rows_into_the_config(command, monkeypatch):
    for flag, expected in (([], "uniform"), (["--table-rows", "frequency"], "frequency")):
        assert cli_config(command, flag, monkeypatch).quantizers.table_rows == expected
    with pytest.raises(SystemExit):
        cli_config(command, ["--table-rows", "zipf"], monkeypatch)
