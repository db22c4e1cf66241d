"""Train fp32 baselines, evaluate them, and cache their weights.

No pretrained weights can be downloaded here (``shared/DATA.md``), so the examples and benchmarks train their
fp32 baselines themselves, once: :func:`cached_fp32` trains on a cache miss and loads the saved ``state_dict``
on every later call. Typical use, with a model builder from ``examples/models.py``::

    model = cached_fp32(resnet20, "fashion-mnist", epochs=15)   # trains the first time, loads afterwards
    train_loader, val_loader = loaders("fashion-mnist", batch_size=256)
    print(evaluate(model, val_loader))
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mpqc.checkpoint import atomic_torch_save, load_checkpoint, save_checkpoint
from mpqc.data import cache_root, check_loader, dataset_info, loaders
from mpqc.errors import CheckpointError, ConfigError, TrainingDivergedError
from mpqc.train import evaluate

logger = logging.getLogger(__name__)

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4


def train_fp32(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    epochs: int,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    nesterov: bool = False,
    checkpoint: str | Path | None = None,
) -> float:
    """Train ``model`` in place with SGD and a cosine schedule; return its validation top-1 accuracy in %.

    SGD with momentum 0.9 (Nesterov's with ``nesterov=True``) and weight decay 5e-4 (4-d tensors channels-last while training, contiguous again
    after); the learning rate follows a cosine from ``lr`` to 0 over all
    ``epochs * len(train_loader)`` steps. ``seed`` seeds the global torch RNG (for any randomness inside the
    model, such as dropout); the batch order comes from the train loader's own generator. Training runs on the
    device of the model's parameters; the train loader's augmentation (:mod:`mpqc.augment`) draws from the
    global RNG. ``progress`` shows a tqdm bar per epoch with the running loss and accuracy.

    ``checkpoint``: after every epoch the model, optimizer, scheduler, the torch RNG and the train loader's
    shuffling generator are saved there (:func:`mpqc.checkpoint.save_checkpoint`); a call finding one resumes
    after its epoch, and ends as an uninterrupted run would, bit for bit (CPU). Nothing of a long training is lost
    to a crash but the epoch it was in.

    Raises:
        ConfigError: ``epochs`` < 1.
        DataError: a loader is empty.
        TrainingDivergedError: the loss became NaN or infinite.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    check_loader(train_loader, "train")
    check_loader(val_loader, "val")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    model.to(memory_format=torch.channels_last)  # 4-d weights NHWC: oneDNN trains convs ~17% faster (2-core AVX2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, nesterov=nesterov,
                                weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    loss_fn = nn.CrossEntropyLoss()
    shuffling = getattr(train_loader, "generator", None)
    start, val_acc = 0, float("nan")
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    if state is not None:
        if state.get("epochs") != epochs:
            raise CheckpointError(f"fp32 checkpoint {checkpoint} is of a {state.get('epochs')}-epoch run, not "
                                  f"{epochs}; delete it to start again")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if shuffling is not None:
            shuffling.set_state(state["loader_rng"])
        start, val_acc = state["epoch"], state["val_acc"]
        logger.info("resuming fp32 training after epoch %d/%d from %s", start, epochs, checkpoint)

    for epoch in range(start, epochs):
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"fp32 epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for step, (images, labels) in enumerate(bar):
            images, labels = images.to(device), labels.to(device)
            if images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images)
            loss = loss_fn(logits, labels)
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"fp32 training loss became {loss.item()} at epoch {epoch + 1}, step {step}"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

            total_loss += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{100.0 * correct / seen:.2f}%", refresh=False)
        val_acc = evaluate(model, val_loader)
        logger.info(
            "fp32 epoch %d/%d: train loss %.4f, train acc %.2f%%, val acc %.2f%%",
            epoch + 1, epochs, total_loss / seen, 100.0 * correct / seen, val_acc,
        )
        if checkpoint is not None:
            save_checkpoint({"epochs": epochs, "epoch": epoch + 1, "val_acc": val_acc, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "rng": torch.get_rng_state(),
                             "loader_rng": shuffling.get_state() if shuffling is not None else None}, checkpoint)
    model.to(memory_format=torch.contiguous_format)
    return val_acc


