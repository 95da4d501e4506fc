"""The review queue: the pairs of one retailer's products whose answer would teach the match model most.

A reviewer's time is the scarce part. Each call looks at a sample of the retailer's products (products never
reviewed first, in an order that changes as labels arrive), finds each one's first candidates in the other
shops with the active match model, and asks about the candidate of each product that is most in doubt:

- **uncertain**: its probability is near the model's `match` threshold (distance in log-odds), where an
  answer moves the threshold or the weights most;
- **signals disagree**: the photo, the words and the identifiers point different ways (first by one ranking
  and not by another, a shared model number under a low probability, a conflicting one under a high one);
- **no counterpart?**: even the best candidate is unlikely, so the product may be sold by no other shop (an
  answer of "no counterpart" teaches `no_match` for all of its candidates);
- **coverage**: a quarter of the pairs are random products' best candidates, so that the labels stay a fair
  sample of the catalogue and the out-of-fold thresholds fitted on them hold for it (uncertainty alone asks
  only about the hard cases);
- **runner-up**: a quarter are the next candidate of a product whose best one looks right: the close sibling
  ("the 2008 edition", "the 500 g pack") that a model must learn to tell apart, and the answers' share of
  "different" (where the best candidates are mostly right, every other question would be answered "same", and
  a model cannot be fitted on one kind of answer).

Pairs already answered, and products given in `skip`, are never asked. One pair per product, so a round's
answers cover as many products as it has pairs. Scoring is by hand (a handful of rules over the match
model's own probability and features): no library ranks "what to ask next" for this model."""

from __future__ import annotations

import math
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.match.model import MODALITIES, ActiveModel, active_model, find_matches, pair_signals
from retrieval.search import ImageUrl, SearchEngine, ref_as_url
from schemas.payload import Product
from schemas.search import MatchResult, ReviewPair, SearchFilters

CANDIDATES = 5  # the first candidates of a product that are looked at
SCAN_PER_PAIR = 3  # products looked at per pair asked
MIN_SCAN, MAX_SCAN = 20, 240  # each costs a match query (~0.01-0.1 s on 2 cores)
READ_PER_SCAN = 50  # ids read past reviewed products, per product looked at, before looking at reviewed ones
COVERAGE_SHARE = 0.25  # of a queue, random products' best candidates
RUNNER_SHARE = 0.25  # of a queue, close siblings of likely matches
Key = tuple[str, str]
_NO_PAIR: Key = ("", "")


@dataclass(frozen=True)
class _Asked:
    score: float
    pair: ReviewPair


def explain(left: Product, right: Product) -> tuple[list[str], list[str]]:
    """(signals saying the two listings are one product, signals saying they are not), in words."""
    s = pair_signals(left, right)
    agree: list[str] = []
    disagree: list[str] = []
    if s["gtin_same"]:
        agree.append("same GTIN")
    if s["gtin_conflict"]:
        disagree.append("different GTINs")
    if s["code_same"]:
        agree.append("same model number")
    elif s["code_stem_same"] or s["code_prefix"]:
        agree.append("model numbers of one family")
    if s["code_conflict"]:
        disagree.append("different model numbers")
    if s["title_jaccard"] >= 0.5:
        agree.append(f"titles share {s['title_jaccard']:.0%} of their words")
    elif s["title_jaccard"] < 0.2:
        disagree.append(f"titles share {s['title_jaccard']:.0%} of their words")
    if s["numbers_added"] > 0 and s["numbers_kept"] < 1:
        disagree.append("sizes, versions or counts differ")
    if s["price_known"]:
        ratio = math.exp(s["price_gap"])
        if ratio >= 1.5:
            disagree.append(f"prices differ {ratio:.1f}x")
        elif ratio <= 1.1:
            agree.append("about the same price")
    return agree, disagree


def _log_odds(p: float) -> float:
    q = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(q / (1 - q))


def _doubt(active: ActiveModel, left: Product, matches: Sequence[MatchResult], at: int) -> tuple[float, list[str]]:
    """How much the answer on `matches[at]` would teach, with the reasons in words."""
    calibration = active.calibration
    result = matches[at]
    reasons: list[str] = []
    score = 0.0
    if calibration is not None and result.confidence is not None:
        threshold = calibration.match_threshold if calibration.reliable else 0.5
        distance = abs(_log_odds(result.confidence) - _log_odds(threshold))
        score = math.exp(-distance / 2)
        closeness = "uncertain" if score >= 0.5 else "the closest to the decision among this product's candidates"
        reasons.append(f"{closeness}: probability {result.confidence:.2f}, match from {threshold:.2f}")
        if at == 0 and result.confidence < calibration.uncertain_threshold:
            score = max(score, 0.6)
            reasons.append("even the best candidate is unlikely: the product may have no counterpart")
    else:
        score = 0.5 if at == 0 else 0.3  # no model: ask about the search's own first choices
        reasons.append("no match model yet: the search's first candidates")
    firsts = []
    for modality in MODALITIES:
        column = [getattr(m.scores, modality) for m in matches]
        if result_score := column[at]:
            best = max(v for v in column if v is not None)
            firsts.append(result_score >= best)
    if len(set(firsts)) > 1:
        score += 0.3
        reasons.append("the rankings disagree: first by some signals, not by others")
    signals = pair_signals(left, result.product)
    p = result.confidence
    if p is not None and calibration is not None:
        if (signals["code_same"] or signals["gtin_same"]) and p < calibration.match_threshold:
            score += 0.3
            reasons.append("the identifiers agree, the model doubts")
        elif (signals["code_conflict"] or signals["gtin_conflict"]) and p >= calibration.uncertain_threshold:
            score += 0.3
            reasons.append("the identifiers conflict, the model leans to the same product")
    return score, reasons


