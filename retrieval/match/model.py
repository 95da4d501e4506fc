"""The match model: fitted on labelled pairs, it re-ranks a stored product's candidates in other retailers
and decides `match` / `uncertain` / `no_match` for each.

Each candidate is described by its per-modality scores and their margins to the other candidates of the
same query, by how identifiers agree (model numbers, GTIN), by how the titles agree (shared and extra words,
character trigrams, numbers such as sizes and versions) and by the price gap. A logistic model over these
features (scikit-learn: standard scaling, then a logistic regression) gives the probability that a candidate
is the same product: candidates are re-ordered by it (the fitted "fusion weights"), and the thresholds
reaching a target precision are chosen on out-of-fold probabilities (folds by query) so that they hold on
products the model was not fitted on. When no threshold reaches it, the model is stored as unreliable: it
still re-ranks, but never decides `match`.

The fitted model is kept as plain numbers in the catalogue's metadata (portable to a Qdrant server, never a
pickle) and rebuilt into the same scikit-learn pipeline to predict."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_recall_curve
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from retrieval.lexical import code_stem, codes, tokens
from retrieval.match.default import default_model
from retrieval.match.rerank import DEFAULT_RERANK_DEPTH, Reranker, load_reranker
from retrieval.records import point_id
from retrieval.search import ImageUrl, SearchEngine, ref_as_url
from retrieval.settings import Settings
from retrieval.store import TEXT_VECTOR, ProductStore
from retrieval.weights import ModelFolderError, kept_model
from schemas.payload import Product
from schemas.search import (
    Calibration,
    CurvePoint,
    Decision,
    Fusion,
    LabelledPair,
    MatchResult,
    ProductRef,
    SearchFilters,
    SearchOptions,
    SearchResponse,
)

# 3: + the text read off the photos (`ocr`); 4: fitted by scikit-learn, stored with its reliability and curve;
# 5: + `reverse_rank`, with a twin fitted without it for typed queries (`typed_query`)
MODEL_VERSION = 5
MODALITIES = ("image", "text", "lexical", "ocr")  # fusion-independent: a score means the same in any query
FEATURES = (
    *MODALITIES,
    *(f"has_{m}" for m in MODALITIES),
    *(f"{m}_margin" for m in MODALITIES),
    "reciprocal_rank",
    "reverse_rank",
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
# The default model's features (the transfer model, `python -m bench transfer`): none depends on a catalogue's
# vocabulary, its photos or the scale of an encoder it was not trained with. Text cosines are MiniLM's, which the
# model is only applied with; the lexical score is a share of the query's terms; the rest are ranks, margins to
# the other candidates and agreements of identifiers, titles, numbers and prices.
TRANSFER_FEATURES = (
    "text",
    "lexical",
    "has_text",
    "has_lexical",
    "text_margin",
    "lexical_margin",
    "reciprocal_rank",
    "reverse_rank",
    *FEATURES[FEATURES.index("code_same") :],
)
# The cross-encoder's score of a candidate (its logit), against the best of the other candidates', and whether
# it read the candidate at all (it reads the first `rerank_depth`): only in models fitted with a cross-encoder.
PAIR_FEATURES = ("pair", "pair_margin", "has_pair")
# The shipped default model's log-odds for the candidate: a catalogue's own model fitted on few labels starts
# from what the default model knows and learns how this catalogue differs (stacking); only in models fitted
# where the default model applies (its text encoder, no fine-tuned text model).
PRIOR = "prior"
# Where the query product lands when its candidate searches the query's retailer (1 / rank; 0 when not among
# the candidate's first REVERSE_DEPTH, or not asked): a mutual best match is the same product far more often
# than a one-sided one, whatever the catalogue's words and score scale (docs/BENCHMARKS.md, "The default
# match model"). Asked for the first REVERSE_CANDIDATES candidates in search order.
REVERSE = "reverse_rank"
REVERSE_DEPTH = 5
REVERSE_CANDIDATES = 10
DEFAULT_DEPTH = 20  # candidates per product that the model re-ranks
DEFAULT_FUSION: Fusion = "dbsf"
UNCERTAIN_PRECISION = 0.5
# Inverse L2 strength on standardised features: chosen on the valid splits' out-of-fold R@1 and recall at
# precision 0.95 (abt-buy, amazon-google), flat from 3 to 100, worse at 1 and below.
C = 10.0
FOLDS = 5  # out-of-fold folds, by query
MIN_HITS = 5  # a precision "reached" by fewer true matches than this is luck, not a threshold to trust
FEW_TRUE_PAIRS = 30  # below this, out-of-fold precision is a rough estimate: said, not refused
PRECISION_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)  # the offered curve's points
RECALL_LEVELS = (0.05, 0.1, 0.25, 0.5, 0.75)  # added when few precision levels are reachable
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


def _pair_features(query: _Side, candidate: _Side) -> dict[str, float]:
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
    return {
        "code_same": float(same),
        "code_stem_same": float(stem_same),
        "code_prefix": float(prefix),
        "code_conflict": float(bool(query.codes and candidate.codes) and not (same or stem_same or prefix)),
        "gtin_same": float(both_gtin and query.gtin == candidate.gtin),
        "gtin_conflict": float(both_gtin and query.gtin != candidate.gtin),
        "title_jaccard": len(query.words & candidate.words) / len(union) if union else 0.0,
        "title_extra": 1.0 - _share(candidate.words, query.text_words, 1.0) if candidate.words else 0.0,
        "title_missing": 1.0 - _share(query.words, candidate.text_words, 1.0) if query.words else 0.0,
        "title_trigrams": len(query.trigrams & candidate.trigrams) / len(trigram_union) if trigram_union else 0.0,
        "numbers_kept": _share(candidate.numbers, query.numbers, 0.5),  # the query's sizes, versions it has
        "numbers_added": 1.0 - _share(query.numbers, candidate.numbers, 1.0),  # and those it adds
        "price_known": float(priced),
        "price_gap": gap,
    }


def pair_signals(query: Product, candidate: Product) -> dict[str, float]:
    """How two listings' identifiers, titles, numbers and prices agree (the match model's pair features)."""
    return _pair_features(_Side.of(query), _Side.of(candidate))


@dataclass(frozen=True)
class Candidate:
    """What the match model needs of one candidate: its product and its per-modality scores. A new per-pair
    signal (a score computed on the two listings together) is one more field here, one more name in
    FEATURES and one more entry in `_candidate_features`."""

    product: Product
    scores: dict[str, float | None]
    pair: float | None = None  # the cross-encoder's probability that the two listings are one product
    reverse: int | None = None  # the query's 1-based rank in the candidate's search of its retailer; 0: not there


def feature_names(*, pair: bool, prior: bool = False) -> list[str]:
    """The features of a model fitted without or with the cross-encoder's pair score (and the default model's
    log-odds, `prior`)."""
    return [*FEATURES, *(PAIR_FEATURES if pair else ()), *((PRIOR,) if prior else ())]


def _logit(p: float) -> float:
    q = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(q / (1 - q))


def _candidate_features(
    query: _Side, candidate: Candidate, rank: int, score: np.ndarray, best_other: np.ndarray
) -> dict[str, float]:
    """The named features of one candidate: `score` its modality scores, `best_other` the best of the other
    candidates' per modality, `rank` its place in the search order (0 first)."""
    return {
        **{m: float(score[k]) for k, m in enumerate(MODALITIES)},
        **{f"has_{m}": float(candidate.scores.get(m) is not None) for m in MODALITIES},
        **{f"{m}_margin": float(score[k] - best_other[k]) for k, m in enumerate(MODALITIES)},
        "reciprocal_rank": 1.0 / (rank + 1),
        REVERSE: 1.0 / candidate.reverse if candidate.reverse else 0.0,
        **_pair_features(query, _Side.of(candidate.product)),
    }


