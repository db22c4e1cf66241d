"""Any task (mpqc/task.py): a user's loss, forward and metric, label-free distillation, keyword inputs, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import mpqc
from conftest import quantized_graph
from mpqc.data import digits
from mpqc.errors import DataError, TaskError, TrainingDivergedError
from mpqc.report import format_report
from mpqc.search import search
from mpqc.task import Inputs, distillation, distillation_loss, resolve_task
from mpqc.train import evaluate

#: A short run: a few steps of each phase are enough to check the plumbing and the numbers.
SHORT = mpqc.CompileConfig(
    search=mpqc.TrainConfig(epochs=1, max_steps_per_epoch=12, quantizer_lr=0.05, checkpoint_every=5),
    finetune=mpqc.TrainConfig(epochs=1, max_steps_per_epoch=12, lr=0.005, penalty_weight=0.0, checkpoint_every=5),
    progress=False,
)


# --------------------------------------------------------------------------------------------- a denoiser
class Denoiser(nn.Module):
    """A small fully convolutional denoising network (conv + ReLU only, all in the integer program)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(16, 1, 3, padding=1))

    def forward(self, noisy: torch.Tensor) -> torch.Tensor:
        return self.body(noisy)


class NoisyDigits(Dataset):
    """Digits as ``{"noisy": clean + 0.5 * N(0, 1) (fixed seed), "clean": clean}``: no labels at all."""

    def __init__(self, train: bool) -> None:
        self.clean = digits(train=train).tensors[0]
        generator = torch.Generator().manual_seed(1 if train else 2)
        self.noisy = self.clean + 0.5 * torch.randn(self.clean.shape, generator=generator)

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"noisy": self.noisy[i], "clean": self.clean[i]}


def denoise_forward(model, batch):
    return model(batch["noisy"])


def denoise_loss(outputs, batch, teacher_outputs):
    return F.mse_loss(outputs, batch["clean"])


def psnr(outputs, batch):
    """PSNR in dB against the clean image over its value range (first key: maximised), and the MSE."""
    mse = F.mse_loss(outputs, batch["clean"])
    peak = float(batch["clean"].max() - batch["clean"].min())
    return {"psnr": float(10 * torch.log10(peak ** 2 / mse)), "mse": float(mse)}


