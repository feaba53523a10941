"""Seeded batch augmentations of the mean-teacher methods (ROID's consistency view, CoTTA's teacher averaging).

The references (mariodoebler/test-time-adaptation, `get_tta_transforms`) apply one random parameter draw per
call to the whole batch: colour jitter (brightness, contrast, saturation, hue, gamma in a random order),
padding by half the image size, a random affine transform (rotation, translation, scale), then for CoTTA a
Gaussian blur, a centre crop back to the input size, a horizontal flip with probability 1/2 and Gaussian
noise. Here every draw comes from a `torch.Generator` seeded by the caller (the stream's seed and step), so a
step stays a pure function of its inputs. Inputs are float images in [0, 1], NCHW.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def tta_augment(x: Tensor, gen: torch.Generator, *, padding_mode: str = "edge", cotta: bool = True) -> Tensor:
    """One random augmentation of the whole batch `x` (the references' non-"soft" ranges).

    `cotta=True` adds the blur and noise of CoTTA's transform; False is ROID's (no blur, no noise).
    """
    size = x.shape[-2:]
    x = x.clamp(0, 1)
    for op in torch.randperm(5, generator=gen).tolist():
        if op == 0:
            x = TF.adjust_brightness(x, _uniform(gen, 0.6, 1.4))
        elif op == 1:
            x = TF.adjust_contrast(x, _uniform(gen, 0.7, 1.3))
        elif op == 2:
            x = TF.adjust_saturation(x, _uniform(gen, 0.5, 1.5))
        elif op == 3:
            x = TF.adjust_hue(x, _uniform(gen, -0.06, 0.06))
        else:
            x = TF.adjust_gamma(x.clamp(1e-8, 1.0), _uniform(gen, 0.7, 1.3))
    pad = int(size[0] / 2)
    x = TF.pad(x, [pad], padding_mode=padding_mode)
    max_dx = size[1] / 16 * 1.0
    max_dy = size[0] / 16 * 1.0
    # torchvision's RandomAffine: translation a whole number of pixels up to 1/16 of the (padded) image.
    dx = round(_uniform(gen, -1, 1) * max_dx * x.shape[-1] / size[1])
    dy = round(_uniform(gen, -1, 1) * max_dy * x.shape[-2] / size[0])
    x = TF.affine(
        x,
        angle=_uniform(gen, -15, 15),
        translate=[dx, dy],
        scale=_uniform(gen, 0.9, 1.1),
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=[0.0],
    )
    if cotta:
        x = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[_uniform(gen, 0.001, 0.5)])
    x = TF.center_crop(x, list(size))
    if float(torch.rand((), generator=gen)) < 0.5:
        x = TF.hflip(x)
    if cotta:
        noise = torch.randn(x.shape, generator=gen).to(x.device) * 0.005
        x = x + noise
    return x.clamp(0, 1)


def generator_for(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator whose draws depend only on the stream's seed, its step count and a salt."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))
