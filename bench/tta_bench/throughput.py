"""`tta-bench throughput`: bare-model, in-process strategy, HTTP and state-store throughput in one run.

What one run measures (all at the same batch size, dtype and device):

(a) the bare network (stock BatchNorm layers, built with `adapters.models.build_network` plus the same
    weights) in eval mode: forward under `torch.inference_mode()`, and forward+backward with
    `requires_grad` on every parameter and loss `logits.logsumexp(1).mean()`;
(b) every requested strategy's in-process `step` (adapt=True, the state threaded from step to step),
    as a ratio to the bare forward (and, for strategies that need gradients, to the bare
    forward+backward). (a) and (b) run interleaved, one call of each per round with the order
    reversed every other round, so load from other processes on the machine hits all of them alike;
(c) end-to-end HTTP throughput: `python -m tta_server` on 127.0.0.1 and a free port, `--streams`
    concurrent client streams posting raw (`application/x-npy`) and JPEG (multipart `files`) batches
    for `--http-strategy`, as a ratio to in-process steps of that strategy timed right before and
    after each HTTP phase, with p50/p99 request latency;
(d) each strategy's serialised state size and the Redis round trip of the engine's path
    (`state_to_bytes` + CAS script + HMGET + `state_from_bytes`), p50, as a ratio to the step time.

(f) with `--fanin N`: one server, each `--fanin-strategies` strategy in rounds that alternate one stream
    posting `--batch-size` images per request with N streams posting one image each (a camera each),
    same images in all; the ratio of the two rates, and how many streams shared each forward.

(c), (d) and (f) use a redis-server of the bench's own on a free loopback port (or `--redis-url`, where they
write keys of their own and delete them, never flush); without `redis-server` (c) runs on the in-process
store and (d) is skipped.

Every loop is bounded by an iteration count and by `--phase-seconds` of wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import adapters
from adapters import AdaptationState, ComposedStrategy, ModelHandle, StepResult, StrategyConfig
from adapters._bn import layer_kind
from adapters.base import AFFINE_KINDS
from adapters.models import ModelSpec, build_classifier, build_handle
from adapters.serialization import state_from_bytes, state_to_bytes
from tta_bench.opcount import count_call
from tta_bench.paths import MODELS_CONFIG, REPO_ROOT, cifar10_archive
from tta_bench.redis_server import PrivateRedis, free_port, redis_server_binary
from tta_server import drift
from tta_server.settings import Settings

DEFAULT_STRATEGIES = "source,norm,alpha_bn,unmix_tns,tent,eata"
RESNET50 = ModelSpec(
    id="resnet50",
    arch="resnet50",
    num_classes=1000,
    input_size=(224, 224),
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    random_init_seed=0,
)
# Throughput goals on CPU, as fractions: in-process step vs bare forward (or bare forward+backward for
# strategies with gradients), HTTP raw vs in-process. Shown in the table; they never fail a run.
FORWARD_GOALS = {"alpha_bn": 0.8, "norm": 0.8, "unmix_tns": 0.8}
TRAIN_GOALS = {"tent": 0.8, "eata": 0.8}
HTTP_RAW_GOAL = 0.7


class BenchError(RuntimeError):
    """A benchmark phase could not run (server did not start, a request failed)."""


# --------------------------------------------------------------------------------------------- args
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tta-bench throughput", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="wrn",
        help=(
            "wrn = the models.yaml default; a models.yaml id; resnet50 or torchvision:<name> = that "
            "ImageNet architecture with seeded random weights at 224x224"
        ),
    )
    p.add_argument("--models-config", type=Path, default=MODELS_CONFIG)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default=None,
        help="compute dtype of bare model, strategies and server (default: the model spec's)",
    )
    p.add_argument("--iters", type=int, default=10, help="timed calls per workload (and per HTTP stream)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per workload before timing")
    p.add_argument("--phase-seconds", type=float, default=180.0, help="wall-time cap of every loop")
    p.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="comma-separated strategy names")
    p.add_argument(
        "--strategy-config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="config of one strategy, e.g. eata='{\"fisher_size\": 500}' (repeatable)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (bench and server)")
    p.add_argument("--num-batches", type=int, default=4, help="distinct input batches, cycled")
    p.add_argument(
        "--layout",
        choices=("nhwc", "nchw"),
        default="nhwc",
        help="in-process input memory: nhwc = as the server's raw path makes it (channels_last), nchw",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        help="state store of (c) and (d) (default: a redis-server of the bench's own on a free loopback port)",
    )
    p.add_argument("--http-strategy", default="norm")
    p.add_argument("--streams", type=int, default=4, help="concurrent HTTP client streams")
    p.add_argument("--skip-http", action="store_true")
    p.add_argument(
        "--merge-clients",
        type=int,
        default=0,
        help="(e): concurrent senders per stream, with and without request merging (0 = skip)",
    )
    p.add_argument("--merge-batch", type=int, default=8, help="(e): images per request")
    p.add_argument(
        "--share-forward",
        choices=("true", "false"),
        default=None,
        help="(e): TTA_SHARE_FORWARD of the servers (default: the server's, on for CUDA only)",
    )
    p.add_argument(
        "--fanin",
        type=int,
        default=0,
        help="(f): streams of one image per request, against one stream of --batch-size (0 = skip)",
    )
    p.add_argument(
        "--fanin-images", type=int, default=1, help="(f): images per request of the fan-in streams"
    )
    p.add_argument("--fanin-strategies", default="alpha_bn,unmix_tns", help="(f): comma-separated")
    p.add_argument("--fanin-rounds", type=int, default=3, help="(f): rounds of each load per strategy")
    p.add_argument("--server-timeout", type=float, default=180.0, help="seconds to wait for the server")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    for name in ("batch_size", "iters", "num_batches", "streams"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.phase_seconds <= 0:
        p.error("--warmup must be >= 0 and --phase-seconds > 0")
    return args


def strategy_configs(raw: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in raw:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--strategy-config expects NAME=JSON, got {item!r}")
        out[name.strip()] = json.loads(text)
    return out


# ------------------------------------------------------------------------------------------ model
def resolve_spec(args: argparse.Namespace) -> ModelSpec:
    """The model to measure: the speed of a step depends on the architecture, not on trained weights, so
    ImageNet architectures run with seeded random weights (no download)."""
    if args.model == "resnet50":
        return RESNET50
    if args.model.startswith("torchvision:"):
        name = args.model.partition(":")[2]
        return ModelSpec.model_validate({**RESNET50.model_dump(), "id": name, "arch": args.model})
    from tta_server.model_pool import read_models_file

    cfg = read_models_file(args.models_config)
    wanted = (cfg.default_model or cfg.models[0].id) if args.model == "wrn" else args.model
    for m in cfg.models:
        if m.id == wanted:
            return m
    known = ", ".join(m.id for m in cfg.models)
    raise SystemExit(f"--model {args.model!r}: not in {args.models_config} (known: {known})")


def build_bare(spec: ModelSpec, device: torch.device, channels_last: bool) -> nn.Module:
    """An unconverted copy of the served network (stock BatchNorm2d), same weights, eval mode."""
    model = build_classifier(spec)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # Module.to takes memory_format at run time; torch's overloads of it do not declare the keyword.
    return model.to(device, memory_format=fmt)  # type: ignore[call-overload]


def input_images(spec: ModelSpec, n: int, seed: int = 0) -> np.ndarray:
    """n uint8 NHWC images at the model's input size: CIFAR-10 test images (resized if needed), else noise."""
    images: np.ndarray | None = None
    try:
        from tta_data import decode_images, load_jpeg_npz

        ds = load_jpeg_npz(cifar10_archive("test"))
        idx = np.random.default_rng(seed).choice(len(ds), size=min(n, len(ds)), replace=False)
        images = decode_images(ds, np.sort(idx))
    except (FileNotFoundError, OSError, ValueError):
        images = None
    if images is None or len(images) < n:
        gen = torch.Generator().manual_seed(seed)
        low = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
        images = low.permute(0, 2, 3, 1).numpy()
    if tuple(images.shape[1:3]) != tuple(spec.input_size):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=spec.input_size, mode="bilinear", align_corners=False)
        images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return np.ascontiguousarray(images[:n])