def features(
    query: Product, candidates: Sequence[Candidate], *, pair: bool = False, names: Sequence[str] | None = None
) -> list[list[float]]:
    """One row of features per candidate of one query, candidates in the order the search ranked them:
    `names` (default FEATURES, with the cross-encoder's PAIR_FEATURES after them when `pair`)."""
    table = np.array([[c.scores.get(m) or 0.0 for m in MODALITIES] for c in candidates]).reshape(-1, len(MODALITIES))
    logits = [_logit(c.pair) if c.pair is not None else None for c in candidates]
    query_side = _Side.of(query)
    names = list(names) if names is not None else feature_names(pair=pair)
    pair = pair or any(name in PAIR_FEATURES for name in names)
    rows = []
    for i, candidate in enumerate(candidates):
        others = np.delete(table, i, axis=0)
        best_other = others.max(axis=0) if len(others) else np.zeros(len(MODALITIES))
        named = _candidate_features(query_side, candidate, i, table[i], best_other)
        if pair:
            rivals = [v for j, v in enumerate(logits) if j != i and v is not None]
            own = logits[i]
            named["pair"] = own if own is not None else 0.0
            named["pair_margin"] = own - max(rivals) if own is not None and rivals else 0.0
            named["has_pair"] = float(own is not None)
        rows.append(named)
    if PRIOR in names:
        shipped = default_model()
        if shipped is None:
            raise ValueError("the match model reads the default model's log-odds, and no default model ships here")
        model = shipped.calibration
        if REVERSE not in names and model.typed_query is not None:  # a typed query's rows: no reverse rank
            model = model.typed_query
        prior = probabilities(model, [[row[n] for n in model.features] for row in rows])
        for row, p in zip(rows, prior, strict=True):
            row[PRIOR] = _logit(float(p))
    return [[row[name] for name in names] for row in rows]


