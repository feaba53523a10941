"""Wire models of the HTTP API (docs/API.md); unknown fields from newer servers are ignored."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Drift",
    "ModelInfo",
    "PredictResponse",
    "PredictStats",
    "Prediction",
    "StrategyInfo",
    "StreamDrift",
    "StreamPolicy",
    "StreamPublic",
    "TopK",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamPolicy(_Wire):
    """Body of ``PUT /v1/streams/{stream_id}``; ``model=None`` selects the server's default model."""

    model: str | None = None
    strategy: str
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0


class Drift(_Wire):
    """Exponential moving averages of a stream's recent batches (``None`` before the first batch)."""

    entropy: float | None = None
    confidence: float | None = None
    bn_distance: float | None = None
    class_shift: float | None = None
    filtered_ratio: float | None = None
    class_distribution: list[float] | None = None


class StreamPublic(_Wire):
    """A stream's policy (config with defaults filled in), counters and drift."""

    stream_id: str
    model: str
    strategy: str
    config: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    incarnation: str = ""
    #: How the policy came to be: ``put``, ``implicit`` (a first predict) or ``restored``.
    origin: str = "put"
    steps: int = 0
    updates: int = 0
    samples_seen: int = 0
    version: int = 0
    drift: Drift = Field(default_factory=Drift)


class StreamDrift(_Wire):
    """One row of ``GET /v1/drift/top``."""

    stream_id: str
    model: str
    strategy: str
    drift: Drift = Field(default_factory=Drift)


class TopK(_Wire):
    """One class of a prediction's top-k."""

    index: int
    label: str
    probability: float


class Prediction(_Wire):
    """The prediction for one image, best class first."""

    top_k: list[TopK]
    entropy: float

    @property
    def top1(self) -> TopK:
        """The most probable class."""
        return self.top_k[0]


class PredictStats(_Wire):
    """Statistics of the adaptation step that served a request.

    ``used``: samples the update learned from. Concurrent requests of one stream may share one step
    (``requests`` > 1); the figures then describe the merged batch of ``samples`` images.
    """

    samples: int
    used: int = 0
    filtered: int = 0
    mean_entropy: float | None = None
    mean_confidence: float | None = None
    bn_distance: float | None = None
    requests: int = 1


class PredictResponse(_Wire):
    """Answer of ``POST /v1/streams/{stream_id}/predict``, one prediction per image in request order."""

    stream_id: str
    model: str
    strategy: str
    #: Id of this incarnation of the stream (new at create, a PUT that changes the policy, reset).
    incarnation: str = ""
    #: This request created the stream under the server's default policy.
    created: bool = False
    #: ``"state"``: the stream's committed state had vanished (it restarted from the source state);
    #: ``"policy"``: its policy record had vanished and was restored from its state.
    lost: str | None = None
    adapted: bool
    #: Why an adapting request's update was not stored: ``conflict``, ``stream_replaced``,
    #: ``non_finite`` or ``store_unwritable``.
    not_adapted: str | None = None
    conflict: bool = False
    version: int
    predictions: list[Prediction]
    stats: PredictStats


class ModelInfo(_Wire):
    """A model the server serves."""

    id: str
    arch: str
    num_classes: int
    classes: list[str]
    input_size: tuple[int, ...] | int
    fingerprint: str
    device: str
    default: bool = False
    norm_layers: dict[str, int] = Field(default_factory=dict)
    strategies: list[str] = Field(default_factory=list)


class StrategyInfo(_Wire):
    """A registered adaptation strategy with the JSON schema of its config."""

    name: str
    summary: str = ""
    needs_grad: bool = False
    min_batch_size: int = 1
    config_schema: dict[str, Any] = Field(default_factory=dict)
