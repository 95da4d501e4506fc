"""The evaluation-set format: a folder with `catalogue.csv` (the ingest contract) and `queries.jsonl`."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from schemas.search import ProductRef


class EvalQuery(BaseModel):
    """One query: a photo and/or text, the product ids that count as correct, optional constraints."""

    image: str | None = Field(default=None, description="photo path, relative to the set's folder or absolute")
    text: str | None = None
    expect: list[str] = Field(min_length=1, description="ids of the products that are the same product")
    category: str | None = Field(default=None, description="category filter used in the '+category' rows")
    exclude_retailer: str | None = Field(default=None, description="always applied (cross-retailer matching)")
    group: str | None = Field(default=None, description="optional sub-set name for a separate table row")
    product: ProductRef | None = Field(
        default=None, description="the query is this stored product (used by `bench calibrate` as a labelled pair)"
    )

    @model_validator(mode="after")
    def _needs_input(self) -> EvalQuery:
        if not self.image and not self.text:
            raise ValueError("a query needs an image or a text")
        return self


@dataclass
class EvalSet:
    name: str
    folder: Path
    queries: list[EvalQuery]

    @property
    def catalogue(self) -> Path:
        return self.folder / "catalogue.csv"

    @property
    def photo_roots(self) -> list[Path]:
        """The folder the catalogue's absolute photo paths share (the data set the bench prepared it from):
        ingest may read photos there as well as in the set's own folder."""
        return catalogue_photo_roots(self.catalogue)

    def image_path(self, query: EvalQuery) -> Path | None:
        return (self.folder / query.image).resolve() if query.image else None


def catalogue_photo_roots(catalogue: Path) -> list[Path]:
    """The common folder of a bench-written catalogue's absolute photo paths ([] when it names none): the
    bench prepared those rows itself, so it lets ingest read there (`--photo-root` on the command line)."""
    with catalogue.open(newline="", encoding="utf-8") as f:
        refs = [ref for row in csv.DictReader(f) for ref in (row.get("image") or "").split("|") if ref.strip()]
    absolute = [ref.strip() for ref in refs if os.path.isabs(ref.strip())]
    return [Path(os.path.commonpath([os.path.dirname(ref) for ref in absolute]))] if absolute else []


def load_set(folder: Path) -> EvalSet:
    queries = []
    lines = (folder / "queries.jsonl").read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                queries.append(EvalQuery.model_validate(json.loads(line)))
            except ValueError as exc:
                raise ValueError(f"{folder / 'queries.jsonl'} line {number}: {exc}") from exc
    if not (folder / "catalogue.csv").is_file():
        raise ValueError(f"{folder} has no catalogue.csv")
    return EvalSet(folder.name, folder, queries)


def write_queries(folder: Path, queries: list[EvalQuery]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as out:
        for query in queries:
            out.write(query.model_dump_json(exclude_none=True) + "\n")
