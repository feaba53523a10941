"""`cotta`: continual test-time adaptation with a weight- and augmentation-averaged mean teacher and stochastic
restoration (docs/ALGORITHMS.md §15).

Every parameter of the network trains (a student), over test-batch statistics. Per adapting batch:

1. the student's logits z_s; the anchor (the source weights) gives the mean max-probability a of the batch;
2. the teacher (an EMA of the student) predicts z_t on the batch, or, when a < `ap`, the mean of its logits over
   `n_augmentations` random augmentations of the batch;
3. loss = mean_i -sum_c softmax(z_t)_c log softmax(z_s)_c (cross-entropy to the teacher); one Adam step;
4. teacher <- m teacher + (1 - m) student (m = 0.999);
5. stochastic restoration: each student weight returns to its source value with probability `rst` (0.01).

The prediction is the teacher's (z_t). Defaults: the reference's CIFAR-10-C setting (Adam lr 1e-3, m 0.999,
rst 0.01, ap 0.92, 32 augmentations). The state holds student and teacher weights and Adam's two moments: four
times the network's parameters. Forwards over per-stream weights run on a per-thread private copy of the network
(`torch.func.functional_call`), so the shared model is never touched.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from adapters._augment import generator_for, tta_augment
from adapters._bn import BatchStatsPlan, active_plan
from adapters._optim import OPT_PREFIX, OptimConfig, init_optim_state, optim_step
from adapters._strategy import ComposedStrategy, Forward, StatPlan, UpdateOutcome
from adapters.base import AFFINE_KINDS, AdaptationState, ModelHandle
from adapters.edge import network_name
from adapters.registry import register_strategy
from adapters.source import BatchStats

STUDENT = "cotta.student."
TEACHER = "cotta.teacher."


class CoTTAConfig(OptimConfig):
    teacher_momentum: float = Field(0.999, ge=0, le=1, description="teacher <- m teacher + (1 - m) student")
    rst: float = Field(0.01, ge=0, le=1, description="per-weight probability of restoring the source value")
    ap: float = Field(
        0.92, ge=0, le=1, description="augment the teacher when the anchor's confidence is below"
    )
    n_augmentations: int = Field(32, ge=1, le=256)


_LOCAL = threading.local()


def working_copy(handle: ModelHandle) -> nn.Module:
    """This thread's private copy of the handle's network (frozen, eval mode), for forwards over other weights.

    At most `_COPIES_PER_THREAD` per thread, the least recently used dropped first: a replica serves a few
    models, while a process that loads many (the architecture tests) must not keep a copy of each forever."""
    copies: OrderedDict[str, nn.Module] | None = getattr(_LOCAL, "copies", None)
    if copies is None:
        copies = _LOCAL.copies = OrderedDict()
    key = f"{handle.fingerprint}/{handle.device}"
    net = copies.get(key)
    if net is None:
        net = copy.deepcopy(handle.model).eval()
        net.requires_grad_(False)
        copies[key] = net
        while len(copies) > _COPIES_PER_THREAD:
            copies.popitem(last=False)
    copies.move_to_end(key)
    return net


_COPIES_PER_THREAD = 4


def source_params(handle: ModelHandle) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in handle.model.named_parameters()}


def labelled_source(handle: ModelHandle, n: int, seed: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """n source images (CPU) and their labels; source data without labels (a `.npy` array) is labelled
    with the source model's own predictions. The caller checks that the model has source data."""
    assert handle.source_images is not None
    images = handle.source_images(n, seed)
    if handle.source_labels is not None:
        return images, handle.source_labels(n, seed)
    with torch.no_grad():
        labels = [
            handle.model(images[i : i + batch_size].to(handle.device)).argmax(1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    return images, torch.cat(labels)


class _Plan:
    """Test-batch statistics (the strategy's normaliser) as a StatPlan that changes no stored tensors."""

    def __init__(self, record: bool) -> None:
        self.inner = BatchStatsPlan(None, record)
        self.batch_stats = self.inner.batch_stats
        self.normalize = self.inner.normalize
        self.affine_param = self.inner.affine_param

    def updated_tensors(self) -> dict[str, Tensor]:
        return {}


def run(
    handle: ModelHandle, weights: Mapping[str, Tensor], x: Tensor, record: bool = False
) -> tuple[Tensor, StatPlan]:
    """Logits of the network with `weights` (all parameters) over test-batch statistics."""
    plan = _Plan(record)
    with active_plan(plan):
        logits = torch.func.functional_call(working_copy(handle), dict(weights), (x,))
    return logits.float(), plan


class CoTTAUpdater:
    name = "cotta"
    config_cls = CoTTAConfig
    autocast_ok = False
    affine_kinds = AFFINE_KINDS

    def init_state(
        self, handle: ModelHandle, cfg: CoTTAConfig, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        src = source_params(handle)
        student = {n: p.clone() for n, p in src.items()}
        tensors = {STUDENT + n: p for n, p in student.items()}
        tensors.update({TEACHER + n: p.clone() for n, p in src.items()})
        tensors.update(init_optim_state(student, cfg))
        return tensors, {"opt_steps": 0}

    def predict(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, forward: Forward
    ) -> tuple[Tensor, StatPlan]:
        """adapt=false: the teacher's prediction on the batch (no augmentation)."""
        teacher = {n: state.tensors[TEACHER + n] for n, _ in handle.model.named_parameters()}
        return run(handle, teacher, x, record=True)

    def edge_params(self, handle: ModelHandle, state: AdaptationState) -> dict[str, Tensor]:
        """The export (adapters.edge): adapt=false predicts with the teacher, every parameter of it."""
        return {
            network_name(handle, n): state.tensors[TEACHER + n] for n, _ in handle.model.named_parameters()
        }

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: CoTTAConfig, forward: Forward
    ) -> UpdateOutcome:
        src = source_params(handle)
        names = list(src)
        student = {n: state.tensors[STUDENT + n].detach().requires_grad_(True) for n in names}
        teacher = {n: state.tensors[TEACHER + n] for n in names}
        seed, steps = int(state.meta.get("seed", 0)), int(state.meta.get("steps", 0))
        gen = generator_for(seed, steps, salt=2)
        with torch.no_grad():
            anchor_conf = float(run(handle, src, x)[0].softmax(1).max(1).values.mean())
            if anchor_conf < cfg.ap:
                teacher_logits = torch.stack(
                    [
                        run(handle, teacher, tta_augment(x, gen, cotta=True))[0]
                        for _ in range(cfg.n_augmentations)
                    ]
                ).mean(0)
                plan: StatPlan = run(handle, teacher, x, record=True)[1]
            else:
                teacher_logits, plan = run(handle, teacher, x, record=True)
        with torch.enable_grad():
            student_logits, _ = run(handle, student, x)
            loss = -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1).mean()
            loss = loss + self.extra_loss(handle, student, src, cfg, seed)
            grads = torch.autograd.grad(loss, list(student.values()))
        opt_state = {k: v for k, v in state.tensors.items() if k.startswith(OPT_PREFIX)}
        step = int(state.meta.get("opt_steps", 0))
        by_name = dict(zip(names, grads, strict=True))
        new_student, new_opt = optim_step(student, by_name, opt_state, step, cfg)
        m = cfg.teacher_momentum
        new_teacher = {n: torch.lerp(new_student[n], teacher[n], m) for n in names}
        new_student = self.restore(new_student, by_name, src, gen, cfg)
        tensors: dict[str, Tensor] = {STUDENT + n: v for n, v in new_student.items()}
        tensors.update({TEACHER + n: v for n, v in new_teacher.items()})
        tensors.update(new_opt)
        meta = {"opt_steps": step + 1, "augmented": anchor_conf < cfg.ap}
        return UpdateOutcome(
            teacher_logits, plan, tensors, meta, used=x.shape[0], updated=True, loss=loss.detach()
        )

    def extra_loss(
        self,
        handle: ModelHandle,
        student: Mapping[str, Tensor],
        src: Mapping[str, Tensor],
        cfg: Any,
        seed: int,
    ) -> Tensor | float:
        """A term added to the loss (PETAL's prior); none for CoTTA."""
        return 0.0

    def restore(
        self,
        student: dict[str, Tensor],
        grads: Mapping[str, Tensor],
        src: Mapping[str, Tensor],
        gen: torch.Generator,
        cfg: Any,
    ) -> dict[str, Tensor]:
        """Stochastic restoration: each weight returns to its source value with probability `rst`."""
        if cfg.rst > 0:
            for n in student:
                mask = torch.rand(src[n].shape, generator=gen).to(src[n].device) < cfg.rst
                student[n] = torch.where(mask, src[n], student[n])
        return student


@register_strategy
def cotta() -> ComposedStrategy:
    summary = "mean teacher with augmentation averaging and stochastic restoration (all weights)"
    return ComposedStrategy("cotta", summary, BatchStats(required=False), CoTTAUpdater())
