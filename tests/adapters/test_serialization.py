"""Moving a state's tensors in one transfer per dtype, and host copies that safetensors accepts."""

from __future__ import annotations

import torch

from adapters.base import AdaptationState
from adapters.serialization import move_grouped, state_from_bytes, state_to_bytes, to_host


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
