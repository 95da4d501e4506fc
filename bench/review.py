"""`python -m bench review`: the review loop with a simulated reviewer, against the same number of random pairs.

A set's train split is ingested as the catalogue under review; a reviewer who knows its labels answers the
product's own queue (`retrieval.match.review`, as `GET /catalogues/{c}/review` serves it) round after round,
the answers are kept in a `LabelBook` (as `POST /labels` keeps them) and the catalogue is trained on them
after each round (`train_on_labels`, as `POST /catalogues/{c}/train` runs it). After each round the active
model (the default one until a training beats it) is judged on the set's test split, which the reviewer never
sees: precision and recall of its `match` decisions. The random strategy answers as many pairs, each a random
labelled product and one of its first five candidates at random.

The reviewer only answers about products whose truth the set holds (its labelled products; the others are
skipped, as a person would skip what they cannot tell)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.calibrate import pairs_of
from bench.evalset import EvalSet
from bench.quality import ingested
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.labels import SOURCE, Key, LabelBook
from retrieval.match.model import LabelsError, active_model, find_matches
from retrieval.match.review import CANDIDATES, COVERAGE_SHARE, review_queue
from retrieval.match.training import judge, train_on_labels
from retrieval.search import SearchEngine
from schemas.search import LabelIn, ProductRef, SearchFilters


@dataclass
class Round:
    strategy: str
    answers: int
    same: int
    model: str
    precision: float
    recall: float
    decided: int
    queue_s: float
    train_s: float


def _truth(evalset: EvalSet) -> tuple[str, str, dict[str, set[str]]]:
    """(the labelled retailer, the other one, labelled product id -> ids of its counterparts)."""
    truth = {q.product.id: set(q.expect) for q in evalset.queries if q.product}
    left = next(q.product.retailer for q in evalset.queries if q.product)
    others = {r for q in evalset.queries for r in [q.exclude_retailer] if r and r != left}
    other = next(iter(others), "")
    return left, other, truth


def _random_pairs(
    engine: SearchEngine,
    catalogue: str,
    left: str,
    against: str,
    truth: dict[str, set[str]],
    n: int,
    rng: np.random.Generator,
    asked: set[tuple[Key, Key]],
) -> list[LabelIn]:
    out: list[LabelIn] = []
    ids = sorted(truth)
    for k in rng.permutation(len(ids)):
        if len(out) == n:
            break
        product_id = ids[k]
        _, matches = find_matches(
            engine, catalogue, left, product_id, calibration=None, limit=CANDIDATES,
            filters=SearchFilters(retailer=[against] if against else []),
        )  # fmt: skip
        open_ = [m for m in matches if ((left, product_id), (m.retailer, m.id)) not in asked]
        if not open_:
            continue
        pick = open_[int(rng.integers(len(open_)))]
        out.append(
            LabelIn(
                left=ProductRef(retailer=left, id=product_id),
                right=ProductRef(retailer=pick.retailer, id=pick.id),
                same=pick.id in truth[product_id],
                who="random",
            )
        )
    return out


def unseen_default(
    sets_dir: Path, held: str, image_encoder: ImageEncoder, text_encoder: TextEncoder, path: Path
) -> str:
    """Fit the default match model as `bench transfer --ship 0.95` does, on every train split but `held`'s, write
    it to `path` and make it the process's default model: the review loop then starts from what a catalogue of
    an unseen source gets (the shipped model learnt from `held`'s own train split). Returns the sets used."""
    from bench.transfer import TRAIN_SETS, candidates_of, pooled
    from retrieval.match import default
    from retrieval.match.default import write_default_model
    from retrieval.match.model import TRANSFER_FEATURES, fit_model

    parts = [
        candidates_of(sets_dir, name, image_encoder, text_encoder) for name in TRAIN_SETS if not name.startswith(held)
    ]
    fitted = fit_model(pooled(parts), target_precision=0.95, names=TRANSFER_FEATURES, source="default")
    write_default_model(fitted.calibration, parts[0].text_encoder, [c.name for c in parts], path)
    default.DEFAULT_MODEL_FILE = path  # read at the next call, once the cache is cleared
    default.default_model.cache_clear()
    return ", ".join(c.name for c in parts)


def review_rounds(
    strategy: str,
    engine: SearchEngine,
    train_set: EvalSet,
    test_engine: SearchEngine,
    test_set: EvalSet,
    folder: Path,
    *,
    rounds: int,
    per_round: int,
    seed: int,
    progress: Callable[[str], None] = print,
    coverage_share: float = COVERAGE_SHARE,
) -> list[Round]:
    """`rounds` rounds of `per_round` answers on `train_set`'s catalogue (ingested in `engine`), each followed by
    training and a judgement on `test_set`'s (in `test_engine`); labels and models are kept under `folder`.
    The catalogue's match model is dropped first and last."""
    left, against, truth = _truth(train_set)
    test_pairs = pairs_of(test_set)
    out: list[Round] = []
    models = folder / "models"
    engine.models_root = test_engine.models_root = models
    catalogue = train_set.name
    engine.store.save_calibration(catalogue, None)
    book = LabelBook(folder / f"labels-{strategy}.sqlite")
    unknown = {i for i in engine.store.product_ids(catalogue, left) if i not in truth}
    rng = np.random.default_rng(seed)
    try:
        for number in range(1, rounds + 1):
            started = time.perf_counter()
            lefts, asked = book.asked(catalogue)
            if strategy == "queue":
                _, queue = review_queue(
                    engine, catalogue, left, against=[against] if against else [], limit=per_round,
                    answered=(lefts, asked), skip=unknown, seed=book.count(catalogue) + seed,
                    coverage_share=coverage_share,
                )  # fmt: skip
                answers = [
                    LabelIn(
                        left=ProductRef(retailer=p.left.retailer, id=p.left.id),
                        right=ProductRef(retailer=p.right.retailer, id=p.right.id) if p.right else None,
                        same=bool(p.right and p.right.id in truth[p.left.id]),
                        who="simulated",
                    )
                    for p in queue
                    if p.right is not None or not truth[p.left.id]  # "no counterpart" only where it is so
                ]
            else:
                answers = _random_pairs(engine, catalogue, left, against, truth, per_round, rng, asked)
            queue_s = time.perf_counter() - started
            for answer in answers:
                book.add(catalogue, answer)
            started = time.perf_counter()
            try:
                result = train_on_labels(
                    engine, catalogue, book.pairs(catalogue), models_root=models, seed=seed, source=SOURCE
                )
                for j in [result.before, *result.tried]:
                    progress(
                        f"    judged: {j.label}: {j.products} products, precision {j.precision:.3f} recall "
                        f"{j.recall:.3f} decided {j.decided}{' (chosen)' if j.label == result.chosen_label else ''}"
                    )
            except LabelsError as exc:
                progress(f"  round {number}: nothing trained ({exc})")
            train_s = time.perf_counter() - started
            active = active_model(engine.store, catalogue, models_root=models)
            j = judge("test", test_engine, test_set.name, test_pairs, active.calibration)
            same = sum(label.same for label in book.labels(catalogue))
            out.append(
                Round(strategy, book.count(catalogue), same, active.name or "none", j.precision, j.recall,
                      j.decided, queue_s, train_s)
            )  # fmt: skip
            progress(
                f"  {strategy} round {number}: {book.count(catalogue)} answers ({same} same), model {active.name}, "
                f"test precision {j.precision:.3f} recall {j.recall:.3f}; queue {queue_s:.0f} s, train {train_s:.0f} s"
            )
    finally:
        book.close()
        engine.store.save_calibration(catalogue, None)
    return out


def run_strategy(
    strategy: str,
    train_set: EvalSet,
    test_set: EvalSet,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    *,
    rounds: int,
    per_round: int,
    seed: int,
    progress: Callable[[str], None] = print,
    coverage_share: float = COVERAGE_SHARE,
) -> list[Round]:
    """`review_rounds` on both sets ingested into throw-away stores."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-review-") as scratch,
        ingested(train_set, image_encoder, text_encoder) as (engine, _),
        ingested(test_set, image_encoder, text_encoder) as (test_engine, _),
    ):
        return review_rounds(
            strategy, engine, train_set, test_engine, test_set, Path(scratch),
            rounds=rounds, per_round=per_round, seed=seed, progress=progress, coverage_share=coverage_share,
        )  # fmt: skip


HEADER = (
    "| strategy | answers (same) | model deciding | test match precision | test match recall | decided | "
    "queue s | train s |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def table(rows: list[Round]) -> str:
    lines = [HEADER]
    for r in rows:
        lines.append(
            f"| {r.strategy} | {r.answers} ({r.same}) | {r.model} | {r.precision:.3f} | {r.recall:.3f} | "
            f"{r.decided} | {r.queue_s:.0f} | {r.train_s:.0f} |"
        )
    return "\n".join(lines)
