#!/usr/bin/env python3
"""Train a GroupNorm ResNet (`adapters.models.gn_resnet`) on the CIFAR-10 JPEG training archive.

    .venv/bin/python scripts/train_source_model.py --out models/cifar10_gn_resnet.safetensors

SGD with Nesterov momentum, cosine learning rate, random crop (4 px padding) and horizontal flips; the
images are decoded once into memory. The defaults made the shipped `cifar10_gn_resnet` (40 epochs: about six
minutes on one GPU, about three hours on one CPU thread). Writes the weights (`.pt` or `.safetensors`) and prints the
models.yaml entry that serves them. `--limit` and `--steps` cut the run short (tests, smoke runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adapters.models.gn_resnet import gn_resnet  # noqa: E402
from tta_data import decode_images, load_jpeg_npz  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10" / "train_jpeg.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="JPEG npz archive (see ../shared/README.md)"
    )
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.pt or .safetensors)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear learning-rate warm-up before the cosine decay",
    )
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images of a seeded shuffle")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimiser steps")
    return p.parse_args(argv)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 4-px-padded crops and horizontal flips of a float NCHW batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train(args: argparse.Namespace) -> dict[str, float]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ds = load_jpeg_npz(args.data)
    order = np.random.default_rng(args.seed).permutation(len(ds))
    if args.limit is not None:
        order = order[: args.limit]
    images = torch.from_numpy(decode_images(ds, order)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    labels = torch.from_numpy(ds.labels[order].astype(np.int64))
    device = torch.device(args.device)
    net = gn_resnet(ds.num_classes, args.width, args.blocks, args.groups).to(device)
    opt = torch.optim.SGD(
        net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay
    )
    per_epoch = max(1, math.ceil(len(order) / args.batch_size))
    total = per_epoch * args.epochs if args.steps is None else min(args.steps, per_epoch * args.epochs)
    warmup = max(1, round(args.warmup_epochs * per_epoch))

    def lr_factor(s: int) -> float:
        # GroupNorm nets diverge at the full rate from random weights: ramp up first.
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(args.seed)
    step, correct, seen, loss_sum, start = 0, 0, 0, 0.0, time.time()
    net.train()
    while step < total:
        perm = torch.randperm(len(order), generator=gen)
        for b in range(per_epoch):
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            x = _augment(images[idx].float().div_(255), gen).to(device)
            y = labels[idx].to(device)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if step % per_epoch == 0 or step == total:
                print(
                    f"step {step}/{total} loss {loss_sum / seen:.4f} train acc {correct / seen:.4f} "
                    f"({time.time() - start:.0f}s)",
                    flush=True,
                )
                correct, seen, loss_sum = 0, 0, 0.0
            if step >= total:
                break
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(args.out))
    else:
        torch.save(state, args.out)
    return {"steps": float(step)}


def models_yaml_entry(args: argparse.Namespace) -> dict[str, object]:
    return {
        "id": f"cifar10_gn_resnet_w{args.width}",
        "factory": "adapters.models.gn_resnet:gn_resnet",
        "kwargs": {"width": args.width, "blocks": args.blocks, "groups": args.groups},
        "num_classes": 10,
        "input_size": [32, 32],
        "weights": str(args.out),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    train(args)
    print("models.yaml entry:", json.dumps(models_yaml_entry(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
