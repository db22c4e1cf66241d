"""``bench/latency.py``'s bookkeeping (its measurements are benchmarks, run by hand)."""
from __future__ import annotations

from conftest import load_script


def test_rounds_report_the_median_ratio_and_keep_every_round():
    """``--rounds 3``: the round whose mpqc/PyTorch-int8 ratio is the median is the case's row, and every round's
    times and ratio are kept; a round without a PyTorch int8 time sorts last; one round is returned as it is."""
    bench = load_script("bench/latency.py", "mpqc_bench_latency")

    def row(tvm_ms, torch_ms):
        ratio = tvm_ms / torch_ms if torch_ms else None
        return {"model": "m", "mpqc_tvm": {"median_ms": tvm_ms}, "torch_int8_fx": {"median_ms": torch_ms} if torch_ms
                else {"skipped": "x"}, **{e: {"skipped": "x"} for e in bench.ENGINES
                                          if e not in ("mpqc_tvm", "torch_int8_fx")},
                "mpqc_tvm_over_best_torch_int8": ratio}

    rounds = [row(30.0, 30.0), row(24.0, 30.0), row(35.0, 35.0 / 0.9)]
    median = bench.median_round(rounds)
    assert median["mpqc_tvm"]["median_ms"] == 35.0 and median["mpqc_tvm_over_best_torch_int8"] == 0.9
    assert [r["mpqc_tvm"] for r in median["rounds"]] == [30.0, 24.0, 35.0]
    assert [r["mpqc_tvm_over_best_torch_int8"] for r in median["rounds"]] == [1.0, 0.8, 0.9]
    assert bench.median_round([row(1.0, None), row(2.0, 4.0)])["mpqc_tvm"]["median_ms"] == 2.0
    single = row(1.0, 2.0)
    assert bench.median_round([single]) is single and "rounds" not in single
