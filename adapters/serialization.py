"""AdaptationState <-> bytes: safetensors for the tensors, JSON meta in the safetensors header.

No pickle anywhere: a blob from an untrusted store can at worst be refused, never execute code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from adapters.base import AdaptationState, StateMismatchError

META_KEY = "tta_meta"
FORMAT = "tta-state-1"


class CorruptStateError(StateMismatchError):
    """A stored blob could not be decoded."""

    error_type = "state_corrupt"


def state_to_bytes(state: AdaptationState) -> bytes:
    tensors = to_host(state.tensors)
    meta = json.dumps(dict(state.meta), sort_keys=True, allow_nan=False)
    return st_save(tensors, metadata={META_KEY: meta, "format": FORMAT})


def state_from_bytes(blob: bytes, device: torch.device | str = "cpu") -> AdaptationState:
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len])
        info = header.get("__metadata__") or {}
        if info.get("format") != FORMAT:
            raise CorruptStateError(f"unknown state format {info.get('format')!r}")
        meta = json.loads(info[META_KEY])
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CorruptStateError(f"stored state is corrupt: {exc}") from exc
    if not isinstance(meta, dict):
        raise CorruptStateError(f"stored state meta is not a JSON object: {type(meta).__name__}")
    if torch.device(device).type != "cpu":
        tensors = move_grouped(tensors, torch.device(device))
    return AdaptationState(tensors, meta)


def to_host(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies of `tensors`, each its own storage (safetensors refuses shared storage).

    Device tensors cross in one copy per dtype (`move_grouped`), not one per tensor: a state holds up to
    hundreds of tensors, and every device-to-host copy waits for the device.
    """
    if any(t.device.type != "cpu" for t in tensors.values()):
        tensors = move_grouped(tensors, torch.device("cpu"))
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        shared = t.numel() > 0 and ptr in seen
        seen.add(ptr)
        out[key] = t.clone(memory_format=torch.contiguous_format) if shared else t.contiguous()
    return out


def move_grouped(tensors: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """`tensors` on `device` with one transfer per (device, dtype) group: each group is flattened into one
    buffer, moved, and split back, so the results are views of that buffer. Keys keep their order."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, t in tensors.items():
        groups.setdefault((t.device, t.dtype), []).append(key)
    moved: dict[str, Tensor] = {}
    for keys in groups.values():
        parts = [tensors[k].detach() for k in keys]
        flat = torch.cat([t.reshape(-1) for t in parts]).to(device)
        for key, t, chunk in zip(keys, parts, flat.split([t.numel() for t in parts]), strict=True):
            moved[key] = chunk.view(t.shape)
    return {k: moved[k] for k in tensors}
