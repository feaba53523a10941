"""All runtime settings, read from `TTA_*` environment variables (and `.env`). Nothing else reads os.environ."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TTA_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="port of the Open Inference Protocol gRPC service (on `host`, beside HTTP); unset: off",
    )
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

    redis_url: str | None = Field(
        None,
        description=(
            "redis://host:port/db, redis+cluster://host:port[,host:port...] or "
            "redis+sentinel://host:port[,host:port...]/<service>[/db]; unset = in-process store"
        ),
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="after each commit, WAIT until this many replicas have it (0 = asynchronous replication)",
    )
    redis_wait_timeout_ms: int = Field(
        100, ge=1, le=60_000, description="longest a commit waits for its replicas (the commit stands)"
    )
    state_ttl_seconds: int = Field(
        7 * 24 * 3600, ge=1, description="streams unused (no predict, no read) this long expire"
    )
    store_timeout_seconds: float = Field(1.0, gt=0, le=30)
    conflict_retries: int = Field(
        2, ge=0, le=10, description="re-runs of a step when another replica won the race"
    )
    state_cache_size: int = Field(256, ge=0, description="streams whose latest state stays on the device")
    state_cache_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description=(
            "bytes of cached states at most (mean-teacher states are 4x the network each); the least recently "
            "used go first, and a state larger than this is not cached"
        ),
    )
    write_back_steps: int = Field(
        1,
        ge=1,
        le=10_000,
        description=(
            "commit a large state (write_back_min_bytes or more) to the store every N-th adapting step; between "
            "commits it lives only in this replica's cache, so a crash loses up to N-1 steps of adaptation "
            "(the stream resumes from its last stored state). 1 = every step is stored before it is answered"
        ),
    )
    write_back_min_bytes: int = Field(
        1024**2,
        ge=0,
        description="states smaller than this are always stored at every step (write_back_steps applies above)",
    )
    write_back_idle_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="a state held with unwritten steps is written once its stream has had no step this long",
    )
    require_configured_streams: bool = Field(
        False,
        description=(
            "refuse predictions on streams without a policy (404 unknown_stream) instead of creating them "
            "under the default policy"
        ),
    )
    max_stream_queue: int = Field(
        64, ge=1, le=10_000, description="requests one stream may have waiting; more answer 503 overloaded"
    )
    store_grace_seconds: float = Field(
        10.0,
        ge=0,
        description="/readyz turns 503 only after the state store has been unreachable this long",
    )

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
            "unset: always for CUDA models, and on CPU for steps of at most share_forward_cpu_images images "
            "(one-image camera streams: 2.7x faster; 16-image ResNet-50 steps: slower, docs/BENCHMARKS.md)"
        ),
    )
    share_forward_cpu_images: int = Field(
        8, ge=0, description="with share_forward unset, the largest CPU step that joins a shared forward"
    )
    decode_on_device: bool = Field(
        True,
        description=(
            "decode JPEG uploads without chroma subsampling with nvJPEG on the model's GPU (subsampled ones, "
            "whose nvJPEG pixels differ from the reference decoder's, and CPU models: libjpeg-turbo)"
        ),
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

    # Bounded work under overload: the HTTP edge and admission control (docs/RELIABILITY.md).
    request_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="deadline of a request from its arrival; X-Request-Timeout may shorten it",
    )
    body_read_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a request body must have arrived in full this long after its headers (408)",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="a connection must complete its request headers within this, or is closed",
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="request line and headers, at most")
    max_connections: int = Field(
        512,
        ge=1,
        description="open connections and requests per replica (uvicorn's limit_concurrency): past it, 503",
    )
    backlog: int = Field(2048, ge=1, description="connections the kernel queues before they are accepted")
    max_pending_requests: int = Field(
        32,
        ge=1,
        description="predict requests admitted at once per replica, body reading included: past it, 503",
    )
    max_request_pixels: int = Field(
        2 * 4096 * 4096, ge=1, description="decoded pixels of one predict request's images together (413)"
    )
    max_replica_pixels: int = Field(
        4 * 4096 * 4096,
        ge=1,
        description="decoded pixels of all admitted predict requests together, from their headers until the "
        "answer: past it, 503",
    )
    retry_after_seconds: int = Field(1, ge=1, le=3600, description="Retry-After of 503 overloaded answers")
    public_discovery: bool = Field(
        False,
        description="with API keys set: /v1/models, /v1/strategies and the API docs answer without a key",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="when set, /metrics needs `Authorization: Bearer <token>`; unset, /metrics is public",
    )

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

    @field_validator("redis_url")
    @classmethod
    def _store_url_parses(cls, v: str | None) -> str | None:
        if v:
            from tta_server.state_store import parse_store_url

            parse_store_url(v)
        return v

    @field_validator("metrics_token")
    @classmethod
    def _token_long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("the metrics token must be at least 16 characters")
        return v

    @model_validator(mode="after")
    def _pixel_budgets(self) -> Settings:
        if self.max_replica_pixels < self.max_request_pixels:
            raise ValueError("max_replica_pixels must be at least max_request_pixels")
        return self

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