def _pipeline() -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1_000))


def model_of(calibration: Calibration) -> Pipeline:
    """The fitted scikit-learn pipeline a stored calibration describes, rebuilt from its numbers (the stored
    form is JSON, so that any Qdrant server keeps it; the schema checked the lengths and signs)."""
    n = len(calibration.features)
    scaler = StandardScaler()
    scaler.mean_ = np.asarray(calibration.mean, dtype=np.float64)
    scaler.scale_ = np.asarray(calibration.scale, dtype=np.float64)
    scaler.var_ = scaler.scale_**2
    scaler.n_features_in_ = n
    scaler.n_samples_seen_ = calibration.candidates
    logistic = LogisticRegression(C=C)
    logistic.coef_ = np.asarray([calibration.weights], dtype=np.float64)
    logistic.intercept_ = np.asarray([calibration.bias], dtype=np.float64)
    logistic.classes_ = np.array([0, 1])
    logistic.n_features_in_ = n
    return make_pipeline(scaler, logistic)


def probabilities(calibration: Calibration, rows: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64).reshape(-1, len(calibration.features))
    if not len(x):
        return np.zeros(0)
    return np.asarray(model_of(calibration).predict_proba(x)[:, 1])


def _curve(p: np.ndarray, y: np.ndarray, positives: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds ascending, precision, true matches) of deciding `match` at p >= each threshold; recall is
    the true matches over `positives` (default: the true pairs among the candidates)."""
    if not y.any():
        return np.zeros(0), np.zeros(0), np.zeros(0)
    precision, recall, thresholds = precision_recall_curve(y, p)
    hits = np.rint(recall[:-1] * y.sum())  # the last point (recall 0) has no threshold
    return thresholds, precision[:-1], hits


def _point(threshold: float, precision: float, hits: float, positives: int) -> CurvePoint:
    return CurvePoint(
        threshold=float(threshold), precision=float(precision), recall=min(1.0, float(hits) / max(1, positives))
    )


def lowest_threshold(
    p: np.ndarray, y: np.ndarray, precision: float, *, positives: int | None = None, min_hits: int = 1
) -> CurvePoint | None:
    """The lowest probability whose candidates {p >= t} reach `precision` with at least `min_hits` true
    matches among them, with its precision and recall (out of `positives` true pairs, default: those among
    the candidates); None when no threshold reaches it."""
    total = positives if positives is not None else int(y.sum())
    thresholds, precisions, hits = _curve(p, y, total)
    ok = np.nonzero((precisions >= precision) & (hits >= min_hits))[0]
    if not len(ok):
        return None
    first = ok[0]  # thresholds ascend: the first that reaches it keeps the most matches
    return _point(thresholds[first], precisions[first], hits[first], total)


def offered_curve(p: np.ndarray, y: np.ndarray, positives: int) -> list[CurvePoint]:
    """What the model can offer, highest threshold first: the lowest threshold reaching each of
    PRECISION_LEVELS, and, when few of those are reachable, its best precision and the highest threshold
    reaching each of RECALL_LEVELS."""
    points = {
        point.threshold: point
        for level in PRECISION_LEVELS
        if (point := lowest_threshold(p, y, level, positives=positives, min_hits=MIN_HITS)) is not None
    }
    if len(points) < 4:
        best = _best_precision(p, y, positives)
        if best.precision > 0:
            points.setdefault(best.threshold, best)
        thresholds, precisions, hits = _curve(p, y, positives)
        for level in RECALL_LEVELS:
            reaching = np.nonzero(hits >= max(MIN_HITS, level * positives))[0]
            if len(reaching):
                last = reaching[-1]  # the highest threshold that still finds this share
                points.setdefault(
                    float(thresholds[last]), _point(thresholds[last], precisions[last], hits[last], positives)
                )
    return sorted(points.values(), key=lambda point: -point.threshold)


def _best_precision(p: np.ndarray, y: np.ndarray, positives: int) -> CurvePoint:
    """The lowest threshold of the best precision found with at least MIN_HITS true matches."""
    thresholds, precisions, hits = _curve(p, y, positives)
    enough = np.nonzero(hits >= MIN_HITS)[0]
    if not len(enough):
        return CurvePoint(threshold=1.0, precision=0.0, recall=0.0)
    best = enough[np.argmax(precisions[enough])]  # the first of equals: the lowest threshold, the most found
    return _point(thresholds[best], precisions[best], hits[best], positives)


def _best_f1(p: np.ndarray, y: np.ndarray) -> float:
    """The threshold of the best F1 on the candidates: where a person's look is worth most."""
    thresholds, precisions, hits = _curve(p, y, None)
    if not len(thresholds):
        return 1.0
    recalls = hits / max(1, int(y.sum()))
    f1 = 2 * precisions * recalls / np.maximum(precisions + recalls, 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, folds: int = FOLDS) -> np.ndarray:
    """Each candidate's probability from a model fitted without its query's fold (folds keep each query's
    candidates together and the share of true pairs alike)."""
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0)
    predicted = cross_val_predict(_pipeline(), x, y, groups=groups, cv=splitter, method="predict_proba")
    return np.asarray(predicted[:, 1])


