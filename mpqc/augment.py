"""Training-time data augmentation, applied on the fly to whole batches in torch (cheap on 2 cores).

:class:`Augment` says what is done to a training batch of images ``[N, C, H, W]``: a random crop of the image
padded by ``crop_pad`` pixels on every side (filled with ``fill``, in the normalised units of the data set) and a
random horizontal flip. :class:`AugmentingCollate` is the train loader's ``collate_fn`` that applies it after the
default collation; the random draws come from torch's global generator, so a batch is a function of the global
seed and of the batches drawn before it (:func:`mpqc.train.epoch_batches` seeds it per epoch, and the training
loop's exact resume replays them). Evaluation and calibration data are never augmented: validation loaders get no
``AugmentingCollate``, and :func:`augmentation_off` suspends it on a train loader (the compiler's calibration
batch).

>>> batch = [(torch.arange(16.0).reshape(1, 4, 4), 0), (torch.zeros(1, 4, 4), 1)]
>>> images, labels = AugmentingCollate(Augment(crop_pad=1, hflip=True))(batch)
>>> images.shape, labels.tolist()
(torch.Size([2, 1, 4, 4]), [0, 1])
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

from mpqc.errors import ConfigError


@dataclass(frozen=True)
class Augment:
    """What augmentation a training batch of images gets: random crop after padding by ``crop_pad`` pixels
    (0: none) filled with ``fill``, and a horizontal flip with probability 1/2 (``hflip``)."""

    crop_pad: int = 0
    hflip: bool = False
    fill: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_pad < 0:
            raise ConfigError(f"Augment.crop_pad must be >= 0, got {self.crop_pad}")

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.hflip

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``images`` [N, C, H, W] augmented, each image with its own crop offset and flip."""
        if images.dim() != 4:
            raise ConfigError(f"augmentation needs image batches [N, C, H, W], got a tensor of shape "
                              f"{tuple(images.shape)}")
        n, _, height, width = images.shape
        if self.crop_pad > 0:
            pad = self.crop_pad
            padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), value=self.fill)
            dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
            dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
            rows = (dy + torch.arange(height)).reshape(n, 1, height, 1)
            cols = (dx + torch.arange(width)).reshape(n, 1, 1, width)
            batch = torch.arange(n).reshape(n, 1, 1, 1)
            channel = torch.arange(images.shape[1]).reshape(1, -1, 1, 1)
            images = padded[batch, channel, rows, cols]
        if self.hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            images = torch.where(flip.reshape(n, 1, 1, 1), images.flip(-1), images)
        return images


#: No augmentation.
NO_AUGMENT = Augment()


class AugmentingCollate:
    """A ``collate_fn``: the default collation of ``(image, label)`` samples, then ``augment`` on the images
    (unless switched off by :func:`augmentation_off`)."""

    def __init__(self, augment: Augment) -> None:
        self.augment = augment
        self.enabled = True

    def __call__(self, samples: list[Any]) -> Any:
        images, *rest = default_collate(samples)
        if self.enabled and self.augment.active:
            images = self.augment(images)
        return [images, *rest]


@contextmanager
def augmentation_off(loader: DataLoader) -> Iterator[DataLoader]:
    """``loader`` with its augmentation (if it has an :class:`AugmentingCollate`) suspended inside the block."""
    collate = loader.collate_fn
    if not isinstance(collate, AugmentingCollate):
        yield loader
        return
    was = collate.enabled
    collate.enabled = False
    try:
        yield loader
    finally:
        collate.enabled = was