@pytest.fixture(scope="module")
def denoising():
    torch.manual_seed(0)
    train = DataLoader(NoisyDigits(True), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(NoisyDigits(False), batch_size=128)
    model = Denoiser()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for batch in train:
            optimizer.zero_grad()
            denoise_loss(model(batch["noisy"]), batch, None).backward()
            optimizer.step()
    return model.eval(), (train, val)


def test_a_denoiser_compiles_end_to_end_with_a_user_loss_forward_and_metric(denoising, tmp_path):
    model, (train, val) = denoising
    example = next(iter(val))["noisy"][:2]
    result = mpqc.compile(copy.deepcopy(model), example, budget="avg-bits=4", data=(train, val), config=SHORT,
                          loss=denoise_loss, forward=denoise_forward, metric=psnr, out=tmp_path / "run")
    report = result.report
    assert report["budget"]["met"] and report["totals"]["average_weight_bits"] <= 4.0
    assert report["metric"]["name"] == "psnr" and report["metric"]["task"].endswith("denoise_loss")
    whole = val.dataset
    noisy_psnr = psnr(whole.noisy, {"clean": whole.clean})["psnr"]  # the noisy input's own PSNR
    fp32, integer = report["accuracy"]["fp32"], report["accuracy"]["integer_reference"]
    assert fp32 > noisy_psnr + 3  # the fp32 model denoises ...
    assert integer > fp32 - 1.5 and integer > noisy_psnr + 2  # ... and so does the 4-bit integer program
    assert report["metric"]["values"]["integer_reference"]["psnr"] == integer
    assert 0 < report["metric"]["values"]["integer_reference"]["mse"] < report["metric"]["values"]["fp32"]["mse"] * 2
    denoised = result(example)  # the integer program, returning the model's structure: one image tensor
    assert denoised.shape == example.shape and torch.equal(denoised, result.program.run(example))
    text = format_report(report)
    assert "psnr" in text and "top-1" not in text


# --------------------------------------------------------------------------------------------- distillation
def test_label_free_distillation_of_a_classifier_keeps_its_predictions(trained_small_cnn, digits_loaders):
    train_images = torch.cat([x for x, _ in digits_loaders[0]])
    val_images = digits_loaders[1].dataset.tensors[0]
    unlabeled = (DataLoader(TensorDataset(train_images), batch_size=64, shuffle=True,
                            generator=torch.Generator().manual_seed(0)),
                 DataLoader(TensorDataset(val_images), batch_size=128))  # batches of images only: (x,)
    fp32_top1 = evaluate(trained_small_cnn, digits_loaders[1])
    result = mpqc.compile(trained_small_cnn, val_images[:2], budget="avg-bits=4", data=unlabeled, config=SHORT)
    report = result.report
    assert report["metric"]["task"] == "distillation (auto)" and report["metric"]["name"] == "top-1 agreement"
    assert report["accuracy"]["fp32"] == 100.0  # the fp32 model agrees with itself
    assert report["accuracy"]["integer_reference"] >= 90.0
    assert report["metric"]["values"]["integer_reference"]["cosine to fp32"] > 0.95
    assert report["budget"]["met"]
    # Trained without a single label, the integer program still classifies the labelled digits.
    assert evaluate(result.program.run, digits_loaders[1]) >= fp32_top1 - 5.0


def test_distillation_rule_and_explicit_kinds():
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, 10), torch.randn(4, 10)
    kl = F.kl_div(F.log_softmax(logits, -1), F.softmax(teacher, -1), reduction="batchmean")
    torch.testing.assert_close(distillation_loss(logits, teacher), kl)  # 2-D: logits, KL
    features, teacher_features = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(distillation_loss({"f": features}, {"f": teacher_features}),
                               F.mse_loss(features, teacher_features) / teacher_features.pow(2).mean())
    cosine = 1 - F.cosine_similarity(logits, teacher, dim=1).mean()
    torch.testing.assert_close(distillation_loss((logits,), (teacher,), "cosine"), cosine)
    assert float(distillation_loss(logits, logits, "cosine")) == pytest.approx(0.0, abs=1e-6)
    inputs = Inputs(("x",))
    labelled = (torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    assert resolve_task(inputs, labelled, logits, loss=None, forward=None, metric=None).name == "classification"
    distilled = resolve_task(inputs, labelled, logits, loss="distill", forward=None, metric=None)
    assert distilled.name == "distillation (auto)"
    assert resolve_task(inputs, labelled[:1], logits, loss=None, forward=None, metric=None).metric_name \
        == "top-1 agreement"
    embedding = distillation(inputs, torch.randn(4, 384), kind="cosine")
    assert embedding.metric_name == "cosine to fp32"
    with pytest.raises(TaskError, match="distill-cosine"):
        resolve_task(inputs, labelled, logits, loss="distil", forward=None, metric=None)
    with pytest.raises(TaskError, match=r"\[batch, classes\]"):
        resolve_task(inputs, labelled, torch.randn(4, 1, 8, 8), loss=None, forward=None, metric=None)


def test_a_metric_with_a_third_parameter_gets_the_fp32_outputs():
    """``metric(outputs, batch, teacher_outputs)`` (an agreement metric of a user distillation) is evaluated against
    the fp32 model's outputs; a two-parameter metric is not given them."""
    torch.manual_seed(0)
    inputs, x = Inputs(("x",)), torch.randn(8, 5)
    teacher, student = nn.Linear(5, 3), nn.Linear(5, 3)
    loader = DataLoader(TensorDataset(x), batch_size=4)

    def agreement(outputs, batch, teacher_outputs):
        return {"cosine": float(F.cosine_similarity(outputs, teacher_outputs, dim=1).mean())}

    def plain(outputs, batch):
        return {"norm": float(outputs.norm())}

    def user_loss(outputs, batch, teacher_outputs):
        return F.mse_loss(outputs, teacher_outputs)

    for loss in (user_loss, "distill-cosine"):
        task = resolve_task(inputs, (x,), x @ torch.ones(5, 3), loss=loss, forward=None, metric=agreement)
        assert task.metric_uses_teacher
        task = task.checked(teacher, (x[:4],))
        assert task.metric_name == "cosine"
        assert evaluate(teacher, loader, task=task, teacher=teacher) == pytest.approx(1.0)
        with torch.no_grad():
            expected = float(F.cosine_similarity(student(x), teacher(x), dim=1).mean())
        assert evaluate(student, loader, task=task, teacher=teacher) == pytest.approx(expected, abs=1e-6)
        assert not resolve_task(inputs, (x,), x, loss=loss, forward=None, metric=plain).metric_uses_teacher


def test_batches_map_to_inputs_and_labels_by_one_rule():
    x, y, labels = torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, dtype=torch.long)
    one, two = Inputs(("x",)), Inputs(("x", "y"))
    assert one.split(x)[1] is None and one.split((x,))[1] is None and one.split((x, labels))[1] is labels
    assert two.split((x, y))[1] is None and two.split((x, y, labels))[0] == (x, y)
    assert two.split({"y": y, "x": x, "labels": labels}) == ((x, y), labels)
    assert two.positional((x,), {"y": y}) == (x, y)
    with pytest.raises(DataError, match="no model input 'y'"):
        two.split({"x": x})
    with pytest.raises(DataError, match="4 items"):
        two.split((x, y, labels, labels))


