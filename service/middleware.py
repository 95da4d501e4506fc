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
from urllib.parse import quote, unquote

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


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The page and its files load only from the service itself (photos may be remote: product images are linked
# where a catalogue keeps them); the API's answers are data, never a document to render.
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob: http: https:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
DOCS_POLICY = "frame-ancestors 'none'"  # Swagger UI runs an inline script of its own (/docs, /docs-assets)
_DOCS = "/docs"
_PROBES = frozenset({"/healthz", "/readyz"})


def host_name(value: str) -> str:
    """The host of a Host or Origin authority, lower case, without port or trailing dot: `[::1]:8000` -> `::1`."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else value
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _policy(path: str) -> str:
    if path.startswith(_DOCS):
        return DOCS_POLICY
    if path == "/" or path.startswith("/static/"):
        return PAGE_POLICY
    return API_POLICY


class BrowserGuard:
    """What keeps browsers from being used against the service (docs/SECURITY.md):

    - a Host header that names no allowed host is refused with 400 (DNS rebinding: a page whose name now
      points at 127.0.0.1 would otherwise read the answers);
    - a write (POST, PUT, PATCH, DELETE) sent by a page of another origin is refused with 403, with or without
      an API key: its `Origin` is not the service's own nor in CORS_ORIGINS, or, without an `Origin`, its
      `Sec-Fetch-Site` says cross-site or same-site (a page on another port of the same machine). Clients that
      are not browsers send neither header and are not affected;
    - every answer says `nosniff`, refuses framing and sends no referrer; the page carries a Content Security
      Policy that loads nothing from elsewhere;
    - HEAD is answered wherever GET is (the headers of the GET answer, no body)."""

    def __init__(self, app: ASGIApp, *, hosts: frozenset[str], origins: frozenset[str]) -> None:
        self.app = app
        self.any_host = "*" in hosts
        self.hosts = hosts
        self.any_origin = "*" in origins
        self.origins = frozenset(origin.rstrip("/").lower() for origin in origins)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        host = headers.get("host")
        probe = scope.get("path") in _PROBES  # an orchestrator's health checks name the pod's address
        if host is not None and not probe and not self.any_host and host_name(host) not in self.hosts:
            return 400, "the Host header names a host this service does not answer for (ALLOWED_HOSTS)"
        if scope["method"] not in _WRITES:
            return None
        origin = headers.get("origin")
        if origin is not None:
            origin = origin.strip().rstrip("/").lower()
            own = host is not None and origin.partition("://")[2] == host.strip().lower()
            if own or self.any_origin or origin in self.origins:
                return None
            return 403, "a write from another site's page is refused (its Origin is not allowed: CORS_ORIGINS)"
        if headers.get("sec-fetch-site", "").lower() in ("cross-site", "same-site"):
            return 403, "a write from another site's page is refused (Sec-Fetch-Site)"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        policy = _policy(scope.get("path", ""))
        head = scope["method"] == "HEAD"

        async def send_guarded(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = MutableHeaders(scope=message)
                extra["X-Content-Type-Options"] = "nosniff"
                extra["X-Frame-Options"] = "DENY"
                extra["Referrer-Policy"] = "no-referrer"
                extra.setdefault("Content-Security-Policy", policy)
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, message = refusal
            await JSONResponse({"detail": message}, status_code=status)(scope, receive, send_guarded)
            return
        if head:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send_guarded)


def product_path(scope: Scope) -> str | None:
    """The path routes see for `/catalogues/{c}/products/{retailer}/{id}[/...]`, with the retailer and id kept
    percent-encoded (`Fruit%2FApple%2FGranny-Smith_001`), or None for any other path.

    The server decodes `%2F` into `/` before routing, so an id holding `/` (every product of a folder-per-category
    feed) would no longer match its route; taken from the raw path instead, the two segments reach the handlers
    encoded, and `service.routes.catalogues` decodes them (`unquote`)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else quote(scope.get("path", ""), safe="/")
    parts = path.split("/")
    if len(parts) < 6 or parts[1] != "catalogues" or parts[3] != "products":
        return None
    decoded = [unquote(part) for part in parts]
    for place in (4, 5):
        decoded[place] = quote(decoded[place], safe="")
    return "/".join(decoded)


class ProductPaths:
    """Routes product URLs by their raw path (see `product_path`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (path := product_path(scope)) is not None:
            scope = {**scope, "path": path}
        await self.app(scope, receive, send)


def allowed_hosts(settings: Settings, served_host: str | None) -> frozenset[str]:
    """The loopback names, the served `--host` (unless it is every interface) and ALLOWED_HOSTS."""
    served = {host_name(served_host)} if served_host and served_host not in ("0.0.0.0", "::") else set()
    return frozenset(LOOPBACK_HOSTS | served | {host_name(h) if h != "*" else h for h in settings.allowed_host_list})


def install(app: FastAPI, settings: Settings, *, served_host: str | None = None) -> None:
    """Request ids, metrics and the catch-all 500 on every request; CORS when `CORS_ORIGINS` names origins;
    the browser guard outermost (a refused request costs nothing else). CORS goes outside the rest, so that
    its headers are on every answer, the 500 included."""
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
    app.add_middleware(ProductPaths)
    app.add_middleware(
        BrowserGuard, hosts=allowed_hosts(settings, served_host), origins=frozenset(settings.cors_origin_list)
    )
