"""What wraps every request: its id, its metrics, a JSON 500 instead of a traceback, CORS, body size caps.

`RequestContext` is a plain ASGI middleware (no extra task, so context variables flow into the handlers):
it takes the client's `X-Request-ID` (when it is a sane token) or makes one, puts it in the logging context
and in the response headers, counts the request and its latency by route template and status, caps the
request body (a 413 JSON error as soon as the declared or received bytes pass the cap: the photo cap for
every endpoint but the ingest upload, which has its own), and turns any exception that escapes the app
into `500 {"detail": "internal error", "request_id": ...}`, logging the traceback with the request id
(the client never sees it).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from fastapi import FastAPI, HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.settings import Settings
from service import metrics
from service.logs import REQUEST_ID, install_record_factory
from service.security import API_KEY_HEADER

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # anything else (log injection...) is replaced
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Multipart boundaries, headers and the small form fields around an upload.
FORM_OVERHEAD_BYTES = 1024 * 1024
INGEST_PATH = re.compile(r"/catalogues/[^/]+/ingest/?")
log = logging.getLogger("service.errors")


def request_body_cap(settings: Settings) -> int:
    """The largest request body of any endpoint but the ingest upload: a photo in base64 plus the fields."""
    return settings.max_upload_bytes * 4 // 3 + FORM_OVERHEAD_BYTES


def ingest_body_cap(settings: Settings) -> int:
    """The ingest request's body cap: the file's own cap plus the multipart framing and fields around it."""
    return settings.max_ingest_upload_bytes + FORM_OVERHEAD_BYTES


def _declared_length(headers: Headers) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _capped(receive: Receive, cap: int, declared: int | None) -> Receive:
    """`receive` that raises 413 (an HTTPException, which the app answers as JSON) once the body passes `cap`:
    at once when its declared length does, else when the bytes received do."""
    received = 0

    async def receive_capped() -> Message:
        nonlocal received
        if declared is not None and declared > cap:
            raise HTTPException(413, f"the request body is larger than {cap} bytes")
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > cap:
                raise HTTPException(413, f"the request body is larger than {cap} bytes")
        return message

    return receive_capped


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/catalogues/{catalogue}/products/...`), never the raw path, so
    metrics keep one series per route; `unmatched` for a 404 outside every route."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else "unmatched"


class RequestContext:
    def __init__(self, app: ASGIApp, *, body_cap: int, ingest_body_cap: int) -> None:
        self.app = app
        self.body_cap = body_cap
        self.ingest_body_cap = ingest_body_cap
        install_record_factory()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID_HEADER)
        request_id = given if given and _VALID_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = REQUEST_ID.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        method = scope["method"] if scope["method"] in _METHODS else "other"
        cap = self.ingest_body_cap if INGEST_PATH.fullmatch(scope.get("path", "")) else self.body_cap
        status, started, sending_failed = 500, False, False
        began = time.perf_counter()
        metrics.IN_FLIGHT.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status, started, sending_failed
            if message["type"] == "http.response.start":
                started, status = True, int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            try:
                await send(message)
            except BaseException:
                sending_failed = True  # the server's side (a client gone): not an error of the app
                raise

        try:
            await self.app(scope, _capped(receive, cap, _declared_length(headers)), send_with_id)
        except Exception:
            if sending_failed:
                raise
            log.exception("internal error answering %s %s", scope["method"], scope.get("path", ""))
            if started:  # too late for a 500: the server drops the connection
                raise
            status = 500
            response = JSONResponse(
                {"detail": "internal error", "request_id": request_id},
                status_code=500,
                headers={REQUEST_ID_HEADER: request_id},
            )
            await response(scope, receive, send)
        finally:
            metrics.IN_FLIGHT.dec()
            labels: dict[str, Any] = {"method": method, "route": route_template(scope), "status": str(status)}
            metrics.REQUESTS.labels(**labels).inc()
            metrics.REQUEST_SECONDS.labels(**labels).observe(time.perf_counter() - began)
            REQUEST_ID.reset(token)


def install(app: FastAPI, settings: Settings) -> None:
    """Request ids, metrics and the catch-all 500 on every request; CORS when `CORS_ORIGINS` names origins.
    CORS goes outside, so that its headers are on every answer, the 500 included."""
    app.add_middleware(RequestContext, body_cap=request_body_cap(settings), ingest_body_cap=ingest_body_cap(settings))
    origins = settings.cors_origin_list
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", API_KEY_HEADER, REQUEST_ID_HEADER],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
