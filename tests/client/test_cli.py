"""The ``tta`` command through ``main([...])`` with a MockTransport: output and exit codes."""

from __future__ import annotations

import json

import httpx
import pytest

from tta_client._cli import main
from tta_client._format import format_table

from .fakes import (
    MODEL_JSON,
    STRATEGY_JSON,
    FakeServer,
    drift_json,
    json_body,
    parse_multipart,
    predict_json,
    stream_json,
)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TTA_URL", raising=False)
    monkeypatch.delenv("TTA_API_KEY", raising=False)


def run(server: FakeServer, *argv: str) -> int:
    return main(list(argv), transport=server.transport)


def test_policy_set_sends_parsed_config_and_prints_the_stream(server: FakeServer, capsys) -> None:
    server.route("PUT", "/v1/streams/cam-1", json=stream_json(config={"alpha": 0.3}, seed=4))

    code = run(
        server,
        "policy",
        "set",
        "cam-1",
        "--strategy",
        "alpha_bn",
        "--config",
        '{"alpha": 0.3}',
        "--seed",
        "4",
    )

    assert code == 0
    assert json_body(server.last) == {
        "model": None,
        "strategy": "alpha_bn",
        "config": {"alpha": 0.3},
        "seed": 4,
    }
    out = capsys.readouterr().out
    assert "alpha_bn" in out
    assert '{"alpha": 0.3}' in out
    assert "bn_distance" in out


def test_policy_config_from_file(server: FakeServer, tmp_path) -> None:
    server.route("PUT", "/v1/streams/cam-1", json=stream_json())
    config = tmp_path / "cfg.json"
    config.write_text('{"k": 4, "momentum": 0.01}')
    assert run(server, "policy", "set", "cam-1", "--strategy", "unmix_tns", "--config", f"@{config}") == 0
    assert json_body(server.last)["config"] == {"k": 4, "momentum": 0.01}


@pytest.mark.parametrize("config", ["{not json", "[1, 2]"])
def test_bad_config_is_a_usage_error_and_sends_nothing(server: FakeServer, capsys, config: str) -> None:
    assert run(server, "policy", "set", "cam-1", "--strategy", "alpha_bn", "--config", config) == 2
    assert server.requests == []
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["policy", "set", "cam-1"],  # --strategy missing
        ["predict", "cam-1"],  # no files
        ["drift", "top", "-n", "many"],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(server: FakeServer, argv: list[str]) -> None:
    assert run(server, *argv) == 2
    assert server.requests == []


def test_help_exits_0(server: FakeServer, capsys) -> None:
    assert run(server, "--help") == 0
    assert "replay" in capsys.readouterr().out


