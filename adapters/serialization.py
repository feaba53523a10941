"""AdaptationState <-> bytes: safetensors for the tensors, JSON meta in the safetensors header.

No pickle anywhere: a blob from an untrusted store can at worst be refused, never execute code.
"""

from __future__ import annotations

import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.base import AdaptationState, StateMismatchError

META_KEY = "tta_meta"
FORMAT = "tta-state-1"


class CorruptStateError(StateMismatchError):
    """A stored blob could not be decoded."""

    error_type = "state_corrupt"


def state_to_bytes(state: AdaptationState) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.tensors.items()}
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
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return AdaptationState(tensors, meta)
