"""mpqc.report: JSON round trip, PNG plot, terminal table, load errors, unit helpers."""
from __future__ import annotations

import json

import matplotlib.image
import pytest

from mpqc.errors import CheckpointError, ConfigError
from mpqc.report import (REPORT_FORMAT, format_report, human_bytes, human_count, load_report, plot_bits,
                         save_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _layer(i: int, n: int) -> dict:
    fixed = i in (0, n - 1)
    return {"name": "conv1" if i == 0 else "fc" if i == n - 1 else f"layer{i % 3 + 1}.{i}.conv{i % 2 + 1}",
            "op": "linear" if i == n - 1 else "conv2d", "params": 144 if i == 0 else 2304 * (1 + i % 4),
            "macs": 112896 * (1 + i % 3), "input_elements": 784, "output_elements": 12544,
            "weight_bits": 8 if fixed else 1 + i % 4, "activation_bits": 8 if fixed else 4 + i % 5,
            "weight_bits_search": 8.0 if fixed else 1.3 + i % 4, "activation_bits_search": 8.0 if fixed else 4.2 + i % 5,
            "fixed": fixed}


def sample_report(n_layers: int = 8, met: bool = True) -> dict:
    return {
        "format": REPORT_FORMAT, "model": "resnet20", "method": "dq", "created": "2026-11-24T08:00:00Z",
        "budget": {"kind": "weight-memory", "text": "weight-memory=20KiB", "limit": 20480.0, "unit": "B",
                   "achieved": 19876.0 if met else 21876.0, "search_final": 20011.3, "met": met},
        "totals": {"params": 270000, "macs": 40000000, "weight_bytes": 19876.0, "fp32_weight_bytes": 1080000.0,
                   "activation_bytes_max": 12544.0, "activation_bytes_sum": 80000.0, "bitops": 1.2e9,
                   "average_weight_bits": 1.98, "average_activation_bits": 7.1},
        "accuracy": {"fp32": 93.1, "quantized": 92.4, "integer_reference": None},
        "layers": [_layer(i, n_layers) for i in range(n_layers)],
        "wall_time_s": {"search": 100.0, "finetune": 50.0, "total": 160.0},
        "cost": {"fpga-latency-ms": 1.5},
    }


def _assert_png(path, min_width: int = 400) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 300 <= height <= 4000 and min_width <= width <= 20000


def test_save_load_round_trip(tmp_path):
    report = sample_report()
    save_report(report, tmp_path / "run")
    assert load_report(tmp_path / "run") == report
    assert load_report(tmp_path / "run" / "report.json") == report
    assert json.loads((tmp_path / "run" / "report.json").read_text())["format"] == REPORT_FORMAT
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["bits.png", "report.json"]  # no temp files
    _assert_png(tmp_path / "run" / "bits.png")


def test_save_overwrites_and_adds_missing_format(tmp_path):
    save_report(sample_report(), tmp_path)
    report = sample_report(n_layers=3)
    del report["format"]
    save_report(report, tmp_path)
    assert load_report(tmp_path) == {"format": REPORT_FORMAT, **report}


def test_save_refuses_other_format(tmp_path):
    with pytest.raises(ConfigError, match="mpqc-report/0"):
        save_report({**sample_report(), "format": "mpqc-report/0"}, tmp_path)


def test_plot_many_layers(tmp_path):
    plot_bits(sample_report(n_layers=80), tmp_path / "bits.png")
    _assert_png(tmp_path / "bits.png", min_width=2000)  # width grows with the layer count


def test_plot_sparse_report(tmp_path):
    plot_bits({"format": REPORT_FORMAT, "layers": []}, tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png")
    layer = {"name": "fc", "weight_bits": 4, "activation_bits": None}
    plot_bits({"format": REPORT_FORMAT, "layers": [layer]}, tmp_path / "one.png")
    _assert_png(tmp_path / "one.png")


def test_format_report_contents():
    report = sample_report()
    text = format_report(report)
    for layer in report["layers"]:
        assert layer["name"] in text
    for expected in ("weight-memory=20KiB", "19.41 KiB", "20.00 KiB", "met", "93.10", "92.40", "drop 0.70",
                     "1.20 G", "40.0 M", "1.98"):
        assert expected in text
    assert "NOT MET" not in text
    assert "NOT MET" in format_report(sample_report(met=False))


def test_format_report_columns_aligned():
    lines = format_report(sample_report()).splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#"))
    table = lines[header:header + 2 + 8]
    params_end = table[0].index("params") + len("params")
    assert all(row[params_end - 1].isalnum() for row in table[2:])  # right-aligned under the header


def test_format_report_missing_optional_keys():
    report = sample_report()
    report["accuracy"] = None
    del report["wall_time_s"], report["totals"]["bitops"], report["budget"]["search_final"]
    text = format_report(report)
    assert "accuracy  n/a" in text and "n/a BitOPs" in text
    minimal = format_report({"format": REPORT_FORMAT, "model": "m", "layers": []})
    assert "n/a" in minimal and "no layers" in minimal


def test_load_missing(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        load_report(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=str(tmp_path)):  # a directory without report.json
        load_report(tmp_path)


def test_load_garbage_json(tmp_path):
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=str(tmp_path / "report.json")):
        load_report(tmp_path)


@pytest.mark.parametrize("content", [{"format": "mpqc-report/2"}, {"model": "m"}, [1, 2]])
def test_load_wrong_format(tmp_path, content):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=str(path)):
        load_report(path)


@pytest.mark.parametrize("n, text", [(0, "0 B"), (512, "512 B"), (1536, "1.50 KiB"), (19876, "19.41 KiB"),
                                     (1080000, "1.03 MiB"), (3 * 2**30, "3.00 GiB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("n, text", [(144, "144"), (1.98, "1.98"), (270000, "270 k"), (4e7, "40.0 M"),
                                     (1.2e9, "1.20 G"), (999_999, "1.00 M"), (float("nan"), "n/a")])
def test_human_count(n, text):
    assert human_count(n) == text