@dataclass
class Labelled:
    """Candidates of labelled products: features, whether each is the same product, and its query."""

    rows: list[list[float]]
    labels: list[bool]
    groups: list[int]
    positives: int  # every labelled true pair, also those the search did not bring among the candidates
    shops: list[str] = field(default_factory=list)  # each candidate's retailer (none given: one shop)

    def shop_of(self) -> list[str]:
        """Each row's retailer ("" for all when none were given)."""
        return self.shops if len(self.shops) == len(self.rows) else [""] * len(self.rows)


def first_of_each_shop(p: np.ndarray, groups: Sequence[int], shops: Sequence[str]) -> np.ndarray:
    """Whether each candidate is the most probable of its query's candidates in its shop (the first in search
    order among equals): only those may be decided `match`. A shop lists a product once (the labels' own rule,
    `LabelledPair.partial`), so of two listings of one shop at most one is the query's product; the other,
    however probable, is `uncertain`: a near twin (an edition, a pack size) or a duplicate listing, either worth
    a person's look. Measured on the valid splits before it was adopted (docs/BENCHMARKS.md, "The default
    match model"); it applies to every model, its thresholds chosen as before (`fit_model`)."""
    best: dict[tuple[int, str], int] = {}
    for i, key in enumerate(zip(groups, shops, strict=True)):
        if key not in best or p[i] > p[best[key]]:
            best[key] = i
    first = np.zeros(len(p), dtype=bool)
    first[list(best.values())] = True
    return first


@dataclass(frozen=True)
class Fitted:
    """A fitted calibration and what `calibrate` should say about it."""

    calibration: Calibration
    notes: list[str] = field(default_factory=list)  # caveats worth a WARNING line (few labels, ...)


class LabelsError(ValueError):
    """Labels a model cannot be fitted on; the message names the problem."""


def check_enough(data: Labelled) -> None:
    """Refuse labels out-of-fold thresholds cannot be chosen on, saying what is missing: every fold needs
    products with a true pair and products with a false one among their candidates."""
    true = sum(data.labels)
    queries = len(set(data.groups))
    with_true = len({g for g, same in zip(data.groups, data.labels, strict=True) if same})
    with_false = len({g for g, same in zip(data.groups, data.labels, strict=True) if not same})
    if queries < FOLDS or true < FOLDS or len(data.labels) - true < FOLDS:
        raise LabelsError(
            f"too few labelled candidates: calibration needs the candidates of at least {FOLDS} labelled products, "
            f"with at least {FOLDS} true and {FOLDS} false pairs among them; got {len(data.labels)} candidates of "
            f"{queries} products ({true} true): label more pairs"
        )
    if with_true < FOLDS or with_false < FOLDS:
        raise LabelsError(
            f"the labels are too one-sided: {with_true} labelled products have a true pair among their candidates "
            f"and {with_false} a false one; at least {FOLDS} of each are needed (the true pairs of one product "
            "teach nothing about the others): label the counterparts of more products"
        )


