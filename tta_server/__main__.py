"""`python -m tta_server [--host H] [--port P] [--config models.yaml]`: start the server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import uvicorn

from tta_server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tta_server", description=__doc__)
    parser.add_argument("--host", help="bind address (TTA_HOST)")
    parser.add_argument("--port", type=int, help="port (TTA_PORT)")
    parser.add_argument("--config", type=Path, help="models YAML (TTA_MODELS_CONFIG)")
    args = parser.parse_args(argv)
    overrides = {
        k: v for k, v in {"host": args.host, "port": args.port, "models_config": args.config}.items() if v
    }
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tta_server.app import create_app

    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower()
    )


if __name__ == "__main__":
    main()
