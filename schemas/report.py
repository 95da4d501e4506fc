"""The ingest report: counts, timings and every rejected row or image with its reason."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from schemas.text import printable


class Rejection(BaseModel):
    """One thing that was not ingested (a whole row, or one image of a row that was kept). Its texts quote the
    catalogue, so they are kept printable: a row cannot forge a log line or drive a terminal."""

    line: int | None = Field(default=None, description="line in the catalogue file")
    id: str | None = None
    field: str | None = None
    reason: str

    @field_validator("id", "field", "reason")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        return printable(value) if value is not None else None


class IngestReport(BaseModel):
    catalogue: str
    source: str
    read: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected_rows: list[Rejection] = Field(default_factory=list)
    skipped_images: list[Rejection] = Field(default_factory=list)
    images_embedded: int = 0
    pruned: int = Field(default=0, description="products deleted because the feed no longer lists them")
    created_catalogue: bool = Field(default=False, description="this run created the catalogue's collection")
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.new + self.updated

    @property
    def products_per_second(self) -> float:
        """Valid products handled (written or found unchanged) per second of the whole run."""
        handled = self.written + self.unchanged
        return handled / self.seconds if self.seconds > 0 else 0.0