def test_predict_prints_one_row_per_file(server: FakeServer, capsys, tmp_path) -> None:
    server.route("POST", "/v1/streams/cam-1/predict", json=predict_json([2, 6]))
    files = []
    for name in ("a.png", "b.png"):
        path = tmp_path / name
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + name.encode())
        files.append(str(path))

    assert run(server, "predict", "cam-1", *files, "--no-adapt", "--top-k", "2") == 0

    assert dict(server.last.url.params) == {"adapt": "false", "top_k": "2"}
    assert [p[1] for p in parse_multipart(server.last)] == ["a.png", "b.png"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["file", "label", "probability", "entropy"]
    assert lines[1].split() == ["a.png", "class2", "0.7500", "0.4200"]
    assert lines[2].split() == ["b.png", "class6", "0.7500", "0.4200"]
    assert "adapted yes" in lines[3]


def test_predict_missing_file_is_a_usage_error(server: FakeServer, capsys, tmp_path) -> None:
    assert run(server, "predict", "cam-1", str(tmp_path / "missing.jpg")) == 2
    assert "missing.jpg" in capsys.readouterr().err
    assert server.requests == []


def test_api_error_exits_1_with_the_server_message_on_stderr(server: FakeServer, capsys) -> None:
    server.route(
        "GET",
        "/v1/streams/ghost",
        status=404,
        json={"error": "stream 'ghost' has no policy and no state", "error_type": "unknown_stream"},
    )
    assert run(server, "stream", "show", "ghost") == 1
    captured = capsys.readouterr()
    assert "stream 'ghost' has no policy and no state" in captured.err
    assert "unknown_stream" in captured.err
    assert captured.out == ""


def test_validation_detail_is_printed(server: FakeServer, capsys) -> None:
    detail = [{"loc": ["config", "alpha"], "msg": "must be <= 1"}]
    server.route(
        "PUT",
        "/v1/streams/s",
        status=422,
        json={"error": "bad config", "error_type": "validation", "detail": detail},
    )
    assert run(server, "policy", "set", "s", "--strategy", "alpha_bn", "--config", '{"alpha": 3}') == 1
    assert "must be <= 1" in capsys.readouterr().err


def test_unreachable_server_exits_1(capsys) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    assert main(["strategies"], transport=httpx.MockTransport(refuse)) == 1
    assert "cannot reach the server" in capsys.readouterr().err


def test_json_flag_prints_parseable_json(server: FakeServer, capsys) -> None:
    server.route("GET", "/v1/streams/cam-1", json=stream_json(steps=12))
    assert run(server, "--json", "stream", "show", "cam-1") == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 12


@pytest.mark.parametrize(
    ("argv", "key"),
    [(["strategies"], "strategies"), (["models"], "models"), (["drift", "top"], "streams")],
)
def test_json_flag_on_listings_prints_the_wrapped_list(server: FakeServer, capsys, argv, key) -> None:
    server.route("GET", "/v1/strategies", json={"strategies": [STRATEGY_JSON]})
    server.route("GET", "/v1/models", json={"models": [MODEL_JSON]})
    server.route(
        "GET", "/v1/drift/top", json={"streams": [{"stream_id": "a", "model": "m", "strategy": "s"}]}
    )
    assert run(server, "--json", *argv) == 0
    (item,) = json.loads(capsys.readouterr().out)[key]
    assert isinstance(item, dict)


def test_json_flag_on_predict_and_delete(server: FakeServer, capsys, tmp_path) -> None:
    server.route("POST", "/v1/streams/cam-1/predict", json=predict_json([1]))
    server.route("DELETE", "/v1/streams/cam-1", status=204)
    path = tmp_path / "a.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert run(server, "--json", "predict", "cam-1", str(path)) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["top_k"][0]["index"] == 1
    assert run(server, "--json", "stream", "delete", "cam-1") == 0
    assert json.loads(capsys.readouterr().out) == {"deleted": "cam-1"}


def test_global_options_also_work_after_the_subcommand(server: FakeServer, capsys) -> None:
    server.route("GET", "/v1/streams/cam-1", json=stream_json())
    assert run(server, "stream", "show", "cam-1", "--json", "--api-key", "k2", "--url", "http://other:9") == 0
    assert server.last.headers["authorization"] == "Bearer k2"
    assert server.last.url.host == "other"
    assert json.loads(capsys.readouterr().out)["stream_id"] == "cam-1"


def test_url_and_key_come_from_the_environment(server: FakeServer, monkeypatch) -> None:
    monkeypatch.setenv("TTA_URL", "http://from-env:8123")
    monkeypatch.setenv("TTA_API_KEY", "env-key")
    server.route("GET", "/v1/models", json={"models": [MODEL_JSON]})
    assert run(server, "models") == 0
    assert (server.last.url.host, server.last.url.port) == ("from-env", 8123)
    assert server.last.headers["authorization"] == "Bearer env-key"


def test_default_url_without_environment(server: FakeServer) -> None:
    server.route("GET", "/v1/models", json={"models": []})
    assert run(server, "models") == 0
    assert str(server.last.url) == "http://127.0.0.1:8000/v1/models"
    assert "authorization" not in server.last.headers


def test_stream_show_prints_policy_counters_and_drift(server: FakeServer, capsys) -> None:
    server.route(
        "GET", "/v1/streams/cam-1", json=stream_json(samples_seen=640, drift=drift_json(entropy=None))
    )
    assert run(server, "stream", "show", "cam-1") == 0
    out = capsys.readouterr().out
    for needle in ("strategy", "alpha_bn", "samples_seen", "640", "drift", "bn_distance", "0.1200"):
        assert needle in out
    assert any(line.split() == ["entropy", "-"] for line in out.splitlines())


def test_stream_delete_and_reset(server: FakeServer, capsys) -> None:
    server.route("DELETE", "/v1/streams/cam-1", status=204)
    server.route("POST", "/v1/streams/cam-1/reset", json=stream_json(version=0))
    assert run(server, "stream", "delete", "cam-1") == 0
    assert run(server, "reset", "cam-1") == 0
    assert [(r.method, r.url.path) for r in server.requests] == [
        ("DELETE", "/v1/streams/cam-1"),
        ("POST", "/v1/streams/cam-1/reset"),
    ]
    out = capsys.readouterr().out
    assert "deleted stream cam-1" in out
    assert "reset stream cam-1" in out


def test_drift_top_table(server: FakeServer, capsys) -> None:
    rows = [
        {"stream_id": "hot", "model": "m", "strategy": "tent", "drift": drift_json(bn_distance=2.5)},
        {"stream_id": "cold", "model": "m", "strategy": "tent", "drift": drift_json(bn_distance=0.1)},
    ]
    server.route("GET", "/v1/drift/top", json={"streams": rows})
    assert run(server, "drift", "top", "-n", "2") == 0
    assert dict(server.last.url.params) == {"n": "2"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["stream", "model", "strategy", "bn_distance"]
    assert lines[1].split()[:4] == ["hot", "m", "tent", "2.5000"]
    assert lines[2].split()[0] == "cold"


def test_strategies_and_models_tables(server: FakeServer, capsys) -> None:
    server.route("GET", "/v1/strategies", json={"strategies": [STRATEGY_JSON]})
    server.route("GET", "/v1/models", json={"models": [MODEL_JSON]})
    assert run(server, "strategies") == 0
    assert run(server, "models") == 0
    out = capsys.readouterr().out
    assert "mix source and test-batch BN statistics" in out
    assert "wrn40_2 *" in out
    assert "32x32" in out


def test_format_table_right_aligns_numbers() -> None:
    table = format_table(["name", "value"], [("a", 1.5), ("long-name", 10.25)])
    assert table.splitlines() == ["name" + " " * 9 + "value", "a" + " " * 11 + "1.5000", "long-name  10.2500"]