def check_labels(store: ProductStore, catalogue: str, pairs: Sequence[LabelledPair]) -> None:
    """LabelsError naming what is wrong with labels before anything is fitted: products the catalogue does not
    hold, counterparts in no other retailer (or in the product's own), and too few labelled products."""
    retailers = list(store.facet_counts(catalogue, "retailer"))
    problems: list[str] = []

    def held(retailer: str, product_id: str) -> bool:
        return store.get(catalogue, point_id(retailer, product_id)) is not None

    for pair in pairs:
        own = pair.product
        where = f"{own.retailer}/{own.id}"
        if not held(own.retailer, own.id):
            problems.append(f"{where} is not in catalogue {catalogue}")
            continue
        for label in [*(pair.expect or []), *pair.reject]:
            if isinstance(label, ProductRef):
                if label.retailer == own.retailer:
                    problems.append(f"{where}: {label.retailer}/{label.id} is in the product's own retailer")
                elif not held(label.retailer, label.id):
                    problems.append(f"{where}: {label.retailer}/{label.id} is not in catalogue {catalogue}")
            elif not any(held(r, label) for r in retailers if r != own.retailer):
                mine = held(own.retailer, label)
                problems.append(
                    f"{where}: id {label!r} is in no other retailer" + (" (only in the product's own)" if mine else "")
                )
        if len(problems) >= 5:
            break
    if problems:
        raise LabelsError(f"the labels do not fit catalogue {catalogue}: " + "; ".join(problems[:5]))
    products = {(p.product.retailer, p.product.id) for p in pairs}
    if len(products) < FOLDS:
        raise LabelsError(f"{len(products)} labelled products: at least {FOLDS} are needed")
    if not any(p.positives for p in pairs):
        raise LabelsError("no labelled product has a counterpart (every `expect` is empty): nothing shows a match")


def fit_model(
    data: Labelled,
    *,
    target_precision: float = 0.95,
    accept_precision: float | None = None,
    depth: int = DEFAULT_DEPTH,
    fusion: Fusion = DEFAULT_FUSION,
    source: str = "",
    adapters: dict[str, int] | None = None,
    reranker: str | None = None,
    rerank_depth: int = DEFAULT_RERANK_DEPTH,
    names: Sequence[str] | None = None,
) -> Fitted:
    """Fit the model on all labelled candidates; choose the thresholds on out-of-fold probabilities. When no
    threshold reaches `target_precision`, `accept_precision` (lower) is tried; when neither is reached the
    calibration is stored unreliable. `adapters`: the catalogue's active heads the candidates were found under;
    `reranker`: the digest of the cross-encoder whose pair scores the rows carry (`labelled_candidates` with it);
    `names`: the features the rows carry (default: `feature_names`)."""
    check_enough(data)
    names = list(names) if names is not None else feature_names(pair=reranker is not None)
    x = np.asarray(data.rows, dtype=np.float64).reshape(-1, len(names))
    y = np.asarray(data.labels, dtype=np.int64)
    model = _pipeline().fit(x, y)
    held_out = out_of_fold(x, y, np.asarray(data.groups))
    notes = []
    if data.positives < FEW_TRUE_PAIRS:
        notes.append(
            f"only {data.positives} labelled true pairs: out-of-fold precision and recall are rough estimates "
            f"(label {FEW_TRUE_PAIRS} or more)"
        )
    # Thresholds are chosen on every candidate, although `match` is only decided for the first of each shop
    # (`first_of_each_shop`): that rule only takes matches away, so the precision stored is a floor. Chosen on the
    # first of each shop alone, a threshold falls to ~0 on labels whose products all have a counterpart (a
    # product's best candidate is then always right), and would decide `match` for every product of a catalogue.
    match = lowest_threshold(held_out, y, target_precision, positives=data.positives, min_hits=MIN_HITS)
    accepted = None
    if match is None and accept_precision is not None:
        match = lowest_threshold(held_out, y, accept_precision, positives=data.positives, min_hits=MIN_HITS)
        accepted = accept_precision if match is not None else None
    reliable = match is not None
    if match is None:  # stored to be shown, never applied: `decide` gives no 'match' from it
        match = _best_precision(held_out, y, data.positives)
    uncertain = lowest_threshold(held_out, y, UNCERTAIN_PRECISION)
    scaler, logistic = model[0], model[-1]
    calibration = Calibration(
        version=MODEL_VERSION,
        features=names,
        mean=scaler.mean_.tolist(),
        scale=scaler.scale_.tolist(),
        weights=logistic.coef_[0].tolist(),
        bias=float(logistic.intercept_[0]),
        match_threshold=match.threshold,
        # below 0.5 precision everywhere, the middle band is the candidates a person should look at first
        uncertain_threshold=min(uncertain.threshold if uncertain else _best_f1(held_out, y), match.threshold),
        target_precision=target_precision,
        precision=match.precision,
        recall=match.recall,
        candidates=len(y),
        depth=depth,
        fusion=fusion,
        fitted_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source,
        adapters=adapters or {},
        reliable=reliable,
        accepted_precision=accepted,
        curve=offered_curve(held_out, y, data.positives),
        reranker=reranker,
        rerank_depth=rerank_depth if reranker else 0,
        typed_query=_typed_query(data, names, target_precision, accept_precision) if REVERSE in names else None,
    )
    return Fitted(calibration, notes)


