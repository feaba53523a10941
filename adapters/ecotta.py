"""EcoTTA: a frozen network with light meta networks and self-distilled regularisation (docs/ALGORITHMS.md §14).

The network's residual blocks (the children of its `nn.Sequential` stages that hold a convolution and a
normalisation layer) are cut into `partitions` consecutive parts. Each part k gets a meta network: a
BatchNorm over the part's output and a conv block (3x3 convolution from the part's input channels to its
output channels, with the part's stride, BatchNorm, ReLU). With x the part's input and f_k the frozen part,

    part_k(x) = BN_k(f_k(x)) + ReLU(BN'_k(conv_k(x)))

Only the meta networks train; every BatchNorm normalises with the test batch's statistics. Before serving,
the meta networks are warmed up on labelled source data (cross-entropy plus the regulariser below, the
network frozen), made by
`tta-bench prepare-source --strategies ecotta` or at a stream's first use. At test time one Adam step
minimises the mean entropy of the samples with entropy below `e_margin * ln C`, plus `reg_weight` times the
self-distilled regulariser sum_k mean |part_k(x) - f_k(x)| (the meta networks must not take a part's output
far from the frozen part's own). The state is the meta networks and their Adam moments, about 6 % of the
network's parameters three times over: a small fraction of a mean teacher's four full copies.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from adapters._augment import generator_for
from adapters._memo import Memo, memo_of
from adapters._optim import OPT_PREFIX, OptimConfig, init_optim_state, optim_step
from adapters._strategy import ComposedStrategy, Forward, StatPlan, UpdateOutcome
from adapters.base import AFFINE_KINDS, AdaptationState, IncompatibleModelError, ModelHandle
from adapters.cotta import labelled_source, run, source_params, working_copy
from adapters.losses import entropy_margin, softmax_entropy
from adapters.registry import register_strategy
from adapters.source import BatchStats

META = "ecotta.meta."
WARM_PREFIX = "ecotta.warm."
# Each meta network's tensors, `ecotta.meta.<part>.<name>`: the conv, then the two BatchNorms' affines.
_PARTS = ("conv", "conv_bn_w", "conv_bn_b", "out_bn_w", "out_bn_b")


class EcoTTAConfig(OptimConfig):
    partitions: int = Field(5, ge=1, le=64, description="parts the residual blocks are cut into (K)")
    reg_weight: float = Field(0.5, ge=0, description="weight of the self-distilled regulariser (lambda)")
    e_margin: float = Field(0.4, gt=0, le=1, description="entropy filter: keep samples below e_margin * ln C")
    warmup_steps: int = Field(200, ge=0, le=100_000, description="source batches of the meta warm-up")
    warmup_batch_size: int = Field(64, ge=2, le=1024)
    warmup_lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate of the warm-up")
    source_size: int = Field(
        10000, ge=2, le=1_000_000, description="labelled source images drawn for the warm-up (at most all)"
    )


@dataclass(frozen=True)
class Part:
    """One partition: its first and last block (module names in the network) and its meta conv's shape."""

    first: str
    last: str
    in_channels: int
    out_channels: int
    stride: int


def residual_blocks(net: nn.Module) -> list[str]:
    """Names of the network's blocks, in forward order: the children of `nn.Sequential` stages that hold a
    convolution and a normalisation layer (WideResNet's and torchvision ResNet's blocks, DenseNet's dense
    blocks and transitions), in stages of at least two such children."""

    def is_block(m: nn.Module) -> bool:
        mods = list(m.modules())
        has_conv = any(isinstance(x, nn.Conv2d) for x in mods)
        has_norm = any(isinstance(x, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm) for x in mods)
        return has_conv and has_norm

    blocks: list[str] = []
    for name, module in net.named_modules():
        if not isinstance(module, nn.Sequential) or len(module) == 0:
            continue
        if any(name == b or name.startswith(b + ".") for b in blocks):
            continue  # a block already taken, or inside one (e.g. a downsample branch)
        # A stage: a Sequential of blocks, or with two or more among its children (DenseNet's `features` also
        # holds its stem convolution, pooling and the final norm, which stay inside or outside the parts).
        children = list(module.named_children())
        found = [f"{name}.{child}" if name else child for child, m in children if is_block(m)]
        if len(found) >= 2 or (found and len(found) == len(children)):
            blocks.extend(found)
    return blocks


