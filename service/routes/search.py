"""`POST /search`: a photo and/or text, filters, and a limit, as multipart form data."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from retrieval.images import decode_image
from schemas.search import CATALOGUE_PATTERN, MAX_TEXT_LENGTH, ErrorResponse, SearchFilters, SearchResponse
from service.deps import StateDep
from service.routes.catalogues import photo_url_for

router = APIRouter(tags=["search"])


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


@router.post(
    "/search",
    response_model=SearchResponse,
    responses={
        404: {"model": ErrorResponse, "description": "unknown catalogue"},
        409: {"model": ErrorResponse, "description": "the catalogue was built with other encoders"},
        413: {"model": ErrorResponse, "description": "image too large"},
        422: {"description": "no image and no text, a bad image, or a field out of bounds"},
    },
)
async def search(
    state: StateDep,
    image: Annotated[UploadFile | None, File(description="a product photo (JPEG, PNG, WebP...)")] = None,
    text: Annotated[str | None, Form(max_length=MAX_TEXT_LENGTH, description="words describing the product")] = None,
    catalogue: Annotated[str | None, Form(description="catalogue (collection); default DEFAULT_CATALOGUE")] = None,
    category: Annotated[str | None, Form(max_length=1_000, description="'A > B': this category or below")] = None,
    retailer: Annotated[list[str] | None, Form(description="only these retailers (repeat the field)")] = None,
    exclude_retailer: Annotated[list[str] | None, Form(description="not these retailers")] = None,
    limit: Annotated[int, Form(ge=1, le=100)] = 10,
) -> SearchResponse:
    """Find products by photo, text or both (fused with RRF), within the given filters."""
    name = (catalogue or "").strip() or state.settings.default_catalogue
    if not re.fullmatch(CATALOGUE_PATTERN, name):
        raise HTTPException(422, f"catalogue name {name!r} must be letters, digits, '_', '-', '.'")
    data = await _read_upload(image, state.settings.max_upload_bytes)
    query_text = (text or "").strip() or None
    if data is None and query_text is None:
        raise HTTPException(422, "give an image, a text, or both")
    filters = SearchFilters(
        category=(category or "").strip() or None,
        retailer=[r for r in retailer or [] if r.strip()],
        exclude_retailer=[r for r in exclude_retailer or [] if r.strip()],
    )
    picture: Image.Image | None = None
    if data is not None:
        picture = await run_in_threadpool(decode_image, data, max_pixels=state.settings.max_image_pixels)
    return await run_in_threadpool(
        state.engine.search,
        name,
        image=picture,
        text=query_text,
        filters=filters,
        limit=limit,
        image_url=photo_url_for(name),
    )
