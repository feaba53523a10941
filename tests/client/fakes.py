"""A scripted stand-in for the server, for ``httpx.MockTransport``, and sample response bodies."""

from __future__ import annotations

import email
import email.policy
import json
from collections.abc import Callable
from typing import Any

import httpx

Handler = Callable[[httpx.Request], httpx.Response]


def drift_json(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "entropy": 0.5,
        "confidence": 0.8,
        "bn_distance": 0.12,
        "class_shift": 0.01,
        "filtered_ratio": 0.0,
        "class_distribution": [0.1] * 10,
    }
    return base | values


def stream_json(stream_id: str = "cam-1", **values: Any) -> dict[str, Any]:
    base = {
        "stream_id": stream_id,
        "model": "wrn40_2",
        "strategy": "alpha_bn",
        "config": {"alpha": 0.1},
        "seed": 0,
        "steps": 4,
        "updates": 3,
        "samples_seen": 256,
        "version": 4,
        "drift": drift_json(),
    }
    return base | values


def predict_json(indices: list[int], stream_id: str = "cam-1", **values: Any) -> dict[str, Any]:
    predictions = [
        {
            "top_k": [
                {"index": i, "label": f"class{i}", "probability": 0.75},
                {"index": (i + 1) % 10, "label": f"class{(i + 1) % 10}", "probability": 0.125},
            ],
            "entropy": 0.42,
        }
        for i in indices
    ]
    base = {
        "stream_id": stream_id,
        "model": "wrn40_2",
        "strategy": "alpha_bn",
        "adapted": True,
        "conflict": False,
        "version": 5,
        "predictions": predictions,
        "stats": {
            "samples": len(indices),
            "used": len(indices),
            "filtered": 0,
            "mean_entropy": 0.42,
            "mean_confidence": 0.75,
            "bn_distance": 0.2,
        },
    }
    return base | values


MODEL_JSON = {
    "id": "wrn40_2",
    "arch": "wide_resnet",
    "num_classes": 10,
    "classes": [f"class{i}" for i in range(10)],
    "input_size": [32, 32],
    "fingerprint": "0123456789abcdef0123",
    "device": "cpu",
    "default": True,
}

STRATEGY_JSON = {
    "name": "alpha_bn",
    "summary": "mix source and test-batch BN statistics",
    "needs_grad": False,
    "min_batch_size": 1,
    "config_schema": {"type": "object", "properties": {"alpha": {"type": "number"}}},
}


def error_response(status: int, error_type: str | None, message: str, **extra: Any) -> httpx.Response:
    body: dict[str, Any] = {"error": message, "error_type": error_type, "detail": extra.pop("detail", None)}
    return httpx.Response(status, json=body, **extra)


class FakeServer:
    """Answers scripted routes and records every request it sees."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Handler] = {}

    def route(self, method: str, path: str, status: int = 200, json: Any = None, **kwargs: Any) -> None:
        self.routes[(method, path)] = lambda _req: httpx.Response(status, json=json, **kwargs)

    def handle(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handler = self.routes.get((request.method, request.url.path))
        if handler is None:
            return error_response(404, "not_found", f"no route {request.method} {request.url.path}")
        return handler(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]


def parse_multipart(request: httpx.Request) -> list[tuple[str, str | None, str, bytes]]:
    """``(field name, filename, content type, data)`` of each part of a multipart request."""
    header = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(header + request.content, policy=email.policy.HTTP)
    parts = []
    for part in message.iter_parts():
        params = dict(part.get_params(header="content-disposition") or [])
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes), payload
        parts.append((params.get("name", ""), params.get("filename"), part.get_content_type(), payload))
    return parts


def json_body(request: httpx.Request) -> Any:
    return json.loads(request.content)