def _pair_of(left: Product, result: MatchResult | None, probability_reasons: tuple[float, list[str]]) -> _Asked:
    score, reasons = probability_reasons
    if result is None:
        return _Asked(score, ReviewPair(left=left, right=None, why=reasons))
    agree, disagree = explain(left, result.product)
    return _Asked(
        score,
        ReviewPair(
            left=left,
            right=result.product,
            probability=result.confidence,
            decision=result.decision,
            why=reasons,
            agree=agree,
            disagree=disagree,
        ),
    )


def _sample(
    engine: SearchEngine,
    catalogue: str,
    retailer: str,
    size: int,
    lefts: set[Key],
    skip: Collection[str],
    rng: np.random.Generator,
) -> list[str]:
    """`size` of `retailer`'s product ids in random order, never-reviewed ones first. Read from a random point
    id on (wrapping round to the first), so that a call reads about as many ids as it needs, not the whole
    retailer: products reviewed or skipped are passed over, up to READ_PER_SCAN times `size` ids."""
    start = str(uuid.UUID(bytes=rng.bytes(16), version=4))
    fresh: dict[str, None] = {}
    seen: dict[str, None] = {}
    read = 0
    for ids in (
        engine.store.product_ids(catalogue, retailer, start=start),
        engine.store.product_ids(catalogue, retailer),
    ):
        for product_id in ids:
            if product_id in skip:
                continue
            if (retailer, product_id) in lefts:
                if len(seen) < size:
                    seen[product_id] = None
            elif product_id in fresh:  # the wrap came round to where it started
                break
            else:
                fresh[product_id] = None
            read += 1
            if len(fresh) >= size or read >= READ_PER_SCAN * size:
                break
        if len(fresh) >= size or read >= READ_PER_SCAN * size:
            break
    firsts, others = list(fresh), list(seen)
    return ([firsts[k] for k in rng.permutation(len(firsts))] + [others[k] for k in rng.permutation(len(others))])[
        :size
    ]


def review_queue(
    engine: SearchEngine,
    catalogue: str,
    retailer: str,
    *,
    against: Sequence[str] = (),
    limit: int = 10,
    answered: tuple[set[Key], set[tuple[Key, Key]]] = (set(), set()),
    skip: Collection[str] = frozenset(),
    seed: int = 0,
    image_url: ImageUrl = ref_as_url,
    coverage_share: float = COVERAGE_SHARE,
) -> tuple[ActiveModel, list[ReviewPair]]:
    """Up to `limit` unanswered pairs of `retailer`'s products (one per product) against the other retailers
    (only `against` when given), the most telling first. `answered`: (left products with a label, labelled
    pairs either way round); `skip`: product ids never to show, on either side; `seed`: the sample's order (the
    service passes the number of labels, so each round looks at other products)."""
    active = active_model(engine.store, catalogue, models_root=engine.models_root)
    lefts, pairs = answered
    size = min(MAX_SCAN, max(MIN_SCAN, SCAN_PER_PAIR * limit))
    scan = _sample(engine, catalogue, retailer, size, lefts, skip, np.random.default_rng(seed))
    coverage = set(scan[: int(coverage_share * limit)])  # the sample's first products: random by construction
    filters = SearchFilters(retailer=list(against))
    telling: list[_Asked] = []
    covered: list[_Asked] = []
    runners: list[_Asked] = []
    for product_id in scan:
        left = (retailer, product_id)
        if (left, _NO_PAIR) in pairs:  # said to have no counterpart: none of its candidates is asked about
            continue
        product, matches = find_matches(
            engine,
            catalogue,
            retailer,
            product_id,
            calibration=active.calibration,
            limit=CANDIDATES,
            filters=filters,
            image_url=image_url,
        )
        if not matches:
            if (left, _NO_PAIR) not in pairs:
                reasons = ["no candidate in the other shops: does it have a counterpart?"]
                telling.append(_pair_of(product, None, (0.6, reasons)))
            continue
        open_ = [k for k, m in enumerate(matches) if m.id not in skip and (left, (m.retailer, m.id)) not in pairs]
        if not open_:
            continue
        if product_id in coverage:
            first = open_[0]
            reasons = ["a random product's best open candidate: keeps the labels a fair sample"]
            covered.append(_pair_of(product, matches[first], (1.0, reasons)))
            continue
        doubts = {k: _doubt(active, product, matches, k) for k in open_}
        best = max(open_, key=lambda k: doubts[k][0])
        fresh_bonus = 0.2 if left not in lefts else 0.0  # coverage of products never reviewed
        score, reasons = doubts[best]
        telling.append(_pair_of(product, matches[best], (score + fresh_bonus, reasons)))
        calibration = active.calibration
        top = matches[0].confidence
        likely = top is None or calibration is None or top >= calibration.uncertain_threshold
        runner = next((k for k in open_ if k > 0), None)
        if likely and runner is not None:
            reasons = [f"the best candidate looks right: is number {runner + 1}, a close one, the same too?"]
            runners.append(_pair_of(product, matches[runner], (doubts[runner][0] + fresh_bonus, reasons)))
    chosen = list(covered)
    for pool, share in ((runners, RUNNER_SHARE), (telling, 1.0)):
        pool.sort(key=lambda asked: -asked.score)
        room = min(limit - len(chosen), max(1, int(share * limit)))
        taken = {asked.pair.left.id for asked in chosen}
        for asked in pool:
            if room <= 0:
                break
            if asked.pair.left.id not in taken:
                chosen.append(asked)
                taken.add(asked.pair.left.id)
                room -= 1
    return active, [asked.pair for asked in chosen[:limit]]
