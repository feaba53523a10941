"""Client tests run without the caller's TTA_* environment, and with retry waits recorded, not slept."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import tta_client._client as client_module
from tta_client._retry import ENV_API_KEY, ENV_MAX_RETRIES, ENV_TIMEOUT, ENV_URL


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ENV_URL, ENV_API_KEY, ENV_TIMEOUT, ENV_MAX_RETRIES):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The seconds each retry would have waited, in order (the waits themselves take no time)."""
    recorded: list[float] = []

    async def async_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(client_module, "_sleep", recorded.append)
    monkeypatch.setattr(client_module, "_async_sleep", async_sleep)
    yield recorded
