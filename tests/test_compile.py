"""End to end: mpqc.compile through the Python API and the CLI, exact resume after a kill, and bad input."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import mpqc
from conftest import FAST, ROOT, cli_in_process, example_models
from conftest import example_batch as _example
from mpqc.errors import (CaptureError, CheckpointError, ConfigError, DataError, ExampleInputError,
                         InfeasibleBudgetError)
from mpqc.reference import IntegerProgram
from mpqc.report import load_report



def test_compile_meets_a_tight_budget_and_saves_everything(trained_small_cnn, digits_loaders, tmp_path):
    result = mpqc.compile(trained_small_cnn, _example(digits_loaders), budget=mpqc.AverageBits(3.0),
                          data=digits_loaders, method="dq", config=FAST)
    report = result.report
    assert report["budget"]["met"] and report["budget"]["achieved"] <= 3.0
    assert report["totals"]["average_weight_bits"] <= 3.0
    assert all(2 <= layer["weight_bits"] <= 8 for layer in report["layers"])
    accuracy = report["accuracy"]
    assert accuracy["fp32"] > 80
    assert accuracy["quantized"] > 60, accuracy
    assert abs(accuracy["integer_reference"] - accuracy["quantized"]) < 2.0, accuracy

    result.save(tmp_path / "run")
    for name in ("report.json", "bits.png", "program.json", "program.pt", "finetuned.pt", "run.json",
                 "checkpoints/search.pt", "checkpoints/finetune.pt"):
        assert (tmp_path / "run" / name).exists(), name
    loaded = mpqc.CompiledModel.load(tmp_path / "run")
    x = _example(digits_loaders)
    assert torch.equal(loaded(x), result(x))
    assert load_report(tmp_path / "run")["layers"] == report["layers"]


def test_tight_budget_lowers_bits_and_loose_budget_does_not(trained_small_cnn, digits_loaders):
    tight = mpqc.compile(trained_small_cnn, _example(digits_loaders), budget="avg-bits=3", data=digits_loaders,
                         config=FAST)
    loose = mpqc.compile(trained_small_cnn, _example(digits_loaders), budget="avg-bits=8", data=digits_loaders,
                         config=FAST)
    assert tight.report["totals"]["average_weight_bits"] <= 3.0
    assert loose.report["totals"]["average_weight_bits"] >= 7.0
    searched_tight = [layer["weight_bits_search"] for layer in tight.report["layers"]]
    searched_loose = [layer["weight_bits_search"] for layer in loose.report["layers"]]
    assert all(t < l for t, l in zip(searched_tight, searched_loose))


def _cli(*args, cwd=ROOT):
    """``python -m mpqc ARGS`` in a fresh process (what a user runs; a kill needs a process of its own)."""
    return subprocess.run([sys.executable, "-m", "mpqc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})


CLI_RUN = ["compile", "--model", "examples/models.py:small_cnn", "--data", "digits", "--budget", "avg-bits=4",
           "--search-epochs", "2", "--finetune-epochs", "2", "--batch-size", "32", "--checkpoint-every", "5",
           "--quantizer-lr", "0.05", "--no-progress"]


@pytest.fixture(scope="module")
def uninterrupted_cli_run(tmp_path_factory):
    """One ``mpqc compile`` of ``CLI_RUN`` run to the end in its own process: its run directory and the process.
    Read-only for the tests that share it."""
    out = tmp_path_factory.mktemp("cli") / "uninterrupted"
    done = _cli(*CLI_RUN, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done


def test_cli_compile_and_report(uninterrupted_cli_run, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, done = uninterrupted_cli_run
    assert "conv1" in done.stdout and "fc" in done.stdout
    status, shown, err = cli_in_process(capsys, "report", str(out))
    assert status == 0, err
    for word in ("conv1", "conv2", "fc", "avg-bits", "met"):
        assert word in shown
    # The same --out again is refused without --resume or --force, and a different run is refused outright.
    status, _, err = cli_in_process(capsys, *CLI_RUN, "--out", str(out))
    assert status == 2 and "--resume" in err
    status, _, err = cli_in_process(capsys, *[a if a != "avg-bits=4" else "avg-bits=5" for a in CLI_RUN], "--out",
                               str(out), "--resume")
    assert status == 2 and "different run" in err and "budget" in err


def _kill_at_step(process, checkpoint, step, timeout=300):
    """SIGKILL ``process`` as soon as ``checkpoint`` records global step >= ``step``."""
    from mpqc.checkpoint import load_checkpoint

    deadline = time.time() + timeout
    while True:
        if process.poll() is not None:
            pytest.fail(f"the run ended before step {step} of {checkpoint.name}: {process.stderr.read()}")
        if time.time() > deadline:
            process.kill()
            pytest.fail(f"{checkpoint} never reached step {step}")
        try:
            state = load_checkpoint(checkpoint)
        except Exception:  # the file may be replaced while we read it; the next poll sees the new one
            state = None
        if state is not None and state["epoch"] * STEPS_PER_EPOCH + state["step_in_epoch"] >= step:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.005)


STEPS_PER_EPOCH = 45  # 1437 digits training images, batch 32


def test_kills_at_random_steps_in_search_and_fine_tuning_then_resume_equal_an_uninterrupted_run(
        uninterrupted_cli_run, tmp_path):
    rng = random.Random()
    search_step, finetune_step = rng.randrange(5, 85, 5), rng.randrange(5, 85, 5)
    uninterrupted, _ = uninterrupted_cli_run

    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "mpqc", *CLI_RUN, "--out", str(out)]
    popen = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                 env={**os.environ, "PYTHONHASHSEED": "0"})
    _kill_at_step(subprocess.Popen(command, **popen), out / "checkpoints" / "search.pt", search_step)
    assert not (out / "checkpoints" / "finetune.pt").exists(), f"killed after the search (step {search_step})"
    _kill_at_step(subprocess.Popen([*command, "--resume"], **popen), out / "checkpoints" / "finetune.pt",
                  finetune_step)
    assert not (out / "report.json").exists(), f"killed after fine-tuning (step {finetune_step})"
    resumed = _cli(*CLI_RUN, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    expected, actual = IntegerProgram.load(uninterrupted), IntegerProgram.load(out)
    context = f"killed at search step {search_step} and fine-tuning step {finetune_step}"
    assert actual.layer_bits() == expected.layer_bits(), context
    for mine, theirs in zip(actual.nodes, expected.nodes):
        assert mine.attrs == theirs.attrs, context
        for key in theirs.tensors:
            assert torch.equal(mine.tensors[key], theirs.tensors[key]), f"{mine.name}.{key}, {context}"
    assert load_report(out)["accuracy"] == load_report(uninterrupted)["accuracy"], context


# ------------------------------------------------------------------------------------------------ bad input
class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_bad_inputs_get_one_clear_error(trained_small_cnn, digits_loaders, tmp_path):
    x = _example(digits_loaders)
    with pytest.raises(CaptureError, match="DataDependent"):
        mpqc.compile(DataDependent(), torch.randn(2, 4), budget="avg-bits=4", data=digits_loaders, config=FAST)
    with pytest.raises(ExampleInputError):
        mpqc.compile(trained_small_cnn, torch.randn(2, 3, 8, 8), budget="avg-bits=4", data=digits_loaders, config=FAST)
    with pytest.raises(ConfigError, match="unknown method 'hawq'"):
        mpqc.compile(trained_small_cnn, x, budget="avg-bits=4", data=digits_loaders, method="hawq", config=FAST)
    with pytest.raises(ConfigError, match="unknown budget kind 'energy'"):
        mpqc.compile(trained_small_cnn, x, budget="energy=3mJ", data=digits_loaders, config=FAST)
    with pytest.raises(InfeasibleBudgetError, match=r"smallest achievable is 2\.000 bits"):
        mpqc.compile(trained_small_cnn, x, budget="avg-bits=1.5", data=digits_loaders, config=FAST,
                     out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # nothing written: the next try with another budget is not blocked
    with pytest.raises(DataError, match="data=None"):
        mpqc.compile(trained_small_cnn, x, budget="avg-bits=4", data=None, config=FAST)
    bad_labels = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.full((8,), 12)), batch_size=4)
    with pytest.raises(DataError, match="12"):
        mpqc.compile(trained_small_cnn, x, budget="avg-bits=4", data=(bad_labels, None), config=FAST)
    empty = DataLoader(TensorDataset(torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="empty"):
        mpqc.compile(trained_small_cnn, x, budget="avg-bits=4", data=(empty, None), config=FAST)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("not a run")
    with pytest.raises(CheckpointError, match="not empty"):
        mpqc.compile(trained_small_cnn, x, budget="avg-bits=4", data=digits_loaders, config=FAST,
                     out=tmp_path / "busy")


def test_cli_bad_model_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    status, _, err = cli_in_process(capsys, "compile", "--model", "examples/nope.py:net", "--data", "digits", "--budget",
                               "avg-bits=4", "--out", str(tmp_path / "x"))
    assert status == 2 and "examples/nope.py does not exist" in err
    status, _, err = cli_in_process(capsys, "compile", "--model", "examples/models.py:nothing", "--data", "digits",
                               "--budget", "avg-bits=4", "--out", str(tmp_path / "x"))
    assert status == 2 and "no callable named 'nothing'" in err
    status, _, err = cli_in_process(capsys, "compile", "--model", "examples/models.py:small_cnn", "--data", "digits",
                               "--budget", "weight-memory=12parsecs", "--out", str(tmp_path / "x"))
    assert status == 2 and "12parsecs" in err


class ShapeBranch(torch.nn.Module):
    """fx cannot trace the branch on the input shape; torch.export can."""

    def __init__(self):
        super().__init__()
        self.net = example_models.small_cnn()

    def forward(self, x):
        if x.shape[-1] > 4:
            return self.net(x)
        return self.net(x) * 2


def test_a_model_captured_through_torch_export_compiles_end_to_end(digits_loaders):
    result = mpqc.compile(ShapeBranch(), _example(digits_loaders), budget="avg-bits=4", data=digits_loaders,
                          config=FAST)
    assert result.report["budget"]["met"]
    ops = [node.op for node in result.program.nodes]
    assert ops.count("conv2d") == 2 and ops.count("linear") == 1 and ops.count("quantize") == 3
    x = _example(digits_loaders)
    assert result.graph(x).argmax(1).tolist() == result(x).argmax(1).tolist()


def test_unsupported_ops_are_refused_before_training(digits_loaders, tmp_path):
    from mpqc.errors import UnsupportedOpError

    class Tanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x)).amax((2, 3)))

    with pytest.raises(UnsupportedOpError, match="tanh") as error:
        mpqc.compile(Tanh(), _example(digits_loaders), budget="avg-bits=4", data=digits_loaders, config=FAST,
                     out=tmp_path / "run")
    assert "amax" in str(error.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused up front, before any search step


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_checkpoint(trained_small_cnn, digits_loaders, tmp_path):
    from mpqc.checkpoint import load_checkpoint
    from mpqc.errors import TrainingDivergedError

    images, labels = next(iter(DataLoader(digits_loaders[0].dataset, batch_size=256)))
    images = images.clone()
    images[128:] = float("nan")  # batches 3 and 4 (of 64) poison the loss
    poisoned = DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=False)
    config = mpqc.CompileConfig(search=mpqc.TrainConfig(epochs=1, checkpoint_every=1), progress=False)
    with pytest.raises(TrainingDivergedError, match="step 3"):
        mpqc.compile(trained_small_cnn, _example(digits_loaders), budget="avg-bits=4", data=(poisoned, None),
                     config=config, out=tmp_path / "run")
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "search.pt")
    assert kept["step_in_epoch"] == 2
    assert all(bool(torch.isfinite(t).all()) for t in kept["model"].values() if t.is_floating_point())
