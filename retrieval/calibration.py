"""Match decisions from labelled pairs: a logistic model over each candidate's per-modality scores and
their margins to the other candidates of the same query, and the probability thresholds that reach a
target precision (match) or 0.5 (uncertain)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import numpy as np

from retrieval.query import SearchEngine
from schemas.search import Calibration, Decision, LabelledPair, ModalityScores, SearchFilters, SearchOptions

MODALITIES = ("image", "text", "lexical")  # fusion-independent: a score means the same in any query
FEATURES = (*MODALITIES, *(f"has_{m}" for m in MODALITIES), *(f"{m}_margin" for m in MODALITIES), "first")
UNCERTAIN_PRECISION = 0.5
RIDGE = 1e-2


def features(candidates: Sequence[ModalityScores]) -> list[list[float]]:
    """Per candidate of one query (in rank order): its scores (missing as 0), which were present, how far
    each is above the best *other* candidate (an absolute cosine means little; being clearly best does),
    and whether it ranked first."""
    table = np.array([[getattr(c, m) if getattr(c, m) is not None else 0.0 for m in MODALITIES] for c in candidates])
    rows = []
    for i, scores in enumerate(candidates):
        others = np.delete(table, i, axis=0)
        best_other = others.max(axis=0) if len(others) else np.zeros(len(MODALITIES))
        present = [float(getattr(scores, m) is not None) for m in MODALITIES]
        rows.append([*table[i], *present, *(table[i] - best_other), float(i == 0)])
    return rows


def _logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights (bias last) by Newton's method with a small ridge: 2-D problems converge in a few steps."""
    design = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(design.shape[1])
    for _ in range(50):
        p = 1 / (1 + np.exp(-design @ w))
        gradient = design.T @ (p - y) + RIDGE * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + RIDGE * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def probabilities(calibration: Calibration, rows: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    x = (np.asarray(rows, dtype=np.float64) - calibration.mean) / calibration.scale
    return np.asarray(1 / (1 + np.exp(-(x @ np.asarray(calibration.weights) + calibration.bias))))


def lowest_threshold(p: np.ndarray, y: np.ndarray, precision: float) -> tuple[float, float, float]:
    """The lowest probability t whose candidates {p >= t} reach `precision`: (t, precision, recall)."""
    order = np.argsort(-p)
    hits = np.cumsum(y[order])
    precisions = hits / np.arange(1, len(p) + 1)
    ok = np.nonzero(precisions >= precision)[0]
    if len(ok) == 0:
        return 1.0, 0.0, 0.0  # nothing reaches it: decide "match" for nothing
    last = ok[-1]
    return float(p[order][last]), float(precisions[last]), float(hits[last] / max(1, y.sum()))


def fit(
    rows: Sequence[Sequence[float]], labels: Sequence[bool], *, target_precision: float = 0.95, source: str = ""
) -> Calibration:
    """Fit on candidates (features, is-the-same-product) and choose the decision thresholds."""
    x = np.asarray(rows, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(x) < 10 or y.sum() < 3 or y.sum() > len(y) - 3:
        raise ValueError(
            f"calibration needs at least 10 candidates with 3 of each label, got {len(y)} ({int(y.sum())} true)"
        )
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    w = _logistic((x - mean) / scale, y)
    calibration = Calibration(
        features=list(FEATURES),
        mean=mean.tolist(),
        scale=scale.tolist(),
        weights=w[:-1].tolist(),
        bias=float(w[-1]),
        match_threshold=1.0,
        uncertain_threshold=1.0,
        target_precision=target_precision,
        precision=0.0,
        recall=0.0,
        candidates=len(y),
        fitted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source,
    )
    p = probabilities(calibration, x)
    match, precision, recall = lowest_threshold(p, y, target_precision)
    uncertain, _, _ = lowest_threshold(p, y, UNCERTAIN_PRECISION)
    return calibration.model_copy(
        update={
            "match_threshold": match,
            "uncertain_threshold": min(uncertain, match),
            "precision": precision,
            "recall": recall,
        }
    )


def decide(calibration: Calibration, candidates: Sequence[ModalityScores]) -> list[tuple[float, Decision]]:
    """For each candidate of one query: the probability that it is the same product, and the decision."""
    if not candidates:
        return []
    out: list[tuple[float, Decision]] = []
    for p in probabilities(calibration, features(candidates)):
        if p >= calibration.match_threshold:
            out.append((float(p), "match"))
        else:
            out.append((float(p), "uncertain" if p >= calibration.uncertain_threshold else "no_match"))
    return out


def labelled_candidates(
    engine: SearchEngine, catalogue: str, pairs: Iterable[LabelledPair], *, depth: int = 5
) -> tuple[list[list[float]], list[bool]]:
    """Each stored product's best `depth` candidates in the other retailers, as (features, is-expected)."""
    rows: list[list[float]] = []
    labels: list[bool] = []
    for pair in pairs:
        _, response = engine.search_product(
            catalogue,
            pair.product.retailer,
            pair.product.id,
            filters=SearchFilters(exclude_retailer=[pair.product.retailer]),
            options=SearchOptions(limit=depth),
        )
        rows += features([r.scores for r in response.results])
        labels += [r.id in pair.expect for r in response.results]
    return rows, labels
