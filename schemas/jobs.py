"""Background jobs of the service: what a client submits and what it polls."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.report import IngestReport, Rejection
from schemas.search import Fusion

# interrupted: the service stopped (shut down, crashed or was killed) before the job ended; what it stored stays
JobStatus = Literal["queued", "running", "done", "failed", "interrupted"]
JobKind = Literal["match", "ingest", "train"]
SHOWN_REJECTIONS = 100


class IngestSummary(BaseModel):
    """What an ingest job did (so far, while it runs): the counts of `python -m ingest`, and the first
    rejected rows and skipped photos with their line numbers and reasons."""

    file: str = Field(description="the uploaded file's name")
    read: int = 0
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected_rows: int = Field(default=0, description="rows not ingested (all of them; `rejections` lists some)")
    skipped_images: int = Field(default=0, description="photos left out of products that were kept")
    images_embedded: int = 0
    pruned: int = 0
    seconds: float = 0.0
    rejections: list[Rejection] = Field(
        default_factory=list, description=f"the first {SHOWN_REJECTIONS} rejected rows, with line and reason"
    )
    skipped: list[Rejection] = Field(default_factory=list, description=f"the first {SHOWN_REJECTIONS} skipped photos")

    @classmethod
    def of(cls, report: IngestReport, file: str) -> IngestSummary:
        return cls(
            file=file,
            read=report.read,
            new=report.new,
            updated=report.updated,
            unchanged=report.unchanged,
            rejected_rows=report.rejected_count,
            skipped_images=report.skipped_count,
            images_embedded=report.images_embedded,
            pruned=report.pruned,
            seconds=report.seconds,
            rejections=report.rejected_rows[:SHOWN_REJECTIONS],
            skipped=report.skipped_images[:SHOWN_REJECTIONS],
        )


class Judged(BaseModel):
    """A match model's figures on labelled products it never learnt from."""

    label: str
    products: int
    precision: float | None = Field(description="of its 'match' decisions (None: it decides none)")
    recall: float | None = Field(description="share of the labelled true pairs decided 'match'")
    r1: float


class TrainSummary(BaseModel):
    """What a training job measured and did."""

    labels: int = Field(description="labelled products trained on (contradicted labels left out)")
    before: Judged = Field(description="what was active, on the held-out labelled products")
    tried: list[Judged] = Field(description="each configuration trained, on the same products")
    chosen: str | None = Field(description="the configuration stored and active now (None: what was active stays)")
    notes: list[str] = Field(default_factory=list)
    seconds: float


class Job(BaseModel):
    id: str
    kind: JobKind
    catalogue: str
    status: JobStatus
    done: int = Field(default=0, description="products processed so far (an ingest: rows read)")
    total: int | None = Field(default=None, description="products to process, once known (an ingest: unknown)")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    ingest: IngestSummary | None = Field(default=None, description="an ingest job's report, updated as it runs")
    training: TrainSummary | None = Field(default=None, description="a train job's figures, once it is done")
    warning: str | None = Field(
        default=None, description="a match job: why its decisions are missing or unreliable (no 'match' then)"
    )


class MatchJobRequest(BaseModel):
    """Match one retailer's products (all of them, or the listed ones) against the other retailers."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"retailer": "shop-a", "against": ["shop-b"], "limit": 3}]},
    )

    retailer: str = Field(min_length=1, max_length=128)
    against: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=list, max_length=100, description="only these retailers"
    )
    product_ids: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1, max_length=10_000, description="only these products of the retailer"
    )
    limit: int = Field(default=3, ge=1, le=20, description="candidates per product")
    fusion: Fusion | None = Field(default=None, description="default: the calibration's, else rrf")
