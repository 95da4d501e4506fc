"""`POST /search` (multipart form, for pages and curl) and `POST /search/json` (for programs)."""

from __future__ import annotations

import base64
import binascii
import difflib
import re
import time
from collections.abc import Iterable
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from retrieval.images import decode_image
from retrieval.match.model import active_model, decide_search
from schemas.search import (
    CATALOGUE_PATTERN,
    MAX_TEXT_LENGTH,
    ErrorResponse,
    Fusion,
    SearchFilters,
    SearchOptions,
    SearchRequest,
    SearchResponse,
)
from schemas.text import printable
from service.batching import BatchedEncoders
from service.deps import StateDep
from service.routes.catalogues import photo_url_for
from service.state import AppState
from service.validation import StrictJsonRoute

router = APIRouter(tags=["search"], route_class=StrictJsonRoute)

ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "unknown catalogue or stored product"},
    409: {"model": ErrorResponse, "description": "the catalogue was built with other encoders"},
    413: {"model": ErrorResponse, "description": "image too large"},
    422: {"description": "no query, a bad image, or a field out of bounds"},
    503: {"model": ErrorResponse, "description": "the encoders are busy (see Retry-After) or the store cannot answer"},
}


async def _read_upload(upload: UploadFile | None, max_bytes: int) -> bytes | None:
    """The uploaded bytes, None when the form had no file, 413 past the size cap."""
    if upload is None:
        return None
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"the image is larger than {max_bytes} bytes")
    if not data and not upload.filename:
        return None  # an empty file field, as browsers send when nothing was picked
    return data


def _catalogue(state: AppState, name: str | None) -> str:
    chosen = (name or "").strip() or state.settings.default_catalogue
    if len(chosen) > 63:  # named with its length, never echoed (it may be a megabyte)
        raise HTTPException(422, f"catalogue: a name has at most 63 characters ({len(chosen)} given)")
    if not re.fullmatch(CATALOGUE_PATTERN, chosen):
        raise HTTPException(
            422, f"catalogue name {printable(chosen, limit=63)!r} must be letters, digits, '_', '-', '.'"
        )
    return chosen


async def _run(
    request: Request,
    state: AppState,
    catalogue: str,
    data: bytes | None,
    text: str | None,
    filters: SearchFilters,
    options: SearchOptions,
) -> SearchResponse:
    started = time.perf_counter()
    picture: Image.Image | None = None
    if data is not None:
        picture = await run_in_threadpool(decode_image, data, max_pixels=state.settings.max_image_pixels)
    # MICRO_BATCHING=false: None, each request runs the models in its own thread.
    embedder: BatchedEncoders | None = request.app.state.encoders

    def searched() -> SearchResponse:
        found = state.engine.search(
            catalogue,
            image=picture,
            text=text,
            filters=filters,
            options=options,
            image_url=photo_url_for(catalogue),
            embedder=embedder,
        )
        if text and found.results:  # only words are decided: a photo-only search reads no model
            active = active_model(state.store, catalogue, models_root=state.engine.models_root)
            found = decide_search(found, text, active)
        if not found.results and filters.category:  # an empty answer says why when it can
            categories = state.store.facet_counts(catalogue, "category_prefixes")
            found.warnings += unknown_category(categories, filters.category)
        return found

    response = await run_in_threadpool(searched)
    response.took_ms = round((time.perf_counter() - started) * 1000, 2)  # the photo's decoding included
    return response


def unknown_category(known: Iterable[str], category: str) -> list[str]:
    """Why a category filter found nothing, when the catalogue has no such category: the nearest it has."""
    known = list(known)
    if category in known:
        return []
    by_folded = {name.casefold(): name for name in known}
    near = [by_folded[n] for n in difflib.get_close_matches(category.casefold(), list(by_folded), n=3, cutoff=0.5)]
    hint = f"; the nearest: {', '.join(repr(n) for n in near)}" if near else f"; it has {len(known)} categories"
    return [f"category {category!r} is not in this catalogue (categories match exactly, case included){hint}"]


def _words(values: list[str] | None) -> list[str]:
    return [v.strip() for v in values or [] if v.strip()]


