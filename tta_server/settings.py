"""All runtime settings, read from `TTA_*` environment variables (and `.env`). Nothing else reads os.environ."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTA_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    models_config: Path = Field(
        Path("models.yaml"),
        description="YAML file declaring the served models (relative: to the working dir)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads for CPU inference")
    compute_workers: int | None = Field(
        None, ge=1, le=64, description="concurrent strategy steps (1 on CPU, 4 on GPU)"
    )
    decode_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="threads decoding uploads, apart from the steps so decodes never queue behind them",
    )

    redis_url: str | None = Field(None, description="redis://host:port/db; unset = in-process store")
    state_ttl_seconds: int = Field(7 * 24 * 3600, ge=60, description="idle streams expire after this")
    store_timeout_seconds: float = Field(1.0, gt=0, le=30)
    conflict_retries: int = Field(
        2, ge=0, le=10, description="re-runs of a step when another replica won the race"
    )
    state_cache_size: int = Field(256, ge=0, description="streams whose latest state stays on the device")

    # alpha_bn stays sound for single-image requests, where test-batch statistics degrade to instance norm.
    default_strategy: str = "alpha_bn"
    default_config: dict[str, Any] = Field(default_factory=dict)
    drift_momentum: float = Field(0.9, ge=0, lt=1, description="EMA factor of per-stream drift figures")

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated `name:key` (or bare `key`); empty = no auth"
    )
    rate_limit_per_minute: int | None = Field(None, ge=1, description="requests per API key and minute")

    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_batch: int = Field(256, ge=1)
    share_forward: bool | None = Field(
        None,
        description=(
            "steps of different streams (same model, strategy and config) that wait for the compute threads "
            "run as one forward, each stream with its own statistics (statistics-only strategies, adapt=false); "
            "unset: on for CUDA models, off on CPU, where joining the activations costs more than it saves"
        ),
    )
    decode_on_device: bool = Field(
        True, description="decode JPEG uploads with nvJPEG on the model's GPU (CPU models: libjpeg-turbo)"
    )
    max_step_images: int = Field(
        256,
        ge=1,
        description=(
            "requests of one stream that queue behind a running step are merged into one step of at most "
            "this many images (1 = never merge)"
        ),
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="refuse images larger than this before decoding"
    )
    keep_alive_seconds: int = Field(
        75, ge=1, description="idle HTTP keep-alive (longer than a load balancer's)"
    )
    log_level: str = "INFO"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("api_keys")
    @classmethod
    def _keys_long_enough(cls, v: list[SecretStr]) -> list[SecretStr]:
        for k in v:
            name, _, secret = k.get_secret_value().rpartition(":")
            if len(secret) < 16:
                raise ValueError("API keys must be at least 16 characters")
            # Names become part of Redis keys: a `:` in one could alias another key's namespace.
            if name and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"API key name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        return v

    def key_namespaces(self) -> dict[str, str]:
        """Map secret -> namespace name (`name:key`, or a short fingerprint of a bare key)."""
        import hashlib

        out: dict[str, str] = {}
        for item in self.api_keys:
            raw = item.get_secret_value()
            name, _, secret = raw.rpartition(":")
            out[secret] = name or "k" + hashlib.sha256(secret.encode()).hexdigest()[:12]
        return out


@lru_cache
def get_settings() -> Settings:
    return Settings()
