"""The ``tta`` command: manage streams, predict files, inspect drift and replay test streams.

Exit codes: 0 success, 1 the server answered an error (its message goes to stderr) or could not be
reached, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx
import pydantic

from tta_client._client import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncClient, Client
from tta_client._exceptions import APIError, RateLimitedError, TransportError
from tta_client._format import format_predictions, format_stream, format_table
from tta_client._retry import ENV_TIMEOUT, env_float
from tta_client._version import __version__

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_API_ERROR, EXIT_USAGE = 0, 1, 2


@dataclass
class _Context:
    """What a subcommand needs besides its arguments."""

    args: argparse.Namespace
    url: str
    api_key: str | None
    timeout: float
    as_json: bool
    out: TextIO
    transport: httpx.MockTransport | None

    def client(self) -> Client:
        return Client(self.url, api_key=self.api_key, timeout=self.timeout, transport=self.transport)

    def async_client(self, max_connections: int = 100, retry: int | None = None) -> AsyncClient:
        return AsyncClient(
            self.url,
            api_key=self.api_key,
            timeout=self.timeout,
            transport=self.transport,
            max_connections=max_connections,
            retry=retry,
        )

    def print(self, text: str = "") -> None:
        print(text, file=self.out)

    def print_json(self, value: Any) -> None:
        self.print(json.dumps(value, indent=2, default=_jsonable))

    def emit(self, value: Any, text: Callable[[], str]) -> None:
        """Print ``value`` as JSON with ``--json``, else ``text()``."""
        if self.as_json:
            self.print_json(value)
        else:
            self.print(text())


def _jsonable(value: Any) -> Any:
    """``json.dumps`` hook for the wire models nested anywhere in a value."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# Subcommands.


def _parse_config(text: str | None) -> dict[str, Any]:
    """``--config``: a JSON object, or ``@path`` to a file holding one."""
    if text is None:
        return {}
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--config must be a JSON object such as '{{\"alpha\": 0.1}}', got {text!r}")
    return value


def _cmd_policy_set(ctx: _Context) -> int:
    a = ctx.args
    config = _parse_config(a.config)
    with ctx.client() as client:
        stream = client.set_policy(a.stream, a.strategy, config, model=a.model, seed=a.seed)
    ctx.emit(stream, lambda: format_stream(stream))
    return EXIT_OK


def _cmd_predict(ctx: _Context) -> int:
    a = ctx.args
    with ctx.client() as client:
        response = client.predict_files(a.stream, a.files, adapt=a.adapt, top_k=a.top_k)
    names = [Path(f).name for f in a.files]
    ctx.emit(response, lambda: format_predictions(names, response))
    return EXIT_OK


def _cmd_reset(ctx: _Context) -> int:
    with ctx.client() as client:
        stream = client.reset_stream(ctx.args.stream)
    ctx.emit(stream, lambda: f"reset stream {stream.stream_id} (version {stream.version})")
    return EXIT_OK


def _cmd_stream_show(ctx: _Context) -> int:
    with ctx.client() as client:
        stream = client.get_stream(ctx.args.stream)
    ctx.emit(stream, lambda: format_stream(stream))
    return EXIT_OK


def _cmd_stream_delete(ctx: _Context) -> int:
    with ctx.client() as client:
        client.delete_stream(ctx.args.stream)
    ctx.emit({"deleted": ctx.args.stream}, lambda: f"deleted stream {ctx.args.stream}")
    return EXIT_OK


def _cmd_drift_top(ctx: _Context) -> int:
    with ctx.client() as client:
        streams = client.drift_top(ctx.args.n)
    if ctx.as_json:
        ctx.print_json({"streams": streams})
        return EXIT_OK
    headers = [
        "stream",
        "model",
        "strategy",
        "bn_distance",
        "entropy",
        "confidence",
        "class_shift",
        "filtered",
    ]
    rows = [
        (
            s.stream_id,
            s.model,
            s.strategy,
            s.drift.bn_distance,
            s.drift.entropy,
            s.drift.confidence,
            s.drift.class_shift,
            s.drift.filtered_ratio,
        )
        for s in streams
    ]
    ctx.print(format_table(headers, rows) if rows else "no streams")
    return EXIT_OK