def _typed_query(
    data: Labelled, names: list[str], target_precision: float, accept_precision: float | None
) -> Calibration:
    """The same model fitted without the reverse rank: what decides a typed query's results (`/search`), whose
    query is no listing of a retailer that a candidate could search back."""
    keep = [i for i, name in enumerate(names) if name != REVERSE]
    rows = [[row[i] for i in keep] for row in data.rows]
    shipped = default_model()
    if PRIOR in names and shipped is not None and shipped.calibration.typed_query is not None:
        # the prior of a typed query is the default model's own twin's (as `features` computes it then)
        twin = shipped.calibration.typed_query
        named = [dict(zip(names, row, strict=True)) for row in data.rows]
        prior = probabilities(twin, [[row[n] for n in twin.features] for row in named])
        at = [names[i] for i in keep].index(PRIOR)
        for row, p in zip(rows, prior, strict=True):
            row[at] = _logit(float(p))
    without = Labelled(rows, data.labels, data.groups, data.positives, data.shops)
    return fit_model(
        without,
        target_precision=target_precision,
        accept_precision=accept_precision,
        names=[names[i] for i in keep],
        source="typed queries",
    ).calibration


def fit(
    data: Labelled,
    *,
    target_precision: float = 0.95,
    accept_precision: float | None = None,
    depth: int = DEFAULT_DEPTH,
    fusion: Fusion = DEFAULT_FUSION,
    source: str = "",
    adapters: dict[str, int] | None = None,
    reranker: str | None = None,
    rerank_depth: int = DEFAULT_RERANK_DEPTH,
) -> Calibration:
    """`fit_model`'s calibration alone."""
    return fit_model(
        data,
        target_precision=target_precision,
        accept_precision=accept_precision,
        depth=depth,
        fusion=fusion,
        source=source,
        adapters=adapters,
        reranker=reranker,
        rerank_depth=rerank_depth,
    ).calibration


def decide(calibration: Calibration, p: float, *, first: bool = True) -> Decision:
    """An unreliable calibration never says 'match': its best is a candidate worth a look. `first`: whether the
    candidate is the most probable of its shop (`first_of_each_shop`); another is at most 'uncertain'."""
    if calibration.reliable and first and p >= calibration.match_threshold:
        return "match"
    return "uncertain" if p >= calibration.uncertain_threshold else "no_match"


def decide_all(calibration: Calibration, p: np.ndarray, shops: Sequence[str]) -> list[Decision]:
    """The decisions of one query's candidates (`shops`: each one's retailer)."""
    first = first_of_each_shop(p, [0] * len(p), shops)
    return [decide(calibration, float(q), first=bool(f)) for q, f in zip(p, first, strict=True)]


def unreliable_warning(calibration: Calibration) -> str | None:
    """What a reader of the decisions must know about the calibration, or None when they hold as stored."""
    if calibration.reliable:
        return None
    return (
        f"the match model reached no threshold with out-of-fold precision {calibration.target_precision:.2f} "
        f"(at best {calibration.precision:.2f} at recall {calibration.recall:.2f}): no candidate is decided 'match'; "
        "label more pairs, or choose a precision from its curve with `ingest calibrate --accept-precision`"
    )


def _current(calibration: Calibration) -> bool:
    pair = calibration.reranker is not None
    known = calibration.features in (feature_names(pair=pair), list(TRANSFER_FEATURES)) or (
        calibration.features == feature_names(pair=pair, prior=True) and default_model() is not None
    )
    return calibration.version == MODEL_VERSION and known


def usable(calibration: Calibration | None, adapters: dict[str, int]) -> Calibration | None:
    """A stored calibration this version can apply: an older model's features differ, and scores under
    other adaptation heads than the ones it was fitted with (`adapters`, the active ones) are not its own."""
    if calibration is None or not _current(calibration):
        return None
    return calibration if calibration.adapters == adapters else None


