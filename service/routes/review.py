"""The review loop: the pairs that would teach the match model most, what reviewers say of them, and training
on their answers as a background job."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from retrieval.match.labels import SOURCE
from retrieval.match.review import review_queue
from retrieval.match.training import Judgement, train_on_labels
from schemas.jobs import Job, Judged, TrainSummary
from schemas.search import (
    CATALOGUE_PATTERN,
    ErrorResponse,
    LabelIn,
    LabelList,
    ReviewQueue,
    StoredLabel,
    TrainRequest,
)
from service.deps import StateDep
from service.jobs import JobHandle
from service.routes.catalogues import photo_url_for
from service.security import API_KEY, WRITE_ERRORS
from service.validation import StrictJsonRoute

router = APIRouter(tags=["review"], route_class=StrictJsonRoute)
Catalogue = Annotated[str, PathParam(pattern=CATALOGUE_PATTERN)]
Name = Annotated[str, Query(min_length=1, max_length=128)]
NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorResponse}}


@router.get("/catalogues/{catalogue}/review", response_model=ReviewQueue, responses=NOT_FOUND)
async def review(
    state: StateDep,
    catalogue: Catalogue,
    retailer: Name,
    against: Annotated[list[Annotated[str, Query(min_length=1, max_length=128)]], Query(max_length=100)] = [],  # noqa: B006
    limit: Annotated[int, Query(ge=1, le=50)] = 10,
    skip: Annotated[
        list[Annotated[str, Query(min_length=1, max_length=256)]],
        Query(max_length=1_000, description="product ids not to show (skipped this session), on either side"),
    ] = [],  # noqa: B006
) -> ReviewQueue:
    """Unanswered pairs of `retailer`'s products and their candidates in the other shops (only `against` when
    given), the ones whose answer would teach the match model most first: uncertain probabilities, signals that
    disagree, products never reviewed, products that may have no counterpart, and a share of random products'
    best candidates (so that the labels stay a fair sample). Each product looked at costs a match query: a
    queue of `limit` pairs looks at about 3 x `limit` products."""

    def run() -> ReviewQueue:
        state.store.check_encoders(catalogue, state.engine.fingerprint)
        if not state.store.facet_counts(catalogue, "retailer").get(retailer):
            raise HTTPException(404, f"catalogue {catalogue!r} has no products of retailer {retailer!r}")
        book = state.labels
        active, pairs = review_queue(
            state.engine,
            catalogue,
            retailer,
            against=against,
            limit=limit,
            answered=book.asked(catalogue),
            skip=set(skip),
            seed=book.count(catalogue),
            image_url=photo_url_for(catalogue),
        )
        return ReviewQueue(
            catalogue=catalogue, retailer=retailer, model=active.name, labels=book.count(catalogue), pairs=pairs
        )

    return await run_in_threadpool(run)


@router.post(
    "/catalogues/{catalogue}/labels",
    response_model=StoredLabel,
    status_code=201,
    dependencies=[API_KEY],
    responses={
        **NOT_FOUND,
        **WRITE_ERRORS,
        200: {"model": StoredLabel, "description": "given before: kept once"},
        429: {"model": ErrorResponse, "description": "MAX_LABELS reached"},
    },
)
async def add_label(state: StateDep, catalogue: Catalogue, label: LabelIn, response: Response) -> StoredLabel:
    """What a person said of two listings (`right: null`, `same: false`: the left product has no counterpart
    in the other shops). Kept beside the store across restarts and re-ingests; the same answer twice is one
    label (200); answers that contradict each other are both kept and listed by `GET .../labels`."""

    def run() -> tuple[StoredLabel, bool]:
        for ref in filter(None, [label.left, label.right]):
            state.store.product(catalogue, ref.retailer, ref.id, known=True)  # unknown: 404
        if state.labels.count(catalogue) >= state.settings.max_labels:
            raise HTTPException(
                429,
                f"catalogue {catalogue!r} keeps {state.settings.max_labels} labels at most (MAX_LABELS): "
                "delete some, or raise the cap",
            )
        return state.labels.add(catalogue, label)

    stored, created = await run_in_threadpool(run)
    if not created:
        response.status_code = 200
    return stored


@router.get("/catalogues/{catalogue}/labels", response_model=LabelList)
async def list_labels(
    state: StateDep,
    catalogue: Catalogue,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000,
) -> LabelList:
    def run() -> LabelList:
        book = state.labels
        return LabelList(
            catalogue=catalogue,
            labels=book.labels(catalogue, offset=offset, limit=limit),
            total=book.count(catalogue),
            contradictions=book.contradictions(catalogue),
        )

    return await run_in_threadpool(run)


@router.get("/catalogues/{catalogue}/labels.jsonl", response_class=PlainTextResponse)
async def export_labels(state: StateDep, catalogue: Catalogue) -> PlainTextResponse:
    """The labels in the pairs format that `python -m ingest calibrate --pairs` and `train --pairs` read (one
    line per left product; contradicted labels left out)."""
    pairs = await run_in_threadpool(state.labels.pairs, catalogue)
    lines = (json.dumps(p.model_dump(mode="json", exclude_defaults=True), ensure_ascii=False) for p in pairs)
    return PlainTextResponse(
        "".join(line + "\n" for line in lines),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{catalogue}-labels.jsonl"'},
    )


@router.delete(
    "/catalogues/{catalogue}/labels/{label_id}",
    status_code=204,
    dependencies=[API_KEY],
    responses={**NOT_FOUND, **WRITE_ERRORS},
)
async def delete_label(
    state: StateDep, catalogue: Catalogue, label_id: Annotated[int, PathParam(ge=1, le=2**62)]
) -> Response:
    if not await run_in_threadpool(state.labels.delete, catalogue, label_id):
        raise HTTPException(404, f"catalogue {catalogue!r} has no label {label_id}")
    return Response(status_code=204)


def _judged(j: Judgement) -> Judged:
    decided = j.reliable and j.decided > 0
    return Judged(
        label=j.label,
        products=j.products,
        precision=round(j.precision, 4) if decided else None,
        recall=round(j.recall, 4) if j.reliable else None,
        r1=round(j.r1, 4),
    )


@router.post(
    "/catalogues/{catalogue}/train",
    response_model=Job,
    status_code=202,
    dependencies=[API_KEY],
    responses={**NOT_FOUND, **WRITE_ERRORS, 422: {"model": ErrorResponse}},
)
async def train(state: StateDep, catalogue: Catalogue, request: Annotated[TrainRequest | None, Body()] = None) -> Job:
    """Train the catalogue's match model on the stored labels in the background (poll `GET /jobs/{id}`; its
    `training` holds the figures before and after): below 400 labelled products the match model alone, judged
    by folds over every labelled product; from there (or `rerank: true`) with a cross-encoder, judged on a
    held-out share. The result replaces what is active only when its decisions do better on labelled products
    no model learnt from. The text encoder is not fine-tuned here (that re-embeds every product's text:
    `python -m ingest train --catalogue C --labels` does it, with the rest)."""
    options = request or TrainRequest()

    def plan() -> int:
        state.store.check_encoders(catalogue, state.engine.fingerprint)
        return len(state.labels.pairs(catalogue))

    if not await run_in_threadpool(plan):
        raise HTTPException(422, f"catalogue {catalogue!r} has no labels yet: answer the review queue first")

    def work(handle: JobHandle) -> Iterator[list[dict[str, str]]]:
        started = time.perf_counter()
        pairs = state.labels.pairs(catalogue)
        handle.set_total(1)
        result = train_on_labels(
            state.engine,
            catalogue,
            pairs,
            models_root=state.engine.models_root or state.settings.models_root,
            rerank=options.rerank,
            target_precision=options.target_precision,
            seed=options.seed,
            source=SOURCE,
        )
        handle.set_training(
            TrainSummary(
                labels=len(pairs),
                before=_judged(result.before),
                tried=[_judged(j) for j in result.tried],
                chosen=result.chosen_label or None,
                notes=result.notes,
                seconds=round(time.perf_counter() - started, 1),
            )
        )
        yield []

    return state.jobs.submit("train", catalogue, work)
