"""What ``mpqc compile`` and ``mpqc sweep`` options describe: the fp32 model, its example inputs, the data loaders
(an image set, or a text set tokenized by the model's tokenizer) and the :class:`~mpqc.config.CompileConfig`.

Also the two parsers every command shares: ``FILE.py:CALLABLE`` / ``module:CALLABLE`` specs (:func:`load_callable`)
and ``MIN-MAX`` bit ranges (:func:`bit_range`).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mpqc.errors import ConfigError


def prepare_run(args: argparse.Namespace, activation_bits: str):
    """The fp32 model, example inputs, loaders and CompileConfig that ``compile`` and ``sweep`` options describe."""
    from mpqc.config import CompileConfig, QuantizerConfig, RoundingConfig, TrainConfig
    from mpqc.text_data import TEXT_DATASETS

    if args.data in TEXT_DATASETS:
        model, train_loader, val_loader = _text_model_and_data(args)
    else:
        model, train_loader, val_loader = _image_model_and_data(args)
    config = CompileConfig(
        quantizers=QuantizerConfig(weight_bits=bit_range(args.weight_bits, "--weight-bits"),
                                   activation_bits=bit_range(activation_bits, "--act-bits"),
                                   first_last=args.first_last, weight_init=args.weight_init,
                                   weight_init_bits=args.weight_init_bits,
                                   shift_activations=args.shift_activations,
                                   recompute_weights=args.recompute_weights, table_rows=args.table_rows),
        search=TrainConfig(epochs=args.search_epochs, max_steps_per_epoch=args.steps_per_epoch, distill=args.distill,
                           quantizer_lr=args.quantizer_lr, checkpoint_every=args.checkpoint_every,
                           penalty_ramp=args.penalty_ramp, penalty_power=args.penalty_power),
        finetune=TrainConfig(epochs=args.finetune_epochs, max_steps_per_epoch=args.steps_per_epoch, lr=0.005,
                             penalty_weight=0.0, distill=args.distill, quantizer_lr=args.quantizer_lr,
                             checkpoint_every=args.checkpoint_every),
        rounding=RoundingConfig(how=args.weight_rounding),
        seed=args.seed,
        progress=not args.no_progress,
    )
    return model, _example_inputs(next(iter(val_loader))), train_loader, val_loader, config


def _image_model_and_data(args: argparse.Namespace):
    """``--model`` built for the image set's classes and channels (pretrained with ``--pretrain-epochs``), and
    the set's loaders."""
    import torch

    from mpqc.data import dataset_info, loaders
    from mpqc.pretrain import cached_fp32

    info = dataset_info(args.data)
    factory = load_callable(args.model, "--model")
    build = lambda: _build_model(factory, num_classes=info.num_classes, in_channels=info.in_channels)  # noqa: E731
    torch.manual_seed(args.seed)  # the model's initial weights, when it is not pretrained or loaded
    if args.pretrain_epochs:
        model = cached_fp32(build, args.data, epochs=args.pretrain_epochs, model_name=args.model.rpartition(":")[2],
                            seed=args.seed, progress=not args.no_progress, augment=args.augment)
    else:
        model = build()
    _load_weights(model, args.weights)
    train_loader, val_loader = loaders(args.data, batch_size=args.batch_size, subset=args.subset,
                                       val_subset=args.val_subset, seed=args.seed, augment=args.augment)
    return model, train_loader, val_loader


def _text_model_and_data(args: argparse.Namespace):
    """``--model`` (a pretrained text model: its factory loads it; ``num_classes`` passed where it takes one) and
    the text set tokenized by its tokenizer (``--tokenizer``, or the directory its Hugging Face config came from)."""
    import torch

    from mpqc.text_data import TEXT_DATASETS, fortune_categories, text_loaders

    if args.pretrain_epochs:
        raise ConfigError(f"--pretrain-epochs trains an image classifier from scratch; a text model for --data "
                          f"{args.data} brings its weights (its factory loads them, or --weights)")
    if args.augment:
        raise ConfigError(f"--augment: the text set {args.data} has no augmentation (image sets only)")
    torch.manual_seed(args.seed)  # a head the factory adds starts from the same weights every time
    labelled = TEXT_DATASETS[args.data]
    model = _build_model(load_callable(args.model, "--model"),
                         num_classes=len(fortune_categories()) if labelled else None)
    _load_weights(model, args.weights)
    tokenizer = args.tokenizer or _tokenizer_directory(model)
    train_loader, val_loader = text_loaders(args.data, tokenizer, batch_size=args.batch_size,
                                            max_length=args.max_length, subset=args.subset,
                                            val_subset=args.val_subset, seed=args.seed)
    return model, train_loader, val_loader


def _build_model(factory: Callable[..., nn.Module], **wanted: Any) -> nn.Module:
    """``factory(**wanted)``, passing only the keyword arguments its signature takes (and none that are None)."""
    import inspect

    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {k: v for k, v in wanted.items() if v is not None and (takes_any or k in parameters)}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_weights(model: nn.Module, path: Path | None) -> None:
    import torch

    if path is None:
        return
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except (OSError, RuntimeError) as error:
        raise ConfigError(f"--weights {path}: {error}") from error


def _tokenizer_directory(model: nn.Module) -> Path:
    """The directory a Hugging Face model inside ``model`` was loaded from, if it holds a tokenizer."""
    for module in model.modules():
        location = getattr(getattr(module, "config", None), "_name_or_path", None)
        if location and Path(location).is_dir() and any(Path(location).glob("tokenizer*")):
            return Path(location)
    raise ConfigError("--tokenizer: the model was not loaded from a directory holding its tokenizer; give the "
                      "tokenizer's directory")


def _example_inputs(batch: Any) -> Any:
    """Two examples of the model's inputs from a validation batch: ``(inputs, labels)`` -> ``inputs[:2]``; a dict
    batch -> its keyword inputs (``labels`` left out)."""
    if isinstance(batch, dict):
        return {name: value[:2] for name, value in batch.items() if name != "labels"}
    return batch[0][:2]


def load_callable(spec: str, flag: str) -> Callable[..., Any]:
    """``path/to/file.py:name`` or ``package.module:name`` -> the callable it names; errors name ``flag``."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise ConfigError(f"{flag} {spec!r} must look like FILE.py:CALLABLE or package.module:CALLABLE")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ConfigError(f"{flag}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"mpqc_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ConfigError(f"{flag}: cannot import {location!r}: {error}") from error
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{flag}: {location} has no callable named {name!r}")
    return factory


def bits_or_budget(text: str) -> int | str:
    """An argparse type for ``--weight-init-bits``: a number of bits, or ``budget``."""
    if text == "budget":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bits or 'budget', got {text!r}") from None


def bit_range(text: str, flag: str):
    from mpqc.quantizers import BitRange

    low, sep, high = text.partition("-")
    try:
        return BitRange(int(low), int(high if sep else low))
    except ValueError:
        raise ConfigError(f"{flag} {text!r} must look like MIN-MAX, e.g. 2-8") from None
