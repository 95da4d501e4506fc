"""`python -m bench finetune-text`: the text encoder fine-tuned on a text-pair set's *train* pairs (through
the same code as `python -m ingest adapt --method finetune`), switched on as the text encoder of the set's
*test* catalogue, and the test queries run through the engine the API uses, text only and text + lexical.

Per set: the train split becomes a catalogue of its own (its positive pairs the labelled lines, the
products' siblings the mined negatives, a held-out seventh of the anchors the early stopping); the test
split's catalogue is measured with the base model, then with the fine-tuned one, then rolled back. The
cross-dataset rows apply each set's model to the other set's catalogue with no further labels, and a
model trained on both sets' train pairs to each."""

from __future__ import annotations

import csv
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.evalset import EvalSet, load_set
from bench.metrics import Tally
from bench.prepare import write_text_pairs_set
from bench.quality import outcome
from ingest.pipeline import Ingestor
from retrieval.adapt.data import read_examples
from retrieval.adapt.finetune_text import FinetuneOptions, Tuned, finetune_catalogue
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.search import SearchEngine
from retrieval.settings import Settings
from retrieval.store import ProductStore
from schemas.adapters import AdapterRecord
from schemas.search import SearchFilters, SearchOptions

SETS = {"abt-buy": ("abt", "buy"), "amazon-google": ("amazon", "google")}
MODES = {
    "text": SearchOptions(limit=10, ranks=False, lexical=False),
    "text+lexical": SearchOptions(limit=10, ranks=False, fusion="rrf"),
}


@dataclass
class Row:
    measured: str  # the test set
    model: str  # "base", or what the model was trained on
    recall: dict[str, float]  # mode -> R@1
    train_s: float = 0.0
    holdout: str = ""
    epochs: str = ""
    reembed_s: float = 0.0


def measure(engine: SearchEngine, evalset: EvalSet, catalogue: str) -> dict[str, float]:
    """R@1 of the set's queries, each mode through `SearchEngine.search` (the API's path)."""
    tallies = {mode: Tally() for mode in MODES}
    for query in evalset.queries:
        filters = SearchFilters(exclude_retailer=[query.exclude_retailer] if query.exclude_retailer else [])
        for mode, options in MODES.items():
            started = time.perf_counter()
            response = engine.search(catalogue, text=query.text, filters=filters, options=options)
            tallies[mode].add(outcome(response, query, mode), time.perf_counter() - started)
    return {mode: tally.recall(1) for mode, tally in tallies.items()}


