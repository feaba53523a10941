"""The package's public surface and its import-time footprint."""

from __future__ import annotations

import subprocess
import sys

import tta_client

EXPECTED = {
    "DEFAULT_TIMEOUT",
    "DEFAULT_URL",
    "APIError",
    "AsyncClient",
    "BatchTooSmallError",
    "Client",
    "Drift",
    "ImageInput",
    "InvalidImageError",
    "ModelInfo",
    "PayloadTooLargeError",
    "PredictResponse",
    "PredictStats",
    "Prediction",
    "RateLimitedError",
    "ServerError",
    "StateCorruptError",
    "StateMismatchError",
    "StoreUnavailableError",
    "BadRequestError",
    "DeadlineExceededError",
    "IncompatibleModelError",
    "MethodNotAllowedError",
    "NotExportableError",
    "NotFoundError",
    "OverloadedError",
    "StoreFullError",
    "UnavailableError",
    "RequestTimeoutError",
    "Retry",
    "StrategyInfo",
    "StreamDrift",
    "StreamNotFoundError",
    "StreamPolicy",
    "StreamPublic",
    "TTAError",
    "TopK",
    "TransportError",
    "UnauthorizedError",
    "UnknownModelError",
    "UnknownStrategyError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "__version__",
    "raise_for_error",
}


def test_all_is_the_reviewed_public_api() -> None:
    assert set(tta_client.__all__) == EXPECTED
    assert len(tta_client.__all__) == len(EXPECTED)
    for name in tta_client.__all__:
        assert hasattr(tta_client, name), name


def test_import_loads_neither_torch_nor_numpy() -> None:
    code = (
        "import sys, tta_client, tta_client._cli, tta_client.replay; "
        "heavy = sorted({'torch', 'numpy', 'tta_server', 'tta_data', 'adapters'} & set(sys.modules)); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
