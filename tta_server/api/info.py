"""Models, strategies, health and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

import adapters
from tta_server.api.deps import EngineDep
from tta_server.schemas import ModelInfo, ModelList, StrategyInfo, StrategyList

router = APIRouter(tags=["info"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(engine: EngineDep) -> ModelList:
    pool = engine.pool
    return ModelList(
        models=[
            ModelInfo(
                id=h.model_id,
                arch=pool.specs[h.model_id].arch,
                num_classes=h.num_classes,
                classes=list(h.classes),
                input_size=h.input_size,
                fingerprint=h.fingerprint,
                device=str(h.device),
                default=h.model_id == pool.default_model,
                norm_layers=dict(h.layer_counts),
                strategies=[n for n in adapters.list_strategies() if adapters.get_strategy(n).applies_to(h)],
                strategy_defaults={k: dict(v) for k, v in h.strategy_defaults.items()},
            )
            for h in pool.handles.values()
        ]
    )


@router.get("/v1/strategies", response_model=StrategyList)
async def list_strategies() -> StrategyList:
    out = []
    for name in adapters.list_strategies():
        s = adapters.get_strategy(name)
        out.append(
            StrategyInfo(
                name=name,
                summary=s.summary,
                needs_grad=s.needs_grad,
                min_batch_size=s.min_batch_size,
                config_schema=s.config_cls.model_json_schema(),
            )
        )
    return StrategyList(strategies=out)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """200 while this replica can serve; the body says how the state store is (`ok`, `full`: refusing
    writes, `down`). 503 while starting, or once the store has been unreachable past the grace period."""
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "starting", "models": False, "store": False}, status_code=503)
    health = await engine.health()
    body = {
        "status": "ready" if health["ready"] else "store_unavailable",
        "models": list(engine.pool.handles),
        "store": health["store"],
        "store_down_seconds": health["store_down_seconds"],
    }
    return JSONResponse(body, status_code=200 if health["ready"] else 503)