def cached_fp32(
    model_fn: Callable[[], nn.Module],
    data_name: str,
    *,
    epochs: int,
    cache_dir: str | Path | None = None,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
    subset: int | None = None,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    augment: bool = False,
    nesterov: bool = False,
) -> nn.Module:
    """An fp32 model from ``model_fn()`` trained on ``data_name`` for ``epochs``, trained once and then cached.

    The ``state_dict`` lives at ``<cache_dir>/<model>-<data>-<epochs>ep.pt``; ``cache_dir`` defaults to
    ``cache_root() / "fp32"`` (``~/.cache/mpqc/fp32``, or ``$MPQC_CACHE/fp32``). ``<model>`` is ``model_name``
    or ``model_fn.__name__``. Non-default ``batch_size``, ``lr``, ``seed`` or ``subset`` are appended to the
    file name (``-bs64-lr0.05-seed1-sub500``) so different recipes never share a file; so are ``-aug`` (the data
    set's training augmentation, ``augment=True``) and ``-nesterov`` (Nesterov momentum, ``nesterov=True``); both are
    off by default (issue 18's measurement, ``bench/results/recipe.json``), and a file without them was trained
    without either.
    Saving writes a temporary
    file and renames it into place; loading uses ``torch.load(weights_only=True)``. While it trains, its epochs are
    checkpointed beside it (``<file>.partial.pt``): a call after a crash resumes there (:func:`train_fp32`).

    Training runs on ``device`` (default: CUDA if available, else CPU); the model is returned on the CPU in
    eval mode.

    Raises:
        CheckpointError: the cached file is unreadable or does not fit the model.
        ConfigError: unknown ``data_name`` (from :func:`mpqc.data.loaders`).
    """
    name = model_name or getattr(model_fn, "__name__", None)
    if not name:
        raise ConfigError("cached_fp32 needs model_name= when model_fn has no __name__ (e.g. a partial)")
    dataset_info(data_name)  # refuse an unknown dataset before touching the cache
    directory = Path(cache_dir) if cache_dir is not None else cache_root() / "fp32"
    augment = augment and dataset_info(data_name).augment.active
    suffix = _recipe_suffix(batch_size, lr, seed, subset) + "-aug" * augment + "-nesterov" * nesterov
    path = directory / f"{name}-{data_name}-{epochs}ep{suffix}.pt"

    model = model_fn()
    if path.is_file():
        _load_state_dict(model, path)
        logger.info("loaded cached fp32 weights from %s", path)
        return model.eval()

    logger.info("no cached fp32 weights at %s; training %s on %s for %d epochs", path, name, data_name, epochs)
    device = torch.device(device) if device is not None else _default_device()
    train_loader, val_loader = loaders(data_name, batch_size=batch_size, subset=subset, seed=seed, augment=augment)
    model.to(device)
    partial = path.with_name(path.stem + ".partial.pt")  # the epochs so far: a crashed training goes on from there
    acc = train_fp32(model, train_loader, val_loader, epochs=epochs, lr=lr, seed=seed, progress=progress,
                     nesterov=nesterov, checkpoint=partial)
    model.cpu()
    atomic_torch_save(model.state_dict(), path)
    for leftover in (partial, partial.with_name(partial.stem + ".prev.pt")):
        leftover.unlink(missing_ok=True)
    logger.info("trained fp32 %s on %s: val top-1 %.2f%%; saved to %s", name, data_name, acc, path)
    return model.eval()


def _recipe_suffix(batch_size: int, lr: float, seed: int, subset: int | None) -> str:
    parts = []
    if batch_size != 128:
        parts.append(f"bs{batch_size}")
    if lr != 0.1:
        parts.append(f"lr{lr:g}")
    if seed != 0:
        parts.append(f"seed{seed}")
    if subset is not None:
        parts.append(f"sub{subset}")
    return "".join(f"-{part}" for part in parts)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_state_dict(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # unpickling or key/shape mismatch: either way the file is unusable
        raise CheckpointError(
            f"cached fp32 weights at {path} do not load into the model ({exc}); delete the file to retrain"
        ) from exc