def to_input(batch_u8: np.ndarray, device: torch.device, layout: str) -> Tensor:
    """Float NCHW input in [0, 1]. `nhwc` keeps the strides the server's raw (.npy) path produces
    (`permute` of an NHWC array, i.e. channels_last memory); `nchw` makes it contiguous."""
    x = torch.from_numpy(batch_u8).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    return x.contiguous() if layout == "nchw" else x


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu: {cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


# --------------------------------------------------------------------------------------- timing
@dataclass
class Workload:
    name: str
    fn: Callable[[], object]
    images: int
    times: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        total = sum(self.times)
        med = statistics.median(self.times)
        return {
            "ips": self.images * len(self.times) / total,
            "ips_median": self.images / med,
            "step_ms_p50": 1000 * med,
            "calls": len(self.times),
        }


def run_interleaved(
    workloads: list[Workload], warmup: int, iters: int, cap_s: float, sync: Callable[[], None]
) -> None:
    """One call of each workload per round (order reversed every other round), bounded by iters and cap_s."""
    deadline = time.perf_counter() + cap_s
    for _ in range(warmup):
        for w in workloads:
            w.fn()
        sync()
        if time.perf_counter() > deadline:
            break
    deadline = time.perf_counter() + cap_s
    for i in range(iters):
        for w in workloads if i % 2 == 0 else workloads[::-1]:
            sync()
            t0 = time.perf_counter()
            w.fn()
            sync()
            w.times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break


def paired_ratio(bare: Workload, w: Workload) -> float:
    """Median over rounds of bare time / workload time, both taken in the same round."""
    return statistics.median(b / t for b, t in zip(bare.times, w.times, strict=True))


class StrategyRun:
    """Calls `strategy.step` on cycled batches, threading the state from step to step."""

    def __init__(
        self, strategy: ComposedStrategy, handle: ModelHandle, cfg: StrategyConfig, batches: list[Tensor]
    ) -> None:
        self.strategy, self.handle, self.cfg, self.batches = strategy, handle, cfg, batches
        t0 = time.perf_counter()
        self.state: AdaptationState = strategy.init_state(handle, cfg, 0)
        self.init_s = time.perf_counter() - t0
        self.calls = 0
        self.updated = 0
        self.last: StepResult | None = None

    def __call__(self) -> None:
        x = self.batches[self.calls % len(self.batches)]
        result = self.strategy.step(self.handle, x, self.state, self.cfg, True)
        self.state, self.last = result.state, result
        self.calls += 1
        self.updated += int(result.stats.updated)


def _norm_affine_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The weight and bias of every layer of the kinds the gradient strategies adapt (`AFFINE_KINDS`)."""
    return [p for m in net.modules() if layer_kind(m) in AFFINE_KINDS for p in m.parameters(recurse=False)]


def bare_nets(spec: ModelSpec, device: torch.device, channels_last: bool) -> tuple[nn.Module, nn.Module]:
    """Two bare copies: gradients for every parameter, and for the normalisation affine parameters only."""
    net = build_bare(spec, device, channels_last).requires_grad_(True)
    affine_net = build_bare(spec, device, channels_last).requires_grad_(False)
    for p in _norm_affine_parameters(affine_net):
        p.requires_grad_(True)
    return net, affine_net


def bare_workloads(
    net: nn.Module, affine_net: nn.Module, batches: list[Tensor], handle: ModelHandle
) -> tuple[Workload, Workload, Workload]:
    """Bare forward, forward+backward with gradients for every parameter, and forward+backward with gradients
    for the normalisation affine parameters only (`affine_net`: what tent/eata/sar need, the fair baseline
    of the gradient strategies), under the served model's autocast (same compute dtype)."""
    counter = {"f": 0, "t": 0, "a": 0}

    def forward() -> None:
        with torch.inference_mode(), handle.autocast():
            net(batches[counter["f"] % len(batches)])
        counter["f"] += 1

    def make_train(model: nn.Module, key: str) -> Callable[[], None]:
        params = [p for p in model.parameters() if p.requires_grad]

        def train() -> None:
            for p in params:
                p.grad = None
            with handle.autocast():
                logits = model(batches[counter[key] % len(batches)])
            loss = logits.float().logsumexp(1).mean()
            loss.backward()
            counter[key] += 1

        return train

    n = batches[0].shape[0]
    return (
        Workload("bare_forward", forward, n),
        Workload("bare_train", make_train(net, "t"), n),
        Workload("bare_train_affine", make_train(affine_net, "a"), n),
    )


def in_process(
    args: argparse.Namespace, handle: ModelHandle, spec: ModelSpec, batches: list[Tensor], names: list[str]
) -> tuple[dict[str, Any], dict[str, StrategyRun], dict[str, str]]:
    net, affine_net = bare_nets(spec, handle.device, handle.channels_last)
    configs = strategy_configs(args.strategy_config)
    runs: dict[str, StrategyRun] = {}
    skipped: dict[str, str] = {}
    for name in names:
        strategy = adapters.get_strategy(name)
        try:
            cfg = strategy.parse_config(configs.get(name, {}))
            runs[name] = StrategyRun(strategy, handle, cfg, batches)
        except adapters.AdaptError as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"  skipping {name}: {exc}", file=sys.stderr)
    with torch.inference_mode(), handle.autocast():
        bare_logits = net(batches[0]).float()
    source = adapters.get_strategy("source")
    src_cfg = source.parse_config({})
    src_logits = source.step(handle, batches[0], source.init_state(handle, src_cfg), src_cfg, False).logits
    fwd, train, affine = bare_workloads(net, affine_net, batches, handle)
    workloads = [fwd, train, affine] + [Workload(n, r, batches[0].shape[0]) for n, r in runs.items()]
    sync = torch.cuda.synchronize if handle.device.type == "cuda" else (lambda: None)
    run_interleaved(workloads, args.warmup, args.iters, args.phase_seconds, sync)
    # Untimed, after the timing: kernels and host synchronisations per call (a GPU launch-count proxy).
    ops = {w.name: _ops_of(w.fn) for w in workloads}
    out: dict[str, Any] = {
        "bare_forward": fwd.summary() | ops["bare_forward"],
        "bare_train": train.summary() | ops["bare_train"],
        "bare_train_affine": affine.summary() | ops["bare_train_affine"],
        "bare_vs_source_max_abs_diff": float((bare_logits.cpu() - src_logits.float().cpu()).abs().max()),
    }
    bare_f, bare_t = out["bare_forward"]["ips"], out["bare_train"]["ips"]
    bare_a = out["bare_train_affine"]["ips"]
    strategies: dict[str, Any] = {}
    for w in workloads[3:]:
        run = runs[w.name]
        s = w.summary()
        needs_grad = run.strategy.needs_grad
        strategies[w.name] = {
            "ips": s["ips"],
            "ratio": s["ips"] / (bare_a if needs_grad else bare_f),
            # Median over rounds of (bare time / step time) in the same round: steadier under shared load.
            "ratio_paired_median": paired_ratio(affine if needs_grad else fwd, w),
            "ratio_forward": s["ips"] / bare_f,
            # Against gradients for every parameter (convolution weights too): flatters gradient strategies.
            "ratio_train": s["ips"] / bare_t,
            "ratio_train_affine": s["ips"] / bare_a,
            "needs_grad": needs_grad,
            "ips_median": s["ips_median"],
            "step_ms_p50": s["step_ms_p50"],
            "calls": s["calls"],
            "updated_fraction": run.updated / max(run.calls, 1),
            "init_s": run.init_s,
            **ops[w.name],
        }
    out["strategies"] = strategies
    return out, runs, skipped


