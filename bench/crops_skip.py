"""`python -m bench.crops_skip`: photo search with and without the check that skips a query photo's centre crops
when the whole photo already answers (QUERY_CROPS_MARGIN), side by side in one run.

The sample's web shop (81 products, `OCR=off`) is ingested into a throw-away store; each of grocery val's 296
in-store photos searches it, photo only, once with the check (margin 0.04, chosen on grocery train) and once
without (margin 0, the default: always the photo and its crops), alternating so that both see the same
machine. Rows: recall@1 and @5, the photo views embedded per query (forwards), the share of queries that took
the one-forward path, and the milliseconds of `SearchEngine.search` per query (mean and p50), the photo's
decoding excluded."""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ingest.pipeline import Ingestor
from retrieval.runtime import load_encoders
from retrieval.search import SearchEngine
from retrieval.search.engine import DECISIVE_MARGIN, DirectEmbedder
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.search import SearchOptions

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "grocery" / "catalogue.csv"
GROCERY = ROOT.parent / "shared" / "data" / "grocery" / "dataset"


class Counting(DirectEmbedder):
    """The engine's own embedder, counting the photo views it embeds (the forwards a query costs)."""

    def __init__(self, engine: SearchEngine) -> None:
        super().__init__(engine.image_encoder, engine.text_encoder, engine.reader)
        self.views = 0

    def photos(self, images: Sequence[Image.Image]) -> list[Future[np.ndarray]]:
        self.views += len(images)
        return super().photos(images)


@dataclass
class Row:
    label: str
    at1: int = 0
    at5: int = 0
    views: list[int] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)


def main() -> int:
    settings = Settings(ocr="off")
    val = GROCERY / "val.txt"
    if not val.is_file():
        raise SystemExit(f"{val} is missing: ../shared/data is needed")
    with SAMPLE.open(encoding="utf-8") as f:
        ids = {row["title"].replace(" ", "-"): row["id"] for row in csv.DictReader(f)}
    photos = [line.split(",")[0].strip() for line in val.read_text().splitlines() if line.strip()]
    image_encoder, text_encoder = load_encoders(settings)
    with tempfile.TemporaryDirectory(prefix="bench-crops-") as folder:
        run_settings = settings.model_copy(update={"qdrant_path": Path(folder), "qdrant_url": None})
        store = ProductStore.open(run_settings)
        try:
            Ingestor(run_settings, store, image_encoder, text_encoder).run(SAMPLE, "grocery", progress=False)
            checked = SearchEngine(store, image_encoder, text_encoder, crops_margin=DECISIVE_MARGIN)
            engines = {
                f"crops skipped at margin {DECISIVE_MARGIN}": checked,
                "crops always": replace(checked, crops_margin=0.0),
            }
            rows = {label: Row(label) for label in engines}
            for number, photo in enumerate(photos):
                expected = ids[Path(photo).parent.name]
                with Image.open(GROCERY / photo) as opened:
                    image = opened.convert("RGB")
                order = list(engines.items()) if number % 2 else list(reversed(engines.items()))
                for label, engine in order:
                    counting = Counting(engine)
                    started = time.perf_counter()
                    found = engine.search("grocery", image=image, embedder=counting, options=SearchOptions(limit=5))
                    row = rows[label]
                    row.ms.append((time.perf_counter() - started) * 1000)
                    row.views.append(counting.views)
                    ranked = [r.id for r in found.results]
                    row.at1 += bool(ranked) and ranked[0] == expected
                    row.at5 += expected in ranked
        finally:
            store.close()
    print("| query photos | R@1 | R@5 | views embedded per query | one-forward share | ms mean | ms p50 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows.values():
        n = len(row.views)
        cheap = sum(v == 1 for v in row.views) / n
        print(
            f"| {row.label} | {row.at1 / n:.3f} | {row.at5 / n:.3f} | {statistics.mean(row.views):.2f} | "
            f"{cheap:.2f} | {statistics.mean(row.ms):.1f} | {statistics.median(row.ms):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
