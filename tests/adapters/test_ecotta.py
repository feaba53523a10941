"""`ecotta` (docs/ALGORITHMS.md §14): partitions, the meta output in closed form, one step against
torch.optim.Adam, the entropy filter, the warm-up, the prepared artefact and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn

import adapters
from adapters import ecotta
from adapters.base import ModelHandle
from adapters.cotta import labelled_source, run, source_params
from adapters.ecotta import META, EcoTTAConfig, Part
from adapters.models import ModelSpec, build_handle
from adapters.models.wide_resnet import WideResNet
from adapters.prepare import prepare_source
from adapters.serialization import state_from_bytes, state_to_bytes

from ._reference import assert_states_equal, make_batch

ECOTTA = adapters.get_strategy("ecotta")
SMALL = {"warmup_steps": 2, "warmup_batch_size": 8, "source_size": 16}


def _cfg(**kw: object) -> EcoTTAConfig:
    return EcoTTAConfig(**{**SMALL, **kw})  # type: ignore[arg-type]


def test_partitions_follow_the_paper_s_wrn_40_split() -> None:
    assert ecotta.partition_sizes(18, 5) == [3, 3, 3, 3, 6]
    assert ecotta.partition_sizes(16, 4) == [4, 4, 4, 4]
    assert ecotta.partition_sizes(3, 5) == [1, 1, 1]  # fewer blocks than parts: one block each
    assert len(ecotta.residual_blocks(WideResNet(40, 2))) == 18
    resnet = ecotta.residual_blocks(torchvision.models.resnet18())
    assert resnet == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]  # downsample branches skipped
    assert ecotta.residual_blocks(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) == []


def test_the_meta_output_in_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    part = Part("a", "b", in_channels=3, out_channels=4, stride=2)
    x, f = torch.randn(5, 3, 8, 8, generator=gen), torch.randn(5, 4, 4, 4, generator=gen)
    meta = {
        f"{META}0.conv": torch.randn(4, 3, 3, 3, generator=gen),
        **{f"{META}0.{k}": torch.randn(4, generator=gen) for k in ("conv_bn_w", "conv_bn_b", "out_bn_w")},
        f"{META}0.out_bn_b": torch.randn(4, generator=gen),
    }

    def bn(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        mean = t.mean((0, 2, 3), keepdim=True)
        var = t.var((0, 2, 3), unbiased=False, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-5) * w[None, :, None, None] + b[None, :, None, None]

    z = F.conv2d(x, meta[f"{META}0.conv"], stride=2, padding=1)
    expected = bn(f, meta[f"{META}0.out_bn_w"], meta[f"{META}0.out_bn_b"]) + torch.relu(
        bn(z, meta[f"{META}0.conv_bn_w"], meta[f"{META}0.conv_bn_b"])
    )
    assert torch.allclose(ecotta.meta_output(meta, 0, part, x, f), expected, atol=1e-5)


def test_the_meta_networks_are_hooked_on_only_for_the_forward(tiny_handle: ModelHandle) -> None:
    cfg = _cfg(warmup_steps=0)
    meta = ecotta.init_meta(tiny_handle, cfg, 0)
    parts = ecotta._parts(tiny_handle, cfg.partitions)
    assert len(parts) == 3 and len(meta) == 5 * len(parts)
    x = make_batch(6, seed=1)
    plain = run(tiny_handle, source_params(tiny_handle), x)[0]
    with_meta, _, regs = ecotta.meta_forward(tiny_handle, meta, x, cfg.partitions)
    assert len(regs) == len(parts) and all(float(r) > 0 for r in regs)
    assert not torch.allclose(with_meta, plain)
    assert torch.equal(run(tiny_handle, source_params(tiny_handle), x)[0], plain)  # hooks removed


def test_one_step_is_filtered_entropy_plus_the_regulariser_under_adam(tiny_handle: ModelHandle) -> None:
    init = ECOTTA.init_state(tiny_handle, _cfg(), 0)
    batch = make_batch(8, seed=2)
    names = [k for k in init.tensors if k.startswith(META)]
    params = [nn.Parameter(init.tensors[k].clone()) for k in names]
    logits, _, regs = ecotta.meta_forward(tiny_handle, dict(zip(names, params, strict=True)), batch, 5)
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    # A margin between the entropies, so that the filter keeps some samples and drops others.
    margin = float(ent.detach().median()) + 1e-4
    keep = ent < margin
    assert 0 < int(keep.sum()) < 8
    cfg = _cfg(e_margin=margin / float(torch.log(torch.tensor(10.0))))
    result = ECOTTA.step(tiny_handle, batch, init, cfg)

    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    loss = ent[keep].mean() + cfg.reg_weight * torch.stack(regs).sum()
    loss.backward()
    opt.step()
    assert result.stats.used == int(keep.sum()) and result.stats.filtered == 8 - int(keep.sum())
    assert result.stats.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for name, p in zip(names, params, strict=True):
        assert torch.allclose(result.state.tensors[name], p.detach(), atol=1e-6), name
    # The answer is the forward the loss was computed on (before the update), as in tent.
    assert torch.allclose(result.logits, logits.detach().float(), atol=1e-5)


def test_a_filtered_out_batch_moves_nothing_without_the_regulariser(tiny_handle: ModelHandle) -> None:
    cfg = _cfg(e_margin=1e-6, reg_weight=0.0)
    state = ECOTTA.init_state(tiny_handle, cfg, 0)
    result = ECOTTA.step(tiny_handle, make_batch(6, seed=3), state, cfg)
    assert result.stats.used == 0 and result.stats.filtered == 6
    for k, v in state.tensors.items():
        if k.startswith(META):
            assert torch.equal(result.state.tensors[k], v), k


def test_the_warm_up_fits_the_source_labels(tiny_handle: ModelHandle) -> None:
    cfg = _cfg(warmup_steps=30, source_size=64, warmup_batch_size=32, warmup_lr=1e-2)
    x, labels = labelled_source(tiny_handle, 64, 0, 32)

    def source_loss(meta: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            logits, _, regs = ecotta.meta_forward(tiny_handle, meta, x, cfg.partitions)
            return float(F.cross_entropy(logits, labels) + cfg.reg_weight * torch.stack(regs).sum())

    before = source_loss(ecotta.init_meta(tiny_handle, cfg, 0))
    after = source_loss(ecotta.warm_meta(tiny_handle, cfg, 0))
    assert after < 0.8 * before
    # Memoised: the next stream of this seed starts from the same tensors without warming up again.
    assert ecotta.warm_meta(tiny_handle, cfg, 0) is ecotta.warm_meta(tiny_handle, cfg, 0)


def test_state_round_trip_repeats_the_step(tiny_handle: ModelHandle) -> None:
    cfg = _cfg()
    state = ECOTTA.init_state(tiny_handle, cfg, 0)
    state = ECOTTA.step(tiny_handle, make_batch(6, seed=4), state, cfg).state
    restored = state_from_bytes(state_to_bytes(state))
    assert_states_equal(state, restored)
    a = ECOTTA.step(tiny_handle, make_batch(6, seed=5), state, cfg)
    b = ECOTTA.step(tiny_handle, make_batch(6, seed=5), restored, cfg)
    assert torch.equal(a.logits, b.logits)
    assert_states_equal(a.state, b.state)
    # adapt=false predicts with the stream's meta networks and leaves the state alone.
    again = ECOTTA.step(tiny_handle, make_batch(6, seed=5), state, cfg, adapt=False)
    assert torch.equal(again.logits, a.logits) and again.state is state


def test_refusals_name_what_is_missing(tiny_spec: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = build_handle(tiny_spec.model_copy(update={"source_data": None}))
    with pytest.raises(adapters.IncompatibleModelError, match="source data"):
        ECOTTA.init_state(handle, _cfg())
    assert ECOTTA.init_state(handle, _cfg(warmup_steps=0)).meta["opt_steps"] == 0
    monkeypatch.setattr(ecotta, "residual_blocks", lambda net: [])
    with pytest.raises(adapters.IncompatibleModelError, match="residual blocks"):
        ECOTTA.init_state(build_handle(tiny_spec), _cfg(partitions=4))


def test_prepared_meta_networks_are_used_instead_of_a_new_warm_up(
    tiny_spec: ModelSpec, tmp_path: Path
) -> None:
    handle = build_handle(tiny_spec)
    tensors = prepare_source(handle, strategies=("ecotta",), seeds=(0,))
    assert tensors and all(k.startswith(ecotta.WARM_PREFIX) for k in tensors)
    path = tmp_path / "tiny.source.safetensors"
    save_file({k: v + 1 for k, v in tensors.items()}, str(path), metadata={"fingerprint": handle.fingerprint})
    loaded = build_handle(tiny_spec.model_copy(update={"source_artifact": path}))
    state = ECOTTA.init_state(loaded, ECOTTA.parse_config({}), 0)
    for key, value in tensors.items():
        assert torch.equal(state.tensors[key.split(".", 3)[-1]], value + 1), key
