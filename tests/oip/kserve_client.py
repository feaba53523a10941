"""Run by `.venv-kserve/bin/python` (not the project's venv): the kserve SDK's InferenceRESTClient against a
server. Prints one JSON line per call for tests/oip/test_kserve.py. Imports nothing of the repository.

usage: kserve_client.py BASE_URL MODEL STREAM
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(base_url: str, model: str, stream: str) -> None:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
    try:
        out: dict[str, Any] = {
            "live": await client.is_server_live(base_url),
            "ready": await client.is_server_ready(base_url),
            "model_ready": await client.is_model_ready(base_url, model),
        }
        x = np.random.default_rng(7).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
        steps = []
        for i, binary in enumerate((True, True, False)):
            inp = InferInput("images", list(x.shape), "UINT8")
            inp.set_data_from_numpy(x, binary_data=binary)
            params = {"sequence_id": stream, "sequence_start": i == 0}
            res = await client.infer(
                base_url, InferRequest(model, [inp], parameters=params), model_name=model
            )
            probs = res.outputs[[o.name for o in res.outputs].index("probabilities")].as_numpy()
            steps.append({"parameters": dict(res.parameters or {}), "probabilities": probs.tolist()})
        out["steps"] = steps
        bad = InferInput("images", [8, 32, 32], "UINT8")
        bad.set_data_from_numpy(x[..., 0])
        try:
            await client.infer(base_url, InferRequest(model, [bad]), model_name=model)
            out["bad_status"] = None
        except Exception as exc:  # httpx.HTTPStatusError
            response = getattr(exc, "response", None)
            out["bad_status"] = getattr(response, "status_code", repr(exc))
        print(json.dumps(out, default=_plain))
    finally:
        await client.close()


def _plain(value: Any) -> Any:
    """InferParameter values (kserve keeps them as protobuf messages) as plain values."""
    which = getattr(value, "WhichOneof", None)
    if which is not None:
        return getattr(value, which("parameter_choice"))
    return str(value)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
