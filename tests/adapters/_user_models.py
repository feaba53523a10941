"""User-defined networks loaded through `ModelSpec(factory="tests.adapters._user_models:<name>")`:
a small GroupNorm ResNet and a tiny ViT-like LayerNorm model (no BatchNorm in either), and a
BatchNorm network built from keyword arguments."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from adapters.models.gn_resnet import gn_resnet as shipped_gn_resnet


def gn_resnet(num_classes: int = 10, width: int = 8, groups: int = 4) -> nn.Module:
    """The shipped GroupNorm ResNet (adapters.models.gn_resnet), narrow and one block per stage: quick to
    step in tests, and built through a factory path of the tests' own."""
    return shipped_gn_resnet(num_classes, width=width, blocks=1, groups=groups)


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