def _cmd_strategies(ctx: _Context) -> int:
    with ctx.client() as client:
        strategies = client.strategies()
    if ctx.as_json:
        ctx.print_json({"strategies": strategies})
        return EXIT_OK
    rows = [(s.name, s.needs_grad, s.min_batch_size, s.summary) for s in strategies]
    ctx.print(format_table(["name", "needs_grad", "min_batch", "summary"], rows))
    return EXIT_OK


def _cmd_models(ctx: _Context) -> int:
    with ctx.client() as client:
        models = client.models()
    if ctx.as_json:
        ctx.print_json({"models": models})
        return EXIT_OK
    rows = [
        (
            m.id + (" *" if m.default else ""),
            m.arch,
            m.num_classes,
            "x".join(map(str, m.input_size)) if isinstance(m.input_size, tuple) else str(m.input_size),
            m.device,
            m.fingerprint[:12],
        )
        for m in models
    ]
    ctx.print(format_table(["id (* default)", "arch", "classes", "input", "device", "fingerprint"], rows))
    return EXIT_OK


def _parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(
            f"{option} takes comma-separated numbers such as 0.5,0.5,0.5, got {text!r}"
        ) from None


def _edge_config(a: argparse.Namespace) -> Any:
    """``--edge-*``, ``--upload-*`` and ``--export-every`` as a ``replay.EdgeConfig`` (None without
    ``--edge-net``, where the others are refused)."""
    from tta_client import replay

    edge_only = {
        "--edge-kwargs": a.edge_kwargs,
        "--edge-weights": a.edge_weights,
        "--edge-mean": a.edge_mean,
        "--edge-std": a.edge_std,
        "--edge-threads": a.edge_threads,
        "--upload-fraction": a.upload_fraction,
        "--upload-max-entropy": a.upload_max_entropy,
        "--export-every": a.export_every,
    }
    if a.edge_net is None:
        given = [name for name, value in edge_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need(s) --edge-net (the edge mode)")
        return None
    if a.upload_fraction is not None and a.upload_max_entropy is not None:
        raise ValueError(
            "give one of --upload-fraction and --upload-max-entropy (neither uploads every image)"
        )
    try:
        kwargs = json.loads(a.edge_kwargs) if a.edge_kwargs is not None else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--edge-kwargs is not valid JSON: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"--edge-kwargs must be a JSON object such as '{{\"depth\": 40}}', got {a.edge_kwargs!r}"
        )
    return replay.EdgeConfig(
        net=a.edge_net,
        kwargs=kwargs,
        weights=a.edge_weights,
        mean=_parse_floats(a.edge_mean, "--edge-mean"),
        std=_parse_floats(a.edge_std, "--edge-std"),
        upload_fraction=a.upload_fraction,
        upload_max_entropy=a.upload_max_entropy,
        export_every=1 if a.export_every is None else a.export_every,
        threads=a.edge_threads,
    )


def _cmd_replay(ctx: _Context) -> int:
    from tta_client import replay

    a = ctx.args
    edge = _edge_config(a)
    try:
        stream_file = replay.load_stream_file(a.file, batch_size=a.batch_size)
    except ImportError as exc:
        raise ValueError(f"tta replay needs numpy ({exc}); pip install 'tta-client[replay]'") from exc
    cfg = replay.ReplayConfig(
        streams=stream_file.num_streams if a.streams is None else a.streams,
        stream_prefix=a.stream_prefix,
        strategy=a.strategy,
        config=_parse_config(a.config),
        model=a.model,
        keep_policy=a.keep_policy,
        seed=a.seed,
        payload=a.payload,
        reset_first=a.reset_first,
        adapt=a.adapt,
        concurrency=a.concurrency,
        max_requests=a.max_requests,
        max_seconds=a.max_seconds,
        edge=edge,
    )
    data = {"file": str(a.file), "file_streams": stream_file.num_streams, **stream_file.meta}

    async def go() -> replay.ReplayResult:
        # No client retries: replay counts every failed request and waits out rate limits itself.
        async with ctx.async_client(max_connections=cfg.concurrency or cfg.streams, retry=0) as client:
            return await replay.run_replay(client, cfg, stream_file, progress=not a.no_progress, data=data)

    result = asyncio.run(go())
    report = result.to_json()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(report, indent=2))
    ctx.emit(report["summary"], lambda: replay.format_report(report["summary"]))
    if not result.records and result.errors:
        print(f"error: every request failed; first: {result.errors[0].message}", file=sys.stderr)
        return EXIT_API_ERROR
    return EXIT_OK