class SearchForm(BaseModel):
    """The fields of `POST /search` beside the photo: the words, the catalogue, the filters and the options,
    each bounded here (422 naming the field); `filters` and `options` add the checks across fields."""

    text: str | None = Field(default=None, max_length=MAX_TEXT_LENGTH, description="words describing the product")
    catalogue: str | None = Field(default=None, description="catalogue (collection); default DEFAULT_CATALOGUE")
    category: str | None = Field(default=None, max_length=1_000, description="'A > B': this category or below")
    retailer: list[str] = Field(default_factory=list, description="only these retailers (repeat the field)")
    exclude_retailer: list[str] = Field(default_factory=list, description="not these retailers")
    brand: list[str] = Field(default_factory=list, description="only these brands")
    price_min: float | None = Field(default=None, ge=0)
    price_max: float | None = Field(default=None, ge=0)
    fusion: Fusion = Field(default="dbsf", description="dbsf, rrf, or weighted (with the weights)")
    image_weight: float = Field(default=1.0, ge=0, le=100)
    text_weight: float = Field(default=1.0, ge=0, le=100)
    lexical: bool = Field(default=True, description="add the lexical ranking (words, codes, GTIN) for a text")
    lexical_weight: float = Field(default=1.0, ge=0, le=100)
    limit: int = Field(default=10, ge=1, le=100)
    offset: int = Field(default=0, ge=0, le=1_000)
    ranks: bool = Field(default=True, description="each result's rank in every ranking before fusion")
    score_threshold: float | None = Field(default=None, description="drop results scoring below this")

    def filters(self) -> SearchFilters:
        return SearchFilters(
            category=(self.category or "").strip() or None,
            retailer=_words(self.retailer),
            exclude_retailer=_words(self.exclude_retailer),
            brand=_words(self.brand),
            price_min=self.price_min,
            price_max=self.price_max,
        )

    def options(self) -> SearchOptions:
        return SearchOptions(
            fusion=self.fusion,
            image_weight=self.image_weight,
            text_weight=self.text_weight,
            lexical=self.lexical,
            lexical_weight=self.lexical_weight,
            limit=self.limit,
            offset=self.offset,
            ranks=self.ranks,
            score_threshold=self.score_threshold,
        )


@router.post("/search", response_model=SearchResponse, responses=ERRORS)
async def search(
    request: Request,
    state: StateDep,
    form: Annotated[SearchForm, Form()],
    image: Annotated[UploadFile | None, File(description="a product photo (JPEG, PNG, WebP...)")] = None,
) -> SearchResponse:
    """Find products by photo, text or both (fused in Qdrant), within the given filters."""
    name = _catalogue(state, form.catalogue)
    data = await _read_upload(image, state.settings.max_upload_bytes)
    query_text = (form.text or "").strip() or None
    if data is None and query_text is None:
        raise HTTPException(422, "give an image, a text, or both")
    try:  # the fields are checked one by one above; these models add the cross-field checks
        filters, options = form.filters(), form.options()
    except ValidationError as exc:
        raise HTTPException(422, "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    return await _run(request, state, name, data, query_text, filters, options)


@router.post("/search/json", response_model=SearchResponse, responses=ERRORS)
async def search_json(http: Request, state: StateDep, request: SearchRequest) -> SearchResponse:
    """The same search with a JSON body: a base64 photo, a text, or a stored product as the query."""
    name = _catalogue(state, request.catalogue)
    if request.product is not None:
        product = request.product
        _, response = await run_in_threadpool(
            lambda: state.engine.search_product(
                name,
                product.retailer,
                product.id,
                filters=request.filters,
                options=request.options,
                image_url=photo_url_for(name),
            )
        )
        return response
    data = None
    if request.image_base64:
        try:
            data = base64.b64decode(request.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, "image_base64 is not valid base64") from None
        if len(data) > state.settings.max_upload_bytes:
            raise HTTPException(413, f"the image is larger than {state.settings.max_upload_bytes} bytes")
    text = (request.text or "").strip() or None
    return await _run(http, state, name, data, text, request.filters, request.options)
