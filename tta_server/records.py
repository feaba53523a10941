"""Stored records of a stream, encoded and decoded in one place. Decoding trusts nothing: whatever a
record holds (not JSON, a list, missing or mistyped fields, a negative version), it either yields a valid
value or raises `CorruptRecordError`, which the API answers 409 `state_corrupt`."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Origin = Literal["put", "implicit", "restored"]


class CorruptRecordError(Exception):
    def __init__(self, record: str, reason: str) -> None:
        super().__init__(f"stored {record} record is corrupt: {reason}")
        self.record = record


def new_incarnation() -> str:
    """128 random bits: an incarnation id never repeats, whatever happens to the store."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class Policy:
    """How a stream adapts, and which incarnation of the stream this is."""

    model: str
    strategy: str
    config: dict[str, Any]
    seed: int = 0
    incarnation: str = ""
    origin: Origin = "put"
    created_at: float = field(default_factory=time.time)

    def settings(self) -> tuple[str, str, str, int]:
        """What decides the stream's behaviour (not which incarnation it is)."""
        return self.model, self.strategy, json.dumps(self.config, sort_keys=True), self.seed

    def config_hash(self) -> str:
        raw = json.dumps([self.model, self.strategy, self.config, self.seed], sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    def reincarnated(self, origin: Origin | None = None) -> Policy:
        """The same settings under a fresh incarnation (reset, re-creation, lost state)."""
        return Policy(
            self.model, self.strategy, self.config, self.seed, new_incarnation(), origin or self.origin
        )

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


_POLICY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "strategy": str,
    "config": dict,
    "seed": int,
    "incarnation": str,
    "origin": str,
    "created_at": (int, float),
}


def _json_object(raw: bytes | None, record: str) -> dict[str, Any]:
    if raw is None:
        raise CorruptRecordError(record, "missing")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(record, "not JSON") from exc
    if not isinstance(value, dict):
        raise CorruptRecordError(record, f"a JSON {type(value).__name__}, not an object")
    return value


def decode_policy(raw: bytes | None, record: str = "policy") -> Policy:
    obj = _json_object(raw, record)
    if set(obj) != set(_POLICY_FIELDS):
        raise CorruptRecordError(record, f"fields {sorted(obj)}")
    for name, kind in _POLICY_FIELDS.items():
        # bool is an int in Python; a JSON true is no seed.
        if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
            raise CorruptRecordError(record, f"{name} is a {type(obj[name]).__name__}")
    if obj["origin"] not in ("put", "implicit", "restored") or not obj["incarnation"]:
        raise CorruptRecordError(record, "bad origin or incarnation")
    return Policy(**obj)


def decode_version(raw: bytes | None, record: str) -> int:
    try:
        version = int(raw or b"")
    except ValueError as exc:
        raise CorruptRecordError(record, "version is not a number") from exc
    if version < 0:
        raise CorruptRecordError(record, "negative version")
    return version


def decode_text(raw: bytes | None, record: str, name: str) -> str:
    try:
        text = (raw or b"").decode("ascii")
    except UnicodeDecodeError as exc:
        raise CorruptRecordError(record, f"{name} is not text") from exc
    if not text:
        raise CorruptRecordError(record, f"{name} missing")
    return text


@dataclass(frozen=True)
class PolicyRecord:
    policy: Policy
    version: int  # last committed state version of this incarnation


@dataclass(frozen=True)
class StateRecord:
    incarnation: str
    version: int
    meta: dict[str, Any]
    blob: bytes | None  # None when the caller's cached copy of this version is current
    policy: Policy | None  # the policy the state was written under (recovers a lost policy record)


def decode_policy_record(fields: dict[str, bytes]) -> PolicyRecord:
    policy = decode_policy(fields.get("rec"))
    if decode_text(fields.get("inc"), "policy", "incarnation") != policy.incarnation:
        raise CorruptRecordError("policy", "incarnation fields disagree")
    return PolicyRecord(policy, decode_version(fields.get("v"), "policy"))


def decode_state_record(fields: dict[str, bytes]) -> StateRecord:
    try:
        copy: Policy | None = decode_policy(fields.get("policy"), "state's policy")
    except CorruptRecordError:
        copy = None  # only needed to recover a lost policy record
    return StateRecord(
        incarnation=decode_text(fields.get("inc"), "state", "incarnation"),
        version=decode_version(fields.get("v"), "state"),
        meta=_json_object(fields.get("meta"), "state meta"),
        blob=fields.get("blob"),
        policy=copy,
    )


def encode_meta(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta).encode()
