"""`POST /catalogues/{c}/ingest`: add a catalogue file or zip through the service that owns the store.

The embedded store belongs to one process, so while the service runs, data goes in through it: the upload
is streamed to a folder under the sources folder (never held in memory, refused past
MAX_INGEST_UPLOAD_BYTES), then ingested by the same `Ingestor` as `python -m ingest`, as a background job
(`GET /jobs/{id}`: rows read so far, then the report). The store's lock keeps the job's writes and the
searches answered meanwhile apart.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ingest.pipeline import IngestCancelled, Ingestor
from ingest.readers import CatalogueError
from retrieval.store import StoreError
from schemas.jobs import IngestSummary, Job
from schemas.report import IngestReport
from schemas.search import CATALOGUE_PATTERN, ErrorResponse
from service.deps import StateDep
from service.jobs import JobHandle, JobsFull
from service.middleware import ingest_body_cap
from service.security import API_KEY, WRITE_ERRORS
from service.state import AppState
from service.uploads import UPLOADS, UploadRefused, receive_upload, stored_bytes
from service.validation import StrictJsonRoute

router = APIRouter(tags=["catalogues"], route_class=StrictJsonRoute)
SUFFIXES = frozenset({".csv", ".jsonl", ".ndjson", ".zip"})


class IngestOptions(BaseModel):
    """The text fields beside the uploaded file (what `python -m ingest` takes as options)."""

    model_config = ConfigDict(extra="forbid")

    retailer: str | None = Field(
        default=None, max_length=128, description="retailer of a zip of photos; fills in rows that name none"
    )
    product_folders: bool = Field(default=False, description="a folder of photos with no sub-folder is one product")
    prune: bool = Field(default=False, description="delete the feed's retailers' products the feed no longer lists")


FIELDS = frozenset(IngestOptions.model_fields)
REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "a catalogue (.csv, .jsonl, .ndjson) whose photos are URLs, or a .zip of a "
                        "catalogue with its photos or of photos in category folders",
                    },
                    "retailer": {"type": "string", "maxLength": 128, "description": "retailer of a zip of photos"},
                    "product_folders": {"type": "boolean", "default": False},
                    "prune": {"type": "boolean", "default": False},
                },
            }
        }
    },
}


class IngestFailed(RuntimeError):
    """An ingest job that could not run, or ingested nothing; the message says why."""


def _uploads_full(waiting: int) -> JobsFull:
    return JobsFull(f"uploads waiting for their jobs hold {waiting:,} bytes (MAX_STORED_UPLOADS_BYTES)")


def _check_target(state: AppState, catalogue: str) -> None:
    """A catalogue built with other encoders (409), or a new one whose name cannot be used (422), is refused
    before the upload is read."""
    if catalogue in state.store.catalogues():
        state.store.check_encoders(catalogue, state.engine.fingerprint)
    else:
        state.store.check_new_name(catalogue)


@router.post(
    "/catalogues/{catalogue}/ingest",
    response_model=Job,
    status_code=202,
    dependencies=[API_KEY],
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={
        **WRITE_ERRORS,
        409: {"model": ErrorResponse, "description": "the catalogue was built with other encoders"},
        413: {"model": ErrorResponse, "description": "the upload is larger than MAX_INGEST_UPLOAD_BYTES"},
        415: {"model": ErrorResponse, "description": "not a multipart/form-data body"},
        422: {"model": ErrorResponse, "description": "no file, another kind of file, an unknown or bad field"},
        429: {"model": ErrorResponse, "description": "MAX_QUEUED_JOBS or MAX_STORED_UPLOADS_BYTES reached"},
        507: {"model": ErrorResponse, "description": "the upload cannot be stored (disk full)"},
    },
)
async def ingest_catalogue(
    request: Request, state: StateDep, catalogue: Annotated[str, PathParam(pattern=CATALOGUE_PATTERN)]
) -> Job:
    """Ingest an uploaded catalogue into `catalogue` (created when new) in the background, as
    `python -m ingest` would: multipart/form-data with `file` (a .csv / .jsonl / .ndjson whose photos are
    URLs, or a .zip of a catalogue with its photos, or of photos in category folders) and optionally
    `retailer`, `product_folders`, `prune`. Poll `GET /jobs/{id}`: `done` counts rows read, `ingest` holds the
    report (new, updated, unchanged, rejected rows and skipped photos with line numbers and reasons).
    A job that ingests nothing fails, its report still there."""
    settings = state.settings
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > ingest_body_cap(settings):
        raise HTTPException(413, f"the upload is larger than {settings.max_ingest_upload_bytes} bytes")
    await run_in_threadpool(_check_target, state, catalogue)
    uploads = settings.sources_root / UPLOADS
    state.jobs.check_room()  # before the upload is stored
    waiting = await run_in_threadpool(stored_bytes, uploads)
    if waiting + (int(declared) if declared.isdigit() else 0) > settings.max_stored_uploads_bytes:
        raise _uploads_full(waiting)
    try:
        upload = await receive_upload(
            request,
            parent=uploads,
            file_field="file",
            suffixes=SUFFIXES,
            max_bytes=settings.max_ingest_upload_bytes,
            fields=FIELDS,
        )
    except UploadRefused as exc:
        raise HTTPException(exc.status, exc.message) from None
    if waiting + upload.size > settings.max_stored_uploads_bytes:  # sent without a length: checked once here
        upload.discard()
        raise _uploads_full(waiting)
    try:
        options = IngestOptions.model_validate({k: v.strip() for k, v in upload.fields.items() if v.strip()})
        assert upload.path is not None  # receive_upload returns a file or raises
        path = upload.path
        if path.suffix == ".zip" and not await run_in_threadpool(zipfile.is_zipfile, path):
            raise HTTPException(422, f"{upload.filename!r} is not a zip file")
    except ValidationError as exc:
        upload.discard()
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise HTTPException(422, details) from None
    except BaseException:
        upload.discard()
        raise

    def shown(message: str) -> str:
        """A message about the upload, with the server's paths replaced by the client's file name."""
        return message.replace(str(path), upload.filename).replace(str(settings.sources_root), "<sources>")

    def work(handle: JobHandle) -> Iterator[list[dict[str, str]]]:
        def progress(report: IngestReport) -> None:
            handle.set_done(report.read)
            handle.set_ingest(IngestSummary.of(report, upload.filename))

        ingestor = Ingestor(settings, state.store, state.engine.image_encoder, state.engine.text_encoder)
        try:
            report = ingestor.run(
                path,
                catalogue,
                progress=False,
                retailer=options.retailer,
                product_folders=options.product_folders,
                prune=options.prune,
                uploaded=True,
                cancel=handle.stop,
                on_chunk=progress,
            )
        except (CatalogueError, StoreError, IngestCancelled) as exc:
            raise IngestFailed(shown(str(exc))) from None
        progress(report)
        if report.written == 0 and report.unchanged == 0:
            raise IngestFailed(f"no row of {upload.filename!r} could be ingested: see ingest.rejections")
        yield from ()

    return state.jobs.submit("ingest", catalogue, work, cleanup=upload.discard)
