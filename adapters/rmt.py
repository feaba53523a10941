"""`rmt`: robust mean teacher (docs/ALGORITHMS.md §16; Döbler, Marsden and Yang, "Robust Mean Teacher for
Continual and Gradual Test-Time Adaptation", CVPR 2023).

Every parameter of the network trains (a student, as in CoTTA), over test-batch statistics, with a small
projection head for the contrastive term. Per adapting batch x (B images):

1. the student gives features f (the input of the network's last linear layer) and logits z for x and for
   one random augmentation of x (f', z'); the teacher (an EMA of the student) gives logits z_t for x;
2. each test feature's nearest source prototype (cosine similarity; the class means of the source
   features) is its anchor p; the three views (p, f, f') of every sample go through the projector and
   into a supervised-contrastive loss whose positives are a sample's own views (temperature 0.1);
3. the symmetric cross-entropy between the student and the teacher on both student views,
   SCE = mean_i [H(q_t, q) + H(q, q_t) + H(q_t, q') + H(q', q_t)] / 4 (H(a, b) = -sum a log b);
4. with source replay (`lambda_ce_src` > 0), the cross-entropy of the student on a labelled source batch;
5. one Adam step on lambda_ce_trg SCE + lambda_cont contrastive + lambda_ce_src CE (student and projector),
   then teacher <- m teacher + (1 - m) student (m = 0.999).

The prediction is z + z_t (student and teacher before the step). Before the first test batch the mean
teacher is warmed up on source data (`warmup_samples` images in batches of `source_batch_size`: the
symmetric cross-entropy between student and teacher, the learning rate rising linearly to `lr`); the
warmed-up start and the prototypes depend only on the model, the config and the stream's seed, so they are
made once per process (or by `tta-bench prepare-source`) and every stream of that seed starts from them.

Defaults: the reference's CIFAR-10-C setting (Adam lr 1e-3, m 0.999, lambdas 1, projection 128, temperature
0.1, 50000 warm-up samples in batches of 200). Deviations: the source pool is `source_size` images of the
model's declared source data (the reference replays and averages over the whole training set), and the
augmentation is the project's seeded CoTTA transform (adapters._augment).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from adapters._augment import generator_for, tta_augment
from adapters._bn import active_plan
from adapters._memo import Memo, memo_of
from adapters._optim import OPT_PREFIX, OptimConfig, init_optim_state, optim_step
from adapters._strategy import ComposedStrategy, Forward, StatPlan, UpdateOutcome
from adapters.base import AFFINE_KINDS, AdaptationState, IncompatibleModelError, ModelHandle
from adapters.cotta import _Plan, labelled_source, source_params, working_copy
from adapters.registry import register_strategy
from adapters.source import BatchStats

STUDENT = "rmt.student."
TEACHER = "rmt.teacher."
PROJECTOR = "rmt.projector."
PROTOTYPES = "rmt.prototypes"
# The projector's Adam moments are kept apart from the student's: it first receives gradients at the first
# test batch, after the warm-up, so its bias correction counts its own steps (as torch.optim.Adam's per-tensor
# step counts do).
PROJ_OPT = "rmt.projector_opt."


class RMTConfig(OptimConfig):
    teacher_momentum: float = Field(0.999, ge=0, le=1, description="teacher <- m teacher + (1 - m) student")
    lambda_ce_trg: float = Field(
        1.0, ge=0, description="weight of the student-teacher symmetric cross-entropy"
    )
    lambda_cont: float = Field(
        1.0, ge=0, description="weight of the contrastive alignment to source prototypes"
    )
    lambda_ce_src: float = Field(1.0, ge=0, description="weight of source replay (0: source-free)")
    temperature: float = Field(0.1, gt=0, description="temperature of the contrastive loss")
    projection_dim: int = Field(128, ge=1, le=4096)
    warmup_samples: int = Field(50000, ge=0, le=1_000_000, description="source images of the warm-up")
    source_batch_size: int = Field(
        200, ge=2, le=1024, description="batch of the warm-up, prototypes and replay"
    )
    source_size: int = Field(
        50000, ge=2, le=1_000_000, description="source images drawn for prototypes and replay (at most all)"
    )


# The source pools and warmed-up starts are deterministic functions of the (immutable) model handle (its
# weights and source data), the config and the seed, so they are memoised per handle for the handle's life
# (a warm-up costs warmup_samples forward+backward passes).
def _memo(handle: ModelHandle) -> Memo[tuple[Any, ...], Any]:
    return memo_of(handle, "rmt", 16)


def _classifier(net: nn.Module) -> nn.Linear:
    last = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise IncompatibleModelError("rmt needs a network that ends in a linear classifier (nn.Linear)")
    return last


def run(
    handle: ModelHandle, weights: Mapping[str, Tensor], x: Tensor, record: bool = False
) -> tuple[Tensor, Tensor, StatPlan]:
    """(features, logits, plan) of the network with `weights` over the batch's own statistics; the features
    are the input of its last linear layer."""
    net = working_copy(handle)
    captured: list[Tensor] = []
    hook = _classifier(net).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    plan = _Plan(record)
    try:
        with active_plan(plan):
            logits = torch.func.functional_call(net, dict(weights), (x,))
    finally:
        hook.remove()
    return captured[-1].float().flatten(1), logits.float(), plan


def symmetric_cross_entropy(z: Tensor, z_aug: Tensor, z_t: Tensor) -> Tensor:
    """Per sample [H(q_t, q) + H(q, q_t) + H(q_t, q') + H(q', q_t)] / 4, H(a, b) = -sum_c a_c log b_c."""

    def h(a: Tensor, b: Tensor) -> Tensor:
        return -(a.softmax(1) * b.log_softmax(1)).sum(1)

    return 0.25 * (h(z_t, z) + h(z, z_t) + h(z_t, z_aug) + h(z_aug, z_t))


def pair_cross_entropy(z: Tensor, z_t: Tensor) -> Tensor:
    """Per sample [H(q_t, q) + H(q, q_t)] / 2: the warm-up loss."""
    return -0.5 * (z_t.softmax(1) * z.log_softmax(1)).sum(1) - 0.5 * (z.softmax(1) * z_t.log_softmax(1)).sum(
        1
    )


def project(params: Mapping[str, Tensor], f: Tensor) -> Tensor:
    """The projection head: Linear, ReLU, Linear."""
    h = F.relu(F.linear(f, params[PROJECTOR + "0.weight"], params[PROJECTOR + "0.bias"]))
    return F.linear(h, params[PROJECTOR + "2.weight"], params[PROJECTOR + "2.bias"])


def contrastive_loss(views: Tensor, proj: Mapping[str, Tensor], temperature: float) -> Tensor:
    """Supervised-contrastive loss of (B, V, D) views whose positives are a sample's other views (every view
    is an anchor), after the projector and L2 normalisation."""
    b, v, _ = views.shape
    z = F.normalize(project(proj, torch.cat(views.unbind(1))), dim=1)  # view-major: row k*B + i
    logits = z @ z.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    not_self = ~torch.eye(b * v, dtype=torch.bool, device=z.device)
    same = torch.eye(b, dtype=torch.bool, device=z.device).repeat(v, v) & not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(1, keepdim=True))
    return -((log_prob * same).sum(1) / same.sum(1)).mean()


def init_projector(feature_dim: int, dim: int, seed: int, like: Tensor) -> dict[str, Tensor]:
    """nn.Linear's default initialisation (uniform in +-1/sqrt(fan_in)), drawn from the stream's seed."""
    gen = generator_for(seed, 0, salt=11)

    def uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
        bound = 1 / math.sqrt(fan_in)
        return ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(like.device, like.dtype)

    return {
        PROJECTOR + "0.weight": uniform((dim, feature_dim), feature_dim),
        PROJECTOR + "0.bias": uniform((dim,), feature_dim),
        PROJECTOR + "2.weight": uniform((dim, dim), dim),
        PROJECTOR + "2.bias": uniform((dim,), dim),
    }


def source_pool(handle: ModelHandle, cfg: RMTConfig, seed: int) -> tuple[Tensor, Tensor]:
    """`source_size` labelled source images (CPU), the same for every call with these arguments.

    Source data without labels (a `.npy` array) is labelled with the source model's own predictions, so
    replay then distils the source model (documented in docs/ALGORITHMS.md §16)."""
    if handle.source_images is None:
        raise IncompatibleModelError(
            f"model {handle.model_id!r} declares no source data, which rmt's prototypes, warm-up and replay "
            "need"
        )
    key = ("pool", cfg.source_size, seed)
    pool: tuple[Tensor, Tensor] = _memo(handle).get(
        key, lambda: labelled_source(handle, cfg.source_size, seed, cfg.source_batch_size)
    )
    return pool


def start_key(cfg: RMTConfig, seed: int) -> str:
    """Digest of what the warmed-up start depends on besides the model."""
    fields = cfg.model_dump(
        include={
            *OptimConfig.model_fields,
            "teacher_momentum",
            "warmup_samples",
            "source_batch_size",
            "source_size",
            "projection_dim",
        }
    )
    text = json.dumps([sorted(fields.items()), seed])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepared_prefix(cfg: RMTConfig, seed: int) -> str:
    """Key prefix of a warmed-up start in a source artefact (`ModelHandle.prepared`)."""
    return f"rmt.start.{start_key(cfg, seed)}."


def warm_start(handle: ModelHandle, cfg: RMTConfig, seed: int) -> dict[str, Tensor]:
    """The state every stream of `seed` starts from: the warmed-up student, teacher and Adam moments, the
    projector's initial weights and zero moments, and the source prototypes."""
    prefix = prepared_prefix(cfg, seed)
    prepared = {k.removeprefix(prefix): v for k, v in handle.prepared.items() if k.startswith(prefix)}
    if prepared:  # made by `tta-bench prepare-source`
        return {k: v.to(handle.device) for k, v in prepared.items()}
    start: dict[str, Tensor] = _memo(handle).get(("start", prefix), lambda: _compute_start(handle, cfg, seed))
    return start


