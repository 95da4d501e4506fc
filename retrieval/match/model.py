"""The match model: fitted on labelled pairs, it re-ranks a stored product's candidates in other retailers
and decides `match` / `uncertain` / `no_match` for each.

Each candidate is described by its per-modality scores and their margins to the other candidates of the
same query, by how identifiers agree (model numbers, GTIN), by how the titles agree (shared and extra words,
character trigrams, numbers such as sizes and versions) and by the price gap. A logistic model over these
features gives the probability that a candidate is the same product: candidates are re-ordered by it (the
fitted "fusion weights"), and the thresholds reaching a target precision are chosen on out-of-fold
probabilities so that they hold on products the model was not fitted on."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from retrieval.lexical import code_stem, codes, tokens
from retrieval.search import ImageUrl, SearchEngine, ref_as_url
from retrieval.store import ProductStore
from schemas.payload import Product
from schemas.search import Calibration, Decision, Fusion, LabelledPair, MatchResult, SearchFilters, SearchOptions

MODEL_VERSION = 3  # 3: + the text read off the photos (`ocr`), for catalogues that read it
MODALITIES = ("image", "text", "lexical", "ocr")  # fusion-independent: a score means the same in any query
FEATURES = (
    *MODALITIES,
    *(f"has_{m}" for m in MODALITIES),
    *(f"{m}_margin" for m in MODALITIES),
    "reciprocal_rank",
    "code_same",
    "code_stem_same",
    "code_prefix",
    "code_conflict",
    "gtin_same",
    "gtin_conflict",
    "title_jaccard",
    "title_extra",
    "title_missing",
    "title_trigrams",
    "numbers_kept",
    "numbers_added",
    "price_known",
    "price_gap",
)
DEFAULT_DEPTH = 20  # candidates per product that the model re-ranks
DEFAULT_FUSION: Fusion = "dbsf"
UNCERTAIN_PRECISION = 0.5
RIDGE = 1e-2
FOLDS = 5
_NUMBER = re.compile(r"(?<![a-z0-9])\d+(?:[.,]\d+)?")


@dataclass(frozen=True)
class _Side:
    """What the features read of one product, computed once per product."""

    words: frozenset[str]
    text_words: frozenset[str]
    trigrams: frozenset[str]
    numbers: frozenset[str]
    codes: frozenset[str]
    stems: frozenset[str]
    gtin: str | None
    price: float | None

    @classmethod
    def of(cls, product: Product) -> _Side:
        title = " ".join(filter(None, [product.brand, product.title]))
        everything = " ".join(filter(None, [title, product.mpn, product.description]))
        joined = "".join(tokens(product.title or ""))
        product_codes = frozenset(codes(" ".join(filter(None, [product.title, product.mpn]))))
        return cls(
            words=frozenset(tokens(product.title or "")),
            text_words=frozenset(tokens(everything)),
            trigrams=frozenset(joined[i : i + 3] for i in range(max(0, len(joined) - 2))),
            numbers=frozenset(n.replace(",", ".") for n in _NUMBER.findall((product.title or "").lower())),
            codes=product_codes or frozenset(codes(everything)),
            stems=frozenset(code_stem(c) for c in product_codes or codes(everything)),
            gtin=product.gtin,
            price=product.price if product.price and product.price > 0 else None,
        )


def _share(part: frozenset[str], whole: frozenset[str], empty: float) -> float:
    return len(part & whole) / len(whole) if whole else empty


def _pair_features(query: _Side, candidate: _Side) -> list[float]:
    same = bool(query.codes & candidate.codes)
    stem_same = bool(query.stems & candidate.stems)
    prefix = any(
        min(len(a), len(b)) >= 4 and (a.startswith(b) or b.startswith(a)) for a in query.codes for b in candidate.codes
    )
    both_gtin = query.gtin is not None and candidate.gtin is not None
    union = query.words | candidate.words
    trigram_union = query.trigrams | candidate.trigrams
    priced = query.price is not None and candidate.price is not None
    gap = min(3.0, abs(math.log(query.price / candidate.price))) if query.price and candidate.price else 0.0
    return [
        float(same),
        float(stem_same),
        float(prefix),
        float(bool(query.codes and candidate.codes) and not (same or stem_same or prefix)),
        float(both_gtin and query.gtin == candidate.gtin),
        float(both_gtin and query.gtin != candidate.gtin),
        len(query.words & candidate.words) / len(union) if union else 0.0,
        1.0 - _share(candidate.words, query.text_words, 1.0) if candidate.words else 0.0,
        1.0 - _share(query.words, candidate.text_words, 1.0) if query.words else 0.0,
        len(query.trigrams & candidate.trigrams) / len(trigram_union) if trigram_union else 0.0,
        _share(candidate.numbers, query.numbers, 0.5),  # the query's sizes and versions the candidate has
        1.0 - _share(query.numbers, candidate.numbers, 1.0),  # and those it adds
        float(priced),
        gap,
    ]


@dataclass(frozen=True)
class Candidate:
    """What the match model needs of one candidate: its product and its per-modality scores."""

    product: Product
    scores: dict[str, float | None]


def features(query: Product, candidates: Sequence[Candidate]) -> list[list[float]]:
    """One row of FEATURES per candidate of one query, candidates in the order the search ranked them."""
    table = np.array([[c.scores.get(m) or 0.0 for m in MODALITIES] for c in candidates]).reshape(-1, len(MODALITIES))
    query_side = _Side.of(query)
    rows = []
    for i, candidate in enumerate(candidates):
        others = np.delete(table, i, axis=0)
        best_other = others.max(axis=0) if len(others) else np.zeros(len(MODALITIES))
        present = [float(candidate.scores.get(m) is not None) for m in MODALITIES]
        rows.append(
            [
                *table[i],
                *present,
                *(table[i] - best_other),
                1.0 / (i + 1),
                *_pair_features(query_side, _Side.of(candidate.product)),
            ]
        )
    return rows


def _logistic(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights (bias last) by Newton's method with a small ridge: converges in a few steps."""
    design = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(design.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(design @ w, -30, 30)))
        gradient = design.T @ (p - y) + RIDGE * w
        hessian = (design * (p * (1 - p))[:, None]).T @ design + RIDGE * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _fit_model(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    return mean, scale, _logistic((x - mean) / scale, y)


def _predict(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, w: np.ndarray) -> np.ndarray:
    z = ((x - mean) / scale) @ w[:-1] + w[-1]
    return np.asarray(1 / (1 + np.exp(-np.clip(z, -30, 30))))


def probabilities(calibration: Calibration, rows: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64).reshape(-1, len(calibration.features))
    weights = np.array([*calibration.weights, calibration.bias])
    return _predict(x, np.asarray(calibration.mean), np.asarray(calibration.scale), weights)


def lowest_threshold(
    p: np.ndarray, y: np.ndarray, precision: float, positives: int | None = None
) -> tuple[float, float, float]:
    """The lowest probability t whose candidates {p >= t} reach `precision`: (t, precision, recall), recall
    out of `positives` true pairs (default: those among the candidates)."""
    order = np.argsort(-p, kind="stable")
    hits = np.cumsum(y[order])
    precisions = hits / np.arange(1, len(p) + 1)
    ok = np.nonzero(precisions >= precision)[0]
    if len(ok) == 0:
        return 1.0, 0.0, 0.0  # nothing reaches it: decide "match" for nothing
    last = ok[-1]
    total = positives if positives is not None else max(1, int(y.sum()))
    return float(p[order][last]), float(precisions[last]), float(hits[last] / max(1, total))


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Each candidate's probability from a model fitted without its query's fold."""
    unique = np.unique(groups)
    fold_of = {g: i % folds for i, g in enumerate(np.random.default_rng(0).permutation(unique))}
    fold = np.array([fold_of[g] for g in groups])
    p = np.zeros(len(y))
    for k in range(folds):
        held = fold == k
        train = ~held
        if not held.any() or y[train].sum() < 2 or y[train].sum() > train.sum() - 2:
            continue
        p[held] = _predict(x[held], *_fit_model(x[train], y[train]))
    return p


@dataclass
class Labelled:
    """Candidates of labelled products: features, whether each is the same product, and its query."""

    rows: list[list[float]]
    labels: list[bool]
    groups: list[int]
    positives: int  # every labelled true pair, also those the search did not bring among the candidates


def fit(
    data: Labelled,
    *,
    target_precision: float = 0.95,
    depth: int = DEFAULT_DEPTH,
    fusion: Fusion = DEFAULT_FUSION,
    source: str = "",
    adapters: dict[str, int] | None = None,
) -> Calibration:
    """Fit the model on all labelled candidates; choose the thresholds on out-of-fold probabilities.
    `adapters`: the catalogue's active heads the candidates were found under."""
    x = np.asarray(data.rows, dtype=np.float64).reshape(-1, len(FEATURES))
    y = np.asarray(data.labels, dtype=np.float64)
    if len(x) < 10 or y.sum() < 3 or y.sum() > len(y) - 3:
        raise ValueError(
            f"calibration needs at least 10 candidates with 3 of each label, got {len(y)} ({int(y.sum())} true)"
        )
    mean, scale, w = _fit_model(x, y)
    groups = np.asarray(data.groups)
    held_out = out_of_fold(x, y, groups) if len(np.unique(groups)) >= 2 * FOLDS else _predict(x, mean, scale, w)
    match, precision, recall = lowest_threshold(held_out, y, target_precision, data.positives)
    uncertain, _, _ = lowest_threshold(held_out, y, UNCERTAIN_PRECISION)
    return Calibration(
        version=MODEL_VERSION,
        features=list(FEATURES),
        mean=mean.tolist(),
        scale=scale.tolist(),
        weights=w[:-1].tolist(),
        bias=float(w[-1]),
        match_threshold=match,
        uncertain_threshold=min(uncertain, match),
        target_precision=target_precision,
        precision=precision,
        recall=recall,
        candidates=len(y),
        depth=depth,
        fusion=fusion,
        fitted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source,
        adapters=adapters or {},
    )


def decide(calibration: Calibration, p: float) -> Decision:
    if p >= calibration.match_threshold:
        return "match"
    return "uncertain" if p >= calibration.uncertain_threshold else "no_match"


def usable(calibration: Calibration | None, adapters: dict[str, int]) -> Calibration | None:
    """A stored calibration this version can apply: an older model's features differ, and scores under
    other adaptation heads than the ones it was fitted with (`adapters`, the active ones) are not its own."""
    if calibration is None or calibration.version != MODEL_VERSION or calibration.features != list(FEATURES):
        return None
    return calibration if calibration.adapters == adapters else None


def active_calibration(store: ProductStore, catalogue: str) -> Calibration | None:
    """The catalogue's stored match model when this version can apply it under the active heads, else None."""
    return usable(store.calibration(catalogue), store.info(catalogue).adapters)


def find_matches(
    engine: SearchEngine,
    catalogue: str,
    retailer: str,
    product_id: str,
    *,
    calibration: Calibration | None,
    limit: int = 10,
    filters: SearchFilters | None = None,
    fusion: Fusion | None = None,
    image_url: ImageUrl = ref_as_url,
) -> tuple[Product, list[MatchResult]]:
    """A stored product's best candidates among the *other* retailers, re-ranked and decided by the
    catalogue's match model when it has one (else in search order, decided 'uncalibrated')."""
    filters = (filters or SearchFilters()).model_copy()
    filters.exclude_retailer = sorted({*filters.exclude_retailer, retailer})
    depth = max(limit, calibration.depth) if calibration else limit
    chosen = fusion or (calibration.fusion if calibration else DEFAULT_FUSION)
    product, response = engine.search_product(
        catalogue,
        retailer,
        product_id,
        filters=filters,
        options=SearchOptions(limit=depth, fusion=chosen, ranks=False),
        image_url=image_url,
    )
    if calibration is None:
        return product, [MatchResult(**r.model_dump(), decision="uncalibrated") for r in response.results]
    candidates = [Candidate(r.product, r.scores.model_dump()) for r in response.results]
    p = probabilities(calibration, features(product, candidates)) if candidates else np.zeros(0)
    order = np.argsort(-p, kind="stable")[:limit]
    return product, [
        MatchResult(
            **response.results[i].model_dump(),
            decision=decide(calibration, float(p[i])),
            confidence=round(float(p[i]), 4),
        )
        for i in order
    ]


def labelled_candidates(
    engine: SearchEngine,
    catalogue: str,
    pairs: Iterable[LabelledPair],
    *,
    depth: int = DEFAULT_DEPTH,
    fusion: Fusion = DEFAULT_FUSION,
    progress: Callable[[int], None] | None = None,
) -> Labelled:
    """Each labelled product's best `depth` candidates in the other retailers, with their features."""
    data = Labelled([], [], [], 0)
    for number, pair in enumerate(pairs):
        product, results = find_matches(
            engine, catalogue, pair.product.retailer, pair.product.id, calibration=None, limit=depth, fusion=fusion
        )
        candidates = [Candidate(r.product, r.scores.model_dump()) for r in results]
        data.rows += features(product, candidates)
        data.labels += [r.id in pair.expect for r in results]
        data.groups += [number] * len(results)
        data.positives += len(set(pair.expect))
        if progress:
            progress(number + 1)
    return data
