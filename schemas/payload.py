"""What a Qdrant point stores for one product, and the public view of it that the API returns."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ProductPayload(BaseModel):
    """The stored payload: every filter field is top level so that a payload index can cover it."""

    product_id: str
    retailer: str
    title: str | None = None
    description: str | None = None
    brand: str | None = None
    gtin: str | None = Field(default=None, description="GTIN-14 (zero-padded)")
    mpn: str | None = None
    category: list[str] = Field(default_factory=list, description="levels, root first")
    category_path: str | None = Field(default=None, description="'A > B > C': exact category filter")
    category_prefixes: list[str] = Field(default_factory=list, description="every ancestor path: prefix filter")
    price: float | None = None
    currency: str | None = None
    url: str | None = None
    images: list[str] = Field(
        default_factory=list, description="the photos embedded into the image vector: absolute paths or URLs"
    )
    image_hashes: list[str] = Field(
        default_factory=list, description="sha256 of each embedded photo's bytes (reuse of its vector)"
    )
    image_files: list[str] = Field(
        default_factory=list,
        description="'size:mtime_ns' of each embedded photo read from a local file ('' for a URL): a re-ingest "
        "takes the stored hash of a file whose size and modification time are unchanged without reading it",
    )
    image_text: list[str] = Field(
        default_factory=list, description="the text read off each embedded photo (OCR; empty when not read)"
    )
    attributes: dict[str, str] = Field(default_factory=dict)
    content_hash: str = Field(description="sha256 of the record's fields and image bytes (incremental ingest)")
    ingested_at: str = Field(description="ISO 8601 UTC time of the last write")
    source_line: int | None = None


class Product(BaseModel):
    """A product as the API shows it: the payload without ingest bookkeeping, plus links to its photos."""

    id: str = Field(description="the retailer's product id")
    retailer: str
    title: str | None = None
    description: str | None = None
    brand: str | None = None
    gtin: str | None = None
    mpn: str | None = None
    category: list[str] = Field(default_factory=list)
    category_path: str | None = None
    price: float | None = None
    currency: str | None = None
    url: str | None = None
    image_urls: list[str] = Field(default_factory=list, description="where the API serves each photo")
    image_text: list[str] = Field(
        default_factory=list, description="the text read off each photo, where the catalogue reads text (OCR)"
    )
    attributes: dict[str, str] = Field(default_factory=dict)
    ingested_at: str | None = None
