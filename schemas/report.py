"""The ingest report: counts, timings and every rejected row or image with its reason."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pydantic import BaseModel, Field, PrivateAttr, field_validator

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


KEPT_REJECTIONS = 1_000  # rejections a report keeps; all of them are counted, and go to a sink as they happen
RejectionSink = Callable[[str, "Rejection"], None]  # ("row" or "image", the rejection)


class IngestReport(BaseModel):
    """What an ingest did. Rejected rows and skipped images are counted, not hoarded: the lists keep the first
    KEPT_REJECTIONS of each (what a summary shows), and every one goes to `sink` as it happens (`--rejects`),
    so a feed of a million bad rows costs the memory of a thousand."""

    catalogue: str
    source: str
    read: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected_rows: list[Rejection] = Field(
        default_factory=list, description=f"the first {KEPT_REJECTIONS} rows not ingested"
    )
    skipped_images: list[Rejection] = Field(
        default_factory=list, description=f"the first {KEPT_REJECTIONS} photos not used"
    )
    rejected_count: int = Field(default=0, description="rows not ingested, all of them")
    skipped_count: int = Field(default=0, description="photos not used, all of them")
    images_embedded: int = 0
    pruned: int = Field(default=0, description="products deleted because the feed no longer lists them")
    created_catalogue: bool = Field(default=False, description="this run created the catalogue's collection")
    seconds: float = 0.0

    _sink: RejectionSink | None = PrivateAttr(default=None)

    def send_rejections_to(self, sink: RejectionSink | None) -> None:
        self._sink = sink

    def reject(self, rejections: Iterable[Rejection]) -> None:
        """Rows not ingested: counted, the first ones kept, each sent to the sink."""
        self._add(rejections, "row", self.rejected_rows)

    def skip(self, rejections: Iterable[Rejection]) -> None:
        """Photos not used (of rows that were kept, or not)."""
        self._add(rejections, "image", self.skipped_images)

    def _add(self, rejections: Iterable[Rejection], kind: str, kept: list[Rejection]) -> None:
        for rejection in rejections:
            if kind == "row":
                self.rejected_count += 1
            else:
                self.skipped_count += 1
            if len(kept) < KEPT_REJECTIONS:
                kept.append(rejection)
            if self._sink is not None:
                self._sink(kind, rejection)

    @property
    def written(self) -> int:
        return self.new + self.updated

    @property
    def products_per_second(self) -> float:
        """Valid products handled (written or found unchanged) per second of the whole run."""
        handled = self.written + self.unchanged
        return handled / self.seconds if self.seconds > 0 else 0.0
