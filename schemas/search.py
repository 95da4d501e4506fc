"""Search request fields, filters and the response returned by `POST /search`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.payload import Product

CATALOGUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MAX_TEXT_LENGTH = 2_000


class SearchFilters(BaseModel):
    """Payload filters; all given conditions must hold."""

    model_config = ConfigDict(extra="forbid")

    category: str | None = Field(
        default=None, max_length=1_000, description="'A > B': products in this category or any below it"
    )
    retailer: list[str] = Field(default_factory=list, max_length=100, description="only these retailers")
    exclude_retailer: list[str] = Field(default_factory=list, max_length=100, description="not these retailers")


class ModalityScores(BaseModel):
    """Cosine similarity of the query to the product, per modality (None where that side is missing)."""

    image: float | None = Field(default=None, description="best cosine over the product's photos")
    text: float | None = None


class SearchResult(BaseModel):
    id: str = Field(description="the retailer's product id")
    retailer: str
    score: float = Field(description="cosine for a one-modality query; the RRF score when fused")
    scores: ModalityScores
    product: Product


class SearchResponse(BaseModel):
    catalogue: str
    modes: list[str] = Field(description="which query vectors were used: image, text")
    fusion: str | None = Field(default=None, description="'rrf' when image and text were fused")
    took_ms: float
    results: list[SearchResult]


class CatalogueInfo(BaseModel):
    name: str
    products: int
    image_encoder: str
    text_encoder: str
    categories: dict[str, int] = Field(default_factory=dict, description="category path -> product count")
    retailers: dict[str, int] = Field(default_factory=dict)


class CatalogueList(BaseModel):
    catalogues: list[CatalogueInfo]
    default: str


class ErrorResponse(BaseModel):
    detail: str
