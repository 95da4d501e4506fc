"""Catalogues: list them with counts, encoders and facets; serve a product's stored photos."""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, unquote

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from retrieval.images import IMAGE_SUFFIXES, MAX_IMAGE_BYTES, LocalFileError, is_url, read_regular_file
from retrieval.match.model import ActiveModel, active_model, find_matches
from retrieval.search import ImageUrl, to_product
from schemas.payload import Product
from schemas.search import (
    CATALOGUE_PATTERN,
    CatalogueInfo,
    CatalogueList,
    ErrorResponse,
    Fusion,
    MatchResponse,
    MatchResult,
    SearchFilters,
)
from service.deps import StateDep
from service.state import AppState
from service.validation import StrictJsonRoute

router = APIRouter(tags=["catalogues"], route_class=StrictJsonRoute)
Catalogue = Annotated[str, PathParam(pattern=CATALOGUE_PATTERN)]
# Both arrive percent-encoded (service.middleware.product_path: an id may hold `/`), each character at most
# 12 bytes so written (4 UTF-8 bytes, each `%XX`); `_decoded` turns them back and checks the decoded length.
Retailer = Annotated[str, PathParam(min_length=1, max_length=128 * 12)]
ProductId = Annotated[str, PathParam(min_length=1, max_length=256 * 12)]


def _decoded(retailer: str, product_id: str) -> tuple[str, str]:
    retailer, product_id = unquote(retailer), unquote(product_id)
    if len(retailer) > 128 or len(product_id) > 256:
        raise HTTPException(
            422,
            f"a retailer has at most 128 characters ({len(retailer)} given), a product id at most 256 "
            f"({len(product_id)} given)",
        )
    return retailer, product_id


def photo_url_for(catalogue: str) -> ImageUrl:
    """URLs the API serves a catalogue's photos from; remote photos are linked where they are."""

    def url(retailer: str, product_id: str, index: int, ref: str) -> str:
        if is_url(ref):
            return ref
        return (
            f"/catalogues/{catalogue}/products/{quote(retailer, safe='')}/{quote(product_id, safe='')}/images/{index}"
        )

    return url


def _describe(state: AppState, name: str) -> CatalogueInfo:
    store = state.store
    info = store.info(name)
    return CatalogueInfo(
        name=name,
        products=store.count(name),
        image_encoder=info.fingerprint.image,
        text_encoder=info.fingerprint.text,
        adapters=info.adapters,
        categories=store.facet_counts(name, "category_prefixes"),
        retailers=store.facet_counts(name, "retailer"),
    )


@router.get("/catalogues", response_model=CatalogueList)
async def list_catalogues(state: StateDep) -> CatalogueList:
    def describe_all() -> list[CatalogueInfo]:
        return [_describe(state, name) for name in state.store.catalogues()]

    return CatalogueList(catalogues=await run_in_threadpool(describe_all), default=state.settings.default_catalogue)


NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorResponse}}


@router.get("/catalogues/{catalogue}/products/{retailer}/{product_id}", response_model=Product, responses=NOT_FOUND)
async def get_product(state: StateDep, catalogue: Catalogue, retailer: Retailer, product_id: ProductId) -> Product:
    """One stored product, as search results show it."""
    retailer, product_id = _decoded(retailer, product_id)
    record = await run_in_threadpool(state.store.product, catalogue, retailer, product_id)
    return to_product(record.payload or {}, photo_url_for(catalogue))


@router.get(
    "/catalogues/{catalogue}/products/{retailer}/{product_id}/matches",
    response_model=MatchResponse,
    responses={**NOT_FOUND, 409: {"model": ErrorResponse}},
)
async def product_matches(
    state: StateDep,
    catalogue: Catalogue,
    retailer: Retailer,
    product_id: ProductId,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    fusion: Annotated[Fusion | None, Query(description="default: the calibration's fusion, else dbsf")] = None,
    category: Annotated[str | None, Query(max_length=1_000)] = None,
) -> MatchResponse:
    """The best candidates for the same product in the *other* retailers, found by the product's own photo,
    text and terms, re-ranked by a match model and each decided with a confidence: the catalogue's own
    (`python -m ingest calibrate` or `train`; `model: "catalogue"`, `calibrated: true`), else the default model
    shipped with the package (`model: "default"`: fitted on public product pairs, not on your data; it applies
    with the default text encoder), else none: search order, every decision 'uncalibrated'. A model that
    reached no threshold at its target precision is `reliable: false`: it re-ranks and decides 'uncertain' /
    'no_match' only, and `warning` says why."""
    retailer, product_id = _decoded(retailer, product_id)

    try:
        filters = SearchFilters(category=category or None)
    except ValidationError as exc:
        raise HTTPException(422, "category: " + exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    def run() -> tuple[Product, list[MatchResult], ActiveModel]:
        active = active_model(state.store, catalogue, models_root=state.engine.models_root)
        product, matches = find_matches(
            state.engine,
            catalogue,
            retailer,
            product_id,
            calibration=active.calibration,
            limit=limit,
            filters=filters,
            fusion=fusion,
            image_url=photo_url_for(catalogue),
        )
        return product, matches, active

    product, matches, active = await run_in_threadpool(run)
    warning = active.warning
    if not matches:
        retailers = await run_in_threadpool(state.store.facet_counts, catalogue, "retailer")
        if set(retailers) <= {retailer}:
            warning = (
                f"catalogue {catalogue} holds one retailer ({retailer}): there is no other shop to find the same "
                "product in; ingest another retailer's catalogue into it"
            )
    return MatchResponse(
        catalogue=catalogue,
        product=product,
        calibrated=active.name == "catalogue",
        reliable=active.reliable,
        warning=warning,
        model=active.name,
        matches=matches,
    )


@router.get(
    "/catalogues/{catalogue}/products/{retailer}/{product_id}/images/{index}",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "the photo's bytes"},
        404: {"model": ErrorResponse},
        307: {"description": "the photo is a remote URL"},
    },
)
async def product_image(
    state: StateDep,
    catalogue: Catalogue,
    retailer: Retailer,
    product_id: ProductId,
    index: Annotated[int, PathParam(ge=0, le=64)],
) -> Response:
    """A stored photo of a product. Only photos recorded at ingest are served (no request names a file), and
    only while the file still holds the bytes whose hash was recorded then: whatever a path points to later, the
    endpoint never hands out anything but the exact photo that was checked and embedded."""
    retailer, product_id = _decoded(retailer, product_id)
    record = await run_in_threadpool(state.store.product, catalogue, retailer, product_id)
    payload = record.payload or {}
    images, hashes = payload.get("images", []), payload.get("image_hashes", [])
    if index >= len(images):
        raise HTTPException(404, f"no photo {index} for product {product_id!r} of {retailer!r}")
    ref = str(images[index])
    if is_url(ref):
        return RedirectResponse(ref)
    gone = HTTPException(404, "the photo file is no longer as it was ingested")
    suffix = Path(ref).suffix.lower()
    if suffix not in IMAGE_SUFFIXES or index >= len(hashes):
        raise gone
    try:
        data = await run_in_threadpool(read_regular_file, ref, max_bytes=MAX_IMAGE_BYTES)
    except LocalFileError:
        raise gone from None
    if hashlib.sha256(data).hexdigest() != hashes[index]:
        raise gone
    return Response(data, media_type=mimetypes.guess_type(f"x{suffix}")[0] or "application/octet-stream")
