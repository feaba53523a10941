"""A CIFAR-style ResNet with GroupNorm instead of BatchNorm: a source model for the affine strategies.

Pre-trained with `scripts/train_source_model.py` and served as
`factory: "adapters.models.gn_resnet:gn_resnet"` (its keyword arguments in `kwargs`). The stages are
named `layer1` ... `layer4`, so SAR leaves `layer4` frozen as for torchvision ResNets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(out)) + self.shortcut(x))


class GNResNet(nn.Module):
    """Stem (3x3 conv), four stages of `blocks` basic blocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2),
    global average pooling and a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 32, blocks: int = 2, groups: int = 8) -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"width {width} is not a multiple of groups {groups}")
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, width)
        widths = [width, 2 * width, 4 * width, 8 * width]
        c_in = width
        for i, c_out in enumerate(widths):
            stage = [
                BasicBlock(c_in if b == 0 else c_out, c_out, (1 if i == 0 else 2) if b == 0 else 1, groups)
                for b in range(blocks)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            c_in = c_out
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.gn1(self.conv1(x)))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean((2, 3)))


def gn_resnet(num_classes: int = 10, width: int = 32, blocks: int = 2, groups: int = 8) -> GNResNet:
    return GNResNet(num_classes, width, blocks, groups)
