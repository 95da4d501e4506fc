"""Batch matching as a background job, for batches small enough for one request's worth of patience;
whole catalogues go through `python -m ingest match`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from retrieval.match.batch import Row, as_csv, match_retailer
from retrieval.match.model import active_model
from schemas.jobs import Job, MatchJobRequest
from schemas.search import CATALOGUE_PATTERN, ErrorResponse
from service.deps import StateDep
from service.jobs import JobHandle
from service.security import API_KEY, WRITE_ERRORS
from service.state import AppState
from service.validation import StrictJsonRoute

router = APIRouter(tags=["jobs"], route_class=StrictJsonRoute)
JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")]
NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorResponse}}
MAX_ROWS = 2_000_000  # a job's rows at most: MAX_JOB_PRODUCTS (up to 100,000) x 20 candidates


def _job(state: AppState, job_id: str) -> Job:
    job = state.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id} (the last 100 jobs are kept, in JOBS_PATH)")
    return job


@router.post(
    "/catalogues/{catalogue}/match-jobs",
    response_model=Job,
    status_code=202,
    dependencies=[API_KEY],
    responses={**NOT_FOUND, **WRITE_ERRORS, 422: {"model": ErrorResponse}},
)
async def submit_match_job(
    state: StateDep, catalogue: Annotated[str, PathParam(pattern=CATALOGUE_PATTERN)], request: MatchJobRequest
) -> Job:
    """Match a retailer's products against the other retailers in the background; poll `GET /jobs/{id}`,
    read the rows at `GET /jobs/{id}/rows` (JSON) or `/rows.csv` (the columns of `ingest match`). The job's
    `warning` says when the catalogue's match model is missing its target precision (no 'match' decisions)
    or cannot be applied."""
    limit = state.settings.max_job_products

    def plan() -> tuple[list[str], str | None]:
        state.store.check_encoders(catalogue, state.engine.fingerprint)
        warning = active_model(state.store, catalogue, models_root=state.engine.models_root).warning
        if request.product_ids is not None:
            ids = list(dict.fromkeys(request.product_ids))
            for product_id in ids:
                state.store.product(catalogue, request.retailer, product_id, known=True)
            return ids, warning
        return list(state.store.product_ids(catalogue, request.retailer)), warning

    ids, warning = await run_in_threadpool(plan)
    if not ids:
        raise HTTPException(422, f"catalogue {catalogue!r} has no products of retailer {request.retailer!r}")
    if len(ids) > limit:
        raise HTTPException(
            422,
            f"{len(ids)} products is more than a job takes ({limit}, MAX_JOB_PRODUCTS): "
            "list product_ids, or match the whole retailer with `python -m ingest match`",
        )

    def work(handle: JobHandle) -> Iterator[list[Row]]:
        handle.set_total(len(ids))
        return match_retailer(
            state.engine,
            catalogue,
            request.retailer,
            against=request.against,
            limit=request.limit,
            fusion=request.fusion,
            product_ids=ids,
        )

    return state.jobs.submit("match", catalogue, work, warning=warning)


@router.get("/jobs/{job_id}", response_model=Job, responses=NOT_FOUND)
async def get_job(state: StateDep, job_id: JobId) -> Job:
    return _job(state, job_id)


@router.get("/jobs/{job_id}/rows", responses=NOT_FOUND)
async def job_rows(
    state: StateDep,
    job_id: JobId,
    offset: Annotated[int, Query(ge=0, le=MAX_ROWS)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000,
) -> list[dict[str, str]]:
    """The rows written so far (all of them once the job is done), paged."""
    _job(state, job_id)
    return await run_in_threadpool(state.jobs.rows, job_id, offset, limit)


@router.get("/jobs/{job_id}/rows.csv", response_class=PlainTextResponse, responses=NOT_FOUND)
async def job_rows_csv(state: StateDep, job_id: JobId) -> PlainTextResponse:
    _job(state, job_id)
    rows = await run_in_threadpool(state.jobs.rows, job_id)
    return PlainTextResponse(as_csv(rows, header=True), media_type="text/csv")
