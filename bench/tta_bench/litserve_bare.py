"""The bare model behind LitServe: what a user would deploy instead of the adaptation service.

`python -m tta_bench.litserve_bare --model wrn --port P` serves the stock network (`build_bare`: the
served model's weights and input normalisation, stock BatchNorm, eval mode, channels_last) on
`POST /predict`. A request is JSON `{"npy": <base64 of a uint8 NHWC .npy>}` (LitServe hands the
decoder parsed JSON or a form, not a raw body); the answer has the same content as the service's:
per image, the top 3 classes with label and probability, and the entropy. One LitServe API process,
one inference worker, no cross-request batching (each request is already a batch). Needs the
`litserve` extra of tta-bench (`pip install -e "bench[litserve]"`).
"""

import argparse
import base64
import io
import os
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import Request

from adapters.losses import softmax_entropy

TOP_K = 3


class BareModelAPI(ls.LitAPI):  # type: ignore[misc,unused-ignore]  # litserve is untyped: Any
    def __init__(self, model: str, models_config: str, threads: int) -> None:
        super().__init__(max_batch_size=1)
        self.model_arg, self.models_config, self.threads = model, models_config, threads

    def setup(self, device: str) -> None:
        from tta_bench.throughput import build_bare, resolve_spec

        torch.set_num_threads(self.threads)
        spec = resolve_spec(argparse.Namespace(model=self.model_arg, models_config=Path(self.models_config)))
        self.model = build_bare(spec, torch.device("cpu"), channels_last=True).eval()
        self.classes = list(spec.classes) if spec.classes else [str(i) for i in range(spec.num_classes)]

    def decode_request(self, request: Request) -> np.ndarray:
        # Annotated with FastAPI's Request (a real class, hence no postponed annotations in this module),
        # LitServe passes the parsed JSON body.
        body: dict[str, str] = request  # type: ignore[assignment]
        return np.load(io.BytesIO(base64.b64decode(body["npy"])), allow_pickle=False)

    def predict(self, batch: np.ndarray) -> torch.Tensor:
        # The service's raw path: uint8 NHWC -> float NCHW view in [0, 1] (channels_last memory).
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            return self.model(x)

    def encode_response(self, logits: torch.Tensor) -> dict[str, Any]:
        probs = logits.float().softmax(1)
        entropy = softmax_entropy(logits)  # the service's definition
        top_p, top_i = probs.topk(min(TOP_K, probs.shape[1]), dim=1)
        return {
            "predictions": [
                {
                    "top_k": [
                        {"index": i, "label": self.classes[i], "probability": p}
                        for i, p in zip(idx, ps, strict=True)
                    ],
                    "entropy": e,
                }
                for idx, ps, e in zip(top_i.tolist(), top_p.tolist(), entropy.tolist(), strict=True)
            ]
        }


def main(argv: list[str] | None = None) -> None:
    from tta_bench.paths import MODELS_CONFIG

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn", help="as tta-bench throughput --model")
    p.add_argument("--models-config", default=str(MODELS_CONFIG))
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the worker")
    p.add_argument(
        "--fast-queue", action="store_true", help="LitServer(fast_queue=True): ZeroMQ between its processes"
    )
    args = p.parse_args(argv)
    server = ls.LitServer(
        BareModelAPI(args.model, args.models_config, args.threads),
        accelerator="cpu",
        devices=1,
        workers_per_device=1,
        fast_queue=args.fast_queue,
    )
    server.run(
        host="127.0.0.1", port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False
    )


if __name__ == "__main__":
    main()
