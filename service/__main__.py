"""`python -m service [--host H] [--port P]`: serve the API and web page with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from retrieval.encoders import EncoderError
from retrieval.settings import Settings
from retrieval.store import StoreError
from service.app import create_app
from service.state import build_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve product search over HTTP.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
        # Loaded before uvicorn starts so that a busy store or a bad model spec is one clear line, not a traceback.
        state = build_state(settings)
    except ValidationError as exc:
        print(f"error: bad configuration: {exc}", file=sys.stderr)
        return 2
    except (StoreError, EncoderError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(
        f"product-match is serving at http://{shown}:{args.port}/ (API docs: http://{shown}:{args.port}/docs)",
        flush=True,
    )
    try:
        uvicorn.run(create_app(settings, state=state), host=args.host, port=args.port, log_level="info")
    finally:
        state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