def _compute_start(handle: ModelHandle, cfg: RMTConfig, seed: int) -> dict[str, Tensor]:
    images, labels = source_pool(handle, cfg, seed)
    src = source_params(handle)
    names = list(src)
    bs = cfg.source_batch_size
    with torch.no_grad():
        feats = torch.cat(
            [run(handle, src, images[i : i + bs].to(handle.device))[0] for i in range(0, len(images), bs)]
        )
    # Class means of the source features; a class absent from the pool has no prototype.
    classes = torch.unique(labels).to(feats.device)
    onehot = (labels.to(feats.device)[:, None] == classes[None, :]).float()
    prototypes = (onehot.T @ feats) / onehot.sum(0)[:, None]
    student = {n: p.clone() for n, p in src.items()}
    teacher = {n: p.clone() for n, p in src.items()}
    opt = init_optim_state(student, cfg)
    steps = cfg.warmup_samples // bs
    gen = generator_for(seed, 0, salt=13)
    for i in range(steps):
        batch = images[torch.randint(len(images), (bs,), generator=gen)].to(handle.device)
        warm_cfg = cfg.model_copy(update={"lr": cfg.lr * (i + 1) / steps})
        params = {n: student[n].detach().requires_grad_(True) for n in names}
        with torch.enable_grad():
            z = run(handle, params, batch)[1]
            with torch.no_grad():
                z_t = run(handle, teacher, batch)[1]
            loss = pair_cross_entropy(z, z_t).mean()
            grads = torch.autograd.grad(loss, list(params.values()))
        student, opt = optim_step(params, dict(zip(names, grads, strict=True)), opt, i, warm_cfg)
        teacher = {n: torch.lerp(student[n], teacher[n], cfg.teacher_momentum) for n in names}
    proj = init_projector(feats.shape[1], cfg.projection_dim, seed, feats)
    out: dict[str, Tensor] = {STUDENT + n: v for n, v in student.items()}
    out.update({TEACHER + n: v for n, v in teacher.items()})
    out.update(opt)
    out.update(proj)
    out.update({PROJ_OPT + k: v for k, v in init_optim_state(proj, cfg).items()})
    out[PROTOTYPES] = prototypes
    out["rmt.warmup_steps"] = torch.tensor(steps, dtype=torch.int64)
    return {k: v.detach() for k, v in out.items()}


