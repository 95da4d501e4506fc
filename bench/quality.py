"""`python -m bench quality`: ingest each evaluation set into a fresh embedded store, run its queries
through the engine the API uses, and print recall@k / MRR per modality, fused, and filtered."""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.evalset import EvalQuery, EvalSet
from bench.metrics import KS, Outcome, Tally
from ingest.pipeline import Ingestor
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import QueryVectors, SearchEngine
from retrieval.settings import Settings
from retrieval.store import IMAGE_VECTOR, TEXT_VECTOR, ProductStore
from schemas.report import IngestReport
from schemas.search import SearchFilters, SearchOptions, SearchResponse

TOP_K = 10
# image, dense text, lexical terms alone; then fusions: dense text + lexical, and everything the query has
MODES = ("image", "photo", "text", "lexical", "text+lexical", "fused")
FUSED_MODES = ("text+lexical", "fused")


@dataclass(frozen=True)
class RowKey:
    set: str
    group: str
    mode: str
    filtered: bool
    fusion: str = ""  # for mode "fused": which fusion, e.g. "rrf", "weighted 1:0.5"

    @property
    def label(self) -> str:
        fusion = f" {self.fusion}" if self.fusion else ""
        return f"{self.mode}{fusion}{' +category' if self.filtered else ''}"

    @property
    def order(self) -> tuple[bool, str, int, str, bool]:
        return (self.group != "all", self.group, MODES.index(self.mode), self.fusion, self.filtered)


def recall_at(tallies: dict[RowKey, Tally], mode: str, fusion: str = "", k: int = 1) -> float:
    """Recall@k of one unfiltered row over all queries (`mode`, and `fusion` for fused modes)."""
    for key, tally in tallies.items():
        if key.group == "all" and key.mode == mode and key.fusion == fusion and not key.filtered:
            return tally.recall(k)
    raise KeyError(f"no row {mode} {fusion}".strip())


def parse_fusion(spec: str) -> tuple[str, SearchOptions]:
    """`rrf`, `dbsf` or `weighted:IMAGE:TEXT[:LEXICAL]` -> (row label, the search options)."""
    name, _, weights = spec.partition(":")
    if name == "weighted":
        values = [float(w) for w in weights.split(":") if w] + [1.0, 1.0, 1.0]
        options = SearchOptions(
            fusion="weighted",
            image_weight=values[0],
            text_weight=values[1],
            lexical_weight=values[2],
            limit=TOP_K,
            ranks=False,
        )
        label = f"{options.image_weight:g}:{options.text_weight:g}:{options.lexical_weight:g}"
        return f"weighted {label}", options
    if name not in ("rrf", "dbsf") or weights:
        raise ValueError(f"fusion {spec!r}: use rrf, dbsf or weighted:IMAGE:TEXT[:LEXICAL] weights")
    return name, SearchOptions(fusion=name, limit=TOP_K, ranks=False)


def outcome(response: SearchResponse, query: EvalQuery, mode: str) -> Outcome:
    rank = true_score = best_other = None
    for position, result in enumerate(response.results, start=1):
        single = {"image": result.scores.image, "text": result.scores.text, "lexical": result.scores.lexical}
        score = single.get(mode, result.score)
        if result.id in query.expect:
            if rank is None:
                rank, true_score = position, score
        elif best_other is None:
            best_other = score
    return Outcome(rank, true_score, best_other)


def modes_of(query: EvalQuery) -> list[str]:
    modes = []
    if query.image:
        modes += ["image", "photo"]
    if query.text:
        modes += ["text", "lexical", "text+lexical"]
    if query.image and query.text:
        modes.append("fused")
    return modes


def vectors_for(mode: str, encoded: QueryVectors) -> QueryVectors:
    if mode == "image":  # the photo's embedding alone
        return QueryVectors(image=encoded.image)
    if mode == "photo":  # what a photo query searches with: its embedding and, where read, its printed text
        return QueryVectors(image=encoded.image, ocr=encoded.ocr, read=encoded.read)
    # A typed text's rows keep its model numbers: the API re-ranks sibling codes whichever rankings run.
    if mode == "text":
        return QueryVectors(text=encoded.text, codes=encoded.codes)
    if mode == "lexical":
        return QueryVectors(lexical=encoded.lexical, codes=encoded.codes)
    if mode == "text+lexical":
        return QueryVectors(text=encoded.text, lexical=encoded.lexical, codes=encoded.codes)
    return encoded


