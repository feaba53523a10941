"""Synchronous and asynchronous clients over one request builder (``_BaseClient``)."""

from __future__ import annotations

import asyncio
import enum
import io
import itertools
import mimetypes
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, Self, TypeAlias, TypeVar

import httpx
import pydantic

from tta_client._exceptions import APIError, TransportError, parse_retry_after, raise_for_error
from tta_client._models import (
    ModelInfo,
    PredictResponse,
    StrategyInfo,
    StreamDrift,
    StreamPolicy,
    StreamPublic,
)
from tta_client._retry import ENV_API_KEY, ENV_TIMEOUT, ENV_URL, Retry, RetryKind, env_float
from tta_client._version import __version__

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_URL", "AsyncClient", "Client", "ImageInput", "Retry"]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds; an adapting batch on a CPU server can take a while, so this is well above httpx's 5 s.
DEFAULT_TIMEOUT = 30.0
NPY_CONTENT_TYPE = "application/x-npy"

#: One image for ``predict_files``: a path, the encoded bytes, or an open binary file.
ImageInput: TypeAlias = str | os.PathLike[str] | bytes | BinaryIO

_STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif"}

T = TypeVar("T")


class _Unset(enum.Enum):
    UNSET = enum.auto()


#: "Not given": the environment (``TTA_TIMEOUT``) or the default decides.
UNSET = _Unset.UNSET
# Looked up at call time, so tests can make the waits instantaneous.
_sleep = time.sleep
_async_sleep = asyncio.sleep


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One HTTP request and how to turn its response into a result."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] | None = None
    json: Any = None
    content: bytes | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    headers: dict[str, str] | None = None
    retry: RetryKind = RetryKind.IDEMPOTENT


def guess_content_type(data: bytes, name: str | None = None) -> str:
    """Image content type from the magic bytes, else from the file extension."""
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    guessed = mimetypes.guess_type(name)[0] if name else None
    return guessed or "application/octet-stream"


def _read_image(item: ImageInput, i: int) -> tuple[str, bytes, str]:
    """``(filename, bytes, content type)`` of one ``predict_files`` input."""
    if isinstance(item, bytes | bytearray | memoryview):
        data = bytes(item)
        content_type = guess_content_type(data)
        return f"image-{i}{_EXTENSIONS.get(content_type, '')}", data, content_type
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        data = path.read_bytes()
        return path.name, data, guess_content_type(data, path.name)
    data = item.read()
    name = os.path.basename(str(getattr(item, "name", "") or f"image-{i}"))
    return name, data, guess_content_type(data, name)


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike) or hasattr(images, "read"):
        return [images]  # type: ignore[list-item]
    return list(images)


def _check_stream_id(stream_id: str) -> str:
    if not isinstance(stream_id, str) or not _STREAM_ID.fullmatch(stream_id):
        raise ValueError(
            f"invalid stream id {stream_id!r}: use 1-128 characters from A-Z a-z 0-9 _ . : - "
            "starting with a letter or digit"
        )
    return stream_id


def _json(response: httpx.Response) -> Any:
    raise_for_error(response)
    try:
        return response.json()
    except ValueError as exc:
        raise APIError(response.status_code, "invalid_response", f"response is not JSON: {exc}") from exc


def _parser(model: type[pydantic.BaseModel], key: str | None = None) -> Callable[[httpx.Response], Any]:
    """Parse a JSON body (or the list under ``key``) into ``model`` instances."""

    def parse(response: httpx.Response) -> Any:
        body = _json(response)
        try:
            if key is None:
                return model.model_validate(body)
            return [model.model_validate(item) for item in body[key]]
        except (pydantic.ValidationError, KeyError, TypeError) as exc:
            raise APIError(
                response.status_code,
                "invalid_response",
                f"unexpected response from {response.url.path}: {exc}",
            ) from exc

    return parse


def _no_content(response: httpx.Response) -> None:
    raise_for_error(response)


def _content(response: httpx.Response) -> bytes:
    raise_for_error(response)
    return response.content


def _readiness(response: httpx.Response) -> dict[str, Any]:
    # A not-ready server (503) is an answer, not a failure: return its body so callers can read it.
    if response.status_code == 503:
        try:
            body = response.json()
        except ValueError:
            body = None
        return body if isinstance(body, dict) else {"status": "unavailable"}
    result: dict[str, Any] = _json(response)
    return result