@dataclass(frozen=True)
class ActiveModel:
    """The match model this version applies to a catalogue (None: decisions 'uncalibrated'), which one it is
    (`name`: "catalogue", its own, or "default", the shipped transfer model), and a warning when the decisions
    are missing for a reason the user can fix, or unreliable."""

    calibration: Calibration | None
    warning: str | None
    name: Literal["catalogue", "default"] | None = None

    @property
    def reliable(self) -> bool:
        return self.calibration is not None and self.calibration.reliable


AGAIN = "run `python -m ingest calibrate` again"


def _default_for(store: ProductStore, catalogue: str, warning: str | None) -> ActiveModel:
    """The shipped default model when it applies to the catalogue (its text vectors from the encoder the model
    was trained with, no fine-tuned text model active), else no model; `warning` is kept either way."""
    shipped = default_model()
    if shipped is None:
        return ActiveModel(None, warning)
    info = store.info(catalogue)
    if info.fingerprint.text != shipped.text_encoder or TEXT_VECTOR in info.adapters:
        why = (
            f"the default match model applies to text vectors of {shipped.text_encoder} without a fine-tuned text "
            "model; label pairs and run `python -m ingest calibrate` for decisions"
        )
        return ActiveModel(None, warning or why)
    return ActiveModel(shipped.calibration, warning or unreliable_warning(shipped.calibration), "default")


def default_applies(store: ProductStore, catalogue: str) -> bool:
    """Whether the shipped default model can read the catalogue's scores (its text encoder, none fine-tuned)."""
    return _default_for(store, catalogue, None).name == "default"


def active_model(store: ProductStore, catalogue: str, *, models_root: Path | None = None) -> ActiveModel:
    """The catalogue's own match model, when this version can apply it under the catalogue's active heads (and
    its cross-encoder is in `models_root`, default MODELS_PATH), with the warning its decisions need; without
    one it can apply, the shipped default model (`retrieval.match.default`) where it applies."""
    try:
        stored = store.calibration(catalogue)
    except ValidationError:  # the metadata a server handed back is not a calibration of ours
        return _default_for(store, catalogue, f"the catalogue's stored match model cannot be read: {AGAIN}")
    if stored is None:
        return _default_for(store, catalogue, None)
    adapters = store.info(catalogue).adapters
    calibration = usable(stored, adapters)
    if calibration is not None and calibration.reranker:
        try:
            kept_model(models_root or Settings().models_root, calibration.reranker, verify=False)
        except ModelFolderError as exc:
            why = f"the match model's cross-encoder cannot be loaded ({exc}) and is not applied"
            return _default_for(store, catalogue, why)
    if calibration is not None:
        return ActiveModel(calibration, unreliable_warning(calibration), "catalogue")
    if not _current(stored):
        why = f"was fitted by an older version of the match model (v{stored.version}, this one is v{MODEL_VERSION})"
    else:
        why = "was fitted under other adaptation heads than the active ones"
    return _default_for(store, catalogue, f"the catalogue's match model {why} and is not applied: {AGAIN}")


def active_calibration(store: ProductStore, catalogue: str, *, models_root: Path | None = None) -> Calibration | None:
    """The catalogue's stored match model when this version can apply it under the active heads, else None."""
    return active_model(store, catalogue, models_root=models_root).calibration


def reranker_of(engine: SearchEngine, calibration: Calibration) -> Reranker | None:
    """The calibration's cross-encoder, loaded (once per process) from the engine's models folder."""
    if not calibration.reranker:
        return None
    return load_reranker(engine.models_root or Settings().models_root, calibration.reranker)


def pair_scores(
    reranker: Reranker | None, depth: int, query: Product, candidates: Sequence[Product]
) -> list[float | None]:
    """The cross-encoder's probability for the first `depth` candidates (None for the rest, and for all
    without a cross-encoder)."""
    if reranker is None or not candidates:
        return [None] * len(candidates)
    read = min(len(candidates), depth)
    scores = reranker.score(query, candidates[:read]).tolist()
    return [*scores, *([None] * (len(candidates) - read))]


