"""`python -m bench rerank`: the pairwise re-ranker learned from one set's labels, measured on test products.

For each text-pair set the cross-encoder learns from the **train** split (its products ingested as a
catalogue, candidates mined by the catalogue's own search), the match model is fitted on the **valid**
split with and without the cross-encoder's score, and both are measured on the **test** split: recall@1 of
the order, precision and recall of `match` decisions. Cross-dataset rows apply what one set taught to the
other set's shops with no labels of theirs (the match model too is fitted on the teaching set)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.calibrate import measure, pairs_of
from bench.evalset import EvalSet
from bench.quality import ingested
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.model import fit, labelled_candidates
from retrieval.match.rerank import Reranker, RerankFit, load_reranker
from retrieval.match.training import mine_pairs, teach_cross_encoder
from schemas.search import Calibration


@dataclass
class Taught:
    """A cross-encoder trained on one set's train split, and where it is kept."""

    name: str
    fit: RerankFit
    digest: str
    mined_s: float


def teach(train_set: EvalSet, models_root: Path, encoders: tuple[ImageEncoder, TextEncoder], *, epochs: int) -> Taught:
    """Mine the train split's candidates and train a cross-encoder on them (a tenth of the products held out
    for early stopping)."""
    started = time.perf_counter()
    with ingested(train_set, *encoders) as (engine, _):
        pairs = mine_pairs(engine, train_set.name, pairs_of(train_set))
    mined = time.perf_counter() - started
    result, digest = teach_cross_encoder(pairs, models_root, epochs=epochs)
    return Taught(train_set.name, result, digest, mined)


def fitted(fit_set: EvalSet, encoders: tuple[ImageEncoder, TextEncoder], reranker: Reranker | None) -> Calibration:
    with ingested(fit_set, *encoders) as (engine, _):
        data = labelled_candidates(engine, fit_set.name, pairs_of(fit_set), reranker=reranker)
    return fit(data, target_precision=0.95, reranker=reranker.digest if reranker else None)


def judged(
    calibration: Calibration, eval_set: EvalSet, encoders: tuple[ImageEncoder, TextEncoder], reranker: Reranker | None
) -> tuple[dict[str, float], float]:
    with ingested(eval_set, *encoders) as (engine, _):
        pairs = pairs_of(eval_set)
        started = time.perf_counter()
        data = labelled_candidates(
            engine, eval_set.name, pairs, depth=calibration.depth, fusion=calibration.fusion, reranker=reranker
        )
        per_product = (time.perf_counter() - started) / max(1, len(pairs))
    return measure(calibration, data, len(pairs)), per_product


def row(label: str, calibration: Calibration, m: dict[str, float], per_product_s: float, train_s: float) -> str:
    return (
        f"| {label} | {calibration.precision:.3f} / {calibration.recall:.3f} | {m['precision']:.3f} | "
        f"{m['recall']:.3f} | {m['r1_search']:.3f} | {m['r1_model']:.3f} | {1000 * per_product_s:.0f} | "
        f"{train_s:.0f} |"
    )


HEADER = (
    "| taught on -> measured on | fit precision / recall (out-of-fold) | precision | recall (of all true pairs) "
    "| R@1 search | R@1 model | ms per product | train s |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
)


def run_rerank(
    sets_dir: Path,
    models_root: Path,
    encoders: tuple[ImageEncoder, TextEncoder],
    *,
    names: list[str],
    epochs: int,
    cross: bool = True,
) -> str:
    """The table: per set, the match model without and with the cross-encoder on its own test products,
    then (`cross`) each set's cross-encoder and model on the other sets' test products."""
    from bench.evalset import load_set

    lines = [HEADER]
    taught: dict[str, tuple[Taught, Calibration, Calibration, Reranker]] = {}
    for name in names:
        lesson = teach(load_set(sets_dir / f"{name}-train"), models_root, encoders, epochs=epochs)
        reranker = load_reranker(models_root, lesson.digest)
        print(
            f"{name}: cross-encoder on {lesson.fit.pairs} mined pairs ({lesson.mined_s:.0f} s to mine), "
            f"held-out AP {lesson.fit.before:.3f} -> {lesson.fit.after:.3f}, epoch {lesson.fit.best_epoch} of "
            f"{lesson.fit.epochs}, {lesson.fit.seconds:.0f} s",
            flush=True,
        )
        started = time.perf_counter()
        plain = fitted(load_set(sets_dir / f"{name}-valid"), encoders, None)
        plain_s = time.perf_counter() - started
        started = time.perf_counter()
        paired = fitted(load_set(sets_dir / f"{name}-valid"), encoders, reranker)
        paired_s = time.perf_counter() - started
        taught[name] = (lesson, plain, paired, reranker)
        test = load_set(sets_dir / name)
        m, cost = judged(plain, test, encoders, None)
        lines.append(row(f"{name}: match model", plain, m, cost, plain_s))
        print(lines[-1], flush=True)
        m, cost = judged(paired, test, encoders, reranker)
        lines.append(row(f"{name}: + cross-encoder", paired, m, cost, lesson.fit.seconds + paired_s))
        print(lines[-1], flush=True)
    if cross:
        for source, (lesson, plain, paired, reranker) in taught.items():
            for target in names:
                if target == source:
                    continue
                test = load_set(sets_dir / target)
                m, cost = judged(plain, test, encoders, None)
                lines.append(row(f"{source} -> {target}: match model", plain, m, cost, 0.0))
                m, cost = judged(paired, test, encoders, reranker)
                lines.append(row(f"{source} -> {target}: + cross-encoder", paired, m, cost, lesson.fit.seconds))
                print("\n".join(lines[-2:]), flush=True)
    return "\n".join(lines)
