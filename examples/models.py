"""Example models for the CLI, the examples, the tests and the benchmarks.

Plain module code with no data-dependent control flow, so ``torch.fx.symbolic_trace`` captures every model
here. Each ReLU is its own module (never one module called twice), so every activation has its own node and
its own place for an activation quantizer.

This file is loaded by path (``examples/models.py:resnet20``); it imports nothing from ``examples/``.

>>> import torch
>>> resnet20()(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> small_cnn()(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]


class BasicBlock(nn.Module):
    """conv3x3-bn-relu, conv3x3-bn, plus the shortcut, then relu.

    The shortcut is the identity, or (option B) a strided 1x1 conv + bn where the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, out_channels, 3, stride)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(out_channels, out_channels, 3)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(*_conv_bn(in_channels, out_channels, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: a conv stem, three stages of basic blocks, global average pooling, a linear head."""

    def __init__(
        self,
        blocks_per_stage: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, widths[0], 3)
        self.relu = nn.ReLU()
        stages = []
        channels = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = [BasicBlock(channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels) for 28x28 grey images such as Fashion-MNIST.

    Spatial sizes for a 28x28 input: 28 (stage 1), 14 (stage 2), 7 (stage 3). About 0.27 M parameters.
    """
    return ResNet(3, (16, 32, 64), num_classes=num_classes, in_channels=in_channels)


class SmallCNN(nn.Module):
    """conv-bn-relu (16 channels), strided conv-bn-relu (32 channels), global average pool, linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, 16, 3)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = _conv_bn(16, 32, 3, stride=2)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A tiny CNN for fast tests on 8x8 digits (works on any input of at least 2x2)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