def _resolve_timeout(timeout: float | httpx.Timeout | _Unset | None) -> httpx.Timeout:
    if timeout is UNSET:
        from_env = env_float(ENV_TIMEOUT)
        timeout = DEFAULT_TIMEOUT if from_env is None else from_env
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def _resolve_retry(retry: Retry | int | None) -> Retry:
    if retry is None:
        return Retry.from_env()
    if isinstance(retry, Retry):
        return retry
    return Retry(max_retries=retry)


class _BaseClient:
    """Configuration and request building shared by ``Client`` and ``AsyncClient``.

    Arguments not given come from the environment: ``base_url`` from ``TTA_URL`` (default
    ``DEFAULT_URL``), ``api_key`` from ``TTA_API_KEY``, ``timeout`` (seconds, ``None`` = no timeout) from
    ``TTA_TIMEOUT`` (default ``DEFAULT_TIMEOUT``), ``retry`` from ``TTA_MAX_RETRIES`` (default 2 retries;
    an int sets the number, a ``Retry`` everything; which requests are retried: ``tta_client._retry``).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | _Unset | None = UNSET,
        headers: dict[str, str] | None = None,
        retry: Retry | int | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get(ENV_URL) or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get(ENV_API_KEY) or None
        self.timeout = _resolve_timeout(timeout)
        self.retry = _resolve_retry(retry)
        self.headers = {"Accept": "application/json", "User-Agent": f"tta-client/{__version__}"}
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"
        self.headers.update(headers or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    # Request builders: one per endpoint, shared by both clients.

    def _set_policy(
        self, stream_id: str, strategy: str, config: dict[str, Any] | None, model: str | None, seed: int
    ) -> _Call[StreamPublic]:
        policy = StreamPolicy(strategy=strategy, config=config or {}, model=model, seed=seed)
        path = f"/v1/streams/{_check_stream_id(stream_id)}"
        return _Call("PUT", path, _parser(StreamPublic), json=policy.model_dump(mode="json"))

    def _get_stream(self, stream_id: str) -> _Call[StreamPublic]:
        return _Call("GET", f"/v1/streams/{_check_stream_id(stream_id)}", _parser(StreamPublic))

    def _delete_stream(self, stream_id: str) -> _Call[None]:
        return _Call("DELETE", f"/v1/streams/{_check_stream_id(stream_id)}", _no_content)

    def _reset_stream(self, stream_id: str) -> _Call[StreamPublic]:
        return _Call("POST", f"/v1/streams/{_check_stream_id(stream_id)}/reset", _parser(StreamPublic))

    def _export_stream(self, stream_id: str) -> _Call[bytes]:
        path = f"/v1/streams/{_check_stream_id(stream_id)}/export"
        return _Call("GET", path, _content, headers={"Accept": "application/octet-stream, application/json"})

    def _predict_files(
        self, stream_id: str, images: ImageInput | Sequence[ImageInput], adapt: bool, top_k: int
    ) -> _Call[PredictResponse]:
        files = [("files", _read_image(item, i)) for i, item in enumerate(_as_list(images))]
        if not files:
            raise ValueError("predict_files needs at least one image")
        return _Call(
            "POST",
            f"/v1/streams/{_check_stream_id(stream_id)}/predict",
            _parser(PredictResponse),
            params={"adapt": adapt, "top_k": top_k},
            files=files,
            retry=RetryKind.UNPROCESSED if adapt else RetryKind.IDEMPOTENT,
        )

    def _predict_array(
        self, stream_id: str, images: np.ndarray, adapt: bool, top_k: int
    ) -> _Call[PredictResponse]:
        return _Call(
            "POST",
            f"/v1/streams/{_check_stream_id(stream_id)}/predict",
            _parser(PredictResponse),
            params={"adapt": adapt, "top_k": top_k},
            content=encode_npy(images),
            headers={"Content-Type": NPY_CONTENT_TYPE},
            retry=RetryKind.UNPROCESSED if adapt else RetryKind.IDEMPOTENT,
        )

    def _models(self) -> _Call[list[ModelInfo]]:
        return _Call("GET", "/v1/models", _parser(ModelInfo, "models"))

    def _strategies(self) -> _Call[list[StrategyInfo]]:
        return _Call("GET", "/v1/strategies", _parser(StrategyInfo, "strategies"))

    def _drift_top(self, n: int) -> _Call[list[StreamDrift]]:
        return _Call("GET", "/v1/drift/top", _parser(StreamDrift, "streams"), params={"n": n})

    def _health(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/healthz", _json)

    def _ready(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/readyz", _readiness)

    def _wait_after(
        self, call: _Call[Any], attempt: int, outcome: httpx.Response | httpx.TransportError
    ) -> float | None:
        """Seconds to wait before sending ``call`` again after ``outcome``; None: do not retry."""
        if isinstance(outcome, httpx.TransportError):
            if not self.retry.should_retry_error(call.retry, outcome):
                return None
            return self.retry.delay(attempt, None)
        if not self.retry.should_retry_response(call.retry, outcome):
            return None
        return self.retry.delay(attempt, parse_retry_after(outcome.headers.get("Retry-After")))

    def _request_kwargs(self, call: _Call[Any]) -> dict[str, Any]:
        return {
            "params": call.params,
            "json": call.json,
            "content": call.content,
            "files": call.files,
            "headers": call.headers,
        }


def encode_npy(images: np.ndarray) -> bytes:
    """A uint8 NHWC array as ``.npy`` bytes (``np.save`` format, no pickle)."""
    import numpy as np  # lazily: only array uploads need numpy

    if not isinstance(images, np.ndarray):
        raise TypeError(f"predict_array needs a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(
            f"predict_array needs dtype uint8, got {images.dtype}; convert with .astype(np.uint8)"
        )
    if images.ndim != 4:
        raise ValueError(f"predict_array needs an NHWC array (4 dims), got shape {images.shape}")
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(images), allow_pickle=False)
    return buffer.getvalue()


class Client(_BaseClient):
    """Blocking client. Use as a context manager or call ``close()``.

    >>> with Client("http://127.0.0.1:8000", api_key="k") as tta:
    ...     tta.set_policy("cam-1", "alpha_bn", {"test_weight": 0.1})
    ...     tta.predict_files("cam-1", ["a.jpg", "b.jpg"])
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | _Unset | None = UNSET,
        transport: httpx.BaseTransport | None = None,
        headers: dict[str, str] | None = None,
        retry: Retry | int | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, headers, retry)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def _send(self, call: _Call[T]) -> T:
        for attempt in itertools.count():
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self._http.request(call.method, call.path, **self._request_kwargs(call))
            except httpx.TransportError as exc:
                outcome = exc
            wait = self._wait_after(call, attempt, outcome)
            if wait is None:
                break
            _sleep(wait)
        if isinstance(outcome, httpx.TransportError):
            raise TransportError(f"{call.method} {self.base_url}{call.path} failed: {outcome!r}") from outcome
        return call.parse(outcome)

    def set_policy(
        self,
        stream_id: str,
        strategy: str,
        config: dict[str, Any] | None = None,
        model: str | None = None,
        seed: int = 0,
    ) -> StreamPublic:
        """Configure a stream's strategy; a changed policy resets the stream's state."""
        return self._send(self._set_policy(stream_id, strategy, config, model, seed))

    def get_stream(self, stream_id: str) -> StreamPublic:
        """A stream's policy, counters and drift."""
        return self._send(self._get_stream(stream_id))

    def delete_stream(self, stream_id: str) -> None:
        """Delete a stream's policy and state."""
        self._send(self._delete_stream(stream_id))

    def reset_stream(self, stream_id: str) -> StreamPublic:
        """Put a stream back to the source state, keeping its policy."""
        return self._send(self._reset_stream(stream_id))

    def export_stream(self, stream_id: str) -> bytes:
        """The stream's adapted state as a safetensors patch of its model (``tta_client.edge.load_export``
        applies it); ``NotExportableError`` where the stream's predictions depend on each batch."""
        return self._send(self._export_stream(stream_id))

    def predict_files(
        self, stream_id: str, images: ImageInput | Sequence[ImageInput], adapt: bool = True, top_k: int = 3
    ) -> PredictResponse:
        """Predict (and adapt on) encoded images: paths, bytes or binary files (JPEG/PNG/WebP)."""
        return self._send(self._predict_files(stream_id, images, adapt, top_k))

    def predict_array(
        self, stream_id: str, images: np.ndarray, adapt: bool = True, top_k: int = 3
    ) -> PredictResponse:
        """Predict (and adapt on) a uint8 NHWC RGB batch sent as ``application/x-npy``."""
        return self._send(self._predict_array(stream_id, images, adapt, top_k))

    def models(self) -> list[ModelInfo]:
        """The models the server serves."""
        return self._send(self._models())

    def strategies(self) -> list[StrategyInfo]:
        """The registered strategies with their config schemas."""
        return self._send(self._strategies())

    def drift_top(self, n: int = 10) -> list[StreamDrift]:
        """This key's ``n`` streams with the highest BN distance, highest first."""
        return self._send(self._drift_top(n))

    def health(self) -> dict[str, Any]:
        """``/healthz``: the process is alive."""
        return self._send(self._health())

    def ready(self) -> dict[str, Any]:
        """``/readyz`` body; ``status == "ready"`` when serving (a 503 is returned, not raised)."""
        return self._send(self._ready())

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """Asyncio client with the same methods as ``Client``, awaited. Use ``async with`` or ``aclose()``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | _Unset | None = UNSET,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: dict[str, str] | None = None,
        max_connections: int = 100,
        retry: Retry | int | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, headers, retry)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=self.timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def _send(self, call: _Call[T]) -> T:
        for attempt in itertools.count():
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self._http.request(call.method, call.path, **self._request_kwargs(call))
            except httpx.TransportError as exc:
                outcome = exc
            wait = self._wait_after(call, attempt, outcome)
            if wait is None:
                break
            await _async_sleep(wait)
        if isinstance(outcome, httpx.TransportError):
            raise TransportError(f"{call.method} {self.base_url}{call.path} failed: {outcome!r}") from outcome
        return call.parse(outcome)

    async def set_policy(
        self,
        stream_id: str,
        strategy: str,
        config: dict[str, Any] | None = None,
        model: str | None = None,
        seed: int = 0,
    ) -> StreamPublic:
        """Configure a stream's strategy; a changed policy resets the stream's state."""
        return await self._send(self._set_policy(stream_id, strategy, config, model, seed))

    async def get_stream(self, stream_id: str) -> StreamPublic:
        """A stream's policy, counters and drift."""
        return await self._send(self._get_stream(stream_id))

    async def delete_stream(self, stream_id: str) -> None:
        """Delete a stream's policy and state."""
        await self._send(self._delete_stream(stream_id))

    async def reset_stream(self, stream_id: str) -> StreamPublic:
        """Put a stream back to the source state, keeping its policy."""
        return await self._send(self._reset_stream(stream_id))

    async def export_stream(self, stream_id: str) -> bytes:
        """The stream's adapted state as a safetensors patch of its model (``tta_client.edge.load_export``
        applies it); ``NotExportableError`` where the stream's predictions depend on each batch."""
        return await self._send(self._export_stream(stream_id))

    async def predict_files(
        self, stream_id: str, images: ImageInput | Sequence[ImageInput], adapt: bool = True, top_k: int = 3
    ) -> PredictResponse:
        """Predict (and adapt on) encoded images: paths, bytes or binary files (JPEG/PNG/WebP)."""
        return await self._send(self._predict_files(stream_id, images, adapt, top_k))

    async def predict_array(
        self, stream_id: str, images: np.ndarray, adapt: bool = True, top_k: int = 3
    ) -> PredictResponse:
        """Predict (and adapt on) a uint8 NHWC RGB batch sent as ``application/x-npy``."""
        return await self._send(self._predict_array(stream_id, images, adapt, top_k))

    async def models(self) -> list[ModelInfo]:
        """The models the server serves."""
        return await self._send(self._models())

    async def strategies(self) -> list[StrategyInfo]:
        """The registered strategies with their config schemas."""
        return await self._send(self._strategies())

    async def drift_top(self, n: int = 10) -> list[StreamDrift]:
        """This key's ``n`` streams with the highest BN distance, highest first."""
        return await self._send(self._drift_top(n))

    async def health(self) -> dict[str, Any]:
        """``/healthz``: the process is alive."""
        return await self._send(self._health())

    async def ready(self) -> dict[str, Any]:
        """``/readyz`` body; ``status == "ready"`` when serving (a 503 is returned, not raised)."""
        return await self._send(self._ready())

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    close = aclose

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
