"""Datasets and loaders for the CLI, the examples, the tests and the benchmarks.

Two datasets, both of which load with no network access (see ``shared/DATA.md``):

- ``"fashion-mnist"``: the Debian package ``dataset-fashion-mnist`` ships the four gzipped IDX files in
  :data:`FASHION_MNIST_DIR`. :func:`fashion_mnist` gunzips them once into a cache directory, laid out the way
  :class:`torchvision.datasets.FashionMNIST` expects, and loads them from there with ``download=False``.
- ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 with a fixed permutation.
  Tiny, for fast tests.

The cache root is ``~/.cache/mpqc``, or ``$MPQC_CACHE`` when that is set (see :func:`cache_root`).

>>> train, val = loaders("digits", batch_size=32, subset=64)
>>> len(train.dataset), len(val.dataset)
(64, 360)
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mpqc.augment import NO_AUGMENT, Augment, AugmentingCollate
from mpqc.errors import ConfigError, DataError

if TYPE_CHECKING:  # torchvision takes ~2 s to import: only where Fashion-MNIST is loaded
    import torchvision

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
#: Per-pixel mean and standard deviation of the Fashion-MNIST training images (after ``ToTensor``).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

#: Seed of the fixed train/validation split of the digits (independent of the ``seed`` of :func:`loaders`).
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: input shape of one sample and number of classes; and the
    augmentation its training loader applies with ``loaders(..., augment=True)``."""

    name: str
    input_shape: tuple[int, int, int]  # (channels, height, width)
    num_classes: int
    augment: Augment = NO_AUGMENT  # what its training batches get with augment=True (:mod:`mpqc.augment`)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]


def cache_root() -> Path:
    """The root of mpqc's caches: ``$MPQC_CACHE`` if set, else ``~/.cache/mpqc``."""
    override = os.environ.get("MPQC_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "mpqc"


# --------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def fashion_mnist(root: str | Path | None = None, *, train: bool) -> torchvision.datasets.FashionMNIST:
    """Fashion-MNIST from the Debian package, normalised with the training-set mean and std.

    The gzipped files in :data:`FASHION_MNIST_DIR` are decompressed once into ``ROOT/FashionMNIST/raw/``
    (``ROOT`` defaults to ``cache_root() / "datasets"``); each file is written under a temporary name and renamed
    into place, so an interrupted run never leaves a truncated file behind.

    Raises:
        DataError: the Debian files are missing (and not already in the cache).
    """
    import torchvision
    from torchvision import transforms

    root = Path(root) if root is not None else cache_root() / "datasets"
    _unpack_fashion_mnist(root / "FashionMNIST" / "raw")
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,))]
    )
    return torchvision.datasets.FashionMNIST(str(root), train=train, download=False, transform=transform)