class RMTUpdater:
    name = "rmt"
    config_cls = RMTConfig
    autocast_ok = False
    affine_kinds = AFFINE_KINDS

    def init_state(
        self, handle: ModelHandle, cfg: RMTConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        start = dict(warm_start(handle, cfg, seed))
        warmup = int(start.pop("rmt.warmup_steps"))
        return {k: v.clone() for k, v in start.items()}, {"opt_steps": warmup, "proj_steps": 0}

    def predict(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, forward: Forward
    ) -> tuple[Tensor, StatPlan]:
        """adapt=false: student plus teacher logits on the batch."""
        names = [n for n, _ in handle.model.named_parameters()]
        _, z, plan = run(handle, {n: state.tensors[STUDENT + n] for n in names}, x, record=True)
        _, z_t, _ = run(handle, {n: state.tensors[TEACHER + n] for n in names}, x)
        return z + z_t, plan

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: RMTConfig, forward: Forward
    ) -> UpdateOutcome:
        names = [n for n, _ in handle.model.named_parameters()]
        t = state.tensors
        student = {n: t[STUDENT + n].detach().requires_grad_(True) for n in names}
        teacher = {n: t[TEACHER + n] for n in names}
        proj_names = [k for k in t if k.startswith(PROJECTOR)]
        proj = {k: t[k].detach().requires_grad_(True) for k in proj_names}
        prototypes = t[PROTOTYPES]
        seed, steps = int(state.meta.get("seed", 0)), int(state.meta.get("steps", 0))
        gen = generator_for(seed, steps, salt=12)
        x_aug = tta_augment(x, gen, cotta=True)
        with torch.no_grad():
            _, z_t, _ = run(handle, teacher, x)
        with torch.enable_grad():
            f, z, plan = run(handle, student, x, record=True)
            f_aug, z_aug, _ = run(handle, student, x_aug)
            with torch.no_grad():
                sim = F.normalize(f, dim=1) @ F.normalize(prototypes, dim=1).T
                anchors = prototypes[sim.argmax(1)]
            views = torch.stack([anchors, f, f_aug], dim=1)
            loss = cfg.lambda_ce_trg * symmetric_cross_entropy(z, z_aug, z_t).mean()
            loss = loss + cfg.lambda_cont * contrastive_loss(views, proj, cfg.temperature)
            if cfg.lambda_ce_src > 0:
                images, labels = source_pool(handle, cfg, seed)
                pick = torch.randint(len(images), (cfg.source_batch_size,), generator=gen)
                _, z_src, _ = run(handle, student, images[pick].to(x.device))
                loss = loss + cfg.lambda_ce_src * F.cross_entropy(z_src, labels[pick].to(x.device))
            grads = torch.autograd.grad(loss, [*student.values(), *proj.values()])
        g_student = dict(zip(names, grads[: len(names)], strict=True))
        g_proj = dict(zip(proj_names, grads[len(names) :], strict=True))
        opt = {k: v for k, v in t.items() if k.startswith(OPT_PREFIX)}
        opt_steps, proj_steps = int(state.meta.get("opt_steps", 0)), int(state.meta.get("proj_steps", 0))
        new_student, new_opt = optim_step(student, g_student, opt, opt_steps, cfg)
        proj_opt = {k.removeprefix(PROJ_OPT): v for k, v in t.items() if k.startswith(PROJ_OPT)}
        new_proj, new_proj_opt = optim_step(proj, g_proj, proj_opt, proj_steps, cfg)
        m = cfg.teacher_momentum
        tensors: dict[str, Tensor] = {STUDENT + n: v for n, v in new_student.items()}
        tensors.update({TEACHER + n: torch.lerp(new_student[n], teacher[n], m) for n in names})
        tensors.update(new_opt)
        tensors.update(new_proj)
        tensors.update({PROJ_OPT + k: v for k, v in new_proj_opt.items()})
        tensors[PROTOTYPES] = prototypes
        meta = {"opt_steps": opt_steps + 1, "proj_steps": proj_steps + 1}
        return UpdateOutcome(
            (z + z_t).detach(), plan, tensors, meta, used=x.shape[0], updated=True, loss=loss.detach()
        )


@register_strategy
def rmt() -> ComposedStrategy:
    summary = "robust mean teacher: symmetric CE, contrastive alignment to source prototypes, source replay"
    return ComposedStrategy("rmt", summary, BatchStats(required=False), RMTUpdater())
