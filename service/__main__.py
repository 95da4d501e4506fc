"""`python -m service [--host H] [--port P]`: serve the API and web page with uvicorn.

Logs are JSON lines on stderr (LOG_FORMAT=text for plain lines), uvicorn's access log included. On SIGTERM
(or Ctrl-C) the running job is told to stop at once (an ingest drops the photo fetches in flight) and uvicorn
stops accepting connections, closes idle keep-alive ones, lets the requests in flight finish for up to
SHUTDOWN_TIMEOUT_S seconds (then cancels them) and runs the app's shutdown; then the jobs are closed (one
still running when SHUTDOWN_TIMEOUT_S seconds have passed since the signal is marked interrupted and left
behind), the store is closed, and the process exits with status 0: within SHUTDOWN_TIMEOUT_S plus the time
the store takes to close."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from retrieval.encoders import EncoderError
from retrieval.settings import Settings
from retrieval.store import StoreError
from service.app import create_app
from service.jobs import JobsBusy
from service.logs import configure_logging, logging_config
from service.state import build_state


def server_config(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """How uvicorn serves the app: our log format for its loggers too, a bounded graceful shutdown."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=logging_config(settings.log_format, settings.log_level),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        server_header=False,  # no "server: uvicorn" on every answer
    )


class StoppingServer(uvicorn.Server):
    """uvicorn's server, which also calls `on_stop` the moment a stop signal arrives (before draining)."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self.stop_requested: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stop_requested is None:
            self.stop_requested = time.monotonic()
            self.on_stop()
        super().handle_exit(sig, frame)


def _stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM outside uvicorn's own handling: while loading, or re-raised by uvicorn once it has drained."""
    raise SystemExit(0)


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m service", description="Serve product search over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: bad configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    signal.signal(signal.SIGTERM, _stop)
    try:
        # Loaded before uvicorn starts so that a busy store or a bad model spec is one clear line, not a traceback.
        state = build_state(settings)
    except (StoreError, EncoderError, JobsBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(
        f"product-match is serving at http://{shown}:{args.port}/ (API docs: http://{shown}:{args.port}/docs)",
        flush=True,
    )
    server = StoppingServer(
        server_config(create_app(settings, state=state, served_host=args.host), settings, args.host, args.port),
        state.jobs.stop,
    )
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C: uvicorn drained the requests, then re-raised SIGINT
        pass
    finally:
        began = server.stop_requested or time.monotonic()
        state.close(max(0.5, settings.shutdown_timeout_s - (time.monotonic() - began)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