def test_a_distillation_search_resumes_exactly(trained_small_cnn, digits_loaders, tmp_path):
    example = digits_loaders[1].dataset.tensors[0][:2]
    images = DataLoader(TensorDataset(digits_loaders[0].dataset.tensors[0][:256]), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    task = distillation(Inputs(("x",)), trained_small_cnn(example))
    teacher = copy.deepcopy(trained_small_cnn)
    config = mpqc.TrainConfig(epochs=2, checkpoint_every=3, quantizer_lr=0.05)
    budget = mpqc.AverageBits(4)

    def run(stop_after: int | None, checkpoint):
        torch.manual_seed(0)
        gm, layers = quantized_graph(copy.deepcopy(trained_small_cnn), example)
        search(gm, budget, layers, images, config, checkpoint=checkpoint, teacher=teacher, progress=False,
               stop_after_steps=stop_after, task=task)
        return gm

    whole = run(None, None)
    run(5, tmp_path / "search.pt")  # interrupted mid-epoch ...
    resumed = run(None, tmp_path / "search.pt")  # ... and continued from its checkpoint
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------- keyword inputs
class TwoInputs(nn.Module):
    """A classifier of an image and a context image, called by keyword, returning a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.image_conv, self.context_conv = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(1, 16, 3, padding=1)
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(16 * 4 * 4, 10)

    def forward(self, image, scale=None, context=None):
        features = torch.relu(self.image_conv(image))
        if context is not None:
            features = features + torch.relu(self.context_conv(context))
        return {"logits": self.fc(torch.flatten(self.pool(features), 1))}


class DictDigits(Dataset):
    def __init__(self, dataset: TensorDataset) -> None:
        self.images, self.labels = dataset.tensors

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"context": self.images[i].flip(-1), "image": self.images[i], "labels": self.labels[i]}


def cross_entropy(outputs, batch, teacher_outputs):
    return F.cross_entropy(outputs["logits"], batch["labels"])


def top1(outputs, batch):
    return {"top-1": float((outputs["logits"].argmax(1) == batch["labels"]).float().mean() * 100)}


def test_a_model_with_keyword_inputs_and_dict_outputs_compiles(digits_loaders):
    torch.manual_seed(0)
    train = DataLoader(DictDigits(digits_loaders[0].dataset), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(DictDigits(digits_loaders[1].dataset), batch_size=128)
    model = TwoInputs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(4):
        for batch in train:
            optimizer.zero_grad()
            cross_entropy(model(image=batch["image"], context=batch["context"]), batch, None).backward()
            optimizer.step()
    model.eval()
    fp32 = next(iter(val))
    example = {"context": fp32["context"][:2], "image": fp32["image"][:2]}
    result = mpqc.compile(model, example, budget="avg-bits=6", data=(train, val), config=SHORT,
                          loss=cross_entropy, metric=top1)
    assert result.program.input_names == ["image", "context"]  # named, in forward's order
    assert result.report["metric"]["name"] == "top-1" and result.report["accuracy"]["fp32"] > 50
    assert result.report["accuracy"]["integer_reference"] > result.report["accuracy"]["fp32"] - 10
    outputs = result(image=fp32["image"], context=fp32["context"])
    assert set(outputs) == {"logits"}
    assert torch.equal(outputs["logits"], result.program.run(fp32["image"], fp32["context"]))


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def unlabeled(digits_loaders):
    images = digits_loaders[0].dataset.tensors[0][:128]
    return DataLoader(TensorDataset(images), batch_size=32)


def _compile(model, loader, **task):
    return mpqc.compile(model, loader.dataset.tensors[0][:2], budget="avg-bits=4", data=loader, config=SHORT,
                        **task)


def test_bad_task_callables_get_one_clear_error(trained_small_cnn, unlabeled):
    def per_example(outputs, batch, teacher_outputs):
        return (outputs - teacher_outputs).pow(2).mean(1)

    with pytest.raises(TaskError, match=r"first training batch.*loss .*per_example must return a scalar.*\(32,\)"):
        _compile(trained_small_cnn, unlabeled, loss=per_example)

    def nan_loss(outputs, batch, teacher_outputs):
        return outputs.sum() * float("nan")

    with pytest.raises(TaskError, match=r"first training batch.*loss .*nan_loss returned nan before any training"):
        _compile(trained_small_cnn, unlabeled, loss=nan_loss)

    calls = []

    def nan_later(outputs, batch, teacher_outputs):  # fine on the check and the first 2 steps, then NaN
        calls.append(1)
        return F.mse_loss(outputs, teacher_outputs) * (float("nan") if len(calls) > 3 else 1.0)

    with pytest.raises(TrainingDivergedError, match=r"search: the loss became nan at epoch 1, step 3 .*nan_later"):
        _compile(trained_small_cnn, unlabeled, loss=nan_later, metric=lambda outputs, batch: {"x": 1.0})

    def broken_forward(model, batch):
        raise KeyError("pixels")

    with pytest.raises(TaskError, match=r"batch 0: forward .*broken_forward raised KeyError: 'pixels'"):
        _compile(trained_small_cnn, unlabeled, forward=broken_forward)

    def no_tensor(model, batch):
        return {"classes": [1, 2]}

    with pytest.raises(TaskError, match="forward .*no_tensor returned no tensor"):
        _compile(trained_small_cnn, unlabeled, forward=no_tensor)

    def words(outputs, batch):
        return {"verdict": "fine"}

    with pytest.raises(TaskError, match="metric .*words must return a non-empty dict of numbers"):
        _compile(trained_small_cnn, unlabeled, metric=words)
    with pytest.raises(TaskError, match="metric .*must return"):
        _compile(trained_small_cnn, unlabeled, metric=lambda outputs, batch: {})
    with pytest.raises(DataError, match="data=None"):
        mpqc.compile(trained_small_cnn, torch.randn(2, 1, 8, 8), budget="avg-bits=4", data=None, loss="distill")


# --------------------------------------------------------------------------------------------- CLI and sweep
TASK_FILE = '''
import torch.nn.functional as F

def smooth_loss(outputs, batch, teacher_outputs):
    return F.cross_entropy(outputs, batch[1], label_smoothing=0.1)

def top1_and_nll(outputs, batch):
    return {"top-1 (smoothed)": float((outputs.argmax(1) == batch[1]).float().mean() * 100),
            "nll": float(F.cross_entropy(outputs, batch[1]))}
'''


def test_cli_takes_the_task_as_file_callables_and_report_names_the_metric(tmp_path, capsys, monkeypatch):
    from conftest import ROOT
    from mpqc.cli import main

    monkeypatch.chdir(ROOT)
    (tmp_path / "task.py").write_text(TASK_FILE)
    common = ["--model", "examples/models.py:small_cnn", "--data", "digits", "--budget", "avg-bits=4",
              "--search-epochs", "1", "--finetune-epochs", "1", "--steps-per-epoch", "4", "--batch-size", "32",
              "--no-progress"]
    assert main(["compile", *common, "--loss", f"{tmp_path}/task.py:smooth_loss",
                 "--metric", f"{tmp_path}/task.py:top1_and_nll", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    shown = capsys.readouterr().out
    assert "top-1 (smoothed)" in shown and "accuracy" not in shown.split("\n")[2]
    assert main(["compile", *common, "--loss", f"{tmp_path}/task.py:missing", "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err
    assert "--loss" in error and "'missing'" in error


def test_a_sweep_with_a_user_task_names_its_metric(denoising, tmp_path):
    from mpqc.sweep import format_sweep

    model, (train, val) = denoising
    example = next(iter(val))["noisy"][:2]
    result = mpqc.sweep(model, example, data=(train, val), budgets="avg-bits=4", methods="dq", act_bits=8,
                        uniform_bits=None, config=SHORT, out=tmp_path / "sweep", loss=denoise_loss,
                        forward=denoise_forward, metric=psnr)
    data = result.to_dict()
    assert data["metric"] == {"name": "psnr", "unit": ""} and data["fp32_top1"] > 10
    (point,) = result.points
    assert point.status == "done" and point.top1 > data["fp32_top1"] - 1.5
    text = format_sweep(data)
    assert "psnr" in text and "top-1" not in text
    assert (tmp_path / "sweep" / "pareto.png").stat().st_size > 0
