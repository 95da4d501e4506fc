"""`python -m bench calibrate`: fit the match model on one set's labelled pairs, measure it on another:
precision and recall of its `match` decisions, and recall@1 before and after its re-ranking."""

from __future__ import annotations

import numpy as np

from bench.evalset import EvalSet
from bench.quality import ingested
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.model import Labelled, fit, labelled_candidates, probabilities
from schemas.search import Calibration, LabelledPair


def pairs_of(evalset: EvalSet) -> list[LabelledPair]:
    return [LabelledPair(product=q.product, expect=q.expect) for q in evalset.queries if q.product]


def first_hits(data: Labelled, score: np.ndarray) -> int:
    """Queries whose best-scored candidate is a true match."""
    groups, labels = np.asarray(data.groups), np.asarray(data.labels, dtype=bool)
    hits = 0
    for group in np.unique(groups):
        members = np.nonzero(groups == group)[0]
        hits += int(labels[members[np.argmax(score[members])]])
    return hits


def measure(calibration: Calibration, data: Labelled, queries: int) -> dict[str, float]:
    p = probabilities(calibration, data.rows) if data.rows else np.zeros(0)
    y = np.asarray(data.labels, dtype=bool)
    match = p >= calibration.match_threshold
    in_search_order = -np.arange(len(y), dtype=np.float64)  # rows of a group come in rank order
    return {
        "precision": float((match & y).sum() / max(1, match.sum())),
        "recall": float((match & y).sum() / max(1, data.positives)),
        "decided": int(match.sum()),
        "uncertain": int(((p >= calibration.uncertain_threshold) & ~match).sum()),
        "r1_search": first_hits(data, in_search_order) / max(1, queries),
        "r1_model": first_hits(data, p) / max(1, queries),
    }


def calibrate(
    fit_set: EvalSet, eval_set: EvalSet, image_encoder: ImageEncoder, text_encoder: TextEncoder, *, target: float
) -> str:
    """One table row: the model fitted on `fit_set`, its decisions and ranking measured on `eval_set`."""
    with ingested(fit_set, image_encoder, text_encoder) as (engine, _):
        calibration = fit(labelled_candidates(engine, fit_set.name, pairs_of(fit_set)), target_precision=target)
    with ingested(eval_set, image_encoder, text_encoder) as (engine, _):
        pairs = pairs_of(eval_set)
        data = labelled_candidates(engine, eval_set.name, pairs, depth=calibration.depth, fusion=calibration.fusion)
    m = measure(calibration, data, len(pairs))
    return (
        f"| {fit_set.name} -> {eval_set.name} | {len(pairs)} | {target:.2f} | {calibration.match_threshold:.3f} | "
        f"{calibration.precision:.3f} / {calibration.recall:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
        f"{m['decided']} | {m['uncertain']} | {m['r1_search']:.3f} | {m['r1_model']:.3f} |"
    )


HEADER = (
    "| fitted on -> measured on | products | target precision | match at p >= | fit precision / recall "
    "(out-of-fold) | precision | recall (of all true pairs) | decided match | uncertain | R@1 search "
    "| R@1 re-ranked |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)
