"""The catalogue contract: one product per CSV / JSON Lines row, validated into a `CatalogueRecord`."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CATEGORY_SEPARATOR = ">"
IMAGE_SEPARATOR = "|"
MAX_IMAGES = 32
MAX_ATTRIBUTE_LENGTH = 2_000
MAX_CATEGORY_LEVEL_LENGTH = 256
MAX_IMAGE_REF_LENGTH = 4_096

# Columns with a meaning of their own; every other column becomes an attribute.
KNOWN_COLUMNS = frozenset(
    {"id", "retailer", "title", "description", "brand", "category", "price", "currency", "url", "image", "gtin", "mpn"}
)


def _shown(value: Any, limit: int = 80) -> str:
    """A value quoted in an error message, cut short: a 2 MB field must not become a 2 MB reason."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value)):,} characters)"


def parse_category(value: str | list[str] | None) -> list[str]:
    """Split `A > B > C` (or take a list) into levels; an empty level is an error."""
    if value is None:
        return []
    parts = value if isinstance(value, list) else str(value).split(CATEGORY_SEPARATOR)
    levels = [" ".join(str(p).split()) for p in parts]
    if levels == [""]:
        return []
    if any(not level for level in levels):
        raise ValueError(f"empty level in category path {_shown(value)}; write it as 'A > B > C'")
    if any(len(level) > MAX_CATEGORY_LEVEL_LENGTH for level in levels):
        raise ValueError(f"a category level is longer than {MAX_CATEGORY_LEVEL_LENGTH} characters")
    return levels


def category_path(levels: list[str]) -> str:
    """The canonical text form of a category path, as stored and as matched by filters."""
    return f" {CATEGORY_SEPARATOR} ".join(levels)


def category_prefixes(levels: list[str]) -> list[str]:
    """Every ancestor path including the leaf: a keyword match on one of them is a prefix match."""
    return [category_path(levels[: i + 1]) for i in range(len(levels))]


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


class CatalogueRecord(BaseModel):
    """One validated catalogue row; `line` is where it came from in the source file."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    line: int = Field(ge=1, description="1-based line of the row in its file (CSV counts the header as line 1)")
    id: str = Field(min_length=1, max_length=256, description="the retailer's own product id")
    retailer: str = Field(min_length=1, max_length=128)
    title: str | None = Field(default=None, max_length=1_000)
    description: str | None = Field(default=None, max_length=20_000)
    brand: str | None = Field(default=None, max_length=256)
    gtin: str | None = Field(default=None, description="GTIN / EAN / UPC: 8, 12, 13 or 14 digits")
    mpn: str | None = Field(default=None, max_length=128, description="manufacturer part number")
    category: list[str] = Field(default_factory=list, max_length=12)
    price: float | None = Field(default=None, ge=0)
    currency: str | None = Field(default=None, max_length=8)
    url: str | None = Field(default=None, max_length=2_048)
    images: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
    attributes: dict[str, str] = Field(default_factory=dict)

    @field_validator("id", "retailer", mode="before")
    @classmethod
    def _scalar_text(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("category", mode="before")
    @classmethod
    def _category(cls, value: Any) -> list[str]:
        return parse_category(_blank_to_none(value))

    @field_validator("price", mode="before")
    @classmethod
    def _price(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"price must be a number, got {_shown(value)}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("price must be a finite number")
        return value

    @field_validator("gtin", mode="before")
    @classmethod
    def _gtin(cls, value: Any) -> Any:
        if value is None:
            return None
        digits = re.sub(r"[\s-]", "", str(value))
        if not re.fullmatch(r"\d{8}|\d{12,14}", digits):
            raise ValueError(f"gtin must be 8, 12, 13 or 14 digits, got {_shown(value)}")
        return digits.zfill(14)  # GTIN-14 form: the same product compares equal whatever length it was given in

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str | None) -> str | None:
        return value.upper() if value else value

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and not all(isinstance(v, str) and v.strip() for v in value):
            raise ValueError("every image must be a non-empty path or URL")
        if isinstance(value, list) and any(len(v) > MAX_IMAGE_REF_LENGTH for v in value):
            raise ValueError(f"an image path or URL is longer than {MAX_IMAGE_REF_LENGTH} characters")
        return value

    @field_validator("attributes", mode="before")
    @classmethod
    def _attributes(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        out: dict[str, str] = {}
        for key, raw in value.items():
            text = raw if isinstance(raw, str) else str(raw)
            if len(text) > MAX_ATTRIBUTE_LENGTH:
                raise ValueError(f"attribute {_shown(key)} is longer than {MAX_ATTRIBUTE_LENGTH} characters")
            out[str(key)] = text.strip()
        return out

    @model_validator(mode="after")
    def _needs_image_or_title(self) -> CatalogueRecord:
        if not self.images and not self.title:
            raise ValueError("a product needs at least one of 'image' or 'title'")
        return self

    @classmethod
    def from_row(cls, row: dict[str, Any], *, line: int) -> CatalogueRecord:
        """Validate one raw row (column -> value); columns outside the contract become attributes."""
        row = {str(k).strip(): v for k, v in row.items() if k is not None}
        data: dict[str, Any] = {k: _blank_to_none(row.get(k)) for k in KNOWN_COLUMNS - {"image"}}
        image = row.get("image")
        if isinstance(image, str):
            image = [p for p in (s.strip() for s in image.split(IMAGE_SEPARATOR)) if p]
        data["images"] = image
        data["attributes"] = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS and _blank_to_none(v) is not None}
        data["line"] = line
        return cls.model_validate({k: v for k, v in data.items() if v is not None})

    @property
    def category_path(self) -> str | None:
        return category_path(self.category) if self.category else None
