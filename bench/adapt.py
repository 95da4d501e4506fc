"""`python -m bench adapt`: adaptation heads measured on grocery. The val set's catalogue (81 shop images and
descriptions) is ingested into a throw-away store; heads are fitted on the train split's in-store photos
(never on val) through the same code as `python -m ingest adapt`, switched on, and the val queries run
through the engine the API uses, as in `python -m bench quality`. Rows: no head; supervised heads (linear
and 2-layer, contrastive and triplet); the unsupervised spread over several seeds, label-free and with a
small labelled check; and no head again after rolling back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.evalset import EvalSet
from bench.metrics import Tally
from bench.quality import RowKey, SetRun, catalogue_embeddings, ingested, recall_at, run_set, table
from retrieval.adapt.data import PhotoEmbedder, Stored, labelled_examples, read_catalogue, read_examples
from retrieval.adapt.train import Examples, Fit, fit_spread, fit_supervised, split
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from schemas.adapters import AdapterRecord, HeadKind, Loss, Method

FUSIONS = ("rrf", "dbsf")
CACHE = Path("bench/out/cache")  # train photos' vectors, by content
SUPERVISED: list[tuple[HeadKind, Loss]] = [("linear", "contrastive"), ("linear", "triplet"), ("mlp", "contrastive")]


@dataclass
class Row:
    method: str
    detail: str
    train_s: float
    holdout: str
    image: list[float]  # R@1 per run (one for supervised rows, one per seed for spread)
    image5: list[float]
    fused: dict[str, list[float]]


def _measure(engine: SearchEngine, evalset: EvalSet, row: Row, full: bool = False) -> dict[RowKey, Tally]:
    only = None if full else ("image", "fused")
    tallies = run_set(evalset, engine, evalset.name, fusions=FUSIONS, only=only, filtered_rows=full)
    row.image.append(recall_at(tallies, "image"))
    row.image5.append(recall_at(tallies, "image", k=5))
    for fusion in FUSIONS:
        row.fused.setdefault(fusion, []).append(recall_at(tallies, "fused", fusion))
    return tallies


@dataclass
class Adapting:
    """A catalogue ingested by the bench, its stored image vectors, and the labelled examples of a train
    set: what the rows fit heads on and switch between (the same code as `python -m ingest adapt`)."""

    engine: SearchEngine
    catalogue: str
    stored: Stored
    examples: Examples
    encoder_name: str
    embedded: int  # train photos embedded this run (the rest came from the cache)

    @classmethod
    def of(
        cls, engine: SearchEngine, catalogue: str, train_dir: Path, settings: Settings, cache: Path = CACHE
    ) -> Adapting:
        lines, skipped = read_examples(train_dir / "queries.jsonl")
        if skipped:
            raise ValueError(f"{train_dir}: {skipped[0]}")
        stored = read_catalogue(engine.store, catalogue, "image", "product")
        embedder = PhotoEmbedder(engine.image_encoder, cache, max_pixels=settings.max_image_pixels)
        labelled = labelled_examples(stored, "image", "product", lines, base=train_dir, embed_photos=embedder)
        return cls(engine, catalogue, stored, labelled.examples, engine.image_encoder.name, embedder.embedded)

    def switch_to(self, fit: Fit, method: Method, kind: HeadKind = "linear") -> None:
        record = AdapterRecord(
            catalogue=self.catalogue,
            modality="image",
            version=1,
            method=method,
            kind=kind,
            condition="product",
            encoder=self.encoder_name,
            dim=fit.head.dim,
            created=datetime.now(UTC),
            examples=len(self.examples),
        )
        saved = self.engine.adapters.save(record, fit.head)
        self.engine.adapters.activate(self.catalogue, "image", saved.version)


def run_adapt(
    sets_dir: Path,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    *,
    train: str = "grocery-train",
    evaluate: str = "grocery-val",
    seeds: int = 5,
    cache: Path = CACHE,
    settings: Settings | None = None,
) -> tuple[str, str]:
    """(the adaptation table, the quality tables before and after the default head)."""
    from bench.evalset import load_set

    evalset = load_set(sets_dir / evaluate)
    settings = settings or Settings()
    rows: list[Row] = []
    with ingested(evalset, image_encoder, text_encoder, settings=settings) as (engine, _):
        name = evalset.name
        adapting = Adapting.of(engine, name, sets_dir / train, settings, cache)
        examples, stored = adapting.examples, adapting.stored
        none = Row("none", "raw vectors", 0.0, "", [], [], {})
        before = _measure(engine, evalset, none, full=True)
        rows.append(none)
        quality = {f"{name} (no head)": SetRun(before, 0.0, len(stored.ids), {})}
        for kind, loss in SUPERVISED:
            fit = fit_supervised(examples, kind=kind, loss=loss, held_out_by="example")
            adapting.switch_to(fit, "supervised", kind)
            row = Row(
                "supervised",
                f"{kind}, {loss}, stopped at epoch {fit.best} of {fit.epochs}",
                fit.seconds,
                f"{fit.before:.3f} -> {fit.after:.3f}",
                [],
                [],
                {},
            )
            tallies = _measure(engine, evalset, row, full=(kind, loss) == SUPERVISED[0])
            if (kind, loss) == SUPERVISED[0]:
                quality[f"{name} (head: {kind}, {loss})"] = SetRun(tallies, 0.0, len(stored.ids), {})
            rows.append(row)

        _, held = split(len(examples), 1 / 7, 0)  # photo by photo, as the heads above are judged
        check = examples.take(held)
        for label, labelled_check in (("spread, 20 steps (no labels)", None), ("spread + labelled check", check)):
            row = Row("unsupervised", label, 0.0, "", [], [], {})
            for seed in range(seeds):
                fit = fit_spread(stored.rows, seed=seed, check=labelled_check)
                row.train_s += fit.seconds / seeds
                if labelled_check is not None:
                    row.holdout += f"{'' if not row.holdout else ', '}step {fit.best}"
                adapting.switch_to(fit, "spread")
                _measure(engine, evalset, row)
            rows.append(row)

        engine.adapters.activate(name, "image", None)
        after_rollback = Row("none", "after rolling back", 0.0, "", [], [], {})
        _measure(engine, evalset, after_rollback)
        rows.append(after_rollback)
    header = (
        f"Fitted on {train} ({len(examples)} in-store photos, {adapting.embedded} embedded this run, the rest "
        f"from the cache), measured on {evaluate} ({len(evalset.queries)} photos + their text); image encoder "
        f"{image_encoder.name}. Spread rows: mean ± std over {seeds} seeds.\n\n"
    )
    return header + adapt_table(rows), table(quality)


def _cell(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def adapt_table(rows: list[Row]) -> str:
    head = "| method | head / stop | fit s | held-out R@1 | image R@1 | image R@5 | fused RRF R@1 | fused DBSF R@1 |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.detail} | {r.train_s:.1f} | {r.holdout} | {_cell(r.image)} | {_cell(r.image5)} | "
            f"{_cell(r.fused['rrf'])} | {_cell(r.fused['dbsf'])} |"
        )
    return "\n".join(lines)


def evaluate_adapted(
    evalset: EvalSet,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    train_dir: Path,
    *,
    max_queries: int | None = None,
    settings: Settings | None = None,
    fusions: Sequence[str] = ("rrf",),
) -> tuple[SetRun, SetRun]:
    """`bench quality --adapt TRAIN_SET`: the set's quality rows without a head, then with the default head
    (linear, contrastive, condition product) fitted on the train set's queries and switched on."""
    settings = settings or Settings()
    with ingested(evalset, image_encoder, text_encoder, settings=settings) as (engine, report):
        products = report.written + report.unchanged
        before = run_set(evalset, engine, evalset.name, max_queries=max_queries, fusions=fusions)
        embeddings = catalogue_embeddings(engine.store, evalset.name)
        adapting = Adapting.of(engine, evalset.name, train_dir, settings)
        adapting.switch_to(fit_supervised(adapting.examples, held_out_by="example"), "supervised")
        after = run_set(evalset, engine, evalset.name, max_queries=max_queries, fusions=fusions)
        return SetRun(before, report.seconds, products, embeddings), SetRun(after, report.seconds, products, {})