# ------------------------------------------------------------------------------------------ HTTP
@contextlib.contextmanager
def serve(
    args: argparse.Namespace, spec: ModelSpec, redis_url: str | None, extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    """`python -m tta_server` in a subprocess with a one-model config; yields its base URL."""
    import httpx
    import yaml

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tta-bench-") as tmp:
        config = Path(tmp) / "models.yaml"
        entry = spec.model_dump(mode="json", exclude_none=True)
        config.write_text(yaml.safe_dump({"default_model": spec.id, "models": [entry]}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")}
        env.update(
            TTA_MODELS_CONFIG=str(config),
            TTA_HOST="127.0.0.1",
            TTA_PORT=str(port),
            TTA_DEVICE=args.device,
            TTA_LOG_LEVEL="WARNING",
            TTA_MAX_BATCH=str(max(256, args.batch_size)),
            PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        if args.threads:
            env["TTA_TORCH_THREADS"] = str(args.threads)
        if redis_url:
            env["TTA_REDIS_URL"] = redis_url
        env.update(extra_env or {})
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tta_server"], cwd=tmp, env=env, stdout=log, stderr=log
            )
            base = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + args.server_timeout
                while True:
                    if proc.poll() is not None:
                        tail = log_path.read_text(errors="replace")[-2000:]
                        raise BenchError(f"server exited with {proc.returncode}:\n{tail}")
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{base}/readyz", timeout=2.0).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise BenchError(f"server not ready after {args.server_timeout:.0f} s")
                    time.sleep(0.25)
                yield base
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=15)


def npy_body(batch: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, batch, allow_pickle=False)
    return buf.getvalue()


def jpeg_multipart(batch: np.ndarray, quality: int = 90) -> tuple[bytes, str]:
    """A multipart/form-data body with one `files` part per image (JPEG, given quality)."""
    from PIL import Image

    boundary = f"tta-bench-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for i, img in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        )
        parts += [head.encode(), buf.getvalue(), b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class HttpLoad:
    strategy: str
    config: dict[str, Any]
    bodies: list[tuple[bytes, str]]
    images: int
    streams: int
    warmup: int
    iters: int
    cap_s: float
    clients_per_stream: int = 1


async def _http_load(base: str, load: HttpLoad) -> dict[str, Any]:
    import httpx

    ids = [f"tpbench-{os.getpid()}-{uuid.uuid4().hex[:6]}-{i}" for i in range(load.streams)]
    limits = httpx.Limits(max_connections=load.streams + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600.0, limits=limits) as client:
        for sid in ids:
            r = await client.put(
                f"/v1/streams/{sid}", json={"strategy": load.strategy, "config": load.config}
            )
            if r.status_code != 200:
                raise BenchError(f"PUT stream answered {r.status_code}: {r.text[:300]}")

        merged: list[int] = []  # requests served by the step that answered each timed request

        async def stream(k: int, sid: str, n: int, deadline: float, timed: bool) -> list[float]:
            times = []
            for j in range(n):
                body, ctype = load.bodies[(j + k) % len(load.bodies)]
                t0 = time.perf_counter()
                r = await client.post(
                    f"/v1/streams/{sid}/predict", content=body, headers={"content-type": ctype}
                )
                times.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise BenchError(f"predict answered {r.status_code}: {r.text[:300]}")
                if timed:
                    merged.append(int(r.json()["stats"].get("requests", 1)))
                if time.perf_counter() > deadline:
                    break
            return times

        # Every stream gets `clients_per_stream` concurrent senders.
        senders = [sid for sid in ids for _ in range(load.clients_per_stream)]
        try:
            deadline = time.perf_counter() + load.cap_s
            await asyncio.gather(*(stream(k, s, load.warmup, deadline, False) for k, s in enumerate(senders)))
            t0 = time.perf_counter()
            per_stream = await asyncio.gather(
                *(stream(k, s, load.iters, t0 + load.cap_s, True) for k, s in enumerate(senders))
            )
            elapsed = time.perf_counter() - t0
        finally:
            for sid in ids:
                await client.delete(f"/v1/streams/{sid}")
    latencies = np.array([t for times in per_stream for t in times]) * 1000
    return {
        "ips": load.images * len(latencies) / elapsed,
        "images": load.images * len(latencies),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "requests": len(latencies),
        "wall_s": elapsed,
        "mean_requests_per_step": float(np.mean(merged)) if merged else None,
    }


def bracket_times(run: StrategyRun, calls: int, cap_s: float) -> list[float]:
    """In-process steps of the HTTP strategy right before/after an HTTP phase (the server idles meanwhile)."""
    sync = torch.cuda.synchronize if run.handle.device.type == "cuda" else (lambda: None)
    times: list[float] = []
    deadline = time.perf_counter() + cap_s
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return times


def measure_http(
    args: argparse.Namespace,
    spec: ModelSpec,
    batches_u8: list[np.ndarray],
    redis_url: str | None,
    run: StrategyRun,
    phase_b_ips: float,
) -> dict[str, Any]:
    """Each payload kind's HTTP throughput, as a ratio to in-process steps timed just before and after it
    (load from other processes drifts over minutes; phase (b) ran earlier)."""
    import httpx

    cfg = strategy_configs(args.strategy_config).get(args.http_strategy, {})
    payloads = {
        "raw": [(npy_body(b), "application/x-npy") for b in batches_u8],
        "jpeg": [jpeg_multipart(b) for b in batches_u8],
    }
    out: dict[str, Any] = {}
    calls = max(2, args.iters // 2)
    with serve(args, spec, redis_url) as base:
        for kind, bodies in payloads.items():
            load = HttpLoad(
                args.http_strategy,
                cfg,
                bodies,
                args.batch_size,
                args.streams,
                max(args.warmup, 1),
                args.iters,
                args.phase_seconds,
            )
            before = bracket_times(run, calls, args.phase_seconds)
            try:
                res = asyncio.run(_http_load(base, load))
            except (BenchError, OSError, httpx.HTTPError) as exc:
                out[kind] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            times = before + bracket_times(run, calls, args.phase_seconds)
            bracket_ips = args.batch_size * len(times) / sum(times)
            res["ratio"] = res["ips"] / bracket_ips
            res["in_process_ips_bracket"] = bracket_ips
            res["ratio_vs_phase_b"] = res["ips"] / phase_b_ips
            res["body_bytes"] = int(np.mean([len(b) for b, _ in bodies]))
            out[kind] = {k: res[k] for k in ("ips", "ratio", "p50_ms", "p99_ms")} | res
    return out


def measure_merging(
    args: argparse.Namespace, spec: ModelSpec, images: np.ndarray, redis_url: str | None
) -> dict[str, Any]:
    """(e) `--merge-clients` concurrent senders on each of `--streams` streams, `--merge-batch` images per
    request: the server with TTA_MAX_STEP_IMAGES=1 (every request its own step) against the default."""
    import httpx

    cfg = strategy_configs(args.strategy_config).get(args.http_strategy, {})
    b = args.merge_batch
    bodies = [(npy_body(images[i : i + b]), "application/x-npy") for i in range(0, len(images) - b + 1, b)]
    out: dict[str, Any] = {
        "clients_per_stream": args.merge_clients,
        "request_images": b,
        "share_forward": args.share_forward,
    }
    default_max_step = Settings.model_fields["max_step_images"].default
    for label, max_step in (("unmerged", 1), ("merged", default_max_step)):
        load = HttpLoad(
            args.http_strategy,
            cfg,
            bodies,
            b,
            args.streams,
            max(args.warmup, 1),
            args.iters * 4,
            args.phase_seconds,
            clients_per_stream=args.merge_clients,
        )
        try:
            env = {"TTA_MAX_STEP_IMAGES": str(max_step)}
            if args.share_forward is not None:
                env["TTA_SHARE_FORWARD"] = str(args.share_forward).lower()
            with serve(args, spec, redis_url, env) as base:
                out[label] = asyncio.run(_http_load(base, load)) | {"max_step_images": max_step}
        except (BenchError, OSError, httpx.HTTPError) as exc:
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
    if "ips" in out["merged"] and "ips" in out["unmerged"]:
        out["speedup"] = out["merged"]["ips"] / out["unmerged"]["ips"]
    return out


def _forward_streams(base: str) -> tuple[float, float]:
    """(sum, count) of the server's `tta_forward_streams` histogram, over all labels."""
    import httpx

    total = count = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=30.0).text.splitlines():
        if line.startswith("tta_forward_streams_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("tta_forward_streams_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


async def _fanin_round(
    port: int,
    strategy: str,
    config: dict[str, Any],
    clients: int,
    bodies: list[bytes],
    requests: int,
    cap_s: float,
) -> dict[str, Any]:
    """`clients` streams (a keep-alive connection each) post `requests` raw bodies each, closed loop,
    through the lean load generator; one untimed request per stream first."""
    from tta_bench.loadgen import Connection, LoadError, closed_loop

    prefix = f"fanin-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    conns = [Connection("127.0.0.1", port) for _ in range(clients)]
    policy = json.dumps({"strategy": strategy, "config": config}).encode()
    try:
        for k, conn in enumerate(conns):
            status, data = await conn.request("PUT", f"/v1/streams/{prefix}-{k}", policy, "application/json")
            if status != 200:
                raise LoadError(f"PUT stream answered {status}: {data[:300]!r}")
        posts = [("POST", f"/v1/streams/{prefix}-{{client}}/predict", b, "application/x-npy") for b in bodies]
        await closed_loop(conns, posts, 1, cap_s)
        timed = await closed_loop(conns, posts, requests, cap_s)
    finally:
        for k, conn in enumerate(conns):
            with contextlib.suppress(OSError, LoadError):
                await conn.request("DELETE", f"/v1/streams/{prefix}-{k}")
            await conn.close()
    return dict(timed.summary())


def measure_fanin(
    args: argparse.Namespace, spec: ModelSpec, images: np.ndarray, redis_url: str | None
) -> dict[str, Any]:
    """(f) `--fanin` streams x 1 image per request against 1 stream x `--batch-size` images, same server,
    rounds interleaved (load from other processes hits both alike), per `--fanin-strategies` strategy.
    Requests come from `tta_bench.loadgen` (httpx would cost the machine as much CPU as the server)."""
    from tta_bench.loadgen import LoadError

    configs = strategy_configs(args.strategy_config)
    b, n, m = args.batch_size, args.fanin, args.fanin_images
    big = [npy_body(images[i : i + b]) for i in range(0, len(images) - b + 1, b)]
    small = [npy_body(images[i : i + m]) for i in range(0, len(images) - m + 1, m)]
    # Each round of either load sends about the same images: iters x batch.
    per_client = max(1, args.iters * b // (n * m))
    env = {"TTA_MAX_PENDING_REQUESTS": str(max(Settings.model_fields["max_pending_requests"].default, 2 * n))}
    if args.share_forward is not None:
        env["TTA_SHARE_FORWARD"] = str(args.share_forward).lower()
    out: dict[str, Any] = {
        "streams": n,
        "request_images": m,
        "batch": b,
        "share_forward": args.share_forward,
        "strategies": {},
    }
    try:
        with serve(args, spec, redis_url, env) as base:
            port = int(base.rsplit(":", 1)[1])
            for name in [s.strip() for s in args.fanin_strategies.split(",") if s.strip()]:
                cfg = configs.get(name, {})
                loads = {"batch": (1, big, args.iters, b), "fanin": (n, small, per_client, m)}
                rounds: dict[str, list[dict[str, Any]]] = {"batch": [], "fanin": []}
                shared = [0.0, 0.0]
                for _ in range(args.fanin_rounds):
                    for label, (clients, bodies, reqs, per_request) in loads.items():
                        before = _forward_streams(base)
                        res = asyncio.run(
                            _fanin_round(port, name, cfg, clients, bodies, reqs, args.phase_seconds)
                        )
                        res["images"] = res["requests"] * per_request
                        rounds[label].append(res)
                        if label == "fanin":
                            after = _forward_streams(base)
                            shared = [shared[0] + after[0] - before[0], shared[1] + after[1] - before[1]]
                ips = {
                    k: sum(r["images"] for r in v) / sum(r["wall_s"] for r in v) for k, v in rounds.items()
                }
                out["strategies"][name] = {
                    "batch_ips": ips["batch"],
                    "fanin_ips": ips["fanin"],
                    "ratio": ips["fanin"] / ips["batch"],
                    "fanin_p50_ms": float(np.median([r["p50_ms"] for r in rounds["fanin"]])),
                    "fanin_p99_ms": float(max(r["p99_ms"] for r in rounds["fanin"])),
                    "streams_per_forward": shared[0] / shared[1] if shared[1] else None,
                    "rounds": rounds,
                }
    except (BenchError, OSError, LoadError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _format_fanin(r: dict[str, Any]) -> list[str]:
    f = r.get("fanin")
    if not f:
        return []
    if "error" in f:
        return ["", f"fan-in: error: {f['error']}"]
    lines = [
        "",
        f"{'fan-in ' + str(f['streams']) + ' x ' + str(f['request_images']) + ' vs 1 x ' + str(f['batch']):<22}"
        f"{'1 x b':>10}{'n x m':>10}"
        f"{'ratio':>8}{'streams/fwd':>13}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    for name, h in f["strategies"].items():
        spf = h["streams_per_forward"]
        lines.append(
            f"{name:<22}{h['batch_ips']:>10.1f}{h['fanin_ips']:>10.1f}{h['ratio']:>8.2f}"
            f"{spf if spf is None else round(spf, 1)!s:>13}{h['fanin_p50_ms']:>10.1f}{h['fanin_p99_ms']:>10.1f}"
        )
    return lines


# ----------------------------------------------------------------------------------------- state
def redis_reachable(url: str) -> str | None:
    """None when Redis answers PING, else the reason."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def state_for_store(run: StrategyRun) -> tuple[AdaptationState, float]:
    """The state as the engine stores it: with drift figures and the policy hash in its meta."""
    assert run.last is not None
    figures = drift.update(run.state.meta.get("drift"), run.last, run.handle.num_classes, 0.9)
    state = run.state.with_updates(drift=figures, policy="0" * 16)
    return state, float(figures.get("bn_distance") or 0.0)


async def _state_roundtrips(
    url: str, runs: dict[str, StrategyRun], reps: int, cap_s: float, device: torch.device
) -> dict[str, Any]:
    from tta_server.state_store import RedisStateStore

    store = RedisStateStore(url, ttl_seconds=600, timeout=5.0)
    out: dict[str, Any] = {}
    try:
        await store.ping()
        for name, run in runs.items():
            if run.last is None:
                continue
            state, score = state_for_store(run)
            stream, version, blob = f"tpbench-{os.getpid()}-{name}", 0, b""
            meta = json.dumps(dict(state.meta)).encode()
            total, ser, net = [], [], []
            deadline = time.perf_counter() + cap_s
            # The engine's steady-state round trip: commit (CAS + drift board) and load (policy + state).
            await store.create("bench", stream, "bench", b"{}")
            try:
                for _ in range(reps):
                    t0 = time.perf_counter()
                    blob = state_to_bytes(state)
                    t1 = time.perf_counter()
                    new = await store.cas("bench", stream, "bench", version, blob, meta, b"{}", score)
                    stored = await store.load("bench", stream, None)
                    t2 = time.perf_counter()
                    state_from_bytes((stored.state or {}).get("blob", b""), device)
                    t3 = time.perf_counter()
                    if new <= 0:
                        raise BenchError(f"unexpected CAS outcome {new} on {stream}")
                    version = new
                    total.append(t3 - t0)
                    ser.append((t1 - t0) + (t3 - t2))
                    net.append(t2 - t1)
                    if time.perf_counter() > deadline:
                        break
            finally:
                await store.delete("bench", stream)
            out[name] = {
                "bytes": len(blob),
                "roundtrip_ms_p50": 1000 * statistics.median(total),
                "codec_ms_p50": 1000 * statistics.median(ser),
                "redis_ms_p50": 1000 * statistics.median(net),
                "reps": len(total),
            }
    finally:
        await store.close()
    return out


def measure_state(
    args: argparse.Namespace,
    runs: dict[str, StrategyRun],
    strategies: dict[str, Any],
    redis_url: str,
    redis_error: str | None,
) -> dict[str, Any]:
    if redis_error is not None:
        out: dict[str, Any] = {}
        for name, run in runs.items():
            if run.last is not None:
                out[name] = {"bytes": len(state_to_bytes(state_for_store(run)[0])), "roundtrip_ms_p50": None}
        return out
    reps = max(args.iters, 20)
    device = next(iter(runs.values())).handle.device if runs else torch.device("cpu")
    out = asyncio.run(_state_roundtrips(redis_url, runs, reps, args.phase_seconds, device))
    for name, row in out.items():
        row["ratio_to_step"] = row["roundtrip_ms_p50"] / strategies[name]["step_ms_p50"]
    return out


def _ops_of(fn: Callable[[], object]) -> dict[str, int]:
    ops = count_call(fn)
    return {"kernels_per_call": ops.kernels, "host_syncs_per_call": ops.host_syncs}


# ----------------------------------------------------------------------------------------- report
def _goal(ratio: float | None, goal: float | None) -> str:
    if ratio is None or goal is None:
        return ""
    return f">= {goal:.2f} {'ok' if ratio >= goal else 'MISS'}"


def _format_merging(r: dict[str, Any]) -> list[str]:
    m = r.get("merging")
    if not m:
        return []
    lines = [
        "",
        f"{'merge ' + str(m['clients_per_stream']) + ' clients x' + str(r['streams']):<22}{'img/s':>10}"
        f"{'req/step':>10}{'p50 ms':>10}{'p99 ms':>10}  ({m['request_images']} images per request)",
    ]
    for label in ("unmerged", "merged"):
        h = m[label]
        if "error" in h:
            lines.append(f"{label:<22}error: {h['error']}")
            continue
        lines.append(
            f"{label:<22}{h['ips']:>10.1f}{h['mean_requests_per_step'] or 1:>10.2f}"
            f"{h['p50_ms']:>10.1f}{h['p99_ms']:>10.1f}"
        )
    if "speedup" in m:
        lines.append(f"{'merged / unmerged':<22}{m['speedup']:>10.2f}")
    return lines


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"throughput: model {r['model']} batch {r['batch_size']} {r['dtype']} {r['layout']} on {r['device']}",
        f"load average {r['loadavg_start']} -> {r['loadavg_end']}",
        "",
        f"{'in-process':<22}{'img/s':>10}{'ms/step p50':>13}{'ratio':>8}{'paired':>8}{'kernels':>9}{'syncs':>7}"
        f"  {'vs':<9}goal (on ratio)",
    ]
    bf, bt, ba = r["bare"]["bare_forward"], r["bare"]["bare_train"], r["bare"]["bare_train_affine"]
    for label, b in (("bare forward", bf), ("bare fwd+bwd (all)", bt), ("bare fwd+bwd (affine)", ba)):
        lines.append(
            f"{label:<22}{b['ips']:>10.1f}{b['step_ms_p50']:>13.1f}{1.0:>8.2f}{1.0:>8.2f}"
            f"{b['kernels_per_call']:>9}{b['host_syncs_per_call']:>7}  -"
        )
    for name, s in r["strategies"].items():
        vs = "affine" if s["needs_grad"] else "forward"
        goal = (TRAIN_GOALS if s["needs_grad"] else FORWARD_GOALS).get(name)
        lines.append(
            f"{name:<22}{s['ips']:>10.1f}{s['step_ms_p50']:>13.1f}{s['ratio']:>8.2f}"
            f"{s['ratio_paired_median']:>8.2f}{s['kernels_per_call']:>9}{s['host_syncs_per_call']:>7}"
            f"  {vs:<9}{_goal(s['ratio'], goal):<12}"
            + (f" (updated {s['updated_fraction']:.0%} of steps)" if s["needs_grad"] else "")
        )
    for name, why in r.get("skipped", {}).items():
        lines.append(f"{name:<22}skipped: {why}")
    if r["http"]:
        lines += [
            "",
            f"{'http ' + r['http_strategy'] + ' x' + str(r['streams']):<22}{'img/s':>10}{'ratio':>8}"
            f"{'p50 ms':>10}{'p99 ms':>10}  goal ({r['http_store']} store; ratio vs in-process steps"
            " timed around each HTTP phase)",
        ]
        for kind, h in r["http"].items():
            if "error" in h:
                lines.append(f"{kind:<22}error: {h['error']}")
                continue
            mark = _goal(h["ratio"], HTTP_RAW_GOAL if kind == "raw" else None)
            lines.append(
                f"{kind:<22}{h['ips']:>10.1f}{h['ratio']:>8.2f}{h['p50_ms']:>10.1f}{h['p99_ms']:>10.1f}  {mark}"
            )
    lines += _format_merging(r)
    lines += _format_fanin(r)
    if r["state"]:
        lines += ["", f"{'state':<22}{'bytes':>10}{'redis rt p50 ms':>17}{'x step':>8}"]
        for name, st in r["state"].items():
            rt = st.get("roundtrip_ms_p50")
            rt_s = f"{rt:>17.2f}{st['ratio_to_step']:>8.3f}" if rt is not None else f"{'n/a':>17}"
            lines.append(f"{name:<22}{st['bytes']:>10}{rt_s}")
    if r.get("redis_error"):
        lines.append(f"redis unreachable ({r['redis_error']}): no round trips measured")
    return "\n".join(lines)


@contextlib.contextmanager
def own_redis(url: str | None) -> Iterator[tuple[str, str | None]]:
    """(URL, None) of the given Redis, or of a redis-server started here (removed on exit); (URL, reason)
    when none can be started. The bench writes only to these (keys `tpbench-*`, deleted afterwards)."""
    if url:
        yield url, None
        return
    if redis_server_binary() is None:
        yield "redis://127.0.0.1:1/0", "redis-server is not installed (or pass --redis-url)"
        return
    server = PrivateRedis(appendonly=False)
    try:
        server.start()
    except RuntimeError as exc:
        server.close()
        yield server.url, str(exc)
        return
    try:
        yield server.url, None
    finally:
        server.close()


def measure_served(
    args: argparse.Namespace,
    spec: ModelSpec,
    report: dict[str, Any],
    runs: dict[str, StrategyRun],
    images: np.ndarray,
    batches_u8: list[np.ndarray],
    redis_url: str,
    redis_error: str | None,
) -> int:
    """(c), (e) and (d) into `report`; the exit status."""
    report["http"] = {}
    report["http_strategy"], report["streams"] = args.http_strategy, args.streams
    report["http_store"] = "memory" if redis_error else "redis"
    rc = 0
    if not args.skip_http and args.http_strategy in report["strategies"]:
        in_ips = report["strategies"][args.http_strategy]["ips"]
        store_url = None if redis_error else redis_url
        try:
            report["http"] = measure_http(args, spec, batches_u8, store_url, runs[args.http_strategy], in_ips)
        except BenchError as exc:
            report["http"] = {"raw": {"error": str(exc)}, "jpeg": {"error": str(exc)}}
        rc = int(any("error" in h for h in report["http"].values()))
    if args.merge_clients > 0:
        store_url = None if redis_error else redis_url
        report["merging"] = measure_merging(args, spec, images, store_url)
        rc = rc or int(any("error" in report["merging"][k] for k in ("merged", "unmerged")))
    if args.fanin > 0:
        report["fanin"] = measure_fanin(args, spec, images, None if redis_error else redis_url)
        rc = rc or int("error" in report["fanin"])
    report["state"] = measure_state(args, runs, report["strategies"], redis_url, redis_error)
    return rc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    from tta_server.model_pool import resolve_device

    device = resolve_device(args.device)
    spec = resolve_spec(args)
    if args.precision:
        spec = spec.model_copy(update={"precision": args.precision})
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    if not args.skip_http and args.http_strategy not in names:
        names.append(args.http_strategy)
    for name in names:
        adapters.get_strategy(name)  # unknown names fail before any work
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": spec.id,
        "batch_size": args.batch_size,
        "dtype": "bfloat16 autocast" if spec.precision == "bf16" else "float32",
        "layout": args.layout,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": describe_device(device),
        "iters": args.iters,
        "warmup": args.warmup,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
    }
    handle = build_handle(spec, device)
    images = input_images(spec, args.batch_size * args.num_batches)
    batches_u8 = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    batches = [to_input(b, device, args.layout) for b in batches_u8]
    bare, runs, skipped = in_process(args, handle, spec, batches, names)
    report |= {
        "bare_forward_ips": bare["bare_forward"]["ips"],
        "bare_train_ips": bare["bare_train"]["ips"],
        "bare_train_affine_ips": bare["bare_train_affine"]["ips"],
        "strategies": bare.pop("strategies"),
        "bare": bare,
        "skipped": skipped,
    }
    # Progress, and a JSON that keeps the in-process figures if a served phase is cut short.
    ratios = ", ".join(f"{n} {v['ratio']:.2f}" for n, v in report["strategies"].items())
    print(f"in-process done (ratio to bare): {ratios}; served phases next", file=sys.stderr, flush=True)
    _write_json(args.json, report)
    with own_redis(args.redis_url) as (redis_url, redis_error):
        report["redis"] = "given with --redis-url" if args.redis_url else "own redis-server"
        report["redis_error"] = redis_error = redis_error or redis_reachable(redis_url)
        rc = measure_served(args, spec, report, runs, images, batches_u8, redis_url, redis_error)
    report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(format_report(report))
    _write_json(args.json, report)
    return rc


def _write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
