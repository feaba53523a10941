"""error_type -> exception mapping, the status fallback and Retry-After."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

import tta_client
from tta_client import APIError, raise_for_error

from .fakes import error_response

# The error table of docs/API.md.
CONTRACT = [
    ("validation", 422, tta_client.ValidationError),
    ("unknown_strategy", 422, tta_client.UnknownStrategyError),
    ("unknown_model", 422, tta_client.UnknownModelError),
    ("unknown_stream", 404, tta_client.StreamNotFoundError),
    ("invalid_image", 400, tta_client.InvalidImageError),
    ("unsupported_media_type", 415, tta_client.UnsupportedMediaTypeError),
    ("payload_too_large", 413, tta_client.PayloadTooLargeError),
    ("batch_too_small", 422, tta_client.BatchTooSmallError),
    ("state_mismatch", 409, tta_client.StateMismatchError),
    ("state_corrupt", 409, tta_client.StateCorruptError),
    ("not_exportable", 409, tta_client.NotExportableError),
    ("unauthorized", 401, tta_client.UnauthorizedError),
    ("rate_limited", 429, tta_client.RateLimitedError),
    ("state_store_unavailable", 503, tta_client.StoreUnavailableError),
    ("internal", 500, tta_client.ServerError),
    ("incompatible_model", 422, tta_client.IncompatibleModelError),
    ("bad_request", 400, tta_client.BadRequestError),
    ("not_found", 404, tta_client.NotFoundError),
    ("method_not_allowed", 405, tta_client.MethodNotAllowedError),
    ("state_store_full", 503, tta_client.StoreFullError),
    ("overloaded", 503, tta_client.OverloadedError),
    ("deadline_exceeded", 503, tta_client.DeadlineExceededError),
    ("request_timeout", 408, tta_client.RequestTimeoutError),
]


def test_the_client_knows_every_error_type_the_server_sends() -> None:
    """The server's one error table and the client's exception tree list the same types and statuses."""
    from tta_server.errors import ERROR_TYPES

    assert {t: status for t, (status, _) in ERROR_TYPES.items()} == {t: s for t, s, _ in CONTRACT}


@pytest.mark.parametrize(("error_type", "status", "cls"), CONTRACT)
def test_each_error_type_raises_its_exception(error_type: str, status: int, cls: type[APIError]) -> None:
    response = error_response(status, error_type, "something went wrong", detail=[{"loc": ["x"]}])
    with pytest.raises(cls) as info:
        raise_for_error(response)
    exc = info.value
    assert type(exc) is cls
    assert (exc.status, exc.error_type, exc.message, exc.detail) == (
        status,
        error_type,
        "something went wrong",
        [{"loc": ["x"]}],
    )
    assert isinstance(exc, APIError) and isinstance(exc, tta_client.TTAError)
    assert (error_type, status) == (cls.ERROR_TYPE, cls.STATUS)


def test_every_api_error_subclass_is_in_the_contract_table() -> None:
    exported = {getattr(tta_client, n) for n in tta_client.__all__}
    subclasses = {
        c for c in exported if isinstance(c, type) and issubclass(c, APIError) and c is not APIError
    }
    assert subclasses == {cls for _, _, cls in CONTRACT} | {tta_client.UnavailableError}


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, tta_client.InvalidImageError),
        (401, tta_client.UnauthorizedError),
        (404, tta_client.StreamNotFoundError),
        (409, tta_client.StateMismatchError),
        (413, tta_client.PayloadTooLargeError),
        (415, tta_client.UnsupportedMediaTypeError),
        (422, tta_client.ValidationError),
        (429, tta_client.RateLimitedError),
        (500, tta_client.ServerError),
        (502, tta_client.ServerError),
        (503, tta_client.UnavailableError),
        (418, APIError),
    ],
)
@pytest.mark.parametrize("error_type", ["some_future_type", None])
def test_unknown_or_missing_error_type_falls_back_on_status(
    status: int, cls: type[APIError], error_type
) -> None:
    with pytest.raises(APIError) as info:
        raise_for_error(error_response(status, error_type, "boom"))
    assert type(info.value) is cls
    assert info.value.error_type == error_type
    assert info.value.message == "boom"


def test_non_json_error_body_becomes_the_message() -> None:
    with pytest.raises(tta_client.ServerError) as info:
        raise_for_error(httpx.Response(502, text="bad gateway from proxy"))
    assert info.value.message == "bad gateway from proxy"
    assert info.value.error_type is None


def test_empty_error_body_uses_the_reason_phrase() -> None:
    with pytest.raises(tta_client.StreamNotFoundError, match="Not Found"):
        raise_for_error(httpx.Response(404))


def test_framework_detail_only_body_uses_detail_as_message() -> None:
    with pytest.raises(tta_client.StreamNotFoundError) as info:
        raise_for_error(httpx.Response(404, json={"detail": "Not Found"}))
    assert info.value.message == "Not Found"


def test_success_does_not_raise() -> None:
    raise_for_error(httpx.Response(200, json={}))
    raise_for_error(httpx.Response(204))


def test_rate_limited_carries_retry_after_seconds() -> None:
    response = error_response(429, "rate_limited", "slow down", headers={"Retry-After": "7"})
    with pytest.raises(tta_client.RateLimitedError) as info:
        raise_for_error(response)
    assert info.value.retry_after == 7.0


def test_rate_limited_carries_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    response = error_response(429, "rate_limited", "slow down", headers={"Retry-After": when})
    with pytest.raises(tta_client.RateLimitedError) as info:
        raise_for_error(response)
    assert info.value.retry_after is not None and 55 <= info.value.retry_after <= 61


@pytest.mark.parametrize("header", [{}, {"Retry-After": "soon"}])
def test_rate_limited_without_usable_retry_after_is_none(header: dict[str, str]) -> None:
    with pytest.raises(tta_client.RateLimitedError) as info:
        raise_for_error(error_response(429, "rate_limited", "slow down", headers=header))
    assert info.value.retry_after is None


def test_str_names_type_and_status() -> None:
    exc = tta_client.StateMismatchError(409, "state_mismatch", "reset the stream")
    assert str(exc) == "reset the stream (state_mismatch, HTTP 409)"


def test_the_api_doc_lists_every_error_type() -> None:
    import re
    from pathlib import Path

    from tta_server.errors import ERROR_TYPES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "API.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \|", doc, flags=re.M))
    assert {t: int(s) for t, s in rows.items()} == {t: s for t, (s, _) in ERROR_TYPES.items()}
