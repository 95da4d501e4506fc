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
from bench.quality import RowKey, SetRun, ingested, run_set, table
from ingest.adapt_data import PhotoEmbedder, labelled_examples, read_catalogue, read_examples
from retrieval.adapt_train import Fit, fit_spread, fit_supervised, split
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.query import SearchEngine
from retrieval.settings import Settings
from schemas.adapters import AdapterRecord, HeadKind, Loss, Method

FUSIONS = ("rrf", "dbsf")
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


def _recall(tallies: dict[RowKey, Tally], mode: str, fusion: str = "", k: int = 1) -> float:
    for key, tally in tallies.items():
        if key.group == "all" and key.mode == mode and key.fusion == fusion and not key.filtered:
            return tally.recall(k)
    raise KeyError(mode)


def _measure(engine: SearchEngine, evalset: EvalSet, row: Row, full: bool = False) -> dict[RowKey, Tally]:
    only = None if full else ("image", "fused")
    tallies = run_set(evalset, engine, evalset.name, fusions=FUSIONS, only=only, filtered_rows=full)
    row.image.append(_recall(tallies, "image"))
    row.image5.append(_recall(tallies, "image", k=5))
    for fusion in FUSIONS:
        row.fused.setdefault(fusion, []).append(_recall(tallies, "fused", fusion))
    return tallies


def run_adapt(
    sets_dir: Path,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    *,
    train: str = "grocery-train",
    evaluate: str = "grocery-val",
    seeds: int = 5,
    cache: Path = Path("bench/out/cache"),
    settings: Settings | None = None,
) -> tuple[str, str]:
    """(the adaptation table, the quality tables before and after the default head)."""
    from bench.evalset import load_set

    evalset = load_set(sets_dir / evaluate)
    lines, skipped = read_examples(sets_dir / train / "queries.jsonl")
    if skipped:
        raise ValueError(f"{train}: {skipped[0]}")
    settings = settings or Settings()
    rows: list[Row] = []
    with ingested(evalset, image_encoder, text_encoder, settings=settings) as (engine, _):
        name = evalset.name
        adapters = engine.adapters
        stored = read_catalogue(engine.store, name, "image", "product")
        embedder = PhotoEmbedder(image_encoder, cache, max_pixels=settings.max_image_pixels)
        labelled = labelled_examples(stored, "image", "product", lines, base=sets_dir / train, embed_photos=embedder)
        examples = labelled.examples
        none = Row("none", "raw vectors", 0.0, "", [], [], {})
        before = _measure(engine, evalset, none, full=True)
        rows.append(none)
        quality = {f"{name} (no head)": SetRun(before, 0.0, len(stored.ids), {})}

        def switch_to(fit: Fit, method: Method, kind: HeadKind = "linear") -> None:
            record = AdapterRecord(
                catalogue=name,
                modality="image",
                version=1,
                method=method,
                kind=kind,
                condition="product",
                encoder=image_encoder.name,
                dim=fit.head.dim,
                created=datetime.now(UTC),
                examples=len(examples),
            )
            saved = adapters.save(record, fit.head)
            adapters.activate(name, "image", saved.version)

        for kind, loss in SUPERVISED:
            fit = fit_supervised(examples, kind=kind, loss=loss)
            switch_to(fit, "supervised", kind)
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

        _, held = split(len(examples), 1 / 7, 0)
        check = examples.take(held)
        for label, labelled_check in (("spread, 20 steps (no labels)", None), ("spread + labelled check", check)):
            row = Row("unsupervised", label, 0.0, "", [], [], {})
            for seed in range(seeds):
                fit = fit_spread(stored.rows, seed=seed, check=labelled_check)
                row.train_s += fit.seconds / seeds
                if labelled_check is not None:
                    row.holdout += f"{'' if not row.holdout else ', '}step {fit.best}"
                switch_to(fit, "spread")
                _measure(engine, evalset, row)
            rows.append(row)

        adapters.activate(name, "image", None)
        after_rollback = Row("none", "after rolling back", 0.0, "", [], [], {})
        _measure(engine, evalset, after_rollback)
        rows.append(after_rollback)
    header = (
        f"Fitted on {train} ({len(examples)} in-store photos, {embedder.embedded} embedded this run, the rest "
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
