"""A fast subset of the model-zoo sweep (bench/zoo.py, issue 7): every stage is "ok" or "clear error", never "FAIL"."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_zoo():
    spec = importlib.util.spec_from_file_location("mpqc_bench_zoo", ROOT / "bench" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()

FAST_MODELS = ["resnet18", "mobilenet_v2", "squeezenet1_0", "mobilenet_v3_small", "data_dependent_if",
               "shape_dependent_if"]


@pytest.mark.parametrize("name", FAST_MODELS)
def test_zoo_model_never_fails(name):
    results = zoo.run_model(name, tvm=False)
    assert list(results) == zoo.STAGES
    table = zoo.format_table({name: results})
    for stage, entry in results.items():
        assert entry["status"] in ("ok", "clear error", "-"), f"{name}/{stage}: {entry['message']}\n{table}"
    statuses = [results[s]["status"] for s in zoo.STAGES]
    # after the first stage that is not ok, every later stage is skipped
    first_bad = next((i for i, s in enumerate(statuses) if s != "ok"), len(statuses))
    assert all(s == "-" for s in statuses[first_bad + 1:]), table
    assert results["tvm"]["status"] == "-"


def test_data_dependent_control_flow_is_a_clear_capture_error():
    results = zoo.run_model("data_dependent_if")
    assert results["capture"]["status"] == "clear error"
    assert results["capture"]["message"].startswith("CaptureError:")
    assert "torch.fx.symbolic_trace failed" in results["capture"]["detail"]
    assert "torch.export" in results["capture"]["detail"]


def test_shape_dependent_control_flow_goes_through_torch_export():
    from torch.fx import symbolic_trace

    with pytest.raises(Exception):  # the premise: torch.fx alone cannot trace it
        symbolic_trace(zoo.ShapeDependentIf())
    results = zoo.run_model("shape_dependent_if")
    assert all(results[s]["status"] == "ok" for s in zoo.STAGES if s != "tvm"), zoo.format_table(
        {"shape_dependent_if": results})
    assert results["integer"]["argmax_agreement"] >= zoo.ARGMAX_FLOOR


def test_supported_models_pass_every_numeric_check():
    """resnet18, squeezenet1_0 and mobilenet_v3_small (hardswish tables, squeeze-excitation products) are in the
    integer contract's op set: all stages ok."""
    for name in ("resnet18", "squeezenet1_0", "mobilenet_v3_small"):
        results = zoo.run_model(name)
        assert all(results[s]["status"] == "ok" for s in zoo.STAGES if s != "tvm"), zoo.format_table({name: results})
        assert results["integer"]["step_max_lsb"] <= 1
        assert results["integer"]["step_flip_fraction"] <= zoo.CODE_FLIP_FLOOR


@pytest.mark.slow  # a minute or two each with TVM; the fast suite runs mobilenet_v3_small without TVM (FAST_MODELS)
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5"])
def test_modern_cnns_pass_every_stage_tvm_included(name):
    """Hardswish and SiLU as lookup tables, squeeze-excitation products, stochastic depth, channel shuffles
    (issue 14): every stage ok, onnxruntime within the contract, TVM bit-exact."""
    results = zoo.run_model(name, tvm=True)
    assert all(results[s]["status"] == "ok" for s in zoo.STAGES), zoo.format_table({name: results})



def test_parts_merge_into_one_table(tmp_path):
    """``--merge``: a model in two parts keeps the later part's verdicts and run (commit, wall time, batch), the models
    ``--all`` names that no part holds are listed as not run, and a table of other stages is refused."""
    def part(name: str, models: dict[str, str], batch: int) -> str:
        results = {m: {s: {"status": status, "message": "", "seconds": 1.0} for s in zoo.STAGES}
                   for m, status in models.items()}
        runs = {m: {"commit": name, "wall_seconds": 2.0} for m in models}
        path = tmp_path / f"{name}.json"
        zoo._dump(path, {"format": "mpqc-zoo/1", "stages": zoo.STAGES, "settings": {"tvm": True, "batch": batch},
                         "models": results,
                         "runs": runs, "not_run": []})
        return str(path)

    first, second = part("a", {"resnet18": "FAIL", "alexnet": "ok"}, 4), part("b", {"resnet18": "ok"}, 1)
    out = tmp_path / "all.json"
    skip = ",".join(m for m in zoo.every_torchvision_classifier() if m not in ("resnet18", "alexnet", "vgg11"))
    assert zoo.main(["--merge", first, second, "--all", "--skip", skip, "--out", str(out)]) == 0
    merged = zoo.json.loads(out.read_text())
    assert merged["models"]["resnet18"]["tvm"]["status"] == "ok" and merged["runs"]["resnet18"]["commit"] == "b"
    assert merged["runs"]["alexnet"] == {"commit": "a", "wall_seconds": 2.0, "part": "a.json", "batch": 4}
    assert merged["runs"]["resnet18"]["batch"] == 1 and merged["settings"]["batch"] == [1, 4]
    assert merged["not_run"] == ["vgg11"] and merged["settings"]["merged_from"] == ["a.json", "b.json"]
    bad = tmp_path / "old.json"
    bad.write_text(zoo.json.dumps({"format": "mpqc-zoo/1", "stages": zoo.STAGES[:-1], "models": {}, "not_run": []}))
    with pytest.raises(SystemExit, match="not an mpqc-zoo/1 table"):
        zoo.main(["--merge", str(bad), "--out", str(out)])