def _unpack_fashion_mnist(raw_dir: Path) -> None:
    todo = [name for name in FASHION_MNIST_FILES if not (raw_dir / name.removesuffix(".gz")).is_file()]
    if not todo:
        return
    missing = [name for name in todo if not (FASHION_MNIST_DIR / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST files not found in {FASHION_MNIST_DIR} (missing: {', '.join(missing)}); "
            "install with `apt-get install dataset-fashion-mnist`"
        )
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name in todo:
        _gunzip_atomically(FASHION_MNIST_DIR / name, raw_dir / name.removesuffix(".gz"))


def _gunzip_atomically(source: Path, target: Path) -> None:
    """Decompress ``source`` to ``target`` via a temporary file in the same directory and an atomic rename."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(source, "rb") as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# sklearn digits


def digits(*, train: bool) -> TensorDataset:
    """scikit-learn's 8x8 digits as ``(images [N,1,8,8] float32, labels [N] int64)``.

    Pixels are scaled to [0, 1], then normalised with the mean and std of the training split. The 80/20 split
    is a fixed permutation (seed :data:`DIGITS_SPLIT_SEED`): 1,437 training and 360 validation images.
    """
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_train = int(DIGITS_TRAIN_FRACTION * len(labels))
    train_idx, val_idx = order[:n_train], order[n_train:]
    mean, std = images[train_idx].mean(), images[train_idx].std()
    idx = train_idx if train else val_idx
    return TensorDataset((images[idx] - mean) / std, labels[idx])


# --------------------------------------------------------------------------------------------------------------
# Registry and loaders

_Builder = Callable[[bool], Dataset]

_DATASETS: dict[str, tuple[DatasetInfo, _Builder]] = {
    "fashion-mnist": (
        # Random crop of the image padded by 2 black pixels (0 before normalisation) and horizontal flips.
        DatasetInfo("fashion-mnist", (1, 28, 28), 10,
                    Augment(crop_pad=2, hflip=True, fill=-FASHION_MNIST_MEAN / FASHION_MNIST_STD)),
        lambda train: fashion_mnist(train=train),
    ),
    # Digits are not mirror-symmetric and 8x8 leaves no room to crop: no augmentation by default.
    "digits": (DatasetInfo("digits", (1, 8, 8), 10), lambda train: digits(train=train)),
}

#: The dataset names :func:`loaders` and :func:`dataset_info` accept.
DATASET_NAMES: tuple[str, ...] = tuple(_DATASETS)


def dataset_info(name: str) -> DatasetInfo:
    """Input shape and number of classes of a named dataset (without loading it)."""
    return _lookup(name)[0]


def _lookup(name: str) -> tuple[DatasetInfo, _Builder]:
    try:
        return _DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}") from None


def loaders(
    name: str,
    *,
    batch_size: int,
    subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
    augment: Augment | bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders for ``"fashion-mnist"`` or ``"digits"``.

    ``augment``: what the *training* batches get (:mod:`mpqc.augment`): ``True`` the data set's own augmentation
    (Fashion-MNIST: random crop with padding 2 and horizontal flip; digits: none), ``False`` (default) none, or an
    :class:`~mpqc.augment.Augment`. Off by default: at short compute it cost the mixed-precision search more than
    it gave (issue 18, ``bench/results/recipe.json``). The validation loader is never augmented.

    ``subset`` / ``val_subset`` keep the first N items of a permutation seeded from ``seed`` (for fast tests);
    ``None`` keeps the whole split.

    The train loader shuffles with its own ``torch.Generator`` seeded from ``seed`` and loads in the main
    process (``num_workers=0``), so the sequence of epochs is reproducible from ``seed`` alone and independent
    of the global RNG. A consumer that resumes mid-run may re-seed it per epoch, e.g.
    ``train_loader.generator.manual_seed(seed + epoch)``, so epoch ``e`` gets the same order however the run
    got there. The validation loader does not shuffle.

    Raises:
        ConfigError: unknown ``name``, or a non-positive ``batch_size``, or a subset size outside [1, len(split)].
    """
    info, build = _lookup(name)
    if augment is True:
        augment = info.augment
    elif augment is False:
        augment = NO_AUGMENT
    elif not isinstance(augment, Augment):
        raise ConfigError(f"augment must be True, False or an mpqc Augment, got {augment!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    train_set = _take_subset(build(True), subset, seed, what="subset")
    val_set = _take_subset(build(False), val_subset, seed, what="val_subset")
    return split_loaders(train_set, val_set, batch_size=batch_size, seed=seed,
                         collate_fn=AugmentingCollate(augment) if augment.active else None)


def split_loaders(train_set: Dataset, val_set: Dataset, *, batch_size: int, seed: int = 0,
                  collate_fn=None) -> tuple[DataLoader, DataLoader]:
    """The loaders of one train/validation split as every mpqc data set builds them (see :func:`loaders`): the
    train loader shuffles with its own generator seeded from ``seed``, both load in the main process, and
    ``collate_fn`` (e.g. augmentation) applies to the training batches only."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed), num_workers=0,
                              **({"collate_fn": collate_fn} if collate_fn is not None else {}))
    val_loader = DataLoader(val_set, batch_size=batch_size, shuffle=False, num_workers=0)
    return train_loader, val_loader


def _take_subset(dataset: Dataset, size: int | None, seed: int, *, what: str) -> Dataset:
    if size is None:
        return dataset
    total = len(dataset)
    if not 1 <= size <= total:
        raise ConfigError(f"{what} must be in [1, {total}] for this split, got {size}")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


# --------------------------------------------------------------------------------------------------------------
# Checks


def check_loader(loader: DataLoader, name: str, num_classes: int | None = None) -> None:
    """Refuse a loader that yields no batch, or whose labels fall outside ``[0, num_classes)``.

    ``name`` says which loader it is in the message (``"train"``, ``"val"``). Labels are read from the
    dataset (``targets`` attributes, ``TensorDataset`` tensors, ``Subset`` indices) where it exposes them,
    item by item otherwise; the loader itself is never iterated, so its shuffling generator is not advanced.
    Without ``num_classes`` only negative labels are refused.

    Raises:
        DataError: ``"<name> loader is empty"``, or a message naming the offending label value.
    """
    if len(loader) == 0:
        raise DataError(f"{name} loader is empty")
    labels = _labels(loader.dataset)
    if labels.numel() == 0:
        raise DataError(f"{name} loader is empty")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise DataError(f"{name} loader has non-integer labels of dtype {labels.dtype}")
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bad.any():
        expected = "[0, inf)" if num_classes is None else f"[0, {num_classes})"
        raise DataError(
            f"{name} loader has label {labels[bad][0].item()} outside {expected} "
            f"({int(bad.sum())} of {labels.numel()} labels out of range)"
        )


def _labels(dataset: Dataset) -> Tensor:
    """All labels of a map-style dataset as a 1-D tensor, read cheaply where the dataset allows it."""
    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].reshape(-1)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).reshape(-1)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)