def reverse_ranks(
    engine: SearchEngine,
    catalogue: str,
    product: Product,
    candidates: Sequence[Product],
    *,
    fusion: Fusion = DEFAULT_FUSION,
    asked: bool = True,
) -> list[int | None]:
    """Where `product` lands when each of the first REVERSE_CANDIDATES candidates searches the product's own
    retailer with its stored vectors (1-based; 0: not among its first REVERSE_DEPTH); None for the candidates
    not asked (all of them when not `asked`). The searches go to the store as one batch."""
    ranks: list[int | None] = [None] * len(candidates)
    if not asked or not candidates:
        return ranks
    back = SearchFilters(retailer=[product.retailer])
    options = SearchOptions(limit=REVERSE_DEPTH, fusion=fusion, ranks=False)
    asking = candidates[:REVERSE_CANDIDATES]
    responses = engine.search_products(catalogue, [(c.retailer, c.id) for c in asking], filters=back, options=options)
    for i, response in enumerate(responses):
        # a candidate removed since it was found (a concurrent prune) finds nothing back
        found = [r.id for r in response.results] if response is not None else []
        ranks[i] = found.index(product.id) + 1 if product.id in found else 0
    return ranks


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
        undecided = [{**r.model_dump(), "decision": "uncalibrated"} for r in response.results]
        return product, [MatchResult.model_validate(r) for r in undecided]
    found = [r.product for r in response.results]
    pairs = pair_scores(reranker_of(engine, calibration), calibration.rerank_depth, product, found)
    reverse = reverse_ranks(engine, catalogue, product, found, fusion=chosen, asked=REVERSE in calibration.features)
    candidates = [
        Candidate(r.product, r.scores.model_dump(), pair, back)
        for r, pair, back in zip(response.results, pairs, reverse, strict=True)
    ]
    rows = features(product, candidates, names=calibration.features)
    p = probabilities(calibration, rows) if candidates else np.zeros(0)
    decisions = decide_all(calibration, p, [r.retailer for r in response.results])
    order = np.argsort(-p, kind="stable")[:limit]
    return product, [
        MatchResult.model_validate(
            {**response.results[i].model_dump(), "decision": decisions[i], "confidence": round(float(p[i]), 4)}
        )
        for i in order
    ]


def decide_search(response: SearchResponse, text: str | None, active: ActiveModel) -> SearchResponse:
    """A query's results decided by the catalogue's match model (is each the product the words describe?), in
    the order the search gave them. Only a query with words is decided (a photo alone is not a listing the
    models were fitted on), and only by a model without a cross-encoder (it would read every result)."""
    calibration = active.calibration
    if calibration is None or calibration.reranker or not text or not response.results:
        return response
    if REVERSE in calibration.features:  # no retailer to search back: the twin fitted without it decides
        calibration = calibration.typed_query
        if calibration is None:
            return response
    query = Product(id="query", retailer="query", title=text)
    candidates = [Candidate(r.product, r.scores.model_dump()) for r in response.results]
    p = probabilities(calibration, features(query, candidates, names=calibration.features))
    decisions = decide_all(calibration, p, [r.retailer for r in response.results])
    for result, probability, decision in zip(response.results, p, decisions, strict=True):
        result.decision = decision
        result.confidence = round(float(probability), 4)
    response.model = active.name
    return response


def labelled_candidates(
    engine: SearchEngine,
    catalogue: str,
    pairs: Iterable[LabelledPair],
    *,
    depth: int = DEFAULT_DEPTH,
    fusion: Fusion = DEFAULT_FUSION,
    reranker: Reranker | None = None,
    rerank_depth: int = DEFAULT_RERANK_DEPTH,
    progress: Callable[[int], None] | None = None,
    names: Sequence[str] | None = None,
) -> Labelled:
    """Each labelled product's best `depth` candidates in the other retailers, with their features (and the
    pair scores of `reranker` for the first `rerank_depth`, when one is given; `names`: other features)."""
    data = Labelled([], [], [], 0)
    for number, pair in enumerate(pairs):
        product, results = find_matches(
            engine, catalogue, pair.product.retailer, pair.product.id, calibration=None, limit=depth, fusion=fusion
        )
        found = [r.product for r in results]
        scores = pair_scores(reranker, rerank_depth, product, found)
        asked = REVERSE in (names if names is not None else FEATURES)
        reverse = reverse_ranks(engine, catalogue, product, found, fusion=fusion, asked=asked)
        candidates = [
            Candidate(r.product, r.scores.model_dump(), s, back)
            for r, s, back in zip(results, scores, reverse, strict=True)
        ]
        rows = features(product, candidates, pair=reranker is not None, names=names)  # margins read every candidate
        labels = [pair.label(r.retailer, r.id) for r in results]
        known = [i for i, label in enumerate(labels) if label is not None]  # without `expect`: the rejects only
        data.rows += [rows[i] for i in known]
        data.labels += [bool(labels[i]) for i in known]
        data.groups += [number] * len(known)
        data.shops += [results[i].retailer for i in known]
        data.positives += pair.positives
        if progress:
            progress(number + 1)
    return data
