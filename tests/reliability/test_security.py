"""API keys, per-key stream namespaces, rate limits, key length, and no pickle on any load path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import MODELS_YAML, REPO, npy_bytes, store_client, stored_keys
from tests.reliability.conftest import NPY, batch
from tta_server.settings import Settings

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-fedcba9876543210"
KEYS = [f"alice:{ALICE}", f"bob:{BOB}"]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(make_client, redis_url):
    return make_client(redis_url=redis_url, api_keys=KEYS)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong-key-0123456789"},
        {"Authorization": f"Basic {ALICE}"},
        {"Authorization": f"Bearer {ALICE[:-1]}"},
        {"Authorization": f"Bearer {ALICE}x"},
        {"X-API-Key": "alice"},
        {"X-API-Key": f"alice:{ALICE}"},
    ],
)
@pytest.mark.redis
def test_missing_or_wrong_key_is_401(client, headers) -> None:
    for method, path, kw in (
        ("post", "/v1/streams/s/predict", {"content": npy_bytes(batch(4)), "headers": {**NPY, **headers}}),
        ("get", "/v1/streams/s", {"headers": headers}),
        ("put", "/v1/streams/s", {"json": {"strategy": "norm"}, "headers": headers}),
        ("post", "/v1/streams/s/reset", {"headers": headers}),
        ("delete", "/v1/streams/s", {"headers": headers}),
        ("get", "/v1/drift/top", {"headers": headers}),
    ):
        r = getattr(client, method)(path, **kw)
        assert r.status_code == 401, (method, path, r.text)
        assert r.json()["error_type"] == "unauthorized"


@pytest.mark.redis
def test_both_header_forms_are_accepted(client) -> None:
    assert client.get("/v1/drift/top", headers=auth(ALICE)).status_code == 200
    assert client.get("/v1/drift/top", headers={"X-API-Key": BOB}).status_code == 200


@pytest.mark.redis
def test_streams_are_invisible_across_keys(client) -> None:
    a, b = auth(ALICE), auth(BOB)
    assert client.put("/v1/streams/cam", json={"strategy": "tent"}, headers=a).status_code == 200
    for i in range(2):
        r = client.post("/v1/streams/cam/predict", content=npy_bytes(batch(4, i)), headers={**NPY, **a})
        assert r.status_code == 200 and r.json()["version"] == i + 1
    alice_view = client.get("/v1/streams/cam", headers=a).json()

    # Bob cannot see, reset or delete it ...
    assert client.get("/v1/streams/cam", headers=b).status_code == 404
    assert client.post("/v1/streams/cam/reset", headers=b).status_code == 404
    assert client.delete("/v1/streams/cam", headers=b).status_code == 404
    assert client.get("/v1/drift/top", headers=b).json()["streams"] == []
    # ... and predicting on the same id creates Bob's own stream (default policy, fresh state).
    r = client.post("/v1/streams/cam/predict", content=npy_bytes(batch(4, 9)), headers={**NPY, **b})
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["strategy"] == "alpha_bn"
    bob_view = client.get("/v1/streams/cam", headers=b).json()
    assert bob_view["strategy"] == "alpha_bn" and bob_view["steps"] == 1
    # Bob changing "his" cam leaves Alice's untouched.
    assert client.put("/v1/streams/cam", json={"strategy": "alpha_bn"}, headers=b).status_code == 200
    assert client.post("/v1/streams/cam/reset", headers=b).status_code == 200
    assert client.get("/v1/streams/cam", headers=a).json() == alice_view
    assert [s["stream_id"] for s in client.get("/v1/drift/top", headers=a).json()["streams"]] == ["cam"]


@pytest.mark.redis
def test_namespaces_are_separate_redis_keys(client, redis_url) -> None:

    client.post("/v1/streams/cam/predict", content=npy_bytes(batch(4)), headers={**NPY, **auth(ALICE)})
    client.post("/v1/streams/cam/predict", content=npy_bytes(batch(4)), headers={**NPY, **auth(BOB)})
    keys = stored_keys(store_client(redis_url), "tta:v2:{*}:state")
    assert keys == {"tta:v2:{alice/cam}:state", "tta:v2:{bob/cam}:state"}
    # The secrets themselves are never part of a key.
    assert not any(ALICE in k or BOB in k for k in keys)


@pytest.mark.redis
def test_rate_limit_is_429_with_retry_after_per_key(make_client, redis_url) -> None:
    client = make_client(redis_url=redis_url, api_keys=KEYS, rate_limit_per_minute=5)
    statuses = [client.get("/v1/drift/top", headers=auth(ALICE)).status_code for _ in range(5)]
    assert statuses == [200] * 5
    r = client.get("/v1/drift/top", headers=auth(ALICE))
    assert r.status_code == 429 and r.json()["error_type"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    r = client.post("/v1/streams/s/predict", content=npy_bytes(batch(4)), headers={**NPY, **auth(ALICE)})
    assert r.status_code == 429
    assert client.get("/v1/streams/s", headers=auth(BOB)).status_code == 404  # Bob has his own budget
    # A refused request did not touch any state.
    assert client.get("/v1/drift/top", headers=auth(BOB)).json()["streams"] == []


@pytest.mark.parametrize("keys", [["alice:short"], ["0123456789abcde"], [f"alice:{ALICE}", "bob:tooshort"]])
def test_keys_shorter_than_16_chars_are_refused(keys) -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(models_config=MODELS_YAML, api_keys=keys)


def test_keys_from_the_environment_are_split_and_checked(monkeypatch) -> None:
    monkeypatch.setenv("TTA_API_KEYS", f"alice:{ALICE}, bob:{BOB}")
    s = Settings(models_config=MODELS_YAML)
    assert s.key_namespaces() == {ALICE: "alice", BOB: "bob"}
    assert ALICE not in repr(s)  # SecretStr: keys never end up in logs of the settings
    monkeypatch.setenv("TTA_API_KEYS", "alice:short")
    with pytest.raises(ValidationError):
        Settings(models_config=MODELS_YAML)


# ------------------------------------------------------------------ no pickle on any load path
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _python_files() -> list[Path]:
    return sorted(p for d in ("tta_server", "adapters") for p in (REPO / d).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    parts = []
    f = node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.append(f.id)
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_no_pickle_anywhere_in_the_service() -> None:
    """State and payloads are loaded with safetensors / allow_pickle=False only (AST scan)."""
    problems = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                if any((n or "").split(".")[0] in UNSAFE_MODULES for n in names):
                    problems.append(f"{rel}:{node.lineno}: imports {names}")
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            allow = _kw(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{rel}:{node.lineno}: {name}(allow_pickle=...) not False")
            if name.endswith("torch.load"):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                problems.append(f"{rel}:{node.lineno}: {name} (use yaml.safe_load)")
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                problems.append(f"{rel}:{node.lineno}: {name}()")
    assert problems == []


def test_state_codec_is_safetensors() -> None:
    src = (REPO / "adapters" / "serialization.py").read_text()
    assert "from safetensors.torch import load" in src and "pickle" not in src.split('"""', 2)[2]
    repository = (REPO / "tta_server" / "engine" / "repository.py").read_text()
    assert "state_from_bytes" in repository and "torch.load" not in repository


