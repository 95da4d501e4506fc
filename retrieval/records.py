"""From a catalogue record to what is stored: point id, embedding text, content hash and payload."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from schemas.catalogue import CatalogueRecord, category_prefixes
from schemas.payload import ProductPayload

# Fixed namespace: the same (retailer, id) maps to the same point id on every machine, forever.
_POINT_NAMESPACE = uuid.UUID("6f1d7a52-3c1e-4b8e-9a57-2f0c9d3e8b41")


def point_id(retailer: str, product_id: str) -> str:
    """Deterministic UUID of a product: re-ingesting updates in place and never duplicates."""
    return str(uuid.uuid5(_POINT_NAMESPACE, f"{retailer}\x1f{product_id}"))


def product_text(record: CatalogueRecord) -> str | None:
    """The text that is embedded: title, brand, description, then attributes (title first: models truncate)."""
    return _embedding_text(record.title, record.brand, record.description, record.attributes)


# The payload keys the embedded text is made of.
TEXT_FIELDS = ("title", "brand", "description", "attributes")


def payload_text(payload: Mapping[str, Any]) -> str | None:
    """The same text rebuilt from a stored payload (a fine-tuned text encoder re-embeds it); a field of the
    wrong type, which a server's payload could hold, counts as missing."""
    title, brand, description = (payload.get(key) for key in TEXT_FIELDS[:3])
    attributes = payload.get("attributes")
    pairs = attributes if isinstance(attributes, dict) else {}
    return _embedding_text(
        title if isinstance(title, str) else None,
        brand if isinstance(brand, str) else None,
        description if isinstance(description, str) else None,
        {key: value for key, value in pairs.items() if isinstance(key, str) and isinstance(value, str)},
    )


def _embedding_text(
    title: str | None, brand: str | None, description: str | None, attributes: Mapping[str, str]
) -> str | None:
    parts = [title, brand, description]
    parts += [f"{key}: {value}" for key, value in attributes.items()]
    text = ". ".join(p for p in parts if p)
    return text or None


# What a product's stored signals are derived with, beyond its fields and photos: raised when the lexical
# terms (or another signal computed from the record) change, so that the next ingest rebuilds every product
# (photo vectors are still reused by hash). 2: cleaned text, sizes, code terms.
SIGNALS_VERSION = 2


def stored_photos(payload: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """A stored product's photos as ingest recorded them: (refs, sha256 digests), row for row; empty when
    it has none or the two lists disagree."""
    refs, digests = payload.get("images") or [], payload.get("image_hashes") or []
    if not isinstance(refs, list) or not isinstance(digests, list) or len(refs) != len(digests):
        return [], []
    return [str(r) for r in refs], [str(d) for d in digests]


def content_hash(record: CatalogueRecord, image_digests: Sequence[str | None], *, reads_text: bool = False) -> str:
    """sha256 over the record's fields, its images' bytes digests and SIGNALS_VERSION (and whether its photos'
    text is read: switching OCR on rebuilds the catalogue): equal hash, nothing to redo."""
    fields = record.model_dump(exclude={"line"})
    summary: dict[str, object] = {"fields": fields, "images": list(image_digests), "signals": SIGNALS_VERSION}
    if reads_text:
        summary["ocr"] = True
    blob = json.dumps(summary, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_payload(
    record: CatalogueRecord,
    *,
    images: list[str],
    image_hashes: list[str],
    digest: str,
    image_files: list[str] | None = None,
    image_text: list[str] | None = None,
) -> ProductPayload:
    return ProductPayload(
        product_id=record.id,
        retailer=record.retailer,
        title=record.title,
        description=record.description,
        brand=record.brand,
        gtin=record.gtin,
        mpn=record.mpn,
        category=record.category,
        category_path=record.category_path,
        category_prefixes=category_prefixes(record.category),
        price=record.price,
        currency=record.currency,
        url=record.url,
        images=images,
        image_hashes=image_hashes,
        image_files=image_files or [],
        image_text=image_text or [],
        attributes=record.attributes,
        content_hash=digest,
        ingested_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source_line=record.line,
    )
