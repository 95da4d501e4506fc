"""Liveness (`/healthz`: the process is up), readiness (`/readyz`: it can answer searches) and `/metrics`."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from retrieval.settings import Settings
from retrieval.store import StoreError
from service import metrics
from service.state import AppState
from service.validation import StrictJsonRoute

router = APIRouter(tags=["health"], route_class=StrictJsonRoute)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    reason: str | None = Field(default=None, description="why the service is not ready")
    store: str | None = Field(default=None, description="the store the service uses")
    image_encoder: str | None = None
    text_encoder: str | None = None
    default_catalogue: str | None = None
    catalogues: list[str] = Field(default_factory=list)


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


def readiness(state: AppState | None) -> Readiness:
    """Ready when the encoders are loaded, the store answers, and the default catalogue exists and was built
    with the loaded encoders; otherwise the first reason it is not."""
    if state is None:
        return Readiness(status="not ready", reason="the encoders and the store are still loading")
    settings, engine = state.settings, state.engine
    ready = Readiness(
        status="ready",
        store=settings.describe_store(state.store.engine, public=True),
        image_encoder=engine.image_encoder.name,
        text_encoder=engine.text_encoder.name,
        default_catalogue=settings.default_catalogue,
    )
    try:
        ready.catalogues = state.store.catalogues()
        if settings.default_catalogue not in ready.catalogues:
            ready.status, ready.reason = (
                "not ready",
                (
                    f"the default catalogue {settings.default_catalogue!r} does not exist: ingest it, or set "
                    "DEFAULT_CATALOGUE to one of the catalogues"
                ),
            )
        else:
            state.store.check_encoders(settings.default_catalogue, engine.fingerprint)
    except StoreError as exc:  # unreachable, or a catalogue built with other encoders
        ready.status, ready.reason = "not ready", _no_paths(str(exc), settings)
    except Exception as exc:  # a probe answers, whatever the client library raised
        reason = f"the store cannot answer: {type(exc).__name__}: {exc}"
        ready.status, ready.reason = "not ready", _no_paths(reason, settings)
    return ready


def _no_paths(message: str, settings: Settings) -> str:
    """A reason for HTTP clients: the server's folders named by what they are, not where they are."""
    for folder, name in ((settings.sources_root, "<sources>"), (settings.store_path, "<store>")):
        message = message.replace(str(folder), name)
    return message


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready, with the reason"}},
)
async def readyz(request: Request) -> JSONResponse:
    state: AppState | None = getattr(request.app.state, "app_state", None)
    ready = await run_in_threadpool(readiness, state)
    return JSONResponse(ready.model_dump(), status_code=200 if ready.status == "ready" else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
)
def prometheus_metrics() -> Response:
    """Request counts and latencies by route template and status, store call times, jobs, encoder batches."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
