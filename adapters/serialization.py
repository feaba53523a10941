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


# safetensors' dtype names, for the writer below.
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def state_to_bytes(state: AdaptationState) -> bytes:
    tensors = to_host(state.tensors)
    meta = json.dumps(dict(state.meta), sort_keys=True, allow_nan=False)
    return safetensors_bytes(tensors, {META_KEY: meta, "format": FORMAT})


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """What `safetensors.torch.save` writes (a blob its reader loads; keys in sorted order), 5-10x faster.

    The format is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
    byte range; `__metadata__`) padded with spaces to a multiple of 8, then the tensors' bytes back to
    back. The library's writer converts tensor by tensor (about 57 us each); a state of one hundred
    small tensors then costs more to store than a shared forward of many streams does to compute.
    Here the bytes are one concatenation. Reading stays with the library, which validates the blob.
    Tensors must be contiguous CPU tensors (`to_host`) of the dtypes in `_DTYPE_NAMES`.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    parts: list[Tensor] = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype not in _DTYPE_NAMES or t.device.type != "cpu" or not t.is_contiguous():
            return st_save(dict(tensors), metadata=dict(metadata))  # anything unusual: the library's way
        size = t.numel() * t.element_size()
        header[key] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        parts.append(t.reshape(-1).view(torch.uint8))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    data = torch.cat(parts).numpy().tobytes() if parts else b""
    return len(head).to_bytes(8, "little") + head + data


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