# Parser.


def _global_options(with_json: bool = True) -> argparse.ArgumentParser:
    # Defaults are SUPPRESS so the options work before and after the subcommand; _context resolves them.
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"server URL (env TTA_URL, default {DEFAULT_URL})"
    )
    g.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env TTA_API_KEY)")
    g.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds per request (env TTA_TIMEOUT, default {DEFAULT_TIMEOUT:g})",
    )
    if with_json:
        g.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of text"
        )
    return p


def _add_replay_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file",
        help="replay file (.npz; `tta-bench stream` writes corrupted CIFAR-10 streams, or images + labels)",
    )
    p.add_argument(
        "--streams",
        type=int,
        help="concurrent streams (default: the file's); stream i plays the file's stream i modulo their number",
    )
    p.add_argument("--stream-prefix", default="replay", help="stream ids are PREFIX-0, PREFIX-1, ...")
    p.add_argument("--strategy", help="strategy set on each stream first (default: keep the stream's policy)")
    p.add_argument("--config", help="strategy config as JSON or @file.json")
    p.add_argument("--model", help="model id (default: the server's default model)")
    p.add_argument("--keep-policy", action="store_true", help="do not set the policy, even with --strategy")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy set with --strategy (default 0)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per request for a file of bare images + labels (default 64; a stream file has its own)",
    )
    p.add_argument(
        "--payload", choices=["raw", "jpeg"], default="raw", help="x-npy uint8 batch or JPEG files"
    )
    p.add_argument("--reset-first", action="store_true", help="reset each stream before starting")
    p.add_argument("--no-adapt", dest="adapt", action="store_false", help="predict without adapting")
    p.add_argument("--concurrency", type=int, help="requests in flight at most (default: --streams)")
    p.add_argument("--max-requests", type=int, help="stop after this many requests in total")
    p.add_argument("--max-seconds", type=float, help="stop sending after this many seconds")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="write the full report as JSON to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = p.add_argument_group(
        "edge mode",
        "predict locally with a torch copy of the source network patched by each stream's export (the "
        "accuracy counts these predictions) and upload only the selected images for the server to adapt "
        "on; needs the edge extra (pip install 'tta-client[edge]'). --max-requests counts batches here.",
    )
    e.add_argument(
        "--edge-net",
        metavar="MODULE:CALLABLE",
        help="builds the source network, e.g. adapters.models.wide_resnet:WideResNet (turns edge mode on)",
    )
    e.add_argument(
        "--edge-kwargs",
        metavar="JSON",
        help='its keyword arguments, e.g. \'{"depth": 40, "widen_factor": 2}\'',
    )
    e.add_argument(
        "--edge-weights", metavar="FILE", help="the model's weights file (.safetensors, or .pt/.pth)"
    )
    e.add_argument("--edge-mean", metavar="R,G,B", help="input mean, where the served model declares one")
    e.add_argument("--edge-std", metavar="R,G,B", help="input std, where the served model declares one")
    e.add_argument("--edge-threads", type=int, metavar="N", help="torch threads of the local forward")
    e.add_argument(
        "--upload-fraction",
        type=float,
        metavar="F",
        help="upload the ceil(F * batch) images of lowest local entropy (default: upload every image)",
    )
    e.add_argument(
        "--upload-max-entropy",
        type=float,
        metavar="NATS",
        help="upload the images whose local entropy is at most NATS (EATA's margin 0.4 ln 10 = 0.921)",
    )
    e.add_argument(
        "--export-every",
        type=int,
        metavar="K",
        help="download the stream's export again every K batches (default 1; always before the first)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``tta`` argument parser."""
    common, common_no_json = _global_options(), _global_options(with_json=False)
    parser = argparse.ArgumentParser(
        prog="tta", description="Client for the TTA inference service.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"tta-client {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(
        group: Any, name: str, handler: Callable[[_Context], int], help: str, json_opt: bool = True
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=help, description=help, parents=[common if json_opt else common_no_json]
        )
        p.set_defaults(handler=handler)
        return p

    policy = sub.add_parser("policy", help="stream policies").add_subparsers(dest="action", required=True)
    p = leaf(policy, "set", _cmd_policy_set, "set a stream's strategy (a changed policy resets it)")
    p.add_argument("stream")
    p.add_argument("--strategy", required=True)
    p.add_argument("--config", help="strategy config as JSON (e.g. '{\"test_weight\": 0.1}') or @file.json")
    p.add_argument("--model", help="model id (default: the server's default model)")
    p.add_argument("--seed", type=int, default=0)

    p = leaf(sub, "predict", _cmd_predict, "predict image files on a stream (adapting by default)")
    p.add_argument("stream")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--no-adapt", dest="adapt", action="store_false", help="predict without adapting")
    p.add_argument("--top-k", type=int, default=3)

    leaf(sub, "reset", _cmd_reset, "put a stream back to the source state").add_argument("stream")

    stream = sub.add_parser("stream", help="inspect or delete a stream").add_subparsers(
        dest="action", required=True
    )
    leaf(stream, "show", _cmd_stream_show, "show a stream's policy, counters and drift").add_argument(
        "stream"
    )
    leaf(stream, "delete", _cmd_stream_delete, "delete a stream's policy and state").add_argument("stream")

    drift = sub.add_parser("drift", help="drift across streams").add_subparsers(dest="action", required=True)
    leaf(drift, "top", _cmd_drift_top, "streams with the highest BN distance").add_argument(
        "-n", type=int, default=10, help="how many streams (default 10)"
    )

    leaf(sub, "strategies", _cmd_strategies, "list the registered strategies")
    leaf(sub, "models", _cmd_models, "list the served models")
    p = leaf(
        sub,
        "replay",
        _cmd_replay,
        "replay a stream file (e.g. corrupted CIFAR-10) at the server",
        json_opt=False,
    )
    _add_replay_arguments(p)
    return parser


def _context(args: argparse.Namespace, out: TextIO, transport: httpx.MockTransport | None) -> _Context:
    timeout = getattr(args, "timeout", None)
    if timeout is None:
        timeout = env_float(ENV_TIMEOUT)
    return _Context(
        args=args,
        url=getattr(args, "url", None) or os.environ.get("TTA_URL") or DEFAULT_URL,
        api_key=getattr(args, "api_key", None) or os.environ.get("TTA_API_KEY") or None,
        timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
        as_json=getattr(args, "json", False),
        out=out,
        transport=transport,
    )


def _report_api_error(exc: APIError) -> None:
    print(f"error: {exc.message} ({exc.error_type or 'error'}, HTTP {exc.status})", file=sys.stderr)
    if exc.detail is not None:
        print(f"detail: {json.dumps(exc.detail)}", file=sys.stderr)
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        print(f"retry after {exc.retry_after:g} s", file=sys.stderr)


def main(argv: Sequence[str] | None = None, *, transport: httpx.MockTransport | None = None) -> int:
    """Run ``tta`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    ``transport`` replaces the network for both the sync and async client (tests pass an
    ``httpx.MockTransport``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 for --help/--version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        ctx = _context(args, sys.stdout, transport)
    except ValueError as exc:  # a bad TTA_TIMEOUT
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(ctx))
    except APIError as exc:
        _report_api_error(exc)
        return EXIT_API_ERROR
    except TransportError as exc:
        print(f"error: cannot reach the server at {ctx.url}: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except (ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
