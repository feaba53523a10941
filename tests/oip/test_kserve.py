"""The kserve SDK's v2 REST client (InferenceRESTClient) against the real server: health, inference with a
stream id that adapts (binary and JSON tensors), sequence_start, and a bad input's status.

kserve cannot share the project's environment (every release pins psutil<6.0.0; tta-bench pins
psutil==7.2.2), so scripts/install puts it in `.venv-kserve` and the client runs there
(tests/oip/kserve_client.py), printing what it saw.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from tests.conftest import REPO
from tests.oip.conftest import MODEL, OipServer, put_policy, read_stream

KSERVE_PYTHON = REPO / ".venv-kserve" / "bin" / "python"


def test_kserve_rest_client_sees_adaptation(oip_server: OipServer) -> None:
    if not KSERVE_PYTHON.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{KSERVE_PYTHON} missing: scripts/install creates it")
        pytest.skip(f"{KSERVE_PYTHON} missing: run scripts/install")
    stream = "kserve-1"
    put_policy(oip_server, stream, "tent")
    script = REPO / "tests" / "oip" / "kserve_client.py"
    result = subprocess.run(
        [str(KSERVE_PYTHON), str(script), oip_server.http_url, MODEL, stream],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["live"] and seen["ready"] and seen["model_ready"]
    params = [s["parameters"] for s in seen["steps"]]
    assert [p["version"] for p in params] == [1, 2, 3]  # sequence_start on the first: a fresh stream
    assert all(p["adapted"] and p["stream_id"] == stream for p in params)
    probs = [np.array(s["probabilities"]) for s in seen["steps"]]
    assert probs[0].shape == (8, 10)
    assert not np.allclose(probs[0], probs[2], atol=1e-6)  # tent moved the same images' probabilities
    assert read_stream(oip_server, stream)["version"] == 3
    assert seen["bad_status"] == 400
