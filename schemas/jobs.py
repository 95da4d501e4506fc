"""Background jobs of the service: what a client submits and what it polls."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.search import Fusion

JobStatus = Literal["queued", "running", "done", "failed"]


class Job(BaseModel):
    id: str
    kind: Literal["match"]
    catalogue: str
    status: JobStatus
    done: int = Field(default=0, description="products processed so far")
    total: int | None = Field(default=None, description="products to process, once known")
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None


class MatchJobRequest(BaseModel):
    """Match one retailer's products (all of them, or the listed ones) against the other retailers."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"retailer": "shop-a", "against": ["shop-b"], "limit": 3}]},
    )

    retailer: str = Field(min_length=1, max_length=128)
    against: list[str] = Field(default_factory=list, max_length=100, description="only these retailers")
    product_ids: list[str] | None = Field(
        default=None, min_length=1, max_length=10_000, description="only these products of the retailer"
    )
    limit: int = Field(default=3, ge=1, le=20, description="candidates per product")
    fusion: Fusion | None = Field(default=None, description="default: the calibration's, else rrf")