def partition_sizes(n_blocks: int, k: int) -> list[int]:
    """k consecutive groups: n // k blocks each, the remainder in the last (18 blocks, k=5: 3,3,3,3,6)."""
    k = min(k, n_blocks)
    base = n_blocks // k
    return [base] * (k - 1) + [n_blocks - base * (k - 1)]


def _parts(handle: ModelHandle, k: int) -> list[Part]:
    return _memo(handle).get(("parts", k), lambda: _find_parts(handle, k))


def _find_parts(handle: ModelHandle, k: int) -> list[Part]:
    net = working_copy(handle)
    blocks = residual_blocks(net)
    if not blocks:
        raise IncompatibleModelError(
            f"ecotta attaches meta networks to residual blocks, and model {handle.model_id!r} has none it "
            "recognises (children of nn.Sequential stages holding a convolution and a normalisation layer)"
        )
    groups, start = [], 0
    for size in partition_sizes(len(blocks), k):
        groups.append((blocks[start], blocks[start + size - 1]))
        start += size
    # A probe forward records each block's input and output, to check that the blocks form one chain (each
    # block consumes its predecessor's output, or both sit in one Sequential) and to size the meta convs.
    seen: list[tuple[str, Tensor, Tensor]] = []

    def record(name: str, args: tuple[Any, ...], out: Any) -> None:  # returns None: the forward is unchanged
        if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            seen.append((name, args[0], out))

    modules = dict(net.named_modules())
    hooks = [modules[b].register_forward_hook(lambda m, a, o, n=b: record(n, a, o)) for b in blocks]
    h, w = handle.input_size
    try:
        with torch.no_grad():
            run(handle, source_params(handle), torch.zeros(2, 3, h, w, device=handle.device))
    finally:
        for hook in hooks:
            hook.remove()
    order = [name for name, _, _ in seen]
    chained = order == blocks and all(
        prev[0].rsplit(".", 1)[0] == cur[0].rsplit(".", 1)[0] or prev[2] is cur[1]
        for prev, cur in itertools.pairwise(seen)
    )
    if not chained:
        raise IncompatibleModelError(
            f"ecotta: the blocks of model {handle.model_id!r} do not form one chain (parallel branches, or "
            "blocks run out of order), so no partition of them has one input and one output"
        )
    shapes = {name: (tuple(x.shape), tuple(y.shape)) for name, x, y in seen}
    parts = []
    for first, last in groups:
        x, y = shapes[first][0], shapes[last][1]
        if len(x) != 4 or len(y) != 4 or not (0 < y[2] <= x[2] and 0 < y[3] <= x[3]):
            raise IncompatibleModelError(
                f"ecotta: the blocks {first}..{last} of model {handle.model_id!r} map {tuple(x)} to "
                f"{tuple(y)}, which a strided convolution cannot follow"
            )
        parts.append(Part(first, last, int(x[1]), int(y[1]), max(1, round(x[2] / y[2]))))
    return parts


def init_meta(handle: ModelHandle, cfg: EcoTTAConfig, seed: int) -> dict[str, Tensor]:
    """Fresh meta networks: He-initialised convolutions (seeded), identity BatchNorm affines."""
    gen = generator_for(seed, 0, salt=21)
    out: dict[str, Tensor] = {}
    for i, p in enumerate(_parts(handle, cfg.partitions)):
        fan_in = p.in_channels * 9
        w = torch.randn(p.out_channels, p.in_channels, 3, 3, generator=gen) * math.sqrt(2.0 / fan_in)
        out[f"{META}{i}.conv"] = w.to(handle.device)
        for name, value in zip(_PARTS[1:], (1.0, 0.0, 1.0, 0.0), strict=True):
            out[f"{META}{i}.{name}"] = torch.full((p.out_channels,), value, device=handle.device)
    return out


