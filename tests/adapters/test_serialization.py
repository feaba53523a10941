"""Moving a state's tensors in one transfer per dtype, and host copies that safetensors accepts."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.base import AdaptationState
from adapters.serialization import (
    move_grouped,
    safetensors_bytes,
    state_from_bytes,
    state_to_bytes,
    to_host,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(3, generator=gen),
        "a.steps": torch.tensor(7, dtype=torch.int64),
        "a.matrix": torch.randn(4, 5, generator=gen).T,  # not contiguous
        "c.empty": torch.zeros(0, 2),
        "c.scalar": torch.tensor(2.5),
        "d.half": torch.randn(2, 2, generator=gen).to(torch.bfloat16),
    }


def test_move_grouped_keeps_every_tensor_and_the_key_order() -> None:
    tensors = _tensors()
    moved = move_grouped(tensors, torch.device("cpu"))
    assert list(moved) == list(tensors)
    for key, t in tensors.items():
        assert moved[key].dtype == t.dtype and moved[key].shape == t.shape, key
        assert torch.equal(moved[key], t), key


def test_move_grouped_makes_one_buffer_per_dtype() -> None:
    moved = move_grouped(_tensors(), torch.device("cpu"))
    storages = {(t.dtype, t.untyped_storage().data_ptr()) for t in moved.values() if t.numel()}
    assert len(storages) == len({dtype for dtype, _ in storages}) == 3  # float32, int64, bfloat16


def test_host_copies_own_their_storage_and_serialise() -> None:
    tensors = _tensors()
    host = to_host(move_grouped(tensors, torch.device("cpu")))
    pointers = [t.untyped_storage().data_ptr() for t in host.values() if t.numel()]
    assert len(pointers) == len(set(pointers))
    # Views of one buffer (as a state moved from a device is) serialise like separate tensors.
    state = AdaptationState(move_grouped(tensors, torch.device("cpu")), {"strategy": "x"})
    back = state_from_bytes(state_to_bytes(state))
    assert back.meta == {"strategy": "x"}
    for key, t in tensors.items():
        assert torch.equal(back.tensors[key], t), key


def test_the_state_writer_gives_what_the_safetensors_reader_loads(tmp_path: Path) -> None:
    """`safetensors_bytes` writes the format by hand; the library's reader must load every dtype, shape and
    the metadata back exactly, and the library's own writer must give the same tensors."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b.f32": torch.randn(3, 5, generator=gen),
        "a.bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "c.i64": torch.arange(4, dtype=torch.int64),
        "d.bool": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.empty(0, 3),
        "g.u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
    }
    meta = {"format": "x", "tta_meta": '{"k": [1, 2]}'}
    blob = safetensors_bytes(tensors, meta)
    header_len = int.from_bytes(blob[:8], "little")
    assert header_len % 8 == 0
    loaded = st_load(blob)
    assert loaded.keys() == tensors.keys()
    for key, t in tensors.items():
        assert loaded[key].dtype == t.dtype and loaded[key].shape == t.shape
        assert torch.equal(loaded[key], t)
        assert torch.equal(st_load(st_save(tensors, metadata=meta))[key], loaded[key])
    (tmp_path / "state.safetensors").write_bytes(blob)
    with safe_open(str(tmp_path / "state.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)


def test_the_state_writer_refuses_nothing_the_library_takes() -> None:
    """A dtype outside the writer's table goes through the library's writer."""
    blob = safetensors_bytes({"c": torch.ones(2, dtype=torch.complex64)}, {"format": "x"})
    assert torch.equal(st_load(blob)["c"], torch.ones(2, dtype=torch.complex64))
