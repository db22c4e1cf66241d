"""Real English text for transformer tasks: the Debian package ``fortunes``, tokenized by the model's tokenizer.

``fortunes`` installs 15,000-odd short texts in 40-odd categories (computers, science, love, literature, ...) under
:data:`FORTUNES_DIR`, one file per category (entries separated by a line holding only ``%``; the ``.dat`` and
``.u8`` files beside them are indexes). mpqc uses them two ways:

* **labelled** (``labelled=True``): a text-classification set, the label being the category's index in
  :func:`fortune_categories`;
* **unlabelled** (``labelled=False``): text for label-free distillation and embedding fidelity.

The split is fixed (a seeded permutation, :data:`FORTUNES_SPLIT_SEED`): ``train=False`` is the held-out
:data:`FORTUNES_HELD_OUT` share, the same whatever the tokenizer. Items are dicts of the model's keyword inputs
(``input_ids``, ``attention_mask``, padded to ``max_length``), plus ``labels`` where labelled: the batch layout
``mpqc.task.Inputs`` reads.

>>> texts = fortune_texts()                                   # doctest: +SKIP
>>> train = fortunes(tokenizer, train=True, labelled=False)   # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mpqc.data import split_loaders
from mpqc.errors import ConfigError, DataError

#: Where the Debian package ``fortunes`` installs its texts.
FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: Seed of the fixed train/held-out split, and the held-out share.
FORTUNES_SPLIT_SEED = 0
FORTUNES_HELD_OUT = 0.2
_INDEX_SUFFIXES = (".dat", ".u8")


@dataclass(frozen=True)
class Fortune:
    """One text and the category (file) it comes from."""

    text: str
    category: str


def _category_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise DataError(f"no fortunes in {directory}: install the Debian package (apt-get install fortunes)")
    files = sorted(path for path in directory.iterdir()
                   if path.is_file() and not path.name.endswith(_INDEX_SUFFIXES) and not path.name.startswith("."))
    if not files:
        raise DataError(f"{directory} holds no fortune files (expected one text file per category)")
    return files


def fortune_categories(directory: str | Path = FORTUNES_DIR) -> list[str]:
    """The category names, sorted: a label is an index into this list."""
    return [path.name for path in _category_files(Path(directory))]


def fortune_texts(directory: str | Path = FORTUNES_DIR) -> list[Fortune]:
    """Every non-empty entry of every category file, in file order then entry order (deterministic)."""
    fortunes: list[Fortune] = []
    for path in _category_files(Path(directory)):
        entry: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
            if line.strip() == "%":
                text = "\n".join(entry).strip()
                if text:
                    fortunes.append(Fortune(text, path.name))
                entry = []
            else:
                entry.append(line)
    return fortunes


class TokenizedTexts(Dataset):
    """Tokenized texts as the model's keyword inputs: item ``i`` is ``{"input_ids", "attention_mask"}`` (int64,
    ``[max_length]``) plus ``"labels"`` (a 0-d int64) where the set is labelled; ``texts`` keeps the raw strings."""

    def __init__(self, texts: list[str], input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None) -> None:
        if not (len(texts) == len(input_ids) == len(attention_mask)) or (labels is not None
                                                                         and len(labels) != len(texts)):
            raise DataError("texts, token ids, attention masks and labels must have one entry per text")
        self.texts, self.input_ids, self.attention_mask, self.labels = texts, input_ids, attention_mask, labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


def load_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` as is, or the Hugging Face tokenizer saved in the directory it names (loaded offline)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    directory = Path(tokenizer)
    if not directory.is_dir():
        raise ConfigError(f"tokenizer {str(tokenizer)!r} is not a directory holding a saved tokenizer")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of ``texts``, truncated and padded to ``max_length`` by ``tokenizer`` (a
    Hugging Face tokenizer, or any callable with its ``(texts, padding=, truncation=, max_length=,
    return_tensors="pt")`` signature returning those two keys)."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    missing = [key for key in ("input_ids", "attention_mask") if key not in encoded]
    if missing:
        raise ConfigError(f"the tokenizer's output has no {missing[0]!r}")
    ids, mask = (torch.as_tensor(encoded[key]).to(torch.int64) for key in ("input_ids", "attention_mask"))
    if ids.shape != (len(texts), max_length) or mask.shape != ids.shape:
        raise ConfigError(f"the tokenizer gave shape {tuple(ids.shape)} for {len(texts)} texts at max_length "
                          f"{max_length}: it must pad and truncate to max_length")
    return ids, mask


def fortunes(tokenizer: Any, *, train: bool, labelled: bool = True, max_length: int = 128,
             subset: int | None = None, directory: str | Path = FORTUNES_DIR) -> TokenizedTexts:
    """The train (or held-out) fortunes, tokenized; ``subset`` keeps the first ``subset`` texts of the split (its
    order is the fixed permutation, so a subset is a random sample, the same every time)."""
    everything = fortune_texts(directory)
    order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(FORTUNES_SPLIT_SEED)).tolist()
    held_out = round(len(everything) * FORTUNES_HELD_OUT)
    chosen = [everything[i] for i in (order[len(order) - held_out:] if not train else order[:len(order) - held_out])]
    if subset is not None:
        if subset < 1:
            raise ConfigError(f"subset must be a positive number of texts, got {subset}")
        chosen = chosen[:subset]
    categories = {name: index for index, name in enumerate(fortune_categories(directory))}
    texts = [fortune.text for fortune in chosen]
    ids, mask = tokenize(load_tokenizer(tokenizer), texts, max_length)
    labels = torch.tensor([categories[fortune.category] for fortune in chosen]) if labelled else None
    return TokenizedTexts(texts, ids, mask, labels)


#: The text sets the CLI's ``--data`` accepts: name -> labelled (category labels) or not (text for distillation).
TEXT_DATASETS: dict[str, bool] = {"fortunes": True, "fortunes-text": False}


def text_loaders(name: str, tokenizer: Any, *, batch_size: int, max_length: int = 64, subset: int | None = None,
                 val_subset: int | None = None, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train and held-out loaders of the text set ``name`` (:data:`TEXT_DATASETS`), batches of keyword inputs.

    As :func:`mpqc.data.loaders`: the train loader shuffles with its own generator seeded from ``seed`` and loads in
    the main process; ``subset`` / ``val_subset`` keep the first N texts of the split's fixed permutation.
    """
    if name not in TEXT_DATASETS:
        raise ConfigError(f"unknown text set {name!r}; known: {', '.join(TEXT_DATASETS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = load_tokenizer(tokenizer)
    labelled = TEXT_DATASETS[name]
    train = fortunes(tokenizer, train=True, labelled=labelled, max_length=max_length, subset=subset)
    held_out = fortunes(tokenizer, train=False, labelled=labelled, max_length=max_length, subset=val_subset)
    return split_loaders(train, held_out, batch_size=batch_size, seed=seed)