def meta_output(meta: Mapping[str, Tensor], i: int, part: Part, x: Tensor, frozen_out: Tensor) -> Tensor:
    """part_k(x) = BN_k(f_k(x)) + ReLU(BN'_k(conv_k(x))), both BatchNorms over the batch's statistics."""
    z = F.conv2d(x, meta[f"{META}{i}.conv"], stride=part.stride, padding=1)
    if z.shape[-2:] != frozen_out.shape[-2:]:  # an odd size the stride does not hit (Inception's 35 -> 17)
        z = F.adaptive_avg_pool2d(z, (int(frozen_out.shape[-2]), int(frozen_out.shape[-1])))
    z = F.batch_norm(z, None, None, meta[f"{META}{i}.conv_bn_w"], meta[f"{META}{i}.conv_bn_b"], training=True)
    y = F.batch_norm(
        frozen_out, None, None, meta[f"{META}{i}.out_bn_w"], meta[f"{META}{i}.out_bn_b"], training=True
    )
    return y + F.relu(z)


@contextlib.contextmanager
def attached(
    handle: ModelHandle, meta: Mapping[str, Tensor], parts: list[Part], regs: list[Tensor] | None
) -> Iterator[None]:
    """The meta networks hooked onto this thread's working copy of the network for the `with` body; each
    part's regulariser mean |part_k(x) - f_k(x)| is appended to `regs` when given."""
    modules = dict(working_copy(handle).named_modules())
    hooks = []
    for i, part in enumerate(parts):
        inputs: list[Tensor] = []

        def keep_input(m: nn.Module, args: tuple[Any, ...], store: list[Tensor] = inputs) -> None:
            store.append(args[0])

        def add_meta(
            m: nn.Module, args: Any, out: Tensor, i: int = i, part: Part = part, store: list[Tensor] = inputs
        ) -> Tensor:
            y = meta_output(meta, i, part, store.pop(), out)
            if regs is not None:
                regs.append((y - out.detach()).abs().mean())
            return y

        hooks.append(modules[part.first].register_forward_pre_hook(keep_input))
        hooks.append(modules[part.last].register_forward_hook(add_meta))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def meta_forward(
    handle: ModelHandle, meta: Mapping[str, Tensor], x: Tensor, partitions: int, record: bool = False
) -> tuple[Tensor, StatPlan, list[Tensor]]:
    """Logits of the frozen network with the meta networks, its stat plan, and each part's regulariser."""
    regs: list[Tensor] = []
    with attached(handle, meta, _parts(handle, partitions), regs):
        logits, plan = run(handle, source_params(handle), x, record=record)
    return logits, plan, regs


# ---------------------------------------------------------------------------------------------- warm-up


def warm_key(cfg: EcoTTAConfig, seed: int) -> str:
    fields = cfg.model_dump(
        include={"partitions", "warmup_steps", "warmup_batch_size", "warmup_lr", "source_size"}
    )
    return hashlib.sha256(json.dumps([sorted(fields.items()), seed]).encode()).hexdigest()[:16]


def prepared_prefix(cfg: EcoTTAConfig, seed: int) -> str:
    """Key prefix of warmed-up meta networks in a source artefact (`ModelHandle.prepared`)."""
    return f"{WARM_PREFIX}{warm_key(cfg, seed)}."


def warm_meta(handle: ModelHandle, cfg: EcoTTAConfig, seed: int) -> dict[str, Tensor]:
    """The meta networks every stream of `seed` starts from: prepared, memoised or warmed up now."""
    prefix = prepared_prefix(cfg, seed)
    names = [f"{META}{i}.{t}" for i in range(len(_parts(handle, cfg.partitions))) for t in _PARTS]
    if all(prefix + n in handle.prepared for n in names):  # made by `tta-bench prepare-source`
        return {n: handle.prepared[prefix + n].to(handle.device) for n in names}
    if cfg.warmup_steps > 0 and handle.source_images is None:
        raise IncompatibleModelError(
            f"model {handle.model_id!r} declares no source data, which ecotta's meta-network warm-up needs; "
            "set warmup_steps=0 to start from untrained meta networks"
        )
    warmed: dict[str, Tensor] = _memo(handle).get(("warm", prefix), lambda: _warm_up(handle, cfg, seed))
    return warmed


