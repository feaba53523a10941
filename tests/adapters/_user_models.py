"""User-defined networks loaded through `ModelSpec(factory="tests.adapters._user_models:<name>")`:
a small GroupNorm ResNet and a tiny ViT-like LayerNorm model (no BatchNorm in either), and a
BatchNorm network built from keyword arguments."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _GNBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(out)) + self.shortcut(x))


class GNResNet(nn.Module):
    """A ResNet with GroupNorm: stem, `layer1`..`layer4` of one basic block each, pooled linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.GroupNorm(groups, width), nn.ReLU()
        )
        chans = [width, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", _GNBlock(chans[i], chans[i + 1], stride, groups))
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(x.mean((2, 3)))


def gn_resnet(num_classes: int = 10, width: int = 8, groups: int = 4) -> GNResNet:
    return GNResNet(num_classes, width, groups)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT layout as in timm: `patch_embed`, `blocks.<i>` (LayerNorm `norm1`/`norm2`), final `norm`, `head`."""

    def __init__(
        self, num_classes: int = 10, img_size: int = 16, patch: int = 4, dim: int = 32, depth: int = 4
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, 2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def tiny_vit(num_classes: int = 10, img_size: int = 16, depth: int = 4) -> TinyViT:
    return TinyViT(num_classes, img_size, depth=depth)


def bn_convnet(width: int = 8) -> nn.Module:
    """A factory without a `num_classes` parameter: its kwargs alone define it (10 classes)."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


NOT_CALLABLE = 3
