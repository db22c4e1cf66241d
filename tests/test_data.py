"""Data loading (mpqc.data) and the example models (examples/models.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.fx
from torch.utils.data import DataLoader, TensorDataset

from mpqc import data
from mpqc.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def _load_examples_models() -> ModuleType:
    """Import examples/models.py by file path, the way the CLI loads ``examples/models.py:resnet20``."""
    spec = importlib.util.spec_from_file_location("mpqc_examples_models", REPO / "examples" / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _load_examples_models()

needs_fashion_mnist = pytest.mark.skipif(
    not data.FASHION_MNIST_DIR.is_dir(),
    reason=f"{data.FASHION_MNIST_DIR} is absent: install with `apt-get install dataset-fashion-mnist` (CI does)",
)


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


@needs_fashion_mnist
def test_fashion_mnist_loads_from_debian_files_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MPQC_CACHE", str(tmp_path))
    train = data.fashion_mnist(train=True)
    test = data.fashion_mnist(train=False)

    assert (len(train), len(test)) == (60000, 10000)
    image, label = train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    raw = tmp_path / "datasets" / "FashionMNIST" / "raw"
    expected = {name.removesuffix(".gz") for name in data.FASHION_MNIST_FILES}
    assert {p.name for p in raw.iterdir()} == expected  # no temporary files left behind

    # A second call reuses the cache instead of unpacking again.
    mtimes = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    data.fashion_mnist(train=True)
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == mtimes


@needs_fashion_mnist
def test_fashion_mnist_is_normalised(tmp_path):
    train = data.fashion_mnist(tmp_path, train=True)
    images = torch.stack([train[i][0] for i in range(2000)])
    assert abs(images.mean().item()) < 0.1
    assert abs(images.std().item() - 1.0) < 0.1


def test_fashion_mnist_missing_debian_files_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="install with `apt-get install dataset-fashion-mnist`"):
        data.fashion_mnist(tmp_path / "cache", train=True)


# --------------------------------------------------------------------------------------------------------------
# digits


def test_digits_split_sizes_shapes_and_normalisation():
    train, val = data.digits(train=True), data.digits(train=False)
    assert (len(train), len(val)) == (1437, 360)
    images, labels = train.tensors
    assert images.shape == (1437, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    torch.testing.assert_close(images.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(images.std(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_digits_split_is_deterministic_and_disjoint():
    first, second = data.digits(train=True), data.digits(train=True)
    assert torch.equal(first.tensors[0], second.tensors[0])
    train_rows = {tuple(row.tolist()) for row in first.tensors[0].flatten(1)}
    val_rows = {tuple(row.tolist()) for row in data.digits(train=False).tensors[0].flatten(1)}
    assert len(train_rows & val_rows) <= 5  # the digits set has a few duplicate images, never a shared split


# --------------------------------------------------------------------------------------------------------------
# loaders


def test_loaders_subset_sizes():
    train, val = data.loaders("digits", batch_size=32, subset=100, val_subset=50)
    assert (len(train.dataset), len(val.dataset)) == (100, 50)
    assert len(train) == 4  # ceil(100 / 32)
    images, labels = next(iter(train))
    assert images.shape == (32, 1, 8, 8) and labels.shape == (32,)


def test_loaders_full_split_without_subset():
    train, val = data.loaders("digits", batch_size=64)
    assert (len(train.dataset), len(val.dataset)) == (1437, 360)


def test_train_loader_is_reproducible_for_a_seed():
    def first_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        train, _ = data.loaders("digits", batch_size=16, subset=200, seed=seed)
        return next(iter(train))

    images_a, labels_a = first_batch(0)
    images_b, labels_b = first_batch(0)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    images_c, _ = first_batch(1)
    assert not torch.equal(images_a, images_c)


def _crops_and_flips(image: torch.Tensor, pad: int, fill: float) -> list[torch.Tensor]:
    """Every image the augmentation may make of ``image`` [C, H, W]: each crop of the padded image, flipped or not."""
    height, width = image.shape[1:]
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad), value=fill)
    crops = [padded[:, dy:dy + height, dx:dx + width] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    return crops + [crop.flip(-1) for crop in crops]


@needs_fashion_mnist
def test_fashion_mnist_train_batches_are_augmented_under_the_seed_and_val_is_untouched():
    from mpqc.augment import augmentation_off

    train, val = data.loaders("fashion-mnist", batch_size=32, subset=64, val_subset=32, augment=True)
    plain, _ = data.loaders("fashion-mnist", batch_size=32, subset=64)  # off by default
    val_images, _ = next(iter(val))
    assert torch.equal(val_images, torch.stack([val.dataset[i][0] for i in range(32)]))  # eval data untouched
    torch.manual_seed(5)
    images, labels = next(iter(train))
    torch.manual_seed(5)
    train.generator.manual_seed(0)
    again, _ = next(iter(train))
    assert torch.equal(images, again)  # the same batch under the same seed
    raw, raw_labels = next(iter(plain))
    assert torch.equal(labels, raw_labels)  # augmentation draws from the global RNG, not the shuffle's generator
    assert not torch.equal(images, raw)
    fill = -data.FASHION_MNIST_MEAN / data.FASHION_MNIST_STD
    for augmented, original in zip(images, raw):  # each image is a crop (pad 2, black) of its own, maybe flipped
        assert any(torch.equal(augmented, c) for c in _crops_and_flips(original, 2, fill))
    train.generator.manual_seed(0)  # the loaders' shuffles start from seed 0
    with augmentation_off(train):
        assert torch.equal(next(iter(train))[0], raw)  # calibration batches are not augmented


def test_augment_refuses_bad_settings_and_non_images():
    from mpqc.augment import Augment

    with pytest.raises(ConfigError, match="crop_pad"):
        Augment(crop_pad=-1)
    with pytest.raises(ConfigError, match="image batches"):
        Augment(hflip=True)(torch.zeros(4, 8))
    with pytest.raises(ConfigError, match="augment must be"):
        data.loaders("digits", batch_size=8, augment="yes")


def test_train_loader_reseeded_per_epoch_repeats_the_epoch():
    train, _ = data.loaders("digits", batch_size=16, subset=200, seed=3)
    train.generator.manual_seed(7)
    first = next(iter(train))[1]
    train.generator.manual_seed(7)
    assert torch.equal(next(iter(train))[1], first)


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar10'.*fashion-mnist.*digits"):
        data.loaders("cifar10", batch_size=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 8, "subset": 0}, "subset must be in"),
        ({"batch_size": 8, "val_subset": 361}, "val_subset must be in"),
    ],
)
def test_loaders_refuse_bad_sizes(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        data.loaders("digits", **kwargs)


def test_dataset_info():
    assert data.dataset_info("digits").input_shape == (1, 8, 8)
    assert data.dataset_info("fashion-mnist").in_channels == 1
    assert data.dataset_info("fashion-mnist").num_classes == 10


# --------------------------------------------------------------------------------------------------------------
# check_loader


def _tensor_loader(labels: list[int]) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(len(labels), 1, 8, 8), torch.tensor(labels)), batch_size=4)


def test_check_loader_accepts_good_loaders():
    train, val = data.loaders("digits", batch_size=32, subset=64)
    data.check_loader(train, "train", num_classes=10)
    data.check_loader(val, "val", num_classes=10)


def test_check_loader_refuses_empty_loader():
    with pytest.raises(DataError, match="train loader is empty"):
        data.check_loader(_tensor_loader([]), "train", num_classes=10)


@pytest.mark.parametrize("bad", [10, 17, -1])
def test_check_loader_names_out_of_range_label(bad):
    with pytest.raises(DataError, match=rf"val loader has label {bad} outside \[0, 10\)"):
        data.check_loader(_tensor_loader([0, 3, bad, 9]), "val", num_classes=10)


def test_check_loader_does_not_advance_the_shuffle():
    train, _ = data.loaders("digits", batch_size=16, subset=200, seed=0)
    expected = next(iter(data.loaders("digits", batch_size=16, subset=200, seed=0)[0]))[1]
    data.check_loader(train, "train", num_classes=10)
    assert torch.equal(next(iter(train))[1], expected)


# --------------------------------------------------------------------------------------------------------------
# examples/models.py


def test_resnet20_shape_and_fx_trace():
    model = models.resnet20().eval()
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 10)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 2 * 9 + 2  # stem, two per block, two 1x1 downsample shortcuts


def test_resnet20_options():
    model = models.resnet20(num_classes=7, in_channels=3).eval()
    assert model(torch.randn(1, 3, 28, 28)).shape == (1, 7)


def test_small_cnn_on_digits_and_fx_trace():
    model = models.small_cnn().eval()
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 10)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))


def test_every_relu_is_its_own_module():
    for model in (models.resnet20(), models.small_cnn()):
        traced = torch.fx.symbolic_trace(model)
        targets = [n.target for n in traced.graph.nodes if n.op == "call_module" and "relu" in str(n.target)]
        assert len(targets) == len(set(targets))


# --------------------------------------------------------------------------------------------------------------
# mpqc.pretrain on digits (kept here with the data it trains on; full Fashion-MNIST runs belong to benchmarks)


def test_train_fp32_learns_digits_and_evaluate_restores_mode():
    from mpqc.pretrain import train_fp32
    from mpqc.train import evaluate

    torch.manual_seed(0)
    model = models.small_cnn()
    train, val = data.loaders("digits", batch_size=64)
    acc = train_fp32(model, train, val, epochs=5, progress=False)
    assert acc > 85.0
    model.train()
    assert evaluate(model, val) == pytest.approx(acc)
    assert model.training


def test_train_fp32_resumes_after_a_crash_as_if_uninterrupted(tmp_path, monkeypatch):
    """Three epochs straight, and three epochs crashing in the third (after its training, before its checkpoint)
    then called again with the same checkpoint: the same weights, bit for bit; a checkpoint of another length is
    refused."""
    from mpqc import pretrain
    from mpqc.errors import CheckpointError

    def run(checkpoint=None):
        torch.manual_seed(0)
        model = models.small_cnn()
        train, val = data.loaders("digits", batch_size=64, subset=256, seed=3)
        acc = pretrain.train_fp32(model, train, val, epochs=3, seed=3, progress=False, checkpoint=checkpoint)
        return model, acc

    straight, straight_acc = run()
    evaluate, calls = pretrain.evaluate, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return evaluate(*args, **kwargs)

    checkpoint = tmp_path / "fp32.partial.pt"
    monkeypatch.setattr(pretrain, "evaluate", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        run(checkpoint)
    monkeypatch.setattr(pretrain, "evaluate", evaluate)
    resumed, resumed_acc = run(checkpoint)
    assert resumed_acc == straight_acc
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="3-epoch run, not 4"):
        pretrain.train_fp32(models.small_cnn(), *data.loaders("digits", batch_size=64, subset=256), epochs=4,
                            progress=False, checkpoint=checkpoint)


def test_cached_fp32_trains_once_then_loads(tmp_path, monkeypatch, caplog):
    from mpqc.pretrain import cached_fp32

    monkeypatch.setenv("MPQC_CACHE", str(tmp_path))
    with caplog.at_level("INFO", logger="mpqc.pretrain"):
        trained = cached_fp32(models.small_cnn, "digits", epochs=1, subset=128, progress=False)
    path = tmp_path / "fp32" / "small_cnn-digits-1ep-sub128.pt"  # neither -aug nor -nesterov by default
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]
    assert "training small_cnn" in caplog.text

    caplog.clear()
    with caplog.at_level("INFO", logger="mpqc.pretrain"):
        loaded = cached_fp32(models.small_cnn, "digits", epochs=1, subset=128, progress=False)
    assert "loaded cached fp32 weights" in caplog.text
    assert not loaded.training
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_cached_fp32_refuses_a_file_that_does_not_fit(tmp_path):
    from mpqc.errors import CheckpointError
    from mpqc.pretrain import cached_fp32

    torch.save({"bogus": torch.zeros(1)}, tmp_path / "small_cnn-digits-1ep.pt")  # the name of the old recipe's file
    with pytest.raises(CheckpointError, match="delete the file to retrain"):
        cached_fp32(models.small_cnn, "digits", epochs=1, cache_dir=tmp_path, progress=False)
