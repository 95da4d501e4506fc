"""`python -m bench calibrate`: fit the match model on one set's labelled pairs, measure it on another:
precision and recall of its `match` decisions, and recall@1 before and after its re-ranking."""

from __future__ import annotations

from bench.evalset import EvalSet
from bench.quality import ingested
from retrieval.encoders import ImageEncoder, TextEncoder
from retrieval.match.model import Labelled, fit, labelled_candidates
from retrieval.match.training import judge_candidates
from schemas.search import Calibration, LabelledPair


def pairs_of(evalset: EvalSet) -> list[LabelledPair]:
    return [LabelledPair(product=q.product, expect=q.expect) for q in evalset.queries if q.product]


def measure(calibration: Calibration, data: Labelled, queries: int) -> dict[str, float]:
    """The bench's columns of `judge_candidates`, with the search order's recall@1 beside the model's."""
    model = judge_candidates("model", calibration, data, queries)
    search = judge_candidates("search", None, data, queries)
    return {
        "precision": model.precision,
        "recall": model.recall,
        "decided": model.decided,
        "uncertain": model.uncertain,
        "r1_search": search.r1,
        "r1_model": model.r1,
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
    threshold = f"{calibration.match_threshold:.3f}" if calibration.reliable else "never (unreliable)"
    return (
        f"| {fit_set.name} -> {eval_set.name} | {len(pairs)} | {target:.2f} | {threshold} | "
        f"{calibration.precision:.3f} / {calibration.recall:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | "
        f"{m['decided']} | {m['uncertain']} | {m['r1_search']:.3f} | {m['r1_model']:.3f} |"
    )


HEADER = (
    "| fitted on -> measured on | products | target precision | match at p >= | fit precision / recall "
    "(out-of-fold) | precision | recall (of all true pairs) | decided match | uncertain | R@1 search "
    "| R@1 re-ranked |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)