def _merged_train_set(folders: dict[str, Path], dest: Path) -> Path:
    """Several train sets as one catalogue: ids prefixed by the set's name, so that they cannot collide."""
    dest.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    with (dest / "queries.jsonl").open("w", encoding="utf-8") as out:
        for name, folder in folders.items():
            with (folder / "catalogue.csv").open(newline="", encoding="utf-8") as f:
                rows += [{**row, "id": f"{name}:{row['id']}"} for row in csv.DictReader(f)]
            for line in (folder / "queries.jsonl").read_text(encoding="utf-8").splitlines():
                query = json.loads(line)
                query["expect"] = [f"{name}:{i}" for i in query["expect"]]
                query["product"]["id"] = f"{name}:{query['product']['id']}"
                out.write(json.dumps(query) + "\n")
    with (dest / "catalogue.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dest


def _switch_on(engine: SearchEngine, catalogue: str, tuned: Tuned, source: str, options: FinetuneOptions) -> float:
    """Store the kept model as the catalogue's next text encoder version and activate it: seconds taken."""
    started = time.perf_counter()
    fit = tuned.fit
    record = AdapterRecord.of_fit(
        fit,
        catalogue=catalogue,
        modality="text",
        method="finetune",
        kind="encoder",
        encoder=engine.text_encoder.name,
        dim=engine.text_encoder.dim,
        examples=len(tuned.anchors),
        source=source,
        model=tuned.digest,
        max_length=options.max_length,
        hard_negatives=fit.hard_negatives,
    )
    saved = engine.adapters.save(record)
    engine.adapters.activate(catalogue, "text", saved.version)
    return time.perf_counter() - started


def run_finetune_text(
    shared: Path,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    *,
    sets: list[str],
    train_on: list[str],
    options: FinetuneOptions | None = None,
    settings: Settings | None = None,
) -> str:
    """The table: per test set of `sets`, the base model and each model of `train_on` (a set's name: its
    train pairs; `both`: both sets' train pairs), switched on in turn and rolled back."""
    options = options or FinetuneOptions()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-text-") as folder:
        root = Path(folder)
        run_settings = (settings or Settings()).model_copy(
            update={"qdrant_path": root / "store", "qdrant_url": None, "models_path": root / "models"}
        )
        store = ProductStore.open(run_settings)
        try:
            engine = SearchEngine(
                store,
                image_encoder,
                text_encoder,
                models_root=run_settings.models_root,
                model_precision=run_settings.text_precision,
            )
            ingestor = Ingestor(run_settings, store, image_encoder, text_encoder)
            trains: dict[str, Path] = {}
            tests: dict[str, EvalSet] = {}
            for name, (left, right) in SETS.items():
                source = shared / "text-pairs" / name
                if name in train_on or "both" in train_on:
                    trains[name] = root / f"{name}-train"
                    write_text_pairs_set(source, trains[name], left=left, right=right, split="train")
                if name in sets:
                    write_text_pairs_set(source, root / name, left=left, right=right, split="test")
                    tests[name] = load_set(root / name)
                    ingestor.run(root / name / "catalogue.csv", name, progress=False)
            if "both" in train_on:
                trains["both"] = _merged_train_set({n: trains[n] for n in SETS}, root / "both-train")
            for trained in train_on:  # every catalogue ingested before the first measure
                ingestor.run(trains[trained] / "catalogue.csv", f"{trained}-train", progress=False)
            base = {name: measure(engine, tests[name], name) for name in sets}
            rows += [Row(name, "base", base[name]) for name in sets]
            for trained in train_on:
                lines, skipped = read_examples(trains[trained] / "queries.jsonl")
                if skipped:
                    raise ValueError(f"{trained}: {skipped[0]}")
                tuned = finetune_catalogue(engine.adapters, f"{trained}-train", lines, text_encoder, options=options)
                fit = tuned.fit
                for name in sets:
                    reembed = _switch_on(engine, name, tuned, f"{trained} train", options)
                    rows.append(
                        Row(
                            name,
                            f"{trained} train ({len(tuned.anchors)} anchors, {fit.pairs} pairs, "
                            f"{fit.hard_negatives} hard)",
                            measure(engine, tests[name], name),
                            fit.seconds,
                            f"{fit.before:.3f} -> {fit.after:.3f} ({fit.holdout})",
                            f"{fit.epochs} (best step {fit.best_step} of {fit.steps})",
                            reembed,
                        )
                    )
                    engine.adapters.rollback(name, "text")
            rows += [Row(name, "base, after rolling back", measure(engine, tests[name], name)) for name in sets]
        finally:
            store.close()
    return _table(rows, options, text_encoder)


def _table(rows: list[Row], options: FinetuneOptions, encoder: TextEncoder) -> str:
    lines = [
        f"Text encoder {encoder.name} fine-tuned (all layers, MultipleNegativesRankingLoss + 1 mined hard negative, "
        f"max {options.max_length} tokens, batch {options.batch_size}, lr {options.lr:g}, up to {options.epochs} "
        f"epochs, patience {options.patience}); R@1 of the test queries through the API's search (other retailer "
        "only); train s on the torch threads of the run.",
        "",
        "| test set | model | text R@1 | text+lexical R@1 | held-out R@1 (anchors) | epochs | train s | re-embed s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.measured} | {r.model} | {r.recall['text']:.3f} | {r.recall['text+lexical']:.3f} | {r.holdout} | "
            f"{r.epochs} | {r.train_s:.0f} | {r.reembed_s:.0f} |"
        )
    return "\n".join(lines)
