"""Wire models of the HTTP API (see docs/API.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

STREAM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"


class StreamPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="model id; the server's default model when omitted")
    strategy: str = Field(description="registered strategy name, see GET /v1/strategies")
    config: dict[str, Any] = Field(default_factory=dict, description="strategy hyper-parameters")
    seed: int = Field(0, ge=0, le=2**31 - 1)


class Drift(BaseModel):
    entropy: float | None = None
    confidence: float | None = None
    bn_distance: float | None = None
    class_shift: float | None = None
    filtered_ratio: float | None = None
    class_distribution: list[float] | None = None


class StreamPublic(BaseModel):
    stream_id: str
    model: str
    strategy: str
    config: dict[str, Any]
    seed: int
    incarnation: str = Field(
        description="id of this incarnation of the stream (new at create, PUT change, reset)"
    )
    origin: Literal["put", "implicit", "restored"] = Field(
        description="how the policy came to be: PUT, a first predict (default policy), or restored from its state"
    )
    steps: int = 0
    updates: int = 0
    samples_seen: int = 0
    version: int = 0
    drift: Drift = Field(default_factory=Drift)


class StreamDrift(BaseModel):
    stream_id: str
    model: str
    strategy: str
    drift: Drift


class DriftTop(BaseModel):
    streams: list[StreamDrift]


class TopK(BaseModel):
    index: int
    label: str
    probability: float


class Prediction(BaseModel):
    top_k: list[TopK]
    entropy: float


class PredictStats(BaseModel):
    """Figures of the adaptation step that served the request.

    Concurrent requests of one stream may be merged into one step (`requests` > 1); the figures then
    describe the merged batch of `samples` images.
    """

    samples: int
    used: int
    filtered: int
    mean_entropy: float
    mean_confidence: float
    bn_distance: float | None
    requests: int = 1


class PredictResponse(BaseModel):
    stream_id: str
    model: str
    strategy: str
    incarnation: str = Field(
        description="id of this incarnation of the stream (new at create, PUT change, reset)"
    )
    created: bool = Field(description="this request created the stream, under the default policy")
    lost: Literal["state", "policy"] | None = Field(
        None,
        description=(
            "`state`: the stream's committed state had vanished from the store (it restarted from the source "
            "state); `policy`: its policy record had vanished and was restored from the state"
        ),
    )
    adapted: bool = Field(description="this request's update was applied to the stream's state")
    durable: bool = Field(
        True,
        description=(
            "the update is in the state store; false: held on the serving replica and written with a later "
            "step, when the stream goes idle, or at shutdown (TTA_WRITE_BACK_STEPS > 1; a crash of that "
            "replica loses it)"
        ),
    )
    not_adapted: Literal["conflict", "stream_replaced", "non_finite", "store_unwritable"] | None = Field(
        None, description="why an adapting request's update was not stored"
    )
    conflict: bool
    version: int
    predictions: list[Prediction]
    stats: PredictStats


class ModelInfo(BaseModel):
    id: str
    arch: str
    num_classes: int
    classes: list[str]
    input_size: tuple[int, int]
    fingerprint: str
    device: str
    default: bool
    norm_layers: dict[str, int] = Field(
        default_factory=dict, description="normalisation layers the forward runs, by kind (batchnorm2d, ...)"
    )
    strategies: list[str] = Field(
        default_factory=list, description="the strategies that apply to this model (the others answer 422)"
    )
    strategy_defaults: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="hyper-parameters a strategy starts from on this model, under a stream's own config",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]


class StrategyInfo(BaseModel):
    name: str
    summary: str
    needs_grad: bool
    min_batch_size: int
    config_schema: dict[str, Any]


class StrategyList(BaseModel):
    strategies: list[StrategyInfo]
    guide: str = Field(
        "docs/STRATEGIES.md",
        description="the guide to choosing a strategy, with measured tables (path in the project repository)",
    )


class ErrorBody(BaseModel):
    error: str
    error_type: str
    detail: Any = None
