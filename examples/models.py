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
>>> mobilenet_se()(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> vit()(torch.zeros(2, 1, 28, 28)).shape
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


class SqueezeExcite(nn.Module):
    """Squeeze-excitation (MobileNetV3): ``x * hardsigmoid(fc2(relu(fc1(mean(x)))))``, the fcs as 1x1 convs."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.relu = nn.Conv2d(channels, reduced, 1), nn.ReLU()
        self.fc2, self.gate = nn.Conv2d(reduced, channels, 1), nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand-bn-hardswish, 3x3 depthwise-bn-hardswish, optional squeeze-excitation,
    1x1 project-bn, and the identity shortcut where the shape allows."""

    def __init__(self, in_channels: int, expanded: int, out_channels: int, stride: int, se: bool) -> None:
        super().__init__()
        self.expand, self.bn1 = _conv_bn(in_channels, expanded, 1)
        self.act1 = nn.Hardswish()
        self.depthwise = nn.Conv2d(expanded, expanded, 3, stride, padding=1, groups=expanded, bias=False)
        self.bn2, self.act2 = nn.BatchNorm2d(expanded), nn.Hardswish()
        self.se = SqueezeExcite(expanded, max(8, expanded // 4)) if se else nn.Identity()
        self.project, self.bn3 = _conv_bn(expanded, out_channels, 1)
        self.shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.bn1(self.expand(x)))
        y = self.se(self.act2(self.bn2(self.depthwise(y))))
        y = self.bn3(self.project(y))
        return x + y if self.shortcut else y


class MobileNetSE(nn.Module):
    """A MobileNetV3-style net for 28x28 grey images: hardswish, depthwise convs, squeeze-excitation.

    Stem 3x3 stride 2 (16 channels, hardswish) to 14x14; five inverted-residual blocks (16 -> 16 with SE, 24 at
    7x7, 24, 40 at 4x4 with SE, 40 with SE); 1x1 head (128 channels, hardswish), global average pool, linear.
    About 60 k parameters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem, self.stem_bn = _conv_bn(in_channels, 16, 3, stride=2)
        self.stem_act = nn.Hardswish()
        self.blocks = nn.Sequential(
            InvertedResidual(16, 32, 16, 1, se=True),
            InvertedResidual(16, 64, 24, 2, se=False),
            InvertedResidual(24, 72, 24, 1, se=False),
            InvertedResidual(24, 96, 40, 2, se=True),
            InvertedResidual(40, 120, 40, 1, se=True),
        )
        self.head, self.head_bn = _conv_bn(40, 128, 1)
        self.head_act = nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem_act(self.stem_bn(self.stem(x))))
        x = self.head_act(self.head_bn(self.head(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def mobilenet_se(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The MobileNetV3-style net of the second Fashion-MNIST example (hardswish, SE, depthwise convs)."""
    return MobileNetSE(num_classes=num_classes, in_channels=in_channels)


def vit(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small vision transformer for 28x28 grey images: torchvision's ``VisionTransformer`` with 7x7 patches (16
    tokens and the class token), 4 pre-norm blocks of 4 heads, width 64, MLP 128 (GELU); its patch embedding takes
    ``in_channels``. About 140 k parameters."""
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=28, patch_size=7, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=num_classes)
    model.conv_proj = nn.Conv2d(in_channels, 64, kernel_size=7, stride=7)
    nn.init.trunc_normal_(model.conv_proj.weight, std=(1.0 / (in_channels * 49)) ** 0.5)
    nn.init.zeros_(model.conv_proj.bias)
    return model


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
