"""`python -m bench.ocr_cost`: what reading package text costs, side by side in one run.

Ingests the grocery catalogue (81 products, one web photo each) twice into throw-away embedded stores,
with OCR off and on, and times a single client's photo queries (grocery val in-store photos) against
each: a query against the catalogue that reads text also reads the query photo. Prints one table with
the ratios. The quality side is `python -m bench quality` (the `photo` rows)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench.evalset import load_set
from ingest.pipeline import Ingestor
from retrieval.runtime import load_encoders
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.search import SearchOptions


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ocr_cost", description=__doc__)
    parser.add_argument("--set", type=Path, default=Path("bench/out/sets/grocery-val"), help="a photo set")
    parser.add_argument("--queries", type=int, default=60, help="photo queries per catalogue")
    args = parser.parse_args(argv)
    evalset = load_set(args.set)
    photos = [evalset.image_path(q) for q in evalset.queries if q.image][
        :: max(1, len(evalset.queries) // args.queries)
    ]
    images = [Image.open(p).convert("RGB") for p in photos[: args.queries] if p is not None]
    image_encoder, text_encoder = load_encoders(Settings())
    rows = []
    for ocr in ("off", "on"):
        with tempfile.TemporaryDirectory(prefix="bench-ocr-") as folder:
            settings = Settings(qdrant_path=Path(folder), ocr=ocr)
            with ProductStore.open(settings) as store:
                ingestor = Ingestor(settings, store, image_encoder, text_encoder)
                report = ingestor.run(evalset.catalogue, evalset.name, progress=False, photo_roots=evalset.photo_roots)
                engine = SearchEngine(store, image_encoder, text_encoder, reader=ingestor.reader)
                engine.search(evalset.name, image=images[0], options=SearchOptions(limit=10))  # warm
                took = []
                for image in images:
                    started = time.perf_counter()
                    engine.search(evalset.name, image=image, options=SearchOptions(limit=10))
                    took.append((time.perf_counter() - started) * 1000)
            rows.append((ocr, report.images_embedded / report.seconds, statistics.median(took), percentile(took, 0.95)))
    print(f"{evalset.name}: {len(images)} photo queries, one client; ingest of {evalset.catalogue.parent.name}\n")
    print("| OCR | ingest images/s | photo query p50 ms | p95 ms |")
    print("| --- | --- | --- | --- |")
    for ocr, rate, p50, p95 in rows:
        print(f"| {ocr} | {rate:.1f} | {p50:.0f} | {p95:.0f} |")
    (_, off_rate, off_p50, _), (_, on_rate, on_p50, _) = rows
    print(f"\nOCR on / off: ingest {on_rate / off_rate:.2f}x the images/s, photo query p50 {on_p50 / off_p50:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