def test_scanner_catches_what_it_is_meant_to_catch() -> None:
    bad = (
        "import pickle\nimport torch\nimport numpy as np\ntorch.load('x')\nnp.load('y', allow_pickle=True)\n"
    )
    tree = ast.parse(bad)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert [_call_name(c) for c in calls] == ["torch.load", "np.load"]
    assert _kw(calls[0], "weights_only") is None
    assert isinstance(_kw(calls[1], "allow_pickle"), ast.Constant)


@pytest.mark.redis
def test_info_and_probe_endpoints_do_not_need_a_key(client) -> None:
    """Probes and metrics stay open for the orchestrator; nothing stream-related leaks through them."""
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert ALICE not in metrics and "alice" not in metrics


def test_key_names_that_could_alias_a_namespace_are_refused() -> None:
    from pydantic import ValidationError as SettingsError

    from tta_server.settings import Settings

    with pytest.raises(SettingsError, match="must match"):
        Settings(api_keys="team:a:0123456789abcdefgh")  # type: ignore[arg-type]  # parsed as from the env
    keyed = Settings(api_keys="team-a:0123456789abcdefgh")  # type: ignore[arg-type]  # parsed as from the env
    assert keyed.key_namespaces() == {"0123456789abcdefgh": "team-a"}


# ------------------------------------------------------------------ public endpoints with keys on
DISCOVERY = ("/v1/models", "/v1/strategies", "/docs", "/openapi.json")
WRONG = {"Authorization": "Bearer wrong-key-0123456789"}


def test_discovery_needs_a_key_unless_public_discovery(make_client) -> None:
    client = make_client(api_keys=KEYS)
    for path in DISCOVERY:
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", path
        assert r.headers["www-authenticate"] == "Bearer"
        assert client.get(path, headers=auth(ALICE)).status_code == 200, path
    open_client = make_client(api_keys=KEYS, public_discovery=True)
    for path in DISCOVERY:
        assert open_client.get(path).status_code == 200, path
        assert open_client.get(path, headers=auth(BOB)).status_code == 200, path


@pytest.mark.parametrize("public_discovery", [False, True])
@pytest.mark.parametrize(
    "headers", [WRONG, {"X-API-Key": "garbage"}, {"Authorization": f"Basic {ALICE}"}, {"Authorization": ""}]
)
def test_a_wrong_key_is_401_on_public_paths_too(make_client, headers, public_discovery) -> None:
    """Probes and metrics answer without credentials; credentials that are sent must be valid."""
    client = make_client(api_keys=KEYS, public_discovery=public_discovery)
    for path in ("/healthz", "/readyz", "/metrics", *DISCOVERY):
        r = client.get(path, headers=headers)
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized", (path, r.text)
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_metrics_token_guards_metrics(make_client) -> None:
    token = "scraper-token-0123456789"
    client = make_client(api_keys=KEYS, metrics_token=token)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=auth(ALICE)).status_code == 401  # tenants' keys do not open it
    r = client.get("/metrics", headers=auth(token))
    assert r.status_code == 200 and "tta_requests_total" in r.text
    # The token is for /metrics only; without API keys it still guards /metrics.
    no_keys = make_client(metrics_token=token)
    assert no_keys.get("/metrics").status_code == 401
    assert no_keys.get("/metrics", headers=auth(token)).status_code == 200
    assert no_keys.get("/v1/models").status_code == 200
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(models_config=MODELS_YAML, metrics_token="short")  # type: ignore[arg-type]  # as from the env


def test_refusals_at_the_edge_are_counted(make_client) -> None:
    client = make_client(api_keys=KEYS)
    assert client.post("/v1/streams/s/predict", content=npy_bytes(batch(4)), headers=NPY).status_code == 401
    text = client.get("/metrics").text
    assert (
        'tta_request_errors_total{error_type="unauthorized",route="/v1/streams/{stream_id}/predict"} 1.0'
        in text
    )
