"""`rmt` (docs/ALGORITHMS.md §16): its losses in closed form, the warm-up, the teacher EMA, replay, prediction."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import adapters
from adapters.base import ModelHandle
from adapters.cotta import source_params
from adapters.models import ModelSpec, build_handle
from adapters.rmt import (
    PROTOTYPES,
    STUDENT,
    TEACHER,
    RMTConfig,
    contrastive_loss,
    init_projector,
    run,
    source_pool,
    symmetric_cross_entropy,
)

from ._reference import make_batch

RMT = adapters.get_strategy("rmt")
SMALL = {"warmup_samples": 16, "source_size": 16, "source_batch_size": 8}


def _cfg(**kw: object) -> RMTConfig:
    return RMTConfig(**{**SMALL, **kw})  # type: ignore[arg-type]


def test_defaults_are_the_cifar10_c_setting() -> None:
    cfg = RMTConfig()
    assert (cfg.optimizer, cfg.lr, cfg.teacher_momentum) == ("adam", 1e-3, 0.999)
    assert (cfg.lambda_ce_trg, cfg.lambda_cont, cfg.lambda_ce_src) == (1.0, 1.0, 1.0)
    assert (cfg.temperature, cfg.projection_dim, cfg.warmup_samples, cfg.source_batch_size) == (
        0.1,
        128,
        50000,
        200,
    )


def test_symmetric_cross_entropy_in_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    z, z_aug, z_t = (torch.randn(5, 4, generator=gen) for _ in range(3))
    p, p_aug, p_t = z.softmax(1), z_aug.softmax(1), z_t.softmax(1)
    expected = -0.25 * (
        (p_t * p.log()).sum(1)
        + (p * p_t.log()).sum(1)
        + (p_t * p_aug.log()).sum(1)
        + (p_aug * p_t.log()).sum(1)
    )
    torch.testing.assert_close(symmetric_cross_entropy(z, z_aug, z_t), expected)


def _supcon_by_hand(views: torch.Tensor, proj: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The supervised-contrastive loss written per anchor: -mean over positives of log softmax over others."""
    b, v, _ = views.shape
    flat = [views[i, k] for k in range(v) for i in range(b)]  # view-major order
    h = [F.relu(proj["rmt.projector.0.weight"] @ f + proj["rmt.projector.0.bias"]) for f in flat]
    z = [F.normalize(proj["rmt.projector.2.weight"] @ x + proj["rmt.projector.2.bias"], dim=0) for x in h]
    losses = []
    for a in range(b * v):
        others = [j for j in range(b * v) if j != a]
        denom = torch.logsumexp(torch.stack([z[a] @ z[j] / temperature for j in others]), 0)
        positives = [j for j in others if j % b == a % b]
        losses.append(-torch.stack([z[a] @ z[j] / temperature - denom for j in positives]).mean())
    return torch.stack(losses).mean()


def test_contrastive_loss_matches_the_per_anchor_definition() -> None:
    gen = torch.Generator().manual_seed(1)
    views = torch.randn(4, 3, 6, generator=gen)
    proj = init_projector(6, 5, seed=3, like=views)
    torch.testing.assert_close(
        contrastive_loss(views, proj, 0.1), _supcon_by_hand(views, proj, 0.1), rtol=1e-5, atol=1e-5
    )
    # Views that agree with their own sample's views lose less than views shuffled across samples.
    aligned = views[:, :1].repeat(1, 3, 1) + 0.01 * torch.randn(4, 3, 6, generator=gen)
    assert contrastive_loss(aligned, proj, 0.1) < contrastive_loss(views, proj, 0.1)


