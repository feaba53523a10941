"""Bounded work under overload: pixel budgets checked from the headers before decoding, the queue
bound, request deadlines, authentication before any body is read, body and header timeouts, and
clients that go away. The connection-level attacks run against real uvicorn servers on loopback."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import MODELS_YAML, npy_bytes
from tests.reliability.conftest import NPY, batch, jpeg_bytes
from tta_bench.redis_server import free_port
from tta_bench.soak import start_replica, stop_process, wait_ready
from tta_server import codec
from tta_server.admission import Admission, Deadline, request_timeout
from tta_server.errors import OverloadedError, PayloadTooLargeError, ValidationError

KEY = "edge-tests-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PIXELS_8 = 8 * 32 * 32  # eight 32x32 images


def png_4096() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4096, 4096), (90, 120, 150)).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ servers
@pytest.fixture
def live(pool) -> Iterator[Callable[..., tuple[str, Any]]]:
    """Real uvicorn servers (threads, loopback, `python -m tta_server`'s configuration): (url, app)."""
    import uvicorn

    from tta_server.__main__ import uvicorn_config
    from tta_server.app import create_app
    from tta_server.settings import Settings

    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> tuple[str, Any]:
        settings = Settings(models_config=MODELS_YAML, log_level="WARNING", **overrides)
        app = create_app(settings, pool=pool)
        port = free_port()
        server = uvicorn.Server(
            uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        started.append((server, thread))
        return f"http://127.0.0.1:{port}", app

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=10)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    sock.settimeout(timeout)
    out = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class BlockedDecode:
    """Replaces codec.decode_npy: each decode waits (bounded) until `release()`; counts the calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        real = codec.decode_npy

        def decode(data: bytes, size: tuple[int, int]) -> Any:
            self.calls += 1
            self.entered.set()
            self.gate.wait(20)
            return real(data, size)

        monkeypatch.setattr(codec, "decode_npy", decode)

    def release(self) -> None:
        self.gate.set()


def never_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every decoder raises if called; returns the list of those that were."""
    called: list[str] = []

    def trap(name: str) -> Callable[..., Any]:
        def fail(*_: Any, **__: Any) -> Any:
            called.append(name)
            raise AssertionError(f"{name} was called")

        return fail

    for name in ("decode_files", "decode_image_bytes", "decode_npy", "_decode_jpegs"):
        monkeypatch.setattr(codec, name, trap(name))
    return called


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether `condition` holds within `timeout` (a request leaves the queue just after its answer)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def version(url: str, stream: str, headers: dict[str, str] | None = None) -> int:
    r = httpx.get(f"{url}/v1/streams/{stream}", headers=headers or {}, timeout=10)
    return int(r.json()["version"]) if r.status_code == 200 else 0


# ------------------------------------------------------------------------------ pixel budgets
def test_4096_pngs_within_the_image_limit_are_refused_before_decoding(make_client, monkeypatch) -> None:
    """16 PNGs of 4096x4096 (49 kB each) pass the per-image limit, but not the per-request budget."""
    client = make_client()
    assert client.post("/v1/streams/cam/predict", content=npy_bytes(batch(4)), headers=NPY).status_code == 200
    called = never_decode(monkeypatch)
    img = png_4096()
    assert len(img) < 100_000
    r = client.post(
        "/v1/streams/cam/predict", files=[("files", (f"{i}.png", img, "image/png")) for i in range(16)]
    )
    assert r.status_code == 413, r.text
    assert r.json()["error_type"] == "payload_too_large"
    assert "decoded pixels per request" in r.json()["error"] and "33554432" in r.json()["error"]
    assert called == []
    assert client.get("/v1/streams/cam").json()["version"] == 1
    assert client.app.state.admission.pixels == 0 and client.app.state.admission.pending == 0


def test_request_pixel_budget_counts_npy_images_from_the_header(make_client, monkeypatch) -> None:
    client = make_client(max_request_pixels=PIXELS_8, max_replica_pixels=PIXELS_8)
    assert client.post("/v1/streams/s/predict", content=npy_bytes(batch(8)), headers=NPY).status_code == 200
    called = never_decode(monkeypatch)
    r = client.post("/v1/streams/s/predict", content=npy_bytes(batch(9)), headers=NPY)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    assert f"budget of {PIXELS_8} decoded pixels" in r.json()["error"]
    assert called == []


def test_replica_budget_and_queue_bound_answer_503_with_retry_after(live, monkeypatch) -> None:
    """One request holds the replica's pixels (its decode is blocked): the next is 503 `overloaded`
    before anything of it is decoded; once the first is answered, the budget is free again."""
    url, app = live(max_request_pixels=PIXELS_8, max_replica_pixels=PIXELS_8 + 1024, max_pending_requests=2)
    blocked = BlockedDecode(monkeypatch)
    body = npy_bytes(batch(8))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/streams/a/predict", content=body, headers=NPY, timeout=30)
        assert blocked.entered.wait(10)
        # Pixels: 8 images held by the first; another 8 do not fit in what is left.
        r = httpx.post(f"{url}/v1/streams/b/predict", content=body, headers=NPY, timeout=10)
        assert r.status_code == 503 and r.json()["error_type"] == "overloaded", r.text
        assert r.headers["retry-after"] == "1" and "decoded pixels" in r.json()["error"]
        assert blocked.calls == 1
        # Queue bound: two admitted (the first, and one whose body never comes), the third is refused.
        # (A request leaves the queue just after its answer is sent.)
        assert eventually(lambda: app.state.admission.pending == 1)
        stalled = connect(url)
        stalled.sendall(
            b"POST /v1/streams/c/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            b"Content-Length: 9999\r\n\r\n"
        )
        assert eventually(lambda: app.state.admission.pending == 2)
        r = httpx.post(f"{url}/v1/streams/d/predict", content=body, headers=NPY, timeout=10)
        assert r.status_code == 503 and r.json()["error_type"] == "overloaded"
        assert "predict requests in progress" in r.json()["error"] and r.headers["retry-after"] == "1"
        assert r.headers.get("connection") == "close"  # its body was never read
        stalled.close()
        blocked.release()
        assert first.result().status_code == 200
    r = httpx.post(f"{url}/v1/streams/b/predict", content=body, headers=NPY, timeout=30)
    assert r.status_code == 200
    assert eventually(lambda: app.state.admission.pixels == 0 and app.state.admission.pending == 0)


def test_png_attack_does_not_grow_the_server(tmp_path) -> None:
    """A real `python -m tta_server`: two concurrent requests of 16 PNGs of 4096x4096 (1.65 GiB decoded
    before) are 413 at once; the server's RSS grows by less than 64 MiB and another tenant is served."""
    port = free_port()
    proc = start_replica(port, "", log_file=tmp_path / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        assert (
            httpx.post(f"{url}/v1/streams/v/predict", content=npy_bytes(batch(8)), headers=NPY).status_code
            == 200
        )
        rss = psutil.Process(proc.pid)
        before = peak = rss.memory_info().rss
        img = png_4096()
        files = [("files", (f"{i}.png", img, "image/png")) for i in range(16)]
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(httpx.post, f"{url}/v1/streams/a/predict", files=files, timeout=60)
                for _ in range(2)
            ]
            t0 = time.monotonic()
            victim = httpx.post(
                f"{url}/v1/streams/v/predict", content=npy_bytes(batch(8, 1)), headers=NPY, timeout=60
            )
            victim_s = time.monotonic() - t0
            while not all(f.done() for f in futures):
                peak = max(peak, rss.memory_info().rss)
                time.sleep(0.01)
        answers = [f.result() for f in futures]
        peak = max(peak, rss.memory_info().rss)
    finally:
        stop_process(proc)
    assert [r.status_code for r in answers] == [413, 413]
    assert victim.status_code == 200 and victim_s < 10
    assert (peak - before) / 2**20 < 64, f"RSS grew by {(peak - before) / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------- deadlines
def test_deadline_value_object() -> None:
    d = Deadline.after(0.2)
    assert not d.expired() and 0 < d.remaining() <= 0.2 and d.seconds == 0.2
    time.sleep(0.25)
    assert d.expired() and d.remaining() == 0.0
    assert (
        request_timeout(None, 30) == 30
        and request_timeout("2.5", 30) == 2.5
        and request_timeout("99", 30) == 30
    )
    for bad in ("abc", "0", "-1", "nan", "inf", ""):
        with pytest.raises(ValidationError):
            request_timeout(bad, 30)


def test_expired_deadline_is_not_computed(make_client, monkeypatch) -> None:
    client = make_client()
    assert client.put("/v1/streams/cam", json={"strategy": "tent"}).status_code == 200
    assert client.post("/v1/streams/cam/predict", content=npy_bytes(batch(4)), headers=NPY).status_code == 200
    called = never_decode(monkeypatch)
    r = client.post(
        "/v1/streams/cam/predict",
        content=npy_bytes(batch(4, 1)),
        headers={**NPY, "X-Request-Timeout": "1e-9"},
    )
    assert r.status_code == 503 and r.json()["error_type"] == "deadline_exceeded", r.text
    assert r.headers["retry-after"] == "1"
    assert called == []
    assert client.get("/v1/streams/cam").json()["version"] == 1


def test_deadline_passing_during_decode_is_not_computed(make_client, monkeypatch) -> None:
    client = make_client()
    assert client.put("/v1/streams/cam", json={"strategy": "tent"}).status_code == 200
    real = codec.decode_npy

    def slow(data: bytes, size: tuple[int, int]) -> Any:
        time.sleep(0.5)
        return real(data, size)

    monkeypatch.setattr(codec, "decode_npy", slow)
    engine = client.app.state.engine
    predicted: list[Any] = []
    real_predict = engine.predict

    async def spy(*args: Any, **kwargs: Any) -> Any:
        predicted.append(kwargs.get("deadline"))
        return await real_predict(*args, **kwargs)

    monkeypatch.setattr(engine, "predict", spy)
    r = client.post(
        "/v1/streams/cam/predict", content=npy_bytes(batch(4)), headers={**NPY, "X-Request-Timeout": "0.2"}
    )
    assert r.status_code == 503 and r.json()["error_type"] == "deadline_exceeded"
    assert "after decoding" in r.json()["error"]
    assert predicted == [] and client.get("/v1/streams/cam").json()["version"] == 0
    # In time: the engine gets the request's deadline, capped by the server's setting.
    r = client.post(
        "/v1/streams/cam/predict", content=npy_bytes(batch(4)), headers={**NPY, "X-Request-Timeout": "9999"}
    )
    assert r.status_code == 200 and r.json()["version"] == 1
    assert isinstance(predicted[0], Deadline) and predicted[0].seconds == 30.0


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_invalid_request_timeout_header_is_422(make_client, value: str) -> None:
    client = make_client()
    r = client.post(
        "/v1/streams/cam/predict", content=npy_bytes(batch(4)), headers={**NPY, "X-Request-Timeout": value}
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


# ------------------------------------------------------------------------- admission unit tests
def test_tickets_release_their_pixels_once_and_after_their_decodes() -> None:
    import asyncio

    async def scenario() -> None:
        adm = Admission(max_pending=2, replica_pixels=100, request_pixels=60)
        a = adm.admit(Deadline.after(10))
        b = adm.admit(Deadline.after(10))
        with pytest.raises(OverloadedError):
            adm.admit(Deadline.after(10))
        a.charge(60)
        with pytest.raises(PayloadTooLargeError):
            b.charge(61)
        with pytest.raises(OverloadedError):
            b.charge(41)
        b.charge(40)
        work = asyncio.get_running_loop().create_future()
        a.hold_until(work)
        a.close()  # the request ended (say cancelled) while its decode still runs
        assert adm.pixels == 100
        work.set_result(None)
        await asyncio.sleep(0)
        assert adm.pixels == 40
        b.close()
        b.close()
        assert adm.pixels == 0

    asyncio.run(scenario())


# ----------------------------------------------------------------- authentication before the body
def test_unauthenticated_upload_is_401_before_its_body_is_read(live) -> None:
    url, app = live(api_keys=[f"edge:{KEY}"])
    socks = []
    for header in (b"Transfer-Encoding: chunked", b"Content-Length: 30000000"):
        sock = connect(url)
        # Headers only: the body never comes. The answer must not wait for it.
        sock.sendall(
            b"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
            + header
            + b"\r\n\r\n"
        )
        socks.append(sock)
    wrong = connect(url)
    wrong.sendall(
        b"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-key-0123456789\r\n"
        b"Content-Length: 30000000\r\n\r\n" + b"x" * 65536
    )
    socks.append(wrong)
    for sock in socks:
        answer = read_answer(sock, 5)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"connection: close" in answer.lower() and b"unauthorized" in answer
        sock.close()
    assert app.state.admission.pending == 0


# --------------------------------------------------------------------- body and header timeouts
def test_stalled_body_is_cut_with_408_and_the_connection_closed(live) -> None:
    url, app = live(api_keys=[f"edge:{KEY}"], body_read_timeout_seconds=1.0)
    body = npy_bytes(batch(8))
    sock = connect(url)
    sock.sendall(
        f"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/x-npy\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    t0 = time.monotonic()
    answer = read_answer(sock, 10)
    took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and b"connection: close" in answer.lower()
    assert 0.8 < took < 5
    sock.close()
    assert eventually(lambda: app.state.admission.pending == 0 and app.state.admission.pixels == 0)
    assert version(url, "s", AUTH) == 0


def test_stalled_connections_are_closed_after_the_header_timeout(live) -> None:
    url, _ = live(header_timeout_seconds=1.0, keep_alive_seconds=30)
    idle = [connect(url) for _ in range(10)]
    partial = [connect(url) for _ in range(20)]
    for sock in partial:
        sock.sendall(b"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nX-Pad")
    # A keep-alive client is not cut: its requests' headers arrive in time.
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        time.sleep(1.5)
        assert client.get("/healthz").status_code == 200
    t0 = time.monotonic()
    assert all(closed_by_server(s, 5) for s in idle + partial)
    assert time.monotonic() - t0 < 5
    for sock in idle + partial:
        sock.close()


def test_oversized_headers_close_the_connection(live) -> None:
    url, _ = live(max_header_bytes=4096)
    sock = connect(url)
    with contextlib.suppress(ConnectionError):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(64):
            sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
    assert closed_by_server(sock, 5)
    sock.close()
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


# ------------------------------------------------------------------------ clients that go away
@pytest.fixture
def edge_logs(caplog) -> Any:
    caplog.set_level(logging.INFO, logger="tta_server")
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    return caplog


def _no_errors(caplog: Any) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert bad == [], [r.getMessage() for r in bad]


def test_disconnect_mid_body_is_info_without_traceback(live, edge_logs) -> None:
    url, app = live()
    for ctype in (b"application/x-npy", b"multipart/form-data; boundary=xyz"):
        sock = connect(url)
        sock.sendall(
            b"POST /v1/streams/s/predict HTTP/1.1\r\nHost: x\r\nContent-Type: " + ctype + b"\r\n"
            b"Content-Length: 100000\r\n\r\n--xyz\r\n"
            b'Content-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + b"x" * 5000
        )
        time.sleep(0.3)
        sock.close()
    deadline = time.monotonic() + 5
    while sum("went away" in r.getMessage() for r in edge_logs.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    went = [r for r in edge_logs.records if "went away" in r.getMessage()]
    assert len(went) == 2 and all(r.levelno == logging.INFO for r in went)
    _no_errors(edge_logs)
    assert eventually(lambda: app.state.admission.pending == 0)


def test_client_gone_while_decoding_cancels_the_request(live, monkeypatch, edge_logs) -> None:
    """The client leaves while its images decode: nothing is computed or committed, the pixels stay
    charged until the decode thread is done, then everything is released."""
    url, app = live()
    assert httpx.put(f"{url}/v1/streams/cam", json={"strategy": "tent"}, timeout=10).status_code == 200
    blocked = BlockedDecode(monkeypatch)
    body = npy_bytes(batch(4))
    sock = connect(url)
    sock.sendall(
        b"POST /v1/streams/cam/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    assert blocked.entered.wait(10)
    assert app.state.admission.pixels == 4 * 32 * 32
    sock.close()
    assert eventually(lambda: app.state.admission.pending == 0)  # the request is over ...
    assert app.state.admission.pixels == 4 * 32 * 32  # ... but its decode still runs
    blocked.release()
    assert eventually(lambda: app.state.admission.pixels == 0)
    assert version(url, "cam") == 0
    assert any("request cancelled" in r.getMessage() for r in edge_logs.records)
    _no_errors(edge_logs)


# ------------------------------------------------------------------ JPEG scans and valid variants
def _jpeg(img: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"progressive": True},
        {"optimize": True},
        {"progressive": True, "optimize": True, "quality": 5},
        {"subsampling": 0},
        {"subsampling": 1, "quality": 95},
        {"restart_marker_blocks": 2},
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "flat"])
def test_valid_jpegs_pass_the_scan_check(kw: dict[str, Any], mode: str) -> None:
    rng = np.random.default_rng(0)
    if mode == "flat":
        img = Image.new("RGB", (2048, 1536), (10, 200, 30))
    else:
        img = Image.fromarray(rng.integers(0, 256, (61, 93, 3), dtype=np.uint8)).convert(mode)
    if mode != "RGB":
        kw = {k: v for k, v in kw.items() if k != "subsampling"}
    data = _jpeg(img, **kw)
    codec.check_jpeg_scans(data)
    assert codec.image_info(data, 10**8).pixels == img.width * img.height


def test_cifar_jpegs_pass_the_scan_check(cifar_jpeg_sample: list[bytes]) -> None:
    for data in cifar_jpeg_sample:
        codec.check_jpeg_scans(data)


@pytest.fixture(scope="module")
def cifar_jpeg_sample() -> list[bytes]:
    from tests.conftest import CIFAR_TEST

    d = np.load(CIFAR_TEST)
    idx = np.random.default_rng(0).permutation(len(d["labels"]))[:500]
    return [d["jpeg"][d["offsets"][i] : d["offsets"][i + 1]].tobytes() for i in idx]


def test_jpeg_bytes_helper_is_a_valid_jpeg() -> None:
    codec.check_jpeg_scans(jpeg_bytes())