def _warm_up(handle: ModelHandle, cfg: EcoTTAConfig, seed: int) -> dict[str, Tensor]:
    meta = init_meta(handle, cfg, seed)
    if cfg.warmup_steps == 0:
        return meta
    images, labels = labelled_source(handle, cfg.source_size, seed, cfg.warmup_batch_size)
    warm_cfg = cfg.model_copy(update={"lr": cfg.warmup_lr})
    opt = init_optim_state(meta, warm_cfg)
    gen = generator_for(seed, 0, salt=22)
    order = torch.randperm(images.shape[0], generator=gen)
    pos = 0
    for step in range(cfg.warmup_steps):
        if pos + cfg.warmup_batch_size > order.numel():
            order, pos = torch.randperm(images.shape[0], generator=gen), 0
        idx = order[pos : pos + cfg.warmup_batch_size]
        pos += cfg.warmup_batch_size
        x, y = images[idx].to(handle.device), labels[idx].to(handle.device)
        params = {k: v.detach().requires_grad_(True) for k, v in meta.items()}
        with torch.enable_grad():
            logits, _, regs = meta_forward(handle, params, x, cfg.partitions)
            # The regulariser too: meta networks warmed up to stay near the frozen parts start the stream
            # where its own regulariser holds them, not where it would first pull them back.
            loss = F.cross_entropy(logits, y) + cfg.reg_weight * torch.stack(regs).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
        meta, opt = optim_step(params, dict(zip(params, grads, strict=True)), opt, step, warm_cfg)
        meta = {k: v.detach() for k, v in meta.items()}
    return meta


# Per handle, for its life: the parts (a probe forward) and the warmed-up meta networks (warmup_steps
# forward and backward passes) are deterministic functions of the immutable handle, the config and the seed.
def _memo(handle: ModelHandle) -> Memo[tuple[Any, ...], Any]:
    return memo_of(handle, "ecotta", 8)


# ---------------------------------------------------------------------------------------------- updater


class EcoTTAUpdater:
    name = "ecotta"
    config_cls = EcoTTAConfig
    autocast_ok = False
    affine_kinds = AFFINE_KINDS

    def init_state(
        self, handle: ModelHandle, cfg: EcoTTAConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        meta = {k: v.clone() for k, v in warm_meta(handle, cfg, seed).items()}
        # The partition count goes into the meta: `predict` is not given the config.
        return {**meta, **init_optim_state(meta, cfg)}, {"opt_steps": 0, "partitions": cfg.partitions}

    def predict(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, forward: Forward
    ) -> tuple[Tensor, StatPlan]:
        """adapt=false: the network with the stream's meta networks, no update."""
        meta = {k: v for k, v in state.tensors.items() if k.startswith(META)}
        logits, plan, _ = meta_forward(handle, meta, x, int(state.meta["partitions"]), record=True)
        return logits, plan

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: EcoTTAConfig, forward: Forward
    ) -> UpdateOutcome:
        names = [k for k in state.tensors if k.startswith(META)]
        params = {k: state.tensors[k].detach().requires_grad_(True) for k in names}
        with torch.enable_grad():
            logits, plan, regs = meta_forward(handle, params, x, cfg.partitions, record=True)
            ent = softmax_entropy(logits)
            keep = ent.detach() < entropy_margin(cfg.e_margin, logits.shape[1])
            kept = int(keep.sum())  # the step's one host synchronisation: is there an entropy term at all
            # `where`, not a product with the mask: a non-finite entropy of a dropped sample stays out.
            loss = torch.where(keep, ent, 0).sum() / max(kept, 1)
            if cfg.reg_weight > 0:
                loss = loss + cfg.reg_weight * torch.stack(regs).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
        opt_state = {k: v for k, v in state.tensors.items() if k.startswith(OPT_PREFIX)}
        step = int(state.meta.get("opt_steps", 0))
        new_meta, new_opt = optim_step(params, dict(zip(names, grads, strict=True)), opt_state, step, cfg)
        tensors = {**new_meta, **new_opt}
        meta = {"opt_steps": step + 1, "partitions": cfg.partitions}
        return UpdateOutcome(
            logits.detach(),
            plan,
            tensors,
            meta,
            used=kept,
            filtered=x.shape[0] - kept,
            updated=True,
            loss=loss.detach(),
        )


@register_strategy
def ecotta() -> ComposedStrategy:
    summary = "frozen network, light meta networks warmed up on source data, self-distilled regulariser"
    return ComposedStrategy("ecotta", summary, BatchStats(required=False), EcoTTAUpdater())