def test_projector_initialisation_is_seeded_and_in_nn_linear_bounds() -> None:
    like = torch.zeros(1)
    a, b, c = (init_projector(16, 8, seed=s, like=like) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(
        a["rmt.projector.0.weight"], c["rmt.projector.0.weight"]
    )
    assert a["rmt.projector.0.weight"].shape == (8, 16) and a["rmt.projector.2.weight"].shape == (8, 8)
    assert float(a["rmt.projector.0.weight"].abs().max()) <= 1 / 16**0.5
    assert float(a["rmt.projector.2.bias"].abs().max()) <= 1 / 8**0.5


def test_no_warm_up_starts_from_the_source_and_a_warm_up_moves_the_student(tiny_handle: ModelHandle) -> None:
    src = source_params(tiny_handle)
    cold = RMT.init_state(tiny_handle, _cfg(warmup_samples=0))
    assert all(torch.equal(cold.tensors[STUDENT + n], p) for n, p in src.items())
    assert all(torch.equal(cold.tensors[TEACHER + n], p) for n, p in src.items())
    assert cold.meta["opt_steps"] == 0
    warm = RMT.init_state(tiny_handle, _cfg(warmup_samples=32))
    assert warm.meta["opt_steps"] == 4  # 32 samples in batches of 8
    moved = [n for n, p in src.items() if not torch.equal(warm.tensors[STUDENT + n], p)]
    assert moved
    for n in moved:  # the teacher trails the student: an EMA with m = 0.999 moved it far less
        student_step = (warm.tensors[STUDENT + n] - src[n]).abs().sum()
        teacher_step = (warm.tensors[TEACHER + n] - src[n]).abs().sum()
        assert teacher_step < student_step
    again = RMT.init_state(tiny_handle, _cfg(warmup_samples=32))
    assert all(torch.equal(warm.tensors[k], again.tensors[k]) for k in warm.tensors)


def test_prototypes_are_class_means_of_the_source_features(tiny_handle: ModelHandle) -> None:
    cfg = _cfg(warmup_samples=0)
    state = RMT.init_state(tiny_handle, cfg)
    images, labels = source_pool(tiny_handle, cfg, 0)
    feats = run(tiny_handle, source_params(tiny_handle), images[:8])[0]
    feats = torch.cat([feats, run(tiny_handle, source_params(tiny_handle), images[8:16])[0]])
    classes = torch.unique(labels)
    expected = torch.stack([feats[labels == c].mean(0) for c in classes])
    torch.testing.assert_close(state.tensors[PROTOTYPES], expected, rtol=1e-5, atol=1e-6)
    # The tiny model's source data is a .npy array without labels: the source model labels it.
    with torch.no_grad():
        torch.testing.assert_close(labels, tiny_handle.model(images).argmax(1))


def test_a_step_predicts_student_plus_teacher_and_moves_the_teacher_by_ema(tiny_handle: ModelHandle) -> None:
    cfg = _cfg(teacher_momentum=0.9, lr=1e-2)
    state = RMT.init_state(tiny_handle, cfg)
    x = make_batch(8, seed=4)
    before = RMT.step(tiny_handle, x, state, cfg, adapt=False)
    result = RMT.step(tiny_handle, x, state, cfg)
    torch.testing.assert_close(result.logits, before.logits, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in tiny_handle.model.named_parameters()]
    _, z, _ = run(tiny_handle, {n: state.tensors[STUDENT + n] for n in names}, x.float())
    _, z_t, _ = run(tiny_handle, {n: state.tensors[TEACHER + n] for n in names}, x.float())
    torch.testing.assert_close(before.logits, z + z_t, rtol=1e-5, atol=1e-5)
    for n in names:
        new_s, new_t = result.state.tensors[STUDENT + n], result.state.tensors[TEACHER + n]
        torch.testing.assert_close(
            new_t, 0.9 * state.tensors[TEACHER + n] + 0.1 * new_s, rtol=1e-5, atol=1e-6
        )
    assert (
        result.state.meta["proj_steps"] == 1 and result.state.meta["opt_steps"] == state.meta["opt_steps"] + 1
    )
    assert torch.equal(result.state.tensors[PROTOTYPES], state.tensors[PROTOTYPES])


@pytest.mark.parametrize("term", ["lambda_ce_src", "lambda_cont", "lambda_ce_trg"])
def test_each_loss_term_changes_the_update(tiny_handle: ModelHandle, term: str) -> None:
    x = make_batch(8, seed=5)
    full = _cfg(warmup_samples=0)
    without = _cfg(warmup_samples=0, **{term: 0.0})
    a = RMT.step(tiny_handle, x, RMT.init_state(tiny_handle, full), full).state
    b = RMT.step(tiny_handle, x, RMT.init_state(tiny_handle, without), without).state
    name = STUDENT + next(n for n, _ in tiny_handle.model.named_parameters())
    assert not torch.equal(a.tensors[name], b.tensors[name])


def test_replay_uses_the_labels_of_a_labelled_archive(tmp_path: Path, tiny_spec: ModelSpec) -> None:
    """A JPEG archive with labels: the pool's labels are the archive's, drawn like its images."""
    rng = np.random.default_rng(0)
    blobs, labels = [], rng.integers(0, 10, size=12).astype(np.uint8)
    for _ in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    archive = tmp_path / "src.npz"
    np.savez(
        archive,
        jpeg=np.concatenate(blobs),
        offsets=offsets,
        labels=labels,
        classes=np.array(list("abcdefghij")),
    )
    handle = build_handle(tiny_spec.model_copy(update={"source_data": archive}))
    assert handle.source_labels is not None
    images, got = source_pool(handle, _cfg(source_size=12), seed=2)
    order = np.random.default_rng(2).choice(12, size=12, replace=False)
    assert got.tolist() == labels[order].astype(np.int64).tolist() and images.shape == (12, 3, 16, 16)
    cfg = _cfg(source_size=12)
    result = RMT.step(handle, make_batch(8, seed=6), RMT.init_state(handle, cfg), cfg)
    assert torch.isfinite(result.logits).all()


def test_a_model_without_source_data_is_refused(tiny_spec: ModelSpec) -> None:
    handle = build_handle(tiny_spec.model_copy(update={"source_data": None}))
    with pytest.raises(adapters.IncompatibleModelError, match="source data"):
        RMT.init_state(handle, _cfg())
