"""The FastAPI application factory: lifespan, error mapping, routers and the static web page."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from retrieval.images import ImageDecodeError
from retrieval.settings import Settings
from retrieval.store import CatalogueNameRefused, CatalogueNotFound, EncoderMismatch, ProductNotFound, StoreError
from service import metrics, middleware
from service.batching import Overloaded, batched_encoders
from service.jobs import JobsClosed, JobsFull
from service.routes import catalogues, health, ingest, jobs, review, search
from service.state import AppState, build_state
from service.validation import validation_failed

STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 30  # a refused job: about what a small ingest takes
log = logging.getLogger("service")


def create_app(
    settings: Settings | None = None, *, state: AppState | None = None, served_host: str | None = None
) -> FastAPI:
    """Build the app; models and the store load in the lifespan (or come ready-made in `state`).
    `served_host`: the interface `python -m service --host` listens on, a name the Host header may give."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app_state = state or build_state(config)
        app.state.app_state = app_state
        app_state.store.observer = metrics.observe_store_call
        # Per run of the app (its event loop): the batchers' queues and tasks live on that loop.
        app.state.encoders = batched_encoders(app_state) if app_state.settings.micro_batching else None
        try:
            yield
        finally:
            if app.state.encoders is not None:
                await app.state.encoders.close()
            if state is None:
                app_state.close()

    # What the middleware (body caps, CORS) is built from; a ready-made state's settings are the ones it serves.
    config = state.settings if state is not None else (settings or Settings())
    app = FastAPI(
        title="product-match",
        summary="Find the same product in other shops by photo and/or text, over Qdrant named vectors.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served below from the package's files: FastAPI's own page loads Swagger UI from a CDN
        redoc_url=None,
    )
    middleware.install(app, config, served_host=served_host)
    app.include_router(health.router)
    app.include_router(search.router)
    app.include_router(catalogues.router)
    app.include_router(jobs.router)
    app.include_router(review.router)
    app.include_router(ingest.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs-assets", StaticFiles(directory=Path(str(swagger_ui_path))), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI over the OpenAPI document, every file of it from this service (it works offline)."""
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"detail": message})

    app.add_exception_handler(RequestValidationError, validation_failed)  # type: ignore[arg-type]

    @app.exception_handler(CatalogueNotFound)
    def _not_found(request: Request, exc: CatalogueNotFound) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(ProductNotFound)
    def _no_product(request: Request, exc: ProductNotFound) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(CatalogueNameRefused)
    def _bad_name(request: Request, exc: CatalogueNameRefused) -> JSONResponse:
        return error(422, str(exc))

    @app.exception_handler(EncoderMismatch)
    def _mismatch(request: Request, exc: EncoderMismatch) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(ImageDecodeError)
    def _bad_image(request: Request, exc: ImageDecodeError) -> JSONResponse:
        return error(422, f"the uploaded image cannot be used: {exc}")

    @app.exception_handler(Overloaded)
    def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        response = error(503, f"busy: {exc}; retry in {exc.retry_after_s} s")
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(JobsFull)
    def _full(request: Request, exc: JobsFull) -> JSONResponse:
        response = error(429, f"{exc}; retry in {RETRY_AFTER_S} s")
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(JobsClosed)
    def _stopping(request: Request, exc: JobsClosed) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(StoreError)
    def _store(request: Request, exc: StoreError) -> JSONResponse:
        log.warning("store error on %s: %s", request.url.path, exc)
        return error(503, f"the store cannot answer: {exc}")

    return app
