"""`python -m bench calibrate`: fit the match model on one set's labelled pairs, measure it on another."""

from __future__ import annotations

import numpy as np

from bench.evalset import EvalSet
from bench.quality import ingested
from retrieval.calibration import fit, labelled_candidates, probabilities
from retrieval.encoders import ImageEncoder, TextEncoder
from schemas.search import LabelledPair


def pairs_of(evalset: EvalSet) -> list[LabelledPair]:
    return [LabelledPair(product=q.product, expect=q.expect) for q in evalset.queries if q.product]


def calibrate(
    fit_set: EvalSet, eval_set: EvalSet, image_encoder: ImageEncoder, text_encoder: TextEncoder, *, target: float
) -> str:
    """One table row: thresholds fitted on `fit_set`, precision / recall of 'match' on `eval_set`."""
    with ingested(fit_set, image_encoder, text_encoder) as (engine, _):
        rows, labels = labelled_candidates(engine, fit_set.name, pairs_of(fit_set))
    calibration = fit(rows, labels, target_precision=target, source=fit_set.name)
    with ingested(eval_set, image_encoder, text_encoder) as (engine, _):
        pairs = pairs_of(eval_set)
        eval_rows, eval_labels = labelled_candidates(engine, eval_set.name, pairs)
    p = probabilities(calibration, eval_rows)
    y = np.asarray(eval_labels, dtype=bool)
    match = p >= calibration.match_threshold
    true_pairs = sum(len(pair.expect) for pair in pairs)
    precision = float((match & y).sum() / max(1, match.sum()))
    recall = float((match & y).sum() / max(1, true_pairs))
    uncertain = (p >= calibration.uncertain_threshold) & ~match
    return (
        f"| {fit_set.name} -> {eval_set.name} | {target:.2f} | {calibration.match_threshold:.3f} | "
        f"{calibration.precision:.3f} / {calibration.recall:.3f} | {precision:.3f} | {recall:.3f} | "
        f"{int(match.sum())} | {int(uncertain.sum())} |"
    )


HEADER = (
    "| fitted on -> measured on | target precision | match at p >= | fit precision / recall "
    "| precision | recall (of all true pairs) | decided match | uncertain |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- |"
)