def run_set(
    evalset: EvalSet,
    engine: SearchEngine,
    catalogue: str,
    *,
    max_queries: int | None = None,
    fusions: Sequence[str] = ("rrf",),
    only: Sequence[str] | None = None,
    filtered_rows: bool = True,
) -> dict[RowKey, Tally]:
    """Every query of the set in every mode it supports (fused once per fusion), with and without its
    category filter (`only`: just these modes; `filtered_rows=False`: no category-filtered rows)."""
    plain = SearchOptions(limit=TOP_K, ranks=False)
    info = engine.store.info(catalogue)
    reads_text = bool(info.reads_text)
    fused = [parse_fusion(spec) for spec in fusions]
    tallies: dict[RowKey, Tally] = defaultdict(Tally)
    for query in evalset.queries[:max_queries]:
        started = time.perf_counter()
        image = None
        if path := evalset.image_path(query):
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        exclude = [query.exclude_retailer] if query.exclude_retailer else []
        # the crops are decided on the unfiltered search (the category-filtered rows reuse the encoding)
        unfiltered = SearchFilters(exclude_retailer=exclude)
        encoded = engine.encode_for(catalogue, info, image, query.text, filters=unfiltered, read_text=reads_text)
        encode_s = time.perf_counter() - started
        modes = [mode for mode in modes_of(query) if only is None or mode in only]
        runs = [(mode, "", plain) for mode in modes if mode not in FUSED_MODES]
        runs += [(mode, label, options) for mode in modes if mode in FUSED_MODES for label, options in fused]
        for mode, fusion, options in runs:
            for filtered in (False, True) if query.category and filtered_rows else (False,):
                filters = SearchFilters(category=query.category if filtered else None, exclude_retailer=exclude)
                started = time.perf_counter()
                response = engine.search_vectors(
                    catalogue, vectors_for(mode, encoded), filters=filters, options=options
                )
                seconds = time.perf_counter() - started + encode_s / len(runs)
                result = outcome(response, query, mode)
                for group in {"all", query.group or "all"}:
                    tallies[RowKey(evalset.name, group, mode, filtered, fusion)].add(result, seconds)
    return dict(tallies)


@dataclass
class SetRun:
    tallies: dict[RowKey, Tally]
    ingest_seconds: float
    products: int
    embeddings: dict[str, tuple[np.ndarray, list[str]]]  # vector name -> (rows, category of each row)


def evaluate(
    evalset: EvalSet,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    *,
    max_queries: int | None = None,
    settings: Settings | None = None,
    fusions: Sequence[str] = ("rrf",),
) -> SetRun:
    """Ingest the set's catalogue into a throw-away embedded store, then run its queries."""
    with ingested(evalset, image_encoder, text_encoder, settings=settings) as (engine, report):
        tallies = run_set(evalset, engine, evalset.name, max_queries=max_queries, fusions=fusions)
        products = report.written + report.unchanged
        return SetRun(tallies, report.seconds, products, catalogue_embeddings(engine.store, evalset.name))


@contextmanager
def ingested(
    evalset: EvalSet, image_encoder: ImageEncoder, text_encoder: TextEncoder, *, settings: Settings | None = None
) -> Iterator[tuple[SearchEngine, IngestReport]]:
    """The set's catalogue ingested, as collection `evalset.name`, into a throw-away embedded store."""
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        run_settings = (settings or Settings()).model_copy(update={"qdrant_path": Path(folder), "qdrant_url": None})
        store = ProductStore.open(run_settings)
        try:
            report = Ingestor(run_settings, store, image_encoder, text_encoder).run(
                evalset.catalogue, evalset.name, progress=False, photo_roots=evalset.photo_roots
            )
            if problems := report.rejected_rows + report.skipped_images:
                raise ValueError(f"{evalset.catalogue}: {len(problems)} rows or images not ingested: {problems[0]}")
            engine = SearchEngine(
                store,
                image_encoder,
                text_encoder,
                query_crops=run_settings.query_crop_shares,
                crops_margin=run_settings.query_crops_margin,
            )
            yield engine, report
        finally:
            store.close()


def catalogue_embeddings(store: ProductStore, catalogue: str) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Every stored vector (first photo for images) with its product's category, for the 2-D map."""
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    labels: dict[str, list[str]] = defaultdict(list)
    pages = store.scroll_pages(
        catalogue, with_vectors=[IMAGE_VECTOR, TEXT_VECTOR], with_payload=["category_path", "retailer"]
    )
    for point in (point for points in pages for point in points):
        vectors = point.vector if isinstance(point.vector, dict) else {}
        label = str((point.payload or {}).get("category_path") or (point.payload or {}).get("retailer"))
        for name, value in vectors.items():
            if not isinstance(value, list):
                continue  # the sparse lexical vector has no place on a 2-D map
            array = np.asarray(value, dtype=np.float32)
            rows[name].append(array[0] if array.ndim == 2 else array)
            labels[name].append(label)
    return {name: (np.vstack(vectors), labels[name]) for name, vectors in rows.items()}


def table(runs: dict[str, SetRun]) -> str:
    """A Markdown table, one row per (set, group, mode, filter)."""
    header = "| set | group | mode | queries | R@1 | R@5 | R@10 | MRR | top-5 error | s | queries/s |"
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for name, run in runs.items():
        for key in sorted(run.tallies, key=lambda k: k.order):
            s = run.tallies[key].summary()
            lines.append(
                f"| {name} | {key.group} | {key.label} | {s['queries']} | "
                + " | ".join(f"{s[f'R@{k}']:.3f}" for k in KS)
                + f" | {s['MRR']:.3f} | {s['top5_error']:.3f} | {s['seconds']:.1f} | {s['queries_per_s']:.1f} |"
            )
    return "\n".join(lines)


def write_results(runs: dict[str, SetRun], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        name: {
            "products": run.products,
            "ingest_seconds": run.ingest_seconds,
            "rows": [{"group": k.group, "mode": k.label, **t.summary()} for k, t in run.tallies.items()],
        }
        for name, run in runs.items()
    }
    (out / "results.json").write_text(json.dumps(data, indent=2))
    (out / "table.md").write_text(table(runs) + "\n")
