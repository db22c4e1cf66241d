"""mpqc.sweep: budget parsing, the grid with its uniform reference, the Pareto front, and a tiny sweep on the digits
that runs end to end, resumes after an interruption without recomputing finished points, records infeasible and
failed points without aborting, and prints through ``mpqc report``."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import mpqc
from conftest import FAST, ROOT, cli_in_process
from conftest import example_batch as _example
from mpqc.budgets import AverageBits, BitOps, WeightMemory
from mpqc.errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from mpqc.layers import LayerInfo
from mpqc.sweep import (DONE, FAILED, INFEASIBLE, NOT_EXPRESSIBLE, PENDING, SWEEP_FORMAT, SweepPoint, format_sweep,
                        load_sweep, pareto_front, parse_sweep_budgets, plan_points)

sweep_module = importlib.import_module("mpqc.sweep")  # ``mpqc.sweep`` is the function
compile_module = importlib.import_module("mpqc.compile")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CONV = LayerInfo(name="conv", op="conv2d", weight_shape=(16, 1, 3, 3), params=144, bias_params=0, out_channels=16,
                 macs=144 * 64, input_shape=(1, 8, 8), output_shape=(16, 8, 8), input_elements=64,
                 output_elements=1024)
FC = LayerInfo(name="fc", op="linear", weight_shape=(10, 1024), params=10240, bias_params=10, out_channels=10,
               macs=10240, input_shape=(1024,), output_shape=(10,), input_elements=1024, output_elements=10)
LAYERS = [CONV, FC]
PARAMS = CONV.params + FC.params

#: A few steps per phase: the digits sweep below compiles 3 points in a few seconds.
TINY = dataclasses.replace(
    FAST, search=dataclasses.replace(FAST.search, epochs=1, max_steps_per_epoch=6, checkpoint_every=2),
    finetune=dataclasses.replace(FAST.finetune, epochs=1, max_steps_per_epoch=6, checkpoint_every=2))


# ------------------------------------------------------------------------------------------------ budgets
def test_weight_memory_in_bits_per_weight_bytes_and_uniform_costs():
    specs = parse_sweep_budgets("weight-memory=1.5b,2bpw,3 bits,640B,2KiB")
    assert [s.label for s in specs] == ["weight-memory=1.5bpw", "weight-memory=2bpw", "weight-memory=3bpw",
                                        "weight-memory=640B", "weight-memory=2KiB"]
    budgets = [s.resolve(LAYERS) for s in specs]
    assert all(isinstance(b, WeightMemory) for b in budgets)
    assert [b.bytes for b in budgets] == [PARAMS * 1.5 / 8, PARAMS * 2 / 8, PARAMS * 3 / 8, 640.0, 2048.0]

    bitops, = parse_sweep_budgets("bitops=W3A8")
    assert bitops.label == "bitops=W3A8"
    assert bitops.resolve(LAYERS) == BitOps(float((CONV.macs + FC.macs) * 3 * 8))
    avg = parse_sweep_budgets("avg-bits=2.5,W4A8")
    assert [b.resolve(LAYERS) for b in avg] == [AverageBits(2.5), AverageBits(4.0)]
    act = parse_sweep_budgets("activation-memory=1KiB,W2A4,sum")
    assert [b.label for b in act] == ["activation-memory=1KiB,sum", "activation-memory=W2A4,sum"]
    assert act[1].resolve(LAYERS).bytes == (CONV.input_elements + FC.input_elements) * 4 / 8


@pytest.mark.parametrize("text, match", [
    ("weight-memory", "KIND=V1,V2"), ("weight-memory=2b,,3b", "KIND=V1,V2"), ("flops=2G", "unknown budget kind"),
    ("weight-memory=2 parsecs", "cannot read"), ("weight-memory=0b", "positive"), ("flops=W2A8", "unknown budget"),
])
def test_bad_sweep_budgets_are_refused_naming_them(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_sweep_budgets(text)


# ------------------------------------------------------------------------------------------------ the grid
def test_uniform_reference_covers_the_budget_range_and_one_bit_is_planned():
    budgets = parse_sweep_budgets("weight-memory=1.0b,1.25b,1.5b,2b,3b,4b")
    points = plan_points(budgets, LAYERS, methods=["dq", "csq"], act_bits=[8, 4])
    uniform = [(p.uniform_bits, p.act_bits, p.budget) for p in points if p.method == "uniform"]
    assert uniform == [(b, a, f"weight-memory={b}bpw") for a in (8, 4) for b in (1, 2, 3, 4)]  # 8 bits: outside
    assert len(points) == 2 * (4 + 6 * 2)
    assert len({p.slug for p in points}) == len(points)
    w2 = next(p for p in points if p.method == "uniform" and p.uniform_bits == 2 and p.act_bits == 4)
    assert w2.budget_limit == PARAMS * 2 / 8 and w2.status == PENDING
    assert all(p.method == "uniform" or p.uniform_bits is None for p in points)
    assert not [p for p in plan_points(budgets, LAYERS, methods=["dq"], act_bits=[8], uniform_bits=())
                if p.method == "uniform"]


def test_uniform_points_for_bitops_are_shared_with_weight_memory_and_not_repeated():
    budgets = parse_sweep_budgets("weight-memory=2b,3b") + parse_sweep_budgets("bitops=W3A8")
    points = plan_points(budgets, LAYERS, methods=["dq"], act_bits=[8])
    assert [(p.method, p.budget) for p in points] == [
        ("uniform", "weight-memory=2bpw"), ("uniform", "weight-memory=3bpw"), ("dq", "weight-memory=2bpw"),
        ("dq", "weight-memory=3bpw"), ("dq", "bitops=W3A8")]
    with pytest.raises(ConfigError, match="same point more than once"):
        plan_points(parse_sweep_budgets("weight-memory=2b,2bpw"), LAYERS, methods=["dq"], act_bits=[8])


def _done(name: str, kib: float, top1: float, act_bits: int = 8, met: bool = True) -> SweepPoint:
    return SweepPoint(slug=name, method=name, budget="b", budget_text="weight-memory=1B", budget_kind="weight-memory",
                      budget_limit=1.0, budget_unit="B", act_bits=act_bits, status=DONE, budget_met=met,
                      weight_bytes=kib * 1024, top1=top1)


def test_pareto_front_per_activation_bits_among_points_that_met_their_budget():
    points = [_done("small", 60, 80.0), _done("mid", 70, 85.0), _done("dominated", 75, 84.0),
              _done("tie", 70, 85.0), _done("big", 90, 86.0), _done("same-size-worse", 90, 85.5),
              _done("over-budget", 50, 99.0, met=False), _done("a4", 75, 82.0, act_bits=4)]
    front = {p.slug for p in pareto_front(points)}
    assert front == {"small", "mid", "tie", "big", "a4"}


# ------------------------------------------------------------------------------------------------ end to end
def _tiny_sweep(model, loaders, out, **overrides):
    arguments = dict(data=loaders, budgets="weight-memory=1b,3b", methods="dq", act_bits=8, config=TINY, out=out)
    return mpqc.sweep(model, _example(loaders), **{**arguments, **overrides})


def test_tiny_sweep_runs_resumes_without_recomputing_and_reports(trained_small_cnn, digits_loaders, tmp_path,
                                                                 monkeypatch):
    out = tmp_path / "sweep"
    evaluations = {"n": 0}
    real_evaluate = compile_module.evaluate

    def interrupted_evaluate(*args, **kwargs):  # the 2nd compiled point stops after its training, before its report
        evaluations["n"] += 1
        if evaluations["n"] == 4:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(compile_module, "evaluate", interrupted_evaluate)
    with pytest.raises(KeyboardInterrupt):
        _tiny_sweep(trained_small_cnn, digits_loaders, out)
    interrupted = json.loads((out / "sweep.json").read_text())
    assert [(p["slug"], p["status"]) for p in interrupted["points"]] == [
        ("w1__weight-memory-1bpw__a8", NOT_EXPRESSIBLE), ("w2__weight-memory-2bpw__a8", DONE),
        ("w3__weight-memory-3bpw__a8", PENDING), ("dq__weight-memory-1bpw__a8", PENDING),
        ("dq__weight-memory-3bpw__a8", PENDING)]
    w2_report = out / "points" / "w2__weight-memory-2bpw__a8" / "report.json"
    w2_bytes = w2_report.read_bytes()
    w3 = out / "points" / "w3__weight-memory-3bpw__a8"
    assert (w3 / "checkpoints" / "finetune.pt").exists() and not (w3 / "report.json").exists()

    monkeypatch.setattr(compile_module, "evaluate", real_evaluate)
    with pytest.raises(CheckpointError, match="resume"):
        _tiny_sweep(trained_small_cnn, digits_loaders, out)
    compiled = []
    real_compile = sweep_module.compile

    def spy(*args, **kwargs):
        compiled.append(kwargs["out"].name)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "compile", spy)
    result = _tiny_sweep(trained_small_cnn, digits_loaders, out, resume=True)
    assert compiled == ["w3__weight-memory-3bpw__a8", "dq__weight-memory-1bpw__a8", "dq__weight-memory-3bpw__a8"]
    assert w2_report.read_bytes() == w2_bytes  # the finished point was read back, not recomputed

    data = json.loads((out / "sweep.json").read_text())
    assert data["format"] == SWEEP_FORMAT and data["fp32_top1"] > 70
    by_slug = {p["slug"]: p for p in data["points"]}
    assert by_slug["dq__weight-memory-1bpw__a8"]["status"] == INFEASIBLE
    assert by_slug["dq__weight-memory-1bpw__a8"]["smallest_feasible"]  # e.g. "1.24 KiB"
    assert "not" in by_slug["w1__weight-memory-1bpw__a8"]["message"] or "at least 2" in \
        by_slug["w1__weight-memory-1bpw__a8"]["message"]
    for slug in ("w2__weight-memory-2bpw__a8", "w3__weight-memory-3bpw__a8", "dq__weight-memory-3bpw__a8"):
        point = by_slug[slug]
        assert point["status"] == DONE and point["budget_met"] is True
        for key in ("method", "budget", "achieved", "top1", "drop", "wall_time_s", "weight_bytes", "act_bits"):
            assert point[key] is not None, (slug, key)
        assert point["drop"] == pytest.approx(point["fp32"] - point["top1"])
        assert point["achieved"] <= point["budget_limit"] * (1 + 1e-9)
    assert by_slug["dq__weight-memory-3bpw__a8"]["average_weight_bits"] <= 3.0
    assert data["pareto"] and all(by_slug[s]["pareto"] for s in data["pareto"])
    assert (out / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    assert [p.slug for p in result.pareto()] == data["pareto"]

    table = format_sweep(data)
    assert "infeasible" in table and "not-expressible" in table and "Pareto-optimal" in table
    assert load_sweep(out).to_dict()["points"] == data["points"]


def test_failed_point_is_recorded_and_a_bug_stops_the_sweep_naming_the_point(trained_small_cnn, digits_loaders,
                                                                           tmp_path, monkeypatch):
    real_compile = sweep_module.compile

    def diverging_csq(*args, **kwargs):
        if kwargs["method"] == "csq":
            raise TrainingDivergedError("search: the loss became nan")
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "compile", diverging_csq)
    result = _tiny_sweep(trained_small_cnn, digits_loaders, tmp_path / "a", budgets="weight-memory=4b",
                         methods="csq,dq", uniform_bits=None)
    assert [(p.method, p.status) for p in result.points] == [("csq", FAILED), ("dq", DONE)]
    assert "loss became nan" in result.points[0].message and "failed" in result.table()

    def buggy(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sweep_module, "compile", buggy)
    with pytest.raises(ZeroDivisionError) as caught:
        _tiny_sweep(trained_small_cnn, digits_loaders, tmp_path / "b", budgets="weight-memory=4b", uniform_bits=None)
    assert any("dq weight-memory=4bpw A8" in note for note in caught.value.__notes__)


def test_sweep_refuses_bad_arguments_and_a_different_sweep(trained_small_cnn, digits_loaders, tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        _tiny_sweep(trained_small_cnn, digits_loaders, tmp_path / "x", methods="dq,nope")
    with pytest.raises(ConfigError, match="a method or a uniform bit-width"):  # nothing to run
        _tiny_sweep(trained_small_cnn, digits_loaders, tmp_path / "x", methods=[], uniform_bits=None)
    only_uniform = _tiny_sweep(trained_small_cnn, digits_loaders, tmp_path / "u", methods=[],
                               budgets="weight-memory=4b", uniform_bits=(4,))  # a part of a bench: uniform QAT alone
    assert [(p.method, p.uniform_bits, p.status) for p in only_uniform.points] == [("uniform", 4, DONE)]
    with pytest.raises(DataError, match="val"):
        _tiny_sweep(trained_small_cnn, digits_loaders, tmp_path / "x", data=digits_loaders[0])
    out = tmp_path / "s"
    _tiny_sweep(trained_small_cnn, digits_loaders, out, budgets="weight-memory=1b", uniform_bits=None)
    with torch.no_grad():
        trained_small_cnn.fc.weight.mul_(0.5)
    with pytest.raises(CheckpointError, match="different sweep.*weights_sha256"):
        _tiny_sweep(trained_small_cnn, digits_loaders, out, budgets="weight-memory=1b", uniform_bits=None,
                    resume=True)
    forced = _tiny_sweep(trained_small_cnn, digits_loaders, out, budgets="weight-memory=1b", uniform_bits=None,
                         force=True)
    assert [p.status for p in forced.points] == [INFEASIBLE]


def test_cli_sweep_and_report(tmp_path, capsys, monkeypatch):
    env = {**os.environ, "MPQC_CACHE": str(tmp_path / "cache"), "PYTHONHASHSEED": "0"}
    run = ["sweep", "--model", "examples/models.py:small_cnn", "--data", "digits", "--pretrain-epochs", "2",
           "--method", "dq", "--budget", "weight-memory=1b,3b", "--act-bits", "8", "--uniform", "3",
           "--search-epochs", "1", "--finetune-epochs", "1", "--steps-per-epoch", "4", "--batch-size", "64",
           "--no-progress", "--out", str(tmp_path / "s")]
    done = subprocess.run([sys.executable, "-m", "mpqc", *run], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "infeasible" in done.stdout and "uniform W3" in done.stdout
    # the report and the refusals in this process (no process start-up each)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPQC_CACHE", env["MPQC_CACHE"])
    status, shown, err = cli_in_process(capsys, "report", str(tmp_path / "s"))
    assert status == 0, err
    # both finished points in the table and a Pareto front (which of them is on it is the 4-step training's call)
    assert "weight-memory=3bpw" in shown and "uniform W3" in shown
    front = shown.split("Pareto-optimal")[1]
    assert ("dq weight-memory=3bpw A8" in front or "uniform W3A8" in front) and "no finished point" not in front
    status, _, err = cli_in_process(capsys, *run)
    assert status == 2 and "--resume" in err
    status, _, err = cli_in_process(capsys, *[a if a != "weight-memory=1b,3b" else "weight-memory=3 parsecs"
                                              for a in run])
    assert status == 2 and "parsecs" in err


def test_parts_of_one_grid_merge_into_one_sweep_and_other_sweeps_are_refused(trained_small_cnn, digits_loaders,
                                                                           tmp_path):
    example = _example(digits_loaders)
    run = dict(data=digits_loaders, config=TINY, uniform_bits=None)
    first = mpqc.sweep(trained_small_cnn, example, budgets="weight-memory=3b", methods="dq", out=tmp_path / "a", **run)
    second = mpqc.sweep(trained_small_cnn, example, budgets="weight-memory=4b", methods="dq,fracbits",
                        out=tmp_path / "b", **run)
    merged = sweep_module.merge_sweeps([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    names = sorted(p.name for p in merged.points)
    assert names == sorted(p.name for p in first.points + second.points) and len(names) == 3
    assert all(p.status == DONE for p in merged.points) and merged.pareto()
    for point in merged.points:  # every run directory came along: a resumed sweep reads them back
        assert (tmp_path / "merged" / "points" / point.slug / "report.json").is_file()
    assert (tmp_path / "merged" / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in load_sweep(tmp_path / "merged").points] == [p.name for p in merged.points]
    with pytest.raises(CheckpointError, match="not empty"):
        sweep_module.merge_sweeps([tmp_path / "a"], tmp_path / "merged")
    other = dataclasses.replace(TINY, seed=1)
    mpqc.sweep(trained_small_cnn, example, budgets="weight-memory=3b", methods="dq", out=tmp_path / "c",
               data=digits_loaders, config=other, uniform_bits=None)
    with pytest.raises(CheckpointError, match="another sweep"):
        sweep_module.merge_sweeps([tmp_path / "a", tmp_path / "c"], tmp_path / "merged2")

    # The result files of parts run apart (bench/sweep.py and bench/accuracy.py --out) merge without their run
    # directories (--merge-results): the same checks, and the fp32 control they measured must be one.
    bench = _bench_sweep_module()
    files = {}
    for label, part in [("a", first), ("b", second), ("c", load_sweep(tmp_path / "c"))]:
        files[label] = tmp_path / f"{label}.json"
        bench.write_results(files[label], "accuracy", {"seed": 0}, False, part, [], 0.0,
                            control={"epochs": 25, "top1": 95.0, "wall_s": 1.0})
    result, control, settings, quick = bench.merge_results([files["a"], files["b"]], tmp_path / "from-results")
    assert sorted(p.name for p in result.points) == names and all(p.status == DONE for p in result.points)
    assert control["top1"] == 95.0 and settings["grid"].startswith("merged from") and quick is False
    assert (tmp_path / "from-results-merged" / "pareto.png").read_bytes().startswith(PNG_SIGNATURE)
    bench.report("accuracy", tmp_path / "merged.json", settings, quick, result, lambda points: [], "goals", 0.0, "",
                 control)
    written = json.loads((tmp_path / "merged.json").read_text())
    assert written["mode"] == "full" and written["fp32_control"]["top1"] == 95.0
    assert len(written["sweep"]["points"]) == 3  # drops against the parts' control, not each part's fp32 start
    assert all(row["drop"] == pytest.approx(95.0 - row["top1"]) for row in written["sweep"]["points"])
    with pytest.raises(SystemExit, match=r"c\.json is another sweep than .*a\.json \(config differ"):
        bench.merge_results([files["a"], files["c"]], tmp_path / "from-results")
    bench.write_results(files["b"], "accuracy", {"seed": 0}, False, second, [], 0.0,
                        control={"epochs": 25, "top1": 94.0, "wall_s": 1.0})
    with pytest.raises(SystemExit, match="different fp32 controls"):
        bench.merge_results([files["a"], files["b"]], tmp_path / "from-results")
    (tmp_path / "from-results-merged" / "points").mkdir()  # not only an earlier merge: left alone
    with pytest.raises(SystemExit, match="holds more than an earlier merge"):
        bench.merge_results([files["a"]], tmp_path / "from-results")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="other.json is not a sweep benchmark's result file"):
        bench.merge_results([files["a"], tmp_path / "other.json"], tmp_path / "from-results")


def _bench_sweep_module():
    """bench/sweep.py (the helpers of the sweep benchmarks), imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "bench" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_methods_new_default_does_not_relabel_its_earlier_points(trained_small_cnn, digits_loaders, tmp_path,
                                                                   monkeypatch):
    """Kernel-wise FracBits' default penalty became the linear hinge: a sweep resumed over, or a result file merged
    with, its points searched with the squared penalty must not pass them off as today's fracbits-kernel."""
    from mpqc.quantizers import METHODS, MethodDefaults

    example, bench = _example(digits_loaders), _bench_sweep_module()
    run = dict(data=digits_loaders, config=TINY, uniform_bits=None, budgets="weight-memory=3b")
    hinge_default = METHODS["fracbits-kernel"]
    monkeypatch.setitem(METHODS, "fracbits-kernel", dataclasses.replace(hinge_default, defaults=MethodDefaults()))
    earlier = mpqc.sweep(trained_small_cnn, example, methods="fracbits-kernel", out=tmp_path / "old", **run)
    assert earlier.points[0].status == DONE and earlier.points[0].penalty_power == 2.0
    monkeypatch.setitem(METHODS, "fracbits-kernel", hinge_default)

    resumed = mpqc.sweep(trained_small_cnn, example, methods="fracbits-kernel", out=tmp_path / "old", resume=True,
                         **run)
    assert resumed.points[0].status == FAILED
    assert "search.penalty_power: (unset) there, 1.0 now" in resumed.points[0].message
    assert "delete it to rerun" in resumed.points[0].message

    files = {"old": tmp_path / "old.json", "dq": tmp_path / "dq.json", "variant": tmp_path / "variant.json"}
    before_recorded = [dataclasses.replace(p, penalty_power=None) for p in earlier.points]  # rows written before
    bench.write_results(files["old"], "accuracy", {"seed": 0}, False,  # the power was recorded
                        dataclasses.replace(earlier, points=before_recorded), [], 0.0)
    dq = mpqc.sweep(trained_small_cnn, example, methods="dq", out=tmp_path / "dq", **run)
    bench.write_results(files["dq"], "accuracy", {"seed": 0}, False, dq, [], 0.0)
    with pytest.raises(SystemExit, match=r"fracbits-kernel weight-memory=3bpw A8 in .*old\.json: penalty power 2, "
                                         r"this table's fracbits-kernel 1"):
        bench.merge_results([files["dq"], files["old"]], tmp_path / "merged")
    # a part run with --penalty-power 1 (the hinge as a variant, before it was the default) joins the table
    hinge = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, penalty_power=1.0))
    variant = mpqc.sweep(trained_small_cnn, example, methods="fracbits-kernel", out=tmp_path / "variant",
                         **dict(run, config=hinge))
    bench.write_results(files["variant"], "accuracy", {"seed": 0}, False, variant, [], 0.0)
    result, _, settings, _ = bench.merge_results([files["dq"], files["variant"]], tmp_path / "merged")
    assert sorted(p.method for p in result.points) == ["dq", "fracbits-kernel"]
    assert settings["penalty_powers"] == {"dq": 2.0, "fracbits-kernel": 1.0}
